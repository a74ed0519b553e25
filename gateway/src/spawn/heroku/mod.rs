//! The Heroku spawner: each runner is a one-off dyno of the runner app, an
//! app apart from the gateway's that holds no secret ([`runner_app`]).
//!
//! A session's dyno is created detached (`attach: false`) with a command that
//! runs the runner from the slug and names the session; the runner's token,
//! the gateway's URL and the bridged command travel in the dyno's `env`,
//! never on the command line (commands show up in `heroku ps` and logs).
//!
//! Every runner dyno's command carries [`MARKER`], which is how the sweeper
//! recognises ours among the app's dynos: at start-up and every few minutes
//! it stops marked dynos whose session is not live (left over by a crash, a
//! deploy, or a stop call that failed). Dynos without the marker are never
//! touched.
//!
//! - [`api`]: the Platform API client, with its retry and rate-limit rules.
//! - [`runner_app`]: the app runner dynos run in, created and kept on the
//!   gateway's slug.

pub mod api;
pub mod runner_app;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{RunnerProcess, RunnerSpec, SpawnError, Spawner};
use api::{Api, ApiError, CreateDyno};

/// The argument that marks a dyno as a dynogate runner.
pub const MARKER: &str = "--spawned-by dynogate";

/// How the spawner is set up.
#[derive(Debug, Clone)]
pub struct HerokuSettings {
    /// Path of the runner binary inside the slug (the same as beside the gateway).
    pub runner_bin: String,
    /// The stdio MCP server runners bridge; `None` for the built-in executor.
    pub runner_command: Option<String>,
    pub size: Option<String>,
    pub ttl: Duration,
    /// Below this many remaining API calls, new sessions are refused.
    pub rate_limit_reserve: i64,
    /// How long to watch a new dyno's state for an early crash.
    pub watch_for: Duration,
    /// Where runner dynos export their spans ([`dynogate_telemetry::runner_env`]).
    pub trace_env: Vec<(String, String)>,
}

/// Starts runners as one-off dynos.
#[derive(Debug, Clone)]
pub struct HerokuSpawner {
    /// Bound to the runner app: dynos are created, listed and stopped there.
    api: Api,
    /// Bound to the gateway's own app, whose slug the runner app runs.
    gateway: Api,
    settings: HerokuSettings,
    /// Set at start-up when the app runs on Cloud Native Buildpacks.
    cnb: std::sync::Arc<std::sync::OnceLock<bool>>,
    /// When the budget was last asked for while sessions were refused.
    budget_asked: std::sync::Arc<std::sync::Mutex<Option<Instant>>>,
}

/// How often, at most, a spawner refusing sessions for the budget asks
/// Heroku for it again.
const ASK_BUDGET_EVERY: Duration = Duration::from_secs(5);
/// How long start-up keeps trying a Platform API that is unavailable (a
/// refusal, such as a wrong key, fails at once).
const PREPARE_PATIENCE: Duration = Duration::from_secs(180);
/// The longest wait between two tries at start-up.
const PREPARE_WAIT_AT_MOST: Duration = Duration::from_secs(30);

/// Whether `error` comes of the Platform API being unavailable, which
/// waiting may cure, rather than of a refusal.
fn unavailable(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| matches!(cause.downcast_ref::<ApiError>(), Some(ApiError::Unavailable(_))))
}

impl HerokuSpawner {
    /// `api` is bound to the app runner dynos run in, `gateway` to the
    /// gateway's own (the same app only when the operator allowed it).
    pub fn new(api: Api, gateway: Api, settings: HerokuSettings) -> Self {
        Self { api, gateway, settings, cnb: Default::default(), budget_asked: Default::default() }
    }

    /// The dyno's command: the runner, the marker and the session, nothing
    /// secret; through `launcher` on a Cloud Native Buildpacks app, which is
    /// what sets up the runtime's environment there.
    pub fn command(&self, session: &str) -> String {
        let launcher = if self.cnb.get() == Some(&true) { "launcher " } else { "" };
        format!("{launcher}{} {MARKER} --session {session}", self.settings.runner_bin)
    }
}

