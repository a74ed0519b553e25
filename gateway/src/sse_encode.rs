//! The SSE wire format, written once for both transports: events (with an
//! id on streamable HTTP, without on the older transport) and comments.
//!
//! JSON never needs raw line breaks, but a payload that has them still
//! arrives intact: each line becomes its own `data:` field, which SSE joins
//! back with `\n`. A lone `\r` also ends a line in SSE, so it is a line break
//! here too; without this a payload could forge fields of its own.

use bytes::{BufMut, Bytes, BytesMut};

/// Data lines at least this long are not copied but sent as slices of the
/// message they came from (a shared, reference-counted buffer). A client
/// that reads slowly then holds the gateway to one copy of a large message,
/// the one its stream keeps, instead of also an encoded copy waiting in the
/// connection. Shorter pieces are copied together into one write.
const SHARE_FROM: usize = 64 * 1024;

/// The SSE bytes of a run of events, as pieces to write in order.
#[derive(Debug, Default)]
pub struct Encoded {
    pieces: Vec<Bytes>,
    buffer: BytesMut,
}

impl Encoded {
    /// Appends one event: optional `id`, `event: <name>`, the data lines.
    pub fn event(&mut self, id: Option<&str>, name: &str, data: &Bytes) {
        if let Some(id) = id {
            self.buffer.put_slice(b"id: ");
            self.buffer.put_slice(id.as_bytes());
            self.buffer.put_u8(b'\n');
        }
        self.buffer.put_slice(b"event: ");
        self.buffer.put_slice(name.as_bytes());
        self.buffer.put_u8(b'\n');
        let mut start = 0;
        loop {
            let end = data[start..].iter().position(|&b| b == b'\n' || b == b'\r').map_or(data.len(), |i| start + i);
            self.buffer.put_slice(b"data: ");
            self.data(data.slice(start..end));
            self.buffer.put_u8(b'\n');
            if end == data.len() {
                break;
            }
            // `\r\n` is one line break.
            let skip = if data[end] == b'\r' && data.get(end + 1) == Some(&b'\n') { 2 } else { 1 };
            start = end + skip;
        }
        self.buffer.put_u8(b'\n');
    }

    fn data(&mut self, line: Bytes) {
        if line.len() < SHARE_FROM {
            self.buffer.put_slice(&line);
            return;
        }
        if !self.buffer.is_empty() {
            self.pieces.push(self.buffer.split().freeze());
        }
        self.pieces.push(line);
    }

    /// The pieces, in order.
    pub fn finish(mut self) -> Vec<Bytes> {
        if !self.buffer.is_empty() {
            self.pieces.push(self.buffer.freeze());
        }
        self.pieces
    }
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
            let mut out = Encoded::default();
            out.event(*id, name, &Bytes::copy_from_slice(data.as_bytes()));
            assert_eq!(std::str::from_utf8(&out.finish().concat()).unwrap(), *want, "{data:?}");
        }
    }

    #[test]
    fn long_data_lines_are_shared_not_copied() {
        let long = Bytes::from(format!("{{\"data\":\"{}\"}}\n{{}}", "x".repeat(SHARE_FROM)));
        let mut out = Encoded::default();
        out.event(Some("1-1"), "message", &Bytes::from_static(b"{}"));
        out.event(Some("1-2"), "message", &long);
        out.event(Some("1-3"), "message", &Bytes::from_static(b"{}"));
        let pieces = out.finish();
        assert_eq!(pieces.len(), 3, "small pieces are joined around the shared line");
        let line = &long[..long.len() - 3];
        assert_eq!(pieces[1].as_ptr(), line.as_ptr(), "the long line is a slice of the message");
        assert_eq!(pieces[1].len(), line.len());
        let want = format!(
            "id: 1-1\nevent: message\ndata: {{}}\n\nid: 1-2\nevent: message\ndata: {}\ndata: {{}}\n\n\
             id: 1-3\nevent: message\ndata: {{}}\n\n",
            std::str::from_utf8(line).unwrap()
        );
        assert_eq!(std::str::from_utf8(&pieces.concat()).unwrap(), want);
    }

    #[test]
    fn comments_and_priming() {
        assert_eq!(&Comment::Keepalive.bytes()[..], b": keepalive\n\n");
        assert_eq!(&Comment::StreamOpen.bytes()[..], b": stream open\n\n");
        assert_eq!(&priming("4-0")[..], b"id: 4-0\ndata: \n\n");
    }
}
