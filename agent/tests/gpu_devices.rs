//! A task sees exactly the GPUs it was given (issue 12 §3), with real `exec` tasks and stand-in
//! device nodes: a temporary device directory holds character nodes with NVIDIA's major number
//! (195; with no NVIDIA driver loaded, opening one that the cgroup allows fails with ENXIO,
//! one that it denies with EPERM). A task given GPU 1 finds `/dev/nvidia1`, its MIG capability
//! node and the control nodes, and none of the other GPUs; its cgroup refuses the other GPUs
//! even where the node is reachable (made by the task itself, or opened on the host by a
//! process that joined the task's cgroup); a task without GPUs has no NVIDIA node at all.
//! Needs root, a cgroup hierarchy with the devices controller (or cgroup v2), and a temporary
//! directory on a file system that allows device nodes; fails naming what is missing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mlp_agent::driver::exec::ExecDriver;
use mlp_agent::driver::{Driver, TaskHandle, TaskSpec};
use mlp_agent::gpu::{gpu_env, GpuSettings, TaskGpus};
use mlp_agent::isolation::cgroups::{self, Layout};
use mlp_agent::isolation::IsolationSettings;
use mlp_agent::task::logs::LogReader;
use mlp_proto::v1::{GpuAssignment, GpuDevice};
use nix::sys::signal::Signal;

#[path = "../../tests/prereq/mod.rs"]
mod prereq;
mod shared;
use shared::Cleanup;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const NVIDIA_MAJOR: u64 = 195;

/// Fails the test when the machine cannot show what it checks.
fn require_device_isolation(layout: &Option<Layout>, dev_dir: &Path) {
    let mut missing = Vec::new();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let v1_devices = mountinfo.lines().any(|l| {
        l.split_once(" - ").is_some_and(|(_, post)| {
            let f: Vec<&str> = post.split_whitespace().collect();
            f.first() == Some(&"cgroup") && f.get(2).is_some_and(|o| o.split(',').any(|c| c == "devices"))
        })
    });
    match layout {
        Some(Layout::V1 { .. }) if !v1_devices => {
            missing.push("the cgroup v1 devices controller (mount it: `mount -t cgroup -o devices none /sys/fs/cgroup/devices`)")
        }
        None => missing.push("a usable cgroup hierarchy"),
        _ => {}
    }
    if nix::sys::statvfs::statvfs(dev_dir).is_ok_and(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_NODEV)) {
        missing.push("a temporary directory on a file system mounted without `nodev` (set TMPDIR to one)");
    }
    assert!(missing.is_empty(), "this test cannot run: missing\n  - {}", missing.join("\n  - "));
}

fn mknod(path: &Path, minor: u64) -> Result<(), nix::Error> {
    use nix::sys::stat::{makedev, Mode, SFlag};
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    nix::sys::stat::mknod(path, SFlag::S_IFCHR, Mode::from_bits_truncate(0o666), makedev(NVIDIA_MAJOR, minor))?;
    // mknod honours the umask.
    nix::sys::stat::fchmodat(None, path, Mode::from_bits_truncate(0o666), nix::sys::stat::FchmodatFlags::FollowSymlink)
}

fn spec(dir: &Path, alloc_id: &str, script: &str, gpus: TaskGpus) -> TaskSpec {
    let task_dir = dir.join(alloc_id).join("t");
    let local = task_dir.join("local");
    let logs = task_dir.join("logs");
    let shared = dir.join(alloc_id).join("alloc");
    for d in [&local, &logs, &shared] {
        let _ = std::fs::create_dir_all(d);
    }
    let env: BTreeMap<String, String> = gpu_env(&gpus).into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    TaskSpec {
        name: "t".into(),
        command: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        env,
        work_dir: local,
        log_dir: logs,
        log_max_file_bytes: 1 << 20,
        log_max_files: 2,
        alloc_id: alloc_id.into(),
        task_dir,
        alloc_shared_dir: shared,
        user: "root".into(),
        gpus,
        ..Default::default()
    }
}

