//! GPU locality on one node: which devices share NVLink, a PCIe switch or a NUMA node, and which
//! set of free devices a multi-GPU ask gets.
//!
//! A set's locality is the best level at which all of it is connected: every pair NVLinked, then
//! all under one PCIe switch, then all on one NUMA node, else `system`. For an ask of `count`
//! whole GPUs, [`Topology::choose`] takes the set with the best locality; among sets of equal
//! locality, the one that leaves the node's remaining free devices best connected (the most
//! NVLinked pairs left, then pairs under one switch, then pairs on one NUMA node), so an intact
//! NVLink island or switch is not broken when a broken one will do; then the first in device
//! order. The search is exact while there are at most [`EXACT_SUBSETS`] candidate sets
//! (C(free, count)) and greedy beyond (see [`Topology::choose`]).
//!
//! Locality is not a cost: it ranks as its own key between the placement preference and the
//! policy's score ([`Topology::rank_level`], `rank::better_ranked`).
//!
//! Nodes whose devices report no topology get no [`Topology`] at all: their device choice and
//! cost are exactly those of `gpu::Policy::evaluate` (so the trace simulator, whose nodes have no
//! topology, is unaffected).

use std::collections::HashMap;
use std::fmt;

use mlp_proto::v1::GpuDevice;

use super::gpu::{DeviceMask, MAX_DEVICES};

/// How well a set of devices is connected, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Locality {
    /// Every pair of devices is linked by NVLink (or an NVSwitch).
    NvLink,
    /// All devices hang off one PCIe switch.
    PciSwitch,
    /// All devices are on one NUMA node.
    Numa,
    /// Anything else.
    System,
}

/// The most candidate sets (C(free devices, count)) for which [`Topology::choose`] tries every
/// set; beyond, it is greedy. Each set costs O(free devices) mask operations, so one exact
/// search is at most ~64k of them (e.g. 8 of 13 free: C(13, 8) = 1,287 > 1,024, greedy;
/// 4 of 14: 1,001, exact).
pub const EXACT_SUBSETS: u64 = 1024;

/// C(n, k), or `cap + 1` when it exceeds `cap` (computed without overflow).
pub fn subsets(n: u32, k: u32, cap: u64) -> u64 {
    if k > n {
        return 0;
    }
    let k = u64::from(k.min(n - k));
    let mut c: u64 = 1;
    for i in 0..k {
        // c · (n − i) / (i + 1) is exact at every step (a binomial coefficient).
        c = c.saturating_mul(u64::from(n) - i) / (i + 1);
        if c > cap {
            return cap.saturating_add(1);
        }
    }
    c
}

impl Locality {
    /// The name recorded in `AllocatedResources.gpu_locality`.
    pub fn as_str(self) -> &'static str {
        match self {
            Locality::NvLink => "nvlink",
            Locality::PciSwitch => "pci-switch",
            Locality::Numa => "numa",
            Locality::System => "system",
        }
    }

    /// 0 for `nvlink` up to 3 for `system`.
    pub fn level(self) -> u32 {
        match self {
            Locality::NvLink => 0,
            Locality::PciSwitch => 1,
            Locality::Numa => 2,
            Locality::System => 3,
        }
    }
}

impl fmt::Display for Locality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The links between one node's devices (the first [`MAX_DEVICES`], in device order), as masks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Per device: the devices it has an NVLink to (a link listed on either side counts).
    nvlink: Vec<DeviceMask>,
    /// Per device: the devices under the same PCIe switch, itself included (itself only when the
    /// switch is unknown).
    switch: Vec<DeviceMask>,
    /// Per device: the devices on the same NUMA node, itself included (itself only if unknown).
    numa: Vec<DeviceMask>,
    /// The best locality the node's data can express: `nvlink` when some device lists NVLink
    /// peers, else `pci-switch` when some device names its switch, else `numa`.
    reported: Locality,
}

/// Pairs left connected at each level: (NVLinked, under one switch, on one NUMA node). Compared
/// lexicographically, more is better.
type Connectivity = (u32, u32, u32);

fn bit(i: usize) -> DeviceMask {
    1u64 << i
}

