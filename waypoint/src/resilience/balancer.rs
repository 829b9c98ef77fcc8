//! Picks the endpoint for each request: power of two choices over the
//! endpoints the outlier detector has not ejected, preferring the one with
//! fewer requests in flight.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use rand::Rng;

use super::outlier::{EjectionView, OutlierDetector};

/// Least-request load balancing for one service ("P2C": sample two distinct
/// endpoints at random, send to the one with fewer in-flight requests, break
/// ties at random). P2C needs no global ordering, so it stays O(1) per pick
/// when nothing is ejected, and it steers traffic away from slow endpoints
/// because their requests pile up.
///
/// Ejected endpoints are skipped. If every endpoint is ejected the balancer
/// ignores ejection and picks among all of them (Envoy's "panic mode"):
/// sending to a possibly unhealthy endpoint beats failing every request
/// locally. With the detector's `max_ejection_percent` below 100 this cannot
/// happen for sets of two or more.
///
/// In-flight counts are per endpoint and survive endpoint-set changes for
/// endpoints that stay; [`retain`](Balancer::retain) drops the rest (guards
/// still held for a dropped endpoint stay valid and just count into nothing).
#[derive(Debug, Default)]
pub struct Balancer {
    in_flight: RwLock<HashMap<SocketAddr, Arc<AtomicUsize>>>,
}

/// One request in flight to an endpoint; dropping it (response done, or any
/// early return) ends the count.
#[derive(Debug)]
#[must_use = "dropping the guard ends the in-flight count at once"]
pub struct InFlightGuard {
    counter: Arc<AtomicUsize>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Picks an endpoint with the thread's RNG; `None` only for an empty set.
    pub fn pick(
        &self,
        endpoints: &[SocketAddr],
        detector: &OutlierDetector,
        now: Instant,
    ) -> Option<(SocketAddr, InFlightGuard)> {
        self.pick_with_rng(endpoints, detector, now, &mut rand::thread_rng())
    }

