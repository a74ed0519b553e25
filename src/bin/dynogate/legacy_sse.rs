//! MCP's older HTTP+SSE transport (revision 2024-11-05), client side, as an
//! rmcp [`Transport`]; rmcp has a server for it but no client.
//!
//! [`LegacySse::connect`] GETs the SSE URL and waits for the `endpoint`
//! event; from then on every message we send is a POST to that endpoint
//! (answered 202 at once) and every message from the server is a `message`
//! event on the GET stream. The stream is the session: dropping or closing
//! the transport closes it, and the server ends the session.
//!
//! Framing lives in [`crate::sse`]; this file only knows which events mean
//! what and where to POST.

use anyhow::{Context, bail};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use reqwest::Url;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use rmcp::service::{RoleClient, RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;

use crate::args::ApiKey;
use crate::http::{authorize, refusal, unreachable};
use crate::sse::{self, Event};

pub struct LegacySse {
    /// The GET stream; `None` once closed.
    events: Option<BoxStream<'static, anyhow::Result<Event>>>,
    poster: Poster,
}

/// What sending needs, cloned into each send so sends run concurrently.
#[derive(Clone)]
struct Poster {
    http: reqwest::Client,
    endpoint: Url,
    api_key: Option<ApiKey>,
}

/// Why a message could not be sent; rmcp hands it to the request that sent it.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot POST to {endpoint}")]
    Unreachable {
        endpoint: Url,
        #[source]
        source: reqwest::Error,
    },
    /// A non-2xx answer, already put into words by [`refusal`].
    #[error("{0}")]
    Refused(String),
}

impl LegacySse {
    /// Opens the stream and reads the endpoint to POST to.
    pub async fn connect(http: reqwest::Client, url: Url, api_key: Option<ApiKey>) -> anyhow::Result<Self> {
        let request = authorize(http.get(url.clone()).header(ACCEPT, "text/event-stream"), api_key.as_ref());
        let response = request.send().await.map_err(|e| unreachable(url.as_str(), e))?;
        if !response.status().is_success() {
            let error = refusal(url.as_str(), response, api_key.is_some()).await;
            if url.path().trim_end_matches('/').ends_with("/mcp") {
                bail!("{error:#} (this looks like a streamable HTTP URL: leave out --transport sse)");
            }
            return Err(error);
        }
        let content_type = response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !content_type.starts_with("text/event-stream") {
            bail!(
                "{url} is not an SSE endpoint (it answered {content_type:?}); \
                 for streamable HTTP leave out --transport sse and use the /mcp URL"
            );
        }
        let mut events = sse::events(response.bytes_stream());
        let endpoint = loop {
            match events.next().await {
                Some(Ok(event)) if event.name == "endpoint" => break event.data,
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.context(format!("reading {url}"))),
                None => bail!("{url} closed its stream before naming the endpoint to POST to"),
            }
        };
        let endpoint = url.join(endpoint.trim()).with_context(|| format!("{url} named a bad endpoint {endpoint:?}"))?;
        // The key goes with every POST: never to a host the user did not name.
        if endpoint.origin() != url.origin() {
            bail!("{url} named an endpoint on another origin ({endpoint}); not sending it the API key");
        }
        Ok(LegacySse { events: Some(events), poster: Poster { http, endpoint, api_key } })
    }
}

impl Poster {
    async fn post(self, message: TxJsonRpcMessage<RoleClient>) -> Result<(), SendError> {
        let request = authorize(self.http.post(self.endpoint.clone()).json(&message), self.api_key.as_ref());
        let response = request
            .send()
            .await
            .map_err(|source| SendError::Unreachable { endpoint: self.endpoint.clone(), source })?;
        if response.status().is_success() {
            return Ok(());
        }
        let error = refusal("the message endpoint", response, self.api_key.is_some()).await;
        Err(SendError::Refused(error.to_string()))
    }
}

impl Transport<RoleClient> for LegacySse {
    type Error = SendError;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleClient>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        self.poster.clone().post(item)
    }

    /// The next server message; `None` when the stream ends or breaks, which
    /// rmcp reports to every request still waiting. A `message` event that is
    /// not JSON-RPC is skipped, as rmcp's own transports skip bad lines.
    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleClient>> {
        let events = self.events.as_mut()?;
        loop {
            let event = events.next().await?.ok()?;
            if event.name != "message" {
                continue;
            }
            if let Ok(message) = serde_json::from_str(&event.data) {
                return Some(message);
            }
        }
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        // Dropping the body closes the GET, which ends the server's session.
        self.events = None;
        Ok(())
    }
}
