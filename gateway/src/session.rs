//! One session: a task that owns the session's runner and everything in
//! flight, and the cheap [`SessionHandle`] through which HTTP handlers and the
//! rendezvous endpoint talk to it.
//!
//! The task's life, in order:
//! 1. **Starting**: ask the spawner for a runner, then wait (bounded by the
//!    dial-back timeout) for it to connect. Messages from the client queue up.
//! 2. **Live**: relay. Each client request waits on its own reply slot keyed by
//!    JSON-RPC id; progress notifications follow their request's progress
//!    token; everything else from the server goes to the client's GET stream.
//! 3. **Ending** (DELETE, idle timeout, runner or MCP server gone, dial-back
//!    timeout, gateway shutdown): leave the session table first so the id
//!    answers 404, answer every waiting request with a JSON-RPC error naming
//!    the cause, tell the runner to shut down, and stop its process.
//!
//! No lock is shared with handlers: they send [`Command`]s; the task is the
//! only owner of its state.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use dynogate_shared::Control;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tokio::sync::mpsc::{self, OwnedPermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::time::{DelayQueue, delay_queue};
use tracing::{Instrument, debug, info, warn};

use crate::config::Timeouts;
use crate::jsonrpc::{self, Kind, RequestId, code, error_body};
use crate::link::{Incoming, Link, Outgoing};
use crate::sessions::Sessions;
use crate::spawn::{RunnerSpec, Spawner};

/// Frames queued for a runner beyond which the session stops taking client
/// messages until the runner catches up.
const MAX_QUEUED_FRAMES: usize = 256;
/// Server messages kept for a client that has no GET stream open.
const MAX_STREAM_BACKLOG: usize = 1024;
/// Capacity of a GET stream's channel.
const STREAM_CHANNEL: usize = 256;
/// A runner silent for this many heartbeats is considered gone.
const MISSED_HEARTBEATS: u32 = 3;

/// A message on its way to an HTTP client.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub json: Bytes,
    /// The final response to a request (rather than a notification or a
    /// server request that precedes it).
    pub last: bool,
}

/// A client request on its way to the runner.
pub struct Call {
    pub id: RequestId,
    pub progress_token: Option<RequestId>,
    pub payload: Bytes,
    pub is_initialize: bool,
    /// Where notifications about this request go (best effort).
    pub reply: mpsc::Sender<Delivery>,
    /// A slot held for the final response, so it is never dropped for lack
    /// of room however many notifications came first.
    pub permit: OwnedPermit<Delivery>,
}

impl Call {
    /// Answers this call with an error without troubling the runner.
    fn fail(self, code: i64, message: &str) {
        let json = error_body(Some(&self.id), code, message, None);
        self.permit.send(Delivery { json: json.into(), last: true });
    }
}

/// What handlers ask of a session.
pub enum Command {
    Call(Call),
    /// A client notification or a client response to a server request.
    Notify {
        payload: Bytes,
        cancelled: Option<RequestId>,
    },
    /// The client opened a GET stream; it replaces any earlier one.
    OpenStream {
        tx: mpsc::Sender<Delivery>,
    },
    /// The runner connected and passed the handshake.
    Attach {
        link: Link,
        slot: RunnerSlot,
    },
    /// A runner connected but failed the handshake.
    RunnerRefused {
        reason: String,
    },
}

/// Why a session ended; decides what waiting clients are told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    Deleted,
    Idle(Duration),
    SpawnFailed(String),
    DialBackTimeout(Duration),
    RunnerRefused(String),
    RunnerLost(String),
    ServerExited(String),
    InitializeFailed,
    Shutdown,
}

