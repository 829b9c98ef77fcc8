//! Workload certificates for the identities this process serves, renewed in
//! the background ahead of expiry.
//!
//! Each identity has one worker task: it asks the CA once when the identity
//! is first needed, then again at half of the remaining lifetime of every
//! certificate it receives, retrying with backoff while the CA refuses or is
//! unreachable. Callers never trigger a request themselves: concurrent
//! first callers wait for the same answer (one CSR), and later callers get
//! the current certificate at once. A failed renewal keeps serving the
//! current certificate until it expires. When the mesh's signing root
//! changes (the first root of a new trust bundle: a rotation), every
//! certificate that does not chain to it is renewed at once, so workloads
//! move to the new root early in the overlap rather than at their next
//! renewal.

mod provider;
mod trust;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Notify};
use tracing::{info, warn};
use weft_api::Identity;
use weft_pki::WorkloadCert;

pub use provider::{BoxFuture, CertProvider, IdentityError, LocalCaProvider};
pub use trust::TrustRoots;

/// When and how often the workers ask.
#[derive(Clone, Copy, Debug)]
pub struct RenewalPolicy {
    /// A certificate is renewed once this fraction of the lifetime it had
    /// left on arrival has passed.
    pub renew_fraction: f64,
    /// First retry after a failure; doubles up to `max_retry`.
    pub min_retry: Duration,
    pub max_retry: Duration,
}

impl Default for RenewalPolicy {
    fn default() -> Self {
        Self {
            renew_fraction: 0.5,
            min_retry: Duration::from_millis(200),
            max_retry: Duration::from_secs(10),
        }
    }
}

/// What one identity has now.
#[derive(Clone, Default)]
struct Slot {
    cert: Option<WorkloadCert>,
    /// The last attempt's failure, cleared by a success.
    error: Option<IdentityError>,
    renew_at: Option<SystemTime>,
}

struct Entry {
    slot: Arc<watch::Sender<Slot>>,
    /// Wakes the worker before its timer (renew now).
    wake: Arc<Notify>,
    worker: tokio::task::AbortHandle,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.worker.abort();
    }
}

/// Counters for tests and the operator.
#[derive(Debug, Default)]
pub struct CertStats {
    /// Requests sent to the CA (CSRs).
    pub requests: AtomicU64,
    /// Certificates received.
    pub issued: AtomicU64,
    /// Requests that failed.
    pub failures: AtomicU64,
}

/// One certificate's state, for `/config_dump` and metrics.
#[derive(Clone, Debug)]
pub struct CertStatus {
    pub identity: Identity,
    pub not_before: Option<SystemTime>,
    pub not_after: Option<SystemTime>,
    pub renew_at: Option<SystemTime>,
    pub last_error: Option<String>,
}

pub struct CertManager {
    provider: Arc<dyn CertProvider>,
    trust: TrustRoots,
    policy: RenewalPolicy,
    entries: Mutex<HashMap<Identity, Entry>>,
    stats: Arc<CertStats>,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager").finish_non_exhaustive()
    }
}

impl CertManager {
    /// `trust` is where the provider delivers the mesh roots; TLS
    /// configurations read it from here.
    pub fn new(provider: Arc<dyn CertProvider>, trust: TrustRoots) -> Arc<Self> {
        Self::with_policy(provider, trust, RenewalPolicy::default())
    }

    pub fn with_policy(
        provider: Arc<dyn CertProvider>,
        trust: TrustRoots,
        policy: RenewalPolicy,
    ) -> Arc<Self> {
        Arc::new(Self {
            provider,
            trust,
            policy,
            entries: Mutex::new(HashMap::new()),
            stats: Arc::default(),
        })
    }

    pub fn trust(&self) -> &TrustRoots {
        &self.trust
    }

    pub fn stats(&self) -> &CertStats {
        &self.stats
    }

