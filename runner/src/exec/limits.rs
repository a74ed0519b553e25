//! Resource limits on the commands the executor runs, and `runner limit`, the
//! shim that applies them.
//!
//! The workspace forbids `unsafe`, so limits cannot be set between fork and
//! exec (`pre_exec`). Instead a limited command starts as
//! `runner limit [--data N] [--cpu S] [--nproc N] [--fsize N] [--cgroup DIR] -- PROGRAM ARGS…`,
//! which sets the limits on itself (they survive exec and are inherited by
//! every fork) and then execs PROGRAM: same pid, same process group, same
//! environment and working directory.
//!
//! Process counts are the awkward one. RLIMIT_NPROC counts every process and
//! thread of the *user*, not of the command, and does not bind root (nor
//! anyone with CAP_SYS_ADMIN or CAP_SYS_RESOURCE). So the executor prefers a
//! pids cgroup per command ([`super::cgroup`]), which holds for everyone who
//! may create one and also finds processes that left the process group. Where
//! it cannot make one (an unprivileged user, as on a Heroku dyno), it sets
//! RLIMIT_NPROC to the user's current count plus the allowance: a cap on
//! *new* processes, which is what stops a fork bomb.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context;
use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::config::LimitArgs;

/// Extra CPU seconds between the soft limit (SIGXCPU, which a program may
/// catch to report) and the hard one (SIGKILL).
const CPU_GRACE_SECONDS: u64 = 5;

/// Limits for one command; `None` means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of private writable memory per process (RLIMIT_DATA). Unlike
    /// RLIMIT_AS it ignores address space that is only reserved, which V8 and
    /// the Go runtime reserve generously.
    pub memory: Option<u64>,
    /// CPU seconds per process (RLIMIT_CPU).
    pub cpu_seconds: Option<u64>,
    /// Processes and threads at once.
    pub processes: Option<u64>,
    /// Largest file a process may write (RLIMIT_FSIZE).
    pub file_size: Option<u64>,
}

impl Limits {
    /// The limits installers get: memory and processes. CPU time and file
    /// size caps sized for snippets would break large but legitimate installs
    /// (native builds, big wheels); the install timeout bounds those.
    pub fn for_install(&self) -> Limits {
        Limits { memory: self.memory, processes: self.processes, cpu_seconds: None, file_size: None }
    }
}

/// How the process cap of one command is enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessCap {
    /// Join this pids cgroup (its `pids.max` is already set).
    Cgroup(PathBuf),
    /// Set RLIMIT_NPROC to this (the user's current count plus the allowance).
    Nproc(u64),
    None,
}

/// The arguments of `runner limit`, up to and including `--`.
pub fn shim_args(limits: &Limits, cap: &ProcessCap) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["limit".into()];
    let mut flag = |name: &str, value: Option<u64>| {
        if let Some(value) = value {
            args.push(format!("--{name}").into());
            args.push(value.to_string().into());
        }
    };
    flag("data", limits.memory);
    flag("cpu", limits.cpu_seconds);
    flag("fsize", limits.file_size);
    match cap {
        ProcessCap::Cgroup(dir) => {
            args.push("--cgroup".into());
            args.push(dir.clone().into_os_string());
        }
        ProcessCap::Nproc(n) => {
            args.push("--nproc".into());
            args.push(n.to_string().into());
        }
        ProcessCap::None => {}
    }
    args.push("--".into());
    args
}

/// `runner limit`: applies the limits to this process and execs the program.
/// Returns only if something failed.
pub fn apply_and_exec(mut args: LimitArgs) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    for dir in &args.cgroup {
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .with_context(|| format!("cannot join the cgroup {}", dir.display()))?;
    }
    if args.job_from_stdin {
        // Started ahead of its command: the slow part (joining the cgroup)
        // is done; now wait for the job and become it. Meanwhile nobody may
        // open this process's stdin through /proc to slip in a job of their
        // own (exec makes it inspectable again).
        nix::sys::prctl::set_dumpable(false).context("cannot make the waiting shim uninspectable")?;
        let job = super::primed::receive()?;
        (args.data, args.cpu, args.nproc, args.fsize) = (job.data, job.cpu, job.nproc, job.fsize);
        apply_rlimits(&args)?;
        let (program, rest) = job.argv.split_first().context("no program to run")?;
        let error =
            std::process::Command::new(program).args(rest).env_clear().envs(job.env).current_dir(&job.cwd).exec();
        return Err(error).with_context(|| format!("cannot run {}", program.to_string_lossy()));
    }
    apply_rlimits(&args)?;
    become_user(&args)?;
    let (program, rest) = args.argv.split_first().context("no program to run")?;
    let mut command = std::process::Command::new(program);
    if args.seccomp_bwrap {
        let fd = crate::sandbox::seccomp::descriptor()?;
        command.arg("--seccomp").arg(fd.to_string());
    }
    let error = command.args(rest).exec();
    Err(error).with_context(|| format!("cannot run {}", program.to_string_lossy()))
}

