//! Real GPUs through NVML (issue 12): [`NvmlGpus`] loads `libnvidia-ml.so.1` at run time with
//! `nvml-wrapper` (so one `mlp` binary runs on hosts with and without the driver), fingerprints
//! the devices and their MIG instances, NVLink peers and PCIe/NUMA topology, watches XID and
//! ECC events ([`NvmlGpus::spawn_health_watcher`]) and samples utilisation for heartbeats and
//! tasks.
//!
//! `nvml-wrapper` 0.11 does not wrap MIG enumeration or `nvmlDeviceGetNumaNodeId`; those few
//! calls go through `nvml-wrapper-sys`'s bindings on a second handle of the same library (the
//! dynamic loader hands back the one already loaded), with the device handles `nvml-wrapper`
//! gives out.
//!
//! Nothing here panics or fails the agent: a library that is missing or fails gives a node
//! without GPUs and a reason ([`Probe::Unavailable`]), shown in `mlp node status` as the
//! `gpu.unavailable` attribute.
#![allow(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mlp_proto::v1::{GpuDevice, GpuStats};
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor, TopologyLevel};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};
use nvml_wrapper_sys::bindings::{nvmlDevice_t, NvmlLib};

use super::{GpuError, GpuSettings, GpuSource};

/// Whether this is the static (musl) build of `mlp`, which has no dynamic loader and so cannot
/// load NVML (docs/ARCHITECTURE.md, "The binary").
pub const STATIC_BUILD: bool = cfg!(target_env = "musl");
/// The reason a static build's node has no real GPUs (its `gpu.unavailable` attribute).
pub const STATIC_BUILD_REASON: &str =
    "this is the static (musl) build of mlp, which cannot load libnvidia-ml.so.1 (no dynamic loader): run the glibc build on GPU nodes";

/// The library's file name, as the driver installs it.
pub const LIBRARY: &str = "libnvidia-ml.so.1";
/// Prefixes some hosts keep the driver under (container images, the GPU operator, distros).
const COMMON_PREFIXES: &[&str] = &[
    "/usr/local/nvidia/lib64",
    "/usr/local/nvidia/lib",
    "/usr/lib/x86_64-linux-gnu/nvidia/current",
    "/usr/lib64/nvidia",
    "/usr/lib/nvidia",
    "/run/nvidia/driver/usr/lib/x86_64-linux-gnu",
    "/run/nvidia/driver/usr/lib64",
    "/opt/nvidia/lib64",
];
/// Where the driver lists the minors of MIG capability nodes.
pub const MIG_MINORS: &str = "/proc/driver/nvidia-caps/mig-minors";
/// NVLink links per device, at most (NVML_NVLINK_MAX_LINKS).
const MAX_LINKS: u32 = 18;
const MIB: u64 = 1024 * 1024;

/// What looking for NVML found.
pub enum Probe {
    /// The library loaded and initialised.
    Found(Box<NvmlGpus>),
    /// Why there are no real GPUs on this node.
    Unavailable(String),
}

/// The loaded library and what was found on it.
struct Loaded {
    nvml: Nvml,
    /// The same library through the raw bindings, for the calls `nvml-wrapper` lacks.
    raw: Option<NvmlLib>,
}

/// Real GPUs of this node, found through NVML.
#[derive(Clone)]
pub struct NvmlGpus {
    loaded: Arc<Loaded>,
    /// The library that loaded.
    pub library: PathBuf,
    settings: GpuSettings,
    /// Devices marked unhealthy: id → reason (kept in `settings.health_file` across restarts).
    unhealthy: Arc<Mutex<BTreeMap<String, String>>>,
    /// The last fingerprint, and each whole device's NVML handle → UUID: a device that NVML
    /// can no longer answer for (fallen off the bus) is still known by them.
    last: Arc<Mutex<Known>>,
}

