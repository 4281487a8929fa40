//! Which grants the bridge uses, and getting them through the grain API.
//!
//! Grants come from three places, merged in this order (a grant named twice is set up
//! once, with the first token seen):
//! 1. the config file (`--config`, default `/var/capnet-bridge.toml` inside the grain),
//!    written by the grain's developer or its administrator:
//!    ```toml
//!    socks = "127.0.0.1:1080"           # or "off"
//!    http = "127.0.0.1:3128"            # or "off"
//!    state = "/var/capnet-bridge.state" # where saved tokens are kept
//!
//!    [[grant]]
//!    spec = "network"                   # network | host:HOST | tcp:HOST:PORT | udp:HOST:PORT
//!    label = "fetch feeds"              # what the administrator sees in the powerbox
//!    # token = "9f2c…"                  # a saved token (hex) to restore
//!    # request = false                  # never ask the powerbox for it
//!    ```
//! 2. `--grant SPEC` on the command line (asked for through the powerbox unless a saved
//!    token restores it);
//! 3. `CAPNET_BRIDGE_TOKENS="SPEC=HEX SPEC=HEX"` in the environment: tokens an
//!    administrator saved for this grain, restored only.
//!
//! For each grant: a token from the config or the environment is restored with
//! `GrainApi.restore`; else a token the bridge saved in its state file on an earlier run is
//! restored; else (unless `request = false`) the bridge asks the powerbox
//! (`GrainApi.request`) and waits for the administrator. A freshly granted capability is
//! saved with `SystemPersistent.save()` and the token written to the state file, so the
//! next run restores instead of asking again. If `save()` fails (supervisors without
//! persistence answer `unimplemented`) the bridge keeps the live capability for this run
//! and says so in its log.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use capnet_schemas::descriptor::{Encryption, Requested};
use capnet_schemas::grain_capnp::grain_api;
use capnet_schemas::persistent_capnp::persistent;
use capnet_schemas::system_persistent_capnp::api_token_owner;
use serde::{Deserialize, Serialize};

use crate::refusal::clean_message;
use crate::router::{Cap, Grant};
use crate::target::{GrantKind, TargetError};

/// Longest token accepted, in bytes.
pub const MAX_TOKEN: usize = 512;

/// The config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading failed.
    #[error("cannot read bridge config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not the expected TOML.
    #[error("bridge config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A grant spec that does not parse.
    #[error("{origin}: {source}")]
    Grant {
        /// Where it was given.
        origin: String,
        /// Why.
        source: TargetError,
    },
    /// A token that is not hex, or too long.
    #[error("{origin}: the token for {spec} is not hex of at most {MAX_TOKEN} bytes")]
    Token {
        /// Where it was given.
        origin: String,
        /// The grant it was for.
        spec: String,
    },
}

/// The config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// SOCKS5 listen address, or "off".
    pub socks: Option<String>,
    /// HTTP proxy listen address, or "off".
    pub http: Option<String>,
    /// The state file for saved tokens.
    pub state: Option<PathBuf>,
    /// Grants to use.
    #[serde(default, rename = "grant")]
    pub grants: Vec<FileGrant>,
}

/// `[[grant]]` of the config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileGrant {
    /// `network`, `host:HOST`, `tcp:HOST:PORT`, `udp:HOST:PORT`.
    pub spec: String,
    /// The powerbox label.
    pub label: Option<String>,
    /// A saved token (hex) to restore.
    pub token: Option<String>,
    /// Whether to ask the powerbox when no token restores it (default true).
    #[serde(default = "yes")]
    pub request: bool,
}

fn yes() -> bool {
    true
}

impl FileConfig {
    /// Reads `path`. A missing file is an error only if `required`.
    pub fn load(path: &Path, required: bool) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

/// One grant the bridge should use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantSpec {
    /// What it reaches.
    pub kind: GrantKind,
    /// The powerbox label.
    pub label: String,
    /// A token to restore first.
    pub token: Option<Vec<u8>>,
    /// Whether to ask the powerbox if no token restores it.
    pub request: bool,
}

fn parse_token(origin: &str, spec: &GrantKind, hex_text: &str) -> Result<Vec<u8>, ConfigError> {
    let bad = || ConfigError::Token {
        origin: origin.to_string(),
        spec: spec.to_string(),
    };
    let t = hex::decode(hex_text.trim()).map_err(|_| bad())?;
    if t.is_empty() || t.len() > MAX_TOKEN {
        return Err(bad());
    }
    Ok(t)
}

