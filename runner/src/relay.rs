//! The relay loop between the gateway's socket and the MCP server's stdio.
//!
//! The relay always reads the socket. It keeps every line it sent until the
//! gateway acknowledges it, and acknowledges only what it has handed to the
//! stdin feeder, so the gateway's own window bounds the stdin queue; the
//! window and its constants are the shared protocol's
//! ([`dynogate_shared::window`]), the same rules the gateway's session runs.
//! It reads the server's lines only while its own window has room, so a
//! server that floods stdout is slowed down. When the socket drops, the
//! server keeps running and its output is kept; the relay dials again with
//! backoff, and on the welcome both sides resend what the other lacks.
//!
//! What the relay touches comes in from outside: the socket as a [`Link`],
//! the way back to the gateway as a [`Redialer`], the server as its exit,
//! stdout lines and stdin queue, and the signal to stop. Tests drive it with
//! channels and paused time (see `tests.rs`).

use std::collections::VecDeque;
use std::future::Future;
use std::process::ExitStatus;
use std::time::Duration;

use bytes::Bytes;
use dynogate_shared::window::{ACK_DELAY, AckClock, MISSED_HEARTBEATS, SendWindow};
use dynogate_shared::{Control, Secret};
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::{debug, info, warn};

use crate::config::Dial;
use crate::dial::{DialError, Welcome};
use crate::link::{Incoming, Link};
use crate::traces::CallSpans;

/// How long the pump gets to forward what a server wrote just before it
/// exited (its last response is usually still in the pipe).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the relay stopped.
#[derive(Debug)]
pub enum End {
    ServerExited(ExitStatus),
    GatewayShutdown(String),
    ConnectionLost(String),
    Signal,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::ServerExited(status) => write!(f, "the MCP server exited ({status})"),
            End::GatewayShutdown(reason) => write!(f, "the gateway ended the session: {reason}"),
            End::ConnectionLost(why) => write!(f, "lost the gateway: {why}"),
            End::Signal => f.write_str("the runner was asked to stop"),
        }
    }
}

/// A dial back to the gateway in progress.
pub type Redial = BoxFuture<'static, Result<(Link, Welcome), DialError>>;

/// Starts a [`Redial`] once the socket is lost, given the latest token, how
/// many messages the relay has received, and when to give up.
pub type Redialer = Box<dyn FnMut(Secret, crate::dial::Position, Instant) -> Redial + Send>;

/// The relay's state across sockets.
pub struct Relay {
    dial: Dial,
    token: Secret,
    pub link: Option<Link>,
    redialer: Redialer,
    redial: Option<Redial>,
    /// When to give up on a gateway that does not take the runner back.
    give_up_at: Option<Instant>,
    /// Lines sent to the gateway, kept until acknowledged.
    window: SendWindow<Utf8Bytes>,
    /// Messages received from the gateway, and when to acknowledge them.
    clock: AckClock,
    /// Received and not yet handed to the feeder (not yet acknowledgeable).
    to_stdin: VecDeque<Bytes>,
    /// The gateway process that started this runner (local mode).
    parent: Option<nix::unistd::Pid>,
    /// Spans of the calls in progress, when traces are exported.
    spans: CallSpans,
}

impl Relay {
    pub fn new(dial: Dial, link: Link, welcome: Welcome, redialer: Redialer) -> Self {
        let parent = dial.local.then(nix::unistd::getppid);
        Relay {
            token: welcome.token,
            dial,
            link: Some(link),
            redialer,
            redial: None,
            give_up_at: None,
            window: SendWindow::starting_at(welcome.received),
            clock: AckClock::default(),
            to_stdin: VecDeque::new(),
            parent,
            spans: CallSpans::default(),
        }
    }

