//! The `exec` driver: starts a task through its supervisor ([`super::supervised`]; the
//! supervisor process forks the namespace's init, [`crate::isolation::init`]) in its own
//! namespaces, root filesystem and cgroup, and hands back a [`TaskHandle`] that waits for it, reports OOM kills, reads its cgroup
//! statistics and, when it ends, kills whatever is left in its cgroup and removes the cgroup.
//! The same handle is rebuilt for a task a previous agent run started ([`Driver::reattach`]).
//!
//! Devices: every task's cgroup denies all device nodes but those its root has (the standard
//! nodes, pseudo-terminals); a task with real GPUs also gets its GPUs' nodes, the driver's
//! control nodes and the driver's user-space files ([`rootfs::GpuRoot`]), and only those GPU
//! nodes are allowed (`crate::isolation::devices`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use mlp_proto::consts::driver as driver_names;
use nix::sys::signal::Signal;
use tokio::task::JoinHandle;

use super::supervised::{self, Supervised, TaskKind, TaskRecord};
use super::{Driver, DriverError, ExitStatus, TaskHandle, TaskSpec};
use crate::gpu::driver_files::{self, DriverFiles};
use crate::gpu::GpuSettings;
use crate::isolation::cgroups::cpuset::CoreAllocator;
use crate::isolation::cgroups::{self, Layout, TaskCgroup};
use crate::isolation::phases::mono_ns;
use crate::isolation::{devices, hostname_for, lookup_user, rootfs, InitConfig, IsolationSettings, User};

/// The task's PATH when it sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What an `oci` task runs instead of the host-derived root and its `command`: the image's
/// overlay, and the process the image and the job's overrides make.
#[derive(Debug, Clone)]
pub struct ImageRoot {
    /// The overlay mounted as the task's root.
    pub overlay: rootfs::Overlay,
    /// argv (the resolved entrypoint and command).
    pub argv: Vec<String>,
    /// The image's environment (`KEY=value`), under the task's own.
    pub env: BTreeMap<String, String>,
    /// Working directory inside the image.
    pub work_dir: PathBuf,
    /// The user resolved against the image's `/etc/passwd`; None = the agent's default.
    pub user: Option<User>,
}

/// The isolating `exec` driver.
#[derive(Debug)]
pub struct ExecDriver {
    settings: IsolationSettings,
    /// Where the host's NVIDIA device nodes and driver files are.
    gpu: GpuSettings,
    layout: Option<Layout>,
    /// The CPUs pinned to `cores = N` tasks, shared with their handles (which free them).
    cores: Arc<CoreAllocator>,
}

impl ExecDriver {
    /// A driver with these settings, on this machine's cgroup layout, with the default GPU
    /// settings.
    pub fn new(settings: IsolationSettings) -> Self {
        Self::with_gpu(settings, GpuSettings::default())
    }

    /// A driver with these settings that exposes real GPUs as `gpu` says.
    pub fn with_gpu(settings: IsolationSettings, gpu: GpuSettings) -> Self {
        // On a GPU host, find the driver's files now rather than on the first GPU task's start.
        if gpu.mode != crate::gpu::GpuMode::None && gpu.dev_dir.join("nvidiactl").exists() {
            let gpu = gpu.clone();
            std::thread::spawn(move || driver_files::discover(&gpu));
        }
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
        let pool = layout.as_ref().map(cgroups::cpu_pool).unwrap_or_default();
        ExecDriver { settings, gpu, layout, cores: Arc::new(CoreAllocator::new(pool)) }
    }

    /// The CPUs this driver pins `cores = N` tasks to, and which task holds which.
    pub fn cores(&self) -> &CoreAllocator {
        &self.cores
    }

