//! `make bench`: measures capnet against real peers in one run and writes the figures
//! and ratios to docs/benchmarks.md (each section replaces its own heading only).
//!
//! Data path, on loopback: (a) direct TCP, (b) a grain through a granted TcpPort (grain →
//! capnetd membrane → TCP driver host → TCP), (c) microsocks as a SOCKS5 proxy. Each
//! measures bulk throughput (a sink that answers with the byte count) and
//! connect-to-first-byte latency (a server that writes one byte at once).
//!
//! Sandbox spawn: from the start request until `/bin/true` has run inside a fully
//! confined grain and been reaped, (a) through capnetd (Admin `startGrain`, then
//! `waitGrain` returning once the sandbox is gone), (b) through the sandbox library
//! directly (`capnet-sandbox-tool bench`), (c) `bwrap --unshare-all` running the same
//! `true` (measured by the same tool run).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capnet_schemas::admin_capnp::admin;
use capnet_tests::{Daemon, artifact, driver_config, free_port};
use capnp_rpc::rpc_twoparty_capnp::Side;
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Where to write the report.
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: PathBuf,
    /// Bytes per throughput run.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// Connections per latency run.
    #[arg(long, default_value_t = 1000)]
    count: u32,
    /// Spawns per sandbox-spawn series.
    #[arg(long, default_value_t = 200)]
    spawn_runs: usize,
    /// Which sections to measure: `data`, `spawn` or both (comma-separated).
    #[arg(long, default_value = "data,spawn", value_delimiter = ',')]
    sections: Vec<String>,
}

/// A sink: reads an 8-byte big-endian length, then that many bytes (or until EOF), then
/// answers with the count received as 8 big-endian bytes. (No half-close is needed, so
/// proxies that do not forward half-closes can be measured too.)
fn sink_server() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut len = [0u8; 8];
                if s.read_exact(&mut len).is_err() {
                    return;
                }
                let want = u64::from_be_bytes(len);
                let mut buf = vec![0u8; 1 << 20];
                let mut n = 0u64;
                while n < want {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k as u64,
                    }
                }
                let _ = s.write_all(&n.to_be_bytes());
            });
        }
    });
    Ok(addr)
}

/// Writes one byte to every connection at once.
fn first_byte_server() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.set_nodelay(true);
            let _ = s.write_all(b"x");
        }
    });
    Ok(addr)
}

fn throughput(mut s: TcpStream, bytes: u64) -> Result<f64> {
    let chunk = vec![0x5au8; 256 * 1024];
    let t0 = Instant::now();
    s.write_all(&bytes.to_be_bytes())?;
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n])?;
        sent += n as u64;
    }
    let mut c = [0u8; 8];
    s.read_exact(&mut c)?;
    if u64::from_be_bytes(c) != bytes {
        bail!("sink got {} of {bytes}", u64::from_be_bytes(c));
    }
    Ok(t0.elapsed().as_secs_f64())
}

fn socks_connect(proxy: SocketAddr, target: SocketAddr) -> Result<TcpStream> {
    let mut s = TcpStream::connect(proxy)?;
    s.set_nodelay(true)?;
    s.write_all(&[5, 1, 0])?;
    let mut r = [0u8; 2];
    s.read_exact(&mut r)?;
    if r != [5, 0] {
        bail!("SOCKS5 method negotiation failed: {r:?}");
    }
    let SocketAddr::V4(t) = target else {
        bail!("IPv4 only")
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&t.ip().octets());
    req.extend_from_slice(&t.port().to_be_bytes());
    s.write_all(&req)?;
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep)?;
    if rep[1] != 0 {
        bail!("SOCKS5 CONNECT refused: code {}", rep[1]);
    }
    Ok(s)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64
}

struct Figures {
    mib_s: f64,
    p50_us: f64,
    p99_us: f64,
}

fn latencies(mut f: impl FnMut() -> Result<()>, count: u32) -> Result<(f64, f64)> {
    let mut v = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let t0 = Instant::now();
        f()?;
        v.push(t0.elapsed().as_micros() as u64);
    }
    v.sort_unstable();
    Ok((percentile(&v, 0.5), percentile(&v, 0.99)))
}

fn direct(sink: SocketAddr, fb: SocketAddr, a: &Args) -> Result<Figures> {
    let secs = throughput(TcpStream::connect(sink)?, a.bytes)?;
    let (p50, p99) = latencies(
        || {
            let mut s = TcpStream::connect(fb)?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            Ok(())
        },
        a.count,
    )?;
    Ok(Figures {
        mib_s: a.bytes as f64 / secs / 1048576.0,
        p50_us: p50,
        p99_us: p99,
    })
}

