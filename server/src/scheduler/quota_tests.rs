//! Namespace quotas (issue 15 §5), driven through the real state machine like `tests.rs`: the
//! scheduler never places beyond a quota, what it leaves out names the quota, other namespaces
//! are not held back, and the plan applier refuses what two concurrent plans would overcommit.

use std::collections::BTreeSet;

use mlp_proto::consts::{alloc_client, eval_status, job_type, node_status};
use mlp_proto::v1::{
    AllocClientUpdate, Evaluation, GpuDevice, GpuModelQuota, GpuRequest, Job, Namespace, Node, NodeResources, QuotaSpec, Resources, Task,
    TaskConfig, TaskGroup,
};
use proptest::prelude::*;

use super::quota::{self, Held};
use super::{schedule, Plan};
use crate::state::{ClusterState, Command, PlanResult, Request};

struct Cluster {
    st: ClusterState,
    index: u64,
}

impl Cluster {
    fn new() -> Self {
        Cluster { st: ClusterState::default(), index: 0 }
    }

    fn try_apply(&mut self, command: Command) -> Option<String> {
        self.index += 1;
        self.st.apply(self.index, &Request { now_ms: 1000 + self.index, command }, &mut Vec::new()).error
    }

    fn apply(&mut self, command: Command) {
        assert_eq!(self.try_apply(command), None);
    }

    fn namespace(&mut self, name: &str, quota: Option<QuotaSpec>) {
        self.apply(Command::UpsertNamespace { namespace: Namespace { name: name.into(), quota, ..Default::default() } });
    }