    /// What a task with real GPUs gets in its root (nothing for any other task), and the
    /// driver's files it was built from.
    async fn gpu_root(&self, spec: &TaskSpec) -> (rootfs::GpuRoot, Option<&'static DriverFiles>) {
        if !spec.gpus.real() {
            return (rootfs::GpuRoot::default(), None);
        }
        let nodes = devices::gpu_node_binds(&self.gpu.dev_dir, &spec.gpus.device_paths(), |p| p.exists());
        let gpu = self.gpu.clone();
        let files = match tokio::task::spawn_blocking(move || driver_files::discover(&gpu)).await {
            Ok(files) => Some(files),
            Err(e) => {
                tracing::debug!(error = %e, "finding the NVIDIA driver files failed");
                None
            }
        };
        (rootfs::GpuRoot { nodes, files: files.map(|f| f.files.clone()).unwrap_or_default() }, files)
    }

    /// The task's directories (owned by its user) and the steps that build its root.
    fn prepare(
        &self,
        spec: &TaskSpec,
        user: &User,
        root: &Path,
        hostname: &str,
        gpu: &rootfs::GpuRoot,
        image: Option<&ImageRoot>,
    ) -> Result<Vec<rootfs::Step>, DriverError> {
        // The task's user owns its own directories; the shared alloc/ is sticky and writable
        // by all since the group's tasks may run as different users. Host users get no
        // further than the allocation directory (traverse only), so alloc/ is not theirs.
        chown(&spec.work_dir, user)?;
        set_mode(&spec.work_dir, 0o700)?;
        set_mode(&spec.alloc_shared_dir, 0o1777)?;
        if let Some(alloc_dir) = spec.alloc_shared_dir.parent() {
            set_mode(alloc_dir, 0o711)?;
        }
        std::fs::create_dir_all(root).map_err(|e| DriverError::Isolation(format!("creating {}: {e}", root.display())))?;
        let dirs = rootfs::TaskDirs { local: spec.work_dir.clone(), alloc: spec.alloc_shared_dir.clone() };
        let mut steps = match image {
            Some(image) => {
                for dir in [&image.overlay.upper, &image.overlay.work] {
                    std::fs::create_dir_all(dir).map_err(|e| DriverError::Isolation(format!("creating {}: {e}", dir.display())))?;
                }
                rootfs::plan_image(rootfs::probe_host, &dirs, user, hostname, gpu)
            }
            None => {
                rootfs::plan(rootfs::probe_host, &dirs, user, hostname, &self.settings.extra_ro_paths, &self.settings.hidden_paths, gpu)
            }
        };
        // After the root's own mounts, like `extra_ro`: the task's read-write host directories.
        for dir in &spec.rw_paths {
            if !dir.is_absolute() || !dir.is_dir() {
                return Err(DriverError::Isolation(format!("{}: not an absolute directory to bind into the task", dir.display())));
            }
            steps.push(rootfs::Step::Bind { src: dir.clone(), path: dir.clone(), readonly: false, device: false });
        }
        // Host volumes last, at their destinations (read-only: a bind remounted read-only). A
        // destination at or under a path the root binds or links from the host is refused: the
        // mount point would be made through that path, on the host's filesystem.
        let from_host: Vec<PathBuf> = steps
            .iter()
            .filter_map(|s| match s {
                rootfs::Step::Bind { path, .. } | rootfs::Step::Symlink { path, .. } | rootfs::Step::Mask { path, .. } => {
                    Some(path.clone())
                }
                _ => None,
            })
            .collect();
        for v in &spec.volumes {
            if let Some(p) = from_host.iter().find(|p| v.destination.starts_with(p)) {
                return Err(DriverError::Isolation(format!(
                    "volume {:?}: destination {} is at or under {}, which the task's root takes from the host; pick another path",
                    v.label,
                    v.destination.display(),
                    p.display()
                )));
            }
            if !v.host_path.is_dir() {
                return Err(DriverError::Isolation(format!(
                    "host volume {:?} (volume {:?}): {} is not a directory on this node",
                    v.source,
                    v.label,
                    v.host_path.display()
                )));
            }
            steps.push(rootfs::Step::Bind { src: v.host_path.clone(), path: v.destination.clone(), readonly: v.read_only, device: false });
        }
        if let Some(net) = &spec.network {
            rootfs::use_network_files(&mut steps, &net.hosts, &net.resolv_conf);
        }
        Ok(steps)
    }

