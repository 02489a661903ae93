//! A test-only stand-in for `libnvidia-ml.so.1` (issue 12 §6): CI has no GPU, so the agent's
//! NVML source is tested by loading this library through the real `nvml-wrapper` path
//! (`--nvml-library`). It exports the NVML functions the agent calls, with the C ABI and the
//! struct layouts of `nvml-wrapper-sys` (the bindings `nvml-wrapper` itself uses), and answers
//! from a JSON file named by `MLP_FAKE_NVML` (see [`Config`]). The file is read again on every
//! call, so a test changes utilisation, processes or injects XIDs by rewriting it; each XID in
//! `xids` is delivered once, in order, by `nvmlEventSetWait_v2`.
//!
//! Handles are opaque integers cast to pointers: a physical device is `(index + 1) << 8`, MIG
//! instance `k` of it `((index + 1) << 8) | (k + 1)`.
#![allow(unsafe_code)]
// The functions are an ABI contract with NVML's callers: their safety requirements are NVML's
// (valid, writable out-pointers of the documented types), not ours to restate per function.
#![allow(clippy::missing_safety_doc)]
// They are called from C through `dlsym`, where `unsafe` on the Rust signature means nothing;
// each dereference checks for null and carries its SAFETY note.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, CStr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nvml_wrapper_sys::bindings::*;
use serde::Deserialize;

/// The environment variable naming the JSON file.
pub const CONFIG_ENV: &str = "MLP_FAKE_NVML";

/// The file's contents.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `nvmlInit` fails with this NVML return code (e.g. 9, driver not loaded) when set.
    pub init_error: Option<u32>,
    pub driver_version: String,
    /// CUDA driver version as NVML reports it (12040 = 12.4).
    pub cuda_version: i32,
    pub devices: Vec<FakeDevice>,
    /// XIDs to deliver, in order, once each: `{ "device": index, "xid": 79 }`.
    pub xids: Vec<FakeXid>,
}

/// One physical GPU.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FakeDevice {
    pub uuid: String,
    pub name: String,
    pub memory_mib: u64,
    pub memory_used_mib: u64,
    /// The `/dev/nvidiaN` minor.
    pub minor: u32,
    /// "00000000:17:00.0".
    pub pci_bus_id: String,
    /// Devices with the same value share a PCIe switch (`nvmlDeviceGetTopologyCommonAncestor`
    /// answers SINGLE for them, SYSTEM otherwise); "" = alone.
    pub pci_switch: String,
    pub numa_node: Option<i32>,
    pub compute_capability: (i32, i32),
    /// Indices of the devices this one has an active NVLink to (one link each).
    pub nvlink_peers: Vec<u32>,
    /// MIG mode on, with these instances.
    pub mig: Vec<FakeMig>,
    pub utilization: u32,
    pub power_mw: u32,
    pub temperature_c: u32,
    pub ecc_corrected: u64,
    pub ecc_uncorrected: u64,
    pub processes: Vec<FakeProcess>,
    /// Fallen off the bus: every query of it answers NVML_ERROR_GPU_IS_LOST.
    pub lost: bool,
}

/// One MIG instance.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FakeMig {
    pub uuid: String,
    /// "1g.10gb".
    pub profile: String,
    pub memory_mib: u64,
    pub gpu_instance: u32,
    pub compute_instance: u32,
}

/// A process using a device.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FakeProcess {
    pub pid: u32,
    pub used_mib: u64,
    /// SM utilisation of this process, percent.
    pub sm_util: u32,
}

/// An XID to deliver.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FakeXid {
    pub device: u32,
    pub xid: u64,
}

const MIB: u64 = 1024 * 1024;
/// How many of `xids` were delivered so far.
static DELIVERED: AtomicUsize = AtomicUsize::new(0);

