//! A session's cgroups: limits on all of its processes together.
//!
//! One cgroup named [`session_group`] below the runner's own, in each
//! hierarchy that has a controller with a limit set (cgroup v1 mounts each
//! controller apart; v2 has one directory for all). The sandbox's first
//! process joins them before bubblewrap starts, so every process of the
//! session is inside: `pids.max` stops fork bombs across calls, the memory
//! limit bounds the session's processes and its tmpfs files together (the
//! kernel's OOM killer picks within the group), and the CPU quota keeps one
//! session from taking every core. Where a hierarchy cannot be written (an
//! unprivileged user without delegation), that limit is reported missing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dynogate_shared::cgroup::{Controller, Hierarchy, locate, session_group};

use crate::exec::cgroup::{kill_members, remove_tree};

/// How long removal keeps retrying while killed processes are reaped.
const REMOVE_PATIENCE: Duration = Duration::from_secs(5);
/// The CPU quota's period, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// Limits on one session, all of its processes together.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SessionLimits {
    pub processes: Option<u64>,
    /// Bytes of memory (including the session's tmpfs files).
    pub memory: Option<u64>,
    /// CPU cores' worth of time.
    pub cpus: Option<f64>,
}

/// The session's cgroup directories; removed (after killing what is left in
/// them) when dropped.
#[derive(Debug)]
pub struct SessionGroups {
    dirs: Vec<PathBuf>,
    /// The pids cgroup, where the executor makes one cgroup per command.
    pids: Option<PathBuf>,
}

/// What a session's limits came to on this machine.
#[derive(Debug, Default)]
pub struct Outcome {
    pub groups: Option<SessionGroups>,
    /// The limits that hold, for the log (`pids.max=512`, …).
    pub enforced: Vec<String>,
    /// Why a limit asked for does not hold.
    pub missing: Vec<String>,
    /// The limits asked for that no cgroup holds.
    pub unheld: SessionLimits,
}

impl SessionGroups {
    /// Makes the cgroups of the session served by the runner with `pid`.
    pub fn create(limits: &SessionLimits, pid: u32) -> Outcome {
        let mut outcome = Outcome::default();
        let (Ok(memberships), Ok(mounts)) =
            (std::fs::read_to_string("/proc/self/cgroup"), std::fs::read_to_string("/proc/self/mountinfo"))
        else {
            outcome.missing.push("cgroups: cannot read /proc/self/cgroup".into());
            outcome.unheld = *limits;
            return outcome;
        };
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut pids = None;
        for (controller, settings) in settings(limits) {
            if settings.is_empty() {
                continue;
            }
            let Some(hierarchy) = locate(&memberships, &mounts, controller) else {
                outcome.missing.push(format!("{}: no cgroup hierarchy", controller.name()));
                outcome.unhold(limits, controller);
                continue;
            };
            let dir = hierarchy.dir.join(session_group(pid));
            match make(&hierarchy, &dir, controller, &settings) {
                Ok(written) => {
                    outcome.enforced.extend(written);
                    if controller == Controller::Pids {
                        pids = Some(dir.clone());
                    }
                    if !dirs.contains(&dir) {
                        dirs.push(dir);
                    }
                }
                Err(e) => {
                    outcome.missing.push(format!("{}: {e}", controller.name()));
                    outcome.unhold(limits, controller);
                }
            }
        }
        if !dirs.is_empty() {
            outcome.groups = Some(SessionGroups { dirs, pids });
        }
        outcome
    }

    /// The directories the sandbox's first process joins.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Lets `uid` make cgroups below the session's pids cgroup and move its
    /// own processes into them: the executor then gives each command a
    /// cgroup of its own (killed with the call) even inside the sandbox.
    /// Returns the directory, to be made writable in the sandbox.
    pub fn delegate_pids(&self, uid: Option<u32>) -> Option<&Path> {
        let dir = self.pids.as_deref()?;
        if let Some(uid) = uid {
            for path in [dir.to_owned(), dir.join("cgroup.procs"), dir.join("cgroup.subtree_control")] {
                if path.exists()
                    && let Err(e) = std::os::unix::fs::chown(&path, Some(uid), Some(uid))
                {
                    tracing::debug!(path = %path.display(), "cannot delegate the session's pids cgroup: {e}");
                    return None;
                }
            }
        }
        Some(dir)
    }

    /// Kills every process in the session's cgroups.
    pub fn kill(&self) {
        for dir in &self.dirs {
            kill_members(dir);
        }
    }
}

