//! The unisolated `raw_exec` driver ([`ProcessDriver`]): the task runs under its supervisor in
//! its own session/process group (`setsid`), stdin is /dev/null, and stdout/stderr go into
//! size-rotated log files. Nothing isolates it: it sees the host as the agent's user does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use mlp_proto::consts::driver as driver_names;
use nix::sys::signal::Signal;

use super::supervised::{self, Supervised, TaskKind, TaskRecord};
use super::{Driver, DriverError, ExitStatus, TaskHandle, TaskSpec};

/// The unisolated `raw_exec` driver.
#[derive(Debug, Clone)]
pub struct ProcessDriver {
    name: &'static str,
    supervisor_exe: Option<PathBuf>,
}

impl ProcessDriver {
    /// The `raw_exec` driver (never isolated), supervised by the running binary.
    pub fn raw_exec() -> Self {
        ProcessDriver { name: driver_names::RAW_EXEC, supervisor_exe: None }
    }

    /// The `raw_exec` driver with `exe` as the supervisor binary.
    pub fn with_supervisor(exe: Option<PathBuf>) -> Self {
        ProcessDriver { supervisor_exe: exe, ..Self::raw_exec() }
    }
}

#[async_trait]
impl Driver for ProcessDriver {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn start(&self, spec: &TaskSpec) -> Result<Box<dyn TaskHandle>, DriverError> {
        // It names the task's log files.
        crate::paths::check_task_name(&spec.name)?;
        let exe = supervised::supervisor_exe(self.supervisor_exe.as_deref())?;
        // The task gets the agent's environment plus its own, as a child of the agent would.
        let mut env: BTreeMap<String, String> = std::env::vars().collect();
        env.extend(spec.env.clone());
        // No root of its own to mount into (as in Nomad, raw_exec mounts nothing): the task is
        // told where its host volumes are, and read-only is not enforced.
        for v in &spec.volumes {
            env.insert(crate::volumes::env_name(&v.label), v.host_path.to_string_lossy().into_owned());
        }
        let netns = spec.network.as_ref().map(|n| n.netns.clone());
        let task = TaskKind::Raw { command: spec.command.clone(), args: spec.args.clone(), env, work_dir: spec.work_dir.clone(), netns };
        let sup = supervised::start(
            &exe,
            self.name,
            spec,
            task,
            String::new(),
            None,
            supervised::StartWith { phases: spec.phases.clone().or_start(), ready: None },
        )
        .await?;
        tracing::debug!(task = %spec.name, pid = sup.record.pid, driver = self.name, "task process started");
        Ok(Box::new(ProcessHandle { sup }))
    }

    fn reattach(&self, task_dir: &Path, record: &TaskRecord) -> Result<Box<dyn TaskHandle>, DriverError> {
        let sup = supervised::reattach(task_dir, record)
            .map_err(|e| DriverError::Reattach { dir: task_dir.to_path_buf(), reason: e.to_string() })?;
        Ok(Box::new(ProcessHandle { sup }))
    }
}

/// A task started (or reattached) by [`ProcessDriver`].
struct ProcessHandle {
    sup: Supervised,
}

#[async_trait]
impl TaskHandle for ProcessHandle {
    fn pid(&self) -> u32 {
        self.sup.record.pid
    }

    async fn wait(&mut self) -> ExitStatus {
        let first = !self.sup.exited();
        let ex = self.sup.wait().await;
        if first {
            self.sup.forget();
        }
        ex
    }

    fn signal(&self, sig: Signal) -> Result<(), DriverError> {
        self.sup.signal(sig)
    }
}
