//! End-to-end through a waypoint: the controller in embedded mode (the
//! manifest folder stands in for the API server) with a Gateway of class
//! `weft-waypoint`, a real `weft-waypoint` process in its own pod, ztunnels
//! sending the labelled Service's traffic to it over HBONE, and real HTTP
//! and gRPC clients and servers (curl, h2load, weft-httpapp with tonic's
//! health service). Needs root; fails loudly without it.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use weft_api::model::{
    AuthorizationPolicy, BackendRef, Destination, FaultAbort, GrpcMethodMatch, GrpcRoute,
    GrpcRouteMatch, GrpcRouteRule, HeaderMatch, HttpBackend, HttpFilter, HttpRoute, HttpRouteMatch,
    HttpRouteRule, ParentRef, PathMatch, PathModifier, PolicyAction, PolicyTarget, RateLimit,
    Retry, Rule, Timeouts, TrafficPolicy, UrlRewrite,
};
use weft_e2e::mesh::{metric_sum, Mesh};
use weft_e2e::Pod;

const NS: &str = "shop";

fn backend(name: &str, port: u16, weight: u32) -> HttpBackend {
    HttpBackend {
        backend: BackendRef {
            name: name.into(),
            namespace: String::new(),
            port,
        },
        weight,
        filters: vec![],
    }
}

fn parent(service: &str) -> Vec<ParentRef> {
    vec![ParentRef {
        name: service.into(),
        ..Default::default()
    }]
}

/// A mesh with the controller, a client on node 1, `apps` (pod name,
/// labels) serving HTTP on 8080 (and gRPC on 50051) on node 2, and
/// waypoint `wp` on node 2.
fn mesh_with(apps: &[(&str, &[(&str, &str)])]) -> (Mesh, Pod, Vec<Pod>) {
    let mut mesh = Mesh::with_controller(2, &[NS]).expect("mesh with controller");
    let client = mesh.add_pod(0, NS, "client", "client").unwrap();
    let mut pods = Vec::new();
    for (name, labels) in apps {
        let pod = mesh.add_pod(1, NS, name, name).unwrap();
        if !labels.is_empty() {
            mesh.label_pod(&pod, labels).unwrap();
        }
        mesh.serve_httpapp(&pod, 8080, Some(50051)).unwrap();
        pods.push(pod);
    }
    mesh.add_waypoint(1, NS, "wp").unwrap();
    mesh.wait_enrolled(0, &client, true).unwrap();
    (mesh, client, pods)
}

