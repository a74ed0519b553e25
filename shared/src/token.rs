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

impl RunnerClaims {
    /// The claims of a token as its holder reads them, without checking the
    /// signature (only the gateway can): how a runner learns how long its
    /// token is good for. `None` for anything that is not such a token.
    pub fn read_unverified(token: &str) -> Option<RunnerClaims> {
        use base64::Engine;
        let payload = token.split('.').nth(1)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;

    use super::*;

    #[test]
    fn a_holder_reads_the_claims_of_its_token_and_nothing_else() {
        let claims = RunnerClaims { aud: AUDIENCE.into(), sid: "s1".into(), iat: 10, exp: 130, jti: "j".into() };
        let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let token = format!(
            "{}.{}.{}",
            encode(br#"{"alg":"HS256","typ":"JWT"}"#),
            encode(&serde_json::to_vec(&claims).unwrap()),
            encode(b"signature")
        );
        assert_eq!(RunnerClaims::read_unverified(&token), Some(claims));
        for bad in ["", "one-part", "a.!!!.c", &format!("a.{}.c", encode(b"not json"))] {
            assert_eq!(RunnerClaims::read_unverified(bad), None, "{bad:?}");
        }
    }
}
