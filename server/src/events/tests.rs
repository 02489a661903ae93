use super::*;
use mlp_proto::v1::Allocation;

fn batch(index: u64, events: &[(&str, &str, &str)]) -> EventBatch {
    EventBatch {
        index,
        events: events
            .iter()
            .map(|(topic, key, job)| Event {
                topic: topic.to_string(),
                key: key.to_string(),
                namespace: "default".into(),
                filter_keys: vec![job.to_string()],
                index,
                allocation: Some(Allocation { id: key.to_string(), ..Default::default() }),
                ..Default::default()
            })
            .collect(),
    }
}

fn all() -> Filter {
    Filter::default()
}

async fn indexes(sub: &mut Subscription, n: usize) -> Vec<u64> {
    let mut out = Vec::new();
    for _ in 0..n {
        let b = tokio::time::timeout(std::time::Duration::from_secs(5), sub.next()).await.expect("a batch in time").expect("a batch");
        out.push(b.index);
    }
    out
}

#[tokio::test]
async fn resuming_from_an_index_gets_every_later_batch_once() {
    let broker = EventBroker::new(100);
    for i in 1..=5 {
        broker.publish(batch(i, &[("Allocation", &format!("a{i}"), "j")]));
    }
    let mut sub = broker.subscribe(2, all()).expect("subscribe");
    for i in 6..=7 {
        broker.publish(batch(i, &[("Allocation", &format!("a{i}"), "j")]));
    }
    assert_eq!(indexes(&mut sub, 5).await, vec![3, 4, 5, 6, 7]);
    // Nothing more, nothing repeated.
    assert!(tokio::time::timeout(std::time::Duration::from_millis(50), sub.next()).await.is_err());
    // Reconnecting from the last index seen gives exactly what came after.
    broker.publish(batch(8, &[("Allocation", "a8", "j")]));
    let mut again = broker.subscribe(sub.last_index(), all()).expect("resubscribe");
    assert_eq!(indexes(&mut again, 1).await, vec![8]);
}

#[tokio::test]
async fn from_zero_starts_now() {
    let broker = EventBroker::new(100);
    broker.publish(batch(1, &[("Allocation", "a1", "j")]));
    let mut sub = broker.subscribe(0, all()).expect("subscribe");
    broker.publish(batch(2, &[("Allocation", "a2", "j")]));
    assert_eq!(indexes(&mut sub, 1).await, vec![2]);
}

#[tokio::test]
async fn an_index_older_than_the_buffer_is_refused_not_skipped() {
    let broker = EventBroker::new(3);
    for i in 1..=10 {
        broker.publish(batch(i, &[("Allocation", &format!("a{i}"), "j")]));
    }
    assert_eq!(broker.buffered(), (3, 3));
    match broker.subscribe(5, all()) {
        Err(EventError::Gone { requested: 5, oldest: 7 }) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a subscription from index 5 would miss events 6 and 7"),
    }
    let mut sub = broker.subscribe(7, all()).expect("index 7 is covered");
    assert_eq!(indexes(&mut sub, 3).await, vec![8, 9, 10]);
}

#[tokio::test]
async fn a_slow_subscriber_is_cut_off_and_publishing_never_waits() {
    let broker = EventBroker::new(10);
    let mut slow = broker.subscribe(0, all()).expect("subscribe");
    let start = std::time::Instant::now();
    for i in 1..=(SUBSCRIBER_QUEUE as u64 + 10) {
        broker.publish(batch(i, &[("Allocation", "a", "j")]));
    }
    // Generous bound: publishing is a push under a mutex, never a wait on the reader.
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
    match slow.next().await {
        Err(EventError::Lagged { missed, resume_from: 0 }) => assert!(missed >= 10, "missed {missed}"),
        other => panic!("expected the slow subscriber cut off, got {other:?}"),
    }
}

#[tokio::test]
async fn filters_by_topic_key_filter_key_and_namespace() {
    let broker = EventBroker::new(100);
    let topics = vec![EventTopic { topic: "allocation".into(), key: "job-a".into() }];
    let mut sub = broker.subscribe(0, Filter::new(&topics, "default").expect("filter")).expect("subscribe");
    broker.publish(batch(1, &[("Allocation", "x1", "job-b")]));
    broker.publish(batch(2, &[("Allocation", "x2", "job-a"), ("Allocation", "x3", "job-b")]));
    let mut other_ns = batch(3, &[("Allocation", "x4", "job-a")]);
    other_ns.events[0].namespace = "team".into();
    broker.publish(other_ns);
    broker.publish(batch(4, &[("Evaluation", "job-a", "job-a")]));
    broker.publish(batch(5, &[("Allocation", "job-a", "zzz")]));
    let b = sub.next().await.expect("batch 2");
    assert_eq!((b.index, b.events.len(), b.events[0].key.as_str()), (2, 1, "x2"));
    let b = sub.next().await.expect("batch 5 matches by key");
    assert_eq!(b.index, 5);
    assert!(Filter::new(&[EventTopic { topic: "Jobz".into(), key: String::new() }], "").is_err());
}

#[tokio::test]
async fn a_reset_ends_every_subscription_and_the_buffer() {
    let broker = EventBroker::new(100);
    broker.publish(batch(1, &[("Allocation", "a1", "j")]));
    let mut sub = broker.subscribe(0, all()).expect("subscribe");
    broker.reset(9);
    assert_eq!(sub.next().await.err(), Some(EventError::Reset { index: 9 }));
    assert!(matches!(broker.subscribe(1, all()), Err(EventError::Gone { .. })));
    assert!(broker.subscribe(9, all()).is_ok());
}

#[tokio::test]
async fn one_entry_of_several_requests_is_one_batch() {
    use crate::state::{Request, StateHandle};
    use mlp_proto::v1::{Evaluation, Job};
    let (state, _events) = StateHandle::new();
    let mut sub = state.events().subscribe(0, all()).expect("subscribe");
    let register = |id: &str| Request {
        now_ms: 1,
        command: Command::RegisterJob {
            job: Job { id: id.into(), name: id.into(), namespace: "default".into(), r#type: "service".into(), ..Default::default() },
            eval: Evaluation {
                id: format!("e-{id}"),
                namespace: "default".into(),
                job_id: id.into(),
                status: "pending".into(),
                ..Default::default()
            },
        },
    };
    // Two requests batched into entry 7 (as the Raft write batcher does), then entry 8.
    state.apply_entry(7, &[register("a"), register("b")]);
    state.apply_entry(8, &[register("c")]);
    let b = sub.next().await.expect("entry 7");
    assert_eq!(b.index, 7);
    let jobs: Vec<&str> = b.events.iter().filter(|e| e.topic == "Job").map(|e| e.key.as_str()).collect();
    assert_eq!(jobs, ["a", "b"], "both requests' events in the entry's one batch");
    let b = sub.next().await.expect("entry 8");
    assert_eq!(b.index, 8);
    // A subscriber resuming from 7 gets entry 8 only.
    let mut again = state.events().subscribe(7, all()).expect("resume");
    assert_eq!(again.next().await.expect("entry 8").index, 8);
}
