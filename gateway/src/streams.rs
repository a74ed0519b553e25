//! The SSE streams of a session, kept so a client can resume them.
//!
//! Every answer that may be streamed has an [`EventStream`]: the session
//! pushes messages into it, and HTTP responses read from it. Events are
//! numbered within their stream and sent with the SSE id `<stream>-<n>`, so a
//! client that lost its connection can come back with `Last-Event-ID` and get
//! every later event exactly once: the stream remembers its events, and a new
//! reader replaces the old one (a message is never sent on two connections).
//!
//! Stream 0 is the session's GET stream (messages that belong to no request;
//! on the older HTTP+SSE transport, everything). Other streams carry one POST's
//! answer and end after its last response. Memory is bounded: each stream
//! keeps a fixed number of events (progress notifications are dropped first,
//! responses never), and finished streams are retained for a while, up to a
//! fixed count, for late resumptions.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Events kept by the GET stream.
pub const STANDALONE_EVENTS: usize = 1024;
/// Events kept by a POST's stream.
pub const REPLY_EVENTS: usize = 256;
/// Finished streams kept for resumption.
const RETAINED_STREAMS: usize = 256;
/// How long a finished stream stays resumable.
const RETAIN_FOR: Duration = Duration::from_secs(300);

/// One message on a stream.
#[derive(Debug, Clone)]
pub struct Event {
    pub n: u64,
    pub json: Bytes,
    /// A response (as opposed to a notification or request before it).
    pub last: bool,
}

/// What a reader gets next.
#[derive(Debug)]
pub enum Batch {
    Events(Vec<Event>),
    /// Nothing for a while: time for a keepalive.
    Quiet,
    /// The stream is complete (or its session ended) and fully read.
    Ended,
    /// Another connection resumed this stream; this one must stop.
    Replaced,
}

#[derive(Debug)]
struct State {
    events: VecDeque<Event>,
    next: u64,
    cap: usize,
    /// Responses still expected; `None` for the GET stream.
    awaiting: Option<usize>,
    closed: bool,
    /// Generation of the current reader.
    reader: u64,
    /// Highest event number handed to any reader.
    handed: u64,
}

/// A resumable sequence of messages.
#[derive(Debug)]
pub struct EventStream {
    id: u64,
    state: Mutex<State>,
    changed: Notify,
}

impl EventStream {
    fn new(id: u64, cap: usize, awaiting: Option<usize>) -> Arc<Self> {
        Arc::new(Self {
            id,
            state: Mutex::new(State {
                events: VecDeque::new(),
                next: 1,
                cap,
                awaiting,
                closed: false,
                reader: 0,
                handed: 0,
            }),
            changed: Notify::new(),
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The SSE id of event `n` of this stream.
    pub fn event_id(&self, n: u64) -> String {
        format!("{}-{n}", self.id)
    }

    /// Appends a message. Returns true when this completes the stream.
    pub fn push(&self, json: Bytes, last: bool) -> bool {
        let complete = {
            let mut state = self.state.lock().expect("stream lock");
            if state.closed {
                return false;
            }
            if state.events.len() >= state.cap {
                // What a reader already has goes first, then notifications.
                // A POST's stream never drops a response; the GET stream (on
                // the older transport it carries responses too) stays bounded.
                let handed = state.handed;
                let victim = state
                    .events
                    .iter()
                    .position(|e| e.n <= handed)
                    .or_else(|| state.events.iter().position(|e| !e.last))
                    .or_else(|| state.awaiting.is_none().then_some(0));
                match victim {
                    Some(i) => {
                        state.events.remove(i);
                    }
                    None if !last => return false,
                    None => {}
                }
            }
            let n = state.next;
            state.next += 1;
            state.events.push_back(Event { n, json, last });
            if last && let Some(awaiting) = state.awaiting.as_mut() {
                *awaiting = awaiting.saturating_sub(1);
            }
            state.awaiting == Some(0)
        };
        self.changed.notify_waiters();
        complete
    }

    /// Ends the stream for good (its session ended).
    pub fn close(&self) {
        self.state.lock().expect("stream lock").closed = true;
        self.changed.notify_waiters();
    }

    /// Becomes the stream's only reader. `after` is the last event the client
    /// has (from `Last-Event-ID`); `None` starts after what earlier readers
    /// were given. Earlier readers get [`Batch::Replaced`] from then on.
    pub fn cursor(&self, after: Option<u64>) -> Cursor {
        let mut state = self.state.lock().expect("stream lock");
        state.reader += 1;
        let cursor = Cursor { generation: state.reader, after: after.unwrap_or(state.handed) };
        drop(state);
        self.changed.notify_waiters();
        cursor
    }

    /// Waits up to `quiet` for events past the cursor.
    pub async fn read(&self, cursor: &mut Cursor, quiet: Duration) -> Batch {
        let deadline = Instant::now() + quiet;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.state.lock().expect("stream lock");
                if state.reader != cursor.generation {
                    return Batch::Replaced;
                }
                let fresh: Vec<Event> = state.events.iter().filter(|e| e.n > cursor.after).cloned().collect();
                if let Some(last) = fresh.last() {
                    cursor.after = last.n;
                    state.handed = state.handed.max(last.n);
                    return Batch::Events(fresh);
                }
                if state.closed || state.awaiting == Some(0) {
                    return Batch::Ended;
                }
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline) => return Batch::Quiet,
            }
        }
    }

