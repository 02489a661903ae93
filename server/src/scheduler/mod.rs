//! The scheduler: a pure library. A snapshot of the cluster state and an evaluation in, a plan out.
//! No I/O, clock, locks or async; the output depends only on the inputs, except for the fresh
//! allocation ids.
//!
//! Module map:
//! * `reconcile` — existing allocations vs. the job: what to stop, which indexes to place;
//! * `feasible` — node readiness, drivers and constraints (`regexp`, `version` and `semver` through `mlp_proto::matcher`);
//! * `resources` — resource arithmetic shared with the plan applier (`check_node_fit`);
//! * `gpu` — GPU devices, shares and the placement policies (FGD and mlp's default), shared
//!   with the trace simulator (`crate::sim`);
//! * `learned` — the learned workload: a decayed histogram of recent GPU asks, kept in the
//!   replicated state, that the GPU policy plans for (shared with `mlp sim --online`);
//! * `topology` — GPU locality (NVLink, PCIe switch, NUMA) of a node's devices: which devices a
//!   multi-GPU ask gets, and its locality rank (ranked before the score);
//! * `place` — one group's placements: plain, gangs (all or nothing, per topology domain) and
//!   preemption of lower-priority allocations;
//! * `rank` — the swappable `Scorer` (the GPU policy's cost, then bin-packing, by default);
//! * `preference` — affinities and spreads as a preference score that ranks before the scorer;
//! * `candidates` — which feasible nodes a placement scores (all, or a seeded sample of the
//!   GPU-less nodes on large clusters);
//! * `ports` — host ports as a node resource: static ports checked, dynamic ones picked from the
//!   node's range; the rendezvous of gang members (rank 0's address and port);
//! * `quota` — namespace quotas: what a namespace holds, and whether a placement stays within
//!   its quota (the scheduler treats an over-quota fit as no fit; the plan applier re-checks);
//! * `explain` — human lines for placement failures.

pub mod candidates;
mod explain;
pub mod feasible;
pub mod gpu;
pub mod learned;
pub mod place;
pub mod ports;
pub mod preference;
pub mod quota;
pub mod rank;
mod reconcile;
pub mod resources;
pub mod system;
#[cfg(test)]
mod system_tests;
pub mod topology;

use std::collections::{BTreeMap, BTreeSet};

use mlp_proto::consts::{alloc_client, alloc_desired};
use mlp_proto::v1::{AllocMetric, AllocatedResources, Allocation, Evaluation, Job, Node};

pub use explain::explain;
pub use place::Preemption;
pub use rank::{BinPack, Fragmentation, RankInput, Scorer};
pub use reconcile::{fmt_ms, holds_index, spec_changed};

use crate::state::{AllocStop, ClusterState};
use reconcile::Want;
use resources::Ask;

/// What one scheduling pass wants to change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub eval_id: String,
    /// New allocations, with ids, node ids and resources filled in.
    pub placements: Vec<Allocation>,
    /// Allocations to stop (or mark lost, or evict for a preemptor).
    pub stops: Vec<AllocStop>,
    /// Per task group: why placements failed.
    pub failed_tg_allocs: BTreeMap<String, AllocMetric>,
    /// Per task group: how many allocations could not be placed.
    pub queued_allocations: BTreeMap<String, u32>,
    /// Placement ids that the plan applier accepts or rejects together (one gang each).
    pub atomic: Vec<Vec<String>>,
    /// Evictions: each victim's stop stands only if its preemptor's placement is accepted.
    pub preemptions: Vec<Preempted>,
    /// Follow-up evaluations (delayed rescheduling, `wait_until_ms`).
    pub new_evals: Vec<Evaluation>,
    /// Rescheduling notes on allocations not (yet) replaced.
    pub annotations: Vec<crate::state::AllocAnnotation>,
    /// Placement id → the preference score P its node had when chosen, for placements of
    /// groups with affinities or spreads (shown by `mlp job plan`).
    pub preferences: BTreeMap<String, f64>,
    /// A deployment this pass starts (issue 16 §1), and the older ones it cancels.
    pub deployment: Option<mlp_proto::v1::Deployment>,
    pub cancel_deployments: Vec<String>,
    /// Set when placements were left out because of the namespace's quota (not capacity): the
    /// quota's reason, e.g. `quota of namespace "team-a" exhausted: gpus 4/4`.
    pub quota_limit_reached: Option<String>,
}

