//! Ranking: how good a feasible node is for one placement. Scoring is a trait so that scorers
//! can be swapped without touching feasibility or reconciliation; ties are always broken by node
//! id so plans are deterministic. The default scorer, [`Fragmentation`], ranks by the GPU
//! policy's cost (`gpu::Policy`, the rule the trace simulator measures), then by bin-packing.

use mlp_proto::v1::{AllocatedResources, Job, Node, NodeResources, TaskGroup};

use super::gpu::{Policy, Workload};
use super::resources::Usage;

/// Everything a scorer may look at for one candidate placement.
#[derive(Debug, Clone, Copy)]
pub struct RankInput<'a> {
    pub job: &'a Job,
    pub group: &'a TaskGroup,
    pub node: &'a Node,
    /// The node's usage before this placement (live allocations plus earlier placements of the plan).
    pub before: &'a Usage,
    /// The node's usage with this placement added.
    pub after: &'a Usage,
    /// What this placement would get, GPU device ids included.
    pub resources: &'a AllocatedResources,
    /// The GPU policy's cost of this placement (lower is better), from `resources::try_fit_with`.
    pub gpu_cost: f64,
}

/// Scores a candidate placement; higher is better.
pub trait Scorer {
    fn score(&self, input: &RankInput<'_>) -> f64;

    /// The GPU policy that picks devices within a node (and computes `RankInput::gpu_cost`).
    fn gpu_policy(&self) -> Policy {
        Policy::default()
    }

    /// The workload the GPU policy plans for (FGD's target distribution).
    fn workload(&self) -> Option<&Workload> {
        None
    }
}

/// The default scorer: the GPU policy's cost first (fragmentation-aware for GPUs), Nomad's
/// bin-packing among placements of equal cost.
#[derive(Debug, Clone, Default)]
pub struct Fragmentation {
    pub policy: Policy,
    pub workload: Workload,
}

impl Scorer for Fragmentation {
    fn score(&self, input: &RankInput<'_>) -> f64 {
        // Bin-packing spans 0..18; scaled so that it only orders equal GPU costs.
        -input.gpu_cost + 1e-9 * BinPack.score(input)
    }

    fn gpu_policy(&self) -> Policy {
        self.policy
    }

    fn workload(&self) -> Option<&Workload> {
        Some(&self.workload)
    }
}

/// Nomad's bin-packing score: prefer the node that ends up fullest, so that big holes stay free
/// for big asks. `20 − (10^freeCpu + 10^freeMem)`, free fractions taken after the placement; the
/// range is 0 (empty node) to 18 (full node).
#[derive(Debug, Clone, Copy, Default)]
pub struct BinPack;

impl Scorer for BinPack {
    fn score(&self, input: &RankInput<'_>) -> f64 {
        let empty = NodeResources::default();
        let cap = input.node.resources.as_ref().unwrap_or(&empty);
        let free_cpu = free_fraction(input.after.cpu_mhz, cap.cpu_total_mhz);
        let free_mem = free_fraction(input.after.memory_mib, cap.memory_mib);
        20.0 - (10f64.powf(free_cpu) + 10f64.powf(free_mem))
    }
}

/// The free fraction of a dimension; a node without that dimension counts as fully free so
/// that it is least preferred.
fn free_fraction(used: u64, total: u64) -> f64 {
    if total == 0 {
        return 1.0;
    }
    (1.0 - used as f64 / total as f64).clamp(0.0, 1.0)
}

/// Whether candidate `a` beats candidate `b`: higher score, then lower node id.
pub fn better(a: (f64, &str), b: (f64, &str)) -> bool {
    match a.0.total_cmp(&b.0) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => a.1 < b.1,
    }
}

/// Whether candidate `a` beats candidate `b`, each (preference score P, locality rank, score,
/// node id): higher P (`preference`), then the lower locality rank (`resources::Fit::locality_rank`:
/// how far a multi-GPU ask's devices fall below the best connection the node reports), then
/// [`better`] (higher score, then lower node id). Locality is its own key rather than part of
/// the score, so that the score's bin-packing tie-break still orders placements of equal
/// locality. With P = 0 and rank 0 for every candidate (no preferences, no topology data, as in
/// the trace simulator) this is exactly [`better`]. Preferences compare as numbers (-0.0
/// equals 0.0).
pub fn better_ranked(a: (f64, u32, f64, &str), b: (f64, u32, f64, &str)) -> bool {
    if a.0 != b.0 {
        return a.0 > b.0;
    }
    if a.1 != b.1 {
        return a.1 < b.1;
    }
    better((a.2, a.3), (b.2, b.3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binpack_prefers_fuller_nodes() {
        let node =
            Node { resources: Some(NodeResources { cpu_total_mhz: 1000, memory_mib: 1000, ..Default::default() }), ..Default::default() };
        let (job, group, res) = (Job::default(), TaskGroup::default(), AllocatedResources::default());
        let score = |cpu, mem| {
            let after = Usage { cpu_mhz: cpu, memory_mib: mem, ..Default::default() };
            BinPack.score(&RankInput {
                job: &job,
                group: &group,
                node: &node,
                before: &after,
                after: &after,
                resources: &res,
                gpu_cost: 0.0,
            })
        };
        assert!((score(0, 0) - 0.0).abs() < 1e-9);
        assert!((score(1000, 1000) - 18.0).abs() < 1e-9);
        assert!(score(800, 800) > score(500, 500));
        assert!(score(500, 900) > score(500, 500));
    }

    #[test]
    fn ties_break_by_node_id() {
        assert!(better((1.0, "b"), (0.5, "a")));
        assert!(better((1.0, "a"), (1.0, "b")));
        assert!(!better((1.0, "b"), (1.0, "a")));
    }

    #[test]
    fn preference_ranks_before_score() {
        assert!(better_ranked((0.5, 3, -10.0, "b"), (0.0, 0, 10.0, "a")));
        assert!(!better_ranked((-0.5, 0, 10.0, "a"), (0.0, 0, -10.0, "b")));
        assert!(better_ranked((0.0, 0, 1.0, "b"), (0.0, 0, 0.5, "a")));
        assert!(better_ranked((0.0, 0, 1.0, "a"), (0.0, 0, 1.0, "b")));
        assert!(better_ranked((-0.0, 0, 1.0, "b"), (0.0, 0, 0.5, "a")), "-0.0 is no worse than 0.0");
    }

    #[test]
    fn locality_ranks_between_preference_and_score() {
        // The better-connected placement wins whatever the score; the preference still comes first.
        assert!(better_ranked((0.0, 0, -1e5, "b"), (0.0, 1, 0.0, "a")));
        assert!(better_ranked((0.5, 3, 0.0, "b"), (0.0, 0, 0.0, "a")));
        // Among placements of equal locality the bin-packing tie-break decides (a locality
        // penalty of 10⁶ in the cost left it only a few float steps).
        let node =
            Node { resources: Some(NodeResources { cpu_total_mhz: 1000, memory_mib: 1000, ..Default::default() }), ..Default::default() };
        let (job, group, res) = (Job::default(), TaskGroup::default(), AllocatedResources::default());
        let score = |used| {
            let after = Usage { cpu_mhz: used, memory_mib: used, ..Default::default() };
            let (before, resources) = (&after, &res);
            let input = RankInput { job: &job, group: &group, node: &node, before, after: &after, resources, gpu_cost: 2500.0 };
            Fragmentation::default().score(&input)
        };
        assert!(score(900) > score(100), "{} vs {}", score(900), score(100));
        assert!(better_ranked((0.0, 3, score(900), "b"), (0.0, 3, score(100), "a")));
    }
}