    fn node(&mut self, id: &str, gpus: usize, model: &str) {
        let n = Node {
            id: id.into(),
            name: id.into(),
            datacenter: "dc1".into(),
            status: node_status::READY.into(),
            drivers: vec!["exec".into()],
            resources: Some(NodeResources {
                cpu_cores: 64,
                cpu_mhz_per_core: 1000,
                cpu_total_mhz: 64_000,
                memory_mib: 512_000,
                disk_mib: 100_000,
                gpus: (0..gpus).map(|i| GpuDevice { id: format!("{id}-gpu{i}"), model: model.into(), ..Default::default() }).collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.apply(Command::UpsertNode { node: n, overlay: None, secret_hash: None });
    }

    fn register(&mut self, job: Job) {
        let eval = eval_for(&job);
        self.apply(Command::RegisterJobInNamespace { job, eval });
    }

    /// Schedules a job and applies what the plan applier accepts.
    fn schedule(&mut self, ns: &str, id: &str) -> Plan {
        let job = self.st.job(ns, id).cloned().expect("job");
        let plan = schedule(&self.st, Some(&job), &eval_for(&job), 5000);
        let checked = crate::plan_apply::check_plan(&self.st, plan.clone(), &Default::default());
        assert_eq!(checked.rejected, 0, "the scheduler's plan must pass the plan applier's quota check: {plan:?}");
        self.apply(Command::ApplyPlan(PlanResult {
            placements: checked.accepted,
            stops: checked.stops,
            preemptions: checked.preemptions,
            ..Default::default()
        }));
        plan
    }

    fn finish(&mut self, alloc_id: &str) {
        let node_id = self.st.allocs[alloc_id].node_id.clone();
        self.apply(Command::UpdateAllocsFromClient {
            node_id,
            updates: vec![AllocClientUpdate {
                alloc_id: alloc_id.into(),
                client_status: alloc_client::COMPLETE.into(),
                ..Default::default()
            }],
        });
    }

    fn held(&self, ns: &str) -> Held {
        Held::of(&self.st, ns, &BTreeSet::new())
    }
}

fn eval_for(job: &Job) -> Evaluation {
    Evaluation {
        id: format!("eval-{}-{}", job.namespace, job.id),
        namespace: job.namespace.clone(),
        job_id: job.id.clone(),
        status: eval_status::PENDING.into(),
        ..Default::default()
    }
}

fn group(name: &str, count: u32, gpus: u32, share_milli: u32) -> TaskGroup {
    TaskGroup {
        name: name.into(),
        count: Some(count),
        tasks: vec![Task {
            name: "t".into(),
            driver: "exec".into(),
            config: Some(TaskConfig { command: "/bin/true".into(), ..Default::default() }),
            resources: Some(Resources {
                cpu_mhz: 100,
                memory_mib: 100,
                gpu: (gpus > 0).then(|| GpuRequest { count: Some(gpus), share_milli, ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn job(ns: &str, id: &str, groups: Vec<TaskGroup>) -> Job {
    Job { id: id.into(), name: id.into(), namespace: ns.into(), r#type: job_type::BATCH.into(), priority: 50, groups, ..Default::default() }
}

fn gpus(n: u64) -> Option<QuotaSpec> {
    Some(QuotaSpec { gpus: Some(n), ..Default::default() })
}

#[test]
fn registering_into_an_unknown_namespace_is_refused() {
    let mut c = Cluster::new();
    let j = job("team-a", "a", vec![group("g", 1, 0, 0)]);
    let e = c.try_apply(Command::RegisterJobInNamespace { eval: eval_for(&j), job: j.clone() }).expect("refused");
    assert_eq!(e, "namespace \"team-a\" does not exist; create it first with `mlp namespace apply team-a`");
    assert!(c.st.jobs.is_empty());
    // `default` always exists; an applied namespace does too.
    c.register(job("default", "d", vec![group("g", 1, 0, 0)]));
    c.namespace("team-a", None);
    c.register(j);
}

#[test]
fn the_scheduler_stops_at_the_quota_and_names_it() {
    let mut c = Cluster::new();
    c.node("n1", 4, "A100");
    c.node("n2", 4, "A100");
    c.namespace("team-a", gpus(4));
    c.register(job("team-a", "train", vec![group("g", 6, 1, 0)]));
    let plan = c.schedule("team-a", "train");
    assert_eq!(plan.placements.len(), 4, "{plan:?}");
    assert_eq!(plan.queued_allocations["g"], 2);
    let why = "quota of namespace \"team-a\" exhausted: gpus 4/4 in use, 1 more asked";
    assert_eq!(plan.quota_limit_reached.as_deref(), Some(why));
    assert!(plan.failed_tg_allocs["g"].dimension_exhausted.contains_key(why), "{:?}", plan.failed_tg_allocs);
    let lines = super::explain(&plan.failed_tg_allocs["g"]);
    assert!(lines.iter().any(|l| l == &format!("Quota: {why}")), "{lines:?}");
    assert_eq!(c.held("team-a").gpu_milli, 4000);
    // Another namespace is not held back: the free GPUs are its.
    c.register(job("default", "other", vec![group("g", 4, 1, 0)]));
    let plan = c.schedule("default", "other");
    assert_eq!(plan.placements.len(), 4, "{plan:?}");
    assert_eq!(plan.quota_limit_reached, None);
}

#[test]
fn usage_dropping_or_a_raised_quota_lets_blocked_work_place() {
    let mut c = Cluster::new();
    c.node("n1", 8, "A100");
    c.namespace("team-a", gpus(2));
    c.register(job("team-a", "train", vec![group("g", 4, 1, 0)]));
    let plan = c.schedule("team-a", "train");
    assert_eq!(plan.placements.len(), 2);
    // An allocation of the namespace finishes: one more fits (a batch job's finished
    // allocation keeps its index, so the job asks for the two missing ones).
    c.finish(&plan.placements[0].id);
    let plan = c.schedule("team-a", "train");
    assert_eq!(plan.placements.len(), 1, "{plan:?}");
    assert!(plan.quota_limit_reached.is_some());
    // The quota is raised: the rest places.
    c.namespace("team-a", gpus(8));
    let plan = c.schedule("team-a", "train");
    assert_eq!(plan.placements.len(), 1, "{plan:?}");
    assert_eq!(plan.quota_limit_reached, None);
}

#[test]
fn per_model_limits_steer_placements_to_other_models() {
    let mut c = Cluster::new();
    c.node("a100", 2, "A100");
    c.node("t4", 4, "T4");
    let q = QuotaSpec { gpu_models: vec![GpuModelQuota { model: "A100".into(), gpu_milli: Some(1000) }], ..Default::default() };
    c.namespace("team-a", Some(q));
    c.register(job("team-a", "j", vec![group("g", 5, 1, 0)]));
    let plan = c.schedule("team-a", "j");
    assert_eq!(plan.placements.len(), 5, "{plan:?}");
    let held = c.held("team-a");
    assert_eq!(held.gpu_milli_by_model.get("A100"), Some(&1000));
    assert_eq!(held.gpu_milli_by_model.get("T4"), Some(&4000));
    // Nothing of the A100 quota is left and the T4s are full.
    c.register(job("team-a", "k", vec![group("g", 1, 1, 0)]));
    let plan = c.schedule("team-a", "k");
    assert!(plan.placements.is_empty());
    let why = plan.quota_limit_reached.expect("quota");
    assert!(why.contains("gpus of model \"A100\" 1/1 in use, 1 more asked"), "{why}");
}

#[test]
fn shares_count_their_milli_and_cpu_memory_limits_hold() {
    let mut c = Cluster::new();
    c.node("n1", 4, "A100");
    c.namespace("team-a", Some(QuotaSpec { gpu_milli: Some(1500), memory_mib: Some(10_000), ..Default::default() }));
    c.register(job("team-a", "s", vec![group("g", 4, 1, 500)]));
    let plan = c.schedule("team-a", "s");
    assert_eq!(plan.placements.len(), 3, "{plan:?}");
    assert_eq!(plan.quota_limit_reached.as_deref(), Some("quota of namespace \"team-a\" exhausted: gpus 1.5/1.5 in use, 0.5 more asked"));
    c.namespace("team-b", Some(QuotaSpec { memory_mib: Some(250), ..Default::default() }));
    c.register(job("team-b", "m", vec![group("g", 3, 0, 0)]));
    let plan = c.schedule("team-b", "m");
    assert_eq!(plan.placements.len(), 2);
    assert_eq!(
        plan.quota_limit_reached.as_deref(),
        Some("quota of namespace \"team-b\" exhausted: memory 200/250 MiB in use, 100 more asked")
    );
}

#[test]
fn a_gang_over_its_quota_places_nothing() {
    let mut c = Cluster::new();
    c.node("n1", 8, "A100");
    c.namespace("team-a", gpus(3));
    let mut g = group("workers", 4, 1, 0);
    g.gang = true;
    c.register(job("team-a", "ddp", vec![g]));
    let plan = c.schedule("team-a", "ddp");
    assert!(plan.placements.is_empty(), "{plan:?}");
    assert_eq!(plan.queued_allocations["workers"], 4);
    assert!(plan.quota_limit_reached.is_some());
    assert_eq!(c.held("team-a"), Held::default());
    // An allocation that asks more than the whole quota is told so.
    c.register(job("team-a", "big", vec![group("g", 1, 4, 0)]));
    let plan = c.schedule("team-a", "big");
    assert_eq!(
        plan.quota_limit_reached.as_deref(),
        Some("quota of namespace \"team-a\" exhausted: gpus 0/3 in use, 4 more asked; one allocation of the group asks more than the whole quota")
    );
}

#[test]
fn metrics_show_usage_and_limits_per_namespace() {
    let mut c = Cluster::new();
    c.node("n1", 4, "A100");
    let q =
        QuotaSpec { gpus: Some(2), gpu_models: vec![GpuModelQuota { model: "A100".into(), gpu_milli: Some(1500) }], ..Default::default() };
    c.namespace("team-a", Some(q));
    c.register(job("team-a", "j", vec![group("g", 1, 1, 0)]));
    c.schedule("team-a", "j");
    let mut out = String::new();
    crate::metrics::render_quotas_for_tests(&mut out, &c.st);
    assert!(out.contains("mlp_namespace_quota_used{namespace=\"team-a\",dimension=\"gpu_milli\"} 1000"), "{out}");
    assert!(out.contains("mlp_namespace_quota_limit{namespace=\"team-a\",dimension=\"gpu_milli\"} 2000"), "{out}");
    assert!(out.contains("mlp_namespace_quota_limit{namespace=\"team-a\",dimension=\"gpu_milli:A100\"} 1500"), "{out}");
    assert!(!out.contains("mlp_namespace_quota_limit{namespace=\"team-a\",dimension=\"cpu_mhz\"}"), "{out}");
}

#[test]
fn the_plan_applier_refuses_two_plans_that_together_exceed_the_quota() {
    let mut c = Cluster::new();
    c.node("n1", 0, "");
    // CPU only: the two plans conflict on the quota, not on devices.
    c.namespace("team-a", Some(QuotaSpec { cpu_mhz: Some(300), ..Default::default() }));
    c.register(job("team-a", "a", vec![group("g", 2, 0, 0)]));
    c.register(job("team-a", "b", vec![group("g", 2, 0, 0)]));
    // Both computed on the same snapshot: each fits the quota alone.
    let ja = c.st.job("team-a", "a").cloned();
    let jb = c.st.job("team-a", "b").cloned();
    let pa = schedule(&c.st, ja.as_ref(), &eval_for(ja.as_ref().expect("a")), 5000);
    let pb = schedule(&c.st, jb.as_ref(), &eval_for(jb.as_ref().expect("b")), 5000);
    assert_eq!((pa.placements.len(), pb.placements.len()), (2, 2));
    let first = crate::plan_apply::check_plan(&c.st, pa, &Default::default());
    assert_eq!(first.rejected, 0);
    let in_flight = first.accepted.iter().map(|a| (a.id.clone(), a.clone())).collect();
    let second = crate::plan_apply::check_plan(&c.st, pb.clone(), &in_flight);
    assert_eq!(second.rejected, 1, "{second:?}");
    assert_eq!(second.accepted.len(), 1);
    // A gang is refused whole.
    let mut pb = pb;
    pb.atomic = vec![pb.placements.iter().map(|p| p.id.clone()).collect()];
    let second = crate::plan_apply::check_plan(&c.st, pb, &in_flight);
    assert_eq!((second.rejected, second.accepted.len()), (2, 0));
}

#[test]
fn namespaces_with_jobs_that_are_not_dead_cannot_be_deleted() {
    let mut c = Cluster::new();
    assert_eq!(
        c.try_apply(Command::DeleteNamespace { name: "default".into() }).as_deref(),
        Some("namespace \"default\" cannot be deleted")
    );
    assert_eq!(c.try_apply(Command::DeleteNamespace { name: "nope".into() }).as_deref(), Some("namespace \"nope\" not found"));
    c.namespace("team-a", None);
    c.register(job("team-a", "a", vec![group("g", 1, 0, 0)]));
    let e = c.try_apply(Command::DeleteNamespace { name: "team-a".into() }).expect("refused");
    assert!(e.contains("has 1 job(s) that are not dead (a)"), "{e}");
    c.apply(Command::StopJob {
        namespace: "team-a".into(),
        job_id: "a".into(),
        purge: true,
        eval: Evaluation { id: "stop".into(), namespace: "team-a".into(), job_id: "a".into(), ..Default::default() },
    });
    c.apply(Command::DeleteNamespace { name: "team-a".into() });
    assert!(!c.st.namespaces.contains_key("team-a"));
    // Invalid namespaces are refused by the state machine too.
    let bad = Namespace { name: "Team_A".into(), ..Default::default() };
    assert!(c.try_apply(Command::UpsertNamespace { namespace: bad }).expect("refused").contains("DNS label"));
}

#[test]
fn old_snapshots_without_namespaces_decode() {
    let st = ClusterState::default();
    let mut v = serde_json::to_value(&st).expect("json");
    v.as_object_mut().expect("object").remove("namespaces");
    let back: ClusterState = serde_json::from_value(v).expect("decodes");
    assert!(back.namespaces.is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random GPU clusters, two namespaces with random quotas (whole, milli, per model, cpu),
    /// random jobs (whole GPUs, shares, gangs) scheduled and applied, allocations finishing:
    /// after every plan each namespace holds no more than its quota, and every plan passes the
    /// plan applier's re-check.
    #[test]
    fn quotas_are_never_exceeded(
        nodes in prop::collection::vec((1usize..5, 0usize..2), 1..5),
        quotas in prop::collection::vec((prop::option::of(0u64..6), prop::option::of(0u64..3000), prop::option::of(0u64..3000), prop::option::of(0u64..2000)), 2),
        jobs in prop::collection::vec((0usize..2, 1u32..5, 0u32..3, prop::sample::select(vec![0u32, 250, 500]), any::<bool>(), any::<bool>()), 1..10),
    ) {
        let models = ["A100", "T4"];
        let mut c = Cluster::new();
        for (i, (gpus, model)) in nodes.iter().enumerate() {
            c.node(&format!("n{i}"), *gpus, models[*model]);
        }
        let names = ["team-a", "team-b"];
        for (ns, (whole, milli, a100, cpu)) in names.iter().zip(&quotas) {
            let q = QuotaSpec {
                gpus: *whole,
                gpu_milli: if whole.is_some() { None } else { *milli },
                gpu_models: a100.map(|m| vec![GpuModelQuota { model: "A100".into(), gpu_milli: Some(m) }]).unwrap_or_default(),
                cpu_mhz: *cpu,
                ..Default::default()
            };
            c.namespace(ns, Some(q));
        }
        for (j, (ns, count, gpus, share, gang, finish)) in jobs.iter().enumerate() {
            let ns = names[*ns];
            let mut g = group("g", *count, *gpus, if *gpus == 1 { *share } else { 0 });
            g.gang = *gang;
            let id = format!("j{j}");
            c.register(job(ns, &id, vec![g]));
            let plan = c.schedule(ns, &id);
            if *gang {
                prop_assert!(plan.placements.is_empty() || plan.placements.len() == *count as usize, "gang split: {plan:?}");
            }
            for n in names {
                let q = quota::quota_of(&c.st, n).cloned().expect("quota");
                let held = c.held(n);
                prop_assert!(quota::within(n, &quota::hard_limit(&q), &held).is_ok(), "{n} over its quota {q:?}: {held:?}");
            }
            if *finish {
                if let Some(p) = plan.placements.first() {
                    let id = p.id.clone();
                    c.finish(&id);
                }
            }
        }
    }
}

#[test]
fn usage_counts_only_the_namespace_even_with_similar_names() {
    let mut c = Cluster::new();
    c.node("n1", 8, "A100");
    for (ns, n) in [("team-a", 1), ("team-a-x", 2), ("team-ab", 3)] {
        c.namespace(ns, gpus(8));
        c.register(job(ns, "j", vec![group("g", n, 1, 0)]));
        c.schedule(ns, "j");
    }
    assert_eq!(c.held("team-a").gpu_milli, 1000);
    assert_eq!(c.held("team-a-x").gpu_milli, 2000);
    assert_eq!(c.held("team-ab").gpu_milli, 3000);
    let u = crate::namespace::usage(&c.st, "team-a");
    assert_eq!((u.jobs, u.live_allocations, u.gpu_milli), (1, 1, 1000));
    // `default` may carry a quota too.
    c.namespace("default", gpus(1));
    c.register(job("default", "d", vec![group("g", 2, 1, 0)]));
    let plan = c.schedule("default", "d");
    assert_eq!(plan.placements.len(), 1);
    assert!(plan.quota_limit_reached.is_some_and(|r| r.starts_with("quota of namespace \"default\" exhausted: gpus 1/1")));
}

#[test]
fn a_registration_through_the_api_is_a_job_registered_event() {
    let mut c = Cluster::new();
    let j = job("default", "a", vec![group("g", 1, 0, 0)]);
    let cmd = Command::RegisterJobInNamespace { eval: eval_for(&j), job: j };
    c.apply(cmd.clone());
    let batch = crate::events::batch_for(&c.st, c.index, &cmd, &c.st.touched);
    let types: Vec<&str> = batch.events.iter().filter(|e| e.topic == "Job").map(|e| e.r#type.as_str()).collect();
    assert_eq!(types, ["JobRegistered"]);
}

// ---- fair share: borrowing and taking back (issue 15 §6) ------------------------------------

fn borrowing(quota_gpus: u64, borrow_gpus: u64) -> Option<QuotaSpec> {
    Some(QuotaSpec {
        gpus: Some(quota_gpus),
        borrow: Some(mlp_proto::v1::QuotaBorrow { gpus: Some(borrow_gpus), ..Default::default() }),
        ..Default::default()
    })
}

fn prio(mut j: Job, priority: i32) -> Job {
    j.priority = priority;
    j
}

/// The live allocation ids of a job.
fn live_of(c: &Cluster, ns: &str, id: &str) -> BTreeSet<String> {
    c.st.allocs_for_job(ns, id).filter(|a| super::resources::is_live(a)).map(|a| a.id.clone()).collect()
}

#[test]
fn a_namespace_borrows_idle_capacity_up_to_its_borrow_limit() {
    let mut c = Cluster::new();
    c.node("n1", 8, "A100");
    c.namespace("team-a", borrowing(2, 4));
    c.register(job("team-a", "a", vec![group("g", 8, 1, 0)]));
    let plan = c.schedule("team-a", "a");
    assert_eq!(plan.placements.len(), 6, "its quota of 2 and 4 borrowed");
    let why = plan.failed_tg_allocs.get("g").expect("the rest is blocked").dimension_exhausted.keys().cloned().collect::<Vec<_>>();
    assert!(why.iter().any(|w| w.contains("gpus 6/6")), "{why:?}");
    let q = quota::quota_of(&c.st, "team-a").cloned().expect("quota");
    assert!(quota::borrowing(&q, &c.held("team-a")));
}

#[test]
fn an_owner_takes_its_share_back_from_a_borrower_whatever_the_priorities() {
    let mut c = Cluster::new();
    c.node("n1", 4, "A100");
    c.namespace("team-a", borrowing(2, 2));
    c.namespace("team-b", borrowing(2, 2));
    c.register(prio(job("team-a", "a", vec![group("g", 4, 1, 0)]), 90));
    assert_eq!(c.schedule("team-a", "a").placements.len(), 4, "team-a borrows the idle half");
    // team-b's job, of lower priority, takes back what team-a borrowed, and no more.
    c.register(prio(job("team-b", "b", vec![group("g", 3, 1, 0)]), 10));
    let plan = c.schedule("team-b", "b");
    assert_eq!(plan.placements.len(), 2, "{plan:?}");
    assert_eq!(plan.preemptions.len(), 2, "{plan:?}");
    assert_eq!(c.held("team-a").gpu_milli, 2000, "team-a keeps its quota");
    assert_eq!(c.held("team-b").gpu_milli, 2000);
    // team-b's third member would be borrowing, and nothing is idle: it waits; team-a keeps 2.
    let again = c.schedule("team-b", "b");
    assert!(again.placements.is_empty() && again.preemptions.is_empty(), "{again:?}");
    assert_eq!(live_of(&c, "team-a", "a").len(), 2);
}

#[test]
fn a_namespace_within_its_quota_keeps_it_against_other_namespaces_priorities() {
    let mut c = Cluster::new();
    c.node("n1", 4, "A100");
    c.namespace("team-a", gpus(2));
    c.register(prio(job("team-a", "a", vec![group("g", 2, 1, 0)]), 10));
    c.register(prio(job("default", "low", vec![group("g", 2, 1, 0)]), 10));
    assert_eq!(c.schedule("team-a", "a").placements.len(), 2);
    assert_eq!(c.schedule("default", "low").placements.len(), 2);
    // A high-priority job of a namespace without a quota may evict lower priorities of its own
    // namespace (no quota there), never team-a's, which holds no more than its quota.
    c.register(prio(job("default", "high", vec![group("g", 3, 1, 0)]), 100));
    let plan = c.schedule("default", "high");
    assert_eq!(plan.placements.len(), 2, "{plan:?}");
    let victims: BTreeSet<String> = plan.preemptions.iter().map(|p| p.victim.clone()).collect();
    assert!(victims.iter().all(|v| c.st.allocs[v].namespace == "default"), "{victims:?}");
    assert_eq!(live_of(&c, "team-a", "a").len(), 2);
}

#[test]
fn a_borrowed_gang_is_taken_back_whole_or_not_at_all() {
    let mut c = Cluster::new();
    c.node("n1", 2, "A100");
    c.node("n2", 2, "A100");
    c.namespace("team-a", borrowing(0, 4));
    c.namespace("team-b", gpus(2));
    let mut g = group("g", 4, 1, 0);
    g.gang = true;
    c.register(job("team-a", "gang", vec![g]));
    assert_eq!(c.schedule("team-a", "gang").placements.len(), 4, "the gang borrows all four GPUs");
    c.register(job("team-b", "b", vec![group("g", 1, 1, 0)]));
    let plan = c.schedule("team-b", "b");
    assert_eq!(plan.placements.len(), 1, "{plan:?}");
    let victims: BTreeSet<String> = plan.preemptions.iter().map(|p| p.victim.clone()).collect();
    assert_eq!(victims.len(), 4, "the whole gang, on both nodes, not one member: {victims:?}");
    assert!(live_of(&c, "team-a", "gang").is_empty());
}

#[test]
fn a_borrowing_gang_goes_whole_even_when_that_is_more_than_it_borrowed() {
    let mut c = Cluster::new();
    c.node("n1", 4, "A100");
    // team-a's gang of 4 holds 2 of its own and 2 borrowed: taking it back whole would take
    // team-a below its quota, and it may not be split.
    c.namespace("team-a", borrowing(3, 1));
    c.namespace("team-b", gpus(1));
    let mut g = group("g", 4, 1, 0);
    g.gang = true;
    c.register(job("team-a", "gang", vec![g]));
    assert_eq!(c.schedule("team-a", "gang").placements.len(), 4);
    c.register(job("team-b", "b", vec![group("g", 1, 1, 0)]));
    let plan = c.schedule("team-b", "b");
    // Borrowing 1, team-a is still borrowing when its gang is looked at, so the gang goes, whole
    // (never split, never one member for the one GPU asked).
    let victims: BTreeSet<String> = plan.preemptions.iter().map(|p| p.victim.clone()).collect();
    assert_eq!(victims.len(), 4, "{plan:?}");
    assert_eq!(plan.placements.len(), 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random GPU clusters, two namespaces with random GPU quotas and borrowing limits, random
    /// jobs (whole GPUs, gangs, priorities) scheduled and applied, some finishing: after every
    /// plan each namespace holds no more than its quota plus its borrowing limit, no gang is
    /// split (its live members are none or all), and an allocation is evicted for another
    /// namespace's job only if its own namespace was borrowing before the plan.
    #[test]
    fn borrowing_and_taking_back_keep_quotas_and_gangs(
        nodes in prop::collection::vec(1usize..5, 1..4),
        quotas in prop::collection::vec((0u64..5, 0u64..5), 2),
        jobs in prop::collection::vec((0usize..2, 1u32..5, 1u32..3, any::<bool>(), 0i32..100, any::<bool>()), 1..12),
    ) {
        let mut c = Cluster::new();
        for (i, gpus) in nodes.iter().enumerate() {
            c.node(&format!("n{i}"), *gpus, "A100");
        }
        let names = ["team-a", "team-b"];
        for (ns, (q, b)) in names.iter().zip(&quotas) {
            c.namespace(ns, borrowing(*q, *b));
        }
        let mut gangs: Vec<(&str, String, usize)> = Vec::new();
        for (j, (ns, count, gpus, gang, priority, finish)) in jobs.iter().enumerate() {
            let ns = names[*ns];
            let mut g = group("g", *count, *gpus, 0);
            g.gang = *gang;
            let id = format!("j{j}");
            c.register(prio(job(ns, &id, vec![g]), *priority));
            let borrowing_before: Vec<bool> = names
                .iter()
                .map(|n| quota::borrowing(&quota::quota_of(&c.st, n).cloned().expect("quota"), &c.held(n)))
                .collect();
            let plan = c.schedule(ns, &id);
            for p in &plan.preemptions {
                let victim_ns = c.st.allocs[&p.victim].namespace.clone();
                if victim_ns != ns {
                    let i = names.iter().position(|n| *n == victim_ns).expect("known namespace");
                    prop_assert!(borrowing_before[i], "{victim_ns} lost {} to {ns} while within its quota", p.victim);
                }
            }
            if *gang {
                gangs.push((ns, id.clone(), *count as usize));
            }
            for (gns, gid, size) in &gangs {
                let live = live_of(&c, gns, gid).len();
                prop_assert!(live == 0 || live == *size, "gang {gns}/{gid} split: {live} of {size} live");
            }
            for n in names {
                let q = quota::quota_of(&c.st, n).cloned().expect("quota");
                let held = c.held(n);
                prop_assert!(quota::within(n, &quota::hard_limit(&q), &held).is_ok(), "{n} over its hard limit {q:?}: {held:?}");
            }
            if *finish && !*gang {
                if let Some(p) = plan.placements.first() {
                    let id = p.id.clone();
                    c.finish(&id);
                }
            }
        }
    }
}

#[test]
fn freed_capacity_goes_to_the_smallest_dominant_share_then_priority_order() {
    let cap = Held { cpu_mhz: 10_000, memory_mib: 1000, gpu_milli: 8000, ..Default::default() };
    // team-a's dominant resource is memory (50%), team-b's GPUs (25%).
    let a = Held { cpu_mhz: 1000, memory_mib: 500, gpu_milli: 1000, ..Default::default() };
    let b = Held { cpu_mhz: 1000, memory_mib: 100, gpu_milli: 2000, ..Default::default() };
    assert!((quota::dominant_share(&a, &cap) - 0.5).abs() < 1e-9);
    assert!((quota::dominant_share(&b, &cap) - 0.25).abs() < 1e-9);
    assert_eq!(quota::dominant_share(&a, &Held::default()), 0.0, "a cluster with nothing counts nothing");
    let share = |ns: &str| match ns {
        "team-a" => 0.5,
        "team-b" => 0.25,
        _ => 0.0,
    };
    // The waiting evaluations in priority-then-submit order: team-b's first one wins over
    // team-a's older ones; an empty namespace would win over both; ties keep the order.
    assert_eq!(quota::next_fair(["team-a", "team-a", "team-b", "team-b"], share), Some(2));
    assert_eq!(quota::next_fair(["team-a", "team-b", "idle"], share), Some(2));
    assert_eq!(quota::next_fair(["team-a", "team-a"], share), Some(0));
    assert_eq!(quota::next_fair(Vec::<&str>::new(), share), None);
}

#[test]
fn namespace_changes_are_events() {
    let mut c = Cluster::new();
    let cmd = Command::UpsertNamespace { namespace: Namespace { name: "team-a".into(), quota: gpus(2), ..Default::default() } };
    c.apply(cmd.clone());
    let batch = crate::events::batch_for(&c.st, c.index, &cmd, &c.st.touched);
    let e = batch.events.iter().find(|e| e.topic == crate::events::TOPIC_NAMESPACE).expect("an upsert event");
    assert_eq!((e.r#type.as_str(), e.key.as_str(), e.namespace.as_str()), ("NamespaceUpserted", "team-a", "team-a"));
    assert_eq!(e.namespace_object.as_ref().and_then(|n| n.quota.as_ref()).and_then(|q| q.gpus), Some(2));
    // A refused change (an invalid quota) is no event.
    let bad = Command::UpsertNamespace {
        namespace: Namespace {
            name: "team-a".into(),
            quota: Some(QuotaSpec { gpus: Some(1), gpu_milli: Some(5), ..Default::default() }),
            ..Default::default()
        },
    };
    assert!(c.try_apply(bad.clone()).is_some());
    assert!(crate::events::batch_for(&c.st, c.index, &bad, &c.st.touched).events.is_empty());
    let del = Command::DeleteNamespace { name: "team-a".into() };
    c.apply(del.clone());
    let batch = crate::events::batch_for(&c.st, c.index, &del, &c.st.touched);
    assert_eq!(batch.events.iter().map(|e| (e.topic.as_str(), e.r#type.as_str())).collect::<Vec<_>>(), [("Namespace", "NamespaceDeleted")]);
    // Deleting one that does not exist is refused and is no event.
    assert!(c.try_apply(del.clone()).is_some());
    assert!(crate::events::batch_for(&c.st, c.index, &del, &c.st.touched).events.is_empty());
}

/// Taking a gang back frees its members' devices on every node it ran on, and the placements
/// after that use each freed device once. (Found by `borrowing_and_taking_back_keep_quotas_and_gangs`
/// in CI: a placement that fit only in what an earlier placement's evictions freed left its node
/// looking empty to the next one, which took the same GPU; the plan applier refused both.)
#[test]
fn placements_in_the_devices_of_an_evicted_gang_take_each_device_once() {
    let mut c = Cluster::new();
    c.node("n0", 4, "A100");
    c.node("n1", 1, "A100");
    c.namespace("team-a", borrowing(2, 1));
    c.namespace("team-b", borrowing(1, 4));
    // team-b borrows all five GPUs: a gang of three over both nodes, then two more on n0.
    let mut g = group("g", 3, 1, 0);
    g.gang = true;
    c.register(prio(job("team-b", "gang", vec![g]), 0));
    assert_eq!(c.schedule("team-b", "gang").placements.len(), 3);
    c.register(prio(job("team-b", "two", vec![group("g", 2, 1, 0)]), 1));
    assert_eq!(c.schedule("team-b", "two").placements.len(), 2);
    // team-a takes back three within its quota: the gang goes whole, its GPUs on n0 go to the
    // second and third placements, one each (`schedule` checks the plan passes the applier).
    c.register(prio(job("team-a", "a", vec![group("g", 3, 1, 0)]), 0));
    let plan = c.schedule("team-a", "a");
    assert_eq!(plan.placements.len(), 3, "{plan:?}");
    assert_eq!(plan.preemptions.len(), 3, "the whole gang: {plan:?}");
    let mut devices = BTreeSet::new();
    for a in &plan.placements {
        for id in a.resources.iter().flat_map(|r| r.gpu_ids.iter()) {
            assert!(devices.insert(id.clone()), "{id} placed twice: {plan:?}");
        }
    }
    assert!(live_of(&c, "team-b", "gang").is_empty());
    assert_eq!(live_of(&c, "team-b", "two").len(), 2);
}
