//! Client requests for a session another instance owns.
//!
//! [`route`] sits in front of the session routes. A request naming a
//! session this instance does not hold, which the directory says another
//! instance owns, is sent to the owner's inbox whole ([`forward`]); the
//! owner runs it through its own router, exactly as if the client had
//! reached it, and streams the answer back ([`serve`]): status, headers,
//! then the body as it comes, so SSE streams, progress and server requests
//! flow as they would locally, with the same errors and bounds. The
//! owner's own request is marked [`Relayed`] so it is never relayed again.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tower::ServiceExt;
use tracing::{debug, warn};

use super::wire::{Header, Message};
use super::{Cluster, ClusterError, keys};
use crate::AppState;
use crate::error::McpError;

/// Messages of one answer that may wait for its client before it is cut.
const QUEUE: usize = 256;
/// Headers that describe one hop's connection, not the message.
const HOP_BY_HOP: [HeaderName; 4] =
    [header::CONNECTION, header::TRANSFER_ENCODING, header::CONTENT_LENGTH, HeaderName::from_static("keep-alive")];

/// Marks a request that reached this instance through the relay.
#[derive(Debug, Clone, Copy)]
pub struct Relayed;

/// Middleware on the session routes: serves here what is here or unknown,
/// and relays to its owner what another instance holds.
pub async fn route(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(cluster) = state.cluster.clone() else { return next.run(request).await };
    if request.extensions().get::<Relayed>().is_some() {
        return next.run(request).await;
    }
    let Some(id) = session_of(&request) else { return next.run(request).await };
    if state.sessions.get_any(&id).is_some() {
        return next.run(request).await;
    }
    let owner = match cluster.owner(&id).await {
        Ok(Some(owner)) if owner != cluster.instance => owner,
        // Unknown, or ours and already gone: answered here, as a 404.
        Ok(_) => return next.run(request).await,
        Err(e) => return unavailable(&e).into_response(),
    };
    forward(&state, &cluster, &owner, request).await.unwrap_or_else(IntoResponse::into_response)
}

/// The session a request names: `Mcp-Session-Id`, or the older
/// transport's `session_id` query parameter.
fn session_of(request: &Request) -> Option<String> {
    if let Some(id) = request.headers().get(crate::mcp::SESSION_HEADER) {
        return id.to_str().ok().map(str::to_owned);
    }
    let query = request.uri().query()?;
    url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "session_id").map(|(_, v)| v.into_owned())
}

fn unavailable(error: &ClusterError) -> McpError {
    McpError::Overloaded {
        message: format!("cannot reach the instance that holds this session: {error}"),
        retry_after_secs: 2,
    }
}

/// An exchange this instance started; dropped before its end, it tells the
/// owner to stop answering.
struct Pending {
    cluster: Arc<Cluster>,
    owner: String,
    rid: String,
    done: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.cluster.inbox.forget(&self.rid);
        if !self.done {
            let (cluster, owner) = (self.cluster.clone(), std::mem::take(&mut self.owner));
            let cancel = Message::bare(Header::Cancel { rid: std::mem::take(&mut self.rid) });
            tokio::spawn(async move {
                let _ = cluster.send(&owner, &cancel).await;
            });
        }
    }
}

/// Sends `request` to `owner` and answers with what it answers.
async fn forward(
    state: &AppState,
    cluster: &Arc<Cluster>,
    owner: &str,
    request: Request,
) -> Result<Response, McpError> {
    let (parts, body) = request.into_parts();
    let body = crate::mcp::read_body(body, &parts.headers, state.config.limits.max_body_bytes).await?;
    let rid = crate::sessions::random_id();
    let mut replies = cluster.inbox.expect(&rid, QUEUE);
    let mut pending = Pending { cluster: cluster.clone(), owner: owner.to_owned(), rid: rid.clone(), done: false };
    let message = Message::new(
        Header::Request {
            rid,
            from: cluster.instance.clone(),
            method: parts.method.to_string(),
            uri: parts.uri.to_string(),
            headers: to_pairs(&parts.headers),
        },
        body,
    );
    if !cluster.inbox.is_listening() {
        pending.done = true;
        return Err(unavailable(&ClusterError::Unavailable("this instance's subscriber is reconnecting".into())));
    }
    match cluster.send(owner, &message).await {
        Ok(true) => {}
        Ok(false) => {
            // Its owner is gone, and the session with it.
            pending.done = true;
            debug!(owner = %dynogate_shared::names::log_id(owner), "the session's instance is gone");
            return Err(McpError::UnknownSession);
        }
        Err(e) => {
            pending.done = true;
            return Err(unavailable(&e));
        }
    }
    crate::metrics::relayed();
    let bound = state.config.timeouts.request + Duration::from_secs(30);
    let (status, headers) = head(cluster, owner, &mut replies, bound).await?;
    let idle = state.config.timeouts.heartbeat * 3;
    let body = futures_util::stream::unfold(Some((replies, pending)), move |exchange| async move {
        let (mut replies, mut pending) = exchange?;
        let cut = |why: String| Some((Err(std::io::Error::other(why)), None));
        match tokio::time::timeout(idle, replies.recv()).await {
            Ok(Some(Message { header: Header::Data { .. }, payload })) => Some((Ok(payload), Some((replies, pending)))),
            Ok(Some(Message { header: Header::End { error: None, .. }, .. })) => {
                pending.done = true;
                None
            }
            Ok(Some(Message { header: Header::End { error: Some(why), .. }, .. })) => {
                pending.done = true;
                cut(format!("the session's instance cut the answer: {why}"))
            }
            Ok(Some(_)) => cut("the session's instance sent something out of order".into()),
            Ok(None) => cut("the relay from the session's instance was lost".into()),
            Err(_) => cut(format!("nothing from the session's instance for {}s", idle.as_secs())),
        }
    });
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}

