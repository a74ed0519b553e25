//! The table of live sessions, keyed by `Mcp-Session-Id`.
//!
//! A cheap-clone handle over a `DashMap`: lookups on the hot path (every
//! POST) touch one shard, and no guard ever escapes a method, so no caller can
//! hold one across an `.await`. The count of sessions is kept apart in an
//! atomic so the `MAX_SESSIONS` cap is exact under concurrent `initialize`s.
//! Sessions the warm pool started count too, but clients find only claimed
//! ones ([`Sessions::get`]); their runners and the sweeper find all
//! ([`Sessions::get_any`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use crate::session::SessionHandle;

/// Live sessions.
#[derive(Clone)]
pub struct Sessions {
    map: Arc<DashMap<String, SessionHandle>>,
    count: Arc<AtomicUsize>,
    max: usize,
}

/// A place in the table, reserved before a session exists so the cap holds.
/// Dropping it unused gives the place back.
pub struct Reservation {
    count: Arc<AtomicUsize>,
    used: bool,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.used {
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Sessions {
    pub fn new(max: usize) -> Self {
        Self { map: Arc::default(), count: Arc::default(), max }
    }

    /// Reserves room for one more session, or `None` at the cap.
    pub fn reserve(&self) -> Option<Reservation> {
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1))
            .ok()
            .map(|_| Reservation { count: self.count.clone(), used: false })
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
        self.map.remove(id).map(|_| Reservation { count: self.count.clone(), used: false })
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
        let sessions = Sessions::new(2);
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
