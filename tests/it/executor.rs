use std::time::{Duration, Instant};

use serde_json::json;

use crate::stdio::{Exec, have};
use crate::support::*;

/// One language's tool and the snippets the tests run in it.
struct Lang {
    tool: &'static str,
    program: &'static str,
    hello: &'static str,
    exit_3: &'static str,
    sleep: &'static str,
    print_env: &'static str,
}

const PYTHON: Lang = Lang {
    tool: "code_exec_python",
    program: "python3",
    hello: "print('hello from python')",
    exit_3: "import sys; print(1); sys.exit(3)",
    sleep: "import time; time.sleep(30)",
    print_env: "import os\nfor k, v in sorted(os.environ.items()): print(f'{k}={v}')",
};

const NODE: Lang = Lang {
    tool: "code_exec_node",
    program: "node",
    hello: "console.log('hello from node')",
    exit_3: "console.log(1); process.exit(3)",
    sleep: "setTimeout(() => {}, 30000)",
    print_env: "for (const [k, v] of Object.entries(process.env)) console.log(`${k}=${v}`)",
};

const RUBY: Lang = Lang {
    tool: "code_exec_ruby",
    program: "ruby",
    hello: "puts 'hello from ruby'",
    exit_3: "puts 1; exit 3",
    sleep: "sleep 30",
    print_env: "ENV.each { |k, v| puts \"#{k}=#{v}\" }",
};

const GO: Lang = Lang {
    tool: "code_exec_go",
    program: "go",
    hello: "package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"hello from go\") }\n",
    exit_3: "package main\n\nimport (\"fmt\"; \"os\")\n\nfunc main() { fmt.Println(1); os.Exit(3) }\n",
    sleep: "package main\n\nimport \"time\"\n\nfunc main() { time.Sleep(30 * time.Second) }\n",
    print_env: "package main\n\nimport (\"fmt\"; \"os\")\n\nfunc main() { for _, kv := range os.Environ() { fmt.Println(kv) } }\n",
};

const ALL: [&Lang; 4] = [&PYTHON, &NODE, &RUBY, &GO];

async fn says_hello_and_reports_exit_codes(lang: &Lang) {
    if !have(lang.program) {
        return;
    }
    let mut exec = Exec::start(&[]).await;
    assert!(exec.tools().await.iter().any(|t| t == lang.tool), "{} is listed", lang.tool);
    let name = lang.tool.trim_start_matches("code_exec_");
    let hello = exec.run(lang.tool, lang.hello, &[]).await;
    assert_eq!(hello, json!({"returncode": 0, "stdout": format!("hello from {name}"), "stderr": ""}));
    let failed = exec.run(lang.tool, lang.exit_3, &[]).await;
    assert_eq!((failed["returncode"].as_i64(), failed["stdout"].as_str()), (Some(3), Some("1")), "{failed}");
}

#[tokio::test]
async fn python_says_hello() {
    says_hello_and_reports_exit_codes(&PYTHON).await;
}

#[tokio::test]
async fn node_says_hello() {
    says_hello_and_reports_exit_codes(&NODE).await;
}

#[tokio::test]
async fn ruby_says_hello() {
    says_hello_and_reports_exit_codes(&RUBY).await;
}

#[tokio::test]
async fn go_says_hello() {
    says_hello_and_reports_exit_codes(&GO).await;
}

#[tokio::test]
async fn node_runs_both_module_kinds_and_reports_compile_errors_of_go() {
    if have("node") {
        let mut exec = Exec::start(&[]).await;
        let esm = exec.run("code_exec_node", "import os from 'node:os'; console.log(typeof os.cpus)", &[]).await;
        assert_eq!(esm["stdout"], "function", "{esm}");
        let cjs = exec.run("code_exec_node", "const os = require('os'); console.log(typeof os.cpus)", &[]).await;
        assert_eq!(cjs["stdout"], "function", "{cjs}");
    }
    if have("go") {
        let mut exec = Exec::start(&[]).await;
        let broken = exec.run("code_exec_go", "package main\n\nfunc main() { x := }\n", &[]).await;
        assert_ne!(broken["returncode"], 0);
        assert!(broken["stderr"].as_str().unwrap().contains("main.go:3"), "{broken}");
    }
}

