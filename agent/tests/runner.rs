//! End-to-end alloc/task runner tests without a server: real processes, updates collected
//! from the runner's channel.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mlp_agent::alloc::runner::{spawn_alloc_runner, AllocHandle, RunnerEnv};
use mlp_agent::alloc::state::AllocRegistry;
use mlp_agent::driver::drivers_with;
use mlp_agent::isolation::IsolationSettings;
use mlp_agent::rpc::ClientRpc;
use mlp_proto::consts::{alloc_client, task_event, task_state};
use mlp_proto::v1::client_service_server::ClientService;
use mlp_proto::v1::{AllocClientUpdate, Allocation, Job, LogsRequest, RestartPolicy, Task, TaskConfig, TaskGroup};
use tokio::sync::mpsc;

mod shared;
use shared::Guard;

type TestResult = Result<(), Box<dyn std::error::Error>>;

struct Harness {
    _dir: tempfile::TempDir,
    handle: Option<AllocHandle>,
    rx: mpsc::UnboundedReceiver<AllocClientUpdate>,
    pids: BTreeSet<u32>,
    /// Kills what is left of the tasks seen running when the test ends.
    guard: Guard,
    last: Option<AllocClientUpdate>,
    registry: AllocRegistry,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(h) = &self.handle {
            h.abort();
        }
    }
}

fn task(name: &str, cmd: &str, args: &[&str]) -> Task {
    Task {
        name: name.into(),
        driver: "raw_exec".into(),
        config: Some(TaskConfig { command: cmd.into(), args: args.iter().map(|s| s.to_string()).collect(), ..Default::default() }),
        kill_timeout_ms: 500,
        ..Default::default()
    }
}

