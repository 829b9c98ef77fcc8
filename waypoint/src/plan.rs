//! From a request to a plan: the adapter between the proxy and the routing
//! (`route`, Gateway API) and policy (`authz`) engines. A plan borrows the
//! compiled model version the request started with, so a model swap never
//! changes a request halfway.

use std::net::IpAddr;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderMap, Method, StatusCode};
use weft_api::model::{BackendRef, Retry};
use weft_api::policy::Decision;
use weft_api::{Identity, MeshModel};

use crate::authz::{Authorizer, AuthzRequest, Target as AuthzTarget};
use crate::forward::Target;
use crate::route::{Forward, RouteDecision, RouteTable, DEFAULT_RULE};
use crate::upstream::Endpoint;

/// Where a request goes.
#[derive(Clone, Debug)]
pub enum Backend {
    Service {
        namespace: String,
        name: String,
        port: u16,
    },
    Workload(Endpoint),
}

impl Backend {
    pub fn label(&self) -> String {
        match self {
            Backend::Service {
                namespace, name, ..
            } => format!("{name}.{namespace}"),
            Backend::Workload(ep) => format!("{}.{}", ep.workload, ep.namespace),
        }
    }
}

/// Everything the proxy does to forward one request.
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

/// Gateway API routes of one model version.
pub struct Routes(RouteTable);

impl Routes {
    pub fn build(model: &MeshModel) -> Self {
        Routes(RouteTable::build(model))
    }

    pub fn problems(&self) -> Vec<String> {
        self.0.problems.clone()
    }
}

/// L7 authorization policies of one model version.
pub struct Policies(Authorizer);

impl Policies {
    pub fn build(model: &MeshModel) -> Self {
        Policies(Authorizer::build(model))
    }

    /// `Err(policy)` when denied (`namespace/name`, or `no-matching-allow`).
    #[allow(clippy::too_many_arguments)]
    pub fn check_http(
        &self,
        namespace: &str,
        service: &str,
        waypoint: &str,
        peer: &Identity,
        src_ip: IpAddr,
        port: u16,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<(), String> {
        self.check(
            namespace,
            service,
            waypoint,
            peer,
            src_ip,
            port,
            method.as_str(),
            path,
            headers,
        )
    }

    /// A connection that is not HTTP: rules naming HTTP fields fail closed.
    pub fn check_l4(
        &self,
        namespace: &str,
        service: &str,
        waypoint: &str,
        peer: &Identity,
        src_ip: IpAddr,
        port: u16,
    ) -> Result<(), String> {
        // An empty method marks "no HTTP" for the evaluator's L4 path.
        self.check(
            namespace,
            service,
            waypoint,
            peer,
            src_ip,
            port,
            "",
            "",
            &HeaderMap::new(),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn check(
        &self,
        namespace: &str,
        service: &str,
        waypoint: &str,
        peer: &Identity,
        src_ip: IpAddr,
        port: u16,
        method: &str,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<(), String> {
        if self.0.is_empty() {
            return Ok(());
        }
        let req = AuthzRequest {
            service: AuthzTarget {
                namespace,
                name: service,
            },
            waypoint: AuthzTarget {
                namespace,
                name: waypoint,
            },
            src_ip,
            src_identity: Some(peer),
            port,
            method,
            path,
            headers,
        };
        match self.0.check(&req) {
            Decision::Allow => Ok(()),
            Decision::Deny { policy } => {
                Err(policy.unwrap_or_else(|| "no-matching-allow".to_owned()))
            }
        }
    }
}

pub fn plan<'a>(snap: &'a crate::state::Compiled, target: &Target, parts: &Parts) -> Verdict<'a> {
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
    match snap.routes.0.route(namespace, name, port, parts) {
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
