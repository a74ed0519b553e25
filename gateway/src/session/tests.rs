//! The session state machine driven through channels: a fake spawner, a link
//! made of channels, and time that the tests move by hand.

use std::sync::atomic::AtomicUsize;

use futures_util::FutureExt;
use serde_json::Value;

use super::*;
use crate::config::Timeouts;
use crate::link::{LinkError, Outbox, channel_link};
use crate::spawn::{RunnerProcess, SpawnError};
use crate::streams::{Batch, Event};
use dynogate_shared::window::MAX_UNACKED;

/// Counts starts and stops; its runners never exit on their own. With a
/// gate, a stop waits until the gate is opened, as a dyno's stop call may.
#[derive(Default)]
struct FakeSpawner {
    stops: Arc<AtomicUsize>,
    gate: Option<Arc<tokio::sync::Semaphore>>,
}

struct FakeRunner {
    stops: Arc<AtomicUsize>,
    gate: Option<Arc<tokio::sync::Semaphore>>,
}

impl Spawner for FakeSpawner {
    fn spawn(&self, _spec: RunnerSpec) -> BoxFuture<'_, Result<Box<dyn RunnerProcess>, SpawnError>> {
        let runner: Box<dyn RunnerProcess> =
            Box::new(FakeRunner { stops: self.stops.clone(), gate: self.gate.clone() });
        std::future::ready(Ok(runner)).boxed()
    }
}

impl RunnerProcess for FakeRunner {
    fn describe(&self) -> String {
        "fake".into()
    }
    fn handle(&self) -> String {
        "fake".into()
    }

    fn exited(&mut self) -> BoxFuture<'_, String> {
        std::future::pending().boxed()
    }
    fn stop(self: Box<Self>, _grace: Duration) -> BoxFuture<'static, ()> {
        self.stops.fetch_add(1, Ordering::SeqCst);
        async move {
            if let Some(gate) = self.gate {
                let _ = gate.acquire().await;
            }
        }
        .boxed()
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
        reconnect_grace: Duration::from_secs(60),
        drain: Duration::from_secs(20),
        teardown: Duration::from_secs(7),
    }
}

struct Harness {
    handle: SessionHandle,
    sessions: Sessions,
    stops: Arc<AtomicUsize>,
}

fn start(timeouts: Timeouts) -> Harness {
    start_with(timeouts, FakeSpawner::default())
}

fn start_with(timeouts: Timeouts, spawner: FakeSpawner) -> Harness {
    let sessions = Sessions::new(10, None);
    let stops = spawner.stops.clone();
    let tokens = RunnerTokens::new(&dynogate_shared::Secret::new("k".repeat(32)), Duration::from_secs(120));
    let (session, handle) = Session::new(SessionParams {
        id: "s1".into(),
        transport: Transport::Streamable,
        pooled: false,
        token_id: "j1".into(),
        tokens,
        spec: RunnerSpec {
            traceparent: None,
            session: "s1".into(),
            token: dynogate_shared::Secret::new("t"),
            gateway_url: url::Url::parse("http://127.0.0.1:1/").unwrap(),
            launch: Default::default(),
        },
        spawner: Arc::new(spawner),
        sessions: sessions.clone(),
        timeouts,
        budget: crate::streams::Budget::unlimited(),
        shutdown: CancellationToken::new(),
        key_fingerprint: None,
        cluster: None,
        adopted: None,
    });
    sessions.insert(sessions.reserve().unwrap(), handle.clone());
    session.start(&tokio_util::task::TaskTracker::new());
    Harness { handle, sessions, stops }
}

/// A call's stream and a cursor over it.
struct Answer {
    stream: Arc<EventStream>,
    cursor: crate::streams::Cursor,
    read: std::collections::VecDeque<Event>,
}

impl Answer {
    fn new(stream: Arc<EventStream>) -> Self {
        Answer { cursor: stream.cursor(None), stream, read: Default::default() }
    }

