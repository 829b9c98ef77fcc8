//! Resilience building blocks the waypoint calls per request: retries and
//! their budget, outlier detection, least-request load balancing, circuit
//! breaking, fault injection and local rate limiting. None of them does I/O
//! or reads the clock: the caller passes `now`, so tests control time.
//!
//! [`registry`] keeps one [`ServiceResilience`] per service across model
//! versions, calls [`ServiceResilience::refresh`] when that service's
//! TrafficPolicy changes, and is what requests talk to. Retry policies are
//! per route rule and built with [`RetryPolicy::from_config`] alongside the
//! route.

pub mod balancer;
pub mod fault;
pub mod limits;
pub mod outlier;
pub mod ratelimit;
pub mod registry;
pub mod retry;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use weft_api::model::TrafficPolicy;

pub use balancer::{Balancer, InFlightGuard};
pub use fault::{FaultAction, FaultInjector};
pub use limits::{
    Admission, ConnectionPermit, Limits, Overflow, PendingPermit, Permit, RequestPermit,
    OVERFLOW_HEADER,
};
pub use outlier::OutlierDetector;
pub use ratelimit::{key_for as rate_limit_key, RateLimiter, RetryAfter};
pub use retry::{is_retryable, Outcome, RetryBudget, RetryPolicy};

/// Everything one service's TrafficPolicy configures, shared by all requests
/// to that service. Each part is behind an `Arc` so that a policy change
/// rebuilds only the parts whose settings changed: a new rate limit does not
/// forget which endpoints are ejected, and the balancer (which has no
/// settings) always carries its in-flight counts over.
#[derive(Debug)]
pub struct ServiceResilience {
    settings: Settings,
    pub detector: Arc<OutlierDetector>,
    pub balancer: Arc<Balancer>,
    pub limits: Arc<Limits>,
    pub budget: Arc<RetryBudget>,
    /// `None` when the policy sets no rate limit.
    pub limiter: Option<Arc<RateLimiter>>,
    pub fault: Arc<FaultInjector>,
}

/// The parts of a TrafficPolicy that shape behaviour (its name and target
/// do not).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Settings {
    retry_budget: Option<weft_api::model::RetryBudget>,
    outlier_detection: Option<weft_api::model::OutlierDetection>,
    limits: Option<weft_api::model::ConnectionLimits>,
    fault: Option<weft_api::model::Fault>,
    rate_limit: Option<weft_api::model::RateLimit>,
}

impl Settings {
    fn of(policy: Option<&TrafficPolicy>) -> Self {
        policy.map_or_else(Self::default, |p| Self {
            retry_budget: p.retry_budget.clone(),
            outlier_detection: p.outlier_detection.clone(),
            limits: p.limits.clone(),
            fault: p.fault.clone(),
            rate_limit: p.rate_limit.clone(),
        })
    }

    fn matches(&self, policy: Option<&TrafficPolicy>) -> bool {
        match policy {
            None => *self == Self::default(),
            Some(p) => {
                self.retry_budget == p.retry_budget
                    && self.outlier_detection == p.outlier_detection
                    && self.limits == p.limits
                    && self.fault == p.fault
                    && self.rate_limit == p.rate_limit
            }
        }
    }
}

impl ServiceResilience {
    /// `None`: the service has no TrafficPolicy (no outlier detection, no
    /// limits, no faults, no rate limit, the default retry budget).
    pub fn new(policy: Option<&TrafficPolicy>, now: Instant) -> Self {
        let settings = Settings::of(policy);
        Self {
            detector: Arc::new(OutlierDetector::new(settings.outlier_detection.as_ref())),
            balancer: Arc::new(Balancer::new()),
            limits: Arc::new(Limits::new(&settings.limits.clone().unwrap_or_default())),
            budget: Arc::new(RetryBudget::new(settings.retry_budget.as_ref(), now)),
            limiter: settings
                .rate_limit
                .as_ref()
                .map(|r| Arc::new(RateLimiter::new(r))),
            fault: Arc::new(FaultInjector::new(settings.fault.as_ref())),
            settings,
        }
    }

    /// Whether this bundle was built from settings equal to `policy`'s.
    pub fn is_built_from(&self, policy: Option<&TrafficPolicy>) -> bool {
        self.settings.matches(policy)
    }

    /// The bundle to use for `policy` from now on: `self` if nothing changed
    /// (no allocation), else a new bundle reusing every part whose own
    /// settings are unchanged. Call [`set_endpoints`] on a new bundle.
    ///
    /// [`set_endpoints`]: ServiceResilience::set_endpoints
    pub fn refresh(self: &Arc<Self>, policy: Option<&TrafficPolicy>, now: Instant) -> Arc<Self> {
        if self.is_built_from(policy) {
            return self.clone();
        }
        let mut fresh = Self::new(policy, now);
        let (old, new) = (&self.settings, &fresh.settings);
        fresh.balancer = self.balancer.clone();
        if old.outlier_detection == new.outlier_detection {
            fresh.detector = self.detector.clone();
        }
        if old.limits == new.limits {
            fresh.limits = self.limits.clone();
        }
        if old.retry_budget == new.retry_budget {
            fresh.budget = self.budget.clone();
        }
        if old.rate_limit == new.rate_limit {
            fresh.limiter = self.limiter.clone();
        }
        if old.fault == new.fault {
            fresh.fault = self.fault.clone();
        }
        Arc::new(fresh)
    }

