//! Per-allocation state persisted in `data_dir/allocs/<id>/`, and the in-memory registry of
//! allocations the Logs RPC reads.
//!
//! The state is written in place into one of two slot files, `state.0` and `state.1`, the
//! older one each time; each starts with a header line carrying a sequence number and the
//! length of the JSON that follows, and [`load`] takes the newest slot that is whole. A write
//! cut short (the agent killed mid-write) leaves the other slot, one change older, intact.
//! Why not a temporary file renamed over `state.json`, as before: every save then created an
//! inode and freed one, five times per allocation, and on an ext4 without a journal (the build
//! machine's) each new inode is searched for past every inode freed in the last minutes, so
//! under a burst of short jobs inode creation became a tenth of the machine's CPU
//! (docs/benchmarks.md, "Where one CLI call goes"). With the slots an allocation's state costs
//! two inodes, whatever the number of saves. `state.json` written by an earlier agent is still
//! read when no slot exists.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mlp_proto::v1::{Allocation, TaskState};
use serde::{Deserialize, Serialize};

pub use crate::task::runner::ProcRecord;

/// File name of the state written by agents before the slot files (read, never written).
pub const LEGACY_STATE_FILE: &str = "state.json";
/// The two slot files.
pub const SLOT_FILES: [&str; 2] = ["state.0", "state.1"];
/// First bytes of a slot file's header line: `mlp-alloc-state <seq> <json length>\n`.
const HEADER_MAGIC: &str = "mlp-alloc-state";
/// Longest header line that is read back.
const MAX_HEADER: usize = 64;

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

/// One slot as read back: its sequence number and JSON, when the slot is whole.
fn read_slot(path: &Path) -> io::Result<Option<(u64, Vec<u8>)>> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(nl) = data.iter().take(MAX_HEADER).position(|&b| b == b'\n') else {
        return Ok(None);
    };
    let header = String::from_utf8_lossy(&data[..nl]);
    let mut words = header.split(' ');
    let (Some(HEADER_MAGIC), Some(seq), Some(len), None) = (words.next(), words.next(), words.next(), words.next()) else {
        return Ok(None);
    };
    let (Ok(seq), Ok(len)) = (seq.parse::<u64>(), len.parse::<usize>()) else {
        return Ok(None);
    };
    let body = &data[nl + 1..];
    // Shorter: a write cut short; longer: cannot happen (each write truncates first).
    if body.len() != len {
        return Ok(None);
    }
    Ok(Some((seq, body.to_vec())))
}

/// The newest whole slot of `alloc_dir`: (sequence number, index of the slot, JSON).
fn newest_slot(alloc_dir: &Path) -> io::Result<Option<(u64, usize, Vec<u8>)>> {
    let mut best: Option<(u64, usize, Vec<u8>)> = None;
    for (i, name) in SLOT_FILES.iter().enumerate() {
        if let Some((seq, json)) = read_slot(&alloc_dir.join(name))? {
            // A slot whose JSON does not parse is as good as torn.
            if serde_json::from_slice::<serde_json::Value>(&json).is_err() {
                continue;
            }
            if best.as_ref().is_none_or(|(b, _, _)| seq > *b) {
                best = Some((seq, i, json));
            }
        }
    }
    Ok(best)
}

/// Writes the state of `alloc_dir` into its older slot (see the module docs). Not fsync'd:
/// like the rename it replaces, it survives the agent's death, not the machine's. Reads both
/// slots back first; a writer that saves the same allocation again keeps a [`Slots`] instead.
pub fn save(alloc_dir: &Path, state: &PersistedAlloc) -> io::Result<()> {
    Slots::default().save(alloc_dir, state)
}

/// Where one allocation's next save goes, for its one writer while it runs (the alloc runner):
/// the slots are read back once, on the first save, and from then on the writes alternate
/// without reading (each read parsed the whole allocation with its job, twice per save, a
/// tenth of the agent's CPU under a burst of short jobs). Nothing else writes an
/// allocation's state while its runner runs.
#[derive(Debug, Default, Clone, Copy)]
pub struct Slots {
    /// (sequence number, slot index) of the next write, once known.
    next: Option<(u64, usize)>,
}

impl Slots {
    /// Writes `state` into the older slot of `alloc_dir`. A write that fails is tried again
    /// into the same slot by the next save (the other slot still holds the state before).
    pub fn save(&mut self, alloc_dir: &Path, state: &PersistedAlloc) -> io::Result<()> {
        let (seq, slot) = match self.next {
            Some(next) => next,
            None => match newest_slot(alloc_dir)? {
                Some((seq, i, _)) => (seq + 1, 1 - i),
                None => (1, 0),
            },
        };
        let json = serde_json::to_vec(state).map_err(io::Error::other)?;
        let mut data = Vec::with_capacity(json.len() + MAX_HEADER);
        data.extend_from_slice(format!("{HEADER_MAGIC} {seq} {}\n", json.len()).as_bytes());
        data.extend_from_slice(&json);
        // One write of the whole buffer into the truncated slot: the other slot stays whole.
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(alloc_dir.join(SLOT_FILES[slot]))?;
        f.write_all(&data)?;
        self.next = Some((seq + 1, 1 - slot));
        Ok(())
    }
}

