//! Shared test machinery: a real gateway process on port 0, raw HTTP helpers,
//! an rmcp client, and ways to find and watch the processes a session starts.
//! Everything started here is killed when its handle drops.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::RunningService;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};

pub const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");
pub const RUNNER: &str = env!("CARGO_BIN_EXE_runner");
pub const ECHO: &str = env!("CARGO_BIN_EXE_mcp-echo");
/// A signing key tests use when they need to mint their own runner tokens.
pub const SECRET: &str = "test-secret-test-secret-test-secret-0123";

/// How long any wait in a test may last before it fails.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A gateway process listening on a free loopback port.
pub struct Gateway {
    child: Child,
    pub url: String,
    pub api_key: Option<String>,
}

/// How to start a gateway: environment variables on top of the defaults.
#[derive(Default, Clone)]
pub struct Options {
    pub env: Vec<(String, String)>,
    pub api_key: Option<String>,
    /// Where the gateway's (and its runners') log goes instead of the test's stderr.
    pub log_file: Option<PathBuf>,
    /// The gateway's working directory.
    pub cwd: Option<PathBuf>,
    /// Start the gateway as this user (and group of the same id), not as the test's.
    pub user: Option<u32>,
}

impl Options {
    pub fn env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.env.push((name.to_owned(), value.into()));
        self
    }

    pub fn api_key(mut self, key: &str) -> Self {
        self.api_key = Some(key.to_owned());
        self
    }

    pub fn cwd(mut self, dir: &std::path::Path) -> Self {
        self.cwd = Some(dir.to_owned());
        self
    }

    pub fn user(mut self, uid: u32) -> Self {
        self.user = Some(uid);
        self
    }

    pub fn log_to(mut self, path: PathBuf) -> Self {
        self.log_file = Some(path);
        self
    }

    /// Bridge the `mcp-echo` fixture instead of the code executor.
    pub fn echo(self) -> Self {
        self.env("RUNNER_COMMAND", ECHO)
    }
}

impl Gateway {
    /// A gateway with the built-in executor.
    pub fn start() -> Self {
        Self::with(Options::default())
    }

    pub fn with(options: Options) -> Self {
        // reqwest (here and inside rmcp) is built without a default TLS backend.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut command = Command::new(GATEWAY);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", std::env::var_os("HOME").unwrap_or_default())
            .env("PORT", "0")
            .env("RUNNER_BIN", RUNNER)
            .env("RENDEZVOUS_SECRET", SECRET)
            .env("RUST_LOG", "info,dynogate_gateway=debug")
            // Sessions start cold unless a test asks for warm runners, so
            // the runners and dynos a test counts are its sessions' own.
            .env("WARM_RUNNERS", "0")
            // Likewise no runner lists a server's tools unless a test asks.
            .env("DISCOVER_SERVERS", "on-demand")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for name in ["PIP_FIND_LINKS", "PIP_CERT", "PIP_DEFAULT_TIMEOUT", "PIP_DISABLE_PIP_VERSION_CHECK", "TMPDIR"] {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        if let Some(key) = &options.api_key {
            command.env("API_KEY", key).env("BIND_ADDRESS", "127.0.0.1");
        }
        for (name, value) in &options.env {
            command.env(name, value);
        }
        if let Some(dir) = &options.cwd {
            command.current_dir(dir);
        }
        if let Some(uid) = options.user {
            use std::os::unix::process::CommandExt;
            command.uid(uid).gid(uid);
        }
        if let Some(path) = &options.log_file {
            command.stderr(std::fs::File::create(path).expect("create the log file"));
        }
        let mut child = command.spawn().expect("start the gateway");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the gateway never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(PATIENCE) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("the gateway did not report its address (see its log above)");
            }
        };
        let url = line.rsplit(' ').next().expect("an address").trim().to_owned();
        assert!(url.starts_with("http://127.0.0.1:"), "unexpected first line: {line}");
        Gateway { child, url, api_key: options.api_key }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    /// The loopback address the gateway listens on, for raw sockets.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.url.trim_start_matches("http://").parse().expect("the gateway's URL is http://<ip>:<port>")
    }

    pub fn mcp_url(&self) -> String {
        format!("{}/mcp", self.url)
    }

    /// An rmcp client connected to this gateway (authenticating when it has a key).
    pub async fn client(&self) -> RunningService<RoleClient, ()> {
        let mut config = StreamableHttpClientTransportConfig::with_uri(self.mcp_url());
        if let Some(key) = &self.api_key {
            config = config.auth_header(key.clone());
        }
        let transport = StreamableHttpClientTransport::from_config(config);
        ().serve(transport).await.expect("MCP client connects through the gateway")
    }

    /// A raw HTTP client that sends the API key (if any) on every request.
    pub fn http(&self) -> Http {
        Http::new(self.mcp_url(), self.api_key.clone())
    }

    /// Sends SIGTERM and waits (bounded) for the gateway to exit.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if self.terminate().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Raw MCP-over-HTTP requests, for checking exact statuses and bodies.