    /// The next message on the stream.
    async fn next(&mut self) -> Event {
        loop {
            if let Some(event) = self.read.pop_front() {
                return event;
            }
            match self.stream.read(&mut self.cursor, Duration::from_secs(3600)).await {
                Batch::Events(events) => self.read.extend(events),
                Batch::Quiet => continue,
                other => panic!("stream ended: {other:?}"),
            }
        }
    }
}

/// Claims the runner slot once the session has let go of the old socket.
async fn claim(h: &Harness) -> RunnerSlot {
    loop {
        if let Some(slot) = h.handle.claim_runner_slot() {
            return slot;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Harness {
    /// The next JSON-RPC message the session sends to the runner (pings,
    /// acks and token refreshes skipped).
    async fn forwarded(outbox: &mut Outbox) -> Value {
        loop {
            match outbox.next().await.expect("the link is open") {
                Outgoing::Message(json) => return serde_json::from_slice(&json).unwrap(),
                Outgoing::Ping | Outgoing::Control(Control::Ack { .. } | Control::Token { .. }) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Connects a channel link as a runner that has received `received`
    /// messages; returns what the session sends and a way to answer.
    async fn attach(&self, received: u64) -> (Outbox, mpsc::UnboundedSender<Result<Incoming, LinkError>>) {
        let (link, mut outbox, tx) = channel_link();
        let slot = self.handle.claim_runner_slot().expect("slot is free");
        self.handle
            .send(Command::Attach { link, slot, received, acked: 0, jti: String::new() }, Duration::from_secs(1))
            .await
            .unwrap();
        match outbox.next().await {
            Some(Outgoing::Control(Control::Welcome { .. })) => {}
            other => panic!("expected a welcome, got {other:?}"),
        }
        (outbox, tx)
    }

    async fn call(&self, id: &str, progress: Option<&str>) -> Answer {
        let stream = self.handle.streams().open(1);
        let payload = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call"}}"#);
        let call = Call::new(
            RequestId::for_tests(id),
            progress.map(RequestId::for_tests),
            payload.into(),
            "tools/call",
            stream.clone(),
        );
        self.handle.send(Command::Call(call), Duration::from_secs(1)).await.unwrap();
        Answer::new(stream)
    }
}

fn message(json: &str) -> Result<Incoming, LinkError> {
    Ok(Incoming::Message(Bytes::copy_from_slice(json.as_bytes())))
}

fn parse(event: &Event) -> Value {
    serde_json::from_slice(&event.json).unwrap()
}

#[tokio::test]
async fn responses_find_their_request_by_id_whatever_the_order() {
    let h = start(timeouts());
    let (mut outbox, runner) = h.attach(0).await;
    let mut first = h.call("1", None).await;
    let mut second = h.call(r#""two""#, None).await;
    assert_eq!(Harness::forwarded(&mut outbox).await["id"], 1);
    assert_eq!(Harness::forwarded(&mut outbox).await["id"], "two");
    runner.send(message(r#"{"jsonrpc":"2.0","id":"two","result":{"n":2}}"#)).unwrap();
    runner.send(message(r#"{"jsonrpc":"2.0","id":1,"result":{"n":1}}"#)).unwrap();
    let (a, b) = (first.next().await, second.next().await);
    assert!(a.last && b.last);
    assert_eq!(parse(&a)["result"]["n"], 1);
    assert_eq!(parse(&b)["result"]["n"], 2);
}

#[tokio::test]
async fn progress_follows_its_token_and_strays_go_to_a_read_get_stream() {
    let h = start(timeouts());
    let (mut outbox, runner) = h.attach(0).await;
    let mut stream = Answer::new(h.handle.streams().standalone().clone());
    let mut call = h.call("1", Some(r#""p""#)).await;
    Harness::forwarded(&mut outbox).await;
    runner
        .send(message(
            r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"p","progress":1}}"#,
        ))
        .unwrap();
    runner.send(message(r#"{"jsonrpc":"2.0","method":"notifications/message","params":{"data":"stray"}}"#)).unwrap();
    runner.send(message(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#)).unwrap();
    let progress = call.next().await;
    assert!(!progress.last);
    assert_eq!(parse(&progress)["params"]["progress"], 1);
    assert!(call.next().await.last);
    assert_eq!(parse(&stream.next().await)["params"]["data"], "stray");
}

#[tokio::test]
async fn without_a_get_reader_server_messages_ride_the_only_call_in_flight() {
    let h = start(timeouts());
    let (mut outbox, runner) = h.attach(0).await;
    let mut call = h.call("1", None).await;
    Harness::forwarded(&mut outbox).await;
    let sampling = r#"{"jsonrpc":"2.0","id":"s1","method":"sampling/createMessage","params":{}}"#;
    runner.send(message(sampling)).unwrap();
    let asked = call.next().await;
    assert!(!asked.last);
    assert_eq!(parse(&asked)["method"], "sampling/createMessage");
    runner.send(message(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#)).unwrap();
    assert!(call.next().await.last);

    // Two calls in flight: which one it is about cannot be told, so it goes
    // to the GET stream, where a later GET finds it.
    let mut a = h.call("2", None).await;
    let _b = h.call("3", None).await;
    Harness::forwarded(&mut outbox).await;
    Harness::forwarded(&mut outbox).await;
    runner.send(message(r#"{"jsonrpc":"2.0","method":"notifications/message","params":{"data":"two"}}"#)).unwrap();
    runner.send(message(r#"{"jsonrpc":"2.0","id":2,"result":{}}"#)).unwrap();
    assert!(a.next().await.last, "the notification did not go on call 2's stream");
    let mut get = Answer::new(h.handle.streams().standalone().clone());
    assert_eq!(parse(&get.next().await)["params"]["data"], "two");
}

#[tokio::test]
async fn an_error_with_a_null_id_answers_the_only_request_in_flight() {
    let h = start(timeouts());
    let (mut outbox, runner) = h.attach(0).await;
    let mut call = h.call("9", None).await;
    Harness::forwarded(&mut outbox).await;
    runner.send(message(r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}"#)).unwrap();
    let answer = call.next().await;
    assert!(answer.last);
    assert_eq!(parse(&answer)["id"], 9);
    assert_eq!(parse(&answer)["error"]["code"], -32700);
}

#[tokio::test]
async fn a_cancelled_request_gets_no_response_and_its_stream_ends() {
    let h = start(timeouts());
    let (mut outbox, runner) = h.attach(0).await;
    let mut call = h.call("4", None).await;
    Harness::forwarded(&mut outbox).await;
    let cancel = r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":4}}"#;
    let cancelled = Some(RequestId::for_tests("4"));
    h.handle.send(Command::Notify { payload: cancel.into(), cancelled }, Duration::from_secs(1)).await.unwrap();
    Harness::forwarded(&mut outbox).await;
    runner.send(message(r#"{"jsonrpc":"2.0","id":4,"result":{}}"#)).unwrap();
    assert!(matches!(call.stream.read(&mut call.cursor, Duration::from_secs(5)).await, Batch::Ended));
    assert_eq!(h.handle.in_flight(), 0);
}

#[tokio::test]
async fn a_duplicate_request_id_is_refused_and_the_first_still_answered() {
    let h = start(timeouts());
    let (mut outbox, runner) = h.attach(0).await;
    let mut first = h.call("7", None).await;
    let mut duplicate = h.call("7", None).await;
    assert_eq!(parse(&duplicate.next().await)["error"]["code"], code::INVALID_REQUEST);
    Harness::forwarded(&mut outbox).await;
    runner.send(message(r#"{"jsonrpc":"2.0","id":7,"result":{}}"#)).unwrap();
    assert!(parse(&first.next().await)["result"].is_object());
}

#[tokio::test]
async fn a_progress_token_in_use_is_refused_and_the_first_request_keeps_its_progress() {
    let h = start(timeouts());
    let (mut outbox, runner) = h.attach(0).await;
    let mut first = h.call("1", Some(r#""p""#)).await;
    let mut clash = h.call("2", Some(r#""p""#)).await;
    let refusal = parse(&clash.next().await);
    assert_eq!(refusal["id"], 2);
    assert_eq!(refusal["error"]["code"], code::INVALID_PARAMS);
    assert!(refusal["error"]["message"].as_str().unwrap().contains("already used by request 1"), "{refusal}");
    assert_eq!(Harness::forwarded(&mut outbox).await["id"], 1, "only the first request reached the runner");
    runner
        .send(message(
            r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"p","progress":1}}"#,
        ))
        .unwrap();
    runner.send(message(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#)).unwrap();
    assert_eq!(parse(&first.next().await)["params"]["progress"], 1);
    assert!(first.next().await.last);

    // Once the first is answered, the token is free again.
    let mut again = h.call("3", Some(r#""p""#)).await;
    assert_eq!(Harness::forwarded(&mut outbox).await["id"], 3);
    runner.send(message(r#"{"jsonrpc":"2.0","id":3,"result":{}}"#)).unwrap();
    assert!(parse(&again.next().await)["result"].is_object());
}

#[tokio::test(start_paused = true)]
async fn without_a_dial_back_waiting_calls_fail_and_the_runner_is_stopped() {
    let h = start(timeouts());
    let mut call = h.call("1", None).await;
    let answer = call.next().await;
    let error = &parse(&answer)["error"];
    assert_eq!(error["code"], code::RUNNER_UNAVAILABLE);
    assert!(error["message"].as_str().unwrap().contains("did not dial back within 30s"));
    h.handle.finished().await;
    assert_eq!(h.stops.load(Ordering::SeqCst), 1);
    assert!(h.sessions.get("s1").is_none());
}

#[tokio::test(start_paused = true)]
async fn a_runner_that_does_not_come_back_fails_everything_in_flight_and_leaves_the_table() {
    let h = start(timeouts());
    let (mut outbox, runner) = h.attach(0).await;
    let mut calls = vec![h.call("1", None).await, h.call("2", None).await];
    Harness::forwarded(&mut outbox).await;
    Harness::forwarded(&mut outbox).await;
    drop(runner);
    for call in &mut calls {
        assert_eq!(parse(&call.next().await)["error"]["code"], code::RUNNER_LOST);
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
    let (mut outbox, _runner) = h.attach(0).await;
    let mut call = h.call("1", None).await;
    Harness::forwarded(&mut outbox).await;
    assert_eq!(parse(&call.next().await)["error"]["code"], code::REQUEST_TIMEOUT);
    let cancel = Harness::forwarded(&mut outbox).await;
    assert_eq!(cancel["method"], "notifications/cancelled");
    assert_eq!(cancel["params"]["requestId"], 1);
}

#[tokio::test(start_paused = true)]
async fn an_idle_session_ends_and_a_busy_one_does_not() {
    let h = start(Timeouts { idle: Duration::from_secs(60), heartbeat: Duration::from_secs(3600), ..timeouts() });
    let (mut outbox, runner) = h.attach(0).await;
    let mut call = h.call("1", None).await;
    Harness::forwarded(&mut outbox).await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(h.sessions.get("s1").is_some(), "a session with a request in flight is not idle");
    runner.send(message(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#)).unwrap();
    assert!(call.next().await.last);
    h.handle.finished().await;
    assert!(h.sessions.get("s1").is_none());
}

#[tokio::test(start_paused = true)]
async fn a_runner_that_comes_back_gets_exactly_what_it_missed() {
    let h = start(timeouts());
    let (mut outbox, runner) = h.attach(0).await;
    let mut first = h.call("1", None).await;
    let mut second = h.call("2", None).await;
    assert_eq!(Harness::forwarded(&mut outbox).await["id"], 1);
    assert_eq!(Harness::forwarded(&mut outbox).await["id"], 2);
    runner.send(message(r#"{"jsonrpc":"2.0","id":1,"result":{"n":1}}"#)).unwrap();
    assert_eq!(parse(&first.next().await)["result"]["n"], 1);
    drop(runner);
    drop(outbox);
    // While the runner is away, a new request waits.
    let mut third = h.call("3", None).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(h.sessions.get("s1").is_some(), "the session waits for its runner");

    // The runner had received only the first request before the drop.
    let (link, mut outbox, runner) = channel_link();
    let slot = claim(&h).await;
    h.handle
        .send(Command::Attach { link, slot, received: 1, acked: 0, jti: String::new() }, Duration::from_secs(1))
        .await
        .unwrap();
    let Some(Outgoing::Control(Control::Welcome { received, .. })) = outbox.next().await else { panic!("welcome") };
    assert_eq!(received, 1, "the session tells how much it got from the runner");
    assert_eq!(Harness::forwarded(&mut outbox).await["id"], 2);
    assert_eq!(Harness::forwarded(&mut outbox).await["id"], 3);
    runner.send(message(r#"{"jsonrpc":"2.0","id":2,"result":{"n":2}}"#)).unwrap();
    runner.send(message(r#"{"jsonrpc":"2.0","id":3,"result":{"n":3}}"#)).unwrap();
    assert_eq!(parse(&second.next().await)["result"]["n"], 2);
    assert_eq!(parse(&third.next().await)["result"]["n"], 3);
}

#[tokio::test(start_paused = true)]
async fn a_runner_that_lost_its_state_ends_the_session() {
    let h = start(timeouts());
    let (mut outbox, runner) = h.attach(0).await;
    let mut call = h.call("1", None).await;
    Harness::forwarded(&mut outbox).await;
    runner.send(Ok(Incoming::Control(Control::Ack { received: 1 }))).unwrap();
    runner.send(message(r#"{"jsonrpc":"2.0","method":"notifications/message","params":{}}"#)).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(runner);
    // A fresh runner (say, a restarted dyno) claims to have received nothing.
    let (link, _outbox, _runner) = channel_link();
    let slot = claim(&h).await;
    h.handle
        .send(Command::Attach { link, slot, received: 0, acked: 0, jti: String::new() }, Duration::from_secs(1))
        .await
        .unwrap();
    let mut answer = call.next().await;
    while !answer.last {
        answer = call.next().await;
    }
    assert_eq!(parse(&answer)["error"]["code"], code::RUNNER_LOST);
    h.handle.finished().await;
}

#[tokio::test(start_paused = true)]
async fn a_runner_can_come_back_even_when_the_window_is_full() {
    let h = start(timeouts());
    let (_outbox, runner) = h.attach(0).await;
    drop(runner);
    // While the runner is away, the client fills the window and the queue
    // behind it, until the session says it is busy.
    let mut busy = false;
    for i in 0..MAX_UNACKED + 200 {
        let notify = Command::Notify { payload: format!(r#"{{"n":{i}}}"#).into(), cancelled: None };
        if let Err(e) = h.handle.send(notify, Duration::from_millis(100)).await {
            assert!(matches!(e, SendError::Busy));
            busy = true;
            break;
        }
    }
    assert!(busy, "the window never filled");
    // The runner's return is still taken, and it gets everything.
    let (link, mut outbox, _runner) = channel_link();
    let slot = claim(&h).await;
    h.handle
        .send(Command::Attach { link, slot, received: 0, acked: 0, jti: String::new() }, Duration::from_secs(1))
        .await
        .unwrap();
    let Some(Outgoing::Control(Control::Welcome { .. })) = outbox.next().await else { panic!("welcome") };
    assert_eq!(Harness::forwarded(&mut outbox).await["n"], 0);
}

#[tokio::test(start_paused = true)]
async fn an_ended_session_keeps_its_place_until_its_runner_is_gone() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let h = start_with(timeouts(), FakeSpawner { gate: Some(gate.clone()), ..Default::default() });
    // No runner dials back: the session ends at the dial-back timeout and stops its runner.
    while h.stops.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(h.sessions.get("s1").is_none(), "gone from the table at once");
    assert_eq!(h.sessions.len(), 1, "but its place is held while its runner stops");
    gate.add_permits(1);
    h.handle.finished().await;
    assert_eq!(h.sessions.len(), 0);
}
