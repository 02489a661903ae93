//! `mlp namespace apply|list|status|delete` (issue 15 §5; docs/namespaces.md).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use mlp_proto::v1::*;
use mlp_server::scheduler::quota::{gpu_limit, gpus_text};

use crate::client::{connect, status_err};
use crate::output::{print_json, Table};

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum NamespaceCommand {
    /// Create or update namespace NAME. Quota flags change the limits they name and keep the
    /// others; a quota file replaces the quota; without either an existing namespace keeps its
    /// quota (and, without --description, its description).
    Apply {
        name: String,
        #[arg(long)]
        description: Option<String>,
        /// A quota in HCL (cpu_mhz, memory_mib, gpus or gpu_milli, gpu "MODEL" { gpus | gpu_milli });
        /// replaces the namespace's quota.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["cpu", "memory", "gpus", "gpu_milli", "gpu_model", "no_quota"])]
        quota_file: Option<PathBuf>,
        /// CPU limit in MHz.
        #[arg(long, value_name = "MHZ")]
        cpu: Option<u64>,
        /// Memory limit in MiB.
        #[arg(long, value_name = "MIB")]
        memory: Option<u64>,
        /// GPU limit in whole GPUs.
        #[arg(long, value_name = "N", conflicts_with = "gpu_milli")]
        gpus: Option<u64>,
        /// GPU limit in thousandths of a GPU (shares count their milli).
        #[arg(long, value_name = "N")]
        gpu_milli: Option<u64>,
        /// A limit on one GPU model, in whole GPUs: `A100-SXM4-80GB=4`; repeatable.
        #[arg(long = "gpu-model", value_name = "MODEL=GPUS")]
        gpu_model: Vec<String>,
        /// Remove the namespace's quota.
        #[arg(long, conflicts_with_all = ["cpu", "memory", "gpus", "gpu_milli", "gpu_model"])]
        no_quota: bool,
    },
    /// List namespaces.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a namespace: its quota and what its allocations hold.
    Status {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a namespace (refused for `default` and while it has jobs that are not dead).
    Delete { name: String },
}

/// Nomad spells these flags with one dash (`-description`, `-quota-file`); clap wants two.
/// Rewrites them for `mlp namespace ...` only, before clap sees the arguments.
pub fn nomad_flags(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let is_ns = args.iter().skip(1).take_while(|a| *a != "--").take(4).any(|a| a == "namespace");
    if !is_ns {
        return args;
    }
    const FLAGS: [&str; 9] = ["-description", "-quota-file", "-cpu", "-memory", "-gpus", "-gpu-milli", "-gpu-model", "-no-quota", "-json"];
    args.into_iter()
        .map(|os| {
            let Some(a) = os.to_str() else { return os };
            let (flag, value) = match a.split_once('=') {
                Some((f, v)) => (f, Some(v)),
                None => (a, None),
            };
            if FLAGS.contains(&flag) {
                let long = format!("-{flag}");
                value.map_or(long.clone(), |v| format!("{long}={v}")).into()
            } else {
                os
            }
        })
        .collect()
}

/// `MODEL=GPUS` (whole GPUs) or `MODEL=Nm` (thousandths).
fn parse_model_limit(s: &str) -> anyhow::Result<GpuModelQuota> {
    let (model, n) = s.rsplit_once('=').with_context(|| format!("--gpu-model {s:?}: expected MODEL=GPUS, e.g. A100-SXM4-80GB=4"))?;
    let gpu_milli = match n.strip_suffix('m') {
        Some(m) => m.parse::<u64>().ok(),
        None => n.parse::<u64>().ok().and_then(|g| g.checked_mul(1000)),
    }
    .with_context(|| format!("--gpu-model {s:?}: {n:?} is not a whole number of GPUs (or thousandths with an `m` suffix: 1500m)"))?;
    Ok(GpuModelQuota { model: model.to_string(), gpu_milli: Some(gpu_milli) })
}

/// The namespace's quota with the limits given as flags changed and the others kept: `gpus`
/// and `gpu_milli` replace each other, a model's limit replaces that model's.
fn merge(mut base: QuotaSpec, flags: QuotaSpec) -> QuotaSpec {
    base.cpu_mhz = flags.cpu_mhz.or(base.cpu_mhz);
    base.memory_mib = flags.memory_mib.or(base.memory_mib);
    if flags.gpus.is_some() || flags.gpu_milli.is_some() {
        base.gpus = flags.gpus;
        base.gpu_milli = flags.gpu_milli;
    }
    for m in flags.gpu_models {
        match base.gpu_models.iter_mut().find(|b| b.model == m.model) {
            Some(b) => b.gpu_milli = m.gpu_milli,
            None => base.gpu_models.push(m),
        }
    }
    base
}

fn limit_text(v: Option<u64>, unit: &str) -> String {
    v.map_or("-".to_string(), |v| format!("{v}{unit}"))
}

/// One row per dimension: (dimension, used, limit).
fn rows(q: Option<&QuotaSpec>, u: &NamespaceUsage) -> Vec<[String; 3]> {
    let mut out = vec![
        ["cpu".to_string(), format!("{} MHz", u.cpu_mhz), limit_text(q.and_then(|q| q.cpu_mhz), " MHz")],
        ["memory".to_string(), format!("{} MiB", u.memory_mib), limit_text(q.and_then(|q| q.memory_mib), " MiB")],
        ["gpus".to_string(), gpus_text(u.gpu_milli), q.and_then(gpu_limit).map_or("-".to_string(), gpus_text)],
    ];
    // With borrowing the limit reads `quota (+ borrow)`.
    if let Some(b) = q.and_then(|q| q.borrow.as_ref()) {
        let more = |row: &mut [String; 3], v: Option<u64>, text: &dyn Fn(u64) -> String| {
            if let Some(v) = v.filter(|v| *v > 0) {
                row[2] = format!("{} (may borrow {})", row[2], text(v));
            }
        };
        more(&mut out[0], b.cpu_mhz, &|v| format!("{v} MHz"));
        more(&mut out[1], b.memory_mib, &|v| format!("{v} MiB"));
        more(&mut out[2], q.map(mlp_server::scheduler::quota::gpu_borrow), &gpus_text);
    }
    let mut models: std::collections::BTreeSet<&str> = u.gpu_milli_by_model.keys().map(String::as_str).collect();
    if let Some(q) = q {
        models.extend(q.gpu_models.iter().map(|m| m.model.as_str()));
    }
    for m in models {
        let used = u.gpu_milli_by_model.get(m).copied().unwrap_or(0);
        let limit = q.and_then(|q| q.gpu_models.iter().find(|g| g.model == m)).and_then(|g| g.gpu_milli);
        out.push([format!("gpus of {m}"), gpus_text(used), limit.map_or("-".to_string(), gpus_text)]);
    }
    out
}

fn quota_summary(q: Option<&QuotaSpec>) -> String {
    let Some(q) = q else { return "-".to_string() };
    let mut parts = Vec::new();
    if let Some(c) = q.cpu_mhz {
        parts.push(format!("cpu {c} MHz"));
    }
    if let Some(m) = q.memory_mib {
        parts.push(format!("memory {m} MiB"));
    }
    if let Some(g) = gpu_limit(q) {
        parts.push(format!("gpus {}", gpus_text(g)));
    }
    for m in &q.gpu_models {
        parts.push(format!("{} {}", m.model, m.gpu_milli.map_or("-".to_string(), gpus_text)));
    }
    if let Some(b) = &q.borrow {
        let mut more = Vec::new();
        if let Some(c) = b.cpu_mhz {
            more.push(format!("cpu {c} MHz"));
        }
        if let Some(m) = b.memory_mib {
            more.push(format!("memory {m} MiB"));
        }
        let g = mlp_server::scheduler::quota::gpu_borrow(q);
        if g > 0 {
            more.push(format!("gpus {}", gpus_text(g)));
        }
        if !more.is_empty() {
            parts.push(format!("may borrow {}", more.join(", ")));
        }
    }
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(", ")
    }
}

