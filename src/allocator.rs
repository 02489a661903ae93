//! The global allocator. In the glibc build: mimalloc for the long-running daemons (`mlp
//! server`, `mlp agent`, `mlp dev`), glibc's malloc for every short-lived process (a CLI call, the
//! agent's zygote and the task supervisors it forks, an exec session). In the static musl build
//! (for CLI machines, servers and CPU nodes): mimalloc for every process.
//!
//! Why two in the glibc build (docs/benchmarks.md, "Raft writes vs etcd"): under etcd's write
//! load glibc's malloc and free were about a fifth of the servers' CPU, and mimalloc took the
//! three servers from 1,985 to 2,571 registrations/s (medians of alternated runs). But a process
//! that lives a few milliseconds pays for mimalloc's first arena (fresh pages, ~140 more page
//! faults): an `mlp job run` took ~1 ms more CPU with it, which is what the CLI comparisons
//! against Slurm measure. musl's own malloc is the slower one even there: it gives memory back
//! with `munmap` as soon as a group of blocks is free, so a short process maps and unmaps (and
//! faults in) the same pages over and over (~0.3 ms of a 1.8 ms CLI call in `munmap` alone);
//! with mimalloc the static binary's CLI call took 1.53 ms of CPU against 1.77 ms
//! (docs/benchmarks.md, "Runs 65–69").
//!
//! The glibc build's choice is made once, before the first allocation, from the command line:
//! glibc calls `.init_array` functions with `argc, argv, envp`, and [`CHOOSE`] sits in the first
//! priority left to programs (101; std's own argv hook is at 99 and does not allocate), so it
//! runs before Rust's runtime and every other constructor. It never changes afterwards, so every
//! block is freed by the allocator that made it. A command line read the wrong way would only
//! pick the other allocator; off Linux it is always the system's.
//!
//! Memory: mimalloc is built without asking for transparent huge pages (Cargo.toml says why),
//! and a daemon purges freed pages at once (`MIMALLOC_PURGE_DELAY=0`, unless set by hand):
//! with mimalloc's 1 s delay, a server that went idle after registering 10,000 jobs kept 290 MiB
//! of RSS against glibc's 182 MiB, and with no delay 181 MiB, at no measurable cost in
//! registrations/s. The option is handed over through the environment, which mimalloc reads in
//! its own initialisation (after [`CHOOSE`]), and taken out again at the start of `main`
//! ([`forget_options`]), so that nothing the daemon starts inherits it. musl calls
//! `.init_array` functions with no arguments, so there [`CHOOSE`] reads `/proc/self/cmdline`
//! with plain syscalls to learn whether this is a daemon.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};

use mimalloc::MiMalloc;

/// Whether every process allocates with mimalloc (the static musl build), not only the daemons.
const MIMALLOC_FOR_ALL: bool = cfg!(all(target_os = "linux", target_env = "musl"));
/// Whether this process allocates with mimalloc: set (before `main`, before any thread) when it
/// is a daemon, and always in the musl build.
static MIMALLOC: AtomicBool = AtomicBool::new(MIMALLOC_FOR_ALL);
/// Set when [`CHOOSE`] put `MIMALLOC_PURGE_DELAY` in the environment.
static PURGE_OPTION_SET: AtomicBool = AtomicBool::new(false);

/// Takes the options [`CHOOSE`] handed to mimalloc out of the environment again (mimalloc has
/// read them by now). Called first thing in `main`, while the process has one thread.
pub fn forget_options() {
    if PURGE_OPTION_SET.load(Ordering::Relaxed) {
        std::env::remove_var("MIMALLOC_PURGE_DELAY");
    }
}

/// Whether the command line (arguments after the program name) starts a daemon: `server`
/// (but not `server members`), `agent`, `dev`.
pub fn is_daemon<'a>(mut args: impl Iterator<Item = &'a [u8]>) -> bool {
    match args.next() {
        Some(b"agent" | b"dev") => true,
        Some(b"server") => args.next().is_none_or(|next| next.starts_with(b"-")),
        _ => false,
    }
}

/// Whether this process allocates with mimalloc.
pub fn is_mimalloc() -> bool {
    MIMALLOC.load(Ordering::Relaxed)
}

