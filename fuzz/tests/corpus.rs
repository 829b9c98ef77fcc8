//! Every seed of every fuzz target's corpus (`fuzz/corpus/<target>/`) and
//! every input that once crashed one (`fuzz/regressions/<target>/`) runs
//! through the target again, on the stable toolchain, as an ordinary test.
//! `write_seed_corpora` (ignored; run it by name) regenerates the seeds.

use std::path::{Path, PathBuf};

fn dir(kind: &str, target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(kind)
        .join(target)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    out.retain(|p| p.is_file());
    out.sort();
    out
}

#[test]
fn every_seed_and_every_former_crash_runs_clean() {
    for (name, target) in weft_fuzz::TARGETS {
        let seeds = files(&dir("corpus", name));
        assert!(
            !seeds.is_empty(),
            "{name} has no seed corpus in fuzz/corpus/{name}: run `cargo test -p weft-fuzz -- --ignored write_seed_corpora`"
        );
        for input in seeds.iter().chain(&files(&dir("regressions", name))) {
            let data = std::fs::read(input).expect("read a corpus file");
            target(&data);
        }
    }
}

/// (Re)writes the hand-made seeds: valid inputs each target should explore
/// from.
#[test]
#[ignore]
fn write_seed_corpora() {
    let write = |target: &str, name: &str, data: &[u8]| {
        let d = dir("corpus", target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), data).unwrap();
    };
    for (i, s) in seeds::hbone_sessions().iter().enumerate() {
        write("hbone_connect", &format!("session-{i}"), s);
    }
    for (i, s) in seeds::config_updates().iter().enumerate() {
        write("config_update", &format!("updates-{i}"), s);
    }
    let model = seeds::model_yaml();
    let mut with_requests = model.clone().into_bytes();
    with_requests.push(0);
    // One request: src 10.0.0.1, dst 10.0.0.2:8080, identity shop/web,
    // GET /api with one header, for shop/web via waypoint wp.
    with_requests.extend_from_slice(&[0, 10, 0, 0, 1, 0, 10, 0, 0, 2, 0x1f, 0x90, 1]);
    for s in ["shop", "web", "GET", "/api"] {
        with_requests.push(s.len() as u8);
        with_requests.extend_from_slice(s.as_bytes());
    }
    with_requests.extend_from_slice(&[1, 8]);
    with_requests.extend_from_slice(b"x-canary");
    with_requests.extend_from_slice(&[3]);
    with_requests.extend_from_slice(b"yes");
    for s in ["shop", "web", "wp"] {
        with_requests.push(s.len() as u8);
        with_requests.extend_from_slice(s.as_bytes());
    }
    write("policy_eval", "model-and-request", &with_requests);
    // CNI: the environment of an ADD (command, args, netns, container id),
    // then the chained configuration with a previous result.
    let mut cni = Vec::new();
    for v in [
        "ADD",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1",
        "/run/netns/cni-1",
        "0123456789abcdef",
    ] {
        cni.push(v.len() as u8);
        cni.extend_from_slice(v.as_bytes());
    }
    cni.extend_from_slice(
        br#"{"cniVersion":"1.0.0","name":"k8s","type":"weft-cni","ztunnel_socket":"/var/run/weft/cni.sock","exclude_namespaces":["kube-system"],"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.5/24"},{"address":"fd00::5/64"}]}}"#,
    );
    write("cni", "add", &cni);

    let mut route = model.into_bytes();
    route.extend_from_slice(&[0, 7, 3]);
    route.extend_from_slice(b"GET");
    route.push(12);
    route.extend_from_slice(b"/api/v1?x=1&");
    route.extend_from_slice(&[1, 8]);
    route.extend_from_slice(b"x-canary");
    route.push(3);
    route.extend_from_slice(b"yes");
    for s in ["shop", "web"] {
        route.push(s.len() as u8);
        route.extend_from_slice(s.as_bytes());
    }
    route.extend_from_slice(&[0, 80]);
    write("route_match", "model-and-request", &route);
    write("manifests", "l7", seeds::MANIFESTS.as_bytes());
}

mod seeds {
    use std::time::Duration;

    use bytes::Bytes;
    use tokio::io::AsyncReadExt;

    pub const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: shop, labels: { weft.dev/dataplane-mode: ambient, weft.dev/use-waypoint: wp } }
