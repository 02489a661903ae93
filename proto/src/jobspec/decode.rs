//! Maps the `hcl-edit` syntax tree onto a `v1::Job`: checks the shape (known fields, blocks vs
//! attributes, labels, value types), fills Nomad's defaults, and remembers where each field was
//! written so that the validator's findings can be reported at a position.

use std::collections::{BTreeMap, HashMap, HashSet};

use hcl_edit::expr::{Expression, ObjectKey};
use hcl_edit::structure::{Block, Body, Structure};
use hcl_edit::template::{Element, Template};
use hcl_edit::Span;

use super::{line_col, parse_duration, Loc};
use crate::consts::{health_check, job_type, restart_mode};
use crate::v1::{
    Affinity, Artifact, Constraint, GpuRequest, GroupNetwork, Job, MigrateStrategy, ParameterizedConfig, PeriodicConfig, PortSpec,
    RegistryAuth, ReschedulePolicy, Resources, RestartPolicy, ServiceCheck, ServiceSpec, Spread, SpreadTarget, Task, TaskConfig, TaskGroup,
    UpdateStrategy, VolumeMount, VolumeRequest,
};

pub(crate) const DEFAULT_NAMESPACE: &str = "default";
pub(crate) const DEFAULT_PRIORITY: i32 = 50;
pub(crate) const DEFAULT_COUNT: u32 = 1;
pub(crate) const DEFAULT_CPU_MHZ: u64 = 100;
pub(crate) const DEFAULT_MEMORY_MIB: u64 = 300;
pub(crate) const DEFAULT_KILL_TIMEOUT_MS: u64 = 5_000;
pub(crate) const DEFAULT_GPU_COUNT: u32 = 1;
/// Nomad's default weights for `affinity` and `spread`.
pub(crate) const DEFAULT_AFFINITY_WEIGHT: i32 = 50;
pub(crate) const DEFAULT_SPREAD_WEIGHT: u32 = 50;

const JOB_FIELDS: &[&str] =
    &["type", "priority", "namespace", "meta", "constraint", "affinity", "spread", "group", "parameterized", "periodic", "update"];
const PARAMETERIZED_FIELDS: &[&str] = &["payload", "meta_required", "meta_optional"];
const PERIODIC_FIELDS: &[&str] = &["crons", "cron", "prohibit_overlap", "time_zone"];
const GROUP_FIELDS: &[&str] = &[
    "count",
    "constraint",
    "affinity",
    "spread",
    "meta",
    "restart",
    "task",
    "gang",
    "min_count",
    "gang_topology",
    "gang_timeout",
    "migrate",
    "reschedule",
    "network",
    "service",
    "update",
    "shutdown_delay",
    "volume",
];
const TASK_FIELDS: &[&str] = &[
    "driver",
    "config",
    "env",
    "resources",
    "kill_timeout",
    "max_run_duration",
    "meta",
    "user",
    "network",
    "affinity",
    "service",
    "artifact",
    "volume_mount",
];
const VOLUME_FIELDS: &[&str] = &["type", "source", "read_only"];
const VOLUME_MOUNT_FIELDS: &[&str] = &["volume", "destination", "read_only"];
const SERVICE_FIELDS: &[&str] = &["name", "port", "tags", "check"];
const CHECK_FIELDS: &[&str] = &["type", "path", "command", "args", "interval", "timeout", "name", "port"];
const ARTIFACT_FIELDS: &[&str] = &["source", "destination", "mode", "options"];
const ARTIFACT_OPTIONS_FIELDS: &[&str] = &["checksum"];
const NETWORK_FIELDS: &[&str] = &["mode"];
const GROUP_NETWORK_FIELDS: &[&str] = &["mode", "port"];
const PORT_FIELDS: &[&str] = &["static", "to"];
const CONFIG_FIELDS: &[&str] = &["command", "args", "module", "env", "image", "entrypoint", "work_dir", "auth"];
const AUTH_FIELDS: &[&str] = &["username", "password"];
const RESOURCES_FIELDS: &[&str] = &["cpu", "cores", "memory", "disk", "gpu", "memory_max", "pids", "cpu_hard_limit"];
const GPU_FIELDS: &[&str] = &["count", "model", "memory", "share", "mig"];
const RESTART_FIELDS: &[&str] = &["attempts", "interval", "delay", "mode"];
const MIGRATE_FIELDS: &[&str] = &["max_parallel"];
const UPDATE_FIELDS: &[&str] = &[
    "max_parallel",
    "health_check",
    "min_healthy_time",
    "healthy_deadline",
    "progress_deadline",
    "auto_revert",
    "canary",
    "auto_promote",
    "stagger",
];
const RESCHEDULE_FIELDS: &[&str] = &["attempts", "interval", "delay", "delay_function", "max_delay", "unlimited"];
const CONSTRAINT_FIELDS: &[&str] = &["attribute", "operator", "value"];
const AFFINITY_FIELDS: &[&str] = &["attribute", "operator", "value", "weight"];
const SPREAD_FIELDS: &[&str] = &["attribute", "weight", "target"];
const TARGET_FIELDS: &[&str] = &["percent"];

/// A problem found while decoding (or later, while validating), before it gets a line number.
#[derive(Debug)]
pub(crate) struct Problem {
    pub offset: usize,
    pub path: String,
    pub message: String,
}

/// What the decoder made of a file.
pub(crate) struct Decoded {
    /// `None` only when there is no `job` block at all.
    pub job: Option<Job>,
    pub problems: Vec<Problem>,
    /// Keys of fields that failed to decode (they hold defaults, not what the user wrote).
    pub failed: HashSet<String>,
    /// Where each key was written (byte offset).
    spans: HashMap<String, usize>,
}

impl Decoded {
    /// Position of `key`, or of the nearest enclosing field written in the file (a missing
    /// field is reported at the block that should have contained it).
    pub fn position_of(&self, key: &str) -> usize {
        let mut key = key;
        loop {
            if let Some(&offset) = self.spans.get(key) {
                return offset;
            }
            match key.rfind('.') {
                Some(dot) => key = &key[..dot],
                None => return 0,
            }
        }
    }
}

/// Decodes a whole file body, which must hold exactly one `job` block.
pub(crate) fn decode(src: &str, body: &Body) -> Decoded {
    let mut d = Decoder { src, problems: Vec::new(), failed: HashSet::new(), spans: HashMap::new() };
    let mut job = None;
    let mut first_job_at = 0;
    for structure in body.iter() {
        match structure {
            Structure::Block(block) if block.ident.as_str() == "job" => {
                if job.is_none() {
                    first_job_at = start(block);
                    job = Some(d.job(block));
                } else {
                    let (line, _) = line_col(src, first_job_at);
                    d.problem(start(block), "", format!("only one job block is allowed per file (the first is at line {line})"));
                }
            }
            other => {
                let name = structure_name(other);
                d.problem(
                    start(other),
                    "",
                    format!("unknown field {name:?} at the top level; a job file holds a single `job \"NAME\" {{ ... }}` block"),
                );
            }
        }
    }
    if job.is_none() {
        d.problem(0, "", "no job block found; expected `job \"NAME\" { ... }`".to_string());
    }
    Decoded { job, problems: d.problems, failed: d.failed, spans: d.spans }
}

struct Decoder<'s> {
    src: &'s str,
    problems: Vec<Problem>,
    failed: HashSet<String>,
    spans: HashMap<String, usize>,
}

/// Byte offset where a parsed node starts (0 for nodes the parser did not produce).
fn start(node: &impl Span) -> usize {
    node.span().map_or(0, |r| r.start)
}

fn structure_name(s: &Structure) -> &str {
    match s {
        Structure::Attribute(attr) => attr.key.as_str(),
        Structure::Block(block) => block.ident.as_str(),
    }
}

fn structure_start(s: &Structure) -> usize {
    match s {
        Structure::Attribute(attr) => start(&attr.key),
        Structure::Block(block) => start(&block.ident),
    }
}