    /// Checks a user an image names against the agent's refused users.
    fn allowed(&self, user: User) -> Result<User, DriverError> {
        if self.settings.refused_users.iter().any(|r| *r == user.name || *r == user.uid.to_string()) {
            return Err(DriverError::User { user: user.name, reason: "refused by the agent's configuration".into() });
        }
        Ok(user)
    }

    fn user(&self, asked: &str) -> Result<User, DriverError> {
        let name = if asked.is_empty() { self.settings.default_user.as_str() } else { asked };
        let err = |reason: &str| DriverError::User { user: name.to_string(), reason: reason.to_string() };
        let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| err(&format!("reading /etc/passwd: {e}")))?;
        let user = lookup_user(&passwd, name).ok_or_else(|| err("no such user on this node"))?;
        if self.settings.refused_users.iter().any(|r| *r == user.name || *r == user.uid.to_string()) {
            return Err(err("refused by the agent's configuration"));
        }
        Ok(user)
    }
}

fn chown(path: &std::path::Path, user: &User) -> Result<(), DriverError> {
    nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(user.uid)), Some(nix::unistd::Gid::from_raw(user.gid)))
        .map_err(|e| DriverError::Isolation(format!("chown {}: {e}", path.display())))
}

fn set_mode(path: &std::path::Path, mode: u32) -> Result<(), DriverError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| DriverError::Isolation(format!("chmod {}: {e}", path.display())))
}

/// The task's environment as it sees it: paths inside its root, a PATH, its identity, and the
/// driver's directories the loader and PATH do not know (`files`, for a task with real GPUs).
fn task_env(spec: &TaskSpec, user: &User, files: Option<&DriverFiles>) -> BTreeMap<String, String> {
    let mut env = spec.env.clone();
    for (k, v) in [("MLP_TASK_DIR", "/local"), ("MLP_ALLOC_DIR", "/alloc"), ("MLP_SECRETS_DIR", "/secrets")] {
        env.insert(k.to_string(), v.to_string());
    }
    env.entry("PATH".into()).or_insert_with(|| DEFAULT_PATH.into());
    env.entry("HOME".into()).or_insert_with(|| "/local".into());
    env.entry("USER".into()).or_insert_with(|| user.name.clone());
    env.entry("HOSTNAME".into()).or_insert_with(|| spec.hostname.clone());
    if let Some(files) = files {
        let join = |dirs: &[PathBuf]| dirs.iter().map(|d| d.to_string_lossy().into_owned()).collect::<Vec<_>>().join(":");
        if !files.lib_dirs.is_empty() {
            // First: the libraries must be the ones of the host's kernel driver.
            let mut value = join(&files.lib_dirs);
            if let Some(own) = env.get("LD_LIBRARY_PATH").filter(|v| !v.is_empty()) {
                value = format!("{value}:{own}");
            }
            env.insert("LD_LIBRARY_PATH".into(), value);
        }
        if !files.bin_dirs.is_empty() {
            let path = env.get("PATH").cloned().unwrap_or_default();
            env.insert("PATH".into(), format!("{path}:{}", join(&files.bin_dirs)));
        }
    }
    env
}

#[async_trait]
impl Driver for ExecDriver {
    fn name(&self) -> &'static str {
        driver_names::EXEC
    }

    async fn start(&self, spec: &TaskSpec) -> Result<Box<dyn TaskHandle>, DriverError> {
        self.start_in(spec, None).await
    }

    fn reattach(&self, task_dir: &Path, record: &TaskRecord) -> Result<Box<dyn TaskHandle>, DriverError> {
        self.reattach_task(task_dir, record)
    }
}

