//! Metric points on disk: every point logged to a run lives in one sled tree of the server's
//! Raft database (`tracking_points`), not in the replicated in-memory state, which keeps only a
//! run's latest value per key (`Run::latest_metrics`).
//!
//! Key: `[u16 run id length][run id][u16 metric key length][metric key][u64 log index][u32 seq]`
//! (big-endian), so one run's history of one key is one prefix range in logged order, and one
//! run's points are one prefix. The log index and the point's ordinal within its entry (`seq`)
//! come from the committed entry, so applying an entry again (the log tail replayed after a
//! restart) writes the same keys with the same values: idempotent. Value: step, timestamp
//! (i64) and the value's bits (f64), little-endian, 24 bytes.
//!
//! The writes of one entry are collected while the entry is applied (`PendingPoints`) and
//! written as one sled batch before the applied index moves (`StateHandle::apply_entry`).
//! Without an attached tree (unit tests, the simulator) the points go to a map in memory.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use super::state::{MetricPoint, MetricValue};

/// The sled tree's name in the Raft database.
pub const TREE: &str = "tracking_points";

/// Errors reading or writing points.
#[derive(Debug, thiserror::Error)]
pub enum PointsError {
    #[error("tracking points tree: {0}")]
    Sled(#[from] sled::Error),
    #[error("tracking points: malformed {0}")]
    Malformed(&'static str),
}

/// One change to the tree, produced by applying a tracking command.
#[derive(Debug, Clone, PartialEq)]
pub enum PointOp {
    Put {
        key: Vec<u8>,
        value: [u8; 24],
    },
    /// Every point of the run (a purge).
    RemoveRun(String),
    /// Every point there is (an operator's restore, before it loads the saved ones): the ops
    /// before it in the entry are moot, the ones after it apply to an empty tree.
    Clear,
}

/// The point writes of the entry being applied. `seq` counts points within one entry (across
/// its requests), so keys are unique and deterministic.
#[derive(Debug, Clone, Default)]
pub struct PendingPoints {
    index: u64,
    seq: u32,
    pub ops: Vec<PointOp>,
}

impl PendingPoints {
    /// The index of the entry whose points were put last.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// A point of `run`'s metric `key`, logged by the entry at `index`.
    pub fn put(&mut self, index: u64, run: &str, key: &str, p: &MetricPoint) {
        if index != self.index {
            self.index = index;
            self.seq = 0;
        }
        let k = point_key(run, key, index, self.seq);
        self.seq = self.seq.wrapping_add(1);
        self.ops.push(PointOp::Put { key: k, value: encode_value(p) });
    }

    pub fn remove_run(&mut self, run: &str) {
        self.ops.push(PointOp::RemoveRun(run.to_string()));
    }

    /// Every point goes (see [`PointOp::Clear`]).
    pub fn clear_all(&mut self) {
        self.ops.push(PointOp::Clear);
    }

    /// A point under a key it already has (a restored snapshot's).
    pub fn put_raw(&mut self, key: Vec<u8>, value: [u8; 24]) {
        self.ops.push(PointOp::Put { key, value });
    }
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    // Run ids and metric keys are at most a few hundred characters (checked by the API).
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
}

/// The prefix of every point of `run`.
pub fn run_prefix(run: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + run.len());
    push_str(&mut out, run);
    out
}

/// The prefix of `run`'s history of `key`.
pub fn series_prefix(run: &str, key: &str) -> Vec<u8> {
    let mut out = run_prefix(run);
    push_str(&mut out, key);
    out
}

pub fn point_key(run: &str, key: &str, index: u64, seq: u32) -> Vec<u8> {
    let mut out = series_prefix(run, key);
    out.extend_from_slice(&index.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out
}

pub fn encode_value(p: &MetricPoint) -> [u8; 24] {
    let mut v = [0u8; 24];
    v[..8].copy_from_slice(&p.step.to_le_bytes());
    v[8..16].copy_from_slice(&p.timestamp.to_le_bytes());
    v[16..].copy_from_slice(&p.value.0.to_bits().to_le_bytes());
    v
}

pub fn decode_value(v: &[u8]) -> Result<MetricPoint, PointsError> {
    let arr: [u8; 24] = v.try_into().map_err(|_| PointsError::Malformed("point value"))?;
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&arr[i..i + 8]);
        w
    };
    Ok(MetricPoint {
        step: i64::from_le_bytes(word(0)),
        timestamp: i64::from_le_bytes(word(8)),
        value: MetricValue(f64::from_bits(u64::from_le_bytes(word(16)))),
    })
}

