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
//! answer and end after its last response.
//!
//! Memory is bounded in bytes as well as in events, per stream, per session
//! and for the whole gateway ([`Budget`]). When a stream is full, what a
//! reader was already given goes first (it is kept only for resumption),
//! then notifications; a POST's stream never drops the response it exists
//! for, and the GET stream, which nobody may be reading, drops its oldest.
//! Finished streams are retained for a while for late resumptions, up to a
//! count and a byte total per session, and are the first to go when the
//! gateway as a whole is over its budget. A resume that needs an event that
//! was dropped is refused (the client then re-sends its request).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
/// Most bytes handed to one HTTP write: a reader that fell behind catches up
/// in chunks, so a client that stops reading pins at most one chunk (or one
/// larger message) in the connection's buffers.
const READ_CHUNK_BYTES: usize = 1024 * 1024;

/// Bytes of events the gateway keeps, across every stream of every session.
/// Cheap to clone; all clones share one count.
#[derive(Debug, Clone)]
pub struct Budget {
    used: Arc<AtomicUsize>,
    /// Above this, resumable-only data (events already read, finished
    /// streams) is dropped as soon as anything new is kept.
    gateway: usize,
    /// Bytes one stream keeps before it drops events, and bytes of finished
    /// streams a session retains for resumption (one stream's worth).
    stream: usize,
}

impl Budget {
    pub fn new(gateway: usize, stream: usize) -> Self {
        Self { used: Arc::default(), gateway, stream }
    }

    /// No practical limit, for tests.
    pub fn unlimited() -> Self {
        Self::new(usize::MAX / 2, usize::MAX / 2)
    }

