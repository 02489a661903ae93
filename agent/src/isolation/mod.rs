//! Workload isolation for the `exec` driver: namespaces, a per-task root filesystem, an
//! unprivileged user with no capabilities and `no_new_privs`, and a cgroup with limits.
//!
//! How a task starts: the agent builds an [`InitConfig`] (the root filesystem plan from
//! [`rootfs`], the user, the cgroup to join) and starts the task's supervisor (its own binary
//! as `mlp __mlp-supervise <config>`, detached from the agent; `crate::task::supervisor`). The
//! supervisor unshares a PID namespace and forks the namespace's PID 1 (the "init", [`init`]),
//! which joins the cgroup, unshares mount, UTS, IPC (and network) namespaces, builds the root and `pivot_root`s into it, forks the task as an unprivileged
//! user, reaps zombies, and reports the task's exit status back to the supervisor, which
//! records it. The agent never forks itself: the supervisor is a fresh process, not a fork of
//! the multi-threaded agent, and it outlives an agent restart.

pub mod cgroups;
pub mod devices;
pub mod init;
pub mod phases;
pub mod rootfs;

pub use rootfs::{check_hidden_path, HideError};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Agent-wide isolation settings.
#[derive(Debug, Clone)]
pub struct IsolationSettings {
    /// User a task runs as when it names none.
    pub default_user: String,
    /// Users `exec` tasks may not run as.
    pub refused_users: Vec<String>,
    /// pids limit of a task that sets none.
    pub default_pids: u64,
    /// pids limit of all `exec` tasks together (on the `mlp/` parent cgroup); None = none.
    pub agent_pids_max: Option<u64>,
    /// Extra host paths bound read-only into every task root (same path inside).
    pub extra_ro_paths: Vec<PathBuf>,
    /// Host paths of the default root left out of every task root (`--exec-hide`; see
    /// [`rootfs::hideable`]).
    pub hidden_paths: Vec<PathBuf>,
    /// MHz of one core, to turn `cpu` into a CFS quota.
    pub mhz_per_core: u64,
    /// The binary run as `<exe> __mlp-supervise <config>` for every task (both drivers);
    /// None = the running binary (`mlp`). Library tests point it at a helper binary.
    pub supervisor_exe: Option<PathBuf>,
}

impl Default for IsolationSettings {
    fn default() -> Self {
        IsolationSettings {
            default_user: "nobody".into(),
            refused_users: vec!["root".into()],
            default_pids: 4096,
            agent_pids_max: None,
            extra_ro_paths: Vec::new(),
            hidden_paths: Vec::new(),
            mhz_per_core: 1000,
            supervisor_exe: None,
        }
    }
}

/// A user resolved from the host's /etc/passwd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory (informational: the task's root may not have it).
    pub home: String,
}

/// Finds `name` (or a numeric uid) in passwd-format text.
pub fn lookup_user(passwd: &str, name: &str) -> Option<User> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || line.starts_with('#') {
            return None;
        }
        if f[0] != name && f[2] != name {
            return None;
        }
        Some(User { name: f[0].to_string(), uid: f[2].parse().ok()?, gid: f[3].parse().ok()?, home: f[5].to_string() })
    })
}

/// The task's hostname: `<group>-<index>-<first 8 chars of the alloc id>`, cut to 63 bytes.
pub fn hostname_for(group: &str, index: u32, alloc_id: &str) -> String {
    let short: String = alloc_id.chars().filter(|c| *c != '-').take(8).collect();
    let clean: String = group.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c.to_ascii_lowercase() } else { '-' }).collect();
    let mut h = format!("{clean}-{index}-{short}");
    h.truncate(63);
    h
}

/// Everything the init needs, part of the supervisor's config (`supervise.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitConfig {
    /// Host path of the (empty) directory the task's root is mounted on.
    pub root: PathBuf,
    /// Steps that build the root, relative to it.
    pub steps: Vec<rootfs::Step>,
    /// Hostname inside the UTS namespace.
    pub hostname: String,
    /// Give the task an empty network namespace.
    pub network_none: bool,
    /// Join this network namespace (a bridge-mode allocation's) instead.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// The user the task runs as.
    pub user: User,
    /// Command (a path, or a name looked up in the task's PATH inside its root).
    pub command: String,
    /// Arguments.
    pub args: Vec<String>,
    /// The task's whole environment.
    pub env: BTreeMap<String, String>,
    /// Working directory inside the root.
    pub work_dir: PathBuf,
    /// `cgroup.procs` files the init joins before anything else.
    pub cgroup_procs: Vec<PathBuf>,
    /// An image's root (`oci`): an overlay mounted on `root` instead of the tmpfs.
    #[serde(default)]
    pub overlay: Option<rootfs::Overlay>,
}

impl InitConfig {
    /// Reads a config written by the agent.
    pub fn load(path: &Path) -> Result<InitConfig, std::io::Error> {
        let bytes = std::fs::read(path)?;
        serde_json::from_slice(&bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_hostnames() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n# comment\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
        let nobody = lookup_user(passwd, "nobody");
        assert_eq!(nobody.as_ref().map(|u| (u.uid, u.gid)), Some((65534, 65534)));
        assert_eq!(lookup_user(passwd, "0").map(|u| u.name), Some("root".to_string()));
        assert_eq!(lookup_user(passwd, "ghost"), None);
        assert_eq!(hostname_for("Web_1", 3, "0a1b2c3d-4e5f-6789"), "web-1-3-0a1b2c3d");
    }
}
