//! A scripted OpenAI-compatible model server: `POST /v1/chat/completions`
//! answered by a test's script (tool calls, text, errors, silence), with
//! every request kept for the test to look at. It stands in for a language
//! model, the one part of the agents loop that cannot run here.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// What the model answers to one request.
pub enum Turn {
    /// An assistant message with these tool calls: `(id, function, arguments as sent)`.
    Calls(Vec<(&'static str, &'static str, String)>),
    /// A final text answer.
    Text(&'static str),
    /// An error status, with `Retry-After` when given, and a body.
    Status(u16, Option<u64>, &'static str),
    /// No answer, ever.
    Hang,
    /// A 200 whose body is not a completion.
    Garbage,
}

type Script = dyn Fn(usize, &Value) -> Turn + Send + Sync;

#[derive(Clone)]
struct Shared {
    script: Arc<Script>,
    requests: Arc<Mutex<Vec<Value>>>,
    key: Option<String>,
}

/// A running scripted model; stops when dropped.
pub struct Model {
    pub url: String,
    requests: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Model {
    /// Serves `script(n, request)` for the n-th request (from 0). With `key`,
    /// requests without `Authorization: Bearer <key>` get 401.
    pub async fn start(key: Option<&str>, script: impl Fn(usize, &Value) -> Turn + Send + Sync + 'static) -> Model {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let shared = Shared { script: Arc::new(script), requests: requests.clone(), key: key.map(str::to_owned) };
        let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(complete)).with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Model { url, requests, task }
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<Value> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn complete(State(shared): State<Shared>, headers: HeaderMap, body: axum::Json<Value>) -> Response {
    if let Some(key) = &shared.key {
        let sent = headers.get("authorization").and_then(|v| v.to_str().ok());
        if sent != Some(&format!("Bearer {key}")) {
            let error = json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}});
            return (StatusCode::UNAUTHORIZED, axum::Json(error)).into_response();
        }
    }
    let n = {
        let mut requests = shared.requests.lock().unwrap();
        requests.push(body.0.clone());
        requests.len() - 1
    };
    let model = body.0["model"].as_str().unwrap_or("scripted").to_owned();
    match (shared.script)(n, &body.0) {
        Turn::Calls(calls) => {
            let calls: Vec<Value> = calls
                .into_iter()
                .map(|(id, name, arguments)| json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}))
                .collect();
            axum::Json(completion(
                &model,
                json!({"role": "assistant", "content": null, "tool_calls": calls}),
                "tool_calls",
            ))
            .into_response()
        }
        Turn::Text(text) => {
            axum::Json(completion(&model, json!({"role": "assistant", "content": text}), "stop")).into_response()
        }
        Turn::Status(status, retry_after, body) => {
            let mut response = (StatusCode::from_u16(status).unwrap(), body.to_owned()).into_response();
            if let Some(seconds) = retry_after {
                response.headers_mut().insert("retry-after", seconds.into());
            }
            response
        }
        Turn::Hang => std::future::pending().await,
        Turn::Garbage => (StatusCode::OK, "<html>not a completion</html>").into_response(),
    }
}

fn completion(model: &str, message: Value, finish_reason: &str) -> Value {
    json!({
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": 1_796_000_000u64,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    })
}
