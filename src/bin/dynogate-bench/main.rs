//! `dynogate-bench`: drives a running MCP gateway (dynogate, or any
//! streamable-HTTP bridge) and the stdio floor, checks every answer, and
//! reports latency percentiles and throughput as one JSON line per run on
//! stdout (plus a readable line on stderr).
//!
//! - [`client`]: a minimal MCP client over streamable HTTP.
//! - [`floor`]: the same calls over plain stdio, no gateway.
//! - [`scenarios`]: `sessions`, `calls`, `payload`, `idle`, `first-result`
//!   (a new session's first code result), and `http` (the HTTP stack alone).
//! - [`stats`]: percentiles and the report; [`procs`]: memory from /proc.
//! - [`spread`]: a router spreading connections over several instances.

mod client;
mod floor;
mod procs;
mod scenarios;
mod spread;
mod stats;
mod wire;

use clap::{Args, Parser, Subcommand};
use scenarios::Target;

/// Benchmarks an MCP gateway and the stdio floor.
#[derive(Debug, Parser)]
#[command(name = "dynogate-bench", version)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Args)]
struct Where {
    /// MCP endpoint of a running gateway, e.g. http://127.0.0.1:8000/mcp.
    #[arg(long, conflicts_with = "floor")]
    url: Option<String>,
    /// Name for the report (default: "dynogate").
    #[arg(long, default_value = "dynogate")]
    name: String,
    /// Call this stdio echo server directly instead (the floor).
    #[arg(long)]
    floor: Option<String>,
}

impl Where {
    fn target(self) -> anyhow::Result<Target> {
        match (self.url, self.floor) {
            (Some(url), None) => Ok(Target::Http { url, name: self.name }),
            (None, Some(echo)) => Ok(Target::Floor { echo }),
            _ => anyhow::bail!("give --url or --floor"),
        }
    }

    fn url(self) -> anyhow::Result<(String, String)> {
        Ok((self.url.ok_or_else(|| anyhow::anyhow!("this scenario needs --url"))?, self.name))
    }
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Session setup: initialize → answer (spawn, dial-back, server start).
    Sessions {
        #[command(flatten)]
        at: Where,
        #[arg(long, default_value_t = 200)]
        count: u64,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
    },
    /// tools/call echo over S sessions with C in flight.
    Calls {
        #[command(flatten)]
        at: Where,
        #[arg(long, default_value_t = 1)]
        sessions: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value_t = 10_000)]
        calls: u64,
        /// Bytes of text per echo.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Start sessions at --url but send every call to this MCP endpoint
        /// (another instance sharing the sessions through Redis).
        #[arg(long)]
        via: Option<String>,
    },
    /// One large echo, repeated.
    Payload {
        #[command(flatten)]
        at: Where,
        #[arg(long, default_value_t = 1024 * 1024)]
        size: usize,
        #[arg(long, default_value_t = 50)]
        count: u64,
    },
    /// Plain HTTP round trips (e.g. to the gateway's /healthz): the cost of
    /// the HTTP client and server stack alone, to read other figures against.
    Http {
        /// The URL to GET.
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 5000)]
        count: u64,
    },
    /// Time to the first code_exec_python result of new sessions, their
    /// later calls, and the same code run bare.
    FirstResult {
        #[command(flatten)]
        at: Where,
        #[arg(long, default_value_t = 20)]
        count: u64,
        /// Calls after the first, per session.
        #[arg(long, default_value_t = 2)]
        later: u64,
        /// Pause before each session and each call, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        gap_ms: u64,
    },
    /// Hold N sessions open; report gateway and runner memory.
    Idle {
        #[command(flatten)]
        at: Where,
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// The gateway's pid, to read its memory and find its runners.
        #[arg(long)]
        gateway_pid: Option<i32>,
        /// Keep the sessions open this long after the report (to measure
        /// what holds them elsewhere, such as Redis).
        #[arg(long, default_value_t = 0)]
        hold_secs: u64,
    },
    /// Route each new TCP connection to a random one of several instances.
    Spread {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// The instances, as host:port,host:port,...
        #[arg(long)]
        to: String,
    },
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.scenario {
            Scenario::Sessions { at, count, concurrency } => {
                let (url, name) = at.url()?;
                scenarios::sessions(&url, &name, count, concurrency).await
            }
            Scenario::Calls { at, sessions, concurrency, calls, size, via } => {
                scenarios::calls(&at.target()?, sessions, concurrency.max(1), calls, size, via.as_deref()).await
            }
            Scenario::Payload { at, size, count } => scenarios::payload_echo(&at.target()?, count, size).await,
            Scenario::Http { url, count } => scenarios::http_round_trips(&url, count).await,
            Scenario::FirstResult { at, count, later, gap_ms } => {
                let (url, name) = at.url()?;
                scenarios::first_result(&url, &name, count, later, std::time::Duration::from_millis(gap_ms)).await
            }
            Scenario::Idle { at, count, gateway_pid, hold_secs } => {
                let (url, name) = at.url()?;
                scenarios::idle(&url, &name, count, gateway_pid, std::time::Duration::from_secs(hold_secs)).await
            }
            Scenario::Spread { listen, to } => spread::run(&listen, &to).await,
        }
    })
}