    /// [`pick`](Balancer::pick) with a given RNG (for deterministic tests).
    pub fn pick_with_rng(
        &self,
        endpoints: &[SocketAddr],
        detector: &OutlierDetector,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Option<(SocketAddr, InFlightGuard)> {
        let (first, second) = {
            let view = detector.view(now);
            sample_two(endpoints, &view, rng)?
        };
        let chosen = match second {
            None => first,
            Some(second) => {
                let (a, b) = (self.load(&first), self.load(&second));
                if a < b || (a == b && rng.gen_bool(0.5)) {
                    first
                } else {
                    second
                }
            }
        };
        let counter = self.counter(chosen);
        counter.fetch_add(1, Ordering::Relaxed);
        Some((chosen, InFlightGuard { counter }))
    }

    /// Forgets in-flight state of endpoints not in `endpoints`.
    pub fn retain(&self, endpoints: &[SocketAddr]) {
        self.write().retain(|ep, _| endpoints.contains(ep));
    }

    /// Requests in flight to `ep` (for metrics and tests).
    pub fn in_flight(&self, ep: &SocketAddr) -> usize {
        self.load(ep)
    }

    fn load(&self, ep: &SocketAddr) -> usize {
        self.read().get(ep).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    fn counter(&self, ep: SocketAddr) -> Arc<AtomicUsize> {
        if let Some(counter) = self.read().get(&ep) {
            return counter.clone();
        }
        // First request to a new endpoint: the only allocating path.
        self.write().entry(ep).or_default().clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<SocketAddr, Arc<AtomicUsize>>> {
        self.in_flight.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<SocketAddr, Arc<AtomicUsize>>> {
        self.in_flight.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Two distinct candidates (or one, if only one is eligible), uniformly from
/// the non-ejected endpoints, or from all of them if all are ejected.
fn sample_two(
    endpoints: &[SocketAddr],
    view: &EjectionView<'_>,
    rng: &mut impl Rng,
) -> Option<(SocketAddr, Option<SocketAddr>)> {
    let healthy = if view.any() {
        endpoints.iter().filter(|ep| !view.is_ejected(ep)).count()
    } else {
        endpoints.len()
    };
    let (eligible, use_view) = match healthy {
        0 => (endpoints.len(), false),
        n => (n, view.any() && n < endpoints.len()),
    };
    let (i, j) = two_distinct_indices(eligible, rng)?;
    let nth = |rank: usize| {
        if use_view {
            endpoints
                .iter()
                .filter(|ep| !view.is_ejected(ep))
                .nth(rank)
                .copied()
        } else {
            endpoints.get(rank).copied()
        }
    };
    Some((nth(i)?, j.and_then(nth)))
}

fn two_distinct_indices(n: usize, rng: &mut impl Rng) -> Option<(usize, Option<usize>)> {
    match n {
        0 => None,
        1 => Some((0, None)),
        n => {
            let i = rng.gen_range(0..n);
            let mut j = rng.gen_range(0..n - 1);
            if j >= i {
                j += 1;
            }
            Some((i, Some(j)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::test_support::addrs;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::time::Duration;
    use weft_api::model::OutlierDetection;

    fn no_detection() -> OutlierDetector {
        OutlierDetector::new(None)
    }

    fn detector(percent: u32, eps: &[SocketAddr]) -> OutlierDetector {
        let d = OutlierDetector::new(Some(&OutlierDetection {
            consecutive_5xx: 1,
            base_ejection_ms: 10_000,
            max_ejection_percent: percent,
        }));
        d.set_endpoints(eps);
        d
    }

    #[test]
    fn empty_set_gives_none_and_single_endpoint_always_wins() {
        let b = Balancer::new();
        let d = no_detection();
        let now = Instant::now();
        assert!(b.pick(&[], &d, now).is_none());
        let eps = addrs(1);
        let (ep, _guard) = b.pick(&eps, &d, now).unwrap();
        assert_eq!(ep, eps[0]);
    }

    #[test]
    fn guard_counts_in_flight_until_dropped() {
        let b = Balancer::new();
        let d = no_detection();
        let eps = addrs(1);
        let now = Instant::now();
        let (ep, g1) = b.pick(&eps, &d, now).unwrap();
        let (_, g2) = b.pick(&eps, &d, now).unwrap();
        assert_eq!(b.in_flight(&ep), 2);
        drop(g1);
        assert_eq!(b.in_flight(&ep), 1);
        drop(g2);
        assert_eq!(b.in_flight(&ep), 0);
    }

    #[test]
    fn busy_endpoint_loses_every_comparison() {
        let b = Balancer::new();
        let d = no_detection();
        let eps = addrs(3);
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(1);
        // Pin ten requests on eps[0].
        let busy: Vec<_> = (0..10)
            .map(|_| b.pick_with_rng(&eps[..1], &d, now, &mut rng).unwrap().1)
            .collect();
        for _ in 0..300 {
            let (ep, guard) = b.pick_with_rng(&eps, &d, now, &mut rng).unwrap();
            assert_ne!(ep, eps[0]);
            drop(guard);
        }
        drop(busy);
    }

    #[test]
    fn slow_endpoint_gets_less_traffic() {
        // Discrete simulation: 3 requests start each tick; eps[0] holds each
        // request for 20 ticks, the others for 1 tick.
        let b = Balancer::new();
        let d = no_detection();
        let eps = addrs(4);
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(42);
        let mut open: Vec<(u32, InFlightGuard)> = Vec::new();
        let mut picks = [0usize; 4];
        for tick in 0..2000u32 {
            open.retain(|(done, _)| *done > tick);
            for _ in 0..3 {
                let (ep, guard) = b.pick_with_rng(&eps, &d, now, &mut rng).unwrap();
                let index = eps.iter().position(|e| *e == ep).unwrap();
                picks[index] += 1;
                let latency = if index == 0 { 20 } else { 1 };
                open.push((tick + latency, guard));
            }
        }
        let total: usize = picks.iter().sum();
        // A fair share would be 25%; the slow endpoint should get far less.
        assert!(picks[0] * 10 < total, "{picks:?}");
        for fast in &picks[1..] {
            assert!(*fast * 4 > total, "{picks:?}");
        }
    }

    #[test]
    fn idle_endpoints_share_evenly() {
        let b = Balancer::new();
        let d = no_detection();
        let eps = addrs(4);
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(3);
        let mut picks = [0usize; 4];
        for _ in 0..4000 {
            let (ep, _guard) = b.pick_with_rng(&eps, &d, now, &mut rng).unwrap();
            picks[eps.iter().position(|e| *e == ep).unwrap()] += 1;
        }
        // Expected 1000 each, sd ~27.
        assert!(picks.iter().all(|p| (850..1150).contains(p)), "{picks:?}");
    }

    #[test]
    fn ejected_endpoints_get_no_traffic() {
        let b = Balancer::new();
        let eps = addrs(4);
        let d = detector(50, &eps);
        let now = Instant::now();
        d.record(eps[1], false, now);
        d.record(eps[2], false, now);
        assert!(d.is_ejected(eps[1], now) && d.is_ejected(eps[2], now));
        let mut rng = StdRng::seed_from_u64(5);
        let mut seen = [0usize; 4];
        for _ in 0..500 {
            let (ep, _guard) = b.pick_with_rng(&eps, &d, now, &mut rng).unwrap();
            seen[eps.iter().position(|e| *e == ep).unwrap()] += 1;
        }
        assert_eq!((seen[1], seen[2]), (0, 0), "{seen:?}");
        assert!(seen[0] > 150 && seen[3] > 150, "{seen:?}");
        // After expiry they are back.
        let later = now + Duration::from_secs(10);
        let mut back = [0usize; 4];
        for _ in 0..500 {
            let (ep, _guard) = b.pick_with_rng(&eps, &d, later, &mut rng).unwrap();
            back[eps.iter().position(|e| *e == ep).unwrap()] += 1;
        }
        assert!(back.iter().all(|n| *n > 50), "{back:?}");
    }

    #[test]
    fn all_ejected_falls_back_to_all_endpoints() {
        let b = Balancer::new();
        let eps = addrs(2);
        let d = detector(100, &eps);
        let now = Instant::now();
        d.record(eps[0], false, now);
        d.record(eps[1], false, now);
        assert_eq!(d.ejected_count(now), 2);
        let mut rng = StdRng::seed_from_u64(9);
        let mut seen = [0usize; 2];
        for _ in 0..200 {
            let (ep, _guard) = b.pick_with_rng(&eps, &d, now, &mut rng).unwrap();
            seen[eps.iter().position(|e| *e == ep).unwrap()] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
    }

    #[test]
    fn in_flight_survives_set_changes_and_vanished_state_is_pruned() {
        let b = Balancer::new();
        let d = no_detection();
        let eps = addrs(3);
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(11);
        let (_, g0) = b.pick_with_rng(&eps[..1], &d, now, &mut rng).unwrap();
        let (_, g2) = b.pick_with_rng(&eps[2..], &d, now, &mut rng).unwrap();
        b.retain(&eps[..2]);
        assert_eq!(b.in_flight(&eps[0]), 1);
        assert_eq!(b.in_flight(&eps[2]), 0);
        assert_eq!(b.read().len(), 1);
        // Dropping a guard of a pruned endpoint is harmless.
        drop(g2);
        drop(g0);
        assert_eq!(b.in_flight(&eps[0]), 0);
    }

    #[test]
    fn concurrent_picks_balance_their_counts() {
        let b = Arc::new(Balancer::new());
        let d = Arc::new(no_detection());
        let eps = Arc::new(addrs(5));
        let now = Instant::now();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (b, d, eps) = (b.clone(), d.clone(), eps.clone());
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        let picked = b.pick(&eps, &d, now);
                        assert!(picked.is_some());
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert!(eps.iter().all(|ep| b.in_flight(ep) == 0));
    }
}
