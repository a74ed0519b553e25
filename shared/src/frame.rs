//! Frames exchanged on the rendezvous WebSocket.
//!
//! The split between the two kinds of frame is the WebSocket opcode, so the
//! relay never has to look inside a JSON-RPC payload to route it:
//!
//! - a **text** frame carries exactly one JSON-RPC message, byte for byte as
//!   its author wrote it (no typed MCP round-trip, which would drop unknown
//!   fields and reorder keys);
//! - a **binary** frame carries one [`Control`] message, JSON-encoded.
//!
//! The first frame on a new socket is the runner's [`Control::Hello`]; the
//! gateway answers [`Control::Welcome`] or [`Control::Reject`].
//!
//! ## Nothing lost across a reconnect
//! Text frames are numbered implicitly, per direction, for the whole life of
//! the session (not of one socket): the first is 1, the next 2, and so on.
//! Each side acknowledges what it has received with [`Control::Ack`] and keeps
//! what it sent until acknowledged. When a socket drops, the runner dials
//! again; its hello says how many frames it has received from the gateway and
//! the welcome says how many the gateway has received from the runner. Each
//! side then resends exactly the frames after that count, so nothing is lost
//! and nothing arrives twice.

use serde::{Deserialize, Serialize};

use crate::Secret;

/// A frame after the WebSocket layer has been peeled off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// One JSON-RPC message, verbatim.
    Message(String),
    /// A control message of the rendezvous protocol itself.
    Control(Control),
}

/// Messages of the rendezvous protocol (as opposed to the MCP traffic it carries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// Runner → gateway, first frame: which protocol the runner speaks.
    Hello {
        protocol: u32,
        /// The runner binary's version, for logs.
        runner_version: String,
        /// Text frames received from the gateway so far in this session
        /// (0 on the first dial).
        received: u64,
        /// Text frames the gateway has acknowledged so far: where a gateway
        /// that takes the session over without its predecessor's counts
        /// starts counting. Absent from older runners.
        #[serde(default)]
        acked: u64,
    },
    /// Gateway → runner: the handshake succeeded.
    Welcome {
        protocol: u32,
        /// Text frames received from the runner so far in this session.
        received: u64,
        /// A fresh token for the next dial, should this socket drop.
        token: Secret,
    },
    /// Either way: every text frame up to `received` has arrived.
    Ack { received: u64 },
    /// Gateway → runner: a fresh token for the next dial (old ones expire).
    Token { token: Secret },
    /// Gateway → runner: the handshake failed; the socket closes next.
    Reject { reason: String },
    /// Runner → gateway: the bridged MCP server exited on its own.
    ChildExited {
        /// Exit code, when the process exited normally.
        code: Option<i32>,
        /// Signal number, when a signal ended it.
        signal: Option<i32>,
    },
    /// Gateway → runner: the session is over; stop the MCP server and exit.
    Shutdown { reason: String },
    /// Runner → gateway: the runner is leaving for good (it was told to stop),
    /// so the session need not wait for it to reconnect.
    Bye { reason: String },
}

/// A binary frame that does not hold a [`Control`] message.
#[derive(Debug, thiserror::Error)]
#[error("malformed control frame: {0}")]
pub struct MalformedControl(#[from] serde_json::Error);

impl Control {
    /// Encodes the message for a binary frame.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing a plain enum of strings and integers cannot fail.
        serde_json::to_vec(self).expect("control messages always serialize")
    }

    /// Decodes a binary frame.
    pub fn decode(bytes: &[u8]) -> Result<Self, MalformedControl> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

impl std::fmt::Display for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Control::Hello { protocol, runner_version, received, acked } => {
                write!(f, "hello (protocol {protocol}, runner {runner_version}, received {received}, acked {acked})")
            }
            Control::Welcome { protocol, received, .. } => {
                write!(f, "welcome (protocol {protocol}, received {received})")
            }
            Control::Ack { received } => write!(f, "ack {received}"),
            Control::Token { .. } => f.write_str("token"),
            Control::Reject { reason } => write!(f, "reject: {reason}"),
            Control::ChildExited { code, signal } => {
                write!(f, "MCP server exited ({})", describe_exit(*code, *signal))
            }
            Control::Shutdown { reason } => write!(f, "shutdown: {reason}"),
            Control::Bye { reason } => write!(f, "bye: {reason}"),
        }
    }
}

/// Words for a process's end, as used in errors sent to clients.
pub fn describe_exit(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => "unknown status".to_owned(),
    }
}

/// Why a runner's protocol version was refused, in words that tell the
/// operator which binary to upgrade.
pub fn version_mismatch(gateway: u32, runner: u32) -> String {
    format!(
        "rendezvous protocol mismatch: gateway speaks version {gateway}, runner speaks version {runner}; \
         deploy the gateway and runner binaries from the same release"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_round_trips_through_its_encoding() {
        let all = [
            Control::Hello { protocol: 1, runner_version: "0.1.0".into(), received: 7, acked: 4 },
            Control::Welcome { protocol: 1, received: 3, token: Secret::new("t") },
            Control::Ack { received: 9 },
            Control::Token { token: Secret::new("t2") },
            Control::Reject { reason: "no".into() },
            Control::ChildExited { code: Some(3), signal: None },
            Control::Shutdown { reason: "deleted".into() },
            Control::Bye { reason: "SIGTERM".into() },
        ];
        for control in all {
            assert_eq!(Control::decode(&control.encode()).unwrap(), control);
        }
    }

    #[test]
    fn control_encoding_is_tagged_snake_case() {
        let bytes = Control::ChildExited { code: None, signal: Some(9) }.encode();
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["type"], "child_exited");
        assert_eq!(value["signal"], 9);
    }

    #[test]
    fn garbage_is_a_malformed_control_frame() {
        assert!(Control::decode(b"{\"type\":\"launch_missiles\"}").is_err());
        assert!(Control::decode(b"\xff").is_err());
    }

    #[test]
    fn mismatch_names_both_versions() {
        let text = version_mismatch(2, 1);
        assert!(text.contains("version 2") && text.contains("version 1"), "{text}");
    }

    #[test]
    fn exits_are_described() {
        assert_eq!(describe_exit(Some(0), None), "exit status 0");
        assert_eq!(describe_exit(None, Some(9)), "killed by signal 9");
    }
}
