//! One session: a task that owns the session's runner and everything in
//! flight, and the cheap [`SessionHandle`] through which HTTP handlers and the
//! rendezvous endpoint talk to it.
//!
//! The task's life, in order:
//! 1. **Starting**: ask the spawner for a runner, then wait (bounded by the
//!    dial-back timeout) for it to connect. Messages from the client queue up.
//! 2. **Live**: relay. Each client request waits on its own stream keyed by
//!    JSON-RPC id ([`in_flight`]); progress notifications follow their
//!    request's progress token; other messages from the server go to the GET
//!    stream, or, when no client reads that and exactly one request is in
//!    flight, on that request's stream (where a direct connection would have
//!    sent them).
//! 3. **Detached** (the runner's socket dropped without a goodbye): requests
//!    stay in flight and new ones queue, for up to the reconnect grace; when
//!    the runner dials again, both sides resend what the other has not
//!    acknowledged (see `dynogate_shared::frame`), so nothing is lost.
//! 4. **Handed over** (instances sharing Redis, this one stopping): once
//!    nothing is in flight, write a [`Snapshot`] with the replay window's
//!    counts, let the runner's socket close without a goodbye, and leave;
//!    the runner dials again and whichever instance it reaches takes the
//!    session over ([`Session::new`] with [`Adopted`]).
//! 5. **Ending** (DELETE, idle timeout, runner or MCP server gone, dial-back
//!    timeout, no reconnect in time, gateway shutdown): leave the session
//!    table first so the id answers 404, answer every waiting request with a
//!    JSON-RPC error naming the cause ([`end`]), tell the runner to shut
//!    down, and stop its process.
//!
//! The replay window and acknowledgements are the shared protocol's
//! ([`dynogate_shared::window`]), the same rules the runner runs. No lock is
//! shared with handlers except the streams' own short ones: handlers send
//! [`Command`]s; the task is the only owner of its state.

mod audit;
mod end;
mod handover;
mod in_flight;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use dynogate_shared::names::log_id;
use dynogate_shared::window::{ACK_DELAY, AckClock, MISSED_HEARTBEATS, SendWindow};
use dynogate_shared::{Control, PROTOCOL_VERSION};
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

pub use self::end::EndReason;
pub use self::handover::{Counts, Snapshot};
use self::in_flight::InFlight;
use crate::cluster::journal::{self, CallRecord, Journal, Recovered};
use crate::config::Timeouts;
use crate::jsonrpc::{self, Kind, RequestId, code, error_body};
use crate::link::{Incoming, Link, LinkError, Outgoing};
use crate::sessions::Sessions;
use crate::spawn::{RunnerProcess, RunnerSpec, Spawner};
use crate::streams::{Budget, EventStream, Streams};
use crate::token::RunnerTokens;

/// How long a connected runner has to answer a ping after someone else
/// dialed with a valid token (its old socket may be half-open).
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Runner tokens a session still accepts (the latest few it issued).
const LIVE_TOKENS: usize = 3;
/// How far stream and event numbers skip ahead in a session taken over
/// from an owner that died (its last snapshot may be a few seconds old).
const NUMBERS_AHEAD: u64 = 100_000;
/// How long before the end of the drain a session hands over, whatever is
/// still in flight.
const HAND_OVER_MARGIN: Duration = Duration::from_secs(2);

/// A client request on its way to the runner.
pub struct Call {
    pub id: RequestId,
    pub progress_token: Option<RequestId>,
    pub payload: Bytes,
    pub is_initialize: bool,
    /// Where the answer (and notifications about the request) go.
    pub stream: Arc<EventStream>,
    /// Its MCP method, as a metrics label.
    pub method: &'static str,
    /// When the gateway received it.
    pub received: Instant,
    /// A `tools/call`'s details for the audit trail, read when it is admitted.
    audit: Option<audit::ToolCall>,
    /// Its span while it waits for the answer, when traces are exported;
    /// the runner's side of the call is its child.
    _span: tracing::Span,
}

impl Call {
    pub fn new(
        id: RequestId,
        progress_token: Option<RequestId>,
        payload: Bytes,
        method: &str,
        stream: Arc<EventStream>,
    ) -> Call {
        let (payload, span) =
            if dynogate_telemetry::enabled() { traced(payload, method) } else { (payload, tracing::Span::none()) };
        Call {
            id,
            progress_token,
            payload,
            is_initialize: method == "initialize",
            stream,
            method: crate::metrics::method_label(method),
            received: Instant::now(),
            audit: None,
            _span: span,
        }
    }
}

/// A span for a request, a child of the context the client sent in
/// `params._meta.traceparent` (else of the HTTP request's), and the request
/// carrying the span's own context to the runner in that place.
fn traced(payload: Bytes, method: &str) -> (Bytes, tracing::Span) {
    let request: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
    let tool = if method == "tools/call" { request["params"]["name"].as_str() } else { None };
    let span = tracing::info_span!(
        "mcp.request",
        otel.name = %format!("{} {}", crate::metrics::method_label(method), tool.unwrap_or_default()).trim_end(),
        rpc.method = crate::metrics::method_label(method),
        mcp.tool = tool.map(|t| t.chars().take(64).collect::<String>()),
    );
    if let Some(parent) = dynogate_telemetry::meta_traceparent(&request) {
        dynogate_telemetry::set_parent(&span, parent);
    }
    let carried = dynogate_telemetry::traceparent(&span)
        .and_then(|context| dynogate_telemetry::with_meta_traceparent(&payload, &context));
    (carried.map_or(payload, Bytes::from), span)
}

/// What handlers ask of a session.
pub enum Command {
    Call(Call),
    /// A client notification or a client response to a server request.
    Notify {
        payload: Bytes,
        cancelled: Option<RequestId>,
    },
    /// The runner connected and said hello; `received` is its count of
    /// frames from us, `acked` its count of ours we acknowledged.
    Attach {
        link: Link,
        slot: RunnerSlot,
        received: u64,
        acked: u64,
        /// The unique id of the token it dialed with.
        jti: String,
    },
    /// A runner connected but failed the handshake.
    RunnerRefused {
        reason: String,
    },
    /// Someone dialed with a valid token while a runner is connected: check
    /// that the connected one is still there.
    Probe,
    /// A client claimed this pooled session; its first message follows.
    Claimed,
}

impl Command {
    /// Commands about the runner travel apart from the client's messages:
    /// those wait while the runner is behind, and a runner coming back is
    /// exactly what lets it catch up.
    fn is_runners(&self) -> bool {
        matches!(self, Command::Attach { .. } | Command::RunnerRefused { .. } | Command::Probe)
    }
}

/// Why a command did not reach its session.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The session has ended; the caller should answer 404.
    #[error("session ended")]
    Gone,
    /// The session took nothing for the whole wait: its runner is behind.
    #[error("session busy")]
    Busy,
}

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

