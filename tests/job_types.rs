//! Job types (issue 16 §2) end to end against real binaries: parameterized jobs dispatched with
//! a payload and meta (and refused when the meta or payload do not fit), periodic jobs launched
//! on time and forced, periodic launches across a kill -9 of the Raft leader (multi-host
//! harness) with no slot launched twice and none lost, and system / sysbatch jobs following
//! agents that join, die and drain (multi-host harness).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod multihost;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{wait_for, Dev};

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A parameterized batch job whose task prints its payload and meta.
const TRAIN: &str = r#"
job "train" {
  type = "batch"
  meta {
    team = "ml"
  }
  parameterized {
    payload       = "required"
    meta_required = ["dataset"]
    meta_optional = ["lr"]
  }
  group "g" {
    meta {
      lr = "0.01"
    }
    task "t" {
      driver = "raw_exec"
      config {
        command = "/bin/sh"
        args    = ["-c", "echo payload=$(cat $MLP_TASK_DIR/payload) meta=$MLP_META_dataset,$MLP_META_lr,$MLP_META_team"]
      }
      resources {
        cpu    = 10
        memory = 16
      }
    }
  }
}
"#;

/// Parameterized, payload forbidden, no meta.
const NOLOAD: &str = r#"
job "noload" {
  type = "batch"
  parameterized {
    payload = "forbidden"
  }
  group "g" {
    task "t" {
      driver = "raw_exec"
      config {
        command = "/bin/true"
      }
    }
  }
}
"#;

fn periodic_job(name: &str, cron: &str) -> String {
    format!(
        r#"
job "{name}" {{
  type = "batch"
  periodic {{
    crons     = ["{cron}"]
    time_zone = "Europe/Berlin"
  }}
  group "g" {{
    task "t" {{
      driver = "raw_exec"
      config {{
        command = "/bin/true"
      }}
      resources {{
        cpu    = 10
        memory = 8
      }}
    }}
  }}
}}
"#
    )
}

/// The children's ids of `parent` (from `mlp job status --json`, the whole job list).
fn children(dev: &Dev, parent: &str) -> Vec<String> {
    let jobs = dev.json(&["job", "status", "--json"]);
    let prefix = format!("{parent}/");
    let mut ids: Vec<String> = jobs
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|j| j["id"].as_str().filter(|id| id.starts_with(&prefix)).map(String::from))
        .collect();
    ids.sort();
    ids
}

/// The slot (unix seconds) a periodic child's id names.
fn slot_of(id: &str) -> u64 {
    id.rsplit("periodic-").next().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not a periodic child id: {id}"))
}

fn fails_with(dev: &Dev, args: &[&str], needle: &str) {
    let out = dev.cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mlp {args:?} succeeded; expected an error with {needle:?}");
    assert!(stderr.contains(needle), "mlp {args:?}: expected {needle:?} in:\n{stderr}");
}

