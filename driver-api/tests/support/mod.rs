//! Test support shared by the integration tests: a tiny DNS server on loopback.

#![allow(dead_code)]

pub mod dns;