/// Which MCP transport the client uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Transport {
    /// Streamable HTTP: answers on each POST.
    Streamable,
    /// The older HTTP+SSE transport: everything on the one GET stream.
    LegacySse,
}

impl Transport {
    fn from_u8(value: u8) -> Self {
        if value == Transport::LegacySse as u8 { Transport::LegacySse } else { Transport::Streamable }
    }
}

struct Shared {
    id: String,
    /// The registered server it bridges; `None` for the default.
    server: Option<std::sync::Arc<str>>,
    /// A [`Transport`] as `u8`: a pooled session learns it when claimed.
    transport: AtomicU8,
    /// Whether a client has it: a pooled session waits unclaimed, invisible
    /// to clients, with its runner starting or ready.
    claimed: AtomicBool,
    commands: mpsc::Sender<Command>,
    /// Attach, refusals and probes; see [`Command::is_runners`].
    runner_commands: mpsc::Sender<Command>,
    runner_attached: AtomicBool,
    protocol_version: OnceLock<String>,
    /// Unique ids of the runner tokens still accepted. A std mutex: held for
    /// one lookup or insert, never across an `.await`.
    tokens: Mutex<VecDeque<String>>,
    streams: Streams,
    in_flight: AtomicUsize,
    /// Cancelled to end the session (with `end_reason`, or as shutdown).
    ending: CancellationToken,
    end_reason: Mutex<Option<EndReason>>,
    /// Cancelled once the session has fully ended and its runner is gone.
    finished: CancellationToken,
    /// Kept by the task and read by the status page too.
    created: Instant,
    /// Tool calls answered.
    calls: AtomicU64,
    /// The runner as its spawner describes it, once started.
    runner: OnceLock<String>,
    /// Whether a runner has connected at least once.
    attached_once: AtomicBool,
    /// Started by the single-request API rather than for a client.
    single_request: AtomicBool,
    /// What another instance needs to take the runner over.
    runner_handle: OnceLock<String>,
    /// Cancelled to hand the session to another instance.
    hand_over: CancellationToken,
    /// Taken over from another instance and not yet reached by its runner,
    /// whose newest token this instance may never have seen: any valid
    /// token for the session will do, once.
    trusting: AtomicBool,
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

    /// The registered server it bridges (`/mcp/{name}`); `None` for the default.
    pub fn server(&self) -> Option<&str> {
        self.shared.server.as_deref()
    }

    pub fn transport(&self) -> Transport {
        Transport::from_u8(self.shared.transport.load(Ordering::Acquire))
    }

    /// Whether a client has this session (always, unless it came from the pool).
    pub fn is_claimed(&self) -> bool {
        self.shared.claimed.load(Ordering::Acquire)
    }

    /// Whether its runner has connected.
    pub fn is_ready(&self) -> bool {
        self.shared.runner_attached.load(Ordering::Acquire)
    }

    /// Whether the session has ended and its runner is gone.
    pub fn is_finished(&self) -> bool {
        self.shared.finished.is_cancelled()
    }

    /// Gives a pooled session to a client of `transport`; false when it was
    /// claimed already or has ended. The session hears of it
    /// ([`Command::Claimed`]) before the client's first message.
    pub fn claim(&self, transport: Transport) -> bool {
        if self.shared.claimed.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return false;
        }
        self.shared.transport.store(transport as u8, Ordering::Release);
        // Nobody else can send to an unclaimed session, so there is room; a
        // closed queue means it has ended.
        self.shared.commands.try_send(Command::Claimed).is_ok()
    }

    /// Whether `jti` names a runner token this session still accepts.
    pub fn accepts_token(&self, jti: &str) -> bool {
        self.shared.trusting.load(Ordering::Acquire)
            || self.shared.tokens.lock().expect("tokens lock").iter().any(|t| t == jti)
    }

    /// Asks the session to move to another instance (this one is
    /// stopping). Sessions that cannot follow end instead: those no client
    /// has (the pool's), those this process drives itself (single
    /// requests), and those of the older SSE transport, whose one stream
    /// cannot be resumed elsewhere.
    pub fn hand_over(&self) {
        let follows = self.is_claimed()
            && !self.shared.single_request.load(Ordering::Acquire)
            && self.transport() == Transport::Streamable;
        if follows {
            self.shared.hand_over.cancel();
        } else {
            self.end(EndReason::Shutdown);
        }
    }

    /// Whether the session is moving to another instance: requests for it
    /// wait until it has, then follow it.
    pub fn is_handing_over(&self) -> bool {
        self.shared.hand_over.is_cancelled()
    }

    /// What another instance would need to take the session over now, but
    /// for the replay window's counts (which only the session's task has).
    pub fn snapshot(&self) -> Snapshot {
        let (next_stream, standalone_next) = self.shared.streams.position();
        Snapshot {
            server: self.shared.server.as_deref().map(str::to_owned),
            transport: self.shared.transport.load(Ordering::Acquire),
            claimed: self.is_claimed(),
            single_request: self.shared.single_request.load(Ordering::Acquire),
            protocol_version: self.protocol_version().map(str::to_owned),
            runner: self.runner().unwrap_or_default().to_owned(),
            handle: self.shared.runner_handle.get().cloned().unwrap_or_default(),
            calls: self.calls(),
            next_stream,
            standalone_next,
            counts: None,
        }
    }

    /// The protocol revision the MCP server agreed to in `initialize`.
    pub fn protocol_version(&self) -> Option<&str> {
        self.shared.protocol_version.get().map(String::as_str)
    }

    /// The session's SSE streams.
    pub fn streams(&self) -> &Streams {
        &self.shared.streams
    }

    /// Requests waiting for an answer.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// Passes a command to the session task, waiting at most `wait` for room.
    pub async fn send(&self, command: Command, wait: Duration) -> Result<(), SendError> {
        let channel = if command.is_runners() { &self.shared.runner_commands } else { &self.shared.commands };
        match channel.send_timeout(command, wait).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(SendError::Gone),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => Err(SendError::Busy),
        }
    }

    /// Asks the session to check its runner, without waiting.
    pub fn probe(&self) {
        let _ = self.shared.runner_commands.try_send(Command::Probe);
    }

    /// Claims the runner slot for a connecting socket; `None` when a runner is
    /// already connected.
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

    /// How long ago it was created.
    pub fn age(&self) -> Duration {
        self.shared.created.elapsed()
    }

    /// Tool calls answered so far.
    pub fn calls(&self) -> u64 {
        self.shared.calls.load(Ordering::Relaxed)
    }

    /// Its runner as the spawner describes it (`pid 4242`, `dyno run.1234 (…)`), once started.
    pub fn runner(&self) -> Option<&str> {
        self.shared.runner.get().map(String::as_str)
    }

    /// Where the session is in its life, as a word.
    pub fn state(&self) -> &'static str {
        if self.shared.ending.is_cancelled() {
            "ending"
        } else if self.is_ready() {
            "ready"
        } else if self.shared.attached_once.load(Ordering::Acquire) {
            "reconnecting"
        } else {
            "starting"
        }
    }

    /// Marks it as started by the single-request API.
    pub fn mark_single_request(&self) {
        self.shared.single_request.store(true, Ordering::Release);
    }

    /// Who it is for: `client`, `pool` (warm, unclaimed) or `single-request`.
    pub fn purpose(&self) -> &'static str {
        if !self.is_claimed() {
            "pool"
        } else if self.shared.single_request.load(Ordering::Acquire) {
            "single-request"
        } else {
            "client"
        }
    }

    /// Resolves once the session has ended and its runner is gone.
    pub async fn finished(&self) {
        self.shared.finished.cancelled().await;
    }
}

