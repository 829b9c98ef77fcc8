//! Per-service resilience state, kept across model versions (an ejected
//! endpoint stays ejected, a rate-limit bucket keeps its tokens) and
//! rebuilt only where the service's TrafficPolicy changed. The forwarding
//! stages ask for a [`ServiceState`] per request and call its small API,
//! which reads the clock and the random source for the building blocks
//! next to it (which do neither).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderMap, Method};
use weft_api::model::{Retry, TrafficPolicy};

use super::{
    rate_limit_key, FaultAction, InFlightGuard, Limits, Outcome, Overflow, RequestPermit,
    RetryPolicy, ServiceResilience,
};
use crate::context::{Backend, Endpoint};
use crate::state::Compiled;

/// One service's resilience, as a request sees it.
pub struct ServiceState {
    inner: Arc<ServiceResilience>,
    rate_key: Option<weft_api::model::RateLimitKey>,
}

impl ServiceState {
    /// The local rate limit: `Err(retry after)` past the budget.
    pub fn rate_limit(&self, headers: &HeaderMap, identity: &str) -> Result<(), Duration> {
        let (Some(limiter), Some(key)) = (&self.inner.limiter, &self.rate_key) else {
            return Ok(());
        };
        let k = rate_limit_key(key, headers, Some(identity));
        limiter
            .check(&k, Instant::now())
            .map_err(|r| Duration::from_secs(r.header_secs()))
    }

    pub fn fault(&self) -> FaultAction {
        self.inner.fault.action(&mut rand::thread_rng())
    }

    /// A slot under the service's concurrent-request limit; counts the
    /// request toward the retry budget.
    pub fn start_request(&self) -> Result<RequestPermit, Overflow> {
        let permit = self.inner.limits.try_start_request()?;
        self.inner.budget.record_request(Instant::now());
        Ok(permit)
    }

    /// The service's circuit breaker, for the connections its requests
    /// need.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub fn try_retry(&self) -> bool {
        self.inner.budget.try_retry(Instant::now())
    }

    pub fn backoff(&self, retry: Option<&Retry>, attempt: u32) -> Duration {
        RetryPolicy::from_config(retry).backoff(attempt, &mut rand::thread_rng())
    }

    /// Least-request (power of two choices) among the endpoints not
    /// ejected; the guard counts the request in flight until dropped.
    pub fn pick(&self, endpoints: &[Endpoint]) -> Option<(Endpoint, InFlightGuard)> {
        let addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
        let (addr, guard) =
            self.inner
                .balancer
                .pick(&addrs, &self.inner.detector, Instant::now())?;
        let ep = endpoints.iter().find(|e| e.addr == addr)?.clone();
        Some((ep, guard))
    }

    /// Feeds outlier detection; returns whether this ejected the endpoint.
    pub fn record(&self, ep: &Endpoint, outcome: &Outcome) -> bool {
        let before = self.inner.detector.ejections_total();
        self.inner
            .detector
            .record(ep.addr, !outcome.is_endpoint_failure(), Instant::now());
        self.inner.detector.ejections_total() > before
    }

    pub fn is_retryable(&self, method: &Method, outcome: &Outcome, retry: Option<&Retry>) -> bool {
        RetryPolicy::from_config(retry).is_retryable(method, outcome)
    }
}

struct Entry {
    state: Arc<ServiceResilience>,
    /// Model version whose endpoints `state` was told about.
    version: u64,
}

#[derive(Default)]
pub struct Registry {
    /// namespace -> service name -> state (found without allocating).
    services: Mutex<HashMap<String, HashMap<String, Entry>>>,
}

impl Registry {
    /// The resilience state of `namespace/name` under `snap`'s model.
    pub fn for_service(&self, snap: &Compiled, namespace: &str, name: &str) -> ServiceState {
        let policy: Option<&TrafficPolicy> = snap
            .model
            .traffic_policies
            .iter()
            .find(|p| p.namespace == namespace && p.target == name);
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if !services
            .get(namespace)
            .is_some_and(|m| m.contains_key(name))
        {
            services.entry(namespace.to_owned()).or_default().insert(
                name.to_owned(),
                Entry {
                    state: Arc::new(ServiceResilience::new(policy, now)),
                    version: u64::MAX,
                },
            );
        }
        let Some(entry) = services.get_mut(namespace).and_then(|m| m.get_mut(name)) else {
            unreachable!("inserted above");
        };
        let fresh = entry.state.refresh(policy, now);
        let rebuilt = !Arc::ptr_eq(&fresh, &entry.state);
        if rebuilt || entry.version != snap.version {
            let addrs: Vec<SocketAddr> = snap
                .model
                .services
                .iter()
                .find(|s| s.namespace == namespace && s.name == name)
                .map(|s| {
                    s.ports
                        .iter()
                        .flat_map(|p| snap.endpoints(namespace, name, p.port).to_vec())
                        .map(|e| e.addr)
                        .collect()
                })
                .unwrap_or_default();
            fresh.set_endpoints(&addrs);
            entry.state = fresh;
            entry.version = snap.version;
        }
        ServiceState {
            inner: entry.state.clone(),
            rate_key: policy
                .and_then(|p| p.rate_limit.as_ref())
                .map(|r| r.key.clone()),
        }
    }

    /// The state of where a request goes: its service's, or none for a
    /// workload addressed directly.
    pub fn for_backend(&self, snap: &Compiled, backend: &Backend) -> ServiceState {
        match backend {
            Backend::Service {
                namespace, name, ..
            } => self.for_service(snap, namespace, name),
            Backend::Workload(_) => self.default_service(),
        }
    }

    /// Workload-addressed traffic: no TrafficPolicy applies.
    pub fn default_service(&self) -> ServiceState {
        ServiceState {
            inner: Arc::new(ServiceResilience::new(None, Instant::now())),
            rate_key: None,
        }
    }

    /// Forgets services that left the model.
    pub fn retain(&self, snap: &Compiled) {
        self.services
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|ns, by_name| {
                by_name.retain(|name, _| snap.service(ns, name).is_some());
                !by_name.is_empty()
            });
    }
}
