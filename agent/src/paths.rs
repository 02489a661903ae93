//! Names the agent receives (from the servers, or from RPC callers) that become parts of file
//! system paths: allocation dirs `allocs/<alloc>/<task>/`, log files `<task>.stdout.N`, cgroups
//! `mlp/<alloc>.<task>`, supervisor configs. Each is checked here before any path is built from
//! it, so that no value can name a path outside the agent's data dir (or its cgroup parent).

/// Longest allocation id accepted (the servers' are 36-byte UUIDs).
pub const MAX_ID_LEN: usize = 64;
/// Longest job, group or task name accepted (the servers' job spec limit).
pub const MAX_NAME_LEN: usize = 128;
/// How much of a bad value an error shows.
const SHOWN: usize = 64;

/// A value that cannot be used as one component of a path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} {shown}: {reason}")]
pub struct UnsafeName {
    /// Which field it is (`allocation id`, `task name`, ...).
    pub field: &'static str,
    /// The value, quoted and cut to a readable length.
    pub shown: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Checks that `value` can be one path component of its own: 1 to `max` bytes of
/// `[A-Za-z0-9_.-]`, and not `.` or `..` (so no `/`, NUL, whitespace or other byte a path or
/// a cgroup name would read differently).
pub fn check_component(field: &'static str, value: &str, max: usize) -> Result<(), UnsafeName> {
    let fail = |reason: String| {
        let mut shown: String = value.chars().take(SHOWN).collect();
        if shown.len() < value.len() {
            shown.push('…');
        }
        Err(UnsafeName { field, shown: format!("{shown:?}"), reason })
    };
    if value.is_empty() {
        return fail("must not be empty".into());
    }
    if value.len() > max {
        return fail(format!("{} bytes; at most {max}", value.len()));
    }
    if value == "." || value == ".." {
        return fail("must not be . or ..".into());
    }
    if let Some(c) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) {
        return fail(format!("contains {c:?}; only A-Z, a-z, 0-9, _, . and - are allowed"));
    }
    Ok(())
}

/// An allocation id (also an RPC caller's id prefix).
pub fn check_alloc_id(id: &str) -> Result<(), UnsafeName> {
    check_component("allocation id", id, MAX_ID_LEN)
}

/// A task name.
pub fn check_task_name(name: &str) -> Result<(), UnsafeName> {
    check_component("task name", name, MAX_NAME_LEN)
}

/// A task group name.
pub fn check_group_name(name: &str) -> Result<(), UnsafeName> {
    check_component("task group name", name, MAX_NAME_LEN)
}

/// Every name of an allocation the agent may build a path from: its id, its group's name and
/// the names of its group's tasks.
pub fn check_allocation(alloc: &mlp_proto::v1::Allocation) -> Result<(), UnsafeName> {
    check_alloc_id(&alloc.id)?;
    let Some(job) = alloc.job.as_ref() else {
        return Ok(());
    };
    if let Some(group) = job.groups.iter().find(|g| g.name == alloc.task_group) {
        check_group_name(&group.name)?;
        for t in &group.tasks {
            check_task_name(&t.name)?;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use mlp_proto::v1::{Allocation, Job, Task, TaskGroup};

    /// Values a hostile or broken server could send.
    pub(crate) fn hostile() -> Vec<String> {
        vec![
            "..".into(),
            ".".into(),
            "../../etc".into(),
            "a/b".into(),
            "/etc".into(),
            String::new(),
            "x".repeat(10 * 1024),
            "a\0b".into(),
            "a b".into(),
            "ä".into(),
            "a\nb".into(),
        ]
    }

    #[test]
    fn hostile_values_are_refused_with_the_field_and_value() {
        for v in hostile() {
            let e = check_alloc_id(&v).err();
            assert!(e.is_some(), "{v:?} accepted as an id");
            let e = check_task_name(&v).err();
            assert!(e.is_some(), "{v:?} accepted as a task name");
        }
        let e = check_task_name("../../etc").err().map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("invalid task name \"../../etc\": contains '/'; only A-Z, a-z, 0-9, _, . and - are allowed"));
        let long = check_alloc_id(&"x".repeat(10 * 1024)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(long.contains("10240 bytes; at most 64") && long.len() < 200, "{long}");
        let nul = check_alloc_id("a\0b").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(nul.contains("\\0"), "{nul}");
    }

    #[test]
    fn ordinary_values_pass() {
        for v in ["0a1b2c3d-4e5f-6789-abcd-ef0123456789", "web", "train_v1.2", "a..b", "...", "-x"] {
            assert_eq!(check_alloc_id(v), Ok(()), "{v}");
            assert_eq!(check_task_name(v), Ok(()), "{v}");
        }
        assert!(check_alloc_id(&"a".repeat(64)).is_ok());
        assert!(check_alloc_id(&"a".repeat(65)).is_err());
        assert!(check_task_name(&"a".repeat(128)).is_ok());
        assert!(check_task_name(&"a".repeat(129)).is_err());
    }

    #[test]
    fn allocations_are_checked_by_id_group_and_tasks() {
        let alloc = |id: &str, task: &str| Allocation {
            id: id.into(),
            task_group: "g".into(),
            job: Some(Job {
                groups: vec![TaskGroup {
                    name: "g".into(),
                    tasks: vec![Task { name: task.into(), ..Default::default() }],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(check_allocation(&alloc("a1", "t")).is_ok());
        assert_eq!(check_allocation(&alloc("../a1", "t")).map_err(|e| e.field), Err("allocation id"));
        assert_eq!(check_allocation(&alloc("a1", "..")).map_err(|e| e.field), Err("task name"));
    }
}
