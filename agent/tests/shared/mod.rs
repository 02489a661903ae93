//! Allocation ids for the agent's tests, unique to each call.
//!
//! An `exec` or `oci` task's cgroup is named `mlp/<alloc id>.<task>` on the host, and nextest
//! runs the tests of one file as separate processes at the same time. With one fixed id, two
//! tests shared a cgroup: one test's teardown removed it while the other's init was being moved
//! in ("moving the init into cgroup …: No such file or directory"), or killed the other's task.

/// A fresh allocation id (32 hex digits, like the server's).
pub fn alloc_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
