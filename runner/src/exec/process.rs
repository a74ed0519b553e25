//! Running one command for the executor.
//!
//! Each command runs in a process group of its own with stdin closed and an
//! environment built from scratch (see [`super::env`]). When it times out, is
//! cancelled, or the executor exits, the whole group is killed, so nothing it
//! forked survives. Output is bounded: past the limit only the head and the
//! tail are kept, with a note of how many bytes were left out.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

/// The process groups of commands still running, so the executor can kill
/// them all when it exits. A std mutex: it is held for one set operation and
/// never across an `.await`.
#[derive(Debug, Clone, Default)]
pub struct Groups(Arc<Mutex<HashSet<i32>>>);

impl Groups {
    /// Kills every group still registered.
    pub fn kill_all(&self) {
        let groups: Vec<i32> = self.0.lock().expect("groups lock").drain().collect();
        for pgid in groups {
            kill_group(pgid);
        }
    }
}

/// Kills a registered group when dropped: on completion, timeout, or when the
/// future running the command is cancelled.
struct GroupGuard {
    groups: Groups,
    pgid: i32,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.groups.0.lock().expect("groups lock").remove(&self.pgid);
        kill_group(self.pgid);
    }
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
    pub timeout: Duration,
    pub max_output: usize,
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

/// Runs `job` to completion or timeout.
pub async fn run(job: &Job, groups: &Groups) -> std::io::Result<Output> {
    let mut command = Command::new(&job.program);
    command
        .args(&job.args)
        .current_dir(&job.cwd)
        .env_clear()
        .envs(job.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn()?;
    let pgid = i32::try_from(child.id().unwrap_or_default()).expect("pids fit in i32");
    groups.0.lock().expect("groups lock").insert(pgid);
    let _guard = GroupGuard { groups: groups.clone(), pgid };
    let stdout = capture(child.stdout.take(), job.max_output);
    let stderr = capture(child.stderr.take(), job.max_output);
    // Like `subprocess.run(capture_output=True)`: the command is over when
    // it has exited and its output pipes have closed.
    let finished = tokio::time::timeout(job.timeout, async { tokio::join!(child.wait(), stdout, stderr) }).await;
    match finished {
        Ok((status, stdout, stderr)) => {
            use std::os::unix::process::ExitStatusExt;
            let status = status?;
            let code = status.code().unwrap_or_else(|| -status.signal().unwrap_or(0));
            Ok(Output { code, stdout: stdout?, stderr: stderr?, timed_out: false })
        }
        Err(_) => {
            kill_group(pgid);
            let _ = child.wait().await;
            Ok(Output { code: -2, stdout: String::new(), stderr: String::new(), timed_out: true })
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
        tail.extend(data);
        let excess = tail.len().saturating_sub(max - half);
        tail.drain(..excess);
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
    use super::*;

    fn job(script: &str, timeout: Duration) -> Job {
        Job {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            cwd: std::env::temp_dir(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            timeout,
            max_output: 1000,
        }
    }

    #[tokio::test]
    async fn captures_exit_code_and_both_streams() {
        let out =
            run(&job("echo out; echo err >&2; exit 3", Duration::from_secs(10)), &Groups::default()).await.unwrap();
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
        let out = run(&job(&script, Duration::from_millis(300)), &Groups::default()).await.unwrap();
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
        let out =
            run(&job("yes x | head -c 5000; printf END", Duration::from_secs(10)), &Groups::default()).await.unwrap();
        assert!(out.stdout.starts_with("x\nx\n"));
        assert!(out.stdout.ends_with("END"), "{}", &out.stdout[out.stdout.len() - 20..]);
        assert!(out.stdout.contains("bytes omitted"));
        assert!(out.stdout.len() < 1100);
    }

    #[tokio::test]
    async fn signals_are_reported_as_negative_codes() {
        let out = run(&job("kill -9 $$", Duration::from_secs(10)), &Groups::default()).await.unwrap();
        assert_eq!(out.code, -9);
    }
}
