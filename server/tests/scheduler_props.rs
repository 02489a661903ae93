//! Property tests of the scheduler and the plan applier together: random clusters and jobs,
//! several plans computed on one snapshot (as the leader's concurrent workers do), re-checked by
//! the real plan applier (`plan_apply::check_plan`) in a random order with random commit points.
//! After every commit: no node is overcommitted on any dimension, no gang is partially placed,
//! no constraint is violated, and no preemption evicted work within the priority delta. Nodes may
//! have MIG instances and GPU topology: no MIG instance is held twice, whole-GPU asks and shares
//! never get one, and MIG asks get instances of their own profile only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use mlp_proto::consts::{alloc_client, eval_status, job_type, node_status};
use mlp_proto::v1::*;
use mlp_server::plan_apply::{check_plan, Checked};
use mlp_server::scheduler::{self, feasible, place::gang_size, resources, Options, Preemption};
use mlp_server::state::{ClusterState, Command, PlanResult, Request};
use proptest::prelude::*;

const DELTA: i32 = 10;

#[derive(Debug, Clone)]
struct NodeSpec {
    cpu: u64,
    gpus: usize,
    rack: u8,
    windows: bool,
    /// 0: no MIG; 1: a GPU split into 2 × 3g.40gb; 2: a GPU (listed too) split into
    /// 1 × 3g.40gb and 3 × 1g.10gb.
    mig: u8,
    /// NVLink pairs, a PCIe switch per pair and a NUMA node per four whole GPUs.
    topology: bool,
}

#[derive(Debug, Clone)]
struct JobSpec {
    priority: i32,
    batch: bool,
    count: u32,
    cpu: u64,
    gpu: u8,  // 0 none, 1 whole, 2 half share, 3 quarter share, 4 MIG 3g.40gb, 5 2 × MIG 1g.10gb, 6 2 whole
    gang: u8, // 0 no, 1 gang, 2 gang with rack topology, 3 min_count
    linux_only: bool,
}

fn node_spec() -> impl Strategy<Value = NodeSpec> {
    (prop::sample::select(vec![1000u64, 2000, 4000]), 0usize..4, 0u8..2, prop::bool::weighted(0.2), 0u8..3, any::<bool>())
        .prop_map(|(cpu, gpus, rack, windows, mig, topology)| NodeSpec { cpu, gpus, rack, windows, mig, topology })
}

fn job_spec() -> impl Strategy<Value = JobSpec> {
    (
        prop::sample::select(vec![10i32, 15, 20, 25, 50, 55, 60, 90]),
        any::<bool>(),
        1u32..5,
        prop::sample::select(vec![250u64, 500, 1000, 1500]),
        0u8..7,
        0u8..4,
        prop::bool::weighted(0.3),
    )
        .prop_map(|(priority, batch, count, cpu, gpu, gang, linux_only)| JobSpec {
            priority,
            batch,
            count,
            cpu,
            gpu,
            gang,
            linux_only,
        })
}

/// One step of the interleaving: which jobs' plans are computed on the same snapshot, the order
/// in which the applier checks them, and after how many checks everything in flight commits.
#[derive(Debug, Clone)]
struct Round {
    jobs: Vec<usize>,
    order_seed: u64,
    commit_every: usize,
    /// Non-gang allocations to finish before the round (frees capacity), as indexes.
    finish: Vec<usize>,
}

fn round(n_jobs: usize) -> impl Strategy<Value = Round> {
    (prop::collection::vec(0..n_jobs, 1..3), any::<u64>(), 1usize..4, prop::collection::vec(0usize..50, 0..3))
        .prop_map(|(jobs, order_seed, commit_every, finish)| Round { jobs, order_seed, commit_every, finish })
}

