//! GPU shares of real devices run under an MPS control daemon that the agent starts for the
//! device and stops after its last sharing task (`gpu::mps`). A stand-in
//! `nvidia-cuda-mps-control` (a shell script written by each test, configured as
//! `GpuSettings.mps_control`) logs every invocation: its arguments, `CUDA_VISIBLE_DEVICES`,
//! `CUDA_MPS_PIPE_DIRECTORY` and what it read on stdin; `-d` returns at once, as the real one
//! does once it has daemonized.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlp_agent::alloc::runner::{spawn_alloc_runner, AllocHandle, RunnerEnv};
use mlp_agent::alloc::state::AllocRegistry;
use mlp_agent::driver::drivers_with;
use mlp_agent::gpu::mps::{dir_name, MpsManager};
use mlp_agent::gpu::GpuSettings;
use mlp_agent::isolation::IsolationSettings;
use mlp_proto::consts::{alloc_client, task_event};
use mlp_proto::v1::{
    AllocClientUpdate, AllocatedResources, Allocation, GpuAssignment, GpuDevice, GpuRequest, Job, Resources, Task, TaskConfig, TaskGroup,
};
use tokio::sync::mpsc;

mod shared;
use shared::Guard;
#[path = "../../tests/prereq/mod.rs"]
mod prereq;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const UUID: &str = "GPU-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

/// A temp dir (mode 0700) with the stand-in control binary (`<dir>/bin/nvidia-cuda-mps-control`),
/// its log (`<dir>/mps.log`) and the agent's data dir (`<dir>/data`).
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Result<Fixture, Box<dyn std::error::Error>> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        // Like `mktemp -d`: other users cannot search it (an MPS server started as a task's
        // user must still reach the pipe directory).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        std::fs::create_dir_all(dir.path().join("bin"))?;
        std::fs::create_dir_all(dir.path().join("data"))?;
        let log = dir.path().join("mps.log");
        let script = format!(
            "#!/bin/sh\n\
             if [ \"$1\" = \"-d\" ]; then\n\
             \x20 d=$CUDA_MPS_PIPE_DIRECTORY; shut=\n\
             \x20 while [ \"$d\" != / ]; do d=$(dirname \"$d\"); case $(stat -c %a \"$d\") in *[1357]) ;; *) shut=\"$shut $d\";; esac; done\n\
             \x20 echo \"start args=$* cvd=$CUDA_VISIBLE_DEVICES pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY unsearchable=$shut\" >> {log}\n\
             \x20 exit 0\n\
             fi\n\
             input=$(cat)\n\
             ends=$(cd {data}/allocs 2>/dev/null && ls */alloc/ 2>/dev/null | grep '^end-' | tr '\\n' ' ')\n\
             echo \"control args=$* cvd=$CUDA_VISIBLE_DEVICES pipe=$CUDA_MPS_PIPE_DIRECTORY stdin=$input ended=$ends\" >> {log}\n",
            log = log.display(),
            data = dir.path().join("data").display(),
        );
        let control = dir.path().join("bin").join("nvidia-cuda-mps-control");
        std::fs::write(&control, script)?;
        std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o755))?;
        Ok(Fixture { dir })
    }

    fn control(&self) -> PathBuf {
        self.dir.path().join("bin").join("nvidia-cuda-mps-control")
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("mps.log")).unwrap_or_default().lines().map(str::to_string).collect()
    }

    fn manager(&self, control: Option<PathBuf>) -> Arc<MpsManager> {
        Arc::new(MpsManager::new(&GpuSettings { mps_control: control, ..Default::default() }, &self.data()))
    }
}

/// Runs one allocation through the alloc runner and collects its updates; kills what it saw
/// running on drop.
struct Harness {
    handle: Option<AllocHandle>,
    rx: mpsc::UnboundedReceiver<AllocClientUpdate>,
    /// Kills what is left of the tasks seen running when the test ends.
    guard: Guard,
    last: Option<AllocClientUpdate>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(h) = &self.handle {
            h.abort();
        }
    }
}

