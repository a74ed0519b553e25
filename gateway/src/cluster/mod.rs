//! Several gateway instances sharing one Redis (`REDIS_URL`).
//!
//! Each instance has a random id ([`Cluster::instance`]) and listens on its
//! own pub/sub inbox ([`inbox`]). The instance that starts a session owns it
//! for its whole life: the session's task, replay window and streams live
//! there. Redis holds the directory that says who owns what ([`directory`]),
//! and admits sessions against one `MAX_SESSIONS` for all instances. Any
//! other instance that gets a client's request for the session relays it to
//! the owner and streams the answer back ([`relay`]); one that gets the
//! runner's dial tunnels the runner's frames to the owner ([`tunnel`]).
//! Key names and lifetimes are in [`keys`]; the messages in [`wire`].
//!
//! Without `REDIS_URL` none of this exists and nothing on the request path
//! looks for it beyond one `Option` check.

pub mod directory;
pub mod inbox;
pub mod keys;
pub mod relay;
pub mod tunnel;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dynogate_shared::Secret;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use self::inbox::Inbox;
use self::wire::Message;

/// How long one Redis command may take before it counts as Redis being down.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

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
        }))
    }

    /// The one multiplexed command connection (clones share it).
    pub(crate) fn commands(&self) -> ConnectionManager {
        self.commands.clone()
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

/// Runs this instance's part until shutdown: listens on its inbox, and
/// renews its own key and its sessions' every [`keys::HEARTBEAT`].
pub async fn run(state: crate::AppState, cluster: Arc<Cluster>) {
    let router = crate::server::app(state.clone());
    state.tracker.spawn(inbox::listen(state.clone(), cluster.clone(), router));
    let mut tick = tokio::time::interval(keys::HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = state.shutdown.cancelled() => return,
        }
        let entries: Vec<directory::Entry> = state
            .sessions
            .handles()
            .into_iter()
            .filter(|handle| !handle.is_finished())
            .map(|handle| directory::Entry {
                id: handle.id().to_owned(),
                state: handle.state(),
                runner: handle.runner().unwrap_or_default().to_owned(),
                server: handle.server().unwrap_or_default().to_owned(),
            })
            .collect();
        match cluster.renew(&entries).await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(
                    sessions = entries.len(),
                    "Redis is back; this instance's sessions are registered again"
                );
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!("cannot renew this instance in Redis: {e}");
            }
            Err(e) => tracing::debug!("still cannot renew this instance in Redis: {e}"),
        }
    }
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
