//! GPU placement arithmetic and the GPU placement policies, on a compact view of one node.
//!
//! This is the one place that decides whether a task's GPU ask fits a node's devices, which
//! devices it gets, and how good the placement is. The server's scorer (`rank::Fragmentation`)
//! and the trace simulator (`crate::sim`) both call [`Policy::evaluate`], so that the simulator
//! measures exactly the placement rule that the server applies.
//!
//! Units: GPU amounts are milli-GPUs (1000 = one whole device); a task asks either for `count`
//! whole devices or for a share (1..=999 milli) of one device. The sum of shares on a device never
//! exceeds 1000.
//!
//! Policies:
//! * `best-fit` — the node left with the least free CPU and GPU (normalised sum);
//! * `gpu-packing` — occupied GPUs first, then GPUs of active nodes, then idle nodes;
//! * `fgd` — Fragmentation Gradient Descent (Weng et al., USENIX ATC'23): the node and device
//!   that least increase the node's expected GPU fragmentation against the workload's pod types;
//! * `mlp` (the default) — FGD's fragmentation gradient, with ties broken towards packing (see
//!   [`Policy::Mlp`]).
//!
//! Two refinements apply only to nodes that report them, so nodes without (the trace
//! simulator's) see exactly the rule above: multi-GPU asks on nodes with GPU topology get the
//! best-connected devices and report their locality, ranked as its own key ([`super::topology`],
//! [`Policy::evaluate_with`]), and
//! MIG instances are placed by their own rule ([`mig_pick`]).

use std::fmt;
use std::str::FromStr;

use mlp_proto::v1::GpuRequest;

use super::topology::{Locality, Topology};

/// One whole GPU, in milli-GPUs.
pub const WHOLE: u32 = 1000;

/// Devices of one node that a policy can address (the bit width of [`DeviceMask`]).
pub const MAX_DEVICES: usize = 64;

/// A set of device indexes on one node, bit `i` = the node's `i`-th device.
pub type DeviceMask = u64;

/// A task's GPU ask in device terms: `count` devices of `milli` each (`milli` < 1000 only with
/// `count` = 1). `count` = 0 means no GPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GpuShape {
    pub count: u32,
    pub milli: u32,
}

impl GpuShape {
    /// No GPU.
    pub const NONE: GpuShape = GpuShape { count: 0, milli: 0 };

    /// `count` whole GPUs.
    pub fn whole(count: u32) -> GpuShape {
        GpuShape { count, milli: if count == 0 { 0 } else { WHOLE } }
    }

    /// A share of one GPU; 1000 or more is one whole GPU.
    pub fn share(milli: u32) -> GpuShape {
        match milli {
            0 => GpuShape::NONE,
            m if m >= WHOLE => GpuShape::whole(1),
            m => GpuShape { count: 1, milli: m },
        }
    }

    /// The shape of a jobspec request (`share_milli` in 1..=999 wins over `count`).
    pub fn from_request(r: &GpuRequest) -> GpuShape {
        if (1..WHOLE).contains(&r.share_milli) {
            GpuShape::share(r.share_milli)
        } else {
            GpuShape::whole(r.effective_count())
        }
    }

    /// The total milli-GPUs asked for.
    pub fn total_milli(self) -> u64 {
        u64::from(self.count) * u64::from(self.milli)
    }
}

/// The GPU models a task accepts, as a bit set over model ids interned by the caller (a cluster
/// has few models; ids ≥ 64 are only matched by [`ModelSet::ANY`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelSet(pub u64);

impl ModelSet {
    pub const ANY: ModelSet = ModelSet(u64::MAX);

    pub fn contains(self, model: u32) -> bool {
        self == ModelSet::ANY || (model < 64 && self.0 & (1u64 << model) != 0)
    }

    pub fn with(self, model: u32) -> ModelSet {
        if self == ModelSet::ANY || model >= 64 {
            return self;
        }
        ModelSet(self.0 | (1u64 << model))
    }
}

/// One node as the policies see it: what is free now.
#[derive(Debug, Clone, Copy)]
pub struct NodeView<'a> {
    pub cpu_free: u64,
    pub cpu_total: u64,
    pub mem_free: u64,
    /// The model id of the node's devices (the caller hides devices of other models).
    pub model: u32,
    /// Free milli-GPUs per device, in device order; at most [`MAX_DEVICES`] are used.
    pub gpu_free: &'a [u32],
}