impl EndReason {
    /// JSON-RPC code and message for requests that were waiting.
    pub fn client_error(&self) -> (i64, String) {
        match self {
            EndReason::Deleted => (code::RUNNER_LOST, "the session was deleted".into()),
            EndReason::Idle(after) => {
                (code::RUNNER_LOST, format!("the session ended after {}s without requests", after.as_secs()))
            }
            EndReason::SpawnFailed(cause) => (code::RUNNER_UNAVAILABLE, format!("{cause}; the session has ended")),
            EndReason::DialBackTimeout(after) => (
                code::RUNNER_UNAVAILABLE,
                format!(
                    "the session's runner did not dial back within {}s (dial-back timeout); the session has ended",
                    after.as_secs_f64()
                ),
            ),
            EndReason::RunnerRefused(why) => {
                (code::RUNNER_UNAVAILABLE, format!("the session's runner was refused: {why}; the session has ended"))
            }
            EndReason::RunnerLost(why) => {
                (code::RUNNER_LOST, format!("the session's runner went away ({why}); the session has ended"))
            }
            EndReason::ServerExited(how) => {
                (code::RUNNER_LOST, format!("the session's MCP server exited ({how}); the session has ended"))
            }
            EndReason::InitializeFailed => {
                (code::RUNNER_LOST, "the MCP server refused initialize; the session has ended".into())
            }
            EndReason::Shutdown => (code::RUNNER_LOST, "the gateway is shutting down; the session has ended".into()),
        }
    }
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.client_error().1)
    }
}

/// The session has ended; the caller should answer 404.
#[derive(Debug, thiserror::Error)]
#[error("session ended")]
pub struct SessionGone;

/// Proof that one runner socket holds the session's runner slot. Dropping it
/// frees the slot.
pub struct RunnerSlot {
    shared: Arc<Shared>,
}

impl Drop for RunnerSlot {
    fn drop(&mut self) {
        self.shared.runner_attached.store(false, Ordering::Release);
    }
}

struct Shared {
    id: String,
    jti: String,
    commands: mpsc::Sender<Command>,
    runner_attached: AtomicBool,
    protocol_version: OnceLock<String>,
    /// Cancelled to end the session (with `end_reason`, or as shutdown).
    ending: CancellationToken,
    end_reason: Mutex<Option<EndReason>>,
    /// Cancelled once the session has fully ended and its runner is gone.
    finished: CancellationToken,
}

/// The cheap, cloneable side of a session.
#[derive(Clone)]
pub struct SessionHandle {
    shared: Arc<Shared>,
}

impl SessionHandle {
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Unique id of the runner token issued for this session.
    pub fn token_id(&self) -> &str {
        &self.shared.jti
    }

    /// The protocol revision the MCP server agreed to in `initialize`.
    pub fn protocol_version(&self) -> Option<&str> {
        self.shared.protocol_version.get().map(String::as_str)
    }

    /// Passes a command to the session task, waiting at most `wait` for room.
    pub async fn send(&self, command: Command, wait: Duration) -> Result<(), SessionGone> {
        match self.shared.commands.send_timeout(command, wait).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(SessionGone),
            Err(mpsc::error::SendTimeoutError::Timeout(command)) => {
                // The session is alive but saturated; answer the request with
                // an error rather than dropping it on the floor.
                if let Command::Call(call) = command {
                    call.fail(code::REQUEST_TIMEOUT, "the session is too busy to take this request; retry later");
                }
                Ok(())
            }
        }
    }

    /// Opens a GET stream, replacing any earlier one.
    pub async fn open_stream(&self, wait: Duration) -> Result<mpsc::Receiver<Delivery>, SessionGone> {
        let (tx, rx) = mpsc::channel(STREAM_CHANNEL);
        self.shared.commands.send_timeout(Command::OpenStream { tx }, wait).await.map_err(|_| SessionGone)?;
        Ok(rx)
    }

    /// Claims the runner slot for a connecting socket; `None` when a runner is
    /// already connected (a replayed token).
    pub fn claim_runner_slot(&self) -> Option<RunnerSlot> {
        self.shared
            .runner_attached
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| RunnerSlot { shared: self.shared.clone() })
    }

    /// Asks the session to end. The first reason given wins.
    pub fn end(&self, reason: EndReason) {
        self.shared.end_reason.lock().expect("end reason lock").get_or_insert(reason);
        self.shared.ending.cancel();
    }

    /// Resolves once the session has ended and its runner is gone.
    pub async fn finished(&self) {
        self.shared.finished.cancelled().await;
    }
}

/// Everything a session task needs from the gateway.
pub struct SessionParams {
    pub id: String,
    pub token_id: String,
    pub spec: RunnerSpec,
    pub spawner: Arc<dyn Spawner>,
    pub sessions: Sessions,
    pub timeouts: Timeouts,
    /// The gateway's shutdown; the session ends when it fires.
    pub shutdown: CancellationToken,
}

/// A request waiting for its response.
struct Pending {
    call: Call,
    deadline: delay_queue::Key,
}

