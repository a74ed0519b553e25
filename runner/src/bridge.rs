//! The relay between the gateway's socket and the MCP server's stdio.
//!
//! Tasks keep the directions independent, so a server that stops reading its
//! stdin cannot stall the responses it is writing:
//! - per socket, a **writer** sends what the relay queues, flushing when its
//!   queue runs dry;
//! - the **stdout pump** reads the server's lines into a small queue that the
//!   relay drains only while it has room to keep them (backpressure: a server
//!   that floods stdout is slowed down, memory stays bounded);
//! - the **stdin feeder** writes the gateway's messages to the server.
//!
//! The relay always reads the socket. It keeps every line it sent until the
//! gateway acknowledges it, and acknowledges only what it has handed to the
//! feeder, so the gateway's own window bounds the stdin queue. When the socket
//! drops, the server keeps running and its output is kept; the relay dials
//! again with backoff, and on the welcome both sides resend what the other
//! lacks. When the session is over: close the server's stdin, give it a
//! moment, kill its process group, remove the session's directory, exit.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use dynogate_shared::{Control, Secret};
use futures_util::future::BoxFuture;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::process::{ChildStdin, ChildStdout};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tracing::{Instrument, debug, info, warn};

use crate::child::{self, Server};
use crate::config::Dial;
use crate::dial::{self, DialError, MAX_MESSAGE_BYTES, Socket, Welcome};
use crate::lines::{Line, LineReader};
use crate::workdir::Workdir;

/// A gateway silent for this many heartbeats is considered gone.
const MISSED_HEARTBEATS: u32 = 3;
/// How long the first dial may keep retrying an unreachable gateway.
const FIRST_DIAL: Duration = Duration::from_secs(20);
/// How long the pump gets to forward what a server wrote just before it
/// exited (its last response is usually still in the pipe).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// After the last words, how long to wait for the gateway to close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Lines sent and not yet acknowledged, by count and by size.
const MAX_UNACKED: usize = 1024;
const MAX_UNACKED_BYTES: usize = 16 * 1024 * 1024;
/// Acknowledge at once after this many messages, else this soon after the first.
const ACK_EVERY: u64 = 32;
const ACK_DELAY: Duration = Duration::from_millis(50);

/// Why the relay stopped.
#[derive(Debug)]
enum End {
    ServerExited(std::process::ExitStatus),
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

/// One socket to the gateway.
struct Link {
    frames: mpsc::UnboundedSender<Message>,
    stream: SplitStream<Socket>,
    last_heard: Instant,
    writer: tokio::task::AbortHandle,
}

impl Link {
    fn open(socket: Socket) -> Self {
        let (sink, stream) = socket.split();
        let (frames, queue) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write(sink, queue).in_current_span()).abort_handle();
        Link { frames, stream, last_heard: Instant::now(), writer }
    }

    fn send(&self, message: Message) {
        // A dead writer shows up as the end of the stream.
        let _ = self.frames.send(message);
    }
}

type Redial = BoxFuture<'static, Result<(Socket, Welcome), DialError>>;

/// The relay's state across sockets.
struct Relay {
    dial: Dial,
    token: Secret,
    link: Option<Link>,
    redial: Option<Redial>,
    /// When to give up on a gateway that does not take the runner back.
    give_up_at: Option<Instant>,
    /// Lines sent to the gateway and not yet acknowledged; the first is number `acked + 1`.
    unacked: VecDeque<Utf8Bytes>,
    unacked_bytes: usize,
    acked: u64,
    /// Messages received from the gateway, those not yet handed to the
    /// feeder, and the count last acknowledged.
    received: u64,
    to_stdin: VecDeque<Bytes>,
    ack_sent: u64,
    /// The gateway process that started this runner (local mode).
    parent: Option<nix::unistd::Pid>,
}

