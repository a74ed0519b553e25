//! Progress notifications while a call works.
//!
//! When a `tools/call` carries `_meta.progressToken`, the executor sends
//! `notifications/progress` every `EXEC_PROGRESS_INTERVAL` until the call
//! ends. Each one says what the call is doing (installing, compiling,
//! running) and how long it has taken, and progress counts the seconds
//! elapsed, which only grows, as the protocol requires. The point is the
//! traffic: it keeps Heroku's router (55 s without a byte ends a connection)
//! and clients that reset their request timeout on progress from giving up
//! on a long install or run.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use rmcp::model::{ProgressNotificationParam, ProgressToken};
use rmcp::{Peer, RoleServer};
use tokio::time::{Instant, MissedTickBehavior};

/// What a call is doing now, for its progress messages. A std mutex: held
/// to copy one pointer, never across an `.await`.
#[derive(Debug)]
pub struct Stage(Mutex<&'static str>);

impl Default for Stage {
    fn default() -> Self {
        Stage(Mutex::new("starting"))
    }
}

impl Stage {
    pub fn set(&self, what: &'static str) {
        *self.0.lock().expect("stage lock") = what;
    }

    pub fn get(&self) -> &'static str {
        *self.0.lock().expect("stage lock")
    }
}

/// Where a call's progress goes, if its request asked for progress.
pub struct Reporter {
    pub peer: Peer<RoleServer>,
    pub token: Option<ProgressToken>,
    pub interval: Duration,
}

impl Reporter {
    /// Drives `work` to completion, sending progress every interval meanwhile.
    pub async fn report_while<F: Future>(self, work: F, stage: &Stage) -> F::Output {
        let Some(token) = self.token else {
            return work.await;
        };
        let started = Instant::now();
        let mut ticks = tokio::time::interval_at(started + self.interval, self.interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tokio::pin!(work);
        loop {
            tokio::select! {
                output = &mut work => return output,
                _ = ticks.tick() => {
                    let elapsed = started.elapsed();
                    let message = format!("{} ({}s)", stage.get(), elapsed.as_secs());
                    let progress = ProgressNotificationParam::new(token.clone(), elapsed.as_secs_f64()).with_message(message);
                    // A client that has gone away is noticed elsewhere; progress is best effort.
                    if let Err(e) = self.peer.notify_progress(progress).await {
                        tracing::debug!("cannot send progress: {e}");
                    }
                }
            }
        }
    }
}
