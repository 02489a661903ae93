//! Snapshot streams: the cluster state moves between the CLI and the servers (and from a
//! follower to the leader) in chunks, so a state larger than one gRPC message saves and restores.

use crate::v1::{SnapshotRestoreRequest, SnapshotSaveResponse};

/// Bytes of state in one stream message.
pub const CHUNK_BYTES: usize = 1024 * 1024;

/// `state` as `SnapshotSave` answers it: every chunk carries the state's index; an empty state
/// is one empty chunk.
pub fn save_chunks(state: &[u8], index: u64) -> Vec<SnapshotSaveResponse> {
    chunks(state).map(|c| SnapshotSaveResponse { state: c.to_vec(), index }).collect()
}

/// `state` as a `SnapshotRestore` stream: the whole state's crc32 travels in the first chunk.
pub fn restore_chunks(state: &[u8], crc32: u32) -> Vec<SnapshotRestoreRequest> {
    chunks(state).enumerate().map(|(i, c)| SnapshotRestoreRequest { state: c.to_vec(), crc32: if i == 0 { crc32 } else { 0 } }).collect()
}

fn chunks(state: &[u8]) -> impl Iterator<Item = &[u8]> {
    let empty: &[u8] = &[];
    let first_if_empty = state.is_empty().then_some(empty);
    first_if_empty.into_iter().chain(state.chunks(CHUNK_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_concatenate_to_the_state_and_carry_the_crc_once() {
        let state: Vec<u8> = (0..(2 * CHUNK_BYTES + 10)).map(|i| i as u8).collect();
        let restore = restore_chunks(&state, 7);
        assert_eq!(restore.len(), 3);
        assert_eq!(restore.iter().map(|c| c.crc32).collect::<Vec<_>>(), [7, 0, 0]);
        assert_eq!(restore.iter().flat_map(|c| c.state.clone()).collect::<Vec<_>>(), state);
        let save = save_chunks(&state, 42);
        assert!(save.iter().all(|c| c.index == 42));
        assert_eq!(save_chunks(&[], 3).len(), 1, "an empty state is still one message");
        assert_eq!(restore_chunks(&[], 0).len(), 1);
    }
}