impl Decoder<'_> {
    fn problem(&mut self, offset: usize, path: &str, message: String) {
        self.problems.push(Problem { offset, path: path.to_string(), message });
    }

    /// Reports a problem with the field at `loc`, which then keeps its default value.
    fn fail(&mut self, offset: usize, loc: &Loc, message: String) {
        self.failed.insert(loc.key.clone());
        self.problem(offset, &loc.path, message);
    }

    fn mark(&mut self, loc: &Loc, offset: usize) {
        self.spans.insert(loc.key.clone(), offset);
    }

    /// The source text of a node, shortened for messages.
    fn snippet(&self, node: &impl Span) -> String {
        let text = node.span().and_then(|r| self.src.get(r)).unwrap_or("").trim();
        let mut short: String = text.chars().take(40).collect();
        if short.len() < text.len() {
            short.push('…');
        }
        short
    }

    /// Describes a value for "expected X, found Y" messages.
    fn describe(&self, expr: &Expression) -> String {
        match expr {
            Expression::Null(_) => "null".to_string(),
            Expression::Bool(b) => format!("bool {}", b.value()),
            Expression::Number(n) => format!("number {}", n.value()),
            Expression::String(s) => format!("string {:?}", s.value()),
            Expression::Array(_) => "a list".to_string(),
            Expression::Object(_) => "an object".to_string(),
            Expression::StringTemplate(_) | Expression::HeredocTemplate(_) => {
                format!("template {}", self.snippet(expr))
            }
            _ => format!("expression `{}`", self.snippet(expr)),
        }
    }

    /// The message for a value of the wrong type; names non-literal expressions explicitly.
    fn type_error(&mut self, expr: &Expression, loc: &Loc, expected: &str) {
        let message = if is_literal(expr) {
            format!("expected {expected}, found {}", self.describe(expr))
        } else {
            format!("expressions are not supported; expected {expected} literal, found `{}`", self.snippet(expr))
        };
        self.fail(start(expr), loc, message);
    }

    // ---- bodies ------------------------------------------------------------------------------

    /// Reports a field that is not in `known`, suggesting the closest known name.
    fn unknown(&mut self, s: &Structure, loc: &Loc, known: &[&str]) {
        let name = structure_name(s);
        let mut message = format!("unknown field {name:?}");
        if let Some(best) = suggest(name, known) {
            message.push_str(&format!("; did you mean {best:?}?"));
        }
        self.problem(structure_start(s), &loc.path, message);
    }

    /// Reports a field written in the wrong form (`driver { }` or `task = ...`).
    fn wrong_form(&mut self, s: &Structure, loc: &Loc) {
        let name = structure_name(s);
        let message = match s {
            Structure::Attribute(_) => format!("{name:?} must be a block: `{name} {{ ... }}`"),
            Structure::Block(_) => format!("{name:?} must be an attribute: `{name} = ...`"),
        };
        self.fail(structure_start(s), &loc.field(name), message);
    }

    /// Whether a non-repeatable field appears for the first time; reports repeats.
    fn first_time<'a>(&mut self, seen: &mut HashMap<&'a str, usize>, s: &'a Structure, loc: &Loc) -> bool {
        let name = structure_name(s);
        let at = structure_start(s);
        if let Some(&first) = seen.get(name) {
            let (line, _) = line_col(self.src, first);
            self.fail(at, &loc.field(name), format!("duplicate field {name:?} (first set at line {line})"));
            return false;
        }
        seen.insert(name, at);
        true
    }

    /// The single name label of a `job`, `group` or `task` block.
    fn label(&mut self, block: &Block, loc: &Loc) -> String {
        let kind = block.ident.as_str();
        let name_loc = loc.name_label();
        match block.labels.as_slice() {
            [] => {
                self.fail(start(&block.ident), &name_loc, format!("missing {kind} name; write `{kind} \"NAME\" {{ ... }}`"));
                String::new()
            }
            [label, rest @ ..] => {
                self.mark(&name_loc, start(label));
                if let Some(extra) = rest.first() {
                    self.problem(start(extra), &loc.path, format!("a {kind} block takes one label, found {}", block.labels.len()));
                }
                label.as_str().to_string()
            }
        }
    }

    fn no_labels(&mut self, block: &Block, loc: &Loc) {
        if let Some(label) = block.labels.first() {
            self.problem(start(label), &loc.path, format!("a {} block takes no labels", block.ident.as_str()));
        }
    }

    // ---- values ------------------------------------------------------------------------------

    fn string(&mut self, expr: &Expression, loc: &Loc) -> Option<String> {
        self.mark(loc, start(expr));
        let template = match expr {
            Expression::String(s) => return Some(s.value().clone()),
            Expression::StringTemplate(t) => &**t,
            Expression::HeredocTemplate(h) => &h.template,
            _ => {
                self.type_error(expr, loc, "a string");
                return None;
            }
        };
        match literal_text(template) {
            Some(text) => Some(text),
            None => {
                self.fail(
                    start(expr),
                    loc,
                    format!("interpolation is not supported here (found {}); write `$${{` for a literal `${{`", self.snippet(expr)),
                );
                None
            }
        }
    }

    /// A string that may reference node data (`"${attr.kernel.name}"`); such templates are kept
    /// as written, for the scheduler to resolve per node.
    fn constraint_string(&mut self, expr: &Expression, loc: &Loc) -> Option<String> {
        let Expression::StringTemplate(template) = expr else {
            return self.string(expr, loc);
        };
        self.mark(loc, start(expr));
        if let Some(text) = literal_text(template) {
            return Some(text);
        }
        for element in template.iter() {
            let ok = match element {
                Element::Literal(_) => true,
                Element::Interpolation(i) => {
                    let inner = self.snippet(&i.expr);
                    ["attr.", "node.", "meta."].iter().any(|p| {
                        inner
                            .strip_prefix(p)
                            .is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_alphanumeric() || "_.-".contains(c)))
                    })
                }
                Element::Directive(_) => false,
            };
            if !ok {
                self.fail(
                    start(element),
                    loc,
                    format!(
                        "unsupported interpolation {}; only ${{attr.*}}, ${{node.*}} and ${{meta.*}} may be referenced",
                        self.snippet(element)
                    ),
                );
                return None;
            }
        }
        let quoted = expr.span().and_then(|r| self.src.get(r)).unwrap_or("\"\"");
        Some(quoted.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(quoted).to_string())
    }

    /// Strings, numbers and bools, as a string (env values, meta, args).
    fn scalar(&mut self, expr: &Expression, loc: &Loc) -> Option<String> {
        match expr {
            Expression::Number(n) => {
                self.mark(loc, start(expr));
                Some(n.value().to_string())
            }
            Expression::Bool(b) => {
                self.mark(loc, start(expr));
                Some(b.value().to_string())
            }
            Expression::String(_) | Expression::StringTemplate(_) | Expression::HeredocTemplate(_) => self.string(expr, loc),
            _ => {
                self.mark(loc, start(expr));
                self.type_error(expr, loc, "a string, number or bool");
                None
            }
        }
    }

    fn integer(&mut self, expr: &Expression, loc: &Loc) -> Option<i64> {
        self.mark(loc, start(expr));
        let Expression::Number(n) = expr else {
            self.type_error(expr, loc, "a number");
            return None;
        };
        let n = n.value();
        if let Some(i) = n.as_i64() {
            return Some(i);
        }
        let message = if n.as_u64().is_some() { format!("number {n} is too large") } else { format!("expected a whole number, found {n}") };
        self.fail(start(expr), loc, message);
        None
    }

    /// `true` or `false`.
    fn bool(&mut self, expr: &Expression, loc: &Loc) -> Option<bool> {
        self.mark(loc, start(expr));
        match expr {
            Expression::Bool(b) => Some(*b.value()),
            _ => {
                self.type_error(expr, loc, "a boolean (true or false)");
                None
            }
        }
    }

    /// A non-negative integer that fits `T`.
    fn unsigned<T: TryFrom<i64>>(&mut self, expr: &Expression, loc: &Loc) -> Option<T> {
        let value = self.integer(expr, loc)?;
        if value < 0 {
            self.fail(start(expr), loc, format!("must not be negative, found {value}"));
            return None;
        }
        match T::try_from(value) {
            Ok(v) => Some(v),
            Err(_) => {
                self.fail(start(expr), loc, format!("number {value} is too large"));
                None
            }
        }
    }

    /// A duration string, in milliseconds.
    fn duration(&mut self, expr: &Expression, loc: &Loc) -> Option<u64> {
        if !matches!(expr, Expression::String(_) | Expression::StringTemplate(_)) {
            self.mark(loc, start(expr));
            self.type_error(expr, loc, "a duration string such as \"30s\"");
            return None;
        }
        let text = self.string(expr, loc)?;
        match parse_duration(&text) {
            Ok(d) => Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            Err(message) => {
                self.fail(start(expr), loc, message);
                None
            }
        }
    }

    fn string_list(&mut self, expr: &Expression, loc: &Loc) -> Vec<String> {
        self.mark(loc, start(expr));
        let Expression::Array(items) = expr else {
            self.type_error(expr, loc, "a list of strings");
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let item_loc = loc.item(i);
            if let Some(s) = self.scalar(item, &item_loc) {
                out.push(s);
            }
        }
        out
    }

    /// `meta`/`env`: either `name { k = v }` or `name = { k = v }`.
    fn string_map(&mut self, s: &Structure, loc: &Loc) -> BTreeMap<String, String> {
        self.mark(loc, structure_start(s));
        let mut out = BTreeMap::new();
        match s {
            Structure::Block(block) => {
                self.no_labels(block, loc);
                for entry in block.body.iter() {
                    let key = structure_name(entry);
                    match entry {
                        Structure::Attribute(attr) => {
                            if let Some(v) = self.scalar(&attr.value, &loc.field(key)) {
                                out.insert(key.to_string(), v);
                            }
                        }
                        Structure::Block(b) => {
                            self.fail(start(&b.ident), &loc.field(key), format!("{key:?} must be an attribute: `{key} = \"...\"`"))
                        }
                    }
                }
            }
            Structure::Attribute(attr) => {
                let Expression::Object(object) = &attr.value else {
                    self.type_error(&attr.value, loc, "an object of strings");
                    return out;
                };
                for (key, value) in object.iter() {
                    let name = match key {
                        ObjectKey::Ident(ident) => Some(ident.as_str().to_string()),
                        ObjectKey::Expression(Expression::String(s)) => Some(s.value().clone()),
                        ObjectKey::Expression(e) => {
                            self.type_error(e, loc, "a key name");
                            None
                        }
                    };
                    if let Some(name) = name {
                        if let Some(v) = self.scalar(value.expr(), &loc.field(&name)) {
                            if out.insert(name.clone(), v).is_some() {
                                self.fail(start(key), &loc.field(&name), format!("duplicate key {name:?}"));
                            }
                        }
                    }
                }
            }
        }
        out
    }

    // ---- the job tree ------------------------------------------------------------------------

    fn job(&mut self, block: &Block) -> Job {
        let placeholder = Loc::job("");
        let name = self.label(block, &placeholder);
        let loc = Loc::job(&name);
        self.mark(&loc, start(&block.ident));
        // Restart defaults depend on the type, which may be written after the groups.
        let batch = block.body.get_attribute("type").and_then(|a| a.value.as_str()).is_some_and(job_type::is_batch);
        let mut job = Job {
            id: name.clone(),
            name,
            namespace: DEFAULT_NAMESPACE.to_string(),
            r#type: job_type::SERVICE.to_string(),
            priority: DEFAULT_PRIORITY,
            ..Job::default()
        };
        let mut seen = HashMap::new();
        for s in block.body.iter() {
            let name = structure_name(s);
            let floc = loc.field(name);
            match (name, s) {
                ("constraint", Structure::Block(b)) => {
                    let cloc = loc.indexed("constraint", job.constraints.len());
                    job.constraints.push(self.constraint(b, &cloc));
                }
                ("affinity", Structure::Block(b)) => {
                    let aloc = loc.indexed("affinity", job.affinities.len());
                    job.affinities.push(self.affinity(b, &aloc));
                }
                ("spread", Structure::Block(b)) => {
                    let sloc = loc.indexed("spread", job.spreads.len());
                    job.spreads.push(self.spread(b, &sloc));
                }
                ("group", Structure::Block(b)) => {
                    let index = job.groups.len();
                    job.groups.push(self.group(b, &loc, index, batch));
                }
                ("update", Structure::Block(b)) => {
                    if self.first_time(&mut seen, s, &loc) {
                        job.update = Some(self.update(b, &floc));
                    }
                }
                ("meta", _) => {
                    if self.first_time(&mut seen, s, &loc) {
                        job.meta = self.string_map(s, &floc);
                    }
                }
                ("parameterized", Structure::Block(b)) => {
                    if self.first_time(&mut seen, s, &loc) {
                        job.parameterized = Some(self.parameterized(b, &floc));
                    }
                }
                ("periodic", Structure::Block(b)) => {
                    if self.first_time(&mut seen, s, &loc) {
                        job.periodic = Some(self.periodic(b, &floc));
                    }
                }
                (_, Structure::Attribute(attr)) if JOB_FIELDS.contains(&name) => {
                    if !self.first_time(&mut seen, s, &loc) {
                        continue;
                    }
                    match name {
                        "type" => {
                            if let Some(v) = self.string(&attr.value, &floc) {
                                job.r#type = v;
                            }
                        }
                        "namespace" => {
                            if let Some(v) = self.string(&attr.value, &floc) {
                                job.namespace = v;
                            }
                        }
                        "priority" => {
                            if let Some(v) = self.integer(&attr.value, &floc) {
                                // Out-of-i32 values still fail the validator's range check.
                                job.priority = i32::try_from(v).unwrap_or(if v < 0 { i32::MIN } else { i32::MAX });
                            }
                        }
                        _ => self.wrong_form(s, &loc),
                    }
                }
                _ if JOB_FIELDS.contains(&name) => self.wrong_form(s, &loc),
                _ => self.unknown(s, &loc, JOB_FIELDS),
            }
        }
        job
    }

    fn constraint(&mut self, block: &Block, loc: &Loc) -> Constraint {
        self.mark(loc, start(&block.ident));
        self.no_labels(block, loc);
        let mut con = Constraint { operator: "=".to_string(), ..Constraint::default() };
        for s in block.body.iter() {
            let name = structure_name(s);
            let floc = loc.field(name);
            match (name, s) {
                ("attribute", Structure::Attribute(a)) => {
                    con.attribute = self.constraint_string(&a.value, &floc).unwrap_or_default();
                }
                ("operator", Structure::Attribute(a)) => {
                    if let Some(v) = self.string(&a.value, &floc) {
                        con.operator = v;
                    }
                }
                ("value", Structure::Attribute(a)) => {
                    con.value = self.constraint_string(&a.value, &floc).unwrap_or_default();
                }
                _ if CONSTRAINT_FIELDS.contains(&name) => self.wrong_form(s, loc),
                _ => self.unknown(s, loc, CONSTRAINT_FIELDS),
            }
        }
        con
    }

    /// `affinity { attribute = "${meta.rack}" operator = "=" value = "r1" weight = 50 }`;
    /// operator and weight default as in Nomad ("=", 50).
    fn affinity(&mut self, block: &Block, loc: &Loc) -> Affinity {
        self.mark(loc, start(&block.ident));
        self.no_labels(block, loc);
        let mut aff = Affinity { operator: "=".to_string(), weight: Some(DEFAULT_AFFINITY_WEIGHT), ..Affinity::default() };
        let mut seen = HashMap::new();
        for s in block.body.iter() {
            let name = structure_name(s);
            if AFFINITY_FIELDS.contains(&name) && !self.first_time(&mut seen, s, loc) {
                continue;
            }
            let floc = loc.field(name);
            match (name, s) {
                ("attribute", Structure::Attribute(a)) => {
                    aff.attribute = self.constraint_string(&a.value, &floc).unwrap_or_default();
                }
                ("operator", Structure::Attribute(a)) => {
                    if let Some(v) = self.string(&a.value, &floc) {
                        aff.operator = v;
                    }
                }
                ("value", Structure::Attribute(a)) => {
                    aff.value = self.constraint_string(&a.value, &floc).unwrap_or_default();
                }
                ("weight", Structure::Attribute(a)) => {
                    if let Some(v) = self.integer(&a.value, &floc) {
                        // Out-of-i32 values still fail the validator's range check.
                        aff.weight = Some(i32::try_from(v).unwrap_or(if v < 0 { i32::MIN } else { i32::MAX }));
                    }
                }
                _ if AFFINITY_FIELDS.contains(&name) => self.wrong_form(s, loc),
                _ => self.unknown(s, loc, AFFINITY_FIELDS),
            }
        }
        aff
    }

    /// `artifact { source = "…" destination = "local/…" mode = "any" options { checksum = "sha256:…" } }`.
    fn artifact(&mut self, block: &Block, loc: &Loc) -> Artifact {
        self.mark(loc, start(&block.ident));
        self.no_labels(block, loc);
        let mut art = Artifact::default();
        let mut seen = HashMap::new();
        for s in block.body.iter() {
            let name = structure_name(s);
            if ARTIFACT_FIELDS.contains(&name) && !self.first_time(&mut seen, s, loc) {
                continue;
            }
            let floc = loc.field(name);
            match (name, s) {
                ("source", Structure::Attribute(a)) => art.source = self.string(&a.value, &floc).unwrap_or_default(),
                ("destination", Structure::Attribute(a)) => art.destination = self.string(&a.value, &floc).unwrap_or_default(),
                ("mode", Structure::Attribute(a)) => art.mode = self.string(&a.value, &floc).unwrap_or_default(),
                ("options", Structure::Block(b)) => {
                    self.mark(&floc, start(&b.ident));
                    self.no_labels(b, &floc);
                    let mut seen_opt = HashMap::new();
                    for o in b.body.iter() {
                        let oname = structure_name(o);
                        match (oname, o) {
                            ("checksum", Structure::Attribute(a)) => {
                                if self.first_time(&mut seen_opt, o, &floc) {
                                    art.checksum = self.string(&a.value, &floc.field("checksum")).unwrap_or_default();
                                }
                            }
                            _ if ARTIFACT_OPTIONS_FIELDS.contains(&oname) => self.wrong_form(o, &floc),
                            _ => self.unknown(o, &floc, ARTIFACT_OPTIONS_FIELDS),
                        }
                    }
                }
                _ if ARTIFACT_FIELDS.contains(&name) => self.wrong_form(s, loc),
                _ => self.unknown(s, loc, ARTIFACT_FIELDS),
            }
        }
        art
    }

    /// `spread { attribute = "${meta.rack}" weight = 100 target "r1" { percent = 70 } }`;
    /// the weight defaults as in Nomad (50).
    fn spread(&mut self, block: &Block, loc: &Loc) -> Spread {
        self.mark(loc, start(&block.ident));
        self.no_labels(block, loc);
        let mut spread = Spread { weight: Some(DEFAULT_SPREAD_WEIGHT), ..Spread::default() };
        let mut seen = HashMap::new();
        for s in block.body.iter() {
            let name = structure_name(s);
            if name != "target" && SPREAD_FIELDS.contains(&name) && !self.first_time(&mut seen, s, loc) {
                continue;
            }
            let floc = loc.field(name);
            match (name, s) {
                ("attribute", Structure::Attribute(a)) => {
                    spread.attribute = self.constraint_string(&a.value, &floc).unwrap_or_default();
                }
                ("weight", Structure::Attribute(a)) => {
                    if let Some(v) = self.unsigned(&a.value, &floc) {
                        spread.weight = Some(v);
                    }
                }
                ("target", Structure::Block(b)) => {
                    let index = spread.targets.len();
                    spread.targets.push(self.target(b, loc, index));
                }
                _ if SPREAD_FIELDS.contains(&name) => self.wrong_form(s, loc),
                _ => self.unknown(s, loc, SPREAD_FIELDS),
            }
        }
        spread
    }

    /// `target "VALUE" { percent = N }` inside a `spread`.
    fn target(&mut self, block: &Block, spread: &Loc, index: usize) -> SpreadTarget {
        let value = match block.labels.as_slice() {
            [] => None,
            [label, ..] => Some(label.as_str().to_string()),
        };
        let loc = spread.named("target", index, value.as_deref().unwrap_or(""));
        self.mark(&loc, start(&block.ident));
        let value_loc = loc.field("value");
        match block.labels.as_slice() {
            [] => self.fail(start(&block.ident), &value_loc, "missing target value; write `target \"VALUE\" { percent = N }`".to_string()),
            [label, rest @ ..] => {
                self.mark(&value_loc, start(label));
                if let Some(extra) = rest.first() {
                    self.problem(start(extra), &loc.path, format!("a target block takes one label, found {}", block.labels.len()));
                }
            }
        }
        let mut target = SpreadTarget { value: value.unwrap_or_default(), percent: 0 };
        let mut seen = HashMap::new();
        for s in block.body.iter() {
            let name = structure_name(s);
            if TARGET_FIELDS.contains(&name) && !self.first_time(&mut seen, s, &loc) {
                continue;
            }
            let floc = loc.field(name);
            match (name, s) {
                ("percent", Structure::Attribute(a)) => {
                    if let Some(v) = self.unsigned(&a.value, &floc) {
                        target.percent = v;
                    }
                }
                _ if TARGET_FIELDS.contains(&name) => self.wrong_form(s, &loc),
                _ => self.unknown(s, &loc, TARGET_FIELDS),
            }
        }
        target
    }

    fn group(&mut self, block: &Block, job: &Loc, index: usize, batch: bool) -> TaskGroup {
        let key_only = job.named("group", index, "");
        let name = self.label(block, &key_only);
        let loc = job.named("group", index, &name);
        self.mark(&loc, start(&block.ident));
        let mut group = TaskGroup { name, count: Some(DEFAULT_COUNT), restart: Some(default_restart(batch)), ..TaskGroup::default() };
        let mut seen = HashMap::new();
        for s in block.body.iter() {
            let name = structure_name(s);
            let floc = loc.field(name);
            match (name, s) {
                ("constraint", Structure::Block(b)) => {
                    let cloc = loc.indexed("constraint", group.constraints.len());
                    group.constraints.push(self.constraint(b, &cloc));
                }
                ("affinity", Structure::Block(b)) => {
                    let aloc = loc.indexed("affinity", group.affinities.len());
                    group.affinities.push(self.affinity(b, &aloc));
                }
                ("spread", Structure::Block(b)) => {
                    let sloc = loc.indexed("spread", group.spreads.len());
                    group.spreads.push(self.spread(b, &sloc));
                }
                ("task", Structure::Block(b)) => {
                    let index = group.tasks.len();
                    group.tasks.push(self.task(b, &loc, index));
                }
                ("meta", _) => {
                    if self.first_time(&mut seen, s, &loc) {
                        group.meta = self.string_map(s, &floc);
                    }
                }
                ("restart", Structure::Block(b)) => {
                    if self.first_time(&mut seen, s, &loc) {
                        group.restart = Some(self.restart(b, &floc, batch));
                    }
                }
                ("count", Structure::Attribute(a)) => {
                    if let Some(v) = self.unsigned(&a.value, &floc) {
                        group.count = Some(v);
                    }
                }
                ("gang", Structure::Attribute(a)) => {
                    if let Some(v) = self.bool(&a.value, &floc) {
                        group.gang = v;
                    }
                }
                ("min_count", Structure::Attribute(a)) => {
                    if let Some(v) = self.unsigned(&a.value, &floc) {
                        group.min_count = v;
                    }
                }
                ("gang_topology", Structure::Attribute(a)) => {
                    if let Some(v) = self.constraint_string(&a.value, &floc) {
                        group.gang_topology = v;
                    }
                }
                ("gang_timeout", Structure::Attribute(a)) => {
                    if let Some(v) = self.duration(&a.value, &floc) {
                        group.gang_timeout_ms = v;
                    }
                }
                ("migrate", Structure::Block(b)) => {
                    if self.first_time(&mut seen, s, &loc) {
                        group.migrate = Some(self.migrate(b, &floc));
                    }
                }
                ("update", Structure::Block(b)) => {
                    if self.first_time(&mut seen, s, &loc) {
                        group.update = Some(self.update(b, &floc));
                    }
                }
                ("shutdown_delay", Structure::Attribute(a)) => {
                    if self.first_time(&mut seen, s, &loc) {
                        if let Some(v) = self.duration(&a.value, &floc) {
                            group.shutdown_delay_ms = v;
                        }
                    }
                }
                ("reschedule", Structure::Block(b)) => {
                    if self.first_time(&mut seen, s, &loc) {
                        group.reschedule = Some(self.reschedule(b, &floc, batch));
                    }
                }
                ("network", Structure::Block(b)) => {
                    if self.first_time(&mut seen, s, &loc) {
                        group.network = Some(self.group_network(b, &floc));
                    }
                }
                ("service", Structure::Block(b)) => {
                    let sloc = loc.service(group.services.len());
                    group.services.push(self.service(b, &sloc));
                }
                ("volume", Structure::Block(b)) => {
                    let index = group.volumes.len();
                    group.volumes.push(self.volume(b, &loc, index));
                }
                _ if GROUP_FIELDS.contains(&name) => self.wrong_form(s, &loc),
                _ => self.unknown(s, &loc, GROUP_FIELDS),
            }
        }
        group
    }

    /// Missing fields keep the defaults for the job type (Nomad's behaviour).
    fn restart(&mut self, block: &Block, loc: &Loc, batch: bool) -> RestartPolicy {
        self.mark(loc, start(&block.ident));
        self.no_labels(block, loc);
        let mut policy = default_restart(batch);
        for s in block.body.iter() {
            let name = structure_name(s);
            let floc = loc.field(name);
            match (name, s) {
                ("attempts", Structure::Attribute(a)) => {
                    if let Some(v) = self.unsigned(&a.value, &floc) {
                        policy.attempts = v;
                    }
                }
                ("interval", Structure::Attribute(a)) => {
                    if let Some(v) = self.duration(&a.value, &floc) {
                        policy.interval_ms = v;
                    }
                }
                ("delay", Structure::Attribute(a)) => {
                    if let Some(v) = self.duration(&a.value, &floc) {
                        policy.delay_ms = v;
                    }
                }
                ("mode", Structure::Attribute(a)) => {
                    if let Some(v) = self.string(&a.value, &floc) {
                        policy.mode = v;
                    }
                }
                _ if RESTART_FIELDS.contains(&name) => self.wrong_form(s, loc),
                _ => self.unknown(s, loc, RESTART_FIELDS),
            }
        }
        policy
    }

    /// `parameterized { payload = "optional" meta_required = [..] meta_optional = [..] }`.
    fn parameterized(&mut self, block: &Block, loc: &Loc) -> ParameterizedConfig {
        self.mark(loc, start(&block.ident));
        self.no_labels(block, loc);
        let mut p = ParameterizedConfig { payload: crate::consts::dispatch_payload::OPTIONAL.to_string(), ..Default::default() };
        let mut seen = HashMap::new();
        for s in block.body.iter() {
            let name = structure_name(s);
            let floc = loc.field(name);
            match (name, s) {
                (_, Structure::Attribute(a)) if PARAMETERIZED_FIELDS.contains(&name) => {
                    if !self.first_time(&mut seen, s, loc) {
                        continue;
                    }
                    match name {
                        "payload" => {
                            if let Some(v) = self.string(&a.value, &floc) {
                                p.payload = v;
                            }
                        }
                        "meta_required" => p.meta_required = self.string_list(&a.value, &floc),
                        _ => p.meta_optional = self.string_list(&a.value, &floc),
                    }
                }
                _ if PARAMETERIZED_FIELDS.contains(&name) => self.wrong_form(s, loc),
                _ => self.unknown(s, loc, PARAMETERIZED_FIELDS),
            }
        }
        p
    }

    /// `periodic { crons = [..] prohibit_overlap = true time_zone = "UTC" }` (`cron = ".."`, one
    /// expression, is Nomad's older spelling and accepted too).
    fn periodic(&mut self, block: &Block, loc: &Loc) -> PeriodicConfig {
        self.mark(loc, start(&block.ident));
        self.no_labels(block, loc);
        let mut p = PeriodicConfig::default();
        let mut seen = HashMap::new();
        for s in block.body.iter() {
            let name = structure_name(s);
            let floc = loc.field(name);
            match (name, s) {
                (_, Structure::Attribute(a)) if PERIODIC_FIELDS.contains(&name) => {
                    if !self.first_time(&mut seen, s, loc) {
                        continue;
                    }
                    match name {
                        "crons" => {
                            let list = self.string_list(&a.value, &loc.field("crons"));
                            p.crons.extend(list);
                        }
                        "cron" => {
                            // Reported (and validated) as crons[i].
                            let i = p.crons.len();
                            let cloc = Loc { key: format!("{}[{i}]", loc.field("crons").key), path: floc.path.clone() };
                            if let Some(v) = self.string(&a.value, &cloc) {
                                p.crons.push(v);
                            }
                        }
                        "prohibit_overlap" => {
                            if let Some(v) = self.bool(&a.value, &floc) {
                                p.prohibit_overlap = v;
                            }
                        }
                        _ => {
                            if let Some(v) = self.string(&a.value, &floc) {
                                p.time_zone = v;
                            }
                        }
                    }
                }
                _ if PERIODIC_FIELDS.contains(&name) => self.wrong_form(s, loc),
                _ => self.unknown(s, loc, PERIODIC_FIELDS),
            }
        }
        p
    }

    /// `migrate { max_parallel = N }`: how many of the group's allocations a drain moves at once.
    fn migrate(&mut self, block: &Block, loc: &Loc) -> MigrateStrategy {
        self.mark(loc, start(&block.ident));
        self.no_labels(block, loc);
        let mut m = MigrateStrategy { max_parallel: 1 };
        for s in block.body.iter() {
            let name = structure_name(s);
            let floc = loc.field(name);
            match (name, s) {
                ("max_parallel", Structure::Attribute(a)) => {
                    if let Some(v) = self.unsigned(&a.value, &floc) {
                        m.max_parallel = v;
                    }
                }
                _ if MIGRATE_FIELDS.contains(&name) => self.wrong_form(s, loc),
                _ => self.unknown(s, loc, MIGRATE_FIELDS),
            }
        }
        m
    }

    /// `update { … }` (job or group level): only the fields written are set, so a group's block
    /// overrides the job's field by field (`effective_update`).
    fn update(&mut self, block: &Block, loc: &Loc) -> UpdateStrategy {
        self.mark(loc, start(&block.ident));
        self.no_labels(block, loc);
        let mut u = UpdateStrategy::default();
        let mut seen = HashMap::new();
        for s in block.body.iter() {
            let name = structure_name(s);
            if UPDATE_FIELDS.contains(&name) && !self.first_time(&mut seen, s, loc) {
                continue;
            }
            let floc = loc.field(name);
            match (name, s) {
                ("max_parallel", Structure::Attribute(a)) => u.max_parallel = self.unsigned(&a.value, &floc),
                ("canary", Structure::Attribute(a)) => u.canary = self.unsigned(&a.value, &floc),
                ("health_check", Structure::Attribute(a)) => u.health_check = self.string(&a.value, &floc),
                ("min_healthy_time", Structure::Attribute(a)) => u.min_healthy_time_ms = self.duration(&a.value, &floc),
                ("healthy_deadline", Structure::Attribute(a)) => u.healthy_deadline_ms = self.duration(&a.value, &floc),
                ("progress_deadline", Structure::Attribute(a)) => u.progress_deadline_ms = self.duration(&a.value, &floc),
                ("stagger", Structure::Attribute(a)) => u.stagger_ms = self.duration(&a.value, &floc),
                ("auto_revert", Structure::Attribute(a)) => u.auto_revert = self.bool(&a.value, &floc),
                ("auto_promote", Structure::Attribute(a)) => u.auto_promote = self.bool(&a.value, &floc),
                _ if UPDATE_FIELDS.contains(&name) => self.wrong_form(s, loc),
                _ => self.unknown(s, loc, UPDATE_FIELDS),
            }
        }
        u
    }

    /// `reschedule { … }`; missing fields keep the job type's defaults (Nomad's behaviour).
    fn reschedule(&mut self, block: &Block, loc: &Loc, batch: bool) -> ReschedulePolicy {
        self.mark(loc, start(&block.ident));
        self.no_labels(block, loc);
        let mut p = default_reschedule(batch);
        let mut attempts_set = false;
        let mut unlimited_set = false;
        for s in block.body.iter() {
            let name = structure_name(s);
            let floc = loc.field(name);
            match (name, s) {
                ("attempts", Structure::Attribute(a)) => {
                    if let Some(v) = self.unsigned(&a.value, &floc) {
                        p.attempts = v;
                        attempts_set = true;
                    }
                }
                ("interval", Structure::Attribute(a)) => {
                    if let Some(v) = self.duration(&a.value, &floc) {
                        p.interval_ms = v;
                    }
                }
                ("delay", Structure::Attribute(a)) => {
                    if let Some(v) = self.duration(&a.value, &floc) {
                        p.delay_ms = v;
                    }
                }
                ("delay_function", Structure::Attribute(a)) => {
                    if let Some(v) = self.string(&a.value, &floc) {
                        p.delay_function = v;
                    }
                }
                ("max_delay", Structure::Attribute(a)) => {
                    if let Some(v) = self.duration(&a.value, &floc) {
                        p.max_delay_ms = v;
                    }
                }
                ("unlimited", Structure::Attribute(a)) => {
                    if let Some(v) = self.bool(&a.value, &floc) {
                        p.unlimited = v;
                        unlimited_set = true;
                    }
                }
                _ if RESCHEDULE_FIELDS.contains(&name) => self.wrong_form(s, loc),
                _ => self.unknown(s, loc, RESCHEDULE_FIELDS),
            }
        }
        // Giving `attempts` without `unlimited` means a bounded policy, also for services.
        if attempts_set && !unlimited_set {
            p.unlimited = false;
        }
        p
    }

    fn task(&mut self, block: &Block, group: &Loc, index: usize) -> Task {
        let key_only = group.named("task", index, "");
        let name = self.label(block, &key_only);
        let loc = group.named("task", index, &name);
        self.mark(&loc, start(&block.ident));
        let mut task = Task {
            name,
            kill_timeout_ms: DEFAULT_KILL_TIMEOUT_MS,
            resources: Some(Resources { cpu_mhz: DEFAULT_CPU_MHZ, memory_mib: DEFAULT_MEMORY_MIB, ..Resources::default() }),
            ..Task::default()
        };
        let mut seen = HashMap::new();
        for s in block.body.iter() {
            let name = structure_name(s);
            // `affinity`, `service` and `artifact` are repeatable; every other task field appears once.
            let repeatable = matches!(name, "affinity" | "service" | "artifact" | "volume_mount");
            if TASK_FIELDS.contains(&name) && !repeatable && !self.first_time(&mut seen, s, &loc) {
                continue;
            }
            let floc = loc.field(name);
            match (name, s) {
                ("meta", _) => task.meta = self.string_map(s, &floc),
                ("env", _) => task.env = self.string_map(s, &floc),
                ("config", Structure::Block(b)) => task.config = Some(self.config(b, &floc)),
                ("resources", Structure::Block(b)) => {
                    task.resources = Some(self.resources(b, &floc));
                }
                ("driver", Structure::Attribute(a)) => {
                    task.driver = self.string(&a.value, &floc).unwrap_or_default();
                }
                ("kill_timeout", Structure::Attribute(a)) => {
                    if let Some(v) = self.duration(&a.value, &floc) {
                        task.kill_timeout_ms = v;
                    }
                }
                ("max_run_duration", Structure::Attribute(a)) => {
                    task.max_run_duration_ms = self.duration(&a.value, &floc).unwrap_or(0);
                }
                ("user", Structure::Attribute(a)) => {
                    task.user = self.string(&a.value, &floc).unwrap_or_default();
                }
                ("network", Structure::Block(b)) => {
                    task.network_mode = self.network(b, &floc);
                }
                ("affinity", Structure::Block(b)) => {
                    let aloc = loc.indexed("affinity", task.affinities.len());
                    task.affinities.push(self.affinity(b, &aloc));
                }
                ("service", Structure::Block(b)) => {
                    let sloc = loc.service(task.services.len());
                    task.services.push(self.service(b, &sloc));
                }
                ("artifact", Structure::Block(b)) => {
                    let aloc = loc.indexed("artifact", task.artifacts.len());
                    task.artifacts.push(self.artifact(b, &aloc));
                }
                ("volume_mount", Structure::Block(b)) => {
                    let vloc = loc.volume_mount(task.volume_mounts.len());
                    task.volume_mounts.push(self.volume_mount(b, &vloc));
                }
                _ if TASK_FIELDS.contains(&name) => self.wrong_form(s, &loc),
                _ => self.unknown(s, &loc, TASK_FIELDS),
            }
        }
        task
    }

    /// A group's `volume "LABEL" { type = "host"  source = "datasets"  read_only = true }`.
    fn volume(&mut self, block: &Block, group: &Loc, index: usize) -> VolumeRequest {
        let key_only = group.named("volume", index, "");
        let name = self.label(block, &key_only);
        let loc = group.named("volume", index, &name);
        self.mark(&loc, start(&block.ident));
        let mut volume = VolumeRequest { name, ..VolumeRequest::default() };
        let mut seen = HashMap::new();
        for s in block.body.iter() {
            let name = structure_name(s);
            let floc = loc.field(name);
            if VOLUME_FIELDS.contains(&name) && !self.first_time(&mut seen, s, &loc) {
                continue;
            }
            match (name, s) {
                ("type", Structure::Attribute(a)) => volume.r#type = self.string(&a.value, &floc).unwrap_or_default(),
                ("source", Structure::Attribute(a)) => volume.source = self.string(&a.value, &floc).unwrap_or_default(),
                ("read_only", Structure::Attribute(a)) => volume.read_only = self.bool(&a.value, &floc).unwrap_or_default(),
                _ if VOLUME_FIELDS.contains(&name) => self.wrong_form(s, &loc),
                _ => self.unknown(s, &loc, VOLUME_FIELDS),
            }
        }
        volume
    }

    /// A task's `volume_mount { volume = "LABEL"  destination = "/data"  read_only = true }`.
    fn volume_mount(&mut self, block: &Block, loc: &Loc) -> VolumeMount {
        self.mark(loc, start(&block.ident));
        self.no_labels(block, loc);
        let mut mount = VolumeMount::default();
        let mut seen = HashMap::new();
        for s in block.body.iter() {
            let name = structure_name(s);
            let floc = loc.field(name);
            if VOLUME_MOUNT_FIELDS.contains(&name) && !self.first_time(&mut seen, s, loc) {
                continue;
            }
            match (name, s) {
                ("volume", Structure::Attribute(a)) => mount.volume = self.string(&a.value, &floc).unwrap_or_default(),
                ("destination", Structure::Attribute(a)) => mount.destination = self.string(&a.value, &floc).unwrap_or_default(),
                ("read_only", Structure::Attribute(a)) => mount.read_only = self.bool(&a.value, &floc).unwrap_or_default(),
                _ if VOLUME_MOUNT_FIELDS.contains(&name) => self.wrong_form(s, loc),
                _ => self.unknown(s, loc, VOLUME_MOUNT_FIELDS),
            }
        }
        mount
    }

    /// `service { name = "web"  port = "http"  tags = [..]  check { .. } }` (group or task).
    fn service(&mut self, block: &Block, loc: &Loc) -> ServiceSpec {
        self.mark(loc, start(&block.ident));
        self.no_labels(block, loc);
        let mut svc = ServiceSpec::default();
        let mut seen = HashMap::new();
        for s in block.body.iter() {
            let name = structure_name(s);
            let floc = loc.field(name);
            if name != "check" && SERVICE_FIELDS.contains(&name) && !self.first_time(&mut seen, s, loc) {
                continue;
            }
            match (name, s) {
                ("name", Structure::Attribute(a)) => svc.name = self.string(&a.value, &floc).unwrap_or_default(),
                ("port", Structure::Attribute(a)) => svc.port = self.scalar(&a.value, &floc).unwrap_or_default(),
                ("tags", Structure::Attribute(a)) => svc.tags = self.string_list(&a.value, &floc),
                ("check", Structure::Block(b)) => {
                    let cloc = loc.check(svc.checks.len());
                    svc.checks.push(self.check(b, &cloc));
                }
                _ if SERVICE_FIELDS.contains(&name) => self.wrong_form(s, loc),
                _ => self.unknown(s, loc, SERVICE_FIELDS),
            }
        }
        svc
    }

    /// `check { type = "http"  path = "/"  interval = "10s"  timeout = "2s" }`.
    fn check(&mut self, block: &Block, loc: &Loc) -> ServiceCheck {
        self.mark(loc, start(&block.ident));
        self.no_labels(block, loc);
        let mut check = ServiceCheck {
            interval_ms: super::limits::DEFAULT_CHECK_INTERVAL_MS,
            timeout_ms: super::limits::DEFAULT_CHECK_TIMEOUT_MS,
            ..ServiceCheck::default()
        };
        let mut seen = HashMap::new();
        for s in block.body.iter() {
            let name = structure_name(s);
            let floc = loc.field(name);
            if CHECK_FIELDS.contains(&name) && !self.first_time(&mut seen, s, loc) {
                continue;
            }
            match (name, s) {
                ("type", Structure::Attribute(a)) => check.r#type = self.string(&a.value, &floc).unwrap_or_default(),
                ("path", Structure::Attribute(a)) => check.path = self.string(&a.value, &floc).unwrap_or_default(),
                ("command", Structure::Attribute(a)) => check.command = self.string(&a.value, &floc).unwrap_or_default(),
                ("args", Structure::Attribute(a)) => check.args = self.string_list(&a.value, &floc),
                ("name", Structure::Attribute(a)) => check.name = self.string(&a.value, &floc).unwrap_or_default(),
                ("port", Structure::Attribute(a)) => check.port = self.scalar(&a.value, &floc).unwrap_or_default(),
                ("interval", Structure::Attribute(a)) => {
                    if let Some(v) = self.duration(&a.value, &floc) {
                        check.interval_ms = v;
                    }
                }
                ("timeout", Structure::Attribute(a)) => {
                    if let Some(v) = self.duration(&a.value, &floc) {
                        check.timeout_ms = v;
                    }
                }
                _ if CHECK_FIELDS.contains(&name) => self.wrong_form(s, loc),
                _ => self.unknown(s, loc, CHECK_FIELDS),
            }
        }
        if check.r#type == crate::consts::check_type::HTTP && check.path.is_empty() {
            check.path = "/".to_string();
        }
        check
    }

    /// A group's `network { mode = "..." port "LABEL" { static = N to = M } }`.
    fn group_network(&mut self, block: &Block, loc: &Loc) -> GroupNetwork {
        self.mark(loc, start(&block.ident));
        self.no_labels(block, loc);
        let mut network = GroupNetwork::default();
        let mut seen = HashMap::new();
        for s in block.body.iter() {
            let name = structure_name(s);
            let floc = loc.field(name);
            match (name, s) {
                ("mode", Structure::Attribute(a)) => {
                    if self.first_time(&mut seen, s, loc) {
                        network.mode = self.string(&a.value, &floc).unwrap_or_default();
                    }
                }
                ("port", Structure::Block(b)) => {
                    let index = network.ports.len();
                    network.ports.push(self.port(b, loc, index));
                }
                _ if GROUP_NETWORK_FIELDS.contains(&name) => self.wrong_form(s, loc),
                _ => self.unknown(s, loc, GROUP_NETWORK_FIELDS),
            }
        }
        network
    }

    /// `port "LABEL" { static = N  to = M }` (both optional).
    fn port(&mut self, block: &Block, network: &Loc, index: usize) -> PortSpec {
        let key_only = network.named("port", index, "");
        let label = self.label(block, &key_only);
        let loc = network.named("port", index, &label);
        self.mark(&loc, start(&block.ident));
        let mut port = PortSpec { label, ..PortSpec::default() };
        let mut seen = HashMap::new();
        for s in block.body.iter() {
            let name = structure_name(s);
            let floc = loc.field(name);
            match (name, s) {
                ("static", Structure::Attribute(a)) => {
                    if self.first_time(&mut seen, s, &loc) {
                        port.static_port = self.port_number(&a.value, &floc);
                    }
                }
                ("to", Structure::Attribute(a)) => {
                    if self.first_time(&mut seen, s, &loc) {
                        port.to = self.port_number(&a.value, &floc);
                    }
                }
                _ if PORT_FIELDS.contains(&name) => self.wrong_form(s, &loc),
                _ => self.unknown(s, &loc, PORT_FIELDS),
            }
        }
        port
    }

    /// A port number: 1..=65535 (0 is refused here, since it means "not set" in the proto).
    fn port_number(&mut self, expr: &Expression, loc: &Loc) -> u32 {
        let Some(v) = self.integer(expr, loc) else { return 0 };
        if !(1..=65535).contains(&v) {
            self.fail(start(expr), loc, format!("must be a port number between 1 and 65535, found {v}"));
            return 0;
        }
        u32::try_from(v).unwrap_or_default()
    }

    /// `network { mode = "..." }`: only the mode for now.
    fn network(&mut self, block: &Block, loc: &Loc) -> String {
        self.mark(loc, start(&block.ident));
        self.no_labels(block, loc);
        let mut mode = String::new();
        for s in block.body.iter() {
            let name = structure_name(s);
            let floc = loc.field(name);
            match (name, s) {
                ("mode", Structure::Attribute(a)) => {
                    mode = self.string(&a.value, &floc).unwrap_or_default();
                }
                _ if NETWORK_FIELDS.contains(&name) => self.wrong_form(s, loc),
                _ => self.unknown(s, loc, NETWORK_FIELDS),
            }
        }
        mode
    }

    fn config(&mut self, block: &Block, loc: &Loc) -> TaskConfig {
        self.mark(loc, start(&block.ident));
        self.no_labels(block, loc);
        let mut config = TaskConfig::default();
        for s in block.body.iter() {
            let name = structure_name(s);
            let floc = loc.field(name);
            match (name, s) {
                ("command", Structure::Attribute(a)) => {
                    config.command = self.string(&a.value, &floc).unwrap_or_default();
                }
                ("args", Structure::Attribute(a)) => {
                    config.args = self.string_list(&a.value, &floc);
                }
                ("module", Structure::Attribute(a)) => {
                    config.module = self.string(&a.value, &floc).unwrap_or_default();
                }
                ("env", _) => config.env = self.string_map(s, &floc),
                ("image", Structure::Attribute(a)) => {
                    config.image = self.string(&a.value, &floc).unwrap_or_default();
                }
                ("entrypoint", Structure::Attribute(a)) => {
                    config.entrypoint = self.string_list(&a.value, &floc);
                }
                ("work_dir", Structure::Attribute(a)) => {
                    config.work_dir = self.string(&a.value, &floc).unwrap_or_default();
                }
                ("auth", Structure::Block(b)) => config.auth = Some(self.registry_auth(b, &floc)),
                _ if CONFIG_FIELDS.contains(&name) => self.wrong_form(s, loc),
                _ => self.unknown(s, loc, CONFIG_FIELDS),
            }
        }
        config
    }

    /// `auth { username = "..." password = "..." }` of an `oci` task's config.
    fn registry_auth(&mut self, block: &Block, loc: &Loc) -> RegistryAuth {
        self.mark(loc, start(&block.ident));
        self.no_labels(block, loc);
        let mut auth = RegistryAuth::default();
        for s in block.body.iter() {
            let name = structure_name(s);
            let floc = loc.field(name);
            match (name, s) {
                ("username", Structure::Attribute(a)) => auth.username = self.string(&a.value, &floc).unwrap_or_default(),
                ("password", Structure::Attribute(a)) => auth.password = self.string(&a.value, &floc).unwrap_or_default(),
                _ if AUTH_FIELDS.contains(&name) => self.wrong_form(s, loc),
                _ => self.unknown(s, loc, AUTH_FIELDS),
            }
        }
        auth
    }

    fn resources(&mut self, block: &Block, loc: &Loc) -> Resources {
        self.mark(loc, start(&block.ident));
        self.no_labels(block, loc);
        let mut res = Resources { cpu_mhz: DEFAULT_CPU_MHZ, memory_mib: DEFAULT_MEMORY_MIB, ..Resources::default() };
        let mut seen = HashMap::new();
        for s in block.body.iter() {
            let name = structure_name(s);
            if RESOURCES_FIELDS.contains(&name) && !self.first_time(&mut seen, s, loc) {
                continue;
            }
            let floc = loc.field(name);
            match (name, s) {
                ("cpu", Structure::Attribute(a)) => {
                    if let Some(v) = self.unsigned(&a.value, &floc) {
                        res.cpu_mhz = v;
                    }
                }
                ("memory", Structure::Attribute(a)) => {
                    if let Some(v) = self.unsigned(&a.value, &floc) {
                        res.memory_mib = v;
                    }
                }
                ("cores", Structure::Attribute(a)) => {
                    res.cores = self.unsigned(&a.value, &floc).unwrap_or(0);
                }
                ("disk", Structure::Attribute(a)) => {
                    res.disk_mib = self.unsigned(&a.value, &floc).unwrap_or(0);
                }
                ("memory_max", Structure::Attribute(a)) => {
                    res.memory_max_mib = self.unsigned(&a.value, &floc).unwrap_or(0);
                }
                ("pids", Structure::Attribute(a)) => {
                    res.pids = self.unsigned(&a.value, &floc).unwrap_or(0);
                }
                ("cpu_hard_limit", Structure::Attribute(a)) => {
                    res.cpu_hard_limit = self.bool(&a.value, &floc).unwrap_or(false);
                }
                // `gpu = N` is shorthand for `gpu { count = N }`; zero means no GPU.
                ("gpu", Structure::Attribute(a)) => {
                    res.gpu = self
                        .unsigned(&a.value, &floc)
                        .filter(|&count| count > 0)
                        .map(|count| GpuRequest { count: Some(count), ..Default::default() });
                }
                ("gpu", Structure::Block(b)) => {
                    res.gpu = self.gpu(b, &floc);
                }
                _ if RESOURCES_FIELDS.contains(&name) => self.wrong_form(s, loc),
                _ => self.unknown(s, loc, RESOURCES_FIELDS),
            }
        }
        res
    }

    fn gpu(&mut self, block: &Block, loc: &Loc) -> Option<GpuRequest> {
        self.mark(loc, start(&block.ident));
        self.no_labels(block, loc);
        let mut req = GpuRequest { count: Some(DEFAULT_GPU_COUNT), ..Default::default() };
        // Where `count` and `memory` were written, to point at them when they contradict `share`.
        let mut count_at: Option<&Expression> = None;
        let mut memory_at: Option<&Expression> = None;
        for s in block.body.iter() {
            let name = structure_name(s);
            let floc = loc.field(name);
            match (name, s) {
                ("count", Structure::Attribute(a)) => {
                    if let Some(v) = self.unsigned(&a.value, &floc) {
                        req.count = Some(v);
                        count_at = Some(&a.value);
                    }
                }
                // One model or a list of allowed models.
                ("model", Structure::Attribute(a)) => {
                    req.models = match &a.value {
                        Expression::Array(_) => self.string_list(&a.value, &floc),
                        other => self.string(other, &floc).into_iter().collect(),
                    };
                }
                ("memory", Structure::Attribute(a)) => {
                    let memory = self.unsigned(&a.value, &floc);
                    req.memory_mib = memory.unwrap_or(0);
                    memory_at = memory.map(|_| &a.value);
                }
                ("share", Structure::Attribute(a)) => {
                    req.share_milli = self.share(&a.value, &floc).unwrap_or(0);
                }
                // MIG instances of one profile (checked by the validator, with the other fields).
                ("mig", Structure::Attribute(a)) => {
                    req.mig_profile = self.string(&a.value, &floc).unwrap_or_default();
                }
                _ if GPU_FIELDS.contains(&name) => self.wrong_form(s, loc),
                _ => self.unknown(s, loc, GPU_FIELDS),
            }
        }
        if req.share_milli > 0 {
            if let Some(expr) = count_at.filter(|_| req.effective_count() != 1) {
                self.fail(
                    start(expr),
                    &loc.field("count"),
                    format!("a shared GPU (`share`) is one GPU; count must be 1, found {}", req.effective_count()),
                );
            }
            // A share's memory is the device memory it reserves (and MPS enforces): a share of
            // nothing cannot run. Leaving `memory` out reserves the share's fraction instead.
            if let Some(expr) = memory_at.filter(|_| req.memory_mib == 0) {
                self.fail(
                    start(expr),
                    &loc.field("memory"),
                    "a shared GPU's memory is the device memory it reserves; must be at least 1 (MiB), found 0 (leave it out to reserve the share's fraction of the device's memory)"
                        .to_string(),
                );
            }
            req.count = Some(1);
        }
        (req.effective_count() > 0).then_some(req)
    }

    /// `share`: a decimal fraction of one GPU, 0 < share < 1, in steps of 0.001; returned in milli.
    fn share(&mut self, expr: &Expression, loc: &Loc) -> Option<u32> {
        self.mark(loc, start(expr));
        let Expression::Number(n) = expr else {
            self.type_error(expr, loc, "a fraction of one GPU such as 0.25");
            return None;
        };
        let value = n.value().as_f64().unwrap_or(f64::NAN);
        let milli = (value * 1000.0).round();
        if !(value > 0.0 && value < 1.0) || (milli - value * 1000.0).abs() > 1e-6 || !(1.0..=999.0).contains(&milli) {
            self.fail(
                start(expr),
                loc,
                format!("share must be a fraction of one GPU between 0.001 and 0.999 in steps of 0.001, found {}", n.value()),
            );
            return None;
        }
        // In 1..=999 (checked above), so the conversion is exact.
        Some(milli as u32)
    }
}

