//! Placement preferences: Nomad's `affinity` and `spread`, turned into one preference score
//! P in [-1, 1] per candidate node (documented in docs/scheduler.md, "Preferences").
//!
//! * **Affinities** (job, group and every task of the group): an affinity holds on a node when
//!   its constraint would (`feasible::holds`, the same attribute resolution and operators);
//!   it contributes its weight (-100..=100) when it holds, nothing otherwise.
//! * **Spreads** (job and group), each contributing `weight × boost` with a boost in [-1, 1]:
//!   - with targets, the desired count of a value is `percent × group count / 100`, and values
//!     not listed share what the percentages leave (pooled); the boost is
//!     `(desired − used) / desired`, clamped, and -1 where nothing is desired;
//!   - without targets, over the values the group's feasible nodes have: +1 for the least-used
//!     value down to -1 for the most-used one (linear in the count), 0 when all are equal;
//!   - a node without the attribute gets -1 (as in Nomad).
//!
//!   `used` counts the job's live allocations of the group that this plan does not stop, plus
//!   the placements made so far in the pass ([`Tally`]). The tally keeps, per spread, the
//!   running total of the unlisted values and a count-of-counts of the even spread's values, so
//!   scoring a node costs O(spreads + affinities) and recording a placement O(spreads) map operations,
//!   however many values a spread has.
//! * P = (Σ weights of the affinities that hold + Σ spread weight × boost) /
//!   (Σ |affinity weights| + Σ spread weights).
//!
//! The scheduler ranks candidates by P first and only then by the scorer (GPU cost, then
//! bin-packing): a stated preference wins. Groups without preferences get no [`Preferences`]
//! at all, so their placements (and their cost) are exactly what they were before.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};

use mlp_proto::v1::{Allocation, Constraint, Job, Node, Spread, TaskGroup};

use super::feasible;

/// Placement preferences of one task group, resolved against its feasible nodes.
#[derive(Debug, Clone)]
pub struct Preferences {
    /// Per feasible node id: the sum of the weights of the affinities that hold there.
    affinity: HashMap<String, f64>,
    spreads: Vec<SpreadPref>,
    /// Σ |affinity weights| + Σ spread weights; always > 0.
    total: f64,
    base: Tally,
}

#[derive(Debug, Clone)]
struct SpreadPref {
    attribute: String,
    weight: f64,
    /// None = even spread.
    targets: Option<Targets>,
    /// Even spread: the values the feasible nodes have (only they count for the least and most
    /// used value).
    values: HashSet<String>,
    /// The attribute's value on each feasible node (resolved once).
    by_node: HashMap<String, Option<String>>,
}

impl SpreadPref {
    fn value_on(&self, node: &Node) -> Option<Cow<'_, str>> {
        match self.by_node.get(&node.id) {
            Some(v) => v.as_deref().map(Cow::Borrowed),
            None => feasible::topology_value(&self.attribute, node).map(Cow::Owned),
        }
    }

    /// The value of the spread's attribute on `node` when it is a feasible node (resolved once).
    fn known_value(&self, node: &Node) -> Option<&str> {
        self.by_node.get(&node.id).and_then(|v| v.as_deref())
    }
}

#[derive(Debug, Clone)]
struct Targets {
    /// Desired allocations per listed value.
    desired: BTreeMap<String, f64>,
    /// Desired allocations of all unlisted values together.
    rest: f64,
}

/// Allocations per attribute value, per spread: the group's live allocations plus this pass's
/// placements. Cloned for each attempt (a gang tries several domains from the same start).
#[derive(Debug, Clone, Default)]
pub struct Tally {
    spreads: Vec<SpreadTally>,
}

/// One spread's share of a [`Tally`], kept incrementally so that neither a score nor a record
/// walks the spread's values (a spread over `${node.id}` has one per node).
#[derive(Debug, Clone, Default)]
struct SpreadTally {
    counts: HashMap<String, u32>,
    /// Targets: the allocations on values not listed, together.
    unlisted: u32,
    /// Even spread: how many of the spread's values (`SpreadPref::values`) hold each count; the
    /// first and last keys are the least and most used counts.
    levels: BTreeMap<u32, usize>,
}

impl SpreadTally {
    fn new(spread: &SpreadPref) -> SpreadTally {
        let mut levels = BTreeMap::new();
        if spread.targets.is_none() && !spread.values.is_empty() {
            levels.insert(0, spread.values.len());
        }
        SpreadTally { counts: HashMap::new(), unlisted: 0, levels }
    }

