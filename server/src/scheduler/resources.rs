//! Resource arithmetic, shared by the scheduler and by the plan applier's re-check
//! (`check_node_fit`) so that both agree on what "fits" means: what a task group asks for, what a
//! node's live allocations use, and the first dimension that a node runs out of.
//!
//! GPUs are accounted per device in milli-GPUs: a whole device is 1000, a shared one carries the
//! sum of its shares, and a device over 1000 (or one the node does not have) is exhausted. The
//! choice of devices is left to the GPU policy (`gpu::Policy`), the same one the simulator runs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use mlp_proto::consts::{alloc_client, alloc_desired};
use mlp_proto::v1::{AllocatedResources, Allocation, GpuAssignment, GpuDevice, Node, NodeResources, TaskGroup};

use super::gpu::{self, GpuShape, ModelSet, NodeView, PodView, Policy, Workload, WHOLE};
use crate::state::ClusterState;

/// A resource dimension, in the order in which exhaustion is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dimension {
    Cpu,
    Memory,
    Disk,
    Cores,
    Gpu,
}

impl Dimension {
    /// The key used in `AllocMetric.dimension_exhausted` and in error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::Cpu => "cpu",
            Dimension::Memory => "memory",
            Dimension::Disk => "disk",
            Dimension::Cores => "cores",
            Dimension::Gpu => "gpu",
        }
    }
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One task's GPU ask: its shape and the device constraints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuAsk {
    pub shape: GpuShape,
    /// Allowed device models; empty = any.
    pub models: Vec<String>,
    /// Minimum device memory; 0 = any.
    pub memory_mib: u64,
}

impl GpuAsk {
    /// Whether `device` may serve this ask (model and memory constraints).
    pub fn accepts(&self, device: &GpuDevice) -> bool {
        (self.models.is_empty() || self.models.iter().any(|m| m == &device.model)) && device.memory_mib >= self.memory_mib
    }
}

/// What one allocation of a task group asks for: the sum of its tasks' resources, and each GPU
/// task's own GPU ask (shares of different tasks may land on different devices).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ask {
    pub cpu_mhz: u64,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub cores: u32,
    pub gpus: Vec<GpuAsk>,
}

impl Ask {
    pub fn for_group(tg: &TaskGroup) -> Ask {
        let mut ask = Ask::default();
        for r in tg.tasks.iter().filter_map(|t| t.resources.as_ref()) {
            ask.cpu_mhz = ask.cpu_mhz.saturating_add(r.cpu_mhz);
            ask.memory_mib = ask.memory_mib.saturating_add(r.memory_mib);
            ask.disk_mib = ask.disk_mib.saturating_add(r.disk_mib);
            ask.cores = ask.cores.saturating_add(r.cores);
            if let Some(g) = &r.gpu {
                let shape = GpuShape::from_request(g);
                if shape.count > 0 {
                    ask.gpus.push(GpuAsk { shape, models: g.models.clone(), memory_mib: g.memory_mib });
                }
            }
        }
        ask
    }

    /// Whole-GPU equivalents asked for, rounded up per task (for reports).
    pub fn gpu_count(&self) -> u32 {
        self.gpus.iter().map(|g| g.shape.count).sum()
    }
}

/// What is in use on one node. GPUs are tracked per device id in milli-GPUs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub cpu_mhz: u64,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub cores: u64,
    /// Milli-GPUs in use per device id (1000 = the whole device).
    pub gpu_milli: BTreeMap<String, u32>,
    /// GPU asks that could not be backed by free devices (only while trying a placement).
    pub gpu_shortfall: u32,
}

/// Whether an allocation holds resources on its node: the scheduler wants it running and the
/// client has not reported it finished.
pub fn is_live(a: &Allocation) -> bool {
    a.desired_status == alloc_desired::RUN && !alloc_client::is_terminal(&a.client_status)
}

impl Usage {
    /// The usage of the live allocations on `node_id`, leaving out the ids in `skip` (allocations
    /// that the caller is about to add itself).
    pub fn live_on(state: &ClusterState, node_id: &str, skip: &BTreeSet<&str>) -> Usage {
        let mut u = Usage::default();
        for a in state.allocs_for_node(node_id).filter(|a| is_live(a) && !skip.contains(a.id.as_str())) {
            if let Some(r) = &a.resources {
                u.add(r);
            }
        }
        u
    }

    /// Adds one allocation's resources. Allocations from before GPU sharing carry only
    /// `gpu_ids`: each of those holds its whole device.
    pub fn add(&mut self, r: &AllocatedResources) {
        self.cpu_mhz = self.cpu_mhz.saturating_add(r.cpu_mhz);
        self.memory_mib = self.memory_mib.saturating_add(r.memory_mib);
        self.disk_mib = self.disk_mib.saturating_add(r.disk_mib);
        self.cores = self.cores.saturating_add(u64::from(r.cores));
        if r.gpus.is_empty() {
            for id in &r.gpu_ids {
                let used = self.gpu_milli.entry(id.clone()).or_default();
                *used = used.saturating_add(WHOLE);
            }
        } else {
            for g in &r.gpus {
                let used = self.gpu_milli.entry(g.id.clone()).or_default();
                *used = used.saturating_add(g.milli);
            }
        }
    }

