//! Gateway API routing at the waypoint: the `HTTPRoute`s and `GRPCRoute`s
//! attached to a Service (a Service parent, or the waypoint Gateway the
//! Service uses), compiled once per model version into a `RouteTable` that
//! turns a request's head into a `RouteDecision`. A route whose Service
//! parent is in another namespace is a consumer route: it applies only to
//! clients of its own namespace, and for them instead of the producer's
//! routes (GEP-1294). Pure: no I/O; the proxy applies the decision.

mod filters;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use http::header::{HeaderName, CONTENT_TYPE, HOST};
use http::request::Parts;
use http::{HeaderMap, Method, StatusCode};
use rand::Rng;
use regex::Regex;
use weft_api::model::{
    BackendRef, GrpcMethodMatch, GrpcRoute, HeaderMatch, HeaderModifier, HttpBackend, HttpFilter,
    HttpRoute, HttpRouteMatch, MatchType, MeshModel, ParentKind, ParentRef, PathMatch,
    PathModifier, RequestRedirect, Retry, Timeouts, UrlRewrite,
};

pub use filters::{
    apply_header_modifier, modify_path, redirect_response, replace_prefix_match, rewrite,
    HeaderEdits, Rewrite,
};

/// Rule id of the implicit route to the Service itself.
pub const DEFAULT_RULE: &str = "default";

/// Every route attached to a Service, by service namespace and name.
#[derive(Debug, Default)]
pub struct RouteTable {
    services: HashMap<String, HashMap<String, ServiceRoutes>>,
    /// What could not be compiled (invalid regexes, header names,
    /// backends), one line each; the affected matches never match.
    pub problems: Vec<String>,
}

/// What the proxy does with one request.
#[derive(Debug)]
pub enum RouteDecision<'a> {
    Forward(Forward<'a>),
    /// Answer with `response` (a `RequestRedirect` filter matched).
    Redirect {
        rule: &'a str,
        response: http::Response<()>,
    },
    /// Routes are attached to the service but none matches: 404.
    NotFound,
    /// The matching rule has no backend to send to (none, all of weight 0,
    /// or the chosen one invalid): 500, per the spec.
    NoBackend {
        rule: &'a str,
    },
}

impl RouteDecision<'_> {
    /// The status to answer with at once; `None` when forwarding.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            RouteDecision::Forward(_) => None,
            RouteDecision::Redirect { response, .. } => Some(response.status()),
            RouteDecision::NotFound => Some(StatusCode::NOT_FOUND),
            RouteDecision::NoBackend { .. } => Some(StatusCode::INTERNAL_SERVER_ERROR),
        }
    }

    /// The rule that decided (`ns/route#rule`), for logs and metrics.
    pub fn rule(&self) -> Option<&str> {
        match self {
            RouteDecision::Forward(f) => Some(f.rule),
            RouteDecision::Redirect { rule, .. } | RouteDecision::NoBackend { rule } => Some(rule),
            RouteDecision::NotFound => None,
        }
    }
}

/// Forward the request to `backend`, after the filters.
#[derive(Debug)]
pub struct Forward<'a> {
    /// `ns/route#rule-name` or `ns/route#rule-index`; `DEFAULT_RULE` for the
    /// implicit route to the service itself.
    pub rule: &'a str,
    /// The chosen backend, its namespace filled in.
    pub backend: Cow<'a, BackendRef>,
    /// New authority and/or path from a `URLRewrite` (the backend's own, else
    /// the rule's).
    pub rewrite: Option<Rewrite>,
    pub timeouts: Option<&'a Timeouts>,
    pub retry: Option<&'a Retry>,
    rule_filters: &'a FilterSet,
    backend_filters: &'a FilterSet,
}

impl<'a> Forward<'a> {
    /// `RequestHeaderModifier`s of the rule, then of the backend.
    pub fn apply_request_headers(&self, headers: &mut HeaderMap) {
        for edits in self.request_header_edits() {
            edits.apply(headers);
        }
    }

    /// `ResponseHeaderModifier`s of the rule, then of the backend.
    pub fn apply_response_headers(&self, headers: &mut HeaderMap) {
        let rule = &self.rule_filters.response_headers;
        for edits in rule.iter().chain(&self.backend_filters.response_headers) {
            edits.apply(headers);
        }
    }

