//! Driving one conformance expectation from a client pod and judging the
//! answer: the request goes out with a real client inside the pod's
//! network namespace (curl for HTTP, `weft-echo grpc` for gRPC), is
//! captured by the pod's ztunnel and carried through the waypoint, and the
//! echo backend's JSON says what arrived. The comparison is upstream's
//! mesh `compareRequest`, plus the backend's path and a redirect's
//! `Location`, which the upstream Gateway runner compares too.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::Rng;
use serde_json::Value;

use super::cases::{Expect, Protocol, Redirect};
use crate::cluster::Pod;
use crate::mesh::bin_path;

/// Upstream `RequiredConsecutiveSuccesses` and `MaxTimeToConsistency`.
const CONSECUTIVE: usize = 3;
const CONSISTENCY: Duration = Duration::from_secs(30);
/// One request's bound.
const REQUEST_TIMEOUT_S: &str = "10";

/// Where a request connects, and the authority it names.
#[derive(Clone, Debug)]
pub struct Target {
    /// `host[:port]` as the client writes it.
    pub authority: String,
    pub host: String,
    pub port: u16,
    /// What DNS would have answered for `host`.
    pub ip: Ipv4Addr,
}

/// What came back for one request.
#[derive(Clone, Debug, Default)]
pub struct Answer {
    pub status: u16,
    /// Lower-case names, in order.
    pub response_headers: Vec<(String, String)>,
    /// The pod that answered ("" when the waypoint answered itself).
    pub hostname: String,
    /// What the backend received, by lower-case name.
    pub request_headers: BTreeMap<String, Vec<String>>,
    pub request_path: Option<String>,
    /// The raw output, for failure messages.
    pub raw: String,
}

impl Answer {
    fn response_header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.response_headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    fn fill_from_echo(&mut self, body: &Value) {
        self.hostname = body["hostname"].as_str().unwrap_or_default().to_owned();
        self.request_path = body["path"].as_str().map(str::to_owned);
        if let Some(h) = body["headers"].as_object() {
            for (k, vs) in h {
                let vs = vs
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                self.request_headers.insert(k.to_ascii_lowercase(), vs);
            }
        }
    }
}

/// One HTTP/1.1 request with curl from `client`, not following redirects.
pub fn http(client: &Pod, t: &Target, e: &Expect, extra: &[(String, String)]) -> Result<Answer> {
    let mut cmd = client.command("curl");
    cmd.args(["-sS", "-i", "--globoff", "--max-time", REQUEST_TIMEOUT_S])
        .args(["-X", e.method]);
    if t.host.parse::<Ipv4Addr>().is_err() {
        cmd.args(["--resolve", &format!("{}:{}:{}", t.host, t.port, t.ip)]);
    }
    for (k, v) in e.headers.iter().chain(extra) {
        cmd.args(["-H", &format!("{k}: {v}")]);
    }
    cmd.arg(format!("http://{}{}", t.authority, e.path));
    let out = cmd.output().context("running curl in the client pod")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "curl {}: {}",
            t.authority,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_http(&stdout)
}

