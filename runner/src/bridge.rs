//! The relay between the gateway's socket and the MCP server's stdio.
//!
//! Three tasks keep the two directions independent, so a server that stops
//! reading its stdin cannot stall the responses it is writing:
//! - the **writer** owns the socket's sending half and sends what it is given
//!   (messages, control frames, pings), flushing when its queue runs dry;
//! - the **stdout pump** reads the server's lines and queues them for the
//!   writer (a full queue slows the server down: backpressure, not memory);
//! - the **stdin feeder** writes the gateway's messages to the server.
//!
//! The relay loop itself reads the socket, watches the server and the
//! heartbeat, and decides when the session is over. Then: close the server's
//! stdin, give it a moment, kill its process group, remove the session's
//! directory, and exit.

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use dynogate_shared::Control;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::process::{ChildStdin, ChildStdout};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tracing::{Instrument, debug, info, warn};

use crate::child::{self, Server};
use crate::config::Dial;
use crate::dial::{self, MAX_MESSAGE_BYTES, Socket};
use crate::lines::{Line, LineReader};

/// A runner silent for this many heartbeats is considered gone.
const MISSED_HEARTBEATS: u32 = 3;
/// How long the stdout pump gets to forward what a server wrote just before
/// it exited (its last response is usually in the pipe).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A frame for the writer task.
#[derive(Debug)]
enum Out {
    Text(String),
    Control(Control),
    Ping,
}

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

/// Serves one session; returns the process exit code.
pub async fn run(dial: Dial) -> anyhow::Result<i32> {
    let span = tracing::info_span!("runner", session = %dial.session);
    async move {
        let socket = dial::connect(&dial).await?;
        let workdir = tempfile::Builder::new()
            .prefix("dynogate-session-")
            .tempdir()
            .context("cannot create the session directory")?;
        let (sink, stream) = socket.split();
        let (out_tx, out_rx) = mpsc::channel(64);
        let writer = tokio::spawn(write(sink, out_rx).in_current_span());

        let mut server = match child::start(&dial.server, workdir.path()) {
            Ok(server) => server,
            Err(e) => {
                warn!("{e:#}");
                let _ = out_tx.send(Out::Control(Control::ChildExited { code: Some(127), signal: None })).await;
                drop(out_tx);
                let _ = writer.await;
                return Ok(1);
            }
        };
        let stdout = server.stdout.take().expect("stdout is piped");
        let stdin = server.stdin.take().expect("stdin is piped");
        let pump = tokio::spawn(pump_stdout(stdout, out_tx.clone()).in_current_span());
        let (line_tx, line_rx) = mpsc::channel(64);
        let feeder = tokio::spawn(feed_stdin(stdin, line_rx).in_current_span());

        let end = relay(stream, &mut server, line_tx, &out_tx, dial.heartbeat).await;
        info!(%end, "session over");
        // Closing stdin is how a stdio MCP server is asked to leave; abort
        // the feeder in case it is stuck writing to a server that stopped reading.
        feeder.abort();
        let code = match end {
            End::ServerExited(status) => {
                if tokio::time::timeout(DRAIN_TIMEOUT, pump).await.is_err() {
                    debug!("stdout still open after the server exited (a grandchild holds it)");
                }
                use std::os::unix::process::ExitStatusExt;
                let exited = Control::ChildExited { code: status.code(), signal: status.signal() };
                let _ = out_tx.send(Out::Control(exited)).await;
                server.stop(dial.stop_grace).await;
                0
            }
            End::GatewayShutdown(_) | End::Signal => {
                server.stop(dial.stop_grace).await;
                0
            }
            End::ConnectionLost(_) => {
                server.stop(dial.stop_grace).await;
                1
            }
        };
        drop(out_tx);
        let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
        if let Err(e) = workdir.close() {
            warn!("cannot remove the session directory: {e}");
        }
        Ok(code)
    }
    .instrument(span)
    .await
}

async fn relay(
    mut stream: SplitStream<Socket>,
    server: &mut Server,
    line_tx: mpsc::Sender<Bytes>,
    out_tx: &mpsc::Sender<Out>,
    heartbeat: Duration,
) -> End {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("can install a SIGINT handler");
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let silence_limit = heartbeat * MISSED_HEARTBEATS;
    let mut last_heard = Instant::now();
    // A message read from the socket that the feeder has no room for yet;
    // while it waits, the socket is not read (backpressure to the gateway).
    let mut pending: Option<Bytes> = None;
    loop {
        tokio::select! {
            biased;
            _ = term.recv() => return End::Signal,
            _ = interrupt.recv() => return End::Signal,
            status = server.wait() => match status {
                Ok(status) => return End::ServerExited(status),
                Err(e) => return End::ConnectionLost(format!("cannot wait for the MCP server: {e}")),
            },
            permit = line_tx.reserve(), if pending.is_some() => {
                let line = pending.take().expect("guarded by is_some");
                match permit {
                    Ok(permit) => permit.send(line),
                    Err(_) => debug!("MCP server's stdin is closed; dropped a message"),
                }
            }
            message = stream.next(), if pending.is_none() => {
                last_heard = Instant::now();
                match message {
                    Some(Ok(Message::Text(text))) => pending = Some(Bytes::from(text)),
                    Some(Ok(Message::Binary(bytes))) => match Control::decode(&bytes) {
                        Ok(Control::Shutdown { reason }) => return End::GatewayShutdown(reason),
                        Ok(other) => warn!(control = %other, "unexpected control frame from the gateway"),
                        Err(e) => warn!("{e}"),
                    },
                    Some(Ok(Message::Close(_))) | None => {
                        return End::ConnectionLost("the gateway closed the connection".into());
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return End::ConnectionLost(e.to_string()),
                }
            }
            _ = ticker.tick() => {
                if pending.is_none() && last_heard.elapsed() > silence_limit {
                    return End::ConnectionLost(format!("no heartbeat from the gateway for {}s", silence_limit.as_secs()));
                }
                // A full queue means frames are flowing; no ping needed then.
                let _ = out_tx.try_send(Out::Ping);
            }
        }
    }
}

/// Forwards the server's stdout lines to the writer.
async fn pump_stdout(stdout: ChildStdout, out_tx: mpsc::Sender<Out>) {
    let mut lines = LineReader::new(stdout, MAX_MESSAGE_BYTES);
    loop {
        match lines.next().await {
            Ok(Some(Line::Message(text))) => {
                if out_tx.send(Out::Text(text)).await.is_err() {
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
async fn write(mut sink: SplitSink<Socket, Message>, mut frames: mpsc::Receiver<Out>) {
    while let Some(frame) = frames.recv().await {
        let message = match frame {
            Out::Text(text) => Message::Text(text.into()),
            Out::Control(control) => Message::Binary(control.encode().into()),
            Out::Ping => Message::Ping(Bytes::new()),
        };
        if sink.feed(message).await.is_err() {
            return;
        }
        if frames.is_empty() && sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}
