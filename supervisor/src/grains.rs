//! Grains: starting, watching and stopping them, and the grain API on their fd 3.
//!
//! Each grain gets one end of a socketpair as fd 3, whose Cap'n Proto bootstrap is
//! [`GrainApiImpl`]. Its stdout and stderr go to `<state_dir>/grains/<id>/log`, which the
//! administrator reads with `capnet grain logs`.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::rc::Rc;
use std::time::Duration;

use capnet_schemas::descriptor::{self, Requested};
use capnet_schemas::grain_capnp::grain_api;
use capnet_schemas::rpc::two_party;
use capnp::Error;
use capnp_rpc::rpc_twoparty_capnp::Side;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::watch;

use crate::audit::{Audit, AuditRecord, now_ms};
use crate::config::{Config, GrantRuleConfig, SharedConfig, valid_name};
use crate::grants::{Grant, GrantKind, GrantTable, NewGrant, new_id};
use crate::membrane::root_capability;
use crate::persist;
use crate::powerbox::{Powerbox, describe};
use crate::sys::process::{ChildFds, configure};

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
    /// Spawning failed.
    #[error("cannot start grain {id} ({program}): {source}")]
    Spawn {
        /// The grain.
        id: String,
        /// Its program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// The state database failed.
    #[error("the state database failed: {0}")]
    State(String),
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
    /// Process id while running.
    pub pid: i32,
    /// Start time (ms since the epoch).
    pub started_ms: u64,
    /// Exit code, or -signal.
    pub exit_status: i32,
    /// Why it ended.
    pub exit_reason: String,
    /// Its command.
    pub command: Vec<String>,
}

struct Grain {
    id: String,
    command: Vec<String>,
    state: Cell<GrainState>,
    pid: Cell<i32>,
    started_ms: u64,
    exit: RefCell<(i32, String)>,
    exited: watch::Sender<bool>,
    log: PathBuf,
}

impl Grain {
    fn info(&self) -> GrainInfo {
        let (exit_status, exit_reason) = self.exit.borrow().clone();
        GrainInfo {
            id: self.id.clone(),
            state: self.state.get(),
            pid: self.pid.get(),
            started_ms: self.started_ms,
            exit_status,
            exit_reason,
            command: self.command.clone(),
        }
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
}

impl GrainManager {
    /// A manager for the grains of `config`.
    pub fn new(config: SharedConfig, powerbox: Powerbox, grants: GrantTable, audit: Audit) -> Self {
        Self {
            inner: Rc::new(Inner {
                grains: RefCell::new(BTreeMap::new()),
                config,
                powerbox,
                grants,
                audit,
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

    /// Starts a grain.
    pub fn start(&self, spec: StartSpec) -> Result<GrainInfo, GrainError> {
        let inner = &self.inner;
        let (id, command, mut env) = match &spec.name {
            Some(name) => {
                let config = inner.config.get();
                let g = config
                    .grains
                    .get(name)
                    .ok_or_else(|| GrainError::Unknown(name.clone()))?;
                let env: Vec<(String, String)> =
                    g.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                (name.clone(), g.command_line(&config.bridge_exe()), env)
            }
            None => {
                let id = spec.id.clone().unwrap_or_else(|| new_id("grain"));
                (id, spec.command.clone(), Vec::new())
            }
        };
        env.extend(spec.env.iter().cloned());
        if !valid_name(&id) && !id.starts_with("grain-") {
            return Err(GrainError::BadId(id));
        }
        let Some(program) = command.first().cloned() else {
            return Err(GrainError::NoCommand(id));
        };
        if let Some(g) = inner.grains.borrow().get(&id)
            && g.state.get() != GrainState::Exited
        {
            return Err(GrainError::AlreadyRunning(id));
        }
        let dir = inner.config.get().daemon.state_dir.join("grains").join(&id);
        std::fs::create_dir_all(&dir).map_err(|source| GrainError::Prepare {
            id: id.clone(),
            path: dir.clone(),
            source,
        })?;
        let log_path = dir.join("log");
        let open_log = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|source| GrainError::Prepare {
                    id: id.clone(),
                    path: log_path.clone(),
                    source,
                })
        };
        let (log_out, log_err) = (open_log()?, open_log()?);
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(|source| GrainError::Spawn {
                id: id.clone(),
                program: program.clone(),
                source,
            })?;
        let spawn_err = |source| GrainError::Spawn {
            id: id.clone(),
            program: program.clone(),
            source,
        };
        let fds = ChildFds::new(vec![(OwnedFd::from(theirs), 3)]).map_err(spawn_err)?;
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&command[1..])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("CAPNET_GRAIN_ID", &id)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_out))
            .stderr(Stdio::from(log_err))
            .kill_on_drop(true);
        configure(&mut cmd, fds, true);
        let mut child = cmd.spawn().map_err(spawn_err)?;
        drop(cmd);
        let pid = child.id().map_or(0, |p| p as i32);

        let grain = Rc::new(Grain {
            id: id.clone(),
            command: command.clone(),
            state: Cell::new(GrainState::Running),
            pid: Cell::new(pid),
            started_ms: now_ms(),
            exit: RefCell::new((0, String::new())),
            exited: watch::channel(false).0,
            log: log_path,
        });
        inner.grains.borrow_mut().insert(id.clone(), grain.clone());

        ours.set_nonblocking(true).map_err(spawn_err)?;
        let stream = tokio::net::UnixStream::from_std(ours).map_err(spawn_err)?;
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
            let status = child.wait().await;
            rpc_task.abort();
            let (code, reason) = match status {
                Ok(s) => match (s.code(), s.signal()) {
                    (Some(c), _) => (c, format!("exited with status {c}")),
                    (None, Some(sig)) => (
                        -sig,
                        format!(
                            "killed by signal {}",
                            Signal::try_from(sig)
                                .map_or_else(|_| sig.to_string(), |s| s.as_str().to_string())
                        ),
                    ),
                    _ => (-1, "ended".to_string()),
                },
                Err(e) => (-1, format!("waiting for it failed: {e}")),
            };
            *g.exit.borrow_mut() = (code, reason.clone());
            g.state.set(GrainState::Exited);
            g.pid.set(0);
            g.exited.send_replace(true);
            grants.grain_exited(&g.id);
            audit.record(AuditRecord::new("grain_exited").grain(&g.id).detail(reason));
        });
        inner.audit.record(
            AuditRecord::new("grain_started")
                .grain(&id)
                .detail(format!("pid {pid}: {}", command.join(" "))),
        );
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

    /// Stops a grain: SIGTERM, then SIGKILL after `grace`. Returns once it has exited.
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<GrainInfo, GrainError> {
        let g = self.get(id)?;
        if g.state.get() != GrainState::Exited {
            g.state.set(GrainState::Stopping);
            let pgid = Pid::from_raw(g.pid.get());
            let _ = killpg(pgid, Signal::SIGTERM);
            if !wait_exited(&g, grace).await {
                let _ = killpg(pgid, Signal::SIGKILL);
                wait_exited(&g, Duration::from_secs(10)).await;
            }
            self.inner
                .audit
                .record(AuditRecord::new("grain_stopped").grain(id));
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

async fn wait_exited(g: &Grain, timeout: Duration) -> bool {
    let mut rx = g.exited.subscribe();
    tokio::time::timeout(timeout, rx.wait_for(|e| *e))
        .await
        .is_ok()
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
