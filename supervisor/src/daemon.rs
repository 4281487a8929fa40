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
use crate::config::Config;
use crate::drivers::DriverManager;
use crate::grains::GrainManager;
use crate::grants::GrantTable;
use crate::powerbox::Powerbox;
use crate::sandbox::SpawnerError;
use crate::sandboxes::Sandboxes;

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
    /// The sandbox spawner (helper image, cgroups, spawner thread) could not be set up.
    #[error("cannot set up sandboxes: {0}")]
    Sandboxes(#[from] SpawnerError),
    /// The driver host executable could not be loaded.
    #[error(transparent)]
    DriverHost(#[from] crate::drivers::DriverHostImageError),
}

/// Runs the daemon until `shutdown` resolves or an administrator asks it to stop.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let config = Rc::new(config);
    let state_dir = config.daemon.state_dir.clone();
    create_private_dir(&state_dir).map_err(|source| DaemonError::StateDir {
        path: state_dir.clone(),
        source,
    })?;
    let audit = Audit::default();
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
    let grants = GrantTable::new(drivers.clone(), audit.clone());
    let _ = grants_cell.set(grants.clone());
    let powerbox = Powerbox::new(config.daemon.request_timeout(), audit.clone());
    let grains = GrainManager::new(
        config.clone(),
        powerbox.clone(),
        audit.clone(),
        sandboxes.clone(),
    );

    let socket_path = config.daemon.admin_socket();
    let listener = crate::admin::bind(&socket_path)?;
    let stop = Rc::new(Notify::new());
    let stop_grace = Duration::from_millis(config.daemon.stop_grace_ms);
    let admin: admin::Client = capnp_rpc::new_client(AdminImpl {
        grains: grains.clone(),
        drivers: drivers.clone(),
        grants,
        powerbox,
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
    tokio::select! {
        _ = shutdown => {}
        _ = stop.notified() => {}
    }
    tracing::info!("shutting down");
    accept.abort();
    grains.stop_all(stop_grace).await;
    drivers.stop_all().await;
    sandboxes.remove_parent_if_empty();
    let _ = std::fs::remove_file(&socket_path);
    audit.record(AuditRecord::new("daemon_stopped"));
    Ok(())
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
