//! Runner connections that reach an instance other than their session's
//! owner.
//!
//! The router sends a runner's dial to any instance. The one it reaches
//! checks the token (every instance shares the signing secret), does the
//! hello, and then carries the socket's messages to the owner through Redis
//! ([`dial`]); the owner turns them into a [`Link`] like any other
//! ([`accept`]), checks the token's id and the runner slot, and the session
//! goes on as if the runner had dialed it directly, replay window and all.
//! Either side ending sends a `close` frame to the other.

use std::sync::Arc;

use axum::extract::ws::{Message as WsMessage, Utf8Bytes, WebSocket};
use bytes::Bytes;
use dynogate_shared::Control;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, warn};

use super::Cluster;
use super::wire::{Frame, Header, Message};
use crate::AppState;
use crate::link::{Incoming, Link, LinkError, Outgoing};
use crate::session::Command;

/// Frames from a runner that may wait for the owner's session. The replay
/// window bounds what a runner sends unacknowledged far below this.
pub const QUEUE: usize = 4096;

/// A dial this instance accepted for a session `owner` holds: carries the
/// socket's frames both ways until either side ends.
pub async fn dial(
    cluster: Arc<Cluster>,
    owner: String,
    mut socket: WebSocket,
    session: String,
    jti: String,
    traceparent: Option<String>,
) {
    let (received, acked) = match crate::rendezvous::hello(&mut socket).await {
        Ok(counts) => counts,
        Err(_) => return,
    };
    let conn = crate::sessions::random_id();
    let mut down = cluster.inbox.expect(&conn, QUEUE);
    let dial =
        Header::Dial { conn: conn.clone(), from: cluster.instance.clone(), session, jti, received, acked, traceparent };
    if !matches!(cluster.send(&owner, &Message::bare(dial)).await, Ok(true)) {
        warn!("the session's instance is gone; closing the runner's connection");
        cluster.inbox.forget(&conn);
        let _ = socket.close().await;
        return;
    }
    info!(owner = %dynogate_shared::names::log_id(&owner), "runner connected here; carrying it to its session's instance");
    crate::metrics::tunnelled();
    let up = |frame: Frame, payload: Bytes| Message::new(Header::Up { conn: conn.clone(), frame }, payload);
    loop {
        tokio::select! {
            message = socket.recv() => {
                let (frame, payload) = match message {
                    Some(Ok(WsMessage::Text(text))) => (Frame::Text, Bytes::from(text)),
                    Some(Ok(WsMessage::Binary(bytes))) => (Frame::Binary, bytes),
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => (Frame::Ping, Bytes::new()),
                    Some(Ok(WsMessage::Close(_))) | None => (Frame::Close, Bytes::new()),
                    Some(Err(e)) => (Frame::Close, Bytes::from(e.to_string())),
                };
                let closing = frame == Frame::Close;
                if !matches!(cluster.send(&owner, &up(frame, payload)).await, Ok(true)) || closing {
                    break;
                }
            }
            message = down.recv() => {
                let message = match message {
                    Some(Message { header: Header::Down { frame, .. }, payload }) => match frame {
                        Frame::Text => match Utf8Bytes::try_from(payload) {
                            Ok(text) => WsMessage::Text(text),
                            Err(_) => continue,
                        },
                        Frame::Binary => WsMessage::Binary(payload),
                        Frame::Ping => WsMessage::Ping(Bytes::new()),
                        Frame::Close => break,
                    },
                    Some(_) => continue,
                    // Our subscriber was lost: frames may be missing.
                    None => {
                        let _ = cluster.send(&owner, &up(Frame::Close, Bytes::from_static(b"relay lost"))).await;
                        break;
                    }
                };
                if socket.send(message).await.is_err() {
                    let _ = cluster.send(&owner, &up(Frame::Close, Bytes::new())).await;
                    break;
                }
            }
        }
    }
    cluster.inbox.forget(&conn);
    let _ = socket.close().await;
    debug!("carried runner connection ended");
}

