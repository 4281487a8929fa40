//! Networks granted with `encryption = tls`: the driver wraps each connection in TLS,
//! verified against the configured CA set, and the grain sees plain bytes.

use std::sync::Arc;

use capnet_driver_api::capnet_schemas::bytestream;
use capnet_driver_api::testing::{GrantConfig, Harness, HarnessConfig, PlainDriver, run_local};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

struct Pki {
    ca_pem: String,
    cert: rustls::pki_types::CertificateDer<'static>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
}

/// A throwaway CA and a server certificate for `name` signed by it.
fn pki(name: &str) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
    let leaf_key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(vec![name.to_string()])
        .expect("params")
        .signed_by(&leaf_key, &ca)
        .expect("leaf");
    Pki {
        ca_pem: ca.pem(),
        cert: leaf.der().clone(),
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    }
}

/// A TLS echo server on 127.0.0.1 presenting `pki`'s certificate.
async fn tls_echo(pki: &Pki) -> u16 {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![pki.cert.clone()], pki.key.clone_key())
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::task::spawn_local(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::task::spawn_local(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// What keeps a TLS connection of these tests alive: the harness, the grant (the
/// connection lives only as long as its grant) and the directory holding the CA file.
type Keep = (
    Harness,
    capnet_driver_api::testing::TestGrant,
    tempfile::TempDir,
);

/// Connects through a TLS grant that trusts only `ca_pem`.
async fn connect_via(
    ca_pem: &str,
    port: u16,
) -> Result<(tokio::io::DuplexStream, Keep), capnp::Error> {
    let dir = tempfile::Builder::new()
        .prefix("capnet-tls-")
        .tempdir()
        .expect("tmp dir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).expect("write ca");
    let h = Harness::start::<PlainDriver>(HarnessConfig {
        options_toml: format!(
            "system_ca = false\nextra_ca_files = [{:?}]\nstatic_hosts = {{ \"tls.test\" = [\"127.0.0.1\"] }}\n",
            ca.display().to_string()
        ),
        ..Default::default()
    })
    .await?;
    let grant = h
        .open_grant(GrantConfig {
            tls: true,
            ..Default::default()
        })
        .await?;
    let net = grant.network().await?;
    let mut req = net.get_remote_host_by_name_request();
    req.get().set_address("tls.test");
    let host = req.send().pipeline.get_host();
    let mut req = host.get_tcp_port_request();
    req.get().set_port_num(port);
    let p = req.send().pipeline.get_port();
    let s = bytestream::connect(&p).await?;
    Ok((s, (h, grant, dir)))
}

/// With `encryption = tls` the grain writes and reads plain bytes while the wire carries a
/// TLS session verified against the administrator's CA.
#[test]
fn tls_network_wraps_connections() {
    run_local(async {
        let pki = pki("tls.test");
        let port = tls_echo(&pki).await;
        let (mut s, _keep) = connect_via(&pki.ca_pem, port).await.expect("tls connect");
        s.write_all(b"secret hello").await.expect("write");
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"secret hello");
    });
}

/// A server whose certificate does not chain to a trusted CA is refused: no connection
/// reaches the grain.
#[test]
fn untrusted_certificate_is_refused() {
    run_local(async {
        let server = pki("tls.test");
        let other = pki("tls.test");
        let port = tls_echo(&server).await;
        let err = match connect_via(&other.ca_pem, port).await {
            Ok(_) => panic!("must not trust the server"),
            Err(e) => e,
        };
        assert!(
            err.to_string().contains("TLS handshake with tls.test"),
            "{err}"
        );
    });
}
