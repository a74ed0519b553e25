use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dynogate_shared::token::{AUDIENCE, RunnerClaims};
use dynogate_shared::{Control, PROTOCOL_VERSION};
use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::support::*;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn dial(gateway: &Gateway, session: &str, token: Option<&str>) -> Result<Socket, StatusCode> {
    let url = format!("{}/rendezvous?session={session}", gateway.url.replace("http://", "ws://"));
    let mut request = url.into_client_request().unwrap();
    if let Some(token) = token {
        request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(WsError::Http(response)) => Err(response.status()),
        Err(e) => panic!("dial failed below HTTP: {e}"),
    }
}

fn mint(secret: &str, session: &str, expires_in: i64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let claims = RunnerClaims {
        aud: AUDIENCE.into(),
        sid: session.into(),
        iat: now,
        exp: now.checked_add_signed(expires_in).unwrap(),
        jti: "made-up".into(),
    };
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
}

fn runner_token(session: &str) -> String {
    let runner = runner_pids(session)[0];
    environ_of(runner).remove("RUNNER_TOKEN").expect("the runner got its token in the environment")
}

#[tokio::test]
async fn bad_tokens_are_refused_and_touch_no_session() {
    let gateway = Gateway::with(Options::default().echo());
    let http = gateway.http();
    let ((a, _), (b, _)) = tokio::join!(http.initialize(), http.initialize());
    let token_a = runner_token(&a);
    assert!(!argv_of(runner_pids(&a)[0]).unwrap().iter().any(|arg| arg.contains(&token_a)), "token on a command line");

    let wrong_key = mint("another-secret-another-secret-another-secret", &a, 60);
    let expired = mint(SECRET, &a, -120);
    let unissued = mint(SECRET, &a, 60);
    let cases: [(&str, &str, Option<&str>); 7] = [
        ("no token", &a, None),
        ("garbage", &a, Some("not-a-token")),
        ("signed with another key", &a, Some(&wrong_key)),
        ("expired", &a, Some(&expired)),
        ("valid signature but never issued", &a, Some(&unissued)),
        ("another session's token", &b, Some(&token_a)),
        ("replayed while the runner is connected", &a, Some(&token_a)),
    ];
    for (what, session, token) in cases {
        assert_eq!(dial(&gateway, session, token).await.err(), Some(StatusCode::UNAUTHORIZED), "{what}");
    }

    for (session, text) in [(&a, "a"), (&b, "b")] {
        let reply = http.call(session, 5, "echo", json!({"text": text})).await;
        assert_eq!(reply.json["result"]["content"][0]["text"], text, "session {text} was disturbed");
    }
}

/// A runner that never dials: it records what it was given and sleeps.
fn stand_in_runner() -> (tempfile::TempDir, std::path::PathBuf) {
    let (dir, path) = script(
        "runner",
        // The gateway's own helper calls (`runner obtain-uv`) are not a runner starting.
        "case \"$1\" in obtain-uv|sandbox-check) exit 0 ;; esac\n\
         here=$(dirname \"$0\")\necho \"$@\" > \"$here/args\"\nprintf %s \"$RUNNER_TOKEN\" > \"$here/token\"\necho $$ > \"$here/pid\"\nexec sleep 600",
    );
    let _ = &path;
    (dir, path)
}

fn read_when_written(dir: &std::path::Path, name: &str) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(name)).ok()?;
    (!text.trim().is_empty()).then(|| text.trim().to_owned())
}

