//! A linearizability checker for a history of per-key registers (writes and reads of one value
//! per key), in the style of Wing & Gong / Knossos / porcupine: for each key, a depth-first
//! search for an order of the operations that respects real time (an operation that returned
//! before another was invoked comes first) and the register's semantics (a read returns the
//! last value written, or the initial `None`), with memoisation of (set of linearized
//! operations, register value) states already shown to lead nowhere.
//!
//! Operations whose outcome is unknown (a write that timed out or failed after it may have
//! reached the servers) may take effect at any point after their invocation, or never: they
//! have no response event, so the search may linearize them or leave them out. Writes known
//! not to have happened are dropped; reads that failed say nothing and are dropped too.
//!
//! The search is bounded ([`Checker::max_states`]); a history that exhausts the bound is
//! reported as [`Verdict::Inconclusive`], never as linearizable.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What an operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Set the register to this value.
    Write(u64),
    /// Returned this value (`None`: the register was never written).
    Read(Option<u64>),
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged: it took effect between its invocation and its response.
    Ok,
    /// Known not to have taken effect.
    Failed,
    /// Ambiguous (timeout, lost connection): it may or may not take effect, at any time after
    /// its invocation.
    Unknown,
}

/// One operation on one key; times are nanoseconds on one clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub key: String,
    pub kind: Kind,
    pub call: u64,
    pub ret: u64,
    pub outcome: Outcome,
    /// Who ran it (for messages).
    pub client: usize,
}

/// The checker's answer for a whole history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// The key whose history has no linearization, with that history (in invocation order).
    NotLinearizable {
        key: String,
        history: Vec<Op>,
    },
    /// The bound on explored states was reached for this key.
    Inconclusive {
        key: String,
        states: usize,
    },
}

/// The search and its bound.
#[derive(Debug, Clone, Copy)]
pub struct Checker {
    /// Most (linearized set, value) states explored per key.
    pub max_states: usize,
}

impl Default for Checker {
    fn default() -> Self {
        Checker { max_states: 2_000_000 }
    }
}

impl Checker {
    /// Checks every key of `history` on its own (linearizability is compositional).
    pub fn check(&self, history: &[Op]) -> Verdict {
        let mut by_key: BTreeMap<&str, Vec<Op>> = BTreeMap::new();
        for op in history {
            by_key.entry(op.key.as_str()).or_default().push(op.clone());
        }
        for (key, ops) in by_key {
            match self.check_key(ops) {
                KeyVerdict::Ok => {}
                KeyVerdict::No(history) => return Verdict::NotLinearizable { key: key.to_string(), history },
                KeyVerdict::Bound(states) => return Verdict::Inconclusive { key: key.to_string(), states },
            }
        }
        Verdict::Linearizable
    }

    fn check_key(&self, ops: Vec<Op>) -> KeyVerdict {
        // Failed writes never happened; failed or unknown reads tell nothing.
        let mut ops: Vec<Op> =
            ops.into_iter().filter(|o| !matches!((o.kind, o.outcome), (_, Outcome::Failed) | (Kind::Read(_), Outcome::Unknown))).collect();
        ops.sort_by_key(|o| (o.call, o.ret));
        let n = ops.len();
        // An unknown write may happen at any time after its call: it has no response.
        let ret: Vec<u64> = ops.iter().map(|o| if o.outcome == Outcome::Unknown { u64::MAX } else { o.ret }).collect();
        let mut search = Search {
            ops: &ops,
            ret: &ret,
            done: vec![0u64; n.div_ceil(64)],
            required_left: ret.iter().filter(|r| **r != u64::MAX).count(),
            dead: HashSet::new(),
            states: 0,
            max_states: self.max_states,
        };
        match search.dfs(None) {
            Some(true) => KeyVerdict::Ok,
            Some(false) => KeyVerdict::No(ops.clone()),
            None => KeyVerdict::Bound(search.states),
        }
    }
}

enum KeyVerdict {
    Ok,
    No(Vec<Op>),
    Bound(usize),
}

struct Search<'a> {
    ops: &'a [Op],
    ret: &'a [u64],
    /// Bitset of the operations linearized so far.
    done: Vec<u64>,
    /// Operations with a response not yet linearized.
    required_left: usize,
    /// States known to lead to no linearization.
    dead: HashSet<(Vec<u64>, Option<u64>)>,
    states: usize,
    max_states: usize,
}