#[derive(Clone)]
pub struct Http {
    client: reqwest::Client,
    pub url: String,
    api_key: Option<String>,
}

/// A response with its body read: parsed JSON, or the JSON of the last SSE
/// event when the reply was streamed.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
    pub json: Value,
}

impl Reply {
    pub fn session(&self) -> Option<String> {
        self.headers.get("mcp-session-id").map(|v| v.to_str().unwrap().to_owned())
    }

    pub fn error_code(&self) -> i64 {
        self.json["error"]["code"].as_i64().unwrap_or_else(|| panic!("no JSON-RPC error in {}", self.text))
    }

    /// All `data:` payloads of an SSE body, parsed.
    pub fn events(&self) -> Vec<Value> {
        sse_events(&self.text)
    }
}

pub fn sse_events(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|event| {
            // A priming event's data is empty.
            let data: Vec<&str> = event.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim_start).collect();
            let data = data.join("\n");
            (!data.is_empty()).then(|| serde_json::from_str(&data).expect("SSE data is JSON"))
        })
        .collect()
}

pub const ACCEPT_BOTH: &str = "application/json, text/event-stream";

impl Http {
    pub fn new(url: String, api_key: Option<String>) -> Self {
        Http { client: reqwest::Client::new(), url, api_key }
    }

    /// Like [`Http::new`], opening a new connection for every request, so a
    /// proxy that spreads connections spreads requests.
    pub fn new_connection_each_time(url: String, api_key: Option<String>) -> Self {
        let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        Http { client, url, api_key }
    }

    pub fn request(&self, method: reqwest::Method) -> reqwest::RequestBuilder {
        let mut request = self.client.request(method, &self.url).timeout(PATIENCE);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        request
    }

    /// POSTs `body` (raw text) with the usual headers plus `extra`.
    pub async fn post_raw(&self, session: Option<&str>, body: impl Into<String>, extra: &[(&str, &str)]) -> Reply {
        let mut headers = HeaderMap::new();
        headers.insert("accept", HeaderValue::from_static(ACCEPT_BOTH));
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        if let Some(session) = session {
            headers.insert("mcp-session-id", HeaderValue::from_str(session).unwrap());
        }
        // Extra headers replace the defaults of the same name.
        for (name, value) in extra {
            headers.insert(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        }
        let request = self.request(reqwest::Method::POST).headers(headers).body(body.into());
        read(request.send().await.expect("the gateway answers")).await
    }

    pub async fn post(&self, session: Option<&str>, body: &Value) -> Reply {
        self.post_raw(session, body.to_string(), &[]).await
    }

    /// `initialize` on a new session; returns the session id and the reply.
    pub async fn initialize(&self) -> (String, Reply) {
        self.initialize_as("2025-06-18").await
    }

    pub async fn initialize_as(&self, version: &str) -> (String, Reply) {
        let reply = self
            .post(
                None,
                &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                    "protocolVersion": version, "capabilities": {},
                    "clientInfo": {"name": "dynogate-tests", "version": "1"}}}),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "initialize failed: {}", reply.text);
        let session = reply.session().expect("initialize returns Mcp-Session-Id");
        let initialized =
            self.post(Some(&session), &json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await;
        assert_eq!(initialized.status, StatusCode::ACCEPTED);
        (session, reply)
    }

    /// `tools/call` and its parsed reply.
    pub async fn call(&self, session: &str, id: i64, tool: &str, arguments: Value) -> Reply {
        self.post(
            Some(session),
            &json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}),
        )
        .await
    }

    pub async fn delete(&self, session: &str) -> StatusCode {
        self.request(reqwest::Method::DELETE).header("mcp-session-id", session).send().await.unwrap().status()
    }
}

/// Reads a whole response; an SSE body's last event becomes `json`.
pub async fn read(response: reqwest::Response) -> Reply {
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap_or_default();
    let is_sse = headers.get("content-type").is_some_and(|v| v.to_str().unwrap().starts_with("text/event-stream"));
    let json = if is_sse {
        sse_events(&text).pop().unwrap_or(Value::Null)
    } else {
        serde_json::from_str(&text).unwrap_or(Value::Null)
    };
    Reply { status, headers, text, json }
}

