//! Plugin signatures: driver authors sign a plugin with an ed25519 key; administrators
//! trust author keys by name in `[trust.authors]`.
//!
//! A signature is a detached file beside the plugin, `PLUGIN.sig`, holding JSON
//! `{"alg": "ed25519", "key": HEX, "sig": HEX}`. What is signed is the domain-separated
//! SHA-256 of the plugin's bytes, `"capnet-plugin-signature-v1\0" || sha256(bytes)`, so a
//! signature can never be confused with one for another purpose. Signatures are optional:
//! they tell the administrator who built a plugin and, on `capnet driver upgrade`, whether
//! the new version comes from the same author as the approved one. The approval itself is
//! always pinned to the exact SHA-256.

use std::collections::BTreeMap;
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const DOMAIN: &[u8] = b"capnet-plugin-signature-v1\0";

/// A signature file as stored.
#[derive(Debug, Serialize, Deserialize)]
struct SigFile {
    alg: String,
    key: String,
    sig: String,
}

/// What a plugin's signature says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignatureStatus {
    /// No `.sig` file beside the plugin.
    Unsigned,
    /// A valid signature by a key the administrator trusts under this name.
    Trusted {
        /// The author's name in `[trust.authors]`.
        author: String,
        /// The key, hex.
        key: String,
    },
    /// A valid signature by a key nobody trusts (yet).
    Untrusted {
        /// The key, hex.
        key: String,
    },
    /// A signature file that does not verify against these bytes.
    Invalid(String),
}

impl SignatureStatus {
    /// One line for the administrator.
    pub fn describe(&self) -> String {
        match self {
            SignatureStatus::Unsigned => "unsigned".into(),
            SignatureStatus::Trusted { author, key } => {
                format!("signed by {author} (trusted key {})", short(key))
            }
            SignatureStatus::Untrusted { key } => {
                format!("signed by an untrusted key {}", short(key))
            }
            SignatureStatus::Invalid(why) => format!("INVALID SIGNATURE: {why}"),
        }
    }

    /// The signing key, if the signature is valid.
    pub fn key(&self) -> Option<&str> {
        match self {
            SignatureStatus::Trusted { key, .. } | SignatureStatus::Untrusted { key } => Some(key),
            _ => None,
        }
    }
}

fn short(key: &str) -> &str {
    key.get(..16).unwrap_or(key)
}

fn message(bytes: &[u8]) -> Vec<u8> {
    let mut m = DOMAIN.to_vec();
    m.extend_from_slice(&Sha256::digest(bytes));
    m
}

/// The path of a plugin's signature file.
pub fn sig_path(plugin: &Path) -> std::path::PathBuf {
    let mut s = plugin.as_os_str().to_owned();
    s.push(".sig");
    std::path::PathBuf::from(s)
}

/// Checks the signature beside `plugin` against `bytes` (the plugin's content as read).
pub fn verify(plugin: &Path, bytes: &[u8], trusted: &BTreeMap<String, String>) -> SignatureStatus {
    let path = sig_path(plugin);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return SignatureStatus::Unsigned;
    };
    let f: SigFile = match serde_json::from_str(&text) {
        Ok(f) => f,
        Err(e) => return SignatureStatus::Invalid(format!("{} is malformed: {e}", path.display())),
    };
    if f.alg != "ed25519" {
        return SignatureStatus::Invalid(format!("unknown algorithm {:?}", f.alg));
    }
    let key_bytes: [u8; 32] = match hex::decode(&f.key).ok().and_then(|b| b.try_into().ok()) {
        Some(k) => k,
        None => return SignatureStatus::Invalid("the key is not 32 hex-encoded bytes".into()),
    };
    let sig_bytes: [u8; 64] = match hex::decode(&f.sig).ok().and_then(|b| b.try_into().ok()) {
        Some(s) => s,
        None => {
            return SignatureStatus::Invalid("the signature is not 64 hex-encoded bytes".into());
        }
    };
    let Ok(key) = VerifyingKey::from_bytes(&key_bytes) else {
        return SignatureStatus::Invalid("the key is not a valid ed25519 public key".into());
    };
    if key
        .verify(&message(bytes), &Signature::from_bytes(&sig_bytes))
        .is_err()
    {
        return SignatureStatus::Invalid(
            "it does not match the plugin's bytes (the file changed after signing)".into(),
        );
    }
    let key_hex = f.key.to_ascii_lowercase();
    match trusted
        .iter()
        .find(|(_, k)| k.eq_ignore_ascii_case(&key_hex))
    {
        Some((author, _)) => SignatureStatus::Trusted {
            author: author.clone(),
            key: key_hex,
        },
        None => SignatureStatus::Untrusted { key: key_hex },
    }
}

/// Signing failed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key file is not a key.
    #[error("{0} is not a capnet signing key (64 hex digits made by `capnet sign keygen`)")]
    BadKey(std::path::PathBuf),
    /// No randomness.
    #[error("cannot get randomness for a key: {0}")]
    Random(String),
}

/// Makes a new signing key; returns (secret key hex, public key hex).
pub fn keygen() -> Result<(String, String), SignError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| SignError::Random(e.to_string()))?;
    let key = SigningKey::from_bytes(&seed);
    Ok((
        hex::encode(seed),
        hex::encode(key.verifying_key().to_bytes()),
    ))
}

/// Signs `plugin` with the secret key in `key_file`, writing `PLUGIN.sig`. Returns the
/// public key (hex).
pub fn sign(plugin: &Path, key_file: &Path) -> Result<String, SignError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SignError::Io { path, source }
    };
    let text = std::fs::read_to_string(key_file).map_err(io(key_file))?;
    let seed: [u8; 32] = hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| SignError::BadKey(key_file.to_path_buf()))?;
    let key = SigningKey::from_bytes(&seed);
    let bytes = std::fs::read(plugin).map_err(io(plugin))?;
    let sig = key.sign(&message(&bytes));
    let public = hex::encode(key.verifying_key().to_bytes());
    let file = SigFile {
        alg: "ed25519".into(),
        key: public.clone(),
        sig: hex::encode(sig.to_bytes()),
    };
    let out = sig_path(plugin);
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&file).unwrap_or_default(),
    )
    .map_err(io(&out))?;
    Ok(public)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signature verifies for its bytes, names a trusted author, and fails for changed
    /// bytes; no signature file means unsigned.
    #[test]
    fn sign_and_verify() {
        let dir = tempfile::tempdir().expect("tmp");
        let plugin = dir.path().join("p.so");
        std::fs::write(&plugin, b"plugin bytes").expect("write");
        assert_eq!(
            verify(&plugin, b"plugin bytes", &BTreeMap::new()),
            SignatureStatus::Unsigned
        );
        let (secret, public) = keygen().expect("keygen");
        let key_file = dir.path().join("key");
        std::fs::write(&key_file, &secret).expect("key");
        assert_eq!(sign(&plugin, &key_file).expect("sign"), public);
        let mut trust = BTreeMap::new();
        assert!(matches!(
            verify(&plugin, b"plugin bytes", &trust),
            SignatureStatus::Untrusted { key } if key == public
        ));
        trust.insert("acme".to_string(), public.clone());
        assert!(matches!(
            verify(&plugin, b"plugin bytes", &trust),
            SignatureStatus::Trusted { author, .. } if author == "acme"
        ));
        assert!(matches!(
            verify(&plugin, b"plugin byteZ", &trust),
            SignatureStatus::Invalid(_)
        ));
        std::fs::write(&key_file, "nonsense").expect("key");
        assert!(matches!(
            sign(&plugin, &key_file),
            Err(SignError::BadKey(_))
        ));
    }
}
