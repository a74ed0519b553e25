//! The local spawner: each runner is a child process of the gateway.
//!
//! The runner starts in a process group of its own so that ending a session
//! kills the runner and whatever it left in its group, and nothing else. The
//! runner inherits the gateway's environment minus every secret in
//! [`SECRET_ENV`]; its token comes in [`TOKEN_ENV`], never on the command line.
//! The spawner makes the session's directory and removes it, and the
//! session's cgroups, once the runner has exited, however it ended: a runner
//! killed outright cannot remove them. Runners are told whether to sandbox
//! their session (`SANDBOX`, as [`super::sandbox`] decided).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use dynogate_shared::names::{RUNNER_SESSION_DIR_ENV, SANDBOX_ENV, SECRET_ENV, TOKEN_ENV};
use dynogate_shared::sandbox::Mode;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::sync::watch;

use super::{RunnerProcess, RunnerSpec, SpawnError, Spawner};

/// How long a runner gets after SIGTERM: enough to stop its MCP server
/// (the runner allows it two seconds) and clean up.
const TERM_GRACE: Duration = Duration::from_secs(4);

/// Starts `runner --local` processes.
#[derive(Debug, Clone)]
pub struct LocalSpawner {
    runner_bin: PathBuf,
    runner_command: Option<String>,
    /// What [`super::sandbox::decide`] decided; runners are told.
    sandbox: Mode,
}

impl LocalSpawner {
    pub fn new(runner_bin: PathBuf, runner_command: Option<String>, sandbox: Mode) -> Self {
        Self { runner_bin, runner_command, sandbox }
    }
}

impl Spawner for LocalSpawner {
    fn spawn(&self, spec: RunnerSpec) -> BoxFuture<'_, Result<Box<dyn RunnerProcess>, SpawnError>> {
        async move {
            let workdir = tempfile::Builder::new()
                .prefix("dynogate-session-")
                .permissions(std::fs::Permissions::from_mode(0o700))
                .tempdir()
                .map_err(|e| SpawnError::Start(format!("cannot create the session directory: {e}")))?;
            let mut command = Command::new(&self.runner_bin);
            command
                .arg("--local")
                .arg("--gateway-url")
                .arg(spec.gateway_url.as_str())
                .arg("--session")
                .arg(&spec.session);
            for name in SECRET_ENV {
                command.env_remove(name);
            }
            command
                .env(TOKEN_ENV, spec.token.expose())
                .env(RUNNER_SESSION_DIR_ENV, workdir.path())
                .env(SANDBOX_ENV, self.sandbox.as_str());
            // Its own session's context, never one inherited from the gateway's environment.
            match &spec.traceparent {
                Some(traceparent) => command.env(dynogate_telemetry::TRACEPARENT_ENV, traceparent),
                None => command.env_remove(dynogate_telemetry::TRACEPARENT_ENV),
            };
            let server = spec.launch.server.as_ref().map(|s| &s.command);
            match server.or(self.runner_command.as_ref()) {
                Some(shell) => command.env("RUNNER_COMMAND", shell),
                None => command.env_remove("RUNNER_COMMAND"),
            };
            command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .process_group(0)
                .kill_on_drop(true);
            // On failure the directory is dropped, which removes it.
            let mut child =
                command.spawn().map_err(|e| SpawnError::Start(format!("{}: {e}", self.runner_bin.display())))?;
            let pid = child.id().ok_or_else(|| SpawnError::Start("runner exited at once".into()))?;
            let pid = Pid::from_raw(i32::try_from(pid).expect("pids fit in i32"));
            tracing::debug!(%pid, "local runner started");
            // A task owns the child and waits for it, so the session's loop
            // never polls `waitpid` itself.
            let (tx, exit) = watch::channel(None);
            tokio::spawn(async move {
                let how = match child.wait().await {
                    Ok(status) => describe_status(status),
                    Err(e) => format!("cannot wait for it: {e}"),
                };
                let _ = tx.send(Some(how));
                // Usually the runner removed them already; removing a tree can
                // take a while, so it happens off the runtime's threads.
                let raw_pid = pid.as_raw().unsigned_abs();
                let removed = tokio::task::spawn_blocking(move || {
                    super::sandbox::remove_cgroups(raw_pid);
                    workdir.close()
                })
                .await;
                if let Ok(Err(e)) = removed
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(%pid, "cannot remove the session directory: {e}");
                }
            });
            Ok(Box::new(LocalRunner { pgid: pid, exit }) as Box<dyn RunnerProcess>)
        }
        .boxed()
    }
}

/// A `runner --local` child, leader of its own process group.
struct LocalRunner {
    pgid: Pid,
    /// How the runner ended, once it has.
    exit: watch::Receiver<Option<String>>,
}

impl LocalRunner {
    fn kill_group(&self) {
        // The group id cannot be handed to a new process while any member of
        // the group lives, so this reaches only what the runner left behind.
        match killpg(self.pgid, Signal::SIGKILL) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => tracing::warn!(pgid = %self.pgid, "cannot kill runner process group: {e}"),
        }
    }

    async fn wait(&mut self) -> String {
        let how = self.exit.wait_for(Option::is_some).await.map(|how| how.clone());
        match how {
            Ok(how) => how.expect("waited for Some"),
            // The waiting task is gone only when the runtime is shutting down.
            Err(_) => std::future::pending().await,
        }
    }
}

impl RunnerProcess for LocalRunner {
    fn describe(&self) -> String {
        format!("pid {}", self.pgid)
    }

    fn exited(&mut self) -> BoxFuture<'_, String> {
        self.wait().boxed()
    }

    fn stop(mut self: Box<Self>, grace: Duration) -> BoxFuture<'static, ()> {
        async move {
            // It was told to shut down over its socket (if it has one); then
            // SIGTERM, which makes it stop its MCP server and remove the
            // session directory; only then SIGKILL, which would leave both.
            if tokio::time::timeout(grace, self.wait()).await.is_err() {
                let _ = kill(self.pgid, Signal::SIGTERM);
                if tokio::time::timeout(TERM_GRACE, self.wait()).await.is_err() {
                    tracing::warn!(pgid = %self.pgid, "runner still running after SIGTERM; killing its process group");
                }
            }
            self.kill_group();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.wait()).await;
        }
        .boxed()
    }
}

impl Drop for LocalRunner {
    fn drop(&mut self) {
        if self.exit.borrow().is_none() {
            self.kill_group();
        }
    }
}

fn describe_status(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    dynogate_shared::frame::describe_exit(status.code(), status.signal())
}
