//! Semantic rules for jobs (names, ranges, drivers, restart modes, required fields), checked on
//! the decoded `Job` so that HCL files and JSON submissions obey exactly the same rules.

use std::collections::{HashMap, HashSet};

use std::collections::BTreeMap;

use prost::Message;

use super::duration::format_ms;
use super::limits::*;
use super::Loc;
use crate::consts::{check_type, dispatch_payload, driver, health_check, job_type, restart_mode};
use crate::matcher;
use crate::v1::{Affinity, Constraint, Job, ServiceSpec, Spread, Task, TaskGroup, VolumeRequest};

/// Priority bounds (inclusive).
pub(crate) const PRIORITY_RANGE: (i32, i32) = (1, 100);
/// Longest SIGTERM → SIGKILL grace period; longer ones would stall drains and stops.
pub(crate) const MAX_KILL_TIMEOUT_MS: u64 = 3_600_000;

pub(crate) const DRIVERS: &[&str] = &[driver::EXEC, driver::RAW_EXEC, driver::WASM, driver::OCI];
pub(crate) const JOB_TYPES: &[&str] = &[job_type::BATCH, job_type::SERVICE, job_type::SYSTEM, job_type::SYSBATCH];
pub(crate) const PAYLOAD_MODES: &[&str] = &[dispatch_payload::OPTIONAL, dispatch_payload::REQUIRED, dispatch_payload::FORBIDDEN];
pub(crate) const RESTART_MODES: &[&str] = &[restart_mode::FAIL, restart_mode::DELAY];
pub(crate) const HEALTH_CHECKS: &[&str] = &[health_check::CHECKS, health_check::TASK_STATES, health_check::MANUAL];
/// Longest `update` duration (min_healthy_time, deadlines, stagger): a day.
pub(crate) const MAX_UPDATE_DURATION_MS: u64 = 24 * 3_600_000;
pub(crate) const OPERATORS: &[&str] = &[
    "=",
    "==",
    "!=",
    ">",
    ">=",
    "<",
    "<=",
    "regexp",
    "version",
    "semver",
    "set_contains",
    "set_contains_all",
    "set_contains_any",
    "is_set",
    "is_not_set",
];

/// One broken rule: `key` locates it structurally (see [`Loc`]), `path` names it for people.
#[derive(Debug)]
pub(crate) struct Issue {
    pub key: String,
    pub path: String,
    pub message: String,
}

/// Checks every rule and returns all the violations, in tree order.
pub(crate) fn check_job(job: &Job) -> Vec<Issue> {
    check_at(job, Loc::job(&job.name))
}

/// Whether `job` passes every check of [`check_job`]: the same checks, with no locations built.
pub(crate) fn is_valid(job: &Job) -> bool {
    check_at(job, Loc::nowhere()).is_empty()
}

