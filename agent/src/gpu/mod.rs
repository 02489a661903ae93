//! GPUs of the node and the GPUs a task sees: a [`GpuSource`] finds the node's devices and
//! their `gpu.*` attributes ([`simulated::SimulatedGpus`], or real devices through NVML,
//! [`nvml::NvmlGpus`]; [`Backend`] is the one an agent opened), and [`task_gpus`] / [`gpu_env`] give a task
//! its own devices out of its allocation's and the environment that exposes them
//! (`NVIDIA_VISIBLE_DEVICES` / `CUDA_VISIBLE_DEVICES` / `MLP_GPU_*`, and for a share the
//! `CUDA_MPS_*` limits that [`mps`] enforces on real devices); [`driver_files`] finds the
//! driver's user-space files that tasks with real GPUs get.

pub mod driver_files;
pub mod mps;
pub mod nvml;
pub mod simulated;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use mlp_proto::v1::{AllocatedResources, GpuAssignment, GpuDevice, Task, TaskGroup};

/// One whole GPU in milli-GPUs (`GpuAssignment.milli`).
pub const WHOLE_MILLI: u32 = 1000;

/// Where the agent looks for real GPUs (`mlp agent --gpus …`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuMode {
    /// NVML's devices when the library loads; no GPUs (and the reason in the node's
    /// `gpu.unavailable` attribute) when it does not.
    #[default]
    Auto,
    /// The same, but the agent's log warns when no library is found: a GPU node expected to
    /// have them.
    Nvml,
    /// Never look: no GPUs (unless simulated ones are configured).
    None,
}

/// How the agent finds and exposes real GPUs (issue 12). The defaults fit a host with the
/// NVIDIA driver installed the usual way.
#[derive(Debug, Clone)]
pub struct GpuSettings {
    /// Whether to look for NVML at all.
    pub mode: GpuMode,
    /// `libnvidia-ml.so.1` to load (`--nvml-library`); None searches the loader's paths, then
    /// the driver root, then common prefixes.
    pub nvml_library: Option<PathBuf>,
    /// A prefix the driver's user-space files live under (`--nvidia-driver-root`, e.g.
    /// `/usr/local/nvidia`): searched for the NVML library, the libraries bound into tasks and
    /// `nvidia-smi` / `nvidia-cuda-mps-control`.
    pub driver_root: Option<PathBuf>,
    /// Where the device nodes (`nvidiaN`, `nvidiactl`, `nvidia-uvm`, `nvidia-caps/`) are; `/dev`
    /// on a real host, a directory of stand-in nodes in tests.
    pub dev_dir: PathBuf,
    /// XIDs that do not make a device unhealthy, added to [`DEFAULT_IGNORED_XIDS`].
    pub ignored_xids: Vec<u64>,
    /// `nvidia-cuda-mps-control` (None: found next to `nvidia-smi` in the driver root or PATH).
    pub mps_control: Option<PathBuf>,
    /// Where the MPS daemons' pipe and log directories live (`--mps-dir`; None:
    /// [`mps::default_root`], under `/run/mlp/mps`). Every directory above it must be
    /// searchable by the tasks' users.
    pub mps_dir: Option<PathBuf>,
    /// The driver's list of MIG capability minors (`/proc/driver/nvidia-caps/mig-minors`): a
    /// MIG instance's `nvidia-caps/nvidia-capN` nodes come from it.
    pub mig_minors: PathBuf,
    /// Where the devices marked unhealthy are kept across agent restarts (the agent sets
    /// `<data_dir>/gpu-health.json`; None keeps them in memory only).
    pub health_file: Option<PathBuf>,
}

/// XIDs that are the application's fault or informational, not the device's (the NVIDIA device
/// plugin's list): 13 graphics engine exception, 31 GPU memory page fault, 43 GPU stopped
/// processing, 45 preemptive cleanup, 68 video processor exception, 109 context switch timeout.
pub const DEFAULT_IGNORED_XIDS: &[u64] = &[13, 31, 43, 45, 68, 109];

impl Default for GpuSettings {
    fn default() -> Self {
        GpuSettings {
            mode: GpuMode::Auto,
            nvml_library: None,
            driver_root: None,
            dev_dir: PathBuf::from("/dev"),
            ignored_xids: Vec::new(),
            mps_control: None,
            mps_dir: None,
            mig_minors: PathBuf::from(nvml::MIG_MINORS),
            health_file: None,
        }
    }
}

