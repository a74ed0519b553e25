//! Starting and stopping the bridged stdio MCP server.
//!
//! The server runs in a process group of its own, so stopping it reaches
//! everything that stayed in that group; what left it (the executor's
//! commands, code that called `setsid`) is still below the runner, a child
//! subreaper, and [`crate::reap`] kills it once the server is gone. Its
//! environment is the runner's minus every secret in [`SECRET_ENV`] (on
//! Heroku every dyno gets every config var), plus [`SESSION_DIR_ENV`]. Its
//! stderr is copied to the runner's log, line by line, and never onto the
//! wire.

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
use crate::reap;

/// A running MCP server.
pub struct Server {
    pgid: Pid,
    /// Set once the server has exited; a task owns the child and waits for
    /// it, so the relay's loop never polls `waitpid` on its own.
    exit: watch::Receiver<Option<ExitStatus>>,
    /// Reaps orphans that exit while the server runs (never the server itself).
    reaper: AbortHandle,
    stopped: bool,
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
}

/// Starts `command` with `workdir` as the session's directory.
pub fn start(command: &ServerCommand, workdir: &Path) -> anyhow::Result<Server> {
    let mut cmd = match command {
        ServerCommand::BuiltIn => {
            let me = std::env::current_exe().context("cannot locate the runner binary")?;
            let mut cmd = Command::new(me);
            cmd.arg("exec").arg("--workdir").arg(workdir).current_dir(workdir);
            cmd
        }
        ServerCommand::Shell(line) => {
            let line = match crate::procfile::resolve(line, Path::new("Procfile")) {
                Some(resolved) => {
                    info!(process_type = %line, command = %resolved, "RUNNER_COMMAND names a Procfile process type");
                    resolved
                }
                None => line.clone(),
            };
            let mut cmd = Command::new("sh");
            cmd.arg("-c").arg(line);
            cmd
        }
        ServerCommand::Argv(argv) => {
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..]);
            cmd
        }
    };
    for name in SECRET_ENV {
        cmd.env_remove(name);
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
    let (tx, exit) = watch::channel(None);
    tokio::spawn(async move {
        let status = child.wait().await.unwrap_or_else(|e| {
            warn!("cannot wait for the MCP server: {e}");
            std::os::unix::process::ExitStatusExt::from_raw(1 << 8)
        });
        let _ = tx.send(Some(status));
    });
    Ok(Server { stdin, stdout, pgid, exit, reaper, stopped: false })
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
        // The server is gone, so nothing new can be started below the runner
        // except by what is left there, which this kills pass after pass.
        reap::kill_descendants(Some(self.pgid)).await;
        self.stopped = true;
        status
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
            self.kill_group();
            // One pass, without waiting: a drop cannot await the rest.
            reap::kill_descendants_once(Some(self.pgid));
        }
    }
}