/// The `{returncode, stdout, stderr}` a code tool returned, from its text content.
pub fn exec_result(result: &Value) -> Value {
    let text = result["result"]["content"][0]["text"].as_str().unwrap_or_else(|| panic!("no text content in {result}"));
    serde_json::from_str(text).unwrap_or_else(|e| panic!("the text content is not JSON ({e}): {text}"))
}

/// The same, from an rmcp result.
pub fn exec_result_of(result: &CallToolResult) -> Value {
    let text = result.content[0].as_text().expect("text content").text.clone();
    serde_json::from_str(&text).expect("the text content is JSON")
}

pub fn tool_call(name: &str, arguments: Value) -> CallToolRequestParams {
    CallToolRequestParams::new(name.to_owned()).with_arguments(arguments.as_object().unwrap().clone())
}

/// Pids of the runners serving `session` (found by their command lines).
pub fn runner_pids(session: &str) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|(_, argv)| argv.iter().any(|a| a == "--local") && argv.iter().any(|a| a == session))
        .map(|(pid, _)| pid)
        .collect()
}

/// Pids of every runner started by a given gateway (by parent pid).
pub fn children_of(parent: i32) -> Vec<i32> {
    processes().into_iter().filter(|(pid, _)| parent_of(*pid) == Some(parent)).map(|(pid, _)| pid).collect()
}

/// The one session a gateway is serving, read from its runner's command line.
pub fn only_session(gateway: &Gateway) -> String {
    let runners = children_of(gateway.pid());
    assert_eq!(runners.len(), 1, "expected one runner, found {runners:?}");
    let argv = argv_of(runners[0]).expect("runner still alive");
    let at = argv.iter().position(|a| a == "--session").expect("--session in the runner's command line");
    argv[at + 1].clone()
}

pub fn processes() -> Vec<(i32, Vec<String>)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, argv_of(pid)?)))
        .collect()
}

pub fn argv_of(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(raw.split(|&b| b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect())
}

pub fn environ_of(pid: i32) -> HashMap<String, String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    raw.split(|&b| b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect()
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()
}

/// The first process with an argument containing `needle`.
pub fn pid_with_arg(needle: &str) -> Option<i32> {
    processes().into_iter().find(|(_, argv)| argv.iter().any(|a| a.contains(needle))).map(|(pid, _)| pid)
}

/// Python that leaves something behind the way hostile code would: a
/// double fork into a session of its own, detached from every pipe (so the
/// call can end without it), whose grandchild runs `grandchild` (Python; it
/// may use `os` and `sys`). The code carries on after the fork.
pub fn double_fork(grandchild: &str) -> String {
    let body: String = grandchild.lines().map(|line| format!("        {line}\n")).collect();
    format!(
        "import os, sys\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        \
         null = os.open(os.devnull, os.O_RDWR)\n        for fd in (0, 1, 2):\n            os.dup2(null, fd)\n\
         {body}    os._exit(0)\n"
    )
}

/// Whether a process is gone (or a zombie: dead, not yet reaped).
pub fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// This process's PATH without any directory that holds `uv`.
pub fn path_without_uv() -> String {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let without_uv: Vec<_> = std::env::split_paths(&path).filter(|dir| !dir.join("uv").exists()).collect();
    std::env::join_paths(without_uv).unwrap().into_string().unwrap()
}

/// Polls `condition` until it holds, failing the test after [`PATIENCE`].
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A temporary directory with a script in it, for stand-in runners and servers.
pub fn script(name: &str, body: &str) -> (tempfile::TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    (dir, path)
}

/// A TCP proxy that can cut every connection through it at once, to stand
/// for a network blip between runners and the gateway. Its target is set
/// after it starts, since the gateway must be told the proxy's address first.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    target: std::sync::Arc<std::sync::Mutex<Option<std::net::SocketAddr>>>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target: std::sync::Arc<std::sync::Mutex<Option<std::net::SocketAddr>>> = Default::default();
        let connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Default::default();
        let accept = tokio::spawn({
            let (target, connections) = (target.clone(), connections.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let Some(to) = *target.lock().unwrap() else { continue };
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().unwrap().push(task.abort_handle());
                }
            }
        });
        Proxy { addr, target, connections, accept }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn forward_to(&self, url: &str) {
        let addr = url.trim_start_matches("http://").parse().unwrap();
        *self.target.lock().unwrap() = Some(addr);
    }

    /// Cuts every connection made so far; new ones go through again.
    pub fn sever(&self) -> usize {
        let cut: Vec<_> = self.connections.lock().unwrap().drain(..).collect();
        for connection in &cut {
            connection.abort();
        }
        cut.len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.sever();
    }
}