/// Everything a session task needs from the gateway.
pub struct SessionParams {
    pub id: String,
    pub transport: Transport,
    /// Started ahead of any client, for the warm pool: unclaimed, it never
    /// idles out (the pool recycles it) and clients cannot see it.
    pub pooled: bool,
    pub spec: RunnerSpec,
    /// Unique id of the token in `spec`.
    pub token_id: String,
    pub tokens: RunnerTokens,
    pub spawner: Arc<dyn Spawner>,
    pub sessions: Sessions,
    pub timeouts: Timeouts,
    /// The gateway's byte budget for kept events.
    pub budget: Budget,
    /// The gateway's shutdown; the session ends when it fires.
    pub shutdown: CancellationToken,
    /// A fingerprint of the API key clients use, for the audit trail.
    pub key_fingerprint: Option<String>,
    /// The instances sharing Redis, when they do: where a handed-over
    /// session's snapshot goes.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Set when the session is taken over from another instance rather
    /// than started here.
    pub adopted: Option<Adopted>,
}

/// A session taken over from another instance: its runner, already
/// running, and the snapshot its last owner left.
pub struct Adopted {
    pub runner: Box<dyn RunnerProcess>,
    pub snapshot: Snapshot,
    /// What its last owner wrote ahead, when it kept a journal.
    pub journal: Option<Recovered>,
}

/// The session task's state.
pub struct Session {
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    runner_commands: mpsc::Receiver<Command>,
    spawner: Arc<dyn Spawner>,
    spec: RunnerSpec,
    tokens: RunnerTokens,
    sessions: Sessions,
    timeouts: Timeouts,
    link: Option<(Link, RunnerSlot)>,
    detached_since: Option<Instant>,
    /// Frames to the runner, kept until acknowledged.
    window: SendWindow<Bytes>,
    /// Frames from the runner, and when to acknowledge them.
    clock: AckClock,
    in_flight: InFlight,
    last_request: Instant,
    last_heard: Instant,
    token_minted: Instant,
    /// Set while checking a connected runner: (deadline, last_heard at the start).
    probe: Option<(Instant, Instant)>,
    key_fingerprint: Option<String>,
    /// When a client got the session (its start, or its claim from the pool).
    began: Instant,
    cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The runner of a session taken over, until [`Session::run`] takes it
    /// (in a mutex only so the task's future is `Sync`).
    adopted: Mutex<Option<Box<dyn RunnerProcess>>>,
    /// Taken over from an owner that left no counts: the replay window
    /// starts from the runner's hello.
    blind: bool,
    /// Taken over, and its runner has not reached this instance yet: if the
    /// session ends so, its runner is left alone (it may still be another
    /// instance's, one thought dead); it gives up by itself, and a dyno is
    /// the sweeper's.
    unseen: bool,
    /// With instances sharing Redis: what another instance would need to
    /// carry the session on, written ahead ([`journal`]).
    journal: Option<Journal>,
    /// Messages to the runner handed to its current socket, by number.
    released: u64,
    /// Rebuilt from a dead owner's journal, which held the messages to the
    /// runner up to this one: a runner whose hello does not fit it is
    /// counted from its hello instead, as when there is none.
    recovered: Option<u64>,
    /// Messages the runner sends again after a welcome that counted only
    /// what the journal had written, which were handled already.
    handled_again: u64,
}

