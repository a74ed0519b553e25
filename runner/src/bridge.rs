//! One session, start to end: dial the gateway, start the MCP server, run
//! the [`Relay`] between them, and on the way out close the server's stdin,
//! give it a moment, stop it and everything it started, remove the
//! session's directory, exit.
//!
//! The parts live apart: [`crate::link`] owns a socket, [`crate::pumps`] the
//! server's stdio, [`crate::relay`] the loop and the replay window.

use std::future::Future;
use std::time::Duration;

use dynogate_shared::names::log_id;
use dynogate_shared::{Control, Secret};
use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{Instrument, info, warn};

use crate::child;
use crate::config::Dial;
use crate::dial;
use crate::link::Link;
use crate::pumps::{feed_stdin, pump_stdout};
use crate::relay::{End, Redialer, Relay};
use crate::sandbox::Sandbox;
use crate::workdir::Workdir;

/// How long the first dial keeps retrying an unreachable gateway when its
/// token does not say (see [`first_dial_deadline`]), and at least.
const FIRST_DIAL: Duration = Duration::from_secs(20);
/// The longest the first dial keeps retrying, whatever the token says.
const FIRST_DIAL_AT_MOST: Duration = Duration::from_secs(15 * 60);
/// After the last words, how long to wait for the gateway to close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves one session; returns the process exit code.
pub async fn run(dial: Dial) -> anyhow::Result<i32> {
    let span = tracing::info_span!("runner", session = %log_id(&dial.session));
    // The session's `spawn` span, handed over by the gateway (or the dyno's env).
    if let Ok(parent) = std::env::var(dynogate_telemetry::TRACEPARENT_ENV) {
        dynogate_telemetry::set_parent(&span, &parent);
    }
    async move {
        // The server starts before the dial, so that its start-up (for the
        // built-in executor, finding Python) overlaps the connection.
        let workdir = Workdir::open(dial.session_dir.as_deref());
        let started = match &workdir {
            Ok(workdir) => start_server(&dial, workdir.path()),
            Err(e) => Err((anyhow::anyhow!("{e:#}"), "cannot create the session's directory".to_owned())),
        };
        let joined =
            dial::connect(&dial, &dial.token, Default::default(), first_dial_deadline(&dial.token), false).await;
        let (socket, welcome) = match joined {
            Ok(joined) => joined,
            Err(e) => {
                if let Ok(server) = started {
                    server.stop(dial.stop_grace).await;
                }
                if let Ok(workdir) = workdir {
                    let _ = workdir.remove();
                }
                return Err(anyhow::Error::new(e).context("cannot join the session"));
            }
        };
        let link = Link::open(socket);
        let mut server = match started {
            Ok(server) => server,
            Err((e, told)) => {
                warn!(error = format!("{e:#}"), "{told}");
                link.send_control(&Control::Bye { reason: told });
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, link.closed()).await;
                if let Ok(workdir) = workdir {
                    let _ = workdir.remove();
                }
                return Ok(1);
            }
        };
        let workdir = workdir.expect("a server starts only once its directory exists");
        let stdout = server.stdout.take().expect("stdout is piped");
        let stdin = server.stdin.take().expect("stdin is piped");
        let (lines_tx, lines) = mpsc::channel(64);
        let pump = tokio::spawn(pump_stdout(stdout, lines_tx).in_current_span());
        let (stdin_tx, stdin_rx) = mpsc::channel(64);
        let feeder = tokio::spawn(feed_stdin(stdin, stdin_rx).in_current_span());

        let stop_grace = dial.stop_grace;
        let stop = stop_signal();
        let mut relay = Relay::new(dial.clone(), link, welcome, redialer(dial));
        let end = relay.run(server.wait(), stop, lines, stdin_tx).await;
        info!(%end, "session over");
        // Closing stdin is how a stdio MCP server is asked to leave; abort
        // the feeder in case it is stuck writing to a server that stopped reading.
        feeder.abort();
        pump.abort();
        let code = match &end {
            End::ServerExited(status) => {
                use std::os::unix::process::ExitStatusExt;
                relay.say(Control::ChildExited { code: status.code(), signal: status.signal() });
                server.stop(stop_grace).await;
                0
            }
            End::GatewayShutdown(_) => {
                server.stop(stop_grace).await;
                0
            }
            End::Signal => {
                relay.say(Control::Bye { reason: "the runner was stopped (SIGTERM)".into() });
                server.stop(stop_grace).await;
                0
            }
            End::ConnectionLost(_) => {
                server.stop(stop_grace).await;
                1
            }
        };
        if let Some(link) = relay.link.take() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, link.closed()).await;
        }
        if let Err(e) = workdir.remove() {
            warn!(error = %e, "cannot remove the session directory");
        }
        Ok(code)
    }
    .instrument(span)
    .await
}

