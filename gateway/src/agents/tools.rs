//! The tools of one agents request: what the model is told of each (a
//! function definition built from the tool's real schema), and running one
//! call of it on a fresh runner of its own ([`crate::oneshot`]), discarded
//! with everything it started once the call is answered.
//!
//! - `heroku_tool` `code_exec_python|node|ruby|go`: the default server's tool
//!   of that name (the built-in executor's).
//! - `heroku_tool` `dyno_run_command`: a command of the app, `tool_params.cmd`,
//!   with the model's arguments appended as `--name value`, shell-quoted. It
//!   runs from `$HOME` (the app's root on a dyno, the session's directory in
//!   a local sandbox), through the executor's Python, which becomes `sh -c`
//!   (so its result is exactly the command's `{returncode, stdout, stderr}`).
//! - `mcp` `<namespace>.<tool>` (or `/`): a registered server's tool.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};

use super::request::{RuntimeParams, ToolSpec};
use crate::AppState;
use crate::registry::Server;

/// Calls of one tool per request unless `max_calls` says otherwise.
pub const DEFAULT_MAX_CALLS: u32 = 3;
/// A tool call's time limit unless `ttl_seconds` says otherwise, and its most.
pub const MAX_TTL_SECONDS: u64 = 120;

const CODE_TOOLS: [&str; 4] = ["code_exec_python", "code_exec_node", "code_exec_ruby", "code_exec_go"];

/// A request's tools that could not all be set up; the caller gets 400.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ToolError(pub String);

/// The tools of one request.
pub struct Toolbox {
    tools: Vec<AgentTool>,
}

/// One tool, as the model sees it and as it runs.
pub struct AgentTool {
    /// The name the model calls it by: OpenAI function names allow only
    /// `[A-Za-z0-9_-]`, at most 64, so `echo.echo` is `echo__echo` there.
    pub function: String,
    /// The name the request gave it, used in results.
    pub name: String,
    definition: Value,
    target: Target,
    pub max_calls: u32,
    ttl: Duration,
    size: Option<String>,
}

enum Target {
    /// A tool of a registered server, called by its own name.
    Server { server: Arc<Server>, tool: String },
    /// A command of the app.
    Command { cmd: String },
}

impl AgentTool {
    /// Its kind, as a metrics label: `code`, `command` or `mcp`.
    pub fn kind(&self) -> &'static str {
        match &self.target {
            Target::Command { .. } => "command",
            // A `heroku_tool` is named as the tool; an `mcp` tool as `<namespace>.<tool>`.
            Target::Server { .. } if CODE_TOOLS.contains(&self.name.as_str()) => "code",
            Target::Server { .. } => "mcp",
        }
    }
}

