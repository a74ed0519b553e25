//! What the agents stream carries, in the shapes of Heroku's endpoint:
//! `event: message` with a `chat.completion` (each assistant turn, with the
//! model's `usage`) or a `tool.completion` (each tool's result); `event:
//! error` with `{code, message, type}`; `event: done` with `[DONE]` last.

use bytes::Bytes;
use serde_json::{Value, json};

use crate::sse_encode::Encoded;

/// One agents run's events, stamped with its id and model.
pub struct Events {
    pub id: String,
    pub model: String,
}

impl Events {
    /// An assistant turn, as the model answered it.
    pub fn assistant(&self, upstream: &Value) -> Bytes {
        let choice = &upstream["choices"][0];
        let mut message = choice["message"].clone();
        message["role"] = json!("assistant");
        let completion = json!({
            "id": self.id,
            "object": "chat.completion",
            "created": created(),
            "model": upstream["model"].as_str().unwrap_or(&self.model),
            "system_fingerprint": upstream.get("system_fingerprint").cloned().unwrap_or(Value::Null),
            "choices": [{
                "index": 0,
                "message": message,
                "finish_reason": choice.get("finish_reason").cloned().unwrap_or(Value::Null),
            }],
            "usage": upstream.get("usage").cloned().unwrap_or_else(|| json!({})),
        });
        message_event(&completion)
    }

    /// A tool's result, as the model is given it.
    pub fn tool(&self, tool_call_id: &str, name: &str, content: &str) -> Bytes {
        let completion = json!({
            "id": self.id,
            "object": "tool.completion",
            "created": created(),
            "model": self.model,
            "system_fingerprint": Value::Null,
            "choices": [{
                "index": 0,
                "message": {"role": "tool", "content": content, "tool_call_id": tool_call_id, "name": name},
                "finish_reason": "",
            }],
            "usage": {},
        });
        message_event(&completion)
    }
}

/// An error that ends the run, in the Inference API's error shape.
pub fn error(code: u16, kind: &str, message: &str) -> Bytes {
    encode("error", &json!({"code": code, "message": message, "type": kind}).to_string())
}

/// The last event of every stream.
pub fn done() -> Bytes {
    encode("done", "[DONE]")
}

fn message_event(completion: &Value) -> Bytes {
    encode("message", &completion.to_string())
}

fn encode(name: &str, data: &str) -> Bytes {
    let mut encoded = Encoded::default();
    encoded.event(None, name, &Bytes::copy_from_slice(data.as_bytes()));
    encoded.finish().concat().into()
}

fn created() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
