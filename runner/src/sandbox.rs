//! The sandbox a local runner starts its MCP server in: one per session.
//!
//! Built with bubblewrap (Debian's `bubblewrap`), a small, audited tool that
//! uses what the kernel offers: a mount namespace with the filesystem of
//! [`mounts`] (system read-only, no other session, no home, no gateway
//! files, the session directory a sized tmpfs), a PID namespace (code sees
//! and can signal only its own session's processes, and when the sandbox's
//! first process dies the kernel kills every process left in it, `setsid`
//! escapees included), IPC and UTS namespaces, and `--die-with-parent`, so a
//! runner SIGKILLed takes its sandbox with it. As root, bubblewrap runs
//! without a user namespace and `runner limit` drops to the session's own
//! unprivileged [`identity`] inside; as any other user, bubblewrap makes a
//! user namespace and code keeps that user's id, confined by the other
//! namespaces. Either way `no_new_privs` is set, so no setuid program gives
//! privileges back. The session's [`cgroups`] bound all of its processes
//! together (where they cannot be written: RLIMIT_NPROC set inside, and the
//! runner's [`governor`] for memory and CPU), and a [`seccomp`] filter takes
//! away kernel interfaces code has no use for. The network is shared unless `SANDBOX_NETWORK=off`.
//!
//! On a dyno (`runner` without `--local`) the dyno is the machine and there
//! is no sandbox.

pub mod cgroups;
pub mod governor;
pub mod identity;
pub mod mounts;
pub mod seccomp;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
pub use dynogate_shared::sandbox::Mode;

use self::cgroups::{SessionGroups, SessionLimits};
use self::identity::Identity;
use crate::config::ServerCommand;

/// The sandbox's settings, from the runner's configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    pub network: bool,
    pub disk: Option<u64>,
    pub limits: SessionLimits,
    /// More paths the sandbox sees, read-only (`SANDBOX_BIND`).
    pub bind: Vec<PathBuf>,
}

/// A session's sandbox, ready to start its MCP server.
#[derive(Debug)]
pub struct Sandbox {
    bwrap: PathBuf,
    exe: PathBuf,
    /// Set when the runner is root: who code runs as.
    identity: Option<Identity>,
    fs: Vec<OsString>,
    network: bool,
    groups: Option<SessionGroups>,
    /// The session's pids cgroup, writable inside for the executor.
    delegated: Option<PathBuf>,
    /// The machine's tools directory (uv), shown read-only.
    tools: Option<PathBuf>,
    /// The session's process cap as RLIMIT_NPROC, where no cgroup holds it.
    nproc: Option<u64>,
    /// The memory and CPU limits the runner keeps by watching, where no
    /// cgroup holds them.
    watched: SessionLimits,
    /// Holds `identity`'s id for this session alone while the runner lives.
    _identity_claim: Option<identity::Claim>,
}

