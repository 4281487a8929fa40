//! The administrator's TOML configuration.
//!
//! One file (by default `/etc/capnet/capnet.toml`) describes the daemon, the approved
//! drivers and the grains. Errors name the file, the line and column, and what was
//! expected. Relative paths are resolved against the file's directory, except plugin
//! paths, which are resolved against `daemon.plugin_dir` (by default the directory that
//! holds the `capnetd` executable, where `cargo build` puts the shipped drivers).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use capnet_driver_api::Privileges;
use capnet_driver_api::policy::RuleConfig;
use serde::Deserialize;

/// Loading the configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or does not match the expected shape.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// What is wrong and what was expected.
        message: String,
    },
    /// A value is well-formed TOML but not acceptable.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Daemon settings.
    #[serde(default)]
    pub daemon: DaemonConfig,
    /// Approved drivers, by instance name.
    #[serde(default)]
    pub drivers: BTreeMap<String, DriverConfig>,
    /// Grains, by id.
    #[serde(default)]
    pub grains: BTreeMap<String, GrainConfig>,
    /// Powerbox rules: requests answered in advance.
    #[serde(default)]
    pub powerbox: PowerboxConfig,
    /// Trusted plugin authors.
    #[serde(default)]
    pub trust: TrustConfig,
    /// The file this was read from (set by [`Config::load`]).
    #[serde(skip)]
    pub path: PathBuf,
}

/// `[daemon]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Where state lives (grain data, logs, the database).
    pub state_dir: PathBuf,
    /// The administrator's Unix socket. Default `<state_dir>/admin.sock`.
    pub admin_socket: Option<PathBuf>,
    /// Where relative plugin paths are looked up. Default: the directory of `capnetd`.
    pub plugin_dir: Option<PathBuf>,
    /// The driver host executable. Default: `capnet-driver-host` beside `capnetd`.
    pub driver_host: Option<PathBuf>,
    /// How long a powerbox request waits for an answer before it fails, in seconds.
    pub request_timeout_secs: u64,
    /// Grace period between SIGTERM and SIGKILL when stopping a grain, in milliseconds.
    pub stop_grace_ms: u64,
    /// Restarts of a crashing driver allowed within `crash_window_secs` before it is
    /// marked failed.
    pub max_driver_crashes: u32,
    /// The window for `max_driver_crashes`, in seconds.
    pub crash_window_secs: u64,
    /// Audit records older than this many days are deleted.
    pub audit_retention_days: u64,
    /// At most this many audit records are kept (the oldest go first).
    pub audit_max_records: u64,
    /// How often each running driver is asked for its health, in milliseconds.
    pub health_interval_ms: u64,
    /// How long a driver may take to answer a health check before it is killed and
    /// restarted, in milliseconds.
    pub health_timeout_ms: u64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/capnet"),
            admin_socket: None,
            plugin_dir: None,
            driver_host: None,
            request_timeout_secs: 600,
            stop_grace_ms: 5000,
            max_driver_crashes: 5,
            crash_window_secs: 60,
            audit_retention_days: 90,
            audit_max_records: 1_000_000,
            health_interval_ms: 5_000,
            health_timeout_ms: 2_000,
        }
    }
}

impl DaemonConfig {
    /// The admin socket path.
    pub fn admin_socket(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("admin.sock"))
    }

    /// How long powerbox requests wait.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
}

/// `[drivers.NAME]`: one approved driver instance.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriverConfig {
    /// The plugin file (`.so`).
    pub plugin: PathBuf,
    /// The approval: the SHA-256 (hex) of the exact plugin file approved. Without it the
    /// driver is refused as unapproved (`capnet driver approve` writes it).
    #[serde(default)]
    pub sha256: Option<String>,
    /// The ed25519 key (hex) that had signed the approved plugin, if it was signed;
    /// `capnet driver upgrade` tells whether a new version is signed by the same key.
    #[serde(default)]
    pub signer_key: Option<String>,
    /// Privileges the administrator approved (written with the approval). A plugin asking
    /// for more is refused; only these are ever given.
    #[serde(default)]
    pub privileges: Option<Privileges>,
    /// Local addresses listeners bind to.
    #[serde(default = "default_listen")]
    pub listen_addresses: Vec<String>,
    /// Driver-wide policy rules, applied under every grant of this driver.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// The driver's own options (see its documentation) and the standard ones.
    #[serde(default)]
    pub options: toml::Table,
}