/// A key split into its parts: run, metric key, log index, seq.
pub struct KeyParts<'a> {
    pub run: &'a str,
    pub key: &'a str,
    pub index: u64,
    pub seq: u32,
}

fn take_str<'a>(b: &mut &'a [u8]) -> Result<&'a str, PointsError> {
    if b.len() < 2 {
        return Err(PointsError::Malformed("point key"));
    }
    let n = usize::from(u16::from_be_bytes([b[0], b[1]]));
    if b.len() < 2 + n {
        return Err(PointsError::Malformed("point key"));
    }
    let s = std::str::from_utf8(&b[2..2 + n]).map_err(|_| PointsError::Malformed("point key"))?;
    *b = &b[2 + n..];
    Ok(s)
}

pub fn split_key(k: &[u8]) -> Result<KeyParts<'_>, PointsError> {
    let mut b = k;
    let run = take_str(&mut b)?;
    let key = take_str(&mut b)?;
    if b.len() != 12 {
        return Err(PointsError::Malformed("point key"));
    }
    let mut i = [0u8; 8];
    i.copy_from_slice(&b[..8]);
    let mut s = [0u8; 4];
    s.copy_from_slice(&b[8..]);
    Ok(KeyParts { run, key, index: u64::from_be_bytes(i), seq: u32::from_be_bytes(s) })
}

/// How many keys go into one sled batch when a whole snapshot's points are loaded.
const LOAD_CHUNK: usize = 50_000;

/// Where the points are: the sled tree once attached, a map in memory before.
#[derive(Default)]
pub struct PointStore {
    tree: OnceLock<sled::Tree>,
    mem: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
    /// Counts the changes that a key's log index does not place after the entries already
    /// applied: removals (purges, clears, a snapshot's load) and puts of keys from another
    /// index (an operator restore's points). Bumped before the change is written, so a reader
    /// that saw the count unchanged after a scan saw none of them (see [`encode_up_to`]).
    unordered: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl std::fmt::Debug for PointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointStore").field("on_disk", &self.tree.get().is_some()).finish()
    }
}

impl PointStore {
    /// From now on, points live in `tree` (the Raft database's). Done once, before anything is
    /// applied; a second call is ignored.
    pub fn attach(&self, tree: sled::Tree) {
        if self.tree.set(tree).is_err() {
            tracing::warn!("tracking points tree attached twice; keeping the first");
        }
    }

    /// The keys of every point of `run`.
    fn run_keys(&self, run: &str) -> Result<Vec<Vec<u8>>, PointsError> {
        let prefix = run_prefix(run);
        match self.tree.get() {
            Some(t) => t.scan_prefix(&prefix).keys().map(|k| Ok(k?.to_vec())).collect(),
            None => {
                Ok(lock(&self.mem).range(prefix.clone()..).take_while(|(k, _)| k.starts_with(&prefix)).map(|(k, _)| k.clone()).collect())
            }
        }
    }

    /// How many unordered changes there have been (see the field).
    pub fn unordered_changes(&self) -> u64 {
        self.unordered.load(Ordering::SeqCst)
    }

