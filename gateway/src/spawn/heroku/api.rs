//! A small client for the part of Heroku's Platform API that one-off dynos
//! need: create, get, list and stop; and for keeping the runner app in step
//! with the gateway's (an app's info, creating an app, its latest release,
//! releasing a slug).
//!
//! Every call carries the v3 `Accept` header, the bearer key and a
//! `User-Agent`. The retry rules follow what the platform documents:
//! - 429 `rate_limit`: wait (`Retry-After` when given, else backoff) and retry;
//! - 5xx and network failures: jittered, bounded exponential backoff;
//! - 409 on create (release not ready yet) and 404 just after create: a few
//!   quick retries, which the caller asks for per call;
//! - anything else (401, 403, 422, …): an [`ApiError::Refused`] carrying
//!   Heroku's error id and message, never the key.
//!
//! The last `RateLimit-Remaining` seen is kept, so the spawner can refuse new
//! sessions before the account's budget runs out. The `Request-Id` of every
//! failed call is logged.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use dynogate_shared::Secret;
use reqwest::header::{ACCEPT, HeaderMap, RETRY_AFTER, USER_AGENT};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};
use url::Url;

const ACCEPT_V3: &str = "application/vnd.heroku+json; version=3";
/// No single call may hang longer than this.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Most pages of one listing (the API serves up to 1,000 items a page).
pub const MAX_PAGES: usize = 50;

/// How hard to retry.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// First backoff; doubled on each retry, with jitter.
    pub base: Duration,
    /// Longest single wait.
    pub max_wait: Duration,
    /// Retries of 429, 5xx and network failures.
    pub attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { base: Duration::from_millis(500), max_wait: Duration::from_secs(8), attempts: 4 }
    }
}

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// Heroku answered with an error that retrying will not fix.
    #[error("Heroku refused the request (HTTP {status} {id}): {message}")]
    Refused { status: u16, id: String, message: String },
    /// Heroku could not be reached or kept failing.
    #[error("the Heroku Platform API is unavailable: {0}")]
    Unavailable(String),
}

/// A dyno as the API describes it (the fields we use).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dyno {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub command: String,
    #[serde(default, rename = "type")]
    pub kind: String,
}

/// The body of `POST /apps/{app}/dynos`.
#[derive(Debug, Clone, Serialize)]
pub struct CreateDyno {
    pub command: String,
    pub env: std::collections::BTreeMap<String, String>,
    pub attach: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub time_to_live: u64,
}

/// An app as the API describes it (the fields we use).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct App {
    pub name: String,
    #[serde(default)]
    pub stack: Option<Named>,
    #[serde(default)]
    pub region: Option<Named>,
    /// `https://<app>-<hex>.herokuapp.com/` for apps made since 2023.
    #[serde(default)]
    pub web_url: Option<String>,
    /// `cedar` or `fir`.
    #[serde(default)]
    pub generation: Option<Named>,
}

impl App {
    /// Whether the app is built with Cloud Native Buildpacks (Fir, or a
    /// `cnb` stack), whose dyno commands run through `launcher`.
    pub fn is_cnb(&self) -> bool {
        self.stack.as_ref().is_some_and(|s| s.name == "cnb")
            || self.generation.as_ref().is_some_and(|g| g.name == "fir")
    }
}

/// `{"name": …}`, as stacks and regions appear in an app.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Named {
    pub name: String,
}

/// A release as the API describes it (the fields we use).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Release {
    #[serde(default)]
    pub version: u64,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub slug: Option<Id>,
}

/// `{"id": …}`, as a release's slug appears.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Id {
    pub id: String,
}

/// Extra retries a particular call wants for statuses that are normally final.
#[derive(Debug, Clone, Copy, Default)]
struct Tolerate {
    status: Option<StatusCode>,
    times: u32,
}

/// A Platform API client bound to one app.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: Url,
    key: Secret,
    app: String,
    retry: RetryPolicy,
    remaining: Arc<AtomicI64>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").field("base", &self.base.as_str()).field("app", &self.app).finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    id: String,
    #[serde(default)]
    message: String,
}

impl Api {
    pub fn new(base: Url, key: Secret, app: String, retry: RetryPolicy) -> anyhow::Result<Self> {
        // ring is the one TLS backend compiled in; a second install is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the Heroku API client: {e}"))?;
        Ok(Self { http, base, key, app, retry, remaining: Arc::new(AtomicI64::new(-1)) })
    }

    /// The same client (key, retries, rate-limit budget) bound to another app.
    pub fn for_app(&self, app: &str) -> Api {
        Api { app: app.to_owned(), ..self.clone() }
    }

