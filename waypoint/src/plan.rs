//! From a request to a plan: the adapter between the proxy and the routing
//! (`route`) and policy (`authz`) engines.

use std::net::IpAddr;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderMap, Method, StatusCode};
use weft_api::model::{BackendRef, HeaderModifier, Retry};
use weft_api::{Identity, MeshModel};

use crate::forward::Target;
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
#[derive(Clone, Debug)]
pub struct Plan {
    /// `namespace/route#rule` (empty for the default route).
    pub route: String,
    pub backend: Backend,
    pub request_headers: Vec<HeaderModifier>,
    pub response_headers: Vec<HeaderModifier>,
    pub rewrite_authority: Option<String>,
    pub rewrite_path_and_query: Option<String>,
    /// Mirror backends and the percentage of requests each gets.
    pub mirrors: Vec<(BackendRef, u32)>,
    pub request_timeout: Option<Duration>,
    pub try_timeout: Option<Duration>,
    pub retry: Option<Retry>,
}

pub enum Verdict {
    Forward(Box<Plan>),
    /// Answer without an upstream (404 no route, 500 no backend, redirect).
    Respond {
        status: StatusCode,
        headers: HeaderMap,
        flag: &'static str,
        route: String,
    },
}

pub struct Routes;

impl Routes {
    pub fn build(_model: &MeshModel) -> Self {
        Routes
    }

    pub fn problems(&self) -> Vec<String> {
        Vec::new()
    }
}

pub struct Policies;

impl Policies {
    pub fn build(_model: &MeshModel) -> Self {
        Policies
    }

    #[allow(clippy::too_many_arguments)]
    pub fn check_http(
        &self,
        _namespace: &str,
        _service: &str,
        _waypoint: &str,
        _peer: &Identity,
        _src_ip: IpAddr,
        _port: u16,
        _method: &Method,
        _path: &str,
        _headers: &HeaderMap,
    ) -> Result<(), String> {
        Ok(())
    }

    pub fn check_l4(
        &self,
        _namespace: &str,
        _service: &str,
        _waypoint: &str,
        _peer: &Identity,
        _src_ip: IpAddr,
        _port: u16,
    ) -> Result<(), String> {
        Ok(())
    }
}

pub fn plan(_snap: &crate::state::Compiled, target: &Target, _parts: &Parts) -> Verdict {
    let backend = match target {
        Target::Service {
            namespace,
            name,
            port,
        } => Backend::Service {
            namespace: namespace.clone(),
            name: name.clone(),
            port: *port,
        },
        Target::Workload(ep) => Backend::Workload(ep.clone()),
    };
    Verdict::Forward(Box::new(Plan {
        route: String::new(),
        backend,
        request_headers: vec![],
        response_headers: vec![],
        rewrite_authority: None,
        rewrite_path_and_query: None,
        mirrors: vec![],
        request_timeout: None,
        try_timeout: None,
        retry: None,
    }))
}

pub fn apply_header_modifier(m: &HeaderModifier, h: &mut HeaderMap) {
    for (k, v) in &m.set {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            h.insert(k, v);
        }
    }
    for (k, v) in &m.add {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            h.append(k, v);
        }
    }
    for k in &m.remove {
        h.remove(k.as_str());
    }
}

#[allow(dead_code)]
fn _unused(_: StatusCode) {}
