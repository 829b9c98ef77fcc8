//! The bodies of Weft's fuzz targets: each takes arbitrary bytes and feeds
//! them to one parser or decision that faces hostile input, through the
//! same code the proxies and the controller run. `fuzz/targets/` (cargo
//! fuzz, nightly) calls these under libFuzzer; `fuzz/tests/` replays the
//! seed corpora and every input that ever crashed one of them, on the
//! stable toolchain, as ordinary tests.
//!
//! A target must never panic, hang or grow without bound on any input;
//! anything else (an error, a refusal) is a correct outcome.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_api::Identity;

/// A target's body: takes libFuzzer's input, panics on a defect.
pub type Target = fn(&[u8]);

/// Every target, by the name `cargo xtask fuzz` and the corpus folders use.
pub const TARGETS: &[(&str, Target)] = &[
    ("hbone_connect", hbone_connect),
    ("config_update", config_update),
    ("policy_eval", policy_eval),
    ("route_match", route_match),
    ("manifests", manifests),
    ("cni", cni),
];

/// A reader over fuzz input, for building structured values from it.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    /// A length-prefixed (one byte) string.
    fn str(&mut self) -> String {
        let n = self.byte() as usize;
        String::from_utf8_lossy(self.bytes(n)).into_owned()
    }

    fn ip(&mut self) -> IpAddr {
        if self.byte().is_multiple_of(2) {
            let b = self.bytes(4);
            let mut o = [0u8; 4];
            o[..b.len()].copy_from_slice(b);
            IpAddr::V4(Ipv4Addr::from(o))
        } else {
            let b = self.bytes(16);
            let mut o = [0u8; 16];
            o[..b.len()].copy_from_slice(b);
            IpAddr::V6(Ipv6Addr::from(o))
        }
    }

    /// Up to `max` headers with arbitrary (valid) names and values.
    fn headers(&mut self, max: usize) -> HeaderMap {
        let mut h = HeaderMap::new();
        let n = (self.byte() as usize).min(max);
        for _ in 0..n {
            let (name, value) = (self.str(), self.str());
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                h.append(name, value);
            }
        }
        h
    }

    fn rest(&self) -> &'a [u8] {
        self.data
    }
}

/// A runtime whose clock advances on its own while idle, so timeouts in
/// the code under test cost no wall time.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a current-thread runtime")
    })
}

/// HBONE CONNECT handling: the bytes are what a client authenticated as
/// `spiffe://cluster.local/ns/fuzz/sa/client` sends after TLS (HTTP/2
/// frames: the preface, SETTINGS, CONNECT requests with any authority and
/// headers, data, resets). Each tunnel reads its claimed client address
/// (`forwarded`), trace context and baggage as the proxies do, then is
/// accepted (echoing a little) or rejected.
pub fn hbone_connect(data: &[u8]) {
    let peer = Identity::new("cluster.local", "fuzz", "client");
    runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let settings = weft_hbone::H2Settings {
            handshake_timeout: Duration::from_secs(1),
            keepalive_interval: None,
            idle_timeout: Some(Duration::from_secs(1)),
            ..Default::default()
        };
        let handler = |t: weft_hbone::InboundTunnel| async move {
            let claimed = t.forwarded_for();
            let _ = weft_api::policy::source_address(
                "10.0.0.1"
                    .parse()
                    .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                claimed,
                &t.peer,
                |_| None,
            );
            let _ = weft_waypoint::telemetry::TraceContext::from_headers(&t.headers);
            if t.target.port().is_multiple_of(2) {
                if let Ok(mut s) = t.accept() {
                    let mut buf = [0u8; 64];
                    if let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_millis(10), s.read(&mut buf)).await
                    {
                        let _ = s.write_all(&buf[..n]).await;
                    }
                    let _ = s.shutdown().await;
                }
            } else {
                t.reject(http::StatusCode::UNAUTHORIZED);
            }
        };
        let drain = std::future::pending::<()>();
        let serve = weft_hbone::server::serve_h2(server, peer, &settings, handler, drain);
        let feed = async {
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            // Read what the server answers, so it never blocks on a full
            // pipe.
            let mut sink = vec![0u8; 16 * 1024];
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_secs(2), client.read(&mut sink)).await
            {
                if n == 0 {
                    break;
                }
            }
        };
        let _ =
            tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(serve, feed) }).await;
    });
}

/// The config stream: a sequence of length-prefixed (two bytes) protobuf
/// `ConfigUpdate`s, decoded and applied one after the other to one config
/// cache, as a subscriber does; every accepted state converts to a model,
/// and the ztunnel's snapshot updated in place from each change equals the
/// one built whole from the cache.
pub fn config_update(data: &[u8]) {
    use prost::Message;
    use weft_ztunnel::state::Snapshot;
    let mut input = Input { data };
    let mut cache = weft_api::config_cache::ConfigCache::default();
    let mut snap = Snapshot::default();
    for _ in 0..16 {
        if input.rest().is_empty() {
            break;
        }
        let n = input.u16() as usize;
        let Ok(update) = weft_api::proto::ConfigUpdate::decode(input.bytes(n)) else {
            continue;
        };
        let Ok(changes) = cache.apply_changes(&update) else {
            continue;
        };
        if changes.is_empty() {
            continue;
        }
        let model = cache.to_model();
        let _ = model.validate();
        snap = snap.update(&cache, &changes, update.version);
        let whole = Snapshot::from_cache(&cache, update.version);
        assert_eq!(snap.indexes(), whole.indexes(), "in place != whole");
        assert_eq!(snap.to_model(), model);
    }
}