impl Session {
    /// Creates a session and its handle. The caller puts the handle in the
    /// session table, then calls [`Session::start`].
    pub fn new(mut params: SessionParams) -> (Self, SessionHandle) {
        let (tx, rx) = mpsc::channel(64);
        let (runner_tx, runner_rx) = mpsc::channel(8);
        let snapshot = params.adopted.as_ref().map(|adopted| adopted.snapshot.clone());
        let written_ahead = params.adopted.as_mut().and_then(|adopted| adopted.journal.take());
        let streams = match &snapshot {
            // Numbers from a snapshot without counts (the owner died) may be a
            // few seconds old: skip ahead, so no id a client saw comes again.
            Some(s) => {
                let ahead = if s.counts.is_some() { 0 } else { NUMBERS_AHEAD };
                Streams::resumed(params.budget.clone(), s.next_stream + ahead, s.standalone_next + ahead)
            }
            None => Streams::new(params.budget),
        };
        let shared = Arc::new(Shared {
            id: params.id,
            server: params.spec.launch.server.as_ref().map(|s| s.name.clone()),
            transport: AtomicU8::new(params.transport as u8),
            claimed: AtomicBool::new(!params.pooled),
            commands: tx,
            runner_commands: runner_tx,
            runner_attached: AtomicBool::new(false),
            protocol_version: OnceLock::new(),
            tokens: Mutex::new(VecDeque::from([params.token_id])),
            streams,
            in_flight: AtomicUsize::new(0),
            ending: params.shutdown.child_token(),
            end_reason: Mutex::new(None),
            finished: CancellationToken::new(),
            created: Instant::now(),
            calls: AtomicU64::new(0),
            runner: OnceLock::new(),
            attached_once: AtomicBool::new(snapshot.is_some()),
            single_request: AtomicBool::new(snapshot.as_ref().is_some_and(|s| s.single_request)),
            runner_handle: OnceLock::new(),
            hand_over: CancellationToken::new(),
            trusting: AtomicBool::new(snapshot.is_some()),
        });
        let (mut window, mut clock, mut blind, mut recovered) =
            (SendWindow::default(), AckClock::default(), false, None);
        if let Some(snapshot) = &snapshot {
            shared.transport.store(snapshot.transport, Ordering::Release);
            shared.claimed.store(snapshot.claimed, Ordering::Release);
            if let Some(version) = &snapshot.protocol_version {
                let _ = shared.protocol_version.set(version.clone());
            }
            let _ = shared.runner.set(snapshot.runner.clone());
            let _ = shared.runner_handle.set(snapshot.handle.clone());
            shared.calls.store(snapshot.calls, Ordering::Relaxed);
            match &snapshot.counts {
                Some(counts) => {
                    window = SendWindow::starting_at(counts.acked);
                    for frame in &counts.unacked {
                        window.push(Bytes::from(frame.clone()));
                    }
                    clock = AckClock::resumed(counts.received);
                }
                None => match &written_ahead {
                    Some(journal) => {
                        window = SendWindow::starting_at(journal.acked);
                        for frame in &journal.unacked {
                            window.push(frame.clone());
                        }
                        clock = AckClock::resumed(journal.received);
                        recovered = Some(window.sent());
                    }
                    None => blind = true,
                },
            }
        }
        // Requests a dead owner left awaiting answers wait here; after a
        // hand-over its own teardown answered them.
        let mut in_flight = InFlight::default();
        let mut forgotten = Vec::new();
        if let Some(journal) = written_ahead.as_ref() {
            for (&id, stream) in &journal.streams {
                let awaiting =
                    if recovered.is_some() { journal.calls.iter().filter(|c| c.stream == id).count() } else { 0 };
                shared.streams.restore(id, stream.events.clone(), stream.next, stream.floor, awaiting);
            }
            for record in &journal.calls {
                let stream = shared.streams.find(record.stream).filter(|_| recovered.is_some());
                let Some(stream) = stream else {
                    forgotten.push(record.id.clone());
                    continue;
                };
                let call =
                    Call::new(record.id.clone(), record.progress_token.clone(), Bytes::new(), &record.method, stream);
                if in_flight.admit(call, params.timeouts.request).is_err() {
                    forgotten.push(record.id.clone());
                }
            }
            shared.in_flight.store(in_flight.len(), Ordering::Release);
        }
        // A blind take-over starts its journal when the runner's hello says
        // where to count from.
        // After a hand-over the journal may lack the last messages the
        // snapshot carries: they are written again before they go.
        let handed_over = snapshot.as_ref().is_some_and(|s| s.counts.is_some());
        let journal = params.cluster.clone().filter(|_| !blind).map(|cluster| {
            let written = if handed_over { window.acked() } else { window.sent() };
            Journal::start(cluster, &shared.id, (window.acked(), written, clock.received()), written_ahead.as_ref())
        });
        if let Some(journal) = &journal {
            forgotten.iter().for_each(|id| journal.done(id));
            if handed_over {
                for (n, frame) in (window.acked() + 1..).zip(window.after(window.acked())) {
                    journal.sent(n, frame.clone(), None);
                }
            }
            shared.streams.on_forget(journal.forgetter());
        }
        let now = Instant::now();
        let session = Session {
            shared: shared.clone(),
            commands: rx,
            runner_commands: runner_rx,
            spawner: params.spawner,
            spec: params.spec,
            tokens: params.tokens,
            sessions: params.sessions,
            timeouts: params.timeouts,
            link: None,
            // A session taken over waits for its runner as for a redial.
            detached_since: snapshot.is_some().then_some(now),
            window,
            clock,
            in_flight,
            last_request: now,
            last_heard: now,
            token_minted: now,
            probe: None,
            key_fingerprint: params.key_fingerprint,
            began: now,
            cluster: params.cluster,
            adopted: Mutex::new(params.adopted.map(|adopted| adopted.runner)),
            blind,
            unseen: snapshot.is_some(),
            journal,
            released: 0,
            recovered,
            handled_again: 0,
        };
        (session, SessionHandle { shared })
    }

    /// Runs the session's task on `tracker`.
    pub fn start(self, tracker: &tokio_util::task::TaskTracker) {
        let span = tracing::info_span!(parent: None, "session", session = %log_id(&self.shared.id));
        tracker.spawn(self.run().instrument(span));
    }

    async fn run(mut self) {
        let started = Instant::now();
        let adopted = self.adopted.get_mut().expect("adopted lock").take();
        let spawned = match adopted {
            Some(runner) => {
                info!(runner = %runner.describe(), "session taken over from another instance");
                Ok(runner)
            }
            None => {
                let spawn_span = tracing::info_span!("spawn");
                let spec =
                    RunnerSpec { traceparent: dynogate_telemetry::traceparent(&spawn_span), ..self.spec.clone() };
                let spawn = self.spawner.spawn(spec).instrument(spawn_span);
                tokio::select! {
                    result = spawn => result.map_err(|e| EndReason::SpawnFailed(e.to_string())),
                    () = self.shared.ending.cancelled() => Err(self.requested_end()),
                    () = tokio::time::sleep(self.timeouts.dial_back) => Err(EndReason::DialBackTimeout(self.timeouts.dial_back)),
                }
            }
        };
        let (reason, runner) = match spawned {
            Ok(mut runner) => {
                let described = runner.describe();
                info!(runner = %described, "runner started");
                let _ = self.shared.runner.set(described);
                let _ = self.shared.runner_handle.set(runner.handle());
                self.note_snapshot();
                let follow = runner.follow_after_connect();
                let reason = {
                    let mut exited = runner.exited();
                    self.serve(&mut exited, follow, started).await
                };
                (reason, Some(runner))
            }
            Err(reason) => (reason, None),
        };
        let handing_off = (reason == EndReason::HandedOver).then(|| runner.as_ref().map(|r| r.handle())).flatten();
        let reason = match handing_off {
            Some(runner_handle) => match self.hand_off(runner_handle).await {
                Ok(()) => EndReason::HandedOver,
                Err(e) => {
                    warn!("cannot hand the session over ({e}); ending it");
                    EndReason::Shutdown
                }
            },
            None if reason == EndReason::HandedOver => EndReason::Shutdown,
            None => reason,
        };
        if matches!(reason, EndReason::HandedOver | EndReason::TakenOver)
            && let Some(runner) = runner
        {
            self.let_go(&reason, runner);
            return;
        }
        let lifetime_ms = started.elapsed().as_millis() as u64;
        info!(%reason, lifetime_ms, "session ending");
        crate::metrics::session_ended(reason.label());
        audit::session_ended(
            &self.shared.id,
            self.key_fingerprint.as_deref(),
            reason.label(),
            lifetime_ms,
            self.shared.calls.load(Ordering::Relaxed),
        );
        // A runner that is not connected cannot be told to stop; don't wait for it.
        let grace = if self.link.is_some() { self.timeouts.runner_stop_grace } else { Duration::ZERO };
        let place = self.teardown(&reason);
        match runner {
            Some(runner) if self.unseen => runner.release(),
            Some(runner) => runner.stop(grace).await,
            None => {}
        }
        // Only now may another session take the place: its runner is gone.
        drop(place);
        self.shared.finished.cancel();
        debug!("session ended");
    }

