//! `mlp-supervise-helper`: only the task supervisor and its zygote of the `mlp` binary
//! (`mlp-supervise-helper __mlp-supervise-zygote` / `__mlp-supervise <config>`), for the agent crate's own tests, which
//! run the agent inside a test binary that cannot supervise tasks itself
//! (`IsolationSettings::supervisor_exe`). Production agents use the `mlp` binary.

fn main() {
    mlp_agent::task::supervisor::maybe_run_supervisor();
    eprintln!("usage: mlp-supervise-helper __mlp-supervise <config> (started by the mlp agent)");
    std::process::exit(2);
}
