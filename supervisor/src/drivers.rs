//! Driver lifecycle: one sandboxed host process per configured driver, restarted with
//! exponential backoff when it crashes, marked failed when it crashes too often or is
//! refused for good (not a plugin, wrong ABI, privileges beyond the approval).
//!
//! The supervisor reads the plugin file once, puts the bytes in a sealed memfd and hands
//! that to the host, so what is loaded is exactly what was read. The host reports on a
//! status pipe whether the plugin loaded before it starts serving; a refusal there is
//! permanent and reported with the host's message (which names the file and what was
//! expected).
//!
//! Each host runs in a sandbox of role [`Role::DriverHost`] (see `docs/sandbox.md`): the
//! `capnet-driver-host` program itself is executed from a sealed memfd read once at
//! daemon start; the host stays in the host network namespace, sees the system library
//! directories and, read-only, `/etc/resolv.conf`, `/etc/hosts` and the CA
//! certificates; it runs as its own unprivileged host id with no capabilities, under the
//! `[drivers.NAME]` `memory`/`pids`/`cpu`/`nofile` limits; stdout and stderr go to
//! `<state_dir>/drivers/NAME.log`. Once the plugin is loaded the host locks itself down
//! (no exec, no opening files for writing; [`crate::driver_host`]).
//!
//! Privileged ports: capabilities inside the sandbox belong to its own user namespace,
//! which does not own the host network namespace, so a driver host can never bind a
//! port below 1024 itself. A driver that must listen on one needs the supervisor to
//! bind the socket and pass it in (not implemented; `low_ports` approvals are refused
//! by the kernel at bind time).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capnet_driver_api::Privileges;
use capnet_driver_api::events::Event;
use capnet_driver_api::policy::write_rule_configs;
use capnet_schemas::driver_capnp::{driver, event_sink};
use capnet_schemas::rpc::two_party;
use capnp_rpc::rpc_twoparty_capnp::Side;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, watch};

use crate::audit::{Audit, AuditRecord};
use crate::config::{Config, DriverConfig, SandboxLimits, format_bytes};
use crate::driver_host::{self, HostStatus};
use crate::sandbox::{
    ExitReason, HelperImage, HelperImageError, Program, Role, SandboxExit, SandboxSpec, Sandboxed,
    SpawnError,
};
use crate::sandboxes::{self, LiveId, Sandboxes};
use crate::sys::plugin::PluginIdentity;

/// The driver host executable could not be read into its sealed memfd.
#[derive(Debug, thiserror::Error)]
#[error("cannot load the driver host executable (set daemon.driver_host in the config): {0}")]
pub struct DriverHostImageError(#[from] HelperImageError);

/// How long a driver host may take to load its plugin and answer `start`.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// First restart delay; doubles per crash up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest restart delay.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A host that ran this long without crashing resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Why a driver is unavailable right now.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DriverUnavailable {
    /// No driver of that name is configured.
    #[error("no driver named {0:?} is configured; see `capnet driver list`")]
    Unknown(String),
    /// It failed for good.
    #[error("driver {name} has failed: {reason}")]
    Failed {
        /// The driver.
        name: String,
        /// Why.
        reason: String,
    },
    /// It did not come up in time.
    #[error("driver {0} is not running (restarting); try again shortly")]
    NotReady(String),
    /// It is stopped.
    #[error("driver {0} is stopped")]
    Stopped(String),
}

/// The public state of a driver.
#[derive(Clone, Debug)]
pub struct DriverInfo {
    /// Instance name.
    pub name: String,
    /// "starting", "running", "restarting", "failed" or "stopped".
    pub state: &'static str,
    /// Host process id while running.
    pub pid: i32,
    /// The plugin path.
    pub plugin: PathBuf,
    /// Version from the plugin's magic block, once loaded.
    pub version: String,
    /// Restarts so far.
    pub restarts: u32,
    /// Time since the current host started.
    pub uptime: Duration,
    /// The last error.
    pub last_error: String,
}

#[derive(Clone)]
struct Running {
    client: driver::Client,
    generation: u64,
    pid: i32,
    since: Instant,
    identity: PluginIdentity,
}

#[derive(Clone)]
enum SlotState {
    Starting,
    Running(Box<Running>),
    Restarting,
    Failed(String),
    Stopped,
}

/// One configured driver.
struct Slot {
    name: String,
    config: DriverConfig,
    plugin: PathBuf,
    state: RefCell<SlotState>,
    generation: Cell<u64>,
    changed: watch::Sender<u64>,
    restarts: Cell<u32>,
    crashes: RefCell<VecDeque<Instant>>,
    last_error: RefCell<String>,
    stop: Notify,
    stopping: Cell<bool>,
}

