//! The floor: the same echo server called over plain stdio, no gateway, so
//! every other figure reads as "floor + what the relay adds".

use std::process::Stdio;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::client::check_echo;

/// An echo server on pipes.
pub struct StdioServer {
    _child: Child,
    stdin: ChildStdin,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl StdioServer {
    pub async fn start(program: &str) -> anyhow::Result<Self> {
        let mut child = Command::new(program)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {program}"))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::with_capacity(1 << 20, child.stdout.take().expect("piped")).lines();
        let mut server = StdioServer { _child: child, stdin, stdout };
        let answer = server
            .request(&json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "floor", "version": "1"}}}))
            .await?;
        if answer.get("result").is_none() {
            bail!("initialize failed: {answer}");
        }
        server.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await?;
        Ok(server)
    }

    async fn send(&mut self, message: &Value) -> anyhow::Result<()> {
        let mut line = message.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn request(&mut self, message: &Value) -> anyhow::Result<Value> {
        self.send(message).await?;
        let line = self.stdout.next_line().await?.context("the server closed stdout")?;
        Ok(serde_json::from_str(&line)?)
    }

    pub async fn echo(&mut self, id: u64, text: &str) -> anyhow::Result<()> {
        let answer = self
            .request(&json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": text}}}))
            .await?;
        check_echo(&answer, id, text)
    }
}