    pub fn request_header_edits(&self) -> impl Iterator<Item = &'a HeaderEdits> {
        let rule = &self.rule_filters.request_headers;
        rule.iter().chain(&self.backend_filters.request_headers)
    }

    pub fn has_response_header_edits(&self) -> bool {
        !self.rule_filters.response_headers.is_empty()
            || !self.backend_filters.response_headers.is_empty()
    }

    /// `RequestMirror`s of the rule, then of the backend.
    pub fn mirrors(&self) -> impl Iterator<Item = &'a Mirror> {
        let rule = &self.rule_filters.mirrors;
        rule.iter().chain(&self.backend_filters.mirrors)
    }
}

/// Send a copy of `percent`% of the requests to `backend` (responses
/// ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub backend: BackendRef,
    /// 0-100.
    pub percent: u32,
}

impl Mirror {
    /// Whether this request is one of the mirrored share.
    pub fn sampled<R: Rng + ?Sized>(&self, rng: &mut R) -> bool {
        self.percent >= 100 || (self.percent > 0 && rng.gen_range(0..100) < self.percent)
    }
}

impl RouteTable {
    /// Compiles every route, attached to each Service it names as parent
    /// and to every Service using a waypoint Gateway it names.
    pub fn build(model: &MeshModel) -> Self {
        let mut table = RouteTable::default();
        for r in &model.http_routes {
            let (route, matchers) = compile_http_route(r, &mut table.problems);
            for a in attachments(model, &r.parents, &r.namespace) {
                let routes = table.service_mut(a.namespace, a.name);
                for (rule, matcher) in &matchers {
                    routes.http.push(Entry {
                        route: route.clone(),
                        rule: *rule,
                        port: a.port,
                        consumer: a.consumer.clone(),
                        matcher: matcher.clone(),
                    });
                }
            }
        }
        for r in &model.grpc_routes {
            let (route, matchers) = compile_grpc_route(r, &mut table.problems);
            for a in attachments(model, &r.parents, &r.namespace) {
                let routes = table.service_mut(a.namespace, a.name);
                for (rule, matcher) in &matchers {
                    routes.grpc.push(Entry {
                        route: route.clone(),
                        rule: *rule,
                        port: a.port,
                        consumer: a.consumer.clone(),
                        matcher: matcher.clone(),
                    });
                }
            }
        }
        for routes in table.services.values_mut().flat_map(|m| m.values_mut()) {
            sort_by_precedence(&mut routes.http, HttpMatcher::precedence);
            sort_by_precedence(&mut routes.grpc, GrpcMatcher::precedence);
        }
        table
    }

    fn service_mut(&mut self, ns: &str, name: &str) -> &mut ServiceRoutes {
        self.services
            .entry(ns.to_owned())
            .or_default()
            .entry(name.to_owned())
            .or_default()
    }

