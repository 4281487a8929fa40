//! Real peers that tests and the demo start on loopback: a test certificate authority
//! (made with rcgen at run time), an SMTP server (Debian's python3-aiosmtpd) that records
//! what it receives, and nginx with a generated configuration.
//!
//! A missing program is an error that names the Debian package to install; nothing is
//! skipped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// A certificate authority and one server certificate it signed, as PEM files.
pub struct TestCa {
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl TestCa {
    /// Makes a CA and a server certificate for `names` (DNS names or IP addresses) in a
    /// temporary directory.
    pub fn new(names: &[&str]) -> Result<Self> {
        let tmp = tempfile::Builder::new().prefix("capnet-ca-").tempdir()?;
        let mut ca = Self::in_dir(tmp.path(), names)?;
        ca._tmp = Some(tmp);
        Ok(ca)
    }

    /// Makes them in `dir` (`ca.pem`, `server.pem`, `server.key`), which the caller keeps.
    pub fn in_dir(dir: &Path, names: &[&str]) -> Result<Self> {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "capnet test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate()?)?;
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut leaf_params = rcgen::CertificateParams::new(names)?;
        leaf_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "capnet test server");
        let leaf_key = rcgen::KeyPair::generate()?;
        let leaf = leaf_params.signed_by(&leaf_key, &ca)?;
        std::fs::write(dir.join("ca.pem"), ca.pem())?;
        std::fs::write(dir.join("server.pem"), leaf.pem())?;
        std::fs::write(dir.join("server.key"), leaf_key.serialize_pem())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            _tmp: None,
        })
    }

    /// The CA certificate (give it to drivers as `extra_ca_files`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The server certificate.
    pub fn cert_file(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    /// The server's private key.
    pub fn key_file(&self) -> PathBuf {
        self.dir.join("server.key")
    }
}

/// A child process killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const SMTP_SINK: &str = r#"
import asyncio, json, ssl, sys
from aiosmtpd.smtp import SMTP

cert, key, out, listen_port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

class Recorder:
    async def handle_DATA(self, server, session, envelope):
        data = envelope.original_content or envelope.content
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        rec = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "mail_options": envelope.mail_options,
            "data": data.hex(),
            "tls": session.ssl is not None,
        }
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return "250 2.0.0 queued by the test sink"

async def main():
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Recorder(), tls_context=ctx, require_starttls=True,
                     enable_SMTPUTF8=True, decode_data=False, hostname="sink.test"),
        "127.0.0.1", listen_port)
    port = server.sockets[0].getsockname()[1]
    print("READY", port, flush=True)
    await server.serve_forever()

asyncio.run(main())
"#;

/// One message the SMTP sink received.
#[derive(Clone, Debug)]
pub struct ReceivedMail {
    /// The envelope sender.
    pub mail_from: String,
    /// The envelope recipients.
    pub rcpt_tos: Vec<String>,
    /// The MAIL FROM parameters (such as `BODY=8BITMIME`, `SMTPUTF8`).
    pub mail_options: Vec<String>,
    /// The message bytes as received.
    pub data: Vec<u8>,
    /// Whether the session was encrypted with STARTTLS.
    pub tls: bool,
}

/// An SMTP server on 127.0.0.1 (python3-aiosmtpd) that requires STARTTLS with the test
/// CA's certificate and records every message it accepts.
pub struct SmtpSink {
    _child: Guard,
    /// Its port on 127.0.0.1.
    pub port: u16,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

/// The Debian Python that has the Debian packages (aiosmtpd) installed.
const PYTHON: &str = "/usr/bin/python3";

impl SmtpSink {
    /// Starts one with the test CA's server certificate on an ephemeral port.
    pub fn start(ca: &TestCa) -> Result<Self> {
        Self::start_on(ca, 0)
    }

