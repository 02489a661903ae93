//! The whole agent against an in-process fake `AgentService` on loopback: registration with
//! failover, allocation watch, status updates, reattaching to tasks across an agent restart,
//! and GC.

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use mlp_agent::{Agent, AgentConfig};
use mlp_proto::consts::{alloc_client, task_event};
use mlp_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use mlp_proto::v1::{
    AllocClientUpdate, Allocation, HeartbeatRequest, HeartbeatResponse, Job, Node, NodeAllocations, OverlayPeers, RegisterNodeRequest,
    RegisterNodeResponse, ServiceInstances, Task, TaskConfig, TaskGroup, UpdateAllocsRequest, UpdateAllocsResponse, UpdateServicesRequest,
    UpdateServicesResponse, WatchAllocationsRequest, WatchOverlayRequest, WatchServicesRequest,
};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

mod shared;
use shared::Guard;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[derive(Clone)]
struct Fake {
    nodes: Arc<Mutex<Vec<Node>>>,
    updates: Arc<Mutex<Vec<AllocClientUpdate>>>,
    allocs: watch::Sender<Vec<Allocation>>,
    /// Every task pid the agent reported, pinned as it was reported: killed when the test ends.
    tasks: Arc<Mutex<Guard>>,
}

#[tonic::async_trait]
impl AgentService for Fake {
    async fn register(&self, r: Request<RegisterNodeRequest>) -> Result<Response<RegisterNodeResponse>, Status> {
        if let (Ok(mut n), Some(node)) = (self.nodes.lock(), r.into_inner().node) {
            n.push(node);
        }
        Ok(Response::new(RegisterNodeResponse { heartbeat_ttl_ms: 900, index: 1, ..Default::default() }))
    }
    async fn heartbeat(&self, _: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        Ok(Response::new(HeartbeatResponse { heartbeat_ttl_ms: 900 }))
    }
    type WatchAllocationsStream = Pin<Box<dyn Stream<Item = Result<NodeAllocations, Status>> + Send>>;
    #[allow(clippy::result_large_err)]
    async fn watch_allocations(&self, _: Request<WatchAllocationsRequest>) -> Result<Response<Self::WatchAllocationsStream>, Status> {
        let s = WatchStream::new(self.allocs.subscribe()).map(|allocations| Ok(NodeAllocations { allocations, index: 1, partial: false }));
        Ok(Response::new(Box::pin(s)))
    }
    async fn update_allocs(&self, r: Request<UpdateAllocsRequest>) -> Result<Response<UpdateAllocsResponse>, Status> {
        let updates = r.into_inner().updates;
        if let Ok(mut g) = self.tasks.lock() {
            for st in updates.iter().flat_map(|u| u.task_states.values()) {
                g.add(st.pid);
            }
        }
        if let Ok(mut u) = self.updates.lock() {
            u.extend(updates);
        }
        Ok(Response::new(UpdateAllocsResponse { index: 1 }))
    }
    async fn update_services(&self, _: Request<UpdateServicesRequest>) -> Result<Response<UpdateServicesResponse>, Status> {
        Ok(Response::new(UpdateServicesResponse { index: 1 }))
    }
    type WatchServicesStream = Pin<Box<dyn Stream<Item = Result<ServiceInstances, Status>> + Send>>;
    #[allow(clippy::result_large_err)]
    async fn watch_services(&self, _: Request<WatchServicesRequest>) -> Result<Response<Self::WatchServicesStream>, Status> {
        Ok(Response::new(Box::pin(futures::stream::pending())))
    }
    type WatchOverlayStream = Pin<Box<dyn Stream<Item = Result<OverlayPeers, Status>> + Send>>;
    async fn watch_overlay(&self, _: Request<WatchOverlayRequest>) -> Result<Response<Self::WatchOverlayStream>, Status> {
        Err(Status::unimplemented("this fake runs no overlay"))
    }
}

impl Fake {
    fn latest(&self, id: &str) -> Option<AllocClientUpdate> {
        self.updates.lock().ok()?.iter().rev().find(|u| u.alloc_id == id).cloned()
    }
}

/// Kills every task the fake server saw when the test ends.
struct PidGuard(Fake);
impl Drop for PidGuard {
    fn drop(&mut self) {
        if let Ok(mut g) = self.0.tasks.lock() {
            drop(std::mem::take(&mut *g));
        }
    }
}