/// What the last fingerprint found.
#[derive(Default)]
struct Known {
    devices: Vec<GpuDevice>,
    /// Handle address → UUID of the whole devices.
    handles: BTreeMap<usize, String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The health file's devices (`{"GPU-…": "XID 79 at …"}`); none when it is missing or unreadable.
fn load_health(path: Option<&Path>) -> BTreeMap<String, String> {
    let Some(path) = path else { return BTreeMap::new() };
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
            tracing::warn!(file = %path.display(), error = %e, "unreadable GPU health file; starting with every device healthy");
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    }
}

impl std::fmt::Debug for NvmlGpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlGpus").field("library", &self.library).finish_non_exhaustive()
    }
}

/// The candidates for the library, in the order they are tried: the configured one alone, or
/// the loader's own search, the driver root, then [`COMMON_PREFIXES`].
pub fn candidates(settings: &GpuSettings) -> Vec<PathBuf> {
    if let Some(p) = &settings.nvml_library {
        return vec![p.clone()];
    }
    let mut out = vec![PathBuf::from(LIBRARY)];
    if let Some(root) = &settings.driver_root {
        for sub in ["lib64", "lib", "lib/x86_64-linux-gnu", "usr/lib64", "usr/lib/x86_64-linux-gnu"] {
            out.push(root.join(sub).join(LIBRARY));
        }
    }
    out.extend(COMMON_PREFIXES.iter().map(|p| Path::new(p).join(LIBRARY)));
    out
}

fn describe(e: &NvmlError) -> String {
    match e {
        NvmlError::LibloadingError(l) => format!("cannot load: {l}"),
        NvmlError::DriverNotLoaded => "the NVIDIA kernel driver is not loaded".into(),
        NvmlError::NoPermission => "no permission to talk to the driver".into(),
        other => other.to_string(),
    }
}

/// Looks for NVML as `settings` say. Never panics; an unloadable library is a reason.
pub fn probe(settings: &GpuSettings) -> Probe {
    if STATIC_BUILD {
        return Probe::Unavailable(STATIC_BUILD_REASON.to_string());
    }
    let mut tried = Vec::new();
    for path in candidates(settings) {
        // A path with a directory that does not exist is not worth a dlopen (and its error).
        if path.parent().is_some_and(|d| !d.as_os_str().is_empty() && !d.exists()) {
            continue;
        }
        let result = std::panic::catch_unwind(|| Nvml::builder().lib_path(path.as_os_str()).init());
        match result {
            Ok(Ok(nvml)) => {
                // SAFETY: loading the library that just initialised; its initialisers already ran.
                let raw = unsafe { NvmlLib::new(path.as_os_str()) }.ok();
                let loaded = Loaded { nvml, raw };
                tracing::info!(library = %path.display(), "NVML loaded");
                let unhealthy = load_health(settings.health_file.as_deref());
                if !unhealthy.is_empty() {
                    tracing::warn!(devices = ?unhealthy.keys().collect::<Vec<_>>(), "GPUs marked unhealthy before this start stay unhealthy (remove the health file after a repair)");
                }
                return Probe::Found(Box::new(NvmlGpus {
                    loaded: Arc::new(loaded),
                    library: path,
                    settings: settings.clone(),
                    unhealthy: Arc::new(Mutex::new(unhealthy)),
                    last: Arc::default(),
                }));
            }
            Ok(Err(e)) => tried.push(format!("{}: {}", path.display(), describe(&e))),
            Err(_) => tried.push(format!("{}: NVML panicked while initialising", path.display())),
        }
    }
    if tried.is_empty() {
        return Probe::Unavailable(format!("{LIBRARY} not found"));
    }
    Probe::Unavailable(format!("no usable NVML library ({})", tried.join("; ")))
}

/// A PCI bus id in one spelling: lower case, 8-digit domain (`00000000:17:00.0`).
fn normalize_bus_id(id: &str) -> String {
    let id = id.trim().to_ascii_lowercase();
    match id.split_once(':') {
        Some((domain, rest)) if domain.len() < 8 => format!("{domain:0>8}:{rest}"),
        Some((domain, rest)) if domain.len() > 8 => format!("{}:{rest}", &domain[domain.len() - 8..]),
        _ => id,
    }
}

