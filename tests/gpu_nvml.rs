//! End-to-end tests of real-GPU support (issue 12) without a GPU: `mlp dev --nvml-library`
//! loads the test-only stand-in `libnvidia-ml` (`agent/fake-nvml`, built as this package's
//! dev-dependency) through the real `nvml-wrapper` path. Its devices, MIG instances, metrics,
//! processes and XIDs come from a JSON file the test writes (and rewrites). Device nodes are
//! stand-ins made with `mknod` (NVIDIA's major 195; opening one without the driver gives
//! `ENXIO`) in a directory passed as `--nvidia-dev-dir`.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{mlp, status, tail, wait_for, Dev};
use serde_json::{json, Value};

const GPU0: &str = "GPU-0b5c1d2e-0000-4000-8000-000000000000";
const GPU1: &str = "GPU-0b5c1d2e-0000-4000-8000-000000000001";
const GPU2: &str = "GPU-0b5c1d2e-0000-4000-8000-000000000002";
const GPU3: &str = "GPU-0b5c1d2e-0000-4000-8000-000000000003";
const MIG_A: &str = "MIG-7f000000-0000-4000-8000-00000000000a";
const MIG_B: &str = "MIG-7f000000-0000-4000-8000-00000000000b";

/// The stand-in library, next to the test binaries (`target/<profile>/deps`).
fn fake_library() -> PathBuf {
    let deps = Path::new(mlp()).parent().expect("target dir").join("deps");
    let lib = deps.join("libmlp_fake_nvml.so");
    assert!(
        lib.exists(),
        "{} is missing: it is built as a dev-dependency of the mlp package (`cargo build --tests` builds it)",
        lib.display()
    );
    lib
}

/// Four H100s: 0 and 1 NVLinked under one PCIe switch (NUMA 0), 2 split into two MIG
/// instances, 3 alone (NUMA 1).
fn machine(xids: Value, processes: Value) -> Value {
    let dev = |i: u32, uuid: &str, bus: &str, switch: &str, numa: i32, peers: Value, mig: Value| {
        json!({
            "uuid": uuid, "name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559, "memory_used_mib": 1200 + i,
            "minor": i, "pci_bus_id": bus, "pci_switch": switch, "numa_node": numa,
            "compute_capability": [9, 0], "nvlink_peers": peers, "mig": mig,
            "utilization": 30 + i, "power_mw": 250000 + i * 1000, "temperature_c": 40 + i,
            "ecc_corrected": i, "ecc_uncorrected": 0,
            "processes": processes.get(i.to_string()).cloned().unwrap_or(json!([])),
        })
    };
    json!({
        "driver_version": "550.54.15",
        "cuda_version": 12040,
        "devices": [
            dev(0, GPU0, "00000000:18:00.0", "sw0", 0, json!([1]), json!([])),
            // Upper case and a short domain: the agent normalises bus ids.
            dev(1, GPU1, "0000:2A:00.0", "sw0", 0, json!([0]), json!([])),
            dev(2, GPU2, "00000000:9A:00.0", "", 1, json!([]), json!([
                {"uuid": MIG_A, "profile": "3g.40gb", "memory_mib": 40192, "gpu_instance": 1, "compute_instance": 0},
                {"uuid": MIG_B, "profile": "3g.40gb", "memory_mib": 40192, "gpu_instance": 2, "compute_instance": 0},
            ])),
            dev(3, GPU3, "00000000:DB:00.0", "", 1, json!([]), json!([])),
        ],
        "xids": xids,
    })
}

/// A directory of stand-in device nodes: `nvidia0`..`nvidia3`, `nvidiactl`, `nvidia-uvm`.
fn stand_in_nodes(dir: &Path) {
    std::fs::create_dir_all(dir).expect("dev dir");
    let nodes: [(&str, u64); 6] = [("nvidia0", 0), ("nvidia1", 1), ("nvidia2", 2), ("nvidia3", 3), ("nvidiactl", 255), ("nvidia-uvm", 254)];
    for (name, minor) in nodes {
        nix::sys::stat::mknod(
            &dir.join(name),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(195, minor),
        )
        .unwrap_or_else(|e| panic!("mknod {name} (the test needs root): {e}"));
    }
}

