//! weft-hbone-probe: a deliberately independent HBONE peer for end-to-end
//! tests. It dials a pod's 15008 as a mesh client would (with a certificate
//! from the mesh CA or from a foreign one, expecting a chosen server
//! identity), or sends raw hostile bytes. Prints one JSON line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_api::Identity;
use weft_hbone::{client, tls};
use weft_pki::LocalCa;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn need(args: &[String], name: &str) -> String {
    arg(args, name).unwrap_or_else(|| {
        eprintln!("weft-hbone-probe: missing {name}");
        std::process::exit(2)
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = match args.get(1).map(String::as_str) {
        Some("connect") => connect(&args).await,
        Some("raw") => raw(&args).await,
        Some("csr") => csr(&args).await,
        Some("idle-flood") => idle_flood(&args).await,
        Some("slowloris") => slowloris(&args).await,
        _ => {
            eprintln!("usage: weft-hbone-probe connect --to IP:15008 --target IP:PORT --identity SPIFFE --expect SPIFFE (--ca-dir DIR | --foreign-ca) [--forwarded IP] [--pq-only]\n       weft-hbone-probe raw --to IP:PORT --kind garbage|http1|truncated-tls\n       weft-hbone-probe csr --controller https://IP:PORT --ca-file ROOT.pem --token T --identity SPIFFE\n       weft-hbone-probe idle-flood --to IP:15008 --count N --hold-secs S --identity SPIFFE --expect SPIFFE --ca-dir DIR");
            std::process::exit(2)
        }
    };
    println!("{out}");
}

async fn connect(args: &[String]) -> serde_json::Value {
    let to: SocketAddr = need(args, "--to").parse().expect("--to ip:port");
    let target: SocketAddr = need(args, "--target").parse().expect("--target ip:port");
    let identity: Identity = need(args, "--identity")
        .parse()
        .expect("--identity spiffe id");
    let expect: Identity = need(args, "--expect").parse().expect("--expect spiffe id");
    let ca = if args.iter().any(|a| a == "--foreign-ca") {
        LocalCa::generate("cluster.local").expect("generate foreign CA")
    } else {
        LocalCa::load(&PathBuf::from(need(args, "--ca-dir")), "cluster.local")
            .expect("load mesh CA")
    };
    let result = async {
        let cert = ca.sign(&identity, Duration::from_secs(3600))?;
        // A foreign client still trusts the real mesh roots when it has
        // them (the signing root and any still trusted during a rotation),
        // so the only thing wrong is its own certificate.
        let trust = match arg(args, "--ca-dir") {
            Some(dir) => {
                let dir = PathBuf::from(dir);
                let mut trust = LocalCa::load(&dir, "cluster.local")?.trust_bundle();
                if let Ok(previous) = std::fs::read_to_string(dir.join("previous-roots.pem")) {
                    trust = trust.merged(&weft_pki::TrustBundle::from_pem(&previous)?);
                }
                trust
            }
            None => ca.trust_bundle(),
        };
        // `--pq-only`: offer only the hybrid post-quantum group.
        let cfg = if args.iter().any(|a| a == "--pq-only") {
            let mut provider = rustls::crypto::aws_lc_rs::default_provider();
            provider
                .kx_groups
                .retain(|g| g.name() == rustls::NamedGroup::X25519MLKEM768);
            tls::client_config_with(&cert, &trust, &expect, std::sync::Arc::new(provider))?
        } else {
            tls::client_config(&cert, &trust, &expect)?
        };
        let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(to))
            .await??;
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            client::connect(tcp, cfg, &Default::default()),
        )
        .await??;
        let kx_group = format!("{:?}", conn.key_exchange_group());
        // `--forwarded IP`: claim a client address, as a source ztunnel's
        // `forwarded` header does.
        let mut headers = http::HeaderMap::new();
        if let Some(ip) = arg(args, "--forwarded") {
            headers.insert(http::header::FORWARDED, format!("for={ip}").parse()?);
        }
        let mut stream =
            tokio::time::timeout(Duration::from_secs(5), conn.open(target, headers)).await??;
        stream.write_all(b"WHO\n").await?;
        let mut buf = vec![0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await??;
        anyhow::Ok((
            String::from_utf8_lossy(&buf[..n]).trim().to_owned(),
            kx_group,
        ))
    }
    .await;
    match result {
        Ok((reply, kx_group)) => json!({ "ok": true, "reply": reply, "kx_group": kx_group }),
        Err(e) => json!({ "ok": false, "error": format!("{e:#}") }),
    }
}

async fn raw(args: &[String]) -> serde_json::Value {
    let to: SocketAddr = need(args, "--to").parse().expect("--to ip:port");
    let kind = need(args, "--kind");
    let payload: Vec<u8> = match kind.as_str() {
        "garbage" => (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect(),
        "http1" => b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        // A TLS record header announcing a 512-byte ClientHello, then only
        // part of it.
        "truncated-tls" => vec![
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0xaa, 0xbb,
        ],
        other => return json!({ "ok": false, "error": format!("unknown kind {other}") }),
    };
    let result = async {
        let mut s =
            tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(to))
                .await??;
        s.write_all(&payload).await?;
        s.shutdown().await?;
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut got)).await;
        anyhow::Ok((read.is_ok(), got))
    }
    .await;
    match result {
        Ok((closed, got)) => json!({
            "ok": true,
            "closed_by_server": closed,
            "response_bytes": got.len(),
            "response_text": String::from_utf8_lossy(&got).chars().filter(|c| !c.is_control()).take(200).collect::<String>(),
        }),
        Err(e) => json!({ "ok": false, "error": format!("{e:#}") }),
    }
}