/// The device indexes in `mask`, lowest first.
fn indexes(mut mask: DeviceMask) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let i = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        Some(i)
    })
}

impl Topology {
    /// The topology of `devices`, or None when none of them reports any (no NVLink peers, PCIe
    /// switch or NUMA node): such a node gets the plain device choice and locality rank 0.
    /// NVLink peers that are not devices of the node are ignored.
    pub fn from_devices(devices: &[GpuDevice]) -> Option<Topology> {
        let devices = &devices[..devices.len().min(MAX_DEVICES)];
        let known = devices.iter().any(|d| !d.nvlink_peers.is_empty() || !d.pci_switch.is_empty() || d.numa_node.is_some());
        if !known {
            return None;
        }
        let n = devices.len();
        let reported = if devices.iter().any(|d| !d.nvlink_peers.is_empty()) {
            Locality::NvLink
        } else if devices.iter().any(|d| !d.pci_switch.is_empty()) {
            Locality::PciSwitch
        } else {
            Locality::Numa
        };
        let mut t = Topology { nvlink: vec![0; n], switch: vec![0; n], numa: vec![0; n], reported };
        // One hash lookup per listed peer, and switches and NUMA nodes grouped by hashing: no
        // pairwise string comparisons.
        let index: HashMap<&str, usize> = devices.iter().enumerate().map(|(i, d)| (d.id.as_str(), i)).collect();
        let mut switches: HashMap<&str, DeviceMask> = HashMap::new();
        let mut numas: HashMap<i32, DeviceMask> = HashMap::new();
        for (i, d) in devices.iter().enumerate() {
            for j in d.nvlink_peers.iter().filter_map(|p| index.get(p.as_str()).copied()).filter(|&j| j != i) {
                t.nvlink[i] |= bit(j);
                t.nvlink[j] |= bit(i);
            }
            if !d.pci_switch.is_empty() {
                *switches.entry(d.pci_switch.as_str()).or_default() |= bit(i);
            }
            if let Some(numa) = d.numa_node {
                *numas.entry(numa).or_default() |= bit(i);
            }
        }
        for (i, d) in devices.iter().enumerate() {
            t.switch[i] = switches.get(d.pci_switch.as_str()).copied().filter(|_| !d.pci_switch.is_empty()).unwrap_or(0) | bit(i);
            t.numa[i] = d.numa_node.and_then(|numa| numas.get(&numa).copied()).unwrap_or(0) | bit(i);
        }
        Some(t)
    }

    fn len(&self) -> usize {
        self.nvlink.len()
    }

    /// The locality rank of a placement that got `loc` on this node (lower is better): the levels
    /// `loc` falls below the best the node's data can express ([`Locality::level`] difference).
    /// A node without topology data, or a single-GPU ask, ranks 0, as does a placement that got
    /// all the node could report (e.g. one NUMA node on a node that reports only NUMA nodes):
    /// unknown locality is not bad locality.
    pub fn rank_level(&self, loc: Locality) -> u32 {
        loc.level().saturating_sub(self.reported.level())
    }

    /// The locality of the device set `set` (a single device or the empty set: `nvlink`).
    pub fn locality(&self, set: DeviceMask) -> Locality {
        let set = set & self.all();
        let Some(first) = indexes(set).next() else { return Locality::NvLink };
        if indexes(set).all(|i| set & !bit(i) & !self.nvlink[i] == 0) {
            Locality::NvLink
        } else if set & !self.switch[first] == 0 {
            Locality::PciSwitch
        } else if set & !self.numa[first] == 0 {
            Locality::Numa
        } else {
            Locality::System
        }
    }

    fn all(&self) -> DeviceMask {
        if self.len() >= 64 {
            u64::MAX
        } else {
            bit(self.len()) - 1
        }
    }

    /// The connected pairs within `rest`.
    fn connectivity(&self, rest: DeviceMask) -> Connectivity {
        let (mut nv, mut sw, mut nu) = (0, 0, 0);
        for i in indexes(rest) {
            nv += (self.nvlink[i] & rest).count_ones();
            sw += (self.switch[i] & rest).count_ones() - 1;
            nu += (self.numa[i] & rest).count_ones() - 1;
        }
        (nv / 2, sw / 2, nu / 2)
    }

