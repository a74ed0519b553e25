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
//!   shared after a fork count once; its own anonymous and shared pages from
//!   `status` where `smaps_rollup` cannot be read) and, while the session is
//!   really over, SIGKILLs the largest process, then the next, as the
//!   kernel's OOM killer does inside a cgroup;
//! - **CPU**: it charges the session the CPU time of its processes and of
//!   the children they reaped (which is where a short-lived process's time
//!   goes), keeps a budget of `cpus` seconds per second (with a short burst
//!   allowance) and, while the session has spent past it, stops the
//!   session's processes (SIGSTOP) until the budget is back, then continues
//!   them. The sandbox's init and the MCP server's first process are never
//!   stopped, so the session still answers; the commands it runs are.
//!
//! It is polling, so not exact: memory can overshoot for up to a period at
//! the rate a process touches pages (each process is still capped by
//! `EXEC_MAX_MEMORY`), memory no process maps (a `memfd` only written to)
//! is not seen, and a child whose parent ignores SIGCHLD takes its CPU time
//! with it if it ends between two readings. The process count needs no
//! watching: the sandbox sets RLIMIT_NPROC where the kernel counts it per
//! session (see [`super::Sandbox::command`]).

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::task::AbortHandle;
use tracing::{Instrument, debug, warn};

use super::cgroups::SessionLimits;
use crate::reap::{Stat, descendants, processes};

/// How often the session is read.
pub const PERIOD: Duration = Duration::from_millis(100);
/// CPU time a session may spend ahead of its share before it is stopped, in
/// seconds of its allowance: an idle session's next snippet starts at full speed.
const BURST_SECONDS: f64 = 0.5;

/// Watches the processes below `root` (the sandbox's outer process) until
/// the returned handle is aborted, for the memory and CPU parts of `limits`
/// (the process count is the kernel's, see above).
pub fn watch(root: Pid, limits: SessionLimits) -> AbortHandle {
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
    limits: SessionLimits,
    page_size: u64,
    ticks_per_second: f64,
    /// The session's CPU ticks at the last reading (see [`session_ticks`]).
    ticks: Option<u64>,
    /// CPU seconds the session may still spend now; negative when over.
    budget: f64,
    last: Option<Instant>,
    /// Processes this governor stopped and has not continued yet.
    stopped: Vec<i32>,
}

/// Rounds of reading and stopping while a session is over its share: a
/// process started between a reading and the signals is caught by the next.
const STOP_ROUNDS: usize = 4;

impl Governor {
    fn new(root: i32, limits: SessionLimits) -> Governor {
        use nix::unistd::{SysconfVar, sysconf};
        let page_size = sysconf(SysconfVar::PAGE_SIZE).ok().flatten().map_or(4096, |n| n as u64);
        let ticks_per_second = sysconf(SysconfVar::CLK_TCK).ok().flatten().map_or(100.0, |n| n as f64);
        let budget = limits.cpus.map_or(0.0, |cpus| cpus * BURST_SECONDS);
        Governor { root, limits, page_size, ticks_per_second, ticks: None, budget, last: None, stopped: Vec::new() }
    }

    fn members(&self) -> Vec<Stat> {
        descendants(&processes(), self.root)
    }

    fn tick(&mut self) {
        let members = self.members();
        if let Some(limit) = self.limits.memory {
            self.keep_memory(&members, limit);
        }
        if let Some(cpus) = self.limits.cpus {
            if self.charge(&members, cpus, Instant::now()) {
                self.stop_all(members);
            } else {
                self.continue_stopped(&members);
            }
        }
    }

