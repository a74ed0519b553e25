//! The tools local runners' sessions use, obtained once at start-up.
//!
//! Python installs are fast only with `uv`. A sandboxed session cannot
//! obtain it (it sees the machine's tools directory read-only), so the
//! gateway asks the runner binary to (`runner obtain-uv`) unless `uv` is on
//! its PATH: it answers at once when uv is in the tools directory, and
//! otherwise installs it from the package index while the gateway serves;
//! sessions started meanwhile install with pip.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// How long start-up waits for the answer before leaving the work to go on
/// in the background.
const PATIENCE: Duration = Duration::from_millis(300);

/// Starts `runner obtain-uv`; returns once it answered or went on in the
/// background, where it ends with the runtime.
pub async fn obtain_uv(runner_bin: &Path) {
    if on_path("uv") {
        return;
    }
    let child = tokio::process::Command::new(runner_bin)
        .arg("obtain-uv")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(child) => child,
        Err(e) => return tracing::warn!("cannot run {} obtain-uv: {e}", runner_bin.display()),
    };
    let mut work = Box::pin(report(child.wait_with_output()));
    if tokio::time::timeout(PATIENCE, &mut work).await.is_err() {
        tracing::info!("no uv on this machine: obtaining it from the package index for Python installs");
        tokio::spawn(work);
    }
}

/// Whether `name` is a file in a directory of `PATH` (the runner makes the
/// full check; this spares it a start when uv is plainly there).
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

async fn report(output: impl Future<Output = std::io::Result<std::process::Output>>) {
    match output.await {
        Ok(out) if out.status.success() => {
            tracing::info!("Python installs use {}", String::from_utf8_lossy(&out.stdout).trim());
        }
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let why = stderr.trim().trim_start_matches("Error: ").replace('\n', " ");
            tracing::warn!("no uv, so Python packages install with pip, more slowly: {why}");
        }
        Err(e) => tracing::warn!("obtaining uv failed: {e}"),
    }
}
