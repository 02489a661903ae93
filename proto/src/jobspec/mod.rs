//! Job spec files (HCL, in Nomad's shape) → `v1::Job`, plus the semantic checks that every job
//! must pass whichever way it arrives (HCL file or JSON over the HTTP API).
//!
//! Parsing happens in three steps: `hcl-edit` turns the text into a syntax tree that keeps byte
//! spans, `decode` maps the tree onto a `Job` (reporting unknown fields and wrong types), and
//! `validate` checks values (names, ranges, drivers…). The validator knows nothing about HCL:
//! it names each problem by a structural key that the decoder maps back to a source position,
//! so the rules live in one place and still come out as `FILE:LINE:COL` diagnostics.

pub mod artifact;
mod decode;
mod duration;
pub mod jobtypes;
pub mod limits;
mod validate;

use std::fmt;
use std::path::Path;

use crate::v1::Job;

pub use decode::{default_reschedule, effective_update};
pub use duration::parse_duration;
pub use validate::{check_image_reference, check_mount_destination, is_dns_label, is_host_volume_name, is_mig_profile};

/// Every problem found in a job spec; `Display` prints one diagnostic per line.
#[derive(Debug, thiserror::Error)]
#[error("{}", join_lines(.diagnostics))]
pub struct JobspecError {
    /// Sorted by position (diagnostics without a position keep their order).
    pub diagnostics: Vec<Diagnostic>,
}

/// One problem in a job spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    /// The file name as given to [`parse_str`]; `None` for inline text or decoded jobs.
    pub file: Option<String>,
    /// 1-based; 0 when the position is unknown.
    pub line: usize,
    /// 1-based, in characters; 0 when the position is unknown.
    pub column: usize,
    /// Field path, e.g. `job.train.group.workers.task.main.resources.memory`; empty for syntax
    /// errors.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), 0) => write!(f, "{file}: ")?,
            (Some(file), line) => write!(f, "{file}:{line}:{}: ", self.column)?,
            (None, 0) => {}
            (None, line) => write!(f, "{line}:{}: ", self.column)?,
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

fn join_lines(diagnostics: &[Diagnostic]) -> String {
    diagnostics.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}

/// Reads and parses a job spec file; diagnostics carry the path as their file name.
pub fn parse_file(path: &Path) -> Result<Job, JobspecError> {
    let name = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(src) => parse_str(&src, &name),
        Err(err) => Err(JobspecError {
            diagnostics: vec![Diagnostic {
                file: Some(name),
                line: 0,
                column: 0,
                path: String::new(),
                message: format!("cannot read job spec: {err}"),
            }],
        }),
    }
}

/// Parses a job spec from text. `file_name` only labels the diagnostics (may be empty).
///
/// Reports every problem in the file, not just the first, sorted by position.
pub fn parse_str(src: &str, file_name: &str) -> Result<Job, JobspecError> {
    let file = (!file_name.is_empty()).then(|| file_name.to_string());
    // The parser and the decoder recurse on nesting and operator chains: bound both before
    // either runs, and run a deep spec on a thread whose stack holds the deepest input the bounds
    // allow (callers such as a server's request handler run on small stacks).
    let shape = match scan_limits(src) {
        Ok(shape) => shape,
        Err((offset, message)) => {
            let (line, column) = line_col(src, offset);
            return Err(JobspecError { diagnostics: vec![Diagnostic { file, line, column, path: String::new(), message }] });
        }
    };
    // A spec as shallow as job files are (job, group, task, a block or two, a list) recurses so
    // little that any caller's stack holds it: it is parsed here, without a thread (its start,
    // stack and malloc arena were about a twentieth of an `mlp job run`'s CPU).
    if shape.depth <= INLINE_MAX_NESTING && shape.operators <= INLINE_MAX_OPERATORS {
        return parse_bounded(src, file);
    }
    let parsed = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("jobspec-parse".into())
            .stack_size(PARSE_STACK_BYTES)
            .spawn_scoped(scope, || parse_bounded(src, file.clone()))
            .map(|t| t.join())
    });
    match parsed {
        Ok(Ok(result)) => result,
        Ok(Err(_)) | Err(_) => Err(JobspecError {
            diagnostics: vec![Diagnostic {
                file,
                line: 0,
                column: 0,
                path: String::new(),
                message: "internal error: the job spec parser failed".into(),
            }],
        }),
    }
}

