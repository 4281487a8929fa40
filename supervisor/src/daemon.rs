//! `capnetd`: wiring the parts together and running until told to stop.
//!
//! [`run`] takes its shutdown signal as a future so tests and embedders can run the daemon
//! in-process. It must be called inside a tokio `LocalSet` on a current-thread runtime:
//! all Cap'n Proto objects live on that one thread.

use std::future::Future;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use capnet_schemas::admin_capnp::admin;
use tokio::sync::Notify;

use crate::admin::{AdminImpl, AdminSocketError};
use crate::audit::{Audit, AuditRecord};
use crate::config::{Config, SharedConfig};
use crate::drivers::DriverManager;
use crate::grains::GrainManager;
use crate::grants::GrantTable;
use crate::powerbox::Powerbox;
use crate::sandbox::SpawnerError;
use crate::sandboxes::Sandboxes;
use crate::state::{State, StateError};

/// Exit codes of `capnetd`.
pub mod exit {
    /// Clean shutdown.
    pub const OK: i32 = 0;
    /// The command line was wrong.
    pub const USAGE: i32 = 2;
    /// The configuration could not be loaded.
    pub const CONFIG: i32 = 3;
    /// The state directory or admin socket could not be set up.
    pub const SETUP: i32 = 4;
    /// The daemon must run as root.
    pub const NOT_ROOT: i32 = 5;
}

