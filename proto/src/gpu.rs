//! The one check of the GPU devices a node registers, shared by the server (which refuses a
//! `RegisterNode` that fails it) and the agent (which runs it on what it is about to register, so
//! the two cannot disagree).
//!
//! Rules, each reported with the field path of the first offending value:
//! * at most [`MAX_GPU_DEVICES`] devices (whole GPUs and MIG instances together): the scheduler
//!   tracks a node's devices in a 64-bit mask;
//! * ids: non-empty, unique, at most [`MAX_ID_LEN`] bytes of letters, digits and `. _ : / -`
//!   (they end up comma separated in `NVIDIA_VISIBLE_DEVICES`); the same shape for `parent_id`
//!   and a non-empty `pci_switch`; `model` at most [`MAX_ID_LEN`] bytes, no control characters;
//! * MIG: `mig_profile` empty (a whole GPU) or a profile name
//!   ([`is_mig_profile`](crate::jobspec::is_mig_profile)); a MIG instance names its physical GPU
//!   in `parent_id`, which is neither itself nor another MIG instance, and the instances of one
//!   physical GPU use at most [`MIG_SLICES_PER_GPU`] compute slices together; a whole GPU has no
//!   `parent_id`;
//! * `nvlink_peers`: at most [`MAX_NVLINK_PEERS`], each the id of another registered device,
//!   none twice;
//! * `numa_node`: a negative number (what sysfs and NVML report when they do not know) is
//!   normalised to absent (unknown), not refused.

use std::collections::{BTreeMap, BTreeSet};

use crate::jobspec::is_mig_profile;
use crate::v1::GpuDevice;

/// Most devices (whole GPUs and MIG instances together) a node may register.
pub const MAX_GPU_DEVICES: usize = 64;
/// Compute slices of one physical GPU that its MIG instances may use together.
pub const MIG_SLICES_PER_GPU: u32 = 7;
/// Most NVLink peers one device may list: every other device of a full node.
pub const MAX_NVLINK_PEERS: usize = MAX_GPU_DEVICES - 1;
/// Device nodes one device may name (a MIG instance: its parent's node and two capabilities).
pub const MAX_DEVICE_PATHS: usize = 8;
/// The longest device node path.
pub const MAX_PATH_LEN: usize = 256;
/// The longest health description.
pub const MAX_HEALTH_LEN: usize = 512;
/// Longest device id, parent id, PCIe switch or model name, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// The characters of an id, for messages.
const ID_CHARS: &str = "letters, digits, '.', '_', ':', '/' or '-'";

/// A registered GPU device list that breaks a rule: where and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct GpuDeviceError {
    /// Field path such as `node.resources.gpus[3].nvlink_peers[0]`.
    pub path: String,
    /// What is wrong, with the offending value.
    pub message: String,
}

/// The compute slices of a MIG profile (`3g.40gb` → 3); None when `profile` is not a MIG
/// profile name.
pub fn mig_profile_slices(profile: &str) -> Option<u32> {
    if !is_mig_profile(profile) {
        return None;
    }
    profile.split_once("g.").and_then(|(n, _)| n.parse().ok())
}

