//! Feasibility: whether a node can run a task group at all, resources aside (node readiness,
//! drivers, job and group constraints, host volumes), and the bookkeeping of why nodes were
//! filtered.

use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::HashMap;

use mlp_proto::consts::{host_volume, node_status};
use mlp_proto::matcher;
use mlp_proto::v1::{AllocMetric, Constraint, Job, Node, TaskGroup};

/// Whether the scheduler may place anything on `node` (ready and eligible).
pub fn node_usable(node: &Node) -> bool {
    node.status == node_status::READY && node.eligible
}

/// Why a node cannot run a task group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// A driver the group needs is missing; the text is the `class_filtered` key.
    Class(String),
    /// A constraint does not hold; the text is the `constraint_filtered` key.
    Constraint(String),
}

impl Rejection {
    /// Counts this rejection in `metric`.
    pub fn record(&self, metric: &mut AllocMetric) {
        metric.nodes_filtered += 1;
        let (map, key) = match self {
            Rejection::Class(k) => (&mut metric.class_filtered, k),
            Rejection::Constraint(k) => (&mut metric.constraint_filtered, k),
        };
        *map.entry(key.clone()).or_default() += 1;
    }
}

/// Checks, in Nomad's order, job constraints, the group's drivers, group constraints, then the
/// group's host volumes.
pub fn check(job: &Job, tg: &TaskGroup, node: &Node) -> Result<(), Rejection> {
    if let Some(c) = job.constraints.iter().find(|c| !holds(c, node)) {
        return Err(Rejection::Constraint(constraint_text(c)));
    }
    if let Some(t) = tg.tasks.iter().find(|t| !node.drivers.iter().any(|d| d == &t.driver)) {
        let disabled =
            node.attributes.get(mlp_proto::consts::DRIVERS_DISABLED_ATTR).is_some_and(|list| list.split(',').any(|d| d == t.driver));
        if disabled {
            return Err(Rejection::Class(format!("driver {} disabled on node {}", t.driver, node.name)));
        }
        return Err(Rejection::Class(format!("missing driver {:?}", t.driver)));
    }
    if let Some(c) = tg.constraints.iter().find(|c| !holds(c, node)) {
        return Err(Rejection::Constraint(constraint_text(c)));
    }
    host_volumes(tg, node)
}

/// Whether `node` offers every host volume the group asks for (issue 15 §4): the agent
/// advertises `host_volume.<source>`, as `rw` when some task of the group mounts a volume that
/// is not read-only read-write. The rejection names the volume (a `constraint_filtered` key,
/// counted over the nodes that lack it).
fn host_volumes(tg: &TaskGroup, node: &Node) -> Result<(), Rejection> {
    for v in &tg.volumes {
        let Some(mode) = node.attributes.get(&host_volume::attr(&v.source)) else {
            return Err(Rejection::Constraint(format!("missing host volume {:?}", v.source)));
        };
        let writes = !v.read_only && tg.tasks.iter().flat_map(|t| &t.volume_mounts).any(|m| m.volume == v.name && !m.read_only);
        if writes && mode != host_volume::READ_WRITE {
            return Err(Rejection::Constraint(format!(
                "host volume {:?} is read-only (volume {:?} is mounted read-write)",
                v.source, v.name
            )));
        }
    }
    Ok(())
}

/// The constraint as the user wrote it, e.g. `${attr.kernel.name} = linux`.
pub fn constraint_text(c: &Constraint) -> String {
    [c.attribute.as_str(), c.operator.as_str(), c.value.as_str()].iter().filter(|s| !s.is_empty()).copied().collect::<Vec<_>>().join(" ")
}

/// Resolves `${attr.X}`, `${meta.X}`, `${node.*}`; anything else is a literal. None when the
/// attribute is not set on the node.
fn resolve(target: &str, node: &Node) -> Option<String> {
    let Some(inner) = target.strip_prefix("${").and_then(|t| t.strip_suffix('}')) else {
        return Some(target.to_string());
    };
    if let Some(k) = inner.strip_prefix("attr.") {
        return node.attributes.get(k).cloned();
    }
    if let Some(k) = inner.strip_prefix("meta.") {
        return node.meta.get(k).cloned();
    }
    match inner {
        "node.id" | "node.unique.id" => Some(node.id.clone()),
        "node.name" | "node.unique.name" => Some(node.name.clone()),
        "node.datacenter" => Some(node.datacenter.clone()),
        "node.pool" => Some(node.node_pool.clone()),
        _ => None,
    }
}

/// The value of a gang's topology attribute on `node`: `${meta.rack}` or the bare `meta.rack`.
/// None when the node does not set it.
pub fn topology_value(attribute: &str, node: &Node) -> Option<String> {
    let attribute = attribute.trim();
    if attribute.starts_with("${") {
        resolve(attribute, node)
    } else {
        resolve(&format!("${{{attribute}}}"), node)
    }
}