impl Sandbox {
    /// The sandbox for the session in `workdir`, `None` when there is none
    /// (mode `off`, or `auto` where bubblewrap cannot run: logged loudly).
    pub fn prepare(settings: &Settings, workdir: &Path, server: &ServerCommand) -> anyhow::Result<Option<Sandbox>> {
        if settings.mode == Mode::Off {
            return Ok(None);
        }
        // The gateway checked this machine at start-up and said `bwrap`;
        // a runner started by hand (`auto`) checks for itself.
        let found = match settings.mode {
            Mode::Bwrap => crate::exec::process::find_program("bwrap")
                .context("bubblewrap (`bwrap`) is not installed; on Debian or Ubuntu: apt-get install bubblewrap"),
            _ => usable_bwrap(),
        };
        let bwrap = match found {
            Ok(bwrap) => bwrap,
            Err(e) if settings.mode == Mode::Auto => {
                tracing::error!("code runs UNCONFINED in this session (SANDBOX=auto): {e:#}");
                return Ok(None);
            }
            Err(e) => return Err(e.context("SANDBOX=bwrap, and bubblewrap cannot confine this session")),
        };
        let exe = std::env::current_exe().context("cannot locate the runner binary")?;
        let pid = std::process::id();
        let (identity, identity_claim) = if nix::unistd::geteuid().is_root() {
            let read = |file| std::fs::read_to_string(file).unwrap_or_default();
            let dir = Path::new(identity::CLAIMS_DIR);
            let (identity, held) = identity::claim(dir, pid, &read("/proc/self/uid_map"), &read("/proc/self/gid_map"));
            (Some(identity), held)
        } else {
            (None, None)
        };
        // bubblewrap fails on a path that is not there: only what exists.
        let dir = |name: &str| std::env::var_os(name).map(PathBuf::from).filter(|d| d.is_dir());
        // Made now, so a uv the gateway obtains later shows through the mount.
        let tools = crate::config::machine_tools_dir();
        let tools = std::fs::create_dir_all(&tools).is_ok().then_some(tools);
        let fs = mounts::plan(&mounts::Inputs {
            workdir: workdir.to_owned(),
            disk: settings.disk,
            runner_exe: exe.clone(),
            path: std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).filter(|d| d.is_dir()).collect())
                .unwrap_or_default(),
            home: dir("HOME"),
            tmpdir: dir("TMPDIR"),
            cwd: std::env::current_dir().ok(),
            extra: program_of(server)
                .into_iter()
                .chain(tools.clone())
                .chain(settings.bind.iter().cloned())
                .filter(|p| p.exists())
                .collect(),
        });
        let mut outcome = SessionGroups::create(&settings.limits, pid);
        if !outcome.missing.is_empty() {
            tracing::debug!(without = %outcome.missing.join("; "), "session limits that no cgroup holds");
        }
        // Without cgroups: the process cap as RLIMIT_NPROC, where the kernel
        // counts it for this session alone (a user claimed for the session
        // as root; otherwise the sandbox's user namespace, on Linux 5.14+);
        // the memory and CPU limits watched by the runner.
        let counted_apart = identity.map_or_else(nproc_counted_per_user_namespace, |_| identity_claim.is_some());
        let nproc = outcome.unheld.processes.filter(|_| counted_apart);
        let watched = SessionLimits { processes: None, ..outcome.unheld };
        if let Some(n) = nproc {
            outcome.enforced.push(format!("RLIMIT_NPROC={n}"));
        }
        if let Some(bytes) = watched.memory {
            outcome.enforced.push(format!("memory={bytes} (watched)"));
        }
        if let Some(cpus) = watched.cpus {
            outcome.enforced.push(format!("cpus={cpus} (watched)"));
        }
        tracing::info!(
            user = ?identity.map(|i| i.uid),
            network = settings.network,
            limits = %outcome.enforced.join(" "),
            "session sandboxed with bubblewrap"
        );
        if let (None, Some(n)) = (nproc, outcome.unheld.processes) {
            tracing::warn!(
                "the session's process cap ({n}) does not hold here: no writable pids cgroup, and RLIMIT_NPROC \
                 would count other sessions' processes too (sessions share a user, or the kernel is older than 5.14)"
            );
        }
        let delegated = outcome
            .groups
            .as_ref()
            .and_then(|groups| groups.delegate_pids(identity.map(|i| i.uid)))
            .map(Path::to_owned);
        Ok(Some(Sandbox {
            bwrap,
            exe,
            identity,
            fs,
            network: settings.network,
            groups: outcome.groups,
            delegated,
            tools,
            nproc,
            watched,
            _identity_claim: identity_claim,
        }))
    }

    /// The command that runs `argv` in the sandbox, in `workdir`.
    pub fn command(&self, argv: &[OsString], workdir: &Path) -> tokio::process::Command {
        // The first process joins the session's cgroups, then becomes bubblewrap.
        let mut command = tokio::process::Command::new(&self.exe);
        command.arg("limit").arg("--seccomp-bwrap");
        for dir in self.groups.iter().flat_map(|g| g.dirs()) {
            command.arg("--cgroup").arg(dir);
        }
        command.arg("--").arg(&self.bwrap);
        command.args(namespaces(self.identity.is_none(), self.network));
        command.args(&self.fs);
        if let Some(dir) = &self.delegated {
            command.arg("--bind").arg(dir).arg(dir);
        }
        command.arg("--").arg(&self.exe).arg("limit").arg("--no-new-privs");
        if let Some(n) = self.nproc {
            // Set inside: the user namespace (or the session's user) it counts in exists by then.
            command.arg("--nproc").arg(n.to_string());
        }
        if let Some(identity) = self.identity {
            command
                .arg("--chown")
                .arg(workdir)
                .arg("--uid")
                .arg(identity.uid.to_string())
                .arg("--gid")
                .arg(identity.gid.to_string());
        }
        command.arg("--").args(argv);
        command
    }

    /// Sets what the sandboxed server gets on top of its allowlisted
    /// variables: the session's own home, caches and package-manager
    /// configuration, all in its directory; no `TMPDIR` (its `/tmp` is
    /// private to the sandbox); the machine's tools, which it may use but
    /// not change (so it never obtains one itself); and the cgroup the
    /// executor may make per-command cgroups in.
    pub fn set_env(&self, command: &mut tokio::process::Command, workdir: &Path) {
        let cache = workdir.join(".cache");
        command
            .env("HOME", workdir)
            .env("XDG_CACHE_HOME", &cache)
            .env("EXEC_CACHE_DIR", cache.join("dynogate-exec"))
            .env_remove("TMPDIR");
        if let Some(dir) = &self.delegated {
            command.env(crate::exec::cgroup::DELEGATED_ENV, dir);
        }
        if let Some(tools) = &self.tools {
            command.env("EXEC_TOOLS_DIR", tools);
        }
        command.env("EXEC_OBTAIN_UV", "false").env("EXEC_SANDBOXED", "true");
    }

    /// The limits the runner has to keep by watching the sandbox's processes.
    pub fn watched(&self) -> Option<SessionLimits> {
        (self.watched.memory.is_some() || self.watched.cpus.is_some()).then_some(self.watched)
    }

    /// Kills every process the session has left.
    pub fn kill(&self) {
        if let Some(groups) = &self.groups {
            groups.kill();
        }
    }
}