    pub fn app(&self) -> &str {
        &self.app
    }

    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The app this client is bound to.
    pub async fn app_info(&self) -> Result<App, ApiError> {
        let path = format!("apps/{}", self.app);
        parse(self.call::<()>(Method::GET, &path, None, Tolerate::default()).await?).await
    }

    /// Creates the app this client is bound to, on `stack` in `region`.
    pub async fn create_app(&self, stack: Option<&str>, region: Option<&str>) -> Result<App, ApiError> {
        let body = serde_json::json!({"name": self.app, "stack": stack, "region": region});
        parse(self.call(Method::POST, "apps", Some(&body), Tolerate::default()).await?).await
    }

    /// The app's newest release that succeeded and has a slug, if any.
    pub async fn latest_release(&self) -> Result<Option<Release>, ApiError> {
        let path = format!("apps/{}/releases", self.app);
        let response = self.call_with_range(&path, Some("version ..; order=desc, max=20")).await?;
        let releases: Vec<Release> = parse(response).await?;
        Ok(releases.into_iter().find(|r| r.status == "succeeded" && r.slug.is_some()))
    }

    /// Releases `slug` (an id from any app of the account) on this app.
    pub async fn release_slug(&self, slug: &str, description: &str) -> Result<Release, ApiError> {
        let path = format!("apps/{}/releases", self.app);
        let body = serde_json::json!({"slug": slug, "description": description});
        parse(self.call(Method::POST, &path, Some(&body), Tolerate::default()).await?).await
    }

    /// The last `RateLimit-Remaining` Heroku reported, if any.
    pub fn remaining(&self) -> Option<i64> {
        Some(self.remaining.load(Ordering::Relaxed)).filter(|n| *n >= 0)
    }

    /// Asks Heroku how many calls are left (a call that costs none) and
    /// keeps the answer.
    pub async fn refresh_remaining(&self) -> Result<i64, ApiError> {
        #[derive(Deserialize)]
        struct RateLimits {
            remaining: i64,
        }
        let response = self.call::<()>(Method::GET, "account/rate-limits", None, Tolerate::default()).await?;
        let limits: RateLimits = parse(response).await?;
        self.remaining.store(limits.remaining, Ordering::Relaxed);
        Ok(limits.remaining)
    }

    pub async fn create_dyno(&self, body: &CreateDyno) -> Result<Dyno, ApiError> {
        let path = format!("apps/{}/dynos", self.app);
        // A fresh app's release may not be ready yet: Heroku says 409.
        let tolerate = Tolerate { status: Some(StatusCode::CONFLICT), times: 3 };
        let response = self.call(Method::POST, &path, Some(body), tolerate).await?;
        parse(response).await
    }

    pub async fn dyno(&self, id: &str) -> Result<Dyno, ApiError> {
        let path = format!("apps/{}/dynos/{id}", self.app);
        // A dyno can be missing for a moment right after it was created.
        let tolerate = Tolerate { status: Some(StatusCode::NOT_FOUND), times: 3 };
        parse(self.call::<()>(Method::GET, &path, None, tolerate).await?).await
    }

    /// Every dyno of the app, following `Next-Range` pages: at most
    /// [`MAX_PAGES`], and never the same range twice, so an API that keeps
    /// answering 206 cannot keep a sweep going.
    pub async fn list_dynos(&self) -> Result<Vec<Dyno>, ApiError> {
        let path = format!("apps/{}/dynos", self.app);
        let mut all = Vec::new();
        let mut range: Option<String> = None;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..MAX_PAGES {
            let response = self.call_with_range(&path, range.as_deref()).await?;
            let next = (response.status() == StatusCode::PARTIAL_CONTENT)
                .then(|| response.headers().get("next-range").and_then(|v| v.to_str().ok()).map(str::to_owned))
                .flatten();
            let page: Vec<Dyno> = parse(response).await?;
            all.extend(page);
            match next {
                Some(next) if seen.insert(next.clone()) => range = Some(next),
                Some(_) => return Err(ApiError::Unavailable("the dyno list repeats a Next-Range".into())),
                None => return Ok(all),
            }
        }
        Err(ApiError::Unavailable(format!("the dyno list goes on past {MAX_PAGES} pages")))
    }

