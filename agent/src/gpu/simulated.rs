//! Simulated GPUs: the node's devices declared in a file instead of probed.
//!
//! The agent has no NVML probe: the only GPUs it registers are *simulated* ones, declared in a
//! JSON file (`--simulated-gpus FILE`), either as an explicit device list or as a short
//! generator. Every device built here has `simulated = true` and an id starting with `sim-`, and
//! the node gets the attribute `gpu.simulated = "true"`. The file is checked as a whole before
//! the agent starts; each problem is reported as `FILE:LINE:COLUMN: field.path: message`.
//!
//! ```json
//! {"devices": [{"id": "sim-gpu-0", "model": "A100-SXM4-80GB", "memory_mib": 81920,
//!               "nvlink_peers": ["sim-gpu-1"], "pci_switch": "sw0", "numa_node": 0,
//!               "mig": ["3g.40gb", "3g.40gb"]}, ...]}
//! {"generate": {"count": 8, "model": "H100-SXM5-80GB", "memory_mib": 81920,
//!               "nvlink": "islands-of-4", "numa_nodes": 2, "pci_switches": 4,
//!               "mig": {"count": 1, "profiles": ["3g.40gb", "3g.40gb"]}}}
//! ```
//!
//! A device with `mig` is registered as its MIG instances only (`<id>-mig-<k>`, `parent_id` =
//! the GPU, memory from the profile's `<N>gb`, same PCIe switch and NUMA node, no NVLink), since
//! a GPU in MIG mode cannot be handed out whole; NVLink peers that are split this way are left
//! out of the other devices' `nvlink_peers`.
//!
//! [`SimulatedGpus`] is the [`GpuSource`] over such a list.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use mlp_proto::v1::GpuDevice;
use serde::Deserialize;

use super::{GpuError, GpuSource};

/// Most devices (whole GPUs and MIG instances together) a node may register: the scheduler
/// tracks a node's devices in a 64-bit mask (the server's limit, [`mlp_proto::gpu::MAX_GPU_DEVICES`]).
pub const MAX_DEVICES: usize = mlp_proto::gpu::MAX_GPU_DEVICES;
/// Compute slices of one GPU that its MIG instances may use together.
pub const MIG_SLICES_PER_GPU: u64 = mlp_proto::gpu::MIG_SLICES_PER_GPU as u64;
/// Every simulated device id starts with this.
pub const ID_PREFIX: &str = "sim-";
/// Largest device memory accepted (16 TiB), to catch unit mistakes.
const MAX_MEMORY_MIB: u64 = 16 * 1024 * 1024;
/// Largest NUMA node number accepted.
const MAX_NUMA_NODE: i32 = 1023;

/// One problem in a simulated-GPU file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file as given.
    pub file: String,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    /// Field path such as `devices[2].nvlink_peers[0]`; empty for syntax errors.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Why a simulated-GPU file was refused.
#[derive(Debug, thiserror::Error)]
pub enum GpuSimError {
    /// The file could not be read.
    #[error("{file}: cannot read the simulated GPU file: {source}")]
    Read {
        /// The file as given.
        file: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid; every problem found, one per line.
    #[error("{}", join_lines(.0))]
    Invalid(Vec<Problem>),
}

fn join_lines(problems: &[Problem]) -> String {
    problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}

/// The file: exactly one of `devices` and `generate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    #[serde(default)]
    devices: Option<Vec<DeviceSpec>>,
    #[serde(default)]
    generate: Option<Generate>,
}

/// One physical GPU of an explicit list.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceSpec {
    /// Default `sim-gpu-<index>`.
    #[serde(default)]
    id: Option<String>,
    model: String,
    memory_mib: u64,
    #[serde(default)]
    nvlink_peers: Vec<String>,
    #[serde(default)]
    pci_switch: String,
    #[serde(default)]
    numa_node: Option<i32>,
    /// MIG profiles this GPU is split into; empty = a whole GPU.
    #[serde(default)]
    mig: Vec<String>,
}

