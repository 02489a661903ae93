//! MPS (CUDA Multi-Process Service): how GPU shares of real devices are enforced.
//!
//! A task with a share (`milli` < 1000) of one real device (not simulated, not a MIG instance)
//! runs as a client of an MPS control daemon that the agent starts for that device, with
//! `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` (its SMs) and `CUDA_MPS_PINNED_DEVICE_MEM_LIMIT` (its
//! device memory) set from its assignment ([`super::gpu_env`]). The [`MpsManager`] counts the
//! sharing tasks per device UUID: the first one starts the daemon (`nvidia-cuda-mps-control
//! -d`), the last one to end stops it (`quit` on the control's stdin) and removes its
//! directories, `<mps root>/<uuid>/{pipe,log}`.
//!
//! The MPS root is `/run/mlp/mps/<hash of the data dir>` unless `--mps-dir` names one, and
//! every directory above a pipe directory must be searchable by everyone: the control daemon
//! starts each MPS server as the user of the client that asked for it (`nobody`, by default,
//! for `exec` tasks), and a server that cannot reach the pipe directory exits at once, so the
//! client fails with CUDA error 805. Seen on an H100 machine with the data dir under a
//! `mktemp -d` (mode 0700) directory; NVIDIA's device plugin keeps its MPS root under
//! `/run/nvidia/mps` for the same reason.
//!
//! A share task whose device cannot get a daemon (no `nvidia-cuda-mps-control` found, or it
//! failed) fails to start with the reason: a share never runs unenforced. On agent start,
//! [`MpsManager::recover`] stops the daemons a previous agent run left for devices without
//! reattached share tasks and keeps the others.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::{GpuSettings, TaskGpus};

/// The control binary's name.
pub const CONTROL: &str = "nvidia-cuda-mps-control";
/// How long `-d` (start) and `quit` (stop) may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// The file in a device's directory that names its UUID (directory names are sanitised).
const UUID_FILE: &str = "uuid";

/// Why a share task's device got no MPS daemon.
#[derive(Debug, thiserror::Error)]
pub enum MpsError {
    /// No control binary.
    #[error("GPU share of {uuid} needs MPS, but {CONTROL} was not found ({searched}); configure it with --mps-control")]
    NotFound {
        /// The device.
        uuid: String,
        /// Where the agent looked.
        searched: String,
    },
    /// The daemon's directories could not be made.
    #[error("MPS for {uuid}: {what} {}: {source}", .path.display())]
    Io {
        /// The device.
        uuid: String,
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `<control> -d` failed.
    #[error(
        "MPS for {uuid}: {} (mode {mode:o}) is not searchable by other users, so an MPS server started as a task's user cannot reach its pipe directory; choose another --mps-dir",
        .path.display()
    )]
    Unreachable {
        /// The device.
        uuid: String,
        /// The directory above the pipe directory that others cannot search.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    #[error("starting the MPS control daemon for {uuid} ({} -d) failed: {reason}", .control.display())]
    Start {
        /// The device.
        uuid: String,
        /// The control binary.
        control: PathBuf,
        /// Exit status and stderr, or the spawn error.
        reason: String,
    },
}

/// What a task needs to be a client of its device's daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpsClient {
    /// `CUDA_MPS_PIPE_DIRECTORY` (bound read-write into `exec` task roots at the same path).
    pub pipe_dir: PathBuf,
    /// `CUDA_MPS_LOG_DIRECTORY`.
    pub log_dir: PathBuf,
}

