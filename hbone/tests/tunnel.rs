//! CONNECT tunnels end to end over 127.0.0.1 with mutual TLS: data
//! integrity, half-close, many streams per connection, status codes.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use weft_hbone::{FailureReason, HboneError, InboundTunnel};

#[tokio::test]
async fn round_trip_carries_megabytes_intact_and_passes_metadata() {
    let mesh = Mesh::new();
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let (addr, _results) = start_server(
        mesh.server_tls(&server_id()),
        fast_settings(),
        move |tunnel: InboundTunnel| {
            let seen_tx = seen_tx.clone();
            async move {
                let _ = seen_tx.send((
                    tunnel.target,
                    tunnel.peer.clone(),
                    tunnel.headers.clone(),
                    tunnel.forwarded_for(),
                ));
                echo(tunnel).await;
            }
        },
    )
    .await;

    let conn = within(
        "dial",
        dial(addr, mesh.client_tls(&client_id(), &server_id())),
    )
    .await
    .expect("dial");
    assert_eq!(conn.peer_identity(), &server_id());

    let mut headers = HeaderMap::new();
    headers.insert("forwarded", HeaderValue::from_static("for=10.0.0.7"));
    headers.insert(
        "baggage",
        HeaderValue::from_static("k8s.namespace.name=shop"),
    );
    headers.insert(
        "traceparent",
        HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    );
    let stream = within("open", conn.open(target(), headers))
        .await
        .expect("open");
    assert_eq!(conn.active_streams(), 1);

    let data = random_bytes(6 * 1024 * 1024 + 123);
    let echoed = within("echo", echo_round_trip(stream, &data)).await;
    assert_eq!(echoed.len(), data.len());
    assert_eq!(sha256(&echoed), sha256(&data));

    let (seen_target, seen_peer, seen_headers, forwarded_for) =
        seen_rx.recv().await.expect("handler saw the tunnel");
    assert_eq!(seen_target, target());
    assert_eq!(seen_peer, client_id());
    assert_eq!(seen_headers["forwarded"], "for=10.0.0.7");
    assert_eq!(seen_headers["baggage"], "k8s.namespace.name=shop");
    assert_eq!(
        seen_headers["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert_eq!(forwarded_for, Some("10.0.0.7".parse().expect("ip")));
    // The stream was dropped by echo_round_trip.
    assert_eq!(conn.active_streams(), 0);
}

#[tokio::test]
async fn client_half_close_still_receives_the_reply() {
    let mesh = Mesh::new();
    let (addr, _results) = start_server(
        mesh.server_tls(&server_id()),
        fast_settings(),
        |tunnel: InboundTunnel| async move {
            let Ok(mut stream) = tunnel.accept() else {
                return;
            };
            let mut request = Vec::new();
            // Only returns once the client's END_STREAM arrived.
            if stream.read_to_end(&mut request).await.is_err() {
                return;
            }
            let reply = format!(
                "got {} bytes: {}",
                request.len(),
                String::from_utf8_lossy(&request)
            );
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
        },
    )
    .await;
    let conn = dial(addr, mesh.client_tls(&client_id(), &server_id()))
        .await
        .expect("dial");
    let mut stream = conn.open(target(), HeaderMap::new()).await.expect("open");
    stream.write_all(b"ping").await.expect("write");
    stream.shutdown().await.expect("half-close");
    let mut reply = String::new();
    within("reply", stream.read_to_string(&mut reply))
        .await
        .expect("read reply");
    assert_eq!(reply, "got 4 bytes: ping");
    // Writing after our own shutdown is an error, not a silent drop.
    assert!(stream.write_all(b"late").await.is_err());
}

#[tokio::test]
async fn server_half_close_reaches_client_and_client_can_still_send() {
    let mesh = Mesh::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let (addr, _results) = start_server(
        mesh.server_tls(&server_id()),
        fast_settings(),
        move |tunnel: InboundTunnel| {
            let done_tx = done_tx.clone();
            async move {
                let Ok(mut stream) = tunnel.accept() else {
                    return;
                };
                let _ = stream.write_all(b"banner").await;
                let _ = stream.shutdown().await;
                let mut rest = Vec::new();
                let result = stream.read_to_end(&mut rest).await.map(|_| rest);
                let _ = done_tx.send(result.map_err(|e| e.to_string()));
            }
        },
    )
    .await;
    let conn = dial(addr, mesh.client_tls(&client_id(), &server_id()))
        .await
        .expect("dial");
    let mut stream = conn.open(target(), HeaderMap::new()).await.expect("open");
    let mut banner = Vec::new();
    within("server EOF", stream.read_to_end(&mut banner))
        .await
        .expect("read to server's END_STREAM");
    assert_eq!(banner, b"banner");
    stream
        .write_all(b"after your EOF")
        .await
        .expect("write after peer EOF");
    stream.shutdown().await.expect("shutdown");
    let got = within("server read", done_rx.recv())
        .await
        .expect("handler finished")
        .expect("server read ok");
    assert_eq!(got, b"after your EOF");
}

#[tokio::test]
async fn hundred_concurrent_streams_share_one_connection() {
    let mesh = Mesh::new();
    let (addr, _results) = start_server(mesh.server_tls(&server_id()), fast_settings(), echo).await;
    let conn = dial(addr, mesh.client_tls(&client_id(), &server_id()))
        .await
        .expect("dial");

    let peak = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(100));
    let mut tasks = Vec::new();
    for i in 0..100u32 {
        let conn = conn.clone();
        let peak = peak.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let stream = conn.open(target(), HeaderMap::new()).await.expect("open");
            // All 100 streams are open at the same time here.
            barrier.wait().await;
            peak.fetch_max(conn.active_streams(), Ordering::AcqRel);
            let data = format!("stream {i} ").repeat(4000).into_bytes();
            let echoed = echo_round_trip(stream, &data).await;
            assert_eq!(echoed, data, "stream {i}");
        }));
    }
    within("100 streams", async {
        for t in tasks {
            t.await.expect("stream task");
        }
    })
    .await;
    assert_eq!(peak.load(Ordering::Acquire), 100);
    assert_eq!(conn.active_streams(), 0);
    assert!(!conn.is_closed());
}

