//! TLS tools for the security tests: look at what a tunnel endpoint presents, try a
//! TLS 1.2 handshake, impersonate a tunnel endpoint with a chosen certificate, and make
//! such certificates.
use std::{net::SocketAddr, path::Path, sync::Arc, sync::Mutex, time::Duration};

use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};
use serde_json::json;
use tokio::io::AsyncWriteExt as _;

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts any server certificate and remembers it.
#[derive(Debug, Default)]
struct Record(Mutex<Option<Vec<u8>>>);

impl ServerCertVerifier for Record {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

async fn handshake(
    addr: SocketAddr,
    version: &'static rustls::SupportedProtocolVersion,
) -> (Result<(), String>, Option<Vec<u8>>) {
    let record = Arc::new(Record::default());
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[version])
        .map(|b| {
            let mut c = b
                .dangerous()
                .with_custom_certificate_verifier(record.clone())
                .with_no_client_auth();
            c.alpn_protocols = vec![b"h2".to_vec()];
            c
        });
    let config = match config {
        Ok(c) => c,
        Err(e) => return (Err(e.to_string()), None),
    };
    let result = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let _ = tls.shutdown().await;
        Ok(())
    };
    let result = tokio::time::timeout(Duration::from_secs(5), result)
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
    let cert = record.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
    (result, cert)
}

/// {"serial": hex, "uri": SAN URI, "not_after": unix secs} of the server's certificate.
pub async fn peek(addr: SocketAddr) -> anyhow::Result<serde_json::Value> {
    let (_, cert) = handshake(addr, &rustls::version::TLS13).await;
    let der = cert.ok_or_else(|| anyhow::anyhow!("no certificate from {addr}"))?;
    let (_, x) = x509_parser::parse_x509_certificate(&der)?;
    let uri = x
        .subject_alternative_name()?
        .and_then(|s| {
            s.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
        })
        .unwrap_or_default();
    let sans: Vec<String> = x
        .subject_alternative_name()?
        .map(|s| {
            s.value
                .general_names
                .iter()
                .map(|n| n.to_string())
                .collect()
        })
        .unwrap_or_default();
    let ca = x.basic_constraints()?.map(|b| b.value.ca);
    let key_usage = x.key_usage()?.map(|k| {
        json!({
            "digital_signature": k.value.digital_signature(),
            "key_encipherment": k.value.key_encipherment(),
            "key_cert_sign": k.value.key_cert_sign(),
        })
    });
    let ext_key_usage = x
        .extended_key_usage()?
        .map(|e| json!({ "server_auth": e.value.server_auth, "client_auth": e.value.client_auth }));
    Ok(json!({
        "serial": x.raw_serial_as_string(),
        "uri": uri,
        "not_after": x.validity().not_after.timestamp(),
        "subject_attributes": x.subject().iter().count(),
        "sans": sans,
        "ca": ca,
        "key_usage": key_usage,
        "ext_key_usage": ext_key_usage,
    }))
}

/// {"handshake": "ok"} or {"handshake": "failed", "error": ...} for a TLS 1.2 client.
pub async fn probe_tls12(addr: SocketAddr) -> serde_json::Value {
    match handshake(addr, &rustls::version::TLS12).await.0 {
        Ok(()) => json!({"handshake": "ok"}),
        Err(e) => json!({"handshake": "failed", "error": e}),
    }
}

/// A TLS 1.3 server with the given chain; prints one JSON line per handshake to stdout
/// ({"handshake": "ok"} or {"handshake": "failed", "error": ...}), then closes.
pub async fn serve(port: u16, cert: &Path, key: &Path) -> anyhow::Result<()> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert)?.collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    eprintln!("listening on {port}");
    loop {
        let (tcp, _) = listener.accept().await?;
        let line = match acceptor.accept(tcp).await {
            Ok(_) => json!({"handshake": "ok"}),
            Err(e) => json!({"handshake": "failed", "error": e.to_string()}),
        };
        println!("{line}");
    }
}

/// A leaf certificate for `uri`, valid from `not_before` to `not_after` (unix
/// seconds), signed by the CA in `ca_cert`/`ca_key` (PEM). Returns (chain PEM, key PEM).
pub fn issue(
    uri: &str,
    ca_cert: &str,
    ca_key: &str,
    not_before: i64,
    not_after: i64,
) -> anyhow::Result<(String, String)> {
    let ca_key = rcgen::KeyPair::from_pem(ca_key)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(ca_cert, ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into()?)];
    params.not_before = time::OffsetDateTime::from_unix_timestamp(not_before)?;
    params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after)?;
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A self-signed CA of nobody's mesh. Returns (cert PEM, key PEM).
pub fn rogue_ca() -> anyhow::Result<(String, String)> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "rogue CA");
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A TLS 1.3 client that presents a workload certificate and accepts any server (the
/// tests look at what the server does, not at who it is), with ALPN h2.
fn workload_connector(
    chain_pem: &str,
    key_pem: &str,
) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Record::default()))
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// One HBONE exchange: mTLS to `addr`, then one HTTP/2 CONNECT to `target`. Returns
/// how the TLS handshake went ("full" or "resumed") and the CONNECT's status (or why
/// there was none); a failed TLS handshake is the error.
async fn hbone_exchange(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    target: &str,
) -> anyhow::Result<(&'static str, anyhow::Result<u16>)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = connector
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await?;
    let kind = match tls.get_ref().1.handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => "resumed",
        _ => "full",
    };
    let status = async {
        let (mut sender, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .handshake(hyper_util::rt::TokioIo::new(tls))
                .await?;
        let task = tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(hyper::Method::CONNECT)
            .uri(target)
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req)).await;
        // Any ticket the server sent after the handshake has been read by now.
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(sender);
        task.abort();
        Ok(resp??.status().as_u16())
    }
    .await;
    Ok((kind, status))
}

/// An HBONE client with a given workload certificate: mTLS 1.3 to `addr`, then one
/// HTTP/2 CONNECT to `target`. Returns the status the tunnel endpoint answered.
pub async fn connect_status(
    addr: SocketAddr,
    target: &str,
    chain_pem: &str,
    key_pem: &str,
) -> anyhow::Result<u16> {
    let connector = workload_connector(chain_pem, key_pem)?;
    hbone_exchange(&connector, addr, target).await?.1
}

/// Connects twice with one client config (which keeps session tickets) and says how
/// the second handshake went: "resumed" if the server let the session be resumed.
pub async fn second_handshake(
    addr: SocketAddr,
    target: &str,
    chain_pem: &str,
    key_pem: &str,
) -> anyhow::Result<&'static str> {
    let connector = workload_connector(chain_pem, key_pem)?;
    // The first exchange is there to leave a session ticket, whatever its CONNECT got.
    let _first = hbone_exchange(&connector, addr, target).await?;
    Ok(hbone_exchange(&connector, addr, target).await?.0)
}
