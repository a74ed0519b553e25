//! Running one command for the executor.
//!
//! Each command runs in a process group of its own with stdin closed, an
//! environment built from scratch (see [`super::env`]), and, when it has
//! limits, through `runner limit` ([`super::limits`]) and in a pids cgroup of
//! its own when the machine allows one ([`super::cgroup`]); a shim that
//! joined its cgroup ahead of time takes the command when one is waiting
//! ([`super::primed`]). When it finishes,
//! times out, is cancelled, or the executor exits, the whole group (and
//! cgroup) is killed, so nothing it forked survives; without a cgroup, in
//! the sandbox, what left the group is ended once no command runs
//! ([`Supervisor::sweeping_when_idle`]). Output is bounded: past
//! the limit only the head and the tail are kept, with a note of how many
//! bytes were left out.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::cgroup::{self, CommandGroup, PidsRoot};
use super::limits::{self, Limits, ProcessCap};
use super::primed::{self, PrimedJob};

/// Starts commands with their limits and keeps track of the ones running, so
/// that the executor can kill them all when it exits. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Supervisor {
    inner: Arc<SupervisorInner>,
}

#[derive(Debug)]
struct SupervisorInner {
    /// `runner limit`; without it commands run without limits.
    shim: Option<PathBuf>,
    pids: Option<PidsRoot>,
    /// Commands still running, by an id of their own; `None` once shut down,
    /// so a command started after [`Supervisor::shut_down`] is killed at once.
    /// A std mutex: it is held for one map operation and never across an `.await`.
    running: Mutex<Option<HashMap<u64, Running>>>,
    next: AtomicU64,
    /// A shim waiting in its own cgroup for the next command.
    spare: Mutex<Option<Spare>>,
    /// Ends every other process this executor sees once no command runs
    /// (see [`Supervisor::sweeping_when_idle`]).
    sweep_idle: bool,
}

/// `runner limit --job-from-stdin`, started ahead of its command.
#[derive(Debug)]
struct Spare {
    child: Child,
    group: CommandGroup,
    /// The `pids.max` its cgroup was made with.
    max: u64,
}

#[derive(Debug)]
struct Running {
    pgid: i32,
    cgroup: Option<PathBuf>,
    /// Runs code (it has limits), as opposed to one of the executor's own
    /// helpers (toolchain probes, making the venv).
    code: bool,
}

impl Supervisor {
    /// A supervisor that applies limits through `shim` (this binary) and, if
    /// `pids` is given, caps processes with a cgroup per command.
    pub fn new(shim: PathBuf, pids: Option<PidsRoot>) -> Self {
        Self::build(Some(shim), pids)
    }

    /// A supervisor that ignores limits (for tests and discovery).
    pub fn unlimited() -> Self {
        Self::build(None, None)
    }

    fn build(shim: Option<PathBuf>, pids: Option<PidsRoot>) -> Self {
        Supervisor {
            inner: Arc::new(SupervisorInner {
                shim,
                pids,
                running: Mutex::new(Some(HashMap::new())),
                next: AtomicU64::new(0),
                spare: Mutex::new(None),
                sweep_idle: false,
            }),
        }
    }

    /// A supervisor that also kills every process it can see other than
    /// itself, its ancestors and its helpers' process groups whenever no
    /// command running code is left: for an executor alone in its session's
    /// PID namespace without a cgroup per command, where a command's
    /// detached processes (`setsid`, a double fork) cannot be told from
    /// another's while several run, but all are leftovers once none does.
    pub fn sweeping_when_idle(shim: PathBuf) -> Self {
        let mut supervisor = Self::build(Some(shim), None);
        Arc::get_mut(&mut supervisor.inner).expect("not shared yet").sweep_idle = true;
        supervisor
    }

    /// Whether process caps hold here: a cgroup per command, or RLIMIT_NPROC
    /// for a user it binds (it does not bind root).
    pub fn caps_processes(&self) -> bool {
        self.inner.pids.is_some() || !nix::unistd::geteuid().is_root()
    }

    pub fn uses_cgroups(&self) -> bool {
        self.inner.pids.is_some()
    }

