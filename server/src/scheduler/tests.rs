//! Scheduler scenarios, driven through the real state machine: jobs, nodes, plans and client
//! updates are applied as Raft commands so that the scheduler sees the state it will see live.

use super::*;
use mlp_proto::consts::{eval_status, job_type, node_status};
use mlp_proto::v1::{AllocClientUpdate, Constraint, GpuDevice, GpuRequest, NodeResources, Resources, Task, TaskConfig, TaskGroup};
use resources::Usage;

use crate::state::{Command, PlanResult, Request};

struct Cluster {
    st: ClusterState,
    index: u64,
}

impl Cluster {
    fn new() -> Self {
        Cluster { st: ClusterState::default(), index: 0 }
    }

    fn apply(&mut self, command: Command) {
        self.index += 1;
        let resp = self.st.apply(self.index, &Request { now_ms: 1000 + self.index, command }, &mut Vec::new());
        assert_eq!(resp.error, None);
    }

    fn node(&mut self, n: Node) {
        self.apply(Command::UpsertNode { node: n, overlay: None, secret_hash: None });
    }

    fn register(&mut self, job: Job) {
        let eval = eval_for(&job.id);
        self.apply(Command::RegisterJob { job, eval });
    }

    fn job(&self, id: &str) -> Option<Job> {
        self.st.job("default", id).cloned()
    }

    /// Schedules `id` and applies the plan as the plan applier would (after checking it).
    fn schedule(&mut self, id: &str) -> Plan {
        let job = self.job(id);
        let plan = schedule(&self.st, job.as_ref(), &eval_for(id), 5000);
        let checked = crate::plan_apply::check_plan(&self.st, plan.clone(), &Default::default());
        assert_eq!(checked.rejected, 0, "plan must pass the re-check");
        assert_eq!(checked.accepted, plan.placements);
        self.apply(Command::ApplyPlan(PlanResult {
            placements: checked.accepted,
            stops: checked.stops,
            preemptions: checked.preemptions,
            ..Default::default()
        }));
        plan
    }

    fn set_client_status(&mut self, alloc_id: &str, status: &str) {
        let node_id = self.st.allocs[alloc_id].node_id.clone();
        self.apply(Command::UpdateAllocsFromClient {
            node_id,
            updates: vec![AllocClientUpdate { alloc_id: alloc_id.into(), client_status: status.into(), ..Default::default() }],
        });
    }

    fn set_node_status(&mut self, node_id: &str, status: &str) {
        self.apply(Command::UpdateNodeStatus { node_id: node_id.into(), status: status.into(), description: String::new(), evals: vec![] });
    }

    /// Live allocations of a job: (name, node id), sorted.
    fn live(&self, job: &str) -> Vec<(String, String)> {
        let mut v: Vec<_> =
            self.st.allocs_for_job("default", job).filter(|a| resources::is_live(a)).map(|a| (a.name.clone(), a.node_id.clone())).collect();
        v.sort();
        v
    }

    fn alloc_id(&self, name: &str) -> String {
        self.st
            .allocs
            .values()
            .find(|a| a.name == name && resources::is_live(a))
            .map(|a| a.id.clone())
            .unwrap_or_else(|| panic!("no live alloc {name}"))
    }
}

fn eval_for(job: &str) -> Evaluation {
    Evaluation {
        id: format!("eval-{job}"),
        namespace: "default".into(),
        job_id: job.into(),
        status: eval_status::PENDING.into(),
        ..Default::default()
    }
}