impl ExecDriver {
    /// Starts a task in the host-derived root, or in an image's root (`image`, the `oci`
    /// driver's).
    pub async fn start_in(&self, spec: &TaskSpec, image: Option<ImageRoot>) -> Result<Box<dyn TaskHandle>, DriverError> {
        // Both name the task's cgroup, `mlp/<alloc>.<task>`, and its log files.
        crate::paths::check_alloc_id(&spec.alloc_id)?;
        crate::paths::check_task_name(&spec.name)?;
        let mut phases = spec.phases.clone().or_start();
        let user = match image.as_ref().and_then(|i| i.user.clone()) {
            Some(u) if spec.user.is_empty() => self.allowed(u)?,
            _ => self.user(&spec.user)?,
        };
        phases.mark("user");
        let layout = self.layout.as_ref().ok_or_else(|| DriverError::Isolation("no usable cgroup hierarchy on this node".into()))?;
        // The cgroup (directories and limit files, in each v1 hierarchy) is created on a
        // blocking thread while this one prepares the task and starts its supervisor, which
        // waits for `ready` on a pipe before it starts the init that joins the cgroup.
        let res = spec.resources.clone().unwrap_or_default();
        let mut limits = cgroups::limits_for(&res, self.settings.mhz_per_core, self.settings.default_pids);
        // The only device nodes the task may open: those its root has.
        let (gpu_root, driver_files) = self.gpu_root(spec).await;
        let gpu_numbers: Vec<(u32, u32)> = gpu_root.nodes.iter().filter_map(|(host, _)| devices::char_dev(host)).collect();
        limits.devices = Some(devices::allow_list(devices::standard_nodes(), &gpu_numbers));
        let cg_name = format!("{}.{}", spec.alloc_id, spec.name);
        // CPUs of its own (the servers only counted them); freed again unless the task starts.
        let mut hold = match limits.cores {
            Some(n) => {
                limits.cpus = self.cores.take(&cg_name, n)?;
                Some(CoreHold { cores: &self.cores, task: cg_name.clone(), keep: false })
            }
            None => None,
        };
        let cgroup_procs = cgroups::procs_files_for(layout, &cg_name, &limits)
            .map_err(|e| DriverError::Isolation(format!("creating the task cgroup: {e}")))?;
        phases.mark("cgroup_paths");
        let (ready_r, ready_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| DriverError::Isolation(format!("pipe: {e}")))?;
        let creating = {
            let layout = layout.clone();
            let limits = limits.clone();
            let cg_name = cg_name.clone();
            tokio::task::spawn_blocking(move || {
                let began = mono_ns();
                let created = cgroups::create(&layout, &cg_name, &limits);
                if created.is_ok() {
                    use std::io::Write;
                    // With when the creation ran, for the start's phases.
                    let ready = format!("ready cgroup_creating={began} cgroup_created={}", mono_ns());
                    let _ = std::fs::File::from(ready_w).write_all(ready.as_bytes());
                }
                created
            })
        };
        let started = async {
            let root = spec.task_dir.join("root");
            let hostname = if spec.hostname.is_empty() { hostname_for(&spec.name, 0, &spec.alloc_id) } else { spec.hostname.clone() };
            let steps = self.prepare(spec, &user, &root, &hostname, &gpu_root, image.as_ref())?;
            let mut config = InitConfig {
                root,
                steps,
                hostname,
                network_none: spec.network_mode == "none" && spec.network.is_none(),
                netns: spec.network.as_ref().map(|n| n.netns.clone()),
                user: user.clone(),
                command: spec.command.clone(),
                args: spec.args.clone(),
                env: task_env(spec, &user, driver_files),
                work_dir: PathBuf::from("/local"),
                cgroup_procs,
                overlay: None,
            };
            if let Some(image) = &image {
                let (command, args) =
                    image.argv.split_first().ok_or_else(|| DriverError::Isolation("the image gives no command".into()))?;
                config.command = command.clone();
                config.args = args.to_vec();
                // The image's variables lie under the task's; the driver's defaults (PATH, HOME,
                // USER, HOSTNAME) only fill what neither sets.
                let mut env = image.env.clone();
                for (k, v) in std::mem::take(&mut config.env) {
                    let default_only = matches!(k.as_str(), "PATH" | "HOME" | "USER" | "HOSTNAME") && !spec.env.contains_key(&k);
                    if default_only {
                        env.entry(k).or_insert(v);
                    } else {
                        env.insert(k, v);
                    }
                }
                config.env = env;
                config.work_dir = image.work_dir.clone();
                config.overlay = Some(image.overlay.clone());
            }
            let exe = supervised::supervisor_exe(self.settings.supervisor_exe.as_deref())?;
            let memory_limit_mib = limits.memory_bytes.map(|b| b / (1024 * 1024));
            let mut phases = phases;
            phases.mark("root_planned");
            // The record names the driver that reattaches the task after an agent restart.
            let driver_name = if image.is_some() { driver_names::OCI } else { driver_names::EXEC };
            let sup = supervised::start(
                &exe,
                driver_name,
                spec,
                TaskKind::Isolated(Box::new(config)),
                cg_name.clone(),
                memory_limit_mib,
                supervised::StartWith { phases, ready: Some(ready_r) },
            )
            .await?;
            Ok::<_, DriverError>(sup)
        };
        let (created, started) = tokio::join!(creating, started);
        let created = created
            .map_err(|e| DriverError::Isolation(format!("creating the task cgroup: {e}")))
            .and_then(|c| c.map_err(|e| DriverError::Isolation(format!("creating the task cgroup: {e}"))));
        // Whatever happens next, the cgroup goes away unless the task runs in it. (A failed
        // creation never wrote `ready`, so the supervisor failed that start.)
        let mut guard = StartGuard { cgroup: Some(created?) };
        let sup = started?;
        let cgroup = guard.cgroup.take();
        if let Some(hold) = hold.as_mut() {
            hold.keep = true;
        }
        tracing::debug!(task = %spec.name, pid = sup.record.pid, user = %user.name, "isolated task started");
        Ok(Box::new(IsolatedHandle {
            sup,
            cgroup,
            cg_name,
            layout: layout.clone(),
            cleanup: None,
            reattached: false,
            cores: self.cores.clone(),
        }))
    }

