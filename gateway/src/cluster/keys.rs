//! What the instances keep in Redis, under which keys, for how long. Every
//! key name is written here and nowhere else.
//!
//! - `dg:instance:{iid}`: a live instance (string `1`, expires after
//!   [`INSTANCE_TTL`] unless its heartbeat renews it).
//! - `dg:instances`: a sorted set of the instances that take sessions over,
//!   scored by when each lapses (a stopping instance leaves it at once).
//! - `dg:session:{sid}`: a hash for each session: `owner` (instance id; empty
//!   while the session is handed from one instance to another), `state`,
//!   `runner`, `server`, `created` and `last` (Unix ms), and `snapshot` (what
//!   another instance needs to take it over, see
//!   [`crate::session::Snapshot`]). Expires [`SESSION_TTL`] after its owner
//!   last renewed it.
//! - `dg:journal:{sid}`: a hash for each session, what another instance
//!   needs to carry it on if its owner dies (see [`super::journal`]);
//!   expires with the session.
//! - `dg:live`: a sorted set of live session ids scored by when each lapses
//!   (Redis time, ms): its size is the count `MAX_SESSIONS` bounds.
//! - `dg:inbox:{iid}`: the pub/sub channel an instance listens on for
//!   relayed requests, their answers and tunnelled runner frames.
//! - `dg:lease:sweeper`: who runs the orphan sweeper now.

use std::time::Duration;

/// How often an instance renews its own key.
pub const BEAT: Duration = Duration::from_secs(1);
/// An instance not heard of for this long is gone: its sessions may be
/// taken over. Short, since a dead instance's runners wait meanwhile; long
/// enough that a pause of a few seconds is not taken for death.
pub const INSTANCE_TTL: Duration = Duration::from_secs(5);
/// How often an instance renews its sessions.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A session whose owner stopped renewing it lapses after this long, and
/// leaves the `MAX_SESSIONS` count.
pub const SESSION_TTL: Duration = Duration::from_secs(30);

pub const LIVE: &str = "dg:live";
pub const INSTANCES: &str = "dg:instances";
pub const SWEEPER_LEASE: &str = "dg:lease:sweeper";

pub fn instance(iid: &str) -> String {
    format!("dg:instance:{iid}")
}

pub fn session(sid: &str) -> String {
    format!("dg:session:{sid}")
}

pub fn journal(sid: &str) -> String {
    format!("dg:journal:{sid}")
}

pub fn inbox(iid: &str) -> String {
    format!("dg:inbox:{iid}")
}
