//! Placement of one task group's missing allocations: plain groups place what fits, gangs
//! place all their members (or `min_count` of them) in one plan or none, optionally inside one
//! topology domain (nodes sharing an attribute value), and both may preempt lower-priority
//! allocations when the job's type allows it.
//!
//! Preemption rule (documented in docs/scheduler.md): only allocations of other jobs whose
//! priority is at least `delta` below the job's are candidates; on each node the candidates are
//! taken lowest priority first, then smallest on the dimension that blocks, until the ask fits;
//! then every victim that is not needed after all is dropped again (last taken first). Among the
//! nodes the one whose victims have the lowest highest-priority wins, then the higher preference
//! score (affinities and spreads, `preference`), then the fewest victims, then the least freed,
//! then the node id. Members of gangs are never evicted by priority (evicting one would break
//! its gang).
//!
//! Fair share (issue 15 §6): an allocation of a namespace with a quota that holds no more than
//! its quota is never evicted for another namespace's job, whatever the priorities. What a
//! namespace holds beyond its quota (borrowed, up to its `borrow` limits) is taken back for a job
//! of a namespace that stays within its own quota with the ask placed: any priority, lowest
//! priority first, a gang whole (all its live members, wherever they run) or not at all, and
//! only while the namespace taken from is still borrowing.

use std::collections::{BTreeMap, BTreeSet};

use mlp_proto::v1::{AllocMetric, AllocatedResources, Allocation, Job, Node, TaskGroup};

use super::preference::{Preferences, Tally};
use super::rank::{self, RankInput, Scorer};
use super::reconcile::Want;
use super::resources::{self, Ask, Dimension, Usage};
use super::{candidates, feasible, gpu, quota};
use crate::state::ClusterState;

/// Preemption settings: whether each job type may preempt, and the priority gap it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preemption {
    pub batch: bool,
    pub service: bool,
    /// A victim's job priority must be at most the preemptor's minus this.
    pub delta: i32,
}

impl Default for Preemption {
    fn default() -> Self {
        Preemption { batch: true, service: true, delta: 10 }
    }
}

impl Preemption {
    /// Preemption turned off for every job type.
    pub fn off() -> Self {
        Preemption { batch: false, service: false, delta: 10 }
    }

    /// Whether a job of `job_type` may preempt.
    pub fn allowed_for(&self, job_type: &str) -> bool {
        match job_type {
            mlp_proto::consts::job_type::BATCH | mlp_proto::consts::job_type::SYSBATCH => self.batch,
            mlp_proto::consts::job_type::SERVICE => self.service,
            _ => false,
        }
    }

    /// Whether an allocation of a job with `victim` priority may be evicted for one with `by`.
    pub fn may_evict(&self, by: i32, victim: i32) -> bool {
        victim <= by.saturating_sub(self.delta.max(1))
    }
}

/// The gang rules of a group: how many members must be placed at once (0 = not a gang).
pub fn gang_size(tg: &TaskGroup) -> u32 {
    if tg.gang {
        tg.effective_count()
    } else {
        tg.min_count.min(tg.effective_count())
    }
}

/// What is used on each node during one scheduling pass: the state's live allocations minus the
/// ones this plan evicts, plus this plan's placements.
#[derive(Clone)]
pub struct Pass<'s> {
    state: &'s ClusterState,
    usage: BTreeMap<String, Usage>,
    planned: BTreeMap<String, Vec<AllocatedResources>>,
    /// Allocations this plan evicts (victim id → preemptor allocation id, filled on commit).
    pub evicted: BTreeSet<String>,
    /// Allocations this plan's reconciliation stops (a destructive update's old allocations):
    /// their CPU, memory and devices are free for its placements; their host ports are not,
    /// since the old task still serves on them until it is signalled (`shutdown_delay`).
    freed: BTreeSet<String>,
    /// The job's namespace quota, when it has one, with what the namespace holds (its live
    /// allocations minus this pass's evictions and reconcile stops, plus its placements).
    quota: Option<QuotaPass<'s>>,
}

/// A namespace's quota during one scheduling pass.
#[derive(Clone)]
struct QuotaPass<'s> {
    namespace: &'s str,
    /// The quota itself (the namespace's nominal share).
    spec: &'s mlp_proto::v1::QuotaSpec,
    /// What the namespace is held to: the quota plus its borrowing limits.
    hard: mlp_proto::v1::QuotaSpec,
    held: quota::Held,
}

