//! End-to-end tests of the spine: the real `mlp` binary runs a dev cluster (Raft-backed server +
//! agent) and the CLI drives it.

mod common;

use std::time::Duration;

use common::{pid_alive, processes_under, repo_root, status, wait_for, Dev};
use serde_json::Value;

fn event_types(task_state: &Value) -> Vec<String> {
    task_state["events"].as_array().map(|es| es.iter().filter_map(|e| e["type"].as_str().map(String::from)).collect()).unwrap_or_default()
}

#[test]
fn example_batch_job_completes_and_its_logs_are_readable() {
    let dev = Dev::start();
    let train = repo_root().join("examples/train.hcl");
    let out = dev.ok(&["job", "run", train.to_str().unwrap_or_default()]);
    assert!(out.contains("Allocation"), "job run shows allocations: {out}");

    let allocs = dev.wait_allocs("train", "train to complete", Duration::from_secs(60), |a| a.len() == 1 && status(&a[0]) == "complete");
    let a = &allocs[0];
    assert!(!a["node_id"].as_str().unwrap_or("").is_empty());
    let ts = &a["task_states"]["train"];
    assert_eq!(ts["state"], "dead");
    assert_eq!(ts["exit_code"], 0);
    let events = event_types(ts);
    for e in ["received", "started", "exited"] {
        assert!(events.contains(&e.to_string()), "event {e} in {events:?}");
    }

    let id = a["id"].as_str().unwrap_or_default();
    let logs = dev.ok(&["alloc", "logs", &id[..8]]);
    assert!(logs.contains("epoch 1/5 loss=0.9000"), "logs: {logs}");
    assert!(logs.contains("epoch 5/5"), "logs: {logs}");
    assert!(logs.contains("training complete"), "logs: {logs}");
    // -f on a finished task drains and returns.
    let followed = dev.ok(&["alloc", "logs", id, "-f"]);
    assert_eq!(followed, logs);

    let job = dev.job("train");
    assert_eq!(job["job"]["status"], "dead");
    let list = dev.json(&["job", "status", "--json"]);
    assert_eq!(list[0]["name"], "train");
    assert_eq!(list[0]["type"], "batch");
    assert_eq!(list[0]["status"], "dead");
}

#[test]
fn failing_service_restarts_per_policy_then_fails() {
    if !common::require_exec() {
        return;
    }
    let dev = Dev::start();
    let file = dev.write_job(
        "crash.hcl",
        r#"job "crash" {
  type = "service"
  group "web" {
    restart {
      attempts = 2
      interval = "1m"
      delay    = "100ms"
      mode     = "fail"
    }
    task "server" {
      driver = "exec"
      config {
        command = "/bin/sh"
        args    = ["-c", "echo crashing; echo oops >&2; exit 3"]
      }
    }
  }
}
"#,
    );
    dev.cli(&["job", "run", file.to_str().unwrap_or_default()]);
    let allocs = dev.wait_allocs("crash", "crash to fail", Duration::from_secs(60), |a| a.len() == 1 && status(&a[0]) == "failed");
    let ts = &allocs[0]["task_states"]["server"];
    assert_eq!(ts["restarts"], 2, "{ts}");
    assert_eq!(ts["failed"], true);
    assert_eq!(ts["exit_code"], 3);
    let events = event_types(ts);
    assert_eq!(events.iter().filter(|e| *e == "restarting").count(), 2, "{events:?}");
    assert!(events.contains(&"not-restarting".to_string()), "{events:?}");
    // The scheduler does not replace a failed service allocation in this version.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(dev.job("crash")["allocations"].as_array().map(|a| a.len()), Some(1));
    let id = allocs[0]["id"].as_str().unwrap_or_default();
    let err = dev.ok(&["alloc", "logs", id, "--stderr"]);
    assert_eq!(err.matches("oops").count(), 3, "three runs wrote stderr: {err:?}");
}

