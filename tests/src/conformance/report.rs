//! The conformance report, in the shape of upstream's `ConformanceReport`
//! (`gateway.networking.k8s.io/v1`, kind `ConformanceReport`: the
//! implementation, the Gateway API version the cases come from, and per
//! profile the core and extended results with their statistics, failed and
//! skipped tests, and supported and unsupported extended features), built
//! from the cases' result files. Weft adds `passedTests` next to
//! `failedTests`, so the report lists every case. Keys are sorted, as
//! upstream's YAML is.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::cases::{self, Case};
use super::{CaseResult, SUPPORTED_FEATURES};

/// The commit of kubernetes-sigs/gateway-api the cases were taken from
/// (`tests/conformance/README.md`).
pub const GATEWAY_API_VERSION: &str = "main@4564255ac2c3";

/// A conformance profile: upstream's names and feature sets.
struct Profile {
    name: &'static str,
    core: &'static [&'static str],
    extended: Vec<&'static str>,
}

/// Upstream `MeshExtendedFeatures`.
const MESH_EXTENDED: &[&str] = &[
    "MeshClusterIPMatching",
    "MeshConsumerRoute",
    "MeshHTTPRouteRewritePath",
    "MeshHTTPRouteSchemeRedirect",
    "MeshHTTPRouteRedirectPort",
    "MeshHTTPRouteRedirectPath",
    "MeshHTTPRouteBackendRequestHeaderModification",
    "MeshHTTPRouteQueryParamMatching",
    "MeshHTTPRouteNamedRouteRule",
];

/// Upstream `HTTPRouteExtendedFeatures`.
const HTTP_ROUTE_EXTENDED: &[&str] = &[
    "HTTPRouteDestinationPortMatching",
    "HTTPRouteBackendRequestHeaderModification",
    "HTTPRouteQueryParamMatching",
    "HTTPRouteMethodMatching",
    "HTTPRouteResponseHeaderModification",
    "HTTPRoutePortRedirect",
    "HTTPRouteSchemeRedirect",
    "HTTPRoutePathRedirect",
    "HTTPRouteHostRewrite",
    "HTTPRoutePathRewrite",
    "HTTPRouteRequestMirror",
    "HTTPRouteRequestMultipleMirrors",
    "HTTPRouteRequestPercentageMirror",
    "HTTPRouteRequestTimeout",
    "HTTPRouteBackendTimeout",
    "HTTPRouteParentRefPort",
    "HTTPRouteBackendProtocolH2C",
    "HTTPRouteBackendProtocolWebSocket",
    "HTTPRouteNamedRouteRule",
    "HTTPRouteCORS",
    "HTTPRoute303RedirectStatusCode",
    "HTTPRoute307RedirectStatusCode",
    "HTTPRoute308RedirectStatusCode",
];

/// Upstream `MeshGRPCConformanceProfile` and `MeshHTTPConformanceProfile`.
fn profiles() -> Vec<Profile> {
    vec![
        Profile {
            name: "MESH-GRPC",
            core: &["Mesh", "GRPCRoute"],
            extended: MESH_EXTENDED.to_vec(),
        },
        Profile {
            name: "MESH-HTTP",
            core: &["Mesh", "HTTPRoute"],
            extended: MESH_EXTENDED
                .iter()
                .chain(HTTP_ROUTE_EXTENDED)
                .copied()
                .collect(),
        },
    ]
}

impl Profile {
    /// Upstream: a test belongs to every profile holding all its features.
    fn holds(&self, c: &Case) -> bool {
        c.features
            .iter()
            .all(|f| self.core.contains(f) || self.extended.contains(f))
    }

    fn is_core(&self, c: &Case) -> bool {
        c.features.iter().all(|f| self.core.contains(f))
    }
}

/// Result, statistics and test lists of one support level.
fn status(tests: &[(&Case, &CaseResult)]) -> Value {
    let passed: Vec<&str> = tests
        .iter()
        .filter(|(_, r)| r.passed)
        .map(|(c, _)| c.name)
        .collect();
    let failed: Vec<&str> = tests
        .iter()
        .filter(|(_, r)| !r.passed)
        .map(|(c, _)| c.name)
        .collect();
    let result = if !failed.is_empty() {
        "failure"
    } else {
        "success"
    };
    let mut v = json!({
        "result": result,
        "statistics": { "Passed": passed.len(), "Failed": failed.len(), "Skipped": 0 },
    });
    if !passed.is_empty() {
        v["passedTests"] = json!(passed);
    }
    if !failed.is_empty() {
        v["failedTests"] = json!(failed);
    }
    v
}

