//! The session state machine driven through channels: a fake spawner, a link
//! made of channels, and time that the tests move by hand.

use std::sync::atomic::AtomicUsize;

use futures_util::FutureExt;
use serde_json::Value;

use super::*;
use crate::config::Timeouts;
use crate::link::{LinkError, Outbox, channel_link};
use crate::spawn::{RunnerProcess, SpawnError};

/// Counts starts and stops; its runners never exit on their own.
#[derive(Default)]
struct FakeSpawner {
    stops: Arc<AtomicUsize>,
}

struct FakeRunner {
    stops: Arc<AtomicUsize>,
}

impl Spawner for FakeSpawner {
    fn spawn(&self, _spec: RunnerSpec) -> BoxFuture<'_, Result<Box<dyn RunnerProcess>, SpawnError>> {
        let runner: Box<dyn RunnerProcess> = Box::new(FakeRunner { stops: self.stops.clone() });
        std::future::ready(Ok(runner)).boxed()
    }
}

impl RunnerProcess for FakeRunner {
    fn describe(&self) -> String {
        "fake".into()
    }
    fn exited(&mut self) -> BoxFuture<'_, String> {
        std::future::pending().boxed()
    }
    fn stop(self: Box<Self>, _grace: Duration) -> BoxFuture<'static, ()> {
        self.stops.fetch_add(1, Ordering::SeqCst);
        std::future::ready(()).boxed()
    }
}

fn timeouts() -> Timeouts {
    Timeouts {
        dial_back: Duration::from_secs(30),
        idle: Duration::from_secs(900),
        request: Duration::from_secs(600),
        reply_stream_after: Duration::from_secs(1),
        heartbeat: Duration::from_secs(20),
        runner_stop_grace: Duration::from_secs(5),
        drain: Duration::from_secs(25),
    }
}

struct Harness {
    handle: SessionHandle,
    sessions: Sessions,
    stops: Arc<AtomicUsize>,
}

fn start(timeouts: Timeouts) -> Harness {
    let sessions = Sessions::new(10);
    let spawner = FakeSpawner::default();
    let stops = spawner.stops.clone();
    let (session, handle) = Session::new(SessionParams {
        id: "s1".into(),
        token_id: "j1".into(),
        spec: RunnerSpec {
            session: "s1".into(),
            token: dynogate_shared::Secret::new("t"),
            gateway_url: url::Url::parse("http://127.0.0.1:1/").unwrap(),
        },
        spawner: Arc::new(spawner),
        sessions: sessions.clone(),
        timeouts,
        shutdown: CancellationToken::new(),
    });
    sessions.insert(sessions.reserve().unwrap(), handle.clone());
    session.start(&tokio_util::task::TaskTracker::new());
    Harness { handle, sessions, stops }
}

