//! A fake of Heroku's Platform API that really runs dynos on this machine.
//!
//! `POST /apps/{app}/dynos` starts the requested command with `sh -c`, in a
//! process group of its own, with the app's config vars plus the request's
//! `env` (as Heroku does); `GET` reports `up` while the process runs and
//! `down`/`crashed` after; `actions/stop` sends SIGTERM and SIGKILL after a
//! grace, like the platform. It checks the headers the real API requires and
//! records every call so tests can see what the gateway did.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// What the fake was asked to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    Create { command: String, env: BTreeMap<String, String>, body: Value },
    Stop(String),
    List,
    Get(String),
}

struct Dyno {
    id: String,
    name: String,
    command: String,
    child: Child,
}

#[derive(Default)]
struct Inner {
    dynos: Vec<Dyno>,
    calls: Vec<Call>,
    next: u32,
    /// When set, creates are refused with this status, id and message.
    refuse: Option<(u16, String, String)>,
}

#[derive(Clone)]
struct Fake {
    inner: Arc<Mutex<Inner>>,
    key: String,
    config_vars: Vec<(String, String)>,
}

/// A running fake Platform API; every dyno it started is killed on drop.
pub struct FakeHeroku {
    pub url: String,
    fake: Fake,
    _server: tokio::task::JoinHandle<()>,
}

impl FakeHeroku {
    /// Starts the fake. `config_vars` are what every dyno sees in its
    /// environment, as an app's config vars are.
    pub async fn start(key: &str, config_vars: &[(&str, &str)]) -> Self {
        let fake = Fake {
            inner: Arc::default(),
            key: key.to_owned(),
            config_vars: config_vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        };
        let app = axum::Router::new()
            .route("/apps/{app}/dynos", post(create).get(list))
            .route("/apps/{app}/dynos/{id}", get(info))
            .route("/apps/{app}/dynos/{id}/actions/stop", post(stop))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeHeroku { url, fake, _server: server }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.fake.inner.lock().unwrap().calls.clone()
    }

    pub fn creates(&self) -> Vec<(String, BTreeMap<String, String>)> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Create { command, env, .. } => Some((command, env)),
                _ => None,
            })
            .collect()
    }

    pub fn stops(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Stop(id) => Some(id),
                _ => None,
            })
            .collect()
    }

    /// Refuse every later create the way Heroku refuses one.
    pub fn refuse_creates(&self, status: u16, id: &str, message: &str) {
        self.fake.inner.lock().unwrap().refuse = Some((status, id.to_owned(), message.to_owned()));
    }

    /// Starts a dyno directly (as if created before the gateway started).
    pub fn launch(&self, command: &str) -> (String, i32) {
        let mut inner = self.fake.inner.lock().unwrap();
        let dyno = self.fake.run(&mut inner, command, &BTreeMap::new());
        let pid = i32::try_from(dyno.child.id()).unwrap();
        let id = dyno.id.clone();
        inner.dynos.push(dyno);
        (id, pid)
    }

    /// Pids of the processes leading each dyno, by dyno id.
    pub fn pids(&self) -> Vec<(String, i32)> {
        let inner = self.fake.inner.lock().unwrap();
        inner.dynos.iter().map(|d| (d.id.clone(), i32::try_from(d.child.id()).unwrap())).collect()
    }
}

impl Drop for FakeHeroku {
    fn drop(&mut self) {
        let mut inner = self.fake.inner.lock().unwrap();
        for dyno in &mut inner.dynos {
            let _ = killpg(Pid::from_raw(i32::try_from(dyno.child.id()).unwrap()), Signal::SIGKILL);
            let _ = dyno.child.wait();
        }
    }
}