fn default_listen() -> Vec<String> {
    vec!["0.0.0.0".into()]
}

/// `[trust]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// Plugin authors whose ed25519 keys (hex) you trust, by name. `capnet driver inspect`
    /// and `upgrade` name the author of a plugin signed by one of these keys.
    #[serde(default)]
    pub authors: BTreeMap<String, String>,
}

/// `[powerbox]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerboxConfig {
    /// Rules answering kinds of requests in advance, tried in order; the first match
    /// answers. Requests no rule matches wait for an administrator.
    #[serde(default)]
    pub rules: Vec<GrantRuleConfig>,
}

/// `[[powerbox.rules]]`: grant (or deny) matching requests without asking.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRuleConfig {
    /// The rule's name, shown in the audit trail as the grant's source.
    pub name: String,
    /// The grain it applies to, or "*" for every grain.
    #[serde(default = "any_grain")]
    pub grain: String,
    /// The interface asked for: IpNetwork, IpInterface, IpRemoteHost, TcpPort or UdpPort.
    pub interface: String,
    /// For IpRemoteHost/TcpPort/UdpPort: the host granted. A request naming another host
    /// does not match; a request naming none gets this one.
    #[serde(default)]
    pub host: Option<String>,
    /// For TcpPort/UdpPort: the port granted, matched like `host`.
    #[serde(default)]
    pub port: Option<u16>,
    /// For IpNetwork: only requests with this encryption ("none" or "tls") match.
    #[serde(default)]
    pub encryption: Option<String>,
    /// "grant" (default) or "deny".
    #[serde(default = "grant_action")]
    pub action: String,
    /// The driver serving granted requests (required for "grant").
    #[serde(default)]
    pub driver: Option<String>,
    /// Extra policy rules for the grant.
    #[serde(default)]
    pub policy: Vec<RuleConfig>,
    /// Per-grant limits.
    #[serde(default)]
    pub limits: capnet_driver_api::Limits,
}

fn any_grain() -> String {
    "*".into()
}

fn grant_action() -> String {
    "grant".into()
}

/// `[grains.ID]`: a grain the administrator can start by name.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrainConfig {
    /// Program and arguments.
    pub command: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Run the command under capnet-bridge, so that unmodified programs reach the network
    /// through the grain's grants: `true` for the bridge's defaults, or a list of its
    /// arguments (such as `["--grant", "network"]`).
    #[serde(default)]
    pub bridge: Option<BridgeSetting>,
}

/// `[grains.ID] bridge`: `true`/`false`, or the bridge's arguments.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum BridgeSetting {
    /// On with defaults, or off.
    On(bool),
    /// On with these arguments.
    Args(Vec<String>),
}

impl GrainConfig {
    /// The command to run: `command`, or `bridge_exe [args…] -- command…` when the grain
    /// asks for the bridge.
    pub fn command_line(&self, bridge_exe: &Path) -> Vec<String> {
        let args = match &self.bridge {
            None | Some(BridgeSetting::On(false)) => return self.command.clone(),
            Some(BridgeSetting::On(true)) => Vec::new(),
            Some(BridgeSetting::Args(a)) => a.clone(),
        };
        let mut c = vec![bridge_exe.display().to_string()];
        c.extend(args);
        c.push("--".into());
        c.extend(self.command.iter().cloned());
        c
    }
}

/// The configuration in force, replaceable by a reload. Cheap to clone.
#[derive(Clone)]
pub struct SharedConfig(std::rc::Rc<std::cell::RefCell<std::rc::Rc<Config>>>);

impl SharedConfig {
    /// Wraps the initial configuration.
    pub fn new(config: Config) -> Self {
        Self(std::rc::Rc::new(std::cell::RefCell::new(std::rc::Rc::new(
            config,
        ))))
    }

