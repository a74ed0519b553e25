//! An MCP client over streamable HTTP, as thin as possible, that checks every
//! answer: the right id, no error, and the echoed text equal to what was sent.

use std::sync::Arc;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::wire::{Endpoint, Method, Reply};

/// One MCP session.
#[derive(Clone)]
pub struct Session {
    endpoint: Arc<Endpoint>,
    pub id: Option<String>,
    version: String,
}

/// The JSON-RPC message of a response body, JSON or SSE (the last event).
pub fn message_of(content_type: &str, body: &str) -> anyhow::Result<Value> {
    if content_type.starts_with("text/event-stream") {
        let data = body
            .split("\n\n")
            .filter_map(|event| {
                let lines: Vec<&str> =
                    event.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim_start).collect();
                (!lines.is_empty() && !lines.concat().is_empty()).then(|| lines.join("\n"))
            })
            .last()
            .context("an SSE answer without data")?;
        Ok(serde_json::from_str(&data)?)
    } else {
        Ok(serde_json::from_str(body)?)
    }
}

impl Session {
    /// `initialize` and `notifications/initialized`.
    pub async fn open(endpoint: &Arc<Endpoint>) -> anyhow::Result<Session> {
        let mut session = Session { endpoint: endpoint.clone(), id: None, version: "2025-06-18".into() };
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "dynogate-bench", "version": "1"}}});
        let reply = session.post(init.to_string()).await?;
        session.id = reply.session_id.clone();
        let answer = message_of(&reply.content_type, text_of(&reply)?)?;
        if answer["id"] != 0 || answer.get("result").is_none() {
            bail!("initialize failed: {answer}");
        }
        if let Some(version) = answer["result"]["protocolVersion"].as_str() {
            session.version = version.to_owned();
        }
        session.post(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string()).await?;
        Ok(session)
    }

    /// The same session, its requests sent to another endpoint (another
    /// instance of a gateway sharing its sessions).
    pub fn via(&self, endpoint: &Arc<Endpoint>) -> Session {
        Session { endpoint: endpoint.clone(), ..self.clone() }
    }

    /// Calls `echo` with `text` and checks the answer. The request is
    /// formatted and the answer read without building JSON trees, so the
    /// load generator spends as little of the machine as it can.
    pub async fn echo(&self, id: u64, text: &str) -> anyhow::Result<()> {
        let quoted = serde_json::to_string(text)?;
        let request = format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"echo","arguments":{{"text":{quoted}}}}}}}"#
        );
        let reply = self.post(request).await?;
        check_echo_fast(&reply.content_type, text_of(&reply)?, id, text)
    }

    /// Runs Python with `code_exec_python`; checks it printed `expect`.
    /// Runs `code` with `code_exec_python` and checks it printed `expect`;
    /// returns the executor's own time for the command (`_meta` timing),
    /// when it reports one.
    pub async fn python(&self, id: u64, code: &str, expect: &str) -> anyhow::Result<Option<f64>> {
        let (stdout, seconds) = self.run_python(id, code).await?;
        if stdout != expect {
            bail!("{code:?} printed {stdout:?}, not {expect:?}");
        }
        Ok(seconds)
    }

    /// Runs `code` with `code_exec_python`: its stdout and the command's time.
    pub async fn run_python(&self, id: u64, code: &str) -> anyhow::Result<(String, Option<f64>)> {
        let call = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                          "params": {"name": "code_exec_python", "arguments": {"code": code}}});
        let reply = self.post(call.to_string()).await?;
        let answer = message_of(&reply.content_type, text_of(&reply)?)?;
        let text = answer["result"]["content"][0]["text"].as_str().with_context(|| format!("no result: {answer}"))?;
        let result: Value = serde_json::from_str(text)?;
        if answer["id"] != id || result["returncode"] != 0 {
            bail!("unexpected answer: {answer}");
        }
        let stdout = result["stdout"].as_str().unwrap_or_default().to_owned();
        Ok((stdout, answer["result"]["_meta"][dynogate_shared::timing::META_KEY]["run_seconds"].as_f64()))
    }

    pub async fn close(&self) -> anyhow::Result<()> {
        let headers: Vec<(&str, &str)> = self.id.iter().map(|id| ("mcp-session-id", id.as_str())).collect();
        self.endpoint.send(Method::DELETE, None, &headers).await?;
        Ok(())
    }

    /// POSTs a body; fails on an HTTP error status.
    async fn post(&self, body: String) -> anyhow::Result<Reply> {
        let mut headers = vec![("accept", "application/json, text/event-stream"), ("content-type", "application/json")];
        if let Some(id) = &self.id {
            headers.push(("mcp-session-id", id));
            headers.push(("mcp-protocol-version", &self.version));
        }
        let reply = self.endpoint.send(Method::POST, Some(body), &headers).await?;
        if !(200..300).contains(&reply.status) {
            bail!("HTTP {}: {}", reply.status, String::from_utf8_lossy(&reply.body));
        }
        Ok(reply)
    }
}