fn alloc(job_type: &str, restart: Option<RestartPolicy>, tasks: Vec<Task>) -> Allocation {
    Allocation {
        id: "0123456789abcdef0123456789abcdef".into(),
        name: "j.g[0]".into(),
        task_group: "g".into(),
        desired_status: "run".into(),
        job: Some(Job {
            id: "j".into(),
            name: "j".into(),
            r#type: job_type.into(),
            groups: vec![TaskGroup { name: "g".into(), count: Some(1), restart, tasks, ..Default::default() }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Harness {
    fn start(a: Allocation) -> Result<Self, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let registry = AllocRegistry::default();
        let env = RunnerEnv {
            alloc_root: dir.path().join("allocs"),
            drivers: drivers_with(
                &["exec".to_string(), "raw_exec".to_string()],
                &IsolationSettings {
                    // The test binary cannot supervise tasks: the helper binary does.
                    supervisor_exe: Some(env!("CARGO_BIN_EXE_mlp-supervise-helper").into()),
                    ..Default::default()
                },
            ),
            log_max_file_bytes: 1 << 20,
            log_max_files: 2,
            registry: registry.clone(),
            gpus: Vec::new(),
            nvml: None,
            gpu_health: tokio::sync::watch::channel(Default::default()).1,
            mps: None,
            network: None,
            node_address: "127.0.0.1".into(),
            node_id: String::new(),
            artifacts: Default::default(),
            tracking: Default::default(),
            host_volumes: Default::default(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = spawn_alloc_runner(a, None, env, tx);
        Ok(Harness { _dir: dir, handle: Some(handle), rx, pids: BTreeSet::new(), guard: Guard::default(), last: None, registry })
    }

    /// Collects updates until `pred` holds for one, within `secs`.
    async fn until(
        &mut self,
        secs: u64,
        pred: impl Fn(&AllocClientUpdate) -> bool,
    ) -> Result<AllocClientUpdate, Box<dyn std::error::Error>> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let u = tokio::time::timeout(left, self.rx.recv())
                .await
                .map_err(|_| format!("timed out; last update {:?}", self.last))?
                .ok_or("runner channel closed")?;
            for st in u.task_states.values() {
                if st.pid > 0 {
                    self.pids.insert(st.pid);
                    self.guard.add(st.pid);
                }
            }
            self.last = Some(u.clone());
            if pred(&u) {
                return Ok(u);
            }
        }
    }

    async fn finish(&mut self) -> TestResult {
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(10), h.wait()).await?;
        }
        Ok(())
    }
}

fn event_types(u: &AllocClientUpdate, t: &str) -> Vec<String> {
    u.task_states.get(t).map(|s| s.events.iter().map(|e| e.r#type.clone()).collect()).unwrap_or_default()
}

fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.rfind(')').map(|i| s[i + 1..].trim_start().starts_with('Z')).unwrap_or(true),
        Err(_) => true,
    }
}

#[tokio::test]
async fn batch_exit_zero_completes() -> TestResult {
    let mut h = Harness::start(alloc("batch", None, vec![task("t", "/bin/sh", &["-c", "echo hello $MLP_TASK_NAME; exit 0"])]))?;
    let u = h.until(10, |u| alloc_client::is_terminal(&u.client_status)).await?;
    assert_eq!(u.client_status, alloc_client::COMPLETE);
    let st = &u.task_states["t"];
    assert_eq!(st.state, task_state::DEAD);
    assert!(!st.failed);
    assert_eq!(st.exit_code, Some(0));
    assert_eq!(event_types(&u, "t"), vec![task_event::RECEIVED, task_event::STARTED, task_event::EXITED]);
    h.finish().await?;

    // The Logs RPC reads what the task wrote.
    let rpc = ClientRpc::new(h.registry.clone());
    let resp = rpc.logs(tonic::Request::new(LogsRequest { alloc_id: "0123".into(), follow: true, ..Default::default() })).await?;
    let mut stream = resp.into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(5), stream.next()).await? {
        data.extend_from_slice(&chunk?.data);
    }
    assert_eq!(String::from_utf8_lossy(&data), "hello t\n");
    let err = rpc.logs(tonic::Request::new(LogsRequest { alloc_id: "nope".into(), ..Default::default() })).await.err().map(|s| s.code());
    assert_eq!(err, Some(tonic::Code::NotFound));
    Ok(())
}

#[tokio::test]
async fn failing_service_restarts_then_fails() -> TestResult {
    let policy = RestartPolicy { attempts: 2, interval_ms: 60_000, delay_ms: 100, mode: "fail".into() };
    let mut h = Harness::start(alloc("service", Some(policy), vec![task("t", "/bin/sh", &["-c", "exit 7"])]))?;
    let u = h.until(20, |u| alloc_client::is_terminal(&u.client_status)).await?;
    assert_eq!(u.client_status, alloc_client::FAILED);
    let st = &u.task_states["t"];
    assert_eq!(st.state, task_state::DEAD);
    assert!(st.failed);
    assert_eq!(st.restarts, 2);
    assert_eq!(st.exit_code, Some(7));
    let types = event_types(&u, "t");
    assert_eq!(types.iter().filter(|t| *t == task_event::STARTED).count(), 3);
    assert_eq!(types.iter().filter(|t| *t == task_event::RESTARTING).count(), 2);
    assert_eq!(types.last().map(String::as_str), Some(task_event::NOT_RESTARTING));
    let last = st.events.last().map(|e| e.message.clone()).unwrap_or_default();
    assert_eq!(last, "exceeded allowed attempts 2 in interval 1m0s");
    h.finish().await
}

#[tokio::test]
async fn max_run_duration_kills() -> TestResult {
    let mut t = task("t", "/bin/sh", &["-c", "sleep 100"]);
    t.max_run_duration_ms = 300;
    let mut h = Harness::start(alloc("batch", None, vec![t]))?;
    let u = h.until(20, |u| alloc_client::is_terminal(&u.client_status)).await?;
    assert_eq!(u.client_status, alloc_client::FAILED);
    let types = event_types(&u, "t");
    assert!(types.contains(&task_event::MAX_RUN_DURATION.to_string()), "{types:?}");
    let st = &u.task_states["t"];
    assert!(st.failed);
    assert_eq!(st.restarts, 0);
    h.finish().await?;
    for pid in &h.pids {
        assert!(gone(*pid), "pid {pid} left behind");
    }
    Ok(())
}

#[tokio::test]
async fn stop_kills_tasks() -> TestResult {
    let mut h = Harness::start(alloc(
        "service",
        None,
        vec![task("a", "/bin/sh", &["-c", "sleep 100 & trap '' TERM; wait"]), task("b", "sleep", &["100"])],
    ))?;
    let u = h.until(10, |u| u.client_status == alloc_client::RUNNING).await?;
    assert!(u.task_states.values().all(|s| s.state == task_state::RUNNING));
    if let Some(handle) = &h.handle {
        handle.stop();
    }
    let u = h.until(10, |u| alloc_client::is_terminal(&u.client_status)).await?;
    assert_eq!(u.client_status, alloc_client::COMPLETE);
    for t in ["a", "b"] {
        let st = &u.task_states[t];
        assert_eq!(st.state, task_state::DEAD);
        assert!(!st.failed);
        let types = event_types(&u, t);
        assert!(types.contains(&task_event::KILLING.to_string()));
        assert_eq!(types.last().map(String::as_str), Some(task_event::KILLED));
    }
    h.finish().await?;
    for pid in &h.pids {
        assert!(gone(*pid), "pid {pid} left behind");
    }
    Ok(())
}

#[tokio::test]
async fn missing_binary_is_driver_failure() -> TestResult {
    let mut h = Harness::start(alloc("batch", None, vec![task("t", "/nonexistent/bin", &[])]))?;
    let u = h.until(10, |u| alloc_client::is_terminal(&u.client_status)).await?;
    assert_eq!(u.client_status, alloc_client::FAILED);
    let types = event_types(&u, "t");
    assert_eq!(types.last().map(String::as_str), Some(task_event::DRIVER_FAILURE));
    assert_eq!(u.task_states["t"].restarts, 0);
    h.finish().await
}

#[tokio::test]
async fn logs_follow_until_done() -> TestResult {
    let mut h = Harness::start(alloc(
        "batch",
        None,
        vec![task("w", "/bin/sh", &["-c", "for i in 1 2 3; do echo line$i >&2; sleep 0.1; done"]), task("x", "/bin/sh", &["-c", "exit 0"])],
    ))?;
    h.until(10, |u| u.task_states.get("w").map(|s| s.pid > 0) == Some(true)).await?;
    let rpc = ClientRpc::new(h.registry.clone());
    // Two tasks: the task must be named.
    let err = rpc
        .logs(tonic::Request::new(LogsRequest { alloc_id: "0123456789abcdef0123456789abcdef".into(), ..Default::default() }))
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(err, Some(tonic::Code::InvalidArgument));
    let resp = rpc
        .logs(tonic::Request::new(LogsRequest {
            alloc_id: "0123456789abcdef0123456789abcdef".into(),
            task: "w".into(),
            stderr: true,
            follow: true,
            ..Default::default()
        }))
        .await?;
    let mut stream = resp.into_inner();
    let mut data = Vec::new();
    let collect = async {
        while let Some(chunk) = stream.next().await {
            data.extend_from_slice(&chunk?.data);
        }
        Ok::<_, tonic::Status>(())
    };
    tokio::time::timeout(Duration::from_secs(10), collect).await??;
    assert_eq!(String::from_utf8_lossy(&data), "line1\nline2\nline3\n");
    h.finish().await?;
    let view = h.registry.get("0123456789abcdef0123456789abcdef").ok_or("no view")?;
    assert_eq!(view.client_status, alloc_client::COMPLETE);
    Ok(())
}
