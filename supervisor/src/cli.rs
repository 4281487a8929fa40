//! `capnet`, the administrator's command line: a thin client of the `Admin` API.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use capnet_driver_api::policy::{Action, RuleConfig, RuleDirection};
use capnet_schemas::admin_capnp::{
    admin, grain_info, powerbox_request, sandbox_limits, sandbox_usage,
};
use capnet_schemas::rpc::two_party;
use capnp_rpc::rpc_twoparty_capnp::Side;
use clap::{Args, Parser, Subcommand};
use serde_json::json;

/// Default admin socket when neither `--socket` nor `CAPNET_SOCKET` is given.
pub const DEFAULT_SOCKET: &str = "/var/lib/capnet/admin.sock";

/// capnet: administer grains, drivers and grants of a running capnetd.
#[derive(Parser, Debug)]
#[command(name = "capnet", version, about)]
pub struct Cli {
    /// The daemon's admin socket.
    #[arg(long, env = "CAPNET_SOCKET", default_value = DEFAULT_SOCKET, global = true)]
    pub socket: PathBuf,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start, stop and inspect grains.
    #[command(subcommand)]
    Grain(GrainCmd),
    /// Answer grains' requests for capabilities.
    #[command(subcommand)]
    Powerbox(PowerboxCmd),
    /// Inspect drivers.
    #[command(subcommand)]
    Driver(DriverCmd),
    /// List and revoke grants.
    #[command(subcommand)]
    Grants(GrantsCmd),
    /// Read the audit trail.
    Audit(AuditArgs),
    /// Re-read the config (as SIGHUP does); a broken config changes nothing.
    Reload,
    /// Sign plugins (for driver authors; works without a daemon).
    #[command(subcommand)]
    Sign(SignCmd),
    /// Stop the daemon (and every grain and driver).
    Shutdown,
}

#[derive(Subcommand, Debug)]
enum GrainCmd {
    /// Start a grain: a [grains.ID] of the config, or an ad-hoc command after `--`.
    Start {
        /// A grain defined in the config.
        name: Option<String>,
        /// Id for an ad-hoc grain.
        #[arg(long)]
        id: Option<String>,
        /// Extra environment, KEY=VALUE.
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Memory limit (e.g. 256MiB), overriding the config.
        #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
        memory: Option<u64>,
        /// Task (process and thread) limit, overriding the config.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        pids: Option<u64>,
        /// CPU quota in cores (e.g. 0.5), overriding the config.
        #[arg(long, value_name = "CORES", value_parser = parse_cpu_arg)]
        cpu: Option<u64>,
        /// Size of /tmp (e.g. 64MiB), overriding the config.
        #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
        tmp: Option<u64>,
        /// Program and arguments of an ad-hoc grain: an absolute host path, whose
        /// directory is mounted read-only at /app.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Stop a grain (SIGTERM, then SIGKILL after the grace period).
    Stop {
        /// Grain id.
        id: String,
        /// Grace period in milliseconds (default from the config).
        #[arg(long, default_value_t = 0)]
        grace_ms: u32,
    },
    /// List grains.
    List,
    /// Show one grain.
    Status {
        /// Grain id.
        id: String,
    },
    /// Print a grain's stdout and stderr.
    Logs {
        /// Grain id.
        id: String,
        /// At most this many bytes from the end.
        #[arg(long, default_value_t = 65536)]
        bytes: u64,
    },
    /// Delete a grain: stop it, delete its grants, tokens, data and log.
    Delete {
        /// Grain id.
        id: String,
    },
    /// Wait until a grain exits.
    Wait {
        /// Grain id.
        id: String,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 60_000)]
        timeout_ms: u32,
    },
}

#[derive(Subcommand, Debug)]
enum PowerboxCmd {
    /// List pending requests.
    List,
    /// Wait for a request to arrive and print it.
    Wait {
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 60_000)]
        timeout_ms: u32,
    },
    /// Grant a pending request.
    Grant(GrantArgs),
    /// Deny a pending request.
    Deny {
        /// Request id.
        id: u64,
        /// Why (the grain sees it).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Args, Debug)]
struct GrantArgs {
    /// Request id (see `capnet powerbox list`).
    id: u64,
    /// The driver that serves the grant.
    #[arg(long)]
    driver: String,
    /// For IpRemoteHost/TcpPort/UdpPort requests: the host (overrides the grain's).
    #[arg(long)]
    host: Option<String>,
    /// For TcpPort/UdpPort requests: the port (overrides the grain's).
    #[arg(long)]
    port: Option<u16>,
    /// Allow: comma-separated host patterns, CIDRs and port=N[-M] items.
    #[arg(long, value_name = "SPEC")]
    allow: Vec<String>,
    /// Deny: comma-separated host patterns, CIDRs and port=N[-M] items.
    #[arg(long, value_name = "SPEC")]
    deny: Vec<String>,
    /// Concurrent connections (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    max_connections: u32,
    /// New connections per second (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    connections_per_second: u32,
    /// Bytes per second in each direction (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    bytes_per_second: u64,
    /// UDP datagrams per second (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    udp_packets_per_second: u32,
    /// Largest UDP datagram (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    udp_max_packet_size: u32,
    /// Concurrent listeners (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    max_listeners: u32,
}

#[derive(Subcommand, Debug)]
enum GrantsCmd {
    /// List every grant (revoked ones too).
    List {
        /// Only this grain's grants.
        #[arg(long)]
        grain: Option<String>,
        /// Only this driver's grants.
        #[arg(long)]
        driver: Option<String>,
    },
    /// Revoke a grant now: its connections close, later calls fail, its tokens die.
    Revoke {
        /// Grant id.
        id: String,
        /// Why (recorded in the audit trail and shown to the grain).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Args, Debug)]
struct AuditArgs {
    /// Only this grain's records.
    #[arg(long)]
    grain: Option<String>,
    /// Only this grant's records.
    #[arg(long)]
    grant: Option<String>,
    /// Only records of this kind (grant, deny, revoke, save, restore, connect_refused, …).
    #[arg(long)]
    kind: Option<String>,
    /// Only records since: a duration ago ("10m", "2h", "1d") or an RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// At most this many records (the newest).
    #[arg(long, default_value_t = 1000)]
    limit: u32,
}

/// Parses `--since`: "90s", "10m", "2h", "3d" ago, or an RFC 3339 time.
fn parse_since(text: &str) -> Result<u64> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Ok(t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0));
    }
    let ago = humantime::parse_duration(text).map_err(|_| {
        anyhow!("--since {text:?}: give a duration such as 10m, 2h or 1d, or a time such as 2026-11-25T10:00:00Z")
    })?;
    Ok(crate::audit::now_ms().saturating_sub(ago.as_millis() as u64))
}

