//! One MCP request on a runner of its own: a fresh, isolated runner (from
//! the warm pool when one is ready) serves it and is then discarded, with
//! everything it started. The agents API and `dyno_run_command`-style calls
//! build on this; nothing of it is exposed over MCP.
//!
//! Underneath it is an ordinary session that no client holds: the gateway
//! itself says `initialize` and `notifications/initialized`, sends the
//! request, passes each message that comes before the answer (progress,
//! logging) to the caller, and ends the session when the answer is in, when
//! the time limit passes, or when the caller stops waiting (the future is
//! dropped). A session ends by stopping its runner and killing what it
//! started, so nothing of one run reaches the next.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::AppState;
use crate::jsonrpc::{self, Kind, RequestId};
use crate::session::{Call, Command, EndReason, SessionHandle, Transport};
use crate::spawn::Launch;
use crate::streams::{Batch, Reader};

/// The revision the gateway speaks to the runner's server for a single request.
const PROTOCOL_VERSION: &str = "2025-06-18";
/// How long a finished run waits for its runner to be gone before returning.
const STOP_PATIENCE: Duration = Duration::from_secs(10);

/// Why a single-request run gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the request is not a JSON-RPC request: {0}")]
    NotARequest(String),
    #[error("no runner could be started: {0}")]
    Unavailable(String),
    #[error("the MCP server refused initialize: {0}")]
    Initialize(String),
    #[error("no answer within the time limit of {}s; the runner and everything it started were stopped", .0.as_secs_f64())]
    TimedOut(Duration),
    #[error("the runner ended before answering: {0}")]
    Ended(String),
}

/// Runs `request` (one JSON-RPC request, as bytes) on a runner of its own
/// (bridging the server `launch` names, the default one when it names none)
/// and returns the server's answer, calling `on_message` with each message
/// the server sent about it first. Takes at most `limit` (plus a bounded
/// wait for the runner to be gone).
pub async fn run(
    state: &AppState,
    launch: Launch,
    request: Bytes,
    limit: Duration,
    on_message: impl FnMut(&Bytes),
) -> Result<Bytes, RunError> {
    run_in_turn(state, launch, request, limit, on_message, |_| None).await
}

/// Like [`run`], for requests that follow from each other's answers (the
/// pages of a list) on the same runner: after each answer, `next` gives the
/// next request, or `None` to stop. Returns the last answer; `limit` is for
/// all of them together.
pub async fn run_in_turn(
    state: &AppState,
    launch: Launch,
    mut request: Bytes,
    limit: Duration,
    mut on_message: impl FnMut(&Bytes),
    mut next: impl FnMut(&Bytes) -> Option<Bytes>,
) -> Result<Bytes, RunError> {
    let (mut id, mut progress_token, mut method) = request_of(&request)?;
    let handle = crate::mcp::create_session(state, Transport::Streamable, launch)
        .await
        .map_err(|e| RunError::Unavailable(e.to_string()))?;
    handle.mark_single_request();
    // Whatever happens from here, the session ends with this run.
    let session = Ending(handle);
    let deadline = Instant::now() + limit;
    let answer = tokio::time::timeout_at(deadline, async {
        let init = RequestId::string("dynogate-single-request-initialize");
        let initialize = format!(
            r#"{{"jsonrpc":"2.0","id":{},"method":"initialize","params":{{"protocolVersion":"{PROTOCOL_VERSION}","capabilities":{{}},"clientInfo":{{"name":"dynogate","version":"{}"}}}}}}"#,
            init.as_json(),
            env!("CARGO_PKG_VERSION")
        );
        let reply = ask(state, &session.0, init, None, initialize.into(), "initialize", &mut |_| {}).await?;
        if let Some(error) = jsonrpc::error_object(&reply) {
            return Err(RunError::Initialize(error));
        }
        let initialized = Bytes::from_static(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        session
            .0
            .send(Command::Notify { payload: initialized, cancelled: None }, state.config.timeouts.request)
            .await
            .map_err(|e| RunError::Ended(e.to_string()))?;
        loop {
            let answer = ask(state, &session.0, id, progress_token, request, &method, &mut on_message).await?;
            let Some(following) = next(&answer) else { return Ok(answer) };
            (id, progress_token, method) = request_of(&following)?;
            request = following;
        }
    })
    .await
    .unwrap_or(Err(RunError::TimedOut(limit)));
    session.0.end(EndReason::Completed);
    let _ = tokio::time::timeout(STOP_PATIENCE, session.0.finished()).await;
    answer
}

/// The id, progress token and method of a request a run may send.
fn request_of(request: &Bytes) -> Result<(RequestId, Option<RequestId>, String), RunError> {
    match jsonrpc::peek_client(request) {
        Ok(Kind::Request { id, method, progress_token }) if method != "initialize" => Ok((id, progress_token, method)),
        Ok(_) => Err(RunError::NotARequest("a request other than initialize is needed".into())),
        Err(e) => Err(RunError::NotARequest(e.to_string())),
    }
}

/// Sends one request into the session and reads its stream to the answer.
async fn ask(
    state: &AppState,
    handle: &SessionHandle,
    id: RequestId,
    progress_token: Option<RequestId>,
    payload: Bytes,
    method: &str,
    on_message: &mut impl FnMut(&Bytes),
) -> Result<Bytes, RunError> {
    let stream = handle.streams().open(1);
    let call = Call::new(id, progress_token, payload, method, stream.clone());
    if let Err(e) = handle.send(Command::Call(call), state.config.timeouts.request).await {
        handle.streams().forget(stream.id());
        return Err(RunError::Ended(e.to_string()));
    }
    let mut reader = Reader::new(stream, None);
    loop {
        match reader.read(state.config.timeouts.heartbeat).await {
            Batch::Events(events) => {
                for event in events {
                    if event.last {
                        return Ok(event.json);
                    }
                    match jsonrpc::peek(&event.json) {
                        Ok(Kind::Request { id, method, .. }) => answer_server(state, handle, &id, &method).await,
                        _ => on_message(&event.json),
                    }
                }
            }
            Batch::Quiet => {}
            Batch::Ended | Batch::Replaced => {
                return Err(RunError::Ended("its stream closed without an answer".into()));
            }
        }
    }
}

/// Answers a request the server sent the gateway in the middle of a run:
/// `ping` as MCP says, anything else (sampling, elicitation, roots: the
/// gateway declared no such capability) with an error at once, so the
/// server is never left waiting for a client that is not there.
async fn answer_server(state: &AppState, handle: &SessionHandle, id: &RequestId, method: &str) {
    let payload = if method == "ping" {
        format!(r#"{{"jsonrpc":"2.0","id":{},"result":{{}}}}"#, id.as_json())
    } else {
        let message = format!(
            "{} is not available in a single-request run: the gateway answers for the client and offers no client \
             capabilities",
            crate::throttle::untrusted(method, 64)
        );
        jsonrpc::error_body(Some(id), jsonrpc::code::METHOD_NOT_FOUND, &message, None)
    };
    let notify = Command::Notify { payload: payload.into(), cancelled: None };
    if let Err(e) = handle.send(notify, state.config.timeouts.request).await {
        tracing::debug!("cannot answer the server's {method}: {e}");
    }
}

/// Ends the run's session however the run stops, a dropped future included.
struct Ending(SessionHandle);

impl Drop for Ending {
    fn drop(&mut self) {
        self.0.end(EndReason::Completed);
    }
}