    /// Routes a request for Service `service_ns/service_name` on `port` from
    /// a client of namespace `client_ns`, picking a weighted backend with
    /// the thread's RNG.
    pub fn route(
        &self,
        service_ns: &str,
        service_name: &str,
        port: u16,
        client_ns: &str,
        req: &Parts,
    ) -> RouteDecision<'_> {
        self.route_with_rng(
            service_ns,
            service_name,
            port,
            client_ns,
            req,
            &mut rand::thread_rng(),
        )
    }

    pub fn route_with_rng<R: Rng + ?Sized>(
        &self,
        service_ns: &str,
        service_name: &str,
        port: u16,
        client_ns: &str,
        req: &Parts,
        rng: &mut R,
    ) -> RouteDecision<'_> {
        let routes = self
            .services
            .get(service_ns)
            .and_then(|m| m.get(service_name));
        let audience = routes.and_then(|r| r.audience(port, client_ns));
        let (Some(routes), Some(audience)) = (routes, audience) else {
            return RouteDecision::Forward(Forward {
                rule: DEFAULT_RULE,
                backend: Cow::Owned(BackendRef {
                    name: service_name.to_owned(),
                    namespace: service_ns.to_owned(),
                    port,
                }),
                rewrite: None,
                timeouts: None,
                retry: None,
                rule_filters: &NO_FILTERS,
                backend_filters: &NO_FILTERS,
            });
        };
        let view = RequestView::new(req);

        if let Some((service, method)) = view.grpc {
            let found = best_match(&routes.grpc, port, audience, view.host, |m| {
                m.matches(service, method, &req.headers)
            });
            if let Some(e) = found {
                return decide(
                    e.rule(),
                    None,
                    req,
                    &view,
                    service_name,
                    service_ns,
                    port,
                    rng,
                );
            }
        }
        let found = best_match(&routes.http, port, audience, view.host, |m| m.matches(req));
        match found {
            Some(e) => decide(
                e.rule(),
                e.matcher.matched_prefix(),
                req,
                &view,
                service_name,
                service_ns,
                port,
                rng,
            ),
            None => RouteDecision::NotFound,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn decide<'a, R: Rng + ?Sized>(
    rule: &'a CompiledRule,
    matched_prefix: Option<&str>,
    req: &Parts,
    view: &RequestView<'_>,
    service_name: &str,
    service_ns: &str,
    port: u16,
    rng: &mut R,
) -> RouteDecision<'a> {
    if let Some(r) = &rule.filters.redirect {
        let fallback_host;
        let host = match view.host {
            Some(h) => h,
            None => {
                fallback_host = format!("{service_name}.{service_ns}.svc");
                &fallback_host
            }
        };
        return RouteDecision::Redirect {
            rule: &rule.id,
            response: redirect_response(r, &req.uri, host, port, matched_prefix),
        };
    }
    let Some(backend) = rule.pick(rng) else {
        return RouteDecision::NoBackend { rule: &rule.id };
    };
    if !backend.valid {
        return RouteDecision::NoBackend { rule: &rule.id };
    }
    let rw = backend
        .filters
        .rewrite
        .as_ref()
        .or(rule.filters.rewrite.as_ref());
    RouteDecision::Forward(Forward {
        rule: &rule.id,
        backend: Cow::Borrowed(&backend.backend),
        rewrite: rw.map(|rw| rewrite(rw, matched_prefix, &req.uri)),
        timeouts: rule.timeouts.as_ref(),
        retry: rule.retry.as_ref(),
        rule_filters: &rule.filters,
        backend_filters: &backend.filters,
    })
}

/// The highest-precedence entry matching the request. Entries are sorted by
/// match precedence; the route hostname match ranks above it (the spec:
/// longest non-wildcard hostname, then longest hostname), so a later entry
/// wins only with a better hostname match.
fn best_match<'t, M>(
    entries: &'t [Entry<M>],
    port: u16,
    audience: Option<&str>,
    host: Option<&str>,
    matches: impl Fn(&M) -> bool,
) -> Option<&'t Entry<M>> {
    let mut best: Option<(HostScore, &Entry<M>)> = None;
    for e in entries {
        if !e.applies(port, audience) {
            continue;
        }
        let Some(score) = e.route.host_score(host) else {
            continue;
        };
        if best.as_ref().is_some_and(|(b, _)| *b >= score) {
            continue;
        }
        if matches(&e.matcher) {
            best = Some((score, e));
        }
    }
    best.map(|(_, e)| e)
}

/// Precedence among entries: the match's own key (greater first), then the
/// oldest route (no timestamp counts as newest), then `namespace/name`, then
/// rule order (a stable sort keeps match order within a rule).
fn sort_by_precedence<M, K: Ord>(entries: &mut [Entry<M>], key: impl Fn(&M) -> K) {
    entries.sort_by(|a, b| {
        key(&b.matcher)
            .cmp(&key(&a.matcher))
            .then_with(|| a.route.age_key().cmp(&b.route.age_key()))
            .then_with(|| a.route.key.cmp(&b.route.key))
            .then_with(|| a.rule.cmp(&b.rule))
    });
}

/// One Service a route applies to.
struct Attachment<'m> {
    namespace: &'m str,
    name: &'m str,
    /// Only this service port.
    port: Option<u16>,
    /// A consumer route: only for clients of this namespace.
    consumer: Option<Arc<str>>,
}

