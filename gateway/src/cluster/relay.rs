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
use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tower::ServiceExt;
use tracing::{debug, warn};

use super::wire::{Header, Message};
use super::{Cluster, ClusterError};
use crate::AppState;
use crate::error::McpError;

/// Messages of one answer that may wait for its client before it is cut.
const QUEUE: usize = 256;
/// Most bytes of an answer's body sent with its head.
const READY_BYTES: usize = 1024 * 1024;
/// Headers that describe one hop's connection, not the message.
const HOP_BY_HOP: [HeaderName; 4] =
    [header::CONNECTION, header::TRANSFER_ENCODING, header::CONTENT_LENGTH, HeaderName::from_static("keep-alive")];

/// Marks a request that reached this instance through the relay.
#[derive(Debug, Clone, Copy)]
pub struct Relayed;

/// Middleware on the session routes: serves here what is here (or taken
/// over here) or unknown, and relays to its owner what another instance
/// holds. A request for a session moving away waits until it has moved,
/// then follows it. A relayed request is served here or answered 404,
/// never relayed on, unless its session moved meanwhile.
pub async fn route(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(cluster) = state.cluster.clone() else { return next.run(request).await };
    let Some(id) = session_of(&request) else { return next.run(request).await };
    let relayed = request.extensions().get::<Relayed>().is_some();
    let mut local = state.sessions.get_any(&id);
    if local.is_none() && relayed {
        // Sent here because the directory says it is here: it may be being
        // taken over here right now.
        if matches!(cluster.locate(&id).await, Ok(super::directory::Location::Owned(owner)) if owner == cluster.instance)
        {
            let _adopting = cluster.adopting.lock().await;
            local = state.sessions.get_any(&id);
        }
        if local.is_none() {
            return next.run(request).await;
        }
    }
    // Whatever happens next, the request may have to go elsewhere: keep its body.
    let (parts, body) = request.into_parts();
    let body = match crate::mcp::read_body(body, &parts.headers, state.config.limits.max_body_bytes).await {
        Ok(body) => body,
        Err(e) => return e.into_response(),
    };
    match local {
        Some(handle) if handle.is_handing_over() => {
            let bound = state.config.timeouts.drain + Duration::from_secs(5);
            if tokio::time::timeout(bound, handle.finished()).await.is_err() {
                let moving = ClusterError::Unavailable("the session is moving to another instance".into());
                return unavailable(&moving).into_response();
            }
        }
        Some(_) => {
            // Served here, unless the session moved away meanwhile.
            let response = next.clone().run(rebuild(&parts, body.clone(), relayed)).await;
            if response.extensions().get::<crate::error::NoSuchSession>().is_none() {
                return response;
            }
        }
        None => {
            // Where it was a moment ago, most likely.
            if let Some(owner) = cluster.owner_seen(&id) {
                match forward(&state, &cluster, &owner, &parts, body.clone()).await {
                    Ok(response) => return response,
                    Err(Forwarded::Failed(e)) => return e.into_response(),
                    Err(Forwarded::Missing | Forwarded::Silent) => cluster.forget_owner(&id),
                }
            }
        }
    }
    // The directory may name an instance that has just let the session go,
    // or not yet put it in its table: look again, a few times.
    for attempt in 0..FOLLOW_ATTEMPTS {
        match super::adopt::find(&state, &cluster, &id).await {
            Ok(super::adopt::Whereabouts::At(owner)) => match forward(&state, &cluster, &owner, &parts, body.clone())
                .await
            {
                Ok(response) => {
                    cluster.saw_owner(&id, &owner);
                    return response;
                }
                Err(Forwarded::Missing) => tokio::time::sleep(FOLLOW_PAUSE * (attempt + 1)).await,
                Err(Forwarded::Silent) => {
                    let silent = ClusterError::Unavailable("the instance holding the session is not answering".into());
                    return unavailable(&silent).into_response();
                }
                Err(Forwarded::Failed(e)) => return e.into_response(),
            },
            // Here (perhaps just taken over), or unknown: answered here.
            Ok(_) => return next.run(rebuild(&parts, body, relayed)).await,
            Err(e) => return unavailable(&e).into_response(),
        }
    }
    // Named by the directory each time, and not there each time: it has ended.
    McpError::UnknownSession.into_response()
}

/// How long a relay waits for this instance's subscriber to reconnect
/// (short: while Redis is down, the answer is an error, and soon).
const LISTEN_WAIT: Duration = Duration::from_millis(250);

