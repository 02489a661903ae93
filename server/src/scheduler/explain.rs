//! Human-readable placement failure lines, like Nomad's, from an `AllocMetric`.

use mlp_proto::v1::AllocMetric;

/// One line per reason, e.g. `Constraint "${attr.kernel.name} = windows" filtered 3 nodes`.
/// Coalesced failures are left to the caller, which knows how many allocations were queued.
pub fn explain(metric: &AllocMetric) -> Vec<String> {
    let mut lines = Vec::new();
    if !metric.gang_failure.is_empty() {
        lines.push(format!("Gang: {}", metric.gang_failure));
    }
    if metric.nodes_evaluated == 0 {
        lines.push("No nodes were eligible for evaluation".to_string());
    }
    for (class, n) in &metric.class_filtered {
        lines.push(format!("Class: {class} filtered {}", nodes(*n)));
    }
    for (constraint, n) in &metric.constraint_filtered {
        lines.push(format!("Constraint \"{constraint}\" filtered {}", nodes(*n)));
    }
    if metric.nodes_exhausted > 0 {
        lines.push(format!("Resources exhausted on {}", nodes(metric.nodes_exhausted)));
    }
    for (dim, n) in &metric.dimension_exhausted {
        if super::quota::is_quota_reason(dim) {
            let on = if *n > 0 { format!(" (on {})", nodes(*n)) } else { String::new() };
            lines.push(format!("Quota: {dim}{on}"));
            continue;
        }
        lines.push(format!("Dimension \"{dim}\" exhausted on {}", nodes(*n)));
    }
    lines
}

fn nodes(n: u32) -> String {
    if n == 1 {
        "1 node".to_string()
    } else {
        format!("{n} nodes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_like_nomad() {
        let m = AllocMetric {
            nodes_evaluated: 6,
            nodes_filtered: 4,
            class_filtered: [("missing driver \"exec\"".to_string(), 1)].into_iter().collect(),
            constraint_filtered: [("${attr.kernel.name} = windows".to_string(), 3)].into_iter().collect(),
            nodes_exhausted: 2,
            dimension_exhausted: [("memory".to_string(), 2)].into_iter().collect(),
            ..Default::default()
        };
        assert_eq!(
            explain(&m),
            vec![
                "Class: missing driver \"exec\" filtered 1 node",
                "Constraint \"${attr.kernel.name} = windows\" filtered 3 nodes",
                "Resources exhausted on 2 nodes",
                "Dimension \"memory\" exhausted on 2 nodes",
            ]
        );
        assert_eq!(explain(&AllocMetric::default()), vec!["No nodes were eligible for evaluation"]);
    }
}
