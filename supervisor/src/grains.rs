//! Grains: starting them in sandboxes, watching and stopping them, and the grain API on
//! their fd 3.
//!
//! Every grain runs in its own sandbox (`crate::sandbox`, built by the daemon's one
//! spawner in [`crate::sandboxes`]): own user, pid, mount, network (loopback only), ipc,
//! uts and cgroup namespaces, cgroup limits, the seccomp profile, no capabilities. Its
//! fd 3 is one end of a socketpair whose Cap'n Proto bootstrap is [`GrainApiImpl`].
//!
//! What a grain sees (see `docs/sandbox.md` for the whole mount table):
//! * `/app`, read-only: the `app` directory of its `[grains.ID]` table; `command[0]` is
//!   relative to it or an absolute path inside the sandbox. For an ad-hoc grain
//!   (`capnet grain start --id X -- /host/path/prog args`) the program must be an
//!   absolute host path: its (canonical) parent directory is mounted at `/app` and
//!   `/app/<file>` runs — so everything in that directory is visible to the grain,
//!   read-only. The host root is never mounted this way.
//! * `/usr`, `/lib`, `/lib64`, `/bin`, read-only (`system_binds`, default on): the
//!   runtime libraries and interpreters a dynamically linked program needs, nothing else
//!   of the host (no `/etc`, no `/home`, no state).
//! * `/var`, writable, noexec: `<state_dir>/grains/<id>/var`, owned by the grain's host
//!   id, kept across restarts. `<state_dir>/grains/<id>/log` receives stdout and stderr
//!   (`capnet grain logs`); `<state_dir>/grains/<id>/uid` records its host id.
//! * `/tmp` and `/dev/shm`: private tmpfs of the configured size.
//!
//! Limits come from the built-in defaults, `[grains.defaults]`, `[grains.ID]` and the
//! start request, in that order ([`crate::config::SandboxLimits`]).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capnet_schemas::descriptor::{self, Requested};
use capnet_schemas::grain_capnp::grain_api;
use capnet_schemas::rpc::two_party;
use capnp::Error;
use capnp_rpc::rpc_twoparty_capnp::Side;
use nix::sys::signal::Signal;
use tokio::sync::watch;

use crate::audit::{Audit, AuditRecord, now_ms};
use crate::config::{
    Config, GrantRuleConfig, LimitOverrides, SandboxLimits, SharedConfig, format_bytes, valid_name,
};
use crate::grants::{Grant, GrantKind, GrantTable, NewGrant, new_id};
use crate::membrane::root_capability;
use crate::persist;
use crate::powerbox::{Powerbox, describe};
use crate::sandbox::{
    CgroupStats, ExitReason, Program, Role, SandboxExit, SandboxSpec, Sandboxed, SpawnError,
};
use crate::sandboxes::{self, HostIdError, LiveId, Sandboxes};

/// Tasks of a sandbox that are not the grain's (the setup helper and the init).
const PIDS_OVERHEAD: u64 = crate::sandbox::spawn::PIDS_OVERHEAD;

/// How long a stop waits after SIGKILL for the sandbox to be gone.
const KILL_WAIT: Duration = Duration::from_secs(15);

