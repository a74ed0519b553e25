//! Code in one session, tried as an attacker would, against the local
//! sandbox: it cannot reach another session, a secret, the gateway or the
//! host (a session's limits: `session_limits`). These run as whoever runs
//! the suite (root in CI); one test starts the gateway as an unprivileged
//! user too.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::*;

/// Secrets the gateway holds in these tests; none may show up in anything
/// code can read.
const API_KEY: &str = "sandbox-test-api-key-7f3a9c";
const DATABASE_URL: &str = "postgres://u:sandbox-db-password-51e0@127.0.0.1/x";
const FILE_SECRET: &str = "sandbox-file-secret-c0ffee";

/// Whether this machine can sandbox sessions; when not, the tests here say
/// so and pass vacuously (the gateway then logs that sessions run unconfined;
/// `.ci/run` installs bubblewrap so CI runs them).
pub(crate) fn sandbox_works() -> bool {
    let check = std::process::Command::new(RUNNER).arg("sandbox-check").output().expect("run the runner");
    if !check.status.success() {
        eprintln!("SKIPPED: no sandbox here: {}", String::from_utf8_lossy(&check.stderr).trim());
    }
    check.status.success()
}

/// Runs Python in `session`, returning its result object.
pub(crate) async fn python(http: &Http, session: &str, id: i64, code: &str) -> Value {
    let reply = http.call(session, id, "code_exec_python", json!({ "code": code })).await;
    exec_result(&reply.json)
}

pub(crate) fn stdout(result: &Value) -> &str {
    result["stdout"].as_str().unwrap_or_default()
}

/// A gateway holding secrets in its environment and in a file of its
/// working directory, as a laptop user's would.
fn gateway_with_secrets(options: Options) -> (Gateway, tempfile::TempDir) {
    let cwd = tempfile::tempdir().unwrap();
    std::fs::write(cwd.path().join(".env"), format!("SECRET={FILE_SECRET}\n")).unwrap();
    let gateway = Gateway::with(options.api_key(API_KEY).env("DATABASE_URL", DATABASE_URL).cwd(cwd.path()));
    (gateway, cwd)
}

