//! Binding, serving and shutting down.
//!
//! [`app`] builds the router from a state (tests call it without a socket);
//! [`serve`] runs it on a listener (through [`crate::listen`], which bounds
//! connections) until its drain token fires, then drains
//! and ends every session (runners told to stop, processes reaped) inside
//! Heroku's 30 s; [`main`] is the binary: configuration, logging, signals.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, warn};

use crate::config::{Args, Config, SpawnerKind};
use crate::listen::{self, caps::Caps};
use crate::spawn::heroku::HerokuSettings;
use crate::spawn::heroku::api::{Api, RetryPolicy};
use crate::spawn::{HerokuSpawner, LocalSpawner, Spawner};
use crate::{AppState, agents, auth, mcp, registry, rendezvous, sse};

/// The gateway's routes.
pub fn app(state: AppState) -> Router {
    let mcp_routes = axum::routing::post(mcp::post).get(mcp::get).delete(mcp::delete);
    let messages = axum::routing::post(sse::message);
    let sessions = Router::new()
        .route("/mcp", mcp_routes.clone())
        .route("/mcp/", mcp_routes)
        .route("/mcp/{name}", axum::routing::post(mcp::post_on).get(mcp::get_on).delete(mcp::delete_on))
        .route("/v1/mcp/servers", get(registry::list))
        .route("/metrics", get(crate::metrics::scrape))
        .route("/v1/status", get(crate::status::data))
        .route(
            "/v1/agents/heroku",
            // A conversation can be long: the same bound as an MCP body, not axum's 2 MB.
            axum::routing::post(agents::post)
                .layer(axum::extract::DefaultBodyLimit::max(state.config.limits.max_body_bytes)),
        )
        .route("/sse", get(sse::open))
        .route("/messages", messages.clone())
        .route("/messages/", messages);
    // Only with instances sharing Redis, so one instance pays nothing for it.
    // After the checks below: a relayed request was checked where it arrived.
    let sessions = match state.cluster {
        Some(_) => sessions.route_layer(middleware::from_fn_with_state(state.clone(), crate::cluster::relay::route)),
        None => sessions,
    };
    sessions
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::check_origin))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_api_key))
        .route(dynogate_shared::names::RENDEZVOUS_PATH, get(rendezvous::accept))
        .route("/status", get(crate::status::page))
        .route("/status/page.js", get(crate::status::script))
        .route("/status/page.css", get(crate::status::style))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(middleware::from_fn(request_span))
        .with_state(state)
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let status = if state.draining.is_cancelled() { "draining" } else { "ok" };
    axum::Json(serde_json::json!({
        "status": status,
        "sessions": state.sessions.claimed(),
        "in_flight": state.sessions.in_flight(),
        "pool": state.pool.status(),
        "instance": state.cluster.as_ref().map(|cluster| cluster.instance.clone()),
    }))
}

/// Readiness: 200 only while new sessions can start (not draining, a URL
/// for runners to dial, the spawner admitting); else 503 with the reason.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let refusal = if state.draining.is_cancelled() {
        Some("draining".to_owned())
    } else if state.runner_url.is_none() {
        Some(crate::config::NO_PUBLIC_URL.to_owned())
    } else {
        state.spawner.admit().err()
    };
    let status = if refusal.is_some() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    let body = match refusal {
        None => serde_json::json!({"ready": true}),
        Some(reason) => serde_json::json!({"ready": false, "reason": reason}),
    };
    (status, axum::Json(body))
}

