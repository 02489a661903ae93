//! Resource arithmetic, shared by the scheduler and by the plan applier's re-check
//! (`check_node_fit`) so that both agree on what "fits" means: what a task group asks for, what a
//! node's live allocations use, and the first dimension that a node runs out of.

use std::collections::BTreeSet;
use std::fmt;

use mlp_proto::consts::{alloc_client, alloc_desired};
use mlp_proto::v1::{AllocatedResources, Allocation, Node, NodeResources, TaskGroup};

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

/// What one allocation of a task group asks for: the sum of its tasks' resources.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ask {
    pub cpu_mhz: u64,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub cores: u32,
    pub gpus: u32,
}

impl Ask {
    pub fn for_group(tg: &TaskGroup) -> Ask {
        let mut ask = Ask::default();
        for r in tg.tasks.iter().filter_map(|t| t.resources.as_ref()) {
            ask.cpu_mhz = ask.cpu_mhz.saturating_add(r.cpu_mhz);
            ask.memory_mib = ask.memory_mib.saturating_add(r.memory_mib);
            ask.disk_mib = ask.disk_mib.saturating_add(r.disk_mib);
            ask.cores = ask.cores.saturating_add(r.cores);
            ask.gpus = ask.gpus.saturating_add(r.gpu.as_ref().map_or(0, |g| g.count));
        }
        ask
    }
}

/// What is in use on one node. GPUs are tracked by device id; a device claimed twice is
/// remembered in `gpu_conflicts` so that the re-check can reject it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub cpu_mhz: u64,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub cores: u64,
    pub gpu_ids: BTreeSet<String>,
    pub gpu_conflicts: u32,
    /// GPUs asked for but not backed by a device id (only while trying a placement that lacks them).
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

    /// Adds one allocation's resources.
    pub fn add(&mut self, r: &AllocatedResources) {
        self.cpu_mhz = self.cpu_mhz.saturating_add(r.cpu_mhz);
        self.memory_mib = self.memory_mib.saturating_add(r.memory_mib);
        self.disk_mib = self.disk_mib.saturating_add(r.disk_mib);
        self.cores = self.cores.saturating_add(u64::from(r.cores));
        for id in &r.gpu_ids {
            if !self.gpu_ids.insert(id.clone()) {
                self.gpu_conflicts += 1;
            }
        }
    }
}

/// The first dimension in which `usage` exceeds the node's capacity, if any. GPUs are exhausted
/// when a device is claimed twice, a claimed id is not one of the node's devices, or a request
/// could not be backed by a free device.
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
    let unknown_gpu = usage.gpu_ids.iter().any(|id| !cap.gpus.iter().any(|g| &g.id == id));
    if usage.gpu_conflicts > 0 || usage.gpu_shortfall > 0 || unknown_gpu {
        return Some(Dimension::Gpu);
    }
    None
}

/// Tries to place `ask` on `node` on top of `usage`: picks free GPU devices (in the node's
/// device order, so the choice is deterministic) and returns the allocated resources and the
/// node's usage afterwards, or the first exhausted dimension.
pub fn try_fit(node: &Node, usage: &Usage, ask: &Ask) -> Result<(AllocatedResources, Usage), Dimension> {
    let gpu_ids: Vec<String> = node
        .resources
        .iter()
        .flat_map(|r| r.gpus.iter())
        .filter(|g| !usage.gpu_ids.contains(&g.id))
        .take(ask.gpus as usize)
        .map(|g| g.id.clone())
        .collect();
    let shortfall = ask.gpus.saturating_sub(gpu_ids.len() as u32);
    let res = AllocatedResources {
        cpu_mhz: ask.cpu_mhz,
        cores: ask.cores,
        memory_mib: ask.memory_mib,
        disk_mib: ask.disk_mib,
        gpu_ids,
    };
    let mut after = usage.clone();
    after.add(&res);
    after.gpu_shortfall = after.gpu_shortfall.saturating_add(shortfall);
    match exhausted(node, &after) {
        Some(dim) => Err(dim),
        None => Ok((res, after)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlp_proto::v1::{GpuDevice, GpuRequest, Resources, Task};

    fn node(cpu: u64, mem: u64, gpus: &[&str]) -> Node {
        Node {
            id: "n1".into(),
            name: "n1".into(),
            resources: Some(NodeResources {
                cpu_cores: 4,
                cpu_total_mhz: cpu,
                memory_mib: mem,
                disk_mib: 1000,
                gpus: gpus.iter().map(|id| GpuDevice { id: (*id).into(), ..Default::default() }).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn ask_sums_tasks() {
        let task = |cpu, gpu| Task {
            resources: Some(Resources { cpu_mhz: cpu, memory_mib: 10, gpu: Some(GpuRequest { count: gpu }), ..Default::default() }),
            ..Default::default()
        };
        let tg = TaskGroup { tasks: vec![task(100, 1), task(50, 2), Task::default()], ..Default::default() };
        assert_eq!(Ask::for_group(&tg), Ask { cpu_mhz: 150, memory_mib: 20, gpus: 3, ..Default::default() });
    }

    #[test]
    fn dimensions_are_checked_in_order() {
        let n = node(1000, 1000, &["g0"]);
        let cases: &[(Ask, Option<Dimension>)] = &[
            (Ask { cpu_mhz: 1000, memory_mib: 1000, gpus: 1, ..Default::default() }, None),
            (Ask { cpu_mhz: 1001, memory_mib: 1001, ..Default::default() }, Some(Dimension::Cpu)),
            (Ask { memory_mib: 1001, gpus: 2, ..Default::default() }, Some(Dimension::Memory)),
            (Ask { disk_mib: 1001, ..Default::default() }, Some(Dimension::Disk)),
            (Ask { cores: 5, ..Default::default() }, Some(Dimension::Cores)),
            (Ask { gpus: 2, ..Default::default() }, Some(Dimension::Gpu)),
        ];
        for (ask, want) in cases {
            assert_eq!(try_fit(&n, &Usage::default(), ask).err(), *want, "{ask:?}");
        }
    }

    #[test]
    fn gpus_are_assigned_from_free_devices_only() {
        let n = node(1000, 1000, &["g0", "g1", "g2"]);
        let mut used = Usage::default();
        used.add(&AllocatedResources { gpu_ids: vec!["g1".into()], ..Default::default() });
        let (res, after) = try_fit(&n, &used, &Ask { gpus: 2, ..Default::default() }).unwrap_or_else(|d| panic!("{d}"));
        assert_eq!(res.gpu_ids, vec!["g0".to_string(), "g2".to_string()]);
        assert_eq!(after.gpu_ids.len(), 3);
        assert_eq!(try_fit(&n, &after, &Ask { gpus: 1, ..Default::default() }).err(), Some(Dimension::Gpu));
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
