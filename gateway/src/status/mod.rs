//! The status page: `GET /status` (a page that asks for the API key and
//! keeps it in its own memory), and `GET /v1/status`, what the page shows,
//! behind the key: live sessions, runners, the pool, the Platform API
//! budget and the JSON-RPC errors clients were sent lately.
//!
//! Sessions are named by the short id the logs use, never the whole id: a
//! whole id, with the key, would let whoever reads the page into the session.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;

use crate::AppState;
use crate::pool::PoolStatus;

/// Errors kept for the page, newest last.
const RECENT_ERRORS: usize = 50;
/// Characters of an error's message kept.
const MESSAGE_CHARS: usize = 200;

/// What `GET /v1/status` answers.
#[derive(Debug, Serialize)]
pub struct Status {
    /// When this was taken, in milliseconds since the Unix epoch.
    pub now_unix_ms: u64,
    pub gateway: GatewayStatus,
    pub sessions: Vec<SessionRow>,
    pub runners: RunnerCounts,
    pub pool: PoolStatus,
    /// Platform API calls left (Heroku only).
    pub platform_api_budget: Option<i64>,
    pub recent_errors: Vec<RecentError>,
}

#[derive(Debug, Serialize)]
pub struct GatewayStatus {
    pub version: &'static str,
    pub spawner: &'static str,
    pub sandbox: &'static str,
    pub draining: bool,
    pub uptime_seconds: u64,
    pub max_sessions: usize,
    pub requests_in_flight: usize,
}

#[derive(Debug, Serialize)]
pub struct SessionRow {
    /// The short id the logs use.
    pub id: String,
    /// `client`, `pool` or `single-request`.
    pub purpose: &'static str,
    /// `starting`, `ready`, `reconnecting` or `ending`.
    pub state: &'static str,
    pub transport: &'static str,
    /// The registered server (`/mcp/{name}`); `None` for the default.
    pub server: Option<String>,
    pub age_seconds: f64,
    pub calls: u64,
    pub in_flight: usize,
    /// The runner as its spawner describes it, once started.
    pub runner: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RunnerCounts {
    /// What a runner is here: `local process` or `Heroku one-off dyno`.
    pub kind: &'static str,
    pub total: usize,
    pub connected: usize,
    pub client: usize,
    pub pool: usize,
    pub single_request: usize,
}

/// A JSON-RPC error a client was sent.
#[derive(Debug, Clone, Serialize)]
pub struct RecentError {
    pub at_unix_ms: u64,
    pub code: i64,
    pub message: String,
    /// The request's method, when the error answered one (a bounded label).
    pub method: Option<&'static str>,
    /// The session's short id, when there was one.
    pub session: Option<String>,
}

fn recent() -> &'static Mutex<VecDeque<RecentError>> {
    // Process-wide, as the metrics recorder is.
    static RECENT: Mutex<VecDeque<RecentError>> = Mutex::new(VecDeque::new());
    &RECENT
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Counts a JSON-RPC error sent to a client and keeps it for the page.
pub fn error_sent(code: i64, message: &str, method: Option<&'static str>, session: Option<&str>) {
    crate::metrics::error_sent(code);
    let entry = RecentError {
        at_unix_ms: unix_ms(),
        code,
        message: message.chars().take(MESSAGE_CHARS).collect(),
        method,
        session: session.map(|id| dynogate_shared::names::log_id(id).to_string()),
    };
    let mut recent = recent().lock().expect("recent errors lock");
    if recent.len() == RECENT_ERRORS {
        recent.pop_front();
    }
    recent.push_back(entry);
}

/// What the page shows now.
pub fn snapshot(state: &AppState) -> Status {
    let mut sessions: Vec<SessionRow> = state
        .sessions
        .handles()
        .into_iter()
        .map(|handle| SessionRow {
            id: dynogate_shared::names::log_id(handle.id()).to_string(),
            purpose: handle.purpose(),
            state: handle.state(),
            transport: match handle.transport() {
                crate::session::Transport::Streamable => "streamable-http",
                crate::session::Transport::LegacySse => "sse",
            },
            server: handle.server().map(str::to_owned),
            age_seconds: handle.age().as_secs_f64(),
            calls: handle.calls(),
            in_flight: handle.in_flight(),
            runner: handle.runner().map(str::to_owned),
        })
        .collect();
    sessions.sort_by(|a, b| b.age_seconds.total_cmp(&a.age_seconds));
    let count = |purpose: &str| sessions.iter().filter(|s| s.purpose == purpose).count();
    let runners = RunnerCounts {
        kind: match state.config.spawner {
            crate::config::SpawnerKind::Local => "local process",
            crate::config::SpawnerKind::Heroku => "Heroku one-off dyno",
        },
        total: sessions.len(),
        connected: sessions.iter().filter(|s| s.state == "ready").count(),
        client: count("client"),
        pool: count("pool"),
        single_request: count("single-request"),
    };
    Status {
        now_unix_ms: unix_ms(),
        gateway: GatewayStatus {
            version: env!("CARGO_PKG_VERSION"),
            spawner: match state.config.spawner {
                crate::config::SpawnerKind::Local => "local",
                crate::config::SpawnerKind::Heroku => "heroku",
            },
            sandbox: state.config.sandbox.as_str(),
            draining: state.draining.is_cancelled(),
            uptime_seconds: state.started.elapsed().as_secs(),
            max_sessions: state.sessions.max(),
            requests_in_flight: state.sessions.in_flight(),
        },
        sessions,
        runners,
        pool: state.pool.status(),
        platform_api_budget: state.spawner.budget_remaining(),
        recent_errors: recent().lock().expect("recent errors lock").iter().rev().cloned().collect(),
    }
}

/// `GET /v1/status` (behind the API key).
pub async fn data(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(snapshot(&state)))
}

/// Headers of the page and its files: nothing runs but our own script,
/// nothing is fetched but from this gateway, no form posts anywhere, no
/// other site may frame it, and no address leaks in a `Referer`.
const PAGE_HEADERS: [(header::HeaderName, &str); 4] = [
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (header::REFERRER_POLICY, "no-referrer"),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::CACHE_CONTROL, "no-cache"),
];

/// `GET /status`: the page (it holds no data; it asks for the key).
pub async fn page() -> impl IntoResponse {
    (PAGE_HEADERS, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("page.html"))
}

/// `GET /status/page.js`.
pub async fn script() -> impl IntoResponse {
    (PAGE_HEADERS, [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], include_str!("page.js"))
}

/// `GET /status/page.css`.
pub async fn style() -> impl IntoResponse {
    (PAGE_HEADERS, [(header::CONTENT_TYPE, "text/css; charset=utf-8")], include_str!("page.css"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_errors_are_bounded_and_cut_short() {
        let long = "x".repeat(10_000);
        for _ in 0..RECENT_ERRORS + 10 {
            error_sent(-32001, &long, Some("tools/call"), Some("0123456789abcdef0123456789abcdef"));
        }
        let recent = recent().lock().unwrap();
        assert_eq!(recent.len(), RECENT_ERRORS);
        let last = recent.back().unwrap();
        assert_eq!(last.message.len(), MESSAGE_CHARS);
        assert_eq!(last.session.as_deref(), Some("01234567"));
    }
}