impl NodeView<'_> {
    /// Free milli-GPUs on the whole node.
    pub fn gpu_free_total(&self) -> u64 {
        self.gpu_free.iter().take(MAX_DEVICES).map(|&f| u64::from(f)).sum()
    }
}

/// One task (or one simulated pod) as the policies see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodView {
    pub cpu: u64,
    pub mem: u64,
    pub gpu: GpuShape,
    pub models: ModelSet,
}

/// Whether `pod` fits `node` on every dimension: CPU, memory, model and enough devices with at
/// least the asked share free. The single feasibility rule of the policies.
pub fn fits(node: &NodeView<'_>, pod: &PodView) -> bool {
    if node.cpu_free < pod.cpu || node.mem_free < pod.mem {
        return false;
    }
    if pod.gpu.count == 0 {
        return true;
    }
    if !pod.models.contains(node.model) {
        return false;
    }
    let usable = node.gpu_free.iter().take(MAX_DEVICES).filter(|&&f| f >= pod.gpu.milli).count();
    usable >= pod.gpu.count as usize
}

/// Whole devices: the first `count` fully free devices in device order (interchangeable for
/// every policy, so the choice only has to be deterministic).
fn whole_devices(free: &[u32], count: u32) -> Option<DeviceMask> {
    let mut mask = 0u64;
    let mut left = count;
    for (i, &f) in free.iter().take(MAX_DEVICES).enumerate() {
        if left == 0 {
            break;
        }
        if f >= WHOLE {
            mask |= 1 << i;
            left -= 1;
        }
    }
    (left == 0).then_some(mask)
}

/// The fully free devices.
fn whole_mask(free: &[u32]) -> DeviceMask {
    free.iter().take(MAX_DEVICES).enumerate().filter(|(_, &f)| f >= WHOLE).fold(0, |m, (i, _)| m | (1 << i))
}

/// Applies `shape` on the devices in `mask` to a copy of `free`; returns the copy's length.
fn apply(free: &[u32], mask: DeviceMask, milli: u32, out: &mut [u32; MAX_DEVICES]) -> usize {
    let n = free.len().min(MAX_DEVICES);
    out[..n].copy_from_slice(&free[..n]);
    for (i, slot) in out.iter_mut().enumerate().take(n) {
        if mask & (1 << i) != 0 {
            *slot = slot.saturating_sub(milli);
        }
    }
    n
}

/// The cost of breaking into a MIG-partitioned GPU none of whose instances is in use, per GPU, in
/// milli-GPUs (one GPU): outweighs the fill-level tie-break of [`mig_pick`].
pub const MIG_FRESH_GPU: f64 = 1000.0;

/// One MIG instance as [`mig_pick`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigSlot {
    /// The physical GPU, as an id the caller interns (the instances of one GPU share it).
    pub parent: u32,
    /// The compute slices of the instance's profile (the 3 of `3g.40gb`; at least 1).
    pub slices: u32,
    /// Held by an allocation.
    pub used: bool,
    /// Free, of the asked profile, and of an accepted model and memory.
    pub eligible: bool,
}

/// The compute slices of a MIG profile name (`"3g.40gb"` → 3); 1 when the name has none, at
/// most [`mlp_proto::gpu::MIG_SLICES_PER_GPU`] (a GPU's all) whatever the name says.
pub fn mig_slices(profile: &str) -> u32 {
    let n = profile.split_once('g').and_then(|(n, _)| n.parse::<u32>().ok()).unwrap_or(1);
    n.clamp(1, mlp_proto::gpu::MIG_SLICES_PER_GPU)
}