fn stdout(s: &TaskSpec) -> String {
    LogReader::new(&s.log_dir, "t.stdout", 0, 0)
        .and_then(|mut r| r.read_to_end())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

async fn output_until_done(s: &TaskSpec) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = stdout(s);
        if out.contains("done\n") {
            return Ok(out);
        }
        if Instant::now() > deadline {
            return Err(format!("the task did not finish its checks; its output so far:\n{out}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The line of `out` that starts with `key `.
fn line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines().find(|l| l.starts_with(&format!("{key} "))).unwrap_or("")
}

async fn stop(h: &mut Box<dyn TaskHandle>) -> TestResult {
    h.signal(Signal::SIGKILL)?;
    tokio::time::timeout(Duration::from_secs(20), h.wait()).await?;
    Ok(())
}

/// Prints `<node> absent`, or `<node> <the shell's error, or ok>` for opening it (read-only: a
/// root shell's `<>` would create a missing node as a file).
const OPEN_EACH: &str = r#"for n in $NODES; do if [ -e "$n" ]; then printf '%s %s\n' "$n" "$( (exec 3<"$n") 2>&1 && echo ok)"; else echo "$n absent"; fi; done"#;

#[tokio::test]
async fn a_task_sees_exactly_the_gpus_it_was_given() -> TestResult {
    if !prereq::require(&[prereq::Need::Root, prereq::Need::Cgroups]) {
        return Ok(());
    }
    let layout = cgroups::host_layout();
    let dir = tempfile::tempdir()?;
    let dev_dir = dir.path().join("dev");
    std::fs::create_dir_all(&dev_dir)?;
    require_device_isolation(&layout, &dev_dir);
    let layout = layout.ok_or("no cgroup layout")?;
    for i in 0..4 {
        mknod(&dev_dir.join(format!("nvidia{i}")), i)?;
    }
    mknod(&dev_dir.join("nvidiactl"), 255)?;
    mknod(&dev_dir.join("nvidia-uvm"), 254)?;
    mknod(&dev_dir.join("nvidia-caps/nvidia-cap21"), 21)?;
    mknod(&dev_dir.join("nvidia-caps/nvidia-cap22"), 22)?;

    let driver = ExecDriver::with_gpu(
        IsolationSettings {
            supervisor_exe: Some(env!("CARGO_BIN_EXE_mlp-supervise-helper").into()),
            // Root in the task keeps CAP_MKNOD: the cgroup, not a missing capability, must stop it.
            refused_users: Vec::new(),
            ..Default::default()
        },
        GpuSettings { dev_dir: dev_dir.clone(), ..Default::default() },
    );
    let node_path = |n: &str| dev_dir.join(n).to_string_lossy().into_owned();
    let gpu1 = GpuDevice {
        id: "MIG-11111111-2222-3333-4444-555555555555".into(),
        index: 1,
        device_paths: vec![node_path("nvidia1"), node_path("nvidia-caps/nvidia-cap21")],
        ..Default::default()
    };
    let gpus = TaskGpus {
        devices: vec![GpuAssignment { id: gpu1.id.clone(), milli: 1000, memory_mib: 0 }],
        simulated: false,
        node_devices: vec![gpu1.clone()],
    };
    let script = format!(
        "NODES='/dev/nvidia1 /dev/nvidia-caps/nvidia-cap21 /dev/nvidiactl /dev/nvidia-uvm /dev/nvidia0 /dev/nvidia2 \
         /dev/nvidia3 /dev/nvidia-caps/nvidia-cap22 /dev/null'; {OPEN_EACH}
         echo \"mknod-own $(mknod /tmp/own c 195 1 2>&1 && echo ok)\"
         echo \"mknod-other $(mknod /tmp/other c 195 2 2>&1 && echo ok)\"
         echo \"env $CUDA_VISIBLE_DEVICES $MLP_GPU_INDEX\"
         echo \"ls $(ls /dev | tr '\\n' ' ')\"
         echo done; exec sleep 60"
    );
    let a = spec(dir.path(), "gpu-a1", &script, gpus);
    let mut cleanup = Cleanup::new(layout.clone());
    let mut h = driver.start(&a).await?;
    cleanup.add(h.pid(), "gpu-a1.t".into());
    let out = output_until_done(&a).await?;

    // Its GPU, MIG capability and control nodes: there and allowed (no driver: ENXIO).
    for n in ["/dev/nvidia1", "/dev/nvidia-caps/nvidia-cap21", "/dev/nvidiactl", "/dev/nvidia-uvm"] {
        assert!(line(&out, n).contains("No such device or address"), "{n} should be there and allowed:\n{out}");
    }
    // The other GPUs are not in its root.
    for n in ["/dev/nvidia0", "/dev/nvidia2", "/dev/nvidia3", "/dev/nvidia-caps/nvidia-cap22"] {
        assert_eq!(line(&out, n), format!("{n} absent"), "{n} should be absent:\n{out}");
    }
    assert!(line(&out, "/dev/null").ends_with(" ok"), "/dev/null must stay usable:\n{out}");
    // A node the task makes: its own GPU's numbers pass the cgroup, another GPU's do not.
    assert!(line(&out, "mknod-own").ends_with(" ok"), "{out}");
    assert!(line(&out, "mknod-other").contains("Operation not permitted"), "{out}");
    assert_eq!(line(&out, "env"), format!("env {} 1", gpu1.id), "{out}");
    let ls = line(&out, "ls");
    for absent in ["nvidia0", "nvidia2", "nvidia3", "nvidia-modeset", "nvidia-uvm-tools"] {
        assert!(!ls.split_whitespace().any(|n| n == absent), "{absent} in the task's /dev: {ls}");
    }

    // The host's node of another GPU, opened by a process in the task's cgroup: EPERM.
    let proc_cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", h.pid()))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let procs = mlp_agent::rpc::exec_session::cgroup_procs_from(&proc_cgroup, &mountinfo);
    assert!(!procs.is_empty(), "the task's cgroup was not found in {proc_cgroup}");
    let join = procs.iter().map(|p| format!("echo $$ > {}", p.display())).collect::<Vec<_>>().join("; ");
    let host_script = format!("{join}; NODES='{} {}'; {OPEN_EACH}", node_path("nvidia1"), node_path("nvidia2"));
    let host = std::process::Command::new("/bin/sh").args(["-c", &host_script]).output()?;
    let host_out = String::from_utf8_lossy(&host.stdout).into_owned() + &String::from_utf8_lossy(&host.stderr);
    assert!(line(&host_out, &node_path("nvidia1")).contains("No such device or address"), "{host_out}");
    assert!(line(&host_out, &node_path("nvidia2")).contains("Operation not permitted"), "{host_out}");
    stop(&mut h).await?;

    // A task without GPUs: no NVIDIA node at all, the standard ones still work.
    let b = spec(
        dir.path(),
        "gpu-b1",
        &format!("NODES='/dev/null /dev/zero /dev/urandom'; {OPEN_EACH}; echo \"ls $(ls /dev | tr '\\n' ' ')\"; echo done"),
        TaskGpus::default(),
    );
    let mut h = driver.start(&b).await?;
    cleanup.add(h.pid(), "gpu-b1.t".into());
    let out = output_until_done(&b).await?;
    assert!(!line(&out, "ls").contains("nvidia"), "{out}");
    for n in ["/dev/null", "/dev/zero", "/dev/urandom"] {
        assert!(line(&out, n).ends_with(" ok"), "{n}:\n{out}");
    }
    tokio::time::timeout(Duration::from_secs(20), h.wait()).await?;
    Ok(())
}

/// cgroup v2's devices controller (a BPF program on the task's cgroup), for real, in a cgroup2
/// hierarchy: the one this machine has (unified or hybrid), or one mounted for the test.
#[test]
fn v2_device_filter_allows_only_its_list() -> TestResult {
    if !prereq::require(&[prereq::Need::Root]) {
        return Ok(());
    }
    use mlp_agent::isolation::cgroups::v2::V2Cgroup;
    use mlp_agent::isolation::cgroups::Limits;
    use mlp_agent::isolation::devices::{allow_list, standard_nodes};

    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let existing = mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mount_point = pre.split_whitespace().nth(4)?;
        post.starts_with("cgroup2 ").then(|| PathBuf::from(mount_point))
    });
    let mounted = tempfile::tempdir()?;
    let root = match existing {
        Some(r) => r,
        None => {
            let st = std::process::Command::new("mount").args(["-t", "cgroup2", "none"]).arg(mounted.path()).status()?;
            assert!(st.success(), "this test cannot run: missing a cgroup2 hierarchy (none mounted, and `mount -t cgroup2` failed)");
            mounted.path().to_path_buf()
        }
    };
    struct Unmount(Option<PathBuf>);
    impl Drop for Unmount {
        fn drop(&mut self) {
            if let Some(p) = &self.0 {
                let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
    let _unmount = Unmount((root == mounted.path()).then(|| root.clone()));
    let dir = root.join(format!("mlp-devtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cg = V2Cgroup::at(&root, &dir);
    struct Remove<'a>(&'a V2Cgroup);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            let _ = cgroups::kill_and_remove(self.0);
        }
    }
    let _remove = Remove(&cg);
    // /dev/null allowed (from the host's numbers, like every task), /dev/zero not.
    let rules: Vec<_> = allow_list(&[(1, 3)], &[]);
    assert!(standard_nodes().contains(&(1, 5)), "/dev/zero is 1:5 here");
    // The devices part of `V2Cgroup::apply` (this hierarchy may have no other controller).
    cgroups::devices::apply(&dir, &root, true, &Limits { devices: Some(rules), ..Default::default() })?;
    let script = format!("echo $$ > {}; {OPEN_EACH}", dir.join("cgroup.procs").display());
    let out = std::process::Command::new("/bin/sh").env("NODES", "/dev/null /dev/zero").args(["-c", &script]).output()?;
    let out = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(line(&out, "/dev/null").ends_with(" ok"), "{out}");
    assert!(line(&out, "/dev/zero").contains("Operation not permitted"), "{out}");
    Ok(())
}