impl Toolbox {
    /// Sets up `specs`: each must name a tool this gateway has (the servers'
    /// tools are listed now if they are not known yet).
    pub async fn build(state: &AppState, specs: &[ToolSpec]) -> Result<Toolbox, ToolError> {
        let mut tools: Vec<AgentTool> = Vec::new();
        for spec in specs {
            let params = &spec.runtime_params;
            let (target, description, parameters) = match (spec.kind.as_str(), spec.name.as_str()) {
                ("heroku_tool", "dyno_run_command") => {
                    let Some(tool_params) = &params.tool_params else {
                        return Err(ToolError(
                            "dyno_run_command needs runtime_params.tool_params with cmd and description".into(),
                        ));
                    };
                    let cmd = tool_params.cmd.trim();
                    if cmd.is_empty() {
                        return Err(ToolError("dyno_run_command's tool_params.cmd is empty".into()));
                    }
                    let parameters =
                        tool_params.parameters.clone().unwrap_or_else(|| json!({"type": "object", "properties": {}}));
                    let description = tool_params
                        .description
                        .clone()
                        .or_else(|| spec.description.clone())
                        .unwrap_or_else(|| format!("Runs `{cmd}` on the app."));
                    (Target::Command { cmd: cmd.to_owned() }, description, parameters)
                }
                ("heroku_tool", name) if CODE_TOOLS.contains(&name) => {
                    let server = state.registry.default_server().clone();
                    let schema = tool_of(state, &server, name).await?.ok_or_else(|| {
                        ToolError(format!(
                            "{name} is not available here: this gateway's default server does not offer it"
                        ))
                    })?;
                    let (description, parameters) = describe(&schema, spec);
                    (Target::Server { server, tool: name.to_owned() }, description, parameters)
                }
                ("heroku_tool", name) => {
                    return Err(ToolError(format!(
                        "heroku_tool {name:?} is not available on this gateway; it offers {} and dyno_run_command",
                        CODE_TOOLS.join(", ")
                    )));
                }
                ("mcp", name) => {
                    let Some((namespace, tool)) = name.split_once(['.', '/']) else {
                        return Err(ToolError(format!(
                            "mcp tool {name:?} must be named <namespace>.<tool>; GET /v1/mcp/servers lists them"
                        )));
                    };
                    let server = state.registry.find(namespace).cloned().ok_or_else(|| {
                        ToolError(format!(
                            "no MCP server has the namespace {namespace:?}; GET /v1/mcp/servers lists them"
                        ))
                    })?;
                    let schema = tool_of(state, &server, tool)
                        .await?
                        .ok_or_else(|| ToolError(format!("the MCP server {namespace:?} has no tool {tool:?}")))?;
                    let (description, parameters) = describe(&schema, spec);
                    (Target::Server { server, tool: tool.to_owned() }, description, parameters)
                }
                (kind, _) => {
                    return Err(ToolError(format!("tool type {kind:?} is unknown; use heroku_tool or mcp")));
                }
            };
            let (max_calls, ttl) = limits(params, &spec.name)?;
            let function = function_name(&spec.name, &tools);
            let definition = json!({
                "type": "function",
                "function": {"name": function, "description": description, "parameters": parameters},
            });
            tools.push(AgentTool {
                function,
                name: spec.name.clone(),
                definition,
                target,
                max_calls,
                ttl,
                size: params.dyno_size.clone(),
            });
        }
        Ok(Toolbox { tools })
    }

    /// The function definitions the model is sent.
    pub fn definitions(&self) -> Vec<Value> {
        self.tools.iter().map(|t| t.definition.clone()).collect()
    }

    /// The tool the model called by `function`.
    pub fn find(&self, function: &str) -> Option<(usize, &AgentTool)> {
        self.tools.iter().enumerate().find(|(_, t)| t.function == function)
    }

    /// Calls allowed in all, over every tool.
    pub fn max_calls_total(&self) -> u32 {
        self.tools.iter().map(|t| t.max_calls).fold(0, u32::saturating_add)
    }

    pub fn len(&self) -> usize {
        self.tools.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }
}

impl AgentTool {
    /// Runs one call with `arguments` (the model's, parsed) on a runner of
    /// its own; returns the text the model is given.
    pub async fn run(&self, state: &AppState, arguments: Value) -> String {
        let (server, tool, arguments) = match &self.target {
            Target::Server { server, tool } => (server.clone(), tool.as_str(), arguments),
            Target::Command { cmd } => match command_line(cmd, &arguments) {
                Ok(line) => {
                    (state.registry.default_server().clone(), "code_exec_python", json!({"code": exec_code(&line)}))
                }
                Err(why) => return format!("Tool '{}' was not run: {why}", self.name),
            },
        };
        let request = json!({
            "jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments},
        });
        let request = Bytes::from(request.to_string());
        let launch = server.launch(self.size.clone());
        match crate::oneshot::run(state, launch, request, self.ttl, |_| {}).await {
            Ok(answer) => {
                let answer: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
                match (answer.get("result"), answer.get("error")) {
                    (Some(result), _) => format!("Tool '{}' returned result: {result}", self.name),
                    (None, Some(error)) => {
                        format!("Tool '{}' failed: {}", self.name, error["message"].as_str().unwrap_or("no message"))
                    }
                    (None, None) => format!("Tool '{}' failed: its server gave a malformed answer", self.name),
                }
            }
            Err(e) => format!("Tool '{}' failed: {e}", self.name),
        }
    }
}