struct Gpus {
    dev: Dev,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Gpus {
    fn start() -> Gpus {
        let dir = tempfile::Builder::new().prefix("mlp-nvml-").tempdir().expect("tempdir");
        let config = dir.path().join("nvml.json");
        std::fs::write(&config, machine(json!([]), json!({})).to_string()).expect("write config");
        stand_in_nodes(&dir.path().join("dev"));
        let lib = fake_library();
        let devdir = dir.path().join("dev");
        // The agent (inside `mlp dev`) reads the stand-in's file through MLP_FAKE_NVML.
        let dev = Dev::start_with_env(
            &[
                "--nvml-library",
                lib.to_str().unwrap_or_default(),
                "--nvidia-dev-dir",
                devdir.to_str().unwrap_or_default(),
                "--heartbeat-ttl",
                "2",
            ],
            &[("MLP_FAKE_NVML", config.to_str().unwrap_or_default())],
        );
        Gpus { dev, config, _dir: dir }
    }

    fn rewrite(&self, v: Value) {
        // Whole-file replace, so the library never reads half a file.
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, v.to_string()).expect("write config");
        std::fs::rename(&tmp, &self.config).expect("replace config");
    }

    fn node(&self) -> Value {
        let id = first_node(&self.dev)["id"].as_str().unwrap_or_default().to_string();
        self.dev.json(&["node", "status", &id, "--json"])
    }
}

/// The cluster's node once the agent registered it (`mlp dev` announces itself before the
/// registration is committed).
fn first_node(dev: &Dev) -> Value {
    wait_for("the node to register", Duration::from_secs(30), || {
        let nodes = dev.json(&["node", "status", "--json"]);
        nodes.get(0).filter(|n| n["id"].is_string()).cloned()
    })
}

/// The machine with GPU 3 fallen off the bus.
fn lost3(mut m: Value) -> Value {
    m["devices"][3]["lost"] = json!(true);
    m
}

fn device<'a>(node: &'a Value, id: &str) -> &'a Value {
    node["node"]["resources"]["gpus"]
        .as_array()
        .and_then(|g| g.iter().find(|d| d["id"] == id))
        .unwrap_or_else(|| panic!("no device {id} in {node:#}"))
}

fn job(name: &str, kind: &str, driver: &str, gpu: &str, script: &str) -> String {
    format!(
        "job \"{name}\" {{\n  type = \"{kind}\"\n  group \"g\" {{\n    restart {{\n      attempts = 0\n      mode = \"fail\"\n    }}\n    \
         task \"t\" {{\n      driver = \"{driver}\"\n      config {{\n        command = \"/bin/sh\"\n        args = [\"-c\", {script:?}]\n      }}\n      \
         resources {{\n        cpu = 50\n        memory = 32\n        {gpu}\n      }}\n    }}\n  }}\n}}\n"
    )
}

fn run(dev: &Dev, name: &str, body: &str) {
    let file = dev.write_job(&format!("{name}.hcl"), body);
    dev.ok(&["job", "run", "--detach", file.to_str().unwrap_or_default()]);
}

fn wait_one(dev: &Dev, job: &str, state: &str) -> Value {
    let allocs = dev.wait_allocs(job, &format!("{job} {state}"), Duration::from_secs(60), |a| a.len() == 1 && status(&a[0]) == state);
    allocs[0].clone()
}

fn assigned(alloc: &Value) -> Vec<String> {
    alloc["resources"]["gpus"].as_array().map(|g| g.iter().filter_map(|d| d["id"].as_str().map(String::from)).collect()).unwrap_or_default()
}

