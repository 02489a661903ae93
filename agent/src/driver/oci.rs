//! The `oci` driver ([`OciDriver`]): a container image from a registry, run under the same
//! isolation as `exec` (namespaces, cgroup, user, no capabilities, `no_new_privs`, supervisor
//! and reattach), with the image as the task's root.
//!
//! * **Image**: `config.image` is made available by the node's [`ImageStore`] (pulled once,
//!   layers verified and unpacked once, shared); pull progress goes into the task's events.
//! * **Root**: an overlay of the image's layers (read-only, from the store) under a private
//!   upper directory `<task>/oci/upper` (the task's writes, kept across its restarts, removed
//!   with the allocation), with `/dev`, `/proc`, `/tmp`, `/local`, `/alloc`, `/secrets`,
//!   `/etc/hosts`, `/etc/hostname` and `/etc/resolv.conf` mounted or written over it
//!   ([`rootfs::plan_image`]).
//! * **Process**: argv is the entrypoint (`config.entrypoint`, else the image's) followed by
//!   the command (`config.command` and `config.args`; `args` alone replace the image's `Cmd`;
//!   the image's `Cmd` applies unless the job sets an entrypoint, as with `docker run
//!   --entrypoint`). The working directory is `config.work_dir`, else the image's, else `/`.
//!   The environment is the image's under the task's. The user is the task's `user`, else
//!   the image's, resolved against the image's own `/etc/passwd`; an image that names none
//!   runs as the agent's default user (`nobody`), and the agent's refused users (root by
//!   default) stay refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use mlp_proto::consts::driver as driver_names;
use nix::sys::signal::Signal;

use super::exec::{ExecDriver, ImageRoot};
use super::supervised::TaskRecord;
use super::{Driver, DriverError, ExitStatus, TaskHandle, TaskSpec};
use crate::image::{env_map, Image, ImageHold, ImageStore, RunConfig};
use crate::isolation::{lookup_user, rootfs, User};

/// The file in the task dir naming the image a task runs (for a reattach).
const IMAGE_FILE: &str = "oci/image";

/// The `oci` driver.
pub struct OciDriver {
    exec: Arc<ExecDriver>,
    store: Arc<ImageStore>,
}

impl std::fmt::Debug for OciDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OciDriver").field("store", &self.store).finish_non_exhaustive()
    }
}

impl OciDriver {
    /// A driver that isolates like `exec` and takes its images from `store`.
    pub fn new(exec: Arc<ExecDriver>, store: Arc<ImageStore>) -> Self {
        OciDriver { exec, store }
    }

    /// The node's image store.
    pub fn store(&self) -> &Arc<ImageStore> {
        &self.store
    }
}

/// The process an image and a job's overrides make: argv and working directory.
pub fn process_of(spec: &TaskSpec, image: &RunConfig) -> Result<(Vec<String>, PathBuf), DriverError> {
    let entrypoint = if spec.entrypoint.is_empty() { image.entrypoint.clone() } else { spec.entrypoint.clone() };
    let cmd = if !spec.command.is_empty() {
        std::iter::once(spec.command.clone()).chain(spec.args.iter().cloned()).collect()
    } else if !spec.args.is_empty() {
        spec.args.clone()
    } else if spec.entrypoint.is_empty() {
        image.cmd.clone()
    } else {
        Vec::new()
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return Err(DriverError::Isolation(format!(
            "image {}: it has no entrypoint and no cmd; set `command` in the task's config",
            spec.image
        )));
    }
    let work_dir = [spec.image_work_dir.as_str(), image.working_dir.as_str()].into_iter().find(|d| !d.is_empty()).unwrap_or("/");
    Ok((argv, PathBuf::from(work_dir)))
}

/// Resolves an image user (`name`, `uid`, `name:group`, `uid:gid`) against the image's
/// `/etc/passwd` (the top-most layer that has one); a bare uid needs no passwd.
pub fn image_user(asked: &str, layers: &[PathBuf]) -> Result<User, DriverError> {
    let err = |reason: &str| DriverError::User { user: asked.to_string(), reason: reason.to_string() };
    let (name, group) = match asked.split_once(':') {
        Some((n, g)) => (n, Some(g)),
        None => (asked, None),
    };
    let passwd = layers.iter().rev().find_map(|l| std::fs::read_to_string(l.join("etc/passwd")).ok()).unwrap_or_default();
    let found = lookup_user(&passwd, name);
    let mut user = match (found, name.parse::<u32>()) {
        (Some(u), _) => u,
        (None, Ok(uid)) => User { name: name.to_string(), uid, gid: uid, home: "/".into() },
        (None, Err(_)) => return Err(err("no such user in the image's /etc/passwd")),
    };
    if let Some(g) = group {
        user.gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let groups = layers.iter().rev().find_map(|l| std::fs::read_to_string(l.join("etc/group")).ok()).unwrap_or_default();
                groups
                    .lines()
                    .find_map(|line| {
                        let f: Vec<&str> = line.split(':').collect();
                        (f.len() >= 3 && f[0] == g).then(|| f[2].parse().ok()).flatten()
                    })
                    .ok_or_else(|| err("no such group in the image's /etc/group"))?
            }
        };
    }
    Ok(user)
}

