//! The learned workload: FGD's "target workload" for a cluster that does not know its future.
//!
//! FGD scores a placement by how much it increases a node's expected GPU fragmentation against
//! the pod types the cluster will see. The trace simulator can take them from the whole trace
//! (foresight); a server cannot. [`LearnedWorkload`] is a small, decayed histogram of the GPU
//! asks that arrived so far, bucketed by ask shape (GPU count and share, accepted models), with
//! the weighted mean CPU and memory of each bucket. Each arrival multiplies every weight by
//! `1 − 2^-DECAY_SHIFT` and then adds one arrival's weight to its bucket, so the histogram
//! remembers about the last `2^DECAY_SHIFT` GPU asks.
//!
//! Both users call the same code: the server's state machine observes every GPU task of a
//! registered group (`ClusterState::apply`, one arrival per new group instance) and the scheduler
//! plans against [`LearnedWorkload::workload`]; `mlp sim --online` observes each pod as it
//! arrives, then places it against the same workload. The arithmetic is integer fixed point and
//! the state is part of the replicated state, so every replica that applied the same entries holds
//! the same histogram, bit for bit (no clock, no randomness, and a snapshot round-trips exactly).

use serde::{Deserialize, Serialize};

use super::gpu::{GpuShape, ModelSet, PodView, Workload, WHOLE};

/// Each arrival multiplies the older weights by `1 − 2^-DECAY_SHIFT` (a memory of ~1,024 asks).
pub const DECAY_SHIFT: u32 = 10;
/// Buckets kept at most (the lightest other bucket goes when a new shape would exceed it).
pub const MAX_BUCKETS: usize = 128;
/// One arrival's weight, in fixed point.
const UNIT: u64 = 1 << 16;
/// Buckets that decay below this weight (1/64 of one arrival, ~4,000 asks after their last
/// arrival) are dropped.
const FLOOR: u64 = UNIT >> 6;
/// Fixed-point scale of the decay factor.
const Q: u32 = 32;
/// CPU and memory asks are clamped to this before they are weighted (keeps the sums in u64).
const MAX_DIM: u64 = 1 << 24;

/// One bucket: a GPU ask shape, the models it accepts and the classes of its CPU and memory, its decayed weight and the decayed,
/// weight-scaled sums of its CPU and memory asks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    pub count: u32,
    pub milli: u32,
    /// `ModelSet` bits (`u64::MAX` = any model).
    pub models: u64,
    /// The CPU ask's class: its bit length (asks within a factor of two share a bucket).
    pub cpu_class: u32,
    /// The memory ask's class, likewise.
    pub mem_class: u32,
    pub weight: u64,
    pub cpu: u64,
    pub mem: u64,
}

impl Bucket {
    fn key(&self) -> Key {
        (self.count, self.milli, self.cpu_class, self.mem_class, self.models)
    }
}

type Key = (u32, u32, u32, u32, u64);

/// A CPU or memory ask's class: its bit length, so asks within a factor of two share a class
/// (in whatever unit the caller uses).
fn class(x: u64) -> u32 {
    64 - x.leading_zeros()
}

/// One observed GPU ask: the shape, the models it accepts, and its CPU and memory (in the units
/// the caller's node views use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    pub gpu: GpuShape,
    pub models: ModelSet,
    pub cpu: u64,
    pub mem: u64,
}

impl From<PodView> for Arrival {
    fn from(p: PodView) -> Arrival {
        Arrival { gpu: p.gpu, models: p.models, cpu: p.cpu, mem: p.mem }
    }
}

/// The decayed histogram of recent GPU asks (see the module doc). Bounded: at most
/// [`MAX_BUCKETS`] buckets, kept in key order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnedWorkload {
    buckets: Vec<Bucket>,
    /// GPU asks observed in all (saturating), for display.
    #[serde(default)]
    arrivals: u64,
}

/// `(1 − 2^-DECAY_SHIFT)^n` in Q32 fixed point, by squaring (rounding down at each step).
fn decay_pow(mut n: u64) -> u128 {
    let one: u128 = 1 << Q;
    let mut base: u128 = one - (one >> DECAY_SHIFT);
    let mut acc: u128 = one;
    while n > 0 {
        if n & 1 == 1 {
            acc = (acc * base) >> Q;
        }
        base = (base * base) >> Q;
        n >>= 1;
        if acc == 0 {
            break;
        }
    }
    acc
}

fn scale(x: u64, factor: u128) -> u64 {
    ((u128::from(x) * factor) >> Q) as u64
}

