//! Writing approvals back into the administrator's TOML config, keeping its comments and
//! layout (toml_edit), atomically (write a temporary file beside it, then rename).
//!
//! Approvals live in the main config file, in the driver's own table:
//! `[drivers.NAME] plugin = …, sha256 = …, privileges = { … }`. The edited text is parsed
//! and validated as a whole before it replaces the file, so an approval can never leave a
//! broken config behind.

use std::path::{Path, PathBuf};

use capnet_driver_api::Privileges;
use toml_edit::{DocumentMut, Item, Table, value};

use crate::config::{Config, ConfigError};

/// Editing the config failed.
#[derive(Debug, thiserror::Error)]
pub enum EditConfigError {
    /// Reading or writing the file failed.
    #[error("cannot update {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The current file is not valid TOML.
    #[error("cannot edit {path}: it is not valid TOML: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The edit would produce an invalid config.
    #[error("the edited config would be invalid, so it was not written: {0}")]
    Invalid(#[from] ConfigError),
    /// The driver is not in the config.
    #[error("no [drivers.{0}] in the config")]
    NoDriver(String),
}

fn read(path: &Path) -> Result<DocumentMut, EditConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| EditConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    text.parse::<DocumentMut>()
        .map_err(|e| EditConfigError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// A checked change to the config file, not yet written.
#[derive(Debug)]
pub struct Edit {
    path: std::path::PathBuf,
    text: String,
    config: Config,
}

impl Edit {
    /// Checks that `doc` is a valid config for `path`.
    fn prepare(path: &Path, doc: &DocumentMut) -> Result<Self, EditConfigError> {
        let text = doc.to_string();
        let config = Config::parse(&text, path)?;
        Ok(Self {
            path: path.to_path_buf(),
            text,
            config,
        })
    }

    /// Replaces the file atomically (same permissions) and returns the new config.
    pub fn write(self) -> Result<Config, EditConfigError> {
        let tmp = self.path.with_extension("toml.capnet-tmp");
        let io = |source| EditConfigError::Io {
            path: self.path.clone(),
            source,
        };
        std::fs::write(&tmp, &self.text).map_err(io)?;
        if let Ok(meta) = std::fs::metadata(&self.path) {
            let _ = std::fs::set_permissions(&tmp, meta.permissions());
        }
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        Ok(self.config)
    }
}

fn write(path: &Path, doc: &DocumentMut) -> Result<Config, EditConfigError> {
    Edit::prepare(path, doc)?.write()
}

fn privileges_item(p: &Privileges) -> Item {
    let mut t = toml_edit::InlineTable::new();
    for (k, v) in [
        ("outbound_tcp", p.outbound_tcp),
        ("outbound_udp", p.outbound_udp),
        ("inbound_tcp", p.inbound_tcp),
        ("inbound_udp", p.inbound_udp),
        ("low_ports", p.low_ports),
        ("dns", p.dns),
    ] {
        if v {
            t.insert(k, v.into());
        }
    }
    value(t)
}

/// Sets `key` to `item`, keeping the comments around an existing value.
fn set_keeping_decor(table: &mut dyn toml_edit::TableLike, key: &str, item: Item) {
    match (table.get_mut(key).and_then(Item::as_value_mut), item) {
        (Some(old), Item::Value(mut new)) => {
            *new.decor_mut() = old.decor().clone();
            *old = new;
        }
        (_, item) => {
            table.insert(key, item);
        }
    }
}

/// Records an approval: `[drivers.NAME]` gets `plugin`, `sha256` and `privileges`; its
/// other keys (rules, options, limits) are kept. Returns the new config.
pub fn approve(
    path: &Path,
    name: &str,
    plugin: &Path,
    sha256: &str,
    privileges: &Privileges,
    signer_key: Option<&str>,
) -> Result<Config, EditConfigError> {
    let mut doc = read(path)?;
    let drivers = doc.entry("drivers").or_insert_with(|| {
        let mut t = Table::new();
        t.set_implicit(true);
        Item::Table(t)
    });
    let Some(drivers) = drivers.as_table_like_mut() else {
        return Err(EditConfigError::Parse {
            path: path.to_path_buf(),
            reason: "`drivers` is not a table".into(),
        });
    };
    let entry = drivers.entry(name).or_insert(Item::Table(Table::new()));
    let Some(table) = entry.as_table_like_mut() else {
        return Err(EditConfigError::Parse {
            path: path.to_path_buf(),
            reason: format!("`drivers.{name}` is not a table"),
        });
    };
    set_keeping_decor(table, "plugin", value(plugin.display().to_string()));
    set_keeping_decor(table, "sha256", value(sha256));
    set_keeping_decor(table, "privileges", privileges_item(privileges));
    match signer_key {
        Some(k) => set_keeping_decor(table, "signer_key", value(k)),
        None => {
            table.remove("signer_key");
        }
    }
    write(path, &doc)
}

/// Removes `[drivers.NAME]` (revoking the driver's approval). Returns the new config.
pub fn remove_driver(path: &Path, name: &str) -> Result<Config, EditConfigError> {
    driver_removal(path, name)?.write()
}

/// The checked removal of `[drivers.NAME]`, to write once the driver's grants are gone:
/// fails, changing nothing, if the config would not load without it (a powerbox rule
/// still names the driver, for example).
pub fn driver_removal(path: &Path, name: &str) -> Result<Edit, EditConfigError> {
    let mut doc = read(path)?;
    let removed = doc
        .get_mut("drivers")
        .and_then(Item::as_table_like_mut)
        .and_then(|t| t.remove(name));
    if removed.is_none() {
        return Err(EditConfigError::NoDriver(name.to_string()));
    }
    Edit::prepare(path, &doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Approving keeps the administrator's comments and other keys, and the result loads.
    #[test]
    fn approval_keeps_comments_and_layout() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("capnet.toml");
        let original = "# my capnet\n[daemon]\nstate_dir = \"/x\" # where\n\n[drivers.tcp]\n# the tcp driver\nplugin = \"old.so\"\nlisten_addresses = [\"127.0.0.1\"]\n";
        std::fs::write(&p, original).expect("write");
        let priv_ = Privileges {
            outbound_tcp: true,
            dns: true,
            ..Default::default()
        };
        let c = approve(
            &p,
            "tcp",
            Path::new("/lib/capnet/tcp.so"),
            &"ab".repeat(32),
            &priv_,
            Some(&"ef".repeat(32)),
        )
        .expect("approve");
        assert_eq!(
            c.drivers["tcp"].signer_key.as_deref(),
            Some("ef".repeat(32).as_str())
        );
        let d = &c.drivers["tcp"];
        assert_eq!(d.sha256.as_deref(), Some("ab".repeat(32).as_str()));
        assert_eq!(d.privileges, Some(priv_));
        assert_eq!(d.listen_addresses, vec!["127.0.0.1".to_string()]);
        let text = std::fs::read_to_string(&p).expect("read");
        for kept in ["# my capnet", "# where", "# the tcp driver"] {
            assert!(text.contains(kept), "lost {kept:?}:\n{text}");
        }
        let c = approve(
            &p,
            "udp",
            Path::new("/lib/capnet/udp.so"),
            &"cd".repeat(32),
            &priv_,
            None,
        )
        .expect("approve new");
        assert!(c.drivers.contains_key("udp"));
        let c = remove_driver(&p, "tcp").expect("remove");
        assert!(!c.drivers.contains_key("tcp"));
        assert!(matches!(
            remove_driver(&p, "tcp"),
            Err(EditConfigError::NoDriver(_))
        ));
    }

    /// Removing a driver that a powerbox rule still names is refused before anything is
    /// written (the daemon checks this before it revokes the driver's grants).
    #[test]
    fn removal_is_checked_before_it_is_written() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("capnet.toml");
        let text = "[drivers.tcp]\nplugin = \"x.so\"\n\n[[powerbox.rules]]\nname = \"web\"\n\
                    interface = \"IpNetwork\"\ndriver = \"tcp\"\n";
        std::fs::write(&p, text).expect("write");
        Config::parse(text, &p).expect("the starting config is valid");
        let err = driver_removal(&p, "tcp").expect_err("a rule names tcp");
        assert!(err.to_string().contains("tcp"), "{err}");
        assert_eq!(std::fs::read_to_string(&p).expect("read"), text);
    }

    /// An edit that would break the config is not written.
    #[test]
    fn invalid_results_are_not_written() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("capnet.toml");
        std::fs::write(&p, "[drivers.tcp]\nplugin = \"x.so\"\n").expect("write");
        let err = approve(
            &p,
            "Bad Name",
            Path::new("y.so"),
            &"ab".repeat(32),
            &Privileges::default(),
            None,
        )
        .expect_err("invalid name");
        assert!(err.to_string().contains("Bad Name"), "{err}");
        assert_eq!(
            std::fs::read_to_string(&p).expect("read"),
            "[drivers.tcp]\nplugin = \"x.so\"\n"
        );
    }
}
