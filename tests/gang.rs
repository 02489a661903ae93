//! Gangs and preemption end to end through a real `mlp dev` (one node, its real memory): a gang
//! that does not fit stays pending with nothing placed and is placed whole once a blocker stops;
//! a high-priority job preempts a low-priority one and both show it.

mod common;

use std::time::Duration;

use common::{status, Dev};

fn node_memory(dev: &Dev) -> u64 {
    let nodes = dev.json(&["node", "status", "--json"]);
    nodes[0]["resources"]["memory_mib"].as_u64().unwrap_or_else(|| panic!("node memory in {nodes}"))
}

fn sleeper(name: &str, kind: &str, priority: u32, memory: u64, group_extra: &str, count: u32) -> String {
    format!(
        r#"job "{name}" {{
  type     = "{kind}"
  priority = {priority}
  group "g" {{
    count = {count}
{group_extra}
    task "t" {{
      driver = "raw_exec"
      config {{
        command = "/bin/sleep"
        args    = ["300"]
      }}
      kill_timeout = "1s"
      resources {{
        cpu    = 10
        memory = {memory}
      }}
    }}
  }}
}}
"#
    )
}

fn live(allocs: &[serde_json::Value]) -> usize {
    allocs.iter().filter(|a| a["desired_status"] == "run" && matches!(status(a), "pending" | "running")).count()
}

#[test]
fn gang_waits_whole_then_is_placed_whole_when_a_blocker_stops() {
    let dev = Dev::start();
    let mem = node_memory(&dev);
    let blocker = dev.write_job("blocker.hcl", &sleeper("blocker", "service", 50, mem * 6 / 10, "", 1));
    dev.ok(&["job", "run", "--detach", blocker.to_str().unwrap_or_default()]);
    dev.wait_allocs("blocker", "blocker running", Duration::from_secs(30), |a| a.len() == 1 && status(&a[0]) == "running");

    // Two members of 30% each: one would fit in the 40% left, the gang as a whole does not.
    let gang = dev.write_job("gang.hcl", &sleeper("gang", "batch", 55, mem * 3 / 10, "    gang = true\n", 2));
    let plan = dev.cli(&["job", "plan", gang.to_str().unwrap_or_default()]);
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(text.contains("Gang: gang of 2 needs 2 placed at once; only 1 fit"), "{text}");
    dev.ok(&["job", "run", "--detach", gang.to_str().unwrap_or_default()]);
    let status_text = common::wait_for("the gang's blocked evaluation", Duration::from_secs(30), || {
        let out = dev.ok(&["job", "status", "gang"]);
        out.contains("Placement Failure").then_some(out)
    });
    assert!(status_text.contains("Gang: gang of 2"), "{status_text}");
    assert_eq!(dev.job("gang")["allocations"].as_array().map(|a| a.len()), Some(0), "nothing of the gang was placed");

    dev.ok(&["job", "stop", "blocker"]);
    let allocs = dev.wait_allocs("gang", "the whole gang placed", Duration::from_secs(60), |a| live(a) == 2);
    assert_eq!(allocs.len(), 2);
    dev.ok(&["job", "stop", "gang"]);
}

#[test]
fn high_priority_job_preempts_and_both_jobs_show_it() {
    let dev = Dev::start();
    let mem = node_memory(&dev);
    let low = dev.write_job("low.hcl", &sleeper("low", "batch", 20, mem * 7 / 10, "", 1));
    dev.ok(&["job", "run", "--detach", low.to_str().unwrap_or_default()]);
    let victim = dev.wait_allocs("low", "low running", Duration::from_secs(30), |a| a.len() == 1 && status(&a[0]) == "running");
    let victim_id = victim[0]["id"].as_str().unwrap_or_default().to_string();

    let high = dev.write_job("high.hcl", &sleeper("high", "batch", 80, mem / 2, "", 1));
    dev.ok(&["job", "run", "--detach", high.to_str().unwrap_or_default()]);
    let placed = dev.wait_allocs("high", "high placed", Duration::from_secs(30), |a| live(a) == 1);
    let high_id = placed[0]["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(placed[0]["preempted_allocations"][0], victim_id.as_str());

    let v = dev.wait_allocs("low", "victim preempted", Duration::from_secs(30), |a| a.iter().any(|x| status(x) == "preempted"));
    let v = v.iter().find(|a| a["id"] == victim_id.as_str()).cloned().unwrap_or_default();
    assert_eq!(status(&v), "preempted");
    assert_eq!(v["preempted_by_allocation"], high_id.as_str());

    let alloc_text = dev.ok(&["alloc", "status", &victim_id]);
    assert!(alloc_text.contains("Preempted By") && alloc_text.contains(&high_id), "{alloc_text}");
    let low_text = dev.ok(&["job", "status", "low"]);
    assert!(low_text.contains("was preempted by allocation"), "{low_text}");
    let high_text = dev.ok(&["job", "status", "high"]);
    assert!(high_text.contains(&format!("preempted {}", &victim_id[..8])), "{high_text}");

    // The batch victim is requeued: once the preemptor stops, a replacement runs.
    dev.ok(&["job", "stop", "high"]);
    dev.wait_allocs("low", "the preempted job's replacement", Duration::from_secs(60), |a| {
        a.iter().any(|x| x["id"] != victim_id.as_str() && status(x) == "running")
    });
    dev.ok(&["job", "stop", "low"]);
}

#[test]
fn a_bad_preemption_delta_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(common::mlp())
        .args(["dev", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--preemption-delta", "0", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .expect("run mlp dev");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--preemption-delta must be between 1 and 99, got 0"), "{err}");
}