/// Starting or stopping a grain failed.
#[derive(Debug, thiserror::Error)]
pub enum GrainError {
    /// No such grain in the config or among running grains.
    #[error("no grain {0:?}: name a [grains.ID] table of the config, or give a command")]
    Unknown(String),
    /// It is already running.
    #[error("grain {0} is already running; stop it first with `capnet grain stop {0}`")]
    AlreadyRunning(String),
    /// The id is not acceptable.
    #[error("grain id {0:?} must be 1-32 lower-case letters, digits or '-'")]
    BadId(String),
    /// No command.
    #[error("no command given for grain {0}")]
    NoCommand(String),
    /// The ad-hoc program is not usable.
    #[error("cannot start grain {id}: program {program:?} {problem}")]
    BadProgram {
        /// The grain.
        id: String,
        /// The program as given.
        program: String,
        /// What is wrong and what to do.
        problem: String,
    },
    /// The limits of the request are not acceptable.
    #[error("cannot start grain {id}: {message}")]
    BadLimits {
        /// The grain.
        id: String,
        /// What is wrong.
        message: String,
    },
    /// Building the sandbox failed.
    #[error("cannot start grain {id} ({program}): {source}")]
    Sandbox {
        /// The grain.
        id: String,
        /// Its program inside the sandbox.
        program: String,
        /// Why.
        source: SpawnError,
    },
    /// No host id could be assigned.
    #[error(transparent)]
    HostId(#[from] HostIdError),
    /// Filesystem set-up failed.
    #[error("cannot prepare {path} for grain {id}: {source}")]
    Prepare {
        /// The grain.
        id: String,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The state database failed.
    #[error("the state database failed: {0}")]
    State(String),
}

/// The lifecycle state of a grain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrainState {
    /// Being set up.
    Starting,
    /// Its process runs.
    Running,
    /// Being stopped.
    Stopping,
    /// Its process ended.
    Exited,
}

impl GrainState {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            GrainState::Starting => "starting",
            GrainState::Running => "running",
            GrainState::Stopping => "stopping",
            GrainState::Exited => "exited",
        }
    }
}

/// What the administrator sees of a grain.
#[derive(Clone, Debug)]
pub struct GrainInfo {
    /// Id.
    pub id: String,
    /// State.
    pub state: GrainState,
    /// Host pid of the sandbox (its setup helper, whose exit mirrors the program's)
    /// while running.
    pub pid: i32,
    /// Start time (ms since the epoch).
    pub started_ms: u64,
    /// Exit code, or -signal.
    pub exit_status: i32,
    /// Why it ended.
    pub exit_reason: String,
    /// Its command, as run inside the sandbox.
    pub command: Vec<String>,
    /// Its limits.
    pub limits: SandboxLimits,
    /// Cgroup accounting (live while running, final after the exit), with `pids`
    /// counting the program's tasks only.
    pub usage: Option<CgroupStats>,
    /// Time since the start request, or how long it ran.
    pub uptime: Duration,
    /// "" while running; "exited", "signaled", "oom" or "failed".
    pub exit_cause: &'static str,
    /// The OOM killer killed one of its processes.
    pub oom_killed: bool,
    /// A fork failed at the pids limit at least once.
    pub pids_limit_hit: bool,
    /// Its host uid/gid.
    pub host_uid: u32,
}

/// How a grain ended, as reported.
#[derive(Clone, Debug)]
struct ExitRecord {
    status: i32,
    reason: String,
    cause: &'static str,
    stats: Option<CgroupStats>,
    runtime: Duration,
}

struct Grain {
    id: String,
    command: Vec<String>,
    limits: SandboxLimits,
    host_uid: u32,
    state: watch::Sender<GrainState>,
    pid: Cell<i32>,
    started_ms: u64,
    started: Instant,
    sandbox: RefCell<Option<Arc<Sandboxed>>>,
    host_id: RefCell<Option<LiveId>>,
    exit: RefCell<Option<ExitRecord>>,
    stop_requested: Cell<bool>,
    log: PathBuf,
}

impl Grain {
    fn state(&self) -> GrainState {
        *self.state.borrow()
    }

    fn sandbox(&self) -> Option<Arc<Sandboxed>> {
        self.sandbox.borrow().clone()
    }