impl Slot {
    fn set(&self, s: SlotState) {
        *self.state.borrow_mut() = s;
        self.changed.send_modify(|v| *v += 1);
    }
}

/// Receives a driver's audit events.
pub type EventHandler = Rc<dyn Fn(&str, Event)>;

/// Starts, watches and restarts driver hosts.
#[derive(Clone)]
pub struct DriverManager {
    inner: Rc<Inner>,
}

struct Inner {
    slots: RefCell<BTreeMap<String, Rc<Slot>>>,
    host_exe: PathBuf,
    /// `capnet-driver-host`, read once at start into a sealed memfd; every host is
    /// executed from a duplicate of it.
    host_image: OwnedFd,
    sandboxes: Sandboxes,
    log_dir: PathBuf,
    max_crashes: u32,
    crash_window: Duration,
    health_interval: Duration,
    health_timeout: Duration,
    audit: Audit,
    events: EventHandler,
}

fn new_slot(config: &Config, name: &str, d: &DriverConfig) -> Rc<Slot> {
    Rc::new(Slot {
        name: name.to_string(),
        config: d.clone(),
        plugin: config.plugin_path(d),
        state: RefCell::new(SlotState::Starting),
        generation: Cell::new(0),
        changed: watch::channel(0).0,
        restarts: Cell::new(0),
        crashes: RefCell::new(VecDeque::new()),
        last_error: RefCell::new(String::new()),
        stop: Notify::new(),
        stopping: Cell::new(false),
    })
}

/// What [`DriverManager::apply`] changed.
#[derive(Debug, Default)]
pub struct Reconciled {
    /// Drivers started because they are new.
    pub added: Vec<String>,
    /// Drivers stopped because they left the config (their grants must be revoked).
    pub removed: Vec<String>,
    /// Drivers restarted because their settings changed.
    pub restarted: Vec<String>,
}

impl DriverManager {
    /// A manager for the drivers of `config`, sandboxed by `sandboxes`. Reads the driver
    /// host executable once. Nothing starts until [`start_all`].
    pub fn new(
        config: &Config,
        audit: Audit,
        events: EventHandler,
        sandboxes: Sandboxes,
    ) -> Result<Self, DriverHostImageError> {
        let host_exe = config.driver_host();
        let host_image = OwnedFd::from(HelperImage::load_named(&host_exe, c"capnet-driver-host")?);
        let slots = config
            .drivers
            .iter()
            .map(|(name, d)| (name.clone(), new_slot(config, name, d)))
            .collect();
        Ok(Self {
            inner: Rc::new(Inner {
                slots: RefCell::new(slots),
                host_exe,
                host_image,
                sandboxes,
                log_dir: config.daemon.state_dir.join("drivers"),
                max_crashes: config.daemon.max_driver_crashes,
                crash_window: Duration::from_secs(config.daemon.crash_window_secs),
                health_interval: Duration::from_millis(config.daemon.health_interval_ms.max(50)),
                health_timeout: Duration::from_millis(config.daemon.health_timeout_ms.max(10)),
                audit,
                events,
            }),
        })
    }

    /// Brings the running drivers in line with `config`: starts new ones, stops removed
    /// ones, restarts those whose settings changed, and leaves the others alone.
    pub async fn apply(&self, config: &Config) -> Reconciled {
        let mut r = Reconciled::default();
        let current: Vec<(String, Rc<Slot>)> = self
            .inner
            .slots
            .borrow()
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        for (name, slot) in &current {
            match config.drivers.get(name) {
                None => {
                    stop_slot(slot).await;
                    self.inner.slots.borrow_mut().remove(name);
                    r.removed.push(name.clone());
                }
                // A changed table or plugin path restarts the driver, and so does any
                // reload for a driver marked failed: the administrator fixed something.
                Some(d)
                    if *d != slot.config
                        || config.plugin_path(d) != slot.plugin
                        || matches!(*slot.state.borrow(), SlotState::Failed(_)) =>
                {
                    stop_slot(slot).await;
                    let fresh = new_slot(config, name, d);
                    self.inner
                        .slots
                        .borrow_mut()
                        .insert(name.clone(), fresh.clone());
                    tokio::task::spawn_local(supervise(self.inner.clone(), fresh));
                    r.restarted.push(name.clone());
                }
                Some(_) => {}
            }
        }
        for (name, d) in &config.drivers {
            if !self.inner.slots.borrow().contains_key(name) {
                let fresh = new_slot(config, name, d);
                self.inner
                    .slots
                    .borrow_mut()
                    .insert(name.clone(), fresh.clone());
                tokio::task::spawn_local(supervise(self.inner.clone(), fresh));
                r.added.push(name.clone());
            }
        }
        r
    }