fn text_of(reply: &Reply) -> anyhow::Result<&str> {
    std::str::from_utf8(&reply.body).context("an answer that is not UTF-8")
}

/// The fields of an echo answer, read without building a JSON tree.
#[derive(serde::Deserialize)]
struct Answer<'a> {
    id: Option<u64>,
    #[serde(borrow)]
    result: Option<EchoResult<'a>>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

#[derive(serde::Deserialize)]
struct EchoResult<'a> {
    #[serde(borrow)]
    content: Vec<Content<'a>>,
}

#[derive(serde::Deserialize)]
struct Content<'a> {
    #[serde(borrow)]
    text: std::borrow::Cow<'a, str>,
}

/// [`check_echo`] on a raw answer body (JSON, or SSE whose last event is the answer).
pub fn check_echo_fast(content_type: &str, body: &str, id: u64, text: &str) -> anyhow::Result<()> {
    let json = if content_type.starts_with("text/event-stream") {
        return check_echo(&message_of(content_type, body)?, id, text);
    } else {
        body
    };
    let answer: Answer<'_> = serde_json::from_str(json)?;
    if answer.id != Some(id) {
        bail!("answer for id {:?} where {id} was asked", answer.id);
    }
    if answer.error.is_some() {
        bail!("error answer: {json}");
    }
    let echoed = answer.result.and_then(|r| r.content.into_iter().next()).context("no text in the answer")?.text;
    if echoed != text {
        bail!("echo mismatch: sent {} bytes, got {} bytes back", text.len(), echoed.len());
    }
    Ok(())
}

/// Checks an echo answer: right id, no error, same text.
pub fn check_echo(answer: &Value, id: u64, text: &str) -> anyhow::Result<()> {
    if answer["id"] != id {
        bail!("answer for id {} where {id} was asked", answer["id"]);
    }
    if let Some(error) = answer.get("error") {
        bail!("error answer: {error}");
    }
    let echoed = answer["result"]["content"][0]["text"].as_str().context("no text in the answer")?;
    if echoed != text {
        bail!("echo mismatch: sent {} bytes, got {} bytes back", text.len(), echoed.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_from_json_or_sse() {
        let json = message_of("application/json", r#"{"id":1}"#).unwrap();
        assert_eq!(json["id"], 1);
        let sse = message_of("text/event-stream", "id: 1-0\ndata: \n\nevent: message\ndata: {\"id\":2}\n\n").unwrap();
        assert_eq!(sse["id"], 2);
    }

    #[test]
    fn raw_echo_answers_are_checked() {
        let body =
            r#"{"jsonrpc":"2.0","id":3,"result":{"content":[{"type":"text","text":"h\u00e9"}],"isError":false}}"#;
        assert!(check_echo_fast("application/json", body, 3, "hé").is_ok());
        assert!(check_echo_fast("application/json", body, 4, "hé").is_err());
        assert!(check_echo_fast("application/json", body, 3, "he").is_err());
        let error = r#"{"jsonrpc":"2.0","id":3,"error":{"code":-32003,"message":"gone"}}"#;
        assert!(check_echo_fast("application/json", error, 3, "hé").is_err());
    }

    #[test]
    fn echo_answers_are_checked() {
        let ok = json!({"id": 3, "result": {"content": [{"type": "text", "text": "hi"}]}});
        assert!(check_echo(&ok, 3, "hi").is_ok());
        assert!(check_echo(&ok, 4, "hi").is_err());
        assert!(check_echo(&ok, 3, "ho").is_err());
        assert!(check_echo(&json!({"id": 3, "error": {"code": 1}}), 3, "hi").is_err());
    }
}