    /// Tells every per-endpoint part the service's current endpoints: state
    /// of endpoints that stay is kept, the rest is pruned.
    pub fn set_endpoints(&self, endpoints: &[SocketAddr]) {
        self.detector.set_endpoints(endpoints);
        self.balancer.retain(endpoints);
        self.limits.retain(endpoints);
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::net::SocketAddr;

    /// `n` distinct endpoint addresses, 10.0.0.1:8080 upwards.
    pub(crate) fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| {
                let [_, _, hi, lo] = (u32::from(i) + 1).to_be_bytes();
                SocketAddr::from(([10, 0, hi, lo], 8080))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::addrs;
    use super::*;
    use std::time::Duration;
    use weft_api::model::{ConnectionLimits, Fault, FaultAbort, OutlierDetection, RateLimit};

    fn policy() -> TrafficPolicy {
        TrafficPolicy {
            name: "p".into(),
            namespace: "ns".into(),
            target: "svc".into(),
            outlier_detection: Some(OutlierDetection {
                consecutive_5xx: 1,
                base_ejection_ms: 1000,
                max_ejection_percent: 50,
            }),
            limits: Some(ConnectionLimits {
                max_requests: Some(1),
                ..ConnectionLimits::default()
            }),
            rate_limit: Some(RateLimit {
                requests: 1,
                period_ms: 1000,
                ..RateLimit::default()
            }),
            ..TrafficPolicy::default()
        }
    }

    #[test]
    fn no_policy_builds_permissive_bundle() {
        let now = Instant::now();
        let r = ServiceResilience::new(None, now);
        assert!(r.limiter.is_none());
        assert!(!r.fault.is_active());
        let _a = r.limits.try_start_request().unwrap();
        assert!(r.limits.try_start_request().is_ok());
        assert!(r.is_built_from(None));
        assert!(r.is_built_from(Some(&TrafficPolicy::default())));
        assert!(!r.is_built_from(Some(&policy())));
    }

    #[test]
    fn bundle_wires_the_policy_into_each_part() {
        let now = Instant::now();
        let r = ServiceResilience::new(Some(&policy()), now);
        let eps = addrs(2);
        r.set_endpoints(&eps);
        let _permit = r.limits.try_start_request().unwrap();
        assert_eq!(
            r.limits.try_start_request().unwrap_err(),
            Overflow::Requests
        );
        let limiter = r.limiter.as_ref().unwrap();
        assert!(limiter.check("", now).is_ok());
        assert!(limiter.check("", now).is_err());
        r.detector.record(eps[0], false, now);
        for _ in 0..50 {
            let (ep, _guard) = r.balancer.pick(&eps, &r.detector, now).unwrap();
            assert_eq!(ep, eps[1]);
        }
    }

    #[test]
    fn refresh_reuses_unchanged_bundle_and_parts() {
        let now = Instant::now();
        let eps = addrs(2);
        let current = Arc::new(ServiceResilience::new(Some(&policy()), now));
        current.set_endpoints(&eps);
        current.detector.record(eps[0], false, now);

        // Same settings under another name: the very same bundle.
        let renamed = TrafficPolicy {
            name: "other".into(),
            ..policy()
        };
        let same = current.refresh(Some(&renamed), now);
        assert!(Arc::ptr_eq(&same, &current));

        // Only the fault changes: everything else carries over.
        let with_fault = TrafficPolicy {
            fault: Some(Fault {
                abort: Some(FaultAbort {
                    percent: 100,
                    status: 503,
                }),
                ..Fault::default()
            }),
            ..policy()
        };
        let next = current.refresh(Some(&with_fault), now + Duration::from_millis(1));
        assert!(!Arc::ptr_eq(&next, &current));
        assert!(next.fault.is_active());
        assert!(Arc::ptr_eq(&next.detector, &current.detector));
        assert!(Arc::ptr_eq(&next.balancer, &current.balancer));
        assert!(Arc::ptr_eq(&next.limits, &current.limits));
        assert!(next.detector.is_ejected(eps[0], now));

        // Dropping the policy resets the configured parts but keeps the balancer.
        let cleared = next.refresh(None, now);
        assert!(!Arc::ptr_eq(&cleared.detector, &next.detector));
        assert!(Arc::ptr_eq(&cleared.balancer, &next.balancer));
        assert!(cleared.limiter.is_none());
    }

    #[test]
    fn bundle_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ServiceResilience>();
        assert_send_sync::<InFlightGuard>();
        assert_send_sync::<Permit>();
    }
}