/// One span per HTTP request, named by method and path (never headers).
/// With traces exported, the span is exported too, as a child of the
/// client's `traceparent` header when it sends one; except for the paths
/// that are polled (probes, scrapes, the status page's every second), which
/// would bury the traces that matter.
async fn request_span(request: Request, next: Next) -> Response {
    const POLLED: [&str; 4] = ["/healthz", "/readyz", "/metrics", "/v1/status"];
    let path = request.uri().path();
    let polled = POLLED.contains(&path) || path.starts_with("/status");
    let span = if dynogate_telemetry::enabled() && !polled {
        let span = tracing::info_span!("http", method = %request.method(), path = %request.uri().path());
        if let Some(parent) =
            request.headers().get(dynogate_telemetry::TRACEPARENT).and_then(|value| value.to_str().ok())
        {
            dynogate_telemetry::set_parent(&span, parent);
        }
        span
    } else {
        tracing::debug_span!("http", method = %request.method(), path = %request.uri().path())
    };
    next.run(request).instrument(span).await
}

/// Serves on `listener` until `drain` fires (SIGTERM), then drains: no new
/// sessions or requests, requests in flight get up to `DRAIN_TIMEOUT` to
/// finish, then every session ends (runners told to stop, dynos stopped).
pub async fn serve(config: Config, listener: TcpListener, drain: CancellationToken) -> anyhow::Result<()> {
    start(config, listener, drain).await?.finished().await
}

/// A gateway serving in this process; see [`start`].
pub struct Running {
    /// What its handlers share: in-process callers (the single-request API,
    /// tests) use it directly.
    pub state: AppState,
    /// Where `/metrics` is served without the key (METRICS_PORT).
    pub metrics: Option<SocketAddr>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Resolves when the gateway has drained and ended every session.
    pub async fn finished(self) -> anyhow::Result<()> {
        self.done.await.context("the gateway's task failed")?
    }
}

/// Starts serving on `listener` and returns at once; see [`serve`].
pub async fn start(config: Config, listener: TcpListener, drain: CancellationToken) -> anyhow::Result<Running> {
    let bound = listener.local_addr().context("listener has no address")?;
    crate::metrics::handle();
    let spawner = build_spawner(&config)?;
    let learned_url = spawner.prepare().await?;
    // A token must outlive the wait for a runner's first dial or its redial,
    // plus slack; sessions hand their runner a fresh one well before expiry.
    let token_ttl = config.timeouts.dial_back.max(config.timeouts.reconnect_grace) + std::time::Duration::from_secs(60);
    let inference = config.inference.clone().map(crate::agents::inference::Upstream::new).transpose()?;
    let cluster = match &config.redis_url {
        Some(url) => Some(crate::cluster::Cluster::new(url, config.limits.max_sessions)?),
        None => None,
    };
    let state = AppState::new(crate::Shared {
        inference,
        runner_url: config.runner_base_url(bound).or(learned_url),
        api_key: config.api_key.as_ref().map(auth::ApiKey::new),
        sessions: crate::sessions::Sessions::new(config.limits.max_sessions, cluster.clone()),
        cluster,
        spawner,
        pool: crate::pool::Pool::new(config.pool.clone()),
        registry: crate::registry::Registry::new(config.runner_command.as_deref(), config.procfile.as_deref()),
        tokens: crate::token::RunnerTokens::new(&config.rendezvous_secret, token_ttl),
        budget: crate::streams::Budget::new(config.limits.buffer_bytes, config.limits.stream_buffer_bytes),
        draining: drain.clone(),
        shutdown: CancellationToken::new(),
        tracker: TaskTracker::new(),
        started: tokio::time::Instant::now(),
        config: Arc::new(config),
    });
    match &state.runner_url {
        None => warn!("{}", crate::config::NO_PUBLIC_URL),
        Some(url) => info!(%url, "runners dial back to this URL"),
    }
    let tracker = state.tracker.clone();
    if let Some(heroku) = &state.config.heroku {
        tracker.spawn(sweep(state.clone(), heroku.sweep_interval));
    }
    let mut cluster_task = None;
    if let Some(cluster) = &state.cluster {
        info!(instance = %cluster.instance, "sharing sessions with other instances through Redis");
        // Known alive before any session of ours is seen by the others.
        if let Err(e) = cluster.beat(true).await {
            warn!("Redis is unreachable at start-up ({e}); new sessions wait for it");
        }
        cluster_task = Some(tokio::spawn(crate::cluster::run(state.clone(), cluster.clone())));
        // And listening, so that requests it relays can be answered.
        if !cluster.inbox.until_listening(crate::cluster::COMMAND_TIMEOUT).await {
            warn!("not yet listening on Redis; requests for other instances' sessions wait for it");
        }
    }
    tracker.spawn(crate::pool::refill(state.clone()));
    if state.config.discover_servers == crate::config::Discovery::Start {
        let state = state.clone();
        tracker.spawn(async move {
            tokio::select! {
                () = state.registry.discover_all(&state) => {}
                () = state.shutdown.cancelled() => {}
            }
        });
    }
    let timeouts = state.config.timeouts.clone();
    let sessions = state.sessions.clone();
    let shutdown = state.shutdown.clone();
    let settings = listen_settings(&state.config);
    // New connections stop with the drain; open ones (and their streams) go on.
    let metrics = match state.config.metrics_listen {
        Some(addr) => Some(serve_metrics(&state, addr).await?),
        None => None,
    };
    let server = tokio::spawn(listen::serve(listener, app(state.clone()), settings, drain.clone()));
    let cluster = state.cluster.clone().zip(cluster_task);
    let done = tokio::spawn(wind_down(server, sessions, cluster, timeouts, tracker, shutdown, drain));
    Ok(Running { state, metrics, done })
}