    /// The pairs that taking device `i` out of `rest` breaks (what [`Topology::connectivity`]
    /// loses).
    fn links(&self, i: usize, rest: DeviceMask) -> Connectivity {
        let rest = rest & !bit(i);
        ((self.nvlink[i] & rest).count_ones(), (self.switch[i] & rest).count_ones(), (self.numa[i] & rest).count_ones())
    }

    /// `count` devices out of `free` (a mask of the fully free devices the ask may use) with the
    /// best locality, leaving the rest best connected (see the module doc), and that locality.
    /// None when `free` has fewer than `count` devices.
    ///
    /// With more than [`EXACT_SUBSETS`] candidate sets the search is greedy: an NVLink clique grown
    /// from each free device (adding the device that keeps the most candidates, then the one
    /// whose removal breaks the fewest remaining pairs); failing that, within each PCIe switch,
    /// then each NUMA node, then the whole node, devices taken one at a time, each the one whose
    /// removal breaks the fewest remaining pairs; the candidate that leaves the most pairs wins.
    pub fn choose(&self, free: DeviceMask, count: u32) -> Option<(DeviceMask, Locality)> {
        let free = free & self.all();
        if free.count_ones() < count {
            return None;
        }
        if count == 0 {
            return Some((0, Locality::NvLink));
        }
        if Topology::exact_search(free, count) {
            return Some(self.exact(free, count as usize));
        }
        Some(self.greedy(free, count as usize))
    }

    /// Whether [`Topology::choose`] tries every set: at most [`EXACT_SUBSETS`] of them.
    fn exact_search(free: DeviceMask, count: u32) -> bool {
        subsets(free.count_ones(), count, EXACT_SUBSETS) <= EXACT_SUBSETS
    }

    /// Every `count`-subset of `free`, in lexicographic order of device indexes (so the first of
    /// equal sets is the one in device order).
    fn exact(&self, free: DeviceMask, count: usize) -> (DeviceMask, Locality) {
        let pos: Vec<usize> = indexes(free).collect();
        let mut idx: Vec<usize> = (0..count).collect();
        let mut best: Option<(Locality, Connectivity, DeviceMask)> = None;
        loop {
            let set = idx.iter().fold(0, |m, &k| m | bit(pos[k]));
            let loc = self.locality(set);
            if best.as_ref().is_none_or(|(l, ..)| loc <= *l) {
                let left = self.connectivity(free & !set);
                if best.as_ref().is_none_or(|&(l, c, _)| loc < l || left > c) {
                    best = Some((loc, left, set));
                }
            }
            // The next combination: bump the last index that can still move right.
            let Some(k) = (0..count).rev().find(|&k| idx[k] < pos.len() - count + k) else { break };
            idx[k] += 1;
            for m in (k + 1)..count {
                idx[m] = idx[m - 1] + 1;
            }
        }
        // `pos` has at least `count` entries, so the loop saw at least one set.
        best.map_or((0, Locality::System), |(l, _, s)| (s, l))
    }

