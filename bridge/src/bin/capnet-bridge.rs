//! `capnet-bridge`: SOCKS5 and HTTP proxies inside a grain that map every connection onto
//! the grain's granted capabilities. Parses arguments and the config, then runs
//! `capnet_bridge::run`; exit codes are in `capnet_bridge::exit`.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use capnet_bridge::setup::{self, FileConfig};
use capnet_bridge::{Settings, exit};
use clap::Parser;

const DEFAULT_CONFIG: &str = "/var/capnet-bridge.toml";
const DEFAULT_STATE: &str = "/var/capnet-bridge.state";
const DEFAULT_SOCKS: &str = "127.0.0.1:1080";
const DEFAULT_HTTP: &str = "127.0.0.1:3128";

/// capnet-bridge: lets unmodified programs in a grain reach the network through its
/// granted capabilities (SOCKS5 and HTTP proxies on the grain's loopback).
///
/// With `-- APP ARGS…` it starts the app with ALL_PROXY, HTTP_PROXY, HTTPS_PROXY and
/// NO_PROXY set, forwards signals to it and exits with its status. Without, it serves
/// until SIGTERM or SIGINT.
#[derive(Parser, Debug)]
#[command(name = "capnet-bridge", version, about)]
struct Args {
    /// The bridge config (TOML). Default /var/capnet-bridge.toml, used if it exists.
    #[arg(long, env = "CAPNET_BRIDGE_CONFIG")]
    config: Option<PathBuf>,
    /// SOCKS5 listen address, or "off" [default: 127.0.0.1:1080].
    #[arg(long, value_name = "ADDR|off")]
    socks: Option<String>,
    /// HTTP proxy listen address, or "off" [default: 127.0.0.1:3128].
    #[arg(long, value_name = "ADDR|off")]
    http: Option<String>,
    /// Where saved tokens are kept, or "off" [default: /var/capnet-bridge.state].
    #[arg(long, value_name = "PATH|off", env = "CAPNET_BRIDGE_STATE")]
    state: Option<String>,
    /// A grant to use: network, host:HOST, tcp:HOST:PORT or udp:HOST:PORT (repeatable).
    /// Restored from the state file if saved before, else asked for through the powerbox.
    #[arg(long = "grant", value_name = "SPEC")]
    grants: Vec<String>,
    /// The powerbox label of --grant requests.
    #[arg(long)]
    label: Option<String>,
    /// Saved tokens to restore: SPEC=HEX, separated by spaces or commas.
    #[arg(long, env = "CAPNET_BRIDGE_TOKENS", hide_env_values = true)]
    tokens: Option<String>,
    /// The app to run, after `--`.
    #[arg(last = true)]
    app: Vec<OsString>,
}

fn listen_addr(
    what: &str,
    value: Option<&str>,
    default: &str,
) -> Result<Option<SocketAddr>, String> {
    let v = value.unwrap_or(default);
    if v == "off" {
        return Ok(None);
    }
    v.parse()
        .map(Some)
        .map_err(|_| format!("--{what} {v:?} is not an address like {default} (or \"off\")"))
}

fn settings(args: Args) -> Result<Settings, String> {
    let (config_path, required) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let file = FileConfig::load(&config_path, required).map_err(|e| e.to_string())?;
    let mut lists = vec![setup::file_grants(&config_path, &file).map_err(|e| e.to_string())?];
    lists.push(setup::cli_grants(&args.grants, args.label.as_deref()).map_err(|e| e.to_string())?);
    if let Some(t) = &args.tokens {
        lists.push(setup::env_grants(t).map_err(|e| e.to_string())?);
    }
    let socks = listen_addr(
        "socks",
        args.socks.as_deref().or(file.socks.as_deref()),
        DEFAULT_SOCKS,
    )?;
    let http = listen_addr(
        "http",
        args.http.as_deref().or(file.http.as_deref()),
        DEFAULT_HTTP,
    )?;
    let state = match args.state.as_deref() {
        Some("off") => None,
        Some(p) => Some(PathBuf::from(p)),
        None => Some(
            file.state
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE)),
        ),
    };
    if socks.is_none() && http.is_none() {
        return Err("both proxies are off: enable --socks or --http".into());
    }
    Ok(Settings {
        socks,
        http,
        state,
        grants: setup::merge(lists),
        app: args.app,
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => futures::future::pending::<()>().await,
    }
}

fn main() {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAPNET_BRIDGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let settings = match settings(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("capnet-bridge: {e}");
            std::process::exit(exit::USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("capnet-bridge: cannot start the runtime: {e}");
            std::process::exit(exit::OS);
        }
    };
    let local = tokio::task::LocalSet::new();
    let code = local.block_on(&runtime, async move {
        match capnet_bridge::run(settings, shutdown_signal()).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("capnet-bridge: {e}");
                e.exit_code()
            }
        }
    });
    // Do not wait for connections still open: the process is ending.
    drop(local);
    std::process::exit(code);
}
