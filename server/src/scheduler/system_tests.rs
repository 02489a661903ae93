//! System and sysbatch scheduling (issue 16 §2), driven through the real state machine: one
//! allocation per eligible feasible node, following nodes that join, leave, drain (with and
//! without `--ignore-system`) and stop matching the constraints; sysbatch runs once per node.

use super::*;
use mlp_proto::consts::{eval_status, job_type, node_status};
use mlp_proto::v1::{AllocClientUpdate, Constraint, DrainStrategy, NodeResources, Resources, Task, TaskConfig, TaskGroup};

use crate::state::{Command, PlanResult, Request};

struct Cluster {
    st: ClusterState,
    index: u64,
}

impl Cluster {
    fn apply(&mut self, command: Command) {
        self.index += 1;
        let resp = self.st.apply(self.index, &Request { now_ms: 1000 + self.index, command }, &mut Vec::new());
        assert_eq!(resp.error, None);
    }

    fn node(&mut self, id: &str, rack: &str) {
        let n = Node {
            id: id.into(),
            name: id.into(),
            datacenter: "dc1".into(),
            status: node_status::READY.into(),
            drivers: vec!["exec".into()],
            meta: [("rack".to_string(), rack.to_string())].into(),
            resources: Some(NodeResources {
                cpu_cores: 4,
                cpu_mhz_per_core: 1000,
                cpu_total_mhz: 4000,
                memory_mib: 4096,
                ..Default::default()
            }),
            ..Default::default()
        };
        self.apply(Command::UpsertNode { node: n, overlay: None, secret_hash: None });
    }

    fn register(&mut self, job: Job) {
        let eval = Evaluation {
            id: format!("eval-{}-{}", job.id, self.index),
            namespace: "default".into(),
            job_id: job.id.clone(),
            status: eval_status::PENDING.into(),
            ..Default::default()
        };
        self.apply(Command::RegisterJob { job, eval });
    }

    /// Schedules `id`, applies what the plan applier accepts; returns the plan.
    fn schedule(&mut self, id: &str) -> Plan {
        let job = self.st.job("default", id).cloned();
        let eval = Evaluation { id: format!("e{}", self.index), namespace: "default".into(), job_id: id.into(), ..Default::default() };
        let plan = schedule(&self.st, job.as_ref(), &eval, 5000);
        let checked = crate::plan_apply::check_plan(&self.st, plan.clone(), &Default::default());
        assert_eq!(checked.rejected, 0, "plan must pass the re-check");
        self.apply(Command::ApplyPlan(PlanResult { placements: checked.accepted, stops: checked.stops, ..Default::default() }));
        plan
    }

    /// Nodes with a live allocation of `job`, sorted.
    fn nodes_of(&self, job: &str) -> Vec<String> {
        let mut v: Vec<String> =
            self.st.allocs_for_job("default", job).filter(|a| resources::is_live(a)).map(|a| a.node_id.clone()).collect();
        v.sort();
        v
    }

    fn finish_all(&mut self, job: &str, status: &str) {
        let live: Vec<(String, String)> =
            self.st.allocs_for_job("default", job).filter(|a| resources::is_live(a)).map(|a| (a.id.clone(), a.node_id.clone())).collect();
        for (id, node_id) in live {
            self.apply(Command::UpdateAllocsFromClient {
                node_id,
                updates: vec![AllocClientUpdate { alloc_id: id, client_status: status.into(), ..Default::default() }],
            });
        }
    }

    /// Pending evaluations of `job` (created by node changes).
    fn pending_evals(&self, job: &str) -> usize {
        self.st.evals_for_job("default", job).filter(|e| e.status == eval_status::PENDING).count()
    }
}

