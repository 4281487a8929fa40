//! `make demo`: runs capnet end to end on loopback and prints what happened.
//!
//! Starts capnetd with `config/demo.toml` on a temporary state directory, runs a TCP echo
//! server on 127.0.0.1, and walks a grain through the administrator's workflow: request,
//! grant, use, listen, deny. The last line is `demo: N passed, M failed`; the exit status
//! is non-zero if any step failed.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capnet_tests::{Daemon, EchoServer, free_port, wait_refused};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// The configuration to run with.
    #[arg(long, default_value = "config/demo.toml")]
    config: PathBuf,
}

struct Steps {
    passed: u32,
    failed: u32,
}

impl Steps {
    fn run(&mut self, name: &str, f: impl FnOnce() -> Result<String>) {
        let t0 = Instant::now();
        match f() {
            Ok(summary) => {
                self.passed += 1;
                println!(
                    "  ok    {name} ({} ms)\n        {summary}",
                    t0.elapsed().as_millis()
                );
            }
            Err(e) => {
                self.failed += 1;
                println!("  FAIL  {name}: {e:#}");
            }
        }
    }
}

fn grain_result(d: &Daemon, id: &str) -> Result<serde_json::Value> {
    let st = d.wait_grain(id, Duration::from_secs(60))?;
    let log = d.grain_log(id);
    let last = log
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .with_context(|| format!("grain {id} printed no result; log:\n{log}"))?;
    if st["exit_status"] != 0 && last.get("refused").is_none() {
        bail!("grain {id} failed ({}): {log}", st["exit_reason"]);
    }
    Ok(last)
}

