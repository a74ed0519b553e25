//! The Platform API contract, against wiremock: what is sent, and what each
//! answer makes the spawner do.

use std::time::Duration;

use dynogate_shared::Secret;
use serde_json::{Value, json};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use super::*;
use crate::spawn::{RunnerSpec, Spawner};

const KEY: &str = "heroku-key-never-shown";

fn policy() -> api::RetryPolicy {
    api::RetryPolicy { base: Duration::from_millis(5), max_wait: Duration::from_millis(50), attempts: 3 }
}

fn spawner(server: &MockServer) -> HerokuSpawner {
    let api = Api::new(url::Url::parse(&server.uri()).unwrap(), Secret::new(KEY), "my-app".into(), policy()).unwrap();
    HerokuSpawner::new(
        api.clone(),
        api.for_app("my-gw"),
        HerokuSettings {
            runner_bin: "/app/target/release/runner".into(),
            runner_command: Some("mcp-python".into()),
            size: Some("standard-1x".into()),
            ttl: Duration::from_secs(3600),
            rate_limit_reserve: 100,
            watch_for: Duration::from_secs(30),
            trace_env: vec![("OTEL_EXPORTER_OTLP_ENDPOINT".into(), "https://otlp.example.com".into())],
        },
    )
}

fn spec() -> RunnerSpec {
    RunnerSpec {
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        session: "abc123".into(),
        token: Secret::new("the-runner-token"),
        gateway_url: url::Url::parse("https://gw.example.com/").unwrap(),
        launch: Default::default(),
    }
}

fn dyno(id: &str, command: &str, state: &str) -> Value {
    json!({"id": id, "name": format!("run.{id}"), "state": state, "command": command, "type": "run",
           "attach_url": null, "size": "Standard-1X"})
}

fn created() -> ResponseTemplate {
    ResponseTemplate::new(201).set_body_json(dyno(
        "d1",
        "/app/target/release/runner --spawned-by dynogate --session abc123",
        "starting",
    ))
}

fn error(status: u16, id: &str, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .insert_header("request-id", "req-42")
        .set_body_json(json!({"id": id, "message": message}))
}

async fn requests(server: &MockServer) -> Vec<Request> {
    server.received_requests().await.unwrap()
}

#[tokio::test]
async fn a_dyno_is_created_with_the_documented_headers_and_body() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/apps/my-app/dynos"))
        .and(header("accept", "application/vnd.heroku+json; version=3"))
        .and(header("authorization", format!("Bearer {KEY}").as_str()))
        .respond_with(created())
        .expect(1)
        .mount(&server)
        .await;
    spawner(&server).spawn(spec()).await.expect("the dyno is created");

    let sent = &requests(&server).await[0];
    assert!(sent.headers.get("user-agent").unwrap().to_str().unwrap().starts_with("dynogate/"));
    let body: Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(body["command"], "/app/target/release/runner --spawned-by dynogate --session abc123");
    assert!(
        !body["command"].as_str().unwrap().contains("the-runner-token"),
        "the token must not be on the command line"
    );
    assert_eq!(body["env"]["RUNNER_TOKEN"], "the-runner-token");
    assert_eq!(body["env"]["GATEWAY_URL"], "https://gw.example.com/");
    assert_eq!(body["env"]["RUNNER_COMMAND"], "mcp-python");
    assert_eq!(body["env"]["TRACEPARENT"], "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    assert_eq!(body["env"]["OTEL_EXPORTER_OTLP_ENDPOINT"], "https://otlp.example.com");
    assert_eq!(body["attach"], false);
    assert_eq!(body["type"], "run");
    assert_eq!(body["size"], "standard-1x");
    assert_eq!(body["time_to_live"], 3600);
}

