//! The echo app of the Gateway API conformance cases, run inside simulated
//! pods by the conformance runner (`weft_e2e::conformance`). It answers the
//! way the upstream echo app does, with what the cases read: which pod
//! answered, the status, the request as it arrived (headers, path, method,
//! protocol) and the response headers it set itself.
//!
//! `serve --pod P --namespace N [--http PORT]... [--grpc PORT]...
//! [--tcp PORT]...`: HTTP/1.1 and HTTP/2 (prior knowledge) on each `--http`
//! port, answering every request with JSON (`pod`, `hostname`, `namespace`,
//! `status`, `method`, `path` with its query, `host`, `proto`, `headers` as
//! lower-case name to list of values, `response_headers`); a request header
//! `X-Echo-Set-Header: name:value[,name:value]` makes it set those response
//! headers too, as the upstream app does. The conformance gRPC service
//! `gateway_api_conformance.echo_basic.grpcecho.GrpcEcho`
//! (`tests/conformance/grpcecho.proto`) on each `--grpc` port; a byte echo
//! on each `--tcp` port. Prints `listening` once every port is bound.
//!
//! `grpc --addr IP:PORT --authority HOST:PORT [-H name:value]... [--count N]
//! [--method Echo|EchoTwo|EchoThree]`: N calls on one channel, one JSON
//! line each: `{"status": 200, "hostname", "headers", "authority",
//! "method"}`, or `{"grpc_status": code, "error": message}` for a failed
//! call (a gRPC client reports a successful call as 200, as the upstream
//! echo client does).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic::codegen::Service;

mod pb {
    tonic::include_proto!("gateway_api_conformance.echo_basic.grpcecho");
}

use pb::grpc_echo_client::GrpcEchoClient;
use pb::grpc_echo_server::{GrpcEcho, GrpcEchoServer};

/// Where this server runs, reported in every answer.
#[derive(Clone, Debug)]
struct Whoami {
    pod: String,
    namespace: String,
}

fn args_of(args: &[String], name: &str) -> Vec<String> {
    args.windows(2)
        .filter(|w| w[0] == name)
        .map(|w| w[1].clone())
        .collect()
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args_of(args, name).into_iter().next()
}

fn ports(args: &[String], name: &str) -> Result<Vec<u16>> {
    args_of(args, name)
        .iter()
        .map(|p| p.parse().with_context(|| format!("{name} {p:?}")))
        .collect()
}

#[tokio::main(worker_threads = 2)]
async fn main() -> Result<()> {
    run(std::env::args().skip(1).collect()).await
}

async fn run(args: Vec<String>) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args).await,
        Some("grpc") => grpc_client(&args).await,
        other => bail!("unknown command {other:?}: use serve or grpc"),
    }
}

async fn serve(args: &[String]) -> Result<()> {
    let me = Whoami {
        pod: arg(args, "--pod").context("--pod")?,
        namespace: arg(args, "--namespace").context("--namespace")?,
    };
    let mut tasks = tokio::task::JoinSet::new();
    for port in ports(args, "--http")? {
        let l = bind(port).await?;
        tasks.spawn(serve_http(l, me.clone()));
    }
    for port in ports(args, "--grpc")? {
        let l = bind(port).await?;
        tasks.spawn(serve_grpc(l, me.clone()));
    }
    for port in ports(args, "--tcp")? {
        let l = bind(port).await?;
        tasks.spawn(serve_tcp(l));
    }
    if tasks.is_empty() {
        bail!("nothing to serve: give --http, --grpc or --tcp ports");
    }
    println!("listening");
    match tasks.join_next().await {
        Some(Ok(Err(e))) => Err(e),
        Some(Err(e)) => Err(e.into()),
        _ => Ok(()),
    }
}

async fn bind(port: u16) -> Result<TcpListener> {
    TcpListener::bind(("0.0.0.0", port))
        .await
        .with_context(|| format!("binding port {port}"))
}

async fn serve_http(listener: TcpListener, me: Whoami) -> Result<()> {
    let me = Arc::new(me);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let me = me.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let me = me.clone();
                async move { Ok::<_, Infallible>(echo_http(&req, &me)) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Header values by lower-case name, in arrival order.
fn header_lists(h: &HeaderMap) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in h {
        out.entry(k.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    out
}

fn echo_http(req: &Request<Incoming>, me: &Whoami) -> Response<Full<Bytes>> {
    let mut set = HeaderMap::new();
    set.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for v in req.headers().get_all("x-echo-set-header") {
        for pair in String::from_utf8_lossy(v.as_bytes()).split(',') {
            let Some((n, v)) = pair.split_once(':') else {
                continue;
            };
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(n.trim().as_bytes()),
                HeaderValue::from_str(v.trim()),
            ) {
                set.append(n, v);
            }
        }
    }
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        })
        .unwrap_or_default();
    let body = json!({
        "pod": me.pod,
        "hostname": me.pod,
        "namespace": me.namespace,
        "ingress": "",
        "service": "",
        "status": 200,
        "method": req.method().as_str(),
        "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "host": host,
        "proto": format!("{:?}", req.version()),
        "headers": header_lists(req.headers()),
        "response_headers": header_lists(&set),
    });
    let mut r = Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
    *r.headers_mut() = set;
    r
}