/// The daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state directory could not be created.
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The admin socket could not be bound.
    #[error(transparent)]
    Socket(#[from] AdminSocketError),
    /// The state database could not be opened.
    #[error(transparent)]
    State(#[from] StateError),
    /// The sandbox spawner (helper image, cgroups, spawner thread) could not be set up.
    #[error("cannot set up sandboxes: {0}")]
    Sandboxes(#[from] SpawnerError),
    /// The driver host executable could not be loaded.
    #[error(transparent)]
    DriverHost(#[from] crate::drivers::DriverHostImageError),
}

/// Runs the daemon until `shutdown` resolves or an administrator asks it to stop.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let shared = SharedConfig::new(config);
    let config = shared.get();
    let state_dir = config.daemon.state_dir.clone();
    create_private_dir(&state_dir).map_err(|source| DaemonError::StateDir {
        path: state_dir.clone(),
        source,
    })?;
    let state = State::open(&state_dir.join("state.db"))?;
    let audit = Audit::with_state(state.clone());
    // One spawner for every sandbox of this daemon; dropped last, when `run` returns, which
    // (through PR_SET_PDEATHSIG on its thread) takes down any sandbox still alive.
    let sandboxes = Sandboxes::new(&config)?;

    // Driver events are audited with the grain of their grant, looked up at arrival.
    let grants_cell: Rc<std::cell::OnceCell<GrantTable>> = Rc::default();
    let events = {
        let audit = audit.clone();
        let grants_cell = grants_cell.clone();
        Rc::new(move |driver: &str, e: capnet_driver_api::Event| {
            let grain = grants_cell
                .get()
                .and_then(|t| t.get(&e.grant_id))
                .map(|g| g.grain.clone())
                .unwrap_or_default();
            audit.record(AuditRecord {
                kind: e.kind.as_str().to_string(),
                grain,
                grant: e.grant_id,
                driver: driver.to_string(),
                destination: e.destination,
                rule: e.rule,
                bytes_in: e.bytes_in,
                bytes_out: e.bytes_out,
                duration_ms: e.duration_ms,
                detail: e.detail,
                ..AuditRecord::new("")
            });
        })
    };
    let drivers = DriverManager::new(&config, audit.clone(), events, sandboxes.clone())?;
    let grants = GrantTable::load(drivers.clone(), audit.clone(), state.clone()).await?;
    let _ = grants_cell.set(grants.clone());
    let powerbox = Powerbox::new(config.daemon.request_timeout(), audit.clone());
    let grains = GrainManager::new(
        shared.clone(),
        powerbox.clone(),
        grants.clone(),
        audit.clone(),
        sandboxes.clone(),
    );
    let housekeeping = tokio::task::spawn_local(housekeeping(
        grants.clone(),
        state.clone(),
        Duration::from_secs(config.daemon.audit_retention_days.saturating_mul(86_400)),
        config.daemon.audit_max_records,
    ));

    let socket_path = config.daemon.admin_socket();
    let listener = crate::admin::bind(&socket_path)?;
    let stop = Rc::new(Notify::new());
    let stop_grace = Duration::from_millis(config.daemon.stop_grace_ms);
    let admin: admin::Client = capnp_rpc::new_client(AdminImpl {
        grains: grains.clone(),
        drivers: drivers.clone(),
        grants: grants.clone(),
        powerbox,
        config: shared.clone(),
        audit: audit.clone(),
        stop_grace,
        shutdown: stop.clone(),
    });
    drivers.start_all();
    audit.record(AuditRecord::new("daemon_started").detail(format!(
        "config {}, admin socket {}",
        config.path.display(),
        socket_path.display()
    )));
    tracing::info!(socket = %socket_path.display(), "capnetd ready");

    let accept = tokio::task::spawn_local(crate::admin::serve(listener, admin));
    let hangups = {
        let (shared, drivers, grants, audit) = (
            shared.clone(),
            drivers.clone(),
            grants.clone(),
            audit.clone(),
        );
        tokio::task::spawn_local(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                tracing::warn!("cannot watch SIGHUP; use `capnet reload`");
                return;
            };
            while hup.recv().await.is_some() {
                match reload(&shared, &drivers, &grants, &audit).await {
                    Ok(summary) => tracing::info!(%summary, "SIGHUP: config reloaded"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: config refused"),
                }
            }
        })
    };
    tokio::select! {
        _ = shutdown => {}
        _ = stop.notified() => {}
    }
    hangups.abort();
    tracing::info!("shutting down");
    accept.abort();
    housekeeping.abort();
    grains.stop_all(stop_grace).await;
    drivers.stop_all().await;
    sandboxes.remove_parent_if_empty();
    let _ = std::fs::remove_file(&socket_path);
    audit.record(AuditRecord::new("daemon_stopped"));
    audit.flush();
    if let Err(e) = grants.flush_usage().await {
        tracing::warn!(error = %e, "could not store grant usage at shutdown");
    }
    Ok(())
}

/// Re-reads the config and applies it. A broken config changes nothing and returns the
/// error (with the file, line and column); otherwise returns a summary of what changed.
pub async fn reload(
    config: &SharedConfig,
    drivers: &DriverManager,
    grants: &GrantTable,
    audit: &Audit,
) -> Result<String, String> {
    let current = config.get();
    let fresh = match Config::load(&current.path) {
        Ok(c) => c,
        Err(e) => {
            audit.record(AuditRecord::new("reload_refused").detail(e.to_string()));
            return Err(format!("the config was not reloaded, nothing changed: {e}"));
        }
    };
    let mut fresh = fresh;
    fresh.set_overrides(current.overrides.clone());
    // Settings that need a restart keep their running values.
    let mut notes = Vec::new();
    let later = current.daemon.restart_only_changes(&fresh.daemon);
    if !later.is_empty() {
        notes.push(format!(
            "changed in [daemon], effective after capnetd restarts: {}",
            later.join(", ")
        ));
        let plugin_dir = fresh.daemon.plugin_dir.take();
        fresh.daemon = current.daemon.clone();
        fresh.daemon.plugin_dir = plugin_dir;
    }
    let r = drivers.apply(&fresh).await;
    for name in &r.removed {
        if let Err(e) = grants
            .revoke_driver(name, &format!("driver {name} was removed from the config"))
            .await
        {
            notes.push(format!("revoking the grants of {name} failed: {e}"));
        }
    }
    config.set(fresh);
    let mut summary = vec![format!(
        "reloaded {}: {} driver(s) added, {} removed, {} restarted, the rest unchanged",
        current.path.display(),
        r.added.len(),
        r.removed.len(),
        r.restarted.len()
    )];
    for (what, list) in [
        ("added", &r.added),
        ("removed", &r.removed),
        ("restarted", &r.restarted),
    ] {
        if !list.is_empty() {
            summary.push(format!("{what}: {}", list.join(", ")));
        }
    }
    summary.extend(notes);
    let text = summary.join("\n");
    audit.record(AuditRecord::new("reload").detail(text.clone()));
    Ok(text)
}

/// Stores grant usage every few seconds and prunes the audit trail every ten minutes.
async fn housekeeping(grants: GrantTable, state: State, retention: Duration, max_records: u64) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        if let Err(e) = grants.flush_usage().await {
            tracing::warn!(error = %e, "could not store grant usage");
        }
        if n.is_multiple_of(120) {
            let before = crate::audit::now_ms().saturating_sub(retention.as_millis() as u64);
            match state
                .call(move |db| db.prune_audit(before, max_records))
                .await
            {
                Ok(0) => {}
                Ok(k) => tracing::info!(records = k, "pruned the audit trail"),
                Err(e) => tracing::warn!(error = %e, "could not prune the audit trail"),
            }
        }
        n += 1;
    }
}

fn create_private_dir(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !path.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)?;
    }
    let meta = std::fs::metadata(path)?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}