/// `GET /metrics` without the API key on a port of its own (METRICS_PORT),
/// until the gateway has ended its sessions, so a last scrape sees the drain.
async fn serve_metrics(state: &AppState, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (METRICS_PORT)"))?;
    let bound = listener.local_addr()?;
    info!("metrics served on http://{bound}/metrics");
    // Machine-readable, as the gateway's own address is.
    println!("dynogate metrics listening on http://{bound}");
    let app = Router::new().route("/metrics", get(crate::metrics::scrape)).with_state(state.clone());
    let stop = state.shutdown.clone();
    state.tracker.spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
        if let Err(e) = served {
            warn!("the metrics listener failed: {e}");
        }
    });
    Ok(bound)
}

/// Waits for the drain, lets requests in flight finish, then ends every
/// session and waits (bounded) for their runners to be gone.
async fn wind_down(
    server: tokio::task::JoinHandle<()>,
    sessions: crate::sessions::Sessions,
    cluster: Option<(Arc<crate::cluster::Cluster>, tokio::task::JoinHandle<()>)>,
    timeouts: crate::config::Timeouts,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    drain: CancellationToken,
) -> anyhow::Result<()> {
    drain.cancelled().await;
    if let Some((cluster, _)) = &cluster {
        hand_over(&sessions, cluster, &timeouts).await;
    }
    let waiting = sessions.in_flight();
    info!(sessions = sessions.len(), requests = waiting, "draining: letting requests in flight finish");
    let drained = tokio::time::timeout(timeouts.drain, async {
        while sessions.in_flight() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    if drained.is_err() {
        warn!(
            requests = sessions.in_flight(),
            "drain deadline of {:?} passed; ending sessions with requests in flight", timeouts.drain
        );
    }
    info!("ending sessions");
    shutdown.cancel();
    tracker.close();
    let ended = tokio::time::timeout(timeouts.teardown, async {
        tracker.wait().await;
        server.await
    })
    .await;
    // Only now does the instance leave: until here it answered relays for
    // sessions it no longer has ("not here"), so no asker waited in vain.
    if let Some((cluster, task)) = cluster {
        cluster.stopped.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), task).await;
    }
    match ended {
        Ok(Ok(())) => Ok(()),
        Ok(Err(join)) => Err(anyhow::anyhow!("server task failed: {join}")),
        Err(_) => {
            warn!("sessions still ending after {:?}; exiting", timeouts.teardown);
            Ok(())
        }
    }
}