async fn poll<T>(secs: u64, mut f: impl FnMut() -> Option<T>) -> Result<T, String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err("condition not reached in time".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn alloc(id: &str, job_type: &str, cmd: &str, desired: &str) -> Allocation {
    Allocation {
        id: id.into(),
        name: "j.g[0]".into(),
        task_group: "g".into(),
        desired_status: desired.into(),
        client_status: "pending".into(),
        job: Some(Job {
            id: "j".into(),
            name: "j".into(),
            r#type: job_type.into(),
            groups: vec![TaskGroup {
                name: "g".into(),
                count: Some(1),
                tasks: vec![Task {
                    name: "t".into(),
                    driver: "raw_exec".into(), // exec needs a cgroup hierarchy and root
                    config: Some(TaskConfig { command: "/bin/sh".into(), args: vec!["-c".into(), cmd.into()], ..Default::default() }),
                    kill_timeout_ms: 500,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn count(u: &AllocClientUpdate, kind: &str) -> usize {
    u.task_states.get("t").map(|s| s.events.iter().filter(|e| e.r#type == kind).count()).unwrap_or(0)
}

async fn start_agent(dir: &Path, server: &str) -> Result<Agent, Box<dyn std::error::Error>> {
    Ok(Agent::start(AgentConfig {
        data_dir: dir.to_path_buf(),
        // The first server is dead: the agent must fail over.
        servers: vec!["127.0.0.1:1".into(), server.to_string()],
        node_name: "test-node".into(),
        // raw_exec is off unless the configuration enables it (issue 15 §4).
        drivers_enabled: vec!["exec".into(), "raw_exec".into()],
        isolation: mlp_agent::isolation::IsolationSettings {
            // The test binary cannot supervise tasks: the helper binary does.
            supervisor_exe: Some(env!("CARGO_BIN_EXE_mlp-supervise-helper").into()),
            ..Default::default()
        },
        ..Default::default()
    })
    .await?)
}

#[tokio::test]
async fn agent_runs_reports_restores_and_gcs() -> TestResult {
    let (tx, _rx) = watch::channel(Vec::new());
    let fake = Fake { nodes: Arc::default(), updates: Arc::default(), allocs: tx, tasks: Arc::default() };
    let _guard = PidGuard(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server_addr = listener.local_addr()?.to_string();
    let svc = AgentServiceServer::new(fake.clone());
    let server = tokio::spawn(
        tonic::transport::Server::builder().add_service(svc).serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dir = tempfile::tempdir()?;

    let agent = start_agent(dir.path(), &server_addr).await?;
    let node_id = agent.node_id().to_string();
    let node = poll(15, || fake.nodes.lock().ok()?.first().cloned()).await?;
    assert_eq!(node.id, node_id);
    assert_eq!(node.rpc_addr, agent.rpc_addr().to_string());
    assert_eq!(node.attributes.get("driver.exec").map(String::as_str), Some("1"));

    let batch = alloc("aaaa0001", "batch", "echo hi", "run");
    let service = alloc("bbbb0002", "service", "sleep 100", "run");
    // Ends with exit code 3 once the gate file exists (while the agent is down), and is not
    // restarted.
    let gate = dir.path().join("gate");
    let mut gated = alloc("cccc0003", "batch", &format!("while [ ! -e {} ]; do sleep 0.05; done; exit 3", gate.display()), "run");
    if let Some(g) = gated.job.as_mut().and_then(|j| j.groups.first_mut()) {
        g.restart = Some(mlp_proto::v1::RestartPolicy { attempts: 0, interval_ms: 60_000, delay_ms: 100, mode: "fail".into() });
    }
    fake.allocs.send_replace(vec![batch.clone(), service.clone(), gated.clone()]);
    poll(15, || fake.latest("aaaa0001").filter(|u| u.client_status == alloc_client::COMPLETE)).await?;
    let running = poll(15, || fake.latest("bbbb0002").filter(|u| u.client_status == alloc_client::RUNNING)).await?;
    let old_pid = running.task_states["t"].pid;
    assert!(old_pid > 0);
    let gated_pid =
        poll(15, || fake.latest("cccc0003").filter(|u| u.client_status == alloc_client::RUNNING).map(|u| u.task_states["t"].pid)).await?;

    // Agent restart: the running task is reattached (same pid, not restarted), the finished
    // one is not run again.
    agent.shutdown().await;
    assert!(Path::new(&format!("/proc/{old_pid}")).exists(), "shutdown must not kill tasks");
    std::fs::write(&gate, "")?;
    poll(15, || (!Path::new(&format!("/proc/{gated_pid}")).exists()).then_some(())).await?;
    fake.updates.lock().map_err(|e| e.to_string())?.clear();
    let agent = start_agent(dir.path(), &server_addr).await?;
    assert_eq!(agent.node_id(), node_id);
    // The task that ended while the agent was down: its exit code is collected and reported.
    let ended = poll(15, || fake.latest("cccc0003").filter(|u| alloc_client::is_terminal(&u.client_status))).await?;
    assert_eq!(ended.client_status, alloc_client::FAILED, "{ended:?}");
    assert_eq!(ended.task_states["t"].exit_code, Some(3));
    assert_eq!(count(&ended, task_event::STARTED), 1);
    assert_eq!(ended.task_states["t"].restarts, 0);
    let reattached =
        poll(15, || fake.latest("bbbb0002").filter(|u| u.client_status == alloc_client::RUNNING && u.task_states["t"].pid > 0)).await?;
    assert_eq!(reattached.task_states["t"].pid, old_pid, "the same process");
    assert_eq!(reattached.task_states["t"].restarts, 0);
    assert_eq!(count(&reattached, task_event::STARTED), 1);
    assert_eq!(count(&reattached, task_event::RESTARTING), 0);
    let done = poll(15, || fake.latest("aaaa0001")).await?;
    assert_eq!(done.client_status, alloc_client::COMPLETE);
    assert_eq!(count(&done, task_event::STARTED), 1);

    // Desired stop, then the server drops both: tasks killed, dirs garbage-collected.
    let mut stop = service.clone();
    stop.desired_status = "stop".into();
    fake.allocs.send_replace(vec![batch.clone(), stop, gated.clone()]);
    let stopped = poll(15, || fake.latest("bbbb0002").filter(|u| alloc_client::is_terminal(&u.client_status))).await?;
    assert_eq!(stopped.client_status, alloc_client::COMPLETE);
    assert_eq!(count(&stopped, task_event::KILLED), 1);
    fake.allocs.send_replace(vec![]);
    let allocs = dir.path().join("allocs");
    poll(15, || {
        (!allocs.join("aaaa0001").exists() && !allocs.join("bbbb0002").exists() && !allocs.join("cccc0003").exists()).then_some(())
    })
    .await?;
    agent.shutdown().await;
    server.abort();
    Ok(())
}
