//! Stage 1, supervisor side: the sealed helper image, the spawner thread, and the handle
//! to a running sandbox.
//!
//! Mechanism:
//! - [`HelperImage`] copies the `capnet-sandbox` binary once into a memfd and seals it
//!   (`F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE`); every helper is exec'd
//!   from `/proc/self/fd/N` of that memfd. No sandboxed process can ever rewrite the
//!   code that runs as root around it (runc's CVE-2019-5736 defence).
//! - [`Spawner`] owns one long-lived thread that performs every fork+exec.
//!   `PR_SET_PDEATHSIG` fires when the *thread* that forked a child exits, so forking
//!   from short-lived threads (tokio's blocking pool) would kill sandboxes at random;
//!   from one thread that lives as long as the spawner, it fires exactly when the
//!   supervisor dies (or the spawner is dropped). Between fork and exec the child runs
//!   only async-signal-safe code ([`crate::sys::command_pre_exec`]).
//! - The spec goes to the helper as JSON over a pipe; fds to hand on are inherited
//!   (close-on-exec cleared in the child only), their numbers are in the spec.
//! - A close-on-exec error pipe reports setup failures from any stage; its end-of-file
//!   after the init's ready byte means the app has been exec'd ([`super::wire`]).
//! - [`Sandboxed`] holds a pidfd of the helper, whose exit status mirrors the app's, and
//!   the sandbox's cgroups for stats and teardown.
//!
//! Threat answered: escapes through the supervisor's own process machinery (a
//! rewritable helper binary, leaked fds, orphaned sandboxes after a supervisor crash).

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, OFlag, SealFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::memfd::{MFdFlags, memfd_create};

use super::cgroups::{CgroupError, CgroupLimits, CgroupRoot, CgroupStats, SandboxCgroup};
use super::rootfs::{MountError, check_sandbox_path};
use super::wire::{StageError, WireSpec, parse_report};
use super::{Program, SandboxSpec};
use crate::sys;

/// The helper and the init live in the sandbox's pids cgroup too.
pub const PIDS_OVERHEAD: u64 = 2;

/// How long a sandbox may take from spawn to exec of the app before it is killed.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long teardown waits for processes to leave the cgroups.
pub const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why loading the helper image failed.
#[derive(Debug, thiserror::Error)]
pub enum HelperImageError {
    /// Reading the helper binary failed.
    #[error("cannot read helper binary {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Creating, writing or sealing the memfd failed.
    #[error("cannot create the sealed helper memfd ({step}): {source}")]
    Memfd {
        /// Which step.
        step: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// An immutable, sealed in-memory copy of the `capnet-sandbox` helper binary.
#[derive(Debug)]
pub struct HelperImage {
    fd: OwnedFd,
}

impl HelperImage {
    /// Reads `path` once into a sealed memfd.
    pub fn load(path: &Path) -> Result<Self, HelperImageError> {
        Self::load_named(path, c"capnet-sandbox")
    }

    /// Reads `path` once into a sealed memfd called `name` (what `/proc/PID/exe` of a
    /// process executed from it shows, as `/memfd:NAME`).
    pub fn load_named(path: &Path, name: &std::ffi::CStr) -> Result<Self, HelperImageError> {
        let read_err = |source| HelperImageError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut src = std::fs::File::open(path).map_err(read_err)?;
        // File to file: the kernel copies (copy_file_range / sendfile), no buffer here.
        Self::sealed(name, |memfd| {
            std::io::copy(&mut src, memfd).map(drop).map_err(read_err)
        })
    }

    /// Seals `bytes` into a memfd.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, HelperImageError> {
        Self::sealed(c"capnet-sandbox", |memfd| {
            memfd
                .write_all(bytes)
                .map_err(|source| HelperImageError::Memfd {
                    step: "write",
                    source,
                })
        })
    }

    /// A memfd called `name`, filled by `fill`, then sealed against any change.
    fn sealed(
        name: &std::ffi::CStr,
        fill: impl FnOnce(&mut std::fs::File) -> Result<(), HelperImageError>,
    ) -> Result<Self, HelperImageError> {
        let step = |step| {
            move |e: nix::Error| HelperImageError::Memfd {
                step,
                source: e.into(),
            }
        };
        let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
            .map_err(step("memfd_create"))?;
        let mut file = std::fs::File::from(fd);
        fill(&mut file)?;
        let fd = OwnedFd::from(file);
        fcntl(
            &fd,
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SEAL
                    | SealFlag::F_SEAL_SHRINK
                    | SealFlag::F_SEAL_GROW
                    | SealFlag::F_SEAL_WRITE,
            ),
        )
        .map_err(step("seal"))?;
        Ok(HelperImage { fd })
    }

