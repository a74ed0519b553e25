//! `dynogate agents PROMPT`: one POST to `{base}/v1/agents/heroku` in the
//! shape of Heroku Managed Inference's agents API, and its answer, an SSE
//! stream of completions, printed as it arrives.
//!
//! Events: `message` (a `chat.completion` or `tool.completion` object),
//! `error` (`{"code", "message", "type"}`), and `done` (`[DONE]`), which
//! ends the answer; keepalive comments are dropped by [`crate::sse`].
//! Readable by default, or with `--json` each event's data as one line.

use std::process::ExitCode;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use reqwest::header::ACCEPT;
use serde_json::Value;

use crate::args::AgentsRequest;
use crate::deadline::Deadline;
use crate::http::{self, authorize, refusal, unreachable};
use crate::output::{self, Transcript};
use crate::sse;

pub async fn run(request: AgentsRequest) -> anyhow::Result<ExitCode> {
    let mut deadline = Deadline::after(request.timeout)?;
    deadline.bound(&format!("the agent at {}", request.endpoint), ask(&request)).await
}

async fn ask(request: &AgentsRequest) -> anyhow::Result<ExitCode> {
    let endpoint = &request.endpoint;
    let post = http::client()?.post(endpoint.clone()).header(ACCEPT, "text/event-stream").json(&request.body);
    let response =
        authorize(post, request.api_key.as_ref()).send().await.map_err(|e| unreachable(endpoint.as_str(), e))?;
    if !response.status().is_success() {
        return Err(refusal(endpoint.as_str(), response, request.api_key.is_some()).await);
    }
    let mut events = sse::events(response.bytes_stream());
    let mut transcript = Transcript::default();
    let mut failed = false;
    while let Some(event) = events.next().await {
        let event = event.with_context(|| format!("reading the answer from {endpoint}"))?;
        match event.name.as_str() {
            "done" => return Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }),
            "error" => {
                if request.json {
                    output::line(&output::one_line(&event.data))?;
                }
                eprintln!("dynogate: {}", output::agent_error(&event.data));
                failed = true;
            }
            _ => {
                let completion: Value = serde_json::from_str(&event.data)
                    .with_context(|| format!("{endpoint} sent an event that is not JSON: {}", event.data))?;
                if request.json {
                    output::line(&output::one_line(&event.data))?;
                } else {
                    for line in transcript.completion(&completion) {
                        output::line(&line)?;
                    }
                }
            }
        }
    }
    if failed {
        return Ok(ExitCode::FAILURE);
    }
    bail!("{endpoint} ended its answer without the done event: it was cut short")
}
