//! `capnetd`: the capnet supervisor daemon. Parses arguments and runs
//! `capnet_supervisor::daemon::run`; exit codes are in `capnet_supervisor::daemon::exit`.

use std::path::PathBuf;

use capnet_supervisor::config::{Config, DaemonOverrides};
use capnet_supervisor::daemon::{self, exit};
use clap::Parser;

/// capnetd: gives sandboxed grains network access only through capabilities.
#[derive(Parser, Debug)]
#[command(name = "capnetd", version, about)]
struct Args {
    /// The configuration file.
    #[arg(long, short, default_value = "/etc/capnet/capnet.toml")]
    config: PathBuf,
    /// Override daemon.state_dir.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Override daemon.admin_socket.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Override daemon.cgroup_parent (every capnetd of a host needs its own).
    #[arg(long)]
    cgroup_parent: Option<String>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Allow running without root (development only: no sandboxes can be built).
    #[arg(long, hide = true)]
    allow_unprivileged: bool,
}

fn main() {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAPNET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if args.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    if !nix::unistd::geteuid().is_root() && !args.allow_unprivileged {
        eprintln!("capnetd: must run as root (it builds sandboxes and cgroups)");
        std::process::exit(exit::NOT_ROOT);
    }
    let mut config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("capnetd: {e}");
            std::process::exit(exit::CONFIG);
        }
    };
    config.set_overrides(DaemonOverrides {
        state_dir: args.state_dir,
        admin_socket: args.socket,
        cgroup_parent: args.cgroup_parent,
    });
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("capnetd: cannot start the runtime: {e}");
            std::process::exit(exit::SETUP);
        }
    };
    let local = tokio::task::LocalSet::new();
    let result = local.block_on(&runtime, async {
        let shutdown = async {
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
                _ => std::future::pending::<()>().await,
            }
        };
        daemon::run(config, shutdown).await
    });
    match result {
        Ok(()) => std::process::exit(exit::OK),
        Err(e) => {
            eprintln!("capnetd: {e}");
            std::process::exit(exit::SETUP);
        }
    }
}