/// Where a route's parents attach it: a Service parent to that Service (a
/// consumer route when the Service is in another namespace), a waypoint
/// Gateway parent to every Service of its namespace using it (its `port`
/// names a listener, not a service port).
fn attachments<'m>(
    model: &'m MeshModel,
    parents: &'m [ParentRef],
    route_ns: &'m str,
) -> Vec<Attachment<'m>> {
    let mut out = Vec::new();
    for p in parents {
        let ns = if p.namespace.is_empty() {
            route_ns
        } else {
            &p.namespace
        };
        match p.kind {
            ParentKind::Service => out.push(Attachment {
                namespace: ns,
                name: &p.name,
                port: p.port,
                consumer: (ns != route_ns).then(|| Arc::from(route_ns)),
            }),
            ParentKind::Gateway => out.extend(
                model
                    .services
                    .iter()
                    .filter(|s| s.namespace == ns && s.waypoint.as_deref() == Some(&p.name))
                    .map(|s| Attachment {
                        namespace: &s.namespace,
                        name: &s.name,
                        port: None,
                        consumer: None,
                    }),
            ),
        }
    }
    out
}

#[derive(Debug, Default)]
struct ServiceRoutes {
    http: Vec<Entry<HttpMatcher>>,
    grpc: Vec<Entry<GrpcMatcher>>,
}

impl ServiceRoutes {
    /// Whose routes a client of `client_ns` gets on `port`: its own
    /// namespace's consumer routes when there are any (`Some(Some(ns))`),
    /// else the producer routes (`Some(None)`); `None` when neither is
    /// attached there, so the Service itself is the backend.
    fn audience<'c>(&self, port: u16, client_ns: &'c str) -> Option<Option<&'c str>> {
        let any = |who: Option<&str>| {
            self.http.iter().any(|e| e.applies(port, who))
                || self.grpc.iter().any(|e| e.applies(port, who))
        };
        if any(Some(client_ns)) {
            Some(Some(client_ns))
        } else if any(None) {
            Some(None)
        } else {
            None
        }
    }
}

#[derive(Debug)]
struct Entry<M> {
    route: Arc<CompiledRoute>,
    rule: usize,
    port: Option<u16>,
    /// A consumer route's namespace; `None` for a producer route.
    consumer: Option<Arc<str>>,
    matcher: M,
}

impl<M> Entry<M> {
    /// Attached on `port`, and one of `audience`'s routes.
    fn applies(&self, port: u16, audience: Option<&str>) -> bool {
        self.port.is_none_or(|p| p == port) && self.consumer.as_deref() == audience
    }

    fn rule(&self) -> &CompiledRule {
        &self.route.rules[self.rule]
    }
}

#[derive(Debug)]
struct CompiledRoute {
    /// `namespace/name`.
    key: String,
    created: String,
    hosts: Vec<HostPattern>,
    rules: Vec<CompiledRule>,
}

impl CompiledRoute {
    fn age_key(&self) -> (bool, &str) {
        (self.created.is_empty(), &self.created)
    }

    /// `None`: the route's hostnames exclude `host`.
    fn host_score(&self, host: Option<&str>) -> Option<HostScore> {
        if self.hosts.is_empty() {
            return Some(HostScore::Any);
        }
        let host = host?;
        self.hosts.iter().filter_map(|h| h.score(host)).max()
    }
}

/// How specifically a route's hostnames matched (greater is more).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum HostScore {
    Any,
    Wildcard(usize),
    Exact(usize),
}

#[derive(Debug)]
enum HostPattern {
    Exact(String),
    /// `*.example.com`, kept as `.example.com`.
    Suffix(String),
}

impl HostPattern {
    fn parse(h: &str) -> Self {
        match h.strip_prefix('*') {
            Some(suffix) => HostPattern::Suffix(suffix.to_ascii_lowercase()),
            None => HostPattern::Exact(h.to_ascii_lowercase()),
        }
    }

    fn score(&self, host: &str) -> Option<HostScore> {
        match self {
            HostPattern::Exact(h) => h
                .eq_ignore_ascii_case(host)
                .then_some(HostScore::Exact(h.len())),
            HostPattern::Suffix(s) => (host.len() > s.len()
                && host.is_char_boundary(host.len() - s.len())
                && host[host.len() - s.len()..].eq_ignore_ascii_case(s))
            .then_some(HostScore::Wildcard(s.len() + 1)),
        }
    }
}

