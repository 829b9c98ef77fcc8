//! L7 authorization, the first stage: the AuthorizationPolicies that target
//! the tunnel's service or this waypoint, evaluated for the request (403
//! when denied) or, for a connection that is not HTTP, for the connection
//! (where rules naming HTTP fields fail closed).

use http::request::Parts;
use http::{HeaderMap, StatusCode};
use tracing::info;

use super::reply::{LocalReply, Stage};
use crate::authz::{Authorizer, AuthzRequest, Headers, Target as AuthzTarget};
use crate::context::{ConnCtx, Target};
use crate::metrics::Metrics;

/// One HTTP request. `Err` names the denying policy in `policy`.
pub fn request(
    authz: &Authorizer,
    waypoint: &str,
    ctx: &ConnCtx,
    parts: &Parts,
    metrics: &Metrics,
    policy: &mut String,
) -> Stage<()> {
    let http = Http {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        headers: &parts.headers,
    };
    match check(authz, waypoint, ctx, http) {
        Ok(()) => Ok(()),
        Err(denied) => {
            info!(component = "authz", policy = denied, src = %ctx.peer, method = %parts.method, path = parts.uri.path(), "request denied by policy");
            count(metrics, ctx, &denied);
            *policy = denied;
            Err(LocalReply::new(
                "denied",
                StatusCode::FORBIDDEN,
                "RBAC: access denied\n",
            ))
        }
    }
}

/// A connection carried at L4; `false` when denied.
pub fn connection(authz: &Authorizer, waypoint: &str, ctx: &ConnCtx, metrics: &Metrics) -> bool {
    // An empty method marks "no HTTP" for the evaluator's L4 path.
    let none = HeaderMap::new();
    let http = Http {
        method: "",
        path: "",
        headers: &none,
    };
    match check(authz, waypoint, ctx, http) {
        Ok(()) => true,
        Err(denied) => {
            info!(component = "authz", policy = denied, src = %ctx.peer, "L4 connection denied by policy");
            count(metrics, ctx, &denied);
            false
        }
    }
}

/// The HTTP attributes policies may name.
struct Http<'a> {
    method: &'a str,
    path: &'a str,
    headers: &'a HeaderMap,
}

/// `Err(policy)` when denied. A workload addressed directly (a mesh
/// client dialling a pod behind this waypoint by its address) meets the
/// policies of every Service of it that uses a waypoint, and this
/// waypoint's own.
fn check(authz: &Authorizer, waypoint: &str, ctx: &ConnCtx, http: Http) -> Result<(), String> {
    let (namespace, name) = match &ctx.target {
        Target::Service {
            namespace, name, ..
        } => (namespace.as_str(), name.as_str()),
        Target::Workload(ep) => (&*ep.namespace, &*ep.workload),
    };
    let req = AuthzRequest {
        service: AuthzTarget { namespace, name },
        waypoint: AuthzTarget {
            namespace,
            name: waypoint,
        },
        src_ip: ctx.src_ip,
        src_identity: Some(&ctx.peer),
        port: ctx.original_dst.port(),
        method: http.method,
        path: http.path,
        headers: &Headers(http.headers),
    };
    match &ctx.target {
        Target::Service { .. } => authz.verdict(&req),
        Target::Workload(_) => authz.verdict_workload(AuthzTarget { namespace, name }, &req),
    }
}

fn count(metrics: &Metrics, ctx: &ConnCtx, policy: &str) {
    metrics.denied(policy, ctx.derived.service.clone());
}