    /// Kills every command still running and any started later: the calls
    /// running them end at once (killed), and none can start another.
    pub fn shut_down(&self) {
        // First, so no spare is started after the one taken below.
        let running = self.inner.running.lock().expect("running lock").take().unwrap_or_default();
        // Killed (and its cgroup removed) as it drops.
        drop(self.inner.spare.lock().expect("spare lock").take());
        for command in running.into_values() {
            kill_group(command.pgid);
            if let Some(dir) = command.cgroup {
                cgroup::kill_members(&dir);
            }
        }
    }

    /// Starts a shim for commands capped at `max` processes, so the first
    /// command finds one waiting in its cgroup.
    pub fn prime(&self, max: Option<u64>) {
        if let (Some(shim), Some(pids), Some(max)) = (&self.inner.shim, &self.inner.pids, max) {
            self.keep_spare(shim, pids, max);
        }
    }

    /// Starts a spare unless one is waiting already.
    fn keep_spare(&self, shim: &Path, pids: &PidsRoot, max: u64) {
        let mut slot = self.inner.spare.lock().expect("spare lock");
        if slot.is_none() && self.inner.running.lock().expect("running lock").is_some() {
            match spawn_spare(shim, pids, max) {
                Ok(spare) => *slot = Some(spare),
                Err(e) => tracing::debug!("cannot start a spare shim: {e}"),
            }
        }
    }

    /// Runs `job` to completion or to its deadline.
    pub async fn run(&self, job: &Job) -> std::io::Result<Output> {
        if self.inner.running.lock().expect("running lock").is_none() {
            // Checked again once started, for a shut-down that comes meanwhile.
            return Err(shutting_down());
        }
        let started = std::time::Instant::now();
        let (mut child, cgroup, id, pgid, admitted) = match self.primed_cap(job) {
            Some((shim, pids, max)) => {
                let (child, cgroup) = self.start_primed(job, shim, pids, max).await?;
                let (id, pgid, admitted) = self.register(job, &child, cgroup.as_ref());
                (child, cgroup, id, pgid, admitted)
            }
            None => {
                let (program, prefix, cgroup) = self.wrap(job)?;
                let mut command = Command::new(program);
                command
                    .args(prefix)
                    .args(&job.args)
                    .current_dir(&job.cwd)
                    .env_clear()
                    .envs(job.env.iter().map(|(k, v)| (k, v)))
                    .stdin(Stdio::null());
                // Started and registered under one hold of the lock an idle
                // sweep takes too, so no sweep meets it started but unknown.
                let running = self.inner.running.lock().expect("running lock");
                let child = spawn_watched(&mut command)?;
                let (id, pgid, admitted) = self.register_in(running, job, &child, cgroup.as_ref());
                (child, cgroup, id, pgid, admitted)
            }
        };
        let _guard = RunningGuard { supervisor: self.clone(), id, pgid, _cgroup: cgroup };
        if !admitted {
            // Started while the executor shuts down: the guard kills it.
            return Err(shutting_down());
        }
        let stdout = capture(child.stdout.take(), job.max_output);
        let stderr = capture(child.stderr.take(), job.max_output);
        // Like `subprocess.run(capture_output=True)`: the command is over when
        // it has exited and its output pipes have closed.
        let finished =
            tokio::time::timeout_at(job.deadline, async { tokio::join!(child.wait(), stdout, stderr) }).await;
        match finished {
            Ok((status, stdout, stderr)) => {
                use std::os::unix::process::ExitStatusExt;
                let status = status?;
                let code = status.code().unwrap_or_else(|| -status.signal().unwrap_or(0));
                tracing::debug!(program = %job.program.display(), code, elapsed = ?started.elapsed(), "command finished");
                Ok(Output { code, stdout: stdout?, stderr: stderr?, timed_out: false })
            }
            Err(_) => {
                kill_group(pgid);
                let _ = child.wait().await;
                Ok(Output { code: -2, stdout: String::new(), stderr: String::new(), timed_out: true })
            }
        }
    }