    /// Reattaches a task a previous agent run started (both roots).
    pub fn reattach_task(&self, task_dir: &Path, record: &TaskRecord) -> Result<Box<dyn TaskHandle>, DriverError> {
        let err = |reason: String| DriverError::Reattach { dir: task_dir.to_path_buf(), reason };
        let layout = self.layout.as_ref().ok_or_else(|| err("no usable cgroup hierarchy on this node".into()))?;
        let cgroup = match cgroups::open_existing(layout, &record.cgroup) {
            Ok(cg) => Some(cg),
            Err(e) => {
                tracing::warn!(dir = %task_dir.display(), error = %e, "the reattached task's cgroup is gone");
                None
            }
        };
        let sup = match supervised::reattach(task_dir, record) {
            Ok(sup) => sup,
            Err(e) => {
                cgroups::remove_leftover(layout, &record.cgroup);
                return Err(err(e.to_string()));
            }
        };
        // The task keeps the CPUs its cgroup pins it to, and no new task gets them.
        let cpus = cgroups::pinned_cpus(layout, &record.cgroup);
        let clash = self.cores.claim(&record.cgroup, &cpus);
        if !clash.is_empty() {
            tracing::warn!(cgroup = %record.cgroup, cpus = ?clash, "a reattached task shares pinned CPUs with another task");
        }
        Ok(Box::new(IsolatedHandle {
            sup,
            cgroup,
            cg_name: record.cgroup.clone(),
            layout: layout.clone(),
            cleanup: None,
            reattached: true,
            cores: self.cores.clone(),
        }))
    }
}

