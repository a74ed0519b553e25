//! Configuration: flags that are also environment variables (Heroku config
//! vars), parsed once in `main` and validated into typed values here.
//!
//! [`Args`] is what the command line and environment say; [`Config`] is what
//! the gateway runs with. Everything a running gateway reads comes from
//! [`Config`]; nothing else looks at the environment.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use dynogate_shared::Secret;
use url::Url;

/// The session-based MCP revisions served over streamable HTTP.
pub const SERVED_REVISIONS: &[&str] = &["2025-03-26", "2025-06-18", "2025-11-25"];

/// dynogate gateway: an MCP endpoint that gives every session its own runner.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, about)]
pub struct Args {
    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "PORT", default_value_t = 8000)]
    pub port: u16,

    /// Serve `GET /metrics` on this port too, without the API key, for a
    /// scraper on a private network (0 picks a free one). Without it,
    /// `/metrics` is served on PORT behind the API key.
    #[arg(long, env = "METRICS_PORT")]
    pub metrics_port: Option<u16>,

    /// Address METRICS_PORT binds (e.g. a private interface's); defaults to
    /// BIND_ADDRESS's.
    #[arg(long, env = "METRICS_BIND")]
    pub metrics_bind: Option<IpAddr>,

    /// Address to bind. Defaults to `::` (IPv6 and IPv4, as Fir's web dynos
    /// require) when API_KEY is set, else 127.0.0.1.
    #[arg(long, env = "BIND_ADDRESS")]
    pub bind: Option<IpAddr>,

    /// Key clients must send as `Authorization: Bearer <key>` or `X-API-Key: <key>`.
    #[arg(long, env = "API_KEY", hide_env_values = true)]
    pub api_key: Option<Secret>,

    /// Serve a non-loopback address without API_KEY (anyone who can reach it can run code).
    #[arg(long, env = "ALLOW_UNAUTHENTICATED", default_value_t = false)]
    pub allow_unauthenticated: bool,

    /// Public base URL runners dial back to (default: this gateway's own listen address).
    #[arg(long, env = "GATEWAY_URL")]
    pub gateway_url: Option<Url>,

    /// Key that signs runner tokens (default: random at start-up). Set it when
    /// several gateway instances must accept each other's runners.
    #[arg(long, env = "RENDEZVOUS_SECRET", hide_env_values = true)]
    pub rendezvous_secret: Option<Secret>,

    /// Where runners run: `local` (child processes) or `heroku` (one-off dynos).
    /// Default: `heroku` when HEROKU_API_KEY and HEROKU_APP_NAME are set, else `local`.
    #[arg(long, env = "SPAWNER")]
    pub spawner: Option<SpawnerKind>,

    /// How local runners confine their sessions: `auto` (bubblewrap where it
    /// works, else unconfined and said loudly), `bwrap` (confined or the
    /// gateway does not start), `off`.
    #[arg(long, env = "SANDBOX", default_value = "auto", value_parser = str::parse::<dynogate_shared::sandbox::Mode>)]
    pub sandbox: dynogate_shared::sandbox::Mode,

    /// Serve a non-loopback address even though local sessions cannot be sandboxed.
    #[arg(long, env = "ALLOW_UNSANDBOXED", default_value_t = false)]
    pub allow_unsandboxed: bool,

    /// Path of the runner binary (default: `runner` beside this binary; on
    /// Heroku the same path inside the slug).
    #[arg(long, env = "RUNNER_BIN")]
    pub runner_bin: Option<PathBuf>,

    /// Platform API key of an account that may run dynos of HEROKU_APP_NAME.
    #[arg(long, env = "HEROKU_API_KEY", hide_env_values = true)]
    pub heroku_api_key: Option<Secret>,

    /// The gateway's own Heroku app (its slug is what runner dynos run).
    #[arg(long, env = "HEROKU_APP_NAME")]
    pub heroku_app_name: Option<String>,

    /// The app whose one-off dynos run the sessions, holding no config var
    /// (default: HEROKU_APP_NAME with `-run`, created if missing).
    #[arg(long, env = "HEROKU_RUNNER_APP")]
    pub heroku_runner_app: Option<String>,

    /// Let HEROKU_RUNNER_APP be the gateway's own app, whose config vars
    /// (API_KEY, HEROKU_API_KEY, …) every runner dyno then receives.
    #[arg(long, env = "ALLOW_SHARED_RUNNER_APP", default_value_t = false)]
    pub allow_shared_runner_app: bool,

    /// Base URL of the Platform API.
    #[arg(long, env = "HEROKU_API_URL", default_value = "https://api.heroku.com")]
    pub heroku_api_url: Url,

    /// The app's default domain (set by Heroku's dyno metadata); gives GATEWAY_URL when that is unset.
    #[arg(long, env = "HEROKU_APP_DEFAULT_DOMAIN_NAME")]
    pub heroku_app_domain: Option<String>,

    /// Size of runner dynos (e.g. `basic`, `standard-1x`, `standard-2x`).
    #[arg(long, env = "DYNO_SIZE", default_value = "standard-1x")]
    pub dyno_size: String,

    /// Hard limit on a runner dyno's life (Heroku's `time_to_live`, at most 24h).
    #[arg(long, env = "DYNO_TTL", default_value = "4h", value_parser = dynogate_shared::duration::parse)]
    pub dyno_ttl: Duration,

    /// Refuse new sessions when fewer Platform API calls than this remain in the account's budget.
    #[arg(long, env = "HEROKU_RATE_LIMIT_RESERVE", default_value_t = 100)]
    pub heroku_rate_limit_reserve: i64,

    /// How often to look for runner dynos that outlived their session.
    #[arg(long, env = "SWEEP_INTERVAL", default_value = "5m", value_parser = dynogate_shared::duration::parse)]
    pub sweep_interval: Duration,

    /// Stdio MCP server each runner bridges, as a shell command (default: the built-in code executor).
    #[arg(long, env = "RUNNER_COMMAND")]
    pub runner_command: Option<String>,

    /// The app's Procfile: its `mcp*` process types are offered as MCP
    /// servers (`/mcp/{name}`, `GET /v1/mcp/servers`, the agents API's `mcp` tools).
    #[arg(long, env = "PROCFILE", default_value = "Procfile")]
    pub procfile: PathBuf,

    /// When the servers' tools are first listed: `start` (each server is
    /// started once at start-up) or `on-demand` (when first wanted).
    #[arg(long, env = "DISCOVER_SERVERS", default_value = "start")]
    pub discover_servers: Discovery,

    /// Base URL of an OpenAI-compatible chat-completions API for the agents
    /// endpoint (Heroku's inference add-on sets it; also OpenAI, Ollama, vLLM).
    #[arg(long, env = "INFERENCE_URL")]
    pub inference_url: Option<Url>,

    /// Bearer key for INFERENCE_URL.
    #[arg(long, env = "INFERENCE_KEY", hide_env_values = true)]
    pub inference_key: Option<Secret>,

    /// Model used when an agents request names none.
    #[arg(long, env = "INFERENCE_MODEL_ID")]
    pub inference_model_id: Option<String>,

    /// Longest one model call may take.
    #[arg(long, env = "INFERENCE_TIMEOUT", default_value = "120s", value_parser = dynogate_shared::duration::parse)]
    pub inference_timeout: Duration,

    /// Runners kept started and warm, ready for the next sessions (default:
    /// 2 with local runners; 0 on Heroku, where each is a dyno billed while it waits).
    #[arg(long, env = "WARM_RUNNERS")]
    pub warm_runners: Option<usize>,

    /// A warm runner no session claimed in this long is replaced by a fresh one.
    #[arg(long, env = "WARM_RUNNER_MAX_AGE", default_value = "30m", value_parser = dynogate_shared::duration::parse)]
    pub warm_runner_max_age: Duration,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Bytes of messages one SSE stream keeps for its reader and for
    /// resumption (at least 16 MiB, the largest message); past it, what a
    /// reader already has goes first, then notifications.
    #[arg(long, env = "STREAM_BUFFER_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub stream_buffer_bytes: usize,

    /// Bytes of messages the gateway keeps across all sessions; past it,
    /// events kept only for resumption are dropped first.
    #[arg(long, env = "BUFFER_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub buffer_bytes: usize,

    /// Most sessions alive at once; the next `initialize` gets 503.
    #[arg(long, env = "MAX_SESSIONS", default_value_t = 50)]
    pub max_sessions: usize,

    /// Most connections open at once; past it (and a reserve of an eighth
    /// for /healthz and runners dialing back) new connections get 503.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Most connections open at once from one client address (IPv6: one /64).
    /// Behind a proxy or Heroku's router, the address is the router's.
    #[arg(long, env = "MAX_CONNECTIONS_PER_IP", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_ip: u32,

    /// A connection must send a whole request head within this long of
    /// opening (or of starting it after an idle spell), or it is closed.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "10s", value_parser = dynogate_shared::duration::parse)]
    pub header_read_timeout: Duration,

    /// A request body must arrive within this long, or the request gets 408.
    #[arg(long, env = "BODY_READ_TIMEOUT", default_value = "30s", value_parser = dynogate_shared::duration::parse)]
    pub body_read_timeout: Duration,

    /// A keep-alive connection with no request for this long is closed
    /// (longer than Heroku's router keeps idle connections, 90s, so the
    /// router always closes first and never sends on a closing connection).
    #[arg(long, env = "IDLE_CONNECTION_TIMEOUT", default_value = "95s", value_parser = dynogate_shared::duration::parse)]
    pub idle_connection_timeout: Duration,

    /// How long a new runner has to dial back (e.g. `30s`).
    #[arg(long, env = "DIAL_BACK_TIMEOUT", default_value = "30s", value_parser = dynogate_shared::duration::parse)]
    pub dial_back_timeout: Duration,

    /// A session with no client request for this long ends (e.g. `15m`).
    #[arg(long, env = "SESSION_IDLE_TIMEOUT", default_value = "15m", value_parser = dynogate_shared::duration::parse)]
    pub idle_timeout: Duration,

    /// Longest a single request may wait for its response (e.g. `10m`).
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "10m", value_parser = dynogate_shared::duration::parse)]
    pub request_timeout: Duration,

    /// A reply not ready within this long is streamed as SSE (priming event and
    /// keepalives) instead of one JSON body, so proxies see bytes early.
    #[arg(long, env = "REPLY_STREAM_AFTER", default_value = "1s", value_parser = dynogate_shared::duration::parse)]
    pub reply_stream_after: Duration,

    /// How long a session waits for a runner whose socket dropped to dial again.
    #[arg(long, env = "RUNNER_RECONNECT_GRACE", default_value = "60s", value_parser = dynogate_shared::duration::parse)]
    pub reconnect_grace: Duration,

    /// On SIGTERM, how long requests in flight get to finish before sessions
    /// end (Heroku kills the dyno 30s after SIGTERM).
    #[arg(long, env = "DRAIN_TIMEOUT", default_value = "20s", value_parser = dynogate_shared::duration::parse)]
    pub drain_timeout: Duration,

    /// Browser origins allowed to call the MCP endpoints, comma-separated
    /// (`*` for any). Loopback origins are always allowed; requests without
    /// an `Origin` header (non-browser clients) are not affected.
    #[arg(long, env = "ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Interval of WebSocket pings to runners and of SSE keepalive comments (at most 25s).
    #[arg(long, env = "HEARTBEAT_INTERVAL", default_value = "20s", value_parser = dynogate_shared::duration::parse)]
    pub heartbeat: Duration,

    /// Threads serving requests (default: one per CPU). With local runners
    /// on a small machine, one thread spares each call the hand-offs between
    /// threads (lower latency) at some cost in peak throughput.
    #[arg(long, env = "WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: Option<u16>,

    /// Redis (`redis://` or `rediss://`) shared by several gateway instances:
    /// the session directory, `MAX_SESSIONS` across them, and the relay that
    /// lets any instance serve any session. Unset: one instance, state in memory.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<Secret>,
}