pub async fn namespace(addr: &str, cmd: NamespaceCommand) -> anyhow::Result<ExitCode> {
    let mut c = connect(addr).await?.namespaces;
    match cmd {
        NamespaceCommand::Apply { name, description, quota_file, cpu, memory, gpus, gpu_milli, gpu_model, no_quota } => {
            mlp_server::namespace::check_name(&name).map_err(anyhow::Error::msg)?;
            let existing = match c.get(NamespaceGetRequest { name: name.clone(), ..Default::default() }).await {
                Ok(r) => r.into_inner().namespace,
                Err(s) if s.code() == tonic::Code::NotFound => None,
                Err(s) => return Err(status_err(s)),
            };
            let flags = cpu.is_some() || memory.is_some() || gpus.is_some() || gpu_milli.is_some() || !gpu_model.is_empty();
            let quota = if let Some(file) = quota_file {
                let src = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
                let file_name = file.display().to_string();
                Some(mlp_server::namespace::parse_quota(&src, &file_name).map_err(|e| anyhow::anyhow!("{file_name} has errors:\n{e}"))?)
            } else if flags {
                let gpu_models = gpu_model.iter().map(|s| parse_model_limit(s)).collect::<anyhow::Result<Vec<_>>>()?;
                let base = existing.as_ref().and_then(|n| n.quota.clone()).unwrap_or_default();
                Some(merge(base, QuotaSpec { cpu_mhz: cpu, memory_mib: memory, gpus, gpu_milli, gpu_models, ..Default::default() }))
            } else if no_quota {
                None
            } else {
                existing.as_ref().and_then(|n| n.quota.clone())
            };
            let description = description.or_else(|| existing.as_ref().map(|n| n.description.clone())).unwrap_or_default();
            let ns = Namespace { name: name.clone(), description, quota, ..Default::default() };
            c.apply(NamespaceApplyRequest { namespace: Some(ns) }).await.map_err(status_err)?;
            println!("Namespace {name:?} applied");
        }
        NamespaceCommand::List { json } => {
            let r = c.list(NamespaceListRequest::default()).await.map_err(status_err)?.into_inner();
            if json {
                print_json(&r.namespaces)?;
            } else {
                let mut t = Table::new(&["Name", "Description", "Quota"]);
                for n in &r.namespaces {
                    t.row(vec![n.name.clone(), n.description.clone(), quota_summary(n.quota.as_ref())]);
                }
                print!("{}", t.render());
            }
        }
        NamespaceCommand::Status { name, json } => {
            let r = c.get(NamespaceGetRequest { name, ..Default::default() }).await.map_err(status_err)?.into_inner();
            if json {
                print_json(&r)?;
            } else {
                let n = r.namespace.unwrap_or_default();
                let u = r.usage.unwrap_or_default();
                println!("Name                = {}", n.name);
                println!("Description         = {}", n.description);
                println!("Quota               = {}", if n.quota.is_some() { "yes" } else { "none (unlimited)" });
                println!("Jobs                = {}", u.jobs);
                println!("Live Allocations    = {}", u.live_allocations);
                println!("Blocked Evaluations = {}", u.blocked_evaluations);
                println!("\nQuota Usage");
                let mut t = Table::new(&["Dimension", "Used", "Limit"]);
                for [d, used, limit] in rows(n.quota.as_ref(), &u) {
                    t.row(vec![d, used, limit]);
                }
                print!("{}", t.render());
            }
        }
        NamespaceCommand::Delete { name } => {
            c.delete(NamespaceDeleteRequest { name: name.clone() }).await.map_err(status_err)?;
            println!("Namespace {name:?} deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_limits_and_rows() {
        assert_eq!(parse_model_limit("A100=4").expect("ok"), GpuModelQuota { model: "A100".into(), gpu_milli: Some(4000) });
        assert_eq!(parse_model_limit("T4=1500m").expect("ok").gpu_milli, Some(1500));
        assert!(parse_model_limit("A100").is_err());
        assert!(parse_model_limit("A100=x").is_err());
        let q = QuotaSpec {
            gpus: Some(4),
            gpu_models: vec![GpuModelQuota { model: "A100".into(), gpu_milli: Some(2000) }],
            ..Default::default()
        };
        let u = NamespaceUsage {
            gpu_milli: 2500,
            gpu_milli_by_model: [("A100".to_string(), 2000)].into_iter().collect(),
            ..Default::default()
        };
        let r = rows(Some(&q), &u);
        assert_eq!(r[2], ["gpus".to_string(), "2.5".to_string(), "4".to_string()]);
        assert_eq!(r[3], ["gpus of A100".to_string(), "2".to_string(), "2".to_string()]);
        assert_eq!(quota_summary(Some(&q)), "gpus 4, A100 2");
    }

    #[test]
    fn flags_change_only_the_limits_they_name() {
        let base = QuotaSpec {
            cpu_mhz: Some(1000),
            gpu_milli: Some(2500),
            gpu_models: vec![GpuModelQuota { model: "A100".into(), gpu_milli: Some(1000) }],
            ..Default::default()
        };
        let q = merge(
            base,
            QuotaSpec { gpus: Some(4), gpu_models: vec![GpuModelQuota { model: "T4".into(), gpu_milli: Some(500) }], ..Default::default() },
        );
        assert_eq!(q.cpu_mhz, Some(1000));
        assert_eq!((q.gpus, q.gpu_milli), (Some(4), None));
        assert_eq!(q.gpu_models.len(), 2);
        let q =
            merge(q, QuotaSpec { gpu_models: vec![GpuModelQuota { model: "A100".into(), gpu_milli: Some(3000) }], ..Default::default() });
        assert_eq!(q.gpu_models[0].gpu_milli, Some(3000));
    }

    #[test]
    fn single_dash_flags_only_for_namespace() {
        let v = |a: &[&str]| a.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert_eq!(
            nomad_flags(v(&["mlp", "namespace", "apply", "team-a", "-description=x", "-gpus", "4"])),
            v(&["mlp", "namespace", "apply", "team-a", "--description=x", "--gpus", "4"])
        );
        assert_eq!(nomad_flags(v(&["mlp", "job", "run", "-gpus"])), v(&["mlp", "job", "run", "-gpus"]));
    }
}
