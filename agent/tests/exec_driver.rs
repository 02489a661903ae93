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

/// Host volumes (issue 15 §4): the exec driver binds each at its destination in the task's
/// root, read-only when the mount says so (a write fails with EROFS) and read-write otherwise.
#[tokio::test]
async fn host_volumes_are_bound_at_their_destinations_read_only_or_read_write() -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    if !prereq::require(&[prereq::Need::Root, prereq::Need::Cgroups]) {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    // The task runs as nobody: the volumes' own directories must let it in.
    let ro = dir.path().join("datasets");
    let rw = dir.path().join("scratch");
    std::fs::create_dir_all(&ro)?;
    std::fs::create_dir_all(&rw)?;
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&rw, std::fs::Permissions::from_mode(0o777))?;
    std::fs::write(ro.join("hello.txt"), "hello from the host\n")?;
    std::fs::set_permissions(ro.join("hello.txt"), std::fs::Permissions::from_mode(0o644))?;
    // A world-writable directory: only the read-only mount stops the write.
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o777))?;
    let driver = ExecDriver::new(IsolationSettings {
        supervisor_exe: Some(env!("CARGO_BIN_EXE_mlp-supervise-helper").into()),
        ..Default::default()
    });
    let mut s = spec(dir.path(), "hostvol-exec".into());
    s.command = "/bin/sh".into();
    s.args = vec![
        "-c".into(),
        "cat /data/in/hello.txt > /local/read; (echo no > /data/in/new) 2> /local/ro_err; echo $? > /local/ro_rc; echo yes > /scratch/out"
            .into(),
    ];
    let bind = |label: &str, host: &Path, dest: &str, read_only: bool| mlp_agent::volumes::VolumeBind {
        label: label.into(),
        source: label.into(),
        host_path: host.to_path_buf(),
        destination: dest.into(),
        read_only,
    };
    s.volumes = vec![bind("data", &ro, "/data/in", true), bind("scratch", &rw, "/scratch", false)];
    let mut h = driver.start(&s).await?;
    let status = tokio::time::timeout(std::time::Duration::from_secs(30), h.wait()).await?;
    assert_eq!(status.code, Some(0), "{status}");
    let local = &s.work_dir;
    assert_eq!(std::fs::read_to_string(local.join("read"))?, "hello from the host\n");
    assert_ne!(std::fs::read_to_string(local.join("ro_rc"))?.trim(), "0", "the write to the read-only volume succeeded");
    let err = std::fs::read_to_string(local.join("ro_err"))?;
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(!ro.join("new").exists(), "the read-only volume was written");
    assert_eq!(std::fs::read_to_string(rw.join("out"))?, "yes\n", "the read-write volume was not written");
    // A host directory gone since the task was placed fails the start with the volume's name.
    let mut s = spec(dir.path(), "hostvol-gone".into());
    s.volumes = vec![bind("data", &dir.path().join("gone"), "/data", true)];
    let err = match driver.start(&s).await {
        Ok(mut h) => {
            let _ = h.wait().await;
            return Err("a task started with a missing host volume".into());
        }
        Err(e) => e.to_string(),
    };
    assert!(err.contains("host volume \"data\"") && err.contains("is not a directory on this node"), "{err}");
    // A destination inside a directory the root binds from the host is refused before anything
    // is made there.
    let mut s = spec(dir.path(), "hostvol-usr".into());
    s.volumes = vec![bind("data", &ro, "/usr/share/mlp-volume", true)];
    let err = match driver.start(&s).await {
        Ok(mut h) => {
            let _ = h.wait().await;
            return Err("a task started with a volume under /usr".into());
        }
        Err(e) => e.to_string(),
    };
    assert!(err.contains("destination /usr/share/mlp-volume is at or under /usr"), "{err}");
    assert!(!Path::new("/usr/share/mlp-volume").exists());
    Ok(())
}
