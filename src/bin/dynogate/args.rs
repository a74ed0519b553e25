//! The command line: clap's raw arguments, and their validation into the
//! typed requests the commands run ([`McpRequest`], [`AgentsRequest`]).
//!
//! Every check that needs no network happens here, so a bad flag or bad
//! `--args` JSON fails before anything is dialled or spawned. As in the
//! Heroku `mcp-code-exec-*` templates' example clients, the server comes from
//! `MCP_SERVER_URL` and the key from `API_KEY`; flags override both.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use reqwest::Url;
use serde_json::{Map, Value};

/// A client for dynogate and other MCP servers, and for Heroku's agents endpoint.
#[derive(Debug, Parser)]
#[command(name = "dynogate", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List an MCP server's tools or call one; JSON on stdout.
    Mcp(McpArgs),
    /// Ask the agents endpoint (`{base}/v1/agents/heroku`) and print its stream.
    Agents(AgentsArgs),
}

#[derive(Debug, Args)]
pub struct McpArgs {
    #[command(flatten)]
    server: ServerArgs,
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Print the server's tools (a JSON array).
    #[command(name = "list_tools")]
    ListTools,
    /// Call a tool and print its result (exit 1 when the result is an error).
    #[command(name = "call_tool")]
    CallTool {
        /// The tool's name, e.g. code_exec_python.
        #[arg(long)]
        name: String,
        /// The tool's arguments as a JSON object, e.g. '{"code": "print(2+2)"}'.
        #[arg(long, default_value = "{}")]
        args: String,
    },
}

/// Where the MCP server is and how to reach it. `global` so the flags may
/// come before or after `list_tools`/`call_tool`.
#[derive(Debug, Args)]
struct ServerArgs {
    /// The server's URL: .../mcp for streamable HTTP, .../sse for SSE.
    #[arg(long, env = "MCP_SERVER_URL", global = true)]
    url: Option<String>,
    /// Sent as `Authorization: Bearer <key>`.
    #[arg(long, env = "API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    /// streamable (default), sse (the older HTTP+SSE transport), or stdio.
    #[arg(long, value_enum, global = true)]
    transport: Option<TransportKind>,
    /// For stdio: the server to start, as a shell command (implies --transport stdio).
    #[arg(long, global = true)]
    command: Option<String>,
    /// Longest the whole command may take, e.g. 300, 90s, 500ms, 5m.
    #[arg(long, default_value = "300s", value_parser = parse_duration, global = true)]
    timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TransportKind {
    Streamable,
    Sse,
    Stdio,
}

#[derive(Debug, Args)]
pub struct AgentsArgs {
    /// What to ask.
    prompt: String,
    /// A Heroku tool to offer, e.g. code_exec_python (repeatable).
    #[arg(long = "tool", value_name = "NAME")]
    tools: Vec<String>,
    /// An MCP tool to offer, as <namespace>.<tool> (repeatable).
    #[arg(long = "mcp-tool", value_name = "NAMESPACED")]
    mcp_tools: Vec<String>,
    /// The model; omitted from the request when neither this nor the variable is set.
    #[arg(long, env = "INFERENCE_MODEL_ID")]
    model: Option<String>,
    /// Most calls each tool may make (`runtime_params.max_calls`).
    #[arg(long)]
    max_calls: Option<u32>,
    /// A system message to put before the prompt.
    #[arg(long)]
    system: Option<String>,
    /// Print each event's data as one JSON object per line, for jq.
    #[arg(long)]
    json: bool,
    /// The MCP server's URL; the agents endpoint is on the same host.
    #[arg(long, env = "MCP_SERVER_URL")]
    url: Option<String>,
    /// The base the agents path is added to, instead of one derived from --url.
    #[arg(long)]
    base_url: Option<String>,
    /// Sent as `Authorization: Bearer <key>`.
    #[arg(long, env = "API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Longest the whole command may take, e.g. 300, 90s, 500ms, 5m.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    timeout: Duration,
}

/// A key that never shows in `{:?}` output.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    fn new(key: Option<String>) -> Option<Self> {
        key.filter(|k| !k.is_empty()).map(ApiKey)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MASKED")
    }
}

/// How to reach the MCP server.
#[derive(Debug)]
pub enum Target {
    Streamable { url: Url, api_key: Option<ApiKey> },
    Sse { url: Url, api_key: Option<ApiKey> },
    Stdio { command: String },
}

impl Target {
    /// Names the server in error messages.
    pub fn describe(&self) -> String {
        match self {
            Target::Streamable { url, .. } | Target::Sse { url, .. } => url.to_string(),
            Target::Stdio { command } => format!("`{command}`"),
        }
    }
}

/// A validated `dynogate mcp …`.
#[derive(Debug)]
pub struct McpRequest {
    pub target: Target,
    pub timeout: Duration,
    pub call: Call,
}