/// The short form: `count` identical GPUs with a regular topology.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Generate {
    count: u64,
    model: String,
    memory_mib: u64,
    /// `all`, `pairs`, `islands-of-<n>` or `none` (default).
    #[serde(default)]
    nvlink: Option<String>,
    /// Devices spread over this many NUMA nodes in contiguous blocks; absent = unknown.
    #[serde(default)]
    numa_nodes: Option<u64>,
    /// Devices spread over this many PCIe switches in contiguous blocks; absent = unknown.
    #[serde(default)]
    pci_switches: Option<u64>,
    /// The last `count` GPUs are split into `profiles`.
    #[serde(default)]
    mig: Option<GenerateMig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateMig {
    count: u64,
    profiles: Vec<String>,
}

/// Reads, checks and expands a simulated-GPU file into the devices the node registers.
pub fn load(path: &Path) -> Result<Vec<GpuDevice>, GpuSimError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| GpuSimError::Read { file: file.clone(), source })?;
    parse(&file, &text)
}

/// Checks and expands the text of a simulated-GPU file; `file` names it in problems.
pub fn parse(file: &str, text: &str) -> Result<Vec<GpuDevice>, GpuSimError> {
    let spec: SpecFile = serde_json::from_str(text).map_err(|e| {
        let msg = e.to_string();
        // serde_json appends " at line L column C"; the position goes in front instead.
        let msg = match msg.rfind(" at line ") {
            Some(i) => msg[..i].to_string(),
            None => msg,
        };
        GpuSimError::Invalid(vec![Problem {
            file: file.to_string(),
            line: e.line().max(1),
            column: e.column().max(1),
            path: String::new(),
            message: msg,
        }])
    })?;
    let mut check = Checker { file, positions: Positions::index(text), problems: Vec::new() };
    let devices = match (spec.devices, spec.generate) {
        (Some(_), Some(_)) => {
            check.push("generate", "give either `devices` or `generate`, not both");
            Vec::new()
        }
        (None, None) => {
            check.push("", "expected `devices` (a list of GPUs) or `generate` (a count and a model)");
            Vec::new()
        }
        (Some(list), None) => {
            if list.is_empty() {
                check.push("devices", "declares no GPU; leave --simulated-gpus out instead");
            }
            check.devices(&list, "devices")
        }
        (None, Some(g)) => match check.generate(&g) {
            Some(list) => check.devices(&list, "generate"),
            None => Vec::new(),
        },
    };
    if !check.problems.is_empty() {
        return Err(GpuSimError::Invalid(check.problems));
    }
    // The server's own check of what it is sent: the rules above are stricter, so this only
    // fails when the two disagree, which must show here rather than as a refused registration.
    let mut devices = devices;
    if let Err(e) = mlp_proto::gpu::check_gpu_devices("registered devices", &mut devices) {
        check.push("", format!("the devices built from this file fail the server's check: {e}"));
        return Err(GpuSimError::Invalid(check.problems));
    }
    Ok(devices)
}

