use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::model::{Model, Turn};
use crate::support::*;

const KEY: &str = "inference-key-for-tests";

/// A gateway whose agents endpoint asks `model`.
fn gateway_for(model: &Model, options: Options) -> Gateway {
    Gateway::with(
        options.env("INFERENCE_URL", &model.url).env("INFERENCE_KEY", KEY).env("INFERENCE_MODEL_ID", "scripted-1"),
    )
}

/// One event of an agents stream: its name and its data (JSON where it is).
#[derive(Debug)]
struct Event {
    name: String,
    data: Value,
}

/// Sends `body` to the agents endpoint and reads the whole stream.
async fn agents(gateway: &Gateway, body: Value) -> (u16, Vec<Event>) {
    let response = agents_request(gateway, body).await;
    let status = response.status().as_u16();
    let text = tokio::time::timeout(PATIENCE, response.text()).await.expect("the stream ends").unwrap();
    (status, parse(&text))
}

async fn agents_request(gateway: &Gateway, body: Value) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{}/v1/agents/heroku", gateway.url))
        .header("accept", "text/event-stream")
        .json(&body);
    if let Some(key) = &gateway.api_key {
        request = request.bearer_auth(key);
    }
    request.send().await.expect("the gateway answers")
}

fn parse(text: &str) -> Vec<Event> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = Some(value.to_owned());
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data.push_str(value);
                }
            }
            let data = serde_json::from_str(&data).unwrap_or(Value::String(data));
            name.map(|name| Event { name, data })
        })
        .collect()
}

fn objects<'a>(events: &'a [Event], object: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e.name == "message" && e.data["object"] == object).map(|e| &e.data).collect()
}

fn tool_texts(events: &[Event]) -> Vec<String> {
    objects(events, "tool.completion")
        .iter()
        .map(|c| c["choices"][0]["message"]["content"].as_str().unwrap().to_owned())
        .collect()
}

/// The exec result inside a tool result the model was given.
fn exec_output(text: &str) -> Value {
    let json = text.split_once("returned result: ").unwrap_or_else(|| panic!("not a result: {text}")).1;
    let result: Value = serde_json::from_str(json).unwrap();
    serde_json::from_str(result["content"][0]["text"].as_str().unwrap()).unwrap()
}

/// The gateway's runner processes.
fn runners_of(gateway: &Gateway) -> Vec<i32> {
    children_of(gateway.pid())
        .into_iter()
        .filter(|pid| argv_of(*pid).is_some_and(|argv| argv.iter().any(|a| a == "--session")))
        .collect()
}

fn python(code: &str) -> String {
    json!({"code": code}).to_string()
}