/// Starts the session's MCP server, sandboxed as configured. On failure: the
/// cause for this log, and the words the client is told (without paths or
/// the command line).
fn start_server(dial: &Dial, workdir: &std::path::Path) -> Result<child::Server, (anyhow::Error, String)> {
    match Sandbox::prepare(&dial.sandbox, workdir, &dial.server) {
        Ok(sandbox) => child::start(&dial.server, workdir, sandbox, &dial.server_env)
            .map_err(|e| (e, "cannot start the session's MCP server".to_owned())),
        Err(e) => {
            let told = format!("the session cannot be sandboxed here: {e}");
            Err((e, told))
        }
    }
}

/// How the relay gets back to the gateway: the same handshake as the first
/// dial, but a refusal is retried until the deadline (the gateway may not
/// have noticed yet that the old socket is dead).
fn redialer(dial: Dial) -> Redialer {
    Box::new(move |token, position, deadline| {
        let dial = dial.clone();
        async move {
            let (socket, welcome) = dial::connect(&dial, &token, position, deadline, true).await?;
            Ok((Link::open(socket), welcome))
        }
        .boxed()
    })
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed at once, not
/// when the future is first polled, so no signal slips through before.
fn stop_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("can install a SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
    }
}

/// Until when the first dial keeps retrying an unreachable gateway: while
/// the runner's token is good, since the gateway sizes it to its own wait
/// for the dial (`DIAL_BACK_TIMEOUT`, plus slack); within
/// [`FIRST_DIAL`]..[`FIRST_DIAL_AT_MOST`].
fn first_dial_deadline(token: &Secret) -> Instant {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let good_for = dynogate_shared::token::RunnerClaims::read_unverified(token.expose())
        .map_or(FIRST_DIAL, |claims| Duration::from_secs(claims.exp.saturating_sub(now)));
    Instant::now() + good_for.clamp(FIRST_DIAL, FIRST_DIAL_AT_MOST)
}

#[cfg(test)]
mod tests {
    use dynogate_shared::token::{AUDIENCE, RunnerClaims};

    use super::*;

    /// A token of the gateway's shape good for `seconds` more (unsigned: the
    /// runner never checks the signature).
    fn token_good_for(seconds: u64) -> Secret {
        use base64::Engine;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let claims =
            RunnerClaims { aud: AUDIENCE.into(), sid: "s".into(), iat: now, exp: now + seconds, jti: "j".into() };
        let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        Secret::new(format!("{}.{}.sig", encode(b"{}"), encode(&serde_json::to_vec(&claims).unwrap())))
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_dial_retries_while_the_token_is_good_within_bounds() {
        let window = |token: &Secret| first_dial_deadline(token) - Instant::now();
        let ninety = window(&token_good_for(90));
        assert!(ninety <= Duration::from_secs(90) && ninety >= Duration::from_secs(88), "{ninety:?}");
        assert_eq!(window(&token_good_for(5)), FIRST_DIAL);
        assert_eq!(window(&token_good_for(24 * 3600)), FIRST_DIAL_AT_MOST);
        assert_eq!(window(&Secret::new("not-a-token")), FIRST_DIAL);
    }
}
