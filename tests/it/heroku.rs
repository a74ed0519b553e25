use serde_json::json;

// Multi-threaded runtimes: the fake API runs in this process and must keep
// answering while a test thread blocks waiting for the gateway to exit.
use crate::fake_heroku::{FakeHeroku, GATEWAY_APP, RUNNER_APP};
use crate::support::*;

pub const HEROKU_KEY: &str = "heroku-platform-key";
pub const CLIENT_KEY: &str = "client-key";

/// A gateway that runs its sessions on `fake`'s dynos.
pub fn heroku(fake: &FakeHeroku) -> Options {
    Options::default()
        .api_key(CLIENT_KEY)
        .env("HEROKU_API_KEY", HEROKU_KEY)
        .env("HEROKU_APP_NAME", "my-app")
        .env("HEROKU_API_URL", &fake.url)
}

/// The config vars a real gateway app would have, which every dyno of that
/// app receives.
pub fn config_vars() -> [(&'static str, &'static str); 4] {
    [
        ("API_KEY", CLIENT_KEY),
        ("HEROKU_API_KEY", HEROKU_KEY),
        ("RENDEZVOUS_SECRET", SECRET),
        ("DATABASE_URL", "postgres://u:heroku-db-password-9a1@db.example/x"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_dynos_run_in_an_app_of_their_own_where_code_finds_no_secret() {
    let fake = FakeHeroku::start(HEROKU_KEY, &config_vars()).await;
    let gateway = Gateway::with(heroku(&fake));
    // Made at start-up, like the gateway's app, and on its slug.
    let client = gateway.client().await;
    assert_eq!(fake.app(RUNNER_APP), Some(("heroku-24".to_owned(), vec!["slug-1".to_owned()])));
    // The fake runs dynos on this machine, beside the gateway itself, so the
    // code looks where a dyno's secrets would be: every process of its dyno,
    // from itself up to the launcher that started the runner.
    let snoop = r#"
import os
def stat(pid):
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
seen, pid, launcher = [], os.getpid(), False
while pid > 1 and not launcher:
    cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode("latin-1")
    launcher = ("exit " + "$?") in cmdline
    try:
        seen.append(open(f"/proc/{pid}/environ", "rb").read().decode("latin-1"))
    except OSError as e:
        seen.append(f"unreadable {pid}: {e}")
    seen.append(cmdline)
    pid = int(stat(pid)[1])
print(len(seen) // 2, launcher)
print("\n".join(seen))
"#;
    let result = client.call_tool(tool_call("code_exec_python", json!({"code": snoop}))).await.unwrap();
    let printed = exec_result_of(&result)["stdout"].as_str().unwrap().to_owned();
    let first = printed.lines().next().unwrap_or_default().to_owned();
    assert!(first.ends_with(" True"), "the code reached its dyno's launcher: {printed}");
    assert!(printed.contains("RUNNER_TOKEN") || printed.contains("unreadable"), "{printed}");
    for (name, value) in config_vars() {
        assert!(!printed.contains(value), "{name} of the gateway's app reached code on a runner dyno");
    }
    assert_eq!(fake.dyno_apps(), [RUNNER_APP], "no dyno in the gateway's app {GATEWAY_APP}");
    client.cancel().await.unwrap();
}

/// What a user who pressed the Button does first: the official Python SDK
/// runs code on a dyno, installs numpy there and runs again. The dyno starts
/// as Heroku starts one (see `fake_heroku`), with a Python that works only
/// with what its `.profile.d` script sets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_runs_code_and_installs_numpy_on_a_dyno_started_like_herokus() {
    let fake = FakeHeroku::start(HEROKU_KEY, &config_vars()).await;
    let gateway = Gateway::with(heroku(&fake));
    let report =
        crate::transports::run_python_sdk("py-sdk-1", &["http", &gateway.mcp_url(), "install"], Some(CLIENT_KEY)).await;
    assert_eq!(report["result"], json!({"returncode": 0, "stdout": "4", "stderr": ""}), "{report}");
    let steps = report["steps"].as_array().unwrap();
    let python = fake.slug().join(".heroku").join("python").join("bin").join("python3");
    assert_eq!(steps[0]["stdout"], python.to_str().unwrap(), "the slug's Python, through .profile.d: {report}");
    assert_eq!(steps[1], json!({"returncode": 0, "stdout": "10", "stderr": ""}), "numpy installed: {report}");
    assert_eq!(steps[2], json!({"returncode": 0, "stdout": "True True", "stderr": ""}), "and kept: {report}");
    assert_eq!(fake.dyno_apps(), [RUNNER_APP]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_runs_on_a_dyno_and_its_dyno_is_stopped_at_the_end() {
    let fake = FakeHeroku::start(HEROKU_KEY, &config_vars()).await;
    let gateway = Gateway::with(heroku(&fake));
    let client = gateway.client().await;

    let tools = client.list_all_tools().await.unwrap();
    assert!(tools.iter().any(|t| t.name == "code_exec_python"));
    let result = client.call_tool(tool_call("code_exec_python", json!({"code": "print(2+2)"}))).await.unwrap();
    assert_eq!(exec_result_of(&result), json!({"returncode": 0, "stdout": "4", "stderr": ""}));
    let env = client
        .call_tool(tool_call("code_exec_python", json!({"code": "import os; print(sorted(os.environ.items()))"})))
        .await
        .unwrap();
    let printed = exec_result_of(&env)["stdout"].as_str().unwrap().to_owned();
    for secret in [HEROKU_KEY, CLIENT_KEY, SECRET, "RUNNER_TOKEN"] {
        assert!(!printed.contains(secret), "{secret} reached executed code on the dyno");
    }

    let creates = fake.creates();
    assert_eq!(creates.len(), 1);
    let (command, env) = &creates[0];
    assert!(command.contains("--spawned-by dynogate") && command.contains("--session"), "{command}");
    assert!(!command.contains(&env["RUNNER_TOKEN"]), "the token is not on the command line");
    assert!(env["GATEWAY_URL"].starts_with("http://127.0.0.1:"));

    let (dyno, pid) = fake.pids().remove(0);
    assert!(!gone(pid), "the dyno's runner is running");
    client.cancel().await.unwrap();
    eventually("the dyno is stopped", || fake.stops().contains(&dyno)).await;
    eventually("no runner process remains", || gone(pid)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_dyno_reaches_the_client_with_herokus_words() {
    let fake = FakeHeroku::start(HEROKU_KEY, &config_vars()).await;
    fake.refuse_creates(422, "invalid_params", "Cannot run more than 50 Standard-1X dynos.");
    let gateway = Gateway::with(heroku(&fake));
    let reply = gateway
        .http()
        .post(None, &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}))
        .await;
    assert_eq!(reply.error_code(), -32002, "{}", reply.text);
    let message = reply.json["error"]["message"].as_str().unwrap();
    assert!(message.contains("invalid_params") && message.contains("Cannot run more than 50"), "{message}");
    assert!(!message.contains(HEROKU_KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cap_holds_before_any_dyno_is_created() {
    let fake = FakeHeroku::start(HEROKU_KEY, &config_vars()).await;
    let gateway = Gateway::with(heroku(&fake).env("MAX_SESSIONS", "1"));
    let http = gateway.http();
    let (_session, _) = http.initialize().await;
    let refused = http
        .post(None, &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}))
        .await;
    assert_eq!(refused.status, reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(fake.creates().len(), 1, "no dyno for a refused session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_runner_dynos_are_swept_at_start_up_and_others_are_left_alone() {
    let fake = FakeHeroku::start(HEROKU_KEY, &config_vars()).await;
    let (orphan, orphan_pid) = fake.launch("sleep 600 # --spawned-by dynogate --session stale0000");
    let (console, console_pid) = fake.launch("sleep 600 # a console someone opened");
    let gateway = Gateway::with(heroku(&fake));
    eventually("the orphan is stopped", || fake.stops().contains(&orphan)).await;
    eventually("the orphan's process is gone", || gone(orphan_pid)).await;
    assert!(!fake.stops().contains(&console), "a dyno without the marker was stopped");
    assert!(!gone(console_pid));

    // The sweep and the Platform API calls are counted (the stop once its answer is in).
    let scrape = || async {
        let request = reqwest::Client::new().get(format!("{}/metrics", gateway.url)).bearer_auth(CLIENT_KEY);
        request.send().await.unwrap().text().await.unwrap()
    };
    let deadline = std::time::Instant::now() + PATIENCE;
    let metrics = loop {
        let metrics = scrape().await;
        if metrics.lines().any(|l| l == "dynogate_sweeper_dynos_stopped_total 1") {
            break metrics;
        }
        assert!(std::time::Instant::now() < deadline, "the sweep is not counted: {metrics}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let ok_calls: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("dynogate_platform_api_calls_total{status=\"2xx\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(ok_calls >= 2.0, "the app lookup, the listing and the stop: {metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_the_gateway_down_stops_every_dyno_it_started() {
    let fake = FakeHeroku::start(HEROKU_KEY, &config_vars()).await;
    let mut gateway = Gateway::with(heroku(&fake));
    let http = gateway.http();
    let ((_a, _), (_b, _)) = tokio::join!(http.initialize(), http.initialize());
    let dynos = fake.pids();
    assert_eq!(dynos.len(), 2);
    let status = gateway.terminate().expect("the gateway exits on SIGTERM");
    assert!(status.success());
    let stops = fake.stops();
    for (dyno, pid) in dynos {
        assert!(stops.contains(&dyno), "{dyno} was not stopped");
        eventually("the dyno's processes are gone", || gone(pid)).await;
    }
}

/// A dyno's state is looked at only until its runner dials back: after that
/// the socket tells, and every look would cost a Platform API call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dyno_whose_runner_connected_is_not_polled() {
    let fake = FakeHeroku::start(HEROKU_KEY, &config_vars()).await;
    let gateway = Gateway::with(heroku(&fake));
    let started = std::time::Instant::now();
    let client = gateway.client().await;
    let result = client.call_tool(tool_call("code_exec_python", json!({"code": "print(6)"}))).await.unwrap();
    assert_eq!(exec_result_of(&result)["stdout"], "6");
    let looks = || fake.calls().iter().filter(|c| matches!(c, crate::fake_heroku::Call::Get(_))).count();
    // Looks come 2, 6, 14 and 24 s after the create. The runner is connected
    // now (it answered), so whatever looks were made before, none is made
    // after: wait past the next one that would have come.
    let before = looks();
    let next_look = [2, 6, 14, 24].into_iter().map(std::time::Duration::from_secs).find(|t| *t > started.elapsed());
    if let Some(next) = next_look {
        tokio::time::sleep(next + std::time::Duration::from_millis(700) - started.elapsed()).await;
    }
    assert_eq!(looks(), before, "the connected dyno was polled");
    client.cancel().await.unwrap();
}