struct Socks(Child);
impl Drop for Socks {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn via_socks(sink: SocketAddr, fb: SocketAddr, a: &Args) -> Result<Figures> {
    let port = free_port();
    let child = Command::new("microsocks")
        .args(["-i", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting microsocks (Debian package microsocks; `make deps` installs it)")?;
    let _guard = Socks(child);
    let proxy: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(proxy).is_err() {
        if Instant::now() > deadline {
            bail!("microsocks did not start listening");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let secs = throughput(socks_connect(proxy, sink)?, a.bytes)?;
    let (p50, p99) = latencies(
        || {
            let mut s = socks_connect(proxy, fb)?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            Ok(())
        },
        a.count,
    )?;
    Ok(Figures {
        mib_s: a.bytes as f64 / secs / 1048576.0,
        p50_us: p50,
        p99_us: p99,
    })
}

fn grain_json(d: &Daemon, id: &str) -> Result<serde_json::Value> {
    let st = d.wait_grain(id, Duration::from_secs(600))?;
    let log = d.grain_log(id);
    if st["exit_status"] != 0 {
        bail!("bench grain {id} failed: {log}");
    }
    log.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .with_context(|| format!("no result from {id}: {log}"))
}

fn via_capnet(sink: SocketAddr, fb: SocketAddr, a: &Args) -> Result<Figures> {
    let d = Daemon::start(&driver_config("tcp", "libcapnet_driver_tcp.so", ""))?;
    d.wait_driver("tcp", Duration::from_secs(20), |v| v["state"] == "running")?;
    d.start_test_grain(
        "bench-tput",
        &[
            "bench-throughput",
            "--port",
            &sink.port().to_string(),
            "--bytes",
            &a.bytes.to_string(),
        ],
    )?;
    d.grant_next("tcp", &[])?;
    let t = grain_json(&d, "bench-tput")?;
    d.start_test_grain(
        "bench-lat",
        &[
            "bench-latency",
            "--port",
            &fb.port().to_string(),
            "--count",
            &a.count.to_string(),
        ],
    )?;
    d.grant_next("tcp", &[])?;
    let l = grain_json(&d, "bench-lat")?;
    let mut micros: Vec<u64> = l["micros"]
        .as_array()
        .map(|v| v.iter().filter_map(|x| x.as_u64()).collect())
        .unwrap_or_default();
    micros.sort_unstable();
    Ok(Figures {
        mib_s: a.bytes as f64 / t["secs"].as_f64().unwrap_or(f64::INFINITY) / 1048576.0,
        p50_us: percentile(&micros, 0.5),
        p99_us: percentile(&micros, 0.99),
    })
}

/// (c): the test grain's socket client under `capnet-bridge -- …`, through SOCKS5.
fn via_bridge(sink: SocketAddr, fb: SocketAddr, a: &Args) -> Result<Figures> {
    let d = Daemon::start(&driver_config("tcp", "libcapnet_driver_tcp.so", ""))?;
    d.wait_driver("tcp", Duration::from_secs(20), |v| v["state"] == "running")?;
    let bridge = artifact("capnet-bridge").display().to_string();
    // Inside the grain the bridge's directory (target/<profile>) is the app tree at /app.
    let grain = "/app/capnet-test-grain";
    let run = |id: &str, app: &[&str]| -> Result<serde_json::Value> {
        let mut args = vec![
            "grain",
            "start",
            "--id",
            id,
            "--",
            &bridge,
            "--socks",
            "127.0.0.1:0",
            "--http",
            "off",
            "--state",
            "off",
            "--grant",
            "network",
            "--",
            grain,
        ];
        args.extend_from_slice(app);
        d.capnet_json(&args)?;
        d.grant_next("tcp", &[])?;
        grain_json(&d, id)
    };
    let (sp, fp) = (sink.port().to_string(), fb.port().to_string());
    let t = run(
        "bench-bridge-tput",
        &[
            "bench-proxy-throughput",
            "--host",
            "127.0.0.1",
            "--port",
            &sp,
            "--bytes",
            &a.bytes.to_string(),
        ],
    )?;
    let l = run(
        "bench-bridge-lat",
        &[
            "bench-proxy-latency",
            "--host",
            "127.0.0.1",
            "--port",
            &fp,
            "--count",
            &a.count.to_string(),
        ],
    )?;
    let mut micros: Vec<u64> = l["micros"]
        .as_array()
        .map(|v| v.iter().filter_map(|x| x.as_u64()).collect())
        .unwrap_or_default();
    micros.sort_unstable();
    Ok(Figures {
        mib_s: a.bytes as f64 / t["secs"].as_f64().unwrap_or(f64::INFINITY) / 1048576.0,
        p50_us: percentile(&micros, 0.5),
        p99_us: percentile(&micros, 0.99),
    })
}

fn data_path_section(a: &Args) -> Result<String> {
    let sink = sink_server()?;
    let fb = first_byte_server()?;
    eprintln!("bench: direct TCP …");
    let direct = direct(sink, fb, a)?;
    eprintln!("bench: capnet grain → TcpPort …");
    let capnet = via_capnet(sink, fb, a)?;
    eprintln!("bench: capnet-bridge SOCKS5 → TcpPort …");
    let bridge = via_bridge(sink, fb, a)?;
    eprintln!("bench: microsocks SOCKS5 …");
    let socks = via_socks(sink, fb, a)?;
    let row = |name: &str, f: &Figures| {
        format!(
            "| {name} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} |",
            f.mib_s,
            f.mib_s / direct.mib_s,
            f.p50_us,
            f.p99_us,
            f.p50_us / direct.p50_us.max(1.0)
        )
    };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    Ok(format!(
        "## Data path: bulk throughput and connect-to-first-byte latency (loopback)\n\n\
         Machine: {cpus} CPUs, {}. Throughput: {} MiB sent to a sink that answers with the byte \
         count. Latency: {} connections to a server that writes one byte at once, timed from \
         the start of the connect until that byte is read.\n\n\
         | path | MiB/s | × direct | p50 µs | p99 µs | p50 × direct |\n\
         |---|---|---|---|---|---|\n{}\n{}\n{}\n{}\n\n\
         capnet-bridge against the native capability path: {:.2}× the throughput, {:.2}× \
         the p50 latency.\n\n\
         * **direct**: a plain TCP socket.\n\
         * **capnet TcpPort**: a grain writes Cap'n Proto `ByteStream.write` calls (256 KiB) \
         on a granted TcpPort; capnetd's membrane forwards them to the TCP driver host, which \
         writes them to the socket. Latency includes `TcpPort.connect` through both hops.\n\
         * **capnet-bridge**: an ordinary socket client in a grain started as \
         `capnet-bridge -- client`, through the bridge's SOCKS5 proxy on the grain's loopback \
         onto a granted IpNetwork (the same path as above plus the client ⇄ bridge socket \
         hop). Latency includes the SOCKS handshake and `TcpPort.connect`.\n\
         * **microsocks**: the same transfer through a SOCKS5 proxy (Debian's microsocks), \
         including the SOCKS handshake for latency.\n",
        std::env::consts::ARCH,
        a.bytes >> 20,
        a.count,
        row("direct", &direct),
        row("capnet TcpPort", &capnet),
        row("capnet-bridge SOCKS5", &bridge),
        row("microsocks SOCKS5", &socks),
        bridge.mib_s / capnet.mib_s,
        bridge.p50_us / capnet.p50_us.max(1.0),
    ))
}

/// Spawn latency through capnetd: Admin `startGrain` of an ad-hoc `/bin/true`, then
/// `waitGrain`, which answers once the grain exited and its sandbox was torn down.
fn spawn_via_daemon(runs: usize) -> Result<Vec<Duration>> {
    let d = Daemon::start("")?;
    let socket = d.socket().to_path_buf();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let stream = tokio::net::UnixStream::connect(&socket).await?;
        let mut rpc = capnet_schemas::rpc::two_party(stream, Side::Client, None);
        let admin: admin::Client = rpc.bootstrap(Side::Server);
        tokio::task::spawn_local(rpc);
        let mut out = Vec::with_capacity(runs);
        // One warm-up spawn (first use of the spawner thread, page cache).
        for i in 0..=runs {
            let id = format!("spawn-{i}");
            let t0 = Instant::now();
            let mut req = admin.start_grain_request();
            {
                let mut spec = req.get().init_spec();
                spec.set_id(&id);
                spec.init_command(1).set(0, "/bin/true");
            }
            req.send().promise.await?;
            let mut w = admin.wait_grain_request();
            w.get().set_grain_id(&id);
            w.get().set_timeout_ms(30_000);
            let resp = w.send().promise.await?;
            let r = resp.get()?;
            let g = r.get_grain()?;
            if !r.get_exited() || g.get_exit_status() != 0 {
                bail!(
                    "/bin/true in grain {id} did not exit 0: {}",
                    g.get_exit_reason()?.to_str()?
                );
            }
            if i > 0 {
                out.push(t0.elapsed());
            }
        }
        Ok(out)
    })
}

fn ms(v: &serde_json::Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

fn spawn_section(a: &Args) -> Result<String> {
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    eprintln!(
        "bench: sandbox spawn through capnetd ({} runs) …",
        a.spawn_runs
    );
    let mut daemon = spawn_via_daemon(a.spawn_runs)?;
    daemon.sort_unstable();
    let as_us: Vec<u64> = daemon.iter().map(|d| d.as_micros() as u64).collect();
    let (d50, d99) = (
        percentile(&as_us, 0.5) / 1000.0,
        percentile(&as_us, 0.99) / 1000.0,
    );
    eprintln!(
        "bench: sandbox library and bwrap ({} runs each) …",
        a.spawn_runs
    );
    let out = Command::new(artifact("capnet-sandbox-tool"))
        .args(["bench", "--runs", &a.spawn_runs.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .context("running capnet-sandbox-tool bench")?;
    if !out.status.success() {
        bail!("capnet-sandbox-tool bench failed ({})", out.status);
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "capnet-sandbox-tool printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let (lib, bw) = (&v["capnet"], &v["bwrap"]);
    let (b50, b99) = (ms(bw, "p50_ms"), ms(bw, "p99_ms"));
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    Ok(format!(
        "## Sandbox spawn: start request until `true` ran in a fully confined grain and was reaped\n\n\
         Machine: {cpus} CPUs, {}, load average {load} when it started; {} runs of each, in \
         one run of `make bench` ({} build). \
         A capnet grain here has every wall: user, pid, mount, network, ipc, uts and cgroup \
         namespaces, a new root (tmpfs) with read-only `/app`, `/usr`, `/lib`, `/lib64`, \
         `/bin`, its own `/tmp`, `/dev` and `/proc`, memory, pids and CPU cgroups (created and \
         removed each time), the seccomp profile, no capabilities, rlimits.\n\n\
         | path | p50 ms | p99 ms | p50 × bwrap |\n\
         |---|---|---|---|\n\
         | capnetd: Admin `startGrain` → `waitGrain` reports the exit | {d50:.1} | {d99:.1} | {:.2} |\n\
         | sandbox library: `Spawner::spawn` → exit → teardown | {:.1} | {:.1} | {:.2} |\n\
         | `{}` | {b50:.1} | {b99:.1} | 1.00 |\n\n\
         * **capnetd** is what an administrator or a script sees: the grain's state directory, \
         host id, log file and socketpair are prepared, the sandbox is built on the spawner \
         thread, and `waitGrain` answers once `true` exited and the sandbox (processes, \
         cgroups) is gone. Measured over the admin socket, without the CLI's own start-up.\n\
         * **sandbox library** is the same sandbox without the daemon around it.\n\
         * **bwrap** builds comparable namespaces and mounts but no cgroups and no seccomp \
         filter.\n",
        std::env::consts::ARCH,
        a.spawn_runs,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        d50 / b50,
        ms(lib, "p50_ms"),
        ms(lib, "p99_ms"),
        ms(lib, "p50_ms") / b50,
        v["bwrap_command"]
            .as_str()
            .unwrap_or("bwrap --unshare-all … /bin/true"),
    ))
}

/// Replaces the section whose heading starts with `heading` in `existing` (or appends
/// it), keeping every other section.
fn merge_section(existing: &str, heading: &str, section: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut rest = existing;
    let head = match existing.find("\n## ") {
        Some(i) => {
            rest = &existing[i + 1..];
            existing[..i + 1].to_string()
        }
        None if existing.starts_with("## ") => String::new(),
        None => {
            rest = "";
            existing.to_string()
        }
    };
    for chunk in rest.split("\n## ") {
        let chunk = chunk.strip_prefix("## ").unwrap_or(chunk);
        if !chunk.trim().is_empty() {
            parts.push(format!("## {}", chunk.trim_end()));
        }
    }
    let mut replaced = false;
    for p in &mut parts {
        if p.starts_with(heading) {
            *p = section.trim_end().to_string();
            replaced = true;
        }
    }
    if !replaced {
        parts.push(section.trim_end().to_string());
    }
    let head = if head.trim().is_empty() {
        "# Benchmarks\n\n\
         Measured by `make bench` (release build) in one run on one machine, so the ratios \
         compare like with like; absolute figures vary between runs and machines by 10-20%.\n\n"
            .to_string()
    } else {
        head
    };
    format!("{head}{}\n", parts.join("\n\n"))
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mut report = std::fs::read_to_string(&a.out).unwrap_or_default();
    for section in &a.sections {
        let (heading, text) = match section.as_str() {
            "data" => ("## Data path:", data_path_section(&a)?),
            "spawn" => ("## Sandbox spawn", spawn_section(&a)?),
            other => bail!("unknown section {other:?}: use data or spawn"),
        };
        println!("{text}");
        report = merge_section(&report, heading, &text);
    }
    std::fs::write(&a.out, report)?;
    eprintln!("bench: wrote {}", a.out.display());
    Ok(())
}
