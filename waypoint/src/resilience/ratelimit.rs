//! Local rate limiting: a token bucket per key (everyone, a header value, or
//! a client identity), in bounded memory.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::HeaderMap;
use weft_api::model::{RateLimit, RateLimitKey};

/// Buckets kept at most by default; past that, idle ones are evicted.
pub const DEFAULT_MAX_KEYS: usize = 10_000;

/// A request over the limit, and how long until one token is back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rate limited: retry after {0:?}")]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// Value for the `Retry-After` header: whole seconds, rounded up, at
    /// least 1 (0 would invite an immediate retry that fails again).
    pub fn header_secs(&self) -> u64 {
        let secs = self.0.as_secs() + u64::from(self.0.subsec_nanos() > 0);
        secs.max(1)
    }
}

/// Token buckets for one service's `RateLimit`: each key's bucket holds up
/// to `burst` tokens (default `requests`; at least 1) and refills
/// continuously at `requests` per `period_ms`; a request takes one token.
///
/// Memory is bounded by `max_keys` buckets. When a new key arrives at the
/// bound, buckets that have refilled to full are dropped first (nothing is
/// lost: a new bucket starts full). If none are full, the least recently used
/// eighth is dropped (so the O(keys) sweep is amortised over many new keys);
/// such a key starts over with a full bucket, which an attacker cycling
/// through more than `max_keys` keys could use, but each key still gets no
/// more than its burst.
///
/// A config with `requests: 0` or `period_ms: 0` cannot describe a rate; the
/// limiter then lets everything through and says so in the log once.
#[derive(Debug)]
pub struct RateLimiter {
    /// `None`: disabled.
    rate: Option<Rate>,
    max_keys: usize,
    buckets: Mutex<HashMap<Box<str>, Bucket>>,
    limited_total: AtomicU64,
}

#[derive(Clone, Copy, Debug)]
struct Rate {
    capacity: f64,
    tokens_per_nano: f64,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Slack for float rounding, so waiting exactly the advertised Retry-After
/// is always enough.
const EPSILON: f64 = 1e-9;

impl Rate {
    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.last);
        bucket.tokens =
            (bucket.tokens + elapsed.as_nanos() as f64 * self.tokens_per_nano).min(self.capacity);
        bucket.last = bucket.last.max(now);
    }

    fn is_full(&self, bucket: &Bucket, now: Instant) -> bool {
        let mut b = *bucket;
        self.refill(&mut b, now);
        b.tokens + EPSILON >= self.capacity
    }
}

impl RateLimiter {
    pub fn new(config: &RateLimit) -> Self {
        Self::with_max_keys(config, DEFAULT_MAX_KEYS)
    }

    pub fn with_max_keys(config: &RateLimit, max_keys: usize) -> Self {
        let rate = if config.requests == 0 || config.period_ms == 0 {
            tracing::warn!(
                component = "ratelimit",
                requests = config.requests,
                period_ms = config.period_ms,
                "rate limit needs requests > 0 and period_ms > 0; not limiting"
            );
            None
        } else {
            let period_nanos = config.period_ms as f64 * 1e6;
            Some(Rate {
                capacity: f64::from(config.burst.unwrap_or(config.requests).max(1)),
                tokens_per_nano: f64::from(config.requests) / period_nanos,
            })
        };
        Self {
            rate,
            max_keys: max_keys.max(1),
            buckets: Mutex::new(HashMap::new()),
            limited_total: AtomicU64::new(0),
        }
    }

