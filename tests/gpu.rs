//! End-to-end tests of simulated GPUs: `mlp dev --simulated-gpus FILE` registers them, the
//! scheduler hands them out, and tasks see theirs in their environment.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{mlp, repo_root, status, tail, wait_for, Dev};
use serde_json::Value;

const PRINT_ENV: &str = "echo NV=$NVIDIA_VISIBLE_DEVICES; echo CUDA=$CUDA_VISIBLE_DEVICES; echo IDS=$MLP_GPU_IDS; \
                         echo MILLI=$MLP_GPU_MILLI; echo SIM=$MLP_GPUS_SIMULATED";

fn h100x8() -> String {
    repo_root().join("examples/gpus-h100x8.json").to_string_lossy().into_owned()
}

/// A dev cluster whose agent registers the GPUs of `file`.
fn dev_with(file: &str) -> Dev {
    Dev::start_with(&["--simulated-gpus", file])
}

/// A job of one group; `tasks` are (name, driver, gpu block or "", shell script).
fn job(name: &str, kind: &str, tasks: &[(&str, &str, &str, &str)]) -> String {
    let mut body = format!("job \"{name}\" {{\n  type = \"{kind}\"\n  group \"g\" {{\n");
    for (task, driver, gpu, script) in tasks {
        body.push_str(&format!(
            "    task \"{task}\" {{\n      driver = \"{driver}\"\n      config {{\n        command = \"/bin/sh\"\n        \
             args = [\"-c\", {script:?}]\n      }}\n      resources {{\n        cpu = 50\n        memory = 32\n        {gpu}\n      }}\n    }}\n"
        ));
    }
    body.push_str("  }\n}\n");
    body
}

fn run(dev: &Dev, name: &str, body: &str) {
    let file = dev.write_job(&format!("{name}.hcl"), body);
    dev.ok(&["job", "run", "--detach", file.to_str().unwrap_or_default()]);
}

/// The allocation's GPU assignment as (id, milli), in order.
fn gpus(alloc: &Value) -> Vec<(String, u64)> {
    alloc["resources"]["gpus"]
        .as_array()
        .map(|gs| gs.iter().map(|g| (g["id"].as_str().unwrap_or("").to_string(), g["milli"].as_u64().unwrap_or(1000))).collect())
        .unwrap_or_default()
}

fn ids(alloc: &Value) -> Vec<String> {
    gpus(alloc).into_iter().map(|(id, _)| id).collect()
}

