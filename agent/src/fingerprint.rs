//! Node fingerprinting: CPU, memory, disk, OS, kernel, cgroup version, drivers and the configured
//! simulated GPUs, turned into a [`Node`] with Nomad-like attribute keys. Parsers work on strings so they can be tested on
//! fixtures.

use std::collections::BTreeMap;
use std::path::Path;

use mlp_proto::consts::node_status;
use mlp_proto::v1::{Node, NodeResources};

use crate::AgentConfig;

/// What /proc/cpuinfo says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CpuInfo {
    /// Logical processors.
    pub cores: u32,
    /// `cpu MHz` of the first processor, if present.
    pub mhz: Option<u64>,
    /// `model name`.
    pub model_name: String,
}

/// Parses /proc/cpuinfo.
pub fn parse_cpuinfo(text: &str) -> CpuInfo {
    let mut info = CpuInfo::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        match k {
            "processor" => info.cores += 1,
            "model name" | "Model Name" if info.model_name.is_empty() => info.model_name = v.to_string(),
            "cpu MHz" if info.mhz.is_none() => info.mhz = v.parse::<f64>().ok().filter(|m| *m > 0.0).map(|m| m.round() as u64),
            _ => {}
        }
    }
    info
}

/// Parses `MemTotal` from /proc/meminfo, in bytes.
pub fn parse_meminfo_total(text: &str) -> Option<u64> {
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("MemTotal:") {
            let mut it = rest.split_whitespace();
            let n: u64 = it.next()?.parse().ok()?;
            let unit = it.next().unwrap_or("kB");
            return Some(if unit.eq_ignore_ascii_case("kb") { n * 1024 } else { n });
        }
    }
    None
}

/// Parses /etc/os-release into (NAME-like id, VERSION_ID).
pub fn parse_os_release(text: &str) -> (String, String) {
    let mut vars = BTreeMap::new();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once('=') {
            vars.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
        }
    }
    let name = vars.get("ID").or_else(|| vars.get("NAME")).cloned().unwrap_or_default();
    let version = vars.get("VERSION_ID").cloned().unwrap_or_default();
    (name, version)
}

/// Decides the cgroup version from: whether /sys/fs/cgroup is cgroup2 with controllers, and
/// /proc/self/mountinfo text.
pub fn cgroup_version(unified: bool, controllers: &str, mountinfo: &str) -> String {
    if unified && !controllers.trim().is_empty() {
        return "v2".into();
    }
    let mut v1 = false;
    let mut unified_mount = false;
    for line in mountinfo.lines() {
        // "... - fstype source options"
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let fstype = post.split_whitespace().next().unwrap_or("");
        let mount_point = pre.split_whitespace().nth(4).unwrap_or("");
        if fstype == "cgroup" {
            v1 = true;
        }
        if fstype == "cgroup2" && mount_point == "/sys/fs/cgroup/unified" {
            unified_mount = true;
        }
        if fstype == "cgroup2" && mount_point == "/sys/fs/cgroup" && !v1 {
            unified_mount = true;
        }
    }
    match (v1, unified_mount) {
        (true, true) => "hybrid".into(),
        (true, false) => "v1".into(),
        (false, true) => "v2".into(),
        (false, false) => {
            if unified {
                "v2".into()
            } else {
                "none".into()
            }
        }
    }
}

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
}

/// The default node name: the hostname.
pub fn default_node_name() -> String {
    hostname()
}

