//! The warm pool: runners started ahead of sessions, each used by at most
//! one session, kept within MAX_SESSIONS, replaced, recycled and stopped
//! like any other runner.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::fake_heroku::FakeHeroku;
use crate::heroku::{HEROKU_KEY, heroku};
use crate::support::*;

fn warm(size: usize) -> Options {
    Options::default().env("WARM_RUNNERS", size.to_string())
}

async fn pool_status(gateway: &Gateway) -> Value {
    let health: Value = reqwest::get(format!("{}/healthz", gateway.url)).await.unwrap().json().await.unwrap();
    health["pool"].clone()
}

/// Waits until the pool holds `ready` connected runners.
async fn ready(gateway: &Gateway, ready: u64) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let status = pool_status(gateway).await;
        if status["ready"] == ready {
            return status;
        }
        assert!(tokio::time::Instant::now() < deadline, "the pool never had {ready} ready runners: {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The gateway's runners (not other helpers it may start, such as `runner obtain-uv`).
fn runners(gateway: &Gateway) -> Vec<i32> {
    children_of(gateway.pid())
        .into_iter()
        .filter(|pid| argv_of(*pid).is_some_and(|argv| argv.iter().any(|a| a == "--local")))
        .collect()
}

/// The session a runner serves, from its command line.
fn session_of(pid: i32) -> String {
    let argv = argv_of(pid).expect("runner alive");
    let at = argv.iter().position(|a| a == "--session").expect("--session");
    argv[at + 1].clone()
}

async fn python(http: &Http, session: &str, id: i64, code: &str) -> Value {
    exec_result(&http.call(session, id, "code_exec_python", json!({ "code": code })).await.json)
}

#[tokio::test]
async fn each_session_gets_a_runner_of_its_own_from_the_pool_which_refills() {
    let gateway = Gateway::with(warm(2));
    ready(&gateway, 2).await;
    let pooled = runners(&gateway);
    assert_eq!(pooled.len(), 2, "two warm runners: {pooled:?}");
    let http = gateway.http();

    let (a, _) = http.initialize().await;
    let (b, _) = http.initialize().await;
    assert_ne!(a, b);
    let runner_of = |session: &str| -> i32 {
        let pids = runner_pids(session);
        assert_eq!(pids.len(), 1, "one runner per session: {pids:?}");
        pids[0]
    };
    let (runner_a, runner_b) = (runner_of(&a), runner_of(&b));
    assert_ne!(runner_a, runner_b, "two sessions never share a runner");
    assert!(pooled.contains(&runner_a) && pooled.contains(&runner_b), "both came from the pool");
    let status = ready(&gateway, 2).await;
    assert_eq!((status["claims"].as_u64(), status["misses"].as_u64()), (Some(2), Some(0)), "{status}");
    let refilled: Vec<i32> = runners(&gateway).into_iter().filter(|p| !pooled.contains(p)).collect();
    assert_eq!(refilled.len(), 2, "the pool refilled with new runners: {refilled:?}");

    // A claimed session keeps its state, and only its own.
    let wrote = python(&http, &a, 1, "open('note', 'w').write('a'); print('ok')").await;
    assert_eq!(wrote["stdout"], "ok");
    assert_eq!(python(&http, &a, 2, "print(open('note').read())").await["stdout"], "a");
    assert_eq!(python(&http, &b, 1, "import os; print(os.path.exists('note'))").await["stdout"], "False");

    // Ended like any session: its runner and everything below it are gone.
    assert_eq!(http.delete(&a).await, StatusCode::NO_CONTENT);
    assert!(gone(runner_a), "the claimed runner is gone after DELETE");
    assert!(runner_pids(&a).is_empty());
    // The unclaimed runners are nobody's session: clients cannot reach them.
    for pid in &refilled {
        let unclaimed = session_of(*pid);
        let reply = http.call(&unclaimed, 9, "code_exec_python", json!({"code": "print(1)"})).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "a pooled runner answered a client: {}", reply.text);
        assert_eq!(http.delete(&unclaimed).await, StatusCode::NOT_FOUND);
    }
}

#[tokio::test]
async fn the_pool_stays_within_max_sessions_and_never_keeps_a_client_out() {
    let gateway = Gateway::with(warm(3).env("MAX_SESSIONS", "2"));
    let status = ready(&gateway, 2).await;
    assert_eq!(status["size"], 2, "the pool holds no more than MAX_SESSIONS: {status}");
    let http = gateway.http();
    let (a, _) = http.initialize().await;
    let (_b, _) = http.initialize().await;
    assert_eq!(runners(&gateway).len(), 2, "no runner beyond MAX_SESSIONS");
    let refused = http
        .post(
            None,
            &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}),
        )
        .await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{}", refused.text);
    assert_eq!(pool_status(&gateway).await["size"], 0);
    assert_eq!(http.delete(&a).await, StatusCode::NO_CONTENT);
    // The freed place goes back to the pool, which the next client claims.
    ready(&gateway, 1).await;
    let (c, _) = http.initialize().await;
    assert_eq!(python(&http, &c, 1, "print(2)").await["stdout"], "2");
    assert_eq!(pool_status(&gateway).await["claims"], 3);
}

#[tokio::test]
async fn a_warm_runner_killed_while_idle_is_replaced() {
    let gateway = Gateway::with(warm(1));
    ready(&gateway, 1).await;
    let first = runners(&gateway);
    assert_eq!(first.len(), 1);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first[0]), nix::sys::signal::Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let status = pool_status(&gateway).await;
        let now = runners(&gateway);
        if status["replaced"] == 1 && status["ready"] == 1 && !now.contains(&first[0]) && now.len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the killed runner was not replaced: {status} {now:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    assert_eq!(python(&http, &session, 1, "print(3)").await["stdout"], "3");
}

