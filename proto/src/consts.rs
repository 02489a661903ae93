//! The string values of status fields, in one place so that the server, agent and CLI agree.

pub mod job_type {
    pub const BATCH: &str = "batch";
    pub const SERVICE: &str = "service";
    /// One allocation on every eligible node, kept running (issue 16 §2).
    pub const SYSTEM: &str = "system";
    /// A batch job run once on every eligible node (issue 16 §2).
    pub const SYSBATCH: &str = "sysbatch";

    /// Whether allocations of this type run to completion (batch and sysbatch).
    pub fn is_batch(t: &str) -> bool {
        t == BATCH || t == SYSBATCH
    }

    /// Whether this type places one allocation per eligible node (system and sysbatch).
    pub fn is_per_node(t: &str) -> bool {
        t == SYSTEM || t == SYSBATCH
    }
}

/// `parameterized { payload = … }` (issue 16 §2).
pub mod dispatch_payload {
    pub const OPTIONAL: &str = "optional";
    pub const REQUIRED: &str = "required";
    pub const FORBIDDEN: &str = "forbidden";
}

pub mod job_status {
    pub const PENDING: &str = "pending";
    pub const RUNNING: &str = "running";
    pub const DEAD: &str = "dead";
}

pub mod node_status {
    pub const INITIALIZING: &str = "initializing";
    pub const READY: &str = "ready";
    pub const DOWN: &str = "down";
}

pub mod alloc_desired {
    pub const RUN: &str = "run";
    pub const STOP: &str = "stop";
}

pub mod alloc_client {
    pub const PENDING: &str = "pending";
    pub const RUNNING: &str = "running";
    pub const COMPLETE: &str = "complete";
    pub const FAILED: &str = "failed";
    pub const LOST: &str = "lost";
    /// Evicted by the scheduler for higher-priority work (final; the job gets a replacement).
    pub const PREEMPTED: &str = "preempted";

    /// Whether a client status is final (the allocation will never run again).
    pub fn is_terminal(status: &str) -> bool {
        matches!(status, COMPLETE | FAILED | LOST | PREEMPTED)
    }
}

pub mod task_state {
    pub const PENDING: &str = "pending";
    pub const RUNNING: &str = "running";
    pub const DEAD: &str = "dead";
}

pub mod task_event {
    pub const RECEIVED: &str = "received";
    pub const STARTED: &str = "started";
    pub const EXITED: &str = "exited";
    pub const RESTARTING: &str = "restarting";
    pub const NOT_RESTARTING: &str = "not-restarting";
    pub const KILLING: &str = "killing";
    pub const KILLED: &str = "killed";
    pub const DRIVER_FAILURE: &str = "driver-failure";
    pub const MAX_RUN_DURATION: &str = "max-run-duration-exceeded";
    pub const TERMINATED: &str = "terminated";
    pub const GPU_UNHEALTHY: &str = "gpu-unhealthy";
    /// A driver's progress before the task starts (`oci`: the image pull, bytes per layer).
    pub const DRIVER: &str = "driver";
    /// The task's `artifact` blocks being fetched, and each one fetched.
    pub const DOWNLOADING_ARTIFACTS: &str = "downloading-artifacts";
    /// An artifact could not be fetched or failed its checksum: the task does not start.
    pub const ARTIFACT_FAILED: &str = "failed-artifact-download";
}

pub mod eval_status {
    pub const PENDING: &str = "pending";
    pub const COMPLETE: &str = "complete";
    pub const BLOCKED: &str = "blocked";
    pub const FAILED: &str = "failed";
    pub const CANCELED: &str = "canceled";
}

pub mod eval_trigger {
    pub const JOB_REGISTER: &str = "job-register";
    pub const JOB_DEREGISTER: &str = "job-deregister";
    pub const NODE_UPDATE: &str = "node-update";
    pub const ALLOC_FAILURE: &str = "alloc-failure";
    pub const QUEUED_ALLOCS: &str = "queued-allocs";
    pub const NODE_DRAIN: &str = "node-drain";
    pub const PREEMPTION: &str = "preemption";
    pub const DEPLOYMENT_WATCHER: &str = "deployment-watcher";
    pub const JOB_SCALE: &str = "job-scaling";
    pub const ROLLING_UPDATE: &str = "rolling-update";
}

/// Deployment statuses (issue 16 §1).
pub mod deployment_status {
    pub const RUNNING: &str = "running";
    pub const PAUSED: &str = "paused";
    pub const SUCCESSFUL: &str = "successful";
    pub const FAILED: &str = "failed";
    pub const CANCELLED: &str = "cancelled";

    /// Whether a deployment in this status still changes anything.
    pub fn is_active(status: &str) -> bool {
        status == RUNNING || status == PAUSED
    }
}

/// `update { health_check = … }`.
pub mod health_check {
    pub const CHECKS: &str = "checks";
    pub const TASK_STATES: &str = "task_states";
    pub const MANUAL: &str = "manual";
}

pub mod restart_mode {
    pub const FAIL: &str = "fail";
    pub const DELAY: &str = "delay";
}

pub mod driver {
    pub const EXEC: &str = "exec";
    pub const RAW_EXEC: &str = "raw_exec";
    pub const WASM: &str = "wasm";
    pub const OCI: &str = "oci";
}

/// Node attribute listing the drivers an agent knows but its configuration turned off
/// (comma separated), e.g. `raw_exec` (issue 15 §4).
pub const DRIVERS_DISABLED_ATTR: &str = "drivers.disabled";

/// Health of a service instance (`ServiceRegistration.health`).
pub mod service_health {
    pub const PASSING: &str = "passing";
    pub const CRITICAL: &str = "critical";
}

/// Types of a service's `check` block.
pub mod check_type {
    pub const HTTP: &str = "http";
    pub const TCP: &str = "tcp";
    pub const SCRIPT: &str = "script";
    pub const ALL: &[&str] = &[HTTP, TCP, SCRIPT];
}

/// Host volumes (issue 15 §4): the node attribute an agent sets for each volume its
/// configuration offers, and its two values.
pub mod host_volume {
    pub const READ_ONLY: &str = "ro";
    pub const READ_WRITE: &str = "rw";

    /// `host_volume.NAME`.
    pub fn attr(source: &str) -> String {
        format!("host_volume.{source}")
    }
}