/// Grants from the config file.
pub fn file_grants(path: &Path, cfg: &FileConfig) -> Result<Vec<GrantSpec>, ConfigError> {
    let mut out = Vec::new();
    for (i, g) in cfg.grants.iter().enumerate() {
        let origin = format!("{} grant {}", path.display(), i + 1);
        let kind = GrantKind::parse(&g.spec).map_err(|source| ConfigError::Grant {
            origin: origin.clone(),
            source,
        })?;
        let token = match &g.token {
            Some(t) => Some(parse_token(&origin, &kind, t)?),
            None => None,
        };
        out.push(GrantSpec {
            label: g
                .label
                .clone()
                .unwrap_or_else(|| format!("capnet-bridge: {kind}")),
            kind,
            token,
            request: g.request,
        });
    }
    Ok(out)
}

/// Grants from `--grant SPEC` arguments.
pub fn cli_grants(specs: &[String], label: Option<&str>) -> Result<Vec<GrantSpec>, ConfigError> {
    specs
        .iter()
        .map(|s| {
            let kind = GrantKind::parse(s).map_err(|source| ConfigError::Grant {
                origin: "--grant".into(),
                source,
            })?;
            Ok(GrantSpec {
                label: label.map_or_else(|| format!("capnet-bridge: {kind}"), str::to_string),
                kind,
                token: None,
                request: true,
            })
        })
        .collect()
}

/// Grants from `CAPNET_BRIDGE_TOKENS` (`SPEC=HEX`, separated by spaces, commas or
/// newlines): restored only, never requested.
pub fn env_grants(value: &str) -> Result<Vec<GrantSpec>, ConfigError> {
    let origin = "CAPNET_BRIDGE_TOKENS";
    value
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty())
        .map(|item| {
            let (spec, tok) = item.rsplit_once('=').ok_or_else(|| ConfigError::Grant {
                origin: origin.into(),
                source: TargetError::BadGrant(format!("{item} (expected SPEC=HEX)")),
            })?;
            let kind = GrantKind::parse(spec).map_err(|source| ConfigError::Grant {
                origin: origin.into(),
                source,
            })?;
            let token = parse_token(origin, &kind, tok)?;
            Ok(GrantSpec {
                label: format!("capnet-bridge: {kind}"),
                kind,
                token: Some(token),
                request: false,
            })
        })
        .collect()
}

/// Merges grant lists, keeping the first entry for each kind (a token given later is
/// kept if the first had none).
pub fn merge(lists: Vec<Vec<GrantSpec>>) -> Vec<GrantSpec> {
    let mut out: Vec<GrantSpec> = Vec::new();
    for g in lists.into_iter().flatten() {
        match out.iter_mut().find(|o| o.kind == g.kind) {
            Some(o) => {
                if o.token.is_none() {
                    o.token = g.token;
                }
                o.request |= g.request;
            }
            None => out.push(g),
        }
    }
    out
}

/// One saved token in the state file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Saved {
    /// The grant spec it restores.
    pub spec: String,
    /// The token, hex.
    pub token: String,
    /// The supervisor's grant id when it was saved.
    #[serde(default)]
    pub grant: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateDoc {
    #[serde(default)]
    saved: Vec<Saved>,
}

/// Tokens the bridge saved on earlier runs. Written atomically (temporary file, then
/// rename), readable only by the grain's user.
#[derive(Debug)]
pub struct StateFile {
    path: Option<PathBuf>,
    saved: Vec<Saved>,
}

impl StateFile {
    /// Loads `path` (a missing or unreadable file is logged and treated as empty). `None`
    /// keeps tokens in memory only.
    pub fn load(path: Option<PathBuf>) -> Self {
        let saved = path
            .as_deref()
            .and_then(|p| match std::fs::read_to_string(p) {
                Ok(t) => match toml::from_str::<StateDoc>(&t) {
                    Ok(d) => Some(d.saved),
                    Err(e) => {
                        tracing::warn!(target: "capnet_bridge", "ignoring the state file {}: {e}", p.display());
                        None
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    tracing::warn!(target: "capnet_bridge", "cannot read the state file {}: {e}", p.display());
                    None
                }
            })
            .unwrap_or_default();
        Self { path, saved }
    }

    /// The saved token for `kind`.
    pub fn token_for(&self, kind: &GrantKind) -> Option<Vec<u8>> {
        let spec = kind.to_string();
        self.saved
            .iter()
            .find(|s| s.spec == spec)
            .and_then(|s| hex::decode(&s.token).ok())
            .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN)
    }