    /// With instances sharing Redis, records what another would need to take
    /// the session over, without waiting for it.
    fn note_snapshot(&self) {
        if let Some(cluster) = self.cluster.clone() {
            let (id, snapshot) = (self.shared.id.clone(), SessionHandle { shared: self.shared.clone() }.snapshot());
            tokio::spawn(async move {
                if let Err(e) = cluster.note(&id, &snapshot).await {
                    debug!("the session's snapshot waits for the next renewal: {e}");
                }
            });
        }
    }

    /// Writes the session's last snapshot, counts and all, and gives up its
    /// ownership in the directory, for another instance to take.
    async fn hand_off(&mut self, runner_handle: String) -> Result<(), crate::cluster::ClusterError> {
        let Some(cluster) = self.cluster.clone() else {
            return Err(crate::cluster::ClusterError::Unavailable("no Redis is configured".into()));
        };
        let mut snapshot = SessionHandle { shared: self.shared.clone() }.snapshot();
        snapshot.handle = runner_handle;
        let acked = self.window.acked();
        let unacked = match self.window.resume(acked) {
            Ok(frames) => frames.map(|frame| String::from_utf8_lossy(frame).into_owned()).collect(),
            Err(_) => Vec::new(),
        };
        snapshot.counts = Some(Counts { acked, unacked, received: self.clock.received() });
        // Its successor reads the journal's events for resumptions.
        if let Some(journal) = &self.journal {
            journal.flush(HAND_OVER_MARGIN / 2).await;
        }
        cluster.hand_off(&self.shared.id, &snapshot).await?;
        cluster.nudge(&self.shared.id).await;
        Ok(())
    }

    /// Lets the session go on at another instance: leaves this instance's
    /// table (keeping its place in the shared count), answers whatever still
    /// waits here, closes the runner's socket without a goodbye so that it
    /// dials again, and leaves the runner running.
    fn let_go(&mut self, reason: &EndReason, runner: Box<dyn RunnerProcess>) {
        info!(reason = reason.label(), "session moves to another instance");
        crate::metrics::session_ended(reason.label());
        let place = self.teardown(reason);
        runner.release();
        drop(place);
        self.shared.finished.cancel();
    }

    /// Whether a runner has connected at least once.
    fn ever_attached(&self) -> bool {
        self.shared.attached_once.load(Ordering::Acquire)
    }

    fn requested_end(&self) -> EndReason {
        self.shared.end_reason.lock().expect("end reason lock").clone().unwrap_or(EndReason::Shutdown)
    }

