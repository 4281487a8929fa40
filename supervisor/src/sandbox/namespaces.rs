//! Linux namespaces: what a sandbox can see.
//!
//! Mechanism: `clone()` with `CLONE_NEW*` flags gives the child fresh instances of the
//! user (ids and capabilities), pid (process tree), mount (filesystem view), ipc (SysV
//! IPC, POSIX queues), uts (hostname), cgroup (cgroup paths) and — for grains — network
//! (interfaces, ports, routes) namespaces. The helper, still root on the host, then
//! writes the user namespace's id maps.
//!
//! Threat answered: visibility and ambient authority. A grain must not see or signal
//! host processes, reach host services on 127.0.0.1, or see host mounts; and any
//! capability it might hold must be a capability over its own namespaces only.
//!
//! Id mapping choice: exactly one uid and one gid are mapped — [`SANDBOX_UID`] inside ↔
//! the spec's unprivileged `host_uid`/`host_gid` outside. Root inside maps to nothing.
//! The init needs capabilities in the new user namespace to build the mount tree; it gets
//! them from `clone()` itself and keeps them across its switch to uid 1000 with
//! `PR_SET_KEEPCAPS` (see [`super::init`]), so no root mapping is needed. `setgroups` is
//! denied, and the helper clears its supplementary groups *before* the clone, so the
//! sandbox holds no host group (a group that could never be dropped afterwards).

use std::fs;
use std::io;
use std::path::PathBuf;

use super::{Role, SANDBOX_UID};

/// Why configuring a namespace failed.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    /// Writing `/proc/<pid>/{setgroups,uid_map,gid_map}` failed.
    #[error("cannot write {value:?} to {path}: {source}")]
    IdMap {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The error.
        source: io::Error,
    },
    /// `sethostname` failed.
    #[error("cannot set hostname to {name:?}: {source}")]
    Hostname {
        /// The hostname.
        name: String,
        /// The error.
        source: nix::Error,
    },
    /// Bringing `lo` up failed.
    #[error("cannot bring the loopback interface up: {0}")]
    Loopback(io::Error),
}

/// The `clone()` flags for a sandbox of `role`.
pub fn clone_flags(role: Role) -> libc::c_int {
    let mut flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP;
    if role == Role::Grain {
        flags |= libc::CLONE_NEWNET;
    }
    flags
}

/// Writes `setgroups`=deny and the single-id uid/gid maps of process `pid`.
pub fn write_id_maps(pid: i32, host_uid: u32, host_gid: u32) -> Result<(), NamespaceError> {
    let w = |file: &str, value: String| -> Result<(), NamespaceError> {
        let path = PathBuf::from(format!("/proc/{pid}/{file}"));
        fs::write(&path, &value).map_err(|source| NamespaceError::IdMap {
            path,
            value,
            source,
        })
    };
    w("setgroups", "deny".into())?;
    w("gid_map", format!("{SANDBOX_UID} {host_gid} 1\n"))?;
    w("uid_map", format!("{SANDBOX_UID} {host_uid} 1\n"))?;
    Ok(())
}

/// Sets the hostname of the (new) uts namespace.
pub fn set_hostname(name: &str) -> Result<(), NamespaceError> {
    nix::unistd::sethostname(name).map_err(|source| NamespaceError::Hostname {
        name: name.to_string(),
        source,
    })
}

/// Brings `lo` up in the (new) network namespace.
pub fn loopback_up() -> Result<(), NamespaceError> {
    crate::sys::loopback_up().map_err(NamespaceError::Loopback)
}