/// The file a custom MCP server starts from, so the sandbox can show it:
/// an absolute path, or a name found on `PATH`. Files it needs beyond that
/// (a project directory under a covered one) go in `SANDBOX_BIND`.
fn program_of(server: &ServerCommand) -> Option<PathBuf> {
    let first = match server {
        ServerCommand::BuiltIn => return None,
        ServerCommand::Argv(argv) => argv.first()?.clone(),
        ServerCommand::Shell(line) => line.split_whitespace().next()?.to_owned(),
    };
    let path = PathBuf::from(&first);
    if path.is_absolute() { Some(path) } else { crate::exec::process::find_program(&first) }
}

/// Whether RLIMIT_NPROC counts a user's processes per user namespace, as
/// Linux does since 5.14: then a limit set inside the sandbox's own user
/// namespace counts the session's processes only.
fn nproc_counted_per_user_namespace() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    kernel_at_least(&release, (5, 14))
}

fn kernel_at_least(release: &str, wanted: (u32, u32)) -> bool {
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= wanted,
        _ => false,
    }
}

/// The namespace flags: a user namespace only for an unprivileged runner.
fn namespaces(user_namespace: bool, network: bool) -> Vec<&'static str> {
    let mut flags = vec!["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"];
    if user_namespace {
        // Code may not make namespaces of its own inside.
        flags.extend(["--unshare-user", "--disable-userns"]);
    } else {
        // Root inside keeps only what `runner limit` needs to become the
        // session's user.
        flags.extend([
            "--cap-drop",
            "ALL",
            "--cap-add",
            "CAP_CHOWN",
            "--cap-add",
            "CAP_SETUID",
            "--cap-add",
            "CAP_SETGID",
        ]);
    }
    if !network {
        flags.push("--unshare-net");
    }
    flags.extend(["--die-with-parent", "--new-session"]);
    flags
}

/// bubblewrap's path, once it has been seen to confine a process here.
fn usable_bwrap() -> anyhow::Result<PathBuf> {
    let bwrap = crate::exec::process::find_program("bwrap")
        .context("bubblewrap (`bwrap`) is not installed; on Debian or Ubuntu: apt-get install bubblewrap")?;
    let root = nix::unistd::geteuid().is_root();
    let output = std::process::Command::new(&bwrap)
        .args(namespaces(!root, true))
        .args(["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("cannot run bubblewrap")?;
    if !output.status.success() {
        bail!(
            "bubblewrap cannot make namespaces here ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(bwrap)
}

/// `runner sandbox-check`: prints what would protect a session on this
/// machine, one line; fails when nothing would.
pub fn check() -> anyhow::Result<()> {
    let bwrap = usable_bwrap()?;
    let who = if nix::unistd::geteuid().is_root() {
        "code runs as an unprivileged user of its own"
    } else {
        "code keeps this user's id in a user namespace"
    };
    println!("bubblewrap ({}): mount, PID, IPC and UTS namespaces; {who}", bwrap.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_compare_by_major_and_minor() {
        assert!(kernel_at_least("6.18.44-fc-v1252\n", (5, 14)));
        assert!(kernel_at_least("5.14.0", (5, 14)));
        assert!(!kernel_at_least("5.10.209-198.858.amzn2.x86_64", (5, 14)));
        assert!(!kernel_at_least("4.19", (5, 14)));
        assert!(!kernel_at_least("garbage", (5, 14)));
    }

    #[test]
    fn root_drops_to_a_user_and_others_use_a_user_namespace() {
        let root = namespaces(false, true);
        assert!(!root.contains(&"--unshare-user"));
        assert!(root.windows(2).any(|w| w == ["--cap-drop", "ALL"]));
        let user = namespaces(true, false);
        assert!(user.contains(&"--unshare-user") && user.contains(&"--disable-userns"));
        assert!(user.contains(&"--unshare-net"));
        for flags in [root, user] {
            assert!(flags.contains(&"--unshare-pid") && flags.contains(&"--die-with-parent"));
        }
    }
}
