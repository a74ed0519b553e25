//! The dynogate runner: the process that serves one session.
//!
//! `runner` (on a dyno) and `runner --local` (started by the local spawner)
//! dial back to the gateway's `/rendezvous` WebSocket, start a stdio MCP
//! server, and carry JSON-RPC lines between the two until either side ends.
//! `runner exec` is the built-in code executor: a stdio MCP server on its own.
//!
//! Modules:
//! - [`config`]: command line and environment.
//! - [`dial`]: connecting to the gateway and the hello/welcome handshake.
//! - [`child`]: starting and stopping the bridged MCP server.
//! - [`lines`]: newline-delimited framing on the child's stdout.
//! - [`procfile`]: `RUNNER_COMMAND` naming a Procfile process type.
//! - [`bridge`]: one session from dial to exit, built on [`relay`] (the loop
//!   and the replay window), [`link`] (one socket) and [`pumps`] (the
//!   server's stdin and stdout).
//! - [`reap`]: killing and reaping everything below the runner at the end.
//! - [`sandbox`]: the per-session sandbox of a local runner (bubblewrap,
//!   the session's user, its cgroups).
//! - [`exec`]: the code executor (and `runner limit`, its resource-limit shim).
//! - [`size`]: byte sizes in config vars.
//! - [`traces`]: the runner's side of each call, as spans.
//! - [`workdir`]: the session's private directory.

pub mod bridge;
pub mod child;
pub mod config;
pub mod dial;
pub mod exec;
pub mod lines;
pub mod link;
pub mod procfile;
pub mod pumps;
pub mod reap;
pub mod relay;
pub mod sandbox;
pub mod size;
pub mod traces;
pub mod workdir;

use anyhow::Context;
use clap::Parser;

/// The `runner` binary.
pub fn main() -> anyhow::Result<()> {
    let args = config::Args::parse();
    if let Some(config::Command::Limit(limit)) = args.command {
        // Nothing else may start first: this process is about to become another program.
        return exec::limits::apply_and_exec(limit);
    }
    if let Some(config::Command::SandboxCheck) = args.command {
        return sandbox::check();
    }
    // ring is the one TLS backend compiled in; `wss://` dials and the trace exporter use it.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let executor = args.command.is_some();
    // Under a runner the executor's stderr lands in the runner's log, so it
    // stays quiet unless asked; stdout is its MCP wire, so logs go to stderr.
    let default = if executor { "warn,dynogate_runner=info" } else { "info" };
    dynogate_telemetry::init("dynogate-runner", default, !executor)?;
    match args.command {
        Some(config::Command::Exec(exec)) => {
            // It may hold installer credentials (`PIP_INDEX_URL`, …), and
            // code runs as the same user.
            forbid_inspection();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let result = runtime.block_on(exec::serve(exec.validate()?));
            // After a SIGTERM, stdin's blocking reader may wait forever for a
            // line; do not wait for it.
            runtime.shutdown_timeout(std::time::Duration::from_millis(100));
            result
        }
        Some(config::Command::ObtainUv(exec)) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let result = runtime.block_on(exec::uv::obtain_for_machine(exec.validate()?));
            // A lock wait that timed out leaves its thread blocked; do not wait for it.
            runtime.shutdown_timeout(std::time::Duration::from_millis(100));
            result
        }
        Some(config::Command::Limit(_) | config::Command::SandboxCheck) => unreachable!("handled above"),
        None => {
            forbid_inspection();
            // Before anything is started, so no orphan can slip past it to init.
            reap::become_subreaper();
            let dial = args.dial.validate()?;
            // One thread: a runner serves one session, so there is nothing to
            // spread across cores, hand-offs between its tasks stay cheap (no
            // cross-thread wake-ups on the relay's hot path), and memory small.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let code = runtime.block_on(bridge::run(dial))?;
            // Leave without waiting for stray blocking tasks (a child's stderr
            // reader, say); everything that matters has been cleaned up.
            runtime.shutdown_timeout(std::time::Duration::from_millis(100));
            dynogate_telemetry::flush();
            std::process::exit(code)
        }
    }
}

/// Makes this process non-dumpable, so processes of the same user (the code
/// the executor runs) cannot read its `/proc/<pid>/environ` or memory, where
/// the runner's token is, and on Heroku every config var of the app. This
/// holds for unprivileged users (as on dynos); root can read anything.
pub fn forbid_inspection() {
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!("cannot make the runner non-dumpable: {e}");
    }
}