impl MpsClient {
    /// The environment variables that make a CUDA process a client of this daemon.
    pub fn env(&self) -> [(&'static str, String); 2] {
        [
            ("CUDA_MPS_PIPE_DIRECTORY", self.pipe_dir.to_string_lossy().into_owned()),
            ("CUDA_MPS_LOG_DIRECTORY", self.log_dir.to_string_lossy().into_owned()),
        ]
    }
}

/// The device of `gpus` that must be shared through MPS: a share (milli < 1000) of exactly one
/// real device. MIG instances are assigned whole (1000) and simulated devices enforce nothing.
pub fn shared_device(gpus: &TaskGpus) -> Option<&str> {
    match gpus.devices.as_slice() {
        [one] if one.milli < super::WHOLE_MILLI && gpus.real() => Some(one.id.as_str()),
        _ => None,
    }
}

/// A directory name for a device UUID: ASCII letters, digits, `-`, `_` and `.` kept (a UUID is
/// `GPU-<hex>-…`), anything else `_`, at most 128 bytes, never `.`/`..`/empty. Ids come from
/// the servers: nothing in them reaches a path unchecked.
pub fn dir_name(uuid: &str) -> String {
    let mut s: String =
        uuid.chars().take(128).map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' }).collect();
    if s.is_empty() || s.chars().all(|c| c == '.') {
        s = s.replace('.', "_");
        s.push('_');
    }
    s
}

/// Finds the control binary: `settings.mps_control`, else `<driver_root>/bin/` and
/// `<driver_root>/usr/bin/`, else `PATH`. Err says where it looked.
pub fn find_control(settings: &GpuSettings) -> Result<PathBuf, String> {
    if let Some(p) = &settings.mps_control {
        return if p.is_file() { Ok(p.clone()) } else { Err(format!("--mps-control {} does not exist", p.display())) };
    }
    let mut searched = Vec::new();
    if let Some(root) = &settings.driver_root {
        for dir in [root.join("bin"), root.join("usr").join("bin")] {
            let p = dir.join(CONTROL);
            if p.is_file() {
                return Ok(p);
            }
            searched.push(dir.display().to_string());
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(CONTROL);
        if p.is_file() {
            return Ok(p);
        }
    }
    searched.push("PATH".to_string());
    Err(format!("looked in {}", searched.join(", ")))
}

/// Where the MPS directories of the agent with `data_dir` live by default:
/// `/run/mlp/mps/<first 16 hex digits of the SHA-256 of the data dir's path>` (one per agent,
/// stable across its restarts, so that reattached share tasks find their daemon again).
pub fn default_root(data_dir: &Path) -> PathBuf {
    use sha2::Digest;
    use std::os::unix::ffi::OsStrExt;
    let digest = sha2::Sha256::digest(data_dir.as_os_str().as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    PathBuf::from(DEFAULT_PARENT).join(hex)
}

/// The parent of the default MPS roots (created searchable by everyone).
pub const DEFAULT_PARENT: &str = "/run/mlp/mps";

/// The first directory above `dir` (from `/` down) that other users cannot search, with its
/// permission bits; None when every one can be.
pub fn unsearchable_ancestor(dir: &Path) -> Option<(PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut ancestors: Vec<&Path> = dir.ancestors().skip(1).collect();
    ancestors.reverse();
    ancestors.into_iter().find_map(|a| {
        let mode = std::fs::metadata(a).ok()?.permissions().mode() & 0o7777;
        (mode & 0o001 == 0).then(|| (a.to_path_buf(), mode))
    })
}

/// The MPS daemons of this agent, one per shared real device, counted by sharing task.
pub struct MpsManager {
    /// `--mps-dir`, else [`default_root`].
    root: PathBuf,
    settings: GpuSettings,
    /// Devices with a running daemon → sharing tasks that hold it. Held across the control
    /// commands, so starts and stops of one agent never interleave.
    devices: Mutex<BTreeMap<String, usize>>,
}

impl MpsManager {
    /// A manager keeping its daemons' directories under `settings.mps_dir`, else
    /// [`default_root`] of `data_dir`.
    pub fn new(settings: &GpuSettings, data_dir: &Path) -> MpsManager {
        let root = settings.mps_dir.clone().unwrap_or_else(|| default_root(data_dir));
        MpsManager { root, settings: settings.clone(), devices: Mutex::new(BTreeMap::new()) }
    }

    /// The directory holding one directory per device with a daemon.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directories of `uuid`'s daemon.
    pub fn client(&self, uuid: &str) -> MpsClient {
        let dir = self.root.join(dir_name(uuid));
        MpsClient { pipe_dir: dir.join("pipe"), log_dir: dir.join("log") }
    }

    /// Sharing tasks holding `uuid`'s daemon (0 = none running, or kept from a previous run).
    pub async fn holders(&self, uuid: &str) -> Option<usize> {
        self.devices.lock().await.get(uuid).copied()
    }

    /// Makes a sharing task of `uuid` a holder of its daemon, starting the daemon for the
    /// first one.
    pub async fn acquire(&self, uuid: &str) -> Result<MpsClient, MpsError> {
        let mut devices = self.devices.lock().await;
        let client = self.client(uuid);
        if let Some(n) = devices.get_mut(uuid) {
            *n += 1;
            return Ok(client);
        }
        let control = find_control(&self.settings).map_err(|searched| MpsError::NotFound { uuid: uuid.to_string(), searched })?;
        self.start(uuid, &control, &client).await?;
        devices.insert(uuid.to_string(), 1);
        tracing::info!(uuid, pipe_dir = %client.pipe_dir.display(), "MPS control daemon started");
        Ok(client)
    }

    /// Ends one holder of `uuid`'s daemon; the last one stops it and removes its directories.
    pub async fn release(&self, uuid: &str) {
        let mut devices = self.devices.lock().await;
        let Some(n) = devices.get_mut(uuid) else {
            tracing::warn!(uuid, "MPS release of a device without a daemon");
            return;
        };
        *n = n.saturating_sub(1);
        if *n > 0 {
            return;
        }
        devices.remove(uuid);
        self.stop(uuid, &self.client(uuid)).await;
    }

    /// On agent start: the daemons a previous run left (directories under the MPS root)
    /// are kept for the devices in `in_use` (reattached share tasks, which will
    /// [`acquire`](Self::acquire) them again) and stopped for the others.
    pub async fn recover(&self, in_use: &BTreeSet<String>) {
        let Ok(rd) = std::fs::read_dir(&self.root) else { return };
        let mut devices = self.devices.lock().await;
        for entry in rd.flatten() {
            let dir = entry.path();
            let Ok(uuid) = std::fs::read_to_string(dir.join(UUID_FILE)) else {
                tracing::warn!(dir = %dir.display(), "MPS directory without a device id; removed");
                remove_dir(&dir);
                continue;
            };
            let uuid = uuid.trim().to_string();
            if self.root.join(dir_name(&uuid)) != dir {
                tracing::warn!(dir = %dir.display(), uuid, "MPS directory does not match its device id; removed");
                remove_dir(&dir);
                continue;
            }
            if in_use.contains(&uuid) {
                tracing::info!(uuid, "MPS control daemon of the previous agent run kept for its reattached tasks");
                devices.insert(uuid, 0);
            } else {
                tracing::info!(uuid, "stopping an MPS control daemon the previous agent run left");
                self.stop(&uuid, &self.client(&uuid)).await;
            }
        }
    }

    async fn start(&self, uuid: &str, control: &Path, client: &MpsClient) -> Result<(), MpsError> {
        let io = |what, path: &Path| {
            let (uuid, path) = (uuid.to_string(), path.to_path_buf());
            move |source| MpsError::Io { uuid, what, path, source }
        };
        for dir in [&self.root, &client.pipe_dir, &client.log_dir] {
            std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
            set_mode(dir, 0o755).map_err(io("chmod", dir))?;
        }
        // The default root's parents are this program's own (`/run/mlp/mps`): made searchable.
        if self.root.starts_with(DEFAULT_PARENT) {
            for dir in Path::new(DEFAULT_PARENT).ancestors().take_while(|d| d.starts_with("/run/mlp")) {
                set_mode(dir, 0o755).map_err(io("chmod", dir))?;
            }
        }
        if let Some((path, mode)) = unsearchable_ancestor(&client.pipe_dir) {
            return Err(MpsError::Unreachable { uuid: uuid.to_string(), path, mode });
        }
        if let Some(dev_dir) = client.pipe_dir.parent() {
            set_mode(dev_dir, 0o755).map_err(io("chmod", dev_dir))?;
            let id_file = dev_dir.join(UUID_FILE);
            std::fs::write(&id_file, format!("{uuid}\n")).map_err(io("writing", &id_file))?;
        }
        let fail = |reason: String| MpsError::Start { uuid: uuid.to_string(), control: control.to_path_buf(), reason };
        let child = self
            .command(control, uuid, client)
            .arg("-d")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(e.to_string()))?;
        let out = match tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output()).await {
            Ok(r) => r.map_err(|e| fail(e.to_string()))?,
            // kill_on_drop: the timed-out child is gone with its future.
            Err(_) => return Err(fail(format!("did not return within {}s", COMMAND_TIMEOUT.as_secs()))),
        };
        if !out.status.success() {
            if let Some(dev_dir) = client.pipe_dir.parent() {
                remove_dir(dev_dir);
            }
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(fail(format!("{}: {}", out.status, stderr.trim())));
        }
        Ok(())
    }

    /// `quit` through the daemon's pipe directory, then its directories removed. Failures are
    /// logged: a daemon that will not quit is left (and named in the log).
    async fn stop(&self, uuid: &str, client: &MpsClient) {
        match find_control(&self.settings) {
            Ok(control) => {
                if let Err(e) = self.quit(&control, uuid, client).await {
                    tracing::warn!(uuid, control = %control.display(), error = %e, "stopping the MPS control daemon failed");
                } else {
                    tracing::info!(uuid, "MPS control daemon stopped");
                }
            }
            Err(searched) => tracing::warn!(uuid, searched, "cannot stop the MPS control daemon: {CONTROL} not found"),
        }
        if let Some(dev_dir) = client.pipe_dir.parent() {
            remove_dir(dev_dir);
        }
        // The root goes with its last device (fails, and stays, while another one is there).
        let _ = std::fs::remove_dir(&self.root);
    }

    async fn quit(&self, control: &Path, uuid: &str, client: &MpsClient) -> Result<(), String> {
        let mut child = self
            .command(control, uuid, client)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let talk = async {
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(b"quit\n").await.map_err(|e| format!("writing quit: {e}"))?;
                stdin.shutdown().await.map_err(|e| format!("closing stdin: {e}"))?;
            }
            child.wait_with_output().await.map_err(|e| e.to_string())
        };
        let out = tokio::time::timeout(COMMAND_TIMEOUT, talk)
            .await
            .map_err(|_| format!("quit did not return within {}s", COMMAND_TIMEOUT.as_secs()))??;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    fn command(&self, control: &Path, uuid: &str, client: &MpsClient) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(control);
        cmd.env("CUDA_VISIBLE_DEVICES", uuid).envs(client.env()).kill_on_drop(true);
        cmd
    }
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "removing an MPS directory failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlp_proto::v1::{GpuAssignment, GpuDevice};