    fn keep_memory(&self, members: &[Stat], limit: u64) {
        let resident: u64 = members.iter().map(|m| m.rss_pages * self.page_size).sum();
        if resident <= limit {
            return;
        }
        // Resident pages count a page shared after a fork in every process
        // that maps it; the proportional share counts it once.
        let init = init_of(members, self.root);
        let mut weighed: Vec<(i32, u64)> =
            members.iter().filter(|m| !m.zombie).filter_map(|m| Some((m.pid, own_memory(m.pid)?))).collect();
        let mut total: u64 = weighed.iter().map(|(_, bytes)| bytes).sum();
        // Largest last, for the loop below to take from the end.
        weighed.retain(|(pid, _)| Some(*pid) != init);
        weighed.sort_by_key(|(_, bytes)| *bytes);
        while total > limit {
            let Some((largest, bytes)) = weighed.pop() else { return };
            warn!(
                used = total,
                limit,
                pid = largest,
                process_bytes = bytes,
                "the session is over its memory limit (SESSION_MAX_MEMORY): its largest process is killed"
            );
            let _ = kill(Pid::from_raw(largest), Signal::SIGKILL);
            total -= bytes;
        }
    }

    /// Charges what the session spent since the last reading against its
    /// budget; whether it is over.
    fn charge(&mut self, members: &[Stat], cpus: f64, now: Instant) -> bool {
        let ticks = session_ticks(members);
        // Fewer than before only when time left with a child nobody waited
        // for: nothing to charge then.
        let spent = self.ticks.map_or(0, |before| ticks.saturating_sub(before));
        self.ticks = Some(ticks);
        let elapsed = self.last.map_or(0.0, |last| now.duration_since(last).as_secs_f64());
        self.last = Some(now);
        let spent = spent as f64 / self.ticks_per_second;
        self.budget = (self.budget + cpus * elapsed - spent).min(cpus * BURST_SECONDS);
        self.budget < 0.0
    }

    /// Stops every process of the session but the spared ones, reading the
    /// session again until a round finds none new; and again what was
    /// stopped already, since another process may have continued it.
    fn stop_all(&mut self, mut members: Vec<Stat>) {
        for round in 1..=STOP_ROUNDS {
            let spared = spared(&members, self.root);
            let mut new = 0;
            for member in members.iter().filter(|m| !m.zombie && !spared.contains(&m.pid)) {
                if kill(Pid::from_raw(member.pid), Signal::SIGSTOP).is_ok() && !self.stopped.contains(&member.pid) {
                    self.stopped.push(member.pid);
                    new += 1;
                }
            }
            if new == 0 || round == STOP_ROUNDS {
                break;
            }
            members = self.members();
        }
        debug!(budget = self.budget, stopped = self.stopped.len(), "session over its CPU share: stopped");
    }

    /// Continues what this governor stopped, as far as it is still the
    /// session's (a pid that left may be someone else's by now).
    fn continue_stopped(&mut self, members: &[Stat]) {
        for pid in self.stopped.drain(..) {
            if members.iter().any(|m| m.pid == pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
            }
        }
    }
}

/// The CPU ticks the session has used, as far as its processes hold them:
/// each one's own and its reaped children's (a child's time moves to its
/// parent when it is reaped, so the sum does not drop as processes end).
fn session_ticks(members: &[Stat]) -> u64 {
    members.iter().map(|m| m.cpu_ticks + m.child_ticks).sum()
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
/// 5.7 that do not split it. Reading `smaps_rollup` takes the right to trace
/// the process, which a root runner without CAP_SYS_PTRACE lacks for the
/// session's user; then its resident anonymous and shared pages, from
/// `status`, which anyone may read. `None` when it is gone.
fn own_memory(pid: i32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok();
    if let Some(bytes) = rollup.as_deref().and_then(own_memory_of) {
        return Some(bytes);
    }
    resident_of(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// A `kB` field of a `/proc` file, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.trim().strip_suffix("kB")?.trim();
        value.parse::<u64>().ok().map(|kib| kib * 1024)
    })
}

fn own_memory_of(rollup: &str) -> Option<u64> {
    match (kib_field(rollup, "Pss_Anon:"), kib_field(rollup, "Pss_Shmem:")) {
        (Some(anon), shmem) => Some(anon + shmem.unwrap_or(0)),
        (None, _) => kib_field(rollup, "Pss:"),
    }
}

