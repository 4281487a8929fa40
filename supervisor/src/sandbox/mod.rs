//! Sandboxes for grains and driver hosts.
//!
//! A sandbox is built in four process stages, each with less privilege than the last:
//!
//! ```text
//! supervisor (root, multi-threaded)
//!   └─ spawner thread: fork + exec of the sealed helper image (std::process::Command)
//!        └─ capnet-sandbox helper (root, single-threaded): joins the cgroups,
//!           clone(NEWUSER|NEWPID|NEWNS|NEWIPC|NEWUTS|NEWCGROUP[|NEWNET]), writes the
//!           id maps, then waits and mirrors the app's exit status
//!             └─ init (PID 1 of the new pid ns, uid 1000 in the user ns): hostname,
//!                loopback, new root (pivot_root), forks the app, then drops every
//!                capability, sets no_new_privs, loads seccomp, reaps and forwards signals
//!                  └─ app: setsid, rlimits, fds 0-3 only, no capabilities,
//!                     no_new_privs, not dumpable, seccomp last, execve
//! ```
//!
//! One module per kernel mechanism: [`namespaces`], [`cgroups`], [`seccomp`],
//! [`rootfs`], [`caps`]; the stages live in [`spawn`] (supervisor side), [`helper`],
//! [`init`] and [`app`]. `docs/sandbox.md` describes the whole design.
//!
//! Entry points: [`Spawner::new`] once at supervisor start, [`Spawner::spawn`] per
//! sandbox (blocking: call it from a blocking thread), then [`Sandboxed`] to watch,
//! stop and tear down.

pub mod app;
pub mod caps;
pub mod cgroups;
pub mod helper;
pub mod init;
pub mod namespaces;
pub mod rootfs;
pub mod seccomp;
pub mod spawn;
pub(crate) mod wire;

use std::os::fd::OwnedFd;
use std::path::PathBuf;

pub use self::cgroups::{CgroupError, CgroupStats, CgroupVersion, SandboxCgroup};
pub use self::spawn::{
    ExitReason, HelperImage, HelperImageError, SandboxExit, Sandboxed, SpawnError, Spawner,
    SpawnerError, TeardownError, WaitError,
};
pub use ::caps::Capability;

/// The uid and gid every sandboxed process has *inside* its user namespace.
pub const SANDBOX_UID: u32 = 1000;

/// What kind of sandbox to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Role {
    /// An application instance: own empty network namespace (loopback only).
    Grain,
    /// A driver host: stays in the host network namespace and sees the resolver
    /// configuration and CA certificates read-only; it is expected to call
    /// [`seccomp::lock_down_driver_host`] once its plugin is loaded.
    DriverHost,
}

impl Role {
    /// Short name used in cgroup names and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Grain => "grain",
            Role::DriverHost => "driver",
        }
    }
}

/// The program the app stage executes.
#[derive(Debug)]
pub enum Program {
    /// A path inside the sandbox (for example `/app/bin/server` or `/bin/true`).
    Path(PathBuf),
    /// An executable image held in an fd (for example a sealed memfd made by
    /// [`HelperImage`]-style copying), executed with `execveat(fd, "", AT_EMPTY_PATH)`.
    /// The fd is closed on exec, so the program never sees it.
    Fd(OwnedFd),
}

/// Resource limits of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory limit (swap is limited to the same total where the kernel accounts it).
    pub memory_bytes: u64,
    /// Maximum number of tasks (processes and threads) of the app. The helper and the
    /// init, which also live in the cgroup, are added on top.
    pub pids: u64,
    /// CPU quota in thousandths of a core (1000 = one core); 0 = unlimited.
    pub cpu_millis: u64,
    /// `RLIMIT_NOFILE` (soft and hard).
    pub nofile: u64,
    /// `RLIMIT_FSIZE` in bytes (soft and hard).
    pub fsize_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 256 << 20,
            pids: 128,
            cpu_millis: 1000,
            nofile: 1024,
            fsize_bytes: 1 << 30,
        }
    }
}

/// Everything needed to build one sandbox. The fds are moved into the sandbox (the
/// supervisor's copies are closed once the helper has them).
#[derive(Debug)]
pub struct SandboxSpec {
    /// Identifier: hostname inside, part of the cgroup name. `[A-Za-z0-9._-]{1,63}`.
    pub id: String,
    /// Grain or driver host.
    pub role: Role,
    /// What to execute.
    pub program: Program,
    /// `argv[1..]` (`argv[0]` is the program path, or the id for [`Program::Fd`]).
    pub args: Vec<String>,
    /// The complete environment (nothing is inherited).
    pub env: Vec<(String, String)>,
    /// Host directory mounted read-only at `/app`.
    pub app_dir: Option<PathBuf>,
    /// Host directory mounted writable (noexec) at `/var`; it outlives the sandbox.
    /// It should be owned by `host_uid` for the app to write to it.
    pub var_dir: Option<PathBuf>,
    /// Extra read-only binds `(host path, path inside)`, e.g. `/usr` for dynamically
    /// linked programs. See [`SandboxSpec::system_binds`].
    pub ro_binds: Vec<(PathBuf, PathBuf)>,
    /// Size cap of the `/tmp` tmpfs (and of `/dev/shm`).
    pub tmp_size_bytes: u64,
    /// Resource limits.
    pub limits: Limits,
    /// Host uid the sandbox's uid 1000 maps to (an unprivileged id, unique per sandbox).
    pub host_uid: u32,
    /// Host gid the sandbox's gid 1000 maps to.
    pub host_gid: u32,
    /// Becomes fd 3 of the app (the Cap'n Proto socket).
    pub rpc_fd: OwnedFd,
    /// Further fds for the app, with the fd number each must have (> 3).
    pub extra_fds: Vec<(OwnedFd, i32)>,
    /// Becomes stdout and stderr of the app; `None` = `/dev/null`.
    pub log_fd: Option<OwnedFd>,
    /// Capabilities to keep as ambient capabilities (driver hosts only; empty for grains).
    /// Note: they are capabilities *in the sandbox's user namespace*; they do not grant
    /// anything over host-owned resources such as the host network namespace.
    pub ambient_caps: Vec<Capability>,
}

impl SandboxSpec {
    /// Read-only binds of the host's `/usr`, `/lib`, `/lib64` and `/bin` (those that
    /// exist), enough to run dynamically linked programs from the host.
    pub fn system_binds() -> Vec<(PathBuf, PathBuf)> {
        ["/usr", "/lib", "/lib64", "/bin"]
            .into_iter()
            .filter(|p| std::path::Path::new(p).exists())
            .map(|p| (PathBuf::from(p), PathBuf::from(p)))
            .collect()
    }
}
