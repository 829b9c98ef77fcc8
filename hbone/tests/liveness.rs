//! Connections that stop being useful are let go: a client notices a peer
//! that no longer answers HTTP/2 PINGs, and a server closes an
//! authenticated connection that carries no tunnel, over real sockets.

mod common;

use std::time::Duration;

use common::*;
use http::HeaderMap;
use tokio::net::{TcpListener, TcpStream};
use weft_hbone::{connect, H2Settings};

/// Forwards bytes between a client and `upstream` until `freeze` fires,
/// then holds both sockets open and forwards nothing (a peer that died
/// without closing, or a network that black-holes).
async fn freezable_relay(
    upstream: std::net::SocketAddr,
) -> (std::net::SocketAddr, tokio::sync::watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (freeze, frozen) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let Ok((client, _)) = listener.accept().await else {
            return;
        };
        let Ok(server) = TcpStream::connect(upstream).await else {
            return;
        };
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let mut f1 = frozen.clone();
        let mut f2 = frozen;
        let up = async move {
            tokio::select! {
                _ = tokio::io::copy(&mut cr, &mut sw) => {}
                _ = f1.wait_for(|f| *f) => {}
            }
            // Keep the halves alive: nothing closes, nothing flows.
            std::future::pending::<()>().await;
            drop((cr, sw));
        };
        let down = async move {
            tokio::select! {
                _ = tokio::io::copy(&mut sr, &mut cw) => {}
                _ = f2.wait_for(|f| *f) => {}
            }
            std::future::pending::<()>().await;
            drop((sr, cw));
        };
        tokio::join!(up, down);
    });
    (addr, freeze)
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_retired() {
    let mesh = Mesh::new();
    let (server, _results) =
        start_server(mesh.server_tls(&server_id()), fast_settings(), echo).await;
    let (relay, freeze) = freezable_relay(server).await;
    let settings = H2Settings {
        keepalive_interval: Some(Duration::from_millis(200)),
        keepalive_timeout: Duration::from_millis(300),
        ..fast_settings()
    };
    let tcp = TcpStream::connect(relay).await.unwrap();
    let conn = connect(tcp, mesh.client_tls(&client_id(), &server_id()), &settings)
        .await
        .expect("connect through the relay");
    // Alive while PINGs are answered.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!conn.is_closed(), "an answering peer keeps the connection");
    let stream = conn.open(target(), HeaderMap::new()).await.expect("open");
    assert_eq!(within("echo", echo_round_trip(stream, b"hi")).await, b"hi");

    freeze.send_replace(true);
    within("retired", async {
        while !conn.is_closed() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_server_closes_a_connection_that_opens_no_tunnel() {
    let mesh = Mesh::new();
    let settings = H2Settings {
        idle_timeout: Some(Duration::from_millis(300)),
        ..fast_settings()
    };
    let (server, mut results) = start_server(mesh.server_tls(&server_id()), settings, echo).await;
    let idle = dial(server, mesh.client_tls(&client_id(), &server_id()))
        .await
        .expect("connect");
    let busy = dial(server, mesh.client_tls(&client_id(), &server_id()))
        .await
        .expect("connect");
    // A tunnel held open across the idle bound keeps its connection.
    let held = busy.open(target(), HeaderMap::new()).await.expect("open");
    within("idle one closed", async {
        while !idle.is_closed() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(within("serve ends", results.recv()).await.unwrap().is_ok());
    assert!(!busy.is_closed(), "a connection with an open tunnel stays");
    assert_eq!(
        within("echo", echo_round_trip(held, b"still here")).await,
        b"still here"
    );
}
