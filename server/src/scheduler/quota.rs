//! Namespace quotas (issue 15 §5): what a namespace's live allocations hold, and whether one
//! more placement stays within the namespace's `QuotaSpec`. Shared by the scheduler (which never
//! places beyond a quota) and the plan applier (which re-checks a plan against the latest state
//! plus the plans still in flight).
//!
//! Dimensions: `cpu` (MHz), `memory` (MiB), `gpus` (in thousandths: a whole device is 1000, a
//! share its milli, a MIG instance its milli) and `gpus of model M` (the devices whose
//! fingerprinted model is M). A dimension the quota leaves unset does not limit.
//!
//! Borrowing (issue 15 §6, Kueue's cohorts with the whole cluster as the one cohort): a quota's
//! `borrow` block lets the namespace go that far beyond its quota into idle capacity. The
//! scheduler and the plan applier hold a namespace to its [`hard_limit`] (quota plus borrow);
//! what it holds beyond its quota is borrowed ([`borrowing`]), and a namespace that stays
//! within its own quota takes it back by preemption (`place::cheapest_eviction`).

use std::collections::{BTreeMap, BTreeSet};

use mlp_proto::v1::{AllocatedResources, Allocation, Namespace, NamespaceUsage, Node, QuotaSpec};

use super::gpu;
use super::resources::is_live;
use crate::state::ClusterState;

/// What a namespace holds (GPUs in thousandths).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    pub cpu_mhz: u64,
    pub memory_mib: u64,
    pub gpu_milli: u64,
    pub gpu_milli_by_model: BTreeMap<String, u64>,
    pub allocations: u32,
}

impl Held {
    /// Adds one allocation's resources; `node` resolves its devices' models (an allocation
    /// on a node the state no longer knows counts towards `gpus`, not towards any model).
    pub fn add(&mut self, r: &AllocatedResources, node: Option<&Node>) {
        self.cpu_mhz = self.cpu_mhz.saturating_add(r.cpu_mhz);
        self.memory_mib = self.memory_mib.saturating_add(r.memory_mib);
        self.allocations = self.allocations.saturating_add(1);
        let devices = node.and_then(|n| n.resources.as_ref()).map(|r| r.gpus.as_slice()).unwrap_or_default();
        let model_of = |id: &str| devices.iter().find(|d| d.id == id).map(|d| d.model.clone());
        // Allocations written before `gpus` existed list whole devices in `gpu_ids` only.
        let assignments: Vec<(String, u64)> = if r.gpus.is_empty() {
            r.gpu_ids.iter().map(|id| (id.clone(), u64::from(gpu::WHOLE))).collect()
        } else {
            r.gpus.iter().map(|g| (g.id.clone(), u64::from(g.milli))).collect()
        };
        for (id, milli) in assignments {
            self.gpu_milli = self.gpu_milli.saturating_add(milli);
            if let Some(model) = model_of(&id) {
                let slot = self.gpu_milli_by_model.entry(model).or_default();
                *slot = slot.saturating_add(milli);
            }
        }
    }

    /// Takes one allocation's resources off again (an eviction).
    pub fn sub(&mut self, r: &AllocatedResources, node: Option<&Node>) {
        let mut one = Held::default();
        one.add(r, node);
        self.cpu_mhz = self.cpu_mhz.saturating_sub(one.cpu_mhz);
        self.memory_mib = self.memory_mib.saturating_sub(one.memory_mib);
        self.gpu_milli = self.gpu_milli.saturating_sub(one.gpu_milli);
        self.allocations = self.allocations.saturating_sub(1);
        for (m, v) in one.gpu_milli_by_model {
            if let Some(slot) = self.gpu_milli_by_model.get_mut(&m) {
                *slot = slot.saturating_sub(v);
            }
        }
    }

    /// The live allocations of `namespace` in `state`, leaving out the ids in `skip` (stopped or
    /// evicted by the plan being checked, or about to be added by the caller). Walks the
    /// namespace's jobs, so namespaces without a quota never pay for it.
    pub fn of(state: &ClusterState, namespace: &str, skip: &BTreeSet<&str>) -> Held {
        let mut held = Held::default();
        for a in live_allocs(state, namespace).filter(|a| !skip.contains(a.id.as_str())) {
            if let Some(r) = &a.resources {
                held.add(r, state.nodes.get(&a.node_id));
            }
        }
        held
    }

    pub fn view(&self) -> NamespaceUsage {
        NamespaceUsage {
            cpu_mhz: self.cpu_mhz,
            memory_mib: self.memory_mib,
            gpu_milli: self.gpu_milli,
            gpu_milli_by_model: self.gpu_milli_by_model.clone(),
            live_allocations: self.allocations,
            ..Default::default()
        }
    }
}