    /// Reads `path` once and inspects it in a driver host without starting it: what the
    /// plugin says it is, its size and SHA-256. Loads nothing into capnetd.
    pub async fn inspect(
        &self,
        path: &Path,
        trusted: &std::collections::BTreeMap<String, String>,
    ) -> Result<Inspection, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let signature = crate::signing::verify(path, &bytes, trusted);
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let size = bytes.len() as u64;
        let memfd = sealed_bytes(&bytes).map_err(|e| match e {
            StartError::Permanent(m) | StartError::Transient(m) => m,
        })?;
        let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| format!("pipe failed: {e}"))?;
        // The same sandbox as a serving driver host, with a socket nobody answers.
        let (_unused, rpc) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| format!("socketpair failed: {e}"))?;
        let image = self
            .inner
            .host_image
            .try_clone()
            .map_err(|e| format!("cannot duplicate the driver host image: {e}"))?;
        let host_id = self
            .inner
            .sandboxes
            .transient_id()
            .map_err(|e| e.to_string())?;
        let limits = SandboxLimits::DRIVER_DEFAULT;
        let spec = SandboxSpec {
            id: format!("inspect-{}", &sha256[..12]),
            role: Role::DriverHost,
            program: Program::Fd(image),
            args: vec!["--inspect-fd".to_string(), path.display().to_string()],
            env: Vec::new(),
            app_dir: None,
            var_dir: None,
            ro_binds: SandboxSpec::system_binds(),
            tmp_size_bytes: limits.tmp_bytes,
            limits: limits.sandbox(),
            host_uid: host_id.uid(),
            host_gid: host_id.uid(),
            rpc_fd: OwnedFd::from(rpc),
            extra_fds: vec![
                (memfd, driver_host::PLUGIN_FD),
                (out_w, driver_host::STATUS_FD),
            ],
            log_fd: None,
            ambient_caps: Vec::new(),
        };
        let sb = self
            .inner
            .sandboxes
            .spawn(spec)
            .await
            .map_err(|e| format!("cannot start the inspection sandbox: {e}"))?;
        let read = tokio::task::spawn_blocking(move || {
            let mut text = String::new();
            let _ = std::fs::File::from(out_r).read_to_string(&mut text);
            text
        });
        let text = tokio::time::timeout(START_TIMEOUT, read).await;
        if text.is_err() {
            sb.kill_helper();
        }
        let exit = end_host(sb, host_id).await;
        let text = match text {
            Ok(Ok(t)) => t,
            _ => return Err(format!("inspecting {} timed out", path.display())),
        };
        if text.trim().is_empty() {
            return Err(format!(
                "{}: the inspection helper died while loading the plugin ({}); it is not a \
                 working capnet driver plugin",
                path.display(),
                describe_exit(exit.as_ref(), "inspect", limits.memory_bytes)
            ));
        }
        let st: HostStatus = serde_json::from_str(text.trim())
            .map_err(|e| format!("the inspection helper sent a malformed answer: {e}"))?;
        match (st.ok, st.identity, st.error) {
            (true, Some(identity), _) => Ok(Inspection {
                path: path.to_path_buf(),
                size,
                sha256,
                identity,
                signature,
            }),
            (_, _, e) => Err(e.unwrap_or_else(|| format!("{} was refused", path.display()))),
        }
    }

    /// The approval and manifest of a running driver: (sha256, approved privileges,
    /// the identity its plugin reported).
    pub fn approval(
        &self,
        name: &str,
    ) -> Option<(Option<String>, Option<Privileges>, Option<PluginIdentity>)> {
        let slots = self.inner.slots.borrow();
        let s = slots.get(name)?;
        let identity = match &*s.state.borrow() {
            SlotState::Running(r) => Some(r.identity.clone()),
            _ => None,
        };
        Some((s.config.sha256.clone(), s.config.privileges, identity))
    }

    /// Starts every configured driver (each under its own supervising task).
    pub fn start_all(&self) {
        let slots: Vec<_> = self.inner.slots.borrow().values().cloned().collect();
        for slot in slots {
            let inner = self.inner.clone();
            tokio::task::spawn_local(supervise(inner, slot));
        }
    }

    /// Stops every driver host.
    pub async fn stop_all(&self) {
        let slots: Vec<_> = self.inner.slots.borrow().values().cloned().collect();
        futures::future::join_all(slots.iter().map(|s| stop_slot(s))).await;
    }

    /// Whether a driver of that name is configured.
    pub fn exists(&self, name: &str) -> bool {
        self.inner.slots.borrow().contains_key(name)
    }

    /// The running driver's capability and generation, waiting up to `wait` for a driver
    /// that is starting or restarting.
    pub async fn client(
        &self,
        name: &str,
        wait: Duration,
    ) -> Result<(driver::Client, u64), DriverUnavailable> {
        let slot = self
            .inner
            .slots
            .borrow()
            .get(name)
            .cloned()
            .ok_or_else(|| DriverUnavailable::Unknown(name.to_string()))?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut rx = slot.changed.subscribe();
        loop {
            let state = slot.state.borrow().clone();
            match state {
                SlotState::Running(r) => return Ok((r.client, r.generation)),
                SlotState::Failed(reason) => {
                    return Err(DriverUnavailable::Failed {
                        name: name.to_string(),
                        reason,
                    });
                }
                SlotState::Stopped => return Err(DriverUnavailable::Stopped(name.to_string())),
                SlotState::Starting | SlotState::Restarting => {
                    if tokio::time::timeout_at(deadline, rx.changed())
                        .await
                        .is_err()
                    {
                        return Err(DriverUnavailable::NotReady(name.to_string()));
                    }
                }
            }
        }
    }

    /// The current generation of a driver (changes at every restart).
    pub fn generation(&self, name: &str) -> Option<u64> {
        let slots = self.inner.slots.borrow();
        let slot = slots.get(name)?;
        match &*slot.state.borrow() {
            SlotState::Running(r) => Some(r.generation),
            _ => None,
        }
    }

    /// The state of every driver.
    pub fn list(&self) -> Vec<DriverInfo> {
        self.inner
            .slots
            .borrow()
            .values()
            .map(|s| {
                let state = s.state.borrow();
                let (label, pid, uptime, version) = match &*state {
                    SlotState::Starting => ("starting", 0, Duration::ZERO, String::new()),
                    SlotState::Running(r) => (
                        "running",
                        r.pid,
                        r.since.elapsed(),
                        r.identity.version.clone(),
                    ),
                    SlotState::Restarting => ("restarting", 0, Duration::ZERO, String::new()),
                    SlotState::Failed(_) => ("failed", 0, Duration::ZERO, String::new()),
                    SlotState::Stopped => ("stopped", 0, Duration::ZERO, String::new()),
                };
                DriverInfo {
                    name: s.name.clone(),
                    state: label,
                    pid,
                    plugin: s.plugin.clone(),
                    version,
                    restarts: s.restarts.get(),
                    uptime,
                    last_error: s.last_error.borrow().clone(),
                }
            })
            .collect()
    }
}

