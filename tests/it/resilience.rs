//! Faults with real processes: a cut runner socket, a dropped client stream,
//! a flooding server, and a gateway told to stop under load. Multi-threaded
//! runtimes, because the proxy runs in the test process and must keep working
//! while a test thread waits on the gateway.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_runner_socket_loses_no_call_and_runs_none_twice() {
    let proxy = Proxy::start().await;
    let gateway = Gateway::with(Options::default().echo().env("GATEWAY_URL", proxy.url()));
    proxy.forward_to(&gateway.url);
    let http = gateway.http();
    let (session, _) = http.initialize().await;

    let calls: Vec<_> = (0..100)
        .map(|i| {
            let (http, session) = (http.clone(), session.clone());
            tokio::spawn(async move {
                let tag = format!("call-{i}");
                let arguments = json!({"ms": 20 * (i % 50), "tag": tag});
                (i, http.call(&session, i, "sleep", arguments).await)
            })
        })
        .collect();
    // Cut the runner's socket while most calls are still in flight.
    eventually("some calls have finished", || calls.iter().filter(|c| c.is_finished()).count() >= 5).await;
    let in_flight = calls.iter().filter(|c| !c.is_finished()).count();
    assert!(proxy.sever() >= 1, "the runner's socket went through the proxy");
    assert!(in_flight >= 50, "only {in_flight} calls were in flight at the cut");

    for call in calls {
        let (i, reply) = call.await.unwrap();
        assert_eq!(reply.json["id"], i, "{}", reply.text);
        assert_eq!(reply.json["result"]["content"][0]["text"], format!("slept {}ms", 20 * (i % 50)), "{}", reply.text);
    }
    for i in 0..100 {
        let seen = http.call(&session, 1000 + i, "seen", json!({"tag": format!("call-{i}")})).await;
        assert_eq!(seen.json["result"]["content"][0]["text"], "1", "call-{i} ran {} times", seen.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_while_the_runner_is_away_arrive_when_it_returns() {
    let proxy = Proxy::start().await;
    let gateway = Gateway::with(Options::default().echo().env("GATEWAY_URL", proxy.url()));
    proxy.forward_to(&gateway.url);
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    for round in 0..3 {
        proxy.sever();
        let reply = http.call(&session, round, "echo", json!({"text": format!("round {round}")})).await;
        assert_eq!(reply.json["result"]["content"][0]["text"], format!("round {round}"), "{}", reply.text);
    }
}

/// Reads an SSE response until an event with data arrives; returns the
/// events with their ids, then drops the connection.
async fn first_events(mut response: reqwest::Response) -> Vec<(String, Value)> {
    let mut text = String::new();
    loop {
        let chunk = response.chunk().await.unwrap().expect("the stream stays open");
        text.push_str(&String::from_utf8_lossy(&chunk));
        let events = events_with_ids(&text);
        if !events.is_empty() {
            return events;
        }
    }
}

fn events_with_ids(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|event| {
            let id = event.lines().find_map(|l| l.strip_prefix("id: "))?.to_owned();
            let data: String = event.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
            (!data.is_empty()).then(|| (id, serde_json::from_str(&data).unwrap()))
        })
        .collect()
}

#[tokio::test]
async fn a_client_that_drops_mid_reply_resumes_and_gets_the_rest_exactly_once() {
    let gateway = Gateway::with(Options::default().echo());
    let http = gateway.http();
    let (session, _) = http.initialize_as("2025-11-25").await;
    let request = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "progress", "arguments": {"steps": 5, "delay_ms": 200}, "_meta": {"progressToken": "p"}}});
    let response = http
        .request(reqwest::Method::POST)
        .header("accept", ACCEPT_BOTH)
        .header("content-type", "application/json")
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", "2025-11-25")
        .body(request.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let seen = first_events(response).await;
    let (last_id, first) = seen.last().unwrap().clone();
    assert_eq!(first["params"]["progress"], 1);

    let resumed = http
        .request(reqwest::Method::GET)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &session)
        .header("last-event-id", &last_id)
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), StatusCode::OK);
    let rest = events_with_ids(&resumed.text().await.unwrap());
    let progress: Vec<&Value> = rest.iter().filter_map(|(_, e)| e["params"]["progress"].as_u64().map(|_| e)).collect();
    let answers: Vec<&Value> = rest.iter().map(|(_, e)| e).filter(|e| e["id"] == 1).collect();
    assert_eq!(
        progress.iter().map(|e| e["params"]["progress"].as_u64().unwrap()).collect::<Vec<_>>(),
        [2, 3, 4, 5],
        "every later event once, none before the resume point"
    );
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0]["result"]["content"][0]["text"], "5 steps");

    let stale = http
        .request(reqwest::Method::GET)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &session)
        .header("last-event-id", "999-1")
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), StatusCode::BAD_REQUEST, "an unknown stream cannot be resumed");
}

