//! The driver host: the process that loads one plugin and serves it to the supervisor.
//!
//! `capnetd` starts `capnet-driver-host` with three descriptors:
//! * fd 3 — its end of a socketpair, handed to the plugin's `serve`;
//! * fd 4 — a sealed memfd with the plugin's bytes, exactly as the supervisor read (and
//!   hashed) them; the host loads `/proc/self/fd/4`, never the path;
//! * fd 5 — a status pipe: one JSON line, [`HostStatus`], says whether the plugin loaded
//!   and what it is, before the plugin starts serving.
//!
//! It runs inside a driver-host sandbox (see `crate::drivers`). Once the plugin is loaded
//! and identified — and before a single call reaches it — the host locks itself down
//! with [`crate::sandbox::seccomp::lock_down_driver_host`]: from then on no thread can
//! exec, open a file for writing, create, link, rename or remove files, or create a
//! memfd. A host that cannot lock itself down refuses to serve.
//!
//! `capnet-driver-host --inspect FILE` loads a plugin the same way and prints its identity
//! as JSON, for `capnet driver inspect`.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::sys::plugin::{self, PluginIdentity};

/// Descriptor of the RPC socket in the driver host.
pub const RPC_FD: i32 = 3;
/// Descriptor of the plugin memfd in the driver host.
pub const PLUGIN_FD: i32 = 4;
/// Descriptor of the status pipe in the driver host.
pub const STATUS_FD: i32 = 5;

/// Exit codes of the driver host.
pub mod exit {
    /// The supervisor disconnected; normal end.
    pub const OK: i32 = 0;
    /// The plugin was refused (details on the status pipe).
    pub const REFUSED: i32 = 64;
    /// The descriptors were missing.
    pub const USAGE: i32 = 65;
}

/// The status line the host writes before serving.
#[derive(Debug, Serialize, Deserialize)]
pub struct HostStatus {
    /// Whether the plugin loaded and passed the checks.
    pub ok: bool,
    /// What the plugin is, if it loaded.
    pub identity: Option<PluginIdentity>,
    /// Why it was refused, if it was.
    pub error: Option<String>,
}

impl HostStatus {
    /// The status of a load attempt.
    fn of<T>(loaded: &Result<(T, PluginIdentity), String>) -> Self {
        match loaded {
            Ok((_, id)) => HostStatus {
                ok: true,
                identity: Some(id.clone()),
                error: None,
            },
            Err(e) => HostStatus {
                ok: false,
                identity: None,
                error: Some(e.clone()),
            },
        }
    }
}

fn load(
    load_path: &Path,
    display: &Path,
) -> Result<(plugin::LoadedPlugin, PluginIdentity), String> {
    let p = plugin::load(load_path, display).map_err(|e| e.to_string())?;
    let id = p.identity().map_err(|e| e.to_string())?;
    Ok((p, id))
}

/// Runs the serving mode. `display` is the plugin path as the administrator named it.
pub fn serve_main(display: PathBuf) -> i32 {
    let fds = [RPC_FD, PLUGIN_FD, STATUS_FD].map(crate::sys::process::inherited_fd);
    let [Some(socket), Some(plugin_fd), Some(status_fd)] = fds else {
        eprintln!(
            "capnet-driver-host: descriptors 3, 4 and 5 must be open; this program is started \
             by capnetd"
        );
        return exit::USAGE;
    };
    let mut status = std::fs::File::from(status_fd);
    let load_path = PathBuf::from(format!("/proc/self/fd/{PLUGIN_FD}"));
    let loaded = load(&load_path, &display).and_then(|(p, id)| {
        // The plugin's code is mapped; nothing may be executed or written from here on.
        crate::sandbox::seccomp::lock_down_driver_host().map_err(|e| {
            format!("cannot lock down the driver host after loading the plugin: {e}")
        })?;
        Ok((p, id))
    });
    let (line, result) = match loaded {
        Ok((p, id)) => (
            HostStatus {
                ok: true,
                identity: Some(id),
                error: None,
            },
            Ok(p),
        ),
        Err(e) => (
            HostStatus {
                ok: false,
                identity: None,
                error: Some(e.clone()),
            },
            Err(e),
        ),
    };
    let text = serde_json::to_string(&line).unwrap_or_else(|_| "{\"ok\":false}".into());
    let _ = writeln!(status, "{text}");
    drop(status);
    match result {
        Ok(p) => {
            drop(plugin_fd);
            p.serve(socket)
        }
        Err(e) => {
            eprintln!("capnet-driver-host: {e}");
            exit::REFUSED
        }
    }
}

/// Runs the inspection mode for capnetd: loads the sealed memfd on fd 4 (the bytes capnetd
/// read from `display`) and writes the identity as one JSON line to fd 5.
pub fn inspect_fd_main(display: PathBuf) -> i32 {
    let fds = [PLUGIN_FD, STATUS_FD].map(crate::sys::process::inherited_fd);
    let [Some(_plugin_fd), Some(status_fd)] = fds else {
        eprintln!(
            "capnet-driver-host: descriptors 4 and 5 must be open; this mode is used by capnetd"
        );
        return exit::USAGE;
    };
    let mut status = std::fs::File::from(status_fd);
    let load_path = PathBuf::from(format!("/proc/self/fd/{PLUGIN_FD}"));
    let line = HostStatus::of(&load(&load_path, &display));
    let ok = line.ok;
    let text = serde_json::to_string(&line).unwrap_or_else(|_| "{\"ok\":false}".into());
    let _ = writeln!(status, "{text}");
    if ok { exit::OK } else { exit::REFUSED }
}

/// Runs the inspection mode: prints the identity of `path` as JSON.
pub fn inspect_main(path: &Path) -> i32 {
    let line = HostStatus::of(&load(path, path));
    let ok = line.ok;
    match serde_json::to_string(&line) {
        Ok(t) => println!("{t}"),
        Err(e) => eprintln!("capnet-driver-host: {e}"),
    }
    if ok { exit::OK } else { exit::REFUSED }
}
