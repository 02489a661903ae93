//! The NVIDIA driver's user-space files a CUDA program needs (the container toolkit's
//! "compute" and "utility" sets): found in the host's loader cache (`ldconfig -p`) and under
//! [`GpuSettings::driver_root`]'s `lib`, `lib64` and `bin`, once per agent, and bound into the
//! tasks that have real GPUs. Finding nothing is not an error (a task without the driver's
//! libraries fails on its own, with CUDA's message).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::GpuSettings;

/// Library name prefixes (`libcuda.so` matches `libcuda.so`, `libcuda.so.1`, `libcuda.so.550.54`).
pub const LIBRARIES: &[&str] = &[
    "libcuda.so",
    "libnvidia-ml.so",
    "libnvidia-ptxjitcompiler.so",
    "libnvidia-nvvm.so",
    "libnvidia-gpucomp.so",
    "libcudadebugger.so",
    "libnvidia-allocator.so",
    "libnvidia-cfg.so",
    "libnvidia-opencl.so",
];

/// Binaries.
pub const BINARIES: &[&str] =
    &["nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control", "nvidia-cuda-mps-server"];

/// How long `ldconfig -p` may take.
const LDCONFIG_TIMEOUT: Duration = Duration::from_secs(5);

/// The driver files of this host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriverFiles {
    /// Libraries, binaries and the symlinks' targets (host paths, bound at the same path).
    pub files: Vec<PathBuf>,
    /// Directories of libraries the loader does not know (not in its cache): a task's
    /// `LD_LIBRARY_PATH` gets them.
    pub lib_dirs: Vec<PathBuf>,
    /// Directories of the binaries found under the driver root: a task's `PATH` gets them.
    pub bin_dirs: Vec<PathBuf>,
}

fn is_library(name: &str) -> bool {
    LIBRARIES.iter().any(|l| name.strip_prefix(l).is_some_and(|rest| rest.is_empty() || rest.starts_with('.')))
}

/// The 64-bit entries of `ldconfig -p` output as (name, path): lines like
/// `\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1` (`AArch64`,
/// `64bit` on other hosts; 32-bit entries are left out).
pub fn parse_ldconfig(out: &str) -> Vec<(String, PathBuf)> {
    out.lines()
        .filter_map(|line| {
            let (left, path) = line.split_once(" => ")?;
            let (name, flags) = left.trim().split_once(' ')?;
            flags.contains("64").then(|| (name.to_string(), PathBuf::from(path.trim())))
        })
        .collect()
}

/// The driver files from `ldconfig` (`ldconfig -p` output) and `driver_root`. `list_dir` lists
/// a directory's entries (empty when it does not exist) and `link_target` resolves a symlink's
/// target to a host path (None for anything else), so that the search is testable.
pub fn find(
    ldconfig: &str,
    driver_root: Option<&Path>,
    list_dir: impl Fn(&Path) -> Vec<PathBuf>,
    link_target: impl Fn(&Path) -> Option<PathBuf>,
) -> DriverFiles {
    let mut out = DriverFiles::default();
    let add = |files: &mut Vec<PathBuf>, path: PathBuf| {
        // A symlink (libcuda.so.1 -> libcuda.so.550.54.15) needs its target in the root too.
        let mut next = Some(path);
        while let Some(p) = next.take() {
            if files.contains(&p) {
                break;
            }
            next = link_target(&p);
            files.push(p);
        }
    };
    let cached: Vec<PathBuf> = parse_ldconfig(ldconfig).into_iter().filter(|(name, _)| is_library(name)).map(|(_, p)| p).collect();
    let cache_dirs: Vec<PathBuf> = cached.iter().filter_map(|p| p.parent().map(Path::to_path_buf)).collect();
    for p in cached {
        add(&mut out.files, p);
    }
    if let Some(root) = driver_root {
        for dir in [root.join("lib"), root.join("lib64")] {
            let libs: Vec<PathBuf> =
                list_dir(&dir).into_iter().filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(is_library)).collect();
            if !libs.is_empty() && !cache_dirs.contains(&dir) && !out.lib_dirs.contains(&dir) {
                out.lib_dirs.push(dir.clone());
            }
            for p in libs {
                add(&mut out.files, p);
            }
        }
        let bin = root.join("bin");
        let bins: Vec<PathBuf> =
            list_dir(&bin).into_iter().filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| BINARIES.contains(&n))).collect();
        if !bins.is_empty() {
            out.bin_dirs.push(bin);
        }
        for p in bins {
            add(&mut out.files, p);
        }
    }
    out
}

