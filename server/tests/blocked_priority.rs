//! Strict priority of blocked work through the real leader (Nomad issue #12792 is the failure to
//! avoid): when capacity frees, a lower-priority blocked evaluation must never take capacity
//! that a higher-priority blocked evaluation could use, whatever their submit order; and a
//! preempting job evicts lower-priority work, which is requeued.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use mlp_proto::consts::{alloc_client, eval_status, job_type};
use mlp_proto::v1::*;
use mlp_server::Server;

mod common;

use common::{node, start};

fn job(name: &str, kind: &str, priority: i32, cpu: u64) -> Job {
    Job {
        id: name.into(),
        name: name.into(),
        namespace: "default".into(),
        r#type: kind.into(),
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

/// Waits (bounded) until no evaluation is pending.
async fn settle(server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pending = server.api.state.read().evals.values().filter(|e| e.status == eval_status::PENDING).count();
        if pending == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "evaluations still pending after 30s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn live_alloc(server: &Server, job: &str) -> Option<Allocation> {
    let st = server.api.state.read();
    let found = st.allocs_for_job("default", job).find(|a| mlp_server::scheduler::resources::is_live(a)).cloned();
    found
}

async fn finish(server: &Server, a: &Allocation) {
    let update = AllocClientUpdate { alloc_id: a.id.clone(), client_status: alloc_client::COMPLETE.into(), ..Default::default() };
    server.api.update_allocs(UpdateAllocsRequest { node_id: a.node_id.clone(), updates: vec![update] }).await.expect("update");
}

async fn wait_for(server: &Server, what: &str, f: impl Fn(&Server) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f(server) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freed_capacity_goes_to_the_highest_priority_blocked_evaluation_not_the_oldest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    server.api.register_node(Some(node("n1", 1000))).await.expect("node");
    // Priorities stay within the preemption delta of each other: everything waits, nothing evicts.
    server.api.register_job(Some(job("blocker", job_type::SERVICE, 50, 1000))).await.expect("job");
    settle(&server).await;
    let blocker = live_alloc(&server, "blocker").expect("blocker placed");
    // Submitted first, lower priority, smaller: under submit order it would take the capacity
    // and leave the high-priority job stuck.
    server.api.register_job(Some(job("low", job_type::BATCH, 46, 500))).await.expect("job");
    settle(&server).await;
    server.api.register_job(Some(job("high", job_type::BATCH, 55, 800))).await.expect("job");
    settle(&server).await;
    assert!(live_alloc(&server, "low").is_none() && live_alloc(&server, "high").is_none());

    finish(&server, &blocker).await;
    wait_for(&server, "the high-priority job to be placed", |s| live_alloc(s, "high").is_some()).await;
    settle(&server).await;
    assert!(live_alloc(&server, "low").is_none(), "the lower-priority evaluation took capacity first");

    // When the high-priority job ends, the low one gets the capacity.
    let high = live_alloc(&server, "high").expect("high");
    finish(&server, &high).await;
    wait_for(&server, "the low-priority job to be placed", |s| live_alloc(s, "low").is_some()).await;

    // A new ready job of lower priority arriving as capacity frees does not jump the queue.
    let low = live_alloc(&server, "low").expect("low");
    finish(&server, &low).await;
    server.api.register_job(Some(job("blocker2", job_type::SERVICE, 50, 1000))).await.expect("job");
    settle(&server).await;
    server.api.register_job(Some(job("high2", job_type::BATCH, 55, 1000))).await.expect("job");
    settle(&server).await;
    assert!(live_alloc(&server, "high2").is_none());
    let blocker2 = live_alloc(&server, "blocker2").expect("blocker2");
    let newcomer = server.api.register_job(Some(job("newcomer", job_type::BATCH, 48, 500)));
    let (r, _) = tokio::join!(newcomer, finish(&server, &blocker2));
    r.expect("job");
    wait_for(&server, "high2 to be placed", |s| live_alloc(s, "high2").is_some()).await;
    settle(&server).await;
    assert!(live_alloc(&server, "newcomer").is_none(), "a newer, lower-priority job took the freed capacity");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_evicts_lower_priority_work_which_is_requeued() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    server.api.register_node(Some(node("n1", 1000))).await.expect("node");
    server.api.register_job(Some(job("low", job_type::BATCH, 20, 800))).await.expect("job");
    settle(&server).await;
    let victim = live_alloc(&server, "low").expect("low placed");
    server.api.register_job(Some(job("high", job_type::BATCH, 80, 600))).await.expect("job");
    wait_for(&server, "the preemptor to be placed", |s| live_alloc(s, "high").is_some()).await;
    settle(&server).await;
    let high = live_alloc(&server, "high").expect("high");
    let v = server.api.state.read().allocs[&victim.id].clone();
    assert_eq!(v.client_status, alloc_client::PREEMPTED);
    assert_eq!(v.preempted_by_allocation, high.id);
    assert_eq!(high.preempted_allocations, vec![victim.id.clone()]);
    // The victim's job is requeued: a blocked evaluation waits for capacity, nothing is lost.
    let blocked = {
        let st = server.api.state.read();
        st.evals.values().any(|e| e.job_id == "low" && e.status == eval_status::BLOCKED)
    };
    assert!(blocked, "the preempted batch job waits as a blocked evaluation");
    finish(&server, &high).await;
    wait_for(&server, "the preempted job's replacement", |s| live_alloc(s, "low").is_some_and(|a| a.id != victim.id)).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gang_that_never_fits_is_reported_unplaceable_after_its_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    for id in ["n1", "n2"] {
        server.api.register_node(Some(node(id, 1000))).await.expect("node");
    }
    let mut j = job("gang", job_type::BATCH, 50, 1000);
    j.groups[0].count = Some(3);
    j.groups[0].gang = true;
    j.groups[0].gang_timeout_ms = 500;
    server.api.register_job(Some(j)).await.expect("job");
    wait_for(&server, "the gang's evaluation to give up", |s| {
        s.api.state.read().evals.values().any(|e| e.job_id == "gang" && e.status == eval_status::FAILED)
    })
    .await;
    let e = {
        let st = server.api.state.read();
        st.evals.values().find(|e| e.job_id == "gang" && e.status == eval_status::FAILED).expect("failed eval").clone()
    };
    assert!(e.unplaceable_reason.contains("gang of 3 needs 3 placed at once; only 2 fit"), "{}", e.unplaceable_reason);
    assert!(live_alloc(&server, "gang").is_none(), "nothing of the gang was placed");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_evaluation_that_never_fits_does_not_starve_ready_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    server.api.register_node(Some(node("n1", 1000))).await.expect("node");
    server.api.register_job(Some(job("blocker", job_type::SERVICE, 50, 1000))).await.expect("job");
    settle(&server).await;
    let blocker = live_alloc(&server, "blocker").expect("blocker placed");
    // Bigger than the node: blocked for good, at the top of the blocked queue.
    server.api.register_job(Some(job("huge", job_type::BATCH, 55, 2000))).await.expect("job");
    settle(&server).await;
    for round in 0..3 {
        let small = format!("small{round}");
        let register = server.api.register_job(Some(job(&small, job_type::BATCH, 48, 300)));
        if round == 0 {
            let (r, _) = tokio::join!(register, finish(&server, &blocker));
            r.expect("job");
        } else {
            register.await.expect("job");
        }
        wait_for(&server, "the small job to be placed", |s| live_alloc(s, &small).is_some()).await;
    }
    assert!(live_alloc(&server, "huge").is_none());
    server.shutdown().await;
}
