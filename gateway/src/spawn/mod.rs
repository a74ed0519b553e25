//! Spawners start the runner that serves one session.
//!
//! A spawner only starts a process somewhere and can later stop it; the
//! runner then dials back to `/rendezvous` by itself. That split keeps the
//! spawners small and lets the session code treat a child process on this
//! machine and a Heroku dyno alike.
//!
//! - [`local`]: `runner --local` as a child process in its own process group.
//! - [`heroku`]: a one-off dyno per session through the Platform API.
//! - [`sandbox`]: what confines local runners' sessions, decided at start-up.
//! - [`tools`]: the tools local sessions use (uv), obtained at start-up.

pub mod heroku;
pub mod local;
pub mod sandbox;
pub mod tools;

use std::sync::Arc;
use std::time::Duration;

use dynogate_shared::Secret;
use futures_util::future::BoxFuture;
use url::Url;

pub use heroku::HerokuSpawner;
pub use local::LocalSpawner;

/// What a runner needs to find its way back.
#[derive(Debug, Clone)]
pub struct RunnerSpec {
    /// The MCP session the runner serves.
    pub session: String,
    /// The runner's signed rendezvous token.
    pub token: Secret,
    /// Base URL of the gateway the runner dials.
    pub gateway_url: Url,
    /// What this runner is for, beyond the defaults.
    pub launch: Launch,
    /// The context of the session's `spawn` span, when traces are exported:
    /// the runner's start-up joins the session's trace.
    pub traceparent: Option<String>,
}

/// A runner's server and size, where they differ from the gateway's
/// defaults: a registered server's session (`/mcp/{name}`), or a tool call
/// of the agents API that names a dyno size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Launch {
    /// The stdio MCP server to bridge; `None` for the default (`RUNNER_COMMAND`,
    /// else the built-in executor).
    pub server: Option<ServerChoice>,
    /// The dyno size (Heroku), instead of `DYNO_SIZE`.
    pub size: Option<String>,
}

impl Launch {
    pub fn is_default(&self) -> bool {
        *self == Launch::default()
    }
}

/// A registered MCP server: its name (the registry's namespace) and the
/// shell command that starts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerChoice {
    pub name: Arc<str>,
    pub command: String,
}

/// Why a runner could not be started. The message reaches the client.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("could not start the runner: {0}")]
    Start(String),
}

/// Whether a session is live anywhere (answered `true` when unsure: a
/// runner is never stopped on a guess).
pub type Liveness = dyn Fn(String) -> BoxFuture<'static, bool> + Send + Sync;

/// Starts runners.
pub trait Spawner: Send + Sync + 'static {
    /// Gets ready to start runners, once, before the gateway serves: an
    /// error stops the gateway with its message. Returns the gateway's public
    /// URL when the spawner learned it (Heroku's `web_url`).
    fn prepare(&self) -> BoxFuture<'_, anyhow::Result<Option<Url>>> {
        Box::pin(std::future::ready(Ok(None)))
    }

    /// Whether a new session may start now; the message says why not.
    fn admit(&self) -> Result<(), String> {
        Ok(())
    }

    /// Platform API calls left in the budget, where there is one.
    fn budget_remaining(&self) -> Option<i64> {
        None
    }

    /// Stops runners this spawner started whose session `live` does not know
    /// (left behind by a crash or a failed stop), asking only after listing
    /// them, so a session registered meanwhile is known. Spawners whose
    /// runners cannot outlive the gateway do nothing.
    fn sweep<'a>(&'a self, live: &'a Liveness) -> BoxFuture<'a, ()> {
        let _ = live;
        Box::pin(std::future::ready(()))
    }

    /// Starts a runner for `spec`. Returns once the start has been requested;
    /// the runner dials back later (or never, which the session bounds).
    fn spawn(&self, spec: RunnerSpec) -> BoxFuture<'_, Result<Box<dyn RunnerProcess>, SpawnError>>;

    /// The runner another gateway instance started, from what its
    /// [`RunnerProcess::handle`] said, for a session taken over; `None` when
    /// the handle is not one of this spawner's.
    fn adopt(&self, handle: &str) -> Option<Box<dyn RunnerProcess>> {
        let _ = handle;
        None
    }
}

/// A started runner, as its spawner sees it.
pub trait RunnerProcess: Send {
    /// Short description for logs, such as `pid 4242`.
    fn describe(&self) -> String;

    /// Resolves when the runner has exited, with how it ended. Spawners that
    /// cannot observe an exit never resolve; the session then relies on the
    /// socket closing.
    fn exited(&mut self) -> BoxFuture<'_, String>;

    /// Whether [`RunnerProcess::exited`] is worth following once the runner
    /// has connected. A local process's exit is cheap to see and says more
    /// than a closed socket; a dyno's state costs a Platform API call per
    /// look, and the socket says the same.
    fn follow_after_connect(&self) -> bool {
        true
    }

    /// Ends the runner: waits up to `grace` for it to leave on its own (it has
    /// been told to shut down), then forces it, and resolves when it is gone.
    fn stop(self: Box<Self>, grace: Duration) -> BoxFuture<'static, ()>;

    /// What another gateway instance needs to take this runner over
    /// ([`Spawner::adopt`]).
    fn handle(&self) -> String;

    /// Lets the runner go on without this gateway: its session was handed
    /// to another instance, which will stop it in the end.
    fn release(self: Box<Self>) {}
}
