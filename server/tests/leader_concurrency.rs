//! The leader plans several evaluations at once; the plan applier must still never overcommit a
//! node, and what doesn't fit must wait as blocked evaluations that get capacity when it frees.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mlp_proto::consts::{alloc_client, alloc_desired, eval_status, job_type};
use mlp_proto::v1::*;
use mlp_server::Server;

mod common;

use common::{node, start};

fn job(name: &str, priority: i32, cpu: u64) -> Job {
    Job {
        id: name.into(),
        name: name.into(),
        namespace: "default".into(),
        r#type: job_type::SERVICE.into(),
        priority,
        groups: vec![TaskGroup {
            name: "g".into(),
            count: Some(1),
            restart: Some(RestartPolicy { attempts: 1, interval_ms: 60_000, delay_ms: 1000, mode: "fail".into() }),
            tasks: vec![Task {
                name: "t".into(),
                driver: "exec".into(),
                config: Some(TaskConfig { command: "/bin/true".into(), args: vec![], ..Default::default() }),
                resources: Some(Resources { cpu_mhz: cpu, memory_mib: 10, ..Default::default() }),
                kill_timeout_ms: 1000,
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Live CPU per node and the number of pending evaluations.
fn snapshot(server: &Server) -> (BTreeMap<String, u64>, usize, usize) {
    let st = server.api.state.read();
    let mut cpu = BTreeMap::new();
    for a in st.allocs.values() {
        if a.desired_status == alloc_desired::RUN && !alloc_client::is_terminal(&a.client_status) {
            *cpu.entry(a.node_id.clone()).or_default() += a.resources.as_ref().map(|r| r.cpu_mhz).unwrap_or(0);
        }
    }
    let pending = st.evals.values().filter(|e| e.status == eval_status::PENDING).count();
    let blocked = st.evals.values().filter(|e| e.status == eval_status::BLOCKED).count();
    (cpu, pending, blocked)
}

async fn settle(server: &Server) -> (BTreeMap<String, u64>, usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (cpu, pending, blocked) = snapshot(server);
        if pending == 0 {
            return (cpu, blocked);
        }
        assert!(Instant::now() < deadline, "evaluations still pending after 30s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_plans_never_overcommit_and_blocked_work_gets_freed_capacity_by_priority() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    for (id, mhz) in [("n1", 1000), ("n2", 1000), ("n3", 500)] {
        server.api.register_node(Some(node(id, mhz))).await.expect("node registers");
    }
    // 40 jobs × 100 MHz onto 2,500 MHz, registered concurrently: 25 fit, 15 wait.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let api = server.api.clone();
        tasks.push(tokio::spawn(async move { api.register_job(Some(job(&format!("j{i:02}"), 50, 100))).await }));
    }
    for t in tasks {
        t.await.expect("join").expect("registered");
    }
    let (cpu, blocked) = settle(&server).await;
    assert_eq!(cpu.get("n1").copied().unwrap_or(0), 1000, "{cpu:?}");
    assert_eq!(cpu.get("n2").copied().unwrap_or(0), 1000, "{cpu:?}");
    assert_eq!(cpu.get("n3").copied().unwrap_or(0), 500, "{cpu:?}");
    assert_eq!(blocked, 15, "the rest waits as blocked evaluations");

    // A high-priority job submitted last must get the first capacity that frees.
    // (Priority 55 is within the preemption delta of the running jobs' 50: it waits.)
    server.api.register_job(Some(job("urgent", 55, 100))).await.expect("registered");
    let (_, blocked) = settle(&server).await;
    assert_eq!(blocked, 16);
    let victim = {
        let st = server.api.state.read();
        // Jobs were registered concurrently, so which 25 got placed is not fixed: take any.
        st.allocs.values().next().map(|a| (a.id.clone(), a.node_id.clone())).expect("some job placed")
    };
    server
        .api
        .update_allocs(UpdateAllocsRequest {
            node_id: victim.1.clone(),
            updates: vec![AllocClientUpdate { alloc_id: victim.0, client_status: alloc_client::COMPLETE.into(), ..Default::default() }],
        })
        .await
        .expect("update");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let placed_urgent = server.api.state.read().allocs.values().any(|a| a.job_id == "urgent");
        if placed_urgent {
            break;
        }
        assert!(Instant::now() < deadline, "urgent job not placed after capacity freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (cpu, blocked) = settle(&server).await;
    assert_eq!(blocked, 15, "exactly one blocked evaluation got the freed slot");
    assert!(cpu.values().sum::<u64>() <= 2500, "{cpu:?}");
    server.shutdown().await;
}