/// When the registered servers' tools are first listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Discovery {
    Start,
    OnDemand,
}

/// The model upstream of the agents endpoint.
#[derive(Debug, Clone)]
pub struct Inference {
    pub url: Url,
    pub key: Option<Secret>,
    pub model: Option<String>,
    pub timeout: Duration,
}

/// Which spawner starts runners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SpawnerKind {
    Local,
    Heroku,
}

/// The Heroku spawner's settings.
#[derive(Debug, Clone)]
pub struct Heroku {
    pub api_key: Secret,
    pub app_name: String,
    /// Where runner dynos run.
    pub runner_app: String,
    pub api_url: Url,
    pub dyno_size: String,
    pub dyno_ttl: Duration,
    pub rate_limit_reserve: i64,
    pub sweep_interval: Duration,
}

/// The validated configuration the gateway runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Where `/metrics` is also served without the key (METRICS_PORT).
    pub metrics_listen: Option<SocketAddr>,
    pub api_key: Option<Secret>,
    /// Set when the operator gave GATEWAY_URL; otherwise derived from the
    /// bound address once the listener exists (see [`Config::runner_base_url`]).
    pub gateway_url: Option<Url>,
    pub rendezvous_secret: Secret,
    pub spawner: SpawnerKind,
    pub runner_bin: PathBuf,
    /// What the operator asked for; at start-up, what was decided
    /// ([`crate::spawn::sandbox::decide`]): `Bwrap` or `Off`.
    pub sandbox: dynogate_shared::sandbox::Mode,
    pub allow_unsandboxed: bool,
    /// Set when `spawner` is Heroku.
    pub heroku: Option<Heroku>,
    pub runner_command: Option<String>,
    /// The Procfile's text, when there is one.
    pub procfile: Option<String>,
    pub discover_servers: Discovery,
    /// `None` without INFERENCE_URL: the agents endpoint then says so.
    pub inference: Option<Inference>,
    pub pool: PoolSettings,
    pub limits: Limits,
    pub connections: Connections,
    pub timeouts: Timeouts,
    /// Extra browser origins allowed (`*` allows any).
    pub allowed_origins: Vec<String>,
    /// Async runtime threads; `None` for one per CPU.
    pub worker_threads: Option<usize>,
    /// Shared state of several instances (REDIS_URL); `None` for one instance.
    pub redis_url: Option<Secret>,
}