/// `KEY=value` lines of a task's stdout.
fn env_of(dev: &Dev, alloc: &Value, task: &str) -> std::collections::BTreeMap<String, String> {
    let id = alloc["id"].as_str().unwrap_or_default().to_string();
    let logs = wait_for("task output", Duration::from_secs(20), || {
        let out = dev.cli(&["alloc", "logs", &id, task]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("SIM=").then_some(text)
    });
    logs.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn wait_one(dev: &Dev, job: &str, state: &str) -> Value {
    let allocs = dev.wait_allocs(job, &format!("{job} {state}"), Duration::from_secs(60), |a| a.len() == 1 && status(&a[0]) == state);
    allocs[0].clone()
}

#[test]
fn gpu_task_sees_its_simulated_device_and_a_cpu_task_sees_none() {
    if !common::require_exec() {
        return;
    }
    let dev = dev_with(&h100x8());
    // ${attr.gpu.*} constraints hold on the simulated node.
    let gpu_job = job("gpu", "batch", &[("t", "exec", "gpu { count = 1 }", PRINT_ENV)]).replace(
        "  group \"g\" {",
        "  constraint {\n    attribute = \"${attr.gpu.model}\"\n    value = \"H100-SXM5-80GB\"\n  }\n  \
         constraint {\n    attribute = \"${attr.gpu.simulated}\"\n    value = \"true\"\n  }\n  group \"g\" {",
    );
    run(&dev, "gpu", &gpu_job);
    run(&dev, "cpu", &job("cpu", "batch", &[("t", "raw_exec", "", PRINT_ENV)]));
    let a = wait_one(&dev, "gpu", "complete");
    let assigned = ids(&a);
    assert_eq!(assigned.len(), 1, "{a}");
    assert!(assigned[0].starts_with("sim-gpu-"), "{assigned:?}");
    let env = env_of(&dev, &a, "t");
    assert_eq!(env["NV"], assigned[0], "{env:?}");
    assert_eq!(env["CUDA"], assigned[0]);
    assert_eq!(env["IDS"], assigned[0]);
    assert_eq!(env["MILLI"], "1000");
    assert_eq!(env["SIM"], "1");
    let shown = dev.ok(&["alloc", "status", a["id"].as_str().unwrap_or_default()]);
    assert!(shown.contains(&format!("GPUs                = {} (whole)", assigned[0])), "{shown}");

    let c = wait_one(&dev, "cpu", "complete");
    assert!(ids(&c).is_empty(), "{c}");
    let env = env_of(&dev, &c, "t");
    assert_eq!((env["NV"].as_str(), env["CUDA"].as_str(), env["SIM"].as_str()), ("void", "", ""), "{env:?}");

    // A constraint on another model finds no node.
    let other = job("other", "batch", &[("t", "raw_exec", "gpu { count = 1 }", "true")])
        .replace("  group \"g\" {", "  constraint {\n    attribute = \"${attr.gpu.model}\"\n    value = \"A100\"\n  }\n  group \"g\" {");
    // Without --detach, `job run` returns once the evaluation is done (here: blocked).
    let file = dev.write_job("other.hcl", &other);
    let out = dev.cli(&["job", "run", file.to_str().unwrap_or_default()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Constraint \"${attr.gpu.model} = A100\" filtered 1 node"), "{text}");
    assert_eq!(dev.job("other")["allocations"].as_array().map(Vec::len), Some(0));
}

#[test]
fn node_status_lists_the_simulated_gpus() {
    let dev = dev_with(&repo_root().join("examples/gpus-a100-mig.json").to_string_lossy());
    let nodes = dev.json(&["node", "status", "--json"]);
    let id = nodes[0]["id"].as_str().unwrap_or_default().to_string();
    let out = dev.ok(&["node", "status", &id]);
    assert!(out.contains("gpu.simulated = true"), "{out}");
    assert!(out.contains("gpu.count = 4"), "{out}");
    let row = out.lines().find(|l| l.starts_with("sim-gpu-2-mig-1 ")).unwrap_or_else(|| panic!("no MIG row: {out}"));
    for cell in ["A100-SXM4-80GB", "40960 MiB", "3g.40gb of sim-gpu-2", "sim-pcie-1", "(simulated)"] {
        assert!(row.contains(cell), "{cell} in {row}");
    }
    let row = out.lines().find(|l| l.starts_with("sim-gpu-0 ")).unwrap_or_else(|| panic!("no GPU row: {out}"));
    assert!(row.contains("sim-gpu-1") && row.contains("(simulated)"), "{row}");
    let json = dev.json(&["node", "status", &id, "--json"]);
    let devices = json["node"]["resources"]["gpus"].as_array().cloned().unwrap_or_default();
    assert_eq!(devices.len(), 11, "{json}");
    assert!(devices.iter().all(|d| d["simulated"] == true), "{devices:?}");
    assert_eq!(devices[2]["parent_id"], "sim-gpu-2");
    assert_eq!(devices[2]["mig_profile"], "3g.40gb");
}

#[test]
fn two_half_shares_pack_onto_one_device() {
    let dev = dev_with(&h100x8());
    let script = format!("{PRINT_ENV}; sleep 600");
    for name in ["half-a", "half-b"] {
        run(&dev, name, &job(name, "service", &[("t", "raw_exec", "gpu { share = 0.5 }", &script)]));
    }
    let a = wait_one(&dev, "half-a", "running");
    let b = wait_one(&dev, "half-b", "running");
    let (ga, gb) = (gpus(&a), gpus(&b));
    assert_eq!(ga.len(), 1, "{a}");
    assert_eq!(ga[0].1, 500);
    assert_eq!(ga, gb, "both halves on one device");
    let env = env_of(&dev, &b, "t");
    assert_eq!((env["IDS"].as_str(), env["MILLI"].as_str(), env["SIM"].as_str()), (ga[0].0.as_str(), "500", "1"));
    let shown = dev.ok(&["alloc", "status", a["id"].as_str().unwrap_or_default()]);
    assert!(shown.contains(&format!("{} (0.500)", ga[0].0)), "{shown}");
}

#[test]
fn each_gpu_task_of_a_group_sees_only_its_own_devices() {
    let dev = dev_with(&h100x8());
    let body = job(
        "pair",
        "batch",
        &[
            ("one", "raw_exec", "gpu { count = 1 }", PRINT_ENV),
            ("none", "raw_exec", "", PRINT_ENV),
            ("two", "raw_exec", "gpu { count = 2 }", PRINT_ENV),
        ],
    );
    run(&dev, "pair", &body);
    let a = wait_one(&dev, "pair", "complete");
    let all = ids(&a);
    assert_eq!(all.len(), 3, "{a}");
    let one = env_of(&dev, &a, "one");
    let two = env_of(&dev, &a, "two");
    let none = env_of(&dev, &a, "none");
    // The allocation lists devices task by task in the group's order.
    assert_eq!(one["IDS"], all[0], "{one:?}");
    assert_eq!(two["IDS"], all[1..].join(","), "{two:?}");
    assert_eq!(two["NV"], two["IDS"]);
    assert_eq!(two["MILLI"], "1000,1000");
    assert_eq!(none["NV"], "void");
    let distinct: BTreeSet<&String> = all.iter().collect();
    assert_eq!(distinct.len(), 3, "{all:?}");
}

#[test]
fn a_multi_gpu_ask_stays_in_one_nvlink_island() {
    let dev = dev_with(&h100x8());
    run(&dev, "single", &job("single", "service", &[("t", "raw_exec", "gpu { count = 1 }", "sleep 600")]));
    let single = ids(&wait_one(&dev, "single", "running"));
    run(&dev, "four", &job("four", "service", &[("t", "raw_exec", "gpu { count = 4 }", "sleep 600")]));
    let four = ids(&wait_one(&dev, "four", "running"));
    let island = |id: &str| id.trim_start_matches("sim-gpu-").parse::<u32>().map(|n| n / 4).unwrap_or(u32::MAX);
    let islands: BTreeSet<u32> = four.iter().map(|id| island(id)).collect();
    assert_eq!(four.len(), 4, "{four:?}");
    assert_eq!(islands.len(), 1, "four GPUs in one island of 4: {four:?} (the single one holds {single:?})");
    assert!(!four.contains(&single[0]));
}

#[test]
fn mig_instances_and_a_whole_island_on_one_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("mig.json");
    std::fs::write(
        &file,
        r#"{"generate": {"count": 8, "model": "A100-SXM4-80GB", "memory_mib": 81920, "nvlink": "islands-of-4",
            "mig": {"count": 1, "profiles": ["3g.40gb", "3g.40gb"]}}}"#,
    )
    .expect("write");
    let dev = dev_with(&file.to_string_lossy());
    run(
        &dev,
        "mig",
        &job("mig", "service", &[("t", "raw_exec", "gpu {\n  count = 2\n  mig = \"3g.40gb\"\n}", &format!("{PRINT_ENV}; sleep 600"))]),
    );
    run(&dev, "four", &job("four", "service", &[("t", "raw_exec", "gpu { count = 4 }", "sleep 600")]));
    let mig = wait_one(&dev, "mig", "running");
    let mut mig_ids = ids(&mig);
    mig_ids.sort();
    assert_eq!(mig_ids, ["sim-gpu-7-mig-0", "sim-gpu-7-mig-1"], "{mig}");
    let env = env_of(&dev, &mig, "t");
    assert_eq!(env["IDS"].split(',').count(), 2, "{env:?}");
    assert!(env["IDS"].split(',').all(|id| id.starts_with("sim-gpu-7-mig-")), "{env:?}");
    // GPU 7 is split, so only GPUs 0-3 form a whole island of 4.
    let mut four = ids(&wait_one(&dev, "four", "running"));
    four.sort();
    assert_eq!(four, ["sim-gpu-0", "sim-gpu-1", "sim-gpu-2", "sim-gpu-3"]);
}

