//! capnet's supervisor: `capnetd` (the privileged daemon), `capnet` (the administrator's
//! command line) and `capnet-driver-host` (the process that loads one driver plugin).
//!
//! Code map:
//! * [`daemon`] wires everything and runs until told to stop.
//! * [`config`] reads the administrator's TOML.
//! * [`drivers`] starts, watches and restarts driver hosts; [`driver_host`] is the code
//!   that runs inside one.
//! * [`grains`] starts grains and serves the grain API on their fd 3.
//! * [`powerbox`] queues grains' requests for an administrator; [`grants`] keeps what was
//!   granted; [`membrane`] proxies every call between grains and drivers.
//! * [`admin`] serves the administrator's API; [`cli`] is its command-line client.
//! * [`audit`] records security-relevant events; [`state`] is the SQLite state database;
//!   [`persist`] saves and restores capabilities as tokens.
//! * [`sandbox`] builds the namespaced, cgroup-limited, seccomp-filtered processes that
//!   grains and driver hosts run in; [`sandboxes`] is the daemon's use of it (one
//!   spawner, host ids, blocking work off the RPC thread).
//! * [`sys`] holds every raw system call and foreign-function call of this crate.

pub mod admin;
pub mod audit;
pub mod cli;
pub mod config;
pub mod config_edit;
pub mod daemon;
pub mod driver_host;
pub mod drivers;
pub mod grains;
pub mod grants;
pub mod membrane;
pub mod membrane_udp;
pub mod persist;
pub mod powerbox;
pub mod sandbox;
pub mod sandboxes;
pub mod signing;
pub mod state;
pub mod sys;