/// Stack for the parser thread: the bounds of `scan_limits` need a few MiB in a debug build.
const PARSE_STACK_BYTES: usize = 32 * 1024 * 1024;

/// The deepest nesting, and the most operators, that [`parse_str`] parses on the caller's stack.
/// The examples and test job files nest at most 7 deep and use at most one operator. The worst
/// spec within both bounds fits [`INLINE_STACK_BYTES`] in a debug build
/// (`a_spec_parsed_inline_fits_a_small_stack`; it needed between 128 and 256 KiB when written),
/// a fraction of a tokio worker's 2 MiB and a main thread's 8 MiB.
const INLINE_MAX_NESTING: usize = 8;
const INLINE_MAX_OPERATORS: usize = 16;
/// The stack the inline bounds are tested on.
#[cfg(test)]
const INLINE_STACK_BYTES: usize = 512 * 1024;

/// What the pre-scan saw of a spec within the limits: its deepest nesting and its operators.
struct Shape {
    depth: usize,
    operators: usize,
}

fn parse_bounded(src: &str, file: Option<String>) -> Result<Job, JobspecError> {
    let body = match hcl_edit::parser::parse_body(src) {
        Ok(body) => body,
        Err(err) => {
            return Err(JobspecError {
                diagnostics: vec![Diagnostic {
                    file,
                    line: err.location().line(),
                    column: err.location().column(),
                    path: String::new(),
                    message: format!("syntax error: {}", err.message()),
                }],
            })
        }
    };

    let mut decoded = decode::decode(src, &body);
    let mut found = std::mem::take(&mut decoded.problems);
    if let Some(job) = &decoded.job {
        for issue in validate::check_job(job) {
            // A field that failed to decode was left at its default; judging that default
            // would only repeat the first complaint in a more confusing way.
            if decoded.failed.iter().any(|k| is_within(&issue.key, k)) {
                continue;
            }
            found.push(decode::Problem { offset: decoded.position_of(&issue.key), path: issue.path, message: issue.message });
        }
    }

    match decoded.job {
        Some(job) if found.is_empty() => Ok(job),
        _ => {
            // Stable sort: problems at the same spot keep the order they were found in.
            found.sort_by_key(|p| p.offset);
            let diagnostics = found
                .into_iter()
                .map(|p| {
                    let (line, column) = line_col(src, p.offset);
                    Diagnostic { file: file.clone(), line, column, path: p.path, message: p.message }
                })
                .collect();
            Err(JobspecError { diagnostics })
        }
    }
}

