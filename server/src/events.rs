//! The event stream: every committed change to jobs, evaluations, allocations and nodes, as
//! events a client subscribes to (`EventService.Events`, `GET /v1/event/stream`) and the blocking
//! queries wait on.
//!
//! The state machine publishes one [`EventBatch`] per applied entry that changed something,
//! built from what `ClusterState::apply` recorded in [`Touched`]. The broker keeps the latest
//! batches in a bounded buffer so that a client reconnecting with the last index it saw gets
//! every later event exactly once; an index older than the buffer is refused (the client must
//! re-read the state) rather than silently skipping events.
//!
//! Invariant: publishing never waits on a subscriber. Each subscriber has its own bounded
//! queue (a `broadcast` receiver); one that falls behind by more than [`SUBSCRIBER_QUEUE`]
//! batches is cut off with an error naming the index to resume from.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use mlp_proto::v1::{Event, EventBatch, EventTopic, EventsRequest};
use tokio::sync::broadcast;

use crate::state::{ClusterState, Command, Touched};

pub const TOPIC_JOB: &str = "Job";
pub const TOPIC_EVALUATION: &str = "Evaluation";
pub const TOPIC_ALLOCATION: &str = "Allocation";
pub const TOPIC_NODE: &str = "Node";
/// Service instances (issue 13 §3): key = service name, payload = its instances after the entry.
pub const TOPIC_SERVICE: &str = "Service";
/// Deployments (issue 16 §1): key = deployment id, filter key = its job.
pub const TOPIC_DEPLOYMENT: &str = "Deployment";
/// Namespaces (issue 15 §5): key = the namespace's name, payload = the namespace with its quota.
pub const TOPIC_NAMESPACE: &str = "Namespace";
pub const TOPICS: [&str; 7] = [TOPIC_JOB, TOPIC_EVALUATION, TOPIC_ALLOCATION, TOPIC_NODE, TOPIC_SERVICE, TOPIC_DEPLOYMENT, TOPIC_NAMESPACE];

/// Batches one subscriber may have queued before it is cut off.
pub const SUBSCRIBER_QUEUE: usize = 1024;
/// Events the broker keeps for resuming subscribers, by default.
pub const DEFAULT_BUFFER_EVENTS: usize = 4096;
/// Topics one subscription may name.
pub const MAX_TOPICS: usize = 64;
/// An idle stream sends an empty batch this often (so a dead connection is noticed).
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(10);
/// A client that takes no message for this long is cut off.
pub const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error(
        "events after index {requested} are no longer all buffered (the oldest buffered entry follows index {oldest}); \
         read the state again and subscribe from its index"
    )]
    Gone { requested: u64, oldest: u64 },
    #[error("the subscriber fell behind by {missed} batches and was cut off; resume from index {resume_from}")]
    Lagged { missed: u64, resume_from: u64 },
    #[error("the state was replaced at index {index} (snapshot restore or install); read the state again and subscribe from its index")]
    Reset { index: u64 },
    #[error("the server is shutting down")]
    Closed,
    #[error("{0}")]
    Invalid(String),
}

/// What flows to subscribers: a batch, or the news that the state was replaced.
#[derive(Debug, Clone)]
enum Item {
    Batch(Arc<EventBatch>),
    Reset(u64),
}

struct Buffer {
    batches: VecDeque<Arc<EventBatch>>,
    events: usize,
    /// Every batch with an index at or below this one is gone from the buffer (or predates it).
    gone_through: u64,
}

/// Keeps recent batches and hands them to subscribers.
pub struct EventBroker {
    buffer: Mutex<Buffer>,
    capacity: usize,
    tx: broadcast::Sender<Item>,
}

