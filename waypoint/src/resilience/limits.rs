//! Circuit breaking: caps on concurrent requests, requests waiting for a
//! connection, and connections per endpoint. Past a cap the proxy answers
//! 503 at once with `x-weft-overflow: true` instead of queueing more work
//! onto an upstream that is already saturated.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use weft_api::model::ConnectionLimits;

/// Response header marking a 503 the waypoint produced because a limit was
/// reached (the upstream was never asked).
pub const OVERFLOW_HEADER: &str = "x-weft-overflow";

/// Which limit turned a request away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Overflow {
    #[error("max_requests reached: too many concurrent requests to the service")]
    Requests,
    #[error("max_pending_requests reached: too many requests waiting for a connection")]
    Pending,
    #[error("max_connections reached: too many connections to the endpoint")]
    Connections,
}

impl Overflow {
    /// Short label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::Requests => "requests",
            Overflow::Pending => "pending",
            Overflow::Connections => "connections",
        }
    }
}

/// One service's circuit breaker. Every slot is an RAII permit, so an early
/// return can never leak a count. Counts are kept even for unset limits, for
/// metrics.
///
/// When the TrafficPolicy changes the proxy builds a new `Limits`; permits of
/// the old one release into the old counters, so for a moment the two
/// together may exceed the new limits. That is accepted rather than carrying
/// counts across configurations.
#[derive(Debug)]
pub struct Limits {
    max_requests: Option<u32>,
    max_pending: Option<u32>,
    max_connections: Option<u32>,
    requests: Arc<AtomicU32>,
    pending: Arc<AtomicU32>,
    connections: RwLock<HashMap<SocketAddr, Arc<AtomicU32>>>,
    overflows: [AtomicU64; 3],
}

/// A slot of `counter` under `max` (unset: unlimited), if there is one.
fn take(counter: &Arc<AtomicU32>, max: Option<u32>) -> Option<Permit> {
    let max = max.unwrap_or(u32::MAX);
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Permit {
            counter: counter.clone(),
        })
}

/// What a request needing a new connection got.
#[derive(Debug)]
pub enum Admission {
    /// A connection slot: open one.
    Connect(ConnectionPermit),
    /// The connection limit is reached: wait (holding the place) for an
    /// idle connection or a freed slot.
    Wait(PendingPermit),
}

/// Holds one slot of a [`Limits`] counter; the slot is released on drop.
#[derive(Debug)]
#[must_use = "dropping the permit releases the slot at once"]
pub struct Permit {
    counter: Arc<AtomicU32>,
}

/// A concurrent request to the service.
pub type RequestPermit = Permit;
/// A request waiting for an upstream connection.
pub type PendingPermit = Permit;
/// One upstream connection to an endpoint.
pub type ConnectionPermit = Permit;

impl Drop for Permit {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::new(&ConnectionLimits::default())
    }
}

impl Limits {
    /// Unset fields are unlimited. A limit of 0 turns every request away
    /// (a deliberate "closed" switch, not a typo guard).
    pub fn new(config: &ConnectionLimits) -> Self {
        Self {
            max_requests: config.max_requests,
            max_pending: config.max_pending_requests,
            max_connections: config.max_connections,
            requests: Arc::default(),
            pending: Arc::default(),
            connections: RwLock::default(),
            overflows: Default::default(),
        }
    }

    /// A slot for one concurrent request (held until the response is done).
    pub fn try_start_request(&self) -> Result<RequestPermit, Overflow> {
        self.acquire(&self.requests, self.max_requests, Overflow::Requests)
    }

    /// A slot while the request waits for an upstream connection (drop it
    /// once a connection is obtained).
    pub fn try_queue(&self) -> Result<PendingPermit, Overflow> {
        self.acquire(&self.pending, self.max_pending, Overflow::Pending)
    }