/// Splits input at the first NUL: a mesh model as YAML before it, the rest
/// for the requests.
fn model_and_rest(data: &[u8]) -> Option<(weft_api::MeshModel, &[u8])> {
    let cut = data.iter().position(|b| *b == 0)?;
    let text = std::str::from_utf8(&data[..cut]).ok()?;
    let model = weft_api::MeshModel::from_yaml(text).ok()?;
    Some((model, &data[cut + 1..]))
}

/// Policy evaluation against a model: the destination ztunnel's check for a
/// new or open connection (mTLS mode, waypoint required, L4 policy), its
/// outbound routing, and the waypoint's L7 authorization, for requests made
/// of the remaining bytes.
pub fn policy_eval(data: &[u8]) {
    let Some((model, rest)) = model_and_rest(data) else {
        return;
    };
    let snap = weft_ztunnel::state::Snapshot::new(model.clone(), 1);
    let authz = weft_waypoint::authz::Authorizer::build(&model);
    let mut input = Input { data: rest };
    for _ in 0..8 {
        if input.rest().is_empty() {
            break;
        }
        let src_ip = input.ip();
        let dst = SocketAddr::new(input.ip(), input.u16());
        let identity = match input.byte() % 3 {
            0 => None,
            1 => Some(Identity::new("cluster.local", &input.str(), &input.str())),
            _ => input.str().parse::<Identity>().ok(),
        };
        let _ = weft_ztunnel::proxy::connections::check(&snap, src_ip, identity.as_ref(), dst);
        let _ = snap.route_outbound(dst);
        let (method, path, headers) = (input.str(), input.str(), input.headers(8));
        let (ns, svc, gw) = (input.str(), input.str(), input.str());
        let _ = authz.check(&weft_waypoint::authz::AuthzRequest {
            service: weft_waypoint::authz::Target {
                namespace: &ns,
                name: &svc,
            },
            waypoint: weft_waypoint::authz::Target {
                namespace: &ns,
                name: &gw,
            },
            src_ip,
            src_identity: identity.as_ref(),
            port: dst.port(),
            method: &method,
            path: &path,
            headers: &weft_waypoint::authz::Headers(&headers),
        });
    }
}

/// Waypoint routing: the route tables built from a model (Gateway API
/// HTTPRoutes and GRPCRoutes, with regexes, filters, weights), then requests
/// of any method, path, query and headers matched against them, and the
/// header filters of the chosen rule applied.
pub fn route_match(data: &[u8]) {
    use rand::SeedableRng;
    let Some((model, rest)) = model_and_rest(data) else {
        return;
    };
    let table = weft_waypoint::route::RouteTable::build(&model);
    let mut input = Input { data: rest };
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(input.byte()));
    for _ in 0..8 {
        if input.rest().is_empty() {
            break;
        }
        let method = Method::from_bytes(input.str().as_bytes()).unwrap_or(Method::GET);
        let uri = input.str();
        let headers = input.headers(16);
        let (ns, name, port) = (input.str(), input.str(), input.u16());
        let client_ns = input.str();
        let Ok(mut request) = http::Request::builder()
            .method(method)
            .uri(if uri.starts_with('/') {
                uri
            } else {
                format!("/{uri}")
            })
            .body(())
        else {
            continue;
        };
        *request.headers_mut() = headers;
        let (parts, ()) = request.into_parts();
        if let weft_waypoint::route::RouteDecision::Forward(f) =
            table.route_with_rng(&ns, &name, port, &client_ns, &parts, &mut rng)
        {
            let mut h = parts.headers.clone();
            f.apply_request_headers(&mut h);
            f.apply_response_headers(&mut h);
        }
    }
}

/// The controller's manifest mode: one file's text (multi-document YAML,
/// lists, every kind the controller reads, CRDs included) into the cluster
/// state, then the whole model and status built from it.
pub fn manifests(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut state = weft_controller::model::ClusterState::default();
    let mut problems = Vec::new();
    weft_controller::manifests::read_text("fuzz.yaml", &text, &mut state, &mut problems);
    let _ = weft_controller::model::build(&state, "cluster.local");
}

/// The CNI plugin's reading of one invocation: the network configuration
/// on stdin and the environment (`CNI_COMMAND`, `CNI_ARGS`, `CNI_NETNS`,
/// `CNI_CONTAINERID`), as `weft-cni` reads them. Input: four
/// length-prefixed environment values, then stdin. Whatever comes in, a
/// request that reaches the ztunnel carries names Kubernetes accepts and
/// a pod record file name that stays inside `pods/`.
pub fn cni(data: &[u8]) {
    use weft_ztunnel::cni_plugin::{parse, Invocation};
    let mut input = Input { data };
    let names = ["CNI_COMMAND", "CNI_ARGS", "CNI_NETNS", "CNI_CONTAINERID"];
    let values: Vec<String> = names.iter().map(|_| input.str()).collect();
    let env = |k: &str| {
        names
            .iter()
            .position(|n| *n == k)
            .map(|i| values[i].clone())
            .filter(|v| !v.is_empty())
    };
    let (_, invocation) = parse(input.rest(), &env);
    if let Ok(Invocation::Pod(p)) = invocation {
        let req = p.req;
        req.check_names()
            .expect("a request the plugin sends carries names Kubernetes accepts");
        let file = weft_api::cni::record_file_name(&req.pod_namespace, &req.pod_name)
            .expect("checked names make a record file name");
        assert!(
            !file.contains('/') && !file.starts_with('.') && !file.contains(".."),
            "a record file name that leaves pods/: {file:?}"
        );
    }
}
