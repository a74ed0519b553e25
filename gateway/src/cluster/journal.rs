//! A session's journal in Redis: what another instance needs to carry the
//! session on, calls in flight and all, if its owner dies outright.
//!
//! The owner writes ahead: a message goes to the runner only once it is in
//! the journal (with, for a request, the stream its answer goes to), and the
//! runner's messages are acknowledged only once the events they made are in
//! it. So whatever the runner holds, the journal knows of, and whatever the
//! journal lacks, the runner still holds and sends again. An instance that
//! takes the session over rebuilds from it ([`Recovered`]) the replay
//! window, the requests awaiting answers and the events kept for
//! `Last-Event-ID`, numbered as the dead owner numbered them.
//!
//! One writer task per session batches what the session records into one
//! script call, which checks that this instance still owns the session (an
//! instance wrongly thought dead cannot write over its successor's journal).
//! If Redis fails, the journal is given up for the session's life here: the
//! session goes on unjournalled rather than stall (a take-over then counts
//! from the runner's hello, as without a journal).
//!
//! Fields of `dg:journal:{sid}` (a hash, expiring with the session):
//! `ra` (messages to the runner it acknowledged), `rx` (messages from the
//! runner handled), `o:{n}` (message `n` to the runner, until acknowledged),
//! `c:{request id}` (a request awaiting its answer: its stream, progress
//! token and method), `e:{seq}` (an event: stream, number, whether it is a
//! response, and the message), `n:{stream}` (a live stream's last event
//! number).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use redis::Script;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

use super::{Cluster, ClusterError, keys};
use crate::jsonrpc::RequestId;
use crate::streams::Event;

/// Events kept per session, by count…
const EVENTS_KEPT: usize = 256;
/// …and by bytes; an event larger than this is recorded as dropped (a
/// resume that needs it is refused, as when a stream dropped it).
const EVENT_BYTES_KEPT: usize = 1024 * 1024;
/// Entries written in one script call at most.
const BATCH: usize = 512;
/// How long entries nothing urgent waits for gather before they are written.
const LAZY: Duration = Duration::from_millis(5);

/// Applies a batch if this instance owns the session; returns 1, or 0 when
/// another instance does, or -1 when none does (the directory lost it).
/// KEYS: session hash, journal hash. ARGV: owner, ttl ms, then (op, field,
/// value) triples: `S` sets, `D` deletes, `X` empties the journal.
static WRITE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return -1 end
if owner ~= ARGV[1] then return 0 end
for i = 3, #ARGV, 3 do
  if ARGV[i] == 'S' then redis.call('HSET', KEYS[2], ARGV[i + 1], ARGV[i + 2])
  elseif ARGV[i] == 'D' then redis.call('HDEL', KEYS[2], ARGV[i + 1])
  else redis.call('DEL', KEYS[2]) end
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
",
    )
});

/// A request sent to the runner, as the journal keeps it.
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub id: RequestId,
    pub stream: u64,
    pub progress_token: Option<RequestId>,
    pub method: String,
}

impl CallRecord {
    fn encode(&self) -> String {
        serde_json::json!({
            "s": self.stream,
            "t": self.progress_token.as_ref().map(RequestId::as_json),
            "m": self.method,
        })
        .to_string()
    }

    fn decode(id: &str, text: &[u8]) -> Option<Self> {
        let value: serde_json::Value = serde_json::from_slice(text).ok()?;
        Some(CallRecord {
            id: RequestId::from_json(id)?,
            stream: value["s"].as_u64()?,
            progress_token: value["t"].as_str().and_then(RequestId::from_json),
            method: value["m"].as_str().unwrap_or_default().to_owned(),
        })
    }
}

