//! The gateway's memory when clients do not read what it sends. Answers made
//! of control characters are large (each byte of output becomes 13 bytes of
//! JSON); an answer nobody reads yet is kept once, not once more in the
//! connection, and an `/sse` stream nobody reads keeps what its budget
//! allows, dropping its oldest answers.
//!
//! Attackers here are raw sockets with small receive buffers, so what a
//! client does not read stays in the gateway rather than in the kernel.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::stdio::have;
use crate::support::*;

const MIB: u64 = 1024 * 1024;

/// Bytes the executor keeps of a command's stdout (head and tail): the
/// default, named so that [`ANSWER`] holds if the default changes.
const OUTPUT_KEPT: &str = "1MiB";

/// About the size of an answer to [`CONTROL_CHARACTERS`]: each U+0001 kept
/// is `\u0001` in the tool's JSON text, `\\u0001` once that text is a JSON
/// string, and `\u0001` again in `structuredContent`. Far more than a
/// connection's kernel buffers take (4 MiB at most), so an unread answer
/// stays in the gateway.
const ANSWER: u64 = 13 * MIB;

/// Room for a message on its way in from the runner and for the allocator.
const SLACK: u64 = 40 * MIB;

/// Python that writes 6 MB of U+0001 to stdout.
const CONTROL_CHARACTERS: &str = "import sys; sys.stdout.write('\\x01' * 6_000_000)";

/// Requests waiting for an answer, gateway-wide (from `/healthz`).
async fn in_flight(gateway: &Gateway) -> u64 {
    let health: Value = reqwest::get(format!("{}/healthz", gateway.url)).await.unwrap().json().await.unwrap();
    health["in_flight"].as_u64().expect("/healthz reports in_flight")
}

