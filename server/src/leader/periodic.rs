//! The periodic launcher (issue 16 §2): while this server leads, launches every periodic job's
//! cron slots on time. The decision is replicated state: `ClusterState::periodic_launches`
//! holds each job's last launched slot, and `Command::PeriodicLaunch` of a slot at or before it
//! changes nothing. So a new leader launches the latest slot it finds missed (once, not once per
//! missed slot, like Nomad) and a slot two leaders both propose runs once.

use std::sync::Arc;
use std::time::Duration;

use mlp_proto::jobspec::jobtypes;
use mlp_proto::v1::Job;

use crate::leader::now_ms;
use crate::raft::node::RaftNode;
use crate::state::{job_key, ClusterState, Request, StateHandle};

/// The longest sleep between two looks at the state (new or changed periodic jobs).
const MAX_SLEEP: Duration = Duration::from_millis(500);

/// A launch owed now: the job (namespace, id) and the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub namespace: String,
    pub job_id: String,
    pub launch_ms: u64,
}

/// The periodic jobs (`ClusterState::periodic_jobs`, in key order), stopped ones too.
fn periodic_jobs(st: &ClusterState) -> impl Iterator<Item = &Job> {
    st.periodic_jobs.iter().filter_map(|key| st.jobs.get(key))
}

/// The launches owed at `now_ms`: per running periodic job, the latest slot after its last
/// launch (or after its registration, for one never launched) and not after now.
pub fn due_launches(st: &ClusterState, now_ms: u64) -> Vec<Due> {
    let mut out = Vec::new();
    for job in periodic_jobs(st) {
        let Some(p) = job.periodic.as_ref() else { continue };
        if job.stop {
            continue;
        }
        let since = st.periodic_launches.get(&job_key(&job.namespace, &job.id)).copied().unwrap_or(job.submit_time_ms);
        if let Some(launch_ms) = jobtypes::latest_launch_in(p, since, now_ms) {
            out.push(Due { namespace: job.namespace.clone(), job_id: job.id.clone(), launch_ms });
        }
    }
    out
}

/// The next slot of any periodic job after `now_ms`.
pub fn next_due(st: &ClusterState, now_ms: u64) -> Option<u64> {
    periodic_jobs(st).filter(|j| !j.stop).filter_map(|j| j.periodic.as_ref()).filter_map(|p| jobtypes::next_launch_after(p, now_ms)).min()
}

/// Runs forever; launches only while this server leads.
pub async fn run(raft: Arc<RaftNode>, state: Arc<StateHandle>) {
    let mut leader_rx = raft.leader_watch();
    loop {
        let now = now_ms();
        if raft.is_leader() {
            let due = due_launches(&state.read(), now);
            for d in due {
                let cmd = {
                    let st = state.read();
                    let Some(job) = st.job(&d.namespace, &d.job_id) else { continue };
                    crate::jobtypes::launch_command(job, d.launch_ms, false)
                };
                match raft.write(Request { now_ms: now_ms(), command: cmd }).await {
                    Ok(r) => {
                        let late_ms = now_ms().saturating_sub(d.launch_ms);
                        tracing::info!(job = %d.job_id, slot = %jobtypes::format_time(d.launch_ms), child = ?r.created, late_ms, "periodic launch");
                    }
                    Err(e) => tracing::warn!(job = %d.job_id, error = %e, "periodic launch could not commit; retried"),
                }
            }
        }
        let now = now_ms();
        let wait = next_due(&state.read(), now).map(|t| Duration::from_millis(t.saturating_sub(now))).unwrap_or(MAX_SLEEP).min(MAX_SLEEP);
        // A server that just became leader looks at once (a slot missed in the election).
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            r = leader_rx.changed() => {
                if r.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlp_proto::v1::PeriodicConfig;

    fn periodic(id: &str, cron: &str, submit_ms: u64) -> Job {
        Job {
            id: id.into(),
            name: id.into(),
            namespace: "default".into(),
            r#type: "batch".into(),
            submit_time_ms: submit_ms,
            periodic: Some(PeriodicConfig { crons: vec![cron.into()], ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn only_the_latest_missed_slot_after_the_last_launch_is_due() {
        let mut st = ClusterState::default();
        st.jobs.insert("default/a".into(), periodic("a", "* * * * *", 1_000));
        st.jobs.insert("default/b".into(), Job { stop: true, ..periodic("b", "* * * * *", 1_000) });
        st.jobs.insert("default/c".into(), Job { periodic: None, ..periodic("c", "* * * * *", 1_000) });
        st.rebuild_indexes();
        assert_eq!(st.periodic_jobs.iter().map(String::as_str).collect::<Vec<_>>(), ["default/a", "default/b"]);
        // Nothing before the first slot after registration.
        assert!(due_launches(&st, 59_999).is_empty());
        assert_eq!(next_due(&st, 59_999), Some(60_000));
        // A failover that lasted three slots owes the latest one, once.
        let due = due_launches(&st, 185_000);
        assert_eq!(due, vec![Due { namespace: "default".into(), job_id: "a".into(), launch_ms: 180_000 }]);
        st.periodic_launches.insert("default/a".into(), 180_000);
        assert!(due_launches(&st, 185_000).is_empty());
        assert_eq!(due_launches(&st, 240_000).len(), 1);
    }
}
