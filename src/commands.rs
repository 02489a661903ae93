//! What each CLI verb does: talk to the server over gRPC, print tables or JSON.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;
use mlp_proto::consts::{alloc_client, eval_status};
use mlp_proto::jobspec;
use mlp_proto::v1::*;

use crate::cli::{AllocCommand, Cli, Command, EvalCommand, EventCommand, JobCommand, NodeCommand, ServerArgs, SystemCommand};
use crate::client::{connect, status_err, with_failover};
use crate::follow::desc;
use crate::output::{ago, clock, print_json, short, Table};

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let conn = cli.conn;
    // The daemons take their TLS identity from their flags; every other verb that talks to a
    // server, from the flags or MLP_CACERT / MLP_CLIENT_CERT / MLP_CLIENT_KEY.
    let talks_to_a_server = !matches!(
        cli.command,
        Command::Server(ServerArgs { action: None, .. })
            | Command::Agent(_)
            | Command::Dev(_)
            | Command::Tls(_)
            | Command::Sim(_)
            | Command::Completions { .. }
    );
    if talks_to_a_server {
        crate::tls::init_cli(&conn)?;
    }
    let addr = conn.address.clone();
    match cli.command {
        // ---- high availability (issue 5) ----
        Command::Server(ServerArgs { action: Some(action), .. }) => crate::ha::server_action(&addr, action).await,
        Command::Operator(c) => crate::ha::operator(&addr, c).await,
        // ---- end high availability ----
        Command::Server(a) => crate::daemon::server(a, &conn).await,
        Command::Agent(a) => crate::daemon::agent(a, &conn).await,
        Command::Dev(a) => crate::daemon::dev(a, &conn).await,
        Command::Tls(c) => crate::tls::command(c),
        Command::Job(c) => job(&addr, c).await,
        Command::Alloc(c) => alloc(&addr, c).await,
        Command::Node(c) => node(&addr, c).await,
        Command::Eval(c) => eval(&addr, c).await,
        Command::Deployment(c) => crate::deployments::deployment(&addr, c).await,
        Command::Service(c) => crate::services::service(&addr, c).await,
        Command::Run(c) => crate::tracking::run(&addr, c).await,
        Command::Model(c) => crate::tracking::model(&addr, c).await,
        Command::System(c) => system(&addr, c).await,
        Command::Acl(c) => crate::acl::acl(&addr, c).await,
        Command::Namespace(c) => crate::namespace::namespace(&addr, c).await,
        Command::Event(c) => event(&addr, c).await,
        Command::Sim(a) => crate::sim::run(&a),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "mlp", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load_job(file: &std::path::Path) -> anyhow::Result<Job> {
    jobspec::parse_file(file).map_err(|e| anyhow::anyhow!("{} has errors:\n{e}", file.display()))
}

async fn job(addr: &str, cmd: JobCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        JobCommand::Validate { file } => {
            let job = load_job(&file)?;
            println!("Job spec {} is valid: job {:?} ({}), {} group(s)", file.display(), job.name, job.r#type, job.groups.len());
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Run { file, detach, wait, json } => {
            let job = load_job(&file)?;
            let (mut c, resp) = crate::client::register_with_failover(
                addr,
                // One id for this registration and all its retries: applied at most once.
                RegisterJobRequest { job: Some(job.clone()), request_id: uuid::Uuid::new_v4().to_string() },
            )
            .await?;
            if json {
                print_json(&resp)?;
                return Ok(ExitCode::SUCCESS);
            }
            println!("==> Job {:?} registered (version {}), evaluation {}", job.name, resp.job_version, short(&resp.eval_id));
            if jobspec::jobtypes::is_parent(&job) {
                return crate::jobtypes::registered_parent(addr, &job).await;
            }
            if detach {
                println!("    Evaluation ID: {}", resp.eval_id);
                return Ok(ExitCode::SUCCESS);
            }
            let until = if wait { crate::follow::Until::Finished } else { crate::follow::Until::Started };
            crate::follow::job_run(&mut c, &job, &resp.eval_id, resp.job_version, resp.index, until).await
        }
        JobCommand::Plan { file, json } => {
            let job = load_job(&file)?;
            let req = PlanJobRequest { job: Some(job.clone()) };
            let (_, resp) = with_failover(addr, |mut c| {
                let req = req.clone();
                async move { c.jobs.plan(req).await.map(tonic::Response::into_inner) }
            })
            .await?;
            if json {
                print_json(&resp)?;
            } else {
                let change = match resp.diff_type.as_str() {
                    "added" => "+ new job".to_string(),
                    "edited" => format!("+/- edits job (version {} → {})", resp.current_version, resp.current_version + 1),
                    _ => "no change to the job spec".to_string(),
                };
                println!("Job {:?}: {change}", job.name);
                if resp.diff_type == "edited" {
                    let req = GetJobRequest { job_id: job.id.clone(), namespace: job.namespace.clone(), ..Default::default() };
                    let current = with_failover(addr, |mut c| {
                        let req = req.clone();
                        async move { c.jobs.get(req).await.map(tonic::Response::into_inner) }
                    })
                    .await
                    .ok()
                    .and_then(|(_, r)| r.job);
                    for line in current.map(|cur| crate::deployments::spec_diff(&cur, &job)).unwrap_or_default() {
                        println!("  {line}");
                    }
                }
                if resp.placements.is_empty() && resp.stops.is_empty() && resp.failed_tg_allocs.is_empty() {
                    println!("Scheduler dry-run: nothing to place or stop.");
                }
                for p in &resp.placements {
                    let pref = p.preference.map(|v| format!(", preference {v:+.2}")).unwrap_or_default();
                    println!("  + place {} on node {} ({}{pref})", p.alloc_name, p.node_name, short(&p.node_id));
                }
                for s in &resp.stops {
                    println!("  - stop allocation {}", short(s));
                }
                if !resp.failed_tg_allocs.is_empty() {
                    println!("Scheduler dry-run: WARNING: some allocations cannot be placed:");
                    for line in mlp_server::leader::explain_failures(&resp.failed_tg_allocs) {
                        println!("  {line}");
                    }
                } else if !resp.placements.is_empty() {
                    println!("Scheduler dry-run: all allocations placed.");
                }
            }
            Ok(if resp.failed_tg_allocs.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        JobCommand::Status { name: None, json, namespace, stale } => {
            let req = ListJobsRequest { namespace, stale, ..Default::default() };
            let (_, resp) = with_failover(addr, |mut c| {
                let req = req.clone();
                async move { c.jobs.list(req).await.map(tonic::Response::into_inner) }
            })
            .await?;
            if json {
                print_json(&resp.jobs)?;
            } else if resp.jobs.is_empty() {
                println!("No jobs.");
            } else {
                let mut t = Table::new(&["ID", "Type", "Priority", "Status", "Version", "Allocations", "Submitted"]);
                for j in &resp.jobs {
                    let counts: Vec<String> = j.alloc_counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    t.row(vec![
                        j.id.clone(),
                        j.r#type.clone(),
                        j.priority.to_string(),
                        j.status.clone(),
                        j.version.to_string(),
                        counts.join(","),
                        ago(j.submit_time_ms),
                    ]);
                }
                print!("{}", t.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Status { name: Some(name), json, namespace, stale } => {
            let req = GetJobRequest { job_id: name, namespace, stale, ..Default::default() };
            let (_, resp) = with_failover(addr, |mut c| {
                let req = req.clone();
                async move { c.jobs.get(req).await.map(tonic::Response::into_inner) }
            })
            .await?;
            if json {
                print_json(&resp)?;
            } else {
                print_job_status(&resp);
                if let Some(job) = resp.job.as_ref().filter(|j| jobspec::jobtypes::is_parent(j)) {
                    crate::jobtypes::print_children(addr, job).await?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Dispatch(a) => crate::jobtypes::dispatch(addr, a).await,
        JobCommand::Periodic(c) => crate::jobtypes::periodic(addr, c).await,
        JobCommand::Stop { name, purge, namespace, detach } => {
            let req = StopJobRequest { job_id: name.clone(), namespace: namespace.clone(), purge };
            // A purge takes the job away: its allocations are read before, to follow them.
            let before = if purge && !detach { crate::follow::before_stop(addr, &name, &namespace).await } else { None };
            let (mut c, resp) = with_failover(addr, |mut c| {
                let req = req.clone();
                async move { c.jobs.stop(req).await.map(tonic::Response::into_inner) }
            })
            .await?;
            println!("==> Job {name:?} stopped{}, evaluation {}", if purge { " and purged" } else { "" }, short(&resp.eval_id));
            if detach {
                return Ok(ExitCode::SUCCESS);
            }
            crate::follow::job_stopped(&mut c, &name, &namespace, &resp.eval_id, resp.index, before).await
        }
        JobCommand::Revert { name, to_version, enforce_prior_version, namespace } => {
            crate::deployments::revert(addr, name, to_version, enforce_prior_version, namespace).await
        }
        JobCommand::Restart { name, groups, namespace } => crate::deployments::restart(addr, name, groups, namespace).await,
        JobCommand::Scale { name, group, count, namespace } => crate::deployments::scale(addr, name, group, count, namespace).await,
        JobCommand::History { name, json, namespace } => {
            let req = GetJobRequest { job_id: name, namespace, ..Default::default() };
            let (_, resp) = with_failover(addr, |mut c| {
                let req = req.clone();
                async move { c.jobs.versions(req).await.map(tonic::Response::into_inner) }
            })
            .await?;
            if json {
                print_json(&resp.versions)?;
            } else {
                let mut t = Table::new(&["Version", "Stable", "Stop", "Submitted", "Groups"]);
                for v in &resp.versions {
                    let groups: Vec<String> = v.groups.iter().map(|g| format!("{}×{}", g.name, g.effective_count())).collect();
                    let stable = match v.revert_of {
                        Some(r) => format!("{} (revert of {r})", v.stable),
                        None => v.stable.to_string(),
                    };
                    t.row(vec![v.version.to_string(), stable, v.stop.to_string(), ago(v.submit_time_ms), groups.join(", ")]);
                }
                print!("{}", t.render());
                // Newest first: each version against the one before it.
                for pair in resp.versions.windows(2) {
                    let (new, old) = (&pair[0], &pair[1]);
                    println!("\nVersion {} (from {}):", new.version, old.version);
                    let diff = crate::deployments::spec_diff(old, new);
                    if diff.is_empty() {
                        println!("  no change to the spec");
                    }
                    for line in diff {
                        println!("  {line}");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_job_status(resp: &GetJobResponse) {
    let Some(job) = &resp.job else { return };
    let mut t = Table::new(&["", ""]);
    t.row(vec!["ID".into(), job.id.clone()]);
    t.row(vec!["Namespace".into(), job.namespace.clone()]);
    t.row(vec!["Type".into(), job.r#type.clone()]);
    t.row(vec!["Priority".into(), job.priority.to_string()]);
    t.row(vec!["Status".into(), format!("{}{}", job.status, if job.stop { " (stopped)" } else { "" })]);
    t.row(vec!["Version".into(), job.version.to_string()]);
    t.row(vec!["Submitted".into(), ago(job.submit_time_ms)]);
    let rendered = t.render();
    for line in rendered.lines().skip(1) {
        println!("{line}");
    }
    println!("\nTask Groups");
    let mut t = Table::new(&["Name", "Count", "Tasks", "Pending", "Running", "Complete", "Failed", "Lost"]);
    for g in &job.groups {
        let count = |s: &str| resp.allocations.iter().filter(|a| a.task_group == g.name && a.client_status == s).count().to_string();
        let tasks: Vec<&str> = g.tasks.iter().map(|t| t.name.as_str()).collect();
        t.row(vec![
            g.name.clone(),
            g.effective_count().to_string(),
            tasks.join(","),
            count(alloc_client::PENDING),
            count(alloc_client::RUNNING),
            count(alloc_client::COMPLETE),
            count(alloc_client::FAILED),
            count(alloc_client::LOST),
        ]);
    }
    print!("{}", t.render());
    if let Some(e) = resp.evaluations.iter().rev().find(|e| e.status == eval_status::BLOCKED) {
        println!("\nPlacement Failure (evaluation {} blocked)", short(&e.id));
        for line in mlp_server::leader::explain_failures(&e.failed_tg_allocs) {
            println!("  {line}");
        }
    }
    if let Some(d) = &resp.latest_deployment {
        println!("\nLatest Deployment");
        println!("  ID          = {}", short(&d.id));
        println!("  Version     = {}", d.job_version);
        println!("  Status      = {}", d.status);
        println!("  Description = {}", d.status_description);
        for (name, g) in &d.groups {
            let canaries = if g.desired_canaries > 0 {
                format!(", canaries {} ({})", g.desired_canaries, if g.promoted { "promoted" } else { "not promoted" })
            } else {
                String::new()
            };
            println!(
                "  {name}: {} desired, {} placed, {} healthy, {} unhealthy{canaries}",
                g.desired_total, g.placed_allocs, g.healthy_allocs, g.unhealthy_allocs
            );
        }
    }
    let extra = crate::output::job_preemption_and_gang_lines(&resp.evaluations, &resp.allocations);
    if !extra.is_empty() {
        println!("\nPreemption and Gangs");
        for line in extra {
            println!("  {line}");
        }
    }
    println!("\nAllocations");
    if resp.allocations.is_empty() {
        println!("No allocations.");
        return;
    }
    let mut t = Table::new(&["ID", "Node", "Group", "Version", "Desired", "Status", "Restarts", "Modified"]);
    for a in &resp.allocations {
        let restarts: u32 = a.task_states.values().map(|s| s.restarts).sum();
        t.row(vec![
            short(&a.id).to_string(),
            short(&a.node_id).to_string(),
            a.task_group.clone(),
            a.job_version.to_string(),
            a.desired_status.clone(),
            a.client_status.clone(),
            restarts.to_string(),
            ago(a.modify_time_ms),
        ]);
    }
    print!("{}", t.render());
    // Rescheduling: why a failed or lost allocation is not (yet) replaced.
    for a in resp.allocations.iter().filter(|a| !a.reschedule_description.is_empty() && a.next_allocation.is_empty()) {
        println!("  {}: {}", short(&a.id), a.reschedule_description);
    }
}

async fn alloc(addr: &str, cmd: AllocCommand) -> anyhow::Result<ExitCode> {
    let mut c = connect(addr).await?;
    match cmd {
        AllocCommand::Status { id, json } => {
            let a = c.allocs.get(GetAllocRequest { alloc_id: id, ..Default::default() }).await.map_err(status_err)?.into_inner().allocation;
            let a = a.context("server returned no allocation")?;
            if json {
                print_json(&a)?;
                return Ok(ExitCode::SUCCESS);
            }
            println!("ID                  = {}", a.id);
            println!("Name                = {}", a.name);
            println!("Node                = {} ({})", a.node_name, a.node_id);
            println!("Job                 = {} (version {})", a.job_id, a.job_version);
            println!("Desired Status      = {}{}", a.desired_status, desc(&a.desired_description));
            println!("Client Status       = {}{}", a.client_status, desc(&a.client_description));
            if let Some(r) = &a.resources {
                println!("Resources           = cpu {} MHz, memory {} MiB", r.cpu_mhz, r.memory_mib);
                if let Some(gpus) = alloc_gpus(r) {
                    println!("GPUs                = {gpus}");
                }
                if !r.ports.is_empty() {
                    let ports: Vec<String> = r.ports.iter().map(|p| format!("{} {} -> {}", p.label, p.host_port, p.to)).collect();
                    println!("Ports               = {}", ports.join(", "));
                }
            }
            if let Some(rv) = &a.rendezvous {
                println!("Gang Rank           = {} of {} (leader {}:{})", rv.rank, rv.size, rv.leader_ip, rv.leader_port);
            }
            println!("Created             = {}", ago(a.create_time_ms));
            for line in crate::output::preemption_lines(&a) {
                println!("{line}");
            }
            if !a.previous_allocation.is_empty() {
                println!("Replaces            = {}", a.previous_allocation);
            }
            if !a.next_allocation.is_empty() {
                println!("Replaced by         = {}", a.next_allocation);
            }
            if let Some(t) = &a.reschedule_tracker {
                if !t.events.is_empty() {
                    println!("Reschedules         = {}", t.events.len());
                }
            }
            if !a.reschedule_description.is_empty() {
                println!("Reschedule          = {}", a.reschedule_description);
            }
            for (name, ts) in &a.task_states {
                println!(
                    "\nTask {name:?} is {:?}{}{} (restarts {}{})",
                    ts.state,
                    if ts.failed { ", failed" } else { "" },
                    ts.exit_code.map(|c| format!(", exit code {c}")).unwrap_or_default(),
                    ts.restarts,
                    if ts.pid > 0 { format!(", pid {}", ts.pid) } else { String::new() }
                );
                print_task_usage(ts, a.resources.as_ref().is_some_and(|r| !r.gpus.is_empty() || !r.gpu_ids.is_empty()));
                let mut t = Table::new(&["Time", "Type", "Description"]);
                for e in ts.events.iter().rev() {
                    t.row(vec![clock(e.time_ms), e.r#type.clone(), e.message.clone()]);
                }
                print!("{}", t.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        AllocCommand::Logs { id, task, follow, stderr, tail } => {
            let req =
                LogsRequest { alloc_id: id, task: task.unwrap_or_default(), stderr, follow, offset: 0, tail_bytes: tail.unwrap_or(0) };
            let mut stream = c.allocs.logs(req).await.map_err(status_err)?.into_inner();
            let mut out = std::io::stdout();
            while let Some(chunk) = stream.message().await.map_err(status_err)? {
                out.write_all(&chunk.data)?;
                out.flush()?;
            }
            Ok(ExitCode::SUCCESS)
        }
        AllocCommand::Exec { tty, interactive, task, id, command } => {
            crate::client::exec(&mut c, crate::client::ExecArgs { alloc_id: id, task: task.unwrap_or_default(), command, tty, interactive })
                .await
        }
    }
}

/// An allocation's GPUs for `alloc status`: "sim-gpu-0 (whole), sim-gpu-1 (0.500)", a MIG
/// instance with its profile, then the locality of multi-GPU asks; None without GPUs.
/// Allocations from before GPU shares carry only `gpu_ids` (whole devices).
fn alloc_gpus(r: &AllocatedResources) -> Option<String> {
    let share = |milli: u32| if milli >= 1000 { "whole".to_string() } else { format!("{:.3}", f64::from(milli) / 1000.0) };
    let parts: Vec<String> = if r.gpus.is_empty() {
        r.gpu_ids.iter().map(|id| format!("{id} ({})", share(1000))).collect()
    } else {
        r.gpus
            .iter()
            .map(|g| match r.gpu_mig.get(&g.id) {
                Some(profile) => format!("{} (MIG {profile})", g.id),
                None => format!("{} ({})", g.id, share(g.milli)),
            })
            .collect()
    };
    if parts.is_empty() {
        return None;
    }
    let locality = if r.gpu_locality.is_empty() { String::new() } else { format!("; locality {}", r.gpu_locality) };
    Some(format!("{}{locality}", parts.join(", ")))
}

/// A node's GPU devices for `node status ID`: one row per device (a MIG instance names its
/// profile and parent GPU).
fn gpu_table(gpus: &[GpuDevice]) -> String {
    let mut t = Table::new(&["ID", "Model", "Memory", "MIG", "NVLink peers", "PCIe switch", "NUMA", "Kind", "Health"]);
    for g in gpus {
        t.row(vec![
            g.id.clone(),
            g.model.clone(),
            format!("{} MiB", g.memory_mib),
            if g.mig_profile.is_empty() { "-".into() } else { format!("{} of {}", g.mig_profile, g.parent_id) },
            if g.nvlink_peers.is_empty() { "-".into() } else { g.nvlink_peers.join(",") },
            if g.pci_switch.is_empty() { "-".into() } else { g.pci_switch.clone() },
            g.numa_node.map_or_else(|| "-".into(), |n| n.to_string()),
            if g.simulated { "(simulated)".into() } else { "physical".into() },
            if g.unhealthy { format!("unhealthy: {}", g.health) } else { "healthy".into() },
        ]);
    }
    t.render()
}

/// The latest GPU measurements a node's heartbeats carried.
fn gpu_stats_table(stats: &[mlp_proto::v1::GpuStats]) -> String {
    let mut t = Table::new(&["ID", "Util", "Memory used", "Power", "Temp", "ECC corr/uncorr", "Sampled"]);
    for g in stats {
        t.row(vec![
            g.id.clone(),
            format!("{}%", g.utilization_percent),
            format!("{} / {} MiB", g.memory_used_mib, g.memory_total_mib),
            format!("{:.0} W", f64::from(g.power_mw) / 1000.0),
            format!("{} C", g.temperature_c),
            format!("{}/{}", g.ecc_corrected, g.ecc_uncorrected),
            ago(g.sampled_at_ms),
        ]);
    }
    t.render()
}

async fn node(addr: &str, cmd: NodeCommand) -> anyhow::Result<ExitCode> {
    let mut c = connect(addr).await?;
    match cmd {
        NodeCommand::Status { id: None, json } => {
            let nodes = c.nodes.list(ListNodesRequest::default()).await.map_err(status_err)?.into_inner().nodes;
            if json {
                print_json(&nodes)?;
            } else if nodes.is_empty() {
                println!("No nodes registered.");
            } else {
                let mut t = Table::new(&["ID", "Name", "DC", "Pool", "Drivers", "Drain", "Eligibility", "Status"]);
                for n in &nodes {
                    t.row(vec![
                        short(&n.id).to_string(),
                        n.name.clone(),
                        n.datacenter.clone(),
                        n.node_pool.clone(),
                        n.drivers.join(","),
                        n.drain_strategy.is_some().to_string(),
                        if n.eligible { "eligible".into() } else { "ineligible".into() },
                        n.status.clone(),
                    ]);
                }
                print!("{}", t.render());
            }
        }
        NodeCommand::Status { id: Some(id), json } => {
            let resp = c.nodes.get(GetNodeRequest { node_id: id, ..Default::default() }).await.map_err(status_err)?.into_inner();
            if json {
                print_json(&resp)?;
                return Ok(ExitCode::SUCCESS);
            }
            let n = resp.node.context("server returned no node")?;
            println!("ID          = {}", n.id);
            println!("Name        = {}", n.name);
            println!("Datacenter  = {}", n.datacenter);
            println!("Status      = {}{}", n.status, desc(&n.status_description));
            println!("Eligibility = {}", if n.eligible { "eligible" } else { "ineligible" });
            match &n.drain_strategy {
                Some(d) if d.force_deadline_ms > 0 => {
                    println!("Drain       = draining since {}, deadline {}", ago(d.started_at_ms), clock(d.force_deadline_ms))
                }
                Some(d) => println!("Drain       = draining since {}, no deadline", ago(d.started_at_ms)),
                None => println!("Drain       = false"),
            }
            println!("Drivers     = {}", n.drivers.join(", "));
            println!("Address     = {}", n.rpc_addr);
            match n.overlay.as_ref().filter(|o| !o.subnet.is_empty()) {
                Some(o) if o.vtep_addr.is_empty() => println!("Subnet      = {} (not on the overlay: no reachable VTEP address)", o.subnet),
                Some(o) => println!("Subnet      = {} (overlay VTEP {})", o.subnet, o.vtep_addr),
                None => println!("Subnet      = none (the overlay is off)"),
            }
            println!("Heartbeat   = {}", ago(n.last_heartbeat_ms));
            if let Some(r) = &n.resources {
                println!(
                    "Resources   = {} cores × {} MHz = {} MHz, {} MiB memory, {} MiB disk, {} GPU devices",
                    r.cpu_cores,
                    r.cpu_mhz_per_core,
                    r.cpu_total_mhz,
                    r.memory_mib,
                    r.disk_mib,
                    r.gpus.len()
                );
                if !r.gpus.is_empty() {
                    println!("\nGPUs");
                    print!("{}", gpu_table(&r.gpus));
                }
            }
            if let Some(why) = n.attributes.get("gpu.unavailable") {
                println!("GPUs        = none: {why}");
            }
            if !resp.gpu_stats.is_empty() {
                println!("\nGPU usage");
                print!("{}", gpu_stats_table(&resp.gpu_stats));
            }
            println!("\nAttributes");
            for (k, v) in &n.attributes {
                println!("  {k} = {v}");
            }
            if !n.events.is_empty() {
                println!("\nEvents");
                let mut t = Table::new(&["Time", "Subsystem", "Message"]);
                for e in n.events.iter().rev() {
                    t.row(vec![clock(e.time_ms), e.subsystem.clone(), e.message.clone()]);
                }
                print!("{}", t.render());
            }
            println!("\nAllocations");
            let mut t = Table::new(&["ID", "Job", "Group", "Desired", "Status"]);
            for a in &resp.allocations {
                t.row(vec![
                    short(&a.id).to_string(),
                    a.job_id.clone(),
                    a.task_group.clone(),
                    a.desired_status.clone(),
                    a.client_status.clone(),
                ]);
            }
            print!("{}", t.render());
        }
        NodeCommand::Drain { id, enable: _, disable, deadline, ignore_system, detach } => {
            let deadline_ms = if deadline.trim() == "0" {
                0
            } else {
                jobspec::parse_duration(&deadline).map_err(|e| anyhow::anyhow!("--deadline: {e}"))?.as_millis() as u64
            };
            let resp = c
                .nodes
                .update_drain(NodeDrainRequest { node_id: id, enable: !disable, deadline_ms, ignore_system })
                .await
                .map_err(status_err)?
                .into_inner();
            if disable {
                println!("Node {} drain cancelled; it is eligible again.", resp.node_id);
                return Ok(ExitCode::SUCCESS);
            }
            println!("Node {} is draining (ineligible for new placements).", resp.node_id);
            if detach {
                return Ok(ExitCode::SUCCESS);
            }
            return drain_monitor(&mut c, &resp.node_id).await;
        }
        NodeCommand::Eligibility { id, enable, disable: _ } => {
            let resp = c
                .nodes
                .update_eligibility(NodeEligibilityRequest { node_id: id, eligible: enable })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("Node {} is {} for scheduling.", resp.node_id, if enable { "eligible" } else { "ineligible" });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Follows a drain until it completes (or is cancelled), printing each allocation that moves.
async fn drain_monitor(c: &mut crate::client::Clients, node_id: &str) -> anyhow::Result<ExitCode> {
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut index = 0;
    loop {
        // A blocking query: answers at once the first time, then when the node or one of its
        // allocations changes after `index`.
        let req = GetNodeRequest { node_id: node_id.to_string(), min_index: index, wait_ms: 60_000 };
        let resp = c.nodes.get(req).await.map_err(status_err)?.into_inner();
        index = resp.index;
        let node = resp.node.context("server returned no node")?;
        for a in &resp.allocations {
            if a.desired_status == mlp_proto::consts::alloc_desired::STOP && seen.insert(a.id.clone()) && a.desired_migrate {
                println!("    {}: allocation {} ({}) migrating", clock(a.modify_time_ms), short(&a.id), a.name);
            }
        }
        if node.drain_strategy.is_none() {
            let last = node.events.last().map(|e| e.message.clone()).unwrap_or_default();
            println!("Node {node_id}: {last}.");
            return Ok(ExitCode::SUCCESS);
        }
    }
}

async fn eval(addr: &str, cmd: EvalCommand) -> anyhow::Result<ExitCode> {
    let mut c = connect(addr).await?;
    let EvalCommand::Status { id, json } = cmd;
    match id {
        None => {
            let evals = c.evals.list(ListEvalsRequest::default()).await.map_err(status_err)?.into_inner().evaluations;
            if json {
                print_json(&evals)?;
            } else {
                let mut t = Table::new(&["ID", "Job", "Triggered By", "Status", "Placement Failures"]);
                for e in &evals {
                    t.row(vec![
                        short(&e.id).to_string(),
                        e.job_id.clone(),
                        e.triggered_by.clone(),
                        e.status.clone(),
                        (!e.failed_tg_allocs.is_empty()).to_string(),
                    ]);
                }
                print!("{}", t.render());
            }
        }
        Some(id) => {
            let e = c.evals.get(GetEvalRequest { eval_id: id, ..Default::default() }).await.map_err(status_err)?.into_inner().evaluation;
            let e = e.context("server returned no evaluation")?;
            if json {
                print_json(&e)?;
            } else {
                println!("ID           = {}", e.id);
                println!("Job          = {}", e.job_id);
                println!("Triggered By = {}", e.triggered_by);
                println!("Status       = {}{}", e.status, desc(&e.status_description));
                for line in mlp_server::leader::explain_failures(&e.failed_tg_allocs) {
                    println!("{line}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `mlp system gc`: collect now, print what went.
async fn system(addr: &str, cmd: SystemCommand) -> anyhow::Result<ExitCode> {
    let mut c = connect(addr).await?;
    let SystemCommand::Gc { json } = cmd;
    let r = c.system.garbage_collect(mlp_proto::v1::SystemGcRequest {}).await.map_err(status_err)?.into_inner();
    if json {
        print_json(&r)?;
    } else if r.evals + r.allocs + r.jobs + r.nodes == 0 {
        println!("Nothing to collect.");
    } else {
        println!("Garbage collected: {} jobs, {} evaluations, {} allocations, {} nodes.", r.jobs, r.evals, r.allocs, r.nodes);
    }
    Ok(ExitCode::SUCCESS)
}

// ---- task resource usage (isolation: sampled from the task's cgroup by the agent) ----------

/// One line of a running task's latest resource usage, when the agent reported one.
fn print_task_usage(ts: &mlp_proto::v1::TaskState, gpus: bool) {
    let Some(u) = ts.usage.as_ref().filter(|_| ts.state == "running") else { return };
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "Usage: cpu {:.1}% (throttled {:.1}s), memory rss {:.1} MiB, cache {:.1} MiB, max {:.1} MiB, pids {}",
        u.cpu_percent,
        u.cpu_throttled_ns as f64 / 1e9,
        mib(u.memory_rss_bytes),
        mib(u.memory_cache_bytes),
        mib(u.memory_max_usage_bytes),
        u.pids
    );
    if gpus {
        println!("GPU usage: {}% (its processes, busiest device), {} MiB device memory", u.gpu_utilization_percent, u.gpu_memory_used_mib);
    }
}

async fn event(addr: &str, cmd: EventCommand) -> anyhow::Result<ExitCode> {
    let EventCommand::Stream { topics, namespace, index } = cmd;
    let c = connect(addr).await?;
    let pairs: Vec<(String, String)> = topics
        .iter()
        .map(|t| match t.split_once(':') {
            Some((topic, key)) => (topic.to_string(), key.to_string()),
            None => (t.clone(), String::new()),
        })
        .collect();
    let refs: Vec<(&str, &str)> = pairs.iter().map(|(t, k)| (t.as_str(), k.as_str())).collect();
    let mut f = crate::follow::Follower::new(&c, &refs, &namespace, index);
    let mut out = std::io::stdout().lock();
    loop {
        match f.next().await? {
            crate::follow::Next::Batch(b) => {
                serde_json::to_writer(&mut out, &b)?;
                writeln!(out)?;
                out.flush()?;
            }
            crate::follow::Next::Resync => {
                anyhow::bail!(
                    "the server no longer has the events after index {index} (or its state was replaced); start again without --index"
                )
            }
        }
    }
}
