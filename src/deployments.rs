//! `mlp deployment …`, `mlp job revert`, `mlp job scale` and the field-level spec diff that
//! `mlp job history` and `mlp job plan` show (issue 16 §1).

use std::collections::BTreeMap;
use std::process::ExitCode;

use mlp_proto::v1::{
    DeploymentAllocHealthRequest, DeploymentFailRequest, DeploymentPauseRequest, DeploymentPromoteRequest, DeploymentUpdateResponse,
    GetDeploymentRequest, Job, ListDeploymentsRequest, RevertJobRequest, ScaleJobRequest,
};

use crate::cli::DeploymentCommand;
use crate::client::with_failover;
use crate::output::{ago, print_json, short, Table};

pub async fn revert(
    addr: &str,
    name: String,
    version: u64,
    enforce_prior_version: Option<u64>,
    namespace: String,
) -> anyhow::Result<ExitCode> {
    let req = RevertJobRequest { job_id: name.clone(), namespace, version, enforce_prior_version };
    let (_, resp) = with_failover(addr, |mut c| {
        let req = req.clone();
        async move { c.jobs.revert(req).await.map(tonic::Response::into_inner) }
    })
    .await?;
    println!(
        "==> Job {name:?} reverted to the spec of version {version}: now version {}, evaluation {}",
        resp.job_version,
        short(&resp.eval_id)
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn restart(addr: &str, name: String, groups: Vec<String>, namespace: String) -> anyhow::Result<ExitCode> {
    let req = mlp_proto::v1::RestartJobRequest { job_id: name.clone(), namespace, groups };
    let (_, resp) = with_failover(addr, |mut c| {
        let req = req.clone();
        async move { c.jobs.restart(req).await.map(tonic::Response::into_inner) }
    })
    .await?;
    println!("==> Job {name:?} restarting (version {}), evaluation {}", resp.job_version, short(&resp.eval_id));
    println!("    Follow it with: mlp deployment list --job {name}");
    Ok(ExitCode::SUCCESS)
}

pub async fn scale(addr: &str, name: String, group: String, count: u32, namespace: String) -> anyhow::Result<ExitCode> {
    let req = ScaleJobRequest { job_id: name.clone(), namespace, group: group.clone(), count };
    let (_, resp) = with_failover(addr, |mut c| {
        let req = req.clone();
        async move { c.jobs.scale(req).await.map(tonic::Response::into_inner) }
    })
    .await?;
    println!("==> Job {name:?} group {group:?} scaled to {count} (version {}), evaluation {}", resp.job_version, short(&resp.eval_id));
    Ok(ExitCode::SUCCESS)
}

pub async fn deployment(addr: &str, cmd: DeploymentCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DeploymentCommand::List { job, namespace, json } => {
            let req = ListDeploymentsRequest { namespace, job_id: job.unwrap_or_default(), ..Default::default() };
            let (_, resp) = with_failover(addr, |mut c| {
                let req = req.clone();
                async move { c.deployments.list(req).await.map(tonic::Response::into_inner) }
            })
            .await?;
            if json {
                print_json(&resp.deployments)?;
            } else if resp.deployments.is_empty() {
                println!("No deployments.");
            } else {
                let mut t = Table::new(&["ID", "Job", "Version", "Status", "Description", "Created"]);
                for d in &resp.deployments {
                    t.row(vec![
                        short(&d.id).to_string(),
                        d.job_id.clone(),
                        d.job_version.to_string(),
                        d.status.clone(),
                        d.status_description.clone(),
                        ago(d.create_time_ms),
                    ]);
                }
                print!("{}", t.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        DeploymentCommand::Status { id, json } => {
            let req = GetDeploymentRequest { deployment_id: id, ..Default::default() };
            let (_, resp) = with_failover(addr, |mut c| {
                let req = req.clone();
                async move { c.deployments.get(req).await.map(tonic::Response::into_inner) }
            })
            .await?;
            if json {
                print_json(&resp)?;
                return Ok(ExitCode::SUCCESS);
            }
            let Some(d) = &resp.deployment else { return Ok(ExitCode::from(1)) };
            println!("ID          = {}", d.id);
            println!("Job         = {} (version {}{})", d.job_id, d.job_version, if d.is_revert { ", a revert" } else { "" });
            println!("Namespace   = {}", d.namespace);
            println!("Status      = {}", d.status);
            println!("Description = {}", d.status_description);
            println!("\nDeployed");
            let mut t = Table::new(&["Group", "Promoted", "Canaries", "Desired", "Placed", "Healthy", "Unhealthy", "Progress Deadline"]);
            for (name, g) in &d.groups {
                let deadline = if g.require_progress_by_ms == 0 { "none".to_string() } else { until(g.require_progress_by_ms) };
                t.row(vec![
                    name.clone(),
                    if g.desired_canaries == 0 { "-".to_string() } else { g.promoted.to_string() },
                    g.desired_canaries.to_string(),
                    g.desired_total.to_string(),
                    g.placed_allocs.to_string(),
                    g.healthy_allocs.to_string(),
                    g.unhealthy_allocs.to_string(),
                    deadline,
                ]);
            }
            print!("{}", t.render());
            println!("\nAllocations");
            let mut t = Table::new(&["ID", "Name", "Node", "Status", "Canary", "Health"]);
            for a in &resp.allocations {
                let s = a.deployment_status.clone().unwrap_or_default();
                let health = match s.healthy {
                    None => "pending".to_string(),
                    Some(true) => "healthy".to_string(),
                    Some(false) => format!("unhealthy: {}", s.description),
                };
                t.row(vec![
                    short(&a.id).to_string(),
                    a.name.clone(),
                    a.node_name.clone(),
                    a.client_status.clone(),
                    s.canary.to_string(),
                    health,
                ]);
            }
            print!("{}", t.render());
            Ok(ExitCode::SUCCESS)
        }
        DeploymentCommand::Promote { id, groups } => {
            let req = DeploymentPromoteRequest { deployment_id: id.clone(), groups };
            let (_, r) = with_failover(addr, |mut c| {
                let req = req.clone();
                async move { c.deployments.promote(req).await.map(tonic::Response::into_inner) }
            })
            .await?;
            report(&id, "promoted", &r);
            Ok(ExitCode::SUCCESS)
        }
        DeploymentCommand::Pause { id } => pause(addr, id, true).await,
        DeploymentCommand::Resume { id } => pause(addr, id, false).await,
        DeploymentCommand::Fail { id } => {
            let req = DeploymentFailRequest { deployment_id: id.clone() };
            let (_, r) = with_failover(addr, |mut c| {
                let req = req.clone();
                async move { c.deployments.fail(req).await.map(tonic::Response::into_inner) }
            })
            .await?;
            report(&id, "failed", &r);
            Ok(ExitCode::SUCCESS)
        }
        DeploymentCommand::AllocHealth { id, healthy, unhealthy } => {
            let req = DeploymentAllocHealthRequest { deployment_id: id.clone(), healthy, unhealthy };
            let (_, r) = with_failover(addr, |mut c| {
                let req = req.clone();
                async move { c.deployments.set_alloc_health(req).await.map(tonic::Response::into_inner) }
            })
            .await?;
            report(&id, "allocation health set", &r);
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn pause(addr: &str, id: String, pause: bool) -> anyhow::Result<ExitCode> {
    let req = DeploymentPauseRequest { deployment_id: id.clone(), pause };
    let (_, r) = with_failover(addr, |mut c| {
        let req = req.clone();
        async move { c.deployments.pause(req).await.map(tonic::Response::into_inner) }
    })
    .await?;
    report(&id, if pause { "paused" } else { "resumed" }, &r);
    Ok(ExitCode::SUCCESS)
}

fn report(id: &str, what: &str, r: &DeploymentUpdateResponse) {
    print!("==> Deployment {} {what}", short(id));
    if !r.eval_id.is_empty() {
        print!(", evaluation {}", short(&r.eval_id));
    }
    println!();
    if r.reverted_to_version > 0 {
        println!("    The job was reverted: now version {}", r.reverted_to_version);
    }
}

/// `in 4m10s` / `passed`: a deadline for people.
fn until(at_ms: u64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    if at_ms <= now {
        "passed".to_string()
    } else {
        format!("in {}", mlp_server::scheduler::fmt_ms((at_ms - now) / 1000 * 1000))
    }
}

/// What changed between two versions of a job, field by field (`+` added, `-` removed, `~`
/// changed, with the path in the job as JSON names it). Fields the servers set (version,
/// indexes, status, times) are left out.
pub fn spec_diff(old: &Job, new: &Job) -> Vec<String> {
    let (mut a, mut b) = (flatten_job(old), flatten_job(new));
    let mut out = Vec::new();
    for (path, old_v) in &a {
        match b.get(path) {
            None => out.push(format!("- {path} = {old_v}")),
            Some(new_v) if new_v != old_v => out.push(format!("~ {path}: {old_v} => {new_v}")),
            _ => {}
        }
    }
    for (path, new_v) in &b {
        if !a.contains_key(path) {
            out.push(format!("+ {path} = {new_v}"));
        }
    }
    a.clear();
    b.clear();
    out.sort_by(|x, y| x[2..].cmp(&y[2..]));
    out
}

const SERVER_FIELDS: &[&str] =
    &["version", "status", "stop", "submit_time_ms", "create_index", "modify_index", "job_modify_index", "stable", "revert_of"];

fn flatten_job(job: &Job) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut v = serde_json::to_value(job).unwrap_or(serde_json::Value::Null);
    if let Some(o) = v.as_object_mut() {
        for f in SERVER_FIELDS {
            o.remove(*f);
        }
    }
    flatten("", &v, &mut out);
    out
}

/// Leaves of a JSON value by path (`groups[web].tasks[server].config.args[0]`): arrays of
/// objects with a `name` are keyed by it, so a reordering is not a change.
fn flatten(path: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    use serde_json::Value;
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                flatten(&p, x, out);
            }
        }
        Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                let key = x.get("name").and_then(Value::as_str).map_or_else(|| i.to_string(), str::to_string);
                flatten(&format!("{path}[{key}]"), x, out);
            }
        }
        // Empty and default values are what an absent field decodes to.
        Value::Null => {}
        Value::String(s) if s.is_empty() => {}
        Value::Bool(false) => {}
        Value::Number(n) if n.as_f64() == Some(0.0) => {}
        other => {
            out.insert(path.to_string(), other.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_diff_names_each_changed_field_by_path() {
        let src = |args: &str, count: u32| {
            format!(
                r#"job "web" {{
  update {{ max_parallel = 1 }}
  group "g" {{
    count = {count}
    task "t" {{
      driver = "exec"
      config {{
        command = "/bin/sleep"
        args    = [{args}]
      }}
    }}
  }}
}}"#
            )
        };
        let old = mlp_proto::jobspec::parse_str(&src("\"10\"", 2), "a.hcl").expect("valid job");
        let new = mlp_proto::jobspec::parse_str(&src("\"20\", \"x\"", 3), "a.hcl").expect("valid job");
        let d = spec_diff(&old, &new);
        assert!(d.contains(&"~ groups[g].count: 2 => 3".to_string()), "{d:?}");
        assert!(d.contains(&"~ groups[g].tasks[t].config.args[0]: \"10\" => \"20\"".to_string()), "{d:?}");
        assert!(d.contains(&"+ groups[g].tasks[t].config.args[1] = \"x\"".to_string()), "{d:?}");
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(spec_diff(&old, &old).is_empty());
    }
}
