//! The messages instances send each other through their Redis inboxes, and
//! their bytes: one pub/sub message is a JSON header, a newline, then the
//! payload as raw bytes (a body chunk, a runner frame), so bodies cost no
//! escaping.
//!
//! A relayed HTTP exchange is `request` → `head` → `data`* → `end`, keyed by
//! a request id (`rid`), or `request` → `head` with the whole body when the
//! answer was complete at once, or `request` → `missing` when the receiver
//! does not hold the session; the requester sends `cancel` when its client
//! leaves.
//! A tunnelled runner connection is `dial`, then `up` (runner → owner) and
//! `down` (owner → runner) frames keyed by a connection id (`conn`), ended
//! by a `close` frame either way.

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// What a message is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Header {
    /// An HTTP request for a session the receiver owns; the payload is its body.
    Request { rid: String, from: String, method: String, uri: String, headers: Vec<(String, String)> },
    /// The status and headers of the answer; the payload is the start of
    /// its body, or all of it when `whole`.
    Head { rid: String, status: u16, headers: Vec<(String, String)>, whole: bool },
    /// The receiver does not hold the session the request names.
    Missing { rid: String },
    /// A piece of the answer's body: the payload.
    Data { rid: String },
    /// The answer is complete, or was cut (`error`).
    End { rid: String, error: Option<String> },
    /// The requester's client went away: stop answering.
    Cancel { rid: String },
    /// A runner dialed the sender for a session the receiver owns, and said
    /// hello; `received` is its count of frames from the gateway.
    Dial {
        conn: String,
        from: String,
        session: String,
        jti: String,
        received: u64,
        acked: u64,
        traceparent: Option<String>,
    },
    /// A frame from the runner, dialer → owner.
    Up { conn: String, frame: Frame },
    /// A frame for the runner, owner → dialer.
    Down { conn: String, frame: Frame },
    /// The sender let `session` go: take it over (keyed by the session id).
    Adopt { session: String },
}

/// A WebSocket message carried in an `up` or `down`; its bytes are the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Frame {
    /// A JSON-RPC message (a text message).
    Text,
    /// A control frame (a binary message).
    Binary,
    /// A ping (down) or a proof of life (up).
    Ping,
    /// The connection is over; the payload, if any, says why.
    Close,
}

impl Header {
    /// The exchange or connection a message belongs to.
    pub fn key(&self) -> &str {
        match self {
            Header::Request { rid, .. }
            | Header::Head { rid, .. }
            | Header::Missing { rid }
            | Header::Data { rid }
            | Header::End { rid, .. }
            | Header::Cancel { rid } => rid,
            Header::Dial { conn, .. } | Header::Up { conn, .. } | Header::Down { conn, .. } => conn,
            Header::Adopt { session } => session,
        }
    }
}

/// One message: a header and its payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub header: Header,
    pub payload: Bytes,
}

/// Why bytes from an inbox are not a message.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("no header line")]
    NoHeader,
    #[error("bad header: {0}")]
    Header(#[from] serde_json::Error),
}

impl Message {
    pub fn new(header: Header, payload: impl Into<Bytes>) -> Self {
        Self { header, payload: payload.into() }
    }

    pub fn bare(header: Header) -> Self {
        Self { header, payload: Bytes::new() }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(&self.header).expect("headers serialize");
        out.reserve(1 + self.payload.len());
        out.push(b'\n');
        out.extend_from_slice(&self.payload);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let split = bytes.iter().position(|&b| b == b'\n').ok_or(WireError::NoHeader)?;
        let header = serde_json::from_slice(&bytes[..split])?;
        let mut payload = BytesMut::with_capacity(bytes.len() - split - 1);
        payload.extend_from_slice(&bytes[split + 1..]);
        Ok(Self { header, payload: payload.freeze() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_survive_the_round_trip_with_any_payload_bytes() {
        let message = Message::new(
            Header::Request {
                rid: "r1".into(),
                from: "i1".into(),
                method: "POST".into(),
                uri: "/mcp".into(),
                headers: vec![("mcp-session-id".into(), "abc".into())],
            },
            Bytes::from_static(b"{\"a\":1}\n\0\xff"),
        );
        assert_eq!(Message::decode(&message.encode()).unwrap(), message);
        let frame = Message::bare(Header::Down { conn: "c".into(), frame: Frame::Close });
        assert_eq!(Message::decode(&frame.encode()).unwrap(), frame);
        assert_eq!(frame.header.key(), "c");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(Message::decode(b"no newline"), Err(WireError::NoHeader)));
        assert!(matches!(Message::decode(b"{\"t\":\"nope\"}\n"), Err(WireError::Header(_))));
    }
}
