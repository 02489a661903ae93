//! The agent's configuration file (issue 15 §4): HCL in the shape of Nomad's `client` block.
//!
//! ```hcl
//! client {
//!   drivers {
//!     raw_exec { enabled = true }    # off unless enabled here or by --enable-raw-exec
//!     exec     { enabled = true }
//!     wasm     { enabled = false }
//!     oci      { enabled = true }
//!   }
//!   refused_users = ["root"]          # users exec/oci tasks may not run as
//!   host_volume "datasets" {
//!     path      = "/srv/datasets"
//!     read_only = true
//!   }
//!   isolation {                       # the exec driver's settings (the --exec-* flags)
//!     default_user   = "nobody"
//!     default_pids   = 4096
//!     pids_max       = 100000
//!     bind_read_only = ["/opt/tools"]
//!     hide           = ["/usr/local"]
//!   }
//! }
//! ```
//!
//! Everything is optional; what the file leaves out keeps its default, and flags given on the
//! command line win over the file. Problems are reported as `file:line:column: field: message`,
//! all at once.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use hcl_edit::expr::Expression;
use hcl_edit::structure::{Body, Structure};
use hcl_edit::Span;

/// Largest configuration file read.
pub const MAX_CONFIG_BYTES: usize = 256 * 1024;

/// Drivers the file may name.
pub const KNOWN_DRIVERS: [&str; 4] =
    [mlp_proto::consts::driver::EXEC, mlp_proto::consts::driver::RAW_EXEC, mlp_proto::consts::driver::WASM, mlp_proto::consts::driver::OCI];

/// A host directory offered to tasks by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVolume {
    pub path: PathBuf,
    pub read_only: bool,
}

/// What a configuration file says (`None`: not set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileConfig {
    /// `drivers { NAME { enabled = BOOL } }`.
    pub drivers: BTreeMap<String, bool>,
    pub refused_users: Option<Vec<String>>,
    pub host_volumes: BTreeMap<String, HostVolume>,
    pub default_user: Option<String>,
    pub default_pids: Option<u64>,
    pub pids_max: Option<u64>,
    pub bind_read_only: Option<Vec<PathBuf>>,
    pub hide: Option<Vec<PathBuf>>,
}

impl FileConfig {
    /// The drivers to offer: the defaults (`exec`, `wasm`, `oci`; `raw_exec` only when
    /// `raw_exec_default` says so), changed by the file's `enabled` settings.
    pub fn drivers_enabled(&self, raw_exec_default: bool) -> Vec<String> {
        KNOWN_DRIVERS
            .iter()
            .filter(|d| {
                let default = **d != mlp_proto::consts::driver::RAW_EXEC || raw_exec_default;
                self.drivers.get(**d).copied().unwrap_or(default)
            })
            .map(|d| d.to_string())
            .collect()
    }
}

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub path: String,
    pub message: String,
}

/// Every problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            if p.line > 0 {
                write!(f, "{}:{}:{}: ", self.file, p.line, p.column)?;
            } else {
                write!(f, "{}: ", self.file)?;
            }
            if !p.path.is_empty() {
                write!(f, "{}: ", p.path)?;
            }
            f.write_str(&p.message)?;
        }
        Ok(())
    }
}

/// Reads and checks a configuration file.
pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    let file = path.display().to_string();
    let one =
        |message: String| ConfigError { file: file.clone(), problems: vec![Problem { line: 0, column: 0, path: String::new(), message }] };
    let meta = std::fs::metadata(path).map_err(|e| one(format!("cannot read: {e}")))?;
    if meta.len() > MAX_CONFIG_BYTES as u64 {
        return Err(one(format!("{} bytes; at most {MAX_CONFIG_BYTES}", meta.len())));
    }
    let src = std::fs::read_to_string(path).map_err(|e| one(format!("cannot read: {e}")))?;
    parse(&src, &file)
}

