//! Starting and stopping the bridged stdio MCP server.
//!
//! The server runs in a process group of its own, so stopping it reaches
//! everything that stayed in that group; what left it (the executor's
//! commands, code that called `setsid`) is still below the runner, a child
//! subreaper, and [`crate::reap`] kills it once the server is gone. A local
//! runner starts it in the session's [`Sandbox`], whose PID namespace takes
//! everything with it. Its environment is built from an allowlist of the
//! runner's (on Heroku every dyno gets every config var; see
//! [`passes_to_server`]) plus the names in `SERVER_ENV`, never a secret of
//! [`SECRET_ENV`], plus [`SESSION_DIR_ENV`]. Its stderr is copied to the
//! runner's log, line by line, and never onto the wire. Where no cgroup holds
//! the sandbox's memory and CPU limits, a [`governor`] keeps them while the
//! server runs.

use std::ffi::OsString;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use dynogate_shared::names::{SECRET_ENV, SESSION_DIR_ENV};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{ChildStdin, ChildStdout, Command};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tracing::{Instrument, info, warn};

use crate::config::ServerCommand;
use crate::exec::env::passes_to_server;
use crate::reap;
use crate::sandbox::{Sandbox, governor};

/// A running MCP server.
pub struct Server {
    pgid: Pid,
    /// Set once the server has exited; a task owns the child and waits for
    /// it, so the relay's loop never polls `waitpid` on its own.
    exit: watch::Receiver<Option<ExitStatus>>,
    /// Reaps orphans that exit while the server runs (never the server itself).
    reaper: AbortHandle,
    /// Keeps the session's memory and CPU limits where no cgroup does.
    governor: Option<AbortHandle>,
    stopped: bool,
    /// Dropped after the server: removes the session's cgroups.
    sandbox: Option<Sandbox>,
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
}

/// Starts `command` with `workdir` as the session's directory, in `sandbox`
/// when there is one. `extra_env` names variables the operator passes on
/// (`SERVER_ENV`).
pub fn start(
    command: &ServerCommand,
    workdir: &Path,
    sandbox: Option<Sandbox>,
    extra_env: &[String],
) -> anyhow::Result<Server> {
    let argv: Vec<OsString> = match command {
        ServerCommand::BuiltIn => {
            let me = std::env::current_exe().context("cannot locate the runner binary")?;
            vec![me.into(), "exec".into(), "--workdir".into(), workdir.into()]
        }
        ServerCommand::Shell(line) => {
            let line = match crate::procfile::resolve(line, Path::new("Procfile")) {
                Some(resolved) => {
                    info!(process_type = %line, command = %resolved, "RUNNER_COMMAND names a Procfile process type");
                    resolved
                }
                None => line.clone(),
            };
            vec!["sh".into(), "-c".into(), line.into()]
        }
        ServerCommand::Argv(argv) => argv.iter().map(OsString::from).collect(),
    };
    let mut cmd = match &sandbox {
        Some(sandbox) => sandbox.command(&argv, workdir),
        None => {
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..]);
            if *command == ServerCommand::BuiltIn {
                cmd.current_dir(workdir);
            }
            cmd
        }
    };
    cmd.env_clear().envs(server_env(std::env::vars_os(), extra_env));
    if let Some(sandbox) = &sandbox {
        sandbox.set_env(&mut cmd, workdir);
    }
    cmd.env(SESSION_DIR_ENV, workdir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| format!("cannot start the MCP server {command:?}"))?;
    let pid = child.id().context("the MCP server exited at once")?;
    let pgid = Pid::from_raw(i32::try_from(pid).expect("pids fit in i32"));
    info!(pid, "MCP server started");
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(
            async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    info!(target: "mcp_server", "{line}");
                }
            }
            .in_current_span(),
        );
    }
    let (stdin, stdout) = (child.stdin.take(), child.stdout.take());
    // The server's pid is also its group's id; tokio waits for that pid, so
    // the reaper leaves it alone.
    let reaper = tokio::spawn(reap::reap_while_running(pgid).in_current_span()).abort_handle();
    let governor = sandbox.as_ref().and_then(Sandbox::watched).map(|limits| governor::watch(pgid, limits));
    let (tx, exit) = watch::channel(None);
    tokio::spawn(async move {
        let status = child.wait().await.unwrap_or_else(|e| {
            warn!("cannot wait for the MCP server: {e}");
            std::os::unix::process::ExitStatusExt::from_raw(1 << 8)
        });
        let _ = tx.send(Some(status));
    });
    Ok(Server { stdin, stdout, pgid, exit, reaper, governor, stopped: false, sandbox })
}

