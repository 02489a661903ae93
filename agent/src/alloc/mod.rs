//! Allocations on this node: the [`manager`] that follows the servers' allocation set and
//! restores what a previous agent run left, one [`runner`] per allocation (its directories and
//! task runners), and the per-allocation [`state`] (persisted `state.json` and the in-memory
//! registry the RPCs read).

pub mod manager;
pub mod runner;
pub mod state;
