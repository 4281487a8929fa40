//! The stable API for capnet network driver plugins: policy, limits and name resolution.

pub mod limits;
pub mod policy;
pub mod resolve;
