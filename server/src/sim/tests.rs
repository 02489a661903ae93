//! Simulator tests on tiny hand-made clusters and workloads.

use super::trace::{TraceNode, TracePod};
use super::*;
use crate::scheduler::gpu::GpuShape;

fn node(name: &str, gpus: u32, model: &str) -> TraceNode {
    TraceNode { name: name.into(), cpu_milli: 32_000, memory_mib: 131_072, gpus, model: model.into() }
}

fn pod(cpu: u64, gpu: GpuShape, models: &[&str]) -> TracePod {
    TracePod { name: "p".into(), cpu_milli: cpu, memory_mib: 1024, gpu, models: models.iter().map(|m| m.to_string()).collect() }
}

fn trace() -> (Vec<TraceNode>, Vec<TracePod>) {
    let nodes = vec![node("a", 2, "T4"), node("b", 4, "V100M16"), node("c", 8, "G2"), node("cpu", 0, "")];
    let mut pods = Vec::new();
    for i in 0..40 {
        pods.push(match i % 5 {
            0 => pod(4000, GpuShape::NONE, &[]),
            1 => pod(2000, GpuShape::share(500), &[]),
            2 => pod(6000, GpuShape::whole(1), &[]),
            3 => pod(8000, GpuShape::whole(2), &["V100M16", "G2"]),
            _ => pod(1000, GpuShape::share(250), &["T4"]),
        });
    }
    (nodes, pods)
}

#[test]
fn resampling_is_deterministic_and_hits_the_target() {
    let (nodes, pods) = trace();
    let sim = Simulation::new(&nodes, &pods);
    assert_eq!((sim.node_count(), sim.gpu_count(), sim.pod_type_count()), (4, 14, 5));
    let a = sim.arrivals(42, 1.3);
    assert_eq!(a, sim.arrivals(42, 1.3));
    assert_ne!(a, sim.arrivals(43, 1.3));
    let demand: u64 = a.iter().map(|&t| sim.demand(t)).sum();
    // Within one pod's demand (at most 2 GPUs here) under the target.
    let target = 14 * 1300;
    assert!(demand <= target && demand + 2000 > target, "{demand}");
    // Over the target: random pods are dropped until under it.
    let small = sim.arrivals(1, 0.5);
    let d: u64 = small.iter().map(|&t| sim.demand(t)).sum();
    assert!(d <= 7000 && small.len() < pods.len(), "{d}");
}

#[test]
fn runs_never_overcommit_and_respect_models() {
    let (nodes, pods) = trace();
    let sim = Simulation::new(&nodes, &pods);
    for policy in Policy::ALL {
        let arrivals = sim.arrivals(7, 1.3);
        let mut st = State::new(&sim);
        for &t in &arrivals {
            let before: Vec<u32> = st.gpu_free.clone();
            let placed = st.place(&sim, policy, &sim.workload, t);
            let p = sim.types[t as usize];
            if placed && p.gpu.count > 0 {
                // Find the node that changed and check the model constraint.
                let changed = (0..sim.nodes.len())
                    .find(|&i| st.gpu_free[st.gpu_start[i]..st.gpu_start[i + 1]] != before[st.gpu_start[i]..st.gpu_start[i + 1]]);
                let Some(i) = changed else { panic!("{policy}: a GPU pod placed without GPUs") };
                assert!(p.models.contains(sim.nodes[i].model), "{policy}: model constraint broken");
            }
        }
        assert!(st.gpu_free.iter().all(|&f| f <= WHOLE), "{policy}");
        let result = sim.run(&SimConfig { policy, inflate: 1.3, seed: 7, online: false });
        assert_eq!(result.curve.len(), 131, "{policy}");
        assert!(result.alloc_ratio_130 <= 100.0 && result.alloc_ratio_130 >= result.alloc_ratio_100 - 1e-9);
        assert!(result.curve.windows(2).all(|w| w[0] <= w[1]), "allocation never decreases");
    }
}

