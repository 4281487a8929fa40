//! capnet's supervisor library: sandboxes for grains and driver hosts, and the small
//! system-call layer they rest on.

pub mod sandbox;
pub mod sys;