impl Harness {
    fn start(f: &Fixture, a: Allocation, gpus: Vec<GpuDevice>, mps: Arc<MpsManager>) -> Harness {
        let env = RunnerEnv {
            alloc_root: f.data().join("allocs"),
            drivers: drivers_with(
                &["exec".to_string(), "raw_exec".to_string()],
                &IsolationSettings { supervisor_exe: Some(env!("CARGO_BIN_EXE_mlp-supervise-helper").into()), ..Default::default() },
            ),
            log_max_file_bytes: 1 << 20,
            log_max_files: 2,
            registry: AllocRegistry::default(),
            gpus,
            mps: Some(mps),
            network: None,
            node_address: "127.0.0.1".into(),
            node_id: String::new(),
            nvml: None,
            gpu_health: tokio::sync::watch::channel(Default::default()).1,
            artifacts: Default::default(),
            tracking: Default::default(),
            host_volumes: Default::default(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        Harness { handle: Some(spawn_alloc_runner(a, None, env, tx)), rx, guard: Guard::default(), last: None }
    }

    /// Waits for the runner to finish (every task ended and its MPS hold released); returns
    /// the last update.
    async fn finish(&mut self, secs: u64) -> Result<AllocClientUpdate, Box<dyn std::error::Error>> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while let Ok(Some(u)) = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), self.rx.recv()).await {
            for pid in u.task_states.values().map(|s| s.pid).filter(|&p| p > 0) {
                self.guard.add(pid);
            }
            self.last = Some(u);
        }
        let h = self.handle.take().ok_or("finished twice")?;
        tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), h.wait())
            .await
            .map_err(|_| format!("the runner did not finish in {secs}s; last update {:?}", self.last))?;
        self.last.clone().ok_or_else(|| "no update".into())
    }
}

fn device(id: &str, simulated: bool) -> GpuDevice {
    GpuDevice { id: id.into(), model: "A100".into(), memory_mib: 40_960, simulated, ..Default::default() }
}