/// Reads the state of `alloc_dir` (the newest whole slot, or an earlier agent's
/// `state.json`); None when there is none.
pub fn load(alloc_dir: &Path) -> io::Result<Option<PersistedAlloc>> {
    if let Some((_, _, json)) = newest_slot(alloc_dir)? {
        return serde_json::from_slice(&json).map(Some).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
    }
    match std::fs::read(alloc_dir.join(LEGACY_STATE_FILE)) {
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
    /// The allocation with its job, as received (what the services watcher needs; shared,
    /// not copied, on each update).
    pub alloc: Option<Arc<Allocation>>,
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
        assert_eq!(load(dir.path())?, Some(s.clone()));
        // Later saves alternate between the two slots; the newest wins.
        for i in 0..5u32 {
            s.client_description = format!("change {i}");
            save(dir.path(), &s)?;
            assert_eq!(load(dir.path())?, Some(s.clone()));
        }
        let names: Vec<String> =
            std::fs::read_dir(dir.path())?.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned())).collect::<io::Result<_>>()?;
        let mut names = names;
        names.sort();
        assert_eq!(names, ["state.0", "state.1"]);
        Ok(())
    }

    #[test]
    fn a_torn_write_falls_back_to_the_other_slot() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut s = PersistedAlloc { alloc_id: "a1".into(), client_status: "pending".into(), ..Default::default() };
        save(dir.path(), &s)?;
        s.client_status = "running".into();
        save(dir.path(), &s)?;
        // The newest slot (seq 2, state.1) cut short mid-write: the previous state is read.
        let newest = dir.path().join(SLOT_FILES[1]);
        let data = std::fs::read(&newest)?;
        std::fs::write(&newest, &data[..data.len() - 7])?;
        assert_eq!(load(dir.path())?.map(|p| p.client_status), Some("pending".to_string()));
        // Cut inside its header, or emptied by the truncate before the write: the same.
        std::fs::write(&newest, &data[..10])?;
        assert_eq!(load(dir.path())?.map(|p| p.client_status), Some("pending".to_string()));
        std::fs::write(&newest, b"")?;
        assert_eq!(load(dir.path())?.map(|p| p.client_status), Some("pending".to_string()));
        // The next save goes into the torn slot, with the next sequence number.
        s.client_status = "complete".into();
        save(dir.path(), &s)?;
        assert_eq!(load(dir.path())?.map(|p| p.client_status), Some("complete".to_string()));
        Ok(())
    }

    #[test]
    fn a_writer_reads_the_slots_once_and_then_alternates() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut s = PersistedAlloc { alloc_id: "a1".into(), client_status: "pending".into(), ..Default::default() };
        // An earlier writer (the previous agent run) left seq 1 in state.0 and seq 2 in state.1.
        save(dir.path(), &s)?;
        save(dir.path(), &s)?;
        let mut slots = Slots::default();
        s.client_status = "running".into();
        slots.save(dir.path(), &s)?;
        // The writer went on from the newest slot: seq 3, into state.0.
        assert_eq!(read_slot(&dir.path().join(SLOT_FILES[0]))?.map(|(seq, _)| seq), Some(3));
        // From here on it does not read: a slot replaced behind its back is not noticed, which
        // is why it must be the allocation's only writer.
        std::fs::write(dir.path().join(SLOT_FILES[1]), b"")?;
        s.client_status = "complete".into();
        slots.save(dir.path(), &s)?;
        assert_eq!(read_slot(&dir.path().join(SLOT_FILES[1]))?.map(|(seq, _)| seq), Some(4));
        slots.save(dir.path(), &s)?;
        assert_eq!(read_slot(&dir.path().join(SLOT_FILES[0]))?.map(|(seq, _)| seq), Some(5));
        assert_eq!(load(dir.path())?, Some(s.clone()));
        // A failed write (the slot cannot be opened: a directory in its place) is tried again
        // into the same slot, with the same sequence number.
        let next = dir.path().join(SLOT_FILES[1]);
        std::fs::remove_file(&next)?;
        std::fs::create_dir(&next)?;
        slots.save(dir.path(), &s).err().ok_or_else(|| io::Error::other("a save into a directory succeeded"))?;
        std::fs::remove_dir(&next)?;
        slots.save(dir.path(), &s)?;
        assert_eq!(read_slot(&next)?.map(|(seq, _)| seq), Some(6));
        Ok(())
    }

    #[test]
    fn an_earlier_agents_state_json_is_read() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let s = PersistedAlloc { alloc_id: "old".into(), client_status: "running".into(), ..Default::default() };
        std::fs::write(dir.path().join(LEGACY_STATE_FILE), serde_json::to_vec_pretty(&s).map_err(io::Error::other)?)?;
        assert_eq!(load(dir.path())?, Some(s.clone()));
        // Once saved again the slots take over.
        let mut s2 = s;
        s2.client_status = "complete".into();
        save(dir.path(), &s2)?;
        assert_eq!(load(dir.path())?, Some(s2));
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