impl Search<'_> {
    fn is_done(&self, i: usize) -> bool {
        self.done[i / 64] & (1 << (i % 64)) != 0
    }

    fn flip(&mut self, i: usize) {
        self.done[i / 64] ^= 1 << (i % 64);
    }

    /// `Some(true)`: a linearization exists from here; `Some(false)`: none; `None`: bound hit.
    fn dfs(&mut self, value: Option<u64>) -> Option<bool> {
        if self.required_left == 0 {
            return Some(true);
        }
        if self.dead.contains(&(self.done.clone(), value)) {
            return Some(false);
        }
        self.states += 1;
        if self.states > self.max_states {
            return None;
        }
        // The next operation must be invoked before every pending operation's response
        // (otherwise that one returned first and must come first).
        let horizon = (0..self.ops.len()).filter(|i| !self.is_done(*i)).map(|i| self.ret[i]).min().unwrap_or(u64::MAX);
        for i in 0..self.ops.len() {
            if self.is_done(i) {
                continue;
            }
            if self.ops[i].call > horizon {
                break; // sorted by invocation: no later one qualifies either
            }
            let next = match self.ops[i].kind {
                Kind::Write(v) => Some(v),
                Kind::Read(r) if r == value => value,
                Kind::Read(_) => continue,
            };
            self.flip(i);
            let required = self.ret[i] != u64::MAX;
            if required {
                self.required_left -= 1;
            }
            let found = self.dfs(next);
            self.flip(i);
            if required {
                self.required_left += 1;
            }
            match found {
                Some(false) => {}
                other => return other,
            }
        }
        self.dead.insert((self.done.clone(), value));
        Some(false)
    }
}

/// Records operations from many threads against one clock.
#[derive(Debug, Clone)]
pub struct Recorder {
    start: Instant,
    ops: Arc<Mutex<Vec<Op>>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder { start: Instant::now(), ops: Arc::new(Mutex::new(Vec::new())) }
    }

    /// Now, on the recorder's clock.
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Records an operation invoked at `call` (from [`Recorder::now`]) that ended now.
    pub fn record(&self, client: usize, key: &str, kind: Kind, call: u64, outcome: Outcome) {
        let op = Op { key: key.to_string(), kind, call, ret: self.now(), outcome, client };
        self.ops.lock().expect("history lock").push(op);
    }

    pub fn history(&self) -> Vec<Op> {
        self.ops.lock().expect("history lock").clone()
    }
}

