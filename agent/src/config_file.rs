//! The daemons' configuration file (issue 15 §1, §2, §4): HCL in the shape of Nomad's agent
//! configuration: a `client` block (the agent's settings), a `tls` block (the daemon's mutual-TLS
//! identity, as `--ca-file`, `--cert-file`, `--key-file`) and an `acl` block (as
//! `--acl-enabled`). Which blocks a file may hold depends on who reads it ([`Reader`]): `mlp
//! agent` reads `client` and `tls`, `mlp server` reads `tls` and `acl`, `mlp dev` all three; a
//! block its reader would not use is refused, never ignored.
//!
//! ```hcl
//! tls {                               # all three files or none; relative paths are
//!   ca_file   = "mlp-ca.pem"          # resolved against this file's directory
//!   cert_file = "mlp-server.pem"
//!   key_file  = "mlp-server-key.pem"
//! }
//! acl {
//!   enabled = true
//! }
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
//! command line win over the file (each TLS flag over its own field). Each block appears at
//! most once. Problems are reported as `file:line:column: field: message`, all at once.

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

/// Which command reads a configuration file; it decides which top-level blocks are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// `mlp server`: `tls`, `acl`.
    Server,
    /// `mlp agent`: `client`, `tls`.
    Agent,
    /// `mlp dev` (a server and an agent in one): `client`, `tls`, `acl`.
    Dev,
}

impl Reader {
    fn blocks(self) -> &'static [&'static str] {
        match self {
            Reader::Server => &["tls", "acl"],
            Reader::Agent => &["client", "tls"],
            Reader::Dev => &["client", "tls", "acl"],
        }
    }

    fn command(self) -> &'static str {
        match self {
            Reader::Server => "mlp server",
            Reader::Agent => "mlp agent",
            Reader::Dev => "mlp dev",
        }
    }
}

/// A file named by the configuration file, resolved against the file's directory, with where it
/// was written (for messages about it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedFile {
    pub path: PathBuf,
    /// `file:line:column: tls.FIELD`.
    pub origin: String,
}

/// The `tls` block: all three files, each present on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSection {
    pub ca_file: NamedFile,
    pub cert_file: NamedFile,
    pub key_file: NamedFile,
}

/// What a configuration file says (`None`: not set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileConfig {
    /// `tls { ca_file cert_file key_file }` (`None`: no block, or an empty one).
    pub tls: Option<TlsSection>,
    /// `acl { enabled = BOOL }`.
    pub acl_enabled: Option<bool>,
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

/// Reads and checks an agent's configuration file (as [`load_for`] with [`Reader::Agent`]).
pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    load_for(path, Reader::Agent)
}

/// Reads and checks a configuration file for `reader`; relative paths in it are resolved
/// against its directory.
pub fn load_for(path: &Path, reader: Reader) -> Result<FileConfig, ConfigError> {
    let file = path.display().to_string();
    let one =
        |message: String| ConfigError { file: file.clone(), problems: vec![Problem { line: 0, column: 0, path: String::new(), message }] };
    let meta = std::fs::metadata(path).map_err(|e| one(format!("cannot read: {e}")))?;
    if meta.len() > MAX_CONFIG_BYTES as u64 {
        return Err(one(format!("{} bytes; at most {MAX_CONFIG_BYTES}", meta.len())));
    }
    let src = std::fs::read_to_string(path).map_err(|e| one(format!("cannot read: {e}")))?;
    let base = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    parse_for(&src, &file, base, reader)
}

/// Parses and checks an agent's configuration text (as [`parse_for`] with [`Reader::Agent`],
/// relative TLS paths against the current directory).
pub fn parse(src: &str, file: &str) -> Result<FileConfig, ConfigError> {
    parse_for(src, file, Path::new("."), Reader::Agent)
}