    /// A slot for one new connection to `ep` (held while the connection is
    /// open). Only needed for protocols that open a connection per
    /// concurrent request (HTTP/1.1).
    pub fn try_connect(&self, ep: SocketAddr) -> Result<ConnectionPermit, Overflow> {
        let counter = self.connection_counter(ep);
        self.acquire(&counter, self.max_connections, Overflow::Connections)
    }

    /// For a request that needs a new connection to `ep` (HTTP/1.1 has no
    /// idle one): a connection slot, or else a place among the requests
    /// waiting for one; past both limits, the pending overflow.
    pub fn connect_or_queue(&self, ep: SocketAddr) -> Result<Admission, Overflow> {
        let counter = self.connection_counter(ep);
        if let Some(permit) = take(&counter, self.max_connections) {
            return Ok(Admission::Connect(permit));
        }
        self.try_queue().map(Admission::Wait)
    }

    /// For a request already waiting: a connection slot if one freed up
    /// (not counted as an overflow when none has).
    pub fn try_connect_waiting(&self, ep: SocketAddr) -> Option<ConnectionPermit> {
        take(&self.connection_counter(ep), self.max_connections)
    }

    /// Forgets connection counters of endpoints not in `endpoints`.
    pub fn retain(&self, endpoints: &[SocketAddr]) {
        self.connections
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|ep, _| endpoints.contains(ep));
    }

    pub fn active_requests(&self) -> u32 {
        self.requests.load(Ordering::Acquire)
    }

    pub fn pending_requests(&self) -> u32 {
        self.pending.load(Ordering::Acquire)
    }

    pub fn connections(&self, ep: &SocketAddr) -> u32 {
        self.read_connections()
            .get(ep)
            .map_or(0, |c| c.load(Ordering::Acquire))
    }

    /// Requests turned away for `reason` so far (a counter for metrics).
    pub fn overflows_total(&self, reason: Overflow) -> u64 {
        self.overflows[reason as usize].load(Ordering::Relaxed)
    }

    fn acquire(
        &self,
        counter: &Arc<AtomicU32>,
        max: Option<u32>,
        reason: Overflow,
    ) -> Result<Permit, Overflow> {
        take(counter, max).ok_or_else(|| {
            self.overflows[reason as usize].fetch_add(1, Ordering::Relaxed);
            reason
        })
    }

    fn connection_counter(&self, ep: SocketAddr) -> Arc<AtomicU32> {
        if let Some(counter) = self.read_connections().get(&ep) {
            return counter.clone();
        }
        self.connections
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(ep)
            .or_default()
            .clone()
    }

    fn read_connections(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, HashMap<SocketAddr, Arc<AtomicU32>>> {
        self.connections.read().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::test_support::addrs;

    fn limits(conns: Option<u32>, pending: Option<u32>, requests: Option<u32>) -> Limits {
        Limits::new(&ConnectionLimits {
            max_connections: conns,
            max_pending_requests: pending,
            max_requests: requests,
        })
    }

    #[test]
    fn past_max_connections_requests_queue_up_to_max_pending() {
        let ep = addrs(1)[0];
        let l = limits(Some(1), Some(1), None);
        let conn = match l.connect_or_queue(ep) {
            Ok(Admission::Connect(p)) => p,
            other => panic!("want a connection slot, got {other:?}"),
        };
        let waiting = match l.connect_or_queue(ep) {
            Ok(Admission::Wait(p)) => p,
            other => panic!("want a place in the queue, got {other:?}"),
        };
        assert!(matches!(l.connect_or_queue(ep), Err(Overflow::Pending)));
        assert_eq!(l.overflows_total(Overflow::Pending), 1);
        assert!(l.try_connect_waiting(ep).is_none());
        drop(conn);
        assert!(
            l.try_connect_waiting(ep).is_some(),
            "the freed slot goes to the waiter"
        );
        drop(waiting);
        assert_eq!(l.pending_requests(), 0);
        assert_eq!(
            l.overflows_total(Overflow::Connections),
            0,
            "queueing is no overflow"
        );
    }

    #[test]
    fn max_requests_caps_concurrency_and_permits_release_on_drop() {
        let l = limits(None, None, Some(2));
        let a = l.try_start_request().unwrap();
        let b = l.try_start_request().unwrap();
        assert_eq!(l.try_start_request().unwrap_err(), Overflow::Requests);
        assert_eq!(l.active_requests(), 2);
        drop(a);
        let c = l.try_start_request().unwrap();
        assert_eq!(l.overflows_total(Overflow::Requests), 1);
        drop((b, c));
        assert_eq!(l.active_requests(), 0);
    }

    #[test]
    fn pending_is_counted_apart_from_requests() {
        let l = limits(None, Some(1), Some(10));
        let _req = l.try_start_request().unwrap();
        let queued = l.try_queue().unwrap();
        assert_eq!(l.try_queue().unwrap_err(), Overflow::Pending);
        assert_eq!(l.pending_requests(), 1);
        drop(queued);
        assert!(l.try_queue().is_ok());
        assert_eq!(l.overflows_total(Overflow::Pending), 1);
        assert_eq!(l.overflows_total(Overflow::Requests), 0);
    }

    #[test]
    fn connections_are_capped_per_endpoint() {
        let eps = addrs(2);
        let l = limits(Some(1), None, None);
        let c0 = l.try_connect(eps[0]).unwrap();
        assert_eq!(l.try_connect(eps[0]).unwrap_err(), Overflow::Connections);
        let _c1 = l.try_connect(eps[1]).unwrap();
        assert_eq!(l.connections(&eps[0]), 1);
        drop(c0);
        assert_eq!(l.connections(&eps[0]), 0);
        assert!(l.try_connect(eps[0]).is_ok());
    }

    #[test]
    fn retain_prunes_vanished_endpoints_and_old_permits_stay_safe() {
        let eps = addrs(2);
        let l = limits(Some(1), None, None);
        let c1 = l.try_connect(eps[1]).unwrap();
        let _c0 = l.try_connect(eps[0]).unwrap();
        l.retain(&eps[..1]);
        assert_eq!(l.connections(&eps[0]), 1);
        assert_eq!(l.connections(&eps[1]), 0);
        drop(c1);
    }

    #[test]
    fn unset_limits_are_unlimited_and_zero_closes() {
        let l = Limits::default();
        let permits: Vec<_> = (0..1000).map(|_| l.try_start_request().unwrap()).collect();
        assert_eq!(l.active_requests(), 1000);
        drop(permits);
        let closed = limits(Some(0), Some(0), Some(0));
        assert_eq!(closed.try_start_request().unwrap_err(), Overflow::Requests);
        assert_eq!(closed.try_queue().unwrap_err(), Overflow::Pending);
        assert_eq!(
            closed.try_connect(addrs(1)[0]).unwrap_err(),
            Overflow::Connections
        );
    }

    #[test]
    fn overflow_labels() {
        assert_eq!(Overflow::Requests.as_str(), "requests");
        assert_eq!(Overflow::Pending.as_str(), "pending");
        assert_eq!(Overflow::Connections.as_str(), "connections");
        assert!(Overflow::Requests.to_string().contains("max_requests"));
        assert_eq!(OVERFLOW_HEADER, "x-weft-overflow");
    }

    #[test]
    fn limit_holds_under_contention() {
        let l = Arc::new(limits(None, None, Some(3)));
        let peak = Arc::new(AtomicU32::new(0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (l, peak) = (l.clone(), peak.clone());
                std::thread::spawn(move || {
                    for _ in 0..5000 {
                        if let Ok(permit) = l.try_start_request() {
                            peak.fetch_max(l.active_requests(), Ordering::Relaxed);
                            drop(permit);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert!(peak.load(Ordering::Relaxed) <= 3);
        assert_eq!(l.active_requests(), 0);
    }
}
