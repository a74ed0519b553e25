//! Several gateway instances sharing one Redis (`REDIS_URL`).
//!
//! Each instance has a random id ([`Cluster::instance`]) and listens on its
//! own pub/sub inbox ([`inbox`]). The instance that starts a session owns
//! it: the session's task, replay window and streams live there, until the
//! instance stops (it hands the session over) or dies (another takes it
//! over); see [`adopt`]. Redis holds the directory that says who owns what ([`directory`]),
//! and admits sessions against one `MAX_SESSIONS` for all instances. Any
//! other instance that gets a client's request for the session relays it to
//! the owner and streams the answer back ([`relay`]); one that gets the
//! runner's dial tunnels the runner's frames to the owner ([`tunnel`]).
//! Key names and lifetimes are in [`keys`]; the messages in [`wire`].
//!
//! Without `REDIS_URL` none of this exists and nothing on the request path
//! looks for it beyond one `Option` check.

pub mod adopt;
pub mod directory;
pub mod inbox;
pub mod journal;
pub mod keys;
pub mod relay;
pub mod tunnel;
pub mod wire;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use dynogate_shared::Secret;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use self::inbox::Inbox;
use self::wire::Message;

/// How long one Redis command may take before it counts as Redis being down.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a leaving instance waits for the relayed requests it is still
/// answering.
const LAST_RELAYS: Duration = Duration::from_secs(1);
/// How long a session's owner is remembered without asking Redis again.
const OWNER_MEMORY: Duration = Duration::from_secs(10);
/// Owners remembered at most.
const OWNERS_KEPT: usize = 100_000;

/// Why something that needs Redis could not be done.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("Redis is unreachable ({0}); retry shortly")]
    Unavailable(String),
    #[error("the gateway instances already run their maximum of {0} sessions (MAX_SESSIONS); retry when one ends")]
    Full(usize),
}

impl From<redis::RedisError> for ClusterError {
    fn from(error: redis::RedisError) -> Self {
        ClusterError::Unavailable(error.to_string())
    }
}

/// This instance's membership of the cluster.
pub struct Cluster {
    /// A random id, unique for this process's life (Heroku's `$DYNO` repeats
    /// across a restart's overlap).
    pub instance: String,
    client: redis::Client,
    commands: ConnectionManager,
    pub(crate) inbox: Inbox,
    max_sessions: usize,
    /// Held while taking a session over (see [`adopt`]).
    pub(crate) adopting: tokio::sync::Mutex<()>,
    /// Relayed requests still being answered, this instance's to others and
    /// others' to this one: a stopping instance waits for them as for its own.
    relays: AtomicUsize,
    /// The instances that take sessions over, as of the last beat.
    available: Mutex<Vec<String>>,
    /// Cancelled when the instance leaves, its sessions ended or handed over.
    pub stopped: tokio_util::sync::CancellationToken,
    /// Whether Redis answers this instance's beats, its sessions registered.
    healthy: std::sync::atomic::AtomicBool,
    /// Where sessions this instance relayed to were, lately: a relay goes
    /// straight there, and looks again when told the session is not there.
    owners: dashmap::DashMap<String, (String, std::time::Instant)>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("instance", &self.instance).finish_non_exhaustive()
    }
}