/// The NUMA node of a PCI device from sysfs (`-1` there means none).
fn sysfs_numa_node(bus_id: &str) -> Option<i32> {
    let id = normalize_bus_id(bus_id);
    let short = id.get(4..)?; // sysfs spells the domain with 4 digits
    let text = std::fs::read_to_string(format!("/sys/bus/pci/devices/{short}/numa_node")).ok()?;
    text.trim().parse::<i32>().ok().filter(|n| *n >= 0)
}

/// `gpuN/giG/access M` and `gpuN/giG/ciC/access M` lines of the driver's mig-minors file.
fn mig_minors(text: &str) -> BTreeMap<String, u32> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.trim().rsplit_once(' ')?;
            Some((k.trim().to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// The MIG profile at the end of a MIG device's name ("NVIDIA A100-SXM4-40GB MIG 1g.5gb").
fn profile_from_name(name: &str) -> Option<String> {
    let (_, p) = name.rsplit_once(" MIG ")?;
    let p = p.trim();
    (!p.is_empty()).then(|| p.to_string())
}

impl NvmlGpus {
    fn nvml(&self) -> &Nvml {
        &self.loaded.nvml
    }

    /// The driver's and CUDA's versions ("550.54.15", "12.4"), as far as they can be read.
    pub fn versions(&self) -> (Option<String>, Option<String>) {
        let driver = self.nvml().sys_driver_version().ok();
        let cuda = self.nvml().sys_cuda_driver_version().ok().map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10));
        (driver, cuda)
    }

    /// The MIG instances of `parent` (MIG mode on), as devices of their own.
    fn mig_instances(&self, parent: &Device<'_>, parent_dev: &GpuDevice, minor: u32, minors: &BTreeMap<String, u32>) -> Vec<GpuDevice> {
        let Some(raw) = &self.loaded.raw else { return Vec::new() };
        let (Ok(max), Ok(get)) = (raw.nvmlDeviceGetMaxMigDeviceCount.as_ref(), raw.nvmlDeviceGetMigDeviceHandleByIndex.as_ref()) else {
            return Vec::new();
        };
        let mut count = 0u32;
        // SAFETY: a live device handle from this library and a valid out-pointer.
        if unsafe { max(parent.handle(), &mut count) } != 0 {
            return Vec::new();
        }
        let mut out = Vec::new();
        for k in 0..count.min(64) {
            let mut handle: nvmlDevice_t = std::ptr::null_mut();
            // SAFETY: as above; a missing instance answers NOT_FOUND and leaves `handle` null.
            if unsafe { get(parent.handle(), k, &mut handle) } != 0 || handle.is_null() {
                continue;
            }
            // SAFETY: a MIG device handle the library just gave out, used while it is loaded.
            let mig = unsafe { Device::new(handle, self.nvml()) };
            let (Ok(uuid), Ok(name)) = (mig.uuid(), mig.name()) else { continue };
            let Some(profile) = profile_from_name(&name) else { continue };
            let id_of = |f: Option<&unsafe extern "C" fn(nvmlDevice_t, *mut u32) -> u32>| {
                let mut id = 0u32;
                // SAFETY: a live MIG device handle and a valid out-pointer.
                f.filter(|f| unsafe { f(handle, &mut id) } == 0).map(|_| id)
            };
            let gi = id_of(raw.nvmlDeviceGetGpuInstanceId.as_ref().ok());
            let ci = id_of(raw.nvmlDeviceGetComputeInstanceId.as_ref().ok());
            let mut paths = vec![self.settings.dev_dir.join(format!("nvidia{minor}")).display().to_string()];
            if let (Some(gi), Some(ci)) = (gi, ci) {
                let index = parent_dev.index;
                for key in [format!("gpu{index}/gi{gi}/access"), format!("gpu{index}/gi{gi}/ci{ci}/access")] {
                    if let Some(m) = minors.get(&key) {
                        paths.push(self.settings.dev_dir.join(format!("nvidia-caps/nvidia-cap{m}")).display().to_string());
                    }
                }
            }
            out.push(GpuDevice {
                id: uuid,
                model: parent_dev.model.clone(),
                memory_mib: mig.memory_info().map(|m| m.total / MIB).unwrap_or(0),
                simulated: false,
                mig_profile: profile,
                parent_id: parent_dev.id.clone(),
                nvlink_peers: Vec::new(),
                pci_switch: parent_dev.pci_switch.clone(),
                numa_node: parent_dev.numa_node,
                index: parent_dev.index,
                device_paths: paths,
                compute_capability: parent_dev.compute_capability.clone(),
                pci_bus_id: parent_dev.pci_bus_id.clone(),
                unhealthy: false,
                health: String::new(),
            });
        }
        out
    }

    fn numa_node(&self, device: &Device<'_>, bus_id: &str) -> Option<i32> {
        if let Some(f) = self.loaded.raw.as_ref().and_then(|r| r.nvmlDeviceGetNumaNodeId.as_ref().ok()) {
            let mut node = 0u32;
            // SAFETY: a live device handle and a valid out-pointer.
            if unsafe { f(device.handle(), &mut node) } == 0 {
                return i32::try_from(node).ok();
            }
        }
        sysfs_numa_node(bus_id)
    }

    /// Every device as the scheduler sees it: whole GPUs, or the MIG instances of GPUs in MIG
    /// mode (not the GPU itself), with their health applied.
    pub fn fingerprint(&self) -> Result<Vec<GpuDevice>, String> {
        let nvml = self.nvml();
        let count = nvml.device_count().map_err(|e| format!("counting devices: {}", describe(&e)))?;
        let minors = std::fs::read_to_string(&self.settings.mig_minors).map(|t| mig_minors(&t)).unwrap_or_default();
        // Whole devices first (their topology needs all of them), MIG instances after.
        let mut whole: Vec<(GpuDevice, bool)> = Vec::new();
        let mut handles = Vec::new();
        // Devices NVML no longer answers for: their last known records, marked unhealthy.
        let mut lost: Vec<GpuDevice> = Vec::new();
        let known = lock(&self.last).devices.clone();
        for i in 0..count {
            let found = nvml.device_by_index(i).and_then(|d| d.uuid().map(|u| (d, u)));
            let (d, uuid) = match found {
                Ok(x) => x,
                Err(e) => {
                    let why = format!("NVML cannot read the device: {}", describe(&e));
                    let before: Vec<GpuDevice> = known.iter().filter(|k| k.index == i).cloned().collect();
                    if before.is_empty() {
                        tracing::warn!(device = i, reason = %why, "a GPU NVML cannot read is left out");
                        continue;
                    }
                    let id = before.iter().find(|k| k.parent_id.is_empty()).map_or_else(|| before[0].parent_id.clone(), |k| k.id.clone());
                    if self.mark_unhealthy(&id, format!("{why} at {}", crate::gpu::now_http_date())) {
                        tracing::error!(gpu = %id, reason = %why, "GPU unhealthy");
                    }
                    lost.extend(before);
                    continue;
                }
            };
            let bus_id = d.pci_info().map(|p| normalize_bus_id(&p.bus_id)).unwrap_or_default();
            let minor = d.minor_number().unwrap_or(i);
            let mig_on = matches!(d.mig_mode(), Ok(m) if m.current == 1);
            let dev = GpuDevice {
                id: uuid,
                model: d.name().unwrap_or_else(|_| "unknown".into()),
                memory_mib: d.memory_info().map(|m| m.total / MIB).unwrap_or(0),
                simulated: false,
                numa_node: self.numa_node(&d, &bus_id),
                index: d.index().unwrap_or(i),
                device_paths: vec![self.settings.dev_dir.join(format!("nvidia{minor}")).display().to_string()],
                compute_capability: d.cuda_compute_capability().map(|c| format!("{}.{}", c.major, c.minor)).unwrap_or_default(),
                pci_bus_id: bus_id,
                ..Default::default()
            };
            whole.push((dev, mig_on));
            handles.push((d, minor));
        }
        // NVLink peers: the devices at the far end of each active link.
        let by_bus: BTreeMap<String, String> = whole.iter().map(|(d, _)| (d.pci_bus_id.clone(), d.id.clone())).collect();
        for (k, (d, _)) in handles.iter().enumerate() {
            let mut peers = BTreeSet::new();
            for link in 0..MAX_LINKS {
                let l = d.link_wrapper_for(link);
                if !matches!(l.is_active(), Ok(true)) {
                    continue;
                }
                if let Some(peer) = l.remote_pci_info().ok().and_then(|p| by_bus.get(&normalize_bus_id(&p.bus_id)).cloned()) {
                    if peer != whole[k].0.id {
                        peers.insert(peer);
                    }
                }
            }
            whole[k].0.nvlink_peers = peers.into_iter().collect();
        }
        // PCIe switches: devices whose closest common ancestor is a switch share one, named
        // after the first device's bus id.
        for k in 0..handles.len() {
            if !whole[k].0.pci_switch.is_empty() {
                continue;
            }
            let mut group = vec![k];
            for j in (k + 1)..handles.len() {
                let level = nvml.topology_common_ancestor(&handles[k].0, &handles[j].0);
                if matches!(level, Ok(TopologyLevel::Single | TopologyLevel::Multiple)) {
                    group.push(j);
                }
            }
            if group.len() > 1 {
                let name = format!("pcie-{}", whole[k].0.pci_bus_id.replace([':', '.'], "-"));
                for j in group {
                    whole[j].0.pci_switch = name.clone();
                }
            }
        }
        let mut out = Vec::new();
        for (k, (dev, mig_on)) in whole.iter().enumerate() {
            if *mig_on {
                let instances = self.mig_instances(&handles[k].0, dev, handles[k].1, &minors);
                if instances.is_empty() {
                    tracing::warn!(gpu = %dev.id, "MIG mode is on but no MIG instances were found; the GPU is not offered");
                }
                out.extend(instances);
            } else {
                out.push(dev.clone());
            }
        }
        out.extend(lost);
        // MIG instances have no NVLink peers of their own; peers that are now split are gone.
        let ids: BTreeSet<String> = out.iter().map(|d| d.id.clone()).collect();
        for d in &mut out {
            d.nvlink_peers.retain(|p| ids.contains(p));
        }
        let unhealthy = lock(&self.unhealthy);
        for d in &mut out {
            let reason = unhealthy.get(&d.id).or_else(|| (!d.parent_id.is_empty()).then(|| unhealthy.get(&d.parent_id)).flatten());
            if let Some(r) = reason {
                d.unhealthy = true;
                d.health = r.clone();
            }
        }
        drop(unhealthy);
        let mut last = lock(&self.last);
        last.devices = out.clone();
        for (k, (dev, _)) in whole.iter().enumerate() {
            // SAFETY: reading the handle's address only, to recognise it in later events.
            let h = unsafe { handles[k].0.handle() } as usize;
            last.handles.insert(h, dev.id.clone());
        }
        Ok(out)
    }

    /// The UUID of the device behind an event, also when NVML can no longer read it.
    fn event_device_id(&self, device: &Device<'_>) -> Option<String> {
        if let Ok(id) = device.uuid() {
            return Some(id);
        }
        // SAFETY: reading the handle's address only.
        let h = unsafe { device.handle() } as usize;
        lock(&self.last).handles.get(&h).cloned()
    }

    /// Whole devices of the last fingerprint that NVML can no longer read, with the error.
    fn find_lost(&self) -> Vec<(String, String)> {
        let nvml = self.nvml();
        let known = lock(&self.last).devices.clone();
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for k in known {
            let id = if k.parent_id.is_empty() { k.id.clone() } else { k.parent_id.clone() };
            if !seen.insert(id.clone()) {
                continue;
            }
            let check = nvml.device_by_index(k.index).and_then(|d| d.uuid().and_then(|u| d.memory_info().map(|_| u)));
            match check {
                Ok(u) if u == id => {}
                Ok(_) => out.push((id, "the device at its index changed".to_string())),
                Err(e) => out.push((id, describe(&e))),
            }
        }
        out
    }

    /// Marks the device `id` (and its MIG instances) unhealthy; false when it already was.
    pub fn mark_unhealthy(&self, id: &str, reason: String) -> bool {
        let mut u = lock(&self.unhealthy);
        if u.contains_key(id) {
            return false;
        }
        u.insert(id.to_string(), reason);
        // Kept across agent restarts: a device with a fatal error does not take placements
        // again because the agent restarted (an operator removes the file after a repair).
        if let Some(path) = &self.settings.health_file {
            let tmp = path.with_extension("tmp");
            let written = serde_json::to_vec_pretty(&*u)
                .map_err(std::io::Error::other)
                .and_then(|b| std::fs::write(&tmp, b))
                .and_then(|()| std::fs::rename(&tmp, path));
            if let Err(e) = written {
                tracing::warn!(file = %path.display(), error = %e, "cannot save GPU health; it is kept until the agent restarts");
            }
        }
        true
    }

    /// Watches XID and ECC events on every device on a thread of its own, sending each event
    /// that makes a device unhealthy (critical XIDs not in the ignore list, double-bit ECC
    /// errors) to `events`. Ends when `events` is closed.
    pub fn spawn_health_watcher(&self, events: tokio::sync::mpsc::UnboundedSender<HealthEvent>) -> std::io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new().name("nvml-health".into()).spawn(move || me.watch(events)).map(|_| ())
    }

    fn watch(&self, events: tokio::sync::mpsc::UnboundedSender<HealthEvent>) {
        let nvml = self.nvml();
        // A failed registration frees the set (nvml-wrapper consumes it): start over without
        // the device that failed, at most once per device.
        let count = nvml.device_count().unwrap_or(0);
        let wanted = EventTypes::CRITICAL_XID_ERROR | EventTypes::DOUBLE_BIT_ECC_ERROR | EventTypes::SINGLE_BIT_ECC_ERROR;
        let mut skip = BTreeSet::new();
        let set = 'attempt: loop {
            let mut set = match nvml.create_event_set() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %describe(&e), "NVML events are not available; GPU health is not watched");
                    return;
                }
            };
            for i in (0..count).filter(|i| !skip.contains(i)) {
                let Ok(d) = nvml.device_by_index(i) else { continue };
                let types = d.supported_event_types().map(|t| t & wanted).unwrap_or(wanted);
                match d.register_events(types, set) {
                    Ok(s) => set = s,
                    Err(e) => {
                        tracing::warn!(device = i, error = %describe(&e.error), "registering for NVML events failed; that device's health is not watched");
                        skip.insert(i);
                        continue 'attempt;
                    }
                }
            }
            break set;
        };
        tracing::info!(devices = count, "watching GPU health (XID and ECC events)");
        let mut failures = 0u32;
        while !events.is_closed() {
            match set.wait(1000) {
                Ok(ev) => {
                    failures = 0;
                    let Some(id) = self.event_device_id(&ev.device) else {
                        tracing::warn!("an NVML event for a device this agent does not know; ignored");
                        continue;
                    };
                    let at = crate::gpu::now_http_date();
                    let reason = if ev.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
                        let xid = match ev.event_data {
                            Some(nvml_wrapper::enums::event::XidError::Value(v)) => v,
                            _ => 999,
                        };
                        if self.settings.xid_ignored(xid) {
                            tracing::info!(gpu = %id, xid, "XID that is not the device's fault; ignored");
                            continue;
                        }
                        format!("XID {xid} at {at}")
                    } else if ev.event_type.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
                        format!("double-bit ECC error at {at}")
                    } else {
                        tracing::info!(gpu = %id, "single-bit ECC error (corrected)");
                        continue;
                    };
                    tracing::error!(gpu = %id, %reason, "GPU unhealthy");
                    if self.mark_unhealthy(&id, reason.clone()) && events.send(HealthEvent { device: id, reason }).is_err() {
                        return;
                    }
                }
                Err(NvmlError::Timeout) => failures = 0,
                Err(e) => {
                    // A lost GPU can fail the wait itself: find which device went and mark it,
                    // then keep watching the others.
                    for (id, why) in self.find_lost() {
                        let reason = format!("{why} at {}", crate::gpu::now_http_date());
                        tracing::error!(gpu = %id, %reason, "GPU lost");
                        if self.mark_unhealthy(&id, reason.clone()) && events.send(HealthEvent { device: id, reason }).is_err() {
                            return;
                        }
                    }
                    failures += 1;
                    if failures >= 30 {
                        tracing::warn!(error = %describe(&e), "waiting for NVML events keeps failing; GPU health is no longer watched");
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
        }
    }

    /// The current measurements of every whole device (MIG instances share their parent's).
    pub fn sample(&self) -> Vec<GpuStats> {
        let nvml = self.nvml();
        let now = crate::gpu::now_ms();
        let unhealthy = lock(&self.unhealthy).clone();
        let mut out = Vec::new();
        for i in 0..nvml.device_count().unwrap_or(0) {
            let Ok(d) = nvml.device_by_index(i) else { continue };
            let Ok(id) = d.uuid() else { continue };
            let mem = d.memory_info().ok();
            out.push(GpuStats {
                healthy: !unhealthy.contains_key(&id),
                id,
                utilization_percent: d.utilization_rates().map(|u| u.gpu).unwrap_or(0),
                memory_used_mib: mem.as_ref().map_or(0, |m| m.used / MIB),
                memory_total_mib: mem.as_ref().map_or(0, |m| m.total / MIB),
                power_mw: d.power_usage().unwrap_or(0),
                temperature_c: d.temperature(TemperatureSensor::Gpu).unwrap_or(0),
                ecc_corrected: d.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile).unwrap_or(0),
                ecc_uncorrected: d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile).unwrap_or(0),
                sampled_at_ms: now,
            });
        }
        out
    }

    /// The GPU use of the processes `pids` (a task's) on the devices `ids` (a task's; MIG
    /// instances count on their parent): the busiest device's SM utilisation they account
    /// for, and the device memory they hold, in MiB.
    pub fn usage_of(&self, ids: &[String], pids: &BTreeSet<u32>) -> (u32, u64) {
        if pids.is_empty() || ids.is_empty() {
            return (0, 0);
        }
        let nvml = self.nvml();
        let parents: BTreeSet<String> = lock(&self.last)
            .devices
            .iter()
            .filter(|d| !d.parent_id.is_empty() && ids.contains(&d.id))
            .map(|d| d.parent_id.clone())
            .collect();
        let (mut util, mut mem) = (0u32, 0u64);
        for i in 0..nvml.device_count().unwrap_or(0) {
            let Ok(d) = nvml.device_by_index(i) else { continue };
            let Ok(id) = d.uuid() else { continue };
            // A task with a MIG instance of this GPU counts its processes on the parent.
            let mine = ids.contains(&id) || parents.contains(&id);
            if !mine {
                continue;
            }
            for p in d.running_compute_processes().unwrap_or_default() {
                if pids.contains(&p.pid) {
                    if let nvml_wrapper::enums::device::UsedGpuMemory::Used(b) = p.used_gpu_memory {
                        mem += b / MIB;
                    }
                }
            }
            // The driver keeps a buffer of samples: only the last 15 s, one figure per process
            // (its highest), summed over the task's processes.
            let now_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros());
            let since = u64::try_from(now_us.saturating_sub(15_000_000)).unwrap_or(0);
            let mut per_pid: BTreeMap<u32, u32> = BTreeMap::new();
            for s in d.process_utilization_stats(since).unwrap_or_default().iter().filter(|s| pids.contains(&s.pid)) {
                let e = per_pid.entry(s.pid).or_default();
                *e = (*e).max(s.sm_util);
            }
            util = util.max(per_pid.values().sum::<u32>().min(100));
        }
        (util, mem)
    }
}