#[test]
fn nvml_devices_are_fingerprinted_isolated_watched_and_measured() {
    if !common::require_exec() {
        return;
    }
    let g = Gpus::start();
    let dev = &g.dev;

    // ---- fingerprint: whole GPUs, MIG instances instead of GPU 2, topology, versions.
    let node = g.node();
    let gpus = node["node"]["resources"]["gpus"].as_array().cloned().unwrap_or_default();
    let ids: Vec<&str> = gpus.iter().filter_map(|d| d["id"].as_str()).collect();
    assert_eq!(ids, [GPU0, GPU1, MIG_A, MIG_B, GPU3], "{node:#}");
    let d0 = device(&node, GPU0);
    assert_eq!(d0["model"], "NVIDIA H100 80GB HBM3");
    assert_eq!(d0["memory_mib"], 81559);
    assert_eq!(d0["compute_capability"], "9.0");
    assert_eq!(d0["pci_bus_id"], "00000000:18:00.0");
    assert_eq!(d0["numa_node"], 0);
    assert_eq!(d0["nvlink_peers"], json!([GPU1]));
    assert!(d0["simulated"].as_bool() != Some(true));
    let d1 = device(&node, GPU1);
    assert_eq!(d1["pci_bus_id"], "00000000:2a:00.0");
    assert_eq!(d1["nvlink_peers"], json!([GPU0]));
    assert!(!d0["pci_switch"].as_str().unwrap_or("").is_empty());
    assert_eq!(d0["pci_switch"], d1["pci_switch"]);
    let d3 = device(&node, GPU3);
    assert_eq!(d3["numa_node"], 1);
    assert_eq!(d3["index"], 3);
    assert!(d3["device_paths"][0].as_str().unwrap_or("").ends_with("/nvidia3"), "{d3:#}");
    let mig = device(&node, MIG_A);
    assert_eq!(mig["mig_profile"], "3g.40gb");
    assert_eq!(mig["parent_id"], GPU2);
    assert_eq!(mig["memory_mib"], 40192);
    assert!(mig["device_paths"][0].as_str().unwrap_or("").ends_with("/nvidia2"), "{mig:#}");
    let attrs = &node["node"]["attributes"];
    assert_eq!(attrs["gpu.source"], "nvml");
    assert_eq!(attrs["gpu.driver_version"], "550.54.15");
    assert_eq!(attrs["gpu.cuda_version"], "12.4");
    assert_eq!(attrs["gpu.count"], "4");
    assert_eq!(attrs["gpu.mig_instances"], "2");
    assert!(attrs.get("gpu.simulated").is_none());

    // ---- metrics: heartbeats carry each GPU's measurements.
    let node = wait_for("GPU stats from heartbeats", Duration::from_secs(20), || {
        let n = g.node();
        (n["gpu_stats"].as_array().map_or(0, Vec::len) == 4).then_some(n)
    });
    let s3 = node["gpu_stats"].as_array().and_then(|s| s.iter().find(|x| x["id"] == GPU3)).cloned().expect("GPU3 stats");
    assert_eq!(s3["utilization_percent"], 33);
    assert_eq!(s3["memory_used_mib"], 1203);
    assert_eq!(s3["power_mw"], 253000);
    assert_eq!(s3["temperature_c"], 43);
    assert_eq!(s3["ecc_corrected"], 3);
    let (code, metrics) = dev.http("GET", "/v1/metrics", None, b"");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("mlp_gpu_utilization_percent{node=") && metrics.contains(&format!("gpu=\"{GPU3}\"}} 33")),
        "{}",
        tail(&metrics, 4000)
    );
    assert!(
        metrics.contains(&format!("gpu=\"{GPU1}\",model=\"NVIDIA H100 80GB HBM3\",simulated=\"false\"}} 1")),
        "{}",
        tail(&metrics, 4000)
    );
    let text = dev.ok(&["node", "status", node["node"]["id"].as_str().unwrap_or_default()]);
    assert!(text.contains("GPU usage") && text.contains("healthy") && text.contains("physical"), "{text}");

    // ---- isolation: an exec task sees its own device node, the control nodes, its UUID.
    run(
        dev,
        "iso",
        &job(
            "iso",
            "batch",
            "exec",
            "gpu { count = 1 }",
            "ls /dev | grep nvidia | tr '\\n' ' '; echo; echo CUDA=$CUDA_VISIBLE_DEVICES; echo INDEX=$MLP_GPU_INDEX; \
             cat /dev/nvidia0 2>&1 | head -c 0; for n in /dev/nvidia[0-9]; do (exec 3<$n) 2>/dev/null; echo $n=$?; done",
        ),
    );
    let a = wait_one(dev, "iso", "complete");
    let mine = assigned(&a);
    assert_eq!(mine.len(), 1, "{a:#}");
    let node = g.node();
    let d = device(&node, &mine[0]);
    let minor = d["device_paths"][0].as_str().and_then(|p| p.rsplit("nvidia").next()).unwrap_or_default().to_string();
    let id = a["id"].as_str().unwrap_or_default().to_string();
    let out = String::from_utf8_lossy(&dev.cli(&["alloc", "logs", &id, "t"]).stdout).into_owned();
    let listed: Vec<&str> = out.lines().next().unwrap_or_default().split_whitespace().collect();
    assert!(listed.contains(&format!("nvidia{minor}").as_str()), "{out}");
    assert!(listed.contains(&"nvidiactl") && listed.contains(&"nvidia-uvm"), "{out}");
    assert_eq!(listed.iter().filter(|n| n.starts_with("nvidia") && n[6..].chars().all(|c| c.is_ascii_digit())).count(), 1, "{out}");
    assert!(out.contains(&format!("CUDA={}", mine[0])), "{out}");
    assert!(out.contains(&format!("INDEX={}", d["index"])), "{out}");

    // ---- health: a job holding GPUs 0, 1 and 3; XID 13 (the application's fault) on GPU 0
    // is ignored, XID 79 (fallen off the bus) on GPU 3 takes it out and is an event on the task.
    // GPU 3 is then lost for NVML too (every query of it fails): it stays registered, from its
    // last known record, marked unhealthy.
    run(dev, "hold", &job("hold", "service", "raw_exec", "gpu { count = 3 }", "exec sleep 300"));
    let held = wait_one(dev, "hold", "running");
    let mut held_ids = assigned(&held);
    held_ids.sort();
    assert_eq!(held_ids, [GPU0, GPU1, GPU3], "{held:#}");
    g.rewrite(lost3(machine(json!([{"device": 0, "xid": 13}, {"device": 3, "xid": 79}]), json!({}))));
    let node = wait_for("GPU 3 unhealthy", Duration::from_secs(30), || {
        let n = g.node();
        (device(&n, GPU3)["unhealthy"] == true).then_some(n)
    });
    assert!(device(&node, GPU3)["health"].as_str().unwrap_or("").contains("XID 79"), "{node:#}");
    assert!(device(&node, GPU0)["unhealthy"] != true, "XID 13 is not the device's fault: {node:#}");
    assert_eq!(node["node"]["attributes"]["gpu.unhealthy"], "1");
    let health = std::fs::read_to_string(dev.data_dir().join("agent/gpu-health.json")).unwrap_or_default();
    assert!(health.contains(GPU3) && health.contains("XID 79") && !health.contains(GPU0), "kept across restarts: {health}");
    wait_for("the task's GPU event", Duration::from_secs(20), || {
        let allocs = dev.job("hold")["allocations"].clone();
        let events = allocs[0]["task_states"]["t"]["events"].as_array().cloned().unwrap_or_default();
        events.iter().any(|e| e["type"] == "gpu-unhealthy" && e["message"].as_str().unwrap_or("").contains(GPU3)).then_some(())
    });
    let (_, metrics) = dev.http("GET", "/v1/metrics", None, b"");
    assert!(
        metrics.contains(&format!("gpu=\"{GPU3}\",model=\"NVIDIA H100 80GB HBM3\",simulated=\"false\"}} 0")),
        "{}",
        tail(&metrics, 4000)
    );

    // ---- per-task GPU usage: the stand-in reports the holder's process on GPU 0.
    let pid = held["task_states"]["t"]["pid"].as_u64().expect("task pid");
    g.rewrite(lost3(machine(
        json!([{"device": 0, "xid": 13}, {"device": 3, "xid": 79}]),
        json!({"0": [{"pid": pid, "used_mib": 2048, "sm_util": 55}]}),
    )));
    wait_for("the task's GPU usage", Duration::from_secs(30), || {
        let allocs = dev.job("hold")["allocations"].clone();
        let u = allocs[0]["task_states"]["t"]["usage"].clone();
        (u["gpu_memory_used_mib"] == 2048 && u["gpu_utilization_percent"] == 55).then_some(())
    });
    let text = dev.ok(&["alloc", "status", held["id"].as_str().unwrap_or_default()]);
    assert!(text.contains("GPU usage: 55%") && text.contains("2048 MiB"), "{text}");

    // ---- scheduling: nothing new lands on the unhealthy GPU.
    dev.ok(&["job", "stop", "hold"]);
    dev.wait_allocs("hold", "hold stopped", Duration::from_secs(60), |a| a.iter().all(|x| status(x) != "running"));
    run(
        dev,
        "two",
        &job("two", "service", "raw_exec", "gpu { count = 1 }", "exec sleep 300").replace("group \"g\" {", "group \"g\" {\n    count = 3"),
    );
    let allocs =
        dev.wait_allocs("two", "two GPUs placed", Duration::from_secs(60), |a| a.iter().filter(|x| status(x) == "running").count() == 2);
    std::thread::sleep(Duration::from_secs(1));
    let all: Vec<String> = dev.job("two")["allocations"].as_array().cloned().unwrap_or(allocs).iter().flat_map(assigned).collect();
    assert!(!all.contains(&GPU3.to_string()), "placed on the unhealthy GPU: {all:?}");
    assert!(!all.iter().any(|i| i.starts_with("MIG-")), "a whole-GPU ask got a MIG instance: {all:?}");
    assert_eq!(all.len(), 2, "{all:?}");
}

