//! The runner's side of each call, as spans, when traces are exported: a
//! request from the gateway that carries `params._meta.traceparent` opens a
//! span (a child of the gateway's span for that request), and the server's
//! answer with the same id closes it. Without an exporter nothing is read.

use std::collections::HashMap;

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;

/// Calls followed at once; past it the oldest is let go (its span ends).
const MAX_OPEN: usize = 1024;

#[derive(Default)]
pub struct CallSpans {
    /// By the JSON-RPC id, as its JSON text.
    open: HashMap<String, (u64, tracing::Span)>,
    next: u64,
}

/// What is read of the server's messages: an answer has an id and no method.
#[derive(Deserialize)]
struct Answer {
    id: Option<Value>,
    method: Option<IgnoredAny>,
    error: Option<IgnoredAny>,
}

impl CallSpans {
    /// A message from the gateway to the server.
    pub fn request(&mut self, text: &[u8]) {
        if !dynogate_telemetry::enabled() {
            return;
        }
        let Ok(request) = serde_json::from_slice::<Value>(text) else { return };
        let (Some(id), Some(method), Some(parent)) =
            (request.get("id"), request["method"].as_str(), dynogate_telemetry::meta_traceparent(&request))
        else {
            return;
        };
        let method: String = method.chars().take(64).collect();
        let tool: Option<String> = request["params"]["name"].as_str().map(|t| t.chars().take(64).collect());
        let span = tracing::info_span!(
            "mcp.server",
            otel.name = %format!("runner {method} {}", tool.as_deref().unwrap_or_default()).trim_end(),
            rpc.method = %method,
            mcp.tool = tool,
            otel.status_code = tracing::field::Empty,
        );
        dynogate_telemetry::set_parent(&span, parent);
        if self.open.len() >= MAX_OPEN
            && let Some(oldest) = self.open.iter().min_by_key(|(_, (n, _))| *n).map(|(k, _)| k.clone())
        {
            self.open.remove(&oldest);
        }
        self.next += 1;
        self.open.insert(id.to_string(), (self.next, span));
    }

    /// A message from the server to the gateway.
    pub fn answer(&mut self, text: &[u8]) {
        if self.open.is_empty() {
            return;
        }
        let Ok(answer) = serde_json::from_slice::<Answer>(text) else { return };
        if let (Some(id), None) = (answer.id, answer.method)
            && let Some((_, span)) = self.open.remove(&id.to_string())
        {
            span.record("otel.status_code", if answer.error.is_some() { "ERROR" } else { "OK" });
        }
    }
}