---
apiVersion: v1
kind: Pod
metadata: { name: web-1, namespace: shop, labels: { app: web } }
spec: { nodeName: node-1, serviceAccountName: web, containers: [{ name: app, image: x }] }
status: { phase: Running, podIPs: [{ ip: 10.0.0.2 }] }
---
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec: { clusterIP: 10.96.0.10, selector: { app: web }, ports: [{ port: 80, targetPort: 8080 }] }
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: { name: wp, namespace: shop }
spec: { gatewayClassName: weft-waypoint, listeners: [{ name: mesh, port: 15008, protocol: HBONE }] }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: web, namespace: shop }
spec:
  parentRefs: [{ group: "", kind: Service, name: web, port: 80 }]
  rules:
    - matches: [{ path: { type: RegularExpression, value: "/api/v[0-9]+" }, headers: [{ name: x-canary, value: "yes" }] }]
      filters: [{ type: RequestHeaderModifier, requestHeaderModifier: { set: [{ name: x-a, value: b }] } }]
      backendRefs: [{ name: web, port: 80, weight: 90 }, { name: web, port: 80, weight: 10 }]
      timeouts: { request: 3s }
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: l7, namespace: shop }
spec:
  targetRefs: [{ kind: Service, name: web }]
  action: DENY
  rules: [{ from: [{ source: { ipBlocks: ["10.1.0.0/16"] } }], to: [{ operation: { methods: [POST], paths: ["/admin*"] } }] }]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: l4, namespace: shop }
spec:
  selector: { matchLabels: { app: web } }
  action: ALLOW
  rules: [{ from: [{ source: { principals: ["spiffe://cluster.local/ns/shop/sa/web"] } }], to: [{ operation: { ports: [8080] } }] }]
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: web, namespace: shop }
spec: { targetRef: { kind: Service, name: web }, limits: { maxConnections: 2 } }
"#;

    /// The mesh model the manifests make, as YAML.
    pub fn model_yaml() -> String {
        let mut state = weft_controller::model::ClusterState::default();
        let mut problems = Vec::new();
        weft_controller::manifests::read_text("seed.yaml", MANIFESTS, &mut state, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let out = weft_controller::model::build(&state, "cluster.local");
        serde_yaml::to_string(&out.model).unwrap()
    }

    /// What a real HTTP/2 client writes for a few CONNECT tunnels: the
    /// preface, SETTINGS, HEADERS (with `forwarded`, `baggage`,
    /// `traceparent`) and DATA.
    pub fn hbone_sessions() -> Vec<Vec<u8>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let requests: [(&str, &str); 3] = [
            ("CONNECT", "10.0.0.2:8080"),
            ("CONNECT", "10.0.0.2:8081"),
            ("GET", "not-an-address"),
        ];
        requests
            .iter()
            .map(|(method, authority)| {
                rt.block_on(async {
                    let (client, mut record) = tokio::io::duplex(1 << 20);
                    let (mut send, conn) = h2::client::handshake(client).await.unwrap();
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    let req = http::Request::builder()
                        .method(*method)
                        .uri(*authority)
                        .header("forwarded", "for=10.0.0.7")
                        .header("baggage", "k8s.namespace.name=shop,k8s.pod.name=web-1")
                        .header(
                            "traceparent",
                            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                        )
                        .body(())
                        .unwrap();
                    if let Ok((_resp, mut stream)) = send.send_request(req, false) {
                        let _ = stream.send_data(Bytes::from_static(b"hello"), true);
                    }
                    let mut out = Vec::new();
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_millis(200), record.read(&mut buf))
                            .await
                    {
                        if n == 0 {
                            break;
                        }
                        out.extend_from_slice(&buf[..n]);
                    }
                    out
                })
            })
            .collect()
    }

    /// A full snapshot then a delta, length-prefixed as the target reads
    /// them.
    pub fn config_updates() -> Vec<Vec<u8>> {
        use prost::Message;
        use weft_api::proto::{
            ConfigUpdate, Removals, ResourceKey, Resources, Service, ServicePort, Workload,
        };
        let workload = |name: &str, ip: &str| Workload {
            name: name.into(),
            namespace: "shop".into(),
            node: "n1".into(),
            service_account: "default".into(),
            ips: vec![ip.into()],
            ..Default::default()
        };
        let full = ConfigUpdate {
            instance_id: "c1".into(),
            version: 1,
            full: true,
            trust_domain: "cluster.local".into(),
            upserts: Some(Resources {
                workloads: vec![workload("a", "10.0.0.1"), workload("b", "10.0.0.2")],
                services: vec![Service {
                    name: "s".into(),
                    namespace: "shop".into(),
                    ports: vec![ServicePort {
                        port: 80,
                        target_port: Some(8080),
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            removals: None,
            trust_bundle_pem: vec![],
        };
        let delta = ConfigUpdate {
            version: 2,
            full: false,
            upserts: Some(Resources {
                workloads: vec![workload("c", "10.0.0.3")],
                ..Default::default()
            }),
            removals: Some(Removals {
                workloads: vec![ResourceKey::new("shop", "b")],
                ..Default::default()
            }),
            ..full.clone()
        };
        let mut both = Vec::new();
        for u in [&full, &delta] {
            let bytes = u.encode_to_vec();
            both.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            both.extend_from_slice(&bytes);
        }
        vec![both]
    }
}