/// The session task's state.
pub struct Session {
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    spawner: Arc<dyn Spawner>,
    spec: RunnerSpec,
    sessions: Sessions,
    timeouts: Timeouts,
    link: Option<(Link, RunnerSlot)>,
    /// Frames queued before the runner connected.
    unsent: VecDeque<Outgoing>,
    pending: HashMap<RequestId, Pending>,
    /// Progress token → request id.
    progress: HashMap<RequestId, RequestId>,
    deadlines: DelayQueue<RequestId>,
    stream: Option<mpsc::Sender<Delivery>>,
    backlog: VecDeque<Bytes>,
    last_request: Instant,
    last_heard: Instant,
}

impl Session {
    /// Creates a session and its handle. The caller puts the handle in the
    /// session table, then calls [`Session::start`].
    pub fn new(params: SessionParams) -> (Self, SessionHandle) {
        let (tx, rx) = mpsc::channel(64);
        let shared = Arc::new(Shared {
            id: params.id,
            jti: params.token_id,
            commands: tx,
            runner_attached: AtomicBool::new(false),
            protocol_version: OnceLock::new(),
            ending: params.shutdown.child_token(),
            end_reason: Mutex::new(None),
            finished: CancellationToken::new(),
        });
        let now = Instant::now();
        let session = Session {
            shared: shared.clone(),
            commands: rx,
            spawner: params.spawner,
            spec: params.spec,
            sessions: params.sessions,
            timeouts: params.timeouts,
            link: None,
            unsent: VecDeque::new(),
            pending: HashMap::new(),
            progress: HashMap::new(),
            deadlines: DelayQueue::new(),
            stream: None,
            backlog: VecDeque::new(),
            last_request: now,
            last_heard: now,
        };
        (session, SessionHandle { shared })
    }

    /// Runs the session's task on `tracker`.
    pub fn start(self, tracker: &tokio_util::task::TaskTracker) {
        let span = tracing::info_span!(parent: None, "session", session = %self.shared.id);
        tracker.spawn(self.run().instrument(span));
    }

    async fn run(mut self) {
        let started = Instant::now();
        let spawned = tokio::select! {
            result = self.spawner.spawn(self.spec.clone()) => result.map_err(|e| EndReason::SpawnFailed(e.to_string())),
            () = self.shared.ending.cancelled() => Err(self.requested_end()),
            () = tokio::time::sleep(self.timeouts.dial_back) => Err(EndReason::DialBackTimeout(self.timeouts.dial_back)),
        };
        let (reason, runner) = match spawned {
            Ok(mut runner) => {
                info!(runner = %runner.describe(), "runner started");
                let reason = {
                    let mut exited = runner.exited();
                    self.serve(&mut exited, started).await
                };
                (reason, Some(runner))
            }
            Err(reason) => (reason, None),
        };
        info!(%reason, lifetime_ms = started.elapsed().as_millis() as u64, "session ending");
        // A runner that never connected cannot be told to stop; don't wait for it.
        let grace = if self.link.is_some() { self.timeouts.runner_stop_grace } else { Duration::ZERO };
        self.teardown(&reason);
        if let Some(runner) = runner {
            runner.stop(grace).await;
        }
        self.shared.finished.cancel();
        debug!("session ended");
    }

    fn requested_end(&self) -> EndReason {
        self.shared.end_reason.lock().expect("end reason lock").clone().unwrap_or(EndReason::Shutdown)
    }

