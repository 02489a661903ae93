//! Server metrics: counters kept in atomics and rendered as Prometheus text at `/v1/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use mlp_proto::consts::alloc_client;

use crate::state::ClusterState;

/// Counters bumped on hot paths; gauges are computed from the state when scraped.
#[derive(Debug, Default)]
pub struct Metrics {
    pub job_registrations: AtomicU64,
    pub job_stops: AtomicU64,
    pub evals_processed: AtomicU64,
    pub evals_blocked: AtomicU64,
    pub plans_applied: AtomicU64,
    pub plan_placements_rejected: AtomicU64,
    pub placements: AtomicU64,
    pub schedule_micros_total: AtomicU64,
    pub node_heartbeats: AtomicU64,
    pub nodes_marked_down: AtomicU64,
    pub alloc_updates: AtomicU64,
    pub http_requests: AtomicU64,
    pub http_errors: AtomicU64,
    pub grpc_requests: AtomicU64,
    /// Reads that waited as blocking queries (`min_index` given).
    pub blocking_queries: AtomicU64,
    /// Event stream subscriptions opened, and those cut off for falling behind.
    pub event_subscriptions: AtomicU64,
    pub event_subscribers_cut: AtomicU64,
    /// Garbage collections that removed something, and what they removed (counted by the
    /// server that ran them: the leader's loop, or the server that took `mlp system gc`).
    pub gc_runs: AtomicU64,
    pub gc_evals_collected: AtomicU64,
    pub gc_allocs_collected: AtomicU64,
    pub gc_jobs_collected: AtomicU64,
    pub gc_nodes_collected: AtomicU64,
}

