//! The relay driven through channels: each socket is a link made of
//! channels, the redialer hands every dial to the test to answer, the MCP
//! server is its stdout and stdin queues, and time is paused, so it moves
//! only when every task waits (then straight to the next timer).

use std::os::unix::process::ExitStatusExt;

use dynogate_shared::window::{ACK_EVERY, MAX_UNACKED};
use futures_util::FutureExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::*;
use crate::config::ServerCommand;
use crate::link::channel_link;

const HEARTBEAT: Duration = Duration::from_secs(20);
const RECONNECT_WINDOW: Duration = Duration::from_secs(90);
/// The server's stdout and stdin queues hold this many messages, as in the bridge.
const QUEUE: usize = 64;

/// The gateway's end of one socket.
struct Gateway {
    /// What the relay sent on this socket.
    sent: mpsc::UnboundedReceiver<Message>,
    /// What the gateway says; `None` once it hung up.
    says: Option<mpsc::UnboundedSender<Result<Message, WsError>>>,
}

impl Gateway {
    fn open() -> (Link, Gateway) {
        let (link, sent, says) = channel_link();
        (link, Gateway { sent, says: Some(says) })
    }

    fn say(&self, message: Message) {
        self.send(Ok(message));
    }

    /// Passes `item` to the relay's socket stream: a message or a transport error.
    fn send(&self, item: Result<Message, WsError>) {
        let says = self.says.as_ref().expect("the gateway has not hung up");
        says.send(item).expect("the relay reads this socket");
    }

    /// Ends the socket's stream, as a connection that just stops.
    fn hang_up(&mut self) {
        self.says = None;
    }

    fn text(&self, text: &str) {
        self.say(Message::text(text));
    }

    fn control(&self, control: &Control) {
        self.say(Message::Binary(control.encode().into()));
    }

    /// The next thing the relay sent; the socket must still be open.
    async fn next(&mut self) -> Message {
        self.sent.recv().await.expect("the relay's writer is running")
    }

    async fn next_control(&mut self) -> Control {
        match self.next().await {
            Message::Binary(bytes) => Control::decode(&bytes).expect("a well-formed control frame"),
            other => panic!("expected a control frame, got {other:?}"),
        }
    }

    /// Everything sent and not yet read, once every task waits.
    async fn rest(&mut self) -> Vec<Message> {
        settle().await;
        std::iter::from_fn(|| self.sent.try_recv().ok()).collect()
    }
}

/// A dial the relay started, for the test to answer.
struct RedialCall {
    token: String,
    received: u64,
    deadline: Instant,
    answer: oneshot::Sender<Result<(Link, Welcome), DialError>>,
}

impl RedialCall {
    /// Lets the relay back in: the gateway has `received` of its messages.
    fn welcome(self, received: u64, token: &str) -> Gateway {
        let (link, gateway) = Gateway::open();
        let welcome = Welcome { received, token: Secret::new(token) };
        assert!(self.answer.send(Ok((link, welcome))).is_ok(), "the relay waits for its dial");
        gateway
    }

    fn fail(self, error: DialError) {
        assert!(self.answer.send(Err(error)).is_ok(), "the relay waits for its dial");
    }
}

/// A relay running in a task, and the other end of everything it touches.
struct Harness {
    gateway: Gateway,
    /// The server's stdout; `None` once closed.
    stdout: Option<mpsc::Sender<Utf8Bytes>>,
    /// What reached the server's stdin.
    stdin: mpsc::Receiver<Bytes>,
    redials: mpsc::UnboundedReceiver<RedialCall>,
    exit: Option<oneshot::Sender<ExitStatus>>,
    stop: Option<oneshot::Sender<()>>,
    relay: JoinHandle<End>,
}

fn dial() -> Dial {
    Dial {
        local: false,
        rendezvous: url::Url::parse("ws://127.0.0.1:1/rendezvous?session=s").unwrap(),
        session_dir: None,
        session: "0123456789abcdef0123456789abcdef".into(),
        token: Secret::new("t0"),
        server: ServerCommand::BuiltIn,
        stop_grace: Duration::from_secs(2),
        heartbeat: HEARTBEAT,
        reconnect_window: RECONNECT_WINDOW,
        sandbox: crate::sandbox::Settings {
            mode: crate::sandbox::Mode::Off,
            network: true,
            disk: None,
            limits: Default::default(),
            bind: Vec::new(),
        },
        server_env: Vec::new(),
    }
}

