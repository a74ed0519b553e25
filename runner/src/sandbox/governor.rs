//! A session's memory and CPU limits where its cgroups cannot hold them: a
//! runner without a writable cgroup tree (an unprivileged user without
//! delegation, a container with `/sys/fs/cgroup` read-only).
//!
//! The kernel has no per-session limit on memory or CPU without cgroups, so
//! the runner watches. Every [`PERIOD`] it reads the processes below the
//! sandbox from `/proc` (escapees included: they are reparented to the
//! sandbox's init, never out of its PID namespace) and:
//! - **memory**: when their resident pages together exceed the limit, it
//!   weighs each by its proportional share (`Pss` in `smaps_rollup`, so pages
//!   shared after a fork count once) and, if the session is really over,
//!   SIGKILLs the largest, as the kernel's OOM killer does inside a cgroup;
//! - **CPU**: it keeps a budget of `cpus` seconds per second (with a short
//!   burst allowance) and, while the session has spent past it, stops the
//!   session's processes (SIGSTOP) until the budget is back, then continues
//!   them. The sandbox's init and the MCP server itself are never stopped, so
//!   the session still answers; the commands it runs are.
//!
//! It is polling, so not exact: memory can overshoot for up to a period at
//! the rate a process touches pages (each process is still capped by
//! `EXEC_MAX_MEMORY`), and a process that starts and ends between two
//! readings is not charged. The process count needs no watching: the
//! sandbox sets RLIMIT_NPROC where the kernel counts it per session (see
//! [`super::Sandbox::command`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::task::AbortHandle;
use tracing::{Instrument, debug, warn};

use crate::reap::{Stat, descendants, processes};

/// How often the session is read.
pub const PERIOD: Duration = Duration::from_millis(100);
/// CPU time a session may spend ahead of its share before it is stopped, in
/// seconds of its allowance: an idle session's next snippet starts at full speed.
const BURST_SECONDS: f64 = 0.5;

/// The limits the runner keeps by watching.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Watched {
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
}

impl Watched {
    pub fn any(&self) -> bool {
        self.memory.is_some() || self.cpus.is_some()
    }
}

/// Watches the processes below `root` (the sandbox's outer process) until
/// the returned handle is aborted.
pub fn watch(root: Pid, limits: Watched) -> AbortHandle {
    let mut governor = Governor::new(root.as_raw(), limits);
    tokio::spawn(
        async move {
            let mut ticks = tokio::time::interval(PERIOD);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                governor = match tokio::task::spawn_blocking(move || {
                    governor.tick();
                    governor
                })
                .await
                {
                    Ok(governor) => governor,
                    Err(e) => {
                        warn!("the session's governor stopped: {e}");
                        return;
                    }
                };
            }
        }
        .in_current_span(),
    )
    .abort_handle()
}

/// The watcher's state between readings.
#[derive(Debug)]
struct Governor {
    root: i32,
    limits: Watched,
    page_size: u64,
    ticks_per_second: f64,
    /// CPU ticks each process had at the last reading.
    seen: HashMap<i32, u64>,
    /// CPU seconds the session may still spend now; negative when over.
    budget: f64,
    last: Option<Instant>,
    /// Processes this governor stopped and has not continued yet.
    stopped: Vec<i32>,
}

impl Governor {
    fn new(root: i32, limits: Watched) -> Governor {
        use nix::unistd::{SysconfVar, sysconf};
        let page_size = sysconf(SysconfVar::PAGE_SIZE).ok().flatten().map_or(4096, |n| n as u64);
        let ticks_per_second = sysconf(SysconfVar::CLK_TCK).ok().flatten().map_or(100.0, |n| n as f64);
        let budget = limits.cpus.map_or(0.0, |cpus| cpus * BURST_SECONDS);
        Governor {
            root,
            limits,
            page_size,
            ticks_per_second,
            seen: HashMap::new(),
            budget,
            last: None,
            stopped: Vec::new(),
        }
    }

    fn tick(&mut self) {
        let members = descendants(&processes(), self.root);
        if let Some(limit) = self.limits.memory {
            self.keep_memory(&members, limit);
        }
        if let Some(cpus) = self.limits.cpus {
            self.keep_cpu(&members, cpus, Instant::now());
        }
    }

    fn keep_memory(&self, members: &[Stat], limit: u64) {
        let resident: u64 = members.iter().map(|m| m.rss_pages * self.page_size).sum();
        if resident <= limit {
            return;
        }
        // Resident pages count a page shared after a fork in every process
        // that maps it; the proportional share counts it once.
        let weighed: Vec<(i32, u64)> =
            members.iter().filter(|m| !m.zombie).filter_map(|m| Some((m.pid, own_memory(m.pid)?))).collect();
        let total: u64 = weighed.iter().map(|(_, bytes)| bytes).sum();
        if total <= limit {
            return;
        }
        let init = init_of(members, self.root);
        let Some(&(largest, bytes)) = weighed.iter().filter(|(pid, _)| Some(*pid) != init).max_by_key(|(_, b)| *b)
        else {
            return;
        };
        warn!(
            used = total,
            limit,
            pid = largest,
            process_bytes = bytes,
            "the session is over its memory limit (SESSION_MAX_MEMORY): its largest process is killed"
        );
        let _ = kill(Pid::from_raw(largest), Signal::SIGKILL);
    }