#[test]
fn without_a_usable_nvml_library_the_node_has_no_gpus_and_says_why() {
    // A path that does not exist.
    let dev = Dev::start_with(&["--nvml-library", "/nonexistent/libnvidia-ml.so.1"]);
    let n = &first_node(&dev);
    assert!(n["resources"]["gpus"].as_array().is_none_or(Vec::is_empty), "{n:#}");
    assert!(n["attributes"]["gpu.unavailable"].as_str().unwrap_or("").contains("not found"), "{n:#}");
    let text = dev.ok(&["node", "status", n["id"].as_str().unwrap_or_default()]);
    assert!(text.contains("GPUs        = none:"), "{text}");
    // Jobs without GPUs still run.
    run(&dev, "cpu", &job("cpu", "batch", "raw_exec", "", "true"));
    wait_one(&dev, "cpu", "complete");
    drop(dev);

    // A library that loads but whose driver is not there (NVML_ERROR_DRIVER_NOT_LOADED).
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("nvml.json");
    std::fs::write(&config, json!({"init_error": 9}).to_string()).expect("write config");
    let lib = fake_library();
    let dev = Dev::start_with_env(
        &["--nvml-library", lib.to_str().unwrap_or_default()],
        &[("MLP_FAKE_NVML", config.to_str().unwrap_or_default())],
    );
    let n = first_node(&dev);
    assert!(n["attributes"]["gpu.unavailable"].as_str().unwrap_or("").contains("driver is not loaded"), "{n:#}");
    drop(dev);

    // `--gpus none`: not looked for, nothing said.
    let dev = Dev::start_with(&["--gpus", "none"]);
    let n = first_node(&dev);
    assert!(n["attributes"].get("gpu.unavailable").is_none(), "{n:#}");
}