/// Serves one session; returns the process exit code.
pub async fn run(dial: Dial) -> anyhow::Result<i32> {
    let span = tracing::info_span!("runner", session = %dial.session);
    async move {
        let (socket, welcome) = dial::connect(&dial, &dial.token, 0, Instant::now() + FIRST_DIAL, false)
            .await
            .context("cannot join the session")?;
        let workdir = Workdir::open(dial.session_dir.as_deref())?;
        let link = Link::open(socket);
        let mut server = match child::start(&dial.server, workdir.path()) {
            Ok(server) => server,
            Err(e) => {
                warn!("{e:#}");
                link.send(Message::Binary(Control::ChildExited { code: Some(127), signal: None }.encode().into()));
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, closed(link)).await;
                return Ok(1);
            }
        };
        let stdout = server.stdout.take().expect("stdout is piped");
        let stdin = server.stdin.take().expect("stdin is piped");
        let (lines_tx, lines) = mpsc::channel(64);
        let pump = tokio::spawn(pump_stdout(stdout, lines_tx).in_current_span());
        let (stdin_tx, stdin_rx) = mpsc::channel(64);
        let feeder = tokio::spawn(feed_stdin(stdin, stdin_rx).in_current_span());

        let parent = dial.local.then(nix::unistd::getppid);
        let stop_grace = dial.stop_grace;
        let mut relay = Relay {
            token: welcome.token,
            dial,
            link: Some(link),
            redial: None,
            give_up_at: None,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            acked: welcome.received,
            received: 0,
            to_stdin: VecDeque::new(),
            ack_sent: 0,
            parent,
        };
        let end = relay.run(&mut server, lines, stdin_tx).await;
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
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, closed(link)).await;
        }
        if let Err(e) = workdir.remove() {
            warn!("cannot remove the session directory: {e}");
        }
        Ok(code)
    }
    .instrument(span)
    .await
}

impl Relay {
    async fn run(
        &mut self,
        server: &mut Server,
        mut lines: mpsc::Receiver<Utf8Bytes>,
        stdin: mpsc::Sender<Bytes>,
    ) -> End {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
        let mut interrupt = signal(SignalKind::interrupt()).expect("can install a SIGINT handler");
        let heartbeat = self.dial.heartbeat;
        let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ack = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(ack);
        let mut ack_armed = false;
        let mut lines_open = true;
        let mut exited: Option<(std::process::ExitStatus, Instant)> = None;
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
            let room = self.unacked.len() < MAX_UNACKED && self.unacked_bytes < MAX_UNACKED_BYTES;
            // Armed only until it passes: a passed deadline would fire on every turn.
            let drain_deadline =
                exited.map(|(_, at)| at + DRAIN_TIMEOUT).filter(|deadline| lines_open && Instant::now() < *deadline);
            tokio::select! {
                _ = term.recv() => return End::Signal,
                _ = interrupt.recv() => return End::Signal,
                status = server.wait(), if exited.is_none() => exited = Some((status, Instant::now())),
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
                frame = next_frame(&mut self.link) => {
                    if let Some(end) = self.on_frame(frame) {
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
                        Some(link) => link.send(Message::Ping(Bytes::new())),
                        None => {}
                    }
                }
            }
            if self.delivered() - self.ack_sent >= ACK_EVERY {
                self.send_ack();
            }
        }
    }

    /// Messages handed to the feeder (what may be acknowledged).
    fn delivered(&self) -> u64 {
        self.received - self.to_stdin.len() as u64
    }

    fn send_ack(&mut self) {
        let delivered = self.delivered();
        if delivered > self.ack_sent
            && let Some(link) = &self.link
        {
            self.ack_sent = delivered;
            link.send(Message::Binary(Control::Ack { received: delivered }.encode().into()));
        }
    }

    /// A control frame, if there is a socket to carry it.
    fn say(&self, control: Control) {
        if let Some(link) = &self.link {
            link.send(Message::Binary(control.encode().into()));
        }
    }

    fn send_line(&mut self, line: Utf8Bytes) {
        self.unacked_bytes += line.len();
        if let Some(link) = &self.link {
            link.send(Message::Text(line.clone()));
        }
        self.unacked.push_back(line);
    }

    /// The gateway has every line up to `received`: forget them.
    fn acknowledged(&mut self, received: u64) {
        while self.acked < received {
            let Some(line) = self.unacked.pop_front() else { break };
            self.unacked_bytes -= line.len();
            self.acked += 1;
        }
    }

    fn on_frame(&mut self, frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> Option<End> {
        if let Some(link) = &mut self.link {
            link.last_heard = Instant::now();
        }
        match frame {
            Some(Ok(Message::Text(text))) => {
                self.received += 1;
                self.to_stdin.push_back(Bytes::from(text));
            }
            Some(Ok(Message::Binary(bytes))) => match Control::decode(&bytes) {
                Ok(Control::Ack { received }) => self.acknowledged(received),
                Ok(Control::Token { token }) => self.token = token,
                Ok(Control::Shutdown { reason }) => return Some(End::GatewayShutdown(reason)),
                Ok(other) => warn!(control = %other, "unexpected control frame from the gateway"),
                Err(e) => warn!("{e}"),
            },
            Some(Ok(Message::Close(_))) | None => self.detach("the gateway closed the connection"),
            Some(Ok(_)) => {}
            Some(Err(e)) => self.detach(&e.to_string()),
        }
        None
    }

    /// Drops the socket and starts dialing again.
    fn detach(&mut self, why: &str) {
        let Some(link) = self.link.take() else { return };
        // A half-open socket could keep its writer blocked for minutes.
        link.writer.abort();
        let window = self.dial.reconnect_window;
        warn!("connection to the gateway lost ({why}); dialing again for up to {window:?}");
        let give_up_at = Instant::now() + window;
        self.give_up_at = Some(give_up_at);
        let (dial, token, received) = (self.dial.clone(), self.token.clone(), self.received);
        self.redial = Some(async move { dial::connect(&dial, &token, received, give_up_at, true).await }.boxed());
    }

    fn on_redial(&mut self, result: Result<(Socket, Welcome), DialError>) -> Option<End> {
        self.redial = None;
        let (socket, welcome) = match result {
            Ok(connected) => connected,
            Err(e) => return Some(End::ConnectionLost(format!("could not dial the gateway again: {e}"))),
        };
        if welcome.received < self.acked {
            return Some(End::ConnectionLost(format!(
                "the gateway has {} of our messages but had acknowledged {}",
                welcome.received, self.acked
            )));
        }
        self.acknowledged(welcome.received);
        self.token = welcome.token;
        let link = Link::open(socket);
        for line in &self.unacked {
            link.send(Message::Text(line.clone()));
        }
        info!(resent = self.unacked.len(), "back in touch with the gateway");
        // The hello told the gateway how much we have.
        self.ack_sent = self.delivered().min(self.received);
        self.link = Some(link);
        self.give_up_at = None;
        None
    }
}

