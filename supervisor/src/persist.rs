//! Saving and restoring capabilities (`SystemPersistent.save()`, `GrainApi.restore/drop`).
//!
//! A saved capability is a token of 32 random bytes from the OS, returned to the grain as
//! the sturdy ref. The state database keeps only the token's SHA-256, the grant it belongs
//! to, the grain that saved it (the only grain that may restore it) and which object of
//! the grant it names ([`SavedObject`]). Restoring checks all of that, and that the grant
//! is not revoked; every attempt, allowed or refused, is audited.

use std::rc::Rc;

use capnp::Error;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::{AuditRecord, now_ms};
use crate::grants::{Grant, GrantTable};
use crate::membrane;
use crate::state::{TokenRow, TokenState};

/// Length of a token in bytes (256 bits).
pub const TOKEN_BYTES: usize = 32;

/// Which object of a grant a token restores.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "object", rename_all = "snake_case")]
pub enum SavedObject {
    /// The capability the grant gave (network, interface, host or port).
    Root,
    /// A remote host obtained from a granted network.
    RemoteHost {
        /// The host as the grain named it.
        host: String,
    },
    /// A TCP port obtained from a granted network or host.
    TcpPort {
        /// The host.
        host: String,
        /// The port.
        port: u16,
    },
    /// A UDP port obtained from a granted network or host.
    UdpPort {
        /// The host.
        host: String,
        /// The port.
        port: u16,
    },
}

impl SavedObject {
    fn describe(&self) -> String {
        match self {
            SavedObject::Root => "the granted capability".into(),
            SavedObject::RemoteHost { host } => format!("IpRemoteHost {host}"),
            SavedObject::TcpPort { host, port } => format!("TcpPort {host}:{port}"),
            SavedObject::UdpPort { host, port } => format!("UdpPort {host}:{port}"),
        }
    }
}

/// The SHA-256 under which a token is stored.
pub fn token_hash(token: &[u8]) -> Vec<u8> {
    Sha256::digest(token).to_vec()
}

/// Saves `object` of `grant` for the grant's grain and returns the new token. The token is
/// durable when this returns.
pub async fn save(grant: &Rc<Grant>, object: SavedObject) -> Result<Vec<u8>, Error> {
    grant.check_live()?;
    let mut token = vec![0u8; TOKEN_BYTES];
    getrandom::fill(&mut token)
        .map_err(|e| Error::failed(format!("failed: no randomness for a token: {e}")))?;
    let hash = token_hash(&token);
    let row = TokenRow {
        grant_id: grant.id.clone(),
        grain: grant.grain.clone(),
        object: serde_json::to_string(&object).unwrap_or_default(),
        created_ms: now_ms(),
        dropped_ms: None,
    };
    let audit = AuditRecord::new("save")
        .grain(&grant.grain)
        .grant(&grant.id)
        .driver(&grant.driver)
        .detail(object.describe());
    tracing::info!(target: "capnet::audit", kind = "save", grain = %grant.grain, grant = %grant.id);
    grant
        .state()
        .call(move |db| db.insert_token(&hash, &row, &audit))
        .await
        .map_err(|e| Error::failed(format!("failed: the token could not be stored: {e}")))?;
    Ok(token)
}

/// Why a restore or drop was refused; the message is what the grain sees.
fn refuse(grants: &GrantTable, kind: &str, grain: &str, grant: &str, msg: String) -> Error {
    grants.audit().record(
        AuditRecord::new(kind)
            .grain(grain)
            .grant(grant)
            .detail(msg.clone()),
    );
    if msg.starts_with("revoked:") {
        Error::failed(msg)
    } else {
        Error::failed(format!("failed: {msg}"))
    }
}

/// Restores the capability a token names, for `grain`.
pub async fn restore(
    grants: &GrantTable,
    grain: &str,
    token: &[u8],
) -> Result<capnp::capability::Client, Error> {
    let (row, grant_row) = lookup(grants, grain, token, "restore_refused").await?;
    if row.dropped_ms.is_some() {
        return Err(refuse(
            grants,
            "restore_refused",
            grain,
            &row.grant_id,
            "the token was dropped".into(),
        ));
    }
    if let Some(at) = grant_row.revoked_ms {
        let reason = grant_row.revoke_reason.unwrap_or_default();
        return Err(refuse(
            grants,
            "restore_refused",
            grain,
            &row.grant_id,
            format!(
                "revoked: grant {} was revoked at {} ({reason})",
                row.grant_id,
                crate::cli::format_time(at)
            ),
        ));
    }
    let Some(grant) = grants.get(&row.grant_id) else {
        return Err(refuse(
            grants,
            "restore_refused",
            grain,
            &row.grant_id,
            format!("revoked: grant {} is no longer live", row.grant_id),
        ));
    };
    let object: SavedObject = serde_json::from_str(&row.object).map_err(|e| {
        Error::failed(format!(
            "failed: the saved object of this token is unreadable: {e}"
        ))
    })?;
    let cap = membrane::restore_capability(&grant, &object);
    grants.audit().record(
        AuditRecord::new("restore")
            .grain(grain)
            .grant(&grant.id)
            .driver(&grant.driver)
            .detail(object.describe()),
    );
    Ok(cap)
}

/// Forgets a token of `grain`.
pub async fn drop_token(grants: &GrantTable, grain: &str, token: &[u8]) -> Result<(), Error> {
    let (row, grant_row) = lookup(grants, grain, token, "drop_refused").await?;
    if row.dropped_ms.is_some() {
        return Err(refuse(
            grants,
            "drop_refused",
            grain,
            &row.grant_id,
            "the token was already dropped".into(),
        ));
    }
    let audit = AuditRecord::new("drop")
        .grain(grain)
        .grant(&row.grant_id)
        .driver(&grant_row.driver);
    grants.audit().note(&audit);
    let hash = token_hash(token);
    grants
        .state()
        .call(move |db| db.drop_token(&hash, now_ms(), &audit))
        .await
        .map_err(|e| Error::failed(format!("failed: the token could not be dropped: {e}")))?;
    Ok(())
}

async fn lookup(
    grants: &GrantTable,
    grain: &str,
    token: &[u8],
    refusal: &str,
) -> Result<(TokenRow, crate::state::GrantRow), Error> {
    if token.len() != TOKEN_BYTES {
        return Err(refuse(
            grants,
            refusal,
            grain,
            "",
            format!(
                "a token is {TOKEN_BYTES} bytes; this one has {}",
                token.len()
            ),
        ));
    }
    let hash = token_hash(token);
    let found = grants
        .state()
        .call(move |db| db.token(&hash))
        .await
        .map_err(|e| Error::failed(format!("failed: the state database failed: {e}")))?;
    match found {
        TokenState::Unknown => Err(refuse(
            grants,
            refusal,
            grain,
            "",
            "unknown token: it was never saved here, or its grain was deleted".into(),
        )),
        TokenState::Found(found) => {
            let (row, g) = *found;
            if row.grain != grain {
                return Err(refuse(
                    grants,
                    refusal,
                    grain,
                    &g.id,
                    "the token belongs to another grain; only the grain that saved a token can \
                     use it"
                        .into(),
                ));
            }
            Ok((row, g))
        }
    }
}
