//! The connection pool: sharing, the per-connection stream limit, a single
//! dial for concurrent callers, eviction of dead and idle connections.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::HeaderMap;
use weft_hbone::{HboneError, Pool};

struct Fixture {
    mesh: Mesh,
    addr: std::net::SocketAddr,
    dials: Arc<AtomicUsize>,
}

impl Fixture {
    async fn new() -> Fixture {
        let mesh = Mesh::new();
        let (addr, _results) =
            start_server(mesh.server_tls(&server_id()), fast_settings(), echo).await;
        Fixture {
            mesh,
            addr,
            dials: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A dial closure that counts its calls.
    fn dialer(
        &self,
    ) -> impl FnOnce() -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<weft_hbone::HboneConnection, HboneError>>
                + Send,
        >,
    > {
        let dials = self.dials.clone();
        let addr = self.addr;
        let tls = self.mesh.client_tls(&client_id(), &server_id());
        move || {
            Box::pin(async move {
                dials.fetch_add(1, Ordering::AcqRel);
                // Slow enough that concurrent callers overlap with the dial.
                tokio::time::sleep(Duration::from_millis(50)).await;
                dial(addr, tls).await
            })
        }
    }

    fn dials(&self) -> usize {
        self.dials.load(Ordering::Acquire)
    }
}

#[tokio::test]
async fn reuses_one_connection_and_opens_another_past_the_stream_limit() {
    let f = Fixture::new().await;
    let pool: Pool<&str> = Pool::new(2, Duration::from_secs(60));
    let key = "node-b";

    let a = pool.get(&key, f.dialer()).await.expect("get");
    let b = pool.get(&key, f.dialer()).await.expect("get");
    assert!(a.same_connection(&b));
    assert_eq!((f.dials(), pool.len()), (1, 1));

    let s1 = pool
        .open(&key, f.dialer(), target(), HeaderMap::new())
        .await
        .expect("s1");
    let s2 = pool
        .open(&key, f.dialer(), target(), HeaderMap::new())
        .await
        .expect("s2");
    assert_eq!((f.dials(), pool.len(), a.active_streams()), (1, 1, 2));

    let s3 = pool
        .open(&key, f.dialer(), target(), HeaderMap::new())
        .await
        .expect("s3");
    assert_eq!(
        (f.dials(), pool.len()),
        (2, 2),
        "third stream needs a second connection"
    );

    // Streams really work through pooled connections.
    assert_eq!(
        within("echo", echo_round_trip(s3, b"three")).await,
        b"three"
    );
    // With s3 gone the second connection has room again: no new dial.
    let s4 = pool
        .open(&key, f.dialer(), target(), HeaderMap::new())
        .await
        .expect("s4");
    assert_eq!((f.dials(), pool.len()), (2, 2));
    drop((s1, s2, s4));

    // Another key never shares.
    pool.get(&"node-c", f.dialer()).await.expect("other key");
    assert_eq!((f.dials(), pool.len()), (3, 3));
}

#[tokio::test]
async fn concurrent_callers_share_a_single_dial_and_respect_the_limit() {
    let f = Fixture::new().await;
    let pool: Pool<u32> = Pool::new(10, Duration::from_secs(60));
    let mut tasks = Vec::new();
    for _ in 0..25 {
        let pool = pool.clone();
        let dialer = f.dialer();
        tasks.push(tokio::spawn(async move {
            pool.open(&7, dialer, target(), HeaderMap::new()).await
        }));
    }
    let mut streams = Vec::new();
    for t in tasks {
        streams.push(within("open", t).await.expect("join").expect("open"));
    }
    // 25 streams at 10 per connection: exactly 3 connections, 3 dials.
    assert_eq!((f.dials(), pool.len()), (3, 3));
    drop(streams);
}

#[tokio::test]
async fn failed_dial_is_shared_with_waiters_not_repeated() {
    let pool: Pool<u32> = Pool::new(10, Duration::from_secs(60));
    let dials = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let pool = pool.clone();
        let dials = dials.clone();
        tasks.push(tokio::spawn(async move {
            pool.get(&1, move || async move {
                dials.fetch_add(1, Ordering::AcqRel);
                tokio::time::sleep(Duration::from_millis(100)).await;
                Err(HboneError::HandshakeTimeout(Duration::from_secs(1)))
            })
            .await
        }));
    }
    for t in tasks {
        let err = within("get", t)
            .await
            .expect("join")
            .expect_err("dial fails");
        assert_eq!(err.reason(), weft_hbone::FailureReason::Timeout);
    }
    assert_eq!(dials.load(Ordering::Acquire), 1);
    assert!(pool.is_empty());
}

#[tokio::test]
async fn idle_connections_are_closed_and_dead_ones_replaced() {
    let f = Fixture::new().await;
    let pool: Pool<u8> = Pool::new(100, Duration::from_millis(300));

    let conn = pool.get(&1, f.dialer()).await.expect("get");
    let stream = conn.open(target(), HeaderMap::new()).await.expect("open");
    // Busy connections are kept however long they live.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(pool.len(), 1);
    drop(stream);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(pool.len(), 0, "idle connection evicted");
    drop(conn);

    // A connection whose peer went away is not handed out again.
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server_tls = f.mesh.server_tls(&server_id());
    let server = tokio::spawn(async move {
        weft_hbone::serve(server_io, server_tls, &fast_settings(), echo).await
    });
    let tls = f.mesh.client_tls(&client_id(), &server_id());
    let doomed = pool
        .get(&2, || async move {
            weft_hbone::connect(client_io, tls, &fast_settings()).await
        })
        .await
        .expect("get over duplex");
    server.abort();
    within("driver notices", async {
        while !doomed.is_closed() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let dials_before = f.dials();
    let fresh = pool.get(&2, f.dialer()).await.expect("redial");
    assert_eq!(f.dials(), dials_before + 1);
    assert!(!fresh.same_connection(&doomed));
    assert!(!fresh.is_closed());
    assert_eq!(pool.len(), 1);
}