/// The jobs of a namespace: a range of `ClusterState::jobs` (keyed `namespace/job`; names
/// hold no '/'), so O(the namespace's jobs).
pub fn jobs_in<'a>(state: &'a ClusterState, namespace: &'a str) -> impl Iterator<Item = &'a mlp_proto::v1::Job> + 'a {
    // '0' is the character after '/'.
    state.jobs.range(format!("{namespace}/")..format!("{namespace}0")).map(|(_, j)| j).filter(move |j| j.namespace == namespace)
}

/// The live allocations of a namespace.
pub fn live_allocs<'a>(state: &'a ClusterState, namespace: &'a str) -> impl Iterator<Item = &'a Allocation> + 'a {
    jobs_in(state, namespace).flat_map(move |j| state.allocs_for_job(&j.namespace, &j.id)).filter(|a| is_live(a))
}

/// The quota of `namespace`, if it has one (`default` has one only if it was applied with one).
pub fn quota_of<'a>(state: &'a ClusterState, namespace: &str) -> Option<&'a QuotaSpec> {
    state.namespaces.get(namespace).and_then(|n: &Namespace| n.quota.as_ref())
}

/// The borrowing limit of a quota's GPUs in thousandths (0 without a `borrow` block).
pub fn gpu_borrow(q: &QuotaSpec) -> u64 {
    match q.borrow.as_ref() {
        Some(b) => match (b.gpus, b.gpu_milli) {
            (Some(g), _) => g.saturating_mul(u64::from(gpu::WHOLE)),
            (None, m) => m.unwrap_or(0),
        },
        None => 0,
    }
}

/// The limits a namespace is held to: its quota plus what it may borrow, per dimension (the
/// quota itself when it borrows nothing). Model limits are not borrowed.
pub fn hard_limit(q: &QuotaSpec) -> QuotaSpec {
    let Some(b) = q.borrow.as_ref() else { return q.clone() };
    let plus = |limit: Option<u64>, more: Option<u64>| limit.map(|l| l.saturating_add(more.unwrap_or(0)));
    QuotaSpec {
        cpu_mhz: plus(q.cpu_mhz, b.cpu_mhz),
        memory_mib: plus(q.memory_mib, b.memory_mib),
        gpus: None,
        gpu_milli: gpu_limit(q).map(|l| l.saturating_add(gpu_borrow(q))),
        gpu_models: q.gpu_models.clone(),
        borrow: None,
    }
}

/// Whether `held` is beyond the quota itself on some dimension: the namespace holds borrowed
/// capacity, which namespaces within their own quotas may take back.
pub fn borrowing(q: &QuotaSpec, held: &Held) -> bool {
    q.cpu_mhz.is_some_and(|l| held.cpu_mhz > l)
        || q.memory_mib.is_some_and(|l| held.memory_mib > l)
        || gpu_limit(q).is_some_and(|l| held.gpu_milli > l)
}

/// The GPU limit of a quota in thousandths (`gpus` whole devices or `gpu_milli`).
pub fn gpu_limit(q: &QuotaSpec) -> Option<u64> {
    match (q.gpus, q.gpu_milli) {
        (Some(g), _) => Some(g.saturating_mul(u64::from(gpu::WHOLE))),
        (None, m) => m,
    }
}

/// Thousandths as GPUs: `4`, `2.5`, `0.125`.
pub fn gpus_text(milli: u64) -> String {
    let whole = milli / u64::from(gpu::WHOLE);
    let frac = milli % u64::from(gpu::WHOLE);
    if frac == 0 {
        whole.to_string()
    } else {
        format!("{whole}.{}", format!("{frac:03}").trim_end_matches('0'))
    }
}

/// Whether `after` is within `q`; Err names the first exhausted dimension with what is held
/// (`before`), the limit, and what the placement asks more:
/// `quota of namespace "team-a" exhausted: gpus 4/4 in use, 1 more asked`.
pub fn check(namespace: &str, q: &QuotaSpec, before: &Held, after: &Held) -> Result<(), String> {
    let over = |what: String| Err(format!("quota of namespace {namespace:?} exhausted: {what}"));
    if let Some(l) = q.cpu_mhz.filter(|l| after.cpu_mhz > *l) {
        return over(format!("cpu {}/{l} MHz in use, {} more asked", before.cpu_mhz, after.cpu_mhz.saturating_sub(before.cpu_mhz)));
    }
    if let Some(l) = q.memory_mib.filter(|l| after.memory_mib > *l) {
        return over(format!(
            "memory {}/{l} MiB in use, {} more asked",
            before.memory_mib,
            after.memory_mib.saturating_sub(before.memory_mib)
        ));
    }
    if let Some(l) = gpu_limit(q).filter(|l| after.gpu_milli > *l) {
        return over(format!(
            "gpus {}/{} in use, {} more asked",
            gpus_text(before.gpu_milli),
            gpus_text(l),
            gpus_text(after.gpu_milli.saturating_sub(before.gpu_milli))
        ));
    }
    for m in &q.gpu_models {
        let used = |h: &Held| h.gpu_milli_by_model.get(&m.model).copied().unwrap_or(0);
        if let Some(l) = m.gpu_milli.filter(|l| used(after) > *l) {
            return over(format!(
                "gpus of model {:?} {}/{} in use, {} more asked",
                m.model,
                gpus_text(used(before)),
                gpus_text(l),
                gpus_text(used(after).saturating_sub(used(before)))
            ));
        }
    }
    Ok(())
}

