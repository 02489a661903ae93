//! The trace simulator behind `mlp sim`: replays a production workload (the openb CSV format,
//! see [`trace`]) against a simulated cluster with the scheduler's own placement rule
//! (`scheduler::gpu::Policy::evaluate` and `scheduler::gpu::fits`, which the server's
//! `resources::try_fit_with` also calls), by the method of the ATC'23 "Beware of Fragmentation"
//! paper:
//!
//! 1. with a seed, resample the pod list until its GPU demand reaches `inflate` × the cluster's
//!    GPUs (append random copies while the next still fits, or drop random pods while over);
//! 2. shuffle with the seed; place pods one at a time, never removing any; a pod that fits
//!    nowhere is counted as failed and skipped;
//! 3. record the GPU allocation ratio (allocated milli-GPUs / total) at every 1% of arrived GPU
//!    demand.
//!
//! The workload the policies plan for (FGD's "target workload") is, by default, the trace's whole
//! pod mix, known in advance (foresight, as in the paper). With [`SimConfig::online`], it is the
//! server's rule instead: the learned histogram of `scheduler::learned`, which observes each pod
//! as it arrives (no foresight) and is decayed the same way as in the server's state machine.
//!
//! Speed: the cost of a (node, pod type) pair only changes when the node changes, so it is
//! cached per node generation, and identical node states (most nodes early on) share one
//! evaluation through a memo keyed by the node's state.

pub mod rng;
pub mod trace;

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Instant;

use crate::scheduler::gpu::{ModelSet, NodeView, PodView, Policy, Workload, WHOLE};
use crate::scheduler::learned::{Arrival, LearnedWorkload};
use rng::SplitMix64;
use trace::{TraceNode, TracePod};

/// Simulation parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimConfig {
    pub policy: Policy,
    /// Arrived GPU demand at the end, as a multiple of the cluster's GPUs (1.3 in the paper).
    pub inflate: f64,
    pub seed: u64,
    /// Plan for the learned workload of the pods arrived so far (the server's rule) instead of
    /// the trace's whole pod mix.
    pub online: bool,
}

/// The outcome of one seeded run.
#[derive(Debug, Clone, PartialEq)]
pub struct SimResult {
    pub seed: u64,
    /// GPU allocation (percent) when arrived demand reached 100% of the cluster's GPUs.
    pub alloc_ratio_100: f64,
    /// GPU allocation (percent) at the end, when arrived demand reached `inflate` (130%).
    pub alloc_ratio_130: f64,
    /// Pods that fit nowhere when they arrived.
    pub failed_pods: u64,
    /// Pods that arrived (placed or failed).
    pub pods: u64,
    /// Placement decisions (placed or failed) per second of the placement loop.
    pub placements_per_sec: f64,
    /// `curve[k]` = GPU allocation (percent) when arrived demand reached k% of the GPUs.
    pub curve: Vec<f64>,
}

/// A cluster and workload loaded from a trace, ready to be simulated many times.
#[derive(Debug, Clone)]
pub struct Simulation {
    nodes: Vec<NodeSpec>,
    /// Distinct pod types of the trace, and for each pod of the trace its type.
    types: Vec<PodView>,
    pods: Vec<u32>,
    /// FGD's target workload: the trace's pod types weighted by their counts.
    workload: Workload,
    total_gpu_milli: u64,
}

#[derive(Debug, Clone, Copy)]
struct NodeSpec {
    cpu: u64,
    mem: u64,
    model: u32,
    gpus: u32,
}