    /// The configuration now in force.
    pub fn get(&self) -> std::rc::Rc<Config> {
        self.0.borrow().clone()
    }

    /// Replaces it (after a successful reload).
    pub fn set(&self, config: Config) {
        *self.0.borrow_mut() = std::rc::Rc::new(config);
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses config text as if read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        config.path = path.to_path_buf();
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut config.daemon.state_dir);
        if let Some(p) = config.daemon.admin_socket.as_mut() {
            abs(p);
        }
        if let Some(p) = config.daemon.plugin_dir.as_mut() {
            abs(p);
        }
        if let Some(p) = config.daemon.driver_host.as_mut() {
            abs(p);
        }
        config.validate()?;
        Ok(config)
    }

    fn invalid(&self, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            message,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (name, d) in &self.drivers {
            if !valid_name(name) {
                return Err(self.invalid(format!(
                    "driver name {name:?} must be 1-32 lower-case letters, digits or '-'"
                )));
            }
            if let Some(h) = &d.sha256
                && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(self.invalid(format!(
                    "drivers.{name}.sha256 must be 64 hexadecimal digits (as `capnet driver inspect` prints)"
                )));
            }
            for a in &d.listen_addresses {
                if a.parse::<std::net::IpAddr>().is_err() {
                    return Err(self.invalid(format!(
                        "drivers.{name}.listen_addresses: {a:?} is not an IP address"
                    )));
                }
            }
            for (i, r) in d.rules.iter().enumerate() {
                capnet_driver_api::policy::Rule::from_config(r)
                    .map_err(|e| self.invalid(format!("drivers.{name}.rules[{i}]: {e}")))?;
            }
        }
        for (author, key) in &self.trust.authors {
            if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(self.invalid(format!(
                    "trust.authors.{author}: the key must be 64 hexadecimal digits (an ed25519 \
                     public key as `capnet sign keygen` prints it)"
                )));
            }
        }
        for (i, r) in self.powerbox.rules.iter().enumerate() {
            let at = format!("powerbox.rules[{i}] ({})", r.name);
            if ![
                "IpNetwork",
                "IpInterface",
                "IpRemoteHost",
                "TcpPort",
                "UdpPort",
            ]
            .contains(&r.interface.as_str())
            {
                return Err(self.invalid(format!(
                    "{at}: interface {:?} must be IpNetwork, IpInterface, IpRemoteHost, TcpPort or UdpPort",
                    r.interface
                )));
            }
            match r.action.as_str() {
                "deny" => {}
                "grant" => match &r.driver {
                    Some(d) if self.drivers.contains_key(d) => {}
                    Some(d) => {
                        return Err(self.invalid(format!(
                            "{at}: driver {d:?} is not configured in [drivers]"
                        )));
                    }
                    None => {
                        return Err(self.invalid(format!("{at}: a granting rule needs a driver")));
                    }
                },
                other => {
                    return Err(self.invalid(format!(
                        "{at}: action {other:?} must be \"grant\" or \"deny\""
                    )));
                }
            }
            if let Some(e) = &r.encryption
                && e != "none"
                && e != "tls"
            {
                return Err(self.invalid(format!("{at}: encryption {e:?} must be none or tls")));
            }
            for (j, rule) in r.policy.iter().enumerate() {
                capnet_driver_api::policy::Rule::from_config(rule)
                    .map_err(|e| self.invalid(format!("{at}.policy[{j}]: {e}")))?;
            }
        }
        for (id, g) in &self.grains {
            if !valid_name(id) {
                return Err(self.invalid(format!(
                    "grain id {id:?} must be 1-32 lower-case letters, digits or '-'"
                )));
            }
            if g.command.is_empty() {
                return Err(self.invalid(format!(
                    "grains.{id}.command is empty: give the program and its arguments"
                )));
            }
        }
        Ok(())
    }

    /// The directory relative plugin paths are resolved against.
    pub fn plugin_dir(&self) -> PathBuf {
        self.daemon.plugin_dir.clone().unwrap_or_else(exe_dir)
    }

    /// The absolute plugin path of a driver.
    pub fn plugin_path(&self, driver: &DriverConfig) -> PathBuf {
        if driver.plugin.is_absolute() {
            driver.plugin.clone()
        } else {
            self.plugin_dir().join(&driver.plugin)
        }
    }

    /// The capnet-bridge executable for `[grains.ID] bridge` (beside `capnetd`).
    pub fn bridge_exe(&self) -> PathBuf {
        exe_dir().join("capnet-bridge")
    }

    /// The driver host executable.
    pub fn driver_host(&self) -> PathBuf {
        self.daemon
            .driver_host
            .clone()
            .unwrap_or_else(|| exe_dir().join("capnet-driver-host"))
    }
}

