//! Request and response heads as they cross the waypoint: what is read
//! from the client's head, what the upstream head becomes (route filters,
//! rewrites, trace context, client certificate, no hop-by-hop headers), and
//! what the response head keeps.

use std::time::Duration;

use http::request::Parts;
use http::{header, HeaderMap, HeaderValue, Request, Response, Uri};

use super::reply::set_header;
use crate::body::{self, Body};
use crate::context::{ConnCtx, Proto};
use crate::plan::Plan;
use crate::telemetry::TraceContext;

/// Hop-by-hop headers (RFC 9110 7.6.1) never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// The options of every `Connection` header, trimmed.
pub fn connection_options(h: &HeaderMap) -> impl Iterator<Item = &str> {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<String> = connection_options(h)
        .filter(|s| !s.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    for n in named {
        h.remove(n.as_str());
    }
    for n in HOP_BY_HOP {
        // gRPC needs "te: trailers" end to end.
        if n == "te"
            && h.get("te")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"))
        {
            continue;
        }
        h.remove(n);
    }
}

pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

pub fn authority_of(parts: &Parts) -> String {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

/// The path and query of the request (`/` when it has none).
pub fn path_and_query(parts: &Parts) -> String {
    parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into())
}

/// Filters, rewrite, trace context and hop-by-hop cleanup on the request
/// head that goes upstream.
pub fn prepare_upstream(parts: &mut Parts, ctx: &ConnCtx, plan: &Plan, trace: &TraceContext) {
    strip_hop_by_hop(&mut parts.headers);
    plan.apply_request_headers(&mut parts.headers);
    if let Some(authority) = &plan.rewrite_authority {
        if let Ok(v) = HeaderValue::from_str(authority) {
            parts.headers.insert(header::HOST, v);
        }
    }
    let authority = plan
        .rewrite_authority
        .clone()
        .unwrap_or_else(|| authority_of(parts));
    let path = plan
        .rewrite_path_and_query
        .clone()
        .unwrap_or_else(|| path_and_query(parts));
    // HTTP/1.1 upstream: origin-form; HTTP/2: scheme and authority too.
    let uri = match ctx.proto {
        Proto::Http1 => path.parse::<Uri>().ok(),
        Proto::Http2 => format!("http://{authority}{path}").parse::<Uri>().ok(),
    };
    if let Some(uri) = uri {
        parts.uri = uri;
    }
    if ctx.proto == Proto::Http1 && !parts.headers.contains_key(header::HOST) {
        if let Ok(v) = HeaderValue::from_str(&authority) {
            parts.headers.insert(header::HOST, v);
        }
    }
    set_header(&mut parts.headers, "traceparent", &trace.traceparent());
    if let Some(xfcc) = &ctx.derived.xfcc {
        parts
            .headers
            .insert("x-forwarded-client-cert", xfcc.clone());
    }
}

/// A copy of a request head (extensions are not copied: they belong to
/// the one request hyper gave us).
pub fn clone_head(parts: &Parts) -> Parts {
    let mut b = Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.clone())
        .version(parts.version);
    if let Some(h) = b.headers_mut() {
        *h = parts.headers.clone();
    }
    let (p, ()) = b
        .body(())
        .map(Request::into_parts)
        .unwrap_or_else(|_| Request::new(()).into_parts());
    p
}

/// The response as the client gets it: no hop-by-hop headers, the route's
/// response filters, and the rest of the request timeout (which covers the
/// whole exchange) bounding the body.
pub fn shape_response(
    mut response: Response<Body>,
    plan: &Plan,
    left: Option<Duration>,
) -> Response<Body> {
    strip_hop_by_hop(response.headers_mut());
    plan.apply_response_headers(response.headers_mut());
    match left {
        Some(left) => response.map(|b| body::boxed(body::Deadline::new(b, left))),
        None => response,
    }
}