#[tokio::test]
async fn python_installs_from_pypi_into_its_session_only() {
    let mut one = Exec::start(&[]).await;
    let code = "import tomli_w; print(tomli_w.dumps({'a': 1}).strip())";
    let installed = one.run("code_exec_python", code, &["tomli-w"]).await;
    assert_eq!(installed, json!({"returncode": 0, "stdout": "a = 1", "stderr": ""}));
    let again = one.run("code_exec_python", code, &[]).await;
    assert_eq!(again["stdout"], "a = 1", "installs stay for the session");

    let mut other = Exec::start(&[]).await;
    let elsewhere = other.run("code_exec_python", "import tomli_w", &[]).await;
    assert_eq!(elsewhere["returncode"], 1, "another session does not see the package: {elsewhere}");
    assert!(elsewhere["stderr"].as_str().unwrap().contains("ModuleNotFoundError"));
}

/// Which installer put a distribution into the session's venv.
const INSTALLER: &str = "import importlib.metadata as m, sys; \
    print(m.distribution(sys.argv[0] if len(sys.argv) > 1 else 'tomli_w').read_text('INSTALLER').strip())";

#[tokio::test]
async fn python_installs_with_pip_when_uv_is_absent_and_may_not_be_obtained() {
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let path = path_without_uv();
    let env = [("PATH", path.as_str()), ("EXEC_CACHE_DIR", cache_dir), ("EXEC_OBTAIN_UV", "false")];
    let mut exec = Exec::start(&env).await;
    let code = "import tomli_w, sys; print(tomli_w.dumps({'b': 2}).strip(), sys.prefix.endswith('.venv'))";
    let installed = exec.run("code_exec_python", code, &["tomli-w"]).await;
    assert_eq!(installed, json!({"returncode": 0, "stdout": "b = 2 True", "stderr": ""}));
    assert_eq!(exec.run("code_exec_python", INSTALLER, &[]).await["stdout"], "pip");
    assert!(!cache.path().join("tools").exists(), "nothing obtained");
}

#[tokio::test]
async fn without_uv_the_first_python_install_obtains_it_once_and_later_sessions_use_it() {
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let path = path_without_uv();
    let env = [("PATH", path.as_str()), ("EXEC_CACHE_DIR", cache_dir)];
    let mut first = Exec::start(&env).await;
    let code = "import tomli_w; print(tomli_w.dumps({'c': 3}).strip())";
    assert_eq!(first.run("code_exec_python", code, &["tomli-w"]).await["stdout"], "c = 3");
    assert_eq!(first.run("code_exec_python", INSTALLER, &[]).await["stdout"], "uv", "the first install used it");
    let versions: Vec<_> = std::fs::read_dir(cache.path().join("tools").join("uv"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| !name.starts_with('.'))
        .collect();
    assert_eq!(versions.len(), 1, "one version, no partial install left: {versions:?}");
    let uv = cache.path().join("tools").join("uv").join(&versions[0]).join("bin").join("uv");
    let obtained = std::fs::metadata(&uv).expect("uv obtained into the tools directory").modified().unwrap();

    let mut second = Exec::start(&env).await;
    assert_eq!(second.run("code_exec_python", code, &["tomli-w"]).await["stdout"], "c = 3");
    assert_eq!(second.run("code_exec_python", INSTALLER, &[]).await["stdout"], "uv");
    assert_eq!(std::fs::metadata(&uv).unwrap().modified().unwrap(), obtained, "obtained once");
    assert!(!cache.path().join("pip").exists(), "pip never ran an install");
}

#[tokio::test]
async fn a_package_that_must_be_compiled_where_there_is_no_compiler_fails_saying_so() {
    // A PATH with Python and uv but no compiler, as on a heroku-24 dyno.
    let bin = tempfile::tempdir().unwrap();
    // The interpreter itself, not a version manager's shim (which needs a shell and more on PATH).
    let python = std::process::Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output();
    let python = String::from_utf8(python.expect("python3 runs").stdout).unwrap().trim().to_owned();
    std::os::unix::fs::symlink(python, bin.path().join("python3")).unwrap();
    let uv = std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|dir| dir.join("uv"))
        .find(|p| p.is_file())
        .expect("uv on PATH");
    std::os::unix::fs::symlink(uv, bin.path().join("uv")).unwrap();
    let path = bin.path().to_str().unwrap().to_owned();
    let mut exec = Exec::start(&[("PATH", &path), ("EXEC_ALLOW_PACKAGE_SOURCES", "true")]).await;
    let made = exec
        .run(
            "code_exec_python",
            "import os\nos.makedirs('ext', exist_ok=True)\n\
             open('ext/speedy.c', 'w').write('int speedy(void) { return 1; }\\n')\n\
             open('ext/setup.py', 'w').write(\"from setuptools import setup, Extension\\n\
             setup(name='speedy', version='1.0', ext_modules=[Extension('speedy', ['speedy.c'])])\\n\")\n\
             print('ok')",
            &[],
        )
        .await;
    assert_eq!(made["stdout"], "ok", "{made}");
    let failed = exec.run("code_exec_python", "import speedy", &["./ext"]).await;
    assert_ne!(failed["returncode"], 0, "{failed}");
    let stderr = failed["stderr"].as_str().unwrap();
    assert!(stderr.starts_with("Dependency install failed:"), "{stderr}");
    assert!(stderr.contains("This package has to be compiled, and this machine has no `"), "{stderr}");
    assert!(stderr.contains("a wheel for this platform"), "{stderr}");
}

