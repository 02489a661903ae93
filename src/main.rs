//! The `mlp` binary: CLI parsing and the wiring of `mlp server`, `mlp agent` and `mlp dev`.
//! The logic lives in the `mlp-server`, `mlp-agent` and `mlp-proto` crates.

mod acl;
mod allocator;
mod cli;
mod client;
mod commands;
mod daemon;
mod deployments;
mod follow;
mod ha;
mod jobtypes;
mod namespace;
mod output;
mod services;
mod sim;
mod tls;
mod tracking;

use std::process::ExitCode;

use clap::Parser;

/// `mlp --version`: the crate's version and the target the binary was built for.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("MLP_BUILD_TARGET"), ")");

/// mimalloc for the daemons, glibc's malloc for short-lived processes (see `allocator`).
#[global_allocator]
static ALLOCATOR: allocator::Allocator = allocator::Allocator;

fn main() -> ExitCode {
    allocator::forget_options();
    // `mlp __mlp-supervise-zygote` is the agent's zygote, which forks task supervisors, and
    // `mlp __mlp-supervise <config>` one supervisor (see mlp_agent::task::supervisor); a
    // supervisor forks an exec task's namespaces, so both must run before anything starts a
    // thread.
    mlp_agent::task::supervisor::maybe_run_supervisor();
    // `mlp __mlp-exec-enter` is an `mlp alloc exec` session entering a task (single-threaded too).
    mlp_agent::rpc::exec_session::maybe_run_enter();
    let cli = cli::Cli::parse_from(namespace::nomad_flags(acl::nomad_flags(tls::nomad_style_args(std::env::args_os().collect()))));
    // The daemons need the worker pool; a CLI call is one request and a few awaits, and a
    // single-threaded runtime saves it starting (and, at exit, joining) a thread per core.
    let daemon =
        matches!(cli.command, cli::Command::Server(cli::ServerArgs { action: None, .. }) | cli::Command::Agent(_) | cli::Command::Dev(_));
    if !daemon {
        restore_sigpipe();
    }
    let mut builder = if daemon { tokio::runtime::Builder::new_multi_thread() } else { tokio::runtime::Builder::new_current_thread() };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = match rt.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::from(1)
        }
    };
    // A CLI call is done once its output is written: the process exits without waiting for
    // the runtime's idle blocking threads (file reads) to be woken and joined.
    if !daemon {
        rt.shutdown_background();
    }
    code
}

/// A CLI call whose output goes to a pipe that closed (`mlp node status | head -1`, `grep -q`)
/// ends quietly, as Unix tools do, instead of panicking on the failed write: Rust ignores
/// SIGPIPE by default, which is right for the daemons (a client gone mid-response) only.
#[allow(unsafe_code)]
fn restore_sigpipe() {
    // SAFETY: `signal` with SIG_DFL only resets a disposition; no handler runs our code, and
    // no other thread exists yet.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