/// The named tool's schema from `server`'s tools (listed now if not known).
async fn tool_of(state: &AppState, server: &Server, name: &str) -> Result<Option<Value>, ToolError> {
    let tools = server
        .tools(state)
        .await
        .map_err(|e| ToolError(format!("the MCP server {:?} cannot list its tools: {e}", server.namespace)))?;
    Ok(tools.iter().find(|t| t["name"] == name).cloned())
}

/// The description (the request's, else the tool's) and parameters schema.
fn describe(schema: &Value, spec: &ToolSpec) -> (String, Value) {
    let description =
        spec.description.clone().or_else(|| schema["description"].as_str().map(str::to_owned)).unwrap_or_default();
    let parameters = schema.get("inputSchema").cloned().unwrap_or_else(|| json!({"type": "object", "properties": {}}));
    (description, parameters)
}

fn limits(params: &RuntimeParams, name: &str) -> Result<(u32, Duration), ToolError> {
    let max_calls = params.max_calls.unwrap_or(DEFAULT_MAX_CALLS);
    if max_calls == 0 {
        return Err(ToolError(format!("{name}: runtime_params.max_calls must be at least 1")));
    }
    let ttl = params.ttl_seconds.unwrap_or(MAX_TTL_SECONDS);
    if !(1..=MAX_TTL_SECONDS).contains(&ttl) {
        return Err(ToolError(format!("{name}: runtime_params.ttl_seconds must be between 1 and {MAX_TTL_SECONDS}")));
    }
    Ok((max_calls, Duration::from_secs(ttl)))
}

/// An OpenAI-safe function name for `name`, unique among `taken`.
fn function_name(name: &str, taken: &[AgentTool]) -> String {
    let base: String = name
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | '-' => c.to_string(),
            _ => "__".to_owned(),
        })
        .collect::<String>()
        .chars()
        .take(60)
        .collect();
    let base = if base.is_empty() { "tool".to_owned() } else { base };
    let mut candidate = base.clone();
    let mut n = 2;
    while taken.iter().any(|t| t.function == candidate) {
        candidate = format!("{base}_{n}");
        n += 1;
    }
    candidate
}

/// `cmd` with the model's arguments as `--name value`, each shell-quoted.
fn command_line(cmd: &str, arguments: &Value) -> Result<String, String> {
    let mut line = cmd.to_owned();
    let Some(fields) = arguments.as_object() else {
        return Err("its arguments must be a JSON object".into());
    };
    for (name, value) in fields {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(format!("argument name {name:?} is not a plain name"));
        }
        let value = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        line.push_str(&format!(" --{name} {}", shell_quote(&value)));
    }
    Ok(line)
}

fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// Python that becomes `sh -c line`, run from `$HOME`.
fn exec_code(line: &str) -> String {
    let line = serde_json::to_string(line).expect("strings serialize");
    format!("import os\nos.chdir(os.path.expanduser('~'))\nos.execvp('sh', ['sh', '-c', {line}])\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_arguments_reach_the_command_quoted() {
        let line = command_line("./bin/report", &json!({"city": "O'Hare; rm -rf /", "days": 3})).unwrap();
        assert_eq!(line, r#"./bin/report --city 'O'\''Hare; rm -rf /' --days '3'"#);
        assert!(command_line("x", &json!({"a b": 1})).is_err());
        assert!(command_line("x", &json!([1])).is_err());
        assert_eq!(command_line("date", &json!({})).unwrap(), "date");
    }

    #[test]
    fn function_names_are_safe_and_unique() {
        assert_eq!(function_name("echo.echo", &[]), "echo__echo");
        assert_eq!(function_name("code_exec_python", &[]), "code_exec_python");
        let taken = AgentTool {
            function: "dyno_run_command".into(),
            name: "dyno_run_command".into(),
            definition: Value::Null,
            target: Target::Command { cmd: "date".into() },
            max_calls: 1,
            ttl: Duration::from_secs(1),
            size: None,
        };
        assert_eq!(function_name("dyno_run_command", &[taken]), "dyno_run_command_2");
    }
}
