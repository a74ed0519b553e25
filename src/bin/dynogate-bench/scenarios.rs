//! The scenarios: `sessions`, `calls`, `payload` and `idle`, each against a
//! gateway URL or (where it makes sense) the stdio floor.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use tokio::sync::Mutex;

use crate::client::Session;
use crate::floor::StdioServer;
use crate::stats::{Samples, report};
use crate::wire::{Endpoint, Method};

/// Where calls go.
#[derive(Debug, Clone)]
pub enum Target {
    Http { url: String, name: String },
    Floor { echo: String },
}

impl Target {
    pub fn name(&self) -> &str {
        match self {
            Target::Http { name, .. } => name,
            Target::Floor { .. } => "floor",
        }
    }
}

/// Connections to `url`, shared by every session of a run (as one HTTP
/// client's pool would be).
fn endpoint(url: &str) -> anyhow::Result<Arc<Endpoint>> {
    Ok(Arc::new(Endpoint::new(url)?))
}

/// Text of `size` bytes that survives JSON escaping unchanged.
pub fn payload(size: usize) -> String {
    (0..size).map(|i| (b'a' + (i % 26) as u8) as char).collect()
}

/// One caller: an HTTP session or a stdio server.
enum Caller {
    Http(Session),
    Stdio(Box<Mutex<StdioServer>>),
}

impl Caller {
    async fn echo(&self, id: u64, text: &str) -> anyhow::Result<()> {
        match self {
            Caller::Http(session) => session.echo(id, text).await,
            Caller::Stdio(server) => server.lock().await.echo(id, text).await,
        }
    }

    /// One echo, its latency recorded (or its failure counted and shown).
    async fn timed_echo(&self, id: u64, text: &str, samples: &mut Samples) {
        let begun = Instant::now();
        match self.echo(id, text).await {
            Ok(()) => samples.record(begun.elapsed()),
            Err(e) => {
                eprintln!("call {id}: {e:#}");
                samples.errors += 1;
            }
        }
    }
}

async fn callers(target: &Target, count: usize) -> anyhow::Result<Vec<Arc<Caller>>> {
    let mut out = Vec::with_capacity(count);
    match target {
        Target::Http { url, .. } => {
            let endpoint = endpoint(url)?;
            for _ in 0..count {
                out.push(Arc::new(Caller::Http(Session::open(&endpoint).await?)));
            }
        }
        Target::Floor { echo } => {
            for _ in 0..count {
                out.push(Arc::new(Caller::Stdio(Box::new(Mutex::new(StdioServer::start(echo).await?)))));
            }
        }
    }
    Ok(out)
}

/// `calls`: `total` echo calls of `size` bytes over `sessions` sessions,
/// `concurrency` in flight. On the floor each in-flight call gets its own
/// server (a stdio pipe carries one call at a time here).
/// With `via`, sessions start at the target but every call goes to `via`
/// (another instance, which relays it to the session's owner).
pub async fn calls(
    target: &Target,
    sessions: usize,
    concurrency: usize,
    total: u64,
    size: usize,
    via: Option<&str>,
) -> anyhow::Result<()> {
    let sessions = if matches!(target, Target::Floor { .. }) { concurrency } else { sessions.max(1) };
    let mut callers = callers(target, sessions).await?;
    if let Some(via) = via {
        let other = endpoint(via)?;
        let opened = std::mem::take(&mut callers);
        for caller in opened {
            let Caller::Http(session) = &*caller else { bail!("--via needs --url") };
            callers.push(Arc::new(Caller::Http(session.via(&other))));
        }
    }
    let text = Arc::new(payload(size));
    // Warm-up: connections, pages, caches.
    for (i, caller) in callers.iter().enumerate() {
        for j in 0..4 {
            caller.echo(1_000_000 + (i * 4 + j) as u64, &text).await.context("warm-up")?;
        }
    }
    let next = Arc::new(AtomicU64::new(1));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let (caller, text, next) = (callers[w % sessions].clone(), text.clone(), next.clone());
            tokio::spawn(async move {
                let mut samples = Samples::default();
                loop {
                    let id = next.fetch_add(1, Ordering::Relaxed);
                    if id > total {
                        return samples;
                    }
                    caller.timed_echo(id, &text, &mut samples).await;
                }
            })
        })
        .collect();
    let mut samples = gather(workers).await?;
    let mut summary = samples.summary(started.elapsed());
    summary["sessions"] = json!(sessions);
    summary["concurrency"] = json!(concurrency);
    summary["size"] = json!(size);
    report("calls", target.name(), summary);
    close(callers).await;
    if samples.errors > 0 {
        bail!("{} calls failed", samples.errors);
    }
    Ok(())
}

/// `payload`: `count` sequential echoes of one `size`-byte text.
pub async fn payload_echo(target: &Target, count: u64, size: usize) -> anyhow::Result<()> {
    let caller = callers(target, 1).await?.remove(0);
    let text = payload(size);
    caller.echo(1_000_000, &text).await.context("warm-up")?;
    let mut samples = Samples::default();
    let started = Instant::now();
    for id in 1..=count {
        caller.timed_echo(id, &text, &mut samples).await;
    }
    let mut summary = samples.summary(started.elapsed());
    summary["size"] = json!(size);
    report("payload", target.name(), summary);
    close(vec![caller]).await;
    if samples.errors > 0 {
        bail!("{} echoes failed", samples.errors);
    }
    Ok(())
}

