//! This instance's inbox: one pub/sub subscriber on `dg:inbox:{iid}`, and
//! the table of exchanges waiting for messages.
//!
//! Requests and runner dials start work of their own; every other message
//! belongs to an exchange this instance started or serves, found by its key
//! (see [`super::wire::Header::key`]). Delivery never waits: an exchange
//! that lets its queue fill is cut (its receiver ends), so one slow client
//! cannot stall the inbox for the others. When the subscriber loses Redis,
//! messages sent meanwhile are lost, so every waiting exchange is cut at
//! once rather than left to time out; it reconnects with backoff.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::wire::{Header, Message};
use super::{Cluster, keys};
use crate::AppState;

/// How often the subscriber checks its connection (also keeping it from
/// Redis's idle timeout).
const PING_EVERY: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Exchanges waiting for messages, by key.
#[derive(Default)]
pub struct Inbox {
    waiting: DashMap<String, mpsc::Sender<Message>>,
    listening: AtomicBool,
    /// Told when the subscriber (re)connects.
    connected: tokio::sync::Notify,
}

impl Inbox {
    /// Starts receiving the messages keyed `key`, at most `capacity` queued.
    pub fn expect(&self, key: &str, capacity: usize) -> mpsc::Receiver<Message> {
        let (tx, rx) = mpsc::channel(capacity);
        self.waiting.insert(key.to_owned(), tx);
        rx
    }

    /// Stops receiving messages keyed `key`.
    pub fn forget(&self, key: &str) {
        self.waiting.remove(key);
    }

    /// Whether the subscriber is connected: messages sent to this instance
    /// now arrive.
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// Waits, at most `within`, until the subscriber is connected; returns
    /// whether it is.
    pub async fn until_listening(&self, within: Duration) -> bool {
        let _ = tokio::time::timeout(within, async {
            loop {
                let connected = self.connected.notified();
                tokio::pin!(connected);
                connected.as_mut().enable();
                if self.is_listening() {
                    return;
                }
                connected.await;
            }
        })
        .await;
        self.is_listening()
    }

    /// Hands a message to its exchange; an exchange whose queue is full is cut.
    fn deliver(&self, message: Message) {
        let key = message.header.key().to_owned();
        let Some(tx) = self.waiting.get(&key).map(|entry| entry.value().clone()) else {
            debug!(key = %dynogate_shared::names::log_id(&key), "message for no waiting exchange; dropped");
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(message) {
            warn!(key = %dynogate_shared::names::log_id(&key), "a relayed exchange fell behind; cut");
            self.waiting.remove(&key);
        }
    }

    fn cut_all(&self) {
        self.waiting.clear();
    }
}

/// Listens until the instance leaves ([`Cluster::stopped`], after its
/// sessions have ended: until then it answers relays, if only to say a
/// session is no longer here), reconnecting whenever the subscriber is lost.
pub async fn listen(state: AppState, cluster: Arc<Cluster>, router: axum::Router) {
    let mut backoff = Duration::from_millis(100);
    let mut reported = false;
    loop {
        let listened = listen_once(&state, &cluster, &router).await;
        if cluster.stopped.is_cancelled() {
            cluster.inbox.listening.store(false, Ordering::Release);
            return;
        }
        if cluster.inbox.listening.swap(false, Ordering::AcqRel) {
            // It was connected: a new loss, reported afresh and retried soon.
            reported = false;
            backoff = Duration::from_millis(100);
        }
        cluster.inbox.cut_all();
        match listened {
            Ok(()) => warn!("lost the Redis subscriber; reconnecting"),
            Err(e) if !reported => {
                warn!("cannot listen on Redis ({e}); relays to this instance wait until it is back");
                reported = true;
            }
            Err(e) => debug!("still cannot listen on Redis: {e}"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = cluster.stopped.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// How long a leaving instance waits for messages sent before it stopped
/// listening.
const LAST_MESSAGES: Duration = Duration::from_millis(200);

/// One subscriber connection's life: returns when it is lost, or when the
/// instance leaves, having answered what was sent to it until then.
async fn listen_once(state: &AppState, cluster: &Arc<Cluster>, router: &axum::Router) -> Result<(), redis::RedisError> {
    let pubsub = tokio::time::timeout(super::COMMAND_TIMEOUT, cluster.client.get_async_pubsub())
        .await
        .map_err(|_| timed_out("connecting"))??;
    let (mut sink, mut messages) = pubsub.split();
    tokio::time::timeout(super::COMMAND_TIMEOUT, sink.subscribe(keys::inbox(&cluster.instance)))
        .await
        .map_err(|_| timed_out("subscribing"))??;
    cluster.inbox.listening.store(true, Ordering::Release);
    cluster.inbox.connected.notify_waiters();
    info!(instance = %cluster.instance, "listening on Redis for relayed requests");
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    loop {
        tokio::select! {
            () = cluster.stopped.cancelled() => {
                // What was published before the unsubscription is delivered
                // before its confirmation: an asker told someone listened
                // gets its answer (mostly "not here").
                let _ = tokio::time::timeout(LAST_MESSAGES * 5, sink.unsubscribe(keys::inbox(&cluster.instance))).await;
                while let Ok(Some(message)) = tokio::time::timeout(LAST_MESSAGES, messages.next()).await {
                    if let Ok(message) = Message::decode(message.get_payload_bytes()) {
                        dispatch(state, cluster, router, message);
                    }
                }
                return Ok(());
            }
            message = messages.next() => {
                let Some(message) = message else { return Ok(()) };
                match Message::decode(message.get_payload_bytes()) {
                    Ok(message) => dispatch(state, cluster, router, message),
                    Err(e) => warn!("unreadable message in this instance's inbox: {e}"),
                }
            }
            _ = ping.tick() => {
                let pong: Result<redis::RedisResult<redis::Value>, _> = tokio::time::timeout(PING_TIMEOUT, sink.ping()).await;
                match pong {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(_) => return Err(timed_out("answering a ping")),
                }
            }
        }
    }
}

fn timed_out(doing: &str) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("Redis timed out {doing}")))
}

fn dispatch(state: &AppState, cluster: &Arc<Cluster>, router: &axum::Router, message: Message) {
    match &message.header {
        Header::Request { .. } => {
            // Counted now, so an instance leaving waits for it from here.
            let counted = super::relay::counts(&message);
            if counted {
                cluster.relay_started();
            }
            state.tracker.spawn(super::relay::serve(cluster.clone(), router.clone(), message, counted));
        }
        Header::Dial { conn, .. } => {
            // Registered now: the runner's first frames may be right behind.
            let up = cluster.inbox.expect(conn, super::tunnel::QUEUE);
            state.tracker.spawn(super::tunnel::accept(state.clone(), cluster.clone(), message, up));
        }
        Header::Adopt { session } => {
            let (state, cluster, session) = (state.clone(), cluster.clone(), session.clone());
            state.tracker.clone().spawn(async move {
                if let Err(e) = super::adopt::find(&state, &cluster, &session).await {
                    warn!(session = %dynogate_shared::names::log_id(&session), "cannot take a session over: {e}");
                }
            });
        }
        _ => cluster.inbox.deliver(message),
    }
}