#[tokio::test]
async fn node_installs_from_npm_into_its_session_only() {
    if !have("node") {
        return;
    }
    let mut one = Exec::start(&[]).await;
    let code = "const isOdd = require('is-odd'); console.log(isOdd(3), isOdd(4))";
    let installed = one.run("code_exec_node", code, &["is-odd@3.0.1"]).await;
    assert_eq!(installed, json!({"returncode": 0, "stdout": "true false", "stderr": ""}));
    let esm = one.run("code_exec_node", "import isOdd from 'is-odd'; console.log(isOdd(5))", &["is-odd"]).await;
    assert_eq!(esm["stdout"], "true", "{esm}");

    let mut other = Exec::start(&[]).await;
    let elsewhere = other.run("code_exec_node", "require('is-odd')", &[]).await;
    assert_eq!(elsewhere["returncode"], 1, "another session does not see the package: {elsewhere}");
    assert!(elsewhere["stderr"].as_str().unwrap().contains("Cannot find module"));
}

/// Builds a one-file gem named `greet` and returns its directory and `.gem` path.
fn build_gem() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("lib")).unwrap();
    std::fs::write(
        dir.path().join("lib/greet.rb"),
        "module Greet\n  def self.hi\n    'hello from a local gem'\n  end\nend\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("greet.gemspec"),
        "Gem::Specification.new do |s|\n  s.name = 'greet'\n  s.version = '0.1.0'\n  s.summary = 'hi'\n  \
         s.authors = ['dynogate']\n  s.files = ['lib/greet.rb']\nend\n",
    )
    .unwrap();
    let built = std::process::Command::new("gem")
        .args(["build", "greet.gemspec"])
        .current_dir(dir.path())
        .output()
        .expect("run gem build");
    assert!(built.status.success(), "gem build failed: {}", String::from_utf8_lossy(&built.stderr));
    let gem = dir.path().join("greet-0.1.0.gem").to_str().unwrap().to_owned();
    (dir, gem)
}

#[tokio::test]
async fn ruby_installs_a_local_gem_only_when_sources_are_allowed() {
    if !have("ruby") {
        return;
    }
    let (_dir, gem) = build_gem();
    let code = "require 'greet'; puts Greet.hi";

    let mut strict = Exec::start(&[]).await;
    let refused = strict.call("code_exec_ruby", json!({"code": code, "packages": [gem]})).await;
    assert_eq!(refused["isError"], true);
    assert!(refused["content"][0]["text"].as_str().unwrap().contains("EXEC_ALLOW_PACKAGE_SOURCES"), "{refused}");

    let mut open = Exec::start(&[("EXEC_ALLOW_PACKAGE_SOURCES", "true")]).await;
    let installed = open.run("code_exec_ruby", code, &[&gem]).await;
    assert_eq!(installed, json!({"returncode": 0, "stdout": "hello from a local gem", "stderr": ""}));
    let again = open.run("code_exec_ruby", code, &[]).await;
    assert_eq!(again["stdout"], "hello from a local gem", "installs stay for the session");

    let elsewhere = strict.run("code_exec_ruby", code, &[]).await;
    assert_eq!(elsewhere["returncode"], 1, "another session does not see the gem: {elsewhere}");
}