fn per_node_job(id: &str, kind: &str, constraints: Vec<Constraint>) -> Job {
    Job {
        id: id.into(),
        name: id.into(),
        namespace: "default".into(),
        r#type: kind.into(),
        priority: 50,
        groups: vec![TaskGroup {
            name: "g".into(),
            count: Some(1),
            constraints,
            tasks: vec![Task {
                name: "t".into(),
                driver: "exec".into(),
                config: Some(TaskConfig { command: "/bin/true".into(), ..Default::default() }),
                resources: Some(Resources { cpu_mhz: 100, memory_mib: 64, ..Default::default() }),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn cluster(nodes: &[(&str, &str)]) -> Cluster {
    let mut c = Cluster { st: ClusterState::default(), index: 0 };
    for (id, rack) in nodes {
        c.node(id, rack);
    }
    c
}

#[test]
fn a_system_job_runs_once_on_every_eligible_feasible_node_and_follows_joins() {
    let mut c = cluster(&[("n1", "a"), ("n2", "a"), ("n3", "b")]);
    let rack_a = Constraint { attribute: "${meta.rack}".into(), operator: "=".into(), value: "a".into() };
    c.register(per_node_job("agent", job_type::SYSTEM, vec![rack_a]));
    let plan = c.schedule("agent");
    assert_eq!(plan.placements.len(), 2);
    assert_eq!(c.nodes_of("agent"), vec!["n1", "n2"], "only the nodes that meet the constraint");
    // Scheduling again changes nothing.
    let again = c.schedule("agent");
    assert!(again.placements.is_empty() && again.stops.is_empty(), "{again:?}");
    // A node joins: it gets an evaluation of the system job, and one allocation.
    let before = c.pending_evals("agent");
    c.node("n4", "a");
    assert_eq!(c.pending_evals("agent"), before + 1, "a joining node evaluates system jobs");
    c.schedule("agent");
    assert_eq!(c.nodes_of("agent"), vec!["n1", "n2", "n4"]);
    // A node no longer meets the constraint (re-registered in another rack): stopped there.
    c.node("n2", "b");
    let plan = c.schedule("agent");
    assert_eq!(plan.stops.iter().map(|s| s.description.as_str()).collect::<Vec<_>>(), vec!["node no longer meets the group's constraints"]);
    assert_eq!(c.nodes_of("agent"), vec!["n1", "n4"]);
}

#[test]
fn a_system_job_leaves_down_and_drained_nodes_but_ignore_system_keeps_it() {
    let mut c = cluster(&[("n1", "a"), ("n2", "a"), ("n3", "a")]);
    c.register(per_node_job("agent", job_type::SYSTEM, vec![]));
    c.schedule("agent");
    assert_eq!(c.nodes_of("agent"), vec!["n1", "n2", "n3"]);
    // n1 goes down: its allocation is lost and nothing replaces it elsewhere.
    c.apply(Command::UpdateNodeStatus {
        node_id: "n1".into(),
        status: node_status::DOWN.into(),
        description: String::new(),
        evals: vec![],
    });
    let plan = c.schedule("agent");
    assert_eq!(plan.stops.len(), 1);
    assert_eq!(plan.stops[0].client_status.as_deref(), Some("lost"));
    assert!(plan.placements.is_empty(), "no second allocation on another node: {:?}", plan.placements);
    assert_eq!(c.nodes_of("agent"), vec!["n2", "n3"]);
    // n2 drains: the system allocation is stopped by the system scheduler, not migrated.
    let drain = |ignore_system| DrainStrategy { ignore_system, ..Default::default() };
    c.apply(Command::UpdateNodeDrain { node_id: "n2".into(), drain: Some(drain(false)), mark_eligible: false, message: String::new() });
    let step = crate::leader::drain_step(&c.st, &c.st.nodes["n2"], 2000);
    assert!(step.migrate.is_empty(), "the drainer leaves system allocations to the scheduler: {:?}", step.migrate);
    let plan = c.schedule("agent");
    assert_eq!(plan.stops.iter().map(|s| s.description.as_str()).collect::<Vec<_>>(), vec!["node draining"]);
    assert!(plan.placements.is_empty());
    // n3 drains with --ignore-system: its system allocation stays and the drain is complete.
    c.apply(Command::UpdateNodeDrain { node_id: "n3".into(), drain: Some(drain(true)), mark_eligible: false, message: String::new() });
    let plan = c.schedule("agent");
    assert!(plan.stops.is_empty(), "{:?}", plan.stops);
    assert_eq!(c.nodes_of("agent"), vec!["n3"]);
    assert!(crate::leader::drain_step(&c.st, &c.st.nodes["n3"], 2000).done, "nothing but system work left: the drain is done");
    // n1 comes back: it gets the system job again.
    c.apply(Command::UpdateNodeStatus {
        node_id: "n1".into(),
        status: node_status::READY.into(),
        description: String::new(),
        evals: vec![],
    });
    c.schedule("agent");
    assert_eq!(c.nodes_of("agent"), vec!["n1", "n3"]);
}

#[test]
fn a_sysbatch_job_completes_once_per_node() {
    let mut c = cluster(&[("n1", "a"), ("n2", "a")]);
    c.register(per_node_job("scrub", job_type::SYSBATCH, vec![]));
    c.schedule("scrub");
    assert_eq!(c.nodes_of("scrub"), vec!["n1", "n2"]);
    c.finish_all("scrub", "complete");
    assert_eq!(c.st.job("default", "scrub").map(|j| j.status.clone()).as_deref(), Some("dead"));
    // Done on both nodes: scheduling again places nothing.
    let plan = c.schedule("scrub");
    assert!(plan.placements.is_empty(), "{:?}", plan.placements);
    // A node that joins while the job is still known runs it once too.
    c.node("n3", "a");
    c.schedule("scrub");
    assert_eq!(c.nodes_of("scrub"), vec!["n3"]);
    c.finish_all("scrub", "complete");
    assert!(c.schedule("scrub").placements.is_empty());
    let done: usize = c.st.allocs_for_job("default", "scrub").filter(|a| a.client_status == "complete").count();
    assert_eq!(done, 3, "exactly one completed allocation per node");
}

#[test]
fn a_changed_system_job_is_replaced_in_place() {
    let mut c = cluster(&[("n1", "a"), ("n2", "a")]);
    c.register(per_node_job("agent", job_type::SYSTEM, vec![]));
    c.schedule("agent");
    let mut v2 = per_node_job("agent", job_type::SYSTEM, vec![]);
    v2.groups[0].tasks[0].config = Some(TaskConfig { command: "/bin/false".into(), ..Default::default() });
    c.register(v2);
    let plan = c.schedule("agent");
    assert_eq!(plan.stops.len(), 2);
    assert!(plan.stops.iter().all(|s| s.description == "replaced by job version 1"));
    // Where the node fits both for a moment, the replacement is placed in the same plan.
    let mut on: Vec<&str> = plan.placements.iter().map(|a| a.node_id.as_str()).collect();
    on.sort();
    assert_eq!(on, vec!["n1", "n2"]);
    assert!(c.schedule("agent").placements.is_empty());
    assert!(c.st.allocs_for_job("default", "agent").filter(|a| resources::is_live(a)).all(|a| a.job_version == 1));
}

#[test]
fn a_system_job_update_is_staggered_max_parallel_nodes_at_a_time() {
    let mut c = cluster(&[("n1", "a"), ("n2", "a"), ("n3", "a"), ("n4", "a")]);
    let job = |command: &str| {
        let mut j = per_node_job("agent", job_type::SYSTEM, vec![]);
        j.groups[0].tasks[0].config = Some(TaskConfig { command: command.into(), ..Default::default() });
        j.update = Some(mlp_proto::v1::UpdateStrategy { max_parallel: Some(2), stagger_ms: Some(10_000), ..Default::default() });
        j
    };
    c.register(job("/bin/v0"));
    assert_eq!(c.schedule("agent").placements.len(), 4, "a new system job is placed everywhere at once");
    c.register(job("/bin/v1"));
    let version = c.st.job("default", "agent").map(|j| j.version).unwrap_or_default();
    let at = |c: &mut Cluster, now: u64| {
        let job = c.st.job("default", "agent").cloned();
        let eval = Evaluation { id: format!("s{now}"), namespace: "default".into(), job_id: "agent".into(), ..Default::default() };
        let plan = schedule(&c.st, job.as_ref(), &eval, now);
        let checked = crate::plan_apply::check_plan(&c.st, plan.clone(), &Default::default());
        assert_eq!(checked.rejected, 0);
        c.apply(Command::ApplyPlan(PlanResult {
            placements: checked.accepted,
            stops: checked.stops,
            new_evals: plan.new_evals.clone(),
            ..Default::default()
        }));
        plan
    };
    let first = at(&mut c, 5_000);
    assert_eq!(first.stops.len(), 2, "max_parallel = 2: {:?}", first.stops);
    assert_eq!(first.placements.len(), 2, "replaced on the same nodes in the same plan");
    let mut same: Vec<&str> = first.stops.iter().filter_map(|s| c.st.allocs.get(&s.alloc_id)).map(|a| a.node_id.as_str()).collect();
    let mut placed: Vec<&str> = first.placements.iter().map(|a| a.node_id.as_str()).collect();
    same.sort();
    placed.sort();
    assert_eq!(same, placed);
    let follow_up = first.new_evals.iter().find(|e| e.wait_until_ms > 0).expect("a follow-up for the next batch");
    assert_eq!(follow_up.wait_until_ms, 15_000, "one stagger later");
    // Before the stagger has passed: nothing more, and no second follow-up.
    let early = at(&mut c, 8_000);
    assert!(early.stops.is_empty() && early.placements.is_empty(), "{early:?}");
    assert!(early.new_evals.is_empty(), "the pending follow-up covers it");
    let created = c.st.allocs.values().filter(|a| a.job_version == version).map(|a| a.create_time_ms).max().unwrap_or_default();
    let second = at(&mut c, created + 10_000);
    assert_eq!(second.stops.len(), 2);
    let versions: Vec<u64> = c.st.allocs.values().filter(|a| resources::is_live(a)).map(|a| a.job_version).collect();
    assert_eq!(versions, vec![version; 4], "every node runs the new version");
}