impl Cluster {
    /// Prepares this instance's connections. Nothing is dialed yet: an
    /// instance starts while Redis is down, refuses new sessions until it
    /// is back, and serves its own sessions meanwhile.
    pub fn new(url: &Secret, max_sessions: usize) -> anyhow::Result<Arc<Self>> {
        let client = redis::Client::open(with_heroku_tls(url.expose()).as_str())
            .context("REDIS_URL is not a redis:// or rediss:// URL")?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let commands = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .context("cannot set up the Redis connection")?;
        Ok(Arc::new(Cluster {
            instance: crate::sessions::random_id(),
            client,
            commands,
            inbox: Inbox::default(),
            max_sessions,
            adopting: tokio::sync::Mutex::new(()),
            relays: AtomicUsize::new(0),
            available: Mutex::new(Vec::new()),
            owners: dashmap::DashMap::new(),
            stopped: tokio_util::sync::CancellationToken::new(),
            healthy: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// The one multiplexed command connection (clones share it).
    pub(crate) fn commands(&self) -> ConnectionManager {
        self.commands.clone()
    }

    /// The instance session `id` was at when last relayed to, if lately.
    pub fn owner_seen(&self, id: &str) -> Option<String> {
        let entry = self.owners.get(id)?;
        let (owner, seen) = entry.value();
        (seen.elapsed() < OWNER_MEMORY).then(|| owner.clone())
    }

    pub fn saw_owner(&self, id: &str, owner: &str) {
        // Bounded: an entry is dropped once stale, when the map grows.
        if self.owners.len() >= OWNERS_KEPT {
            self.owners.retain(|_, (_, seen)| seen.elapsed() < OWNER_MEMORY);
        }
        if self.owners.len() < OWNERS_KEPT {
            self.owners.insert(id.to_owned(), (owner.to_owned(), std::time::Instant::now()));
        }
    }

    pub fn forget_owner(&self, id: &str) {
        self.owners.remove(id);
    }

    /// Whether Redis answers this instance's beats and holds its sessions.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Relayed requests still being answered.
    pub fn relays(&self) -> usize {
        self.relays.load(Ordering::Acquire)
    }

    pub(crate) fn relay_started(&self) {
        self.relays.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn relay_ended(&self) {
        self.relays.fetch_sub(1, Ordering::AcqRel);
    }

    /// Another instance that takes sessions over, if any is known.
    pub fn successor(&self) -> Option<String> {
        let available = self.available.lock().expect("available lock");
        let others: Vec<&String> = available.iter().filter(|iid| **iid != self.instance).collect();
        if others.is_empty() {
            return None;
        }
        let mut pick = [0u8; 8];
        getrandom::fill(&mut pick).ok()?;
        Some(others[(u64::from_le_bytes(pick) % others.len() as u64) as usize].clone())
    }

    /// Asks another instance to take session `id` over now, rather than
    /// when its runner or a client next reaches one.
    pub async fn nudge(&self, id: &str) {
        if let Some(next) = self.successor() {
            let adopt = Message::bare(wire::Header::Adopt { session: id.to_owned() });
            let _ = self.send(&next, &adopt).await;
        }
    }

    /// Sends `message` to `instance`'s inbox. Returns whether the instance
    /// is listening: `false` means it is gone (or has lost Redis).
    pub async fn send(&self, instance: &str, message: &Message) -> Result<bool, ClusterError> {
        let receivers: i64 = redis::cmd("PUBLISH")
            .arg(keys::inbox(instance))
            .arg(message.encode())
            .query_async(&mut self.commands())
            .await?;
        Ok(receivers > 0)
    }
}

/// Runs this instance's part until it leaves (after shutdown, once its
/// sessions have ended; not on the session tracker, which waits for those):
/// listens on its inbox, beats
/// every [`keys::BEAT`] (taking sessions over only while not draining), and
/// renews its sessions every [`keys::HEARTBEAT`]; a session found taken over
/// by another instance (this one was thought dead) is let go here.
pub async fn run(state: crate::AppState, cluster: Arc<Cluster>) {
    let router = crate::server::app(state.clone());
    let listening = tokio::spawn(inbox::listen(state.clone(), cluster.clone(), router));
    let mut tick = tokio::time::interval(keys::BEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let renew_every = (keys::HEARTBEAT.as_millis() / keys::BEAT.as_millis()).max(1) as u64;
    let mut failing = false;
    for beat in 0u64.. {
        tokio::select! {
            _ = tick.tick() => {}
            () = cluster.stopped.cancelled() => break,
        }
        let mut result = cluster.beat(!state.draining.is_cancelled()).await.map(|available| {
            *cluster.available.lock().expect("available lock") = available;
        });
        let renewing = beat % renew_every == 0;
        if result.is_ok() && renewing {
            result = renew(&state, &cluster).await;
        }
        // Healthy again only once its sessions are registered again.
        let healthy = result.is_ok() && (renewing || cluster.is_healthy());
        cluster.healthy.store(healthy, Ordering::Release);
        match result {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("Redis is back; this instance and its sessions are registered again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!("cannot renew this instance in Redis: {e}");
            }
            Err(e) => tracing::debug!("still cannot renew this instance in Redis: {e}"),
        }
    }
    let _ = listening.await;
    // Answers to the last relayed requests go out before the instance does.
    let _ = tokio::time::timeout(LAST_RELAYS, async {
        while cluster.relays() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    if let Err(e) = cluster.leave().await {
        tracing::debug!("left Redis only by lapsing: {e}");
    }
}

async fn renew(state: &crate::AppState, cluster: &Cluster) -> Result<(), ClusterError> {
    // Sessions waiting to hand over too: they must not lapse meanwhile (one
    // already handed off is skipped by the script, its owner being empty).
    let handles: Vec<_> = state.sessions.handles().into_iter().filter(|h| !h.is_finished()).collect();
    let entries: Vec<directory::Entry> = handles
        .iter()
        .map(|handle| directory::Entry {
            id: handle.id().to_owned(),
            state: handle.state(),
            runner: handle.runner().unwrap_or_default().to_owned(),
            server: handle.server().unwrap_or_default().to_owned(),
            snapshot: handle.snapshot().encode(),
        })
        .collect();
    for lost in cluster.renew(&entries).await? {
        if let Some(handle) = handles.iter().find(|h| h.id() == lost) {
            tracing::warn!(session = %dynogate_shared::names::log_id(&lost), "another instance took this session over");
            handle.end(crate::session::EndReason::TakenOver);
        }
    }
    Ok(())
}

/// Heroku's Key-Value Store serves TLS with a self-signed certificate, which
/// its clients must accept; a `rediss://` URL without its own fragment gets
/// the `#insecure` that tells the client so.
fn with_heroku_tls(url: &str) -> String {
    if url.starts_with("rediss://") && !url.contains('#') { format!("{url}#insecure") } else { url.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rediss_urls_accept_heroku_certificates_unless_told_otherwise() {
        assert_eq!(with_heroku_tls("rediss://:p@h:1"), "rediss://:p@h:1#insecure");
        assert_eq!(with_heroku_tls("rediss://h:1#x"), "rediss://h:1#x");
        assert_eq!(with_heroku_tls("redis://h:1"), "redis://h:1");
    }
}
