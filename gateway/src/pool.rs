//! The warm pool: sessions started ahead of any client, so a new session's
//! first result costs what a later call costs.
//!
//! A pooled entry is an ordinary session task (see [`crate::session`]) that
//! no client can see yet: its runner was spawned with a token naming that
//! session only, has dialed back, and its MCP server is started and warming
//! itself (the executor probes its interpreters and makes the Python venv).
//! `initialize` claims one ([`Pool::claim`]): the session becomes the
//! client's, under its own id, its runner gets a fresh token, and the
//! client's `initialize` is the first message its server sees. A runner
//! serves at most one session, ever: a claimed entry leaves the pool for
//! good, and its runner stops when that session ends.
//!
//! Entries hold places in the session table, so they count against
//! `MAX_SESSIONS` (and, on Heroku, against the one-off dynos that cap
//! stands for). They never keep a client out: with no ready entry,
//! `initialize` takes one still starting, which is never slower than a cold
//! start. The refill task keeps `WARM_RUNNERS` entries, replaces those whose
//! runner died, recycles those older than `WARM_RUNNER_MAX_AGE` one at a time
//! (Heroku restarts dynos daily and ends them at `time_to_live`), backs off
//! while entries keep failing, and ends them all when the gateway drains.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::AppState;
use crate::config::PoolSettings;
use crate::session::{EndReason, SessionHandle, Transport};

/// How often the refill task looks at its entries when nothing wakes it.
const TICK: Duration = Duration::from_secs(1);
/// After a claim, how long the refill waits before starting a runner.
const REFILL_AFTER_CLAIM: Duration = Duration::from_millis(250);
/// Longest wait before trying again after entries failed to start.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// An entry that ends unclaimed sooner than this after it started counts as
/// a failure, connected or not: a server that dies just after its start
/// must not be restarted every tick.
const MIN_HEALTHY_LIFE: Duration = Duration::from_secs(30);

/// Sessions started ahead of clients.
pub struct Pool {
    settings: PoolSettings,
    entries: Mutex<Vec<Entry>>,
    wake: Notify,
    counts: Counts,
}

struct Entry {
    handle: SessionHandle,
    born: Instant,
    /// Whether its runner connected at some point.
    was_ready: bool,
}

#[derive(Default)]
struct Counts {
    claims: AtomicU64,
    misses: AtomicU64,
    recycled: AtomicU64,
    replaced: AtomicU64,
}

/// What `/healthz` reports of the pool.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PoolStatus {
    /// Entries wanted (`WARM_RUNNERS`).
    pub target: usize,
    /// Entries now, ready or starting.
    pub size: usize,
    /// Entries whose runner is connected.
    pub ready: usize,
    /// Sessions that started from the pool.
    pub claims: u64,
    /// Sessions that started cold because the pool was empty.
    pub misses: u64,
    /// Entries ended unclaimed for their age.
    pub recycled: u64,
    /// Entries whose runner died unclaimed, replaced.
    pub replaced: u64,
}

impl Pool {
    pub fn new(settings: PoolSettings) -> Self {
        Pool { settings, entries: Mutex::new(Vec::new()), wake: Notify::new(), counts: Counts::default() }
    }

    /// A session from the pool for a client of `transport`: a ready one if
    /// any, else the oldest still starting; `None` when the pool is empty.
    pub fn claim(&self, transport: Transport) -> Option<SessionHandle> {
        if self.settings.size == 0 {
            return None;
        }
        let claimed = loop {
            let mut entries = self.entries.lock().expect("pool lock");
            let pick = entries
                .iter()
                .position(|e| e.handle.is_ready() && !e.handle.is_finished())
                .or_else(|| entries.iter().position(|e| !e.handle.is_finished()));
            let Some(i) = pick else { break None };
            let entry = entries.remove(i);
            drop(entries);
            // It may have ended since it was looked at: take the next.
            if entry.handle.claim(transport) {
                break Some(entry.handle);
            }
        };
        let count = if claimed.is_some() { &self.counts.claims } else { &self.counts.misses };
        count.fetch_add(1, Ordering::Relaxed);
        self.wake.notify_one();
        claimed
    }