    /// Whether an event after `after` is still held (so resuming loses nothing).
    pub fn can_resume_after(&self, after: u64) -> bool {
        let state = self.state.lock().expect("stream lock");
        after < state.next && state.events.front().is_none_or(|first| first.n <= after + 1)
    }
}

/// One reader's place in a stream (one HTTP response's worth).
#[derive(Debug, Clone, Copy)]
pub struct Cursor {
    generation: u64,
    after: u64,
}

impl Cursor {
    /// The last event number this reader has been given.
    pub fn position(&self) -> u64 {
        self.after
    }
}

/// The streams of one session.
#[derive(Debug)]
pub struct Streams {
    standalone: Arc<EventStream>,
    next_id: AtomicU64,
    registry: Mutex<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    live: HashMap<u64, Arc<EventStream>>,
    finished: VecDeque<(Instant, Arc<EventStream>)>,
}

impl Default for Streams {
    fn default() -> Self {
        Self {
            standalone: EventStream::new(0, STANDALONE_EVENTS, None),
            next_id: AtomicU64::new(1),
            registry: Mutex::default(),
        }
    }
}

impl Streams {
    /// The GET stream.
    pub fn standalone(&self) -> &Arc<EventStream> {
        &self.standalone
    }

    /// A new stream for an answer made of `responses` responses.
    pub fn open(&self, responses: usize) -> Arc<EventStream> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let stream = EventStream::new(id, REPLY_EVENTS.max(responses + 16), Some(responses));
        self.registry.lock().expect("registry lock").live.insert(id, stream.clone());
        stream
    }

    /// Moves a complete stream to the finished list, evicting old ones.
    pub fn finish(&self, id: u64) {
        let mut registry = self.registry.lock().expect("registry lock");
        if let Some(stream) = registry.live.remove(&id) {
            let now = Instant::now();
            registry.finished.push_back((now, stream));
            while registry.finished.len() > RETAINED_STREAMS
                || registry.finished.front().is_some_and(|(at, _)| now.duration_since(*at) > RETAIN_FOR)
            {
                registry.finished.pop_front();
            }
        }
    }

    /// Forgets a stream whose answer went out as plain JSON (nothing to resume).
    pub fn forget(&self, id: u64) {
        let mut registry = self.registry.lock().expect("registry lock");
        registry.live.remove(&id);
        registry.finished.retain(|(_, s)| s.id() != id);
    }

    /// The stream a `Last-Event-ID` names.
    pub fn find(&self, id: u64) -> Option<Arc<EventStream>> {
        if id == 0 {
            return Some(self.standalone.clone());
        }
        let registry = self.registry.lock().expect("registry lock");
        registry
            .live
            .get(&id)
            .cloned()
            .or_else(|| registry.finished.iter().find(|(_, s)| s.id() == id).map(|(_, s)| s.clone()))
    }

    /// Ends every stream (the session is over).
    pub fn close_all(&self) {
        self.standalone.close();
        let registry = self.registry.lock().expect("registry lock");
        for stream in registry.live.values() {
            stream.close();
        }
    }
}