impl EventBroker {
    pub fn new(capacity_events: usize) -> EventBroker {
        let (tx, _) = broadcast::channel(SUBSCRIBER_QUEUE);
        EventBroker {
            buffer: Mutex::new(Buffer { batches: VecDeque::new(), events: 0, gone_through: 0 }),
            capacity: capacity_events.max(1),
            tx,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Buffer> {
        match self.buffer.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Adds one entry's batch (never blocks on subscribers).
    pub fn publish(&self, batch: EventBatch) {
        if batch.events.is_empty() {
            return;
        }
        let batch = Arc::new(batch);
        let mut buf = self.lock();
        buf.events += batch.events.len();
        buf.batches.push_back(batch.clone());
        while buf.events > self.capacity && buf.batches.len() > 1 {
            if let Some(old) = buf.batches.pop_front() {
                buf.events -= old.events.len();
                buf.gone_through = buf.gone_through.max(old.index);
            }
        }
        // Sent while holding the buffer lock, so a subscriber sees each batch exactly once:
        // either in the buffer it copied or on its receiver, never both or neither.
        let _ = self.tx.send(Item::Batch(batch));
    }

    /// The state was replaced wholesale at `index`: buffered events no longer describe it, and
    /// every subscriber is told to read it again.
    pub fn reset(&self, index: u64) {
        let mut buf = self.lock();
        buf.batches.clear();
        buf.events = 0;
        buf.gone_through = index;
        let _ = self.tx.send(Item::Reset(index));
    }

    /// A subscription to the batches after `from` (0: from now on) that match `filter`.
    pub fn subscribe(&self, from: u64, filter: Filter) -> Result<Subscription, EventError> {
        let buf = self.lock();
        let rx = self.tx.subscribe();
        let backlog: VecDeque<Arc<EventBatch>> = if from == 0 {
            VecDeque::new()
        } else {
            if from < buf.gone_through {
                return Err(EventError::Gone { requested: from, oldest: buf.gone_through });
            }
            buf.batches.iter().filter(|b| b.index > from).cloned().collect()
        };
        Ok(Subscription { rx, backlog, filter, last: from })
    }

    /// Batches and events held for resuming subscribers.
    pub fn buffered(&self) -> (usize, usize) {
        let buf = self.lock();
        (buf.batches.len(), buf.events)
    }

    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }
}

/// One subscriber's view: buffered batches first, then live ones.
pub struct Subscription {
    rx: broadcast::Receiver<Item>,
    backlog: VecDeque<Arc<EventBatch>>,
    filter: Filter,
    /// Index of the last batch handed out (or skipped as not matching).
    last: u64,
}

impl Subscription {
    /// The next batch with at least one matching event (only the matching events).
    pub async fn next(&mut self) -> Result<EventBatch, EventError> {
        loop {
            let batch = match self.backlog.pop_front() {
                Some(b) => b,
                None => match self.rx.recv().await {
                    Ok(Item::Batch(b)) => b,
                    Ok(Item::Reset(index)) => return Err(EventError::Reset { index }),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        return Err(EventError::Lagged { missed, resume_from: self.last });
                    }
                    Err(broadcast::error::RecvError::Closed) => return Err(EventError::Closed),
                },
            };
            // Live batches already in the copied backlog come again on the receiver.
            if batch.index <= self.last {
                continue;
            }
            self.last = batch.index;
            let events: Vec<Event> = batch.events.iter().filter(|e| self.filter.matches(e)).cloned().collect();
            if !events.is_empty() {
                return Ok(EventBatch { index: batch.index, events });
            }
        }
    }

    /// Index of the last batch seen, matching or not: the index to resume from.
    pub fn last_index(&self) -> u64 {
        self.last
    }
}

/// Which events a subscriber wants.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// (topic, key); an empty list matches every topic; key `None` matches every key.
    topics: Vec<(String, Option<String>)>,
    /// `None`: every namespace.
    namespace: Option<String>,
}

impl Filter {
    /// Checks a request's topics: known names, bounded count.
    pub fn from_request(req: &EventsRequest) -> Result<Filter, EventError> {
        Filter::new(&req.topics, &req.namespace)
    }

    pub fn new(topics: &[EventTopic], namespace: &str) -> Result<Filter, EventError> {
        if topics.len() > MAX_TOPICS {
            return Err(EventError::Invalid(format!("topics: {} given, at most {MAX_TOPICS}", topics.len())));
        }
        let mut out = Vec::with_capacity(topics.len());
        for (i, t) in topics.iter().enumerate() {
            let Some(topic) = TOPICS.iter().find(|k| k.eq_ignore_ascii_case(&t.topic)) else {
                return Err(EventError::Invalid(format!("topics[{i}].topic {:?} is not one of {}", t.topic, TOPICS.join(", "))));
            };
            if t.key.len() > 256 {
                return Err(EventError::Invalid(format!("topics[{i}].key is {} bytes, at most 256", t.key.len())));
            }
            let key = (!t.key.is_empty() && t.key != "*").then(|| t.key.clone());
            out.push((topic.to_string(), key));
        }
        let namespace = (!namespace.is_empty() && namespace != "*").then(|| namespace.to_string());
        Ok(Filter { topics: out, namespace })
    }

    pub fn matches(&self, e: &Event) -> bool {
        if let Some(ns) = &self.namespace {
            if e.topic != TOPIC_NODE && &e.namespace != ns {
                return false;
            }
        }
        self.topics.is_empty()
            || self
                .topics
                .iter()
                .any(|(topic, key)| *topic == e.topic && key.as_ref().is_none_or(|k| *k == e.key || e.filter_keys.iter().any(|f| f == k)))
    }
}