/// `sessions`: time from `initialize` sent to the session ready (runner
/// spawned, dialed back, server started and initialized), `count` of them,
/// `concurrency` at a time; each is deleted after.
pub async fn sessions(url: &str, name: &str, count: u64, concurrency: usize) -> anyhow::Result<()> {
    let endpoint = endpoint(url)?;
    // Warm-up: the first spawn pays for cold page caches.
    Session::open(&endpoint).await?.close().await?;
    let next = Arc::new(AtomicU64::new(1));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (endpoint, next) = (endpoint.clone(), next.clone());
            tokio::spawn(async move {
                let mut samples = Samples::default();
                while next.fetch_add(1, Ordering::Relaxed) <= count {
                    let begun = Instant::now();
                    match Session::open(&endpoint).await {
                        Ok(session) => {
                            samples.record(begun.elapsed());
                            let _ = session.close().await;
                        }
                        Err(e) => {
                            eprintln!("session: {e:#}");
                            samples.errors += 1;
                        }
                    }
                }
                samples
            })
        })
        .collect();
    let mut samples = gather(workers).await?;
    let mut summary = samples.summary(started.elapsed());
    summary["concurrency"] = json!(concurrency);
    report("sessions", name, summary);
    if samples.errors > 0 {
        bail!("{} sessions failed", samples.errors);
    }
    Ok(())
}

/// `first-result`: for `count` sessions one after another: the time from
/// `initialize` sent to the first `code_exec_python` `print(1)` result, that
/// first call alone, and `later` calls of the same session, each followed by
/// the same code run bare (`python -c 'print(1)'` of the interpreter the
/// executor uses, asked of a session first) to read the executor's own cost
/// against. Every one of these waits
/// `gap` first, as a client's calls come after a model's turn: on an idle
/// machine the first work after a pause is slower (CPU idle states), and
/// back-to-back calls would flatter the later ones. A warm pool refills
/// during the pauses.
pub async fn first_result(url: &str, name: &str, count: u64, later: u64, gap: Duration) -> anyhow::Result<()> {
    let endpoint = endpoint(url)?;
    let (mut first_results, mut first_calls, mut later_calls, mut bare) =
        (Samples::default(), Samples::default(), Samples::default(), Samples::default());
    // Each later call is paired with a bare run right after it, so both meet
    // the machine in the same state: their difference is the executor's cost.
    let mut differences = Vec::new();
    // The same call split in two: the command's time as the executor timed
    // it, against the bare run; and the rest (the hops around the command).
    let (mut command_differences, mut hops) = (Vec::new(), Vec::new());
    // The interpreter the executor runs code with, asked of a session of its own.
    let probe = Session::open(&endpoint).await?;
    let (python, _) = probe.run_python(1, "import sys; print(sys.executable)").await?;
    probe.close().await?;
    let python = python.trim().to_owned();
    eprintln!("first-result {name:<12} bare runs use {python}");
    let started = Instant::now();
    for _ in 0..count {
        tokio::time::sleep(gap).await;
        let begun = Instant::now();
        let session = Session::open(&endpoint).await?;
        let call = Instant::now();
        session.python(1, "print(1)", "1").await?;
        first_results.record(begun.elapsed());
        first_calls.record(call.elapsed());
        for id in 0..later {
            tokio::time::sleep(gap).await;
            let call = Instant::now();
            let command = session.python(2 + id, "print(1)", "1").await?;
            let through = call.elapsed();
            later_calls.record(through);
            tokio::time::sleep(gap).await;
            let direct = bare_python(&python).await?;
            bare.record(direct);
            differences.push(through.as_secs_f64() * 1000.0 - direct.as_secs_f64() * 1000.0);
            if let Some(command) = command {
                command_differences.push(command * 1000.0 - direct.as_secs_f64() * 1000.0);
                hops.push(through.as_secs_f64() * 1000.0 - command * 1000.0);
            }
        }
        session.close().await?;
    }
    let elapsed = started.elapsed();
    let (paired, command_paired, hops) = (median(differences), median(command_differences), median(hops));
    let summary = json!({
        "count": count,
        "first_result": first_results.summary(elapsed),
        "first_call": first_calls.summary(elapsed),
        "later_call": later_calls.summary(elapsed),
        "bare_python": bare.summary(elapsed),
        "later_minus_bare_p50_ms": paired,
        "command_minus_bare_p50_ms": command_paired,
        "hops_p50_ms": hops,
    });
    let p50 = |key: &str| summary[key]["p50_us"].as_u64().unwrap_or(0) as f64 / 1000.0;
    eprintln!(
        "first-result {name:<12} p50: initialize→first result {:.1} ms, first call {:.1} ms, later calls {:.1} ms, \
         bare python {:.1} ms, later − bare (paired) {paired:+.1} ms: command − bare {command_paired:+.1} ms, \
         hops {hops:.1} ms",
        p50("first_result"),
        p50("first_call"),
        p50("later_call"),
        p50("bare_python")
    );
    // Nested figures: the JSON line only (the readable line above says them).
    let mut line = summary;
    line["scenario"] = json!("first-result");
    line["target"] = json!(name);
    println!("{line}");
    Ok(())
}

