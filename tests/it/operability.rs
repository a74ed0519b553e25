use prometheus_parse::Scrape;
use serde_json::{Value, json};

use crate::support::*;

const KEY: &str = "operability-key-0123456789";
const CODE_MARKER: &str = "code-text-that-must-not-be-logged-7f3a";

async fn readyz(gateway: &Gateway) -> u16 {
    reqwest::get(format!("{}/readyz", gateway.url)).await.unwrap().status().as_u16()
}

#[tokio::test]
async fn metrics_count_a_workload_with_bounded_labels_and_the_audit_trail_names_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("gateway.log");
    let mut gateway = Gateway::with(Options::default().api_key(KEY).log_to(log.clone()));
    assert_eq!(readyz(&gateway).await, 200);
    let (status, _, _) = scrape_metrics(&gateway, None).await;
    assert_eq!(status, 401, "metrics need the key");

    // A session that runs code twice (one failing) and is deleted.
    let client = gateway.client().await;
    let code = format!("print('{CODE_MARKER}')");
    let ran = client.call_tool(tool_call("code_exec_python", json!({"code": code}))).await.unwrap();
    assert_eq!(exec_result_of(&ran)["stdout"], CODE_MARKER);
    let failed = client
        .call_tool(tool_call("code_exec_python", json!({"code": "import sys; sys.exit(3)", "packages": ["six"]})))
        .await
        .unwrap();
    assert_eq!(exec_result_of(&failed)["returncode"], 3);
    let session = only_session(&gateway);
    client.cancel().await.unwrap();

    // One whose server-to-client stream a client reads, then whose runner
    // is killed; and a request for a session that does not exist.
    let http = gateway.http();
    let (killed, _) = http.initialize().await;
    let get_stream = http
        .request(reqwest::Method::GET)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &killed)
        .send()
        .await
        .unwrap();
    assert_eq!(get_stream.status(), 200);
    let (_, text, open) = scrape_metrics(&gateway, Some(KEY)).await;
    assert_eq!(metric(&open, "dynogate_get_streams_open", &[]), 1.0, "{text}");
    assert_eq!(metric(&open, "dynogate_sessions", &[]), 1.0, "{text}");
    let runner = runner_pids(&killed)[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(runner), nix::sys::signal::Signal::SIGKILL).unwrap();
    eventually("the killed runner's session ends", || runner_pids(&killed).is_empty() && gone(runner)).await;
    let unknown = http.call("0123456789abcdef0123456789abcdef", 9, "echo", json!({})).await;
    assert_eq!(unknown.error_code(), -32001);

    let (status, mut text, mut scrape) = scrape_metrics(&gateway, Some(KEY)).await;
    assert_eq!(status, 200);
    // The killed session's end is counted when its task ends; wait for it.
    let deadline = std::time::Instant::now() + PATIENCE;
    while metric(&scrape, "dynogate_sessions_ended_total", &[]) < 2.0 {
        assert!(std::time::Instant::now() < deadline, "sessions not counted as ended:\n{text}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        (_, text, scrape) = scrape_metrics(&gateway, Some(KEY)).await;
    }
    assert_eq!(metric(&scrape, "dynogate_sessions_started_total", &[("pooled", "false")]), 2.0, "{text}");
    assert_eq!(metric(&scrape, "dynogate_sessions_ended_total", &[("reason", "deleted")]), 1.0, "{text}");
    let lost = metric(&scrape, "dynogate_sessions_ended_total", &[("reason", "runner_lost")])
        + metric(&scrape, "dynogate_sessions_ended_total", &[("reason", "server_exited")]);
    assert_eq!(lost, 1.0, "{text}");
    assert_eq!(metric(&scrape, "dynogate_request_duration_seconds", &[("method", "tools/call")]), 2.0, "{text}");
    assert_eq!(metric(&scrape, "dynogate_request_duration_seconds", &[("method", "initialize")]), 2.0, "{text}");
    assert_eq!(metric(&scrape, "dynogate_runner_start_seconds", &[]), 2.0, "{text}");
    assert_eq!(metric(&scrape, "dynogate_first_result_seconds", &[]), 1.0, "{text}");
    assert!(metric(&scrape, "dynogate_jsonrpc_errors_total", &[("code", "-32001")]) >= 1.0, "{text}");
    assert_eq!(metric(&scrape, "dynogate_sessions", &[]), 0.0, "{text}");
    assert_eq!(metric(&scrape, "dynogate_get_streams_open", &[]), 0.0, "{text}");
    drop(get_stream);
    // Both calls ran Python; the second installed a package first.
    assert_eq!(metric(&scrape, "dynogate_code_run_seconds", &[("language", "python")]), 2.0, "{text}");
    assert_eq!(metric(&scrape, "dynogate_package_install_seconds", &[("language", "python")]), 1.0, "{text}");
    for sample in &scrape.samples {
        for (name, label) in sample.labels.iter() {
            assert!(label.len() <= 24 && !label.contains(&session) && !label.contains(&killed), "{name}={label}");
        }
    }

    // The audit trail: one line per call, one per session end, no secret and no code.
    gateway.terminate();
    let logged = std::fs::read_to_string(&log).unwrap();
    let audit: Vec<Value> = logged
        .lines()
        .filter_map(|l| l.split_once("dynogate::audit: "))
        .map(|(_, line)| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let calls: Vec<&Value> = audit.iter().filter(|a| a["audit"] == "tool_call").collect();
    assert_eq!(calls.len(), 2, "{audit:?}");
    assert_eq!(calls[0]["tool"], "code_exec_python");
    assert_eq!(calls[0]["returncode"], 0);
    assert_eq!(calls[0]["stdout_bytes"], CODE_MARKER.len());
    assert_eq!(calls[0]["code_sha256"].as_str().map(str::len), Some(64));
    assert_eq!(calls[0]["session"], &session[..8]);
    assert!(calls[0]["api_key"].as_str().unwrap().starts_with("sha256:"), "{:?}", calls[0]);
    assert_eq!((calls[1]["returncode"].as_i64(), &calls[1]["packages"]), (Some(3), &json!(["six"])));
    assert_eq!(calls[1]["timed_out"], false);
    assert!(calls[1]["duration_ms"].as_u64().is_some());
    let ends: Vec<&Value> = audit.iter().filter(|a| a["audit"] == "session_end").collect();
    assert_eq!(ends.len(), 2, "{audit:?}");
    assert!(ends.iter().any(|e| e["reason"] == "deleted" && e["calls"] == 2), "{ends:?}");
    for secret in [KEY, SECRET, CODE_MARKER, &session, &killed] {
        assert!(!logged.contains(secret), "the log holds {secret:?}");
    }
}

/// In process: once the drain begins the gateway takes no new connections
/// and closes idle ones, so readiness is asked of its router directly.
#[tokio::test]
async fn readiness_turns_off_while_the_gateway_drains() {
    use tower::ServiceExt;
    let (running, drain, _) = in_process(&["--warm-runners", "0"]).await;
    let ask = || async {
        let request = axum::http::Request::get("/readyz").body(axum::body::Body::empty()).unwrap();
        let response = dynogate_gateway::server::app(running.state.clone()).oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(response.into_body(), 4096).await.unwrap();
        (status, serde_json::from_slice::<Value>(&body).unwrap())
    };
    assert_eq!(ask().await, (200, json!({"ready": true})));
    drain.cancel();
    assert_eq!(ask().await, (503, json!({"ready": false, "reason": "draining"})));
    tokio::time::timeout(PATIENCE, running.finished()).await.expect("the gateway winds down").unwrap();
}

/// Even at `RUST_LOG=trace`, where libraries print what they handle, the
/// log of a run holds neither a key nor the code that ran nor its output.
#[tokio::test]
async fn no_secret_and_no_code_reaches_the_log_at_trace() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("gateway.log");
    let mut gateway = Gateway::with(Options::default().api_key(KEY).log_to(log.clone()).env("RUST_LOG", "trace"));
    let client = gateway.client().await;
    let code = format!("print('{CODE_MARKER}'[::-1] + 'out')");
    let ran = client.call_tool(tool_call("code_exec_python", json!({"code": code}))).await.unwrap();
    let printed = exec_result_of(&ran)["stdout"].as_str().unwrap().to_owned();
    assert!(printed.ends_with("out"), "{printed}");
    let session = only_session(&gateway);
    client.cancel().await.unwrap();
    gateway.terminate();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains(" DEBUG "), "the verbose levels were on: {logged}");
    for secret in [KEY, SECRET, CODE_MARKER, &printed, &session] {
        assert!(!logged.contains(secret), "the log holds {secret:?}");
    }
}