/// A history as text, one operation a line (for failure messages), at most `max` lines.
pub fn describe(ops: &[Op], max: usize) -> String {
    let mut out = String::new();
    for o in ops.iter().take(max) {
        let ret = if o.outcome == Outcome::Unknown { "?".to_string() } else { format!("{:.3}", o.ret as f64 / 1e9) };
        out.push_str(&format!("  c{} {:?} [{:.3}s, {ret}s] {:?}\n", o.client, o.kind, o.call as f64 / 1e9, o.outcome));
    }
    if ops.len() > max {
        out.push_str(&format!("  … {} more\n", ops.len() - max));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(client: usize, v: u64, call: u64, ret: u64) -> Op {
        Op { key: "k".into(), kind: Kind::Write(v), call, ret, outcome: Outcome::Ok, client }
    }
    fn r(client: usize, v: Option<u64>, call: u64, ret: u64) -> Op {
        Op { key: "k".into(), kind: Kind::Read(v), call, ret, outcome: Outcome::Ok, client }
    }
    fn unknown(mut op: Op) -> Op {
        op.outcome = Outcome::Unknown;
        op
    }
    fn failed(mut op: Op) -> Op {
        op.outcome = Outcome::Failed;
        op
    }
    fn ok(h: &[Op]) -> bool {
        match Checker::default().check(h) {
            Verdict::Linearizable => true,
            Verdict::NotLinearizable { .. } => false,
            v @ Verdict::Inconclusive { .. } => panic!("{v:?}"),
        }
    }

    #[test]
    fn sequential_histories() {
        assert!(ok(&[]));
        assert!(ok(&[r(0, None, 0, 1)]));
        assert!(ok(&[w(0, 1, 0, 10), r(1, Some(1), 20, 30), w(0, 2, 40, 50), r(1, Some(2), 60, 70)]));
        // A stale read: 2 was acknowledged before the read began.
        assert!(!ok(&[w(0, 1, 0, 10), w(0, 2, 20, 30), r(1, Some(1), 40, 50)]));
        // A lost write: acknowledged, then never seen.
        assert!(!ok(&[w(0, 1, 0, 10), r(1, None, 20, 30)]));
        // A value nobody wrote.
        assert!(!ok(&[w(0, 1, 0, 10), r(1, Some(7), 20, 30)]));
    }

    #[test]
    fn concurrency_allows_either_order_but_not_going_back() {
        // A read overlapping a write may see the old or the new value…
        assert!(ok(&[w(0, 1, 0, 100), r(1, None, 10, 20), r(2, Some(1), 30, 40)]));
        assert!(ok(&[w(0, 1, 0, 100), r(1, Some(1), 10, 20)]));
        // …but once a read saw the new value, a later read cannot see the old one.
        assert!(!ok(&[w(0, 1, 0, 100), r(1, Some(1), 10, 20), r(2, None, 30, 40)]));
        // Two overlapping writes: readers after both agree on one last value.
        assert!(ok(&[w(0, 1, 0, 50), w(1, 2, 10, 60), r(2, Some(1), 70, 80), r(3, Some(1), 90, 95)]));
        assert!(ok(&[w(0, 1, 0, 50), w(1, 2, 10, 60), r(2, Some(2), 70, 80)]));
        assert!(!ok(&[w(0, 1, 0, 50), w(1, 2, 10, 60), r(2, Some(2), 70, 80), r(3, Some(1), 90, 95)]));
        // Reads during the overlap may see 2 then 1 (2 linearized first), not 1, 2, then 1.
        assert!(ok(&[w(0, 1, 0, 50), w(1, 2, 10, 60), r(2, Some(2), 20, 25), r(3, Some(1), 30, 35)]));
        assert!(!ok(&[w(0, 1, 0, 50), w(1, 2, 10, 60), r(2, Some(1), 15, 18), r(2, Some(2), 20, 25), r(3, Some(1), 30, 35)]));
    }

    #[test]
    fn ambiguous_writes_may_or_may_not_happen() {
        // Never observed: fine.
        assert!(ok(&[unknown(w(0, 1, 0, 10)), r(1, None, 20, 30)]));
        // Observed long after the client gave up: fine (it committed late).
        assert!(ok(&[unknown(w(0, 1, 0, 10)), r(1, None, 20, 30), r(1, Some(1), 40, 50)]));
        // But it happens at most once, and not before it was invoked.
        assert!(!ok(&[unknown(w(0, 1, 0, 10)), r(1, Some(1), 20, 30), r(1, None, 40, 50)]));
        assert!(!ok(&[r(1, Some(1), 0, 5), unknown(w(0, 1, 10, 20))]));
        assert!(!ok(&[
            w(0, 5, 0, 1),
            unknown(w(0, 1, 2, 3)),
            r(1, Some(1), 4, 5),
            w(2, 6, 6, 7),
            r(1, Some(6), 8, 9),
            r(1, Some(1), 10, 11)
        ]));
        // A write known to have failed never happened.
        assert!(!ok(&[failed(w(0, 1, 0, 10)), r(1, Some(1), 20, 30)]));
        // A failed or unknown read says nothing.
        assert!(ok(&[w(0, 1, 0, 10), failed(r(1, Some(9), 20, 30)), unknown(r(1, None, 20, 30))]));
    }

    #[test]
    fn keys_are_independent_and_named_in_the_verdict() {
        let mut other = r(1, Some(1), 20, 30);
        other.key = "other".into();
        let h = [w(0, 1, 0, 10), other];
        match Checker::default().check(&h) {
            Verdict::NotLinearizable { key, history } => {
                assert_eq!(key, "other");
                assert_eq!(history.len(), 1);
            }
            v => panic!("{v:?}"),
        }
    }

    /// Many clients, high overlap, ambiguous writes: linearizable by construction (each
    /// operation's effect is placed at a point inside its interval), and the memoised search
    /// answers well within its bound. The same history with one read corrupted is refused.
    #[test]
    fn a_large_concurrent_history_is_checked_within_the_bound() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        // Points in time at which effects happen, in order; each op's interval contains its point.
        let mut h = Vec::new();
        let mut value = None;
        for step in 0..400u64 {
            let t = step * 100;
            let client = rand(8) as usize;
            let (call, ret) = (t - rand(100).min(t), t + 1 + rand(300));
            if rand(3) == 0 {
                value = Some(step);
                let mut op = w(client, step, call, ret);
                if rand(10) == 0 {
                    op.outcome = Outcome::Unknown;
                }
                h.push(op);
            } else {
                h.push(r(client, value, call, ret));
            }
        }
        let checker = Checker { max_states: 200_000 };
        assert_eq!(checker.check(&h), Verdict::Linearizable);
        // Corrupt one late read to an old value: refused (or, at worst, inconclusive).
        let i = h.iter().rposition(|o| matches!(o.kind, Kind::Read(Some(v)) if v > 50)).expect("a late read");
        h[i].kind = Kind::Read(Some(0));
        assert!(!matches!(checker.check(&h), Verdict::Linearizable));
    }
}