/// Whether `held` plus `extra` stays within `q` (see [`check`]).
pub fn admits(namespace: &str, q: &QuotaSpec, held: &Held, extra: &AllocatedResources, node: Option<&Node>) -> Result<(), String> {
    let mut after = held.clone();
    after.add(extra, node);
    check(namespace, q, held, &after)
}

/// The part of a group's ask the quota can judge before a node is chosen (cpu, memory, GPU
/// thousandths; models are only known once devices are picked).
pub fn admits_ask(namespace: &str, q: &QuotaSpec, held: &Held, ask: &super::resources::Ask) -> Result<(), String> {
    let mut after = held.clone();
    after.cpu_mhz = after.cpu_mhz.saturating_add(ask.cpu_mhz);
    after.memory_mib = after.memory_mib.saturating_add(ask.memory_mib);
    // MIG instances count what the instance's assignment says: checked per node.
    let gpus: u64 = ask.gpus.iter().filter(|g| g.mig_profile.is_empty()).map(|g| g.shape.total_milli()).sum();
    after.gpu_milli = after.gpu_milli.saturating_add(gpus);
    // Model limits are checked per node (the devices decide the model).
    let q = QuotaSpec { gpu_models: Vec::new(), ..q.clone() };
    check(namespace, &q, held, &after).map_err(|why| {
        // An ask that could never fit, even in an idle namespace, says so.
        let alone = Held { cpu_mhz: ask.cpu_mhz, memory_mib: ask.memory_mib, gpu_milli: gpus, ..Default::default() };
        if check(namespace, &q, &Held::default(), &alone).is_err() {
            format!("{why}; one allocation of the group asks more than the whole quota")
        } else {
            why
        }
    })
}

/// Whether the namespace's live allocations are within its quota (what the property tests
/// check after every plan).
pub fn within(namespace: &str, q: &QuotaSpec, held: &Held) -> Result<(), String> {
    check(namespace, q, held, held)
}

/// What the usable nodes offer in all (cpu MHz, memory MiB, GPUs in thousandths): the
/// denominators of dominant-resource shares.
pub fn cluster_capacity(state: &ClusterState) -> Held {
    let mut cap = Held::default();
    for n in state.nodes.values().filter(|n| n.status == mlp_proto::consts::node_status::READY) {
        if let Some(r) = &n.resources {
            cap.cpu_mhz = cap.cpu_mhz.saturating_add(r.cpu_total_mhz);
            cap.memory_mib = cap.memory_mib.saturating_add(r.memory_mib);
            cap.gpu_milli = cap.gpu_milli.saturating_add(r.gpus.len() as u64 * u64::from(gpu::WHOLE));
        }
    }
    cap
}

/// A namespace's dominant share (DRF, Ghodsi et al. 2011): the largest fraction of the
/// cluster's capacity it holds of any one resource (a resource the cluster has none of counts 0).
pub fn dominant_share(held: &Held, capacity: &Held) -> f64 {
    let frac = |h: u64, c: u64| if c == 0 { 0.0 } else { h as f64 / c as f64 };
    frac(held.cpu_mhz, capacity.cpu_mhz).max(frac(held.memory_mib, capacity.memory_mib)).max(frac(held.gpu_milli, capacity.gpu_milli))
}

/// The dominant share of what `namespace`'s live allocations hold in `state`.
pub fn share_of(state: &ClusterState, namespace: &str, capacity: &Held) -> f64 {
    dominant_share(&Held::of(state, namespace, &BTreeSet::new()), capacity)
}

/// Which of `waiting` (each a namespace and its place in the priority-then-submit order) gets
/// freed capacity next: the one of the namespace with the smallest dominant share, and within
/// a namespace the first in that order (ties between namespaces: the first in that order).
pub fn next_fair<'a>(waiting: impl IntoIterator<Item = &'a str>, share: impl Fn(&str) -> f64) -> Option<usize> {
    let mut best: Option<(f64, usize)> = None;
    for (i, ns) in waiting.into_iter().enumerate() {
        let s = share(ns);
        if best.is_none_or(|(b, _)| s < b) {
            best = Some((s, i));
        }
    }
    best.map(|(_, i)| i)
}

/// Whether `reason` (a placement failure's dimension) is a quota's.
pub fn is_quota_reason(reason: &str) -> bool {
    reason.starts_with("quota of namespace ")
}
