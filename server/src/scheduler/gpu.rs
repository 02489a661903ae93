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

use std::fmt;
use std::str::FromStr;

use mlp_proto::v1::GpuRequest;

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
            GpuShape::whole(r.count)
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
            let lost = if fits(node, pod) {
                free.iter().filter(|&&f| f < pod.gpu.milli).sum::<u32>()
            } else {
                total
            };
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
        if pod.gpu.count == 0 {
            consider(0, &mut buf);
        } else if pod.gpu.milli >= WHOLE {
            consider(whole_devices(free, pod.gpu.count)?, &mut buf);
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
        best
    }

    fn cost(self, before: &NodeView<'_>, after: &NodeView<'_>, mask: DeviceMask, pod: &PodView, workload: &Workload, frag_before: f64) -> f64 {
        let gpu_total = (before.gpu_free.len().min(MAX_DEVICES) as f64) * f64::from(WHOLE);
        let gpu_left = if gpu_total > 0.0 { after.gpu_free_total() as f64 / gpu_total } else { 0.0 };
        let cpu_left = if before.cpu_total > 0 { after.cpu_free as f64 / before.cpu_total as f64 } else { 0.0 };
        match self {
            Policy::BestFit => gpu_left + cpu_left,
            Policy::GpuPacking => {
                // Tier 0: the share lands on a device already in use; 1: the node already has
                // GPUs in use; 2: an idle node. Within a tier, best fit.
                let used_device = (0..before.gpu_free.len().min(MAX_DEVICES))
                    .any(|i| mask & (1 << i) != 0 && before.gpu_free[i] < WHOLE);
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
                    g if g.count == 1 && g.milli < WHOLE => {
                        (0..after.gpu_free.len()).find(|&i| mask & (1 << i) != 0).map_or(0.0, |i| f64::from(after.gpu_free[i]) / f64::from(WHOLE))
                    }
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
        assert_eq!(GpuShape::from_request(&r(2, 0)), GpuShape { count: 2, milli: 1000 });
        assert_eq!(GpuShape::from_request(&r(1, 250)), GpuShape { count: 1, milli: 250 });
        assert_eq!(GpuShape::from_request(&r(0, 0)), GpuShape::NONE);
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
            if cb < ca { ("b", mb) } else { ("a", 0) }
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
    fn policy_names_round_trip() {
        for p in Policy::ALL {
            assert_eq!(p.as_str().parse::<Policy>(), Ok(p));
        }
        assert!("nope".parse::<Policy>().is_err());
    }
}
