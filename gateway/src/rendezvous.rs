//! `GET /rendezvous`: where runners dial back.
//!
//! Before upgrading, the runner's token must verify (signature, audience,
//! expiry), name the session in the query, be the token issued for that
//! session, and the session must have no runner connected yet (a token shown
//! twice is a replay). Any failure is a bare 401 that changes nothing. After
//! the upgrade the runner's first frame must be a `hello` with our protocol
//! version; the socket then goes, as a [`Link`], to the session, which sends
//! the `welcome` (with how much it has received, for resuming) and takes over.
//! WebSocket framing is confined to this file.

use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use dynogate_shared::window::MAX_FRAME_BYTES;
use dynogate_shared::{Control, PROTOCOL_VERSION, frame::version_mismatch};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tracing::{Instrument, info, warn};

use crate::AppState;
use crate::auth::{bearer, unauthorized};
use crate::link::{Incoming, Link, LinkError, Outbox, Outgoing};
use crate::session::{Command, RunnerSlot, SessionHandle};
use crate::throttle::Throttle;

/// WebSocket read buffer. tungstenite zero-fills the whole buffer before each
/// read, and keeps it for the socket's life: its 128 KiB default costs a
/// large memset per message and 128 KiB per idle session.
pub const READ_BUFFER_BYTES: usize = 16 * 1024;
/// How long a connected runner has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Deserialize)]
pub struct RendezvousQuery {
    session: Option<String>,
}

pub async fn accept(
    State(state): State<AppState>,
    Query(query): Query<RendezvousQuery>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Some(session) = query.session else {
        return refuse("runner dialed without a session", "");
    };
    let shown = dynogate_shared::names::log_id(&session);
    let Some(token) = bearer(&headers) else {
        return refuse("runner dialed without a token", shown);
    };
    let claims = match state.tokens.verify(token) {
        Ok(claims) => claims,
        Err(e) => return refuse(&e.to_string(), shown),
    };
    if claims.sid != session {
        return refuse("token names another session", shown);
    }
    match state.sessions.get_any(&session).filter(|handle| !handle.is_handing_over()) {
        Some(handle) => attach_here(&state, handle, &claims.jti, &headers, upgrade, shown),
        None => elsewhere(&state, session, claims.jti, &headers, upgrade).await,
    }
}

/// A dial for a session this instance holds: the token must be one it
/// accepts and no runner connected; then the handshake.
fn attach_here(
    state: &AppState,
    handle: SessionHandle,
    jti: &str,
    headers: &HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    shown: &str,
) -> Response {
    let span = tracing::info_span!("rendezvous", session = %shown);
    // The runner's own span (its start-up, or its redial) is the parent.
    if let Some(parent) = headers.get(dynogate_telemetry::TRACEPARENT).and_then(|v| v.to_str().ok()) {
        dynogate_telemetry::set_parent(&span, parent);
    }
    let _enter = span.enter();
    if !handle.accepts_token(jti) {
        warn!("token is not one this session issued, or it was superseded");
        return unauthorized();
    }
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let Some(slot) = handle.claim_runner_slot() else {
        // Either a replay, or our own runner redialing before the gateway saw
        // its old socket die: have the session check the old socket quickly.
        warn!("token presented while the session's runner is connected");
        handle.probe();
        return unauthorized();
    };
    drop(_enter);
    let (wait, jti) = (state.config.timeouts.request, jti.to_owned());
    configured(upgrade)
        // If the upgrade fails, the callback (and the slot in it) is dropped,
        // which frees the slot for the next attempt.
        .on_upgrade(move |socket| handshake(socket, handle, slot, jti, wait).instrument(span))
}

/// A dial for a session this instance does not hold: with instances sharing
/// Redis, carried to the instance that owns it; else refused.
async fn elsewhere(
    state: &AppState,
    session: String,
    jti: String,
    headers: &HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let shown = dynogate_shared::names::log_id(&session).to_owned();
    let Some(cluster) = state.cluster.clone() else {
        return refuse("token for a session that is not live", &shown);
    };
    let owner = match crate::cluster::adopt::find(state, &cluster, &session).await {
        Ok(crate::cluster::adopt::Whereabouts::At(owner)) => owner,
        // Taken over here just now: the runner is served as if it had dialed its owner.
        Ok(crate::cluster::adopt::Whereabouts::Here(handle)) => {
            return attach_here(state, handle, &jti, headers, upgrade, &shown);
        }
        Ok(crate::cluster::adopt::Whereabouts::Unknown) => {
            return refuse("token for a session that is not live", &shown);
        }
        Err(e) => {
            warn!(session = %shown, "cannot find the instance of a runner's session: {e}");
            return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "the session's instance cannot be found now")
                .into_response();
        }
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let traceparent = headers.get(dynogate_telemetry::TRACEPARENT).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let span = tracing::info_span!("rendezvous", session = %shown);
    configured(upgrade).on_upgrade(move |socket| {
        crate::cluster::tunnel::dial(cluster, owner, socket, session, jti, traceparent).instrument(span)
    })
}

