//! `dynogate`: a command-line client for dynogate (and any MCP server), in
//! the manner of the example clients of Heroku's `mcp-code-exec-*` templates.
//!
//! - `dynogate mcp list_tools | jq` and `dynogate mcp call_tool --name
//!   code_exec_python --args '{"code": "print(2+2)"}'` over streamable HTTP,
//!   the older HTTP+SSE transport, or a local stdio server;
//! - `dynogate agents PROMPT` against `/v1/agents/heroku`.
//!
//! Modules:
//! - [`args`]: flags and environment, validated into typed requests;
//! - [`mcp`]: the two MCP commands; [`connect`]: sessions on each transport
//!   and their errors in words; [`handler`]: our side of the session
//!   (progress); [`legacy_sse`]: the older transport's client;
//! - [`agents`]: the agents command;
//! - [`sse`]: server-sent events framing; [`http`]: shared HTTP pieces;
//! - [`output`]: everything printed; [`deadline`]: `--timeout` and Ctrl-C.
//!
//! Exit codes: 0 done, 1 failed (or the tool or agent reported an error),
//! 2 bad command line, 130 interrupted.

mod agents;
mod args;
mod connect;
mod deadline;
mod handler;
mod http;
mod legacy_sse;
mod mcp;
mod output;
mod sse;

use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command};
use deadline::Interrupted;

/// The exit code clap uses for a bad command line, kept for our own checks
/// of it (bad `--args` JSON, a missing URL).
const USAGE: u8 = 2;
const INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // reqwest (ours and rmcp's) is built without a default TLS provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let validated = match cli.command {
        Command::Mcp(args) => args.validate().map(Request::Mcp),
        Command::Agents(args) => args.validate().map(Request::Agents),
    };
    let request = match validated {
        Ok(request) => request,
        Err(e) => return fail(&e, USAGE),
    };
    // One thread: the client waits on the network almost all the time.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return fail(&anyhow::Error::new(e).context("cannot start the async runtime"), 1),
    };
    let outcome = runtime.block_on(async move {
        match request {
            Request::Mcp(request) => mcp::run(request).await,
            Request::Agents(request) => agents::run(request).await,
        }
    });
    match outcome {
        Ok(code) => code,
        Err(e) if e.is::<Interrupted>() => fail(&e, INTERRUPTED),
        Err(e) => fail(&e, 1),
    }
}

enum Request {
    Mcp(args::McpRequest),
    Agents(args::AgentsRequest),
}

/// One line on stderr: the error and its causes, joined by `: `.
fn fail(error: &anyhow::Error, code: u8) -> ExitCode {
    eprintln!("dynogate: {error:#}");
    ExitCode::from(code)
}