    /// Bytes kept now, gateway-wide.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn over(&self) -> bool {
        self.used() > self.gateway
    }

    fn add(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    fn sub(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// One message on a stream.
#[derive(Debug, Clone)]
pub struct Event {
    pub n: u64,
    pub json: Bytes,
    /// A response (as opposed to a notification or request before it).
    pub last: bool,
}

/// What became of a pushed message.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pushed {
    /// Its event number; `None` when it was dropped (the stream is closed,
    /// or full of what it may not drop).
    pub n: Option<u64>,
    /// It completes the stream.
    pub complete: bool,
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
    /// Bytes of `events`.
    bytes: usize,
    next: u64,
    cap: usize,
    /// Responses still expected; `None` for the GET stream.
    awaiting: Option<usize>,
    closed: bool,
    /// Generation of the current reader.
    reader: u64,
    /// Highest event number handed to any reader.
    handed: u64,
    /// Whether a reader is attached now (an HTTP response is streaming it).
    reading: bool,
    /// Resuming after an event before this one is refused: the stream was
    /// restored without what came before.
    floor: u64,
}

impl State {
    /// The event to drop to make room, if any may go: what a reader already
    /// has, then notifications; on the GET stream anything, oldest first.
    fn victim(&self, resumable_only: bool) -> Option<usize> {
        let handed = self.handed;
        let first = self.events.iter().position(|e| e.n <= handed);
        if resumable_only {
            return first;
        }
        first
            .or_else(|| self.events.iter().position(|e| !e.last))
            .or_else(|| self.awaiting.is_none().then_some(0).filter(|_| !self.events.is_empty()))
    }

    fn drop_event(&mut self, i: usize, budget: &Budget) {
        if let Some(event) = self.events.remove(i) {
            self.bytes -= event.json.len();
            budget.sub(event.json.len());
        }
    }
}

/// A resumable sequence of messages.
#[derive(Debug)]
pub struct EventStream {
    id: u64,
    state: Mutex<State>,
    changed: Notify,
    budget: Budget,
}

impl Drop for EventStream {
    fn drop(&mut self) {
        let bytes = self.state.get_mut().map(|s| s.bytes).unwrap_or_default();
        self.budget.sub(bytes);
    }
}

impl EventStream {
    fn new(id: u64, cap: usize, awaiting: Option<usize>, budget: Budget) -> Arc<Self> {
        Arc::new(Self {
            id,
            state: Mutex::new(State {
                events: VecDeque::new(),
                bytes: 0,
                next: 1,
                cap,
                awaiting,
                closed: false,
                reader: 0,
                handed: 0,
                reading: false,
                floor: 0,
            }),
            changed: Notify::new(),
            budget,
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The SSE id of event `n` of this stream.
    pub fn event_id(&self, n: u64) -> String {
        format!("{}-{n}", self.id)
    }

    /// Appends a message.
    pub fn push(&self, json: Bytes, last: bool) -> Pushed {
        let pushed = {
            let mut state = self.state.lock().expect("stream lock");
            if state.closed {
                return Pushed::default();
            }
            let size = json.len();
            loop {
                let full = state.events.len() >= state.cap || state.bytes + size > self.budget.stream;
                let resumable_only = !full && self.budget.over();
                if !full && !resumable_only {
                    break;
                }
                match state.victim(resumable_only) {
                    Some(i) => state.drop_event(i, &self.budget),
                    None if resumable_only => break,
                    // A POST's stream keeps its response whatever it costs
                    // (one message, bounded by the message size limit).
                    None if last && state.awaiting.is_some() => break,
                    None => {
                        tracing::debug!(stream = self.id, bytes = size, "stream full; dropped a message");
                        return Pushed::default();
                    }
                }
            }
            let n = state.next;
            state.next += 1;
            state.bytes += size;
            self.budget.add(size);
            state.events.push_back(Event { n, json, last });
            if last && let Some(awaiting) = state.awaiting.as_mut() {
                *awaiting = awaiting.saturating_sub(1);
            }
            Pushed { n: Some(n), complete: state.awaiting == Some(0) }
        };
        self.changed.notify_waiters();
        pushed
    }

    /// One response this stream was waiting for will never come (its request
    /// was cancelled): the stream ends without it. Returns true when this
    /// completes the stream.
    pub fn give_up_one(&self) -> bool {
        let complete = {
            let mut state = self.state.lock().expect("stream lock");
            match state.awaiting.as_mut() {
                Some(awaiting) => {
                    *awaiting = awaiting.saturating_sub(1);
                    *awaiting == 0
                }
                None => false,
            }
        };
        self.changed.notify_waiters();
        complete
    }

    /// Whether an HTTP response is streaming this stream right now.
    pub fn has_reader(&self) -> bool {
        self.state.lock().expect("stream lock").reading
    }

    /// Drops what readers were already given (kept only for resumption).
    fn shed_resumable(&self) {
        let mut state = self.state.lock().expect("stream lock");
        while let Some(i) = state.victim(true) {
            state.drop_event(i, &self.budget);
        }
    }

    fn bytes(&self) -> usize {
        self.state.lock().expect("stream lock").bytes
    }

    /// Ends the stream for good (its session ended).
    pub fn close(&self) {
        self.state.lock().expect("stream lock").closed = true;
        self.changed.notify_waiters();
    }

    /// Becomes the stream's only reader, as [`Reader::new`] describes. HTTP
    /// responses read through a `Reader`, which also tells the stream when
    /// they end; this and [`EventStream::read`] are visible to the crate only
    /// for the session's unit tests.
    pub(crate) fn cursor(&self, after: Option<u64>) -> Cursor {
        let mut state = self.state.lock().expect("stream lock");
        state.reader += 1;
        state.reading = true;
        let cursor = Cursor { generation: state.reader, after: after.unwrap_or(state.handed) };
        drop(state);
        self.changed.notify_waiters();
        cursor
    }

    /// Waits up to `quiet` for events past the cursor.
    pub(crate) async fn read(&self, cursor: &mut Cursor, quiet: Duration) -> Batch {
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
                let mut size = 0;
                let fresh: Vec<Event> = state
                    .events
                    .iter()
                    .filter(|e| e.n > cursor.after)
                    .take_while(|e| {
                        let first = size == 0;
                        size += e.json.len().max(1);
                        first || size <= READ_CHUNK_BYTES
                    })
                    .cloned()
                    .collect();
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

    /// The reader of `cursor` went away (its HTTP response ended).
    fn release(&self, cursor: &Cursor) {
        let mut state = self.state.lock().expect("stream lock");
        if state.reader == cursor.generation {
            state.reading = false;
        }
    }

    /// Whether an event after `after` is still held (so resuming loses nothing).
    pub fn can_resume_after(&self, after: u64) -> bool {
        let state = self.state.lock().expect("stream lock");
        after < state.next && after >= state.floor && state.events.front().is_none_or(|first| first.n <= after + 1)
    }
}

/// A stream's current reader, for as long as an HTTP response streams it:
/// dropping it (the response ended) tells the stream nobody is reading.
#[derive(Debug)]
pub struct Reader {
    stream: Arc<EventStream>,
    cursor: Cursor,
}

impl Reader {
    /// Becomes `stream`'s only reader, after event `after` (from
    /// `Last-Event-ID`) or, with `None`, after what earlier readers were
    /// given. Earlier readers get [`Batch::Replaced`] from then on.
    pub fn new(stream: Arc<EventStream>, after: Option<u64>) -> Self {
        let cursor = stream.cursor(after);
        Self { stream, cursor }
    }

    pub async fn read(&mut self, quiet: Duration) -> Batch {
        self.stream.read(&mut self.cursor, quiet).await
    }

    pub fn stream(&self) -> &EventStream {
        &self.stream
    }

    /// The last event number this reader has been given.
    pub fn position(&self) -> u64 {
        self.cursor.after
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stream.release(&self.cursor);
    }
}

/// One reader's place in a stream (one HTTP response's worth).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cursor {
    generation: u64,
    after: u64,
}

/// The streams of one session.
#[derive(Debug)]
pub struct Streams {
    standalone: Arc<EventStream>,
    next_id: AtomicU64,
    registry: Mutex<Registry>,
    budget: Budget,
}

/// Told of each stream forgotten (see [`Streams::on_forget`]).
struct ForgetHook(Box<dyn Fn(u64) + Send + Sync>);

impl std::fmt::Debug for ForgetHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ForgetHook")
    }
}

#[derive(Debug, Default)]
struct Registry {
    on_forget: Option<ForgetHook>,
    live: HashMap<u64, Arc<EventStream>>,
    finished: VecDeque<(Instant, Arc<EventStream>)>,
    /// Bytes of `finished` (as they were when each finished).
    retained_bytes: usize,
}

impl Default for Streams {
    fn default() -> Self {
        Self::new(Budget::unlimited())
    }
}

impl Streams {
    pub fn new(budget: Budget) -> Self {
        Self {
            standalone: EventStream::new(0, STANDALONE_EVENTS, None, budget.clone()),
            next_id: AtomicU64::new(1),
            registry: Mutex::default(),
            budget,
        }
    }

    /// The streams of a session taken over from another instance: stream ids
    /// go on from `next_id`, and the GET stream's event numbers from
    /// `standalone_next`, so ids a client saw before are never reused and
    /// resuming after one of them loses nothing.
    pub fn resumed(budget: Budget, next_id: u64, standalone_next: u64) -> Self {
        let streams = Self::new(budget);
        streams.next_id.store(next_id.max(1), Ordering::Relaxed);
        {
            let mut state = streams.standalone.state.lock().expect("stream lock");
            state.next = standalone_next.max(1);
            state.handed = state.next - 1;
        }
        streams
    }

    /// Puts back a stream of a session taken over, as its journal kept it:
    /// its events, its numbering, and where resuming may start. With
    /// `awaiting` responses still to come it is live, else finished (kept
    /// for late resumptions). Stream 0 is the GET stream.
    pub fn restore(&self, id: u64, events: Vec<Event>, next: u64, floor: u64, awaiting: usize) {
        let stream = match id {
            0 => self.standalone.clone(),
            _ => EventStream::new(id, REPLY_EVENTS.max(awaiting + 16), Some(awaiting), self.budget.clone()),
        };
        {
            let mut state = stream.state.lock().expect("stream lock");
            for event in events {
                state.bytes += event.json.len();
                self.budget.add(event.json.len());
                state.events.push_back(event);
            }
            // Resuming needs every event after the client's last: none
            // before the first kept one (or, with none kept, before the
            // last number given) can be asked for.
            let first = state.events.front().map_or(next.saturating_sub(1), |e| e.n.saturating_sub(1));
            state.next = state.next.max(next).max(1);
            state.handed = state.next - 1;
            state.floor = floor.max(first);
        }
        if id != 0 {
            self.next_id.fetch_max(id + 1, Ordering::Relaxed);
            self.registry.lock().expect("registry lock").live.insert(id, stream);
            if awaiting == 0 {
                self.finish(id);
            }
        }
    }

    /// The last event number of the GET stream and of each live stream.
    pub fn numbering(&self) -> Vec<(u64, u64)> {
        let last = |stream: &EventStream| stream.state.lock().expect("stream lock").next - 1;
        let mut numbers = vec![(0, last(&self.standalone))];
        let registry = self.registry.lock().expect("registry lock");
        numbers.extend(registry.live.values().map(|stream| (stream.id(), last(stream))));
        numbers
    }

    /// Where numbering stands: the next stream id, and the GET stream's next
    /// event number.
    pub fn position(&self) -> (u64, u64) {
        (self.next_id.load(Ordering::Relaxed), self.standalone.state.lock().expect("stream lock").next)
    }

    /// The GET stream.
    pub fn standalone(&self) -> &Arc<EventStream> {
        &self.standalone
    }

    /// A new stream for an answer made of `responses` responses.
    pub fn open(&self, responses: usize) -> Arc<EventStream> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let stream = EventStream::new(id, REPLY_EVENTS.max(responses + 16), Some(responses), self.budget.clone());
        self.registry.lock().expect("registry lock").live.insert(id, stream.clone());
        stream
    }

    /// Moves a complete stream to the finished list, evicting old ones: past
    /// their time, beyond the count or the session's byte total, and all of
    /// them when the gateway is over its budget.
    pub fn finish(&self, id: u64) {
        let mut registry = self.registry.lock().expect("registry lock");
        if let Some(stream) = registry.live.remove(&id) {
            let now = Instant::now();
            registry.retained_bytes += stream.bytes();
            registry.finished.push_back((now, stream));
            while let Some((at, oldest)) = registry.finished.front() {
                let evict = registry.finished.len() > RETAINED_STREAMS
                    || now.duration_since(*at) > RETAIN_FOR
                    || registry.retained_bytes > self.budget.stream
                    || self.budget.over();
                if !evict {
                    break;
                }
                let bytes = oldest.bytes();
                registry.retained_bytes = registry.retained_bytes.saturating_sub(bytes);
                registry.finished.pop_front();
            }
        }
        drop(registry);
        if self.budget.over() {
            self.standalone.shed_resumable();
        }
    }

    /// Tells `hook` of every stream forgotten from now on (the session's
    /// journal drops what it kept of them).
    pub fn on_forget(&self, hook: impl Fn(u64) + Send + Sync + 'static) {
        self.registry.lock().expect("registry lock").on_forget = Some(ForgetHook(Box::new(hook)));
    }

    /// Forgets a stream whose answer went out as plain JSON (nothing to resume).
    pub fn forget(&self, id: u64) {
        let mut registry = self.registry.lock().expect("registry lock");
        if let Some(hook) = &registry.on_forget {
            (hook.0)(id);
        }
        registry.live.remove(&id);
        if let Some(i) = registry.finished.iter().position(|(_, s)| s.id() == id) {
            let bytes = registry.finished[i].1.bytes();
            registry.retained_bytes = registry.retained_bytes.saturating_sub(bytes);
            registry.finished.remove(i);
        }
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
    async fn streams_taken_over_go_on_numbering_where_their_last_owner_stopped() {
        let before = Streams::default();
        before.open(1);
        before.standalone().push(b("n1"), false);
        let (next_id, standalone_next) = before.position();
        assert_eq!((next_id, standalone_next), (2, 2));
        let after = Streams::resumed(Budget::unlimited(), next_id, standalone_next);
        assert_eq!(after.open(1).id(), 2, "no stream id is used twice");
        // A client that saw event 1 of the GET stream resumes after it, losing nothing.
        assert!(after.standalone().can_resume_after(1));
        after.standalone().push(b("n2"), false);
        let mut reader = after.standalone().cursor(Some(1));
        let Batch::Events(events) = after.standalone().read(&mut reader, NOW).await else { panic!() };
        assert_eq!(events.iter().map(|e| e.n).collect::<Vec<_>>(), [2]);
    }

    #[tokio::test]
    async fn a_reply_stream_ends_after_its_last_response() {
        let streams = Streams::default();
        let stream = streams.open(1);
        assert!(!stream.push(b("p1"), false).complete);
        assert!(stream.push(b("r"), true).complete);
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
        assert!(stream.push(b("answer"), true).complete);
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

    #[tokio::test]
    async fn a_restored_stream_resumes_after_what_its_client_saw_and_no_earlier() {
        let streams = Streams::default();
        let kept = |n| Event { n, json: b("progress"), last: false };
        streams.restore(4, vec![kept(3), kept(4)], 5, 0, 1);
        let stream = streams.find(4).expect("restored while its answer is awaited");
        assert!(stream.can_resume_after(2) && !stream.can_resume_after(1), "event 2 was not kept");
        let pushed = stream.push(b("answer"), true);
        assert_eq!((pushed.n, pushed.complete), (Some(5), true), "numbering goes on");
        let mut reader = stream.cursor(Some(2));
        let Batch::Events(events) = stream.read(&mut reader, NOW).await else { panic!() };
        assert_eq!(events.iter().map(|e| e.n).collect::<Vec<_>>(), [3, 4, 5]);
        // A stream that lost an event too large to keep: nothing before it resumes.
        streams.restore(6, Vec::new(), 3, 2, 0);
        let finished = streams.find(6).expect("finished streams stay resumable");
        assert!(!finished.can_resume_after(1) && finished.can_resume_after(2));
        assert_eq!(streams.open(1).id(), 7, "new streams come after restored ones");
    }
}