/// Raft figures that the metrics page shows.
#[derive(Debug, Clone, Copy, Default)]
pub struct RaftFigures {
    pub is_leader: bool,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Renders the Prometheus text exposition format.
    pub fn render(
        &self,
        state: &ClusterState,
        raft: RaftFigures,
        events: &crate::events::EventBroker,
        gpu_stats: &[(String, Vec<mlp_proto::v1::GpuStats>)],
    ) -> String {
        let mut out = String::with_capacity(4096);
        let counters: [(&str, &str, &AtomicU64); 22] = [
            ("mlp_job_registrations_total", "Job registrations committed.", &self.job_registrations),
            ("mlp_job_stops_total", "Job stops committed.", &self.job_stops),
            ("mlp_evals_processed_total", "Evaluations processed by the scheduler.", &self.evals_processed),
            ("mlp_evals_blocked_total", "Evaluations that ended blocked on capacity.", &self.evals_blocked),
            ("mlp_plans_applied_total", "Plans committed by the plan applier.", &self.plans_applied),
            ("mlp_plan_placements_rejected_total", "Placements the plan applier rejected.", &self.plan_placements_rejected),
            ("mlp_placements_total", "Allocations placed.", &self.placements),
            ("mlp_scheduler_micros_total", "Time spent computing plans, in microseconds.", &self.schedule_micros_total),
            ("mlp_node_heartbeats_total", "Node heartbeats received.", &self.node_heartbeats),
            ("mlp_nodes_marked_down_total", "Nodes marked down after missing their heartbeat TTL.", &self.nodes_marked_down),
            ("mlp_alloc_updates_total", "Allocation status updates from agents.", &self.alloc_updates),
            ("mlp_http_requests_total", "HTTP API requests.", &self.http_requests),
            ("mlp_http_errors_total", "HTTP API requests answered with an error.", &self.http_errors),
            ("mlp_grpc_requests_total", "gRPC API requests.", &self.grpc_requests),
            ("mlp_blocking_queries_total", "Reads that waited as blocking queries.", &self.blocking_queries),
            ("mlp_event_subscriptions_total", "Event stream subscriptions opened.", &self.event_subscriptions),
            ("mlp_event_subscribers_cut_total", "Event stream subscribers cut off for falling behind.", &self.event_subscribers_cut),
            ("mlp_gc_runs_total", "Garbage collections that removed something.", &self.gc_runs),
            ("mlp_gc_evals_collected_total", "Evaluations removed by garbage collection.", &self.gc_evals_collected),
            ("mlp_gc_allocs_collected_total", "Allocations removed by garbage collection.", &self.gc_allocs_collected),
            ("mlp_gc_jobs_collected_total", "Jobs removed by garbage collection.", &self.gc_jobs_collected),
            ("mlp_gc_nodes_collected_total", "Nodes removed by garbage collection.", &self.gc_nodes_collected),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", c.load(Ordering::Relaxed));
        }
        let gauges = [
            ("mlp_raft_is_leader", "1 if this server is the Raft leader.", u64::from(raft.is_leader)),
            ("mlp_raft_term", "Current Raft term.", raft.term),
            ("mlp_raft_commit_index", "Last committed Raft log index.", raft.commit_index),
            ("mlp_raft_applied_index", "Last applied Raft log index.", raft.applied_index),
            ("mlp_event_subscribers", "Open event stream subscriptions (and blocking queries waiting).", events.subscribers() as u64),
            ("mlp_event_buffer_events", "Events buffered for subscribers that resume.", events.buffered().1 as u64),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let mut by = std::collections::BTreeMap::<(&str, String), u64>::new();
        for j in state.jobs.values() {
            *by.entry(("mlp_jobs", j.status.clone())).or_default() += 1;
        }
        for n in state.nodes.values() {
            *by.entry(("mlp_nodes", n.status.clone())).or_default() += 1;
        }
        for a in state.allocs.values() {
            *by.entry(("mlp_allocations", a.client_status.clone())).or_default() += 1;
        }
        for e in state.evals.values() {
            *by.entry(("mlp_evaluations", e.status.clone())).or_default() += 1;
        }
        let mut last = "";
        for ((name, label), v) in &by {
            if *name != last {
                let _ = writeln!(out, "# HELP {name} Count by status.\n# TYPE {name} gauge");
                last = name;
            }
            let _ = writeln!(out, "{name}{{status=\"{}\"}} {v}", escape_label(label));
        }
        let live = state.allocs.values().filter(|a| !alloc_client::is_terminal(&a.client_status)).count();
        let _ = writeln!(
            out,
            "# HELP mlp_allocations_live Allocations not yet terminal.\n# TYPE mlp_allocations_live gauge\nmlp_allocations_live {live}"
        );
        render_task_usage(&mut out, state);
        render_gpus(&mut out, state, gpu_stats);
        render_quotas(&mut out, state);
        out
    }
}

// ---- namespace quotas (issue 15 §5) ----

/// Per namespace with a quota: what it holds and its limit, per dimension (`cpu_mhz`,
/// `memory_mib`, `gpu_milli`, `gpu_milli:MODEL`); a dimension without a limit has no limit
/// sample.
fn render_quotas(out: &mut String, state: &ClusterState) {
    use crate::scheduler::quota;
    let _ = writeln!(
        out,
        "# HELP mlp_namespace_quota_used What a namespace's live allocations hold, per quota dimension.\n# TYPE mlp_namespace_quota_used gauge\n\
         # HELP mlp_namespace_quota_limit A namespace's quota, per dimension.\n# TYPE mlp_namespace_quota_limit gauge"
    );
    for (name, ns) in &state.namespaces {
        let Some(q) = &ns.quota else { continue };
        let held = quota::Held::of(state, name, &std::collections::BTreeSet::new());
        let mut rows: Vec<(String, u64, Option<u64>)> = vec![
            ("cpu_mhz".into(), held.cpu_mhz, q.cpu_mhz),
            ("memory_mib".into(), held.memory_mib, q.memory_mib),
            ("gpu_milli".into(), held.gpu_milli, quota::gpu_limit(q)),
        ];
        for m in &q.gpu_models {
            rows.push((format!("gpu_milli:{}", m.model), held.gpu_milli_by_model.get(&m.model).copied().unwrap_or(0), m.gpu_milli));
        }
        for (dim, used, limit) in rows {
            let labels = format!("namespace=\"{}\",dimension=\"{}\"", escape_label(name), escape_label(&dim));
            let _ = writeln!(out, "mlp_namespace_quota_used{{{labels}}} {used}");
            if let Some(l) = limit {
                let _ = writeln!(out, "mlp_namespace_quota_limit{{{labels}}} {l}");
            }
        }
    }
}

// ---- GPUs (issue 12): devices from the replicated node list, measurements from heartbeats ----

/// Per device: health and model from the node's registration (every server has them), and
/// the measurements of the latest heartbeat this server received (the leader has them).
fn render_gpus(out: &mut String, state: &ClusterState, stats: &[(String, Vec<mlp_proto::v1::GpuStats>)]) {
    let name_of = |node_id: &str| state.nodes.get(node_id).map(|n| n.name.clone()).unwrap_or_default();
    let _ = writeln!(
        out,
        "# HELP mlp_gpu_healthy 1 while a node's GPU (or MIG instance) takes placements, 0 once NVML reported it unhealthy.\n# TYPE mlp_gpu_healthy gauge"
    );
    for n in state.nodes.values() {
        for d in n.resources.as_ref().map(|r| r.gpus.as_slice()).unwrap_or_default() {
            let _ = writeln!(
                out,
                "mlp_gpu_healthy{{node=\"{}\",node_name=\"{}\",gpu=\"{}\",model=\"{}\",simulated=\"{}\"}} {}",
                escape_label(&n.id),
                escape_label(&n.name),
                escape_label(&d.id),
                escape_label(&d.model),
                d.simulated,
                u8::from(!d.unhealthy)
            );
        }
    }
    type Pick = fn(&mlp_proto::v1::GpuStats) -> f64;
    let gauges: [(&str, &str, Pick); 7] = [
        ("mlp_gpu_utilization_percent", "GPU utilisation (SM busy), percent, as NVML last sampled it.", |g| {
            f64::from(g.utilization_percent)
        }),
        ("mlp_gpu_memory_used_bytes", "GPU memory in use.", |g| (g.memory_used_mib * 1024 * 1024) as f64),
        ("mlp_gpu_memory_total_bytes", "GPU memory.", |g| (g.memory_total_mib * 1024 * 1024) as f64),
        ("mlp_gpu_power_watts", "GPU power draw.", |g| f64::from(g.power_mw) / 1000.0),
        ("mlp_gpu_temperature_celsius", "GPU temperature.", |g| f64::from(g.temperature_c)),
        ("mlp_gpu_ecc_errors_corrected", "Corrected (single-bit) ECC errors since the driver loaded.", |g| g.ecc_corrected as f64),
        ("mlp_gpu_ecc_errors_uncorrected", "Uncorrected (double-bit) ECC errors since the driver loaded.", |g| g.ecc_uncorrected as f64),
    ];
    for (name, help, pick) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (node, devices) in stats {
            let node_name = name_of(node);
            for g in devices {
                let _ = writeln!(
                    out,
                    "{name}{{node=\"{}\",node_name=\"{}\",gpu=\"{}\"}} {}",
                    escape_label(node),
                    escape_label(&node_name),
                    escape_label(&g.id),
                    pick(g)
                );
            }
        }
    }
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

// ---- per-task resource usage (isolation: reported by agents from each task's cgroup) -------

/// Gauges of every running task's latest usage sample, labelled by allocation, job and task.
fn render_task_usage(out: &mut String, state: &ClusterState) {
    type Pick = fn(&mlp_proto::v1::TaskUsage) -> f64;
    let gauges: [(&str, &str, Pick); 8] = [
        ("mlp_task_cpu_percent", "CPU use of a running task, percent of one core.", |u| u.cpu_percent),
        ("mlp_task_gpu_utilization_percent", "GPU (SM) use of a running task's processes on its busiest GPU, percent.", |u| {
            f64::from(u.gpu_utilization_percent)
        }),
        ("mlp_task_gpu_memory_used_bytes", "GPU memory held by a running task's processes.", |u| {
            (u.gpu_memory_used_mib * 1024 * 1024) as f64
        }),
        ("mlp_task_cpu_throttled_seconds", "Time a running task was throttled by its CPU cap.", |u| u.cpu_throttled_ns as f64 / 1e9),
        ("mlp_task_memory_rss_bytes", "Resident memory of a running task.", |u| u.memory_rss_bytes as f64),
        ("mlp_task_memory_cache_bytes", "Page cache charged to a running task.", |u| u.memory_cache_bytes as f64),
        ("mlp_task_memory_max_usage_bytes", "Highest memory use of a running task.", |u| u.memory_max_usage_bytes as f64),
        ("mlp_task_pids", "Processes of a running task.", |u| u.pids as f64),
    ];
    for (name, help, pick) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for a in state.allocs.values() {
            for (task, ts) in &a.task_states {
                let Some(u) = ts.usage.as_ref().filter(|_| ts.state == "running") else { continue };
                let _ = writeln!(
                    out,
                    "{name}{{alloc_id=\"{}\",job=\"{}\",task=\"{}\"}} {}",
                    escape_label(&a.id),
                    escape_label(&a.job_id),
                    escape_label(task),
                    pick(u)
                );
            }
        }
    }
}

/// `render_quotas` for the scheduler's quota tests.
#[cfg(test)]
pub(crate) fn render_quotas_for_tests(out: &mut String, state: &ClusterState) {
    render_quotas(out, state);
}
