//! The checks in front of the MCP endpoints: API key and `Origin`.
//!
//! `Origin` is checked because MCP requires it against DNS rebinding: a web
//! page must not reach a gateway on the user's machine. Requests without the
//! header (every non-browser client) pass; loopback origins pass; others only
//! when listed in `ALLOWED_ORIGINS` (or `*` is). Refusals are 403 with a
//! JSON-RPC error body.
//!
//! Clients send the key as `Authorization: Bearer <key>` or `X-API-Key: <key>`
//! (as the Heroku MCP templates accept). The presented key is hashed and the
//! digests compared in constant time, so neither the content nor the length
//! of the real key leaks through timing.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dynogate_shared::Secret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::AppState;

/// The configured API key, kept only as a digest.
#[derive(Clone)]
pub struct ApiKey {
    digest: [u8; 32],
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(MASKED)")
    }
}

impl ApiKey {
    pub fn new(key: &Secret) -> Self {
        Self { digest: Sha256::digest(key.expose().as_bytes()).into() }
    }

    /// Names the key in logs without revealing it: the start of its sha256.
    pub fn fingerprint(&self) -> String {
        format!("sha256:{}", hex::encode(&self.digest[..6]))
    }

    pub fn matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        digest.ct_eq(&self.digest).into()
    }
}

/// The bearer token of an `Authorization` header, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Middleware: lets a request through only with the right key (when a key is
/// configured).
pub async fn require_api_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(key) = &state.api_key else {
        return next.run(request).await;
    };
    let headers = request.headers();
    let presented = bearer(headers).or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
    if presented.is_some_and(|p| key.matches(p)) { next.run(request).await } else { unauthorized() }
}

/// Middleware: refuses browser origins that are not allowed and, when no API
/// key guards the gateway, `Host` names that are not loopback (a page whose
/// domain was rebound to 127.0.0.1 sends its own name, and no `Origin` on a
/// simple request is needed to reach `/sse`).
pub async fn check_origin(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state.api_key.is_none()
        && let Some(host) = request.headers().get(header::HOST)
    {
        let host = host.to_str().unwrap_or_default();
        let public = state.config.gateway_url.as_ref().and_then(|url| url.host_str());
        if !host_allowed(host, public) {
            return crate::error::McpError::ForbiddenHost(crate::throttle::untrusted(host, 64)).into_response();
        }
    }
    if let Some(origin) = request.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        let host = request.headers().get(header::HOST).and_then(|h| h.to_str().ok());
        // The gateway's own pages (`/status`) call it from its own origin.
        // Without a key that origin is loopback (checked above), so a
        // rebound domain cannot pass as "same origin".
        let own = host.is_some_and(|host| same_origin(origin, host));
        if !own && !origin_allowed(origin, &state.config.allowed_origins) {
            tracing::warn!(origin, "request from a browser origin that is not allowed");
            return crate::error::McpError::ForbiddenOrigin(origin.to_owned()).into_response();
        }
    }
    next.run(request).await
}

/// Whether a `Host` header names this gateway on an unguarded bind:
/// loopback, or the host of `GATEWAY_URL` when one was given.
pub fn host_allowed(host: &str, public: Option<&str>) -> bool {
    let Ok(url) = url::Url::parse(&format!("http://{}", host.trim())) else { return false };
    match url.host() {
        Some(url::Host::Domain(name)) => {
            name.eq_ignore_ascii_case("localhost") || public.is_some_and(|p| p.eq_ignore_ascii_case(name))
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback() || public == Some(ip.to_string().as_str()),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Whether a browser origin may call: loopback, or listed, or `*` listed.
pub fn origin_allowed(origin: &str, allowed: &[String]) -> bool {
    let origin = origin.trim().trim_end_matches('/');
    if allowed.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(origin)) {
        return true;
    }
    let Ok(url) = url::Url::parse(origin) else { return false };
    matches!(url.host(), Some(url::Host::Domain("localhost")))
        || matches!(url.host(), Some(url::Host::Ipv4(ip)) if ip.is_loopback())
        || matches!(url.host(), Some(url::Host::Ipv6(ip)) if ip.is_loopback())
}

/// Whether `origin` names the same host and port as the `Host` header.
pub fn same_origin(origin: &str, host: &str) -> bool {
    let Ok(origin) = url::Url::parse(origin.trim()) else { return false };
    let Ok(own) = url::Url::parse(&format!("{}://{}", origin.scheme(), host.trim())) else { return false };
    origin.host().is_some()
        && origin.host() == own.host()
        && origin.port_or_known_default() == own.port_or_known_default()
        && own.path() == "/"
}

/// 401 with the body the Heroku templates use and a Bearer challenge.
pub fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")),
        ],
        r#"{"error":"Unauthorized"}"#,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_key_matches() {
        let key = ApiKey::new(&Secret::new("s3cret"));
        assert!(key.matches("s3cret"));
        for wrong in ["", "s3cre", "s3cret ", "S3CRET", "s3cretx"] {
            assert!(!key.matches(wrong), "{wrong:?}");
        }
    }

    #[test]
    fn an_origin_is_the_same_only_with_the_same_host_and_port() {
        assert!(same_origin("https://app.example.com", "app.example.com"));
        assert!(same_origin("https://app.example.com", "app.example.com:443"));
        assert!(same_origin("http://127.0.0.1:8000", "127.0.0.1:8000"));
        assert!(!same_origin("http://127.0.0.1:8000", "127.0.0.1:8001"));
        assert!(!same_origin("https://evil.example", "app.example.com"));
        assert!(!same_origin("null", "app.example.com"));
        assert!(!same_origin("https://app.example.com", "app.example.com/x"));
    }

    #[test]
    fn origins_are_allowed_when_loopback_or_listed() {
        let allowed = vec!["https://app.example.com".to_owned()];
        for (origin, ok) in [
            ("http://localhost:3000", true),
            ("http://127.0.0.1:8000", true),
            ("http://[::1]:8000", true),
            ("https://app.example.com", true),
            ("https://APP.example.com/", true),
            ("https://evil.example", false),
            ("null", false),
            ("http://localhost.evil.example", false),
        ] {
            assert_eq!(origin_allowed(origin, &allowed), ok, "{origin}");
        }
        assert!(origin_allowed("https://anything.example", &["*".to_owned()]));
    }

    #[test]
    fn unguarded_gateways_answer_only_loopback_hosts() {
        for (host, public, ok) in [
            ("127.0.0.1:8000", None, true),
            ("localhost:8000", None, true),
            ("LOCALHOST", None, true),
            ("[::1]:8000", None, true),
            ("127.1.2.3", None, true),
            ("evil.example:8000", None, false),
            ("localhost.evil.example", None, false),
            ("10.0.0.5:8000", None, false),
            ("gw.example.com", Some("gw.example.com"), true),
            ("", None, false),
            ("a b", None, false),
        ] {
            assert_eq!(host_allowed(host, public), ok, "{host}");
        }
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer abc"));
        assert_eq!(bearer(&headers), Some("abc"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&headers), None);
    }
}