impl Drop for SessionGroups {
    fn drop(&mut self) {
        self.kill();
        for dir in &self.dirs {
            remove_tree(dir, REMOVE_PATIENCE);
        }
    }
}

impl Outcome {
    /// Notes that `controller`'s part of `limits` holds through no cgroup.
    fn unhold(&mut self, limits: &SessionLimits, controller: Controller) {
        match controller {
            Controller::Pids => self.unheld.processes = limits.processes,
            Controller::Memory => self.unheld.memory = limits.memory,
            Controller::Cpu => self.unheld.cpus = limits.cpus,
        }
    }
}

/// The files each controller's limits are written to, as (file, value).
fn settings(limits: &SessionLimits) -> [(Controller, Vec<(&'static str, String)>); 3] {
    let pids = limits.processes.map(|n| vec![("pids.max", n.to_string())]).unwrap_or_default();
    let memory = limits.memory.map(|bytes| vec![("memory.max", bytes.to_string())]).unwrap_or_default();
    let cpu = limits
        .cpus
        .map(|cpus| vec![("cpu.max", format!("{} {CPU_PERIOD_US}", (cpus * CPU_PERIOD_US as f64).round() as u64))])
        .unwrap_or_default();
    [(Controller::Pids, pids), (Controller::Memory, memory), (Controller::Cpu, cpu)]
}

/// Creates `dir` and writes the limits in the hierarchy's own file names.
fn make(
    hierarchy: &Hierarchy,
    dir: &Path,
    controller: Controller,
    settings: &[(&'static str, String)],
) -> std::io::Result<Vec<String>> {
    if hierarchy.unified {
        // v2 gives a child a controller only when its parent enables it.
        let _ = std::fs::write(hierarchy.dir.join("cgroup.subtree_control"), format!("+{}", controller.name()));
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let mut written = Vec::new();
    for (file, value) in settings {
        for (name, value) in v1_names(hierarchy.unified, file, value) {
            std::fs::write(dir.join(name), &value)
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot set {name}: {e}")))?;
            written.push(format!("{name}={value}"));
        }
    }
    if hierarchy.unified && controller == Controller::Memory {
        // Without this, pages beyond the limit would go to swap, not fail.
        let _ = std::fs::write(dir.join("memory.swap.max"), "0");
    }
    Ok(written)
}

/// v2 file names and values as written in `hierarchy`: v1 names its files
/// differently (and splits `cpu.max` in two).
fn v1_names(unified: bool, file: &str, value: &str) -> Vec<(&'static str, String)> {
    match (unified, file) {
        (true, "pids.max") | (false, "pids.max") => vec![("pids.max", value.to_owned())],
        (true, "memory.max") => vec![("memory.max", value.to_owned())],
        (false, "memory.max") => vec![("memory.limit_in_bytes", value.to_owned())],
        (true, "cpu.max") => vec![("cpu.max", value.to_owned())],
        (false, "cpu.max") => {
            let (quota, period) = value.split_once(' ').unwrap_or((value, "100000"));
            vec![("cpu.cfs_period_us", period.to_owned()), ("cpu.cfs_quota_us", quota.to_owned())]
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_become_each_hierarchys_own_files() {
        let limits = SessionLimits { processes: Some(64), memory: Some(1 << 30), cpus: Some(1.5) };
        let [(_, pids), (_, memory), (_, cpu)] = settings(&limits);
        assert_eq!(pids, [("pids.max", "64".to_owned())]);
        assert_eq!(memory, [("memory.max", "1073741824".to_owned())]);
        assert_eq!(cpu, [("cpu.max", "150000 100000".to_owned())]);
        assert_eq!(
            v1_names(false, "cpu.max", "150000 100000"),
            [("cpu.cfs_period_us", "100000".to_owned()), ("cpu.cfs_quota_us", "150000".to_owned())]
        );
        assert_eq!(v1_names(false, "memory.max", "5"), [("memory.limit_in_bytes", "5".to_owned())]);
        assert_eq!(v1_names(true, "memory.max", "5"), [("memory.max", "5".to_owned())]);
    }

    #[test]
    fn no_limits_no_groups() {
        let outcome = SessionGroups::create(&SessionLimits::default(), std::process::id());
        assert!(outcome.groups.is_none());
        assert!(outcome.enforced.is_empty() && outcome.missing.is_empty());
    }
}
