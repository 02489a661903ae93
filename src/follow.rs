//! Following the cluster through the event stream, never by polling: `mlp job run` (and
//! `--wait`), `mlp job stop`, `mlp node drain` and `mlp event stream`.
//!
//! A [`Follower`] reads one subscription and hides reconnects: a dropped connection or a
//! subscriber cut off for falling behind resubscribes from the last index seen, so no event is
//! missed or repeated. When the server no longer buffers that far back (or the state was
//! replaced), [`Next::Resync`] tells the caller to read the state once and continue from the
//! read's index.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::client::Channel;
use mlp_proto::consts::{alloc_client, eval_status, job_status};
use mlp_proto::v1::{
    event_service_client::EventServiceClient, Allocation, Evaluation, EventBatch, EventTopic, EventsRequest, GetJobRequest, Job,
};

use crate::client::{status_err, Clients};
use crate::output::short;

/// Reconnect attempts in a row before a stream error is final.
const MAX_RECONNECTS: u32 = 20;

pub enum Next {
    Batch(EventBatch),
    /// Events since the last index are gone: read the state and call [`Follower::resume`].
    Resync,
}

pub struct Follower {
    client: EventServiceClient<Channel>,
    req: EventsRequest,
    stream: Option<tonic::Streaming<EventBatch>>,
}

impl Follower {
    /// Events after `index` (0: from now on) on `topics` ("Topic" or "Topic:key") in `namespace`.
    pub fn new(c: &Clients, topics: &[(&str, &str)], namespace: &str, index: u64) -> Follower {
        let topics = topics.iter().map(|(t, k)| EventTopic { topic: t.to_string(), key: k.to_string() }).collect();
        Follower { client: c.events.clone(), req: EventsRequest { topics, namespace: namespace.to_string(), index }, stream: None }
    }

    /// Continues after `index` (a read's index after a resync).
    pub fn resume(&mut self, index: u64) {
        self.req.index = index;
        self.stream = None;
    }

    /// The next batch with events (heartbeats are skipped).
    pub async fn next(&mut self) -> anyhow::Result<Next> {
        let mut failures = 0u32;
        loop {
            let stream = match &mut self.stream {
                Some(s) => s,
                None => match self.client.events(self.req.clone()).await {
                    Ok(r) => self.stream.insert(r.into_inner()),
                    Err(s) if s.code() == tonic::Code::OutOfRange => return Ok(Next::Resync),
                    Err(s) if retryable(&s) && failures < MAX_RECONNECTS => {
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(50 * u64::from(failures.min(10)))).await;
                        continue;
                    }
                    Err(s) => return Err(status_err(s)),
                },
            };
            match stream.message().await {
                Ok(Some(b)) if b.events.is_empty() => continue,
                Ok(Some(b)) => {
                    self.req.index = b.index;
                    return Ok(Next::Batch(b));
                }
                Ok(None) => self.stream = None,
                Err(s) if matches!(s.code(), tonic::Code::OutOfRange | tonic::Code::Aborted) => {
                    self.stream = None;
                    return Ok(Next::Resync);
                }
                // Cut off for falling behind: resume from the last batch received.
                Err(s) if s.code() == tonic::Code::ResourceExhausted => self.stream = None,
                Err(s) if retryable(&s) && failures < MAX_RECONNECTS => {
                    failures += 1;
                    self.stream = None;
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(failures.min(10)))).await;
                }
                Err(s) => return Err(status_err(s)),
            }
        }
    }
}

fn retryable(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
}

/// What `mlp job run` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Every allocation of the registration's evaluation has left `pending`.
    Started,
    /// The job has ended (batch: every allocation finished): exit with the task's exit code.
    Finished,
}

/// One job as seen through its events.
#[derive(Default)]
struct JobView {
    job: Option<Job>,
    evals: BTreeMap<String, Evaluation>,
    allocs: BTreeMap<String, Allocation>,
}

impl JobView {
    /// The job as a read sees it, and the read's index (to follow the stream from).
    async fn read(c: &mut Clients, job_id: &str, namespace: &str) -> anyhow::Result<(JobView, u64)> {
        let req = GetJobRequest { job_id: job_id.to_string(), namespace: namespace.to_string(), ..Default::default() };
        let r = c.jobs.get(req).await.map_err(status_err)?.into_inner();
        let view = JobView {
            job: r.job,
            evals: r.evaluations.into_iter().map(|e| (e.id.clone(), e)).collect(),
            allocs: r.allocations.into_iter().map(|a| (a.id.clone(), a)).collect(),
        };
        Ok((view, r.index))
    }

    fn apply(&mut self, b: &EventBatch) {
        for e in &b.events {
            match (e.topic.as_str(), e.r#type.ends_with("Deleted")) {
                ("Job", false) => self.job = e.job.clone(),
                ("Job", true) => self.job = None,
                ("Evaluation", false) => {
                    if let Some(ev) = &e.evaluation {
                        self.evals.insert(ev.id.clone(), ev.clone());
                    }
                }
                ("Allocation", false) => {
                    if let Some(a) = &e.allocation {
                        self.allocs.insert(a.id.clone(), a.clone());
                    }
                }
                ("Allocation", true) => {
                    self.allocs.remove(&e.key);
                }
                _ => {}
            }
        }
    }
}

