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
        "here=$(dirname \"$0\")\necho \"$@\" > \"$here/args\"\nprintf %s \"$RUNNER_TOKEN\" > \"$here/token\"\necho $$ > \"$here/pid\"\nexec sleep 600",
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
    let gateway = Gateway::with(Options::default().env("RUNNER_BIN", runner.to_str().unwrap()));
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
    let hello = Control::Hello { protocol: PROTOCOL_VERSION + 41, runner_version: "0.0.0-old".into(), received: 0 };
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
    let gateway =
        Gateway::with(Options::default().env("RUNNER_BIN", runner.to_str().unwrap()).env("DIAL_BACK_TIMEOUT", "1s"));
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

/// Socket inodes among a process's open files.
fn socket_inodes(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .filter_map(|target| {
                    let target = target.to_string_lossy().into_owned();
                    Some(target.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Inodes listed in one of `/proc/net/{unix,tcp,tcp6}` (the inode column).
fn inodes_in(table: &str, column: usize) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/net/{table}")).unwrap_or_default();
    text.lines().skip(1).filter_map(|line| line.split_whitespace().nth(column).map(str::to_owned)).collect()
}

#[tokio::test]
async fn local_runners_dial_a_private_unix_socket_that_checks_tokens_like_the_port() {
    let gateway = Gateway::with(Options::default().echo());
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let runner = runner_pids(&session)[0];
    let path = std::path::PathBuf::from(
        environ_of(runner).remove("RUNNER_RENDEZVOUS_SOCKET").expect("the runner was given the gateway's socket"),
    );
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    assert!(std::fs::metadata(&path).unwrap().file_type().is_socket());
    let dir_mode = std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700, "only the gateway's user may reach the socket");

    // The runner's connection is a Unix socket, and it holds no TCP socket.
    let ours = socket_inodes(runner);
    let unix = inodes_in("unix", 6);
    let tcp: Vec<String> = [inodes_in("tcp", 9), inodes_in("tcp6", 9)].concat();
    assert!(ours.iter().any(|inode| unix.contains(inode)), "runner sockets {ours:?} include no Unix socket");
    assert!(!ours.iter().any(|inode| tcp.contains(inode)), "the runner holds a TCP socket");
    let reply = http.call(&session, 2, "echo", json!({"text": "over the socket"})).await;
    assert_eq!(reply.json["result"]["content"][0]["text"], "over the socket");

    // Same checks as the TCP rendezvous: a made-up token is refused there too.
    let forged = mint("another-secret-another-secret-another-secret", &session, 60);
    let mut request = format!("ws://localhost/rendezvous?session={session}").into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {forged}").parse().unwrap());
    let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    match tokio_tungstenite::client_async(request, stream).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), StatusCode::UNAUTHORIZED),
        other => panic!("a forged token over the Unix socket was not refused: {:?}", other.map(|_| ())),
    }
    let reply = http.call(&session, 3, "echo", json!({"text": "undisturbed"})).await;
    assert_eq!(reply.json["result"]["content"][0]["text"], "undisturbed");

    let dir = path.parent().unwrap().to_owned();
    drop(gateway);
    eventually("the socket's directory is removed when the gateway stops", || !dir.exists()).await;
}
