//! Claims carried by a runner's rendezvous token.
//!
//! The gateway signs one token per session (HS256) and hands it to the runner
//! it starts, through the environment and never on a command line. The token
//! proves to the `/rendezvous` endpoint that this socket belongs to that
//! session; it is useless for any other session or after it expires.

use serde::{Deserialize, Serialize};

/// The audience every runner token names, so a token minted for something
/// else with the same secret is refused.
pub const AUDIENCE: &str = "dynogate-rendezvous";

/// What a runner token asserts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerClaims {
    /// Always [`AUDIENCE`].
    pub aud: String,
    /// The session this runner serves.
    pub sid: String,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Unique token id, so the gateway accepts only the token it issued last
    /// for a session.
    pub jti: String,
}