#[derive(Subcommand, Debug)]
enum SignCmd {
    /// Make a new ed25519 signing key; prints the public key to give to administrators.
    Keygen {
        /// Where to write the secret key (created mode 0600; refuses to overwrite).
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a plugin with a secret key, writing PLUGIN.sig beside it.
    Plugin {
        /// The plugin file (.so).
        path: PathBuf,
        /// The secret key file.
        #[arg(long)]
        key: PathBuf,
    },
}

/// The signing commands, which need no daemon.
fn run_sign(cmd: SignCmd, j: bool) -> Result<()> {
    match cmd {
        SignCmd::Keygen { out } => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let (secret, public) = crate::signing::keygen()?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .with_context(|| {
                    format!("cannot create {} (it must not exist yet)", out.display())
                })?;
            writeln!(f, "{secret}")?;
            print_value(
                j,
                &json!({"key_file": out.display().to_string(), "public_key": public}),
                || {
                    format!(
                        "secret key written to {}; give administrators the public key:\n{public}\n\
                     (they add it under [trust.authors] in their config)",
                        out.display()
                    )
                },
            );
        }
        SignCmd::Plugin { path, key } => {
            let public = crate::signing::sign(&path, &key)?;
            let sig = crate::signing::sig_path(&path);
            print_value(
                j,
                &json!({"signature": sig.display().to_string(), "public_key": public}),
                || {
                    format!(
                        "signed {} → {} (key {public})",
                        path.display(),
                        sig.display()
                    )
                },
            );
        }
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
enum DriverCmd {
    /// List drivers and their state.
    List,
    /// Show what a plugin file is and asks for, without loading it into capnetd.
    Inspect {
        /// The plugin file (.so).
        path: PathBuf,
    },
    /// Approve a plugin file (pinned to its SHA-256 and the privileges it asks for).
    Approve {
        /// The plugin file (.so).
        path: PathBuf,
        /// The driver's name (default: the plugin's own name).
        #[arg(long)]
        name: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Stop a driver, revoke all its grants and remove its approval.
    Revoke {
        /// The driver's name.
        name: String,
        /// Why (recorded in the audit trail, shown to grains).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Replace an approved driver's plugin; its grants stay and restore against the new one.
    Upgrade {
        /// The driver's name.
        name: String,
        /// The new plugin file (.so).
        path: PathBuf,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

fn plugin_json(
    p: capnet_schemas::admin_capnp::plugin_info::Reader<'_>,
) -> Result<serde_json::Value> {
    let m = capnet_driver_api::Manifest::read(p.get_manifest()?)
        .map_err(|e| anyhow!("malformed manifest: {e}"))?;
    Ok(json!({
        "path": p.get_path()?.to_str()?,
        "size": p.get_size(),
        "sha256": p.get_sha256()?.to_str()?,
        "name": p.get_name()?.to_str()?,
        "version": p.get_version()?.to_str()?,
        "abi": format!("{}.{}", p.get_abi_major(), p.get_abi_minor()),
        "signature": p.get_signature()?.to_str()?,
        "signer_key": p.get_signer_key()?.to_str()?,
        "manifest": m,
    }))
}

fn plugin_text(v: &serde_json::Value) -> String {
    let m = &v["manifest"];
    let provides: Vec<String> = m["provides"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    let protos: Vec<&str> = p["protocols"]
                        .as_array()
                        .map(|x| x.iter().filter_map(|s| s.as_str()).collect())
                        .unwrap_or_default();
                    format!(
                        "{} ({})",
                        p["name"].as_str().unwrap_or("?"),
                        protos.join(", ")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let privs: Vec<&str> = m["privileges"]
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(_, v)| v.as_bool() == Some(true))
                .map(|(k, _)| k.as_str())
                .collect()
        })
        .unwrap_or_default();
    format!(
        "plugin      {}\nname        {}\nversion     {}\ndescription {}\nauthor      {}\nABI         {}\nsize        {} bytes\nsha256      {}\nsignature   {}\nprovides    {}\nprivileges  {}",
        v["path"].as_str().unwrap_or(""),
        v["name"].as_str().unwrap_or(""),
        v["version"].as_str().unwrap_or(""),
        m["description"].as_str().unwrap_or(""),
        m["author"].as_str().unwrap_or(""),
        v["abi"].as_str().unwrap_or(""),
        v["size"],
        v["sha256"].as_str().unwrap_or(""),
        v["signature"].as_str().unwrap_or(""),
        if provides.is_empty() {
            "nothing".to_string()
        } else {
            provides.join(", ")
        },
        if privs.is_empty() {
            "none".to_string()
        } else {
            privs.join(", ")
        },
    )
}

/// Asks a yes/no question on the terminal; refuses without a terminal.
fn confirm(question: &str) -> Result<bool> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        bail!("{question} — no terminal to ask on; pass --yes to confirm");
    }
    print!("{question} [y/N] ");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

fn absolute_path(p: &std::path::Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display()))
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    match crate::config::parse_size(s)? {
        0 => Err("must not be 0".into()),
        n => Ok(n),
    }
}

fn parse_cpu_arg(s: &str) -> Result<u64, String> {
    let cores: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of cores"))?;
    match crate::config::parse_cpu(cores)? {
        // 0 in a request means "the configured value"; unlimited is set in the config.
        0 => Err("0 (unlimited) can only be set in the config".into()),
        m => Ok(m),
    }
}

/// Parses `--allow` / `--deny` specs into a rule.
fn parse_rule(action: &str, spec: &str) -> Result<RuleConfig> {
    let mut r = RuleConfig {
        action: if action == "allow" {
            Action::Allow
        } else {
            Action::Deny
        },
        hosts: Vec::new(),
        cidrs: Vec::new(),
        ports: Vec::new(),
        direction: RuleDirection::Both,
        label: format!("grant: {action} {spec}"),
    };
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Some(p) = item.strip_prefix("port=") {
            r.ports.push(p.to_string());
        } else if item.contains('/') || item.parse::<std::net::IpAddr>().is_ok() {
            r.cidrs.push(item.to_string());
        } else {
            r.hosts.push(item.to_string());
        }
    }
    if r.ports.is_empty() && r.cidrs.is_empty() && r.hosts.is_empty() {
        bail!("--{action} {spec:?} names nothing; give host patterns, CIDRs or port=N[-M]");
    }
    capnet_driver_api::policy::Rule::from_config(&r)
        .map_err(|e| anyhow!("--{action} {spec:?}: {e}"))?;
    Ok(r)
}

fn clean(e: capnp::Error) -> anyhow::Error {
    let text = e.extra.trim_start_matches("remote exception: ").trim();
    if e.kind == capnp::ErrorKind::Disconnected {
        return anyhow!("{text} ({})", disconnect_hint());
    }
    anyhow!("{text}")
}

fn grain_json(g: grain_info::Reader<'_>) -> Result<serde_json::Value> {
    let command: Vec<String> = g
        .get_command()?
        .iter()
        .map(|c| c.and_then(|t| Ok(t.to_string()?)).unwrap_or_default())
        .collect();
    Ok(json!({
        "id": g.get_id()?.to_str()?,
        "state": match g.get_state()? {
            grain_info::State::Starting => "starting",
            grain_info::State::Running => "running",
            grain_info::State::Stopping => "stopping",
            grain_info::State::Exited => "exited",
        },
        "pid": g.get_pid(),
        "started_at_ms": g.get_started_at_ms(),
        "exit_status": g.get_exit_status(),
        "exit_reason": g.get_exit_reason()?.to_str()?,
        "command": command,
        "limits": limits_json(g.get_limits()?),
        "usage": usage_json(g.get_usage()?),
        "uptime_ms": g.get_uptime_ms(),
        "exit_cause": g.get_exit_cause()?.to_str()?,
        "oom_killed": g.get_oom_killed(),
        "pids_limit_hit": g.get_pids_limit_hit(),
        "host_uid": g.get_host_uid(),
    }))
}

fn limits_json(l: sandbox_limits::Reader<'_>) -> serde_json::Value {
    json!({
        "memory_bytes": l.get_memory_bytes(),
        "pids": l.get_pids(),
        "cpu_millis": l.get_cpu_millis(),
        "tmp_bytes": l.get_tmp_bytes(),
        "nofile": l.get_nofile(),
        "fsize_bytes": l.get_fsize_bytes(),
    })
}

fn usage_json(u: sandbox_usage::Reader<'_>) -> serde_json::Value {
    if !u.get_valid() {
        return serde_json::Value::Null;
    }
    json!({
        "memory_bytes": u.get_memory_bytes(),
        "pids": u.get_pids(),
        "cpu_usage_ns": u.get_cpu_usage_ns(),
        "oom_kills": u.get_oom_kills(),
        "pids_limit_hits": u.get_pids_limit_hits(),
    })
}

fn plural(n: u64, suffix: &str) -> &str {
    if n == 1 { "" } else { suffix }
}

/// The multi-line view of `capnet grain status`.
fn grain_status_text(v: &serde_json::Value) -> String {
    use crate::config::format_bytes;
    use crate::grains::format_cpu;
    let n = |x: &serde_json::Value| x.as_u64().unwrap_or(0);
    let l = &v["limits"];
    let u = &v["usage"];
    let mut out = format!(
        "{}  {}  pid {}  up {:.1}s  host uid {}\n  command  {}\n",
        v["id"].as_str().unwrap_or(""),
        v["state"].as_str().unwrap_or(""),
        v["pid"],
        n(&v["uptime_ms"]) as f64 / 1000.0,
        v["host_uid"],
        v["command"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(" "))
            .unwrap_or_default(),
    );
    if v["state"] == "exited" {
        out.push_str("  (usage at exit)\n");
    }
    if u.is_null() {
        out.push_str("  usage    (not available)\n");
    } else {
        out.push_str(&format!(
            "  memory   {} of {}{}\n  pids     {} of {}{}\n  cpu      {:.2}s used, quota {}\n",
            format_bytes(n(&u["memory_bytes"])),
            format_bytes(n(&l["memory_bytes"])),
            match n(&u["oom_kills"]) {
                0 => String::new(),
                k => format!("  (OOM killer killed {k} process{})", plural(k, "es")),
            },
            n(&u["pids"]),
            n(&l["pids"]),
            match n(&u["pids_limit_hits"]) {
                0 => String::new(),
                k => format!("  (limit hit: {k} fork{} refused)", plural(k, "s")),
            },
            n(&u["cpu_usage_ns"]) as f64 / 1e9,
            format_cpu(n(&l["cpu_millis"])),
        ));
    }
    out.push_str(&format!(
        "  limits   tmp {}, nofile {}, fsize {}",
        format_bytes(n(&l["tmp_bytes"])),
        n(&l["nofile"]),
        format_bytes(n(&l["fsize_bytes"])),
    ));
    if let Some(r) = v["exit_reason"].as_str().filter(|r| !r.is_empty()) {
        out.push_str(&format!(
            "\n  exit     {} ({}, status {})",
            r,
            v["exit_cause"].as_str().unwrap_or(""),
            v["exit_status"]
        ));
    }
    out
}

fn request_json(r: powerbox_request::Reader<'_>) -> Result<serde_json::Value> {
    Ok(json!({
        "id": r.get_id(),
        "grain": r.get_grain_id()?.to_str()?,
        "interface": r.get_interface_name()?.to_str()?,
        "interface_id": format!("{:#x}", r.get_interface_id()),
        "label": r.get_label()?.to_str()?,
        "age_ms": r.get_age_ms(),
        "preferred_host": r.get_preferred_host()?.to_str()?,
        "preferred_port": r.get_preferred_port(),
        "encryption": r.get_encryption()?.to_str()?,
    }))
}

fn print_value(json_out: bool, v: &serde_json::Value, text: impl FnOnce() -> String) {
    if json_out {
        println!("{v}");
    } else {
        println!("{}", text());
    }
}

fn grain_text(v: &serde_json::Value) -> String {
    format!(
        "{:<20} {:<9} pid {:<7} {}{}",
        v["id"].as_str().unwrap_or(""),
        v["state"].as_str().unwrap_or(""),
        v["pid"],
        v["command"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(" "))
            .unwrap_or_default(),
        match v["exit_reason"].as_str() {
            Some(r) if !r.is_empty() => format!("  ({r})"),
            _ => String::new(),
        }
    )
}

fn request_text(v: &serde_json::Value) -> String {
    let mut what = v["interface"].as_str().unwrap_or("").to_string();
    if let Some(h) = v["preferred_host"].as_str().filter(|h| !h.is_empty()) {
        what.push(' ');
        what.push_str(h);
        if v["preferred_port"].as_u64().unwrap_or(0) != 0 {
            what.push_str(&format!(":{}", v["preferred_port"]));
        }
    }
    if let Some(e) = v["encryption"]
        .as_str()
        .filter(|e| !e.is_empty() && *e != "none")
    {
        what.push_str(&format!(" (encryption {e})"));
    }
    format!(
        "{:<5} {:<20} {:<40} {:>6}s  {:?}",
        v["id"],
        v["grain"].as_str().unwrap_or(""),
        what,
        v["age_ms"].as_u64().unwrap_or(0) / 1000,
        v["label"].as_str().unwrap_or("")
    )
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("capnet: cannot start the runtime: {e}");
            return 1;
        }
    };
    let local = tokio::task::LocalSet::new();
    match local.block_on(&runtime, run(cli)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("capnet: {e:#}");
            1
        }
    }
}

