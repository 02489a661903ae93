//! `mlp service list` and `mlp service info NAME` (issue 13 §3).

use std::process::ExitCode;

use mlp_proto::v1::{GetServiceRequest, ListServicesRequest};

use crate::cli::ServiceCommand;
use crate::client::{connect, status_err};
use crate::output::{print_json, short, Table};

pub async fn service(addr: &str, cmd: ServiceCommand) -> anyhow::Result<ExitCode> {
    let mut c = connect(addr).await?;
    match cmd {
        ServiceCommand::List { namespace, json } => {
            let resp = c.services.list(ListServicesRequest { namespace, ..Default::default() }).await.map_err(status_err)?.into_inner();
            if json {
                print_json(&resp.services)?;
            } else if resp.services.is_empty() {
                println!("No services registered.");
            } else {
                let mut t = Table::new(&["Name", "Namespace", "Instances", "Passing", "Tags"]);
                for s in &resp.services {
                    t.row(vec![s.name.clone(), s.namespace.clone(), s.instances.to_string(), s.passing.to_string(), s.tags.join(",")]);
                }
                print!("{}", t.render());
            }
        }
        ServiceCommand::Info { name, namespace, passing, json } => {
            let req = GetServiceRequest { name: name.clone(), namespace: namespace.clone(), passing, ..Default::default() };
            let resp = c.services.get(req).await.map_err(status_err)?.into_inner();
            if json {
                print_json(&resp.instances)?;
                return Ok(ExitCode::SUCCESS);
            }
            let up = resp.instances.iter().filter(|r| r.health == mlp_proto::consts::service_health::PASSING).count();
            println!("Name       = {name}");
            println!("Namespace  = {namespace}");
            println!("DNS        = {name}{}.service.mlp", if namespace == "default" { String::new() } else { format!(".{namespace}") });
            println!("Instances  = {} ({up} passing)", resp.instances.len());
            if resp.instances.is_empty() {
                return Ok(ExitCode::SUCCESS);
            }
            println!();
            let mut t = Table::new(&["Alloc ID", "Node ID", "Task", "Address", "Tags", "Health", "Output"]);
            for r in &resp.instances {
                let addr = if r.port == 0 { r.address.clone() } else { format!("{}:{}", r.address, r.port) };
                let out: String = r.output.lines().next().unwrap_or("").chars().take(80).collect();
                t.row(vec![
                    short(&r.alloc_id).to_string(),
                    short(&r.node_id).to_string(),
                    if r.task.is_empty() { "(group)".into() } else { r.task.clone() },
                    addr,
                    r.tags.join(","),
                    r.health.clone(),
                    out,
                ]);
            }
            print!("{}", t.render());
        }
    }
    Ok(ExitCode::SUCCESS)
}