/// The size, nesting and operator limits of a job spec file, checked on the raw text before the
/// parser (which recurses on nesting and on operator chains such as `!!!!x` or `1+1+…`) sees it:
/// the byte offset and message of the first violation, or, within the limits, the spec's
/// deepest nesting and operator count (which decide where it is parsed).
///
/// A small scanner that knows strings (with `${…}` / `%{…}` templates), heredocs and comments
/// counts every open bracket, brace, parenthesis, string inside a template, and template as one
/// level, and every operator character outside string text as one operator.
fn scan_limits(src: &str) -> Result<Shape, (usize, String)> {
    use limits::{MAX_NESTING, MAX_OPERATORS, MAX_SPEC_BYTES};
    enum Frame {
        Open,
        Template,
        Str,
        Heredoc(String),
    }
    if src.len() > MAX_SPEC_BYTES {
        return Err((0, format!("the job spec is {} bytes; at most {MAX_SPEC_BYTES} (limit: job spec size)", src.len())));
    }
    // Bytes, not `str` slices: a skip may land inside a multi-byte character.
    let b = src.as_bytes();
    let line_end = |i: usize| b[i..].iter().position(|&c| c == b'\n').map_or(b.len(), |n| i + n);
    let deep = |i: usize| Err((i, format!("nested more than {MAX_NESTING} levels deep (limit: nesting depth)")));
    let mut stack: Vec<Frame> = Vec::new();
    let mut depth = 0usize;
    let mut operators = 0usize;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        match stack.last() {
            Some(Frame::Str) => match c {
                b'\\' => i += 1,
                b'"' => {
                    stack.pop();
                }
                b'$' | b'%' if next == Some(b'$') || next == Some(b'%') => i += 1, // `$${` is literal
                b'$' | b'%' if next == Some(b'{') => {
                    stack.push(Frame::Template);
                    i += 1;
                }
                _ => {}
            },
            Some(Frame::Heredoc(delim)) => {
                let line_start = i == 0 || b[i - 1] == b'\n';
                let end = line_end(i);
                if line_start && b[i..end].trim_ascii() == delim.as_bytes() {
                    stack.pop();
                    i = end;
                } else if (c == b'$' || c == b'%') && next == Some(b'{') {
                    stack.push(Frame::Template);
                    i += 1;
                }
            }
            _ => match c {
                b'"' => stack.push(Frame::Str),
                b'#' => i = line_end(i),
                b'/' if next == Some(b'/') => i = line_end(i),
                b'/' if next == Some(b'*') => {
                    i = b[i + 2..].windows(2).position(|w| w == b"*/").map_or(b.len(), |n| i + 2 + n + 1);
                }
                b'<' if next == Some(b'<') => {
                    let rest = &b[i + 2..];
                    let rest = rest.strip_prefix(b"-").unwrap_or(rest);
                    let ident: Vec<u8> = rest.iter().copied().take_while(|c| c.is_ascii_alphanumeric() || *c == b'_').collect();
                    if ident.is_empty() {
                        operators += 2;
                        i += 1;
                    } else {
                        stack.push(Frame::Heredoc(String::from_utf8_lossy(&ident).into_owned()));
                        i = line_end(i);
                    }
                }
                b'{' | b'[' | b'(' => stack.push(Frame::Open),
                b'}' | b']' | b')' => {
                    stack.pop();
                }
                b'!' | b'-' | b'+' | b'*' | b'/' | b'%' | b'?' | b'<' | b'>' | b'&' | b'|' => operators += 1,
                _ => {}
            },
        }
        if stack.len() > MAX_NESTING {
            return deep(i.min(b.len().saturating_sub(1)));
        }
        depth = depth.max(stack.len());
        if operators > MAX_OPERATORS {
            return Err((i, format!("more than {MAX_OPERATORS} operators in one job spec (limit: operators)")));
        }
        i += 1;
    }
    Ok(Shape { depth, operators })
}

