//! When a failed attempt may be sent again, how long to wait first, and the
//! service-wide budget that stops retries from multiplying load when an
//! upstream is already struggling.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::Method;
use rand::Rng;
use weft_api::model::{Retry, RetryBudget as RetryBudgetConfig};

/// Status codes retried when a `Retry` names none (Gateway API's examples).
pub const DEFAULT_RETRY_CODES: [u16; 4] = [500, 502, 503, 504];
/// Base backoff when a `Retry` sets none.
pub const DEFAULT_BASE_BACKOFF: Duration = Duration::from_millis(25);
/// The backoff ceiling is this many times the base (Envoy's default).
const BACKOFF_CAP_FACTOR: u32 = 10;

/// How one attempt ended, as far as retrying is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No connection to the endpoint: the request never left the waypoint.
    ConnectFailed,
    /// The connection or stream was reset after the request was (maybe) sent.
    Reset,
    /// The upstream answered with this status.
    Status(u16),
    /// The per-try timeout fired.
    Timeout,
    /// The service's circuit breaker turned the attempt away before it was
    /// sent: the overload is the answer (never retried, never the
    /// endpoint's fault).
    Overflow,
}

impl Outcome {
    /// Whether this counts against the endpoint for outlier detection: any
    /// 5xx, a connect failure, a reset or a timeout (the endpoint, not the
    /// request, is the likely culprit).
    pub fn is_endpoint_failure(&self) -> bool {
        match *self {
            Outcome::Status(code) => (500..=599).contains(&code),
            Outcome::ConnectFailed | Outcome::Reset | Outcome::Timeout => true,
            Outcome::Overflow => false,
        }
    }
}

/// A route rule's retry settings, resolved once when the route is built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    codes: Vec<u16>,
    attempts: u32,
    base_backoff: Duration,
    max_backoff: Duration,
    non_idempotent: bool,
}

impl Default for RetryPolicy {
    /// No retries at all: Gateway API retries only when a rule asks for it.
    fn default() -> Self {
        Self::from_config(None)
    }
}

impl RetryPolicy {
    /// `None` gives a policy with zero attempts (the rule has no retry).
    /// Codes outside 100-599 cannot be HTTP statuses and are dropped.
    pub fn from_config(retry: Option<&Retry>) -> Self {
        let Some(retry) = retry else {
            return Self {
                codes: DEFAULT_RETRY_CODES.to_vec(),
                attempts: 0,
                base_backoff: DEFAULT_BASE_BACKOFF,
                max_backoff: DEFAULT_BASE_BACKOFF * BACKOFF_CAP_FACTOR,
                non_idempotent: false,
            };
        };
        let mut codes: Vec<u16> = retry
            .codes
            .iter()
            .copied()
            .filter(|c| (100..=599).contains(c))
            .collect();
        if codes.is_empty() {
            codes = DEFAULT_RETRY_CODES.to_vec();
        }
        codes.sort_unstable();
        codes.dedup();
        let base_backoff = retry
            .backoff_ms
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_BASE_BACKOFF);
        Self {
            codes,
            attempts: retry.attempts,
            base_backoff,
            max_backoff: base_backoff.saturating_mul(BACKOFF_CAP_FACTOR),
            non_idempotent: retry.non_idempotent,
        }
    }

    /// Retries allowed after the first attempt.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Whether `outcome` may be retried for a request with `method`.
    ///
    /// A connect failure is always retryable: nothing reached the upstream.
    /// A reset, a timeout or a listed status may mean the upstream acted on
    /// the request, so those are retried only for idempotent methods (RFC
    /// 9110 section 9.2.2: GET, HEAD, OPTIONS, PUT, DELETE, TRACE) unless the
    /// rule opted in with `non_idempotent`. This does not look at the
    /// attempt count or the budget; the caller checks those.
    pub fn is_retryable(&self, method: &Method, outcome: &Outcome) -> bool {
        let replay_safe = self.non_idempotent || is_idempotent(method);
        match *outcome {
            Outcome::ConnectFailed => true,
            Outcome::Overflow => false,
            Outcome::Reset | Outcome::Timeout => replay_safe,
            Outcome::Status(code) => replay_safe && self.codes.binary_search(&code).is_ok(),
        }
    }

    /// The upper bound of the wait before retry number `attempt` (1 for the
    /// first retry): base x 2^(attempt-1), capped at 10 x base.
    pub fn backoff_ceiling(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.base_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
    }

    /// The wait before retry number `attempt`: uniform in
    /// `[0, backoff_ceiling(attempt)]` ("full jitter"), so that clients that
    /// failed together do not retry together.
    pub fn backoff(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.backoff_ceiling(attempt);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.gen_range(0..=nanos))
    }
}