/// `ldconfig -p`'s output, or empty when it cannot run or takes longer than
/// [`LDCONFIG_TIMEOUT`].
fn ldconfig_p() -> String {
    use std::process::{Command, Stdio};
    let child = ["/sbin/ldconfig", "/usr/sbin/ldconfig", "ldconfig"]
        .iter()
        .find_map(|exe| Command::new(exe).arg("-p").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().ok());
    let Some(mut child) = child else {
        tracing::debug!("ldconfig not found; driver libraries only from the driver root");
        return String::new();
    };
    // Read on a thread, so that a full pipe cannot stall the deadline below.
    let stdout = child.stdout.take();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut out) = stdout {
            let _ = std::io::Read::read_to_string(&mut out, &mut s);
        }
        s
    });
    let deadline = Instant::now() + LDCONFIG_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                tracing::debug!("ldconfig -p did not finish in time; driver libraries only from the driver root");
                let _ = child.kill();
                let _ = child.wait();
                return String::new();
            }
        }
    }
    reader.join().unwrap_or_default()
}

fn list_dir(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
    out.sort();
    out
}

fn link_target(path: &Path) -> Option<PathBuf> {
    let target = std::fs::read_link(path).ok()?;
    Some(match path.parent() {
        Some(parent) if target.is_relative() => parent.join(target),
        _ => target,
    })
}

/// This host's driver files for `settings`: searched on the first call, the same answer after.
pub fn discover(settings: &GpuSettings) -> &'static DriverFiles {
    static FILES: std::sync::OnceLock<DriverFiles> = std::sync::OnceLock::new();
    FILES.get_or_init(|| {
        let found = find(&ldconfig_p(), settings.driver_root.as_deref(), list_dir, link_target);
        if found.files.is_empty() {
            tracing::debug!(driver_root = ?settings.driver_root, "no NVIDIA driver files found for tasks");
        } else {
            tracing::debug!(files = found.files.len(), lib_dirs = ?found.lib_dirs, bin_dirs = ?found.bin_dirs, "NVIDIA driver files for tasks");
        }
        found
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LDCONFIG: &str = "\
3 libs found in cache `/etc/ld.so.cache'
\tlibz.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libz.so.1
\tlibnvidia-ml.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1
\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1
\tlibcuda.so.1 (libc6) => /usr/lib/i386-linux-gnu/libcuda.so.1
\tlibcudart.so.12 (libc6,x86-64) => /usr/local/cuda/lib64/libcudart.so.12
\tlibcuda.so (libc6,AArch64) => /usr/lib/aarch64-linux-gnu/libcuda.so
";

    #[test]
    fn finds_the_loader_cache_and_the_driver_root() {
        let listing = |dir: &Path| -> Vec<PathBuf> {
            let names: &[&str] = match dir.to_str() {
                Some("/opt/nv/lib64") => &["libcuda.so.1", "libcuda.so.550.54", "libcudart.so.12", "libnvidia-cfg.so.1"],
                Some("/opt/nv/bin") => &["nvidia-smi", "nvidia-cuda-mps-control", "bash"],
                _ => &[],
            };
            names.iter().map(|n| dir.join(n)).collect()
        };
        let links = |p: &Path| -> Option<PathBuf> {
            match p.to_str()? {
                "/usr/lib/x86_64-linux-gnu/libcuda.so.1" => Some("/usr/lib/x86_64-linux-gnu/libcuda.so.550.54".into()),
                "/opt/nv/lib64/libcuda.so.1" => Some("/opt/nv/lib64/libcuda.so.550.54".into()),
                _ => None,
            }
        };
        let found = find(LDCONFIG, Some(Path::new("/opt/nv")), listing, links);
        let files: Vec<&str> = found.files.iter().filter_map(|p| p.to_str()).collect();
        assert_eq!(
            files,
            [
                "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
                "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
                "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54",
                "/usr/lib/aarch64-linux-gnu/libcuda.so",
                "/opt/nv/lib64/libcuda.so.1",
                "/opt/nv/lib64/libcuda.so.550.54",
                "/opt/nv/lib64/libnvidia-cfg.so.1",
                "/opt/nv/bin/nvidia-smi",
                "/opt/nv/bin/nvidia-cuda-mps-control",
            ],
            "the driver's files only (no libz, libcudart, 32-bit libcuda, bash), symlink targets too"
        );
        assert_eq!(found.lib_dirs, [PathBuf::from("/opt/nv/lib64")]);
        assert_eq!(found.bin_dirs, [PathBuf::from("/opt/nv/bin")]);
        // Nothing anywhere: nothing, no error.
        assert_eq!(find("", None, listing, links), DriverFiles::default());
        assert!(is_library("libcuda.so") && is_library("libcuda.so.1") && !is_library("libcudart.so.12") && !is_library("libcuda.sox"));
    }
}
