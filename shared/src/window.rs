//! The replay window of the rendezvous: what each side keeps, acknowledges
//! and resends so that a dropped socket loses nothing (see [`crate::frame`]).
//!
//! Both ends of the socket run the same rules, so they live here once, with
//! no I/O: a [`SendWindow`] keeps the text frames one side has sent until the
//! other acknowledges them, and an [`AckClock`] decides when the receiving
//! side owes an acknowledgement. The gateway's session task and the runner's
//! relay each own one of both; they differ only in what they count as
//! received (the runner acknowledges only what it has handed to the MCP
//! server's stdin, so the gateway's window also bounds that queue).

use std::collections::VecDeque;
use std::time::Duration;

/// Text frames sent and not yet acknowledged, by count…
pub const MAX_UNACKED: usize = 1024;
/// …and by size, beyond which a side stops taking new messages to send
/// until the other catches up (the backpressure of the relay).
pub const MAX_UNACKED_BYTES: usize = 16 * 1024 * 1024;
/// Acknowledge at once after this many frames…
pub const ACK_EVERY: u64 = 32;
/// …and otherwise this soon after the first unacknowledged one.
pub const ACK_DELAY: Duration = Duration::from_millis(50);
/// A peer silent for this many heartbeats is considered gone.
pub const MISSED_HEARTBEATS: u32 = 3;
/// Largest JSON-RPC message either side carries (a WebSocket text frame, a
/// line of the MCP server's stdout). A message above it is refused with an
/// error that names this limit, never silently dropped.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Largest WebSocket message either side accepts: one message and room for
/// the control frames, which are small.
pub const MAX_FRAME_BYTES: usize = MAX_MESSAGE_BYTES + 64 * 1024;

/// Why the peer's count of what it received cannot be believed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// The peer has fewer frames than it already acknowledged: it restarted
    /// from scratch and lost what it held (the MCP server's state with it).
    #[error("the peer has {received} of our messages but had acknowledged {acked}")]
    WentBack { received: u64, acked: u64 },
    /// The peer claims frames that were never sent.
    #[error("the peer claims {received} of our messages but only {sent} were sent")]
    Ahead { received: u64, sent: u64 },
}

/// Frames sent to the peer and kept until it acknowledges them. The first
/// kept frame has number `acked + 1` (frames are numbered from 1 for the
/// session's whole life, per direction).
#[derive(Debug)]
pub struct SendWindow<T> {
    unacked: VecDeque<T>,
    bytes: usize,
    acked: u64,
}

impl<T: AsRef<[u8]>> Default for SendWindow<T> {
    fn default() -> Self {
        Self::starting_at(0)
    }
}

impl<T: AsRef<[u8]>> SendWindow<T> {
    /// A window whose peer already has `acked` frames (what a welcome says).
    pub fn starting_at(acked: u64) -> Self {
        Self { unacked: VecDeque::new(), bytes: 0, acked }
    }

    /// Keeps a frame that is being sent.
    pub fn push(&mut self, frame: T) {
        self.bytes += frame.as_ref().len();
        self.unacked.push_back(frame);
    }

    /// Whether more may be sent before the peer catches up.
    pub fn has_room(&self) -> bool {
        self.unacked.len() < MAX_UNACKED && self.bytes < MAX_UNACKED_BYTES
    }

    /// Frames sent in the session so far.
    pub fn sent(&self) -> u64 {
        self.acked + self.unacked.len() as u64
    }

    /// Frames the peer has acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Frames kept, and their size in bytes.
    pub fn len(&self) -> usize {
        self.unacked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.unacked.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// An acknowledgement arrived: forget what it covers. A stale one
    /// (below what is already acknowledged) changes nothing; one beyond what
    /// was sent is a broken peer.
    pub fn acknowledge(&mut self, received: u64) -> Result<(), WindowError> {
        if received > self.sent() {
            return Err(WindowError::Ahead { received, sent: self.sent() });
        }
        while self.acked < received {
            let frame = self.unacked.pop_front().expect("received <= sent");
            self.bytes -= frame.as_ref().len();
            self.acked += 1;
        }
        Ok(())
    }

    /// The kept frames numbered after `n`, in order.
    pub fn after(&self, n: u64) -> impl Iterator<Item = &T> {
        self.unacked.iter().skip(n.saturating_sub(self.acked) as usize)
    }

    /// A new socket: the peer says it has `received` frames. Forgets those
    /// and returns the rest, to be sent again in order.
    pub fn resume(&mut self, received: u64) -> Result<impl Iterator<Item = &T>, WindowError> {
        if received < self.acked {
            return Err(WindowError::WentBack { received, acked: self.acked });
        }
        self.acknowledge(received)?;
        Ok(self.unacked.iter())
    }
}

/// Counts frames received and decides when to acknowledge them.
#[derive(Debug, Default)]
pub struct AckClock {
    received: u64,
    ack_sent: u64,
}

impl AckClock {
    /// A clock that has received (and acknowledged) `received` frames: a
    /// session taken over from another gateway.
    pub fn resumed(received: u64) -> Self {
        Self { received, ack_sent: received }
    }