#[test]
fn job_stop_kills_the_whole_task_tree() {
    if !common::require_exec() {
        return;
    }
    let dev = Dev::start();
    let file = dev.write_job(
        "stubborn.hcl",
        r#"job "stubborn" {
  type = "service"
  group "g" {
    task "t" {
      driver = "exec"
      config {
        command = "/bin/sh"
        args    = ["-c", "trap '' TERM; sleep 1000 & sleep 1000 & echo ready; wait"]
      }
      kill_timeout = "1s"
    }
  }
}
"#,
    );
    dev.ok(&["job", "run", file.to_str().unwrap_or_default()]);
    let allocs = dev.wait_allocs("stubborn", "task running", Duration::from_secs(30), |a| {
        a.len() == 1 && status(&a[0]) == "running" && a[0]["task_states"]["t"]["pid"].as_u64().unwrap_or(0) > 0
    });
    let pid = allocs[0]["task_states"]["t"]["pid"].as_i64().unwrap_or(0) as i32;
    assert!(pid_alive(pid));
    let data = dev.data_dir();
    wait_for("children started", Duration::from_secs(10), || (processes_under(&data).len() >= 3).then_some(()));

    let out = dev.ok(&["job", "stop", "stubborn"]);
    assert!(out.contains("stopped"), "{out}");
    let allocs = dev.wait_allocs("stubborn", "alloc stopped", Duration::from_secs(30), |a| status(&a[0]) == "complete");
    assert_eq!(allocs[0]["desired_status"], "stop");
    let events = event_types(&allocs[0]["task_states"]["t"]);
    assert!(events.contains(&"killing".to_string()) && events.contains(&"killed".to_string()), "{events:?}");
    wait_for("no task process left", Duration::from_secs(10), || (!pid_alive(pid) && processes_under(&data).is_empty()).then_some(()));
    assert_eq!(dev.job("stubborn")["job"]["status"], "dead");
}

#[test]
fn max_run_duration_kills_an_overrunning_batch_task() {
    let dev = Dev::start();
    let file = dev.write_job(
        "slow.hcl",
        r#"job "slow" {
  type = "batch"
  group "g" {
    task "t" {
      driver = "raw_exec"
      config {
        command = "/bin/sleep"
        args    = ["100"]
      }
      kill_timeout     = "1s"
      max_run_duration = "1s"
    }
  }
}
"#,
    );
    dev.ok(&["job", "run", file.to_str().unwrap_or_default()]);
    let allocs = dev.wait_allocs("slow", "task killed for overrun", Duration::from_secs(30), |a| a.len() == 1 && status(&a[0]) == "failed");
    let ts = &allocs[0]["task_states"]["t"];
    assert_eq!(ts["failed"], true);
    assert!(event_types(ts).contains(&"max-run-duration-exceeded".to_string()), "{ts}");
}

#[test]
fn kill9_and_restart_keeps_every_acknowledged_job_allocation_and_node() {
    if !common::require_exec() {
        return;
    }
    let mut dev = Dev::start();
    // The agent registers right after `mlp dev` announces itself: under load, not yet.
    let node_before = wait_for("the node to register", Duration::from_secs(30), || {
        let v = dev.json(&["node", "status", "--json"]);
        (v.as_array().map(|a| a.len()) == Some(1)).then_some(v)
    });
    let mut acked = Vec::new();
    for i in 0..20 {
        let name = format!("job{i:02}");
        let file = dev.write_job(
            &format!("{name}.hcl"),
            &format!(
                r#"job "{name}" {{
  type = "batch"
  group "g" {{
    task "t" {{
      driver = "exec"
      config {{
        command = "/bin/true"
      }}
      resources {{
        cpu    = 10
        memory = 10
      }}
    }}
  }}
}}
"#
            ),
        );
        let v = dev.json(&["job", "run", "--json", file.to_str().unwrap_or_default()]);
        assert!(v["eval_id"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
        acked.push(name);
    }
    // Let at least one job get its allocation, then crash the whole process.
    dev.wait_allocs("job00", "job00 placed", Duration::from_secs(30), |a| !a.is_empty());
    let allocs_before: Vec<String> = {
        let v = dev.json(&["job", "status", "job00", "--json"]);
        v["allocations"].as_array().map(|a| a.iter().filter_map(|x| x["id"].as_str().map(String::from)).collect()).unwrap_or_default()
    };
    dev.kill9();
    dev.spawn();

    let jobs = dev.json(&["job", "status", "--json"]);
    let names: Vec<&str> = jobs.as_array().map(|a| a.iter().filter_map(|j| j["name"].as_str()).collect()).unwrap_or_default();
    for n in &acked {
        assert!(names.contains(&n.as_str()), "job {n} lost after kill -9; have {names:?}");
    }
    let v = dev.json(&["job", "status", "job00", "--json"]);
    let allocs_after: Vec<String> =
        v["allocations"].as_array().map(|a| a.iter().filter_map(|x| x["id"].as_str().map(String::from)).collect()).unwrap_or_default();
    for id in &allocs_before {
        assert!(allocs_after.contains(id), "allocation {id} lost after kill -9");
    }
    let node_after = dev.json(&["node", "status", "--json"]);
    assert_eq!(node_after[0]["id"], node_before[0]["id"], "the node keeps its id");
    // And the cluster still works: every job completes.
    for n in &acked {
        dev.wait_allocs(n, "job to complete after restart", Duration::from_secs(60), |a| a.len() == 1 && status(&a[0]) == "complete");
    }
}