    /// Writes the changes of the entry at `index`, in order, as one batch (a run purged after
    /// points of it in the same entry loses those too).
    pub fn apply(&self, index: u64, ops: &[PointOp]) -> Result<(), PointsError> {
        if ops.is_empty() {
            return Ok(());
        }
        let ordered = ops.iter().all(|op| match op {
            PointOp::Put { key, .. } => split_key(key).is_ok_and(|parts| parts.index == index),
            PointOp::RemoveRun(_) | PointOp::Clear => false,
        });
        if !ordered {
            self.unordered.fetch_add(1, Ordering::SeqCst);
        }
        let mut changes: BTreeMap<Vec<u8>, Option<[u8; 24]>> = BTreeMap::new();
        // Only the last clear matters: what came before it is gone either way.
        let clear = ops.iter().rposition(|op| *op == PointOp::Clear);
        let ops = clear.map_or(ops, |i| &ops[i + 1..]);
        for op in ops {
            match op {
                PointOp::Clear => {}
                PointOp::Put { key, value } => {
                    changes.insert(key.clone(), Some(*value));
                }
                PointOp::RemoveRun(run) => {
                    let prefix = run_prefix(run);
                    for k in changes.range_mut(prefix.clone()..).take_while(|(k, _)| k.starts_with(&prefix)) {
                        *k.1 = None;
                    }
                    if clear.is_none() {
                        for k in self.run_keys(run)? {
                            changes.insert(k, None);
                        }
                    }
                }
            }
        }
        match self.tree.get() {
            Some(t) => {
                // Not atomic with the batch: a crash between them leaves the entry unapplied
                // (the applied index has not moved), and applying it again clears again.
                if clear.is_some() {
                    t.clear()?;
                }
                let mut batch = sled::Batch::default();
                for (k, v) in changes {
                    match v {
                        Some(v) => batch.insert(k, v.as_slice()),
                        None => batch.remove(k),
                    }
                }
                t.apply_batch(batch)?;
            }
            None => {
                let mut mem = lock(&self.mem);
                if clear.is_some() {
                    mem.clear();
                }
                for (k, v) in changes {
                    match v {
                        Some(v) => mem.insert(k, v.to_vec()),
                        None => mem.remove(&k),
                    };
                }
            }
        }
        Ok(())
    }

    /// `run`'s history of `key`, in logged order.
    pub fn history(&self, run: &str, key: &str) -> Result<Vec<MetricPoint>, PointsError> {
        let prefix = series_prefix(run, key);
        match self.tree.get() {
            Some(t) => t.scan_prefix(&prefix).values().map(|v| decode_value(&v?)).collect(),
            None => {
                lock(&self.mem).range(prefix.clone()..).take_while(|(k, _)| k.starts_with(&prefix)).map(|(_, v)| decode_value(v)).collect()
            }
        }
    }

    /// How many points `run` has.
    pub fn run_len(&self, run: &str) -> Result<usize, PointsError> {
        Ok(self.run_keys(run)?.len())
    }