/// A device that became unhealthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthEvent {
    /// The device's id (UUID).
    pub device: String,
    /// Why ("XID 79 at …").
    pub reason: String,
}

impl GpuSource for NvmlGpus {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn devices(&self) -> Result<Vec<GpuDevice>, GpuError> {
        let mut devices = self.fingerprint().map_err(|reason| GpuError::Invalid { source_name: "nvml", reason })?;
        mlp_proto::gpu::check_gpu_devices("nvml", &mut devices)
            .map_err(|e| GpuError::Invalid { source_name: "nvml", reason: e.to_string() })?;
        Ok(devices)
    }

    fn attributes(&self, devices: &[GpuDevice]) -> BTreeMap<String, String> {
        let mut attrs = super::attributes(devices);
        attrs.insert("gpu.source".into(), "nvml".into());
        let (driver, cuda) = self.versions();
        if let Some(v) = driver {
            attrs.insert("gpu.driver_version".into(), v);
        }
        if let Some(v) = cuda {
            attrs.insert("gpu.cuda_version".into(), v);
        }
        if let Some(cc) = devices.iter().map(|d| d.compute_capability.as_str()).find(|c| !c.is_empty()) {
            attrs.insert("gpu.compute_capability".into(), cc.to_string());
        }
        let unhealthy = devices.iter().filter(|d| d.unhealthy).count();
        if unhealthy > 0 {
            attrs.insert("gpu.unhealthy".into(), unhealthy.to_string());
        }
        attrs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_ids_and_mig_names_parse() {
        assert_eq!(normalize_bus_id("0000:17:00.0"), "00000000:17:00.0");
        assert_eq!(normalize_bus_id("00000000:AB:00.0"), "00000000:ab:00.0");
        assert_eq!(profile_from_name("NVIDIA A100-SXM4-40GB MIG 1g.5gb"), Some("1g.5gb".into()));
        assert_eq!(profile_from_name("NVIDIA H100"), None);
        let m = mig_minors("config 1\nmonitor 2\ngpu0/gi1/access 12\ngpu0/gi1/ci0/access 13\n");
        assert_eq!(m.get("gpu0/gi1/access"), Some(&12));
        assert_eq!(m.get("gpu0/gi1/ci0/access"), Some(&13));
    }

    #[test]
    fn a_missing_library_is_a_reason_not_a_crash() {
        let settings = GpuSettings { nvml_library: Some("/nonexistent/libnvidia-ml.so.1".into()), ..Default::default() };
        match probe(&settings) {
            Probe::Found(_) => panic!("found NVML at a path that does not exist"),
            Probe::Unavailable(why) => assert!(why.contains("not found") || why.contains("/nonexistent"), "{why}"),
        }
        // The search list: the loader first, the driver root, then the common prefixes.
        let settings = GpuSettings { driver_root: Some("/usr/local/nvidia".into()), ..Default::default() };
        let c = candidates(&settings);
        assert_eq!(c[0], PathBuf::from(LIBRARY));
        assert!(c.contains(&PathBuf::from("/usr/local/nvidia/lib64/libnvidia-ml.so.1")));
    }
}
