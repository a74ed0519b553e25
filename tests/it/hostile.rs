//! A hostile client and a misbehaving server: every malformed request is
//! answered at once, memory stays bounded when nobody reads, a client with no
//! GET stream still gets the server's requests, logs keep secrets, and a web
//! page whose domain was rebound to loopback is refused.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    let peak = PeakRss::watch(gateway.pid());
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
    let reply = flood.await.unwrap();
    assert_eq!(reply.json["result"]["content"][0]["text"], "flooded 20000", "{}", reply.text);
    let peak = peak.get();
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

/// Sends `request` on a connection of its own and reads until `until` has
/// arrived or, with `None`, until the gateway closes the connection.
async fn exchange(to: SocketAddr, request: &str, until: Option<&str>) -> String {
    let mut stream = tokio::net::TcpStream::connect(to).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(PATIENCE, async {
        loop {
            if until.is_some_and(|u| String::from_utf8_lossy(&seen).contains(u)) {
                return;
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no answer to {request}"));
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn an_unguarded_gateway_refuses_host_names_that_are_not_loopback() {
    // No API_KEY, so the gateway is bound to loopback and checks `Host`.
    let gateway = Gateway::with(Options::default().echo());
    let to = gateway.addr();
    let port = to.port();
    let initialize = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
    .to_string();
    let mcp = |host: &str| {
        format!(
            "POST /mcp HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\naccept: {ACCEPT_BOTH}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{initialize}",
            initialize.len()
        )
    };
    let sse = |host: &str| {
        format!("GET /sse HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\naccept: text/event-stream\r\n\r\n")
    };

    // A page whose domain now resolves to 127.0.0.1 sends its own name.
    for host in ["evil.example".to_owned(), format!("evil.example:{port}")] {
        for request in [mcp(&host), sse(&host)] {
            let response = exchange(to, &request, None).await;
            assert!(response.starts_with("HTTP/1.1 403"), "Host {host}: {response}");
            assert!(response.contains("\"code\":-32600"), "Host {host}: {response}");
            assert!(response.contains("DNS rebinding"), "Host {host}: {response}");
        }
    }
    let health: Value = reqwest::get(format!("{}/healthz", gateway.url)).await.unwrap().json().await.unwrap();
    assert_eq!(health["sessions"], 0, "a refused request started a session");

    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), format!("[::1]:{port}")] {
        let response = exchange(to, &mcp(&host), None).await;
        assert!(response.starts_with("HTTP/1.1 200"), "Host {host}: {response}");
        assert!(response.to_ascii_lowercase().contains("mcp-session-id: "), "Host {host}: {response}");
        // The stream stays open; reading stops at its first event.
        let response = exchange(to, &sse(&host), Some("data: /messages/?session_id=")).await;
        assert!(response.starts_with("HTTP/1.1 200"), "Host {host}: {response}");
        assert!(response.contains("event: endpoint"), "Host {host}: {response}");
    }
}
