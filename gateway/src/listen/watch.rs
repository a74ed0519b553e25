//! What each connection is doing, for its deadlines: waiting for a request
//! head, serving a request, or idle between requests; and the body wrappers
//! that keep it up to date.
//!
//! hyper's own `header_read_timeout` starts as soon as a connection is ready
//! for the next request, so it cannot tell a client dribbling a request head
//! (close within `HEADER_READ_TIMEOUT`) from a proxy keeping an idle
//! connection for its next request (Heroku's router keeps them 90 s; close
//! only after `IDLE_CONNECTION_TIMEOUT`, or a request sent just as we close
//! fails). [`Clock`] tells them apart: the first byte read while idle starts
//! the head deadline, the request reaching the router stops it, and the
//! response body being dropped (sent, or abandoned) starts the idle one.
//! While a response streams (SSE) there is no deadline at all.
//!
//! Cost per request: two atomic stores and one `Instant::now()`; per read,
//! one atomic load. Nothing is allocated per request except a timer for a
//! request body that is not all there when first read.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection's phase and when it began, packed in one word: the phase in
/// the top two bits, milliseconds since the connection opened below.
pub struct Clock {
    opened: Instant,
    state: AtomicU64,
}

const HEAD: u64 = 0;
const BUSY: u64 = 1;
const IDLE: u64 = 2;
const SHIFT: u32 = 62;
const MILLIS: u64 = (1 << SHIFT) - 1;

impl Clock {
    /// A new connection's clock: it owes its first request head from now.
    pub fn start() -> Self {
        Clock { opened: Instant::now(), state: AtomicU64::new(HEAD << SHIFT) }
    }

    fn set(&self, phase: u64) {
        let millis = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(MILLIS).min(MILLIS);
        self.state.store(phase << SHIFT | millis, Ordering::Relaxed);
    }

    fn phase(&self) -> u64 {
        self.state.load(Ordering::Relaxed) >> SHIFT
    }

    /// Bytes arrived: if the connection was idle, a request head has begun.
    fn on_read(&self) {
        if self.phase() == IDLE {
            self.set(HEAD);
        }
    }

    /// A whole request head arrived.
    pub fn on_request(&self) {
        self.set(BUSY);
    }

    /// The response is over (sent or abandoned); the connection is idle.
    fn on_response_end(&self) {
        self.set(IDLE);
    }

    /// When the connection must be closed if nothing changes, or `None`
    /// while a request is being served.
    pub fn deadline(&self, head: Duration, idle: Duration) -> Option<Instant> {
        let state = self.state.load(Ordering::Relaxed);
        let since = self.opened + Duration::from_millis(state & MILLIS);
        match state >> SHIFT {
            HEAD => Some(since + head),
            IDLE => Some(since + idle),
            _ => None,
        }
    }
}

/// The socket, noting on the [`Clock`] when bytes arrive. Writes go straight
/// through (vectored too, which hyper uses for head and body together).
pub struct Watched<T> {
    io: T,
    clock: Arc<Clock>,
}

impl<T> Watched<T> {
    pub fn new(io: T, clock: Arc<Clock>) -> Self {
        Watched { io, clock }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            this.clock.on_read();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A response body that marks the connection idle when dropped: hyper drops
/// it once the last byte is written, or when the client goes away.
pub struct Tracked {
    body: Body,
    _end: EndOfResponse,
}

/// Marks the response over when dropped, whether or not a body was made.
pub struct EndOfResponse(pub Arc<Clock>);

impl Drop for EndOfResponse {
    fn drop(&mut self) {
        self.0.on_response_end();
    }
}

impl Tracked {
    pub fn new(body: Body, end: EndOfResponse) -> Self {
        Tracked { body, _end: end }
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body that fails with [`BodyTimedOut`] when it has not all
/// arrived within its limit of the handler first waiting for it. A body that
/// is already there (most are: small JSON in the head's packet) never
/// starts a timer.
pub struct Deadline<B> {
    body: B,
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> Deadline<B> {
    pub fn new(body: B, limit: Duration) -> Self {
        Deadline { body, limit, timer: None }
    }
}

/// The request body did not arrive within `BODY_READ_TIMEOUT`.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {limit:?}")]
pub struct BodyTimedOut {
    pub limit: Duration,
}

impl<B> HttpBody for Deadline<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let limit = this.limit;
        let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Some(Err(BodyTimedOut { limit }.into())))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The limit missed, when `error` is (or wraps) a [`BodyTimedOut`]: by the
/// time a handler sees it, axum and http-body-util have wrapped it twice.
pub fn body_timeout(error: &(dyn std::error::Error + 'static)) -> Option<Duration> {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(timed_out) = error.downcast_ref::<BodyTimedOut>() {
            return Some(timed_out.limit);
        }
        cause = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_follow_the_phase() {
        let (head, idle) = (Duration::from_secs(10), Duration::from_secs(95));
        let clock = Arc::new(Clock::start());
        let opened = clock.opened;
        assert_eq!(clock.deadline(head, idle), Some(opened + head), "a new connection owes a head");
        clock.on_read();
        assert_eq!(clock.deadline(head, idle), Some(opened + head), "bytes of that head change nothing");
        clock.on_request();
        assert_eq!(clock.deadline(head, idle), None, "no deadline while serving");
        clock.on_read();
        assert_eq!(clock.deadline(head, idle), None, "body bytes change nothing");
        drop(EndOfResponse(clock.clone()));
        let idle_deadline = clock.deadline(head, idle).unwrap();
        assert!(idle_deadline >= opened + idle && idle_deadline < Instant::now() + idle + Duration::from_millis(1));
        clock.on_read();
        let head_deadline = clock.deadline(head, idle).unwrap();
        assert!(head_deadline < opened + idle, "the next head's first byte starts the head deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_times_out_and_one_that_is_there_does_not() {
        use http_body_util::BodyExt;
        let limit = Duration::from_secs(30);
        let whole = Deadline::new(http_body_util::Full::new(Bytes::from_static(b"{}")), limit);
        assert_eq!(whole.collect().await.unwrap().to_bytes(), "{}");

        let never = futures_util::stream::pending::<Result<Frame<Bytes>, std::convert::Infallible>>;
        let stalled = Deadline::new(http_body_util::StreamBody::new(never()), limit);
        let started = tokio::time::Instant::now();
        let error = stalled.collect().await.unwrap_err();
        assert_eq!(body_timeout(&*error), Some(limit), "{error}");
        assert_eq!(started.elapsed(), limit);
        // As a handler sees it.
        let error = axum::body::to_bytes(Body::new(Deadline::new(http_body_util::StreamBody::new(never()), limit)), 64)
            .await
            .unwrap_err();
        assert_eq!(body_timeout(&error), Some(limit), "{error}");
        assert_eq!(body_timeout(&std::io::Error::other("other")), None);
    }
}
