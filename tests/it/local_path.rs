use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn an_rmcp_client_runs_python_in_its_own_session_and_deleting_it_cleans_up() {
    let gateway = Gateway::start();
    let client = gateway.client().await;

    let tools = client.list_all_tools().await.unwrap();
    let python = tools.iter().find(|t| t.name == "code_exec_python").expect("code_exec_python is listed");
    assert_eq!(python.input_schema["required"], json!(["code"]));

    let result = client.call_tool(tool_call("code_exec_python", json!({"code": "print(2+2)"}))).await.unwrap();
    assert_eq!(result.is_error, Some(false));
    assert_eq!(exec_result_of(&result), json!({"returncode": 0, "stdout": "4", "stderr": ""}));
    assert_eq!(result.structured_content.as_ref().unwrap()["result"]["stdout"], "4");

    let failing = client
        .call_tool(tool_call("code_exec_python", json!({"code": "import sys; print(1); sys.exit(3)"})))
        .await
        .unwrap();
    assert_eq!(failing.is_error, Some(false), "a non-zero exit is a result, not a tool error");
    assert_eq!(exec_result_of(&failing)["returncode"], 3);

    let with_package = client
        .call_tool(tool_call(
            "code_exec_python",
            json!({"code": "import six; print(six.moves.range(3)[2])", "packages": ["six"]}),
        ))
        .await
        .unwrap();
    let output = exec_result_of(&with_package);
    assert_eq!(output["returncode"], 0, "{output}");
    assert_eq!(output["stdout"], "2");

    let session = only_session(&gateway);
    let runner = runner_pids(&session)[0];
    let http = gateway.http();
    assert_eq!(http.delete(&session).await, reqwest::StatusCode::NO_CONTENT);
    assert!(gone(runner), "DELETE answers once the runner is gone");
    let after = http.post(Some(&session), &json!({"jsonrpc": "2.0", "id": 9, "method": "tools/list"})).await;
    assert_eq!(after.status, reqwest::StatusCode::NOT_FOUND);
    drop(client);
}

#[tokio::test]
async fn unknown_tools_and_bad_arguments_are_tool_errors_the_model_can_read() {
    let gateway = Gateway::start();
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let unknown = http.call(&session, 1, "nope", json!({})).await;
    assert_eq!(unknown.json["result"]["isError"], true);
    assert_eq!(unknown.json["result"]["content"][0]["text"], "Unknown tool: nope");
    let missing_code = http.call(&session, 2, "code_exec_python", json!({"packages": []})).await;
    assert_eq!(missing_code.json["result"]["isError"], true);
    assert!(missing_code.json["result"]["content"][0]["text"].as_str().unwrap().contains("code"));
}

#[tokio::test]
async fn executed_code_sees_no_secret() {
    let gateway = Gateway::with(Options::default().api_key("the-client-key").env("HEROKU_API_KEY", "heroku-secret"));
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let reply = http
        .call(
            &session,
            1,
            "code_exec_python",
            json!({"code": "import os\nfor k, v in sorted(os.environ.items()): print(k, v)"}),
        )
        .await;
    let output = exec_result(&reply.json);
    let printed = output["stdout"].as_str().unwrap();
    assert!(printed.contains("PATH"), "{printed}");
    for secret in ["the-client-key", "heroku-secret", SECRET, "RUNNER_TOKEN", "API_KEY", "RENDEZVOUS_SECRET"] {
        assert!(!printed.contains(secret), "{secret} visible to executed code:\n{printed}");
    }
}
