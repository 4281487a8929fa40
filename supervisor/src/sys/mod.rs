//! The only place in the supervisor crate that calls raw system calls or foreign code.
//! Every `unsafe` block states the invariants it relies on.

pub mod plugin;
pub mod process;