    /// The relay loop. Returns why the session ends. `exited` is followed
    /// until the runner first connects, and after only when `follow`.
    async fn serve(&mut self, exited: &mut BoxFuture<'_, String>, follow: bool, started: Instant) -> EndReason {
        let dial_back = tokio::time::sleep_until(started + self.timeouts.dial_back);
        tokio::pin!(dial_back);
        let idle = tokio::time::sleep(self.timeouts.idle);
        tokio::pin!(idle);
        let ack = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(ack);
        let mut ack_armed = false;
        let mut heartbeat = tokio::time::interval_at(Instant::now() + self.timeouts.heartbeat, self.timeouts.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let silence_limit = self.timeouts.heartbeat * MISSED_HEARTBEATS;
        // One waiter for the whole loop: making a fresh one per message would
        // lock the token's waiter list every time.
        let ending = self.shared.ending.clone();
        let cancelled = ending.cancelled();
        tokio::pin!(cancelled);
        let hand_over = self.shared.hand_over.clone();
        let asked_to_hand_over = hand_over.cancelled();
        tokio::pin!(asked_to_hand_over);
        // Set once asked: the session goes when nothing is in flight, or at this deadline.
        let mut hand_over_by: Option<Instant> = None;

        loop {
            let accepting = self.window.has_room();
            let attached = self.link.is_some();
            let reattach_by = self.detached_since.map(|since| since + self.timeouts.reconnect_grace);
            // Unbiased: neither the client's messages nor the runner's may starve the other.
            tokio::select! {
                () = &mut cancelled => return self.requested_end(),
                () = &mut asked_to_hand_over, if hand_over_by.is_none() && self.cluster.is_some() => {
                    // Before the gateway's own wait for the hand-over ends.
                    hand_over_by = Some(Instant::now() + self.timeouts.drain.saturating_sub(HAND_OVER_MARGIN));
                }
                () = sleep_until_opt(hand_over_by), if hand_over_by.is_some() => {
                    warn!(in_flight = self.in_flight.len(), "handing the session over with requests still in flight");
                    return EndReason::HandedOver;
                }
                status = &mut *exited, if follow || !self.ever_attached() => {
                    return EndReason::RunnerLost(format!("runner process ended: {status}"));
                }
                frame = recv(&mut self.link) => {
                    if let Some(reason) = self.on_frame(frame) {
                        return reason;
                    }
                    if self.clock.owed(self.deliverable()) && !ack_armed {
                        ack.as_mut().reset(Instant::now() + ACK_DELAY);
                        ack_armed = true;
                    }
                }
                () = journal::more_written(&mut self.journal) => {
                    if self.journal.as_ref().is_some_and(|journal| journal.written().lost) {
                        return EndReason::TakenOver;
                    }
                    self.release();
                    if self.clock.owed(self.deliverable()) && !ack_armed {
                        ack.as_mut().reset(Instant::now() + ACK_DELAY);
                        ack_armed = true;
                    }
                }
                command = self.commands.recv(), if accepting => {
                    // The handle in `shared` keeps a sender alive, so `None` cannot happen.
                    let Some(command) = command else { return EndReason::Shutdown };
                    if let Some(reason) = self.command(command) {
                        return reason;
                    }
                }
                Some(command) = self.runner_commands.recv() => {
                    if let Some(reason) = self.command(command) {
                        return reason;
                    }
                }
                Some(expired) = self.in_flight.next_expired() => self.time_out(expired),
                () = &mut ack, if ack_armed => {
                    ack_armed = false;
                    self.send_ack();
                }
                () = &mut dial_back, if !self.ever_attached() => {
                    return EndReason::DialBackTimeout(self.timeouts.dial_back);
                }
                () = sleep_until_opt(reattach_by) => {
                    return EndReason::RunnerLost(format!(
                        "it did not reconnect within {}s", self.timeouts.reconnect_grace.as_secs()
                    ));
                }
                () = sleep_until_opt(self.probe.map(|(deadline, _)| deadline)) => {
                    if let Some((_, heard_before)) = self.probe.take() && self.last_heard <= heard_before {
                        self.detach("its socket did not answer a ping after the runner dialed again");
                    }
                }
                _ = heartbeat.tick(), if attached => {
                    if self.last_heard.elapsed() > silence_limit {
                        self.detach(&format!("no heartbeat for {}s", silence_limit.as_secs()));
                        continue;
                    }
                    self.send(Outgoing::Ping);
                    self.restart_journal_if_given_up();
                    if self.token_minted.elapsed() > self.tokens.ttl() / 3 {
                        let token = self.mint_token();
                        self.send(Outgoing::Control(Control::Token { token }));
                    }
                }
                () = &mut idle => {
                    let quiet_since = self.last_request + self.timeouts.idle;
                    let now = Instant::now();
                    if !self.shared.claimed.load(Ordering::Acquire) {
                        idle.as_mut().reset(now + self.timeouts.idle);
                        continue;
                    }
                    if self.in_flight.is_empty() && now >= quiet_since {
                        return EndReason::Idle(self.timeouts.idle);
                    }
                    // Busy sessions look again a full idle period later.
                    idle.as_mut().reset(if now < quiet_since { quiet_since } else { now + self.timeouts.idle });
                }
            }
            if let Some(journal) = &self.journal {
                journal.commit();
            }
            if self.clock.due(self.deliverable()) {
                self.send_ack();
            }
            if hand_over_by.is_some() && self.in_flight.is_empty() && self.commands.is_empty() {
                return EndReason::HandedOver;
            }
        }
    }

    /// Handles one frame (or the end of the connection). Returns a reason when
    /// the session must end.
    fn on_frame(&mut self, frame: Option<Result<Incoming, LinkError>>) -> Option<EndReason> {
        self.last_heard = Instant::now();
        match frame {
            Some(Ok(Incoming::Message(_))) if self.handled_again > 0 => {
                self.handled_again -= 1;
                None
            }
            Some(Ok(Incoming::Message(json))) => {
                let received = self.clock.receive();
                let end = self.route(json);
                if let Some(journal) = &self.journal {
                    journal.received(received);
                }
                end
            }
            Some(Ok(Incoming::Alive)) => None,
            Some(Ok(Incoming::Control(Control::Ack { received }))) => {
                // An ack for frames never sent is a broken runner.
                if let Err(e) = self.window.acknowledge(received) {
                    return Some(EndReason::RunnerLost(e.to_string()));
                }
                if let Some(journal) = &self.journal {
                    journal.acked(self.window.acked());
                }
                None
            }
            Some(Ok(Incoming::Control(Control::ChildExited { code, signal }))) => {
                Some(EndReason::ServerExited(dynogate_shared::frame::describe_exit(code, signal)))
            }
            Some(Ok(Incoming::Control(Control::Bye { reason }))) => Some(EndReason::RunnerLost(reason)),
            Some(Ok(Incoming::Control(other))) => {
                warn!(control = %other, "unexpected control frame from runner");
                None
            }
            Some(Err(e)) => {
                self.detach(&e.to_string());
                None
            }
            None => {
                self.detach("its connection closed");
                None
            }
        }
    }

    /// Drops the runner's socket and waits (bounded) for it to dial again.
    fn detach(&mut self, why: &str) {
        if let Some((link, _slot)) = self.link.take() {
            // A half-open socket could keep its writer blocked for minutes.
            link.abandon();
            warn!(why, grace = ?self.timeouts.reconnect_grace, "runner connection lost; waiting for it to reconnect");
            self.detached_since = Some(Instant::now());
            self.probe = None;
        }
    }

    /// Messages from the runner that may be acknowledged: those handled,
    /// and, with a journal, written.
    fn deliverable(&self) -> u64 {
        let received = self.clock.received();
        self.journal.as_ref().map_or(received, |journal| journal.written().received.min(received))
    }

    /// Messages to the runner that may go: with a journal, those written.
    fn sendable(&self) -> u64 {
        let sent = self.window.sent();
        self.journal.as_ref().map_or(sent, |journal| journal.written().sent.min(sent))
    }

    fn send_ack(&mut self) {
        if self.link.is_some()
            && let Some(received) = self.clock.take(self.deliverable())
        {
            self.send(Outgoing::Control(Control::Ack { received }));
        }
    }

    fn mint_token(&mut self) -> dynogate_shared::Secret {
        let minted = self.tokens.mint(&self.shared.id);
        let mut live = self.shared.tokens.lock().expect("tokens lock");
        live.push_back(minted.jti);
        while live.len() > LIVE_TOKENS {
            live.pop_front();
        }
        self.token_minted = Instant::now();
        minted.token
    }

    /// Routes one message from the MCP server to the client.
    fn route(&mut self, json: Bytes) -> Option<EndReason> {
        match jsonrpc::peek(&json) {
            Ok(Kind::Response { id, is_error }) => {
                let Some(call) = self.in_flight.take(&id) else {
                    debug!(%id, "response to no waiting request (answered, cancelled or timed out)");
                    return None;
                };
                self.publish_in_flight();
                self.call_done(&call.id);
                self.observe(&call, &json, is_error);
                let mut end = None;
                if call.is_initialize {
                    if is_error {
                        end = Some(EndReason::InitializeFailed);
                    } else if let Some(version) = jsonrpc::negotiated_version(&json) {
                        let _ = self.shared.protocol_version.set(version);
                        self.note_snapshot();
                    }
                }
                self.answer(&call, json);
                end
            }
            Ok(Kind::OrphanError) => {
                // The server could not read some request's id. With one
                // request in flight that request is the one; otherwise the
                // error goes where unattributed messages go.
                let Some(id) = self.in_flight.sole().map(|call| call.id.clone()) else {
                    warn!("the MCP server sent an error with a null id while several requests are in flight");
                    self.publish(self.shared.streams.standalone(), json, false);
                    return None;
                };
                let call = self.in_flight.take(&id).expect("the sole request is in flight");
                self.publish_in_flight();
                self.call_done(&call.id);
                let error = jsonrpc::error_object(&json).unwrap_or_default();
                let answer = format!(r#"{{"jsonrpc":"2.0","id":{},"error":{error}}}"#, id.as_json());
                let end = call.is_initialize.then_some(EndReason::InitializeFailed);
                self.answer(&call, answer.into());
                end
            }
            Ok(Kind::Notification { method, .. }) if method == "notifications/progress" => {
                let stream = jsonrpc::progress_token_of_notification(&json)
                    .and_then(|token| self.in_flight.progress_stream(&token))
                    .cloned();
                self.publish(stream.as_ref().unwrap_or(self.shared.streams.standalone()), json, false);
                None
            }
            Ok(_) => {
                self.publish(self.unattributed_target(), json, false);
                None
            }
            Err(e) => {
                warn!(error = %e, "the MCP server sent something that is not JSON-RPC; dropped");
                None
            }
        }
    }

    /// Where a server message that names no request goes: the GET stream;
    /// but when no client is reading that and exactly one request is in
    /// flight, that request's own stream, which its client is reading (MCP
    /// lets a client never open a GET stream, and a direct connection would
    /// deliver a sampling request made during a call on the call's stream).
    fn unattributed_target(&self) -> &Arc<EventStream> {
        let standalone = self.shared.streams.standalone();
        if Transport::from_u8(self.shared.transport.load(Ordering::Acquire)) == Transport::Streamable
            && !standalone.has_reader()
            && let Some(call) = self.in_flight.sole()
        {
            return &call.stream;
        }
        standalone
    }

    fn publish_in_flight(&self) {
        self.shared.in_flight.store(self.in_flight.len(), Ordering::Release);
    }

    /// Counts an answer from the server, and writes a tool call's audit line.
    fn observe(&mut self, call: &Call, json: &Bytes, is_error: bool) {
        crate::metrics::request_answered(call.method, call.received.elapsed());
        if is_error {
            let answer = serde_json::from_slice::<serde_json::Value>(json).unwrap_or_default();
            let code = answer["error"]["code"].as_i64().unwrap_or(0);
            let message = answer["error"]["message"].as_str().unwrap_or_default();
            crate::status::error_sent(code, message, Some(call.method), Some(&self.shared.id));
        }
        if let Some(tool) = &call.audit {
            tool.answered(&self.shared.id, self.key_fingerprint.as_deref(), json);
        }
        if call.method == "tools/call" {
            if let Some(timing) = dynogate_shared::timing::Timing::from_answer(json) {
                crate::metrics::code_tool_timed(&timing);
            }
            if self.shared.calls.fetch_add(1, Ordering::Relaxed) == 0 {
                crate::metrics::first_result(self.began.elapsed());
            }
        }
    }

    /// Delivers a call's final answer.
    fn answer(&self, call: &Call, json: Bytes) {
        if self.publish(&call.stream, json, true) {
            self.finish_stream(&call.stream);
        }
    }

    /// Adds a message to a stream, and to the journal. Returns true when it
    /// completes the stream.
    fn publish(&self, stream: &EventStream, json: Bytes, last: bool) -> bool {
        let pushed = match &self.journal {
            Some(journal) => {
                let pushed = stream.push(json.clone(), last);
                if let Some(n) = pushed.n {
                    journal.event(stream.id(), n, last, json);
                }
                pushed
            }
            None => stream.push(json, last),
        };
        pushed.complete
    }

    fn finish_stream(&self, stream: &EventStream) {
        self.shared.streams.finish(stream.id());
        if let Some(journal) = &self.journal {
            journal.stream_done(stream.id());
        }
    }

    /// A request awaits its answer no more.
    fn call_done(&self, id: &RequestId) {
        if let Some(journal) = &self.journal {
            journal.done(id);
        }
    }

    fn fail(&self, call: &Call, code: i64, message: &str) {
        crate::status::error_sent(code, message, Some(call.method), Some(&self.shared.id));
        self.answer(call, error_body(Some(&call.id), code, message, None).into());
    }

    /// Handles a command from a handler. Returns a reason when the session must end.
    fn command(&mut self, command: Command) -> Option<EndReason> {
        match command {
            Command::Call(mut call) => {
                self.last_request = Instant::now();
                // Read only when the audit trail is logged: it parses the request.
                if call.method == "tools/call" && audit::enabled() {
                    call.audit = audit::ToolCall::from_request(&call.payload);
                }
                let payload = call.payload.clone();
                let record = self.journal.as_ref().map(|_| call_record(&call));
                if let Err(refused) = self.in_flight.admit(call, self.timeouts.request) {
                    self.fail(&refused.call, refused.code, &refused.message);
                    return None;
                }
                self.publish_in_flight();
                self.send_request(payload, record);
            }
            Command::Notify { payload, cancelled } => {
                self.last_request = Instant::now();
                if let Some(id) = cancelled
                    && let Some(call) = self.in_flight.take(&id)
                {
                    // MCP: a cancelled request gets no response. Its stream
                    // just ends (a late answer from the server is dropped).
                    self.publish_in_flight();
                    self.call_done(&call.id);
                    debug!(%id, "request cancelled by the client");
                    if call.stream.give_up_one() {
                        self.finish_stream(&call.stream);
                    }
                }
                self.send_message(payload);
            }
            Command::Attach { link, slot, received, acked, jti } => {
                return self.attach(link, slot, received, acked, jti);
            }
            Command::RunnerRefused { reason } => return Some(EndReason::RunnerRefused(reason)),
            Command::Probe => {
                if self.link.is_some() && self.probe.is_none() {
                    self.probe = Some((Instant::now() + PROBE_TIMEOUT, self.last_heard));
                    self.send(Outgoing::Ping);
                }
            }
            Command::Claimed => {
                self.last_request = Instant::now();
                self.began = Instant::now();
                info!(ready = self.link.is_some(), "claimed from the warm pool");
                // The runner's credentials from here on are the session's
                // own; the pool's token ages out of the accepted few.
                if self.link.is_some() {
                    let token = self.mint_token();
                    self.send(Outgoing::Control(Control::Token { token }));
                }
            }
        }
        None
    }

    /// Takes a runner's new socket: welcome it, then resend what it lacks.
    fn attach(&mut self, link: Link, slot: RunnerSlot, received: u64, acked: u64, jti: String) -> Option<EndReason> {
        // What of the window the runner has had (or never will): after a
        // journal that does not fit, only messages queued since the take-over
        // are still to go.
        let mut had = self.window.acked();
        if let Some(journal_sent) = self.recovered.take() {
            let fits = (self.window.acked()..=journal_sent).contains(&received) && acked <= self.clock.received();
            if !fits {
                warn!(
                    received,
                    acked, "the runner's hello does not fit the dead owner's journal; counting from the hello"
                );
                had = journal_sent;
                self.blind = true;
            }
        }
        if std::mem::take(&mut self.blind) {
            // Taken over from an owner that died: what it had sent and the
            // runner never got is lost; from here on nothing is.
            // Messages queued meanwhile go first after what it received.
            info!(received, acked, "counting from the runner's hello");
            let queued: Vec<Bytes> = self.window.after(had).cloned().collect();
            self.window = SendWindow::starting_at(received);
            for frame in queued {
                self.window.push(frame);
            }
            self.clock = AckClock::resumed(acked);
            // The journal starts again from here: through the same writer,
            // so nothing recorded before lands after.
            match &self.journal {
                Some(journal) => journal.restart(received, acked),
                None => {
                    self.journal = self.cluster.clone().map(|cluster| {
                        let journal = Journal::start(cluster, &self.shared.id, (received, received, acked), None);
                        self.shared.streams.on_forget(journal.forgetter());
                        journal
                    });
                }
            }
            self.rewrite_journal();
        }
        self.unseen = false;
        if self.shared.trusting.swap(false, Ordering::AcqRel) {
            // The token it holds stays good until the welcome's reaches it.
            self.shared.tokens.lock().expect("tokens lock").push_back(jti);
        }
        let token = self.mint_token();
        let sendable = self.sendable();
        // The welcome counts only what is written ahead (if this instance
        // died now, its successor would count so): the runner sends the rest
        // again, and this instance, which handled it, lets it pass.
        let counted = self.deliverable();
        self.handled_again = self.clock.received() - counted;
        let resend = match self.window.resume(received) {
            Ok(resend) => resend,
            // A runner that restarted from scratch lost the MCP server's state.
            Err(e) => return Some(EndReason::RunnerLost(format!("it came back out of step: {e}"))),
        };
        let welcome = Control::Welcome { protocol: PROTOCOL_VERSION, received: counted, token };
        link.send(Outgoing::Control(welcome));
        let mut resent = 0;
        for frame in resend.take(sendable.saturating_sub(received) as usize) {
            link.send(Outgoing::Message(frame.clone()));
            resent += 1;
        }
        self.released = sendable.max(received);
        if let Some(journal) = &self.journal {
            journal.acked(self.window.acked());
        }
        if self.ever_attached() {
            info!(resent, "runner reconnected");
            crate::metrics::runner_reconnected();
        } else {
            info!(waited_ms = self.last_heard.elapsed().as_millis() as u64, "runner attached");
            crate::metrics::runner_started(self.last_heard.elapsed());
        }
        self.clock.told(counted);
        self.link = Some((link, slot));
        self.shared.attached_once.store(true, Ordering::Release);
        self.detached_since = None;
        self.last_heard = Instant::now();
        None
    }

    /// Records again what the journal needs of the session as it stands
    /// (after it started again): the messages the runner has not
    /// acknowledged, the requests awaiting answers, the live streams' numbers.
    fn rewrite_journal(&self) {
        let Some(journal) = &self.journal else { return };
        let acked = self.window.acked();
        for (n, frame) in (acked + 1..).zip(self.window.after(acked)) {
            journal.sent(n, frame.clone(), None);
        }
        for call in self.in_flight.iter() {
            journal.call(call_record(call));
        }
        for (stream, last) in self.shared.streams.numbering() {
            journal.numbered(stream, last);
        }
    }

    /// A journal given up while Redis failed starts again once Redis is back.
    fn restart_journal_if_given_up(&mut self) {
        let given_up = self.journal.as_ref().is_some_and(|journal| journal.written().given_up);
        if given_up && self.cluster.as_ref().is_some_and(|cluster| cluster.is_healthy()) {
            info!("Redis answers again; the session's journal starts again");
            if let Some(journal) = &self.journal {
                journal.restart(self.window.acked(), self.clock.received());
            }
            self.rewrite_journal();
        }
    }

    fn time_out(&mut self, id: RequestId) {
        let Some(call) = self.in_flight.expire(&id) else { return };
        self.publish_in_flight();
        self.call_done(&call.id);
        let after = self.timeouts.request.as_secs();
        warn!(%id, after_s = after, "request timed out");
        self.fail(&call, code::REQUEST_TIMEOUT, &format!("no response from the MCP server within {after}s"));
        let cancel = format!(
            r#"{{"jsonrpc":"2.0","method":"notifications/cancelled","params":{{"requestId":{},"reason":"timed out at the gateway after {after}s"}}}}"#,
            id.as_json()
        );
        self.send_message(cancel.into());
    }

    /// Sends a JSON-RPC message, keeping it until the runner acknowledges
    /// it; with a journal, once it is written there.
    fn send_message(&mut self, payload: Bytes) {
        self.send_request(payload, None);
    }

    /// [`Session::send_message`], for a request the journal records with it.
    fn send_request(&mut self, payload: Bytes, call: Option<CallRecord>) {
        match &self.journal {
            Some(journal) => {
                self.window.push(payload.clone());
                journal.sent(self.window.sent(), payload, call);
                self.release();
            }
            None => {
                self.window.push(payload.clone());
                self.send(Outgoing::Message(payload));
                self.released = self.window.sent();
            }
        }
    }

    /// Hands the runner's socket the messages that may go and have not.
    fn release(&mut self) {
        let Some((link, _)) = &self.link else { return };
        let from = self.released.max(self.window.acked());
        let upto = self.sendable();
        if upto <= from {
            return;
        }
        for frame in self.window.after(from).take((upto - from) as usize) {
            link.send(Outgoing::Message(frame.clone()));
        }
        self.released = upto;
    }

    fn send(&mut self, frame: Outgoing) {
        if let Some((link, _)) = &self.link {
            // A closed writer shows up as the end of the incoming stream.
            link.send(frame);
        }
    }

    /// Leaves the table, answers everyone still waiting, and tells the runner
    /// to go (or, for a session moving to another instance, closes its socket
    /// without a goodbye, so that it dials again). Returns the session's place
    /// in the count, to give back once the runner is gone; a moving session's
    /// place in the shared count goes with it.
    fn teardown(&mut self, reason: &EndReason) -> Option<crate::sessions::Reservation> {
        let moving = matches!(reason, EndReason::HandedOver | EndReason::TakenOver);
        // Ending, the journal goes with the session's entry; moving, it is
        // the next owner's.
        self.journal = None;
        let place = self.sessions.remove(&self.shared.id).map(|mut place| {
            if moving {
                place.keep_shared_place();
            }
            place
        });
        self.commands.close();
        self.runner_commands.close();
        let (code, message) = reason.client_error();
        for call in self.in_flight.drain() {
            self.fail(&call, code, &message);
        }
        while let Ok(command) = self.commands.try_recv() {
            if let Command::Call(call) = command {
                self.fail(&call, code, &message);
            }
        }
        self.shared.in_flight.store(0, Ordering::Release);
        self.shared.streams.close_all();
        if let Some((link, _slot)) = self.link.take() {
            if !moving {
                link.send(Outgoing::Control(Control::Shutdown { reason: message }));
            }
            link.send(Outgoing::Close);
        }
        place
    }
}

/// What the journal keeps of a request awaiting its answer.
fn call_record(call: &Call) -> CallRecord {
    CallRecord {
        id: call.id.clone(),
        stream: call.stream.id(),
        progress_token: call.progress_token.clone(),
        method: call.method.to_owned(),
    }
}

/// The next frame of the runner link, or never when there is no link.
async fn recv(link: &mut Option<(Link, RunnerSlot)>) -> Option<Result<Incoming, LinkError>> {
    match link {
        Some((link, _)) => link.recv().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
