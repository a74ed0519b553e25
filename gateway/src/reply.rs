//! Turning a session's event streams into HTTP responses.
//!
//! A reply that is ready quickly goes back as one `application/json` body
//! (cheapest for the client, easiest to read with curl). A reply that is slow,
//! or preceded by notifications, goes back as `text/event-stream`: the stream
//! opens at once (with a priming event carrying an id, on revisions that
//! expect one, so even a connection lost before the first message can be
//! resumed), carries each message as an `event: message` with the id
//! `<stream>-<n>`, sends a keepalive comment whenever it has been quiet for a
//! heartbeat (Heroku's router cuts connections silent for 55 s), and ends
//! after the last response. The bytes of SSE itself are written by
//! [`crate::sse_encode`], shared with the older transport.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::time::Instant;

use crate::sse_encode::{self, Comment, Encoded};
use crate::streams::{Batch, Event, EventStream, Reader, Streams};

/// Whether the client sent one message or a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Single,
    Batch,
}

/// When to switch to streaming, and how often to keep a stream alive.
#[derive(Debug, Clone, Copy)]
pub struct ReplyTiming {
    pub stream_after: Duration,
    pub keepalive: Duration,
}

/// How an SSE response opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priming {
    /// An event with an id and empty data (MCP 2025-11-25 and later).
    Event,
    /// A comment, for clients of earlier revisions.
    Comment,
}

impl Priming {
    /// What a session that negotiated `version` expects.
    pub fn for_version(version: Option<&str>) -> Self {
        match version {
            Some(v) if v >= "2025-11-25" => Priming::Event,
            _ => Priming::Comment,
        }
    }
}

/// Waits for the answer on `stream` (made of `expected` responses): plain
/// JSON when it all comes within `stream_after` with nothing before it, an
/// SSE stream otherwise.
pub async fn respond(
    streams: &Streams,
    stream: Arc<EventStream>,
    expected: usize,
    shape: Shape,
    timing: ReplyTiming,
    priming: Priming,
    headers: HeaderMap,
) -> Response {
    let deadline = Instant::now() + timing.stream_after;
    let mut early: Vec<Event> = Vec::new();
    {
        let mut reader = Reader::new(stream.clone(), None);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match reader.read(left).await {
                Batch::Events(events) => {
                    let notification = events.iter().any(|e| !e.last);
                    early.extend(events);
                    if notification {
                        break;
                    }
                    if early.len() == expected {
                        streams.forget(stream.id());
                        return json(early, shape, headers);
                    }
                }
                // Ended without every answer cannot happen (a session answers
                // all it holds when it ends); Replaced means another connection
                // resumed the stream. Either way, stream what there is.
                Batch::Ended | Batch::Replaced | Batch::Quiet => break,
            }
        }
    }
    // The SSE response starts from the beginning: what was read above is
    // sent again, this time with ids.
    sse(stream, Some(0), timing.keepalive, priming, headers)
}

/// An SSE response reading `stream` after event `after` (from
/// `Last-Event-ID`), or from where earlier readers stopped.
pub fn sse(
    stream: Arc<EventStream>,
    after: Option<u64>,
    keepalive: Duration,
    priming: Priming,
    headers: HeaderMap,
) -> Response {
    let body = async_stream(stream, after, keepalive, priming);
    let mut response = (StatusCode::OK, headers, Body::from_stream(body)).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

fn json_type() -> [(header::HeaderName, HeaderValue); 1] {
    [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))]
}

fn json(events: Vec<Event>, shape: Shape, headers: HeaderMap) -> Response {
    let body = match shape {
        Shape::Single => events.into_iter().next_back().map(|e| e.json).unwrap_or_default(),
        Shape::Batch => {
            let size = events.iter().map(|e| e.json.len() + 1).sum::<usize>() + 2;
            let mut out = BytesMut::with_capacity(size);
            out.put_u8(b'[');
            for (i, event) in events.iter().enumerate() {
                if i > 0 {
                    out.put_u8(b',');
                }
                out.put_slice(&event.json);
            }
            out.put_u8(b']');
            out.freeze()
        }
    };
    (StatusCode::OK, headers, json_type(), body).into_response()
}

