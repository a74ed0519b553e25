//! `mcp-echo`: a tiny stdio MCP server for tests and benchmarks.
//!
//! It answers on the raw line protocol with no SDK in between, so it costs
//! next to nothing per call and can be used as the floor the relay is measured
//! against. Its tools exercise what a relay must route:
//! - `echo {text}`: returns `text`;
//! - `progress {steps}`: sends `steps` progress notifications on the
//!   request's progress token, then answers;
//! - `notify {text}`: sends a `notifications/message` that belongs to no
//!   request, then answers;
//! - `sleep {ms}`: answers after `ms` milliseconds (other calls go on meanwhile);
//! - `exit {code}`: exits the process at once with `code`;
//! - `env {}`: returns the names of its environment variables;
//! - `pid {}`: returns its process id.

use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

type Out = Arc<Mutex<std::io::Stdout>>;

fn main() {
    let out: Out = Arc::new(Mutex::new(std::io::stdout()));
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            eprintln!("mcp-echo: not JSON: {line}");
            continue;
        };
        handle(&message, &out);
    }
}

fn send(out: &Out, value: &Value) {
    let mut text = value.to_string();
    text.push('\n');
    let mut out = out.lock().expect("stdout lock");
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

fn reply(out: &Out, id: &Value, result: Value) {
    send(out, &json!({"jsonrpc": "2.0", "id": id, "result": result}));
}

fn text_result(text: &str) -> Value {
    json!({"content": [{"type": "text", "text": text}], "isError": false})
}

fn handle(message: &Value, out: &Out) {
    let Some(id) = message.get("id").filter(|id| !id.is_null()) else {
        return;
    };
    let Some(method) = message.get("method").and_then(Value::as_str) else {
        return;
    };
    let params = message.get("params").cloned().unwrap_or(Value::Null);
    match method {
        "initialize" => {
            let requested = params["protocolVersion"].as_str().unwrap_or_default();
            let version = if ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"].contains(&requested) {
                requested
            } else {
                "2025-11-25"
            };
            reply(
                out,
                id,
                json!({
                    "protocolVersion": version,
                    "capabilities": {"tools": {}},
                    "serverInfo": {"name": "mcp-echo", "version": env!("CARGO_PKG_VERSION")}
                }),
            );
        }
        "ping" => reply(out, id, json!({})),
        "tools/list" => reply(out, id, json!({"tools": tools()})),
        "tools/call" => call(id, &params, out),
        _ => send(
            out,
            &json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": format!("unknown method {method}")}}),
        ),
    }
}

fn tools() -> Value {
    let object = |props: Value| json!({"type": "object", "properties": props});
    json!([
        {"name": "echo", "description": "Returns its text.", "inputSchema": object(json!({"text": {"type": "string"}}))},
        {"name": "progress", "description": "Sends progress notifications, then answers.", "inputSchema": object(json!({"steps": {"type": "integer"}}))},
        {"name": "notify", "description": "Sends an unrelated notification, then answers.", "inputSchema": object(json!({"text": {"type": "string"}}))},
        {"name": "sleep", "description": "Answers after ms milliseconds.", "inputSchema": object(json!({"ms": {"type": "integer"}}))},
        {"name": "exit", "description": "Exits the server.", "inputSchema": object(json!({"code": {"type": "integer"}}))},
        {"name": "env", "description": "Names of the environment variables.", "inputSchema": object(json!({}))},
        {"name": "pid", "description": "The server's process id.", "inputSchema": object(json!({}))}
    ])
}

fn call(id: &Value, params: &Value, out: &Out) {
    let args = &params["arguments"];
    match params["name"].as_str().unwrap_or_default() {
        "echo" => reply(out, id, text_result(args["text"].as_str().unwrap_or_default())),
        "progress" => {
            let token = params["_meta"]["progressToken"].clone();
            let steps = args["steps"].as_u64().unwrap_or(3);
            for step in 1..=steps {
                send(
                    out,
                    &json!({"jsonrpc": "2.0", "method": "notifications/progress",
                            "params": {"progressToken": token, "progress": step, "total": steps}}),
                );
            }
            reply(out, id, text_result(&format!("{steps} steps")));
        }
        "notify" => {
            let text = args["text"].as_str().unwrap_or_default();
            send(
                out,
                &json!({"jsonrpc": "2.0", "method": "notifications/message",
                        "params": {"level": "info", "data": text}}),
            );
            reply(out, id, text_result("notified"));
        }
        "sleep" => {
            let ms = args["ms"].as_u64().unwrap_or(1000);
            let (id, out) = (id.clone(), out.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(ms));
                reply(&out, &id, text_result(&format!("slept {ms}ms")));
            });
        }
        "exit" => std::process::exit(i32::try_from(args["code"].as_i64().unwrap_or(0)).unwrap_or(1)),
        "env" => {
            let mut names: Vec<String> = std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()).collect();
            names.sort();
            reply(out, id, text_result(&names.join("\n")));
        }
        "pid" => reply(out, id, text_result(&std::process::id().to_string())),
        other => reply(
            out,
            id,
            json!({"content": [{"type": "text", "text": format!("Unknown tool: {other}")}], "isError": true}),
        ),
    }
}
