//! The executor's waiting shim (`runner limit --job-from-stdin`), driven
//! through its supervisor in this process, with a plain directory standing
//! for the pids cgroup hierarchy so the test sees what is written there.

use std::path::Path;
use std::time::Duration;

use dynogate_runner::exec::cgroup::PidsRoot;
use dynogate_runner::exec::limits::Limits;
use dynogate_runner::exec::process::{Job, Supervisor};

use crate::support::*;

fn job(cwd: &Path, script: &str, processes: u64) -> Job {
    Job {
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        cwd: cwd.to_owned(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into()), ("MARK".into(), "from-the-job".into())],
        deadline: tokio::time::Instant::now() + Duration::from_secs(30),
        max_output: 64 * 1024,
        limits: Some(Limits {
            memory: Some(1 << 30),
            cpu_seconds: Some(60),
            processes: Some(processes),
            file_size: None,
        }),
    }
}

/// Waiting shims of this test: started from `runner` with `--cgroup` under `root`.
fn spares(root: &Path) -> Vec<i32> {
    children_of(i32::try_from(std::process::id()).unwrap())
        .into_iter()
        .filter(|pid| {
            argv_of(*pid).is_some_and(|argv| {
                argv.iter().any(|a| a == "--job-from-stdin")
                    && argv.iter().any(|a| a.starts_with(root.to_str().unwrap()))
            })
        })
        .collect()
}

/// The `run-*` cgroup whose `cgroup.procs` names `pid`, and its `pids.max`.
fn cgroup_of(root: &Path, pid: &str) -> Option<String> {
    std::fs::read_dir(root).unwrap().flatten().find_map(|entry| {
        let procs = std::fs::read_to_string(entry.path().join("cgroup.procs")).ok()?;
        (procs.trim() == pid).then(|| std::fs::read_to_string(entry.path().join("pids.max")).unwrap())
    })
}

#[tokio::test]
async fn a_waiting_shim_takes_each_command_in_its_cgroup_and_a_dead_one_is_replaced() {
    let root = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let supervisor = Supervisor::new(RUNNER.into(), Some(PidsRoot::at(root.path().join("executor")).unwrap()));
    let groups = root.path().join("executor");
    supervisor.prime(Some(64));
    eventually("a shim waits", || spares(&groups).len() == 1).await;
    let waiting = spares(&groups)[0];

    // The waiting shim becomes the command: same pid, already in its cgroup,
    // with the job's environment, working directory and limits.
    let out = supervisor.run(&job(cwd.path(), "echo $$ $MARK $(pwd); ulimit -d", 64)).await.unwrap();
    let printed: Vec<&str> = out.stdout.split_whitespace().collect();
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(printed[0], waiting.to_string(), "the command is the shim that waited");
    assert_eq!(printed[1..3], ["from-the-job", cwd.path().to_str().unwrap()]);
    assert_eq!(printed[3], (1u64 << 30 >> 10).to_string(), "RLIMIT_DATA from the job, in KiB");
    assert_eq!(cgroup_of(&groups, printed[0]).as_deref(), Some("64"));

    // The next one is waiting already; killed, it is replaced on the spot.
    eventually("the next shim waits", || spares(&groups).len() == 1).await;
    let next = spares(&groups)[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(next), nix::sys::signal::Signal::SIGKILL).unwrap();
    eventually("it is gone", || gone(next)).await;
    let out = supervisor.run(&job(cwd.path(), "echo $$", 32)).await.unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    assert_ne!(out.stdout.trim(), next.to_string());
    assert_eq!(cgroup_of(&groups, out.stdout.trim()).as_deref(), Some("32"), "a command's own cap");

    // Shutting down kills the shim left waiting.
    eventually("a shim waits again", || spares(&groups).len() == 1).await;
    let last = spares(&groups)[0];
    supervisor.shut_down();
    eventually("the waiting shim is gone", || gone(last)).await;
    assert!(supervisor.run(&job(cwd.path(), "echo late", 64)).await.is_err(), "nothing starts after shut_down");
    assert!(spares(&groups).is_empty());
}