fn config() -> Option<Config> {
    let path = std::env::var_os(CONFIG_ENV)?;
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// The device (and MIG instance) a handle names, with the config it came from; a lost device
/// answers NVML_ERROR_GPU_IS_LOST.
fn resolve(handle: nvmlDevice_t) -> Result<(Config, usize, Option<usize>), nvmlReturn_t> {
    let invalid = nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
    let raw = handle as usize;
    let (index, mig) = ((raw >> 8).checked_sub(1).ok_or(invalid)?, (raw & 0xff).checked_sub(1));
    let cfg = config().ok_or(nvmlReturn_enum_NVML_ERROR_UNINITIALIZED)?;
    let d = cfg.devices.get(index).ok_or(invalid)?;
    if d.lost {
        return Err(nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST);
    }
    if let Some(k) = mig {
        d.mig.get(k).ok_or(invalid)?;
    }
    Ok((cfg, index, mig))
}

fn handle_of(index: usize, mig: Option<usize>) -> nvmlDevice_t {
    (((index + 1) << 8) | mig.map_or(0, |k| k + 1)) as nvmlDevice_t
}

/// Writes `s` NUL-terminated into `buf` of `len` bytes.
fn write_str(s: &str, buf: *mut c_char, len: c_uint) -> nvmlReturn_t {
    if buf.is_null() {
        return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
    }
    if s.len() + 1 > len as usize {
        return nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: the caller gave a buffer of `len` bytes, and `s.len() + 1 <= len`.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), s.len());
        *buf.add(s.len()) = 0;
    }
    nvmlReturn_enum_NVML_SUCCESS
}

/// Stores `v` through the out-pointer `p`.
fn put<T>(p: *mut T, v: T) -> nvmlReturn_t {
    if p.is_null() {
        return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: the caller passes a valid, writable pointer to a `T` (NVML's contract).
    unsafe { p.write(v) };
    nvmlReturn_enum_NVML_SUCCESS
}

macro_rules! device_or_return {
    ($handle:expr) => {
        match resolve($handle) {
            Ok(found) => found,
            Err(code) => return code,
        }
    };
}

#[no_mangle]
pub extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    match config() {
        None => nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED,
        Some(c) => c.init_error.unwrap_or(nvmlReturn_enum_NVML_SUCCESS),
    }
}

#[no_mangle]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    nvmlInit_v2()
}

#[no_mangle]
pub extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    nvmlReturn_enum_NVML_SUCCESS
}

#[no_mangle]
pub extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    let s: &'static CStr = match result {
        0 => c"Success",
        2 => c"Invalid Argument",
        3 => c"Not Supported",
        6 => c"Not Found",
        7 => c"Insufficient Size",
        9 => c"Driver Not Loaded",
        10 => c"Timeout",
        15 => c"GPU is lost",
        _ => c"Unknown Error",
    };
    s.as_ptr()
}

#[no_mangle]
pub extern "C" fn nvmlSystemGetDriverVersion(version: *mut c_char, length: c_uint) -> nvmlReturn_t {
    let Some(c) = config() else { return nvmlReturn_enum_NVML_ERROR_UNINITIALIZED };
    write_str(&c.driver_version, version, length)
}

