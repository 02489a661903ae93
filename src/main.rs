//! The `mlp` binary: CLI parsing and the wiring of `mlp server`, `mlp agent` and `mlp dev`.
//! The logic lives in the `mlp-server`, `mlp-agent` and `mlp-proto` crates.

mod cli;
mod client;
mod commands;
mod daemon;
mod ha;
mod output;
mod sim;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // `mlp __mlp-supervise <config>` is a task's supervisor (see mlp_agent::task::supervisor),
    // which also forks an exec task's namespaces; it must run before anything starts a thread.
    mlp_agent::task::supervisor::maybe_run_supervisor();
    // `mlp __mlp-exec-enter` is an `mlp alloc exec` session entering a task (single-threaded too).
    mlp_agent::rpc::exec_session::maybe_run_enter();
    let cli = cli::Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::from(1)
        }
    }
}