/// How many times a request looks for a session that is moving, and how long
/// it waits before looking again (longer each time).
const FOLLOW_ATTEMPTS: u32 = 4;
const FOLLOW_PAUSE: Duration = Duration::from_millis(20);

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
    counted: bool,
}

impl Pending {
    /// `counted`: a request that ends by itself (not a GET stream, which a
    /// stopping instance does not wait for).
    fn new(cluster: &Arc<Cluster>, owner: &str, rid: &str, counted: bool) -> Self {
        if counted {
            cluster.relay_started();
        }
        Pending { cluster: cluster.clone(), owner: owner.to_owned(), rid: rid.to_owned(), done: false, counted }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.counted {
            self.cluster.relay_ended();
        }
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

/// Why a request was not answered by the instance it was sent to.
enum Forwarded {
    /// That instance does not hold the session.
    Missing,
    /// Nobody listens at that instance's inbox.
    Silent,
    /// The answer to give the client.
    Failed(McpError),
}

/// Sends a request (its head and body) to `owner` and answers with what it answers.
async fn forward(
    state: &AppState,
    cluster: &Arc<Cluster>,
    owner: &str,
    parts: &axum::http::request::Parts,
    body: Bytes,
) -> Result<Response, Forwarded> {
    // A subscriber reconnecting is usually back within a moment.
    if !cluster.inbox.until_listening(LISTEN_WAIT).await {
        let reconnecting = ClusterError::Unavailable("this instance's subscriber is reconnecting".into());
        return Err(Forwarded::Failed(unavailable(&reconnecting)));
    }
    let rid = crate::sessions::random_id();
    let mut replies = cluster.inbox.expect(&rid, QUEUE);
    let mut pending = Pending::new(cluster, owner, &rid, parts.method != axum::http::Method::GET);
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
    match cluster.send(owner, &message).await {
        Ok(true) => {}
        Ok(false) => {
            // Its owner stopped listening: gone, or cut off from Redis. Once
            // it is known dead, another instance takes the session over.
            pending.done = true;
            debug!(owner = %dynogate_shared::names::log_id(owner), "the session's instance does not listen");
            return Err(Forwarded::Silent);
        }
        Err(e) => {
            pending.done = true;
            return Err(Forwarded::Failed(unavailable(&e)));
        }
    }
    crate::metrics::relayed();
    let bound = state.config.timeouts.request + Duration::from_secs(30);
    let (status, headers, first, whole) = match next_reply(cluster, owner, &mut replies, bound).await {
        Ok(Message { header: Header::Head { status, headers, whole, .. }, payload }) => {
            (StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY), from_pairs(headers), payload, whole)
        }
        Ok(Message { header: Header::Missing { .. }, .. }) => {
            pending.done = true;
            return Err(Forwarded::Missing);
        }
        Ok(Message { header: Header::End { error, .. }, .. }) => {
            pending.done = true;
            let why = error.map_or_else(|| "answered nothing".into(), |e| format!("failed: {e}"));
            return Err(Forwarded::Failed(McpError::Relay(why)));
        }
        Ok(_) => return Err(Forwarded::Failed(McpError::Relay("sent something out of order".into()))),
        Err(Silence::Redis(e)) => return Err(Forwarded::Failed(unavailable(&e))),
        Err(silence) => return Err(Forwarded::Failed(McpError::Relay(silence.to_string()))),
    };
    let body = if whole {
        pending.done = true;
        Body::from(first)
    } else {
        Body::from_stream(rest(first, replies, pending, state.config.timeouts.heartbeat * 3))
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}

/// The body of an answer that did not come whole: `first`, then each
/// `data` until `end`, each wait bounded by `idle`.
fn rest(
    first: Bytes,
    replies: mpsc::Receiver<Message>,
    pending: Pending,
    idle: Duration,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    let first = futures_util::stream::iter((!first.is_empty()).then_some(Ok(first)));
    let later = futures_util::stream::unfold(Some((replies, pending)), move |exchange| async move {
        let (mut replies, mut pending) = exchange?;
        let cut = |why: String| Some((Err(std::io::Error::other(why)), None));
        let (cluster, owner) = (pending.cluster.clone(), pending.owner.clone());
        match next_reply(&cluster, &owner, &mut replies, idle).await {
            Ok(Message { header: Header::Data { .. }, payload }) => Some((Ok(payload), Some((replies, pending)))),
            Ok(Message { header: Header::End { error: None, .. }, .. }) => {
                pending.done = true;
                None
            }
            Ok(Message { header: Header::End { error: Some(why), .. }, .. }) => {
                pending.done = true;
                cut(format!("the gateway instance that holds this session cut its answer: {why}"))
            }
            Ok(_) => cut("the gateway instance that holds this session sent something out of order".into()),
            Err(silence) => cut(format!("the gateway instance that holds this session {silence}")),
        }
    });
    first.chain(later)
}

/// Why an exchange got no next message.
#[derive(Debug, thiserror::Error)]
enum Silence {
    #[error("could not be reached (the relay was lost)")]
    Lost,
    #[error("stopped while the request was in flight")]
    Stopped,
    #[error("sent nothing for {}s", .0.as_secs())]
    Quiet(Duration),
    #[error(transparent)]
    Redis(#[from] ClusterError),
}

/// How often a relay waiting on an owner checks that it is still alive.
const LIVENESS_ROUND: Duration = Duration::from_secs(2);

/// The next message from `owner`, within `bound`, checking every
/// [`LIVENESS_ROUND`] that the owner still lives (a killed instance never
/// says goodbye).
async fn next_reply(
    cluster: &Cluster,
    owner: &str,
    replies: &mut mpsc::Receiver<Message>,
    bound: Duration,
) -> Result<Message, Silence> {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let round = (tokio::time::Instant::now() + LIVENESS_ROUND).min(deadline);
        match tokio::time::timeout_at(round, replies.recv()).await {
            Ok(Some(message)) => return Ok(message),
            Ok(None) => return Err(Silence::Lost),
            Err(_) if tokio::time::Instant::now() >= deadline => return Err(Silence::Quiet(bound)),
            Err(_) if !cluster.is_alive(owner).await? => return Err(Silence::Stopped),
            Err(_) => {}
        }
    }
}

/// Whether a relayed request is counted among those a stopping instance
/// answers before it leaves: all but GET streams, which never end by
/// themselves.
pub fn counts(message: &Message) -> bool {
    matches!(&message.header, Header::Request { method, .. } if method != "GET")
}

/// Runs a relayed request through this instance's router and streams the
/// answer back to the instance that asked.
/// `counted`: the caller counted it among the relays this instance answers
/// (see [`counts`]).
pub async fn serve(cluster: Arc<Cluster>, router: axum::Router, message: Message, counted: bool) {
    let Header::Request { rid, from, method, uri, headers } = message.header else { return };
    let mut cancelled = cluster.inbox.expect(&rid, 4);
    let answered = answer(&cluster, router, &rid, &from, method, uri, headers, message.payload, &mut cancelled).await;
    cluster.inbox.forget(&rid);
    if counted {
        cluster.relay_ended();
    }
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
    if response.extensions().get::<crate::error::NoSuchSession>().is_some() {
        // Not here (any more): the asker looks again.
        return send(Header::Missing { rid: rid.to_owned() }, Bytes::new()).await;
    }
    let (parts, body) = response.into_parts();
    let mut body = body.into_data_stream();
    // What of the body is ready now goes with the head: all of it, for an
    // answer already complete (a JSON reply), in one message.
    let mut ready = bytes::BytesMut::new();
    let mut ended: Option<Option<String>> = None;
    while ready.len() < READY_BYTES {
        match body.next().now_or_never() {
            Some(Some(Ok(chunk))) => ready.extend_from_slice(&chunk),
            Some(Some(Err(e))) => {
                ended = Some(Some(e.to_string()));
                break;
            }
            Some(None) => {
                ended = Some(None);
                break;
            }
            None => break,
        }
    }
    let whole = ended == Some(None);
    let head =
        Header::Head { rid: rid.to_owned(), status: parts.status.as_u16(), headers: to_pairs(&parts.headers), whole };
    send(head, ready.freeze()).await?;
    match ended {
        Some(None) => return Ok(()),
        Some(error) => return send(Header::End { rid: rid.to_owned(), error }, Bytes::new()).await,
        None => {}
    }
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

/// The same request again, for a second try elsewhere.
fn rebuild(parts: &axum::http::request::Parts, body: Bytes, relayed: bool) -> Request {
    let mut request = Request::new(Body::from(body));
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    if relayed {
        request.extensions_mut().insert(Relayed);
    }
    request
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
