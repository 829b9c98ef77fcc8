//! From a request to a plan: what the route tables of the model version
//! the request started with (`state`, built by `route`) say to do with it.
//! A plan borrows that version, so a model swap never changes a request
//! halfway.

use std::time::Duration;

use http::request::Parts;
use http::{HeaderMap, StatusCode};
use weft_api::model::{BackendRef, Retry};

use crate::context::{Backend, Target};
use crate::route::{Forward, RouteDecision, DEFAULT_RULE};
use crate::state::Compiled;

/// Everything the waypoint does to forward one request.
pub struct Plan<'a> {
    /// The route rule (`namespace/route#rule`), empty for the default.
    pub route: String,
    pub backend: Backend,
    /// `None` for a workload-addressed request (no route applies).
    forward: Option<Forward<'a>>,
    pub rewrite_authority: Option<String>,
    pub rewrite_path_and_query: Option<String>,
    pub request_timeout: Option<Duration>,
    pub try_timeout: Option<Duration>,
    pub retry: Option<Retry>,
}

impl Plan<'_> {
    pub fn apply_request_headers(&self, h: &mut HeaderMap) {
        if let Some(f) = &self.forward {
            f.apply_request_headers(h);
        }
    }

    pub fn apply_response_headers(&self, h: &mut HeaderMap) {
        if let Some(f) = &self.forward {
            f.apply_response_headers(h);
        }
    }

    /// Mirror backends chosen for this request (each sampled at its
    /// percentage).
    pub fn mirrors(&self) -> Vec<BackendRef> {
        let mut rng = rand::thread_rng();
        self.forward
            .iter()
            .flat_map(|f| f.mirrors())
            .filter(|m| m.sampled(&mut rng))
            .map(|m| m.backend.clone())
            .collect()
    }
}

pub enum Verdict<'a> {
    Forward(Box<Plan<'a>>),
    /// Answer without an upstream (404 no route, 500 no backend, redirect).
    Respond {
        status: StatusCode,
        headers: HeaderMap,
        flag: &'static str,
        route: String,
    },
}

/// The plan for a request to `target` from a client of namespace
/// `client_ns`: a workload addressed directly is forwarded as is; a
/// service's request goes where its routes (for that client) say.
pub fn plan<'a>(
    snap: &'a Compiled,
    target: &Target,
    client_ns: &str,
    parts: &Parts,
) -> Verdict<'a> {
    let (namespace, name, port) = match target {
        Target::Service {
            namespace,
            name,
            port,
        } => (namespace, name, *port),
        Target::Workload(ep) => {
            return Verdict::Forward(Box::new(Plan {
                route: String::new(),
                backend: Backend::Workload(ep.clone()),
                forward: None,
                rewrite_authority: None,
                rewrite_path_and_query: None,
                request_timeout: None,
                try_timeout: None,
                retry: None,
            }))
        }
    };
    match snap.routes.route(namespace, name, port, client_ns, parts) {
        RouteDecision::Forward(f) => {
            let route = if f.rule == DEFAULT_RULE {
                String::new()
            } else {
                f.rule.to_owned()
            };
            let backend = Backend::Service {
                namespace: f.backend.namespace.clone(),
                name: f.backend.name.clone(),
                port: f.backend.port,
            };
            let ms = |v: Option<u64>| v.map(Duration::from_millis);
            Verdict::Forward(Box::new(Plan {
                route,
                backend,
                rewrite_authority: f.rewrite.as_ref().and_then(|r| r.authority.clone()),
                rewrite_path_and_query: f.rewrite.as_ref().and_then(|r| r.path_and_query.clone()),
                request_timeout: ms(f.timeouts.and_then(|t| t.request_ms)),
                try_timeout: ms(f.timeouts.and_then(|t| t.backend_request_ms)),
                retry: f.retry.cloned(),
                forward: Some(f),
            }))
        }
        RouteDecision::Redirect { rule, response } => {
            let (head, ()) = response.into_parts();
            Verdict::Respond {
                status: head.status,
                headers: head.headers,
                flag: "redirect",
                route: rule.to_owned(),
            }
        }
        RouteDecision::NotFound => Verdict::Respond {
            status: StatusCode::NOT_FOUND,
            headers: HeaderMap::new(),
            flag: "no_route",
            route: String::new(),
        },
        RouteDecision::NoBackend { rule } => Verdict::Respond {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            headers: HeaderMap::new(),
            flag: "no_backend",
            route: rule.to_owned(),
        },
    }
}