    /// Takes a token from `key`'s bucket ("" for a global limit), or says how
    /// long until one is available. Allocates only for a key not seen
    /// before.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), RetryAfter> {
        let Some(rate) = self.rate else { return Ok(()) };
        let mut buckets = self.lock();
        if !buckets.contains_key(key) {
            if buckets.len() >= self.max_keys {
                self.evict(&mut buckets, &rate, now);
            }
            buckets.insert(
                key.into(),
                Bucket {
                    tokens: rate.capacity,
                    last: now,
                },
            );
        }
        let Some(bucket) = buckets.get_mut(key) else {
            return Ok(());
        };
        rate.refill(bucket, now);
        if bucket.tokens + EPSILON >= 1.0 {
            bucket.tokens = (bucket.tokens - 1.0).max(0.0);
            return Ok(());
        }
        let missing = 1.0 - bucket.tokens;
        drop(buckets);
        self.limited_total.fetch_add(1, Ordering::Relaxed);
        let wait_nanos = (missing / rate.tokens_per_nano).ceil().max(1.0);
        Err(RetryAfter(Duration::from_nanos(wait_nanos as u64)))
    }

    /// Buckets currently held (a gauge for metrics).
    pub fn keys(&self) -> usize {
        self.lock().len()
    }

    /// Requests refused so far (a counter for metrics).
    pub fn limited_total(&self) -> u64 {
        self.limited_total.load(Ordering::Relaxed)
    }

    fn evict(&self, buckets: &mut HashMap<Box<str>, Bucket>, rate: &Rate, now: Instant) {
        buckets.retain(|_, b| !rate.is_full(b, now));
        if buckets.len() < self.max_keys {
            return;
        }
        let mut last_used: Vec<Instant> = buckets.values().map(|b| b.last).collect();
        let drop_count = (buckets.len() / 8).max(1);
        let (_, cutoff, _) = last_used.select_nth_unstable(drop_count - 1);
        let cutoff = *cutoff;
        buckets.retain(|_, b| b.last > cutoff);
        tracing::debug!(
            component = "ratelimit",
            kept = buckets.len(),
            "rate limit key table full; evicted least recently used buckets"
        );
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Box<str>, Bucket>> {
        // Buckets stay usable even if a holder panicked mid-update.
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The bucket key of a request for `key`: "" for a global limit, the first
/// value of the named header (missing: "", one shared bucket for requests
/// without it), or the client's SPIFFE identity ("" for unauthenticated
/// clients). Borrows from the request; allocates only for a header value
/// that is not valid UTF-8.
pub fn key_for<'a>(
    key: &RateLimitKey,
    headers: &'a HeaderMap,
    client_identity: Option<&'a str>,
) -> Cow<'a, str> {
    match key {
        RateLimitKey::Global => Cow::Borrowed(""),
        RateLimitKey::Header(name) => match headers.get(name.as_str()) {
            Some(value) => String::from_utf8_lossy(value.as_bytes()),
            None => Cow::Borrowed(""),
        },
        RateLimitKey::ClientIdentity => Cow::Borrowed(client_identity.unwrap_or("")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn limit(requests: u32, period_ms: u64, burst: Option<u32>) -> RateLimit {
        RateLimit {
            requests,
            period_ms,
            burst,
            key: RateLimitKey::Global,
        }
    }

    #[test]
    fn burst_then_refuse_then_refill() {
        let rl = RateLimiter::new(&limit(10, 1000, None));
        let t0 = Instant::now();
        for _ in 0..10 {
            assert!(rl.check("", t0).is_ok());
        }
        let err = rl.check("", t0).unwrap_err();
        // One token every 100 ms.
        assert_eq!(err.0, Duration::from_millis(100));
        assert_eq!(err.header_secs(), 1);
        assert!(rl.check("", t0 + Duration::from_millis(99)).is_err());
        assert!(rl.check("", t0 + Duration::from_millis(100)).is_ok());
        assert!(rl.check("", t0 + Duration::from_millis(100)).is_err());
        assert_eq!(rl.limited_total(), 3);
    }

    #[test]
    fn refill_is_continuous_and_capped_at_burst() {
        let rl = RateLimiter::new(&limit(2, 1000, Some(5)));
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(rl.check("", t0).is_ok());
        }
        assert!(rl.check("", t0).is_err());
        // 1.5 s gives 3 tokens.
        let t1 = t0 + Duration::from_millis(1500);
        assert_eq!((0..10).filter(|_| rl.check("", t1).is_ok()).count(), 3);
        // A long idle refills to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!((0..10).filter(|_| rl.check("", t2).is_ok()).count(), 5);
    }

    #[test]
    fn waiting_the_advertised_time_is_always_enough() {
        let rl = RateLimiter::new(&limit(3, 1000, Some(1)));
        let mut now = Instant::now();
        assert!(rl.check("", now).is_ok());
        for _ in 0..50 {
            let wait = rl.check("", now).unwrap_err().0;
            now += wait;
            assert!(rl.check("", now).is_ok());
        }
    }

    #[test]
    fn retry_after_header_rounds_up_to_whole_seconds() {
        let secs = |ms| RetryAfter(Duration::from_millis(ms)).header_secs();
        assert_eq!(
            [secs(0), secs(1), secs(1000), secs(1001), secs(59_999)],
            [1, 1, 1, 2, 60]
        );
        // 1 request per minute: the header says 60.
        let rl = RateLimiter::new(&limit(1, 60_000, None));
        let t0 = Instant::now();
        assert!(rl.check("", t0).is_ok());
        let err = rl.check("", t0 + Duration::from_millis(500)).unwrap_err();
        assert_eq!(err.header_secs(), 60);
    }

    #[test]
    fn keys_have_separate_buckets() {
        let rl = RateLimiter::new(&limit(1, 1000, None));
        let t0 = Instant::now();
        assert!(rl.check("alice", t0).is_ok());
        assert!(rl.check("alice", t0).is_err());
        assert!(rl.check("bob", t0).is_ok());
        assert_eq!(rl.keys(), 2);
    }

    #[test]
    fn key_table_is_bounded_and_evicts_full_buckets_first() {
        let rl = RateLimiter::with_max_keys(&limit(1, 1000, None), 4);
        let t0 = Instant::now();
        for key in ["a", "b", "c", "d"] {
            assert!(rl.check(key, t0).is_ok());
        }
        // "a" and "b" refill while "c" and "d" are drained again later.
        let t1 = t0 + Duration::from_millis(1500);
        assert!(rl.check("c", t1).is_ok());
        assert!(rl.check("d", t1).is_ok());
        assert!(rl.check("e", t1).is_ok());
        assert_eq!(rl.keys(), 3, "full buckets a and b went, e came");
        // Drained buckets were kept: c is still limited.
        assert!(rl.check("c", t1).is_err());
    }

    #[test]
    fn key_table_evicts_least_recently_used_when_none_are_full() {
        let rl = RateLimiter::with_max_keys(&limit(1, 60_000, None), 16);
        let t0 = Instant::now();
        for i in 0..16u64 {
            assert!(rl
                .check(&format!("k{i}"), t0 + Duration::from_millis(i))
                .is_ok());
        }
        assert!(rl.check("new", t0 + Duration::from_millis(100)).is_ok());
        assert_eq!(rl.keys(), 15, "16/8 = 2 oldest evicted, 1 added");
        // k0 and k1 were evicted (fresh bucket), k2 was kept (still empty).
        let t = t0 + Duration::from_millis(200);
        assert!(rl.check("k2", t).is_err());
        assert!(rl.check("k0", t).is_ok());
        for i in 0..50_000u64 {
            let _ = rl.check(&format!("flood{i}"), t);
        }
        assert!(rl.keys() <= 16);
    }

    #[test]
    fn invalid_config_does_not_limit() {
        let t0 = Instant::now();
        for config in [limit(0, 1000, None), limit(10, 0, None)] {
            let rl = RateLimiter::new(&config);
            assert!((0..100).all(|_| rl.check("", t0).is_ok()));
        }
        // burst 0 is raised to 1 rather than refusing everything.
        let rl = RateLimiter::new(&limit(1, 1000, Some(0)));
        assert!(rl.check("", t0).is_ok());
    }

    #[test]
    fn time_going_backwards_does_not_mint_tokens() {
        let rl = RateLimiter::new(&limit(1, 1000, None));
        let t0 = Instant::now() + Duration::from_secs(10);
        assert!(rl.check("", t0).is_ok());
        assert!(rl.check("", t0 - Duration::from_secs(5)).is_err());
        assert!(rl.check("", t0 + Duration::from_millis(999)).is_err());
    }

    #[test]
    fn key_for_each_kind() {
        let mut headers = HeaderMap::new();
        headers.insert("x-tenant", HeaderValue::from_static("acme"));
        headers.append("x-tenant", HeaderValue::from_static("other"));
        headers.insert("x-raw", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        let id = "spiffe://cluster.local/ns/a/sa/b";
        assert_eq!(key_for(&RateLimitKey::Global, &headers, Some(id)), "");
        assert_eq!(
            key_for(&RateLimitKey::Header("X-Tenant".into()), &headers, None),
            "acme"
        );
        assert_eq!(
            key_for(&RateLimitKey::Header("x-missing".into()), &headers, None),
            ""
        );
        assert_eq!(
            key_for(&RateLimitKey::Header("x-raw".into()), &headers, None),
            "caf\u{fffd}"
        );
        assert_eq!(
            key_for(&RateLimitKey::ClientIdentity, &headers, Some(id)),
            id
        );
        assert_eq!(key_for(&RateLimitKey::ClientIdentity, &headers, None), "");
    }

    #[test]
    fn concurrent_checks_never_exceed_the_burst() {
        let rl = std::sync::Arc::new(RateLimiter::new(&limit(100, 60_000, None)));
        let t0 = Instant::now();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let rl = rl.clone();
                std::thread::spawn(move || (0..100).filter(|_| rl.check("", t0).is_ok()).count())
            })
            .collect();
        let allowed: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(allowed, 100);
    }
}