/// The body of an SSE response: priming, events, keepalives, end.
fn async_stream(
    stream: Arc<EventStream>,
    after: Option<u64>,
    keepalive: Duration,
    priming: Priming,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> {
    struct State {
        reader: Reader,
        keepalive: Duration,
        priming: Option<Priming>,
    }
    // The reader attaches now, with the response: from here on the session
    // knows a client reads this stream (see `EventStream::has_reader`).
    let state = State { reader: Reader::new(stream, after), keepalive, priming: Some(priming) };
    let batches = futures_util::stream::unfold(state, |mut s| async move {
        let reader = &mut s.reader;
        if let Some(priming) = s.priming.take() {
            let first = match priming {
                Priming::Event => sse_encode::priming(&reader.stream().event_id(reader.position())),
                Priming::Comment => Comment::StreamOpen.bytes(),
            };
            return Some((vec![first], s));
        }
        let pieces = match reader.read(s.keepalive).await {
            Batch::Events(events) => encode(reader.stream(), &events),
            Batch::Quiet => vec![Comment::Keepalive.bytes()],
            Batch::Ended | Batch::Replaced => return None,
        };
        Some((pieces, s))
    });
    batches.flat_map(|pieces| futures_util::stream::iter(pieces.into_iter().map(Ok)))
}

/// SSE `message` events with their resumable ids.
fn encode(stream: &EventStream, events: &[Event]) -> Vec<Bytes> {
    let mut out = Encoded::default();
    for event in events {
        out.event(Some(&stream.event_id(event.n)), "message", &event.json);
    }
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMING: ReplyTiming =
        ReplyTiming { stream_after: Duration::from_secs(1), keepalive: Duration::from_secs(20) };

    async fn body_text(response: Response) -> String {
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn b(text: &'static str) -> Bytes {
        Bytes::from_static(text.as_bytes())
    }

    #[tokio::test]
    async fn a_quick_answer_is_plain_json_and_not_kept() {
        let streams = Streams::default();
        let stream = streams.open(1);
        stream.push(b(r#"{"id":1}"#), true);
        let response =
            respond(&streams, stream.clone(), 1, Shape::Single, TIMING, Priming::Event, HeaderMap::new()).await;
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(body_text(response).await, r#"{"id":1}"#);
        assert!(streams.find(stream.id()).is_none());
    }

    #[tokio::test]
    async fn a_batch_answer_is_a_json_array() {
        let streams = Streams::default();
        let stream = streams.open(2);
        stream.push(b(r#"{"id":1}"#), true);
        stream.push(b(r#"{"id":2}"#), true);
        let response = respond(&streams, stream, 2, Shape::Batch, TIMING, Priming::Event, HeaderMap::new()).await;
        assert_eq!(body_text(response).await, r#"[{"id":1},{"id":2}]"#);
    }

    #[tokio::test]
    async fn a_notification_first_turns_the_reply_into_a_stream_with_ids() {
        let streams = Streams::default();
        let stream = streams.open(1);
        stream.push(b(r#"{"method":"notifications/progress"}"#), false);
        stream.push(b(r#"{"id":1}"#), true);
        let id = stream.id();
        let response = respond(&streams, stream, 1, Shape::Single, TIMING, Priming::Event, HeaderMap::new()).await;
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/event-stream");
        assert_eq!(
            body_text(response).await,
            format!(
                "id: {id}-0\ndata: \n\nid: {id}-1\nevent: message\ndata: {{\"method\":\"notifications/progress\"}}\n\n\
                 id: {id}-2\nevent: message\ndata: {{\"id\":1}}\n\n"
            )
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_answer_streams_with_keepalives() {
        let streams = Streams::default();
        let stream = streams.open(1);
        let timing = ReplyTiming { stream_after: Duration::from_millis(100), keepalive: Duration::from_secs(20) };
        let writer = stream.clone();
        let answer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(45)).await;
            writer.push(b(r#"{"id":1}"#), true);
        });
        let response = respond(&streams, stream, 1, Shape::Single, timing, Priming::Comment, HeaderMap::new()).await;
        let text = body_text(response).await;
        answer.await.unwrap();
        assert!(text.starts_with(": stream open\n\n: keepalive\n\n: keepalive\n\n"), "{text}");
        assert!(text.ends_with("event: message\ndata: {\"id\":1}\n\n"), "{text}");
    }

    #[test]
    fn line_breaks_inside_a_payload_become_separate_data_fields() {
        let streams = Streams::default();
        let stream = streams.open(1);
        let out = encode(&stream, &[Event { n: 3, json: b("{\r\n\"id\":1}"), last: true }]).concat();
        let id = stream.id();
        assert_eq!(&out[..], format!("id: {id}-3\nevent: message\ndata: {{\ndata: \"id\":1}}\n\n").as_bytes());
    }
}
