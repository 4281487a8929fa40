//! `make bench`: measures capnet's data path against real peers in one run and writes
//! the figures and ratios to docs/benchmarks.md.
//!
//! Compared, on loopback: (a) direct TCP, (b) a grain through a granted TcpPort (grain →
//! capnetd membrane → TCP driver host → TCP), (c) an ordinary socket client in a grain
//! through capnet-bridge's SOCKS5 proxy onto the same kind of grant, (d) microsocks as a
//! SOCKS5 proxy. Each measures bulk throughput (a sink that answers with the byte count)
//! and connect-to-first-byte latency (a server that writes one byte at once).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capnet_tests::{Daemon, artifact, driver_config, free_port};
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
    let grain = artifact("capnet-test-grain").display().to_string();
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
            &grain,
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

fn main() -> Result<()> {
    let a = Args::parse();
    let sink = sink_server()?;
    let fb = first_byte_server()?;
    eprintln!("bench: direct TCP …");
    let direct = direct(sink, fb, &a)?;
    eprintln!("bench: capnet grain → TcpPort …");
    let capnet = via_capnet(sink, fb, &a)?;
    eprintln!("bench: capnet-bridge SOCKS5 → TcpPort …");
    let bridge = via_bridge(sink, fb, &a)?;
    eprintln!("bench: microsocks SOCKS5 …");
    let socks = via_socks(sink, fb, &a)?;
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
    let report = format!(
        "# Benchmarks\n\n\
         Measured by `make bench` (release build) in one run on one machine, so the ratios \
         compare like with like; absolute figures vary between runs and machines by 10-20%.\n\n\
         ## Data path: bulk throughput and connect-to-first-byte latency (loopback)\n\n\
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
    );
    println!("{report}");
    let existing = std::fs::read_to_string(&a.out).unwrap_or_default();
    // Keep sections other benchmarks wrote; replace this one.
    let marker = "## Data path:";
    let mut out = report.clone();
    if let Some(rest) = existing.find("\n## ").map(|i| &existing[i..]) {
        for section in rest.split("\n## ").skip(1) {
            if !section.starts_with(&marker[3..]) {
                out.push_str("\n## ");
                out.push_str(section);
            }
        }
    }
    std::fs::write(&a.out, out)?;
    eprintln!("bench: wrote {}", a.out.display());
    Ok(())
}
