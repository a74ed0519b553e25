//! Connecting to the gateway's `/rendezvous` and the handshake.
//!
//! The token goes in an `Authorization` header (never in the URL, which
//! proxies log). The runner says hello with its protocol version and how many
//! messages it has received so far in the session (0 on the first dial); the
//! gateway welcomes it with its own count and a fresh token for the next dial,
//! or rejects it with a reason.
//!
//! [`connect`] retries within a deadline: a dyno may boot before the path to
//! the gateway is up, and a redial may be refused (401) for a moment while the
//! gateway notices the old socket is dead.

use std::time::Duration;

use dynogate_shared::window::MAX_FRAME_BYTES;
use dynogate_shared::{Control, PROTOCOL_VERSION, Secret};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{debug, info};

use crate::config::Dial;

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long the gateway has to answer hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// What the gateway said in its welcome.
#[derive(Debug)]
pub struct Welcome {
    /// Messages the gateway has received from this runner so far.
    pub received: u64,
    /// The token for the next dial.
    pub token: Secret,
}

/// Why a dial failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DialError {
    /// The gateway answered and said no (401, or a reject frame).
    #[error("{0}")]
    Refused(String),
    /// The gateway could not be reached, or the connection failed.
    #[error("cannot reach the gateway: {0}")]
    Unreachable(String),
}

/// Where this runner is in the session, as its hello tells the gateway.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    /// Text frames received from the gateway.
    pub received: u64,
    /// Text frames of ours the gateway has acknowledged.
    pub acked: u64,
}

/// Dials until connected or `deadline`. Refusals end the attempts at once
/// unless `retry_refusals` (a redial may be refused while the gateway still
/// holds the old socket).
pub async fn connect(
    dial: &Dial,
    token: &Secret,
    position: Position,
    deadline: Instant,
    retry_refusals: bool,
) -> Result<(Socket, Welcome), DialError> {
    let mut backoff = Duration::from_millis(50);
    loop {
        let attempt = tokio::time::timeout(ATTEMPT_TIMEOUT, connect_once(dial, token, position)).await;
        let error = match attempt {
            Ok(Ok(connected)) => return Ok(connected),
            Ok(Err(error)) => error,
            Err(_) => DialError::Unreachable(format!("no answer within {}s", ATTEMPT_TIMEOUT.as_secs())),
        };
        let retry = matches!(error, DialError::Unreachable(_)) || retry_refusals;
        if !retry || Instant::now() + backoff >= deadline {
            return Err(error);
        }
        debug!("dial failed ({error}); retrying in {backoff:?}");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One attempt: upgrade, hello, welcome.
async fn connect_once(dial: &Dial, token: &Secret, position: Position) -> Result<(Socket, Welcome), DialError> {
    let mut request = dial
        .rendezvous
        .as_str()
        .into_client_request()
        .map_err(|e| DialError::Refused(format!("bad rendezvous URL: {e}")))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
        .map_err(|_| DialError::Refused("the runner token is not a valid header value".into()))?;
    request.headers_mut().insert(header::AUTHORIZATION, bearer);
    // The runner's span is the parent of the gateway's `rendezvous` span.
    if let Some(context) = dynogate_telemetry::traceparent(&tracing::Span::current())
        && let Ok(value) = HeaderValue::from_str(&context)
    {
        request.headers_mut().insert(dynogate_telemetry::TRACEPARENT, value);
    }
    request
        .headers_mut()
        .insert(header::USER_AGENT, HeaderValue::from_static(concat!("dynogate-runner/", env!("CARGO_PKG_VERSION"))));
    // tungstenite zero-fills its whole read buffer before each read; its
    // 128 KiB default made every message pay for a large memset.
    let config = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES));
    let mut socket = match tokio_tungstenite::connect_async_with_config(request, Some(config), true).await {
        Ok((socket, _)) => socket,
        Err(WsError::Http(response)) if response.status() == StatusCode::UNAUTHORIZED => {
            return Err(DialError::Refused(
                "the gateway refused this runner's token (401): it is invalid, expired, for another session, \
                 or its session already has a runner connected"
                    .into(),
            ));
        }
        Err(WsError::Http(response)) => {
            return Err(DialError::Unreachable(format!("the rendezvous answered HTTP {}", response.status())));
        }
        Err(e) => return Err(DialError::Unreachable(e.to_string())),
    };
    let hello = Control::Hello {
        protocol: PROTOCOL_VERSION,
        runner_version: env!("CARGO_PKG_VERSION").into(),
        received: position.received,
        acked: position.acked,
    };
    socket.send(Message::Binary(hello.encode().into())).await.map_err(|e| DialError::Unreachable(e.to_string()))?;
    let answer = tokio::time::timeout(WELCOME_TIMEOUT, async {
        while let Some(message) = socket.next().await {
            match message.map_err(|e| DialError::Unreachable(format!("connection failed during the handshake: {e}")))? {
                Message::Binary(bytes) => {
                    return Control::decode(&bytes).map(Some).map_err(|e| DialError::Refused(e.to_string()));
                }
                Message::Close(_) => return Ok(None),
                _ => continue,
            }
        }
        Ok(None)
    })
    .await
    .map_err(|_| DialError::Unreachable("the gateway did not answer hello in time".into()))??;
    match answer {
        Some(Control::Welcome { protocol, received, token }) => {
            info!(protocol, received, "connected to the gateway");
            Ok((socket, Welcome { received, token }))
        }
        Some(Control::Reject { reason }) => {
            Err(DialError::Refused(format!("the gateway refused this runner: {reason}")))
        }
        Some(other) => Err(DialError::Refused(format!("unexpected first frame from the gateway: {other}"))),
        None => Err(DialError::Unreachable("the gateway closed the connection during the handshake".into())),
    }
}