    /// The live relay loop. Returns why the session ends.
    async fn serve(&mut self, exited: &mut BoxFuture<'_, String>, started: Instant) -> EndReason {
        let dial_back = tokio::time::sleep_until(started + self.timeouts.dial_back);
        tokio::pin!(dial_back);
        let idle = tokio::time::sleep(self.timeouts.idle);
        tokio::pin!(idle);
        let mut heartbeat = tokio::time::interval_at(Instant::now() + self.timeouts.heartbeat, self.timeouts.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let silence_limit = self.timeouts.heartbeat * MISSED_HEARTBEATS;

        loop {
            let accepting = self.link.as_ref().is_none_or(|(link, _)| link.queued() < MAX_QUEUED_FRAMES);
            let attached = self.link.is_some();
            // Unbiased: neither the client's messages nor the runner's may starve the other.
            tokio::select! {
                () = self.shared.ending.cancelled() => return self.requested_end(),
                status = &mut *exited => return EndReason::RunnerLost(format!("runner process ended: {status}")),
                frame = recv(&mut self.link) => {
                    if let Some(reason) = self.on_frame(frame) {
                        return reason;
                    }
                }
                command = self.commands.recv(), if accepting => {
                    // The handle in `shared` keeps a sender alive, so `None` cannot happen.
                    let Some(command) = command else { return EndReason::Shutdown };
                    if let Some(reason) = self.command(command) {
                        return reason;
                    }
                }
                Some(expired) = self.deadlines.next() => self.time_out(expired.into_inner()),
                () = &mut dial_back, if !attached => return EndReason::DialBackTimeout(self.timeouts.dial_back),
                _ = heartbeat.tick(), if attached => {
                    if self.last_heard.elapsed() > silence_limit {
                        return EndReason::RunnerLost(format!("no heartbeat for {}s", silence_limit.as_secs()));
                    }
                    self.send(Outgoing::Ping);
                }
                () = &mut idle => {
                    let quiet_since = self.last_request + self.timeouts.idle;
                    if self.pending.is_empty() && Instant::now() >= quiet_since {
                        return EndReason::Idle(self.timeouts.idle);
                    }
                    idle.as_mut().reset(quiet_since.max(Instant::now() + Duration::from_millis(10)));
                }
            }
        }
    }

    /// Handles one frame (or the end of the connection). Returns a reason when
    /// the session must end.
    fn on_frame(&mut self, frame: Option<Result<Incoming, crate::link::LinkError>>) -> Option<EndReason> {
        self.last_heard = Instant::now();
        match frame {
            Some(Ok(Incoming::Message(json))) => self.route(json),
            Some(Ok(Incoming::Alive)) => None,
            Some(Ok(Incoming::Control(Control::ChildExited { code, signal }))) => {
                Some(EndReason::ServerExited(dynogate_shared::frame::describe_exit(code, signal)))
            }
            Some(Ok(Incoming::Control(other))) => {
                warn!(control = %other, "unexpected control frame from runner");
                None
            }
            Some(Err(e)) => Some(EndReason::RunnerLost(e.to_string())),
            None => Some(EndReason::RunnerLost("its connection closed".into())),
        }
    }

    /// Routes one message from the MCP server to the client.
    fn route(&mut self, json: Bytes) -> Option<EndReason> {
        match jsonrpc::peek(&json) {
            Ok(Kind::Response { id, is_error }) => {
                let Some(pending) = self.pending.remove(&id) else {
                    debug!(%id, "response to no waiting request (answered, cancelled or timed out)");
                    return None;
                };
                self.deadlines.remove(&pending.deadline);
                if let Some(token) = &pending.call.progress_token {
                    self.progress.remove(token);
                }
                let mut end = None;
                if pending.call.is_initialize {
                    if is_error {
                        end = Some(EndReason::InitializeFailed);
                    } else if let Some(version) = jsonrpc::negotiated_version(&json) {
                        let _ = self.shared.protocol_version.set(version);
                    }
                }
                pending.call.permit.send(Delivery { json, last: true });
                end
            }
            Ok(Kind::Notification { method, .. }) if method == "notifications/progress" => {
                let request = jsonrpc::progress_token_of_notification(&json)
                    .and_then(|token| self.progress.get(&token))
                    .and_then(|id| self.pending.get(id));
                match request {
                    // Progress is advisory: a client that is not reading loses it.
                    Some(pending) => {
                        let _ = pending.call.reply.try_send(Delivery { json, last: false });
                    }
                    None => self.send_to_stream(json),
                }
                None
            }
            Ok(_) => {
                self.send_to_stream(json);
                None
            }
            Err(e) => {
                warn!("MCP server sent something that is not JSON-RPC; dropped: {e}");
                None
            }
        }
    }

    /// Sends a server message that belongs to no request to the GET stream,
    /// or keeps it until one opens.
    fn send_to_stream(&mut self, json: Bytes) {
        if let Some(tx) = &self.stream {
            match tx.try_send(Delivery { json, last: false }) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(delivery)) => self.keep(delivery.json),
                Err(mpsc::error::TrySendError::Closed(delivery)) => {
                    self.stream = None;
                    self.keep(delivery.json);
                }
            }
        } else {
            self.keep(json);
        }
    }

    fn keep(&mut self, json: Bytes) {
        if self.backlog.len() >= MAX_STREAM_BACKLOG {
            self.backlog.pop_front();
            warn!("GET stream backlog full; dropped the oldest server message");
        }
        self.backlog.push_back(json);
    }

    fn flush_backlog(&mut self) {
        let Some(tx) = &self.stream else { return };
        while let Some(json) = self.backlog.pop_front() {
            if let Err(e) = tx.try_send(Delivery { json, last: false }) {
                let (mpsc::error::TrySendError::Full(d) | mpsc::error::TrySendError::Closed(d)) = e;
                self.backlog.push_front(d.json);
                break;
            }
        }
    }

    /// Handles a command from a handler. Returns a reason when the session must end.
    fn command(&mut self, command: Command) -> Option<EndReason> {
        match command {
            Command::Call(call) => {
                self.last_request = Instant::now();
                if self.pending.contains_key(&call.id) {
                    call.fail(code::INVALID_REQUEST, "a request with this id is already in flight in this session");
                    return None;
                }
                let id = call.id.clone();
                let payload = call.payload.clone();
                if let Some(token) = &call.progress_token {
                    self.progress.insert(token.clone(), id.clone());
                }
                let deadline = self.deadlines.insert(id.clone(), self.timeouts.request);
                self.pending.insert(id, Pending { call, deadline });
                self.send(Outgoing::Message(payload));
            }
            Command::Notify { payload, cancelled } => {
                self.last_request = Instant::now();
                if let Some(id) = cancelled
                    && let Some(pending) = self.pending.remove(&id)
                {
                    self.deadlines.remove(&pending.deadline);
                    if let Some(token) = &pending.call.progress_token {
                        self.progress.remove(token);
                    }
                    pending.call.fail(code::REQUEST_CANCELLED, "the request was cancelled by the client");
                }
                self.send(Outgoing::Message(payload));
            }
            Command::OpenStream { tx } => {
                self.stream = Some(tx);
                self.flush_backlog();
            }
            Command::Attach { link, slot } => {
                info!(waited_ms = self.last_heard.elapsed().as_millis() as u64, "runner attached");
                for frame in self.unsent.drain(..) {
                    link.send(frame);
                }
                self.link = Some((link, slot));
                self.last_heard = Instant::now();
            }
            Command::RunnerRefused { reason } => return Some(EndReason::RunnerRefused(reason)),
        }
        None
    }

    fn time_out(&mut self, id: RequestId) {
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        if let Some(token) = &pending.call.progress_token {
            self.progress.remove(token);
        }
        let after = self.timeouts.request.as_secs();
        warn!(%id, "request timed out after {after}s");
        pending.call.fail(code::REQUEST_TIMEOUT, &format!("no response from the MCP server within {after}s"));
        let cancel = format!(
            r#"{{"jsonrpc":"2.0","method":"notifications/cancelled","params":{{"requestId":{},"reason":"timed out at the gateway after {after}s"}}}}"#,
            id.as_json()
        );
        self.send(Outgoing::Message(cancel.into()));
    }

    fn send(&mut self, frame: Outgoing) {
        match &self.link {
            Some((link, _)) => {
                // A closed writer shows up as the end of the incoming stream.
                link.send(frame);
            }
            None if matches!(frame, Outgoing::Ping) => {}
            None => self.unsent.push_back(frame),
        }
    }

    /// Leaves the table, answers everyone still waiting, and tells the runner
    /// to go.
    fn teardown(&mut self, reason: &EndReason) {
        self.sessions.remove(&self.shared.id);
        self.commands.close();
        let (code, message) = reason.client_error();
        for (_, pending) in self.pending.drain() {
            pending.call.fail(code, &message);
        }
        while let Ok(command) = self.commands.try_recv() {
            if let Command::Call(call) = command {
                call.fail(code, &message);
            }
        }
        self.progress.clear();
        self.stream = None;
        if let Some((link, _slot)) = self.link.take() {
            link.send(Outgoing::Control(Control::Shutdown { reason: message }));
            link.send(Outgoing::Close);
        }
    }
}

/// The next frame of the runner link, or never when there is no link yet.
async fn recv(link: &mut Option<(Link, RunnerSlot)>) -> Option<Result<Incoming, crate::link::LinkError>> {
    match link {
        Some((link, _)) => link.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