    /// Counts one more allocation on `value`.
    fn add(&mut self, spread: &SpreadPref, value: &str) {
        let before = match self.counts.get_mut(value) {
            Some(n) => {
                *n += 1;
                *n - 1
            }
            None => {
                self.counts.insert(value.to_string(), 1);
                0
            }
        };
        match &spread.targets {
            Some(t) => {
                if !t.desired.contains_key(value) {
                    self.unlisted += 1;
                }
            }
            None => {
                if spread.values.contains(value) {
                    if let Some(n) = self.levels.get_mut(&before) {
                        *n -= 1;
                        if *n == 0 {
                            self.levels.remove(&before);
                        }
                    }
                    *self.levels.entry(before + 1).or_insert(0) += 1;
                }
            }
        }
    }

    fn used(&self, value: &str) -> u32 {
        self.counts.get(value).copied().unwrap_or(0)
    }

    /// Even spread: the least and most used of the spread's values; None when it has none.
    fn range(&self) -> Option<(u32, u32)> {
        Some((*self.levels.keys().next()?, *self.levels.keys().next_back()?))
    }
}

impl Preferences {
    /// The preferences of `tg` (with the job's and its tasks' affinities, and the job's
    /// spreads), or None when it has none: the scheduler then skips them entirely.
    /// `feasible` are the group's feasible nodes; `live` the job's allocations of this group
    /// that stay (live and not stopped by this plan), on the nodes `node_of` finds.
    pub fn for_group<'n>(
        job: &Job,
        tg: &TaskGroup,
        feasible: &[&Node],
        live: &[&Allocation],
        node_of: impl Fn(&str) -> Option<&'n Node>,
    ) -> Option<Preferences> {
        if !Preferences::wanted(job, tg) {
            return None;
        }
        let affinities: Vec<(Constraint, f64)> = job
            .affinities
            .iter()
            .chain(&tg.affinities)
            .chain(tg.tasks.iter().flat_map(|t| &t.affinities))
            .filter(|a| a.effective_weight() != 0)
            .map(|a| {
                let operator = if a.operator.is_empty() { "=".to_string() } else { a.operator.clone() };
                let c = Constraint { attribute: a.attribute.clone(), operator, value: a.value.clone() };
                (c, f64::from(a.effective_weight()))
            })
            .collect();
        let spreads: Vec<&Spread> = tg.spreads.iter().chain(&job.spreads).filter(|s| s.effective_weight() > 0).collect();
        if affinities.is_empty() && spreads.is_empty() {
            return None;
        }
        let total =
            affinities.iter().map(|(_, w)| w.abs()).sum::<f64>() + spreads.iter().map(|s| f64::from(s.effective_weight())).sum::<f64>();
        let affinity = if affinities.is_empty() {
            HashMap::new()
        } else {
            feasible
                .iter()
                .map(|n| {
                    let sum = affinities.iter().filter(|(c, _)| feasible::holds(c, n)).map(|(_, w)| w).sum::<f64>();
                    (n.id.clone(), sum)
                })
                .collect()
        };
        let count = f64::from(tg.effective_count());
        let spreads: Vec<SpreadPref> = spreads
            .into_iter()
            .map(|s| {
                let targets = (!s.targets.is_empty()).then(|| {
                    let listed: u32 = s.targets.iter().map(|t| t.percent).sum();
                    Targets {
                        desired: s.targets.iter().map(|t| (t.value.clone(), f64::from(t.percent) * count / 100.0)).collect(),
                        rest: f64::from(100u32.saturating_sub(listed)) * count / 100.0,
                    }
                });
                let by_node: HashMap<String, Option<String>> =
                    feasible.iter().map(|n| (n.id.clone(), feasible::topology_value(&s.attribute, n))).collect();
                let values = if targets.is_none() { by_node.values().flatten().cloned().collect() } else { HashSet::new() };
                SpreadPref { attribute: s.attribute.clone(), weight: f64::from(s.effective_weight()), targets, values, by_node }
            })
            .collect();
        let mut base = Tally { spreads: spreads.iter().map(SpreadTally::new).collect() };
        for a in live {
            if let Some(node) = node_of(&a.node_id) {
                record_in(&spreads, node, &mut base);
            }
        }
        Some(Preferences { affinity, spreads, total, base })
    }

    /// Whether `tg` has any preference (its own, its tasks' or the job's); cheap.
    pub fn wanted(job: &Job, tg: &TaskGroup) -> bool {
        !(job.affinities.is_empty()
            && job.spreads.is_empty()
            && tg.affinities.is_empty()
            && tg.spreads.is_empty()
            && tg.tasks.iter().all(|t| t.affinities.is_empty()))
    }

    /// The counts to start a placement attempt from.
    pub fn tally(&self) -> Tally {
        self.base.clone()
    }

    /// The sampling stratum of `node` (`candidates::Candidates::preferring`): the sum of the
    /// affinity weights that hold there and its value of every spread attribute, so that every
    /// affinity level and spread value of the feasible nodes is represented near the front.
    pub fn stratum(&self, node: &Node) -> (u64, Vec<Option<&str>>) {
        let affinity = self.affinity.get(&node.id).copied().unwrap_or(0.0) + 0.0;
        (affinity.to_bits(), self.spreads.iter().map(|s| s.known_value(node)).collect())
    }

    /// Counts one more allocation of the group on `node`.
    pub fn record(&self, node: &Node, tally: &mut Tally) {
        record_in(&self.spreads, node, tally);
    }

    /// P for placing one more allocation on `node`, given what `tally` holds so far.
    pub fn score(&self, node: &Node, tally: &Tally) -> f64 {
        let mut sum = match self.affinity.get(&node.id) {
            Some(s) => *s,
            // Not one of the feasible nodes (never the case in the scheduler): no affinity holds.
            None => 0.0,
        };
        for (i, s) in self.spreads.iter().enumerate() {
            let counts = tally.spreads.get(i);
            let boost = match s.value_on(node) {
                None => -1.0,
                Some(v) => match &s.targets {
                    Some(t) => target_boost(t, &v, counts),
                    None => even_boost(counts.and_then(SpreadTally::range), counts.map_or(0, |c| c.used(&v))),
                },
            };
            sum += s.weight * boost;
        }
        // `+ 0.0` turns -0.0 (an empty float sum) into 0.0 for display.
        (sum / self.total).clamp(-1.0, 1.0) + 0.0
    }
}

