//! Per-allocation state persisted in `data_dir/allocs/<id>/state.json` (written atomically:
//! tmp file + rename), and the in-memory registry of allocations the Logs RPC reads.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mlp_proto::v1::{Allocation, TaskState};
use serde::{Deserialize, Serialize};

pub use crate::task::runner::ProcRecord;

/// File name of the persisted state inside an alloc dir.
pub const STATE_FILE: &str = "state.json";

/// What the agent remembers about an allocation.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct PersistedAlloc {
    /// Allocation id.
    pub alloc_id: String,
    /// The allocation as received from the servers (with its job).
    pub alloc: Option<Allocation>,
    /// Last client status.
    pub client_status: String,
    /// Why.
    pub client_description: String,
    /// Task states by task name.
    pub task_states: BTreeMap<String, TaskState>,
    /// Processes of running tasks by task name.
    pub procs: BTreeMap<String, ProcRecord>,
}

/// Writes `state.json` into `alloc_dir` atomically.
pub fn save(alloc_dir: &Path, state: &PersistedAlloc) -> io::Result<()> {
    let data = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
    let tmp = alloc_dir.join(format!("{STATE_FILE}.tmp"));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, alloc_dir.join(STATE_FILE))
}

/// Reads `state.json` from `alloc_dir`; None when there is none.
pub fn load(alloc_dir: &Path) -> io::Result<Option<PersistedAlloc>> {
    match std::fs::read(alloc_dir.join(STATE_FILE)) {
        Ok(data) => serde_json::from_slice(&data).map(Some).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// What the Logs RPC needs to know about an allocation.
#[derive(Debug, Clone, Default)]
pub struct AllocView {
    /// The alloc dir.
    pub dir: PathBuf,
    /// Task names of its group, in order.
    pub tasks: Vec<String>,
    /// Current client status.
    pub client_status: String,
    /// Current task states.
    pub task_states: BTreeMap<String, TaskState>,
}

/// Allocations known to this agent (running or remembered), by id.
#[derive(Debug, Clone, Default)]
pub struct AllocRegistry {
    inner: Arc<Mutex<BTreeMap<String, AllocView>>>,
}

impl AllocRegistry {
    /// Inserts or replaces an allocation's view.
    pub fn put(&self, id: &str, view: AllocView) {
        if let Ok(mut m) = self.inner.lock() {
            m.insert(id.to_string(), view);
        }
    }
    /// Forgets an allocation.
    pub fn remove(&self, id: &str) {
        if let Ok(mut m) = self.inner.lock() {
            m.remove(id);
        }
    }
    /// An allocation by id.
    pub fn get(&self, id: &str) -> Option<AllocView> {
        self.inner.lock().ok().and_then(|m| m.get(id).cloned())
    }
    /// Resolves a full id or a unique prefix: Ok(full id), Err(number of matches).
    pub fn resolve(&self, prefix: &str) -> Result<String, usize> {
        let Ok(m) = self.inner.lock() else {
            return Err(0);
        };
        if m.contains_key(prefix) {
            return Ok(prefix.to_string());
        }
        let matches: Vec<&String> = m.keys().filter(|k| k.starts_with(prefix)).collect();
        match matches.as_slice() {
            [one] if !prefix.is_empty() => Ok((*one).clone()),
            _ => Err(matches.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        assert_eq!(load(dir.path())?, None);
        let mut s = PersistedAlloc { alloc_id: "a1".into(), client_status: "running".into(), ..Default::default() };
        s.procs.insert("t".into(), ProcRecord { pid: 5, start_time: 9 });
        s.task_states.insert("t".into(), TaskState { state: "running".into(), exit_code: Some(0), ..Default::default() });
        save(dir.path(), &s)?;
        assert_eq!(load(dir.path())?, Some(s));
        assert!(!dir.path().join("state.json.tmp").exists());
        Ok(())
    }

    #[test]
    fn registry_prefix() {
        let r = AllocRegistry::default();
        r.put("abcd", AllocView::default());
        r.put("abef", AllocView::default());
        assert_eq!(r.resolve("abc"), Ok("abcd".to_string()));
        assert_eq!(r.resolve("ab"), Err(2));
        assert_eq!(r.resolve("zz"), Err(0));
        assert_eq!(r.resolve("abef"), Ok("abef".to_string()));
    }
}