    fn info(&self) -> GrainInfo {
        let exit = self.exit.borrow().clone();
        let (usage, uptime) = match &exit {
            Some(e) => (e.stats, e.runtime),
            None => (
                self.sandbox().and_then(|sb| sb.stats().ok()),
                self.started.elapsed(),
            ),
        };
        let usage = usage.map(|mut s| {
            s.pids = s.pids.saturating_sub(PIDS_OVERHEAD);
            s.pids_limit = s.pids_limit.saturating_sub(PIDS_OVERHEAD);
            s
        });
        GrainInfo {
            id: self.id.clone(),
            state: self.state(),
            pid: self.pid.get(),
            started_ms: self.started_ms,
            exit_status: exit.as_ref().map_or(0, |e| e.status),
            exit_reason: exit.as_ref().map_or_else(String::new, |e| e.reason.clone()),
            command: self.command.clone(),
            limits: self.limits,
            usage,
            uptime,
            exit_cause: exit.as_ref().map_or("", |e| e.cause),
            oom_killed: usage.is_some_and(|u| u.oom_kills > 0),
            pids_limit_hit: usage.is_some_and(|u| u.pids_max_hits > 0),
            host_uid: self.host_uid,
        }
    }

    /// Records the end, releases the host id and wakes every waiter.
    fn finish(&self, exit: ExitRecord) {
        *self.exit.borrow_mut() = Some(exit);
        self.sandbox.borrow_mut().take();
        self.host_id.borrow_mut().take();
        self.pid.set(0);
        self.state.send_replace(GrainState::Exited);
    }
}

/// Runs grains.
#[derive(Clone)]
pub struct GrainManager {
    inner: Rc<Inner>,
}

struct Inner {
    grains: RefCell<BTreeMap<String, Rc<Grain>>>,
    config: SharedConfig,
    powerbox: Powerbox,
    grants: GrantTable,
    audit: Audit,
    sandboxes: Sandboxes,
}

/// What to start.
pub struct StartSpec {
    /// A `[grains.ID]` of the config.
    pub name: Option<String>,
    /// For ad-hoc grains: the id.
    pub id: Option<String>,
    /// For ad-hoc grains: the command.
    pub command: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Limits that override the configured ones for this start.
    pub limits: LimitOverrides,
}

/// A start request resolved against the config.
struct Plan {
    id: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    app_dir: Option<PathBuf>,
    system_binds: bool,
    limits: SandboxLimits,
    /// Further read-only binds (host path, path in the grain), such as the bridge.
    extra_binds: Vec<(PathBuf, PathBuf)>,
}

/// Where capnet-bridge appears inside a grain whose config asks for it.
pub const BRIDGE_IN_GRAIN: &str = "/capnet/capnet-bridge";

impl Plan {
    fn command(&self) -> Vec<String> {
        std::iter::once(self.program.display().to_string())
            .chain(self.args.iter().cloned())
            .collect()
    }
}

fn create_dir(id: &str, path: &Path, mode: u32) -> Result<(), GrainError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let prepare = |source| GrainError::Prepare {
        id: id.to_string(),
        path: path.to_path_buf(),
        source,
    };
    if !path.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(path)
            .map_err(prepare)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(prepare)
}

impl GrainManager {
    /// A manager for the grains of `config`, sandboxed by `sandboxes`.
    pub fn new(
        config: SharedConfig,
        powerbox: Powerbox,
        grants: GrantTable,
        audit: Audit,
        sandboxes: Sandboxes,
    ) -> Self {
        Self {
            inner: Rc::new(Inner {
                grains: RefCell::new(BTreeMap::new()),
                config,
                powerbox,
                grants,
                audit,
                sandboxes,
            }),
        }
    }