/// The `:authority` of a gRPC call, which tonic keeps out of the metadata.
#[derive(Clone)]
struct Authority(String);

struct Echo {
    me: Whoami,
}

impl Echo {
    fn answer(&self, req: &tonic::Request<pb::EchoRequest>, method: &str) -> pb::EchoResponse {
        let headers = req
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(k, v)| pb::Header {
                key: k.as_str().to_owned(),
                value: String::from_utf8_lossy(v.as_bytes()).into_owned(),
            })
            .collect();
        pb::EchoResponse {
            assertions: Some(pb::Assertions {
                fully_qualified_method: format!(
                    "/gateway_api_conformance.echo_basic.grpcecho.GrpcEcho/{method}"
                ),
                headers,
                authority: req
                    .extensions()
                    .get::<Authority>()
                    .map(|a| a.0.clone())
                    .unwrap_or_default(),
                context: Some(pb::Context {
                    namespace: self.me.namespace.clone(),
                    ingress: String::new(),
                    service_name: String::new(),
                    pod: self.me.pod.clone(),
                }),
                tls_assertions: None,
            }),
            request: Some(pb::EchoRequest {}),
        }
    }
}

#[tonic::async_trait]
impl GrpcEcho for Echo {
    async fn echo(
        &self,
        req: tonic::Request<pb::EchoRequest>,
    ) -> Result<tonic::Response<pb::EchoResponse>, tonic::Status> {
        Ok(tonic::Response::new(self.answer(&req, "Echo")))
    }

    async fn echo_two(
        &self,
        req: tonic::Request<pb::EchoRequest>,
    ) -> Result<tonic::Response<pb::EchoResponse>, tonic::Status> {
        Ok(tonic::Response::new(self.answer(&req, "EchoTwo")))
    }

    async fn echo_three(
        &self,
        _req: tonic::Request<pb::EchoRequest>,
    ) -> Result<tonic::Response<pb::EchoResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "EchoThree is unimplemented on purpose",
        ))
    }
}

async fn serve_grpc(listener: TcpListener, me: Whoami) -> Result<()> {
    let server = GrpcEchoServer::new(Echo { me });
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let server = server.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |mut req: Request<Incoming>| {
                let mut server = server.clone();
                let authority = req
                    .uri()
                    .authority()
                    .map(|a| a.as_str().to_owned())
                    .unwrap_or_default();
                req.extensions_mut().insert(Authority(authority));
                async move { server.call(req).await }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn serve_tcp(listener: TcpListener) -> Result<()> {
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

async fn grpc_client(args: &[String]) -> Result<()> {
    let addr = arg(args, "--addr").context("--addr")?;
    let authority = arg(args, "--authority").unwrap_or_else(|| addr.clone());
    let count: u32 = match arg(args, "--count") {
        Some(c) => c.parse().context("--count")?,
        None => 1,
    };
    let method = arg(args, "--method").unwrap_or_else(|| "Echo".to_owned());
    let mut metadata = Vec::new();
    for h in args_of(args, "-H") {
        let (n, v) = h
            .split_once(':')
            .with_context(|| format!("-H {h:?}: want name:value"))?;
        let n: tonic::metadata::MetadataKey<tonic::metadata::Ascii> = n
            .trim()
            .parse()
            .with_context(|| format!("-H {h:?}: bad metadata name"))?;
        let v: tonic::metadata::MetadataValue<tonic::metadata::Ascii> = v
            .trim()
            .parse()
            .with_context(|| format!("-H {h:?}: bad metadata value"))?;
        metadata.push((n, v));
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .origin(format!("http://{authority}").parse()?)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let mut client = GrpcEchoClient::new(channel);
    for _ in 0..count {
        let mut req = tonic::Request::new(pb::EchoRequest {});
        for (n, v) in &metadata {
            req.metadata_mut().append(n.clone(), v.clone());
        }
        let result = match method.as_str() {
            "Echo" => client.echo(req).await,
            "EchoTwo" => client.echo_two(req).await,
            "EchoThree" => client.echo_three(req).await,
            other => bail!("--method {other:?}: use Echo, EchoTwo or EchoThree"),
        };
        let line = match result {
            Ok(resp) => {
                let a = resp.into_inner().assertions.unwrap_or_default();
                let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for h in a.headers {
                    headers.entry(h.key).or_default().push(h.value);
                }
                json!({
                    "status": 200,
                    "grpc_status": 0,
                    "hostname": a.context.map(|c| c.pod).unwrap_or_default(),
                    "headers": headers,
                    "authority": a.authority,
                    "method": a.fully_qualified_method,
                })
            }
            Err(status) => json!({
                "grpc_status": status.code() as i32,
                "error": status.message(),
            }),
        };
        println!("{line}");
    }
    Ok(())
}