#[tokio::test]
async fn a_runner_speaking_another_protocol_version_is_refused_by_name() {
    let (dir, runner) = stand_in_runner();
    let gateway = Gateway::with(Options::default().env("RUNNER_BIN", runner.to_str().unwrap()).env("SANDBOX", "off"));
    let http = gateway.http();
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let pending = tokio::spawn({
        let http = http.clone();
        async move { http.post(None, &init).await }
    });
    eventually("the stand-in runner starts", || read_when_written(dir.path(), "pid").is_some()).await;
    let args = read_when_written(dir.path(), "args").unwrap();
    let session = args.split_whitespace().skip_while(|a| *a != "--session").nth(1).unwrap().to_owned();
    let token = read_when_written(dir.path(), "token").unwrap();
    let pid: i32 = read_when_written(dir.path(), "pid").unwrap().parse().unwrap();

    let mut socket = dial(&gateway, &session, Some(&token)).await.expect("a valid token upgrades");
    let hello =
        Control::Hello { protocol: PROTOCOL_VERSION + 41, runner_version: "0.0.0-old".into(), received: 0, acked: 0 };
    socket.send(Message::Binary(hello.encode().into())).await.unwrap();
    let answer = loop {
        match socket.next().await.expect("an answer").unwrap() {
            Message::Binary(bytes) => break Control::decode(&bytes).unwrap(),
            _ => continue,
        }
    };
    let Control::Reject { reason } = answer else { panic!("expected reject, got {answer:?}") };
    let (ours, theirs) = (format!("version {PROTOCOL_VERSION}"), format!("version {}", PROTOCOL_VERSION + 41));
    assert!(reason.contains(&ours) && reason.contains(&theirs), "{reason}");

    let reply = pending.await.unwrap();
    assert_eq!(reply.error_code(), -32002, "{}", reply.text);
    assert!(reply.json["error"]["message"].as_str().unwrap().contains("protocol mismatch"), "{}", reply.text);
    eventually("the refused runner is stopped", || gone(pid)).await;
}

#[tokio::test]
async fn a_runner_that_never_dials_back_ends_in_a_clear_error_and_is_killed() {
    let (dir, runner) = stand_in_runner();
    let gateway = Gateway::with(
        Options::default()
            .env("RUNNER_BIN", runner.to_str().unwrap())
            .env("SANDBOX", "off")
            .env("DIAL_BACK_TIMEOUT", "1s"),
    );
    let started = std::time::Instant::now();
    let reply = gateway
        .http()
        .post(None, &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}))
        .await;
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(reply.json["id"], 0);
    assert_eq!(reply.error_code(), -32002, "{}", reply.text);
    let message = reply.json["error"]["message"].as_str().unwrap();
    assert!(message.contains("did not dial back within 1s"), "{message}");
    let pid: i32 = read_when_written(dir.path(), "pid").unwrap().parse().unwrap();
    eventually("the silent runner is killed", || gone(pid)).await;
    let session = reply.session().unwrap();
    let later = gateway.http().post_raw(Some(&session), r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#, &[]).await;
    assert_eq!(later.status, StatusCode::NOT_FOUND);
}

/// The runner starts its MCP server while it dials, so the server's start-up
/// overlaps the connection; a runner the gateway refuses stops that server
/// and removes the session's directory before it exits.
#[tokio::test]
async fn a_refused_runner_stops_the_server_it_started_and_removes_its_directory() {
    let gateway = Gateway::with(Options::default().echo());
    let (dir, server) = script("server", "echo $$ > \"$(dirname \"$0\")/pid\"\nexec sleep 600");
    let session_dir = dir.path().join("session");
    let run = tokio::process::Command::new(RUNNER)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap())
        .env("GATEWAY_URL", &gateway.url)
        .env("RUNNER_SESSION", "no-such-session")
        .env(dynogate_shared::names::TOKEN_ENV, "not-a-token")
        .env("RUNNER_SESSION_DIR", &session_dir)
        .env("RUNNER_STOP_GRACE", "100ms")
        .env("SANDBOX", "off")
        .arg("--")
        .arg(&server)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(PATIENCE, run).await.expect("the refused runner exits").unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("cannot join the session"), "{stderr}");
    let pid: i32 = read_when_written(dir.path(), "pid").expect("the server was started").parse().unwrap();
    eventually("the server is stopped", || gone(pid)).await;
    assert!(!session_dir.exists(), "the session directory was left behind");
}
