//! Several gateway instances sharing one real Redis, behind a router that
//! sends every new connection (clients' and runners' alike) to a random
//! instance, as Heroku's router does with web dynos.

use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::redis_server::RedisServer;
use crate::support::*;

/// A TCP router that sends each new connection to a random instance.
pub struct Spread {
    pub addr: SocketAddr,
    targets: Arc<Mutex<Vec<SocketAddr>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Spread {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let targets: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let accept = tokio::spawn({
            let targets = targets.clone();
            async move {
                let random = std::collections::hash_map::RandomState::new();
                let mut count = 0u64;
                while let Ok((mut inbound, _)) = listener.accept().await {
                    count += 1;
                    let pick = {
                        let targets = targets.lock().unwrap();
                        if targets.is_empty() {
                            continue;
                        }
                        let mut hasher = random.build_hasher();
                        hasher.write_u64(count);
                        targets[(hasher.finish() % targets.len() as u64) as usize]
                    };
                    tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(pick).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                }
            }
        });
        Spread { addr, targets, accept }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_targets(&self, gateways: &[&Gateway]) {
        *self.targets.lock().unwrap() = gateways.iter().map(|g| g.addr()).collect();
    }
}

impl Drop for Spread {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Redis, the router, and instances of one app behind it.
pub struct Fleet {
    // Fields drop in order: the instances end before Redis does.
    pub gateways: Vec<Gateway>,
    pub router: Spread,
    pub redis: RedisServer,
    options: Options,
}

impl Fleet {
    /// `count` instances started with `options` (plus Redis and the router's URL).
    pub async fn start(count: usize, options: impl Fn() -> Options) -> Self {
        let redis = RedisServer::start();
        let router = Spread::start().await;
        let options = options().env("REDIS_URL", redis.url()).env("GATEWAY_URL", router.url());
        let gateways: Vec<Gateway> = (0..count).map(|_| Gateway::with(options.clone())).collect();
        router.set_targets(&gateways.iter().collect::<Vec<_>>());
        Fleet { gateways, router, redis, options }
    }

    /// One more instance of the same app, behind the router.
    pub fn add_instance(&mut self) {
        self.gateways.push(Gateway::with(self.options.clone()));
        self.route_to_all();
    }

    /// Takes instance `i` out of the router and out of the fleet.
    pub fn take_out(&mut self, i: usize) -> Gateway {
        let gateway = self.gateways.remove(i);
        self.route_to_all();
        gateway
    }

    fn route_to_all(&self) {
        self.router.set_targets(&self.gateways.iter().collect::<Vec<_>>());
    }

    /// Raw HTTP through the router, a new connection (so a random instance) each request.
    pub fn http(&self) -> Http {
        Http::new_connection_each_time(format!("{}/mcp", self.router.url()), self.gateways[0].api_key.clone())
    }

    /// Which instance owns `session`, by the directory and each instance's `/healthz`.
    pub async fn owner_of(&self, session: &str) -> usize {
        let owner = self.redis.cli(&["HGET", &format!("dg:session:{session}"), "owner"]);
        for (i, gateway) in self.gateways.iter().enumerate() {
            let health: Value = reqwest::get(format!("{}/healthz", gateway.url)).await.unwrap().json().await.unwrap();
            if health["instance"] == owner.as_str() {
                return i;
            }
        }
        panic!("session {session} is owned by {owner:?}, none of the instances");
    }