#[tokio::test]
async fn a_runner_for_a_registered_server_or_a_size_says_so_in_its_dyno() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).and(path("/apps/my-app/dynos")).respond_with(created()).mount(&server).await;
    let launch = crate::spawn::Launch {
        server: Some(crate::spawn::ServerChoice { name: "echo".into(), command: "mcp-echo".into() }),
        size: Some("performance-m".into()),
    };
    spawner(&server).spawn(RunnerSpec { launch, ..spec() }).await.expect("the dyno is created");
    let body: Value = serde_json::from_slice(&requests(&server).await[0].body).unwrap();
    assert_eq!(body["env"]["RUNNER_COMMAND"], "mcp-echo");
    assert_eq!(body["size"], "performance-m");
}

#[tokio::test]
async fn a_release_that_is_not_ready_is_retried() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(error(409, "conflict", "release not ready"))
        .up_to_n_times(2)
        .mount(&server)
        .await;
    Mock::given(method("POST")).respond_with(created()).mount(&server).await;
    spawner(&server).spawn(spec()).await.expect("created on the third try");
    assert_eq!(requests(&server).await.len(), 3);
}

#[tokio::test]
async fn rate_limits_are_waited_out_honouring_retry_after() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            error(429, "rate_limit", "Your account reached the API rate limit").insert_header("retry-after", "0"),
        )
        .up_to_n_times(2)
        .mount(&server)
        .await;
    Mock::given(method("POST")).respond_with(created()).mount(&server).await;
    spawner(&server).spawn(spec()).await.expect("created once the limit lifts");
    assert_eq!(requests(&server).await.len(), 3);
}

#[tokio::test]
async fn server_errors_are_retried_a_bounded_number_of_times() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(error(503, "unavailable", "try later")).mount(&server).await;
    let err = spawner(&server).spawn(spec()).await.err().expect("gives up");
    assert_eq!(requests(&server).await.len(), 1 + policy().attempts as usize);
    let message = err.to_string();
    assert!(message.contains("503") && message.contains("try later"), "{message}");
}

#[tokio::test]
async fn refusals_name_herokus_error_and_never_the_key() {
    for (status, id, text) in [
        (401, "unauthorized", "Invalid credentials provided."),
        (403, "forbidden", "You do not have access to the app my-app."),
        (422, "invalid_params", "Cannot run more than 50 Standard-1X dynos."),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("POST")).respond_with(error(status, id, text)).mount(&server).await;
        let message = spawner(&server).spawn(spec()).await.err().expect("refused").to_string();
        assert!(message.contains(id) && message.contains(text) && message.contains(&status.to_string()), "{message}");
        assert!(!message.contains(KEY), "{message}");
        assert_eq!(requests(&server).await.len(), 1, "HTTP {status} is final");
    }
}

#[tokio::test]
async fn a_nearly_spent_rate_limit_refuses_new_sessions() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(created().insert_header("ratelimit-remaining", "4000"))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST")).respond_with(created().insert_header("ratelimit-remaining", "42")).mount(&server).await;
    let spawner = spawner(&server);
    assert!(spawner.admit().is_ok(), "nothing known yet");
    spawner.spawn(spec()).await.unwrap();
    assert!(spawner.admit().is_ok(), "4000 left");
    spawner.spawn(spec()).await.unwrap();
    Mock::given(method("GET"))
        .and(path("/account/rate-limits"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"remaining": 4200})))
        .mount(&server)
        .await;
    let refusal = spawner.admit().unwrap_err();
    assert!(refusal.contains("42 calls left"), "{refusal}");
    // Idle, nothing else calls the API: the refusal itself asked for the
    // budget again (a call that costs none), and sessions resume once it is refilled.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while spawner.admit().is_err() {
        assert!(tokio::time::Instant::now() < deadline, "the budget was never asked for again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(spawner.budget_remaining(), Some(4200));
    let asked = requests(&server).await.iter().filter(|r| r.url.path() == "/account/rate-limits").count();
    assert_eq!(asked, 1, "asked once however often sessions were refused meanwhile");
}