/// Python that reads every `/proc/*/environ` and `cmdline` it can, and a
/// list of paths, and prints whatever it could read.
fn snoop(paths: &[&str]) -> String {
    format!(
        r#"
import os, glob
seen = []
for f in glob.glob("/proc/*/environ") + glob.glob("/proc/*/cmdline") + {paths:?}:
    try:
        with open(f, "rb") as h:
            seen.append(h.read().decode("latin-1"))
    except OSError:
        pass
seen.append(repr(dict(os.environ)))
print("\n".join(seen))
print("pids:", sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
"#
    )
}

#[tokio::test]
async fn code_finds_no_secret_and_no_other_session() {
    if !sandbox_works() {
        return;
    }
    let (gateway, cwd) = gateway_with_secrets(Options::default());
    let http = gateway.http();
    let ((a, _), (b, _)) = tokio::join!(http.initialize(), http.initialize());

    let mine = python(&http, &b, 1, "import os; open('b-note','w').write('b'); print(os.getcwd())").await;
    let dir_b = stdout(&mine).trim().to_owned();
    let env_file = cwd.path().join(".env");
    let runner_b = runner_pids(&b)[0];
    let paths = [
        env_file.to_str().unwrap().to_owned(),
        format!("{dir_b}/b-note"),
        format!("/proc/{}/environ", gateway.pid()),
        format!("/proc/{runner_b}/environ"),
    ];
    let snooped = python(&http, &a, 1, &snoop(&paths.iter().map(String::as_str).collect::<Vec<_>>())).await;
    let text = format!("{}{}", stdout(&snooped), snooped["stderr"]);
    for secret in [API_KEY, DATABASE_URL, "sandbox-db-password", FILE_SECRET, SECRET] {
        assert!(!text.contains(secret), "code in a session found {secret:?}");
    }
    // Its own process space: none of the host's processes are visible.
    let pids: Vec<i32> =
        serde_json::from_str(stdout(&snooped).lines().find_map(|l| l.strip_prefix("pids: ")).expect("the snoop ran"))
            .expect("a list of pids");
    assert!(!pids.is_empty() && pids.len() < 20, "the session sees only its few processes: {pids:?}");
    assert!(!pids.contains(&runner_b), "another session's runner is visible: {pids:?}");

    // Another session's directory is not there at all, by path or by listing.
    let probe = python(
        &http,
        &a,
        2,
        &format!(
            "import os\nprint(os.path.exists({dir_b:?}))\n\
             print([n for n in os.listdir('/tmp') if n.startswith('dynogate') and n != os.path.basename(os.getcwd())])\n\
             print(os.getuid())"
        ),
    )
    .await;
    let lines: Vec<&str> = stdout(&probe).lines().collect();
    assert_eq!(lines[..2], ["False", "[]"], "{probe}");
    if nix::unistd::geteuid().is_root() {
        assert_ne!(lines[2], "0", "code runs as root");
    }
    // And B still has its file.
    let still = python(&http, &b, 2, "print(open('b-note').read())").await;
    assert_eq!(stdout(&still), "b");
}

#[tokio::test]
async fn code_cannot_signal_the_gateway_or_another_session() {
    if !sandbox_works() {
        return;
    }
    let gateway = Gateway::start();
    let http = gateway.http();
    let ((a, _), (b, _)) = tokio::join!(http.initialize(), http.initialize());
    let runner_b = runner_pids(&b)[0];
    let look = format!(
        r#"
import os
for pid in ({gateway}, {runner_b}):
    try:
        os.kill(pid, 0)
        print("visible")
    except ProcessLookupError:
        print("absent")
    except PermissionError:
        print("denied")
"#,
        gateway = gateway.pid()
    );
    let looked = python(&http, &a, 1, &look).await;
    for line in stdout(&looked).lines() {
        assert_ne!(line, "visible", "code could signal a process outside its session: {looked}");
    }
    // Killing everything it may kill ends at most its own session.
    let _ =
        http.call(&a, 2, "code_exec_python", json!({ "code": "import os, signal; os.kill(-1, signal.SIGKILL)" })).await;
    assert!(!gone(gateway.pid()), "the gateway was killed");
    assert!(!gone(runner_b), "another session's runner was killed");
    let still = python(&http, &b, 1, "print('b lives')").await;
    assert_eq!(stdout(&still), "b lives");
}

#[tokio::test]
async fn nothing_planted_in_one_session_runs_in_another() {
    if !sandbox_works() {
        return;
    }
    let gateway = Gateway::start();
    let http = gateway.http();
    let (a, _) = http.initialize().await;
    let plant = r#"
import os, site
home = os.path.expanduser("~")
user_site = site.getusersitepackages()
os.makedirs(user_site, exist_ok=True)
open(os.path.join(user_site, "usercustomize.py"), "w").write("print('PLANTED')\n")
open(os.path.join(home, ".npmrc"), "w").write("registry=http://127.0.0.1:9/\n")
os.makedirs(os.path.join(home, ".config", "pip"), exist_ok=True)
open(os.path.join(home, ".config", "pip", "pip.conf"), "w").write("[global]\nindex-url = http://127.0.0.1:9/\n")
print(home)
"#;
    let planted = python(&http, &a, 1, plant).await;
    let home_a = stdout(&planted).trim().to_owned();
    assert!(!home_a.is_empty(), "{planted}");
    let (b, _) = http.initialize().await;
    let seen = python(&http, &b, 1, "import os; print(os.path.expanduser('~'))").await;
    assert!(!stdout(&seen).contains("PLANTED"), "A's usercustomize ran in B: {seen}");
    assert_ne!(stdout(&seen).trim(), home_a, "sessions share a home");
    // Its own plant does run in A: the check above means something.
    let own = python(&http, &a, 2, "print('a')").await;
    assert!(stdout(&own).contains("PLANTED"), "{own}");
}

#[tokio::test]
async fn a_setsid_double_fork_is_gone_with_its_call_and_its_session() {
    if !sandbox_works() {
        return;
    }
    for (who, options) in as_each_user(Options::default) {
        let gateway = Gateway::with(options);
        let http = gateway.http();
        let (session, _) = http.initialize().await;
        let escape = |marker: &str, then: &str| {
            let sleep = format!(
                "os.execv(sys.executable, [sys.executable, \"-c\", \"import time; time.sleep(1000)\", \"{marker}\"])"
            );
            format!("{}import time\n{then}\n", double_fork(&sleep))
        };
        // One that escapes a call that returns is gone with the call. The
        // call sees it running first, so its absence later means something.
        let marker = format!("dynogate-escapee-{}", &session[..12]);
        let see_it = format!(
            "def running():\n    for p in filter(str.isdigit, os.listdir('/proc')):\n        try:\n            \
             if b'{marker}' in open(f'/proc/{{p}}/cmdline', 'rb').read(): return True\n        \
             except OSError: pass\n    return False\n\
             deadline = time.time() + 10\nwhile not running() and time.time() < deadline: time.sleep(0.02)\n\
             print('running' if running() else 'never ran')"
        );
        let result = python(&http, &session, 1, &escape(&marker, &see_it)).await;
        assert_eq!(stdout(&result), "running", "{who}: {result}");
        eventually(&format!("{who}: the escapee of a finished call is gone"), || pid_with_arg(&marker).is_none()).await;
        // One that escapes a call still running is gone with the session.
        let marker = format!("dynogate-escapee-late-{}", &session[..12]);
        let code = escape(&marker, "time.sleep(1000)");
        let call = tokio::spawn({
            let (http, session) = (http.clone(), session.clone());
            async move { http.call(&session, 2, "code_exec_python", json!({ "code": code })).await }
        });
        eventually(&format!("{who}: the escapee runs"), || pid_with_arg(&marker).is_some()).await;
        assert_eq!(http.delete(&session).await, StatusCode::NO_CONTENT);
        eventually(&format!("{who}: the escapee is gone with its session"), || pid_with_arg(&marker).is_none()).await;
        call.abort();
    }
}

#[tokio::test]
async fn killed_executor_or_runner_leaves_nothing() {
    if !sandbox_works() {
        return;
    }
    let runs = as_each_user(Options::default)
        .into_iter()
        .flat_map(|(who, options)| [("executor", who, options.clone()), ("runner", who, options)]);
    for (victim, who, options) in runs {
        let gateway = Gateway::with(options);
        let http = gateway.http();
        let (session, _) = http.initialize().await;
        let runner = runner_pids(&session)[0];
        let marker = format!("dynogate-killed-{victim}-{}", &session[..12]);
        let code = format!(
            "import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'import time; time.sleep(1000)', '{marker}'])"
        );
        let call = tokio::spawn({
            let (http, session) = (http.clone(), session.clone());
            async move { http.call(&session, 1, "code_exec_python", json!({ "code": code })).await }
        });
        eventually("the call runs", || pid_with_arg(&marker).is_some()).await;
        let pid = match victim {
            "executor" => executor_of(runner).expect("an executor below the runner"),
            _ => runner,
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
        let _ = call.await;
        eventually(&format!("{who}, {victim} killed: the call's processes are gone"), || {
            pid_with_arg(&marker).is_none()
        })
        .await;
        let _ = http.delete(&session).await;
        eventually(&format!("{who}, {victim} killed: the runner is gone"), || gone(runner)).await;
        let group = format!("dynogate-session-{runner}");
        eventually(&format!("{who}, {victim} killed: no cgroup is left"), || !cgroup_exists(&group)).await;
        eventually(&format!("{who}, {victim} killed: no session directory is left"), || {
            !session_dirs().iter().any(|d| d.contains(&session[..8]))
        })
        .await;
    }
}

/// The executor below a runner: the `runner exec` process in its sandbox.
fn executor_of(runner: i32) -> Option<i32> {
    let mut queue = vec![runner];
    while let Some(pid) = queue.pop() {
        for child in children_of(pid) {
            if argv_of(child).is_some_and(|argv| argv.get(1).is_some_and(|a| a == "exec")) {
                return Some(child);
            }
            queue.push(child);
        }
    }
    None
}

fn cgroup_exists(name: &str) -> bool {
    walk("/sys/fs/cgroup", 4).iter().any(|dir| dir.ends_with(name))
}

fn walk(root: &str, depth: usize) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else { return found };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let path = entry.path().display().to_string();
            if depth > 0 {
                found.extend(walk(&path, depth - 1));
            }
            found.push(path);
        }
    }
    found
}