#[test]
fn dispatch_with_payload_and_meta_and_its_errors() {
    let dev = Dev::start();
    let train = dev.write_job("train.hcl", TRAIN);
    let out = dev.ok(&["job", "run", train.to_str().unwrap()]);
    assert!(out.contains("runs only when dispatched"), "{out}");
    let payload = dev.write_job("payload.txt", "hello-payload");

    let v = dev.json(&["job", "dispatch", "--json", "--meta", "dataset=imagenet", "--meta", "lr=0.1", "train", payload.to_str().unwrap()]);
    let child = v["dispatched_job_id"].as_str().expect("a child id").to_string();
    assert!(child.starts_with("train/dispatch-"), "{child}");
    let allocs = dev.wait_allocs(&child, "the dispatched child to complete", Duration::from_secs(60), |a| {
        a.len() == 1 && common::status(&a[0]) == "complete"
    });
    let alloc = allocs[0]["id"].as_str().unwrap().to_string();
    let logs = dev.ok(&["alloc", "logs", &alloc]);
    // The task's meta: the dispatch's over the group's over the job's.
    assert!(logs.contains("payload=hello-payload meta=imagenet,0.1,ml"), "task output: {logs:?}");
    let job = dev.job(&child);
    assert_eq!(job["job"]["parent_id"], "train");
    assert!(job["job"].get("parameterized").is_none(), "a child is not parameterized: {}", job["job"]);

    // The parent places nothing and lists its child.
    assert_eq!(dev.job("train")["allocations"].as_array().map(Vec::len), Some(0));
    assert_eq!(dev.job("train")["job"]["status"], "running");
    let status = dev.ok(&["job", "status", "train"]);
    assert!(status.contains("Children") && status.contains(&child), "{status}");

    // Errors, each naming what is wrong.
    let p = payload.to_str().unwrap();
    fails_with(&dev, &["job", "dispatch", "--meta", "lr=1", "train", p], "missing required meta key(s) \"dataset\"");
    fails_with(&dev, &["job", "dispatch", "--meta", "dataset=a", "--meta", "epochs=3", "train", p], "\"epochs\" not allowed");
    fails_with(&dev, &["job", "dispatch", "--meta", "dataset=a", "train"], "requires a payload");
    fails_with(&dev, &["job", "dispatch", "--meta", "nonsense", "train", p], "write KEY=VALUE");
    let noload = dev.write_job("noload.hcl", NOLOAD);
    dev.ok(&["job", "run", noload.to_str().unwrap()]);
    fails_with(&dev, &["job", "dispatch", "noload", p], "forbids a payload");
    fails_with(&dev, &["job", "dispatch", "nope"], "not found");
    let plain = NOLOAD.replace("job \"noload\"", "job \"plain\"").replace("parameterized {\n    payload = \"forbidden\"\n  }\n", "");
    assert!(!plain.contains("parameterized"), "{plain}");
    let plain = dev.write_job("plain.hcl", &plain);
    dev.ok(&["job", "run", "--detach", plain.to_str().unwrap()]);
    fails_with(&dev, &["job", "dispatch", "plain"], "is not parameterized");
    let big = dev.write_job("big.bin", &"x".repeat(16 * 1024 + 1));
    fails_with(&dev, &["job", "dispatch", "--meta", "dataset=a", "train", big.to_str().unwrap()], "larger than 16384 bytes");
    assert_eq!(children(&dev, "train"), vec![child.clone()], "failed dispatches made no child");

    // Through the HTTP API (payload as text), and its errors.
    let (code, body) = dev.http("POST", "/v1/job/train/dispatch", Some("application/json"), br#"{"meta":{"dataset":"web"},"payload":"p"}"#);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("train/dispatch-"), "{body}");
    let (code, body) = dev.http("POST", "/v1/job/train/dispatch", Some("application/json"), br#"{"meta":{},"payload":"p"}"#);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("missing required meta"), "{body}");
    // A child's id holds a '/': the HTTP API takes it percent-encoded.
    let (code, body) = dev.http("GET", &format!("/v1/job/{}", child.replace('/', "%2F")), None, b"");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"parent_id\":\"train\""), "{body}");
    let (code, body) = dev.http("GET", "/v1/job/train/children", None, b"");
    assert_eq!(code, 200, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["children"].as_array().map(Vec::len), Some(2), "{body}");
}

#[test]
fn periodic_launches_every_slot_on_time_and_force_launches_now() {
    let dev = Dev::start();
    let file = dev.write_job("tick.hcl", &periodic_job("tick", "*/2 * * * * *"));
    let registered = now_ms();
    let out = dev.ok(&["job", "run", file.to_str().unwrap()]);
    assert!(out.contains("next launch"), "{out}");
    let ids = wait_for("four periodic launches", Duration::from_secs(30), || {
        let ids = children(&dev, "tick");
        (ids.len() >= 4).then_some(ids)
    });
    let slots: Vec<u64> = ids.iter().map(|id| slot_of(id)).collect();
    assert!(slots[0] * 1000 > registered, "no launch of a slot before the registration: {slots:?}");
    for w in slots.windows(2) {
        assert_eq!(w[1] - w[0], 2, "every 2 s slot launched once, none missed: {slots:?}");
    }
    // How late each launch was: the child's submit time against its slot.
    let mut late = Vec::new();
    for id in &ids {
        let submit = dev.job(id)["job"]["submit_time_ms"].as_u64().unwrap();
        late.push(submit.saturating_sub(slot_of(id) * 1000));
    }
    eprintln!("periodic launch lateness (ms) per slot: {late:?}");
    assert!(late.iter().all(|&l| l < 2_000), "launches more than 2 s late: {late:?}");

    let before = children(&dev, "tick").len();
    let v = dev.json(&["job", "periodic", "force", "--json", "tick"]);
    let forced = v["child_job_id"].as_str().expect("a child id").to_string();
    assert!(forced.starts_with("tick/periodic-"), "{forced}");
    assert!(children(&dev, "tick").len() > before);
    let status = dev.ok(&["job", "status", "tick"]);
    assert!(status.contains("Next launch") && status.contains("Europe/Berlin"), "{status}");
    fails_with(&dev, &["job", "periodic", "force", "nope"], "not found");
    dev.ok(&["job", "stop", "--detach", "tick"]);
    let after_stop = children(&dev, "tick").len();
    std::thread::sleep(Duration::from_millis(4_500));
    assert_eq!(children(&dev, "tick").len(), after_stop, "a stopped periodic job launches nothing");
}