/// Sets the rlimits `args` asks for on this process.
fn apply_rlimits(args: &LimitArgs) -> anyhow::Result<()> {
    if let Some(bytes) = args.data {
        set(Resource::RLIMIT_DATA, bytes, bytes)?;
    }
    if let Some(seconds) = args.cpu {
        set(Resource::RLIMIT_CPU, seconds, seconds.saturating_add(CPU_GRACE_SECONDS))?;
    }
    if let Some(count) = args.nproc {
        set(Resource::RLIMIT_NPROC, count, count)?;
    }
    if let Some(bytes) = args.fsize {
        set(Resource::RLIMIT_FSIZE, bytes, bytes)?;
    }
    Ok(())
}

/// Hands the session directory over and becomes the session's user, for
/// good: real, effective and saved ids all change, supplementary groups go,
/// and with them every capability.
fn become_user(args: &LimitArgs) -> anyhow::Result<()> {
    use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
    if let Some(dir) = &args.chown {
        std::os::unix::fs::chown(dir, args.uid, args.gid)
            .with_context(|| format!("cannot give {} to the session's user", dir.display()))?;
    }
    if let Some(gid) = args.gid {
        let gid = Gid::from_raw(gid);
        setgroups(&[]).context("cannot drop supplementary groups")?;
        setresgid(gid, gid, gid).context("cannot become the session's group")?;
    }
    if let Some(uid) = args.uid {
        let uid = Uid::from_raw(uid);
        setresuid(uid, uid, uid).context("cannot become the session's user")?;
        if setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)).is_ok() {
            anyhow::bail!("dropping privileges did not hold");
        }
    }
    if args.no_new_privs {
        nix::sys::prctl::set_no_new_privs().context("cannot set no_new_privs")?;
    }
    Ok(())
}

/// Lowers a limit; never asks for more than the current hard limit allows.
fn set(resource: Resource, soft: u64, hard: u64) -> anyhow::Result<()> {
    let (_, current_hard) = getrlimit(resource).with_context(|| format!("cannot read {resource:?}"))?;
    let hard = hard.min(current_hard);
    setrlimit(resource, soft.min(hard), hard).with_context(|| format!("cannot set {resource:?}"))
}

/// Processes and threads the real user has now, as RLIMIT_NPROC counts them.
pub fn user_tasks() -> u64 {
    let uid = nix::unistd::getuid().as_raw().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            entry.file_name().to_str()?.parse::<u32>().ok()?;
            let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
            let field = |name: &str| status.lines().find_map(|line| line.strip_prefix(name)).map(str::trim);
            let real_uid = field("Uid:")?.split_whitespace().next()?;
            (real_uid == uid).then(|| field("Threads:")?.parse::<u64>().ok()).flatten()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shim_arguments_name_each_limit_set() {
        let limits = Limits { memory: Some(10), cpu_seconds: Some(2), processes: Some(5), file_size: None };
        let args = shim_args(&limits, &ProcessCap::Nproc(105));
        let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(args, ["limit", "--data", "10", "--cpu", "2", "--nproc", "105", "--"]);
        let args = shim_args(&Limits::default(), &ProcessCap::Cgroup("/cg/run-1".into()));
        assert_eq!(args, ["limit", "--cgroup", "/cg/run-1", "--"].map(OsString::from));
    }

    #[test]
    fn installers_keep_memory_and_process_caps_only() {
        let limits = Limits { memory: Some(1), cpu_seconds: Some(2), processes: Some(3), file_size: Some(4) };
        assert_eq!(
            limits.for_install(),
            Limits { memory: Some(1), cpu_seconds: None, processes: Some(3), file_size: None }
        );
    }

    #[test]
    fn this_user_has_at_least_this_process() {
        assert!(user_tasks() >= 1);
    }
}
