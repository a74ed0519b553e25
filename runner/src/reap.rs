//! Making sure no process the runner started outlives it.
//!
//! Killing the MCP server's process group is not enough: the executor puts
//! every command in a group of its own, and any code can leave its group
//! (`setsid`) and its parent (a double fork). What a process cannot leave is
//! the runner's subtree, because the runner is a child subreaper
//! ([`become_subreaper`]): an orphan anywhere below it is handed to the runner
//! instead of to init. So at the end [`kill_descendants`] kills whatever is
//! still below the runner, and reaps it, until nothing is left. While the
//! session runs, [`reap_orphans`] collects the orphans that exit, which would
//! otherwise stay zombies of the runner for the session's whole life.
//!
//! The process tree is read from `/proc`. This module owns no process: the
//! MCP server itself belongs to tokio, which waits for it by pid, so it is
//! never waited for here (`waitpid(-1)` would steal its exit status).

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use tokio::time::Instant;
use tracing::{debug, warn};

/// How long the final sweep may take. The gateway gives a runner 5 s after
/// the session ends (then SIGTERM, 4 s more) and the server's grace comes
/// first, so this stays well inside what is left.
pub const SWEEP_DEADLINE: Duration = Duration::from_secs(2);
/// Between two passes of the sweep: long enough for killed processes to die
/// and their orphans to be reparented, short enough not to slow the session's end.
const SWEEP_PAUSE: Duration = Duration::from_millis(10);
/// At most one reaping pass per this interval while the session runs: a
/// program that keeps orphaning short-lived processes costs one `/proc` scan
/// a second, not one per exit.
const REAP_EVERY: Duration = Duration::from_secs(1);

/// Makes orphans below this process its children rather than init's. Must be
/// called before anything is started, so nothing can slip out before it holds.
pub fn become_subreaper() {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        warn!(error = %e, "cannot become a child subreaper; code that detaches itself may outlive the session");
    }
}

/// One line of `/proc/<pid>/stat`, as far as the runner needs it (here, and
/// for the session governor's accounting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Stat {
    pub pid: i32,
    pub ppid: i32,
    /// Its process group.
    pub pgrp: i32,
    pub zombie: bool,
    /// User and system time, in clock ticks.
    pub cpu_ticks: u64,
    /// User and system time of its children that it has waited for.
    pub child_ticks: u64,
    /// When it started, in clock ticks after boot.
    pub start: u64,
    /// Resident pages (shared ones included, so an upper bound of its own use).
    pub rss_pages: u64,
}

/// Parses `/proc/<pid>/stat`: `pid (comm) state ppid …`. The command name
/// may hold spaces and parentheses, so the fields are read after the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let (head, rest) = text.rsplit_once(')')?;
    let pid = head.split_once(" (")?.0.trim().parse().ok()?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?;
    let ppid = fields.get(1)?.parse().ok()?;
    // Fields counted from the state (field 3 of proc(5)); absent on a short line.
    let number = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    Some(Stat {
        pid,
        ppid,
        pgrp: fields.get(2).and_then(|f| f.parse().ok()).unwrap_or(0),
        // `X` (dead) is only ever seen fleetingly; it needs reaping no more than a zombie.
        zombie: matches!(*state, "Z" | "X"),
        cpu_ticks: number(11) + number(12),
        child_ticks: number(13) + number(14),
        start: number(19),
        rss_pages: number(21),
    })
}

/// Every process visible in `/proc` (those that vanish mid-scan are skipped).
pub(crate) fn processes() -> Vec<Stat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?))
        .collect()
}

/// The processes below `root` in `table`, parents before their children.
pub(crate) fn descendants(table: &[Stat], root: i32) -> Vec<Stat> {
    let mut found: Vec<Stat> = Vec::new();
    let mut parents = vec![root];
    while let Some(parent) = parents.pop() {
        for stat in table.iter().filter(|s| s.ppid == parent && s.pid != root) {
            // A pid seen twice would mean a torn read of a changing table; once is enough.
            if !found.iter().any(|f| f.pid == stat.pid) {
                found.push(*stat);
                parents.push(stat.pid);
            }
        }
    }
    found
}

/// Collects this process's exited children other than `spare` (the child
/// tokio waits for). Only pids read as zombies children of ours are waited
/// for, so nothing tokio owns, and nothing still running, is touched.
pub fn reap_orphans(spare: Option<Pid>) {
    let me = std::process::id().cast_signed();
    for stat in processes() {
        if stat.ppid == me && stat.zombie && Some(Pid::from_raw(stat.pid)) != spare {
            reap(stat.pid);
        }
    }
}

fn reap(pid: i32) {
    match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(_) | Err(nix::errno::Errno::ECHILD) => {}
        Err(e) => debug!(pid, error = %e, "cannot reap"),
    }
}

/// Reaps orphans whenever children exit, until dropped (abort the task).
pub async fn reap_while_running(spare: Pid) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut exits = match signal(SignalKind::child()) {
        Ok(exits) => exits,
        Err(e) => {
            warn!(error = %e, "cannot watch for SIGCHLD; orphans are reaped only when the session ends");
            return;
        }
    };
    // Signals coalesce: one `recv` after the pause stands for every exit during it.
    while exits.recv().await.is_some() {
        reap_orphans(Some(spare));
        tokio::time::sleep(REAP_EVERY).await;
    }
}