/// Fills the defaults a job file would get for fields a submission left out, so that a job means
/// the same whichever door it came in by: type, priority, namespace, a group's `count` (1),
/// affinity and spread weights (50), a GPU ask's count (1), restart policies, task resources and
/// kill timeouts.
pub fn apply_defaults(job: &mut Job) {
    if job.r#type.is_empty() {
        job.r#type = crate::consts::job_type::SERVICE.to_string();
    }
    if job.priority == 0 {
        job.priority = decode::DEFAULT_PRIORITY;
    }
    if job.namespace.is_empty() {
        job.namespace = decode::DEFAULT_NAMESPACE.to_string();
    }
    let batch = crate::consts::job_type::is_batch(&job.r#type);
    let default_weights = |affinities: &mut Vec<crate::v1::Affinity>| {
        for a in affinities {
            a.weight.get_or_insert(decode::DEFAULT_AFFINITY_WEIGHT);
        }
    };
    default_weights(&mut job.affinities);
    for s in &mut job.spreads {
        s.weight.get_or_insert(decode::DEFAULT_SPREAD_WEIGHT);
    }
    let default_checks = |services: &mut Vec<crate::v1::ServiceSpec>| {
        for c in services.iter_mut().flat_map(|s| s.checks.iter_mut()) {
            if c.interval_ms == 0 {
                c.interval_ms = limits::DEFAULT_CHECK_INTERVAL_MS;
            }
            if c.timeout_ms == 0 {
                c.timeout_ms = limits::DEFAULT_CHECK_TIMEOUT_MS.min(c.interval_ms);
            }
            if c.r#type == crate::consts::check_type::HTTP && c.path.is_empty() {
                c.path = "/".to_string();
            }
        }
    };
    for group in &mut job.groups {
        default_checks(&mut group.services);
        for task in &mut group.tasks {
            default_checks(&mut task.services);
        }
        group.count.get_or_insert(decode::DEFAULT_COUNT);
        default_weights(&mut group.affinities);
        for s in &mut group.spreads {
            s.weight.get_or_insert(decode::DEFAULT_SPREAD_WEIGHT);
        }
        if group.restart.is_none() {
            group.restart = Some(decode::default_restart(batch));
        }
        if let Some(r) = &mut group.reschedule {
            if r.delay_function.is_empty() {
                r.delay_function = decode::default_reschedule(batch).delay_function;
            }
        }
        for task in &mut group.tasks {
            default_weights(&mut task.affinities);
            if let Some(gpu) = task.resources.as_mut().and_then(|r| r.gpu.as_mut()) {
                gpu.count.get_or_insert(decode::DEFAULT_GPU_COUNT);
            }
            if task.resources.is_none() {
                task.resources = Some(crate::v1::Resources {
                    cpu_mhz: decode::DEFAULT_CPU_MHZ,
                    memory_mib: decode::DEFAULT_MEMORY_MIB,
                    ..Default::default()
                });
            }
            if task.kill_timeout_ms == 0 {
                task.kill_timeout_ms = decode::DEFAULT_KILL_TIMEOUT_MS;
            }
        }
    }
}

/// Semantic checks on an already-decoded job (e.g. one submitted as JSON). The diagnostics have
/// no position, only the field path.
pub fn validate_job(job: &Job) -> Result<(), JobspecError> {
    // Most jobs are valid: find that out without building a location for every field, and
    // check again with locations only to describe what is wrong.
    if validate::is_valid(job) {
        return Ok(());
    }
    let diagnostics: Vec<Diagnostic> = validate::check_job(job)
        .into_iter()
        .map(|issue| Diagnostic { file: None, line: 0, column: 0, path: issue.path, message: issue.message })
        .collect();
    if diagnostics.is_empty() {
        Ok(())
    } else {
        Err(JobspecError { diagnostics })
    }
}

/// A node in the job tree, named twice: `key` is structural (`job.g0.t1.driver`, stable even
/// when names are missing or duplicated) and ties validator findings to decoder positions;
/// `path` is what users see (`job.train.group.g.task.t.driver`).
#[derive(Debug, Clone)]
pub(crate) struct Loc {
    pub key: String,
    pub path: String,
}

impl Loc {
    pub fn job(name: &str) -> Loc {
        let path = if name.is_empty() { "job".to_string() } else { format!("job.{name}") };
        Loc { key: "job".to_string(), path }
    }

    /// The root of a check that only asks whether there is any finding: it and every location
    /// below it stay empty strings, so the checks allocate and format no paths (two strings
    /// per field otherwise, a few percent of a server's CPU per job registration).
    pub fn nowhere() -> Loc {
        Loc { key: String::new(), path: String::new() }
    }

    fn is_nowhere(&self) -> bool {
        self.key.is_empty()
    }

