//! What the gateway counts, and `GET /metrics` in Prometheus text format.
//!
//! Events are recorded where they happen with the `metrics` macros into one
//! process-wide recorder (`metrics-exporter-prometheus`, which also writes
//! the exposition format); levels (sessions, requests in flight, the pool,
//! the Platform API budget) are read from the gateway's state at each
//! scrape. Every label takes values from a fixed set: never a session id,
//! a method a client made up, or an error code a server made up.

use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::AppState;

pub const SESSIONS_STARTED: &str = "dynogate_sessions_started_total";
pub const SESSIONS_ENDED: &str = "dynogate_sessions_ended_total";
pub const RUNNER_START: &str = "dynogate_runner_start_seconds";
pub const RUNNER_RECONNECTS: &str = "dynogate_runner_reconnects_total";
pub const RELAYED: &str = "dynogate_relayed_requests_total";
pub const TUNNELLED: &str = "dynogate_tunnelled_runner_connections_total";
pub const TAKEN_OVER: &str = "dynogate_sessions_taken_over_total";
pub const FIRST_RESULT: &str = "dynogate_first_result_seconds";
pub const REQUEST_DURATION: &str = "dynogate_request_duration_seconds";
pub const JSONRPC_ERRORS: &str = "dynogate_jsonrpc_errors_total";
pub const PLATFORM_API_CALLS: &str = "dynogate_platform_api_calls_total";
pub const ORPHANS_STOPPED: &str = "dynogate_sweeper_dynos_stopped_total";
pub const PACKAGE_INSTALL: &str = "dynogate_package_install_seconds";
pub const CODE_RUN: &str = "dynogate_code_run_seconds";
pub const AGENT_RUNS: &str = "dynogate_agent_runs_total";
pub const AGENT_TOOL_CALLS: &str = "dynogate_agent_tool_calls_total";
pub const MODEL_CALLS: &str = "dynogate_model_call_seconds";
const SESSIONS: &str = "dynogate_sessions";
const RUNNERS: &str = "dynogate_runners";
const POOLED: &str = "dynogate_pooled_runners";
const IN_FLIGHT: &str = "dynogate_requests_in_flight";
const GET_STREAMS: &str = "dynogate_get_streams_open";
const API_BUDGET: &str = "dynogate_platform_api_budget_remaining";

/// Seconds, from a fast call to a dyno's boot.
const BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// The recorder, installed once per process (tests run several gateways
/// in one process; they share it).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder =
            PrometheusBuilder::new().set_buckets(BUCKETS).expect("the buckets are not empty").build_recorder();
        let handle = recorder.handle();
        // Another recorder installed first (an embedding program's) keeps its place.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(SESSIONS_STARTED, "Sessions started (pooled: started ahead of a client for the warm pool)");
    describe_counter!(SESSIONS_ENDED, "Sessions ended, by reason");
    describe_histogram!(RUNNER_START, Unit::Seconds, "From a runner's spawn to its dial-back");
    describe_counter!(RUNNER_RECONNECTS, "Runners that dialled back again after their socket dropped");
    describe_counter!(
        RELAYED,
        "Client requests this instance relayed to the instance owning their session (REDIS_URL)"
    );
    describe_counter!(
        TAKEN_OVER,
        "Sessions this instance took over from another, by why: handed_over (it stopped) or owner_died"
    );
    describe_counter!(
        TUNNELLED,
        "Runner connections this instance carried to the instance owning their session (REDIS_URL)"
    );
    describe_histogram!(FIRST_RESULT, Unit::Seconds, "From a session's start to the answer of its first tools/call");
    describe_histogram!(REQUEST_DURATION, Unit::Seconds, "From a request's arrival to its answer, by MCP method");
    describe_counter!(JSONRPC_ERRORS, "JSON-RPC errors sent to clients, by code");
    describe_counter!(PLATFORM_API_CALLS, "Heroku Platform API calls, by status class (or `unreachable`)");
    describe_counter!(ORPHANS_STOPPED, "Runner dynos the sweeper stopped because their session was gone");
    describe_histogram!(PACKAGE_INSTALL, Unit::Seconds, "Package installs of code tool calls, by language");
    describe_counter!(AGENT_RUNS, "Agent runs (/v1/agents/heroku) ended, by outcome");
    describe_counter!(AGENT_TOOL_CALLS, "Tool calls agent runs made, by kind (code, command, mcp)");
    describe_histogram!(MODEL_CALLS, Unit::Seconds, "Calls to the model API (INFERENCE_URL), by outcome");
    describe_histogram!(CODE_RUN, Unit::Seconds, "Code runs of code tool calls (after any install), by language");
    describe_gauge!(SESSIONS, "Sessions clients hold");
    describe_gauge!(RUNNERS, "Runners alive or starting (client sessions, warm and single-request runners)");
    describe_gauge!(POOLED, "Warm runners waiting in the pool");
    describe_gauge!(IN_FLIGHT, "Requests waiting for their answer");
    describe_gauge!(GET_STREAMS, "Sessions whose server-to-client stream (GET /mcp or GET /sse) a client is reading");
    describe_gauge!(API_BUDGET, "Platform API calls left in the account's budget (Heroku only)");
}