/// A relay welcomed by a gateway that has nothing from it yet, with token `t1`.
fn start() -> Harness {
    let (link, gateway) = Gateway::open();
    let (calls, redials) = mpsc::unbounded_channel();
    let redialer: Redialer = Box::new(move |token: Secret, position: crate::dial::Position, deadline| {
        let (answer, answered) = oneshot::channel();
        let received = position.received;
        let _ = calls.send(RedialCall { token: token.expose().to_owned(), received, deadline, answer });
        async move { answered.await.unwrap_or_else(|_| Err(DialError::Unreachable("the test dropped the dial".into()))) }
            .boxed()
    });
    let mut relay = Relay::new(dial(), link, Welcome { received: 0, token: Secret::new("t1") }, redialer);
    let (stdout, lines) = mpsc::channel(QUEUE);
    let (stdin_tx, stdin) = mpsc::channel(QUEUE);
    let (exit, exited) = oneshot::channel();
    let (stop, stopped) = oneshot::channel();
    // A dropped sender means "never", not "now".
    let server_exit = async move {
        match exited.await {
            Ok(status) => status,
            Err(_) => std::future::pending().await,
        }
    };
    let stop_signal = async move {
        if stopped.await.is_err() {
            std::future::pending().await
        }
    };
    let relay = tokio::spawn(async move { relay.run(server_exit, stop_signal, lines, stdin_tx).await });
    Harness { gateway, stdout: Some(stdout), stdin, redials, exit: Some(exit), stop: Some(stop), relay }
}

/// Lets every task run until all of them wait, then moves the clock by a
/// millisecond (paused time moves only when nothing can run).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