    fn greedy(&self, free: DeviceMask, count: usize) -> (DeviceMask, Locality) {
        let mut cands: Vec<DeviceMask> = Vec::new();
        // NVLink cliques grown from every free device.
        for seed in indexes(free) {
            let (mut set, mut open) = (bit(seed), self.nvlink[seed] & free);
            while (set.count_ones() as usize) < count && open != 0 {
                let rest = free & !set;
                let pick = indexes(open)
                    .min_by_key(|&j| {
                        let (nv, sw, nu) = self.links(j, rest);
                        (std::cmp::Reverse((open & self.nvlink[j]).count_ones()), nv, sw, nu, j)
                    })
                    .unwrap_or(seed);
                set |= bit(pick);
                open &= self.nvlink[pick] & !bit(pick);
            }
            if set.count_ones() as usize == count {
                cands.push(set);
            }
        }
        if cands.is_empty() {
            for groups in [&self.switch, &self.numa] {
                let mut seen: Vec<DeviceMask> = Vec::new();
                for i in indexes(free) {
                    let group = groups[i] & free;
                    if (group.count_ones() as usize) < count || seen.contains(&group) {
                        continue;
                    }
                    seen.push(group);
                    cands.push(self.take_least_linked(free, group, count));
                }
                if !cands.is_empty() {
                    break;
                }
            }
        }
        if cands.is_empty() {
            cands.push(self.take_least_linked(free, free, count));
        }
        let mut best: Option<(Locality, Connectivity, DeviceMask)> = None;
        for set in cands {
            let (loc, left) = (self.locality(set), self.connectivity(free & !set));
            if best.as_ref().is_none_or(|&(l, c, _)| loc < l || (loc == l && left > c)) {
                best = Some((loc, left, set));
            }
        }
        best.map_or((0, Locality::System), |(l, _, s)| (s, l))
    }