impl Harness {
    /// The next JSON-RPC message the session sends to the runner (pings skipped).
    async fn forwarded(outbox: &mut Outbox) -> Value {
        loop {
            match outbox.next().await.expect("the link is open") {
                Outgoing::Message(json) => return serde_json::from_slice(&json).unwrap(),
                Outgoing::Ping => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Connects a channel link; returns what the session sends and a way to answer.
    async fn attach(&self) -> (Outbox, mpsc::UnboundedSender<Result<Incoming, LinkError>>) {
        let (link, outbox, tx) = channel_link();
        let slot = self.handle.claim_runner_slot().expect("slot is free");
        self.handle.send(Command::Attach { link, slot }, Duration::from_secs(1)).await.unwrap();
        (outbox, tx)
    }

    async fn call(&self, id: &str, progress: Option<&str>) -> mpsc::Receiver<Delivery> {
        let (tx, rx) = mpsc::channel(8);
        let permit = tx.clone().try_reserve_owned().unwrap();
        let payload = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call"}}"#);
        let call = Call {
            id: RequestId::for_tests(id),
            progress_token: progress.map(RequestId::for_tests),
            payload: payload.into(),
            is_initialize: false,
            reply: tx,
            permit,
        };
        self.handle.send(Command::Call(call), Duration::from_secs(1)).await.unwrap();
        rx
    }
}

fn message(json: &str) -> Result<Incoming, LinkError> {
    Ok(Incoming::Message(Bytes::copy_from_slice(json.as_bytes())))
}

fn parse(delivery: &Delivery) -> Value {
    serde_json::from_slice(&delivery.json).unwrap()
}

#[tokio::test]
async fn responses_find_their_request_by_id_whatever_the_order() {
    let h = start(timeouts());
    let (mut outbox, runner) = h.attach().await;
    let mut first = h.call("1", None).await;
    let mut second = h.call(r#""two""#, None).await;
    assert_eq!(Harness::forwarded(&mut outbox).await["id"], 1);
    assert_eq!(Harness::forwarded(&mut outbox).await["id"], "two");
    runner.send(message(r#"{"jsonrpc":"2.0","id":"two","result":{"n":2}}"#)).unwrap();
    runner.send(message(r#"{"jsonrpc":"2.0","id":1,"result":{"n":1}}"#)).unwrap();
    let (a, b) = (first.recv().await.unwrap(), second.recv().await.unwrap());
    assert!(a.last && b.last);
    assert_eq!(parse(&a)["result"]["n"], 1);
    assert_eq!(parse(&b)["result"]["n"], 2);
}

#[tokio::test]
async fn progress_follows_its_token_and_strays_wait_for_a_get_stream() {
    let h = start(timeouts());
    let (mut outbox, runner) = h.attach().await;
    let mut call = h.call("1", Some(r#""p""#)).await;
    Harness::forwarded(&mut outbox).await;
    runner
        .send(message(
            r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"p","progress":1}}"#,
        ))
        .unwrap();
    runner.send(message(r#"{"jsonrpc":"2.0","method":"notifications/message","params":{"data":"stray"}}"#)).unwrap();
    runner.send(message(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#)).unwrap();
    let progress = call.recv().await.unwrap();
    assert!(!progress.last);
    assert_eq!(parse(&progress)["params"]["progress"], 1);
    assert!(call.recv().await.unwrap().last);

    let mut stream = h.handle.open_stream(Duration::from_secs(1)).await.unwrap();
    assert_eq!(parse(&stream.recv().await.unwrap())["params"]["data"], "stray");
}

#[tokio::test]
async fn a_duplicate_request_id_is_refused_and_the_first_still_answered() {
    let h = start(timeouts());
    let (mut outbox, runner) = h.attach().await;
    let mut first = h.call("7", None).await;
    let mut duplicate = h.call("7", None).await;
    assert_eq!(parse(&duplicate.recv().await.unwrap())["error"]["code"], code::INVALID_REQUEST);
    Harness::forwarded(&mut outbox).await;
    runner.send(message(r#"{"jsonrpc":"2.0","id":7,"result":{}}"#)).unwrap();
    assert!(parse(&first.recv().await.unwrap())["result"].is_object());
}

#[tokio::test(start_paused = true)]
async fn without_a_dial_back_waiting_calls_fail_and_the_runner_is_stopped() {
    let h = start(timeouts());
    let mut call = h.call("1", None).await;
    let answer = call.recv().await.unwrap();
    let error = &parse(&answer)["error"];
    assert_eq!(error["code"], code::RUNNER_UNAVAILABLE);
    assert!(error["message"].as_str().unwrap().contains("did not dial back within 30s"));
    h.handle.finished().await;
    assert_eq!(h.stops.load(Ordering::SeqCst), 1);
    assert!(h.sessions.get("s1").is_none());
}

#[tokio::test]
async fn a_lost_link_fails_everything_in_flight_and_leaves_the_table() {
    let h = start(timeouts());
    let (mut outbox, runner) = h.attach().await;
    let mut calls = vec![h.call("1", None).await, h.call("2", None).await];
    Harness::forwarded(&mut outbox).await;
    Harness::forwarded(&mut outbox).await;
    drop(runner);
    for call in &mut calls {
        assert_eq!(parse(&call.recv().await.unwrap())["error"]["code"], code::RUNNER_LOST);
    }
    h.handle.finished().await;
    assert!(h.sessions.get("s1").is_none());
    assert!(
        h.handle
            .send(Command::Notify { payload: Bytes::new(), cancelled: None }, Duration::from_secs(1))
            .await
            .is_err()
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_with_no_answer_times_out_and_the_server_is_told_to_cancel() {
    let h = start(Timeouts { request: Duration::from_secs(5), ..timeouts() });
    let (mut outbox, _runner) = h.attach().await;
    let mut call = h.call("1", None).await;
    Harness::forwarded(&mut outbox).await;
    assert_eq!(parse(&call.recv().await.unwrap())["error"]["code"], code::REQUEST_TIMEOUT);
    let cancel = Harness::forwarded(&mut outbox).await;
    assert_eq!(cancel["method"], "notifications/cancelled");
    assert_eq!(cancel["params"]["requestId"], 1);
}

#[tokio::test(start_paused = true)]
async fn an_idle_session_ends_and_a_busy_one_does_not() {
    let h = start(Timeouts { idle: Duration::from_secs(60), heartbeat: Duration::from_secs(3600), ..timeouts() });
    let (mut outbox, runner) = h.attach().await;
    let mut call = h.call("1", None).await;
    Harness::forwarded(&mut outbox).await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(h.sessions.get("s1").is_some(), "a session with a request in flight is not idle");
    runner.send(message(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#)).unwrap();
    assert!(call.recv().await.unwrap().last);
    h.handle.finished().await;
    assert!(h.sessions.get("s1").is_none());
}
