//! A grain used by capnet's tests and demo. It talks to the grain API on fd 3 and prints
//! what happened as JSON lines on stdout (which lands in the grain's log).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use capnet_schemas::bytestream;
use capnet_schemas::descriptor::{Encryption, Requested};
use capnet_schemas::grain;
use capnet_schemas::grain_capnp::grain_api;
use capnet_schemas::ip_capnp::{ip_interface, ip_network, tcp_port};
use capnet_tests::grain::{UdpInbox, UdpPortClient, pseudo_random, sha256_hex, udp_send};
use capnet_tests::proxy;
use clap::{Parser, Subcommand};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Request IpNetwork, send pseudo-random bytes to an echo server, check what comes back.
    Echo {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 1 << 20)]
        bytes: usize,
        #[arg(long, default_value = "test: echo")]
        label: String,
    },
    /// Request IpInterface, listen on a port, answer lines until told to drop the handle.
    Listen {
        #[arg(long)]
        port: u16,
    },
    /// Request something and report the outcome (exit 3 if refused).
    Request {
        /// network, interface, host, tcpport
        #[arg(long)]
        kind: String,
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        port: Option<u16>,
        #[arg(long, default_value = "test: request")]
        label: String,
    },
    /// Benchmark: send `bytes` to a sink server that answers with the count, through the
    /// native ByteStream path; print MiB/s.
    BenchThroughput {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        bytes: u64,
    },
    /// Benchmark: connect `count` times to a server that writes one byte at once; print
    /// connect-to-first-byte latencies.
    BenchLatency {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        count: u32,
    },
    /// Benchmark: round trips of a trivial call to the supervisor.
    BenchRtt {
        #[arg(long, default_value_t = 1000)]
        count: u32,
    },
    /// Request a capability, save it, print the token.
    Save {
        /// network, interface, tcpport
        #[arg(long, default_value = "network")]
        kind: String,
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        port: Option<u16>,
    },
    /// Restore a token; with --echo-port, use it (as a network, or as the port it is) to
    /// echo through; exit 3 if the restore is refused.
    Restore {
        #[arg(long)]
        token: String,
        /// What the token restores: network or tcpport.
        #[arg(long, default_value = "network")]
        kind: String,
        #[arg(long)]
        echo_port: Option<u16>,
    },
    /// Drop a token; exit 3 if refused.
    Drop {
        #[arg(long)]
        token: String,
    },
    /// Save and drop tokens in a loop, printing SAVED/DROPPING/DROPPED lines.
    TokenChurn {
        /// Keep at most this many live tokens (drop the oldest beyond it).
        #[arg(long, default_value_t = 8)]
        keep: usize,
    },
    /// Restore every live token (must succeed) and every dropped one (must fail).
    Verify {
        /// Comma-separated hex tokens that must restore.
        #[arg(long, default_value = "")]
        live: String,
        /// Comma-separated hex tokens that must not restore.
        #[arg(long, default_value = "")]
        dropped: String,
        /// Comma-separated hex tokens to drop after verifying (DROPPING/DROPPED lines).
        #[arg(long, default_value = "")]
        drop: String,
    },
    /// Request a TcpPort and show it reaches its host:port and nothing else.
    NarrowProbe {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        other_port: u16,
    },
    /// Request IpNetwork and IpInterface; keep a bulk transfer, an idle connection and a
    /// listener open until the grant is revoked, then try again and report the errors.
    RevokeVictim {
        #[arg(long)]
        sink_port: u16,
        #[arg(long)]
        echo_port: u16,
        #[arg(long)]
        listen_port: u16,
    },
    /// Request IpNetwork and connect to a port `count` times, reporting each outcome.
    Hammer {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        count: u32,
    },
    /// Request IpNetwork (or a UdpPort with `--narrow`), send `count` datagrams to a UDP
    /// echo server with one returnPort, and report the replies and the source ports the
    /// echo server saw (it answers `from PORT: PAYLOAD`). Exit 3 if the first send is
    /// refused.
    UdpEcho {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 3)]
        count: u32,
        #[arg(long)]
        narrow: bool,
        #[arg(long, default_value = "test: udp echo")]
        label: String,
        /// Ignore `--count`: send one datagram every 5 ms until a send fails (the grant
        /// was revoked), print `READY` after the first reply, report the failure.
        #[arg(long)]
        until_refused: bool,
    },
    /// Request IpInterface, listen for UDP on a port, answer each datagram with
    /// `echo: PAYLOAD` through the sender's own port, until a datagram says `quit`.
    UdpListen {
        #[arg(long)]
        port: u16,
    },
    /// Request a TcpPort (host:port) and send one mail over SMTP through it; report the
    /// server's final reply. Exit 0 if the mail was accepted, 3 if refused.
    SmtpSend {
        #[arg(long)]
        host: String,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        from: String,
        #[arg(long, required = true)]
        to: Vec<String>,
        /// The From: header (default: the envelope sender).
        #[arg(long)]
        from_header: Option<String>,
        #[arg(long, default_value = "capnet test")]
        subject: String,
        #[arg(long, default_value = "hello from a grain")]
        body: String,
    },
    /// Request IpNetwork and GET `path` from host:port with a Host header (default: the
    /// host); report status and body. Exit 3 if the driver refused.
    HttpGet {
        #[arg(long)]
        host: String,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        host_header: Option<String>,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value = "test: http")]
        label: String,
    },
    /// Request IpNetwork; connect to `crash_port` (the driver crashes), then retry the echo
    /// server until the restarted driver serves it.
    CrashRecover {
        #[arg(long)]
        crash_port: u16,
        #[arg(long)]
        echo_port: u16,
    },
    /// Through capnet-bridge (proxies from ALL_PROXY and http_proxy, no grain API): try
    /// each HOST:PORT with SOCKS5 CONNECT, HTTP CONNECT and GET http://HOST:PORT/, and
    /// print one JSON line per target with the reply code and statuses.
    ProxyProbe {
        /// Targets, `host:port` (IPv6 as `[::1]:port`).
        targets: Vec<String>,
    },
    /// Through capnet-bridge: `count` SOCKS5 and `http_count` HTTP CONNECT connections at
    /// once to an echo server, each sending `bytes` and checking the echo and the EOF.
    ProxySwarm {
        #[arg(long)]
        host: String,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 200)]
        count: usize,
        #[arg(long, default_value_t = 50)]
        http_count: usize,
        #[arg(long, default_value_t = 65536)]
        bytes: usize,
    },
    /// Through capnet-bridge's SOCKS5 proxy against the tests' hold server: reset a
    /// connection, half-close one, let the server close one, and drop one mid-download.
    ProxyClose {
        #[arg(long)]
        host: String,
        #[arg(long)]
        port: u16,
    },
    /// Benchmark through capnet-bridge's SOCKS5 proxy: like bench-throughput.
    BenchProxyThroughput {
        #[arg(long)]
        host: String,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        bytes: u64,
    },
    /// Benchmark through capnet-bridge's SOCKS5 proxy: like bench-latency.
    BenchProxyLatency {
        #[arg(long)]
        host: String,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        count: u32,
    },
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(t: &str) -> Result<Vec<u8>> {
    if !t.len().is_multiple_of(2) {
        bail!("odd-length hex");
    }
    (0..t.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&t[i..i + 2], 16).context("bad hex"))
        .collect()
}