/// Stops a driver's host and waits (up to 5 s) until it is down.
async fn stop_slot(slot: &Slot) {
    slot.stopping.set(true);
    // notify_one keeps the wake-up for a supervising task that is not waiting right now
    // (one still starting its host): a stop is never lost, so the host's sandbox is
    // always torn down.
    slot.stop.notify_one();
    let mut rx = slot.changed.subscribe();
    while !matches!(
        *slot.state.borrow(),
        SlotState::Stopped | SlotState::Failed(_)
    ) {
        if tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .is_err()
        {
            break;
        }
    }
}

/// What `capnet driver inspect` shows.
#[derive(Clone, Debug)]
pub struct Inspection {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256, hex.
    pub sha256: String,
    /// What it says it is.
    pub identity: PluginIdentity,
    /// Its signature, checked against the bytes read and the trusted authors.
    pub signature: crate::signing::SignatureStatus,
}

/// Waits until a health call fails to answer within `timeout` (polling every `interval`)
/// and returns why.
async fn health_watch(client: &driver::Client, interval: Duration, timeout: Duration) -> String {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, client.health_request().send().promise).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("the health check failed: {e}"),
            Err(_) => {
                return format!(
                    "the driver did not answer its health check within {} ms; killed",
                    timeout.as_millis()
                );
            }
        }
    }
}

/// A failure to bring a host up.
enum StartError {
    /// Will not get better by retrying (refused plugin, bad options).
    Permanent(String),
    /// May get better (the host crashed while starting).
    Transient(String),
}

struct Host {
    running: Running,
    sandbox: Arc<Sandboxed>,
    /// The host id, released once the sandbox is torn down.
    host_id: LiveId,
    rpc_done: tokio::sync::oneshot::Receiver<String>,
}

/// Kills what is left of a host's sandbox and removes it; returns its exit.
async fn end_host(sb: Arc<Sandboxed>, host_id: LiveId) -> Option<SandboxExit> {
    sb.kill_helper();
    let exit = sandboxes::teardown(sb).await;
    drop(host_id);
    exit
}