impl GpuSettings {
    /// Whether `xid` leaves a device healthy.
    pub fn xid_ignored(&self, xid: u64) -> bool {
        DEFAULT_IGNORED_XIDS.contains(&xid) || self.ignored_xids.contains(&xid)
    }
}

/// Now, for a health reason ("Sat, 05 Dec 2026 09:20:00 GMT").
pub(crate) fn now_http_date() -> String {
    httpdate::fmt_http_date(std::time::SystemTime::now())
}

/// Now in milliseconds since the epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Why a source's devices cannot be registered.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The devices are malformed or break a limit the servers enforce.
    #[error("{source_name} GPUs: {reason}")]
    Invalid {
        /// The source (`simulated`, ...).
        source_name: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Where a node's GPUs come from.
pub trait GpuSource: Send + Sync {
    /// The source's name, for logs and errors (`simulated`).
    fn name(&self) -> &'static str;
    /// The devices this node registers (whole GPUs and MIG instances), checked against what
    /// the servers accept; empty without GPUs.
    fn devices(&self) -> Result<Vec<GpuDevice>, GpuError>;
    /// The node attributes for `devices` (`gpu.count`, `gpu.model`, ...).
    fn attributes(&self, devices: &[GpuDevice]) -> BTreeMap<String, String> {
        attributes(devices)
    }
}

/// The node's GPUs, opened once when the agent starts: simulated ones when configured (they
/// replace real ones), else NVML's, else none with the reason.
#[derive(Debug, Clone)]
pub enum Backend {
    /// `--simulated-gpus`.
    Simulated(simulated::SimulatedGpus),
    /// Real devices through NVML.
    Nvml(Box<nvml::NvmlGpus>),
    /// No GPUs; why, when the agent looked for them (shown as the `gpu.unavailable` attribute).
    Absent(Option<String>),
}

impl Backend {
    /// Opens the backend `simulated` and `settings` ask for. Never fails: NVML that is missing
    /// or broken gives [`Backend::Absent`] with the reason.
    pub fn open(simulated: &[GpuDevice], settings: &GpuSettings) -> Backend {
        if !simulated.is_empty() {
            return Backend::Simulated(simulated::SimulatedGpus::new(simulated.to_vec()));
        }
        if settings.mode == GpuMode::None {
            return Backend::Absent(None);
        }
        match nvml::probe(settings) {
            nvml::Probe::Found(g) => Backend::Nvml(g),
            nvml::Probe::Unavailable(why) => {
                if nvml::STATIC_BUILD && (settings.mode == GpuMode::Nvml || Path::new("/dev/nvidiactl").exists()) {
                    tracing::error!(reason = %why, "NVML asked for (--gpus nvml) or NVIDIA devices present, but this build cannot load it; this node registers no GPUs");
                } else if settings.mode == GpuMode::Nvml {
                    tracing::warn!(reason = %why, "--gpus nvml: no usable NVML library; this node registers no GPUs");
                } else {
                    tracing::info!(reason = %why, "no NVML library; this node registers no GPUs");
                }
                Backend::Absent(Some(why))
            }
        }
    }

    /// The NVML backend, when that is what this is.
    pub fn nvml(&self) -> Option<&nvml::NvmlGpus> {
        match self {
            Backend::Nvml(g) => Some(g),
            _ => None,
        }
    }

    /// The devices to register (checked as the servers check them).
    pub fn devices(&self) -> Result<Vec<GpuDevice>, GpuError> {
        match self {
            Backend::Simulated(s) => s.devices(),
            Backend::Nvml(n) => n.devices(),
            Backend::Absent(_) => Ok(Vec::new()),
        }
    }

    /// The node attributes for `devices`.
    pub fn attributes(&self, devices: &[GpuDevice]) -> BTreeMap<String, String> {
        match self {
            Backend::Simulated(s) => s.attributes(devices),
            Backend::Nvml(n) => n.attributes(devices),
            Backend::Absent(None) => BTreeMap::new(),
            Backend::Absent(Some(why)) => BTreeMap::from([("gpu.unavailable".to_string(), why.clone())]),
        }
    }
}

/// Node attributes for these devices: `gpu.simulated`, `gpu.count` (physical GPUs),
/// `gpu.model` (the model, or the models comma separated when they differ), `gpu.models` (the
/// distinct models, comma separated, for `set_contains`) and `gpu.mig_instances` when some GPUs
/// are split. Empty without devices.
pub fn attributes(devices: &[GpuDevice]) -> BTreeMap<String, String> {
    let mut attrs = BTreeMap::new();
    if devices.is_empty() {
        return attrs;
    }
    let physical: BTreeSet<&str> =
        devices.iter().map(|d| if d.parent_id.is_empty() { d.id.as_str() } else { d.parent_id.as_str() }).collect();
    let models: BTreeSet<&str> = devices.iter().map(|d| d.model.as_str()).collect();
    let models = models.into_iter().collect::<Vec<_>>().join(",");
    let mig = devices.iter().filter(|d| !d.mig_profile.is_empty()).count();
    if devices.iter().all(|d| d.simulated) {
        attrs.insert("gpu.simulated".into(), "true".into());
    }
    attrs.insert("gpu.count".into(), physical.len().to_string());
    attrs.insert("gpu.model".into(), models.clone());
    attrs.insert("gpu.models".into(), models);
    if mig > 0 {
        attrs.insert("gpu.mig_instances".into(), mig.to_string());
    }
    attrs
}

/// The GPUs one task gets out of its allocation's assignment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskGpus {
    /// Devices and shares, in assignment order.
    pub devices: Vec<GpuAssignment>,
    /// Every device is a simulated one of this node.
    pub simulated: bool,
    /// This node's record of each device of `devices` it knows, in the same order (index,
    /// device nodes).
    pub node_devices: Vec<GpuDevice>,
}