    /// Relays until one side ends: `server_exit` resolves when the MCP
    /// server exits, `lines` are its stdout and `stdin` feeds it, and `stop`
    /// resolves when the runner is asked to stop.
    pub async fn run(
        &mut self,
        server_exit: impl Future<Output = ExitStatus>,
        stop: impl Future<Output = ()>,
        mut lines: mpsc::Receiver<Utf8Bytes>,
        stdin: mpsc::Sender<Bytes>,
    ) -> End {
        tokio::pin!(server_exit, stop);
        let heartbeat = self.dial.heartbeat;
        let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ack = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(ack);
        let mut ack_armed = false;
        let mut lines_open = true;
        let mut exited: Option<(ExitStatus, Instant)> = None;
        loop {
            if let Some((status, at)) = exited
                && (!lines_open || at.elapsed() >= DRAIN_TIMEOUT)
            {
                if lines_open {
                    debug!("stdout still open after the server exited (a grandchild holds it)");
                }
                // Its last words must reach the gateway before the runner leaves.
                if self.link.is_some() || self.redial.is_none() {
                    return End::ServerExited(status);
                }
            }
            let room = self.window.has_room();
            // Armed only until it passes: a passed deadline would fire on every turn.
            let drain_deadline =
                exited.map(|(_, at)| at + DRAIN_TIMEOUT).filter(|deadline| lines_open && Instant::now() < *deadline);
            tokio::select! {
                () = &mut stop => return End::Signal,
                status = &mut server_exit, if exited.is_none() => exited = Some((status, Instant::now())),
                line = lines.recv(), if lines_open && room => match line {
                    Some(line) => self.send_line(line),
                    None => lines_open = false,
                },
                permit = stdin.reserve(), if !self.to_stdin.is_empty() => {
                    let message = self.to_stdin.pop_front().expect("guarded by is_empty");
                    match permit {
                        Ok(permit) => permit.send(message),
                        Err(_) => debug!("MCP server's stdin is closed; dropped a message"),
                    }
                    if !ack_armed {
                        ack.as_mut().reset(Instant::now() + ACK_DELAY);
                        ack_armed = true;
                    }
                }
                incoming = next(&mut self.link) => {
                    if let Some(end) = self.on_incoming(incoming) {
                        return end;
                    }
                }
                result = redialed(&mut self.redial) => {
                    if let Some(end) = self.on_redial(result) {
                        return end;
                    }
                }
                () = &mut ack, if ack_armed => {
                    ack_armed = false;
                    self.send_ack();
                }
                () = sleep_until_opt(drain_deadline) => {}
                _ = ticker.tick() => {
                    if let Some(parent) = self.parent && nix::unistd::getppid() != parent {
                        return End::ConnectionLost("the gateway process that started this runner is gone".into());
                    }
                    if self.give_up_at.is_some_and(|at| Instant::now() >= at) {
                        return End::ConnectionLost("the gateway did not take the runner back in time".into());
                    }
                    match &self.link {
                        Some(link) if link.last_heard.elapsed() > heartbeat * MISSED_HEARTBEATS => {
                            self.detach("no heartbeat from the gateway");
                        }
                        Some(link) => link.ping(),
                        None => {}
                    }
                }
            }
            if self.clock.due(self.delivered()) {
                self.send_ack();
            }
        }
    }

    /// Messages handed to the feeder (what may be acknowledged).
    fn delivered(&self) -> u64 {
        self.clock.received() - self.to_stdin.len() as u64
    }

    fn send_ack(&mut self) {
        if let Some(link) = &self.link
            && let Some(received) = self.clock.take(self.delivered())
        {
            link.send_control(&Control::Ack { received });
        }
    }

    /// A control frame, if there is a socket to carry it.
    pub fn say(&self, control: Control) {
        if let Some(link) = &self.link {
            link.send_control(&control);
        }
    }

    fn send_line(&mut self, line: Utf8Bytes) {
        self.spans.answer(line.as_bytes());
        if let Some(link) = &self.link {
            link.send_text(line.clone());
        }
        self.window.push(line);
    }

    fn on_incoming(&mut self, incoming: Incoming) -> Option<End> {
        match incoming {
            Incoming::Message(text) => {
                self.clock.receive();
                self.spans.request(text.as_bytes());
                self.to_stdin.push_back(Bytes::from(text));
            }
            Incoming::Control(Control::Ack { received }) => {
                if let Err(e) = self.window.acknowledge(received) {
                    return Some(End::ConnectionLost(e.to_string()));
                }
            }
            Incoming::Control(Control::Token { token }) => self.token = token,
            Incoming::Control(Control::Shutdown { reason }) => return Some(End::GatewayShutdown(reason)),
            Incoming::Control(other) => warn!(control = %other, "unexpected control frame from the gateway"),
            Incoming::Lost(why) => self.detach(&why),
            Incoming::Alive => {}
        }
        None
    }

    /// Drops the socket and starts dialing again.
    fn detach(&mut self, why: &str) {
        let Some(link) = self.link.take() else { return };
        link.abandon();
        let window = self.dial.reconnect_window;
        warn!(why, ?window, "connection to the gateway lost; dialing again");
        let give_up_at = Instant::now() + window;
        self.give_up_at = Some(give_up_at);
        let position = crate::dial::Position { received: self.clock.received(), acked: self.window.acked() };
        self.redial = Some((self.redialer)(self.token.clone(), position, give_up_at));
    }

    fn on_redial(&mut self, result: Result<(Link, Welcome), DialError>) -> Option<End> {
        self.redial = None;
        let (link, welcome) = match result {
            Ok(connected) => connected,
            Err(e) => return Some(End::ConnectionLost(format!("could not dial the gateway again: {e}"))),
        };
        let resend = match self.window.resume(welcome.received) {
            Ok(resend) => resend,
            Err(e) => return Some(End::ConnectionLost(format!("the gateway came back out of step: {e}"))),
        };
        let mut resent = 0;
        for line in resend {
            link.send_text(line.clone());
            resent += 1;
        }
        self.token = welcome.token;
        info!(resent, "back in touch with the gateway");
        // The hello told the gateway how much we have.
        self.clock.told(self.clock.received());
        self.link = Some(link);
        self.give_up_at = None;
        None
    }
}

/// The next event of the current socket, or never when there is none.
async fn next(link: &mut Option<Link>) -> Incoming {
    match link {
        Some(link) => link.recv().await,
        None => std::future::pending().await,
    }
}

/// The outcome of a redial in progress, or never when none is.
async fn redialed(redial: &mut Option<Redial>) -> Result<(Link, Welcome), DialError> {
    match redial {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