/// Parses and checks configuration text read by `reader`; `file` names it in problems, `base`
/// is the directory relative TLS file paths are resolved against. The `client` block's paths
/// must be absolute; host volume paths and TLS files must exist.
pub fn parse_for(src: &str, file: &str, base: &Path, reader: Reader) -> Result<FileConfig, ConfigError> {
    let mut p = Parser { src, file, base, problems: Vec::new() };
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
    let allowed = reader.blocks();
    let holds = allowed.iter().map(|b| format!("`{b} {{ ... }}`")).collect::<Vec<_>>().join(", ");
    let mut seen: Vec<&str> = Vec::new();
    for s in body.iter() {
        match s {
            Structure::Block(b) if allowed.contains(&b.ident.as_str()) => {
                let name = b.ident.as_str();
                if !b.labels.is_empty() {
                    p.problem(start(&b.ident), name, format!("a {name} block takes no label: {name} {{ ... }}"));
                    continue;
                }
                if seen.contains(&name) {
                    p.problem(start(&b.ident), name, format!("the {name} block appears twice"));
                    continue;
                }
                seen.push(name);
                match name {
                    "client" => p.client(&b.body, &mut cfg),
                    "tls" => p.tls(&b.body, start(&b.ident), &mut cfg),
                    _ => p.acl(&b.body, &mut cfg),
                }
            }
            Structure::Block(b) => {
                let name = b.ident.as_str();
                let why = match name {
                    "client" => format!(
                        "a `client` block configures an agent, and {} runs none (give it to mlp agent or mlp dev)",
                        reader.command()
                    ),
                    "acl" => format!(
                        "ACLs are enforced by the servers; {} has no ACL setting (give the acl block to mlp server or mlp dev)",
                        reader.command()
                    ),
                    "server" => format!("mlp server's settings are its flags; {} reads {holds}", reader.command()),
                    _ => format!("{} reads {holds}", reader.command()),
                };
                p.problem(start(&b.ident), name, format!("unknown block {name:?}: {why}"));
            }
            Structure::Attribute(a) => {
                let name = a.key.as_str();
                p.problem(start(&a.key), name, format!("unknown attribute {name:?}: {} reads {holds}", reader.command()));
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
    file: &'a str,
    base: &'a Path,
    problems: Vec<Problem>,
}

fn start(node: &impl Span) -> usize {
    node.span().map_or(0, |r| r.start)
}

fn user_ok(u: &str) -> bool {
    !u.is_empty() && u.len() <= 32 && u.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

impl Parser<'_> {
    fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.src.len());
        let before = self.src.get(..offset).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, column)
    }

    fn problem(&mut self, offset: usize, path: &str, message: String) {
        let (line, column) = self.position(offset);
        self.problems.push(Problem { line, column, path: path.to_string(), message });
    }

    /// `tls { ca_file cert_file key_file }`: all three or none, each an existing file.
    fn tls(&mut self, body: &Body, at: usize, cfg: &mut FileConfig) {
        const FIELDS: [&str; 3] = ["ca_file", "cert_file", "key_file"];
        let mut found: [Option<NamedFile>; 3] = [None, None, None];
        let mut named = [false; 3];
        for s in body.iter() {
            match s {
                Structure::Attribute(a) => {
                    let name = a.key.as_str();
                    let path = format!("tls.{name}");
                    let Some(i) = FIELDS.iter().position(|f| *f == name) else {
                        let why = if matches!(name, "rpc" | "http") {
                            "; mlp's TLS always covers both RPC and HTTP, there is nothing to turn on or off"
                        } else {
                            ""
                        };
                        self.problem(start(&a.key), &path, format!("unknown field {name:?} (ca_file, cert_file, key_file){why}"));
                        continue;
                    };
                    named[i] = true;
                    let Some(v) = self.string(&a.value, &path) else { continue };
                    if v.is_empty() {
                        self.problem(start(&a.value), &path, "must name a file".into());
                        continue;
                    }
                    let resolved = self.base.join(&v);
                    if !resolved.is_file() {
                        let shown = if Path::new(&v).is_absolute() { v.clone() } else { format!("{v} ({})", resolved.display()) };
                        self.problem(start(&a.value), &path, format!("{shown}: no such file"));
                        continue;
                    }
                    let (line, column) = self.position(start(&a.value));
                    found[i] = Some(NamedFile { path: resolved, origin: format!("{}:{line}:{column}: {path}", self.file) });
                }
                Structure::Block(b) => {
                    let f = b.ident.as_str();
                    self.problem(start(&b.ident), &format!("tls.{f}"), format!("unknown block {f:?} (ca_file, cert_file, key_file)"));
                }
            }
        }
        if named.iter().any(|n| *n) && !named.iter().all(|n| *n) {
            let missing: Vec<&str> = FIELDS.iter().zip(named).filter(|(_, n)| !n).map(|(f, _)| *f).collect();
            self.problem(at, "tls", format!("mutual TLS needs a CA, a certificate and a key: missing {}", missing.join(", ")));
            return;
        }
        if let [Some(ca_file), Some(cert_file), Some(key_file)] = found {
            cfg.tls = Some(TlsSection { ca_file, cert_file, key_file });
        }
    }

    /// `acl { enabled = BOOL }`.
    fn acl(&mut self, body: &Body, cfg: &mut FileConfig) {
        // hcl-edit refuses an attribute given twice in one body.
        for s in body.iter() {
            match s {
                Structure::Attribute(a) if a.key.as_str() == "enabled" => {
                    cfg.acl_enabled = self.bool(&a.value, "acl.enabled");
                }
                Structure::Attribute(a) => {
                    let f = a.key.as_str();
                    self.problem(start(&a.key), &format!("acl.{f}"), format!("unknown field {f:?} (enabled)"));
                }
                Structure::Block(b) => {
                    let f = b.ident.as_str();
                    self.problem(start(&b.ident), &format!("acl.{f}"), format!("unknown block {f:?} (enabled)"));
                }
            }
        }
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

    /// A directory with three (empty) files named as `mlp tls` names them.
    fn tls_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            std::fs::write(dir.path().join(f), "").expect("write");
        }
        dir
    }

    #[test]
    fn parses_tls_and_acl_blocks_with_paths_relative_to_the_file() {
        let dir = tls_dir();
        let abs = dir.path().join("key.pem");
        let src = format!(
            "tls {{\n  ca_file   = \"ca.pem\"\n  cert_file = \"./cert.pem\"\n  key_file  = \"{}\"\n}}\nacl {{\n  enabled = true\n}}\n",
            abs.display()
        );
        let c = parse_for(&src, "dev.hcl", dir.path(), Reader::Dev).expect("parses");
        let tls = c.tls.expect("a tls section");
        assert_eq!(tls.ca_file.path, dir.path().join("ca.pem"));
        assert_eq!(tls.cert_file.path, dir.path().join("./cert.pem"));
        assert_eq!(tls.key_file.path, abs);
        assert_eq!(tls.cert_file.origin, "dev.hcl:3:15: tls.cert_file");
        assert_eq!(c.acl_enabled, Some(true));
        // The server reads the same blocks; an empty tls block is no TLS.
        let c = parse_for(&src, "server.hcl", dir.path(), Reader::Server).expect("parses");
        assert!(c.tls.is_some() && c.acl_enabled == Some(true));
        let c = parse_for("tls {}\nacl { enabled = false }\n", "s.hcl", dir.path(), Reader::Server).expect("parses");
        assert_eq!((c.tls, c.acl_enabled), (None, Some(false)));
        // load_for resolves against the file's own directory, not the working directory.
        let file = dir.path().join("server.hcl");
        std::fs::write(&file, "tls {\n ca_file = \"ca.pem\"\n cert_file = \"cert.pem\"\n key_file = \"key.pem\"\n}\n").expect("write");
        let c = load_for(&file, Reader::Server).expect("loads");
        assert_eq!(c.tls.expect("tls").ca_file.path, dir.path().join("ca.pem"));
    }

    #[test]
    fn tls_and_acl_problems_name_file_line_column_and_field() {
        let dir = tls_dir();
        let src = "tls {\n  ca_file = \"ca.pem\"\n  cert_file = \"gone.pem\"\n  rpc = true\n}\nacl {\n  enabled = \"yes\"\n  token_ttl = \"30s\"\n}\n";
        let err = parse_for(src, "dev.hcl", dir.path(), Reader::Dev).expect_err("refused").to_string();
        let gone = dir.path().join("gone.pem");
        assert!(err.contains(&format!("dev.hcl:3:15: tls.cert_file: gone.pem ({}): no such file", gone.display())), "{err}");
        assert!(
            err.contains("dev.hcl:4:3: tls.rpc: unknown field \"rpc\" (ca_file, cert_file, key_file); mlp's TLS always covers both"),
            "{err}"
        );
        assert!(err.contains("dev.hcl:1:1: tls: mutual TLS needs a CA, a certificate and a key: missing key_file"), "{err}");
        assert!(err.contains("dev.hcl:7:13: acl.enabled: must be true or false"), "{err}");
        assert!(err.contains("dev.hcl:8:3: acl.token_ttl: unknown field"), "{err}");
        assert_eq!(err.lines().count(), 5, "{err}");
        // Who reads the file decides which blocks it may hold; none is silently ignored.
        let src = "client {}\nacl { enabled = true }\nserver {}\ntls \"x\" {}\nacl {}\n";
        let err = parse_for(src, "s.hcl", dir.path(), Reader::Server).expect_err("refused").to_string();
        assert!(
            err.contains("s.hcl:1:1: client: unknown block \"client\": a `client` block configures an agent, and mlp server runs none"),
            "{err}"
        );
        assert!(err.contains("s.hcl:3:1: server: unknown block \"server\": mlp server's settings are its flags"), "{err}");
        assert!(err.contains("s.hcl:4:1: tls: a tls block takes no label"), "{err}");
        assert!(err.contains("s.hcl:5:1: acl: the acl block appears twice"), "{err}");
        let err = parse_for("acl { enabled = true }\n", "a.hcl", dir.path(), Reader::Agent).expect_err("refused").to_string();
        assert!(
            err.contains("a.hcl:1:1: acl: unknown block \"acl\": ACLs are enforced by the servers; mlp agent has no ACL setting"),
            "{err}"
        );
        let err = parse_for("tls {\n  cert_file = \"cert.pem\"\n}\n", "a.hcl", dir.path(), Reader::Agent).expect_err("refused").to_string();
        assert_eq!(err, "a.hcl:1:1: tls: mutual TLS needs a CA, a certificate and a key: missing ca_file, key_file");
    }
}