#[tokio::test]
async fn rejections_surface_as_status_codes() {
    let mesh = Mesh::new();
    let (addr, _results) = start_server(
        mesh.server_tls(&server_id()),
        fast_settings(),
        |tunnel: InboundTunnel| async move {
            match tunnel.target.port() {
                401 => tunnel.reject(StatusCode::UNAUTHORIZED),
                503 => tunnel.reject(StatusCode::SERVICE_UNAVAILABLE),
                // Dropped without a verdict: must still answer (503).
                _ => drop(tunnel),
            }
        },
    )
    .await;
    let conn = dial(addr, mesh.client_tls(&client_id(), &server_id()))
        .await
        .expect("dial");
    for (port, want) in [(401, 401), (503, 503), (9, 503)] {
        let target = format!("10.1.2.3:{port}").parse().expect("addr");
        let err = within("open", conn.open(target, HeaderMap::new()))
            .await
            .expect_err("must be refused");
        assert_eq!(err.reason(), FailureReason::Status);
        match err {
            HboneError::Status(code) => assert_eq!(code.as_u16(), want, "port {port}"),
            other => panic!("port {port}: want Status({want}), got {other:?}"),
        }
    }
    // A refused stream does not stay counted, and the connection stays usable.
    assert_eq!(conn.active_streams(), 0);
    assert!(!conn.is_closed());
}

/// Raw h2 over the mesh's TLS, for requests our client never sends.
async fn raw_h2(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> h2::client::SendRequest<Bytes> {
    let socket = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let name = rustls_pki_types::ServerName::try_from("hbone.weft.invalid").expect("name");
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(name, socket)
        .await
        .expect("tls");
    let (send, conn) = h2::client::handshake(tls).await.expect("h2");
    tokio::spawn(conn);
    send
}

#[tokio::test]
async fn serve_answers_non_connect_and_bad_authority_itself() {
    let mesh = Mesh::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let handler_calls = calls.clone();
    let (addr, _results) = start_server(
        mesh.server_tls(&server_id()),
        fast_settings(),
        move |tunnel: InboundTunnel| {
            handler_calls.fetch_add(1, Ordering::AcqRel);
            echo(tunnel)
        },
    )
    .await;
    let send = raw_h2(addr, mesh.client_tls(&client_id(), &server_id())).await;

    let get = http::Request::get("https://10.1.2.3:80/")
        .body(())
        .expect("req");
    let (resp, _) = send
        .clone()
        .ready()
        .await
        .expect("ready")
        .send_request(get, true)
        .expect("send");
    assert_eq!(
        within("GET", resp).await.expect("resp").status(),
        StatusCode::METHOD_NOT_ALLOWED
    );

    let bad = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("not-an-ip:80")
        .body(())
        .expect("req");
    let (resp, _) = send
        .clone()
        .ready()
        .await
        .expect("ready")
        .send_request(bad, false)
        .expect("send");
    assert_eq!(
        within("CONNECT", resp).await.expect("resp").status(),
        StatusCode::BAD_REQUEST
    );

    let ipv6 = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("[fd00::1]:8080")
        .body(())
        .expect("req");
    let (resp, _) = send
        .clone()
        .ready()
        .await
        .expect("ready")
        .send_request(ipv6, false)
        .expect("send");
    assert_eq!(
        within("CONNECT v6", resp).await.expect("resp").status(),
        StatusCode::OK
    );
    assert_eq!(
        calls.load(Ordering::Acquire),
        1,
        "only the valid CONNECT reached the handler"
    );
}

#[tokio::test]
async fn drain_lets_open_tunnels_finish_and_refuses_new_ones() {
    let mesh = Mesh::new();
    let (client_io, server_io) = tokio::io::duplex(256 * 1024);
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let server_tls = mesh.server_tls(&server_id());
    let server = tokio::spawn(async move {
        weft_hbone::serve_until(server_io, server_tls, &fast_settings(), echo, async {
            let _ = drain_rx.await;
        })
        .await
    });
    let conn = weft_hbone::connect(
        client_io,
        mesh.client_tls(&client_id(), &server_id()),
        &fast_settings(),
    )
    .await
    .expect("connect");
    let mut open_before = conn.open(target(), HeaderMap::new()).await.expect("open");
    open_before.write_all(b"before ").await.expect("write");

    drain_tx.send(()).expect("drain");
    within("GOAWAY seen", async {
        loop {
            match conn.open(target(), HeaderMap::new()).await {
                Err(_) => break,
                Ok(s) => drop(s),
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        conn.is_closed(),
        "pool must stop using a draining connection"
    );

    // The tunnel opened before the drain still works both ways.
    open_before
        .write_all(b"and after")
        .await
        .expect("write after drain");
    open_before.shutdown().await.expect("shutdown");
    let mut echoed = Vec::new();
    within("echo", open_before.read_to_end(&mut echoed))
        .await
        .expect("read");
    assert_eq!(echoed, b"before and after");
    drop(open_before);
    within("serve returns", server)
        .await
        .expect("join")
        .expect("clean end");
}