/// The upgrade with this endpoint's buffer and message bounds.
fn configured(upgrade: WebSocketUpgrade) -> WebSocketUpgrade {
    upgrade.read_buffer_size(READ_BUFFER_BYTES).max_message_size(MAX_FRAME_BYTES).max_frame_size(MAX_FRAME_BYTES)
}

/// Unauthenticated dials are anyone's to make: their warnings are rate
/// limited, and what they claim is never logged as given.
static REFUSALS: Throttle = Throttle::new(10, Duration::from_secs(60));

/// A bare 401 for a dial that proved nothing, with a rate-limited warning.
fn refuse(why: &str, session: &str) -> Response {
    if let Some(suppressed) = REFUSALS.admit(std::time::Instant::now()) {
        warn!(session, suppressed, "runner dial refused: {why}");
    }
    unauthorized()
}

/// Runs the hello/welcome exchange and gives the socket to the session.
async fn handshake(mut socket: WebSocket, handle: SessionHandle, slot: RunnerSlot, jti: String, wait: Duration) {
    let (received, acked) = match hello(&mut socket).await {
        Ok(counts) => counts,
        // A runner of another version will never do; a socket that failed
        // before saying hello may be a blip in a redial, which may try again
        // (dropping the slot frees it).
        Err(Refusal { reason, fatal: true }) => {
            let _ = handle.send(Command::RunnerRefused { reason }, wait).await;
            return;
        }
        Err(_) => return,
    };
    // The session sends the welcome: it knows how much it has received.
    let (sink, stream) = socket.split();
    let incoming = stream.filter_map(|message| std::future::ready(incoming(message))).boxed();
    let (mut link, outbox) = Link::new(incoming);
    link.set_writer(tokio::spawn(write(sink, outbox).in_current_span()).abort_handle());
    // If the session ended meanwhile, the link is dropped here, its writer
    // stops, and the socket closes.
    let _ = handle.send(Command::Attach { link, slot, received, acked, jti }, wait).await;
}

/// Why a connected runner was turned away before its session heard of it.
pub(crate) struct Refusal {
    reason: String,
    /// Whether it will never do (another protocol version).
    fatal: bool,
}

/// Reads the runner's hello: its counts of frames received from the gateway
/// and of its own the gateway acknowledged. A runner that fails it is sent a
/// reject and the socket is closed.
pub(crate) async fn hello(socket: &mut WebSocket) -> Result<(u64, u64), Refusal> {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, socket.recv()).await {
        Ok(Some(Ok(Message::Binary(bytes)))) => Control::decode(&bytes).ok(),
        _ => None,
    };
    let refusal = match hello {
        Some(Control::Hello { protocol, runner_version, received, acked }) if protocol == PROTOCOL_VERSION => {
            info!(%runner_version, received, acked, "runner connected");
            return Ok((received, acked));
        }
        Some(Control::Hello { protocol, .. }) => {
            Refusal { reason: version_mismatch(PROTOCOL_VERSION, protocol), fatal: true }
        }
        _ => Refusal { reason: format!("no hello frame within {}s", HELLO_TIMEOUT.as_secs()), fatal: false },
    };
    warn!("runner refused: {}", refusal.reason);
    let reject = Control::Reject { reason: refusal.reason.clone() };
    let _ = socket.send(Message::Binary(reject.encode().into())).await;
    let _ = socket.close().await;
    Err(refusal)
}

/// Maps one WebSocket message to a frame; `None` skips it.
fn incoming(message: Result<Message, axum::Error>) -> Option<Result<Incoming, LinkError>> {
    match message {
        Ok(Message::Text(text)) => Some(Ok(Incoming::Message(Bytes::from(text)))),
        Ok(Message::Binary(bytes)) => {
            Some(Control::decode(&bytes).map(Incoming::Control).map_err(|e| LinkError::Malformed(e.to_string())))
        }
        Ok(Message::Ping(_) | Message::Pong(_)) => Some(Ok(Incoming::Alive)),
        Ok(Message::Close(_)) => None,
        Err(e) => Some(Err(LinkError::Transport(e.to_string()))),
    }
}

/// Writes queued frames, flushing only when the queue runs dry so a burst
/// goes out in few writes.
async fn write(mut sink: SplitSink<WebSocket, Message>, mut outbox: Outbox) {
    while let Some(frame) = outbox.next().await {
        let message = match frame {
            Outgoing::Message(json) => match Utf8Bytes::try_from(json) {
                Ok(text) => Message::Text(text),
                Err(_) => {
                    warn!("dropped a message that is not UTF-8");
                    outbox.written();
                    continue;
                }
            },
            Outgoing::Control(control) => Message::Binary(control.encode().into()),
            Outgoing::Ping => Message::Ping(Bytes::new()),
            Outgoing::Close => {
                let _ = sink.send(Message::Close(None)).await;
                break;
            }
        };
        if sink.feed(message).await.is_err() {
            break;
        }
        outbox.written();
        if outbox.is_empty() && sink.flush().await.is_err() {
            break;
        }
    }
    let _ = sink.close().await;
}
