//! End-to-end tests: a real gateway process, real runners dialing back over a
//! real WebSocket, real executors running real Python, Node.js, Ruby and Go,
//! and real MCP clients.
//! Every test starts its own gateway on a free loopback port.

/// A headless Chromium driven over the DevTools protocol.
mod browser;
/// A scripted OpenAI-compatible model server.
mod model;
/// An OTLP/HTTP trace receiver.
mod otlp;
/// A real redis-server on a free loopback port.
mod redis_server;
/// `runner exec` on plain stdio, driven with raw JSON-RPC lines.
mod stdio;
/// Shared machinery: gateway processes, HTTP helpers, process inspection.
mod support;

/// The agents endpoint, driven by a scripted model.
mod agents;
/// API keys.
mod auth;
/// The benchmark program with tiny counts (correctness, not timing).
mod bench_smoke;
/// No code outlives its session: detached processes are killed however the server ends.
mod cleanup;
/// The `dynogate` CLI against a running gateway, a stdio server and a stand-in agents endpoint.
mod cli;
/// The Heroku Button's files: app.json and what each buildpack detects.
mod deploy;
/// Every refused request: status code and JSON-RPC error.
mod errors;
/// The code executor's four languages, packages, limits, cancellation and progress.
mod executor;
/// A fake Platform API that runs dynos as local processes.
mod fake_heroku;
/// The Heroku spawner end to end, against the fake.
mod heroku;
/// Hostile clients and misbehaving servers: malformed input, floods, logs.
mod hostile;
/// Sessions are separate machines: processes and files.
mod isolation;
/// How sessions end: runner killed, server exits, idle, caps, shutdown.
mod lifecycle;
/// The main path with the rmcp client: tools, code, packages, delete.
mod local_path;
/// Memory under clients that do not read: slow answers, an unread `/sse` stream.
mod memory;
/// Metrics, readiness and the audit trail.
mod operability;
/// Warm runners: claimed once each, refilled, capped, replaced, recycled.
mod pool;
/// The executor's waiting shim: it takes each command, in its cgroup.
mod primed_shim;
/// The registered MCP servers: `/v1/mcp/servers` and `/mcp/{name}`.
mod registry;
/// Runner tokens and the rendezvous handshake.
mod rendezvous;
/// Faults: cut sockets, dropped streams, floods, SIGTERM under load.
mod resilience;
/// Where server messages go: request streams, the GET stream, batches.
mod routing;
/// The local sandbox tried as an attacker: secrets, other sessions, signals.
mod sandbox;
/// Several instances sharing a real Redis behind a router that spreads connections.
mod scale_out;
/// A session's limits on all of its processes, as root and as an unprivileged user.
mod session_limits;
/// One request on a runner of its own, through the in-process API.
mod single_request;
/// Slow and greedy clients: header and body deadlines, connection caps.
mod slow_clients;
/// The status page, in a real browser.
mod status_page;
/// Traces exported over OTLP, across the rendezvous.
mod traces;
/// The older SSE transport, server requests, origins, the Python SDK.
mod transports;
