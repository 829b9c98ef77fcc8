//! Answers the waypoint makes itself. Every stage of a request either
//! passes it on or ends it with a [`LocalReply`]: why (the access log's
//! response flag) and what the client gets (status, text, extra headers),
//! turned into a response only at the end, in the client's protocol.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};

use crate::body::{self, Body};

/// What a stage gives the next, or the reply that ends the request there.
/// Boxed: the error side is the rare one, and the `Ok` side stays small.
pub type Stage<T> = Result<T, Box<LocalReply>>;

pub struct LocalReply {
    /// Why the waypoint answered itself (`denied`, `rate_limited`, ...).
    pub flag: &'static str,
    pub status: StatusCode,
    pub text: &'static str,
    pub headers: HeaderMap,
}

impl LocalReply {
    pub fn new(flag: &'static str, status: StatusCode, text: &'static str) -> Box<Self> {
        Box::new(Self {
            flag,
            status,
            text,
            headers: HeaderMap::new(),
        })
    }

    /// Adds a header (skipped when `value` is not a valid header value).
    pub fn with_header(mut self: Box<Self>, name: &'static str, value: &str) -> Box<Self> {
        set_header(&mut self.headers, name, value);
        self
    }

    pub fn into_response(self, grpc: bool) -> Response<Body> {
        let mut r = local_reply(self.status, grpc, self.text);
        r.headers_mut().extend(self.headers);
        r
    }
}

/// A response the waypoint makes itself. gRPC clients get a trailers-only
/// response with the matching `grpc-status`.
pub fn local_reply(status: StatusCode, grpc: bool, text: &'static str) -> Response<Body> {
    if grpc && status != StatusCode::OK && !status.is_redirection() {
        let code = match status.as_u16() {
            400 => 13,
            401 => 16,
            403 => 7,
            404 => 12,
            429 => 8,
            502..=504 => 14,
            _ => 2,
        };
        let mut r = Response::new(body::empty());
        set_header(r.headers_mut(), "content-type", "application/grpc");
        set_header(r.headers_mut(), "grpc-status", &code.to_string());
        set_header(r.headers_mut(), "grpc-message", text.trim());
        set_header(r.headers_mut(), "x-weft-status", status.as_str());
        return r;
    }
    let mut r = Response::new(body::full(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    if !text.is_empty() {
        set_header(r.headers_mut(), "content-type", "text/plain");
    }
    r
}

/// Sets the header when the value is valid.
pub fn set_header(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}
