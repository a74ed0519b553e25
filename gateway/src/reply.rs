//! Turning a session's deliveries into an HTTP response.
//!
//! A reply that is ready quickly goes back as one `application/json` body
//! (cheapest for the client, easiest to read with curl). A reply that is slow,
//! or preceded by notifications, goes back as `text/event-stream`: the stream
//! opens at once with a comment, carries notifications as they come, sends a
//! keepalive comment whenever it has been quiet for a heartbeat (Heroku's
//! router cuts connections silent for 55 s), and ends after the last response.
//! The SSE framing lives here and nowhere else.

use std::collections::VecDeque;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::jsonrpc::{code, error_body};
use crate::session::Delivery;

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

/// Waits for `expected` final responses on `rx` and answers with JSON if they
/// all come within `stream_after` with nothing before them, else with SSE.
pub async fn respond(
    mut rx: mpsc::Receiver<Delivery>,
    expected: usize,
    shape: Shape,
    timing: ReplyTiming,
    headers: HeaderMap,
) -> Response {
    let deadline = Instant::now() + timing.stream_after;
    let mut early = VecDeque::new();
    let mut finals = 0;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(delivery)) if delivery.last => {
                early.push_back(delivery);
                finals += 1;
                if finals == expected {
                    return json(early, shape, headers);
                }
            }
            Ok(Some(notification)) => {
                early.push_back(notification);
                break;
            }
            Ok(None) => {
                // Every call holds a permit for its answer until the session
                // fills it, so this means the session task itself vanished.
                if early.is_empty() {
                    let body = error_body(None, code::INTERNAL_ERROR, "the session ended without answering", None);
                    return (StatusCode::INTERNAL_SERVER_ERROR, json_type(), body).into_response();
                }
                break;
            }
            Err(_) => break,
        }
    }
    stream(early, rx, expected - finals, timing.keepalive, headers)
}

/// An SSE response that lasts as long as `rx` does (the GET stream).
pub fn open_stream(rx: mpsc::Receiver<Delivery>, keepalive: Duration) -> Response {
    stream(VecDeque::new(), rx, usize::MAX, keepalive, HeaderMap::new())
}

fn json_type() -> [(header::HeaderName, HeaderValue); 1] {
    [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))]
}

fn json(deliveries: VecDeque<Delivery>, shape: Shape, headers: HeaderMap) -> Response {
    let body = match shape {
        Shape::Single => deliveries.into_iter().next_back().map(|d| d.json).unwrap_or_default(),
        Shape::Batch => {
            let size = deliveries.iter().map(|d| d.json.len() + 1).sum::<usize>() + 2;
            let mut out = BytesMut::with_capacity(size);
            out.put_u8(b'[');
            for (i, delivery) in deliveries.iter().enumerate() {
                if i > 0 {
                    out.put_u8(b',');
                }
                out.put_slice(&delivery.json);
            }
            out.put_u8(b']');
            out.freeze()
        }
    };
    (StatusCode::OK, headers, json_type(), body).into_response()
}

struct StreamState {
    early: VecDeque<Delivery>,
    rx: mpsc::Receiver<Delivery>,
    remaining: usize,
    keepalive: Duration,
    opened: bool,
}

fn stream(
    early: VecDeque<Delivery>,
    rx: mpsc::Receiver<Delivery>,
    remaining: usize,
    keepalive: Duration,
    headers: HeaderMap,
) -> Response {
    let state = StreamState { early, rx, remaining, keepalive, opened: false };
    let events = futures_util::stream::unfold(state, |mut s| async move {
        let chunk = next_chunk(&mut s).await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), s))
    });
    let mut response = (StatusCode::OK, headers, Body::from_stream(events)).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