#[tokio::test]
async fn go_adds_a_local_module_only_when_sources_are_allowed() {
    if !have("go") {
        return;
    }
    let module = tempfile::tempdir().unwrap();
    std::fs::write(module.path().join("go.mod"), "module example.com/greet\n\ngo 1.16\n").unwrap();
    std::fs::write(
        module.path().join("greet.go"),
        "package greet\n\nfunc Hi() string { return \"hello from a local module\" }\n",
    )
    .unwrap();
    let dir = module.path().to_str().unwrap();
    let code = "package main\n\nimport (\n\t\"fmt\"\n\n\t\"example.com/greet\"\n)\n\nfunc main() { fmt.Println(greet.Hi()) }\n";

    let mut strict = Exec::start(&[]).await;
    let refused = strict.call("code_exec_go", json!({"code": code, "packages": [dir]})).await;
    assert_eq!(refused["isError"], true);

    let mut open = Exec::start(&[("EXEC_ALLOW_PACKAGE_SOURCES", "true")]).await;
    let installed = open.run("code_exec_go", code, &[dir]).await;
    assert_eq!(installed, json!({"returncode": 0, "stdout": "hello from a local module", "stderr": ""}));
    let again = open.run("code_exec_go", code, &[]).await;
    assert_eq!(again["stdout"], "hello from a local module", "the module stays required for the session");
}

#[tokio::test]
async fn a_timeout_returns_minus_two_within_a_second_of_the_limit() {
    let mut exec = Exec::start(&[("EXEC_RUN_TIMEOUT", "2s")]).await;
    exec.tools().await; // every toolchain found before the clock starts
    for lang in ALL {
        if !have(lang.program) {
            continue;
        }
        let started = Instant::now();
        let out = exec.run(lang.tool, lang.sleep, &[]).await;
        let elapsed = started.elapsed();
        assert_eq!(
            out,
            json!({"returncode": -2, "stdout": "", "stderr": "Error: Execution timed out"}),
            "{}",
            lang.tool
        );
        // Go compiles first, under the install timeout; the others must answer within timeout + 1 s.
        if lang.tool != GO.tool {
            assert!(elapsed < Duration::from_secs(3), "{} took {elapsed:?}", lang.tool);
        }
    }
}

/// Pids of processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| !gone(*pid) && argv_of(*pid).is_some_and(|argv| argv.iter().any(|a| a.contains(marker))))
        .collect()
}

#[tokio::test]
async fn a_fork_bomb_is_contained_and_the_session_goes_on() {
    let mut exec = Exec::start(&[("EXEC_MAX_PROCESSES", "40"), ("EXEC_RUN_TIMEOUT", "3s")]).await;
    // Forks until the cap says no; the children hold no pipes, so the call ends then.
    let count = "import os, time\nn = 0\nwhile n < 10000:\n    try:\n        pid = os.fork()\n    except OSError:\n        \
                 break\n    if pid == 0:\n        os.close(1); os.close(2); time.sleep(60); os._exit(0)\n    n += 1\nprint(n)";
    let counted = exec.run("code_exec_python", count, &[]).await;
    assert_eq!(counted["returncode"], 0, "{counted}");
    let forks: u64 = counted["stdout"].as_str().unwrap().parse().unwrap();
    assert!((1..40).contains(&forks), "{forks} forks under a cap of 40");

    let marker = "dynogate-test-fork-bomb";
    // Doubles until the cap, then keeps trying (gently, to spare the machine's other tests).
    let bomb = format!(
        "import os, time  # {marker}\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.05)"
    );
    let bombed = exec.run("code_exec_python", &bomb, &[]).await;
    assert_eq!(bombed["returncode"], -2, "{bombed}");
    eventually("every fork of the bomb is gone", || processes_with(marker).is_empty()).await;

    let after = exec.run("code_exec_python", "print('still here')", &[]).await;
    assert_eq!(after["stdout"], "still here");
}

