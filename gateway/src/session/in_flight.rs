//! The requests a session is waiting on: each one's answer stream by
//! JSON-RPC id, its progress token, and its deadline.
//!
//! Ids are compared as canonical JSON text, so `1` and `"1"` stay distinct.
//! A progress token is routed to one request only, so two requests in flight
//! may not share one (MCP requires tokens unique across active requests).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::time::{DelayQueue, delay_queue};

use super::Call;
use crate::jsonrpc::{RequestId, code};
use crate::streams::EventStream;

struct Pending {
    call: Call,
    deadline: delay_queue::Key,
}

/// Requests in flight, their progress tokens and deadlines.
#[derive(Default)]
pub(super) struct InFlight {
    pending: HashMap<RequestId, Pending>,
    /// Progress token → request id.
    progress: HashMap<RequestId, RequestId>,
    deadlines: DelayQueue<RequestId>,
}

/// Why a call was not admitted: its code and message for the client.
pub(super) struct Refused {
    pub call: Call,
    pub code: i64,
    pub message: String,
}

impl InFlight {
    /// Starts waiting for `call`'s answer, for at most `timeout`.
    pub fn admit(&mut self, call: Call, timeout: Duration) -> Result<(), Box<Refused>> {
        if self.pending.contains_key(&call.id) {
            let message = "a request with this id is already in flight in this session".into();
            return Err(Box::new(Refused { call, code: code::INVALID_REQUEST, message }));
        }
        if let Some(token) = &call.progress_token
            && let Some(holder) = self.progress.get(token)
        {
            let message = format!(
                "progress token {token} is already used by request {holder} in flight in this session; \
                 progress tokens must be unique across active requests"
            );
            return Err(Box::new(Refused { call, code: code::INVALID_PARAMS, message }));
        }
        if let Some(token) = &call.progress_token {
            self.progress.insert(token.clone(), call.id.clone());
        }
        let deadline = self.deadlines.insert(call.id.clone(), timeout);
        self.pending.insert(call.id.clone(), Pending { call, deadline });
        Ok(())
    }

    /// Stops waiting for `id` (answered or cancelled).
    pub fn take(&mut self, id: &RequestId) -> Option<Call> {
        let pending = self.pending.remove(id)?;
        self.deadlines.remove(&pending.deadline);
        Some(self.forget(pending))
    }

    /// The request whose deadline just passed (its timer is already gone).
    pub fn expire(&mut self, id: &RequestId) -> Option<Call> {
        let pending = self.pending.remove(id)?;
        Some(self.forget(pending))
    }

    fn forget(&mut self, pending: Pending) -> Call {
        if let Some(token) = &pending.call.progress_token {
            self.progress.remove(token);
        }
        pending.call
    }

    /// The stream of the request a progress token belongs to.
    pub fn progress_stream(&self, token: &RequestId) -> Option<&Arc<EventStream>> {
        let id = self.progress.get(token)?;
        self.pending.get(id).map(|p| &p.call.stream)
    }

    /// The only request in flight, if exactly one is: anything the server
    /// says that names no request can then only be about that one.
    pub fn sole(&self) -> Option<&Call> {
        match self.pending.len() {
            1 => self.pending.values().next().map(|p| &p.call),
            _ => None,
        }
    }

    /// Every request still waiting.
    pub fn iter(&self) -> impl Iterator<Item = &Call> {
        self.pending.values().map(|p| &p.call)
    }

    /// Every request still waiting, and the table emptied.
    pub fn drain(&mut self) -> Vec<Call> {
        self.progress.clear();
        self.deadlines.clear();
        self.pending.drain().map(|(_, p)| p.call).collect()
    }

    /// The next request whose deadline passes; `None` (the select branch is
    /// then disabled) while nothing is waiting.
    pub async fn next_expired(&mut self) -> Option<RequestId> {
        self.deadlines.next().await.map(|expired| expired.into_inner())
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}