impl TaskGpus {
    /// The host device nodes of the task's real devices (deduplicated: MIG instances of one GPU
    /// share its node); empty for simulated devices and tasks without GPUs.
    pub fn device_paths(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = Vec::new();
        for d in self.node_devices.iter().filter(|d| !d.simulated) {
            for p in &d.device_paths {
                let p = PathBuf::from(p);
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
        out
    }

    /// Whether the task has devices and they are real ones (bound into its root): every one a
    /// non-simulated device of this node's own fingerprint (an id the node does not know gets
    /// no device node, control node or MPS daemon).
    pub fn real(&self) -> bool {
        !self.devices.is_empty()
            && !self.simulated
            && self.node_devices.len() == self.devices.len()
            && self.node_devices.iter().all(|d| !d.simulated)
    }
}

/// How many of its allocation's GPU assignments a task takes: a share is one device, a MIG ask
/// or a whole-GPU ask `count` devices (the scheduler's order: one entry per device, task by task
/// in the group's order, tasks without GPUs skipped).
fn devices_asked(task: &Task) -> usize {
    match task.resources.as_ref().and_then(|r| r.gpu.as_ref()) {
        None => 0,
        Some(g) if g.mig_profile.is_empty() && (1..1000).contains(&g.share_milli) => 1,
        Some(g) => g.effective_count() as usize,
    }
}

/// The devices of `task_name` in an allocation of `group` with `resources`, on a node with
/// `node_gpus`. The allocation lists its devices task by task in the group's order; when that
/// list does not match the tasks' asks (an allocation from an older scheduler), every task that
/// asked for GPUs sees all of them.
pub fn task_gpus(group: &TaskGroup, task_name: &str, resources: Option<&AllocatedResources>, node_gpus: &[GpuDevice]) -> TaskGpus {
    let Some(r) = resources else { return TaskGpus::default() };
    let all: Vec<GpuAssignment> = if r.gpus.is_empty() {
        r.gpu_ids.iter().map(|id| GpuAssignment { id: id.clone(), milli: 1000, memory_mib: 0 }).collect()
    } else {
        r.gpus.clone()
    };
    let Some(task) = group.tasks.iter().find(|t| t.name == task_name) else { return TaskGpus::default() };
    let asked = devices_asked(task);
    if asked == 0 || all.is_empty() {
        return TaskGpus::default();
    }
    let total: usize = group.tasks.iter().map(devices_asked).sum();
    let devices = if total == all.len() {
        let offset: usize = group.tasks.iter().take_while(|t| t.name != task_name).map(devices_asked).sum();
        all[offset..offset + asked].to_vec()
    } else {
        tracing::warn!(
            task = task_name,
            asked = total,
            assigned = all.len(),
            "GPU assignment does not match the tasks' asks; the task sees all of the allocation's GPUs"
        );
        all
    };
    let simulated = devices.iter().all(|a| node_gpus.iter().any(|d| d.id == a.id && d.simulated));
    let node_devices = devices.iter().filter_map(|a| node_gpus.iter().find(|d| d.id == a.id).cloned()).collect();
    TaskGpus { devices, simulated, node_devices }
}

/// The environment variables that expose a task's GPUs (set over the task's own `env`): the
/// device ids (UUIDs for real devices) in `NVIDIA_VISIBLE_DEVICES`, `CUDA_VISIBLE_DEVICES` and
/// `MLP_GPU_IDS`, their NVML indices in `MLP_GPU_INDEX` (a simulated device's position in the
/// list), the per-device milli shares in `MLP_GPU_MILLI`, `MLP_GPUS_SIMULATED=1` for simulated
/// devices. A share of one device also gets its MPS limits: `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`
/// (its milli rounded up to a percentage of the SMs) and `CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=<MiB>M`
/// (device 0: the task sees its one device), on simulated devices too so that they can be
/// tested; the daemon's directories come from [`mps::MpsClient::env`]. A task without GPUs gets
/// `NVIDIA_VISIBLE_DEVICES=void` and an empty `CUDA_VISIBLE_DEVICES`, so
/// that it sees none of a real GPU host's devices.
pub fn gpu_env(gpus: &TaskGpus) -> Vec<(&'static str, String)> {
    if gpus.devices.is_empty() {
        return vec![("NVIDIA_VISIBLE_DEVICES", "void".into()), ("CUDA_VISIBLE_DEVICES", String::new())];
    }
    let ids = gpus.devices.iter().map(|a| a.id.as_str()).collect::<Vec<_>>().join(",");
    let milli = gpus.devices.iter().map(|a| a.milli.to_string()).collect::<Vec<_>>().join(",");
    let index = gpus
        .devices
        .iter()
        .enumerate()
        .map(|(pos, a)| match gpus.node_devices.iter().find(|d| d.id == a.id) {
            Some(d) if !d.simulated => d.index.to_string(),
            _ => pos.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",");
    let mut env = vec![
        ("NVIDIA_VISIBLE_DEVICES", ids.clone()),
        ("CUDA_VISIBLE_DEVICES", ids.clone()),
        ("MLP_GPU_IDS", ids),
        ("MLP_GPU_INDEX", index),
        ("MLP_GPU_MILLI", milli),
    ];
    if gpus.simulated {
        env.push(("MLP_GPUS_SIMULATED", "1".into()));
    }
    if let [share] = gpus.devices.as_slice() {
        if share.milli < WHOLE_MILLI {
            env.push(("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", share.milli.div_ceil(10).max(1).to_string()));
            if share.memory_mib > 0 {
                env.push(("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", format!("0={}M", share.memory_mib)));
            }
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlp_proto::v1::{GpuRequest, Resources};

    fn task(name: &str, gpu: Option<GpuRequest>) -> Task {
        Task { name: name.into(), resources: Some(Resources { gpu, ..Default::default() }), ..Default::default() }
    }

    #[test]
    fn tasks_get_their_own_devices_and_env() {
        let group = TaskGroup {
            tasks: vec![
                task("a", Some(GpuRequest { count: Some(1), ..Default::default() })),
                task("cpu", None),
                task("b", Some(GpuRequest { count: Some(2), ..Default::default() })),
                task("s", Some(GpuRequest { count: Some(1), share_milli: 250, ..Default::default() })),
            ],
            ..Default::default()
        };
        let asg = |id: &str, milli| GpuAssignment { id: id.into(), milli, memory_mib: 0 };
        let res = AllocatedResources {
            gpus: vec![asg("sim-gpu-0", 1000), asg("sim-gpu-1", 1000), asg("sim-gpu-2", 1000), asg("sim-gpu-3", 250)],
            ..Default::default()
        };
        let node: Vec<GpuDevice> =
            (0..4).map(|i| GpuDevice { id: format!("sim-gpu-{i}"), simulated: true, ..Default::default() }).collect();
        let b = task_gpus(&group, "b", Some(&res), &node);
        assert_eq!(b.devices, [asg("sim-gpu-1", 1000), asg("sim-gpu-2", 1000)]);
        assert!(b.simulated);
        let env: BTreeMap<_, _> = gpu_env(&b).into_iter().collect();
        assert_eq!(env["NVIDIA_VISIBLE_DEVICES"], "sim-gpu-1,sim-gpu-2");
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], "sim-gpu-1,sim-gpu-2");
        assert_eq!(env["MLP_GPU_IDS"], "sim-gpu-1,sim-gpu-2");
        assert_eq!(env["MLP_GPU_MILLI"], "1000,1000");
        assert_eq!(env["MLP_GPU_INDEX"], "0,1", "simulated: positions");
        assert_eq!(env["MLP_GPUS_SIMULATED"], "1");
        let s = task_gpus(&group, "s", Some(&res), &node);
        assert_eq!(s.devices, [asg("sim-gpu-3", 250)]);
        // A share gets its MPS limits (here without reserved memory: no memory limit).
        let env: BTreeMap<_, _> = gpu_env(&s).into_iter().collect();
        assert_eq!(env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"], "25");
        assert!(!env.contains_key("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"));
        let share = TaskGpus {
            devices: vec![GpuAssignment { id: "g".into(), milli: 333, memory_mib: 13_640 }],
            simulated: false,
            ..Default::default()
        };
        let env: BTreeMap<_, _> = gpu_env(&share).into_iter().collect();
        assert_eq!(env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"], "34");
        assert_eq!(env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"], "0=13640M");
        assert!(!gpu_env(&b).iter().any(|(k, _)| k.starts_with("CUDA_MPS_")));
        assert_eq!(task_gpus(&group, "a", Some(&res), &node).devices, [asg("sim-gpu-0", 1000)]);
        let cpu = task_gpus(&group, "cpu", Some(&res), &node);
        assert_eq!(cpu, TaskGpus::default());
        assert!(!cpu.real() && !b.real() && b.device_paths().is_empty());
        let env: BTreeMap<_, _> = gpu_env(&cpu).into_iter().collect();
        assert_eq!(env["NVIDIA_VISIBLE_DEVICES"], "void");
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], "");
        assert!(!env.contains_key("MLP_GPUS_SIMULATED"));
        // A device this node does not know as simulated: no MLP_GPUS_SIMULATED.
        let real = task_gpus(&group, "a", Some(&res), &node[1..]);
        assert!(!real.simulated);
        assert!(!gpu_env(&real).iter().any(|(k, _)| *k == "MLP_GPUS_SIMULATED"));
        // Real devices: UUIDs, NVML indices, their nodes (a MIG instance shares its GPU's).
        let uuid = |i: u32| format!("GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd");
        let real_node: Vec<GpuDevice> = (0..4)
            .map(|i| GpuDevice { id: uuid(i), index: i, device_paths: vec![format!("/dev/nvidia{}", i.min(2))], ..Default::default() })
            .collect();
        let res = AllocatedResources {
            gpus: vec![asg(&uuid(3), 1000), asg(&uuid(2), 1000), asg(&uuid(1), 1000), asg(&uuid(0), 250)],
            ..Default::default()
        };
        let b = task_gpus(&group, "b", Some(&res), &real_node);
        assert!(b.real());
        assert_eq!(b.device_paths(), [PathBuf::from("/dev/nvidia2"), PathBuf::from("/dev/nvidia1")]);
        let env: BTreeMap<_, _> = gpu_env(&b).into_iter().collect();
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], format!("{},{}", uuid(2), uuid(1)));
        assert_eq!(env["MLP_GPU_INDEX"], "2,1");
        let a = task_gpus(&group, "a", Some(&res), &real_node);
        assert_eq!(a.device_paths(), [PathBuf::from("/dev/nvidia2")], "devices 2 and 3 share a node here");
        // An old allocation with ids only, not matching the asks: every GPU task sees them all.
        let old = AllocatedResources { gpu_ids: vec!["sim-gpu-0".into()], ..Default::default() };
        assert_eq!(task_gpus(&group, "b", Some(&old), &node).devices, [asg("sim-gpu-0", 1000)]);
        assert_eq!(task_gpus(&group, "cpu", Some(&old), &node), TaskGpus::default());
    }
}
