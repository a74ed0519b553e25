//! Accepting and serving connections, with deadlines and caps, in place of
//! `axum::serve` (which has neither).
//!
//! Owns: the accept loop, one task per connection (HTTP/1.1 through hyper,
//! upgrades for the runners' WebSockets), the per-connection deadlines
//! ([`watch`]), the connection caps ([`caps`]), and raising the open-files
//! limit at start-up. Does not own routing or anything past the request
//! head: that is [`crate::server::app`].
//!
//! - A connection must send a whole request head within `HEADER_READ_TIMEOUT`
//!   of opening, or of its first byte after an idle spell; an idle
//!   keep-alive connection is closed after `IDLE_CONNECTION_TIMEOUT`; a
//!   request body must arrive within `BODY_READ_TIMEOUT` (the handler reading
//!   it answers 408). No deadline runs while a response streams, and a
//!   connection upgraded to a WebSocket leaves this module altogether.
//! - Connections over `MAX_CONNECTIONS` in all, or `MAX_CONNECTIONS_PER_IP`
//!   from one client, land in a reserve where only `/healthz` and
//!   `/rendezvous` are served (anything else: 503 with `Retry-After`); past
//!   the reserve a connection gets a canned 503 and is closed.
//! - On drain, the listener closes; open connections finish their request in
//!   flight (hyper's graceful shutdown) and idle ones close.

pub mod caps;
pub mod watch;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use axum::routing::future::RouteFuture;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;
use tracing::{debug, error, warn};

use self::caps::{Caps, Connections, Place, Slot};
use self::watch::{Clock, Deadline, EndOfResponse, Tracked, Watched};

/// How connections are bounded.
#[derive(Debug, Clone)]
pub struct Settings {
    pub header_read: Duration,
    pub body_read: Duration,
    pub idle: Duration,
    pub caps: Caps,
}

/// Paths served on a connection admitted from the reserve: liveness, and
/// runners dialing back (without them every session would stall).
const RESERVED_PATHS: &[&str] = &["/healthz", dynogate_shared::names::RENDEZVOUS_PATH];

/// Sent to a connection past every cap, before closing it.
const REFUSED: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// Serves `router` on `listener` until `drain` fires, then closes the
/// listener and returns once every connection has ended.
pub async fn serve(listener: TcpListener, router: Router, settings: Settings, drain: CancellationToken) {
    let settings = Arc::new(settings);
    let connections = Connections::new(settings.caps);
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = drain.cancelled() => break,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                accept_failed(e).await;
                continue;
            }
        };
        let Some(slot) = connections.admit(peer.ip()) else {
            // Accepting and closing at once keeps the backlog moving (a
            // connection left in it would hold up /healthz behind it).
            debug!(%peer, open = connections.open(), "connection over the caps refused");
            let _ = tcp.try_write(REFUSED);
            continue;
        };
        // Small frames both ways (requests, answers, acks): without
        // TCP_NODELAY, Nagle's algorithm and delayed ACKs add 40 ms stalls.
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(error = %e, "cannot set TCP_NODELAY");
        }
        tracker.spawn(connection(tcp, peer, slot, router.clone(), settings.clone(), drain.clone()));
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// Accept errors other than a client giving up are about this process
/// (`EMFILE`, `ENFILE`, `ENOBUFS`): a pause lets connections close before the
/// next try. Short, unlike axum's 1 s, since the caps keep us clear of the
/// limit and a stalled accept loop stalls /healthz and runners too.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(e.kind(), ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused) {
        return;
    }
    error!(error = %e, "cannot accept a connection");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Serves one connection until it ends, misses a deadline, or (on drain)
/// finishes its request in flight. `slot` is its place in the caps, given
/// back when this returns.
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    router: Router,
    settings: Arc<Settings>,
    drain: CancellationToken,
) {
    let clock = Arc::new(Clock::start());
    let reserved_only = slot.place == Place::Reserve;
    let service = Serve { router, clock: clock.clone(), reserved_only, body_read: settings.body_read };
    let mut builder = http1::Builder::new();
    // The head deadline is ours (see `watch`). Not `keep_alive(false)` for a
    // reserve place: hyper would then add `close` to a 101's `Connection:
    // upgrade`; `Respond` closes those connections after one response instead.
    builder.header_read_timeout(None);
    let io = TokioIo::new(Watched::new(tcp, clock.clone()));
    let mut conn = pin!(builder.serve_connection(io, service).with_upgrades());
    // While a request is served there is no deadline; look again this often.
    let recheck = settings.header_read.min(settings.idle);
    let mut deadline = pin!(tokio::time::sleep(settings.header_read));
    let mut draining = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!(%peer, error = %e, "connection ended with an error");
                }
                break;
            }
            () = &mut deadline => {
                let now = tokio::time::Instant::now();
                match clock.deadline(settings.header_read, settings.idle) {
                    Some(at) if tokio::time::Instant::from_std(at) <= now => {
                        debug!(%peer, "closing a connection that sent no request in time");
                        break;
                    }
                    Some(at) => deadline.as_mut().reset(at.into()),
                    None => deadline.as_mut().reset(now + recheck),
                }
            }
            () = drain.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
    drop(slot);
}