#[tokio::test]
async fn each_tool_call_runs_on_a_fresh_runner_and_the_stream_has_herokus_shapes() {
    let model = Model::start(Some(KEY), |n, _| match n {
        0 => Turn::Calls(vec![(
            "call_1",
            "code_exec_python",
            python("import os; open('note.txt', 'w').write('x'); print(os.getcwd())"),
        )]),
        1 => Turn::Calls(vec![
            ("call_2", "code_exec_python", python("import os; print(os.path.exists('note.txt'), os.getcwd())")),
            ("call_3", "code_exec_python", python("import os; print(os.path.exists('note.txt'), os.getcwd())")),
        ]),
        _ => Turn::Text("All done."),
    })
    .await;
    let gateway = gateway_for(&model, Options::default());
    let tools = json!([{"type": "heroku_tool", "name": "code_exec_python", "runtime_params": {"max_calls": 5}}]);
    let (status, events) = agents(
        &gateway,
        json!({"messages": [{"role": "user", "content": "write a note, then look for it"}], "tools": tools, "temperature": 0.2}),
    )
    .await;
    assert_eq!(status, 200);

    // The stream: assistant turns with usage, tool results, then done.
    let last = events.last().expect("events");
    assert_eq!((last.name.as_str(), &last.data), ("done", &json!("[DONE]")), "{events:?}");
    let assistant = objects(&events, "chat.completion");
    assert_eq!(assistant.len(), 3, "{events:?}");
    for turn in &assistant {
        assert!(turn["id"].as_str().unwrap().starts_with("agent-"), "{turn}");
        assert_eq!(turn["model"], "scripted-1");
        assert_eq!(turn["usage"]["total_tokens"], 18, "{turn}");
        assert_eq!(turn["choices"][0]["message"]["role"], "assistant");
    }
    assert_eq!(assistant[2]["choices"][0]["message"]["content"], "All done.");
    let results = objects(&events, "tool.completion");
    assert_eq!(results.len(), 3, "{events:?}");
    for result in &results {
        assert_eq!(result["choices"][0]["message"]["role"], "tool");
        assert_eq!(result["usage"], json!({}));
    }

    // Each call ran in a directory of its own, and the note did not survive its runner.
    let outputs: Vec<Value> = tool_texts(&events).iter().map(|t| exec_output(t)).collect();
    let mut dirs: Vec<String> =
        outputs.iter().map(|o| o["stdout"].as_str().unwrap().split(' ').next_back().unwrap().to_owned()).collect();
    for output in &outputs[1..] {
        assert!(output["stdout"].as_str().unwrap().starts_with("False "), "a later call saw the note: {output}");
    }
    dirs.sort();
    dirs.dedup();
    assert_eq!(dirs.len(), 3, "calls shared a runner's directory: {outputs:?}");

    // The model was given the real tool schema, the sampling fields, and every result.
    let requests = model.requests();
    assert_eq!(requests.len(), 3);
    let function = &requests[0]["tools"][0]["function"];
    assert_eq!(function["name"], "code_exec_python");
    assert_eq!(function["parameters"]["properties"]["code"]["type"], "string", "{function}");
    assert_eq!(requests[0]["temperature"], 0.2);
    assert_eq!(requests[0]["model"], "scripted-1");
    let answered: Vec<&str> = requests[2]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| m["tool_call_id"].as_str().unwrap())
        .collect();
    assert_eq!(answered, ["call_1", "call_2", "call_3"]);

    eventually("every runner of the run is gone", || runners_of(&gateway).is_empty()).await;
    let counted = scrape_metrics(&gateway, None).await.2;
    assert_eq!(metric(&counted, "dynogate_agent_runs_total", &[("outcome", "completed")]), 1.0);
    assert_eq!(metric(&counted, "dynogate_agent_tool_calls_total", &[("kind", "code")]), 3.0);
    assert_eq!(metric(&counted, "dynogate_model_call_seconds", &[("outcome", "ok")]), 3.0);
}

#[tokio::test]
async fn bad_arguments_unknown_tools_and_a_model_that_never_stops_end_cleanly() {
    let model = Model::start(Some(KEY), |n, _| match n {
        0 => Turn::Calls(vec![
            ("bad", "code_exec_python", "{\"code\": \"print(1)\"".to_owned()),
            ("unknown", "rm_everything", "{}".to_owned()),
        ]),
        // Never stops asking.
        _ => Turn::Calls(vec![("again", "code_exec_python", python("print('ran')"))]),
    })
    .await;
    let gateway = gateway_for(&model, Options::default());
    let tools = json!([{"type": "heroku_tool", "name": "code_exec_python", "runtime_params": {"max_calls": 2}}]);
    let (status, events) =
        agents(&gateway, json!({"messages": [{"role": "user", "content": "go"}], "tools": tools})).await;
    assert_eq!(status, 200);
    assert_eq!(events.last().unwrap().name, "done");
    let texts = tool_texts(&events);
    assert!(texts[0].contains("not valid JSON"), "{texts:?}");
    assert!(texts[1].contains("not one of this request's tools"), "{texts:?}");
    let ran = texts.iter().filter(|t| t.contains("returned result")).count();
    assert_eq!(ran, 2, "max_calls holds: {texts:?}");
    assert!(texts.last().unwrap().contains("allows it 2 call(s)"), "{texts:?}");
    // The last turn offered no tools, so the model could only conclude.
    let requests = model.requests();
    assert!(requests.last().unwrap().get("tools").is_none(), "{:?}", requests.last());
    assert!(requests[..requests.len() - 1].iter().all(|r| r.get("tools").is_some()));
    eventually("every runner of the run is gone", || runners_of(&gateway).is_empty()).await;
}