impl Fake {
    fn run(&self, inner: &mut Inner, command: &str, env: &BTreeMap<String, String>) -> Dyno {
        use std::os::unix::process::CommandExt;
        inner.next += 1;
        let name = format!("run.{}", inner.next);
        let workdir = std::env::temp_dir();
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(command).current_dir(workdir).env_clear();
        for name in ["PATH", "HOME", "TMPDIR", "PIP_FIND_LINKS", "PIP_CERT", "PIP_DEFAULT_TIMEOUT"] {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
        cmd.envs(self.config_vars.iter().map(|(k, v)| (k, v)))
            .envs(env)
            .env("DYNO", &name)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .process_group(0);
        let child = cmd.spawn().expect("the fake runs the dyno's command");
        Dyno { id: format!("dyno-{}", inner.next), name, command: command.to_owned(), child }
    }
}

/// The refusal the real API would give a request without its headers, if any.
fn refused(fake: &Fake, headers: &HeaderMap) -> Option<Response> {
    let accept = headers.get("accept").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if accept != "application/vnd.heroku+json; version=3" {
        return Some(refusal(406, "not_acceptable", "Please specify a version along with Heroku's API MIME type."));
    }
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if auth != format!("Bearer {}", fake.key) {
        return Some(refusal(401, "unauthorized", "Invalid credentials provided."));
    }
    None
}

fn refusal(status: u16, id: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [("request-id", "fake-request")],
        Json(json!({"id": id, "message": message})),
    )
        .into_response()
}

fn describe(dyno: &mut Dyno) -> Value {
    let state = match dyno.child.try_wait() {
        Ok(None) => "up",
        Ok(Some(status)) if status.success() => "down",
        _ => "crashed",
    };
    json!({"id": dyno.id, "name": dyno.name, "state": state, "command": dyno.command, "type": "run",
           "attach_url": null, "size": "Standard-1X", "app": {"name": "my-app"}})
}

async fn create(State(fake): State<Fake>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    if let Some(refused) = refused(&fake, &headers) {
        return refused;
    }
    let command = body["command"].as_str().unwrap_or_default().to_owned();
    let env: BTreeMap<String, String> = serde_json::from_value(body["env"].clone()).unwrap_or_default();
    let mut inner = fake.inner.lock().unwrap();
    inner.calls.push(Call::Create { command: command.clone(), env: env.clone(), body: body.clone() });
    if let Some((status, id, message)) = inner.refuse.clone() {
        return refusal(status, &id, &message);
    }
    let mut dyno = fake.run(&mut inner, &command, &env);
    let mut answer = describe(&mut dyno);
    answer["state"] = json!("starting");
    inner.dynos.push(dyno);
    (StatusCode::CREATED, [("ratelimit-remaining", "4000")], Json(answer)).into_response()
}

async fn list(State(fake): State<Fake>, headers: HeaderMap) -> Response {
    if let Some(refused) = refused(&fake, &headers) {
        return refused;
    }
    let mut inner = fake.inner.lock().unwrap();
    inner.calls.push(Call::List);
    let all: Vec<Value> = inner.dynos.iter_mut().map(describe).collect();
    Json(all).into_response()
}

async fn info(State(fake): State<Fake>, headers: HeaderMap, Path((_app, id)): Path<(String, String)>) -> Response {
    if let Some(refused) = refused(&fake, &headers) {
        return refused;
    }
    let mut inner = fake.inner.lock().unwrap();
    inner.calls.push(Call::Get(id.clone()));
    match inner.dynos.iter_mut().find(|d| d.id == id) {
        Some(dyno) => Json(describe(dyno)).into_response(),
        None => refusal(404, "not_found", "Couldn't find that dyno."),
    }
}

async fn stop(State(fake): State<Fake>, headers: HeaderMap, Path((_app, id)): Path<(String, String)>) -> Response {
    if let Some(refused) = refused(&fake, &headers) {
        return refused;
    }
    let mut inner = fake.inner.lock().unwrap();
    inner.calls.push(Call::Stop(id.clone()));
    let Some(dyno) = inner.dynos.iter_mut().find(|d| d.id == id) else {
        return refusal(404, "not_found", "Couldn't find that dyno.");
    };
    if let Ok(None) = dyno.child.try_wait() {
        let pgid = Pid::from_raw(i32::try_from(dyno.child.id()).unwrap());
        let _ = killpg(pgid, Signal::SIGTERM);
        // Heroku's grace before SIGKILL, shortened for tests.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(5));
            let _ = killpg(pgid, Signal::SIGKILL);
        });
    }
    (StatusCode::ACCEPTED, Json(json!({}))).into_response()
}
