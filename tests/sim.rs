//! `mlp sim` end to end on a small slice of the openb trace: table and JSON output, all four
//! policies, determinism across runs, and row errors that name the file and line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[path = "prereq/mod.rs"]
mod prereq;
use prereq::mlp;

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/openb-slice/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn sim(args: &[&str]) -> (bool, String, String) {
    let out =
        Command::new(mlp()).args(["sim", "--nodes", &fixture("nodes.csv"), "--pods", &fixture("pods.csv")]).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn json_reports_every_policy_and_is_deterministic() {
    let (ok, stdout, stderr) = sim(&["--seeds", "2", "--policy", "all", "--json"]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let reports = v.as_array().unwrap();
    let names: Vec<&str> = reports.iter().map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(names, ["best-fit", "gpu-packing", "fgd", "mlp"]);
    for r in reports {
        for field in ["alloc_ratio_100", "alloc_ratio_130", "placements_per_sec"] {
            let x = r[field].as_f64().unwrap();
            assert!(x > 0.0 && (field == "placements_per_sec" || x <= 100.0), "{field} = {x}");
        }
        assert!(r["failed_pods"].as_u64().is_some());
        assert_eq!(r["seeds"].as_array().unwrap().len(), 2);
        assert_eq!(r["curve"].as_array().unwrap().len(), 131);
    }
    // Same seeds, same allocation (placements/s aside).
    let (_, again, _) = sim(&["--seeds", "2", "--policy", "all", "--json"]);
    let w: serde_json::Value = serde_json::from_str(&again).unwrap();
    for (a, b) in reports.iter().zip(w.as_array().unwrap()) {
        assert_eq!((&a["alloc_ratio_130"], &a["failed_pods"], &a["curve"]), (&b["alloc_ratio_130"], &b["failed_pods"], &b["curve"]));
    }
}

#[test]
fn online_adds_the_learned_workload_rule_for_fgd_and_mlp() {
    let (ok, stdout, stderr) = sim(&["--seeds", "2", "--policy", "all", "--online", "--json"]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let runs: Vec<(String, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["policy"].as_str().unwrap().to_string(), r["workload"].as_str().unwrap().to_string()))
        .collect();
    let want = [
        ("best-fit", "foresight"),
        ("gpu-packing", "foresight"),
        ("fgd", "foresight"),
        ("fgd", "online"),
        ("mlp", "foresight"),
        ("mlp", "online"),
    ];
    assert_eq!(runs, want.map(|(p, w)| (p.to_string(), w.to_string())));
    let (_, again, _) = sim(&["--seeds", "2", "--policy", "all", "--online", "--json"]);
    let w: serde_json::Value = serde_json::from_str(&again).unwrap();
    for (a, b) in v.as_array().unwrap().iter().zip(w.as_array().unwrap()) {
        assert_eq!((&a["alloc_ratio_130"], &a["failed_pods"], &a["curve"]), (&b["alloc_ratio_130"], &b["failed_pods"], &b["curve"]));
    }
    let (ok, stdout, _) = sim(&["--seeds", "1", "--policy", "mlp", "--online"]);
    assert!(ok && stdout.contains("Policy mlp, workload: online"), "{stdout}");
}

#[test]
fn table_output_and_single_policy_json() {
    let (ok, stdout, stderr) = sim(&["--seeds", "1", "--policy", "fgd"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("Policy fgd") && stdout.contains("Alloc@130%") && stdout.contains("mean"), "{stdout}");
    let (ok, stdout, _) = sim(&["--seeds", "1", "--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["policy"], "mlp");
}

#[test]
fn bad_rows_and_policies_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("pods.csv");
    std::fs::write(&bad, "name,cpu_milli,memory_mib,num_gpu,gpu_milli\np0,1000,10,1,500\np1,1000,ten,1,500\n").unwrap();
    let out = Command::new(mlp()).args(["sim", "--nodes", &fixture("nodes.csv"), "--pods"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pods.csv:3: memory_mib: expected a non-negative integer"), "{stderr}");
    let (ok, _, stderr) = sim(&["--policy", "random"]);
    assert!(!ok && stderr.contains("unknown policy \"random\""), "{stderr}");
}