    /// Deletes a grain: stops it if it runs, revokes and deletes its grants and tokens, and
    /// removes its state directory (its `/var` and its log).
    pub async fn delete(&self, id: &str, grace: Duration) -> Result<(usize, usize), GrainError> {
        if self.inner.grains.borrow().contains_key(id) {
            self.stop(id, grace).await?;
            self.inner.grains.borrow_mut().remove(id);
        }
        let (grants, tokens) = self
            .inner
            .grants
            .delete_grain(id)
            .await
            .map_err(|e| GrainError::State(e.to_string()))?;
        let dir = self
            .inner
            .config
            .get()
            .daemon
            .state_dir
            .join("grains")
            .join(id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|source| GrainError::Prepare {
                id: id.to_string(),
                path: dir.clone(),
                source,
            })?;
        }
        Ok((grants, tokens))
    }

    fn plan(&self, spec: &StartSpec) -> Result<Plan, GrainError> {
        let config = self.inner.config.get();
        let mut plan = match &spec.name {
            Some(name) => {
                let g = config
                    .grains
                    .get(name)
                    .ok_or_else(|| GrainError::Unknown(name.clone()))?;
                let Some(first) = g.command.first() else {
                    return Err(GrainError::NoCommand(name.clone()));
                };
                let program = if Path::new(first).is_absolute() {
                    PathBuf::from(first)
                } else {
                    Path::new("/app").join(first)
                };
                let mut plan = Plan {
                    id: name.clone(),
                    program,
                    args: g.command[1..].to_vec(),
                    env: g.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    app_dir: g.app.clone(),
                    system_binds: config.grain_system_binds(Some(name)),
                    limits: config.grain_limits(Some(name), &spec.limits),
                    extra_binds: Vec::new(),
                };
                // `bridge`: capnet-bridge (bound read-only into the grain) runs first and
                // starts the app with the proxy variables.
                if let Some(bridge_args) = g.bridge_args() {
                    let inside = PathBuf::from(BRIDGE_IN_GRAIN);
                    plan.extra_binds.push((config.bridge_exe(), inside.clone()));
                    let app = std::mem::replace(&mut plan.program, inside);
                    let mut args = bridge_args;
                    args.push("--".into());
                    args.push(app.display().to_string());
                    args.append(&mut plan.args);
                    plan.args = args;
                }
                plan
            }
            None => {
                let id = spec.id.clone().unwrap_or_else(|| new_id("grain"));
                let Some(first) = spec.command.first() else {
                    return Err(GrainError::NoCommand(id));
                };
                let (app_dir, program) = adhoc_program(&id, first)?;
                Plan {
                    system_binds: config.grain_system_binds(None),
                    limits: config.grain_limits(None, &spec.limits),
                    id,
                    program,
                    args: spec.command[1..].to_vec(),
                    env: Vec::new(),
                    app_dir: Some(app_dir),
                    extra_binds: Vec::new(),
                }
            }
        };
        plan.env.extend(spec.env.iter().cloned());
        // The id names a directory under the state directory and a cgroup: nothing but
        // [a-z0-9-] (generated ids, `grain-<hex>`, are of that form too).
        if !valid_name(&plan.id) {
            return Err(GrainError::BadId(plan.id));
        }
        plan.limits
            .check("the requested limits")
            .map_err(|message| GrainError::BadLimits {
                id: plan.id.clone(),
                message,
            })?;
        Ok(plan)
    }

    /// Starts a grain in a new sandbox; returns once its program runs (or the sandbox
    /// could not be built, which is then recorded as the grain's exit).
    pub async fn start(&self, spec: StartSpec) -> Result<GrainInfo, GrainError> {
        let inner = &self.inner;
        let plan = self.plan(&spec)?;
        let id = plan.id.clone();
        if let Some(g) = inner.grains.borrow().get(&id)
            && g.state() != GrainState::Exited
        {
            return Err(GrainError::AlreadyRunning(id));
        }
        let dir = inner.config.get().daemon.state_dir.join("grains").join(&id);
        create_dir(&id, &dir, 0o700)?;
        let host_id = inner.sandboxes.grain_id(&id, &dir)?;
        let uid = host_id.uid();
        let var = dir.join("var");
        create_dir(&id, &var, 0o700)?;
        std::os::unix::fs::chown(&var, Some(uid), Some(uid)).map_err(|source| {
            GrainError::Prepare {
                id: id.clone(),
                path: var.clone(),
                source,
            }
        })?;
        let log_path = dir.join("log");
        let log = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&log_path)
                .map_err(|source| GrainError::Prepare {
                    id: id.clone(),
                    path: log_path.clone(),
                    source,
                })?
        };
        let api_err = |source| GrainError::Prepare {
            id: id.clone(),
            path: PathBuf::from("grain API socketpair"),
            source,
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(api_err)?;
        ours.set_nonblocking(true).map_err(api_err)?;
        let stream = tokio::net::UnixStream::from_std(ours).map_err(api_err)?;
        let command = plan.command();
        let grain = Rc::new(Grain {
            id: id.clone(),
            command: command.clone(),
            limits: plan.limits,
            host_uid: uid,
            state: watch::channel(GrainState::Starting).0,
            pid: Cell::new(0),
            started_ms: now_ms(),
            started: Instant::now(),
            sandbox: RefCell::new(None),
            host_id: RefCell::new(Some(host_id)),
            exit: RefCell::new(None),
            stop_requested: Cell::new(false),
            log: log_path,
        });
        inner.grains.borrow_mut().insert(id.clone(), grain.clone());

        let mut env = vec![
            (
                "PATH".to_string(),
                "/usr/local/bin:/usr/bin:/bin".to_string(),
            ),
            ("HOME".to_string(), "/var".to_string()),
            ("TMPDIR".to_string(), "/tmp".to_string()),
            ("CAPNET_GRAIN_ID".to_string(), id.clone()),
        ];
        env.extend(plan.env.iter().cloned());
        let sandbox_spec = SandboxSpec {
            id: id.clone(),
            role: Role::Grain,
            program: Program::Path(plan.program.clone()),
            args: plan.args.clone(),
            env,
            app_dir: plan.app_dir.clone(),
            var_dir: Some(var),
            ro_binds: if plan.system_binds {
                SandboxSpec::system_binds()
            } else {
                Vec::new()
            }
            .into_iter()
            .chain(plan.extra_binds.iter().cloned())
            .collect(),
            tmp_size_bytes: plan.limits.tmp_bytes,
            limits: plan.limits.sandbox(),
            host_uid: uid,
            host_gid: uid,
            rpc_fd: OwnedFd::from(theirs),
            extra_fds: Vec::new(),
            log_fd: Some(OwnedFd::from(log)),
            ambient_caps: Vec::new(),
        };
        let sb = match inner.sandboxes.spawn(sandbox_spec).await {
            Ok(sb) => sb,
            Err(source) => {
                let reason = format!("failed to start: {source}");
                grain.finish(ExitRecord {
                    status: -1,
                    reason: reason.clone(),
                    cause: "failed",
                    stats: None,
                    runtime: grain.started.elapsed(),
                });
                inner
                    .audit
                    .record(AuditRecord::new("grain_failed").grain(&id).detail(reason));
                return Err(GrainError::Sandbox {
                    id,
                    program: plan.program.display().to_string(),
                    source,
                });
            }
        };
        let pid = sb.pid;
        grain.pid.set(pid);
        *grain.sandbox.borrow_mut() = Some(sb.clone());
        // A stop that arrived while the sandbox was being built is waiting for this.
        grain.state.send_replace(GrainState::Running);

        let api: grain_api::Client = capnp_rpc::new_client(GrainApiImpl {
            grain: id.clone(),
            powerbox: inner.powerbox.clone(),
            grants: inner.grants.clone(),
            config: inner.config.clone(),
            audit: inner.audit.clone(),
        });
        let rpc = two_party(stream, Side::Server, Some(api.client));
        let rpc_task = tokio::task::spawn_local(async move {
            let _ = rpc.await;
        });

        let audit = inner.audit.clone();
        let grants = inner.grants.clone();
        let g = grain.clone();
        tokio::task::spawn_local(async move {
            let waited = sb.wait().await;
            drop(sb);
            rpc_task.abort();
            let last = g.sandbox.borrow_mut().take();
            let torn = match last {
                Some(sb) => sandboxes::teardown(sb).await,
                None => None,
            };
            let exit = match waited {
                Ok(e) => Some(e),
                Err(e) => {
                    tracing::warn!(grain = %g.id, error = %e, "waiting for the grain failed");
                    torn
                }
            };
            let record = describe_exit(exit.as_ref(), &g.limits, g.stop_requested.get());
            let record = ExitRecord {
                runtime: exit.map_or_else(|| g.started.elapsed(), |e| e.runtime),
                ..record
            };
            audit.record(
                AuditRecord::new("grain_exited")
                    .grain(&g.id)
                    .detail(record.reason.clone()),
            );
            g.finish(record);
            // Nothing can read or answer the grain's connections and listeners any more.
            grants.grain_exited(&g.id);
        });
        inner
            .audit
            .record(AuditRecord::new("grain_started").grain(&id).detail(format!(
                "pid {pid} uid {uid}: {} (memory {}, pids {}, cpu {})",
                command.join(" "),
                format_bytes(plan.limits.memory_bytes),
                plan.limits.pids,
                format_cpu(plan.limits.cpu_millis)
            )));
        Ok(grain.info())
    }

    fn get(&self, id: &str) -> Result<Rc<Grain>, GrainError> {
        self.inner
            .grains
            .borrow()
            .get(id)
            .cloned()
            .ok_or_else(|| GrainError::Unknown(id.to_string()))
    }

    /// Stops a grain: SIGTERM (forwarded by the sandbox's helper and init to the
    /// program), then SIGKILL after `grace`. Returns once the sandbox is gone (processes,
    /// cgroups, mounts).
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<GrainInfo, GrainError> {
        let g = self.get(id)?;
        let mut rx = g.state.subscribe();
        let _ = rx.wait_for(|s| *s != GrainState::Starting).await;
        match g.state() {
            GrainState::Running => {
                g.stop_requested.set(true);
                g.state.send_replace(GrainState::Stopping);
                if let Some(sb) = g.sandbox() {
                    sb.terminate();
                }
                if !wait_exited(&g, grace).await {
                    if let Some(sb) = g.sandbox() {
                        sb.kill_helper();
                    }
                    wait_exited(&g, KILL_WAIT).await;
                }
                self.inner
                    .audit
                    .record(AuditRecord::new("grain_stopped").grain(id));
            }
            GrainState::Stopping => {
                wait_exited(&g, grace + KILL_WAIT).await;
            }
            GrainState::Starting | GrainState::Exited => {}
        }
        Ok(g.info())
    }

    /// Stops every grain.
    pub async fn stop_all(&self, grace: Duration) {
        let ids: Vec<String> = self.inner.grains.borrow().keys().cloned().collect();
        let stops = ids.iter().map(|id| self.stop(id, grace));
        futures::future::join_all(stops).await;
    }

    /// Waits up to `timeout` for a grain to exit.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<(GrainInfo, bool), GrainError> {
        let g = self.get(id)?;
        let exited = wait_exited(&g, timeout).await;
        Ok((g.info(), exited))
    }

    /// Every grain.
    pub fn list(&self) -> Vec<GrainInfo> {
        self.inner
            .grains
            .borrow()
            .values()
            .map(|g| g.info())
            .collect()
    }

    /// One grain.
    pub fn status(&self, id: &str) -> Result<GrainInfo, GrainError> {
        Ok(self.get(id)?.info())
    }

    /// The last `max` bytes of a grain's log.
    pub fn logs(&self, id: &str, max: u64) -> Result<Vec<u8>, GrainError> {
        let g = self.get(id)?;
        let prepare = |source| GrainError::Prepare {
            id: id.to_string(),
            path: g.log.clone(),
            source,
        };
        let mut f = std::fs::File::open(&g.log).map_err(prepare)?;
        let len = f.metadata().map_err(prepare)?.len();
        let start = len.saturating_sub(max);
        f.seek(SeekFrom::Start(start)).map_err(prepare)?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).map_err(prepare)?;
        Ok(buf)
    }
}