/// Nomad's restart defaults: batch work retries harder, over a longer window.
pub(crate) fn default_restart(batch: bool) -> RestartPolicy {
    let (attempts, interval_ms) = if batch { (3, 24 * 3_600_000) } else { (2, 30 * 60_000) };
    RestartPolicy { attempts, interval_ms, delay_ms: 15_000, mode: restart_mode::FAIL.to_string() }
}

/// A group's update strategy with every field set: the group's `update` fields over the job's
/// over the defaults (Nomad's: max_parallel 1, checks, 10s, 5m, 10m, no revert, no canaries,
/// stagger 30s). None when neither the job nor the group has an `update` block, or the
/// resolved `max_parallel` is 0: then a changed allocation is replaced at once, without a
/// deployment.
pub fn effective_update(job: &Job, group: &TaskGroup) -> Option<UpdateStrategy> {
    if job.update.is_none() && group.update.is_none() {
        return None;
    }
    let (j, g) = (job.update.clone().unwrap_or_default(), group.update.clone().unwrap_or_default());
    let u = UpdateStrategy {
        max_parallel: Some(g.max_parallel.or(j.max_parallel).unwrap_or(1)),
        health_check: Some(g.health_check.or(j.health_check).unwrap_or_else(|| health_check::CHECKS.to_string())),
        min_healthy_time_ms: Some(g.min_healthy_time_ms.or(j.min_healthy_time_ms).unwrap_or(10_000)),
        healthy_deadline_ms: Some(g.healthy_deadline_ms.or(j.healthy_deadline_ms).unwrap_or(300_000)),
        progress_deadline_ms: Some(g.progress_deadline_ms.or(j.progress_deadline_ms).unwrap_or(600_000)),
        auto_revert: Some(g.auto_revert.or(j.auto_revert).unwrap_or(false)),
        canary: Some(g.canary.or(j.canary).unwrap_or(0)),
        auto_promote: Some(g.auto_promote.or(j.auto_promote).unwrap_or(false)),
        stagger_ms: Some(g.stagger_ms.or(j.stagger_ms).unwrap_or(30_000)),
    };
    (u.max_parallel != Some(0)).then_some(u)
}

