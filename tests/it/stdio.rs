//! `runner exec` over plain stdio, driven with raw JSON-RPC lines so tests
//! see every message (progress notifications, exact results) and can send
//! `notifications/cancelled` whenever they like. The executor is stopped with
//! SIGTERM (then SIGKILL) when its handle drops.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::support::{PATIENCE, RUNNER};

/// A `runner exec` process and the client end of its stdio.
pub struct Exec {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    /// Notifications read while waiting for responses, in order.
    pub notifications: Vec<Value>,
    next_id: i64,
}

impl Exec {
    /// Starts an executor with `env` on top of PATH, HOME, TMPDIR and pip's settings, and
    /// completes the MCP handshake.
    pub async fn start(env: &[(&str, &str)]) -> Exec {
        let mut exec = Exec::spawn(env);
        let id = exec.initialize().await;
        let reply = exec.response(id).await;
        assert!(reply["result"]["capabilities"]["tools"].is_object(), "initialize failed: {reply}");
        exec.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await;
        exec
    }

    /// Sends `initialize`; its answer is the caller's to read.
    pub async fn initialize(&mut self) -> i64 {
        self.request(
            "initialize",
            json!({"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "dynogate-tests", "version": "1"}}),
        )
        .await
    }

    /// Starts an executor as [`Exec::start`] does, without the handshake.
    pub fn spawn(env: &[(&str, &str)]) -> Exec {
        let mut command = tokio::process::Command::new(RUNNER);
        command.arg("exec").env_clear();
        // What the gateway's test helper passes too: the machine's PyPI settings.
        for name in [
            "PATH",
            "HOME",
            "TMPDIR",
            "PIP_FIND_LINKS",
            "PIP_CERT",
            "PIP_DEFAULT_TIMEOUT",
            "PIP_DISABLE_PIP_VERSION_CHECK",
        ] {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        command.env("RUST_LOG", "warn,dynogate_runner=debug");
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start runner exec");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        Exec { child, stdin, stdout, notifications: Vec::new(), next_id: 0 }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id().expect("executor running")).unwrap()
    }

    pub async fn send(&mut self, message: &Value) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(format!("{message}\n").as_bytes()).await.expect("write to the executor");
        stdin.flush().await.expect("flush to the executor");
    }

    /// Sends a request and returns its id.
    pub async fn request(&mut self, method: &str, params: Value) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})).await;
        id
    }

    /// Reads messages until the response to `id`, keeping notifications.
    pub async fn response(&mut self, id: i64) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let line = tokio::time::timeout_at(deadline, self.stdout.next_line())
                .await
                .unwrap_or_else(|_| panic!("no response to request {id} in time"))
                .expect("read from the executor")
                .unwrap_or_else(|| panic!("the executor exited before answering request {id}"));
            let message: Value = serde_json::from_str(&line).expect("the executor writes JSON lines");
            if message["id"] == id {
                return message;
            }
            if message.get("method").is_some() && message.get("id").is_none() {
                self.notifications.push(message);
            }
        }
    }

    /// The next message the executor writes within `wait`, if any.
    pub async fn message_within(&mut self, wait: Duration) -> Option<Value> {
        let line = tokio::time::timeout(wait, self.stdout.next_line()).await.ok()?.expect("read from the executor")?;
        Some(serde_json::from_str(&line).expect("the executor writes JSON lines"))
    }

    pub async fn tools(&mut self) -> Vec<String> {
        let id = self.request("tools/list", json!({})).await;
        let reply = self.response(id).await;
        let tools = reply["result"]["tools"].as_array().expect("a tool list").clone();
        tools.iter().map(|tool| tool["name"].as_str().unwrap().to_owned()).collect()
    }

    /// `tools/call`; returns the call's result object.
    pub async fn call(&mut self, tool: &str, arguments: Value) -> Value {
        let id = self.request("tools/call", json!({"name": tool, "arguments": arguments})).await;
        let reply = self.response(id).await;
        reply.get("result").cloned().unwrap_or_else(|| panic!("{tool} answered with an error: {reply}"))
    }

    /// Runs code and returns the `{returncode, stdout, stderr}` it produced.
    pub async fn run(&mut self, tool: &str, code: &str, packages: &[&str]) -> Value {
        let result = self.call(tool, json!({"code": code, "packages": packages})).await;
        assert_eq!(result["isError"], false, "{tool} refused the call: {result}");
        let text = result["content"][0]["text"].as_str().expect("text content");
        let output: Value = serde_json::from_str(text).expect("the text content is JSON");
        assert_eq!(output, result["structuredContent"]["result"], "text and structured content agree");
        output
    }

    /// Closes stdin (how a stdio MCP server is asked to leave) and waits for the exit.
    pub async fn close(mut self) -> std::process::ExitStatus {
        self.stdin = None;
        tokio::time::timeout(PATIENCE, self.child.wait()).await.expect("the executor exits").expect("wait")
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        let Some(pid) = self.child.id() else { return };
        // SIGTERM lets the executor kill what it started; SIGKILL if it lingers.
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.start_kill();
    }
}

/// Whether a toolchain is installed. Missing ones fail the test in CI (which
/// installs them) and skip it elsewhere, with a word on stderr.
pub fn have(program: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()));
    if !found {
        assert!(std::env::var_os("CI").is_none(), "{program} is required in CI (.ci/run installs it)");
        eprintln!("skipping: {program} is not installed");
    }
    found
}