fn check_at(job: &Job, loc: Loc) -> Vec<Issue> {
    let mut c = Checker::default();
    c.name(&loc, "job", &job.name);
    if !job.namespace.is_empty() && !is_namespace(&job.namespace) {
        c.push(&loc.field("namespace"), format!("invalid namespace {:?}: must be 1-63 characters of a-z, 0-9 or -", job.namespace));
    }
    c.one_of(&loc.field("type"), "job type", &job.r#type, JOB_TYPES);
    let size = job.encoded_len();
    if size > MAX_JOB_BYTES {
        c.push(&loc, format!("the job is {size} bytes encoded; at most {MAX_JOB_BYTES} (limit: job size)"));
    }
    c.map(&loc.field("meta"), "meta", &job.meta);
    c.at_most(&loc.indexed("group", MAX_GROUPS), "groups per job", job.groups.len(), MAX_GROUPS);
    let total: u64 = job.groups.iter().map(|g| u64::from(g.effective_count())).sum();
    if total > MAX_JOB_ALLOCS {
        c.push(&loc, format!("the groups' counts sum to {total}; at most {MAX_JOB_ALLOCS} (limit: allocations per job)"));
    }
    let (lo, hi) = PRIORITY_RANGE;
    if !(lo..=hi).contains(&job.priority) {
        c.push(&loc.field("priority"), format!("must be between {lo} and {hi}, found {}", job.priority));
    }
    c.job_types(&loc, job);
    c.constraints(&loc, &job.constraints);
    c.affinities(&loc, &job.affinities);
    c.spreads(&loc, &job.spreads);
    if job.groups.is_empty() {
        c.push(&loc, "job has no groups; at least one `group` block is required");
    }
    let mut seen = HashSet::new();
    for (i, group) in job.groups.iter().enumerate() {
        let gloc = loc.named("group", i, &group.name);
        if !group.name.is_empty() && !seen.insert(group.name.as_str()) {
            c.push(&gloc.field("name"), format!("duplicate group name {:?}", group.name));
        }
        c.group(&gloc, group);
    }
    c.update(&loc, job);
    c.issues
}

#[derive(Default)]
struct Checker {
    issues: Vec<Issue>,
}

impl Checker {
    fn push(&mut self, loc: &Loc, message: impl Into<String>) {
        self.issues.push(Issue { key: loc.key.clone(), path: loc.path.clone(), message: message.into() });
    }

    /// Job, group and task names end up in allocation names, log paths and URLs.
    fn name(&mut self, loc: &Loc, kind: &str, name: &str) {
        let at = loc.name_label();
        if name.is_empty() {
            self.push(&at, format!("missing {kind} name"));
        } else if !is_name(name) {
            self.push(&at, format!("invalid {kind} name {name:?}: must be 1-128 characters of A-Z, a-z, 0-9, _ or -"));
        }
    }

    fn one_of(&mut self, loc: &Loc, what: &str, value: &str, allowed: &[&str]) {
        if value.is_empty() {
            self.push(loc, format!("missing required field; expected one of: {}", allowed.join(", ")));
        } else if !allowed.contains(&value) {
            self.push(loc, format!("unknown {what} {value:?}; expected one of: {}", allowed.join(", ")));
        }
    }

    /// At most `max` of something; the finding names the limit.
    fn at_most(&mut self, loc: &Loc, what: &str, found: usize, max: usize) {
        if found > max {
            self.push(loc, format!("at most {max} {what}, found {found} (limit: {what})"));
        }
    }

    /// A string no longer than `max` bytes and without NUL (which no process argument,
    /// environment entry or path can carry).
    fn text(&mut self, loc: &Loc, what: &str, s: &str, max: usize) {
        if s.len() > max {
            self.push(loc, format!("{what} is {} bytes; at most {max} (limit: {what} length)", s.len()));
        } else if s.contains('\0') {
            self.push(loc, format!("{what} contains a NUL character"));
        }
    }

    /// An `env` or `meta` map: bounded entries, keys and values.
    fn map(&mut self, loc: &Loc, what: &str, map: &BTreeMap<String, String>) {
        self.at_most(loc, &format!("{what} entries"), map.len(), MAX_MAP_ENTRIES);
        for (k, v) in map.iter().take(MAX_MAP_ENTRIES) {
            let kloc = if loc.is_nowhere() { Loc::nowhere() } else { loc.field(&printable_key(k)) };
            if k.is_empty() {
                self.push(&kloc, format!("empty {what} key"));
            }
            self.text(&kloc, &format!("{what} key"), k, MAX_KEY_BYTES);
            if what == "env" && k.contains('=') {
                self.push(&kloc, "env key contains `=`");
            }
            self.text(&kloc, &format!("{what} value"), v, MAX_VALUE_BYTES);
        }
    }

    /// `parameterized` and `periodic` (issue 16 §2): only on batch and sysbatch jobs, not both;
    /// known payload mode, meta keys named once; at least one cron, each parses, a known zone.
    fn job_types(&mut self, loc: &Loc, job: &Job) {
        use super::jobtypes::{parse_cron, parse_time_zone, MAX_CRONS, MAX_DISPATCH_META_KEYS};
        let batch = job_type::is_batch(&job.r#type);
        if job_type::is_per_node(&job.r#type) {
            // One allocation per eligible node: a group's count and gangs mean nothing there.
            for (i, g) in job.groups.iter().enumerate() {
                let gloc = loc.named("group", i, &g.name);
                if g.count.is_some_and(|c| c != 1) {
                    self.push(
                        &gloc.field("count"),
                        format!(
                            "a {} job runs one allocation per eligible node; leave count out (or 1), found {}",
                            job.r#type,
                            g.count.unwrap_or(0)
                        ),
                    );
                }
                if g.gang || g.min_count > 0 {
                    self.push(&gloc.field("gang"), format!("a {} job cannot have gang groups", job.r#type));
                }
            }
        }
        if let Some(p) = &job.parameterized {
            let ploc = loc.field("parameterized");
            if !batch {
                self.push(&ploc, format!("a parameterized job must be of type batch or sysbatch, found {:?}", job.r#type));
            }
            if !p.payload.is_empty() {
                self.one_of(&ploc.field("payload"), "payload mode", &p.payload, PAYLOAD_MODES);
            }
            let keys = p.meta_required.len() + p.meta_optional.len();
            if keys > MAX_DISPATCH_META_KEYS {
                self.push(&ploc, format!("at most {MAX_DISPATCH_META_KEYS} meta keys in meta_required and meta_optional, found {keys}"));
            }
            let mut seen = HashSet::new();
            for (field, list) in [("meta_required", &p.meta_required), ("meta_optional", &p.meta_optional)] {
                let floc = ploc.field(field);
                for (i, k) in list.iter().enumerate().take(MAX_DISPATCH_META_KEYS) {
                    let kloc = floc.item(i);
                    if k.is_empty() {
                        self.push(&kloc, "empty meta key");
                    } else if !seen.insert(k.as_str()) {
                        self.push(&kloc, format!("meta key {k:?} is listed twice (a key is required or optional, once)"));
                    }
                    self.text(&kloc, "meta key", k, MAX_KEY_BYTES);
                }
            }
        }
        if let Some(p) = &job.periodic {
            let ploc = loc.field("periodic");
            if !batch {
                self.push(&ploc, format!("a periodic job must be of type batch or sysbatch, found {:?}", job.r#type));
            }
            if job.parameterized.is_some() {
                self.push(&ploc, "a job is periodic or parameterized, not both");
            }
            let cloc = ploc.field("crons");
            if p.crons.is_empty() {
                self.push(&cloc, "at least one cron expression is required: `crons = [\"0 3 * * *\"]`");
            }
            self.at_most(&cloc, "cron expressions", p.crons.len(), MAX_CRONS);
            for (i, c) in p.crons.iter().enumerate().take(MAX_CRONS) {
                if let Err(e) = parse_cron(c) {
                    self.push(&cloc.item(i), e.0);
                }
            }
            if let Err(e) = parse_time_zone(&p.time_zone) {
                self.push(&ploc.field("time_zone"), e.0);
            }
        }
    }

    /// The operand of a `regexp`, `version` or `semver` operator must compile.
    fn operand(&mut self, loc: &Loc, operator: &str, value: &str) {
        let checked = match operator {
            "regexp" => matcher::compile_regex(value).map(drop),
            "version" | "semver" => matcher::parse_version_req(operator, value).map(drop),
            _ => Ok(()),
        };
        if let Err(e) = checked {
            self.push(loc, e.to_string());
        }
    }

    fn constraints(&mut self, parent: &Loc, constraints: &[Constraint]) {
        self.at_most(&parent.indexed("constraint", MAX_CONSTRAINTS), "constraints here", constraints.len(), MAX_CONSTRAINTS);
        for (i, con) in constraints.iter().enumerate().take(MAX_CONSTRAINTS) {
            let loc = parent.indexed("constraint", i);
            if con.attribute.is_empty() {
                self.push(&loc.field("attribute"), "missing required field");
            }
            self.text(&loc.field("attribute"), "attribute", &con.attribute, MAX_KEY_BYTES);
            self.operator_and_value(&loc, &con.operator, &con.value);
        }
    }

    /// The operator and value of a constraint or an affinity: a known operator (empty means
    /// "="), a bounded value that compiles for `regexp` / `version` / `semver`, and present
    /// unless the operator is unary.
    fn operator_and_value(&mut self, loc: &Loc, operator: &str, value: &str) {
        self.text(&loc.field("value"), "value", value, matcher::MAX_PATTERN_BYTES);
        self.operand(&loc.field("value"), operator, value);
        if !operator.is_empty() && !OPERATORS.contains(&operator) {
            self.push(&loc.field("operator"), format!("unknown operator {operator:?}; expected one of: {}", OPERATORS.join(", ")));
        }
        let unary = matches!(operator, "is_set" | "is_not_set");
        if !unary && value.is_empty() {
            let op = if operator.is_empty() { "=" } else { operator };
            self.push(&loc.field("value"), format!("missing required field (operator {op:?} compares against a value)"));
        }
    }

    /// `affinity` blocks: an attribute reference, a constraint operator, a value unless the
    /// operator is unary, a weight in -100..=100 other than 0.
    fn affinities(&mut self, parent: &Loc, affinities: &[Affinity]) {
        if affinities.len() > MAX_AFFINITIES {
            self.push(
                &parent.indexed("affinity", MAX_AFFINITIES),
                format!("at most {MAX_AFFINITIES} affinity blocks here, found {}", affinities.len()),
            );
        }
        for (i, aff) in affinities.iter().enumerate().take(MAX_AFFINITIES) {
            let loc = parent.indexed("affinity", i);
            self.attribute_reference(&loc.field("attribute"), &aff.attribute);
            self.operator_and_value(&loc, &aff.operator, &aff.value);
            let weight = aff.effective_weight();
            if weight == 0 || !(-100..=100).contains(&weight) {
                self.push(&loc.field("weight"), format!("must be between -100 and 100 and not 0, found {weight}"));
            }
        }
    }

    /// `spread` blocks: an attribute reference, a weight in 1..=100, targets with distinct
    /// values and percents in 0..=100 that sum to at most 100.
    fn spreads(&mut self, parent: &Loc, spreads: &[Spread]) {
        if spreads.len() > MAX_SPREADS {
            self.push(&parent.indexed("spread", MAX_SPREADS), format!("at most {MAX_SPREADS} spread blocks here, found {}", spreads.len()));
        }
        for (i, spread) in spreads.iter().enumerate().take(MAX_SPREADS) {
            let loc = parent.indexed("spread", i);
            self.attribute_reference(&loc.field("attribute"), &spread.attribute);
            let weight = spread.effective_weight();
            if !(1..=100).contains(&weight) {
                self.push(&loc.field("weight"), format!("must be between 1 and 100, found {weight}"));
            }
            if spread.targets.len() > MAX_SPREAD_TARGETS {
                self.push(
                    &loc.named("target", MAX_SPREAD_TARGETS, &spread.targets[MAX_SPREAD_TARGETS].value),
                    format!("at most {MAX_SPREAD_TARGETS} targets in one spread, found {}", spread.targets.len()),
                );
            }
            let mut seen = HashSet::new();
            let mut sum = 0u64;
            for (j, target) in spread.targets.iter().enumerate().take(MAX_SPREAD_TARGETS) {
                let tloc = loc.named("target", j, &target.value);
                self.text(&tloc.field("value"), "target value", &target.value, MAX_KEY_BYTES);
                if target.value.is_empty() {
                    self.push(&tloc.field("value"), "missing target value");
                } else if !seen.insert(target.value.as_str()) {
                    self.push(&tloc.field("value"), format!("duplicate target value {:?}", target.value));
                }
                if target.percent > 100 {
                    self.push(&tloc.field("percent"), format!("must be between 0 and 100, found {}", target.percent));
                }
                sum += u64::from(target.percent);
            }
            if sum > 100 {
                let last = spread.targets.len() - 1;
                self.push(
                    &loc.named("target", last, &spread.targets[last].value).field("percent"),
                    format!("the targets' percents sum to {sum}; at most 100"),
                );
            }
        }
    }

    /// A required node attribute reference: `${attr.X}`, `${meta.X}` or `${node.X}`.
    fn attribute_reference(&mut self, loc: &Loc, attribute: &str) {
        if attribute.is_empty() {
            self.push(loc, "missing required field");
            return;
        }
        if attribute.len() > MAX_KEY_BYTES {
            self.text(loc, "attribute", attribute, MAX_KEY_BYTES);
            return;
        }
        let inner = attribute.strip_prefix("${").and_then(|a| a.strip_suffix('}'));
        if !inner.is_some_and(is_attribute_name) {
            self.push(
                loc,
                format!("must reference a node attribute such as \"${{meta.rack}}\" or \"${{attr.kernel.name}}\", found {attribute:?}"),
            );
        }
    }

    fn group(&mut self, loc: &Loc, group: &TaskGroup) {
        self.name(loc, "group", &group.name);
        if group.effective_count() > MAX_COUNT {
            self.push(
                &loc.field("count"),
                format!("must be between 0 and {MAX_COUNT}, found {} (limit: count per group)", group.effective_count()),
            );
        }
        self.map(&loc.field("meta"), "meta", &group.meta);
        self.at_most(&loc.indexed("task", MAX_TASKS), "tasks per group", group.tasks.len(), MAX_TASKS);
        self.gang(loc, group);
        self.migrate_reschedule(loc, group);
        self.network(loc, group);
        self.services(loc, group);
        self.volumes(loc, group);
        if let Some(restart) = &group.restart {
            let rloc = loc.field("restart");
            self.one_of(&rloc.field("mode"), "restart mode", &restart.mode, RESTART_MODES);
        }
        self.constraints(loc, &group.constraints);
        self.affinities(loc, &group.affinities);
        self.spreads(loc, &group.spreads);
        if group.tasks.is_empty() {
            self.push(loc, "group has no tasks; at least one `task` block is required");
        }
        let mut seen = HashSet::new();
        for (i, task) in group.tasks.iter().enumerate().take(MAX_TASKS) {
            let tloc = loc.named("task", i, &task.name);
            if !task.name.is_empty() && !seen.insert(task.name.as_str()) {
                self.push(&tloc.field("name"), format!("duplicate task name {:?} in this group", task.name));
            }
            self.task(&tloc, task);
        }
    }

    /// Host volumes (issue 15 §4): each group `volume` has a unique label, type "host" and a
    /// source that can name an agent's `host_volume`; each task `volume_mount` names a volume
    /// of its group, at an absolute destination without `..`, not twice in a task, and not
    /// read-write when the volume is read-only.
    fn volumes(&mut self, loc: &Loc, group: &TaskGroup) {
        self.at_most(&loc.field("volume"), "volume blocks", group.volumes.len(), MAX_VOLUMES);
        let mut labels: HashMap<&str, &VolumeRequest> = HashMap::new();
        for (i, v) in group.volumes.iter().enumerate().take(MAX_VOLUMES) {
            let vloc = loc.named("volume", i, &v.name);
            let name_at = vloc.name_label();
            if v.name.is_empty() {
                self.push(&name_at, "missing volume label; write `volume \"LABEL\" { ... }`");
            } else if !is_name(&v.name) {
                self.push(
                    &name_at,
                    format!("invalid volume label {:?}: must be 1-128 characters of A-Z, a-z, 0-9, _ or -", printable_key(&v.name)),
                );
            } else if labels.contains_key(v.name.as_str()) {
                self.push(&name_at, format!("duplicate volume label {:?} in this group", v.name));
            } else {
                labels.insert(v.name.as_str(), v);
            }
            let tloc = vloc.field("type");
            if v.r#type.is_empty() {
                self.push(&tloc, format!("missing required field; supported volume types: {}", VOLUME_TYPES.join(", ")));
            } else if !VOLUME_TYPES.contains(&v.r#type.as_str()) {
                self.push(
                    &tloc,
                    format!(
                        "unsupported volume type {:?}; supported: {} (a node's `host_volume`)",
                        printable_key(&v.r#type),
                        VOLUME_TYPES.join(", ")
                    ),
                );
            }
            let sloc = vloc.field("source");
            if v.source.is_empty() {
                self.push(&sloc, "missing required field: the name of a host volume of the node (its agent's `host_volume \"NAME\"`)");
            } else if !is_host_volume_name(&v.source) {
                self.push(
                    &sloc,
                    format!(
                        "invalid host volume name {:?}: must be 1-128 characters of A-Z, a-z, 0-9, _, . or -",
                        printable_key(&v.source)
                    ),
                );
            }
        }
        for (i, task) in group.tasks.iter().enumerate().take(MAX_TASKS) {
            let tloc = loc.named("task", i, &task.name);
            self.at_most(&tloc.field("volume_mount"), "volume_mount blocks", task.volume_mounts.len(), MAX_VOLUMES);
            if task.driver == driver::WASM && !task.volume_mounts.is_empty() {
                self.push(
                    &tloc.volume_mount(0),
                    "the wasm driver cannot mount host volumes (its modules see only their task directory); use exec, oci or raw_exec",
                );
            }
            let mut destinations: HashMap<std::path::PathBuf, usize> = HashMap::new();
            for (j, m) in task.volume_mounts.iter().enumerate().take(MAX_VOLUMES) {
                let mloc = tloc.volume_mount(j);
                let vol_at = mloc.field("volume");
                match labels.get(m.volume.as_str()) {
                    _ if m.volume.is_empty() => {
                        self.push(&vol_at, "missing required field: the label of one of the group's `volume` blocks")
                    }
                    None => {
                        let mut known: Vec<&str> = labels.keys().copied().collect();
                        known.sort_unstable();
                        let known = if known.is_empty() {
                            "the group declares no volumes".to_string()
                        } else {
                            format!("declared: {}", known.join(", "))
                        };
                        self.push(&vol_at, format!("no volume labelled {:?} in this group ({known})", printable_key(&m.volume)));
                    }
                    Some(v) if v.read_only && !m.read_only => self.push(
                        &mloc.field("read_only"),
                        format!("volume {:?} is read-only; a mount of it must set `read_only = true`", v.name),
                    ),
                    Some(_) => {}
                }
                let dloc = mloc.field("destination");
                self.text(&dloc, "destination", &m.destination, MAX_VALUE_BYTES);
                if let Err(e) = check_mount_destination(&m.destination) {
                    self.push(&dloc, e);
                } else {
                    let normal: std::path::PathBuf = std::path::Path::new(&m.destination).components().collect();
                    if let Some(first) = destinations.insert(normal, j) {
                        self.push(&dloc, format!("{:?} is already the destination of volume_mount[{first}] of this task", m.destination));
                    }
                }
            }
        }
    }

    /// `update` blocks (issue 16 §1): only on service (and system) jobs; a known health check;
    /// each group's resolved strategy with healthy_deadline > min_healthy_time and
    /// progress_deadline > healthy_deadline (0 = no progress deadline); `shutdown_delay`
    /// bounded like a kill timeout.
    fn update(&mut self, loc: &Loc, job: &Job) {
        let rolling_type = job.r#type == job_type::SERVICE || job.r#type == job_type::SYSTEM;
        let blocks = std::iter::once((loc.field("update"), job.update.as_ref()))
            .chain(job.groups.iter().enumerate().map(|(i, g)| (loc.named("group", i, &g.name).field("update"), g.update.as_ref())));
        for (uloc, u) in blocks {
            let Some(u) = u else { continue };
            if !rolling_type {
                self.push(&uloc, format!("an `update` block applies to service and system jobs; this job's type is {:?}", job.r#type));
                continue;
            }
            if let Some(hc) = &u.health_check {
                self.one_of(&uloc.field("health_check"), "health check", hc, HEALTH_CHECKS);
            }
            for (field, v) in [("max_parallel", u.max_parallel), ("canary", u.canary)] {
                if let Some(v) = v {
                    if v > MAX_COUNT {
                        self.push(&uloc.field(field), format!("must be between 0 and {MAX_COUNT}, found {v} (limit: count per group)"));
                    }
                }
            }
            for (field, v) in [
                ("min_healthy_time", u.min_healthy_time_ms),
                ("healthy_deadline", u.healthy_deadline_ms),
                ("progress_deadline", u.progress_deadline_ms),
                ("stagger", u.stagger_ms),
            ] {
                if v.is_some_and(|v| v > MAX_UPDATE_DURATION_MS) {
                    self.push(&uloc.field(field), format!("at most {} (limit: update durations)", format_ms(MAX_UPDATE_DURATION_MS)));
                }
            }
        }
        for (i, g) in job.groups.iter().enumerate() {
            let gloc = loc.named("group", i, &g.name);
            if g.shutdown_delay_ms > MAX_KILL_TIMEOUT_MS {
                self.push(
                    &gloc.field("shutdown_delay"),
                    format!("at most {}, found {}", format_ms(MAX_KILL_TIMEOUT_MS), format_ms(g.shutdown_delay_ms)),
                );
            }
            if !rolling_type {
                continue;
            }
            let Some(u) = super::effective_update(job, g) else { continue };
            // Name the block that set the value: the group's when it has one, else the job's.
            let uloc = if g.update.is_some() { gloc.field("update") } else { loc.field("update") };
            let (min, healthy, progress) =
                (u.min_healthy_time_ms.unwrap_or(0), u.healthy_deadline_ms.unwrap_or(0), u.progress_deadline_ms.unwrap_or(0));
            if healthy <= min {
                self.push(
                    &uloc.field("healthy_deadline"),
                    format!(
                        "group {:?}: healthy_deadline ({}) must be greater than min_healthy_time ({})",
                        g.name,
                        format_ms(healthy),
                        format_ms(min)
                    ),
                );
            }
            if progress != 0 && progress <= healthy {
                self.push(
                    &uloc.field("progress_deadline"),
                    format!(
                        "group {:?}: progress_deadline ({}) must be greater than healthy_deadline ({}), or 0 for none",
                        g.name,
                        format_ms(progress),
                        format_ms(healthy)
                    ),
                );
            }
            if u.auto_promote == Some(true) && u.canary == Some(0) {
                self.push(&uloc.field("auto_promote"), format!("group {:?}: auto_promote needs canary > 0", g.name));
            }
        }
    }

    /// The `service` blocks of the group and its tasks: DNS-label names, unique per group or
    /// task, ports that are labels of the group's network or numbers, bounded tags, checks of a
    /// known type with what their type needs and sane durations.
    fn services(&mut self, loc: &Loc, group: &TaskGroup) {
        let total = group.services.len() + group.tasks.iter().map(|t| t.services.len()).sum::<usize>();
        self.at_most(&loc.service(MAX_SERVICES), "services per group", total, MAX_SERVICES);
        let labels: HashSet<&str> = group.network.iter().flat_map(|n| n.ports.iter()).map(|p| p.label.as_str()).collect();
        self.service_list(loc, &group.services, &labels);
        for (i, task) in group.tasks.iter().enumerate().take(MAX_TASKS) {
            self.service_list(&loc.named("task", i, &task.name), &task.services, &labels);
        }
    }

    fn service_list(&mut self, parent: &Loc, services: &[ServiceSpec], labels: &HashSet<&str>) {
        let mut names = HashSet::new();
        for (i, svc) in services.iter().enumerate().take(MAX_SERVICES) {
            let sloc = parent.service(i);
            if svc.name.is_empty() {
                self.push(&sloc.field("name"), "missing service name");
            } else if !is_dns_label(&svc.name) {
                self.push(
                    &sloc.field("name"),
                    format!(
                        "invalid service name {:?}: must be a DNS label, 1-63 characters of a-z, 0-9 or - (not first or last)",
                        printable_key(&svc.name)
                    ),
                );
            } else if !names.insert(svc.name.as_str()) {
                self.push(&sloc.field("name"), format!("duplicate service name {:?} here", svc.name));
            }
            self.port_ref(&sloc.field("port"), &svc.port, labels);
            self.at_most(&sloc.field("tags"), "tags per service", svc.tags.len(), MAX_TAGS);
            for (t, tag) in svc.tags.iter().enumerate().take(MAX_TAGS) {
                let tloc = sloc.field("tags").item(t);
                if tag.is_empty() || tag.len() > MAX_TAG_BYTES || tag.chars().any(|c| c.is_control()) {
                    self.push(&tloc, format!("a tag must be 1-{MAX_TAG_BYTES} bytes without control characters"));
                }
            }
            self.at_most(&sloc.check(MAX_CHECKS), "checks per service", svc.checks.len(), MAX_CHECKS);
            for (c, check) in svc.checks.iter().enumerate().take(MAX_CHECKS) {
                let cloc = sloc.check(c);
                self.one_of(&cloc.field("type"), "check type", &check.r#type, check_type::ALL);
                self.port_ref(&cloc.field("port"), &check.port, labels);
                self.text(&cloc.field("name"), "check name", &check.name, MAX_KEY_BYTES);
                let t = check.r#type.as_str();
                if (t == check_type::HTTP || t == check_type::TCP) && check.port.is_empty() && svc.port.is_empty() {
                    self.push(&cloc.field("port"), format!("a {t} check needs a port: set the service's `port` or the check's"));
                }
                if t == check_type::HTTP {
                    let path = &check.path;
                    if !path.starts_with('/')
                        || path.len() > MAX_CHECK_PATH_BYTES
                        || path.chars().any(|c| c.is_control() || c.is_whitespace())
                    {
                        self.push(
                            &cloc.field("path"),
                            format!("must be a URL path starting with / (at most {MAX_CHECK_PATH_BYTES} bytes, no spaces), found {path:?}"),
                        );
                    }
                } else if !check.path.is_empty() {
                    self.push(&cloc.field("path"), format!("only http checks have a path; this is a {t:?} check"));
                }
                if t == check_type::SCRIPT {
                    if check.command.is_empty() {
                        self.push(&cloc.field("command"), "a script check needs a command");
                    }
                    self.text(&cloc.field("command"), "command", &check.command, MAX_VALUE_BYTES);
                    self.at_most(&cloc.field("args"), "args", check.args.len(), MAX_ARGS);
                    for a in check.args.iter().take(MAX_ARGS) {
                        self.text(&cloc.field("args"), "argument", a, MAX_VALUE_BYTES);
                    }
                } else if !check.command.is_empty() || !check.args.is_empty() {
                    self.push(&cloc.field("command"), format!("only script checks run a command; this is a {t:?} check"));
                }
                let (lo, hi) = (MIN_CHECK_INTERVAL_MS, MAX_CHECK_INTERVAL_MS);
                if !(lo..=hi).contains(&check.interval_ms) {
                    self.push(
                        &cloc.field("interval"),
                        format!("must be between {} and {}, found {}", format_ms(lo), format_ms(hi), format_ms(check.interval_ms)),
                    );
                }
                if check.timeout_ms == 0 || check.timeout_ms > check.interval_ms.max(lo) {
                    self.push(
                        &cloc.field("timeout"),
                        format!(
                            "must be above 0 and at most the interval ({}), found {}",
                            format_ms(check.interval_ms),
                            format_ms(check.timeout_ms)
                        ),
                    );
                }
            }
        }
    }

    /// A service's or check's `port`: empty, a port number, or a port label of the group.
    fn port_ref(&mut self, loc: &Loc, port: &str, labels: &HashSet<&str>) {
        if port.is_empty() {
            return;
        }
        if port.bytes().all(|b| b.is_ascii_digit()) {
            if !matches!(port.parse::<u32>(), Ok(1..=65535)) {
                self.push(loc, format!("must be a port number between 1 and 65535 or a port label, found {port}"));
            }
        } else if !labels.contains(port) {
            let mut known: Vec<&str> = labels.iter().copied().collect();
            known.sort_unstable();
            let known =
                if known.is_empty() { "the group's network has no ports".to_string() } else { format!("known: {}", known.join(", ")) };
            self.push(loc, format!("no port labelled {:?} in the group's network ({known})", printable_key(port)));
        }
    }

    /// The group's `network`: a known mode, ports with identifier labels (they become parts of
    /// environment variable names) that are unique, port numbers in range, no static port twice,
    /// and no task whose own `network.mode` contradicts the group's.
    fn network(&mut self, loc: &Loc, group: &TaskGroup) {
        let Some(network) = &group.network else { return };
        let nloc = loc.field("network");
        let mode = network.mode.as_str();
        if !mode.is_empty() && !GROUP_NETWORK_MODES.contains(&mode) {
            self.push(&nloc.field("mode"), format!("must be one of {}, found {mode:?}", GROUP_NETWORK_MODES.join(", ")));
        }
        self.at_most(&nloc.indexed("port", MAX_PORTS), "ports per group", network.ports.len(), MAX_PORTS);
        if mode == "none" && !network.ports.is_empty() {
            self.push(
                &nloc.named("port", 0, &network.ports[0].label),
                "a group with network mode \"none\" has no ports to map; remove the `port` blocks or use \"bridge\"",
            );
        }
        let mut labels = HashSet::new();
        let mut statics = HashMap::new();
        for (i, port) in network.ports.iter().enumerate().take(MAX_PORTS) {
            let ploc = nloc.named("port", i, &port.label);
            if !is_port_label(&port.label) {
                self.push(
                    &ploc.field("name"),
                    format!(
                        "port label must be 1-64 characters of A-Z, a-z, 0-9 or _ not starting with a digit, found {:?}",
                        printable_key(&port.label)
                    ),
                );
            } else if !labels.insert(port.label.as_str()) {
                self.push(&ploc.field("name"), format!("duplicate port label {:?} in this group", port.label));
            }
            for (field, value) in [("static", port.static_port), ("to", port.to)] {
                if value > 65535 {
                    self.push(&ploc.field(field), format!("must be a port number between 1 and 65535, found {value}"));
                }
            }
            if port.static_port > 0 {
                if let Some(first) = statics.insert(port.static_port, port.label.as_str()) {
                    self.push(
                        &ploc.field("static"),
                        format!("static port {} is already used by port {first:?} of this group", port.static_port),
                    );
                }
            }
            if mode != "bridge" && port.to > 0 && port.to != port.static_port {
                self.push(
                    &ploc.field("to"),
                    "only bridge mode maps ports; in host mode a task listens on its host port itself (MLP_HOST_PORT_<label>), so `to` may only repeat `static`",
                );
            }
        }
        for (i, task) in group.tasks.iter().enumerate().take(MAX_TASKS) {
            let task_mode = task.network_mode.as_str();
            let conflict = match mode {
                "bridge" => !task_mode.is_empty(),
                "none" => task_mode == "host",
                _ => false,
            };
            if conflict {
                self.push(
                    &loc.named("task", i, &task.name).field("network").field("mode"),
                    format!("the group's network mode is {mode:?}; a task of it cannot ask for {task_mode:?} (remove the task's `network` block)"),
                );
            }
        }
    }

    /// `migrate.max_parallel` at least 1; `reschedule` with a known delay function and sane
    /// numbers.
    fn migrate_reschedule(&mut self, loc: &Loc, group: &TaskGroup) {
        if let Some(m) = &group.migrate {
            if m.max_parallel == 0 || m.max_parallel > MAX_COUNT {
                self.push(
                    &loc.field("migrate").field("max_parallel"),
                    format!("must be between 1 and {MAX_COUNT}, found {}", m.max_parallel),
                );
            }
        }
        if let Some(r) = &group.reschedule {
            let rloc = loc.field("reschedule");
            self.one_of(&rloc.field("delay_function"), "delay function", &r.delay_function, DELAY_FUNCTIONS);
            if !r.unlimited && r.attempts > 0 && r.interval_ms == 0 {
                self.push(&rloc.field("interval"), "a bounded number of attempts needs an interval above 0");
            }
            if r.max_delay_ms > 0 && r.max_delay_ms < r.delay_ms {
                self.push(
                    &rloc.field("max_delay"),
                    format!("must be at least delay ({}), found {}", format_ms(r.delay_ms), format_ms(r.max_delay_ms)),
                );
            }
        }
    }

    /// Gang fields: `gang` needs members, `min_count` at most `count`, a topology needs a gang,
    /// and the timeout is bounded.
    fn gang(&mut self, loc: &Loc, group: &TaskGroup) {
        let is_gang = group.gang || group.min_count > 0;
        if group.gang && group.effective_count() == 0 {
            self.push(&loc.field("gang"), "a gang needs members; count must be at least 1, found 0");
        }
        if group.min_count > group.effective_count() {
            self.push(&loc.field("min_count"), format!("must be at most count ({}), found {}", group.effective_count(), group.min_count));
        }
        if !is_gang && !group.gang_topology.is_empty() {
            self.push(&loc.field("gang_topology"), "only a gang can ask for a shared topology; set `gang = true` or `min_count`");
        }
        if !is_gang && group.gang_timeout_ms > 0 {
            self.push(&loc.field("gang_timeout"), "only a gang waits with a timeout; set `gang = true` or `min_count`");
        }
        if group.gang_timeout_ms > MAX_GANG_TIMEOUT_MS {
            self.push(
                &loc.field("gang_timeout"),
                format!("must be at most {}, found {}", format_ms(MAX_GANG_TIMEOUT_MS), format_ms(group.gang_timeout_ms)),
            );
        }
        let attr = group.gang_topology.trim();
        let interpolated = attr.starts_with("${") && attr.ends_with('}');
        if !(attr.is_empty() || interpolated || is_attribute_name(attr)) {
            self.push(
                &loc.field("gang_topology"),
                format!("must be a node attribute such as \"${{meta.rack}}\" or \"meta.rack\", found {attr:?}"),
            );
        }
    }

    /// `driver = "wasm"`: `config.module` is required, a path in the task dir (`local/app.wasm`,
    /// no `..`) or an absolute path on the node; no `command`; the module gets no network and
    /// no GPU.
    fn wasm_config(&mut self, loc: &Loc, task: &Task) {
        let cloc = loc.field("config");
        let Some(config) = &task.config else {
            self.push(&cloc.field("module"), "missing required field");
            return;
        };
        let mloc = cloc.field("module");
        let module = config.module.as_str();
        if module.is_empty() {
            self.push(&mloc, "missing required field");
        } else if module.split('/').any(|part| part == "..") {
            self.push(
                &mloc,
                format!(
                    "must not contain `..`: a path in the task dir (\"local/app.wasm\") or an absolute path on the node, found {module:?}"
                ),
            );
        } else if module.contains('\0') {
            self.push(&mloc, "must not contain a NUL byte");
        }
        self.text(&mloc, "module", module, MAX_VALUE_BYTES);
        if !config.command.is_empty() {
            self.push(&cloc.field("command"), "the wasm driver runs `module`, not `command`");
        }
        self.map(&cloc.field("env"), "env", &config.env);
        if task.network_mode == "host" {
            self.push(&loc.field("network").field("mode"), "the wasm driver gives a module no network; leave `network` out");
        }
        if task.resources.as_ref().is_some_and(|r| r.gpu.is_some()) {
            self.push(&loc.field("resources").field("gpu"), "the wasm driver cannot give a module a GPU");
        }
    }

    /// `driver = "oci"`: `config.image` is required, a valid image reference
    /// ([`check_image_reference`]); `command`, `args`, `entrypoint` and `work_dir` override the
    /// image's; `auth` needs a username; no `module` and no `env` in `config`.
    fn oci_config(&mut self, loc: &Loc, task: &Task) {
        let cloc = loc.field("config");
        let Some(config) = &task.config else {
            self.push(&cloc.field("image"), "missing required field");
            return;
        };
        let iloc = cloc.field("image");
        if config.image.is_empty() {
            self.push(&iloc, "missing required field");
        } else if let Err(why) = check_image_reference(&config.image) {
            self.push(&iloc, why);
        }
        self.at_most(&cloc.field("entrypoint"), "entrypoint", config.entrypoint.len(), MAX_ARGS);
        for (i, arg) in config.entrypoint.iter().enumerate().take(MAX_ARGS) {
            self.text(&cloc.field("entrypoint").item(i), "argument", arg, MAX_VALUE_BYTES);
        }
        let wloc = cloc.field("work_dir");
        let wd = config.work_dir.as_str();
        if !wd.is_empty() && (!wd.starts_with('/') || wd.split('/').any(|p| p == "..") || wd.contains('\0')) {
            self.push(&wloc, format!("must be an absolute path inside the image without `..`, found {wd:?}"));
        }
        self.text(&wloc, "work_dir", wd, MAX_VALUE_BYTES);
        if let Some(auth) = &config.auth {
            let aloc = cloc.field("auth");
            if auth.username.is_empty() {
                self.push(&aloc.field("username"), "missing required field");
            }
            if auth.username.contains(':') {
                self.push(&aloc.field("username"), "must not contain `:`");
            }
            // The value is never echoed: it is a secret.
            if auth.password.len() > MAX_VALUE_BYTES || auth.username.len() > MAX_KEY_BYTES {
                self.push(&aloc, format!("username at most {MAX_KEY_BYTES} bytes and password at most {MAX_VALUE_BYTES} bytes"));
            }
        }
        if !config.module.is_empty() {
            self.push(&cloc.field("module"), "only the wasm driver runs a module; the oci driver runs `image`");
        }
        if !config.env.is_empty() {
            self.push(&cloc.field("env"), "only the wasm driver takes `env` in `config`; use the task's `env`");
        }
    }

    fn task(&mut self, loc: &Loc, task: &Task) {
        self.name(loc, "task", &task.name);
        self.one_of(&loc.field("driver"), "driver", &task.driver, DRIVERS);
        let command = task.config.as_ref().map_or("", |c| c.command.as_str());
        let cloc = loc.field("config");
        if task.driver != driver::OCI {
            if let Some(config) = &task.config {
                for (field, set) in [
                    ("image", !config.image.is_empty()),
                    ("entrypoint", !config.entrypoint.is_empty()),
                    ("work_dir", !config.work_dir.is_empty()),
                    ("auth", config.auth.is_some()),
                ] {
                    if set {
                        self.push(&cloc.field(field), format!("only the oci driver takes `{field}`; driver {:?} does not", task.driver));
                    }
                }
            }
        }
        if task.driver == driver::WASM {
            self.wasm_config(loc, task);
        } else if task.driver == driver::OCI {
            self.oci_config(loc, task);
        } else {
            if command.is_empty() {
                self.push(&cloc.field("command"), "missing required field");
            }
            if let Some(config) = &task.config {
                if !config.module.is_empty() {
                    self.push(
                        &cloc.field("module"),
                        format!("only the wasm driver runs a module; driver {:?} runs `command`", task.driver),
                    );
                }
                if !config.env.is_empty() {
                    self.push(&cloc.field("env"), "only the wasm driver takes `env` in `config`; use the task's `env`");
                }
            }
        }
        self.text(&cloc.field("command"), "command", command, MAX_VALUE_BYTES);
        if let Some(config) = &task.config {
            self.at_most(&cloc.field("args"), "args", config.args.len(), MAX_ARGS);
            for (i, arg) in config.args.iter().enumerate().take(MAX_ARGS) {
                self.text(&cloc.field("args").item(i), "argument", arg, MAX_VALUE_BYTES);
            }
        }
        self.map(&loc.field("env"), "env", &task.env);
        self.map(&loc.field("meta"), "meta", &task.meta);
        self.text(&loc.field("user"), "user", &task.user, MAX_KEY_BYTES);
        self.at_most(&loc.field("artifact"), "artifact blocks", task.artifacts.len(), MAX_ARTIFACTS);
        for (i, a) in task.artifacts.iter().enumerate().take(MAX_ARTIFACTS) {
            let aloc = loc.indexed("artifact", i);
            if let Err(e) = crate::jobspec::artifact::check(a) {
                self.push(&aloc.field(e.field), e.message);
            }
        }
        if let Some(res) = &task.resources {
            let rloc = loc.field("resources");
            if res.cpu_mhz < 1 {
                self.push(&rloc.field("cpu"), "must be at least 1 (MHz), found 0");
            }
            if res.memory_mib < 1 {
                self.push(&rloc.field("memory"), "must be at least 1 (MiB), found 0");
            }
            if res.memory_max_mib > 0 && res.memory_max_mib < res.memory_mib {
                self.push(
                    &rloc.field("memory_max"),
                    format!("must be at least memory ({} MiB), found {}", res.memory_mib, res.memory_max_mib),
                );
            }
            // JSON submissions bypass the HCL decoder's checks on `share`.
            if let Some(gpu) = &res.gpu {
                let gloc = rloc.field("gpu");
                self.at_most(&gloc.field("model"), "GPU models", gpu.models.len(), MAX_GPU_MODELS);
                for m in gpu.models.iter().take(MAX_GPU_MODELS) {
                    self.text(&gloc.field("model"), "GPU model", m, MAX_KEY_BYTES);
                }
                if gpu.share_milli > 999 {
                    self.push(
                        &gloc.field("share"),
                        format!("share_milli must be between 1 and 999 (a fraction of one GPU), found {}", gpu.share_milli),
                    );
                } else if gpu.share_milli > 0 && gpu.effective_count() != 1 {
                    self.push(
                        &gloc.field("count"),
                        format!("a shared GPU (`share`) is one GPU; count must be 1, found {}", gpu.effective_count()),
                    );
                }
                if !gpu.mig_profile.is_empty() {
                    if !is_mig_profile(&gpu.mig_profile) {
                        self.push(
                            &gloc.field("mig"),
                            format!(
                                "must be a MIG profile such as \"1g.10gb\", \"3g.40gb\" or \"1g.10gb+me\", found {:?}",
                                gpu.mig_profile
                            ),
                        );
                    }
                    if gpu.share_milli > 0 {
                        self.push(&gloc.field("share"), "a MIG instance is not shared; use `mig` or `share`, not both");
                    }
                }
            }
        }
        if !task.network_mode.is_empty() && !NETWORK_MODES.contains(&task.network_mode.as_str()) {
            self.push(
                &loc.field("network").field("mode"),
                format!("must be one of {}, found {:?}", NETWORK_MODES.join(", "), task.network_mode),
            );
        }
        self.affinities(loc, &task.affinities);
        if task.kill_timeout_ms > MAX_KILL_TIMEOUT_MS {
            self.push(
                &loc.field("kill_timeout"),
                format!("must be at most {}, found {}", format_ms(MAX_KILL_TIMEOUT_MS), format_ms(task.kill_timeout_ms)),
            );
        }
    }
}

/// `reschedule.delay_function` values.
pub(crate) const DELAY_FUNCTIONS: &[&str] = &["constant", "exponential", "fibonacci"];

/// Longest a gang may wait for capacity before it is reported unplaceable.
pub(crate) const MAX_GANG_TIMEOUT_MS: u64 = 7 * 24 * 3_600_000;

/// `attr.x`, `node.x` or `meta.x` written without `${}`.
fn is_attribute_name(s: &str) -> bool {
    ["attr.", "node.", "meta."]
        .iter()
        .any(|p| s.strip_prefix(p).is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_alphanumeric() || "_.-".contains(c))))
}

/// A map key as a path segment: as it is when it is short and printable, else cut.
fn printable_key(k: &str) -> String {
    if k.len() <= 64 && k.chars().all(|c| !c.is_control()) {
        k.to_string()
    } else {
        let cut: String = k.chars().filter(|c| !c.is_control()).take(32).collect();
        format!("{cut}…")
    }
}

/// Network modes a task may ask for (`host` is the default).
const NETWORK_MODES: &[&str] = &["host", "none"];
/// Network modes of a group's `network` block (`host` is the default).
const GROUP_NETWORK_MODES: &[&str] = &["bridge", "host", "none"];

/// A port label: it becomes part of `MLP_PORT_<label>` and friends, so an identifier.
fn is_port_label(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') && !s.as_bytes()[0].is_ascii_digit()
}

/// Volume types a group's `volume` may have.
pub(crate) const VOLUME_TYPES: &[&str] = &["host"];

/// Paths of a task's root that a volume may not be mounted at or below: the root itself, the
/// task's own directories and the kernel's filesystems.
const RESERVED_DESTINATIONS: &[&str] = &["/local", "/alloc", "/secrets", "/proc", "/dev", "/sys"];

/// A host volume's name as an agent's `host_volume` block takes it: `[A-Za-z0-9_.-]{1,128}`.
pub fn is_host_volume_name(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// A `volume_mount.destination`: absolute, no `..` (nor `.`) component, not `/`, not at or
/// below one of [`RESERVED_DESTINATIONS`].
pub fn check_mount_destination(destination: &str) -> Result<(), String> {
    use std::path::{Component, Path};
    if destination.is_empty() {
        return Err("missing required field: an absolute path inside the task, such as \"/data\"".into());
    }
    let path = Path::new(destination);
    if !path.is_absolute() {
        return Err(format!("{destination:?} must be an absolute path inside the task, such as \"/data\""));
    }
    if destination.split('/').any(|part| part == ".." || part == ".") {
        return Err(format!("{destination:?} may not contain `..` or `.` components"));
    }
    if !path.components().any(|c| matches!(c, Component::Normal(_))) {
        return Err("a volume cannot be mounted over the task's root `/`".into());
    }
    if let Some(reserved) = RESERVED_DESTINATIONS.iter().find(|r| path.starts_with(r)) {
        return Err(format!("{destination:?} is at or under {reserved}, which the task's root reserves; pick another path"));
    }
    Ok(())
}

/// `[A-Za-z0-9_-]{1,128}`.
pub(crate) fn is_name(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A DNS label as service names use it: `[a-z0-9-]{1,63}`, no `-` first or last.
pub fn is_dns_label(s: &str) -> bool {
    is_namespace(s) && !s.starts_with('-') && !s.ends_with('-')
}

/// `[a-z0-9-]{1,63}`, the shape of a DNS label.
fn is_namespace(s: &str) -> bool {
    (1..=63).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A MIG profile name: `<slices>g.<memory>gb`, optionally with a `+me`/`+gfx` style suffix
/// (as NVML names them: 1g.5gb, 1g.10gb+me, 3g.40gb, 7g.80gb).
pub fn is_mig_profile(s: &str) -> bool {
    let (base, suffix) = match s.split_once('+') {
        Some((b, x)) => (b, Some(x)),
        None => (s, None),
    };
    if suffix.is_some_and(|x| x.is_empty() || !x.bytes().all(|c| c.is_ascii_lowercase())) {
        return false;
    }
    let Some((slices, mem)) = base.split_once("g.") else { return false };
    let Some(mem) = mem.strip_suffix("gb") else { return false };
    let number = |t: &str| !t.is_empty() && t.len() <= 4 && t.bytes().all(|c| c.is_ascii_digit()) && !t.starts_with('0');
    number(slices) && number(mem)
}

/// Checks an image reference: `[registry[:port]/]repository[:tag][@sha256:<64 hex>]`, where the
/// repository is lowercase path components (`a-z 0-9 . _ -`), the tag up to 128 characters of
/// `A-Z a-z 0-9 _ . -` (not starting with `.` or `-`). Returns why not.
pub fn check_image_reference(image: &str) -> Result<(), String> {
    const MAX_LEN: usize = 512;
    if image.len() > MAX_LEN {
        return Err(format!("must be at most {MAX_LEN} bytes, found {}", image.len()));
    }
    let bad = |why: &str| Err(format!("invalid image reference {image:?}: {why}"));
    let (name_tag, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    if let Some(d) = digest {
        let Some(hex) = d.strip_prefix("sha256:") else {
            return bad("the digest must be sha256:<64 hex digits>");
        };
        if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)) {
            return bad("the digest must be sha256:<64 lowercase hex digits>");
        }
    }
    // A tag follows the last ':' after the last '/'.
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (&name_tag[..last_slash + i], Some(&name_tag[last_slash + i + 1..])),
        None => (name_tag, None),
    };
    if let Some(tag) = tag {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
        if tag.is_empty() || tag.len() > 128 || !tag.chars().all(ok_char) || tag.starts_with(['.', '-']) {
            return bad("a tag is 1 to 128 of A-Z a-z 0-9 _ . - (not starting with . or -)");
        }
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    // The first part is a registry when it has a '.', a ':' or is "localhost".
    if parts.len() > 1 && (parts[0].contains(['.', ':']) || parts[0] == "localhost") {
        let registry = parts.remove(0);
        let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']');
        if registry.is_empty() || !registry.chars().all(ok) {
            return bad("the registry must be a host name or address with an optional :port");
        }
    }
    if parts.is_empty() || parts.iter().any(|p| p.is_empty()) {
        return bad("empty repository path component");
    }
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-');
    for p in &parts {
        if !p.chars().all(ok) || p.starts_with(['.', '_', '-']) || p.ends_with(['.', '_', '-']) {
            return bad("repository path components are lowercase letters, digits and . _ - separators");
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod fast_check_tests {
    use super::*;
    use crate::v1::{Task, TaskConfig, TaskGroup};

    fn job() -> Job {
        let mut job = Job { id: "j".into(), name: "j".into(), r#type: "batch".into(), priority: 50, ..Default::default() };
        let task = Task {
            name: "t".into(),
            driver: "exec".into(),
            config: Some(TaskConfig { command: "/bin/true".into(), args: vec!["a".into()], ..Default::default() }),
            env: [("A".to_string(), "1".to_string())].into(),
            ..Default::default()
        };
        job.groups.push(TaskGroup { name: "g".into(), count: Some(1), tasks: vec![task], ..Default::default() });
        crate::jobspec::apply_defaults(&mut job);
        job
    }

    /// The check without locations finds a problem exactly when the full check does, deep in
    /// the tree included (what `validate_job` relies on to skip building paths).
    #[test]
    fn the_check_without_locations_agrees_with_the_full_check() {
        let valid = job();
        assert!(check_job(&valid).is_empty(), "{:?}", check_job(&valid));
        assert!(is_valid(&valid));
        type Breaker = Box<dyn Fn(&mut Job)>;
        let breakers: Vec<(&str, Breaker)> = vec![
            ("no groups", Box::new(|j| j.groups.clear())),
            ("bad driver", Box::new(|j| j.groups[0].tasks[0].driver = "nope".into())),
            ("empty task name", Box::new(|j| j.groups[0].tasks[0].name.clear())),
            (
                "env key with =",
                Box::new(|j| {
                    j.groups[0].tasks[0].env.insert("A=B".into(), "x".into());
                }),
            ),
            (
                "empty argument list item too long",
                Box::new(|j| j.groups[0].tasks[0].config.as_mut().unwrap().args.push("x".repeat(MAX_VALUE_BYTES + 1))),
            ),
            ("priority", Box::new(|j| j.priority = 10_000)),
            (
                "duplicate group",
                Box::new(|j| {
                    let g = j.groups[0].clone();
                    j.groups.push(g)
                }),
            ),
        ];
        for (what, breaker) in breakers {
            let mut j = valid.clone();
            breaker(&mut j);
            let issues = check_job(&j);
            assert!(!issues.is_empty(), "{what}: the full check finds nothing");
            assert!(issues.iter().all(|i| !i.path.is_empty()), "{what}: the full check names where: {issues:?}");
            assert!(!is_valid(&j), "{what}: the check without locations missed it");
            assert!(crate::jobspec::validate_job(&j).is_err(), "{what}");
        }
    }
}

#[cfg(test)]
mod mig_tests {
    use super::is_mig_profile;

    #[test]
    fn mig_profile_names() {
        for ok in ["1g.5gb", "1g.10gb", "1g.10gb+me", "2g.20gb", "3g.40gb", "7g.80gb", "1g.18gb+gfx"] {
            assert!(is_mig_profile(ok), "{ok}");
        }
        for bad in ["", "1g", "g.10gb", "1g.10", "1g.10GB", "01g.5gb", "1g.5gb+", "1g.5gb+ME", "a100", "1c.3g.40gb"] {
            assert!(!is_mig_profile(bad), "{bad}");
        }
    }
}