/// Frees a start's CPUs unless the task started (`keep`).
struct CoreHold<'a> {
    cores: &'a CoreAllocator,
    task: String,
    keep: bool,
}

impl Drop for CoreHold<'_> {
    fn drop(&mut self) {
        if !self.keep {
            self.cores.release(&self.task);
        }
    }
}

/// Undoes a start that failed half-way: the cgroup (and whatever joined it) goes away.
struct StartGuard {
    cgroup: Option<Box<dyn TaskCgroup>>,
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if let Some(cg) = self.cgroup.take() {
            if let Err(e) = cgroups::kill_and_remove(cg.as_ref()) {
                tracing::warn!(error = %e, "removing the cgroup of a task that failed to start");
            }
        }
    }
}

/// A task started (or reattached) by [`ExecDriver`]; its pid is the init's, the leader of the
/// task's process group and the process whose namespaces are the task's.
struct IsolatedHandle {
    sup: Supervised,
    cgroup: Option<Box<dyn TaskCgroup>>,
    cg_name: String,
    layout: Layout,
    cleanup: Option<JoinHandle<Result<(), cgroups::CgroupError>>>,
    /// Reattached from a previous agent run: its cgroup may also be left in hierarchies the
    /// handle did not open, so the clean-up searches them all. A task this run started has
    /// its cgroup exactly where it was created.
    reattached: bool,
    /// Freed once the task ended and its cgroup is gone (not on drop: a dropped handle's
    /// task runs on).
    cores: Arc<CoreAllocator>,
}

#[async_trait]
impl TaskHandle for IsolatedHandle {
    fn pid(&self) -> u32 {
        self.sup.record.pid
    }

    async fn wait(&mut self) -> ExitStatus {
        let first = !self.sup.exited();
        // Only the supervisor wait may be cancelled (it is cancel-safe); everything after it
        // runs without an await, so the OOM check is never lost.
        let mut status = self.sup.wait().await;
        if first {
            self.sup.forget();
            let cg = self.cgroup.take();
            if let Some(cg) = &cg {
                if !status.success() && cg.stats().oom_kills > 0 {
                    status.oom_limit_mib = self.sup.record.memory_limit_mib;
                }
            }
            // Nothing of the task may outlive it: whatever escaped the process group is still
            // in the cgroup (in every hierarchy, also those a reattached handle did not open).
            let (layout, name) = (self.layout.clone(), self.cg_name.clone());
            // A started task's cgroup is removed where it was made; searching every hierarchy
            // (a read of /proc/self/mountinfo and a stat in each) is for a reattached one, or
            // one whose cgroup could not be opened.
            let search = self.reattached || cg.is_none();
            self.cleanup = Some(tokio::task::spawn_blocking(move || {
                let result = cg.as_deref().map(cgroups::kill_and_remove).unwrap_or(Ok(()));
                if search {
                    cgroups::remove_leftover(&layout, &name);
                }
                result
            }));
        }
        if let Some(cleanup) = self.cleanup.as_mut() {
            match cleanup.await {
                Ok(Err(e)) => {
                    tracing::warn!(pid = self.sup.record.pid, error = %e, "removing the task cgroup failed")
                }
                Err(e) => {
                    tracing::warn!(pid = self.sup.record.pid, error = %e, "removing the task cgroup failed")
                }
                Ok(Ok(())) => {}
            }
            self.cleanup = None;
            self.cores.release(&self.cg_name);
            // The root's mounts died with the task's mount namespace; the empty directory
            // stays for a restart of the task and goes with the allocation's dir.
        }
        status
    }

    fn signal(&self, sig: Signal) -> Result<(), DriverError> {
        self.sup.signal(sig)
    }

    fn stats(&self) -> Option<cgroups::Stats> {
        self.cgroup.as_ref().map(|c| c.stats())
    }

    fn pids(&self) -> Vec<u32> {
        self.cgroup.as_ref().map_or_else(|| super::process_group_members(self.pid()), |c| c.pids())
    }
}