impl<'s> Pass<'s> {
    pub fn new(state: &'s ClusterState) -> Self {
        Pass { state, usage: BTreeMap::new(), planned: BTreeMap::new(), evicted: BTreeSet::new(), freed: BTreeSet::new(), quota: None }
    }

    /// A pass whose placements may use what the allocations in `freed` hold (but their ports).
    pub fn freeing(state: &'s ClusterState, freed: BTreeSet<String>) -> Self {
        Pass { freed, ..Pass::new(state) }
    }

    /// A pass that also keeps the placements of `namespace` within its quota (none: as `new`).
    pub fn with_quota(state: &'s ClusterState, namespace: &'s str) -> Self {
        Pass::freeing_with_quota(state, namespace, BTreeSet::new())
    }

    /// `freeing` and `with_quota` together: the freed allocations count neither on their nodes
    /// nor against the quota.
    pub fn freeing_with_quota(state: &'s ClusterState, namespace: &'s str, freed: BTreeSet<String>) -> Self {
        let mut pass = Pass::freeing(state, freed);
        if let Some((ns, spec)) = state.namespaces.get_key_value(namespace).and_then(|(k, n)| Some((k.as_str(), n.quota.as_ref()?))) {
            let skip: BTreeSet<&str> = pass.freed.iter().map(String::as_str).collect();
            let held = quota::Held::of(state, ns, &skip);
            pass.quota = Some(QuotaPass { namespace: ns, spec, hard: quota::hard_limit(spec), held });
        }
        pass
    }

    /// Err(the quota's reason) when the ask alone (before a node is chosen) exceeds the quota.
    fn quota_admits_ask(&self, ask: &Ask) -> Result<(), String> {
        match &self.quota {
            Some(q) => quota::admits_ask(q.namespace, &q.hard, &q.held, ask),
            None => Ok(()),
        }
    }

    /// Whether the job's namespace may take borrowed capacity back from other namespaces for
    /// `ask`: it has a quota and stays within it (not borrowing itself) with the ask placed.
    fn may_reclaim(&self, ask: &Ask) -> bool {
        self.quota.as_ref().is_some_and(|q| quota::admits_ask(q.namespace, q.spec, &q.held, ask).is_ok())
    }

    /// Err(the quota's reason) when `res` on `node`, with `victims` evicted, exceeds the quota.
    fn quota_admits(&self, res: &AllocatedResources, node: &Node, victims: &[&Allocation]) -> Result<(), String> {
        let Some(q) = &self.quota else { return Ok(()) };
        let mut held = q.held.clone();
        for v in victims.iter().filter(|v| v.namespace == q.namespace) {
            if let Some(r) = &v.resources {
                held.sub(r, self.state.nodes.get(&v.node_id));
            }
        }
        quota::admits(q.namespace, &q.hard, &held, res, Some(node))
    }

    fn usage(&mut self, node_id: &str) -> &Usage {
        if !self.usage.contains_key(node_id) {
            let u = self.compute(node_id, &BTreeSet::new());
            self.usage.insert(node_id.to_string(), u);
        }
        &self.usage[node_id]
    }

    /// The node's usage with `also_evicted` gone as well as this pass's evictions.
    fn compute(&self, node_id: &str, also_evicted: &BTreeSet<&str>) -> Usage {
        let skip: BTreeSet<&str> = self
            .evicted
            .iter()
            .map(String::as_str)
            .chain(also_evicted.iter().copied())
            .chain(self.freed.iter().map(String::as_str))
            .collect();
        let mut u = Usage::live_on(self.state, node_id, &skip);
        for id in &self.freed {
            if let Some(a) = self.state.allocs.get(id).filter(|a| a.node_id == node_id) {
                u.ports.extend(a.resources.iter().flat_map(|r| r.ports.iter()).map(|p| p.host_port));
            }
        }
        for r in self.planned.get(node_id).into_iter().flatten() {
            u.add(r);
        }
        u
    }