    /// Free milli-GPUs of `device` under this usage.
    pub fn gpu_free(&self, device: &str) -> u32 {
        WHOLE.saturating_sub(self.gpu_milli.get(device).copied().unwrap_or(0))
    }
}

/// The first dimension in which `usage` exceeds the node's capacity, if any. GPUs are exhausted
/// when a device carries more than one whole GPU, a claimed id is not one of the node's
/// devices, or a request could not be backed by a free device.
pub fn exhausted(node: &Node, usage: &Usage) -> Option<Dimension> {
    let empty = NodeResources::default();
    let cap = node.resources.as_ref().unwrap_or(&empty);
    if usage.cpu_mhz > cap.cpu_total_mhz {
        return Some(Dimension::Cpu);
    }
    if usage.memory_mib > cap.memory_mib {
        return Some(Dimension::Memory);
    }
    if usage.disk_mib > cap.disk_mib {
        return Some(Dimension::Disk);
    }
    if usage.cores > u64::from(cap.cpu_cores) {
        return Some(Dimension::Cores);
    }
    let bad_device = usage
        .gpu_milli
        .iter()
        .any(|(id, &milli)| milli > WHOLE || !cap.gpus.iter().any(|g| &g.id == id));
    if usage.gpu_shortfall > 0 || bad_device {
        return Some(Dimension::Gpu);
    }
    None
}

/// A placement that fits: what the allocation gets, the node's usage afterwards, and the GPU
/// policy's cost (lower is better; 0 without GPUs).
#[derive(Debug, Clone, PartialEq)]
pub struct Fit {
    pub resources: AllocatedResources,
    pub after: Usage,
    pub gpu_cost: f64,
}

/// Tries to place `ask` on `node` on top of `usage` with the default policy and no workload
/// knowledge (see [`try_fit_with`]).
pub fn try_fit(node: &Node, usage: &Usage, ask: &Ask) -> Result<(AllocatedResources, Usage), Dimension> {
    try_fit_with(node, usage, ask, Policy::default(), &Workload::default()).map(|f| (f.resources, f.after))
}

/// Tries to place `ask` on `node` on top of `usage`: each GPU task's devices are chosen by
/// `policy` (`gpu::Policy::evaluate`, the simulator's rule) among the devices that accept it.
/// Returns the fit or the first exhausted dimension.
pub fn try_fit_with(node: &Node, usage: &Usage, ask: &Ask, policy: Policy, workload: &Workload) -> Result<Fit, Dimension> {
    let empty = NodeResources::default();
    let cap = node.resources.as_ref().unwrap_or(&empty);
    let mut res = AllocatedResources {
        cpu_mhz: ask.cpu_mhz,
        cores: ask.cores,
        memory_mib: ask.memory_mib,
        disk_mib: ask.disk_mib,
        ..Default::default()
    };
    let mut after = usage.clone();
    let mut gpu_cost = 0.0;
    let mut free: Vec<u32> = Vec::with_capacity(cap.gpus.len());
    // A CPU-only ask is still costed by the policy: its CPU and memory can strand GPUs.
    let cpu_only = [GpuAsk::default()];
    let asks: &[GpuAsk] = if ask.gpus.is_empty() { &cpu_only } else { &ask.gpus };
    for (i, g) in asks.iter().enumerate() {
        // Devices this task may not use look full to the policy.
        free.clear();
        free.extend(cap.gpus.iter().map(|d| if g.accepts(d) { after.gpu_free(&d.id) } else { 0 }));
        // CPU and memory are checked as a whole below; the view only carries them so that the
        // policy's fragmentation sees what the node has left.
        let (cpu, mem) = if i == 0 { (ask.cpu_mhz, ask.memory_mib) } else { (0, 0) };
        let view = NodeView {
            cpu_free: cap.cpu_total_mhz.saturating_sub(after.cpu_mhz).max(cpu),
            cpu_total: cap.cpu_total_mhz,
            mem_free: cap.memory_mib.saturating_sub(after.memory_mib).max(mem),
            model: 0,
            gpu_free: &free,
        };
        let pod = PodView { cpu, mem, gpu: g.shape, models: ModelSet::ANY };
        let frag_before = policy.baseline(&view, workload);
        match policy.evaluate(&view, &pod, workload, frag_before) {
            Some((cost, mask)) => {
                gpu_cost += cost;
                for (j, d) in cap.gpus.iter().enumerate().take(gpu::MAX_DEVICES).filter(|_| g.shape.count > 0) {
                    if mask & (1 << j) != 0 {
                        res.gpu_ids.push(d.id.clone());
                        res.gpus.push(GpuAssignment { id: d.id.clone(), milli: g.shape.milli });
                        let used = after.gpu_milli.entry(d.id.clone()).or_default();
                        *used = used.saturating_add(g.shape.milli);
                    }
                }
            }
            None => after.gpu_shortfall = after.gpu_shortfall.saturating_add(g.shape.count),
        }
    }
    after.cpu_mhz = after.cpu_mhz.saturating_add(res.cpu_mhz);
    after.memory_mib = after.memory_mib.saturating_add(res.memory_mib);
    after.disk_mib = after.disk_mib.saturating_add(res.disk_mib);
    after.cores = after.cores.saturating_add(u64::from(res.cores));
    match exhausted(node, &after) {
        Some(dim) => Err(dim),
        None => Ok(Fit { resources: res, after, gpu_cost }),
    }
}