    /// The path to exec: `/proc/self/fd/N` (valid in the supervisor and its children).
    pub fn exec_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// The seals in force (for tests and diagnostics).
    pub fn seals(&self) -> Result<i32, nix::Error> {
        fcntl(&self.fd, FcntlArg::F_GET_SEALS)
    }
}

impl From<HelperImage> for OwnedFd {
    /// The sealed memfd, e.g. to hand an approved image to a sandbox as [`Program::Fd`].
    fn from(image: HelperImage) -> OwnedFd {
        image.fd
    }
}

/// Why the spawner could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SpawnerError {
    /// The helper image could not be loaded.
    #[error(transparent)]
    HelperImage(#[from] HelperImageError),
    /// The cgroup hierarchy could not be prepared.
    #[error("cannot prepare capnet's cgroups: {0}")]
    Cgroup(#[from] CgroupError),
    /// The spawner thread could not be started.
    #[error("cannot start the spawner thread: {0}")]
    Thread(std::io::Error),
}

/// Why a sandbox could not be spawned.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The spec is invalid.
    #[error("invalid sandbox spec: {0}")]
    InvalidSpec(String),
    /// A path in the spec is invalid.
    #[error(transparent)]
    Path(#[from] MountError),
    /// Creating the sandbox's cgroups failed.
    #[error("cannot create the sandbox's cgroups: {0}")]
    Cgroup(#[from] CgroupError),
    /// Pipes, the fork/exec of the helper, or writing the spec failed.
    #[error("cannot start the sandbox helper ({step}): {source}")]
    Helper {
        /// Which step.
        step: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// A stage inside the sandbox reported a failure.
    #[error("sandbox setup failed in {stage}: {message}")]
    Setup {
        /// The stage (`helper: ...`, `init: ...`, `app: ...`).
        stage: String,
        /// What failed, with the errno.
        message: String,
    },
    /// Setup did not finish within [`SETUP_TIMEOUT`].
    #[error("sandbox setup did not finish within {0:?}")]
    Timeout(Duration),
    /// The spawner thread is gone.
    #[error("the spawner thread is gone")]
    SpawnerGone,
}

impl From<StageError> for SpawnError {
    fn from(e: StageError) -> Self {
        SpawnError::Setup {
            stage: e.stage,
            message: e.message,
        }
    }
}

/// Why waiting for a sandbox failed.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// poll/waitid on the pidfd failed.
    #[error("cannot wait for sandbox helper {pid}: {source}")]
    Wait {
        /// Helper pid.
        pid: i32,
        /// The error.
        source: std::io::Error,
    },
}

/// Why teardown failed.
#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    /// Killing or removing the cgroups failed.
    #[error("cannot tear down sandbox {id}: {source}")]
    Cgroup {
        /// Sandbox id.
        id: String,
        /// The error.
        source: CgroupError,
    },
}

struct Request {
    spec: SandboxSpec,
    reply: mpsc::SyncSender<Result<Sandboxed, SpawnError>>,
}

/// Spawns sandboxes from one long-lived thread. Dropping it stops the thread, which
/// (through `PR_SET_PDEATHSIG`) kills every sandbox it spawned.
pub struct Spawner {
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
    cgroups: CgroupRoot,
}

impl std::fmt::Debug for Spawner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spawner")
            .field("cgroups", &self.cgroups)
            .finish_non_exhaustive()
    }
}