/// Checks the GPU devices of one node (`path` names the list in errors, e.g.
/// `node.resources.gpus`) and normalises a negative `numa_node` to `None`. Returns the first
/// problem found; the devices are left as they were when it fails. Linear in the number of
/// devices and peers: the count and each peer list are bounded before anything is walked.
pub fn check_gpu_devices(path: &str, devices: &mut [GpuDevice]) -> Result<(), GpuDeviceError> {
    let err = |at: String, message: String| Err(GpuDeviceError { path: at, message });
    if devices.len() > MAX_GPU_DEVICES {
        return err(
            path.to_string(),
            format!("{} devices (GPUs and MIG instances); a node may register at most {MAX_GPU_DEVICES}", devices.len()),
        );
    }
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, d) in devices.iter().enumerate() {
        let at = |field: &str| format!("{path}[{i}].{field}");
        if !is_id(&d.id) {
            return err(at("id"), format!("must be 1 to {MAX_ID_LEN} {ID_CHARS}, found {:?}", d.id));
        }
        if let Some(first) = index.insert(d.id.as_str(), i) {
            return err(at("id"), format!("duplicate id {:?} (also {path}[{first}])", d.id));
        }
        if d.model.len() > MAX_ID_LEN || d.model.chars().any(char::is_control) {
            let message = format!("must be at most {MAX_ID_LEN} bytes without control characters, found {:?}", d.model);
            return err(at("model"), message);
        }
        if !d.pci_switch.is_empty() && !is_id(&d.pci_switch) {
            return err(at("pci_switch"), format!("must be empty or 1 to {MAX_ID_LEN} {ID_CHARS}, found {:?}", d.pci_switch));
        }
        if d.nvlink_peers.len() > MAX_NVLINK_PEERS {
            return err(at("nvlink_peers"), format!("lists {} peers; at most {MAX_NVLINK_PEERS}", d.nvlink_peers.len()));
        }
        if d.device_paths.len() > MAX_DEVICE_PATHS {
            return err(at("device_paths"), format!("lists {} device nodes; at most {MAX_DEVICE_PATHS}", d.device_paths.len()));
        }
        for (k, p) in d.device_paths.iter().enumerate() {
            let bad = !p.starts_with('/') || p.len() > MAX_PATH_LEN || p.chars().any(char::is_control) || p.split('/').any(|c| c == "..");
            if bad {
                let message = format!("must be an absolute path of at most {MAX_PATH_LEN} bytes without `..`, found {p:?}");
                return err(format!("{path}[{i}].device_paths[{k}]"), message);
            }
        }
        for (field, v) in [("compute_capability", &d.compute_capability), ("pci_bus_id", &d.pci_bus_id)] {
            if v.len() > MAX_ID_LEN || v.chars().any(char::is_control) {
                return err(at(field), format!("must be at most {MAX_ID_LEN} bytes without control characters, found {v:?}"));
            }
        }
        if d.health.len() > MAX_HEALTH_LEN || d.health.chars().any(char::is_control) {
            return err(at("health"), format!("must be at most {MAX_HEALTH_LEN} bytes without control characters"));
        }
    }
    // Slices in use per physical GPU, and the path of its first instance.
    let mut slices: BTreeMap<&str, (u32, usize)> = BTreeMap::new();
    for (i, d) in devices.iter().enumerate() {
        let at = |field: &str| format!("{path}[{i}].{field}");
        if d.mig_profile.is_empty() {
            if !d.parent_id.is_empty() {
                let message = format!("is set ({:?}) on a whole GPU; only a MIG instance has a parent", d.parent_id);
                return err(at("parent_id"), message);
            }
        } else {
            let Some(n) = mig_profile_slices(&d.mig_profile) else {
                return err(
                    at("mig_profile"),
                    format!("must be empty or a MIG profile such as \"1g.10gb\" or \"3g.40gb+me\", found {:?}", d.mig_profile),
                );
            };
            if d.parent_id.is_empty() {
                return err(at("parent_id"), "is required on a MIG instance: the id of its physical GPU".to_string());
            }
            if !is_id(&d.parent_id) {
                return err(at("parent_id"), format!("must be 1 to {MAX_ID_LEN} {ID_CHARS}, found {:?}", d.parent_id));
            }
            if d.parent_id == d.id {
                return err(at("parent_id"), format!("{:?} is the instance itself", d.parent_id));
            }
            if let Some(&j) = index.get(d.parent_id.as_str()) {
                if !devices[j].mig_profile.is_empty() {
                    return err(at("parent_id"), format!("{:?} is a MIG instance ({path}[{j}]), not a physical GPU", d.parent_id));
                }
            }
            let used = slices.entry(d.parent_id.as_str()).or_insert((0, i));
            // At most 64 instances of at most 9999 slices each: no overflow.
            used.0 += n;
            if used.0 > MIG_SLICES_PER_GPU {
                return err(
                    at("mig_profile"),
                    format!(
                        "the MIG instances of GPU {:?} ({path}[{}] on) use {} compute slices; a GPU has {MIG_SLICES_PER_GPU}",
                        d.parent_id, used.1, used.0
                    ),
                );
            }
        }
        let mut peers = BTreeSet::new();
        for (k, p) in d.nvlink_peers.iter().enumerate() {
            let at = format!("{path}[{i}].nvlink_peers[{k}]");
            if *p == d.id {
                return err(at, format!("{p:?} is the device itself"));
            }
            if !peers.insert(p.as_str()) {
                return err(at, format!("{p:?} is listed twice"));
            }
            if !index.contains_key(p.as_str()) {
                return err(at, format!("no registered device has the id {p:?}"));
            }
        }
    }
    for d in devices.iter_mut() {
        if d.numa_node.is_some_and(|n| n < 0) {
            d.numa_node = None;
        }
    }
    Ok(())
}

