//! Logs and traces for both binaries, and the trace context they hand each
//! other.
//!
//! [`init`] installs the subscriber: logs to stderr, and with
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! set, an OTLP/HTTP exporter and a `tracing` layer that exports the spans
//! of dynogate's own crates. Without it nothing is built,
//! [`enabled`] is false, and callers skip every cost that only traces need:
//! no context is written into messages and no extra span is made.
//!
//! The context crosses processes in W3C `traceparent` form:
//! - a runner gets its session's context in `TRACEPARENT` (OpenTelemetry's
//!   name for an environment carrier), so its start-up joins the session's trace;
//! - it sends its own on the rendezvous dial, as a `traceparent` header;
//! - each client request carries its span's context to the runner in
//!   `params._meta.traceparent` (MCP's place for it), so the runner's side of
//!   the call joins the request's trace, as does any server that reads it.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, bail};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::Value;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::registry::LookupSpan;

/// The environment variable a runner finds its session's context in.
pub const TRACEPARENT_ENV: &str = "TRACEPARENT";
/// The header of the rendezvous dial and client requests, and the `_meta`
/// key of a JSON-RPC request, that carry a context.
pub const TRACEPARENT: &str = "traceparent";

static ENABLED: AtomicBool = AtomicBool::new(false);
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether spans are exported (a layer was built and installed).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn configured() -> bool {
    ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|name| std::env::var(name).is_ok_and(|v| !v.trim().is_empty()))
}

/// The exporting layer for `service`, or `None` when no endpoint is set.
/// Only OTLP over HTTP with protobuf is built in; asking for another
/// protocol is an error rather than silence.
fn layer<S>(service: &str) -> anyhow::Result<Option<impl Layer<S> + Send + Sync + 'static>>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    if !configured() {
        return Ok(None);
    }
    for name in ["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] {
        if let Ok(protocol) = std::env::var(name)
            && !protocol.trim().is_empty()
            && protocol.trim() != "http/protobuf"
        {
            bail!("{name}={protocol} is not supported: traces are exported over http/protobuf (usually port 4318)");
        }
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .context("cannot build the OTLP exporter (see OTEL_EXPORTER_OTLP_ENDPOINT)")?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    // OTEL_SERVICE_NAME, when set, names the service instead.
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service.to_owned());
    }
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build();
    let tracer = provider.tracer("dynogate");
    let _ = PROVIDER.set(provider);
    ENABLED.store(true, Ordering::Relaxed);
    // Spans and events of our own crates only: libraries' internals (and
    // the audit trail, which belongs in the logs) stay out.
    let ours = Targets::new()
        .with_target("dynogate_gateway", LevelFilter::INFO)
        .with_target("dynogate_runner", LevelFilter::INFO)
        .with_target("dynogate_telemetry", LevelFilter::INFO);
    Ok(Some(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(ours)))
}

/// Installs the process's `tracing` subscriber: logs to stderr, filtered by
/// `RUST_LOG` (else `default_filter`) with the caps both binaries need, and
/// the exporting layer when an endpoint is set. Install the TLS provider
/// first: the exporter's HTTP client is built here.
pub fn init(service: &str, default_filter: &str, with_target: bool) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // Only a filter that reaches `trace` needs the caps: added to a quieter
    // one, they would raise the WebSocket library to `debug`.
    let most = filter.max_level_hint();
    if most.is_none_or(|level| level == LevelFilter::TRACE) {
        for cap in dynogate_shared::names::LOG_CAPS {
            filter = filter.add_directive(cap.parse().expect("log caps are valid directives"));
        }
    }
    if most.is_none_or(|level| level >= LevelFilter::DEBUG) {
        for cap in dynogate_shared::names::PAYLOAD_LOG_CAPS {
            filter = filter.add_directive(cap.parse().expect("log caps are valid directives"));
        }
    }
    let traces = layer(service)?;
    let Some(traces) = traces else {
        // The filter stays global: disabled log lines then cost nothing at
        // their call sites, which a per-layer filter (or an empty layer
        // beside it) would turn into a check per line on the relay's path.
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(with_target)
            .init();
        return Ok(());
    };
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(with_target)
        .with_filter(filter);
    tracing_subscriber::registry().with(logs).with(traces).init();
    tracing::info!("traces are exported over OTLP");
    Ok(())
}