/// Resolves an ad-hoc program (an absolute host path) to the directory mounted at
/// `/app` and the path that runs inside the sandbox.
fn adhoc_program(id: &str, given: &str) -> Result<(PathBuf, PathBuf), GrainError> {
    let bad = |problem: &str| GrainError::BadProgram {
        id: id.to_string(),
        program: given.to_string(),
        problem: problem.to_string(),
    };
    if !Path::new(given).is_absolute() {
        return Err(bad(
            "is not an absolute host path; give the full path of the program (its directory is \
             mounted read-only at /app), or define the grain in the config with app = \"DIR\"",
        ));
    }
    let real = std::fs::canonicalize(given)
        .map_err(|e| bad(&format!("cannot be resolved on the host: {e}")))?;
    if !real.is_file() {
        return Err(bad("is not a regular file"));
    }
    let (Some(dir), Some(file)) = (real.parent(), real.file_name()) else {
        return Err(bad("has no parent directory"));
    };
    if dir == Path::new("/") {
        return Err(bad(
            "lies in the host's root directory, which is never mounted into a grain; move it \
             into a directory of its own",
        ));
    }
    Ok((dir.to_path_buf(), Path::new("/app").join(file)))
}

/// `1500` → `"1.5 cores"`, `0` → `"unlimited"`.
pub fn format_cpu(millis: u64) -> String {
    match millis {
        0 => "unlimited".into(),
        1000 => "1 core".into(),
        m if m.is_multiple_of(1000) => format!("{} cores", m / 1000),
        m => format!("{} cores", m as f64 / 1000.0),
    }
}