/// The server's environment: the names it may see, from the runner's own.
/// Never a secret (on a dyno every config var is in the runner's
/// environment), even when the operator lists one.
fn server_env(
    vars: impl Iterator<Item = (OsString, OsString)>,
    extra: &[String],
) -> impl Iterator<Item = (OsString, OsString)> {
    vars.filter(move |(name, _)| {
        let Some(name) = name.to_str() else { return false };
        !SECRET_ENV.contains(&name) && (passes_to_server(name) || extra.iter().any(|e| e == name))
    })
}

impl Server {
    /// Resolves when the server exits. Cancel-safe and cheap to poll.
    pub async fn wait(&mut self) -> ExitStatus {
        let status = self.exit.wait_for(Option::is_some).await.map(|status| *status);
        match status {
            Ok(status) => status.expect("waited for Some"),
            // The waiting task is gone only when the runtime is shutting down.
            Err(_) => std::future::pending().await,
        }
    }

    /// Stops the server: its stdin must already be closed (the MCP way to ask
    /// a stdio server to leave); after `grace` its process group is killed.
    /// Kills the group even after a clean exit, for anything left behind, and
    /// then every process still below the runner, wherever it went.
    pub async fn stop(mut self, grace: Duration) -> Option<ExitStatus> {
        self.stdin = None;
        let status = match tokio::time::timeout(grace, self.wait()).await {
            Ok(status) => Some(status),
            Err(_) => {
                warn!("MCP server still running {grace:?} after its stdin closed; killing its process group");
                None
            }
        };
        self.kill_group();
        let status = match status {
            Some(status) => Some(status),
            None => tokio::time::timeout(Duration::from_secs(5), self.wait()).await.ok(),
        };
        self.reaper.abort();
        self.stop_governor();
        // The server is gone, so nothing new can be started below the runner
        // except by what is left there, which this kills pass after pass.
        reap::kill_descendants(Some(self.pgid)).await;
        if let Some(sandbox) = self.sandbox.take() {
            sandbox.kill();
        }
        self.stopped = true;
        status
    }

    fn stop_governor(&mut self) {
        if let Some(governor) = self.governor.take() {
            governor.abort();
        }
    }

    /// Kills whatever is left in the server's process group. The group id is
    /// not reused while any member lives, and ids are handed out cyclically,
    /// so even just after the leader is reaped this reaches only our processes.
    pub fn kill_group(&self) {
        match killpg(self.pgid, Signal::SIGKILL) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => warn!("cannot kill the MCP server's process group: {e}"),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.stopped {
            self.reaper.abort();
            self.stop_governor();
            self.kill_group();
            // One pass, without waiting: a drop cannot await the rest.
            reap::kill_descendants_once(Some(self.pgid));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_sees_allowlisted_names_and_the_operators_but_never_a_secret() {
        let vars = ["PATH", "EXEC_RUN_TIMEOUT", "PIP_INDEX_URL", "DATABASE_URL", "API_KEY", "GITHUB_TOKEN", "LANG"]
            .map(|name| (OsString::from(name), OsString::from("v")));
        let extra = ["GITHUB_TOKEN".to_owned(), "API_KEY".to_owned()];
        let names: Vec<String> =
            server_env(vars.into_iter(), &extra).map(|(name, _)| name.into_string().unwrap()).collect();
        assert_eq!(names, ["PATH", "EXEC_RUN_TIMEOUT", "PIP_INDEX_URL", "GITHUB_TOKEN", "LANG"]);
    }
}