/// A stand-in `nvidia-cuda-mps-control` that logs its calls to `<dir>/mps.log` (`-d` returns at
/// once, as the real one does after daemonizing).
fn mps_stand_in(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let log = dir.join("mps.log");
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = \"-d\" ]; then echo \"start cvd=$CUDA_VISIBLE_DEVICES pipe=$CUDA_MPS_PIPE_DIRECTORY\" >> {log}; exit 0; fi\n\
         input=$(cat); echo \"control cvd=$CUDA_VISIBLE_DEVICES stdin=$input\" >> {log}\n",
        log = log.display()
    );
    let path = dir.join("nvidia-cuda-mps-control");
    std::fs::write(&path, script).expect("write stand-in");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

#[test]
fn mig_instances_get_their_capability_nodes_and_shares_run_under_mps() {
    if !common::require_exec() {
        return;
    }
    let dir = tempfile::Builder::new().prefix("mlp-nvml-").tempdir().expect("tempdir");
    let config = dir.path().join("nvml.json");
    std::fs::write(&config, machine(json!([]), json!({})).to_string()).expect("write config");
    let devdir = dir.path().join("dev");
    stand_in_nodes(&devdir);
    std::fs::create_dir_all(devdir.join("nvidia-caps")).expect("caps dir");
    for minor in [21u64, 22, 31, 32] {
        nix::sys::stat::mknod(
            &devdir.join(format!("nvidia-caps/nvidia-cap{minor}")),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o444),
            nix::sys::stat::makedev(236, minor),
        )
        .expect("mknod cap");
    }
    // GPU 2's two instances: GPU instances 1 and 2, compute instance 0 in each.
    let minors = dir.path().join("mig-minors");
    std::fs::write(
        &minors,
        "config 1\nmonitor 2\ngpu2/gi1/access 21\ngpu2/gi1/ci0/access 22\ngpu2/gi2/access 31\ngpu2/gi2/ci0/access 32\n",
    )
    .expect("write minors");
    let control = mps_stand_in(dir.path());
    let lib = fake_library();
    let dev = Dev::start_with_env(
        &[
            "--nvml-library",
            lib.to_str().unwrap_or_default(),
            "--nvidia-dev-dir",
            devdir.to_str().unwrap_or_default(),
            "--nvidia-mig-minors",
            minors.to_str().unwrap_or_default(),
            "--mps-control",
            control.to_str().unwrap_or_default(),
        ],
        &[("MLP_FAKE_NVML", config.to_str().unwrap_or_default())],
    );
    let node = dev.json(&["node", "status", first_node(&dev)["id"].as_str().unwrap_or_default(), "--json"]);
    let mig = device(&node, MIG_B);
    let paths: Vec<String> =
        mig["device_paths"].as_array().cloned().unwrap_or_default().iter().filter_map(|p| p.as_str().map(String::from)).collect();
    let want: Vec<String> =
        ["nvidia2", "nvidia-caps/nvidia-cap31", "nvidia-caps/nvidia-cap32"].iter().map(|p| devdir.join(p).display().to_string()).collect();
    assert_eq!(paths, want, "{mig:#}");

    // An exec task given a MIG instance sees its parent's node and exactly its own capabilities.
    run(
        &dev,
        "mig",
        &job(
            "mig",
            "batch",
            "exec",
            "gpu {\n  count = 1\n  mig = \"3g.40gb\"\n}",
            "echo CAPS=$(ls /dev/nvidia-caps | tr '\\n' ' '); echo NODES=$(ls /dev | grep '^nvidia[0-9]' | tr '\\n' ' '); echo CUDA=$CUDA_VISIBLE_DEVICES",
        ),
    );
    let a = wait_one(&dev, "mig", "complete");
    let mine = assigned(&a);
    assert_eq!(mine.len(), 1);
    let (c1, c2) = if mine[0] == MIG_A { ("nvidia-cap21", "nvidia-cap22") } else { ("nvidia-cap31", "nvidia-cap32") };
    let out = String::from_utf8_lossy(&dev.cli(&["alloc", "logs", a["id"].as_str().unwrap_or_default(), "t"]).stdout).into_owned();
    assert!(out.lines().any(|l| l == format!("CAPS={c1} {c2}")), "{out}");
    assert!(out.lines().any(|l| l == "NODES=nvidia2"), "{out}");
    assert!(out.contains(&format!("CUDA={}", mine[0])), "{out}");

    // Two half shares land on one real device, under one MPS daemon, with their limits. They
    // are raw_exec tasks so that they can meet in a host directory: each waits (bounded) until
    // both run, so the daemon is shared whatever the machine's speed. (The pipe directory's
    // bind into an exec task's root is tested in agent/tests/mps.rs.)
    let meet = dir.path().join("meet");
    std::fs::create_dir_all(&meet).expect("meet dir");
    for name in ["s1", "s2"] {
        let script = format!(
            "echo PCT=$CUDA_MPS_ACTIVE_THREAD_PERCENTAGE MEM=$CUDA_MPS_PINNED_DEVICE_MEM_LIMIT PIPE=$CUDA_MPS_PIPE_DIRECTORY; ls -d $CUDA_MPS_PIPE_DIRECTORY; \
             touch {m}/$MLP_ALLOC_ID; i=0; while [ $(ls {m} | wc -l) -lt 2 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done",
            m = meet.display()
        );
        run(&dev, name, &job(name, "batch", "raw_exec", "gpu {\n  share = 0.5\n  memory = 20000\n}", &script));
    }
    let s1 = wait_one(&dev, "s1", "complete");
    let s2 = wait_one(&dev, "s2", "complete");
    let (d1, d2) = (assigned(&s1), assigned(&s2));
    assert_eq!(d1, d2, "two halves share one device");
    assert!(d1[0].starts_with("GPU-"), "{d1:?}");
    for a in [&s1, &s2] {
        let out = String::from_utf8_lossy(&dev.cli(&["alloc", "logs", a["id"].as_str().unwrap_or_default(), "t"]).stdout).into_owned();
        assert!(out.contains("PCT=50 MEM=0=20000M PIPE=/"), "{out}");
        let pipe = out.split("PIPE=").nth(1).and_then(|r| r.lines().next()).unwrap_or_default().to_string();
        assert!(out.lines().any(|l| l == pipe), "the pipe directory is not visible in the task: {out}");
    }
    let log = wait_for("the daemon to be told to quit", Duration::from_secs(20), || {
        let log = std::fs::read_to_string(dir.path().join("mps.log")).unwrap_or_default();
        log.contains("stdin=quit").then_some(log)
    });
    let starts: Vec<&str> = log.lines().filter(|l| l.starts_with("start")).collect();
    assert_eq!(starts.len(), 1, "one daemon for both shares: {log}");
    assert!(starts[0].contains(&format!("cvd={}", d1[0])), "{log}");
}
