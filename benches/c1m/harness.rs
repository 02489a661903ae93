//! A synthetic C1M-shaped scheduling run (Nomad's "million container challenge" shape): many
//! simulated nodes, many jobs of many small CPU/memory tasks, every job's evaluation planned by
//! `scheduler::schedule`, re-checked by the plan applier (`plan_apply::check_plan`, with the
//! placements of plans still being committed, as the leader does) and applied through
//! `StateHandle::apply`, the very call the Raft state machine makes for every committed entry.
//!
//! What is left out: Raft itself (no log append, fsync or replication; `benches/placement.rs`
//! measures that path on a real server) and agents (nodes are registered with `UpsertNode`
//! and never run anything). Planning runs on `workers` threads like the leader's workers;
//! commits are serialized like Raft's apply.
//!
//! Built only from `mlp_server`'s public API. `benches/c1m/main.rs` runs it at full size;
//! `tests/c1m.rs` runs it small.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mlp_proto::consts::{eval_status, eval_trigger, job_type, node_status};
use mlp_proto::v1::{Allocation, Evaluation, Job, Node, NodeResources, Resources, Task, TaskGroup};

use mlp_server::leader::now_ms;
use mlp_server::plan_apply::{self, Checked};
use mlp_server::scheduler;
use mlp_server::scheduler::resources::is_live;
use mlp_server::state::{derived_id, Command, PlanResult, Request, StateHandle};

/// The shape of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub nodes: usize,
    pub jobs: usize,
    pub tasks_per_job: u32,
    /// Threads planning evaluations at once (the leader has 4).
    pub workers: usize,
    pub node_cpu_mhz: u64,
    pub node_memory_mib: u64,
    pub task_cpu_mhz: u64,
    pub task_memory_mib: u64,
}

impl Default for Config {
    /// The full C1M shape: 5,000 nodes of 32 cores (64,000 MHz) and 256 GiB, 1,000 jobs of 1,000
    /// tasks of 100 MHz and 128 MiB (room for 640 per node, 3.2 M in all).
    fn default() -> Self {
        Config {
            nodes: 5000,
            jobs: 1000,
            tasks_per_job: 1000,
            workers: 2,
            node_cpu_mhz: 64_000,
            node_memory_mib: 256 * 1024,
            task_cpu_mhz: 100,
            task_memory_mib: 128,
        }
    }
}

/// What a run measured. Durations of the three phases are summed over the worker threads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub placements: u64,
    /// From the first evaluation picked to the last plan applied.
    pub wall: Duration,
    /// `scheduler::schedule` (under the state's read lock).
    pub schedule: Duration,
    /// The plan applier's re-check (`plan_apply::check_plan`).
    pub check: Duration,
    /// `StateHandle::apply` of the `ApplyPlan` commands.
    pub apply: Duration,
    /// Registering the nodes and jobs (not part of `wall`).
    pub setup: Duration,
    pub evals_run: u64,
    /// Placements the plan applier rejected (their evaluations were retried).
    pub rejected: u64,
    /// Nodes holding at least one allocation at the end.
    pub nodes_used: usize,
}

impl Report {
    pub fn placements_per_sec(&self) -> f64 {
        self.placements as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// A run that did not end with every task placed on a node that holds it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum C1mError {
    #[error("invalid C1M configuration: {0}")]
    Config(String),
    #[error("applying {what} failed: {why}")]
    Apply { what: String, why: String },
    #[error("{placed} of {wanted} tasks placed; job {job}: {why}")]
    Unplaced { placed: u64, wanted: u64, job: String, why: String },
    #[error("node {node} is overcommitted: {why}")]
    Overcommitted { node: String, why: String },
}

/// The shared pieces of one run.
struct Run {
    state: Arc<StateHandle>,
    /// The last applied index; held while applying, so commits are serialized like Raft's.
    index: Mutex<u64>,
    queue: Mutex<VecDeque<String>>,
    /// Evaluations being planned or committed.
    busy: AtomicUsize,
    in_flight: Mutex<BTreeMap<String, Allocation>>,
    schedule_ns: AtomicU64,
    check_ns: AtomicU64,
    apply_ns: AtomicU64,
    evals_run: AtomicU64,
    rejected: AtomicU64,
    error: Mutex<Option<C1mError>>,
}

impl Run {
    fn commit(&self, what: &str, command: Command) -> Result<(), C1mError> {
        let mut index = lock(&self.index);
        *index += 1;
        let resp = self.state.apply(*index, &Request { now_ms: now_ms(), command });
        match resp.error {
            None => Ok(()),
            Some(why) => Err(C1mError::Apply { what: what.to_string(), why }),
        }
    }