impl Spawner {
    /// Loads the helper binary at `helper_path` into a sealed memfd, prepares the
    /// `cgroup_parent_name` cgroups beneath the supervisor's own (removing empty sandbox
    /// cgroups a killed predecessor left there), and starts the spawner thread.
    pub fn new(helper_path: &Path, cgroup_parent_name: &str) -> Result<Self, SpawnerError> {
        let image = HelperImage::load(helper_path)?;
        let cgroups = CgroupRoot::detect(cgroup_parent_name)?;
        cgroups.sweep_stale();
        let (tx, rx) = mpsc::channel::<Request>();
        let thread_cgroups = cgroups.clone();
        let thread = std::thread::Builder::new()
            .name("capnet-spawner".into())
            .spawn(move || {
                for req in rx {
                    let result = spawn_one(&image, &thread_cgroups, req.spec);
                    let _ = req.reply.send(result);
                }
            })
            .map_err(SpawnerError::Thread)?;
        tracing::info!(version = ?cgroups.version(), "sandbox spawner started");
        Ok(Spawner {
            tx: Some(tx),
            thread: Some(thread),
            cgroups,
        })
    }

    /// Builds and starts a sandbox; returns once the app has been exec'd (or setup
    /// failed). Blocking: call it from a blocking thread (`spawn_blocking`), not from an
    /// async task. Spawns are serialised on the spawner thread (a few milliseconds each;
    /// a sandbox whose setup hangs is killed after [`SETUP_TIMEOUT`]).
    pub fn spawn(&self, spec: SandboxSpec) -> Result<Sandboxed, SpawnError> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.tx
            .as_ref()
            .ok_or(SpawnError::SpawnerGone)?
            .send(Request { spec, reply })
            .map_err(|_| SpawnError::SpawnerGone)?;
        rx.recv().map_err(|_| SpawnError::SpawnerGone)?
    }

    /// The cgroup version in use.
    pub fn cgroup_version(&self) -> super::CgroupVersion {
        self.cgroups.version()
    }

    /// The `capnet` parent directories (one per hierarchy).
    pub fn cgroup_parent_dirs(&self) -> Vec<PathBuf> {
        self.cgroups.dirs()
    }

    /// Removes the `capnet` parent directories (and the enclosing levels of a nested
    /// parent name) if no sandbox is left in them; best effort.
    pub fn remove_cgroup_parent_if_empty(&self) {
        self.cgroups.remove_if_empty();
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.cgroups.remove_if_empty();
    }
}

fn validate(spec: &SandboxSpec) -> Result<(), SpawnError> {
    let id_ok = !spec.id.is_empty()
        && spec.id.len() <= 63
        && spec
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !spec.id.starts_with('.');
    if !id_ok {
        return Err(SpawnError::InvalidSpec(format!(
            "id {:?}: expected [A-Za-z0-9._-]{{1,63}} not starting with '.'",
            spec.id
        )));
    }
    if let Program::Path(p) = &spec.program {
        check_sandbox_path(p)?;
    }
    for (src, dst) in &spec.ro_binds {
        check_sandbox_path(src)?;
        check_sandbox_path(dst)?;
    }
    for p in spec.app_dir.iter().chain(spec.var_dir.iter()) {
        check_sandbox_path(p)?;
    }
    let mut seen = vec![0, 1, 2, 3];
    for (_, target) in &spec.extra_fds {
        if *target <= 3 || seen.contains(target) || *target > 1000 {
            return Err(SpawnError::InvalidSpec(format!(
                "extra fd target {target}: must be unique, > 3 and <= 1000"
            )));
        }
        seen.push(*target);
    }
    if spec.host_uid == 0 || spec.host_gid == 0 {
        return Err(SpawnError::InvalidSpec(
            "host_uid/host_gid 0 would map the sandbox to host root".into(),
        ));
    }
    if spec.role == super::Role::Grain && !spec.ambient_caps.is_empty() {
        return Err(SpawnError::InvalidSpec(
            "grains cannot be granted capabilities".into(),
        ));
    }
    if spec.limits.memory_bytes == 0 || spec.limits.pids == 0 {
        return Err(SpawnError::InvalidSpec(
            "memory and pids limits must be non-zero".into(),
        ));
    }
    Ok(())
}

fn helper_err(step: &'static str) -> impl Fn(nix::Error) -> SpawnError {
    move |e| SpawnError::Helper {
        step,
        source: e.into(),
    }
}

