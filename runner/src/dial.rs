//! Connecting to the gateway's `/rendezvous` and the handshake.
//!
//! The token goes in an `Authorization` header (never in the URL, which
//! proxies log). Connection failures are retried with backoff for a bounded
//! time, since a dyno may boot before the network path to the gateway is up;
//! a 401 is final. After the upgrade the runner says hello with its protocol
//! version and waits for welcome or reject.

use std::time::Duration;

use anyhow::{Context, bail};
use dynogate_shared::{Control, PROTOCOL_VERSION};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{debug, info, warn};

use crate::config::Dial;

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Largest message either side accepts; matches the gateway.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// How long to keep retrying a gateway that cannot be reached.
const CONNECT_DEADLINE: Duration = Duration::from_secs(20);
/// How long the gateway has to answer hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects, authenticates and completes the handshake.
pub async fn connect(dial: &Dial) -> anyhow::Result<Socket> {
    let mut socket = open(dial).await?;
    let hello = Control::Hello { protocol: PROTOCOL_VERSION, runner_version: env!("CARGO_PKG_VERSION").into() };
    socket.send(Message::Binary(hello.encode().into())).await.context("cannot send hello")?;
    let answer = tokio::time::timeout(WELCOME_TIMEOUT, async {
        while let Some(message) = socket.next().await {
            match message.context("connection failed during the handshake")? {
                Message::Binary(bytes) => return Ok(Some(Control::decode(&bytes)?)),
                Message::Close(_) => return Ok(None),
                _ => continue,
            }
        }
        Ok::<_, anyhow::Error>(None)
    })
    .await
    .context("the gateway did not answer hello in time")??;
    match answer {
        Some(Control::Welcome { protocol }) => {
            info!(protocol, "connected to the gateway");
            Ok(socket)
        }
        Some(Control::Reject { reason }) => bail!("the gateway refused this runner: {reason}"),
        Some(other) => bail!("unexpected first frame from the gateway: {other}"),
        None => bail!("the gateway closed the connection during the handshake"),
    }
}

async fn open(dial: &Dial) -> anyhow::Result<Socket> {
    let deadline = tokio::time::Instant::now() + CONNECT_DEADLINE;
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut request = dial.rendezvous.as_str().into_client_request().context("bad rendezvous URL")?;
        let bearer = HeaderValue::from_str(&format!("Bearer {}", dial.token.expose()))
            .context("the runner token is not a valid header value")?;
        request.headers_mut().insert(header::AUTHORIZATION, bearer);
        request.headers_mut().insert(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("dynogate-runner/", env!("CARGO_PKG_VERSION"))),
        );
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE_BYTES))
            .max_frame_size(Some(MAX_MESSAGE_BYTES));
        match tokio_tungstenite::connect_async_with_config(request, Some(config), true).await {
            Ok((socket, _)) => return Ok(socket),
            Err(WsError::Http(response)) if response.status() == StatusCode::UNAUTHORIZED => bail!(
                "the gateway refused this runner's token (401): it is invalid, expired, for another session, \
                 or its session already has a runner"
            ),
            Err(WsError::Http(response)) => {
                bail!("the gateway answered the rendezvous with HTTP {}", response.status())
            }
            Err(e) if tokio::time::Instant::now() + backoff < deadline => {
                debug!("cannot reach the gateway yet ({e}); retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                warn!("giving up on the gateway after {CONNECT_DEADLINE:?}");
                return Err(e).context(format!("cannot reach the gateway at {}", redact(&dial.rendezvous)));
            }
        }
    }
}

/// The URL without its query (which names the session) for error messages.
fn redact(url: &url::Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.to_string()
}
