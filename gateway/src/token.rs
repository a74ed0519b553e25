//! Minting and checking runner tokens.
//!
//! One token per session, signed with HS256, naming the session and expiring
//! shortly after the dial-back deadline. The session remembers the token's
//! unique id, so only the token issued for the current runner is accepted.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dynogate_shared::Secret;
use dynogate_shared::token::{AUDIENCE, RunnerClaims};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

/// Why a token was refused. Logged, never sent in detail to the dialer.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token rejected: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
}

/// Signs and verifies runner tokens with one key.
#[derive(Clone)]
pub struct RunnerTokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

impl std::fmt::Debug for RunnerTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerTokens").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

/// A freshly minted token and its unique id.
#[derive(Debug)]
pub struct Minted {
    pub token: Secret,
    pub jti: String,
}

impl RunnerTokens {
    pub fn new(secret: &Secret, ttl: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "aud"]);
        // Both ends of the check are this process's clock (or a fleet sharing
        // one secret); a small leeway is enough.
        validation.leeway = 5;
        Self {
            encoding: EncodingKey::from_secret(secret.expose().as_bytes()),
            decoding: DecodingKey::from_secret(secret.expose().as_bytes()),
            validation,
            ttl,
        }
    }

    /// How long a token stays valid.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A token for `session`, valid for the configured lifetime.
    pub fn mint(&self, session: &str) -> Minted {
        let now = unix_now();
        let jti = crate::sessions::random_id();
        let claims = RunnerClaims {
            aud: AUDIENCE.to_owned(),
            sid: session.to_owned(),
            iat: now,
            exp: now + self.ttl.as_secs().max(1),
            jti: jti.clone(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing of plain claims cannot fail");
        Minted { token: Secret::new(token), jti }
    }

    /// Checks signature, audience and expiry, and returns the claims.
    pub fn verify(&self, token: &str) -> Result<RunnerClaims, TokenError> {
        Ok(jsonwebtoken::decode::<RunnerClaims>(token, &self.decoding, &self.validation)?.claims)
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> RunnerTokens {
        RunnerTokens::new(&Secret::new("x".repeat(32)), Duration::from_secs(60))
    }

    #[test]
    fn a_minted_token_verifies_with_its_claims() {
        let tokens = tokens();
        let minted = tokens.mint("s1");
        let claims = tokens.verify(minted.token.expose()).unwrap();
        assert_eq!(claims.sid, "s1");
        assert_eq!(claims.jti, minted.jti);
        assert_eq!(claims.aud, AUDIENCE);
    }

    #[test]
    fn tokens_from_another_key_or_tampered_are_refused() {
        let other = RunnerTokens::new(&Secret::new("y".repeat(32)), Duration::from_secs(60));
        assert!(tokens().verify(other.mint("s1").token.expose()).is_err());
        let mut token = tokens().mint("s1").token.expose().to_owned();
        token.push('x');
        assert!(tokens().verify(&token).is_err());
        assert!(tokens().verify("not a token").is_err());
    }

    #[test]
    fn expired_tokens_are_refused() {
        let tokens = tokens();
        let claims =
            RunnerClaims { aud: AUDIENCE.into(), sid: "s1".into(), iat: 0, exp: unix_now() - 60, jti: "j".into() };
        let key = EncodingKey::from_secret("x".repeat(32).as_bytes());
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
        assert!(tokens.verify(&token).is_err());
    }

    #[test]
    fn tokens_for_another_audience_are_refused() {
        #[derive(serde::Serialize)]
        struct Other {
            aud: &'static str,
            sid: &'static str,
            iat: u64,
            exp: u64,
            jti: &'static str,
        }
        let claims = Other { aud: "something-else", sid: "s1", iat: 0, exp: unix_now() + 60, jti: "j" };
        let key = EncodingKey::from_secret("x".repeat(32).as_bytes());
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
        assert!(tokens().verify(&token).is_err());
    }
}