#[no_mangle]
pub extern "C" fn nvmlSystemGetCudaDriverVersion_v2(version: *mut c_int) -> nvmlReturn_t {
    let Some(c) = config() else { return nvmlReturn_enum_NVML_ERROR_UNINITIALIZED };
    put(version, c.cuda_version)
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> nvmlReturn_t {
    let Some(c) = config() else { return nvmlReturn_enum_NVML_ERROR_UNINITIALIZED };
    put(count, c.devices.len() as c_uint)
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetHandleByIndex_v2(index: c_uint, device: *mut nvmlDevice_t) -> nvmlReturn_t {
    let Some(c) = config() else { return nvmlReturn_enum_NVML_ERROR_UNINITIALIZED };
    match c.devices.get(index as usize) {
        None => nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT,
        Some(d) if d.lost => nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST,
        Some(_) => put(device, handle_of(index as usize, None)),
    }
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetIndex(device: nvmlDevice_t, index: *mut c_uint) -> nvmlReturn_t {
    let (_, i, _) = device_or_return!(device);
    put(index, i as c_uint)
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetUUID(device: nvmlDevice_t, uuid: *mut c_char, length: c_uint) -> nvmlReturn_t {
    let (c, i, mig) = device_or_return!(device);
    let d = &c.devices[i];
    let s = match mig {
        Some(k) => &d.mig[k].uuid,
        None => &d.uuid,
    };
    write_str(s, uuid, length)
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetName(device: nvmlDevice_t, name: *mut c_char, length: c_uint) -> nvmlReturn_t {
    let (c, i, mig) = device_or_return!(device);
    let d = &c.devices[i];
    let s = match mig {
        // What a real driver answers for a MIG device.
        Some(k) => format!("{} MIG {}", d.name, d.mig[k].profile),
        None => d.name.clone(),
    };
    write_str(&s, name, length)
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetMemoryInfo_v2(device: nvmlDevice_t, memory: *mut nvmlMemory_v2_t) -> nvmlReturn_t {
    let (c, i, mig) = device_or_return!(device);
    let d = &c.devices[i];
    let (total, used) = match mig {
        Some(k) => (d.mig[k].memory_mib * MIB, 0),
        None => (d.memory_mib * MIB, d.memory_used_mib * MIB),
    };
    if memory.is_null() {
        return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: a valid pointer to an nvmlMemory_v2_t whose `version` the caller set.
    let version = unsafe { (*memory).version };
    put(memory, nvmlMemory_v2_t { version, total, reserved: 0, free: total.saturating_sub(used), used })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetCudaComputeCapability(device: nvmlDevice_t, major: *mut c_int, minor: *mut c_int) -> nvmlReturn_t {
    let (c, i, _) = device_or_return!(device);
    let (a, b) = c.devices[i].compute_capability;
    match put(major, a) {
        0 => put(minor, b),
        e => e,
    }
}

fn pci_info(bus_id: &str) -> nvmlPciInfo_t {
    let mut info =
        nvmlPciInfo_t { busIdLegacy: [0; 16], domain: 0, bus: 0, device: 0, pciDeviceId: 0x2330_10de, pciSubSystemId: 0, busId: [0; 32] };
    for (dst, src) in info.busId.iter_mut().zip(bus_id.bytes().take(31)) {
        *dst = src as c_char;
    }
    // "00000000:17:00.0": domain, bus, device.
    let mut parts = bus_id.split(':');
    info.domain = parts.next().and_then(|s| u32::from_str_radix(s, 16).ok()).unwrap_or(0);
    info.bus = parts.next().and_then(|s| u32::from_str_radix(s, 16).ok()).unwrap_or(0);
    info.device = parts.next().and_then(|s| s.split('.').next()).and_then(|s| u32::from_str_radix(s, 16).ok()).unwrap_or(0);
    info
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetPciInfo_v3(device: nvmlDevice_t, pci: *mut nvmlPciInfo_t) -> nvmlReturn_t {
    let (c, i, _) = device_or_return!(device);
    put(pci, pci_info(&c.devices[i].pci_bus_id))
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetMinorNumber(device: nvmlDevice_t, minor: *mut c_uint) -> nvmlReturn_t {
    let (c, i, _) = device_or_return!(device);
    put(minor, c.devices[i].minor)
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetNumaNodeId(device: nvmlDevice_t, node: *mut c_uint) -> nvmlReturn_t {
    let (c, i, _) = device_or_return!(device);
    match c.devices[i].numa_node {
        Some(n) if n >= 0 => put(node, n as c_uint),
        _ => nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED,
    }
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetMigMode(device: nvmlDevice_t, current: *mut c_uint, pending: *mut c_uint) -> nvmlReturn_t {
    let (c, i, mig) = device_or_return!(device);
    if mig.is_some() {
        return nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED;
    }
    let on = c_uint::from(!c.devices[i].mig.is_empty());
    match put(current, on) {
        0 => put(pending, on),
        e => e,
    }
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetMaxMigDeviceCount(device: nvmlDevice_t, count: *mut c_uint) -> nvmlReturn_t {
    let (c, i, _) = device_or_return!(device);
    put(count, c.devices[i].mig.len() as c_uint)
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(device: nvmlDevice_t, index: c_uint, mig: *mut nvmlDevice_t) -> nvmlReturn_t {
    let (c, i, _) = device_or_return!(device);
    if index as usize >= c.devices[i].mig.len() {
        return nvmlReturn_enum_NVML_ERROR_NOT_FOUND;
    }
    put(mig, handle_of(i, Some(index as usize)))
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetGpuInstanceId(device: nvmlDevice_t, id: *mut c_uint) -> nvmlReturn_t {
    match device_or_return!(device) {
        (c, i, Some(k)) => put(id, c.devices[i].mig[k].gpu_instance),
        _ => nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED,
    }
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetComputeInstanceId(device: nvmlDevice_t, id: *mut c_uint) -> nvmlReturn_t {
    match device_or_return!(device) {
        (c, i, Some(k)) => put(id, c.devices[i].mig[k].compute_instance),
        _ => nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED,
    }
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetTopologyCommonAncestor(
    a: nvmlDevice_t,
    b: nvmlDevice_t,
    level: *mut nvmlGpuTopologyLevel_t,
) -> nvmlReturn_t {
    let (c, i, _) = device_or_return!(a);
    let (_, j, _) = device_or_return!(b);
    let (x, y) = (&c.devices[i], &c.devices[j]);
    let l = if i == j {
        nvmlGpuLevel_enum_NVML_TOPOLOGY_INTERNAL
    } else if !x.pci_switch.is_empty() && x.pci_switch == y.pci_switch {
        nvmlGpuLevel_enum_NVML_TOPOLOGY_SINGLE
    } else if x.numa_node.is_some() && x.numa_node == y.numa_node {
        nvmlGpuLevel_enum_NVML_TOPOLOGY_NODE
    } else {
        nvmlGpuLevel_enum_NVML_TOPOLOGY_SYSTEM
    };
    put(level, l)
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetNvLinkState(device: nvmlDevice_t, link: c_uint, active: *mut nvmlEnableState_t) -> nvmlReturn_t {
    let (c, i, _) = device_or_return!(device);
    if link >= NVML_NVLINK_MAX_LINKS {
        return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
    }
    let on = (link as usize) < c.devices[i].nvlink_peers.len();
    put(active, if on { nvmlEnableState_enum_NVML_FEATURE_ENABLED } else { nvmlEnableState_enum_NVML_FEATURE_DISABLED })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetNvLinkRemotePciInfo_v2(device: nvmlDevice_t, link: c_uint, pci: *mut nvmlPciInfo_t) -> nvmlReturn_t {
    let (c, i, _) = device_or_return!(device);
    let Some(&peer) = c.devices[i].nvlink_peers.get(link as usize) else { return nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED };
    let Some(p) = c.devices.get(peer as usize) else { return nvmlReturn_enum_NVML_ERROR_UNKNOWN };
    put(pci, pci_info(&p.pci_bus_id))
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetUtilizationRates(device: nvmlDevice_t, util: *mut nvmlUtilization_t) -> nvmlReturn_t {
    let (c, i, _) = device_or_return!(device);
    let d = &c.devices[i];
    let mem = (d.memory_used_mib * 100).checked_div(d.memory_mib).unwrap_or(0) as c_uint;
    put(util, nvmlUtilization_t { gpu: d.utilization, memory: mem })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetPowerUsage(device: nvmlDevice_t, power: *mut c_uint) -> nvmlReturn_t {
    let (c, i, _) = device_or_return!(device);
    put(power, c.devices[i].power_mw)
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetTemperature(device: nvmlDevice_t, _sensor: nvmlTemperatureSensors_t, temp: *mut c_uint) -> nvmlReturn_t {
    let (c, i, _) = device_or_return!(device);
    put(temp, c.devices[i].temperature_c)
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: nvmlDevice_t,
    error_type: nvmlMemoryErrorType_t,
    _counter: nvmlEccCounterType_t,
    count: *mut c_ulonglong,
) -> nvmlReturn_t {
    let (c, i, _) = device_or_return!(device);
    let d = &c.devices[i];
    put(count, if error_type == nvmlMemoryErrorType_enum_NVML_MEMORY_ERROR_TYPE_CORRECTED { d.ecc_corrected } else { d.ecc_uncorrected })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: nvmlDevice_t,
    count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    let (c, i, _) = device_or_return!(device);
    let procs = &c.devices[i].processes;
    if count.is_null() {
        return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: `count` is a valid pointer (checked non-null; NVML's contract).
    let room = unsafe { *count } as usize;
    if infos.is_null() || room < procs.len() {
        put(count, procs.len() as c_uint);
        return if procs.is_empty() { nvmlReturn_enum_NVML_SUCCESS } else { nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE };
    }
    for (k, p) in procs.iter().enumerate() {
        let info = nvmlProcessInfo_t { pid: p.pid, usedGpuMemory: p.used_mib * MIB, gpuInstanceId: u32::MAX, computeInstanceId: u32::MAX };
        // SAFETY: `infos` has room for `*count >= procs.len()` entries.
        unsafe { infos.add(k).write(info) };
    }
    put(count, procs.len() as c_uint)
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetProcessUtilization(
    device: nvmlDevice_t,
    samples: *mut nvmlProcessUtilizationSample_t,
    count: *mut c_uint,
    _last_seen: c_ulonglong,
) -> nvmlReturn_t {
    let (c, i, _) = device_or_return!(device);
    let procs = &c.devices[i].processes;
    if count.is_null() {
        return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
    }
    if procs.is_empty() {
        return nvmlReturn_enum_NVML_ERROR_NOT_FOUND;
    }
    // SAFETY: `count` is a valid pointer (checked non-null; NVML's contract).
    let room = unsafe { *count } as usize;
    if samples.is_null() || room < procs.len() {
        put(count, procs.len() as c_uint);
        return nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE;
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
    for (k, p) in procs.iter().enumerate() {
        let s = nvmlProcessUtilizationSample_t { pid: p.pid, timeStamp: now, smUtil: p.sm_util, memUtil: 0, encUtil: 0, decUtil: 0 };
        // SAFETY: `samples` has room for `*count >= procs.len()` entries.
        unsafe { samples.add(k).write(s) };
    }
    put(count, procs.len() as c_uint)
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetSupportedEventTypes(device: nvmlDevice_t, types: *mut c_ulonglong) -> nvmlReturn_t {
    let _ = device_or_return!(device);
    put(types, u64::from(nvmlEventTypeXidCriticalError | nvmlEventTypeSingleBitEccError | nvmlEventTypeDoubleBitEccError))
}

/// The one event set this library hands out (its address is the handle).
static EVENT_SET: u8 = 0;

#[no_mangle]
pub extern "C" fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) -> nvmlReturn_t {
    put(set, std::ptr::addr_of!(EVENT_SET) as nvmlEventSet_t)
}

#[no_mangle]
pub extern "C" fn nvmlDeviceRegisterEvents(device: nvmlDevice_t, _types: c_ulonglong, _set: nvmlEventSet_t) -> nvmlReturn_t {
    let _ = device_or_return!(device);
    nvmlReturn_enum_NVML_SUCCESS
}

#[no_mangle]
pub extern "C" fn nvmlEventSetFree(_set: nvmlEventSet_t) -> nvmlReturn_t {
    nvmlReturn_enum_NVML_SUCCESS
}

#[no_mangle]
pub extern "C" fn nvmlEventSetWait_v2(_set: nvmlEventSet_t, data: *mut nvmlEventData_t, timeout_ms: c_uint) -> nvmlReturn_t {
    // Polls the file every 20 ms until the timeout, like a driver that has nothing to say.
    let deadline = std::time::Instant::now() + Duration::from_millis(u64::from(timeout_ms));
    loop {
        if let Some(c) = config() {
            let next = DELIVERED.load(Ordering::SeqCst);
            if let Some(x) = c.xids.get(next) {
                DELIVERED.store(next + 1, Ordering::SeqCst);
                let event = nvmlEventData_t {
                    device: handle_of(x.device as usize, None),
                    eventType: u64::from(nvmlEventTypeXidCriticalError),
                    eventData: x.xid,
                    gpuInstanceId: u32::MAX,
                    computeInstanceId: u32::MAX,
                };
                return put(data, event);
            }
        }
        if std::time::Instant::now() >= deadline {
            return nvmlReturn_enum_NVML_ERROR_TIMEOUT;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
