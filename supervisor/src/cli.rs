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
enum DriverCmd {
    /// List drivers and their state.
    List,
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
    anyhow!(
        "{}",
        e.extra.trim_start_matches("remote exception: ").trim()
    )
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
    let admin = connect(&cli.socket).await?;
    let j = cli.json;
    match cli.command {
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
