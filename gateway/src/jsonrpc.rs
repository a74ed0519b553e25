//! Just enough JSON-RPC to route messages without rewriting them.
//!
//! The relay carries payloads as the bytes their author wrote. To route a
//! message it needs only its kind, its `id`, its `method`, and a progress
//! token or cancelled request id; [`peek`] reads those and nothing else.
//! [`check_client`] refuses, before anything is forwarded, what a server
//! could not answer in a way the gateway can route back (no `"jsonrpc"`,
//! nesting deeper than a server's parser goes); [`error_body`] builds the
//! gateway's own error responses.

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;
use serde_json::value::RawValue;

/// JSON-RPC error codes the gateway uses.
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL_ERROR: i64 = -32603;
    /// Server-defined: the session header names no live session.
    pub const SESSION_NOT_FOUND: i64 = -32001;
    /// Server-defined: the session's runner could not be started or reached.
    pub const RUNNER_UNAVAILABLE: i64 = -32002;
    /// Server-defined: the session's runner or MCP server went away mid-request.
    pub const RUNNER_LOST: i64 = -32003;
    /// Server-defined: the request got no response in time.
    pub const REQUEST_TIMEOUT: i64 = -32004;
    /// Server-defined: the gateway cannot take more sessions right now.
    pub const OVERLOADED: i64 = -32005;
    /// MCP 2026-07-28: unsupported protocol version.
    pub const UNSUPPORTED_PROTOCOL_VERSION: i64 = -32022;
}

/// A JSON-RPC request id, kept as its canonical JSON text so `1` and `"1"`
/// stay distinct and the id can be echoed back verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(Box<str>);

impl RequestId {
    fn from_raw(raw: &RawValue) -> Option<Self> {
        // Normalise whitespace only; strings keep their escapes. Numbers must
        // be integers that fit 64 bits: `1.5`, `-0`, `1e2` or `2^100` come
        // back from servers spelled differently (or not at all), and their
        // answers could never be matched to the request.
        match serde_json::from_str::<Value>(raw.get()).ok()? {
            v @ Value::String(_) => Some(Self(v.to_string().into())),
            Value::Number(n) if n.is_i64() || n.is_u64() => Some(Self(n.to_string().into())),
            _ => None,
        }
    }

    /// An id from its JSON text (as [`RequestId::as_json`] gives it).
    pub fn from_json(text: &str) -> Option<Self> {
        Self::from_raw(serde_json::from_str::<&RawValue>(text).ok()?)
    }

    /// A string id of the gateway's own.
    pub fn string(text: &str) -> Self {
        Self(Value::String(text.to_owned()).to_string().into())
    }

    /// An id from JSON text, for tests.
    #[cfg(test)]
    pub fn for_tests(json: &str) -> Self {
        Self(json.into())
    }