/// MIG placement: `count` eligible instances out of `slots` (indexed like the node's devices;
/// None = not a MIG instance), and the cost. Instances are taken on the most used physical GPU
/// first (the share of its slices in use, then the GPU's first device, then device order), so
/// partly used GPUs fill up and fully free ones stay whole for other, larger profiles. The cost
/// is [`MIG_FRESH_GPU`] per physical GPU the placement breaks into (none of its instances used
/// before), plus 10⁻³ × the node's share of MIG slices left free: across nodes, the one with a
/// partly used GPU wins, then the fuller one. None when fewer than `count` are eligible.
pub fn mig_pick(slots: &[Option<MigSlot>], count: u32) -> Option<(f64, DeviceMask)> {
    let slots = &slots[..slots.len().min(MAX_DEVICES)];
    // Per physical GPU: (parent, first device index, used slices, all slices).
    let mut parents: Vec<(u32, usize, u32, u32)> = Vec::new();
    for (i, s) in slots.iter().enumerate() {
        let Some(s) = s else { continue };
        let k = match parents.iter().position(|p| p.0 == s.parent) {
            Some(k) => k,
            None => {
                parents.push((s.parent, i, 0, 0));
                parents.len() - 1
            }
        };
        // Saturating: slots may come from devices no check has bounded.
        parents[k].3 = parents[k].3.saturating_add(s.slices);
        if s.used {
            parents[k].2 = parents[k].2.saturating_add(s.slices);
        }
    }
    let mut eligible: Vec<(usize, usize)> = slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.filter(|s| s.eligible && !s.used).map(|s| (s.parent, i)))
        .filter_map(|(parent, i)| parents.iter().position(|p| p.0 == parent).map(|k| (k, i)))
        .collect();
    if eligible.len() < count as usize {
        return None;
    }
    // Most used first: used/all descending, compared exactly (a/b > c/d ⇔ a·d > c·b).
    eligible.sort_by(|&(ka, ia), &(kb, ib)| {
        let (pa, pb) = (parents[ka], parents[kb]);
        (u64::from(pb.2) * u64::from(pa.3)).cmp(&(u64::from(pa.2) * u64::from(pb.3))).then(pa.1.cmp(&pb.1)).then(ia.cmp(&ib))
    });
    let mut mask: DeviceMask = 0;
    let mut fresh: Vec<usize> = Vec::new();
    let mut taken_slices = 0u32;
    for &(k, i) in eligible.iter().take(count as usize) {
        mask |= 1 << i;
        taken_slices = taken_slices.saturating_add(slots[i].map_or(0, |s| s.slices));
        if parents[k].2 == 0 && !fresh.contains(&k) {
            fresh.push(k);
        }
    }
    let all = parents.iter().fold(0u32, |a, p| a.saturating_add(p.3));
    let used = parents.iter().fold(taken_slices, |a, p| a.saturating_add(p.2));
    let left = if all > 0 { f64::from(all.saturating_sub(used)) / f64::from(all) } else { 0.0 };
    Some((MIG_FRESH_GPU * fresh.len() as f64 + 1e-3 * left, mask))
}

/// The pod types a cluster expects, with their popularity: FGD's "target workload".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Workload {
    /// GPU pod types only: CPU-only types leave every GPU idle wherever they go, so they add the
    /// same amount to every node's fragmentation and never change a decision.
    types: Vec<(PodView, f64)>,
}

impl Workload {
    /// From pod types and their counts (any order; CPU-only types are dropped, weights normalised).
    pub fn new(types: impl IntoIterator<Item = (PodView, u64)>) -> Workload {
        let mut all: Vec<(PodView, u64)> = Vec::new();
        for (pod, n) in types {
            if pod.gpu.count == 0 || n == 0 {
                continue;
            }
            match all.iter_mut().find(|(p, _)| *p == pod) {
                Some(slot) => slot.1 += n,
                None => all.push((pod, n)),
            }
        }
        all.sort();
        let total: u64 = all.iter().map(|(_, n)| n).sum();
        let types = all.into_iter().map(|(p, n)| (p, n as f64 / total.max(1) as f64)).collect();
        Workload { types }
    }

    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    pub fn len(&self) -> usize {
        self.types.len()
    }

    /// The node's expected GPU fragmentation, in milli-GPUs: for each pod type, the free GPU that
    /// the type could not use on this node (all of it if the type does not fit at all, else the
    /// devices with less free than the type's per-device ask), weighted by the type's popularity.
    pub fn fragmentation(&self, node: &NodeView<'_>) -> f64 {
        let free = &node.gpu_free[..node.gpu_free.len().min(MAX_DEVICES)];
        let total: u32 = free.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let mut frag = 0.0;
        for (pod, weight) in &self.types {
            let lost = if fits(node, pod) { free.iter().filter(|&&f| f < pod.gpu.milli).sum::<u32>() } else { total };
            frag += weight * f64::from(lost);
        }
        frag
    }
}

