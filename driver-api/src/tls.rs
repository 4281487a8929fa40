//! TLS client for drivers: rustls, verified against the system CA set.
//!
//! Used when a grant asks for `encryption = tls` and by protocol drivers that upgrade a
//! connection (SMTP STARTTLS). Certificates are verified against the CA certificates the
//! driver host sees read-only (`/etc/ssl/certs`), plus any `extra_ca_files` the
//! administrator lists in the driver's options (tests use a test CA this way).

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub use rustls::ClientConfig;

/// Building the TLS client configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A CA file could not be read or parsed.
    #[error("cannot read CA certificates from {path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// No CA certificate could be loaded at all.
    #[error(
        "no CA certificates found (system store unreadable and no extra_ca_files): {0}; install \
         ca-certificates or set extra_ca_files in the driver's options"
    )]
    NoRoots(String),
    /// rustls refused the configuration.
    #[error("TLS configuration failed: {0}")]
    Config(#[from] rustls::Error),
}

/// Builds a client configuration trusting the system CAs (if `system`) and `extra` files.
pub fn client_config(
    system: bool,
    extra: &[PathBuf],
) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    let mut system_note = String::from("system store not used");
    if system {
        let loaded = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(loaded.certs);
        system_note = format!(
            "{added} system certificates, {} errors",
            loaded.errors.len()
        );
    }
    for path in extra {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| TlsSetupError::CaFile {
                path: path.clone(),
                reason: e.to_string(),
            })?
            .collect::<Result<_, _>>()
            .map_err(|e| TlsSetupError::CaFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(TlsSetupError::CaFile {
                path: path.clone(),
                reason: "no PEM certificate in the file".into(),
            });
        }
        for cert in certs {
            roots.add(cert).map_err(|e| TlsSetupError::CaFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        }
    }
    if roots.is_empty() {
        return Err(TlsSetupError::NoRoots(system_note));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Performs a verified TLS handshake over `stream` for `server_name` (a DNS name or an IP
/// address).
pub async fn connect<S>(
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
    stream: S,
) -> std::io::Result<TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(server_name.to_string()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{server_name:?} is not a valid TLS server name: {e}"),
        )
    })?;
    TlsConnector::from(config).connect(name, stream).await
}