    /// The id as JSON text, ready to splice into a message.
    pub fn as_json(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What kind of message a payload is, with the fields routing needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Request {
        id: RequestId,
        method: String,
        progress_token: Option<RequestId>,
    },
    Notification {
        method: String,
        cancelled: Option<RequestId>,
    },
    Response {
        id: RequestId,
        is_error: bool,
    },
    /// An error response with a null id: its author could not read the id
    /// of the request it refuses (a parse error, an invalid request).
    OrphanError,
}

impl Kind {
    pub fn method(&self) -> Option<&str> {
        match self {
            Kind::Request { method, .. } | Kind::Notification { method, .. } => Some(method),
            Kind::Response { .. } | Kind::OrphanError => None,
        }
    }
}

/// Why a payload is not a routable JSON-RPC message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeekError {
    #[error("parse error: {0}")]
    Parse(String),
    #[error("invalid request: {0}")]
    Invalid(&'static str),
}

/// Deepest nesting of arrays and objects a client message may have. Below
/// the 128 levels at which common JSON parsers (serde_json's default) give
/// up, so whatever the gateway forwards, the server can read.
pub const MAX_DEPTH: usize = 100;

/// What a client message must be, beyond [`peek`], before it is forwarded:
/// marked `"jsonrpc": "2.0"` and nested at most [`MAX_DEPTH`] levels. A
/// server answers such a message with an error whose id is null, which could
/// not be matched to the request; the gateway answers it at once instead.
pub fn check_client(payload: &[u8]) -> Result<(), PeekError> {
    if depth(payload) > MAX_DEPTH {
        return Err(PeekError::Invalid("the message is nested more than 100 levels deep"));
    }
    #[derive(Deserialize)]
    struct Version<'a> {
        #[serde(borrow, default)]
        jsonrpc: Option<&'a RawValue>,
    }
    match serde_json::from_slice::<Version<'_>>(payload) {
        Ok(Version { jsonrpc: Some(v) }) if v.get() == r#""2.0""# => Ok(()),
        Ok(_) => Err(PeekError::Invalid(r#"the message must have "jsonrpc": "2.0""#)),
        Err(e) => Err(PeekError::Parse(e.to_string())),
    }
}

/// [`peek`] for a message from a client: also [`check_client`].
pub fn peek_client(payload: &[u8]) -> Result<Kind, PeekError> {
    let kind = peek(payload)?;
    check_client(payload)?;
    Ok(kind)
}

/// The deepest nesting of arrays and objects in `payload` (strings skipped).
fn depth(payload: &[u8]) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in payload {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

impl PeekError {
    pub fn code(&self) -> i64 {
        match self {
            PeekError::Parse(_) => code::PARSE_ERROR,
            PeekError::Invalid(_) => code::INVALID_REQUEST,
        }
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(default)]
    method: Option<String>,
    #[serde(borrow, default)]
    params: Option<&'a RawValue>,
    #[serde(default)]
    result: Option<IgnoredAny>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Params<'a> {
    #[serde(rename = "_meta", borrow, default)]
    meta: Option<Meta<'a>>,
    #[serde(rename = "requestId", borrow, default)]
    request_id: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Meta<'a> {
    #[serde(rename = "progressToken", borrow, default)]
    progress_token: Option<&'a RawValue>,
}

/// Reads the routing fields of one JSON-RPC message.
pub fn peek(payload: &[u8]) -> Result<Kind, PeekError> {
    // serde would happily read a struct from a JSON array, positionally.
    if first_byte(payload) != Some(b'{') && serde_json::from_slice::<IgnoredAny>(payload).is_ok() {
        return Err(PeekError::Invalid("a JSON-RPC message must be a JSON object"));
    }
    let envelope: Envelope<'_> = match serde_json::from_slice(payload) {
        Ok(envelope) => envelope,
        Err(e) if e.is_syntax() || e.is_eof() => return Err(PeekError::Parse(e.to_string())),
        Err(_) => {
            return Err(PeekError::Invalid("a JSON-RPC message must be a JSON object"));
        }
    };
    let id = match envelope.id {
        Some(raw) if raw.get() != "null" => {
            Some(RequestId::from_raw(raw).ok_or(PeekError::Invalid("id must be a string or an integer"))?)
        }
        _ => None,
    };
    let params = envelope.params.and_then(|raw| serde_json::from_str::<Params<'_>>(raw.get()).ok());
    match (envelope.method, id) {
        (Some(method), Some(id)) => {
            let progress_token = params
                .as_ref()
                .and_then(|p| p.meta.as_ref())
                .and_then(|m| m.progress_token)
                .and_then(RequestId::from_raw);
            Ok(Kind::Request { id, method, progress_token })
        }
        (Some(method), None) => {
            let cancelled = (method == "notifications/cancelled")
                .then(|| params.as_ref().and_then(|p| p.request_id).and_then(RequestId::from_raw))
                .flatten();
            Ok(Kind::Notification { method, cancelled })
        }
        (None, Some(id)) if envelope.result.is_some() || envelope.error.is_some() => {
            Ok(Kind::Response { id, is_error: envelope.error.is_some() })
        }
        (None, None) if envelope.error.is_some() => Ok(Kind::OrphanError),
        (None, _) => Err(PeekError::Invalid("a message needs a method, or an id with a result or error")),
    }
}

/// The first byte that is not JSON whitespace.
pub fn first_byte(payload: &[u8]) -> Option<u8> {
    payload.iter().copied().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
}

/// The progress token a `notifications/progress` carries, if that is what
/// this payload is.
pub fn progress_token_of_notification(payload: &[u8]) -> Option<RequestId> {
    #[derive(Deserialize)]
    struct P<'a> {
        #[serde(rename = "progressToken", borrow)]
        progress_token: &'a RawValue,
    }
    #[derive(Deserialize)]
    struct N<'a> {
        #[serde(borrow)]
        params: P<'a>,
    }
    let n: N<'_> = serde_json::from_slice(payload).ok()?;
    RequestId::from_raw(n.params.progress_token)
}