/// With instances sharing Redis: hands every session to another instance
/// (each goes once nothing of it is in flight, or at the drain deadline) and
/// waits, as long, for the requests this instance relays elsewhere.
async fn hand_over(
    sessions: &crate::sessions::Sessions,
    cluster: &crate::cluster::Cluster,
    timeouts: &crate::config::Timeouts,
) {
    info!(sessions = sessions.len(), relays = cluster.relays(), "handing sessions over to other instances");
    // Within the drain; the teardown after it keeps all inside Heroku's 30 s.
    let handed = tokio::time::timeout(timeouts.drain, async {
        while !sessions.is_empty() || cluster.relays() > 0 {
            // Again each round: a session may have started, or been taken
            // over, just as the drain began.
            for handle in sessions.handles() {
                if !handle.is_handing_over() {
                    handle.hand_over();
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    if handed.is_err() {
        warn!(sessions = sessions.len(), relays = cluster.relays(), "not every session was handed over in time");
    }
}

/// Connection deadlines and caps, the caps lowered if the open-files limit
/// could not hold them.
fn listen_settings(config: &Config) -> listen::Settings {
    let connections = &config.connections;
    let wanted = Caps { total: connections.max, per_ip: connections.max_per_ip };
    let limit = listen::open_files_limit();
    // Besides client connections: a runner's socket (upgraded, so outside
    // the caps) and its process's pipes per session, plus the listener,
    // logs and outbound API connections.
    let others = 64 + 4 * config.limits.max_sessions as u64;
    let caps = listen::fit_caps(wanted, limit, others);
    if caps != wanted {
        warn!(
            limit,
            max_connections = caps.total,
            max_connections_per_ip = caps.per_ip,
            "the open-files limit cannot hold MAX_CONNECTIONS; lowered (raise `ulimit -n` to keep them)"
        );
    }
    listen::Settings {
        header_read: connections.header_read,
        body_read: connections.body_read,
        idle: connections.idle,
        caps,
    }
}

/// The runner's path as a dyno's command names it: relative to the app's
/// root (the working directory of every dyno) when it is inside it, so the
/// same command works where the slug is `/app` and where it is `/workspace`.
fn dyno_path(runner_bin: &std::path::Path) -> String {
    let relative = std::env::current_dir().ok().and_then(|cwd| runner_bin.strip_prefix(cwd).ok().map(|p| p.to_owned()));
    match relative {
        Some(inside) => format!("./{}", inside.display()),
        None => runner_bin.display().to_string(),
    }
}

fn build_spawner(config: &Config) -> anyhow::Result<Arc<dyn Spawner>> {
    Ok(match (config.spawner, &config.heroku) {
        (SpawnerKind::Heroku, Some(heroku)) => {
            let api = Api::new(
                heroku.api_url.clone(),
                heroku.api_key.clone(),
                heroku.app_name.clone(),
                RetryPolicy::default(),
            )?;
            let runners = api.for_app(&heroku.runner_app);
            let settings = HerokuSettings {
                runner_bin: dyno_path(&config.runner_bin),
                runner_command: config.runner_command.clone(),
                size: Some(heroku.dyno_size.clone()),
                ttl: heroku.dyno_ttl,
                rate_limit_reserve: heroku.rate_limit_reserve,
                watch_for: config.timeouts.dial_back,
                trace_env: dynogate_telemetry::runner_env(),
            };
            Arc::new(HerokuSpawner::new(runners, api, settings))
        }
        _ => Arc::new(LocalSpawner::new(
            config.runner_bin.clone(),
            config.runner_command.clone(),
            config.sandbox,
            config.redis_url.is_some(),
        )),
    })
}

/// Stops runners that outlived their sessions: once at start-up (a previous
/// gateway may have died with dynos running), then every `interval`.
async fn sweep(state: AppState, interval: std::time::Duration) {
    let (sessions, cluster) = (state.sessions.clone(), state.cluster.clone());
    // The pool's runners are live too; with instances sharing Redis, so are
    // the sessions of the others, and an unanswered question means live.
    let live = move |id: String| -> futures_util::future::BoxFuture<'static, bool> {
        let (local, cluster) = (sessions.get_any(&id).is_some(), cluster.clone());
        Box::pin(async move {
            match cluster {
                _ if local => true,
                None => false,
                Some(cluster) => cluster.knows(&id).await.unwrap_or(true),
            }
        })
    };
    loop {
        // One instance at a time sweeps: the one holding the lease.
        let turn = match &state.cluster {
            None => true,
            Some(cluster) => match cluster.hold_lease(crate::cluster::keys::SWEEPER_LEASE, interval * 2).await {
                Ok(held) => held,
                Err(e) => {
                    warn!("orphan sweep skipped: {e}");
                    false
                }
            },
        };
        if turn {
            state.spawner.sweep(&live).await;
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = state.shutdown.cancelled() => return,
        }
    }
}

/// The `gateway` binary.
pub fn main() -> anyhow::Result<()> {
    let mut config = Args::parse().validate()?;
    // The one TLS backend compiled in (ring); installing it up front makes
    // every client (Platform API, the trace exporter) agree on it.
    let _ = rustls::crypto::ring::default_provider().install_default();
    dynogate_telemetry::init("dynogate-gateway", "info", true)?;
    let open_files = listen::raise_open_files_limit();
    tracing::debug!(open_files, "open-files limit");
    // Runners' code runs as the same user on a laptop: keep it out of this
    // process's environment (API_KEY, RENDEZVOUS_SECRET) and memory. Holds
    // for unprivileged users; root can read anything.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!("cannot make the gateway non-dumpable: {e}");
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = config.worker_threads {
        runtime.worker_threads(threads);
    }
    let runtime = runtime.enable_all().build().context("cannot start the async runtime")?;
    let served = runtime.block_on(async move {
        // Before listening: a gateway that must not serve says so and exits.
        config.sandbox = match config.spawner {
            SpawnerKind::Local => {
                let public = !config.listen.ip().is_loopback();
                crate::spawn::sandbox::decide(&config.runner_bin, config.sandbox, public, config.allow_unsandboxed)
                    .await?
            }
            // A dyno is a machine of its own.
            SpawnerKind::Heroku => dynogate_shared::sandbox::Mode::Off,
        };
        if config.spawner == SpawnerKind::Local && config.runner_command.is_none() {
            crate::spawn::tools::obtain_uv(&config.runner_bin).await;
        }
        let listener = match TcpListener::bind(config.listen).await {
            Ok(listener) => listener,
            // A machine without IPv6 still serves IPv4 on the default bind.
            Err(e) if config.listen.ip() == IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) => {
                warn!("cannot listen on {} ({e}); listening on IPv4 only", config.listen);
                let v4 = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), config.listen.port());
                TcpListener::bind(v4).await.with_context(|| format!("cannot listen on {v4}"))?
            }
            Err(e) => return Err(e).with_context(|| format!("cannot listen on {}", config.listen)),
        };
        let bound: SocketAddr = listener.local_addr()?;
        info!(
            auth = if config.api_key.is_some() { "api key" } else { "none (loopback only)" },
            spawner = ?config.spawner,
            "gateway listening on http://{bound}"
        );
        // Machine-readable, for scripts and tests that start the gateway on port 0.
        println!("dynogate gateway listening on http://{bound}");
        let shutdown = CancellationToken::new();
        tokio::spawn(signal_shutdown(shutdown.clone()));
        serve(config, listener, shutdown).await
    });
    // The last sessions' spans, ended during the drain.
    dynogate_telemetry::flush();
    served
}

/// Cancels `shutdown` on SIGTERM (what Heroku sends) or ctrl-c.
async fn signal_shutdown(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => info!("interrupt received"),
    }
    shutdown.cancel();
}