#[tokio::test]
async fn warm_runners_are_recycled_by_age_and_none_is_left_after_sigterm() {
    let mut gateway = Gateway::with(warm(2).env("WARM_RUNNER_MAX_AGE", "4s"));
    ready(&gateway, 2).await;
    let first = runners(&gateway);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let status = pool_status(&gateway).await;
        if status["recycled"].as_u64() >= Some(2) && first.iter().all(|pid| gone(*pid)) && status["ready"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "runners were not recycled: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before_exit = runners(&gateway);
    assert!(!before_exit.is_empty());
    let status = gateway.terminate().expect("the gateway exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    for pid in before_exit {
        assert!(gone(pid), "warm runner {pid} outlived the gateway");
    }
}

#[tokio::test]
async fn the_older_sse_transport_claims_from_the_pool_too() {
    let gateway = Gateway::with(warm(1));
    ready(&gateway, 1).await;
    let pooled = runners(&gateway);
    let client = reqwest::Client::new();
    let mut stream = client.get(format!("{}/sse", gateway.url)).send().await.unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let first = String::from_utf8(stream.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    let endpoint = first.lines().find_map(|l| l.strip_prefix("data: ")).expect("the endpoint event").trim().to_owned();
    let session = endpoint.rsplit('=').next().unwrap().to_owned();
    assert_eq!(runner_pids(&session), pooled, "the SSE session runs on the warm runner");
}

/// On the fake Platform API, dynos take seconds to boot: a session from the
/// pool answers its first call without that wait, one started cold does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_dyno_answers_the_first_call_without_waiting_for_a_boot() {
    const BOOT: Duration = Duration::from_secs(6);
    let first_call = |gateway: &Gateway| {
        let http = gateway.http();
        async move {
            let started = Instant::now();
            let (session, _) = http.initialize().await;
            assert_eq!(python(&http, &session, 1, "print(1)").await["stdout"], "1");
            started.elapsed()
        }
    };
    for warm_runners in ["1", "0"] {
        let fake = FakeHeroku::start(HEROKU_KEY, &[]).await;
        fake.set_boot_delay(BOOT);
        let gateway = Gateway::with(heroku(&fake).env("WARM_RUNNERS", warm_runners));
        if warm_runners == "1" {
            ready(&gateway, 1).await;
            let took = first_call(&gateway).await;
            assert!(took < BOOT, "a warm dyno still waited {took:?} for a boot");
            // The claimed dyno, and one more refilling the pool.
            eventually("the pool refilled", || fake.dyno_apps().len() == 2).await;
        } else {
            let took = first_call(&gateway).await;
            assert!(took >= BOOT, "a cold dyno answered in {took:?}, before it could boot");
        }
    }
}

/// A benchmark, not a test (`bench/warm.sh --heroku` runs it): through the
/// fake Platform API with a 3 s dyno boot, the time from `initialize` to
/// the first `print(1)` result, from a warm pool (each session once the pool
/// is ready again) and cold. Prints one line per case with the p50.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run by bench/warm.sh --heroku"]
async fn bench_first_result_through_the_fake_platform_api() {
    const BOOT: Duration = Duration::from_secs(3);
    for (warm_runners, sessions) in [("1", 10), ("0", 3)] {
        let fake = FakeHeroku::start(HEROKU_KEY, &[]).await;
        fake.set_boot_delay(BOOT);
        let gateway = Gateway::with(heroku(&fake).env("WARM_RUNNERS", warm_runners));
        let http = gateway.http();
        let mut took = Vec::new();
        for _ in 0..sessions {
            if warm_runners == "1" {
                ready(&gateway, 1).await;
            }
            let started = Instant::now();
            let (session, _) = http.initialize().await;
            assert_eq!(python(&http, &session, 1, "print(1)").await["stdout"], "1");
            took.push(started.elapsed());
            assert_eq!(http.delete(&session).await, StatusCode::NO_CONTENT);
        }
        took.sort();
        let p50 = took[took.len() / 2];
        let case = if warm_runners == "1" { "warm" } else { "cold" };
        println!(
            "fake-heroku {case}: initialize→first result p50 {:.1} ms over {sessions} sessions (boot {}s; all: {:?})",
            p50.as_secs_f64() * 1000.0,
            BOOT.as_secs(),
            took.iter().map(|d| d.as_millis()).collect::<Vec<_>>()
        );
    }
}

/// The sweeper stops runner dynos whose session it does not know; a warm
/// dyno waiting for its session is known, and is left to be claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_leaves_warm_dynos_alone() {
    let fake = FakeHeroku::start(HEROKU_KEY, &[]).await;
    let gateway = Gateway::with(heroku(&fake).env("SWEEP_INTERVAL", "200ms").env("WARM_RUNNERS", "1"));
    ready(&gateway, 1).await;
    let sweeps = || fake.calls().iter().filter(|c| matches!(c, crate::fake_heroku::Call::List)).count();
    let before = sweeps();
    eventually("two more sweeps", || sweeps() >= before + 2).await;
    assert!(fake.stops().is_empty(), "the sweeper stopped a warm dyno: {:?}", fake.stops());
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    assert_eq!(python(&http, &session, 1, "print(5)").await["stdout"], "5");
    assert_eq!(pool_status(&gateway).await["claims"], 1);
}
