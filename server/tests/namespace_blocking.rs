//! Blocking queries on namespace reads (issue 11 §1: every list and get read blocks): gRPC's
//! `min_index` / `wait_ms` and HTTP's `?index=&wait=` on `/v1/namespaces` and
//! `/v1/namespace/NAME`, on a real in-process server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use mlp_proto::v1::*;
use mlp_server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;

async fn apply(server: &Server, name: &str, description: &str) -> u64 {
    let ns = Namespace { name: name.into(), description: description.into(), ..Default::default() };
    server.api.namespace_apply(NamespaceApplyRequest { namespace: Some(ns) }).await.expect("apply").index
}

fn job(name: &str, namespace: &str) -> Job {
    Job {
        id: name.into(),
        name: name.into(),
        namespace: namespace.into(),
        r#type: "batch".into(),
        groups: vec![TaskGroup {
            name: "g".into(),
            count: Some(1),
            tasks: vec![Task {
                name: "t".into(),
                driver: "exec".into(),
                config: Some(TaskConfig { command: "/bin/true".into(), ..Default::default() }),
                resources: Some(Resources { cpu_mhz: 100, memory_mib: 10, ..Default::default() }),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Waits (bounded) for a spawned read; panics if it is still blocked after `limit`.
async fn answer<T>(h: tokio::task::JoinHandle<T>, limit: Duration, what: &str) -> T {
    tokio::time::timeout(limit, h).await.unwrap_or_else(|_| panic!("{what}: still blocked after {limit:?}")).expect("task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_list_blocks_until_a_namespace_changes_or_the_wait_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = common::start(dir.path()).await;
    apply(&server, "team-a", "").await;
    let index = server.api.namespace_list(NamespaceListRequest::default()).await.expect("list").index;

    // Nothing changes: the read waits out its wait and answers with the same index.
    let t0 = Instant::now();
    let r = server.api.namespace_list(NamespaceListRequest { min_index: index, wait_ms: 300, ..Default::default() }).await.expect("list");
    assert!(t0.elapsed() >= Duration::from_millis(290), "answered after {:?}", t0.elapsed());
    assert_eq!(r.index, index);

    // A job registration is no namespace change: the list keeps waiting.
    let api = server.api.clone();
    let blocked = tokio::spawn(async move {
        let t0 = Instant::now();
        let r = api.namespace_list(NamespaceListRequest { min_index: index, wait_ms: 30_000, ..Default::default() }).await;
        (r, t0.elapsed())
    });
    server.api.register_job(Some(job("unrelated", "team-a"))).await.expect("register");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!blocked.is_finished(), "a job registration woke a namespace list");

    // A new namespace wakes it, and the answer carries it and the newer index.
    let created = apply(&server, "team-b", "").await;
    let (r, took) = answer(blocked, Duration::from_secs(10), "the blocked list").await;
    let r = r.expect("list");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(r.index >= created && r.index > index, "index {} after the apply at {created}", r.index);
    let names: Vec<&str> = r.namespaces.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["default", "team-a", "team-b"]);

    // A deletion wakes it too.
    let index = r.index;
    let api = server.api.clone();
    let blocked =
        tokio::spawn(
            async move { api.namespace_list(NamespaceListRequest { min_index: index, wait_ms: 30_000, ..Default::default() }).await },
        );
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.api.namespace_delete(NamespaceDeleteRequest { name: "team-b".into() }).await.expect("delete");
    let r = answer(blocked, Duration::from_secs(10), "the list blocked over a delete").await.expect("list");
    assert!(r.index > index && !r.namespaces.iter().any(|n| n.name == "team-b"), "{r:?}");

    // A wait past the bound is refused, as on the other reads.
    let e = server.api.namespace_list(NamespaceListRequest { min_index: 1, wait_ms: 11 * 60_000, ..Default::default() }).await;
    assert!(e.expect_err("refused").to_string().contains("at most"));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_get_wakes_on_its_namespace_and_on_its_jobs_not_on_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = common::start(dir.path()).await;
    apply(&server, "team-a", "first").await;
    let get = |min_index: u64, wait_ms: u64| {
        let api = server.api.clone();
        tokio::spawn(async move {
            api.namespace_get(NamespaceGetRequest { name: "team-a".into(), min_index, wait_ms, ..Default::default() }).await
        })
    };
    let index = answer(get(0, 0), Duration::from_secs(10), "a plain get").await.expect("get").index;

    // Another namespace's change does not wake it; a job registered into it does (its usage).
    let blocked = get(index, 30_000);
    apply(&server, "team-b", "").await;
    server.api.register_job(Some(job("elsewhere", "team-b"))).await.expect("register");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!blocked.is_finished(), "another namespace's change woke the get");
    server.api.register_job(Some(job("mine", "team-a"))).await.expect("register");
    let r = answer(blocked, Duration::from_secs(10), "the get blocked over a job").await.expect("get");
    assert!(r.index > index);
    assert_eq!(r.usage.expect("usage").jobs, 1);

    // Let the registration's evaluation settle (it blocks: no nodes), then the namespace's own
    // change wakes it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let index = answer(get(0, 0), Duration::from_secs(10), "a plain get").await.expect("get").index;
    let blocked = get(index, 30_000);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let changed = apply(&server, "team-a", "second").await;
    let r = answer(blocked, Duration::from_secs(10), "the get blocked over an apply").await.expect("get");
    assert!(r.index >= changed);
    assert_eq!(r.namespace.expect("namespace").description, "second");

    // Nothing changes: it times out with the same index.
    let t0 = Instant::now();
    let r = answer(get(r.index, 300), Duration::from_secs(10), "a get with a short wait").await.expect("get");
    assert!(t0.elapsed() >= Duration::from_millis(290), "answered after {:?}", t0.elapsed());
    assert!(r.index >= changed);
    server.shutdown().await;
}

/// A plain HTTP/1.1 GET to the server's HTTP API: (status, the `X-Mlp-Index` header, body).
async fn http_get(server: &Server, path: &str) -> (u16, u64, String) {
    let mut s = tokio::net::TcpStream::connect(server.http_addr()).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: mlp\r\nConnection: close\r\n\r\n").as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await.expect("an answer within 30 s").expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let index = text
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-mlp-index:").map(|v| v.trim().to_string()))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (status, index, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_namespace_reads_take_index_and_wait() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = std::sync::Arc::new(common::start(dir.path()).await);
    apply(&server, "team-a", "").await;
    let (status, index, text) = http_get(&server, "/v1/namespaces").await;
    assert_eq!(status, 200, "{text}");
    assert!(index > 0, "{text}");

    let t0 = Instant::now();
    let (status, same, text) = http_get(&server, &format!("/v1/namespaces?index={index}&wait=300ms")).await;
    assert_eq!((status, same), (200, index), "{text}");
    assert!(t0.elapsed() >= Duration::from_millis(290), "answered after {:?}", t0.elapsed());

    let s = server.clone();
    let blocked = tokio::spawn(async move { http_get(&s, &format!("/v1/namespace/team-a?index={index}&wait=30s")).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!blocked.is_finished(), "the blocking get answered before any change");
    apply(&server, "team-a", "changed").await;
    let (status, newer, text) = answer(blocked, Duration::from_secs(10), "the blocked HTTP get").await;
    assert_eq!(status, 200, "{text}");
    assert!(newer > index && text.contains("changed"), "{text}");

    let (status, _, text) = http_get(&server, "/v1/namespaces?index=1&wait=forever").await;
    assert_eq!(status, 400, "{text}");
    let (status, _, text) = http_get(&server, "/v1/namespace/team-a?index=1&wait=11m").await;
    assert_eq!(status, 400, "{text}");
}
