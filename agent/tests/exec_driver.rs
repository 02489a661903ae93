//! The `exec` driver's start when its cgroup cannot be created: the cgroup is created while the
//! supervisor starts, and the supervisor waits for the agent's word before it starts the task's
//! init, so a failed creation fails the start with the cgroup's error and leaves no process, no
//! task root mount and no cgroup behind.

use std::collections::BTreeMap;
use std::path::Path;

use mlp_agent::driver::exec::ExecDriver;
use mlp_agent::driver::{Driver, TaskSpec};
use mlp_agent::isolation::IsolationSettings;

#[path = "../../tests/prereq/mod.rs"]
mod prereq;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Processes whose command line mentions `needle` (the supervisor's config path).
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            out.push(pid);
        }
    }
    out
}

fn spec(dir: &Path, alloc_id: String) -> TaskSpec {
    let task_dir = dir.join("t");
    let local = task_dir.join("local");
    let logs = dir.join("alloc").join("logs");
    let _ = std::fs::create_dir_all(&local);
    let _ = std::fs::create_dir_all(&logs);
    TaskSpec {
        name: "t".into(),
        command: "/bin/true".into(),
        env: BTreeMap::new(),
        work_dir: local,
        log_dir: logs,
        log_max_file_bytes: 1 << 20,
        log_max_files: 2,
        alloc_id,
        task_dir,
        alloc_shared_dir: dir.join("alloc"),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_cgroup_that_cannot_be_created_fails_the_start_and_leaves_nothing() -> TestResult {
    if !prereq::require(&[prereq::Need::Root, prereq::Need::Cgroups]) {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let driver = ExecDriver::new(IsolationSettings {
        supervisor_exe: Some(env!("CARGO_BIN_EXE_mlp-supervise-helper").into()),
        ..Default::default()
    });
    // Task `procs` of allocation `cgroup` would live in `mlp/cgroup.procs`, which is the
    // parent's file, so the cgroup cannot be made (both names pass the agent's path checks).
    let mut s = spec(dir.path(), "cgroup".into());
    s.name = "procs".into();
    let err = match driver.start(&s).await {
        Ok(mut h) => {
            h.signal(nix::sys::signal::Signal::SIGKILL)?;
            let _ = h.wait().await;
            return Err("the task started without its cgroup".into());
        }
        Err(e) => e.to_string(),
    };
    assert!(err.contains("creating the task cgroup"), "{err}");
    let config = s.task_dir.join("supervise.json");
    assert!(processes_mentioning(&config.to_string_lossy()).is_empty(), "a supervisor is left");
    assert!(!s.task_dir.join("run.json").exists(), "a run was recorded");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    assert!(!mountinfo.contains(&*dir.path().to_string_lossy()), "a mount is left under the task dir");
    Ok(())
}
