//! Passive health checking: endpoints that keep failing are taken out of load
//! balancing for a while, longer each time they are ejected again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use weft_api::model::OutlierDetection;

/// Longest single ejection (Envoy's `max_ejection_time` default), unless the
/// base ejection time is longer still.
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// Tracks consecutive failures per endpoint of one service and ejects those
/// that cross `consecutive_5xx`.
///
/// Behaviour choices:
/// - An ejection lasts `base_ejection_ms x times_ejected`, capped at
///   [`MAX_EJECTION`]. `times_ejected` decays by one for every base period the
///   endpoint spends un-ejected, so an endpoint that recovered for good goes
///   back to short ejections (as Envoy does), computed lazily at the next
///   ejection rather than by a timer.
/// - At most `floor(endpoints x max_ejection_percent / 100)` endpoints are
///   ejected at once. When that is zero (one endpoint, or a small percent of a
///   small set) nothing is ejected: the model promises "never more than", and
///   ejecting the only endpoint would just send the balancer into its panic
///   fallback anyway. An endpoint refused for this reason keeps its failure
///   streak, so its next failure tries again once room frees up.
/// - Ejection ends by itself at expiry (checked lazily on every read), and
///   the endpoint then needs a fresh streak of failures to be ejected again.
/// - Results that arrive while an endpoint is ejected (requests sent before
///   the ejection) do not count against it; a success still resets its streak.
/// - Only endpoints named in [`set_endpoints`] are tracked: a result for an
///   endpoint that has since left the set is ignored.
///
/// [`set_endpoints`]: OutlierDetector::set_endpoints
#[derive(Debug)]
pub struct OutlierDetector {
    /// `None`: detection disabled, nothing is ever ejected.
    config: Option<Config>,
    endpoints: Mutex<HashMap<SocketAddr, Health>>,
    /// Entries whose `ejected_until` is set (some may have expired); lets the
    /// balancer skip the lock entirely in the common all-healthy case.
    marked: AtomicUsize,
    ejections_total: AtomicU64,
    ejections_refused_total: AtomicU64,
}

#[derive(Clone, Copy, Debug)]
struct Config {
    consecutive_failures: u32,
    base_ejection: Duration,
    max_ejection: Duration,
    max_ejection_percent: usize,
}

#[derive(Clone, Copy, Debug, Default)]
struct Health {
    consecutive_failures: u32,
    times_ejected: u32,
    ejected_until: Option<Instant>,
    last_ejection_end: Option<Instant>,
}

impl Health {
    /// Ends an expired ejection; returns true if it did.
    fn expire(&mut self, now: Instant) -> bool {
        match self.ejected_until {
            Some(until) if until <= now => {
                self.ejected_until = None;
                self.last_ejection_end = Some(until);
                true
            }
            _ => false,
        }
    }

    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| until > now)
    }
}

impl OutlierDetector {
    /// `None`, or `consecutive_5xx: 0`, disables detection.
    pub fn new(config: Option<&OutlierDetection>) -> Self {
        let config = config.filter(|c| c.consecutive_5xx > 0).map(|c| {
            let base_ejection = Duration::from_millis(c.base_ejection_ms);
            Config {
                consecutive_failures: c.consecutive_5xx,
                base_ejection,
                max_ejection: MAX_EJECTION.max(base_ejection),
                max_ejection_percent: c.max_ejection_percent.min(100) as usize,
            }
        });
        Self {
            config,
            endpoints: Mutex::new(HashMap::new()),
            marked: AtomicUsize::new(0),
            ejections_total: AtomicU64::new(0),
            ejections_refused_total: AtomicU64::new(0),
        }
    }

    /// Makes `endpoints` the service's current set: state of endpoints that
    /// stay is kept, new ones start healthy, vanished ones are forgotten.
    pub fn set_endpoints(&self, endpoints: &[SocketAddr]) {
        let mut map = self.lock();
        map.retain(|ep, _| endpoints.contains(ep));
        for ep in endpoints {
            map.entry(*ep).or_default();
        }
        let marked = map.values().filter(|h| h.ejected_until.is_some()).count();
        self.marked.store(marked, Ordering::Relaxed);
    }

