//! The openb trace format (Alibaba `cluster-trace-gpu-v2023`): a node list
//! (`sn,cpu_milli,memory_mib,gpu,model`) and a pod list (`name,cpu_milli,memory_mib,num_gpu,
//! gpu_milli,gpu_spec,…`). Columns are found by header name, so extra columns are ignored and
//! the short `multigpu*` files (no `gpu_spec`) load too. Every row is validated; errors name the
//! file and line.

use std::path::{Path, PathBuf};

use crate::scheduler::gpu::{GpuShape, WHOLE};

/// A trace that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {message}")]
    Row { path: PathBuf, line: usize, message: String },
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceNode {
    pub name: String,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub gpus: u32,
    /// The model of all the node's GPUs (empty without GPUs).
    pub model: String,
}

/// One pod (task) of the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracePod {
    pub name: String,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub gpu: GpuShape,
    /// Allowed GPU models (`gpu_spec`, `|`-separated); empty = any.
    pub models: Vec<String>,
}

/// Reads a node list.
pub fn load_nodes(path: &Path) -> Result<Vec<TraceNode>, TraceError> {
    let text = read(path)?;
    parse_nodes(path, &text)
}

/// Reads a pod list.
pub fn load_pods(path: &Path) -> Result<Vec<TracePod>, TraceError> {
    let text = read(path)?;
    parse_pods(path, &text)
}

fn read(path: &Path) -> Result<String, TraceError> {
    std::fs::read_to_string(path).map_err(|source| TraceError::Io { path: path.to_path_buf(), source })
}

/// A CSV table with named columns (the trace has no quoting).
struct Table<'a> {
    path: &'a Path,
    columns: Vec<&'a str>,
    rows: Vec<(usize, Vec<&'a str>)>,
}