    /// Records a started command: its id, its process group, and whether it
    /// was admitted (not when the executor is shutting down).
    fn register(&self, job: &Job, child: &Child, cgroup: Option<&CommandGroup>) -> (u64, i32, bool) {
        self.register_in(self.inner.running.lock().expect("running lock"), job, child, cgroup)
    }

    fn register_in(
        &self,
        mut running: std::sync::MutexGuard<'_, Option<HashMap<u64, Running>>>,
        job: &Job,
        child: &Child,
        cgroup: Option<&CommandGroup>,
    ) -> (u64, i32, bool) {
        let pgid = i32::try_from(child.id().unwrap_or_default()).expect("pids fit in i32");
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let entry = Running { pgid, cgroup: cgroup.map(|group| group.dir().to_owned()), code: job.limits.is_some() };
        let admitted = running.as_mut().is_some_and(|running| running.insert(id, entry).is_none());
        (id, pgid, admitted)
    }

    /// When `job` gets a cgroup of its own: the shim, the pids root and its cap.
    fn primed_cap(&self, job: &Job) -> Option<(&Path, &PidsRoot, u64)> {
        let limits = job.limits.as_ref()?;
        Some((self.inner.shim.as_deref()?, self.inner.pids.as_ref()?, limits.processes?))
    }

    /// Hands `job` to the waiting spare (or a new one if none waits, or the
    /// one waiting died), and starts the next spare.
    async fn start_primed(
        &self,
        job: &Job,
        shim: &Path,
        pids: &PidsRoot,
        max: u64,
    ) -> std::io::Result<(Child, Option<CommandGroup>)> {
        let limits = job.limits.unwrap_or_default();
        let mut argv = vec![job.program.clone().into_os_string()];
        argv.extend(job.args.iter().cloned());
        let bytes = primed::encode(&PrimedJob {
            argv,
            env: job.env.iter().map(|(k, v)| (OsString::from(k), v.clone())).collect(),
            cwd: job.cwd.clone(),
            data: limits.memory,
            cpu: limits.cpu_seconds,
            nproc: None,
            fsize: limits.file_size,
        });
        let waiting = self.inner.spare.lock().expect("spare lock").take();
        let mut last_error = None;
        for spare in [waiting, None] {
            let mut spare = match spare {
                Some(spare) => spare,
                None => spawn_spare(shim, pids, max)?,
            };
            if spare.max != max {
                std::fs::write(spare.group.dir().join("pids.max"), max.to_string())?;
            }
            let mut stdin = spare.child.stdin.take().expect("the spare's stdin is piped");
            let sent = tokio::time::timeout_at(job.deadline, stdin.write_all(&bytes)).await;
            drop(stdin);
            match sent {
                Ok(Ok(())) => {
                    self.keep_spare(shim, pids, max);
                    return Ok((spare.child, Some(spare.group)));
                }
                // Killed while it waited (by code of the same user): use a fresh one.
                Ok(Err(e)) => last_error = Some(e),
                Err(_) => {
                    return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the command did not start in time"));
                }
            }
        }
        Err(last_error.unwrap_or_else(|| std::io::Error::other("no shim took the command")))
    }

    /// The program to start, the arguments before the job's own, and the
    /// command's cgroup if it gets one.
    fn wrap(&self, job: &Job) -> std::io::Result<(PathBuf, Vec<OsString>, Option<CommandGroup>)> {
        let (Some(shim), Some(limits)) = (&self.inner.shim, &job.limits) else {
            return Ok((job.program.clone(), Vec::new(), None));
        };
        let (cap, cgroup) = match (limits.processes, &self.inner.pids) {
            (None, _) => (ProcessCap::None, None),
            (Some(max), Some(pids)) => {
                let group = pids.command_group(max)?;
                (ProcessCap::Cgroup(group.dir().to_owned()), Some(group))
            }
            (Some(max), None) => (ProcessCap::Nproc(limits::user_tasks() + max), None),
        };
        let mut prefix = limits::shim_args(limits, &cap);
        prefix.push(job.program.clone().into_os_string());
        Ok((shim.clone(), prefix, cgroup))
    }
}

