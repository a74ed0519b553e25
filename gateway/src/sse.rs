//! MCP's older HTTP+SSE transport (revision 2024-11-05), on the same sessions
//! and runners as streamable HTTP.
//!
//! `GET /sse` starts a session and streams it: first an `endpoint` event
//! naming `/messages/?session_id=<id>`, then every message from the server as
//! an `event: message`. The client POSTs each of its messages to that
//! endpoint and gets 202 at once; answers arrive on the stream. The stream is
//! the session: when the client disconnects, the session ends. As in the
//! official SDKs, a POST without `session_id` is 400 and one naming no live
//! session is 404.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;

use crate::AppState;
use crate::error::McpError;
use crate::jsonrpc::{self, Kind};
use crate::mcp::{accepts, check_content_type, create_session, notify, peek_error, read_body, refuse_while_draining};
use crate::session::{Call, Command, EndReason, SessionHandle, Transport};
use crate::sse_encode::{Comment, Encoded};
use crate::streams::{Batch, EventStream, Reader};

#[derive(Debug, Deserialize)]
pub struct MessagesQuery {
    session_id: Option<String>,
}

/// `GET /sse`: a new session and its stream.
pub async fn open(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if !accepts(&headers, "text/event-stream") {
        return McpError::NotAcceptable("GET /sse must accept text/event-stream").into_response();
    }
    let handle = match create_session(&state, Transport::LegacySse, Default::default()).await {
        Ok(handle) => handle,
        Err(e) => return e.into_response(),
    };
    let mut endpoint = Encoded::default();
    endpoint.event(None, "endpoint", &Bytes::from(format!("/messages/?session_id={}", handle.id())));
    let stream = handle.streams().standalone().clone();
    let body = events(handle, stream, endpoint.finish(), state.config.timeouts.heartbeat);
    let mut response = (StatusCode::OK, Body::from_stream(body)).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// `POST /messages/?session_id=…`: one client message, answered on the stream.
pub async fn message(
    State(state): State<AppState>,
    Query(query): Query<MessagesQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle_message(state, query, headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn handle_message(
    state: AppState,
    query: MessagesQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, McpError> {
    let id = query.session_id.ok_or(McpError::MissingSessionParameter)?;
    let handle =
        state.sessions.get(&id).filter(|h| h.transport() == Transport::LegacySse).ok_or(McpError::UnknownSession)?;
    check_content_type(&headers)?;
    let body = read_body(body, &headers, state.config.limits.max_body_bytes).await?;
    match jsonrpc::peek_client(&body).map_err(peek_error)? {
        Kind::Request { id, method, progress_token } => {
            refuse_while_draining(&state)?;
            let stream = handle.streams().standalone().clone();
            let call = Call::new(id, progress_token, body, &method, stream);
            handle.send(Command::Call(call), state.config.timeouts.request).await.map_err(McpError::from)?;
            Ok((StatusCode::ACCEPTED, "Accepted").into_response())
        }
        Kind::Notification { cancelled, .. } => notify(&state, &handle, body, cancelled).await,
        Kind::Response { .. } | Kind::OrphanError => notify(&state, &handle, body, None).await,
    }
}

/// Ends the session when the client's stream goes away.
struct EndOnDrop(SessionHandle);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.end(EndReason::ClientGone);
    }
}

/// The `/sse` body: the endpoint event, then messages and keepalives.
fn events(
    handle: SessionHandle,
    stream: Arc<EventStream>,
    endpoint: Vec<Bytes>,
    keepalive: Duration,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> {
    let reader = Reader::new(stream, None);
    let state = (EndOnDrop(handle), reader, Some(endpoint), keepalive);
    let batches = futures_util::stream::unfold(state, |(guard, mut reader, endpoint, keepalive)| async move {
        if let Some(endpoint) = endpoint {
            return Some((endpoint, (guard, reader, None, keepalive)));
        }
        let pieces = match reader.read(keepalive).await {
            Batch::Events(events) => {
                let mut out = Encoded::default();
                for event in &events {
                    out.event(None, "message", &event.json);
                }
                out.finish()
            }
            Batch::Quiet => vec![Comment::Keepalive.bytes()],
            Batch::Ended | Batch::Replaced => return None,
        };
        Some((pieces, (guard, reader, None, keepalive)))
    });
    batches.flat_map(|pieces| futures_util::stream::iter(pieces.into_iter().map(Ok)))
}
