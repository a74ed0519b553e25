//! `dynogate mcp list_tools` and `dynogate mcp call_tool`: one session, one
//! request, the answer as JSON on stdout, the session closed either way.
//!
//! The exit code tells a script what happened: 0 for an answer, 1 for a
//! tool whose result says `isError` (the result is still printed: it says
//! why) and for every failure to get an answer.

use std::io::IsTerminal;
use std::process::ExitCode;

use rmcp::model::{CallToolRequestParams, CallToolResult, Tool};
use rmcp::service::ServiceError;

use crate::args::{Call, McpRequest};
use crate::connect::{Session, connect, explain_request};
use crate::deadline::{CLEANUP, Deadline};
use crate::handler::Handler;
use crate::output;

enum Answer {
    Tools(Vec<Tool>),
    Result(CallToolResult),
}

pub async fn run(request: McpRequest) -> anyhow::Result<ExitCode> {
    let McpRequest { target, timeout, call } = request;
    let mut deadline = Deadline::after(timeout)?;
    let server = target.describe();
    let handler = Handler::new(std::io::stderr().is_terminal());
    let mut session = deadline.bound(&format!("connecting to {server}"), connect(&target, handler)).await?;
    let method = match call {
        Call::ListTools => "tools/list",
        Call::CallTool { .. } => "tools/call",
    };
    let answer = deadline
        .bound(&format!("{method} on {server}"), async {
            perform(&session, call).await.map_err(|e| explain_request(&e, &target, method))
        })
        .await;
    // Closing ends the session on the server (a DELETE, the SSE stream, or
    // the child's stdin) instead of leaving it to idle out; it runs after a
    // timeout or Ctrl-C too.
    let _ = session.close_with_timeout(CLEANUP).await;
    // Printed from the typed values, not a `serde_json::Value`, so fields
    // keep the order the protocol lists them in (a tool's name first).
    match answer? {
        Answer::Tools(tools) => output::json(&tools)?,
        Answer::Result(result) => {
            output::json(&result)?;
            if result.is_error == Some(true) {
                eprintln!("dynogate: the tool reported an error (its result is above)");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn perform(session: &Session, call: Call) -> Result<Answer, ServiceError> {
    match call {
        // Every page, for a server that paginates its tools.
        Call::ListTools => Ok(Answer::Tools(session.peer().list_all_tools().await?)),
        Call::CallTool { name, arguments } => {
            let params = CallToolRequestParams::new(name).with_arguments(arguments);
            Ok(Answer::Result(session.call_tool(params).await?))
        }
    }
}