async fn next_chunk(s: &mut StreamState) -> Option<Bytes> {
    if !s.opened {
        s.opened = true;
        if s.early.is_empty() {
            // First bytes right away, so proxies and clients know the stream is alive.
            return Some(Bytes::from_static(b": stream open\n\n"));
        }
    }
    if let Some(delivery) = s.early.pop_front() {
        return Some(event(&delivery, &mut s.remaining));
    }
    if s.remaining == 0 {
        return None;
    }
    tokio::select! {
        delivery = s.rx.recv() => delivery.map(|d| event(&d, &mut s.remaining)),
        () = tokio::time::sleep(s.keepalive) => Some(Bytes::from_static(b": keepalive\n\n")),
    }
}

/// One SSE `message` event. JSON never needs raw line breaks, but a payload
/// that has them still arrives intact: each line becomes its own `data:`
/// field, which SSE joins back with `\n`.
fn event(delivery: &Delivery, remaining: &mut usize) -> Bytes {
    if delivery.last {
        *remaining = remaining.saturating_sub(1);
    }
    let json = &delivery.json;
    let mut out = BytesMut::with_capacity(json.len() + 24);
    out.put_slice(b"event: message\n");
    for line in json.split(|&b| b == b'\n') {
        out.put_slice(b"data: ");
        out.put_slice(line.strip_suffix(b"\r").unwrap_or(line));
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(json: &'static str, last: bool) -> Delivery {
        Delivery { json: Bytes::from_static(json.as_bytes()), last }
    }

    const TIMING: ReplyTiming =
        ReplyTiming { stream_after: Duration::from_secs(1), keepalive: Duration::from_secs(20) };

    async fn body_text(response: Response) -> String {
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_quick_answer_is_plain_json() {
        let (tx, rx) = mpsc::channel(4);
        tx.send(delivery(r#"{"id":1}"#, true)).await.unwrap();
        let response = respond(rx, 1, Shape::Single, TIMING, HeaderMap::new()).await;
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(body_text(response).await, r#"{"id":1}"#);
    }

    #[tokio::test]
    async fn a_batch_answer_is_a_json_array() {
        let (tx, rx) = mpsc::channel(4);
        tx.send(delivery(r#"{"id":1}"#, true)).await.unwrap();
        tx.send(delivery(r#"{"id":2}"#, true)).await.unwrap();
        let response = respond(rx, 2, Shape::Batch, TIMING, HeaderMap::new()).await;
        assert_eq!(body_text(response).await, r#"[{"id":1},{"id":2}]"#);
    }

    #[tokio::test]
    async fn a_notification_first_turns_the_reply_into_a_stream() {
        let (tx, rx) = mpsc::channel(4);
        tx.send(delivery(r#"{"method":"notifications/progress"}"#, false)).await.unwrap();
        tx.send(delivery(r#"{"id":1}"#, true)).await.unwrap();
        drop(tx);
        let response = respond(rx, 1, Shape::Single, TIMING, HeaderMap::new()).await;
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/event-stream");
        assert_eq!(
            body_text(response).await,
            "event: message\ndata: {\"method\":\"notifications/progress\"}\n\nevent: message\ndata: {\"id\":1}\n\n"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_answer_streams_with_keepalives() {
        let (tx, rx) = mpsc::channel(4);
        let timing = ReplyTiming { stream_after: Duration::from_millis(100), keepalive: Duration::from_secs(20) };
        let answer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(45)).await;
            tx.send(delivery(r#"{"id":1}"#, true)).await.unwrap();
        });
        let response = respond(rx, 1, Shape::Single, timing, HeaderMap::new()).await;
        let text = body_text(response).await;
        answer.await.unwrap();
        assert_eq!(text, ": stream open\n\n: keepalive\n\n: keepalive\n\nevent: message\ndata: {\"id\":1}\n\n");
    }

    #[test]
    fn line_breaks_inside_a_payload_become_separate_data_fields() {
        let mut remaining = 1;
        let bytes = event(&delivery("{\r\n\"id\":1}", true), &mut remaining);
        assert_eq!(&bytes[..], b"event: message\ndata: {\ndata: \"id\":1}\n\n");
        assert_eq!(remaining, 0);
    }
}