impl<'a> Table<'a> {
    fn parse(path: &'a Path, text: &'a str) -> Result<Table<'a>, TraceError> {
        let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim_end_matches('\r')));
        let Some((_, header)) = lines.next() else {
            return Err(TraceError::Row { path: path.to_path_buf(), line: 1, message: "empty file; expected a CSV header".into() });
        };
        let columns: Vec<&str> = header.split(',').map(str::trim).collect();
        let rows = lines.filter(|(_, l)| !l.trim().is_empty()).map(|(n, l)| (n, l.split(',').map(str::trim).collect())).collect();
        Ok(Table { path, columns, rows })
    }

    fn err(&self, line: usize, message: impl Into<String>) -> TraceError {
        TraceError::Row { path: self.path.to_path_buf(), line, message: message.into() }
    }

    /// The index of a column; `required` ones must be in the header.
    fn column(&self, name: &str, required: bool) -> Result<Option<usize>, TraceError> {
        match self.columns.iter().position(|c| *c == name) {
            Some(i) => Ok(Some(i)),
            None if required => Err(self.err(1, format!("missing column {name:?} (header: {})", self.columns.join(",")))),
            None => Ok(None),
        }
    }

    fn field(&self, line: usize, row: &[&'a str], col: usize, name: &str) -> Result<&'a str, TraceError> {
        if row.len() != self.columns.len() {
            return Err(self.err(line, format!("expected {} fields, found {}", self.columns.len(), row.len())));
        }
        row.get(col).copied().ok_or_else(|| self.err(line, format!("missing field {name:?}")))
    }

    fn number(&self, line: usize, row: &[&'a str], col: usize, name: &str) -> Result<u64, TraceError> {
        let text = self.field(line, row, col, name)?;
        text.parse::<u64>().map_err(|_| self.err(line, format!("{name}: expected a non-negative integer, found {text:?}")))
    }
}

/// Parses a node list (`path` is only used in errors).
pub fn parse_nodes(path: &Path, text: &str) -> Result<Vec<TraceNode>, TraceError> {
    let t = Table::parse(path, text)?;
    let cols = ["sn", "cpu_milli", "memory_mib", "gpu", "model"].map(|c| t.column(c, true));
    let [Ok(Some(sn)), Ok(Some(cpu)), Ok(Some(mem)), Ok(Some(gpu)), Ok(Some(model))] = cols else {
        return Err(cols.into_iter().find_map(Result::err).unwrap_or_else(|| t.err(1, "bad header")));
    };
    let mut nodes = Vec::with_capacity(t.rows.len());
    for (line, row) in &t.rows {
        let node = TraceNode {
            name: t.field(*line, row, sn, "sn")?.to_string(),
            cpu_milli: t.number(*line, row, cpu, "cpu_milli")?,
            memory_mib: t.number(*line, row, mem, "memory_mib")?,
            gpus: u32::try_from(t.number(*line, row, gpu, "gpu")?).map_err(|_| t.err(*line, "gpu: too many GPUs"))?,
            model: t.field(*line, row, model, "model")?.to_string(),
        };
        if node.gpus as usize > crate::scheduler::gpu::MAX_DEVICES {
            return Err(t.err(
                *line,
                format!("gpu: at most {} GPUs per node are supported, found {}", crate::scheduler::gpu::MAX_DEVICES, node.gpus),
            ));
        }
        if node.gpus > 0 && node.model.is_empty() {
            return Err(t.err(*line, "model: a node with GPUs needs a GPU model"));
        }
        nodes.push(node);
    }
    if nodes.is_empty() {
        return Err(t.err(1, "no nodes"));
    }
    Ok(nodes)
}

/// Parses a pod list (`path` is only used in errors).
pub fn parse_pods(path: &Path, text: &str) -> Result<Vec<TracePod>, TraceError> {
    let t = Table::parse(path, text)?;
    let name = t.column("name", true)?.unwrap_or(0);
    let cpu = t.column("cpu_milli", true)?.unwrap_or(0);
    let mem = t.column("memory_mib", true)?.unwrap_or(0);
    let num_gpu = t.column("num_gpu", true)?.unwrap_or(0);
    let gpu_milli = t.column("gpu_milli", true)?.unwrap_or(0);
    let spec = t.column("gpu_spec", false)?;
    let mut pods = Vec::with_capacity(t.rows.len());
    for (line, row) in &t.rows {
        let count = t.number(*line, row, num_gpu, "num_gpu")?;
        let milli = t.number(*line, row, gpu_milli, "gpu_milli")?;
        let gpu = match (count, milli) {
            (0, _) => GpuShape::NONE,
            (1, m) if (1..=u64::from(WHOLE)).contains(&m) => GpuShape::share(m as u32),
            (n, m) if n > 1 && m == u64::from(WHOLE) => GpuShape::whole(u32::try_from(n).map_err(|_| t.err(*line, "num_gpu: too large"))?),
            (n, m) => {
                return Err(t.err(
                    *line,
                    format!("num_gpu={n} with gpu_milli={m}: a share (1..=1000) needs num_gpu=1, several GPUs need gpu_milli=1000"),
                ))
            }
        };
        let models = match spec {
            Some(col) => t.field(*line, row, col, "gpu_spec")?.split('|').filter(|m| !m.is_empty()).map(str::to_string).collect(),
            None => Vec::new(),
        };
        pods.push(TracePod {
            name: t.field(*line, row, name, "name")?.to_string(),
            cpu_milli: t.number(*line, row, cpu, "cpu_milli")?,
            memory_mib: t.number(*line, row, mem, "memory_mib")?,
            gpu,
            models,
        });
    }
    Ok(pods)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("t.csv")
    }

    #[test]
    fn nodes_load_and_validate() {
        let ok = "sn,cpu_milli,memory_mib,gpu,model\nn0,64000,262144,2,P100\nn1,32000,131072,0,\n";
        let nodes = parse_nodes(p(), ok).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0], TraceNode { name: "n0".into(), cpu_milli: 64000, memory_mib: 262144, gpus: 2, model: "P100".into() });
        let bad = |text: &str| parse_nodes(p(), text).map(|_| ()).map_err(|e| e.to_string());
        assert_eq!(
            bad("sn,cpu_milli,memory_mib,gpu,model\nn0,64000,x,2,P100\n"),
            Err("t.csv:2: memory_mib: expected a non-negative integer, found \"x\"".into())
        );
        assert_eq!(bad("sn,cpu_milli,memory_mib,gpu,model\nn0,1,1,2,P100\nn1,1,1\n"), Err("t.csv:3: expected 5 fields, found 3".into()));
        assert_eq!(bad("sn,cpu_milli,memory_mib,gpu,model\nn0,1,1,2,\n"), Err("t.csv:2: model: a node with GPUs needs a GPU model".into()));
        assert!(bad("sn,cpu,memory_mib,gpu,model\n").is_err_and(|e| e.starts_with("t.csv:1: missing column \"cpu_milli\"")));
    }

    #[test]
    fn pods_load_shapes_and_specs() {
        let text = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos\n\
                    a,1000,100,0,0,,LS\nb,2000,200,1,460,,LS\nc,3000,300,4,1000,V100M16|V100M32,BE\nd,1,1,1,1000,,LS\n";
        let pods = parse_pods(p(), text).unwrap_or_else(|e| panic!("{e}"));
        let shapes: Vec<_> = pods.iter().map(|p| p.gpu).collect();
        assert_eq!(shapes, [GpuShape::NONE, GpuShape::share(460), GpuShape::whole(4), GpuShape::whole(1)]);
        assert_eq!(pods[2].models, ["V100M16", "V100M32"]);
        // The multigpu files carry no gpu_spec column.
        let short = parse_pods(p(), "name,cpu_milli,memory_mib,num_gpu,gpu_milli\na,1,1,2,1000\n").unwrap_or_else(|e| panic!("{e}"));
        assert!(short[0].models.is_empty());
        let err = parse_pods(p(), "name,cpu_milli,memory_mib,num_gpu,gpu_milli\na,1,1,2,500\n").map(|_| ()).map_err(|e| e.to_string());
        assert!(err.is_err_and(|e| e.starts_with("t.csv:2: num_gpu=2 with gpu_milli=500")));
    }
}
