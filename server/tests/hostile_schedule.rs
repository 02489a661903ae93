//! Hostile jobs through the scheduler (stable Rust, proptest): any job the validator accepts —
//! with random operators and operands (regexp, version, semver, sets), counts, GPU asks, gangs,
//! affinities and spreads — is planned by `scheduler::schedule` without a panic and within a
//! generous bound (a hang detector, not a speed claim), and applying the plan keeps the state
//! machine up.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use mlp_proto::consts::{eval_status, node_status};
use mlp_proto::jobspec;
use mlp_proto::v1::*;
use mlp_server::scheduler;
use mlp_server::state::{ClusterState, Command, PlanResult, Request};
use proptest::prelude::*;

const PER_PLAN: Duration = Duration::from_secs(20);

const ATTRIBUTES: &[&str] =
    &["${attr.kernel.name}", "${attr.os.version}", "${meta.rack}", "${node.id}", "${attr.gpu.models}", "${attr.missing}"];
const OPERATORS: &[&str] =
    &["", "=", "!=", "<", ">=", "regexp", "version", "semver", "set_contains", "set_contains_any", "is_set", "is_not_set"];
const VALUES: &[&str] =
    &["linux", "22.04", ">= 20.4, < 23", "~> 22.1", ">= 1.0.0", "^(a+)+$", "^l.*x$", "r1", "r1,r2", "A100,H100", "é", "a{1000}"];
/// Operands the validator must refuse (or that only some operators accept).
const HOSTILE_VALUES: &[&str] =
    &["(", "", "\u{0}", "99999999999999999999", "((((((((((((((((((((((((((((((((((a))))))))))))))))))))))))))))))))))"];

