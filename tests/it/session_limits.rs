//! A sandboxed session's limits hold for all of its processes together, for
//! code run by a root gateway (cgroups of the session's) and by an
//! unprivileged one without a delegated cgroup tree (RLIMIT_NPROC counted in
//! the sandbox's user namespace, what commands leave behind ended when none
//! runs, memory and CPU watched by the runner). Each test runs as whoever
//! runs the suite and, when that is root, again as an unprivileged user.

use serde_json::json;

use crate::sandbox::{python, sandbox_works, stdout};
use crate::support::*;

#[tokio::test]
async fn a_fork_bomb_and_a_process_flood_hit_the_session_cap() {
    if !sandbox_works() {
        return;
    }
    for (who, options) in as_each_user(|| {
        Options::default()
            .env("SESSION_MAX_PROCESSES", "64")
            .env("EXEC_MAX_PROCESSES", "1000")
            .env("EXEC_RUN_TIMEOUT", "5s")
    }) {
        let gateway = Gateway::with(options);
        let http = gateway.http();
        let (session, _) = http.initialize().await;
        // Each call leaves as many detached sleepers as it can: the session's
        // cap stops it, and what it left is gone with the call, so the next
        // call of the session starts again from nothing.
        let flood = r#"
import subprocess
n = 0
try:
    for _ in range(100):
        subprocess.Popen(["setsid", "sleep", "1000"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        n += 1
except OSError as e:
    print("refused", e.errno)
print(n)
"#;
        for id in 1..=3 {
            let result = python(&http, &session, id, flood).await;
            let out = stdout(&result);
            let started: u64 =
                out.lines().last().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{who}: {result}"));
            assert!(out.starts_with("refused 11"), "{who}, call {id}: {result}");
            assert!(started > 10 && started < 64, "{who}: call {id} started {started} in a session capped at 64");
        }
        let bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n";
        let _ = http.call(&session, 4, "code_exec_python", json!({ "code": bomb })).await;
        // The session goes on once the bomb is cleared; others never noticed.
        assert_eq!(stdout(&python(&http, &session, 5, "print('fine')").await), "fine", "{who}");
        let (other, _) = http.initialize().await;
        assert_eq!(stdout(&python(&http, &other, 1, "print('fine')").await), "fine", "{who}");
    }
}

#[tokio::test]
async fn memory_and_disk_are_capped_per_session() {
    if !sandbox_works() {
        return;
    }
    for (who, options) in as_each_user(|| {
        Options::default()
            .env("SESSION_MAX_MEMORY", "1GiB")
            .env("EXEC_MAX_MEMORY", "0")
            .env("SESSION_MAX_DISK", "256MiB")
            .env("EXEC_MAX_FILE_SIZE", "0")
    }) {
        let gateway = Gateway::with(options);
        let http = gateway.http();
        let (session, _) = http.initialize().await;
        // Three processes of 600 MiB each, touching every page.
        let hogs = r#"
import subprocess, sys
hog = "b = bytearray(600 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nimport time; time.sleep(3)\nprint('survived')"
procs = [subprocess.Popen([sys.executable, "-c", hog], stdout=subprocess.PIPE) for _ in range(3)]
print([p.wait() for p in procs], sum(p.stdout.read().count(b"survived") for p in procs))
"#;
        let result = python(&http, &session, 1, hogs).await;
        let out = stdout(&result);
        assert!(
            out.ends_with(" 0") || out.ends_with(" 1"),
            "{who}: more than 1 GiB lived in a 1 GiB session: {result}"
        );
        // Killed by the limit (SIGKILL), not dead of something else.
        assert!(out.matches("-9").count() >= 2, "{who}: the hogs were not killed: {result}");
        // A 2 GiB file does not fit, in the session directory or in /tmp.
        let big = r#"
import os
for path in ("big", "/tmp/big"):
    try:
        with open(path, "wb") as f:
            for _ in range(2048):
                f.write(b"\0" * (1 << 20))
        print(path, "written")
    except OSError as e:
        print(path, "refused", e.errno)
    finally:
        if os.path.exists(path):
            os.remove(path)
"#;
        let result = python(&http, &session, 2, big).await;
        assert_eq!(stdout(&result), "big refused 28\n/tmp/big refused 28", "{who}: {result}");
        assert_eq!(stdout(&python(&http, &session, 3, "print('fine')").await), "fine", "{who}");
    }
}

#[tokio::test]
async fn a_session_gets_its_cpu_share_and_no_more() {
    if !sandbox_works() {
        return;
    }
    // Two busy processes for three seconds, in a session allowed half a
    // core: they get about 1.5 s of CPU between them, not up to 6.
    let busy = r#"
import os, subprocess, sys, time
spin = "import time\nend = time.time() + 3\nwhile time.time() < end: pass"
began = time.time()
procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2)]
for p in procs:
    p.wait()
used = os.times().children_user + os.times().children_system
print(round(used / (time.time() - began), 2))
"#;
    let limited = as_each_user(|| Options::default().env("SESSION_MAX_CPUS", "0.5"));
    let unlimited = as_each_user(|| Options::default().env("SESSION_MAX_CPUS", "0"));
    for ((who, limited), (_, unlimited)) in limited.into_iter().zip(unlimited) {
        let cores = cores_used(who, limited, busy).await;
        let free = cores_used(who, unlimited, busy).await;
        eprintln!("{who}: two busy processes used {cores} cores in a session allowed 0.5, {free} without a limit");
        assert!(cores <= 0.8, "{who}: a session allowed 0.5 cores used {cores}");
        // Where the machine had cores to spare, the limit is what held them back.
        if free >= 1.0 {
            assert!(cores < free - 0.3, "{who}: {cores} cores with the limit, {free} without");
        }
    }
}

/// The cores `busy` reports using, in a new session of a gateway started
/// with `options`; the session still answers afterwards.
async fn cores_used(who: &str, options: Options, busy: &str) -> f64 {
    let gateway = Gateway::with(options);
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let result = python(&http, &session, 1, busy).await;
    let cores: f64 = stdout(&result).trim().parse().unwrap_or_else(|_| panic!("{who}: {result}"));
    // Held back, not broken: the session still answers.
    assert_eq!(stdout(&python(&http, &session, 2, "print('fine')").await), "fine", "{who}");
    cores
}