    /// A counter summed over every instance.
    pub async fn total(&self, metric_name: &str) -> f64 {
        let mut sum = 0.0;
        for gateway in &self.gateways {
            let (_, _, scrape) = scrape_metrics(gateway, gateway.api_key.as_deref()).await;
            sum += metric(&scrape, metric_name, &[]);
        }
        sum
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // The last instance to stop has nobody to hand its sessions to and
        // leaves their runners for a successor, as a lone dyno restarting
        // would: end them, as they are this test's.
        self.gateways.clear();
        let router = self.router.url();
        let mut killed = Vec::new();
        for (pid, argv) in processes() {
            if argv.iter().any(|a| a == "--outlive-gateway") && argv.iter().any(|a| a.starts_with(&router)) {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                killed.push(pid);
            }
        }
        // A runner killed so cannot remove its session's cgroups, whose
        // names a later runner with the same pid would find taken: remove
        // them once it is gone.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        for pid in killed {
            while std::path::Path::new(&format!("/proc/{pid}")).exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            dynogate_gateway::spawn::sandbox::remove_cgroups(pid.unsigned_abs());
        }
    }
}

/// `count` sessions opened through `http`, one after another.
async fn open_sessions(http: &Http, count: usize) -> Vec<String> {
    let mut sessions = Vec::with_capacity(count);
    for _ in 0..count {
        sessions.push(http.initialize().await.0);
    }
    sessions
}

fn text(reply: &Reply) -> &str {
    reply.json["result"]["content"][0]["text"].as_str().unwrap_or_default()
}

/// Reads SSE events from a streaming response until one satisfies `done`.
async fn read_until(response: &mut reqwest::Response, done: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut text = String::new();
    tokio::time::timeout(PATIENCE, async {
        loop {
            if sse_events(&text).iter().any(&done) {
                return;
            }
            let chunk = response.chunk().await.unwrap().expect("the stream stays open");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the awaited event did not arrive; got: {text}"));
    sse_events(&text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_and_runner_may_land_on_any_instance() {
    let fleet = Fleet::start(3, || Options::default().echo()).await;
    let http = fleet.http();
    // Enough that some runners surely dial an instance other than their session's.
    let sessions = open_sessions(&http, 8).await;
    // State lives in each session's one server, whichever instance each call reaches.
    for (n, session) in sessions.iter().enumerate() {
        for i in 0..6 {
            let reply = http.call(session, i, "echo", json!({"text": format!("{n}/{i}"), "tag": "t"})).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
            assert_eq!(text(&reply), format!("{n}/{i}"), "{}", reply.text);
        }
        let seen = http.call(session, 100, "seen", json!({"tag": "t"})).await;
        assert_eq!(text(&seen), "6", "one server per session saw every call: {}", seen.text);
    }
    let session = &sessions[0];

    // Progress rides on its request's stream, relayed or not.
    let progress = http
        .post(
            Some(session),
            &json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                    "params": {"name": "progress", "arguments": {"steps": 3, "delay_ms": 50}, "_meta": {"progressToken": "p"}}}),
        )
        .await;
    let events = progress.events();
    let steps: Vec<_> = events.iter().filter_map(|e| e["params"]["progress"].as_u64()).collect();
    assert_eq!(steps, [1, 2, 3], "{}", progress.text);
    assert_eq!(text(&progress), "3 steps");

    // A request from the server to the client, and the client's answer,
    // each possibly through another instance.
    let mut call = http
        .request(reqwest::Method::POST)
        .header("accept", ACCEPT_BOTH)
        .header("content-type", "application/json")
        .header("mcp-session-id", session)
        .body(
            json!({"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"name": "ask", "arguments": {}}})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(call.status(), StatusCode::OK);
    let asked = read_until(&mut call, |e| e["method"] == "roots/list").await;
    let ask_id = asked.iter().find(|e| e["method"] == "roots/list").unwrap()["id"].clone();
    let answer = http
        .post(
            Some(session),
            &json!({"jsonrpc": "2.0", "id": ask_id, "result": {"roots": [{"uri": "file:///relayed"}]}}),
        )
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
    let answered = read_until(&mut call, |e| e["id"] == 8).await;
    let result = answered.iter().find(|e| e["id"] == 8).unwrap();
    assert!(result.to_string().contains("file:///relayed"), "{result}");

    // The GET stream carries what the server says unprompted.
    let mut stream = http
        .request(reqwest::Method::GET)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", session)
        .timeout(Duration::from_secs(3600))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    // The GET may reach the owner after the notification: repeat until one arrives.
    let notified = tokio::time::timeout(PATIENCE, async {
        let mut text = String::new();
        for i in 0.. {
            let reply = http.call(session, 200 + i, "notify", json!({"text": format!("hello {i}")})).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
            if let Ok(Ok(Some(chunk))) = tokio::time::timeout(Duration::from_millis(500), stream.chunk()).await {
                text.push_str(&String::from_utf8_lossy(&chunk));
                if sse_events(&text).iter().any(|e| e["method"] == "notifications/message") {
                    return text;
                }
            }
        }
        unreachable!()
    })
    .await
    .expect("a notification reached the GET stream");
    assert!(notified.contains("hello"), "{notified}");
    drop(stream);

    // Every error answers as it would from one instance, wherever it lands.
    for i in 0..6 {
        let unknown = http.call("0123456789abcdef0123456789abcdef", i, "echo", json!({})).await;
        assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{}", unknown.text);
        assert_eq!(unknown.error_code(), -32001);
        let malformed = http.post_raw(Some(session), "{not json", &[]).await;
        assert_eq!(malformed.status, StatusCode::BAD_REQUEST, "{}", malformed.text);
        assert_eq!(malformed.error_code(), -32700);
        let version = http
            .post_raw(
                Some(session),
                r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,
                &[("mcp-protocol-version", "1999-01-01")],
            )
            .await;
        assert_eq!(version.status, StatusCode::BAD_REQUEST, "{}", version.text);
    }

    // DELETE from anywhere ends the session everywhere.
    for session in &sessions {
        assert_eq!(http.delete(session).await, StatusCode::NO_CONTENT);
        for i in 0..3 {
            let after = http.call(session, 300 + i, "echo", json!({"text": "late"})).await;
            assert_eq!(after.status, StatusCode::NOT_FOUND, "{}", after.text);
        }
    }
    assert!(fleet.total("dynogate_relayed_requests_total").await > 0.0, "some requests went to another instance");
    assert!(
        fleet.total("dynogate_tunnelled_runner_connections_total").await > 0.0,
        "some runners dialed another instance"
    );
}

const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;

/// Polls `attempt` until it returns true, failing after [`PATIENCE`].
async fn until<F: std::future::Future<Output = bool>>(what: &str, mut attempt: impl FnMut() -> F) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while !attempt().await {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_sessions_is_one_cap_for_all_instances() {
    let fleet = Fleet::start(3, || Options::default().echo().env("MAX_SESSIONS", "2")).await;
    let http = fleet.http();
    let (first, _) = http.initialize().await;
    let (second, _) = http.initialize().await;
    for _ in 0..6 {
        let refused = http.post_raw(None, INITIALIZE, &[]).await;
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{}", refused.text);
        assert!(refused.headers.contains_key("retry-after"));
        assert_eq!(refused.error_code(), -32005);
        assert!(refused.text.contains("MAX_SESSIONS"), "{}", refused.text);
    }
    assert_eq!(fleet.redis.cli(&["ZCARD", "dg:live"]), "2");
    // One ends: its place comes back once its runner is gone, on any instance.
    assert_eq!(http.delete(&first).await, StatusCode::NO_CONTENT);
    until("a new session is admitted", || async {
        http.post_raw(None, INITIALIZE, &[]).await.status == StatusCode::OK
    })
    .await;
    let still = http.call(&second, 1, "echo", json!({"text": "still here"})).await;
    assert_eq!(text(&still), "still here", "{}", still.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_is_a_clear_error_and_service_resumes_after_it() {
    let mut fleet = Fleet::start(2, || Options::default().echo().env("HEARTBEAT_INTERVAL", "1s")).await;
    let http = fleet.http();
    let (session, _) = http.initialize().await;
    fleet.redis.stop();

    for _ in 0..4 {
        let refused = http.post_raw(None, INITIALIZE, &[]).await;
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{}", refused.text);
        assert!(refused.headers.contains_key("retry-after"));
        assert!(refused.text.contains("Redis"), "the error names the cause: {}", refused.text);
    }
    // Where the session lives it is served; elsewhere the relay fails, saying why.
    let (mut served, mut refused) = (0, 0);
    for i in 0..16 {
        let reply = http.call(&session, i, "echo", json!({"text": "during"})).await;
        match reply.status {
            StatusCode::OK => {
                assert_eq!(text(&reply), "during", "{}", reply.text);
                served += 1;
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(reply.text.contains("Redis"), "{}", reply.text);
                refused += 1;
            }
            other => panic!("{other}: {}", reply.text),
        }
    }
    assert!(served > 0 && refused > 0, "served {served}, refused {refused}");

    fleet.redis.restart();
    until("new sessions start again", || async { http.post_raw(None, INITIALIZE, &[]).await.status == StatusCode::OK })
        .await;
    // The instances register their sessions again, so every instance finds it.
    let mut next = 100;
    until("the session answers on every instance", || {
        next += 10;
        let (http, session, base) = (&http, &session, next);
        async move {
            for i in 0..8 {
                if http.call(session, base + i, "echo", json!({"text": "after"})).await.status != StatusCode::OK {
                    return false;
                }
            }
            true
        }
    })
    .await;
    // Redis came back empty: the session's journal starts again.
    let journal = format!("dg:journal:{session}");
    eventually("the session's journal is written again", || fleet.redis.cli(&["HEXISTS", &journal, "ra"]) == "1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rmcp_client_and_the_python_sdk_run_code_through_three_instances() {
    let fleet = Fleet::start(3, Options::default).await;
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let config = rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig::with_uri(format!(
        "{}/mcp",
        fleet.router.url()
    ));
    let transport = rmcp::transport::StreamableHttpClientTransport::with_client(client, config);
    let rmcp = rmcp::ServiceExt::serve((), transport).await.expect("the rmcp client connects through the router");
    for n in 0..3 {
        let code = format!("import os\nopen('state', 'a').write('x')\nprint({n}, len(open('state').read()))");
        let result = rmcp.call_tool(tool_call("code_exec_python", json!({"code": code}))).await.unwrap();
        assert_eq!(exec_result_of(&result)["stdout"], format!("{n} {}", n + 1), "the session's files stay put");
    }
    rmcp.cancel().await.unwrap();

    for mode in ["http", "sse"] {
        let url =
            if mode == "sse" { format!("{}/sse", fleet.router.url()) } else { format!("{}/mcp", fleet.router.url()) };
        let report = crate::transports::run_python_sdk("py-sdk-1", &[mode, &url], None).await;
        assert_eq!(report["result"], json!({"returncode": 0, "stdout": "4", "stderr": ""}), "{mode}: {report}");
    }
    assert!(fleet.total("dynogate_relayed_requests_total").await > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynos_of_every_instance_serve_their_sessions_and_one_sweeper_spares_them() {
    use crate::fake_heroku::FakeHeroku;
    use crate::heroku::{HEROKU_KEY, config_vars, heroku};
    let fake = FakeHeroku::start(HEROKU_KEY, &config_vars()).await;
    let (orphan, _) = fake.launch("sleep 600 # --spawned-by dynogate --session stale0000");
    let fleet = Fleet::start(3, || heroku(&fake).env("SWEEP_INTERVAL", "1s")).await;
    let http = fleet.http();
    let mut sessions = Vec::new();
    for n in 0..3 {
        let (session, _) = http.initialize().await;
        let reply = http.call(&session, 1, "code_exec_python", json!({"code": format!("print({n})")})).await;
        assert_eq!(exec_result(&reply.json)["stdout"], n.to_string(), "{}", reply.text);
        sessions.push(session);
    }
    // The official Python SDK, through the router, on a dyno of its own.
    let url = format!("{}/mcp", fleet.router.url());
    let report = crate::transports::run_python_sdk("py-sdk-1", &["http", &url], Some(crate::heroku::CLIENT_KEY)).await;
    assert_eq!(report["result"], json!({"returncode": 0, "stdout": "4", "stderr": ""}), "{report}");
    eventually("the orphan is stopped", || fake.stops().contains(&orphan)).await;
    // Several sweeps later, no live session's dyno was stopped.
    let lists = || fake.calls().iter().filter(|c| matches!(c, crate::fake_heroku::Call::List)).count();
    let seen = lists();
    eventually("three more sweeps ran", || lists() >= seen + 3).await;
    // Each live session's dyno, as its snapshot in the directory names it: `dyno:<id>:<name>`.
    let dynos: Vec<String> = sessions
        .iter()
        .map(|session| {
            let snapshot = fleet.redis.cli(&["HGET", &format!("dg:session:{session}"), "snapshot"]);
            let snapshot: Value = serde_json::from_str(&snapshot).unwrap_or_default();
            let handle = snapshot["handle"].as_str().unwrap_or_default();
            handle
                .strip_prefix("dyno:")
                .and_then(|rest| rest.split_once(':'))
                .map(|(id, _)| id.to_owned())
                .unwrap_or_default()
        })
        .collect();
    assert!(dynos.iter().all(|id| !id.is_empty()), "{dynos:?}");
    let stopped = fake.stops();
    assert!(dynos.iter().all(|id| !stopped.contains(id)), "a sweeper stopped a live dyno: {stopped:?} of {dynos:?}");
    for (n, session) in sessions.iter().enumerate() {
        let reply = http.call(session, 2, "code_exec_python", json!({"code": format!("print({n} * 2)")})).await;
        assert_eq!(exec_result(&reply.json)["stdout"], (n * 2).to_string(), "{}", reply.text);
    }
    for session in &sessions {
        assert_eq!(http.delete(session).await, StatusCode::NO_CONTENT);
    }
    let unique = || {
        let mut stops = fake.stops();
        stops.sort();
        stops.dedup();
        stops.len()
    };
    eventually("every session's dyno is stopped", || dynos.iter().all(|id| fake.stops().contains(id))).await;
    assert_eq!(fake.stops().len(), unique(), "no dyno was stopped twice: {:?}", fake.stops());
}

/// Calls `echo` on `session` until `stop`, each with a tag of its own;
/// returns the tags of the calls answered, and every failure.
async fn keep_calling(
    http: Http,
    session: String,
    stop: tokio_util::sync::CancellationToken,
) -> (Vec<String>, Vec<String>) {
    let (mut answered, mut failed) = (Vec::new(), Vec::new());
    for i in 0i64.. {
        if stop.is_cancelled() {
            break;
        }
        let tag = format!("{session}-{i}");
        // Every fourth call takes a while, so calls are in flight at any moment.
        let (tool, arguments) = if i % 4 == 0 {
            ("sleep", json!({"ms": 300, "tag": tag}))
        } else {
            ("echo", json!({"text": tag, "tag": tag}))
        };
        let reply = http.call(&session, i, tool, arguments).await;
        if reply.status == StatusCode::OK && reply.json["result"].is_object() {
            answered.push(tag);
        } else {
            failed.push(format!("{tool} {tag}: {} {}", reply.status, reply.text));
        }
    }
    (answered, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_fails_no_call_and_loses_no_session() {
    let mut fleet = Fleet::start(3, || Options::default().echo().env("DRAIN_TIMEOUT", "10s")).await;
    let http = fleet.http();
    let sessions = open_sessions(&http, 6).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let load: Vec<_> =
        sessions.iter().map(|s| tokio::spawn(keep_calling(http.clone(), s.clone(), stop.clone()))).collect();

    // Each old instance in turn: a replacement starts, the router stops
    // sending it new connections, and it gets SIGTERM, as in a deploy.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        fleet.add_instance();
        let mut old = fleet.take_out(0);
        let status = tokio::task::spawn_blocking(move || old.terminate()).await.unwrap();
        assert!(status.is_some_and(|s| s.success()), "an instance did not stop cleanly: {status:?}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();

    let mut calls = 0;
    for (session, task) in sessions.iter().zip(load) {
        let (answered, failed) = task.await.unwrap();
        assert!(failed.is_empty(), "calls failed during the restart: {failed:#?}");
        calls += answered.len();
        // Every call ran exactly once, in the session's one server.
        for (i, tag) in answered.iter().enumerate() {
            let seen = http.call(session, 10_000 + i as i64, "seen", json!({"tag": tag})).await;
            assert_eq!(text(&seen), "1", "{tag} ran {} times", seen.text);
        }
    }
    assert!(calls > 60, "only {calls} calls were made during the restart");
    let taken = fleet.total("dynogate_sessions_taken_over_total").await;
    assert!(taken >= 1.0, "sessions moved to new instances ({taken})");
}

/// The protocol revision whose streams open with an event id, so even a
/// stream cut before its first message can be resumed.
const RESUMABLE: &str = "2025-11-25";

/// The complete events of an SSE text: each one's id and parsed data (none
/// for a priming event).
fn complete_events(text: &str) -> Vec<(Option<String>, Option<Value>)> {
    let Some((complete, _)) = text.rsplit_once("\n\n") else { return Vec::new() };
    complete
        .split("\n\n")
        .map(|event| {
            let id = event.lines().find_map(|l| l.strip_prefix("id:")).map(|id| id.trim().to_owned());
            let data: Vec<&str> = event.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim_start).collect();
            let data = data.join("\n");
            (id, (!data.is_empty()).then(|| serde_json::from_str(&data).expect("SSE data is JSON")))
        })
        .collect()
}

/// Calls `tool` as a client that resumes a cut stream would (see [`follow`]).
/// Counts itself in `primed` once it holds an event id. Returns every message
/// its stream carried.
async fn call_resuming(
    http: Http,
    session: String,
    id: i64,
    tool: &str,
    arguments: Value,
    primed: Arc<AtomicUsize>,
) -> Vec<Value> {
    let call = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                      "params": {"name": tool, "arguments": arguments, "_meta": {"progressToken": id}}});
    let sent = post_resumable(&http, &session, &call).await;
    follow(&http, &session, id, Some(sent), None, &primed).await
}

/// POSTs `call` on `session` as a client of a revision whose streams open
/// with an event id.
async fn post_resumable(http: &Http, session: &str, call: &Value) -> reqwest::Result<reqwest::Response> {
    http.request(reqwest::Method::POST)
        .header("accept", ACCEPT_BOTH)
        .header("content-type", "application/json")
        .header("mcp-session-id", session)
        .header("mcp-protocol-version", RESUMABLE)
        .body(call.to_string())
        .send()
        .await
}

/// Three instances whose streams open at once (so every call can be
/// resumed) and whose sessions wait a minute for a runner that lost its
/// instance.
async fn killable_fleet() -> Fleet {
    Fleet::start(3, || Options::default().echo().env("RUNNER_RECONNECT_GRACE", "60s").env("REPLY_STREAM_AFTER", "0s"))
        .await
}

/// Reads the stream of request `id`'s answer from `next` until it ends or
/// breaks; while the answer has not come, resumes the stream with
/// `Last-Event-ID` (from `last_id` on) through the router, so at any
/// instance, again and again. Returns every message read, in order.
async fn follow(
    http: &Http,
    session: &str,
    id: i64,
    mut next: Option<reqwest::Result<reqwest::Response>>,
    mut last_id: Option<String>,
    primed: &AtomicUsize,
) -> Vec<Value> {
    let mut messages = Vec::new();
    let mut counted = false;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(Ok(mut response)) = next.take()
            && response.status() == StatusCode::OK
        {
            let mut text = String::new();
            while let Ok(Some(chunk)) = response.chunk().await {
                text.push_str(&String::from_utf8_lossy(&chunk));
                if !counted && complete_events(&text).iter().any(|(id, _)| id.is_some()) {
                    counted = true;
                    primed.fetch_add(1, Ordering::AcqRel);
                }
            }
            for (event_id, data) in complete_events(&text) {
                last_id = event_id.or(last_id);
                messages.extend(data);
            }
        }
        if messages.iter().any(|m| m["id"] == id) {
            return messages;
        }
        let resume_after = last_id.clone().unwrap_or_else(|| panic!("call {id} was cut before its stream had an id"));
        assert!(tokio::time::Instant::now() < deadline, "call {id} got no answer; last event {resume_after}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let resumed = http
            .request(reqwest::Method::GET)
            .header("accept", "text/event-stream")
            .header("mcp-session-id", session)
            .header("mcp-protocol-version", RESUMABLE)
            .header("last-event-id", resume_after)
            .send()
            .await;
        next = Some(resumed);
    }
}

/// Requests the journals of `sessions` hold as awaiting answers.
fn journaled_calls(redis: &RedisServer, sessions: &[String]) -> usize {
    sessions
        .iter()
        .map(|s| redis.cli(&["HKEYS", &format!("dg:journal:{s}")]).lines().filter(|f| f.starts_with("c:")).count())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_outright_loses_no_call_and_runs_none_twice() {
    let mut fleet = killable_fleet().await;
    let http = fleet.http();
    let mut sessions = Vec::new();
    for _ in 0..10 {
        sessions.push(http.initialize_as(RESUMABLE).await.0);
    }
    // 50 calls in flight over the 10 sessions when the instance dies.
    let primed = Arc::new(AtomicUsize::new(0));
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let arguments = json!({"ms": 3000, "tag": format!("kill-{i}")});
            let session = sessions[i % 10].clone();
            tokio::spawn(call_resuming(http.clone(), session, i as i64, "sleep", arguments, primed.clone()))
        })
        .collect();
    until("all 50 calls are in flight", || {
        let ready = primed.load(Ordering::Acquire) == 50 && journaled_calls(&fleet.redis, &sessions) == 50;
        async move { ready }
    })
    .await;
    // The instance that holds the first session dies.
    let victim = fleet.owner_of(&sessions[0]).await;
    let killed = fleet.take_out(victim);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(killed.pid()), nix::sys::signal::Signal::SIGKILL).unwrap();

    // Every call is answered exactly once, and ran exactly once.
    for (i, call) in calls.into_iter().enumerate() {
        let answers: Vec<Value> = call.await.unwrap().into_iter().filter(|m| m["id"] == i).collect();
        assert_eq!(answers.len(), 1, "call {i} was answered {} times: {answers:?}", answers.len());
        assert_eq!(answers[0]["result"]["content"][0]["text"], "slept 3000ms", "call {i}: {}", answers[0]);
    }
    for i in 0..50 {
        let seen = http.call(&sessions[i % 10], 5000 + i as i64, "seen", json!({"tag": format!("kill-{i}")})).await;
        assert_eq!(text(&seen), "1", "kill-{i} ran {} times", seen.text);
    }
    let taken = fleet.total("dynogate_sessions_taken_over_total").await;
    assert!(taken >= 1.0, "the dead instance's sessions were taken over ({taken})");
    // Every session keeps working; ended, it leaves nothing running.
    for session in &sessions {
        let reply = http.call(session, 9000, "echo", json!({"text": "after"})).await;
        assert_eq!(text(&reply), "after", "{}", reply.text);
        assert_eq!(http.delete(session).await, StatusCode::NO_CONTENT);
    }
    for session in &sessions {
        eventually("the session's runner is gone", || runner_pids(session).is_empty()).await;
        let journal = format!("dg:journal:{session}");
        eventually("the session's journal is gone", || fleet.redis.cli(&["EXISTS", &journal]) == "0").await;
    }
    drop(killed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_an_instance_killed_outright_resumes_elsewhere_with_every_event_once() {
    let mut fleet = killable_fleet().await;
    let http = fleet.http();
    let (session, _) = http.initialize_as(RESUMABLE).await;
    let call = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "progress", "arguments": {"steps": 8, "delay_ms": 400}, "_meta": {"progressToken": "p"}}});
    let mut response = post_resumable(&http, &session, &call).await.unwrap();
    // The client reads two progress events, then its connection drops.
    let mut text = String::new();
    while complete_events(&text).iter().filter(|(_, data)| data.is_some()).count() < 2 {
        let chunk = tokio::time::timeout(PATIENCE, response.chunk()).await.unwrap().unwrap().expect("more events");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(response);
    let seen = complete_events(&text);
    let last_id = seen.iter().filter(|(_, data)| data.is_some()).nth(1).and_then(|(id, _)| id.clone()).unwrap();
    // Two more are written to the journal, unread, before the owner dies.
    let stream = last_id.split('-').next().unwrap().to_owned();
    until("two more events are in the journal", || {
        let last = fleet.redis.cli(&["HGET", &format!("dg:journal:{session}"), &format!("n:{stream}")]);
        let ready = last.trim().parse::<u64>().unwrap_or(0) >= 4;
        async move { ready }
    })
    .await;
    let victim = fleet.owner_of(&session).await;
    let killed = fleet.take_out(victim);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(killed.pid()), nix::sys::signal::Signal::SIGKILL).unwrap();

    let primed = AtomicUsize::new(0);
    let rest = follow(&http, &session, 7, None, Some(last_id.clone()), &primed).await;
    let progress: Vec<u64> = rest.iter().filter_map(|m| m["params"]["progress"].as_u64()).collect();
    assert_eq!(progress, [3, 4, 5, 6, 7, 8], "every event after {last_id} exactly once, in order: {rest:?}");
    let answers: Vec<&Value> = rest.iter().filter(|m| m["id"] == 7).collect();
    assert_eq!(answers.len(), 1, "{rest:?}");
    assert_eq!(answers[0]["result"]["content"][0]["text"], "8 steps");
    assert_eq!(http.delete(&session).await, StatusCode::NO_CONTENT);
    drop(killed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_on_a_dyno_moves_with_its_files_when_its_instance_restarts() {
    use crate::fake_heroku::FakeHeroku;
    use crate::heroku::{HEROKU_KEY, config_vars, heroku};
    let fake = FakeHeroku::start(HEROKU_KEY, &config_vars()).await;
    let mut fleet = Fleet::start(2, || heroku(&fake)).await;
    let http = fleet.http();
    let (session, _) = http.initialize().await;
    let write = json!({"code": "open('kept.txt', 'w').write('still here')\nprint('written')"});
    let reply = http.call(&session, 1, "code_exec_python", write).await;
    assert_eq!(exec_result(&reply.json)["stdout"], "written", "{}", reply.text);

    // A deploy: a new instance starts, the session's instance gets SIGTERM.
    let owner = fleet.owner_of(&session).await;
    fleet.add_instance();
    let mut old = fleet.take_out(owner);
    let status = tokio::task::spawn_blocking(move || old.terminate()).await.unwrap();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");

    // The same dyno goes on serving the session, files and all.
    let read = json!({"code": "print(open('kept.txt').read())"});
    let reply = http.call(&session, 2, "code_exec_python", read).await;
    assert_eq!(exec_result(&reply.json)["stdout"], "still here", "{}", reply.text);
    assert!(fake.stops().is_empty(), "the session's dyno was stopped: {:?}", fake.stops());
    assert_eq!(http.delete(&session).await, StatusCode::NO_CONTENT);
    eventually("the session's dyno is stopped", || fake.stops().len() == 1).await;
}