    /// The current certificate for `id`. The first call for an identity
    /// starts its worker and waits for the CA's first answer; afterwards
    /// the answer is immediate: the valid certificate, or (once it has
    /// expired and renewals keep failing) the last failure.
    pub async fn fetch(self: &Arc<Self>, id: &Identity) -> Result<WorkloadCert, IdentityError> {
        let mut rx = {
            let mut entries = self.lock();
            let entry = self.entry(&mut entries, id);
            let slot = entry.slot.borrow();
            if let Some(answer) = answer(&slot, SystemTime::now()) {
                return answer;
            }
            entry.slot.subscribe()
        };
        loop {
            if rx.changed().await.is_err() {
                return Err(IdentityError::Unavailable(format!(
                    "{id} is no longer managed (its workloads left this node)"
                )));
            }
            if let Some(answer) = answer(&rx.borrow_and_update(), SystemTime::now()) {
                return answer;
            }
        }
    }

    /// Starts managing `id` without waiting: its certificate is requested
    /// now, ahead of the first connection that needs it.
    pub fn ensure(self: &Arc<Self>, id: &Identity) {
        let mut entries = self.lock();
        self.entry(&mut entries, id);
    }

    /// Renews every certificate now (the mesh's signing root changed, say).
    pub fn renew_all(&self) {
        for entry in self.lock().values() {
            entry.wake.notify_one();
        }
    }

    /// Stops managing identities for which `keep` is false (no workload of
    /// this node has them any more); their workers stop asking the CA.
    pub fn retain(&self, mut keep: impl FnMut(&Identity) -> bool) {
        self.lock().retain(|id, _| keep(id));
    }

    /// Every managed identity, sorted.
    pub fn status(&self) -> Vec<CertStatus> {
        let mut out: Vec<CertStatus> = self
            .lock()
            .iter()
            .map(|(id, e)| {
                let slot = e.slot.borrow();
                CertStatus {
                    identity: id.clone(),
                    not_before: slot.cert.as_ref().map(|c| c.not_before),
                    not_after: slot.cert.as_ref().map(|c| c.not_after),
                    renew_at: slot.renew_at,
                    last_error: slot.error.as_ref().map(|e| e.to_string()),
                }
            })
            .collect();
        out.sort_by_key(|s| s.identity.to_string());
        out
    }