impl LearnedWorkload {
    /// Observes `n` arrivals of a group whose instances each ask for `asks` (one entry per GPU
    /// task; asks without GPUs are ignored, and a group with none changes nothing): every weight
    /// decays by `d^n` (d = `1 − 2^-DECAY_SHIFT`) and each ask's bucket gains `1 + d + … + d^(n−1)`
    /// arrivals, so `n` arrivals at once equal `n` arrivals one by one up to rounding.
    pub fn observe(&mut self, asks: &[Arrival], n: u64) {
        let asks: Vec<&Arrival> = asks.iter().filter(|a| a.gpu.count > 0).collect();
        if asks.is_empty() || n == 0 {
            return;
        }
        let dn = decay_pow(n);
        for b in &mut self.buckets {
            b.weight = scale(b.weight, dn);
            b.cpu = scale(b.cpu, dn);
            b.mem = scale(b.mem, dn);
        }
        // UNIT · (1 − d^n) / (1 − d), with 1 − d = 2^-DECAY_SHIFT.
        let gain = ((u128::from(UNIT) * ((1u128 << Q) - dn)) >> (Q - DECAY_SHIFT)) as u64;
        let mut keep: Vec<Key> = Vec::with_capacity(asks.len());
        for a in &asks {
            let key = (a.gpu.count, a.gpu.milli.min(WHOLE), class(a.cpu), class(a.mem), a.models.0);
            keep.push(key);
            let i = match self.buckets.binary_search_by(|b| b.key().cmp(&key)) {
                Ok(i) => i,
                Err(i) => {
                    let (count, milli, cpu_class, mem_class, models) = key;
                    self.buckets.insert(i, Bucket { count, milli, models, cpu_class, mem_class, ..Bucket::default() });
                    i
                }
            };
            let b = &mut self.buckets[i];
            b.weight = b.weight.saturating_add(gain);
            b.cpu = b.cpu.saturating_add(a.cpu.min(MAX_DIM).saturating_mul(gain));
            b.mem = b.mem.saturating_add(a.mem.min(MAX_DIM).saturating_mul(gain));
        }
        self.buckets.retain(|b| b.weight >= FLOOR || keep.contains(&b.key()));
        while self.buckets.len() > MAX_BUCKETS {
            // The lightest bucket not just observed (the first in key order on equal weight).
            let victim = self
                .buckets
                .iter()
                .enumerate()
                .filter(|(_, b)| !keep.contains(&b.key()))
                .min_by_key(|(i, b)| (b.weight, *i))
                .map(|(i, _)| i);
            match victim {
                Some(i) => {
                    self.buckets.remove(i);
                }
                None => break,
            }
        }
        self.arrivals = self.arrivals.saturating_add(n.saturating_mul(asks.len() as u64));
    }