/// Polls until every request the gateway has taken is answered by its server
/// (the answers are then in the gateway, whether or not anyone reads them).
async fn until_all_answered(gateway: &Gateway) {
    let deadline = Instant::now() + PATIENCE;
    while in_flight(gateway).await > 0 {
        assert!(Instant::now() < deadline, "requests still in flight after {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A loopback connection whose receive buffer is small.
async fn connect_small(to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    socket.connect(to).await.unwrap()
}

/// Sends `request` and reads until the end of the response head; returns
/// the head and whatever body bytes came with it.
async fn send_and_read_head(stream: &mut TcpStream, request: &str) -> (String, Vec<u8>) {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(PATIENCE, async {
        loop {
            if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                let body = seen.split_off(end + 4);
                return (String::from_utf8_lossy(&seen).into_owned(), body);
            }
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "the gateway closed before a response head: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("a response head arrives")
}

/// A `tools/call` on a connection of its own (closed after the response):
/// the connection, once the response head is in.
async fn call_on_own_connection(to: SocketAddr, session: &str, id: i64, code: &str) -> TcpStream {
    let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": "code_exec_python", "arguments": {"code": code}}})
    .to_string();
    let request = format!(
        "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\naccept: {ACCEPT_BOTH}\r\n\
         content-type: application/json\r\nmcp-session-id: {session}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = connect_small(to).await;
    let (head, _) = send_and_read_head(&mut stream, &request).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "the answer is streamed: {head}");
    stream
}

/// What a slow reader saw of a response.
struct Read {
    bytes: usize,
    head: Vec<u8>,
    tail: Vec<u8>,
}

/// Reads at most `limit` bytes, 16 KiB every 2 ms (at most 8 MB/s), until
/// the gateway closes the connection or the limit is reached.
async fn read_slowly(stream: &mut TcpStream, limit: usize) -> Read {
    let mut read = Read { bytes: 0, head: Vec::new(), tail: Vec::new() };
    let mut buf = vec![0u8; 16 * 1024];
    while read.bytes < limit {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("the gateway keeps sending")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        read.bytes += n;
        if read.head.len() < 4096 {
            read.head.extend_from_slice(&buf[..n.min(4096)]);
        }
        read.tail.extend_from_slice(&buf[..n]);
        let excess = read.tail.len().saturating_sub(4096);
        read.tail.drain(..excess);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    read
}

/// A session still answers a call, and a fresh session is served.
async fn still_serves(gateway: &Gateway, session: &str) {
    let http = gateway.http();
    let code = json!({"code": "print('still here')"});
    let old = http.call(session, 999, "code_exec_python", code.clone()).await;
    assert_eq!(exec_result(&old.json)["stdout"], "still here", "{}", old.text);
    let (fresh, _) = http.initialize().await;
    let new = http.call(&fresh, 1, "code_exec_python", code).await;
    assert_eq!(exec_result(&new.json)["stdout"], "still here", "{}", new.text);
    assert_eq!(http.delete(&fresh).await, StatusCode::NO_CONTENT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_of_control_character_answers_cost_one_copy_of_each() {
    if !have("python3") {
        return;
    }
    // Every answer streamed, so each has its own SSE response to leave unread.
    let gateway =
        Gateway::with(Options::default().env("REPLY_STREAM_AFTER", "1ms").env("EXEC_MAX_OUTPUT_BYTES", OUTPUT_KEPT));
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    // The executor is up and the gateway has served a call before measuring.
    let warm = http.call(&session, 1, "code_exec_python", json!({"code": "print(1)"})).await;
    assert_eq!(exec_result(&warm.json)["returncode"], 0, "{}", warm.text);
    let before = rss_of(gateway.pid()).unwrap();
    let peak = PeakRss::watch(gateway.pid());

    // Eight calls whose responses nobody reads until every answer is in the
    // gateway. Kept once each, that is 8 × 13 MiB; the gateway once also
    // kept an encoded copy of each in its connection, twice as much.
    const CALLS: i64 = 8;
    let limit = CALLS as u64 * ANSWER + SLACK;
    let mut connections = Vec::new();
    for id in 100..100 + CALLS {
        connections.push((id, call_on_own_connection(gateway.addr(), &session, id, CONTROL_CHARACTERS).await));
    }
    until_all_answered(&gateway).await;
    let unread = peak.get();

    // Then half read slowly to the end, and half read 1 MiB and hang up.
    let readers: Vec<_> = connections
        .into_iter()
        .map(|(id, mut stream)| {
            tokio::spawn(async move {
                let whole = id % 2 == 0;
                let read = read_slowly(&mut stream, if whole { usize::MAX } else { MIB as usize }).await;
                (id, whole, read)
            })
        })
        .collect();
    for reader in readers {
        let (id, whole, read) = reader.await.unwrap();
        if whole {
            let head = String::from_utf8_lossy(&read.head);
            assert!(head.contains(&format!("\"id\":{id},\"result\"")), "call {id}: {head}");
            assert!(read.bytes as u64 > ANSWER * 9 / 10, "call {id}: only {} bytes", read.bytes);
            assert!(read.tail.ends_with(b"\r\n0\r\n\r\n"), "call {id}: the response did not end");
        }
    }
    let grown = peak.get().saturating_sub(before);
    drop(peak);
    eprintln!(
        "slow control-character answers: {:.1} MiB before, grew {:.1} MiB while unread, {:.1} MiB at most \
         (limit {:.1} MiB)",
        mib(before),
        mib(unread.saturating_sub(before)),
        mib(grown),
        mib(limit)
    );
    assert!(grown < limit, "the gateway grew by {:.1} MiB", mib(grown));
    still_serves(&gateway, &session).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_legacy_sse_stream_drops_its_oldest_answers_and_stays_usable() {
    if !have("python3") {
        return;
    }
    let gateway = Gateway::with(Options::default().env("EXEC_MAX_OUTPUT_BYTES", OUTPUT_KEPT));
    let mut sse = connect_small(gateway.addr()).await;
    let (head, mut pending) =
        send_and_read_head(&mut sse, "GET /sse HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Read up to the endpoint event, and no further for a while.
    let endpoint = loop {
        let text = String::from_utf8_lossy(&pending).into_owned();
        if let Some(query) = text.lines().find_map(|l| l.strip_prefix("data: /messages/")) {
            break format!("/messages/{query}");
        }
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(PATIENCE, sse.read(&mut buf)).await.expect("the endpoint event").unwrap();
        assert!(n > 0, "the /sse stream closed: {text}");
        pending.extend_from_slice(&buf[..n]);
    };
    let messages = format!("{}{endpoint}", gateway.url);
    let post = |body: Value| {
        let messages = messages.clone();
        async move { reqwest::Client::new().post(messages).json(&body).send().await.unwrap().status() }
    };
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2024-11-05",
        "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    assert_eq!(post(init).await, StatusCode::ACCEPTED);
    assert_eq!(post(json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await, StatusCode::ACCEPTED);
    let before = rss_of(gateway.pid()).unwrap();
    let peak = PeakRss::watch(gateway.pid());

    // Twelve answers for a stream nobody reads: 156 MiB if all were kept.
    // The stream keeps its budget's worth (16 MiB by default), its
    // connection the one answer it was writing when the client stopped, and
    // the allocator keeps some of the dropped ones resident for reuse.
    const CALLS: i64 = 12;
    let limit = 120 * MIB;
    for id in 1..=CALLS {
        let call = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": "code_exec_python", "arguments": {"code": CONTROL_CHARACTERS}}});
        assert_eq!(post(call).await, StatusCode::ACCEPTED);
    }
    until_all_answered(&gateway).await;
    let grown = peak.get().saturating_sub(before);
    drop(peak);
    eprintln!(
        "unread /sse stream: {:.1} MiB before, grew {:.1} MiB at most (limit {:.1} MiB)",
        mib(before),
        mib(grown),
        mib(limit)
    );
    assert!(grown < limit, "the gateway grew by {:.1} MiB", mib(grown));

    // The stream is still open and the session still works: a marker call
    // is answered after whatever of the flood the stream kept.
    let marker = json!({"jsonrpc": "2.0", "id": 1000, "method": "tools/call",
        "params": {"name": "code_exec_python", "arguments": {"code": "print('still here')"}}});
    assert_eq!(post(marker).await, StatusCode::ACCEPTED);
    let mut text = String::from_utf8_lossy(&pending).into_owned();
    let mut buf = vec![0u8; 64 * 1024];
    let answered = tokio::time::timeout(PATIENCE, async {
        // HTTP chunk sizes sit between events, never inside the marker.
        while !text.contains("still here") {
            let n = sse.read(&mut buf).await.unwrap();
            assert!(n > 0, "the /sse stream closed");
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await;
    assert!(answered.is_ok(), "the marker's answer never came on the /sse stream");
    // The oldest answers were dropped rather than kept for a reader that
    // might never come.
    let kept = (1..=CALLS).filter(|id| text.contains(&format!("\"id\":{id},\"result\""))).count();
    eprintln!("unread /sse stream: {kept} of {CALLS} answers were kept");
    assert!(kept < CALLS as usize, "all {CALLS} answers were kept for a client that read none");
    assert!(kept > 0, "the stream keeps its newest answers, within its budget");
}