fn make_node(i: usize, s: &NodeSpec) -> Node {
    let id = format!("n{i}");
    Node {
        id: id.clone(),
        name: id.clone(),
        status: node_status::READY.into(),
        drivers: vec!["exec".into()],
        attributes: [("kernel.name".to_string(), if s.windows { "windows" } else { "linux" }.to_string())].into_iter().collect(),
        meta: [("rack".to_string(), format!("r{}", s.rack))].into_iter().collect(),
        resources: Some(NodeResources {
            cpu_cores: 4,
            cpu_mhz_per_core: s.cpu / 4,
            cpu_total_mhz: s.cpu,
            memory_mib: 8192,
            disk_mib: 100_000,
            gpus: make_gpus(&id, s),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn make_gpus(node: &str, s: &NodeSpec) -> Vec<GpuDevice> {
    let mut gpus: Vec<GpuDevice> = (0..s.gpus)
        .map(|g| GpuDevice {
            id: format!("{node}-g{g}"),
            model: "A100".into(),
            memory_mib: 40_960,
            nvlink_peers: if s.topology { vec![format!("{node}-g{}", g ^ 1)] } else { vec![] },
            pci_switch: if s.topology { format!("sw{}", g / 2) } else { String::new() },
            numa_node: s.topology.then_some((g / 4) as i32),
            ..Default::default()
        })
        .collect();
    let parent = format!("{node}-m");
    let instance = |k: usize, profile: &str, memory_mib| GpuDevice {
        id: format!("MIG-{node}-{k}"),
        model: "A100".into(),
        memory_mib,
        mig_profile: profile.into(),
        parent_id: parent.clone(),
        ..Default::default()
    };
    match s.mig {
        1 => gpus.extend([instance(0, "3g.40gb", 40_960), instance(1, "3g.40gb", 40_960)]),
        2 => {
            // The agent lists only instances, but a parent listed anyway must not be allocatable.
            gpus.push(GpuDevice { id: parent.clone(), model: "A100".into(), memory_mib: 81_920, ..Default::default() });
            gpus.push(instance(0, "3g.40gb", 40_960));
            gpus.extend((1..4).map(|k| instance(k, "1g.10gb", 10_240)));
        }
        _ => {}
    }
    gpus
}

fn make_job(i: usize, s: &JobSpec) -> Job {
    let gpu = match s.gpu {
        1 => Some(GpuRequest { count: Some(1), ..Default::default() }),
        2 => Some(GpuRequest { count: Some(1), share_milli: 500, ..Default::default() }),
        3 => Some(GpuRequest { count: Some(1), share_milli: 250, ..Default::default() }),
        4 => Some(GpuRequest { count: Some(1), mig_profile: "3g.40gb".into(), ..Default::default() }),
        5 => Some(GpuRequest { count: Some(2), mig_profile: "1g.10gb".into(), ..Default::default() }),
        6 => Some(GpuRequest { count: Some(2), ..Default::default() }),
        _ => None,
    };
    let constraints = if s.linux_only {
        vec![Constraint { attribute: "${attr.kernel.name}".into(), operator: "=".into(), value: "linux".into() }]
    } else {
        vec![]
    };
    Job {
        id: format!("j{i}"),
        name: format!("j{i}"),
        namespace: "default".into(),
        r#type: if s.batch { job_type::BATCH } else { job_type::SERVICE }.into(),
        priority: s.priority,
        groups: vec![TaskGroup {
            name: "g".into(),
            count: Some(s.count),
            constraints,
            gang: matches!(s.gang, 1 | 2),
            gang_topology: if s.gang == 2 { "${meta.rack}".into() } else { String::new() },
            min_count: if s.gang == 3 { s.count.div_ceil(2) } else { 0 },
            tasks: vec![Task {
                name: "t".into(),
                driver: "exec".into(),
                config: Some(TaskConfig { command: "/bin/true".into(), args: vec![], ..Default::default() }),
                resources: Some(Resources { cpu_mhz: s.cpu, memory_mib: 512, gpu, ..Default::default() }),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

struct World {
    st: ClusterState,
    index: u64,
}

impl World {
    fn apply(&mut self, command: Command) {
        self.index += 1;
        let resp = self.st.apply(self.index, &Request { now_ms: 1_000 + self.index, command }, &mut Vec::new());
        assert_eq!(resp.error, None);
    }
}

fn eval_for(job: &Job, n: u64) -> Evaluation {
    Evaluation {
        id: format!("e-{}-{n}", job.id),
        namespace: job.namespace.clone(),
        job_id: job.id.clone(),
        priority: job.priority,
        r#type: job.r#type.clone(),
        status: eval_status::PENDING.into(),
        ..Default::default()
    }
}

/// Every invariant, on the committed state.
fn check_invariants(st: &ClusterState) -> Result<(), String> {
    for node in st.nodes.values() {
        let usage = resources::Usage::live_on(st, &node.id, &Default::default());
        if let Some(dim) = resources::exhausted(node, &usage) {
            return Err(format!("node {} overcommitted on {dim}: {usage:?}", node.id));
        }
        for (dev, milli) in &usage.gpu_milli {
            if *milli > 1000 {
                return Err(format!("device {dev} carries {milli} milli-GPUs"));
            }
        }
        check_mig(st, node)?;
    }
    for job in st.jobs.values() {
        for tg in &job.groups {
            let live: Vec<&Allocation> =
                st.allocs_for_job(&job.namespace, &job.id).filter(|a| a.task_group == tg.name && resources::is_live(a)).collect();
            for a in &live {
                let node = &st.nodes[&a.node_id];
                if feasible::check(job, tg, node).is_err() {
                    return Err(format!("{} placed on {} against a constraint", a.name, node.id));
                }
            }
            let size = gang_size(tg) as usize;
            if size > 0 && !live.is_empty() && live.len() < size {
                return Err(format!("gang {}.{} partially placed: {} of {size}", job.id, tg.name, live.len()));
            }
            if !tg.gang_topology.is_empty() {
                let racks: std::collections::BTreeSet<Option<String>> =
                    live.iter().map(|a| feasible::topology_value(&tg.gang_topology, &st.nodes[&a.node_id])).collect();
                if racks.len() > 1 {
                    return Err(format!("gang {} spans racks {racks:?}", job.id));
                }
            }
        }
    }
    for a in st.allocs.values().filter(|a| a.client_status == alloc_client::PREEMPTED) {
        let victim = st.job(&a.namespace, &a.job_id).map(|j| j.priority).unwrap_or(0);
        let by = st.jobs.get(&a.preempted_by_job).map(|j| j.priority).ok_or(format!("{} preempted by unknown job", a.id))?;
        if victim > by - DELTA {
            return Err(format!("{} (priority {victim}) preempted by priority {by}", a.id));
        }
    }
    Ok(())
}

/// MIG rules on one node's committed live allocations: every MIG instance is held at most once,
/// and only by a task that asked for its profile; whole GPUs and shares never get an instance nor
/// a GPU in MIG mode; a multi-GPU ask's locality is recorded on nodes with topology.
fn check_mig(st: &ClusterState, node: &Node) -> Result<(), String> {
    let devices = node.resources.as_ref().map(|r| r.gpus.as_slice()).unwrap_or_default();
    let mut holders: BTreeMap<&str, usize> = BTreeMap::new();
    for a in st.allocs_for_node(&node.id).filter(|a| resources::is_live(a)) {
        let Some(r) = &a.resources else { continue };
        let asked = st
            .job(&a.namespace, &a.job_id)
            .and_then(|j| j.groups.iter().find(|g| g.name == a.task_group))
            .and_then(|g| g.tasks.first())
            .and_then(|t| t.resources.as_ref())
            .and_then(|r| r.gpu.clone())
            .map(|g| g.mig_profile)
            .unwrap_or_default();
        for g in &r.gpus {
            let d = devices.iter().find(|d| d.id == g.id).ok_or(format!("{} holds unknown device {}", a.name, g.id))?;
            if devices.iter().any(|i| i.parent_id == d.id) {
                return Err(format!("{} holds {}, a GPU in MIG mode", a.name, d.id));
            }
            if d.mig_profile != asked {
                return Err(format!("{} asked for {asked:?} and got {} ({:?})", a.name, d.id, d.mig_profile));
            }
            if !d.mig_profile.is_empty() {
                *holders.entry(d.id.as_str()).or_default() += 1;
                if r.gpu_mig.get(&d.id) != Some(&d.mig_profile) {
                    return Err(format!("{} holds {} without a MIG claim", a.name, d.id));
                }
            }
        }
        let topology = devices.iter().any(|d| d.numa_node.is_some());
        if asked.is_empty() && r.gpus.len() >= 2 && topology == r.gpu_locality.is_empty() {
            return Err(format!("{} got {} GPUs with locality {:?}", a.name, r.gpus.len(), r.gpu_locality));
        }
    }
    match holders.into_iter().find(|(_, n)| *n > 1) {
        Some((id, n)) => Err(format!("MIG instance {id} held {n} times")),
        None => Ok(()),
    }
}

/// A deterministic shuffle (xorshift) so that proptest shrinks the seed, not a permutation.
fn shuffled(mut v: Vec<usize>, mut seed: u64) -> Vec<usize> {
    for i in (1..v.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.swap(i, (seed % (i as u64 + 1)) as usize);
    }
    v
}

fn run(nodes: Vec<NodeSpec>, jobs: Vec<JobSpec>, rounds: Vec<Round>) -> Result<(), TestCaseError> {
    let mut w = World { st: ClusterState::default(), index: 0 };
    for (i, n) in nodes.iter().enumerate() {
        w.apply(Command::UpsertNode { node: make_node(i, n), overlay: None, secret_hash: None });
    }
    let jobs: Vec<Job> = jobs.iter().enumerate().map(|(i, s)| make_job(i, s)).collect();
    for j in &jobs {
        w.apply(Command::RegisterJob { job: j.clone(), eval: eval_for(j, 0) });
    }
    let opts = Options { preemption: Preemption { batch: true, service: true, delta: DELTA } };
    let mut n = 0;
    for r in rounds {
        // Some non-gang allocations finish: capacity frees between rounds.
        let finishable: Vec<(String, String)> =
            w.st.allocs
                .values()
                .filter(|a| resources::is_live(a))
                .filter(|a| w.st.job(&a.namespace, &a.job_id).is_some_and(|j| j.groups.iter().all(|g| gang_size(g) == 0)))
                .map(|a| (a.id.clone(), a.node_id.clone()))
                .collect();
        for k in &r.finish {
            if let Some((id, node_id)) = finishable.get(*k % finishable.len().max(1)) {
                let update = AllocClientUpdate { alloc_id: id.clone(), client_status: alloc_client::COMPLETE.into(), ..Default::default() };
                w.apply(Command::UpdateAllocsFromClient { node_id: node_id.clone(), updates: vec![update] });
            }
        }
        // Plans computed concurrently on one snapshot (one per job, as the leader does).
        let snapshot = w.st.clone();
        let mut picked = r.jobs.clone();
        picked.sort();
        picked.dedup();
        let mut plans = Vec::new();
        for &j in &picked {
            let job = snapshot.job("default", &jobs[j % jobs.len()].id).cloned();
            n += 1;
            plans.push(scheduler::schedule_opts(&snapshot, job.as_ref(), &eval_for(&jobs[j % jobs.len()], n), 5_000, opts));
        }
        let mut in_flight: BTreeMap<String, Allocation> = BTreeMap::new();
        let mut pending: Vec<Checked> = Vec::new();
        for (k, i) in shuffled((0..plans.len()).collect(), r.order_seed | 1).into_iter().enumerate() {
            let plan = plans[i].clone();
            let checked = check_plan(&w.st, plan.clone(), &in_flight);
            // A gang stands or falls whole.
            for gang in &plan.atomic {
                let accepted = gang.iter().filter(|id| checked.accepted.iter().any(|a| &&a.id == id)).count();
                prop_assert!(accepted == 0 || accepted == gang.len(), "gang split by the applier: {accepted} of {}", gang.len());
            }
            for a in &checked.accepted {
                in_flight.insert(a.id.clone(), a.clone());
            }
            pending.push(checked);
            if (k + 1) % r.commit_every == 0 {
                for c in pending.drain(..) {
                    for a in &c.accepted {
                        in_flight.remove(&a.id);
                    }
                    w.apply(Command::ApplyPlan(PlanResult {
                        placements: c.accepted,
                        stops: c.stops,
                        preemptions: c.preemptions,
                        ..Default::default()
                    }));
                    check_invariants(&w.st).map_err(TestCaseError::fail)?;
                }
            }
        }
        for c in pending.drain(..) {
            w.apply(Command::ApplyPlan(PlanResult {
                placements: c.accepted,
                stops: c.stops,
                preemptions: c.preemptions,
                ..Default::default()
            }));
            check_invariants(&w.st).map_err(TestCaseError::fail)?;
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn no_interleaving_overcommits_splits_a_gang_or_breaks_a_rule(
        nodes in prop::collection::vec(node_spec(), 1..6),
        jobs in prop::collection::vec(job_spec(), 1..7),
        rounds in prop::collection::vec(round(7), 3..8),
    ) {
        run(nodes, jobs, rounds)?;
    }
}

/// The property holds on a hand-made case where concurrent plans conflict for sure: two jobs
/// planned on the same snapshot both want the only free node.
#[test]
fn conflicting_concurrent_plans_are_cut_by_the_applier() {
    let nodes = vec![NodeSpec { cpu: 1000, gpus: 0, rack: 0, windows: false, mig: 0, topology: false }];
    let spec = |priority| JobSpec { priority, batch: true, count: 1, cpu: 1000, gpu: 0, gang: 0, linux_only: false };
    let rounds = vec![Round { jobs: vec![0, 1], order_seed: 7, commit_every: 3, finish: vec![] }];
    run(nodes, vec![spec(50), spec(50)], rounds).unwrap();
}

/// Two jobs planned on one snapshot both want the node's two MIG instances: the applier accepts
/// one plan and rejects the other; a placement that hands an instance to a non-MIG claim (its
/// MIG claims stripped) is rejected too.
#[test]
fn the_applier_rejects_a_taken_or_misused_mig_instance() {
    let mut w = World { st: ClusterState::default(), index: 0 };
    let spec = NodeSpec { cpu: 4000, gpus: 1, rack: 0, windows: false, mig: 1, topology: false };
    w.apply(Command::UpsertNode { node: make_node(0, &spec), overlay: None, secret_hash: None });
    let job = |i| make_job(i, &JobSpec { priority: 50, batch: true, count: 2, cpu: 250, gpu: 4, gang: 0, linux_only: false });
    let jobs = [job(0), job(1)];
    for j in &jobs {
        w.apply(Command::RegisterJob { job: j.clone(), eval: eval_for(j, 0) });
    }
    let snapshot = w.st.clone();
    let plans: Vec<scheduler::Plan> = jobs
        .iter()
        .map(|j| scheduler::schedule_opts(&snapshot, snapshot.job("default", &j.id), &eval_for(j, 1), 5_000, Options::default()))
        .collect();
    for p in &plans {
        let mut got: Vec<String> = p.placements.iter().flat_map(|a| a.resources.clone().unwrap_or_default().gpu_ids).collect();
        got.sort();
        assert_eq!(got, ["MIG-n0-0", "MIG-n0-1"]);
    }
    let first = check_plan(&w.st, plans[0].clone(), &BTreeMap::new());
    assert_eq!((first.accepted.len(), first.rejected), (2, 0));
    let in_flight: BTreeMap<String, Allocation> = first.accepted.iter().map(|a| (a.id.clone(), a.clone())).collect();
    let second = check_plan(&w.st, plans[1].clone(), &in_flight);
    assert_eq!((second.accepted.len(), second.rejected), (0, 2));
    let mut forged = plans[1].clone();
    for a in &mut forged.placements {
        if let Some(r) = a.resources.as_mut() {
            r.gpu_mig.clear();
        }
    }
    let third = check_plan(&w.st, forged, &BTreeMap::new());
    assert_eq!((third.accepted.len(), third.rejected), (0, 2));
    w.apply(Command::ApplyPlan(PlanResult { placements: first.accepted, ..Default::default() }));
    check_invariants(&w.st).unwrap();
}

/// A device that turns unhealthy between planning and applying takes none of the plan's
/// placements; the plan's other placements stand, and so would one already holding it.
#[test]
fn the_applier_rejects_placements_on_a_device_that_turned_unhealthy() {
    let mut w = World { st: ClusterState::default(), index: 0 };
    let spec = NodeSpec { cpu: 4000, gpus: 2, rack: 0, windows: false, mig: 0, topology: false };
    w.apply(Command::UpsertNode { node: make_node(0, &spec), overlay: None, secret_hash: None });
    let j = make_job(0, &JobSpec { priority: 50, batch: true, count: 2, cpu: 250, gpu: 1, gang: 0, linux_only: false });
    w.apply(Command::RegisterJob { job: j.clone(), eval: eval_for(&j, 0) });
    let plan = scheduler::schedule_opts(&w.st, w.st.job("default", &j.id), &eval_for(&j, 1), 5_000, Options::default());
    assert_eq!(plan.placements.len(), 2);
    let sick = plan.placements[0].resources.clone().unwrap_or_default().gpu_ids[0].clone();
    let mut node = w.st.nodes.values().next().cloned().unwrap();
    for d in node.resources.as_mut().unwrap().gpus.iter_mut().filter(|d| d.id == sick) {
        (d.unhealthy, d.health) = (true, "XID 79".into());
    }
    let healthy = check_plan(&w.st, plan.clone(), &BTreeMap::new());
    assert_eq!((healthy.accepted.len(), healthy.rejected), (2, 0));
    w.apply(Command::UpsertNode { node, overlay: None, secret_hash: None });
    let checked = check_plan(&w.st, plan.clone(), &BTreeMap::new());
    assert_eq!((checked.accepted.len(), checked.rejected), (1, 1));
    assert!(checked.accepted.iter().all(|a| a.resources.as_ref().is_some_and(|r| !r.gpu_ids.contains(&sick))));
    // The scheduler itself no longer plans onto it.
    let replan = scheduler::schedule_opts(&w.st, w.st.job("default", &j.id), &eval_for(&j, 2), 5_000, Options::default());
    let ids: Vec<String> = replan.placements.iter().flat_map(|a| a.resources.clone().unwrap_or_default().gpu_ids).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert!(!ids.contains(&sick));
}
