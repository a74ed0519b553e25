//! Why a session ends, and what that means for the requests still waiting.

use std::time::Duration;

use crate::jsonrpc::code;

/// Why a session ended; decides what waiting clients are told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    Deleted,
    ClientGone,
    Idle(Duration),
    SpawnFailed(String),
    DialBackTimeout(Duration),
    RunnerRefused(String),
    RunnerLost(String),
    ServerExited(String),
    InitializeFailed,
    /// A warm runner no session claimed in time (no client ever sees it).
    Recycled,
    /// A single-request run is over.
    Completed,
    Shutdown,
    /// This instance is stopping and another takes the session over (the
    /// session itself goes on).
    HandedOver,
    /// Another instance took the session over while this one still held it
    /// (this one was thought dead).
    TakenOver,
}

impl EndReason {
    /// A short name, for metrics labels and the audit trail.
    pub fn label(&self) -> &'static str {
        match self {
            EndReason::Deleted => "deleted",
            EndReason::ClientGone => "client_gone",
            EndReason::Idle(_) => "idle",
            EndReason::SpawnFailed(_) => "spawn_failed",
            EndReason::DialBackTimeout(_) => "dial_back_timeout",
            EndReason::RunnerRefused(_) => "runner_refused",
            EndReason::RunnerLost(_) => "runner_lost",
            EndReason::ServerExited(_) => "server_exited",
            EndReason::InitializeFailed => "initialize_failed",
            EndReason::Recycled => "recycled",
            EndReason::Completed => "completed",
            EndReason::Shutdown => "shutdown",
            EndReason::HandedOver => "handed_over",
            EndReason::TakenOver => "taken_over",
        }
    }

    /// JSON-RPC code and message for requests that were waiting.
    pub fn client_error(&self) -> (i64, String) {
        match self {
            EndReason::Deleted => (code::RUNNER_LOST, "the session was deleted".into()),
            EndReason::ClientGone => (code::RUNNER_LOST, "the session's SSE connection closed".into()),
            EndReason::Idle(after) => {
                (code::RUNNER_LOST, format!("the session ended after {}s without requests", after.as_secs()))
            }
            EndReason::SpawnFailed(cause) => (code::RUNNER_UNAVAILABLE, format!("{cause}; the session has ended")),
            EndReason::DialBackTimeout(after) => (
                code::RUNNER_UNAVAILABLE,
                format!(
                    "the session's runner did not dial back within {}s (dial-back timeout); the session has ended",
                    after.as_secs_f64()
                ),
            ),
            EndReason::RunnerRefused(why) => {
                (code::RUNNER_UNAVAILABLE, format!("the session's runner was refused: {why}; the session has ended"))
            }
            EndReason::RunnerLost(why) => {
                (code::RUNNER_LOST, format!("the session's runner went away ({why}); the session has ended"))
            }
            EndReason::ServerExited(how) => {
                (code::RUNNER_LOST, format!("the session's MCP server exited ({how}); the session has ended"))
            }
            EndReason::InitializeFailed => {
                (code::RUNNER_LOST, "the MCP server refused initialize; the session has ended".into())
            }
            EndReason::Recycled => (code::RUNNER_LOST, "the warm runner was recycled unclaimed".into()),
            EndReason::Completed => (code::RUNNER_LOST, "the single-request run is over".into()),
            EndReason::Shutdown => (code::RUNNER_LOST, "the gateway is shutting down; the session has ended".into()),
            EndReason::HandedOver => (
                code::RUNNER_LOST,
                "the gateway instance holding the session stopped before this request was answered; the session \
                 goes on at another instance"
                    .into(),
            ),
            EndReason::TakenOver => (
                code::RUNNER_LOST,
                "another gateway instance took the session over before this request was answered".into(),
            ),
        }
    }
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.client_error().1)
    }
}