/// This process's allocator, for the daemons' start-up log line.
pub fn describe() -> &'static str {
    match (is_mimalloc(), PURGE_OPTION_SET.load(Ordering::Relaxed)) {
        (true, true) => "mimalloc, freed pages purged at once",
        (true, false) => "mimalloc",
        (false, _) => "the C library's malloc",
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[used]
#[link_section = ".init_array.00101"]
static CHOOSE: extern "C" fn(std::ffi::c_int, *const *const std::ffi::c_char, *const *const std::ffi::c_char) = choose_from_argv;

/// glibc passes `.init_array` functions the process's `argc, argv, envp`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
extern "C" fn choose_from_argv(argc: std::ffi::c_int, argv: *const *const std::ffi::c_char, _envp: *const *const std::ffi::c_char) {
    if argv.is_null() {
        return;
    }
    let argc = usize::try_from(argc).unwrap_or(0);
    let args = (1..argc).filter_map(|i| {
        // SAFETY: glibc passes the process's own argc and argv: `argv[0..argc]` are valid
        // pointers to NUL-terminated strings that live as long as the process.
        let arg = unsafe { *argv.add(i) };
        // SAFETY: as above, a non-null `argv[i]` is a NUL-terminated string.
        (!arg.is_null()).then(|| unsafe { std::ffi::CStr::from_ptr(arg) }.to_bytes())
    });
    choose(args);
}

#[cfg(all(target_os = "linux", not(target_env = "gnu")))]
#[used]
#[link_section = ".init_array.00101"]
static CHOOSE: extern "C" fn() = choose_from_proc;

/// musl (the static release binary, docs/ARCHITECTURE.md) calls `.init_array` functions with no
/// arguments: the command line comes from `/proc/self/cmdline`, read with plain syscalls into a
/// buffer on the stack (nothing may allocate yet). Without `/proc` a daemon keeps mimalloc's
/// default purge delay: more memory held while idle, nothing worse.
#[cfg(all(target_os = "linux", not(target_env = "gnu")))]
extern "C" fn choose_from_proc() {
    let mut buf = [0u8; 4096];
    // SAFETY: open(2) of a NUL-terminated literal path.
    let fd = unsafe { libc::open(c"/proc/self/cmdline".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return;
    }
    let mut len = 0;
    while len < buf.len() {
        let rest = &mut buf[len..];
        // SAFETY: read(2) into the unused tail of a buffer this function owns; `rest.len()`
        // bytes are writable there.
        let n = unsafe { libc::read(fd, rest.as_mut_ptr().cast(), rest.len()) };
        match usize::try_from(n) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(_) if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    // SAFETY: closes the fd opened above, used by nothing else.
    unsafe { libc::close(fd) };
    choose(cmdline_args(&buf[..len]));
}

#[cfg(any(test, all(target_os = "linux", not(target_env = "gnu"))))]
/// The arguments after the program name in `/proc/self/cmdline`'s format (each argument ends
/// with a NUL; a command line longer than the buffer is cut, which keeps its first arguments).
pub fn cmdline_args(cmdline: &[u8]) -> impl Iterator<Item = &[u8]> {
    cmdline.strip_suffix(&[0]).unwrap_or(cmdline).split(|b| *b == 0).skip(1)
}

/// Picks the allocator from the command line's arguments (mimalloc for a daemon; in the musl
/// build it already is for every process), and sets mimalloc's options for a daemon. Runs before
/// `main`, before any thread exists.
#[cfg(target_os = "linux")]
fn choose<'a>(args: impl Iterator<Item = &'a [u8]>) {
    let daemon = is_daemon(args);
    if daemon {
        MIMALLOC.store(true, Ordering::Relaxed);
    }
    // SAFETY: this runs before `main` and before any thread exists; getenv and setenv get
    // NUL-terminated literals, and setenv copies them.
    if daemon && unsafe { libc::getenv(c"MIMALLOC_PURGE_DELAY".as_ptr()) }.is_null() {
        // SAFETY: as above.
        if unsafe { libc::setenv(c"MIMALLOC_PURGE_DELAY".as_ptr(), c"0".as_ptr(), 0) } == 0 {
            PURGE_OPTION_SET.store(true, Ordering::Relaxed);
        }
    }
}

/// The global allocator (see the module).
pub struct Allocator;

// SAFETY: every method forwards to one of two sound allocators, chosen by a flag that is set
// before the first allocation and never changes, so a block is always resized and freed by the
// allocator that made it.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe {
            if is_mimalloc() {
                MiMalloc.alloc(layout)
            } else {
                System.alloc(layout)
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe {
            if is_mimalloc() {
                MiMalloc.alloc_zeroed(layout)
            } else {
                System.alloc_zeroed(layout)
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed on unchanged; `ptr` came from the same
        // allocator (the flag has not changed since it was allocated).
        unsafe {
            if is_mimalloc() {
                MiMalloc.dealloc(ptr, layout)
            } else {
                System.dealloc(ptr, layout)
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`.
        unsafe {
            if is_mimalloc() {
                MiMalloc.realloc(ptr, layout, new_size)
            } else {
                System.realloc(ptr, layout, new_size)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{cmdline_args, is_daemon};

    fn daemon(args: &[&str]) -> bool {
        is_daemon(args.iter().map(|a| a.as_bytes()))
    }

    #[test]
    fn the_daemons_and_only_they_get_mimalloc() {
        for args in [&["dev"][..], &["agent", "--config", "a.hcl"], &["server"], &["server", "--data-dir", "d"], &["dev", "--help"]] {
            assert!(daemon(args), "{args:?}");
        }
        for args in
            [&[][..], &["job", "run", "j.hcl"], &["server", "members"], &["__mlp-supervise-zygote"], &["--version"], &["node", "status"]]
        {
            assert!(!daemon(args), "{args:?}");
        }
    }

    #[test]
    fn a_proc_cmdline_gives_the_arguments_after_the_program_name() {
        let args = |c: &[u8]| cmdline_args(c).map(|a| String::from_utf8_lossy(a).into_owned()).collect::<Vec<_>>();
        assert_eq!(args(b"/usr/bin/mlp\0server\0"), ["server"]);
        assert_eq!(args(b"mlp\0server\0--data-dir\0d\0"), ["server", "--data-dir", "d"]);
        assert_eq!(args(b"mlp\0job\0run\0\0"), ["job", "run", ""]);
        assert!(args(b"mlp\0").is_empty());
        assert!(args(b"").is_empty());
        // The trailing NUL is no empty argument: `mlp server` alone is a daemon.
        assert!(is_daemon(cmdline_args(b"mlp\0server\0")));
        assert!(!is_daemon(cmdline_args(b"mlp\0server\0members\0")));
        assert!(is_daemon(cmdline_args(b"mlp\0dev\0")));
        assert!(!is_daemon(cmdline_args(b"mlp\0job\0run\0j.hcl\0")));
    }
}
