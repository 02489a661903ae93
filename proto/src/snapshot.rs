//! Snapshot streams: the cluster state moves between the CLI and the servers (and from a
//! follower to the leader) in chunks, so a state larger than one gRPC message saves and restores.
//!
//! What moves (a *saved snapshot*, the bytes after a snapshot file's header line) comes in two
//! formats, told apart by their first bytes:
//!
//! * [`MAGIC`] (`MLPSNAP2`), the state's JSON length (u64 little-endian), the state's JSON, then
//!   every metric point (the points section, `mlp_server::tracking::points`): what `SnapshotSave`
//!   answers, the same bytes a Raft snapshot holds;
//! * the state's JSON alone (it starts with `{`): what `SnapshotSave` answered before metric
//!   points were saved. Still restored (the servers keep the points of the runs it has).

use crate::v1::{SnapshotRestoreRequest, SnapshotSaveResponse};

/// Bytes of state in one stream message.
pub const CHUNK_BYTES: usize = 1024 * 1024;

/// The first bytes of a saved snapshot that carries metric points after the state.
pub const MAGIC: &[u8; 8] = b"MLPSNAP2";

/// A saved snapshot whose parts cannot be told apart.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FormatError {
    #[error("the snapshot is truncated: its header says {0} bytes of state")]
    Truncated(u64),
}

/// The parts of a saved snapshot: the state's JSON, and the points section (`None` for the
/// older format, the state's JSON alone).
pub fn split(saved: &[u8]) -> Result<(&[u8], Option<&[u8]>), FormatError> {
    let Some(rest) = saved.strip_prefix(MAGIC.as_slice()) else {
        return Ok((saved, None));
    };
    let len: [u8; 8] = rest.get(..8).and_then(|b| b.try_into().ok()).ok_or(FormatError::Truncated(0))?;
    let n = u64::from_le_bytes(len);
    let body = &rest[8..];
    match usize::try_from(n) {
        Ok(n) if n <= body.len() => {
            let (state, points) = body.split_at(n);
            Ok((state, Some(points)))
        }
        _ => Err(FormatError::Truncated(n)),
    }
}

/// `saved` as `SnapshotSave` answers it: every chunk carries the state's index; an empty state
/// is one empty chunk. Each chunk is copied out when it is sent, not all at once.
pub fn save_chunks(saved: Vec<u8>, index: u64) -> impl Iterator<Item = SnapshotSaveResponse> + Send + 'static {
    chunk_ranges(saved.len()).map(move |r| SnapshotSaveResponse { state: saved[r].to_vec(), index })
}

/// `saved` as a `SnapshotRestore` stream: the whole snapshot's crc32 travels in the first chunk.
pub fn restore_chunks(saved: Vec<u8>, crc32: u32) -> impl Iterator<Item = SnapshotRestoreRequest> + Send + 'static {
    chunk_ranges(saved.len())
        .enumerate()
        .map(move |(i, r)| SnapshotRestoreRequest { state: saved[r].to_vec(), crc32: if i == 0 { crc32 } else { 0 } })
}

fn chunk_ranges(len: usize) -> impl Iterator<Item = std::ops::Range<usize>> + Send + 'static {
    let n = len.div_ceil(CHUNK_BYTES).max(1);
    (0..n).map(move |i| (i * CHUNK_BYTES).min(len)..((i + 1) * CHUNK_BYTES).min(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_concatenate_to_the_state_and_carry_the_crc_once() {
        let state: Vec<u8> = (0..(2 * CHUNK_BYTES + 10)).map(|i| i as u8).collect();
        let restore: Vec<_> = restore_chunks(state.clone(), 7).collect();
        assert_eq!(restore.len(), 3);
        assert_eq!(restore.iter().map(|c| c.crc32).collect::<Vec<_>>(), [7, 0, 0]);
        assert_eq!(restore.iter().flat_map(|c| c.state.clone()).collect::<Vec<_>>(), state);
        let save: Vec<_> = save_chunks(state.clone(), 42).collect();
        assert!(save.iter().all(|c| c.index == 42));
        assert_eq!(save.iter().flat_map(|c| c.state.clone()).collect::<Vec<_>>(), state);
        assert_eq!(save_chunks(Vec::new(), 3).count(), 1, "an empty state is still one message");
        assert_eq!(restore_chunks(Vec::new(), 0).count(), 1);
        assert_eq!(restore_chunks(vec![0; CHUNK_BYTES], 0).count(), 1);
    }

    #[test]
    fn split_tells_the_formats_apart_and_refuses_a_truncated_one() {
        assert_eq!(split(b"{\"jobs\":{}}"), Ok((&b"{\"jobs\":{}}"[..], None)));
        let mut saved = MAGIC.to_vec();
        saved.extend_from_slice(&2u64.to_le_bytes());
        saved.extend_from_slice(b"{}\x01\x02");
        assert_eq!(split(&saved), Ok((&b"{}"[..], Some(&b"\x01\x02"[..]))));
        assert_eq!(split(&saved[..saved.len() - 3]), Err(FormatError::Truncated(2)));
        assert_eq!(split(&saved[..10]), Err(FormatError::Truncated(0)));
    }
}