/// Resident anonymous and shared memory, from `/proc/<pid>/status`.
fn resident_of(status: &str) -> Option<u64> {
    let anon = kib_field(status, "RssAnon:")?;
    Some(anon + kib_field(status, "RssShmem:").unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(pid: i32, ppid: i32, start: u64, cpu_ticks: u64, child_ticks: u64) -> Stat {
        Stat { pid, ppid, start, cpu_ticks, child_ticks, ..Stat::default() }
    }

    #[test]
    fn own_memory_is_the_proportional_anonymous_and_shared_share() {
        let rollup = "55d0-7ffd ---p 00000000 00:00 0 [rollup]\nRss: 9000 kB\nPss: 8000 kB\nPss_Anon: 600 kB\n\
                      Pss_File: 7000 kB\nPss_Shmem: 400 kB\n";
        assert_eq!(own_memory_of(rollup), Some(1000 * 1024));
        assert_eq!(own_memory_of("Rss: 9000 kB\nPss: 8000 kB\n"), Some(8000 * 1024));
        assert_eq!(own_memory_of(""), None);
        let status =
            "Name:\tpython3\nVmRSS:\t  9000 kB\nRssAnon:\t   600 kB\nRssFile:\t  8000 kB\nRssShmem:\t   400 kB\n";
        assert_eq!(resident_of(status), Some(1000 * 1024));
        assert_eq!(resident_of("Name:\tkthreadd\n"), None);
        // This process, whichever way it can be read.
        assert!(own_memory(std::process::id().cast_signed()).is_some_and(|bytes| bytes > 0));
    }

    #[test]
    fn the_init_and_the_server_are_spared_and_escapees_are_not() {
        // root 10 → init 11 → server 12 (first child) → command 13;
        // an escapee 14, reparented to the init later.
        let members =
            [member(11, 10, 5, 0, 0), member(12, 11, 6, 0, 0), member(13, 12, 9, 0, 0), member(14, 11, 8, 0, 0)];
        assert_eq!(spared(&members, 10), [11, 12]);
        assert_eq!(init_of(&members, 10), Some(11));
        assert!(spared(&[], 10).is_empty());
    }

    #[test]
    fn cpu_past_the_share_is_over_until_the_budget_is_back() {
        let mut governor = Governor::new(-1, SessionLimits { cpus: Some(0.5), ..SessionLimits::default() });
        governor.ticks_per_second = 100.0;
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // Nothing is charged at the first reading.
        assert!(!governor.charge(&[member(20, 2, 9, 1000, 0)], 0.5, at(0)));
        // One full core for a second against half of one: over by 0.5 s minus the burst.
        assert!(governor.charge(&[member(20, 2, 9, 1100, 0)], 0.5, at(1000)));
        assert!((governor.budget - (0.25 + 0.5 - 1.0)).abs() < 1e-9, "{}", governor.budget);
        // Idle for a while: the budget comes back, capped at the burst.
        assert!(!governor.charge(&[member(20, 2, 9, 1100, 0)], 0.5, at(3000)));
        assert!((governor.budget - 0.25).abs() < 1e-9, "{}", governor.budget);
        // A child that lived between two readings is charged once its parent
        // reaped it: its time is in the parent's children's time.
        assert!(governor.charge(&[member(20, 2, 9, 1100, 50)], 0.5, at(3100)));
        assert!((governor.budget - (0.25 + 0.05 - 0.5)).abs() < 1e-9, "{}", governor.budget);
        // One that is reaped while seen is not charged twice.
        let mut governor = Governor::new(-1, SessionLimits { cpus: Some(1.0), ..SessionLimits::default() });
        governor.ticks_per_second = 100.0;
        governor.charge(&[member(20, 2, 9, 0, 0), member(21, 20, 10, 30, 0)], 1.0, at(0));
        governor.charge(&[member(20, 2, 9, 0, 40)], 1.0, at(100));
        assert!((governor.budget - 0.5).abs() < 1e-9, "charged 0.1 s, not 0.4 s: {}", governor.budget);
    }
}