/// Starts `runner limit --cgroup DIR --job-from-stdin` in a new cgroup
/// capped at `max`: it joins the cgroup, then waits for its job.
fn spawn_spare(shim: &Path, pids: &PidsRoot, max: u64) -> std::io::Result<Spare> {
    let group = pids.command_group(max)?;
    let mut command = Command::new(shim);
    command
        .arg("limit")
        .arg("--cgroup")
        .arg(group.dir())
        .arg("--job-from-stdin")
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::piped());
    Ok(Spare { child: spawn_watched(&mut command)?, group, max })
}

/// Starts a command the way every command runs: output captured, a process
/// group of its own (so it can be killed whole), killed if dropped.
fn spawn_watched(command: &mut Command) -> std::io::Result<Child> {
    command.stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).kill_on_drop(true).spawn()
}

/// Forgets a finished command and kills what is left of it: on completion,
/// timeout, or when the future running it is dropped (cancellation).
struct RunningGuard {
    supervisor: Supervisor,
    id: u64,
    pgid: i32,
    /// Dropped after the group is killed: kills and removes the cgroup.
    _cgroup: Option<CommandGroup>,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        let inner = &self.supervisor.inner;
        let mut running = inner.running.lock().expect("running lock");
        // The process groups of the helpers still running, when no command
        // running code is left: then everything else is left over.
        let helpers = running.as_mut().and_then(|running| {
            running.remove(&self.id);
            (inner.sweep_idle && !running.values().any(|command| command.code))
                .then(|| running.values().map(|helper| helper.pgid).collect::<Vec<_>>())
        });
        kill_group(self.pgid);
        if let Some(helpers) = helpers {
            // Held: no command starts while this runs.
            sweep_leftovers(&helpers);
        }
        drop(running);
    }
}

