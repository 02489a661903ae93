//! Property test of spreads: on random clusters with room for everything (racks of random
//! sizes, nodes of random capacity, other work already running, some nodes without the rack
//! attribute), a group with an even spread over `${meta.rack}` never leaves two racks whose
//! allocation counts differ by more than one, and puts nothing on a rackless node; also when
//! the group grows in a second pass on top of its first placements.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use mlp_proto::consts::{eval_status, job_type, node_status};
use mlp_proto::v1::*;
use mlp_server::plan_apply::check_plan;
use mlp_server::scheduler;
use mlp_server::state::{ClusterState, Command, PlanResult, Request};
use proptest::prelude::*;

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

    /// Registers `job`, schedules it and commits what the plan applier accepts.
    fn run(&mut self, job: Job) -> usize {
        let eval = Evaluation {
            id: format!("eval-{}-{}", job.id, self.index),
            namespace: "default".into(),
            job_id: job.id.clone(),
            status: eval_status::PENDING.into(),
            ..Default::default()
        };
        self.apply(Command::RegisterJob { job: job.clone(), eval: eval.clone() });
        let job = self.st.job("default", &job.id).cloned();
        let plan = scheduler::schedule(&self.st, job.as_ref(), &eval, 5000);
        let checked = check_plan(&self.st, plan, &Default::default());
        assert_eq!(checked.rejected, 0);
        let placed = checked.accepted.len();
        self.apply(Command::ApplyPlan(PlanResult { placements: checked.accepted, stops: checked.stops, ..Default::default() }));
        placed
    }

    /// Live allocations of `job` per rack ("" = a node without one).
    fn per_rack(&self, job: &str) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for a in self.st.allocs_for_job("default", job).filter(|a| a.desired_status == "run") {
            let rack = self.st.nodes[&a.node_id].meta.get("rack").cloned().unwrap_or_default();
            *m.entry(rack).or_default() += 1;
        }
        m
    }
}

fn job(id: &str, count: u32, cpu: u64, spread: bool) -> Job {
    Job {
        id: id.into(),
        name: id.into(),
        namespace: "default".into(),
        r#type: job_type::SERVICE.into(),
        priority: 50,
        groups: vec![TaskGroup {
            name: "g".into(),
            count: Some(count),
            spreads: if spread { vec![Spread { attribute: "${meta.rack}".into(), weight: Some(50), targets: vec![] }] } else { vec![] },
            tasks: vec![Task {
                name: "t".into(),
                driver: "exec".into(),
                config: Some(TaskConfig { command: "/bin/true".into(), args: vec![], ..Default::default() }),
                resources: Some(Resources { cpu_mhz: cpu, memory_mib: 10, ..Default::default() }),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn even_spread_never_leaves_two_racks_more_than_one_apart(
        // Per node: rack (0..racks, or none), CPU in units of 100 MHz beyond what is needed.
        nodes in prop::collection::vec((0u8..5, any::<bool>(), 0u64..40), 1..12),
        other in 0u32..6,
        first in 1u32..12,
        more in 0u32..12,
    ) {
        let mut c = Cluster { st: ClusterState::default(), index: 0 };
        let total = first + more;
        for (i, (rack, racked, extra)) in nodes.iter().enumerate() {
            let meta = if *racked || i == 0 {
                [("rack".to_string(), format!("r{rack}"))].into_iter().collect()
            } else {
                Default::default()
            };
            c.apply(Command::UpsertNode {
                node: Node {
                    id: format!("n{i:02}"),
                    name: format!("n{i:02}"),
                    status: node_status::READY.into(),
                    eligible: true,
                    drivers: vec!["exec".into()],
                    meta,
                    resources: Some(NodeResources {
                        cpu_cores: 8,
                        cpu_total_mhz: u64::from(total + other) * 100 + extra * 100,
                        memory_mib: 100_000,
                        disk_mib: 100_000,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                overlay: None,
                secret_hash: None,
            });
        }
        // Other work makes some nodes fuller, so bin-packing alone would favour them.
        if other > 0 {
            c.run(job("other", other, 100, false));
        }
        prop_assert_eq!(c.run(job("s", first, 100, true)) as u32, first);
        if more > 0 {
            prop_assert_eq!(c.run(job("s", total, 100, true)) as u32, more);
        }
        let counts = c.per_rack("s");
        prop_assert!(!counts.contains_key(""), "a rackless node got an allocation: {:?}", counts);
        let racks: std::collections::BTreeSet<String> =
            c.st.nodes.values().filter_map(|n| n.meta.get("rack").cloned()).collect();
        let per: Vec<usize> = racks.iter().map(|r| counts.get(r).copied().unwrap_or(0)).collect();
        let (lo, hi) = (per.iter().min().copied().unwrap_or(0), per.iter().max().copied().unwrap_or(0));
        prop_assert!(hi - lo <= 1, "racks {:?} got {:?}", racks, per);
        prop_assert_eq!(per.iter().sum::<usize>() as u32, total);
    }
}