/// What a session records.
enum Entry {
    /// The journal starts again from what the session has now (whatever is
    /// there goes): messages to the runner acknowledged up to `acked`, and
    /// the counts written from here.
    Reset {
        acked: u64,
        written: Written,
    },
    /// What the session recorded while handling one thing (a message, a
    /// command, a timeout), written in one go or not at all.
    Unit(Vec<Entry>),
    /// A live stream's last event number (the journal starting again).
    Numbered {
        stream: u64,
        n: u64,
    },
    /// A request awaits its answer (one whose message is already written).
    Call(CallRecord),
    /// Message `n` to the runner, with the request it carries (in one entry,
    /// so both are written in one go).
    Sent {
        n: u64,
        payload: Bytes,
        call: Option<CallRecord>,
    },
    /// A request needs its record no more (answered, cancelled, timed out).
    Done(RequestId),
    Event {
        stream: u64,
        n: u64,
        last: bool,
        json: Bytes,
    },
    /// A stream has all its responses.
    StreamDone(u64),
    /// A stream cannot be resumed (its answer went out as plain JSON).
    Forget(u64),
    /// Messages from the runner handled so far.
    Received(u64),
    /// Messages to the runner it acknowledged.
    Acked(u64),
    Flush(oneshot::Sender<()>),
}

impl Entry {
    /// Whether something waits for it: a message to the runner, or a flush.
    fn is_urgent(&self) -> bool {
        match self {
            Entry::Unit(entries) => entries.iter().any(Entry::is_urgent),
            other => matches!(other, Entry::Reset { .. } | Entry::Call(_) | Entry::Sent { .. } | Entry::Flush(_)),
        }
    }
}

/// How far the journal has been written: messages to the runner that may
/// go, and messages from it that may be acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub sent: u64,
    pub received: u64,
    /// Nothing waits for Redis: the journal was given up (Redis failed, or
    /// lost the session's entry) until it starts again.
    pub given_up: bool,
    /// Another instance owns the session now: this one must let it go.
    pub lost: bool,
    /// How many times the journal has started again, as of these counts.
    epoch: u64,
}

impl Written {
    fn at(sent: u64, received: u64, epoch: u64) -> Self {
        Written { sent, received, given_up: false, lost: false, epoch }
    }
}

/// The session's side of its journal. Dropping it ends the writer.
pub struct Journal {
    entries: mpsc::UnboundedSender<Entry>,
    /// Entries of what the session is handling now, sent as one unit by
    /// [`Journal::commit`] (a std mutex: held for a push, never across an
    /// `.await`).
    pending: std::sync::Mutex<Vec<Entry>>,
    written: watch::Receiver<Written>,
    /// The counts of the latest start again, which hold until the writer
    /// has taken it in (std mutex: held for a copy).
    restarted: std::sync::Mutex<Written>,
}

impl Journal {
    /// Starts the writer of session `id`'s journal, which already holds
    /// the messages to the runner after `acked` up to `sent`, and `received`
    /// from it: a session taken over goes on with its predecessor's
    /// journal, `from`; without one, whatever is there is stale and goes.
    pub fn start(
        cluster: Arc<Cluster>,
        id: &str,
        (acked, sent, received): (u64, u64, u64),
        from: Option<&Recovered>,
    ) -> Self {
        // Unbounded, yet bounded by the protocol: messages wait here at
        // most a replay window's worth each way.
        let (entries, queue) = mpsc::unbounded_channel();
        let (tell, written) = watch::channel(Written::at(sent, received, 0));
        let writer = Writer {
            cluster,
            session: keys::session(id),
            journal: keys::journal(id),
            acked,
            next_seq: from.map_or(1, |r| r.next_seq),
            kept: from.map(|r| r.kept.clone()).unwrap_or_default(),
            kept_bytes: from.map_or(0, |r| r.kept.iter().map(|k| k.1).sum()),
            forgotten: VecDeque::new(),
            written: Written::at(sent, received, 0),
            broken: false,
            tell,
        };
        tokio::spawn(writer.run(queue));
        let restarted = std::sync::Mutex::new(Written::at(sent, received, 0));
        let journal = Journal { entries, pending: std::sync::Mutex::default(), written, restarted };
        if from.is_none() {
            let _ = journal.entries.send(Entry::Reset { acked, written: Written::at(sent, received, 0) });
        }
        journal
    }