fn parse_http(text: &str) -> Result<Answer> {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status line in {text:?}"))?;
    let mut a = Answer {
        status,
        raw: text.to_owned(),
        ..Default::default()
    };
    for l in lines {
        if let Some((n, v)) = l.split_once(':') {
            a.response_headers
                .push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    if let Ok(v) = serde_json::from_str::<Value>(body.trim()) {
        a.fill_from_echo(&v);
    }
    Ok(a)
}

/// `count` gRPC `Echo` calls on one channel from `client`.
pub fn grpc(
    client: &Pod,
    t: &Target,
    e: &Expect,
    extra: &[(String, String)],
    count: usize,
) -> Result<Vec<Answer>> {
    let mut cmd = client.command_os(bin_path("weft-echo"));
    cmd.args(["grpc", "--addr", &format!("{}:{}", t.ip, t.port)])
        .args(["--authority", &t.authority])
        .args(["--count", &count.to_string()]);
    for (k, v) in e.headers.iter().chain(extra) {
        cmd.args(["-H", &format!("{k}:{v}")]);
    }
    let out = cmd
        .output()
        .context("running weft-echo grpc in the client pod")?;
    if !out.status.success() {
        bail!(
            "gRPC to {}: {}",
            t.authority,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut answers = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(line).with_context(|| format!("{line:?}"))?;
        let mut a = Answer {
            status: v["status"].as_u64().unwrap_or(0) as u16,
            raw: line.to_owned(),
            ..Default::default()
        };
        a.fill_from_echo(&v);
        answers.push(a);
    }
    Ok(answers)
}

/// One request of either protocol.
fn send(client: &Pod, t: &Target, e: &Expect, extra: &[(String, String)]) -> Result<Answer> {
    match e.protocol {
        Protocol::Http => http(client, t, e, extra),
        Protocol::Grpc => grpc(client, t, e, extra, 1)?
            .into_iter()
            .next()
            .context("the gRPC client printed no answer"),
    }
}

/// Upstream `compareRequest`, with the path and redirect checks added.
pub fn compare(e: &Expect, t: &Target, a: &Answer) -> Result<(), String> {
    if !e.status.contains(&a.status) {
        return Err(format!(
            "wanted status code to be one of {:?}, got {}",
            e.status, a.status
        ));
    }
    for (name, want) in &e.request_headers {
        match a.request_headers.get(&name.to_ascii_lowercase()) {
            None => {
                return Err(format!(
                    "expected {name} header to be set, actual headers: {:?}",
                    a.request_headers
                ))
            }
            Some(got) if got.join(",") != *want => {
                return Err(format!(
                    "expected {name} header to be set to {want}, got {}",
                    got.join(",")
                ))
            }
            Some(_) => {}
        }
    }
    for name in &e.request_absent {
        if let Some(v) = a.request_headers.get(&name.to_ascii_lowercase()) {
            return Err(format!("expected {name} header to not be set, got {v:?}"));
        }
    }
    if let Some(want) = e.request_path {
        if a.request_path.as_deref() != Some(want) {
            return Err(format!(
                "expected the backend to receive path {want}, got {:?}",
                a.request_path
            ));
        }
    }
    for name in &e.response_absent {
        if let Some(v) = a.response_header(name) {
            return Err(format!("expected no header {name:?}, got {v:?}"));
        }
    }
    for (name, want) in &e.response_headers {
        let got = a.response_header(name).unwrap_or("");
        if got != want {
            return Err(format!("expected header {name}={want}, got {got}"));
        }
    }
    if let Some(r) = &e.redirect {
        compare_location(r, e, t, a)?;
    }
    if !a.hostname.starts_with(e.backend) {
        return Err(format!(
            "expected pod name to start with {}, got {:?}",
            e.backend, a.hostname
        ));
    }
    Ok(())
}

fn compare_location(r: &Redirect, e: &Expect, t: &Target, a: &Answer) -> Result<(), String> {
    let location = a
        .response_header("location")
        .ok_or_else(|| "expected a Location header on the redirect".to_owned())?;
    let (scheme, rest) = location
        .split_once("://")
        .ok_or_else(|| format!("Location {location:?} is not an absolute URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p),
        None => (authority, ""),
    };
    let want_path = r.path.unwrap_or(e.path.as_str());
    let want = (
        r.scheme.unwrap_or("http"),
        r.host.unwrap_or(t.host.as_str()),
        r.port.unwrap_or(""),
        if want_path.is_empty() { "/" } else { want_path },
    );
    if (scheme, host, port, path) != want {
        return Err(format!(
            "expected redirect to scheme {:?} host {:?} port {:?} path {:?}, got Location {location:?}",
            want.0, want.1, want.2, want.3
        ));
    }
    Ok(())
}

/// Upstream `MakeRequestAndExpectEventuallyConsistentResponse`: the
/// expectation must hold for `CONSECUTIVE` requests in a row within
/// `CONSISTENCY`.
pub fn eventually(client: &Pod, t: &Target, e: &Expect) -> Result<(), String> {
    let deadline = Instant::now() + CONSISTENCY;
    let started = Instant::now();
    let mut streak = 0;
    let mut misses = 0;
    loop {
        let last = match send(client, t, e, &[]) {
            Ok(a) => match compare(e, t, &a) {
                Ok(()) => {
                    streak += 1;
                    if streak >= CONSECUTIVE {
                        eprintln!(
                            "{}: consistent after {:?} ({misses} misses)",
                            e.name,
                            started.elapsed()
                        );
                        return Ok(());
                    }
                    continue;
                }
                Err(why) => format!("{why}\n    answer: {}", a.raw.trim()),
            },
            Err(err) => format!("request failed: {err:#}"),
        };
        if misses == 0 {
            eprintln!("{}: not yet: {last}", e.name);
        }
        misses += 1;
        streak = 0;
        if Instant::now() >= deadline {
            return Err(format!("not consistent within {CONSISTENCY:?}: {last}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Upstream `TestWeightedDistribution` (HTTP: 500 requests, 10 at a time,
/// each with a random `X-Jitter` header; backends by pod name prefix) or
/// `TestWeightedDistributionBatch` (gRPC: one batch of 500 on one channel;
/// backends by pod name less its two hash parts).
pub fn distribution(
    client: &Pod,
    t: &Target,
    e: &Expect,
    weights: &[(&str, f64)],
    batch: bool,
) -> Result<(), String> {
    const TOTAL: usize = 500;
    const CONCURRENT: usize = 10;
    const TOLERANCE: f64 = 0.05;
    let hostnames: Vec<String> = if batch {
        let answers = grpc(client, t, e, &[], TOTAL).map_err(|err| format!("{err:#}"))?;
        if answers.len() != TOTAL {
            return Err(format!(
                "expected {TOTAL} responses but got {}",
                answers.len()
            ));
        }
        for a in &answers {
            compare(e, t, a).map_err(|why| format!("{why}: {}", a.raw))?;
        }
        answers.into_iter().map(|a| a.hostname).collect()
    } else {
        let next = AtomicUsize::new(0);
        let seen = Mutex::new(Vec::with_capacity(TOTAL));
        let failure = Mutex::new(None::<String>);
        std::thread::scope(|s| {
            for _ in 0..CONCURRENT {
                s.spawn(|| {
                    while next.fetch_add(1, Ordering::Relaxed) < TOTAL {
                        let jitter = vec![(
                            "X-Jitter".to_owned(),
                            rand::thread_rng().gen_range(0..10_000).to_string(),
                        )];
                        let r = http(client, t, e, &jitter)
                            .map_err(|err| format!("{err:#}"))
                            .and_then(|a| compare(e, t, &a).map(|()| a.hostname));
                        match r {
                            Ok(h) => seen.lock().unwrap_or_else(|p| p.into_inner()).push(h),
                            Err(why) => {
                                *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                                next.store(TOTAL, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
        if let Some(why) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(format!("error while sending requests: {why}"));
        }
        seen.into_inner().unwrap_or_else(|p| p.into_inner())
    };
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for h in &hostnames {
        let backend = if batch {
            weights
                .iter()
                .find(|(b, _)| extract_backend_name(h) == *b)
                .map(|(b, _)| *b)
        } else {
            weights
                .iter()
                .find(|(b, _)| h.starts_with(b))
                .map(|(b, _)| *b)
        };
        match backend {
            Some(b) => *counts.entry(b).or_default() += 1,
            None => return Err(format!("request was handled by an unexpected pod {h:?}")),
        }
    }
    let active = weights.iter().filter(|(_, w)| *w > 0.0).count();
    let mut errs = Vec::new();
    if counts.len() != active {
        errs.push(format!(
            "expected {active} backends to receive traffic, but got {}",
            counts.len()
        ));
    }
    for (backend, want) in weights {
        let got = counts.get(backend).copied().unwrap_or(0) as f64 / TOTAL as f64;
        if (got - want).abs() > TOLERANCE {
            errs.push(format!(
                "backend {backend:?} weighted traffic of {got} not within tolerance {want} (+/-{TOLERANCE})"
            ));
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

/// Upstream `extractBackendName`: `{deployment}-{hash}-{hash}` less the
/// two hashes.
fn extract_backend_name(pod: &str) -> String {
    let parts: Vec<&str> = pod.split('-').collect();
    if parts.len() < 3 {
        return pod.to_owned();
    }
    parts[..parts.len() - 2].join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_curl_answer_with_the_echo_body() {
        let a = parse_http(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nX-Header-Set: v1\r\n\r\n{\"hostname\":\"echo-v1-abc-def\",\"path\":\"/x?y=1\",\"headers\":{\"x-a\":[\"1\",\"2\"]}}\n",
        )
        .unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(a.response_header("x-header-set"), Some("v1"));
        assert_eq!(a.hostname, "echo-v1-abc-def");
        assert_eq!(a.request_path.as_deref(), Some("/x?y=1"));
        assert_eq!(a.request_headers["x-a"], vec!["1", "2"]);
        let r = parse_http("HTTP/1.1 302 Found\r\nlocation: http://example.org/p\r\n\r\n").unwrap();
        assert_eq!(r.status, 302);
        assert_eq!(r.hostname, "");
    }

    fn target() -> Target {
        Target {
            authority: "echo".into(),
            host: "echo".into(),
            port: 80,
            ip: Ipv4Addr::new(10, 0, 0, 1),
        }
    }

    #[test]
    fn compare_checks_every_field_it_is_given() {
        let cases = crate::conformance::cases::all();
        let find =
            |case: &str, i: usize| match &cases.iter().find(|c| c.name == case).unwrap().check {
                crate::conformance::cases::Check::Requests(v) => v[i].clone(),
                _ => unreachable!(),
            };
        let answer = |text: &str| parse_http(text).unwrap();
        // MeshHTTPRouteRedirectPort #0: 302 to http://echo:8083/port.
        let e = find("MeshHTTPRouteRedirectPort", 0);
        let good = answer("HTTP/1.1 302 Found\r\nlocation: http://echo:8083/port\r\n\r\n");
        assert_eq!(compare(&e, &target(), &good), Ok(()));
        for bad in [
            "HTTP/1.1 301 Moved\r\nlocation: http://echo:8083/port\r\n\r\n",
            "HTTP/1.1 302 Found\r\nlocation: http://echo/port\r\n\r\n",
            "HTTP/1.1 302 Found\r\nlocation: https://echo:8083/port\r\n\r\n",
            "HTTP/1.1 302 Found\r\nlocation: http://echo:8083/other\r\n\r\n",
            "HTTP/1.1 302 Found\r\n\r\n",
        ] {
            assert!(compare(&e, &target(), &answer(bad)).is_err(), "{bad}");
        }
        // MeshHTTPRouteRequestHeaderModifier #3: appended value, backend v1.
        let e = find("MeshHTTPRouteRequestHeaderModifier", 3);
        let body = |h: &str, pod: &str| {
            format!("HTTP/1.1 200 OK\r\n\r\n{{\"hostname\":\"{pod}\",\"path\":\"/add\",\"headers\":{{\"some-other-header\":[\"val\"],\"x-header-add\":{h}}}}}")
        };
        let ok = body(
            r#"["some-other-value","add-appends-values"]"#,
            "echo-v1-a-b",
        );
        assert_eq!(compare(&e, &target(), &answer(&ok)), Ok(()));
        let replaced = body(r#"["add-appends-values"]"#, "echo-v1-a-b");
        assert!(compare(&e, &target(), &answer(&replaced)).is_err());
        let wrong_pod = body(
            r#"["some-other-value","add-appends-values"]"#,
            "echo-v2-a-b",
        );
        assert!(compare(&e, &target(), &answer(&wrong_pod)).is_err());
        // MeshConsumerRoute #1: the header must be absent.
        let e = find("MeshConsumerRoute", 1);
        let with = "HTTP/1.1 200 OK\r\nx-header-set: set\r\n\r\n{\"hostname\":\"echo-v1-a-b\"}";
        assert!(compare(&e, &target(), &answer(with)).is_err());
    }

    #[test]
    fn backend_names_drop_the_two_hashes() {
        assert_eq!(extract_backend_name("echo-v1-5d8f9c7b6a-x2k4q"), "echo-v1");
        assert_eq!(extract_backend_name("echo"), "echo");
    }
}