#[tokio::test]
async fn upstream_failures_reach_the_caller_as_error_events() {
    let model = Model::start(Some(KEY), |_, request| match request["model"].as_str().unwrap() {
        "rate-limited" => Turn::Status(429, Some(60), r#"{"error":{"message":"slow down"}}"#),
        "broken" => Turn::Status(500, None, "internal trouble"),
        "silent" => Turn::Hang,
        "garbage" => Turn::Garbage,
        _ => Turn::Text("fine"),
    })
    .await;
    let gateway = gateway_for(&model, Options::default().env("INFERENCE_TIMEOUT", "2s"));
    let wrong_key = Gateway::with(
        Options::default()
            .env("INFERENCE_URL", &model.url)
            .env("INFERENCE_KEY", "wrong")
            .env("INFERENCE_MODEL_ID", "m"),
    );
    let ask = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let cases = [
        (&wrong_key, "m", 401, "authentication_error", "Incorrect API key"),
        (&gateway, "rate-limited", 429, "rate_limit_error", "retry after 60s"),
        (&gateway, "broken", 500, "server_error", "internal trouble"),
        (&gateway, "silent", 504, "server_error", "within 2s"),
        (&gateway, "garbage", 502, "server_error", "malformed"),
    ];
    for (gateway, name, code, kind, words) in cases {
        let started = Instant::now();
        let (status, events) = agents(gateway, ask(name)).await;
        assert_eq!(status, 200, "{name}");
        let error = events.iter().find(|e| e.name == "error").unwrap_or_else(|| panic!("{name}: {events:?}"));
        assert_eq!(
            (error.data["code"].as_u64(), error.data["type"].as_str()),
            (Some(code), Some(kind)),
            "{name}: {error:?}"
        );
        assert!(error.data["message"].as_str().unwrap().contains(words), "{name}: {error:?}");
        assert_eq!(events.last().unwrap().name, "done", "{name}");
        assert!(started.elapsed() < Duration::from_secs(30), "{name} took {:?}", started.elapsed());
    }
    let (status, events) = agents(&gateway, ask("fine")).await;
    assert_eq!(status, 200);
    assert_eq!(objects(&events, "chat.completion")[0]["choices"][0]["message"]["content"], "fine");

    // Each failure counted by what went wrong (a 429 worth waiting out is retried first).
    let counted = scrape_metrics(&gateway, None).await.2;
    assert_eq!(metric(&counted, "dynogate_agent_runs_total", &[("outcome", "model_failed")]), 4.0);
    assert_eq!(metric(&counted, "dynogate_agent_runs_total", &[("outcome", "completed")]), 1.0);
    for (outcome, calls) in
        [("rate_limited", 1.0), ("failed", 1.0), ("timed_out", 1.0), ("malformed", 1.0), ("ok", 1.0)]
    {
        assert_eq!(metric(&counted, "dynogate_model_call_seconds", &[("outcome", outcome)]), calls, "{outcome}");
    }
    let refused = scrape_metrics(&wrong_key, None).await.2;
    assert_eq!(metric(&refused, "dynogate_model_call_seconds", &[("outcome", "unauthorized")]), 1.0);
}

#[tokio::test]
async fn requests_are_checked_before_the_stream_starts() {
    let model = Model::start(None, |_, _| Turn::Text("unused")).await;
    let gateway = gateway_for(&model, Options::default().api_key("agents-key"));
    let user = json!([{"role": "user", "content": "hi"}]);
    for (body, words) in [
        (json!({"messages": []}), "at least one message"),
        (json!({"messages": [{"role": "robot", "content": "x"}]}), "role"),
        (json!({"messages": user, "temperature": 3}), "temperature"),
        (json!({"messages": user, "tools": [{"type": "heroku_tool", "name": "pg_psql"}]}), "not available"),
        (json!({"messages": user, "tools": [{"type": "mcp", "name": "nowhere.tool"}]}), "namespace"),
        (json!({"messages": user, "tools": [{"type": "heroku_tool", "name": "dyno_run_command"}]}), "tool_params"),
        (
            json!({"messages": user, "tools": [{"type": "heroku_tool", "name": "code_exec_python", "runtime_params": {"ttl_seconds": 999}}]}),
            "ttl_seconds",
        ),
        (json!({"messages": user, "surprise": 1}), "unknown field"),
    ] {
        let response = agents_request(&gateway, body.clone()).await;
        assert_eq!(response.status().as_u16(), 400, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["type"], "invalid_request_error", "{error}");
        assert!(error["message"].as_str().unwrap().contains(words), "{body}: {error}");
    }
    let anonymous = reqwest::Client::new()
        .post(format!("{}/v1/agents/heroku", gateway.url))
        .json(&json!({"messages": user}))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);

    let unconfigured = Gateway::start();
    let response = agents_request(&unconfigured, json!({"messages": user})).await;
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.text().await.unwrap().contains("INFERENCE_URL"));
}

