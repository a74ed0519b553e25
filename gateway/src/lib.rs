//! The dynogate gateway: an MCP endpoint that gives every session its own
//! runner.
//!
//! Modules, from the outside in:
//! - [`config`]: flags and environment, validated into [`config::Config`].
//! - [`auth`]: the API key and `Origin` checks.
//! - [`mcp`]: streamable HTTP (`/mcp`), built on [`jsonrpc`] (routing fields
//!   only), [`reply`] (JSON or SSE answers) and [`error`] (what clients see).
//! - [`sse`]: the older HTTP+SSE transport (`/sse`, `/messages/`); [`sse_encode`]:
//!   the SSE bytes of both transports.
//! - [`sessions`] and [`session`]: the session table and each session's task;
//!   [`streams`]: resumable SSE streams.
//! - [`rendezvous`] and [`link`]: where runners dial back, and the frames
//!   the session exchanges with them.
//! - [`spawn`]: how runners are started; [`token`]: their credentials;
//!   [`pool`]: runners started ahead of sessions; [`oneshot`]: one request
//!   on a runner of its own.
//! - [`registry`]: the MCP servers offered (the default and the Procfile's
//!   `mcp*` types) and their tools; [`agents`]: `/v1/agents/heroku`, an
//!   agent loop whose tool calls each run on a runner of their own.
//! - [`cluster`]: several instances sharing Redis (`REDIS_URL`): the
//!   session directory, one `MAX_SESSIONS`, and the relay to each session's
//!   owner.
//! - [`metrics`]: what the gateway counts, at `GET /metrics`; [`status`]:
//!   the status page at `GET /status`.
//! - [`server`]: binding, serving and shutting down; [`listen`]: accepting
//!   connections, with deadlines and caps; [`throttle`]: rate limits for log
//!   lines anyone can cause.

pub mod agents;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod error;
pub mod jsonrpc;
pub mod link;
pub mod listen;
pub mod mcp;
pub mod metrics;
pub mod oneshot;
pub mod pool;
pub mod registry;
pub mod rendezvous;
pub mod reply;
pub mod server;
pub mod session;
pub mod sessions;
pub mod spawn;
pub mod sse;
pub mod sse_encode;
pub mod status;
pub mod streams;
pub mod throttle;
pub mod token;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use url::Url;

pub use server::{app, main, serve};

/// What every handler can reach: one `Arc`, so the clones axum makes for
/// every request (and every middleware) cost one atomic increment.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The gateway's shared state.
pub struct Shared {
    pub config: Arc<config::Config>,
    pub api_key: Option<auth::ApiKey>,
    pub sessions: sessions::Sessions,
    pub spawner: Arc<dyn spawn::Spawner>,
    /// The model API of the agents endpoint (`INFERENCE_URL`).
    pub inference: Option<agents::inference::Upstream>,
    /// The MCP servers offered, and their tools.
    pub registry: registry::Registry,
    /// Sessions started ahead of clients (`WARM_RUNNERS`).
    pub pool: pool::Pool,
    pub tokens: token::RunnerTokens,
    /// Bytes of events kept across all sessions.
    pub budget: streams::Budget,
    /// Base URL runners dial back to; `None` when a public URL is needed and
    /// was not configured (sessions are then refused with the fix).
    pub runner_url: Option<Url>,
    /// Cancelled on SIGTERM: no new sessions or requests, in-flight ones finish.
    pub draining: CancellationToken,
    /// Cancelled when the drain is over: every session ends.
    pub shutdown: CancellationToken,
    /// This instance's part in a cluster sharing Redis; `None` without `REDIS_URL`.
    pub cluster: Option<Arc<cluster::Cluster>>,
    /// Every session task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// When the gateway started serving.
    pub started: tokio::time::Instant,
}

impl Shared {
    pub fn reply_timing(&self) -> reply::ReplyTiming {
        reply::ReplyTiming {
            stream_after: self.config.timeouts.reply_stream_after,
            keepalive: self.config.timeouts.heartbeat,
        }
    }
}
