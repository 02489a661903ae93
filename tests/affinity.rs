//! Affinities and spreads end to end: `mlp dev` (its node has no rack) plus two `mlp agent`
//! processes on the same host with `--meta rack=r1` / `rack=r2`. A job spread over racks lands
//! evenly on the two racked nodes (the rackless dev node loses); a job with an affinity for r2
//! lands there, and `mlp job plan` shows the preference score of each chosen node.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{mlp, wait_for, Dev};

/// Extra `mlp agent` processes; killed (with their tasks, by `Dev`'s guard) on drop, also when
/// a test fails.
struct Agents {
    children: Vec<Child>,
}

impl Agents {
    fn start(dev: &Dev, racks: &[&str]) -> Agents {
        let mut agents = Agents { children: Vec::new() };
        for rack in racks {
            let dir = dev.dir.path().join(format!("agent-{rack}"));
            let log = std::fs::File::create(dev.dir.path().join(format!("agent-{rack}.log"))).expect("agent log");
            let child = Command::new(mlp())
                .args(["agent", "--servers", &dev.grpc, "--node-name", &format!("rack-{rack}"), "--enable-raw-exec"])
                .args(["--meta", &format!("rack={rack}")])
                .arg("--data-dir")
                .arg(&dir)
                .env("MLP_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .expect("spawn mlp agent");
            agents.children.push(child);
        }
        agents
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn sleeper(name: &str, count: u32, prefs: &str) -> String {
    format!(
        r#"job "{name}" {{
  type = "batch"
  group "g" {{
    count = {count}
{prefs}
    task "t" {{
      driver = "raw_exec"
      config {{
        command = "/bin/sleep"
        args    = ["300"]
      }}
      kill_timeout = "1s"
      resources {{
        cpu    = 10
        memory = 16
      }}
    }}
  }}
}}
"#
    )
}

/// Node name → number of the job's allocations that should run there.
fn per_node(dev: &Dev, job: &str, count: usize) -> BTreeMap<String, usize> {
    let allocs = dev.wait_allocs(job, &format!("{count} allocations of {job}"), Duration::from_secs(60), |a| {
        a.iter().filter(|a| a["desired_status"] == "run").count() == count
    });
    let mut m = BTreeMap::new();
    for a in allocs.iter().filter(|a| a["desired_status"] == "run") {
        *m.entry(a["node_name"].as_str().unwrap_or("").to_string()).or_default() += 1;
    }
    m
}

fn log_tail(dir: &Path, rack: &str) -> String {
    let log = std::fs::read_to_string(dir.join(format!("agent-{rack}.log"))).unwrap_or_default();
    common::tail(&log, 2000).to_string()
}

#[test]
fn spread_and_affinity_place_by_rack() {
    let dev = Dev::start();
    let _agents = Agents::start(&dev, &["r1", "r2"]);
    wait_for("three ready nodes", Duration::from_secs(60), || {
        let nodes = dev.json(&["node", "status", "--json"]);
        let ready = nodes.as_array().map_or(0, |n| n.iter().filter(|n| n["status"] == "ready").count());
        (ready == 3).then_some(())
    });

    let spread = "    spread {\n      attribute = \"${meta.rack}\"\n      weight    = 100\n    }\n";
    let file = dev.write_job("spread.hcl", &sleeper("spread", 4, spread));
    dev.ok(&["job", "run", "--detach", file.to_str().expect("path")]);
    let placed = per_node(&dev, "spread", 4);
    let want: BTreeMap<String, usize> = [("rack-r1".to_string(), 2), ("rack-r2".to_string(), 2)].into_iter().collect();
    assert_eq!(placed, want, "agent logs:\n{}\n{}", log_tail(dev.dir.path(), "r1"), log_tail(dev.dir.path(), "r2"));

    let affinity = "    affinity {\n      attribute = \"${meta.rack}\"\n      value     = \"r2\"\n      weight    = 100\n    }\n";
    let file = dev.write_job("affinity.hcl", &sleeper("affinity", 2, affinity));
    let plan = dev.ok(&["job", "plan", file.to_str().expect("path")]);
    assert_eq!(plan.matches("on node rack-r2 (").count(), 2, "{plan}");
    assert_eq!(plan.matches("preference +1.00)").count(), 2, "{plan}");
    dev.ok(&["job", "run", "--detach", file.to_str().expect("path")]);
    let placed = per_node(&dev, "affinity", 2);
    assert_eq!(placed, [("rack-r2".to_string(), 2)].into_iter().collect::<BTreeMap<_, _>>());

    // A job without preferences shows no preference in its plan.
    let file = dev.write_job("plain.hcl", &sleeper("plain", 1, ""));
    let plan = dev.ok(&["job", "plan", file.to_str().expect("path")]);
    assert!(plan.contains("+ place plain.g[0] on node") && !plan.contains("preference"), "{plan}");
}