/// Whether constraint `c` holds on `node`. Unknown operators never hold (fail closed).
pub fn holds(c: &Constraint, node: &Node) -> bool {
    let l = resolve(&c.attribute, node);
    let r = resolve(&c.value, node);
    match c.operator.as_str() {
        "is_set" => l.is_some(),
        "is_not_set" => l.is_none(),
        // As in Nomad, `!=` holds when the attribute is missing.
        "!=" | "not" => l != r,
        op => {
            let (Some(l), Some(r)) = (l, r) else { return false };
            match op {
                "=" | "==" | "is" => l == r,
                "<" => compare(&l, &r) == Ordering::Less,
                "<=" => compare(&l, &r) != Ordering::Greater,
                ">" => compare(&l, &r) == Ordering::Greater,
                ">=" => compare(&l, &r) != Ordering::Less,
                "regexp" => with_compiled(op, &r, |m| matches!(m, Compiled::Regex(re) if re.is_match(&l))),
                "version" | "semver" => with_compiled(
                    op,
                    &r,
                    |m| matches!(m, Compiled::Version(req) if matcher::parse_version(op, &l).is_some_and(|v| req.matches(&v))),
                ),
                "set_contains" | "set_contains_all" => {
                    let have = set(&l);
                    set(&r).iter().all(|v| have.contains(v))
                }
                "set_contains_any" => {
                    let have = set(&l);
                    set(&r).iter().any(|v| have.contains(v))
                }
                _ => false,
            }
        }
    }
}

/// A compiled operand; `Invalid` for one that does not compile (never holds; the validator
/// refuses such jobs, but an older state may hold one).
enum Compiled {
    Regex(regex::Regex),
    Version(semver::VersionReq),
    Invalid,
}

/// Compiled operands kept per scheduler thread: a constraint is checked against every candidate
/// node, and compiling its pattern each time would cost more than the match. Bounded: cleared
/// when full.
const COMPILED_CACHE_ENTRIES: usize = 512;

/// The operators with compiled operands, in the order of the cache's maps.
const COMPILED_OPERATORS: [&str; 3] = ["regexp", "version", "semver"];

thread_local! {
    /// One map per operator, keyed by operand, so that a lookup (once per node and constraint)
    /// borrows the operand instead of allocating a key.
    static COMPILED: RefCell<[HashMap<String, Compiled>; 3]> = RefCell::new(Default::default());
}

fn with_compiled(op: &str, operand: &str, f: impl FnOnce(&Compiled) -> bool) -> bool {
    let Some(slot) = COMPILED_OPERATORS.iter().position(|o| *o == op) else { return false };
    COMPILED.with(|cache| {
        let mut maps = cache.borrow_mut();
        if !maps[slot].contains_key(operand) {
            if maps.iter().map(HashMap::len).sum::<usize>() >= COMPILED_CACHE_ENTRIES {
                maps.iter_mut().for_each(HashMap::clear);
            }
            let compiled = match op {
                "regexp" => matcher::compile_regex(operand).map_or(Compiled::Invalid, Compiled::Regex),
                _ => matcher::parse_version_req(op, operand).map_or(Compiled::Invalid, Compiled::Version),
            };
            maps[slot].insert(operand.to_string(), compiled);
        }
        maps[slot].get(operand).is_some_and(f)
    })
}

/// Numeric when both sides parse as numbers, else lexical.
fn compare(l: &str, r: &str) -> Ordering {
    match (l.trim().parse::<f64>(), r.trim().parse::<f64>()) {
        (Ok(a), Ok(b)) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
        _ => l.cmp(r),
    }
}