/// Runs `mlp ARGS` that must fail before starting anything; returns its stderr.
fn refused(args: &[&str], dir: &Path) -> String {
    let mut child = Command::new(mlp())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mlp");
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mlp {args:?} did not exit: it started with a bad GPU file");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut err).expect("stderr");
    }
    assert!(!code.success(), "mlp {args:?} succeeded; stderr: {err}");
    err
}

#[test]
fn a_bad_gpu_file_stops_dev_and_agent_before_they_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dup = dir.path().join("dup.json");
    std::fs::write(
        &dup,
        "{\"devices\": [\n  {\"id\": \"sim-a\", \"model\": \"A100\", \"memory_mib\": 1},\n  {\"id\": \"sim-a\", \"model\": \"A100\", \"memory_mib\": 1}\n]}\n",
    )
    .expect("write");
    let err = refused(
        &["dev", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--data-dir", "data", "--simulated-gpus", "dup.json"],
        dir.path(),
    );
    assert!(err.contains("dup.json:3:10: devices[1].id: duplicate id \"sim-a\""), "{}", tail(&err, 2000));
    assert!(!dir.path().join("data").exists(), "nothing written");

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"generate\": {\n  \"count\": 8,\n  \"model\": \"H100\"\n  \"memory_mib\": 81920\n}}\n").expect("write");
    let err = refused(
        &["agent", "--servers", "127.0.0.1:1", "--data-dir", "agent-data", "--simulated-gpus", bad.to_str().unwrap_or_default()],
        dir.path(),
    );
    assert!(err.contains(&format!("{}:4:3: expected `,` or `}}`", bad.display())), "{}", tail(&err, 2000));
    assert!(!dir.path().join("agent-data").exists(), "nothing written");

    let unknown = dir.path().join("unknown.json");
    std::fs::write(&unknown, "{\"generate\": {\"count\": 2, \"model\": \"H100\", \"memory_mib\": 1, \"nvlinks\": \"all\"}}")
        .expect("write");
    let err = refused(&["agent", "--servers", "127.0.0.1:1", "--data-dir", "agent-data", "--simulated-gpus", "unknown.json"], dir.path());
    assert!(err.contains("unknown.json:1:") && err.contains("unknown field `nvlinks`"), "{}", tail(&err, 2000));
    let err = refused(&["agent", "--servers", "127.0.0.1:1", "--data-dir", "agent-data", "--simulated-gpus", "missing.json"], dir.path());
    assert!(err.contains("missing.json: cannot read the simulated GPU file"), "{}", tail(&err, 2000));
}