/// `curl` from `pod`; (exit ok, stdout, stderr).
fn curl(mesh: &Mesh, pod: &Pod, args: &[&str]) -> (bool, String, String) {
    let out = mesh.curl(pod, args).expect("run curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `n` GETs of `url` on one keep-alive connection; one line per response:
/// "<status> <x-app-name>".
fn many(mesh: &Mesh, pod: &Pod, url: &str, n: usize, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<&str> = vec![
        "-w",
        "%{http_code} %header{x-app-name}\\n",
        "--max-time",
        "120",
    ];
    args.extend_from_slice(extra);
    // Each URL needs its own -o.
    for _ in 0..n {
        args.extend(["-o", "/dev/null", url]);
    }
    let (ok, out, err) = curl(mesh, pod, &args);
    assert!(ok, "curl failed: {err}");
    out.lines().map(str::to_owned).collect()
}

fn who(vip: Ipv4Addr, path: &str) -> String {
    format!("http://{vip}:80{path}")
}

/// A 90/10 split measured over 1,000 requests lands within tolerance;
/// marked requests go to v2; the app sees the waypoint forwarding the
/// client's identity; a mesh client dialling the pod's address goes
/// through the waypoint too, and a client outside the mesh that skips it
/// is refused.
#[test]
fn e2e_waypoint_weighted_split_header_routing_and_no_bypass() {
    let (mut mesh, client, pods) =
        mesh_with(&[("web-v1", &[("svc", "web")]), ("web-v2", &[("svc", "web")])]);
    let vip = mesh
        .add_service_selecting(NS, "web", &[("svc", "web")], &[(80, 8080)])
        .unwrap();
    mesh.add_service(NS, "web-v1", "web-v1", &[(80, 8080)])
        .unwrap();
    mesh.add_service(NS, "web-v2", "web-v2", &[(80, 8080)])
        .unwrap();
    mesh.use_waypoint(NS, "web", Some("wp")).unwrap();
    mesh.model.http_routes.push(route_for(
        "web",
        vec![
            HttpRouteRule {
                matches: vec![HttpRouteMatch {
                    headers: vec![HeaderMatch {
                        name: "x-canary".into(),
                        value: "yes".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                backends: vec![backend("web-v2", 80, 1)],
                ..Default::default()
            },
            HttpRouteRule {
                backends: vec![backend("web-v1", 80, 90), backend("web-v2", 80, 10)],
                ..Default::default()
            },
        ],
    ));
    mesh.write_model().unwrap();

    let lines = many(&mesh, &client, &who(vip, "/who"), 1000, &[]);
    assert_eq!(lines.len(), 1000, "{lines:?}");
    let v2 = lines.iter().filter(|l| l.as_str() == "200 web-v2").count();
    let v1 = lines.iter().filter(|l| l.as_str() == "200 web-v1").count();
    assert_eq!(
        v1 + v2,
        1000,
        "every answer is a 200 from v1 or v2: {lines:?}"
    );
    // Binomial(1000, 0.1): mean 100, sd 9.5; 60..=140 is over 4 sd.
    assert!((60..=140).contains(&v2), "v2 got {v2} of 1000 (want ~100)");

    let marked = many(
        &mesh,
        &client,
        &who(vip, "/who"),
        50,
        &["-H", "x-canary: yes"],
    );
    assert!(
        marked.iter().all(|l| l == "200 web-v2"),
        "marked requests all go to v2: {marked:?}"
    );

    // The app sees the waypoint's forwarded client identity.
    let (ok, body, err) = curl(&mesh, &client, &[&who(vip, "/who")]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let xfcc = v["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap_or("");
    assert!(
        xfcc.contains("spiffe://cluster.local/ns/shop/sa/client"),
        "{v}"
    );
    assert!(v["headers"]["traceparent"].as_str().is_some(), "{v}");

    let m = mesh.waypoint_metrics("wp").unwrap();
    assert!(
        metric_sum(
            &m,
            "weft_requests_total",
            &[
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/shop/sa/client"
                ),
                ("destination_service", "web.shop"),
                ("response_code", "200"),
            ]
        ) >= 1050.0,
        "{m}"
    );

    // A mesh client dialling the pod's address still goes through the
    // waypoint (forwarded unrouted: no route names a pod).
    let direct = format!("http://{}:8080/who", pods[0].ip);
    let (ok, body, err) = curl(&mesh, &client, &["--max-time", "5", &direct]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["headers"]["x-forwarded-client-cert"]
            .as_str()
            .is_some_and(|x| x.contains("spiffe://cluster.local/ns/shop/sa/wp")),
        "the pod saw the waypoint forward it: {v}"
    );
    // A client outside the mesh skips the waypoint: refused by the
    // destination ztunnel.
    let stranger = mesh.add_pod(0, "outside", "stranger", "stranger").unwrap();
    let (ok, _, err) = curl(&mesh, &stranger, &["--max-time", "5", &direct]);
    assert!(!ok, "a client skipping the waypoint must be refused");
    let dst = mesh.metrics(1).unwrap();
    assert!(
        metric_sum(
            &dst,
            "weft_authorization_denials_total",
            &[("policy", "waypoint-required:shop/wp")]
        ) >= 1.0,
        "{err}\n{dst}"
    );
}

/// Per-attempt 50% aborts are retried to success; a route-less path is
/// denied by L7 policy while another is allowed; a rate limit answers 429
/// with retry-after past its budget.
#[test]
fn e2e_waypoint_retries_policy_and_rate_limit() {
    let (mut mesh, client, pods) = mesh_with(&[("web", &[]), ("api", &[])]);
    let web = mesh.add_service(NS, "web", "web", &[(80, 8080)]).unwrap();
    let api = mesh.add_service(NS, "api", "api", &[(80, 8080)]).unwrap();
    mesh.use_waypoint(NS, "web", Some("wp")).unwrap();
    mesh.use_waypoint(NS, "api", Some("wp")).unwrap();
    mesh.model.http_routes.push(route_for(
        "web",
        vec![HttpRouteRule {
            backends: vec![backend("web", 80, 1)],
            // With half the attempts aborted, 20 retries leave one request
            // in 2^21 failing (8 left one in 512: a flaky test).
            retry: Some(Retry {
                codes: vec![503],
                attempts: 20,
                backoff_ms: Some(1),
                non_idempotent: false,
            }),
            ..Default::default()
        }],
    ));
    mesh.model.traffic_policies.push(TrafficPolicy {
        name: "web-faults".into(),
        namespace: NS.into(),
        target: "web".into(),
        // Half of all attempts fail here: allow that many retries (the
        // default budget, 20% of requests or 10/s, would rightly stop them).
        retry_budget: Some(weft_api::model::RetryBudget {
            percent: 100,
            min_retries_per_second: 1000,
        }),
        fault: Some(weft_api::model::Fault {
            delay: None,
            abort: Some(FaultAbort {
                percent: 50,
                status: 503,
            }),
        }),
        ..Default::default()
    });
    mesh.model.traffic_policies.push(TrafficPolicy {
        name: "api-limit".into(),
        namespace: NS.into(),
        target: "api".into(),
        rate_limit: Some(RateLimit {
            requests: 5,
            period_ms: 60_000,
            burst: Some(5),
            key: Default::default(),
        }),
        ..Default::default()
    });
    mesh.model.policies.push(AuthorizationPolicy {
        name: "no-admin".into(),
        namespace: NS.into(),
        selector: None,
        action: PolicyAction::Deny,
        rules: vec![Rule {
            from: vec![],
            to: vec![Destination {
                paths: vec!["/admin*".into()],
                ..Default::default()
            }],
        }],
        targets: vec![PolicyTarget {
            kind: Default::default(),
            name: "web".into(),
        }],
    });
    mesh.write_model().unwrap();

    let lines = many(&mesh, &client, &who(web, "/who"), 100, &[]);
    assert!(
        lines.iter().all(|l| l == "200 web"),
        "every request succeeds after retries: {lines:?}"
    );
    let m = mesh.waypoint_metrics("wp").unwrap();
    let retries = metric_sum(
        &m,
        "weft_retries_total",
        &[("destination_service", "web.shop")],
    );
    assert!(
        retries >= 20.0,
        "about half the attempts were aborted and retried: {retries}\n{m}"
    );

    let (ok, out, err) = curl(
        &mesh,
        &client,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &who(web, "/admin/users"),
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(out, "403", "denied path");
    // Dialling web's pod address instead of the Service goes through the
    // waypoint too, and the Service's policy still applies there.
    let (ok, out, err) = curl(
        &mesh,
        &client,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{}:8080/admin/users", pods[0].ip),
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(out, "403", "the pod address is no way around web's policy");
    let lines = many(&mesh, &client, &who(web, "/who"), 3, &[]);
    assert!(
        lines.iter().all(|l| l == "200 web"),
        "allowed path: {lines:?}"
    );
    let m = mesh.waypoint_metrics("wp").unwrap();
    assert!(
        metric_sum(
            &m,
            "weft_authorization_denials_total",
            &[("policy", "shop/no-admin")]
        ) >= 1.0,
        "{m}"
    );

    let codes = many(&mesh, &client, &who(api, "/who"), 8, &[]);
    let ok_count = codes.iter().filter(|l| l.starts_with("200")).count();
    let limited = codes.iter().filter(|l| l.starts_with("429")).count();
    assert_eq!((ok_count, limited), (5, 3), "{codes:?}");
    let (_, headers, _) = curl(
        &mesh,
        &client,
        &["-D", "-", "-o", "/dev/null", &who(api, "/who")],
    );
    assert!(
        headers.to_ascii_lowercase().contains("retry-after:"),
        "{headers}"
    );
}

/// A GRPCRoute sends Health/Check to one backend and Health/Watch to
/// another (real tonic client and server, HTTP/2 end to end).
#[test]
fn e2e_waypoint_grpc_routed_by_method() {
    let (mut mesh, client, _pods) = mesh_with(&[
        ("grpc-a", &[("svc", "grpc")]),
        ("grpc-b", &[("svc", "grpc")]),
    ]);
    let vip = mesh
        .add_service_selecting(NS, "grpc", &[("svc", "grpc")], &[(50051, 50051)])
        .unwrap();
    mesh.add_service(NS, "grpc-a", "grpc-a", &[(50051, 50051)])
        .unwrap();
    mesh.add_service(NS, "grpc-b", "grpc-b", &[(50051, 50051)])
        .unwrap();
    mesh.use_waypoint(NS, "grpc", Some("wp")).unwrap();
    let method = |m: &str, to: &str| GrpcRouteRule {
        matches: vec![GrpcRouteMatch {
            method: Some(GrpcMethodMatch {
                service: "grpc.health.v1.Health".into(),
                method: m.into(),
                ..Default::default()
            }),
            headers: vec![],
        }],
        backends: vec![backend(to, 50051, 1)],
        ..Default::default()
    };
    mesh.model.grpc_routes.push(GrpcRoute {
        name: "health".into(),
        namespace: NS.into(),
        created: "2026-01-01T00:00:00Z".into(),
        parents: parent("grpc"),
        hostnames: vec![],
        rules: vec![method("Check", "grpc-a"), method("Watch", "grpc-b")],
    });
    mesh.write_model().unwrap();
    let addr = format!("{vip}:50051");
    for _ in 0..5 {
        let v = mesh
            .httpapp(
                &client,
                &["grpc-check", "--addr", &addr, "--service", "grpc-a"],
            )
            .unwrap();
        assert_eq!(v["status"], 1, "Check reaches grpc-a (SERVING): {v}");
        let v = mesh
            .httpapp(
                &client,
                &["grpc-check", "--addr", &addr, "--service", "grpc-b"],
            )
            .unwrap();
        assert_eq!(v["error"], "NotFound", "Check never reaches grpc-b: {v}");
        let v = mesh
            .httpapp(
                &client,
                &["grpc-watch", "--addr", &addr, "--service", "grpc-b"],
            )
            .unwrap();
        assert_eq!(v["status"], 1, "Watch reaches grpc-b: {v}");
    }
    let m = mesh.waypoint_metrics("wp").unwrap();
    assert!(
        metric_sum(&m, "weft_requests_total", &[("request_protocol", "grpc")]) >= 15.0,
        "{m}"
    );
}

fn pattern_sha256(n: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut i = 0u64;
    while i < n {
        buf.clear();
        let end = (i + 64 * 1024).min(n);
        buf.extend((i..end).map(|j| (j % 251) as u8));
        h.update(&buf);
        i = end;
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// HTTP semantics through the waypoint match a direct connection:
/// keep-alive reuse, HTTP/2 multiplexing, 100 MiB each way checksummed,
/// streamed responses arriving as they are produced, a cancelled request
/// reaching the app as a cancellation; and bad input answered per spec
/// without harming other clients.
#[test]
fn e2e_waypoint_http_semantics_and_bad_input() {
    let (mut mesh, client, pods) = mesh_with(&[("web", &[])]);
    let vip = mesh.add_service(NS, "web", "web", &[(80, 8080)]).unwrap();
    mesh.use_waypoint(NS, "web", Some("wp")).unwrap();
    let url = |p: &str| who(vip, p);

    // HTTP/1.1 keep-alive: three requests, one connection.
    let (ok, out, err) = curl(
        &mesh,
        &client,
        &[
            "-w",
            "%{num_connects}\\n",
            "-o",
            "/dev/null",
            &url("/who"),
            "-o",
            "/dev/null",
            &url("/who"),
            "-o",
            "/dev/null",
            &url("/who"),
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(out, "1\n0\n0\n", "one connection reused");

    // HTTP/2 multiplexing: 200 requests, 50 at a time on one connection.
    let out = client
        .command("h2load")
        .args(["-n", "200", "-c", "1", "-m", "50", &url("/who")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("200 succeeded, 0 failed"),
        "h2load over the waypoint: {text}"
    );

    // 100 MiB down and up, checksummed.
    const N: u64 = 100 * 1024 * 1024;
    let out = client
        .command("sh")
        .args([
            "-c",
            &format!(
                "curl -sS --max-time 120 {} | sha256sum",
                url(&format!("/bytes/{N}"))
            ),
        ])
        .output()
        .unwrap();
    let got = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        got.split_whitespace().next().unwrap_or(""),
        pattern_sha256(N),
        "download checksum"
    );
    let file = mesh.cluster.run_dir().join("upload.bin");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        let mut written = 0u64;
        while written < N {
            let c: Vec<u8> = (written..written + 64 * 1024)
                .map(|j| (j % 251) as u8)
                .collect();
            f.write_all(&c).unwrap();
            written += c.len() as u64;
        }
    }
    let upload_arg = format!("@{}", file.display());
    let (ok, out, err) = curl(
        &mesh,
        &client,
        &[
            "--max-time",
            "120",
            "--data-binary",
            &upload_arg,
            &url("/upload"),
        ],
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["bytes"], N, "{v}");
    assert_eq!(v["sha256"], pattern_sha256(N), "upload checksum");
    let _ = std::fs::remove_file(&file);

    // Streaming: the first chunk arrives while the app is still producing.
    let mut child = client
        .command("curl")
        .args([
            "-sS",
            "-N",
            "--max-time",
            "20",
            &url("/stream?chunks=4&interval_ms=700"),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "chunk 0");
    assert!(
        child.try_wait().unwrap().is_none(),
        "chunk 0 was delivered before the response ended"
    );
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    assert_eq!(rest, ["chunk 1", "chunk 2", "chunk 3"]);
    assert!(child.wait().unwrap().success());

    // Cancellation: the client gives up; the app sees its request cancelled.
    let (ok, _, _) = curl(&mesh, &client, &["--max-time", "1", &url("/slow?ms=8000")]);
    assert!(!ok, "the client timed out");
    // From inside the app pod, on loopback (not captured).
    let app_stats = "http://127.0.0.1:8080/stats".to_owned();
    weft_e2e::mesh::wait_until(Duration::from_secs(10), || {
        let out = pods[0]
            .command("curl")
            .args(["-sS", &app_stats])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["cancelled"].as_u64()? >= 1).then_some(())
    })
    .expect("the app saw the cancellation");

    // Bad input: a malformed request line/header gets 400, an oversized
    // header block 431; a slow client that trickles its headers is cut off
    // while others are served.
    let raw = |payload: &str, hold_s: u32| -> String {
        let script = format!(
            "exec 3<>/dev/tcp/{vip}/80; printf '{payload}' >&3; sleep {hold_s}; timeout 15 cat <&3"
        );
        let out = client
            .command("bash")
            .args(["-c", &script])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let bad = raw(
        "GET /who HTTP/1.1\\r\\nHost: x\\r\\nBad Header Line\\r\\n\\r\\n",
        0,
    );
    assert!(bad.starts_with("HTTP/1.1 400"), "malformed header: {bad:?}");
    let big = "a".repeat(80 * 1024);
    let (ok, out, err) = curl(
        &mesh,
        &client,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("x-big: {big}"),
            &url("/who"),
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(out, "431", "oversized headers");
    let slow = client
        .command("bash")
        .args([
            "-c",
            &format!(
                "exec 3<>/dev/tcp/{vip}/80; printf 'GET /who HTTP/1.1\\r\\nHost: x\\r\\n' >&3; \
                 for i in $(seq 1 20); do printf 'x-slow-$i: 1\\r\\n' >&3 || exit 0; sleep 1; done; echo finished"
            ),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Others are served meanwhile.
    std::thread::sleep(Duration::from_secs(2));
    let lines = many(&mesh, &client, &url("/who"), 20, &[]);
    assert!(lines.iter().all(|l| l == "200 web"), "{lines:?}");
    let out = slow.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("finished"),
        "the waypoint cut the trickling client off (header read timeout): {text}"
    );

    // An HTTP/2 rapid-reset flood: the waypoint ends that connection (GOAWAY)
    // long before the 20,000 streams, and serves other clients meanwhile.
    let addr = format!("{vip}:80");
    let v = mesh
        .httpapp(
            &client,
            &["h2-flood", "--addr", &addr, "--streams", "20000"],
        )
        .unwrap();
    assert_eq!(v["closed_by_server"], true, "{v}");
    assert!(v["opened"].as_u64().unwrap() < 20_000, "{v}");
    let lines = many(&mesh, &client, &url("/who"), 10, &[]);
    assert!(lines.iter().all(|l| l == "200 web"), "{lines:?}");
}

/// An HTTPRoute named after `service`, attached to it.
fn route_for(service: &str, rules: Vec<HttpRouteRule>) -> HttpRoute {
    HttpRoute {
        name: service.into(),
        namespace: NS.into(),
        created: "2026-01-01T00:00:00Z".into(),
        parents: parent(service),
        hostnames: vec![],
        rules,
    }
}

/// The status of one GET of `url` from `pod`, and how long it took.
fn timed_status(mesh: &Mesh, pod: &Pod, url: &str) -> (String, Duration) {
    let started = Instant::now();
    let (ok, out, err) = curl(
        mesh,
        pod,
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
            url,
        ],
    );
    assert!(ok, "curl {url}: {err}");
    (out, started.elapsed())
}

/// Route timeouts: the request timeout answers 504 when the response
/// headers are late and cuts a response body still streaming at the
/// deadline; the backend (per-try) timeout answers 504 for a slow attempt.
#[test]
fn e2e_waypoint_request_and_backend_timeouts() {
    let (mut mesh, client, _pods) = mesh_with(&[("web", &[])]);
    let vip = mesh.add_service(NS, "web", "web", &[(80, 8080)]).unwrap();
    mesh.use_waypoint(NS, "web", Some("wp")).unwrap();
    let rule = |path: &str, request_ms: Option<u64>, backend_ms: Option<u64>| HttpRouteRule {
        matches: vec![HttpRouteMatch {
            path: Some(PathMatch::PathPrefix(path.into())),
            ..Default::default()
        }],
        backends: vec![backend("web", 80, 1)],
        timeouts: Some(Timeouts {
            request_ms,
            backend_request_ms: backend_ms,
        }),
        ..Default::default()
    };
    mesh.model.http_routes.push(route_for(
        "web",
        vec![
            rule("/slow", Some(500), None),
            rule("/stream", Some(1000), None),
            // /try?ms=N is rewritten to the app's /slow?ms=N.
            HttpRouteRule {
                filters: vec![HttpFilter::UrlRewrite(UrlRewrite {
                    hostname: None,
                    path: Some(PathModifier::ReplacePrefixMatch("/slow".into())),
                })],
                ..rule("/try", None, Some(300))
            },
            HttpRouteRule {
                backends: vec![backend("web", 80, 1)],
                ..Default::default()
            },
        ],
    ));
    mesh.write_model().unwrap();

    // Late headers: 504 at the request timeout, not after the app's 3 s.
    let (status, took) = timed_status(&mesh, &client, &who(vip, "/slow?ms=3000"));
    assert_eq!(status, "504");
    assert!(took < Duration::from_millis(2500), "504 after {took:?}");

    // A body still streaming at the deadline is cut: 20 chunks 200 ms
    // apart would take 3.8 s; the client sees an incomplete response.
    let started = Instant::now();
    let (ok, out, _) = curl(
        &mesh,
        &client,
        &[
            "-sN",
            "--max-time",
            "10",
            &who(vip, "/stream?chunks=20&interval_ms=200"),
        ],
    );
    let took = started.elapsed();
    let chunks = out.lines().filter(|l| l.starts_with("chunk ")).count();
    assert!(!ok, "curl must see the response end early: {chunks} chunks");
    assert!((1..20).contains(&chunks), "{chunks} chunks: {out}");
    assert!(took < Duration::from_millis(3000), "cut after {took:?}");

    // Within the deadline the same stream is whole.
    let (ok, out, err) = curl(
        &mesh,
        &client,
        &[
            "-sN",
            "--max-time",
            "10",
            &who(vip, "/stream?chunks=4&interval_ms=100"),
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 4, "{out}");

    // Per-try timeout: a 2 s attempt is abandoned at 300 ms.
    let (status, took) = timed_status(&mesh, &client, &who(vip, "/try?ms=2000"));
    assert_eq!(status, "504");
    assert!(took < Duration::from_millis(1800), "504 after {took:?}");
}

/// The figures of h2load's "requests:" line: (total, started, done,
/// succeeded, failed, errored, timeout).
fn h2load_requests(text: &str) -> Option<[u64; 7]> {
    let line = text.lines().find(|l| l.starts_with("requests:"))?;
    let nums: Vec<u64> = line
        .trim_start_matches("requests:")
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse().ok())
        .collect();
    nums.try_into().ok()
}

/// A waypoint replica stopped in the middle of an h2load run, the way a
/// rollout replaces one: the controller first takes the terminating pod
/// out of the model (played here by the test), then the replica gets
/// SIGTERM and drains (GOAWAY to its clients; requests in flight finish).
/// No request that started fails, the replica exits once drained, and the
/// other replica takes the new connections.
#[test]
fn e2e_waypoint_sigterm_under_load_fails_no_started_request() {
    let (mut mesh, client, _pods) = mesh_with(&[("web", &[])]);
    let vip = mesh
        .add_service_selecting(NS, "web", &[("app", "web")], &[(80, 8080)])
        .unwrap();
    mesh.use_waypoint(NS, "web", Some("wp")).unwrap();
    let second = mesh.add_waypoint_replica(1, NS, "wp", 2).unwrap();
    mesh.wait_model_applied().unwrap();
    let first = mesh.cluster.pod(NS, "wp-waypoint").cloned().unwrap();
    let url = who(vip, "/who");

    // h2load's per-request log: start (µs since the epoch; 0 for a request
    // never sent), status (-1: no response), duration.
    let requests_log = mesh.cluster.run_dir().join("h2load-requests.tsv");
    let load = {
        let (client, url, log) = (client.clone(), url.clone(), requests_log.clone());
        std::thread::spawn(move || {
            client
                .command("h2load")
                .args(["-n", "30000", "-c", "8", "-m", "4", "-T", "20", &url])
                .arg(format!("--log-file={}", log.display()))
                .output()
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    mesh.remove_waypoint_pod_from_model(&first).unwrap();
    mesh.wait_model_applied().unwrap();
    let spawn = mesh.waypoint_spawn(&first).unwrap();
    let served_before = metric_sum(
        &mesh.waypoint_pod_metrics(&first).unwrap(),
        "weft_requests_total",
        &[],
    );
    let signalled_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    mesh.cluster.signal(&spawn, libc::SIGTERM).unwrap();
    let out = load.join().unwrap().expect("run h2load");
    let text = String::from_utf8_lossy(&out.stdout);
    let [total, started, done, succeeded, _failed, errored, timeout] =
        h2load_requests(&text).unwrap_or_else(|| panic!("no requests line: {text}"));
    assert!(
        served_before > 0.0,
        "the first replica carried part of the load"
    );
    // Every request that started before the signal got a 200; after it,
    // any request that got an answer got a 200 too. What h2load counts as
    // errored are the requests it never sent: it does not reconnect after
    // the draining replica's GOAWAY (RFC 9113 section 6.8 lets a client
    // retry those; h2load does not), plus at most one window of streams
    // the GOAWAY refused unprocessed.
    let rows: Vec<(u64, i64)> = std::fs::read_to_string(&requests_log)
        .expect("h2load's request log")
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect();
    // A start of 0: h2load queued the request and never sent it.
    let before: Vec<i64> = rows
        .iter()
        .filter(|(t, _)| *t > 0 && *t < signalled_us)
        .map(|(_, s)| *s)
        .collect();
    let after_answered = rows
        .iter()
        .filter(|(t, s)| *t >= signalled_us && *s > 0)
        .count();
    // Sent or queued when the GOAWAY came, never processed (h2load logs
    // those with no start or no status): at most one window per connection.
    let unprocessed = started - succeeded;
    eprintln!(
        "h2load: {total} total, {started} started, {done} done, {succeeded} succeeded; started before the signal: {} ({} not 200); after it: {after_answered} answered; unprocessed: {unprocessed}; never sent (no reconnect after GOAWAY): {}",
        before.len(),
        before.iter().filter(|s| **s != 200).count(),
        total - started
    );
    assert!(
        before.len() > 1000,
        "load before the signal: {}",
        before.len()
    );
    let failed_before: Vec<String> = std::fs::read_to_string(&requests_log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let t: u64 = f.first()?.parse().ok()?;
            (t > 0 && t < signalled_us && f.get(1) != Some(&"200"))
                .then(|| format!("{} us before the signal: {l}", signalled_us - t))
        })
        .collect();
    assert!(
        failed_before.is_empty(),
        "requests started before the signal failed: {failed_before:#?}\n{text}"
    );
    assert!(
        rows.iter().all(|(_, s)| *s <= 0 || *s == 200),
        "every answer is a 200: {text}"
    );
    assert_eq!(timeout, 0, "{text}");
    assert!(unprocessed <= 8 * 4, "{unprocessed} unprocessed: {text}");
    assert_eq!(errored, total - succeeded, "{text}");
    assert!(text.contains(" 0 5xx"), "{text}");

    let status =
        weft_e2e::mesh::wait_until(Duration::from_secs(40), || mesh.cluster.exit_status(&spawn))
            .expect("the stopped replica exits once drained");
    let log = mesh.cluster.log(&spawn);
    assert!(
        status.success() && log.contains("drained; exiting"),
        "{log}"
    );

    // New connections go to the replica that stays.
    let before = metric_sum(
        &mesh.waypoint_pod_metrics(&second).unwrap(),
        "weft_requests_total",
        &[],
    );
    let lines = many(&mesh, &client, &url, 20, &[]);
    assert!(lines.iter().all(|l| l.starts_with("200")), "{lines:?}");
    let after = metric_sum(
        &mesh.waypoint_pod_metrics(&second).unwrap(),
        "weft_requests_total",
        &[],
    );
    assert!(after - before >= 20.0, "{before} -> {after}");
}