#[tokio::test]
async fn a_dyno_missing_just_after_creation_is_looked_up_again() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/apps/my-app/dynos/d1"))
        .respond_with(error(404, "not_found", "no dyno"))
        .up_to_n_times(2)
        .mount(&server)
        .await;
    answer_get(&server, "/apps/my-app/dynos/d1", dyno("d1", "x", "up")).await;
    let found = spawner(&server).api.dyno("d1").await.unwrap();
    assert_eq!(found.state, "up");
}

#[tokio::test]
async fn a_crashed_dyno_ends_its_session_early() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(created()).mount(&server).await;
    answer_get(&server, "/apps/my-app/dynos/d1", dyno("d1", "x", "crashed")).await;
    let mut runner = spawner(&server).spawn(spec()).await.unwrap();
    let why = tokio::time::timeout(Duration::from_secs(20), runner.exited()).await.expect("noticed");
    assert!(why.contains("crashed"), "{why}");
}

#[tokio::test]
async fn stopping_calls_the_stop_action_and_tolerates_a_gone_dyno() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).and(path("/apps/my-app/dynos")).respond_with(created()).mount(&server).await;
    Mock::given(method("POST"))
        .and(path("/apps/my-app/dynos/d1/actions/stop"))
        .respond_with(error(404, "not_found", "gone already"))
        .expect(1)
        .mount(&server)
        .await;
    let runner = spawner(&server).spawn(spec()).await.unwrap();
    runner.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn the_sweeper_stops_only_marked_dynos_whose_session_is_gone() {
    let server = MockServer::start().await;
    let ours = |session: &str| format!("/app/target/release/runner --spawned-by dynogate --session {session}");
    // Two pages, as the API paginates with 206 and Next-Range.
    Mock::given(method("GET"))
        .and(path("/apps/my-app/dynos"))
        .and(wiremock::matchers::header_exists("range"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([dyno("orphan2", &ours("old2"), "up")])))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/apps/my-app/dynos"))
        .respond_with(ResponseTemplate::new(206).insert_header("next-range", "id ]run.9..; max=200").set_body_json(
            json!([
                dyno("live", &ours("live-session"), "up"),
                dyno("orphan", &ours("old"), "up"),
                dyno("finished", &ours("older"), "down"),
                dyno("web", "target/release/gateway", "up"),
                dyno("console", "bash", "up"),
            ]),
        ))
        .mount(&server)
        .await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(202).set_body_json(json!({}))).mount(&server).await;

    spawner(&server).sweep(&|session: String| Box::pin(async move { session == "live-session" })).await;
    let stopped: Vec<String> = requests(&server)
        .await
        .into_iter()
        .filter(|r| r.method.as_str() == "POST")
        .map(|r| r.url.path().to_owned())
        .collect();
    assert_eq!(stopped, ["/apps/my-app/dynos/orphan/actions/stop", "/apps/my-app/dynos/orphan2/actions/stop"]);
}

#[test]
fn sessions_are_read_only_from_marked_commands() {
    assert_eq!(session_of("/app/runner --spawned-by dynogate --session s1"), Some("s1"));
    assert_eq!(session_of("/app/runner --session s1"), None);
    assert_eq!(session_of("bash"), None);
}

