//! Compact JSON of the protobuf messages, for what only servers read back: Raft log entries,
//! forwarded writes and snapshots.
//!
//! Inside [`encode`], every message field at its default (`""`, `0`, `false`, empty list or
//! map, absent message) is left out of the JSON; everywhere else (the HTTP API, the event
//! stream) the JSON is as it always was. Reading is the same for both: every message is
//! `#[serde(default)]`, so a field that is absent decodes to the value that was left out, and
//! JSON written before this (every field present) and after it decode alike, in either
//! direction between server versions.
//!
//! Why: a registered job's JSON was mostly default fields (2.8 KB per registration of the
//! `regs` benchmark's job, 1.8 KB without them), and decoding it was ~9.5% of a
//! follower's CPU (`docs/benchmarks.md`, "Compact JSON for Raft entries").
//!
//! The switch is a thread-local flag, set for the duration of one synchronous serialization:
//! serde's `skip_serializing_if` takes no context of its own. The attributes are added to every
//! field by `build.rs`.

use std::cell::Cell;

thread_local! {
    static COMPACT: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` (a serialization) with default fields left out of the protobuf messages' JSON.
pub fn encode<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            COMPACT.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(COMPACT.with(|c| c.replace(true)));
    f()
}

/// Whether a field is left out: inside [`encode`] and at its default.
pub fn skip<T: Default + PartialEq>(v: &T) -> bool {
    COMPACT.with(Cell::get) && *v == T::default()
}

/// [`skip`] for a float: only `+0.0` is left out, so `-0.0` (which compares equal to it) keeps
/// its sign through a round trip. A follower applies the decoded value and the leader the one it
/// encoded: they must be the same bits.
pub fn skip_float<T: Into<f64> + Copy>(v: &T) -> bool {
    COMPACT.with(Cell::get) && (*v).into().to_bits() == 0
}

#[cfg(test)]
mod tests {
    use crate::v1::{Job, Resources, Task, TaskGroup};

    fn job() -> Job {
        Job {
            id: "j".into(),
            groups: vec![TaskGroup {
                name: "g".into(),
                count: Some(0),
                tasks: vec![Task {
                    name: "t".into(),
                    resources: Some(Resources { cpu_mhz: 100, ..Default::default() }),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn default_fields_are_left_out_only_inside_encode_and_read_back_the_same() {
        let j = job();
        let full = serde_json::to_string(&j).expect("encodes");
        let compact = super::encode(|| serde_json::to_string(&j)).expect("encodes");
        assert!(compact.len() * 2 < full.len(), "compact {compact} against full {full}");
        // Outside `encode` again: the full form.
        assert_eq!(serde_json::to_string(&j).expect("encodes"), full);
        // `count: Some(0)` differs from its default (absent) and stays.
        assert!(compact.contains("\"count\":0"), "{compact}");
        assert!(!compact.contains("\"priority\""), "{compact}");
        assert!(full.contains("\"priority\":0"), "{full}");
        let back: Job = serde_json::from_str(&compact).expect("decodes");
        assert_eq!(back, j);
        let back: Job = serde_json::from_str(&full).expect("decodes");
        assert_eq!(back, j);
    }

    #[test]
    fn a_negative_zero_keeps_its_sign() {
        assert!(!super::encode(|| super::skip_float(&-0.0f64)));
        assert!(super::encode(|| super::skip_float(&0.0f64)));
        assert!(!super::encode(|| super::skip_float(&0.5f32)));
        assert!(!super::skip_float(&0.0f64));
    }

    #[test]
    fn the_flag_is_restored_after_a_panic() {
        let r = std::panic::catch_unwind(|| super::encode(|| panic!("boom")));
        assert!(r.is_err());
        assert!(!super::skip(&0u32));
    }
}