    /// A location below this one, `make(key, path)` giving its key and path; below
    /// [`Loc::nowhere`] it is nowhere too, and `make` is not called.
    fn below(&self, make: impl FnOnce(&str, &str) -> (String, String)) -> Loc {
        if self.is_nowhere() {
            return Loc::nowhere();
        }
        let (key, path) = make(&self.key, &self.path);
        Loc { key, path }
    }

    /// A plain field or sub-block.
    pub fn field(&self, name: &str) -> Loc {
        self.below(|key, path| (format!("{key}.{name}"), format!("{path}.{name}")))
    }

    /// A named, repeatable block (`group`, `task`); unnamed ones are shown by index.
    pub fn named(&self, kind: &str, index: usize, name: &str) -> Loc {
        self.below(|key, path| {
            let path = if name.is_empty() { format!("{path}.{kind}[{index}]") } else { format!("{path}.{kind}.{name}") };
            (format!("{key}.{}{index}", &kind[..1]), path)
        })
    }

    /// The name label of a named block: its own key, shown at the block's path.
    pub fn name_label(&self) -> Loc {
        self.below(|key, path| (format!("{key}.name"), path.to_string()))
    }

    /// The `index`th item of a list field.
    pub fn item(&self, index: usize) -> Loc {
        self.below(|key, path| (format!("{key}[{index}]"), format!("{path}[{index}]")))
    }

    /// The `index`th `service` block (its own key prefix: `s` is `spread`'s).
    pub fn service(&self, index: usize) -> Loc {
        self.below(|key, path| (format!("{key}.svc{index}"), format!("{path}.service[{index}]")))
    }

    /// The `index`th `volume_mount` block of a task (its own key prefix: `v` is a group's
    /// `volume`).
    pub fn volume_mount(&self, index: usize) -> Loc {
        self.below(|key, path| (format!("{key}.vm{index}"), format!("{path}.volume_mount[{index}]")))
    }

    /// The `index`th `check` block of a service.
    pub fn check(&self, index: usize) -> Loc {
        self.below(|key, path| (format!("{key}.chk{index}"), format!("{path}.check[{index}]")))
    }

    /// A repeatable block without a name (`constraint`).
    pub fn indexed(&self, kind: &str, index: usize) -> Loc {
        self.below(|key, path| (format!("{key}.{}{index}", &kind[..1]), format!("{path}.{kind}[{index}]")))
    }
}

