//! Deployments (issue 16 §1) through the real state machine: the scheduler paces a rolling
//! update by the watcher's health decisions, canaries wait for promotion, and a failed
//! deployment reverts to the latest stable version.

use super::*;
use crate::deploy::{self, DeploymentUpdate, HealthClock};
use mlp_proto::consts::{alloc_client, deployment_status, task_state};
use mlp_proto::v1::{TaskState, UpdateStrategy};

fn rolling(count: u32, command: &str, update: UpdateStrategy) -> Job {
    let mut g = group("web", count, 100, 100);
    g.tasks[0].config.as_mut().expect("config").command = command.into();
    let mut j = job("svc", job_type::SERVICE, vec![g]);
    j.update = Some(update);
    j
}

fn strategy() -> UpdateStrategy {
    UpdateStrategy {
        max_parallel: Some(1),
        health_check: Some("task_states".into()),
        min_healthy_time_ms: Some(1_000),
        healthy_deadline_ms: Some(60_000),
        progress_deadline_ms: Some(120_000),
        ..Default::default()
    }
}

impl Cluster {
    /// Schedules with the plan's deployment, as the leader commits it.
    fn schedule_deploying(&mut self, id: &str) -> Plan {
        let job = self.job(id);
        let mut plan = schedule(&self.st, job.as_ref(), &eval_for(id), 5000);
        let checked = crate::plan_apply::check_plan(&self.st, plan.clone(), &Default::default());
        assert_eq!(checked.rejected, 0);
        self.apply(Command::ApplyPlan(PlanResult {
            placements: checked.accepted,
            stops: checked.stops,
            deployment: plan.deployment.take(),
            cancel_deployments: std::mem::take(&mut plan.cancel_deployments),
            ..Default::default()
        }));
        plan
    }

    /// Every live allocation of `job` of version `v` starts running at 1000 ms.
    fn run_version(&mut self, job: &str, v: u64) {
        let ids: Vec<String> = self
            .st
            .allocs_for_job("default", job)
            .filter(|a| resources::is_live(a) && a.job_version == v && a.client_status == alloc_client::PENDING)
            .map(|a| a.id.clone())
            .collect();
        for id in ids {
            let node_id = self.st.allocs[&id].node_id.clone();
            let ts = TaskState { state: task_state::RUNNING.into(), started_at_ms: 1000, ..Default::default() };
            self.apply(Command::UpdateAllocsFromClient {
                node_id,
                updates: vec![AllocClientUpdate {
                    alloc_id: id,
                    client_status: alloc_client::RUNNING.into(),
                    task_states: [("t".to_string(), ts)].into_iter().collect(),
                    ..Default::default()
                }],
            });
        }
    }

    /// Runs the watcher once at `now` and commits what it decides.
    fn watch(&mut self, now: u64) -> Vec<DeploymentUpdate> {
        let updates = deploy::watch(&self.st, now, &mut HealthClock::default());
        for u in &updates {
            self.index += 1;
            let resp = self.st.apply(
                self.index,
                &Request { now_ms: now, command: Command::UpdateDeployment(Box::new(u.clone())) },
                &mut Vec::new(),
            );
            assert_eq!(resp.error, None);
        }
        updates
    }

    fn versions_live(&self, job: &str) -> Vec<u64> {
        let mut v: Vec<u64> = self.st.allocs_for_job("default", job).filter(|a| resources::is_live(a)).map(|a| a.job_version).collect();
        v.sort();
        v
    }

    fn deployment_of(&self, version: u64) -> mlp_proto::v1::Deployment {
        deploy::for_version(&self.st, "default", "svc", version).cloned().expect("a deployment")
    }
}

/// Deploys version 0 of a three-instance job and lets it become stable.
fn stable_v0(update: UpdateStrategy) -> Cluster {
    let mut c = Cluster::new();
    c.node(node("n1", 100_000, 100_000));
    c.register(rolling(3, "/bin/v0", update));
    let plan = c.schedule_deploying("svc");
    assert_eq!(plan.placements.len(), 3, "the first version is placed at once");
    assert!(plan.placements.iter().all(|a| !a.deployment_id.is_empty()), "tracked by the initial deployment");
    c.run_version("svc", 0);
    assert!(c.watch(1500).is_empty(), "not healthy before min_healthy_time");
    c.watch(2500);
    c.watch(2600);
    let d = c.deployment_of(0);
    assert_eq!(d.status, deployment_status::SUCCESSFUL, "{d:?}");
    assert!(c.job("svc").expect("job").stable, "a successful deployment makes its version stable");
    c
}

