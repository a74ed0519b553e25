//! A fake of Heroku's Platform API that really runs dynos on this machine.
//!
//! `POST /apps/{app}/dynos` starts the requested command the way Heroku
//! starts a dyno: in the slug's directory, under a launcher (`bash`, which
//! stays its parent) in a process group of its own, with a minimal
//! environment (`PATH=/usr/local/bin:/usr/bin:/bin`, `HOME` = the slug,
//! `DYNO=run.N`, no `PORT`), that app's config vars and the request's `env`,
//! after sourcing the slug's `.profile.d/*.sh`. The slug is built like one of
//! this repository's real builds: `target/` (this repository's), and a
//! buildpack-style Python whose interpreter is reachable only through its
//! `.profile.d` script and starts only with the `LD_LIBRARY_PATH` and
//! `PYTHONHOME` that script sets, as Heroku's shared-library Python does,
//! with `uv` beside it as `requirements.txt` brings it. `GET` reports `up`
//! while the process runs and `down`/`crashed` after; `actions/stop` sends
//! SIGTERM and SIGKILL after a grace, like the platform. Apps can be read and
//! created, and slugs released on them. It starts with one app, `my-app`,
//! holding the config vars given and one release (`slug-1`). It checks the
//! headers the real API requires and records every call so tests can see
//! what the gateway did.

use std::collections::BTreeMap;
use std::path::PathBuf;
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
    Create { app: String, command: String, env: BTreeMap<String, String>, body: Value },
    CreateApp(Value),
    Release { app: String, slug: String },
    Stop(String),
    List,
    Get(String),
}

struct Dyno {
    app: String,
    id: String,
    name: String,
    command: String,
    child: Child,
}

/// An app: its config vars, stack and region, and released slugs in order.
#[derive(Default, Clone)]
struct AppState {
    config_vars: Vec<(String, String)>,
    stack: String,
    region: String,
    slugs: Vec<String>,
}

/// The app the fake starts with, as the gateway's tests name it.
pub const GATEWAY_APP: &str = "my-app";
/// Where the gateway runs runner dynos by default.
pub const RUNNER_APP: &str = "my-app-run";

#[derive(Default)]
struct Inner {
    apps: BTreeMap<String, AppState>,
    dynos: Vec<Dyno>,
    calls: Vec<Call>,
    next: u32,
    /// When set, creates are refused with this status, id and message.
    refuse: Option<(u16, String, String)>,
    /// How long a dyno takes to boot before its command starts.
    boot_delay: Duration,
}

#[derive(Clone)]
struct Fake {
    inner: Arc<Mutex<Inner>>,
    key: String,
    /// The app directory every dyno starts in.
    slug: Arc<tempfile::TempDir>,
}

/// A running fake Platform API; every dyno it started is killed on drop.
pub struct FakeHeroku {
    pub url: String,
    fake: Fake,
    _server: tokio::task::JoinHandle<()>,
}

