use serde_json::json;

use crate::otlp::{Received, Receiver};
use crate::support::*;

/// The trace id a client starts its own trace with.
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// With an OTLP endpoint set, a tool call from a client that sends its
/// trace context yields one trace holding the gateway's span for the
/// request and the runner's span for its side of the call; the session's
/// own trace holds the spawn, the runner's start and the rendezvous. The
/// code that runs sees none of the exporter's settings.
#[tokio::test]
async fn a_tool_call_yields_one_trace_with_gateway_and_runner_spans() {
    let receiver = Receiver::start().await;
    let mut gateway = Gateway::with(
        Options::default()
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.clone())
            .env("OTEL_EXPORTER_OTLP_HEADERS", "x-otlp-key=otlp-secret-value")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100"),
    );
    let http = gateway.http();
    // Polled paths make no spans: the status page alone asks every second.
    for path in ["healthz", "v1/status"] {
        assert_eq!(reqwest::get(format!("{}/{path}", gateway.url)).await.unwrap().status(), 200);
    }
    let (session, _) = http.initialize().await;
    let code = "import os; print(sorted(k for k in os.environ if k.startswith(('OTEL', 'TRACE'))))";
    let body = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "code_exec_python", "arguments": {"code": code}}});
    let client_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{TRACE}-{client_span}-01");
    let reply = http.post_raw(Some(&session), body.to_string(), &[("traceparent", &traceparent)]).await;
    assert_eq!(exec_result(&reply.json)["stdout"], "[]", "code sees no exporter setting: {}", reply.text);
    assert_eq!(reply.json["result"]["_meta"]["traceparent"], serde_json::Value::Null, "nothing of ours in the answer");

    let spans = wait_for(&receiver, "the call's spans from both sides", |spans| {
        spans.iter().any(|s| s.trace_id == TRACE && s.service == "dynogate-runner")
            && spans.iter().any(|s| s.trace_id == TRACE && s.name == "tools/call code_exec_python")
    })
    .await;
    let in_trace: Vec<&Received> = spans.iter().filter(|s| s.trace_id == TRACE).collect();
    let request = in_trace.iter().find(|s| s.name == "tools/call code_exec_python").unwrap();
    assert_eq!(request.service, "dynogate-gateway");
    assert_eq!(request.attribute("mcp.tool"), Some("code_exec_python"));
    let http_span = in_trace.iter().find(|s| s.name == "http").expect("the HTTP request's span");
    assert_eq!(http_span.parent_span_id, client_span, "the client's context is the parent");
    assert_eq!(request.parent_span_id, http_span.span_id);
    let runner = in_trace.iter().find(|s| s.service == "dynogate-runner").unwrap();
    assert_eq!(runner.name, "runner tools/call code_exec_python");
    assert_eq!(runner.parent_span_id, request.span_id, "the runner's span is the request's child");

    // The session's trace, complete once the runner has exited.
    assert_eq!(http.delete(&session).await, reqwest::StatusCode::NO_CONTENT);
    let spans = wait_for(&receiver, "the session's spans", |spans| {
        spans.iter().any(|s| s.name == "runner" && s.service == "dynogate-runner")
            && spans.iter().any(|s| s.name == "session")
    })
    .await;
    let spawn = spans.iter().find(|s| s.name == "spawn").expect("a spawn span");
    let session_span = spans.iter().find(|s| s.name == "session").unwrap();
    assert_eq!(spawn.parent_span_id, session_span.span_id);
    let runner = spans.iter().find(|s| s.name == "runner").unwrap();
    assert_eq!((&runner.trace_id, &runner.parent_span_id), (&spawn.trace_id, &spawn.span_id));
    let rendezvous = spans.iter().find(|s| s.name == "rendezvous").expect("a rendezvous span");
    assert_eq!((&rendezvous.trace_id, &rendezvous.parent_span_id), (&runner.trace_id, &runner.span_id));
    assert_ne!(spawn.trace_id, TRACE, "a session's life is a trace of its own");
    let polled: Vec<&Received> =
        spans.iter().filter(|s| matches!(s.attribute("path"), Some("/healthz" | "/v1/status"))).collect();
    assert!(polled.is_empty(), "{polled:?}");
    assert!(spans.iter().any(|s| s.attribute("path") == Some("/mcp")), "MCP requests have theirs");
    for span in &spans {
        for (key, value) in &span.attributes {
            assert!(!value.contains(SECRET) && !value.contains(&session), "{} {key}={value}", span.name);
        }
    }
    gateway.terminate();
}

async fn wait_for(receiver: &Receiver, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let spans = receiver.spans();
        if done(&spans) {
            return spans;
        }
        let names: Vec<String> = spans.iter().map(|s| format!("{}:{}", s.service, s.name)).collect();
        assert!(std::time::Instant::now() < deadline, "{what}: never received; got {names:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
