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
//! - `pid {}`: returns its process id;
//! - `flood {count, size}`: sends `count` notifications of `size` bytes that
//!   belong to no request, then answers;
//! - `ask {}`: sends the client a `roots/list` request and answers with the
//!   client's reply;
//! - `seen {tag}`: how many calls carried the argument `tag` (any tool counts
//!   the `tag` it is given, when it starts), to check nothing ran twice.
//!
//! `progress` also takes `delay_ms` between steps. Started as
//! `mcp-echo --page-size N`, it lists its tools N at a time (`nextCursor`).

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

type Out = Arc<Mutex<std::io::Stdout>>;

/// Calls seen per `tag`.
static SEEN: LazyLock<Mutex<HashMap<String, u64>>> = LazyLock::new(Mutex::default);
/// Requests sent to the client, by their id, with the tool call waiting on each.
static ASKED: LazyLock<Mutex<HashMap<String, Value>>> = LazyLock::new(Mutex::default);
/// Tools per `tools/list` page (`--page-size N`); all at once without it.
static PAGE_SIZE: LazyLock<Option<usize>> = LazyLock::new(|| {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2).find(|w| w[0] == "--page-size").and_then(|w| w[1].parse().ok()).filter(|n| *n > 0)
});

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
        // A response from the client to one of our requests.
        let waiting = ASKED.lock().expect("asked lock").remove(&id.to_string());
        if let Some(call) = waiting {
            let answer = message.get("result").or_else(|| message.get("error")).cloned().unwrap_or(Value::Null);
            reply(out, &call, text_result(&answer.to_string()));
        }
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
        "tools/list" => reply(out, id, tools_page(&params)),
        "tools/call" => call(id, &params, out),
        _ => send(
            out,
            &json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": format!("unknown method {method}")}}),
        ),
    }
}

/// One page of the tool list: from the `cursor` given (an offset) on.
fn tools_page(params: &Value) -> Value {
    let all = tools();
    let all = all.as_array().expect("a list");
    let Some(size) = *PAGE_SIZE else { return json!({"tools": all}) };
    let from: usize = params["cursor"].as_str().and_then(|c| c.parse().ok()).unwrap_or(0);
    let to = (from + size).min(all.len());
    let mut page = json!({"tools": all.get(from..to).unwrap_or_default()});
    if to < all.len() {
        page["nextCursor"] = json!(to.to_string());
    }
    page
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
        {"name": "pid", "description": "The server's process id.", "inputSchema": object(json!({}))},
        {"name": "flood", "description": "Sends many unrelated notifications, then answers.", "inputSchema": object(json!({"count": {"type": "integer"}, "size": {"type": "integer"}}))},
        {"name": "ask", "description": "Asks the client for its roots and returns the answer.", "inputSchema": object(json!({}))},
        {"name": "seen", "description": "How many calls carried this tag.", "inputSchema": object(json!({"tag": {"type": "string"}}))}
    ])
}

fn call(id: &Value, params: &Value, out: &Out) {
    let args = &params["arguments"];
    if let Some(tag) = args["tag"].as_str()
        && params["name"] != "seen"
    {
        *SEEN.lock().expect("seen lock").entry(tag.to_owned()).or_default() += 1;
    }
    match params["name"].as_str().unwrap_or_default() {
        "echo" => reply(out, id, text_result(args["text"].as_str().unwrap_or_default())),
        "progress" => {
            let token = params["_meta"]["progressToken"].clone();
            let steps = args["steps"].as_u64().unwrap_or(3);
            let delay = Duration::from_millis(args["delay_ms"].as_u64().unwrap_or(0));
            let (id, out) = (id.clone(), out.clone());
            let work = move || {
                for step in 1..=steps {
                    send(
                        &out,
                        &json!({"jsonrpc": "2.0", "method": "notifications/progress",
                                "params": {"progressToken": token, "progress": step, "total": steps}}),
                    );
                    std::thread::sleep(delay);
                }
                reply(&out, &id, text_result(&format!("{steps} steps")));
            };
            if delay.is_zero() {
                work();
            } else {
                std::thread::spawn(work);
            }
        }
        "flood" => {
            let count = args["count"].as_u64().unwrap_or(1000);
            let data = "x".repeat(usize::try_from(args["size"].as_u64().unwrap_or(1000)).unwrap_or(1000));
            for _ in 0..count {
                send(
                    out,
                    &json!({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": data}}),
                );
            }
            reply(out, id, text_result(&format!("flooded {count}")));
        }
        "ask" => {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            let ask_id = format!("srv-{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            ASKED.lock().expect("asked lock").insert(Value::String(ask_id.clone()).to_string(), id.clone());
            send(out, &json!({"jsonrpc": "2.0", "id": ask_id, "method": "roots/list", "params": {}}));
        }
        "seen" => {
            let count = SEEN.lock().expect("seen lock").get(args["tag"].as_str().unwrap_or_default()).copied();
            reply(out, id, text_result(&count.unwrap_or(0).to_string()));
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
