//! What confines local runners' sessions, decided once at start-up.
//!
//! The gateway asks the runner binary (`runner sandbox-check`) whether
//! bubblewrap can confine a session on this machine, says loudly when it
//! cannot, and refuses to serve a non-loopback address with unconfined
//! sessions unless `ALLOW_UNSANDBOXED` is set: there, code from anyone with
//! the key could read the gateway's secrets and every other session. Its
//! runners are then told the decision (`SANDBOX=bwrap` or `off`), so a
//! sandbox that breaks later fails its session instead of silently
//! running it unconfined. It also removes the cgroups of a runner that
//! could not remove them itself (SIGKILLed).

use std::path::Path;
use std::time::Duration;

use anyhow::bail;
use dynogate_shared::cgroup::{Controller, locate, session_group};
use dynogate_shared::sandbox::Mode;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long the start-up check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long removing a dead runner's cgroups may keep retrying.
const REMOVE_PATIENCE: Duration = Duration::from_secs(5);

/// Decides the mode runners get: `Bwrap` when the check passed, `Off` when
/// sessions run unconfined (which is allowed only on loopback binds or
/// with `allow_unsandboxed`).
pub async fn decide(runner_bin: &Path, asked: Mode, public: bool, allow_unsandboxed: bool) -> anyhow::Result<Mode> {
    let refused = |why: &str| {
        format!(
            "{why}: code run by any client could read this gateway's secrets and other sessions' files. \
             Install bubblewrap (apt-get install bubblewrap), bind 127.0.0.1, or set ALLOW_UNSANDBOXED=true \
             if each runner's machine is isolated some other way"
        )
    };
    if asked == Mode::Off {
        tracing::warn!("SANDBOX=off: sessions run UNCONFINED, as this gateway's user, able to reach each other");
        if public && !allow_unsandboxed {
            bail!(refused("refusing to serve a public address with SANDBOX=off"));
        }
        return Ok(Mode::Off);
    }
    match check(runner_bin).await {
        Ok(line) => {
            tracing::info!("sessions are sandboxed: {line}");
            Ok(Mode::Bwrap)
        }
        Err(why) if asked == Mode::Bwrap => bail!("SANDBOX=bwrap, but sessions cannot be sandboxed here: {why}"),
        Err(why) => {
            tracing::error!(
                "sessions run UNCONFINED, as this gateway's user, able to read each other's files and this \
                 gateway's memory: {why}"
            );
            if public && !allow_unsandboxed {
                bail!(refused(&format!("refusing to serve a public address with no sandbox ({why})")));
            }
            Ok(Mode::Off)
        }
    }
}

/// Runs `runner sandbox-check`: its one line, or why it failed.
async fn check(runner_bin: &Path) -> Result<String, String> {
    let output = tokio::process::Command::new(runner_bin)
        .arg("sandbox-check")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(CHECK_TIMEOUT, output).await {
        Err(_) => Err(format!("the check did not finish within {}s", CHECK_TIMEOUT.as_secs())),
        Ok(Err(e)) => Err(format!("cannot run {}: {e}", runner_bin.display())),
        Ok(Ok(output)) if output.status.success() => Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned()),
        Ok(Ok(output)) => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            // `Error: <why>` from the runner; keep it on one line.
            Err(stderr.trim().trim_start_matches("Error: ").replace('\n', " "))
        }
    }
}

/// Removes the session cgroups of the runner that had `pid`, killing what is
/// left in them. Blocking; a runner that ended cleanly has done it already.
pub fn remove_cgroups(pid: u32) {
    let (Ok(memberships), Ok(mounts)) =
        (std::fs::read_to_string("/proc/self/cgroup"), std::fs::read_to_string("/proc/self/mountinfo"))
    else {
        return;
    };
    for controller in Controller::ALL {
        let Some(hierarchy) = locate(&memberships, &mounts, controller) else { continue };
        remove_tree(&hierarchy.dir.join(session_group(pid)));
    }
}

/// Removes a cgroup and the ones below it (the executor's, when it was
/// killed too), killing whatever is still in them.
fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    let deadline = std::time::Instant::now() + REMOVE_PATIENCE;
    while dir.exists() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse().ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => break,
            Err(e) if std::time::Instant::now() >= deadline => {
                tracing::warn!(cgroup = %dir.display(), "cannot remove a runner's cgroup: {e}");
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
