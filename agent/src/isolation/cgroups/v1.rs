//! cgroup v1: one directory per controller hierarchy (`<mount>/mlp/<name>`), found through
//! /proc/self/mountinfo. Also used on hybrid machines, where the unified mount has no
//! controllers.

use std::collections::BTreeSet;
use std::path::PathBuf;

use cgroups_rs::fs::hierarchies::V1;
use cgroups_rs::fs::Controllers;

use super::{cpu, cpuset, devices, memory, mkdir, pids, read_pids, rmdir, CgroupError, Limits, Stats, TaskCgroup, PARENT};

/// One controller's directory in its hierarchy.
#[derive(Debug, Clone)]
struct Dir {
    ctrl: Controllers,
    mount: PathBuf,
    path: PathBuf,
}

/// The controllers a task cgroup uses, in the order of [`mount_point`]'s cache.
const CONTROLLERS: [Controllers; 6] =
    [Controllers::Mem, Controllers::Cpu, Controllers::CpuAcct, Controllers::Pids, Controllers::CpuSet, Controllers::Devices];

/// Where `ctrl`'s v1 hierarchy is mounted: read from `/proc/self/mountinfo` once per process
/// (like the driver's layout), not on every start.
fn mount_point(ctrl: &Controllers) -> Option<PathBuf> {
    static MOUNTS: std::sync::OnceLock<Vec<Option<PathBuf>>> = std::sync::OnceLock::new();
    let mounts = MOUNTS.get_or_init(|| {
        let hier = V1::new();
        CONTROLLERS.iter().map(|c| hier.get_mount_point(c.clone()).map(|(mount, _root)| mount)).collect()
    });
    let i = CONTROLLERS.iter().position(|c| c == ctrl)?;
    mounts.get(i).cloned().flatten()
}

/// A task cgroup on v1 hierarchies.
#[derive(Debug)]
pub struct V1Cgroup {
    dirs: Vec<Dir>,
}

impl V1Cgroup {
    /// The directories [`V1Cgroup::create`] makes, one per hierarchy (nothing is created).
    fn dirs(name: &str, with_cpuset: bool, with_devices: bool) -> Result<Vec<Dir>, CgroupError> {
        let mut wanted = vec![Controllers::Mem, Controllers::Cpu, Controllers::CpuAcct, Controllers::Pids];
        if with_cpuset {
            wanted.push(Controllers::CpuSet);
        }
        if with_devices {
            wanted.push(Controllers::Devices);
        }
        let mut dirs: Vec<Dir> = Vec::new();
        for ctrl in wanted {
            let Some(mount) = mount_point(&ctrl) else {
                return Err(CgroupError::Unavailable(format!("no v1 hierarchy for {ctrl}")));
            };
            let path = mount.join(PARENT).join(name);
            if dirs.iter().any(|d| d.path == path) {
                // cpu and cpuacct usually share one hierarchy.
                continue;
            }
            dirs.push(Dir { ctrl, mount, path });
        }
        Ok(dirs)
    }

    /// The `cgroup.procs` files of `mlp/<name>` as [`V1Cgroup::create`] would make it.
    pub fn procs_files_for(name: &str, with_cpuset: bool, with_devices: bool) -> Result<Vec<PathBuf>, CgroupError> {
        Ok(Self::dirs(name, with_cpuset, with_devices)?.into_iter().map(|d| d.path.join("cgroup.procs")).collect())
    }

    /// Creates `mlp/<name>` in the memory, cpu, cpuacct and pids hierarchies (cpuset when the
    /// task pins cores, devices when it has a device allow-list).
    pub fn create(name: &str, with_cpuset: bool, with_devices: bool) -> Result<V1Cgroup, CgroupError> {
        let dirs = Self::dirs(name, with_cpuset, with_devices)?;
        let cg = V1Cgroup { dirs };
        for d in &cg.dirs {
            let result = mkdir(&d.path).and_then(|()| {
                if matches!(d.ctrl, Controllers::CpuSet) {
                    if let Some(parent) = d.path.parent() {
                        cpuset::inherit_v1(parent)?;
                    }
                    cpuset::inherit_v1(&d.path)?;
                }
                Ok(())
            });
            if let Err(e) = result {
                let _ = cg.remove();
                return Err(e);
            }
        }
        Ok(cg)
    }

    fn dir(&self, ctrl: Controllers) -> Option<&Dir> {
        self.dirs.iter().find(|d| d.ctrl == ctrl)
    }

    /// The directory of the hierarchy that holds `ctrl` (it may have been merged with another).
    fn path_for(&self, ctrl: Controllers, file: &str) -> Option<PathBuf> {
        if let Some(d) = self.dir(ctrl) {
            return Some(d.path.clone());
        }
        self.dirs.iter().find(|d| d.path.join(file).exists()).map(|d| d.path.clone())
    }
}

impl TaskCgroup for V1Cgroup {
    fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.path.join("cgroup.procs")).collect()
    }

    fn apply(&self, limits: &Limits) -> Result<(), CgroupError> {
        for d in &self.dirs {
            match d.ctrl {
                Controllers::Mem => memory::apply(&d.path, &d.mount, false, limits)?,
                Controllers::Cpu => cpu::apply(&d.path, &d.mount, false, limits)?,
                Controllers::Pids => pids::apply(&d.path, &d.mount, false, limits)?,
                Controllers::CpuSet => cpuset::apply(&d.path, &d.mount, false, limits)?,
                Controllers::Devices => devices::apply(&d.path, &d.mount, false, limits)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn pids(&self) -> Vec<u32> {
        let all: BTreeSet<u32> = self.procs_files().iter().flat_map(|f| read_pids(f)).collect();
        all.into_iter().collect()
    }

    fn stats(&self) -> Stats {
        let mut s = Stats::default();
        if let Some(cpu_dir) = self.path_for(Controllers::Cpu, "cpu.stat") {
            let acct = self.path_for(Controllers::CpuAcct, "cpuacct.usage").unwrap_or_else(|| cpu_dir.clone());
            (s.cpu_total_ns, s.cpu_throttled_ns) = cpu::stats(&cpu_dir, &acct, false);
        }
        if let Some(mem) = self.dir(Controllers::Mem) {
            (s.memory_rss_bytes, s.memory_cache_bytes, s.memory_max_usage_bytes) = memory::stats(&mem.path, false);
            s.oom_kills = memory::oom_kills(&mem.path, false);
        }
        if let Some(p) = self.dir(Controllers::Pids) {
            s.pids = pids::current(&p.path);
        }
        s
    }

    fn remove(&self) -> Result<(), CgroupError> {
        let mut first_err = None;
        for d in &self.dirs {
            if let Err(e) = rmdir(&d.path) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn paths(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.path.clone()).collect()
    }
}