/// Waits for the answer's status and headers, checking every heartbeat that
/// the owner is still alive.
async fn head(
    cluster: &Cluster,
    owner: &str,
    replies: &mut mpsc::Receiver<Message>,
    bound: Duration,
) -> Result<(StatusCode, HeaderMap), McpError> {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let round = (tokio::time::Instant::now() + keys::HEARTBEAT).min(deadline);
        match tokio::time::timeout_at(round, replies.recv()).await {
            Ok(Some(Message { header: Header::Head { status, headers, .. }, .. })) => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                return Ok((status, from_pairs(headers)));
            }
            Ok(Some(Message { header: Header::End { error, .. }, .. })) => {
                return Err(McpError::Relay(error.unwrap_or_else(|| "it answered nothing".into())));
            }
            Ok(Some(_)) => return Err(McpError::Relay("it sent something out of order".into())),
            Ok(None) => return Err(McpError::Relay("the relay was lost while waiting for its answer".into())),
            Err(_) if tokio::time::Instant::now() >= deadline => {
                return Err(McpError::Relay(format!("it did not answer within {}s", bound.as_secs())));
            }
            Err(_) => match cluster.is_alive(owner).await {
                Ok(true) => {}
                Ok(false) => return Err(McpError::Relay("it stopped while the request was in flight".into())),
                Err(e) => return Err(unavailable(&e)),
            },
        }
    }
}

/// Runs a relayed request through this instance's router and streams the
/// answer back to the instance that asked.
pub async fn serve(cluster: Arc<Cluster>, router: axum::Router, message: Message) {
    let Header::Request { rid, from, method, uri, headers } = message.header else { return };
    let mut cancelled = cluster.inbox.expect(&rid, 4);
    let answered = answer(&cluster, router, &rid, &from, method, uri, headers, message.payload, &mut cancelled).await;
    cluster.inbox.forget(&rid);
    if let Err(why) = answered {
        debug!(rid = %dynogate_shared::names::log_id(&rid), "relayed answer stopped: {why}");
    }
}

#[allow(clippy::too_many_arguments)]
async fn answer(
    cluster: &Cluster,
    router: axum::Router,
    rid: &str,
    to: &str,
    method: String,
    uri: String,
    headers: Vec<(String, String)>,
    body: Bytes,
    cancelled: &mut mpsc::Receiver<Message>,
) -> Result<(), String> {
    let send = |header: Header, payload: Bytes| async move {
        match cluster.send(to, &Message::new(header, payload)).await {
            Ok(true) => Ok(()),
            Ok(false) => Err("the asking instance is gone".to_owned()),
            Err(e) => Err(e.to_string()),
        }
    };
    let mut request = match Request::builder().method(method.as_str()).uri(uri).body(Body::from(body)) {
        Ok(request) => request,
        Err(e) => {
            warn!("a relayed request could not be rebuilt: {e}");
            return send(
                Header::End { rid: rid.to_owned(), error: Some(format!("bad relayed request: {e}")) },
                Bytes::new(),
            )
            .await;
        }
    };
    *request.headers_mut() = from_pairs(headers);
    request.extensions_mut().insert(Relayed);
    let response = tokio::select! {
        response = router.oneshot(request) => match response { Ok(response) => response, Err(never) => match never {} },
        _ = cancelled.recv() => return Err("the client went away".into()),
    };
    let (parts, body) = response.into_parts();
    send(
        Header::Head { rid: rid.to_owned(), status: parts.status.as_u16(), headers: to_pairs(&parts.headers) },
        Bytes::new(),
    )
    .await?;
    let mut body = body.into_data_stream();
    loop {
        tokio::select! {
            chunk = body.next() => match chunk {
                Some(Ok(bytes)) => send(Header::Data { rid: rid.to_owned() }, bytes).await?,
                Some(Err(e)) => {
                    return send(Header::End { rid: rid.to_owned(), error: Some(e.to_string()) }, Bytes::new()).await;
                }
                None => return send(Header::End { rid: rid.to_owned(), error: None }, Bytes::new()).await,
            },
            // A cancel, or this instance's subscriber lost (cancels would go unheard).
            _ = cancelled.recv() => return Err("the client went away".into()),
        }
    }
}

fn to_pairs(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| !HOP_BY_HOP.contains(name))
        .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
        .collect()
}

fn from_pairs(pairs: Vec<(String, String)>) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(pairs.len());
    for (name, value) in pairs {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value))
            && !HOP_BY_HOP.contains(&name)
        {
            headers.append(name, value);
        }
    }
    headers
}