    /// Records a placement of `res` on `node_id` that evicts `victims`. `after` is the node's
    /// usage with the placement added, when the caller computed it (a plain fit); without it,
    /// or with victims, the node's usage is computed again. Victims may run on other nodes too
    /// (a gang is evicted whole): those nodes' usages are dropped, to be computed again with
    /// the victims gone when next looked at.
    fn commit(&mut self, node_id: &str, res: &AllocatedResources, after: Option<Usage>, victims: &[&Allocation]) {
        if let Some(q) = self.quota.as_mut() {
            for v in victims.iter().filter(|v| v.namespace == q.namespace && !self.evicted.contains(&v.id)) {
                if let Some(r) = &v.resources {
                    q.held.sub(r, self.state.nodes.get(&v.node_id));
                }
            }
            q.held.add(res, self.state.nodes.get(node_id));
        }
        self.evicted.extend(victims.iter().map(|v| v.id.clone()));
        self.planned.entry(node_id.to_string()).or_default().push(res.clone());
        for v in victims.iter().filter(|v| v.node_id != node_id) {
            self.usage.remove(&v.node_id);
        }
        match after {
            Some(after) if victims.is_empty() => {
                self.usage.insert(node_id.to_string(), after);
            }
            _ => {
                // Recomputed from scratch: the victims are gone and the placement is added.
                let u = self.compute(node_id, &BTreeSet::new());
                self.usage.insert(node_id.to_string(), u);
            }
        }
    }
}

/// One member placed by an attempt.
#[derive(Clone)]
pub struct Placed<'a> {
    pub want: usize,
    pub node: &'a Node,
    pub resources: AllocatedResources,
    pub victims: Vec<String>,
    pub score: f64,
    /// The preference score P of the node when it was chosen (0 without preferences).
    pub preference: f64,
}

/// The outcome of placing a group's wants on a set of nodes.
pub struct Attempt<'a, 's> {
    pub placed: Vec<Placed<'a>>,
    /// Why the first unplaced want did not fit (None when all were placed).
    pub failure: Option<AllocMetric>,
    pub pass: Pass<'s>,
}

/// Everything an attempt needs to know about the job and group.
pub struct GroupCtx<'a> {
    pub job: &'a Job,
    pub tg: &'a TaskGroup,
    pub ask: Ask,
    pub scorer: &'a dyn Scorer,
    /// Some when this job may preempt.
    pub preemption: Option<Preemption>,
    /// The group's affinities and spreads; None when it has none (ranked exactly as before).
    pub prefs: Option<&'a Preferences>,
}