    /// The pod types the scheduler plans for: one per bucket, with the bucket's weighted mean CPU
    /// and memory, weighted by the bucket's decayed weight.
    pub fn workload(&self) -> Workload {
        Workload::new(self.buckets.iter().filter(|b| b.weight > 0).map(|b| {
            let pod = PodView {
                cpu: b.cpu / b.weight,
                mem: b.mem / b.weight,
                gpu: GpuShape { count: b.count, milli: b.milli },
                models: ModelSet(b.models),
            };
            (pod, b.weight)
        }))
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// GPU asks observed since the histogram began (saturating).
    pub fn arrivals(&self) -> u64 {
        self.arrivals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(cpu: u64, gpu: GpuShape) -> Arrival {
        Arrival { gpu, models: ModelSet::ANY, cpu, mem: 1024 }
    }

    fn weight(l: &LearnedWorkload, gpu: GpuShape) -> u64 {
        l.buckets().iter().find(|b| b.count == gpu.count && b.milli == gpu.milli).map_or(0, |b| b.weight)
    }

    #[test]
    fn one_arrival_weighs_one_unit_and_decays() {
        let mut l = LearnedWorkload::default();
        l.observe(&[ask(4000, GpuShape::whole(1))], 1);
        assert_eq!(weight(&l, GpuShape::whole(1)), UNIT);
        l.observe(&[ask(2000, GpuShape::share(500))], 1);
        // d = 1 − 1/1024: the older bucket lost a 1/1024 of its weight (rounded down).
        let w = weight(&l, GpuShape::whole(1));
        assert!((UNIT - (UNIT >> DECAY_SHIFT) - 1..UNIT).contains(&w), "{w}");
        assert_eq!(weight(&l, GpuShape::share(500)), UNIT);
        // After ~10 memories (10 × 1024 asks of another shape), the old bucket is gone.
        l.observe(&[ask(2000, GpuShape::share(500))], 10 << DECAY_SHIFT);
        assert_eq!(weight(&l, GpuShape::whole(1)), 0);
        assert_eq!(l.buckets().len(), 1);
        // The steady state of one shape is one memory's worth of arrivals.
        let w = weight(&l, GpuShape::share(500));
        assert!(w > (UNIT << DECAY_SHIFT) * 99 / 100 && w <= UNIT << DECAY_SHIFT, "{w}");
        assert_eq!(l.arrivals(), 2 + (10 << DECAY_SHIFT));
    }

    #[test]
    fn n_arrivals_at_once_match_one_by_one() {
        let (mut a, mut b) = (LearnedWorkload::default(), LearnedWorkload::default());
        for l in [&mut a, &mut b] {
            l.observe(&[ask(1000, GpuShape::whole(8))], 3);
        }
        a.observe(&[ask(6000, GpuShape::share(250))], 500);
        for _ in 0..500 {
            b.observe(&[ask(6000, GpuShape::share(250))], 1);
        }
        for (x, y) in a.buckets().iter().zip(b.buckets()) {
            let close = |p: u64, q: u64| p.abs_diff(q) <= p.max(q) / 1000 + 600;
            assert!(close(x.weight, y.weight) && close(x.cpu / 1000, y.cpu / 1000), "{x:?} {y:?}");
        }
    }

    #[test]
    fn the_workload_is_the_weighted_mean_per_shape() {
        let mut l = LearnedWorkload::default();
        l.observe(&[ask(5000, GpuShape::whole(1))], 1);
        l.observe(&[ask(6000, GpuShape::whole(1))], 1);
        // Another CPU class: its own bucket.
        l.observe(&[ask(60_000, GpuShape::whole(1))], 1);
        l.observe(&[ask(0, GpuShape::NONE)], 5);
        l.observe(&[ask(1000, GpuShape::share(300)), ask(0, GpuShape::whole(2))], 1);
        assert_eq!(l.buckets().len(), 4, "CPU-only asks are not learned");
        let w = l.workload();
        assert_eq!(w.len(), 4);
        let whole: Vec<u64> = l.buckets().iter().filter(|b| b.count == 1 && b.milli == WHOLE).map(|b| b.cpu / b.weight).collect();
        // (5000·d + 6000) / (d + 1), just above 5500; and the other class alone.
        assert!(whole.len() == 2 && (5500..5510).contains(&whole[0]) && whole[1] == 60_000, "{whole:?}");
    }

    #[test]
    fn replicas_observing_the_same_asks_agree_and_round_trip() {
        let asks: Vec<Arrival> = (0..3000u64)
            .map(|i| {
                ask(
                    1000 * (i % 7),
                    if i % 3 == 0 { GpuShape::whole(1 + (i % 4) as u32) } else { GpuShape::share(100 + (i % 9) as u32 * 100) },
                )
            })
            .collect();
        let build = || {
            let mut l = LearnedWorkload::default();
            for (i, a) in asks.iter().enumerate() {
                l.observe(std::slice::from_ref(a), 1 + (i % 3) as u64);
            }
            l
        };
        let (a, b) = (build(), build());
        assert_eq!(a, b);
        let json = serde_json::to_string(&a).unwrap_or_default();
        let back: LearnedWorkload = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(back, a);
        assert_eq!(back.workload(), a.workload());
    }

    #[test]
    fn the_histogram_stays_bounded() {
        let mut l = LearnedWorkload::default();
        for milli in 1..1000u32 {
            l.observe(&[ask(1000, GpuShape::share(milli))], 1);
            assert!(l.buckets().len() <= MAX_BUCKETS);
        }
        // The newest shapes are kept (the oldest are the lightest).
        assert_eq!(weight(&l, GpuShape::share(999)), UNIT);
        assert_eq!(weight(&l, GpuShape::share(1)), 0);
        // Huge counts and asks saturate instead of overflowing.
        l.observe(&[Arrival { gpu: GpuShape::whole(u32::MAX), models: ModelSet::ANY, cpu: u64::MAX, mem: u64::MAX }], u64::MAX);
        assert_eq!(l.buckets().len(), 1);
        assert!(!l.workload().is_empty());
    }
}
