//! Persistent network namespaces: a namespace lives as long as its nsfs file is bind-mounted
//! (`<data-dir>/netns/<alloc>`), like `ip netns` does under `/run/netns`. Creating one moves
//! the calling thread into it, so only a dedicated thread may call [`create_on_this_thread`].

use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

use super::NetworkError;

/// Whether `path` is a namespace's bind mount (a plain file left behind is not).
pub fn exists(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

/// Moves this thread into a new network namespace and keeps it alive at `path`. The thread
/// stays in the namespace: it must be one that runs nothing else (see `links`).
pub fn create_on_this_thread(path: &Path) -> Result<(), NetworkError> {
    unshare(CloneFlags::CLONE_NEWNET).map_err(|e| NetworkError::Io { what: "unshare(CLONE_NEWNET)".into(), source: e.into() })?;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(NetworkError::io(format!("creating {}", path.display())))?;
    mount(Some("/proc/thread-self/ns/net"), path, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| NetworkError::Io { what: format!("bind-mounting the namespace on {}", path.display()), source: e.into() })
}

/// Unmounts and removes a namespace's file; the namespace goes once nothing is in it. Missing
/// files and files that are not mounted are fine.
pub fn remove(path: &Path) -> Result<(), NetworkError> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(NetworkError::Io { what: format!("unmounting {}", path.display()), source: e.into() }),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NetworkError::Io { what: format!("removing {}", path.display()), source: e }),
    }
}

/// Moves this thread into the namespace at `path` (the supervisor, before it starts a
/// `raw_exec` task; the init of an `exec` task).
pub fn enter(path: &Path) -> Result<(), NetworkError> {
    let f = std::fs::File::open(path).map_err(NetworkError::io(format!("opening {}", path.display())))?;
    nix::sched::setns(&f, CloneFlags::CLONE_NEWNET)
        .map_err(|e| NetworkError::Io { what: format!("joining {}", path.display()), source: e.into() })
}
