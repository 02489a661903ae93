//! A node registering GPUs the scheduler cannot trust is refused through the real API, with the
//! field path of the problem, and nothing is written; a negative NUMA node is stored as unknown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mlp_proto::v1::*;
use mlp_server::api::ApiError;

mod common;

use common::start;

/// A 1,000 MHz node with these GPUs.
fn node(id: &str, gpus: Vec<GpuDevice>) -> Node {
    common::node_with_gpus(id, 1000, gpus)
}

fn gpu(id: &str) -> GpuDevice {
    GpuDevice { id: id.into(), model: "A100-SXM4-80GB".into(), memory_mib: 81_920, ..Default::default() }
}

fn mig(id: &str, parent: &str, profile: &str) -> GpuDevice {
    GpuDevice { mig_profile: profile.into(), parent_id: parent.into(), memory_mib: 10_240, ..gpu(id) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_gpus_are_refused_with_the_field_path_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let linked = GpuDevice { nvlink_peers: vec!["g1".into(), "g9".into()], ..gpu("g0") };
    let cases: Vec<(Vec<GpuDevice>, &str)> = vec![
        ((0..65).map(|i| gpu(&format!("g{i}"))).collect(), "node.resources.gpus: 65 devices"),
        (vec![gpu("g0"), gpu("g0")], "node.resources.gpus[1].id: duplicate id \"g0\""),
        (vec![gpu("g0"), gpu("")], "node.resources.gpus[1].id: must be"),
        (vec![mig("i0", "g0", "4294967295g.1gb")], "node.resources.gpus[0].mig_profile: must be empty or a MIG profile"),
        (
            vec![mig("i0", "g0", "4g.40gb"), mig("i1", "g0", "4g.40gb")],
            "node.resources.gpus[1].mig_profile: the MIG instances of GPU \"g0\"",
        ),
        (vec![mig("i0", "i0", "1g.10gb")], "node.resources.gpus[0].parent_id: \"i0\" is the instance itself"),
        (vec![mig("i0", "g0", "1g.10gb"), mig("i1", "i0", "1g.10gb")], "node.resources.gpus[1].parent_id: \"i0\" is a MIG instance"),
        (vec![linked, gpu("g1")], "node.resources.gpus[0].nvlink_peers[1]: no registered device has the id \"g9\""),
    ];
    let nodes_before = server.api.state.read().nodes.len();
    for (gpus, want) in cases {
        match server.api.register_node(Some(node("n1", gpus))).await {
            Err(ApiError::InvalidArgument(msg)) => assert!(msg.starts_with(want), "got {msg:?}, want it to start with {want:?}"),
            other => panic!("want InvalidArgument starting with {want:?}, got {other:?}"),
        }
    }
    assert_eq!(server.api.state.read().nodes.len(), nodes_before, "a refused registration writes nothing");
    assert!(!server.api.state.read().nodes.contains_key("n1"));

    // A good node registers; a negative NUMA node (unknown to sysfs/NVML) is stored as absent.
    let gpus = vec![
        GpuDevice { numa_node: Some(-1), nvlink_peers: vec!["g1".into()], ..gpu("g0") },
        GpuDevice { numa_node: Some(1), nvlink_peers: vec!["g0".into()], ..gpu("g1") },
        mig("g2-mig-0", "g2", "3g.40gb"),
        mig("g2-mig-1", "g2", "4g.40gb"),
    ];
    server.api.register_node(Some(node("n2", gpus))).await.expect("a well-formed node registers");
    let stored = server.api.state.read().nodes.get("n2").cloned().expect("n2 is stored");
    let numa: Vec<Option<i32>> = stored.resources.expect("resources").gpus.iter().map(|d| d.numa_node).collect();
    assert_eq!(numa, [None, Some(1), None, None]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_node_registrations_are_refused_with_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let many: std::collections::BTreeMap<String, String> = (0..1001).map(|i| (format!("k{i}"), "v".into())).collect();
    let cases: Vec<(Node, &str)> = vec![
        (Node { attributes: many.clone(), ..node("n1", vec![]) }, "node.attributes: at most 1000 entries"),
        (Node { meta: many, ..node("n1", vec![]) }, "node.meta: at most 1000 entries"),
        (Node { meta: [("rack".to_string(), "x".repeat(5000))].into(), ..node("n1", vec![]) }, "node.meta.rack: keys are"),
        (Node { name: "n".repeat(300), ..node("n1", vec![]) }, "node.name: at most 256 bytes"),
        (Node { drivers: (0..40).map(|i| format!("d{i}")).collect(), ..node("n1", vec![]) }, "node.drivers: at most 32"),
    ];
    for (n, want) in cases {
        match server.api.register_node(Some(n)).await {
            Err(ApiError::InvalidArgument(msg)) => assert!(msg.starts_with(want), "got {msg:?}, want it to start with {want:?}"),
            other => panic!("want InvalidArgument starting with {want:?}, got {other:?}"),
        }
    }
    assert!(!server.api.state.read().nodes.contains_key("n1"), "a refused registration writes nothing");
    server.shutdown().await;
}