impl Simulation {
    /// Builds the cluster and the pod types. GPU models are interned in order of first
    /// appearance (nodes first); a `gpu_spec` naming only unknown models never fits.
    pub fn new(nodes: &[TraceNode], pods: &[TracePod]) -> Simulation {
        let mut models: Vec<&str> = Vec::new();
        for n in nodes.iter().filter(|n| n.gpus > 0) {
            if !models.contains(&n.model.as_str()) {
                models.push(&n.model);
            }
        }
        let model_id = |m: &str| models.iter().position(|x| *x == m).map(|i| i as u32);
        let specs: Vec<NodeSpec> = nodes
            .iter()
            .map(|n| NodeSpec { cpu: n.cpu_milli, mem: n.memory_mib, model: model_id(&n.model).unwrap_or(u32::MAX), gpus: n.gpus })
            .collect();
        let mut types: Vec<PodView> = Vec::new();
        let mut index: HashMap<PodView, u32> = HashMap::new();
        let mut counts: Vec<u64> = Vec::new();
        let mut pod_types = Vec::with_capacity(pods.len());
        for p in pods {
            let allowed = if p.models.is_empty() {
                ModelSet::ANY
            } else {
                // Models no node has can never be matched; they add nothing to the set.
                p.models.iter().filter_map(|m| model_id(m)).fold(ModelSet(0), ModelSet::with)
            };
            let view = PodView { cpu: p.cpu_milli, mem: p.memory_mib, gpu: p.gpu, models: allowed };
            let t = *index.entry(view).or_insert_with(|| {
                types.push(view);
                counts.push(0);
                (types.len() - 1) as u32
            });
            counts[t as usize] += 1;
            pod_types.push(t);
        }
        let workload = Workload::new(types.iter().copied().zip(counts.iter().copied()));
        let total_gpu_milli = specs.iter().map(|n| u64::from(n.gpus) * u64::from(WHOLE)).sum();
        Simulation { nodes: specs, types, pods: pod_types, workload, total_gpu_milli }
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn gpu_count(&self) -> u64 {
        self.total_gpu_milli / u64::from(WHOLE)
    }

    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    pub fn pod_type_count(&self) -> usize {
        self.types.len()
    }

    fn demand(&self, t: u32) -> u64 {
        self.types[t as usize].gpu.total_milli()
    }

    /// The arrival sequence for `seed` (pod type per arrival), by the paper's resampling.
    pub fn arrivals(&self, seed: u64, inflate: f64) -> Vec<u32> {
        let mut rng = SplitMix64::new(seed);
        let target = (self.total_gpu_milli as f64 * inflate).floor() as u64;
        let mut seq = self.pods.clone();
        let mut sum: u64 = seq.iter().map(|&t| self.demand(t)).sum();
        if self.pods.is_empty() {
            return seq;
        }
        if sum < target {
            loop {
                let t = self.pods[rng.below(self.pods.len())];
                let d = self.demand(t);
                if sum + d > target {
                    break;
                }
                sum += d;
                seq.push(t);
            }
        } else {
            while sum > target && !seq.is_empty() {
                let i = rng.below(seq.len());
                sum -= self.demand(seq[i]);
                seq.swap_remove(i);
            }
        }
        rng.shuffle(&mut seq);
        seq
    }

    /// One seeded run.
    pub fn run(&self, config: &SimConfig) -> SimResult {
        let arrivals = self.arrivals(config.seed, config.inflate);
        let mut state = State::new(self);
        let mut learned = LearnedWorkload::default();
        let mut workload = if config.online { Workload::default() } else { self.workload.clone() };
        let points = (config.inflate * 100.0).round() as usize;
        let mut curve = Vec::with_capacity(points + 1);
        curve.push(0.0);
        let total = self.total_gpu_milli.max(1) as f64;
        let (mut arrived, mut allocated, mut failed) = (0u64, 0u64, 0u64);
        let mut at_100 = None;
        let started = Instant::now();
        for &t in &arrivals {
            arrived += self.demand(t);
            if config.online {
                // The pod's own registration is committed before it is scheduled.
                learned.observe(&[Arrival::from(self.types[t as usize])], 1);
                let now = learned.workload();
                if now != workload {
                    workload = now;
                    state.forget_costs();
                }
            }
            match state.place(self, config.policy, &workload, t) {
                true => allocated += self.demand(t),
                false => failed += 1,
            }
            while curve.len() <= points && arrived as f64 >= total * curve.len() as f64 / 100.0 {
                curve.push(100.0 * allocated as f64 / total);
            }
            if at_100.is_none() && arrived >= self.total_gpu_milli {
                at_100 = Some(100.0 * allocated as f64 / total);
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let end = 100.0 * allocated as f64 / total;
        // Resampling stops less than one pod short of the target: the last points are the end.
        curve.resize(points + 1, end);
        tracing::debug!(seed = config.seed, policy = %config.policy, pods = arrivals.len(), elapsed, "simulated");
        SimResult {
            seed: config.seed,
            alloc_ratio_100: at_100.unwrap_or(end),
            alloc_ratio_130: end,
            failed_pods: failed,
            pods: arrivals.len() as u64,
            placements_per_sec: if elapsed > 0.0 { arrivals.len() as f64 / elapsed } else { 0.0 },
            curve,
        }
    }
}

/// A fast, non-cryptographic hasher (FxHash) for the evaluation memo: its keys are small
/// integer tuples made by this module.
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// Devices per node covered by the memo; larger nodes are evaluated directly.
const MEMO_DEVICES: usize = 8;
/// Memo entries kept before it is cleared (bounds memory on long runs).
const MEMO_LIMIT: usize = 1 << 20;

/// The memo key: the pod type and the node's whole state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct MemoKey {
    pod_type: u32,
    model: u32,
    cpu_free: u64,
    mem_free: u64,
    cpu_total: u64,
    gpu_free: [u32; MEMO_DEVICES],
    gpus: u32,
}

/// A cached evaluation of one pod type on one node, valid while the node's generation matches.
#[derive(Debug, Clone, Copy)]
struct Cached {
    generation: u32,
    cost: f64,
    mask: u64,
}

/// The cluster during one run.
struct State {
    cpu_free: Vec<u64>,
    mem_free: Vec<u64>,
    /// Per node, a generation bumped on every placement (0 is never a valid generation).
    generation: Vec<u32>,
    gpu_start: Vec<usize>,
    gpu_free: Vec<u32>,
    /// `cache[type * nodes + node]`: laid out by type so that one pod scans contiguous memory.
    cache: Vec<Cached>,
    frag: Vec<(u32, f64)>,
    memo: FxMap<MemoKey, Option<(f64, u64)>>,
}

impl State {
    fn new(sim: &Simulation) -> State {
        let n = sim.nodes.len();
        let mut gpu_start = Vec::with_capacity(n + 1);
        let mut acc = 0usize;
        for s in &sim.nodes {
            gpu_start.push(acc);
            acc += s.gpus as usize;
        }
        gpu_start.push(acc);
        State {
            cpu_free: sim.nodes.iter().map(|s| s.cpu).collect(),
            mem_free: sim.nodes.iter().map(|s| s.mem).collect(),
            generation: vec![1; n],
            gpu_start,
            gpu_free: vec![WHOLE; acc],
            cache: vec![Cached { generation: 0, cost: 0.0, mask: 0 }; n * sim.types.len()],
            frag: vec![(0, 0.0); n],
            memo: FxMap::default(),
        }
    }

    /// Drops every cached cost (the workload changed).
    fn forget_costs(&mut self) {
        for g in &mut self.generation {
            *g = g.wrapping_add(1).max(1);
        }
        self.memo.clear();
    }

    /// Evaluates pod type `t` on node `i` through the memo.
    fn evaluate(&mut self, sim: &Simulation, policy: Policy, workload: &Workload, t: u32, i: usize) -> Option<(f64, u64)> {
        // Built from the fields (not `self.view`) so that the caches stay mutable.
        let view = NodeView {
            cpu_free: self.cpu_free[i],
            cpu_total: sim.nodes[i].cpu,
            mem_free: self.mem_free[i],
            model: sim.nodes[i].model,
            gpu_free: &self.gpu_free[self.gpu_start[i]..self.gpu_start[i + 1]],
        };
        let pod = &sim.types[t as usize];
        let key = (view.gpu_free.len() <= MEMO_DEVICES).then(|| {
            let mut gpu_free = [0u32; MEMO_DEVICES];
            gpu_free[..view.gpu_free.len()].copy_from_slice(view.gpu_free);
            MemoKey {
                pod_type: t,
                model: view.model,
                cpu_free: view.cpu_free,
                mem_free: view.mem_free,
                cpu_total: view.cpu_total,
                gpu_free,
                gpus: view.gpu_free.len() as u32,
            }
        });
        if let Some(hit) = key.as_ref().and_then(|k| self.memo.get(k)) {
            return *hit;
        }
        if self.frag[i].0 != self.generation[i] {
            self.frag[i] = (self.generation[i], policy.baseline(&view, workload));
        }
        let frag_before = self.frag[i].1;
        let out = policy.evaluate(&view, pod, workload, frag_before);
        if let Some(k) = key {
            if self.memo.len() >= MEMO_LIMIT {
                self.memo.clear();
            }
            self.memo.insert(k, out);
        }
        out
    }

    /// Places one pod of type `t` on the cheapest node (lowest index on ties); false if none fits.
    fn place(&mut self, sim: &Simulation, policy: Policy, workload: &Workload, t: u32) -> bool {
        let n = sim.nodes.len();
        let base = t as usize * n;
        let mut best: Option<(f64, usize, u64)> = None;
        for i in 0..n {
            let c = self.cache[base + i];
            let c = if c.generation == self.generation[i] {
                c
            } else {
                let fresh = match self.evaluate(sim, policy, workload, t, i) {
                    Some((cost, mask)) => Cached { generation: self.generation[i], cost, mask },
                    None => Cached { generation: self.generation[i], cost: f64::INFINITY, mask: 0 },
                };
                self.cache[base + i] = fresh;
                fresh
            };
            if c.cost < best.map_or(f64::INFINITY, |b| b.0) {
                best = Some((c.cost, i, c.mask));
            }
        }
        let Some((_, i, mask)) = best else { return false };
        let pod = sim.types[t as usize];
        self.cpu_free[i] -= pod.cpu;
        self.mem_free[i] -= pod.mem;
        let devices = &mut self.gpu_free[self.gpu_start[i]..self.gpu_start[i + 1]];
        for (j, free) in devices.iter_mut().enumerate() {
            if mask & (1 << j) != 0 {
                *free -= pod.gpu.milli;
            }
        }
        self.generation[i] = self.generation[i].wrapping_add(1).max(1);
        true
    }
}

/// The mean of the seeds' results (the curve averaged point by point).
pub fn mean(results: &[SimResult]) -> Option<SimResult> {
    let first = results.first()?;
    let n = results.len() as f64;
    let avg = |f: &dyn Fn(&SimResult) -> f64| results.iter().map(f).sum::<f64>() / n;
    let len = results.iter().map(|r| r.curve.len()).min().unwrap_or(0);
    Some(SimResult {
        seed: first.seed,
        alloc_ratio_100: avg(&|r| r.alloc_ratio_100),
        alloc_ratio_130: avg(&|r| r.alloc_ratio_130),
        failed_pods: (avg(&|r| r.failed_pods as f64)).round() as u64,
        pods: (avg(&|r| r.pods as f64)).round() as u64,
        placements_per_sec: avg(&|r| r.placements_per_sec),
        curve: (0..len).map(|k| avg(&|r| r.curve[k])).collect(),
    })
}

#[cfg(test)]
mod tests;