async fn supervise(inner: Rc<Inner>, slot: Rc<Slot>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        if slot.stopping.get() {
            break;
        }
        slot.set(SlotState::Starting);
        let crashed = match start_host(&inner, &slot).await {
            Err(StartError::Permanent(reason)) => {
                tracing::error!(driver = %slot.name, %reason, "driver refused");
                mark_failed(&inner, &slot, "driver_refused", reason);
                return;
            }
            Err(StartError::Transient(reason)) => reason,
            Ok(mut host) => {
                let started = host.running.since;
                tracing::info!(driver = %slot.name, pid = host.running.pid, generation = host.running.generation, "driver running");
                inner.audit.record(
                    AuditRecord::new("driver_started")
                        .driver(&slot.name)
                        .detail(format!(
                            "pid {} generation {}",
                            host.running.pid, host.running.generation
                        )),
                );
                slot.set(SlotState::Running(Box::new(host.running.clone())));
                let limits = slot.config.limits();
                let why = tokio::select! {
                    status = host.sandbox.wait() => describe_exit(status.ok().as_ref(), &slot.name, limits.memory_bytes),
                    r = &mut host.rpc_done => r.unwrap_or_else(|_| "connection lost".into()),
                    why = health_watch(&host.running.client, inner.health_interval, inner.health_timeout) => why,
                    _ = slot.stop.notified() => String::new(),
                };
                let Host {
                    sandbox, host_id, ..
                } = host;
                let status = end_host(sandbox, host_id).await;
                if slot.stopping.get() {
                    break;
                }
                let why = if why == "connection lost" || why.starts_with("the connection") {
                    format!(
                        "{why}; {}",
                        describe_exit(status.as_ref(), &slot.name, limits.memory_bytes)
                    )
                } else {
                    why
                };
                if started.elapsed() > STABLE_AFTER {
                    backoff = FIRST_BACKOFF;
                }
                why
            }
        };
        tracing::warn!(driver = %slot.name, reason = %crashed, "driver host ended; restarting");
        inner.audit.record(
            AuditRecord::new("driver_crashed")
                .driver(&slot.name)
                .detail(crashed.clone()),
        );
        *slot.last_error.borrow_mut() = crashed.clone();
        slot.restarts.set(slot.restarts.get() + 1);
        let now = Instant::now();
        let too_many = {
            let mut c = slot.crashes.borrow_mut();
            c.push_back(now);
            while c
                .front()
                .is_some_and(|t| now.duration_since(*t) > inner.crash_window)
            {
                c.pop_front();
            }
            c.len() as u32 > inner.max_crashes
        };
        if too_many {
            let reason = format!(
                "crashed {} times within {}s (last: {crashed}); fix the plugin or its options, \
                 then `capnet reload`",
                inner.max_crashes + 1,
                inner.crash_window.as_secs()
            );
            mark_failed(&inner, &slot, "driver_failed", reason);
            return;
        }
        slot.set(SlotState::Restarting);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = slot.stop.notified() => break,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    slot.set(SlotState::Stopped);
}

fn describe_exit(exit: Option<&SandboxExit>, name: &str, memory_limit: u64) -> String {
    let Some(exit) = exit else {
        return "the driver host ended; its exit status could not be read".into();
    };
    match exit.reason {
        ExitReason::Exited(101) => "the plugin panicked (driver host exit status 101)".into(),
        ExitReason::Exited(0) => "the driver host exited".into(),
        ExitReason::Exited(c) => format!("the driver host exited with status {c}"),
        ExitReason::Signaled(sig) => format!(
            "the driver host was killed by signal {sig} ({})",
            signal_name(sig)
        ),
        ExitReason::OomKilled => format!(
            "the driver host was killed by the kernel's OOM killer (oom) at its memory limit \
             of {}; raise drivers.{name}.memory if the load is legitimate",
            format_bytes(memory_limit)
        ),
    }
}

fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {sig}"))
}

/// Seals `bytes` in a memfd that nobody can change afterwards.
fn sealed_bytes(bytes: &[u8]) -> Result<OwnedFd, StartError> {
    let fd = memfd_create(
        c"capnet-plugin",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(|e| StartError::Transient(format!("memfd_create failed: {e}")))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)
        .map_err(|e| StartError::Transient(format!("writing the plugin memfd failed: {e}")))?;
    fcntl(
        &file,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SEAL
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_WRITE,
        ),
    )
    .map_err(|e| StartError::Transient(format!("sealing the plugin memfd failed: {e}")))?;
    Ok(OwnedFd::from(file))
}

