//! Which feasible nodes are scored for one placement: every one, or — on large clusters, for
//! asks without GPUs — a sample, so that a placement costs O(log n) fit checks instead of O(n)
//! (Nomad's candidate limit, made deterministic).
//!
//! The rule (documented in docs/scheduler.md, "Candidate sampling"):
//! * nodes with GPUs are always scored, every one of them, for every placement: the GPU policy
//!   (fragmentation-aware) needs to see them all, and CPU-only asks can strand GPUs;
//! * GPU asks score every feasible node (only nodes with GPUs can take them anyway);
//! * a CPU-only ask, when more than [`SAMPLE_MIN_NODES`] feasible nodes have no GPUs, scores
//!   those nodes in a seeded shuffled order and stops after the first [`limit`]`(n)` that fit:
//!   the best of them wins (the scorer decides, as usual). The order is fixed for the whole
//!   group, so the next placement starts again from the front: the same few nodes keep being
//!   compared and bin-packing fills them before moving on. A node that does not fit is not
//!   visited again by later placements of the group (the group's ask is the same and the
//!   pass only adds usage), and when no node of the sample fits, every node skipped that way is
//!   tried again before the placement is reported as failed, so "nothing fits" is always the
//!   outcome of a check of every feasible node.
//!
//! Groups with affinities or spreads ([`Candidates::preferring`]) follow Nomad's rule instead:
//! a placement compares the first [`preference_limit`]`(count)` = `max(count, 100)` fitting
//! GPU-less nodes (scoring a spread over every node for every placement is quadratic). Their
//! shuffled order is interleaved by stratum (the node's affinity sum and spread values), round
//! robin, so that every affinity level and spread value that has nodes is near the front of the
//! order and in the compared window; the same skip-and-retry rule keeps failures exact.
//!
//! The seed comes from the job, the group and the state's Raft index: the same inputs give the
//! same plan, and two evaluations planned at once (the leader runs several workers) mostly look
//! at different nodes, so their plans rarely conflict in the plan applier.

use std::collections::HashMap;
use std::hash::Hash;

use mlp_proto::v1::Node;

use super::resources::Ask;
use crate::sim::rng::SplitMix64;

/// Clusters with at most this many feasible GPU-less nodes score every node for every placement.
pub const SAMPLE_MIN_NODES: usize = 100;

/// The fewest fitting nodes compared per sampled placement.
pub const SAMPLE_FLOOR: usize = 16;

/// How many fitting nodes a sampled placement compares on `n` feasible nodes: `max(16, ⌈log2 n⌉)`.
pub fn limit(n: usize) -> usize {
    let log2 = usize::BITS - n.saturating_sub(1).leading_zeros();
    SAMPLE_FLOOR.max(log2 as usize)
}

/// The fewest fitting nodes compared per placement of a group with preferences (Nomad's 100).
pub const PREFERENCE_FLOOR: usize = 100;

/// How many fitting nodes a placement of a group with preferences compares: `max(count, 100)`
/// (Nomad's `limit` for groups with affinities or spreads, scheduler/stack.go).
pub fn preference_limit(count: u32) -> usize {
    PREFERENCE_FLOOR.max(usize::try_from(count).unwrap_or(usize::MAX))
}

/// A deterministic seed for one group's order (FNV-1a over the parts, then the index).
pub fn seed(parts: &[&str], index: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h ^ index.rotate_left(32)
}

/// The visiting order of one group's feasible nodes (see the module rule).
pub struct Candidates<'a> {
    /// Scored for every placement, in the given order.
    every: Vec<&'a Node>,
    /// Shuffled GPU-less nodes, sampled; empty when not sampling.
    sampled: Vec<&'a Node>,
    /// `skipped[i]` = the placement (1-based) at which `sampled[i]` was found not to fit; 0 = not skipped.
    skipped: Vec<u32>,
    /// Every sampled node before this one is skipped.
    cursor: usize,
    limit: usize,
    /// Placements visited so far (1-based ids for `skipped`).
    round: u32,
}

