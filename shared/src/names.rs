//! Names both sides of the rendezvous must spell the same way, and how a
//! session's name appears in either side's logs.

/// Path of the gateway's WebSocket endpoint.
pub const RENDEZVOUS_PATH: &str = "/rendezvous";

/// Query parameter naming the session a runner dials for.
pub const SESSION_QUERY: &str = "session";

/// Environment variable that carries the runner's token. Tokens travel in the
/// environment because command lines show up in `ps` and `heroku ps`.
pub const TOKEN_ENV: &str = "RUNNER_TOKEN";

/// Environment variable through which the runner tells a bridged MCP server
/// where its session's private directory is.
pub const SESSION_DIR_ENV: &str = "DYNOGATE_SESSION_DIR";

/// Environment variable through which the local spawner gives a runner the
/// session directory it made, so the gateway can remove it whatever
/// happens to the runner.
pub const RUNNER_SESSION_DIR_ENV: &str = "RUNNER_SESSION_DIR";

/// Environment variables that hold secrets of the gateway or the runner.
/// A runner removes them from the environment of the MCP server it starts
/// (on Heroku every dyno receives every config var), and the local spawner
/// keeps them from the runner in the first place.
pub const SECRET_ENV: &[&str] =
    &[TOKEN_ENV, "API_KEY", "HEROKU_API_KEY", "RENDEZVOUS_SECRET", "REDIS_URL", "REDIS_TLS_URL", "INFERENCE_KEY"];

/// Log filter directives both binaries add on top of a `RUST_LOG` that
/// reaches `trace`: there, the WebSocket library prints every frame and the
/// handshake request, which carry runner tokens (and every payload).
pub const LOG_CAPS: &[&str] = &["tungstenite=debug", "tokio_tungstenite=debug"];

/// Directives added on top of a `RUST_LOG` that reaches `debug`: there, the
/// MCP library prints every request and result whole (code, its output).
pub const PAYLOAD_LOG_CAPS: &[&str] = &["rmcp=info"];

/// How a local runner confines its session (see [`crate::sandbox::Mode`]).
pub const SANDBOX_ENV: &str = "SANDBOX";
/// How a session id appears in logs: a prefix, enough to tell sessions
/// apart. The whole id is a bearer secret (it reaches the session's answers),
/// so a log reader must not learn it.
/// Anything that is not an id the gateway could have made (32 hex digits)
/// shows as `?`, so an untrusted value never reaches a log line as given.
pub fn log_id(id: &str) -> &str {
    match id.get(..8) {
        Some(prefix) if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) => prefix,
        _ => "?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_show_a_prefix_of_real_ids_and_nothing_of_others() {
        assert_eq!(log_id("0123456789abcdef0123456789ABCDEF"), "01234567");
        for other in [
            "",
            "abc",
            "0123456789abcdef0123456789abcdeg",
            "0123456789abcdef0123456789abcdef0",
            "x\nINFO forged line 0123456789abcd",
        ] {
            assert_eq!(log_id(other), "?", "{other:?}");
        }
    }
}