    /// Starts one on 127.0.0.1:`port` (0: any free port).
    pub fn start_on(ca: &TestCa, port: u16) -> Result<Self> {
        if !Path::new(PYTHON).exists() {
            bail!(
                "{PYTHON} is missing: install the Debian packages python3 and python3-aiosmtpd (make deps)"
            );
        }
        let dir = tempfile::Builder::new().prefix("capnet-smtp-").tempdir()?;
        let script = dir.path().join("sink.py");
        std::fs::write(&script, SMTP_SINK)?;
        let out = dir.path().join("received.jsonl");
        let mut child = Command::new(PYTHON)
            .arg(&script)
            .arg(ca.cert_file())
            .arg(ca.key_file())
            .arg(&out)
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the SMTP sink with /usr/bin/python3")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(port) = line
            .strip_prefix("READY ")
            .and_then(|p| p.trim().parse::<u16>().ok())
        else {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            let _ = child.kill();
            let _ = child.wait();
            let hint = if err.contains("ModuleNotFoundError") {
                "install the Debian package python3-aiosmtpd (make deps); "
            } else {
                ""
            };
            bail!("the SMTP sink did not start: {hint}{line}{err}");
        };
        Ok(Self {
            _child: Guard(child),
            port,
            out,
            _dir: dir,
        })
    }

    /// Every message received so far.
    pub fn messages(&self) -> Result<Vec<ReceivedMail>> {
        let text = match std::fs::read_to_string(&self.out) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        // A line without its newline is still being written.
        for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
            let v: serde_json::Value = serde_json::from_str(line)?;
            let strings = |k: &str| -> Vec<String> {
                v[k].as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| s.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            out.push(ReceivedMail {
                mail_from: v["mail_from"].as_str().unwrap_or("").to_string(),
                rcpt_tos: strings("rcpt_tos"),
                mail_options: strings("mail_options"),
                data: hex::decode(v["data"].as_str().unwrap_or(""))?,
                tls: v["tls"] == true,
            });
        }
        Ok(out)
    }
}

/// nginx on loopback with a generated configuration: a plain HTTP server and a TLS server
/// with the test CA's certificate, each answering `/` with `hello from HOST` for the
/// server names it is given, and a `/big` of 1 MiB.
pub struct Nginx {
    _child: Guard,
    /// The plain HTTP port on 127.0.0.1.
    pub http_port: u16,
    /// The HTTPS port on 127.0.0.1.
    pub https_port: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx for `names` (its `server_name`s), with TLS from `ca`, on free ports.
    pub fn start(ca: &TestCa, names: &[&str]) -> Result<Self> {
        Self::start_on(ca, names, crate::free_port(), crate::free_port())
    }

    /// Starts nginx on the given loopback ports.
    pub fn start_on(ca: &TestCa, names: &[&str], http_port: u16, https_port: u16) -> Result<Self> {
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .ok_or_else(|| {
                anyhow!("nginx is missing: install the Debian package nginx (make deps)")
            })?;
        for p in [http_port, https_port] {
            std::net::TcpListener::bind(("127.0.0.1", p))
                .with_context(|| format!("port 127.0.0.1:{p} for nginx is in use"))?;
        }
        let dir = tempfile::Builder::new().prefix("capnet-nginx-").tempdir()?;
        let root = dir.path().join("www");
        std::fs::create_dir_all(&root)?;
        std::fs::write(root.join("big"), vec![b'x'; 1 << 20])?;
        let names = names.join(" ");
        let d = dir.path().display();
        let config = format!(
            r#"
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000;
    server {{
        listen 127.0.0.1:{http_port};
        listen 127.0.0.1:{https_port} ssl;
        server_name {names};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {root};
        location = / {{ default_type text/plain; return 200 "hello from $host\n"; }}
        location = /big {{ default_type application/octet-stream; }}
    }}
}}
"#,
            cert = ca.cert_file().display(),
            key = ca.key_file().display(),
            root = root.display(),
        );
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config)?;
        let child = Command::new(nginx)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir.path())
            // The error log before the configuration is read, too: never /var/log.
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting nginx")?;
        let mut guard = Guard(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = |p: u16| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok();
            if up(http_port) && up(https_port) {
                break;
            }
            if let Some(st) = guard.0.try_wait()? {
                let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
                bail!("nginx exited with {st} before listening: {log}");
            }
            if Instant::now() > deadline {
                bail!("nginx did not listen on {http_port} and {https_port} within 10 s");
            }
            // nginx gives no readiness signal on stdout; poll its ports.
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            _child: guard,
            http_port,
            https_port,
            _dir: dir,
        })
    }
}
