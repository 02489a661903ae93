//! cgroup v2: one directory in the unified hierarchy (`<root>/mlp/<name>`), with the
//! controllers enabled down the path through `cgroup.subtree_control`.

use std::path::{Path, PathBuf};

use super::{cpu, cpuset, devices, memory, mkdir, pids, read_pids, rmdir, CgroupError, Limits, Stats, TaskCgroup, PARENT};

/// Controllers a task cgroup needs from its parents.
const CONTROLLERS: &[&str] = &["cpu", "cpuset", "memory", "pids"];

/// A task cgroup in the unified hierarchy.
#[derive(Debug)]
pub struct V2Cgroup {
    root: PathBuf,
    dir: PathBuf,
}

impl V2Cgroup {
    /// Creates `<root>/mlp/<name>`, enabling the controllers in `root` and `mlp/`.
    pub fn create(root: &Path, name: &str) -> Result<V2Cgroup, CgroupError> {
        let parent = root.join(PARENT);
        mkdir(&parent)?;
        for dir in [root, parent.as_path()] {
            enable_controllers(dir);
        }
        let dir = parent.join(name);
        mkdir(&dir)?;
        Ok(V2Cgroup { root: root.to_path_buf(), dir })
    }

    /// An existing cgroup directory (fixture directories in tests).
    pub fn at(root: &Path, dir: &Path) -> V2Cgroup {
        V2Cgroup { root: root.to_path_buf(), dir: dir.to_path_buf() }
    }
}

/// Enables what `dir` offers of [`CONTROLLERS`] for its children; a controller the kernel
/// refuses (e.g. cpuset without the cpus configured) is left out, with a log line.
fn enable_controllers(dir: &Path) {
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    for c in CONTROLLERS {
        if available.split_whitespace().any(|a| a == *c) && !enabled.split_whitespace().any(|e| e == *c) {
            if let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")) {
                tracing::warn!(dir = %dir.display(), controller = c, error = %e, "enabling cgroup controller failed");
            }
        }
    }
}

impl TaskCgroup for V2Cgroup {
    fn procs_files(&self) -> Vec<PathBuf> {
        vec![self.dir.join("cgroup.procs")]
    }

    fn apply(&self, limits: &Limits) -> Result<(), CgroupError> {
        memory::apply(&self.dir, &self.root, true, limits)?;
        cpu::apply(&self.dir, &self.root, true, limits)?;
        pids::apply(&self.dir, &self.root, true, limits)?;
        cpuset::apply(&self.dir, &self.root, true, limits)?;
        devices::apply(&self.dir, &self.root, true, limits)
    }

    fn pids(&self) -> Vec<u32> {
        read_pids(&self.dir.join("cgroup.procs"))
    }

    fn stats(&self) -> Stats {
        let mut s = Stats::default();
        (s.cpu_total_ns, s.cpu_throttled_ns) = cpu::stats(&self.dir, &self.dir, true);
        (s.memory_rss_bytes, s.memory_cache_bytes, s.memory_max_usage_bytes) = memory::stats(&self.dir, true);
        s.oom_kills = memory::oom_kills(&self.dir, true);
        s.pids = pids::current(&self.dir);
        s
    }

    fn remove(&self) -> Result<(), CgroupError> {
        // cgroup.kill (5.14+) kills the whole tree at once; callers SIGKILL what remains.
        let kill = self.dir.join("cgroup.kill");
        if kill.exists() && !self.pids().is_empty() {
            let _ = std::fs::write(&kill, "1");
        }
        rmdir(&self.dir)
    }

    fn paths(&self) -> Vec<PathBuf> {
        vec![self.dir.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v2 cgroup directory as the kernel shows it, with the files our controllers touch.
    fn fixture() -> Result<(tempfile::TempDir, PathBuf), std::io::Error> {
        let root = tempfile::tempdir()?;
        let parent = root.path().join("mlp");
        let dir = parent.join("a1-task");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(parent.join("cpuset.cpus.effective"), "0-3\n")?;
        for (f, v) in [
            ("cgroup.procs", "41\n42\n"),
            ("cpu.weight", "100\n"),
            ("cpu.max", "max 100000\n"),
            ("cpu.stat", "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\nnr_periods 10\nnr_throttled 3\nthrottled_usec 700\n"),
            ("cpuset.cpus", ""),
            ("memory.max", "max\n"),
            ("memory.low", "0\n"),
            ("memory.swap.max", "max\n"),
            ("memory.stat", "anon 1048576\nfile 4096\nkernel 0\n"),
            ("memory.peak", "2097152\n"),
            ("memory.events", "low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\noom_group_kill 0\n"),
            ("pids.max", "max\n"),
            ("pids.current", "2\n"),
        ] {
            std::fs::write(dir.join(f), v)?;
        }
        Ok((root, dir))
    }

    fn read(dir: &Path, f: &str) -> String {
        std::fs::read_to_string(dir.join(f)).unwrap_or_default().trim().to_string()
    }

    #[test]
    fn v2_applies_limits_to_the_right_files() -> Result<(), Box<dyn std::error::Error>> {
        let (root, dir) = fixture()?;
        let cg = V2Cgroup::at(root.path(), &dir);
        cg.apply(&Limits {
            cpu_shares: 1024,
            cpu_quota_us: Some(50_000),
            cores: Some(2),
            cpus: vec![1, 3],
            memory_bytes: Some(256 << 20),
            memory_soft_bytes: Some(128 << 20),
            pids: Some(64),
            devices: None,
        })?;
        assert_eq!(read(&dir, "cpu.weight"), "39");
        assert_eq!(read(&dir, "cpu.max"), "50000 100000");
        assert_eq!(read(&dir, "cpuset.cpus"), "1,3", "the CPUs the allocator chose");
        assert_eq!(read(&dir, "memory.max"), (256u64 << 20).to_string());
        assert_eq!(read(&dir, "memory.swap.max"), "0");
        assert_eq!(read(&dir, "memory.low"), (128u64 << 20).to_string());
        assert_eq!(read(&dir, "pids.max"), "64");
        Ok(())
    }

    #[test]
    fn v2_reads_stats_and_oom_kills() -> Result<(), Box<dyn std::error::Error>> {
        let (root, dir) = fixture()?;
        let cg = V2Cgroup::at(root.path(), &dir);
        assert_eq!(cg.pids(), vec![41, 42]);
        assert_eq!(cg.procs_files(), vec![dir.join("cgroup.procs")]);
        let s = cg.stats();
        assert_eq!(
            s,
            Stats {
                cpu_total_ns: 2_500_000,
                cpu_throttled_ns: 700_000,
                memory_rss_bytes: 1 << 20,
                memory_cache_bytes: 4096,
                memory_max_usage_bytes: 2 << 20,
                pids: 2,
                oom_kills: 1,
            }
        );
        Ok(())
    }
}