/// Runs on the spawner thread.
fn spawn_one(
    image: &HelperImage,
    cgroups: &CgroupRoot,
    spec: SandboxSpec,
) -> Result<Sandboxed, SpawnError> {
    let started = Instant::now();
    validate(&spec)?;
    let name = format!("{}-{}", spec.role.as_str(), spec.id);
    let cgroup = cgroups.create(
        &name,
        &CgroupLimits {
            memory_bytes: spec.limits.memory_bytes,
            pids: spec.limits.pids.saturating_add(PIDS_OVERHEAD),
            cpu_millis: spec.limits.cpu_millis,
        },
    )?;
    match start_helper(image, &cgroup, spec.id.clone(), spec, started) {
        Ok(s) => Ok(s),
        Err(e) => {
            if let Err(te) = cgroup.destroy(TEARDOWN_TIMEOUT) {
                tracing::warn!(error = %te, "cannot remove cgroup of failed sandbox");
            }
            Err(e)
        }
    }
}

fn start_helper(
    image: &HelperImage,
    cgroup: &SandboxCgroup,
    id: String,
    spec: SandboxSpec,
    started: Instant,
) -> Result<Sandboxed, SpawnError> {
    let (spec_r, spec_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(helper_err("pipe"))?;
    let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(helper_err("pipe"))?;
    let raw = |fd: &OwnedFd| fd.as_raw_fd();
    let (program_path, program_fd) = match &spec.program {
        Program::Path(p) => (Some(p.clone()), None),
        Program::Fd(fd) => (None, Some(raw(fd))),
    };
    let wire = WireSpec {
        id: id.clone(),
        role: spec.role,
        program_path,
        program_fd,
        args: spec.args.clone(),
        env: spec.env.clone(),
        app_dir: spec.app_dir.clone(),
        var_dir: spec.var_dir.clone(),
        ro_binds: spec.ro_binds.clone(),
        tmp_size_bytes: spec.tmp_size_bytes,
        nofile: spec.limits.nofile,
        fsize_bytes: spec.limits.fsize_bytes,
        host_uid: spec.host_uid,
        host_gid: spec.host_gid,
        rpc_fd: raw(&spec.rpc_fd),
        extra_fds: spec.extra_fds.iter().map(|(fd, t)| (raw(fd), *t)).collect(),
        log_fd: spec.log_fd.as_ref().map(raw),
        error_fd: raw(&err_w),
        ambient_caps: spec.ambient_caps.iter().map(|c| c.to_string()).collect(),
        cgroup_procs: cgroup.procs_files(),
    };
    let mut inherit: Vec<RawFd> = vec![raw(&spec_r), raw(&err_w), wire.rpc_fd];
    inherit.extend(wire.extra_fds.iter().map(|e| e.0));
    inherit.extend(wire.log_fd);
    inherit.extend(wire.program_fd);
    let text = serde_json::to_vec(&wire).map_err(|e| SpawnError::Helper {
        step: "encode spec",
        source: std::io::Error::other(e),
    })?;

    let mut cmd = Command::new(image.exec_path());
    cmd.arg0("capnet-sandbox")
        .arg("--spec-fd")
        .arg(raw(&spec_r).to_string())
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    sys::command_pre_exec(&mut cmd, std::process::id() as libc::pid_t, inherit);
    let child = cmd.spawn().map_err(|source| SpawnError::Helper {
        step: "exec helper",
        source,
    })?;
    let pid = child.id() as i32;
    // We reap the helper ourselves through its pidfd; std's Child never waits on drop.
    drop(child);
    let pidfd = sys::pidfd_open(pid).map_err(|source| SpawnError::Helper {
        step: "pidfd_open",
        source,
    })?;
    // The sandbox has its own copies now.
    drop(spec_r);
    drop(err_w);
    drop(spec);

    let sandboxed = Sandboxed {
        id,
        pid,
        pidfd,
        cgroup: cgroup.clone(),
        started,
        exit: Mutex::new(None),
        torn_down: false,
    };
    let result = (|| {
        std::fs::File::from(spec_w)
            .write_all(&text)
            .map_err(|source| SpawnError::Helper {
                step: "write spec",
                source,
            })?;
        let report = read_to_eof(err_r, SETUP_TIMEOUT)?;
        parse_report(&report).map_err(SpawnError::from)
    })();
    match result {
        Ok(()) => {
            tracing::debug!(id = %sandboxed.id, pid, elapsed = ?started.elapsed(), "sandbox started");
            Ok(sandboxed)
        }
        Err(e) => {
            // Kill and reap; the caller removes the cgroup.
            let _ = sys::pidfd_send_signal(sandboxed.pidfd.as_fd(), libc::SIGKILL);
            let _ = sys::waitid_pidfd(sandboxed.pidfd.as_fd(), false);
            let mut s = sandboxed;
            s.torn_down = true; // the cgroup is removed by spawn_one
            Err(e)
        }
    }
}

fn read_to_eof(fd: OwnedFd, timeout: Duration) -> Result<Vec<u8>, SpawnError> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut file = std::fs::File::from(fd);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SpawnError::Timeout(timeout));
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(helper_err("poll error pipe")(e)),
        }
        let mut buf = [0u8; 4096];
        match file.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => {
                if out.len() < 64 * 1024 {
                    out.extend_from_slice(&buf[..n]);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(SpawnError::Helper {
                    step: "read error pipe",
                    source,
                });
            }
        }
    }
}