    /// How many points there are in all.
    pub fn len(&self) -> usize {
        match self.tree.get() {
            Some(t) => t.len(),
            None => lock(&self.mem).len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` with every (key, value), in key order.
    pub fn for_each(&self, mut f: impl FnMut(&[u8], &[u8]) -> Result<(), PointsError>) -> Result<(), PointsError> {
        match self.tree.get() {
            Some(t) => {
                for item in t.iter() {
                    let (k, v) = item?;
                    f(&k, &v)?;
                }
            }
            None => {
                for (k, v) in lock(&self.mem).iter() {
                    f(k, v)?;
                }
            }
        }
        Ok(())
    }

    /// Replaces every point with `points` (a snapshot's), in chunks of [`LOAD_CHUNK`] keys.
    pub fn replace_all(&self, points: impl Iterator<Item = Result<(Vec<u8>, [u8; 24]), PointsError>>) -> Result<usize, PointsError> {
        self.unordered.fetch_add(1, Ordering::SeqCst);
        let mut n = 0;
        match self.tree.get() {
            Some(t) => {
                t.clear()?;
                let mut batch = sled::Batch::default();
                let mut in_batch = 0;
                for p in points {
                    let (k, v) = p?;
                    batch.insert(k, v.as_slice());
                    in_batch += 1;
                    n += 1;
                    if in_batch == LOAD_CHUNK {
                        t.apply_batch(std::mem::take(&mut batch))?;
                        in_batch = 0;
                    }
                }
                t.apply_batch(batch)?;
            }
            None => {
                let mut mem = lock(&self.mem);
                mem.clear();
                for p in points {
                    let (k, v) = p?;
                    mem.insert(k, v.to_vec());
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}

// ---- the points section of a snapshot ----
//
// After the state, a snapshot carries every point, in key order, grouped by series: a flag
// byte (1: a new series follows, its run id and key as varint length + bytes; 0: same series),
// then the point: varint log index (delta from the previous point of the series), varint seq,
// zigzag varint step, zigzag varint timestamp, 8 bytes of the value. About 15 bytes a point.

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &mut &[u8]) -> Result<u64, PointsError> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first().ok_or(PointsError::Malformed("snapshot points"))?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(PointsError::Malformed("snapshot points"))
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn get_bytes<'a>(b: &mut &'a [u8]) -> Result<&'a [u8], PointsError> {
    let n = usize::try_from(get_varint(b)?).map_err(|_| PointsError::Malformed("snapshot points"))?;
    if b.len() < n {
        return Err(PointsError::Malformed("snapshot points"));
    }
    let (s, rest) = b.split_at(n);
    *b = rest;
    Ok(s)
}

/// Writes points in the snapshot encoding, one after the other (grouping runs of the same
/// series); a fresh encoder starts a section that decodes on its own.
#[derive(Default)]
struct SectionEncoder {
    series: Vec<u8>,
    last_index: u64,
}

impl SectionEncoder {
    fn push(&mut self, out: &mut Vec<u8>, k: &[u8], v: &[u8]) -> Result<(), PointsError> {
        let parts = split_key(k)?;
        let p = decode_value(v)?;
        let prefix_len = k.len() - 12;
        if self.series.is_empty() || k[..prefix_len] != self.series[..] {
            self.series.clear();
            self.series.extend_from_slice(&k[..prefix_len]);
            out.push(1);
            put_varint(out, parts.run.len() as u64);
            out.extend_from_slice(parts.run.as_bytes());
            put_varint(out, parts.key.len() as u64);
            out.extend_from_slice(parts.key.as_bytes());
            self.last_index = 0;
        } else {
            out.push(0);
        }
        put_varint(out, parts.index.wrapping_sub(self.last_index));
        self.last_index = parts.index;
        put_varint(out, u64::from(parts.seq));
        put_varint(out, zigzag(p.step));
        put_varint(out, zigzag(p.timestamp));
        out.extend_from_slice(&p.value.0.to_bits().to_le_bytes());
        Ok(())
    }
}

/// Appends the store's points to `out` in the snapshot encoding.
pub fn encode_all(store: &PointStore, out: &mut Vec<u8>) -> Result<usize, PointsError> {
    encode_up_to(store, out, u64::MAX)
}

/// Appends the points logged by entries up to `index` to `out` in the snapshot encoding.
///
/// This needs no lock against applies: the entries after `index` only add keys of their own
/// index, which are left out, unless they make an unordered change (a purge, a restore), which
/// [`PointStore::unordered_changes`] counts. So when that count is the same after the scan as
/// it was when the entry at `index` was the last applied, the section holds exactly the
/// points as they were then.
pub fn encode_up_to(store: &PointStore, out: &mut Vec<u8>, index: u64) -> Result<usize, PointsError> {
    let mut enc = SectionEncoder::default();
    let mut n = 0;
    store.for_each(|k, v| {
        if index != u64::MAX && split_key(k)?.index > index {
            return Ok(());
        }
        enc.push(out, k, v)?;
        n += 1;
        Ok(())
    })?;
    Ok(n)
}

/// Decodes a snapshot's points section into tree keys and values.
pub fn decode_all(mut b: &[u8]) -> impl Iterator<Item = Result<(Vec<u8>, [u8; 24]), PointsError>> + '_ {
    let mut prefix: Vec<u8> = Vec::new();
    let mut last_index = 0u64;
    let mut failed = false;
    std::iter::from_fn(move || {
        if b.is_empty() || failed {
            return None;
        }
        let mut one = || -> Result<(Vec<u8>, [u8; 24]), PointsError> {
            let (&flag, rest) = b.split_first().ok_or(PointsError::Malformed("snapshot points"))?;
            b = rest;
            match flag {
                1 => {
                    let run = std::str::from_utf8(get_bytes(&mut b)?).map_err(|_| PointsError::Malformed("snapshot points"))?;
                    let key = std::str::from_utf8(get_bytes(&mut b)?).map_err(|_| PointsError::Malformed("snapshot points"))?;
                    prefix = series_prefix(run, key);
                    last_index = 0;
                }
                0 if !prefix.is_empty() => {}
                _ => return Err(PointsError::Malformed("snapshot points")),
            }
            let index = last_index.wrapping_add(get_varint(&mut b)?);
            last_index = index;
            let seq = u32::try_from(get_varint(&mut b)?).map_err(|_| PointsError::Malformed("snapshot points"))?;
            let step = unzigzag(get_varint(&mut b)?);
            let timestamp = unzigzag(get_varint(&mut b)?);
            if b.len() < 8 {
                return Err(PointsError::Malformed("snapshot points"));
            }
            let (bits, rest) = b.split_at(8);
            b = rest;
            let mut w = [0u8; 8];
            w.copy_from_slice(bits);
            let value = MetricValue(f64::from_bits(u64::from_le_bytes(w)));
            let mut key = prefix.clone();
            key.extend_from_slice(&index.to_be_bytes());
            key.extend_from_slice(&seq.to_be_bytes());
            Ok((key, encode_value(&MetricPoint { value, timestamp, step })))
        };
        let r = one();
        failed = r.is_err();
        Some(r)
    })
}

/// One part of a points section, re-encoded to decode on its own: what one
/// `Command::RestorePoints` carries.
#[derive(Debug, Clone, PartialEq)]
pub struct SectionChunk {
    /// The part's points in the snapshot encoding.
    pub bytes: Vec<u8>,
    pub points: u64,
}

/// Splits a points section into parts of at most about `max_bytes` each (a part ends once it
/// reaches `max_bytes` less the largest point, so none is over), each decodable alone. The
/// first error of the section ends the iteration with it.
pub fn section_chunks(section: &[u8], max_bytes: usize) -> impl Iterator<Item = Result<SectionChunk, PointsError>> + '_ {
    let mut points = decode_all(section).peekable();
    std::iter::from_fn(move || {
        points.peek()?;
        let mut chunk = SectionChunk { bytes: Vec::new(), points: 0 };
        let mut enc = SectionEncoder::default();
        while chunk.points == 0 || chunk.bytes.len() + MAX_ENCODED_POINT <= max_bytes {
            let Some(p) = points.next() else { break };
            let pushed = p.and_then(|(k, v)| enc.push(&mut chunk.bytes, &k, &v));
            if let Err(e) = pushed {
                return Some(Err(e));
            }
            chunk.points += 1;
        }
        Some(Ok(chunk))
    })
}

/// The most bytes one point takes in the snapshot encoding: a flag, run id and metric key
/// (each at most `u16::MAX` bytes with a 3-byte varint length), four varints of at most 10
/// bytes and the value.
const MAX_ENCODED_POINT: usize = 1 + 2 * (3 + u16::MAX as usize) + 4 * 10 + 8;

/// A point as the tree holds it: key and value.
pub type RawPoint = (Vec<u8>, [u8; 24]);

/// A chunk's points, checked whole: one malformed point fails all of them.
pub fn decode_chunk(bytes: &[u8]) -> Result<Vec<RawPoint>, PointsError> {
    decode_all(bytes).collect()
}

// ---- base64 (RFC 4648, padded): a chunk travels in the JSON of a Raft entry as a string ----

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(char::from(B64[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn base64_decode(text: &str) -> Result<Vec<u8>, PointsError> {
    let bad = || PointsError::Malformed("base64 chunk");
    let b = text.as_bytes();
    if !b.len().is_multiple_of(4) {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for (q, quad) in b.chunks(4).enumerate() {
        let last = (q + 1) * 4 == b.len();
        let pad = quad.iter().rev().take_while(|c| **c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return Err(bad());
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                _ => return Err(bad()),
            };
            n = (n << 6) | u32::from(v);
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Ok(out)
}

/// An operator's restore that replaces every metric point (`Command::RestoreState` with
/// `points`): its chunks follow as `Command::RestorePoints`, in order. Kept in the state
/// (`ClusterState::points_restore`) so that a chunk of another restore (superseded, or run
/// concurrently) is refused, a repeated one is a no-op, and a restore that stopped half-way
/// shows (`loaded_chunks < chunks`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct PointsRestore {
    /// Chosen by the server that runs the restore; unique per restore.
    pub id: String,
    /// The saved file's points and the chunks they come in.
    pub points: u64,
    pub chunks: u32,
    /// Applied so far (chunk `loaded_chunks` is the next one taken).
    #[serde(default)]
    pub loaded_chunks: u32,
    #[serde(default)]
    pub loaded_points: u64,
}

impl PointsRestore {
    pub fn complete(&self) -> bool {
        self.loaded_chunks >= self.chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(step: i64, timestamp: i64, value: f64) -> MetricPoint {
        MetricPoint { value: MetricValue(value), timestamp, step }
    }

    #[test]
    fn points_keep_logged_order_per_series_and_round_trip_the_snapshot_encoding() {
        let store = PointStore::default();
        let mut pending = PendingPoints::default();
        pending.put(7, "r1", "loss", &p(5, 100, 1.0));
        pending.put(7, "r1", "loss", &p(0, 90, f64::NAN));
        pending.put(7, "r1", "lossy", &p(1, 1, 2.0));
        pending.put(9, "r1", "loss", &p(-3, -4, f64::NEG_INFINITY));
        pending.put(9, "r2", "loss", &p(1, 1, 3.0));
        store.apply(pending.index(), &pending.ops).expect("apply");
        // The same entry again (a replay) adds nothing.
        store.apply(pending.index(), &pending.ops).expect("apply again");
        assert_eq!(store.len(), 5);
        let hist = store.history("r1", "loss").expect("history");
        let steps: Vec<i64> = hist.iter().map(|p| p.step).collect();
        assert_eq!(steps, vec![5, 0, -3], "logged order, not step order; `loss` is not mixed with `lossy`");
        assert!(hist[1].value.0.is_nan());

        let mut bytes = Vec::new();
        assert_eq!(encode_all(&store, &mut bytes).expect("encode"), 5);
        let other = PointStore::default();
        assert_eq!(other.replace_all(decode_all(&bytes)).expect("decode"), 5);
        let mut a = Vec::new();
        let mut b = Vec::new();
        for (store, out) in [(&store, &mut a), (&other, &mut b)] {
            store
                .for_each(|k, v| {
                    out.push((k.to_vec(), v.to_vec()));
                    Ok(())
                })
                .expect("read back");
        }
        assert_eq!(a, b);
        assert!(decode_all(&bytes[..bytes.len() - 3]).any(|r| r.is_err()), "a truncated section is an error");

        // A purge in the entry that also logged points of the run (and of another) removes the
        // run's new points too.
        let mut purge = PendingPoints::default();
        purge.put(11, "r1", "late", &p(0, 0, 0.0));
        purge.put(11, "r2", "late", &p(0, 0, 0.0));
        purge.remove_run("r1");
        store.apply(purge.index(), &purge.ops).expect("purge");
        assert_eq!(store.run_len("r1").expect("r1"), 0);
        assert_eq!(store.run_len("r2").expect("r2"), 2);
    }

    #[test]
    fn a_section_splits_into_chunks_that_decode_alone_to_the_same_points() {
        let store = PointStore::default();
        let mut pending = PendingPoints::default();
        for i in 0..200u32 {
            let run = format!("run-{}", i % 3);
            pending.put(
                u64::from(i / 7) + 1,
                &run,
                if i % 2 == 0 { "loss" } else { "acc" },
                &p(i64::from(i), -i64::from(i), f64::from(i) / 3.0),
            );
        }
        store.apply(pending.index(), &pending.ops).expect("apply");
        let mut section = Vec::new();
        encode_all(&store, &mut section).expect("encode");
        let whole: Vec<_> = decode_all(&section).collect::<Result<_, _>>().expect("decode");
        for max in [1, 64, 1000, usize::MAX] {
            let chunks: Vec<SectionChunk> = section_chunks(&section, max).collect::<Result<_, _>>().expect("chunks");
            assert!(chunks.iter().all(|c| c.points > 0 && (c.points == 1 || c.bytes.len() <= max)), "max {max}");
            let again: Vec<_> =
                chunks.iter().flat_map(|c| decode_chunk(&base64_decode(&base64_encode(&c.bytes)).expect("b64")).expect("chunk")).collect();
            assert_eq!(again, whole, "max {max}");
            assert_eq!(chunks.iter().map(|c| c.points).sum::<u64>(), 200);
        }
        assert_eq!(section_chunks(&section, usize::MAX).count(), 1);
        assert_eq!(section_chunks(&[], 10).count(), 0, "no points, no chunk");
        let mut bad = section.clone();
        bad.truncate(section.len() - 3);
        assert!(section_chunks(&bad, 100).any(|c| c.is_err()), "a truncated section fails");
    }

    #[test]
    fn base64_round_trips_and_refuses_what_is_not_base64() {
        for n in 0..10usize {
            let bytes: Vec<u8> = (0..n as u8).map(|b| b.wrapping_mul(37)).collect();
            let text = base64_encode(&bytes);
            assert_eq!(text.len() % 4, 0);
            assert_eq!(base64_decode(&text).expect("decode"), bytes);
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        for bad in ["Zm8", "Zm=8", "Z===", "Zm8=Zm8=", "Zm9v!mFy"] {
            assert!(base64_decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_clear_drops_every_point_and_what_the_entry_logged_before_it() {
        let store = PointStore::default();
        let mut pending = PendingPoints::default();
        pending.put(1, "r1", "loss", &p(0, 0, 1.0));
        pending.put(1, "r2", "loss", &p(0, 0, 1.0));
        store.apply(pending.index(), &pending.ops).expect("apply");
        let mut restore = PendingPoints::default();
        restore.put(2, "r1", "loss", &p(1, 1, 1.0));
        restore.clear_all();
        restore.put_raw(point_key("r3", "x", 1, 0), encode_value(&p(5, 5, 5.0)));
        store.apply(restore.index(), &restore.ops).expect("clear");
        assert_eq!(store.len(), 1);
        assert_eq!(store.history("r3", "x").expect("history"), vec![p(5, 5, 5.0)]);
        // Applied again (a replayed entry): the same.
        store.apply(restore.index(), &restore.ops).expect("clear again");
        assert_eq!(store.len(), 1);
    }
}