/// A task that writes its environment to `<alloc>/env-<task>`, waits (up to 10 s) until every
/// task in `peers` has done so, and ends by writing `<alloc>/end-<task>` (which the stand-in
/// control lists when it is told to quit).
fn share_task(name: &str, driver: &str, peers: &[&str]) -> Task {
    let wait: String = peers.iter().map(|p| format!("[ -e \"$MLP_ALLOC_DIR/env-{p}\" ] && ")).collect();
    let script = format!(
        "env > \"$MLP_ALLOC_DIR/env-$MLP_TASK_NAME.tmp\" && mv \"$MLP_ALLOC_DIR/env-$MLP_TASK_NAME.tmp\" \"$MLP_ALLOC_DIR/env-$MLP_TASK_NAME\"\n\
         [ -d \"$CUDA_MPS_PIPE_DIRECTORY\" ] && echo visible > \"$MLP_ALLOC_DIR/pipe-$MLP_TASK_NAME\"\n\
         i=0; while [ $i -lt 200 ]; do {wait}break; sleep 0.05; i=$((i+1)); done\n\
         echo end > \"$MLP_ALLOC_DIR/end-$MLP_TASK_NAME\"\n"
    );
    Task {
        name: name.into(),
        driver: driver.into(),
        config: Some(TaskConfig { command: "/bin/sh".into(), args: vec!["-c".into(), script], ..Default::default() }),
        kill_timeout_ms: 500,
        resources: Some(Resources {
            cpu_mhz: 100,
            memory_mib: 64,
            gpu: Some(GpuRequest { count: Some(1), share_milli: 500, ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn alloc(id: &str, tasks: Vec<Task>, gpus: Vec<GpuAssignment>) -> Allocation {
    Allocation {
        id: id.into(),
        name: "j.g[0]".into(),
        task_group: "g".into(),
        desired_status: "run".into(),
        resources: Some(AllocatedResources { gpu_ids: gpus.iter().map(|g| g.id.clone()).collect(), gpus, ..Default::default() }),
        job: Some(Job {
            id: "j".into(),
            name: "j".into(),
            r#type: "batch".into(),
            groups: vec![TaskGroup { name: "g".into(), count: Some(1), tasks, ..Default::default() }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn half(id: &str) -> GpuAssignment {
    GpuAssignment { id: id.into(), milli: 500, memory_mib: 20_480 }
}

fn env_of(data: &Path, alloc_id: &str, task: &str) -> Result<BTreeMap<String, String>, Box<dyn std::error::Error>> {
    let path = data.join("allocs").join(alloc_id).join("alloc").join(format!("env-{task}"));
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect())
}

/// Two 0.5 shares of one real device: one daemon start for it, both tasks its clients with
/// their limits, one quit after both ended, its directories gone.
async fn two_shares_of_one_device(driver: &str) -> TestResult {
    let f = Fixture::new()?;
    let mps = f.manager(Some(f.control()));
    let tasks = vec![share_task("a", driver, &["a", "b"]), share_task("b", driver, &["a", "b"])];
    let id = &shared::alloc_id();
    let mut h = Harness::start(&f, alloc(id, tasks, vec![half(UUID), half(UUID)]), vec![device(UUID, false)], mps.clone());
    let last = h.finish(30).await?;
    assert_eq!(last.client_status, alloc_client::COMPLETE, "{last:?}");

    let pipe = mps.root().join(dir_name(UUID)).join("pipe");
    let mps_log = mps.root().join(dir_name(UUID)).join("log");
    for task in ["a", "b"] {
        let env = env_of(&f.data(), id, task)?;
        assert_eq!(env.get("CUDA_VISIBLE_DEVICES").map(String::as_str), Some(UUID), "{task}: {env:?}");
        assert_eq!(env.get("CUDA_MPS_PIPE_DIRECTORY"), Some(&pipe.display().to_string()), "{task}");
        assert_eq!(env.get("CUDA_MPS_LOG_DIRECTORY"), Some(&mps_log.display().to_string()), "{task}");
        assert_eq!(env.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE").map(String::as_str), Some("50"), "{task}");
        assert_eq!(env.get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT").map(String::as_str), Some("0=20480M"), "{task}");
        assert!(!env.contains_key("MLP_GPUS_SIMULATED"), "{task}");
        if driver == "exec" {
            assert_eq!(env.get("MLP_TASK_DIR").map(String::as_str), Some("/local"), "{task} ran in its own root");
        }
        // The pipe directory is where the task looks for it (inside an exec task's root too).
        let seen = f.data().join("allocs").join(id).join("alloc").join(format!("pipe-{task}"));
        assert!(seen.exists(), "{task} did not see its pipe directory {}", pipe.display());
    }
    let lines = f.log();
    let starts: Vec<&String> = lines.iter().filter(|l| l.starts_with("start ")).collect();
    assert_eq!(
        starts,
        [&format!("start args=-d cvd={UUID} pipe={} log={} unsearchable=", pipe.display(), mps_log.display())],
        "one daemon for the device, whose pipe directory an MPS server of any user reaches (the data dir is under a 0700 temp dir): {lines:#?}"
    );
    let quits: Vec<usize> = lines.iter().enumerate().filter(|(_, l)| l.starts_with("control ")).map(|(i, _)| i).collect();
    assert_eq!(quits.len(), 1, "one quit: {lines:#?}");
    // Quit after both tasks ended (their end files were there when it was sent).
    assert_eq!(lines[quits[0]], format!("control args= cvd={UUID} pipe={} stdin=quit ended=end-a end-b ", pipe.display()));
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(!pipe.parent().is_some_and(Path::exists), "the daemon's directories are removed");
    assert_eq!(mps.holders(UUID).await, None);
    Ok(())
}

#[tokio::test]
async fn two_shares_of_one_real_device_share_one_mps_daemon() -> TestResult {
    two_shares_of_one_device("raw_exec").await
}

/// The same with `exec` tasks, whose root gets the pipe directory bound at its host path.
#[tokio::test]
async fn exec_shares_see_the_pipe_directory_in_their_root() -> TestResult {
    assert!(prereq::require(&[prereq::Need::Root, prereq::Need::Cgroups]), "prerequisites missing");
    two_shares_of_one_device("exec").await
}

/// Without a control binary a share of a real device fails to start, saying why; nothing runs.
#[tokio::test]
async fn a_share_without_mps_control_fails_to_start() -> TestResult {
    let f = Fixture::new()?;
    let missing = f.dir.path().join("no-such").join("nvidia-cuda-mps-control");
    let id = &shared::alloc_id();
    let mut h = Harness::start(
        &f,
        alloc(id, vec![share_task("a", "raw_exec", &[])], vec![half(UUID)]),
        vec![device(UUID, false)],
        f.manager(Some(missing.clone())),
    );
    let last = h.finish(20).await?;
    assert_eq!(last.client_status, alloc_client::FAILED, "{last:?}");
    let st = last.task_states.get("a").ok_or("no state for a")?;
    let ev = st.events.iter().find(|e| e.r#type == task_event::DRIVER_FAILURE).ok_or_else(|| format!("no failure event: {st:?}"))?;
    assert!(ev.message.contains("needs MPS") && ev.message.contains(&missing.display().to_string()), "{}", ev.message);
    assert_eq!(st.started_at_ms, 0, "the task never ran");
    assert!(f.log().is_empty(), "{:?}", f.log());
    assert!(env_of(&f.data(), id, "a").is_err(), "the task never ran");
    Ok(())
}

/// Shares of simulated devices get the limits in their env (and MLP_GPUS_SIMULATED), no daemon.
#[tokio::test]
async fn simulated_shares_get_the_env_and_no_daemon() -> TestResult {
    let f = Fixture::new()?;
    let id = &shared::alloc_id();
    let a = alloc(id, vec![share_task("a", "raw_exec", &[])], vec![half("sim-gpu-0")]);
    let mut h = Harness::start(&f, a, vec![device("sim-gpu-0", true)], f.manager(Some(f.control())));
    let last = h.finish(20).await?;
    assert_eq!(last.client_status, alloc_client::COMPLETE, "{last:?}");
    let env = env_of(&f.data(), id, "a")?;
    assert_eq!(env.get("MLP_GPUS_SIMULATED").map(String::as_str), Some("1"));
    assert_eq!(env.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE").map(String::as_str), Some("50"));
    assert_eq!(env.get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT").map(String::as_str), Some("0=20480M"));
    assert!(!env.contains_key("CUDA_MPS_PIPE_DIRECTORY"), "{env:?}");
    assert!(f.log().is_empty(), "no MPS control invocation: {:?}", f.log());
    Ok(())
}

/// On agent start, a daemon the previous run left is stopped unless reattached share tasks use
/// it; a kept one is not started again by the next share task, and stops after it.
#[tokio::test]
async fn leftover_daemons_are_stopped_or_kept() -> TestResult {
    let f = Fixture::new()?;
    let mps = f.manager(Some(f.control()));
    let other = "GPU-11111111-2222-3333-4444-555555555555";
    for uuid in [UUID, other] {
        let dir = mps.root().join(dir_name(uuid));
        std::fs::create_dir_all(dir.join("pipe"))?;
        std::fs::write(dir.join("uuid"), format!("{uuid}\n"))?;
    }
    mps.recover(&[UUID.to_string()].into_iter().collect()).await;
    let other_pipe = mps.root().join(dir_name(other)).join("pipe");
    assert_eq!(f.log(), [format!("control args= cvd={other} pipe={} stdin=quit ended=", other_pipe.display())]);
    assert!(!mps.root().join(dir_name(other)).exists());
    assert_eq!(mps.holders(UUID).await, Some(0));
    // The reattached task holds it again without a start; its end stops it.
    let client = mps.acquire(UUID).await?;
    assert_eq!(f.log().len(), 1, "{:?}", f.log());
    mps.release(UUID).await;
    let lines = f.log();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[1], format!("control args= cvd={UUID} pipe={} stdin=quit ended=", client.pipe_dir.display()));
    assert!(!mps.root().join(dir_name(UUID)).exists());
    Ok(())
}

/// An `--mps-dir` below a directory other users cannot search is refused before any daemon
/// starts: the MPS server, started as the task's user, could not reach its pipe directory
/// (CUDA error 805 in the task, as seen on a real H100 with the data dir under `mktemp -d`).
#[tokio::test]
async fn an_mps_dir_other_users_cannot_reach_is_refused() -> TestResult {
    let f = Fixture::new()?;
    let settings = GpuSettings { mps_control: Some(f.control()), mps_dir: Some(f.dir.path().join("mps")), ..Default::default() };
    let mps = MpsManager::new(&settings, &f.data());
    let e = mps.acquire(UUID).await.err().ok_or("acquired a daemon whose pipe directory is unreachable")?;
    let text = e.to_string();
    assert!(text.contains(&f.dir.path().display().to_string()) && text.contains("not searchable"), "{text}");
    assert!(f.log().is_empty(), "no daemon started: {:?}", f.log());
    assert_eq!(mps.holders(UUID).await, None);
    Ok(())
}