#[derive(Debug)]
struct CompiledRule {
    id: String,
    filters: FilterSet,
    backends: Vec<CompiledBackend>,
    total_weight: u64,
    timeouts: Option<Timeouts>,
    retry: Option<Retry>,
}

impl CompiledRule {
    /// A backend by weight; `None` when no backend has any.
    fn pick<R: Rng + ?Sized>(&self, rng: &mut R) -> Option<&CompiledBackend> {
        if self.total_weight == 0 {
            return None;
        }
        let mut left = rng.gen_range(0..self.total_weight);
        self.backends.iter().find(|b| {
            let w = u64::from(b.weight);
            if left < w {
                true
            } else {
                left -= w;
                false
            }
        })
    }
}

#[derive(Debug)]
struct CompiledBackend {
    backend: BackendRef,
    weight: u32,
    /// A reference the proxy cannot send to; choosing it answers 500.
    valid: bool,
    filters: FilterSet,
}

#[derive(Debug, Default)]
struct FilterSet {
    request_headers: Vec<HeaderEdits>,
    response_headers: Vec<HeaderEdits>,
    redirect: Option<RequestRedirect>,
    rewrite: Option<UrlRewrite>,
    mirrors: Vec<Mirror>,
}

static NO_FILTERS: FilterSet = FilterSet {
    request_headers: Vec::new(),
    response_headers: Vec::new(),
    redirect: None,
    rewrite: None,
    mirrors: Vec::new(),
};

impl FilterSet {
    fn compile(
        filters: &[HttpFilter],
        route_ns: &str,
        ctx: &str,
        problems: &mut Vec<String>,
    ) -> Self {
        let mut set = FilterSet::default();
        for f in filters {
            match f {
                HttpFilter::RequestHeaderModifier(m) => {
                    set.request_headers.push(header_edits(m, ctx, problems))
                }
                HttpFilter::ResponseHeaderModifier(m) => {
                    set.response_headers.push(header_edits(m, ctx, problems))
                }
                HttpFilter::RequestRedirect(r) => set.redirect = Some(r.clone()),
                HttpFilter::UrlRewrite(r) => set.rewrite = Some(r.clone()),
                HttpFilter::RequestMirror(m) => set.mirrors.push(Mirror {
                    backend: with_namespace(&m.backend, route_ns),
                    percent: m.percent.unwrap_or(100).min(100),
                }),
            }
        }
        if set.redirect.is_some() && set.rewrite.is_some() {
            problems.push(format!(
                "{ctx}: RequestRedirect and URLRewrite cannot be combined; the redirect wins"
            ));
        }
        set
    }

    fn uses_replace_prefix_match(&self) -> bool {
        let prefix =
            |p: &Option<PathModifier>| matches!(p, Some(PathModifier::ReplacePrefixMatch(_)));
        self.redirect.as_ref().is_some_and(|r| prefix(&r.path))
            || self.rewrite.as_ref().is_some_and(|r| prefix(&r.path))
    }
}

fn header_edits(m: &HeaderModifier, ctx: &str, problems: &mut Vec<String>) -> HeaderEdits {
    let mut found = Vec::new();
    let edits = HeaderEdits::compile(m, &mut found);
    problems.extend(found.into_iter().map(|p| format!("{ctx}: {p}")));
    edits
}

fn with_namespace(b: &BackendRef, route_ns: &str) -> BackendRef {
    let mut b = b.clone();
    if b.namespace.is_empty() {
        b.namespace = route_ns.to_owned();
    }
    b
}

fn compile_rule(
    id: String,
    route_ns: &str,
    filters: &[HttpFilter],
    backends: &[HttpBackend],
    timeouts: Option<&Timeouts>,
    retry: Option<&Retry>,
    problems: &mut Vec<String>,
) -> CompiledRule {
    let filters = FilterSet::compile(filters, route_ns, &id, problems);
    let backends: Vec<CompiledBackend> = backends
        .iter()
        .map(|b| {
            let valid = !b.backend.name.is_empty() && b.backend.port != 0;
            if !valid {
                problems.push(format!(
                    "{id}: backend {:?} needs a name and a port; requests sent to it get 500",
                    b.backend.name
                ));
            }
            CompiledBackend {
                backend: with_namespace(&b.backend, route_ns),
                weight: b.weight,
                valid,
                filters: FilterSet::compile(&b.filters, route_ns, &id, problems),
            }
        })
        .collect();
    CompiledRule {
        total_weight: backends.iter().map(|b| u64::from(b.weight)).sum(),
        id,
        filters,
        backends,
        timeouts: timeouts.cloned(),
        retry: retry.cloned(),
    }
}