#[test]
fn job_plan_shows_placements_and_changes_nothing() {
    if !common::require_exec() {
        return;
    }
    let dev = Dev::start();
    let train = repo_root().join("examples/train.hcl");
    let out = dev.ok(&["job", "plan", train.to_str().unwrap_or_default()]);
    assert!(out.contains("+ new job"), "{out}");
    assert!(out.contains("place train.trainer[0]"), "{out}");
    let jobs = dev.json(&["job", "status", "--json"]);
    assert_eq!(jobs.as_array().map(|a| a.len()), Some(0), "plan registered nothing");

    let huge = dev.write_job(
        "huge.hcl",
        r#"job "huge" {
  group "g" {
    task "t" {
      driver = "exec"
      config { command = "/bin/true" }
      resources { memory = 100000000 }
    }
  }
}
"#,
    );
    let out = dev.cli(&["job", "plan", huge.to_str().unwrap_or_default()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("cannot be placed"), "{text}");
    assert!(text.contains("memory"), "the exhausted dimension is named: {text}");
}

#[test]
fn unplaceable_job_waits_blocked_and_says_why() {
    if !common::require_exec() {
        return;
    }
    let dev = Dev::start();
    let file = dev.write_job(
        "big.hcl",
        r#"job "big" {
  group "g" {
    task "t" {
      driver = "exec"
      config { command = "/bin/true" }
      resources { memory = 100000000 }
    }
  }
}
"#,
    );
    let out = dev.cli(&["job", "run", file.to_str().unwrap_or_default()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("could not be placed") && text.contains("memory"), "{text}");
    let v = dev.job("big");
    let evals = v["evaluations"].as_array().cloned().unwrap_or_default();
    assert!(evals.iter().any(|e| e["status"] == "blocked"), "a blocked evaluation waits: {evals:?}");
}

#[test]
fn tasks_outlive_a_killed_agent_and_are_reattached_not_duplicated() {
    let mut dev = Dev::start();
    let serve = repo_root().join("examples/serve.hcl");
    dev.ok(&["job", "run", serve.to_str().unwrap_or_default()]);
    let pids = |allocs: &[Value]| -> Vec<i64> {
        allocs.iter().filter_map(|a| a["task_states"]["server"]["pid"].as_i64()).filter(|p| *p > 0).collect()
    };
    let before = dev.wait_allocs("serve", "two running", Duration::from_secs(30), |a| {
        a.len() == 2 && a.iter().all(|x| status(x) == "running") && pids(a).len() == 2
    });
    let old = pids(&before);
    dev.kill9();
    // The tasks outlive the crashed agent...
    assert!(old.iter().all(|p| pid_alive(*p as i32)));
    dev.spawn();
    // ...and the new agent reattaches to them: same processes, not restarted, no copies.
    let after = dev.wait_allocs("serve", "two running with the same pids", Duration::from_secs(30), |a| {
        let mut p = pids(a);
        p.sort();
        let mut o = old.clone();
        o.sort();
        a.len() == 2 && a.iter().all(|x| status(x) == "running") && p == o
    });
    let ids_before: Vec<&str> = before.iter().filter_map(|a| a["id"].as_str()).collect();
    for a in &after {
        assert!(ids_before.contains(&a["id"].as_str().unwrap_or_default()), "same allocations, not replacements");
        let ts = &a["task_states"]["server"];
        assert_eq!(ts["restarts"], 0, "{ts}");
        assert_eq!(event_types(ts).iter().filter(|t| *t == "started").count(), 1, "{ts}");
    }
    // Every process is one of the two tasks' (their process groups) or one of their two
    // supervisors.
    let mut supervisors = 0;
    for p in processes_under(&dev.data_dir()) {
        let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("__mlp-supervise") {
            // Named for `ps` and `top`, not `exe` (the zygote's own binary path).
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            assert_eq!(comm.trim(), "mlp-supervisor", "process {p}'s name");
            supervisors += 1;
            continue;
        }
        // (A process that ended meanwhile has no group any more.)
        let Some(pgid) = common::pgid_of(p) else { continue };
        assert!(old.contains(&i64::from(pgid)), "process {p} (group {pgid}) belongs to neither task {old:?}");
    }
    assert_eq!(supervisors, 2);
    dev.ok(&["job", "stop", "serve"]);
}