fn main() {
    let args = Args::parse();
    println!("capnet demo: grains reach the network only through granted capabilities\n");
    let mut steps = Steps {
        passed: 0,
        failed: 0,
    };
    let daemon = match Daemon::start_file(&args.config) {
        Ok(d) => d,
        Err(e) => {
            println!(
                "  FAIL  start capnetd with {}: {e:#}",
                args.config.display()
            );
            println!("\ndemo: 0 passed, 1 failed");
            std::process::exit(1);
        }
    };
    let d = &daemon;
    let echo = EchoServer::start();

    steps.run(
        "capnetd refuses the TCP driver until the administrator approves it",
        || {
            let drv = d.wait_driver("tcp", Duration::from_secs(20), |v| v["state"] == "failed")?;
            Ok(format!(
                "before approval: {}",
                drv["last_error"].as_str().unwrap_or("")
            ))
        },
    );

    steps.run(
        "the administrator inspects and approves the TCP driver",
        || {
            let plugin = capnet_tests::artifact("libcapnet_driver_tcp.so");
            let plugin = plugin.to_string_lossy();
            let v = d.capnet_json(&[
                "driver",
                "approve",
                plugin.as_ref(),
                "--name",
                "tcp",
                "--yes",
            ])?;
            Ok(format!(
                "approved tcp v{} pinned to sha256 {}…, privileges {}",
                v["plugin"]["version"].as_str().unwrap_or("?"),
                v["plugin"]["sha256"]
                    .as_str()
                    .unwrap_or("")
                    .get(..16)
                    .unwrap_or(""),
                v["plugin"]["manifest"]["privileges"]
            ))
        },
    );

    steps.run(
        "capnetd starts the approved TCP driver in its own host process",
        || {
            let drv = d.wait_driver("tcp", Duration::from_secs(20), |v| v["state"] == "running")?;
            Ok(format!(
                "driver tcp v{} running as pid {} (plugin {})",
                drv["version"].as_str().unwrap_or("?"),
                drv["pid"],
                drv["plugin"].as_str().unwrap_or("?")
            ))
        },
    );

    steps.run("a grain asks for IpNetwork; the administrator grants it; 1 MiB echoes back intact", || {
        let echo = echo.as_ref().map_err(|e| anyhow::anyhow!("echo server: {e}"))?;
        let port = echo.addr.port().to_string();
        d.start_test_grain("demo-echo", &["echo", "--port", &port, "--bytes", "1048576", "--label", "demo: talk to the echo service"])?;
        let (req, grant) = d.grant_next("tcp", &[])?;
        let r = grain_result(d, "demo-echo")?;
        if r["ok"] != true {
            bail!("echo failed: {r}");
        }
        Ok(format!(
            "request {} ({} {:?}) granted as {grant}; echo server on 127.0.0.1:{port} returned {} bytes, sha256 {}…, then EOF",
            req["id"], req["interface"].as_str().unwrap_or(""), req["label"].as_str().unwrap_or(""),
            r["bytes"], &r["sha256"].as_str().unwrap_or("")[..16]
        ))
    });

    steps.run("a grain listens through IpInterface; an outside client talks to it; dropping the handle stops the listener", || {
        let port = free_port();
        d.start_test_grain("demo-listen", &["listen", "--port", &port.to_string()])?;
        let (_, grant) = d.grant_next("tcp", &[])?;
        d.wait_log("demo-listen", &format!("LISTENING {port}"), Duration::from_secs(10))?;
        let mut c = TcpStream::connect(("127.0.0.1", port))?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut r = BufReader::new(c.try_clone()?);
        c.write_all(b"hello from outside\n")?;
        let mut line = String::new();
        r.read_line(&mut line)?;
        if line != "echo: hello from outside\n" {
            bail!("unexpected answer {line:?}");
        }
        c.write_all(b"drop\n")?;
        line.clear();
        r.read_line(&mut line)?;
        wait_refused(port, Duration::from_secs(5))?;
        c.write_all(b"quit\n")?;
        grain_result(d, "demo-listen")?;
        Ok(format!("grant {grant}: 127.0.0.1:{port} answered \"{}\", then refused new connections once the grain dropped its Handle", "echo: hello from outside"))
    });

    steps.run(
        "a request the administrator denies fails in the grain with the reason",
        || {
            d.start_test_grain(
                "demo-deny",
                &[
                    "request",
                    "--kind",
                    "network",
                    "--label",
                    "demo: wants everything",
                ],
            )?;
            let req = d.next_request()?;
            let id = req["id"].to_string();
            d.capnet_json(&["powerbox", "deny", &id, "--reason", "demo says no"])?;
            let r = grain_result(d, "demo-deny")?;
            let refused = r["refused"].as_str().unwrap_or("");
            if !refused.contains("demo says no") {
                bail!("grain saw {r}");
            }
            Ok(format!("the grain saw: {refused}"))
        },
    );

    steps.run(
        "every grain runs in its own sandbox: a hostile probe's attacks are all refused",
        || {
            let echo = echo
                .as_ref()
                .map_err(|e| anyhow::anyhow!("echo server: {e}"))?;
            let port = echo.addr.port().to_string();
            let state = d.state_dir().display().to_string();
            let pid = d.pid().to_string();
            d.start_probe(
                "demo-probe",
                &[],
                &[
                    "attacks",
                    "--state-dir",
                    &state,
                    "--supervisor-pid",
                    &pid,
                    "--host-port",
                    &port,
                ],
            )?;
            let st = d.wait_grain("demo-probe", Duration::from_secs(60))?;
            let lines: Vec<serde_json::Value> = d
                .grain_log("demo-probe")
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            let held = lines
                .iter()
                .filter(|v| v["outcome"] == "refused" || v["outcome"] == "killed")
                .count();
            let breaches: Vec<&str> = lines
                .iter()
                .filter(|v| v["outcome"] == "succeeded")
                .filter_map(|v| v["attack"].as_str())
                .filter(|a| !a.starts_with("control:") && *a != "write_tmp_is_allowed")
                .collect();
            if !breaches.is_empty() || st["exit_status"] != 0 {
                bail!("walls breached: {breaches:?} ({})", st["exit_reason"]);
            }
            let direct = lines
                .iter()
                .find(|v| v["attack"] == "connect_host_loopback")
                .and_then(|v| v["detail"].as_str())
                .unwrap_or("?");
            Ok(format!(
                "{held} attacks refused (seccomp, namespaces, read-only root, no capabilities); \
                 connecting straight to the echo server on 127.0.0.1:{port}: {direct} (the grain \
                 has its own loopback); it ran as host uid {} with {} MiB and {} tasks at most",
                st["host_uid"],
                st["limits"]["memory_bytes"].as_u64().unwrap_or(0) >> 20,
                st["limits"]["pids"]
            ))
        },
    );

    steps.run("capnetd shuts down cleanly", || {
        let out = d.capnet(&["shutdown"]);
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while d.socket().exists() {
            if Instant::now() > deadline {
                bail!("the admin socket is still there after 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok("grains and driver hosts stopped, admin socket removed".into())
    });
    drop(daemon);
    println!("\ndemo: {} passed, {} failed", steps.passed, steps.failed);
    std::process::exit(if steps.failed == 0 { 0 } else { 1 });
}
