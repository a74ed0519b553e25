//! Server-sent events framing: bytes in, `(event, data)` pairs out.
//!
//! [`Decoder`] is the protocol with no I/O: it is fed whatever chunks the
//! network delivers (an event may be split anywhere, even between `\r` and
//! `\n`) and hands back each complete event. [`events`] wraps it around a
//! response's byte stream. What an event *means* (an MCP message, an agent's
//! completion) is for the callers: the older MCP transport in
//! [`crate::legacy_sse`] and the agents stream in [`crate::agents`].
//!
//! Only `event` and `data` are kept; `id` and `retry` serve reconnection,
//! which neither caller does, and comment lines (`: keepalive`) are dropped.

use anyhow::bail;
use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};

/// The largest event accepted, so a server that never ends a line cannot
/// grow memory without bound. Generous: a tool result (a file, a page of
/// output) arrives as one event.
const MAX_EVENT_BYTES: usize = 64 * 1024 * 1024;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field; `message` when the server gave none, as the
    /// standard says.
    pub name: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Incremental parser: [`Decoder::push`] bytes, [`Decoder::next`] events.
#[derive(Debug, Default)]
pub struct Decoder {
    buffer: BytesMut,
    name: Option<String>,
    data: Option<String>,
}

impl Decoder {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// The next complete event in what was pushed so far, if any.
    pub fn next(&mut self) -> anyhow::Result<Option<Event>> {
        while let Some(line) = self.line() {
            if line.is_empty() {
                if let Some(event) = self.dispatch() {
                    return Ok(Some(event));
                }
                continue;
            }
            self.field(&String::from_utf8_lossy(&line));
        }
        let pending = self.buffer.len() + self.data.as_ref().map_or(0, String::len);
        if pending > MAX_EVENT_BYTES {
            bail!("an event of more than {} MiB", MAX_EVENT_BYTES / (1024 * 1024));
        }
        Ok(None)
    }

    /// Takes one line off the buffer without its ending (`\n`, `\r\n` or `\r`).
    fn line(&mut self) -> Option<Bytes> {
        let end = self.buffer.iter().position(|&b| b == b'\n' || b == b'\r')?;
        let ending = match self.buffer[end] {
            b'\n' => 1,
            // A `\r` as the last byte may be the first half of `\r\n`: wait.
            _ if end + 1 == self.buffer.len() => return None,
            _ if self.buffer[end + 1] == b'\n' => 2,
            _ => 1,
        };
        let line = self.buffer.split_to(end).freeze();
        self.buffer.advance(ending);
        Some(line)
    }

    fn field(&mut self, line: &str) {
        if line.starts_with(':') {
            return;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.name = Some(value.to_owned()),
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            _ => {}
        }
    }

    /// Ends the event at a blank line; one without data is no event.
    fn dispatch(&mut self) -> Option<Event> {
        let name = self.name.take();
        let data = self.data.take()?;
        Some(Event { name: name.filter(|n| !n.is_empty()).unwrap_or_else(|| "message".to_owned()), data })
    }
}

/// The events of a response body, ending when the body ends (an event not
/// closed by a blank line is dropped, as the standard says) or with the
/// first error.
pub fn events<S, E>(body: S) -> BoxStream<'static, anyhow::Result<Event>>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    futures_util::stream::unfold(Some((Box::pin(body), Decoder::default())), |state| async move {
        let (mut body, mut decoder) = state?;
        loop {
            match decoder.next() {
                Ok(Some(event)) => return Some((Ok(event), Some((body, decoder)))),
                Ok(None) => {}
                Err(e) => return Some((Err(e), None)),
            }
            match body.next().await {
                Some(Ok(chunk)) => decoder.push(&chunk),
                Some(Err(e)) => return Some((Err(anyhow::Error::new(e).context("the event stream broke")), None)),
                None => return None,
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(chunks: &[&str]) -> Vec<(String, String)> {
        let mut decoder = Decoder::default();
        let mut out = Vec::new();
        for chunk in chunks {
            decoder.push(chunk.as_bytes());
            while let Some(event) = decoder.next().unwrap() {
                out.push((event.name, event.data));
            }
        }
        out
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected.iter().map(|(n, d)| (n.to_string(), d.to_string())).collect()
    }

    #[test]
    fn events_are_decoded_however_the_bytes_are_split() {
        // Chunks as the network delivers them, and the (event, data) pairs expected.
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);
        let cases: &[Case] = &[
            (&["event: endpoint\ndata: /messages/?session_id=1\n\n"], &[("endpoint", "/messages/?session_id=1")]),
            (&["data: {\"a\":1}\n\n"], &[("message", "{\"a\":1}")]),
            (&["data: one\ndata: two\n\n"], &[("message", "one\ntwo")]),
            (&["event: message\r\ndata: x\r\n\r\n"], &[("message", "x")]),
            (&["event: message\r", "\ndata: x\r", "\n\r", "\n"], &[("message", "x")]),
            (&["event: message\rdata: x\r\rdata: y"], &[("message", "x")]),
            (&["ev", "ent: done\nda", "ta: [DONE]\n", "\n"], &[("done", "[DONE]")]),
            (&[": keepalive\n\n", "data: after\n\n"], &[("message", "after")]),
            (&["event: message\n: keepalive\ndata: x\n\n"], &[("message", "x")]),
            (&["data:no-space\n\n"], &[("message", "no-space")]),
            (&["data\n\n"], &[("message", "")]),
            (&["event: lonely\n\n", "data: x\n\n"], &[("message", "x")]),
            (&["id: 7\nretry: 10\ndata: x\n\n"], &[("message", "x")]),
            (&["data: unfinished\n"], &[]),
        ];
        for (chunks, expected) in cases {
            assert_eq!(decode(chunks), pairs(expected), "{chunks:?}");
        }
    }

    #[test]
    fn an_endless_line_is_refused() {
        let mut decoder = Decoder::default();
        decoder.push(&vec![b'x'; MAX_EVENT_BYTES + 1]);
        assert!(decoder.next().is_err());
    }

    #[tokio::test]
    async fn a_stream_of_chunks_becomes_events() {
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            vec![Ok(Bytes::from("event: a\ndata: 1\n\nevent: b\n")), Ok(Bytes::from("data: 2\n\n"))];
        let events: Vec<_> = events(futures_util::stream::iter(chunks)).collect().await;
        let names: Vec<_> = events.into_iter().map(|e| e.unwrap().name).collect();
        assert_eq!(names, ["a", "b"]);
    }
}