#[tokio::test]
async fn dyno_run_command_runs_the_apps_command_with_the_models_arguments() {
    let model = Model::start(Some(KEY), |n, _| match n {
        0 => Turn::Calls(vec![("c1", "dyno_run_command", json!({"city": "O'Hare; echo pwned"}).to_string())]),
        _ => Turn::Text("ok"),
    })
    .await;
    let gateway = gateway_for(&model, Options::default());
    let tools = json!([{"type": "heroku_tool", "name": "dyno_run_command", "runtime_params": {"tool_params": {
        "cmd": "printf '%s|' report",
        "description": "Reports on a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }}}]);
    let (status, events) =
        agents(&gateway, json!({"messages": [{"role": "user", "content": "report"}], "tools": tools})).await;
    assert_eq!(status, 200);
    let output = exec_output(&tool_texts(&events)[0]);
    assert_eq!(output["stdout"], "report|--city|O'Hare; echo pwned|", "{output}");
    assert_eq!(output["returncode"], 0);
    let function = &model.requests()[0]["tools"][0]["function"];
    assert_eq!(function["description"], "Reports on a city.");
    assert_eq!(function["parameters"]["required"], json!(["city"]));
}

#[tokio::test]
async fn a_client_that_goes_away_stops_the_loop_and_its_runners() {
    let model = Model::start(Some(KEY), |n, _| match n {
        0 => Turn::Calls(vec![(
            "slow",
            "code_exec_python",
            python("import time; print('started', flush=True); time.sleep(120)"),
        )]),
        _ => Turn::Text("unreachable"),
    })
    .await;
    let gateway = gateway_for(&model, Options::default());
    let tools = json!([{"type": "heroku_tool", "name": "code_exec_python"}]);
    let mut response =
        agents_request(&gateway, json!({"messages": [{"role": "user", "content": "wait"}], "tools": tools})).await;
    let first = tokio::time::timeout(PATIENCE, response.chunk()).await.expect("a first event").unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("chat.completion"), "{first:?}");
    eventually("the tool call's runner starts", || !runners_of(&gateway).is_empty()).await;
    let runners = runners_of(&gateway);
    drop(response);
    let gone_by = Instant::now() + Duration::from_secs(2);
    eventually("the runner is stopped", || runners.iter().all(|pid| gone(*pid))).await;
    assert!(Instant::now() <= gone_by, "the runner outlived the client by more than 2s");
    assert_eq!(model.requests().len(), 1, "the loop went on after the client left");
    let counted = scrape_metrics(&gateway, None).await.2;
    assert_eq!(metric(&counted, "dynogate_agent_runs_total", &[("outcome", "client_gone")]), 1.0);
}

#[tokio::test]
async fn keepalives_flow_while_a_tool_runs() {
    let model = Model::start(Some(KEY), |n, _| match n {
        0 => Turn::Calls(vec![("nap", "code_exec_python", python("import time; time.sleep(2.5); print('rested')"))]),
        _ => Turn::Text("rested"),
    })
    .await;
    let gateway = gateway_for(&model, Options::default().env("HEARTBEAT_INTERVAL", "1s"));
    let tools = json!([{"type": "heroku_tool", "name": "code_exec_python"}]);
    let response =
        agents_request(&gateway, json!({"messages": [{"role": "user", "content": "nap"}], "tools": tools})).await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = tokio::time::timeout(PATIENCE, response.text()).await.unwrap().unwrap();
    let (before, after) = text.split_once("tool.completion").expect("a tool result");
    assert!(before.contains(": keepalive\n\n"), "no keepalive while the tool ran: {text}");
    assert!(after.contains("event: done\ndata: [DONE]"), "{text}");
    assert_eq!(exec_output(&tool_texts(&parse(&text))[0])["stdout"], "rested");
}