impl Workload {
    /// Like [`Workload::fragmentation`], but counting how many pods of each type the node could
    /// still take: the free GPU that a node filled with only that type would leave idle, because
    /// the devices' free shares are not multiples of the type's share, or because CPU or memory
    /// run out first.
    pub fn packing_loss(&self, node: &NodeView<'_>) -> f64 {
        let free = &node.gpu_free[..node.gpu_free.len().min(MAX_DEVICES)];
        let total: u32 = free.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let mut loss = 0.0;
        for (pod, weight) in &self.types {
            let usable = if !pod.models.contains(node.model) {
                0
            } else {
                let g = pod.gpu;
                // Pods of this type that the devices could hold.
                let by_gpu = if g.milli >= WHOLE {
                    free.iter().filter(|&&f| f >= WHOLE).count() as u64 / u64::from(g.count.max(1))
                } else {
                    free.iter().map(|&f| u64::from(f / g.milli.max(1))).sum()
                };
                let by_cpu = node.cpu_free.checked_div(pod.cpu).unwrap_or(u64::MAX);
                let by_mem = node.mem_free.checked_div(pod.mem).unwrap_or(u64::MAX);
                by_gpu.min(by_cpu).min(by_mem) * g.total_milli()
            };
            loss += weight * (f64::from(total) - usable.min(u64::from(total)) as f64);
        }
        loss
    }
}

impl Workload {
    /// `fragmentation(node) + packing_loss(node)` in one pass over the pod types (the `mlp`
    /// policy's measure; one pass because it is the simulator's hot path on cache misses).
    pub fn mlp_measure(&self, node: &NodeView<'_>) -> f64 {
        let free = &node.gpu_free[..node.gpu_free.len().min(MAX_DEVICES)];
        let total: u32 = free.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let mut sum = 0.0;
        for (pod, weight) in &self.types {
            if !pod.models.contains(node.model) {
                sum += weight * 2.0 * f64::from(total);
                continue;
            }
            let g = pod.gpu;
            let (mut usable_devices, mut small, mut pods) = (0u32, 0u32, 0u64);
            for &f in free {
                if f >= g.milli {
                    usable_devices += 1;
                    if g.milli < WHOLE {
                        pods += u64::from(f / g.milli.max(1));
                    }
                } else {
                    small += f;
                }
            }
            if g.milli >= WHOLE {
                pods = u64::from(usable_devices / g.count.max(1));
            }
            let room = node.cpu_free >= pod.cpu && node.mem_free >= pod.mem;
            let frag = if room && usable_devices >= g.count { small } else { total };
            let by_cpu = node.cpu_free.checked_div(pod.cpu).unwrap_or(u64::MAX);
            let by_mem = node.mem_free.checked_div(pod.mem).unwrap_or(u64::MAX);
            let usable = (pods.min(by_cpu).min(by_mem) * g.total_milli()).min(u64::from(total));
            sum += weight * (f64::from(frag) + (f64::from(total) - usable as f64));
        }
        sum
    }
}

/// A placement policy (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    BestFit,
    GpuPacking,
    Fgd,
    /// FGD looks at one more pod of each type: a device with 500 free counts as usable by a
    /// 460-milli type, and a node whose CPU can take one more such pod counts all its free GPU
    /// as usable. `mlp` adds the packing loss, which counts how many pods of each type the node
    /// could still take (devices' shares, CPU and memory) — so it also steers away from leaving
    /// GPUs stranded behind CPU, and from leaving shares that are not multiples of the common
    /// asks. The sum of both gradients is the cost (equal weights, not fitted to a trace); on
    /// equal cost, the node and device left with the least free GPU, then the least free CPU,
    /// keep emptier nodes whole for the large asks still to come.
    #[default]
    Mlp,
}