type PersistentClient = capnet_schemas::persistent_capnp::persistent::Client<
    capnp::data::Owned,
    capnet_schemas::system_persistent_capnp::api_token_owner::Owned,
>;

async fn save_cap(cap: &capnp::capability::Client) -> Result<Vec<u8>> {
    let p: PersistentClient = capnp::capability::FromClientHook::new(cap.hook.add_ref());
    let resp = p.save_request().send().promise.await.map_err(clean)?;
    Ok(resp.get()?.get_sturdy_ref()?.to_vec())
}

async fn restore_cap(
    api: &grain_api::Client,
    token: &[u8],
) -> Result<capnp::capability::Client, capnp::Error> {
    let mut req = api.restore_request();
    req.get().set_token(token);
    let resp = req.send().promise.await?;
    resp.get()?.get_cap().get_as_capability()
}

fn requested(kind: &str, host: Option<String>, port: Option<u16>) -> Result<Requested> {
    Ok(match kind {
        "network" => Requested::IpNetwork {
            encryption: Encryption::None,
        },
        "network-tls" => Requested::IpNetwork {
            encryption: Encryption::Tls,
        },
        "interface" => Requested::IpInterface,
        "host" => Requested::IpRemoteHost { host },
        "tcpport" => Requested::TcpPort { host, port },
        "udpport" => Requested::UdpPort { host, port },
        other => bail!("unknown kind {other}"),
    })
}

fn main() {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            std::process::exit(1);
        }
    };
    let local = tokio::task::LocalSet::new();
    let code = local.block_on(&rt, async move {
        match run(args).await {
            Ok(code) => code,
            Err(e) => {
                println!("{}", json!({"ok": false, "error": format!("{e:#}")}));
                1
            }
        }
    });
    std::process::exit(code);
}

