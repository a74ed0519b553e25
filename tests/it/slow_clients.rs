//! Slow and greedy clients: half-sent request heads, dribbled bodies and
//! connection floods are cut off or capped, while `/healthz`, real sessions
//! and long SSE streams go on. Attackers are raw sockets; to tell clients
//! apart they connect from other loopback addresses (127.0.0.2, …), which
//! Linux routes to 127.0.0.1 like any other.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;

use crate::support::*;

const LIST: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;

/// How long the gateway may take to close a connection past its deadline:
/// the deadline itself (1 s in these tests) plus generous scheduling slack.
const CLOSE_WITHIN: Duration = Duration::from_secs(10);

/// A connection to the gateway from the loopback address `from`.
async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

/// Reads until the gateway closes the connection (end of stream or reset);
/// returns what was read, or `None` if it was still open after `within`.
async fn closed_within(read: &mut OwnedReadHalf, within: Duration) -> Option<String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let outcome = tokio::time::timeout(within, async {
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    outcome.ok().map(|()| String::from_utf8_lossy(&seen).into_owned())
}

/// Connects, sends `head` (an unfinished request head), then one more
/// header line every 250 ms, so bytes keep arriving but the head never ends.
/// Returns how long the gateway took to close the connection, or `None`.
async fn dribble_head(to: SocketAddr, head: &'static str) -> Option<Duration> {
    let started = Instant::now();
    let stream = connect_from(Ipv4Addr::LOCALHOST, to).await;
    dribble_more(stream, head, started).await
}

/// The same on a connection already open, from `started`.
async fn dribble_more(mut stream: TcpStream, head: &'static str, started: Instant) -> Option<Duration> {
    stream.write_all(head.as_bytes()).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let pacer = tokio::spawn(async move {
        for i in 0..400 {
            if write.write_all(format!("x-slow-{i}: 1\r\n").as_bytes()).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    let closed = closed_within(&mut read, CLOSE_WITHIN).await;
    pacer.abort();
    closed.map(|_| started.elapsed())
}

/// One whole request on a connection of its own (`Connection: close`):
/// the status and the raw response.
async fn raw_request(to: SocketAddr, request: String) -> (u16, String) {
    let stream = connect_from(Ipv4Addr::LOCALHOST, to).await;
    let (mut read, mut write) = stream.into_split();
    write.write_all(request.as_bytes()).await.unwrap();
    let response = closed_within(&mut read, PATIENCE).await.expect("the gateway answers and closes");
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, response)
}

async fn raw_healthz(to: SocketAddr) -> (u16, String) {
    raw_request(to, "GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n".into()).await
}

async fn raw_post(to: SocketAddr, session: &str, body: &str) -> (u16, String) {
    let request = format!(
        "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\naccept: {ACCEPT_BOTH}\r\n\
         content-type: application/json\r\nmcp-session-id: {session}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    raw_request(to, request).await
}

async fn healthz(gateway: &Gateway) -> StatusCode {
    reqwest::get(format!("{}/healthz", gateway.url)).await.expect("/healthz answers").status()
}

/// A whole session through the echo server: initialize, then tools/list.
async fn session_works(http: &Http) -> String {
    let (session, _) = http.initialize().await;
    let list = http.post_raw(Some(&session), LIST, &[]).await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text);
    assert!(list.json["result"]["tools"].as_array().is_some_and(|t| !t.is_empty()), "{}", list.text);
    session
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_heads_are_closed_at_the_header_timeout_while_others_are_served() {
    let gateway =
        Gateway::with(Options::default().echo().env("HEADER_READ_TIMEOUT", "1s").env("IDLE_CONNECTION_TIMEOUT", "60s"));
    let to = gateway.addr();
    let mut attackers = Vec::new();
    for _ in 0..20 {
        attackers.push(tokio::spawn(dribble_head(to, "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\n")));
    }
    // A keep-alive connection that sends one request, then dribbles the next
    // head: the head deadline applies, not the (longer) idle one.
    let mut kept = connect_from(Ipv4Addr::LOCALHOST, to).await;
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").await.unwrap();
    let mut first = [0u8; 1024];
    let n = kept.read(&mut first).await.unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&first[..n]));
    let kept = tokio::spawn(dribble_more(kept, "GET /healthz HTTP/1.1\r\n", Instant::now()));

    assert_eq!(healthz(&gateway).await, StatusCode::OK);
    session_works(&gateway.http()).await;

    for attacker in attackers {
        let took = attacker.await.unwrap().expect("a half-sent head is closed");
        assert!(took >= Duration::from_millis(900), "closed after {took:?}, before the header timeout");
    }
    let took = kept.await.unwrap().expect("a half-sent second head is closed");
    assert!(took < Duration::from_secs(30), "closed after {took:?}: the idle timeout, not the header one");
    assert_eq!(healthz(&gateway).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dribbled_body_gets_408_and_the_connection_is_closed() {
    let gateway = Gateway::with(Options::default().echo().env("BODY_READ_TIMEOUT", "1s"));
    let to = gateway.addr();
    // (framing header, first piece of body, each later piece)
    let cases =
        [("content-length: 1000", "{\"jsonrpc\":", " "), ("transfer-encoding: chunked", "1\r\n{\r\n", "1\r\n \r\n")];
    for (framing, first, piece) in cases {
        let stream = connect_from(Ipv4Addr::LOCALHOST, to).await;
        let (mut read, mut write) = stream.into_split();
        let head = format!(
            "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: {ACCEPT_BOTH}\r\ncontent-type: application/json\r\n\
             {framing}\r\n\r\n{first}"
        );
        write.write_all(head.as_bytes()).await.unwrap();
        let pacer = tokio::spawn(async move {
            for _ in 0..400 {
                if write.write_all(piece.as_bytes()).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let response = closed_within(&mut read, CLOSE_WITHIN).await;
        pacer.abort();
        let response = response.unwrap_or_else(|| panic!("{framing}: a dribbled body is cut off"));
        assert!(response.starts_with("HTTP/1.1 408"), "{framing}: {response}");
        assert!(response.contains("did not arrive within"), "{framing}: {response}");
    }
    session_works(&gateway.http()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_address_is_capped_and_others_are_served() {
    // Per address: 4, then a reserve of 8 for /healthz and runners.
    let gateway = Gateway::with(
        Options::default()
            .echo()
            .env("MAX_CONNECTIONS_PER_IP", "4")
            .env("MAX_CONNECTIONS", "100")
            .env("HEADER_READ_TIMEOUT", "60s"),
    );
    let to = gateway.addr();
    let attacker = Ipv4Addr::new(127, 0, 0, 2);
    let mut held = Vec::new();
    for _ in 0..12 {
        held.push(connect_from(attacker, to).await);
    }
    for i in 0..4 {
        let (mut read, _write) = connect_from(attacker, to).await.into_split();
        let response = closed_within(&mut read, CLOSE_WITHIN).await;
        let response = response.unwrap_or_else(|| panic!("connection {} past the cap and reserve stays open", 12 + i));
        assert!(response.is_empty() || response.starts_with("HTTP/1.1 503"), "{response}");
    }
    // Another address is unaffected: liveness, and a whole session (whose
    // runner dials back from yet another connection).
    assert_eq!(healthz(&gateway).await, StatusCode::OK);
    session_works(&gateway.http()).await;
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_over_the_total_cap_leaves_healthz_and_refuses_the_rest_with_503() {
    // In all: 16, then a reserve of 8 where only /healthz and /rendezvous
    // are served; past that, connections are refused.
    let gateway = Gateway::with(
        Options::default()
            .echo()
            .env("MAX_CONNECTIONS", "16")
            .env("MAX_CONNECTIONS_PER_IP", "8")
            .env("HEADER_READ_TIMEOUT", "60s"),
    );
    let to = gateway.addr();
    let session = session_works(&gateway.http()).await;
    let mut held = Vec::new();
    for last in [2, 3] {
        for _ in 0..8 {
            held.push(connect_from(Ipv4Addr::new(127, 0, 0, last), to).await);
        }
    }

    // Over the total: /healthz is answered from the reserve; MCP requests
    // get 503 with Retry-After.
    let (status, response) = raw_healthz(to).await;
    assert_eq!(status, 200, "{response}");
    let (status, response) = raw_post(to, &session, LIST).await;
    assert_eq!(status, 503, "{response}");
    assert!(response.to_ascii_lowercase().contains("retry-after: 1"), "{response}");

    // Past the reserve too: refused at once.
    let mut refused = 0;
    for _ in 0..12 {
        let (mut read, write) = connect_from(Ipv4Addr::new(127, 0, 0, 4), to).await.into_split();
        match closed_within(&mut read, Duration::from_millis(500)).await {
            Some(response) => {
                assert!(response.is_empty() || response.starts_with("HTTP/1.1 503"), "{response}");
                refused += 1;
            }
            None => held.push(read.reunite(write).unwrap()),
        }
    }
    assert!(refused >= 4, "only {refused} of 12 connections past the reserve were refused");

    // Once the flood is gone, the session is served again.
    drop(held);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, response) = raw_post(to, &session, LIST).await;
        if status == 200 {
            assert!(response.contains("\"tools\""), "{response}");
            break;
        }
        assert!(Instant::now() < deadline, "still refused after the flood ended: {response}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_outlive_the_connection_timeouts() {
    let gateway = Gateway::with(
        Options::default()
            .echo()
            .env("HEADER_READ_TIMEOUT", "1s")
            .env("IDLE_CONNECTION_TIMEOUT", "1s")
            .env("BODY_READ_TIMEOUT", "1s")
            .env("HEARTBEAT_INTERVAL", "500ms"),
    );
    let http = gateway.http();
    let (session, _) = http.initialize().await;

    // The session's GET stream stays open, hearing only keepalives, while a
    // call streams its answer for 4 s; then a notification still reaches it.
    let mut stream = http
        .request(reqwest::Method::GET)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &session)
        .timeout(PATIENCE)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let started = Instant::now();
    let slow = http.call(&session, 1, "sleep", json!({"ms": 4000})).await;
    assert_eq!(slow.status, StatusCode::OK, "{}", slow.text);
    assert!(slow.headers["content-type"].to_str().unwrap().starts_with("text/event-stream"), "{}", slow.text);
    assert_eq!(slow.json["id"], 1, "{}", slow.text);
    assert!(slow.json["result"].is_object(), "{}", slow.text);
    assert!(started.elapsed() >= Duration::from_secs(4));

    let notified = http.call(&session, 2, "notify", json!({"text": "still here"})).await;
    assert_eq!(notified.status, StatusCode::OK, "{}", notified.text);
    let mut text = String::new();
    let events: Vec<Value> = tokio::time::timeout(PATIENCE, async {
        loop {
            let events = sse_events(&text);
            if !events.is_empty() {
                return events;
            }
            let chunk = stream.chunk().await.unwrap().expect("the GET stream stays open");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .expect("the notification reaches the GET stream");
    assert_eq!(events[0]["params"]["data"], "still here", "{text}");
    assert!(started.elapsed() >= Duration::from_secs(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_dials_back_through_the_reserve_during_a_flood() {
    // Runners reach the gateway through a proxy that can cut their socket.
    let proxy = Proxy::start().await;
    let gateway = Gateway::with(
        Options::default()
            .echo()
            .env("GATEWAY_URL", proxy.url())
            .env("MAX_CONNECTIONS", "16")
            .env("MAX_CONNECTIONS_PER_IP", "8")
            .env("HEADER_READ_TIMEOUT", "60s")
            .env("RUNNER_RECONNECT_GRACE", "2s"),
    );
    proxy.forward_to(&gateway.url);
    let to = gateway.addr();
    let session = session_works(&gateway.http()).await;
    let mut held = Vec::new();
    for last in [2, 3] {
        for _ in 0..8 {
            held.push(connect_from(Ipv4Addr::new(127, 0, 0, last), to).await);
        }
    }
    let (status, response) = raw_post(to, &session, LIST).await;
    assert_eq!(status, 503, "over the total cap: {response}");

    // The runner's socket drops while the flood is on; the flood is held
    // past the reconnect grace (pacing the attacker), so a runner kept out
    // would end the session and its id would answer 404.
    assert!(proxy.sever() >= 1, "the runner's socket went through the proxy");
    tokio::time::sleep(Duration::from_secs(4)).await;
    drop(held);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, response) = raw_post(to, &session, LIST).await;
        assert_ne!(status, 404, "the session ended: its runner could not dial back during the flood");
        if status == 200 {
            assert!(response.contains("\"tools\""), "{response}");
            break;
        }
        assert!(Instant::now() < deadline, "still refused after the flood ended: {response}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