/// Follows a registration like Nomad's monitor, through the event stream from the
/// registration's index: evaluation → placements → allocations started (or, with
/// [`Until::Finished`], the job's end and the task's exit code).
pub async fn job_run(
    c: &mut Clients,
    job: &Job,
    eval_id: &str,
    version: u64,
    index: u64,
    until: Until,
) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    let ns = if job.namespace.is_empty() { "default" } else { job.namespace.as_str() };
    let mut f = Follower::new(c, &[("Job", &job.id), ("Evaluation", &job.id), ("Allocation", &job.id)], ns, index);
    let mut view = JobView::default();
    let mut printed: BTreeMap<String, String> = BTreeMap::new();
    // Driver events already shown (an image pull's progress): allocation, task, time, message.
    let mut progress_shown: std::collections::BTreeSet<(String, String, u64, String)> = Default::default();
    let mut evaluated = false;
    let mut placed_by_eval: Vec<String> = Vec::new();
    // Without --wait the CLI gives up after this long (the job keeps going).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let next = match until {
            Until::Finished => f.next().await?,
            Until::Started => match tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), f.next()).await {
                Ok(next) => next?,
                Err(_) => {
                    println!("==> Allocations still pending after 120s; follow with `mlp job status {}`", job.name);
                    return Ok(ExitCode::from(2));
                }
            },
        };
        match next {
            Next::Batch(b) => view.apply(&b),
            Next::Resync => {
                let (fresh, index) = JobView::read(c, &job.id, ns).await?;
                view = fresh;
                f.resume(index);
            }
        }
        if !evaluated {
            let Some(eval) = view.evals.get(eval_id).filter(|e| e.status != eval_status::PENDING) else { continue };
            evaluated = true;
            println!("==> Evaluation {} finished with status {:?}", short(&eval.id), eval.status);
            placed_by_eval = view.allocs.values().filter(|a| a.eval_id == eval.id).map(|a| a.id.clone()).collect();
            for id in &placed_by_eval {
                if let Some(a) = view.allocs.get(id) {
                    println!("    Allocation {} created: node {}, group {:?}", short(&a.id), short(&a.node_id), a.task_group);
                }
            }
            if !eval.failed_tg_allocs.is_empty() {
                println!(
                    "==> Some allocations could not be placed; they wait for capacity (evaluation {} is blocked):",
                    short(&eval.blocked_eval)
                );
                for line in mlp_server::leader::explain_failures(&eval.failed_tg_allocs) {
                    println!("    {line}");
                }
                if until == Until::Started {
                    return Ok(ExitCode::from(2));
                }
            }
            if placed_by_eval.is_empty() && until == Until::Started {
                println!("==> No new allocations (the job is already placed as specified).");
                return Ok(ExitCode::SUCCESS);
            }
        }
        // What a driver reports before its task starts (an image pull), as it comes.
        for a in view.allocs.values().filter(|a| a.job_version == version) {
            for (task, st) in &a.task_states {
                for e in st.events.iter().filter(|e| e.r#type == mlp_proto::consts::task_event::DRIVER) {
                    if progress_shown.insert((a.id.clone(), task.clone(), e.time_ms, e.message.clone())) {
                        println!("    Allocation {} task {task:?}: {}", short(&a.id), e.message);
                    }
                }
            }
        }
        // Status lines for this version's allocations as they change.
        for a in view.allocs.values().filter(|a| a.job_version == version) {
            if printed.get(&a.id) != Some(&a.client_status) {
                if !printed.contains_key(&a.id) && !placed_by_eval.contains(&a.id) {
                    println!("    Allocation {} created: node {}, group {:?}", short(&a.id), short(&a.node_id), a.task_group);
                }
                println!("    Allocation {} {}{}", short(&a.id), a.client_status, desc(&a.client_description));
                printed.insert(a.id.clone(), a.client_status.clone());
            }
        }
        match until {
            Until::Started => {
                let ours: Vec<&Allocation> = placed_by_eval.iter().filter_map(|id| view.allocs.get(id)).collect();
                if ours.iter().all(|a| a.client_status != alloc_client::PENDING) {
                    let failed = ours.iter().any(|a| a.client_status == alloc_client::FAILED);
                    println!(
                        "==> Deployed: {} allocation(s) of job {:?}{}",
                        ours.len(),
                        job.name,
                        if failed { " (some failed)" } else { "" }
                    );
                    return Ok(if failed { ExitCode::from(2) } else { ExitCode::SUCCESS });
                }
            }
            Until::Finished => {
                let dead = view.job.as_ref().is_some_and(|j| j.status == job_status::DEAD && j.version >= version);
                // An unchanged batch job that had already finished: its evaluation places nothing.
                let already = evaluated && placed_by_eval.is_empty() && view.job.is_none();
                if dead || already {
                    if already {
                        let (fresh, _) = JobView::read(c, &job.id, ns).await?;
                        if fresh.job.as_ref().is_some_and(|j| j.status != job_status::DEAD) {
                            view.job = fresh.job;
                            continue;
                        }
                        view.allocs = fresh.allocs;
                    }
                    let code = exit_code(view.allocs.values().filter(|a| a.job_version == version));
                    println!("==> Job {:?} finished: exit code {code}", job.name);
                    return Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)));
                }
            }
        }
    }
}