/// One allocation evicted for a higher-priority placement.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Preempted {
    pub victim: String,
    pub by_alloc: String,
    /// `namespace/job` of the preemptor.
    pub by_job: String,
}

/// Scheduler settings that come from the server's configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    pub preemption: Preemption,
}

/// Computes the plan for `eval` against `state`. `job` is the job to schedule (None when it was purged).
/// The default scorer plans GPUs against the learned workload ([`planned_workload`]).
pub fn schedule(state: &ClusterState, job: Option<&Job>, eval: &Evaluation, now_ms: u64) -> Plan {
    schedule_opts(state, job, eval, now_ms, Options::default())
}

/// `schedule` with explicit options (preemption settings).
pub fn schedule_opts(state: &ClusterState, job: Option<&Job>, eval: &Evaluation, now_ms: u64, opts: Options) -> Plan {
    let scorer = Fragmentation { policy: gpu::Policy::default(), workload: planned_workload(state) };
    schedule_full(state, job, eval, now_ms, &scorer, opts)
}

/// The workload the default scorer plans GPUs for: the learned histogram of recent GPU asks
/// (`learned`, the rule `mlp sim --online` measures); on a state that has learned nothing yet
/// (one restored from before the histogram existed), the shapes of the live allocations.
pub fn planned_workload(state: &ClusterState) -> gpu::Workload {
    if state.learned.is_empty() {
        resources::live_workload(state)
    } else {
        state.learned.workload()
    }
}

/// `schedule` with a chosen scorer (and no preemption, as in the trace simulator).
pub fn schedule_with(state: &ClusterState, job: Option<&Job>, eval: &Evaluation, now_ms: u64, scorer: &dyn Scorer) -> Plan {
    schedule_full(state, job, eval, now_ms, scorer, Options { preemption: Preemption::off() })
}

/// With the `fault-injection` feature (test builds), a job whose meta has this key makes the
/// scheduler panic.
#[cfg(feature = "fault-injection")]
pub const FAULT_INJECTION_PANIC: &str = "mlp.fault-injection.panic";