    /// How far the journal has been written (as far as a start again in
    /// progress allows).
    pub fn written(&self) -> Written {
        let written = *self.written.borrow();
        let restarted = *self.restarted.lock().expect("journal lock");
        if written.epoch < restarted.epoch { restarted } else { written }
    }

    /// Starts the journal again from what the session has now: messages to
    /// the runner acknowledged up to `acked`, `received` from it handled.
    /// What the session then records (its unacknowledged messages, its
    /// requests, its live streams' numbers) rebuilds the rest.
    pub fn restart(&self, acked: u64, received: u64) {
        self.commit();
        let written = {
            let mut restarted = self.restarted.lock().expect("journal lock");
            *restarted = Written::at(acked, received, restarted.epoch + 1);
            *restarted
        };
        let _ = self.entries.send(Entry::Reset { acked, written });
    }

    fn record(&self, entry: Entry) {
        self.pending.lock().expect("journal lock").push(entry);
    }

    /// Sends what was recorded since the last commit, as one unit.
    pub fn commit(&self) {
        let entries = std::mem::take(&mut *self.pending.lock().expect("journal lock"));
        if !entries.is_empty() {
            let _ = self.entries.send(Entry::Unit(entries));
        }
    }

    pub fn numbered(&self, stream: u64, n: u64) {
        self.record(Entry::Numbered { stream, n });
    }

    pub fn call(&self, call: CallRecord) {
        self.record(Entry::Call(call));
    }

    pub fn sent(&self, n: u64, payload: Bytes, call: Option<CallRecord>) {
        self.record(Entry::Sent { n, payload, call });
    }

    pub fn done(&self, id: &RequestId) {
        self.record(Entry::Done(id.clone()));
    }

    pub fn event(&self, stream: u64, n: u64, last: bool, json: Bytes) {
        self.record(Entry::Event { stream, n, last, json });
    }

    pub fn stream_done(&self, stream: u64) {
        self.record(Entry::StreamDone(stream));
    }

    /// What tells the journal of a stream nobody can resume.
    pub fn forgetter(&self) -> impl Fn(u64) + Send + Sync + 'static {
        // Weak: the writer ends with the journal, whatever holds this.
        let entries = self.entries.downgrade();
        move |stream| {
            if let Some(entries) = entries.upgrade() {
                let _ = entries.send(Entry::Forget(stream));
            }
        }
    }

    pub fn received(&self, count: u64) {
        self.record(Entry::Received(count));
    }

    pub fn acked(&self, count: u64) {
        self.record(Entry::Acked(count));
    }

    /// Waits, at most `within`, until everything recorded so far is written.
    pub async fn flush(&self, within: Duration) {
        self.commit();
        let (done, wait) = oneshot::channel();
        let _ = self.entries.send(Entry::Flush(done));
        let _ = tokio::time::timeout(within, wait).await;
    }
}

