//! What the end-to-end tests need from the machine, checked in one place. A missing
//! prerequisite fails the test with a message naming it and how to install it; only
//! `MLP_TEST_ALLOW_SKIP=1`, set by hand, turns that failure into a skip (CI never sets it).
#![allow(dead_code)]

use std::process::{Command, Stdio};

/// The `mlp` binary the end-to-end tests run: this build's, or the one `MLP_TEST_BIN` names (CI
/// runs some of them against the static release binary too, scripts/check-static.sh). Only the
/// root crate's tests have a build's `mlp` (the agent's tests share this module without one).
pub fn mlp() -> &'static str {
    static BIN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| match std::env::var("MLP_TEST_BIN") {
        Ok(bin) => bin,
        Err(_) => match option_env!("CARGO_BIN_EXE_mlp") {
            Some(bin) => bin.to_string(),
            None => panic!("this crate's tests build no mlp binary: set MLP_TEST_BIN"),
        },
    });
    &BIN
}

/// Set by hand to let a test whose prerequisites are missing pass as skipped.
pub const ALLOW_SKIP_VAR: &str = "MLP_TEST_ALLOW_SKIP";

/// One thing a test needs from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Running as root (uid 0).
    Root,
    /// `ip netns add` works (root and iproute2).
    NetNs,
    /// The `nft` binary (nftables), for packet-loss faults.
    Nft,
    /// The `tc` binary (iproute2), for bandwidth faults.
    Tc,
    /// A cgroup hierarchy the agent can use (v2, or v1 with cpu, memory and pids).
    Cgroups,
}

impl Need {
    /// `None` when present, else what is missing and how to get it.
    fn missing(self) -> Option<String> {
        match self {
            Need::Root => (!nix::unistd::geteuid().is_root()).then(|| {
                format!("root (running as uid {}); run the tests as root, e.g. `sudo -E cargo nextest run`", nix::unistd::geteuid())
            }),
            Need::NetNs => {
                if !binary_runs("ip", &["-V"]) {
                    return Some("the `ip` command (iproute2); install it with `apt-get install iproute2`".into());
                }
                // One name per probe: the tests of one binary probe in parallel (with one name
                // per process, a second `ip netns add` saw the first's file and failed).
                static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let probe = format!("mlpprobe-{}-{n}", std::process::id());
                let out = Command::new("ip").args(["netns", "add", &probe]).stdin(Stdio::null()).output();
                match out {
                    Ok(o) if o.status.success() => {
                        let _ = Command::new("ip").args(["netns", "del", &probe]).output();
                        None
                    }
                    Ok(o) => Some(format!(
                        "network namespaces (`ip netns add` failed: {}); run as root on a kernel with network namespaces (CONFIG_NET_NS)",
                        String::from_utf8_lossy(&o.stderr).trim()
                    )),
                    Err(e) => Some(format!("network namespaces (`ip netns add` could not run: {e})")),
                }
            }
            Need::Nft => (!binary_runs("nft", &["--version"]))
                .then(|| "the `nft` command (nftables); install it with `apt-get install nftables`".into()),
            Need::Tc => {
                (!binary_runs("tc", &["-V"])).then(|| "the `tc` command (iproute2); install it with `apt-get install iproute2`".into())
            }
            Need::Cgroups => (!cgroups_mounted()).then(|| {
                "a cgroup hierarchy (cgroup2 mounted at /sys/fs/cgroup, or cgroup v1 with the cpu, memory and pids \
                 controllers); mount one (`mount -t cgroup2 none /sys/fs/cgroup`) or run on a host or privileged container that has it"
                    .into()
            }),
        }
    }
}

/// A cgroup2 mount, or cgroup v1 mounts of the cpu, memory and pids controllers (what the
/// agent's exec driver needs; read from mountinfo so that the check does not depend on the
/// agent's own module layout).
fn cgroups_mounted() -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v1 = std::collections::BTreeSet::new();
    for line in mountinfo.lines() {
        let Some((_, after)) = line.split_once(" - ") else { continue };
        let mut fields = after.split_whitespace();
        match (fields.next(), fields.nth(1)) {
            (Some("cgroup2"), _) => return true,
            (Some("cgroup"), Some(opts)) => v1.extend(opts.split(',').map(str::to_string)),
            _ => {}
        }
    }
    ["cpu", "memory", "pids"].iter().all(|c| v1.contains(*c))
}

fn binary_runs(name: &str, args: &[&str]) -> bool {
    Command::new(name).args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Checks `needs`. Returns `true` when all are present. When something is missing it panics
/// with what is missing and how to install it, unless `MLP_TEST_ALLOW_SKIP=1` is set: then it
/// prints `SKIPPED (MLP_TEST_ALLOW_SKIP)` and returns `false`, and the test returns at once.
pub fn require(needs: &[Need]) -> bool {
    let missing: Vec<String> = needs.iter().filter_map(|n| n.missing()).collect();
    if missing.is_empty() {
        return true;
    }
    let list = missing.join("\n  - ");
    if std::env::var(ALLOW_SKIP_VAR).is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED ({ALLOW_SKIP_VAR}): this test needs:\n  - {list}");
        return false;
    }
    panic!(
        "this test cannot run: missing\n  - {list}\n(`.ci/run` installs what the tests need; set {ALLOW_SKIP_VAR}=1 by hand to skip instead)"
    );
}
