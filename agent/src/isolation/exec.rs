//! The `exec` driver: starts a task through the shim ([`super::init`]) in its own namespaces,
//! root filesystem and cgroup, and hands back a [`TaskHandle`] that waits for it, reports OOM
//! kills, reads its cgroup statistics and, when it ends, kills whatever is left in its cgroup
//! and removes the cgroup.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use mlp_proto::consts::driver as driver_names;
use nix::sys::signal::Signal;
use tokio::task::JoinHandle;

use super::{hostname_for, lookup_user, rootfs, InitConfig, IsolationSettings, User, INIT_ARG};
use crate::cgroups::{self, Layout, TaskCgroup};
use crate::driver::{pump, signal_group, Driver, DriverError, ExitStatus, TaskHandle, TaskSpec};

/// How long the shim may take to report that the task started.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The task's PATH when it sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The isolating `exec` driver.
#[derive(Debug)]
pub struct ExecDriver {
    settings: IsolationSettings,
    layout: Option<Layout>,
}

impl ExecDriver {
    /// A driver with these settings, on this machine's cgroup layout.
    pub fn new(settings: IsolationSettings) -> Self {
        let layout = cgroups::host_layout();
        match (&layout, settings.agent_pids_max) {
            (None, _) => {
                tracing::warn!("no usable cgroup hierarchy: exec tasks will fail to start")
            }
            (Some(layout), Some(max)) => {
                if let Err(e) = cgroups::set_parent_pids(layout, max) {
                    tracing::warn!(error = %e, "setting the agent-wide pids limit failed");
                }
            }
            (Some(_), None) => {}
        }
        ExecDriver { settings, layout }
    }

    fn user(&self, asked: &str) -> Result<User, DriverError> {
        let name = if asked.is_empty() {
            self.settings.default_user.as_str()
        } else {
            asked
        };
        let err = |reason: &str| DriverError::User {
            user: name.to_string(),
            reason: reason.to_string(),
        };
        let passwd = std::fs::read_to_string("/etc/passwd")
            .map_err(|e| err(&format!("reading /etc/passwd: {e}")))?;
        let user = lookup_user(&passwd, name).ok_or_else(|| err("no such user on this node"))?;
        if self
            .settings
            .refused_users
            .iter()
            .any(|r| *r == user.name || *r == user.uid.to_string())
        {
            return Err(err("refused by the agent's configuration"));
        }
        Ok(user)
    }
}

fn chown(path: &std::path::Path, user: &User) -> Result<(), DriverError> {
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(user.uid)),
        Some(nix::unistd::Gid::from_raw(user.gid)),
    )
    .map_err(|e| DriverError::Isolation(format!("chown {}: {e}", path.display())))
}

fn set_mode(path: &std::path::Path, mode: u32) -> Result<(), DriverError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| DriverError::Isolation(format!("chmod {}: {e}", path.display())))
}

/// The task's environment as it sees it: paths inside its root, a PATH, its identity.
fn task_env(spec: &TaskSpec, user: &User) -> BTreeMap<String, String> {
    let mut env = spec.env.clone();
    for (k, v) in [
        ("MLP_TASK_DIR", "/local"),
        ("MLP_ALLOC_DIR", "/alloc"),
        ("MLP_SECRETS_DIR", "/secrets"),
    ] {
        env.insert(k.to_string(), v.to_string());
    }
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.into());
    env.entry("HOME".into()).or_insert_with(|| "/local".into());
    env.entry("USER".into())
        .or_insert_with(|| user.name.clone());
    env.entry("HOSTNAME".into())
        .or_insert_with(|| spec.hostname.clone());
    env
}

