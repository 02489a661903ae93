//! `mlp run list|show` and `mlp model list|show|alias` (issue 17 §3): views of the cluster's
//! MLflow tracking state through `TrackingService`.

use std::process::ExitCode;

use mlp_proto::v1::{GetModelRequest, GetRunRequest, ListModelsRequest, ListRunsRequest, SetModelAliasRequest, TrackedModel};

use crate::cli::{ModelCommand, RunCommand};
use crate::client::{connect, status_err};
use crate::output::{ago, print_json, short, Table};

fn when(ms: i64) -> String {
    u64::try_from(ms).ok().filter(|m| *m > 0).map(ago).unwrap_or_else(|| "-".into())
}

pub async fn run(addr: &str, cmd: RunCommand) -> anyhow::Result<ExitCode> {
    let mut c = connect(addr).await?;
    match cmd {
        RunCommand::List { experiment, filter, limit, json, namespace } => {
            let req = ListRunsRequest { experiment, filter, max_results: limit, namespace };
            let resp = c.tracking.list_runs(req).await.map_err(status_err)?.into_inner();
            if json {
                print_json(&resp.runs)?;
            } else if resp.runs.is_empty() {
                println!("No runs.");
            } else {
                let mut t = Table::new(&["Run ID", "Experiment", "Name", "Status", "Started", "Job", "Alloc"]);
                for r in &resp.runs {
                    t.row(vec![
                        short(&r.run_id).to_string(),
                        r.experiment_name.clone(),
                        r.name.clone(),
                        r.status.clone(),
                        when(r.start_time_ms),
                        r.tags.get("mlp.job").cloned().unwrap_or_default(),
                        r.tags.get("mlp.alloc").map(|a| short(a).to_string()).unwrap_or_default(),
                    ]);
                }
                print!("{}", t.render());
                if resp.matched as usize > resp.runs.len() {
                    println!("({} of {} matching runs; --limit shows more)", resp.runs.len(), resp.matched);
                }
            }
        }
        RunCommand::Show { run_id, json, namespace } => {
            let r = c.tracking.get_run(GetRunRequest { run_id, namespace }).await.map_err(status_err)?.into_inner();
            if json {
                print_json(&r)?;
                return Ok(ExitCode::SUCCESS);
            }
            println!("Run ID      = {}", r.run_id);
            println!("Name        = {}", r.name);
            println!("Experiment  = {} ({})", r.experiment_name, r.experiment_id);
            println!("Status      = {}", r.status);
            println!("Started     = {}", when(r.start_time_ms));
            println!("Ended       = {}", when(r.end_time_ms));
            if r.lifecycle_stage != "active" {
                println!("Lifecycle   = {}", r.lifecycle_stage);
            }
            for (title, rows) in [
                ("Params", r.params.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>()),
                ("Metrics (latest)", r.metrics.iter().map(|(k, v)| (k.clone(), v.to_string())).collect()),
                ("Tags", r.tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
            ] {
                if rows.is_empty() {
                    continue;
                }
                println!("\n{title}");
                let mut sorted = rows;
                sorted.sort();
                let mut t = Table::new(&["Key", "Value"]);
                for (k, v) in sorted {
                    t.row(vec![k, v]);
                }
                print!("{}", t.render());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_model(m: &TrackedModel) {
    println!("Name         = {}", m.name);
    if !m.description.is_empty() {
        println!("Description  = {}", m.description);
    }
    println!("Updated      = {}", when(m.last_updated_ms));
    let mut aliases: Vec<(&String, &u64)> = m.aliases.iter().collect();
    aliases.sort();
    println!("Aliases      = {}", aliases.iter().map(|(a, v)| format!("{a} -> {v}")).collect::<Vec<_>>().join(", "));
    if m.versions.is_empty() {
        return;
    }
    println!("\nVersions");
    let mut t = Table::new(&["Version", "Aliases", "Status", "Created", "Run ID", "Source"]);
    for v in &m.versions {
        let names: Vec<&str> = aliases.iter().filter(|(_, n)| **n == v.version).map(|(a, _)| a.as_str()).collect();
        t.row(vec![
            v.version.to_string(),
            names.join(","),
            v.status.clone(),
            when(v.creation_time_ms),
            short(&v.run_id).to_string(),
            v.source.clone(),
        ]);
    }
    print!("{}", t.render());
}

pub async fn model(addr: &str, cmd: ModelCommand) -> anyhow::Result<ExitCode> {
    let mut c = connect(addr).await?;
    match cmd {
        ModelCommand::List { filter, json, namespace } => {
            let resp = c.tracking.list_models(ListModelsRequest { filter, namespace }).await.map_err(status_err)?.into_inner();
            if json {
                print_json(&resp.models)?;
            } else if resp.models.is_empty() {
                println!("No registered models.");
            } else {
                let mut t = Table::new(&["Name", "Versions", "Latest", "Aliases", "Updated"]);
                for m in &resp.models {
                    let mut aliases: Vec<String> = m.aliases.iter().map(|(a, v)| format!("{a}->{v}")).collect();
                    aliases.sort();
                    t.row(vec![
                        m.name.clone(),
                        m.versions.len().to_string(),
                        m.versions.first().map(|v| v.version.to_string()).unwrap_or_default(),
                        aliases.join(","),
                        when(m.last_updated_ms),
                    ]);
                }
                print!("{}", t.render());
            }
        }
        ModelCommand::Show { name, json, namespace } => {
            let m = c.tracking.get_model(GetModelRequest { name, namespace }).await.map_err(status_err)?.into_inner();
            if json {
                print_json(&m)?;
            } else {
                print_model(&m);
            }
        }
        ModelCommand::Alias { name, alias, model_version: version, namespace } => {
            let m = c
                .tracking
                .set_model_alias(SetModelAliasRequest { name, alias: alias.clone(), version, namespace })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("==> Alias {alias:?} of model {:?} now points at version {version}", m.name);
        }
    }
    Ok(ExitCode::SUCCESS)
}
