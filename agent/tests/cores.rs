//! `cores = N` with real cgroups: two `exec` tasks asking for one core each are pinned to
//! different CPUs, a task that asks for more than is free fails to start with a clear error, a
//! restarted agent (a new driver reattaching to the running tasks) keeps their CPUs taken, and
//! the CPUs are free again once the tasks end. Needs root, a cgroup hierarchy and two CPUs the
//! agent may use; fails naming what is missing (`tests/prereq`).

use std::collections::BTreeMap;
use std::path::Path;

use mlp_agent::driver::exec::ExecDriver;
use mlp_agent::driver::supervised::load_record;
use mlp_agent::driver::{Driver, DriverError, TaskHandle, TaskSpec};
use mlp_agent::isolation::cgroups::{self, Layout};
use mlp_agent::isolation::IsolationSettings;
use mlp_proto::v1::Resources;
use nix::sys::signal::Signal;

#[path = "../../tests/prereq/mod.rs"]
mod prereq;
mod shared;
use shared::Cleanup;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn driver() -> ExecDriver {
    ExecDriver::new(IsolationSettings { supervisor_exe: Some(env!("CARGO_BIN_EXE_mlp-supervise-helper").into()), ..Default::default() })
}

fn spec(dir: &Path, alloc_id: &str, task: &str, cores: u32) -> TaskSpec {
    let task_dir = dir.join(alloc_id).join(task);
    let local = task_dir.join("local");
    let logs = task_dir.join("logs");
    let shared = dir.join(alloc_id).join("alloc");
    for d in [&local, &logs, &shared] {
        let _ = std::fs::create_dir_all(d);
    }
    TaskSpec {
        name: task.into(),
        command: "/bin/sleep".into(),
        args: vec!["60".into()],
        env: BTreeMap::new(),
        work_dir: local,
        log_dir: logs,
        log_max_file_bytes: 1 << 20,
        log_max_files: 2,
        resources: Some(Resources { cores, memory_mib: 64, ..Default::default() }),
        alloc_id: alloc_id.into(),
        task_dir,
        alloc_shared_dir: shared,
        ..Default::default()
    }
}

/// The `cpuset.cpus` of a task's cgroup, as the kernel has it.
fn cpus_of(layout: &Layout, s: &TaskSpec) -> Vec<u32> {
    cgroups::pinned_cpus(layout, &format!("{}.{}", s.alloc_id, s.name))
}

async fn stop(h: &mut Box<dyn TaskHandle>) -> TestResult {
    h.signal(Signal::SIGKILL)?;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(20), h.wait()).await?;
    Ok(())
}

#[tokio::test]
async fn cores_are_pinned_per_task_and_survive_an_agent_restart() -> TestResult {
    if !prereq::require(&[prereq::Need::Root, prereq::Need::Cgroups]) {
        return Ok(());
    }
    let layout = cgroups::host_layout().ok_or("this test cannot run: no cgroup layout the agent can use")?;
    let first = driver();
    let pool = first.cores().pool().to_vec();
    assert!(pool.len() >= 2, "this test cannot run: it needs 2 CPUs the agent may pin tasks to, the cpuset allows {pool:?}");
    let dir = tempfile::tempdir()?;
    let id = |k: &str| format!("cores-{k}-{}", std::process::id());
    let (a, b) = (spec(dir.path(), &id("a"), "t", 1), spec(dir.path(), &id("b"), "t", 1));
    let mut cleanup = Cleanup::new(layout.clone());

    let mut ha = first.start(&a).await?;
    cleanup.add(ha.pid(), format!("{}.t", a.alloc_id));
    let hb = first.start(&b).await?;
    cleanup.add(hb.pid(), format!("{}.t", b.alloc_id));
    let (ca, cb) = (cpus_of(&layout, &a), cpus_of(&layout, &b));
    assert_eq!(ca.len(), 1, "{ca:?}");
    assert_eq!(cb.len(), 1, "{cb:?}");
    assert_ne!(ca, cb, "two cores = 1 tasks share a CPU");
    assert!(pool.contains(&ca[0]) && pool.contains(&cb[0]));

    // More than is left: refused before anything starts.
    let c = spec(dir.path(), &id("c"), "t", u32::try_from(pool.len() - 1)?);
    match first.start(&c).await {
        Ok(mut h) => {
            cleanup.add(h.pid(), format!("{}.t", c.alloc_id));
            stop(&mut h).await?;
            return Err("a task got cores that were taken".into());
        }
        Err(e) => {
            assert!(matches!(e, DriverError::Cores(_)), "{e}");
            assert!(e.to_string().contains("CPUs are free"), "{e}");
        }
    }
    assert!(!c.task_dir.join("run.json").exists());

    // The agent restarts: its handles are gone, the tasks run on, and a new driver learns
    // from their cgroups which CPUs they hold.
    drop(hb);
    let second = driver();
    let record = load_record(&b.task_dir)?.ok_or("no run record")?;
    let mut hb = second.reattach(&b.task_dir, &record)?;
    assert_eq!(second.cores().taken().get(&record.cgroup), Some(&cb));
    let d = spec(dir.path(), &id("d"), "t", 1);
    let mut hd = second.start(&d).await?;
    cleanup.add(hd.pid(), format!("{}.t", d.alloc_id));
    let cd = cpus_of(&layout, &d);
    assert_eq!(cd.len(), 1);
    assert_ne!(cd, cb, "a new task got the CPU of a reattached one");

    // Ended tasks free their CPUs.
    stop(&mut hb).await?;
    stop(&mut hd).await?;
    stop(&mut ha).await?;
    assert!(second.cores().taken().is_empty(), "{:?}", second.cores().taken());
    assert!(first.cores().taken().values().all(|c| *c != ca), "{:?}", first.cores().taken());
    // Every run is retired (nothing reattaches to it).
    for s in [&a, &b, &d] {
        assert_eq!(load_record(&s.task_dir)?, None, "run of {} not retired", s.task_dir.display());
    }
    Ok(())
}
