//! The SSE wire format, written once for both transports: events (with an
//! id on streamable HTTP, without on the older transport) and comments.
//!
//! JSON never needs raw line breaks, but a payload that has them still
//! arrives intact: each line becomes its own `data:` field, which SSE joins
//! back with `\n`. A lone `\r` also ends a line in SSE, so it is a line break
//! here too; without this a payload could forge fields of its own.

use bytes::{BufMut, Bytes, BytesMut};

/// Appends one event: optional `id`, `event: <name>`, the data lines.
pub fn event(out: &mut BytesMut, id: Option<&str>, name: &str, data: &[u8]) {
    out.reserve(data.len() + name.len() + id.map_or(0, str::len) + 24);
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(id.as_bytes());
        out.put_u8(b'\n');
    }
    out.put_slice(b"event: ");
    out.put_slice(name.as_bytes());
    out.put_u8(b'\n');
    let mut rest = data;
    loop {
        let end = rest.iter().position(|&b| b == b'\n' || b == b'\r').unwrap_or(rest.len());
        out.put_slice(b"data: ");
        out.put_slice(&rest[..end]);
        out.put_u8(b'\n');
        if end == rest.len() {
            break;
        }
        // `\r\n` is one line break.
        let skip = if rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n') { 2 } else { 1 };
        rest = &rest[end + skip..];
    }
    out.put_u8(b'\n');
}

/// An event with an id and empty data: a point a client can resume from.
pub fn priming(id: &str) -> Bytes {
    Bytes::from(format!("id: {id}\ndata: \n\n"))
}

/// The comment lines the gateway sends: clients ignore them, but they are
/// bytes on the wire, which keeps proxies from timing a stream out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comment {
    /// After a heartbeat of silence.
    Keepalive,
    /// The first bytes of a stream, for revisions without priming events.
    StreamOpen,
}

impl Comment {
    pub fn bytes(self) -> Bytes {
        Bytes::from_static(match self {
            Comment::Keepalive => b": keepalive\n\n",
            Comment::StreamOpen => b": stream open\n\n",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_framed_with_one_data_field_per_line() {
        let cases: &[(Option<&str>, &str, &str, &str)] = &[
            (Some("3-1"), "message", r#"{"id":1}"#, "id: 3-1\nevent: message\ndata: {\"id\":1}\n\n"),
            (None, "message", "{\r\n\"id\":1}", "event: message\ndata: {\ndata: \"id\":1}\n\n"),
            (None, "endpoint", "/messages/?session_id=ab", "event: endpoint\ndata: /messages/?session_id=ab\n\n"),
            // A lone CR must not let a payload start a field of its own.
            (None, "message", "a\rid: 9", "event: message\ndata: a\ndata: id: 9\n\n"),
            (Some("0-2"), "message", "", "id: 0-2\nevent: message\ndata: \n\n"),
        ];
        for (id, name, data, want) in cases {
            let mut out = BytesMut::new();
            event(&mut out, *id, name, data.as_bytes());
            assert_eq!(std::str::from_utf8(&out).unwrap(), *want, "{data:?}");
        }
    }

    #[test]
    fn comments_and_priming() {
        assert_eq!(&Comment::Keepalive.bytes()[..], b": keepalive\n\n");
        assert_eq!(&Comment::StreamOpen.bytes()[..], b": stream open\n\n");
        assert_eq!(&priming("4-0")[..], b"id: 4-0\ndata: \n\n");
    }
}
