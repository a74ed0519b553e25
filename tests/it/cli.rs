//! The `dynogate` command-line client, run as a process: `mcp list_tools`
//! and `mcp call_tool` against a real gateway over streamable HTTP and the
//! older SSE transport, and against local stdio servers; its refusals and
//! exit codes; and `agents` against a stand-in for Heroku's agents endpoint
//! that checks the request and answers with a canned event stream.

use std::process::Stdio;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use crate::support::*;

const DYNOGATE: &str = env!("CARGO_BIN_EXE_dynogate");
const KEY: &str = "k3y-for-cli-tests";

/// A finished `dynogate` run.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    fn succeeded(&self) -> &Self {
        assert_eq!(self.code, Some(0), "{self:?}");
        self
    }
}

/// Runs `dynogate args…` with only `env` on top of what any process needs
/// (so the test's own MCP_SERVER_URL or API_KEY, if any, never leak in), and
/// stdout and stderr piped, so stderr is not a terminal.
async fn dynogate(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = tokio::process::Command::new(DYNOGATE);
    command.args(args).env_clear();
    for name in ["PATH", "HOME", "TMPDIR", "PIP_FIND_LINKS", "PIP_CERT", "PIP_DEFAULT_TIMEOUT"] {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command.envs(env.iter().copied()).stdin(Stdio::null()).kill_on_drop(true);
    let output = tokio::time::timeout(PATIENCE, command.output())
        .await
        .unwrap_or_else(|_| panic!("dynogate {args:?} did not finish in time"))
        .expect("run dynogate");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Whether a successful `list_tools` run printed a tool called `name`.
fn lists(run: &Run, name: &str) -> bool {
    let tools = run.succeeded().json();
    let tools = tools.as_array().unwrap_or_else(|| panic!("not a JSON array of tools: {run:?}"));
    tools.iter().any(|tool| tool["name"] == name)
}

/// Whether an `mcp-echo` started with `marker` as its argument is running
/// (the client's own command line holds the marker too, inside --command).
fn echo_server_running(marker: &str) -> bool {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| !gone(pid))
        .filter_map(argv_of)
        .any(|argv| argv.first().is_some_and(|a| a == ECHO) && argv.get(1).is_some_and(|a| a == marker))
}

#[tokio::test]
async fn streamable_http_lists_and_calls_tools_and_ends_its_sessions() {
    let gateway = Gateway::with(Options::default().echo());
    let url = gateway.mcp_url();
    let env = [("MCP_SERVER_URL", url.as_str())];

    let tools = dynogate(&["mcp", "list_tools"], &env).await;
    assert!(lists(&tools, "echo"), "{tools:?}");

    let call = dynogate(&["mcp", "call_tool", "--name", "echo", "--args", r#"{"text": "over HTTP"}"#], &env).await;
    let result = call.succeeded().json();
    assert_eq!(result["content"][0]["text"], "over HTTP");
    assert_eq!(result["isError"], false);

    // Progress notifications are for a terminal; a pipe gets none.
    let progress = dynogate(&["mcp", "call_tool", "--name", "progress", "--args", r#"{"steps": 3}"#], &env).await;
    assert_eq!(progress.succeeded().json()["content"][0]["text"], "3 steps");
    assert_eq!(progress.stderr, "", "stderr is not a terminal: no progress lines");

    // A tool's error result is printed, and the exit code says it failed.
    let unknown = dynogate(&["mcp", "call_tool", "--name", "no_such_tool"], &env).await;
    assert_eq!(unknown.code, Some(1), "{unknown:?}");
    assert_eq!(unknown.json()["isError"], true);
    assert!(unknown.stderr.contains("the tool reported an error"), "{unknown:?}");

    // Each run deleted its session, so no runner is left behind.
    eventually("the CLI's sessions have ended", || children_of(gateway.pid()).is_empty()).await;
}

#[tokio::test]
async fn the_older_sse_transport_lists_and_calls_tools() {
    let gateway = Gateway::with(Options::default().echo());
    let sse_url = format!("{}/sse", gateway.url);
    let sse = ["--transport", "sse", "--url", sse_url.as_str()];

    let tools = dynogate(&[&["mcp", "list_tools"], &sse[..]].concat(), &[]).await;
    assert!(lists(&tools, "echo"), "{tools:?}");

    // The transport flags may come before the action too.
    let args = [&["mcp"], &sse[..], &["call_tool", "--name", "echo", "--args", r#"{"text": "over SSE"}"#]].concat();
    let call = dynogate(&args, &[]).await;
    assert_eq!(call.succeeded().json()["content"][0]["text"], "over SSE");

    // The session ended with the stream.
    eventually("the CLI's sessions have ended", || children_of(gateway.pid()).is_empty()).await;
}

#[tokio::test]
async fn stdio_starts_a_local_server_and_stops_it() {
    // A marker argument (mcp-echo ignores its arguments) to find the server.
    let echo = format!("{ECHO} cli-stdio-marker");
    let tools = dynogate(&["mcp", "list_tools", "--transport", "stdio", "--command", &echo], &[]).await;
    assert!(lists(&tools, "echo"), "{tools:?}");

    // --command alone implies stdio.
    let call =
        dynogate(&["mcp", "call_tool", "--command", &echo, "--name", "echo", "--args", r#"{"text": "hi"}"#], &[]).await;
    assert_eq!(call.succeeded().json()["content"][0]["text"], "hi");
    eventually("the stdio server has exited", || !echo_server_running("cli-stdio-marker")).await;

    // The code executor itself, as the Heroku templates' example does it.
    let exec = format!("{RUNNER} exec");
    let tools = dynogate(&["mcp", "list_tools", "--command", &exec], &[]).await;
    assert!(lists(&tools, "code_exec_python"), "{tools:?}");
    let args =
        ["mcp", "call_tool", "--command", &exec, "--name", "code_exec_python", "--args", r#"{"code": "print(2+2)"}"#];
    let run = dynogate(&args, &[]).await;
    assert_eq!(
        exec_result(&json!({"result": run.succeeded().json()})),
        json!({"returncode": 0, "stdout": "4", "stderr": ""})
    );

    // A server that dies mid-call is an error, not a hang.
    let exit =
        dynogate(&["mcp", "call_tool", "--command", ECHO, "--name", "exit", "--args", r#"{"code": 3}"#], &[]).await;
    assert_eq!(exit.code, Some(1), "{exit:?}");
    assert!(exit.stderr.contains("exited before answering tools/call"), "{exit:?}");
}

#[tokio::test]
async fn progress_is_shown_when_stderr_is_a_terminal() {
    // `script` (util-linux, on every Debian) runs the client on a terminal;
    // stdout goes to a file, so what comes back through the terminal is stderr.
    let dir = tempfile::tempdir().unwrap();
    let stdout = dir.path().join("stdout");
    let line = format!(
        "{DYNOGATE} mcp call_tool --command {ECHO} --name progress --args '{{\"steps\": 3}}' > {}",
        stdout.display()
    );
    let mut command = tokio::process::Command::new("script");
    command.args(["-qec", &line, "/dev/null"]).stdin(Stdio::null()).kill_on_drop(true);
    let output = tokio::time::timeout(PATIENCE, command.output()).await.expect("script finishes").expect("run script");
    let terminal = String::from_utf8_lossy(&output.stdout).replace('\r', "");
    assert!(output.status.success(), "{terminal}");
    assert_eq!(terminal.lines().collect::<Vec<_>>(), ["progress 1/3", "progress 2/3", "progress 3/3"]);
    let result: Value = serde_json::from_str(&std::fs::read_to_string(&stdout).unwrap()).unwrap();
    assert_eq!(result["content"][0]["text"], "3 steps");
}

#[tokio::test]
async fn a_gateway_with_a_key_refuses_a_client_without_it() {
    let gateway = Gateway::with(Options::default().echo().api_key(KEY));
    let mcp_url = gateway.mcp_url();
    let sse_url = format!("{}/sse", gateway.url);

    for (transport, url) in [("streamable", &mcp_url), ("sse", &sse_url)] {
        let args = ["mcp", "list_tools", "--transport", transport];
        let anonymous = dynogate(&args, &[("MCP_SERVER_URL", url)]).await;
        assert_eq!(anonymous.code, Some(1), "{transport}: {anonymous:?}");
        assert_eq!(anonymous.stdout, "", "{transport}");
        assert_eq!(anonymous.stderr.lines().count(), 1, "{transport}: one line: {anonymous:?}");
        assert!(anonymous.stderr.contains("401 Unauthorized"), "{transport}: {anonymous:?}");
        assert!(anonymous.stderr.contains("set API_KEY"), "{transport}: {anonymous:?}");

        let wrong = dynogate(&args, &[("MCP_SERVER_URL", url), ("API_KEY", "nope")]).await;
        assert_eq!(wrong.code, Some(1), "{transport}: {wrong:?}");
        assert!(wrong.stderr.contains("wrong API key?"), "{transport}: {wrong:?}");

        let allowed = dynogate(&args, &[("MCP_SERVER_URL", url), ("API_KEY", KEY)]).await;
        assert!(lists(&allowed, "echo"), "{transport}");
    }
}

#[tokio::test]
async fn bad_arguments_and_unreachable_servers_fail_clearly() {
    // A free port nobody listens on any more.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let url = format!("http://{closed}/mcp");

    for bad in [r#"{"code": "#, "[1, 2]", "print(2+2)"] {
        let run =
            dynogate(&["mcp", "call_tool", "--url", &url, "--name", "code_exec_python", "--args", bad], &[]).await;
        assert_eq!(run.code, Some(2), "{bad}: {run:?}");
        assert!(run.stderr.starts_with("dynogate: --args "), "{bad}: {run:?}");
        assert_eq!(run.stdout, "");
    }

    let nowhere = dynogate(&["mcp", "list_tools"], &[]).await;
    assert_eq!(nowhere.code, Some(2), "{nowhere:?}");
    assert!(nowhere.stderr.contains("MCP_SERVER_URL"), "{nowhere:?}");

    for transport in ["streamable", "sse"] {
        let run = dynogate(&["mcp", "list_tools", "--url", &url, "--transport", transport], &[]).await;
        assert_eq!(run.code, Some(1), "{transport}: {run:?}");
        assert!(run.stderr.contains(&closed.to_string()), "{transport}: names the server: {run:?}");
        assert!(run.stderr.contains("Connection refused"), "{transport}: {run:?}");
        assert_eq!(run.stderr.lines().count(), 1, "{transport}: {run:?}");
    }
}

#[tokio::test]
async fn a_call_that_outlasts_the_timeout_ends_with_an_error() {
    let args =
        ["mcp", "call_tool", "--command", ECHO, "--timeout", "500ms", "--name", "sleep", "--args", r#"{"ms": 60000}"#];
    let run = dynogate(&args, &[]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("no answer within 0.5s"), "{run:?}");
}

#[tokio::test]
async fn ctrl_c_ends_a_call_and_stops_the_server() {
    let server = format!("{ECHO} cli-interrupt-marker");
    let cli = tokio::process::Command::new(DYNOGATE)
        .args(["mcp", "call_tool", "--command", &server, "--name", "sleep", "--args", r#"{"ms": 600000}"#])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start dynogate");
    // The client listens for Ctrl-C before it starts the server, so once the
    // server is up a SIGINT is the client's to handle.
    eventually("the stdio server has started", || echo_server_running("cli-interrupt-marker")).await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(cli.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let output = tokio::time::timeout(PATIENCE, cli.wait_with_output()).await.expect("dynogate exits").unwrap();
    assert_eq!(output.status.code(), Some(130), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stderr), "dynogate: interrupted\n");
    eventually("the stdio server has exited", || !echo_server_running("cli-interrupt-marker")).await;
}

// ---- agents, against a stand-in for Heroku's endpoint -------------------

/// A stand-in `/v1/agents/heroku`: records each request it serves and
/// answers `stream` as `text/event-stream` to a request with the right key.
/// The test, not the handler, checks what was recorded, so a wrong request
/// fails with the test's message instead of a dropped connection.
struct Agents {
    url: String,
    served: Arc<Mutex<Vec<Served>>>,
    server: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Clone)]
struct Served {
    accept: String,
    body: Value,
}

#[derive(Clone)]
struct Canned {
    stream: Arc<str>,
    served: Arc<Mutex<Vec<Served>>>,
}

impl Agents {
    async fn start(stream: &str) -> Self {
        let served = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new()
            .route("/v1/agents/heroku", post(answer))
            .with_state(Canned { stream: stream.into(), served: served.clone() });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Agents { url, served, server }
    }

    fn bodies(&self) -> Vec<Value> {
        let served = self.served.lock().unwrap();
        assert!(served.iter().all(|s| s.accept == "text/event-stream"), "{served:?}");
        served.iter().map(|s| s.body.clone()).collect()
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn answer(State(canned): State<Canned>, headers: HeaderMap, body: String) -> Response {
    if headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {KEY}")) {
        let refusal = json!({"error": {"message": "Invalid API key", "type": "authentication_error", "code": 401}});
        return (StatusCode::UNAUTHORIZED, [(header::CONTENT_TYPE, "application/json")], refusal.to_string())
            .into_response();
    }
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let body = serde_json::from_str(&body).unwrap_or(Value::String(body));
    canned.served.lock().unwrap().push(Served { accept, body });
    ([(header::CONTENT_TYPE, "text/event-stream")], canned.stream.to_string()).into_response()
}

fn completion(object: &str, message: Value, finish: &str) -> Value {
    json!({"id": "cmpl-1", "object": object, "created": 1_700_000_000, "model": "claude-4-sonnet",
           "choices": [{"index": 0, "message": message, "finish_reason": finish}],
           "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})
}

/// The completions of a run that calls code_exec_python once, in order.
fn conversation() -> Vec<Value> {
    let call = json!({"id": "tooluse_1", "type": "function",
                      "function": {"name": "code_exec_python", "arguments": "{\"code\": \"print(2+2)\"}"}});
    vec![
        completion(
            "chat.completion",
            json!({"role": "assistant", "content": "Let me run that.", "tool_calls": [call]}),
            "tool_calls",
        ),
        completion(
            "tool.completion",
            json!({"role": "tool", "content": "Tool 'code_exec_python' returned result: {\"stdout\": \"4\"}", "tool_call_id": "tooluse_1"}),
            "",
        ),
        completion("chat.completion", json!({"role": "assistant", "content": "2 + 2 is 4."}), "stop"),
    ]
}

/// The conversation as an SSE body, with keepalives between events.
fn conversation_stream() -> String {
    let mut body = String::from(": keepalive\n\n");
    for (i, event) in conversation().iter().enumerate() {
        body.push_str(&format!("event: message\ndata: {event}\n\n"));
        if i == 0 {
            body.push_str(": keepalive\n\n");
        }
    }
    body.push_str("event: done\ndata: [DONE]\n\n");
    body
}

#[tokio::test]
async fn agents_sends_herokus_request_shape_and_prints_the_stream() {
    let agents = Agents::start(&conversation_stream()).await;
    let mcp_url = format!("{}/mcp", agents.url);
    let env = [("MCP_SERVER_URL", mcp_url.as_str()), ("API_KEY", KEY), ("INFERENCE_MODEL_ID", "claude-4-sonnet")];
    let args = [
        "agents",
        "What is 2+2? Use Python.",
        "--tool",
        "code_exec_python",
        "--mcp-tool",
        "echo.echo",
        "--max-calls",
        "2",
        "--system",
        "Be brief.",
    ];

    let readable = dynogate(&args, &env).await;
    readable.succeeded();
    assert_eq!(
        readable.stdout.lines().collect::<Vec<_>>(),
        [
            "Let me run that.",
            "→ calling code_exec_python({\"code\": \"print(2+2)\"})",
            "← code_exec_python: Tool 'code_exec_python' returned result: {\"stdout\": \"4\"}",
            "2 + 2 is 4.",
        ]
    );
    assert_eq!(readable.stderr, "");
    assert_eq!(
        agents.bodies(),
        [json!({
            "model": "claude-4-sonnet",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2? Use Python."}],
            "tools": [
                {"type": "heroku_tool", "name": "code_exec_python", "runtime_params": {"max_calls": 2}},
                {"type": "mcp", "name": "echo.echo", "runtime_params": {"max_calls": 2}},
            ],
        })]
    );

    // --json: each event's data, one object per line; --base-url instead of
    // the MCP URL; no model and no tools options means neither is sent.
    let raw = dynogate(&["agents", "hi", "--json", "--base-url", &agents.url], &[("API_KEY", KEY)]).await;
    raw.succeeded();
    let lines: Vec<Value> =
        raw.stdout.lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
    assert_eq!(lines, conversation());
    assert_eq!(agents.bodies()[1], json!({"messages": [{"role": "user", "content": "hi"}]}));
}

#[tokio::test]
async fn agents_reports_an_error_event_and_a_refusal() {
    let stream = "event: message\ndata: {\"object\":\"chat.completion\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"Thinking.\"}}]}\n\n\
                  : keepalive\n\n\
                  event: error\ndata: {\"code\":500,\"message\":\"the model API failed\",\"type\":\"server_error\"}\n\n\
                  event: done\ndata: [DONE]\n\n";
    let agents = Agents::start(stream).await;
    let mcp_url = format!("{}/mcp/", agents.url);

    let failed = dynogate(&["agents", "hi", "--url", &mcp_url], &[("API_KEY", KEY)]).await;
    assert_eq!(failed.code, Some(1), "{failed:?}");
    assert_eq!(failed.stdout, "Thinking.\n");
    assert_eq!(failed.stderr, "dynogate: the agent failed: the model API failed (server_error, code 500)\n");

    let raw = dynogate(&["agents", "hi", "--url", &mcp_url, "--json"], &[("API_KEY", KEY)]).await;
    assert_eq!(raw.code, Some(1), "{raw:?}");
    let last: Value = serde_json::from_str(raw.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last, json!({"code": 500, "message": "the model API failed", "type": "server_error"}));

    let refused = dynogate(&["agents", "hi", "--url", &mcp_url], &[("API_KEY", "wrong")]).await;
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert_eq!(refused.stdout, "");
    assert!(refused.stderr.contains("401 Unauthorized: Invalid API key"), "{refused:?}");
    assert_eq!(agents.bodies().len(), 2, "the refused request was not served");
}

/// The whole way: the CLI, the gateway's agents endpoint, the scripted
/// model, and a real executor on a runner of its own.
#[tokio::test]
async fn agents_runs_end_to_end_through_the_gateway() {
    use crate::model::{Model, Turn};
    let model = Model::start(None, |n, _| match n {
        0 => Turn::Calls(vec![("c1", "code_exec_python", json!({"code": "print(6*7)"}).to_string())]),
        _ => Turn::Text("It is 42."),
    })
    .await;
    let gateway = Gateway::with(
        Options::default().api_key(KEY).env("INFERENCE_URL", &model.url).env("INFERENCE_MODEL_ID", "scripted"),
    );
    let mcp_url = gateway.mcp_url();
    let run = dynogate(
        &["agents", "What is 6*7? Use Python.", "--tool", "code_exec_python"],
        &[("MCP_SERVER_URL", mcp_url.as_str()), ("API_KEY", KEY)],
    )
    .await;
    run.succeeded();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"→ calling code_exec_python({\"code\":\"print(6*7)\"})"), "{run:?}");
    assert!(lines[1].starts_with("← code_exec_python: Tool 'code_exec_python' returned result:"), "{run:?}");
    assert!(lines[1].contains(r#"\"stdout\": \"42\""#), "{run:?}");
    assert_eq!(lines.last(), Some(&"It is 42."), "{run:?}");
}
