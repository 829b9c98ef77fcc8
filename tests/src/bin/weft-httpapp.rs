//! An HTTP and gRPC application for the end-to-end tests, run inside pods.
//!
//! `serve --port P --name N [--grpc-port G]`: HTTP/1.1 and HTTP/2 (prior
//! knowledge) on P, and when asked the standard gRPC health service on G
//! reporting service `N` as SERVING. HTTP endpoints:
//! - `/who`: JSON with the app's name, the peer, method, path, protocol and
//!   request headers
//! - `/status/<code>`: answers that status
//! - `/bytes/<n>`: n bytes of a fixed pattern (streamed)
//! - `/upload`: reads the body, answers `{"bytes": n, "sha256": ...}`
//! - `/stream?chunks=N&interval_ms=M`: N chunks, M ms apart
//! - `/slow?ms=N`: answers after N ms; a request abandoned before that is
//!   counted as cancelled
//! - `/stats`: `{"requests": n, "cancelled": n}`
//!
//! `grpc-check --addr A --service S`: one Health/Check call, prints
//! `{"status": ...}` or `{"error": code, "message": ...}`.
//! `grpc-watch --addr A --service S`: the first Health/Watch message.
//! `h2-flood --addr A --streams N`: an HTTP/2 "rapid reset" flood on one
//! connection (open a stream, reset it at once, N times); prints
//! `{"opened": n, "closed_by_server": bool, "error": ...}`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use sha2::{Digest, Sha256};

type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    cancelled: AtomicU64,
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-httpapp: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-httpapp: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Vec<String>) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args).await,
        Some("grpc-check") => grpc_check(&args).await,
        Some("grpc-watch") => grpc_watch(&args).await,
        Some("h2-flood") => h2_flood(&args).await,
        other => bail!("unknown command {other:?}: use serve, grpc-check or grpc-watch"),
    }
}

