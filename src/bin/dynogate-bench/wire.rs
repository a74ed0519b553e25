//! The load generator's HTTP/1.1 connections for timed requests: hyper's
//! connection API over a plain TCP socket, with a small pool so each request
//! in flight has a connection of its own.
//!
//! A general-purpose client (reqwest on a multi-threaded runtime: URL
//! parsing, redirects, timeouts, a shared pool per request, hand-offs
//! between threads) cost the load generator about 90 µs of CPU per call here,
//! more than half of what the gateway spends; on a two-core machine that CPU
//! comes out of the figures being measured. Every bridge is measured through
//! this same code.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
pub use hyper::Method;
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Where requests go: one `http://host:port/path` URL.
pub struct Endpoint {
    /// `host:port`, for connecting and for the `Host` header.
    authority: String,
    /// Path and query.
    target: String,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

/// Longest any one request may take before the load generator gives up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A reply: status, content type, MCP session id, body.
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub session_id: Option<String>,
    pub body: Bytes,
}

impl Endpoint {
    pub fn new(url: &str) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(url).with_context(|| format!("bad URL {url}"))?;
        if url.scheme() != "http" {
            bail!("the load generator speaks plain http, not {}", url.scheme());
        }
        let host = url.host_str().context("a URL without a host")?;
        let port = url.port_or_known_default().context("a URL without a port")?;
        let target = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_owned(),
        };
        Ok(Self { authority: format!("{host}:{port}"), target, idle: Mutex::new(Vec::new()) })
    }

    /// Sends one request and reads the whole answer; `headers` are added to
    /// `Host`.
    pub async fn send(&self, method: Method, body: Option<String>, headers: &[(&str, &str)]) -> anyhow::Result<Reply> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(method, body, headers))
            .await
            .with_context(|| format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()))?
    }

    async fn exchange(&self, method: Method, body: Option<String>, headers: &[(&str, &str)]) -> anyhow::Result<Reply> {
        let mut connection = match self.take_idle() {
            Some(connection) => connection,
            None => self.dial().await?,
        };
        let mut request = Request::builder().method(method).uri(&self.target).header("host", &self.authority);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(body.map(Bytes::from).unwrap_or_default()))?;
        let response = connection.send_request(request).await.context("request failed")?;
        let status = response.status().as_u16();
        let content_type =
            response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let session_id = response.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = response.into_body().collect().await.context("answer cut short")?.to_bytes();
        self.put_idle(connection);
        Ok(Reply { status, content_type, session_id, body })
    }

    fn take_idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(connection) = idle.pop() {
            if !connection.is_closed() {
                return Some(connection);
            }
        }
        None
    }

    fn put_idle(&self, connection: SendRequest<Full<Bytes>>) {
        if !connection.is_closed() {
            self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(connection);
        }
    }

    async fn dial(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let stream = TcpStream::connect(&self.authority)
            .await
            .with_context(|| format!("cannot connect to {}", self.authority))?;
        stream.set_nodelay(true)?;
        let (send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // Runs on the load generator's one thread: handing a request to it
        // is a queue push, not a wake-up of another thread.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(send)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_authority_and_target() {
        let endpoint = Endpoint::new("http://127.0.0.1:8000/mcp?x=1").unwrap();
        assert_eq!(endpoint.authority, "127.0.0.1:8000");
        assert_eq!(endpoint.target, "/mcp?x=1");
        assert_eq!(Endpoint::new("http://localhost/healthz").unwrap().authority, "localhost:80");
        assert!(Endpoint::new("https://example.com/mcp").is_err());
    }
}