#[test]
fn a_rolling_update_replaces_max_parallel_at_a_time_gated_by_health() {
    let mut c = stable_v0(strategy());
    c.register(rolling(3, "/bin/v1", strategy()));
    let plan = c.schedule_deploying("svc");
    assert_eq!(plan.placements.len(), 1, "max_parallel = 1");
    assert_eq!(plan.stops.len(), 1);
    assert_eq!(c.versions_live("svc"), [0, 0, 1]);
    // Nothing more until the new one is healthy.
    let plan = c.schedule_deploying("svc");
    assert!(plan.placements.is_empty() && plan.stops.is_empty(), "{plan:?}");
    c.run_version("svc", 1);
    let updates = c.watch(2500);
    assert!(updates.iter().any(|u| u.healthy.len() == 1 && u.eval.is_some()), "healthy, with an evaluation: {updates:?}");
    c.schedule_deploying("svc");
    assert_eq!(c.versions_live("svc"), [0, 1, 1]);
    c.run_version("svc", 1);
    c.watch(2600);
    c.schedule_deploying("svc");
    c.run_version("svc", 1);
    c.watch(2700);
    assert_eq!(c.versions_live("svc"), [1, 1, 1]);
    c.watch(2800);
    assert_eq!(c.deployment_of(1).status, deployment_status::SUCCESSFUL);
    assert_eq!(c.deployment_of(1).groups["web"].healthy_allocs, 3);
}

#[test]
fn canaries_run_beside_the_old_version_until_promoted() {
    let mut c = stable_v0(strategy());
    let canary = UpdateStrategy { canary: Some(1), ..strategy() };
    c.register(rolling(3, "/bin/v1", canary.clone()));
    let plan = c.schedule_deploying("svc");
    assert_eq!(plan.placements.len(), 1);
    assert!(plan.stops.is_empty(), "a canary replaces nothing");
    assert!(plan.placements[0].deployment_status.as_ref().is_some_and(|s| s.canary));
    assert_eq!(c.versions_live("svc"), [0, 0, 0, 1]);
    c.run_version("svc", 1);
    c.watch(2500);
    c.watch(2600);
    let d = c.deployment_of(1);
    assert_eq!(d.status, deployment_status::RUNNING, "healthy canaries wait for a promotion");
    assert!(c.schedule_deploying("svc").placements.is_empty());
    assert!(c.watch(500_000).is_empty(), "no progress deadline while healthy canaries wait");
    // Promote: the canary's old twin stops and the roll goes on.
    c.apply(Command::UpdateDeployment(Box::new(DeploymentUpdate {
        deployment_id: d.id.clone(),
        promote: vec!["web".into()],
        ..Default::default()
    })));
    let plan = c.schedule_deploying("svc");
    assert_eq!(plan.stops.len(), 2, "the canary's twin and one more: {:?}", stop_reasons(&plan));
    assert_eq!(plan.placements.len(), 1);
    assert_eq!(c.versions_live("svc"), [0, 1, 1]);
}

#[test]
fn an_unhealthy_allocation_fails_the_deployment_and_auto_revert_restores_the_stable_version() {
    let s = UpdateStrategy { auto_revert: Some(true), canary: Some(1), ..strategy() };
    let mut c = stable_v0(s.clone());
    c.register(rolling(3, "/bin/broken", s.clone()));
    c.schedule_deploying("svc");
    let canary = c.st.allocs.values().find(|a| a.job_version == 1).expect("v1 alloc").id.clone();
    c.set_client_status(&canary, alloc_client::FAILED);
    let updates = c.watch(2500);
    assert_eq!(updates.len(), 1);
    let d = c.deployment_of(1);
    assert_eq!(d.status, deployment_status::FAILED);
    assert!(d.status_description.contains("reverting to stable version 0"), "{}", d.status_description);
    let job = c.job("svc").expect("job");
    assert_eq!((job.version, job.revert_of), (2, Some(0)), "the revert is a new version with version 0's spec");
    assert_eq!(d.reverted_to_version, 2);
    assert_eq!(job.groups, c.st.job_version("default", "svc", 0).expect("v0").groups);
    // The revert's deployment places no canaries (nomad#10882); nothing needs replacing
    // anyway: version 0's allocations have version 2's spec.
    let plan = c.schedule_deploying("svc");
    assert!(plan.stops.iter().all(|s| !s.description.contains("rolling")), "{:?}", stop_reasons(&plan));
    assert!(plan.placements.iter().all(|a| !a.deployment_status.as_ref().is_some_and(|s| s.canary)));
}