    fn keep_cpu(&mut self, members: &[Stat], cpus: f64, now: Instant) {
        let mut spent_ticks = 0;
        let mut seen = HashMap::with_capacity(members.len());
        for member in members {
            // A process first seen now is charged all it has used; on the
            // first reading there is nothing to charge against yet.
            let before =
                self.seen.get(&member.pid).copied().unwrap_or(if self.last.is_some() { 0 } else { member.cpu_ticks });
            spent_ticks += member.cpu_ticks.saturating_sub(before);
            seen.insert(member.pid, member.cpu_ticks);
        }
        self.seen = seen;
        let elapsed = self.last.map_or(0.0, |last| now.duration_since(last).as_secs_f64());
        self.last = Some(now);
        let spent = spent_ticks as f64 / self.ticks_per_second;
        self.budget = (self.budget + cpus * elapsed - spent).min(cpus * BURST_SECONDS);
        if self.budget < 0.0 {
            // Stop what runs, including processes started since the last
            // reading, and again what was stopped already: a process started
            // in between may have continued it.
            let spared = spared(members, self.root);
            for member in members.iter().filter(|m| !m.zombie && !spared.contains(&m.pid)) {
                if kill(Pid::from_raw(member.pid), Signal::SIGSTOP).is_ok() && !self.stopped.contains(&member.pid) {
                    self.stopped.push(member.pid);
                }
            }
            debug!(budget = self.budget, stopped = self.stopped.len(), "session over its CPU share: stopped");
        } else if !self.stopped.is_empty() {
            // Only what is still the session's: a pid that left may be reused.
            self.stopped.retain(|pid| members.iter().any(|m| m.pid == *pid));
            self.continue_stopped();
        }
    }

    fn continue_stopped(&mut self) {
        for pid in self.stopped.drain(..) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
        }
    }
}

impl Drop for Governor {
    fn drop(&mut self) {
        self.continue_stopped();
    }
}

/// The sandbox's init: the one process directly below the root.
fn init_of(members: &[Stat], root: i32) -> Option<i32> {
    members.iter().find(|m| m.ppid == root).map(|m| m.pid)
}

/// Processes never stopped: the sandbox's init and the MCP server, which is
/// the init's first child (processes that detach are reparented to the init
/// later, so they started after it).
fn spared(members: &[Stat], root: i32) -> Vec<i32> {
    let Some(init) = init_of(members, root) else { return Vec::new() };
    let server = members.iter().filter(|m| m.ppid == init).min_by_key(|m| (m.start, m.pid)).map(|m| m.pid);
    std::iter::once(init).chain(server).collect()
}

/// A process's own share of memory: proportional anonymous and shared
/// memory (`Pss_Anon` + `Pss_Shmem`), or all of its `Pss` on kernels before
/// 5.7 that do not split it. `None` when it is gone or unreadable.
fn own_memory(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    own_memory_of(&text)
}

fn own_memory_of(rollup: &str) -> Option<u64> {
    let field = |name: &str| {
        rollup.lines().find_map(|line| {
            let value = line.strip_prefix(name)?.trim().strip_suffix("kB")?.trim();
            value.parse::<u64>().ok().map(|kib| kib * 1024)
        })
    };
    match (field("Pss_Anon:"), field("Pss_Shmem:")) {
        (Some(anon), shmem) => Some(anon + shmem.unwrap_or(0)),
        (None, _) => field("Pss:"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(pid: i32, ppid: i32, start: u64, cpu_ticks: u64) -> Stat {
        Stat { pid, ppid, start, cpu_ticks, ..Stat::default() }
    }

    #[test]
    fn own_memory_is_the_proportional_anonymous_and_shared_share() {
        let rollup = "55d0-7ffd ---p 00000000 00:00 0 [rollup]\nRss: 9000 kB\nPss: 8000 kB\nPss_Anon: 600 kB\n\
                      Pss_File: 7000 kB\nPss_Shmem: 400 kB\n";
        assert_eq!(own_memory_of(rollup), Some(1000 * 1024));
        assert_eq!(own_memory_of("Rss: 9000 kB\nPss: 8000 kB\n"), Some(8000 * 1024));
        assert_eq!(own_memory_of(""), None);
    }

    #[test]
    fn the_init_and_the_server_are_spared_and_escapees_are_not() {
        // root 10 → init 11 → server 12 (first child) → command 13;
        // an escapee 14, reparented to the init later.
        let members = [member(11, 10, 5, 0), member(12, 11, 6, 0), member(13, 12, 9, 0), member(14, 11, 8, 0)];
        assert_eq!(spared(&members, 10), [11, 12]);
        assert_eq!(init_of(&members, 10), Some(11));
        assert!(spared(&[], 10).is_empty());
    }

    #[test]
    fn cpu_past_the_share_stops_the_session_until_the_budget_is_back() {
        let mut governor = Governor::new(-1, Watched { memory: None, cpus: Some(0.5) });
        governor.ticks_per_second = 100.0;
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // Nothing is charged at the first reading; pids that do not exist
        // (beyond pid_max) make stopping a no-op here.
        let pid = 1 << 30;
        governor.keep_cpu(&[member(pid, 2, 9, 1000)], 0.5, at(0));
        assert!(governor.budget > 0.0);
        // One full core for a second against half of one: over by 0.5 s minus the burst.
        governor.keep_cpu(&[member(pid, 2, 9, 1100)], 0.5, at(1000));
        assert!((governor.budget - (0.25 + 0.5 - 1.0)).abs() < 1e-9, "{}", governor.budget);
        // Idle for a while: the budget comes back, capped at the burst.
        governor.keep_cpu(&[member(pid, 2, 9, 1100)], 0.5, at(3000));
        assert!((governor.budget - 0.25).abs() < 1e-9, "{}", governor.budget);
        // A process seen for the first time is charged all its time.
        governor.keep_cpu(&[member(pid, 2, 9, 1100), member(pid + 1, 2, 10, 50)], 0.5, at(3100));
        assert!((governor.budget - (0.25 + 0.05 - 0.5)).abs() < 1e-9, "{}", governor.budget);
    }
}