/// The next frame of the current socket, or never when there is none.
async fn next_frame(link: &mut Option<Link>) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
    match link {
        Some(link) => link.stream.next().await,
        None => std::future::pending().await,
    }
}

/// The outcome of a redial in progress, or never when none is.
async fn redialed(redial: &mut Option<Redial>) -> Result<(Socket, Welcome), DialError> {
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

/// Waits until the gateway closes a socket after our last words.
async fn closed(mut link: Link) {
    while let Some(Ok(message)) = link.stream.next().await {
        if matches!(message, Message::Close(_)) {
            break;
        }
    }
}

/// Reads the server's stdout lines into the relay's queue.
async fn pump_stdout(stdout: ChildStdout, lines: mpsc::Sender<Utf8Bytes>) {
    let mut reader = LineReader::new(stdout, MAX_MESSAGE_BYTES);
    loop {
        match reader.next().await {
            Ok(Some(Line::Message(text))) => {
                if lines.send(text.into()).await.is_err() {
                    return;
                }
            }
            Ok(Some(Line::TooLong(bytes))) => {
                warn!("MCP server wrote a {bytes}-byte line, over the {MAX_MESSAGE_BYTES}-byte limit; dropped")
            }
            Ok(Some(Line::NotUtf8)) => warn!("MCP server wrote a line that is not UTF-8; dropped"),
            Ok(None) => return,
            Err(e) => {
                warn!("cannot read the MCP server's stdout: {e}");
                return;
            }
        }
    }
}

/// Writes the gateway's messages to the server, one per line.
async fn feed_stdin(stdin: ChildStdin, mut lines: mpsc::Receiver<Bytes>) {
    let mut stdin = BufWriter::with_capacity(64 * 1024, stdin);
    while let Some(line) = lines.recv().await {
        if write_line(&mut stdin, &line).await.is_err() {
            return;
        }
        if lines.is_empty() && stdin.flush().await.is_err() {
            return;
        }
    }
}

/// Writes one message and its newline. JSON may contain line breaks only as
/// whitespace, so they are turned into spaces to keep one message per line.
async fn write_line(stdin: &mut BufWriter<ChildStdin>, line: &[u8]) -> std::io::Result<()> {
    if line.iter().any(|&b| b == b'\n' || b == b'\r') {
        let flat: Vec<u8> = line.iter().map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b }).collect();
        stdin.write_all(&flat).await?;
    } else {
        stdin.write_all(line).await?;
    }
    stdin.write_all(b"\n").await
}

/// Sends queued frames, flushing when the queue runs dry.
async fn write(mut sink: SplitSink<Socket, Message>, mut frames: mpsc::UnboundedReceiver<Message>) {
    while let Some(message) = frames.recv().await {
        if sink.feed(message).await.is_err() {
            return;
        }
        if frames.is_empty() && sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}
