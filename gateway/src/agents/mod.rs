//! `POST /v1/agents/heroku`: an agent loop on the gateway, in the shape of
//! Heroku's Managed Inference and Agents endpoint, so an agent written for
//! Heroku's runs against this one with another base URL and key.
//!
//! The loop: the model (any OpenAI-compatible API, [`inference`]) is sent
//! the conversation and the request's tools as functions ([`tools`]); each
//! tool call it makes runs on a fresh runner of its own, and the results go
//! back to it, until it answers without tool calls or the tools' `max_calls`
//! are spent (then it gets one last turn without tools to conclude). The
//! answer is an SSE stream ([`events`]), with keepalive comments while tools
//! run. A client that goes away stops the loop, and every runner it started
//! is stopped with it.
//!
//! - [`request`]: the request body; [`tools`]: the request's tools;
//!   [`inference`]: the model API; [`events`]: the stream's events.

pub mod events;
pub mod inference;
pub mod request;
pub mod tools;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{Instrument, info, warn};

use crate::AppState;
use crate::sse_encode::Comment;
use events::Events;
use inference::{Upstream, UpstreamError};
use request::AgentRequest;
use tools::Toolbox;

/// Model turns a run may take beyond one per tool call allowed, for turns
/// whose calls could not run (unknown tools, arguments that are not JSON).
const SPARE_TURNS: u32 = 3;

/// Handles one agents request: checks it, sets up its tools, and answers
/// with the stream of the loop.
pub async fn post(State(state): State<AppState>, body: Bytes) -> Response {
    if state.draining.is_cancelled() {
        return refusal(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the gateway is shutting down");
    }
    let Some(upstream) = state.inference.clone() else {
        let message = "the agents endpoint needs a model: set INFERENCE_URL (and INFERENCE_KEY, INFERENCE_MODEL_ID)";
        return refusal(StatusCode::SERVICE_UNAVAILABLE, "server_error", message);
    };
    let request: AgentRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return refusal(StatusCode::BAD_REQUEST, "invalid_request_error", &format!("the request body: {e}"));
        }
    };
    let runner_app = state.config.heroku.as_ref().map(|h| h.runner_app.as_str());
    if let Err(message) = request.check(runner_app) {
        return refusal(StatusCode::BAD_REQUEST, "invalid_request_error", &message);
    }
    let Some(model) = request.model.clone().or_else(|| upstream.default_model().map(str::to_owned)) else {
        return refusal(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "model is required (or set INFERENCE_MODEL_ID on the gateway)",
        );
    };
    // Listing a server's tools may start a runner (a dyno's boot, on
    // Heroku). A quick answer keeps errors as HTTP 400; past the time
    // answers are streamed after, the stream starts (with keepalives) and a
    // failure arrives in it, before Heroku's router gives up on the request.
    let mut build = {
        let state = state.clone();
        let specs = request.tools.clone();
        async move { Toolbox::build(&state, &specs).await }.boxed()
    };
    let toolbox = match tokio::time::timeout(state.config.timeouts.reply_stream_after, &mut build).await {
        Ok(Ok(toolbox)) => Built::Ready(toolbox),
        Ok(Err(e)) => return refusal(StatusCode::BAD_REQUEST, "invalid_request_error", &e.0),
        Err(_) => Built::Pending(build),
    };
    let events = Events { id: format!("agent-{}", crate::sessions::random_id()), model };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let keepalive = state.config.timeouts.heartbeat;
    let span = tracing::info_span!("agent", id = %events.id);
    let task_state = state.clone();
    state.tracker.spawn(
        async move {
            let run = async {
                let toolbox = match toolbox {
                    Built::Ready(toolbox) => toolbox,
                    Built::Pending(build) => match build.await {
                        Ok(toolbox) => toolbox,
                        Err(e) => {
                            let _ = tx.send(events::error(400, "invalid_request_error", &e.0)).await;
                            return "tools_unavailable";
                        }
                    },
                };
                info!(tools = toolbox.len(), "agent run starting");
                run_loop(&task_state, &upstream, &toolbox, &request, &events, &tx).await
            };
            tokio::pin!(run);
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
            loop {
                tokio::select! {
                    outcome = &mut run => {
                        crate::metrics::agent_run_ended(outcome);
                        break;
                    }
                    // The client went away: dropping the loop stops its runners.
                    () = tx.closed() => {
                        info!("the client went away; the agent run stops");
                        crate::metrics::agent_run_ended("client_gone");
                        return;
                    }
                    () = task_state.shutdown.cancelled() => {
                        crate::metrics::agent_run_ended("shutdown");
                        let _ = tx.send(events::error(503, "server_error", "the gateway is shutting down")).await;
                        break;
                    }
                    _ = ticks.tick() => {
                        let _ = tx.send(Comment::Keepalive.bytes()).await;
                    }
                }
            }
            let _ = tx.send(events::done()).await;
        }
        .instrument(span),
    );
    let stream = tokio_stream_of(rx);
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// The tools of a run: set up already, or still being set up.
enum Built {
    Ready(Toolbox),
    Pending(futures_util::future::BoxFuture<'static, Result<Toolbox, tools::ToolError>>),
}

/// The loop proper; every event it makes goes to `tx`. Returns how the run
/// ended, as a metrics label: `completed` or `model_failed`.
async fn run_loop(
    state: &AppState,
    upstream: &Upstream,
    toolbox: &Toolbox,
    request: &AgentRequest,
    events: &Events,
    tx: &mpsc::Sender<Bytes>,
) -> &'static str {
    let mut messages = request.messages.clone();
    let mut calls_made = vec![0u32; toolbox.len()];
    let sampling = request.sampling();
    let definitions = toolbox.definitions();
    let most_turns = toolbox_turns(toolbox);
    let mut last_turn = false;
    for turn in 1.. {
        // The last turn offers no tools: the model can only conclude.
        let offered: &[Value] = if last_turn { &[] } else { &definitions };
        let body = inference::request_body(&events.model, &messages, offered, &sampling);
        let asked = std::time::Instant::now();
        let answered = upstream.complete(&body).await;
        crate::metrics::model_called(asked.elapsed(), answered.as_ref().err().map(UpstreamError::label));
        let answer = match answered {
            Ok(answer) => answer,
            Err(e) => {
                warn!(error = %e, "the model call failed");
                let (code, kind) = e.code_and_type();
                let _ = tx.send(events::error(code, kind, &e.to_string())).await;
                return "model_failed";
            }
        };
        let _ = tx.send(events.assistant(&answer)).await;
        let message = &answer["choices"][0]["message"];
        let calls = message["tool_calls"].as_array().cloned().unwrap_or_default();
        if calls.is_empty() || last_turn {
            return "completed";
        }
        messages.push(json!({"role": "assistant", "content": message["content"], "tool_calls": calls}));
        let outcome = run_calls(state, toolbox, &calls, &mut calls_made, events, tx).await;
        for (call, content) in calls.iter().zip(outcome.contents) {
            messages.push(json!({"role": "tool", "tool_call_id": call["id"], "content": content}));
        }
        if outcome.spent || turn >= most_turns {
            last_turn = true;
        }
    }
    unreachable!("the turns are counted without end")
}