fn set(s: &str) -> Vec<&str> {
    s.split(',').map(str::trim).filter(|v| !v.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlp_proto::v1::Task;

    fn node() -> Node {
        Node {
            id: "id-1".into(),
            name: "n1".into(),
            datacenter: "dc1".into(),
            node_pool: "gpu".into(),
            status: node_status::READY.into(),
            eligible: true,
            drivers: vec!["exec".into()],
            attributes: [("kernel.name", "linux"), ("cpu.numcores", "16"), ("os.version", "22.04"), ("gpu.models", "A100,H100")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            meta: [("rack".to_string(), "r7".to_string())].into_iter().collect(),
            ..Default::default()
        }
    }

    fn c(attribute: &str, operator: &str, value: &str) -> Constraint {
        Constraint { attribute: attribute.into(), operator: operator.into(), value: value.into() }
    }

    #[test]
    fn constraint_table() {
        let n = node();
        let cases: &[(&str, &str, &str, bool)] = &[
            ("${attr.kernel.name}", "=", "linux", true),
            ("${attr.kernel.name}", "==", "windows", false),
            ("${attr.kernel.name}", "!=", "windows", true),
            ("${attr.missing}", "!=", "x", true),
            ("${attr.missing}", "=", "x", false),
            ("${node.datacenter}", "=", "dc1", true),
            ("${node.name}", "=", "n1", true),
            ("${node.id}", "=", "id-1", true),
            ("${node.pool}", "=", "gpu", true),
            ("${meta.rack}", "=", "r7", true),
            ("${attr.cpu.numcores}", ">", "8", true), // numeric, not lexical ("16" < "8")
            ("${attr.cpu.numcores}", "<=", "16", true),
            ("${attr.cpu.numcores}", "<", "16", false),
            ("${attr.os.version}", ">=", "20.04", true),
            ("${attr.kernel.name}", ">", "darwin", true), // lexical
            ("${attr.kernel.name}", "regexp", "^lin", true),
            ("${attr.kernel.name}", "regexp", "^(darwin|windows)$", false),
            ("${attr.kernel.name}", "regexp", "(", false), // bad pattern never holds
            ("${attr.gpu.models}", "set_contains", "H100", true),
            ("${attr.gpu.models}", "set_contains", "H100, A100", true),
            ("${attr.gpu.models}", "set_contains", "H100,V100", false),
            ("${attr.gpu.models}", "set_contains_any", "H100,V100", true),
            ("${meta.rack}", "is_set", "", true),
            ("${meta.zone}", "is_set", "", false),
            ("${meta.zone}", "is_not_set", "", true),
            ("${attr.kernel.name}", "version", ">= 1.0", false), // not a version: never holds
            ("${attr.os.version}", "version", ">= 20.4, < 23", true),
            ("${attr.os.version}", "version", "~> 22.10", false),
            ("${attr.os.version}", "semver", ">= 20.0.0", false), // "22.04" is not strict semver
            ("${attr.kernel.name}", "bogus", "x", false),         // unknown operator fails closed
            ("${attr.kernel.name}", "regexp", "^(a+)+$", false),  // linear time, no blow-up
        ];
        for (a, op, v, want) in cases {
            assert_eq!(holds(&c(a, op, v), &n), *want, "{a} {op} {v}");
        }
    }

    #[test]
    fn check_reports_the_first_failure() {
        let n = node();
        let tg = |driver: &str, cons: Vec<Constraint>| TaskGroup {
            name: "g".into(),
            tasks: vec![Task { driver: driver.into(), ..Default::default() }],
            constraints: cons,
            ..Default::default()
        };
        let job = Job { constraints: vec![c("${attr.kernel.name}", "=", "linux")], ..Default::default() };
        assert_eq!(check(&job, &tg("exec", vec![]), &n), Ok(()));
        assert_eq!(check(&job, &tg("raw_exec", vec![]), &n), Err(Rejection::Class("missing driver \"raw_exec\"".into())));
        // A driver the agent's configuration turned off is named as such (issue 15 §4).
        let mut off = n.clone();
        off.name = "gpu-7".into();
        off.attributes.insert(mlp_proto::consts::DRIVERS_DISABLED_ATTR.into(), "raw_exec,wasm".into());
        assert_eq!(check(&job, &tg("raw_exec", vec![]), &off), Err(Rejection::Class("driver raw_exec disabled on node gpu-7".into())));
        assert_eq!(
            check(&job, &tg("exec", vec![c("${meta.zone}", "is_set", "")]), &n),
            Err(Rejection::Constraint("${meta.zone} is_set".into()))
        );
        let windows = Job { constraints: vec![c("${attr.kernel.name}", "=", "windows")], ..Default::default() };
        assert_eq!(check(&windows, &tg("raw_exec", vec![]), &n), Err(Rejection::Constraint("${attr.kernel.name} = windows".into())));
    }

    #[test]
    fn host_volumes_need_the_node_to_offer_them_writable_when_mounted_read_write() {
        use mlp_proto::v1::{VolumeMount, VolumeRequest};
        let tg = |read_only_volume: bool, read_only_mount: bool| TaskGroup {
            name: "g".into(),
            volumes: vec![VolumeRequest {
                name: "data".into(),
                r#type: "host".into(),
                source: "datasets".into(),
                read_only: read_only_volume,
            }],
            tasks: vec![Task {
                driver: "exec".into(),
                volume_mounts: vec![VolumeMount { volume: "data".into(), destination: "/data".into(), read_only: read_only_mount }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let job = Job::default();
        let bare = node();
        let missing = Err(Rejection::Constraint("missing host volume \"datasets\"".into()));
        assert_eq!(check(&job, &tg(true, true), &bare), missing);
        let mut ro = node();
        ro.attributes.insert(host_volume::attr("datasets"), "ro".into());
        let mut rw = node();
        rw.attributes.insert(host_volume::attr("datasets"), "rw".into());
        assert_eq!(check(&job, &tg(true, true), &ro), Ok(()));
        assert_eq!(check(&job, &tg(false, true), &ro), Ok(()), "every mount reads only: a read-only volume does");
        assert_eq!(
            check(&job, &tg(false, false), &ro),
            Err(Rejection::Constraint("host volume \"datasets\" is read-only (volume \"data\" is mounted read-write)".into()))
        );
        assert_eq!(check(&job, &tg(false, false), &rw), Ok(()));
        assert_eq!(check(&job, &tg(true, true), &rw), Ok(()));
        // The reason is counted like a constraint's, so a blocked evaluation names the volume.
        let mut metric = AllocMetric::default();
        if let Err(r) = check(&job, &tg(true, true), &bare) {
            r.record(&mut metric);
        }
        assert_eq!(metric.constraint_filtered.get("missing host volume \"datasets\""), Some(&1));
    }
}
