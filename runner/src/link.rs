//! One WebSocket to the gateway: a writer task that sends what the relay
//! queues (flushing when its queue runs dry), and the socket's incoming side.
//! WebSocket messages are made and read here and in [`crate::dial`] only.
//! A link runs over any sink and stream of messages, so tests drive the relay
//! through channels instead of a socket.

use bytes::Bytes;
use dynogate_shared::Control;
use futures_util::stream::BoxStream;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tracing::Instrument;

use crate::dial::Socket;

/// What came in on the socket, for the relay.
#[derive(Debug)]
pub enum Incoming {
    /// One JSON-RPC message for the MCP server.
    Message(Utf8Bytes),
    Control(Control),
    /// The socket closed or failed.
    Lost(String),
    /// Proof of life with no payload (a ping or pong).
    Alive,
}

/// One socket to the gateway.
pub struct Link {
    frames: mpsc::UnboundedSender<Message>,
    stream: BoxStream<'static, Result<Message, WsError>>,
    pub last_heard: Instant,
    writer: tokio::task::AbortHandle,
}

impl Link {
    pub fn open(socket: Socket) -> Self {
        let (sink, stream) = socket.split();
        Self::new(sink, stream)
    }

    /// A link that writes to `sink` and reads `stream`: the two halves of a
    /// socket, or channels in tests.
    pub fn new<Si, St>(sink: Si, stream: St) -> Self
    where
        Si: Sink<Message> + Unpin + Send + 'static,
        St: Stream<Item = Result<Message, WsError>> + Send + 'static,
    {
        let (frames, queue) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write(sink, queue).in_current_span()).abort_handle();
        Link { frames, stream: stream.boxed(), last_heard: Instant::now(), writer }
    }

    /// Queues a JSON-RPC message. A dead writer shows up as the end of the stream.
    pub fn send_text(&self, text: Utf8Bytes) {
        let _ = self.frames.send(Message::Text(text));
    }

    pub fn send_control(&self, control: &Control) {
        let _ = self.frames.send(Message::Binary(control.encode().into()));
    }

    pub fn ping(&self) {
        let _ = self.frames.send(Message::Ping(Bytes::new()));
    }

    /// Gives up on a socket believed dead: a half-open one could keep its
    /// writer blocked for minutes.
    pub fn abandon(self) {
        self.writer.abort();
    }

    /// The next thing that happened on the socket.
    pub async fn recv(&mut self) -> Incoming {
        loop {
            let message = self.stream.next().await;
            self.last_heard = Instant::now();
            return match message {
                Some(Ok(Message::Text(text))) => Incoming::Message(text),
                Some(Ok(Message::Binary(bytes))) => match Control::decode(&bytes) {
                    Ok(control) => Incoming::Control(control),
                    Err(e) => {
                        tracing::warn!(error = %e, "ignored a malformed control frame from the gateway");
                        continue;
                    }
                },
                Some(Ok(Message::Close(_))) | None => Incoming::Lost("the gateway closed the connection".into()),
                Some(Ok(_)) => Incoming::Alive,
                Some(Err(e)) => Incoming::Lost(e.to_string()),
            };
        }
    }

    /// Waits until the gateway closes the socket after our last words.
    pub async fn closed(mut self) {
        while let Some(Ok(message)) = self.stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    }
}

/// Sends queued frames, flushing when the queue runs dry.
async fn write(mut sink: impl Sink<Message> + Unpin, mut frames: mpsc::UnboundedReceiver<Message>) {
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

/// A link driven by channels, for tests: what the relay sends comes out of
/// the receiver, and what is pushed into the sender reads as the gateway's.
#[cfg(test)]
pub fn channel_link() -> (Link, mpsc::UnboundedReceiver<Message>, mpsc::UnboundedSender<Result<Message, WsError>>) {
    let (sent_tx, sent) = mpsc::unbounded_channel();
    let sink = futures_util::sink::unfold(sent_tx, |tx: mpsc::UnboundedSender<Message>, message| async move {
        tx.send(message).map(|()| tx)
    });
    let (says, rx) = mpsc::unbounded_channel();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    (Link::new(Box::pin(sink), stream), sent, says)
}
