//! Errors a client sees, each with its HTTP status and JSON-RPC code.
//!
//! Handlers return [`McpError`]; its `IntoResponse` writes a JSON-RPC error
//! body. Internal causes are logged where they happen and never copied into
//! these messages beyond what the client needs to act.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::config::SERVED_REVISIONS;
use crate::jsonrpc::{RequestId, code, error_body};

/// Marks a response that says the session is unknown here (the relay
/// then looks for it elsewhere: it may have just moved).
#[derive(Debug, Clone, Copy)]
pub struct NoSuchSession;

/// A request the MCP endpoint refuses before it reaches a runner.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("Bad Request: Mcp-Session-Id header is required")]
    MissingSession,
    #[error("Bad Request: session_id is required")]
    MissingSessionParameter,
    #[error("Session not found: it ended or never existed; send initialize without Mcp-Session-Id to start a new one")]
    UnknownSession,
    /// The session ended while a batch was being handed to it: part of the
    /// batch reached it. Answered like [`McpError::UnknownSession`], but
    /// never retried at another instance.
    #[error(
        "Session not found: it ended while this batch was being delivered, after part of it; send initialize \
         without Mcp-Session-Id to start a new one"
    )]
    SessionEndedMidway,
    #[error("Not Found: this gateway offers no MCP server named {0:?}; GET /v1/mcp/servers lists those it does")]
    UnknownServer(String),
    #[error("Not Acceptable: {0}")]
    NotAcceptable(&'static str),
    #[error("Parse error: {0}")]
    Parse(String),
    #[error("Invalid Request: {0}")]
    InvalidRequest(String),
    #[error("Unsupported Media Type: send JSON-RPC as application/json")]
    UnsupportedMediaType,
    #[error("Payload Too Large: request bodies are limited to {limit} bytes")]
    TooLarge { limit: usize },
    #[error("Request Timeout: the request body did not arrive within {limit:?}")]
    BodyTimeout { limit: std::time::Duration },
    #[error("Unsupported MCP-Protocol-Version {0:?}; this gateway serves {served}", served = SERVED_REVISIONS.join(", "))]
    UnsupportedVersion(String),
    #[error("Batches are not allowed on protocol revision {0}; send one message per request")]
    BatchNotAllowed(String),
    #[error(
        "{method} is part of the stateless MCP revision 2026-07-28, which this gateway does not serve yet; \
         it serves the session-based revisions {served}: start with initialize",
        served = SERVED_REVISIONS.join(", ")
    )]
    StatelessRevision { id: Option<RequestId>, method: String },
    #[error("Cannot resume from Last-Event-ID {0:?}: the events after it are no longer kept")]
    CannotResume(String),
    #[error(
        "Forbidden: Host {0:?} is not this gateway's; without API_KEY only loopback names are served (DNS rebinding protection)"
    )]
    ForbiddenHost(String),
    #[error("Forbidden: requests from origin {0:?} are not allowed (set ALLOWED_ORIGINS)")]
    ForbiddenOrigin(String),
    #[error("Bad Gateway: the gateway instance that holds this session {0}")]
    Relay(String),
    #[error("Service Unavailable: {message}")]
    Overloaded { message: String, retry_after_secs: u64 },
}

impl McpError {
    fn status(&self) -> StatusCode {
        match self {
            McpError::UnknownSession | McpError::SessionEndedMidway | McpError::UnknownServer(_) => {
                StatusCode::NOT_FOUND
            }
            McpError::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            McpError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            McpError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            McpError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            McpError::ForbiddenOrigin(_) | McpError::ForbiddenHost(_) => StatusCode::FORBIDDEN,
            McpError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            McpError::Relay(_) => StatusCode::BAD_GATEWAY,
            McpError::MissingSession
            | McpError::MissingSessionParameter
            | McpError::Parse(_)
            | McpError::InvalidRequest(_)
            | McpError::UnsupportedVersion(_)
            | McpError::BatchNotAllowed(_)
            | McpError::CannotResume(_)
            | McpError::StatelessRevision { .. } => StatusCode::BAD_REQUEST,
        }
    }

    fn code(&self) -> i64 {
        match self {
            McpError::Parse(_) => code::PARSE_ERROR,
            McpError::UnknownSession | McpError::SessionEndedMidway => code::SESSION_NOT_FOUND,
            McpError::Overloaded { .. } => code::OVERLOADED,
            McpError::Relay(_) => code::INTERNAL_ERROR,
            // Not -32022: clients that probe with server/discover treat that code
            // as "modern server" and some then refuse to fall back to initialize.
            McpError::StatelessRevision { .. } => code::METHOD_NOT_FOUND,
            McpError::MissingSession
            | McpError::MissingSessionParameter
            | McpError::UnknownServer(_)
            | McpError::NotAcceptable(_)
            | McpError::InvalidRequest(_)
            | McpError::TooLarge { .. }
            | McpError::BodyTimeout { .. }
            | McpError::UnsupportedMediaType
            | McpError::CannotResume(_)
            | McpError::ForbiddenOrigin(_)
            | McpError::ForbiddenHost(_)
            | McpError::UnsupportedVersion(_)
            | McpError::BatchNotAllowed(_) => code::INVALID_REQUEST,
        }
    }

    fn data(&self) -> Option<serde_json::Value> {
        match self {
            McpError::UnsupportedVersion(requested) => {
                Some(json!({ "supported": SERVED_REVISIONS, "requested": requested }))
            }
            McpError::StatelessRevision { .. } => Some(json!({ "supported": SERVED_REVISIONS })),
            _ => None,
        }
    }
}

impl From<crate::session::SendError> for McpError {
    fn from(error: crate::session::SendError) -> Self {
        match error {
            crate::session::SendError::Gone => McpError::UnknownSession,
            crate::session::SendError::Busy => McpError::Overloaded {
                message: "the session's MCP server is behind on its messages; retry shortly".into(),
                retry_after_secs: 2,
            },
        }
    }
}

impl IntoResponse for McpError {
    fn into_response(self) -> Response {
        let id = match &self {
            McpError::StatelessRevision { id, .. } => id.as_ref(),
            _ => None,
        };
        crate::status::error_sent(self.code(), &self.to_string(), None, None);
        let body = error_body(id, self.code(), &self.to_string(), self.data());
        let mut response =
            (self.status(), [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body)
                .into_response();
        match self {
            McpError::UnknownSession => {
                response.extensions_mut().insert(NoSuchSession);
            }
            McpError::Overloaded { retry_after_secs, .. } => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            // The rest of a late body may still come; reading it would keep
            // the connection for the slow client, so it is closed instead.
            McpError::BodyTimeout { .. } => {
                response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}