#[tokio::test]
async fn an_endless_dyno_list_ends_the_listing_with_an_error() {
    let server = MockServer::start().await;
    // The same Next-Range on every page: without a bound, one sweep would never end.
    Mock::given(method("GET"))
        .and(path("/apps/my-app/dynos"))
        .respond_with(
            ResponseTemplate::new(206).insert_header("next-range", "id ]run.1..; max=1").set_body_json(json!([])),
        )
        .mount(&server)
        .await;
    let api = Api::new(url::Url::parse(&server.uri()).unwrap(), Secret::new(KEY), "my-app".into(), policy()).unwrap();
    let listed = tokio::time::timeout(Duration::from_secs(10), api.list_dynos()).await.expect("the listing ends");
    assert!(listed.is_err());
    assert!(requests(&server).await.len() <= 2, "stopped at the first repeated range");

    // Ranges that keep changing stop at the page bound.
    let server = MockServer::start().await;
    let pages = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = pages.clone();
    Mock::given(method("GET"))
        .and(path("/apps/my-app/dynos"))
        .respond_with(move |_: &Request| {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            ResponseTemplate::new(206)
                .insert_header("next-range", format!("id ]run.{n}..; max=1"))
                .set_body_json(json!([]))
        })
        .mount(&server)
        .await;
    let api = Api::new(url::Url::parse(&server.uri()).unwrap(), Secret::new(KEY), "my-app".into(), policy()).unwrap();
    assert!(api.list_dynos().await.is_err());
    assert_eq!(pages.load(std::sync::atomic::Ordering::SeqCst), api::MAX_PAGES);
}

/// Answers every `GET path` with `body`.
async fn answer_get(server: &MockServer, at: impl AsRef<str>, body: Value) {
    Mock::given(method("GET"))
        .and(path(at.as_ref()))
        .respond_with(ResponseTemplate::new(200).set_body_json(body))
        .mount(server)
        .await;
}

/// Answers a GET of `at` as Heroku does for an app that does not exist.
async fn answer_no_app(server: &MockServer, at: &str) {
    Mock::given(method("GET"))
        .and(path(at))
        .respond_with(error(404, "not_found", "Couldn't find that app."))
        .mount(server)
        .await;
}

fn release(version: u64, slug: &str) -> Value {
    json!({"version": version, "status": "succeeded", "slug": {"id": slug}, "description": "Deploy"})
}

#[tokio::test]
async fn a_missing_runner_app_is_created_like_the_gateways_and_gets_its_slug() {
    let server = MockServer::start().await;
    let spawner = spawner(&server);
    answer_no_app(&server, "/apps/my-app").await;
    Mock::given(method("GET"))
        .and(path("/apps/my-gw"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"name": "my-gw", "stack": {"name": "heroku-24"}, "region": {"name": "eu"}})),
        )
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/apps"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"name": "my-app"})))
        .expect(1)
        .mount(&server)
        .await;
    answer_get(
        &server,
        "/apps/my-gw/releases",
        json!([
            {"version": 8, "status": "failed", "slug": {"id": "slug-8"}},
            release(7, "slug-7"),
        ]),
    )
    .await;
    answer_get(&server, "/apps/my-app/releases", json!([])).await;
    Mock::given(method("POST"))
        .and(path("/apps/my-app/releases"))
        .respond_with(ResponseTemplate::new(201).set_body_json(release(1, "slug-7")))
        .expect(1)
        .mount(&server)
        .await;
    spawner.prepare().await.unwrap();
    let all = requests(&server).await;
    let create = all.iter().find(|r| r.method.as_str() == "POST" && r.url.path() == "/apps").unwrap();
    let body: Value = serde_json::from_slice(&create.body).unwrap();
    assert_eq!(body, json!({"name": "my-app", "stack": "heroku-24", "region": "eu"}));
    let released = all.iter().find(|r| r.method.as_str() == "POST" && r.url.path() == "/apps/my-app/releases").unwrap();
    let body: Value = serde_json::from_slice(&released.body).unwrap();
    assert_eq!(body["slug"], "slug-7", "the newest release that succeeded, not the failed one");
    let listing = all.iter().find(|r| r.url.path() == "/apps/my-gw/releases").unwrap();
    assert_eq!(listing.headers.get("range").unwrap(), "version ..; order=desc, max=20");
}

#[tokio::test]
async fn a_runner_app_on_the_gateways_slug_is_left_alone() {
    let server = MockServer::start().await;
    let spawner = spawner(&server);
    for app in ["my-app", "my-gw"] {
        answer_get(&server, format!("/apps/{app}"), json!({"name": app})).await;
    }
    for app in ["my-gw", "my-app"] {
        answer_get(&server, format!("/apps/{app}/releases"), json!([release(3, "slug-3")])).await;
    }
    Mock::given(method("POST")).respond_with(error(500, "x", "no writes expected")).expect(0).mount(&server).await;
    spawner.prepare().await.unwrap();
}

