//! MCP's streamable HTTP transport: `POST`, `GET` and `DELETE` on `/mcp`,
//! and on `/mcp/{name}` for the sessions of a registered server.
//!
//! This module checks what the transport requires (headers, body, session,
//! protocol revision), turns each message into a [`Command`] for its session,
//! and hands the answer to [`reply`]. It never parses a payload beyond what
//! routing needs, and it forwards every payload as the bytes the client sent.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::value::RawValue;

use crate::AppState;
use crate::cluster::ClusterError;
use crate::config::SERVED_REVISIONS;
use crate::error::McpError;
use crate::jsonrpc::{self, Kind, PeekError, RequestId};
use crate::reply::{self, Priming, Shape};
use crate::session::{Call, Command, EndReason, Session, SessionHandle, SessionParams, Transport};
use crate::sessions::random_id;
use crate::spawn::{Launch, RunnerSpec, ServerChoice};
use crate::streams::{EventStream, parse_event_id};

pub const SESSION_HEADER: &str = "mcp-session-id";
pub const VERSION_HEADER: &str = "mcp-protocol-version";
/// The stateless revision, answered with a pointer to `initialize`.
const STATELESS_REVISION: &str = "2026-07-28";

pub async fn post(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    handle_post(state, headers, body, None).await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn get(State(state): State<AppState>, headers: HeaderMap) -> Response {
    handle_get(state, headers, None).await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn delete(State(state): State<AppState>, headers: HeaderMap) -> Response {
    handle_delete(state, headers, None).await.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /mcp/{name}`: the same transport, on a registered server's sessions.
pub async fn post_on(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match state.registry.choice(&name) {
        Ok(server) => handle_post(state, headers, body, server).await.unwrap_or_else(IntoResponse::into_response),
        Err(unknown) => unknown.into_response(),
    }
}

/// `GET /mcp/{name}`.
pub async fn get_on(State(state): State<AppState>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    match state.registry.choice(&name) {
        Ok(server) => handle_get(state, headers, server).await.unwrap_or_else(IntoResponse::into_response),
        Err(unknown) => unknown.into_response(),
    }
}

/// `DELETE /mcp/{name}`.
pub async fn delete_on(State(state): State<AppState>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    match state.registry.choice(&name) {
        Ok(server) => handle_delete(state, headers, server).await.unwrap_or_else(IntoResponse::into_response),
        Err(unknown) => unknown.into_response(),
    }
}

async fn handle_post(
    state: AppState,
    headers: HeaderMap,
    body: Body,
    server: Option<ServerChoice>,
) -> Result<Response, McpError> {
    if !(accepts(&headers, "application/json") && accepts(&headers, "text/event-stream")) {
        return Err(McpError::NotAcceptable("POST requests must accept both application/json and text/event-stream"));
    }
    check_content_type(&headers)?;
    let body = read_body(body, &headers, state.config.limits.max_body_bytes).await?;
    let session = session_id(&headers);
    if jsonrpc::first_byte(&body) == Some(b'[') {
        return batch(state, &headers, session, body, server.as_ref()).await;
    }
    let kind = jsonrpc::peek_client(&body).map_err(peek_error)?;
    let Some(session) = session else {
        return match kind {
            Kind::Request { id, method, progress_token } if method == "initialize" => {
                initialize(state, id, progress_token, body, server).await
            }
            kind if kind.method() == Some("server/discover") || version(&headers) == Some(STATELESS_REVISION) => {
                let (id, method) = match kind {
                    Kind::Request { id, method, .. } => (Some(id), method),
                    other => (None, other.method().unwrap_or_default().to_owned()),
                };
                Err(McpError::StatelessRevision { id, method })
            }
            _ => Err(McpError::MissingSession),
        };
    };
    let handle = streamable_session(&state, session, server.as_ref())?;
    check_version(&headers)?;
    match kind {
        Kind::Request { method, .. } if method == "initialize" => Err(McpError::InvalidRequest(
            "this session is already initialized; send initialize without Mcp-Session-Id to start a new session".into(),
        )),
        Kind::Request { id, method, progress_token } => {
            refuse_while_draining(&state)?;
            let stream = handle.streams().open(1);
            let call = Call::new(id, progress_token, body, &method, stream.clone());
            submit(&state, &handle, &stream, Command::Call(call)).await?;
            let priming = Priming::for_version(handle.protocol_version());
            Ok(reply::respond(
                handle.streams(),
                stream,
                1,
                Shape::Single,
                state.reply_timing(),
                priming,
                HeaderMap::new(),
            )
            .await)
        }
        Kind::Notification { cancelled, .. } => notify(&state, &handle, body, cancelled).await,
        Kind::Response { .. } | Kind::OrphanError => notify(&state, &handle, body, None).await,
    }
}

/// A session for a new client of either transport: one from the warm pool
/// when there is one, else a new one (see [`start_session`]).
pub(crate) async fn create_session(
    state: &AppState,
    transport: Transport,
    launch: Launch,
) -> Result<SessionHandle, McpError> {
    if state.draining.is_cancelled() {
        return Err(McpError::Overloaded { message: "the gateway is shutting down".into(), retry_after_secs: 5 });
    }
    // The pool holds runners of the default server and size only.
    if launch.is_default()
        && let Some(handle) = state.pool.claim(transport)
    {
        return Ok(handle);
    }
    start_session(state, transport, false, launch).await
}

/// Starts a session: reserves its place, mints its runner's token, and
/// starts its task (which starts the runner). A `pooled` one waits in the
/// warm pool, invisible to clients, until [`crate::pool::Pool::claim`].
pub(crate) async fn start_session(
    state: &AppState,
    transport: Transport,
    pooled: bool,
    launch: Launch,
) -> Result<SessionHandle, McpError> {
    if state.draining.is_cancelled() {
        return Err(McpError::Overloaded { message: "the gateway is shutting down".into(), retry_after_secs: 5 });
    }
    let runner_url = state
        .runner_url
        .clone()
        .ok_or_else(|| McpError::Overloaded { message: crate::config::NO_PUBLIC_URL.into(), retry_after_secs: 60 })?;
    state.spawner.admit().map_err(|message| McpError::Overloaded { message, retry_after_secs: 60 })?;
    let session_id = random_id();
    let server = launch.server.as_ref().map(|s| s.name.clone());
    let reservation = state.sessions.admit(&session_id, server.as_deref()).await.map_err(|refusal| {
        let retry_after_secs = match refusal {
            crate::sessions::Refusal::Full(_) | crate::sessions::Refusal::Shared(ClusterError::Full(_)) => 10,
            crate::sessions::Refusal::Shared(ClusterError::Unavailable(_)) => 2,
        };
        McpError::Overloaded { message: refusal.to_string(), retry_after_secs }
    })?;
    crate::metrics::session_started(pooled);
    Ok(run_session(state, session_id, transport, pooled, runner_url, launch, reservation, None))
}

/// Builds a session with the gateway's settings (a fresh runner token
/// included), puts it in the table in its reserved `place`, and starts its
/// task: a new session, or one `adopted` from another instance.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_session(
    state: &AppState,
    id: String,
    transport: Transport,
    pooled: bool,
    gateway_url: url::Url,
    launch: Launch,
    place: crate::sessions::Reservation,
    adopted: Option<crate::session::Adopted>,
) -> SessionHandle {
    let minted = state.tokens.mint(&id);
    let (session, handle) = Session::new(SessionParams {
        id: id.clone(),
        transport,
        pooled,
        spec: RunnerSpec { session: id, token: minted.token, gateway_url, launch, traceparent: None },
        token_id: minted.jti,
        tokens: state.tokens.clone(),
        spawner: state.spawner.clone(),
        sessions: state.sessions.clone(),
        timeouts: state.config.timeouts.clone(),
        budget: state.budget.clone(),
        shutdown: state.shutdown.clone(),
        key_fingerprint: state.api_key.as_ref().map(crate::auth::ApiKey::fingerprint),
        cluster: state.cluster.clone(),
        adopted,
    });
    // In the table before the task starts, so its runner can find it and its
    // own removal can never come first.
    state.sessions.insert(place, handle.clone());
    session.start(&state.tracker);
    handle
}

/// Starts a session: a runner, its dial-back, and the server's own answer to
/// `initialize`, returned with the new `Mcp-Session-Id`.
async fn initialize(
    state: AppState,
    id: RequestId,
    progress_token: Option<RequestId>,
    body: Bytes,
    server: Option<ServerChoice>,
) -> Result<Response, McpError> {
    let handle = create_session(&state, Transport::Streamable, Launch { server, size: None }).await?;
    let stream = handle.streams().open(1);
    let call = Call::new(id, progress_token, body, "initialize", stream.clone());
    submit(&state, &handle, &stream, Command::Call(call)).await?;
    let mut headers = HeaderMap::new();
    headers.insert(SESSION_HEADER, HeaderValue::from_str(handle.id()).expect("hex ids are valid header values"));
    // The revision is not agreed yet; a comment opens a stream every client reads.
    Ok(reply::respond(handle.streams(), stream, 1, Shape::Single, state.reply_timing(), Priming::Comment, headers)
        .await)
}

/// A JSON-RPC batch: allowed only on a session that negotiated 2025-03-26.
async fn batch(
    state: AppState,
    headers: &HeaderMap,
    session: Option<&str>,
    body: Bytes,
    server: Option<&ServerChoice>,
) -> Result<Response, McpError> {
    let elements: Vec<&RawValue> =
        serde_json::from_slice(&body).map_err(|e| peek_error(PeekError::Parse(e.to_string())))?;
    let session = session.ok_or(McpError::MissingSession)?;
    let handle = streamable_session(&state, session, server)?;
    check_version(headers)?;
    let negotiated = handle.protocol_version().unwrap_or("unknown");
    if negotiated != "2025-03-26" {
        return Err(McpError::BatchNotAllowed(negotiated.to_owned()));
    }
    if elements.is_empty() {
        return Err(McpError::InvalidRequest("an empty batch".into()));
    }
    let kinds = elements
        .iter()
        .map(|element| jsonrpc::peek_client(element.get().as_bytes()).map_err(peek_error))
        .collect::<Result<Vec<_>, _>>()?;
    if kinds.iter().any(|k| k.method() == Some("initialize")) {
        return Err(McpError::InvalidRequest("initialize cannot be part of a batch".into()));
    }
    let requests = kinds.iter().filter(|k| matches!(k, Kind::Request { .. })).count();
    if requests > 0 {
        refuse_while_draining(&state)?;
    }
    let stream = handle.streams().open(requests);
    for (i, (element, kind)) in elements.into_iter().zip(kinds).enumerate() {
        let payload = body.slice_ref(element.get().as_bytes());
        let command = match kind {
            Kind::Request { id, method, progress_token } => {
                Command::Call(Call::new(id, progress_token, payload, &method, stream.clone()))
            }
            Kind::Notification { cancelled, .. } => Command::Notify { payload, cancelled },
            Kind::Response { .. } | Kind::OrphanError => Command::Notify { payload, cancelled: None },
        };
        match submit(&state, &handle, &stream, command).await {
            // Part of the batch reached the session: the rest must not be
            // tried again elsewhere, as a wholly undelivered request may be.
            Err(McpError::UnknownSession) if i > 0 => return Err(McpError::SessionEndedMidway),
            other => other?,
        }
    }
    if requests == 0 {
        handle.streams().forget(stream.id());
        return Ok(StatusCode::ACCEPTED.into_response());
    }
    let priming = Priming::for_version(handle.protocol_version());
    Ok(reply::respond(
        handle.streams(),
        stream,
        requests,
        Shape::Batch,
        state.reply_timing(),
        priming,
        HeaderMap::new(),
    )
    .await)
}

pub(crate) async fn notify(
    state: &AppState,
    handle: &SessionHandle,
    payload: Bytes,
    cancelled: Option<RequestId>,
) -> Result<Response, McpError> {
    handle.send(Command::Notify { payload, cancelled }, state.config.timeouts.request).await.map_err(McpError::from)?;
    Ok(StatusCode::ACCEPTED.into_response())
}

/// Hands a command to its session; if that fails, the answer's stream is
/// forgotten (nothing will ever complete it).
async fn submit(
    state: &AppState,
    handle: &SessionHandle,
    stream: &EventStream,
    command: Command,
) -> Result<(), McpError> {
    let sent = handle.send(command, state.config.timeouts.request).await;
    if sent.is_err() {
        handle.streams().forget(stream.id());
    }
    Ok(sent?)
}

/// While draining, requests on live sessions are refused so the drain ends.
pub(crate) fn refuse_while_draining(state: &AppState) -> Result<(), McpError> {
    if state.draining.is_cancelled() {
        return Err(McpError::Overloaded {
            message: "the gateway is shutting down; start a new session to continue".into(),
            retry_after_secs: 5,
        });
    }
    Ok(())
}

/// The session an `Mcp-Session-Id` names; sessions of the older transport
/// are reached through `/messages` only.
/// A streamable HTTP session of the server this endpoint serves: another
/// endpoint's session is unknown here.
fn streamable_session(state: &AppState, id: &str, server: Option<&ServerChoice>) -> Result<SessionHandle, McpError> {
    let name = server.map(|s| &*s.name);
    state
        .sessions
        .get(id)
        .filter(|h| h.transport() == Transport::Streamable && h.server() == name)
        .ok_or(McpError::UnknownSession)
}

async fn handle_get(state: AppState, headers: HeaderMap, server: Option<ServerChoice>) -> Result<Response, McpError> {
    if !accepts(&headers, "text/event-stream") {
        return Err(McpError::NotAcceptable("GET requests must accept text/event-stream"));
    }
    let session = session_id(&headers).ok_or(McpError::MissingSession)?;
    let handle = streamable_session(&state, session, server.as_ref())?;
    check_version(&headers)?;
    let priming = Priming::for_version(handle.protocol_version());
    let keepalive = state.config.timeouts.heartbeat;
    let last_event = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let (stream, after): (Arc<EventStream>, Option<u64>) = match last_event {
        None => (handle.streams().standalone().clone(), None),
        Some(text) => {
            let (id, n) = parse_event_id(text).ok_or_else(|| McpError::CannotResume(text.to_owned()))?;
            let stream = handle.streams().find(id).ok_or_else(|| McpError::CannotResume(text.to_owned()))?;
            if !stream.can_resume_after(n) {
                return Err(McpError::CannotResume(text.to_owned()));
            }
            (stream, Some(n))
        }
    };
    Ok(reply::sse(stream, after, keepalive, priming, HeaderMap::new()))
}

async fn handle_delete(
    state: AppState,
    headers: HeaderMap,
    server: Option<ServerChoice>,
) -> Result<Response, McpError> {
    let session = session_id(&headers).ok_or(McpError::MissingSession)?;
    let handle = streamable_session(&state, session, server.as_ref())?;
    end_and_wait(&state, &handle, EndReason::Deleted).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Ends a session and waits (bounded) until its runner is gone, so a client
/// that deletes and checks sees a clean machine.
pub(crate) async fn end_and_wait(state: &AppState, handle: &SessionHandle, reason: EndReason) {
    handle.end(reason);
    let bound = state.config.timeouts.runner_stop_grace + Duration::from_secs(5);
    if tokio::time::timeout(bound, handle.finished()).await.is_err() {
        tracing::warn!(session = %dynogate_shared::names::log_id(handle.id()), ?bound, "session teardown still running");
    }
}

pub(crate) fn check_content_type(headers: &HeaderMap) -> Result<(), McpError> {
    match headers.get(header::CONTENT_TYPE) {
        Some(content_type) if !media_type_is(content_type, "application/json") => Err(McpError::UnsupportedMediaType),
        _ => Ok(()),
    }
}

fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok())
}

fn version(headers: &HeaderMap) -> Option<&str> {
    headers.get(VERSION_HEADER).and_then(|v| v.to_str().ok())
}

/// Refuses a `MCP-Protocol-Version` this gateway does not serve. A missing
/// header is allowed: the spec then assumes the session's own revision.
fn check_version(headers: &HeaderMap) -> Result<(), McpError> {
    match headers.get(VERSION_HEADER) {
        None => Ok(()),
        Some(value) => match value.to_str() {
            Ok(v) if SERVED_REVISIONS.contains(&v) => Ok(()),
            Ok(v) => Err(McpError::UnsupportedVersion(v.to_owned())),
            Err(_) => Err(McpError::UnsupportedVersion(String::from_utf8_lossy(value.as_bytes()).into_owned())),
        },
    }
}

pub(crate) fn peek_error(error: PeekError) -> McpError {
    match error {
        PeekError::Parse(message) => McpError::Parse(message),
        PeekError::Invalid(message) => McpError::InvalidRequest(message.to_owned()),
    }
}

/// Reads the body, refusing more than `limit` bytes, a body that does not
/// arrive in time (408), and anything that is not UTF-8 (JSON must be; and a
/// message the runner's socket could not carry must not get a sequence
/// number).
pub(crate) async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, McpError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(McpError::TooLarge { limit });
    }
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        match (crate::listen::watch::body_timeout(&e), declared) {
            // The listener's deadline on the body (BODY_READ_TIMEOUT).
            (Some(limit), _) => McpError::BodyTimeout { limit },
            // Within a declared length, a failure is the client going away.
            (None, Some(_)) => McpError::InvalidRequest("the request body could not be read".into()),
            (None, None) => McpError::TooLarge { limit },
        }
    })?;
    if std::str::from_utf8(&bytes).is_err() {
        return Err(McpError::Parse("the body is not UTF-8".into()));
    }
    Ok(bytes)
}

/// Whether the `Accept` header admits `wanted` (wildcards count, `q=0` does not).
pub(crate) fn accepts(headers: &HeaderMap, wanted: &str) -> bool {
    let main_type = wanted.split('/').next().unwrap_or_default();
    headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|item| {
        let mut parts = item.split(';');
        let range = parts.next().unwrap_or_default().trim();
        let refused =
            parts.any(|p| p.trim().strip_prefix("q=").and_then(|q| q.trim().parse::<f32>().ok()) == Some(0.0));
        let matches = range.eq_ignore_ascii_case(wanted)
            || range == "*/*"
            || range.strip_suffix("/*").is_some_and(|t| t.eq_ignore_ascii_case(main_type));
        matches && !refused
    })
}

fn media_type_is(value: &HeaderValue, wanted: &str) -> bool {
    value.to_str().ok().and_then(|v| v.split(';').next()).is_some_and(|v| v.trim().eq_ignore_ascii_case(wanted))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_accept(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn accept_headers_are_matched_with_wildcards_and_quality() {
        let cases = [
            ("application/json, text/event-stream", true, true),
            ("text/event-stream", false, true),
            ("*/*", true, true),
            ("application/*, text/*", true, true),
            ("application/json;q=0.5, text/event-stream;q=0", true, false),
            ("text/html", false, false),
        ];
        for (value, json, sse) in cases {
            let headers = with_accept(value);
            assert_eq!(accepts(&headers, "application/json"), json, "{value}");
            assert_eq!(accepts(&headers, "text/event-stream"), sse, "{value}");
        }
        assert!(!accepts(&HeaderMap::new(), "application/json"));
    }

    #[test]
    fn only_served_revisions_pass_the_version_check() {
        let mut headers = HeaderMap::new();
        assert!(check_version(&headers).is_ok());
        for served in SERVED_REVISIONS {
            headers.insert(VERSION_HEADER, HeaderValue::from_static(served));
            assert!(check_version(&headers).is_ok());
        }
        headers.insert(VERSION_HEADER, HeaderValue::from_static("1999-01-01"));
        assert!(matches!(check_version(&headers), Err(McpError::UnsupportedVersion(v)) if v == "1999-01-01"));
    }
}
