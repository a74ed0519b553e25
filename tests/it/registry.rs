use rmcp::ServiceExt;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::{Value, json};

use crate::support::*;

/// A gateway started in a directory whose Procfile declares the executor,
/// the echo server (also listing its tools three at a time) and a server
/// that cannot start.
fn gateway_with_procfile(dir: &tempfile::TempDir, extra: Options) -> Gateway {
    let procfile = format!(
        "web: {GATEWAY}\nmcp-exec: {RUNNER} exec\nmcp-echo: {ECHO}\nmcp-broken: /nonexistent/mcp-server --stdio\n\
         mcp-paged: {ECHO} --page-size 3\nworker: sleep 1\n"
    );
    std::fs::write(dir.path().join("Procfile"), procfile).unwrap();
    Gateway::with(extra.cwd(dir.path()).env("DISCOVER_SERVERS", "start"))
}

async fn servers(gateway: &Gateway) -> Vec<Value> {
    let mut request = reqwest::Client::new().get(format!("{}/v1/mcp/servers", gateway.url));
    if let Some(key) = &gateway.api_key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    response.json().await.unwrap()
}

/// The servers, once none is still syncing.
async fn synced(gateway: &Gateway) -> Vec<Value> {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let list = servers(gateway).await;
        if list.iter().all(|s| s["primitives_status"] != "syncing") {
            return list;
        }
        assert!(std::time::Instant::now() < deadline, "still syncing: {list:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn by_type<'a>(list: &'a [Value], process_type: &str) -> &'a Value {
    list.iter().find(|s| s["process_type"] == process_type).unwrap_or_else(|| panic!("{process_type} in {list:?}"))
}

async fn client(gateway: &Gateway, path: &str) -> rmcp::service::RunningService<rmcp::RoleClient, ()> {
    let mut config = StreamableHttpClientTransportConfig::with_uri(format!("{}{path}", gateway.url));
    if let Some(key) = &gateway.api_key {
        config = config.auth_header(key.clone());
    }
    ().serve(StreamableHttpClientTransport::from_config(config)).await.expect("connects")
}

#[tokio::test]
async fn the_procfiles_servers_are_listed_with_their_tools_and_a_broken_one_with_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway_with_procfile(&dir, Options::default().api_key("registry-key"));
    let list = synced(&gateway).await;
    let types: Vec<&str> = list.iter().map(|s| s["process_type"].as_str().unwrap()).collect();
    assert_eq!(types, ["mcp-code-exec", "mcp-exec", "mcp-echo", "mcp-broken", "mcp-paged"], "{list:?}");

    let exec = by_type(&list, "mcp-exec");
    assert_eq!(
        (exec["namespace"].as_str(), exec["process_command"].as_str()),
        (Some("exec"), Some(&*format!("{RUNNER} exec")))
    );
    assert_eq!(
        (exec["server_status"].as_str(), exec["primitives_status"].as_str()),
        (Some("registered"), Some("synced"))
    );
    let python = exec["tools"].as_array().unwrap().iter().find(|t| t["name"] == "code_exec_python").expect("listed");
    assert_eq!(python["namespaced_name"], "exec.code_exec_python");
    assert_eq!(python["input_schema"]["required"], json!(["code"]));
    assert!(python["description"].as_str().is_some_and(|d| !d.is_empty()));
    assert!(python["annotations"].is_object());
    for field in ["id", "created_at", "updated_at"] {
        assert!(exec[field].as_str().is_some_and(|v| !v.is_empty()), "{field}: {exec}");
    }

    let echo = by_type(&list, "mcp-echo");
    assert_eq!(echo["primitives_status"], "synced", "{echo}");
    assert!(echo["tools"].as_array().unwrap().iter().any(|t| t["namespaced_name"] == "echo.echo"), "{echo}");
    // A server that lists its tools a page at a time has all of them found.
    let paged = by_type(&list, "mcp-paged");
    let names = |server: &Value| -> Vec<String> {
        server["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap().to_owned()).collect()
    };
    assert!(names(echo).len() > 3, "{echo}");
    assert_eq!(names(paged), names(echo), "{paged}");

    let broken = by_type(&list, "mcp-broken");
    assert_eq!(
        (broken["server_status"].as_str(), broken["primitives_status"].as_str()),
        (Some("disconnected"), Some("error"))
    );
    assert!(broken["error"].as_str().is_some_and(|e| !e.is_empty()), "{broken}");
    assert_eq!(broken["tools"], json!([]));

    // Asked again at once: the failure stands (no runner per request), still listed.
    let again = servers(&gateway).await;
    assert_eq!(by_type(&again, "mcp-broken")["primitives_status"], "error");
    assert_eq!(by_type(&again, "mcp-broken")["error"], broken["error"]);
    eventually("no runner is left from the discovery", || {
        children_of(gateway.pid())
            .into_iter()
            .all(|pid| !argv_of(pid).is_some_and(|a| a.iter().any(|x| x == "--session")))
    })
    .await;
}

#[tokio::test]
async fn each_registered_server_has_its_own_mcp_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway_with_procfile(&dir, Options::default().env("DISCOVER_SERVERS", "on-demand"));

    let echo = client(&gateway, "/mcp/echo").await;
    let tools = echo.list_all_tools().await.unwrap();
    assert!(tools.iter().any(|t| t.name == "echo"), "{tools:?}");
    let said = echo.call_tool(tool_call("echo", json!({"text": "via /mcp/echo"}))).await.unwrap();
    assert_eq!(said.content[0].as_text().unwrap().text, "via /mcp/echo");

    // By process type too; and the executor of the Procfile runs code.
    let exec = client(&gateway, "/mcp/mcp-exec").await;
    let ran = exec.call_tool(tool_call("code_exec_python", json!({"code": "print(6*7)"}))).await.unwrap();
    assert_eq!(exec_result_of(&ran)["stdout"], "42");
    // The plain endpoint keeps the default server.
    let default = gateway.client().await;
    assert!(default.list_all_tools().await.unwrap().iter().any(|t| t.name == "code_exec_python"));

    // A session belongs to its endpoint, and unknown names are refused by name.
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let elsewhere = reqwest::Client::new()
        .post(format!("{}/mcp/echo", gateway.url))
        .header("accept", ACCEPT_BOTH)
        .header("mcp-session-id", &session)
        .json(&json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}))
        .send()
        .await
        .unwrap();
    assert_eq!(elsewhere.status().as_u16(), 404);
    let unknown = reqwest::Client::new()
        .post(format!("{}/mcp/worker", gateway.url))
        .header("accept", ACCEPT_BOTH)
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status().as_u16(), 404);
    assert!(unknown.text().await.unwrap().contains("no MCP server named \\\"worker\\\""));
    echo.cancel().await.unwrap();
    exec.cancel().await.unwrap();
    default.cancel().await.unwrap();
}