impl Policy {
    pub const ALL: [Policy; 4] = [Policy::BestFit, Policy::GpuPacking, Policy::Fgd, Policy::Mlp];

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::BestFit => "best-fit",
            Policy::GpuPacking => "gpu-packing",
            Policy::Fgd => "fgd",
            Policy::Mlp => "mlp",
        }
    }

    /// Evaluates placing `pod` on `node`: the cost (lower is better; comparable across nodes for
    /// the same pod) and the devices it would get. None when it does not fit. `frag_before` is
    /// `self.baseline(node, workload)`, passed in so that callers can cache it per node state.
    pub fn evaluate(self, node: &NodeView<'_>, pod: &PodView, workload: &Workload, frag_before: f64) -> Option<(f64, DeviceMask)> {
        self.evaluate_with(node, pod, workload, frag_before, None).map(|(cost, mask, _)| (cost, mask))
    }

    /// [`Policy::evaluate`] on a node whose devices (indexed like `node.gpu_free`) may carry a
    /// [`Topology`]. With one, whole GPUs are chosen by [`Topology::choose`] (the best locality,
    /// then the set that leaves the rest best connected) instead of in device order, and an ask
    /// of two or more whole GPUs reports the locality it got (not added to the cost: the scheduler
    /// ranks it as its own key, `Topology::rank_level`). Without one (`None`), this is exactly
    /// [`Policy::evaluate`] and the locality is None.
    pub fn evaluate_with(
        self,
        node: &NodeView<'_>,
        pod: &PodView,
        workload: &Workload,
        frag_before: f64,
        topology: Option<&Topology>,
    ) -> Option<(f64, DeviceMask, Option<Locality>)> {
        if !fits(node, pod) {
            return None;
        }
        let free = &node.gpu_free[..node.gpu_free.len().min(MAX_DEVICES)];
        let mut buf = [0u32; MAX_DEVICES];
        // Candidate device sets: whole asks have one (interchangeable devices); a share may go on
        // any device with room, and devices with the same free amount are equivalent.
        let mut best: Option<(f64, DeviceMask)> = None;
        let mut consider = |mask: DeviceMask, buf: &mut [u32; MAX_DEVICES]| {
            let n = apply(free, mask, pod.gpu.milli, buf);
            let after = NodeView { gpu_free: &buf[..n], cpu_free: node.cpu_free - pod.cpu, mem_free: node.mem_free - pod.mem, ..*node };
            let cost = self.cost(node, &after, mask, pod, workload, frag_before);
            if best.is_none_or(|(c, _)| cost < c) {
                best = Some((cost, mask));
            }
        };
        let mut locality = None;
        if pod.gpu.count == 0 {
            consider(0, &mut buf);
        } else if pod.gpu.milli >= WHOLE {
            match topology {
                Some(t) => {
                    let (mask, loc) = t.choose(whole_mask(free), pod.gpu.count)?;
                    consider(mask, &mut buf);
                    locality = (pod.gpu.count >= 2).then_some(loc);
                }
                None => consider(whole_devices(free, pod.gpu.count)?, &mut buf),
            }
        } else {
            let mut seen = [u32::MAX; 8];
            for (i, &f) in free.iter().enumerate() {
                if f < pod.gpu.milli {
                    continue;
                }
                // Equal free amounts give equal results; try each amount once (first device).
                if seen.contains(&f) {
                    continue;
                }
                if let Some(slot) = seen.iter_mut().find(|s| **s == u32::MAX) {
                    *slot = f;
                }
                consider(1 << i, &mut buf);
            }
        }
        best.map(|(cost, mask)| (cost, mask, locality))
    }

    fn cost(
        self,
        before: &NodeView<'_>,
        after: &NodeView<'_>,
        mask: DeviceMask,
        pod: &PodView,
        workload: &Workload,
        frag_before: f64,
    ) -> f64 {
        let gpu_total = (before.gpu_free.len().min(MAX_DEVICES) as f64) * f64::from(WHOLE);
        let gpu_left = if gpu_total > 0.0 { after.gpu_free_total() as f64 / gpu_total } else { 0.0 };
        let cpu_left = if before.cpu_total > 0 { after.cpu_free as f64 / before.cpu_total as f64 } else { 0.0 };
        match self {
            Policy::BestFit => gpu_left + cpu_left,
            Policy::GpuPacking => {
                // Tier 0: the share lands on a device already in use; 1: the node already has
                // GPUs in use; 2: an idle node. Within a tier, best fit.
                let used_device = (0..before.gpu_free.len().min(MAX_DEVICES)).any(|i| mask & (1 << i) != 0 && before.gpu_free[i] < WHOLE);
                let active = before.gpu_free.iter().take(MAX_DEVICES).any(|&f| f < WHOLE);
                let tier = if pod.gpu.count > 0 && used_device {
                    0.0
                } else if active {
                    1.0
                } else {
                    2.0
                };
                tier * 4.0 + gpu_left + cpu_left
            }
            Policy::Fgd => workload.fragmentation(after) - frag_before,
            Policy::Mlp => {
                let grad = workload.mlp_measure(after) - frag_before;
                // The gradient is in milli-GPUs; the tie-break terms are below 2 and scaled so
                // that they only order placements whose gradients are (nearly) equal: the
                // fuller node, then the fuller device (a share onto a device already in use).
                let device_left = match pod.gpu {
                    g if g.count == 1 && g.milli < WHOLE => (0..after.gpu_free.len())
                        .find(|&i| mask & (1 << i) != 0)
                        .map_or(0.0, |i| f64::from(after.gpu_free[i]) / f64::from(WHOLE)),
                    _ => 0.0,
                };
                grad + 1e-3 * gpu_left + 5e-4 * cpu_left + 1e-4 * device_left
            }
        }
    }

    /// The policy's measure of the node before a placement, which [`Policy::evaluate`] takes as
    /// `frag_before` (callers cache it per node state): FGD's fragmentation; for `mlp` also the
    /// packing loss; 0 for the policies that do not look at the workload.
    pub fn baseline(self, node: &NodeView<'_>, workload: &Workload) -> f64 {
        match self {
            Policy::Fgd => workload.fragmentation(node),
            Policy::Mlp => workload.mlp_measure(node),
            Policy::BestFit | Policy::GpuPacking => 0.0,
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown policy name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown policy {0:?}; expected one of: best-fit, gpu-packing, fgd, mlp")]
pub struct UnknownPolicy(pub String);

impl FromStr for Policy {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Policy, UnknownPolicy> {
        match s {
            "best-fit" | "bestfit" => Ok(Policy::BestFit),
            "gpu-packing" | "packing" => Ok(Policy::GpuPacking),
            "fgd" => Ok(Policy::Fgd),
            "mlp" | "default" => Ok(Policy::Mlp),
            other => Err(UnknownPolicy(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(cpu: u64, free: &[u32]) -> NodeView<'_> {
        NodeView { cpu_free: cpu, cpu_total: 64_000, mem_free: 1 << 20, model: 0, gpu_free: free }
    }

    fn pod(cpu: u64, gpu: GpuShape) -> PodView {
        PodView { cpu, mem: 0, gpu, models: ModelSet::ANY }
    }

    #[test]
    fn shapes_from_requests() {
        let r = |count, share_milli| GpuRequest { count, share_milli, ..Default::default() };
        assert_eq!(GpuShape::from_request(&r(Some(2), 0)), GpuShape { count: 2, milli: 1000 });
        assert_eq!(GpuShape::from_request(&r(Some(1), 250)), GpuShape { count: 1, milli: 250 });
        assert_eq!(GpuShape::from_request(&r(Some(0), 0)), GpuShape::NONE);
        assert_eq!(GpuShape::share(1000), GpuShape::whole(1));
    }

    #[test]
    fn feasibility_checks_every_dimension() {
        let free = [1000, 300];
        let n = view(1000, &free);
        assert!(fits(&n, &pod(1000, GpuShape::share(300))));
        assert!(!fits(&n, &pod(1001, GpuShape::NONE)));
        assert!(!fits(&n, &pod(0, GpuShape::whole(2))));
        assert!(fits(&n, &pod(0, GpuShape::whole(1))));
        let v100 = PodView { models: ModelSet(0).with(3), ..pod(0, GpuShape::share(100)) };
        assert!(!fits(&n, &v100));
        assert!(fits(&NodeView { model: 3, ..n }, &v100));
    }

    #[test]
    fn shares_never_exceed_one_device() {
        let free = [400, 1000];
        let n = view(1000, &free);
        let w = Workload::default();
        for p in Policy::ALL {
            let (_, mask) = p.evaluate(&n, &pod(0, GpuShape::share(600)), &w, 0.0).unwrap_or_default();
            assert_eq!(mask, 0b10, "{p}: only device 1 has 600 free");
        }
        assert_eq!(Policy::Fgd.evaluate(&view(0, &[500, 500]), &pod(0, GpuShape::share(600)), &w, 0.0), None);
    }

    #[test]
    fn fragmentation_counts_unusable_free_gpu() {
        let w = Workload::new([(pod(0, GpuShape::whole(1)), 1), (pod(0, GpuShape::share(500)), 1)]);
        // Whole-GPU type: the 300 free on device 0 is lost; 500-share type: also lost.
        let free = [300, 1000];
        assert!((w.fragmentation(&view(1000, &free)) - 300.0).abs() < 1e-9);
        // Without CPU neither type fits: all free GPU is fragmented.
        let cpu_hungry = Workload::new([(pod(2000, GpuShape::share(100)), 1)]);
        assert!((cpu_hungry.fragmentation(&view(1000, &free)) - 1300.0).abs() < 1e-9);
    }

    #[test]
    fn packing_loss_counts_pods_not_devices() {
        let w = Workload::new([(pod(8000, GpuShape::share(400)), 1)]);
        // Devices of 1000 and 500 free take 2 + 1 pods of 400: 300 is lost to the shares.
        let free = [1000, 500];
        assert!((w.packing_loss(&view(64_000, &free)) - 300.0).abs() < 1e-9);
        // With CPU for one pod only, 1100 of the 1500 free is stranded behind the CPU.
        assert!((w.packing_loss(&view(8000, &free)) - 1100.0).abs() < 1e-9);
        // FGD's measure sees no fragmentation in either case (both devices take one pod).
        assert!(w.fragmentation(&view(8000, &free)).abs() < 1e-9);
        // The one-pass sum agrees with the two measures on mixed workloads.
        let mixed = Workload::new([
            (pod(8000, GpuShape::share(400)), 3),
            (pod(2000, GpuShape::whole(1)), 2),
            (PodView { models: ModelSet(0).with(5), ..pod(1000, GpuShape::whole(2)) }, 1),
        ]);
        for (cpu, f) in [(64_000, [1000, 500, 0]), (8000, [1000, 1000, 300]), (1000, [100, 1000, 1000])] {
            let v = view(cpu, &f);
            let want = mixed.fragmentation(&v) + mixed.packing_loss(&v);
            assert!((mixed.mlp_measure(&v) - want).abs() < 1e-6, "{cpu} {f:?}");
        }
    }

    #[test]
    fn each_policy_on_a_tiny_cluster() {
        // Node a: an idle 2-GPU node. Node b: one device with 500 free, one idle.
        let a_free = [1000, 1000];
        let b_free = [500, 1000];
        let a = view(64_000, &a_free);
        let b = view(64_000, &b_free);
        let w = Workload::new([(pod(1000, GpuShape::share(500)), 3), (pod(1000, GpuShape::whole(1)), 1)]);
        let share = pod(1000, GpuShape::share(500));
        let choose = |p: Policy| {
            let ca = p.evaluate(&a, &share, &w, p.baseline(&a, &w)).map(|c| c.0).unwrap_or(f64::INFINITY);
            let (cb, mb) = p.evaluate(&b, &share, &w, p.baseline(&b, &w)).unwrap_or((f64::INFINITY, 0));
            if cb < ca {
                ("b", mb)
            } else {
                ("a", 0)
            }
        };
        // Every policy fills the half-used device of b: packing and FGD alike.
        for p in Policy::ALL {
            assert_eq!(choose(p), ("b", 0b01), "{p}");
        }
        // A whole GPU: best-fit takes the fuller node b; FGD too (a keeps two whole GPUs, so
        // the whole-GPU type still fits there and b's 500 stays usable by the share type).
        let whole = pod(1000, GpuShape::whole(1));
        let cost = |p: Policy, n: &NodeView<'_>| p.evaluate(n, &whole, &w, p.baseline(n, &w)).map(|c| c.0).unwrap_or(f64::INFINITY);
        assert!(cost(Policy::BestFit, &b) < cost(Policy::BestFit, &a));
        assert!(cost(Policy::GpuPacking, &b) < cost(Policy::GpuPacking, &a));
        assert!(cost(Policy::Fgd, &b) <= cost(Policy::Fgd, &a));
    }

    #[test]
    fn mig_pick_fills_the_most_used_gpu() {
        let slot = |parent, used| Some(MigSlot { parent, slices: 1, used, eligible: !used });
        // GPU 7 (devices 0..=2): one of three used; GPU 9 (devices 4..=6): fresh; device 3: not MIG.
        let slots = [slot(7, false), slot(7, true), slot(7, false), None, slot(9, false), slot(9, false), slot(9, false)];
        let (cost, mask) = mig_pick(&slots, 2).unwrap_or_default();
        assert_eq!(mask, 0b101);
        assert!(cost < 1.0, "{cost}");
        // Three: the third breaks into GPU 9 (first device first).
        let (cost, mask) = mig_pick(&slots, 3).unwrap_or_default();
        assert_eq!(mask, 0b1_0101);
        assert!((MIG_FRESH_GPU..MIG_FRESH_GPU + 1.0).contains(&cost), "{cost}");
        assert_eq!(mig_pick(&slots, 6), None);
        // Ineligible instances (another profile) count for their GPU's use but are never taken.
        let other = Some(MigSlot { parent: 9, slices: 1, used: false, eligible: false });
        assert_eq!(mig_pick(&[other, slot(9, false)], 1).map(|c| c.1), Some(0b10));
        // The fuller GPU by share of slices in use: GPU 2 (3 of 7 slices) before GPU 1 (1 of 7).
        let big = |parent, slices, used| Some(MigSlot { parent, slices, used, eligible: !used });
        let slots = [big(1, 1, true), big(1, 6, false), big(2, 3, true), big(2, 4, false)];
        assert_eq!(mig_pick(&slots, 1).map(|c| c.1), Some(0b1000));
        assert_eq!((mig_slices("3g.40gb"), mig_slices("1g.10gb+me"), mig_slices("odd")), (3, 1, 1));
    }

    #[test]
    fn mig_slices_are_capped_and_mig_pick_sums_saturate() {
        assert_eq!((mig_slices("9999g.1gb"), mig_slices("4294967295g.1gb"), mig_slices("7g.80gb")), (7, 7, 7));
        // Slices no registration check bounded: the sums saturate instead of overflowing.
        let huge = |parent, used| Some(MigSlot { parent, slices: u32::MAX, used, eligible: !used });
        let slots = [huge(1, true), huge(1, false), huge(2, false), huge(2, false)];
        let (cost, mask) = mig_pick(&slots, 3).unwrap_or_default();
        assert_eq!(mask, 0b1110);
        assert!(cost.is_finite() && cost >= MIG_FRESH_GPU, "{cost}");
    }

    #[test]
    fn without_topology_evaluate_with_is_evaluate() {
        let free = [1000, 400, 1000, 1000];
        let n = view(64_000, &free);
        let w = Workload::new([(pod(1000, GpuShape::share(500)), 3), (pod(1000, GpuShape::whole(2)), 1)]);
        for p in Policy::ALL {
            for shape in [GpuShape::whole(2), GpuShape::whole(3), GpuShape::share(300), GpuShape::NONE] {
                let base = p.baseline(&n, &w);
                let plain = p.evaluate(&n, &pod(1000, shape), &w, base);
                let with = p.evaluate_with(&n, &pod(1000, shape), &w, base, None);
                let with = with.map(|(c, m, l)| (c.to_bits(), m, l));
                assert_eq!(with, plain.map(|(c, m)| (c.to_bits(), m, None)), "{p} {shape:?}");
            }
        }
    }

    #[test]
    fn policy_names_round_trip() {
        for p in Policy::ALL {
            assert_eq!(p.as_str().parse::<Policy>(), Ok(p));
        }
        assert!("nope".parse::<Policy>().is_err());
    }
}