fn signal_name(sig: i32) -> String {
    Signal::try_from(sig).map_or_else(|_| format!("signal {sig}"), |s| s.as_str().to_string())
}

/// The administrator's account of how a sandbox ended.
fn describe_exit(exit: Option<&SandboxExit>, limits: &SandboxLimits, stopped: bool) -> ExitRecord {
    let Some(exit) = exit else {
        return ExitRecord {
            status: -1,
            reason: "ended; its exit status could not be read".into(),
            cause: "signaled",
            stats: None,
            runtime: Duration::ZERO,
        };
    };
    let (status, cause, mut reason) = match exit.reason {
        ExitReason::Exited(c) => (c, "exited", format!("exited with status {c}")),
        ExitReason::Signaled(s) => (-s, "signaled", format!("killed by {}", signal_name(s))),
        ExitReason::OomKilled => (
            -libc::SIGKILL,
            "oom",
            format!(
                "killed by the kernel's OOM killer (oom): it reached its memory limit of {}",
                format_bytes(limits.memory_bytes)
            ),
        ),
    };
    if let Some(s) = exit.stats {
        if exit.reason != ExitReason::OomKilled && s.oom_kills > 0 {
            reason.push_str(&format!(
                "; the OOM killer killed {} of its processes at its memory limit of {}",
                s.oom_kills,
                format_bytes(limits.memory_bytes)
            ));
        }
        if s.pids_max_hits > 0 {
            reason.push_str(&format!(
                "; it hit its pids limit of {} ({} fork{} refused)",
                limits.pids,
                s.pids_max_hits,
                if s.pids_max_hits == 1 { "" } else { "s" }
            ));
        }
    }
    if stopped {
        reason = format!("stopped by the administrator: {reason}");
    }
    ExitRecord {
        status,
        reason,
        cause,
        stats: exit.stats,
        runtime: exit.runtime,
    }
}

