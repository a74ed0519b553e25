//! The table of live sessions, keyed by `Mcp-Session-Id`.
//!
//! A cheap-clone handle over a `DashMap`: lookups on the hot path (every
//! POST) touch one shard, and no guard ever escapes a method, so no caller can
//! hold one across an `.await`. The count of sessions is kept apart in an
//! atomic so the `MAX_SESSIONS` cap is exact under concurrent `initialize`s.
//! Sessions the warm pool started count too, but clients find only claimed
//! ones ([`Sessions::get`]); their runners and the sweeper find all
//! ([`Sessions::get_any`]). With instances sharing Redis, a place is also
//! taken in the shared count ([`Sessions::admit`]) and given back with the
//! local one.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use crate::cluster::{Cluster, ClusterError};
use crate::session::SessionHandle;

/// Live sessions.
#[derive(Clone)]
pub struct Sessions {
    map: Arc<DashMap<String, SessionHandle>>,
    count: Arc<AtomicUsize>,
    max: usize,
    cluster: Option<Arc<Cluster>>,
}

/// A place in the table, reserved before a session exists so the cap holds.
/// Dropping it unused gives the place back.
pub struct Reservation {
    count: Arc<AtomicUsize>,
    used: bool,
    /// The place in the shared count, and the session it is for.
    shared: Option<(Arc<Cluster>, String)>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.used {
            return;
        }
        self.count.fetch_sub(1, Ordering::AcqRel);
        if let Some((cluster, id)) = self.shared.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            // Redis being down now costs nothing: the entry lapses by itself.
            runtime.spawn(async move {
                if let Err(e) = cluster.release(&id).await {
                    tracing::debug!("session left the directory only by lapsing: {e}");
                }
            });
        }
    }
}

impl Reservation {
    /// Gives back only the place here: the session goes on at another
    /// instance, which holds the shared place from now on.
    pub fn keep_shared_place(&mut self) {
        self.shared = None;
    }
}

/// Why no place was given.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("the gateway already runs its maximum of {0} sessions (MAX_SESSIONS); retry when one ends")]
    Full(usize),
    #[error(transparent)]
    Shared(#[from] ClusterError),
}

impl Sessions {
    pub fn new(max: usize, cluster: Option<Arc<Cluster>>) -> Self {
        Self { map: Arc::default(), count: Arc::default(), max, cluster }
    }

    /// Reserves room for one more session here, or `None` at the cap.
    pub fn reserve(&self) -> Option<Reservation> {
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1))
            .ok()
            .map(|_| Reservation { count: self.count.clone(), used: false, shared: None })
    }

    /// Reserves room for session `id`: here, and with instances sharing
    /// Redis, under the cap of them all (which also records this instance as
    /// the session's owner).
    pub async fn admit(&self, id: &str, server: Option<&str>) -> Result<Reservation, Refusal> {
        let mut reservation = self.reserve().ok_or(Refusal::Full(self.max))?;
        if let Some(cluster) = &self.cluster {
            cluster.admit(id, server).await?;
            reservation.shared = Some((cluster.clone(), id.to_owned()));
        }
        Ok(reservation)
    }

    /// Reserves room here for session `id`, taken over from another
    /// instance: its place in the shared count is already held.
    pub fn reserve_for_adopted(&self, id: &str) -> Option<Reservation> {
        let mut reservation = self.reserve()?;
        reservation.shared = self.cluster.clone().map(|cluster| (cluster, id.to_owned()));
        Some(reservation)
    }

    /// Adds a session in a reserved place.
    pub fn insert(&self, mut reservation: Reservation, handle: SessionHandle) {
        reservation.used = true;
        self.map.insert(handle.id().to_owned(), handle);
    }

    /// A session a client may use: claimed, not waiting in the pool.
    pub fn get(&self, id: &str) -> Option<SessionHandle> {
        self.get_any(id).filter(SessionHandle::is_claimed)
    }

    /// A session, claimed or still in the pool.
    pub fn get_any(&self, id: &str) -> Option<SessionHandle> {
        self.map.get(id).map(|entry| entry.value().clone())
    }

    /// Sessions clients have (not the pool's).
    pub fn claimed(&self) -> usize {
        self.map.iter().filter(|entry| entry.value().is_claimed()).count()
    }

    /// Removes a session; its id answers 404 from now on. Its place in the
    /// count comes back when the returned reservation drops: after its
    /// runner is gone, so `MAX_SESSIONS` bounds runners (dynos) too.
    pub fn remove(&self, id: &str) -> Option<Reservation> {
        let shared = self.cluster.clone().map(|cluster| (cluster, id.to_owned()));
        self.map.remove(id).map(|_| Reservation { count: self.count.clone(), used: false, shared })
    }

    /// Requests waiting for an answer, across all sessions.
    pub fn in_flight(&self) -> usize {
        self.map.iter().map(|entry| entry.value().in_flight()).sum()
    }

    /// Every session now, claimed or in the pool.
    pub fn handles(&self) -> Vec<SessionHandle> {
        self.map.iter().map(|entry| entry.value().clone()).collect()
    }

    /// Sessions whose standalone (GET) stream a client is reading.
    pub fn get_streams_open(&self) -> usize {
        self.map.iter().filter(|entry| entry.value().streams().standalone().has_reader()).count()
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

/// A fresh random identifier: 128 bits from the OS, as 32 hex digits
/// (visible ASCII, as MCP requires of session ids).
pub fn random_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_respect_the_cap_and_come_back_when_dropped() {
        let sessions = Sessions::new(2, None);
        let a = sessions.reserve().unwrap();
        let _b = sessions.reserve().unwrap();
        assert!(sessions.reserve().is_none());
        drop(a);
        assert!(sessions.reserve().is_some());
    }

    #[test]
    fn random_ids_are_long_and_distinct() {
        let a = random_id();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, random_id());
        // The shape logs recognise, so they show a prefix and not `?`.
        assert_eq!(dynogate_shared::names::log_id(&a), &a[..8]);
    }
}
