//! One bad evaluation never stops a server: a job that makes the scheduler panic (the
//! `fault-injection` feature, on in test builds) gets a failed evaluation that says why, and a
//! `Plan` of it fails alone; the leader's workers go on scheduling other jobs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use mlp_proto::consts::eval_status;
use mlp_proto::v1::*;
use mlp_server::api::ApiError;
use mlp_server::scheduler::FAULT_INJECTION_PANIC;

mod common;

fn job(name: &str, poison: bool) -> Job {
    Job {
        name: name.into(),
        r#type: "batch".into(),
        meta: if poison { [(FAULT_INJECTION_PANIC.to_string(), "1".to_string())].into() } else { Default::default() },
        groups: vec![TaskGroup {
            name: "g".into(),
            count: Some(0),
            tasks: vec![Task {
                name: "t".into(),
                driver: "exec".into(),
                config: Some(TaskConfig { command: "/bin/true".into(), args: vec![], ..Default::default() }),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn eval_status_of(server: &mlp_server::Server, eval_id: &str) -> Evaluation {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(e) = server.api.state.read().evals.get(eval_id).cloned() {
            if e.status != eval_status::PENDING {
                return e;
            }
        }
        assert!(Instant::now() < deadline, "evaluation {eval_id} still pending after 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_panic_fails_its_evaluation_and_the_server_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = common::start(dir.path()).await;

    match server.api.plan_job(Some(job("poison", true))).await {
        Err(ApiError::Internal(msg)) => assert!(msg.contains("the scheduler failed on this job"), "{msg}"),
        other => panic!("want the plan to fail alone, got {other:?}"),
    }

    let bad = server.api.register_job(Some(job("poison", true))).await.expect("the registration itself is valid");
    let e = eval_status_of(&server, &bad.eval_id).await;
    assert_eq!(e.status, eval_status::FAILED, "{e:?}");
    assert!(e.status_description.contains("the scheduler failed on this evaluation"), "{}", e.status_description);

    // The workers are still there: the next jobs are scheduled as usual.
    for i in 0..3 {
        let ok = server.api.register_job(Some(job(&format!("fine-{i}"), false))).await.expect("register");
        assert_eq!(eval_status_of(&server, &ok.eval_id).await.status, eval_status::COMPLETE);
    }
    server.shutdown().await;
}
