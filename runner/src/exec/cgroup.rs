//! A pids cgroup per command, when this machine lets the executor make one.
//!
//! The executor makes `dynogate-exec-<pid>` under its own cgroup in the pids
//! hierarchy (cgroup v1's `pids` controller, or v2 with `pids` available) and
//! one child per command with `pids.max` set; `runner limit --cgroup` moves
//! the command into it before exec. Unlike RLIMIT_NPROC this counts only that
//! command's processes and threads, binds root too, and `cgroup.procs` lists
//! every process the command started, even one that left its process group
//! with `setsid`, so killing the command really kills all of it.
//!
//! Where cgroups are read-only (an unprivileged user, a Heroku dyno), there is
//! no pids root and the executor falls back to RLIMIT_NPROC ([`super::limits`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Where a sandboxed executor makes its cgroups: a pids cgroup of the
/// session's, delegated to the session's user.
pub const DELEGATED_ENV: &str = "EXEC_PIDS_CGROUP";

/// How long removing a command's cgroup may keep retrying while the
/// processes just killed are reaped.
const REMOVE_PATIENCE: Duration = Duration::from_secs(5);

/// The executor's own cgroup in the pids hierarchy, parent of one cgroup per command.
#[derive(Debug)]
pub struct PidsRoot {
    dir: PathBuf,
    next: AtomicU64,
}

impl PidsRoot {
    /// Makes the executor's cgroup; `None` when this machine does not allow it.
    /// In a sandbox the runner hands the executor a pids cgroup of the
    /// session's to make it under ([`DELEGATED_ENV`]), since the executor's
    /// own cgroup is not writable there.
    pub fn create() -> Option<PidsRoot> {
        let parent = match std::env::var_os(DELEGATED_ENV).filter(|dir| !dir.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => {
                let parent = locate()?;
                remove_stale(&parent);
                parent
            }
        };
        let dir = parent.join(format!("dynogate-exec-{}", std::process::id()));
        if std::fs::create_dir(&dir).is_err() && !dir.is_dir() {
            return None;
        }
        // cgroup v2 only gives children a controller that the parent enables;
        // v1 has no such file and needs nothing.
        let _ = std::fs::write(dir.join("cgroup.subtree_control"), "+pids");
        let root = PidsRoot { dir, next: AtomicU64::new(0) };
        match root.command_group(1) {
            Ok(probe) => drop(probe),
            Err(e) => {
                tracing::debug!("no pids cgroup for commands: {e}");
                return None;
            }
        }
        Some(root)
    }

    /// A root at `dir`, made if missing, without looking at the machine's
    /// cgroups: for tests, which use a plain directory to see what the
    /// executor writes there.
    pub fn at(dir: PathBuf) -> io::Result<PidsRoot> {
        std::fs::create_dir_all(&dir)?;
        Ok(PidsRoot { dir, next: AtomicU64::new(0) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new cgroup for one command, allowing at most `max` processes and threads.
    pub fn command_group(&self, max: u64) -> io::Result<CommandGroup> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(format!("run-{n}"));
        std::fs::create_dir(&dir)?;
        let group = CommandGroup { dir };
        std::fs::write(group.dir.join("pids.max"), max.to_string())?;
        Ok(group)
    }
}

impl Drop for PidsRoot {
    fn drop(&mut self) {
        remove_tree(&self.dir, Duration::from_millis(500));
    }
}

/// One command's cgroup. Dropping it kills whatever is still in it and
/// removes it.
#[derive(Debug)]
pub struct CommandGroup {
    dir: PathBuf,
}

impl CommandGroup {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills every process in the group.
    pub fn kill(&self) {
        kill_members(&self.dir);
    }
}

impl Drop for CommandGroup {
    fn drop(&mut self) {
        self.kill();
        if std::fs::remove_dir(&self.dir).is_ok() {
            return;
        }
        // Killed processes leave the group only once they are reaped, which
        // happens elsewhere (tokio, or init for orphans): retry for a while.
        let dir = self.dir.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let deadline = tokio::time::Instant::now() + REMOVE_PATIENCE;
                    while tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        kill_members(&dir);
                        if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                            return;
                        }
                    }
                    tracing::debug!(cgroup = %dir.display(), "cgroup still busy; left for the executor's exit");
                });
            }
            Err(_) => remove_tree(&dir, Duration::from_millis(200)),
        }
    }
}

/// SIGKILLs every process listed in a cgroup until none is left (a process
/// may fork while the list is read, so this goes round until it is empty).
pub fn kill_members(dir: &Path) {
    // cgroup v2 (Linux 5.14+) kills the whole group atomically. Opened, not
    // created: where there is no such file there is nothing to write.
    let killed = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.kill"))
        .and_then(|mut file| std::io::Write::write_all(&mut file, b"1"));
    if killed.is_ok() {
        return;
    }
    for _ in 0..100 {
        let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else { return };
        let pids: Vec<i32> = procs.lines().filter_map(|l| l.trim().parse().ok()).collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Removes a cgroup and every cgroup below it, killing what is still in
/// them and retrying for up to `patience` each while killed processes are
/// reaped. Gone already counts as removed.
pub fn remove_tree(dir: &Path, patience: Duration) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path(), patience);
            }
        }
    }
    let deadline = std::time::Instant::now() + patience;
    loop {
        kill_members(dir);
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if std::time::Instant::now() >= deadline => {
                tracing::debug!(cgroup = %dir.display(), "cgroup still busy: {e}");
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Removes the cgroups of executors that are gone: one killed outright
/// (SIGKILL, a runner's process group killed) cannot remove its own.
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("dynogate-exec-")).and_then(|p| p.parse().ok())
        else {
            continue;
        };
        if kill(Pid::from_raw(pid), None) == Err(nix::errno::Errno::ESRCH) {
            remove_tree(&entry.path(), Duration::from_millis(100));
        }
    }
}

/// This process's cgroup directory in a hierarchy that has the pids controller.
fn locate() -> Option<PathBuf> {
    let memberships = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    dynogate_shared::cgroup::locate(&memberships, &mounts, dynogate_shared::cgroup::Controller::Pids)
        .map(|hierarchy| hierarchy.dir)
        .filter(|dir| dir.is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroups_of_executors_that_are_gone_are_removed_and_others_kept() {
        let parent = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let names = [format!("dynogate-exec-{dead}"), format!("dynogate-exec-{}", std::process::id()), "other".into()];
        for name in &names {
            std::fs::create_dir(parent.path().join(name)).unwrap();
        }
        remove_stale(parent.path());
        let left: Vec<bool> = names.iter().map(|n| parent.path().join(n).exists()).collect();
        assert_eq!(left, [false, true, true]);
    }
}
