use reqwest::StatusCode;
use serde_json::json;

use crate::support::*;

const KEY: &str = "k3y-for-tests";

#[tokio::test]
async fn requests_without_the_right_key_are_refused_and_either_header_works() {
    let gateway = Gateway::with(Options::default().echo().api_key(KEY));
    let anonymous = Http::new(gateway.mcp_url(), None);
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});

    for (what, header, value) in [
        ("no key", None, ""),
        ("wrong bearer", Some("authorization"), "Bearer nope"),
        ("wrong X-API-Key", Some("x-api-key"), "nope"),
        ("key as Basic auth", Some("authorization"), "Basic k3y-for-tests"),
        ("key with a suffix", Some("x-api-key"), "k3y-for-testsX"),
    ] {
        let extra: Vec<(&str, &str)> = header.map(|h| (h, value)).into_iter().collect();
        let reply = anonymous.post_raw(None, init.to_string(), &extra).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(reply.json, json!({"error": "Unauthorized"}), "{what}");
        assert_eq!(reply.headers["www-authenticate"], "Bearer", "{what}");
    }
    assert!(children_of(gateway.pid()).is_empty(), "a refused request started a runner");

    let by_bearer = anonymous.post_raw(None, init.to_string(), &[("authorization", &format!("Bearer {KEY}"))]).await;
    assert_eq!(by_bearer.status, StatusCode::OK, "{}", by_bearer.text);
    let by_header = anonymous.post_raw(None, init.to_string(), &[("x-api-key", KEY)]).await;
    assert_eq!(by_header.status, StatusCode::OK, "{}", by_header.text);

    // GET and DELETE are guarded too.
    let session = by_header.session().unwrap();
    let get = anonymous
        .request(reqwest::Method::GET)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &session);
    assert_eq!(get.send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let delete = anonymous.request(reqwest::Method::DELETE).header("mcp-session-id", &session);
    assert_eq!(delete.send().await.unwrap().status(), StatusCode::UNAUTHORIZED);

    // The rmcp client with the key works end to end.
    let client = gateway.client().await;
    assert!(client.list_all_tools().await.unwrap().iter().any(|t| t.name == "echo"));
}

#[tokio::test]
async fn health_needs_no_key() {
    let gateway = Gateway::with(Options::default().api_key(KEY));
    let health = reqwest::get(format!("{}/healthz", gateway.url)).await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let body: serde_json::Value = health.json().await.unwrap();
    assert_eq!(body["status"], "ok");
}

#[test]
fn a_public_bind_without_a_key_is_refused_with_a_clear_message() {
    let output = std::process::Command::new(GATEWAY)
        .env_clear()
        .env("PORT", "0")
        .env("BIND_ADDRESS", "0.0.0.0")
        .env("RUNNER_BIN", RUNNER)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("without API_KEY") && stderr.contains("--allow-unauthenticated"), "{stderr}");
}
