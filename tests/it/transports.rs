//! The transports as real clients use them: the older HTTP+SSE transport,
//! server-to-client requests, `Origin` checks, and the official Python SDK
//! (in the venvs `scripts/test` creates) over both transports.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::*;

/// An open `/sse` stream and the events read from it so far.
struct SseStream {
    response: reqwest::Response,
    buffer: String,
}

impl SseStream {
    async fn open(gateway: &Gateway) -> Self {
        let response = reqwest::Client::new()
            .get(format!("{}/sse", gateway.url))
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        SseStream { response, buffer: String::new() }
    }

    /// The next event's name and data.
    async fn next(&mut self) -> (String, String) {
        tokio::time::timeout(PATIENCE, async {
            loop {
                if let Some(end) = self.buffer.find("\n\n") {
                    let event: String = self.buffer.drain(..end + 2).collect();
                    let name = event.lines().find_map(|l| l.strip_prefix("event: ")).unwrap_or("message");
                    let data: Vec<&str> = event.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
                    if data.is_empty() {
                        continue;
                    }
                    return (name.to_owned(), data.join("\n"));
                }
                let chunk = self.response.chunk().await.unwrap().expect("the stream stays open");
                self.buffer.push_str(&String::from_utf8_lossy(&chunk));
            }
        })
        .await
        .expect("an event arrives")
    }

    async fn next_message(&mut self) -> Value {
        let (name, data) = self.next().await;
        assert_eq!(name, "message");
        serde_json::from_str(&data).unwrap()
    }
}

#[tokio::test]
async fn the_older_sse_transport_serves_a_session() {
    let gateway = Gateway::with(Options::default().echo());
    let mut events = SseStream::open(&gateway).await;
    let (name, endpoint) = events.next().await;
    assert_eq!(name, "endpoint");
    assert!(endpoint.starts_with("/messages/?session_id="), "{endpoint}");
    let session = endpoint.rsplit('=').next().unwrap().to_owned();
    let messages = format!("{}{endpoint}", gateway.url);
    let post = |body: Value| {
        let messages = messages.clone();
        async move { reqwest::Client::new().post(messages).json(&body).send().await.unwrap() }
    };

    let init = post(json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})).await;
    assert_eq!(init.status(), StatusCode::ACCEPTED);
    assert_eq!(events.next_message().await["result"]["protocolVersion"], "2024-11-05");
    assert_eq!(
        post(json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await.status(),
        StatusCode::ACCEPTED
    );
    post(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "over sse"}}})).await;
    let answer = events.next_message().await;
    assert_eq!(answer["id"], 1);
    assert_eq!(answer["result"]["content"][0]["text"], "over sse");

    // Errors as the official SDKs give them.
    let client = reqwest::Client::new();
    let without = client.post(format!("{}/messages/", gateway.url)).json(&json!({})).send().await.unwrap();
    assert_eq!(without.status(), StatusCode::BAD_REQUEST);
    let unknown =
        client.post(format!("{}/messages/?session_id=nope", gateway.url)).json(&json!({})).send().await.unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let garbage = client.post(&messages).header("content-type", "application/json").body("{oops").send().await.unwrap();
    assert_eq!(garbage.status(), StatusCode::BAD_REQUEST);
    // A streamable-HTTP request cannot reach an SSE session.
    let cross = gateway.http().post_raw(Some(&session), r#"{"jsonrpc":"2.0","id":5,"method":"tools/list"}"#, &[]).await;
    assert_eq!(cross.status, StatusCode::NOT_FOUND);

    // Closing the stream ends the session and its runner.
    let runner = runner_pids(&session)[0];
    drop(events);
    eventually("the runner of a closed SSE session stops", || gone(runner)).await;
    let after = client.post(&messages).json(&json!({"jsonrpc": "2.0", "method": "x"})).send().await.unwrap();
    assert_eq!(after.status(), StatusCode::NOT_FOUND);
}