    /// The managed certificates (`identity`, `valid_from_unix`,
    /// `expires_unix`, `renew_unix`, `last_error`) as `/config_dump` shows
    /// them.
    pub fn to_json(&self) -> serde_json::Value {
        let unix = |t: Option<SystemTime>| {
            t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        self.status()
            .into_iter()
            .map(|c| {
                serde_json::json!({
                    "identity": c.identity.to_string(),
                    "valid_from_unix": unix(c.not_before),
                    "expires_unix": unix(c.not_after),
                    "renew_unix": unix(c.renew_at),
                    "last_error": c.last_error,
                })
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Identity, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry<'m>(
        self: &Arc<Self>,
        entries: &'m mut HashMap<Identity, Entry>,
        id: &Identity,
    ) -> &'m Entry {
        entries.entry(id.clone()).or_insert_with(|| {
            let slot = Arc::new(watch::Sender::new(Slot::default()));
            let wake = Arc::new(Notify::new());
            let worker = tokio::spawn(renew_loop(
                Arc::downgrade(self),
                id.clone(),
                Arc::downgrade(&slot),
                wake.clone(),
            ));
            Entry {
                slot,
                wake,
                worker: worker.abort_handle(),
            }
        })
    }
}

/// What a caller gets from `slot` now, or `None` to wait for the worker.
fn answer(slot: &Slot, now: SystemTime) -> Option<Result<WorkloadCert, IdentityError>> {
    match (&slot.cert, &slot.error) {
        (Some(cert), _) if !cert.is_expired(now) => Some(Ok(cert.clone())),
        (_, Some(error)) => Some(Err(error.clone())),
        _ => None,
    }
}

/// When to renew a certificate that arrived `now`.
fn renew_delay(cert: &WorkloadCert, now: SystemTime, policy: &RenewalPolicy) -> Duration {
    let left = cert.not_after.duration_since(now).unwrap_or(Duration::ZERO);
    left.mul_f64(policy.renew_fraction).max(policy.min_retry)
}

/// One identity's worker: ask, store, sleep until the renewal time (or a
/// wake-up), repeat. Ends when the manager or the entry goes away.
async fn renew_loop(
    manager: Weak<CertManager>,
    id: Identity,
    slot_ref: Weak<watch::Sender<Slot>>,
    wake: Arc<Notify>,
) {
    let mut backoff = None::<Duration>;
    let Some(mut roots) = manager.upgrade().map(|m| m.trust.subscribe()) else {
        return;
    };
    roots.mark_unchanged();
    loop {
        let Some(m) = manager.upgrade() else { return };
        let provider = m.provider.clone();
        let stats = m.stats.clone();
        let policy = m.policy;
        drop(m);
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let result = provider.fetch(&id).await;
        let Some(slot) = slot_ref.upgrade() else {
            return;
        };
        let now = SystemTime::now();
        let delay = match result {
            Ok(cert) => {
                stats.issued.fetch_add(1, Ordering::Relaxed);
                backoff = None;
                let delay = renew_delay(&cert, now, &policy);
                info!(
                    component = "identity",
                    identity = %id,
                    expires_in_s = cert.not_after.duration_since(now).unwrap_or_default().as_secs(),
                    renew_in_s = delay.as_secs(),
                    "certificate issued"
                );
                slot.send_modify(|s| {
                    s.cert = Some(cert);
                    s.error = None;
                    s.renew_at = Some(now + delay);
                });
                delay
            }
            Err(e) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                let delay = backoff.map_or(policy.min_retry, |b| (b * 2).min(policy.max_retry));
                backoff = Some(delay);
                let serving = slot
                    .borrow()
                    .cert
                    .as_ref()
                    .is_some_and(|c| !c.is_expired(now));
                warn!(
                    component = "identity",
                    identity = %id,
                    error = %e,
                    retry_in_ms = delay.as_millis() as u64,
                    serving_current = serving,
                    "certificate request failed"
                );
                slot.send_modify(|s| {
                    s.error = Some(e);
                    s.renew_at = Some(now + delay);
                });
                delay
            }
        };
        drop(slot);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = wake.notified() => {}
            () = new_signer(&mut roots, &slot_ref) => {
                info!(component = "identity", identity = %id, "the mesh has a new signing root; renewing now");
            }
        }
    }
}