#[async_trait]
impl Driver for OciDriver {
    fn name(&self) -> &'static str {
        driver_names::OCI
    }

    async fn start(&self, spec: &TaskSpec) -> Result<Box<dyn TaskHandle>, DriverError> {
        crate::paths::check_alloc_id(&spec.alloc_id)?;
        crate::paths::check_task_name(&spec.name)?;
        let sink = spec.progress.clone();
        let progress = move |message: String| {
            tracing::debug!(message, "image pull");
            if let Some(tx) = &sink {
                let _ = tx.send(message);
            }
        };
        let (image, hold): (Image, ImageHold) =
            self.store.ensure(&spec.image, spec.registry_auth.as_ref(), &progress).await.map_err(|e| DriverError::Image(e.to_string()))?;
        let (argv, work_dir) = process_of(spec, &image.config)?;
        let asked = if spec.user.is_empty() { image.config.user.as_str() } else { spec.user.as_str() };
        let user = if asked.is_empty() { None } else { Some(image_user(asked, &image.layers)?) };
        let oci_dir = spec.task_dir.join("oci");
        std::fs::create_dir_all(&oci_dir).map_err(|e| DriverError::Isolation(format!("creating {}: {e}", oci_dir.display())))?;
        std::fs::write(spec.task_dir.join(IMAGE_FILE), &image.manifest_digest)
            .map_err(|e| DriverError::Isolation(format!("writing {}: {e}", oci_dir.display())))?;
        let root = ImageRoot {
            overlay: rootfs::Overlay {
                lower: image.layers.iter().rev().cloned().collect(),
                upper: oci_dir.join("upper"),
                work: oci_dir.join("work"),
            },
            argv,
            env: env_map(&image.config.env),
            work_dir,
            user,
        };
        let mut spec = spec.clone();
        // Resolved against the image above; the exec path must not look it up on the host.
        spec.user.clear();
        let inner = self.exec.start_in(&spec, Some(root)).await?;
        Ok(Box::new(OciHandle { inner, _hold: Some(hold) }))
    }

    fn reattach(&self, task_dir: &Path, record: &TaskRecord) -> Result<Box<dyn TaskHandle>, DriverError> {
        let inner = self.exec.reattach_task(task_dir, record)?;
        let hold = std::fs::read_to_string(task_dir.join(IMAGE_FILE)).ok().map(|d| self.store.hold(d.trim()));
        Ok(Box::new(OciHandle { inner, _hold: hold }))
    }
}

/// An `exec` handle that keeps its image from collection while the task lives.
struct OciHandle {
    inner: Box<dyn TaskHandle>,
    _hold: Option<ImageHold>,
}

#[async_trait]
impl TaskHandle for OciHandle {
    fn pid(&self) -> u32 {
        self.inner.pid()
    }

    async fn wait(&mut self) -> ExitStatus {
        let status = self.inner.wait().await;
        self._hold = None;
        status
    }

    fn signal(&self, sig: Signal) -> Result<(), DriverError> {
        self.inner.signal(sig)
    }

    fn stats(&self) -> Option<crate::isolation::cgroups::Stats> {
        self.inner.stats()
    }

    fn pids(&self) -> Vec<u32> {
        self.inner.pids()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn argv_from_image_and_overrides() {
        let image =
            RunConfig { entrypoint: vec!["/bin/ep".into()], cmd: vec!["a".into()], working_dir: "/w".into(), ..RunConfig::default() };
        let mut spec = TaskSpec { image: "x".into(), ..TaskSpec::default() };
        assert_eq!(process_of(&spec, &image).unwrap(), (vec!["/bin/ep".to_string(), "a".into()], PathBuf::from("/w")));
        spec.args = vec!["b".into()];
        assert_eq!(process_of(&spec, &image).unwrap().0, ["/bin/ep", "b"]);
        spec.command = "c".into();
        assert_eq!(process_of(&spec, &image).unwrap().0, ["/bin/ep", "c", "b"]);
        spec = TaskSpec { entrypoint: vec!["/bin/sh".into()], image_work_dir: "/x".into(), ..TaskSpec::default() };
        assert_eq!(process_of(&spec, &image).unwrap(), (vec!["/bin/sh".to_string()], PathBuf::from("/x")));
        assert!(process_of(&TaskSpec::default(), &RunConfig::default()).is_err());
    }

    #[test]
    fn users_from_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().to_path_buf();
        std::fs::create_dir_all(layer.join("etc")).unwrap();
        std::fs::write(layer.join("etc/passwd"), "app:x:1000:1000::/home/app:/bin/sh\n").unwrap();
        std::fs::write(layer.join("etc/group"), "staff:x:50:\n").unwrap();
        let layers = [layer];
        assert_eq!(image_user("app", &layers).unwrap().uid, 1000);
        assert_eq!(image_user("app:staff", &layers).unwrap().gid, 50);
        assert_eq!(image_user("4242:7", &layers).unwrap().gid, 7);
        assert!(image_user("ghost", &layers).is_err());
    }
}