#[test]
fn cache_and_memo_agree_with_direct_evaluation() {
    // The same run twice gives the same result (caches are per run), and a run with the memo
    // disabled by construction (fresh State each pod) places identically.
    let (nodes, pods) = trace();
    let sim = Simulation::new(&nodes, &pods);
    for policy in Policy::ALL {
        let a = sim.run(&SimConfig { policy, inflate: 1.3, seed: 3, online: false });
        let b = sim.run(&SimConfig { policy, inflate: 1.3, seed: 3, online: false });
        assert_eq!((a.alloc_ratio_130, a.failed_pods, &a.curve), (b.alloc_ratio_130, b.failed_pods, &b.curve));
        let arrivals = sim.arrivals(3, 1.3);
        let mut cached = State::new(&sim);
        let mut direct = State::new(&sim);
        for &t in &arrivals {
            cached.place(&sim, policy, &sim.workload, t);
            direct.memo.clear();
            direct.cache.iter_mut().for_each(|c| c.generation = 0);
            direct.place(&sim, policy, &sim.workload, t);
            assert_eq!(cached.gpu_free, direct.gpu_free, "{policy}");
        }
    }
}

#[test]
fn policies_choose_as_designed_on_a_tiny_cluster() {
    // Two 2-GPU nodes; node a already holds a half-GPU pod.
    let nodes = vec![node("a", 2, "T4"), node("b", 2, "T4")];
    let pods = vec![pod(1000, GpuShape::share(500), &[]), pod(1000, GpuShape::whole(1), &[])];
    let sim = Simulation::new(&nodes, &pods);
    let (share, whole) = (0u32, 1u32);
    for policy in Policy::ALL {
        let mut st = State::new(&sim);
        assert!(st.place(&sim, policy, &sim.workload, share));
        assert_eq!(st.gpu_free, [500, 1000, 1000, 1000], "{policy}: first pod on node a, device 0");
        // A second share fills the used device for every policy (packing and FGD alike).
        assert!(st.place(&sim, policy, &sim.workload, share));
        assert_eq!(st.gpu_free, [0, 1000, 1000, 1000], "{policy}");
        // A whole GPU: onto a's free device; b stays whole for 2-GPU asks.
        assert!(st.place(&sim, policy, &sim.workload, whole));
        assert_eq!(st.gpu_free, [0, 0, 1000, 1000], "{policy}");
    }
}

#[test]
fn online_runs_learn_the_workload_as_pods_arrive() {
    let (nodes, pods) = trace();
    let sim = Simulation::new(&nodes, &pods);
    for policy in [Policy::Fgd, Policy::Mlp] {
        let config = SimConfig { policy, inflate: 1.3, seed: 5, online: true };
        let (a, b) = (sim.run(&config), sim.run(&config));
        assert_eq!((a.alloc_ratio_130, a.failed_pods, &a.curve), (b.alloc_ratio_130, b.failed_pods, &b.curve), "{policy}");
        // The online run places with the workload the learned histogram held at each arrival
        // (the arrival itself included), the same as a run that rebuilds every cost each time.
        let arrivals = sim.arrivals(5, 1.3);
        let mut learned = LearnedWorkload::default();
        let mut st = State::new(&sim);
        let mut placed = 0;
        for &t in &arrivals {
            learned.observe(&[Arrival::from(sim.types[t as usize])], 1);
            st.memo.clear();
            st.cache.iter_mut().for_each(|c| c.generation = 0);
            st.frag.iter_mut().for_each(|f| f.0 = 0);
            placed += u64::from(st.place(&sim, policy, &learned.workload(), t));
        }
        assert_eq!(placed, a.pods - a.failed_pods, "{policy}");
    }
}

#[test]
fn mean_averages_seeds() {
    let r = |a: f64| SimResult {
        seed: 0,
        alloc_ratio_100: a,
        alloc_ratio_130: a,
        failed_pods: 2,
        pods: 10,
        placements_per_sec: a,
        curve: vec![a, a],
    };
    let m = mean(&[r(1.0), r(3.0)]).unwrap_or_else(|| r(0.0));
    assert_eq!((m.alloc_ratio_100, m.alloc_ratio_130, m.curve), (2.0, 2.0, vec![2.0, 2.0]));
    assert!(mean(&[]).is_none());
}