#[test]
fn a_deployment_without_progress_fails_at_its_progress_deadline() {
    let mut c = stable_v0(strategy());
    c.register(rolling(3, "/bin/v1", strategy()));
    c.schedule_deploying("svc");
    // The new allocation never starts running.
    assert!(c.watch(60_000).is_empty());
    let updates = c.watch(130_000);
    assert_eq!(updates.len(), 1, "{updates:?}");
    let d = c.deployment_of(1);
    assert_eq!(d.status, deployment_status::FAILED);
    assert!(d.status_description.contains("unhealthy") || d.status_description.contains("progress_deadline"), "{}", d.status_description);
    assert!(c.schedule_deploying("svc").placements.is_empty(), "a failed deployment replaces nothing more");
}

#[test]
fn a_paused_deployment_replaces_nothing_until_resumed() {
    let mut c = stable_v0(strategy());
    c.register(rolling(3, "/bin/v1", strategy()));
    c.schedule_deploying("svc");
    let d = c.deployment_of(1);
    c.apply(Command::UpdateDeployment(Box::new(DeploymentUpdate {
        deployment_id: d.id.clone(),
        status: Some(deployment_status::PAUSED.into()),
        ..Default::default()
    })));
    c.run_version("svc", 1);
    assert!(c.watch(2500).is_empty(), "a paused deployment is not watched");
    assert!(c.schedule_deploying("svc").placements.is_empty());
    c.apply(Command::UpdateDeployment(Box::new(DeploymentUpdate {
        deployment_id: d.id.clone(),
        status: Some(deployment_status::RUNNING.into()),
        ..Default::default()
    })));
    c.watch(2500);
    assert_eq!(c.schedule_deploying("svc").placements.len(), 1);
}

#[test]
fn a_newer_version_cancels_the_running_deployment_and_scaling_replaces_nothing() {
    let mut c = stable_v0(strategy());
    c.register(rolling(3, "/bin/v1", strategy()));
    c.schedule_deploying("svc");
    let d1 = c.deployment_of(1).id;
    c.register(rolling(3, "/bin/v2", strategy()));
    c.schedule_deploying("svc");
    assert_eq!(c.st.deployments[&d1].status, deployment_status::CANCELLED);
    // A count change is not a spec change: nothing is replaced.
    let mut c = stable_v0(strategy());
    c.register(rolling(5, "/bin/v0", strategy()));
    let plan = c.schedule_deploying("svc");
    assert_eq!(plan.placements.len(), 2, "two more");
    assert!(plan.stops.is_empty(), "{:?}", stop_reasons(&plan));
}