/// The exit code a batch job's allocations add up to: the one task's code when there is one
/// task, else the first failure's (1 when a failed task has none), else 0.
pub fn exit_code<'a>(allocs: impl Iterator<Item = &'a Allocation>) -> i32 {
    let mut states: Vec<(&str, Option<i32>, bool)> = Vec::new();
    for a in allocs.filter(|a| a.client_status != alloc_client::PREEMPTED) {
        if a.task_states.is_empty() && a.client_status != alloc_client::COMPLETE {
            states.push(("", None, true));
        }
        for (name, t) in &a.task_states {
            states.push((name.as_str(), t.exit_code, t.failed));
        }
    }
    if let [(_, code, failed)] = states.as_slice() {
        return code.unwrap_or(i32::from(*failed));
    }
    match states.iter().find(|(_, code, failed)| *failed || code.is_some_and(|c| c != 0)) {
        Some((_, code, _)) => code.filter(|c| *c != 0).unwrap_or(1),
        None => 0,
    }
}

pub fn desc(d: &str) -> String {
    if d.is_empty() {
        String::new()
    } else {
        format!(" ({d})")
    }
}

/// Follows a stop until none of the job's allocations is live.
/// A job's allocations read before a purge, which takes the job (and the read) away.
pub struct BeforeStop(JobView, u64);

/// Reads the job before it is purged (None when it cannot be read: the stop itself says why).
pub async fn before_stop(addr: &str, name: &str, namespace: &str) -> Option<BeforeStop> {
    let mut c = crate::client::connect(addr).await.ok()?;
    JobView::read(&mut c, name, namespace).await.ok().map(|(v, i)| BeforeStop(v, i))
}

pub async fn job_stopped(
    c: &mut Clients,
    name: &str,
    namespace: &str,
    eval_id: &str,
    index: u64,
    before: Option<BeforeStop>,
) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    let deadline = Instant::now() + Duration::from_secs(120);
    // The allocations as of the stop's index (or, for a purge, as read before it), then their
    // changes.
    let (mut view, read_at) = match before {
        Some(BeforeStop(view, at)) => (view, at),
        None => JobView::read(c, name, namespace).await?,
    };
    let mut f = Follower::new(c, &[("Evaluation", name), ("Allocation", name)], namespace, read_at.max(index));
    loop {
        let evaluated = view.evals.get(eval_id).is_some_and(|e| e.status != eval_status::PENDING);
        let live = view.allocs.values().filter(|a| !alloc_client::is_terminal(&a.client_status)).count();
        if evaluated && live == 0 {
            println!("==> All allocations of {name:?} have stopped");
            return Ok(ExitCode::SUCCESS);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, f.next()).await {
            Err(_) => {
                println!("==> {live} allocation(s) still stopping after 120s");
                return Ok(ExitCode::from(2));
            }
            Ok(next) => match next? {
                Next::Batch(b) => view.apply(&b),
                Next::Resync => match JobView::read(c, name, namespace).await {
                    Ok((fresh, read_at)) => {
                        view = fresh;
                        f.resume(read_at);
                    }
                    // Purged: what is left to wait for is what the stream says.
                    Err(_) => f.resume(index),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlp_proto::v1::TaskState;

    fn alloc(status: &str, tasks: &[(&str, Option<i32>, bool)]) -> Allocation {
        Allocation {
            client_status: status.into(),
            task_states: tasks
                .iter()
                .map(|(n, code, failed)| (n.to_string(), TaskState { exit_code: *code, failed: *failed, ..Default::default() }))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn exit_code_is_the_one_tasks_code() {
        assert_eq!(exit_code([alloc("complete", &[("t", Some(0), false)])].iter()), 0);
        assert_eq!(exit_code([alloc("failed", &[("t", Some(3), true)])].iter()), 3);
        assert_eq!(exit_code([alloc("failed", &[("t", None, true)])].iter()), 1);
        assert_eq!(exit_code([alloc("failed", &[])].iter()), 1);
    }

    #[test]
    fn exit_code_of_several_tasks_is_the_first_failure() {
        let a = [alloc("complete", &[("a", Some(0), false)]), alloc("failed", &[("b", Some(7), true)])];
        assert_eq!(exit_code(a.iter()), 7);
        let ok = [alloc("complete", &[("a", Some(0), false), ("b", Some(0), false)])];
        assert_eq!(exit_code(ok.iter()), 0);
    }
}
