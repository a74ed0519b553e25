use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::*;

#[tokio::test]
async fn progress_rides_on_its_requests_stream_before_the_answer() {
    let gateway = Gateway::with(Options::default().echo());
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let reply = http
        .post(
            Some(&session),
            &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                    "params": {"name": "progress", "arguments": {"steps": 3}, "_meta": {"progressToken": "tok"}}}),
        )
        .await;
    assert_eq!(reply.headers["content-type"], "text/event-stream");
    let events = reply.events();
    assert_eq!(events.len(), 4, "{}", reply.text);
    for (i, event) in events[..3].iter().enumerate() {
        assert_eq!(event["method"], "notifications/progress");
        assert_eq!(event["params"]["progressToken"], "tok");
        assert_eq!(event["params"]["progress"], i + 1);
    }
    assert_eq!(events[3]["id"], 1);
    assert_eq!(events[3]["result"]["content"][0]["text"], "3 steps");
}

/// Reads SSE events from a streaming response until `want` of them arrived.
async fn next_events(response: &mut reqwest::Response, want: usize) -> Vec<Value> {
    let mut text = String::new();
    tokio::time::timeout(PATIENCE, async {
        loop {
            if sse_events(&text).len() >= want {
                return;
            }
            let chunk = response.chunk().await.unwrap().expect("the stream stays open");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .expect("events arrive on the GET stream");
    sse_events(&text)
}

fn open_get(http: &Http, session: &str) -> impl Future<Output = reqwest::Response> {
    let request = http
        .request(reqwest::Method::GET)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", session)
        .timeout(Duration::from_secs(3600));
    async move {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        response
    }
}

#[tokio::test]
async fn messages_that_belong_to_no_request_go_to_the_get_stream_or_the_only_call() {
    let gateway = Gateway::with(Options::default().echo());
    let http = gateway.http();
    let (session, _) = http.initialize().await;

    // No GET stream is open and one call is in flight: the message rides
    // that call's own stream, before its answer, as a direct connection
    // would deliver it.
    let early = http.call(&session, 1, "notify", json!({"text": "early"})).await;
    let events = early.events();
    assert_eq!(events.len(), 2, "{}", early.text);
    assert_eq!(events[0]["params"]["data"], "early");
    assert_eq!(events[1]["result"]["content"][0]["text"], "notified");

    // With a GET stream open, it goes there, and the POST carries only its answer.
    let mut stream = open_get(&http, &session).await;
    let late = http.call(&session, 2, "notify", json!({"text": "late"})).await;
    assert_eq!(late.json["id"], 2);
    let events = next_events(&mut stream, 1).await;
    assert_eq!(events[0]["params"]["data"], "late");
    assert_eq!(events[0]["method"], "notifications/message");

    // Deleting the session ends the stream.
    assert_eq!(http.delete(&session).await, StatusCode::NO_CONTENT);
    let rest = tokio::time::timeout(PATIENCE, async { while stream.chunk().await.ok().flatten().is_some() {} }).await;
    assert!(rest.is_ok(), "the GET stream ended with its session");
}

#[tokio::test]
async fn many_concurrent_calls_on_one_session_each_get_their_own_answer() {
    let gateway = Gateway::with(Options::default().echo());
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let calls = (1..=40).map(|i| {
        let (http, session) = (http.clone(), session.clone());
        async move {
            let tool = if i % 2 == 0 {
                ("sleep", json!({"ms": 50 * (i % 7)}))
            } else {
                ("echo", json!({"text": format!("call {i}")}))
            };
            (i, http.call(&session, i, tool.0, tool.1).await)
        }
    });
    for (i, reply) in futures_util::future::join_all(calls).await {
        assert_eq!(reply.json["id"], i, "{}", reply.text);
        let text = reply.json["result"]["content"][0]["text"].as_str().unwrap();
        if i % 2 == 1 {
            assert_eq!(text, format!("call {i}"));
        } else {
            assert!(text.starts_with("slept"), "{text}");
        }
    }
}

#[tokio::test]
async fn a_request_that_gets_no_answer_times_out_with_an_error() {
    let gateway = Gateway::with(Options::default().echo().env("REQUEST_TIMEOUT", "1s"));
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let reply = http.call(&session, 1, "sleep", json!({"ms": 30000})).await;
    assert_eq!(reply.error_code(), -32004, "{}", reply.text);
    // The session is still usable.
    let ok = http.call(&session, 2, "echo", json!({"text": "after"})).await;
    assert_eq!(ok.json["result"]["content"][0]["text"], "after");
}

#[tokio::test]
async fn a_cancelled_request_gets_no_response_and_its_stream_ends_at_once() {
    let gateway = Gateway::with(Options::default().echo());
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let slow = tokio::spawn({
        let (http, session) = (http.clone(), session.clone());
        async move { http.call(&session, 6, "sleep", json!({"ms": 30000})).await }
    });
    // The cancellation may overtake the call; retry until it lands.
    let started = std::time::Instant::now();
    while !slow.is_finished() {
        let cancel = json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 6, "reason": "test"}});
        assert_eq!(http.post(Some(&session), &cancel).await.status, StatusCode::ACCEPTED);
        assert!(started.elapsed() < Duration::from_secs(20), "the cancelled call is still waiting");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // MCP: the receiver of a cancellation does not answer the request; the
    // stream carrying it just ends, with no message for id 6.
    let reply = slow.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert!(reply.events().iter().all(|e| e.get("id").is_none()), "{}", reply.text);
    assert!(reply.json.get("id").is_none(), "{}", reply.text);
    // A late answer from the server goes nowhere, and the session goes on.
    let ok = http.call(&session, 7, "echo", json!({"text": "after"})).await;
    assert_eq!(ok.json["result"]["content"][0]["text"], "after");
}

#[tokio::test]
async fn batches_work_on_2025_03_26_sessions() {
    let gateway = Gateway::with(Options::default().echo());
    let http = gateway.http();
    let (session, init) = http.initialize_as("2025-03-26").await;
    assert_eq!(init.json["result"]["protocolVersion"], "2025-03-26");
    let batch = json!([
        {"jsonrpc": "2.0", "id": "a", "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "one"}}},
        {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": "x", "progress": 1}},
        {"jsonrpc": "2.0", "id": "b", "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "two"}}}
    ]);
    let reply = http.post(Some(&session), &batch).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let mut answers = reply.json.as_array().expect("a JSON array of responses").clone();
    answers.sort_by_key(|a| a["id"].as_str().unwrap().to_owned());
    assert_eq!(answers.len(), 2);
    assert_eq!(answers[0]["result"]["content"][0]["text"], "one");
    assert_eq!(answers[1]["result"]["content"][0]["text"], "two");

    let only_notifications = json!([{"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": "x", "progress": 2}}]);
    assert_eq!(http.post(Some(&session), &only_notifications).await.status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn slow_answers_are_streamed_with_a_prompt_first_byte() {
    let gateway = Gateway::with(Options::default().echo().env("REPLY_STREAM_AFTER", "100ms"));
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let response = http
        .request(reqwest::Method::POST)
        .header("accept", ACCEPT_BOTH)
        .header("content-type", "application/json")
        .header("mcp-session-id", &session)
        .body(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "sleep", "arguments": {"ms": 1500}}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut response = response;
    let first = response.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b": "), "the stream opens with a comment");
    let reply = read(response).await;
    let events = sse_events(&format!("{}{}", String::from_utf8_lossy(&first), reply.text));
    assert_eq!(events.last().unwrap()["result"]["content"][0]["text"], "slept 1500ms");
}

#[tokio::test]
async fn payloads_pass_through_byte_for_byte() {
    let gateway = Gateway::with(Options::default().echo());
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let text = "ünïcödé \"quotes\" \\ backslash \u{1F600} and a tab\t".repeat(2000);
    let reply = http.call(&session, 1, "echo", json!({"text": text})).await;
    assert_eq!(reply.json["result"]["content"][0]["text"], text);
    // A pretty-printed request (line breaks as whitespace) still reaches the server as one line.
    let pretty = "{\n  \"jsonrpc\": \"2.0\",\n  \"id\": 2,\n  \"method\": \"tools/call\",\n  \"params\": {\"name\": \"echo\", \"arguments\": {\"text\": \"pretty\"}}\n}";
    let reply = http.post_raw(Some(&session), pretty, &[]).await;
    assert_eq!(reply.json["result"]["content"][0]["text"], "pretty");
}