/// Returns once the trust bundle names a new signing root (its first) that
/// the current certificate does not chain to; never while it does (or
/// while there is no certificate: the retry timer covers that).
async fn new_signer(
    roots: &mut watch::Receiver<weft_pki::TrustBundle>,
    slot: &Weak<watch::Sender<Slot>>,
) {
    loop {
        if roots.changed().await.is_err() {
            return std::future::pending().await;
        }
        let Some(signer) = roots.borrow_and_update().roots.first().cloned() else {
            continue;
        };
        let Some(slot) = slot.upgrade() else {
            return std::future::pending().await;
        };
        let stale = slot
            .borrow()
            .cert
            .as_ref()
            .is_some_and(|c| !c.chains_to(&signer));
        if stale {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_pki::LocalCa;

    /// Signs locally (with whichever root is current), counting requests,
    /// optionally slowly or failing.
    struct Counting {
        ca: Mutex<Arc<LocalCa>>,
        ttl: Duration,
        delay: Duration,
        fail: std::sync::atomic::AtomicBool,
        calls: AtomicU64,
    }

    impl CertProvider for Counting {
        fn fetch<'a>(
            &'a self,
            id: &'a Identity,
        ) -> BoxFuture<'a, Result<WorkloadCert, IdentityError>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
                if self.fail.load(Ordering::SeqCst) {
                    return Err(IdentityError::Unavailable("down".into()));
                }
                let ca = self.ca.lock().unwrap().clone();
                Ok(ca.sign(id, self.ttl).expect("sign"))
            })
        }
    }

    fn counting(ttl: Duration, delay: Duration) -> Arc<Counting> {
        Arc::new(Counting {
            ca: Mutex::new(Arc::new(LocalCa::generate("cluster.local").unwrap())),
            ttl,
            delay,
            fail: Default::default(),
            calls: Default::default(),
        })
    }

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "shop", sa)
    }

    #[tokio::test]
    async fn concurrent_first_requests_send_one_csr() {
        let p = counting(Duration::from_secs(3600), Duration::from_millis(100));
        let m = CertManager::new(p.clone(), TrustRoots::default());
        let calls: Vec<_> = (0..50)
            .map(|_| {
                let m = m.clone();
                tokio::spawn(async move { m.fetch(&id("cart")).await })
            })
            .collect();
        let mut leaves = Vec::new();
        for c in calls {
            leaves.push(c.await.unwrap().unwrap().chain[0].clone());
        }
        assert_eq!(p.calls.load(Ordering::SeqCst), 1);
        assert!(leaves.windows(2).all(|w| w[0] == w[1]));
        // A second identity is its own request.
        m.fetch(&id("web")).await.unwrap();
        assert_eq!(p.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn renews_in_the_background_and_keeps_serving_through_failures() {
        // BACKDATE makes not_before 5 min early; renewal is timed from
        // arrival, so a 6 s certificate (5-6 s left: not_after is whole
        // seconds) renews after 2.5-3 s.
        let p = counting(Duration::from_secs(6), Duration::ZERO);
        let m = CertManager::new(p.clone(), TrustRoots::default());
        let first = m.fetch(&id("cart")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert_eq!(p.calls.load(Ordering::SeqCst), 2, "renewed once, unasked");
        let second = m.fetch(&id("cart")).await.unwrap();
        assert_ne!(first.chain[0], second.chain[0]);
        // CA down: the current certificate keeps serving until it expires
        // (at most 6 s after it arrived), then the failure is reported.
        p.fail.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(m.fetch(&id("cart")).await.is_ok(), "still valid");
        tokio::time::sleep(Duration::from_millis(5000)).await;
        assert!(matches!(
            m.fetch(&id("cart")).await,
            Err(IdentityError::Unavailable(_))
        ));
        p.fail.store(false, Ordering::SeqCst);
        m.renew_all();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(m.fetch(&id("cart")).await.is_ok(), "recovered");
        let status = m.status();
        assert_eq!(status.len(), 1);
        assert!(status[0].last_error.is_none());
    }

    #[tokio::test]
    async fn a_new_signing_root_renews_certificates_that_do_not_chain_to_it() {
        let p = counting(Duration::from_secs(3600), Duration::ZERO);
        let old = p.ca.lock().unwrap().clone();
        let new = Arc::new(LocalCa::generate("cluster.local").unwrap());
        let trust = TrustRoots::new(old.trust_bundle());
        let m = CertManager::new(p.clone(), trust.clone());
        let first = m.fetch(&id("cart")).await.unwrap();
        assert!(first.chains_to(&old.trust_bundle().roots[0]));
        // Another root added behind the signer: nothing to renew.
        trust.set(old.trust_bundle().merged(&new.trust_bundle()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(p.calls.load(Ordering::SeqCst), 1);

        // Rotation: the new signer first. Renewed at once, not at half of
        // the hour.
        *p.ca.lock().unwrap() = new.clone();
        trust.set(new.trust_bundle().merged(&old.trust_bundle()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let cert = m.fetch(&id("cart")).await.unwrap();
            if cert.chains_to(&new.trust_bundle().roots[0]) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "not renewed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(p.calls.load(Ordering::SeqCst), 2);

        // Retirement: the certificate already chains to the signer.
        trust.set(new.trust_bundle());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(p.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn retain_stops_the_worker() {
        let p = counting(Duration::from_secs(1), Duration::ZERO);
        let m = CertManager::new(p.clone(), TrustRoots::default());
        m.fetch(&id("cart")).await.unwrap();
        m.retain(|_| false);
        let before = p.calls.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(p.calls.load(Ordering::SeqCst), before);
        assert!(m.status().is_empty());
    }
}