/// The warm pool's settings.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Runners to keep ready; 0 for no pool.
    pub size: usize,
    pub max_age: Duration,
}

/// Size and count limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub stream_buffer_bytes: usize,
    pub buffer_bytes: usize,
    pub max_sessions: usize,
}

/// How client connections are bounded (see [`crate::listen`]).
#[derive(Debug, Clone)]
pub struct Connections {
    /// Most open at once, in all.
    pub max: usize,
    /// Most open at once from one client address.
    pub max_per_ip: usize,
    /// How long a connection has to send a whole request head.
    pub header_read: Duration,
    /// How long a request body has to arrive.
    pub body_read: Duration,
    /// How long a keep-alive connection may wait for its next request.
    pub idle: Duration,
}

/// Every bounded wait in the gateway.
#[derive(Debug, Clone)]
pub struct Timeouts {
    pub dial_back: Duration,
    pub idle: Duration,
    pub request: Duration,
    pub reply_stream_after: Duration,
    pub heartbeat: Duration,
    /// How long a runner gets to stop by itself before its process group is killed.
    pub runner_stop_grace: Duration,
    /// How long a detached runner has to dial again.
    pub reconnect_grace: Duration,
    /// How long requests in flight get to finish on SIGTERM.
    pub drain: Duration,
    /// After the drain, how long ending the sessions may take.
    pub teardown: Duration,
}

