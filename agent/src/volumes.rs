//! Host volumes for tasks (issue 15 §4): a task's `volume_mount` blocks resolved through the
//! group's `volume` blocks to this agent's own `host_volume` configuration.
//!
//! The servers placed the allocation on this node because it advertised the volume; the agent
//! resolves it again when the task starts, since its configuration may have changed since (a
//! restart without the volume fails the task's start with a reason naming it). A mount is
//! read-only when the mount, the group's volume or the agent's `host_volume` says so.
//!
//! `exec` and `oci` bind the host directory at the destination inside the task's root
//! (`rootfs::Step::Bind`, remounted read-only when read-only). `raw_exec` has no root of its
//! own: like Nomad it mounts nothing, and tells the task where its volumes are on the host in
//! `MLP_VOLUME_<label>` ([`env_name`]). `wasm` cannot mount and refuses.

use std::collections::BTreeMap;
use std::path::PathBuf;

use mlp_proto::v1::{Task, TaskGroup};

use crate::config_file::HostVolume;

/// One host directory bound into a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeBind {
    /// The group's volume label the task's `volume_mount` named.
    pub label: String,
    /// The agent's host volume name (`source`).
    pub source: String,
    /// The directory on the host.
    pub host_path: PathBuf,
    /// Where the task sees it (absolute, inside its root).
    pub destination: PathBuf,
    /// Mounted read-only.
    pub read_only: bool,
}

/// Why a task's volumes cannot be given to it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    /// The mount names a label its group does not declare (a job that bypassed validation).
    #[error("volume_mount[{index}]: the group declares no volume {label:?}")]
    UndeclaredVolume {
        /// Index of the task's `volume_mount`.
        index: usize,
        /// The label.
        label: String,
    },
    /// A volume type this agent cannot provide.
    #[error("volume {label:?}: unsupported volume type {kind:?} (supported: host)")]
    UnsupportedType {
        /// The label.
        label: String,
        /// The type asked for.
        kind: String,
    },
    /// The agent's configuration has no such host volume (any more).
    #[error("volume {label:?}: this node has no host volume {source_name:?} (its agent configuration offers: {offered})")]
    UnknownSource {
        /// The label.
        label: String,
        /// The host volume asked for.
        source_name: String,
        /// The names this agent offers, comma-separated, or "none".
        offered: String,
    },
    /// The host volume's directory is gone.
    #[error("volume {label:?}: host volume {source_name:?} at {path} is not a directory on this node", path = .path.display())]
    MissingPath {
        /// The label.
        label: String,
        /// The host volume.
        source_name: String,
        /// Its configured path.
        path: PathBuf,
    },
    /// The destination is not an absolute path without `..`.
    #[error("volume_mount[{index}]: destination {destination:?}: {reason}")]
    Destination {
        /// Index of the task's `volume_mount`.
        index: usize,
        /// The destination asked for.
        destination: String,
        /// Why it is refused.
        reason: String,
    },
}