// Roots is deprecated for 2026-07-28 but part of the revisions served here.
#[allow(deprecated)]
#[tokio::test]
async fn server_requests_reach_the_client_and_its_answers_reach_the_server() {
    use rmcp::model::{ClientCapabilities, ClientConfig, ListRootsResult, Root};
    use rmcp::service::RequestContext;
    use rmcp::{ClientHandler, ErrorData, RoleClient};

    struct WithRoots;
    impl ClientHandler for WithRoots {
        fn get_info(&self) -> ClientConfig {
            let mut info = ClientConfig::default();
            info.capabilities = ClientCapabilities::builder().enable_roots().build();
            info
        }
        async fn list_roots(&self, _: RequestContext<RoleClient>) -> Result<ListRootsResult, ErrorData> {
            Ok(ListRootsResult::new(vec![Root::new("file:///work/project")]))
        }
    }

    let gateway = Gateway::with(Options::default().echo());
    let transport = rmcp::transport::StreamableHttpClientTransport::from_uri(gateway.mcp_url());
    let client = rmcp::ServiceExt::serve(WithRoots, transport).await.unwrap();
    let result = client.call_tool(tool_call("ask", json!({}))).await.unwrap();
    let text = result.content[0].as_text().unwrap().text.clone();
    assert!(text.contains("file:///work/project"), "{text}");
}

#[tokio::test]
async fn browser_origins_are_checked() {
    let gateway = Gateway::with(Options::default().echo().env("ALLOWED_ORIGINS", "https://good.example"));
    let http = gateway.http();
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}).to_string();
    let evil = http.post_raw(None, init.clone(), &[("origin", "https://evil.example")]).await;
    assert_eq!(evil.status, StatusCode::FORBIDDEN);
    assert_eq!(evil.error_code(), -32600);
    assert!(children_of(gateway.pid()).is_empty(), "a refused origin started a runner");
    for origin in ["https://good.example", "http://localhost:5173", "http://127.0.0.1:3000"] {
        let ok = http.post_raw(None, init.clone(), &[("origin", origin)]).await;
        assert_eq!(ok.status, StatusCode::OK, "{origin}: {}", ok.text);
    }
}

/// The Python interpreter of a venv `scripts/test` prepared with the `mcp` SDK.
fn python_sdk(venv: &str) -> PathBuf {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target").join(venv).join("bin").join("python");
    assert!(python.exists(), "{} is missing: run scripts/test, which creates the Python SDK venvs", python.display());
    python
}

async fn run_python_client(venv: &str, mode: &str, url: &str) -> Value {
    run_python_sdk(venv, &[mode, url], None).await
}

/// Runs `tests/py/sdk_client.py` with `args` in a venv `scripts/test` made,
/// sending `api_key` when given; returns its JSON report.
pub async fn run_python_sdk(venv: &str, args: &[&str], api_key: Option<&str>) -> Value {
    let mode = args[0];
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("py").join("sdk_client.py");
    let mut command = tokio::process::Command::new(python_sdk(venv));
    command.arg(script).args(args).kill_on_drop(true);
    if let Some(key) = api_key {
        command.env("MCP_API_KEY", key);
    }
    let output =
        tokio::time::timeout(Duration::from_secs(180), command.output()).await.expect("the client finishes").unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{mode} client failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|_| panic!("no JSON from the client: {stdout}"))
}

async fn python_sdk_runs_code(venv: &str, modes: &[&str]) {
    let gateway = Gateway::start();
    for mode in modes {
        let url = if *mode == "sse" { format!("{}/sse", gateway.url) } else { gateway.mcp_url() };
        let report = run_python_client(venv, mode, &url).await;
        assert!(report["tools"].as_array().unwrap().contains(&json!("code_exec_python")), "{mode}: {report}");
        assert_eq!(report["result"], json!({"returncode": 0, "stdout": "4", "stderr": ""}), "{mode}: {report}");
    }
}

#[tokio::test]
async fn the_python_sdk_1_x_works_over_streamable_http_and_sse() {
    python_sdk_runs_code("py-sdk-1", &["http", "sse"]).await;
}

#[tokio::test]
async fn the_python_sdk_2_x_works_over_streamable_http_and_sse_and_probes_first() {
    python_sdk_runs_code("py-sdk-2", &["http", "auto", "sse"]).await;
}
