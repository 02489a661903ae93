//! ACL policies in HCL (issue 15 §2), parsed with `hcl-edit` like job specs:
//!
//! ```hcl
//! namespace "default" {
//!   policy       = "read"                        # read | write | deny (shorthands)
//!   capabilities = ["submit-job", "read-logs"]   # added to the shorthand's
//! }
//! namespace "team-*" { policy = "write" }        # `*` matches any run of characters
//! node     { policy = "read" }                   # read | write | deny
//! operator { policy = "read" }
//! acl      { policy = "write" }
//! ```
//!
//! Every problem is reported as `file:line:column: field.path: message`, all of them at once.

use std::collections::BTreeSet;
use std::fmt;

use hcl_edit::expr::Expression;
use hcl_edit::structure::{Body, Structure};
use hcl_edit::Span;
use serde::{Deserialize, Serialize};

/// Largest policy text accepted.
pub const MAX_POLICY_BYTES: usize = 64 * 1024;
/// Most `namespace` blocks in one policy.
pub const MAX_NAMESPACE_RULES: usize = 256;

/// A namespace capability (Nomad's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    SubmitJob,
    ReadJob,
    ListJobs,
    ReadLogs,
    AllocExec,
    /// `alloc exec` into a task of an unisolated driver (`raw_exec`): root on the node.
    AllocNodeExec,
    /// A job's task `env` in reads; without it, values read as `<redacted>`.
    ReadJobEnv,
}

impl Capability {
    pub const ALL: [Capability; 7] = [
        Capability::SubmitJob,
        Capability::ReadJob,
        Capability::ListJobs,
        Capability::ReadLogs,
        Capability::AllocExec,
        Capability::AllocNodeExec,
        Capability::ReadJobEnv,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Capability::SubmitJob => "submit-job",
            Capability::ReadJob => "read-job",
            Capability::ListJobs => "list-jobs",
            Capability::ReadLogs => "read-logs",
            Capability::AllocExec => "alloc-exec",
            Capability::AllocNodeExec => "alloc-node-exec",
            Capability::ReadJobEnv => "read-job-env",
        }
    }

    pub fn parse(s: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// What a namespace's `policy = "read"` grants.
    pub const READ: [Capability; 2] = [Capability::ListJobs, Capability::ReadJob];
    /// What `policy = "write"` grants: read, plus submitting, logs, exec and env (not
    /// `alloc-node-exec`, which is only ever granted by name).
    pub const WRITE: [Capability; 6] = [
        Capability::ListJobs,
        Capability::ReadJob,
        Capability::SubmitJob,
        Capability::ReadLogs,
        Capability::AllocExec,
        Capability::ReadJobEnv,
    ];
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Access to a namespace-less area (`node`, `operator`, `acl`). `Deny` beats everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    Read,
    Write,
    Deny,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Deny => "deny",
        }
    }
}

/// One `namespace "PATTERN" { ... }` block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceRule {
    /// The namespace name, or a pattern with `*`.
    pub pattern: String,
    /// `policy = "deny"`: nothing in matching namespaces, whatever other rules grant.
    #[serde(default)]
    pub deny: bool,
    /// The shorthand's capabilities and the listed ones.
    #[serde(default)]
    pub capabilities: BTreeSet<Capability>,
}

impl NamespaceRule {
    /// Whether `namespace` is matched by this rule's pattern (`*`: any run of characters).
    pub fn matches(&self, namespace: &str) -> bool {
        glob_match(&self.pattern, namespace)
    }
}

/// A parsed policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    #[serde(default)]
    pub namespaces: Vec<NamespaceRule>,
    #[serde(default)]
    pub node: Option<Access>,
    #[serde(default)]
    pub operator: Option<Access>,
    #[serde(default)]
    pub acl: Option<Access>,
}

/// `*` in `pattern` matches any run of characters (including none); everything else matches
/// itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    if !pattern.contains('*') {
        return pattern == name;
    }
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(at) => rest = &rest[at + mid.len()..],
            None => return false,
        }
    }
    true
}

/// One problem in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// 1-based; 0 when unknown.
    pub line: usize,
    pub column: usize,
    /// `namespace.default.capabilities[1]`; empty for syntax errors.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        } else {
            write!(f, "{}: ", self.file)?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in a policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// A policy name: 1–128 bytes of `[A-Za-z0-9_.-]`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
        return Err(format!("policy name {name:?}: must be 1 to 128 characters of letters, digits, '_', '.', '-'"));
    }
    Ok(())
}