fn rule_id(route_ns: &str, route_name: &str, name: Option<&str>, index: usize) -> String {
    match name {
        Some(n) if !n.is_empty() => format!("{route_ns}/{route_name}#{n}"),
        _ => format!("{route_ns}/{route_name}#{index}"),
    }
}

type Matchers<M> = Vec<(usize, M)>;

fn compile_http_route(
    r: &HttpRoute,
    problems: &mut Vec<String>,
) -> (Arc<CompiledRoute>, Matchers<HttpMatcher>) {
    let mut rules = Vec::with_capacity(r.rules.len());
    let mut matchers = Vec::new();
    let everything = [HttpRouteMatch::default()];
    for (i, rule) in r.rules.iter().enumerate() {
        let id = rule_id(&r.namespace, &r.name, rule.name.as_deref(), i);
        let matches = if rule.matches.is_empty() {
            &everything[..]
        } else {
            &rule.matches[..]
        };
        for m in matches {
            matchers.push((i, HttpMatcher::compile(m, &id, problems)));
        }
        let compiled = compile_rule(
            id,
            &r.namespace,
            &rule.filters,
            &rule.backends,
            rule.timeouts.as_ref(),
            rule.retry.as_ref(),
            problems,
        );
        let all_prefix = matchers
            .iter()
            .filter(|(j, _)| *j == i)
            .all(|(_, m)| matches!(m.path, PathMatcher::Prefix(_)));
        if compiled.filters.uses_replace_prefix_match() && !all_prefix {
            problems.push(format!(
                "{}: ReplacePrefixMatch needs PathPrefix matches; other matches keep their path",
                compiled.id
            ));
        }
        rules.push(compiled);
    }
    let route = CompiledRoute {
        key: format!("{}/{}", r.namespace, r.name),
        created: r.created.clone(),
        hosts: r.hostnames.iter().map(|h| HostPattern::parse(h)).collect(),
        rules,
    };
    (Arc::new(route), matchers)
}

fn compile_grpc_route(
    r: &GrpcRoute,
    problems: &mut Vec<String>,
) -> (Arc<CompiledRoute>, Matchers<GrpcMatcher>) {
    let mut rules = Vec::with_capacity(r.rules.len());
    let mut matchers = Vec::new();
    for (i, rule) in r.rules.iter().enumerate() {
        let id = rule_id(&r.namespace, &r.name, rule.name.as_deref(), i);
        if rule.matches.is_empty() {
            matchers.push((i, GrpcMatcher::default()));
        }
        for m in &rule.matches {
            matchers.push((
                i,
                GrpcMatcher::compile(m.method.as_ref(), &m.headers, &id, problems),
            ));
        }
        let mut compiled = compile_rule(
            id,
            &r.namespace,
            &rule.filters,
            &rule.backends,
            None,
            None,
            problems,
        );
        if compiled.filters.redirect.is_some() || compiled.filters.rewrite.is_some() {
            problems.push(format!(
                "{}: GRPCRoute rules cannot redirect or rewrite; those filters are ignored",
                compiled.id
            ));
            compiled.filters.redirect = None;
            compiled.filters.rewrite = None;
        }
        rules.push(compiled);
    }
    let route = CompiledRoute {
        key: format!("{}/{}", r.namespace, r.name),
        created: r.created.clone(),
        hosts: r.hostnames.iter().map(|h| HostPattern::parse(h)).collect(),
        rules,
    };
    (Arc::new(route), matchers)
}

/// The parts of a request head matching looks at, extracted once.
struct RequestView<'r> {
    /// As the client wrote it, without the port.
    host: Option<&'r str>,
    /// `(service, method)` of a gRPC request.
    grpc: Option<(&'r str, &'r str)>,
}

