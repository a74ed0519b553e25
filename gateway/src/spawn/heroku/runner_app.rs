//! The runner app: where runner dynos run, apart from the gateway's app.
//!
//! A one-off dyno receives every config var of its app, and code on it can
//! read its launcher's environment, so a runner dyno in the gateway's own app
//! would hand code `API_KEY`, `HEROKU_API_KEY`, `RENDEZVOUS_SECRET` and every
//! add-on's URL. Runner dynos therefore run in an app of their own that holds
//! no config var at all (`HEROKU_RUNNER_APP`, by default the gateway's name
//! with `-run`): the gateway creates it when it is missing (same stack and
//! region as its own app) and, at every start-up (every deploy restarts the
//! gateway), releases its own app's current slug there, so runners run the
//! build the gateway runs. What a runner needs (its token, `GATEWAY_URL`,
//! `RUNNER_COMMAND`) travels in its dyno's `env`, one session at a time.

use tracing::{info, warn};

use super::api::{Api, ApiError, App};

/// Longest Heroku app name.
const MAX_NAME: usize = 30;

/// The default runner app for the gateway app `gateway`: its name with
/// `-run`, shortened to fit Heroku's 30 characters.
pub fn default_name(gateway: &str) -> String {
    let suffix = "-run";
    let stem: String = gateway.chars().take(MAX_NAME - suffix.len()).collect();
    format!("{}{suffix}", stem.trim_end_matches('-'))
}

/// Makes sure the runner app exists and runs the gateway app's current slug;
/// `own` is the gateway's app. Creating the app is required; a failed slug
/// sync only warns (runners then run the slug released there before).
pub async fn prepare(gateway: &Api, runner: &Api, own: &App) -> anyhow::Result<()> {
    if gateway.app() == runner.app() {
        return Ok(());
    }
    match runner.app_info().await {
        Ok(_) => {}
        Err(ApiError::Refused { status: 404, .. }) => {
            let stack = own.stack.as_ref().map(|s| s.name.as_str());
            let region = own.region.as_ref().map(|r| r.name.as_str());
            match runner.create_app(stack, region).await {
                Ok(_) => info!(app = runner.app(), ?stack, ?region, "created the app runner dynos run in"),
                // Another gateway instance starting beside this one made it first.
                Err(_) if runner.app_info().await.is_ok() => {}
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "cannot create the runner app {} (set HEROKU_RUNNER_APP to an app this key may create or \
                         use; app names are global)",
                        runner.app()
                    )));
                }
            }
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot read the runner app {}", runner.app()))),
    }
    if let Err(e) = sync_slug(gateway, runner).await {
        warn!(app = runner.app(), "cannot release the gateway's slug on the runner app: {e:#}");
    }
    Ok(())
}

/// Releases the gateway app's newest slug on the runner app unless it is
/// already the one there.
async fn sync_slug(gateway: &Api, runner: &Api) -> anyhow::Result<()> {
    let Some(current) = gateway.latest_release().await?.and_then(|r| r.slug) else {
        // Not deployed from a slug (a local run against the API): nothing to copy.
        return Ok(());
    };
    let there = runner.latest_release().await?.and_then(|r| r.slug);
    if there.as_ref() == Some(&current) {
        return Ok(());
    }
    let description = format!("dynogate: the slug of {}", gateway.app());
    let release = runner.release_slug(&current.id, &description).await?;
    info!(app = runner.app(), slug = %current.id, version = release.version, "runner app now runs the gateway's slug");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_fit_herokus_limit() {
        assert_eq!(default_name("my-gateway"), "my-gateway-run");
        let long = default_name("a-very-long-gateway-app-name-x");
        assert!(long.len() <= MAX_NAME && long.ends_with("-run"), "{long}");
        assert_eq!(default_name("abcdefghijklmnopqrstuvwxy-zzzz"), "abcdefghijklmnopqrstuvwxy-run");
    }
}