async fn wait_exited(g: &Grain, timeout: Duration) -> bool {
    let mut rx = g.state.subscribe();
    tokio::time::timeout(timeout, rx.wait_for(|s| *s == GrainState::Exited))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// The grain API served on a grain's fd 3.
pub struct GrainApiImpl {
    grain: String,
    powerbox: Powerbox,
    grants: GrantTable,
    config: SharedConfig,
    audit: Audit,
}

/// The first `[[powerbox.rules]]` entry matching a request, if any.
fn matching_rule<'a>(
    config: &'a Config,
    grain: &str,
    req: &Requested,
) -> Option<&'a GrantRuleConfig> {
    config.powerbox.rules.iter().find(|r| {
        (r.grain == "*" || r.grain == grain)
            && r.interface == req.interface_name()
            && r.host
                .as_deref()
                .is_none_or(|h| req.host().is_none_or(|rh| rh.eq_ignore_ascii_case(h)))
            && r.port.is_none_or(|p| req.port().is_none_or(|rp| rp == p))
            && r.encryption.as_deref().is_none_or(|e| match req {
                Requested::IpNetwork { encryption } => encryption.to_string() == e,
                _ => false,
            })
    })
}

impl GrainApiImpl {
    async fn by_rule(
        &self,
        rule: &GrantRuleConfig,
        requested: &Requested,
        label: &str,
    ) -> Result<Rc<Grant>, Error> {
        let what = describe(requested);
        if rule.action == "deny" {
            self.audit.record(
                AuditRecord::new("deny")
                    .grain(&self.grain)
                    .detail(format!("{what} denied by rule {}", rule.name)),
            );
            return Err(Error::failed(format!(
                "denied: the request for {what} is denied by the administrator's rule {}",
                rule.name
            )));
        }
        let driver = rule.driver.clone().unwrap_or_default();
        let kind = GrantKind::for_request(requested, rule.host.as_deref(), rule.port)
            .map_err(|e| Error::failed(format!("failed: rule {}: {e}", rule.name)))?;
        let detail = format!(
            "{} by rule {} (asked for {what})",
            kind.describe(),
            rule.name
        );
        self.grants
            .create(
                NewGrant {
                    grain: self.grain.clone(),
                    driver,
                    kind,
                    label: label.to_string(),
                    rules: rule.policy.clone(),
                    limits: rule.limits,
                    source: format!("rule:{}", rule.name),
                },
                detail,
            )
            .await
            .map_err(|e| Error::failed(format!("failed: the grant could not be stored: {e}")))
    }
}

