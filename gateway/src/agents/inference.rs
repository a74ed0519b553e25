//! The model upstream: one OpenAI-compatible `chat/completions` call.
//!
//! `INFERENCE_URL`, `INFERENCE_KEY` and `INFERENCE_MODEL_ID` are the config
//! vars Heroku's inference add-on sets; the same three point at OpenAI, a
//! local Ollama or vLLM. Every way the call can fail becomes an
//! [`UpstreamError`] with the words the agent's caller sees; a 429 whose
//! `Retry-After` is short is waited out and retried, a bounded number of times.

use std::time::Duration;

use serde_json::{Value, json};
use url::Url;

use crate::config::Inference;

/// A 429 is retried when it asks for at most this long a wait…
const SHORT_RETRY: Duration = Duration::from_secs(10);
/// …this many times.
const RETRIES: usize = 2;

/// Why a model call gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the model API refused the key (HTTP {status}): {message}")]
    Unauthorized { status: u16, message: String },
    #[error("the model API is rate limiting requests (HTTP 429){}: {message}", retry_text(*.retry_after))]
    RateLimited { retry_after: Option<Duration>, message: String },
    #[error("the model API refused the request (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
    #[error("the model API failed (HTTP {status}): {message}")]
    Failed { status: u16, message: String },
    #[error("the model API did not answer within {}s", .0.as_secs())]
    TimedOut(Duration),
    #[error("the model API cannot be reached: {0}")]
    Unreachable(String),
    #[error("the model API's answer is malformed: {0}")]
    Malformed(String),
}

fn retry_text(after: Option<Duration>) -> String {
    after.map(|d| format!("; retry after {}s", d.as_secs())).unwrap_or_default()
}

impl UpstreamError {
    /// What went wrong, as a metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            UpstreamError::Unauthorized { .. } => "unauthorized",
            UpstreamError::RateLimited { .. } => "rate_limited",
            UpstreamError::Refused { .. } => "refused",
            UpstreamError::Failed { .. } => "failed",
            UpstreamError::TimedOut(_) => "timed_out",
            UpstreamError::Unreachable(_) => "unreachable",
            UpstreamError::Malformed(_) => "malformed",
        }
    }

    /// The error's HTTP-like code and type, in the Inference API's error shape.
    pub fn code_and_type(&self) -> (u16, &'static str) {
        match self {
            UpstreamError::Unauthorized { status, .. } => (*status, "authentication_error"),
            UpstreamError::RateLimited { .. } => (429, "rate_limit_error"),
            UpstreamError::Refused { status, .. } => (*status, "invalid_request_error"),
            UpstreamError::Failed { status, .. } => (*status, "server_error"),
            UpstreamError::TimedOut(_) => (504, "server_error"),
            UpstreamError::Unreachable(_) | UpstreamError::Malformed(_) => (502, "server_error"),
        }
    }
}

/// A client of the model API.
#[derive(Clone)]
pub struct Upstream {
    http: reqwest::Client,
    endpoint: Url,
    settings: Inference,
}

impl Upstream {
    pub fn new(settings: Inference) -> anyhow::Result<Upstream> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the model API client: {e}"))?;
        Ok(Upstream { http, endpoint: endpoint(&settings.url), settings })
    }

    pub fn default_model(&self) -> Option<&str> {
        self.settings.model.as_deref()
    }

    /// One chat completion for `body` (model, messages, tools, sampling):
    /// the upstream's answer object, checked to hold a first choice.
    pub async fn complete(&self, body: &Value) -> Result<Value, UpstreamError> {
        let mut attempt = 0;
        loop {
            match self.call(body).await {
                Err(UpstreamError::RateLimited { retry_after: Some(wait), .. })
                    if wait <= SHORT_RETRY && attempt < RETRIES =>
                {
                    attempt += 1;
                    tracing::info!(?wait, attempt, "the model API asked to wait; retrying");
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }

    async fn call(&self, body: &Value) -> Result<Value, UpstreamError> {
        let mut request = self.http.post(self.endpoint.clone()).json(body);
        if let Some(key) = &self.settings.key {
            request = request.bearer_auth(key.expose());
        }
        let response = request.send().await.map_err(|e| self.transport_error(e))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = response.text().await.map_err(|e| self.transport_error(e))?;
        if !status.is_success() {
            let message = error_message(&text);
            let status = status.as_u16();
            return Err(match status {
                401 | 403 => UpstreamError::Unauthorized { status, message },
                429 => UpstreamError::RateLimited { retry_after, message },
                400..=499 => UpstreamError::Refused { status, message },
                _ => UpstreamError::Failed { status, message },
            });
        }
        let answer: Value =
            serde_json::from_str(&text).map_err(|e| UpstreamError::Malformed(format!("not JSON ({e})")))?;
        if !answer["choices"][0]["message"].is_object() {
            return Err(UpstreamError::Malformed("no choices[0].message".into()));
        }
        Ok(answer)
    }

    fn transport_error(&self, e: reqwest::Error) -> UpstreamError {
        if e.is_timeout() {
            UpstreamError::TimedOut(self.settings.timeout)
        } else {
            // Without the URL: it may carry credentials.
            UpstreamError::Unreachable(e.without_url().to_string())
        }
    }
}

/// `{base}/v1/chat/completions`; a base that already ends in `/v1` gets
/// `/chat/completions` only.
fn endpoint(base: &Url) -> Url {
    let mut url = base.clone();
    let path = base.path().trim_end_matches('/');
    let path =
        if path.ends_with("/v1") { format!("{path}/chat/completions") } else { format!("{path}/v1/chat/completions") };
    url.set_path(&path);
    url
}

/// The message of an error answer: OpenAI's `error.message`, the Inference
/// API's `message`, else the start of the text.
fn error_message(text: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(text).ok();
    let from_json = parsed.as_ref().and_then(|v| {
        v["error"]["message"]
            .as_str()
            .or_else(|| v["message"].as_str())
            .or_else(|| v["error"].as_str())
            .map(str::to_owned)
    });
    from_json.unwrap_or_else(|| {
        let text = text.trim();
        if text.is_empty() { "no message".into() } else { text.chars().take(300).collect() }
    })
}

/// The request body for one turn.
pub fn request_body(model: &str, messages: &[Value], tools: &[Value], sampling: &Value) -> Value {
    let mut body = json!({"model": model, "messages": messages});
    if !tools.is_empty() {
        body["tools"] = json!(tools);
    }
    if let Value::Object(fields) = sampling {
        for (name, value) in fields {
            body[name] = value.clone();
        }
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_is_found_from_any_base() {
        for (base, want) in [
            ("https://us.inference.heroku.com", "https://us.inference.heroku.com/v1/chat/completions"),
            ("http://127.0.0.1:11434/", "http://127.0.0.1:11434/v1/chat/completions"),
            ("https://api.openai.com/v1", "https://api.openai.com/v1/chat/completions"),
            ("https://x.example/openai/v1/", "https://x.example/openai/v1/chat/completions"),
        ] {
            assert_eq!(endpoint(&Url::parse(base).unwrap()).as_str(), want);
        }
    }

    #[test]
    fn error_messages_are_read_from_either_shape() {
        assert_eq!(error_message(r#"{"error":{"message":"bad key","type":"x"}}"#), "bad key");
        assert_eq!(error_message(r#"{"code":429,"message":"slow down","type":"rate_limit_error"}"#), "slow down");
        assert_eq!(error_message("  "), "no message");
        assert_eq!(error_message("<html>oops</html>"), "<html>oops</html>");
    }
}