impl HerokuSpawner {
    /// Reads the gateway's app and readies the runner app; returns the
    /// gateway's public URL.
    async fn prepare_once(&self) -> anyhow::Result<Option<url::Url>> {
        let own = self
            .gateway
            .app_info()
            .await
            .with_context(|| format!("cannot read the gateway's app {}", self.gateway.app()))?;
        if own.is_cnb() {
            info!("the app is built with Cloud Native Buildpacks: runner dynos start through `launcher`");
            let _ = self.cnb.set(true);
        }
        runner_app::prepare(&self.gateway, &self.api, &own).await?;
        Ok(own.web_url.as_deref().and_then(|url| url::Url::parse(url).ok()))
    }

    /// Asks Heroku for the budget again, in the background (at most every
    /// [`ASK_BUDGET_EVERY`]): the budget refills over time, but while
    /// sessions are refused nothing else may call the API to say so.
    fn ask_budget(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        {
            let mut asked = self.budget_asked.lock().expect("budget lock");
            if asked.is_some_and(|at| at.elapsed() < ASK_BUDGET_EVERY) {
                return;
            }
            *asked = Some(Instant::now());
        }
        let api = self.api.clone();
        runtime.spawn(async move {
            match api.refresh_remaining().await {
                Ok(remaining) => info!(remaining, "asked Heroku for the API budget"),
                Err(e) => warn!("cannot ask Heroku for the API budget: {e}"),
            }
        });
    }
}

/// The session a marked dyno serves, read from its command.
pub fn session_of(command: &str) -> Option<&str> {
    if !command.contains(MARKER) {
        return None;
    }
    let mut words = command.split_whitespace();
    words.find(|w| *w == "--session")?;
    words.next()
}

fn spawn_error(error: ApiError) -> SpawnError {
    match error {
        ApiError::Refused { status, id, message } => {
            SpawnError::Start(format!("Heroku refused to start a runner dyno (HTTP {status} {id}: {message})"))
        }
        ApiError::Unavailable(why) => {
            SpawnError::Start(format!("could not reach Heroku to start a runner dyno: {why}"))
        }
    }
}