/// Parses and validates a policy; `file` names it in problems.
pub fn parse(src: &str, file: &str) -> Result<Policy, PolicyError> {
    // hcl-edit recurses on nesting; a policy nests two levels, so anything deep is refused
    // before the parser sees it.
    let mut p = Parser::new(src, file);
    let Some(body) = p.body("the policy", MAX_POLICY_BYTES, 16) else { return p.finish(Policy::default()) };
    let policy = p.policy(&body);
    p.finish(policy)
}

/// The reader of the servers' small HCL files (ACL policies here, quota files in
/// `crate::namespace`): bounded size and nesting, every problem as `file:line:column: field:
/// message`. Each language adds its own methods.
pub(crate) struct Parser<'a> {
    src: &'a str,
    file: &'a str,
    pub(crate) problems: Vec<Problem>,
}

pub(crate) fn start(node: &impl Span) -> usize {
    node.span().map_or(0, |r| r.start)
}

impl<'a> Parser<'a> {
    pub(crate) fn new(src: &'a str, file: &'a str) -> Self {
        Parser { src, file, problems: Vec::new() }
    }

    pub(crate) fn problem(&mut self, offset: usize, path: &str, message: String) {
        let (line, column) = line_col(self.src, offset);
        self.problems.push(Problem { file: self.file.to_string(), line, column, path: path.to_string(), message });
    }

