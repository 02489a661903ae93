//! `mlp job dispatch`, `mlp job periodic force` and the children of a parent in `mlp job status`
//! (issue 16 §2).

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use mlp_proto::jobspec::jobtypes;
use mlp_proto::v1::*;

use crate::client::with_failover;
use crate::output::{ago, print_json, short, Table};

// `mlp job dispatch [--meta k=v]… NAME [payload-file]`.
#[derive(Debug, Args)]
pub struct DispatchArgs {
    /// The parameterized job.
    pub name: String,
    /// A file whose bytes become the child's payload (`local/payload` in each task dir); `-`
    /// reads standard input.
    pub payload_file: Option<PathBuf>,
    /// Meta for the child (exported as MLP_META_<key>); repeatable.
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    pub meta: Vec<String>,
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Return right after the dispatch instead of following the child's placement.
    #[arg(long)]
    pub detach: bool,
    /// Print the dispatch result as JSON (implies --detach).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum PeriodicCommand {
    /// Launch a periodic job's child now, whatever its schedule says.
    Force {
        name: String,
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `KEY=VALUE` pairs, each key once.
pub fn parse_meta(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for p in pairs {
        let (k, v) = p.split_once('=').with_context(|| format!("--meta {p:?}: write KEY=VALUE"))?;
        if k.is_empty() {
            anyhow::bail!("--meta {p:?}: the key is empty");
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            anyhow::bail!("--meta {k:?} is given twice");
        }
    }
    Ok(out)
}

fn read_payload(file: Option<&PathBuf>) -> anyhow::Result<Vec<u8>> {
    let Some(file) = file else { return Ok(Vec::new()) };
    let limit = jobtypes::MAX_PAYLOAD_BYTES as u64 + 1;
    let mut buf = Vec::new();
    if file.as_os_str() == "-" {
        std::io::stdin().take(limit).read_to_end(&mut buf).context("reading the payload from standard input")?;
    } else {
        std::fs::File::open(file)
            .and_then(|f| f.take(limit).read_to_end(&mut buf))
            .with_context(|| format!("reading the payload file {}", file.display()))?;
    }
    if buf.len() > jobtypes::MAX_PAYLOAD_BYTES {
        anyhow::bail!("the payload {} is larger than {} bytes (limit: dispatch payload)", file.display(), jobtypes::MAX_PAYLOAD_BYTES);
    }
    Ok(buf)
}

pub async fn dispatch(addr: &str, a: DispatchArgs) -> anyhow::Result<ExitCode> {
    let req = DispatchJobRequest {
        job_id: a.name.clone(),
        namespace: a.namespace.clone(),
        meta: parse_meta(&a.meta)?,
        payload: read_payload(a.payload_file.as_ref())?,
        // One id for the dispatch and all its retries: one child.
        request_id: uuid::Uuid::new_v4().to_string(),
    };
    let (mut c, resp) = with_failover(addr, |mut c| {
        let req = req.clone();
        async move { c.jobs.dispatch(req).await.map(tonic::Response::into_inner) }
    })
    .await?;
    if a.json {
        print_json(&resp)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("==> Dispatched job {:?}, evaluation {}", resp.dispatched_job_id, short(&resp.eval_id));
    if a.detach {
        println!("    Dispatched Job ID: {}", resp.dispatched_job_id);
        return Ok(ExitCode::SUCCESS);
    }
    let get = GetJobRequest { job_id: resp.dispatched_job_id.clone(), namespace: a.namespace, stale: true, ..Default::default() };
    let job = c.jobs.get(get).await.map_err(crate::client::status_err)?.into_inner().job.unwrap_or_default();
    crate::follow::job_run(&mut c, &job, &resp.eval_id, 0, resp.index, crate::follow::Until::Started).await
}

pub async fn periodic(addr: &str, cmd: PeriodicCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PeriodicCommand::Force { name, namespace, json } => {
            let req = PeriodicForceRequest { job_id: name, namespace };
            let (_, resp) = with_failover(addr, |mut c| {
                let req = req.clone();
                async move { c.jobs.periodic_force(req).await.map(tonic::Response::into_inner) }
            })
            .await?;
            if json {
                print_json(&resp)?;
            } else {
                println!("==> Launched job {:?}, evaluation {}", resp.child_job_id, short(&resp.eval_id));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What `mlp job run` prints for a parent: it places nothing, so there is nothing to follow.
pub async fn registered_parent(addr: &str, job: &Job) -> anyhow::Result<ExitCode> {
    if job.parameterized.is_some() {
        println!("    Parameterized job: it runs only when dispatched (`mlp job dispatch {}`)", job.name);
        return Ok(ExitCode::SUCCESS);
    }
    let req = JobChildrenRequest { job_id: job.id.clone(), namespace: job.namespace.clone(), stale: false };
    let (_, resp) = with_failover(addr, |mut c| {
        let req = req.clone();
        async move { c.jobs.children(req).await.map(tonic::Response::into_inner) }
    })
    .await?;
    if resp.next_launch_ms > 0 {
        println!("    Periodic job: next launch {}", jobtypes::format_time(resp.next_launch_ms));
    }
    Ok(ExitCode::SUCCESS)
}

/// The children section of `mlp job status NAME` for a parent.
pub async fn print_children(addr: &str, job: &Job) -> anyhow::Result<()> {
    let req = JobChildrenRequest { job_id: job.id.clone(), namespace: job.namespace.clone(), stale: false };
    let (_, resp) = with_failover(addr, |mut c| {
        let req = req.clone();
        async move { c.jobs.children(req).await.map(tonic::Response::into_inner) }
    })
    .await?;
    if let Some(p) = &job.periodic {
        println!();
        println!("Periodic: crons {:?}, time zone {}", p.crons, if p.time_zone.is_empty() { "UTC" } else { &p.time_zone });
        if resp.last_launch_ms > 0 {
            println!("Last launch: {}", jobtypes::format_time(resp.last_launch_ms));
        }
        if resp.next_launch_ms > 0 {
            println!("Next launch: {}", jobtypes::format_time(resp.next_launch_ms));
        }
    }
    if let Some(p) = &job.parameterized {
        println!();
        println!("Parameterized: payload {}, meta required {:?}, optional {:?}", p.payload, p.meta_required, p.meta_optional);
    }
    println!();
    if resp.children.is_empty() {
        println!("Children: none");
        return Ok(());
    }
    println!("Children");
    let mut t = Table::new(&["ID", "Status", "Allocations", "Submitted"]);
    for j in &resp.children {
        let counts: Vec<String> = j.alloc_counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
        t.row(vec![j.id.clone(), j.status.clone(), counts.join(","), ago(j.submit_time_ms)]);
    }
    print!("{}", t.render());
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn meta_pairs_parse_and_say_what_is_wrong() {
        let m = parse_meta(&["a=1".into(), "b=x=y".into(), "c=".into()]).unwrap();
        assert_eq!(m["b"], "x=y");
        assert_eq!(m["c"], "");
        assert!(parse_meta(&["nope".into()]).unwrap_err().to_string().contains("KEY=VALUE"));
        assert!(parse_meta(&["=v".into()]).unwrap_err().to_string().contains("key is empty"));
        assert!(parse_meta(&["a=1".into(), "a=2".into()]).unwrap_err().to_string().contains("twice"));
    }
}