impl Spawner for HerokuSpawner {
    fn prepare(&self) -> BoxFuture<'_, anyhow::Result<Option<url::Url>>> {
        async move {
            // An outage of the Platform API at boot is waited out: failing
            // would crash the web dyno, and Heroku backs off restarting it.
            let started = Instant::now();
            let mut wait = self.api.retry_policy().max_wait;
            loop {
                match self.prepare_once().await {
                    Err(e) if unavailable(&e) && started.elapsed() + wait < PREPARE_PATIENCE => {
                        warn!("cannot prepare yet; trying again in {wait:?}: {e:#}");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(PREPARE_WAIT_AT_MOST);
                    }
                    done => return done,
                }
            }
        }
        .boxed()
    }

    fn admit(&self) -> Result<(), String> {
        match self.api.remaining() {
            Some(remaining) if remaining < self.settings.rate_limit_reserve => {
                self.ask_budget();
                Err(format!(
                    "the Heroku API budget is nearly spent ({remaining} calls left, reserve {}); new sessions resume as it refills",
                    self.settings.rate_limit_reserve
                ))
            }
            _ => Ok(()),
        }
    }

    fn budget_remaining(&self) -> Option<i64> {
        self.api.remaining()
    }

    fn spawn(&self, spec: RunnerSpec) -> BoxFuture<'_, Result<Box<dyn RunnerProcess>, SpawnError>> {
        async move {
            let mut env = BTreeMap::new();
            env.insert(dynogate_shared::names::TOKEN_ENV.to_owned(), spec.token.expose().to_owned());
            env.insert("GATEWAY_URL".to_owned(), spec.gateway_url.to_string());
            if let Some(traceparent) = &spec.traceparent {
                env.insert(dynogate_telemetry::TRACEPARENT_ENV.to_owned(), traceparent.clone());
            }
            env.extend(self.settings.trace_env.iter().cloned());
            let server = spec.launch.server.as_ref().map(|s| &s.command);
            if let Some(command) = server.or(self.settings.runner_command.as_ref()) {
                env.insert("RUNNER_COMMAND".to_owned(), command.clone());
            }
            let body = CreateDyno {
                command: self.command(&spec.session),
                env,
                attach: false,
                size: spec.launch.size.clone().or_else(|| self.settings.size.clone()),
                kind: "run".to_owned(),
                time_to_live: self.settings.ttl.as_secs(),
            };
            let dyno = self.api.create_dyno(&body).await.map_err(spawn_error)?;
            info!(dyno = %dyno.name, id = %dyno.id, "runner dyno created");
            let runner = DynoRunner {
                api: self.api.clone(),
                id: dyno.id,
                name: dyno.name,
                watch_until: Instant::now() + self.settings.watch_for,
            };
            Ok(Box::new(runner) as Box<dyn RunnerProcess>)
        }
        .boxed()
    }

    fn adopt(&self, handle: &str) -> Option<Box<dyn RunnerProcess>> {
        let (id, name) = handle.strip_prefix("dyno:")?.split_once(':')?;
        // Its socket, not the API, tells whether it lives from here on.
        let runner =
            DynoRunner { api: self.api.clone(), id: id.to_owned(), name: name.to_owned(), watch_until: Instant::now() };
        Some(Box::new(runner))
    }

    fn sweep<'a>(&'a self, live: &'a super::Liveness) -> BoxFuture<'a, ()> {
        async move {
            let dynos = match self.api.list_dynos().await {
                Ok(dynos) => dynos,
                Err(e) => {
                    warn!("sweep skipped: {e}");
                    return;
                }
            };
            for dyno in dynos {
                let Some(session) = session_of(&dyno.command) else { continue };
                if matches!(dyno.state.as_str(), "down" | "crashed") || live(session.to_owned()).await {
                    continue;
                }
                info!(dyno = %dyno.name, session, "stopping an orphaned runner dyno");
                match self.api.stop_dyno(&dyno.id).await {
                    Ok(()) => crate::metrics::orphan_stopped(),
                    Err(e) => warn!(dyno = %dyno.name, "cannot stop orphaned runner dyno: {e}"),
                }
            }
        }
        .boxed()
    }
}

/// A runner dyno, as the session sees it.
struct DynoRunner {
    api: Api,
    id: String,
    name: String,
    /// After this (or once the runner has connected), the socket alone tells
    /// whether the runner lives: polling every session's dyno forever would
    /// spend the account's API budget.
    watch_until: Instant,
}

impl RunnerProcess for DynoRunner {
    fn describe(&self) -> String {
        format!("dyno {} ({})", self.name, self.id)
    }

    fn handle(&self) -> String {
        format!("dyno:{}:{}", self.id, self.name)
    }

    fn follow_after_connect(&self) -> bool {
        false
    }

    fn exited(&mut self) -> BoxFuture<'_, String> {
        async move {
            let mut every = Duration::from_secs(2);
            while Instant::now() + every < self.watch_until {
                tokio::time::sleep(every).await;
                match self.api.dyno(&self.id).await {
                    Ok(dyno) if matches!(dyno.state.as_str(), "crashed" | "down") => {
                        return format!("dyno {} is {}", self.name, dyno.state);
                    }
                    Ok(_) => {}
                    Err(ApiError::Refused { status: 404, .. }) => return format!("dyno {} is gone", self.name),
                    Err(e) => warn!("cannot follow dyno {}: {e}", self.name),
                }
                every = (every * 2).min(Duration::from_secs(10));
            }
            std::future::pending().await
        }
        .boxed()
    }

    fn stop(self: Box<Self>, _grace: Duration) -> BoxFuture<'static, ()> {
        // The runner was told to shut down over its socket and would end the
        // dyno by exiting; stopping it as well costs one call and leaves
        // nothing to chance. Heroku sends SIGTERM, which the runner handles.
        async move {
            match self.api.stop_dyno(&self.id).await {
                Ok(()) => info!(dyno = %self.name, "runner dyno stopped"),
                Err(e) => warn!(dyno = %self.name, "cannot stop runner dyno (the sweeper will retry): {e}"),
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests;