/// A device id's shape: 1 to [`MAX_ID_LEN`] of `[A-Za-z0-9._:/-]`.
fn is_id(s: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "node.resources.gpus";

    fn gpu(id: &str) -> GpuDevice {
        GpuDevice { id: id.into(), model: "A100-SXM4-80GB".into(), memory_mib: 81_920, ..Default::default() }
    }

    fn mig(id: &str, parent: &str, profile: &str) -> GpuDevice {
        GpuDevice { mig_profile: profile.into(), parent_id: parent.into(), memory_mib: 40_960, ..gpu(id) }
    }

    fn linked(id: &str, peers: &[&str]) -> GpuDevice {
        GpuDevice { nvlink_peers: peers.iter().map(|p| p.to_string()).collect(), ..gpu(id) }
    }

    /// The error for `devices`, as `(path, message)`; panics when they pass.
    fn refused(mut devices: Vec<GpuDevice>) -> (String, String) {
        let before = devices.clone();
        match check_gpu_devices(P, &mut devices) {
            Ok(()) => panic!("accepted {before:?}"),
            Err(e) => {
                assert_eq!(devices, before, "a refused list is left as it was");
                (e.path, e.message)
            }
        }
    }

    #[test]
    fn a_well_formed_node_passes_unchanged() {
        let mut devices = vec![
            GpuDevice { numa_node: Some(0), pci_switch: "0000:3a:00.0".into(), ..linked("GPU-0", &["GPU-1"]) },
            GpuDevice { numa_node: Some(1), ..linked("GPU-1", &["GPU-0"]) },
            // GPU-2 is split; its parent need not be registered, or may be (GPU-3 below).
            mig("MIG-GPU-2/1/0", "GPU-2", "3g.40gb"),
            mig("MIG-GPU-2/2/0", "GPU-2", "3g.40gb"),
            mig("MIG-GPU-2/3/0", "GPU-2", "1g.10gb+me"),
            gpu("GPU-3"),
            mig("GPU-3-mig-0", "GPU-3", "7g.80gb"),
        ];
        let before = devices.clone();
        assert_eq!(check_gpu_devices(P, &mut devices), Ok(()));
        assert_eq!(devices, before);
        assert_eq!(check_gpu_devices(P, &mut []), Ok(()));
    }

    #[test]
    fn at_most_64_devices() {
        let mut devices: Vec<GpuDevice> = (0..64).map(|i| gpu(&format!("g{i}"))).collect();
        assert_eq!(check_gpu_devices(P, &mut devices), Ok(()));
        devices.push(gpu("g64"));
        let (path, message) = refused(devices);
        assert_eq!(path, P);
        assert!(message.starts_with("65 devices"), "{message}");
    }

    #[test]
    fn ids_are_non_empty_well_formed_and_unique() {
        assert_eq!(refused(vec![gpu("a"), gpu("")]).0, "node.resources.gpus[1].id");
        assert_eq!(refused(vec![gpu("a,b")]).0, "node.resources.gpus[0].id");
        assert_eq!(refused(vec![gpu(&"x".repeat(129))]).0, "node.resources.gpus[0].id");
        let (path, message) = refused(vec![gpu("a"), gpu("b"), gpu("a")]);
        assert_eq!(path, "node.resources.gpus[2].id");
        assert_eq!(message, "duplicate id \"a\" (also node.resources.gpus[0])");
    }

    #[test]
    fn model_and_pci_switch_are_bounded() {
        let long = GpuDevice { model: "m".repeat(129), ..gpu("a") };
        assert_eq!(refused(vec![long]).0, "node.resources.gpus[0].model");
        let control = GpuDevice { model: "A100\n".into(), ..gpu("a") };
        assert_eq!(refused(vec![control]).0, "node.resources.gpus[0].model");
        let switch = GpuDevice { pci_switch: "sw 0".into(), ..gpu("a") };
        assert_eq!(refused(vec![gpu("b"), switch]).0, "node.resources.gpus[1].pci_switch");
    }

    #[test]
    fn mig_profiles_must_be_profile_names() {
        let (path, message) = refused(vec![mig("i0", "g", "3g.40GB")]);
        assert_eq!(path, "node.resources.gpus[0].mig_profile");
        assert!(message.ends_with("found \"3g.40GB\""), "{message}");
        // The review's overflow case: too many digits is not a profile at all.
        assert_eq!(refused(vec![mig("i0", "g", "4294967295g.1gb")]).0, "node.resources.gpus[0].mig_profile");
    }

    #[test]
    fn at_most_7_slices_per_physical_gpu() {
        let mut ok = vec![mig("i0", "g", "3g.40gb"), mig("i1", "g", "4g.40gb"), mig("j0", "h", "7g.80gb")];
        assert_eq!(check_gpu_devices(P, &mut ok), Ok(()));
        let (path, message) = refused(vec![mig("i0", "g", "3g.40gb"), mig("j0", "h", "7g.80gb"), mig("i1", "g", "5g.40gb")]);
        assert_eq!(path, "node.resources.gpus[2].mig_profile");
        assert_eq!(message, "the MIG instances of GPU \"g\" (node.resources.gpus[0] on) use 8 compute slices; a GPU has 7");
        assert_eq!(refused(vec![mig("i0", "g", "8g.80gb")]).0, "node.resources.gpus[0].mig_profile");
    }

    #[test]
    fn parent_id_names_a_physical_gpu_only_on_instances() {
        let (path, message) = refused(vec![mig("i0", "i0", "1g.10gb")]);
        assert_eq!((path.as_str(), message.as_str()), ("node.resources.gpus[0].parent_id", "\"i0\" is the instance itself"));
        let (path, message) = refused(vec![mig("i0", "g", "1g.10gb"), mig("i1", "i0", "1g.10gb")]);
        assert_eq!(path, "node.resources.gpus[1].parent_id");
        assert!(message.contains("is a MIG instance (node.resources.gpus[0])"), "{message}");
        // The instance named as a parent may come after the one naming it.
        assert_eq!(refused(vec![mig("i1", "i0", "1g.10gb"), mig("i0", "g", "1g.10gb")]).0, "node.resources.gpus[0].parent_id");
        assert_eq!(refused(vec![mig("i0", "", "1g.10gb")]).0, "node.resources.gpus[0].parent_id");
        assert_eq!(refused(vec![mig("i0", "g,h", "1g.10gb")]).0, "node.resources.gpus[0].parent_id");
        let whole = GpuDevice { parent_id: "g".into(), ..gpu("a") };
        assert_eq!(refused(vec![whole]).0, "node.resources.gpus[0].parent_id");
    }

    #[test]
    fn nvlink_peers_are_known_unique_and_not_self() {
        let (path, message) = refused(vec![linked("a", &["b"]), linked("b", &["a", "c"])]);
        assert_eq!(path, "node.resources.gpus[1].nvlink_peers[1]");
        assert_eq!(message, "no registered device has the id \"c\"");
        assert_eq!(refused(vec![linked("a", &["b", "b"]), gpu("b")]).0, "node.resources.gpus[0].nvlink_peers[1]");
        assert_eq!(refused(vec![linked("a", &["a"])]).0, "node.resources.gpus[0].nvlink_peers[0]");
        // 63 peers is a full node; 64 names cannot all be other devices, and are refused unread.
        let ids: Vec<String> = (0..64).map(|i| format!("g{i}")).collect();
        let peers = |skip: usize| ids.iter().enumerate().filter(|&(j, _)| j != skip).map(|(_, p)| p.clone()).collect::<Vec<_>>();
        let mut full: Vec<GpuDevice> = (0..64).map(|i| GpuDevice { nvlink_peers: peers(i), ..gpu(&ids[i]) }).collect();
        assert_eq!(check_gpu_devices(P, &mut full), Ok(()));
        let huge = GpuDevice { nvlink_peers: vec!["b".into(); 100_000], ..gpu("a") };
        let (path, message) = refused(vec![huge, gpu("b")]);
        assert_eq!((path.as_str(), message.as_str()), ("node.resources.gpus[0].nvlink_peers", "lists 100000 peers; at most 63"));
    }

    #[test]
    fn a_negative_numa_node_means_unknown() {
        let mut devices = vec![
            GpuDevice { numa_node: Some(-1), ..gpu("a") },
            GpuDevice { numa_node: Some(0), ..gpu("b") },
            GpuDevice { numa_node: Some(i32::MIN), ..gpu("c") },
            gpu("d"),
        ];
        assert_eq!(check_gpu_devices(P, &mut devices), Ok(()));
        let numa: Vec<Option<i32>> = devices.iter().map(|d| d.numa_node).collect();
        assert_eq!(numa, [None, Some(0), None, None]);
    }

    #[test]
    fn slices_of_profiles() {
        assert_eq!(mig_profile_slices("3g.40gb"), Some(3));
        assert_eq!(mig_profile_slices("1g.10gb+me"), Some(1));
        assert_eq!(mig_profile_slices("9999g.1gb"), Some(9999));
        assert_eq!(mig_profile_slices("odd"), None);
        assert_eq!(mig_profile_slices(""), None);
    }

    #[test]
    fn errors_read_path_then_message() {
        let e = GpuDeviceError { path: "node.resources.gpus[0].id".into(), message: "duplicate".into() };
        assert_eq!(e.to_string(), "node.resources.gpus[0].id: duplicate");
    }
}
