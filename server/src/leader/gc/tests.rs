//! The collection rules, table-driven on hand-built states, and `apply` of `GarbageCollect`.

use mlp_proto::consts::{alloc_desired, eval_trigger};
use mlp_proto::v1::{Task, TaskGroup};

use super::*;
use crate::state::{Effect, PlanResult, Request};

const HOUR: u64 = 3_600_000;
/// "Now" in every test: day 10.
const NOW: u64 = 240 * HOUR;

fn job(id: &str, ty: &str, status: &str, stop: bool) -> Job {
    Job {
        id: id.into(),
        name: id.into(),
        namespace: "default".into(),
        r#type: ty.into(),
        status: status.into(),
        stop,
        groups: vec![TaskGroup {
            name: "g".into(),
            count: Some(1),
            tasks: vec![Task { name: "t".into(), driver: "raw_exec".into(), ..Default::default() }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn eval(id: &str, job: &str, status: &str, create_index: u64, modified: u64) -> Evaluation {
    Evaluation {
        id: id.into(),
        namespace: "default".into(),
        job_id: job.into(),
        status: status.into(),
        triggered_by: eval_trigger::JOB_REGISTER.into(),
        create_index,
        modify_time_ms: modified,
        ..Default::default()
    }
}

fn alloc(id: &str, job: &str, eval: &str, client: &str, desired: &str, modified: u64) -> Allocation {
    Allocation {
        id: id.into(),
        eval_id: eval.into(),
        node_id: "n1".into(),
        job_id: job.into(),
        namespace: "default".into(),
        task_group: "g".into(),
        client_status: client.into(),
        desired_status: desired.into(),
        modify_time_ms: modified,
        ..Default::default()
    }
}

fn state(jobs: Vec<Job>, evals: Vec<Evaluation>, allocs: Vec<Allocation>) -> ClusterState {
    let mut st = ClusterState::default();
    for j in jobs {
        st.job_versions.insert(job_key(&j.namespace, &j.id), vec![j.clone()]);
        st.jobs.insert(job_key(&j.namespace, &j.id), j);
    }
    for e in evals {
        st.evals.insert(e.id.clone(), e);
    }
    for a in allocs {
        st.allocs.insert(a.id.clone(), a);
    }
    st.nodes.insert("n1".into(), Node { id: "n1".into(), name: "n1".into(), status: node_status::READY.into(), ..Default::default() });
    st.rebuild_indexes();
    st
}

const OLD: u64 = NOW - 2 * HOUR; // older than the eval threshold, younger than the job one
const ANCIENT: u64 = NOW - 5 * HOUR; // older than both
const FRESH: u64 = NOW - 60_000;

struct Case {
    name: &'static str,
    st: ClusterState,
    t: GcThresholds,
    want: GcCandidates,
}

fn ids(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn cands(evals: &[&str], allocs: &[&str], jobs: &[&str], nodes: &[&str]) -> GcCandidates {
    GcCandidates { evals: ids(evals), allocs: ids(allocs), jobs: ids(jobs), nodes: ids(nodes) }
}

#[test]
fn candidates_follow_the_rules() {
    use alloc_client::{COMPLETE, FAILED, LOST, RUNNING};
    use alloc_desired::{RUN, STOP};
    use eval_status::{BLOCKED, CANCELED, COMPLETE as E_COMPLETE, FAILED as E_FAILED, PENDING};
    let d = GcThresholds::default();
    let running_batch = || job("b", job_type::BATCH, job_status::RUNNING, false);
    let cases = vec![
        Case {
            name: "a live job's latest evaluation stays; older terminal ones go",
            st: state(
                vec![job("s", job_type::SERVICE, job_status::RUNNING, false)],
                vec![eval("e1", "s", E_COMPLETE, 1, OLD), eval("e2", "s", E_FAILED, 2, OLD), eval("e3", "s", E_COMPLETE, 3, OLD)],
                vec![alloc("a3", "s", "e3", RUNNING, RUN, OLD)],
            ),
            t: d,
            want: cands(&["e1", "e2"], &[], &[], &[]),
        },
        Case {
            name: "blocked and pending evaluations stay, whatever their age, even forced",
            st: state(
                vec![job("s", job_type::SERVICE, job_status::PENDING, false)],
                vec![eval("e1", "s", BLOCKED, 1, ANCIENT), eval("e2", "s", PENDING, 2, ANCIENT), eval("e3", "s", CANCELED, 3, ANCIENT)],
                vec![],
            ),
            t: GcThresholds::FORCE,
            want: cands(&[], &[], &[], &[]),
        },
        Case {
            name: "a purged job's old terminal evaluations and allocations go; young ones stay",
            st: state(
                vec![],
                vec![eval("e1", "gone", E_COMPLETE, 1, OLD), eval("e2", "gone", E_COMPLETE, 2, FRESH)],
                vec![alloc("a1", "gone", "e1", COMPLETE, STOP, OLD), alloc("a2", "gone", "e2", FAILED, STOP, FRESH)],
            ),
            t: d,
            want: cands(&["e1"], &["a1"], &[], &[]),
        },
        Case {
            name: "an evaluation stays while an allocation it placed stays",
            st: state(vec![], vec![eval("e1", "gone", E_COMPLETE, 1, OLD)], vec![alloc("a1", "gone", "e1", RUNNING, STOP, OLD)]),
            t: d,
            want: cands(&[], &[], &[], &[]),
        },
        Case {
            name: "a failed allocation not yet rescheduled stays; a replaced one goes",
            st: state(
                vec![running_batch()],
                vec![eval("e1", "b", E_COMPLETE, 1, OLD), eval("e2", "b", E_COMPLETE, 2, OLD)],
                vec![
                    Allocation { next_allocation: "a2".into(), ..alloc("a1", "b", "e1", FAILED, RUN, OLD) },
                    Allocation { follow_up_eval_id: "later".into(), ..alloc("a2", "b", "e2", FAILED, RUN, OLD) },
                ],
            ),
            t: d,
            want: cands(&["e1"], &["a1"], &[], &[]),
        },
        Case {
            name: "a finished allocation of a live batch job holds its index and stays",
            st: state(
                vec![Job { groups: vec![TaskGroup { count: Some(2), ..running_batch().groups[0].clone() }], ..running_batch() }],
                vec![eval("e1", "b", E_COMPLETE, 1, OLD)],
                vec![
                    Allocation { index: 0, ..alloc("a1", "b", "e1", COMPLETE, RUN, OLD) },
                    Allocation { index: 1, ..alloc("a2", "b", "e1", RUNNING, RUN, OLD) },
                ],
            ),
            t: GcThresholds::FORCE,
            want: cands(&[], &[], &[], &[]),
        },
        Case {
            name: "a lost allocation not yet replaced stays; one stopped by the scheduler goes",
            st: state(
                vec![Job { groups: vec![TaskGroup { count: Some(2), ..running_batch().groups[0].clone() }], ..running_batch() }],
                vec![eval("e1", "b", E_COMPLETE, 1, OLD)],
                vec![
                    Allocation { index: 0, ..alloc("a1", "b", "e1", LOST, STOP, OLD) },
                    Allocation { index: 1, ..alloc("a2", "b", "e1", COMPLETE, STOP, OLD) },
                ],
            ),
            t: d,
            want: cands(&[], &["a2"], &[], &[]),
        },
        Case {
            name: "an allocation of an older, different version holds nothing and goes",
            st: {
                let mut st = state(
                    vec![Job { version: 1, ..running_batch() }],
                    vec![eval("e1", "b", E_COMPLETE, 1, OLD), eval("e2", "b", E_COMPLETE, 2, OLD)],
                    vec![
                        alloc("a1", "b", "e1", COMPLETE, RUN, OLD),
                        Allocation { job_version: 1, ..alloc("a2", "b", "e2", RUNNING, RUN, OLD) },
                    ],
                );
                let mut v0 = running_batch();
                v0.groups[0].tasks[0].driver = "exec".into();
                st.job_versions.insert("default/b".into(), vec![v0, Job { version: 1, ..running_batch() }]);
                st
            },
            t: d,
            want: cands(&["e1"], &["a1"], &[], &[]),
        },
        Case {
            name: "a stopped job older than the job threshold goes whole",
            st: state(
                vec![Job { submit_time_ms: ANCIENT, ..job("s", job_type::SERVICE, job_status::DEAD, true) }],
                vec![eval("e1", "s", E_COMPLETE, 1, ANCIENT), eval("e2", "s", E_COMPLETE, 2, ANCIENT)],
                vec![alloc("a1", "s", "e1", COMPLETE, STOP, ANCIENT)],
            ),
            t: d,
            want: cands(&[], &[], &["default/s"], &[]),
        },
        Case {
            name: "a stopped job younger than the job threshold stays; its terminal parts go",
            st: state(
                vec![Job { submit_time_ms: OLD, ..job("s", job_type::SERVICE, job_status::DEAD, true) }],
                vec![eval("e1", "s", E_COMPLETE, 1, OLD), eval("e2", "s", E_COMPLETE, 2, OLD)],
                vec![alloc("a1", "s", "e1", COMPLETE, STOP, OLD)],
            ),
            t: d,
            want: cands(&["e1"], &["a1"], &[], &[]),
        },
        Case {
            name: "a dead batch job goes whole once old; forced, at once",
            st: state(
                vec![Job { submit_time_ms: FRESH, ..job("b", job_type::BATCH, job_status::DEAD, false) }],
                vec![eval("e1", "b", E_COMPLETE, 1, FRESH)],
                vec![alloc("a1", "b", "e1", COMPLETE, RUN, FRESH)],
            ),
            t: GcThresholds::FORCE,
            want: cands(&[], &[], &["default/b"], &[]),
        },
        Case {
            name: "a stopped job with a running allocation stays; its terminal allocations go",
            st: state(
                vec![Job { submit_time_ms: ANCIENT, ..job("s", job_type::SERVICE, job_status::RUNNING, true) }],
                vec![eval("e1", "s", E_COMPLETE, 1, ANCIENT), eval("e2", "s", E_COMPLETE, 2, ANCIENT)],
                vec![alloc("a1", "s", "e1", RUNNING, STOP, ANCIENT), alloc("a0", "s", "e2", FAILED, RUN, ANCIENT)],
            ),
            t: d,
            want: cands(&[], &["a0"], &[], &[]),
        },
        Case {
            name: "a dead job with a pending evaluation stays",
            st: state(
                vec![Job { submit_time_ms: ANCIENT, ..job("s", job_type::SERVICE, job_status::DEAD, true) }],
                vec![eval("e1", "s", PENDING, 1, ANCIENT)],
                vec![],
            ),
            t: GcThresholds::FORCE,
            want: cands(&[], &[], &[], &[]),
        },
        Case {
            name: "a down node without allocations goes after the node threshold",
            st: {
                let mut st = state(vec![], vec![], vec![alloc("a1", "gone", "e1", LOST, STOP, ANCIENT)]);
                let down = |id: &str, hb: u64| Node {
                    id: id.into(),
                    name: id.into(),
                    status: node_status::DOWN.into(),
                    last_heartbeat_ms: hb,
                    ..Default::default()
                };
                st.nodes.insert("n1".into(), down("n1", NOW - 25 * HOUR)); // its only allocation goes now too
                st.nodes.insert("n2".into(), down("n2", NOW - 23 * HOUR)); // too recent
                st.nodes.insert("n3".into(), Node { status: node_status::READY.into(), ..down("n3", 0) });
                st.rebuild_indexes();
                st
            },
            t: d,
            want: cands(&[], &["a1"], &[], &["n1"]),
        },
        Case {
            name: "a down node with a live allocation stays",
            st: {
                let mut st = state(
                    vec![running_batch()],
                    vec![eval("e1", "b", E_COMPLETE, 1, OLD)],
                    vec![alloc("a1", "b", "e1", RUNNING, RUN, OLD)],
                );
                if let Some(n) = st.nodes.get_mut("n1") {
                    n.status = node_status::DOWN.into();
                }
                st
            },
            t: GcThresholds::FORCE,
            want: cands(&[], &[], &[], &[]),
        },
    ];
    for c in cases {
        assert_eq!(gc_candidates(&c.st, NOW, &c.t), c.want, "{}", c.name);
    }
}

#[test]
fn commands_are_chunked_allocations_first_nodes_last() {
    let c = cands(&["e1", "e2"], &["a1", "a2", "a3"], &["default/j"], &["n1"]);
    let cmds = c.into_commands(3);
    let want = vec![
        Command::GarbageCollect { evals: vec![], allocs: ids(&["a1", "a2", "a3"]), jobs: vec![], nodes: vec![] },
        Command::GarbageCollect { evals: ids(&["e1", "e2"]), allocs: vec![], jobs: ids(&["default/j"]), nodes: vec![] },
        Command::GarbageCollect { evals: vec![], allocs: vec![], jobs: vec![], nodes: ids(&["n1"]) },
    ];
    assert_eq!(cmds, want);
    assert!(GcCandidates::default().into_commands(MAX_IDS_PER_ENTRY).is_empty());
}

/// Indexes after `apply` equal indexes rebuilt from scratch.
fn assert_indexes_consistent(st: &ClusterState) {
    let mut fresh = st.clone();
    fresh.rebuild_indexes();
    assert_eq!(st.allocs_by_node, fresh.allocs_by_node, "allocs_by_node");
    assert_eq!(st.live_allocs_by_node, fresh.live_allocs_by_node, "live_allocs_by_node");
    assert_eq!(st.allocs_by_job, fresh.allocs_by_job, "allocs_by_job");
    assert_eq!(st.evals_by_job, fresh.evals_by_job, "evals_by_job");
}

fn req(now_ms: u64, command: Command) -> Request {
    Request { now_ms, command }
}

/// Two batch jobs through `apply`: "done" ran to completion, "live" still runs.
fn applied_state() -> ClusterState {
    let mut st = ClusterState::default();
    let mut fx: Vec<Effect> = Vec::new();
    let t0 = NOW - 5 * HOUR;
    st.apply(
        1,
        &req(
            t0,
            Command::UpsertNode {
                node: Node { id: "n1".into(), name: "n1".into(), ..Default::default() },
                overlay: None,
                secret_hash: None,
            },
        ),
        &mut fx,
    );
    for (i, name) in ["done", "live"].into_iter().enumerate() {
        let base = 10 * (i as u64 + 1);
        st.apply(
            base,
            &req(
                t0,
                Command::RegisterJob {
                    job: job(name, job_type::BATCH, "", false),
                    eval: eval(&format!("{name}-e1"), name, eval_status::PENDING, 0, 0),
                },
            ),
            &mut fx,
        );
        let placed = Allocation { index: 0, ..alloc(&format!("{name}-a1"), name, &format!("{name}-e1"), "", "", 0) };
        let done_eval = eval(&format!("{name}-e1"), name, eval_status::COMPLETE, 0, 0);
        st.apply(
            base + 1,
            &req(t0, Command::ApplyPlan(PlanResult { eval: Some(done_eval), placements: vec![placed], ..Default::default() })),
            &mut fx,
        );
        let status = if name == "done" { alloc_client::COMPLETE } else { alloc_client::RUNNING };
        let upd = mlp_proto::v1::AllocClientUpdate { alloc_id: format!("{name}-a1"), client_status: status.into(), ..Default::default() };
        st.apply(base + 2, &req(t0, Command::UpdateAllocsFromClient { node_id: "n1".into(), updates: vec![upd] }), &mut fx);
    }
    assert_eq!(st.jobs["default/done"].status, job_status::DEAD);
    assert_eq!(st.jobs["default/live"].status, job_status::RUNNING);
    st
}

#[test]
fn apply_removes_a_dead_job_whole_and_keeps_indexes_consistent() {
    let mut st = applied_state();
    let c = gc_candidates(&st, NOW, &GcThresholds::default());
    assert_eq!(c, cands(&[], &[], &["default/done"], &[]));
    let mut fx = Vec::new();
    let mut total = GcCounts::default();
    for (i, cmd) in c.into_commands(MAX_IDS_PER_ENTRY).into_iter().enumerate() {
        let r = st.apply(100 + i as u64, &req(NOW, cmd), &mut fx);
        total.add(&r.collected.unwrap_or_default());
    }
    assert_eq!(total, GcCounts { evals: 1, allocs: 1, jobs: 1, nodes: 0 });
    assert!(st.job("default", "done").is_none() && !st.job_versions.contains_key("default/done"));
    assert!(!st.evals.contains_key("done-e1") && !st.allocs.contains_key("done-a1"));
    assert!(st.job("default", "live").is_some() && st.allocs.contains_key("live-a1") && st.evals.contains_key("live-e1"));
    assert!(!st.allocs_by_job.contains_key("default/done") && !st.evals_by_job.contains_key("default/done"));
    assert_eq!(st.allocs_for_node("n1").map(|a| a.id.as_str()).collect::<Vec<_>>(), ["live-a1"]);
    assert_indexes_consistent(&st);
    assert!(fx.iter().all(|e| !matches!(e, Effect::Reset)));
    // Nothing is left to collect: the live job is untouched however old.
    assert!(gc_candidates(&st, NOW, &GcThresholds::FORCE).is_empty());
}

#[test]
fn apply_rechecks_and_skips_what_no_longer_qualifies() {
    let mut st = applied_state();
    let before = st.clone();
    let mut fx = Vec::new();
    // A proposer with a stale or wrong view: a running allocation, a live job, a pending
    // evaluation, the latest evaluation of a live job, a ready node, unknown ids.
    st.apply(99, &req(NOW, Command::UpsertEvals { evals: vec![eval("live-e2", "live", eval_status::PENDING, 0, 0)] }), &mut fx);
    let cmd = Command::GarbageCollect {
        evals: ids(&["live-e2", "nope"]),
        allocs: ids(&["live-a1", "nope"]),
        jobs: ids(&["default/live", "default/nope"]),
        nodes: ids(&["n1", "nope"]),
    };
    let r = st.apply(100, &req(NOW, cmd), &mut fx);
    assert_eq!(r.collected, Some(GcCounts::default()));
    assert_eq!(st.allocs.len(), before.allocs.len());
    assert_eq!(st.jobs.len(), before.jobs.len());
    assert_eq!(st.nodes.len(), 1);
    assert!(st.evals.contains_key("live-e2"));
    // The finished job's allocation holds its index while the job is kept, so alone it stays.
    let r = st.apply(
        101,
        &req(NOW, Command::GarbageCollect { evals: vec![], allocs: ids(&["done-a1"]), jobs: vec![], nodes: vec![] }),
        &mut fx,
    );
    assert_eq!(r.collected, Some(GcCounts::default()));
    assert_indexes_consistent(&st);
}

#[test]
fn an_evaluation_goes_with_its_allocations_in_one_entry() {
    let mut st = applied_state();
    let mut fx = Vec::new();
    // Stop "live": its allocation ends, then a newer evaluation exists.
    st.apply(
        200,
        &req(
            NOW - 3 * HOUR,
            Command::StopJob {
                namespace: "default".into(),
                job_id: "live".into(),
                purge: false,
                eval: eval("live-e2", "live", eval_status::PENDING, 0, 0),
            },
        ),
        &mut fx,
    );
    st.apply(
        201,
        &req(NOW - 3 * HOUR, Command::UpsertEvals { evals: vec![eval("live-e2", "live", eval_status::COMPLETE, 0, 0)] }),
        &mut fx,
    );
    let upd =
        mlp_proto::v1::AllocClientUpdate { alloc_id: "live-a1".into(), client_status: alloc_client::COMPLETE.into(), ..Default::default() };
    st.apply(202, &req(NOW - 3 * HOUR, Command::UpdateAllocsFromClient { node_id: "n1".into(), updates: vec![upd] }), &mut fx);
    let c = gc_candidates(&st, NOW, &GcThresholds::default());
    assert_eq!(c, cands(&["live-e1"], &["live-a1"], &["default/done"], &[]), "the stopped job is younger than the job threshold");
    let cmds = c.into_commands(MAX_IDS_PER_ENTRY);
    assert_eq!(cmds.len(), 1);
    for cmd in cmds {
        let r = st.apply(203, &req(NOW, cmd), &mut fx);
        assert_eq!(r.collected, Some(GcCounts { evals: 2, allocs: 2, jobs: 1, nodes: 0 }));
    }
    assert_eq!(st.evals.keys().collect::<Vec<_>>(), ["live-e2"], "the stopped job's latest evaluation stays with it");
    assert_indexes_consistent(&st);
}

#[test]
fn garbage_collect_decodes_and_survives_a_snapshot() {
    let mut st = applied_state();
    let mut fx = Vec::new();
    let c = gc_candidates(&st, NOW, &GcThresholds::FORCE);
    for cmd in c.into_commands(1) {
        let json = serde_json::to_string(&req(NOW, cmd)).unwrap_or_default();
        let back: Request = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
        st.apply(300, &back, &mut fx);
    }
    let mut restored: ClusterState = serde_json::from_str(&serde_json::to_string(&st).unwrap_or_default()).unwrap_or_default();
    restored.rebuild_indexes();
    assert_eq!(restored.jobs.keys().collect::<Vec<_>>(), ["default/live"]);
    assert_indexes_consistent(&restored);
    // An entry written without some of the lists still decodes.
    let old: Command = serde_json::from_str(r#"{"GarbageCollect":{"evals":["x"]}}"#).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(old, Command::GarbageCollect { ref allocs, .. } if allocs.is_empty()));
}