    /// Counts one received text frame; returns its number.
    pub fn receive(&mut self) -> u64 {
        self.received += 1;
        self.received
    }

    /// Text frames received in the session so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Whether `deliverable` (what may be acknowledged now) is far enough
    /// ahead of the last acknowledgement to send one at once.
    pub fn due(&self, deliverable: u64) -> bool {
        deliverable.saturating_sub(self.ack_sent) >= ACK_EVERY
    }

    /// Whether anything is waiting to be acknowledged (arm the delay timer).
    pub fn owed(&self, deliverable: u64) -> bool {
        deliverable > self.ack_sent
    }

    /// The count to acknowledge now, if it says anything new.
    pub fn take(&mut self, deliverable: u64) -> Option<u64> {
        (deliverable > self.ack_sent).then(|| {
            self.ack_sent = deliverable;
            deliverable
        })
    }

    /// A handshake told the peer our count: that counts as acknowledged.
    pub fn told(&mut self, count: u64) {
        self.ack_sent = count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames kept in a window, or resent from it.
    type Frames = &'static [&'static str];

    fn window(frames: &[&'static str], acked: u64) -> SendWindow<&'static str> {
        let mut w = SendWindow::starting_at(acked);
        for f in frames {
            w.push(*f);
        }
        w
    }

    #[test]
    fn acknowledgements_forget_what_they_cover() {
        // (kept before, acked before, ack, kept after, bytes after, error?)
        let cases: &[(Frames, u64, u64, Frames, usize, bool)] = &[
            (&["a", "bb", "ccc"], 0, 2, &["ccc"], 3, false),
            (&["a", "bb", "ccc"], 0, 3, &[], 0, false),
            (&["a", "bb", "ccc"], 0, 0, &["a", "bb", "ccc"], 6, false),
            // Stale: already covered.
            (&["ccc"], 2, 1, &["ccc"], 3, false),
            // Beyond what was sent.
            (&["a"], 5, 7, &["a"], 1, true),
        ];
        for (i, (before, acked, ack, after, bytes, error)) in cases.iter().enumerate() {
            let mut w = window(before, *acked);
            assert_eq!(w.acknowledge(*ack).is_err(), *error, "case {i}");
            assert_eq!(w.unacked.iter().copied().collect::<Vec<_>>(), *after, "case {i}");
            assert_eq!(w.bytes(), *bytes, "case {i}");
        }
    }

    #[test]
    fn resuming_resends_exactly_what_the_peer_lacks() {
        // (kept, acked, peer's count, resent or the error)
        let cases: &[(Frames, u64, u64, Result<Frames, WindowError>)] = &[
            (&["4", "5", "6"], 3, 3, Ok(&["4", "5", "6"])),
            (&["4", "5", "6"], 3, 5, Ok(&["6"])),
            (&["4", "5", "6"], 3, 6, Ok(&[])),
            (&["4", "5", "6"], 3, 2, Err(WindowError::WentBack { received: 2, acked: 3 })),
            (&["4", "5", "6"], 3, 7, Err(WindowError::Ahead { received: 7, sent: 6 })),
            (&[], 0, 0, Ok(&[])),
        ];
        for (i, (kept, acked, peer, want)) in cases.iter().enumerate() {
            let mut w = window(kept, *acked);
            let got = w.resume(*peer).map(|rest| rest.copied().collect::<Vec<_>>());
            assert_eq!(got, want.clone().map(<[&str]>::to_vec), "case {i}");
        }
    }

    #[test]
    fn the_window_fills_by_count_and_by_bytes() {
        let mut w: SendWindow<Vec<u8>> = SendWindow::default();
        for _ in 0..MAX_UNACKED - 1 {
            w.push(vec![0]);
        }
        assert!(w.has_room());
        w.push(vec![0]);
        assert!(!w.has_room(), "full by count");
        w.acknowledge(w.sent()).unwrap();
        assert!(w.has_room() && w.is_empty());
        w.push(vec![0; MAX_UNACKED_BYTES]);
        assert!(!w.has_room(), "full by bytes");
        assert_eq!(w.sent(), MAX_UNACKED as u64 + 1);
    }

    #[test]
    fn acks_are_owed_delayed_and_due() {
        let mut clock = AckClock::default();
        assert!(!clock.owed(0));
        assert_eq!(clock.take(0), None);
        for _ in 0..ACK_EVERY - 1 {
            clock.receive();
        }
        assert!(clock.owed(clock.received()) && !clock.due(clock.received()));
        clock.receive();
        assert!(clock.due(clock.received()));
        // The runner may acknowledge only what it delivered.
        assert_eq!(clock.take(10), Some(10));
        assert_eq!(clock.take(10), None);
        assert_eq!(clock.take(ACK_EVERY), Some(ACK_EVERY));
        clock.told(ACK_EVERY);
        assert!(!clock.owed(ACK_EVERY));
    }
}