/// The scheduler proper.
///
/// Capacity freed by this plan's own reconcile stops (a destructive update's old allocations)
/// and by its evictions is reused by its placements, except the stopped allocations' host ports;
/// the plan applier counts both as freed when it re-checks the plan.
pub fn schedule_full(state: &ClusterState, job: Option<&Job>, eval: &Evaluation, now_ms: u64, scorer: &dyn Scorer, opts: Options) -> Plan {
    #[cfg(feature = "fault-injection")]
    if job.is_some_and(|j| j.meta.contains_key(FAULT_INJECTION_PANIC)) {
        panic!("fault injection: {FAULT_INJECTION_PANIC} is set on job {:?}", job.map(|j| &j.id));
    }
    // System and sysbatch jobs are reconciled per node (issue 16 §2).
    if let Some(j) =
        job.filter(|j| !j.stop && mlp_proto::consts::job_type::is_per_node(&j.r#type) && !mlp_proto::jobspec::jobtypes::is_parent(j))
    {
        return system::schedule(state, j, eval, now_ms, scorer, opts);
    }
    let (namespace, job_id) = match job {
        Some(j) => (j.namespace.as_str(), j.id.as_str()),
        None => (eval.namespace.as_str(), eval.job_id.as_str()),
    };
    let rec = reconcile::reconcile_at(state, job, namespace, job_id, now_ms);
    let mut plan = Plan {
        eval_id: eval.id.clone(),
        stops: rec.stops,
        new_evals: rec.follow_ups,
        annotations: rec.annotations,
        deployment: rec.deployment,
        cancel_deployments: rec.cancel_deployments,
        ..Default::default()
    };
    let Some(job) = job.filter(|j| !j.stop) else { return plan };
    let stopping: BTreeSet<&str> = plan.stops.iter().map(|s| s.alloc_id.as_str()).collect();

    let candidates: Vec<&Node> = state.nodes.values().filter(|n| feasible::node_usable(n)).collect();
    // A destructive update's new allocations may take what its stopped ones held (the plan
    // applier counts the plan's stops as freed too), within the namespace's quota.
    let freed: BTreeSet<String> = plan.stops.iter().filter(|s| s.client_status.is_none()).map(|s| s.alloc_id.clone()).collect();
    let mut pass = place::Pass::freeing_with_quota(state, &job.namespace, freed);
    let preemption = opts.preemption.allowed_for(&job.r#type).then_some(opts.preemption);
    let mut new_stops = Vec::new();
    for tg in &job.groups {
        plan.queued_allocations.insert(tg.name.clone(), 0);
        let wants: Vec<&Want<'_>> = rec.place.iter().filter(|w| w.group.name == tg.name).collect();
        if wants.is_empty() {
            continue;
        }
        let mut base =
            AllocMetric { nodes_evaluated: candidates.len() as u32, nodes_available: candidates.len() as u32, ..Default::default() };
        let feasible: Vec<&Node> = candidates
            .iter()
            .copied()
            .filter(|n| match feasible::check(job, tg, n) {
                Ok(()) => true,
                Err(why) => {
                    why.record(&mut base);
                    false
                }
            })
            .collect();
        let gang = place::gang_size(tg);
        // The group's allocations that stay: gang members already running, spread counts.
        // Only looked up where needed (plain groups without preferences skip the scan).
        let live: Vec<&Allocation> = if gang > 0 || preference::Preferences::wanted(job, tg) {
            state
                .allocs_for_job(&job.namespace, &job.id)
                .filter(|a| a.task_group == tg.name && resources::is_live(a) && !stopping.contains(a.id.as_str()))
                .collect()
        } else {
            Vec::new()
        };
        let prefs = preference::Preferences::for_group(job, tg, &feasible, &live, |id| state.nodes.get(id));
        let ctx = place::GroupCtx { job, tg, ask: Ask::for_group(tg), scorer, preemption, prefs: prefs.as_ref() };

        let (chosen, failure) = if gang == 0 {
            let a = place::attempt(&ctx, pass.clone(), &feasible, &wants, &base);
            (Some((a.placed, a.pass)), a.failure)
        } else {
            // Members already running count toward the gang and pin its topology domain.
            let need = (gang as usize).saturating_sub(live.len()).min(wants.len());
            let pinned = live
                .iter()
                .find_map(|a| state.nodes.get(&a.node_id))
                .and_then(|n| feasible::topology_value(&tg.gang_topology, n))
                .filter(|_| !tg.gang_topology.trim().is_empty());
            let domains = place::domains(tg, &feasible, pinned.as_deref(), &mut base);
            place_gang(&ctx, &pass, &domains, &wants, &base, need, gang)
        };
        let mut placed_here = 0usize;
        if let Some((placed, new_pass)) = chosen {
            pass = new_pass;
            let mut ids = Vec::new();
            for p in placed {
                let mut alloc = new_alloc(job, wants[p.want], p.node, p.resources, eval, now_ms);
                let by_job = crate::state::job_key(&job.namespace, &job.id);
                for v in &p.victims {
                    let victim_job = state.allocs.get(v).map(|a| a.job_id.clone()).unwrap_or_default();
                    new_stops.push(AllocStop {
                        alloc_id: v.clone(),
                        description: format!("preempted by allocation {} of job {} (priority {})", alloc.id, job.id, job.priority),
                        client_status: Some(alloc_client::PREEMPTED.to_string()),
                    });
                    plan.preemptions.push(Preempted { victim: v.clone(), by_alloc: alloc.id.clone(), by_job: by_job.clone() });
                    tracing::debug!(victim = %v, victim_job, preemptor = %alloc.id, "preempting");
                }
                alloc.preempted_allocations = p.victims;
                if prefs.is_some() {
                    plan.preferences.insert(alloc.id.clone(), p.preference);
                }
                ids.push(alloc.id.clone());
                plan.placements.push(alloc);
                placed_here += 1;
            }
            if gang > 0 && !ids.is_empty() {
                plan.atomic.push(ids);
                let start = plan.placements.len() - placed_here;
                let size = tg.effective_count();
                ports::fill_rendezvous(&mut plan.placements[start..], &live, size, |id| state.nodes.get(id));
            }
        }
        let unplaced = (wants.len() - placed_here) as u32;
        if unplaced > 0 {
            let mut metric = failure.unwrap_or_else(|| base.clone());
            if let Some(why) = metric.dimension_exhausted.keys().find(|k| quota::is_quota_reason(k)) {
                plan.quota_limit_reached.get_or_insert_with(|| why.clone());
            }
            // Later placements of this group ask for the same and would fail the same way.
            metric.coalesced_failures = unplaced - 1;
            plan.failed_tg_allocs.insert(tg.name.clone(), metric);
            plan.queued_allocations.insert(tg.name.clone(), unplaced);
        }
    }
    plan.stops.extend(new_stops);
    plan
}

/// A gang's placement: the domain where most members fit (at least `need`; ties by total
/// preference score, then total score, then domain name), first without preemption, then with
/// it. None (with the best domain's failure, explained) when no domain can hold `need` members
/// at once.
#[allow(clippy::type_complexity)]
fn place_gang<'a, 's>(
    ctx: &place::GroupCtx<'a>,
    pass: &place::Pass<'s>,
    domains: &[(String, Vec<&'a Node>)],
    wants: &[&Want<'_>],
    base: &AllocMetric,
    need: usize,
    gang: u32,
) -> (Option<(Vec<place::Placed<'a>>, place::Pass<'s>)>, Option<AllocMetric>) {
    let no_preempt =
        place::GroupCtx { job: ctx.job, tg: ctx.tg, ask: ctx.ask.clone(), scorer: ctx.scorer, preemption: None, prefs: ctx.prefs };
    let mut most = (0usize, String::new(), 0usize, None::<AllocMetric>);
    let tries: Vec<&place::GroupCtx<'a>> = if ctx.preemption.is_some() { vec![&no_preempt, ctx] } else { vec![&no_preempt] };
    for c in tries {
        let mut best: Option<(usize, f64, f64, place::Attempt<'a, 's>)> = None;
        for (value, nodes) in domains {
            let a = place::attempt(c, pass.clone(), nodes, wants, base);
            let n = a.placed.len();
            let score: f64 = a.placed.iter().map(|p| p.score).sum();
            let pref: f64 = a.placed.iter().map(|p| p.preference).sum();
            if most.3.is_none() || n > most.0 {
                most = (n, value.clone(), nodes.len(), a.failure.clone());
            }
            let wins = |(bn, bp, bs, _): &(usize, f64, f64, place::Attempt<'a, 's>)| {
                n > *bn || (n == *bn && (pref > *bp || (pref == *bp && score > *bs)))
            };
            if n >= need && best.as_ref().is_none_or(wins) {
                best = Some((n, pref, score, a));
            }
        }
        if let Some((_, _, _, a)) = best {
            return (Some((a.placed, a.pass)), a.failure);
        }
    }
    let mut metric = most.3.unwrap_or_else(|| base.clone());
    let (fit, value, nodes) = (most.0, most.1, most.2);
    let topology = ctx.tg.gang_topology.trim();
    metric.gang_failure = if domains.is_empty() {
        format!("gang of {gang} needs {need} placed at once; no feasible node sets {topology}")
    } else if topology.is_empty() {
        format!("gang of {gang} needs {need} placed at once; only {fit} fit on the {nodes} feasible nodes")
    } else {
        format!(
            "gang of {gang} needs {need} placed at once; only {fit} fit in {topology} = {value} ({nodes} feasible nodes there), the best of {} domains",
            domains.len()
        )
    };
    (None, Some(metric))
}

fn new_alloc(job: &Job, want: &Want<'_>, node: &Node, resources: AllocatedResources, eval: &Evaluation, now_ms: u64) -> Allocation {
    Allocation {
        id: uuid::Uuid::new_v4().to_string(),
        eval_id: eval.id.clone(),
        name: format!("{}.{}[{}]", job.id, want.group.name, want.index),
        node_id: node.id.clone(),
        node_name: node.name.clone(),
        job_id: job.id.clone(),
        namespace: job.namespace.clone(),
        job_version: job.version,
        task_group: want.group.name.clone(),
        index: want.index,
        resources: Some(resources),
        desired_status: alloc_desired::RUN.to_string(),
        client_status: alloc_client::PENDING.to_string(),
        create_time_ms: now_ms,
        modify_time_ms: now_ms,
        previous_allocation: want.previous_allocation.clone(),
        reschedule_tracker: want.reschedule_tracker.clone(),
        deployment_id: want.deployment_id.clone(),
        deployment_status: (!want.deployment_id.is_empty())
            .then(|| mlp_proto::v1::AllocDeploymentStatus { canary: want.canary, ..Default::default() }),
        ..Default::default()
    }
}

/// Whether `node` can hold its current live allocations plus `extra`. Err names the exhausted dimension.
pub fn check_node_fit(state: &ClusterState, node: &Node, extra: &[&Allocation]) -> Result<(), String> {
    check_node_fit_freeing(state, node, extra, &BTreeSet::new())
}

/// `check_node_fit` with the allocations in `freed` (stopped or evicted by the same plan) no
/// longer counted.
pub fn check_node_fit_freeing(state: &ClusterState, node: &Node, extra: &[&Allocation], freed: &BTreeSet<&str>) -> Result<(), String> {
    let name = if node.name.is_empty() { &node.id } else { &node.name };
    if !feasible::node_usable(node) {
        let why = if node.eligible { format!("status {}", node.status) } else { "ineligible".to_string() };
        return Err(format!("node {name} is not available ({why})"));
    }
    // An extra allocation already in the state (a retried plan) must not count twice.
    let skip: BTreeSet<&str> = extra.iter().map(|a| a.id.as_str()).chain(freed.iter().copied()).collect();
    let mut usage = resources::Usage::live_on(state, &node.id, &skip);
    for a in extra {
        if let Some(r) = &a.resources {
            usage.add(r);
        }
    }
    match resources::exhausted(node, &usage) {
        Some(resources::Dimension::Gpu) => {
            let gpus = node.resources.as_ref().map(|r| r.gpus.as_slice()).unwrap_or_default();
            match resources::mig_misuse(gpus, &usage) {
                Some(why) => Err(format!("gpu exhausted on node {name}: {why}")),
                None => Err(format!("gpu exhausted on node {name}")),
            }
        }
        Some(resources::Dimension::GpuMemory) => {
            let gpus = node.resources.as_ref().map(|r| r.gpus.as_slice()).unwrap_or_default();
            match resources::share_overcommit(gpus, &usage) {
                Some(why) => Err(format!("gpu-memory exhausted on node {name}: {why}")),
                None => Err(format!("gpu-memory exhausted on node {name}")),
            }
        }
        Some(dim) => Err(format!("{dim} exhausted on node {name}")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod quota_tests;
#[cfg(test)]
mod tests;