fn node(id: &str, cpu: u64, mem: u64) -> Node {
    Node {
        id: id.into(),
        name: id.into(),
        datacenter: "dc1".into(),
        status: node_status::READY.into(),
        drivers: vec!["exec".into(), "raw_exec".into()],
        attributes: [("kernel.name".to_string(), "linux".to_string())].into_iter().collect(),
        resources: Some(NodeResources {
            cpu_cores: 8,
            cpu_mhz_per_core: 1000,
            cpu_total_mhz: cpu,
            memory_mib: mem,
            disk_mib: 100_000,
            gpus: vec![],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn gpu_node(id: &str, gpus: usize) -> Node {
    let mut n = node(id, 100_000, 100_000);
    if let Some(r) = n.resources.as_mut() {
        r.gpus = (0..gpus).map(|i| GpuDevice { id: format!("{id}-gpu{i}"), ..Default::default() }).collect();
    }
    n
}

fn group(name: &str, count: u32, cpu: u64, mem: u64) -> TaskGroup {
    TaskGroup {
        name: name.into(),
        count: Some(count),
        tasks: vec![Task {
            name: "t".into(),
            driver: "exec".into(),
            config: Some(TaskConfig { command: "/bin/true".into(), args: vec![], ..Default::default() }),
            resources: Some(Resources { cpu_mhz: cpu, memory_mib: mem, ..Default::default() }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn gpu_group(name: &str, count: u32, gpus: u32) -> TaskGroup {
    let mut g = group(name, count, 100, 100);
    if let Some(r) = g.tasks[0].resources.as_mut() {
        r.gpu = Some(GpuRequest { count: Some(gpus), ..Default::default() });
    }
    g
}

fn job(id: &str, kind: &str, groups: Vec<TaskGroup>) -> Job {
    Job { id: id.into(), name: id.into(), namespace: "default".into(), r#type: kind.into(), priority: 50, groups, ..Default::default() }
}

fn names(plan: &Plan) -> Vec<String> {
    let mut v: Vec<String> = plan.placements.iter().map(|a| a.name.clone()).collect();
    v.sort();
    v
}

fn stop_reasons(plan: &Plan) -> Vec<String> {
    let mut v: Vec<String> = plan.stops.iter().map(|s| s.description.clone()).collect();
    v.sort();
    v
}

#[test]
fn places_onto_empty_nodes() {
    let mut c = Cluster::new();
    c.node(node("n1", 4000, 4096));
    c.node(node("n2", 4000, 4096));
    c.register(job("web", job_type::SERVICE, vec![group("g", 3, 500, 256)]));
    let plan = c.schedule("web");
    assert_eq!(plan.eval_id, "eval-web");
    assert_eq!(names(&plan), ["web.g[0]", "web.g[1]", "web.g[2]"]);
    assert!(plan.stops.is_empty() && plan.failed_tg_allocs.is_empty());
    assert_eq!(plan.queued_allocations, [("g".to_string(), 0)].into_iter().collect());
    let a = &plan.placements[0];
    assert_eq!((a.desired_status.as_str(), a.client_status.as_str()), ("run", "pending"));
    assert_eq!((a.job_id.as_str(), a.namespace.as_str(), a.task_group.as_str()), ("web", "default", "g"));
    assert_eq!(a.eval_id, "eval-web");
    assert!(uuid::Uuid::parse_str(&a.id).is_ok());
    assert_eq!(a.node_name, a.node_id);
    assert_eq!(a.resources, Some(AllocatedResources { cpu_mhz: 500, memory_mib: 256, ..Default::default() }));
    // Bin-packing puts all three on the same node (n1 wins the first tie by id).
    assert!(plan.placements.iter().all(|a| a.node_id == "n1"));
    // Nothing more to do on a second pass.
    let again = c.schedule("web");
    assert!(again.placements.is_empty() && again.stops.is_empty());
}

#[test]
fn binpack_prefers_the_fuller_node() {
    let mut c = Cluster::new();
    c.node(node("a-empty", 4000, 4096));
    c.node(node("b-busy", 4000, 4096));
    c.register(job("big", job_type::SERVICE, vec![group("g", 1, 2000, 2048)]));
    // Force the first job onto b-busy by making a-empty ineligible for a moment.
    let mut a = c.st.nodes["a-empty"].clone();
    a.eligible = false;
    c.st.nodes.insert(a.id.clone(), a);
    c.schedule("big");
    if let Some(n) = c.st.nodes.get_mut("a-empty") {
        n.eligible = true;
    }
    c.register(job("small", job_type::SERVICE, vec![group("g", 1, 500, 256)]));
    let plan = c.schedule("small");
    assert_eq!(plan.placements[0].node_id, "b-busy");
}

#[test]
fn exhaustion_records_the_dimension() {
    struct Case {
        node: Node,
        group: TaskGroup,
        dim: &'static str,
    }
    let mut small_disk = node("n1", 4000, 4096);
    if let Some(r) = small_disk.resources.as_mut() {
        r.disk_mib = 10;
    }
    let mut disk_group = group("g", 1, 100, 100);
    if let Some(r) = disk_group.tasks[0].resources.as_mut() {
        r.disk_mib = 11;
    }
    // One GPU of 1000 MiB: two 0.2 shares of 400 MiB fit, a third has milli-GPUs but no memory.
    let mut small_gpu = gpu_node("n1", 1);
    if let Some(r) = small_gpu.resources.as_mut() {
        r.gpus[0].memory_mib = 1000;
    }
    let mut share_group = gpu_group("g", 3, 1);
    if let Some(g) = share_group.tasks[0].resources.as_mut().and_then(|r| r.gpu.as_mut()) {
        (g.share_milli, g.memory_mib) = (200, 400);
    }
    // Two GPUs, one unhealthy: one whole-GPU allocation of two is placed.
    let mut sick = gpu_node("n1", 2);
    if let Some(r) = sick.resources.as_mut() {
        (r.gpus[1].unhealthy, r.gpus[1].health) = (true, "XID 79".into());
    }
    let cases = [
        Case {
            node: small_gpu,
            group: share_group,
            dim: "gpu-memory: no device with the milli-GPUs free has the memory a share reserves left",
        },
        Case { node: sick, group: gpu_group("g", 2, 1), dim: "gpu" },
        Case { node: node("n1", 4000, 1024), group: group("g", 3, 100, 512), dim: "memory" },
        Case { node: node("n1", 1000, 8192), group: group("g", 3, 400, 100), dim: "cpu" },
        Case { node: gpu_node("n1", 2), group: gpu_group("g", 3, 1), dim: "gpu" },
        Case { node: small_disk, group: disk_group, dim: "disk" },
    ];
    for case in cases {
        let mut c = Cluster::new();
        c.node(case.node);
        let count = case.group.effective_count();
        c.register(job("j", job_type::BATCH, vec![case.group]));
        let plan = c.schedule("j");
        let unplaced = 1;
        assert_eq!(plan.placements.len() as u32, count - unplaced, "{}", case.dim);
        assert_eq!(plan.queued_allocations["g"], unplaced);
        let m = &plan.failed_tg_allocs["g"];
        assert_eq!((m.nodes_evaluated, m.nodes_exhausted, m.nodes_filtered), (1, 1, 0));
        assert_eq!(m.dimension_exhausted, [(case.dim.to_string(), 1)].into_iter().collect(), "{}", case.dim);
        assert_eq!(explain(m).last().cloned(), Some(format!("Dimension \"{}\" exhausted on 1 node", case.dim)));
    }
}

#[test]
fn unplaced_allocations_coalesce() {
    let mut c = Cluster::new();
    c.node(node("n1", 1000, 1024));
    c.node(node("n2", 1000, 1024));
    c.register(job("j", job_type::BATCH, vec![group("g", 5, 1000, 100)]));
    let plan = c.schedule("j");
    assert_eq!(plan.placements.len(), 2);
    assert_eq!(plan.queued_allocations["g"], 3);
    let m = &plan.failed_tg_allocs["g"];
    assert_eq!((m.nodes_exhausted, m.coalesced_failures), (2, 2));
    assert_eq!(m.dimension_exhausted["cpu"], 2);
}

#[test]
fn constraints_and_drivers_filter_nodes_with_counts() {
    let mut c = Cluster::new();
    for id in ["l1", "l2", "l3"] {
        c.node(node(id, 4000, 4096));
    }
    let mut no_exec = node("w1", 4000, 4096);
    no_exec.drivers = vec!["raw_exec".into()];
    no_exec.attributes.insert("kernel.name".into(), "windows".into());
    c.node(no_exec);
    let mut j = job("win", job_type::BATCH, vec![group("g", 2, 100, 100)]);
    j.constraints.push(Constraint { attribute: "${attr.kernel.name}".into(), operator: "=".into(), value: "windows".into() });
    c.register(j);
    let plan = c.schedule("win");
    assert!(plan.placements.is_empty());
    assert_eq!(plan.queued_allocations["g"], 2);
    let m = &plan.failed_tg_allocs["g"];
    assert_eq!((m.nodes_evaluated, m.nodes_filtered, m.nodes_exhausted, m.coalesced_failures), (4, 4, 0, 1));
    assert_eq!(
        explain(m),
        ["Class: missing driver \"exec\" filtered 1 node", "Constraint \"${attr.kernel.name} = windows\" filtered 3 nodes",]
    );

    // A group constraint narrowing to one node places there.
    let mut g = group("g", 1, 100, 100);
    g.constraints.push(Constraint { attribute: "${node.name}".into(), operator: "regexp".into(), value: "^l[23]$".into() });
    g.constraints.push(Constraint { attribute: "${node.name}".into(), operator: "!=".into(), value: "l2".into() });
    c.register(job("pick", job_type::BATCH, vec![g]));
    let plan = c.schedule("pick");
    assert_eq!(plan.placements[0].node_id, "l3");
}

#[test]
fn host_volumes_place_only_on_nodes_that_offer_them() {
    use mlp_proto::v1::{VolumeMount, VolumeRequest};
    let mut c = Cluster::new();
    c.node(node("plain", 4000, 4096));
    let mut ro = node("ro", 4000, 4096);
    ro.attributes.insert("host_volume.datasets".into(), "ro".into());
    c.node(ro);
    let mut rw = node("rw", 4000, 4096);
    rw.attributes.insert("host_volume.scratch".into(), "rw".into());
    c.node(rw);
    let with_volume = |name: &str, source: &str, read_only: bool| {
        let mut g = group(name, 1, 100, 100);
        g.volumes.push(VolumeRequest { name: "v".into(), r#type: "host".into(), source: source.into(), read_only });
        g.tasks[0].volume_mounts.push(VolumeMount { volume: "v".into(), destination: "/data".into(), read_only });
        g
    };
    c.register(job("reads", job_type::BATCH, vec![with_volume("g", "datasets", true)]));
    let plan = c.schedule("reads");
    assert_eq!(plan.placements.iter().map(|p| p.node_id.as_str()).collect::<Vec<_>>(), ["ro"]);
    // Read-write of a volume that only a read-only node offers: unplaceable, and the reason
    // names the volume.
    c.register(job("writes", job_type::BATCH, vec![with_volume("g", "datasets", false)]));
    let plan = c.schedule("writes");
    assert!(plan.placements.is_empty());
    let m = &plan.failed_tg_allocs["g"];
    assert_eq!(
        explain(m),
        [
            "Constraint \"host volume \"datasets\" is read-only (volume \"v\" is mounted read-write)\" filtered 1 node",
            "Constraint \"missing host volume \"datasets\"\" filtered 2 nodes",
        ]
    );
    c.register(job("unknown", job_type::BATCH, vec![with_volume("g", "nowhere", true)]));
    let plan = c.schedule("unknown");
    assert!(plan.placements.is_empty());
    assert_eq!(explain(&plan.failed_tg_allocs["g"]), ["Constraint \"missing host volume \"nowhere\"\" filtered 3 nodes"]);
    c.register(job("scratch", job_type::BATCH, vec![with_volume("g", "scratch", false)]));
    assert_eq!(c.schedule("scratch").placements[0].node_id, "rw");
}

#[test]
fn unusable_nodes_are_skipped() {
    let mut c = Cluster::new();
    c.node(node("n1", 4000, 4096));
    c.node(node("n2", 4000, 4096));
    c.node(node("n3", 4000, 4096));
    c.set_node_status("n1", node_status::DOWN);
    if let Some(n) = c.st.nodes.get_mut("n2") {
        n.eligible = false;
    }
    c.register(job("j", job_type::BATCH, vec![group("g", 2, 100, 100)]));
    let plan = c.schedule("j");
    assert!(plan.placements.iter().all(|a| a.node_id == "n3"));
    assert_eq!(plan.placements.len(), 2);
}

#[test]
fn count_increase_and_decrease() {
    let mut c = Cluster::new();
    c.node(node("n1", 100_000, 100_000));
    c.register(job("j", job_type::SERVICE, vec![group("g", 3, 100, 100)]));
    c.schedule("j");
    c.register(job("j", job_type::SERVICE, vec![group("g", 5, 100, 100)]));
    let plan = c.schedule("j");
    assert_eq!(names(&plan), ["j.g[3]", "j.g[4]"]);
    assert!(plan.stops.is_empty(), "a count change is not a spec change");

    c.register(job("j", job_type::SERVICE, vec![group("g", 2, 100, 100)]));
    let plan = c.schedule("j");
    assert!(plan.placements.is_empty());
    assert_eq!(stop_reasons(&plan), ["count reduced"; 3]);
    let live: Vec<String> = c.live("j").into_iter().map(|(n, _)| n).collect();
    assert_eq!(live, ["j.g[0]", "j.g[1]"]);

    // Losing index 0 (stopped by someone) then growing reuses the lowest free indexes.
    let id0 = c.alloc_id("j.g[0]");
    c.apply(Command::ApplyPlan(PlanResult {
        stops: vec![AllocStop { alloc_id: id0, description: "manual".into(), client_status: None }],
        ..Default::default()
    }));
    c.register(job("j", job_type::SERVICE, vec![group("g", 3, 100, 100)]));
    let plan = c.schedule("j");
    assert_eq!(names(&plan), ["j.g[0]", "j.g[2]"]);
}

#[test]
fn stopping_or_purging_a_job_stops_live_allocs() {
    for purge in [false, true] {
        let mut c = Cluster::new();
        c.node(node("n1", 100_000, 100_000));
        c.register(job("j", job_type::BATCH, vec![group("g", 3, 100, 100)]));
        c.schedule("j");
        let done = c.alloc_id("j.g[0]");
        c.set_client_status(&done, alloc_client::COMPLETE);
        c.apply(Command::StopJob { namespace: "default".into(), job_id: "j".into(), purge, eval: eval_for("j") });
        let plan = c.schedule("j");
        let want = if purge { "job purged" } else { "job stopped" };
        assert_eq!(stop_reasons(&plan), [want; 2], "completed allocs are left alone");
        assert!(plan.placements.is_empty() && plan.queued_allocations.is_empty());
        assert!(c.live("j").is_empty());
    }
}

#[test]
fn node_down_marks_lost_and_replaces_elsewhere() {
    let mut c = Cluster::new();
    c.node(node("n1", 100_000, 100_000));
    // Lost allocations follow the reschedule policy: this one replaces them at once.
    let mut g = group("g", 2, 100, 100);
    g.reschedule = Some(mlp_proto::v1::ReschedulePolicy { unlimited: true, delay_function: "constant".into(), ..Default::default() });
    c.register(job("j", job_type::SERVICE, vec![g]));
    c.schedule("j");
    assert!(c.live("j").iter().all(|(_, n)| n == "n1"));
    c.node(node("n2", 1000, 1000));
    c.set_node_status("n1", node_status::DOWN);
    let plan = c.schedule("j");
    assert_eq!(plan.stops.len(), 2);
    assert!(plan.stops.iter().all(|s| s.client_status.as_deref() == Some("lost") && s.description == "node down"));
    assert_eq!(names(&plan), ["j.g[0]", "j.g[1]"]);
    assert!(plan.placements.iter().all(|a| a.node_id == "n2"));
    let again = c.schedule("j");
    assert!(again.placements.is_empty() && again.stops.is_empty(), "lost allocs are not replaced twice");

    // A node that vanished from the state counts as down too.
    c.st.nodes.remove("n2");
    c.node(node("n3", 1000, 1000));
    let plan = c.schedule("j");
    assert_eq!(plan.stops.len(), 2);
    assert!(plan.placements.iter().all(|a| a.node_id == "n3"));
}

#[test]
fn terminal_allocs_by_job_type() {
    struct Case {
        kind: &'static str,
        status: &'static str,
        replaced: bool,
    }
    let cases = [
        Case { kind: job_type::BATCH, status: alloc_client::COMPLETE, replaced: false },
        Case { kind: job_type::BATCH, status: alloc_client::FAILED, replaced: false },
        Case { kind: job_type::SERVICE, status: alloc_client::FAILED, replaced: false },
        Case { kind: job_type::SERVICE, status: alloc_client::COMPLETE, replaced: false },
        Case { kind: job_type::SERVICE, status: alloc_client::LOST, replaced: true },
        Case { kind: job_type::BATCH, status: alloc_client::LOST, replaced: true },
    ];
    for case in cases {
        let mut c = Cluster::new();
        c.node(node("n1", 100_000, 100_000));
        c.register(job("j", case.kind, vec![group("g", 2, 100, 100)]));
        c.schedule("j");
        let id = c.alloc_id("j.g[1]");
        c.set_client_status(&id, case.status);
        let plan = c.schedule("j");
        let want: &[&str] = if case.replaced { &["j.g[1]"] } else { &[] };
        assert_eq!(names(&plan), want, "{} {}", case.kind, case.status);
        assert!(plan.stops.is_empty());
    }
}

#[test]
fn allocs_stopped_by_the_scheduler_are_replaced() {
    let mut c = Cluster::new();
    c.node(node("n1", 100_000, 100_000));
    c.register(job("j", job_type::BATCH, vec![group("g", 2, 100, 100)]));
    c.schedule("j");
    c.register(job("j", job_type::BATCH, vec![group("g", 1, 100, 100)]));
    c.schedule("j");
    // The agent kills the stopped one and reports it complete; growing again re-runs index 1.
    let stopped = c.st.allocs.values().find(|a| a.name == "j.g[1]").map(|a| a.id.clone()).unwrap_or_default();
    c.set_client_status(&stopped, alloc_client::COMPLETE);
    c.register(job("j", job_type::BATCH, vec![group("g", 2, 100, 100)]));
    assert_eq!(names(&c.schedule("j")), ["j.g[1]"]);
}

#[test]
fn destructive_update_only_on_spec_change() {
    let mut c = Cluster::new();
    c.node(node("n1", 100_000, 100_000));
    c.register(job("j", job_type::SERVICE, vec![group("keep", 1, 100, 100), group("change", 2, 100, 100)]));
    c.schedule("j");
    let mut changed = group("change", 2, 100, 100);
    changed.tasks[0].env.insert("VERSION".into(), "2".into());
    c.register(job("j", job_type::SERVICE, vec![group("keep", 1, 100, 100), changed]));
    assert_eq!(c.job("j").map(|j| j.version), Some(1));
    let plan = c.schedule("j");
    assert_eq!(stop_reasons(&plan), ["replaced by job version 1"; 2]);
    assert_eq!(names(&plan), ["j.change[0]", "j.change[1]"]);
    assert!(plan.placements.iter().all(|a| a.job_version == 1));
    let stopped: Vec<&str> = plan.stops.iter().filter_map(|s| c.st.allocs.get(&s.alloc_id)).map(|a| a.task_group.as_str()).collect();
    assert_eq!(stopped, ["change", "change"]);
    let again = c.schedule("j");
    assert!(again.placements.is_empty() && again.stops.is_empty());
}

#[test]
fn updated_batch_job_runs_again_but_unchanged_does_not() {
    let mut c = Cluster::new();
    c.node(node("n1", 100_000, 100_000));
    c.register(job("j", job_type::BATCH, vec![group("g", 1, 100, 100)]));
    c.schedule("j");
    let id = c.alloc_id("j.g[0]");
    c.set_client_status(&id, alloc_client::COMPLETE);
    let mut g = group("g", 1, 100, 100);
    g.meta.insert("x".into(), "y".into());
    c.register(job("j", job_type::BATCH, vec![g]));
    let plan = c.schedule("j");
    assert_eq!(names(&plan), ["j.g[0]"]);
    assert!(plan.stops.is_empty(), "a finished alloc needs no stop");
}

#[test]
fn removed_task_groups_are_stopped() {
    let mut c = Cluster::new();
    c.node(node("n1", 100_000, 100_000));
    c.register(job("j", job_type::SERVICE, vec![group("a", 1, 100, 100), group("b", 2, 100, 100)]));
    c.schedule("j");
    c.register(job("j", job_type::SERVICE, vec![group("a", 1, 100, 100)]));
    let plan = c.schedule("j");
    assert_eq!(stop_reasons(&plan), ["task group removed from job"; 2]);
    assert!(plan.placements.is_empty());
}

#[test]
fn gpu_ids_are_never_double_assigned() {
    let mut c = Cluster::new();
    c.node(gpu_node("g1", 4));
    c.register(job("a", job_type::BATCH, vec![gpu_group("g", 1, 1)]));
    c.schedule("a");
    c.register(job("b", job_type::BATCH, vec![gpu_group("g", 2, 1), gpu_group("h", 1, 2)]));
    let plan = c.schedule("b");
    assert_eq!(plan.placements.len(), 2, "{plan:?}");
    assert_eq!(plan.queued_allocations["h"], 1);
    assert_eq!(plan.failed_tg_allocs["h"].dimension_exhausted["gpu"], 1);
    let mut ids: Vec<String> =
        c.st.allocs.values().filter(|a| resources::is_live(a)).flat_map(|a| a.resources.iter().flat_map(|r| r.gpu_ids.clone())).collect();
    ids.sort();
    assert_eq!(ids, ["g1-gpu0", "g1-gpu1", "g1-gpu2"]);
    // Once a's GPU is free again, h fits on the freed device plus the last one.
    let a0 = c.alloc_id("a.g[0]");
    c.set_client_status(&a0, alloc_client::COMPLETE);
    let plan = c.schedule("b");
    let got = plan.placements[0].resources.clone().unwrap_or_default().gpu_ids;
    assert_eq!(got, ["g1-gpu0", "g1-gpu3"]);
}

#[test]
fn check_node_fit_rejects_overcommit() {
    let mut c = Cluster::new();
    c.node(gpu_node("n1", 2));
    c.register(job("j", job_type::BATCH, vec![gpu_group("g", 1, 1)]));
    c.schedule("j");
    let n1 = c.st.nodes["n1"].clone();
    let extra = |mem: u64, gpus: &[&str]| Allocation {
        id: format!("x-{mem}-{}", gpus.len()),
        node_id: "n1".into(),
        resources: Some(AllocatedResources {
            memory_mib: mem,
            gpu_ids: gpus.iter().map(|g| g.to_string()).collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let existing = c.st.allocs.values().next().cloned().unwrap_or_default();
    let used = existing.resources.clone().unwrap_or_default().gpu_ids;
    let cases: Vec<(Vec<Allocation>, Result<(), String>)> = vec![
        (vec![], Ok(())),
        (vec![extra(100_000 - 100, &["n1-gpu1"])], Ok(())),
        (vec![extra(100_000, &[])], Err("memory exhausted on node n1".into())),
        (vec![extra(60_000, &[]), extra(40_000, &["n1-gpu1"])], Err("memory exhausted on node n1".into())),
        (vec![extra(1, &[used[0].as_str()])], Err("gpu exhausted on node n1".into())),
        (vec![extra(1, &["n1-gpu1"]), extra(2, &["n1-gpu1"])], Err("gpu exhausted on node n1".into())),
        (vec![extra(1, &["other-gpu"])], Err("gpu exhausted on node n1".into())),
        // The existing allocation passed as extra again is not counted twice.
        (vec![&existing].into_iter().cloned().collect(), Ok(())),
    ];
    for (extras, want) in cases {
        let refs: Vec<&Allocation> = extras.iter().collect();
        assert_eq!(check_node_fit(&c.st, &n1, &refs), want, "{extras:?}");
    }
    let mut down = n1.clone();
    down.status = node_status::DOWN.into();
    assert!(check_node_fit(&c.st, &down, &[]).is_err());
    let mut ineligible = n1;
    ineligible.eligible = false;
    assert!(check_node_fit(&c.st, &ineligible, &[]).is_err());
}

/// Random clusters and jobs, scheduled and applied repeatedly: no node is ever overcommitted and
/// no GPU is ever held twice. (A small xorshift stands in for proptest to avoid a dependency.)
#[test]
fn random_workloads_never_overcommit() {
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for round in 0..40 {
        let mut c = Cluster::new();
        for i in 0..(1 + rnd(5)) {
            let mut n = gpu_node(&format!("n{i}"), rnd(4) as usize);
            if let Some(r) = n.resources.as_mut() {
                r.cpu_total_mhz = 500 + rnd(4000);
                r.memory_mib = 256 + rnd(8192);
                r.cpu_cores = 1 + rnd(8) as u32;
            }
            c.node(n);
        }
        for j in 0..(1 + rnd(6)) {
            let groups = (0..(1 + rnd(3)))
                .map(|g| {
                    let mut tg = gpu_group(&format!("g{g}"), rnd(6) as u32, rnd(3) as u32);
                    if let Some(r) = tg.tasks[0].resources.as_mut() {
                        r.cpu_mhz = rnd(2000);
                        r.memory_mib = rnd(4096);
                        r.cores = rnd(3) as u32;
                    }
                    tg
                })
                .collect();
            let id = format!("j{j}");
            c.register(job(&id, job_type::SERVICE, groups));
            c.schedule(&id);
            if rnd(3) == 0 {
                let node = format!("n{}", rnd(5));
                if c.st.nodes.contains_key(&node) {
                    c.set_node_status(&node, node_status::DOWN);
                }
            }
        }
        for n in c.st.nodes.values() {
            let usage = Usage::live_on(&c.st, &n.id, &BTreeSet::new());
            assert_eq!(resources::exhausted(n, &usage), None, "round {round}: node {} overcommitted: {usage:?}", n.id);
        }
    }
}

#[test]
fn count_reduction_keeps_running_allocs_over_finished_ones() {
    let mut c = Cluster::new();
    c.node(node("n1", 100_000, 100_000));
    c.register(job("j", job_type::SERVICE, vec![group("g", 2, 100, 100)]));
    c.schedule("j");
    let id0 = c.alloc_id("j.g[0]");
    c.set_client_status(&id0, alloc_client::FAILED);
    c.register(job("j", job_type::SERVICE, vec![group("g", 1, 100, 100)]));
    let plan = c.schedule("j");
    assert!(plan.stops.is_empty() && plan.placements.is_empty(), "{plan:?}");
    assert_eq!(c.live("j"), [("j.g[1]".to_string(), "n1".to_string())]);
}

fn share_group(name: &str, count: u32, share_milli: u32, models: &[&str]) -> TaskGroup {
    let mut g = group(name, count, 100, 100);
    if let Some(r) = g.tasks[0].resources.as_mut() {
        r.gpu =
            Some(GpuRequest { count: Some(1), share_milli, models: models.iter().map(|m| m.to_string()).collect(), ..Default::default() });
    }
    g
}

#[test]
fn gpu_shares_pack_devices_and_never_exceed_one() {
    let mut c = Cluster::new();
    c.node(gpu_node("g1", 2));
    // Three 0.4 shares: two pack device 0 (0.8), the third goes to device 1.
    c.register(job("a", job_type::BATCH, vec![share_group("s", 3, 400, &[])]));
    let plan = c.schedule("a");
    assert_eq!(plan.placements.len(), 3, "{plan:?}");
    let usage = Usage::live_on(&c.st, "g1", &BTreeSet::new());
    assert_eq!(usage.gpu_milli.values().copied().collect::<Vec<_>>(), [800, 400]);
    // Five 0.3 shares: device 0 has 0.2 left (0.8 + 0.3 > 1), device 1 takes two; the rest
    // is queued and no device ever exceeds 1000.
    c.register(job("b", job_type::BATCH, vec![share_group("s", 5, 300, &[])]));
    let plan = c.schedule("b");
    assert_eq!(plan.placements.len(), 2, "{plan:?}");
    assert_eq!(plan.queued_allocations["s"], 3);
    assert_eq!(plan.failed_tg_allocs["s"].dimension_exhausted["gpu"], 1);
    let usage = Usage::live_on(&c.st, "g1", &BTreeSet::new());
    assert!(usage.gpu_milli.values().all(|&m| m <= 1000), "{usage:?}");
    assert_eq!(usage.gpu_milli.values().copied().collect::<Vec<_>>(), [800, 1000]);
    // The re-check agrees: one more 0.3 share on device 0 is an overcommit.
    let node = c.st.nodes["g1"].clone();
    let extra = Allocation {
        id: "x".into(),
        resources: Some(AllocatedResources {
            gpu_ids: vec!["g1-gpu0".into()],
            gpus: vec![mlp_proto::v1::GpuAssignment { id: "g1-gpu0".into(), milli: 300, memory_mib: 0 }],
            ..Default::default()
        }),
        desired_status: alloc_desired::RUN.into(),
        ..Default::default()
    };
    assert_eq!(check_node_fit(&c.st, &node, &[&extra]), Err("gpu exhausted on node g1".into()));
}

#[test]
fn gpu_model_constraints_filter_devices() {
    let mut c = Cluster::new();
    let mut n = gpu_node("t4", 1);
    if let Some(r) = n.resources.as_mut() {
        r.gpus[0].model = "T4".into();
    }
    c.node(n);
    let mut n = gpu_node("v100", 1);
    if let Some(r) = n.resources.as_mut() {
        r.gpus[0].model = "V100M32".into();
    }
    c.node(n);
    c.register(job("a", job_type::BATCH, vec![share_group("s", 2, 500, &["V100M16", "V100M32"])]));
    let plan = c.schedule("a");
    assert_eq!(plan.placements.len(), 2, "{plan:?}");
    assert!(plan.placements.iter().all(|p| p.node_id == "v100"), "{plan:?}");
    c.register(job("b", job_type::BATCH, vec![share_group("s", 1, 500, &["A100"])]));
    let plan = c.schedule("b");
    assert_eq!(plan.queued_allocations["s"], 1);
}

// ---- gangs, preemption, the plan applier (issue 4) ---------------------------------------

fn gang(mut g: TaskGroup, topology: &str) -> TaskGroup {
    g.gang = true;
    g.gang_topology = topology.into();
    g
}

fn racked(id: &str, cpu: u64, rack: &str) -> Node {
    let mut n = node(id, cpu, 100_000);
    n.meta.insert("rack".into(), rack.into());
    n
}

fn prio(mut j: Job, priority: i32) -> Job {
    j.priority = priority;
    j
}

#[test]
fn gang_is_placed_whole_or_not_at_all() {
    let mut c = Cluster::new();
    for i in 0..3 {
        c.node(node(&format!("n{i}"), 1000, 10_000));
    }
    c.register(job("big", job_type::BATCH, vec![gang(group("w", 4, 1000, 10), "")]));
    let plan = c.schedule("big");
    assert!(plan.placements.is_empty(), "a gang of 4 on 3 nodes must not be partially placed");
    assert_eq!(plan.queued_allocations["w"], 4);
    let m = &plan.failed_tg_allocs["w"];
    assert_eq!(m.gang_failure, "gang of 4 needs 4 placed at once; only 3 fit on the 3 feasible nodes");
    assert!(explain(m).iter().any(|l| l.starts_with("Gang: gang of 4")), "{:?}", explain(m));

    c.register(job("fits", job_type::BATCH, vec![gang(group("w", 3, 1000, 10), "")]));
    let plan = c.schedule("fits");
    assert_eq!(plan.placements.len(), 3);
    assert_eq!(plan.atomic.len(), 1);
    assert_eq!(plan.atomic[0].len(), 3);
}

#[test]
fn gang_topology_keeps_members_in_one_rack() {
    let mut c = Cluster::new();
    for (id, rack) in [("a1", "r1"), ("a2", "r1"), ("b1", "r2"), ("b2", "r2"), ("b3", "r2"), ("x", "")] {
        let mut n = racked(id, 1000, rack);
        if rack.is_empty() {
            n.meta.clear();
        }
        c.node(n);
    }
    c.register(job("g3", job_type::BATCH, vec![gang(group("w", 3, 1000, 10), "${meta.rack}")]));
    let plan = c.schedule("g3");
    let mut nodes: Vec<&str> = plan.placements.iter().map(|a| a.node_id.as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, ["b1", "b2", "b3"], "only rack r2 holds 3 members");

    // r1 has 2 free nodes, r2 none: a gang of 3 waits, and says where it came closest.
    c.register(job("g3b", job_type::BATCH, vec![gang(group("w", 3, 1000, 10), "meta.rack")]));
    let plan = c.schedule("g3b");
    assert!(plan.placements.is_empty());
    let m = &plan.failed_tg_allocs["w"];
    assert_eq!(
        m.gang_failure,
        "gang of 3 needs 3 placed at once; only 2 fit in meta.rack = r1 (2 feasible nodes there), the best of 2 domains"
    );
    assert_eq!(m.constraint_filtered.get("gang_topology meta.rack is_set"), Some(&1));
}

#[test]
fn min_count_gang_places_at_least_the_minimum() {
    let mut c = Cluster::new();
    for i in 0..4 {
        c.node(node(&format!("n{i}"), 1000, 10_000));
    }
    let mut g = group("w", 6, 1000, 10);
    g.min_count = 5;
    c.register(job("elastic", job_type::BATCH, vec![g.clone()]));
    assert!(c.schedule("elastic").placements.is_empty(), "5 at once do not fit on 4 nodes");

    g.min_count = 3;
    c.register(job("elastic", job_type::BATCH, vec![g]));
    let plan = c.schedule("elastic");
    assert_eq!(plan.placements.len(), 4, "at least 3 at once, the rest as capacity allows");
    assert_eq!(plan.queued_allocations["w"], 2);
}

#[test]
fn higher_priority_preempts_lower_and_both_record_it() {
    let mut c = Cluster::new();
    c.node(node("n1", 1000, 10_000));
    c.register(prio(job("low", job_type::BATCH, vec![group("g", 2, 500, 10)]), 20));
    assert_eq!(c.schedule("low").placements.len(), 2);

    // Priority 25 is within the delta of 10: no preemption, it waits.
    c.register(prio(job("near", job_type::BATCH, vec![group("g", 1, 400, 10)]), 25));
    let plan = c.schedule("near");
    assert!(plan.placements.is_empty() && plan.preemptions.is_empty());

    c.register(prio(job("high", job_type::SERVICE, vec![group("g", 1, 400, 10)]), 60));
    let plan = c.schedule("high");
    assert_eq!(plan.placements.len(), 1);
    assert_eq!(plan.preemptions.len(), 1, "one victim frees enough");
    let victim = plan.preemptions[0].victim.clone();
    let preemptor = &plan.placements[0];
    assert_eq!(preemptor.preempted_allocations, vec![victim.clone()]);
    let v = &c.st.allocs[&victim];
    assert_eq!(v.client_status, alloc_client::PREEMPTED);
    assert_eq!(v.desired_status, alloc_desired::STOP);
    assert_eq!(v.preempted_by_allocation, preemptor.id);
    assert_eq!(v.preempted_by_job, "default/high");
    assert!(v.desired_description.starts_with("preempted by allocation"), "{}", v.desired_description);

    // The agent's late report does not turn the eviction into a completion.
    c.set_client_status(&victim, alloc_client::COMPLETE);
    assert_eq!(c.st.allocs[&victim].client_status, alloc_client::PREEMPTED);
    // The batch victim is requeued, not finished: its job is still pending with one to place.
    assert_ne!(c.job("low").map(|j| j.status), Some(mlp_proto::consts::job_status::DEAD.to_string()));
    let again = c.schedule("low");
    assert_eq!(again.queued_allocations["g"], 1, "the preempted index waits for capacity");
}

#[test]
fn preemption_never_evicts_equal_or_higher_priority() {
    let mut c = Cluster::new();
    c.node(node("n1", 1000, 10_000));
    c.register(prio(job("a", job_type::SERVICE, vec![group("g", 1, 1000, 10)]), 50));
    c.schedule("a");
    for p in [50, 55, 59] {
        c.register(prio(job("b", job_type::SERVICE, vec![group("g", 1, 100, 10)]), p));
        let plan = c.schedule("b");
        assert!(plan.preemptions.is_empty(), "priority {p} must not evict priority 50");
    }
}

#[test]
fn preemption_takes_the_lowest_priority_then_the_smallest_sufficient() {
    let mut c = Cluster::new();
    c.node(node("n1", 1000, 10_000));
    c.node(node("n2", 1000, 10_000));
    // n1: priority 10 (600) + priority 30 (400); n2: priority 20 (300) + 20 (300) + 30 (400).
    c.register(prio(job("p10", job_type::BATCH, vec![group("g", 1, 600, 10)]), 10));
    c.schedule("p10");
    let on_n1 = c.st.allocs.values().next().map(|a| a.node_id.clone()).unwrap_or_default();
    let other = if on_n1 == "n1" { "n2" } else { "n1" };
    c.register(prio(job("p30", job_type::BATCH, vec![group("g", 2, 400, 10)]), 30));
    c.schedule("p30");
    c.register(prio(job("p20", job_type::BATCH, vec![group("g", 2, 300, 10)]), 20));
    c.schedule("p20");
    assert_eq!(c.live("p20").iter().filter(|(_, n)| n == other).count(), 2);
    // Asking for 500: on the p10 node one priority-10 victim (600) suffices; elsewhere it takes
    // priority 20s. Lowest priority first wins.
    c.register(prio(job("hi", job_type::BATCH, vec![group("g", 1, 500, 10)]), 90));
    let plan = c.schedule("hi");
    assert_eq!(plan.preemptions.len(), 1);
    assert_eq!(c.st.allocs[&plan.preemptions[0].victim].job_id, "p10");
    assert_eq!(plan.placements[0].node_id, on_n1);
}

#[test]
fn gang_may_preempt_all_or_nothing() {
    let mut c = Cluster::new();
    for i in 0..3 {
        c.node(node(&format!("n{i}"), 1000, 10_000));
    }
    c.register(prio(job("low", job_type::BATCH, vec![group("g", 2, 1000, 10)]), 10));
    c.register(prio(job("mid", job_type::BATCH, vec![group("g", 1, 1000, 10)]), 70));
    c.schedule("low");
    c.schedule("mid");
    // A gang of 3 at priority 75 can evict only the two priority-10 allocations: never partial.
    c.register(prio(job("g", job_type::BATCH, vec![gang(group("w", 3, 1000, 10), "")]), 75));
    let plan = c.schedule("g");
    assert!(plan.placements.is_empty() && plan.preemptions.is_empty() && plan.stops.is_empty());
    // At priority 90 the gang evicts all three.
    c.register(prio(job("g", job_type::BATCH, vec![gang(group("w", 3, 1000, 10), "")]), 90));
    let plan = c.schedule("g");
    assert_eq!(plan.placements.len(), 3);
    assert_eq!(plan.preemptions.len(), 3);
}

#[test]
fn plan_applier_rejects_a_gang_whole_and_drops_evictions_of_rejected_preemptors() {
    let mut c = Cluster::new();
    for i in 0..3 {
        c.node(node(&format!("n{i}"), 1000, 10_000));
    }
    c.register(job("g", job_type::BATCH, vec![gang(group("w", 3, 600, 10), "")]));
    let plan = schedule(&c.st, c.job("g").as_ref(), &eval_for("g"), 5000);
    assert_eq!(plan.placements.len(), 3);
    // Meanwhile another plan took most of one node.
    c.register(job("other", job_type::BATCH, vec![group("g", 1, 900, 10)]));
    c.schedule("other");
    let checked = crate::plan_apply::check_plan(&c.st, plan, &Default::default());
    assert_eq!(checked.rejected, 3, "one member's node is full: the whole gang is rejected");
    assert!(checked.accepted.is_empty());

    // A preemptor whose node filled up keeps its victim running.
    let mut c = Cluster::new();
    c.node(node("n1", 1000, 10_000));
    c.register(prio(job("low", job_type::BATCH, vec![group("g", 1, 500, 10)]), 10));
    c.schedule("low");
    c.register(prio(job("hi", job_type::BATCH, vec![group("g", 1, 1000, 10)]), 90));
    let plan = schedule(&c.st, c.job("hi").as_ref(), &eval_for("hi"), 5000);
    assert_eq!(plan.preemptions.len(), 1);
    let mut in_flight = BTreeMap::new();
    let mut squatter = plan.placements[0].clone();
    squatter.id = "squatter".into();
    squatter.resources = Some(AllocatedResources { cpu_mhz: 500, ..Default::default() });
    in_flight.insert(squatter.id.clone(), squatter);
    let checked = crate::plan_apply::check_plan(&c.st, plan.clone(), &in_flight);
    assert_eq!((checked.rejected, checked.stops.len(), checked.preemptions.len()), (1, 0, 0));
    // Without the squatter the eviction stands and its capacity counts as freed.
    let checked = crate::plan_apply::check_plan(&c.st, plan, &BTreeMap::new());
    assert_eq!((checked.rejected, checked.stops.len(), checked.preemptions.len()), (0, 1, 1));
}

#[test]
fn preemption_follows_the_per_type_switches() {
    let mut c = Cluster::new();
    c.node(node("n1", 1000, 10_000));
    c.register(prio(job("low", job_type::BATCH, vec![group("g", 1, 1000, 10)]), 10));
    c.schedule("low");
    c.register(prio(job("hi", job_type::BATCH, vec![group("g", 1, 500, 10)]), 90));
    let hi = c.job("hi");
    let off = Options { preemption: Preemption { batch: false, service: true, delta: 10 } };
    let plan = schedule_opts(&c.st, hi.as_ref(), &eval_for("hi"), 5000, off);
    assert!(plan.placements.is_empty() && plan.preemptions.is_empty(), "batch preemption is off");
    let wide = Options { preemption: Preemption { batch: true, service: true, delta: 81 } };
    let plan = schedule_opts(&c.st, hi.as_ref(), &eval_for("hi"), 5000, wide);
    assert!(plan.preemptions.is_empty(), "a delta of 81 protects priority 10 from priority 90");
    let plan = schedule_opts(&c.st, hi.as_ref(), &eval_for("hi"), 5000, Options::default());
    assert_eq!(plan.preemptions.len(), 1);
}

// ---- preferences: affinity and spread ------------------------------------------------------

fn affinity(attribute: &str, operator: &str, value: &str, weight: i32) -> mlp_proto::v1::Affinity {
    mlp_proto::v1::Affinity { attribute: attribute.into(), operator: operator.into(), value: value.into(), weight: Some(weight) }
}

fn spread(attribute: &str, weight: u32, targets: &[(&str, u32)]) -> mlp_proto::v1::Spread {
    mlp_proto::v1::Spread {
        attribute: attribute.into(),
        weight: Some(weight),
        targets: targets.iter().map(|(v, p)| mlp_proto::v1::SpreadTarget { value: (*v).into(), percent: *p }).collect(),
    }
}

/// Live allocations of `job` per rack, sorted by rack.
fn per_rack(c: &Cluster, job: &str) -> Vec<(String, usize)> {
    let mut m: BTreeMap<String, usize> = BTreeMap::new();
    for (_, node_id) in c.live(job) {
        let rack = c.st.nodes[&node_id].meta.get("rack").cloned().unwrap_or_default();
        *m.entry(rack).or_default() += 1;
    }
    m.into_iter().collect()
}

fn counts(pairs: &[(&str, usize)]) -> Vec<(String, usize)> {
    pairs.iter().map(|(r, n)| (r.to_string(), *n)).collect()
}

#[test]
fn affinity_picks_the_matching_node_over_a_fuller_one() {
    let mut c = Cluster::new();
    c.node(racked("a", 4000, "r1"));
    c.node(racked("b", 4000, "r2"));
    // Make b the fuller node: bin-packing alone would choose it.
    let mut other = group("o", 1, 2000, 10);
    other.constraints = vec![Constraint { attribute: "${meta.rack}".into(), operator: "=".into(), value: "r2".into() }];
    c.register(job("other", job_type::SERVICE, vec![other]));
    c.schedule("other");

    c.register(job("plain", job_type::SERVICE, vec![group("g", 1, 500, 10)]));
    let plan = c.schedule("plain");
    assert_eq!(plan.placements[0].node_id, "b", "without an affinity, bin-packing picks the fuller node");
    assert!(plan.preferences.is_empty(), "no preference scores for a group without preferences");

    let mut j = job("pref", job_type::SERVICE, vec![group("g", 2, 500, 10)]);
    j.groups[0].affinities = vec![affinity("${meta.rack}", "", "r1", 50)];
    c.register(j);
    let plan = c.schedule("pref");
    assert_eq!(plan.placements.iter().map(|a| a.node_id.as_str()).collect::<Vec<_>>(), ["a", "a"]);
    assert!(plan.placements.iter().all(|a| plan.preferences.get(&a.id) == Some(&1.0)), "{:?}", plan.preferences);
}

#[test]
fn negative_affinity_avoids_and_task_affinities_count_for_the_group() {
    let mut c = Cluster::new();
    c.node(racked("a", 4000, "r1"));
    c.node(racked("b", 4000, "r2"));
    let mut g = group("g", 1, 500, 10);
    g.tasks[0].affinities = vec![affinity("${meta.rack}", "regexp", "^r1$", -100)];
    c.register(job("avoid", job_type::SERVICE, vec![g]));
    let plan = c.schedule("avoid");
    assert_eq!(plan.placements[0].node_id, "b", "a tie by id would pick a; the negative affinity avoids it");
    assert_eq!(plan.preferences.get(&plan.placements[0].id), Some(&0.0));

    // Still placed on the avoided node when nothing else fits: an affinity is no constraint.
    let mut g = group("g", 1, 3800, 10);
    g.tasks[0].affinities = vec![affinity("${meta.rack}", "=", "r2", 100)];
    c.register(job("big", job_type::SERVICE, vec![g]));
    let plan = c.schedule("big");
    assert_eq!(plan.placements[0].node_id, "a");
    assert_eq!(plan.preferences.get(&plan.placements[0].id), Some(&0.0));
}

fn three_racks(c: &mut Cluster) {
    for (id, rack) in [("a1", "r1"), ("a2", "r1"), ("b1", "r2"), ("b2", "r2"), ("c1", "r3"), ("c2", "r3")] {
        c.node(racked(id, 100_000, rack));
    }
}

#[test]
fn even_spread_of_six_over_three_racks_is_two_each() {
    let mut c = Cluster::new();
    three_racks(&mut c);
    let mut j = job("s", job_type::SERVICE, vec![group("g", 6, 100, 10)]);
    j.spreads = vec![spread("${meta.rack}", 50, &[])];
    c.register(j.clone());
    c.schedule("s");
    assert_eq!(per_rack(&c, "s"), counts(&[("r1", 2), ("r2", 2), ("r3", 2)]));

    // Without the spread, bin-packing puts all six on one node.
    j.id = "packed".into();
    j.name = "packed".into();
    j.spreads.clear();
    c.register(j);
    c.schedule("packed");
    assert_eq!(per_rack(&c, "packed"), counts(&[("r1", 6)]));
}

#[test]
fn even_spread_counts_the_allocations_already_running() {
    let mut c = Cluster::new();
    three_racks(&mut c);
    let mut g = group("g", 1, 100, 10);
    g.spreads = vec![spread("meta.rack", 100, &[])];
    c.register(job("s", job_type::SERVICE, vec![g.clone()]));
    c.schedule("s");
    assert_eq!(per_rack(&c, "s"), counts(&[("r1", 1)]));
    g.count = Some(6);
    c.register(job("s", job_type::SERVICE, vec![g]));
    let plan = c.schedule("s");
    assert_eq!(plan.placements.len(), 5);
    assert!(plan.stops.is_empty());
    assert_eq!(per_rack(&c, "s"), counts(&[("r1", 2), ("r2", 2), ("r3", 2)]));
}

#[test]
fn spread_targets_seventy_thirty_of_ten() {
    let mut c = Cluster::new();
    three_racks(&mut c);
    let mut g = group("g", 10, 100, 10);
    g.spreads = vec![spread("${meta.rack}", 100, &[("r2", 70), ("r3", 30)])];
    c.register(job("t", job_type::BATCH, vec![g]));
    c.schedule("t");
    assert_eq!(per_rack(&c, "t"), counts(&[("r2", 7), ("r3", 3)]));
}

#[test]
fn a_node_without_the_spread_attribute_loses() {
    let mut c = Cluster::new();
    let mut bare = node("a", 4000, 10_000);
    bare.meta.clear();
    c.node(bare);
    c.node(racked("b", 4000, "r1"));
    let mut g = group("g", 2, 100, 10);
    g.spreads = vec![spread("${meta.rack}", 50, &[])];
    c.register(job("m", job_type::SERVICE, vec![g]));
    let plan = c.schedule("m");
    assert!(plan.placements.iter().all(|a| a.node_id == "b"), "{:?}", c.live("m"));

    // With room only on the bare node, it still gets the allocation: a spread is no constraint.
    let mut g = group("g", 1, 3900, 10);
    g.spreads = vec![spread("${meta.rack}", 50, &[])];
    c.register(job("big", job_type::SERVICE, vec![g]));
    let plan = c.schedule("big");
    assert_eq!(plan.placements[0].node_id, "a");
    assert_eq!(plan.preferences.get(&plan.placements[0].id), Some(&-1.0));
}

#[test]
fn groups_without_preferences_place_exactly_as_before() {
    // A known placement (bin-packing on mixed node sizes; the same with and without this
    // module's changes, checked when it was written).
    let mut c = Cluster::new();
    c.node(node("n1", 2000, 4096));
    c.node(node("n2", 3000, 4096));
    c.node(node("n3", 1500, 2048));
    let mut j = job("mix", job_type::SERVICE, vec![group("a", 4, 700, 512), group("b", 3, 400, 1024)]);
    c.register(j.clone());
    let plan = c.schedule("mix");
    let placed: Vec<(String, String)> = plan.placements.iter().map(|a| (a.name.clone(), a.node_id.clone())).collect();
    let want = [
        ("mix.a[0]", "n3"),
        ("mix.a[1]", "n3"),
        ("mix.a[2]", "n1"),
        ("mix.a[3]", "n1"),
        ("mix.b[0]", "n1"),
        ("mix.b[1]", "n2"),
        ("mix.b[2]", "n2"),
    ];
    assert_eq!(placed, want.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>());
    assert!(plan.preferences.is_empty());

    // A preference on one group leaves the other group's placements alone.
    j.id = "mix2".into();
    j.name = "mix2".into();
    j.groups[1].affinities = vec![affinity("${node.name}", "=", "n3", 10)];
    let mut c2 = Cluster::new();
    c2.node(node("n1", 2000, 4096));
    c2.node(node("n2", 3000, 4096));
    c2.node(node("n3", 1500, 2048));
    c2.register(j);
    let plan = c2.schedule("mix2");
    let a: Vec<&str> = plan.placements.iter().filter(|p| p.task_group == "a").map(|p| p.node_id.as_str()).collect();
    assert_eq!(a, ["n3", "n3", "n1", "n1"]);
}

#[test]
fn a_rare_preferred_node_is_in_the_sample_on_large_clusters() {
    // 300 CPU-only nodes: a group with preferences compares max(count, 100) = 100 of them per
    // placement; the sample is stratified by affinity sum, so the one node the affinity prefers
    // is always among them.
    let mut c = Cluster::new();
    for i in 0..300 {
        let mut n = node(&format!("n{i:03}"), 4000, 4096);
        if i == 287 {
            n.meta.insert("special".into(), "yes".into());
        }
        c.node(n);
    }
    let mut g = group("g", 3, 100, 10);
    g.affinities = vec![affinity("${meta.special}", "=", "yes", 100)];
    c.register(job("find", job_type::SERVICE, vec![g]));
    let plan = c.schedule("find");
    assert!(plan.placements.iter().all(|a| a.node_id == "n287"), "{:?}", c.live("find"));
}

/// 1,000 CPU-only nodes, four 500 MHz allocations each: racks r0..r8 with 110 nodes, r9 with 10.
fn thousand_racked_nodes(c: &mut Cluster) {
    for i in 0..1000 {
        let rack = if i % 100 == 0 { "r9".to_string() } else { format!("r{}", i % 9) };
        c.node(racked(&format!("n{i:04}"), 2000, &rack));
    }
}

#[test]
fn a_spread_over_ten_racks_on_a_thousand_nodes_stays_within_one() {
    // 100 allocations compare 100 of the 1,000 nodes per placement; r9 has 1% of the nodes
    // (about one in an unstratified sample of 100) and still gets its tenth.
    let mut c = Cluster::new();
    thousand_racked_nodes(&mut c);
    let mut j = job("wide", job_type::SERVICE, vec![group("g", 100, 500, 10)]);
    j.spreads = vec![spread("${meta.rack}", 100, &[])];
    c.register(j.clone());
    let plan = c.schedule("wide");
    assert_eq!(plan.placements.len(), 100, "{:?}", plan.failed_tg_allocs);
    let racks = per_rack(&c, "wide");
    assert_eq!(racks.len(), 10, "{racks:?}");
    assert!(racks.iter().all(|(_, n)| *n == 10), "{racks:?}");

    // Scaled to 257 (3 of 10 racks get one more): still within ±1, counting those running.
    j.groups[0].count = Some(257);
    c.register(j);
    let plan = c.schedule("wide");
    assert_eq!(plan.placements.len(), 157, "{:?}", plan.failed_tg_allocs);
    let racks = per_rack(&c, "wide");
    let (lo, hi) = racks.iter().fold((usize::MAX, 0), |(lo, hi), (_, n)| (lo.min(*n), hi.max(*n)));
    assert!(hi - lo <= 1 && racks.len() == 10, "{racks:?}");
}

#[test]
fn a_spread_on_a_thousand_nodes_visits_a_bounded_number_of_nodes() {
    // The placement loop of `place::attempt`, counting the nodes offered: a bounded sample of
    // max(count, 100) fitting nodes per placement, plus each node skipped once as it fills.
    let mut c = Cluster::new();
    thousand_racked_nodes(&mut c);
    let mut tg = group("g", 100, 500, 10);
    tg.spreads = vec![spread("${meta.rack}", 100, &[])];
    let j = job("count", job_type::SERVICE, vec![tg.clone()]);
    let nodes: Vec<&Node> = c.st.nodes.values().collect();
    let prefs = preference::Preferences::for_group(&j, &tg, &nodes, &[], |_| None).unwrap_or_else(|| panic!("prefs"));
    let mut order = candidates::Candidates::preferring(&nodes, &resources::Ask::default(), 7, tg.effective_count(), |n| prefs.stratum(n));
    assert!(order.is_sampling());
    let mut tally = prefs.tally();
    let mut used: BTreeMap<&str, u32> = BTreeMap::new();
    let mut visits = 0usize;
    for _ in 0..tg.effective_count() {
        let mut best: Option<(f64, &Node)> = None;
        order.visit(|n| {
            visits += 1;
            if used.get(n.id.as_str()).copied().unwrap_or(0) >= 2 {
                return false;
            }
            let p = prefs.score(n, &tally);
            if best.is_none_or(|(bp, bn)| p > bp || (p == bp && n.id < bn.id)) {
                best = Some((p, n));
            }
            true
        });
        let Some((_, n)) = best else { panic!("nothing fits after {visits} visits") };
        *used.entry(n.id.as_str()).or_default() += 1;
        prefs.record(n, &mut tally);
    }
    let limit = candidates::preference_limit(tg.effective_count());
    assert_eq!(limit, 100);
    assert!(visits <= 100 * limit + 1000, "{visits} nodes visited for 100 placements");
    let mut per: BTreeMap<&str, u32> = BTreeMap::new();
    for (id, n) in &used {
        *per.entry(c.st.nodes[*id].meta["rack"].as_str()).or_default() += n;
    }
    assert!(per.len() == 10 && per.values().all(|n| *n == 10), "{per:?}");
}

#[test]
fn a_gang_with_a_spread_spreads_its_members() {
    let mut c = Cluster::new();
    three_racks(&mut c);
    let mut g = gang(group("w", 6, 1000, 10), "");
    g.spreads = vec![spread("${meta.rack}", 100, &[])];
    c.register(job("gs", job_type::BATCH, vec![g]));
    let plan = c.schedule("gs");
    assert_eq!(plan.atomic.len(), 1);
    assert_eq!(per_rack(&c, "gs"), counts(&[("r1", 2), ("r2", 2), ("r3", 2)]));
}

#[test]
fn gang_domains_tie_on_count_break_by_preference() {
    let mut c = Cluster::new();
    three_racks(&mut c);
    let mut g = gang(group("w", 2, 1000, 10), "${meta.rack}");
    g.affinities = vec![affinity("${meta.rack}", "=", "r3", 50)];
    c.register(job("gd", job_type::BATCH, vec![g]));
    c.schedule("gd");
    assert_eq!(per_rack(&c, "gd"), counts(&[("r3", 2)]), "every rack holds the gang; the affinity picks r3");
}

#[test]
fn preemption_prefers_the_preferred_node_among_equal_victims() {
    let mut c = Cluster::new();
    c.node(racked("a", 1000, "r1"));
    c.node(racked("b", 1000, "r2"));
    c.register(prio(job("low", job_type::BATCH, vec![group("g", 2, 1000, 10)]), 20));
    assert_eq!(c.schedule("low").placements.len(), 2);

    let mut g = group("g", 1, 500, 10);
    g.affinities = vec![affinity("${meta.rack}", "=", "r2", 50)];
    c.register(prio(job("high", job_type::SERVICE, vec![g]), 60));
    let plan = c.schedule("high");
    assert_eq!(plan.preemptions.len(), 1);
    assert_eq!(plan.placements[0].node_id, "b", "equal victims on a and b; the affinity picks b over the id order");
}

#[test]
fn job_level_preferences_are_part_of_the_spec() {
    let mut c = Cluster::new();
    c.node(racked("a", 4000, "r1"));
    let mut j = job("v", job_type::SERVICE, vec![group("g", 1, 100, 10)]);
    c.register(j.clone());
    assert_eq!(c.job("v").map(|j| j.version), Some(0));
    j.affinities = vec![affinity("${meta.rack}", "=", "r1", 50)];
    c.register(j.clone());
    let stored = c.job("v").unwrap_or_else(|| panic!("job v"));
    assert_eq!((stored.version, stored.affinities.len()), (1, 1), "an affinity change is a new version");
    j.spreads = vec![spread("${meta.rack}", 50, &[])];
    c.register(j);
    let stored = c.job("v").unwrap_or_else(|| panic!("job v"));
    assert_eq!((stored.version, stored.spreads.len()), (2, 1), "a spread change is a new version");
}

#[test]
fn a_job_level_preference_change_replaces_running_allocations() {
    let mut c = Cluster::new();
    c.node(racked("a", 4000, "r1"));
    c.node(racked("b", 4000, "r2"));
    let mut j = job("v", job_type::SERVICE, vec![group("g", 1, 100, 10)]);
    c.register(j.clone());
    let first = c.schedule("v");
    assert_eq!(first.placements.len(), 1);
    // A meta-only change is a new version too, but changes nothing the allocations run with.
    j.meta.insert("owner".into(), "ml-platform".into());
    c.register(j.clone());
    let same = c.schedule("v");
    assert!(same.stops.is_empty() && same.placements.is_empty(), "{same:?}");
    let other = if first.placements[0].node_id == "a" { "r2" } else { "r1" };
    j.affinities = vec![affinity("${meta.rack}", "=", other, 100)];
    c.register(j);
    let plan = c.schedule("v");
    assert_eq!(plan.stops.len(), 1, "the old allocation is replaced: {plan:?}");
    assert_eq!(plan.placements.len(), 1);
    let want = if other == "r2" { "b" } else { "a" };
    assert_eq!(plan.placements[0].node_id, want, "the replacement follows the new affinity");
}

#[test]
fn locality_ranks_before_the_score_and_numa_only_nodes_are_not_penalised() {
    // a: a DGX-like node (NVLink islands of 4, one NUMA node per island); b: reports only NUMA
    // nodes (all on one); c: reports nothing. Five GPUs span both islands of a ("system");
    // b's NUMA node is the best it can report, so it ranks with c, and wins by node id.
    let mut c = Cluster::new();
    let mut a = gpu_node("a", 8);
    let mut b = gpu_node("b", 8);
    for (n, dgx) in [(&mut a, true), (&mut b, false)] {
        if let Some(r) = n.resources.as_mut() {
            let ids: Vec<String> = r.gpus.iter().map(|g| g.id.clone()).collect();
            for (i, g) in r.gpus.iter_mut().enumerate() {
                g.numa_node = Some(if dgx { (i / 4) as i32 } else { 0 });
                if dgx {
                    g.nvlink_peers = (0..8).filter(|&j| j != i && j / 4 == i / 4).map(|j| ids[j].clone()).collect();
                }
            }
        }
    }
    c.node(a);
    c.node(b);
    c.node(gpu_node("c", 8));
    c.register(job("five", job_type::BATCH, vec![gpu_group("g", 1, 5)]));
    let plan = c.schedule("five");
    let got: Vec<(&str, String)> = plan
        .placements
        .iter()
        .map(|p| (p.node_id.as_str(), p.resources.as_ref().map(|r| r.gpu_locality.clone()).unwrap_or_default()))
        .collect();
    assert_eq!(got, [("b", "numa".to_string())]);
}

#[test]
fn the_scheduler_plans_for_the_learned_workload() {
    // A fresh cluster: a 2-GPU node and a 4-GPU node, nothing running. A 0.5 share alone (the
    // only ask learned) goes to the smaller node (the fuller one after the placement). After the
    // cluster has seen many 2-GPU asks, the same share goes to the 4-GPU node: on the 2-GPU node
    // it would leave no room for a 2-GPU ask, on the 4-GPU node two whole pairs minus one GPU.
    let placed_on = |learn: bool| {
        let mut c = Cluster::new();
        c.node(gpu_node("a", 2));
        c.node(gpu_node("b", 4));
        if learn {
            // Registered (learned) but too big to place: the cluster stays empty.
            c.register(job("pairs", job_type::BATCH, vec![gpu_group("g", 50, 2)]));
            c.apply(Command::StopJob {
                namespace: "default".into(),
                job_id: "pairs".into(),
                purge: true,
                eval: Evaluation { id: "stop-pairs".into(), ..eval_for("pairs") },
            });
        }
        assert!(c.st.allocs.is_empty());
        c.register(job("s", job_type::BATCH, vec![share_group("s", 1, 500, &[])]));
        let learned: Vec<(u32, u32)> = c.st.learned.buckets().iter().map(|b| (b.count, b.milli)).collect();
        assert_eq!(learned, if learn { vec![(1, 500), (2, 1000)] } else { vec![(1, 500)] });
        let plan = c.schedule("s");
        assert_eq!(plan.placements.len(), 1, "{plan:?}");
        plan.placements[0].node_id.clone()
    };
    assert_eq!(placed_on(false), "a");
    assert_eq!(placed_on(true), "b");
}

// ---- host ports (issue 13) ------------------------------------------------------------------

fn with_ports(mut g: TaskGroup, mode: &str, ports: &[(&str, u32, u32)]) -> TaskGroup {
    let ports = ports.iter().map(|&(label, static_port, to)| mlp_proto::v1::PortSpec { label: label.into(), static_port, to }).collect();
    g.network = Some(mlp_proto::v1::GroupNetwork { mode: mode.into(), ports });
    g
}

/// (label, host port, to) of each port of an allocation.
type PortTriples = Vec<(String, u32, u32)>;

fn ports_of(c: &Cluster, job: &str) -> Vec<(String, PortTriples)> {
    let mut v: Vec<_> =
        c.st.allocs_for_job("default", job)
            .filter(|a| resources::is_live(a))
            .map(|a| {
                let r = a.resources.clone().unwrap_or_default();
                (a.name.clone(), r.ports.iter().map(|p| (p.label.clone(), p.host_port, p.to)).collect())
            })
            .collect();
    v.sort();
    v
}

#[test]
fn dynamic_ports_are_picked_from_the_node_range_and_never_collide() {
    let mut c = Cluster::new();
    let mut n = node("n1", 100_000, 100_000);
    if let Some(r) = n.resources.as_mut() {
        (r.min_dynamic_port, r.max_dynamic_port) = (21_000, 21_005);
    }
    c.node(n);
    c.register(job("a", job_type::SERVICE, vec![with_ports(group("web", 2, 10, 10), "bridge", &[("http", 0, 8080), ("metrics", 0, 0)])]));
    c.schedule("a");
    let want = |h: u32, m: u32| vec![("http".to_string(), h, 8080), ("metrics".to_string(), m, m)];
    assert_eq!(ports_of(&c, "a"), [("a.web[0]".to_string(), want(21_000, 21_001)), ("a.web[1]".to_string(), want(21_002, 21_003))]);
    // A second job gets what is left; a third finds the range exhausted.
    c.register(job("b", job_type::SERVICE, vec![with_ports(group("web", 1, 10, 10), "bridge", &[("http", 0, 8080), ("x", 0, 0)])]));
    c.schedule("b");
    assert_eq!(ports_of(&c, "b")[0].1.iter().map(|p| p.1).collect::<Vec<_>>(), [21_004, 21_005]);
    c.register(job("c", job_type::SERVICE, vec![with_ports(group("web", 1, 10, 10), "bridge", &[("http", 0, 0)])]));
    let plan = c.schedule("c");
    assert!(plan.placements.is_empty());
    let m = &plan.failed_tg_allocs["web"];
    assert_eq!(m.dimension_exhausted, [("network: no free dynamic port".to_string(), 1)].into_iter().collect());
    // Once "a" stops, its ports are free again and "c" takes the lowest.
    for id in c.st.allocs_for_job("default", "a").map(|a| a.id.clone()).collect::<Vec<_>>() {
        c.set_client_status(&id, alloc_client::COMPLETE);
    }
    c.schedule("c");
    assert_eq!(ports_of(&c, "c")[0].1, [("http".to_string(), 21_000, 21_000)]);
}

#[test]
fn static_ports_conflict_with_other_allocations_on_the_node() {
    let mut c = Cluster::new();
    c.node(node("n1", 100_000, 100_000));
    c.node(node("n2", 100_000, 100_000));
    let admin = |count| with_ports(group("g", count, 10, 10), "host", &[("admin", 9000, 0)]);
    c.register(job("a", job_type::SERVICE, vec![admin(2)]));
    c.schedule("a");
    let nodes: BTreeSet<String> = c.live("a").into_iter().map(|(_, n)| n).collect();
    assert_eq!(nodes.len(), 2, "two allocations of one static port need two nodes");
    c.register(job("b", job_type::SERVICE, vec![admin(1)]));
    let plan = c.schedule("b");
    assert!(plan.placements.is_empty());
    let m = &plan.failed_tg_allocs["g"];
    assert_eq!(m.dimension_exhausted, [("network: port 9000 in use".to_string(), 2)].into_iter().collect());
    assert_eq!(explain(m).last().cloned(), Some("Dimension \"network: port 9000 in use\" exhausted on 2 nodes".to_string()));
}

#[test]
fn the_plan_applier_rejects_a_port_held_twice() {
    let mut c = Cluster::new();
    c.node(node("n1", 100_000, 100_000));
    c.register(job("a", job_type::SERVICE, vec![with_ports(group("g", 1, 10, 10), "bridge", &[("http", 0, 80)])]));
    c.schedule("a");
    let n1 = c.st.nodes["n1"].clone();
    let held = ports_of(&c, "a")[0].1[0].1;
    let extra = |port: u32| Allocation {
        id: format!("x-{port}"),
        node_id: "n1".into(),
        resources: Some(AllocatedResources {
            ports: vec![mlp_proto::v1::AllocatedPort { label: "p".into(), host_port: port, to: port }],
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(check_node_fit(&c.st, &n1, &[&extra(held)]), Err("network exhausted on node n1".into()));
    assert_eq!(check_node_fit(&c.st, &n1, &[&extra(held + 1)]), Ok(()));
}

#[test]
fn groups_without_ports_are_placed_as_before() {
    let mut c = Cluster::new();
    c.node(node("n1", 100_000, 100_000));
    c.register(job("a", job_type::SERVICE, vec![group("g", 3, 10, 10)]));
    c.schedule("a");
    assert!(ports_of(&c, "a").iter().all(|(_, p)| p.is_empty()));
    assert!(c.st.allocs.values().all(|a| a.rendezvous.is_none()));
}

#[test]
fn gang_members_get_the_rendezvous_of_rank_zero() {
    let mut c = Cluster::new();
    for i in 0..3 {
        let mut n = node(&format!("n{i}"), 1000, 10_000);
        n.rpc_addr = format!("10.0.0.{i}:4648");
        c.node(n);
    }
    let g = with_ports(gang(group("w", 3, 1000, 10), ""), "bridge", &[("rdzv", 0, 29_400)]);
    c.register(job("train", job_type::BATCH, vec![g]));
    let plan = c.schedule("train");
    assert_eq!(plan.placements.len(), 3);
    let leader = plan.placements.iter().find(|a| a.index == 0).cloned().unwrap_or_default();
    let leader_node = &c.st.nodes[&leader.node_id];
    let leader_port = leader.resources.as_ref().map(|r| r.ports[0].host_port).unwrap_or_default();
    for a in &plan.placements {
        let rv = a.rendezvous.clone().unwrap_or_default();
        assert_eq!((rv.rank, rv.size), (a.index, 3));
        assert_eq!(rv.leader_ip, leader_node.rpc_addr.trim_end_matches(":4648"));
        assert_eq!((rv.leader_port, rv.leader_alloc_id.as_str()), (leader_port, leader.id.as_str()));
        assert_eq!(rv.leader_node_id, leader.node_id);
    }
    // Without ports the leader's port is PyTorch's default.
    c.register(job("plain", job_type::BATCH, vec![gang(group("w", 2, 10, 10), "")]));
    let plan = c.schedule("plain");
    assert!(plan.placements.iter().all(|a| a.rendezvous.as_ref().is_some_and(|r| r.leader_port == super::ports::DEFAULT_RENDEZVOUS_PORT)));
}

mod deploy;
