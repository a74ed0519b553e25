//! Every wait of a command in one place: it ends at the command's deadline
//! (`--timeout`) or at Ctrl-C, whichever comes first, with an error saying
//! which. Callers still run their clean-up (closing the session) afterwards,
//! under [`CLEANUP`], since the wait they were in has been dropped.

use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::Instant;

/// How long closing a session may take once the work is over: an HTTP
/// `DELETE`, or a stdio server given EOF, then SIGTERM, then SIGKILL (rmcp
/// waits 3 s before each).
pub const CLEANUP: Duration = Duration::from_secs(10);

/// Ctrl-C, so `main` can exit with the shell's usual 130.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

pub struct Deadline {
    at: Instant,
    timeout: Duration,
    /// Listening from the start, before any server is dialled or spawned,
    /// so a Ctrl-C at any point after is ours to handle (and a stdio server
    /// is still closed), never the default kill.
    interrupt: Signal,
}

impl Deadline {
    pub fn after(timeout: Duration) -> anyhow::Result<Self> {
        let interrupt = signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?;
        Ok(Deadline { at: Instant::now() + timeout, timeout, interrupt })
    }

    /// Runs `work` until it ends, the deadline passes, or Ctrl-C.
    pub async fn bound<T>(&mut self, what: &str, work: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
        tokio::select! {
            result = tokio::time::timeout_at(self.at, work) => result.unwrap_or_else(|_| {
                Err(anyhow::anyhow!("{what}: no answer within {}s (raise --timeout)", self.timeout.as_secs_f64()))
            }),
            _ = self.interrupt.recv() => Err(Interrupted.into()),
        }
    }
}
