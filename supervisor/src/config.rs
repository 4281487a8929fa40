//! The administrator's TOML configuration.
//!
//! One file (by default `/etc/capnet/capnet.toml`) describes the daemon, the approved
//! drivers and the grains. Errors name the file, the line and column, and what was
//! expected. Relative paths are resolved against the file's directory, except plugin
//! paths, which are resolved against `daemon.plugin_dir` (by default the directory that
//! holds the `capnetd` executable, where `cargo build` puts the shipped drivers).

use std::collections::BTreeMap;
use std::num::NonZeroU64;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use capnet_driver_api::Privileges;
use capnet_driver_api::policy::RuleConfig;
use serde::Deserialize;

use crate::sandbox;

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
    /// Grains, by id (`[grains.ID]`), and their defaults (`[grains.defaults]`).
    #[serde(default)]
    pub grains: GrainsSection,
    /// Powerbox rules: requests answered in advance.
    #[serde(default)]
    pub powerbox: PowerboxConfig,
    /// Trusted plugin authors.
    #[serde(default)]
    pub trust: TrustConfig,
    /// The file this was read from (set by [`Config::load`]).
    #[serde(skip)]
    pub path: PathBuf,
    /// `[daemon]` values given on capnetd's command line, which win over the file's (a
    /// reload applies them again).
    #[serde(skip)]
    pub overrides: DaemonOverrides,
}