#[tokio::test]
async fn a_server_flooding_stdout_is_slowed_and_memory_stays_bounded() {
    let gateway = Gateway::with(Options::default().echo());
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let runner = runner_pids(&session)[0];
    let (gateway_before, runner_before) = (rss_of(gateway.pid()).unwrap(), rss_of(runner).unwrap());
    // 300 MB of notifications that belong to no request, with nobody reading them.
    let flood = tokio::spawn({
        let (http, session) = (http.clone(), session.clone());
        async move { http.call(&session, 1, "flood", json!({"count": 30_000, "size": 10_000})).await }
    });
    let (mut gateway_peak, mut runner_peak) = (0, 0);
    while !flood.is_finished() {
        gateway_peak = gateway_peak.max(rss_of(gateway.pid()).unwrap_or(0));
        runner_peak = runner_peak.max(rss_of(runner).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reply = flood.await.unwrap();
    assert_eq!(reply.json["result"]["content"][0]["text"], "flooded 30000", "{}", reply.text);
    let limit = 96 * 1024 * 1024;
    assert!(gateway_peak < gateway_before + limit, "gateway grew from {gateway_before} to {gateway_peak} bytes");
    assert!(runner_peak < runner_before + limit, "runner grew from {runner_before} to {runner_peak} bytes");
    // The session still works.
    let ok = http.call(&session, 2, "echo", json!({"text": "after the flood"})).await;
    assert_eq!(ok.json["result"]["content"][0]["text"], "after the flood");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_answers_every_client() {
    let mut gateway = Gateway::with(Options::default().echo().env("DRAIN_TIMEOUT", "3s"));
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let (http, session) = (http.clone(), session.clone());
            // Half finish within the drain, half never would.
            let ms = if i % 2 == 0 { 500 } else { 120_000 };
            tokio::spawn(async move {
                (i, http.call(&session, i, "sleep", json!({"ms": ms, "tag": format!("t{i}")})).await)
            })
        })
        .collect();
    let health = format!("{}/healthz", gateway.url);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let body: Value = reqwest::get(&health).await.unwrap().json().await.unwrap();
        if body["in_flight"] == 20 {
            break;
        }
        assert!(Instant::now() < deadline, "calls never all reached the session: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let status = gateway.terminate();
        (status, gateway)
    });
    let mut answered = 0;
    for call in calls {
        let (i, reply) = tokio::time::timeout(Duration::from_secs(30), call).await.expect("no client hangs").unwrap();
        if i % 2 == 0 {
            assert_eq!(reply.json["result"]["content"][0]["text"], "slept 500ms", "call {i}: {}", reply.text);
        } else {
            assert_eq!(reply.error_code(), -32003, "call {i}: {}", reply.text);
            assert!(reply.json["error"]["message"].as_str().unwrap().contains("shutting down"), "{}", reply.text);
        }
        answered += 1;
    }
    assert_eq!(answered, 20);
    let (status, _gateway) = status.await.unwrap();
    assert!(status.expect("the gateway exits").success());
    assert!(started.elapsed() < Duration::from_secs(28), "drain took {:?}", started.elapsed());
}
