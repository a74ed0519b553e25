use reqwest::StatusCode;
use serde_json::json;

use crate::support::*;

const LIST: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;

#[tokio::test]
async fn each_refused_request_gets_its_status_and_a_json_rpc_error() {
    let gateway = Gateway::with(Options::default().echo().env("MAX_BODY_BYTES", "2048"));
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let s = Some(session.as_str());

    // (what, reply, status, JSON-RPC code)
    let cases = [
        ("missing session header", http.post_raw(None, LIST, &[]).await, StatusCode::BAD_REQUEST, -32600),
        ("unknown session", http.post_raw(Some("0123456789abcdef"), LIST, &[]).await, StatusCode::NOT_FOUND, -32001),
        ("malformed JSON", http.post_raw(s, "{\"jsonrpc\":", &[]).await, StatusCode::BAD_REQUEST, -32700),
        ("not a JSON-RPC message", http.post_raw(s, "42", &[]).await, StatusCode::BAD_REQUEST, -32600),
        ("batch on 2025-06-18", http.post_raw(s, format!("[{LIST}]"), &[]).await, StatusCode::BAD_REQUEST, -32600),
        (
            "body over the limit",
            http.post_raw(
                s,
                format!(r#"{{"jsonrpc":"2.0","id":1,"method":"x","params":{{"p":"{}"}}}}"#, "x".repeat(4096)),
                &[],
            )
            .await,
            StatusCode::PAYLOAD_TOO_LARGE,
            -32600,
        ),
        (
            "unsupported MCP-Protocol-Version",
            http.post_raw(s, LIST, &[("mcp-protocol-version", "1999-01-01")]).await,
            StatusCode::BAD_REQUEST,
            -32600,
        ),
        (
            "Accept without SSE",
            http.post_raw(s, LIST, &[("accept", "application/json")]).await,
            StatusCode::NOT_ACCEPTABLE,
            -32600,
        ),
        (
            "Accept of HTML",
            http.post_raw(s, LIST, &[("accept", "text/html")]).await,
            StatusCode::NOT_ACCEPTABLE,
            -32600,
        ),
        (
            "not JSON content",
            http.post_raw(s, LIST, &[("content-type", "text/plain")]).await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            -32600,
        ),
        (
            "initialize on a live session",
            http.post_raw(s, r#"{"jsonrpc":"2.0","id":7,"method":"initialize","params":{}}"#, &[]).await,
            StatusCode::BAD_REQUEST,
            -32600,
        ),
    ];
    for (what, reply, status, code) in cases {
        assert_eq!(reply.status, status, "{what}: {}", reply.text);
        assert_eq!(reply.error_code(), code, "{what}: {}", reply.text);
        assert_eq!(reply.json["jsonrpc"], "2.0", "{what}");
        assert!(reply.json["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}");
    }

    // Nothing above disturbed the session.
    let ok = http.call(&session, 2, "echo", json!({"text": "still here"})).await;
    assert_eq!(ok.json["result"]["content"][0]["text"], "still here");
}

#[tokio::test]
async fn an_ended_session_answers_404_on_every_method() {
    let gateway = Gateway::with(Options::default().echo());
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    assert_eq!(http.delete(&session).await, StatusCode::NO_CONTENT);
    assert_eq!(http.post_raw(Some(&session), LIST, &[]).await.status, StatusCode::NOT_FOUND);
    assert_eq!(http.delete(&session).await, StatusCode::NOT_FOUND);
    let get = http
        .request(reqwest::Method::GET)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn get_and_delete_check_their_headers_too() {
    let gateway = Gateway::with(Options::default().echo());
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let get = |accept: &'static str, session: Option<String>| {
        let mut request = http.request(reqwest::Method::GET).header("accept", accept);
        if let Some(session) = session {
            request = request.header("mcp-session-id", session);
        }
        async move { read(request.send().await.unwrap()).await }
    };
    let wrong_accept = get("application/json", Some(session.clone())).await;
    assert_eq!(wrong_accept.status, StatusCode::NOT_ACCEPTABLE);
    assert_eq!(wrong_accept.error_code(), -32600);
    let no_session = get("text/event-stream", None).await;
    assert_eq!(no_session.status, StatusCode::BAD_REQUEST);
    let delete = read(http.request(reqwest::Method::DELETE).send().await.unwrap()).await;
    assert_eq!(delete.status, StatusCode::BAD_REQUEST);
    assert_eq!(delete.error_code(), -32600);
}

#[tokio::test]
async fn stateless_probes_are_pointed_at_initialize() {
    let gateway = Gateway::with(Options::default().echo());
    let http = gateway.http();
    let discover =
        http.post(None, &json!({"jsonrpc": "2.0", "id": "d1", "method": "server/discover", "params": {}})).await;
    assert_eq!(discover.status, StatusCode::BAD_REQUEST);
    assert_eq!(discover.json["id"], "d1");
    assert_eq!(discover.error_code(), -32601);
    assert_eq!(discover.json["error"]["data"]["supported"], json!(["2025-03-26", "2025-06-18", "2025-11-25"]));
    let message = discover.json["error"]["message"].as_str().unwrap();
    assert!(message.contains("initialize") && message.contains("2025-11-25"), "{message}");

    let modern = http.post_raw(None, LIST, &[("mcp-protocol-version", "2026-07-28")]).await;
    assert_eq!(modern.status, StatusCode::BAD_REQUEST);
    assert_eq!(modern.error_code(), -32601);
}

#[tokio::test]
async fn an_rmcp_client_that_probes_first_falls_back_to_initialize() {
    use rmcp::model::ProtocolVersion;
    use rmcp::service::{ClientLifecycleMode, ClientServiceExt};
    use rmcp::transport::StreamableHttpClientTransport;

    let gateway = Gateway::with(Options::default().echo());
    let transport = StreamableHttpClientTransport::from_uri(gateway.mcp_url());
    let lifecycle =
        ClientLifecycleMode::Auto { preferred_versions: vec![ProtocolVersion::LATEST], legacy_version: None };
    let client = ().serve_with_lifecycle(transport, lifecycle).await.expect("falls back to initialize");
    let tools = client.list_all_tools().await.unwrap();
    assert!(tools.iter().any(|t| t.name == "echo"));
}

#[tokio::test]
async fn a_body_that_is_not_utf8_is_a_parse_error_and_the_session_goes_on() {
    let gateway = Gateway::with(Options::default().echo());
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let mut body =
        br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"#.to_vec();
    body.extend_from_slice(b"\"\xff\xfe\"}}}");
    let response = http
        .request(reqwest::Method::POST)
        .header("accept", ACCEPT_BOTH)
        .header("content-type", "application/json")
        .header("mcp-session-id", &session)
        .body(body)
        .send()
        .await
        .unwrap();
    let reply = read(response).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error_code(), -32700);
    let ok = http.call(&session, 2, "echo", json!({"text": "fine"})).await;
    assert_eq!(ok.json["result"]["content"][0]["text"], "fine");
}
