//! Opens an MCP session on the chosen transport (rmcp's streamable HTTP and
//! child-process clients, or our [`LegacySse`]) and puts rmcp's errors into
//! one line a person can act on: which server, and the cause at the bottom
//! of the chain ("Connection refused", "401 Unauthorized").

use std::error::Error;

use anyhow::{Context, anyhow};
use rmcp::ServiceExt;
use rmcp::service::{ClientInitializeError, RoleClient, RunningService, ServiceError};
use rmcp::transport::streamable_http_client::{StreamableHttpClientTransportConfig, StreamableHttpError};
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};

use crate::args::Target;
use crate::handler::Handler;
use crate::http::{self, auth_hint};
use crate::legacy_sse::LegacySse;

pub type Session = RunningService<RoleClient, Handler>;

/// Connects and completes `initialize`.
pub async fn connect(target: &Target, handler: Handler) -> anyhow::Result<Session> {
    let started = match target {
        Target::Streamable { url, api_key } => {
            let mut config = StreamableHttpClientTransportConfig::with_uri(url.as_str());
            if let Some(key) = api_key {
                config = config.auth_header(key.expose());
            }
            handler.serve(StreamableHttpClientTransport::from_config(config)).await
        }
        Target::Sse { url, api_key } => {
            let transport = LegacySse::connect(http::client()?, url.clone(), api_key.clone()).await?;
            handler.serve(transport).await
        }
        Target::Stdio { command } => {
            let mut shell = tokio::process::Command::new("sh");
            shell.arg("-c").arg(command);
            let transport = TokioChildProcess::new(shell).with_context(|| format!("cannot start `{command}`"))?;
            handler.serve(transport).await
        }
    };
    started.map_err(|e| {
        let error = explain_initialize(&e, target);
        match target {
            Target::Streamable { url, .. } if url.path().trim_end_matches('/').ends_with("/sse") => {
                anyhow!("{error:#} (this looks like an SSE URL: add --transport sse)")
            }
            _ => error,
        }
    })
}

fn explain_initialize(error: &ClientInitializeError, target: &Target) -> anyhow::Error {
    let server = target.describe();
    if error.auth_challenge().is_some() {
        return anyhow!("{server} answered 401 Unauthorized ({})", auth_hint(sent_key(target)));
    }
    match error {
        ClientInitializeError::JsonRpcError(data) => {
            anyhow!("{server} refused initialize: {} (JSON-RPC error {})", data.message, data.code.0)
        }
        ClientInitializeError::ConnectionClosed(_) if matches!(target, Target::Stdio { .. }) => {
            anyhow!("{server} exited before answering initialize (its stderr is above)")
        }
        ClientInitializeError::ConnectionClosed(_) => anyhow!("{server} closed the connection during initialize"),
        ClientInitializeError::TransportError { error, .. } => {
            anyhow!("cannot start an MCP session with {server}: {}", cause(error.error.as_ref()))
        }
        other => anyhow!("cannot start an MCP session with {server}: {}", cause(other)),
    }
}

/// A failed request (after `initialize`) in one line.
pub fn explain_request(error: &ServiceError, target: &Target, method: &str) -> anyhow::Error {
    let server = target.describe();
    if error.auth_challenge().is_some() {
        return anyhow!("{server} answered 401 Unauthorized to {method} ({})", auth_hint(sent_key(target)));
    }
    match error {
        ServiceError::McpError(data) => {
            anyhow!("{server} refused {method}: {} (JSON-RPC error {})", data.message, data.code.0)
        }
        ServiceError::TransportClosed if matches!(target, Target::Stdio { .. }) => {
            anyhow!("{server} exited before answering {method}")
        }
        ServiceError::TransportClosed => anyhow!("{server} closed the connection before answering {method}"),
        other => anyhow!("{method} to {server} failed: {}", cause(other)),
    }
}

fn sent_key(target: &Target) -> bool {
    matches!(target, Target::Streamable { api_key: Some(_), .. } | Target::Sse { api_key: Some(_), .. })
}

/// The message at the bottom of an error chain. rmcp's HTTP client wraps
/// reqwest's error without naming it as the source, so that one link is
/// followed by hand.
fn cause(error: &(dyn Error + 'static)) -> String {
    let mut current = error;
    loop {
        let next = match current.downcast_ref::<StreamableHttpError<reqwest::Error>>() {
            Some(StreamableHttpError::Client(inner)) => Some(inner as &(dyn Error + 'static)),
            _ => current.source(),
        };
        match next {
            Some(next) => current = next,
            None => return current.to_string().trim_end_matches([':', ' ']).to_owned(),
        }
    }
}