/// Periodic launches across a kill -9 of the leader (3 servers): the slot due while there is no
/// leader is launched by the next one, and no slot is launched twice.
#[test]
fn periodic_launches_across_a_leader_kill_without_duplicate_or_miss() {
    if !multihost::require_netns(&[]) {
        return;
    }
    use multihost::{wait_leader, Net, GRPC_PORT};
    let mut net = Net::new();
    for i in 0..3 {
        net.add_host(&format!("server{i}"));
    }
    let client = net.add_host("client");
    let procs = multihost::start_servers(&mut net, 3);
    let addrs: Vec<String> = (0..3).map(|i| format!("{}:{GRPC_PORT}", net.hosts[i].ip)).collect();
    let all = addrs.join(",");
    let leader = wait_leader(&net, client, &addrs, 3, Duration::from_secs(30));
    let c = net.client(client);
    let file = c.dir.join("nightly.hcl");
    std::fs::write(&file, periodic_job("nightly", "*/5 * * * * *")).unwrap();
    let out = c.mlp(&["job", "run", "--address", &all, file.to_str().unwrap()], Duration::from_secs(30)).expect("job run answers");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let kids = |addr: &str| -> Vec<u64> {
        let mut s: Vec<u64> =
            c.job_ids(addr, false).unwrap_or_default().iter().filter(|id| id.starts_with("nightly/")).map(|id| slot_of(id)).collect();
        s.sort();
        s
    };
    wait_for("a first launch", Duration::from_secs(30), || (!kids(&all).is_empty()).then_some(()));
    // Kill the leader 300 ms before a slot, so that the slot falls in the election.
    let next_slot = (now_ms() / 5000 + 1) * 5000;
    let wait = next_slot.saturating_sub(now_ms()).saturating_sub(300);
    std::thread::sleep(Duration::from_millis(wait));
    let idx = procs[addrs.iter().position(|a| *a == leader).unwrap()];
    net.procs[idx].kill9();
    let survivors: Vec<String> = addrs.iter().filter(|a| **a != leader).cloned().collect();
    let survivors_list = survivors.join(",");
    wait_for("the slot due during the election and two after it", Duration::from_secs(60), || {
        let s = kids(&survivors_list);
        (s.contains(&(next_slot / 1000)) && s.last().is_some_and(|&l| l >= next_slot / 1000 + 10)).then_some(())
    });
    let slots = kids(&survivors_list);
    let child = format!("nightly/periodic-{}", next_slot / 1000);
    let out =
        c.mlp(&["job", "status", &child, "--json", "--address", &survivors_list], Duration::from_secs(20)).expect("job status answers");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let late = v["job"]["submit_time_ms"].as_u64().unwrap_or(0).saturating_sub(next_slot);
    eprintln!("slots launched: {slots:?}; leader killed 300 ms before {}, launched {late} ms late by the new leader", next_slot / 1000);
    let mut dedup = slots.clone();
    dedup.dedup();
    assert_eq!(dedup, slots, "a slot launched twice: {slots:?}");
    for w in slots.windows(2) {
        assert_eq!(w[1] - w[0], 5, "every 5 s slot launched once, none lost in the failover: {slots:?}");
    }
}

fn per_node_job(name: &str, kind: &str, command: &str, args: &str) -> String {
    format!(
        r#"
job "{name}" {{
  type = "{kind}"
  group "g" {{
    restart {{
      attempts = 0
      mode     = "fail"
    }}
    task "t" {{
      driver = "raw_exec"
      config {{
        command = "{command}"
        args    = [{args}]
      }}
      resources {{
        cpu    = 10
        memory = 8
      }}
    }}
  }}
}}
"#
    )
}