/// Free-function form of [`RetryPolicy::is_retryable`].
pub fn is_retryable(method: &Method, outcome: &Outcome, policy: &RetryPolicy) -> bool {
    policy.is_retryable(method, outcome)
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Length of the window retries are counted over.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
const BUDGET_SLOTS: usize = 10;
const SLOT_SECS: u64 = BUDGET_WINDOW.as_secs() / BUDGET_SLOTS as u64;

/// Caps retries for one service over a sliding window of [`BUDGET_WINDOW`]
/// (kept as ten one-second slots, so the window slides in one-second steps).
///
/// A retry is allowed while, counting it, the retries in the window stay
/// within `max(min_retries_per_second x 10 s, percent% of requests in the
/// window)`. Original requests are recorded with [`record_request`]; retries
/// are counted only by [`try_retry`] and are not requests themselves, so a
/// 20% budget means at most one retry per five original requests.
///
/// [`record_request`]: RetryBudget::record_request
/// [`try_retry`]: RetryBudget::try_retry
#[derive(Debug)]
pub struct RetryBudget {
    percent: u64,
    min_per_window: u64,
    origin: Instant,
    slots: Mutex<[Slot; BUDGET_SLOTS]>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    /// Which second (since `origin`) these counts belong to.
    second: u64,
    requests: u64,
    retries: u64,
}

impl RetryBudget {
    /// `None` uses the model's default budget (20%, at least 10 per second):
    /// an unbounded budget would let retries triple the load on an upstream
    /// that is already failing.
    pub fn new(config: Option<&RetryBudgetConfig>, now: Instant) -> Self {
        let default = RetryBudgetConfig::default();
        let config = config.unwrap_or(&default);
        Self {
            percent: u64::from(config.percent),
            min_per_window: u64::from(config.min_retries_per_second) * BUDGET_WINDOW.as_secs(),
            origin: now,
            slots: Mutex::new([Slot::default(); BUDGET_SLOTS]),
        }
    }

    /// Counts one original (non-retry) request.
    pub fn record_request(&self, now: Instant) {
        let second = self.second(now);
        let mut slots = self.lock();
        current_slot(&mut slots, second).requests += 1;
    }

    /// Whether one more retry fits the budget; if so it is counted.
    pub fn try_retry(&self, now: Instant) -> bool {
        let second = self.second(now);
        let mut slots = self.lock();
        let (requests, retries) = window_totals(&slots, second);
        let allowed = self.min_per_window.max(requests * self.percent / 100);
        if retries + 1 > allowed {
            return false;
        }
        current_slot(&mut slots, second).retries += 1;
        true
    }

    /// (requests, retries) in the window ending at `now`, for metrics.
    pub fn window(&self, now: Instant) -> (u64, u64) {
        let second = self.second(now);
        window_totals(&self.lock(), second)
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs() / SLOT_SECS
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [Slot; BUDGET_SLOTS]> {
        // Counters stay meaningful even if a holder panicked mid-update.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn current_slot(slots: &mut [Slot; BUDGET_SLOTS], second: u64) -> &mut Slot {
    let slot = &mut slots[(second % BUDGET_SLOTS as u64) as usize];
    if slot.second != second {
        *slot = Slot {
            second,
            ..Slot::default()
        };
    }
    slot
}

fn window_totals(slots: &[Slot; BUDGET_SLOTS], second: u64) -> (u64, u64) {
    slots
        .iter()
        .filter(|s| s.second <= second && second - s.second < BUDGET_SLOTS as u64)
        .fold((0, 0), |(req, ret), s| (req + s.requests, ret + s.retries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn retry(codes: &[u16], backoff_ms: Option<u64>, non_idempotent: bool) -> Retry {
        Retry {
            codes: codes.to_vec(),
            attempts: 3,
            backoff_ms,
            non_idempotent,
        }
    }

    #[test]
    fn endpoint_failures_for_outlier_detection() {
        for outcome in [
            Outcome::ConnectFailed,
            Outcome::Reset,
            Outcome::Timeout,
            Outcome::Status(500),
            Outcome::Status(503),
        ] {
            assert!(outcome.is_endpoint_failure(), "{outcome:?}");
        }
        for code in [200, 404, 429] {
            assert!(!Outcome::Status(code).is_endpoint_failure());
        }
    }

    #[test]
    fn no_config_means_no_retries() {
        let policy = RetryPolicy::from_config(None);
        assert_eq!(policy.attempts(), 0);
        assert_eq!(RetryPolicy::default(), policy);
    }

    #[test]
    fn connect_failure_is_retryable_for_any_method() {
        let policy = RetryPolicy::from_config(Some(&retry(&[], None, false)));
        for method in [Method::GET, Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(
                policy.is_retryable(&method, &Outcome::ConnectFailed),
                "{method}"
            );
        }
    }

    #[test]
    fn reset_timeout_and_5xx_only_for_idempotent_methods() {
        let policy = RetryPolicy::from_config(Some(&retry(&[], None, false)));
        let idempotent = [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
            Method::TRACE,
        ];
        for outcome in [Outcome::Reset, Outcome::Timeout, Outcome::Status(503)] {
            for method in &idempotent {
                assert!(
                    policy.is_retryable(method, &outcome),
                    "{method} {outcome:?}"
                );
            }
            for method in [Method::POST, Method::PATCH] {
                assert!(
                    !policy.is_retryable(&method, &outcome),
                    "{method} {outcome:?}"
                );
            }
        }
    }

    #[test]
    fn non_idempotent_opt_in_retries_post() {
        let policy = RetryPolicy::from_config(Some(&retry(&[], None, true)));
        assert!(policy.is_retryable(&Method::POST, &Outcome::Reset));
        assert!(policy.is_retryable(&Method::PATCH, &Outcome::Status(502)));
        assert!(!policy.is_retryable(&Method::POST, &Outcome::Status(501)));
    }

    #[test]
    fn default_codes_are_500_502_503_504() {
        let policy = RetryPolicy::from_config(Some(&retry(&[], None, false)));
        for code in [500, 502, 503, 504] {
            assert!(policy.is_retryable(&Method::GET, &Outcome::Status(code)));
        }
        for code in [200, 404, 429, 501, 505] {
            assert!(!policy.is_retryable(&Method::GET, &Outcome::Status(code)));
        }
    }

    #[test]
    fn configured_codes_replace_the_defaults_and_bogus_codes_are_dropped() {
        let policy = RetryPolicy::from_config(Some(&retry(&[503, 429, 0, 1000], None, false)));
        assert!(policy.is_retryable(&Method::GET, &Outcome::Status(503)));
        assert!(policy.is_retryable(&Method::GET, &Outcome::Status(429)));
        assert!(!policy.is_retryable(&Method::GET, &Outcome::Status(500)));
        // Only bogus codes: back to the defaults rather than retrying nothing.
        let policy = RetryPolicy::from_config(Some(&retry(&[0, 700], None, false)));
        assert!(policy.is_retryable(&Method::GET, &Outcome::Status(500)));
        assert!(is_retryable(&Method::GET, &Outcome::Status(502), &policy));
    }

    #[test]
    fn backoff_ceiling_doubles_and_caps_at_ten_times_base() {
        let policy = RetryPolicy::from_config(Some(&retry(&[], None, false)));
        let ms = |a| policy.backoff_ceiling(a).as_millis();
        assert_eq!(
            [ms(1), ms(2), ms(3), ms(4), ms(5), ms(100)],
            [25, 50, 100, 200, 250, 250]
        );
        let policy = RetryPolicy::from_config(Some(&retry(&[], Some(100), false)));
        assert_eq!(policy.backoff_ceiling(1), Duration::from_millis(100));
        assert_eq!(policy.backoff_ceiling(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn zero_backoff_never_waits() {
        let policy = RetryPolicy::from_config(Some(&retry(&[], Some(0), false)));
        let mut rng = StdRng::seed_from_u64(1);
        for attempt in 1..10 {
            assert_eq!(policy.backoff(attempt, &mut rng), Duration::ZERO);
        }
    }

    #[test]
    fn backoff_is_full_jitter_below_the_ceiling() {
        let policy = RetryPolicy::from_config(Some(&retry(&[], None, false)));
        let mut rng = StdRng::seed_from_u64(7);
        let ceiling = policy.backoff_ceiling(3);
        let samples: Vec<Duration> = (0..2000).map(|_| policy.backoff(3, &mut rng)).collect();
        assert!(samples.iter().all(|d| *d <= ceiling));
        let below_half = samples.iter().filter(|d| **d < ceiling / 2).count();
        // Uniform: about half below the midpoint (binomial sd ~22 for 2000).
        assert!((850..1150).contains(&below_half), "{below_half}");
    }

    fn budget(percent: u32, min_retries_per_second: u32, now: Instant) -> RetryBudget {
        RetryBudget::new(
            Some(&RetryBudgetConfig {
                percent,
                min_retries_per_second,
            }),
            now,
        )
    }

    #[test]
    fn budget_allows_the_minimum_without_traffic() {
        let t0 = Instant::now();
        let budget = budget(20, 1, t0);
        for _ in 0..10 {
            assert!(budget.try_retry(t0));
        }
        assert!(!budget.try_retry(t0));
        assert_eq!(budget.window(t0), (0, 10));
    }

    #[test]
    fn budget_scales_with_requests() {
        let t0 = Instant::now();
        let budget = budget(20, 0, t0);
        for _ in 0..100 {
            budget.record_request(t0);
        }
        let allowed = (0..50).filter(|_| budget.try_retry(t0)).count();
        assert_eq!(allowed, 20);
    }

    #[test]
    fn budget_window_slides() {
        let t0 = Instant::now();
        let budget = budget(50, 0, t0);
        for _ in 0..10 {
            budget.record_request(t0);
        }
        assert_eq!((0..10).filter(|_| budget.try_retry(t0)).count(), 5);
        // Nine seconds on the old requests and retries still count.
        let t9 = t0 + Duration::from_secs(9);
        assert!(!budget.try_retry(t9));
        // Ten seconds on they have left the window.
        let t10 = t0 + Duration::from_secs(10);
        assert_eq!(budget.window(t10), (0, 0));
        assert!(!budget.try_retry(t10), "no requests, no minimum: no retry");
        budget.record_request(t10);
        budget.record_request(t10);
        assert!(budget.try_retry(t10));
        assert!(!budget.try_retry(t10));
    }

    #[test]
    fn budget_without_config_uses_model_defaults() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(None, t0);
        // 10 per second over a 10 s window.
        assert_eq!((0..200).filter(|_| budget.try_retry(t0)).count(), 100);
    }

    #[test]
    fn budget_ignores_time_before_its_origin() {
        let t0 = Instant::now() + Duration::from_secs(5);
        let budget = budget(100, 0, t0);
        budget.record_request(t0 - Duration::from_secs(3));
        assert!(budget.try_retry(t0));
    }

    #[test]
    fn budget_is_safe_across_threads() {
        let t0 = Instant::now();
        let budget = std::sync::Arc::new(budget(10, 0, t0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        budget.record_request(t0);
                    }
                    (0..1000).filter(|_| budget.try_retry(t0)).count()
                })
            })
            .collect();
        let granted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        // Whatever the interleaving, never more than 10% of the final 4000.
        assert!(granted <= 400, "{granted}");
        assert_eq!(budget.window(t0).0, 4000);
    }
}