#[tokio::test]
async fn a_memory_hog_is_contained_and_the_session_goes_on() {
    let mut exec = Exec::start(&[("EXEC_MAX_MEMORY", "256MiB")]).await;
    let hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))";
    let python = exec.run("code_exec_python", hog, &[]).await;
    assert_eq!(python["returncode"], 1, "{python}");
    assert!(python["stderr"].as_str().unwrap().contains("MemoryError"), "{python}");
    if have("node") {
        let node = exec.run("code_exec_node", "const a = []; for (;;) a.push(Buffer.alloc(16 << 20, 1))", &[]).await;
        assert_ne!(node["returncode"], 0, "{node}");
    }
    let after = exec.run("code_exec_python", "print(len(bytearray(64 << 20)))", &[]).await;
    assert_eq!(after["stdout"], (64 << 20).to_string(), "{after}");
}

#[tokio::test]
async fn an_output_flood_is_capped_and_the_session_goes_on() {
    let mut exec = Exec::start(&[("EXEC_MAX_OUTPUT_BYTES", "64KiB"), ("EXEC_RUN_TIMEOUT", "3s")]).await;
    let flood =
        "import sys\nsys.stdout.write('<' + 'x' * (8 << 20) + '>')\nsys.stderr.write('[' + 'y' * (8 << 20) + ']')";
    let out = exec.run("code_exec_python", flood, &[]).await;
    assert_eq!(out["returncode"], 0);
    for (stream, first, last) in [("stdout", "<x", "x>"), ("stderr", "[y", "y]")] {
        let text = out[stream].as_str().unwrap();
        assert!(text.starts_with(first) && text.ends_with(last), "{stream} keeps head and tail");
        assert!(text.contains(" bytes omitted ...]"), "{stream} says what was dropped");
        assert!(text.len() < 66 * 1024, "{stream} is {} bytes", text.len());
    }
    let endless = exec.run("code_exec_python", "while True: print('z' * 1000)", &[]).await;
    assert_eq!(endless["returncode"], -2);
    let after = exec.run("code_exec_python", "print('still here')", &[]).await;
    assert_eq!(after["stdout"], "still here");
}

#[tokio::test]
async fn injected_package_options_and_sources_are_refused() {
    let mut exec = Exec::start(&[]).await;
    let sources = [
        (&PYTHON, "git+https://example.com/x/y"),
        (&NODE, "github:x/y"),
        (&RUBY, "/tmp/evil.gem"),
        (&GO, "/tmp/evil-module"),
    ];
    for (lang, source) in sources {
        if !have(lang.program) {
            continue;
        }
        for (packages, why) in [
            (vec!["--index-url=https://evil.example"], "options are not allowed"),
            (vec!["six", "-r", "/etc/passwd"], "options are not allowed"),
            (vec![source], "EXEC_ALLOW_PACKAGE_SOURCES"),
        ] {
            let reply = exec.call(lang.tool, json!({"code": "1", "packages": packages})).await;
            assert_eq!(reply["isError"], true, "{}: {reply}", lang.tool);
            assert!(reply["content"][0]["text"].as_str().unwrap().contains(why), "{}: {reply}", lang.tool);
        }
    }
}

#[tokio::test]
async fn executed_code_sees_no_secret() {
    let secrets = [
        ("API_KEY", "secret-api-key-value"),
        ("HEROKU_API_KEY", "secret-heroku-key-value"),
        ("RUNNER_TOKEN", "secret-runner-token-value"),
        ("RENDEZVOUS_SECRET", "secret-rendezvous-value"),
        ("REDIS_URL", "redis://secret-redis-value"),
        ("INFERENCE_KEY", "secret-inference-value"),
        ("AWS_SECRET_ACCESS_KEY", "secret-aws-value"),
        ("GOOGLE_API_KEY", "secret-google-value"),
        ("npm_config__authToken", "secret-npm-token-value"),
    ];
    let mut exec = Exec::start(&secrets).await;
    for lang in ALL {
        if !have(lang.program) {
            continue;
        }
        let out = exec.run(lang.tool, lang.print_env, &[]).await;
        let printed = out["stdout"].as_str().unwrap();
        assert!(printed.contains("PATH="), "{}: {printed}", lang.tool);
        for (name, value) in secrets {
            assert!(
                !printed.contains(value) && !printed.contains(&format!("{name}=")),
                "{}: {name} visible",
                lang.tool
            );
        }
    }
}

