//! One task: the [`runner`] that drives it through its lifecycle over a driver, the pure
//! [`restart`] decision, the [`supervisor`] process that runs it outside the agent, and its
//! [`logs`] (size-rotated files written by the supervisor, read by the logs RPC).

pub mod logs;
pub mod restart;
pub mod runner;
pub mod supervisor;