/// Live allocations sampled for [`live_workload`]: enough for a distribution of shapes, and it
/// keeps each scheduling pass from walking a million allocations.
const WORKLOAD_SAMPLE: usize = 10_000;

/// The workload seen on the cluster: one pod type per live allocation's shape, FGD's target
/// distribution for the server (the trace simulator uses the trace's pod types instead). At most
/// [`WORKLOAD_SAMPLE`] allocations are looked at; allocation ids are random UUIDs, so the first
/// ones in id order are a uniform (and deterministic) sample.
pub fn live_workload(state: &ClusterState) -> Workload {
    let mut counts: BTreeMap<PodView, u64> = BTreeMap::new();
    for a in state.allocs.values().filter(|a| is_live(a)).take(WORKLOAD_SAMPLE) {
        let Some(r) = &a.resources else { continue };
        let shape = match r.gpus.first() {
            Some(g) => GpuShape { count: r.gpus.len() as u32, milli: g.milli },
            None => GpuShape::whole(r.gpu_ids.len() as u32),
        };
        let pod = PodView { cpu: r.cpu_mhz, mem: r.memory_mib, gpu: shape, models: ModelSet::ANY };
        *counts.entry(pod).or_default() += 1;
    }
    Workload::new(counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlp_proto::v1::{GpuRequest, Resources, Task};

    fn node(cpu: u64, mem: u64, gpus: &[&str]) -> Node {
        Node {
            id: "n1".into(),
            name: "n1".into(),
            resources: Some(NodeResources {
                cpu_cores: 4,
                cpu_total_mhz: cpu,
                memory_mib: mem,
                disk_mib: 1000,
                gpus: gpus.iter().map(|id| GpuDevice { id: (*id).into(), model: "A100".into(), memory_mib: 40_960, ..Default::default() }).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn whole(n: u32) -> Vec<GpuAsk> {
        vec![GpuAsk { shape: GpuShape::whole(n), ..Default::default() }]
    }

    fn share(milli: u32) -> Vec<GpuAsk> {
        vec![GpuAsk { shape: GpuShape::share(milli), ..Default::default() }]
    }

    #[test]
    fn ask_sums_tasks() {
        let task = |cpu, gpu: Option<GpuRequest>| Task {
            resources: Some(Resources { cpu_mhz: cpu, memory_mib: 10, gpu, ..Default::default() }),
            ..Default::default()
        };
        let tg = TaskGroup {
            tasks: vec![
                task(100, Some(GpuRequest { count: 1, ..Default::default() })),
                task(50, Some(GpuRequest { count: 1, share_milli: 250, models: vec!["V100M16".into()], memory_mib: 16_384, ..Default::default() })),
                Task::default(),
            ],
            ..Default::default()
        };
        let ask = Ask::for_group(&tg);
        assert_eq!((ask.cpu_mhz, ask.memory_mib, ask.gpu_count()), (150, 20, 2));
        assert_eq!(ask.gpus[1], GpuAsk { shape: GpuShape::share(250), models: vec!["V100M16".into()], memory_mib: 16_384 });
    }

    #[test]
    fn dimensions_are_checked_in_order() {
        let n = node(1000, 1000, &["g0"]);
        let cases: Vec<(Ask, Option<Dimension>)> = vec![
            (Ask { cpu_mhz: 1000, memory_mib: 1000, gpus: whole(1), ..Default::default() }, None),
            (Ask { cpu_mhz: 1001, memory_mib: 1001, ..Default::default() }, Some(Dimension::Cpu)),
            (Ask { memory_mib: 1001, gpus: whole(2), ..Default::default() }, Some(Dimension::Memory)),
            (Ask { disk_mib: 1001, ..Default::default() }, Some(Dimension::Disk)),
            (Ask { cores: 5, ..Default::default() }, Some(Dimension::Cores)),
            (Ask { gpus: whole(2), ..Default::default() }, Some(Dimension::Gpu)),
        ];
        for (ask, want) in &cases {
            assert_eq!(try_fit(&n, &Usage::default(), ask).err(), *want, "{ask:?}");
        }
    }

    #[test]
    fn gpus_are_assigned_from_free_devices_only() {
        let n = node(1000, 1000, &["g0", "g1", "g2"]);
        let mut used = Usage::default();
        used.add(&AllocatedResources { gpu_ids: vec!["g1".into()], ..Default::default() });
        let (res, after) = try_fit(&n, &used, &Ask { gpus: whole(2), ..Default::default() }).unwrap_or_else(|d| panic!("{d}"));
        assert_eq!(res.gpu_ids, vec!["g0".to_string(), "g2".to_string()]);
        assert_eq!(res.gpus.iter().map(|g| g.milli).collect::<Vec<_>>(), [1000, 1000]);
        assert_eq!(after.gpu_milli.len(), 3);
        assert_eq!(try_fit(&n, &after, &Ask { gpus: whole(1), ..Default::default() }).err(), Some(Dimension::Gpu));
    }

    #[test]
    fn shares_add_up_to_one_device_at_most() {
        let n = node(1000, 1000, &["g0", "g1"]);
        let mut u = Usage::default();
        // 0.6 then 0.4 share one device (packed), a further 0.4 needs the other one.
        let mut placed = Vec::new();
        for milli in [600, 400, 400] {
            let (res, after) = try_fit(&n, &u, &Ask { gpus: share(milli), ..Default::default() }).unwrap_or_else(|d| panic!("{d}"));
            placed.push(res.gpus.clone());
            u = after;
        }
        assert_eq!(placed[0], [GpuAssignment { id: "g0".into(), milli: 600 }]);
        assert_eq!(placed[1], [GpuAssignment { id: "g0".into(), milli: 400 }]);
        assert_eq!(placed[2], [GpuAssignment { id: "g1".into(), milli: 400 }]);
        assert_eq!(u.gpu_milli["g0"], 1000);
        // g1 has 600 free: a 0.7 share and a whole GPU no longer fit.
        assert_eq!(try_fit(&n, &u, &Ask { gpus: share(700), ..Default::default() }).err(), Some(Dimension::Gpu));
        assert_eq!(try_fit(&n, &u, &Ask { gpus: whole(1), ..Default::default() }).err(), Some(Dimension::Gpu));
        assert!(try_fit(&n, &u, &Ask { gpus: share(600), ..Default::default() }).is_ok());
        // The re-check uses the same arithmetic: one more milli on g0 is an overcommit.
        let mut over = u.clone();
        over.add(&AllocatedResources { gpus: vec![GpuAssignment { id: "g0".into(), milli: 1 }], gpu_ids: vec!["g0".into()], ..Default::default() });
        assert_eq!(exhausted(&n, &over), Some(Dimension::Gpu));
    }

    #[test]
    fn model_and_memory_constraints_pick_devices() {
        let mut n = node(1000, 1000, &["g0", "g1"]);
        if let Some(r) = n.resources.as_mut() {
            r.gpus[1].model = "V100M32".into();
            r.gpus[1].memory_mib = 32_768;
        }
        let ask = |models: &[&str], memory_mib| Ask {
            gpus: vec![GpuAsk { shape: GpuShape::whole(1), models: models.iter().map(|m| m.to_string()).collect(), memory_mib }],
            ..Default::default()
        };
        let ids = |a: &Ask| try_fit(&n, &Usage::default(), a).map(|(r, _)| r.gpu_ids);
        assert_eq!(ids(&ask(&["V100M16", "V100M32"], 0)), Ok(vec!["g1".to_string()]));
        assert_eq!(ids(&ask(&[], 41_000)), Err(Dimension::Gpu));
        assert_eq!(ids(&ask(&[], 40_000)), Ok(vec!["g0".to_string()]));
        assert_eq!(ids(&ask(&["H100"], 0)), Err(Dimension::Gpu));
    }

    #[test]
    fn double_claimed_or_unknown_gpu_is_exhausted() {
        let n = node(1000, 1000, &["g0"]);
        let mut u = Usage::default();
        u.add(&AllocatedResources { gpu_ids: vec!["g0".into()], ..Default::default() });
        assert_eq!(exhausted(&n, &u), None);
        u.add(&AllocatedResources { gpu_ids: vec!["g0".into()], ..Default::default() });
        assert_eq!(exhausted(&n, &u), Some(Dimension::Gpu));
        let mut u = Usage::default();
        u.add(&AllocatedResources { gpu_ids: vec!["nope".into()], ..Default::default() });
        assert_eq!(exhausted(&n, &u), Some(Dimension::Gpu));
    }
}
