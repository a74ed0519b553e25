//! HTTP pieces shared by the older SSE transport and the agents stream: the
//! client, the bearer key, and turning a refusal (a non-2xx answer) into a
//! one-line error that carries the server's own message.
//!
//! The streamable HTTP transport is rmcp's and brings its own client; only
//! [`auth_hint`] is shared with it, so a 401 reads the same on every transport.

use anyhow::anyhow;
use reqwest::{RequestBuilder, Response, StatusCode};
use serde_json::Value;

use crate::args::ApiKey;

/// Most of an error body kept for the message: enough for any sentence a
/// server writes, not a whole HTML error page.
const MAX_MESSAGE_CHARS: usize = 300;

pub fn client() -> anyhow::Result<reqwest::Client> {
    // Streams here last as long as a tool call; the caller's deadline bounds
    // them, so the client sets no total timeout of its own.
    Ok(reqwest::Client::builder().build()?)
}

pub fn authorize(request: RequestBuilder, api_key: Option<&ApiKey>) -> RequestBuilder {
    match api_key {
        Some(key) => request.bearer_auth(key.expose()),
        None => request,
    }
}

/// What to do about a 401 or 403, depending on whether a key was sent.
pub fn auth_hint(sent_key: bool) -> &'static str {
    if sent_key { "wrong API key? check API_KEY or --api-key" } else { "set API_KEY or --api-key" }
}

/// A request that got no answer, with the cause at the bottom of reqwest's
/// chain ("Connection refused") rather than the whole chain.
pub fn unreachable(url: &str, error: reqwest::Error) -> anyhow::Error {
    let mut cause: &dyn std::error::Error = &error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    anyhow!("cannot reach {url}: {cause}")
}

/// A non-2xx answer as an error: status, the server's message, and a hint.
pub async fn refusal(what: &str, response: Response, sent_key: bool) -> anyhow::Error {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    let mut line = format!("{what} answered {status}");
    if let Some(message) = message_of(&body) {
        line.push_str(": ");
        line.push_str(&message);
    }
    if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        line.push_str(&format!(" ({})", auth_hint(sent_key)));
    }
    anyhow!(line)
}

/// The human part of an error body: `error.message`, `message`, `error` or
/// `detail` of a JSON body, or the start of a text one, on one line.
fn message_of(body: &str) -> Option<String> {
    let from_json = serde_json::from_str::<Value>(body).ok().and_then(|json| {
        [&json["error"]["message"], &json["message"], &json["error"], &json["detail"]]
            .into_iter()
            .find_map(|v| v.as_str().map(str::to_owned))
    });
    let text = from_json.unwrap_or_else(|| body.to_owned());
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.is_empty() {
        return None;
    }
    Some(match line.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_come_from_the_usual_fields() {
        let cases = [
            (r#"{"error":"Unauthorized"}"#, Some("Unauthorized")),
            (r#"{"error":{"message":"model not found","code":404}}"#, Some("model not found")),
            (r#"{"message":"rate limited"}"#, Some("rate limited")),
            (r#"{"detail":"Not Found"}"#, Some("Not Found")),
            ("plain\ntext  body", Some("plain text body")),
            ("", None),
            ("  \n", None),
        ];
        for (body, expected) in cases {
            assert_eq!(message_of(body).as_deref(), expected, "{body}");
        }
        assert_eq!(message_of(&"x".repeat(1000)).unwrap().chars().count(), MAX_MESSAGE_CHARS + 1);
    }
}