impl<'a> Candidates<'a> {
    /// The order for `nodes` (the group's feasible nodes) and `ask`.
    pub fn new(nodes: &[&'a Node], ask: &Ask, seed: u64) -> Candidates<'a> {
        let plain = nodes.iter().filter(|n| !has_gpus(n)).count();
        if !ask.gpus.is_empty() || plain <= SAMPLE_MIN_NODES {
            return Candidates::all(nodes);
        }
        let (mut sampled, every): (Vec<&'a Node>, Vec<&'a Node>) = nodes.iter().copied().partition(|n| !has_gpus(n));
        SplitMix64::new(seed).shuffle(&mut sampled);
        Candidates::sampling(every, sampled, limit(plain))
    }

    /// The order for a group with preferences (`count` allocations wanted): like [`Candidates::new`]
    /// but comparing [`preference_limit`]`(count)` fitting nodes, sampled only when more GPU-less
    /// nodes than that are feasible, and with the shuffled order interleaved round robin over the
    /// strata that `stratum` names, so that every stratum is among the first nodes.
    pub fn preferring<K: Eq + Hash>(nodes: &[&'a Node], ask: &Ask, seed: u64, count: u32, stratum: impl Fn(&Node) -> K) -> Candidates<'a> {
        let limit = preference_limit(count);
        let plain = nodes.iter().filter(|n| !has_gpus(n)).count();
        if !ask.gpus.is_empty() || plain <= limit.max(SAMPLE_MIN_NODES) {
            return Candidates::all(nodes);
        }
        let (mut sampled, every): (Vec<&'a Node>, Vec<&'a Node>) = nodes.iter().copied().partition(|n| !has_gpus(n));
        SplitMix64::new(seed).shuffle(&mut sampled);
        Candidates::sampling(every, interleave(sampled, stratum), limit)
    }

    fn sampling(every: Vec<&'a Node>, sampled: Vec<&'a Node>, limit: usize) -> Candidates<'a> {
        let skipped = vec![0; sampled.len()];
        Candidates { every, sampled, skipped, cursor: 0, limit, round: 0 }
    }

    /// Every node scored for every placement, no sampling.
    pub fn all(nodes: &[&'a Node]) -> Candidates<'a> {
        Candidates { every: nodes.to_vec(), sampled: Vec::new(), skipped: Vec::new(), cursor: 0, limit: 0, round: 0 }
    }

    /// Whether placements compare a sample of the nodes rather than all of them.
    pub fn is_sampling(&self) -> bool {
        !self.sampled.is_empty()
    }

    /// Visits the nodes to score for one placement; `try_node` returns whether the ask fits the
    /// node (it records why not itself). Each node is offered at most once per call.
    pub fn visit(&mut self, mut try_node: impl FnMut(&'a Node) -> bool) {
        self.round = self.round.saturating_add(1);
        let mut fits = 0usize;
        for &node in &self.every {
            if try_node(node) {
                fits += 1;
            }
        }
        if self.sampled.is_empty() {
            return;
        }
        let mut sampled_fits = 0usize;
        let mut i = self.cursor;
        while i < self.sampled.len() && sampled_fits < self.limit {
            if self.skipped[i] == 0 {
                if try_node(self.sampled[i]) {
                    sampled_fits += 1;
                } else {
                    self.skipped[i] = self.round;
                }
            }
            i += 1;
        }
        while self.cursor < self.sampled.len() && self.skipped[self.cursor] != 0 {
            self.cursor += 1;
        }
        if fits + sampled_fits > 0 {
            return;
        }
        // Nothing fits among the nodes not yet skipped: try the ones skipped by earlier
        // placements too (this call's were just tried), so a failure has checked every node.
        for (i, &node) in self.sampled.iter().enumerate() {
            let when = self.skipped[i];
            if when != 0 && when < self.round && try_node(node) {
                self.skipped[i] = 0;
                self.cursor = self.cursor.min(i);
            }
        }
    }
}

fn has_gpus(n: &Node) -> bool {
    n.resources.as_ref().is_some_and(|r| !r.gpus.is_empty())
}

/// `nodes` reordered round robin over their strata: the first node of every stratum, then the
/// second of every stratum that has one, and so on; within a stratum the given order is kept,
/// and the strata go largest first (ties: first seen first). O(n).
fn interleave<'a, K: Eq + Hash>(nodes: Vec<&'a Node>, stratum: impl Fn(&Node) -> K) -> Vec<&'a Node> {
    let total = nodes.len();
    let mut index: HashMap<K, usize> = HashMap::new();
    let mut strata: Vec<Vec<&'a Node>> = Vec::new();
    for node in nodes {
        let i = *index.entry(stratum(node)).or_insert_with(|| {
            strata.push(Vec::new());
            strata.len() - 1
        });
        strata[i].push(node);
    }
    // Stable: equal sizes keep their first-seen order. Largest first, so that round r only
    // walks the prefix of strata that still have an r-th node.
    strata.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut out = Vec::with_capacity(total);
    let mut round = 0;
    while out.len() < total {
        for s in strata.iter().take_while(|s| s.len() > round) {
            out.push(s[round]);
        }
        round += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::gpu::GpuShape;
    use crate::scheduler::resources::GpuAsk;
    use mlp_proto::v1::{GpuDevice, NodeResources};
    use std::collections::BTreeSet;

    fn nodes(n: usize, gpus: usize) -> Vec<Node> {
        (0..n)
            .map(|i| Node {
                id: format!("n{i:05}"),
                resources: Some(NodeResources {
                    gpus: (0..gpus).map(|g| GpuDevice { id: format!("g{g}"), ..Default::default() }).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect()
    }

    fn visited(c: &mut Candidates<'_>, fits: impl Fn(&Node) -> bool) -> Vec<String> {
        let mut seen = Vec::new();
        c.visit(|n| {
            seen.push(n.id.clone());
            fits(n)
        });
        seen
    }

    /// Through `schedule` on a large cluster: every placement lands on a node that satisfies the
    /// job's constraint and has room for it (the plan applier's own check), and the same state
    /// and evaluation give the same nodes.
    #[test]
    fn sampled_placements_fit_and_respect_constraints() {
        use crate::scheduler::{check_node_fit, schedule};
        use crate::state::{ClusterState, Command, Request};
        use mlp_proto::consts::{eval_status, job_type, node_status};
        use mlp_proto::v1::{Allocation, Constraint, Evaluation, Job, Resources, Task, TaskGroup};
        use std::collections::BTreeMap;

        let mut st = ClusterState::default();
        let mut index = 0;
        let mut apply = |st: &mut ClusterState, command| {
            index += 1;
            let resp = st.apply(index, &Request { now_ms: 1, command }, &mut Vec::new());
            assert_eq!(resp.error, None);
        };
        for i in 0..400u64 {
            let node = Node {
                id: format!("n{i:04}"),
                name: format!("n{i:04}"),
                status: node_status::READY.into(),
                drivers: vec!["exec".into()],
                meta: [("rack".to_string(), if i % 2 == 0 { "a" } else { "b" }.to_string())].into_iter().collect(),
                resources: Some(NodeResources {
                    cpu_cores: 8,
                    cpu_total_mhz: 1000 + (i % 7) * 500,
                    memory_mib: 4096,
                    disk_mib: 10_000,
                    ..Default::default()
                }),
                ..Default::default()
            };
            apply(&mut st, Command::UpsertNode { node, overlay: None, secret_hash: None });
        }
        let job = Job {
            id: "j".into(),
            name: "j".into(),
            namespace: "default".into(),
            r#type: job_type::BATCH.into(),
            priority: 50,
            constraints: vec![Constraint { attribute: "${meta.rack}".into(), operator: "=".into(), value: "a".into() }],
            groups: vec![TaskGroup {
                name: "g".into(),
                count: Some(600),
                tasks: vec![Task {
                    name: "t".into(),
                    driver: "exec".into(),
                    resources: Some(Resources { cpu_mhz: 300, memory_mib: 128, ..Default::default() }),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let eval = Evaluation {
            id: "e1".into(),
            namespace: "default".into(),
            job_id: "j".into(),
            status: eval_status::PENDING.into(),
            ..Default::default()
        };
        apply(&mut st, Command::RegisterJob { job, eval: eval.clone() });
        let job = st.job("default", "j").cloned();
        let plan = schedule(&st, job.as_ref(), &eval, 1);
        assert_eq!(plan.placements.len(), 600, "{:?}", plan.failed_tg_allocs);
        let mut by_node: BTreeMap<&str, Vec<&Allocation>> = BTreeMap::new();
        for a in &plan.placements {
            by_node.entry(a.node_id.as_str()).or_default().push(a);
        }
        for (id, allocs) in &by_node {
            let node = &st.nodes[*id];
            assert_eq!(node.meta["rack"], "a", "{id} is not in rack a");
            assert_eq!(check_node_fit(&st, node, allocs), Ok(()), "{id}");
        }
        let again = schedule(&st, job.as_ref(), &eval, 1);
        let nodes = |p: &crate::scheduler::Plan| p.placements.iter().map(|a| a.node_id.clone()).collect::<Vec<_>>();
        assert_eq!(nodes(&plan), nodes(&again), "same inputs, same nodes");
        // 200 rack-a nodes hold 2..=6 tasks each (1,000..4,000 MHz): 600 tasks need more than
        // the 16 compared per placement, so the walk went past nodes as they filled up.
        assert!(by_node.len() > limit(200), "{} nodes used", by_node.len());

        // More tasks than rack a holds: sampling still fills every node before it gives up, and
        // the failure is explained over all 200 feasible nodes.
        let capacity: u64 = (0..400u64).step_by(2).map(|i| (1000 + (i % 7) * 500) / 300).sum();
        let mut big = st.job("default", "j").cloned().unwrap_or_default();
        big.groups[0].count = Some(5000);
        let plan = schedule(&st, Some(&big), &eval, 1);
        assert_eq!(plan.placements.len() as u64, capacity);
        let metric = &plan.failed_tg_allocs["g"];
        assert_eq!((metric.nodes_exhausted, metric.nodes_filtered), (200, 200));
        assert_eq!(plan.queued_allocations["g"] as u64, 5000 - capacity);
    }

    #[test]
    fn preferences_compare_max_count_100_and_every_stratum_is_in_front() {
        let all = nodes(1000, 0);
        let refs: Vec<&Node> = all.iter().collect();
        // Stratum: 3 of the 1,000 nodes are "rare"; they are among the first four offered.
        let rare = |n: &Node| matches!(n.id.as_str(), "n00007" | "n00500" | "n00993");
        let mut c = Candidates::preferring(&refs, &Ask::default(), 5, 10, rare);
        assert!(c.is_sampling());
        let seen = visited(&mut c, |_| true);
        assert_eq!(seen.len(), preference_limit(10));
        assert_eq!(preference_limit(10), PREFERENCE_FLOOR);
        let ids: Vec<&str> = seen.iter().map(String::as_str).collect();
        let first: BTreeSet<&str> = ids[..6].iter().copied().filter(|id| ["n00007", "n00500", "n00993"].contains(id)).collect();
        assert_eq!(first.len(), 3, "{:?}", &ids[..6]);
        // Round robin, the larger stratum first: common, rare, common, rare, common, rare.
        assert!(ids[..6].iter().enumerate().all(|(i, id)| (i % 2 == 1) == rare(&all[id[1..].parse::<usize>().unwrap_or(0)])));

        // A count at least the GPU-less node count: no sampling, every node.
        let mut c = Candidates::preferring(&refs, &Ask::default(), 5, 1000, rare);
        assert!(!c.is_sampling());
        assert_eq!(visited(&mut c, |_| true).len(), 1000);
        assert_eq!(preference_limit(1001), 1001);
    }

    #[test]
    fn limit_grows_with_log2() {
        assert_eq!(limit(1), SAMPLE_FLOOR);
        assert_eq!(limit(5000), SAMPLE_FLOOR);
        assert_eq!(limit(1 << 20), 20);
        assert_eq!(limit((1 << 20) + 1), 21);
    }

    #[test]
    fn small_clusters_and_gpu_asks_visit_every_node() {
        let small = nodes(SAMPLE_MIN_NODES, 0);
        let refs: Vec<&Node> = small.iter().collect();
        let mut c = Candidates::new(&refs, &Ask::default(), 1);
        assert!(!c.is_sampling());
        assert_eq!(visited(&mut c, |_| true).len(), SAMPLE_MIN_NODES);

        let big = nodes(1000, 0);
        let refs: Vec<&Node> = big.iter().collect();
        let gpu_ask = Ask { gpus: vec![GpuAsk { shape: GpuShape::whole(1), ..Default::default() }], ..Default::default() };
        let mut c = Candidates::new(&refs, &gpu_ask, 1);
        assert!(!c.is_sampling());
        assert_eq!(visited(&mut c, |_| true).len(), 1000);
    }

    #[test]
    fn gpu_nodes_are_always_visited_and_plain_ones_sampled() {
        let mut all = nodes(1000, 0);
        let gpu_nodes = nodes(300, 2);
        all.extend(gpu_nodes.into_iter().map(|mut n| {
            n.id = format!("gpu-{}", n.id);
            n
        }));
        let refs: Vec<&Node> = all.iter().collect();
        let mut c = Candidates::new(&refs, &Ask::default(), 7);
        assert!(c.is_sampling());
        let seen = visited(&mut c, |_| true);
        assert_eq!(seen.iter().filter(|id| id.starts_with("gpu-")).count(), 300);
        assert_eq!(seen.iter().filter(|id| !id.starts_with("gpu-")).count(), limit(1000));
        let unique: BTreeSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "no node twice in one placement");
    }

    #[test]
    fn order_is_deterministic_per_seed() {
        let all = nodes(1000, 0);
        let refs: Vec<&Node> = all.iter().collect();
        let run = |seed| visited(&mut Candidates::new(&refs, &Ask::default(), seed), |_| true);
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
        assert_ne!(seed(&["a", "b"], 1), seed(&["ab", ""], 1));
        assert_ne!(seed(&["a"], 1), seed(&["a"], 2));
    }

    #[test]
    fn nodes_that_do_not_fit_are_skipped_then_retried_before_failing() {
        let all = nodes(1000, 0);
        let refs: Vec<&Node> = all.iter().collect();
        let mut c = Candidates::new(&refs, &Ask::default(), 9);
        // Only even nodes fit at first: the sample is made of fitting nodes, odd ones skipped.
        let even = |n: &Node| n.id[1..].parse::<u32>().unwrap_or(1) % 2 == 0;
        let first = visited(&mut c, even);
        let fit: Vec<&String> = first.iter().filter(|id| id[1..].parse::<u32>().unwrap_or(1) % 2 == 0).collect();
        assert_eq!(fit.len(), limit(1000));
        let odd_seen: BTreeSet<String> = first.iter().filter(|id| id[1..].parse::<u32>().unwrap_or(0) % 2 == 1).cloned().collect();
        // The next placement does not offer the skipped odd nodes again.
        let second = visited(&mut c, even);
        assert!(second.iter().all(|id| !odd_seen.contains(id)));
        // When nothing fits any more, every node is offered exactly once, skipped ones included.
        let third = visited(&mut c, |_| false);
        let unique: BTreeSet<&String> = third.iter().collect();
        assert_eq!(unique.len(), 1000);
        assert_eq!(third.len(), 1000);
        // A skipped node that fits again on that final check is found.
        let mut c = Candidates::new(&refs, &Ask::default(), 9);
        let skipped_first = visited(&mut c, |_| false);
        assert_eq!(skipped_first.len(), 1000);
        let target = skipped_first[500].clone();
        let again = visited(&mut c, |n| n.id == target);
        assert_eq!(again.iter().filter(|id| **id == target).count(), 1);
        assert_eq!(visited(&mut c, |n| n.id == target), vec![target.clone()], "revived: the only node offered");
    }
}