/// Nomad's reschedule defaults: services are replaced without limit with a growing delay; batch
/// work once a day after 5 s.
pub fn default_reschedule(batch: bool) -> ReschedulePolicy {
    if batch {
        ReschedulePolicy {
            attempts: 1,
            interval_ms: 24 * 3_600_000,
            delay_ms: 5_000,
            delay_function: "constant".to_string(),
            max_delay_ms: 0,
            unlimited: false,
        }
    } else {
        ReschedulePolicy {
            attempts: 0,
            interval_ms: 0,
            delay_ms: 30_000,
            delay_function: "exponential".to_string(),
            max_delay_ms: 3_600_000,
            unlimited: true,
        }
    }
}

/// The text of a template that has no interpolations or directives.
fn literal_text(template: &Template) -> Option<String> {
    let mut out = String::new();
    for element in template.iter() {
        match element {
            Element::Literal(lit) => out.push_str(lit.value()),
            _ => return None,
        }
    }
    Some(out)
}

/// Literal values (as opposed to references, calls and operators).
fn is_literal(expr: &Expression) -> bool {
    matches!(
        expr,
        Expression::Null(_)
            | Expression::Bool(_)
            | Expression::Number(_)
            | Expression::String(_)
            | Expression::Array(_)
            | Expression::Object(_)
            | Expression::StringTemplate(_)
            | Expression::HeredocTemplate(_)
    )
}

/// The known name closest to `name`, if it is a plausible typo (edit distance ≤ 2).
fn suggest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    known.iter().map(|k| (edit_distance(name, k), *k)).filter(|&(d, _)| d <= 2).min_by_key(|&(d, _)| d).map(|(_, k)| k)
}

/// Levenshtein distance, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}
