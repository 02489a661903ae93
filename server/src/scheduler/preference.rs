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
//!   the placements made so far in the pass ([`Tally`]).
//! * P = (Σ weights of the affinities that hold + Σ spread weight × boost) /
//!   (Σ |affinity weights| + Σ spread weights).
//!
//! The scheduler ranks candidates by P first and only then by the scorer (GPU cost, then
//! bin-packing): a stated preference wins. Groups without preferences get no [`Preferences`]
//! at all, so their placements (and their cost) are exactly what they were before.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};

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
    /// Even spread: the values the feasible nodes have.
    values: BTreeSet<String>,
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

    /// The least and most used of `values` (even spread), given `counts`.
    fn range(&self, counts: &BTreeMap<String, u32>) -> Option<(u32, u32)> {
        self.values.iter().map(|v| counts.get(v).copied().unwrap_or(0)).fold(None, |r, n| {
            Some(r.map_or((n, n), |(lo, hi): (u32, u32)| (lo.min(n), hi.max(n))))
        })
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
    counts: Vec<BTreeMap<String, u32>>,
    /// Per spread: the least and most used value (even spreads; kept with the counts so that a
    /// score does not walk every value, e.g. a spread over `${node.id}`).
    ranges: Vec<Option<(u32, u32)>>,
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
            .filter(|a| a.weight != 0)
            .map(|a| {
                let operator = if a.operator.is_empty() { "=".to_string() } else { a.operator.clone() };
                let c = Constraint { attribute: a.attribute.clone(), operator, value: a.value.clone() };
                (c, f64::from(a.weight))
            })
            .collect();
        let spreads: Vec<&Spread> = tg.spreads.iter().chain(&job.spreads).filter(|s| s.weight > 0).collect();
        if affinities.is_empty() && spreads.is_empty() {
            return None;
        }
        let total = affinities.iter().map(|(_, w)| w.abs()).sum::<f64>()
            + spreads.iter().map(|s| f64::from(s.weight)).sum::<f64>();
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
        let count = f64::from(tg.count);
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
                let values = if targets.is_none() { by_node.values().flatten().cloned().collect() } else { BTreeSet::new() };
                SpreadPref { attribute: s.attribute.clone(), weight: f64::from(s.weight), targets, values, by_node }
            })
            .collect();
        let mut base = Tally { counts: vec![BTreeMap::new(); spreads.len()], ranges: Vec::new() };
        for a in live {
            if let Some(node) = node_of(&a.node_id) {
                count_in(&spreads, node, &mut base);
            }
        }
        base.ranges = spreads.iter().zip(&base.counts).map(|(s, c)| s.range(c)).collect();
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
            let counts = tally.counts.get(i);
            let boost = match s.value_on(node) {
                None => -1.0,
                Some(v) => match &s.targets {
                    Some(t) => target_boost(t, &v, counts),
                    None => {
                        let used = counts.and_then(|c| c.get(v.as_ref())).copied().unwrap_or(0);
                        even_boost(tally.ranges.get(i).copied().flatten(), used)
                    }
                },
            };
            sum += s.weight * boost;
        }
        // `+ 0.0` turns -0.0 (an empty float sum) into 0.0 for display.
        (sum / self.total).clamp(-1.0, 1.0) + 0.0
    }
}

/// Counts one allocation on `node` (the ranges are left to the caller).
fn count_in(spreads: &[SpreadPref], node: &Node, tally: &mut Tally) {
    if tally.counts.len() < spreads.len() {
        tally.counts.resize(spreads.len(), BTreeMap::new());
    }
    for (s, counts) in spreads.iter().zip(tally.counts.iter_mut()) {
        if let Some(v) = s.value_on(node) {
            match counts.get_mut(v.as_ref()) {
                Some(n) => *n += 1,
                None => {
                    counts.insert(v.into_owned(), 1);
                }
            }
        }
    }
}

/// Counts one allocation on `node` and updates the ranges of the spreads it touched.
fn record_in(spreads: &[SpreadPref], node: &Node, tally: &mut Tally) {
    count_in(spreads, node, tally);
    if tally.ranges.len() < spreads.len() {
        tally.ranges.resize(spreads.len(), None);
    }
    for (i, s) in spreads.iter().enumerate() {
        if s.targets.is_none() {
            tally.ranges[i] = s.range(&tally.counts[i]);
        }
    }
}

/// Targets: how far the value (or, unlisted, all unlisted values together) is below its
/// desired count, relative to it; -1 where nothing is desired.
fn target_boost(t: &Targets, value: &str, counts: Option<&BTreeMap<String, u32>>) -> f64 {
    let (desired, used) = match t.desired.get(value) {
        Some(d) => (*d, counts.and_then(|c| c.get(value)).copied().unwrap_or(0)),
        None => {
            let used = counts.map_or(0, |c| c.iter().filter(|(v, _)| !t.desired.contains_key(*v)).map(|(_, n)| *n).sum());
            (t.rest, used)
        }
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
            weight,
            targets: targets.iter().map(|(v, p)| SpreadTarget { value: (*v).into(), percent: *p }).collect(),
        }
    }

    fn affinity(value: &str, weight: i32) -> Affinity {
        Affinity { attribute: "${meta.rack}".into(), operator: String::new(), value: value.into(), weight }
    }

    #[test]
    fn no_preferences_means_none() {
        let tg = TaskGroup { count: 3, ..Default::default() };
        let n = node("a", Some("r1"));
        assert!(Preferences::for_group(&Job::default(), &tg, &[&n], &[], |_| None).is_none());
    }

    #[test]
    fn affinity_weights_are_normalised_over_job_group_and_tasks() {
        let job = Job { affinities: vec![affinity("r1", 50)], ..Default::default() };
        let tg = TaskGroup {
            count: 1,
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
        let tg = TaskGroup { count: 6, spreads: vec![spread(100, &[])], ..Default::default() };
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
        let tg = TaskGroup { count: 10, spreads: vec![spread(50, &[("r1", 50), ("r2", 0)])], ..Default::default() };
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
}