async fn serve(args: &[String]) -> Result<()> {
    let port: u16 = arg(args, "--port").context("--port")?.parse()?;
    let name = arg(args, "--name").unwrap_or_else(|| "app".into());
    if let Some(g) = arg(args, "--grpc-port") {
        let addr: SocketAddr = format!("0.0.0.0:{g}").parse()?;
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(&name, tonic_health::ServingStatus::Serving)
            .await;
        tokio::spawn(async move {
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(service)
                .serve(addr)
                .await
            {
                eprintln!("weft-httpapp: gRPC server: {e}");
                std::process::exit(1);
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    println!("listening on {port}");
    let stats = Arc::new(Stats::default());
    let name: Arc<str> = name.into();
    loop {
        let (stream, peer) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let stats = stats.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let stats = stats.clone();
                let name = name.clone();
                async move { Ok::<_, Infallible>(handle(req, peer, &name, stats).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn full(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

fn json_response(v: serde_json::Value) -> Response<BoxBody> {
    let mut r = Response::new(full(v.to_string() + "\n"));
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

/// Counts a request as cancelled unless disarmed.
struct CancelGuard(Arc<Stats>, bool);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if self.1 {
            self.0.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    name: &str,
    stats: Arc<Stats>,
) -> Response<BoxBody> {
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_owned();
    let mut response = match path.as_str() {
        "/who" => {
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or(""))))
                .collect();
            json_response(json!({
                "name": name,
                "peer": peer.to_string(),
                "method": req.method().as_str(),
                "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
                "proto": format!("{:?}", req.version()),
                "headers": headers,
            }))
        }
        "/stats" => json_response(json!({
            "requests": stats.requests.load(Ordering::Relaxed),
            "cancelled": stats.cancelled.load(Ordering::Relaxed),
        })),
        "/upload" => {
            let mut hasher = Sha256::new();
            let mut n = 0u64;
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            n += d.len() as u64;
                            hasher.update(d);
                        }
                    }
                    Err(e) => {
                        let mut resp = Response::new(full(format!("body failed: {e}\n")));
                        *resp.status_mut() = StatusCode::BAD_REQUEST;
                        return resp;
                    }
                }
            }
            let digest: String = hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            json_response(json!({ "bytes": n, "sha256": digest }))
        }
        "/slow" => {
            let ms = query(&req, "ms").unwrap_or(1000);
            let mut guard = CancelGuard(stats.clone(), true);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            guard.1 = false;
            json_response(json!({ "name": name, "slept_ms": ms }))
        }
        "/stream" => {
            let chunks = query(&req, "chunks").unwrap_or(5);
            let interval = Duration::from_millis(query(&req, "interval_ms").unwrap_or(100));
            let s = futures::stream::unfold(0u64, move |i| async move {
                if i >= chunks {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(interval).await;
                }
                Some((
                    Ok::<_, std::io::Error>(Frame::data(Bytes::from(format!("chunk {i}\n")))),
                    i + 1,
                ))
            });
            Response::new(BodyExt::boxed(StreamBody::new(s)))
        }
        p if p.starts_with("/bytes/") => {
            let n: u64 = p["/bytes/".len()..].parse().unwrap_or(0);
            const CHUNK: u64 = 64 * 1024;
            let s = futures::stream::unfold(0u64, move |sent| async move {
                if sent >= n {
                    return None;
                }
                let len = CHUNK.min(n - sent);
                let chunk: Vec<u8> = (sent..sent + len).map(|i| (i % 251) as u8).collect();
                Some((
                    Ok::<_, std::io::Error>(Frame::data(Bytes::from(chunk))),
                    sent + len,
                ))
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(s)));
            if let Ok(v) = http::HeaderValue::from_str(&n.to_string()) {
                r.headers_mut().insert("content-length", v);
            }
            r
        }
        p if p.starts_with("/status/") => {
            let code: u16 = p["/status/".len()..].parse().unwrap_or(500);
            let mut r = Response::new(full(format!("status {code} from {name}\n")));
            *r.status_mut() =
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            r
        }
        _ => {
            let mut r = Response::new(full(format!("{name}\n")));
            if path != "/" {
                *r.status_mut() = StatusCode::NOT_FOUND;
            }
            r
        }
    };
    if let Ok(v) = http::HeaderValue::from_str(name) {
        response.headers_mut().insert("x-app-name", v);
    }
    response
}

async fn health_client(
    args: &[String],
) -> Result<(
    tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>,
    String,
)> {
    let addr = arg(args, "--addr").context("--addr")?;
    let service = arg(args, "--service").unwrap_or_default();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await?;
    Ok((
        tonic_health::pb::health_client::HealthClient::new(channel),
        service,
    ))
}

async fn grpc_check(args: &[String]) -> Result<()> {
    let (mut client, service) = health_client(args).await?;
    let out = match client
        .check(tonic_health::pb::HealthCheckRequest { service })
        .await
    {
        Ok(r) => json!({ "status": r.into_inner().status }),
        Err(s) => json!({ "error": format!("{:?}", s.code()), "message": s.message() }),
    };
    println!("{out}");
    Ok(())
}

async fn grpc_watch(args: &[String]) -> Result<()> {
    let (mut client, service) = health_client(args).await?;
    let out = match client
        .watch(tonic_health::pb::HealthCheckRequest { service })
        .await
    {
        Ok(r) => match tokio::time::timeout(Duration::from_secs(5), r.into_inner().next()).await {
            Ok(Some(Ok(m))) => json!({ "status": m.status }),
            Ok(Some(Err(s))) => {
                json!({ "error": format!("{:?}", s.code()), "message": s.message() })
            }
            Ok(None) => json!({ "error": "EndOfStream" }),
            Err(_) => json!({ "error": "Timeout" }),
        },
        Err(s) => json!({ "error": format!("{:?}", s.code()), "message": s.message() }),
    };
    println!("{out}");
    Ok(())
}

async fn h2_flood(args: &[String]) -> Result<()> {
    let addr = arg(args, "--addr").context("--addr")?;
    let n: u64 = arg(args, "--streams")
        .unwrap_or_else(|| "10000".into())
        .parse()?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    .context("connect timed out")??;
    let (send, conn) = h2::client::handshake(tcp).await?;
    let driver = tokio::spawn(conn);
    let mut opened = 0u64;
    let mut error = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut send = Some(send);
    while opened < n && tokio::time::Instant::now() < deadline {
        let Some(s) = send.take() else { break };
        let mut s = match tokio::time::timeout(Duration::from_secs(5), s.ready()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                error = e.to_string();
                break;
            }
            Err(_) => {
                error = "timed out waiting for stream capacity".into();
                break;
            }
        };
        let req = Request::get(format!("http://{addr}/who")).body(())?;
        match s.send_request(req, true) {
            Ok((resp, mut stream)) => {
                stream.send_reset(h2::Reason::CANCEL);
                drop(resp);
                opened += 1;
                send = Some(s);
            }
            Err(e) => {
                error = e.to_string();
                break;
            }
        }
        // Let the connection task write and read between streams.
        if opened.is_multiple_of(64) {
            tokio::task::yield_now().await;
        }
    }
    // Keep our side open: only the server can end the connection now.
    let closed = tokio::time::timeout(Duration::from_secs(5), driver).await;
    drop(send);
    let closed_by_server = match &closed {
        Ok(Ok(Err(e))) => {
            if error.is_empty() {
                error = e.to_string();
            }
            true
        }
        Ok(Ok(Ok(()))) => true,
        _ => false,
    };
    println!(
        "{}",
        json!({ "opened": opened, "closed_by_server": closed_by_server, "error": error })
    );
    Ok(())
}