/// Why a sandbox ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExitReason {
    /// The app exited with this code.
    Exited(i32),
    /// The app was killed by this signal (not by the OOM killer).
    Signaled(i32),
    /// The app was killed by the kernel's OOM killer (memory limit).
    OomKilled,
}

/// How a sandbox ended, with its final accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SandboxExit {
    /// The reason.
    pub reason: ExitReason,
    /// The app's exit code, if it exited.
    pub code: Option<i32>,
    /// The signal that killed the app, if any.
    pub signal: Option<i32>,
    /// Whether the sandbox hit its pids limit at some point.
    pub pids_limit_hit: bool,
    /// Cgroup accounting when the exit was observed (`None` if it could not be read).
    pub stats: Option<CgroupStats>,
    /// Time from the spawn request to the observed exit.
    pub runtime: Duration,
}

/// A running (or exited, not yet torn down) sandbox.
///
/// Dropping it tears it down like [`Sandboxed::teardown`], which blocks (kill, reap,
/// rmdir with bounded retries): drop or tear down from a blocking thread, not from an
/// async task.
#[derive(Debug)]
pub struct Sandboxed {
    /// The sandbox id.
    pub id: String,
    /// Host pid of the helper process (its exit status mirrors the app's).
    pub pid: i32,
    /// pidfd of the helper.
    pub pidfd: OwnedFd,
    /// The sandbox's cgroups.
    pub cgroup: SandboxCgroup,
    started: Instant,
    exit: Mutex<Option<SandboxExit>>,
    torn_down: bool,
}

