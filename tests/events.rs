//! The event stream and blocking queries, end to end against a real `mlp dev`: `mlp job run
//! --wait` exits with the task's exit code, a gRPC subscriber that reconnects from its last
//! index misses and repeats nothing, the HTTP stream and blocking reads wake on a change, and an
//! index older than the server's buffer is refused rather than silently skipped.

mod common;

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Dev;
use mlp_proto::v1::{event_service_client::EventServiceClient, EventBatch, EventTopic, EventsRequest};

/// A service job that places nothing (`count = 0`): registering it commits a job and an
/// evaluation, nothing runs.
fn empty_job(name: &str) -> String {
    format!(
        "job \"{name}\" {{\n  type = \"service\"\n  group \"g\" {{\n    count = 0\n    task \"t\" {{\n      driver = \"raw_exec\"\n      config {{\n        command = \"/bin/true\"\n      }}\n    }}\n  }}\n}}\n"
    )
}

fn register(dev: &Dev, name: &str) -> u64 {
    let file = dev.write_job(&format!("{name}.hcl"), &empty_job(name));
    let v = dev.json(&["job", "run", "--json", file.to_str().unwrap_or_default()]);
    v["index"].as_u64().unwrap_or_else(|| panic!("registration answers an index: {v}"))
}

/// A batch `exec` job whose one task exits with `code`, never restarted.
fn exiting_job(name: &str, code: i32) -> String {
    format!(
        r#"job "{name}" {{
  type = "batch"
  group "g" {{
    restart {{
      attempts = 0
      mode = "fail"
    }}
    reschedule {{
      attempts = 0
      unlimited = false
    }}
    task "t" {{
      driver = "exec"
      config {{
        command = "/bin/sh"
        args = ["-c", "exit {code}"]
      }}
      resources {{
        cpu = 100
        memory = 32
      }}
    }}
  }}
}}
"#
    )
}