/// Parses and checks configuration text; `file` names it in problems. Paths must be absolute;
/// host volume paths must exist.
pub fn parse(src: &str, file: &str) -> Result<FileConfig, ConfigError> {
    let mut p = Parser { src, problems: Vec::new() };
    let err = |problems| ConfigError { file: file.to_string(), problems };
    if src.len() > MAX_CONFIG_BYTES {
        p.problem(0, "", format!("{} bytes; at most {MAX_CONFIG_BYTES}", src.len()));
        return Err(err(p.problems));
    }
    let mut depth = 0usize;
    for (i, c) in src.char_indices() {
        match c {
            '{' | '[' | '(' => {
                depth += 1;
                if depth > 16 {
                    p.problem(i, "", "nested more than 16 levels deep".into());
                    return Err(err(p.problems));
                }
            }
            '}' | ']' | ')' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    let body = match hcl_edit::parser::parse_body(src) {
        Ok(b) => b,
        Err(e) => {
            return Err(err(vec![Problem {
                line: e.location().line(),
                column: e.location().column(),
                path: String::new(),
                message: format!("syntax error: {}", e.message()),
            }]))
        }
    };
    let mut cfg = FileConfig::default();
    for s in body.iter() {
        match s {
            Structure::Block(b) if b.ident.as_str() == "client" && b.labels.is_empty() => p.client(&b.body, &mut cfg),
            Structure::Block(b) => {
                let name = b.ident.as_str();
                p.problem(start(&b.ident), name, format!("unknown block {name:?}: the file holds one `client {{ ... }}` block"));
            }
            Structure::Attribute(a) => {
                let name = a.key.as_str();
                p.problem(start(&a.key), name, format!("unknown attribute {name:?}: the file holds one `client {{ ... }}` block"));
            }
        }
    }
    if p.problems.is_empty() {
        Ok(cfg)
    } else {
        Err(err(p.problems))
    }
}

struct Parser<'a> {
    src: &'a str,
    problems: Vec<Problem>,
}

fn start(node: &impl Span) -> usize {
    node.span().map_or(0, |r| r.start)
}

fn user_ok(u: &str) -> bool {
    !u.is_empty() && u.len() <= 32 && u.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

impl Parser<'_> {
    fn problem(&mut self, offset: usize, path: &str, message: String) {
        let offset = offset.min(self.src.len());
        let before = self.src.get(..offset).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        self.problems.push(Problem { line, column, path: path.to_string(), message });
    }

    fn string(&mut self, e: &Expression, path: &str) -> Option<String> {
        match e {
            Expression::String(s) => Some(s.value().to_string()),
            _ => {
                self.problem(start(e), path, "must be a string in double quotes".into());
                None
            }
        }
    }

    fn bool(&mut self, e: &Expression, path: &str) -> Option<bool> {
        match e {
            Expression::Bool(b) => Some(*b.value()),
            _ => {
                self.problem(start(e), path, "must be true or false".into());
                None
            }
        }
    }

    fn number(&mut self, e: &Expression, path: &str) -> Option<u64> {
        match e {
            Expression::Number(n) => match n.value().as_u64() {
                Some(v) if v > 0 => Some(v),
                _ => {
                    self.problem(start(e), path, "must be a whole number of at least 1".into());
                    None
                }
            },
            _ => {
                self.problem(start(e), path, "must be a number".into());
                None
            }
        }
    }

    fn strings(&mut self, e: &Expression, path: &str) -> Option<Vec<(usize, String)>> {
        let Expression::Array(items) = e else {
            self.problem(start(e), path, "must be a list of strings: [\"...\"]".into());
            return None;
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if let Some(s) = self.string(item, &format!("{path}[{i}]")) {
                out.push((start(item), s));
            }
        }
        Some(out)
    }

    fn paths(&mut self, e: &Expression, path: &str) -> Option<Vec<PathBuf>> {
        let items = self.strings(e, path)?;
        let mut out = Vec::new();
        for (i, (at, s)) in items.into_iter().enumerate() {
            let p = PathBuf::from(&s);
            if !p.is_absolute() {
                self.problem(at, &format!("{path}[{i}]"), format!("{s:?} must be an absolute path"));
                continue;
            }
            out.push(p);
        }
        Some(out)
    }

    fn client(&mut self, body: &Body, cfg: &mut FileConfig) {
        for s in body.iter() {
            match s {
                Structure::Attribute(a) if a.key.as_str() == "refused_users" => {
                    let path = "client.refused_users";
                    if let Some(users) = self.strings(&a.value, path) {
                        let mut ok = Vec::new();
                        for (i, (at, u)) in users.into_iter().enumerate() {
                            if user_ok(&u) {
                                ok.push(u);
                            } else {
                                self.problem(at, &format!("{path}[{i}]"), format!("{u:?} is not a user name"));
                            }
                        }
                        cfg.refused_users = Some(ok);
                    }
                }
                Structure::Block(b) if b.ident.as_str() == "drivers" => self.drivers(&b.body, cfg),
                Structure::Block(b) if b.ident.as_str() == "isolation" => self.isolation(&b.body, cfg),
                Structure::Block(b) if b.ident.as_str() == "host_volume" => {
                    let [label] = b.labels.as_slice() else {
                        self.problem(
                            start(&b.ident),
                            "client.host_volume",
                            "a host_volume block takes one label: host_volume \"NAME\" { ... }".into(),
                        );
                        continue;
                    };
                    let name = label.as_str().to_string();
                    let path = format!("client.host_volume.{name}");
                    if name.is_empty() || name.len() > 128 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
                        self.problem(start(label), &path, format!("{name:?}: a volume name is 1 to 128 letters, digits, '_', '.', '-'"));
                        continue;
                    }
                    if cfg.host_volumes.contains_key(&name) {
                        self.problem(start(label), &path, format!("host volume {name:?} appears twice"));
                        continue;
                    }
                    if let Some(v) = self.host_volume(&b.body, &path, start(&b.ident)) {
                        cfg.host_volumes.insert(name, v);
                    }
                }
                Structure::Attribute(a) => {
                    let name = a.key.as_str();
                    self.problem(
                        start(&a.key),
                        &format!("client.{name}"),
                        format!("unknown field {name:?} (refused_users, drivers, host_volume, isolation)"),
                    );
                }
                Structure::Block(b) => {
                    let name = b.ident.as_str();
                    self.problem(
                        start(&b.ident),
                        &format!("client.{name}"),
                        format!("unknown block {name:?} (drivers, host_volume, isolation)"),
                    );
                }
            }
        }
    }

    fn drivers(&mut self, body: &Body, cfg: &mut FileConfig) {
        for s in body.iter() {
            let Structure::Block(b) = s else {
                if let Structure::Attribute(a) = s {
                    let name = a.key.as_str();
                    self.problem(
                        start(&a.key),
                        &format!("client.drivers.{name}"),
                        format!("{name:?} must be a block: {name} {{ enabled = true }}"),
                    );
                }
                continue;
            };
            let name = b.ident.as_str();
            let path = format!("client.drivers.{name}");
            if !KNOWN_DRIVERS.contains(&name) {
                self.problem(start(&b.ident), &path, format!("unknown driver {name:?} (known: {})", KNOWN_DRIVERS.join(", ")));
                continue;
            }
            for s in b.body.iter() {
                match s {
                    Structure::Attribute(a) if a.key.as_str() == "enabled" => {
                        if let Some(v) = self.bool(&a.value, &format!("{path}.enabled")) {
                            cfg.drivers.insert(name.to_string(), v);
                        }
                    }
                    Structure::Attribute(a) => {
                        let f = a.key.as_str();
                        self.problem(start(&a.key), &format!("{path}.{f}"), format!("unknown field {f:?} (enabled)"));
                    }
                    Structure::Block(x) => {
                        let f = x.ident.as_str();
                        self.problem(start(&x.ident), &format!("{path}.{f}"), format!("unknown block {f:?} (enabled)"));
                    }
                }
            }
        }
    }

    fn host_volume(&mut self, body: &Body, path: &str, at: usize) -> Option<HostVolume> {
        let mut vol_path = None;
        let mut read_only = false;
        for s in body.iter() {
            match s {
                Structure::Attribute(a) if a.key.as_str() == "path" => {
                    let f = format!("{path}.path");
                    if let Some(p) = self.string(&a.value, &f) {
                        let pb = PathBuf::from(&p);
                        if !pb.is_absolute() {
                            self.problem(start(&a.value), &f, format!("{p:?} must be an absolute path"));
                        } else if !pb.is_dir() {
                            self.problem(start(&a.value), &f, format!("{p:?} is not a directory on this host"));
                        } else {
                            vol_path = Some(pb);
                        }
                    }
                }
                Structure::Attribute(a) if a.key.as_str() == "read_only" => {
                    read_only = self.bool(&a.value, &format!("{path}.read_only")).unwrap_or(false);
                }
                Structure::Attribute(a) => {
                    let f = a.key.as_str();
                    self.problem(start(&a.key), &format!("{path}.{f}"), format!("unknown field {f:?} (path, read_only)"));
                }
                Structure::Block(b) => {
                    let f = b.ident.as_str();
                    self.problem(start(&b.ident), &format!("{path}.{f}"), format!("unknown block {f:?} (path, read_only)"));
                }
            }
        }
        if vol_path.is_none() && !self.problems.iter().any(|p| p.path.starts_with(path)) {
            self.problem(at, path, "a host volume needs `path`".into());
        }
        vol_path.map(|p| HostVolume { path: p, read_only })
    }

    fn isolation(&mut self, body: &Body, cfg: &mut FileConfig) {
        for s in body.iter() {
            match s {
                Structure::Attribute(a) => {
                    let name = a.key.as_str();
                    let path = format!("client.isolation.{name}");
                    match name {
                        "default_user" => {
                            if let Some(u) = self.string(&a.value, &path) {
                                if user_ok(&u) {
                                    cfg.default_user = Some(u);
                                } else {
                                    self.problem(start(&a.value), &path, format!("{u:?} is not a user name"));
                                }
                            }
                        }
                        "default_pids" => cfg.default_pids = self.number(&a.value, &path),
                        "pids_max" => cfg.pids_max = self.number(&a.value, &path),
                        "bind_read_only" => cfg.bind_read_only = self.paths(&a.value, &path),
                        "hide" => cfg.hide = self.paths(&a.value, &path),
                        other => self.problem(
                            start(&a.key),
                            &path,
                            format!("unknown field {other:?} (default_user, default_pids, pids_max, bind_read_only, hide)"),
                        ),
                    }
                }
                Structure::Block(b) => {
                    let f = b.ident.as_str();
                    self.problem(start(&b.ident), &format!("client.isolation.{f}"), format!("unknown block {f:?}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_client_block() {
        let src = r#"
client {
  drivers {
    raw_exec { enabled = true }
    wasm { enabled = false }
  }
  refused_users = ["root", "admin"]
  host_volume "tmp" {
    path = "/tmp"
    read_only = true
  }
  isolation {
    default_user = "nobody"
    default_pids = 100
    pids_max = 1000
    bind_read_only = ["/opt"]
    hide = ["/usr/local"]
  }
}
"#;
        let c = parse(src, "agent.hcl").expect("parses");
        assert_eq!(c.drivers_enabled(false), ["exec", "raw_exec", "oci"]);
        assert_eq!(c.refused_users, Some(vec!["root".to_string(), "admin".to_string()]));
        assert_eq!(c.host_volumes["tmp"], HostVolume { path: "/tmp".into(), read_only: true });
        assert_eq!((c.default_pids, c.pids_max), (Some(100), Some(1000)));
        assert_eq!(c.hide, Some(vec![PathBuf::from("/usr/local")]));
        assert_eq!(FileConfig::default().drivers_enabled(false), ["exec", "wasm", "oci"], "raw_exec is off by default");
        assert_eq!(FileConfig::default().drivers_enabled(true), ["exec", "raw_exec", "wasm", "oci"]);
        let off = parse("client {\n drivers {\n raw_exec { enabled = false }\n }\n}\n", "a.hcl").expect("parses");
        assert_eq!(off.drivers_enabled(true), ["exec", "wasm", "oci"]);
    }

    #[test]
    fn problems_name_file_line_column_and_field() {
        let src = "client {\n  drivers {\n    docker { enabled = true }\n    raw_exec { enabled = \"yes\" }\n  }\n  refused_users = [\"ro ot\"]\n  host_volume \"v\" { path = \"relative\" }\n  colour = 1\n}\nserver {}\n";
        let err = parse(src, "agent.hcl").expect_err("refused").to_string();
        assert!(err.contains("agent.hcl:3:5: client.drivers.docker: unknown driver \"docker\""), "{err}");
        assert!(err.contains("agent.hcl:4:26: client.drivers.raw_exec.enabled: must be true or false"), "{err}");
        assert!(err.contains("agent.hcl:6:20: client.refused_users[0]: \"ro ot\" is not a user name"), "{err}");
        assert!(err.contains("agent.hcl:7:28: client.host_volume.v.path: \"relative\" must be an absolute path"), "{err}");
        assert!(err.contains("agent.hcl:8:3: client.colour: unknown field"), "{err}");
        assert!(err.contains("agent.hcl:10:1: server: unknown block"), "{err}");
        let err = parse("client {\n", "s.hcl").expect_err("refused").to_string();
        assert!(err.starts_with("s.hcl:") && err.contains("syntax error"), "{err}");
    }
}