struct Checker<'a> {
    file: &'a str,
    positions: Positions,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn push(&mut self, path: &str, message: impl Into<String>) {
        let (line, column) = self.positions.of(path);
        self.problems.push(Problem { file: self.file.to_string(), line, column, path: path.to_string(), message: message.into() });
    }

    /// The generator's parameters, checked, as an explicit list (None when they are wrong).
    fn generate(&mut self, g: &Generate) -> Option<Vec<DeviceSpec>> {
        let before = self.problems.len();
        if g.count == 0 || g.count > MAX_DEVICES as u64 {
            self.push("generate.count", format!("must be between 1 and {MAX_DEVICES}, found {}", g.count));
        }
        let count = g.count.clamp(1, MAX_DEVICES as u64);
        let island = match g.nvlink.as_deref() {
            None | Some("none") => Some(1),
            Some("all") => Some(count),
            Some("pairs") => Some(2),
            Some(other) => match other.strip_prefix("islands-of-").and_then(|n| n.parse::<u64>().ok()) {
                Some(n) if n >= 2 => Some(n),
                _ => {
                    self.push(
                        "generate.nvlink",
                        format!("must be \"all\", \"pairs\", \"islands-of-<n>\" (n ≥ 2) or \"none\", found {other:?}"),
                    );
                    None
                }
            },
        };
        if let Some(n) = island {
            if !count.is_multiple_of(n) {
                self.push("generate.nvlink", format!("islands of {n} do not divide {count} GPUs"));
            }
        }
        for (key, value) in [("numa_nodes", g.numa_nodes), ("pci_switches", g.pci_switches)] {
            if let Some(v) = value {
                if v == 0 || v > count {
                    self.push(&format!("generate.{key}"), format!("must be between 1 and the GPU count {count}, found {v}"));
                }
            }
        }
        let mut mig_from = count;
        if let Some(m) = &g.mig {
            if m.count == 0 || m.count > count {
                self.push("generate.mig.count", format!("must be between 1 and the GPU count {count}, found {}", m.count));
            } else {
                mig_from = count - m.count;
            }
            if m.profiles.is_empty() {
                self.push("generate.mig.profiles", "lists no MIG profile");
            }
            self.mig(&m.profiles, g.memory_mib, "generate.mig.profiles");
        }
        if self.problems.len() > before {
            return None;
        }
        let island = island.unwrap_or(1);
        let id = |i: u64| format!("{ID_PREFIX}gpu-{i}");
        let list = (0..count)
            .map(|i| {
                let block = i / island;
                DeviceSpec {
                    id: Some(id(i)),
                    model: g.model.clone(),
                    memory_mib: g.memory_mib,
                    nvlink_peers: (block * island..(block + 1) * island).filter(|&j| j != i).map(id).collect(),
                    pci_switch: g.pci_switches.map(|s| format!("{ID_PREFIX}pcie-{}", i * s / count)).unwrap_or_default(),
                    numa_node: g.numa_nodes.and_then(|n| i32::try_from(i * n / count).ok()),
                    mig: match &g.mig {
                        Some(m) if i >= mig_from => m.profiles.clone(),
                        _ => Vec::new(),
                    },
                }
            })
            .collect();
        Some(list)
    }

    /// Checks MIG profiles of one GPU: names, at most 7 slices, memory within the GPU's.
    fn mig(&mut self, profiles: &[String], gpu_memory_mib: u64, path: &str) {
        let mut slices = 0;
        let mut memory = 0;
        for (k, p) in profiles.iter().enumerate() {
            match mig_shape(p) {
                Some((s, mib)) => {
                    slices += s;
                    memory += mib;
                }
                None => self.push(
                    &format!("{path}[{k}]"),
                    format!("must be a MIG profile such as \"1g.10gb\", \"3g.40gb\" or \"1g.10gb+me\", found {p:?}"),
                ),
            }
        }
        if slices > MIG_SLICES_PER_GPU {
            self.push(path, format!("MIG instances use {slices} compute slices; a GPU has {MIG_SLICES_PER_GPU}"));
        }
        if memory > gpu_memory_mib {
            self.push(path, format!("MIG instances hold {memory} MiB; the GPU has {gpu_memory_mib} MiB"));
        }
    }

    /// Checks physical GPUs (`path` is where problems point: `devices` or `generate`) and
    /// expands them into the registered devices.
    fn devices(&mut self, list: &[DeviceSpec], path: &str) -> Vec<GpuDevice> {
        let explicit = path == "devices";
        // Problems in a generated list point at the generator's fields.
        let at = |i: usize, field: &str| if explicit { format!("devices[{i}].{field}") } else { format!("generate.{field}") };
        let ids: Vec<String> =
            list.iter().enumerate().map(|(i, d)| d.id.clone().unwrap_or_else(|| format!("{ID_PREFIX}gpu-{i}"))).collect();
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        let mut registered = 0usize;
        for (i, (d, id)) in list.iter().zip(&ids).enumerate() {
            if !is_device_id(id) {
                self.push(
                    &at(i, "id"),
                    format!("must start with {ID_PREFIX:?} (it is a simulated device) and hold only letters, digits, '.', '_' and '-' (at most 64), found {id:?}"),
                );
            }
            if let Some(first) = seen.insert(id, i) {
                self.push(&at(i, "id"), format!("duplicate id {id:?} (also devices[{first}])"));
            }
            if d.model.trim().is_empty() || d.model.len() > 128 || d.model.chars().any(char::is_control) {
                self.push(&at(i, "model"), format!("must be a model name of 1 to 128 printable characters, found {:?}", d.model));
            }
            if d.memory_mib == 0 || d.memory_mib > MAX_MEMORY_MIB {
                self.push(&at(i, "memory_mib"), format!("must be between 1 and {MAX_MEMORY_MIB} MiB, found {}", d.memory_mib));
            }
            if !d.pci_switch.is_empty() && !is_device_id_chars(&d.pci_switch) {
                self.push(
                    &at(i, "pci_switch"),
                    format!("must hold only letters, digits, '.', '_', ':' and '-' (at most 64), found {:?}", d.pci_switch),
                );
            }
            if let Some(n) = d.numa_node {
                if !(0..=MAX_NUMA_NODE).contains(&n) {
                    self.push(&at(i, "numa_node"), format!("must be between 0 and {MAX_NUMA_NODE}, found {n}"));
                }
            }
            if explicit {
                self.mig(&d.mig, d.memory_mib, &at(i, "mig"));
            }
            registered += d.mig.len().max(1);
        }
        // MIG instance ids must not collide with declared ids.
        for (i, (d, id)) in list.iter().zip(&ids).enumerate() {
            for k in 0..d.mig.len() {
                let mig_id = mig_id(id, k);
                if let Some(&j) = seen.get(mig_id.as_str()) {
                    self.push(&at(j, "id"), format!("{mig_id:?} is also the id of a MIG instance of devices[{i}]"));
                }
            }
        }
        for (i, (d, id)) in list.iter().zip(&ids).enumerate() {
            let mut peers = BTreeSet::new();
            for (k, p) in d.nvlink_peers.iter().enumerate() {
                let ppath = if explicit { format!("devices[{i}].nvlink_peers[{k}]") } else { "generate.nvlink".into() };
                if p == id {
                    self.push(&ppath, format!("{p:?} is the device itself"));
                } else if !peers.insert(p.as_str()) {
                    self.push(&ppath, format!("{p:?} is listed twice"));
                } else {
                    match seen.get(p.as_str()) {
                        None => self.push(&ppath, format!("no device has the id {p:?}")),
                        Some(&j) if !list[j].nvlink_peers.iter().any(|q| q == id) => {
                            self.push(&ppath, format!("the link is one-way: {p:?} (devices[{j}]) does not list {id:?} in its nvlink_peers"))
                        }
                        Some(_) => {}
                    }
                }
            }
        }
        if registered > MAX_DEVICES {
            self.push(path, format!("registers {registered} devices (GPUs and MIG instances); a node may have at most {MAX_DEVICES}"));
        }
        if !self.problems.is_empty() {
            return Vec::new();
        }
        let split: BTreeSet<&str> = list.iter().zip(&ids).filter(|(d, _)| !d.mig.is_empty()).map(|(_, id)| id.as_str()).collect();
        let mut out = Vec::with_capacity(registered);
        for (d, id) in list.iter().zip(&ids) {
            if d.mig.is_empty() {
                out.push(GpuDevice {
                    id: id.clone(),
                    model: d.model.clone(),
                    memory_mib: d.memory_mib,
                    simulated: true,
                    nvlink_peers: d.nvlink_peers.iter().filter(|p| !split.contains(p.as_str())).cloned().collect(),
                    pci_switch: d.pci_switch.clone(),
                    numa_node: d.numa_node,
                    ..Default::default()
                });
                continue;
            }
            for (k, p) in d.mig.iter().enumerate() {
                out.push(GpuDevice {
                    id: mig_id(id, k),
                    model: d.model.clone(),
                    memory_mib: mig_shape(p).map_or(0, |(_, mib)| mib),
                    simulated: true,
                    mig_profile: p.clone(),
                    parent_id: id.clone(),
                    nvlink_peers: Vec::new(),
                    pci_switch: d.pci_switch.clone(),
                    numa_node: d.numa_node,
                    ..Default::default()
                });
            }
        }
        out
    }
}

