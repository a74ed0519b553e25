//! What the commands print. JSON for `jq` goes to stdout; progress and
//! errors go to stderr, so a pipe only ever sees the JSON.
//!
//! [`Transcript`] turns the agents stream's completions into readable lines;
//! it is pure (values in, strings out) so the wording is tested without a
//! server.

use std::collections::HashMap;
use std::io::Write;

use serde::Serialize;
use serde_json::Value;

/// How much of a tool's result the readable transcript shows.
const RESULT_PREVIEW_CHARS: usize = 500;

/// Writes `value` to stdout as pretty-printed JSON.
pub fn json(value: &impl Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    line(&text)
}

/// Writes one line to stdout. A reader that went away (`| head`) is not an
/// error: what it wanted it has.
pub fn line(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// An event's data as one line of JSON for `--json`: as the server wrote
/// it when it is one line already (so key order and spacing are the
/// server's), compacted when it spans lines, quoted when it is not JSON.
pub fn one_line(data: &str) -> String {
    match serde_json::from_str::<Value>(data) {
        Ok(_) if !data.contains('\n') => data.trim().to_owned(),
        Ok(value) => value.to_string(),
        Err(_) => Value::String(data.to_owned()).to_string(),
    }
}

/// One progress notification as a line for stderr.
pub fn progress_line(progress: f64, total: Option<f64>, message: Option<&str>) -> String {
    let mut line = match total {
        Some(total) => format!("progress {progress}/{total}"),
        None => format!("progress {progress}"),
    };
    if let Some(message) = message.filter(|m| !m.is_empty()) {
        line.push_str(": ");
        line.push_str(message);
    }
    line
}

/// The readable form of an agent's completions. Remembers the tool each
/// call id named, because a tool's answer carries only the id.
#[derive(Debug, Default)]
pub struct Transcript {
    tools: HashMap<String, String>,
}

impl Transcript {
    /// The lines for one `message` event's completion object.
    pub fn completion(&mut self, completion: &Value) -> Vec<String> {
        let mut lines = Vec::new();
        let choices = completion["choices"].as_array().map(Vec::as_slice).unwrap_or_default();
        for message in choices.iter().map(|choice| &choice["message"]) {
            let content = text_of(&message["content"]);
            if message["role"] == "tool" {
                let id = message["tool_call_id"].as_str().unwrap_or_default();
                let name = message["name"]
                    .as_str()
                    .or_else(|| self.tools.get(id).map(String::as_str))
                    .unwrap_or(if id.is_empty() { "tool" } else { id });
                lines.push(format!("← {name}: {}", preview(content.trim())));
                continue;
            }
            if !content.trim().is_empty() {
                lines.push(content.trim_end().to_owned());
            }
            for call in message["tool_calls"].as_array().map(Vec::as_slice).unwrap_or_default() {
                let name = call["function"]["name"].as_str().unwrap_or("?");
                let arguments = match &call["function"]["arguments"] {
                    Value::String(text) => text.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                if let Some(id) = call["id"].as_str() {
                    self.tools.insert(id.to_owned(), name.to_owned());
                }
                lines.push(format!("→ calling {name}({arguments})"));
            }
        }
        lines
    }
}

/// An `error` event's data as one line: `{"code", "message", "type"}`, or
/// the raw data when it is not that.
pub fn agent_error(data: &str) -> String {
    let Ok(error) = serde_json::from_str::<Value>(data) else {
        return format!("the agent failed: {data}");
    };
    let message = error["message"].as_str().map(str::to_owned).unwrap_or_else(|| error.to_string());
    let details: Vec<String> =
        [error["type"].as_str().map(str::to_owned), error["code"].as_i64().map(|code| format!("code {code}"))]
            .into_iter()
            .flatten()
            .collect();
    if details.is_empty() {
        format!("the agent failed: {message}")
    } else {
        format!("the agent failed: {message} ({})", details.join(", "))
    }
}

/// Message content: a string, or the text parts of a list of parts.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts.iter().filter_map(|part| part["text"].as_str()).collect::<Vec<_>>().join(""),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn preview(text: &str) -> String {
    match text.char_indices().nth(RESULT_PREVIEW_CHARS) {
        Some((cut, _)) => {
            let rest = text[cut..].chars().count();
            format!("{}… ({rest} more characters)", &text[..cut])
        }
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn completion(message: Value) -> Value {
        json!({"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
               "choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": {}})
    }

    #[test]
    fn a_conversation_reads_as_calls_results_and_text() {
        let mut transcript = Transcript::default();
        let call = completion(json!({"role": "assistant", "content": "Let me run it.", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "code_exec_python", "arguments": "{\"code\":\"print(2+2)\"}"}}
        ]}));
        assert_eq!(
            transcript.completion(&call),
            ["Let me run it.", "→ calling code_exec_python({\"code\":\"print(2+2)\"})"]
        );
        let result = completion(json!({"role": "tool", "content": "4\n", "tool_call_id": "t1"}));
        assert_eq!(transcript.completion(&result), ["← code_exec_python: 4"]);
        let answer = completion(json!({"role": "assistant", "content": [{"type": "text", "text": "It is 4."}]}));
        assert_eq!(transcript.completion(&answer), ["It is 4."]);
        let unknown = completion(json!({"role": "tool", "content": "x", "tool_call_id": "t9"}));
        assert_eq!(transcript.completion(&unknown), ["← t9: x"]);
        assert!(transcript.completion(&json!({"object": "chat.completion"})).is_empty());
    }

    #[test]
    fn long_results_are_cut() {
        let mut transcript = Transcript::default();
        let long = completion(json!({"role": "tool", "name": "t", "content": "y".repeat(RESULT_PREVIEW_CHARS + 20)}));
        let lines = transcript.completion(&long);
        assert_eq!(lines[0], format!("← t: {}… (20 more characters)", "y".repeat(RESULT_PREVIEW_CHARS)));
    }

    #[test]
    fn errors_and_progress_are_one_line() {
        assert_eq!(
            agent_error(r#"{"code":429,"message":"Too many requests","type":"rate_limit"}"#),
            "the agent failed: Too many requests (rate_limit, code 429)"
        );
        assert_eq!(agent_error("boom"), "the agent failed: boom");
        assert_eq!(progress_line(3.0, Some(10.0), Some("installing")), "progress 3/10: installing");
        assert_eq!(progress_line(0.5, None, None), "progress 0.5");
    }

    #[test]
    fn json_lines_keep_the_servers_text() {
        assert_eq!(one_line(r#"{"z": 1, "a": 2}"#), r#"{"z": 1, "a": 2}"#);
        assert_eq!(one_line("{\"a\":\n 1}"), r#"{"a":1}"#);
        assert_eq!(one_line("oops"), r#""oops""#);
    }
}