    /// Stops a dyno. One that is already gone counts as stopped.
    pub async fn stop_dyno(&self, id: &str) -> Result<(), ApiError> {
        let path = format!("apps/{}/dynos/{id}/actions/stop", self.app);
        match self.call::<()>(Method::POST, &path, None, Tolerate::default()).await {
            Ok(_) => Ok(()),
            Err(ApiError::Refused { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn call_with_range(&self, path: &str, range: Option<&str>) -> Result<reqwest::Response, ApiError> {
        let mut headers = HeaderMap::new();
        if let Some(range) = range {
            headers.insert("range", range.parse().map_err(|_| ApiError::Unavailable("bad Next-Range".into()))?);
        }
        self.send::<()>(Method::GET, path, None, headers, Tolerate::default()).await
    }

    async fn call<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        tolerate: Tolerate,
    ) -> Result<reqwest::Response, ApiError> {
        self.send(method, path, body, HeaderMap::new(), tolerate).await
    }

    async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        headers: HeaderMap,
        tolerate: Tolerate,
    ) -> Result<reqwest::Response, ApiError> {
        let url = self.base.join(path).map_err(|e| ApiError::Unavailable(format!("bad API URL: {e}")))?;
        let mut retries = 0u32;
        let mut tolerated = 0u32;
        loop {
            let mut request = self
                .http
                .request(method.clone(), url.clone())
                .header(ACCEPT, ACCEPT_V3)
                .header(USER_AGENT, concat!("dynogate/", env!("CARGO_PKG_VERSION")))
                .bearer_auth(self.key.expose())
                .headers(headers.clone());
            if let Some(body) = body {
                request = request.json(body);
            }
            let outcome = request.send().await;
            crate::metrics::platform_api_called(outcome.as_ref().ok().map(|r| r.status().as_u16()));
            let response = match outcome {
                Ok(response) => response,
                Err(e) => {
                    if retries < self.retry.attempts {
                        let wait = self.backoff(retries);
                        warn!(%method, path, error = %e.without_url(), ?wait, "Heroku API unreachable; retrying");
                        retries += 1;
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    // Without the URL: this message may reach a client.
                    return Err(ApiError::Unavailable(format!("{method} {path}: {}", e.without_url())));
                }
            };
            if let Some(remaining) = header_number(response.headers(), "ratelimit-remaining") {
                self.remaining.store(remaining, Ordering::Relaxed);
            }
            let status = response.status();
            if status.is_success() {
                debug!(%method, path, %status, "Heroku API call");
                return Ok(response);
            }
            let request_id =
                response.headers().get("request-id").and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
            let retry_after = header_number(response.headers(), RETRY_AFTER.as_str()).map(|s| s.max(0) as u64);
            if tolerate.status == Some(status) && tolerated < tolerate.times {
                tolerated += 1;
                let wait = self.retry.base.min(Duration::from_secs(1));
                warn!(%method, path, %status, request_id, "Heroku API call failed; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                continue;
            }
            let retryable = status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
            if retryable && retries < self.retry.attempts {
                let wait = match retry_after {
                    Some(seconds) => Duration::from_secs(seconds).min(self.retry.max_wait),
                    None => self.backoff(retries),
                };
                warn!(%method, path, %status, request_id, "Heroku API call failed; retrying in {wait:?}");
                retries += 1;
                tokio::time::sleep(wait).await;
                continue;
            }
            let body: ErrorBody =
                response.json().await.unwrap_or(ErrorBody { id: String::new(), message: String::new() });
            warn!(%method, path, %status, request_id, error_id = %body.id, "Heroku API call failed: {}", body.message);
            if retryable {
                return Err(ApiError::Unavailable(format!(
                    "HTTP {} {} after {} retries: {}",
                    status.as_u16(),
                    body.id,
                    retries,
                    body.message
                )));
            }
            return Err(ApiError::Refused {
                status: status.as_u16(),
                id: if body.id.is_empty() { "unknown".into() } else { body.id },
                message: if body.message.is_empty() { status.to_string() } else { body.message },
            });
        }
    }

    /// Exponential backoff with ±25 % jitter, capped.
    fn backoff(&self, retry: u32) -> Duration {
        let exp = self.retry.base.saturating_mul(1 << retry.min(16));
        let capped = exp.min(self.retry.max_wait);
        let mut byte = [0u8; 1];
        let _ = getrandom::fill(&mut byte);
        let factor = 0.75 + f64::from(byte[0]) / 255.0 * 0.5;
        capped.mul_f64(factor)
    }
}

fn header_number(headers: &HeaderMap, name: &str) -> Option<i64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

async fn parse<T: serde::de::DeserializeOwned>(response: reqwest::Response) -> Result<T, ApiError> {
    response
        .json()
        .await
        .map_err(|e| ApiError::Unavailable(format!("unexpected answer from Heroku: {}", e.without_url())))
}