    #[test]
    fn default_roots_are_per_data_dir_and_stable() {
        let a = default_root(Path::new("/var/lib/mlp/agent"));
        assert!(a.starts_with(DEFAULT_PARENT), "{}", a.display());
        assert_eq!(a.file_name().map(|n| n.len()), Some(16));
        assert_eq!(a, default_root(Path::new("/var/lib/mlp/agent")));
        assert_ne!(a, default_root(Path::new("/var/lib/mlp/agent2")));
    }

    #[test]
    fn an_unsearchable_directory_above_is_found() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let deep = dir.path().join("a").join("b");
        std::fs::create_dir_all(&deep)?;
        set_mode(dir.path(), 0o700)?;
        assert_eq!(unsearchable_ancestor(&deep), Some((dir.path().to_path_buf(), 0o700)));
        set_mode(dir.path(), 0o711)?;
        set_mode(&dir.path().join("a"), 0o750)?;
        assert_eq!(unsearchable_ancestor(&deep), Some((dir.path().join("a"), 0o750)));
        set_mode(&dir.path().join("a"), 0o755)?;
        // The temp dir's own parents (/tmp is 1777) are searchable.
        assert_eq!(unsearchable_ancestor(&deep), None);
        Ok(())
    }

    #[test]
    fn dir_names_are_plain() {
        assert_eq!(dir_name("GPU-8f3c2a1e-0b1d-4c5e-9f00-123456789abc"), "GPU-8f3c2a1e-0b1d-4c5e-9f00-123456789abc");
        assert_eq!(dir_name("../../etc"), ".._.._etc");
        assert_eq!(dir_name(".."), "___");
        assert_eq!(dir_name(""), "_");
        assert_eq!(dir_name("a/b c"), "a_b_c");
        assert_eq!(dir_name(&"x".repeat(300)).len(), 128);
    }

    #[test]
    fn only_a_share_of_one_real_device_needs_mps() {
        let asg = |id: &str, milli| GpuAssignment { id: id.into(), milli, memory_mib: 0 };
        // The node's own records of the devices (a real one unless the task's are simulated).
        let gpus = |devices: Vec<GpuAssignment>, simulated| {
            let node_devices = devices.iter().map(|a| GpuDevice { id: a.id.clone(), simulated, ..Default::default() }).collect();
            TaskGpus { devices, simulated, node_devices }
        };
        assert_eq!(shared_device(&gpus(vec![asg("GPU-a", 500)], false)), Some("GPU-a"));
        // An id this node does not know is no real device of it: no daemon for it.
        let unknown = TaskGpus { devices: vec![asg("GPU-x", 500)], simulated: false, node_devices: Vec::new() };
        assert_eq!(shared_device(&unknown), None);
        assert_eq!(shared_device(&gpus(vec![asg("GPU-a", 500)], true)), None);
        assert_eq!(shared_device(&gpus(vec![asg("GPU-a", 1000)], false)), None);
        assert_eq!(shared_device(&gpus(vec![asg("MIG-a", 1000)], false)), None);
        assert_eq!(shared_device(&gpus(vec![asg("GPU-a", 500), asg("GPU-b", 500)], false)), None);
        assert_eq!(shared_device(&gpus(Vec::new(), false)), None);
    }

    #[test]
    fn a_missing_control_binary_is_reported() {
        let settings = GpuSettings { mps_control: Some("/nonexistent/mps-control".into()), ..Default::default() };
        assert!(find_control(&settings).is_err_and(|e| e.contains("/nonexistent/mps-control")));
        let settings = GpuSettings { driver_root: Some("/nonexistent-root".into()), ..Default::default() };
        // PATH may have one on a GPU host; where it does not, the driver root is named.
        if let Err(e) = find_control(&settings) {
            assert!(e.contains("/nonexistent-root/bin"), "{e}");
        }
    }
}