/// Whether `key` is `prefix` itself or a field below it.
fn is_within(key: &str, prefix: &str) -> bool {
    key.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(src.len());
    while !src.is_char_boundary(end) {
        end -= 1;
    }
    let before = &src[..end];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

// Fields a submission may leave out, read with the default a job file would get. After
// `apply_defaults` every job in the cluster state has them set; these keep any code path that
// reads a job before that (or an old state) from reading "absent" as 0.
impl crate::v1::TaskGroup {
    /// `count`, 1 when absent.
    pub fn effective_count(&self) -> u32 {
        self.count.unwrap_or(decode::DEFAULT_COUNT)
    }
}

impl crate::v1::GpuRequest {
    /// `count`, 1 when absent.
    pub fn effective_count(&self) -> u32 {
        self.count.unwrap_or(decode::DEFAULT_GPU_COUNT)
    }
}

impl crate::v1::Affinity {
    /// `weight`, 50 when absent.
    pub fn effective_weight(&self) -> i32 {
        self.weight.unwrap_or(decode::DEFAULT_AFFINITY_WEIGHT)
    }
}

impl crate::v1::Spread {
    /// `weight`, 50 when absent.
    pub fn effective_weight(&self) -> u32 {
        self.weight.unwrap_or(decode::DEFAULT_SPREAD_WEIGHT)
    }
}

#[cfg(test)]
mod loc_tests {
    use super::Loc;

    /// Every location derived from [`Loc::nowhere`] is nowhere too (the fast check formats no
    /// paths); from a real one, each gets its key and path.
    #[test]
    fn below_nowhere_is_nowhere_and_below_a_job_is_named() {
        let derive = |l: &Loc| {
            [
                l.field("f"),
                l.named("group", 0, "g"),
                l.named("task", 1, ""),
                l.name_label(),
                l.item(2),
                l.service(3),
                l.volume_mount(4),
                l.check(5),
                l.indexed("constraint", 6),
            ]
        };
        for l in derive(&Loc::nowhere()) {
            assert!(l.is_nowhere() && l.path.is_empty(), "{l:?}");
        }
        let got: Vec<(String, String)> = derive(&Loc::job("j")).into_iter().map(|l| (l.key, l.path)).collect();
        let want = [
            ("job.f", "job.j.f"),
            ("job.g0", "job.j.group.g"),
            ("job.t1", "job.j.task[1]"),
            ("job.name", "job.j"),
            ("job[2]", "job.j[2]"),
            ("job.svc3", "job.j.service[3]"),
            ("job.vm4", "job.j.volume_mount[4]"),
            ("job.chk5", "job.j.check[5]"),
            ("job.c6", "job.j.constraint[6]"),
        ];
        assert_eq!(got, want.map(|(k, p)| (k.to_string(), p.to_string())));
    }
}

#[cfg(test)]
mod inline_tests {
    use super::*;

    /// The worst spec [`parse_str`] parses without a thread of its own: nested exactly
    /// [`INLINE_MAX_NESTING`] deep, with exactly [`INLINE_MAX_OPERATORS`] operators in one
    /// chain. Parsed on a thread with [`INLINE_STACK_BYTES`] of stack, in whatever profile the
    /// tests run (a debug build's frames are the largest); an overflow aborts the test.
    fn worst_inline_spec() -> String {
        let chain = vec!["1"; INLINE_MAX_OPERATORS + 1].join(" + ");
        // job, group, task, config: 4; then four brackets: 8.
        format!(
            "job \"deep\" {{\n  group \"g\" {{\n    task \"t\" {{\n      driver = \"exec\"\n      config {{\n        command = \"/bin/true\"\n        args = [[[[1]]]]\n      }}\n      resources {{\n        cpu = {chain}\n      }}\n    }}\n  }}\n}}\n"
        )
    }

    #[test]
    fn a_spec_parsed_inline_fits_a_small_stack() {
        let src = worst_inline_spec();
        let shape = scan_limits(&src).map_err(|e| e.1).expect("within the limits");
        assert_eq!((shape.depth, shape.operators), (INLINE_MAX_NESTING, INLINE_MAX_OPERATORS), "not the worst inline case");
        let parsed = std::thread::Builder::new()
            .stack_size(INLINE_STACK_BYTES)
            .spawn(move || parse_str(&src, "deep.hcl").map(|_| ()).map_err(|e| e.to_string()))
            .expect("spawn")
            .join()
            .expect("the parse panicked");
        // The spec need not be valid (the args are not strings); it must be decoded and
        // answered, not overflow the stack.
        if let Err(e) = parsed {
            assert!(!e.contains("internal error"), "{e}");
        }
    }

    /// One level deeper, or one operator more, goes to the parser's own thread: still parsed.
    #[test]
    fn a_spec_past_the_inline_bounds_is_still_parsed() {
        let deeper = worst_inline_spec().replace("[[[[1]]]]", "[[[[[1]]]]]");
        let shape = scan_limits(&deeper).map_err(|e| e.1).expect("within the limits");
        assert_eq!(shape.depth, INLINE_MAX_NESTING + 1);
        let err = parse_str(&deeper, "deeper.hcl").map(|_| ()).map_err(|e| e.to_string());
        assert!(err.as_ref().err().is_none_or(|e| !e.contains("internal error")), "{err:?}");
        let ok = "job \"j\" {\n  group \"g\" {\n    task \"t\" {\n      driver = \"exec\"\n      config {\n        command = \"/bin/true\"\n      }\n    }\n  }\n}\n";
        let job = parse_str(ok, "ok.hcl").expect("a plain job parses inline");
        assert_eq!(job.name, "j");
    }
}