#[async_trait]
impl Driver for ExecDriver {
    fn name(&self) -> &'static str {
        driver_names::EXEC
    }

    async fn start(&self, spec: &TaskSpec) -> Result<Box<dyn TaskHandle>, DriverError> {
        let user = self.user(&spec.user)?;
        let layout = self.layout.as_ref().ok_or_else(|| {
            DriverError::Isolation("no usable cgroup hierarchy on this node".into())
        })?;
        // The task's user owns its own directories; the shared alloc/ is sticky and writable
        // by all since the group's tasks may run as different users. Host users get no
        // further than the allocation directory (traverse only), so alloc/ is not theirs.
        chown(&spec.work_dir, &user)?;
        set_mode(&spec.work_dir, 0o700)?;
        set_mode(&spec.alloc_shared_dir, 0o1777)?;
        if let Some(alloc_dir) = spec.alloc_shared_dir.parent() {
            set_mode(alloc_dir, 0o711)?;
        }
        let root = spec.task_dir.join("root");
        std::fs::create_dir_all(&root)
            .map_err(|e| DriverError::Isolation(format!("creating {}: {e}", root.display())))?;

        let res = spec.resources.clone().unwrap_or_default();
        let limits =
            cgroups::limits_for(&res, self.settings.mhz_per_core, self.settings.default_pids);
        let cg_name = format!("{}.{}", spec.alloc_id, spec.name);
        let cgroup = {
            let layout = layout.clone();
            let limits = limits.clone();
            tokio::task::spawn_blocking(move || cgroups::create(&layout, &cg_name, &limits))
                .await
                .map_err(|e| DriverError::Isolation(format!("creating the task cgroup: {e}")))?
                .map_err(|e| DriverError::Isolation(format!("creating the task cgroup: {e}")))?
        };
        let mut guard = StartGuard {
            cgroup: Some(cgroup),
            child: None,
        };

        let hostname = if spec.hostname.is_empty() {
            hostname_for(&spec.name, 0, &spec.alloc_id)
        } else {
            spec.hostname.clone()
        };
        let dirs = rootfs::TaskDirs {
            local: spec.work_dir.clone(),
            alloc: spec.alloc_shared_dir.clone(),
        };
        let config = InitConfig {
            root: root.clone(),
            steps: rootfs::plan(
                rootfs::probe_host,
                &dirs,
                &user,
                &hostname,
                &self.settings.extra_ro_paths,
            ),
            hostname,
            network_none: spec.network_mode == "none",
            user: user.clone(),
            command: spec.command.clone(),
            args: spec.args.clone(),
            env: task_env(spec, &user),
            work_dir: PathBuf::from("/local"),
            cgroup_procs: guard
                .cgroup
                .as_ref()
                .map(|c| c.procs_files())
                .unwrap_or_default(),
        };
        let config_path = spec.task_dir.join("init.json");
        let json = serde_json::to_vec_pretty(&config)
            .map_err(|e| DriverError::Isolation(format!("encoding the init config: {e}")))?;
        std::fs::write(&config_path, json)
            .and_then(|_| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o600))
            })
            .map_err(|e| {
                DriverError::Isolation(format!("writing {}: {e}", config_path.display()))
            })?;

        let (out_w, err_w) = crate::driver::open_log_writers(spec)?;

        let exe = std::env::current_exe()
            .map_err(|e| DriverError::Isolation(format!("finding the mlp binary: {e}")))?;
        let (status_r, status_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| DriverError::Isolation(format!("pipe: {e}")))?;
        let status_w_raw = status_w.as_raw_fd();
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg(INIT_ARG)
            .arg(&config_path)
            .env_clear()
            .current_dir(&spec.task_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        // SAFETY: runs in the forked child before exec and only calls setsid(2) and dup2(2),
        // which are async-signal-safe; dup2 onto fd 3 clears close-on-exec for the shim.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() == -1 || libc::dup2(status_w_raw, 3) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| DriverError::Spawn {
            command: exe.display().to_string(),
            source,
        })?;
        drop(status_w);
        let pid = child.id().unwrap_or(0);
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            pumps.push(pump(out, out_w));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(pump(err, err_w));
        }
        guard.child = Some(pid);
        let read = tokio::task::spawn_blocking(move || {
            let mut text = String::new();
            let _ = std::fs::File::from(status_r).read_to_string(&mut text);
            text
        });
        let started = match tokio::time::timeout(START_TIMEOUT, read).await {
            Ok(Ok(text)) => text,
            Ok(Err(e)) => format!("err reading the start status: {e}"),
            Err(_) => format!("err the task did not start within {START_TIMEOUT:?}"),
        };
        if started.trim() != "ok" {
            let message = started
                .trim()
                .strip_prefix("err ")
                .unwrap_or("the task's init exited without a status")
                .to_string();
            let _ = signal_group(pid, Signal::SIGKILL);
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            tracing::warn!(task = %spec.name, error = %message, "isolated task failed to start");
            return Err(DriverError::Isolation(message));
        }
        guard.child = None;
        let cgroup = guard.cgroup.take();
        tracing::debug!(task = %spec.name, pid, user = %user.name, "isolated task started");
        Ok(Box::new(IsolatedHandle {
            child,
            pid,
            pumps,
            exit: None,
            cgroup,
            memory_limit_mib: limits.memory_bytes.map(|b| b / (1024 * 1024)),
            config_path,
            root,
            cleanup: None,
        }))
    }
}