impl grain_api::Server for GrainApiImpl {
    async fn request(
        self: Rc<Self>,
        params: grain_api::RequestParams,
        mut results: grain_api::RequestResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let requested = descriptor::parse(p.get_descriptor()?).map_err(|e| {
            self.audit.record(
                AuditRecord::new("request_refused")
                    .grain(&self.grain)
                    .detail(e.to_string()),
            );
            Error::failed(format!("failed: {e}"))
        })?;
        let label = p
            .get_label()?
            .to_str()?
            .chars()
            .take(200)
            .collect::<String>();
        let config = self.config.get();
        let grant = match matching_rule(&config, &self.grain, &requested) {
            Some(rule) => self.by_rule(rule, &requested, &label).await?,
            None => {
                self.powerbox
                    .request(&self.grain, requested, &label)
                    .await?
            }
        };
        let mut r = results.get();
        r.reborrow()
            .get_cap()
            .set_as_capability(root_capability(&grant).hook);
        r.set_grant_id(&grant.id);
        Ok(())
    }

    async fn restore(
        self: Rc<Self>,
        params: grain_api::RestoreParams,
        mut results: grain_api::RestoreResults,
    ) -> Result<(), Error> {
        let token = params.get()?.get_token()?.to_vec();
        let cap = persist::restore(&self.grants, &self.grain, &token).await?;
        results.get().get_cap().set_as_capability(cap.hook);
        Ok(())
    }

    async fn drop(
        self: Rc<Self>,
        params: grain_api::DropParams,
        _: grain_api::DropResults,
    ) -> Result<(), Error> {
        let token = params.get()?.get_token()?.to_vec();
        persist::drop_token(&self.grants, &self.grain, &token).await
    }

    async fn whoami(
        self: Rc<Self>,
        _: grain_api::WhoamiParams,
        mut results: grain_api::WhoamiResults,
    ) -> Result<(), Error> {
        results.get().set_grain_id(&self.grain);
        Ok(())
    }
}