/// With METRICS_PORT, `/metrics` is also served on a port of its own (on
/// METRICS_BIND's address when given), without the key; the main port still
/// asks for it.
#[tokio::test]
async fn metrics_port_serves_metrics_without_the_key() {
    // Where IPv6 loopback exists, the metrics port binds it apart from the main one.
    let v6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    let mut args = vec!["--warm-runners", "0", "--metrics-port", "0", "--bind", "127.0.0.1", "--api-key", KEY];
    if v6 {
        args.extend(["--metrics-bind", "::1"]);
    }
    let (running, drain, url) = in_process(&args).await;
    let metrics = running.metrics.expect("a metrics listener");
    assert!(metrics.ip().is_loopback(), "{metrics}");
    assert_eq!(metrics.is_ipv6(), v6, "METRICS_BIND is where the metrics port listens: {metrics}");
    let response = reqwest::get(format!("http://{metrics}/metrics")).await.unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text format");
    assert!(scrape.samples.iter().any(|s| s.metric == "dynogate_sessions"), "{text}");
    let main = reqwest::get(format!("{url}metrics")).await.unwrap();
    assert_eq!(main.status(), 401, "the main port still needs the key");
    let other = reqwest::get(format!("http://{metrics}/mcp")).await.unwrap();
    assert_eq!(other.status(), 404, "nothing but metrics on the metrics port");
    drain.cancel();
    tokio::time::timeout(PATIENCE, running.finished()).await.expect("the gateway winds down").unwrap();
    assert!(reqwest::get(format!("http://{metrics}/metrics")).await.is_err(), "the metrics port closes too");
}