/// How long a sweep waits for what it killed to be reaped.
const SWEEP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// SIGKILLs every process visible here but this one, its ancestors and the
/// process groups of `helpers`: in the session's PID namespace, with no
/// command running code, everything else is what commands left behind. The namespace's init reaps them; until it
/// has, they still count against the session's process cap, so the sweep
/// waits for that (bounded) and the next command, which waits for the
/// sweep, finds room.
fn sweep_leftovers(helpers: &[i32]) {
    let me = std::process::id().cast_signed();
    let table = crate::reap::processes();
    let mut keep = vec![me];
    let mut at = me;
    // (A torn read of a changing table could hold a cycle: each pid once.)
    while let Some(parent) = table.iter().find(|s| s.pid == at).map(|s| s.ppid).filter(|p| *p > 0 && !keep.contains(p))
    {
        keep.push(parent);
        at = parent;
    }
    let mut swept: Vec<Pid> = Vec::new();
    for stat in table.iter().filter(|s| !keep.contains(&s.pid) && !helpers.contains(&s.pgrp)) {
        let pid = Pid::from_raw(stat.pid);
        if stat.zombie || nix::sys::signal::kill(pid, Signal::SIGKILL).is_ok() {
            swept.push(pid);
        }
    }
    if swept.is_empty() {
        return;
    }
    let deadline = std::time::Instant::now() + SWEEP_PATIENCE;
    while swept.iter().any(|pid| nix::sys::signal::kill(*pid, None).is_ok()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    tracing::debug!(swept = swept.len(), "ended what finished commands left running");
}

fn shutting_down() -> std::io::Error {
    std::io::Error::other("the executor is shutting down")
}

fn kill_group(pgid: i32) {
    // Group ids are not reused while a member lives, and pids are handed out
    // cyclically, so this cannot reach a stranger's processes.
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
}

/// A command to run.
#[derive(Debug, Clone)]
pub struct Job {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub cwd: PathBuf,
    pub env: Vec<(String, OsString)>,
    /// When the command is killed and reported as timed out.
    pub deadline: Instant,
    pub max_output: usize,
    /// Limits to apply; `None` for the executor's own helpers.
    pub limits: Option<Limits>,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Exit code, or minus the signal number (as Python's `subprocess` reports it).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl Output {
    /// A command that did not need to run.
    pub fn skipped() -> Output {
        Output { code: 0, stdout: String::new(), stderr: String::new(), timed_out: false }
    }

    /// A command that could not run because its program is missing (the
    /// shell's exit code for "command not found").
    pub fn not_installed(program: &str) -> Output {
        Output {
            code: 127,
            stdout: String::new(),
            stderr: format!("{program} is not installed on this machine"),
            timed_out: false,
        }
    }
}

/// Reads a pipe to its end, keeping at most `max` bytes: the first and last
/// halves, with a note of what was left out between them.
async fn capture<R: AsyncRead + Unpin>(pipe: Option<R>, max: usize) -> std::io::Result<String> {
    let Some(mut pipe) = pipe else {
        return Ok(String::new());
    };
    let half = max / 2;
    let mut head = Vec::new();
    let mut tail = std::collections::VecDeque::new();
    let mut total = 0usize;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = pipe.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        total += n;
        let mut data = &chunk[..n];
        if head.len() < half {
            let take = (half - head.len()).min(data.len());
            head.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        let room = max - half;
        if data.len() >= room {
            tail.clear();
            tail.extend(&data[data.len() - room..]);
        } else {
            tail.extend(data);
            let excess = tail.len().saturating_sub(room);
            tail.drain(..excess);
        }
    }
    let kept = head.len() + tail.len();
    let mut text = String::from_utf8_lossy(&head).into_owned();
    if total > kept {
        text.push_str(&format!("\n[... {} bytes omitted ...]\n", total - kept));
    }
    text.push_str(&String::from_utf8_lossy(tail.make_contiguous()));
    Ok(text)
}

/// Finds `name` on `PATH`, as a shell would.
pub fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Whether `path` exists (for venv checks), without following errors.
pub fn exists(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn job(script: &str, timeout: Duration) -> Job {
        Job {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            cwd: std::env::temp_dir(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            deadline: Instant::now() + timeout,
            max_output: 1000,
            limits: None,
        }
    }

    async fn run(job: &Job) -> Output {
        Supervisor::unlimited().run(job).await.unwrap()
    }

    #[tokio::test]
    async fn captures_exit_code_and_both_streams() {
        let out = run(&job("echo out; echo err >&2; exit 3", Duration::from_secs(10))).await;
        assert_eq!(out, Output { code: 3, stdout: "out\n".into(), stderr: "err\n".into(), timed_out: false });
    }

    /// Whether a process is gone (or a zombie, which is dead but not yet reaped).
    fn gone(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        }
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild");
        let script = format!("sleep 30 & echo $! > {}; sleep 30", pidfile.display());
        let started = std::time::Instant::now();
        let out = run(&job(&script, Duration::from_millis(300))).await;
        assert!(out.timed_out);
        assert_eq!(out.code, -2);
        assert!(started.elapsed() < Duration::from_secs(5));
        let grandchild: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !gone(grandchild) {
            assert!(std::time::Instant::now() < deadline, "grandchild {grandchild} survived the timeout");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn long_output_keeps_head_and_tail() {
        let out = run(&job("yes x | head -c 5000; printf END", Duration::from_secs(10))).await;
        assert!(out.stdout.starts_with("x\nx\n"));
        assert!(out.stdout.ends_with("END"), "{}", &out.stdout[out.stdout.len() - 20..]);
        assert!(out.stdout.contains("[... 4003 bytes omitted ...]"), "{}", out.stdout);
        assert!(out.stdout.len() < 1100);
    }

    #[tokio::test]
    async fn signals_are_reported_as_negative_codes() {
        let out = run(&job("kill -9 $$", Duration::from_secs(10))).await;
        assert_eq!(out.code, -9);
    }

    #[tokio::test]
    async fn shut_down_stops_running_commands_and_refuses_new_ones() {
        let supervisor = Supervisor::unlimited();
        let running = {
            let supervisor = supervisor.clone();
            tokio::spawn(async move { supervisor.run(&job("sleep 30", Duration::from_secs(60))).await })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while supervisor.inner.running.lock().unwrap().as_ref().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "the command never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        supervisor.shut_down();
        let out = running.await.unwrap().unwrap();
        assert_eq!(out.code, -9);
        let refused = supervisor.run(&job("echo late", Duration::from_secs(10))).await;
        assert!(refused.is_err(), "a command started after shut_down ran: {refused:?}");
    }
}