/// `[daemon]` values given on capnetd's command line.
#[derive(Clone, Debug, Default)]
pub struct DaemonOverrides {
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--socket`.
    pub admin_socket: Option<PathBuf>,
    /// `--cgroup-parent`.
    pub cgroup_parent: Option<String>,
}

impl Config {
    /// Makes `overrides` win over the file's `[daemon]` values, now and on every reload.
    pub fn set_overrides(&mut self, overrides: DaemonOverrides) {
        let d = &mut self.daemon;
        if let Some(v) = &overrides.state_dir {
            d.state_dir = v.clone();
        }
        if let Some(v) = &overrides.admin_socket {
            d.admin_socket = Some(v.clone());
        }
        if let Some(v) = &overrides.cgroup_parent {
            d.cgroup_parent = v.clone();
        }
        self.overrides = overrides;
    }
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
    /// The sandbox setup helper. Default: `capnet-sandbox` beside `capnetd`.
    pub sandbox_helper: Option<PathBuf>,
    /// Name of the cgroup capnet creates beneath its own (per controller on cgroup v1)
    /// to hold one cgroup per sandbox.
    pub cgroup_parent: String,
    /// First host uid/gid of the range sandboxes map their uid/gid 1000 to.
    pub sandbox_uid_base: u32,
    /// Size of that range: how many grains (each keeps its id) plus running driver hosts
    /// the daemon can have.
    pub sandbox_uid_count: u32,
}

impl DaemonConfig {
    /// The `[daemon]` keys that differ between `self` and `fresh` and that only take effect
    /// at start (every key but `plugin_dir`, which a reload applies).
    pub fn restart_only_changes(&self, fresh: &DaemonConfig) -> Vec<&'static str> {
        let mut changed = Vec::new();
        macro_rules! compare {
            ($($field:ident),* $(,)?) => {
                // Destructured so that a new field cannot be forgotten here.
                let DaemonConfig { plugin_dir: _, $($field: _),* } = fresh;
                $(if self.$field != fresh.$field {
                    changed.push(stringify!($field));
                })*
            };
        }
        compare!(
            state_dir,
            admin_socket,
            driver_host,
            request_timeout_secs,
            stop_grace_ms,
            max_driver_crashes,
            crash_window_secs,
            audit_retention_days,
            audit_max_records,
            health_interval_ms,
            health_timeout_ms,
            sandbox_helper,
            cgroup_parent,
            sandbox_uid_base,
            sandbox_uid_count,
        );
        changed
    }
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
            sandbox_helper: None,
            cgroup_parent: "capnet".into(),
            sandbox_uid_base: 100_000,
            sandbox_uid_count: 65_536,
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
    /// Memory limit of the driver host's sandbox.
    #[serde(default)]
    pub memory: Option<ByteSize>,
    /// Task (process and thread) limit of the driver host.
    #[serde(default)]
    pub pids: Option<NonZeroU64>,
    /// CPU quota of the driver host, in cores (0 = unlimited).
    #[serde(default)]
    pub cpu: Option<Cpu>,
    /// Open-file limit of the driver host (each proxied connection needs descriptors).
    #[serde(default)]
    pub nofile: Option<NonZeroU64>,
}

impl DriverConfig {
    /// The driver host's limits: the built-in driver defaults with this table's keys.
    pub fn limits(&self) -> SandboxLimits {
        SandboxLimits::DRIVER_DEFAULT.with(&LimitOverrides {
            memory_bytes: self.memory.map(|m| m.0),
            pids: self.pids.map(NonZeroU64::get),
            cpu_millis: self.cpu.map(|c| c.0),
            nofile: self.nofile.map(NonZeroU64::get),
            ..LimitOverrides::default()
        })
    }
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
    /// Program and arguments. A relative program is relative to the app tree (`/app`);
    /// an absolute one is a path inside the sandbox (e.g. `/usr/bin/python3`).
    pub command: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The app tree: a host directory mounted read-only at `/app`.
    #[serde(default)]
    pub app: Option<PathBuf>,
    /// Bind the host's `/usr`, `/lib`, `/lib64` and `/bin` read-only (default: the
    /// `[grains.defaults]` value, itself true by default).
    #[serde(default)]
    pub system_binds: Option<bool>,
    /// Memory limit (e.g. `"512MiB"`).
    #[serde(default)]
    pub memory: Option<ByteSize>,
    /// Task (process and thread) limit.
    #[serde(default)]
    pub pids: Option<NonZeroU64>,
    /// CPU quota in cores (`0.5`, `2`; 0 = unlimited).
    #[serde(default)]
    pub cpu: Option<Cpu>,
    /// Size of the `/tmp` (and `/dev/shm`) tmpfs.
    #[serde(default)]
    pub tmp: Option<ByteSize>,
    /// Open-file limit (`RLIMIT_NOFILE`).
    #[serde(default)]
    pub nofile: Option<NonZeroU64>,
    /// Largest file the grain may write (`RLIMIT_FSIZE`).
    #[serde(default)]
    pub fsize: Option<ByteSize>,
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
    /// The bridge's arguments if the grain asks to run under capnet-bridge.
    pub fn bridge_args(&self) -> Option<Vec<String>> {
        match &self.bridge {
            None | Some(BridgeSetting::On(false)) => None,
            Some(BridgeSetting::On(true)) => Some(Vec::new()),
            Some(BridgeSetting::Args(a)) => Some(a.clone()),
        }
    }

    /// The command to run: `command`, or `bridge_exe [args…] -- command…` when the grain
    /// asks for the bridge.
    pub fn command_line(&self, bridge_exe: &Path) -> Vec<String> {
        let Some(args) = self.bridge_args() else {
            return self.command.clone();
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

impl GrainConfig {
    /// The limits this table sets.
    pub fn overrides(&self) -> LimitOverrides {
        LimitOverrides {
            memory_bytes: self.memory.map(|m| m.0),
            pids: self.pids.map(NonZeroU64::get),
            cpu_millis: self.cpu.map(|c| c.0),
            tmp_bytes: self.tmp.map(|m| m.0),
            nofile: self.nofile.map(NonZeroU64::get),
            fsize_bytes: self.fsize.map(|m| m.0),
        }
    }
}

/// `[grains.defaults]`: limits and binds for every grain that does not set its own.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrainDefaults {
    /// Bind the host's `/usr`, `/lib`, `/lib64` and `/bin` read-only (default true).
    #[serde(default)]
    pub system_binds: Option<bool>,
    /// Memory limit (default 512 MiB).
    #[serde(default)]
    pub memory: Option<ByteSize>,
    /// Task limit (default 256).
    #[serde(default)]
    pub pids: Option<NonZeroU64>,
    /// CPU quota in cores (default 1).
    #[serde(default)]
    pub cpu: Option<Cpu>,
    /// `/tmp` size (default 64 MiB).
    #[serde(default)]
    pub tmp: Option<ByteSize>,
    /// Open-file limit (default 1024).
    #[serde(default)]
    pub nofile: Option<NonZeroU64>,
    /// Largest writable file (default 1 GiB).
    #[serde(default)]
    pub fsize: Option<ByteSize>,
}

impl GrainDefaults {
    /// The limits this table sets.
    pub fn overrides(&self) -> LimitOverrides {
        LimitOverrides {
            memory_bytes: self.memory.map(|m| m.0),
            pids: self.pids.map(NonZeroU64::get),
            cpu_millis: self.cpu.map(|c| c.0),
            tmp_bytes: self.tmp.map(|m| m.0),
            nofile: self.nofile.map(NonZeroU64::get),
            fsize_bytes: self.fsize.map(|m| m.0),
        }
    }
}

/// The `[grains]` section: `[grains.defaults]` and one `[grains.ID]` per grain (so
/// `defaults` cannot be a grain id). Dereferences to the map of grains.
#[derive(Clone, Debug, Default)]
pub struct GrainsSection {
    /// `[grains.defaults]`.
    pub defaults: GrainDefaults,
    /// `[grains.ID]` tables.
    pub by_id: BTreeMap<String, GrainConfig>,
}

impl std::ops::Deref for GrainsSection {
    type Target = BTreeMap<String, GrainConfig>;
    fn deref(&self) -> &Self::Target {
        &self.by_id
    }
}

impl<'de> Deserialize<'de> for GrainsSection {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = GrainsSection;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a table of [grains.ID] tables and an optional [grains.defaults]")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = GrainsSection::default();
                while let Some(key) = map.next_key::<String>()? {
                    if key == "defaults" {
                        out.defaults = map.next_value()?;
                    } else {
                        let g: GrainConfig = map.next_value()?;
                        out.by_id.insert(key, g);
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

/// Resolved resource limits of one sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SandboxLimits {
    /// Memory limit in bytes (swap included where the kernel accounts it).
    pub memory_bytes: u64,
    /// Tasks (processes and threads) of the app.
    pub pids: u64,
    /// CPU quota in thousandths of a core (0 = unlimited).
    pub cpu_millis: u64,
    /// Size of `/tmp` and `/dev/shm`.
    pub tmp_bytes: u64,
    /// `RLIMIT_NOFILE`.
    pub nofile: u64,
    /// `RLIMIT_FSIZE` in bytes.
    pub fsize_bytes: u64,
}

impl SandboxLimits {
    /// A grain's limits when nothing is configured.
    pub const GRAIN_DEFAULT: SandboxLimits = SandboxLimits {
        memory_bytes: 512 << 20,
        pids: 256,
        cpu_millis: 1000,
        tmp_bytes: 64 << 20,
        nofile: 1024,
        fsize_bytes: 1 << 30,
    };

    /// A driver host's limits when nothing is configured. Drivers hold a socket per
    /// proxied connection, hence the higher open-file limit; they write no files (the
    /// host is locked down after loading the plugin).
    pub const DRIVER_DEFAULT: SandboxLimits = SandboxLimits {
        memory_bytes: 256 << 20,
        pids: 128,
        cpu_millis: 1000,
        tmp_bytes: 16 << 20,
        nofile: 4096,
        fsize_bytes: 16 << 20,
    };

    /// These limits with the values `o` sets.
    pub fn with(self, o: &LimitOverrides) -> Self {
        SandboxLimits {
            memory_bytes: o.memory_bytes.unwrap_or(self.memory_bytes),
            pids: o.pids.unwrap_or(self.pids),
            cpu_millis: o.cpu_millis.unwrap_or(self.cpu_millis),
            tmp_bytes: o.tmp_bytes.unwrap_or(self.tmp_bytes),
            nofile: o.nofile.unwrap_or(self.nofile),
            fsize_bytes: o.fsize_bytes.unwrap_or(self.fsize_bytes),
        }
    }

    /// The limits in the sandbox library's terms (`tmp_bytes` goes in the spec).
    pub fn sandbox(&self) -> sandbox::Limits {
        sandbox::Limits {
            memory_bytes: self.memory_bytes,
            pids: self.pids,
            cpu_millis: self.cpu_millis,
            nofile: self.nofile,
            fsize_bytes: self.fsize_bytes,
        }
    }

    /// Checks the values against what a sandbox can run with; `what` names their origin.
    pub fn check(&self, what: &str) -> Result<(), String> {
        if self.memory_bytes < MIN_MEMORY {
            return Err(format!(
                "{what}: memory {} is below the minimum of {} (the sandbox's own init needs some)",
                format_bytes(self.memory_bytes),
                format_bytes(MIN_MEMORY)
            ));
        }
        if self.pids > MAX_PIDS {
            return Err(format!(
                "{what}: pids {} is above the kernel's maximum of {MAX_PIDS}",
                self.pids
            ));
        }
        if self.cpu_millis > 1_024_000 {
            return Err(format!(
                "{what}: cpu {} cores is above the maximum of 1024",
                self.cpu_millis as f64 / 1000.0
            ));
        }
        if self.nofile < 16 || self.nofile > 1 << 20 {
            return Err(format!(
                "{what}: nofile {} must be between 16 and 1048576",
                self.nofile
            ));
        }
        if self.tmp_bytes < 4096 {
            return Err(format!(
                "{what}: tmp {} must be at least 4 KiB",
                self.tmp_bytes
            ));
        }
        Ok(())
    }
}

/// The smallest memory limit accepted.
pub const MIN_MEMORY: u64 = 8 << 20;

/// The largest pids limit accepted (the kernel's `PID_MAX_LIMIT`).
pub const MAX_PIDS: u64 = 4 << 20;

/// Limits set by one layer (config defaults, a grain table, the command line).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitOverrides {
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
    /// Task limit.
    pub pids: Option<u64>,
    /// CPU quota in thousandths of a core.
    pub cpu_millis: Option<u64>,
    /// `/tmp` size.
    pub tmp_bytes: Option<u64>,
    /// Open-file limit.
    pub nofile: Option<u64>,
    /// Largest writable file.
    pub fsize_bytes: Option<u64>,
}

/// A size in bytes: an integer, or a string with a binary unit: `"512MiB"`, `"64M"`,
/// `"1G"`, `"4096"` (K, M, G and T are powers of 1024, with or without `iB`/`B`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size: bytes as an integer, or a string like \"512MiB\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("size {v} is negative")))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_size(v).map(ByteSize).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `"512MiB"`, `"64M"`, `"1g"`, `"4096"` into bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("size {text:?}: expected a number of bytes with an optional unit like 512MiB")
    })?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(format!(
                "size {text:?}: unknown unit {other:?} (use K, M, G or T)"
            ));
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// `536870912` → `"512 MiB"`.
pub fn format_bytes(n: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{} {unit}", n >> shift);
        }
    }
    if n >= 1 << 20 {
        return format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20));
    }
    format!("{n} B")
}

/// A CPU quota in cores (`0.5`, `2`), held as thousandths of a core; 0 = unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cpu(pub u64);

impl<'de> Deserialize<'de> for Cpu {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let cores = f64::deserialize(d)?;
        parse_cpu(cores).map(Cpu).map_err(serde::de::Error::custom)
    }
}

/// Cores (`0.5`) to thousandths of a core, refusing negative, non-finite and absurd
/// values and quotas below 1% of a core.
pub fn parse_cpu(cores: f64) -> Result<u64, String> {
    if !cores.is_finite() || !(0.0..=1024.0).contains(&cores) {
        return Err(format!(
            "cpu {cores}: expected cores between 0 (unlimited) and 1024"
        ));
    }
    let millis = (cores * 1000.0).round() as u64;
    if cores > 0.0 && millis < 10 {
        return Err(format!("cpu {cores}: the smallest quota is 0.01 cores"));
    }
    Ok(millis)
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
        if let Some(p) = config.daemon.sandbox_helper.as_mut() {
            abs(p);
        }
        for g in config.grains.by_id.values_mut() {
            if let Some(p) = g.app.as_mut() {
                abs(p);
            }
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
        let d = &self.daemon;
        if d.cgroup_parent.len() > 64
            || crate::sandbox::cgroups::parent_components(&d.cgroup_parent).is_err()
        {
            return Err(self.invalid(format!(
                "daemon.cgroup_parent {:?} must be at most 64 characters: up to 4 names of \
                 [A-Za-z0-9._-] (not \".\" or \"..\") separated by '/', e.g. \"capnet\" or \
                 \"capnet/staging\"",
                d.cgroup_parent
            )));
        }
        if d.sandbox_uid_base < 1000
            || d.sandbox_uid_count == 0
            || d.sandbox_uid_base
                .checked_add(d.sandbox_uid_count)
                .is_none()
        {
            return Err(self.invalid(format!(
                "daemon.sandbox_uid_base {} / sandbox_uid_count {}: the range must start at 1000 \
                 or above, hold at least one id and end below 2^32 (choose ids no host account \
                 uses, such as 100000-165535)",
                d.sandbox_uid_base, d.sandbox_uid_count
            )));
        }
        for (name, drv) in &self.drivers {
            drv.limits()
                .check(&format!("drivers.{name}"))
                .map_err(|m| self.invalid(m))?;
        }
        let defaults = SandboxLimits::GRAIN_DEFAULT.with(&self.grains.defaults.overrides());
        defaults
            .check("grains.defaults")
            .map_err(|m| self.invalid(m))?;
        for (id, g) in self.grains.iter() {
            if !valid_name(id) {
                return Err(self.invalid(format!(
                    "grain id {id:?} must be 1-32 lower-case letters, digits or '-'"
                )));
            }
            let Some(program) = g.command.first() else {
                return Err(self.invalid(format!(
                    "grains.{id}.command is empty: give the program and its arguments"
                )));
            };
            let p = Path::new(program);
            if p.components().any(|c| matches!(c, Component::ParentDir)) || program.is_empty() {
                return Err(self.invalid(format!(
                    "grains.{id}.command: program {program:?} must not be empty or contain '..'"
                )));
            }
            if p.is_relative() && g.app.is_none() {
                return Err(self.invalid(format!(
                    "grains.{id}.command: program {program:?} is relative to the app tree, but \
                     grains.{id}.app is not set; set app (mounted read-only at /app) or give an \
                     absolute path inside the sandbox"
                )));
            }
            defaults
                .with(&g.overrides())
                .check(&format!("grains.{id}"))
                .map_err(|m| self.invalid(m))?;
        }
        Ok(())
    }

    /// The limits of grain `id` (`None` for an ad-hoc grain) with `extra` (from the
    /// command line) applied last.
    pub fn grain_limits(&self, id: Option<&str>, extra: &LimitOverrides) -> SandboxLimits {
        let mut l = SandboxLimits::GRAIN_DEFAULT.with(&self.grains.defaults.overrides());
        if let Some(g) = id.and_then(|id| self.grains.get(id)) {
            l = l.with(&g.overrides());
        }
        l.with(extra)
    }

    /// Whether grain `id` gets the host's system directories read-only.
    pub fn grain_system_binds(&self, id: Option<&str>) -> bool {
        id.and_then(|id| self.grains.get(id))
            .and_then(|g| g.system_binds)
            .or(self.grains.defaults.system_binds)
            .unwrap_or(true)
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

    /// The sandbox setup helper executable.
    pub fn sandbox_helper(&self) -> PathBuf {
        self.daemon
            .sandbox_helper
            .clone()
            .unwrap_or_else(|| exe_dir().join("capnet-sandbox"))
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

    /// A reload names every [daemon] key it cannot apply; plugin_dir it applies.
    #[test]
    fn restart_only_daemon_keys_are_named() {
        let a = DaemonConfig::default();
        let mut b = a.clone();
        b.plugin_dir = Some("/opt/capnet/plugins".into());
        assert!(a.restart_only_changes(&b).is_empty());
        b.health_interval_ms += 1;
        b.cgroup_parent = "other".into();
        b.admin_socket = Some("/run/capnet.sock".into());
        assert_eq!(
            a.restart_only_changes(&b),
            ["admin_socket", "health_interval_ms", "cgroup_parent"]
        );
    }

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
            "[grains.a]\ncommand = [\"/usr/bin/app\", \"-v\"]\nbridge = true\n\
             [grains.b]\ncommand = [\"/usr/bin/app\"]\nbridge = [\"--grant\", \"network\"]\n\
             [grains.c]\ncommand = [\"/usr/bin/app\"]\nbridge = false\n",
            Path::new("/etc/capnet/capnet.toml"),
        )
        .expect("parse");
        let exe = Path::new("/usr/bin/capnet-bridge");
        assert_eq!(
            c.grains["a"].command_line(exe),
            ["/usr/bin/capnet-bridge", "--", "/usr/bin/app", "-v"]
        );
        assert_eq!(
            c.grains["b"].command_line(exe),
            [
                "/usr/bin/capnet-bridge",
                "--grant",
                "network",
                "--",
                "/usr/bin/app"
            ]
        );
        assert_eq!(c.grains["c"].command_line(exe), ["/usr/bin/app"]);
    }

    /// `[grains.defaults]` is not a grain; limits resolve built-in default →
    /// `[grains.defaults]` → `[grains.ID]` → the start request, and sizes accept units.
    #[test]
    fn grain_limits_resolve_in_layers() {
        let text = "[grains.defaults]\nmemory = \"128MiB\"\npids = 32\nsystem_binds = false\n\
                    [grains.web]\napp = \"web\"\ncommand = [\"bin/server\"]\ncpu = 0.5\n\
                    memory = 268435456\nsystem_binds = true\n";
        let c = Config::parse(text, Path::new("/etc/capnet/c.toml")).expect("ok");
        assert_eq!(c.grains.len(), 1);
        let web = c.grains.get("web").expect("web");
        assert_eq!(web.app.as_deref(), Some(Path::new("/etc/capnet/web")));
        let l = c.grain_limits(Some("web"), &LimitOverrides::default());
        assert_eq!((l.memory_bytes, l.pids, l.cpu_millis), (256 << 20, 32, 500));
        assert_eq!(l.tmp_bytes, SandboxLimits::GRAIN_DEFAULT.tmp_bytes);
        let adhoc = c.grain_limits(
            None,
            &LimitOverrides {
                pids: Some(7),
                ..Default::default()
            },
        );
        assert_eq!((adhoc.memory_bytes, adhoc.pids), (128 << 20, 7));
        assert!(c.grain_system_binds(Some("web")));
        assert!(!c.grain_system_binds(None));
    }

    /// Bad limit values are refused at load time, naming the key and, for malformed
    /// values, the line.
    #[test]
    fn bad_limits_are_refused() {
        let err = Config::parse(
            "[grains.defaults]\nmemory = \"12 parsecs\"\n",
            Path::new("c.toml"),
        )
        .expect_err("unit");
        assert!(err.to_string().starts_with("c.toml:2:"), "{err}");
        assert!(err.to_string().contains("parsecs"), "{err}");
        let err =
            Config::parse("[grains.defaults]\ncpu = -1\n", Path::new("c.toml")).expect_err("cpu");
        assert!(err.to_string().contains("cpu -1"), "{err}");
        let err =
            Config::parse("[grains.defaults]\npids = 0\n", Path::new("c.toml")).expect_err("pids");
        assert!(err.to_string().starts_with("c.toml:2:"), "{err}");
        let err = Config::parse(
            "[grains.x]\ncommand = [\"/bin/true\"]\nmemory = \"1M\"\n",
            Path::new("c.toml"),
        )
        .expect_err("tiny");
        assert!(err.to_string().contains("grains.x: memory 1 MiB"), "{err}");
        let err = Config::parse("[grains.x]\ncommand = [\"bin/x\"]\n", Path::new("c.toml"))
            .expect_err("relative without app");
        assert!(err.to_string().contains("grains.x.app is not set"), "{err}");
        let err = Config::parse(
            "[grains.x]\ncommand = [\"/bin/true\"]\nmemroy = 1\n",
            Path::new("c.toml"),
        )
        .expect_err("typo");
        assert!(err.to_string().contains("memroy"), "{err}");
        let err = Config::parse(
            "[drivers.t]\nplugin = \"t.so\"\nmemory = \"2MiB\"\n",
            Path::new("c.toml"),
        )
        .expect_err("driver memory");
        assert!(err.to_string().contains("drivers.t: memory 2 MiB"), "{err}");
        let huge = SandboxLimits::GRAIN_DEFAULT.with(&LimitOverrides {
            pids: Some(u64::MAX),
            ..Default::default()
        });
        assert!(
            huge.check("request").is_err(),
            "pids beyond the kernel's limit"
        );
        let huge = SandboxLimits::GRAIN_DEFAULT.with(&LimitOverrides {
            cpu_millis: Some(u64::MAX),
            ..Default::default()
        });
        assert!(huge.check("request").is_err(), "cpu beyond 1024 cores");
        let err = Config::parse("[daemon]\nsandbox_uid_base = 0\n", Path::new("c.toml"))
            .expect_err("uid 0");
        assert!(err.to_string().contains("sandbox_uid_base 0"), "{err}");
        for bad in [
            "../x",
            "capnet/..",
            "/capnet",
            "capnet/",
            "a//b",
            "a/b/c/d/e",
            "",
        ] {
            let err = Config::parse(
                &format!("[daemon]\ncgroup_parent = {bad:?}\n"),
                Path::new("c.toml"),
            )
            .expect_err(bad);
            assert!(err.to_string().contains("cgroup_parent"), "{bad}: {err}");
        }
        for good in ["capnet", "capnet/staging", "capnet/test-12-3"] {
            let c = Config::parse(
                &format!("[daemon]\ncgroup_parent = {good:?}\n"),
                Path::new("c.toml"),
            )
            .unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(c.daemon.cgroup_parent, good);
        }
    }

    /// Sizes: integers are bytes; K/M/G/T (with or without iB/B) are powers of 1024.
    #[test]
    fn sizes_parse_and_format() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2kb"), Ok(2048));
        assert!(parse_size("").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(format_bytes(512 << 20), "512 MiB");
        assert_eq!(format_bytes(1536 << 10), "1536 KiB");
        assert_eq!(format_bytes(100), "100 B");
        assert_eq!(parse_cpu(1.5), Ok(1500));
        assert_eq!(parse_cpu(0.0), Ok(0));
        assert!(parse_cpu(0.001).is_err());
        assert!(parse_cpu(f64::NAN).is_err());
    }

    /// The shipped example configs parse, and the values `config/capnet.toml` spells out
    /// for `[grains.defaults]` and the sandbox keys are the real built-in defaults, so
    /// the administrator's documentation cannot drift from the code.
    #[test]
    fn shipped_configs_parse_and_document_the_defaults() {
        let example = Config::parse(
            include_str!("../../config/capnet.toml"),
            Path::new("/etc/capnet/capnet.toml"),
        )
        .expect("config/capnet.toml");
        assert_eq!(
            example.grain_limits(None, &LimitOverrides::default()),
            SandboxLimits::GRAIN_DEFAULT
        );
        assert!(example.grain_system_binds(None));
        let d = DaemonConfig::default();
        assert_eq!(example.daemon.cgroup_parent, d.cgroup_parent);
        assert_eq!(example.daemon.sandbox_uid_base, d.sandbox_uid_base);
        assert_eq!(example.daemon.sandbox_uid_count, d.sandbox_uid_count);
        Config::parse(
            include_str!("../../config/demo.toml"),
            Path::new("config/demo.toml"),
        )
        .expect("config/demo.toml");
    }
}
