//! Connection pool: CONNECT streams to the same key (for the mesh: source
//! identity, destination identity, destination node) share HTTP/2
//! connections. A new connection is dialled only when every existing one
//! carries `max_streams_per_connection` streams; concurrent callers for a
//! key wait for a single dial; closed connections are dropped and idle ones
//! closed after `idle_timeout`.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use crate::client::HboneConnection;
use crate::error::HboneError;
use crate::stream::{H2Stream, StreamSlot};

pub struct Pool<K: Hash + Eq + Clone + Send + Sync + 'static> {
    inner: Arc<PoolInner<K>>,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Clone for Pool<K> {
    fn clone(&self) -> Self {
        Pool {
            inner: self.inner.clone(),
        }
    }
}

struct PoolInner<K> {
    max_streams: usize,
    idle_timeout: Duration,
    entries: Mutex<HashMap<K, Entry>>,
}

struct Entry {
    conns: Vec<HboneConnection>,
    /// Held while dialling; waiters queue on it instead of dialling too.
    dial_lock: Arc<tokio::sync::Mutex<()>>,
    /// Bumped by every finished dial, so a waiter can tell a dial happened.
    dial_generation: u64,
    last_dial_error: Option<Arc<HboneError>>,
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            conns: Vec::new(),
            dial_lock: Arc::new(tokio::sync::Mutex::new(())),
            dial_generation: 0,
            last_dial_error: None,
        }
    }
}

impl Entry {
    fn prune(&mut self, idle_timeout: Duration) {
        self.conns
            .retain(|c| !c.is_closed() && c.idle_for().is_none_or(|idle| idle < idle_timeout));
    }

    /// First connection with room, oldest first: packing streams onto few
    /// connections lets the others go idle and close.
    fn pick(
        &self,
        max_streams: usize,
        reserve: bool,
    ) -> Option<(HboneConnection, Option<StreamSlot>)> {
        let conn = self
            .conns
            .iter()
            .find(|c| !c.is_closed() && c.active_streams() < max_streams)?;
        let slot = reserve.then(|| conn.reserve_slot());
        Some((conn.clone(), slot))
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Pool<K> {
    /// Connections carry at most `max_streams_per_connection` streams opened
    /// through [`Pool::open`] (streams opened directly on a connection from
    /// [`Pool::get`] count too, but are not reserved atomically). A
    /// connection without streams for `idle_timeout` is closed. Called inside
    /// a Tokio runtime, a background task reaps idle connections; otherwise
    /// they are reaped on the next `get`.
    pub fn new(max_streams_per_connection: usize, idle_timeout: Duration) -> Self {
        let inner = Arc::new(PoolInner {
            max_streams: max_streams_per_connection.max(1),
            idle_timeout,
            entries: Mutex::new(HashMap::new()),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(reap_loop(Arc::downgrade(&inner)));
        }
        Pool { inner }
    }

    /// A connection for `key` with room for another stream, dialling with
    /// `dial` only if there is none (and no other caller is already dialling
    /// for this key: then this call waits and shares that dial's outcome).
    pub async fn get<F, Fut>(&self, key: &K, dial: F) -> Result<HboneConnection, HboneError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<HboneConnection, HboneError>>,
    {
        self.acquire(key, dial, false).await.map(|(conn, _)| conn)
    }

    /// Like [`Pool::get`] followed by [`HboneConnection::open`], but the
    /// stream's place on the connection is reserved before the pool lock is
    /// released, so concurrent callers never push a connection past the
    /// stream limit.
    pub async fn open<F, Fut>(
        &self,
        key: &K,
        dial: F,
        target: SocketAddr,
        headers: http::HeaderMap,
    ) -> Result<H2Stream, HboneError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<HboneConnection, HboneError>>,
    {
        let (conn, slot) = self.acquire(key, dial, true).await?;
        let slot = match slot {
            Some(slot) => slot,
            None => conn.reserve_slot(),
        };
        conn.open_with_slot(target, headers, slot).await
    }

    /// Open connections across all keys.
    pub fn len(&self) -> usize {
        self.lock()
            .values()
            .map(|e| e.conns.iter().filter(|c| !c.is_closed()).count())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every pooled connection; each closes once its streams finish.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, Entry>> {
        self.inner.lock()
    }

    async fn acquire<F, Fut>(
        &self,
        key: &K,
        dial: F,
        reserve: bool,
    ) -> Result<(HboneConnection, Option<StreamSlot>), HboneError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<HboneConnection, HboneError>>,
    {
        let max = self.inner.max_streams;
        let idle = self.inner.idle_timeout;
        let (dial_lock, generation) = {
            let mut entries = self.lock();
            let entry = entries.entry(key.clone()).or_default();
            entry.prune(idle);
            if let Some(found) = entry.pick(max, reserve) {
                return Ok(found);
            }
            (entry.dial_lock.clone(), entry.dial_generation)
        };

        let _dialing = dial_lock.lock().await;
        {
            let mut entries = self.lock();
            let entry = entries.entry(key.clone()).or_default();
            entry.prune(idle);
            if let Some(found) = entry.pick(max, reserve) {
                return Ok(found);
            }
            if entry.dial_generation != generation {
                if let Some(err) = &entry.last_dial_error {
                    return Err(HboneError::Dial(err.clone()));
                }
            }
        }

        let result = dial().await;
        let mut entries = self.lock();
        let entry = entries.entry(key.clone()).or_default();
        entry.dial_generation = entry.dial_generation.wrapping_add(1);
        match result {
            Ok(conn) => {
                entry.last_dial_error = None;
                let slot = reserve.then(|| conn.reserve_slot());
                entry.conns.push(conn.clone());
                Ok((conn, slot))
            }
            Err(err) => {
                entry.last_dial_error = Some(Arc::new(err.duplicate()));
                Err(err)
            }
        }
    }
}

impl<K> PoolInner<K> {
    fn lock(&self) -> MutexGuard<'_, HashMap<K, Entry>> {
        // A panic while holding the lock cannot leave the map inconsistent
        // (every mutation is a single insert/retain), so keep going.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reap(&self) {
        let mut entries = self.lock();
        entries.retain(|_, entry| {
            entry.prune(self.idle_timeout);
            // Keep an empty entry while someone is dialling through it.
            !entry.conns.is_empty() || Arc::strong_count(&entry.dial_lock) > 1
        });
    }
}

async fn reap_loop<K: Send + Sync + 'static>(pool: Weak<PoolInner<K>>) {
    let period = match pool.upgrade() {
        Some(p) => (p.idle_timeout / 2).max(Duration::from_millis(10)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        match pool.upgrade() {
            Some(p) => p.reap(),
            None => return,
        }
    }
}
