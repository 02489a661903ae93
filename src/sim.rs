//! `mlp sim`: replays an openb-format trace against a simulated cluster with the scheduler's
//! placement policies (`mlp_server::sim`), for benchmarking and capacity planning. Runs seeds one
//! after another on one thread, so placements/s is a one-core figure.

use std::process::ExitCode;

use anyhow::Context;
use mlp_server::scheduler::gpu::Policy;
use mlp_server::sim::{self, trace, SimConfig, SimResult, Simulation};
use serde_json::json;

use crate::cli::SimArgs;
use crate::output::Table;

/// Runs the simulation and prints per-seed and mean results.
pub fn run(args: &SimArgs) -> anyhow::Result<ExitCode> {
    let policies = parse_policies(&args.policy)?;
    anyhow::ensure!(args.seeds > 0, "--seeds must be at least 1");
    anyhow::ensure!(args.inflate > 0.0 && args.inflate <= 10.0, "--inflate must be in (0, 10], found {}", args.inflate);
    let nodes = trace::load_nodes(&args.nodes).context("loading the node list")?;
    let pods = trace::load_pods(&args.pods).context("loading the pod list")?;
    let simulation = Simulation::new(&nodes, &pods);
    anyhow::ensure!(simulation.gpu_count() > 0, "{}: the cluster has no GPUs", args.nodes.display());
    if !args.json {
        println!(
            "Cluster: {} nodes, {} GPUs; trace: {} pods of {} types; demand up to {:.0}%; seeds {}..{}",
            simulation.node_count(),
            simulation.gpu_count(),
            simulation.pod_count(),
            simulation.pod_type_count(),
            args.inflate * 100.0,
            args.first_seed,
            args.first_seed + args.seeds - 1
        );
    }
    let mut reports = Vec::new();
    for policy in policies {
        // Best-fit and gpu-packing ignore the workload: the online rule would repeat them.
        let online = [false, true].into_iter().filter(|&o| !o || (args.online && matches!(policy, Policy::Fgd | Policy::Mlp)));
        for online in online.collect::<Vec<_>>() {
            let results: Vec<SimResult> = (args.first_seed..args.first_seed + args.seeds)
                .map(|seed| simulation.run(&SimConfig { policy, inflate: args.inflate, seed, online }))
                .collect();
            let mean = sim::mean(&results).context("no results")?;
            let rule = if online { "online" } else { "foresight" };
            if !args.json {
                print_table(policy, rule, &results, &mean);
            }
            reports.push(report(policy, rule, &results, &mean));
        }
    }
    if args.json {
        let value = if reports.len() == 1 { reports.remove(0) } else { serde_json::Value::Array(reports) };
        println!("{}", serde_json::to_string_pretty(&value)?);
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_policies(names: &[String]) -> anyhow::Result<Vec<Policy>> {
    let mut out = Vec::new();
    for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        if name == "all" {
            out.extend(Policy::ALL);
        } else {
            out.push(name.parse::<Policy>()?);
        }
    }
    out.dedup();
    anyhow::ensure!(!out.is_empty(), "no policy given");
    Ok(out)
}

fn print_table(policy: Policy, rule: &str, results: &[SimResult], mean: &SimResult) {
    println!("\nPolicy {policy}, workload: {rule}");
    let mut t = Table::new(&["Seed", "Alloc@100%", "Alloc@130%", "Failed pods", "Pods", "Placements/s"]);
    let row = |label: String, r: &SimResult| {
        vec![
            label,
            format!("{:.2}", r.alloc_ratio_100),
            format!("{:.2}", r.alloc_ratio_130),
            r.failed_pods.to_string(),
            r.pods.to_string(),
            format!("{:.0}", r.placements_per_sec),
        ]
    };
    for r in results {
        t.row(row(r.seed.to_string(), r));
    }
    t.row(row("mean".to_string(), mean));
    print!("{}", t.render());
}

fn numbers(r: &SimResult) -> serde_json::Value {
    json!({
        "alloc_ratio_100": round2(r.alloc_ratio_100),
        "alloc_ratio_130": round2(r.alloc_ratio_130),
        "failed_pods": r.failed_pods,
        "placements_per_sec": r.placements_per_sec.round(),
    })
}

fn report(policy: Policy, rule: &str, results: &[SimResult], mean: &SimResult) -> serde_json::Value {
    let mut v = numbers(mean);
    if let Some(o) = v.as_object_mut() {
        o.insert("policy".into(), json!(policy.as_str()));
        o.insert("workload".into(), json!(rule));
        let seeds: Vec<serde_json::Value> = results
            .iter()
            .map(|r| {
                let mut s = numbers(r);
                if let Some(o) = s.as_object_mut() {
                    o.insert("seed".into(), json!(r.seed));
                }
                s
            })
            .collect();
        o.insert("seeds".into(), json!(seeds));
        o.insert("curve".into(), json!(mean.curve.iter().map(|&x| round2(x)).collect::<Vec<_>>()));
    }
    v
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