#[tokio::test]
async fn an_agent_calls_a_registered_servers_tool_by_its_namespaced_name() {
    let model = crate::model::Model::start(None, |n, _| match n {
        0 => crate::model::Turn::Calls(vec![("e1", "echo__echo", json!({"text": "from the agent"}).to_string())]),
        _ => crate::model::Turn::Text("echoed"),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway_with_procfile(
        &dir,
        Options::default()
            .env("DISCOVER_SERVERS", "on-demand")
            .env("INFERENCE_URL", &model.url)
            .env("INFERENCE_MODEL_ID", "m"),
    );
    let body =
        json!({"messages": [{"role": "user", "content": "echo"}], "tools": [{"type": "mcp", "name": "echo.echo"}]});
    let text = reqwest::Client::new()
        .post(format!("{}/v1/agents/heroku", gateway.url))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains(r#"Tool 'echo.echo' returned result:"#), "{text}");
    assert!(text.contains("from the agent"), "{text}");
    assert_eq!(model.requests()[0]["tools"][0]["function"]["name"], "echo__echo");
}

/// Listing a server's tools can take longer than a response may wait to
/// start (a dyno's boot, on Heroku): past `REPLY_STREAM_AFTER` the agents
/// stream starts, and the run goes on in it once the tools are known, or
/// ends with the error there.
#[tokio::test]
async fn an_agent_whose_tools_are_slow_to_list_gets_its_stream_at_once() {
    let model = crate::model::Model::start(None, |n, _| match n {
        0 => crate::model::Turn::Calls(vec![("e1", "slow__echo", json!({"text": "after a slow start"}).to_string())]),
        _ => crate::model::Turn::Text("echoed"),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let procfile = format!("mcp-slow: sleep 1 && exec {ECHO}\nmcp-dies: sleep 3 && exit 7\n");
    std::fs::write(dir.path().join("Procfile"), procfile).unwrap();
    // Unsandboxed: the echo server is started by a shell line, not as the
    // command's program, so a sandbox would not mount it back where the
    // build lives (under /tmp, in a fresh clone).
    let gateway = Gateway::with(
        Options::default()
            .cwd(dir.path())
            .env("SANDBOX", "off")
            .env("REPLY_STREAM_AFTER", "100ms")
            .env("INFERENCE_URL", &model.url)
            .env("INFERENCE_MODEL_ID", "m"),
    );
    let ask = |tool: &str| {
        let body = json!({"messages": [{"role": "user", "content": "echo"}], "tools": [{"type": "mcp", "name": tool}]});
        reqwest::Client::new().post(format!("{}/v1/agents/heroku", gateway.url)).json(&body).send()
    };

    let response = ask("slow.echo").await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = tokio::time::timeout(PATIENCE, response.text()).await.unwrap().unwrap();
    assert!(text.contains("after a slow start"), "{text}");
    assert!(text.ends_with("event: done\ndata: [DONE]\n\n"), "{text}");

    // Its server never starts: a quick failure would be a 400; this one
    // comes after the stream began, as an error event.
    let response = ask("dies.anything").await.unwrap();
    assert_eq!(response.status(), 200, "the stream started before the failure was known");
    let text = tokio::time::timeout(PATIENCE, response.text()).await.unwrap().unwrap();
    let error = text.split("\n\n").find(|block| block.starts_with("event: error")).unwrap_or_else(|| panic!("{text}"));
    let data: Value = serde_json::from_str(error.split_once("data: ").unwrap().1).unwrap();
    assert_eq!(data["code"], 400, "{data}");
    assert!(data["message"].as_str().unwrap().contains("dies"), "{data}");
    assert!(text.ends_with("event: done\ndata: [DONE]\n\n"), "{text}");
    assert_eq!(model.requests().len(), 2, "the model was asked only in the run whose tools were known");
}