fn node(i: usize) -> Node {
    Node {
        id: format!("n{i}"),
        name: format!("n{i}"),
        status: node_status::READY.into(),
        eligible: true,
        drivers: vec!["exec".into(), "raw_exec".into()],
        attributes: [
            ("kernel.name", "linux"),
            ("os.version", if i.is_multiple_of(2) { "22.04" } else { "20.04.6" }),
            ("gpu.models", "A100"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        meta: [("rack".to_string(), format!("r{}", i % 3))].into_iter().collect(),
        resources: Some(NodeResources {
            cpu_cores: 8,
            cpu_mhz_per_core: 1000,
            cpu_total_mhz: 8000,
            memory_mib: 64_000,
            disk_mib: 100_000,
            gpus: (0..(i % 3) * 2)
                .map(|g| GpuDevice { id: format!("n{i}-gpu{g}"), model: "A100".into(), memory_mib: 40_000, ..Default::default() })
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn pick(list: &'static [&'static str]) -> impl Strategy<Value = String> {
    (0..list.len()).prop_map(move |i| list[i].to_string())
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![9 => pick(VALUES), 1 => pick(HOSTILE_VALUES)]
}

fn constraint() -> impl Strategy<Value = Constraint> {
    (pick(ATTRIBUTES), pick(OPERATORS), value()).prop_map(|(attribute, operator, value)| Constraint { attribute, operator, value })
}

fn affinity() -> impl Strategy<Value = Affinity> {
    (pick(ATTRIBUTES), pick(OPERATORS), value(), prop::option::of(prop_oneof![9 => -100i32..=100, 1 => any::<i32>()]))
        .prop_map(|(attribute, operator, value, weight)| Affinity { attribute, operator, value, weight })
}

fn spread() -> impl Strategy<Value = Spread> {
    (pick(ATTRIBUTES), prop::option::of(prop_oneof![9 => 1u32..=100, 1 => any::<u32>()]), prop::collection::vec((value(), 0u32..40), 0..3))
        .prop_map(|(attribute, weight, targets)| Spread {
            attribute,
            weight,
            targets: targets.into_iter().map(|(value, percent)| SpreadTarget { value, percent }).collect(),
        })
}

fn gpu() -> impl Strategy<Value = Option<GpuRequest>> {
    prop::option::of((prop::option::of(0u32..6), prop_oneof![3 => Just(0u32), 1 => 0u32..1200], prop::bool::ANY).prop_map(
        |(count, share_milli, model)| GpuRequest {
            count: if share_milli > 0 { Some(1) } else { count },
            share_milli,
            models: if model { vec!["A100".into()] } else { vec![] },
            ..Default::default()
        },
    ))
}

prop_compose! {
    fn job()(
        count in prop::option::of(0u32..40),
        gang in prop::bool::ANY,
        min_count in prop_oneof![3 => Just(0u32), 1 => 0u32..10],
        constraints in prop::collection::vec(constraint(), 0..3),
        group_constraints in prop::collection::vec(constraint(), 0..2),
        affinities in prop::collection::vec(affinity(), 0..3),
        spreads in prop::collection::vec(spread(), 0..2),
        gpu in gpu(),
        cpu in 0u64..20_000,
        cores in 0u32..10,
        priority in prop_oneof![9 => 1i32..=100, 1 => any::<i32>()],
        batch in prop::bool::ANY,
    ) -> Job {
        Job {
            id: "fuzz".into(),
            name: "fuzz".into(),
            r#type: if batch { "batch".into() } else { "service".into() },
            priority,
            constraints,
            groups: vec![TaskGroup {
                name: "g".into(),
                count,
                gang,
                min_count,
                constraints: group_constraints,
                affinities,
                spreads,
                tasks: vec![Task {
                    name: "t".into(),
                    driver: "exec".into(),
                    config: Some(TaskConfig { command: "/bin/true".into(), args: vec![], ..Default::default() }),
                    resources: Some(Resources { cpu_mhz: cpu, memory_mib: 100, cores, gpu, ..Default::default() }),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_valid_job_is_planned_without_panic(job in job()) {
        let mut job = job;
        jobspec::apply_defaults(&mut job);
        if jobspec::validate_job(&job).is_err() {
            return Ok(());
        }
        let mut st = ClusterState::default();
        let mut index = 0;
        let mut apply = |st: &mut ClusterState, command: Command| {
            index += 1;
            let mut effects = Vec::new();
            st.apply(index, &Request { now_ms: 1_000 + index, command }, &mut effects)
        };
        for i in 0..6 {
            apply(&mut st, Command::UpsertNode { node: node(i), overlay: None, secret_hash: None });
        }
        let eval = Evaluation {
            id: "e1".into(),
            namespace: job.namespace.clone(),
            job_id: job.id.clone(),
            priority: job.priority,
            r#type: job.r#type.clone(),
            triggered_by: "job-register".into(),
            status: eval_status::PENDING.into(),
            ..Default::default()
        };
        apply(&mut st, Command::RegisterJob { job: job.clone(), eval: eval.clone() });
        let stored = st.job(&job.namespace, &job.id).cloned();
        let started = Instant::now();
        let plan = scheduler::schedule(&st, stored.as_ref(), &eval, 2_000);
        prop_assert!(started.elapsed() < PER_PLAN, "planning took {:?}", started.elapsed());
        let resp = apply(
            &mut st,
            Command::ApplyPlan(PlanResult { eval: Some(eval), placements: plan.placements, stops: plan.stops, ..Default::default() }),
        );
        prop_assert!(resp.error.is_none(), "apply refused the plan: {:?}", resp.error);
    }
}

/// The generator must reach the scheduler: a fuzzer whose jobs all fail validation tests nothing.
#[test]
fn the_generator_produces_valid_jobs() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = job();
    let total = 500;
    let valid = (0..total)
        .filter(|_| {
            let mut j = strategy.new_tree(&mut runner).expect("generate").current();
            jobspec::apply_defaults(&mut j);
            jobspec::validate_job(&j).is_ok()
        })
        .count();
    assert!(valid * 5 >= total, "only {valid} of {total} generated jobs are valid");
}