impl Args {
    /// Checks the arguments and turns them into a [`Config`].
    pub fn validate(self) -> anyhow::Result<Config> {
        let bind = self.bind.unwrap_or(if self.api_key.is_some() {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        });
        if self.api_key.is_none() && !bind.is_loopback() && !self.allow_unauthenticated {
            bail!(
                "refusing to listen on {bind} without API_KEY: anyone who can reach this address could run code. \
                 Set API_KEY (clients then send `Authorization: Bearer <key>`), bind 127.0.0.1, \
                 or pass --allow-unauthenticated (ALLOW_UNAUTHENTICATED=true) if the network is trusted"
            );
        }
        if let Some(key) = &self.api_key
            && key.expose().trim().is_empty()
        {
            bail!("API_KEY is set but empty");
        }
        if self.reply_stream_after > Duration::from_secs(25) {
            bail!(
                "REPLY_STREAM_AFTER must be at most 25s: Heroku's router answers H12 to a request whose \
                 response has not started within 30s"
            );
        }
        if self.heartbeat.is_zero() || self.heartbeat > Duration::from_secs(25) {
            bail!("HEARTBEAT_INTERVAL must be between 1ms and 25s (Heroku's router drops connections silent for 55s)");
        }
        if self.drain_timeout > Duration::from_secs(22) {
            bail!("DRAIN_TIMEOUT must be at most 22s, so sessions still end cleanly inside Heroku's 30s");
        }
        for (name, value) in [
            ("RUNNER_RECONNECT_GRACE", self.reconnect_grace),
            ("DIAL_BACK_TIMEOUT", self.dial_back_timeout),
            ("SESSION_IDLE_TIMEOUT", self.idle_timeout),
            ("REQUEST_TIMEOUT", self.request_timeout),
            ("HEADER_READ_TIMEOUT", self.header_read_timeout),
            ("BODY_READ_TIMEOUT", self.body_read_timeout),
            ("IDLE_CONNECTION_TIMEOUT", self.idle_connection_timeout),
        ] {
            if value.is_zero() {
                bail!("{name} must be greater than zero");
            }
        }
        if let Some(url) = &self.gateway_url
            && !matches!(url.scheme(), "http" | "https" | "ws" | "wss")
        {
            bail!("GATEWAY_URL must be an http(s) or ws(s) URL, got {url}");
        }
        if self.redis_url.is_some() && self.rendezvous_secret.is_none() {
            bail!(
                "REDIS_URL needs RENDEZVOUS_SECRET: every instance must verify the tokens the others give their \
                 runners (set the same value of at least 32 characters on all of them)"
            );
        }
        let rendezvous_secret = match self.rendezvous_secret {
            Some(secret) if secret.expose().len() < 32 => {
                bail!("RENDEZVOUS_SECRET must be at least 32 characters")
            }
            Some(secret) => secret,
            None => random_secret()?,
        };
        let spawner = self.spawner.unwrap_or(if self.heroku_api_key.is_some() && self.heroku_app_name.is_some() {
            SpawnerKind::Heroku
        } else {
            SpawnerKind::Local
        });
        if spawner == SpawnerKind::Heroku && self.api_key.is_none() && self.bind.is_none() {
            bail!(
                "SPAWNER=heroku needs API_KEY: without it the gateway listens on 127.0.0.1 only, which Heroku's \
                 router cannot reach (the web dyno would fail with R10). Set API_KEY (clients then send \
                 `Authorization: Bearer <key>`)"
            );
        }
        let heroku = match spawner {
            SpawnerKind::Local => None,
            SpawnerKind::Heroku => Some(Heroku {
                api_key: self.heroku_api_key.context("SPAWNER=heroku needs HEROKU_API_KEY")?,
                runner_app: runner_app(
                    self.heroku_app_name.as_deref(),
                    self.heroku_runner_app.as_deref(),
                    self.allow_shared_runner_app,
                )?,
                app_name: self.heroku_app_name.context("SPAWNER=heroku needs HEROKU_APP_NAME")?,
                api_url: self.heroku_api_url,
                dyno_size: self.dyno_size,
                dyno_ttl: self.dyno_ttl,
                rate_limit_reserve: self.heroku_rate_limit_reserve,
                sweep_interval: self.sweep_interval,
            }),
        };
        if let Some(heroku) = &heroku {
            if heroku.dyno_ttl.is_zero() || heroku.dyno_ttl > Duration::from_secs(86_400) {
                bail!("DYNO_TTL must be between 1s and 24h (Heroku's limit)");
            }
            if heroku.sweep_interval.is_zero() {
                bail!("SWEEP_INTERVAL must be greater than zero");
            }
            if self.warm_runners.unwrap_or(0) > 0 && self.warm_runner_max_age >= heroku.dyno_ttl {
                bail!(
                    "WARM_RUNNER_MAX_AGE must be shorter than DYNO_TTL: a warm dyno must leave its session time \
                     to live"
                );
            }
        }
        if self.warm_runner_max_age.is_zero() {
            bail!("WARM_RUNNER_MAX_AGE must be greater than zero");
        }
        let gateway_url = match (self.gateway_url, self.heroku_app_domain.filter(|d| !d.is_empty())) {
            (Some(url), _) => Some(url),
            (None, Some(domain)) => Some(
                Url::parse(&format!("https://{domain}/"))
                    .with_context(|| format!("HEROKU_APP_DEFAULT_DOMAIN_NAME {domain:?} is not a host name"))?,
            ),
            (None, None) => None,
        };
        let runner_bin = match self.runner_bin {
            Some(path) => path,
            None => default_runner_bin()?,
        };
        if !runner_bin.is_file() {
            bail!(
                "the runner binary is not at {}: build both binaries with `cargo build --release` \
                 (they land side by side in target/release/), or point RUNNER_BIN at it",
                runner_bin.display()
            );
        }
        Ok(Config {
            listen: SocketAddr::new(bind, self.port),
            metrics_listen: self.metrics_port.map(|port| SocketAddr::new(self.metrics_bind.unwrap_or(bind), port)),
            api_key: self.api_key,
            gateway_url,
            rendezvous_secret,
            spawner,
            runner_bin,
            sandbox: self.sandbox,
            allow_unsandboxed: self.allow_unsandboxed,
            heroku,
            runner_command: self.runner_command.filter(|c| !c.trim().is_empty()),
            procfile: match std::fs::read_to_string(&self.procfile) {
                Ok(text) => Some(text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => bail!("cannot read PROCFILE {}: {e}", self.procfile.display()),
            },
            discover_servers: self.discover_servers,
            inference: self.inference_url.map(|url| Inference {
                url,
                key: self.inference_key,
                model: self.inference_model_id.filter(|m| !m.trim().is_empty()),
                timeout: self.inference_timeout,
            }),
            pool: PoolSettings {
                size: self.warm_runners.unwrap_or(match spawner {
                    SpawnerKind::Local => 2,
                    SpawnerKind::Heroku => 0,
                }),
                max_age: self.warm_runner_max_age,
            },
            limits: Limits {
                // A body becomes one message to the runner, which takes no more.
                max_body_bytes: self.max_body_bytes.min(dynogate_shared::window::MAX_MESSAGE_BYTES),
                stream_buffer_bytes: self.stream_buffer_bytes.max(dynogate_shared::window::MAX_MESSAGE_BYTES),
                buffer_bytes: self.buffer_bytes,
                max_sessions: self.max_sessions,
            },
            connections: Connections {
                max: self.max_connections as usize,
                max_per_ip: self.max_connections_per_ip as usize,
                header_read: self.header_read_timeout,
                body_read: self.body_read_timeout,
                idle: self.idle_connection_timeout,
            },
            timeouts: Timeouts {
                dial_back: self.dial_back_timeout,
                idle: self.idle_timeout,
                request: self.request_timeout,
                reply_stream_after: self.reply_stream_after,
                heartbeat: self.heartbeat,
                runner_stop_grace: Duration::from_secs(5),
                reconnect_grace: self.reconnect_grace,
                drain: self.drain_timeout,
                teardown: Duration::from_secs(7),
            },
            allowed_origins: self
                .allowed_origins
                .into_iter()
                .map(|o| o.trim().trim_end_matches('/').to_owned())
                .filter(|o| !o.is_empty())
                .collect(),
            worker_threads: self.worker_threads.map(usize::from),
            redis_url: self.redis_url,
        })
    }
}

impl Config {
    /// The base URL runners dial: GATEWAY_URL (or the app's domain) when set,
    /// else the address the listener really bound, with a wildcard bind mapped
    /// to loopback for local runners. `None` when runners on other machines
    /// (dynos) would need a public URL nobody configured.
    pub fn runner_base_url(&self, bound: SocketAddr) -> Option<Url> {
        if let Some(url) = &self.gateway_url {
            return Some(url.clone());
        }
        let ip = match bound.ip() {
            ip if !ip.is_unspecified() => ip,
            _ if self.spawner == SpawnerKind::Heroku => return None,
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        };
        let host = SocketAddr::new(ip, bound.port());
        Some(Url::parse(&format!("http://{host}/")).expect("a socket address makes a valid URL"))
    }
}

/// What a client is told when runners have no URL to dial.
pub const NO_PUBLIC_URL: &str = "this gateway does not know its public URL, so runner dynos cannot dial back: \
    set GATEWAY_URL to the app's web URL (e.g. https://myapp-1a2b3c4d5e6f.herokuapp.com), \
    or run `heroku labs:enable runtime-dyno-metadata` and restart so HEROKU_APP_DEFAULT_DOMAIN_NAME is set";

fn random_secret() -> anyhow::Result<Secret> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no system randomness: {e}"))?;
    Ok(Secret::new(hex::encode(bytes)))
}