/// The median of `values` (0 for none).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// One `python -c 'print(1)'`, timed.
async fn bare_python(python: &str) -> anyhow::Result<Duration> {
    let begun = Instant::now();
    let out = tokio::process::Command::new(python).args(["-c", "print(1)"]).output().await?;
    if out.stdout != b"1\n" {
        bail!("bare python printed {:?}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(begun.elapsed())
}

/// `idle`: holds `count` sessions open and reports memory: the gateway's
/// growth per session, and each runner's RSS (its MCP server excluded).
pub async fn idle(url: &str, name: &str, count: usize, gateway_pid: Option<i32>, hold: Duration) -> anyhow::Result<()> {
    use crate::procs::{children, rss};
    let endpoint = endpoint(url)?;
    Session::open(&endpoint).await?.close().await?;
    let before = gateway_pid.and_then(rss);
    let opened = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let mut errors = 0u64;
    let mut samples = Samples::default();
    let started = Instant::now();
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for _ in 0..count {
        let endpoint = endpoint.clone();
        pending.push(async move {
            let begun = Instant::now();
            (Session::open(&endpoint).await, begun.elapsed())
        });
        // Open 32 at a time.
        if pending.len() >= 32 {
            collect_one(&mut pending, &opened, &mut samples, &mut errors).await;
        }
    }
    while !pending.is_empty() {
        collect_one(&mut pending, &opened, &mut samples, &mut errors).await;
    }
    let opened = std::mem::take(&mut *opened.lock().await);
    // Still there, and answering, after all were opened.
    let mut failures = 0;
    for (i, session) in opened.iter().enumerate() {
        if session.echo(2_000_000 + i as u64, "still here").await.is_err() {
            failures += 1;
        }
    }
    errors += failures;
    let after = gateway_pid.and_then(rss);
    let runners: Vec<u64> = gateway_pid.map(children).unwrap_or_default().into_iter().filter_map(rss).collect();
    let mut summary = samples.summary(started.elapsed());
    summary["errors"] = json!(errors);
    summary["sessions"] = json!(opened.len());
    if let (Some(before), Some(after)) = (before, after) {
        summary["gateway_rss_before"] = json!(before);
        summary["gateway_rss_after"] = json!(after);
        summary["gateway_bytes_per_session"] = json!(after.saturating_sub(before) / opened.len().max(1) as u64);
    }
    if !runners.is_empty() {
        summary["runners"] = json!(runners.len());
        summary["runner_rss_avg"] = json!(runners.iter().sum::<u64>() / runners.len() as u64);
        summary["runner_rss_max"] = json!(runners.iter().max());
    }
    report("idle", name, summary);
    tokio::time::sleep(hold).await;
    let closing: Vec<_> = opened.into_iter().map(|s| tokio::spawn(async move { s.close().await })).collect();
    for close in closing {
        let _ = close.await;
    }
    if errors > 0 {
        bail!("{errors} sessions failed");
    }
    Ok(())
}

async fn collect_one(
    pending: &mut futures_util::stream::FuturesUnordered<
        impl std::future::Future<Output = (anyhow::Result<Session>, Duration)>,
    >,
    opened: &Mutex<Vec<Session>>,
    samples: &mut Samples,
    errors: &mut u64,
) {
    use futures_util::StreamExt;
    if let Some((result, took)) = pending.next().await {
        match result {
            Ok(session) => {
                samples.record(took);
                opened.lock().await.push(session);
            }
            Err(e) => {
                eprintln!("session: {e:#}");
                *errors += 1;
            }
        }
    }
}

/// The samples of every worker, together.
async fn gather(workers: Vec<tokio::task::JoinHandle<Samples>>) -> anyhow::Result<Samples> {
    let mut samples = Samples::default();
    for worker in workers {
        samples.merge(worker.await?);
    }
    Ok(samples)
}

async fn close(callers: Vec<Arc<Caller>>) {
    for caller in callers {
        if let Caller::Http(session) = &*caller {
            let _ = session.close().await;
        }
    }
}

/// `http`: GETs of one URL, one at a time.
pub async fn http_round_trips(url: &str, count: u64) -> anyhow::Result<()> {
    let endpoint = endpoint(url)?;
    endpoint.send(Method::GET, None, &[]).await?;
    let mut samples = Samples::default();
    let started = Instant::now();
    for _ in 0..count {
        let begun = Instant::now();
        match endpoint.send(Method::GET, None, &[]).await {
            Ok(reply) if (200..300).contains(&reply.status) => samples.record(begun.elapsed()),
            _ => samples.errors += 1,
        }
    }
    report("http", "get", samples.summary(started.elapsed()));
    Ok(())
}