/// Undoes a start that failed half-way: the shim's group and the cgroup go away.
struct StartGuard {
    cgroup: Option<Box<dyn TaskCgroup>>,
    child: Option<u32>,
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.child {
            let _ = signal_group(pid, Signal::SIGKILL);
        }
        if let Some(cg) = self.cgroup.take() {
            if let Err(e) = cgroups::kill_and_remove(cg.as_ref()) {
                tracing::warn!(error = %e, "removing the cgroup of a task that failed to start");
            }
        }
    }
}

/// A task started by [`ExecDriver`]; `pid` is the shim's, the leader of the task's group.
struct IsolatedHandle {
    child: tokio::process::Child,
    pid: u32,
    pumps: Vec<JoinHandle<()>>,
    exit: Option<ExitStatus>,
    cgroup: Option<Box<dyn TaskCgroup>>,
    memory_limit_mib: Option<u64>,
    config_path: PathBuf,
    root: PathBuf,
    cleanup: Option<JoinHandle<Result<(), cgroups::CgroupError>>>,
}

#[async_trait]
impl TaskHandle for IsolatedHandle {
    fn pid(&self) -> u32 {
        self.pid
    }

    async fn wait(&mut self) -> ExitStatus {
        if self.exit.is_none() {
            // Only `child.wait()` may be cancelled (it is cancel-safe); everything up to
            // `self.exit = ...` runs without an await, so the OOM check is never lost.
            let mut status = crate::driver::wait_and_reap_group(&mut self.child, self.pid).await;
            if let Some(cg) = self.cgroup.take() {
                if !status.success() && cg.stats().oom_kills > 0 {
                    status.oom_limit_mib = self.memory_limit_mib;
                }
                // Nothing of the task may outlive it: whatever escaped the process group is
                // still in the cgroup.
                self.cleanup = Some(tokio::task::spawn_blocking(move || {
                    cgroups::kill_and_remove(cg.as_ref())
                }));
            }
            let _ = std::fs::remove_file(&self.config_path);
            self.exit = Some(status);
        }
        if let Some(cleanup) = self.cleanup.as_mut() {
            match cleanup.await {
                Ok(Err(e)) => {
                    tracing::warn!(pid = self.pid, error = %e, "removing the task cgroup failed")
                }
                Err(e) => {
                    tracing::warn!(pid = self.pid, error = %e, "removing the task cgroup failed")
                }
                Ok(Ok(())) => {}
            }
            self.cleanup = None;
            // The root's mounts died with the task's mount namespace; the directory is empty.
            let _ = std::fs::remove_dir(&self.root);
        }
        crate::driver::drain_pumps(&mut self.pumps).await;
        self.exit.unwrap_or_default()
    }

    fn signal(&self, sig: Signal) -> Result<(), DriverError> {
        if self.exit.is_some() {
            return Ok(());
        }
        signal_group(self.pid, sig)
    }

    fn stats(&self) -> Option<cgroups::Stats> {
        self.cgroup.as_ref().map(|c| c.stats())
    }
}