/// Places `wants` one by one on `nodes` (the best-scoring fit each; when none fits and
/// preemption is allowed, the cheapest eviction). Stops at the first want that cannot be placed.
pub fn attempt<'a, 's>(
    ctx: &GroupCtx<'a>,
    mut pass: Pass<'s>,
    nodes: &[&'a Node],
    wants: &[&Want<'_>],
    base: &AllocMetric,
) -> Attempt<'a, 's> {
    let no_workload = gpu::Workload::default();
    let workload = ctx.scorer.workload().unwrap_or(&no_workload);
    let mut placed = Vec::new();
    // Which nodes each placement scores: all, or a seeded sample on large clusters (candidates.rs).
    let seed = candidates::seed(&[&ctx.job.namespace, &ctx.job.id, &ctx.tg.name], pass.state.index);
    // Preferences: Nomad's max(count, 100) nodes, every affinity level and spread value among them.
    let mut order = match ctx.prefs {
        Some(p) => candidates::Candidates::preferring(nodes, &ctx.ask, seed, ctx.tg.effective_count(), |n| p.stratum(n)),
        None => candidates::Candidates::new(nodes, &ctx.ask, seed),
    };
    let mut tally = ctx.prefs.map(Preferences::tally);
    // Each visited node's devices, indexed once for all the wants (topology included).
    let mut gpus: BTreeMap<&'a str, resources::NodeGpus<'a>> = BTreeMap::new();
    for (i, _) in wants.iter().enumerate() {
        let mut metric = base.clone();
        // Over the namespace's quota whatever the node: no node is tried.
        if let Err(why) = pass.quota_admits_ask(&ctx.ask) {
            metric.dimension_exhausted.insert(why, 0);
            return Attempt { placed, failure: Some(metric), pass };
        }
        let mut best: Option<(f64, u32, f64, &'a Node, AllocatedResources, Usage)> = None;
        let mut blocked: Vec<(&'a Node, Dimension)> = Vec::new();
        order.visit(|node| {
            let before = pass.usage(&node.id).clone();
            match resources::try_fit_on(
                gpus.entry(node.id.as_str()).or_insert_with(|| resources::NodeGpus::new(node)),
                &before,
                &ctx.ask,
                ctx.scorer.gpu_policy(),
                workload,
            ) {
                Err(dim) => {
                    metric.nodes_exhausted += 1;
                    *metric.dimension_exhausted.entry(resources::exhausted_key(&ctx.ask, dim)).or_default() += 1;
                    blocked.push((node, dim));
                    false
                }
                Ok(resources::Fit { resources: res, after, gpu_cost, locality_rank: loc }) => {
                    // Devices of a model whose quota is spent do not fit (another model's may).
                    if let Err(why) = pass.quota_admits(&res, node, &[]) {
                        *metric.dimension_exhausted.entry(why).or_default() += 1;
                        return false;
                    }
                    let input = RankInput { job: ctx.job, group: ctx.tg, node, before: &before, after: &after, resources: &res, gpu_cost };
                    let score = ctx.scorer.score(&input);
                    let pref = preference_of(ctx, tally.as_ref(), node);
                    if best.as_ref().is_none_or(|(p, l, s, n, ..)| rank::better_ranked((pref, loc, score, &node.id), (*p, *l, *s, &n.id))) {
                        best = Some((pref, loc, score, node, res, after));
                    }
                    true
                }
            }
        });
        if let Some((preference, _, score, node, res, after)) = best {
            pass.commit(&node.id, &res, Some(after), &[]);
            if let (Some(p), Some(t)) = (ctx.prefs, tally.as_mut()) {
                p.record(node, t);
            }
            placed.push(Placed { want: i, node, resources: res, victims: Vec::new(), score, preference });
            continue;
        }
        if let Some(p) = ctx.preemption {
            if let Some((node, victims, res, score)) = cheapest_eviction(ctx, &pass, &blocked, p, workload, tally.as_ref()) {
                let state = pass.state;
                let refs: Vec<&Allocation> = victims.iter().filter_map(|id| state.allocs.get(id)).collect();
                if let Err(why) = pass.quota_admits(&res, node, &refs) {
                    *metric.dimension_exhausted.entry(why).or_default() += 1;
                    return Attempt { placed, failure: Some(metric), pass };
                }
                pass.commit(&node.id, &res, None, &refs);
                let preference = preference_of(ctx, tally.as_ref(), node);
                if let (Some(p), Some(t)) = (ctx.prefs, tally.as_mut()) {
                    p.record(node, t);
                }
                placed.push(Placed { want: i, node, resources: res, victims, score, preference });
                continue;
            }
        }
        return Attempt { placed, failure: Some(metric), pass };
    }
    Attempt { placed, failure: None, pass }
}

/// The preference score P of `node` for the next placement (0 when the group has none).
fn preference_of(ctx: &GroupCtx<'_>, tally: Option<&Tally>, node: &Node) -> f64 {
    match (ctx.prefs, tally) {
        (Some(p), Some(t)) => p.score(node, t),
        _ => 0.0,
    }
}

/// A candidate victim on a node: one allocation, or a whole gang (every live member, wherever it
/// runs) when borrowed capacity is taken back; its job's priority, its size on the blocking
/// dimension on this node, and the namespace it is taken back from (None: evicted by priority).
struct Candidate<'s> {
    allocs: Vec<&'s Allocation>,
    priority: i32,
    size: u64,
    reclaimed_from: Option<&'s str>,
}

/// The quota and holdings of the namespaces met while looking for victims (None: no quota).
type QuotaCache<'s> = BTreeMap<&'s str, Option<(&'s mlp_proto::v1::QuotaSpec, quota::Held)>>;

fn quota_state<'c, 's>(
    cache: &'c mut QuotaCache<'s>,
    pass: &Pass<'s>,
    namespace: &'s str,
) -> Option<&'c (&'s mlp_proto::v1::QuotaSpec, quota::Held)> {
    let state = pass.state;
    cache
        .entry(namespace)
        .or_insert_with(|| {
            let q = quota::quota_of(state, namespace)?;
            let skip: BTreeSet<&str> = pass.evicted.iter().chain(pass.freed.iter()).map(String::as_str).collect();
            Some((q, quota::Held::of(state, namespace, &skip)))
        })
        .as_ref()
}

fn size_on(r: &AllocatedResources, dim: Dimension) -> u64 {
    match dim {
        Dimension::Cpu => r.cpu_mhz,
        Dimension::Memory => r.memory_mib,
        Dimension::Disk => r.disk_mib,
        Dimension::Cores => u64::from(r.cores),
        Dimension::Gpu => {
            if r.gpus.is_empty() {
                r.gpu_ids.len() as u64 * u64::from(gpu::WHOLE)
            } else {
                r.gpus.iter().map(|g| u64::from(g.milli)).sum()
            }
        }
        Dimension::GpuMemory => r.gpus.iter().filter(|g| g.milli < gpu::WHOLE).map(|g| g.memory_mib).sum(),
        Dimension::Port | Dimension::DynamicPort => r.ports.len() as u64,
    }
}

/// How an eviction option ranks (smaller is better): the highest victim priority, the number
/// of victims, what they free on the blocking dimension, the node id. The node's preference
/// score ranks right after the highest victim priority (see `evicts_better`).
type EvictionKey = (i32, usize, u64, String);

/// One eviction option: its key, the node's preference score, the node, the victims, the
/// resources the placement gets and its score.
type EvictionOption<'a> = (EvictionKey, f64, &'a Node, Vec<String>, AllocatedResources, f64);

/// Whether eviction option `a` (key, preference) beats `b`: the lower highest victim priority,
/// then the higher preference score, then the rest of the key. Without preferences every
/// option has preference 0 and this is the plain key order.
fn evicts_better(a: (&EvictionKey, f64), b: (&EvictionKey, f64)) -> bool {
    match a.0 .0.cmp(&b.0 .0) {
        std::cmp::Ordering::Less => return true,
        std::cmp::Ordering::Greater => return false,
        std::cmp::Ordering::Equal => {}
    }
    if a.1 != b.1 {
        return a.1 > b.1;
    }
    a.0 < b.0
}

/// The cheapest set of evictions (see the module rule) that lets the ask fit on one of the
/// `blocked` nodes: (node, victim ids, resources, score).
fn cheapest_eviction<'a>(
    ctx: &GroupCtx<'a>,
    pass: &Pass<'_>,
    blocked: &[(&'a Node, Dimension)],
    p: Preemption,
    workload: &gpu::Workload,
    tally: Option<&Tally>,
) -> Option<(&'a Node, Vec<String>, AllocatedResources, f64)> {
    let state = pass.state;
    // (max victim priority, victims, freed, node id) → smaller is better; see `evicts_better`.
    let mut best: Option<EvictionOption<'a>> = None;
    let reclaim = pass.may_reclaim(&ctx.ask);
    let mut quotas: QuotaCache<'_> = BTreeMap::new();
    for &(node, dim) in blocked {
        let mut cands: Vec<Candidate<'_>> = Vec::new();
        let mut gangs_seen: BTreeSet<(&str, &str, &str)> = BTreeSet::new();
        for a in state.live_allocs_for_node(&node.id) {
            if pass.evicted.contains(&a.id) || (a.namespace == ctx.job.namespace && a.job_id == ctx.job.id) {
                continue;
            }
            let Some(job) = state.job(&a.namespace, &a.job_id) else { continue };
            let gang = job.groups.iter().any(|g| g.name == a.task_group && gang_size(g) > 0);
            let other_ns = a.namespace != ctx.job.namespace;
            // A namespace with a quota that holds no more than it keeps what it holds against
            // other namespaces' priorities; what it borrowed, others within their quotas take back.
            let (protected, borrowed) = match quota_state(&mut quotas, pass, a.namespace.as_str()) {
                Some((q, held)) if other_ns => {
                    let b = quota::borrowing(q, held);
                    (!b, b)
                }
                _ => (false, false),
            };
            let by_priority = !gang && !protected && p.may_evict(ctx.job.priority, job.priority);
            let by_reclaim = reclaim && other_ns && borrowed;
            if !by_priority && !by_reclaim {
                continue;
            }
            // A gang member is never evicted alone: a taken-back gang goes whole.
            let allocs: Vec<&Allocation> = if gang {
                if !gangs_seen.insert((a.namespace.as_str(), a.job_id.as_str(), a.task_group.as_str())) {
                    continue;
                }
                state
                    .allocs_for_job(&a.namespace, &a.job_id)
                    .filter(|m| m.task_group == a.task_group && resources::is_live(m) && !pass.evicted.contains(&m.id))
                    .collect()
            } else {
                vec![a]
            };
            let size = allocs.iter().filter(|m| m.node_id == node.id).filter_map(|m| m.resources.as_ref()).map(|r| size_on(r, dim)).sum();
            let reclaimed_from = (!by_priority).then_some(a.namespace.as_str());
            cands.push(Candidate { allocs, priority: job.priority, size, reclaimed_from });
        }
        if cands.is_empty() {
            continue;
        }
        cands.sort_by(|a, b| (a.priority, a.size, &a.allocs[0].id).cmp(&(b.priority, b.size, &b.allocs[0].id)));
        let gpus = resources::NodeGpus::new(node);
        let fits = |gone: &BTreeSet<&str>| {
            let before = pass.compute(&node.id, gone);
            resources::try_fit_on(&gpus, &before, &ctx.ask, ctx.scorer.gpu_policy(), workload).ok().map(|f| (before, f))
        };
        let mut gone: BTreeSet<&str> = BTreeSet::new();
        let mut taken: Vec<&Candidate<'_>> = Vec::new();
        let mut fit = None;
        // What each namespace taken back from holds as its victims are taken: only what it
        // borrowed is taken back, never what its quota gives it.
        let mut lenders: BTreeMap<&str, quota::Held> = BTreeMap::new();
        for c in &cands {
            if let Some(ns) = c.reclaimed_from {
                let Some((q, held)) = quota_state(&mut quotas, pass, ns).cloned() else { continue };
                let held = lenders.entry(ns).or_insert(held);
                if !quota::borrowing(q, held) {
                    continue;
                }
                for m in &c.allocs {
                    if let Some(r) = &m.resources {
                        held.sub(r, state.nodes.get(&m.node_id));
                    }
                }
            }
            gone.extend(c.allocs.iter().map(|m| m.id.as_str()));
            taken.push(c);
            if let Some(f) = fits(&gone) {
                fit = Some(f);
                break;
            }
        }
        if fit.is_none() {
            continue;
        }
        // Drop victims that turned out not to be needed, last taken first.
        for i in (0..taken.len()).rev() {
            let ids: Vec<&str> = taken[i].allocs.iter().map(|m| m.id.as_str()).collect();
            for id in &ids {
                gone.remove(id);
            }
            match fits(&gone) {
                Some(f) => {
                    fit = Some(f);
                    taken.remove(i);
                }
                None => {
                    gone.extend(ids);
                }
            }
        }
        let Some((before, f)) = fit.or_else(|| fits(&gone)) else {
            continue;
        };
        let key = (
            taken.iter().map(|c| c.priority).max().unwrap_or(i32::MIN),
            taken.len(),
            taken.iter().map(|c| c.size).sum::<u64>(),
            node.id.clone(),
        );
        let pref = preference_of(ctx, tally, node);
        if best.as_ref().is_none_or(|(k, bp, ..)| evicts_better((&key, pref), (k, *bp))) {
            let input = RankInput {
                job: ctx.job,
                group: ctx.tg,
                node,
                before: &before,
                after: &f.after,
                resources: &f.resources,
                gpu_cost: f.gpu_cost,
            };
            let score = ctx.scorer.score(&input);
            let ids = taken.iter().flat_map(|c| c.allocs.iter().map(|m| m.id.clone())).collect();
            best = Some((key, pref, node, ids, f.resources, score));
        }
    }
    best.map(|(_, _, node, ids, res, score)| (node, ids, res, score))
}

/// The topology domains of a gang: feasible nodes grouped by the attribute's value (one domain
/// of all feasible nodes without a topology). Nodes without the attribute are left out and
/// counted in `base`. `pinned` restricts the domains to one value (where live members run).
pub fn domains<'a>(tg: &TaskGroup, feasible: &[&'a Node], pinned: Option<&str>, base: &mut AllocMetric) -> Vec<(String, Vec<&'a Node>)> {
    if tg.gang_topology.trim().is_empty() {
        return vec![(String::new(), feasible.to_vec())];
    }
    let mut by_value: BTreeMap<String, Vec<&'a Node>> = BTreeMap::new();
    for &n in feasible {
        match feasible::topology_value(&tg.gang_topology, n) {
            Some(v) if pinned.is_none_or(|p| p == v) => by_value.entry(v).or_default().push(n),
            Some(_) => {}
            None => {
                base.nodes_filtered += 1;
                *base.constraint_filtered.entry(format!("gang_topology {} is_set", tg.gang_topology.trim())).or_default() += 1;
            }
        }
    }
    by_value.into_iter().collect()
}