/// The owner's side: a runner reached another instance for one of our
/// sessions. `up` receives its frames (registered before this task ran, so
/// none are missed).
pub async fn accept(state: AppState, cluster: Arc<Cluster>, message: Message, up: mpsc::Receiver<Message>) {
    let Header::Dial { conn, from, session, jti, received, acked, traceparent } = message.header else { return };
    let span = tracing::info_span!("rendezvous", session = %dynogate_shared::names::log_id(&session), via = %dynogate_shared::names::log_id(&from));
    if let Some(parent) = &traceparent {
        dynogate_telemetry::set_parent(&span, parent);
    }
    let refuse = |why: &'static str| {
        let (cluster, from, conn) = (cluster.clone(), from.clone(), conn.clone());
        async move {
            let (cluster, from, conn) = (cluster, from, conn);
            warn!("carried runner dial refused: {why}");
            cluster.inbox.forget(&conn);
            let close = Message::new(Header::Down { conn, frame: Frame::Close }, Bytes::from_static(why.as_bytes()));
            let _ = cluster.send(&from, &close).await;
        }
    };
    async {
        let Some(handle) = state.sessions.get_any(&session) else {
            return refuse("token for a session that is not live").await;
        };
        if !handle.accepts_token(&jti) {
            return refuse("token is not one this session issued, or it was superseded").await;
        }
        let Some(slot) = handle.claim_runner_slot() else {
            handle.probe();
            return refuse("token presented while the session's runner is connected").await;
        };
        info!(received, "runner connected through another instance");
        let link = link(cluster.clone(), from.clone(), conn.clone(), up);
        let attach = Command::Attach { link, slot, received, acked, jti: jti.clone() };
        let _ = handle.send(attach, state.config.timeouts.request).await;
    }
    .instrument(span)
    .await
}

/// A [`Link`] whose frames travel through the dialing instance `from`.
fn link(cluster: Arc<Cluster>, from: String, conn: String, up: mpsc::Receiver<Message>) -> Link {
    let incoming = futures_util::stream::unfold(up, |mut up| async move {
        let item = match up.recv().await? {
            Message { header: Header::Up { frame, .. }, payload } => match frame {
                Frame::Text => Ok(Incoming::Message(payload)),
                Frame::Binary => {
                    Control::decode(&payload).map(Incoming::Control).map_err(|e| LinkError::Malformed(e.to_string()))
                }
                Frame::Ping => Ok(Incoming::Alive),
                Frame::Close if payload.is_empty() => return None,
                Frame::Close => Err(LinkError::Transport(String::from_utf8_lossy(&payload).into_owned())),
            },
            _ => Err(LinkError::Malformed("a frame of another kind on a runner tunnel".into())),
        };
        Some((item, up))
    })
    .boxed();
    let (mut link, mut outbox) = Link::new(incoming);
    let writer = tokio::spawn(
        async move {
            // Dropped when the writer ends, or is aborted for a link given up on.
            let _closer = Closer { cluster: cluster.clone(), from: from.clone(), conn: conn.clone() };
            while let Some(frame) = outbox.next().await {
                let (kind, payload) = match frame {
                    Outgoing::Message(json) => (Frame::Text, json),
                    Outgoing::Control(control) => (Frame::Binary, Bytes::from(control.encode())),
                    Outgoing::Ping => (Frame::Ping, Bytes::new()),
                    Outgoing::Close => (Frame::Close, Bytes::new()),
                };
                let down = Message::new(Header::Down { conn: conn.clone(), frame: kind }, payload);
                let delivered = matches!(cluster.send(&from, &down).await, Ok(true));
                outbox.written();
                if !delivered || kind == Frame::Close {
                    // The incoming side ends too, so the session sees the loss.
                    cluster.inbox.forget(&conn);
                    break;
                }
            }
        }
        .in_current_span(),
    );
    link.set_writer(writer.abort_handle());
    link
}

/// Owned by the link's writer: when it ends (the session dropped the link
/// after its last frames, or abandoned it), the dialing instance closes the
/// socket and this instance stops taking its frames.
struct Closer {
    cluster: Arc<Cluster>,
    from: String,
    conn: String,
}

impl Drop for Closer {
    fn drop(&mut self) {
        self.cluster.inbox.forget(&self.conn);
        let (cluster, from) = (self.cluster.clone(), std::mem::take(&mut self.from));
        let close = Message::bare(Header::Down { conn: std::mem::take(&mut self.conn), frame: Frame::Close });
        tokio::spawn(async move {
            let _ = cluster.send(&from, &close).await;
        });
    }
}
