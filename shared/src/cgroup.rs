//! Where a process's cgroups are, read from `/proc/self/cgroup` and
//! `/proc/self/mountinfo` (given as text: no I/O here), and what a session's
//! cgroups are called.
//!
//! The runner makes one cgroup per session in each hierarchy it can write;
//! the local spawner removes them after the runner has exited however it
//! ended, so both sides name them with [`session_group`].

use std::path::{Path, PathBuf};

/// The controllers a session is limited by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    Pids,
    Memory,
    Cpu,
}

impl Controller {
    pub const ALL: [Controller; 3] = [Controller::Pids, Controller::Memory, Controller::Cpu];

    /// The controller's name in `/proc/self/cgroup` and mount options.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Pids => "pids",
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
        }
    }
}

/// A directory of this process's cgroup that a controller governs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub dir: PathBuf,
    /// cgroup v2 (one unified tree, controllers enabled per level) or v1.
    pub unified: bool,
}

/// The name of a session's cgroup, below the runner's own, in every hierarchy.
pub fn session_group(runner_pid: u32) -> String {
    format!("dynogate-session-{runner_pid}")
}

/// This process's cgroup directory for `controller`: its v1 hierarchy when
/// that is mounted, else the v2 unified one (whether the controller is
/// available there is for the caller to find out by using it).
pub fn locate(memberships: &str, mounts: &str, controller: Controller) -> Option<Hierarchy> {
    let mut v1_path = None;
    let mut v2_path = None;
    for line in memberships.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if controllers.split(',').any(|c| c == controller.name()) {
            v1_path = Some(path);
        } else if controllers.is_empty() {
            v2_path = Some(path);
        }
    }
    for line in mounts.lines() {
        // `id parent major:minor root mount-point options [optional…] - fstype source super-options`
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(mount_point)) = (left.get(3), left.get(4)) else { continue };
        let (fstype, options) = (right.first().copied(), right.get(2).copied().unwrap_or(""));
        let (path, unified) = match fstype {
            Some("cgroup") if options.split(',').any(|o| o == controller.name()) => (v1_path, false),
            Some("cgroup2") if v1_path.is_none() => (v2_path, true),
            _ => continue,
        };
        if let Some(path) = path {
            // A mount may show only part of the hierarchy (its `root`).
            let inside = path.strip_prefix(root).unwrap_or(path).trim_start_matches('/');
            return Some(Hierarchy { dir: Path::new(mount_point).join(inside), unified });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
35 25 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 25 0:32 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
37 25 0:33 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
40 25 0:36 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";

    #[test]
    fn v1_hierarchies_win_per_controller() {
        let memberships = "8:pids:/user/1000\n4:memory:/x\n3:cpu,cpuacct:/y\n0::/";
        let dir = |c| locate(memberships, MOUNTS, c).map(|h| (h.dir, h.unified));
        assert_eq!(dir(Controller::Pids), Some(("/sys/fs/cgroup/pids/user/1000".into(), false)));
        assert_eq!(dir(Controller::Memory), Some(("/sys/fs/cgroup/memory/x".into(), false)));
        assert_eq!(dir(Controller::Cpu), Some(("/sys/fs/cgroup/cpu,cpuacct/y".into(), false)));
    }

    #[test]
    fn v2_alone_is_used_when_there_is_no_v1_hierarchy() {
        let mounts = "30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate";
        for controller in Controller::ALL {
            assert_eq!(
                locate("0::/user.slice/session-1.scope", mounts, controller),
                Some(Hierarchy { dir: "/sys/fs/cgroup/user.slice/session-1.scope".into(), unified: true })
            );
        }
    }

    #[test]
    fn a_mount_of_part_of_the_hierarchy_is_followed() {
        let mounts = "36 25 0:32 /docker/abc /sys/fs/cgroup/pids ro - cgroup cgroup rw,pids";
        let found = locate("3:pids:/docker/abc/inner", mounts, Controller::Pids).unwrap();
        assert_eq!(found.dir, PathBuf::from("/sys/fs/cgroup/pids/inner"));
        assert_eq!(locate("3:cpu:/", "36 25 0:32 / /x rw - cgroup cgroup rw,cpu", Controller::Pids), None);
    }

    #[test]
    fn session_groups_are_named_by_runner() {
        assert_eq!(session_group(42), "dynogate-session-42");
    }
}
