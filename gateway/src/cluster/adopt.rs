//! Finding a session among the instances, and taking it over when its owner
//! let it go (SIGTERM) or died.
//!
//! Whoever first needs a session the directory shows released or orphaned
//! (a client's request, its runner's dial, or a nudge from the instance
//! that let it go) takes it with a compare-and-set on its owner, rebuilds it
//! from its snapshot and journal, and adopts its running runner; the runner's next dial
//! reaches it, directly or carried by another instance. One adoption runs at
//! a time on an instance, so two requests for the same session never build
//! it twice.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::directory::Location;
use super::journal::Recovered;
use super::{Cluster, ClusterError};
use crate::AppState;
use crate::session::{Adopted, SessionHandle, Snapshot, Transport};
use crate::spawn::Launch;

/// How long a stopping instance waits for a session it let go to be taken
/// over before it gives up on a request for it.
const RELEASED_WAIT: Duration = Duration::from_secs(10);

/// Where a session is, for the request or dial at hand.
pub enum Whereabouts {
    /// Here (perhaps just taken over).
    Here(SessionHandle),
    /// At another live instance.
    At(String),
    /// Nowhere: it ended, or never was.
    Unknown,
}

/// Finds session `id`, taking it over when it is free to take and this
/// instance takes sessions (it is not stopping). A stopping instance waits,
/// bounded, for another to take a released session.
pub async fn find(state: &AppState, cluster: &Arc<Cluster>, id: &str) -> Result<Whereabouts, ClusterError> {
    let deadline = tokio::time::Instant::now() + RELEASED_WAIT;
    loop {
        if let Some(handle) = state.sessions.get_any(id)
            && !handle.is_handing_over()
        {
            return Ok(Whereabouts::Here(handle));
        }
        let expected = match cluster.locate(id).await? {
            Location::Unknown => return Ok(Whereabouts::Unknown),
            Location::Owned(owner) if owner == cluster.instance => {
                // Ours, yet not in the table: it has just ended, or is being
                // taken over here right now.
                let _adopting = cluster.adopting.lock().await;
                return Ok(state.sessions.get_any(id).map_or(Whereabouts::Unknown, Whereabouts::Here));
            }
            Location::Owned(owner) => return Ok(Whereabouts::At(owner)),
            Location::Released => String::new(),
            Location::Orphaned(owner) => owner,
        };
        if state.draining.is_cancelled() {
            if tokio::time::Instant::now() >= deadline {
                return Err(ClusterError::Unavailable("the session is between instances; retry shortly".into()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        if let Some(handle) = take(state, cluster, id, &expected).await? {
            return Ok(Whereabouts::Here(handle));
        }
        // Another instance took it first, or it ended: look again.
    }
}

/// Takes session `id` over from `expected` (empty: released) and starts it
/// here; `None` when another instance got it first.
async fn take(
    state: &AppState,
    cluster: &Arc<Cluster>,
    id: &str,
    expected: &str,
) -> Result<Option<SessionHandle>, ClusterError> {
    let _adopting = cluster.adopting.lock().await;
    if let Some(handle) = state.sessions.get_any(id) {
        return Ok(Some(handle));
    }
    let Some(snapshot) = cluster.take(id, expected).await? else { return Ok(None) };
    let snapshot = Snapshot::decode(&snapshot).unwrap_or_default();
    let journal = cluster.recover(id).await.unwrap_or_else(|e| {
        warn!(session = %dynogate_shared::names::log_id(id), "cannot read the session's journal; counting from its runner: {e}");
        None
    });
    match start(state, id, snapshot, journal) {
        Ok(handle) => {
            crate::metrics::taken_over(if expected.is_empty() { "handed_over" } else { "owner_died" });
            Ok(Some(handle))
        }
        Err(why) => {
            // No instance could do better: the session is over.
            warn!(session = %dynogate_shared::names::log_id(id), "cannot take the session over, so it ends: {why}");
            cluster.release(id).await?;
            Ok(None)
        }
    }
}

/// Rebuilds a session from its snapshot and journal, adopting its runner.
fn start(state: &AppState, id: &str, snapshot: Snapshot, journal: Option<Recovered>) -> Result<SessionHandle, String> {
    let runner = state
        .spawner
        .adopt(&snapshot.handle)
        .ok_or_else(|| format!("its runner ({:?}) is not one this instance can take over", snapshot.handle))?;
    let server = match &snapshot.server {
        Some(name) => state.registry.choice(name).map_err(|e| e.to_string())?,
        None => None,
    };
    let gateway_url = state.runner_url.clone().ok_or_else(|| crate::config::NO_PUBLIC_URL.to_owned())?;
    let reservation = state
        .sessions
        .reserve_for_adopted(id)
        .ok_or_else(|| format!("this instance already runs its maximum of {} sessions", state.sessions.max()))?;
    let transport =
        if snapshot.transport == Transport::LegacySse as u8 { Transport::LegacySse } else { Transport::Streamable };
    let blind = snapshot.counts.is_none() && journal.is_none();
    let calls = if snapshot.counts.is_none() { journal.as_ref().map_or(0, |j| j.calls.len()) } else { 0 };
    let launch = Launch { server, size: None };
    let adopted = Some(Adopted { runner, snapshot, journal });
    let handle =
        crate::mcp::run_session(state, id.to_owned(), transport, false, gateway_url, launch, reservation, adopted);
    info!(session = %dynogate_shared::names::log_id(id), blind, calls, "took the session over");
    Ok(handle)
}
