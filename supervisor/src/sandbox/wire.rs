//! What travels from the supervisor to the helper (the spec, as JSON over a pipe) and
//! back (setup errors, as JSON lines over a close-on-exec pipe).
//!
//! The error pipe doubles as the "setup finished" signal: every stage holds a
//! close-on-exec copy of its write end, the init writes [`INIT_READY`] once it is locked
//! down, and the supervisor reads to end-of-file, which comes once the app has exec'd
//! (or everything died).

use std::io::Write;
use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;

use super::Role;

/// The spec as the helper receives it; fd fields are fd numbers in the helper.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WireSpec {
    pub id: String,
    pub role: Role,
    /// Program path inside the sandbox, or `None` when `program_fd` is set.
    pub program_path: Option<PathBuf>,
    pub program_fd: Option<RawFd>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub app_dir: Option<PathBuf>,
    pub var_dir: Option<PathBuf>,
    pub ro_binds: Vec<(PathBuf, PathBuf)>,
    pub tmp_size_bytes: u64,
    pub nofile: u64,
    pub fsize_bytes: u64,
    pub host_uid: u32,
    pub host_gid: u32,
    pub rpc_fd: RawFd,
    pub extra_fds: Vec<(RawFd, RawFd)>,
    pub log_fd: Option<RawFd>,
    pub error_fd: RawFd,
    /// Capability names (`CAP_NET_BIND_SERVICE`).
    pub ambient_caps: Vec<String>,
    /// `cgroup.procs` files the helper writes its pid into.
    pub cgroup_procs: Vec<PathBuf>,
}

impl WireSpec {
    /// The fds meant for the app only (RPC socket, extra fds, log, program image),
    /// without duplicates. The helper and the init close their copies once the app has
    /// its own, so the app's closing one (say the driver host's status pipe, or a grain's
    /// fd 3) is seen by the supervisor as end-of-file at once.
    pub fn app_fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = std::iter::once(self.rpc_fd)
            .chain(self.extra_fds.iter().map(|e| e.0))
            .chain(self.log_fd)
            .chain(self.program_fd)
            .collect();
        fds.sort_unstable();
        fds.dedup();
        fds
    }

    /// Closes this process's copies of [`WireSpec::app_fds`].
    pub fn close_app_fds(&self) {
        for fd in self.app_fds() {
            drop(crate::sys::owned_from_inherited(fd));
        }
    }
}

/// Byte the init writes to the error pipe when it is fully locked down.
pub const INIT_READY: u8 = b'I';

/// A stage's setup failure, one JSON line on the error pipe.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StageError {
    pub stage: String,
    pub message: String,
}

/// The error pipe's write end as seen by a stage.
#[derive(Debug)]
pub struct ErrorPipe {
    fd: Option<OwnedFd>,
}

impl ErrorPipe {
    /// Takes ownership of fd number `fd` (inherited from the supervisor); a closed
    /// number yields a pipe that reports nothing.
    pub fn from_inherited(fd: RawFd) -> Self {
        ErrorPipe {
            fd: crate::sys::owned_from_inherited(fd).ok(),
        }
    }

    /// The raw fd number, if open.
    pub fn raw(&self) -> Option<RawFd> {
        use std::os::fd::AsRawFd;
        self.fd.as_ref().map(|f| f.as_raw_fd())
    }

    /// Reports a failure of `stage` (best effort: there is nobody else to tell).
    pub fn report(&self, stage: &str, message: impl std::fmt::Display) {
        let line = StageError {
            stage: stage.to_string(),
            message: message.to_string(),
        };
        if let (Some(fd), Ok(mut text)) = (&self.fd, serde_json::to_vec(&line)) {
            text.push(b'\n');
            let mut f = std::fs::File::from(match fd.try_clone() {
                Ok(f) => f,
                Err(_) => return,
            });
            let _ = f.write_all(&text);
        }
    }

    /// Writes the init's ready marker.
    pub fn ready(&self) {
        if let Some(fd) = &self.fd
            && let Ok(dup) = fd.try_clone()
        {
            let _ = std::fs::File::from(dup).write_all(&[INIT_READY]);
        }
    }

    /// Closes this stage's copy.
    pub fn close(&mut self) {
        self.fd = None;
    }
}

/// Parses what the supervisor read from the error pipe: `Ok(())` if the init reported
/// ready and no stage reported an error.
pub fn parse_report(bytes: &[u8]) -> Result<(), StageError> {
    let mut ready = false;
    for line in bytes.split(|b| *b == b'\n') {
        let mut line = line;
        while let Some((&INIT_READY, rest)) = line.split_first() {
            ready = true;
            line = rest;
        }
        if line.is_empty() {
            continue;
        }
        return Err(
            serde_json::from_slice::<StageError>(line).unwrap_or_else(|_| StageError {
                stage: "unknown".into(),
                message: String::from_utf8_lossy(line).into_owned(),
            }),
        );
    }
    if ready {
        Ok(())
    } else {
        Err(StageError {
            stage: "helper".into(),
            message: "the sandbox died before its init reported ready".into(),
        })
    }
}
