//! No code outlives its session: whichever way the runner ends its MCP
//! server (DELETE while a call runs, the server killed, its grace expiring),
//! every process below it is gone, including code that left its process
//! group with `setsid` and its parent with a double fork. These run without
//! the sandbox (`SANDBOX=off`), whose PID namespace ends everything by
//! itself: they test the runner's own reaping, which is all there is where
//! no sandbox can be made (see `sandbox.rs` for the sandboxed cases).

use std::path::Path;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::StatusCode;
use serde_json::json;

use crate::support::*;

/// Python that double-forks a `sleep` into a session of its own, detached
/// from every pipe, which writes its pid to `pidfile`.
fn detach(pidfile: &Path) -> String {
    double_fork(&format!(
        "with open(\"{pidfile}.tmp\", \"w\") as f:\n    f.write(str(os.getpid()))\n\
         os.replace(\"{pidfile}.tmp\", \"{pidfile}\")\nos.execvp(\"sleep\", [\"sleep\", \"1000\"])",
        pidfile = pidfile.display()
    ))
}

/// The pid in `pidfile`, once it is there.
async fn pid_in(pidfile: &Path) -> i32 {
    eventually(&format!("{} is written", pidfile.display()), || pidfile.exists()).await;
    std::fs::read_to_string(pidfile).unwrap().trim().parse().unwrap()
}

/// Pids this test's code started; whatever is still alive when the test ends
/// (because it failed) is killed, so a failure leaves nothing behind.
#[derive(Default)]
struct Started(Vec<i32>);

impl Started {
    fn add(&mut self, pid: i32) -> i32 {
        self.0.push(pid);
        pid
    }

    async fn all_gone(&self, what: &str) {
        for &pid in &self.0 {
            eventually(&format!("{what}: {pid} is gone"), || gone(pid)).await;
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if !gone(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// Starts a call that detaches a `sleep` (its pid goes to `pidfile`), then
/// runs until killed; returns the call's task and its python's pid.
async fn start_blocking_call(
    http: &Http,
    session: &str,
    id: i64,
    pidfile: &Path,
) -> (tokio::task::JoinHandle<Reply>, i32) {
    let marker = format!("dynogate_cleanup_marker_{id}_{session}");
    let code = format!("{}\nimport time\n{marker} = 1\ntime.sleep(1000)", detach(pidfile));
    let call = tokio::spawn({
        let (http, session) = (http.clone(), session.to_owned());
        async move { http.call(&session, id, "code_exec_python", json!({"code": code})).await }
    });
    let mut found = None;
    eventually("the blocking call is running", || {
        found = pid_with_arg(&marker);
        found.is_some()
    })
    .await;
    (call, found.unwrap())
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
}

#[tokio::test]
async fn delete_mid_call_leaves_no_process_behind() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::with(Options::default().env("SANDBOX", "off"));
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let runner = runner_pids(&session)[0];
    let mut started = Started::default();

    // A call that detaches a process and returns. Where the executor has a
    // cgroup per command, the process dies with the call; either way, what
    // exits below the runner is reaped while the session goes on.
    let finished = http.call(&session, 1, "code_exec_python", json!({"code": detach(&dir.path().join("a"))})).await;
    assert_eq!(exec_result(&finished.json)["returncode"], 0, "{}", finished.text);
    started.add(pid_in(&dir.path().join("a")).await);
    eventually("the runner has reaped every child that exited", || {
        children_of(runner).into_iter().all(|pid| !is_zombie(pid))
    })
    .await;

    let (call, python) = start_blocking_call(&http, &session, 2, &dir.path().join("b")).await;
    started.add(python);
    let detached = started.add(pid_in(&dir.path().join("b")).await);
    assert!(!gone(detached), "the detached sleep runs while the session does");

    assert_eq!(http.delete(&session).await, StatusCode::NO_CONTENT);
    started.all_gone("after DELETE").await;
    eventually("the runner exits", || gone(runner)).await;
    call.abort();
}

#[tokio::test]
async fn a_killed_server_leaves_no_process_behind() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::with(Options::default().env("SANDBOX", "off"));
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let runner = runner_pids(&session)[0];
    let executor = children_of(runner);
    assert_eq!(executor.len(), 1, "the runner's one child is the executor: {executor:?}");
    let mut started = Started::default();
    let (call, python) = start_blocking_call(&http, &session, 1, &dir.path().join("b")).await;
    started.add(python);
    started.add(pid_in(&dir.path().join("b")).await);

    // SIGKILL: the executor gets no chance to kill its commands or their cgroups.
    kill(Pid::from_raw(executor[0]), Signal::SIGKILL).unwrap();
    let reply = call.await.unwrap();
    assert_eq!(reply.error_code(), -32003, "{}", reply.text);
    started.all_gone("after the executor was killed").await;
    eventually("the runner exits", || gone(runner)).await;
}

#[tokio::test]
async fn a_server_past_its_grace_leaves_no_process_behind() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("detached.pid");
    // The echo server answers, then exits when its stdin closes; the shell
    // around it does not, so the grace runs out. Before that, a `sleep`
    // leaves the group with `setsid`.
    let (_script_dir, server) = script(
        "server",
        &format!(
            "setsid sh -c 'echo $$ > {pidfile}; exec sleep 1000' </dev/null >/dev/null 2>&1 &\n\"{ECHO}\"\nexec sleep 1000",
            pidfile = pidfile.display()
        ),
    );
    let gateway = Gateway::with(
        Options::default()
            .env("RUNNER_COMMAND", server.display().to_string())
            .env("RUNNER_STOP_GRACE", "300ms")
            .env("SANDBOX", "off"),
    );
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let runner = runner_pids(&session)[0];
    eventually("the detached sleep has written its pid", || {
        std::fs::read_to_string(&pidfile).is_ok_and(|text| text.ends_with('\n'))
    })
    .await;
    let mut started = Started::default();
    started.add(std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap());
    assert!(!gone(started.0[0]));

    assert_eq!(http.delete(&session).await, StatusCode::NO_CONTENT);
    started.all_gone("after the grace ran out").await;
    eventually("the runner exits", || gone(runner)).await;
}
