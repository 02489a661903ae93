//! The C1M harness of `cargo bench --bench c1m` (`benches/c1m/harness.rs`) at sizes a debug
//! build runs quickly: every task placed, no node overcommitted, impossible shapes refused.

#[path = "../benches/c1m/harness.rs"]
#[allow(dead_code)]
mod harness;

use harness::{run, C1mError, Config};

/// The C1M path at a size a debug build runs quickly: sampling is on (200 GPU-less nodes),
/// two workers plan at once, and every task must end placed on a node that holds it.
#[test]
fn small_c1m_places_every_task_without_overcommit() {
    let cfg = Config { nodes: 200, jobs: 20, tasks_per_job: 100, workers: 2, ..Config::default() };
    let report = run(&cfg).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.placements, 2000);
    assert!(report.evals_run >= 20);
    assert!(report.nodes_used > 0);
}

/// Tight capacity: nodes hold 10 tasks each and the jobs need 90% of the cluster, so many
/// nodes fill up during a plan and conflicting plans get rejected and retried.
#[test]
fn tight_c1m_fills_nodes_without_overcommit() {
    let cfg = Config {
        nodes: 150,
        jobs: 27,
        tasks_per_job: 50,
        workers: 3,
        node_cpu_mhz: 1000,
        node_memory_mib: 4096,
        task_cpu_mhz: 100,
        task_memory_mib: 128,
    };
    let report = run(&cfg).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.placements, 1350);
    assert!(report.nodes_used >= 135, "{} nodes used", report.nodes_used);
}

#[test]
fn impossible_shapes_are_refused() {
    let cfg = Config { nodes: 1, jobs: 1, tasks_per_job: 1000, ..Config::default() };
    assert!(matches!(run(&cfg), Err(C1mError::Config(_))));
}
