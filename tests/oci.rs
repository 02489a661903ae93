//! The `oci` driver end to end: `mlp dev` and the CLI run a job whose image (built by the test
//! from busybox-static) lives in a real registry on loopback that asks for credentials; the
//! task's output is in `mlp alloc logs`, the pull's progress in the allocation's events, and
//! the job's registry password never comes back through the API.

mod common;
#[path = "../agent/tests/oci_registry/mod.rs"]
mod oci_registry;
#[path = "prereq/mod.rs"]
mod prereq;

use std::time::Duration;

use common::Dev;
use oci_registry::{busybox_layer, Compression, Registry, TestImage};

fn job(name: &str, image: &str, password: &str) -> String {
    format!(
        r#"job "{name}" {{
  type = "batch"
  group "g" {{
    restart {{
      attempts = 0
      mode     = "fail"
    }}
    reschedule {{
      attempts  = 0
      unlimited = false
    }}
    task "main" {{
      driver = "oci"
      config {{
        image = "{image}"
        args  = ["-c", "echo hello $GREETING from $(pwd) as $(id -u); test -d /local && test -d /alloc"]
        auth {{
          username = "ci"
          password = "{password}"
        }}
      }}
      resources {{
        cpu    = 100
        memory = 64
      }}
    }}
  }}
}}
"#
    )
}

#[test]
fn oci_job_runs_from_the_cli_with_logs_pull_events_and_a_redacted_password() {
    oci_registry::require_tools();
    prereq::require(&[prereq::Need::Root, prereq::Need::Cgroups]);
    let reg = Registry::start(Some(("ci", "pull-s3cret"))).expect("the registry starts");
    let image = TestImage::new(
        vec![(busybox_layer(vec![]), Compression::Gzip)],
        serde_json::json!({"Env": ["PATH=/bin", "GREETING=from-busybox"], "Entrypoint": ["sh"], "WorkingDir": "/bin"}),
    );
    reg.push_image("team/box", "v1", &image).expect("push");
    let dev = Dev::start();

    let nodes = dev.json(&["node", "status", "--json"]);
    assert!(nodes[0]["drivers"].as_array().is_some_and(|d| d.iter().any(|d| d == "oci")), "{}", nodes[0]);

    let file = dev.write_job("box.hcl", &job("box", &format!("{}/team/box:v1", reg.addr), "pull-s3cret"));
    let out = dev.cli(&["job", "run", "--wait", file.to_str().unwrap_or_default()]);
    // `mlp job run` shows the pull while it waits.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("task \"main\": Pulling image") && stdout.contains("Layer 1/1"), "{stdout}");
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}\ndev log: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        common::tail(&dev.log(), 3000)
    );
    let job = dev.job("box");
    let allocs = job["allocations"].as_array().cloned().unwrap_or_default();
    let id = allocs[0]["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(dev.ok(&["alloc", "logs", &id]), "hello from-busybox from /bin as 65534\n");

    // What the user waited on is in the allocation's events.
    let status = dev.ok(&["alloc", "status", &id]);
    assert!(status.contains("Pulling image") && status.contains("Layer 1/1"), "{status}");

    // The password went to the agent, never back out through the API.
    let text = job.to_string();
    assert!(!text.contains("pull-s3cret") && text.contains("<redacted>"), "{text}");
    let alloc = dev.json(&["alloc", "status", "--json", &id]).to_string();
    assert!(!alloc.contains("pull-s3cret"), "{alloc}");
}

/// An `oci` task outlives a kill -9 of its agent and the next agent reattaches it (same
/// allocation, same pid, not started again): the run record names the `oci` driver.
#[test]
fn oci_task_survives_an_agent_crash_and_is_reattached() {
    oci_registry::require_tools();
    prereq::require(&[prereq::Need::Root, prereq::Need::Cgroups]);
    let reg = Registry::start(None).expect("the registry starts");
    let image = TestImage::new(
        vec![(busybox_layer(vec![]), Compression::Gzip)],
        serde_json::json!({"Env": ["PATH=/bin"], "Cmd": ["sh", "-c", "while true; do sleep 0.2; done"]}),
    );
    reg.push_image("team/svc", "1", &image).expect("push");
    let mut dev = Dev::start_split();
    let file = dev.write_job(
        "svc.hcl",
        &format!(
            "job \"svc\" {{\n  type = \"service\"\n  group \"g\" {{\n    task \"t\" {{\n      driver = \"oci\"\n      config {{\n        image = \"{}/team/svc:1\"\n      }}\n    }}\n  }}\n}}\n",
            reg.addr
        ),
    );
    dev.ok(&["job", "run", "--detach", file.to_str().unwrap_or_default()]);
    let pid = |a: &serde_json::Value| a["task_states"]["t"]["pid"].as_i64().unwrap_or(0) as i32;
    let running = |a: &serde_json::Value| common::status(a) == "running" && a["task_states"]["t"]["state"] == "running" && pid(a) > 0;
    let before = dev.wait_allocs("svc", "the oci task running", Duration::from_secs(60), |a| a.len() == 1 && running(&a[0]));
    let first = pid(&before[0]);

    dev.kill9_agent().expect("the agent ran");
    assert!(common::pid_alive(first), "the task died with the agent");
    dev.spawn_agent();
    common::wait_for("the new agent to reattach the task", Duration::from_secs(60), || {
        dev.agent_log().lines().any(|l| l.contains("task reattached") && l.contains(&format!("pid={first}"))).then_some(())
    });
    let after = dev.wait_allocs("svc", "the same task running", Duration::from_secs(30), |a| a.len() == 1 && running(&a[0]));
    assert_eq!(after[0]["id"], before[0]["id"]);
    assert_eq!(pid(&after[0]), first);
    let events = after[0]["task_states"]["t"]["events"].as_array().cloned().unwrap_or_default();
    assert_eq!(events.iter().filter(|e| e["type"] == "started").count(), 1, "{events:?}");
    dev.ok(&["job", "stop", "svc"]);
    common::wait_for("the reattached task gone", Duration::from_secs(20), || (!common::pid_alive(first)).then_some(()));
}