/// A system job runs on every agent's node, follows a node that joins and one that dies, stays
/// on a node drained with --ignore-system and leaves one drained without it; a sysbatch job
/// completes exactly once on every node, including one that joins later.
#[test]
fn system_follows_nodes_joining_and_leaving_and_sysbatch_runs_once_per_node() {
    if !multihost::require_netns(&[]) {
        return;
    }
    use multihost::{start_agent, start_single_server, wait_ready_nodes, Net};
    let mut net = Net::new();
    let server = net.add_host("server");
    let agents: Vec<usize> = (0..3).map(|i| net.add_host(&format!("agent-{i}"))).collect();
    let client = net.add_host("client");
    let addr = start_single_server(&mut net, server, "2");
    let mut procs = Vec::new();
    for (i, h) in agents.iter().take(2).enumerate() {
        procs.push(start_agent(&mut net, *h, &addr, i));
    }
    let c = net.client(client);
    wait_ready_nodes(&c, &addr, 2, Duration::from_secs(30));
    let run = |name: &str, spec: String| {
        let file = c.dir.join(format!("{name}.hcl"));
        std::fs::write(&file, spec).unwrap();
        let out = c.mlp(&["job", "run", "--detach", "--address", &addr, file.to_str().unwrap()], Duration::from_secs(20)).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    run("sys", per_node_job("sys", "system", "/bin/sleep", "\"600\""));
    run("sb", per_node_job("sb", "sysbatch", "/bin/true", ""));
    // (node, status) of every allocation of a job.
    let placed = |job: &str| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = c.allocs(&addr, job).unwrap_or_default().into_iter().map(|a| (a.1, a.2)).collect();
        v.sort();
        v
    };
    let nodes_with =
        |job: &str, status: &str| -> Vec<String> { placed(job).into_iter().filter(|(_, s)| s == status).map(|(n, _)| n).collect() };
    let distinct = |v: &[String]| v.windows(2).all(|w| w[0] != w[1]);
    let node_id =
        |name: &str| multihost::nodes(&c, &addr).unwrap_or_default().into_iter().find(|n| n.1 == name).map(|n| n.0).unwrap_or_default();
    wait_for("the system job running on both nodes", Duration::from_secs(30), || {
        let r = nodes_with("sys", "running");
        (r.len() == 2 && distinct(&r)).then_some(())
    });
    wait_for("the sysbatch job complete on both nodes", Duration::from_secs(30), || {
        (nodes_with("sb", "complete").len() == 2).then_some(())
    });

    // A node joins: both jobs reach it, the sysbatch once.
    procs.push(start_agent(&mut net, agents[2], &addr, 2));
    wait_ready_nodes(&c, &addr, 3, Duration::from_secs(30));
    wait_for("the system job on the new node", Duration::from_secs(30), || {
        let r = nodes_with("sys", "running");
        (r.len() == 3 && distinct(&r)).then_some(())
    });
    wait_for("the sysbatch job complete on the new node", Duration::from_secs(30), || {
        let done = nodes_with("sb", "complete");
        (done.len() == 3 && distinct(&done)).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let sb = placed("sb");
    assert_eq!(sb.len(), 3, "sysbatch ran exactly once per node: {sb:?}");

    // A node dies: its system allocation is lost and not replaced on another node.
    let dead = node_id("agent-1");
    net.procs[procs[1]].kill9();
    wait_for("the dead node's system allocation lost", Duration::from_secs(30), || {
        placed("sys").iter().any(|(n, s)| *n == dead && s == "lost").then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let r = nodes_with("sys", "running");
    assert!(r.len() == 2 && distinct(&r) && !r.contains(&dead), "one per live node: {:?}", placed("sys"));

    // Drained with --ignore-system: the system allocation stays.
    let keep = node_id("agent-0");
    let out = c.mlp(&["node", "drain", "--ignore-system", "--address", &addr, &keep], Duration::from_secs(60)).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_secs(2));
    assert!(nodes_with("sys", "running").contains(&keep), "--ignore-system keeps it: {:?}", placed("sys"));
    // Drained without it: the system allocation leaves the node.
    let gone = node_id("agent-2");
    let out = c.mlp(&["node", "drain", "--address", &addr, &gone], Duration::from_secs(60)).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("the drained node's system allocation stopped", Duration::from_secs(30), || {
        (!nodes_with("sys", "running").contains(&gone)).then_some(())
    });
    assert_eq!(nodes_with("sys", "running"), vec![keep], "{:?}", placed("sys"));
}