/// The `protocolVersion` an `initialize` result names.
pub fn negotiated_version(payload: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct R {
        #[serde(rename = "protocolVersion")]
        protocol_version: String,
    }
    #[derive(Deserialize)]
    struct M {
        result: R,
    }
    serde_json::from_slice::<M>(payload).ok().map(|m| m.result.protocol_version)
}

/// The `error` object of a response, as its author wrote it.
pub fn error_object(payload: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct E<'a> {
        #[serde(borrow)]
        error: &'a RawValue,
    }
    serde_json::from_slice::<E<'_>>(payload).ok().map(|e| e.error.get().to_owned())
}

/// A JSON-RPC error response as a compact string. `id` is `None` when the
/// request id could not be read (then the body carries `"id": null`).
pub fn error_body(id: Option<&RequestId>, code: i64, message: &str, data: Option<Value>) -> String {
    let mut error = serde_json::Map::new();
    error.insert("code".into(), code.into());
    error.insert("message".into(), message.into());
    if let Some(data) = data {
        error.insert("data".into(), data);
    }
    let error = Value::Object(error).to_string();
    format!(r#"{{"jsonrpc":"2.0","id":{},"error":{error}}}"#, id.map_or("null", RequestId::as_json))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> RequestId {
        RequestId(text.into())
    }

    #[test]
    fn classifies_each_kind_of_message() {
        let cases: &[(&str, Kind)] = &[
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
                Kind::Request { id: id("1"), method: "tools/list".into(), progress_token: None },
            ),
            (
                r#"{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"_meta":{"progressToken":7}}}"#,
                Kind::Request { id: id(r#""a""#), method: "tools/call".into(), progress_token: Some(id("7")) },
            ),
            (
                r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
                Kind::Notification { method: "notifications/initialized".into(), cancelled: None },
            ),
            (
                r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"x"}}"#,
                Kind::Notification { method: "notifications/cancelled".into(), cancelled: Some(id(r#""x""#)) },
            ),
            (r#"{"jsonrpc":"2.0","id":5,"result":{}}"#, Kind::Response { id: id("5"), is_error: false }),
            (
                r#"{"jsonrpc":"2.0","id":5,"error":{"code":1,"message":"m"}}"#,
                Kind::Response { id: id("5"), is_error: true },
            ),
            (
                "{\n  \"id\" : 1 ,\n \"method\":\"ping\"}",
                Kind::Request { id: id("1"), method: "ping".into(), progress_token: None },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(&peek(text.as_bytes()).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn rejects_what_is_not_a_message() {
        let cases: &[(&str, i64)] = &[
            ("{not json", code::PARSE_ERROR),
            ("", code::PARSE_ERROR),
            ("[1,", code::PARSE_ERROR),
            ("42", code::INVALID_REQUEST),
            ("[]", code::INVALID_REQUEST),
            (r#"{"jsonrpc":"2.0"}"#, code::INVALID_REQUEST),
            (r#"{"id":{"a":1},"method":"x"}"#, code::INVALID_REQUEST),
            (r#"{"id":1}"#, code::INVALID_REQUEST),
        ];
        for (text, want) in cases {
            let err = peek(text.as_bytes()).unwrap_err();
            assert_eq!(err.code(), *want, "{text}: {err}");
        }
    }

    #[test]
    fn ids_must_be_strings_or_64_bit_integers() {
        for good in ["1", "-7", "0", "18446744073709551615", "-9223372036854775808", r#""1.5""#] {
            let text = format!(r#"{{"jsonrpc":"2.0","id":{good},"method":"x"}}"#);
            assert!(peek(text.as_bytes()).is_ok(), "{good}");
        }
        for bad in ["1.5", "-0", "1e2", "1.0", "1267650600228229401496703205376", "true", "[1]"] {
            let text = format!(r#"{{"jsonrpc":"2.0","id":{bad},"method":"x"}}"#);
            assert_eq!(peek(text.as_bytes()).unwrap_err().code(), code::INVALID_REQUEST, "{bad}");
        }
    }

    #[test]
    fn client_messages_need_the_version_and_a_sane_depth() {
        let deep = |n: usize| {
            format!(r#"{{"jsonrpc":"2.0","id":1,"method":"x","params":{{"a":{}1{}}}}}"#, "[".repeat(n), "]".repeat(n))
        };
        let cases: &[(&str, Option<i64>)] = &[
            (r#"{"jsonrpc":"2.0","id":1,"method":"x"}"#, None),
            (r#"{"id":1,"method":"x"}"#, Some(code::INVALID_REQUEST)),
            (r#"{"jsonrpc":"1.0","id":1,"method":"x"}"#, Some(code::INVALID_REQUEST)),
            (r#"{"jsonrpc":2.0,"id":1,"method":"x"}"#, Some(code::INVALID_REQUEST)),
            (r#"{"jsonrpc":"2.0","id":1,"method":"x","params":{"s":"[[[[{{{{\"]]"}}"#, None),
        ];
        for (text, want) in cases {
            assert_eq!(check_client(text.as_bytes()).err().map(|e| e.code()), *want, "{text}");
        }
        assert!(check_client(deep(MAX_DEPTH - 3).as_bytes()).is_ok());
        assert_eq!(check_client(deep(200).as_bytes()).unwrap_err().code(), code::INVALID_REQUEST);
    }

    #[test]
    fn an_error_with_a_null_id_is_an_orphan() {
        let kind = peek(br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}"#).unwrap();
        assert_eq!(kind, Kind::OrphanError);
    }

    #[test]
    fn a_null_id_with_a_method_is_a_notification() {
        let kind = peek(br#"{"jsonrpc":"2.0","id":null,"method":"x"}"#).unwrap();
        assert!(matches!(kind, Kind::Notification { .. }));
    }

    #[test]
    fn progress_tokens_are_read_from_notifications() {
        let payload =
            br#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"t1","progress":1}}"#;
        assert_eq!(progress_token_of_notification(payload), Some(id(r#""t1""#)));
        assert_eq!(progress_token_of_notification(br#"{"method":"notifications/message"}"#), None);
    }

    #[test]
    fn the_negotiated_version_is_read_from_an_initialize_result() {
        let payload = br#"{"jsonrpc":"2.0","id":0,"result":{"protocolVersion":"2025-06-18","capabilities":{}}}"#;
        assert_eq!(negotiated_version(payload).as_deref(), Some("2025-06-18"));
        assert_eq!(negotiated_version(br#"{"jsonrpc":"2.0","id":0,"error":{}}"#), None);
    }

    #[test]
    fn error_bodies_echo_the_id_verbatim() {
        let body = error_body(Some(&id(r#""abc""#)), -32003, "gone", None);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["id"], "abc");
        assert_eq!(v["error"]["code"], -32003);
        let v: Value = serde_json::from_str(&error_body(None, -32700, "bad", Some(serde_json::json!([1])))).unwrap();
        assert!(v["id"].is_null());
        assert_eq!(v["error"]["data"][0], 1);
    }
}
