//! Test support for capnet's end-to-end tests and the demo: start a real `capnetd` on a
//! temporary state directory, drive it with the real `capnet` CLI, and run loopback peers.
//!
//! Binaries are taken from the cargo target directory this test binary was built into
//! (`make test` builds the whole workspace first).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

pub mod grain;
pub mod peers;
pub mod proxy;

/// The directory holding the workspace's binaries and plugins (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("CAPNET_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary or plugin, failing with instructions if it was not built.
pub fn artifact(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`, which `make test` does)",
        p.display()
    );
    p
}

/// Wall-clock milliseconds since the epoch, the unit of the audit trail's `time_ms`.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A cgroup parent name no other daemon of this machine uses: tests run daemons in
/// parallel, and two daemons must never share sandbox cgroup names.
pub fn unique_cgroup_parent() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "capnet/test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// A running `capnetd` on a private temporary state directory. Stopped when dropped.
pub struct Daemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
    socket: PathBuf,
    config: PathBuf,
    cgroup_parent: String,
    args: Vec<String>,
}

impl Daemon {
    /// Starts capnetd with `config` (TOML text; `[daemon] state_dir` and `admin_socket` are
    /// added pointing into the temporary directory) and waits until it accepts admins.
    pub fn start(config: &str) -> Result<Self> {
        Self::start_with_state(|_| config.to_string())
    }

    /// Like [`Daemon::start`], with the config made by `config` from the state directory
    /// the daemon will use (for options that must name it).
    pub fn start_with_state(config: impl FnOnce(&Path) -> String) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("capnet-test-").tempdir()?;
        let state = dir.path().join("state");
        let config = config(&state);
        let config = config.as_str();
        let socket = dir.path().join("admin.sock");
        let config_path = dir.path().join("capnet.toml");
        let cgroup_parent = unique_cgroup_parent();
        let daemon_keys = format!(
            "[daemon]\nstate_dir = {:?}\nadmin_socket = {:?}\ncgroup_parent = {cgroup_parent:?}",
            state.display().to_string(),
            socket.display().to_string()
        );
        let text = if config.contains("[daemon]") {
            config.replacen("[daemon]", &daemon_keys, 1)
        } else {
            format!("{daemon_keys}\n\n{config}")
        };
        std::fs::write(&config_path, text)?;
        Self::start_with(dir, config_path, socket, cgroup_parent, &[])
    }

    /// Starts capnetd with a copy of an existing config file (approvals are written into the
    /// copy, never into the original), overriding state dir and socket.
    pub fn start_file(config: &Path) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("capnet-demo-").tempdir()?;
        let copy = dir.path().join("capnet.toml");
        std::fs::copy(config, &copy).with_context(|| format!("copying {}", config.display()))?;
        let config = copy.as_path();
        let state = dir.path().join("state");
        let socket = dir.path().join("admin.sock");
        let cgroup_parent = unique_cgroup_parent();
        let args = [
            "--state-dir".to_string(),
            state.display().to_string(),
            "--socket".to_string(),
            socket.display().to_string(),
            "--cgroup-parent".to_string(),
            cgroup_parent.clone(),
        ];
        Self::start_with(dir, config.to_path_buf(), socket, cgroup_parent, &args)
    }

    fn start_with(
        dir: tempfile::TempDir,
        config: PathBuf,
        socket: PathBuf,
        cgroup_parent: String,
        extra: &[String],
    ) -> Result<Self> {
        let mut d = Self {
            dir,
            child: None,
            socket,
            config,
            cgroup_parent,
            args: extra.to_vec(),
        };
        d.spawn()?;
        Ok(d)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("capnetd.log"))?;
        let child = Command::new(artifact("capnetd"))
            .arg("--config")
            .arg(&self.config)
            .args(&self.args)
            .env(
                "CAPNET_LOG",
                std::env::var("CAPNET_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting capnetd")?;
        self.child = Some(child);
        // Generous: a start normally takes well under a second, but a loaded CI machine is
        // not a reason to fail a test about something else; an exit is reported at once.
        self.wait_ready(Duration::from_secs(60))
    }

    /// Starts capnetd again on the same state directory and config (after [`Daemon::kill9`]
    /// or [`Daemon::stop`]).
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("capnetd is still running; stop or kill it first");
        }
        self.spawn()
    }

    /// The state database file.
    pub fn state_db(&self) -> PathBuf {
        self.dir.path().join("state").join("state.db")
    }

    /// A grain's log file (readable while the daemon is down).
    pub fn grain_log_file(&self, id: &str) -> PathBuf {
        self.dir
            .path()
            .join("state")
            .join("grains")
            .join(id)
            .join("log")
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!(
                    "capnetd exited with {status} before it was ready; its log ends:\n{}",
                    self.log_tail(40)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "capnetd was not ready within {timeout:?}; its log ends:\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("capnetd.log")).unwrap_or_default()
    }

    /// The last `n` lines of the daemon's log (a failure message that quotes the whole
    /// log of a long test would push the cause out of view).
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The daemon's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The temporary directory (state lives in `state/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The admin socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The name of the daemon's cgroup parent (unique to this daemon).
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// The config file in use.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Runs `capnet --socket S ARGS`.
    pub fn capnet(&self, args: &[&str]) -> Output {
        Command::new(artifact("capnet"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running capnet {args:?}: {e}"))
    }

    /// Runs `capnet --json ARGS`, requires success, and parses the output.
    pub fn capnet_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.capnet(&all);
        if !out.status.success() {
            bail!(
                "capnet {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "capnet {args:?} printed {:?}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// The audit records `capnet --json audit ARGS` prints (such as `--kind revoke`).
    pub fn audit(&self, args: &[&str]) -> Result<Vec<Value>> {
        let mut all = vec!["--json", "audit"];
        all.extend_from_slice(args);
        let out = self.capnet(&all);
        if !out.status.success() {
            bail!(
                "capnet audit {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// The time the audit trail recorded the revocation of `grant`, in ms since the epoch.
    pub fn revoked_at_ms(&self, grant: &str) -> Result<u64> {
        let revokes = self.audit(&["--kind", "revoke"])?;
        revokes
            .iter()
            .find(|r| r["grant"] == grant)
            .and_then(|r| r["time_ms"].as_u64())
            .with_context(|| format!("no revoke record for {grant}: {revokes:?}"))
    }

    /// Waits for the next powerbox request and returns it.
    pub fn next_request(&self) -> Result<Value> {
        self.capnet_json(&["powerbox", "wait", "--timeout-ms", "20000"])
    }

    /// Waits for the next request and grants it from `driver` with extra CLI arguments.
    pub fn grant_next(&self, driver: &str, extra: &[&str]) -> Result<(Value, String)> {
        let req = self.next_request()?;
        let id = req["id"].to_string();
        let mut args = vec!["powerbox", "grant", &id, "--driver", driver];
        args.extend_from_slice(extra);
        let granted = self.capnet_json(&args)?;
        let grant = granted["grant"].as_str().unwrap_or("").to_string();
        Ok((req, grant))
    }

    /// Starts an ad-hoc grain running `capnet-test-grain ARGS`.
    pub fn start_test_grain(&self, id: &str, args: &[&str]) -> Result<Value> {
        let grain = artifact("capnet-test-grain");
        let grain = grain.to_string_lossy();
        let mut all = vec!["grain", "start", "--id", id, "--", grain.as_ref()];
        all.extend_from_slice(args);
        self.capnet_json(&all)
    }

    /// Starts an ad-hoc grain running `capnet-probe ARGS` with extra `capnet grain
    /// start` flags (such as `--pids 32`).
    pub fn start_probe(&self, id: &str, flags: &[&str], args: &[&str]) -> Result<Value> {
        let probe = artifact("capnet-probe");
        let probe = probe.to_string_lossy();
        let mut all = vec!["grain", "start", "--id", id];
        all.extend_from_slice(flags);
        all.extend_from_slice(&["--", probe.as_ref()]);
        all.extend_from_slice(args);
        self.capnet_json(&all)
    }

    /// `capnet --json grain status ID`.
    pub fn grain_status(&self, id: &str) -> Result<Value> {
        self.capnet_json(&["grain", "status", id])
    }

    /// Waits for a grain to exit and returns its status.
    pub fn wait_grain(&self, id: &str, timeout: Duration) -> Result<Value> {
        let ms = timeout.as_millis().to_string();
        self.capnet_json(&["grain", "wait", id, "--timeout-ms", &ms])
    }

    /// A grain's log.
    pub fn grain_log(&self, id: &str) -> String {
        String::from_utf8_lossy(&self.capnet(&["grain", "logs", id]).stdout).into_owned()
    }

    /// Waits until the grain's log contains `needle`.
    pub fn wait_log(&self, id: &str, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.grain_log(id);
            if log.contains(needle) {
                return Ok(log);
            }
            if Instant::now() > deadline {
                bail!("grain {id} did not log {needle:?} within {timeout:?}; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until capnetd's own log contains `needle`.
    pub fn wait_daemon_log(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return Ok(log);
            }
            if Instant::now() > deadline {
                bail!("capnetd did not log {needle:?} within {timeout:?}; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The driver list.
    pub fn drivers(&self) -> Result<Vec<Value>> {
        let v = self.capnet_json(&["driver", "list"])?;
        v.as_array()
            .cloned()
            .ok_or_else(|| anyhow!("driver list is not an array: {v}"))
    }

    /// One driver's entry.
    pub fn driver(&self, name: &str) -> Result<Value> {
        self.drivers()?
            .into_iter()
            .find(|d| d["name"] == name)
            .ok_or_else(|| anyhow!("no driver {name} in the list"))
    }

    /// Waits until `check` holds for the driver's entry.
    pub fn wait_driver(
        &self,
        name: &str,
        timeout: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let d = self.driver(name)?;
            if check(&d) {
                return Ok(d);
            }
            if Instant::now() > deadline {
                bail!("driver {name} did not reach the expected state within {timeout:?}: {d}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Stops the daemon with SIGTERM and waits for it.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if c.try_wait()?.is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    bail!("capnetd did not stop within 20s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Kills the daemon with SIGKILL (no cleanup).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// What a plugin says it is, as `capnet-driver-host --inspect` prints it.
pub fn inspect_plugin(path: &Path) -> Result<Value> {
    let out = Command::new(artifact("capnet-driver-host"))
        .arg("--inspect")
        .arg(path)
        .output()
        .context("running capnet-driver-host --inspect")?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("inspect printed {:?}", String::from_utf8_lossy(&out.stdout)))?;
    Ok(v)
}

/// Hex SHA-256 of a file.
pub fn file_sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    grain::sha256_hex(&bytes)
}

/// The approval keys (`sha256`, `privileges`) for a plugin, approving exactly what its
/// manifest asks for.
pub fn approval(path: &Path) -> String {
    let v = inspect_plugin(path).unwrap_or_else(|e| panic!("inspecting {}: {e:#}", path.display()));
    let privileges = v["identity"]["manifest"]["privileges"]
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(_, v)| v.as_bool() == Some(true))
                .map(|(k, _)| format!("{k} = true"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    format!(
        "sha256 = {:?}\nprivileges = {{ {privileges} }}",
        file_sha256(path)
    )
}

/// The TOML table of an approved driver from this workspace's build, with loopback allowed.
pub fn driver_config(name: &str, plugin_file: &str, options: &str) -> String {
    let path = artifact(plugin_file);
    format!(
        r#"
[drivers.{name}]
plugin = {plugin:?}
{approval}
listen_addresses = ["127.0.0.1"]

[[drivers.{name}.rules]]
action = "allow"
cidrs = ["127.0.0.0/8", "::1/128"]
direction = "both"
label = "tests: loopback only"

[drivers.{name}.options]
{options}
"#,
        plugin = path.display().to_string(),
        approval = approval(&path),
    )
}

/// A TCP echo server on 127.0.0.1 (threads; one per connection). Echoes until EOF, then
/// half-closes back.
pub struct EchoServer {
    /// Its address.
    pub addr: SocketAddr,
}

impl EchoServer {
    /// Starts one.
    pub fn start() -> Result<Self> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut r = s;
                    let Ok(mut w) = r.try_clone() else { return };
                    let mut buf = vec![0u8; 256 * 1024];
                    loop {
                        match r.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if w.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = w.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Ok(Self { addr })
    }
}

/// Connects to `127.0.0.1:port` until it is refused (the listener is gone) or `timeout`.
pub fn wait_refused(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(()),
            _ if Instant::now() > deadline => {
                bail!("port {port} still accepts connections after {timeout:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; the caller binds it next).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A UDP echo server (one thread) that answers each datagram with `from PORT: PAYLOAD`,
/// where PORT is the sender's source port, so tests can see the NAT-like mapping.
pub struct UdpEchoServer {
    /// Its address.
    pub addr: SocketAddr,
}

impl UdpEchoServer {
    /// Starts one on `bind` (such as `127.0.0.1:0` or `[::1]:0`).
    pub fn start(bind: &str) -> Result<Self> {
        let s = std::net::UdpSocket::bind(bind)?;
        let addr = s.local_addr()?;
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, peer)) = s.recv_from(&mut buf) {
                let mut reply = format!("from {}: ", peer.port()).into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = s.send_to(&reply, peer);
            }
        });
        Ok(Self { addr })
    }
}

/// The last JSON line a grain printed whose `ok` field is present.
pub fn grain_result(log: &str) -> Option<Value> {
    log.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v.get("ok").is_some())
}