/// Reads the plugin bytes once, checks them against the approval, and seals exactly those
/// bytes in a memfd for the host to load.
fn sealed_plugin(slot: &Slot) -> Result<OwnedFd, StartError> {
    let bytes = std::fs::read(&slot.plugin).map_err(|e| {
        StartError::Permanent(format!(
            "cannot read plugin {}: {e}; check drivers.{}.plugin in the config",
            slot.plugin.display(),
            slot.name
        ))
    })?;
    let found = hex::encode(Sha256::digest(&bytes));
    match &slot.config.sha256 {
        None => {
            return Err(StartError::Permanent(format!(
                "{}: driver {} is not approved (no sha256 in [drivers.{}]); inspect it and approve \
                 it with `capnet driver approve {} --name {}`",
                slot.plugin.display(),
                slot.name,
                slot.name,
                slot.plugin.display(),
                slot.name
            )));
        }
        Some(expected) if !expected.eq_ignore_ascii_case(&found) => {
            return Err(StartError::Permanent(format!(
                "{}: SHA-256 is {found}, but the approved plugin has {expected}; the file changed \
                 since it was approved. Inspect the new file and, if it is trusted, run \
                 `capnet driver upgrade {} {}`",
                slot.plugin.display(),
                slot.name,
                slot.plugin.display()
            )));
        }
        Some(_) => {}
    }
    sealed_bytes(&bytes)
}

/// Leaves `slot` down as failed for `reason`, audited as `kind`, until a reload.
fn mark_failed(inner: &Inner, slot: &Slot, kind: &str, reason: String) {
    inner.audit.record(
        AuditRecord::new(kind)
            .driver(&slot.name)
            .detail(reason.clone()),
    );
    *slot.last_error.borrow_mut() = reason.clone();
    slot.set(SlotState::Failed(reason));
}

/// What a driver host sees read-only besides the system files the sandbox always gives
/// it: the system directories and every file named in the driver's `extra_ca_files`
/// option, at the same path inside, so a driver can trust a private CA.
fn host_binds(driver: &str, options: &toml::Table) -> Result<Vec<(PathBuf, PathBuf)>, StartError> {
    let mut binds = SandboxSpec::system_binds();
    let Some(files) = options.get("extra_ca_files") else {
        return Ok(binds);
    };
    let bad = |what: String| {
        StartError::Permanent(format!(
            "driver {driver}: options.extra_ca_files {what}; give a list of absolute paths to \
             PEM files"
        ))
    };
    let files = files
        .as_array()
        .ok_or_else(|| bad("is not a list".to_string()))?;
    for f in files {
        let path = f
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(|| bad(format!("holds {f}, which is not a string")))?;
        if !path.is_absolute()
            || path
                .components()
                .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(bad(format!(
                "holds {}, which is not absolute",
                path.display()
            )));
        }
        if !path.is_file() {
            return Err(StartError::Permanent(format!(
                "driver {driver}: CA file {} in options.extra_ca_files does not exist or is not \
                 a file; fix the path or remove it",
                path.display()
            )));
        }
        binds.push((path.clone(), path));
    }
    Ok(binds)
}

async fn start_host(inner: &Rc<Inner>, slot: &Rc<Slot>) -> Result<Host, StartError> {
    let plugin_fd = sealed_plugin(slot)?;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| StartError::Transient(format!("socketpair failed: {e}")))?;
    let (status_r, status_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| StartError::Transient(format!("pipe failed: {e}")))?;
    std::fs::create_dir_all(&inner.log_dir).map_err(|e| {
        StartError::Transient(format!("cannot create {}: {e}", inner.log_dir.display()))
    })?;
    let log_path = inner.log_dir.join(format!("{}.log", slot.name));
    let log = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(|e| {
                StartError::Transient(format!("cannot open {}: {e}", log_path.display()))
            })?
    };
    ours.set_nonblocking(true)
        .map_err(|e| StartError::Transient(format!("socket setup failed: {e}")))?;
    let stream = tokio::net::UnixStream::from_std(ours)
        .map_err(|e| StartError::Transient(format!("socket setup failed: {e}")))?;
    let image = inner.host_image.try_clone().map_err(|e| {
        StartError::Transient(format!("cannot duplicate the driver host image: {e}"))
    })?;
    let host_id = inner
        .sandboxes
        .transient_id()
        .map_err(|e| StartError::Transient(e.to_string()))?;
    let limits = slot.config.limits();
    let spec = SandboxSpec {
        id: slot.name.clone(),
        role: Role::DriverHost,
        program: Program::Fd(image),
        args: vec!["--plugin".to_string(), slot.plugin.display().to_string()],
        env: vec![(
            "CAPNET_LOG".to_string(),
            std::env::var("CAPNET_LOG").unwrap_or_else(|_| "info".into()),
        )],
        app_dir: None,
        var_dir: None,
        ro_binds: host_binds(&slot.name, &slot.config.options)?,
        tmp_size_bytes: limits.tmp_bytes,
        limits: limits.sandbox(),
        host_uid: host_id.uid(),
        host_gid: host_id.uid(),
        rpc_fd: OwnedFd::from(theirs),
        extra_fds: vec![
            (plugin_fd, driver_host::PLUGIN_FD),
            (status_w, driver_host::STATUS_FD),
        ],
        log_fd: Some(OwnedFd::from(log)),
        ambient_caps: Vec::new(),
    };
    let sb = inner.sandboxes.spawn(spec).await.map_err(|e| match e {
        SpawnError::InvalidSpec(_) | SpawnError::Path(_) => StartError::Permanent(format!(
            "cannot build the sandbox of driver host {}: {e}",
            inner.host_exe.display()
        )),
        other => StartError::Transient(format!("cannot start the driver host sandbox: {other}")),
    })?;
    let pid = sb.pid;
    match handshake(inner, slot, stream, status_r).await {
        Ok((client, identity, rpc_done)) => {
            slot.generation.set(slot.generation.get() + 1);
            Ok(Host {
                running: Running {
                    client,
                    generation: slot.generation.get(),
                    pid,
                    since: Instant::now(),
                    identity,
                },
                sandbox: sb,
                host_id,
                rpc_done,
            })
        }
        Err(f) => {
            // A host that failed on its own (refused plugin, crash) is given a moment to
            // exit, so its real exit status is reported rather than our SIGKILL.
            if f.host_ends {
                let _ = tokio::time::timeout(HOST_EXIT_WAIT, sb.wait()).await;
            }
            let exit = end_host(sb, host_id).await;
            let message = if f.with_exit {
                format!(
                    "{}: {}",
                    f.message,
                    describe_exit(exit.as_ref(), &slot.name, limits.memory_bytes)
                )
            } else {
                f.message
            };
            Err(if f.permanent {
                StartError::Permanent(message)
            } else {
                StartError::Transient(message)
            })
        }
    }
}