/// The task's volume mounts, resolved against `host_volumes` (the agent's configuration).
/// `exists` says whether a host path is a directory (`Path::is_dir` outside tests).
pub fn resolve(
    group: &TaskGroup,
    task: &Task,
    host_volumes: &BTreeMap<String, HostVolume>,
    exists: impl Fn(&std::path::Path) -> bool,
) -> Result<Vec<VolumeBind>, VolumeError> {
    let mut binds = Vec::with_capacity(task.volume_mounts.len());
    for (index, m) in task.volume_mounts.iter().enumerate() {
        let Some(v) = group.volumes.iter().find(|v| v.name == m.volume) else {
            return Err(VolumeError::UndeclaredVolume { index, label: m.volume.clone() });
        };
        if v.r#type != "host" {
            return Err(VolumeError::UnsupportedType { label: v.name.clone(), kind: v.r#type.clone() });
        }
        let Some(host) = host_volumes.get(&v.source) else {
            let offered =
                if host_volumes.is_empty() { "none".to_string() } else { host_volumes.keys().cloned().collect::<Vec<_>>().join(", ") };
            return Err(VolumeError::UnknownSource { label: v.name.clone(), source_name: v.source.clone(), offered });
        };
        if let Err(reason) = mlp_proto::jobspec::check_mount_destination(&m.destination) {
            return Err(VolumeError::Destination { index, destination: m.destination.clone(), reason });
        }
        if !exists(&host.path) {
            return Err(VolumeError::MissingPath { label: v.name.clone(), source_name: v.source.clone(), path: host.path.clone() });
        }
        binds.push(VolumeBind {
            label: v.name.clone(),
            source: v.source.clone(),
            host_path: host.path.clone(),
            destination: PathBuf::from(&m.destination),
            read_only: m.read_only || v.read_only || host.read_only,
        });
    }
    Ok(binds)
}

/// The variable that tells a `raw_exec` task where a volume is on the host: `MLP_VOLUME_<label>`
/// with `-` as `_`.
pub fn env_name(label: &str) -> String {
    format!("MLP_VOLUME_{}", label.replace('-', "_"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlp_proto::v1::{VolumeMount, VolumeRequest};

    fn group(volumes: &[(&str, &str, bool)], mounts: &[(&str, &str, bool)]) -> (TaskGroup, Task) {
        let task = Task {
            name: "t".into(),
            volume_mounts: mounts
                .iter()
                .map(|(v, d, ro)| VolumeMount { volume: v.to_string(), destination: d.to_string(), read_only: *ro })
                .collect(),
            ..Default::default()
        };
        let g = TaskGroup {
            name: "g".into(),
            volumes: volumes
                .iter()
                .map(|(n, s, ro)| VolumeRequest { name: n.to_string(), r#type: "host".into(), source: s.to_string(), read_only: *ro })
                .collect(),
            tasks: vec![task.clone()],
            ..Default::default()
        };
        (g, task)
    }

    fn config() -> BTreeMap<String, HostVolume> {
        [
            ("datasets".to_string(), HostVolume { path: "/srv/datasets".into(), read_only: true }),
            ("scratch".to_string(), HostVolume { path: "/srv/scratch".into(), read_only: false }),
        ]
        .into_iter()
        .collect()
    }

    #[test]
    fn mounts_resolve_read_only_when_any_side_says_so() {
        let (g, t) = group(
            &[("data", "datasets", false), ("s", "scratch", false), ("s2", "scratch", true)],
            &[("data", "/data", false), ("s", "/scratch", false), ("s2", "/ro", false), ("s", "/ro2", true)],
        );
        let binds = resolve(&g, &t, &config(), |_| true).expect("resolves");
        let got: Vec<(&str, &str, bool)> =
            binds.iter().map(|b| (b.label.as_str(), b.destination.to_str().unwrap_or_default(), b.read_only)).collect();
        assert_eq!(got, [("data", "/data", true), ("s", "/scratch", false), ("s2", "/ro", true), ("s", "/ro2", true)]);
        assert_eq!(binds[0].host_path, PathBuf::from("/srv/datasets"));
        assert_eq!(env_name("ml-data"), "MLP_VOLUME_ml_data");
    }

    #[test]
    fn a_volume_the_agent_no_longer_has_fails_with_its_name() {
        let (g, t) = group(&[("data", "gone", true)], &[("data", "/data", true)]);
        let err = resolve(&g, &t, &config(), |_| true).expect_err("unknown source").to_string();
        assert_eq!(err, "volume \"data\": this node has no host volume \"gone\" (its agent configuration offers: datasets, scratch)");
        let err = resolve(&g, &t, &BTreeMap::new(), |_| true).expect_err("none").to_string();
        assert!(err.ends_with("offers: none)"), "{err}");
        let (g, t) = group(&[("data", "datasets", true)], &[("data", "/data", true)]);
        let err = resolve(&g, &t, &config(), |_| false).expect_err("path gone").to_string();
        assert_eq!(err, "volume \"data\": host volume \"datasets\" at /srv/datasets is not a directory on this node");
        let (g, t) = group(&[("data", "datasets", true)], &[("other", "/data", true), ("data", "/../x", true)]);
        assert!(matches!(resolve(&g, &t, &config(), |_| true), Err(VolumeError::UndeclaredVolume { index: 0, .. })));
        let (g, t) = group(&[("data", "datasets", true)], &[("data", "/a/../x", true)]);
        assert!(matches!(resolve(&g, &t, &config(), |_| true), Err(VolumeError::Destination { index: 0, .. })));
    }
}
