//! A real `redis-server` on a free loopback port, with no persistence,
//! killed on drop; it can be stopped and started again on the same port, as
//! an outage would look to the gateways using it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::PATIENCE;

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..20 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            // Another process may take the port between its release and the
            // server's bind: then the server exits and another is tried.
            if let Some(child) = launch(port, dir.path()) {
                return RedisServer { child: Some(child), port, dir };
            }
        }
        panic!("no redis-server could start on a free port");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (an outage: nothing is kept).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(child) = launch(self.port, self.dir.path()) {
                self.child = Some(child);
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not start again on port {}", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs one command with `redis-cli` and returns its raw output.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args).unwrap_or_default()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn cli(port: u16, args: &[&str]) -> Option<String> {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--raw"])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .expect("redis-cli is installed (.ci/run installs redis-server, which brings it)");
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Starts a server on `port` and waits until it answers; `None` if it exited.
fn launch(port: u16, dir: &std::path::Path) -> Option<Child> {
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed (.ci/run installs it)");
    let deadline = Instant::now() + PATIENCE;
    loop {
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        // Ours, not another test's server that took the port first.
        if cli(port, &["INFO", "server"]).is_some_and(|info| info.contains(&format!("process_id:{}\r", child.id()))) {
            return Some(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