/// The settings a runner on another machine (a dyno) needs to export its
/// spans to the same place: the endpoints and protocol, when traces are
/// exported. Never `OTEL_EXPORTER_OTLP_HEADERS`: it may hold an ingest key,
/// and code on the dyno could read it.
pub fn runner_env() -> Vec<(String, String)> {
    if !enabled() {
        return Vec::new();
    }
    ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL"]
        .iter()
        .filter_map(|name| Some(((*name).to_owned(), std::env::var(name).ok()?)))
        .collect()
}

/// Exports what is still buffered; call before the process exits. Waits
/// a few seconds at most: on Heroku the drain has used most of the 30 s
/// between SIGTERM and SIGKILL, and an unreachable collector must not hold
/// the exit.
pub fn flush() {
    if let Some(provider) = PROVIDER.get()
        && let Err(e) = provider.shutdown_with_timeout(std::time::Duration::from_secs(3))
    {
        eprintln!("could not export the last traces: {e}");
    }
}

/// `span`'s context as a `traceparent` value; `None` when nothing is exported.
pub fn traceparent(span: &Span) -> Option<String> {
    if !enabled() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Makes `span` a child of the context in `traceparent` (when it is a valid
/// one; otherwise the span starts a trace of its own).
pub fn set_parent(span: &Span, traceparent: &str) {
    if !enabled() {
        return;
    }
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(parent);
}

/// The context a JSON-RPC message carries in `params._meta.traceparent`.
pub fn meta_traceparent(message: &Value) -> Option<&str> {
    message.get("params")?.get("_meta")?.get(TRACEPARENT)?.as_str()
}

/// `request` with `params._meta.traceparent` set to `traceparent`, or
/// `None` when it is not a JSON-RPC object with object (or no) params.
/// Only `_meta` is rewritten: every other value (a tool's arguments, with
/// numbers of any size) is carried over as the client wrote it.
pub fn with_meta_traceparent(request: &[u8], traceparent: &str) -> Option<Vec<u8>> {
    use serde_json::value::RawValue;
    type RawObject = serde_json::Map<String, Value>;
    let mut message: std::collections::BTreeMap<String, Box<RawValue>> = serde_json::from_slice(request).ok()?;
    let mut params: std::collections::BTreeMap<String, Box<RawValue>> = match message.get("params") {
        Some(raw) => serde_json::from_str(raw.get()).ok()?,
        None => Default::default(),
    };
    let mut meta: RawObject = match params.get("_meta") {
        Some(raw) => serde_json::from_str(raw.get()).ok()?,
        None => RawObject::new(),
    };
    meta.insert(TRACEPARENT.to_owned(), Value::String(traceparent.to_owned()));
    params.insert("_meta".to_owned(), serde_json::value::to_raw_value(&meta).ok()?);
    message.insert("params".to_owned(), serde_json::value::to_raw_value(&params).ok()?);
    serde_json::to_vec(&message).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn a_request_carries_its_context_in_meta_and_keeps_the_rest() {
        let request =
            br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"x","_meta":{"progressToken":3}}}"#;
        let carried: Value = serde_json::from_slice(&with_meta_traceparent(request, PARENT).unwrap()).unwrap();
        assert_eq!(meta_traceparent(&carried), Some(PARENT));
        assert_eq!(carried["params"]["_meta"]["progressToken"], 3);
        assert_eq!(carried["params"]["name"], "x");
        assert_eq!(carried["id"], 7);

        let huge = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"arguments":{"n":123456789012345678901234567890,"f":1.10}}}"#;
        let carried = String::from_utf8(with_meta_traceparent(huge, PARENT).unwrap()).unwrap();
        assert!(carried.contains(r#"{"n":123456789012345678901234567890,"f":1.10}"#), "{carried}");

        let bare: Value = serde_json::from_slice(
            &with_meta_traceparent(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#, PARENT).unwrap(),
        )
        .unwrap();
        assert_eq!(bare["params"], json!({"_meta": {"traceparent": PARENT}}));
        assert_eq!(with_meta_traceparent(br#"{"jsonrpc":"2.0","id":1,"method":"m","params":[1]}"#, PARENT), None);
        assert_eq!(with_meta_traceparent(b"not json", PARENT), None);
    }

    #[test]
    fn without_an_endpoint_nothing_is_exported_or_injected() {
        assert!(!enabled());
        assert_eq!(traceparent(&Span::current()), None);
    }
}
