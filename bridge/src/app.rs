//! Wrapper mode: start the app as a child with the proxy variables set, forward signals to
//! it, and end with its status.
//!
//! The child does not inherit fd 3 (the grain API belongs to the bridge; see
//! [`crate::sys::cloexec_grain_api`]). It runs in its own process group, so that a signal
//! the supervisor sends to the grain's group reaches the app once (forwarded by the
//! bridge) instead of twice, and it is killed if the bridge dies. When the bridge runs on a
//! terminal (stdin is a tty) the app stays in the bridge's group, so that it can read the
//! terminal, and SIGINT/SIGQUIT are left to the terminal.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};

/// Starting or waiting for the app failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// No program after `--`.
    #[error("no program given after --")]
    NoProgram,
    /// Spawning failed.
    #[error("cannot start {program:?}: {source}")]
    Spawn {
        /// The program.
        program: OsString,
        /// Why.
        source: std::io::Error,
    },
    /// Installing a signal handler or waiting failed.
    #[error("supervising the app failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The proxy variables for an app, given where the proxies listen. Both spellings are set
/// because programs disagree on which one they read (curl reads only lower-case
/// `http_proxy`; Python reads both).
pub fn proxy_env(socks: Option<SocketAddr>, http: Option<SocketAddr>) -> Vec<(String, String)> {
    let mut env = Vec::new();
    if let Some(s) = socks {
        let v = format!("socks5h://{s}");
        env.push(("ALL_PROXY".into(), v.clone()));
        env.push(("all_proxy".into(), v));
    }
    if let Some(h) = http {
        let v = format!("http://{h}");
        for k in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            env.push((k.into(), v.clone()));
        }
    }
    if socks.is_some() || http.is_some() {
        for k in ["NO_PROXY", "no_proxy"] {
            env.push((k.into(), "localhost,127.0.0.1".into()));
        }
    }
    env
}

/// Signals forwarded to the app.
const FORWARDED: [(Signal, bool); 6] = [
    (Signal::SIGTERM, false),
    (Signal::SIGHUP, false),
    (Signal::SIGUSR1, false),
    (Signal::SIGUSR2, false),
    (Signal::SIGINT, true),
    (Signal::SIGQUIT, true),
];

/// Runs `command` with `env` added, forwards signals, and returns the exit code the bridge
/// should end with: the app's, or 128 + the signal that killed it.
pub async fn run(command: &[OsString], env: &[(String, String)]) -> Result<i32, AppError> {
    let (program, args) = command.split_first().ok_or(AppError::NoProgram)?;
    let tty = std::io::stdin().is_terminal();
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .kill_on_drop(true);
    if !tty {
        cmd.process_group(0);
    }
    crate::sys::die_with_parent(&mut cmd);
    // Handlers first, so that no signal between spawn and here takes the default action.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (sig, terminal_sends_it) in FORWARDED {
        if tty && terminal_sends_it {
            continue;
        }
        let mut stream = signal(SignalKind::from_raw(sig as i32))?;
        let tx = tx.clone();
        tokio::task::spawn_local(async move {
            while stream.recv().await.is_some() {
                if tx.send(sig).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut child = cmd.spawn().map_err(|source| AppError::Spawn {
        program: program.clone(),
        source,
    })?;
    let pid = child.id().map(|p| Pid::from_raw(p as i32));
    loop {
        tokio::select! {
            status = child.wait() => {
                let status = status?;
                return Ok(status
                    .code()
                    .or_else(|| status.signal().map(|s| 128 + s))
                    .unwrap_or(1));
            }
            Some(sig) = rx.recv() => {
                if let Some(pid) = pid {
                    tracing::debug!(target: "capnet_bridge", ?sig, "forwarding a signal to the app");
                    let _ = kill(pid, sig);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The app sees socks5h:// for ALL_PROXY, http:// for the HTTP variables in both
    /// spellings, and NO_PROXY for loopback; a disabled proxy sets nothing.
    #[test]
    fn proxy_variables() {
        let env = proxy_env(
            Some("127.0.0.1:1080".parse().unwrap()),
            Some("127.0.0.1:3128".parse().unwrap()),
        );
        let get = |k: &str| env.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str());
        assert_eq!(get("ALL_PROXY"), Some("socks5h://127.0.0.1:1080"));
        assert_eq!(get("http_proxy"), Some("http://127.0.0.1:3128"));
        assert_eq!(get("HTTPS_PROXY"), Some("http://127.0.0.1:3128"));
        assert_eq!(get("NO_PROXY"), Some("localhost,127.0.0.1"));
        assert!(proxy_env(None, None).is_empty());
        let only_http = proxy_env(None, Some("127.0.0.1:1".parse().unwrap()));
        assert!(!only_http.iter().any(|(k, _)| k == "ALL_PROXY"));
    }
}