impl Sandboxed {
    /// Asks the app to stop: SIGTERM to the helper, forwarded by the helper to the init
    /// and by the init to the app.
    pub fn terminate(&self) {
        let _ = sys::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGTERM);
    }

    /// SIGKILL to the helper only, without blocking: its death takes the init down
    /// (`PR_SET_PDEATHSIG`) and with it the whole pid namespace. [`Sandboxed::teardown`]
    /// then reaps and removes whatever is left. Safe to call from async code.
    pub fn kill_helper(&self) {
        let _ = sys::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL);
    }

    /// Kills the sandbox now: SIGKILL to the helper (its death takes the init and with it
    /// the pid namespace down) and to everything in the cgroups. Blocks until the cgroups
    /// are empty (bounded): call it from a blocking thread.
    pub fn kill(&self) {
        let _ = sys::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL);
        if let Err(e) = self.cgroup.kill_all(TEARDOWN_TIMEOUT) {
            tracing::warn!(id = %self.id, error = %e, "cannot kill sandbox processes");
        }
    }

    /// Current resource usage, limits and limit events.
    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        self.cgroup.stats()
    }

    /// How long ago the spawn was requested.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    fn record(&self, status: sys::ChildStatus) -> SandboxExit {
        let stats = self.cgroup.stats().ok();
        let oom = stats.is_some_and(|s| s.oom_kills > 0);
        let (reason, code, signal) = match status {
            sys::ChildStatus::Exited(c) => (ExitReason::Exited(c), Some(c), None),
            sys::ChildStatus::Signaled(s) if s == libc::SIGKILL && oom => {
                (ExitReason::OomKilled, None, Some(s))
            }
            sys::ChildStatus::Signaled(s) => (ExitReason::Signaled(s), None, Some(s)),
        };
        let exit = SandboxExit {
            reason,
            code,
            signal,
            pids_limit_hit: stats.is_some_and(|s| s.pids_max_hits > 0),
            stats,
            runtime: self.started.elapsed(),
        };
        if let Ok(mut slot) = self.exit.lock() {
            *slot = Some(exit);
        }
        tracing::info!(id = %self.id, ?reason, "sandbox exited");
        exit
    }

    fn recorded(&self) -> Option<SandboxExit> {
        self.exit.lock().ok().and_then(|s| *s)
    }

    fn wait_err(&self) -> impl Fn(std::io::Error) -> WaitError {
        let pid = self.pid;
        move |source| WaitError::Wait { pid, source }
    }

    /// Returns the exit if the sandbox has ended (reaping the helper), without blocking.
    pub fn try_wait(&self) -> Result<Option<SandboxExit>, WaitError> {
        if let Some(e) = self.recorded() {
            return Ok(Some(e));
        }
        match sys::waitid_pidfd(self.pidfd.as_fd(), true).map_err(self.wait_err())? {
            Some(status) => Ok(Some(self.record(status))),
            None => Ok(None),
        }
    }

    /// Blocks until the sandbox ends.
    pub fn wait_blocking(&self) -> Result<SandboxExit, WaitError> {
        loop {
            if let Some(e) = self.try_wait()? {
                return Ok(e);
            }
            let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => return Err(self.wait_err()(e.into())),
            }
        }
    }

    /// Waits for the sandbox to end from async code (the pidfd becomes readable when
    /// the helper exits). Needs a tokio runtime with I/O enabled.
    pub async fn wait(&self) -> Result<SandboxExit, WaitError> {
        let dup = self.pidfd.try_clone().map_err(self.wait_err())?;
        let afd = sys::async_fd(dup).map_err(self.wait_err())?;
        loop {
            if let Some(e) = self.try_wait()? {
                return Ok(e);
            }
            let mut guard = afd.readable().await.map_err(self.wait_err())?;
            guard.clear_ready();
        }
    }

    /// Kills everything in the sandbox, reaps the helper and removes the cgroups.
    /// Returns the exit (as observed, or the kill).
    pub fn teardown(mut self) -> Result<SandboxExit, TeardownError> {
        self.teardown_inner()
    }

    fn teardown_inner(&mut self) -> Result<SandboxExit, TeardownError> {
        self.torn_down = true;
        let recorded = self.try_wait().ok().flatten();
        if recorded.is_none() {
            let _ = sys::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL);
        }
        let exit = match recorded {
            Some(e) => Some(e),
            None => self.wait_blocking().ok(),
        };
        self.cgroup
            .destroy(TEARDOWN_TIMEOUT)
            .map_err(|source| TeardownError::Cgroup {
                id: self.id.clone(),
                source,
            })?;
        Ok(exit.unwrap_or(SandboxExit {
            reason: ExitReason::Signaled(libc::SIGKILL),
            code: None,
            signal: Some(libc::SIGKILL),
            pids_limit_hit: false,
            stats: None,
            runtime: self.started.elapsed(),
        }))
    }
}

impl Drop for Sandboxed {
    fn drop(&mut self) {
        if !self.torn_down
            && let Err(e) = self.teardown_inner()
        {
            tracing::warn!(id = %self.id, error = %e, "sandbox teardown on drop failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The helper image cannot be modified after loading: every seal is in place, so a
    /// sandboxed process that reaches it (e.g. via /proc/<init>/exe) cannot rewrite it.
    #[test]
    fn helper_image_is_sealed() {
        let img = HelperImage::from_bytes(b"\x7fELF not really").unwrap();
        let seals = img.seals().unwrap();
        for s in [
            libc::F_SEAL_SEAL,
            libc::F_SEAL_SHRINK,
            libc::F_SEAL_GROW,
            libc::F_SEAL_WRITE,
        ] {
            assert_ne!(seals & s, 0, "seal {s:#x} missing");
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(img.exec_path())
            .unwrap();
        let err = f.write_all(b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }
}