#[derive(Debug)]
pub enum Call {
    ListTools,
    CallTool { name: String, arguments: Map<String, Value> },
}

/// A validated `dynogate agents …`.
#[derive(Debug)]
pub struct AgentsRequest {
    pub endpoint: Url,
    pub api_key: Option<ApiKey>,
    pub body: Value,
    pub json: bool,
    pub timeout: Duration,
}

impl McpArgs {
    pub fn validate(self) -> anyhow::Result<McpRequest> {
        let call = match self.action {
            Action::ListTools => Call::ListTools,
            Action::CallTool { name, args } => Call::CallTool { name, arguments: parse_arguments(&args)? },
        };
        let server = self.server;
        let kind = match (server.transport, server.command.is_some()) {
            (Some(kind), false) => kind,
            (None | Some(TransportKind::Stdio), true) => TransportKind::Stdio,
            (None, false) => TransportKind::Streamable,
            (Some(_), true) => bail!("--command starts a local server: it goes with --transport stdio"),
        };
        let target = match kind {
            TransportKind::Stdio => {
                let command = server.command.filter(|c| !c.trim().is_empty());
                Target::Stdio { command: command.context("--transport stdio needs --command 'the server to run'")? }
            }
            TransportKind::Streamable | TransportKind::Sse => {
                let url =
                    server.url.filter(|u| !u.is_empty()).context("no server: set MCP_SERVER_URL or give --url")?;
                let url = parse_http_url(&url)?;
                let api_key = ApiKey::new(server.api_key);
                if kind == TransportKind::Sse {
                    Target::Sse { url, api_key }
                } else {
                    Target::Streamable { url, api_key }
                }
            }
        };
        Ok(McpRequest { target, timeout: server.timeout, call })
    }
}

impl AgentsArgs {
    pub fn validate(self) -> anyhow::Result<AgentsRequest> {
        let base = match (self.base_url, self.url) {
            (Some(base), _) => parse_http_url(&base)?,
            (None, Some(url)) if !url.is_empty() => server_base(&parse_http_url(&url)?),
            _ => bail!("no server: set MCP_SERVER_URL, or give --url or --base-url"),
        };
        let endpoint = agents_endpoint(&base)?;
        if let Some(bad) = self.mcp_tools.iter().find(|name| !name.contains('.')) {
            bail!("--mcp-tool {bad}: MCP tools are named <namespace>.<tool>");
        }
        let tools = self
            .tools
            .iter()
            .map(|name| ("heroku_tool", name))
            .chain(self.mcp_tools.iter().map(|name| ("mcp", name)))
            .map(|(kind, name)| {
                let mut tool = serde_json::json!({"type": kind, "name": name});
                if let Some(max_calls) = self.max_calls {
                    tool["runtime_params"] = serde_json::json!({"max_calls": max_calls});
                }
                tool
            })
            .collect::<Vec<_>>();
        let mut messages = Vec::new();
        if let Some(system) = self.system {
            messages.push(serde_json::json!({"role": "system", "content": system}));
        }
        messages.push(serde_json::json!({"role": "user", "content": self.prompt}));
        let mut body = serde_json::json!({"messages": messages});
        if let Some(model) = self.model.filter(|m| !m.is_empty()) {
            body["model"] = Value::String(model);
        }
        if !tools.is_empty() {
            body["tools"] = Value::Array(tools);
        }
        Ok(AgentsRequest { endpoint, api_key: ApiKey::new(self.api_key), body, json: self.json, timeout: self.timeout })
    }
}

/// `--args`: a JSON object, or a one-line reason it is not one.
fn parse_arguments(text: &str) -> anyhow::Result<Map<String, Value>> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => bail!("--args must be a JSON object like '{{\"code\": \"print(2+2)\"}}', not {other}"),
        Err(e) => bail!("--args is not valid JSON ({e}): {text}"),
    }
}

