use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::StatusCode;
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn killing_the_runner_mid_call_fails_the_call_fast_and_ends_the_session() {
    // Unsandboxed, so the session's files are on the host's disk and their
    // removal can be watched (a sandbox keeps them in its own tmpfs; see
    // `sandbox::killed_executor_or_runner_leaves_nothing`).
    let gateway = Gateway::with(Options::default().env("SANDBOX", "off"));
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let runner = runner_pids(&session)[0];
    let marker = "dynogate_long_call_marker";
    let call = tokio::spawn({
        let (http, session) = (http.clone(), session.clone());
        async move {
            let code = format!("import time\nopen('left_behind', 'w').write('x')\n{marker} = 1\ntime.sleep(60)");
            let reply = http.call(&session, 1, "code_exec_python", json!({"code": code})).await;
            (reply, Instant::now())
        }
    });
    let python = {
        let mut found = None;
        eventually("the long call is running", || {
            found = pid_with_arg(marker);
            found.is_some()
        })
        .await;
        found.unwrap()
    };
    let workdir = std::path::PathBuf::from(environ_of(runner).remove("RUNNER_SESSION_DIR").expect("a session dir"));
    eventually("the code writes in the session's directory", || workdir.join("left_behind").is_file()).await;
    let killed_at = Instant::now();
    kill(Pid::from_raw(runner), Signal::SIGKILL).unwrap();
    let (reply, answered_at) = call.await.unwrap();
    assert!(answered_at - killed_at < Duration::from_secs(2), "took {:?}", answered_at - killed_at);
    assert_eq!(reply.json["id"], 1);
    assert_eq!(reply.error_code(), -32003, "{}", reply.text);
    assert!(reply.json["error"]["message"].as_str().unwrap().contains("runner"), "{}", reply.text);

    let after = http.post_raw(Some(&session), r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#, &[]).await;
    assert_eq!(after.status, StatusCode::NOT_FOUND);
    eventually("the orphaned code is killed", || gone(python)).await;
    eventually("the killed runner's session directory is removed", || !workdir.exists()).await;
}

#[tokio::test]
async fn a_server_that_exits_fails_its_calls_with_the_exit_status() {
    let gateway = Gateway::with(Options::default().echo());
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let runner = runner_pids(&session)[0];
    let reply = http.call(&session, 1, "exit", json!({"code": 3})).await;
    assert_eq!(reply.error_code(), -32003, "{}", reply.text);
    assert!(reply.json["error"]["message"].as_str().unwrap().contains("exit status 3"), "{}", reply.text);
    eventually("the runner exits", || gone(runner)).await;
    let after = http.post_raw(Some(&session), r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#, &[]).await;
    assert_eq!(after.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_idle_session_ends_like_a_delete() {
    let gateway = Gateway::with(Options::default().echo().env("SESSION_IDLE_TIMEOUT", "1s"));
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let runner = runner_pids(&session)[0];
    eventually("the idle runner is stopped", || gone(runner)).await;
    let after = http.post_raw(Some(&session), r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#, &[]).await;
    assert_eq!(after.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn requests_keep_a_session_from_going_idle() {
    let gateway = Gateway::with(Options::default().echo().env("SESSION_IDLE_TIMEOUT", "2s"));
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    // A call that lasts longer than the idle timeout is activity, not idleness.
    let reply = http.call(&session, 1, "sleep", json!({"ms": 3000})).await;
    assert_eq!(reply.json["result"]["content"][0]["text"], "slept 3000ms", "{}", reply.text);
}

#[tokio::test]
async fn the_session_cap_answers_503_with_retry_after() {
    let gateway = Gateway::with(Options::default().echo().env("MAX_SESSIONS", "1"));
    let http = gateway.http();
    let (first, _) = http.initialize().await;
    let refused = http
        .post(None, &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}))
        .await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(refused.error_code(), -32005);
    assert!(refused.json["error"]["message"].as_str().unwrap().contains("MAX_SESSIONS"));
    assert_eq!(http.delete(&first).await, StatusCode::NO_CONTENT);
    http.initialize().await;
}

#[tokio::test]
async fn sigterm_ends_every_session_and_leaves_nothing_running() {
    let mut gateway = Gateway::with(Options::default().echo());
    let http = gateway.http();
    let ((a, _), (b, _)) = tokio::join!(http.initialize(), http.initialize());
    let runners: Vec<i32> = [runner_pids(&a), runner_pids(&b)].concat();
    let servers: Vec<i32> = runners.iter().flat_map(|r| children_of(*r)).collect();
    assert_eq!(runners.len(), 2);
    assert_eq!(servers.len(), 2, "each runner has its MCP server");
    let status = gateway.terminate().expect("the gateway exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    for pid in runners.iter().chain(&servers) {
        assert!(gone(*pid), "{pid} outlived the gateway");
    }
}
