//! Gateway API filters as the proxy applies them: header modifiers, URL
//! rewrites and redirects. Pure functions over `http` types.

use http::header::{HeaderName, HeaderValue, LOCATION};
use http::{HeaderMap, StatusCode, Uri};
use weft_api::model::{HeaderModifier, PathModifier, RequestRedirect, UrlRewrite};

/// A `HeaderModifier` with its names and values parsed once.
#[derive(Debug, Clone, Default)]
pub struct HeaderEdits {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderEdits {
    /// Parses `m`; entries that are not valid header names or values are
    /// left out and described in `problems`.
    pub fn compile(m: &HeaderModifier, problems: &mut Vec<String>) -> Self {
        let mut pair = |(n, v): &(String, String)| match (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            (Ok(n), Ok(v)) => Some((n, v)),
            _ => {
                problems.push(format!(
                    "header modifier: {n:?}: {v:?} is not a valid header"
                ));
                None
            }
        };
        let set = m.set.iter().filter_map(&mut pair).collect();
        let add = m.add.iter().filter_map(&mut pair).collect();
        let remove = m
            .remove
            .iter()
            .filter_map(|n| match HeaderName::from_bytes(n.as_bytes()) {
                Ok(n) => Some(n),
                Err(_) => {
                    problems.push(format!("header modifier: {n:?} is not a valid header name"));
                    None
                }
            })
            .collect();
        Self { set, add, remove }
    }

    /// `set` replaces every value of a header, `add` appends one, `remove`
    /// drops every value.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
        for n in &self.remove {
            headers.remove(n);
        }
    }
}

/// Applies a model `HeaderModifier` to request or response headers (invalid
/// entries are skipped). The router applies pre-parsed `HeaderEdits`.
pub fn apply_header_modifier(m: &HeaderModifier, headers: &mut HeaderMap) {
    HeaderEdits::compile(m, &mut Vec::new()).apply(headers);
}

/// `ReplacePrefixMatch`: `path` matched the (segment) prefix `prefix`;
/// the matched segments become `replacement`, per the Gateway API table
/// (`/foo/bar` with `/foo` -> `/xyz` is `/xyz/bar`; with `` is `/bar`).
pub fn replace_prefix_match(path: &str, prefix: &str, replacement: &str) -> String {
    let prefix = prefix.trim_end_matches('/');
    let rest = path.strip_prefix(prefix).unwrap_or(path);
    let mut out = String::with_capacity(replacement.len() + rest.len() + 1);
    out.push_str(replacement.trim_end_matches('/'));
    out.push_str(rest);
    if !out.starts_with('/') {
        out.insert(0, '/');
    }
    out
}

/// The path a `PathModifier` makes of `path`. `matched_prefix` is the
/// `PathPrefix` the request matched (`None` when it matched otherwise, in
/// which case `ReplacePrefixMatch` leaves the path alone).
pub fn modify_path(m: &PathModifier, path: &str, matched_prefix: Option<&str>) -> String {
    match (m, matched_prefix) {
        (PathModifier::ReplaceFullPath(p), _) => p.clone(),
        (PathModifier::ReplacePrefixMatch(r), Some(prefix)) => {
            replace_prefix_match(path, prefix, r)
        }
        (PathModifier::ReplacePrefixMatch(_), None) => path.to_owned(),
    }
}

/// What a `URLRewrite` changes before forwarding.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rewrite {
    /// New `Host` / `:authority`.
    pub authority: Option<String>,
    /// New path, the original query kept.
    pub path_and_query: Option<String>,
}

/// Applies `rw` to a request for `uri` (which matched `matched_prefix` when
/// its rule match was a `PathPrefix`).
pub fn rewrite(rw: &UrlRewrite, matched_prefix: Option<&str>, uri: &Uri) -> Rewrite {
    Rewrite {
        authority: rw.hostname.clone(),
        path_and_query: rw
            .path
            .as_ref()
            .map(|m| with_query(modify_path(m, uri.path(), matched_prefix), uri.query())),
    }
}

fn with_query(mut path: String, query: Option<&str>) -> String {
    if let Some(q) = query {
        path.push('?');
        path.push_str(q);
    }
    path
}

/// The response a `RequestRedirect` answers with. `host` is the request's
/// host without port, `listener_port` the port the request came in on.
///
/// Per Gateway API: scheme and host default to the request's; the port is
/// the filter's, else the well-known port of a filter-given scheme, else the
/// listener's; it is left out of `Location` for http:80 and https:443.
pub fn redirect_response(
    r: &RequestRedirect,
    uri: &Uri,
    host: &str,
    listener_port: u16,
    matched_prefix: Option<&str>,
) -> http::Response<()> {
    let scheme = r
        .scheme
        .as_deref()
        .or(uri.scheme_str())
        .unwrap_or("http")
        .to_ascii_lowercase();
    let port = r.port.unwrap_or_else(|| match r.scheme.as_deref() {
        Some(s) if s.eq_ignore_ascii_case("http") => 80,
        Some(s) if s.eq_ignore_ascii_case("https") => 443,
        _ => listener_port,
    });
    let host = r.hostname.as_deref().unwrap_or(host);
    let path = match &r.path {
        Some(m) => modify_path(m, uri.path(), matched_prefix),
        None => uri.path().to_owned(),
    };
    let mut location = format!("{scheme}://{host}");
    if !matches!((scheme.as_str(), port), ("http", 80) | ("https", 443)) {
        location.push(':');
        location.push_str(&port.to_string());
    }
    location.push_str(&with_query(path, uri.query()));

    let status = r
        .status_code
        .and_then(|s| StatusCode::from_u16(s).ok())
        .filter(StatusCode::is_redirection)
        .unwrap_or(StatusCode::FOUND);
    let mut resp = http::Response::new(());
    *resp.status_mut() = status;
    // A hostname or path that cannot be a header value yields no Location;
    // the model's validation is the place to catch it.
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(LOCATION, v);
    }
    resp
}