    pub fn status(&self) -> PoolStatus {
        let entries = self.entries.lock().expect("pool lock");
        PoolStatus {
            target: self.settings.size,
            size: entries.len(),
            ready: entries.iter().filter(|e| e.handle.is_ready()).count(),
            claims: self.counts.claims.load(Ordering::Relaxed),
            misses: self.counts.misses.load(Ordering::Relaxed),
            recycled: self.counts.recycled.load(Ordering::Relaxed),
            replaced: self.counts.replaced.load(Ordering::Relaxed),
        }
    }

    /// Drops entries that ended, and ends the oldest past its age (one a
    /// tick, so entries started together are not all gone at once). Returns
    /// how many ended early (before their runner connected, or soon after),
    /// and whether one has stayed up long enough to call the pool healthy.
    fn tidy(&self, now: Instant) -> (usize, bool) {
        let mut failed = 0;
        let mut entries = self.entries.lock().expect("pool lock");
        entries.retain_mut(|entry| {
            entry.was_ready |= entry.handle.is_ready();
            if !entry.handle.is_finished() {
                return true;
            }
            self.counts.replaced.fetch_add(1, Ordering::Relaxed);
            failed += usize::from(!entry.was_ready || now.duration_since(entry.born) < MIN_HEALTHY_LIFE);
            warn!(ready = entry.was_ready, "a warm runner ended unclaimed; replacing it");
            false
        });
        let oldest = entries.iter().enumerate().min_by_key(|(_, e)| e.born).map(|(i, e)| (i, e.born));
        if let Some((i, born)) = oldest
            && now.duration_since(born) >= self.settings.max_age
        {
            let entry = entries.remove(i);
            self.counts.recycled.fetch_add(1, Ordering::Relaxed);
            info!(age_s = self.settings.max_age.as_secs(), "recycling a warm runner no session claimed");
            entry.handle.end(EndReason::Recycled);
        }
        let healthy = entries.iter().any(|e| e.was_ready && now.duration_since(e.born) >= MIN_HEALTHY_LIFE);
        (failed, healthy)
    }

    fn len(&self) -> usize {
        self.entries.lock().expect("pool lock").len()
    }

    fn push(&self, handle: SessionHandle) {
        self.entries.lock().expect("pool lock").push(Entry { handle, born: Instant::now(), was_ready: false });
    }

    /// Ends every entry (the gateway is draining: nobody will claim them).
    fn empty(&self) {
        for entry in self.entries.lock().expect("pool lock").drain(..) {
            entry.handle.end(EndReason::Shutdown);
        }
    }
}

/// Keeps the pool full until the gateway drains, then empties it.
pub async fn refill(state: AppState) {
    let pool = &state.pool;
    if pool.settings.size == 0 {
        return;
    }
    info!(size = pool.settings.size, max_age_s = pool.settings.max_age.as_secs(), "keeping runners warm");
    let mut failures = 0u32;
    let mut resume_at = Instant::now();
    loop {
        let now = Instant::now();
        let (failed, healthy) = pool.tidy(now);
        if failed > 0 {
            failures = failures.saturating_add(1);
            let backoff = (TICK * 2u32.saturating_pow(failures.min(6))).min(MAX_BACKOFF);
            warn!(backoff_s = backoff.as_secs(), "warm runners fail to start; waiting before the next");
            resume_at = now + backoff;
        } else if healthy {
            failures = 0;
        }
        if now >= resume_at {
            while pool.len() < pool.settings.size {
                match crate::mcp::start_session(&state, Transport::Streamable, true, Default::default()).await {
                    Ok(handle) => pool.push(handle),
                    // At the session cap, out of Platform API budget, or
                    // draining: try again later.
                    Err(e) => {
                        tracing::debug!("no warm runner started: {e}");
                        break;
                    }
                }
            }
        }
        tokio::select! {
            // A claim: the claimed runner's first call usually follows at
            // once, and a runner starting beside it would share the CPU.
            () = pool.wake.notified() => tokio::select! {
                () = tokio::time::sleep(REFILL_AFTER_CLAIM) => {}
                () = state.draining.cancelled() => {}
            },
            () = tokio::time::sleep(TICK) => {}
            () = state.draining.cancelled() => {
                pool.empty();
                return;
            }
        }
        if state.draining.is_cancelled() {
            pool.empty();
            return;
        }
    }
}