#[tokio::test]
async fn a_runner_app_that_cannot_be_created_stops_the_gateway_with_the_reason() {
    let server = MockServer::start().await;
    let spawner = spawner(&server);
    answer_no_app(&server, "/apps/my-app").await;
    answer_get(&server, "/apps/my-gw", json!({"name": "my-gw"})).await;
    Mock::given(method("POST"))
        .and(path("/apps"))
        .respond_with(error(422, "invalid_params", "Name is already taken"))
        .mount(&server)
        .await;
    let error = format!("{:#}", spawner.prepare().await.unwrap_err());
    assert!(error.contains("HEROKU_RUNNER_APP") && error.contains("Name is already taken"), "{error}");
    assert!(!error.contains(KEY));
}

#[tokio::test]
async fn an_api_outage_at_start_up_is_waited_out_and_a_refusal_is_not() {
    let server = MockServer::start().await;
    let ready = spawner(&server);
    // Unavailable for longer than one call's own retries (3 here).
    Mock::given(method("GET"))
        .and(path("/apps/my-gw"))
        .respond_with(error(503, "unavailable", "the API is down"))
        .up_to_n_times(10)
        .mount(&server)
        .await;
    answer_get(&server, "/apps/my-gw", json!({"name": "my-gw", "web_url": "https://my-gw.herokuapp.com/"})).await;
    answer_get(&server, "/apps/my-app", json!({"name": "my-app"})).await;
    answer_get(&server, "/apps/my-gw/releases", json!([])).await;
    let url = ready.prepare().await.expect("ready once the API is back");
    assert_eq!(url.unwrap().as_str(), "https://my-gw.herokuapp.com/");
    let tries = requests(&server).await.iter().filter(|r| r.url.path() == "/apps/my-gw").count();
    assert_eq!(tries, 11, "every unavailable answer was followed by another try");

    let server = MockServer::start().await;
    let refused = spawner(&server);
    Mock::given(method("GET"))
        .respond_with(error(403, "forbidden", "This key may not read the app"))
        .mount(&server)
        .await;
    let error = format!("{:#}", refused.prepare().await.unwrap_err());
    assert!(error.contains("This key may not read the app"), "{error}");
    assert_eq!(requests(&server).await.len(), 1, "a refusal fails at once");
}

#[tokio::test]
async fn a_cnb_app_gives_its_url_and_its_dynos_start_through_launcher() {
    let server = MockServer::start().await;
    let spawner = spawner(&server);
    answer_get(
        &server,
        "/apps/my-gw",
        json!({
            "name": "my-gw", "stack": {"name": "cnb"}, "generation": {"name": "fir"},
            "web_url": "https://my-gw-0123456789ab.herokuapp.com/"
        }),
    )
    .await;
    answer_get(&server, "/apps/my-app", json!({"name": "my-app"})).await;
    answer_get(&server, "/apps/my-gw/releases", json!([])).await;
    Mock::given(method("POST")).and(path("/apps/my-app/dynos")).respond_with(created()).mount(&server).await;
    let url = spawner.prepare().await.unwrap();
    assert_eq!(url.unwrap().as_str(), "https://my-gw-0123456789ab.herokuapp.com/");
    spawner.spawn(spec()).await.unwrap();
    let create = requests(&server).await.into_iter().find(|r| r.url.path() == "/apps/my-app/dynos").unwrap();
    let body: Value = serde_json::from_slice(&create.body).unwrap();
    let command = body["command"].as_str().unwrap();
    assert!(command.starts_with("launcher /app/target/release/runner --spawned-by dynogate"), "{command}");
    assert_eq!(session_of(command), Some("abc123"), "the sweeper still recognises it");
}