#[tokio::test]
async fn cancellation_kills_the_code_and_its_grandchildren() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let code = format!(
        "import os, subprocess, time\nchild = subprocess.Popen(['sleep', '300'])\n\
         escaped = subprocess.Popen(['sleep', '301'], start_new_session=True)\n\
         open({path:?}, 'w').write(f'{{os.getpid()}} {{child.pid}} {{escaped.pid}}')\ntime.sleep(300)",
        path = pids.to_str().unwrap()
    );
    let mut exec = Exec::start(&[]).await;
    let id = exec.request("tools/call", json!({"name": "code_exec_python", "arguments": {"code": code}})).await;
    eventually("the code has started its children", || {
        std::fs::read_to_string(&pids).is_ok_and(|s| s.split(' ').count() == 3)
    })
    .await;
    let pids: Vec<i32> = std::fs::read_to_string(&pids).unwrap().split(' ').map(|p| p.parse().unwrap()).collect();
    let (code_pid, grandchild, escaped) = (pids[0], pids[1], pids[2]);
    // Only a cgroup reaches a process that left the process group; without
    // one (an unprivileged user) the executor cannot promise that.
    let escaped_in_cgroup =
        std::fs::read_to_string(format!("/proc/{escaped}/cgroup")).is_ok_and(|c| c.contains("dynogate-exec-"));

    exec.send(
        &json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": id, "reason": "test"}}),
    )
    .await;
    eventually("the code is gone", || gone(code_pid)).await;
    eventually("its forked grandchild is gone", || gone(grandchild)).await;
    if escaped_in_cgroup {
        eventually("the grandchild that left the process group is gone", || gone(escaped)).await;
    } else {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(escaped), nix::sys::signal::Signal::SIGKILL);
    }
    let after = exec.run("code_exec_python", "print('still here')", &[]).await;
    assert_eq!(after["stdout"], "still here");
}

#[tokio::test]
async fn progress_flows_while_a_call_with_a_progress_token_runs() {
    let mut exec = Exec::start(&[("EXEC_PROGRESS_INTERVAL", "200ms")]).await;
    let code = "import time; time.sleep(1.5); print('done')";
    let params = json!({"name": "code_exec_python", "arguments": {"code": code}, "_meta": {"progressToken": "tok-1"}});
    let id = exec.request("tools/call", params).await;
    let reply = exec.response(id).await;
    assert_eq!(reply["result"]["structuredContent"]["result"]["stdout"], "done");
    let progress: Vec<&serde_json::Value> = exec
        .notifications
        .iter()
        .filter(|n| n["method"] == "notifications/progress" && n["params"]["progressToken"] == "tok-1")
        .collect();
    assert!(progress.len() >= 2, "progress notifications: {progress:?}");
    let values: Vec<f64> = progress.iter().map(|n| n["params"]["progress"].as_f64().unwrap()).collect();
    assert!(values.windows(2).all(|w| w[0] < w[1]), "progress only grows: {values:?}");
    let last = progress.last().unwrap()["params"]["message"].as_str().unwrap();
    assert!(last.starts_with("running ("), "progress says what the call does: {last}");

    let before = exec.notifications.len();
    exec.run("code_exec_python", code, &[]).await;
    assert_eq!(exec.notifications.len(), before, "no progress without a token");
}

#[tokio::test]
async fn files_stay_in_the_session_directory_across_languages_until_the_executor_exits() {
    let mut exec = Exec::start(&[]).await;
    let cwd =
        exec.run("code_exec_python", "import os; open('note.txt', 'w').write('kept'); print(os.getcwd())", &[]).await;
    let workdir = std::path::PathBuf::from(cwd["stdout"].as_str().unwrap());
    assert!(workdir.join("note.txt").is_file());
    if have("node") {
        let read = exec.run("code_exec_node", "console.log(require('fs').readFileSync('note.txt', 'utf8'))", &[]).await;
        assert_eq!(read["stdout"], "kept");
    }
    let cgroup = std::path::PathBuf::from(format!("/sys/fs/cgroup/pids/dynogate-exec-{}", exec.pid()));
    let status = exec.close().await;
    assert!(status.success(), "{status}");
    assert!(!workdir.exists(), "the temporary session directory is removed");
    assert!(!cgroup.exists(), "the executor's cgroup is removed");
}