#[test]
fn deployments_are_on_the_event_stream() {
    let mut c = Cluster::new();
    c.node(node("n1", 100_000, 100_000));
    c.register(rolling(1, "/bin/v0", strategy()));
    c.schedule_deploying("svc");
    let plan_index = c.index;
    let d = c.deployment_of(0);
    assert_eq!(d.create_index, plan_index);
    let cmd = Command::UpdateDeployment(Box::new(DeploymentUpdate {
        deployment_id: d.id.clone(),
        status: Some(deployment_status::PAUSED.into()),
        ..Default::default()
    }));
    c.apply(cmd.clone());
    let batch = crate::events::batch_for(&c.st, c.index, &cmd, &c.st.touched);
    let e = batch.events.iter().find(|e| e.topic == crate::events::TOPIC_DEPLOYMENT).expect("a deployment event");
    assert_eq!(
        (e.r#type.as_str(), e.key.as_str(), e.filter_keys.as_slice()),
        ("DeploymentStatusUpdate", d.id.as_str(), &["svc".to_string()][..])
    );
    assert_eq!(e.deployment.as_ref().map(|d| d.status.as_str()), Some(deployment_status::PAUSED));
    // Purging the job deletes its deployments, with an event.
    let purge = Command::StopJob { namespace: "default".into(), job_id: "svc".into(), purge: true, eval: eval_for("svc2") };
    c.apply(purge.clone());
    assert!(c.st.deployments.is_empty());
    let batch = crate::events::batch_for(&c.st, c.index, &purge, &c.st.touched);
    assert!(batch.events.iter().any(|e| e.r#type == "DeploymentDeleted" && e.key == d.id), "{:?}", batch.events);
}

#[test]
fn a_destructive_update_on_a_full_node_uses_what_its_stops_free_but_not_their_ports() {
    // Room for exactly three instances: the update must reuse the stopped one's share in the
    // same plan rather than wait a blocked-evaluation round.
    let mut c = Cluster::new();
    c.node(node("n1", 300, 300));
    let with_port = |command: &str| {
        let mut j = rolling(3, command, strategy());
        j.groups[0].network = Some(mlp_proto::v1::GroupNetwork {
            ports: vec![mlp_proto::v1::PortSpec { label: "http".into(), ..Default::default() }],
            ..Default::default()
        });
        j
    };
    c.register(with_port("/bin/v0"));
    assert_eq!(c.schedule_deploying("svc").placements.len(), 3);
    let old_ports: Vec<u32> =
        c.st.allocs.values().flat_map(|a| a.resources.iter().flat_map(|r| r.ports.iter().map(|p| p.host_port))).collect();
    c.register(with_port("/bin/v1"));
    let plan = c.schedule_deploying("svc");
    assert_eq!((plan.placements.len(), plan.stops.len()), (1, 1), "{plan:?}");
    assert!(plan.failed_tg_allocs.is_empty(), "{:?}", plan.failed_tg_allocs);
    let new_port = plan.placements[0].resources.as_ref().expect("resources").ports[0].host_port;
    assert!(!old_ports.contains(&new_port), "the old task still serves on its port during its shutdown delay");
}

#[test]
fn manual_health_waits_for_a_person() {
    let manual = UpdateStrategy { health_check: Some("manual".into()), ..strategy() };
    let mut c = Cluster::new();
    c.node(node("n1", 100_000, 100_000));
    c.register(rolling(2, "/bin/v0", manual));
    c.schedule_deploying("svc");
    c.run_version("svc", 0);
    assert!(c.watch(50_000).is_empty(), "running tasks are not enough with manual health");
    let d = c.deployment_of(0);
    let ids: Vec<String> = c.st.allocs.keys().cloned().collect();
    c.apply(Command::UpdateDeployment(Box::new(DeploymentUpdate {
        deployment_id: d.id.clone(),
        healthy: ids.iter().map(|id| (id.clone(), "set by the user".to_string())).collect(),
        ..Default::default()
    })));
    c.watch(50_001);
    assert_eq!(c.deployment_of(0).status, deployment_status::SUCCESSFUL);
    // Health is decided once: a later contrary word changes nothing.
    let a = &c.st.allocs[&ids[0]];
    assert_eq!(a.deployment_status.as_ref().and_then(|s| s.healthy), Some(true));
}

#[test]
fn a_failed_deployment_leaves_its_unpromoted_canary_beside_the_old_allocations() {
    let s = UpdateStrategy { canary: Some(1), ..strategy() };
    let mut c = stable_v0(s.clone());
    c.register(rolling(3, "/bin/v1", s));
    c.schedule_deploying("svc");
    assert_eq!(c.versions_live("svc"), [0, 0, 0, 1]);
    let d = c.deployment_of(1);
    c.apply(Command::UpdateDeployment(Box::new(DeploymentUpdate {
        deployment_id: d.id.clone(),
        status: Some(deployment_status::FAILED.into()),
        ..Default::default()
    })));
    let plan = c.schedule_deploying("svc");
    assert!(plan.stops.is_empty() && plan.placements.is_empty(), "nothing replaced, nothing more placed: {plan:?}");
    assert_eq!(c.versions_live("svc"), [0, 0, 0, 1], "the old version keeps every index");
}