/// The directory holding the running executable.
pub fn exe_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Names of drivers and grains: 1-32 of `[a-z0-9-]`, not starting with '-'.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A syntax error names the file, line and column.
    #[test]
    fn parse_errors_have_line_and_column() {
        let text = "[daemon]\nstate_dir = \"/tmp/x\"\nrequest_timeout_secs = \"ten\"\n";
        let err = Config::parse(text, Path::new("/etc/capnet/capnet.toml")).expect_err("bad");
        let msg = err.to_string();
        assert!(msg.starts_with("/etc/capnet/capnet.toml:3:"), "{msg}");
    }

    /// Unknown keys are errors, not silently ignored.
    #[test]
    fn unknown_keys_are_refused() {
        let err =
            Config::parse("[daemon]\nstate_dri = \"/x\"\n", Path::new("c.toml")).expect_err("typo");
        assert!(err.to_string().contains("state_dri"), "{err}");
    }

    /// Relative paths are resolved against the config file's directory.
    #[test]
    fn relative_paths_follow_the_file() {
        let c = Config::parse(
            "[daemon]\nstate_dir = \"state\"\n",
            Path::new("/etc/capnet/c.toml"),
        )
        .expect("ok");
        assert_eq!(c.daemon.state_dir, PathBuf::from("/etc/capnet/state"));
        assert_eq!(
            c.daemon.admin_socket(),
            PathBuf::from("/etc/capnet/state/admin.sock")
        );
    }

    /// A bad rule is refused at load time with its position in the file or its path in
    /// the config.
    #[test]
    fn bad_rules_are_refused() {
        let text = "[drivers.tcp]\nplugin = \"x.so\"\n[[drivers.tcp.rules]]\naction = \"maybe\"\n";
        let err = Config::parse(text, Path::new("c.toml")).expect_err("bad action");
        assert!(err.to_string().starts_with("c.toml:4:"), "{err}");
        assert!(err.to_string().contains("maybe"), "{err}");
        let text = "[drivers.tcp]\nplugin = \"x.so\"\n[[drivers.tcp.rules]]\naction = \"allow\"\ncidrs = [\"10.0.0.0/99\"]\n";
        let err = Config::parse(text, Path::new("c.toml")).expect_err("bad cidr");
        assert!(err.to_string().contains("drivers.tcp.rules[0]"), "{err}");
        assert!(err.to_string().contains("10.0.0.0/99"), "{err}");
    }

    /// `bridge = true` wraps the grain's command in capnet-bridge, a list passes the
    /// bridge its arguments, and no key or `false` leaves the command alone.
    #[test]
    fn bridge_key_wraps_the_command() {
        let c = Config::parse(
            "[grains.a]\ncommand = [\"app\", \"-v\"]\nbridge = true\n\
             [grains.b]\ncommand = [\"app\"]\nbridge = [\"--grant\", \"network\"]\n\
             [grains.c]\ncommand = [\"app\"]\nbridge = false\n",
            Path::new("/etc/capnet/capnet.toml"),
        )
        .expect("parse");
        let exe = Path::new("/usr/bin/capnet-bridge");
        assert_eq!(
            c.grains["a"].command_line(exe),
            ["/usr/bin/capnet-bridge", "--", "app", "-v"]
        );
        assert_eq!(
            c.grains["b"].command_line(exe),
            ["/usr/bin/capnet-bridge", "--grant", "network", "--", "app"]
        );
        assert_eq!(c.grains["c"].command_line(exe), ["app"]);
    }
}
