//! The body of `POST /v1/agents/heroku`, as Heroku's endpoint takes it.

use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRequest {
    /// Default: `INFERENCE_MODEL_ID`.
    pub model: Option<String>,
    pub messages: Vec<Value>,
    pub max_tokens_per_inference_request: Option<u32>,
    pub stop: Option<Vec<String>>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    #[serde(default)]
    pub tools: Vec<ToolSpec>,
    /// Accepted for clients that send it: the answer is always a stream.
    #[serde(default, rename = "stream")]
    pub _stream: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ToolSpec {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub description: Option<String>,
    #[serde(default)]
    pub runtime_params: RuntimeParams,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RuntimeParams {
    /// The app whose dynos run the tool: accepted when it is this gateway's.
    pub target_app_name: Option<String>,
    pub dyno_size: Option<String>,
    pub ttl_seconds: Option<u64>,
    pub max_calls: Option<u32>,
    pub tool_params: Option<CommandParams>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CommandParams {
    pub cmd: String,
    pub description: Option<String>,
    pub parameters: Option<Value>,
}

impl AgentRequest {
    /// What is wrong with the request, if anything, beyond its tools.
    pub fn check(&self, runner_app: Option<&str>) -> Result<(), String> {
        if self.messages.is_empty() {
            return Err("messages must hold at least one message".into());
        }
        for (i, message) in self.messages.iter().enumerate() {
            let role = message["role"].as_str().unwrap_or_default();
            if !["system", "user", "assistant", "tool"].contains(&role) {
                return Err(format!("messages[{i}].role must be system, user, assistant or tool"));
            }
        }
        if let Some(t) = self.temperature
            && !(0.0..=1.0).contains(&t)
        {
            return Err("temperature must be between 0 and 1".into());
        }
        if let Some(p) = self.top_p
            && !(0.0..=1.0).contains(&p)
        {
            return Err("top_p must be between 0 and 1".into());
        }
        for tool in &self.tools {
            if let (Some(target), Some(ours)) = (&tool.runtime_params.target_app_name, runner_app)
                && target != ours
            {
                return Err(format!(
                    "{}: runtime_params.target_app_name {target:?} is not this gateway's app ({ours}); its tools run there",
                    tool.name
                ));
            }
        }
        Ok(())
    }

    /// The sampling fields for the model API, in OpenAI's names.
    pub fn sampling(&self) -> Value {
        let mut fields = json!({});
        if let Some(n) = self.max_tokens_per_inference_request {
            fields["max_tokens"] = json!(n);
        }
        if let Some(stop) = &self.stop {
            fields["stop"] = json!(stop);
        }
        if let Some(t) = self.temperature {
            fields["temperature"] = json!(t);
        }
        if let Some(p) = self.top_p {
            fields["top_p"] = json!(p);
        }
        fields
    }
}