/// One pass: SIGKILL every live process below this one, reap the children
/// that have exited (but not `spare`). Returns how many processes were
/// still below this one, not counting `spare` once it is a zombie.
pub fn kill_descendants_once(spare: Option<Pid>) -> usize {
    let me = std::process::id().cast_signed();
    let below = descendants(&processes(), me);
    for stat in &below {
        if !stat.zombie {
            // A pid read from /proc is signalled a moment later. A direct
            // child cannot be reaped by anyone else meanwhile; a deeper one
            // could be reaped by its (session) parent, but pids are handed out
            // cyclically, so the pid cannot belong to a stranger that soon.
            match kill(Pid::from_raw(stat.pid), Signal::SIGKILL) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => debug!(pid = stat.pid, error = %e, "cannot kill"),
            }
        }
    }
    for stat in below.iter().filter(|s| s.ppid == me && Some(Pid::from_raw(s.pid)) != spare) {
        // Killed just now, it may not be a zombie yet; the next pass gets it.
        reap(stat.pid);
    }
    below.iter().filter(|s| !(s.zombie && Some(Pid::from_raw(s.pid)) == spare)).count()
}

/// Kills and reaps every process below this one, pass after pass (a killed
/// process's children are reparented here and seen on the next), until none
/// is left or [`SWEEP_DEADLINE`] passes. Returns how many were left.
pub async fn kill_descendants(spare: Option<Pid>) -> usize {
    let deadline = Instant::now() + SWEEP_DEADLINE;
    let mut passes = 0u32;
    loop {
        let left = kill_descendants_once(spare);
        passes += 1;
        if left == 0 {
            debug!(passes, "no process left below the runner");
            return 0;
        }
        if Instant::now() >= deadline {
            warn!(left, passes, "processes still below the runner after {SWEEP_DEADLINE:?}");
            return left;
        }
        tokio::time::sleep(SWEEP_PAUSE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_lines() {
        // (pid, ppid, zombie); the other fields have a test of their own.
        let z = |pid, ppid| Some((pid, ppid, true));
        let r = |pid, ppid| Some((pid, ppid, false));
        let cases = [
            ("123 (sleep) S 45 123 45 0 -1 4194304 90 0 0 0", r(123, 45)),
            ("7 (python3) Z 1 7 7 0 -1", z(7, 1)),
            ("8 (my prog) R 2 8 8", r(8, 2)),
            // A name with parentheses and spaces: only the last `)` ends it.
            ("9 (a) Z 1 (b)) S 3 9 9 0", r(9, 3)),
            ("10 ()) X 4 10", z(10, 4)),
            ("11 (x) S\n", None),
            ("12 (x) S notapid 0", None),
            ("garbage", None),
            ("", None),
        ];
        for (line, expected) in cases {
            assert_eq!(parse_stat(line).map(|s| (s.pid, s.ppid, s.zombie)), expected, "{line:?}");
        }
    }

    fn stat(pid: i32, ppid: i32) -> Stat {
        Stat { pid, ppid, ..Stat::default() }
    }

    #[test]
    fn reads_cpu_time_start_and_resident_pages() {
        let line = "42 (python3) R 1 42 42 0 -1 4194304 900 0 0 0 150 25 7 3 20 0 1 0 7777 123456789 2048 18446744073709551615";
        let stat = parse_stat(line).unwrap();
        assert_eq!(
            (stat.pgrp, stat.cpu_ticks, stat.child_ticks, stat.start, stat.rss_pages),
            (42, 175, 10, 7777, 2048)
        );
    }

    #[test]
    fn descendants_are_the_whole_subtree_and_nothing_else() {
        let table = [stat(1, 0), stat(10, 1), stat(11, 10), stat(12, 11), stat(13, 10), stat(20, 1), stat(21, 20)];
        let mut below: Vec<i32> = descendants(&table, 10).iter().map(|s| s.pid).collect();
        below.sort_unstable();
        assert_eq!(below, [11, 12, 13]);
        assert!(descendants(&table, 12).is_empty());
        assert!(descendants(&table, 99).is_empty());
    }

    #[test]
    fn a_cycle_in_a_torn_table_ends() {
        let table = [stat(2, 3), stat(3, 2), stat(4, 2)];
        let mut below: Vec<i32> = descendants(&table, 2).iter().map(|s| s.pid).collect();
        below.sort_unstable();
        assert_eq!(below, [3, 4]);
    }

    #[test]
    fn parses_this_process() {
        let me = std::process::id().cast_signed();
        let stat = parse_stat(&std::fs::read_to_string("/proc/self/stat").unwrap()).unwrap();
        assert_eq!(stat.pid, me);
        assert_eq!(stat.ppid, nix::unistd::getppid().as_raw());
        assert!(!stat.zombie);
        assert!(stat.rss_pages > 0 && stat.start > 0);
    }
}