/// How long a host that failed by itself gets to exit before it is killed.
const HOST_EXIT_WAIT: Duration = Duration::from_secs(2);

/// Why a started host could not be brought into service.
struct HandshakeFailure {
    permanent: bool,
    message: String,
    /// Append the host's exit to the message.
    with_exit: bool,
    /// The host is expected to exit by itself.
    host_ends: bool,
}

impl HandshakeFailure {
    fn new(permanent: bool, message: String) -> Self {
        Self {
            permanent,
            message,
            with_exit: false,
            host_ends: false,
        }
    }
}

/// Reads the host's status line, checks the plugin's privileges and calls
/// `Driver.start`.
async fn handshake(
    inner: &Rc<Inner>,
    slot: &Rc<Slot>,
    stream: tokio::net::UnixStream,
    status_r: OwnedFd,
) -> Result<
    (
        driver::Client,
        PluginIdentity,
        tokio::sync::oneshot::Receiver<String>,
    ),
    HandshakeFailure,
> {
    // The status line, read on a blocking thread: one line, then the host closes the
    // pipe (end-of-file also if it dies).
    let status = tokio::task::spawn_blocking(move || {
        let mut text = Vec::new();
        let mut f = std::fs::File::from(status_r);
        let mut buf = [0u8; 4096];
        while !text.contains(&b'\n') && text.len() < 1 << 20 {
            match f.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => text.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&text).into_owned()
    });
    let text = match tokio::time::timeout(START_TIMEOUT, status).await {
        Ok(Ok(t)) => t,
        _ => {
            return Err(HandshakeFailure::new(
                false,
                format!(
                    "the driver host did not report within {}s",
                    START_TIMEOUT.as_secs()
                ),
            ));
        }
    };
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        return Err(HandshakeFailure {
            with_exit: true,
            host_ends: true,
            ..HandshakeFailure::new(
                false,
                "the driver host died while loading the plugin".to_string(),
            )
        });
    }
    let status: HostStatus = serde_json::from_str(line).map_err(|e| {
        HandshakeFailure::new(
            false,
            format!("the driver host sent a malformed status: {e}"),
        )
    })?;
    let identity = match (status.ok, status.identity, status.error) {
        (true, Some(id), _) => id,
        (_, _, err) => {
            return Err(HandshakeFailure {
                host_ends: true,
                ..HandshakeFailure::new(
                    true,
                    err.unwrap_or_else(|| "the plugin was refused".into()),
                )
            });
        }
    };
    let asked = identity.manifest.privileges;
    let approved = slot.config.privileges.unwrap_or_default();
    let exceeding = asked.exceeding(&approved);
    if !exceeding.is_empty() {
        return Err(HandshakeFailure::new(
            true,
            format!(
                "{}: the plugin's manifest asks for privileges that were not approved: {} \
                 (approved: {}); inspect it and, if you accept them, re-approve it with \
                 `capnet driver upgrade {} {}`",
                slot.plugin.display(),
                exceeding.join(", "),
                match approved.names() {
                    n if n.is_empty() => "none".to_string(),
                    n => n.join(", "),
                },
                slot.name,
                slot.plugin.display()
            ),
        ));
    }
    let granted = Privileges {
        outbound_tcp: asked.outbound_tcp && approved.outbound_tcp,
        outbound_udp: asked.outbound_udp && approved.outbound_udp,
        inbound_tcp: asked.inbound_tcp && approved.inbound_tcp,
        inbound_udp: asked.inbound_udp && approved.inbound_udp,
        low_ports: asked.low_ports && approved.low_ports,
        dns: asked.dns && approved.dns,
    };

    let mut rpc = two_party(stream, Side::Client, None);
    let client: driver::Client = rpc.bootstrap(Side::Server);
    let (done_tx, rpc_done) = tokio::sync::oneshot::channel();
    tokio::task::spawn_local(async move {
        let r = rpc.await;
        let _ = done_tx.send(match r {
            Ok(()) => "the connection to the driver closed".to_string(),
            Err(e) => format!("the connection to the driver failed: {e}"),
        });
    });

    let mut req = client.start_request();
    {
        let mut p = req.get();
        let sink: event_sink::Client = capnp_rpc::new_client(EventSinkImpl {
            driver: slot.name.clone(),
            handler: inner.events.clone(),
        });
        p.set_events(sink);
        let mut c = p.init_config();
        c.set_name(&slot.name);
        let options = toml::to_string(&slot.config.options).unwrap_or_default();
        c.set_options_toml(&options);
        granted.write(c.reborrow().init_privileges());
        let addrs = &slot.config.listen_addresses;
        let mut la = c.reborrow().init_listen_addresses(addrs.len() as u32);
        for (i, a) in addrs.iter().enumerate() {
            la.set(i as u32, a);
        }
        write_rule_configs(&slot.config.rules, c.init_policy()).map_err(|e| {
            HandshakeFailure::new(true, format!("drivers.{}.rules: {e}", slot.name))
        })?;
    }
    match tokio::time::timeout(START_TIMEOUT, req.send().promise).await {
        Ok(Ok(_)) => Ok((client, identity, rpc_done)),
        Ok(Err(e)) if e.kind == capnp::ErrorKind::Disconnected => Err(HandshakeFailure {
            with_exit: true,
            host_ends: true,
            ..HandshakeFailure::new(false, "the driver died while starting".to_string())
        }),
        Ok(Err(e)) => Err(HandshakeFailure::new(
            true,
            format!(
                "driver {} refused to start: {}",
                slot.name,
                e.extra.trim_start_matches("remote exception: ")
            ),
        )),
        Err(_) => Err(HandshakeFailure::new(
            false,
            format!(
                "the driver did not answer start within {}s",
                START_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// Receives a driver's audit events.
struct EventSinkImpl {
    driver: String,
    handler: EventHandler,
}

impl event_sink::Server for EventSinkImpl {
    async fn report(self: Rc<Self>, params: event_sink::ReportParams) -> Result<(), capnp::Error> {
        let event = Event::read(params.get()?.get_event()?)?;
        (self.handler)(&self.driver, event);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(s: &str) -> toml::Table {
        s.parse().expect("test options")
    }

    fn message(r: Result<Vec<(PathBuf, PathBuf)>, StartError>) -> String {
        match r {
            Err(StartError::Permanent(m)) => m,
            Err(StartError::Transient(m)) => panic!("transient: {m}"),
            Ok(b) => panic!("accepted: {b:?}"),
        }
    }

    #[test]
    fn extra_ca_files_are_bound_at_their_own_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "pem").expect("write");
        let binds = host_binds("smtp", &options(&format!("extra_ca_files = [{ca:?}]")))
            .unwrap_or_else(|_| panic!("refused"));
        assert!(binds.contains(&(ca.clone(), ca)));
        assert_eq!(
            host_binds("tcp", &options("")).map(|b| b.len()).ok(),
            Some(SandboxSpec::system_binds().len())
        );
    }

    #[test]
    fn bad_extra_ca_files_are_refused_with_the_reason() {
        assert!(
            message(host_binds("smtp", &options(r#"extra_ca_files = "x""#))).contains("not a list")
        );
        assert!(
            message(host_binds(
                "smtp",
                &options(r#"extra_ca_files = ["ca.pem"]"#)
            ))
            .contains("not absolute")
        );
        assert!(
            message(host_binds(
                "smtp",
                &options(r#"extra_ca_files = ["/nonexistent/ca.pem"]"#)
            ))
            .contains("does not exist")
        );
    }
}