/// Opens `--count` authenticated HBONE connections that open no stream and
/// holds them up to `--hold-secs`; reports how many were established and
/// how many the server closed meanwhile.
async fn idle_flood(args: &[String]) -> serde_json::Value {
    let to: SocketAddr = need(args, "--to").parse().expect("--to ip:port");
    let count: usize = need(args, "--count").parse().expect("--count N");
    let hold = Duration::from_secs(need(args, "--hold-secs").parse().expect("--hold-secs S"));
    let identity: Identity = need(args, "--identity")
        .parse()
        .expect("--identity spiffe id");
    let expect: Identity = need(args, "--expect").parse().expect("--expect spiffe id");
    let dir = PathBuf::from(need(args, "--ca-dir"));
    let result = async {
        let ca = LocalCa::load(&dir, "cluster.local")?;
        let cert = ca.sign(&identity, Duration::from_secs(3600))?;
        let cfg = tls::client_config(&cert, &ca.trust_bundle(), &expect)?;
        let mut conns = Vec::with_capacity(count);
        for _ in 0..count {
            let tcp =
                tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(to))
                    .await??;
            let conn = tokio::time::timeout(
                Duration::from_secs(5),
                client::connect(
                    tcp,
                    cfg.clone(),
                    &weft_hbone::H2Settings {
                        keepalive_interval: None,
                        ..Default::default()
                    },
                ),
            )
            .await??;
            conns.push(conn);
        }
        let deadline = tokio::time::Instant::now() + hold;
        while tokio::time::Instant::now() < deadline && conns.iter().any(|c| !c.is_closed()) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let closed = conns.iter().filter(|c| c.is_closed()).count();
        anyhow::Ok((conns.len(), closed))
    }
    .await;
    match result {
        Ok((opened, closed)) => json!({ "ok": true, "opened": opened, "closed_by_server": closed }),
        Err(e) => json!({ "ok": false, "error": format!("{e:#}") }),
    }
}

/// Opens `--count` plain TCP connections to an HTTP port, sends half a
/// request head on each and nothing more, and holds them up to
/// `--hold-secs`; reports how many the server closed meanwhile.
async fn slowloris(args: &[String]) -> serde_json::Value {
    let to: SocketAddr = need(args, "--to").parse().expect("--to ip:port");
    let count: usize = need(args, "--count").parse().expect("--count N");
    let hold = Duration::from_secs(need(args, "--hold-secs").parse().expect("--hold-secs S"));
    let result = async {
        let mut conns = Vec::with_capacity(count);
        for _ in 0..count {
            let mut s =
                tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(to))
                    .await??;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await?;
            conns.push(s);
        }
        let deadline = tokio::time::Instant::now() + hold;
        let mut closed = vec![false; conns.len()];
        while tokio::time::Instant::now() < deadline && closed.iter().any(|c| !c) {
            for (c, done) in conns.iter_mut().zip(closed.iter_mut()) {
                if *done {
                    continue;
                }
                let mut buf = [0u8; 512];
                if let Ok(r) =
                    tokio::time::timeout(Duration::from_millis(1), c.read(&mut buf)).await
                {
                    // EOF, an error, or an answer (a 408) all end it.
                    *done = matches!(r, Ok(0) | Err(_)) || r.is_ok();
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok((conns.len(), closed.iter().filter(|c| **c).count()))
    }
    .await;
    match result {
        Ok((opened, closed)) => json!({ "ok": true, "opened": opened, "closed_by_server": closed }),
        Err(e) => json!({ "ok": false, "error": format!("{e:#}") }),
    }
}

/// Asks the controller's CA for a certificate, as a ztunnel would.
async fn csr(args: &[String]) -> serde_json::Value {
    use weft_api::proto::ca_client::CaClient;
    use weft_api::proto::CreateCertificateRequest;
    let controller = need(args, "--controller");
    let token = need(args, "--token");
    let identity: Identity = need(args, "--identity")
        .parse()
        .expect("--identity spiffe id");
    let result = async {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(identity.to_string().try_into()?)];
        let csr_pem = params.serialize_request(&key)?.pem()?;
        let mut endpoint = tonic::transport::Endpoint::from_shared(controller)?;
        if let Some(ca) = arg(args, "--ca-file") {
            endpoint = endpoint.tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(ca)?))
                    .domain_name("weft-controller"),
            )?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect()
            .await?;
        let mut req = tonic::Request::new(CreateCertificateRequest {
            csr_pem,
            requested_ttl_seconds: 3600,
        });
        req.metadata_mut()
            .insert("authorization", weft_api::proto::bearer(&token).parse()?);
        let resp = CaClient::new(channel).create_certificate(req).await;
        anyhow::Ok(resp)
    }
    .await;
    match result {
        Ok(Ok(resp)) => json!({ "ok": true, "chain_len": resp.into_inner().cert_chain_pem.len() }),
        Ok(Err(status)) => {
            json!({ "ok": false, "code": format!("{:?}", status.code()), "error": status.message() })
        }
        Err(e) => json!({ "ok": false, "error": format!("{e:#}") }),
    }
}