fn summary(core: &Value, extended: &Value) -> String {
    let say = |what: &str, v: &Value| match v["result"].as_str() {
        Some("success") => format!("{what} tests succeeded."),
        _ => format!(
            "{what} tests failed with {} test failures.",
            v["statistics"]["Failed"]
        ),
    };
    format!("{} {}", say("Core", core), say("Extended", extended))
}

/// The report for `results` (a case without one counts as failed), dated
/// `date` (RFC 3339).
pub fn build(results: &BTreeMap<String, CaseResult>, date: &str, version: &str) -> Value {
    let all = cases::all();
    let paired: Vec<(&Case, CaseResult)> = all
        .iter()
        .map(|c| {
            let r = results
                .get(c.name)
                .cloned()
                .unwrap_or_else(|| super::missing_result(c.name));
            (c, r)
        })
        .collect();
    let mut reports = Vec::new();
    for p in profiles() {
        let mine: Vec<(&Case, &CaseResult)> = paired
            .iter()
            .filter(|(c, _)| p.holds(c))
            .map(|(c, r)| (*c, r))
            .collect();
        let core: Vec<_> = mine.iter().copied().filter(|(c, _)| p.is_core(c)).collect();
        let ext: Vec<_> = mine
            .iter()
            .copied()
            .filter(|(c, _)| !p.is_core(c))
            .collect();
        // As upstream: the profile's extended features the implementation
        // declares, and the rest.
        let (mut supported, mut unsupported): (Vec<&str>, Vec<&str>) = p
            .extended
            .iter()
            .copied()
            .partition(|f| SUPPORTED_FEATURES.contains(f));
        supported.sort_unstable();
        unsupported.sort_unstable();
        let core_status = status(&core);
        let mut ext_status = status(&ext);
        ext_status["supportedFeatures"] = json!(supported);
        ext_status["unsupportedFeatures"] = json!(unsupported);
        reports.push(json!({
            "name": p.name,
            "summary": summary(&core_status, &ext_status),
            "core": core_status,
            "extended": ext_status,
        }));
    }
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "ConformanceReport",
        "date": date,
        "gatewayAPIVersion": GATEWAY_API_VERSION,
        "gatewayAPIChannel": "standard",
        "mode": "default",
        "implementation": {
            "organization": "weft",
            "project": "weft",
            "url": "",
            "version": version,
            "contact": [],
        },
        "profiles": reports,
    })
}

/// The report as YAML, with a header saying how it was made.
pub fn to_yaml(report: &Value, results: &BTreeMap<String, CaseResult>) -> String {
    let mut out = String::from(
        "# Gateway API mesh conformance report for Weft, written by `cargo xtask conformance`\n\
         # from the cases in tests/conformance/ (run by tests/tests/conformance.rs on the\n\
         # simulated cluster). `supportedFeatures` are the extended features Weft declares\n\
         # (SUPPORTED_FEATURES in tests/src/conformance/mod.rs), each tested by a case here;\n\
         # `unsupportedFeatures` the rest of the profile: Weft lacks them, or no case here\n\
         # tests them. `passedTests` is Weft's addition to the upstream shape.\n",
    );
    for c in cases::all() {
        let line = match results.get(c.name) {
            Some(r) if r.passed => format!("# {:<45} passed  ({:.0} s)\n", c.name, r.seconds),
            Some(r) => format!(
                "# {:<45} FAILED  {}\n",
                c.name,
                r.failures
                    .first()
                    .and_then(|f| f.lines().next())
                    .map(|l| l.chars().take(100).collect::<String>())
                    .unwrap_or_default()
            ),
            None => format!("# {:<45} FAILED  no result\n", c.name),
        };
        out += &line;
    }
    out += &serde_yaml::to_string(report).unwrap_or_default();
    out
}
