//! A hostile client and a misbehaving server: every malformed request is
//! answered at once, memory stays bounded when nobody reads, a client with no
//! GET stream still gets the server's requests, and logs keep secrets.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::*;

/// Far below REQUEST_TIMEOUT (set to a minute): an answer this fast came
/// from the gateway itself, not from waiting for the server.
const PROMPT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn malformed_requests_are_answered_at_once_and_never_forwarded() {
    let gateway = Gateway::with(Options::default().echo().env("REQUEST_TIMEOUT", "60s"));
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let cases = [
        r#"{"jsonrpc":"2.0","id":1.5,"method":"tools/list"}"#.to_owned(),
        r#"{"jsonrpc":"2.0","id":-0,"method":"tools/list"}"#.to_owned(),
        r#"{"jsonrpc":"2.0","id":1267650600228229401496703205376,"method":"tools/list"}"#.to_owned(),
        r#"{"jsonrpc":"2.0","id":1e3,"method":"tools/list"}"#.to_owned(),
        r#"{"id":2,"method":"tools/list"}"#.to_owned(),
        r#"{"jsonrpc":"1.0","id":3,"method":"tools/list"}"#.to_owned(),
        format!(
            r#"{{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{{"name":"echo","arguments":{{"text":{deep}}}}}}}"#
        ),
    ];
    for body in cases {
        let reply = tokio::time::timeout(PROMPT, http.post_raw(Some(&session), body.clone(), &[]))
            .await
            .unwrap_or_else(|_| panic!("no prompt answer to {}", &body[..body.len().min(80)]));
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text);
        assert_eq!(reply.error_code(), -32600, "{}", reply.text);
    }
    // Nothing reached the server: it has seen only initialize, and still works.
    let ok = http.call(&session, 9, "echo", json!({"text": "still here"})).await;
    assert_eq!(ok.json["result"]["content"][0]["text"], "still here");
}

#[tokio::test]
async fn a_client_without_a_get_stream_gets_the_servers_request_on_its_call() {
    let gateway = Gateway::with(Options::default().echo());
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    // The server asks the client (roots/list) in the middle of the call.
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "ask", "arguments": {}}});
    let mut response = http
        .request(reqwest::Method::POST)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("mcp-session-id", &session)
        .body(call.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    let asked: Value = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Some(request) = sse_events(&text).into_iter().find(|e| e["method"] == "roots/list") {
                return request;
            }
            let chunk = response.chunk().await.unwrap().expect("the call's stream stays open");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .expect("the server's request arrives on the call's stream");
    let answer =
        json!({"jsonrpc": "2.0", "id": asked["id"], "result": {"roots": [{"uri": "file:///from/the/client"}]}});
    assert_eq!(http.post(Some(&session), &answer).await.status, StatusCode::ACCEPTED);
    while let Some(chunk) = response.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let result = sse_events(&text).into_iter().find(|e| e["id"] == 1).expect("the call's answer");
    assert!(result["result"]["content"][0]["text"].as_str().unwrap().contains("file:///from/the/client"), "{text}");
}

#[tokio::test]
async fn a_flood_nobody_reads_keeps_the_gateways_memory_bounded() {
    let gateway = Gateway::with(Options::default().echo().env("STREAM_BUFFER_BYTES", "8388608"));
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let before = rss_of(gateway.pid()).unwrap();
    // Two calls in flight, so the flood belongs to neither and goes to the GET
    // stream, which nobody opens: 200 MB that no client will ever read.
    let sleeper = tokio::spawn({
        let (http, session) = (http.clone(), session.clone());
        async move { http.call(&session, 1, "sleep", json!({"ms": 600_000})).await }
    });
    let flood = tokio::spawn({
        let (http, session) = (http.clone(), session.clone());
        async move { http.call(&session, 2, "flood", json!({"count": 20_000, "size": 10_000})).await }
    });
    let mut peak = 0;
    while !flood.is_finished() {
        peak = peak.max(rss_of(gateway.pid()).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reply = flood.await.unwrap();
    assert_eq!(reply.json["result"]["content"][0]["text"], "flooded 20000", "{}", reply.text);
    peak = peak.max(rss_of(gateway.pid()).unwrap_or(0));
    let limit = 64 * 1024 * 1024;
    assert!(peak < before + limit, "the gateway grew from {before} to {peak} bytes");
    sleeper.abort();
    assert_eq!(http.delete(&session).await, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn trace_logs_hold_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("gateway.log");
    let key = "api-key-that-must-never-be-logged";
    let gateway = Gateway::with(Options::default().echo().api_key(key).env("RUST_LOG", "trace").log_to(log.clone()));
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let ok = http.call(&session, 1, "echo", json!({"text": "hello"})).await;
    assert_eq!(ok.json["result"]["content"][0]["text"], "hello");
    // An unauthenticated dial that tries to forge a log line.
    let forged = reqwest::get(format!("{}/rendezvous?session=x%0AINFO%20forged%20line", gateway.url)).await.unwrap();
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(http.delete(&session).await, StatusCode::NO_CONTENT);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("DEBUG"), "the log was not at trace level");
    for secret in [key, SECRET, session.as_str()] {
        assert!(!text.contains(secret), "the log holds a secret ({} bytes of log)", text.len());
    }
    // Runner tokens are JWTs, whose base64 starts with `eyJ`.
    assert!(!text.contains("eyJ"), "the log holds a runner token");
    assert!(!text.lines().any(|l| l.starts_with("INFO forged")), "a log line was forged");
}
