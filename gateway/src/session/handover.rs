//! What another instance needs to take a session over: a [`Snapshot`].
//!
//! Every instance sharing Redis renews one for each of its sessions every
//! few seconds (without [`Counts`]); an instance that stops on SIGTERM
//! writes a last one with its counts and lets the session go. Whoever takes
//! the session over rebuilds it from the snapshot and waits for its runner
//! to dial again: with counts, the replay window goes on exactly where it
//! stood (nothing lost, nothing twice); without them (the owner died), it
//! starts from what the runner's hello says it has received and had
//! acknowledged, so the session goes on but what the dead owner held is lost.

use serde::{Deserialize, Serialize};

/// A session as another instance rebuilds it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The registered server it bridges; `None` for the default.
    pub server: Option<String>,
    /// Its [`super::Transport`], as `u8`.
    pub transport: u8,
    pub claimed: bool,
    pub single_request: bool,
    pub protocol_version: Option<String>,
    /// The runner as its spawner describes it, and what adopts it.
    pub runner: String,
    pub handle: String,
    /// Tool calls answered so far.
    pub calls: u64,
    /// The next stream id and the GET stream's next event number.
    pub next_stream: u64,
    pub standalone_next: u64,
    /// The replay window, when the owner let the session go itself.
    pub counts: Option<Counts>,
}

/// Where the session's frame exchange with its runner stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Frames to the runner it acknowledged, and those sent after (in order).
    pub acked: u64,
    pub unacked: Vec<String>,
    /// Frames from the runner received (and acknowledged or to be).
    pub received: u64,
}

impl Snapshot {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("snapshots serialize")
    }

    pub fn decode(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_survive_their_encoding_and_garbage_is_none() {
        let snapshot = Snapshot {
            server: Some("python".into()),
            transport: 1,
            claimed: true,
            protocol_version: Some("2025-06-18".into()),
            handle: "local:42:/tmp/x".into(),
            next_stream: 9,
            standalone_next: 3,
            counts: Some(Counts { acked: 4, unacked: vec![r#"{"jsonrpc":"2.0"}"#.into()], received: 7 }),
            ..Snapshot::default()
        };
        assert_eq!(Snapshot::decode(&snapshot.encode()), Some(snapshot));
        assert_eq!(Snapshot::decode("{not json"), None);
        // What an owner that died left: no counts.
        assert_eq!(Snapshot::decode(&Snapshot::default().encode()).unwrap().counts, None);
    }
}