/// Counts one allocation on `node`, in every spread whose attribute it has.
fn record_in(spreads: &[SpreadPref], node: &Node, tally: &mut Tally) {
    if tally.spreads.len() < spreads.len() {
        tally.spreads.extend(spreads[tally.spreads.len()..].iter().map(SpreadTally::new));
    }
    for (s, t) in spreads.iter().zip(tally.spreads.iter_mut()) {
        if let Some(v) = s.value_on(node) {
            t.add(s, &v);
        }
    }
}

/// Targets: how far the value (or, unlisted, all unlisted values together) is below its
/// desired count, relative to it; -1 where nothing is desired.
fn target_boost(t: &Targets, value: &str, counts: Option<&SpreadTally>) -> f64 {
    let (desired, used) = match t.desired.get(value) {
        Some(d) => (*d, counts.map_or(0, |c| c.used(value))),
        None => (t.rest, counts.map_or(0, |c| c.unlisted)),
    };
    if desired <= 0.0 {
        return -1.0;
    }
    ((desired - f64::from(used)) / desired).clamp(-1.0, 1.0)
}

/// Even spread: +1 for the least-used value (`range` = least and most used), -1 for the
/// most-used, linear between; 0 when every value is used equally.
fn even_boost(range: Option<(u32, u32)>, used: u32) -> f64 {
    let (lo, hi) = range.unwrap_or((used, used));
    let (lo, hi) = (lo.min(used), hi.max(used));
    if hi == lo {
        return 0.0;
    }
    1.0 - 2.0 * f64::from(used - lo) / f64::from(hi - lo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlp_proto::v1::{Affinity, SpreadTarget, Task};

    fn node(id: &str, rack: Option<&str>) -> Node {
        Node {
            id: id.into(),
            name: id.into(),
            meta: rack.map(|r| ("rack".to_string(), r.to_string())).into_iter().collect(),
            ..Default::default()
        }
    }

    fn spread(weight: u32, targets: &[(&str, u32)]) -> Spread {
        Spread {
            attribute: "${meta.rack}".into(),
            weight: Some(weight),
            targets: targets.iter().map(|(v, p)| SpreadTarget { value: (*v).into(), percent: *p }).collect(),
        }
    }

    fn affinity(value: &str, weight: i32) -> Affinity {
        Affinity { attribute: "${meta.rack}".into(), operator: String::new(), value: value.into(), weight: Some(weight) }
    }

    #[test]
    fn no_preferences_means_none() {
        let tg = TaskGroup { count: Some(3), ..Default::default() };
        let n = node("a", Some("r1"));
        assert!(Preferences::for_group(&Job::default(), &tg, &[&n], &[], |_| None).is_none());
    }

    #[test]
    fn affinity_weights_are_normalised_over_job_group_and_tasks() {
        let job = Job { affinities: vec![affinity("r1", 50)], ..Default::default() };
        let tg = TaskGroup {
            count: Some(1),
            affinities: vec![affinity("r2", -50)],
            tasks: vec![Task { affinities: vec![affinity("r1", 100)], ..Default::default() }],
            ..Default::default()
        };
        let (a, b, c) = (node("a", Some("r1")), node("b", Some("r2")), node("c", None));
        let p = Preferences::for_group(&job, &tg, &[&a, &b, &c], &[], |_| None).unwrap_or_else(|| panic!("prefs"));
        let t = p.tally();
        assert!((p.score(&a, &t) - 150.0 / 200.0).abs() < 1e-12);
        assert!((p.score(&b, &t) + 50.0 / 200.0).abs() < 1e-12);
        assert_eq!(p.score(&c, &t), 0.0);
    }

    #[test]
    fn even_spread_prefers_the_least_used_value_and_punishes_missing() {
        let tg = TaskGroup { count: Some(6), spreads: vec![spread(100, &[])], ..Default::default() };
        let (a, b, c) = (node("a", Some("r1")), node("b", Some("r2")), node("c", None));
        let p = Preferences::for_group(&Job::default(), &tg, &[&a, &b, &c], &[], |_| None).unwrap_or_else(|| panic!("prefs"));
        let mut t = p.tally();
        assert_eq!((p.score(&a, &t), p.score(&b, &t), p.score(&c, &t)), (0.0, 0.0, -1.0));
        p.record(&a, &mut t);
        assert_eq!((p.score(&a, &t), p.score(&b, &t)), (-1.0, 1.0));
        p.record(&b, &mut t);
        assert_eq!((p.score(&a, &t), p.score(&b, &t)), (0.0, 0.0));
    }

    #[test]
    fn targets_boost_values_below_their_share_and_pool_the_rest() {
        let tg = TaskGroup { count: Some(10), spreads: vec![spread(50, &[("r1", 50), ("r2", 0)])], ..Default::default() };
        let (a, b, c, d) = (node("a", Some("r1")), node("b", Some("r2")), node("c", Some("r3")), node("d", Some("r4")));
        let live = [Allocation { node_id: "c".into(), ..Default::default() }];
        let nodes = [&a, &b, &c, &d];
        let p = Preferences::for_group(&Job::default(), &tg, &nodes, &[&live[0]], |id| nodes.iter().copied().find(|n| n.id == id))
            .unwrap_or_else(|| panic!("prefs"));
        let t = p.tally();
        assert_eq!(p.score(&a, &t), 1.0);
        assert_eq!(p.score(&b, &t), -1.0, "0% desired");
        // r3 and r4 share the remaining 50% (5 allocations); r3 already holds one.
        assert!((p.score(&d, &t) - 0.8).abs() < 1e-12);
        assert_eq!(p.score(&c, &t), p.score(&d, &t));
    }

    /// The incremental tally (running unlisted totals, count-of-counts) scores exactly as a
    /// recount of every value from scratch would, over a long pseudo-random run.
    #[test]
    fn incremental_tally_matches_a_recount() {
        let racks: Vec<Node> = (0..12).map(|i| node(&format!("n{i}"), Some(&format!("r{}", i % 6)))).collect();
        // A live allocation on a node that is no longer feasible: counted, but its value is not
        // one of the even spread's values.
        let gone = node("gone", Some("rx"));
        let feasible: Vec<&Node> = racks.iter().collect();
        let even = TaskGroup { count: Some(40), spreads: vec![spread(30, &[])], ..Default::default() };
        let targets = TaskGroup { count: Some(40), spreads: vec![spread(70, &[("r1", 40), ("r2", 10)])], ..Default::default() };
        let live = [Allocation { node_id: "gone".into(), ..Default::default() }];
        for tg in [even, targets] {
            let p =
                Preferences::for_group(&Job::default(), &tg, &feasible, &[&live[0]], |_| Some(&gone)).unwrap_or_else(|| panic!("prefs"));
            let mut t = p.tally();
            let mut recount: BTreeMap<String, u32> = [("rx".to_string(), 1)].into_iter().collect();
            let mut x: u64 = 12345;
            for step in 0..200 {
                for n in &racks {
                    let v = n.meta["rack"].as_str();
                    let used = recount.get(v).copied().unwrap_or(0);
                    let boost = if tg.spreads[0].targets.is_empty() {
                        let all = (0..6).map(|r| recount.get(&format!("r{r}")).copied().unwrap_or(0));
                        let (lo, hi) = (all.clone().min().unwrap_or(0), all.max().unwrap_or(0));
                        if hi == lo {
                            0.0
                        } else {
                            1.0 - 2.0 * f64::from(used - lo) / f64::from(hi - lo)
                        }
                    } else {
                        let (desired, used) = match v {
                            "r1" => (16.0, used),
                            "r2" => (4.0, used),
                            _ => (20.0, recount.iter().filter(|(k, _)| *k != "r1" && *k != "r2").map(|(_, n)| *n).sum()),
                        };
                        ((desired - f64::from(used)) / desired).clamp(-1.0, 1.0)
                    };
                    assert!((p.score(n, &t) - boost).abs() < 1e-12, "step {step}, {v}: {} vs {boost}", p.score(n, &t));
                }
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let n = &racks[usize::try_from(x >> 33).unwrap_or(0) % racks.len()];
                p.record(n, &mut t);
                *recount.entry(n.meta["rack"].clone()).or_default() += 1;
            }
        }
    }
}
