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

/// A gateway with a key listens on every address, IPv6 and IPv4 alike (Fir's
/// web dynos require `::`), and its local runners dial back on loopback.
#[tokio::test]
async fn a_public_gateway_serves_ipv6_and_ipv4() {
    use std::io::BufRead;
    // reqwest is built without a default TLS backend.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut child = std::process::Command::new(GATEWAY)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PORT", "0")
        .env("API_KEY", KEY)
        .env("RUNNER_BIN", RUNNER)
        .env("RUNNER_COMMAND", ECHO)
        .env("RENDEZVOUS_SECRET", SECRET)
        .env("ALLOW_UNSANDBOXED", "true")
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the gateway");
    // SIGTERM, so the gateway ends its sessions and their runners first.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let guard = Kill(child);
    let line = std::io::BufReader::new(stdout).lines().next().expect("a first line").unwrap();
    let bound = line.rsplit(' ').next().unwrap().to_owned();
    let port = bound.rsplit(':').next().unwrap().to_owned();
    assert!(bound.starts_with("http://[::]:") || bound.starts_with("http://0.0.0.0:"), "{line}");
    let v6 = bound.starts_with("http://[::]:");
    let hosts = if v6 { vec!["127.0.0.1", "[::1]"] } else { vec!["127.0.0.1"] };
    for host in hosts {
        let http = Http::new(format!("http://{host}:{port}/mcp"), Some(KEY.to_owned()));
        let (session, _) = http.initialize().await;
        let reply = http.call(&session, 1, "echo", json!({"text": host})).await;
        assert_eq!(reply.json["result"]["content"][0]["text"], host, "{host}: {}", reply.text);
    }
    drop(guard);
}