    /// Remembers a token (replacing an older one for the same grant) and writes the file.
    pub fn remember(&mut self, kind: &GrantKind, token: &[u8], grant: &str) {
        let spec = kind.to_string();
        self.saved.retain(|s| s.spec != spec);
        self.saved.push(Saved {
            spec,
            token: hex::encode(token),
            grant: grant.to_string(),
        });
        self.write();
    }

    /// Forgets the token for `kind` and writes the file.
    pub fn forget(&mut self, kind: &GrantKind) {
        let spec = kind.to_string();
        let before = self.saved.len();
        self.saved.retain(|s| s.spec != spec);
        if self.saved.len() != before {
            self.write();
        }
    }

    /// What is saved.
    pub fn saved(&self) -> &[Saved] {
        &self.saved
    }

    fn write(&self) {
        let Some(path) = &self.path else { return };
        if let Err(e) = self.try_write(path) {
            tracing::warn!(target: "capnet_bridge", "cannot write the state file {}: {e}; saved tokens will not survive a restart", path.display());
        }
    }

    fn try_write(&self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let doc = StateDoc {
            saved: self.saved.clone(),
        };
        let text = toml::to_string(&doc).map_err(std::io::Error::other)?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(b"# capnet-bridge: tokens of this grain's saved grants (keep private)\n")?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

fn requested(kind: &GrantKind) -> Requested {
    match kind {
        GrantKind::Network => Requested::IpNetwork {
            encryption: Encryption::None,
        },
        GrantKind::RemoteHost(h) => Requested::IpRemoteHost {
            host: Some(h.text()),
        },
        GrantKind::TcpPort(t) => Requested::TcpPort {
            host: Some(t.host.text()),
            port: Some(t.port),
        },
        GrantKind::UdpPort(t) => Requested::UdpPort {
            host: Some(t.host.text()),
            port: Some(t.port),
        },
    }
}

/// Restores a capability from a token.
pub async fn restore(
    api: &grain_api::Client,
    token: &[u8],
) -> Result<capnp::capability::Client, capnp::Error> {
    let mut req = api.restore_request();
    req.get().set_token(token);
    let resp = req.send().promise.await?;
    resp.get()?.get_cap().get_as_capability()
}

/// Calls `SystemPersistent.save()` (Cap'n Proto's `Persistent.save`, method 0 of interface
/// 0xc8cb212fcd9f5691) and returns the token.
pub async fn save(cap: &capnp::capability::Client) -> Result<Vec<u8>, capnp::Error> {
    let p: persistent::Client<capnp::data::Owned, api_token_owner::Owned> =
        capnp::capability::FromClientHook::new(cap.hook.add_ref());
    let resp = p.save_request().send().promise.await?;
    let token = resp.get()?.get_sturdy_ref()?.to_vec();
    if token.is_empty() || token.len() > MAX_TOKEN {
        return Err(capnp::Error::failed(format!(
            "save() returned a token of {} bytes",
            token.len()
        )));
    }
    Ok(token)
}

/// Sets up one grant; `None` (with the reason logged) if it cannot be had.
pub async fn establish(
    api: &grain_api::Client,
    spec: &GrantSpec,
    state: &mut StateFile,
) -> Option<Grant> {
    let kind = &spec.kind;
    let mut tried = HashSet::new();
    let candidates = spec
        .token
        .iter()
        .map(|t| (t.clone(), "configured"))
        .chain(state.token_for(kind).map(|t| (t, "saved")));
    for (token, origin) in candidates {
        if !tried.insert(token.clone()) {
            continue;
        }
        match restore(api, &token).await {
            Ok(cap) => {
                tracing::info!(target: "capnet_bridge", grant = %kind, "restored from the {origin} token");
                return Some(Grant::new(
                    kind.clone(),
                    Cap::cast(kind, &cap),
                    format!("{kind} (restored)"),
                ));
            }
            Err(e) => {
                tracing::warn!(target: "capnet_bridge", grant = %kind, "restoring the {origin} token failed: {}", clean_message(&e));
                if origin == "saved" {
                    state.forget(kind);
                }
            }
        }
    }
    if !spec.request {
        tracing::warn!(target: "capnet_bridge", grant = %kind, "no token restores this grant and it may not be requested; it is not used");
        return None;
    }
    tracing::info!(target: "capnet_bridge", grant = %kind, label = %spec.label, "asking the powerbox; waiting for the administrator");
    let granted = match capnet_schemas::grain::request(api, &requested(kind), &spec.label).await {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(target: "capnet_bridge", grant = %kind, "the request was not granted: {}", clean_message(&e));
            return None;
        }
    };
    tracing::info!(target: "capnet_bridge", grant = %kind, id = %granted.grant_id, "granted");
    match save(&granted.cap).await {
        Ok(token) => {
            state.remember(kind, &token, &granted.grant_id);
            tracing::info!(target: "capnet_bridge", grant = %kind, "saved; later runs restore it");
        }
        Err(e) => {
            tracing::warn!(target: "capnet_bridge", grant = %kind, "could not be saved ({}); using the live capability for this run only, the next run asks again", clean_message(&e));
        }
    }
    Some(Grant::new(
        kind.clone(),
        Cap::cast(kind, &granted.cap),
        granted.grant_id,
    ))
}

/// Sets up every grant in order (requests are made one at a time, so the administrator
/// sees them in the order of the configuration).
pub async fn establish_all(
    api: &grain_api::Client,
    specs: &[GrantSpec],
    state: &mut StateFile,
) -> Vec<Grant> {
    let mut out = Vec::new();
    for s in specs {
        if let Some(g) = establish(api, s, state).await {
            out.push(g);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Config file, command line and environment grants parse and merge; bad specs and
    /// bad tokens are refused with the origin named.
    #[test]
    fn grant_sources_parse_and_merge() {
        let cfg: FileConfig = toml::from_str(
            r#"
socks = "off"
[[grant]]
spec = "tcp:web.test:80"
label = "web"
token = "00ff"
[[grant]]
spec = "network"
request = false
"#,
        )
        .unwrap();
        let file = file_grants(Path::new("b.toml"), &cfg).unwrap();
        assert_eq!(file[0].token.as_deref(), Some(&[0u8, 255][..]));
        assert_eq!(file[0].label, "web");
        assert!(!file[1].request);
        let cli = cli_grants(&["network".into(), "udp:[::1]:53".into()], None).unwrap();
        let env = env_grants("tcp:web.test:80=abcd, network=0102\n").unwrap();
        let all = merge(vec![file, cli, env]);
        assert_eq!(all.len(), 3);
        assert_eq!(all[1].kind, GrantKind::Network);
        assert!(all[1].request, "the command line asks for it");
        assert_eq!(all[1].token.as_deref(), Some(&[1u8, 2][..]));
        let e = env_grants("network=xyz").unwrap_err().to_string();
        assert!(
            e.contains("CAPNET_BRIDGE_TOKENS") && e.contains("not hex"),
            "{e}"
        );
        let e = env_grants("network").unwrap_err().to_string();
        assert!(e.contains("SPEC=HEX"), "{e}");
        let e = cli_grants(&["tcp:x".into()], None).unwrap_err().to_string();
        assert!(e.contains("--grant"), "{e}");
        assert!(toml::from_str::<FileConfig>("sock = 1").is_err());
        let long = "00".repeat(MAX_TOKEN + 1);
        assert!(env_grants(&format!("network={long}")).is_err());
    }

    /// The state file is written atomically with mode 0600 and read back; forgetting a
    /// token rewrites it; a corrupt file is ignored, not fatal.
    #[test]
    fn state_file_roundtrip() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        let mut s = StateFile::load(Some(p.clone()));
        let k = GrantKind::parse("tcp:a.test:25").unwrap();
        s.remember(&k, &[1, 2, 3], "grant-7");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let s2 = StateFile::load(Some(p.clone()));
        assert_eq!(s2.token_for(&k), Some(vec![1, 2, 3]));
        assert_eq!(s2.saved()[0].grant, "grant-7");
        let mut s2 = s2;
        s2.forget(&k);
        assert_eq!(StateFile::load(Some(p.clone())).token_for(&k), None);
        std::fs::write(&p, "saved = 7").unwrap();
        assert!(StateFile::load(Some(p)).saved().is_empty());
    }

    /// The example config in `config/capnet-bridge.toml` parses, with its grants.
    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/capnet-bridge.toml");
        let cfg = FileConfig::load(&path, true).unwrap();
        let grants = file_grants(&path, &cfg).unwrap();
        assert_eq!(grants.len(), 2);
        assert_eq!(grants[1].kind.to_string(), "tcp:smtp.example.com:587");
        assert_eq!(cfg.socks.as_deref(), Some("127.0.0.1:1080"));
    }
}