/// Session directories under the temporary directory.
fn session_dirs() -> Vec<String> {
    std::fs::read_dir(std::env::temp_dir())
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("dynogate-session-"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn an_unprivileged_gateway_confines_its_sessions_too() {
    if !sandbox_works() {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        // Already unprivileged: the other tests cover it.
        return;
    }
    // The binaries must be reachable by the unprivileged user.
    for dir in Path::new(RUNNER).ancestors().skip(1) {
        let mode = std::fs::metadata(dir).map(|m| m.permissions().mode()).unwrap_or(0);
        if mode & 0o001 == 0 {
            eprintln!("skipped: {} is not searchable by other users", dir.display());
            return;
        }
    }
    let (gateway, _cwd) = gateway_with_secrets(
        Options::default().user(65_534).env("PATH", "/usr/local/bin:/usr/bin:/bin").env("HOME", "/nonexistent"),
    );
    let http = gateway.http();
    let ((a, _), (b, _)) = tokio::join!(http.initialize(), http.initialize());
    let mine = python(&http, &b, 1, "import os; print(os.getcwd())").await;
    let dir_b = stdout(&mine).trim().to_owned();
    assert!(!dir_b.is_empty(), "{mine}");
    let snooped = python(&http, &a, 1, &snoop(&[&format!("/proc/{}/environ", gateway.pid())])).await;
    let text = stdout(&snooped);
    assert!(text.contains("pids:"), "{snooped}");
    for secret in [API_KEY, DATABASE_URL, FILE_SECRET, SECRET] {
        assert!(!text.contains(secret), "code found {secret:?}");
    }
    let probe = python(&http, &a, 2, &format!("import os\nprint(os.path.exists({dir_b:?}))")).await;
    assert_eq!(stdout(&probe), "False");
    // Code runs as the gateway's own user here, yet cannot plant anything
    // in B's home nor signal anything outside its session.
    let plant = "import os, site\nd = site.getusersitepackages()\nos.makedirs(d, exist_ok=True)\n\
                 open(os.path.join(d, 'usercustomize.py'), 'w').write(\"print('PLANTED')\")\nprint('ok')";
    python(&http, &a, 3, plant).await;
    let clean = python(&http, &b, 2, "print('b')").await;
    assert_eq!(stdout(&clean), "b", "A's plant ran in B");
    let _ =
        http.call(&a, 4, "code_exec_python", json!({ "code": "import os, signal; os.kill(-1, signal.SIGKILL)" })).await;
    assert!(!gone(gateway.pid()), "the gateway was killed");
    assert_eq!(stdout(&python(&http, &b, 3, "print('b lives')").await), "b lives");
}

#[tokio::test]
async fn kernel_interfaces_code_has_no_use_for_are_absent() {
    if !sandbox_works() || std::env::consts::ARCH != "x86_64" {
        return;
    }
    let gateway = Gateway::start();
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    // keyctl, bpf, io_uring_setup, perf_event_open and userfaultfd by number
    // (x86_64), then something ordinary.
    let code = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
for number in (250, 321, 425, 298, 323):
    ctypes.set_errno(0)
    result = libc.syscall(number, 0, 0, 0, 0, 0)
    print(number, result, ctypes.get_errno())
print(os.getpid() > 0)
"#;
    let result = python(&http, &session, 1, code).await;
    let out = stdout(&result);
    for number in ["250", "321", "425", "298", "323"] {
        assert!(out.contains(&format!("{number} -1 38")), "syscall {number} was not refused with ENOSYS: {result}");
    }
    assert!(out.ends_with("True"), "{result}");
}

#[tokio::test]
async fn sandboxed_sessions_install_with_the_uv_the_gateway_obtained_and_cannot_change_it() {
    if !sandbox_works() {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let path = path_without_uv();
    let gateway =
        Gateway::with(Options::default().env("PATH", path).env("XDG_CACHE_HOME", cache.path().to_str().unwrap()));
    let versions = cache.path().join("dynogate-exec").join("tools").join("uv");
    let obtained = || {
        std::fs::read_dir(&versions)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin").join("uv"))
            .find(|uv| uv.is_file() && !uv.to_string_lossy().contains(".partial-"))
    };
    eventually("the gateway obtained uv at start-up", || obtained().is_some()).await;
    let uv = obtained().unwrap();
    let before = std::fs::read(&uv).unwrap();

    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let code = format!(
        "import importlib.metadata as m\n\
         print(m.distribution('tomli_w').read_text('INSTALLER').strip())\n\
         try:\n    open({uv:?}, 'ab').write(b'tampered')\n    print('changed')\n\
         except OSError as e:\n    print('refused', e.errno)",
        uv = uv.to_str().unwrap()
    );
    let reply = http.call(&session, 1, "code_exec_python", json!({"code": code, "packages": ["tomli-w"]})).await;
    let result = exec_result(&reply.json);
    let lines: Vec<&str> = stdout(&result).lines().collect();
    assert_eq!(lines.first(), Some(&"uv"), "the session installed with the obtained uv: {result}");
    assert!(lines.get(1).is_some_and(|l| l.starts_with("refused")), "{result}");
    assert_eq!(std::fs::read(&uv).unwrap(), before, "the machine's uv is unchanged");
}