fn default_runner_bin() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot locate the gateway binary")?;
    Ok(me.with_file_name("runner"))
}

/// The app runner dynos run in: never the gateway's own unless allowed,
/// since a one-off dyno receives every config var of its app.
fn runner_app(gateway: Option<&str>, asked: Option<&str>, allow_shared: bool) -> anyhow::Result<String> {
    let gateway = gateway.context("SPAWNER=heroku needs HEROKU_APP_NAME")?;
    let app = match asked.map(str::trim).filter(|a| !a.is_empty()) {
        Some(app) => app.to_owned(),
        None => crate::spawn::heroku::runner_app::default_name(gateway),
    };
    if app == gateway && !allow_shared {
        bail!(
            "HEROKU_RUNNER_APP is the gateway's own app {gateway}: every runner dyno would receive its config vars \
             (API_KEY, HEROKU_API_KEY, RENDEZVOUS_SECRET, add-on URLs), where executed code can read them. Leave \
             HEROKU_RUNNER_APP unset (a separate app is created and kept on this slug), name another app, or set \
             ALLOW_SHARED_RUNNER_APP=true"
        );
    }
    if app == gateway {
        tracing::warn!("runner dynos run in the gateway's own app: code on them can read its config vars");
    }
    Ok(app)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["gateway", "--runner-bin", "/bin/sh"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    #[test]
    fn without_a_key_the_gateway_binds_loopback() {
        let config = args(&[]).validate().unwrap();
        assert!(config.listen.ip().is_loopback());
    }

    #[test]
    fn with_a_key_the_gateway_binds_everywhere() {
        let config = args(&["--api-key", "k"]).validate().unwrap();
        assert!(config.listen.ip().is_unspecified());
    }

    #[test]
    fn a_public_bind_without_a_key_is_refused_unless_asked_for() {
        let err = args(&["--bind", "0.0.0.0"]).validate().unwrap_err().to_string();
        assert!(err.contains("without API_KEY"), "{err}");
        assert!(args(&["--bind", "0.0.0.0", "--allow-unauthenticated"]).validate().is_ok());
    }

    #[test]
    fn a_reply_starts_streaming_before_the_router_gives_up() {
        assert!(args(&["--reply-stream-after", "25s"]).validate().is_ok());
        let err = args(&["--reply-stream-after", "30s"]).validate().unwrap_err().to_string();
        assert!(err.contains("REPLY_STREAM_AFTER") && err.contains("H12"), "{err}");
    }

    #[test]
    fn heartbeats_must_fit_inside_the_router_window() {
        assert!(args(&["--heartbeat", "30s"]).validate().is_err());
        assert!(args(&["--heartbeat", "25s"]).validate().is_ok());
    }

    #[test]
    fn a_missing_runner_binary_is_reported_with_the_fix() {
        let err = Args::try_parse_from(["gateway", "--runner-bin", "/nonexistent/runner"])
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("cargo build --release"), "{err}");
    }

    #[test]
    fn heroku_is_chosen_when_its_key_and_app_are_set() {
        let heroku = ["--heroku-api-key", "k", "--heroku-app-name", "app", "--gateway-url", "https://app.example"];
        let config = args(&[&heroku[..], &["--api-key", "c"]].concat()).validate().unwrap();
        assert_eq!(config.spawner, SpawnerKind::Heroku);
        assert_eq!(config.heroku.unwrap().app_name, "app");
        let keyless = args(&["--spawner", "heroku", "--api-key", "c"]).validate().unwrap_err().to_string();
        assert!(keyless.contains("HEROKU_API_KEY"), "{keyless}");
        // Loopback only, which Heroku's router cannot reach: refused, not an R10 later.
        let unreachable = args(&heroku).validate().unwrap_err().to_string();
        assert!(unreachable.contains("SPAWNER=heroku needs API_KEY") && unreachable.contains("R10"), "{unreachable}");
    }

    #[test]
    fn heroku_mode_needs_a_public_url_for_runners() {
        let base = ["--heroku-api-key", "k", "--heroku-app-name", "app", "--api-key", "c"];
        let config = args(&base).validate().unwrap();
        assert_eq!(config.runner_base_url("0.0.0.0:1".parse().unwrap()), None);
        assert!(config.runner_base_url("127.0.0.1:1".parse().unwrap()).is_some());
        let with_domain = [&base[..], &["--heroku-app-domain", "app-123.herokuapp.com"]].concat();
        let config = args(&with_domain).validate().unwrap();
        assert_eq!(
            config.runner_base_url("0.0.0.0:1".parse().unwrap()).unwrap().as_str(),
            "https://app-123.herokuapp.com/"
        );
        assert!(args(&[&base[..], &["--dyno-ttl", "25h", "--gateway-url", "https://x"]].concat()).validate().is_err());
    }

    #[test]
    fn worker_threads_default_to_the_runtime_and_zero_is_refused() {
        assert_eq!(args(&[]).validate().unwrap().worker_threads, None);
        assert_eq!(args(&["--worker-threads", "1"]).validate().unwrap().worker_threads, Some(1));
        assert!(Args::try_parse_from(["gateway", "--worker-threads", "0"]).is_err());
    }

    #[test]
    fn connection_limits_default_and_zero_is_refused() {
        let config = args(&[]).validate().unwrap();
        let connections = config.connections;
        assert_eq!((connections.max, connections.max_per_ip), (1024, 256));
        assert_eq!(connections.header_read, Duration::from_secs(10));
        assert_eq!(connections.body_read, Duration::from_secs(30));
        assert_eq!(connections.idle, Duration::from_secs(95));
        for flag in ["--max-connections", "--max-connections-per-ip"] {
            assert!(Args::try_parse_from(["gateway", flag, "0"]).is_err(), "{flag}");
        }
        for flag in ["--header-read-timeout", "--body-read-timeout", "--idle-connection-timeout"] {
            assert!(args(&[flag, "0s"]).validate().is_err(), "{flag}");
        }
    }

    #[test]
    fn short_rendezvous_secrets_are_refused() {
        assert!(args(&["--rendezvous-secret", "short"]).validate().is_err());
    }

    #[test]
    fn runners_dial_loopback_for_a_wildcard_bind() {
        let config = args(&[]).validate().unwrap();
        let url = config.runner_base_url("0.0.0.0:4321".parse().unwrap()).unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:4321/");
        let config = args(&["--gateway-url", "https://x.herokuapp.com"]).validate().unwrap();
        assert_eq!(config.runner_base_url("0.0.0.0:1".parse().unwrap()).unwrap().as_str(), "https://x.herokuapp.com/");
    }

    #[test]
    fn runner_dynos_never_share_the_gateways_app_unless_allowed() {
        assert_eq!(runner_app(Some("gw"), None, false).unwrap(), "gw-run");
        assert_eq!(runner_app(Some("gw"), Some("sandbox"), false).unwrap(), "sandbox");
        let refused = runner_app(Some("gw"), Some("gw"), false).unwrap_err().to_string();
        assert!(refused.contains("ALLOW_SHARED_RUNNER_APP"), "{refused}");
        assert_eq!(runner_app(Some("gw"), Some("gw"), true).unwrap(), "gw");
    }
}