/// `GET /metrics`.
pub async fn scrape(State(state): State<AppState>) -> impl IntoResponse {
    let handle = handle();
    gauge!(SESSIONS).set(state.sessions.claimed() as f64);
    gauge!(RUNNERS).set(state.sessions.len() as f64);
    gauge!(POOLED).set(state.pool.status().size as f64);
    gauge!(IN_FLIGHT).set(state.sessions.in_flight() as f64);
    gauge!(GET_STREAMS).set(state.sessions.get_streams_open() as f64);
    if let Some(remaining) = state.spawner.budget_remaining() {
        gauge!(API_BUDGET).set(remaining as f64);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render())
}

pub fn session_started(pooled: bool) {
    counter!(SESSIONS_STARTED, "pooled" => if pooled { "true" } else { "false" }).increment(1);
}

pub fn session_ended(reason: &'static str) {
    counter!(SESSIONS_ENDED, "reason" => reason).increment(1);
}

pub fn runner_started(after: Duration) {
    histogram!(RUNNER_START).record(after.as_secs_f64());
}

pub fn runner_reconnected() {
    counter!(RUNNER_RECONNECTS).increment(1);
}

pub fn relayed() {
    counter!(RELAYED).increment(1);
}

pub fn taken_over(why: &'static str) {
    counter!(TAKEN_OVER, "why" => why).increment(1);
}

pub fn tunnelled() {
    counter!(TUNNELLED).increment(1);
}

pub fn first_result(after: Duration) {
    histogram!(FIRST_RESULT).record(after.as_secs_f64());
}

pub fn request_answered(method: &'static str, took: Duration) {
    histogram!(REQUEST_DURATION, "method" => method).record(took.as_secs_f64());
}

/// A code tool call's stages, as the executor timed them.
/// Figures that are not a duration (negative, NaN) are not recorded.
pub fn code_tool_timed(timing: &dynogate_shared::timing::Timing) {
    let language = timing.language_label();
    let duration = |seconds: Option<f64>| seconds.filter(|s| s.is_finite() && *s >= 0.0);
    if let Some(seconds) = duration(timing.install_seconds) {
        histogram!(PACKAGE_INSTALL, "language" => language).record(seconds);
    }
    if let Some(seconds) = duration(timing.run_seconds) {
        histogram!(CODE_RUN, "language" => language).record(seconds);
    }
}

/// An agent run's end: `completed`, `model_failed`, `tools_unavailable`, `client_gone` or `shutdown`.
pub fn agent_run_ended(outcome: &'static str) {
    counter!(AGENT_RUNS, "outcome" => outcome).increment(1);
}

/// A tool call of an agent run, by the tool's kind.
pub fn agent_tool_called(kind: &'static str) {
    counter!(AGENT_TOOL_CALLS, "kind" => kind).increment(1);
}

/// A model call and how it went: `ok`, or the error's label.
pub fn model_called(took: Duration, error: Option<&'static str>) {
    histogram!(MODEL_CALLS, "outcome" => error.unwrap_or("ok")).record(took.as_secs_f64());
}

pub fn error_sent(code: i64) {
    counter!(JSONRPC_ERRORS, "code" => code_label(code)).increment(1);
}

/// A Platform API call's outcome: its status class, or `unreachable`.
pub fn platform_api_called(status: Option<u16>) {
    let class = match status {
        Some(200..=299) => "2xx",
        Some(429) => "429",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        Some(_) => "other",
        None => "unreachable",
    };
    counter!(PLATFORM_API_CALLS, "status" => class).increment(1);
}

pub fn orphan_stopped() {
    counter!(ORPHANS_STOPPED).increment(1);
}

/// An MCP method as a label: the ones the protocol defines, else `other`.
pub fn method_label(method: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "initialize",
        "ping",
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/read",
        "resources/templates/list",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
    ];
    KNOWN.iter().copied().find(|m| *m == method).unwrap_or("other")
}

/// The codes of JSON-RPC and of this gateway, else `other`.
fn code_label(code: i64) -> &'static str {
    match code {
        -32700 => "-32700",
        -32600 => "-32600",
        -32601 => "-32601",
        -32602 => "-32602",
        -32603 => "-32603",
        -32001 => "-32001",
        -32002 => "-32002",
        -32003 => "-32003",
        -32004 => "-32004",
        -32005 => "-32005",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_fixed_sets() {
        assert_eq!(method_label("tools/call"), "tools/call");
        assert_eq!(method_label("made/up/by/a/client"), "other");
        assert_eq!(code_label(-32001), "-32001");
        assert_eq!(code_label(12345), "other");
    }
}
