//! The audit trail: one JSON log line per tool call and one per session end
//! (log target `dynogate::audit`), saying what ran without saying what it
//! was: the code's sha256, never the code; a fingerprint of the API key,
//! never the key; sizes of the output, never the output.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// Whether audit lines are logged (`RUST_LOG` lets `dynogate::audit` through at info).
pub fn enabled() -> bool {
    tracing::enabled!(target: "dynogate::audit", tracing::Level::INFO)
}

/// What the gateway keeps of a `tools/call` request until its answer.
#[derive(Debug)]
pub struct ToolCall {
    tool: String,
    code_sha256: Option<String>,
    packages: Vec<String>,
    started: Instant,
}

impl ToolCall {
    /// Reads a `tools/call` request (`None` for anything else).
    pub fn from_request(payload: &[u8]) -> Option<ToolCall> {
        let request: Value = serde_json::from_slice(payload).ok()?;
        let params = &request["params"];
        let tool = params["name"].as_str()?.chars().take(128).collect();
        let arguments = &params["arguments"];
        let code_sha256 = arguments["code"].as_str().map(|code| hex::encode(Sha256::digest(code.as_bytes())));
        let packages = arguments["packages"]
            .as_array()
            .map(|list| list.iter().filter_map(Value::as_str).take(64).map(|p| p.chars().take(128).collect()).collect())
            .unwrap_or_default();
        Some(ToolCall { tool, code_sha256, packages, started: Instant::now() })
    }

    #[cfg(test)]
    fn tool(&self) -> &str {
        &self.tool
    }

    /// Logs the call with what its answer says.
    pub fn answered(&self, session: &str, key: Option<&str>, answer: &[u8]) {
        let answer: Value = serde_json::from_slice(answer).unwrap_or(Value::Null);
        let result = &answer["result"];
        // The executor's `{returncode, stdout, stderr}`, as structured content or as the text.
        let exec = match &result["structuredContent"]["result"] {
            Value::Object(_) => result["structuredContent"]["result"].clone(),
            _ => {
                result["content"][0]["text"].as_str().and_then(|t| serde_json::from_str(t).ok()).unwrap_or(Value::Null)
            }
        };
        let stdout = exec["stdout"].as_str().unwrap_or_default();
        let stderr = exec["stderr"].as_str().unwrap_or_default();
        let returncode = exec["returncode"].as_i64();
        let line = json!({
            "audit": "tool_call",
            "session": dynogate_shared::names::log_id(session).to_string(),
            "api_key": key,
            "tool": self.tool,
            "code_sha256": self.code_sha256,
            "packages": self.packages,
            "returncode": returncode,
            "is_error": result["isError"].as_bool().unwrap_or(answer.get("error").is_some()),
            "jsonrpc_error": answer["error"]["code"].as_i64(),
            "duration_ms": self.started.elapsed().as_millis() as u64,
            "stdout_bytes": stdout.len(),
            "stderr_bytes": stderr.len(),
            "timed_out": returncode == Some(-2),
            "truncated": stdout.contains(" bytes omitted ...]") || stderr.contains(" bytes omitted ...]"),
        });
        tracing::info!(target: "dynogate::audit", "{line}");
    }
}

/// Logs a session's end.
pub fn session_ended(session: &str, key: Option<&str>, reason: &str, lifetime_ms: u64, calls: u64) {
    let line = json!({
        "audit": "session_end",
        "session": dynogate_shared::names::log_id(session).to_string(),
        "api_key": key,
        "reason": reason,
        "lifetime_ms": lifetime_ms,
        "calls": calls,
    });
    tracing::info!(target: "dynogate::audit", "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_call_is_kept_without_its_code() {
        let request = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"code_exec_python","arguments":{"code":"print('secret')","packages":["six"]}}}"#;
        let call = ToolCall::from_request(request).unwrap();
        assert_eq!(call.tool(), "code_exec_python");
        assert_eq!(call.packages, ["six"]);
        assert_eq!(call.code_sha256.as_deref().map(str::len), Some(64));
        assert!(!format!("{call:?}").contains("secret"));
        assert!(ToolCall::from_request(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#).is_none());
    }
}