/// The id of MIG instance `k` of GPU `parent`.
pub fn mig_id(parent: &str, k: usize) -> String {
    format!("{parent}-mig-{k}")
}

/// A MIG profile's compute slices and memory in MiB (`3g.40gb` → (3, 40960)); None when the
/// name is not a MIG profile.
pub fn mig_shape(profile: &str) -> Option<(u64, u64)> {
    if !mlp_proto::jobspec::is_mig_profile(profile) {
        return None;
    }
    let base = profile.split('+').next()?;
    let (slices, gb) = base.split_once("g.")?;
    let gb = gb.strip_suffix("gb")?;
    Some((slices.parse().ok()?, gb.parse::<u64>().ok()?.checked_mul(1024)?))
}

fn is_device_id_chars(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

fn is_device_id(s: &str) -> bool {
    s.starts_with(ID_PREFIX) && s.len() > ID_PREFIX.len() && is_device_id_chars(s) && !s.contains(':')
}

/// The simulated GPUs of `--simulated-gpus FILE` ([`load`]) or handed over directly, as a
/// [`GpuSource`].
#[derive(Debug, Clone, Default)]
pub struct SimulatedGpus {
    devices: Vec<GpuDevice>,
}

impl SimulatedGpus {
    /// A source that registers exactly these devices (checked by [`GpuSource::devices`]).
    pub fn new(devices: Vec<GpuDevice>) -> Self {
        SimulatedGpus { devices }
    }
}

impl GpuSource for SimulatedGpus {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn devices(&self) -> Result<Vec<GpuDevice>, GpuError> {
        check_devices(&self.devices).map_err(|reason| GpuError::Invalid { source_name: self.name(), reason })?;
        Ok(self.devices.clone())
    }
}

/// Checks devices handed to the agent directly (not through [`load`]): unique, well-formed
/// ids, at most [`MAX_DEVICES`], all simulated (the agent cannot drive real GPUs yet), and
/// everything the server checks on registration ([`mlp_proto::gpu::check_gpu_devices`]).
pub fn check_devices(devices: &[GpuDevice]) -> Result<(), String> {
    if devices.len() > MAX_DEVICES {
        return Err(format!("{} GPU devices; a node may have at most {MAX_DEVICES}", devices.len()));
    }
    let mut seen = BTreeSet::new();
    for d in devices {
        if !d.simulated {
            return Err(format!("GPU {:?} is not marked simulated; only simulated GPUs are supported", d.id));
        }
        if !is_device_id_chars(&d.id) {
            return Err(format!("GPU id {:?} is not a device id", d.id));
        }
        if !seen.insert(d.id.as_str()) {
            return Err(format!("duplicate GPU id {:?}", d.id));
        }
    }
    // A copy: the check normalises a negative NUMA node, which the server does again anyway.
    mlp_proto::gpu::check_gpu_devices("simulated_gpus", &mut devices.to_vec()).map_err(|e| e.to_string())
}

/// Where each value of a JSON text starts, by field path (`devices[0].id`), so that problems
/// found after deserializing can point into the file. The text has been accepted by
/// `serde_json` already; on anything unexpected the index just stops.
struct Positions {
    at: BTreeMap<String, (usize, usize)>,
}

impl Positions {
    fn index(text: &str) -> Positions {
        let mut s = Scanner { chars: text.chars().collect(), i: 0, line: 1, column: 1, at: BTreeMap::new() };
        s.value(String::new(), 0);
        Positions { at: s.at }
    }

    /// The position of `path`, else of its closest recorded parent, else 1:1.
    fn of(&self, path: &str) -> (usize, usize) {
        let mut p = path;
        loop {
            if let Some(&pos) = self.at.get(p) {
                return pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return self.at.get("").copied().unwrap_or((1, 1)),
            }
        }
    }
}

struct Scanner {
    chars: Vec<char>,
    i: usize,
    line: usize,
    column: usize,
    at: BTreeMap<String, (usize, usize)>,
}

impl Scanner {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.i).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.i += 1;
        if c == '\n' {
            self.line += 1;
            self.column = 1;
        } else {
            self.column += 1;
        }
        Some(c)
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.bump();
        }
    }

    /// Returns false when the text ends or is not as expected.
    fn value(&mut self, path: String, depth: usize) -> bool {
        self.skip_ws();
        if depth > 128 {
            return false;
        }
        self.at.insert(path.clone(), (self.line, self.column));
        match self.peek() {
            None => false,
            Some('{') => {
                self.bump();
                loop {
                    self.skip_ws();
                    match self.peek() {
                        Some('}') => {
                            self.bump();
                            return true;
                        }
                        Some(',') => {
                            self.bump();
                        }
                        Some('"') => {
                            let key = self.string();
                            self.skip_ws();
                            if self.bump() != Some(':') {
                                return false;
                            }
                            let child = if path.is_empty() { key } else { format!("{path}.{key}") };
                            if !self.value(child, depth + 1) {
                                return false;
                            }
                        }
                        _ => return false,
                    }
                }
            }
            Some('[') => {
                self.bump();
                let mut k = 0;
                loop {
                    self.skip_ws();
                    match self.peek() {
                        Some(']') => {
                            self.bump();
                            return true;
                        }
                        Some(',') => {
                            self.bump();
                        }
                        Some(_) => {
                            if !self.value(format!("{path}[{k}]"), depth + 1) {
                                return false;
                            }
                            k += 1;
                        }
                        None => return false,
                    }
                }
            }
            Some('"') => {
                self.string();
                true
            }
            Some(_) => {
                while self.peek().is_some_and(|c| !c.is_whitespace() && !",]}".contains(c)) {
                    self.bump();
                }
                true
            }
        }
    }

    /// A string at the cursor (escapes kept as written, which field names never use).
    fn string(&mut self) -> String {
        let mut out = String::new();
        self.bump();
        while let Some(c) = self.bump() {
            match c {
                '"' => break,
                '\\' => {
                    if let Some(e) = self.bump() {
                        out.push('\\');
                        out.push(e);
                    }
                }
                c => out.push(c),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::attributes;

    fn problems(text: &str) -> Vec<String> {
        match parse("gpus.json", text) {
            Ok(d) => panic!("accepted: {d:?}"),
            Err(GpuSimError::Invalid(p)) => p.iter().map(ToString::to_string).collect(),
            Err(e) => panic!("{e}"),
        }
    }

    fn gpu(id: &str, peers: &[&str]) -> String {
        let peers = peers.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", ");
        format!(r#"{{"id": "{id}", "model": "A100", "memory_mib": 81920, "nvlink_peers": [{peers}]}}"#)
    }

    #[test]
    fn generated_islands_numa_switches() -> Result<(), GpuSimError> {
        let d = parse(
            "g.json",
            r#"{"generate": {"count": 8, "model": "H100-SXM5-80GB", "memory_mib": 81920,
                "nvlink": "islands-of-4", "numa_nodes": 2, "pci_switches": 4}}"#,
        )?;
        assert_eq!(d.len(), 8);
        assert!(d.iter().all(|g| g.simulated && g.id.starts_with("sim-gpu-") && g.mig_profile.is_empty()));
        assert_eq!(d[0].nvlink_peers, ["sim-gpu-1", "sim-gpu-2", "sim-gpu-3"]);
        assert_eq!(d[5].nvlink_peers, ["sim-gpu-4", "sim-gpu-6", "sim-gpu-7"]);
        assert_eq!(d.iter().map(|g| g.numa_node).collect::<Vec<_>>(), [0, 0, 0, 0, 1, 1, 1, 1].map(Some));
        assert_eq!(d[2].pci_switch, "sim-pcie-1");
        assert_eq!(d[7].pci_switch, "sim-pcie-3");
        let all = parse("g.json", r#"{"generate": {"count": 3, "model": "A", "memory_mib": 1, "nvlink": "all"}}"#)?;
        assert_eq!(all[1].nvlink_peers, ["sim-gpu-0", "sim-gpu-2"]);
        assert_eq!(all[1].numa_node, None);
        assert_eq!(all[1].pci_switch, "");
        let none = parse("g.json", r#"{"generate": {"count": 2, "model": "A", "memory_mib": 1}}"#)?;
        assert!(none.iter().all(|g| g.nvlink_peers.is_empty()));
        let pairs = parse("g.json", r#"{"generate": {"count": 4, "model": "A", "memory_mib": 1, "nvlink": "pairs"}}"#)?;
        assert_eq!(pairs[2].nvlink_peers, ["sim-gpu-3"]);
        Ok(())
    }

    #[test]
    fn mig_split_devices() -> Result<(), GpuSimError> {
        let text = format!(
            r#"{{"devices": [{}, {{"id": "sim-gpu-1", "model": "A100", "memory_mib": 81920, "nvlink_peers": ["sim-gpu-0"],
                 "pci_switch": "sw0", "numa_node": 1, "mig": ["3g.40gb", "3g.40gb"]}}]}}"#,
            gpu("sim-gpu-0", &["sim-gpu-1"])
        );
        let d = parse("m.json", &text)?;
        assert_eq!(d.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(), ["sim-gpu-0", "sim-gpu-1-mig-0", "sim-gpu-1-mig-1"]);
        // The split GPU is not a device any more, so it is no NVLink peer.
        assert!(d[0].nvlink_peers.is_empty());
        assert_eq!(d[1].mig_profile, "3g.40gb");
        assert_eq!(d[1].parent_id, "sim-gpu-1");
        assert_eq!(d[1].memory_mib, 40 * 1024);
        assert_eq!((d[2].pci_switch.as_str(), d[2].numa_node), ("sw0", Some(1)));
        let g = parse(
            "g.json",
            r#"{"generate": {"count": 4, "model": "A", "memory_mib": 81920, "mig": {"count": 1, "profiles": ["1g.10gb", "2g.20gb"]}}}"#,
        )?;
        assert_eq!(
            g.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(),
            ["sim-gpu-0", "sim-gpu-1", "sim-gpu-2", "sim-gpu-3-mig-0", "sim-gpu-3-mig-1"]
        );
        let attrs = attributes(&g);
        assert_eq!(attrs.get("gpu.count").map(String::as_str), Some("4"));
        assert_eq!(attrs.get("gpu.mig_instances").map(String::as_str), Some("2"));
        assert_eq!(attrs.get("gpu.model").map(String::as_str), Some("A"));
        assert_eq!(attrs.get("gpu.simulated").map(String::as_str), Some("true"));
        Ok(())
    }

    #[test]
    fn default_ids_and_attributes() -> Result<(), GpuSimError> {
        let d = parse("d.json", r#"{"devices": [{"model": "B", "memory_mib": 1}, {"model": "A", "memory_mib": 2}]}"#)?;
        assert_eq!(d[1].id, "sim-gpu-1");
        let attrs = attributes(&d);
        assert_eq!(attrs.get("gpu.model").map(String::as_str), Some("A,B"));
        assert!(!attrs.contains_key("gpu.mig_instances"));
        assert!(attributes(&[]).is_empty());
        Ok(())
    }

    #[test]
    fn syntax_and_type_errors_carry_positions() {
        assert_eq!(problems("{\n  \"devices\": [\n    {\"model\": \"A\",, }\n  ]\n}"), ["gpus.json:3:19: key must be a string"]);
        let p = problems("{\"devices\": [{\"model\": \"A\", \"memory_mib\": 1, \"colour\": 2}]}");
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("gpus.json:1:") && p[0].contains("unknown field `colour`"), "{p:?}");
        let p = problems("{\"generate\": {\"count\": -1, \"model\": \"A\", \"memory_mib\": 1}}");
        assert!(p[0].starts_with("gpus.json:1:") && p[0].contains("invalid value"), "{p:?}");
        assert_eq!(problems("{}"), ["gpus.json:1:1: expected `devices` (a list of GPUs) or `generate` (a count and a model)"]);
    }

    #[test]
    fn semantic_errors_point_at_the_value() {
        let text = format!("{{\"devices\": [\n  {},\n  {}\n]}}", gpu("sim-a", &[]), gpu("sim-a", &[]));
        assert_eq!(problems(&text), ["gpus.json:3:10: devices[1].id: duplicate id \"sim-a\" (also devices[0])"]);
        let text = format!("{{\"devices\": [\n{},\n{}\n]}}", gpu("sim-a", &["sim-b"]), gpu("sim-b", &[]));
        let p = problems(&text);
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("gpus.json:2:") && p[0].contains("devices[0].nvlink_peers[0]: the link is one-way"), "{p:?}");
        let p = problems(&format!("{{\"devices\": [{}]}}", gpu("sim-a", &["sim-x", "sim-a"])));
        assert!(p[0].contains("no device has the id \"sim-x\"") && p[1].contains("is the device itself"), "{p:?}");
        let p = problems(&format!("{{\"devices\": [{}]}}", gpu("gpu-0", &[])));
        assert!(p[0].contains("devices[0].id: must start with \"sim-\""), "{p:?}");
        let p = problems(r#"{"devices": [{"model": "A", "memory_mib": 81920, "mig": ["4g.40gb", "4g.40gb"]}]}"#);
        assert!(p[0].contains("devices[0].mig: MIG instances use 8 compute slices"), "{p:?}");
        let p = problems(r#"{"devices": [{"model": "A", "memory_mib": 40960, "mig": ["3g.40gb", "3g.40gb", "big"]}]}"#);
        assert!(p[0].contains("devices[0].mig[2]: must be a MIG profile") && p[1].contains("hold 81920 MiB"), "{p:?}");
        let p = problems(
            r#"{"devices": [{"model": "A", "memory_mib": 1, "mig": ["1g.5gb"]}, {"id": "sim-gpu-0-mig-0", "model": "A", "memory_mib": 1}]}"#,
        );
        assert!(p.iter().any(|p| p.contains("devices[1].id: \"sim-gpu-0-mig-0\" is also the id of a MIG instance")), "{p:?}");
        let p = problems(r#"{"devices": [{"model": "", "memory_mib": 0, "numa_node": -1, "pci_switch": "a b"}]}"#);
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(problems(r#"{"devices": []}"#)[0].contains("declares no GPU"));
    }

    #[test]
    fn generator_errors() {
        let p = problems(r#"{"generate": {"count": 0, "model": "A", "memory_mib": 1}}"#);
        assert_eq!(p, ["gpus.json:1:24: generate.count: must be between 1 and 64, found 0"]);
        assert!(problems(r#"{"generate": {"count": 65, "model": "A", "memory_mib": 1}}"#)[0].contains("between 1 and 64, found 65"));
        let p = problems(r#"{"generate": {"count": 6, "model": "A", "memory_mib": 1, "nvlink": "islands-of-4"}}"#);
        assert!(p[0].contains("islands of 4 do not divide 6 GPUs"), "{p:?}");
        let p = problems(r#"{"generate": {"count": 6, "model": "A", "memory_mib": 1, "nvlink": "ring"}}"#);
        assert!(p[0].contains("generate.nvlink: must be"), "{p:?}");
        let p = problems(r#"{"generate": {"count": 2, "model": "A", "memory_mib": 1, "numa_nodes": 3, "pci_switches": 0}}"#);
        assert_eq!(p.len(), 2, "{p:?}");
        let p = problems(r#"{"generate": {"count": 2, "model": "A", "memory_mib": 81920, "mig": {"count": 3, "profiles": ["7g.90gb"]}}}"#);
        assert!(p[0].contains("generate.mig.count") && p[1].contains("hold 92160 MiB"), "{p:?}");
        let p = problems(r#"{"generate": {"count": 2, "model": "A", "memory_mib": 1}, "devices": []}"#);
        assert!(p[0].contains("not both"), "{p:?}");
        // 10 GPUs × 7 instances = 70 devices.
        let p = problems(
            r#"{"generate": {"count": 10, "model": "A", "memory_mib": 81920, "mig": {"count": 10, "profiles": ["1g.10gb", "1g.10gb", "1g.10gb", "1g.10gb", "1g.10gb", "1g.10gb", "1g.10gb"]}}}"#,
        );
        assert!(p[0].contains("registers 70 devices"), "{p:?}");
    }

    #[test]
    fn devices_given_directly_pass_the_servers_check_too() -> Result<(), String> {
        let sim = |id: &str| GpuDevice { id: id.into(), simulated: true, ..Default::default() };
        let instance = |id: &str, parent: &str| GpuDevice { mig_profile: "1g.10gb".into(), parent_id: parent.into(), ..sim(id) };
        check_devices(&[sim("sim-gpu-0"), instance("sim-gpu-1-mig-0", "sim-gpu-1")])?;
        // Well-formed, unique, simulated ids, but a MIG instance that is its own parent.
        let err = check_devices(&[sim("sim-gpu-0"), instance("sim-gpu-1", "sim-gpu-1")]).err().unwrap_or_default();
        assert_eq!(err, "simulated_gpus[1].parent_id: \"sim-gpu-1\" is the instance itself");
        let dangling = GpuDevice { nvlink_peers: vec!["sim-gpu-9".into()], ..sim("sim-gpu-0") };
        let err = check_devices(&[dangling]).err().unwrap_or_default();
        assert_eq!(err, "simulated_gpus[0].nvlink_peers[0]: no registered device has the id \"sim-gpu-9\"");
        Ok(())
    }
}
