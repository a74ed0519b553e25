//! How long a code tool's stages took: the executor writes it into a tool
//! result's `_meta`, the gateway reads it there for its metrics. Other MCP
//! servers send nothing of the kind, and nothing is read from their results.

use serde::{Deserialize, Serialize};

/// The `_meta` key of a tool result that holds a [`Timing`].
pub const META_KEY: &str = "dynogate/timing";

/// The languages a timing may name; anything else is counted as `other`.
pub const LANGUAGES: [&str; 4] = ["python", "node", "ruby", "go"];

/// A code tool call's stages, in seconds; a stage that did not happen is absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    pub language: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_seconds: Option<f64>,
}

impl Timing {
    /// The timing in a JSON-RPC answer to `tools/call`, if it has one. Reads
    /// past everything else without keeping it; an answer that does not
    /// name the key (any other server's) costs one fast search.
    pub fn from_answer(answer: &[u8]) -> Option<Timing> {
        memchr::memmem::find(answer, br#""dynogate/timing""#)?;
        #[derive(Deserialize)]
        struct Answer {
            result: Option<Result>,
        }
        #[derive(Deserialize)]
        struct Result {
            #[serde(rename = "_meta")]
            meta: Option<Meta>,
        }
        #[derive(Deserialize)]
        struct Meta {
            #[serde(rename = "dynogate/timing")]
            timing: Option<Timing>,
        }
        serde_json::from_slice::<Answer>(answer).ok()?.result?.meta?.timing
    }

    /// The language as a bounded label.
    pub fn language_label(&self) -> &'static str {
        LANGUAGES.iter().copied().find(|l| *l == self.language).unwrap_or("other")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timing_is_read_from_an_answer_and_nothing_else_is() {
        let timing = Timing { language: "python".into(), install_seconds: None, run_seconds: Some(0.25) };
        let meta = serde_json::json!({ META_KEY: timing });
        let answer = serde_json::json!({"jsonrpc": "2.0", "id": 1, "result": {
            "content": [{"type": "text", "text": "x".repeat(1000)}], "_meta": meta}});
        let read = Timing::from_answer(&serde_json::to_vec(&answer).unwrap()).unwrap();
        assert_eq!(read, timing);
        assert_eq!(read.language_label(), "python");
        let other = Timing { language: "cobol".into(), ..Timing::default() };
        assert_eq!(other.language_label(), "other");
        for answer in [
            r#"{"jsonrpc":"2.0","id":1,"result":{"content":[]}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{"_meta":{"other":1}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"error":{"code":-1,"message":"no"}}"#,
            "not json",
        ] {
            assert_eq!(Timing::from_answer(answer.as_bytes()), None, "{answer}");
        }
    }
}