impl<'r> RequestView<'r> {
    fn new(req: &'r Parts) -> Self {
        let host = req.uri.host().or_else(|| {
            req.headers
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(strip_port)
        });
        let is_grpc = req
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"));
        let grpc = is_grpc.then(|| grpc_method(req.uri.path())).flatten();
        RequestView { host, grpc }
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.split(':').next().unwrap_or(host)
}

/// `/pkg.Service/Method` as `(pkg.Service, Method)`.
fn grpc_method(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

/// A regex that must match the whole value; `None` (and a problem) when it
/// does not compile.
fn full_regex(re: &str, ctx: &str, problems: &mut Vec<String>) -> Option<Regex> {
    match Regex::new(&format!("^(?:{re})$")) {
        Ok(r) => Some(r),
        Err(e) => {
            problems.push(format!(
                "{ctx}: invalid regular expression {re:?} ({e}); its match never matches"
            ));
            None
        }
    }
}

#[derive(Debug, Clone)]
enum ValueMatcher {
    Exact(String),
    Regex(Regex),
}

impl ValueMatcher {
    fn compile(
        kind: MatchType,
        value: &str,
        ctx: &str,
        problems: &mut Vec<String>,
    ) -> Option<Self> {
        match kind {
            MatchType::Exact => Some(ValueMatcher::Exact(value.to_owned())),
            MatchType::RegularExpression => {
                full_regex(value, ctx, problems).map(ValueMatcher::Regex)
            }
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatcher::Exact(e) => e == v,
            ValueMatcher::Regex(r) => r.is_match(v),
        }
    }
}

/// Header matches; a header repeated in the match counts once (the first),
/// as the spec says. A request header with several values matches when one
/// does.
fn compile_headers(
    headers: &[HeaderMatch],
    ctx: &str,
    problems: &mut Vec<String>,
) -> Option<Vec<(HeaderName, ValueMatcher)>> {
    let mut out: Vec<(HeaderName, ValueMatcher)> = Vec::with_capacity(headers.len());
    let mut ok = true;
    for h in headers {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            problems.push(format!(
                "{ctx}: {:?} is not a valid header name; its match never matches",
                h.name
            ));
            ok = false;
            continue;
        };
        if out.iter().any(|(n, _)| *n == name) {
            continue;
        }
        match ValueMatcher::compile(h.kind, &h.value, ctx, problems) {
            Some(m) => out.push((name, m)),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn headers_match(matchers: &[(HeaderName, ValueMatcher)], headers: &HeaderMap) -> bool {
    matchers.iter().all(|(name, m)| {
        headers
            .get_all(name)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| m.matches(v)))
    })
}

#[derive(Debug, Clone)]
enum PathMatcher {
    Exact(String),
    /// Segment prefix, trailing `/` removed (`""` for `/`: everything).
    Prefix(String),
    Regex(Regex),
}

impl PathMatcher {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatcher::Exact(p) => p == path,
            PathMatcher::Prefix(p) => {
                path.starts_with(p.as_str())
                    && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
            }
            PathMatcher::Regex(r) => r.is_match(path),
        }
    }
}

#[derive(Debug, Clone)]
struct HttpMatcher {
    path: PathMatcher,
    method: Option<Method>,
    headers: Vec<(HeaderName, ValueMatcher)>,
    query: Vec<(String, ValueMatcher)>,
    /// Something in it did not compile: it never matches.
    broken: bool,
}

impl HttpMatcher {
    fn compile(m: &HttpRouteMatch, ctx: &str, problems: &mut Vec<String>) -> Self {
        let mut broken = false;
        let path = match &m.path {
            None => PathMatcher::Prefix(String::new()),
            Some(PathMatch::Exact(p)) => PathMatcher::Exact(p.clone()),
            Some(PathMatch::PathPrefix(p)) => {
                PathMatcher::Prefix(p.trim_end_matches('/').to_owned())
            }
            Some(PathMatch::RegularExpression(re)) => match full_regex(re, ctx, problems) {
                Some(r) => PathMatcher::Regex(r),
                None => {
                    broken = true;
                    PathMatcher::Exact(String::new())
                }
            },
        };
        let method = m
            .method
            .as_deref()
            .and_then(|s| match Method::from_bytes(s.as_bytes()) {
                Ok(m) => Some(m),
                Err(_) => {
                    problems.push(format!(
                        "{ctx}: {s:?} is not an HTTP method; its match never matches"
                    ));
                    broken = true;
                    None
                }
            });
        let headers = compile_headers(&m.headers, ctx, problems).unwrap_or_else(|| {
            broken = true;
            Vec::new()
        });
        let mut query: Vec<(String, ValueMatcher)> = Vec::with_capacity(m.query_params.len());
        for q in &m.query_params {
            if query.iter().any(|(n, _)| *n == q.name) {
                continue;
            }
            match ValueMatcher::compile(q.kind, &q.value, ctx, problems) {
                Some(v) => query.push((q.name.clone(), v)),
                None => broken = true,
            }
        }
        HttpMatcher {
            path,
            method,
            headers,
            query,
            broken,
        }
    }