    fn fail(&self, e: C1mError) {
        let mut slot = lock(&self.error);
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    fn failed(&self) -> bool {
        lock(&self.error).is_some()
    }

    /// A worker: evaluations from the queue until it is empty and nothing is being planned.
    fn work(&self) {
        loop {
            if self.failed() {
                return;
            }
            let next = {
                let mut q = lock(&self.queue);
                let id = q.pop_front();
                if id.is_some() {
                    self.busy.fetch_add(1, Ordering::SeqCst);
                }
                id
            };
            match next {
                Some(id) => {
                    let result = self.eval(&id);
                    self.busy.fetch_sub(1, Ordering::SeqCst);
                    if let Err(e) = result {
                        self.fail(e);
                        return;
                    }
                }
                // A retried evaluation may still be pushed back by a busy worker.
                None if self.busy.load(Ordering::SeqCst) > 0 => std::thread::sleep(Duration::from_micros(200)),
                None => return,
            }
        }
    }

    /// One evaluation, as the leader's `run_eval` does it: plan on a snapshot, re-check against
    /// the latest state plus the plans in flight, commit what fits; retry when placements were
    /// rejected.
    fn eval(&self, eval_id: &str) -> Result<(), C1mError> {
        let started = Instant::now();
        let (mut eval, mut plan) = {
            let st = self.state.read();
            let Some(eval) = st.evals.get(eval_id).cloned() else {
                return Ok(());
            };
            let job = st.job(&eval.namespace, &eval.job_id).cloned();
            let plan = scheduler::schedule(&st, job.as_ref(), &eval, now_ms());
            (eval, plan)
        };
        let checking = Instant::now();
        add(&self.schedule_ns, checking - started);
        let (failed, queued) = (std::mem::take(&mut plan.failed_tg_allocs), std::mem::take(&mut plan.queued_allocations));
        let (new_evals, annotations) = (std::mem::take(&mut plan.new_evals), std::mem::take(&mut plan.annotations));
        let Checked { accepted, stops, preemptions, rejected } = {
            let mut in_flight = lock(&self.in_flight);
            let st = self.state.read();
            let checked = plan_apply::check_plan(&st, plan, &in_flight);
            for a in &checked.accepted {
                in_flight.insert(a.id.clone(), a.clone());
            }
            checked
        };
        let applying = Instant::now();
        add(&self.check_ns, applying - checking);
        self.evals_run.fetch_add(1, Ordering::Relaxed);

        let unplaced: u32 = queued.values().sum();
        if rejected > 0 {
            self.rejected.fetch_add(rejected as u64, Ordering::Relaxed);
            eval.status = eval_status::PENDING.to_string();
            eval.status_description = format!("{rejected} placements conflicted with newer state; retrying");
        } else if unplaced > 0 {
            // Never expected in this run; the check after the run reports it.
            eval.status = eval_status::BLOCKED.to_string();
            eval.status_description = format!("{unplaced} allocations wait for capacity");
            eval.queued_allocations = queued;
            eval.failed_tg_allocs = failed;
        } else {
            eval.status = eval_status::COMPLETE.to_string();
            eval.queued_allocations = queued;
        }
        let retry = rejected > 0;
        let committed: Vec<String> = accepted.iter().map(|a| a.id.clone()).collect();
        // The c1m jobs are batch jobs: no deployments.
        let command = Command::ApplyPlan(PlanResult {
            eval: Some(eval),
            placements: accepted,
            stops,
            new_evals,
            annotations,
            preemptions,
            deployment: None,
            cancel_deployments: Vec::new(),
        });
        let result = self.commit("a plan", command);
        {
            let mut in_flight = lock(&self.in_flight);
            for id in &committed {
                in_flight.remove(id);
            }
        }
        add(&self.apply_ns, applying.elapsed());
        result?;
        if retry {
            lock(&self.queue).push_back(eval_id.to_string());
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn add(counter: &AtomicU64, d: Duration) {
    counter.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
}

/// Node `i` of a run (ids derived, so runs are repeatable).
pub fn node(cfg: &Config, i: usize) -> Node {
    Node {
        id: derived_id(&format!("c1m-node-{i}")),
        name: format!("c1m-{i:05}"),
        datacenter: "dc1".into(),
        node_pool: "default".into(),
        status: node_status::READY.into(),
        drivers: vec!["exec".into()],
        attributes: [("kernel.name".to_string(), "linux".to_string())].into_iter().collect(),
        resources: Some(NodeResources {
            cpu_cores: 32,
            cpu_total_mhz: cfg.node_cpu_mhz,
            memory_mib: cfg.node_memory_mib,
            disk_mib: 1 << 20,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Job `j` of a run: one group of `tasks_per_job` one-task allocations.
pub fn job(cfg: &Config, j: usize) -> Job {
    Job {
        id: format!("c1m-{j:05}"),
        name: format!("c1m-{j:05}"),
        namespace: "default".into(),
        r#type: job_type::BATCH.into(),
        priority: 50,
        groups: vec![TaskGroup {
            name: "g".into(),
            count: Some(cfg.tasks_per_job),
            tasks: vec![Task {
                name: "t".into(),
                driver: "exec".into(),
                resources: Some(Resources { cpu_mhz: cfg.task_cpu_mhz, memory_mib: cfg.task_memory_mib, ..Default::default() }),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Runs the C1M shape `cfg` and checks the outcome: every task placed once, no node holding
/// more than its capacity.
pub fn run(cfg: &Config) -> Result<Report, C1mError> {
    let wanted = cfg.jobs as u64 * u64::from(cfg.tasks_per_job);
    let room = cfg
        .node_cpu_mhz
        .checked_div(cfg.task_cpu_mhz)
        .unwrap_or(u64::MAX)
        .min(cfg.node_memory_mib.checked_div(cfg.task_memory_mib).unwrap_or(u64::MAX));
    if cfg.workers == 0 || cfg.nodes == 0 {
        return Err(C1mError::Config("nodes and workers must be at least 1".into()));
    }
    if room.saturating_mul(cfg.nodes as u64) < wanted {
        return Err(C1mError::Config(format!("{wanted} tasks do not fit {} nodes of {room} tasks each", cfg.nodes)));
    }
    let (state, _events) = StateHandle::new();
    let run = Run {
        state,
        index: Mutex::new(0),
        queue: Mutex::new(VecDeque::new()),
        busy: AtomicUsize::new(0),
        in_flight: Mutex::new(BTreeMap::new()),
        schedule_ns: AtomicU64::new(0),
        check_ns: AtomicU64::new(0),
        apply_ns: AtomicU64::new(0),
        evals_run: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        error: Mutex::new(None),
    };

    let setup = Instant::now();
    for i in 0..cfg.nodes {
        run.commit("a node registration", Command::UpsertNode { node: node(cfg, i), overlay: None, secret_hash: None })?;
    }
    for j in 0..cfg.jobs {
        let job = job(cfg, j);
        let eval = Evaluation {
            id: derived_id(&format!("c1m-eval-{j}")),
            namespace: job.namespace.clone(),
            job_id: job.id.clone(),
            priority: job.priority,
            r#type: job.r#type.clone(),
            triggered_by: eval_trigger::JOB_REGISTER.to_string(),
            status: eval_status::PENDING.to_string(),
            ..Default::default()
        };
        lock(&run.queue).push_back(eval.id.clone());
        run.commit("a job registration", Command::RegisterJob { job, eval })?;
    }
    let setup = setup.elapsed();

    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..cfg.workers {
            s.spawn(|| run.work());
        }
    });
    let wall = started.elapsed();
    if let Some(e) = lock(&run.error).take() {
        return Err(e);
    }

    let st = run.state.read();
    // Every task placed exactly once, per job and index.
    let mut placed = 0u64;
    for j in 0..cfg.jobs {
        let id = format!("c1m-{j:05}");
        let indexes: BTreeSet<u32> = st.allocs_for_job("default", &id).filter(|a| is_live(a)).map(|a| a.index).collect();
        let live = st.allocs_for_job("default", &id).filter(|a| is_live(a)).count();
        placed += live as u64;
        if live != cfg.tasks_per_job as usize || indexes.len() != live {
            let why = st
                .evals_for_job("default", &id)
                .map(|e| format!("eval {} {} {}", e.id, e.status, e.status_description))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(C1mError::Unplaced {
                placed,
                wanted,
                job: id,
                why: format!("{live} live allocations, {} distinct indexes; {why}", indexes.len()),
            });
        }
    }
    // No node over capacity, summed here independently of the scheduler's arithmetic.
    let mut nodes_used = 0;
    for n in st.nodes.values() {
        let (mut cpu, mut mem, mut count) = (0u64, 0u64, 0usize);
        for a in st.allocs_for_node(&n.id).filter(|a| is_live(a)) {
            let r = a.resources.clone().unwrap_or_default();
            cpu += r.cpu_mhz;
            mem += r.memory_mib;
            count += 1;
        }
        let cap = n.resources.clone().unwrap_or_default();
        if cpu > cap.cpu_total_mhz || mem > cap.memory_mib {
            let why = format!("{count} allocations use {cpu} MHz and {mem} MiB of {} MHz and {} MiB", cap.cpu_total_mhz, cap.memory_mib);
            return Err(C1mError::Overcommitted { node: n.name.clone(), why });
        }
        if let Err(why) = scheduler::check_node_fit(&st, n, &[]) {
            return Err(C1mError::Overcommitted { node: n.name.clone(), why });
        }
        nodes_used += usize::from(count > 0);
    }
    let ns = |c: &AtomicU64| Duration::from_nanos(c.load(Ordering::Relaxed));
    Ok(Report {
        placements: placed,
        wall,
        schedule: ns(&run.schedule_ns),
        check: ns(&run.check_ns),
        apply: ns(&run.apply_ns),
        setup,
        evals_run: run.evals_run.load(Ordering::Relaxed),
        rejected: run.rejected.load(Ordering::Relaxed),
        nodes_used,
    })
}