/// The hyper service of one connection: the router, with the connection's
/// clock kept up to date and the reserve's restriction applied.
#[derive(Clone)]
struct Serve {
    router: Router,
    clock: Arc<Clock>,
    reserved_only: bool,
    body_read: Duration,
}

impl hyper::service::Service<Request<Incoming>> for Serve {
    type Response = Response<Tracked>;
    type Error = Infallible;
    type Future = Respond;

    fn call(&self, request: Request<Incoming>) -> Respond {
        self.clock.on_request();
        let end = Some(EndOfResponse(self.clock.clone()));
        let close = self.reserved_only;
        if close && !RESERVED_PATHS.contains(&request.uri().path()) {
            return Respond { route: None, refused: Some(over_capacity()), close, end };
        }
        let request = request.map(|body| Deadline::new(body, self.body_read));
        Respond { route: Some(self.router.clone().call(request)), refused: None, close, end }
    }
}

/// What a connection in the reserve gets for a path outside it.
fn over_capacity() -> Response<Body> {
    let mut response = Response::new(Body::from("the gateway has too many connections open; retry shortly\n"));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// The router's answer, its body wrapped to mark the end of the response;
/// with `close`, the connection ends after it (a reserve place is given back
/// after one request), unless it is upgraded.
struct Respond {
    route: Option<RouteFuture<Infallible>>,
    refused: Option<Response<Body>>,
    close: bool,
    end: Option<EndOfResponse>,
}

impl Future for Respond {
    type Output = Result<Response<Tracked>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut response = match (&mut this.route, this.refused.take()) {
            (Some(route), _) => ready!(Pin::new(route).poll(cx))?,
            (None, Some(refused)) => refused,
            (None, None) => unreachable!("Respond polled after it completed"),
        };
        if this.close && response.status() != StatusCode::SWITCHING_PROTOCOLS {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let end = this.end.take().expect("Respond polled after it completed");
        Poll::Ready(Ok(response.map(|body| Tracked::new(body, end))))
    }
}

/// Raises this process's soft limit on open files to its hard limit (a
/// default soft limit of 1,024, or 256 on some systems, is what a few hundred
/// idle connections used to exhaust, stalling the accept loop), and returns
/// the limit now in force.
pub fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return 1024 };
    if soft >= hard {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => hard,
        Err(e) => {
            warn!(error = %e, soft, hard, "cannot raise the open-files limit");
            soft
        }
    }
}

/// The soft limit on open files in force now.
pub fn open_files_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

/// Lowers `caps` so every connection they admit, plus `others` files
/// (runners' sockets and pipes, the listener, logs), fits in `limit` open
/// files: past it, accept fails with `EMFILE` for everyone.
pub fn fit_caps(caps: Caps, limit: u64, others: u64) -> Caps {
    let room = usize::try_from(limit.saturating_sub(others)).unwrap_or(usize::MAX);
    if caps.most() <= room {
        return caps;
    }
    // Largest total whose reserve still fits: total + max(total/8, 8) <= room.
    let total = (room.saturating_sub(8)).min(room * 8 / 9).max(1);
    Caps { total, per_ip: caps.per_ip.min(total) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_are_lowered_to_fit_the_open_files_limit() {
        let caps = Caps { total: 1024, per_ip: 256 };
        // (limit, others, total, per_ip)
        let cases = [
            (1_048_576, 264, 1024, 256),
            (1424, 264, 1024, 256),
            (1024, 264, 675, 256),
            (256, 200, 48, 48),
            (100, 200, 1, 1),
        ];
        for (limit, others, total, per_ip) in cases {
            let fitted = fit_caps(caps, limit, others);
            assert_eq!((fitted.total, fitted.per_ip), (total, per_ip), "limit {limit}, others {others}");
            assert!(fitted.most() <= usize::try_from(limit.saturating_sub(others)).unwrap().max(9));
        }
    }

    #[test]
    fn the_reserve_serves_only_liveness_and_rendezvous() {
        for (path, reserved) in [("/healthz", true), ("/rendezvous", true), ("/mcp", false), ("/sse", false)] {
            assert_eq!(RESERVED_PATHS.contains(&path), reserved, "{path}");
        }
    }
}
