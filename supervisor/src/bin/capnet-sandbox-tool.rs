//! `capnet-sandbox-tool`: run one program in a capnet grain sandbox, or benchmark sandbox
//! spawn latency against bubblewrap.
//!
//! ```text
//! capnet-sandbox-tool run [--app-dir D] [--cgroup-parent NAME] -- PROGRAM ARGS...
//!     prints {"helper_pid":..,"cgroup_procs":[..]} once the app runs, then the exit as JSON
//! capnet-sandbox-tool bench [--runs N] [--no-bwrap]
//!     prints {"capnet":{"p50_ms":..,"p99_ms":..},"bwrap":{..},"ratio_p50":..}
//! ```
//!
//! The tests use `run` as a stand-in supervisor they can `kill -9`; `make bench` uses
//! `bench`.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use capnet_supervisor::sandbox::{Limits, Program, Role, SandboxSpec, Spawner};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Run a program in a capnet grain sandbox, or benchmark spawning")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run PROGRAM in a grain (host /usr, /lib, /lib64, /bin bound read-only).
    Run {
        /// Host directory mounted read-only at /app.
        #[arg(long)]
        app_dir: Option<PathBuf>,
        /// Name of capnet's cgroup parent directory.
        #[arg(long, default_value = "capnet-tool")]
        cgroup_parent: String,
        /// Program (a path inside the sandbox) and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Spawn latency of a fully confined grain running /bin/true vs `bwrap --unshare-all`.
    Bench {
        /// Number of runs of each.
        #[arg(long, default_value_t = 200)]
        runs: usize,
        /// Skip bubblewrap.
        #[arg(long)]
        no_bwrap: bool,
    },
}

fn helper_path() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe
        .parent()
        .map(|d| d.join("capnet-sandbox"))
        .context("no parent dir")?;
    if !p.exists() {
        bail!(
            "{} not found (build the capnet-supervisor package)",
            p.display()
        );
    }
    Ok(p)
}

fn spec(
    id: String,
    command: &[String],
    app_dir: Option<PathBuf>,
) -> anyhow::Result<(SandboxSpec, UnixStream)> {
    let (ours, theirs) = UnixStream::pair().context("creating the grain's socketpair")?;
    let uid = 300_000 + (std::process::id() % 50_000);
    Ok((
        SandboxSpec {
            id,
            role: Role::Grain,
            program: Program::Path(PathBuf::from(&command[0])),
            args: command[1..].to_vec(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            app_dir,
            var_dir: None,
            ro_binds: SandboxSpec::system_binds(),
            tmp_size_bytes: 16 << 20,
            limits: Limits::default(),
            host_uid: uid,
            host_gid: uid,
            rpc_fd: OwnedFd::from(theirs),
            extra_fds: Vec::new(),
            log_fd: None,
            ambient_caps: Vec::new(),
        },
        ours,
    ))
}

fn run(app_dir: Option<PathBuf>, cgroup_parent: &str, command: &[String]) -> anyhow::Result<i32> {
    let spawner = Spawner::new(&helper_path()?, cgroup_parent)?;
    let (spec, _rpc) = spec(format!("tool-{}", std::process::id()), command, app_dir)?;
    let sb = spawner.spawn(spec)?;
    let procs: Vec<String> = sb
        .cgroup
        .procs_files()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    println!(
        "{}",
        serde_json::json!({"helper_pid": sb.pid, "cgroup_procs": procs})
    );
    let exit = sb.wait_blocking()?;
    println!("{}", serde_json::to_string(&exit)?);
    sb.teardown()?;
    Ok(exit.code.unwrap_or(1))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

fn summary(mut v: Vec<Duration>) -> serde_json::Value {
    v.sort();
    serde_json::json!({
        "runs": v.len(),
        "p50_ms": percentile(&v, 0.50),
        "p99_ms": percentile(&v, 0.99),
        "min_ms": percentile(&v, 0.0),
        "max_ms": percentile(&v, 1.0),
    })
}

fn bench(runs: usize, no_bwrap: bool) -> anyhow::Result<()> {
    let spawner = Spawner::new(&helper_path()?, "capnet-bench")?;
    let truth = [String::from("/bin/true")];
    let mut capnet = Vec::with_capacity(runs);
    for i in 0..runs {
        let t = Instant::now();
        let (spec, _rpc) = spec(format!("bench-{i}"), &truth, None)?;
        let sb = spawner.spawn(spec)?;
        let exit = sb.wait_blocking()?;
        if exit.code != Some(0) {
            bail!("/bin/true in a grain ended with {exit:?}");
        }
        capnet.push(t.elapsed());
        sb.teardown()?;
    }
    let mut out = serde_json::json!({
        "what": "spawn request until /bin/true ran in a fully confined sandbox and was reaped",
        "capnet": summary(capnet.clone()),
    });
    if !no_bwrap {
        let mut bw = Vec::with_capacity(runs);
        for _ in 0..runs {
            let t = Instant::now();
            let mut cmd = std::process::Command::new("bwrap");
            cmd.args(["--unshare-all", "--die-with-parent", "--new-session"]);
            for d in ["/usr", "/lib", "/lib64", "/bin"] {
                if Path::new(d).exists() {
                    cmd.args(["--ro-bind", d, d]);
                }
            }
            cmd.args([
                "--proc",
                "/proc",
                "--dev",
                "/dev",
                "--tmpfs",
                "/tmp",
                "/bin/true",
            ]);
            let st = cmd
                .status()
                .context("run bwrap (apt-get install bubblewrap)")?;
            if !st.success() {
                bail!("bwrap failed: {st}");
            }
            bw.push(t.elapsed());
        }
        let ratio = percentile(&sorted(capnet), 0.5) / percentile(&sorted(bw.clone()), 0.5);
        out["bwrap"] = summary(bw);
        out["bwrap_command"] = serde_json::json!(
            "bwrap --unshare-all --die-with-parent --new-session --ro-bind /usr /usr --ro-bind /lib /lib --ro-bind /lib64 /lib64 --ro-bind /bin /bin --proc /proc --dev /dev --tmpfs /tmp /bin/true"
        );
        out["ratio_p50"] = serde_json::json!(ratio);
    }
    println!("{out}");
    Ok(())
}

fn sorted(mut v: Vec<Duration>) -> Vec<Duration> {
    v.sort();
    v
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    match Cli::parse().cmd {
        Cmd::Run {
            app_dir,
            cgroup_parent,
            command,
        } => std::process::exit(run(app_dir, &cgroup_parent, &command)?),
        Cmd::Bench { runs, no_bwrap } => bench(runs, no_bwrap),
    }
}