    /// The file's body: None (with the problem recorded) when it is over `max_bytes` (named
    /// `what` in the message), nested deeper than `max_depth` (hcl-edit recurses on nesting),
    /// or not HCL.
    pub(crate) fn body(&mut self, what: &str, max_bytes: usize, max_depth: usize) -> Option<Body> {
        if self.src.len() > max_bytes {
            self.problem(0, "", format!("{what} is {} bytes; at most {max_bytes}", self.src.len()));
            return None;
        }
        let mut depth = 0usize;
        for (i, c) in self.src.char_indices() {
            match c {
                '{' | '[' | '(' => {
                    depth += 1;
                    if depth > max_depth {
                        self.problem(i, "", format!("nested more than {max_depth} levels deep"));
                        return None;
                    }
                }
                '}' | ']' | ')' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        match hcl_edit::parser::parse_body(self.src) {
            Ok(b) => Some(b),
            Err(e) => {
                self.problems.push(Problem {
                    file: self.file.to_string(),
                    line: e.location().line(),
                    column: e.location().column(),
                    path: String::new(),
                    message: format!("syntax error: {}", e.message()),
                });
                None
            }
        }
    }

    /// `value`, unless a problem was found.
    pub(crate) fn finish<T>(self, value: T) -> Result<T, PolicyError> {
        if self.problems.is_empty() {
            Ok(value)
        } else {
            Err(PolicyError { problems: self.problems })
        }
    }

    fn policy(&mut self, body: &Body) -> Policy {
        let mut policy = Policy::default();
        let mut seen_ns = BTreeSet::new();
        for s in body.iter() {
            match s {
                Structure::Attribute(a) => {
                    let name = a.key.as_str();
                    self.problem(
                        start(&a.key),
                        name,
                        format!("unknown attribute {name:?}: a policy holds `namespace \"NAME\" {{...}}`, `node {{...}}`, `operator {{...}}` and `acl {{...}}` blocks"),
                    );
                }
                Structure::Block(b) => {
                    let kind = b.ident.as_str();
                    match kind {
                        "namespace" => {
                            let pattern = match b.labels.as_slice() {
                                [l] => l.as_str().to_string(),
                                _ => {
                                    self.problem(
                                        start(&b.ident),
                                        "namespace",
                                        "a namespace block takes one label: `namespace \"default\" { ... }`".into(),
                                    );
                                    continue;
                                }
                            };
                            let path = format!("namespace.{pattern}");
                            if pattern.is_empty()
                                || pattern.len() > 128
                                || !pattern.chars().all(|c| c.is_ascii_alphanumeric() || "_.-*".contains(c))
                            {
                                self.problem(
                                    start(&b.ident),
                                    &path,
                                    format!("namespace {pattern:?}: must be 1 to 128 characters of letters, digits, '_', '.', '-', or '*' (a wildcard)"),
                                );
                                continue;
                            }
                            if !seen_ns.insert(pattern.clone()) {
                                self.problem(start(&b.ident), &path, format!("namespace {pattern:?} appears twice"));
                                continue;
                            }
                            if policy.namespaces.len() >= MAX_NAMESPACE_RULES {
                                self.problem(start(&b.ident), &path, format!("more than {MAX_NAMESPACE_RULES} namespace blocks"));
                                continue;
                            }
                            let rule = self.namespace(&b.body, pattern, &path);
                            policy.namespaces.push(rule);
                        }
                        "node" | "operator" | "acl" => {
                            if let Some(l) = b.labels.first() {
                                self.problem(start(l), kind, format!("a {kind} block takes no labels"));
                            }
                            let access = self.area(&b.body, kind);
                            let slot = match kind {
                                "node" => &mut policy.node,
                                "operator" => &mut policy.operator,
                                _ => &mut policy.acl,
                            };
                            if slot.is_some() {
                                self.problem(start(&b.ident), kind, format!("{kind} appears twice"));
                            }
                            *slot = access;
                        }
                        other => self.problem(
                            start(&b.ident),
                            other,
                            format!("unknown block {other:?}: a policy holds namespace, node, operator and acl blocks"),
                        ),
                    }
                }
            }
        }
        policy
    }

    fn string(&mut self, expr: &Expression, path: &str) -> Option<String> {
        match expr {
            Expression::String(s) => Some(s.value().to_string()),
            _ => {
                self.problem(start(expr), path, "must be a string in double quotes".into());
                None
            }
        }
    }

    fn access(&mut self, expr: &Expression, path: &str) -> Option<Access> {
        let v = self.string(expr, path)?;
        match v.as_str() {
            "read" => Some(Access::Read),
            "write" => Some(Access::Write),
            "deny" => Some(Access::Deny),
            other => {
                self.problem(start(expr), path, format!("{other:?} is not a policy: use \"read\", \"write\" or \"deny\""));
                None
            }
        }
    }

    fn namespace(&mut self, body: &Body, pattern: String, path: &str) -> NamespaceRule {
        let mut rule = NamespaceRule { pattern, deny: false, capabilities: BTreeSet::new() };
        for s in body.iter() {
            match s {
                Structure::Attribute(a) if a.key.as_str() == "policy" => {
                    let at = format!("{path}.policy");
                    match self.access(&a.value, &at) {
                        Some(Access::Read) => rule.capabilities.extend(Capability::READ),
                        Some(Access::Write) => rule.capabilities.extend(Capability::WRITE),
                        Some(Access::Deny) => rule.deny = true,
                        None => {}
                    }
                }
                Structure::Attribute(a) if a.key.as_str() == "capabilities" => {
                    let at = format!("{path}.capabilities");
                    let Expression::Array(items) = &a.value else {
                        self.problem(start(&a.value), &at, "must be a list of strings: [\"read-job\", ...]".into());
                        continue;
                    };
                    for (i, item) in items.iter().enumerate() {
                        let at = format!("{at}[{i}]");
                        let Some(name) = self.string(item, &at) else { continue };
                        if name == "deny" {
                            rule.deny = true;
                            continue;
                        }
                        match Capability::parse(&name) {
                            Some(c) => {
                                rule.capabilities.insert(c);
                            }
                            None => {
                                let known: Vec<&str> = Capability::ALL.iter().map(|c| c.as_str()).collect();
                                self.problem(start(item), &at, format!("unknown capability {name:?} (known: {}, deny)", known.join(", ")));
                            }
                        }
                    }
                }
                Structure::Attribute(a) => {
                    let name = a.key.as_str();
                    self.problem(start(&a.key), &format!("{path}.{name}"), format!("unknown field {name:?} (policy, capabilities)"));
                }
                Structure::Block(b) => {
                    let name = b.ident.as_str();
                    self.problem(start(&b.ident), &format!("{path}.{name}"), format!("unknown block {name:?} (policy, capabilities)"));
                }
            }
        }
        rule
    }

    fn area(&mut self, body: &Body, kind: &str) -> Option<Access> {
        let mut access = None;
        for s in body.iter() {
            match s {
                Structure::Attribute(a) if a.key.as_str() == "policy" => access = self.access(&a.value, &format!("{kind}.policy")),
                Structure::Attribute(a) => {
                    let name = a.key.as_str();
                    self.problem(start(&a.key), &format!("{kind}.{name}"), format!("unknown field {name:?} (policy)"));
                }
                Structure::Block(b) => {
                    let name = b.ident.as_str();
                    self.problem(start(&b.ident), &format!("{kind}.{name}"), format!("unknown block {name:?} (policy)"));
                }
            }
        }
        if access.is_none() && !self.problems.iter().any(|p| p.path.starts_with(&format!("{kind}."))) {
            self.problem(0, kind, format!("the {kind} block needs `policy = \"read\" | \"write\" | \"deny\"`"));
        }
        access
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = src.get(..offset).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_shorthands_capabilities_and_areas() {
        let src = r#"
namespace "default" {
  policy = "read"
  capabilities = ["read-logs", "alloc-node-exec"]
}
namespace "team-*" { policy = "write" }
namespace "secret" { policy = "deny" }
node { policy = "read" }
operator { policy = "write" }
"#;
        let p = parse(src, "p.hcl").expect("parses");
        assert_eq!(p.namespaces.len(), 3);
        let d = &p.namespaces[0];
        assert_eq!(
            d.capabilities,
            [Capability::ListJobs, Capability::ReadJob, Capability::ReadLogs, Capability::AllocNodeExec].into_iter().collect()
        );
        assert!(p.namespaces[1].capabilities.contains(&Capability::SubmitJob));
        assert!(!p.namespaces[1].capabilities.contains(&Capability::AllocNodeExec));
        assert!(p.namespaces[2].deny);
        assert_eq!(p.node, Some(Access::Read));
        assert_eq!(p.operator, Some(Access::Write));
        assert_eq!(p.acl, None);
    }

    #[test]
    fn every_problem_names_file_line_column_and_field() {
        let src = "namespace \"default\" {\n  policy = \"admin\"\n  capabilities = [\"read-job\", \"sudo\"]\n  color = 1\n}\nnode { policy = read }\nwhat {}\n";
        let err = parse(src, "bad.hcl").expect_err("refused");
        let text = err.to_string();
        assert!(text.contains("bad.hcl:2:12: namespace.default.policy: \"admin\" is not a policy"), "{text}");
        assert!(text.contains("bad.hcl:3:31: namespace.default.capabilities[1]: unknown capability \"sudo\""), "{text}");
        assert!(text.contains("bad.hcl:4:3: namespace.default.color: unknown field"), "{text}");
        assert!(text.contains("bad.hcl:6:17: node.policy: must be a string"), "{text}");
        assert!(text.contains("bad.hcl:7:1: what: unknown block"), "{text}");
    }

    #[test]
    fn syntax_errors_and_bad_labels_are_located() {
        let err = parse("namespace \"a\" {\n policy = \n", "s.hcl").expect_err("refused");
        assert!(err.to_string().starts_with("s.hcl:"), "{err}");
        assert!(err.to_string().contains("syntax error"), "{err}");
        let err = parse("namespace { policy = \"read\" }\n", "l.hcl").expect_err("refused");
        assert!(err.to_string().contains("l.hcl:1:1: namespace: a namespace block takes one label"), "{err}");
        let err = parse("namespace \"a b\" { policy = \"read\" }\n", "l.hcl").expect_err("refused");
        assert!(err.to_string().contains("must be 1 to 128 characters"), "{err}");
        let err = parse("node {}\n", "n.hcl").expect_err("refused");
        assert!(err.to_string().contains("node: the node block needs `policy"), "{err}");
        let deep = "namespace \"a\" { capabilities = ".to_string() + &"[".repeat(40);
        assert!(parse(&deep, "d.hcl").expect_err("refused").to_string().contains("nested more than 16"));
    }

    #[test]
    fn globs() {
        assert!(glob_match("default", "default"));
        assert!(!glob_match("default", "default2"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("team-*", "team-a"));
        assert!(glob_match("team-*", "team-"));
        assert!(!glob_match("team-*", "tea"));
        assert!(glob_match("*-prod", "ml-prod"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxcyyb"));
        assert!(!glob_match("ab*ba", "aba"));
    }
}
