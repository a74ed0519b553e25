//! The contract between the gateway and its runners, with no I/O.
//!
//! A runner dials the gateway's `/rendezvous` WebSocket with a per-session
//! token, then the two speak in frames:
//!
//! - [`frame`]: what travels on the socket — JSON-RPC messages verbatim in text
//!   frames, [`frame::Control`] messages in binary frames.
//! - [`token`]: the claims inside the runner's signed token.
//! - [`secret`]: a string wrapper whose `Debug` and `Display` never show it.
//! - [`cgroup`]: finding this process's cgroups, and a session's cgroup name.
//! - [`duration`]: durations as written in config vars.
//! - [`names`]: header, query and environment names both sides must agree on,
//!   and how a session id is shown in logs.
//! - [`procfile`]: reading a Procfile's process types.
//! - [`sandbox`]: `SANDBOX`, the confinement mode both sides read.
//! - [`timing`]: how long a code tool's install and run took, in its result.
//! - [`window`]: the replay window and acknowledgements, the same rules on
//!   both sides of the socket.
//!
//! Nothing here opens a socket or a file: both binaries (and tests) link it.

pub mod cgroup;
pub mod duration;
pub mod frame;
pub mod names;
pub mod procfile;
pub mod sandbox;
pub mod secret;
pub mod timing;
pub mod token;
pub mod window;

pub use frame::{Control, Frame};
pub use secret::Secret;

/// Version of the rendezvous protocol described in [`frame`].
///
/// Bumped whenever a frame changes shape; a mismatch is refused during the
/// handshake with a message naming both versions.
pub const PROTOCOL_VERSION: u32 = 2;