#[tokio::test]
async fn the_gateway_lists_every_installed_language_and_relays_progress() {
    let gateway = Gateway::with(Options::default().env("EXEC_PROGRESS_INTERVAL", "200ms"));
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let listed = http.post(Some(&session), &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})).await;
    let names: Vec<&str> =
        listed.json["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    for lang in ALL {
        if have(lang.program) {
            assert!(names.contains(&lang.tool), "{} missing from {names:?}", lang.tool);
        }
    }
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "name": "code_exec_python", "arguments": {"code": "import time; time.sleep(1); print('late')"},
        "_meta": {"progressToken": 7}}});
    let reply = http.post(Some(&session), &call).await;
    assert_eq!(exec_result(&reply.json)["stdout"], "late");
    let progress = reply.events().iter().filter(|e| e["method"] == "notifications/progress").count();
    assert!(progress >= 2, "progress reaches the client on the request's stream: {}", reply.text);
}

/// A `python3` that runs `prelude` (shell) and then becomes the real one,
/// first on a PATH of its own; the directory holds it.
fn python_wrapped(prelude: &str) -> (tempfile::TempDir, String) {
    let real = std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|dir| dir.join("python3"))
        .find(|p| p.is_file())
        .expect("python3 on PATH");
    let (dir, _) = script("python3", &format!("{prelude}\nexec \"{}\" \"$@\"", real.display()));
    let path = format!("{}:/usr/local/bin:/usr/bin:/bin", dir.path().display());
    (dir, path)
}

/// A `python3` that starts only with the `LD_LIBRARY_PATH` its runtime needs,
/// as Heroku's shared-library Python does (its `.profile.d` script sets it).
fn python_needing_its_library_path() -> (tempfile::TempDir, String) {
    python_wrapped(
        "case \"$LD_LIBRARY_PATH\" in *\"/opt/dynogate-test-python/lib\"*) ;; *)\n\
         echo 'python3: error while loading shared libraries: libpython3.12.so.1.0: cannot open shared object file' >&2\n\
         exit 127 ;;\nesac",
    )
}

#[tokio::test]
async fn a_buildpack_python_runs_with_its_library_path_and_is_not_offered_without_it() {
    if !have("python3") {
        return;
    }
    let (_dir, path) = python_needing_its_library_path();
    let mut broken = Exec::start(&[("PATH", &path)]).await;
    assert!(!broken.tools().await.contains(&"code_exec_python".to_owned()), "a python that cannot start is offered");

    let library = "/opt/dynogate-test-python/lib";
    let mut exec = Exec::start(&[("PATH", &path), ("LD_LIBRARY_PATH", library), ("API_KEY", "must-not-leak")]).await;
    assert!(exec.tools().await.contains(&"code_exec_python".to_owned()));
    let seen = exec
        .run("code_exec_python", "import os; print(os.environ.get('LD_LIBRARY_PATH'), os.environ.get('API_KEY'))", &[])
        .await;
    assert_eq!(seen["stdout"], format!("{library} None"), "{seen}");
}

/// A `python3` that waits, once started, until the test lets it go on: the
/// executor's first look at it then takes as long as the test wants.
fn python_held_at_start() -> (tempfile::TempDir, String) {
    python_wrapped("here=$(dirname \"$0\")\ntouch \"$here/started\"\nwhile [ ! -e \"$here/go\" ]; do sleep 0.01; done")
}

/// The executor answers `initialize` once it has found Python, so a first
/// call that follows at once does not wait for the probe behind the
/// client's back (the first call costs what later ones do).
#[tokio::test]
async fn initialize_is_answered_once_python_is_found() {
    if !have("python3") {
        return;
    }
    let (dir, path) = python_held_at_start();
    let mut exec = Exec::spawn(&[("PATH", &path)]);
    let id = exec.initialize().await;
    eventually("the executor looks for Python", || dir.path().join("started").exists()).await;
    let early = exec.message_within(Duration::from_millis(300)).await;
    assert!(early.is_none(), "answered while Python was still being looked for: {early:?}");

    std::fs::write(dir.path().join("go"), "").unwrap();
    let reply = exec.response(id).await;
    assert!(reply["result"]["capabilities"]["tools"].is_object(), "{reply}");
    exec.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await;
    let hello = exec.run("code_exec_python", "print('ready')", &[]).await;
    assert_eq!(hello["stdout"], "ready", "{hello}");
}