    /// `count` devices of `group` (a subset of `free` with at least `count` devices), one at a
    /// time, each the one whose removal breaks the fewest pairs among the free devices left.
    fn take_least_linked(&self, free: DeviceMask, group: DeviceMask, count: usize) -> DeviceMask {
        let mut set = 0;
        for _ in 0..count {
            let rest = free & !set;
            let Some(pick) = indexes(group & !set).min_by_key(|&j| (self.links(j, rest), j)) else { break };
            set |= bit(pick);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DGX-like node: NVLink islands {0..3} and {4..7} (or all-to-all), PCIe switches
    /// {0,1} {2,3} {4,5} {6,7}, NUMA nodes {0..3} and {4..7}.
    fn dgx(all_to_all: bool) -> Vec<GpuDevice> {
        (0..8)
            .map(|i: usize| {
                let island = i / 4;
                let peers = (0..8).filter(|&j| j != i && (all_to_all || j / 4 == island)).map(|j| format!("g{j}")).collect();
                GpuDevice {
                    id: format!("g{i}"),
                    model: "H100".into(),
                    memory_mib: 81_920,
                    nvlink_peers: peers,
                    pci_switch: format!("sw{}", i / 2),
                    numa_node: Some(island as i32),
                    ..Default::default()
                }
            })
            .collect()
    }

    fn mask(ids: &[usize]) -> DeviceMask {
        ids.iter().fold(0, |m, &i| m | bit(i))
    }

    fn topo(devices: &[GpuDevice]) -> Topology {
        Topology::from_devices(devices).unwrap_or_else(|| panic!("no topology"))
    }

    #[test]
    fn no_topology_data_means_none() {
        let plain: Vec<GpuDevice> = (0..4).map(|i| GpuDevice { id: format!("g{i}"), ..Default::default() }).collect();
        assert_eq!(Topology::from_devices(&plain), None);
        assert_eq!(Topology::from_devices(&[]), None);
    }

    #[test]
    fn locality_levels() {
        let t = topo(&dgx(false));
        assert_eq!(t.locality(mask(&[0, 1, 2, 3])), Locality::NvLink);
        assert_eq!(t.locality(mask(&[4])), Locality::NvLink);
        assert_eq!(t.locality(mask(&[3, 4])), Locality::System);
        let no_nvlink: Vec<GpuDevice> = dgx(false).into_iter().map(|d| GpuDevice { nvlink_peers: vec![], ..d }).collect();
        let t = topo(&no_nvlink);
        assert_eq!(t.locality(mask(&[2, 3])), Locality::PciSwitch);
        assert_eq!(t.locality(mask(&[1, 2, 3])), Locality::Numa);
        assert_eq!(t.locality(mask(&[0, 7])), Locality::System);
        // A link listed on one side only still counts.
        let mut one_sided = dgx(false);
        one_sided[1].nvlink_peers.clear();
        assert_eq!(topo(&one_sided).locality(mask(&[0, 1, 2, 3])), Locality::NvLink);
    }

    #[test]
    fn two_and_four_gpus_take_one_island() {
        let t = topo(&dgx(false));
        let all = mask(&[0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(t.choose(all, 2), Some((mask(&[0, 1]), Locality::NvLink)));
        assert_eq!(t.choose(all, 4), Some((mask(&[0, 1, 2, 3]), Locality::NvLink)));
        // Island A is broken (device 0 in use): two GPUs come from it, not from the intact B
        // (any pair of A leaves the same links; the first in device order).
        let free = all & !bit(0);
        assert_eq!(t.choose(free, 2), Some((mask(&[1, 2]), Locality::NvLink)));
        // Four: only island B has four free.
        assert_eq!(t.choose(free, 4), Some((mask(&[4, 5, 6, 7]), Locality::NvLink)));
        // One GPU: from the broken island, off the broken switch.
        assert_eq!(t.choose(free, 1), Some((mask(&[1]), Locality::NvLink)));
    }

    #[test]
    fn scattered_gpus_still_place_with_worse_locality() {
        let t = topo(&dgx(false));
        // 2 + 2 free across the islands (and NUMA nodes): four GPUs still fit, as "system".
        assert_eq!(t.choose(mask(&[2, 3, 6, 7]), 4), Some((mask(&[2, 3, 6, 7]), Locality::System)));
        // Without NVLink, three free on NUMA 0 and one on NUMA 1: "numa".
        let no_nvlink: Vec<GpuDevice> = dgx(false).into_iter().map(|d| GpuDevice { nvlink_peers: vec![], ..d }).collect();
        let t = topo(&no_nvlink);
        assert_eq!(t.choose(mask(&[1, 2, 3, 7]), 3), Some((mask(&[1, 2, 3]), Locality::Numa)));
        assert_eq!(t.choose(mask(&[1, 2, 3, 7]), 2), Some((mask(&[2, 3]), Locality::PciSwitch)));
        assert_eq!(t.choose(mask(&[1, 2]), 3), None);
    }

    fn pick(t: &Topology, free: DeviceMask, count: u32) -> (DeviceMask, Locality) {
        t.choose(free, count).unwrap_or_else(|| panic!("no set of {count} in {free:#x}"))
    }

    #[test]
    fn nvswitch_all_to_all_keeps_pcie_switches_whole() {
        let t = topo(&dgx(true));
        assert_eq!(t.locality(mask(&[0, 7])), Locality::NvLink);
        // Every set is NVLinked; device 4 is in use, so its switch mate 5 goes first: the set
        // that keeps the most switch pairs whole.
        let (set, loc) = pick(&t, mask(&[0, 1, 2, 3, 5, 6, 7]), 2);
        assert_eq!(loc, Locality::NvLink);
        assert_ne!(set & bit(5), 0, "{set:#b}");
    }

    #[test]
    fn greedy_beyond_the_exact_limit() {
        // 32 devices: 4 NVLink islands of 8, two per NUMA node, a switch per pair of devices.
        let devices: Vec<GpuDevice> = (0..32)
            .map(|i: usize| GpuDevice {
                id: format!("g{i}"),
                nvlink_peers: (0..32).filter(|&j| j != i && j / 8 == i / 8).map(|j| format!("g{j}")).collect(),
                pci_switch: format!("sw{}", i / 2),
                numa_node: Some((i / 16) as i32),
                ..Default::default()
            })
            .collect();
        let t = topo(&devices);
        let all = t.all();
        assert_eq!(all, 0xffff_ffff);
        // Island 0 broken by device 0: eight GPUs come from an intact island, four from island 0.
        let free = all & !bit(0);
        let (set, loc) = pick(&t, free, 8);
        assert_eq!((set.count_ones(), loc), (8, Locality::NvLink));
        assert_eq!(set & 0xff, 0, "not from island 0: {set:#x}");
        let (set, loc) = pick(&t, free, 4);
        assert_eq!(loc, Locality::NvLink);
        assert_eq!(set & !0xfe, 0, "from the broken island 0: {set:#x}");
        // Five free per island (C(20, 6) sets: greedy): six GPUs have no NVLink clique but one NUMA node.
        let five: DeviceMask = (0..4).fold(0, |m, island| m | (0x1f << (8 * island)));
        assert!(!Topology::exact_search(five, 6));
        let (set, loc) = pick(&t, five, 6);
        assert_eq!((set.count_ones(), loc), (6, Locality::Numa), "{set:#x}");
        // Seventeen GPUs span both NUMA nodes.
        let (set, loc) = pick(&t, five, 17);
        assert_eq!((set.count_ones(), loc), (17, Locality::System));
        assert_eq!(t.choose(all, 33), None);
    }

    #[test]
    fn exact_search_is_bounded_by_the_number_of_sets() {
        assert_eq!((subsets(16, 8, u64::MAX), subsets(64, 2, u64::MAX)), (12_870, 2016));
        assert_eq!((subsets(5, 0, 10), subsets(3, 4, 10)), (1, 0));
        assert_eq!(subsets(64, 32, EXACT_SUBSETS), EXACT_SUBSETS + 1, "capped, no overflow");
        let free = |n: u32| if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
        // 8 of 16 (12,870 sets, 1.6 ms per node before) is greedy; 4 of 14 (1,001) exact; a single
        // GPU or all but one of 64 (64 sets) exact.
        assert!(!Topology::exact_search(free(16), 8));
        assert!(Topology::exact_search(free(14), 4));
        assert!(!Topology::exact_search(free(14), 5));
        assert!(Topology::exact_search(free(64), 1) && Topology::exact_search(free(64), 63));
        // Greedy on a 16-GPU node with two NVLink islands of 8: eight GPUs still get one island.
        let devices: Vec<GpuDevice> = (0..16)
            .map(|i: usize| GpuDevice {
                id: format!("g{i}"),
                nvlink_peers: (0..16).filter(|&j| j != i && j / 8 == i / 8).map(|j| format!("g{j}")).collect(),
                numa_node: Some((i / 8) as i32),
                ..Default::default()
            })
            .collect();
        let t = topo(&devices);
        assert_eq!(pick(&t, free(16), 8), (0xff, Locality::NvLink));
        assert_eq!(pick(&t, free(16) & !1, 8), (0xff00, Locality::NvLink));
        // Timing, printed only (debug build: a relative indication, never asserted).
        let start = std::time::Instant::now();
        for _ in 0..100 {
            std::hint::black_box(t.choose(free(16), 8));
        }
        println!("choose 8 of 16 (greedy): {:?} per call", start.elapsed() / 100);
        let start = std::time::Instant::now();
        for _ in 0..10 {
            std::hint::black_box(t.exact(free(16), 8));
        }
        println!("the same by exact search (the old path, 12,870 sets): {:?} per call", start.elapsed() / 10);
        let start = std::time::Instant::now();
        for _ in 0..100 {
            std::hint::black_box(Topology::from_devices(&devices));
        }
        println!("from_devices (16): {:?} per call", start.elapsed() / 100);
    }

    #[test]
    fn rank_level_counts_only_levels_the_node_reports() {
        let t = topo(&dgx(false));
        assert_eq!([Locality::NvLink, Locality::Numa, Locality::System].map(|l| t.rank_level(l)), [0, 2, 3]);
        // NUMA data only: one NUMA node is the best this node can tell, so it ranks like an
        // NVLink set elsewhere (and like a node without any data); crossing NUMA nodes ranks 1.
        let numa_only: Vec<GpuDevice> =
            dgx(false).into_iter().map(|d| GpuDevice { nvlink_peers: vec![], pci_switch: String::new(), ..d }).collect();
        let t = topo(&numa_only);
        let (set, loc) = pick(&t, mask(&[0, 1, 2, 3, 4, 5, 6, 7]), 4);
        assert_eq!((set, loc, t.rank_level(loc)), (mask(&[0, 1, 2, 3]), Locality::Numa, 0));
        assert_eq!(t.rank_level(Locality::System), 1);
        // Switches but no NVLink: one switch ranks 0.
        let switches: Vec<GpuDevice> = dgx(false).into_iter().map(|d| GpuDevice { nvlink_peers: vec![], ..d }).collect();
        assert_eq!(topo(&switches).rank_level(Locality::PciSwitch), 0);
    }
}