/// The events of one applied entry, from what it touched (objects as they are after it).
pub fn batch_for(st: &ClusterState, index: u64, command: &Command, touched: &Touched) -> EventBatch {
    let mut events = Vec::new();
    let job_type = match command {
        Command::RegisterJob { .. } | Command::RegisterJobInNamespace { .. } => "JobRegistered",
        Command::StopJob { .. } => "JobDeregistered",
        _ => "JobUpdated",
    };
    for key in &touched.jobs {
        let Some(job) = st.jobs.get(key) else { continue };
        events.push(Event {
            topic: TOPIC_JOB.into(),
            r#type: job_type.into(),
            key: job.id.clone(),
            namespace: job.namespace.clone(),
            index,
            job: Some({
                let mut job = job.clone();
                mlp_proto::redact::job(&mut job);
                job
            }),
            ..Default::default()
        });
    }
    for id in &touched.evals {
        let Some(e) = st.evals.get(id) else { continue };
        events.push(Event {
            topic: TOPIC_EVALUATION.into(),
            r#type: "EvaluationUpdated".into(),
            key: e.id.clone(),
            namespace: e.namespace.clone(),
            filter_keys: vec![e.job_id.clone()],
            index,
            evaluation: Some(e.clone()),
            ..Default::default()
        });
    }
    for id in &touched.allocs {
        let Some(a) = st.allocs.get(id) else { continue };
        let placed = matches!(command, Command::ApplyPlan(_)) && a.create_index == index;
        events.push(Event {
            topic: TOPIC_ALLOCATION.into(),
            r#type: if placed { "AllocationPlaced" } else { "AllocationUpdated" }.into(),
            key: a.id.clone(),
            namespace: a.namespace.clone(),
            filter_keys: vec![a.job_id.clone(), a.node_id.clone()],
            index,
            allocation: Some({
                let mut a = a.clone();
                mlp_proto::redact::alloc(&mut a);
                a
            }),
            ..Default::default()
        });
    }
    let node_type = match command {
        Command::UpsertNode { .. } => "NodeRegistration",
        Command::UpdateNodeDrain { .. } => "NodeDrain",
        Command::UpdateNodeEligibility { .. } => "NodeEligibility",
        _ => "NodeUpdated",
    };
    for id in &touched.nodes {
        let Some(n) = st.nodes.get(id) else { continue };
        events.push(Event {
            topic: TOPIC_NODE.into(),
            r#type: node_type.into(),
            key: n.id.clone(),
            index,
            node: Some(n.clone()),
            ..Default::default()
        });
    }
    for (namespace, name) in &touched.services {
        events.push(Event {
            topic: TOPIC_SERVICE.into(),
            r#type: "ServiceUpdated".into(),
            key: name.clone(),
            namespace: namespace.clone(),
            index,
            services: st.service_instances(namespace, name, false),
            ..Default::default()
        });
    }
    for id in &touched.deployments {
        let Some(d) = st.deployments.get(id) else { continue };
        let kind = match command {
            Command::ApplyPlan(_) if d.create_index == index => "DeploymentCreated",
            Command::UpdateDeployment(u) if u.status.is_some() => "DeploymentStatusUpdate",
            Command::UpdateDeployment(u) if !u.promote.is_empty() => "DeploymentPromotion",
            Command::UpdateDeployment(_) => "DeploymentAllocHealth",
            _ => "DeploymentUpdated",
        };
        events.push(Event {
            topic: TOPIC_DEPLOYMENT.into(),
            r#type: kind.into(),
            key: d.id.clone(),
            namespace: d.namespace.clone(),
            filter_keys: vec![d.job_id.clone()],
            index,
            deployment: Some(d.clone()),
            ..Default::default()
        });
    }
    // Namespaces: the command names the one it changed (an entry the state refused changed none,
    // and left its modify index elsewhere). A deletion is in `touched.deleted` (NamespaceDeleted),
    // recorded only when it was applied.
    if let Command::UpsertNamespace { namespace } = command {
        if let Some(ns) = st.namespaces.get(&namespace.name).filter(|n| n.modify_index == index) {
            events.push(Event {
                topic: TOPIC_NAMESPACE.into(),
                r#type: "NamespaceUpserted".into(),
                key: ns.name.clone(),
                namespace: ns.name.clone(),
                index,
                namespace_object: Some(ns.clone()),
                ..Default::default()
            });
        }
    }
    for d in &touched.deleted {
        let kind = match command {
            Command::StopJob { .. } if d.topic == TOPIC_JOB => "JobDeregistered".to_string(),
            _ => format!("{}Deleted", d.topic),
        };
        events.push(Event {
            topic: d.topic.into(),
            r#type: kind,
            key: d.key.clone(),
            namespace: d.namespace.clone(),
            filter_keys: d.filter_keys.clone(),
            index,
            ..Default::default()
        });
    }
    EventBatch { index, events }
}

#[cfg(test)]
mod tests;