impl FakeHeroku {
    /// Starts the fake with the app [`GATEWAY_APP`], whose config vars are
    /// `config_vars`: what each of its dynos sees in its environment.
    pub async fn start(key: &str, config_vars: &[(&str, &str)]) -> Self {
        let fake = Fake { inner: Arc::default(), key: key.to_owned(), slug: Arc::new(build_slug()) };
        fake.inner.lock().unwrap().apps.insert(
            GATEWAY_APP.to_owned(),
            AppState {
                config_vars: config_vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
                stack: "heroku-24".into(),
                region: "us".into(),
                slugs: vec!["slug-1".into()],
            },
        );
        let app = axum::Router::new()
            .route("/apps", post(create_app))
            .route("/apps/{app}", get(app_info))
            .route("/apps/{app}/releases", get(releases).post(release))
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

    /// The apps dynos were created in, in order.
    pub fn dyno_apps(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Create { app, .. } => Some(app),
                _ => None,
            })
            .collect()
    }

    /// An app's stack and released slugs, if it exists.
    pub fn app(&self, name: &str) -> Option<(String, Vec<String>)> {
        let inner = self.fake.inner.lock().unwrap();
        inner.apps.get(name).map(|app| (app.stack.clone(), app.slugs.clone()))
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

    /// Makes every dyno created from now on boot this long before its
    /// command starts, as a real one takes seconds.
    pub fn set_boot_delay(&self, delay: Duration) {
        self.fake.inner.lock().unwrap().boot_delay = delay;
    }

    /// Starts a dyno of the runner app directly (as if created before the
    /// gateway started).
    pub fn launch(&self, command: &str) -> (String, i32) {
        let mut inner = self.fake.inner.lock().unwrap();
        inner.apps.entry(RUNNER_APP.to_owned()).or_default();
        let dyno = self.fake.run(&mut inner, RUNNER_APP, command, &BTreeMap::new());
        let pid = i32::try_from(dyno.child.id()).unwrap();
        let id = dyno.id.clone();
        inner.dynos.push(dyno);
        (id, pid)
    }

    /// The app directory dynos start in.
    pub fn slug(&self) -> &std::path::Path {
        self.fake.slug.path()
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
    fn run(&self, inner: &mut Inner, app: &str, command: &str, env: &BTreeMap<String, String>) -> Dyno {
        use std::os::unix::process::CommandExt;
        inner.next += 1;
        let name = format!("run.{}", inner.next);
        let config_vars = inner.apps.get(app).map(|a| a.config_vars.clone()).unwrap_or_default();
        // The launcher stays the command's parent (no `exec`), holding the
        // dyno's whole environment, as Heroku's does.
        let mut cmd = Command::new("bash");
        let boot = inner.boot_delay.as_secs_f64();
        cmd.arg("-c")
            .arg(format!(
                "sleep {boot}\nfor f in .profile.d/*.sh; do [ -r \"$f\" ] && . \"$f\"; done\n{command}\nexit $?"
            ))
            .current_dir(self.slug.path())
            .env_clear()
            .env("PATH", DYNO_PATH)
            .env("HOME", self.slug.path());
        // Where this machine reaches PyPI through settings of its own, the
        // runner app would have them as config vars.
        for name in ["PIP_FIND_LINKS", "PIP_CERT", "PIP_DEFAULT_TIMEOUT", "UV_INDEX_URL", "PIP_INDEX_URL"] {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
        cmd.envs(config_vars.iter().map(|(k, v)| (k, v)))
            .envs(env)
            .env("DYNO", &name)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .process_group(0);
        let child = cmd.spawn().expect("the fake runs the dyno's command");
        Dyno { app: app.to_owned(), id: format!("dyno-{}", inner.next), name, command: command.to_owned(), child }
    }
}

/// `PATH` as a dyno starts with it, before `.profile.d`.
const DYNO_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The slug every dyno runs: this repository's `target/`, and a Python as
/// the heroku/python buildpack leaves it (`.heroku/python`, its
/// `.profile.d/python.sh`, uv from `requirements.txt`). The interpreter is
/// this machine's, behind a launcher that refuses to start, as a
/// shared-library build would, unless `LD_LIBRARY_PATH` holds the slug's
/// library directory.
fn build_slug() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let slug = tempfile::Builder::new().prefix("fake-slug-").tempdir().unwrap();
    let root = slug.path();
    std::os::unix::fs::symlink(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"), root.join("target")).unwrap();
    let python = root.join(".heroku").join("python");
    let (bin, lib) = (python.join("bin"), python.join("lib"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&lib).unwrap();
    let find = |tool: &str, path: &std::ffi::OsStr| {
        std::env::split_paths(path).map(|dir| dir.join(tool)).find(|p| p.is_file())
    };
    let real = find("python3", DYNO_PATH.as_ref()).expect("python3 in /usr/bin, which the fake slug's Python runs");
    let facts = Command::new(&real)
        .args([
            "-c",
            "import sys, sysconfig; print('%d.%d' % sys.version_info[:2]); print(sysconfig.get_path('stdlib'))",
        ])
        .output()
        .unwrap();
    let facts = String::from_utf8(facts.stdout).unwrap();
    let mut facts = facts.lines();
    let (version, stdlib) = (facts.next().unwrap().to_owned(), facts.next().unwrap().to_owned());
    // PYTHONHOME points at `.heroku/python`, so its standard library is found there.
    std::os::unix::fs::symlink(&stdlib, lib.join(format!("python{version}"))).unwrap();
    let launcher = bin.join("python3");
    std::fs::write(
        &launcher,
        format!(
            "#!/bin/bash\n\
             case \":$LD_LIBRARY_PATH:\" in *\":{lib}:\"*) ;; *)\n\
             echo \"python3: error while loading shared libraries: libpython{version}.so.1.0: cannot open shared \
             object file: No such file or directory\" >&2\n\
             exit 127 ;;\nesac\n\
             exec -a \"$0\" {real} \"$@\"\n",
            lib = lib.display(),
            real = std::fs::canonicalize(&real).unwrap().display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&launcher, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("python3", bin.join("python")).unwrap();
    if let Some(uv) = find("uv", &std::env::var_os("PATH").unwrap_or_default()) {
        std::os::unix::fs::symlink(uv, bin.join("uv")).unwrap();
    }
    let profile = root.join(".profile.d");
    std::fs::create_dir(&profile).unwrap();
    std::fs::write(
        profile.join("python.sh"),
        "export PATH=\"$HOME/.heroku/python/bin:$PATH\"\n\
         export PYTHONHOME=\"$HOME/.heroku/python\"\n\
         export LD_LIBRARY_PATH=\"$HOME/.heroku/python/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}\"\n\
         export LIBRARY_PATH=\"$HOME/.heroku/python/lib${LIBRARY_PATH:+:$LIBRARY_PATH}\"\n\
         export PYTHONUNBUFFERED=true\n",
    )
    .unwrap();
    slug
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
           "attach_url": null, "size": "Standard-1X", "app": {"name": dyno.app}})
}

fn no_app() -> Response {
    refusal(404, "not_found", "Couldn't find that app.")
}

fn describe_app(name: &str, app: &AppState) -> Value {
    json!({"name": name, "stack": {"name": app.stack}, "region": {"name": app.region}})
}

async fn app_info(State(fake): State<Fake>, headers: HeaderMap, Path(app): Path<String>) -> Response {
    if let Some(refused) = refused(&fake, &headers) {
        return refused;
    }
    let inner = fake.inner.lock().unwrap();
    match inner.apps.get(&app) {
        Some(state) => Json(describe_app(&app, state)).into_response(),
        None => no_app(),
    }
}

async fn create_app(State(fake): State<Fake>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    if let Some(refused) = refused(&fake, &headers) {
        return refused;
    }
    let mut inner = fake.inner.lock().unwrap();
    inner.calls.push(Call::CreateApp(body.clone()));
    let name = body["name"].as_str().unwrap_or_default().to_owned();
    if inner.apps.contains_key(&name) {
        return refusal(422, "invalid_params", "Name is already taken");
    }
    let state = AppState {
        config_vars: Vec::new(),
        stack: body["stack"].as_str().unwrap_or("heroku-24").to_owned(),
        region: body["region"].as_str().unwrap_or("us").to_owned(),
        slugs: Vec::new(),
    };
    let answer = describe_app(&name, &state);
    inner.apps.insert(name, state);
    (StatusCode::CREATED, Json(answer)).into_response()
}

async fn releases(State(fake): State<Fake>, headers: HeaderMap, Path(app): Path<String>) -> Response {
    if let Some(refused) = refused(&fake, &headers) {
        return refused;
    }
    let inner = fake.inner.lock().unwrap();
    let Some(state) = inner.apps.get(&app) else { return no_app() };
    // Newest first, as `Range: version ..; order=desc` asks.
    let all: Vec<Value> = state
        .slugs
        .iter()
        .enumerate()
        .rev()
        .map(|(i, slug)| json!({"version": i + 1, "status": "succeeded", "slug": {"id": slug}}))
        .collect();
    Json(all).into_response()
}

async fn release(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Path(app): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    if let Some(refused) = refused(&fake, &headers) {
        return refused;
    }
    let mut inner = fake.inner.lock().unwrap();
    let slug = body["slug"].as_str().unwrap_or_default().to_owned();
    inner.calls.push(Call::Release { app: app.clone(), slug: slug.clone() });
    let Some(state) = inner.apps.get_mut(&app) else { return no_app() };
    state.slugs.push(slug.clone());
    let version = state.slugs.len();
    (StatusCode::CREATED, Json(json!({"version": version, "status": "succeeded", "slug": {"id": slug}})))
        .into_response()
}

async fn create(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Path(app): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    if let Some(refused) = refused(&fake, &headers) {
        return refused;
    }
    let command = body["command"].as_str().unwrap_or_default().to_owned();
    let env: BTreeMap<String, String> = serde_json::from_value(body["env"].clone()).unwrap_or_default();
    let mut inner = fake.inner.lock().unwrap();
    inner.calls.push(Call::Create { app: app.clone(), command: command.clone(), env: env.clone(), body: body.clone() });
    if let Some((status, id, message)) = inner.refuse.clone() {
        return refusal(status, &id, &message);
    }
    if !inner.apps.contains_key(&app) {
        return no_app();
    }
    let mut dyno = fake.run(&mut inner, &app, &command, &env);
    let mut answer = describe(&mut dyno);
    answer["state"] = json!("starting");
    inner.dynos.push(dyno);
    (StatusCode::CREATED, [("ratelimit-remaining", "4000")], Json(answer)).into_response()
}

async fn list(State(fake): State<Fake>, headers: HeaderMap, Path(app): Path<String>) -> Response {
    if let Some(refused) = refused(&fake, &headers) {
        return refused;
    }
    let mut inner = fake.inner.lock().unwrap();
    inner.calls.push(Call::List);
    let all: Vec<Value> = inner.dynos.iter_mut().filter(|d| d.app == app).map(describe).collect();
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
