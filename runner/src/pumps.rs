//! The MCP server's side of the relay: a pump reading its stdout lines and a
//! feeder writing the gateway's messages to its stdin, each a task of its
//! own so neither direction can stall the other.
//!
//! A line over [`MAX_MESSAGE_BYTES`] is never forwarded (the gateway could
//! not take it) and never silently lost: when it is a response whose id can
//! be read from its head, the gateway gets an error for that request instead,
//! naming the limit.

use bytes::Bytes;
use dynogate_shared::window::MAX_MESSAGE_BYTES;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::process::{ChildStdin, ChildStdout};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::warn;

use crate::lines::{Line, LineReader};

/// Reads the server's stdout lines into the relay's queue.
pub async fn pump_stdout(stdout: ChildStdout, lines: mpsc::Sender<Utf8Bytes>) {
    let mut reader = LineReader::new(stdout, MAX_MESSAGE_BYTES);
    loop {
        let line = match reader.next().await {
            Ok(Some(Line::Message(text))) => text,
            Ok(Some(Line::TooLong { bytes, head })) => match too_large(bytes, &head) {
                Some(error) => {
                    warn!(
                        bytes,
                        limit = MAX_MESSAGE_BYTES,
                        "the MCP server's answer is over the limit; sent an error instead"
                    );
                    error
                }
                None => {
                    warn!(bytes, limit = MAX_MESSAGE_BYTES, "the MCP server wrote a line over the limit; dropped");
                    continue;
                }
            },
            Ok(Some(Line::NotUtf8)) => {
                warn!("the MCP server wrote a line that is not UTF-8; dropped");
                continue;
            }
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, "cannot read the MCP server's stdout");
                return;
            }
        };
        if lines.send(line.into()).await.is_err() {
            return;
        }
    }
}

/// The error that replaces an overlong response, if `head` shows one.
fn too_large(bytes: usize, head: &[u8]) -> Option<String> {
    let id = response_id(head)?;
    let message = format!(
        "the MCP server's answer was {bytes} bytes, over the gateway's limit of {MAX_MESSAGE_BYTES} bytes for one message"
    );
    let error =
        serde_json::json!({"code": -32603, "message": message, "data": {"bytes": bytes, "limit": MAX_MESSAGE_BYTES}});
    Some(format!(r#"{{"jsonrpc":"2.0","id":{id},"error":{error}}}"#))
}

/// The `id` of a response from the first bytes of its JSON: a top-level
/// `"id"` (integer or plain string) with `"result"` or `"error"` beside it
/// and no `"method"` (a request's id must not be answered for the server).
fn response_id(head: &[u8]) -> Option<String> {
    let (mut depth, mut i) = (0usize, 0usize);
    let (mut id, mut is_response) = (None, false);
    while i < head.len() {
        match head[i] {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' => {
                // The head may end inside a string: what was seen decides.
                let Some(end) = string_end(head, i) else { break };
                let key = &head[i + 1..end];
                i = end + 1;
                let rest = skip_ws(head, i);
                if depth == 1 && head.get(rest) == Some(&b':') {
                    match key {
                        b"method" => return None,
                        b"result" | b"error" => is_response = true,
                        b"id" => {
                            let start = skip_ws(head, rest + 1);
                            let end = match head.get(start)? {
                                b'"' => string_end(head, start)? + 1,
                                b'-' | b'0'..=b'9' => {
                                    start + 1 + head[start + 1..].iter().take_while(|b| b.is_ascii_digit()).count()
                                }
                                _ => return None,
                            };
                            let text = std::str::from_utf8(&head[start..end]).ok()?;
                            if text.contains('\\') || !head.get(end).is_some_and(|b| b",} \t\r\n".contains(b)) {
                                return None;
                            }
                            id = Some(text.to_owned());
                        }
                        _ => {}
                    }
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    id.filter(|_| is_response)
}

/// Index of the quote that closes the string opening at `start`.
fn string_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

fn skip_ws(bytes: &[u8], mut i: usize) -> usize {
    while bytes.get(i).is_some_and(|b| b.is_ascii_whitespace()) {
        i += 1;
    }
    i
}

/// Writes the gateway's messages to the server, one per line.
pub async fn feed_stdin(stdin: ChildStdin, mut lines: mpsc::Receiver<Bytes>) {
    let mut stdin = BufWriter::with_capacity(64 * 1024, stdin);
    while let Some(line) = lines.recv().await {
        if write_line(&mut stdin, &line).await.is_err() {
            return;
        }
        if lines.is_empty() && stdin.flush().await.is_err() {
            return;
        }
    }
}

/// Writes one message and its newline. JSON may contain line breaks only as
/// whitespace, so they are turned into spaces to keep one message per line.
async fn write_line(stdin: &mut BufWriter<ChildStdin>, line: &[u8]) -> std::io::Result<()> {
    if line.iter().any(|&b| b == b'\n' || b == b'\r') {
        let flat: Vec<u8> = line.iter().map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b }).collect();
        stdin.write_all(&flat).await?;
    } else {
        stdin.write_all(line).await?;
    }
    stdin.write_all(b"\n").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_id_is_read_from_the_head_of_a_long_line() {
        let cases: &[(&str, Option<&str>)] = &[
            (r#"{"jsonrpc":"2.0","id":7,"result":{"content":[{"text":"xxxx"#, Some("7")),
            (r#"{"jsonrpc":"2.0","id":"a-1","result":{"#, Some(r#""a-1""#)),
            (r#"{ "result" : {"id":3, "x":"#, None),
            (r#"{"result":{"id":3},"id":-4,"#, Some("-4")),
            (r#"{"jsonrpc":"2.0","id":5,"method":"sampling/createMessage","params":{"#, None),
            (r#"{"jsonrpc":"2.0","method":"notifications/message","params":{"#, None),
            (r#"{"jsonrpc":"2.0","id":1.5,"result":{"#, None),
            (r#"{"jsonrpc":"2.0","id":"a\"b","result":{"#, None),
            (r#"{"jsonrpc":"2.0","id":12"#, None),
            (r#"{"k":"}{\"id\":1,","result":1,"id":2,"#, Some("2")),
        ];
        for (head, want) in cases {
            assert_eq!(response_id(head.as_bytes()).as_deref(), *want, "{head}");
        }
    }

    #[test]
    fn the_replacement_error_names_the_limit_and_keeps_the_id() {
        let error = too_large(20_000_000, br#"{"jsonrpc":"2.0","id":9,"result":{"#).unwrap();
        let value: serde_json::Value = serde_json::from_str(&error).unwrap();
        assert_eq!(value["id"], 9);
        assert_eq!(value["error"]["data"]["limit"], MAX_MESSAGE_BYTES);
        assert!(value["error"]["message"].as_str().unwrap().contains("20000000 bytes"));
    }
}