fn parse_http_url(text: &str) -> anyhow::Result<Url> {
    let url = Url::parse(text).with_context(|| format!("bad URL {text:?}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        bail!("bad URL {text:?}: expected http:// or https://");
    }
    Ok(url)
}

/// The MCP URL with its transport path (`/mcp`, `/mcp/`, `/sse`) taken off:
/// the agents endpoint lives beside it on the same app.
fn server_base(url: &Url) -> Url {
    let mut base = url.clone();
    let path = url.path();
    let trimmed = ["/mcp/", "/mcp", "/sse/", "/sse"].iter().find_map(|suffix| path.strip_suffix(suffix));
    if let Some(rest) = trimmed {
        base.set_path(rest);
    }
    base.set_query(None);
    base.set_fragment(None);
    base
}

fn agents_endpoint(base: &Url) -> anyhow::Result<Url> {
    let mut base = base.clone();
    // `join` replaces the last path segment unless the path ends with `/`.
    if !base.path().ends_with('/') {
        base.set_path(&format!("{}/", base.path()));
    }
    base.join("v1/agents/heroku").context("cannot build the agents URL")
}

/// `300`, `300s`, `500ms`, `5m`: seconds unless a unit says otherwise.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number.trim().parse().map_err(|_| format!("{text:?} is not a duration like 300, 90s or 500ms"))?;
    Duration::try_from_secs_f64(value * scale)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{text:?} is not a positive duration"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn agents(argv: &[&str]) -> anyhow::Result<AgentsRequest> {
        let mut full = vec!["dynogate", "agents"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full)?.command {
            Command::Agents(args) => args.validate(),
            Command::Mcp(_) => unreachable!(),
        }
    }

    fn mcp(argv: &[&str]) -> anyhow::Result<McpRequest> {
        let mut full = vec!["dynogate", "mcp"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full)?.command {
            Command::Mcp(args) => args.validate(),
            Command::Agents(_) => unreachable!(),
        }
    }

    #[test]
    fn durations() {
        let cases = [("300", 300_000), ("90s", 90_000), ("500ms", 500), ("5m", 300_000), ("1.5", 1_500)];
        for (text, millis) in cases {
            assert_eq!(parse_duration(text), Ok(Duration::from_millis(millis)), "{text}");
        }
        for bad in ["", "soon", "0", "-1", "5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn arguments_must_be_a_json_object() {
        assert_eq!(parse_arguments(r#"{"code": "print(2+2)"}"#).unwrap()["code"], "print(2+2)");
        assert!(parse_arguments("{}").unwrap().is_empty());
        for bad in ["", "{code: 1}", "[1]", "\"text\"", "{\"a\": 1"] {
            assert!(parse_arguments(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_agents_url_sits_beside_the_mcp_path() {
        let cases = [
            ("http://127.0.0.1:8000/mcp", "http://127.0.0.1:8000/v1/agents/heroku"),
            ("http://127.0.0.1:8000/mcp/", "http://127.0.0.1:8000/v1/agents/heroku"),
            ("http://127.0.0.1:8000/sse", "http://127.0.0.1:8000/v1/agents/heroku"),
            ("https://app.example.com/prefix/mcp?x=1", "https://app.example.com/prefix/v1/agents/heroku"),
            ("https://app.example.com", "https://app.example.com/v1/agents/heroku"),
        ];
        for (url, expected) in cases {
            let endpoint = agents_endpoint(&server_base(&Url::parse(url).unwrap())).unwrap();
            assert_eq!(endpoint.as_str(), expected, "{url}");
        }
    }

    #[test]
    fn the_agents_body_has_herokus_shape() {
        let request = agents(&[
            "hi",
            "--url=http://h/mcp",
            "--tool=code_exec_python",
            "--mcp-tool=echo.echo",
            "--max-calls=3",
            "--model=claude-4-sonnet",
            "--system=be brief",
        ])
        .unwrap();
        assert_eq!(request.endpoint.as_str(), "http://h/v1/agents/heroku");
        assert_eq!(
            request.body,
            json!({
                "model": "claude-4-sonnet",
                "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                "tools": [
                    {"type": "heroku_tool", "name": "code_exec_python", "runtime_params": {"max_calls": 3}},
                    {"type": "mcp", "name": "echo.echo", "runtime_params": {"max_calls": 3}},
                ],
            })
        );
        let bare = agents(&["hi", "--base-url=http://h/api"]).unwrap();
        assert_eq!(bare.endpoint.as_str(), "http://h/api/v1/agents/heroku");
        if std::env::var_os("INFERENCE_MODEL_ID").is_none() {
            assert_eq!(bare.body, json!({"messages": [{"role": "user", "content": "hi"}]}));
        }
        assert!(agents(&["hi", "--url=http://h/mcp", "--mcp-tool=plain"]).is_err());
    }

    #[test]
    fn the_transport_follows_the_flags() {
        let stdio = mcp(&["list_tools", "--command", "runner exec"]).unwrap();
        assert!(matches!(stdio.target, Target::Stdio { ref command } if command == "runner exec"));
        let sse = mcp(&["--transport", "sse", "list_tools", "--url", "http://h/sse", "--timeout", "2s"]).unwrap();
        assert!(matches!(sse.target, Target::Sse { .. }));
        assert_eq!(sse.timeout, Duration::from_secs(2));
        assert!(mcp(&["list_tools", "--transport", "sse", "--command", "x"]).is_err());
        assert!(mcp(&["list_tools", "--transport", "stdio"]).is_err());
        assert!(mcp(&["list_tools", "--url", "ftp://h/mcp"]).is_err());
    }

    #[test]
    fn keys_are_masked() {
        assert_eq!(format!("{:?}", ApiKey("s3cret".into())), "MASKED");
    }
}