/// Fingerprints this machine. The node has status `initializing`; `id` and `rpc_addr` are
/// filled by the agent.
pub fn fingerprint(config: &AgentConfig, gpu: &crate::gpu::Backend) -> Node {
    let cpu = parse_cpuinfo(&read("/proc/cpuinfo"));
    let mut cores = if cpu.cores > 0 {
        cpu.cores
    } else {
        std::thread::available_parallelism().map(|n| u32::try_from(n.get()).unwrap_or(1)).unwrap_or(1)
    };
    // The servers count `cores` against this total; the exec driver can pin tasks only to the
    // CPUs the agent's cgroup parent allows, so that is the node's total where it is smaller.
    let pool = crate::isolation::cgroups::host_layout()
        .map(|l| crate::isolation::cgroups::cpu_pool(&l).len())
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0);
    if pool > 0 && pool < cores {
        tracing::warn!(cpus = cores, allowed = pool, "the agent's cpuset allows fewer CPUs than the machine has; registering those");
        cores = pool;
    }
    let mhz = cpu
        .mhz
        .or_else(|| read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").trim().parse::<u64>().ok().map(|khz| khz / 1000))
        .filter(|m| *m > 0)
        .unwrap_or(1000);
    let mem_bytes = parse_meminfo_total(&read("/proc/meminfo")).unwrap_or(0);
    let (disk_free, disk_total) = match nix::sys::statvfs::statvfs(&config.data_dir) {
        Ok(s) => {
            let frag = s.fragment_size();
            (s.blocks_available() * frag, s.blocks() * frag)
        }
        Err(e) => {
            tracing::warn!(error = %e, "statvfs on the data dir failed");
            (0, 0)
        }
    };
    let (os_name, os_version) = parse_os_release(&read("/etc/os-release"));
    let uts = nix::sys::utsname::uname().ok();
    let (kernel_name, kernel_version, arch) = match &uts {
        Some(u) => (
            u.sysname().to_string_lossy().to_lowercase(),
            u.release().to_string_lossy().into_owned(),
            u.machine().to_string_lossy().into_owned(),
        ),
        None => ("linux".into(), String::new(), std::env::consts::ARCH.into()),
    };
    let unified = cgroups_rs::fs::hierarchies::is_cgroup2_unified_mode();
    let cg = cgroup_version(unified, &read("/sys/fs/cgroup/cgroup.controllers"), &read("/proc/self/mountinfo"));

    let mut attrs = BTreeMap::new();
    attrs.insert("cpu.numcores".into(), cores.to_string());
    attrs.insert("cpu.frequency".into(), mhz.to_string());
    attrs.insert("cpu.totalcompute".into(), (u64::from(cores) * mhz).to_string());
    attrs.insert("cpu.modelname".into(), cpu.model_name.clone());
    attrs.insert("cpu.arch".into(), arch);
    attrs.insert("memory.totalbytes".into(), mem_bytes.to_string());
    attrs.insert("kernel.name".into(), kernel_name);
    attrs.insert("kernel.version".into(), kernel_version);
    attrs.insert("os.name".into(), os_name);
    attrs.insert("os.version".into(), os_version);
    attrs.insert("unique.hostname".into(), hostname());
    attrs.insert("cgroup.version".into(), cg);
    attrs.insert("unique.storage.bytesfree".into(), disk_free.to_string());
    attrs.insert("unique.storage.bytestotal".into(), disk_total.to_string());
    // GPUs from the configured source (today only simulated ones, `--simulated-gpus`, marked so
    // in every device and in `gpu.simulated`). The agent refuses to start on devices the source
    // rejects, so an error here only drops the GPUs.
    let gpus = match gpu.devices() {
        Ok(gpus) => {
            attrs.extend(gpu.attributes(&gpus));
            gpus
        }
        Err(e) => {
            tracing::warn!(error = %e, "GPU devices rejected; registering none");
            attrs.insert("gpu.unavailable".into(), e.to_string());
            Vec::new()
        }
    };
    let mut drivers = Vec::new();
    // raw_exec only forks/execs, which always works on Linux; exec needs root (namespaces,
    // mounts, switching users) and a cgroup hierarchy with controllers.
    let exec_ok = nix::unistd::geteuid().is_root() && crate::isolation::cgroups::host_layout().is_some();
    for d in &config.drivers_enabled {
        let isolated = d == mlp_proto::consts::driver::EXEC || d == mlp_proto::consts::driver::OCI;
        if isolated && !exec_ok {
            tracing::warn!(driver = %d, "the driver needs root and cgroups; not offered on this node");
            continue;
        }
        // oci needs the agent's image store, which the agent makes at start.
        if d == mlp_proto::consts::driver::OCI || crate::driver::drivers_for(std::slice::from_ref(d)).contains_key(d) {
            attrs.insert(format!("driver.{d}"), "1".into());
            drivers.push(d.clone());
        }
    }

    // Drivers this agent knows but its configuration leaves off: the scheduler names them in
    // placement failures ("driver raw_exec disabled on node X") instead of "missing driver".
    let disabled: Vec<&str> =
        crate::config_file::KNOWN_DRIVERS.iter().copied().filter(|d| !config.drivers_enabled.iter().any(|e| e == d)).collect();
    if !disabled.is_empty() {
        attrs.insert(mlp_proto::consts::DRIVERS_DISABLED_ATTR.into(), disabled.join(","));
    }
    for (name, v) in &config.host_volumes {
        use mlp_proto::consts::host_volume;
        attrs.insert(host_volume::attr(name), if v.read_only { host_volume::READ_ONLY } else { host_volume::READ_WRITE }.into());
    }

    Node {
        id: String::new(),
        name: config.node_name.clone(),
        datacenter: config.datacenter.clone(),
        status: node_status::INITIALIZING.into(),
        eligible: true,
        rpc_addr: String::new(),
        resources: Some(NodeResources {
            cpu_cores: cores,
            cpu_mhz_per_core: mhz,
            cpu_total_mhz: u64::from(cores) * mhz,
            memory_mib: mem_bytes / (1024 * 1024),
            disk_mib: disk_free / (1024 * 1024),
            gpus,
            min_dynamic_port: config.network.min_dynamic_port,
            max_dynamic_port: config.network.max_dynamic_port,
        }),
        attributes: attrs,
        meta: config.meta.clone(),
        drivers,
        node_pool: config.node_pool.clone(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPUINFO: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\ncpu MHz\t\t: 2199.998\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\ncpu MHz\t\t: 2300.000\n";

    #[test]
    fn cpuinfo() {
        let c = parse_cpuinfo(CPUINFO);
        assert_eq!(c.cores, 2);
        assert_eq!(c.mhz, Some(2200));
        assert_eq!(c.model_name, "Intel(R) Xeon(R) CPU @ 2.20GHz");
        // ARM: no MHz
        let arm = parse_cpuinfo("processor : 0\nBogoMIPS : 50.00\n\nprocessor : 1\n");
        assert_eq!(arm.cores, 2);
        assert_eq!(arm.mhz, None);
    }

    #[test]
    fn meminfo() {
        let m = "MemTotal:       16303428 kB\nMemFree:         1234 kB\n";
        assert_eq!(parse_meminfo_total(m), Some(16303428 * 1024));
        assert_eq!(parse_meminfo_total("nothing"), None);
    }

    #[test]
    fn os_release() {
        let t = "NAME=\"Ubuntu\"\nVERSION_ID=\"22.04\"\nID=ubuntu\n";
        assert_eq!(parse_os_release(t), ("ubuntu".into(), "22.04".into()));
    }

    #[test]
    fn cgroups() {
        let v2 = "35 24 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup_version(true, "cpu memory io", v2), "v2");
        let v1 = "30 24 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(cgroup_version(false, "", v1), "v1");
        let hybrid = format!("{v1}29 24 0:25 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate\n");
        assert_eq!(cgroup_version(false, "", &hybrid), "hybrid");
    }

    #[test]
    fn fingerprint_this_machine() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let cfg = AgentConfig { data_dir: dir.path().to_path_buf(), ..Default::default() };
        let n = fingerprint(&cfg, &cfg.gpu_backend());
        assert_eq!(n.status, node_status::INITIALIZING);
        let r = n.resources.clone().unwrap_or_default();
        assert!(r.cpu_cores > 0 && r.cpu_mhz_per_core > 0);
        assert_eq!(r.cpu_total_mhz, u64::from(r.cpu_cores) * r.cpu_mhz_per_core);
        assert_eq!(n.attributes.get("kernel.name").map(String::as_str), Some("linux"));
        assert_eq!(n.attributes.get("driver.exec").map(String::as_str), Some("1"));
        assert_eq!(n.attributes.get("driver.wasm").map(String::as_str), Some("1"));
        assert_eq!(n.attributes.get("driver.oci").map(String::as_str), Some("1"));
        // raw_exec is off by default (issue 15 §4), and named as disabled.
        assert_eq!(n.drivers, vec!["exec".to_string(), "wasm".to_string(), "oci".to_string()]);
        assert_eq!(n.attributes.get(mlp_proto::consts::DRIVERS_DISABLED_ATTR).map(String::as_str), Some("raw_exec"));
        assert!(r.gpus.is_empty() && !n.attributes.contains_key("gpu.simulated"));
        for k in [
            "cpu.numcores",
            "cpu.frequency",
            "cpu.arch",
            "memory.totalbytes",
            "cgroup.version",
            "unique.storage.bytesfree",
            "os.name",
            "unique.hostname",
        ] {
            assert!(n.attributes.contains_key(k), "missing {k}");
        }
        Ok(())
    }

    #[test]
    fn simulated_gpus_are_registered() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let gpus = crate::gpu::simulated::parse(
            "g.json",
            r#"{"generate": {"count": 2, "model": "H100-SXM5-80GB", "memory_mib": 81920, "nvlink": "all"}}"#,
        )?;
        let cfg = AgentConfig { data_dir: dir.path().to_path_buf(), simulated_gpus: gpus.clone(), ..Default::default() };
        let n = fingerprint(&cfg, &cfg.gpu_backend());
        assert_eq!(n.resources.unwrap_or_default().gpus, gpus);
        let attr = |k: &str| n.attributes.get(k).map(String::as_str);
        assert_eq!(attr("gpu.simulated"), Some("true"));
        assert_eq!(attr("gpu.count"), Some("2"));
        assert_eq!(attr("gpu.model"), Some("H100-SXM5-80GB"));
        Ok(())
    }
}
