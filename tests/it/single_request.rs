//! One MCP request on a runner of its own (`dynogate_gateway::oneshot`),
//! the primitive the agents API builds on. A gateway serves in this test's
//! process so the test can call the API directly; its runners are real.

use std::time::Duration;

use bytes::Bytes;
use dynogate_gateway::oneshot::{self, RunError};
use serde_json::{Value, json};

use crate::support::*;

/// Runners of the gateway at `url` (found by the URL they dial).
fn runners_dialing(url: &str) -> Vec<i32> {
    children_of(i32::try_from(std::process::id()).unwrap())
        .into_iter()
        .filter(|pid| argv_of(*pid).is_some_and(|argv| argv.iter().any(|a| a == url)))
        .collect()
}

fn call(id: i64, code: &str, progress: bool) -> Bytes {
    let mut params = json!({"name": "code_exec_python", "arguments": {"code": code}});
    if progress {
        params["_meta"] = json!({"progressToken": "p"});
    }
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params}).to_string().into()
}

fn exec_result_of_answer(answer: &Bytes) -> Value {
    let answer: Value = serde_json::from_slice(answer).unwrap();
    assert_eq!(answer["id"], 7, "{answer}");
    exec_result(&answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_runs_on_a_runner_of_its_own_that_is_gone_after_and_leaves_nothing() {
    let (running, drain, url) = in_process(&["--warm-runners", "1"]).await;
    let state = running.state.clone();
    eventually("a warm runner is ready", || state.pool.status().ready == 1).await;
    let pooled = runners_dialing(&url);
    assert_eq!(pooled.len(), 1);

    let code = "import os, pathlib; print(os.path.exists('mark'), pathlib.Path('/tmp/mark').exists()); \
                open('mark', 'w').write('x'); open('/tmp/mark', 'w').write('x')";
    let answer =
        oneshot::run(&state, Default::default(), call(7, code, false), Duration::from_secs(60), |_| {}).await.unwrap();
    assert_eq!(exec_result_of_answer(&answer)["stdout"], "False False");
    assert_eq!(state.pool.status().claims, 1, "the run took the warm runner");
    assert!(gone(pooled[0]), "the run's runner is gone when it returns");

    // The next run starts clean: nothing of the last one's files is there.
    let answer =
        oneshot::run(&state, Default::default(), call(7, code, false), Duration::from_secs(60), |_| {}).await.unwrap();
    assert_eq!(exec_result_of_answer(&answer)["stdout"], "False False", "state survived a run");
    assert_eq!(state.sessions.claimed(), 0, "no run's session is left");

    drain.cancel();
    running.finished().await.unwrap();
    assert!(runners_dialing(&url).is_empty(), "no runner outlives the gateway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_comes_before_the_answer_and_a_run_past_its_limit_ends_with_a_clear_error() {
    let server = format!("EXEC_PROGRESS_INTERVAL=100ms {RUNNER} exec");
    let (running, drain, url) = in_process(&["--warm-runners", "0", "--runner-command", &server]).await;
    let state = running.state.clone();

    let mut progress = Vec::new();
    let answer = oneshot::run(
        &state,
        Default::default(),
        call(7, "import time; time.sleep(0.6); print('done')", true),
        Duration::from_secs(60),
        |message| progress.push(serde_json::from_slice::<Value>(message).unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(exec_result_of_answer(&answer)["stdout"], "done");
    assert!(
        progress.iter().any(|m| m["method"] == "notifications/progress" && m["params"]["progressToken"] == "p"),
        "{progress:?}"
    );

    let started = std::time::Instant::now();
    let timed_out = oneshot::run(
        &state,
        Default::default(),
        call(7, "import time; time.sleep(60)", false),
        Duration::from_secs(2),
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(matches!(timed_out, RunError::TimedOut(_)), "{timed_out}");
    assert!(timed_out.to_string().contains("time limit of 2s"), "{timed_out}");
    assert!(started.elapsed() < Duration::from_secs(30), "the limit held: {:?}", started.elapsed());
    eventually("the timed-out run's runner is gone", || runners_dialing(&url).is_empty()).await;
    assert!(state.sessions.is_empty());

    let refused = oneshot::run(
        &state,
        Default::default(),
        Bytes::from_static(b"{\"jsonrpc\":\"2.0\",\"method\":\"x\"}"),
        Duration::from_secs(5),
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(matches!(refused, RunError::NotARequest(_)), "{refused}");
    drain.cancel();
    running.finished().await.unwrap();
}

/// A server that asks its client something mid-call (here `roots/list`)
/// gets an error at once, since no client stands behind a single-request
/// run, and can finish the call; it is never left waiting until the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_request_during_a_run_is_answered_at_once() {
    let (running, drain, _) = in_process(&["--warm-runners", "0", "--runner-command", ECHO]).await;
    let state = running.state.clone();
    let ask = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "ask", "arguments": {}}});
    let mut passed_on = Vec::new();
    let answer = oneshot::run(&state, Default::default(), ask.to_string().into(), Duration::from_secs(60), |m| {
        passed_on.push(serde_json::from_slice::<Value>(m).unwrap());
    })
    .await
    .expect("the call finishes, well within its limit");
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    let told: Value = serde_json::from_str(answer["result"]["content"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(told["code"], -32601, "{answer}");
    assert!(told["message"].as_str().unwrap().contains("roots/list"), "{told}");
    assert!(passed_on.iter().all(|m| m.get("method") != Some(&json!("roots/list"))), "not the caller's to answer");
    drain.cancel();
    running.finished().await.unwrap();
}