fn line(n: usize) -> String {
    format!(r#"{{"jsonrpc":"2.0","method":"notifications/message","params":{{"n":{n}}}}}"#)
}

impl Harness {
    fn stdout(&self) -> &mpsc::Sender<Utf8Bytes> {
        self.stdout.as_ref().expect("the server's stdout is open")
    }

    async fn write(&self, text: &str) {
        self.stdout().send(text.into()).await.expect("the relay reads the server's stdout");
    }

    fn close_stdout(&mut self) {
        self.stdout = None;
    }

    fn exit(&mut self, status: ExitStatus) {
        let exit = self.exit.take().expect("the server exits once");
        exit.send(status).expect("the relay waits for the server");
    }

    fn stop(&mut self) {
        let stop = self.stop.take().expect("stopped once");
        stop.send(()).expect("the relay waits for the signal");
    }

    async fn next_redial(&mut self) -> RedialCall {
        self.redials.recv().await.expect("the relay is alive")
    }

    async fn end(self) -> End {
        self.relay.await.expect("the relay did not panic")
    }
}

#[tokio::test(start_paused = true)]
async fn server_lines_go_out_as_text_and_gateway_text_goes_to_stdin() {
    let mut h = start();
    h.write(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#).await;
    assert_eq!(h.gateway.next().await, Message::text(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#));
    h.gateway.text(r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#);
    assert_eq!(h.stdin.recv().await.unwrap(), Bytes::from_static(br#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#));
}

#[tokio::test(start_paused = true)]
async fn a_delivered_message_is_acknowledged_ack_delay_later() {
    let mut h = start();
    let t0 = Instant::now();
    h.gateway.text(&line(1));
    h.stdin.recv().await.unwrap();
    tokio::time::sleep(ACK_DELAY - Duration::from_millis(1)).await;
    assert_eq!(h.gateway.rest().await, [], "nothing before ACK_DELAY");
    assert_eq!(h.gateway.next_control().await, Control::Ack { received: 1 });
    assert_eq!(t0.elapsed(), ACK_DELAY);
}

#[tokio::test(start_paused = true)]
async fn ack_every_messages_are_acknowledged_at_once() {
    let mut h = start();
    let t0 = Instant::now();
    for n in 0..ACK_EVERY as usize {
        h.gateway.text(&line(n));
    }
    assert_eq!(h.gateway.next_control().await, Control::Ack { received: ACK_EVERY });
    assert_eq!(t0.elapsed(), Duration::ZERO, "without waiting for ACK_DELAY");
    // The delay timer the first delivery armed then has nothing new to say.
    tokio::time::sleep(ACK_DELAY * 2).await;
    assert_eq!(h.gateway.rest().await, []);
}

#[tokio::test(start_paused = true)]
async fn only_messages_handed_to_stdin_are_acknowledged() {
    let mut h = start();
    // The server reads nothing: its stdin queue fills and six wait in the relay.
    for n in 0..QUEUE + 6 {
        h.gateway.text(&line(n));
    }
    assert_eq!(h.gateway.next_control().await, Control::Ack { received: ACK_EVERY });
    assert_eq!(h.gateway.next_control().await, Control::Ack { received: QUEUE as u64 });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.gateway.rest().await, [], "the six the server has not taken stay unacknowledged");

    for _ in 0..10 {
        h.stdin.recv().await.unwrap();
    }
    let t0 = Instant::now();
    assert_eq!(h.gateway.next_control().await, Control::Ack { received: QUEUE as u64 + 6 });
    assert_eq!(t0.elapsed(), ACK_DELAY);
}

#[tokio::test(start_paused = true)]
async fn a_full_window_stops_reading_the_server_until_the_gateway_acknowledges() {
    let mut h = start();
    let stdout = h.stdout().clone();
    tokio::spawn(async move {
        for n in 0..MAX_UNACKED + 5 {
            stdout.send(line(n).into()).await.unwrap();
        }
    });
    for n in 0..MAX_UNACKED {
        assert_eq!(h.gateway.next().await, Message::text(line(n)));
    }
    assert_eq!(h.gateway.rest().await, [], "the window is full");
    assert_eq!(h.stdout().capacity(), QUEUE - 5, "the rest waits in the server's stdout");

    // Three acknowledged make room for exactly three more.
    h.gateway.control(&Control::Ack { received: 3 });
    for n in MAX_UNACKED..MAX_UNACKED + 3 {
        assert_eq!(h.gateway.next().await, Message::text(line(n)));
    }
    assert_eq!(h.gateway.rest().await, []);
    assert_eq!(h.stdout().capacity(), QUEUE - 2);
}

#[tokio::test(start_paused = true)]
async fn an_ack_for_more_than_was_sent_ends_the_relay() {
    let mut h = start();
    h.write(&line(1)).await;
    h.gateway.next().await;
    h.gateway.control(&Control::Ack { received: 2 });
    match h.end().await {
        End::ConnectionLost(why) => assert!(why.contains("only 1 were sent"), "{why}"),
        other => panic!("ended with {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_quiet_gateway_is_pinged_every_heartbeat_and_kept_while_it_answers() {
    let mut h = start();
    let t0 = Instant::now();
    for n in 1..=2 * MISSED_HEARTBEATS {
        assert_eq!(h.gateway.next().await, Message::Ping(Bytes::new()));
        assert_eq!(t0.elapsed(), HEARTBEAT * n);
        h.gateway.say(Message::Pong(Bytes::new()));
    }
    settle().await;
    assert!(h.redials.try_recv().is_err(), "a gateway that answers is not given up on");
}

#[tokio::test(start_paused = true)]
async fn a_silent_gateway_is_given_up_on_and_dialed_again() {
    let mut h = start();
    let t0 = Instant::now();
    for n in 1..=MISSED_HEARTBEATS {
        assert_eq!(h.gateway.next().await, Message::Ping(Bytes::new()));
        assert_eq!(t0.elapsed(), HEARTBEAT * n);
    }
    // Silent for exactly MISSED_HEARTBEATS intervals is still alive; the
    // next tick finds it silent for longer.
    let call = h.next_redial().await;
    assert_eq!(t0.elapsed(), HEARTBEAT * (MISSED_HEARTBEATS + 1));
    assert_eq!((call.token.as_str(), call.received), ("t1", 0));
    assert_eq!(call.deadline, Instant::now() + RECONNECT_WINDOW);
    assert!(h.gateway.sent.recv().await.is_none(), "the old socket's writer is stopped");
}

#[tokio::test(start_paused = true)]
async fn a_redial_resends_exactly_what_the_gateway_lacks() {
    let mut h = start();
    for n in 1..=4 {
        h.write(&line(n)).await;
        assert_eq!(h.gateway.next().await, Message::text(line(n)));
    }
    h.gateway.control(&Control::Ack { received: 1 });
    for n in 1..=3 {
        h.gateway.text(&line(n));
        h.stdin.recv().await.unwrap();
    }
    h.gateway.control(&Control::Token { token: Secret::new("t2") });
    // Lost before the acknowledgement of those three was due.
    h.gateway.say(Message::Close(None));
    let call = h.next_redial().await;
    assert_eq!((call.token.as_str(), call.received), ("t2", 3), "the latest token and the count for the hello");
    h.write(&line(5)).await;
    settle().await;

    // The gateway got lines 1 and 2 but had acknowledged only line 1.
    h.gateway = call.welcome(2, "t3");
    let resent: Vec<_> = (3..=5).map(|n| Message::text(line(n))).collect();
    tokio::time::sleep(ACK_DELAY * 2).await;
    assert_eq!(h.gateway.rest().await, resent, "lines 3 to 5, and no ack: the hello carried the count");
    h.write(&line(6)).await;
    assert_eq!(h.gateway.next().await, Message::text(line(6)));

    h.gateway.hang_up();
    assert_eq!(h.next_redial().await.token, "t3", "the welcome's token is the next dial's");
}

#[tokio::test(start_paused = true)]
async fn a_gateway_that_comes_back_with_less_than_it_acknowledged_ends_the_relay() {
    let mut h = start();
    for n in 1..=2 {
        h.write(&line(n)).await;
        h.gateway.next().await;
    }
    h.gateway.control(&Control::Ack { received: 2 });
    h.gateway.send(Err(WsError::ConnectionClosed));
    let call = h.next_redial().await;
    let _gateway = call.welcome(1, "t2");
    match h.end().await {
        End::ConnectionLost(why) => assert!(why.contains("out of step"), "{why}"),
        other => panic!("ended with {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_redial_ends_the_relay() {
    let mut h = start();
    h.gateway.hang_up();
    h.next_redial().await.fail(DialError::Refused("no such session".into()));
    match h.end().await {
        End::ConnectionLost(why) => {
            assert!(why.ends_with("could not dial the gateway again: no such session"), "{why}")
        }
        other => panic!("ended with {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_redial_that_never_lands_is_abandoned_after_the_reconnect_window() {
    let mut h = start();
    let t0 = Instant::now();
    h.gateway.hang_up();
    let _call = h.next_redial().await;
    let end = h.end().await;
    assert!(matches!(&end, End::ConnectionLost(why) if why.contains("did not take the runner back")), "{end:?}");
    // Checked on heartbeat ticks: the first at or after the window.
    assert_eq!(t0.elapsed(), Duration::from_secs(100));
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_from_the_gateway_ends_the_relay() {
    let h = start();
    h.gateway.control(&Control::Shutdown { reason: "the session is idle".into() });
    assert!(matches!(h.end().await, End::GatewayShutdown(reason) if reason == "the session is idle"));
}

#[tokio::test(start_paused = true)]
async fn the_stop_signal_ends_the_relay() {
    let mut h = start();
    h.stop();
    assert!(matches!(h.end().await, End::Signal));
}

#[tokio::test(start_paused = true)]
async fn a_malformed_control_frame_is_ignored() {
    let mut h = start();
    h.gateway.say(Message::Binary(Bytes::from_static(b"\xff not a control frame")));
    h.gateway.text(&line(1));
    assert_eq!(h.stdin.recv().await.unwrap(), Bytes::from(line(1)));
    assert!(!h.relay.is_finished());
}

#[tokio::test(start_paused = true)]
async fn a_server_that_exits_ends_the_relay_after_its_last_lines() {
    let mut h = start();
    h.write(&line(1)).await;
    h.exit(ExitStatus::from_raw(3 << 8));
    settle().await;
    h.write(&line(2)).await;
    h.close_stdout();
    assert_eq!(h.gateway.next().await, Message::text(line(1)));
    assert_eq!(h.gateway.next().await, Message::text(line(2)));
    let t0 = Instant::now();
    let end = h.end().await;
    assert!(matches!(end, End::ServerExited(status) if status.code() == Some(3)), "{end:?}");
    assert_eq!(t0.elapsed(), Duration::ZERO, "a closed stdout is not waited for");
}

#[tokio::test(start_paused = true)]
async fn a_stdout_left_open_after_exit_is_drained_for_drain_timeout() {
    let mut h = start();
    let t0 = Instant::now();
    h.exit(ExitStatus::from_raw(0));
    // A grandchild still holds stdout and writes once more.
    settle().await;
    h.write(&line(1)).await;
    assert_eq!(h.gateway.next().await, Message::text(line(1)));
    let stdout = h.stdout.take();
    let end = h.end().await;
    assert!(matches!(end, End::ServerExited(status) if status.success()), "{end:?}");
    assert_eq!(t0.elapsed(), DRAIN_TIMEOUT);
    drop(stdout);
}

#[tokio::test(start_paused = true)]
async fn a_server_that_exits_while_the_socket_is_down_is_heard_once_it_is_back() {
    let mut h = start();
    h.gateway.hang_up();
    let call = h.next_redial().await;
    h.write(&line(1)).await;
    h.exit(ExitStatus::from_raw(0));
    h.close_stdout();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!h.relay.is_finished(), "its last line has nowhere to go yet");

    let mut gateway = call.welcome(0, "t2");
    assert_eq!(gateway.next().await, Message::text(line(1)));
    assert!(matches!(h.end().await, End::ServerExited(_)));
}