/// Sends a datagram every 5 ms on `udp` until a send fails; prints `READY` once the first
/// reply came back, then the failure and how many datagrams went out. Exit 0 if the
/// failure was a revocation, 1 otherwise.
async fn udp_until_refused(
    udp: &UdpPortClient,
    ret: &UdpPortClient,
    rx: &mut capnet_tests::grain::UdpReceived,
) -> Result<i32> {
    let mut ready = false;
    let mut sent = 0u64;
    loop {
        if let Err(e) = udp_send(udp, format!("datagram {sent}").as_bytes(), ret).await {
            let e = clean(e).to_string();
            let revoked = e.starts_with("revoked:");
            println!(
                "{}",
                json!({"ok": revoked, "stopped": e, "sent": sent, "ready": ready})
            );
            return Ok(if revoked { 0 } else { 1 });
        }
        sent += 1;
        if !ready {
            let (data, _) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .context("no reply within 10 s")?
                .context("inbox closed")?;
            let reply = String::from_utf8_lossy(&data).into_owned();
            println!("READY {}", echo_source_port(&reply).unwrap_or("?"));
            ready = true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The source port a `UdpEchoServer` reply (`from PORT: PAYLOAD`) names.
fn echo_source_port(reply: &str) -> Option<&str> {
    reply.strip_prefix("from ")?.split(':').next()
}

fn clean(e: capnp::Error) -> anyhow::Error {
    anyhow!(
        "{}",
        e.extra.trim_start_matches("remote exception: ").trim()
    )
}

async fn port_of(net: &ip_network::Client, host: &str, port: u16) -> tcp_port::Client {
    let mut req = net.get_remote_host_by_name_request();
    req.get().set_address(host);
    let h = req.send().pipeline.get_host();
    let mut req = h.get_tcp_port_request();
    req.get().set_port_num(port);
    req.send().pipeline.get_port()
}

/// Sends `n` bytes through `port` to an echo server and checks the echo and the EOF.
async fn echo_once(port: &tcp_port::Client, n: usize, seed: u64) -> Result<String> {
    let stream = bytestream::connect(port).await.map_err(clean)?;
    let (mut r, mut w) = tokio::io::split(stream);
    let data = pseudo_random(n, seed);
    let expected = sha256_hex(&data);
    let writer = tokio::task::spawn_local(async move {
        for chunk in data.chunks(256 * 1024) {
            w.write_all(chunk).await?;
        }
        w.shutdown().await
    });
    let mut h = Sha256::new();
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let k = r.read(&mut buf).await.context("reading the echo")?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        got += k;
    }
    writer.await.context("writer task")?.context("writing")?;
    let sum: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if got != n || sum != expected {
        bail!("echo mismatch: sent {n} bytes ({expected}), got {got} ({sum})");
    }
    Ok(sum)
}

async fn request(api: &grain_api::Client, what: Requested, label: &str) -> Result<grain::Granted> {
    grain::request(api, &what, label).await.map_err(clean)
}

async fn run(args: Args) -> Result<i32> {
    if let Some(code) = proxy_commands(&args.cmd).await? {
        return Ok(code);
    }
    let api = grain::connect()?;
    match args.cmd {
        Cmd::Echo {
            host,
            port,
            bytes,
            label,
        } => {
            let g = request(
                &api,
                Requested::IpNetwork {
                    encryption: Encryption::None,
                },
                &label,
            )
            .await?;
            println!("{}", json!({"event": "granted", "grant": g.grant_id}));
            let net: ip_network::Client = g.cast();
            let p = port_of(&net, &host, port).await;
            let t0 = Instant::now();
            let sum = echo_once(&p, bytes, 42).await?;
            let secs = t0.elapsed().as_secs_f64();
            println!(
                "{}",
                json!({"ok": true, "bytes": bytes, "sha256": sum, "eof": true,
                       "mib_per_s": bytes as f64 / secs / 1048576.0})
            );
            Ok(0)
        }
        Cmd::Listen { port } => {
            let g = request(&api, Requested::IpInterface, "test: listen").await?;
            let iface: ip_interface::Client = g.cast();
            let (p, mut incoming) = bytestream::listener();
            let mut req = iface.listen_tcp_request();
            req.get().set_port_num(port);
            req.get().set_port(p);
            let handle = req
                .send()
                .promise
                .await
                .map_err(clean)?
                .get()?
                .get_handle()?;
            println!("LISTENING {port}");
            let mut handle = Some(handle);
            while let Some(conn) = incoming.recv().await {
                let (r, mut w) = tokio::io::split(conn);
                let mut lines = BufReader::new(r).lines();
                while let Some(line) = lines.next_line().await? {
                    if line == "drop" {
                        drop(handle.take());
                        // The release travels before this call on the same connection.
                        api.whoami_request().send().promise.await.map_err(clean)?;
                        w.write_all(b"dropped\n").await?;
                        println!("DROPPED");
                    } else if line == "quit" {
                        w.write_all(b"bye\n").await?;
                        w.shutdown().await?;
                        println!("{}", json!({"ok": true, "event": "quit"}));
                        return Ok(0);
                    } else {
                        w.write_all(format!("echo: {line}\n").as_bytes()).await?;
                    }
                }
            }
            Ok(0)
        }
        Cmd::Request {
            kind,
            host,
            port,
            label,
        } => {
            let what = match kind.as_str() {
                "network" => Requested::IpNetwork {
                    encryption: Encryption::None,
                },
                "network-tls" => Requested::IpNetwork {
                    encryption: Encryption::Tls,
                },
                "interface" => Requested::IpInterface,
                "host" => Requested::IpRemoteHost { host },
                "tcpport" => Requested::TcpPort { host, port },
                "udpport" => Requested::UdpPort { host, port },
                other => bail!("unknown kind {other}"),
            };
            match grain::request(&api, &what, &label).await {
                Ok(g) => {
                    println!("{}", json!({"ok": true, "grant": g.grant_id}));
                    Ok(0)
                }
                Err(e) => {
                    println!("{}", json!({"ok": false, "refused": clean(e).to_string()}));
                    Ok(3)
                }
            }
        }
        Cmd::BenchThroughput { port, bytes } => {
            let g = request(
                &api,
                Requested::IpNetwork {
                    encryption: Encryption::None,
                },
                "bench",
            )
            .await?;
            let net: ip_network::Client = g.cast();
            let p = port_of(&net, "127.0.0.1", port).await;
            let (reply_w, mut reply_r) = tokio::io::duplex(64);
            let downstream: capnet_schemas::util_capnp::byte_stream::Client =
                capnp_rpc::new_client(bytestream::WriterStream::new(reply_w));
            let mut req = p.connect_request();
            req.get().set_downstream(downstream);
            let t0 = Instant::now();
            let upstream = req
                .send()
                .promise
                .await
                .map_err(clean)?
                .get()?
                .get_upstream()?;
            let chunk = vec![0x5au8; capnet_schemas::rpc::CHUNK_BYTES];
            bytestream::write_request(&upstream, &bytes.to_be_bytes())
                .send()
                .await
                .map_err(clean)?;
            let mut sent = 0u64;
            while sent < bytes {
                let n = (bytes - sent).min(chunk.len() as u64) as usize;
                bytestream::write_request(&upstream, &chunk[..n])
                    .send()
                    .await
                    .map_err(clean)?;
                sent += n as u64;
            }
            upstream
                .done_request()
                .send()
                .promise
                .await
                .map_err(clean)?;
            let mut count = [0u8; 8];
            reply_r
                .read_exact(&mut count)
                .await
                .context("reading the sink's count")?;
            let secs = t0.elapsed().as_secs_f64();
            let got = u64::from_be_bytes(count);
            if got != bytes {
                bail!("the sink received {got} bytes of {bytes}");
            }
            println!("{}", json!({"ok": true, "bytes": bytes, "secs": secs}));
            Ok(0)
        }
        Cmd::BenchRtt { count } => {
            let t0 = Instant::now();
            for _ in 0..count {
                api.whoami_request().send().promise.await.map_err(clean)?;
            }
            println!(
                "{}",
                json!({"ok": true, "rtt_us": t0.elapsed().as_micros() as u64 / u64::from(count.max(1))})
            );
            Ok(0)
        }
        Cmd::BenchLatency { port, count } => {
            let g = request(
                &api,
                Requested::IpNetwork {
                    encryption: Encryption::None,
                },
                "bench",
            )
            .await?;
            let net: ip_network::Client = g.cast();
            let p = port_of(&net, "127.0.0.1", port).await;
            let mut micros = Vec::with_capacity(count as usize);
            let mut connect_micros = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let t0 = Instant::now();
                let mut s = bytestream::connect(&p).await.map_err(clean)?;
                connect_micros.push(t0.elapsed().as_micros() as u64);
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await.context("first byte")?;
                micros.push(t0.elapsed().as_micros() as u64);
            }
            println!(
                "{}",
                json!({"ok": true, "micros": micros, "connect_micros": connect_micros})
            );
            Ok(0)
        }
        Cmd::Save { kind, host, port } => {
            let g = request(&api, requested(&kind, host, port)?, "test: save").await?;
            let token = save_cap(&g.cap).await?;
            println!(
                "{}",
                json!({"ok": true, "grant": g.grant_id, "token": hex(&token)})
            );
            Ok(0)
        }
        Cmd::Restore {
            token,
            kind,
            echo_port,
        } => {
            let cap = match restore_cap(&api, &unhex(&token)?).await {
                Ok(c) => c,
                Err(e) => {
                    println!("{}", json!({"ok": false, "refused": clean(e).to_string()}));
                    return Ok(3);
                }
            };
            if let Some(port) = echo_port {
                let p: tcp_port::Client = match kind.as_str() {
                    "network" => {
                        let net: ip_network::Client =
                            capnp::capability::FromClientHook::new(cap.hook.add_ref());
                        port_of(&net, "127.0.0.1", port).await
                    }
                    _ => capnp::capability::FromClientHook::new(cap.hook.add_ref()),
                };
                echo_once(&p, 100_000, 3).await?;
            }
            // A restored capability can be saved again.
            let again = save_cap(&cap).await?;
            println!(
                "{}",
                json!({"ok": true, "echoed": echo_port.is_some(), "resaved": again.len()})
            );
            Ok(0)
        }
        Cmd::Drop { token } => {
            let mut req = api.drop_request();
            req.get().set_token(&unhex(&token)?);
            match req.send().promise.await {
                Ok(_) => {
                    println!("{}", json!({"ok": true}));
                    Ok(0)
                }
                Err(e) => {
                    println!("{}", json!({"ok": false, "refused": clean(e).to_string()}));
                    Ok(3)
                }
            }
        }
        Cmd::TokenChurn { keep } => {
            let g = request(
                &api,
                Requested::IpNetwork {
                    encryption: Encryption::None,
                },
                "test: churn",
            )
            .await?;
            let mut live: std::collections::VecDeque<Vec<u8>> = Default::default();
            loop {
                let t = save_cap(&g.cap).await?;
                println!("SAVED {}", hex(&t));
                live.push_back(t);
                if live.len() > keep
                    && let Some(old) = live.pop_front()
                {
                    println!("DROPPING {}", hex(&old));
                    let mut req = api.drop_request();
                    req.get().set_token(&old);
                    req.send().promise.await.map_err(clean)?;
                    println!("DROPPED {}", hex(&old));
                }
            }
        }
        Cmd::Verify {
            live,
            dropped,
            drop,
        } => {
            let split = |t: &str| -> Vec<String> {
                t.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            };
            let mut bad = Vec::new();
            let (live, dropped) = (split(&live), split(&dropped));
            for t in &live {
                if let Err(e) = restore_cap(&api, &unhex(t)?).await {
                    bad.push(format!("live token {t} did not restore: {}", clean(e)));
                }
            }
            for t in &dropped {
                match restore_cap(&api, &unhex(t)?).await {
                    Ok(_) => bad.push(format!("dropped token {t} restored")),
                    Err(e) if !e.to_string().contains("dropped") => bad.push(format!(
                        "dropped token {t} refused for the wrong reason: {}",
                        clean(e)
                    )),
                    Err(_) => {}
                }
            }
            for t in split(&drop) {
                println!("DROPPING {t}");
                let mut req = api.drop_request();
                req.get().set_token(&unhex(&t)?);
                req.send().promise.await.map_err(clean)?;
                println!("DROPPED {t}");
            }
            println!(
                "{}",
                json!({"ok": bad.is_empty(), "live": live.len(), "dropped": dropped.len(), "problems": bad})
            );
            Ok(if bad.is_empty() { 0 } else { 1 })
        }
        Cmd::NarrowProbe {
            host,
            port,
            other_port,
        } => {
            let g = request(
                &api,
                Requested::TcpPort {
                    host: Some(host.clone()),
                    port: Some(port),
                },
                "test: narrow",
            )
            .await?;
            let p: tcp_port::Client = g.cast();
            echo_once(&p, 10_000, 5).await?;
            // The same capability used as a host or a network: not served.
            let as_host: capnet_schemas::ip_capnp::ip_remote_host::Client = g.cast();
            let mut req = as_host.get_tcp_port_request();
            req.get().set_port_num(other_port);
            let other = req.send().pipeline.get_port();
            let other_err = bytestream::connect(&other)
                .await
                .err()
                .map(|e| clean(e).to_string());
            let as_net: ip_network::Client = g.cast();
            let third = port_of(&as_net, "localhost", other_port).await;
            let net_err = bytestream::connect(&third)
                .await
                .err()
                .map(|e| clean(e).to_string());
            println!(
                "{}",
                json!({"ok": other_err.is_some() && net_err.is_some(),
                                   "other_port_error": other_err, "as_network_error": net_err})
            );
            Ok(0)
        }
        Cmd::RevokeVictim {
            sink_port,
            echo_port,
            listen_port,
        } => {
            let g = request(
                &api,
                Requested::IpNetwork {
                    encryption: Encryption::None,
                },
                "test: victim",
            )
            .await?;
            let net: ip_network::Client = g.cast();
            let gi = request(&api, Requested::IpInterface, "test: victim listens").await?;
            let iface: ip_interface::Client = gi.cast();
            // A bulk transfer that never ends on its own.
            let sink = port_of(&net, "127.0.0.1", sink_port).await;
            let bulk = bytestream::connect(&sink).await.map_err(clean)?;
            let (_bulk_r, mut bulk_w) = tokio::io::split(bulk);
            let writer = tokio::task::spawn_local(async move {
                let chunk = vec![7u8; 256 * 1024];
                let mut sent = 0u64;
                loop {
                    if bulk_w.write_all(&chunk).await.is_err() {
                        return sent;
                    }
                    sent += chunk.len() as u64;
                }
            });
            // An idle connection.
            let echo = port_of(&net, "127.0.0.1", echo_port).await;
            let mut idle = bytestream::connect(&echo).await.map_err(clean)?;
            // A listener.
            let (lp, _incoming) = bytestream::listener();
            let mut req = iface.listen_tcp_request();
            req.get().set_port_num(listen_port);
            req.get().set_port(lp);
            let _handle = req
                .send()
                .promise
                .await
                .map_err(clean)?
                .get()?
                .get_handle()?;
            println!("READY {} {}", g.grant_id, gi.grant_id);
            let mut b = [0u8; 1];
            let idle_end = idle.read(&mut b).await;
            let sent = writer.await.unwrap_or(0);
            println!(
                "{}",
                json!({"event": "closed", "idle_read": format!("{idle_end:?}"), "bulk_sent": sent})
            );
            let again = bytestream::connect(&echo)
                .await
                .err()
                .map(|e| clean(e).to_string());
            let mut req = net.get_remote_host_by_name_request();
            req.get().set_address("127.0.0.1");
            let host_err = req.send().promise.await.err().map(|e| clean(e).to_string());
            println!(
                "{}",
                json!({"ok": true, "connect_error": again, "host_error": host_err})
            );
            Ok(0)
        }
        Cmd::Hammer { port, count } => {
            let g = request(
                &api,
                Requested::IpNetwork {
                    encryption: Encryption::None,
                },
                "test: hammer",
            )
            .await?;
            let net: ip_network::Client = g.cast();
            let p = port_of(&net, "127.0.0.1", port).await;
            for i in 0..count {
                let r = bytestream::connect(&p).await;
                println!(
                    "{}",
                    json!({"attempt": i, "error": r.err().map(|e| clean(e).to_string())})
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            println!("{}", json!({"ok": true}));
            Ok(0)
        }
        Cmd::ProxyProbe { .. }
        | Cmd::ProxySwarm { .. }
        | Cmd::ProxyClose { .. }
        | Cmd::BenchProxyThroughput { .. }
        | Cmd::BenchProxyLatency { .. } => Ok(0),
        Cmd::UdpEcho {
            host,
            port,
            count,
            narrow,
            label,
            until_refused,
        } => {
            let what = if narrow {
                Requested::UdpPort {
                    host: Some(host.clone()),
                    port: Some(port),
                }
            } else {
                Requested::IpNetwork {
                    encryption: Encryption::None,
                }
            };
            let g = request(&api, what, &label).await?;
            println!("{}", json!({"event": "granted", "grant": g.grant_id}));
            let udp: UdpPortClient = if narrow {
                g.cast()
            } else {
                let net: ip_network::Client = g.cast();
                let mut req = net.get_remote_host_by_name_request();
                req.get().set_address(&host);
                let h = req.send().pipeline.get_host();
                let mut req = h.get_udp_port_request();
                req.get().set_port_num(port);
                req.send().pipeline.get_port()
            };
            let (ret, mut rx) = UdpInbox::channel();
            if until_refused {
                return udp_until_refused(&udp, &ret, &mut rx).await;
            }
            let mut replies = Vec::new();
            let mut ports = std::collections::BTreeSet::new();
            for i in 0..count {
                let msg = format!("datagram {i}");
                if let Err(e) = udp_send(&udp, msg.as_bytes(), &ret).await {
                    let e = clean(e).to_string();
                    if i == 0 {
                        println!("{}", json!({"ok": false, "refused": e}));
                        return Ok(3);
                    }
                    bail!("send {i} failed: {e}");
                }
                let (data, _) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                    .await
                    .context("no reply within 10 s")?
                    .context("inbox closed")?;
                let reply = String::from_utf8_lossy(&data).into_owned();
                if let Some(p) = echo_source_port(&reply) {
                    ports.insert(p.to_string());
                }
                replies.push(reply);
            }
            println!(
                "{}",
                json!({"ok": true, "replies": replies, "source_ports": ports})
            );
            Ok(0)
        }
        Cmd::UdpListen { port } => {
            let g = request(&api, Requested::IpInterface, "test: udp listen").await?;
            let iface: ip_interface::Client = g.cast();
            let (inbox, mut rx) = UdpInbox::channel();
            let mut req = iface.listen_udp_request();
            req.get().set_port_num(port);
            req.get().set_port(inbox);
            let _handle = req
                .send()
                .promise
                .await
                .map_err(clean)?
                .get()?
                .get_handle()?;
            println!("LISTENING {port}");
            let (unused, _keep) = UdpInbox::channel();
            while let Some((data, peer)) = rx.recv().await {
                let msg = String::from_utf8_lossy(&data).into_owned();
                if msg == "quit" {
                    udp_send(&peer, b"bye", &unused).await.map_err(clean)?;
                    println!("{}", json!({"ok": true, "event": "quit"}));
                    return Ok(0);
                }
                udp_send(&peer, format!("echo: {msg}").as_bytes(), &unused)
                    .await
                    .map_err(clean)?;
            }
            Ok(0)
        }
        Cmd::SmtpSend {
            host,
            port,
            from,
            to,
            from_header,
            subject,
            body,
        } => {
            let g = request(
                &api,
                Requested::TcpPort {
                    host: Some(host.clone()),
                    port: Some(port),
                },
                "test: send mail",
            )
            .await?;
            let p: tcp_port::Client = g.cast();
            let stream = bytestream::connect(&p).await.map_err(clean)?;
            let mut smtp = SmtpDialogue::new(stream);
            let mut last = smtp.reply().await?;
            let header_from = from_header.unwrap_or_else(|| from.clone());
            let message = format!(
                "From: {header_from}\r\nTo: {}\r\nSubject: {subject}\r\n\r\n{body}\r\n",
                to.join(", ")
            );
            let mut steps = vec!["EHLO grain.test".to_string(), format!("MAIL FROM:<{from}>")];
            steps.extend(to.iter().map(|t| format!("RCPT TO:<{t}>")));
            steps.push("DATA".into());
            for step in steps {
                last = smtp.command(&step).await?;
                let want = if step == "DATA" { 354 } else { 250 };
                if last.0 != want {
                    break;
                }
            }
            if last.0 == 354 {
                last = smtp.data(message.as_bytes()).await?;
            }
            let _ = smtp.command("QUIT").await;
            let ok = last.0 == 250;
            println!(
                "{}",
                json!({"ok": ok, "code": last.0, "reply": last.1.trim_end()})
            );
            Ok(if ok { 0 } else { 3 })
        }
        Cmd::HttpGet {
            host,
            port,
            host_header,
            path,
            label,
        } => {
            let g = request(
                &api,
                Requested::IpNetwork {
                    encryption: Encryption::None,
                },
                &label,
            )
            .await?;
            let net: ip_network::Client = g.cast();
            let p = port_of(&net, &host, port).await;
            let mut stream = match bytestream::connect(&p).await {
                Ok(s) => s,
                Err(e) => {
                    println!("{}", json!({"ok": false, "refused": clean(e).to_string()}));
                    return Ok(3);
                }
            };
            let host_header = host_header.unwrap_or(host);
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\nUser-Agent: capnet-test-grain\r\n\r\n"
            );
            stream.write_all(req.as_bytes()).await?;
            let mut response = Vec::new();
            tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut response))
                .await
                .context("no complete response within 20 s")??;
            let text = String::from_utf8_lossy(&response);
            let status: u16 = text
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
            let ok = (200..300).contains(&status);
            println!(
                "{}",
                json!({"ok": ok, "status": status, "body": body, "bytes": response.len()})
            );
            Ok(if ok { 0 } else { 3 })
        }
        Cmd::CrashRecover {
            crash_port,
            echo_port,
        } => {
            let g = request(
                &api,
                Requested::IpNetwork {
                    encryption: Encryption::None,
                },
                "test: crash",
            )
            .await?;
            let net: ip_network::Client = g.cast();
            let crash = port_of(&net, "127.0.0.1", crash_port).await;
            match bytestream::connect(&crash).await {
                Ok(_) => {
                    bail!("connecting to the crash port succeeded; the driver should have crashed")
                }
                Err(e) => println!(
                    "{}",
                    json!({"event": "crash_error", "error": clean(e).to_string()})
                ),
            }
            let t0 = Instant::now();
            let mut attempts = 0u32;
            loop {
                attempts += 1;
                let p = port_of(&net, "127.0.0.1", echo_port).await;
                match echo_once(&p, 4096, 7).await {
                    Ok(_) => break,
                    Err(e) if t0.elapsed() < Duration::from_secs(20) => {
                        if attempts == 1 {
                            println!("{}", json!({"event": "retrying", "error": e.to_string()}));
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => bail!("the driver did not come back within 20s: {e}"),
                }
            }
            println!(
                "{}",
                json!({"ok": true, "recovered_after_ms": t0.elapsed().as_millis() as u64, "attempts": attempts})
            );
            Ok(0)
        }
    }
}

fn socks_proxy() -> Result<std::net::SocketAddr> {
    proxy::proxy_from_env(&["ALL_PROXY", "all_proxy"])
}

fn http_proxy() -> Result<std::net::SocketAddr> {
    proxy::proxy_from_env(&["http_proxy", "HTTP_PROXY"])
}

/// Sends `n` bytes on `s`, half-closes, and checks the echo and the EOF.
async fn echo_over(s: tokio::net::TcpStream, n: usize, seed: u64) -> Result<()> {
    let (mut r, mut w) = s.into_split();
    let data = pseudo_random(n, seed);
    let expected = sha256_hex(&data);
    let writer = tokio::task::spawn_local(async move {
        w.write_all(&data).await?;
        w.shutdown().await
    });
    let mut got = Vec::with_capacity(n);
    r.read_to_end(&mut got).await.context("reading the echo")?;
    writer.await.context("writer task")?.context("writing")?;
    if got.len() != n || sha256_hex(&got) != expected {
        bail!("echo mismatch: sent {n} bytes, got {}", got.len());
    }
    Ok(())
}

/// The subcommands that run under capnet-bridge without the grain API.
async fn proxy_commands(cmd: &Cmd) -> Result<Option<i32>> {
    match cmd {
        Cmd::ProxyProbe { targets } => {
            for t in targets {
                let (host, port) = t
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
                    .ok_or_else(|| anyhow!("{t} is not host:port"))?;
                let (_, socks) = proxy::socks_connect(socks_proxy()?, &host, port).await?;
                let (_, connect, connect_body) =
                    proxy::http_connect(http_proxy()?, &host, port).await?;
                let (get, get_body) =
                    proxy::http_get(http_proxy()?, &format!("http://{host}:{port}/")).await?;
                println!(
                    "{}",
                    json!({"target": t, "socks": socks, "connect": connect,
                           "connect_body": connect_body, "get": get, "get_body": get_body})
                );
            }
            Ok(Some(0))
        }
        Cmd::ProxySwarm {
            host,
            port,
            count,
            http_count,
            bytes,
        } => {
            let (socks, http) = (socks_proxy()?, http_proxy()?);
            let mut tasks = Vec::new();
            for i in 0..(count + http_count) {
                let (host, port, n) = (host.clone(), *port, *bytes);
                let via_http = i >= *count;
                tasks.push(tokio::task::spawn_local(async move {
                    let s = if via_http {
                        let (s, status, body) = proxy::http_connect(http, &host, port).await?;
                        if status != 200 {
                            bail!("HTTP CONNECT answered {status}: {body}");
                        }
                        s
                    } else {
                        let (s, code) = proxy::socks_connect(socks, &host, port).await?;
                        if code != 0 {
                            bail!("SOCKS5 CONNECT answered {code}");
                        }
                        s
                    };
                    echo_over(s, n, i as u64 + 1).await
                }));
            }
            let mut failed = Vec::new();
            for t in tasks {
                if let Err(e) = t.await.context("task").and_then(|r| r) {
                    failed.push(format!("{e:#}"));
                }
            }
            let ok = failed.is_empty();
            println!(
                "{}",
                json!({"ok": ok, "connections": count + http_count, "failed": failed.len(),
                       "first_error": failed.first()})
            );
            Ok(Some(if ok { 0 } else { 1 }))
        }
        Cmd::ProxyClose { host, port } => {
            let socks = socks_proxy()?;
            let open = |mode: &'static str| {
                let host = host.clone();
                let port = *port;
                async move {
                    let (s, code) = proxy::socks_connect(socks, &host, port).await?;
                    if code != 0 {
                        bail!("SOCKS5 CONNECT answered {code}");
                    }
                    let mut s = BufReader::new(s);
                    s.get_mut()
                        .write_all(format!("{mode}\n").as_bytes())
                        .await?;
                    let mut line = String::new();
                    s.read_line(&mut line).await?;
                    if line != "ok\n" {
                        bail!("the hold server answered {line:?} to {mode}");
                    }
                    Ok::<_, anyhow::Error>(s.into_inner())
                }
            };
            // 1. Reset: the client vanishes with RST; the bridge must abort the remote side.
            let s = open("abort").await?;
            s.set_zero_linger()?;
            drop(s);
            println!("{}", json!({"event": "reset_sent"}));
            // 2. Half-close: the server still answers after the client's FIN.
            let mut s = open("half").await?;
            s.shutdown().await?;
            let mut rest = String::new();
            s.read_to_string(&mut rest).await?;
            drop(s);
            println!("{}", json!({"event": "half_close", "after_fin": rest}));
            // 3. The server closes first: the client sees EOF.
            let mut s = open("serverclose").await?;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await?;
            drop(s);
            println!("{}", json!({"event": "server_closed", "extra": rest.len()}));
            // 4. Dropped mid-download: the server's writes must start failing.
            let mut s = open("stream").await?;
            let mut buf = vec![0u8; 1 << 20];
            s.read_exact(&mut buf).await?;
            drop(s);
            println!("{}", json!({"event": "download_dropped"}));
            // 5. Stay alive (and so keep the bridge running) until the server says so, so
            // that the checks above happen while the bridge still runs.
            let mut s = open("wait").await?;
            let mut rest = String::new();
            s.read_to_string(&mut rest).await?;
            println!("{}", json!({"ok": true, "released": rest}));
            Ok(Some(0))
        }
        Cmd::BenchProxyThroughput { host, port, bytes } => {
            let (mut s, code) = proxy::socks_connect(socks_proxy()?, host, *port).await?;
            if code != 0 {
                bail!("SOCKS5 CONNECT answered {code}");
            }
            let chunk = vec![0x5au8; 256 * 1024];
            let t0 = Instant::now();
            s.write_all(&bytes.to_be_bytes()).await?;
            let mut sent = 0u64;
            while sent < *bytes {
                let n = (bytes - sent).min(chunk.len() as u64) as usize;
                s.write_all(&chunk[..n]).await?;
                sent += n as u64;
            }
            let mut count = [0u8; 8];
            s.read_exact(&mut count).await.context("the sink's count")?;
            let secs = t0.elapsed().as_secs_f64();
            if u64::from_be_bytes(count) != *bytes {
                bail!(
                    "the sink received {} bytes of {bytes}",
                    u64::from_be_bytes(count)
                );
            }
            println!("{}", json!({"ok": true, "bytes": bytes, "secs": secs}));
            Ok(Some(0))
        }
        Cmd::BenchProxyLatency { host, port, count } => {
            let socks = socks_proxy()?;
            let mut micros = Vec::with_capacity(*count as usize);
            for _ in 0..*count {
                let t0 = Instant::now();
                let (mut s, code) = proxy::socks_connect(socks, host, *port).await?;
                if code != 0 {
                    bail!("SOCKS5 CONNECT answered {code}");
                }
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await.context("first byte")?;
                micros.push(t0.elapsed().as_micros() as u64);
            }
            println!("{}", json!({"ok": true, "micros": micros}));
            Ok(Some(0))
        }
        _ => Ok(None),
    }
}

/// The client side of an SMTP dialogue, for the test grain.
struct SmtpDialogue {
    io: BufReader<tokio::io::DuplexStream>,
}

impl SmtpDialogue {
    fn new(stream: tokio::io::DuplexStream) -> Self {
        Self {
            io: BufReader::new(stream),
        }
    }

    async fn reply(&mut self) -> Result<(u16, String)> {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(30), self.io.read_line(&mut line))
                .await
                .context("no SMTP reply within 30 s")??;
            if n == 0 {
                bail!("the SMTP server closed the connection after {text:?}");
            }
            text.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
                return Ok((code, text));
            }
        }
    }

    async fn command(&mut self, line: &str) -> Result<(u16, String)> {
        self.io
            .get_mut()
            .write_all(format!("{line}\r\n").as_bytes())
            .await?;
        self.reply().await
    }

    async fn data(&mut self, message: &[u8]) -> Result<(u16, String)> {
        let mut wire = Vec::new();
        for line in message.split_inclusive(|b| *b == b'\n') {
            if line.starts_with(b".") {
                wire.push(b'.');
            }
            wire.extend_from_slice(line);
        }
        wire.extend_from_slice(b".\r\n");
        self.io.get_mut().write_all(&wire).await?;
        self.reply().await
    }
}
