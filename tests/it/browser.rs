//! A headless Chromium (Debian's package) driven over the DevTools
//! protocol, for tests of the gateway's web pages: each test gets its own
//! browser and profile, killed with its process group on drop.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::PATIENCE;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The browser: `CHROMIUM`, else Debian's `/usr/bin/chromium`.
fn chromium() -> PathBuf {
    let path = std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        path.is_file(),
        "no Chromium at {} (.ci/run installs Debian's chromium; apt-get install chromium)",
        path.display()
    );
    path
}

pub struct Browser {
    child: Child,
    socket: Socket,
    /// The page's DevTools session.
    page: String,
    next: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium headless with a fresh profile and one blank page.
    pub async fn start() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut command = Command::new(chromium());
        // Without the background-networking flags Chromium keeps trying to
        // reach Google's hosts, which this machine's network refuses.
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--window-size=1280,900",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().expect("start chromium");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent && let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                    sent = true;
                }
            }
        });
        let url = rx.recv_timeout(PATIENCE).expect("chromium reports its DevTools address");
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("connect to DevTools");
        let mut browser = Browser { child, socket, page: String::new(), next: 0, _profile: profile };
        let target = browser.send(None, "Target.createTarget", json!({"url": "about:blank"})).await;
        let target = target["targetId"].as_str().unwrap().to_owned();
        let attached = browser.send(None, "Target.attachToTarget", json!({"targetId": target, "flatten": true})).await;
        browser.page = attached["sessionId"].as_str().unwrap().to_owned();
        browser.command("Page.enable", json!({})).await;
        browser
    }

    /// Sends a DevTools command and waits for its result; events on the way are skipped.
    async fn send(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        self.socket.send(Message::text(message.to_string())).await.expect("DevTools socket open");
        let answer = tokio::time::timeout(PATIENCE, async {
            loop {
                match self.socket.next().await {
                    Some(Ok(Message::Text(text))) => {
                        let value: Value = serde_json::from_str(&text).unwrap();
                        if value["id"] == id {
                            return value;
                        }
                    }
                    Some(Ok(_)) => {}
                    other => panic!("DevTools socket ended: {other:?}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no answer to {method}"));
        assert!(answer.get("error").is_none(), "{method}: {answer}");
        answer["result"].clone()
    }

    /// A command to the page.
    pub async fn command(&mut self, method: &str, params: Value) -> Value {
        let page = self.page.clone();
        self.send(Some(&page), method, params).await
    }

    pub async fn navigate(&mut self, url: &str) {
        self.command("Page.navigate", json!({"url": url})).await;
        self.wait_for("the page has loaded", "document.readyState === 'complete' && !!document.body").await;
    }

    /// The value of a JavaScript expression in the page.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let result = self.command("Runtime.evaluate", json!({"expression": expression, "returnByValue": true})).await;
        assert!(result.get("exceptionDetails").is_none(), "{expression}: {result}");
        result["result"]["value"].clone()
    }

    /// Polls `expression` until it is true, or fails saying `what`.
    pub async fn wait_for(&mut self, what: &str, expression: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.eval(expression).await != json!(true) {
            let text = self.eval("document.body ? document.body.innerText : ''").await;
            assert!(tokio::time::Instant::now() < deadline, "{what}: never so; the page shows:\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Types `text` into the focused element, as a keyboard would.
    pub async fn type_text(&mut self, text: &str) {
        self.command("Input.insertText", json!({"text": text})).await;
    }

    pub async fn press_enter(&mut self) {
        for kind in ["keyDown", "keyUp"] {
            let mut event = json!({"type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13});
            if kind == "keyDown" {
                event["text"] = json!("\r");
            }
            self.command("Input.dispatchKeyEvent", event).await;
        }
    }

    /// Saves a PNG of the page as a test artifact and returns its path.
    pub async fn screenshot(&mut self, name: &str) -> PathBuf {
        use base64::Engine;
        let shot = self.command("Page.captureScreenshot", json!({"format": "png"})).await;
        let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let dir = artifacts();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
        path
    }
}

/// Where tests leave files for people to look at: `TEST_ARTIFACTS`, else
/// `target/test-artifacts` of this workspace.
pub fn artifacts() -> PathBuf {
    std::env::var_os("TEST_ARTIFACTS")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts"), PathBuf::from)
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium's helpers share its process group.
        let group = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}