    /// Records the result of one request to `ep`. `success` is false for a
    /// 5xx answer, a connect failure, a reset or a timeout.
    pub fn record(&self, ep: SocketAddr, success: bool, now: Instant) {
        let Some(config) = self.config else { return };
        let mut map = self.lock();
        let Some(health) = map.get_mut(&ep) else {
            return;
        };
        if health.expire(now) {
            self.marked.fetch_sub(1, Ordering::Relaxed);
        }
        if success {
            health.consecutive_failures = 0;
            return;
        }
        if health.is_ejected(now) {
            return;
        }
        health.consecutive_failures = health.consecutive_failures.saturating_add(1);
        if health.consecutive_failures < config.consecutive_failures {
            return;
        }
        // Crossing the threshold: eject if the cap leaves room. The count is
        // O(endpoints) but only runs on this rare path.
        let allowed = map.len() * config.max_ejection_percent / 100;
        let active = map.values().filter(|h| h.is_ejected(now)).count();
        if active >= allowed {
            self.ejections_refused_total.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(component = "outlier", endpoint = %ep, active, allowed, "ejection refused by max_ejection_percent");
            return;
        }
        let Some(health) = map.get_mut(&ep) else {
            return;
        };
        if let Some(end) = health.last_ejection_end {
            let healthy_for = now.saturating_duration_since(end);
            let periods = match config.base_ejection.as_nanos() {
                0 => u128::from(u32::MAX),
                base => healthy_for.as_nanos() / base,
            };
            let periods = u32::try_from(periods).unwrap_or(u32::MAX);
            health.times_ejected = health.times_ejected.saturating_sub(periods);
        }
        health.times_ejected = health.times_ejected.saturating_add(1);
        let duration = config
            .base_ejection
            .saturating_mul(health.times_ejected)
            .min(config.max_ejection);
        health.ejected_until = Some(now + duration);
        health.consecutive_failures = 0;
        self.marked.fetch_add(1, Ordering::Relaxed);
        self.ejections_total.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            component = "outlier",
            endpoint = %ep,
            ejection_ms = duration.as_millis() as u64,
            times_ejected = health.times_ejected,
            "endpoint ejected"
        );
    }

    /// Whether `ep` is ejected at `now`.
    pub fn is_ejected(&self, ep: SocketAddr, now: Instant) -> bool {
        self.view(now).is_ejected(&ep)
    }

    /// Endpoints ejected at `now` (a gauge for metrics).
    pub fn ejected_count(&self, now: Instant) -> usize {
        if self.marked.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.lock().values().filter(|h| h.is_ejected(now)).count()
    }

    /// Ejections since creation (a counter for metrics).
    pub fn ejections_total(&self) -> u64 {
        self.ejections_total.load(Ordering::Relaxed)
    }

    /// Ejections skipped because `max_ejection_percent` was reached.
    pub fn ejections_refused_total(&self) -> u64 {
        self.ejections_refused_total.load(Ordering::Relaxed)
    }

    /// A consistent view of who is ejected at `now`, for checking many
    /// endpoints under one lock. Takes no lock when nothing is ejected.
    pub fn view(&self, now: Instant) -> EjectionView<'_> {
        if self.marked.load(Ordering::Relaxed) == 0 {
            return EjectionView { map: None, now };
        }
        let mut map = self.lock();
        let mut expired = 0;
        for health in map.values_mut() {
            if health.expire(now) {
                expired += 1;
            }
        }
        // Every write to `marked` happens under the lock we hold.
        let remaining = self.marked.load(Ordering::Relaxed).saturating_sub(expired);
        self.marked.store(remaining, Ordering::Relaxed);
        EjectionView {
            map: (remaining > 0).then_some(map),
            now,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, Health>> {
        // Health state stays usable even if a holder panicked mid-update.
        self.endpoints.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Who is ejected at one instant; holds the detector's lock while any
/// endpoint is ejected, so keep it short-lived.
pub struct EjectionView<'a> {
    map: Option<MutexGuard<'a, HashMap<SocketAddr, Health>>>,
    now: Instant,
}

impl EjectionView<'_> {
    /// Whether any endpoint is ejected; false means every check is `false`.
    pub fn any(&self) -> bool {
        self.map.is_some()
    }

    pub fn is_ejected(&self, ep: &SocketAddr) -> bool {
        self.map
            .as_ref()
            .and_then(|map| map.get(ep))
            .is_some_and(|h| h.is_ejected(self.now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::test_support::addrs;

    fn detector(
        consecutive: u32,
        base_ms: u64,
        percent: u32,
        eps: &[SocketAddr],
    ) -> OutlierDetector {
        let d = OutlierDetector::new(Some(&OutlierDetection {
            consecutive_5xx: consecutive,
            base_ejection_ms: base_ms,
            max_ejection_percent: percent,
        }));
        d.set_endpoints(eps);
        d
    }

    fn fail(d: &OutlierDetector, ep: SocketAddr, times: u32, now: Instant) {
        for _ in 0..times {
            d.record(ep, false, now);
        }
    }

    #[test]
    fn ejects_after_consecutive_failures_and_expires() {
        let eps = addrs(4);
        let d = detector(3, 1000, 50, &eps);
        let t0 = Instant::now();
        fail(&d, eps[0], 2, t0);
        assert!(!d.is_ejected(eps[0], t0));
        fail(&d, eps[0], 1, t0);
        assert!(d.is_ejected(eps[0], t0));
        assert!(d.is_ejected(eps[0], t0 + Duration::from_millis(999)));
        assert!(!d.is_ejected(eps[0], t0 + Duration::from_millis(1000)));
        assert_eq!(d.ejections_total(), 1);
        assert!(!d.is_ejected(eps[1], t0));
    }

    #[test]
    fn success_resets_the_streak() {
        let eps = addrs(4);
        let d = detector(3, 1000, 50, &eps);
        let t0 = Instant::now();
        fail(&d, eps[0], 2, t0);
        d.record(eps[0], true, t0);
        fail(&d, eps[0], 2, t0);
        assert!(!d.is_ejected(eps[0], t0));
        fail(&d, eps[0], 1, t0);
        assert!(d.is_ejected(eps[0], t0));
    }

    #[test]
    fn repeated_ejections_grow_and_cap() {
        let eps = addrs(2);
        let d = detector(1, 100_000, 50, &eps);
        let mut now = Instant::now();
        let mut durations = Vec::new();
        for _ in 0..5 {
            d.record(eps[0], false, now);
            let mut ms = 0;
            while d.is_ejected(eps[0], now + Duration::from_millis(ms)) {
                ms += 50_000;
            }
            durations.push(ms / 1000);
            // Fail again right at expiry: no time to decay.
            now += Duration::from_millis(ms);
            assert!(!d.is_ejected(eps[0], now));
        }
        // 100 s, 200 s, 300 s (cap), 300 s, 300 s.
        assert_eq!(durations, [100, 200, 300, 300, 300]);
    }

    #[test]
    fn ejection_multiplier_decays_while_healthy() {
        let eps = addrs(2);
        let d = detector(1, 1000, 50, &eps);
        let t0 = Instant::now();
        d.record(eps[0], false, t0); // 1 s
        let t1 = t0 + Duration::from_secs(1);
        d.record(eps[0], false, t1); // 2 s
        assert!(d.is_ejected(eps[0], t1 + Duration::from_millis(1999)));
        // Expired at t1+2s, then healthy for 10 base periods: back to 1 s.
        let t2 = t1 + Duration::from_secs(12);
        d.record(eps[0], false, t2);
        assert!(d.is_ejected(eps[0], t2 + Duration::from_millis(999)));
        assert!(!d.is_ejected(eps[0], t2 + Duration::from_millis(1000)));
    }

    #[test]
    fn max_ejection_percent_caps_concurrent_ejections() {
        let eps = addrs(4);
        let d = detector(1, 1000, 50, &eps);
        let t0 = Instant::now();
        for ep in &eps {
            d.record(*ep, false, t0);
        }
        assert_eq!(d.ejected_count(t0), 2);
        assert_eq!(d.ejections_refused_total(), 2);
        // Once the first two expire, a refused endpoint's next failure ejects it.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(d.ejected_count(t1), 0);
        d.record(eps[3], false, t1);
        assert!(d.is_ejected(eps[3], t1));
    }

    #[test]
    fn percent_allowing_zero_ejects_nothing() {
        let one = addrs(1);
        let d = detector(1, 1000, 50, &one);
        let t0 = Instant::now();
        fail(&d, one[0], 10, t0);
        assert!(!d.is_ejected(one[0], t0));
        let three = addrs(3);
        let d = detector(1, 1000, 10, &three);
        fail(&d, three[0], 10, t0);
        assert_eq!(d.ejected_count(t0), 0);
        // Two endpoints at 50%: one may go.
        let two = addrs(2);
        let d = detector(1, 1000, 50, &two);
        fail(&d, two[0], 1, t0);
        fail(&d, two[1], 1, t0);
        assert_eq!(d.ejected_count(t0), 1);
    }

    #[test]
    fn failures_while_ejected_do_not_extend_or_count() {
        let eps = addrs(2);
        let d = detector(2, 1000, 50, &eps);
        let t0 = Instant::now();
        fail(&d, eps[0], 2, t0);
        fail(&d, eps[0], 10, t0 + Duration::from_millis(500));
        let t1 = t0 + Duration::from_secs(1);
        assert!(!d.is_ejected(eps[0], t1));
        // A fresh streak is needed.
        fail(&d, eps[0], 1, t1);
        assert!(!d.is_ejected(eps[0], t1));
        assert_eq!(d.ejections_total(), 1);
    }

    #[test]
    fn disabled_detector_never_ejects() {
        let eps = addrs(2);
        let t0 = Instant::now();
        for d in [OutlierDetector::new(None), detector(0, 1000, 100, &eps)] {
            d.set_endpoints(&eps);
            fail(&d, eps[0], 100, t0);
            assert!(!d.is_ejected(eps[0], t0));
        }
    }

    #[test]
    fn endpoint_set_changes_keep_and_prune_state() {
        let eps = addrs(3);
        let d = detector(1, 1000, 100, &eps);
        let t0 = Instant::now();
        d.record(eps[0], false, t0);
        d.record(eps[1], false, t0);
        d.set_endpoints(&eps[..1]);
        assert!(d.is_ejected(eps[0], t0), "kept endpoint keeps its ejection");
        assert!(!d.is_ejected(eps[1], t0), "vanished endpoint is forgotten");
        // Results for endpoints outside the set are ignored.
        d.record(eps[2], false, t0);
        assert!(!d.is_ejected(eps[2], t0));
        assert_eq!(d.ejected_count(t0), 1);
    }

    #[test]
    fn view_takes_no_lock_when_all_healthy_and_sweeps_expired() {
        let eps = addrs(2);
        let d = detector(1, 1000, 50, &eps);
        let t0 = Instant::now();
        assert!(!d.view(t0).any());
        d.record(eps[0], false, t0);
        {
            let view = d.view(t0);
            assert!(view.any());
            assert!(view.is_ejected(&eps[0]));
            assert!(!view.is_ejected(&eps[1]));
        }
        assert!(!d.view(t0 + Duration::from_secs(1)).any());
        assert_eq!(d.marked.load(Ordering::Relaxed), 0);
    }
}
