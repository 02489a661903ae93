//! One task: the [`runner`] that drives it through its lifecycle over a driver, the pure
//! [`restart`] decision, the [`supervisor`] process that runs it outside the agent, and its
//! [`logs`] (size-rotated files written by the supervisor and the wasm driver, read by the logs
//! RPC; they live in `driver::logs`, since the wasm driver writes them too).

pub use crate::driver::logs;
pub mod restart;
pub mod runner;
pub mod supervisor;
