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
//!
//! With instances sharing Redis, runners are started to outlive their
//! gateway, as dynos do (`--outlive-gateway`): a gateway that hands its
//! sessions over on SIGTERM, or dies, leaves them running, and the instance
//! that takes a session over adopts its runner by process group
//! ([`AdoptedRunner`]).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Runners go on when this gateway exits (instances share Redis).
    outlive: bool,
}

impl LocalSpawner {
    pub fn new(runner_bin: PathBuf, runner_command: Option<String>, sandbox: Mode, outlive: bool) -> Self {
        Self { runner_bin, runner_command, sandbox, outlive }
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
            if self.outlive {
                command.arg("--outlive-gateway");
            }
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
                .kill_on_drop(!self.outlive);
            // On failure the directory is dropped, which removes it.
            let mut child =
                command.spawn().map_err(|e| SpawnError::Start(format!("{}: {e}", self.runner_bin.display())))?;
            let pid = child.id().ok_or_else(|| SpawnError::Start("runner exited at once".into()))?;
            let pid = Pid::from_raw(i32::try_from(pid).expect("pids fit in i32"));
            // A runner that outlives this gateway keeps its directory when
            // the gateway exits; whoever sees it end removes it.
            let dir = workdir.path().to_owned();
            let workdir = if self.outlive { Workdir::Kept(workdir.keep()) } else { Workdir::Temp(Some(workdir)) };
            tracing::debug!(%pid, "local runner started");
            // A task owns the child and waits for it, so the session's loop
            // never polls `waitpid` itself.
            let (tx, exit) = watch::channel(None);
            let released = Arc::new(AtomicBool::new(false));
            let forgotten = released.clone();
            tokio::spawn(async move {
                let how = match child.wait().await {
                    Ok(status) => describe_status(status),
                    Err(e) => format!("cannot wait for it: {e}"),
                };
                let _ = tx.send(Some(how));
                if forgotten.load(Ordering::Acquire) {
                    // Another instance owns it now, and cleans up after it.
                    workdir.forget();
                    return;
                }
                clean_up(pid, workdir).await;
            });
            Ok(Box::new(LocalRunner { pgid: pid, exit, dir, released }) as Box<dyn RunnerProcess>)
        }
        .boxed()
    }

    fn adopt(&self, handle: &str) -> Option<Box<dyn RunnerProcess>> {
        let (boot, rest) = handle.strip_prefix("local:")?.split_once(':')?;
        let (pgid, dir) = rest.split_once(':')?;
        let pgid: i32 = pgid.parse().ok()?;
        // Only a runner of this machine's current boot, and never a group
        // id that would signal more than one runner's group.
        if boot != boot_id() || pgid <= 1 {
            return None;
        }
        Some(Box::new(AdoptedRunner { pgid: Pid::from_raw(pgid), dir: PathBuf::from(dir) }))
    }
}

/// What names a local runner to another instance on this machine: the
/// boot it belongs to, its process group and its directory.
fn handle_of(pgid: Pid, dir: &std::path::Path) -> String {
    format!("local:{}:{pgid}:{}", boot_id(), dir.display())
}

/// This boot of this machine (pids mean nothing elsewhere, or after a reboot).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|id| id.trim().to_owned()).unwrap_or_default()
}

/// A runner another instance started on this machine, taken over with its
/// session. Not this process's child: its exit is seen by polling.
struct AdoptedRunner {
    pgid: Pid,
    dir: PathBuf,
}

impl AdoptedRunner {
    /// Whether the runner still runs: its pid is taken, by a runner that
    /// outlives its gateway (a pid reused by something else is not it).
    fn alive(&self) -> bool {
        kill(self.pgid, None).is_ok()
            && std::fs::read(format!("/proc/{}/cmdline", self.pgid))
                .is_ok_and(|argv| argv.split(|&b| b == 0).any(|arg| arg == b"--outlive-gateway"))
    }

    async fn gone_within(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.alive() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }
}

impl RunnerProcess for AdoptedRunner {
    fn describe(&self) -> String {
        format!("pid {} (taken over)", self.pgid)
    }

    fn handle(&self) -> String {
        handle_of(self.pgid, &self.dir)
    }

    fn exited(&mut self) -> BoxFuture<'_, String> {
        async move {
            while self.alive() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            "runner process ended".to_owned()
        }
        .boxed()
    }

    fn stop(self: Box<Self>, grace: Duration) -> BoxFuture<'static, ()> {
        async move {
            // Signals only while it is the runner: its group's id cannot be
            // reused while the runner leads it.
            if !self.gone_within(grace).await {
                let _ = kill(self.pgid, Signal::SIGTERM);
                if !self.gone_within(TERM_GRACE).await {
                    let _ = killpg(self.pgid, Signal::SIGKILL);
                    self.gone_within(Duration::from_secs(5)).await;
                }
            }
            clean_up(self.pgid, Workdir::Kept(self.dir)).await;
        }
        .boxed()
    }
}

/// Removes what a runner that ended left: its cgroups and its directory.
/// Usually the runner removed them already; removing a tree can take a
/// while, so it happens off the runtime's threads.
async fn clean_up(pid: Pid, workdir: Workdir) {
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
}

/// A session directory: removed on drop, unless kept, which leaves it for
/// an explicit [`Workdir::close`].
enum Workdir {
    Temp(Option<tempfile::TempDir>),
    Kept(PathBuf),
}

impl Workdir {
    fn close(self) -> std::io::Result<()> {
        match self {
            Workdir::Temp(mut dir) => dir.take().map_or(Ok(()), tempfile::TempDir::close),
            Workdir::Kept(path) => std::fs::remove_dir_all(path),
        }
    }

    fn forget(self) {
        if let Workdir::Temp(Some(dir)) = self {
            let _ = dir.keep();
        }
    }
}

/// A `runner --local` child, leader of its own process group.
struct LocalRunner {
    pgid: Pid,
    /// How the runner ended, once it has.
    exit: watch::Receiver<Option<String>>,
    /// Its session directory.
    dir: PathBuf,
    /// Handed to another instance: neither killed nor cleaned up here.
    released: Arc<AtomicBool>,
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

    fn handle(&self) -> String {
        handle_of(self.pgid, &self.dir)
    }

    fn release(self: Box<Self>) {
        self.released.store(true, Ordering::Release);
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
        if self.exit.borrow().is_none() && !self.released.load(Ordering::Acquire) {
            self.kill_group();
        }
    }
}

fn describe_status(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    dynogate_shared::frame::describe_exit(status.code(), status.signal())
}