/// Resident memory of a process, in bytes.
pub fn rss_of(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The highest resident memory of a process since [`PeakRss::watch`],
/// sampled every 10 ms by a thread that stops when this is dropped.
pub struct PeakRss {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
    pid: i32,
}

impl PeakRss {
    pub fn watch(pid: i32) -> Self {
        use std::sync::atomic::Ordering;
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss_of(pid).unwrap_or(0)));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // A thread rather than a task: it samples on time even while the
        // test's runtime is busy (or single-threaded and blocked).
        let sampler = std::thread::spawn({
            let (peak, stop) = (peak.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_of(pid).unwrap_or(0), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        });
        PeakRss { peak, stop, sampler: Some(sampler), pid }
    }

    /// The peak so far, counting a sample taken now.
    pub fn get(&self) -> u64 {
        let now = rss_of(self.pid).unwrap_or(0);
        self.peak.fetch_max(now, std::sync::atomic::Ordering::Relaxed).max(now)
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(sampler) = self.sampler.take() {
            let _ = sampler.join();
        }
    }
}

/// Mebibytes, for messages about memory.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A gateway in this process with `extra` flags (runners cold, tools listed
/// only on demand), its drain switch, and its URL.
pub async fn in_process(
    extra: &[&str],
) -> (dynogate_gateway::server::Running, tokio_util::sync::CancellationToken, String) {
    use clap::Parser;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut flags = vec![
        "gateway",
        "--port",
        "0",
        "--runner-bin",
        RUNNER,
        "--rendezvous-secret",
        SECRET,
        "--discover-servers",
        "on-demand",
    ];
    flags.extend_from_slice(extra);
    let config = dynogate_gateway::config::Args::parse_from(flags).validate().expect("valid flags");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let drain = tokio_util::sync::CancellationToken::new();
    let running = dynogate_gateway::server::start(config, listener, drain.clone()).await.expect("the gateway starts");
    (running, drain, url)
}

/// `GET /metrics` (with `key` when given): the status, the text, and the
/// text parsed by a Prometheus parser (empty unless the status is 200).
pub async fn scrape_metrics(gateway: &Gateway, key: Option<&str>) -> (u16, String, prometheus_parse::Scrape) {
    let mut request = reqwest::Client::new().get(format!("{}/metrics", gateway.url)).timeout(PATIENCE);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let lines = if status == 200 { text.clone() } else { String::new() };
    let parsed =
        prometheus_parse::Scrape::parse(lines.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text format");
    (status, text, parsed)
}

/// A counter's or gauge's value, or a histogram's count, over the samples
/// of `metric` with these labels.
pub fn metric(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    use prometheus_parse::Value as V;
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            V::Counter(v) | V::Gauge(v) | V::Untyped(v) => *v,
            V::Histogram(buckets) => buckets.iter().find(|b| b.less_than.is_infinite()).map_or(0.0, |b| b.count),
            V::Summary(_) => 0.0,
        })
        .sum()
}

/// `options` for each user a sandbox test starts a gateway as: whoever runs the
/// suite, and `nobody` as well when that is root (and the binaries are
/// reachable by other users).
pub fn as_each_user(options: impl Fn() -> Options) -> Vec<(&'static str, Options)> {
    let mut users = vec![("this user", options())];
    if !nix::unistd::geteuid().is_root() {
        return users;
    }
    for dir in std::path::Path::new(RUNNER).ancestors().skip(1) {
        let mode =
            std::fs::metadata(dir).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions())).unwrap_or(0);
        if mode & 0o001 == 0 {
            eprintln!("not run as an unprivileged user: {} is not searchable by other users", dir.display());
            return users;
        }
    }
    // Where this user cannot make a sandbox (unprivileged user namespaces
    // disabled), there is nothing to test as it.
    let check = {
        use std::os::unix::process::CommandExt;
        Command::new(RUNNER)
            .arg("sandbox-check")
            .uid(65_534)
            .gid(65_534)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .output()
    };
    if !check.as_ref().is_ok_and(|out| out.status.success()) {
        eprintln!("not run as an unprivileged user: it cannot make a sandbox here: {check:?}");
        return users;
    }
    let unprivileged = options().user(65_534).env("PATH", "/usr/local/bin:/usr/bin:/bin").env("HOME", "/nonexistent");
    users.push(("an unprivileged user", unprivileged));
    users
}
