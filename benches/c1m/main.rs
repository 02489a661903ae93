//! The C1M-shaped scheduling run (`cargo bench --bench c1m`): 5,000 simulated nodes, 1,000 jobs
//! × 1,000 small CPU/memory tasks, each job's evaluation planned by `scheduler::schedule`,
//! re-checked by the plan applier and applied through `StateHandle::apply`, the state machine's
//! own apply (no Raft log, fsync or agents: see `harness.rs`). Prints the wall time,
//! placements/s and the split between schedule, check and apply.
//!
//! Sizes and workers: `MLP_C1M_NODES`, `MLP_C1M_JOBS`, `MLP_C1M_TASKS`, `MLP_C1M_WORKERS`
//! (default 2, one per core of the reference machine). `MLP_BENCH_OUT=FILE` also writes the
//! results as JSON.

#[path = "../common/mod.rs"]
mod common;
mod harness;

use std::collections::BTreeMap;

use harness::Config;

fn main() {
    let d = Config::default();
    let cfg = Config {
        nodes: common::env_or("MLP_C1M_NODES", d.nodes),
        jobs: common::env_or("MLP_C1M_JOBS", d.jobs),
        tasks_per_job: common::env_or("MLP_C1M_TASKS", d.tasks_per_job as usize) as u32,
        workers: common::env_or("MLP_C1M_WORKERS", d.workers),
        ..d
    };
    eprintln!(
        "c1m: {} nodes, {} jobs × {} tasks ({} MHz / {} MiB each), {} workers",
        cfg.nodes, cfg.jobs, cfg.tasks_per_job, cfg.task_cpu_mhz, cfg.task_memory_mib, cfg.workers
    );
    common::main_with(async move {
        // The run is synchronous (its own threads); keep it off the runtime's workers.
        let report =
            tokio::task::spawn_blocking(move || harness::run(&cfg)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        let mut out = BTreeMap::new();
        out.insert("c1m_nodes".to_string(), cfg.nodes as f64);
        out.insert("c1m_jobs".to_string(), cfg.jobs as f64);
        out.insert("c1m_tasks_per_job".to_string(), f64::from(cfg.tasks_per_job));
        out.insert("c1m_workers".to_string(), cfg.workers as f64);
        out.insert("c1m_placements".to_string(), report.placements as f64);
        out.insert("c1m_wall_s".to_string(), report.wall.as_secs_f64());
        out.insert("c1m_placements_per_sec".to_string(), report.placements_per_sec());
        out.insert("c1m_schedule_s".to_string(), report.schedule.as_secs_f64());
        out.insert("c1m_check_s".to_string(), report.check.as_secs_f64());
        out.insert("c1m_apply_s".to_string(), report.apply.as_secs_f64());
        out.insert("c1m_setup_s".to_string(), report.setup.as_secs_f64());
        out.insert("c1m_evals_run".to_string(), report.evals_run as f64);
        out.insert("c1m_rejected_placements".to_string(), report.rejected as f64);
        out.insert("c1m_nodes_used".to_string(), report.nodes_used as f64);
        Ok(out)
    });
}