#[test]
fn job_run_wait_follows_the_job_to_its_end_and_exits_with_the_tasks_code() {
    if !common::require_exec() {
        return;
    }
    let dev = Dev::start();
    for (name, code) in [("exits-seven", 7), ("exits-zero", 0)] {
        let file = dev.write_job(&format!("{name}.hcl"), &exiting_job(name, code));
        let out = dev.cli(&["job", "run", "--wait", file.to_str().unwrap_or_default()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(code),
            "`mlp job run --wait` exits with the task's code\nstdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(&format!("finished: exit code {code}")), "{stdout}");
        // The job really is over when it returns.
        assert_eq!(dev.job(name)["job"]["status"], "dead", "{stdout}");
    }
    // Run again unchanged: nothing new is placed, and it answers the finished job's code at once.
    let file = dev.write_job("exits-seven.hcl", &exiting_job("exits-seven", 7));
    let out = dev.cli(&["job", "run", "--wait", file.to_str().unwrap_or_default()]);
    assert_eq!(out.status.code(), Some(7), "{}", String::from_utf8_lossy(&out.stdout));
}

async fn next_batch(stream: &mut tonic::Streaming<EventBatch>) -> EventBatch {
    loop {
        let b = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("an event batch within 20 s")
            .expect("the stream stays up")
            .expect("the stream does not end");
        if !b.events.is_empty() {
            return b;
        }
    }
}

fn registered(b: &EventBatch) -> Vec<String> {
    b.events.iter().filter(|e| e.r#type == "JobRegistered").map(|e| e.key.clone()).collect()
}

#[test]
fn a_grpc_subscriber_resumes_from_its_last_index_without_gaps_or_repeats() {
    let dev = Dev::start();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut client = EventServiceClient::connect(format!("http://{}", dev.grpc)).await.expect("connect");
        let req =
            |index| EventsRequest { topics: vec![EventTopic { topic: "Job".into(), key: String::new() }], namespace: String::new(), index };
        let mut stream = client.events(req(0)).await.expect("subscribe").into_inner();
        let i1 = register(&dev, "first");
        let i2 = register(&dev, "second");
        let mut seen = Vec::new();
        let mut last = 0;
        while seen.len() < 2 {
            let b = next_batch(&mut stream).await;
            assert!(b.index > last, "indexes increase: {} after {last}", b.index);
            assert!(b.events.iter().all(|e| e.topic == "Job" && e.index == b.index), "only Job events, stamped with the batch index");
            last = b.index;
            seen.extend(registered(&b));
        }
        assert_eq!(seen, ["first", "second"]);
        assert_eq!(last, i2, "the second registration's batch carries its Raft index");
        assert!(i1 < i2);
        drop(stream);

        // While disconnected, two more; then resume from the last index seen.
        register(&dev, "third");
        register(&dev, "fourth");
        let mut stream = client.events(req(last)).await.expect("resubscribe").into_inner();
        let mut resumed = Vec::new();
        while resumed.len() < 2 {
            let b = next_batch(&mut stream).await;
            assert!(b.index > last, "nothing at or before the resume index comes again: {} <= {last}", b.index);
            last = b.index;
            resumed.extend(registered(&b));
        }
        assert_eq!(resumed, ["third", "fourth"], "exactly what happened while disconnected, in order");

        // Topic keys filter: only the named job's events.
        let keyed =
            EventsRequest { topics: vec![EventTopic { topic: "Job".into(), key: "sixth".into() }], namespace: String::new(), index: last };
        let mut only = client.events(keyed).await.expect("subscribe by key").into_inner();
        register(&dev, "fifth");
        register(&dev, "sixth");
        let b = next_batch(&mut only).await;
        assert_eq!(registered(&b), ["sixth"]);

        // A bad topic is refused with the reason.
        let bad =
            EventsRequest { topics: vec![EventTopic { topic: "Jobs".into(), key: String::new() }], namespace: String::new(), index: 0 };
        let err = client.events(bad).await.expect_err("unknown topic refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("topics[0].topic"), "{}", err.message());
    });
}

/// Reads an HTTP response until `done(text)` holds or `timeout` passes; returns the text so far.
fn read_until(s: &mut TcpStream, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + timeout;
    let mut text = String::new();
    let mut buf = [0u8; 16 * 1024];
    s.set_read_timeout(Some(Duration::from_millis(200))).expect("read timeout");
    while Instant::now() < deadline && !done(&text) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    text
}

fn get(addr: &str, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect http");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("write");
    s
}

fn header_index(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-mlp-index:").map(|v| v.trim().to_string()))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("X-Mlp-Index header in {text}"))
}

#[test]
fn http_stream_and_blocking_queries_wake_on_a_change() {
    let dev = Dev::start();
    let start_index = register(&dev, "before");
    // Let the registration's evaluation finish, so nothing else is in flight below.
    std::thread::sleep(Duration::from_millis(500));

    // A plain read names its index.
    let mut s = get(&dev.http, "/v1/jobs");
    let text = read_until(&mut s, Duration::from_secs(10), |t| t.contains("\"before\""));
    let index = header_index(&text);
    assert!(index >= start_index);

    // A blocking read with nothing changing waits out its `wait`.
    let t0 = Instant::now();
    let mut s = get(&dev.http, &format!("/v1/jobs?index={index}&wait=400ms"));
    let text = read_until(&mut s, Duration::from_secs(10), |t| t.contains("\"before\"") && t.ends_with(']'));
    assert!(t0.elapsed() >= Duration::from_millis(350), "answered after {:?}: {text}", t0.elapsed());

    // Another waits for the next registration and answers with it.
    let mut blocked = get(&dev.http, &format!("/v1/jobs?index={index}&wait=30s"));
    let mut stream = get(&dev.http, &format!("/v1/event/stream?topic=Job:during&index={index}"));
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    register(&dev, "during");
    let text = read_until(&mut blocked, Duration::from_secs(20), |t| t.contains("\"during\""));
    assert!(text.contains("\"during\""), "the blocking read answered with the new job: {text}");
    assert!(t0.elapsed() < Duration::from_secs(20));
    assert!(header_index(&text) > index);

    // Up to the end of the event's line: a read can stop inside it.
    let lines = read_until(&mut stream, Duration::from_secs(20), |t| t.find("JobRegistered").is_some_and(|i| t[i..].contains('\n')));
    assert!(lines.contains("application/x-ndjson"), "{lines}");
    let line = lines.lines().find(|l| l.contains("JobRegistered")).unwrap_or_else(|| panic!("a JobRegistered line in {lines}"));
    let batch: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("one JSON batch per line ({e}): {line}"));
    assert_eq!(batch["events"][0]["key"], "during");
    assert_eq!(batch["events"][0]["job"]["name"], "during");
    assert!(!lines.contains("\"before\""), "filtered by key: {lines}");

    // Bad parameters are refused with a reason.
    let (code, body) = dev.http("GET", "/v1/event/stream?topic=Nope", None, b"");
    assert_eq!(code, 400, "{body}");
    let (code, body) = dev.http("GET", "/v1/jobs?index=1&wait=forever", None, b"");
    assert_eq!(code, 400, "{body}");
    let (code, body) = dev.http("GET", "/v1/jobs?index=1&wait=11m", None, b"");
    assert_eq!(code, 400, "{body}");
}

#[test]
fn an_index_older_than_the_buffer_is_refused_not_skipped() {
    let dev = Dev::start_with(&["--event-buffer", "4"]);
    let first = register(&dev, "a0");
    for i in 1..6 {
        register(&dev, &format!("a{i}"));
    }
    let (code, body) = dev.http("GET", &format!("/v1/event/stream?index={first}"), None, b"");
    assert_eq!(code, 410, "{body}");
    assert!(body.contains("read the state again"), "{body}");
    let out = dev.cli(&["event", "stream", "--index", &first.to_string()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no longer has the events"), "{}", String::from_utf8_lossy(&out.stderr));

    // From the current index all is well, and `mlp event stream` prints what happens.
    let now = dev.json(&["job", "status", "a5", "--json"])["index"].as_u64().expect("index");
    let mut child = std::process::Command::new(common::mlp())
        .args(["event", "stream", "--topic", "Job", "--index", &now.to_string()])
        .env("MLP_ADDR", &dev.grpc)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn mlp event stream");
    register(&dev, "later");
    let mut out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Whole lines only: a read can end inside an event's line, and the
        // assertion below checks each line is a JSON object of its own.
        let mut text = String::new();
        let mut lines = std::io::BufReader::new(&mut out);
        let mut line = String::new();
        while lines.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            text.push_str(&line);
            if line.contains("\"later\"") {
                let _ = tx.send(text);
                return;
            }
            line.clear();
        }
    });
    let got = rx.recv_timeout(Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    let text = got.expect("`mlp event stream` printed the registration");
    assert!(text.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()), "{text}");
}