    /// Gateway API: exact path, then longest prefix (regex last), then a
    /// method match, then most header matches, then most query matches.
    fn precedence(&self) -> (u8, usize, bool, usize, usize) {
        let (kind, len) = match &self.path {
            PathMatcher::Exact(p) => (2, p.len()),
            PathMatcher::Prefix(p) => (1, p.len()),
            PathMatcher::Regex(_) => (0, 0),
        };
        (
            kind,
            len,
            self.method.is_some(),
            self.headers.len(),
            self.query.len(),
        )
    }

    fn matched_prefix(&self) -> Option<&str> {
        match &self.path {
            PathMatcher::Prefix(p) => Some(p),
            _ => None,
        }
    }

    fn matches(&self, req: &Parts) -> bool {
        !self.broken
            && self.path.matches(req.uri.path())
            && self.method.as_ref().is_none_or(|m| *m == req.method)
            && headers_match(&self.headers, &req.headers)
            && self.query.iter().all(|(name, m)| {
                req.uri
                    .query()
                    .and_then(|q| query_param(q, name))
                    .is_some_and(|v| m.matches(&v))
            })
    }
}

/// The first value of query parameter `name`, percent-decoded.
fn query_param<'q>(query: &'q str, name: &str) -> Option<Cow<'q, str>> {
    query.split('&').find_map(|pair| {
        let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
        (n == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

#[derive(Debug, Clone, Default)]
enum NameMatcher {
    #[default]
    Any,
    Exact(String),
    Regex(Regex),
}

impl NameMatcher {
    fn matches(&self, v: &str) -> bool {
        match self {
            NameMatcher::Any => true,
            NameMatcher::Exact(e) => e == v,
            NameMatcher::Regex(r) => r.is_match(v),
        }
    }

    /// Characters of an exact name (the GRPCRoute precedence counts them).
    fn exact_len(&self) -> usize {
        match self {
            NameMatcher::Exact(e) => e.len(),
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct GrpcMatcher {
    service: NameMatcher,
    method: NameMatcher,
    headers: Vec<(HeaderName, ValueMatcher)>,
    broken: bool,
}

impl GrpcMatcher {
    fn compile(
        method: Option<&GrpcMethodMatch>,
        headers: &[HeaderMatch],
        ctx: &str,
        problems: &mut Vec<String>,
    ) -> Self {
        let mut broken = false;
        let mut name = |kind: MatchType, v: &str| {
            if v.is_empty() {
                return NameMatcher::Any;
            }
            match kind {
                MatchType::Exact => NameMatcher::Exact(v.to_owned()),
                MatchType::RegularExpression => match full_regex(v, ctx, problems) {
                    Some(r) => NameMatcher::Regex(r),
                    None => {
                        broken = true;
                        NameMatcher::Any
                    }
                },
            }
        };
        let (service, method) = match method {
            Some(m) => (name(m.kind, &m.service), name(m.kind, &m.method)),
            None => (NameMatcher::Any, NameMatcher::Any),
        };
        let headers = compile_headers(headers, ctx, problems).unwrap_or_else(|| {
            broken = true;
            Vec::new()
        });
        GrpcMatcher {
            service,
            method,
            headers,
            broken,
        }
    }

    /// GRPCRoute: characters of a matching service, then of a matching
    /// method, then header matches.
    fn precedence(&self) -> (usize, usize, usize) {
        (
            self.service.exact_len(),
            self.method.exact_len(),
            self.headers.len(),
        )
    }

    fn matches(&self, service: &str, method: &str, headers: &HeaderMap) -> bool {
        !self.broken
            && self.service.matches(service)
            && self.method.matches(method)
            && headers_match(&self.headers, headers)
    }
}