/// Waits until the journal has written more, or forever without a journal.
pub async fn more_written(journal: &mut Option<Journal>) {
    match journal {
        Some(journal) => {
            if journal.written.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// One kept event: its sequence number, size and stream.
type Kept = (u64, usize, u64);
/// Streams remembered as forgotten, for events that arrive after.
const FORGOTTEN_KEPT: usize = 64;

struct Writer {
    cluster: Arc<Cluster>,
    session: String,
    journal: String,
    /// `ra` as written.
    acked: u64,
    next_seq: u64,
    kept: VecDeque<Kept>,
    kept_bytes: usize,
    /// Streams lately forgotten: their events are not kept.
    forgotten: VecDeque<u64>,
    written: Written,
    /// Given up: nothing is written until the journal starts again.
    broken: bool,
    tell: watch::Sender<Written>,
}

/// One script call's worth of changes.
#[derive(Default)]
struct Batch {
    ops: Vec<(&'static str, String, Bytes)>,
    written: Option<Written>,
    flushed: Vec<oneshot::Sender<()>>,
}

impl Batch {
    fn set(&mut self, field: String, value: impl Into<Bytes>) {
        self.ops.push(("S", field, value.into()));
    }

    fn delete(&mut self, field: String) {
        self.ops.push(("D", field, Bytes::new()));
    }
}

impl Writer {
    async fn run(mut self, mut queue: mpsc::UnboundedReceiver<Entry>) {
        while let Some(first) = queue.recv().await {
            let mut batch = Batch::default();
            let mut written = self.written;
            let mut urgent = first.is_urgent();
            self.add(first, &mut batch, &mut written);
            // What only holds back acknowledgements (delayed anyway) waits a
            // moment for company, and lets the answer it belongs to go to
            // its client first; what a message to the runner waits for goes
            // at once.
            let lazy_until = tokio::time::Instant::now() + LAZY;
            while !urgent && batch.ops.len() < BATCH {
                match tokio::time::timeout_at(lazy_until, queue.recv()).await {
                    Ok(Some(entry)) => {
                        urgent = entry.is_urgent();
                        self.add(entry, &mut batch, &mut written);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            while batch.ops.len() < BATCH
                && let Ok(entry) = queue.try_recv()
            {
                self.add(entry, &mut batch, &mut written);
            }
            if self.written.lost {
                // Nothing more is written, and nothing more let through.
                for done in batch.flushed {
                    let _ = done.send(());
                }
                continue;
            }
            if !self.broken {
                match self.write(&batch).await {
                    Ok(1) => {}
                    Ok(0) => {
                        // Another instance took it over (this one was
                        // thought dead): nothing more goes to the runner or
                        // is acknowledged from here; the session lets go.
                        self.broken = true;
                        written = Written { lost: true, ..self.written };
                        debug!("another instance owns the session now; its journal stops here");
                    }
                    Ok(_) => {
                        self.broken = true;
                        warn!(
                            "the session is not in Redis's directory (Redis lost it); its journal starts again once it is"
                        );
                    }
                    Err(e) => {
                        self.broken = true;
                        warn!("the session's journal is given up until Redis answers again: {e}");
                    }
                }
            }
            if self.broken && !written.lost {
                // Nothing waits for Redis meanwhile.
                written = Written { sent: u64::MAX, received: u64::MAX, given_up: true, ..written };
            }
            if written != self.written {
                self.written = written;
                self.tell.send_replace(written);
            }
            for done in batch.flushed {
                let _ = done.send(());
            }
        }
    }

    fn add(&mut self, entry: Entry, batch: &mut Batch, written: &mut Written) {
        match entry {
            Entry::Reset { acked, written: from } => {
                batch.ops.push(("X", String::new(), Bytes::new()));
                self.broken = false;
                self.acked = acked;
                self.kept.clear();
                self.kept_bytes = 0;
                self.forgotten.clear();
                *written = from;
                batch.set("ra".into(), acked.to_string());
            }
            Entry::Unit(entries) => {
                for entry in entries {
                    self.add(entry, batch, written);
                }
            }
            Entry::Numbered { stream, n } => batch.set(format!("n:{stream}"), n.to_string()),
            Entry::Call(call) => batch.set(format!("c:{}", call.id.as_json()), call.encode()),
            Entry::Sent { n, payload, call } => {
                if let Some(call) = call {
                    batch.set(format!("c:{}", call.id.as_json()), call.encode());
                }
                batch.set(format!("o:{n}"), payload);
                written.sent = written.sent.max(n);
            }
            Entry::Done(id) => batch.delete(format!("c:{}", id.as_json())),
            Entry::Event { stream, .. } if self.forgotten.contains(&stream) => {}
            Entry::Event { stream, n, last, json } => {
                let dropped = json.len() > EVENT_BYTES_KEPT;
                let mut value = format!("{stream} {n} {} {}\n", u8::from(last), u8::from(dropped)).into_bytes();
                if !dropped {
                    value.extend_from_slice(&json);
                }
                let seq = self.next_seq;
                self.next_seq += 1;
                self.kept.push_back((seq, value.len(), stream));
                self.kept_bytes += value.len();
                batch.set(format!("e:{seq}"), value);
                batch.set(format!("n:{stream}"), n.to_string());
                while self.kept.len() > EVENTS_KEPT || self.kept_bytes > EVENT_BYTES_KEPT {
                    let Some((old, size, _)) = self.kept.pop_front() else { break };
                    self.kept_bytes -= size;
                    batch.delete(format!("e:{old}"));
                }
            }
            Entry::StreamDone(stream) => batch.delete(format!("n:{stream}")),
            Entry::Forget(stream) => {
                if self.forgotten.len() == FORGOTTEN_KEPT {
                    self.forgotten.pop_front();
                }
                self.forgotten.push_back(stream);
                let before = self.kept.len();
                self.kept.retain(|&(seq, _, of)| {
                    if of == stream {
                        batch.ops.push(("D", format!("e:{seq}"), Bytes::new()));
                    }
                    of != stream
                });
                if self.kept.len() != before {
                    self.kept_bytes = self.kept.iter().map(|k| k.1).sum();
                }
                batch.delete(format!("n:{stream}"));
            }
            Entry::Received(count) => written.received = written.received.max(count),
            Entry::Acked(count) => {
                while self.acked < count {
                    self.acked += 1;
                    batch.delete(format!("o:{}", self.acked));
                }
                batch.set("ra".into(), count.to_string());
            }
            Entry::Flush(done) => batch.flushed.push(done),
        }
        batch.written = Some(*written);
    }

    /// Writes a batch: 1, or what [`WRITE`] says of the session's owner.
    async fn write(&self, batch: &Batch) -> Result<i64, ClusterError> {
        let mut invocation = WRITE.prepare_invoke();
        invocation
            .key(&self.session)
            .key(&self.journal)
            .arg(&self.cluster.instance)
            .arg(keys::SESSION_TTL.as_millis() as u64);
        for (op, field, value) in &batch.ops {
            invocation.arg(*op).arg(field).arg(value.as_ref());
        }
        if let Some(written) = batch.written {
            invocation.arg("S").arg("rx").arg(written.received.min(i64::MAX as u64));
        }
        Ok(invocation.invoke_async(&mut self.cluster.commands()).await?)
    }
}

/// A stream as its journal left it.
#[derive(Debug, Default)]
pub struct RecoveredStream {
    /// Its kept events, in order.
    pub events: Vec<Event>,
    /// The number its next event gets.
    pub next: u64,
    /// Resuming after an event before this one is refused (one was too
    /// large to keep).
    pub floor: u64,
}

/// A session's journal as another instance finds it.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Messages to the runner it acknowledged, and those after, kept.
    pub acked: u64,
    pub unacked: Vec<Bytes>,
    /// Messages from the runner handled.
    pub received: u64,
    /// Requests still awaiting answers.
    pub calls: Vec<CallRecord>,
    pub streams: BTreeMap<u64, RecoveredStream>,
    next_seq: u64,
    kept: VecDeque<Kept>,
}

impl Recovered {
    /// Reads a journal's fields; `None` when there is none.
    fn read(fields: Vec<(String, Bytes)>) -> Option<Self> {
        if fields.is_empty() {
            return None;
        }
        let number = |v: &Bytes| std::str::from_utf8(v).ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        let mut recovered = Recovered { next_seq: 1, ..Recovered::default() };
        let mut out = BTreeMap::new();
        let mut events = BTreeMap::new();
        let mut last_numbers = BTreeMap::new();
        for (field, value) in fields {
            match field.split_once(':') {
                None if field == "ra" => recovered.acked = number(&value),
                None if field == "rx" => recovered.received = number(&value),
                Some(("o", n)) => {
                    if let Ok(n) = n.parse::<u64>() {
                        out.insert(n, value);
                    }
                }
                Some(("c", id)) => recovered.calls.extend(CallRecord::decode(id, &value)),
                Some(("e", seq)) => {
                    if let Ok(seq) = seq.parse::<u64>() {
                        events.insert(seq, value);
                    }
                }
                Some(("n", stream)) => {
                    if let Ok(stream) = stream.parse::<u64>() {
                        last_numbers.insert(stream, number(&value));
                    }
                }
                _ => {}
            }
        }
        // Only an unbroken run after `ra` can be sent again.
        let mut n = recovered.acked + 1;
        while let Some(frame) = out.remove(&n) {
            recovered.unacked.push(frame);
            n += 1;
        }
        for (seq, value) in events {
            let Some(split) = value.iter().position(|b| *b == b'\n') else { continue };
            let header = String::from_utf8_lossy(&value[..split]);
            let parts: Vec<u64> = header.split(' ').filter_map(|p| p.parse().ok()).collect();
            let [stream, n, last, dropped] = parts[..] else { continue };
            recovered.next_seq = seq + 1;
            recovered.kept.push_back((seq, value.len(), stream));
            let entry = recovered.streams.entry(stream).or_default();
            if dropped == 1 {
                // Resuming before it is impossible: nothing before it stays.
                entry.events.clear();
                entry.floor = n;
            } else {
                entry.events.push(Event { n, json: value.slice(split + 1..), last: last == 1 });
            }
            entry.next = entry.next.max(n + 1);
        }
        for (stream, n) in last_numbers {
            let entry = recovered.streams.entry(stream).or_default();
            entry.next = entry.next.max(n + 1);
        }
        for call in &recovered.calls {
            let entry = recovered.streams.entry(call.stream).or_default();
            entry.next = entry.next.max(1);
        }
        Some(recovered)
    }
}

impl Cluster {
    /// Session `id`'s journal, if it has one.
    pub async fn recover(&self, id: &str) -> Result<Option<Recovered>, ClusterError> {
        let fields: Vec<(String, Bytes)> =
            redis::cmd("HGETALL").arg(keys::journal(id)).query_async(&mut self.commands()).await?;
        Ok(Recovered::read(fields))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(name: &str, value: &str) -> (String, Bytes) {
        (name.to_owned(), Bytes::from(value.to_owned()))
    }

    #[test]
    fn a_journal_is_read_back_as_its_owner_left_it() {
        let recovered = Recovered::read(vec![
            field("ra", "2"),
            field("rx", "7"),
            field("o:3", "three"),
            field("o:4", "four"),
            // Not after an unbroken run: cannot be sent again.
            field("o:6", "six"),
            field("c:5", r#"{"s":4,"t":"\"tok\"","m":"tools/call"}"#),
            field("e:9", "4 1 0 0\n{\"progress\":1}"),
            field("e:10", "0 3 0 0\n{\"note\":1}"),
            field("n:4", "1"),
            field("n:0", "3"),
        ])
        .unwrap();
        assert_eq!((recovered.acked, recovered.received), (2, 7));
        assert_eq!(recovered.unacked, vec![Bytes::from("three"), Bytes::from("four")]);
        let call = &recovered.calls[0];
        assert_eq!((call.id.as_json(), call.stream, call.method.as_str()), ("5", 4, "tools/call"));
        assert_eq!(call.progress_token.as_ref().map(RequestId::as_json), Some("\"tok\""));
        let stream = &recovered.streams[&4];
        assert_eq!((stream.events.len(), stream.next), (1, 2));
        assert_eq!(&stream.events[0].json[..], b"{\"progress\":1}");
        assert_eq!(recovered.streams[&0].next, 4);
        assert_eq!(recovered.next_seq, 11);
    }

    #[test]
    fn an_event_too_large_to_keep_leaves_nothing_before_it_to_resume() {
        let recovered = Recovered::read(vec![field("e:1", "2 1 0 0\n{}"), field("e:2", "2 2 1 1\n")]).unwrap();
        let stream = &recovered.streams[&2];
        assert!(stream.events.is_empty());
        assert_eq!((stream.next, stream.floor), (3, 2));
    }

    #[test]
    fn no_fields_is_no_journal() {
        assert!(Recovered::read(Vec::new()).is_none());
    }
}
