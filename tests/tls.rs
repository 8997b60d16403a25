//! Passthrough and the Batch API client over TLS: Ferry talks `https://` to
//! a TLS terminator (in this test process, signed by a test CA) in front of
//! the emulator, trusting the CA through `server.upstream_ca_file`.

mod common;

use std::sync::Arc;

use common::chat;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use serde_json::Value;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA and a certificate for 127.0.0.1 signed by it; returns the CA's PEM
/// and the server's TLS config.
fn test_pki() -> (String, ServerConfig) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    (ca.pem(), config)
}

/// Terminates TLS on 127.0.0.1:0 and relays each connection to `backend`.
async fn tls_terminator(
    config: ServerConfig,
    backend: std::net::SocketAddr,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn passthrough_and_batches_work_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let emulator = common::emulator(dir.path(), &[]);
    let (ca_pem, server_config) = test_pki();
    let tls_addr = tls_terminator(server_config, emulator.addr("emulator")).await;
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let cfg = common::config(
        dir.path(),
        tls_addr,
        "max_wait_secs = 0.2",
        &format!("upstream_ca_file = \"{}\"", ca_file.display()),
    )
    .replace(
        &format!("http://{tls_addr}/v1"),
        &format!("https://{tls_addr}/v1"),
    );
    assert!(cfg.contains("https://"), "{cfg}");
    let ferry = common::ferry(dir.path(), &cfg);
    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://{}{p}", ferry.addr("proxy"));

    // Passthrough through pingora's TLS connector.
    let r = http
        .get(url("/v1/models"))
        .bearer_auth("alice-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", ferry.logs());
    let r = http
        .post(url("/v1/chat/completions"))
        .bearer_auth("alice-key")
        .json(&chat("gpt-4o-mini", "over tls"))
        .send()
        .await
        .unwrap();
    let c: Value = r.json().await.unwrap();
    assert_eq!(c["choices"][0]["message"]["content"], "echo: over tls");

    // The Batch API client: upload, create, poll, download over TLS.
    let r = http
        .post(url("/v1/chat/completions"))
        .bearer_auth("alice-key")
        .header("prefer", "respond-async, wait=60")
        .json(&chat("gpt-4o-mini", "batched over tls"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", ferry.logs());
    let c: Value = r.json().await.unwrap();
    assert_eq!(
        c["choices"][0]["message"]["content"],
        "echo: batched over tls"
    );
}

#[tokio::test]
async fn an_untrusted_upstream_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let emulator = common::emulator(dir.path(), &[]);
    let (_ca_pem, server_config) = test_pki();
    let tls_addr = tls_terminator(server_config, emulator.addr("emulator")).await;
    // A different CA than the one that signed the server's certificate.
    let (other_ca, _) = test_pki();
    let ca_file = dir.path().join("other-ca.pem");
    std::fs::write(&ca_file, other_ca).unwrap();
    let cfg = common::config(
        dir.path(),
        tls_addr,
        "",
        &format!("upstream_ca_file = \"{}\"", ca_file.display()),
    )
    .replace(
        &format!("http://{tls_addr}/v1"),
        &format!("https://{tls_addr}/v1"),
    );
    let ferry = common::ferry(dir.path(), &cfg);
    let r = reqwest::Client::new()
        .get(format!("http://{}/v1/models", ferry.addr("proxy")))
        .bearer_auth("alice-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "upstream_unreachable");
}