/// Parses `<stream>-<n>`.
pub fn parse_event_id(text: &str) -> Option<(u64, u64)> {
    let (stream, n) = text.trim().split_once('-')?;
    Some((stream.parse().ok()?, n.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(text: &'static str) -> Bytes {
        Bytes::from_static(text.as_bytes())
    }

    const NOW: Duration = Duration::ZERO;

    #[tokio::test]
    async fn a_reply_stream_ends_after_its_last_response() {
        let streams = Streams::default();
        let stream = streams.open(1);
        assert!(!stream.push(b("p1"), false));
        assert!(stream.push(b("r"), true));
        let mut reader = stream.cursor(None);
        let Batch::Events(events) = stream.read(&mut reader, NOW).await else { panic!() };
        assert_eq!(events.iter().map(|e| e.n).collect::<Vec<_>>(), [1, 2]);
        assert!(matches!(stream.read(&mut reader, NOW).await, Batch::Ended));
    }

    #[tokio::test]
    async fn resuming_replays_exactly_what_came_after_and_replaces_the_old_reader() {
        let streams = Streams::default();
        let stream = streams.open(1);
        stream.push(b("p1"), false);
        stream.push(b("p2"), false);
        let mut first = stream.cursor(None);
        let Batch::Events(seen) = stream.read(&mut first, NOW).await else { panic!() };
        assert_eq!(seen.len(), 2);
        stream.push(b("p3"), false);
        // The client saw only event 1 before its connection dropped.
        let found = streams.find(stream.id()).unwrap();
        assert!(found.can_resume_after(1));
        let mut resumed = found.cursor(Some(1));
        assert!(matches!(stream.read(&mut first, NOW).await, Batch::Replaced));
        stream.push(b("r"), true);
        let Batch::Events(rest) = found.read(&mut resumed, NOW).await else { panic!() };
        assert_eq!(rest.iter().map(|e| e.json.clone()).collect::<Vec<_>>(), [b("p2"), b("p3"), b("r")]);
        assert!(matches!(found.read(&mut resumed, NOW).await, Batch::Ended));
    }

    #[tokio::test]
    async fn a_new_get_stream_gets_what_no_reader_was_given() {
        let streams = Streams::default();
        let standalone = streams.standalone().clone();
        standalone.push(b("early"), false);
        {
            let mut reader = standalone.cursor(None);
            let Batch::Events(events) = standalone.read(&mut reader, NOW).await else { panic!() };
            assert_eq!(events[0].json, b("early"));
        }
        standalone.push(b("later"), false);
        let mut reader = standalone.cursor(None);
        let Batch::Events(events) = standalone.read(&mut reader, NOW).await else { panic!() };
        assert_eq!(events.iter().map(|e| e.json.clone()).collect::<Vec<_>>(), [b("later")]);
        assert!(matches!(standalone.read(&mut reader, NOW).await, Batch::Quiet));
    }

    #[tokio::test]
    async fn full_streams_drop_notifications_but_never_responses() {
        let streams = Streams::default();
        let stream = streams.open(1);
        for _ in 0..REPLY_EVENTS * 2 {
            stream.push(b("progress"), false);
        }
        assert!(stream.push(b("answer"), true));
        let mut reader = stream.cursor(None);
        let Batch::Events(events) = stream.read(&mut reader, NOW).await else { panic!() };
        assert!(events.len() <= REPLY_EVENTS + 16);
        assert_eq!(events.last().unwrap().json, b("answer"));
        assert!(!stream.can_resume_after(0), "the oldest events are gone");
    }

    #[tokio::test]
    async fn the_get_stream_stays_bounded_even_with_only_responses() {
        let streams = Streams::default();
        let standalone = streams.standalone().clone();
        for _ in 0..STANDALONE_EVENTS * 2 {
            standalone.push(b("answer"), true);
        }
        standalone.push(b("notification"), false);
        let mut reader = standalone.cursor(None);
        let Batch::Events(events) = standalone.read(&mut reader, NOW).await else { panic!() };
        assert_eq!(events.len(), STANDALONE_EVENTS);
        assert_eq!(events.last().unwrap().json, b("notification"), "the newest message is kept");
    }

    #[tokio::test]
    async fn closing_ends_readers() {
        let streams = Streams::default();
        let standalone = streams.standalone().clone();
        let mut reader = standalone.cursor(None);
        streams.close_all();
        assert!(matches!(standalone.read(&mut reader, Duration::from_secs(60)).await, Batch::Ended));
    }

    #[test]
    fn event_ids_round_trip() {
        let streams = Streams::default();
        let stream = streams.open(1);
        assert_eq!(parse_event_id(&stream.event_id(7)), Some((stream.id(), 7)));
        assert_eq!(parse_event_id("x-1"), None);
        assert_eq!(parse_event_id("5"), None);
    }
}