/// What one turn's tool calls came to.
struct Outcome {
    /// The text each call gives the model, in the order of the calls.
    contents: Vec<String>,
    /// Whether a call was refused because its tool's `max_calls` were spent.
    spent: bool,
}

/// Runs a turn's tool calls at once, each on a runner of its own, sending
/// each result as it comes.
async fn run_calls(
    state: &AppState,
    toolbox: &Toolbox,
    calls: &[Value],
    calls_made: &mut [u32],
    events: &Events,
    tx: &mpsc::Sender<Bytes>,
) -> Outcome {
    let mut contents: Vec<Option<String>> = vec![None; calls.len()];
    let mut names = vec![String::new(); calls.len()];
    let mut spent = false;
    let mut running = FuturesUnordered::new();
    for (i, call) in calls.iter().enumerate() {
        let function = call["function"]["name"].as_str().unwrap_or_default();
        let Some((k, tool)) = toolbox.find(function) else {
            names[i] = function.to_owned();
            contents[i] = Some(format!("Tool '{function}' was not run: it is not one of this request's tools"));
            continue;
        };
        names[i] = tool.name.clone();
        if calls_made[k] >= tool.max_calls {
            spent = true;
            contents[i] = Some(format!(
                "Tool '{}' was not run: this request allows it {} call(s) (runtime_params.max_calls)",
                tool.name, tool.max_calls
            ));
            continue;
        }
        let text = call["function"]["arguments"].as_str().unwrap_or("{}");
        let text = if text.trim().is_empty() { "{}" } else { text };
        match serde_json::from_str::<Value>(text) {
            Ok(arguments) => {
                calls_made[k] += 1;
                crate::metrics::agent_tool_called(tool.kind());
                running.push(async move { (i, tool.run(state, arguments).await) });
            }
            Err(e) => {
                contents[i] = Some(format!("Tool '{}' was not run: its arguments are not valid JSON ({e})", tool.name));
            }
        }
    }
    // Refusals first, then each result as its runner answers.
    for (i, content) in contents.iter().enumerate() {
        if let Some(content) = content {
            let _ = tx.send(events.tool(call_id(&calls[i]), &names[i], content)).await;
        }
    }
    while let Some((i, content)) = running.next().await {
        let _ = tx.send(events.tool(call_id(&calls[i]), &names[i], &content)).await;
        contents[i] = Some(content);
    }
    Outcome { contents: contents.into_iter().map(Option::unwrap_or_default).collect(), spent }
}

fn call_id(call: &Value) -> &str {
    call["id"].as_str().unwrap_or_default()
}

/// Most model turns of a run: one per tool call allowed, and a few spare.
fn toolbox_turns(toolbox: &Toolbox) -> u32 {
    toolbox.max_calls_total().saturating_add(SPARE_TURNS)
}

/// A request refused before its stream starts, in the Inference API's error shape.
fn refusal(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"code": status.as_u16(), "message": message, "type": kind});
    (status, axum::Json(body)).into_response()
}

fn tokio_stream_of(
    mut rx: mpsc::Receiver<Bytes>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|item| item.map(Ok)))
}
