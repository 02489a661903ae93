//! Terminal output: aligned tables, times, short ids.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A table printed with columns padded to their widest cell.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table { rows: vec![header.iter().map(|s| s.to_string()).collect()] }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let widths: Vec<usize> =
            (0..cols).map(|c| self.rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
        let mut out = String::new();
        for r in &self.rows {
            let line: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, cell)| if i + 1 == r.len() { cell.clone() } else { format!("{cell:<w$}", w = widths[i]) })
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}

pub fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// "3s ago", "2m10s ago".
pub fn ago(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    format!("{} ago", human_duration(Duration::from_millis(now.saturating_sub(ms))))
}

pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{}s", s)
    } else if s < 3600 {
        format!("{}m{}s", s / 60, s % 60)
    } else if s < 86400 {
        format!("{}h{}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{}h", s / 86400, (s % 86400) / 3600)
    }
}

/// Wall-clock time of a millisecond timestamp, UTC, second precision.
pub fn clock(ms: u64) -> String {
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}Z")
}

pub fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `mlp alloc status` lines about preemption: who evicted this allocation, whom it evicted.
pub fn preemption_lines(a: &mlp_proto::v1::Allocation) -> Vec<String> {
    let mut out = Vec::new();
    if !a.preempted_by_allocation.is_empty() {
        out.push(format!("Preempted By        = allocation {} (job {})", a.preempted_by_allocation, a.preempted_by_job));
    }
    if !a.preempted_allocations.is_empty() {
        out.push(format!("Preempted           = {}", a.preempted_allocations.join(", ")));
    }
    out
}

/// `mlp job status` lines about gangs and preemption: the latest evaluation that gave up (an
/// unplaceable gang), and the allocations this job evicted or lost to preemption.
pub fn job_preemption_and_gang_lines(evals: &[mlp_proto::v1::Evaluation], allocs: &[mlp_proto::v1::Allocation]) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(e) = evals.iter().rev().find(|e| !e.unplaceable_reason.is_empty()) {
        out.push(format!("Unplaceable (evaluation {}): {}", short(&e.id), e.unplaceable_reason));
    }
    for a in allocs {
        if !a.preempted_by_allocation.is_empty() {
            out.push(format!(
                "Allocation {} was preempted by allocation {} (job {})",
                short(&a.id),
                short(&a.preempted_by_allocation),
                a.preempted_by_job
            ));
        }
        if !a.preempted_allocations.is_empty() {
            let ids: Vec<&str> = a.preempted_allocations.iter().map(|id| short(id)).collect();
            out.push(format!("Allocation {} preempted {}", short(&a.id), ids.join(", ")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_pads_columns() {
        let mut t = Table::new(&["ID", "Status"]);
        t.row(vec!["a".into(), "running".into()]);
        t.row(vec!["longer-id".into(), "x".into()]);
        assert_eq!(t.render(), "ID         Status\na          running\nlonger-id  x\n");
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(Duration::from_secs(5)), "5s");
        assert_eq!(human_duration(Duration::from_secs(125)), "2m5s");
        assert_eq!(human_duration(Duration::from_secs(7300)), "2h1m");
    }
}
