//! A session's connection to its runner, as frames rather than WebSocket
//! messages.
//!
//! The session task reads [`Incoming`] frames and queues [`Outgoing`] ones
//! without ever waiting on the socket: a writer task (see `rendezvous`)
//! drains the [`Outbox`]. Reading and writing never block each other, so a
//! runner that is slow to read cannot stall the responses it is sending. The
//! number of frames not yet written is visible through [`Link::queued`]; the
//! session stops taking new client messages while it is high, which is how
//! backpressure reaches HTTP clients. Tests build links from channels.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use dynogate_shared::Control;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tokio::sync::mpsc;

/// A frame for the runner.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// One JSON-RPC message, verbatim.
    Message(Bytes),
    Control(Control),
    /// A heartbeat.
    Ping,
    /// Close the socket after everything queued before it.
    Close,
}

/// A frame from the runner.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// One JSON-RPC message, verbatim.
    Message(Bytes),
    Control(Control),
    /// Proof of life with no payload (a ping or pong).
    Alive,
}

/// Why a link stopped yielding frames.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("runner connection failed: {0}")]
    Transport(String),
    #[error("runner sent a malformed frame: {0}")]
    Malformed(String),
}

/// The session's side of a runner connection.
pub struct Link {
    outgoing: mpsc::UnboundedSender<Outgoing>,
    incoming: BoxStream<'static, Result<Incoming, LinkError>>,
    queued: Arc<AtomicUsize>,
    writer: Option<tokio::task::AbortHandle>,
}

/// The writer's side: frames the session queued, in order.
pub struct Outbox {
    rx: mpsc::UnboundedReceiver<Outgoing>,
    queued: Arc<AtomicUsize>,
}

impl Link {
    /// A link whose incoming frames come from `incoming` and whose outgoing
    /// frames go to the returned [`Outbox`].
    pub fn new(incoming: BoxStream<'static, Result<Incoming, LinkError>>) -> (Self, Outbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        (Self { outgoing: tx, incoming, queued: queued.clone(), writer: None }, Outbox { rx, queued })
    }

    /// The task writing this link's frames, so an abandoned link can stop it.
    pub fn set_writer(&mut self, writer: tokio::task::AbortHandle) {
        self.writer = Some(writer);
    }

    /// Gives up on a connection believed dead: stops its writer at once
    /// (on a half-open socket it could block until the kernel gives up).
    /// A link dropped without this lets its writer finish what was queued.
    pub fn abandon(self) {
        if let Some(writer) = &self.writer {
            writer.abort();
        }
    }

    /// Queues a frame. Returns `false` when the writer is gone (the socket
    /// closed); the reader side reports that as the end of the stream.
    pub fn send(&self, frame: Outgoing) -> bool {
        self.queued.fetch_add(1, Ordering::AcqRel);
        if self.outgoing.send(frame).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Frames queued and not yet written.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// The next frame from the runner; `None` once the connection is closed.
    pub async fn recv(&mut self) -> Option<Result<Incoming, LinkError>> {
        self.incoming.next().await
    }
}

impl Outbox {
    /// The next frame to write. Call [`Outbox::written`] once it is on the wire.
    pub async fn next(&mut self) -> Option<Outgoing> {
        self.rx.recv().await
    }

    /// Whether nothing is waiting to be written.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Marks one frame as written.
    pub fn written(&self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A link driven by channels, for tests: push what the "runner" says into the
/// sender, read what the session sent from the [`Outbox`].
#[cfg(test)]
pub fn channel_link() -> (Link, Outbox, mpsc::UnboundedSender<Result<Incoming, LinkError>>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let incoming =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }).boxed();
    let (link, outbox) = Link::new(incoming);
    (link, outbox, tx)
}