/// What to do when capnetd hung up on us: it refuses users other than root and its own
/// before answering anything, or it stopped.
fn disconnect_hint() -> &'static str {
    if nix::unistd::geteuid().is_root() {
        "capnetd closed the connection: it stopped or restarted; see its log"
    } else {
        "capnetd closed the connection: only root (or capnetd's own user) may administer it; \
         run capnet as root"
    }
}

async fn connect(socket: &PathBuf) -> Result<admin::Client> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| {
            format!(
                "cannot connect to capnetd at {} (is it running, and are you root? set --socket or \
             CAPNET_SOCKET)",
                socket.display()
            )
        })?;
    let mut rpc = two_party(stream, Side::Client, None);
    let admin: admin::Client = rpc.bootstrap(Side::Server);
    tokio::task::spawn_local(rpc);
    Ok(admin)
}

async fn run(cli: Cli) -> Result<()> {
    let j = cli.json;
    if let Command::Sign(cmd) = cli.command {
        return run_sign(cmd, j);
    }
    let admin = connect(&cli.socket).await?;
    match cli.command {
        // Handled above without a daemon.
        Command::Sign(_) => {}
        Command::Grain(GrainCmd::Start {
            name,
            id,
            env,
            memory,
            pids,
            cpu,
            tmp,
            command,
        }) => {
            if name.is_none() && command.is_empty() {
                bail!("give a grain name from the config, or a command after `--`");
            }
            let mut req = admin.start_grain_request();
            {
                let mut s = req.get().init_spec();
                if let Some(n) = &name {
                    s.set_name(n);
                }
                if let Some(i) = &id {
                    s.set_id(i);
                }
                let mut c = s.reborrow().init_command(command.len() as u32);
                for (i, a) in command.iter().enumerate() {
                    c.set(i as u32, a);
                }
                {
                    let mut l = s.reborrow().init_limits();
                    l.set_memory_bytes(memory.unwrap_or(0));
                    l.set_pids(pids.unwrap_or(0));
                    l.set_cpu_millis(cpu.unwrap_or(0));
                    l.set_tmp_bytes(tmp.unwrap_or(0));
                }
                let mut e = s.init_env(env.len() as u32);
                for (i, kv) in env.iter().enumerate() {
                    let (k, v) = kv
                        .split_once('=')
                        .ok_or_else(|| anyhow!("--env {kv:?} must be KEY=VALUE"))?;
                    let mut b = e.reborrow().get(i as u32);
                    b.set_key(k);
                    b.set_value(v);
                }
            }
            let resp = req.send().promise.await.map_err(clean)?;
            let v = grain_json(resp.get()?.get_grain()?)?;
            print_value(j, &v, || format!("started {}", grain_text(&v)));
        }
        Command::Grain(GrainCmd::Stop { id, grace_ms }) => {
            let mut req = admin.stop_grain_request();
            req.get().set_grain_id(&id);
            req.get().set_grace_ms(grace_ms);
            let resp = req.send().promise.await.map_err(clean)?;
            let v = grain_json(resp.get()?.get_grain()?)?;
            print_value(j, &v, || format!("stopped {}", grain_text(&v)));
        }
        Command::Grain(GrainCmd::List) => {
            let resp = admin
                .list_grains_request()
                .send()
                .promise
                .await
                .map_err(clean)?;
            let mut all = Vec::new();
            for g in resp.get()?.get_grains()? {
                all.push(grain_json(g)?);
            }
            let v = serde_json::Value::Array(all.clone());
            print_value(j, &v, || {
                all.iter().map(grain_text).collect::<Vec<_>>().join("\n")
            });
        }
        Command::Grain(GrainCmd::Status { id }) => {
            let mut req = admin.grain_status_request();
            req.get().set_grain_id(&id);
            let resp = req.send().promise.await.map_err(clean)?;
            let v = grain_json(resp.get()?.get_grain()?)?;
            print_value(j, &v, || grain_status_text(&v));
        }
        Command::Grain(GrainCmd::Logs { id, bytes }) => {
            let mut req = admin.grain_logs_request();
            req.get().set_grain_id(&id);
            req.get().set_max_bytes(bytes);
            let resp = req.send().promise.await.map_err(clean)?;
            let log = resp.get()?.get_log()?;
            use std::io::Write;
            std::io::stdout().write_all(log)?;
        }
        Command::Grain(GrainCmd::Wait { id, timeout_ms }) => {
            let mut req = admin.wait_grain_request();
            req.get().set_grain_id(&id);
            req.get().set_timeout_ms(timeout_ms);
            let resp = req.send().promise.await.map_err(clean)?;
            let r = resp.get()?;
            let v = grain_json(r.get_grain()?)?;
            print_value(j, &v, || grain_text(&v));
            if !r.get_exited() {
                bail!("grain {id} still runs after {timeout_ms} ms");
            }
        }
        Command::Powerbox(PowerboxCmd::List) => {
            let resp = admin
                .list_requests_request()
                .send()
                .promise
                .await
                .map_err(clean)?;
            let mut all = Vec::new();
            for r in resp.get()?.get_requests()? {
                all.push(request_json(r)?);
            }
            let v = serde_json::Value::Array(all.clone());
            print_value(j, &v, || {
                if all.is_empty() {
                    "no pending requests".into()
                } else {
                    all.iter().map(request_text).collect::<Vec<_>>().join("\n")
                }
            });
        }
        Command::Powerbox(PowerboxCmd::Wait { timeout_ms }) => {
            let mut req = admin.wait_for_request_request();
            req.get().set_timeout_ms(timeout_ms);
            let resp = req.send().promise.await.map_err(clean)?;
            let r = resp.get()?;
            if !r.get_found() {
                bail!("no request arrived within {timeout_ms} ms");
            }
            let v = request_json(r.get_request()?)?;
            print_value(j, &v, || request_text(&v));
        }
        Command::Powerbox(PowerboxCmd::Grant(g)) => {
            let mut rules = Vec::new();
            for s in &g.allow {
                rules.push(parse_rule("allow", s)?);
            }
            for s in &g.deny {
                rules.push(parse_rule("deny", s)?);
            }
            let mut req = admin.grant_request();
            {
                let mut p = req.get();
                p.set_request_id(g.id);
                p.set_driver(&g.driver);
                let mut c = p.init_constraints();
                if let Some(h) = &g.host {
                    c.set_host(h);
                }
                c.set_port(g.port.unwrap_or(0));
                let mut l = c.reborrow().init_limits();
                l.set_max_connections(g.max_connections);
                l.set_connections_per_second(g.connections_per_second);
                l.set_bytes_per_second(g.bytes_per_second);
                l.set_udp_packets_per_second(g.udp_packets_per_second);
                l.set_udp_max_packet_size(g.udp_max_packet_size);
                l.set_max_listeners(g.max_listeners);
                let mut list = c.init_rules(rules.len() as u32);
                for (i, r) in rules.iter().enumerate() {
                    r.write_capnp(list.reborrow().get(i as u32))
                        .map_err(|e| anyhow!(e))?;
                }
            }
            let resp = req.send().promise.await.map_err(clean)?;
            let id = resp.get()?.get_grant_id()?.to_str()?.to_string();
            let v = json!({ "grant": id, "request": g.id });
            print_value(j, &v, || format!("granted request {} as {id}", g.id));
        }
        Command::Powerbox(PowerboxCmd::Deny { id, reason }) => {
            let mut req = admin.deny_request();
            req.get().set_request_id(id);
            req.get().set_reason(&reason);
            req.send().promise.await.map_err(clean)?;
            let v = json!({ "denied": id });
            print_value(j, &v, || format!("denied request {id}"));
        }
        Command::Driver(DriverCmd::List) => {
            let resp = admin
                .list_drivers_request()
                .send()
                .promise
                .await
                .map_err(clean)?;
            let mut all = Vec::new();
            for d in resp.get()?.get_drivers()? {
                all.push(json!({
                    "name": d.get_name()?.to_str()?,
                    "state": d.get_state()?.to_str()?,
                    "pid": d.get_pid(),
                    "plugin": d.get_plugin()?.to_str()?,
                    "version": d.get_version()?.to_str()?,
                    "restarts": d.get_restarts(),
                    "uptime_ms": d.get_uptime_ms(),
                    "last_error": d.get_last_error()?.to_str()?,
                    "grants": d.get_grants(),
                    "open_connections": d.get_open_connections(),
                }));
            }
            let v = serde_json::Value::Array(all.clone());
            print_value(j, &v, || {
                all.iter()
                    .map(|d| {
                        format!(
                            "{:<12} {:<10} pid {:<7} v{:<8} up {:>6}s restarts {:<3} grants {:<3} open {:<4}{}",
                            d["name"].as_str().unwrap_or(""),
                            d["state"].as_str().unwrap_or(""),
                            d["pid"],
                            d["version"].as_str().unwrap_or(""),
                            d["uptime_ms"].as_u64().unwrap_or(0) / 1000,
                            d["restarts"],
                            d["grants"],
                            d["open_connections"],
                            match d["last_error"].as_str() {
                                Some(e) if !e.is_empty() => format!("\n             last error: {e}"),
                                _ => String::new(),
                            }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Grain(GrainCmd::Delete { id }) => {
            let mut req = admin.delete_grain_request();
            req.get().set_grain_id(&id);
            let resp = req.send().promise.await.map_err(clean)?;
            let r = resp.get()?;
            let v = json!({"deleted": id, "grants": r.get_grants(), "tokens": r.get_tokens()});
            print_value(j, &v, || {
                format!(
                    "deleted grain {id}: {} grants and {} saved tokens removed",
                    r.get_grants(),
                    r.get_tokens()
                )
            });
        }
        Command::Grants(GrantsCmd::List { grain, driver }) => {
            let mut req = admin.list_grants_request();
            req.get().set_grain(grain.as_deref().unwrap_or(""));
            req.get().set_driver(driver.as_deref().unwrap_or(""));
            let resp = req.send().promise.await.map_err(clean)?;
            let mut all = Vec::new();
            for g in resp.get()?.get_grants()? {
                let constraints: serde_json::Value =
                    serde_json::from_str(g.get_constraints()?.to_str()?).unwrap_or_default();
                all.push(json!({
                    "id": g.get_id()?.to_str()?,
                    "grain": g.get_grain()?.to_str()?,
                    "driver": g.get_driver()?.to_str()?,
                    "kind": g.get_kind()?.to_str()?,
                    "constraints": constraints,
                    "label": g.get_label()?.to_str()?,
                    "source": g.get_source()?.to_str()?,
                    "created": format_time(g.get_created_ms()),
                    "last_used": format_time(g.get_last_used_ms()),
                    "bytes_in": g.get_bytes_in(),
                    "bytes_out": g.get_bytes_out(),
                    "open_connections": g.get_open_connections(),
                    "revoked": (g.get_revoked_ms() != 0).then(|| format_time(g.get_revoked_ms())),
                    "revoke_reason": g.get_revoke_reason()?.to_str()?,
                }));
            }
            let v = serde_json::Value::Array(all.clone());
            print_value(j, &v, || {
                if all.is_empty() {
                    return "no grants".into();
                }
                all.iter()
                    .map(|g| {
                        format!(
                            "{}  {} → {} via {}  [{}]\n    label {:?}, source {}, created {}, last used {}\n    bytes in {} out {}, open connections {}{}{}",
                            g["id"].as_str().unwrap_or(""),
                            g["grain"].as_str().unwrap_or(""),
                            g["kind"].as_str().unwrap_or(""),
                            g["driver"].as_str().unwrap_or(""),
                            if g["revoked"].is_null() { "live" } else { "REVOKED" },
                            g["label"].as_str().unwrap_or(""),
                            g["source"].as_str().unwrap_or(""),
                            g["created"].as_str().unwrap_or(""),
                            g["last_used"].as_str().unwrap_or(""),
                            g["bytes_in"],
                            g["bytes_out"],
                            g["open_connections"],
                            match &g["constraints"] {
                                serde_json::Value::Object(c) if c.get("rules").is_some_and(|r| r.as_array().is_some_and(|a| !a.is_empty())) => format!("\n    rules {}", c["rules"]),
                                _ => String::new(),
                            },
                            match g["revoked"].as_str() {
                                Some(t) => format!("\n    revoked {t}: {}", g["revoke_reason"].as_str().unwrap_or("")),
                                None => String::new(),
                            }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Grants(GrantsCmd::Revoke { id, reason }) => {
            let mut req = admin.revoke_grant_request();
            req.get().set_grant_id(&id);
            req.get().set_reason(&reason);
            let resp = req.send().promise.await.map_err(clean)?;
            let live = resp.get()?.get_was_live();
            let v = json!({"revoked": id, "was_live": live});
            print_value(j, &v, || {
                if live {
                    format!(
                        "revoked {id}: its connections are closed and its tokens no longer restore"
                    )
                } else {
                    format!("{id} was already revoked")
                }
            });
        }
        Command::Audit(a) => {
            let mut req = admin.audit_request();
            {
                let mut f = req.get().init_filter();
                f.set_grain(a.grain.as_deref().unwrap_or(""));
                f.set_grant(a.grant.as_deref().unwrap_or(""));
                f.set_kind(a.kind.as_deref().unwrap_or(""));
                if let Some(s) = &a.since {
                    f.set_since_ms(parse_since(s)?);
                }
                f.set_limit(a.limit);
            }
            let resp = req.send().promise.await.map_err(clean)?;
            let mut all = Vec::new();
            for r in resp.get()?.get_records()? {
                all.push(json!({
                    "time": format_time(r.get_time_ms()),
                    "time_ms": r.get_time_ms(),
                    "kind": r.get_kind()?.to_str()?,
                    "grain": r.get_grain()?.to_str()?,
                    "grant": r.get_grant()?.to_str()?,
                    "driver": r.get_driver()?.to_str()?,
                    "destination": r.get_destination()?.to_str()?,
                    "rule": r.get_rule()?.to_str()?,
                    "bytes_in": r.get_bytes_in(),
                    "bytes_out": r.get_bytes_out(),
                    "duration_ms": r.get_duration_ms(),
                    "detail": r.get_detail()?.to_str()?,
                }));
            }
            if j {
                for r in &all {
                    println!("{r}");
                }
            } else {
                for r in &all {
                    let mut line = format!(
                        "{} {:<18}",
                        r["time"].as_str().unwrap_or(""),
                        r["kind"].as_str().unwrap_or("")
                    );
                    for key in ["grain", "grant", "driver", "destination", "rule"] {
                        if let Some(v) = r[key].as_str().filter(|v| !v.is_empty()) {
                            line.push_str(&format!(" {key}={v}"));
                        }
                    }
                    if r["bytes_in"].as_u64().unwrap_or(0) + r["bytes_out"].as_u64().unwrap_or(0)
                        > 0
                    {
                        line.push_str(&format!(
                            " in={} out={} ms={}",
                            r["bytes_in"], r["bytes_out"], r["duration_ms"]
                        ));
                    }
                    if let Some(d) = r["detail"].as_str().filter(|d| !d.is_empty()) {
                        line.push_str(&format!(" — {d}"));
                    }
                    println!("{line}");
                }
            }
        }
        Command::Reload => {
            let resp = admin.reload_request().send().promise.await.map_err(clean)?;
            let summary = resp.get()?.get_summary()?.to_str()?.to_string();
            print_value(j, &json!({"summary": summary}), || summary.clone());
        }
        Command::Driver(DriverCmd::Inspect { path }) => {
            let path = absolute_path(&path)?;
            let mut req = admin.inspect_driver_request();
            req.get().set_path(path.display().to_string());
            let resp = req.send().promise.await.map_err(clean)?;
            let v = plugin_json(resp.get()?.get_plugin()?)?;
            print_value(j, &v, || plugin_text(&v));
        }
        Command::Driver(DriverCmd::Approve { path, name, yes }) => {
            let path = absolute_path(&path)?;
            let mut req = admin.inspect_driver_request();
            req.get().set_path(path.display().to_string());
            let resp = req.send().promise.await.map_err(clean)?;
            let v = plugin_json(resp.get()?.get_plugin()?)?;
            let name = name.unwrap_or_else(|| v["name"].as_str().unwrap_or("").to_string());
            if !j {
                println!("{}", plugin_text(&v));
            }
            if !yes
                && !confirm(&format!(
                    "Approve this plugin as driver {name}, with exactly these privileges?"
                ))?
            {
                bail!("not approved");
            }
            let mut req = admin.approve_driver_request();
            req.get().set_path(path.display().to_string());
            req.get().set_name(&name);
            req.get().set_sha256(v["sha256"].as_str().unwrap_or(""));
            req.send().promise.await.map_err(clean)?;
            print_value(j, &json!({"approved": name, "plugin": v}), || {
                format!(
                    "approved {name}: pinned to sha256 {}; the driver is starting",
                    v["sha256"].as_str().unwrap_or("")
                )
            });
        }
        Command::Driver(DriverCmd::Revoke { name, reason }) => {
            let mut req = admin.revoke_driver_request();
            req.get().set_name(&name);
            req.get().set_reason(&reason);
            let resp = req.send().promise.await.map_err(clean)?;
            let n = resp.get()?.get_grants_revoked();
            print_value(j, &json!({"revoked": name, "grants_revoked": n}), || {
                format!(
                    "revoked driver {name}: stopped, {n} grant(s) revoked, approval removed from the config"
                )
            });
        }
        Command::Driver(DriverCmd::Upgrade { name, path, yes }) => {
            let path = absolute_path(&path)?;
            let mut req = admin.driver_approval_request();
            req.get().set_name(&name);
            let cur = req.send().promise.await.map_err(clean)?;
            let cur = cur.get()?;
            let old_privs = capnet_driver_api::Privileges::read(cur.get_privileges()?);
            let old_sha = cur.get_sha256()?.to_str()?.to_string();
            let old_signer = cur.get_signer_key()?.to_str()?.to_string();
            let old_version = if cur.get_is_running() {
                cur.get_running()?.get_version()?.to_str()?.to_string()
            } else {
                "(not running)".to_string()
            };
            let mut req = admin.inspect_driver_request();
            req.get().set_path(path.display().to_string());
            let resp = req.send().promise.await.map_err(clean)?;
            let v = plugin_json(resp.get()?.get_plugin()?)?;
            let new_privs: capnet_driver_api::Privileges =
                serde_json::from_value(v["manifest"]["privileges"].clone()).unwrap_or_default();
            let added = new_privs.exceeding(&old_privs);
            let dropped = old_privs.exceeding(&new_privs);
            if !j {
                println!("{}", plugin_text(&v));
                println!("\nchanges for driver {name}:");
                println!(
                    "  version     {old_version} -> {}",
                    v["version"].as_str().unwrap_or("")
                );
                println!(
                    "  sha256      {old_sha} -> {}",
                    v["sha256"].as_str().unwrap_or("")
                );
                println!(
                    "  privileges  added [{}], removed [{}]",
                    added.join(", "),
                    dropped.join(", ")
                );
                let new_signer = v["signer_key"].as_str().unwrap_or("");
                println!(
                    "  signature   {}",
                    match (old_signer.as_str(), new_signer) {
                        ("", "") => "neither version is signed".to_string(),
                        ("", _) => format!(
                            "{} (the approved version was unsigned)",
                            v["signature"].as_str().unwrap_or("")
                        ),
                        (_, "") =>
                            "the new version is UNSIGNED; the approved one was signed".to_string(),
                        (a, b) if a.eq_ignore_ascii_case(b) => format!(
                            "{} — the same key as the approved version",
                            v["signature"].as_str().unwrap_or("")
                        ),
                        _ => format!(
                            "{} — a DIFFERENT key from the approved version's",
                            v["signature"].as_str().unwrap_or("")
                        ),
                    }
                );
            }
            if !yes && !confirm(&format!("Upgrade driver {name} to this plugin?"))? {
                bail!("not upgraded");
            }
            let mut req = admin.upgrade_driver_request();
            req.get().set_name(&name);
            req.get().set_path(path.display().to_string());
            req.get().set_sha256(v["sha256"].as_str().unwrap_or(""));
            req.send().promise.await.map_err(clean)?;
            print_value(
                j,
                &json!({"upgraded": name, "plugin": v, "privileges_added": added, "privileges_removed": dropped,
                        "same_signer": !old_signer.is_empty() && v["signer_key"].as_str().is_some_and(|k| k.eq_ignore_ascii_case(&old_signer))}),
                || format!("upgraded {name}; it restarts with the new plugin and its grants stay"),
            );
        }
        Command::Shutdown => {
            admin
                .shutdown_request()
                .send()
                .promise
                .await
                .map_err(clean)?;
            if !j {
                println!("capnetd is shutting down");
            }
        }
    }
    Ok(())
}

/// Formats milliseconds since the epoch as RFC 3339 (UTC, milliseconds); 0 is "never".
pub fn format_time(ms: u64) -> String {
    if ms == 0 {
        return "never".into();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}
