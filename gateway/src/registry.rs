//! The MCP servers this gateway offers, and their tools.
//!
//! The default server (`RUNNER_COMMAND`, else the built-in code executor)
//! and each `mcp*` process type of the app's Procfile, as Heroku registers
//! an app's stdio MCP servers. Each has a namespace (the process type
//! without its `mcp-`), reachable as `/mcp/{namespace}` or
//! `/mcp/{process type}`. Its tools are found by starting it once on a
//! runner of its own and asking `tools/list` ([`crate::oneshot`]), at
//! start-up (unless `DISCOVER_SERVERS=on-demand`) and whenever they are
//! wanted and not known; the answer is kept. A server that fails to start
//! stays listed, with its error, and is tried again when next wanted.
//! `GET /v1/mcp/servers` shows them in the shape of Heroku's endpoint.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Query, State};
use axum::response::IntoResponse;
use bytes::Bytes;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::AppState;
use crate::error::McpError;
use crate::spawn::{Launch, ServerChoice};

/// How long one server gets to start and list its tools.
const DISCOVERY_LIMIT: Duration = Duration::from_secs(90);
/// A server whose tools could not be listed is not tried again sooner, so
/// that clients asking often do not start a runner each time.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// The servers, in order: the default first, then the Procfile's.
pub struct Registry {
    servers: Vec<Arc<Server>>,
    /// When this gateway learned them (`created_at`).
    created_at: String,
}

/// One MCP server this gateway offers.
pub struct Server {
    pub id: String,
    pub process_type: String,
    pub process_command: String,
    pub namespace: String,
    /// How sessions start it; `None` for the gateway's default.
    choice: Option<ServerChoice>,
    discovery: watch::Sender<Discovery>,
    /// One discovery at a time.
    running: tokio::sync::Mutex<()>,
}

/// What is known of a server's tools.
#[derive(Debug, Clone)]
pub enum Discovery {
    /// Not looked at yet.
    Unknown,
    Syncing,
    Synced {
        tools: Arc<Vec<Value>>,
        at: String,
    },
    Failed {
        error: String,
        at: String,
        when: std::time::Instant,
    },
}

impl Discovery {
    /// Whether it is worth looking at the server's tools (again).
    fn wants_a_look(&self) -> bool {
        match self {
            Discovery::Unknown => true,
            Discovery::Failed { when, .. } => when.elapsed() >= RETRY_AFTER,
            Discovery::Syncing | Discovery::Synced { .. } => false,
        }
    }
}

impl Registry {
    /// The default server (`runner_command`, else the built-in executor) and
    /// the `mcp*` process types of `procfile` (the file's text, if any).
    pub fn new(runner_command: Option<&str>, procfile: Option<&str>) -> Registry {
        let entries: Vec<(String, String)> = procfile
            .map(dynogate_shared::procfile::entries)
            .unwrap_or_default()
            .into_iter()
            .filter(|(kind, _)| kind.starts_with("mcp"))
            .collect();
        let mut servers = Vec::new();
        // A RUNNER_COMMAND naming one of the Procfile's servers makes that one the default.
        let default_type = runner_command.filter(|c| entries.iter().any(|(kind, _)| kind == c.trim()));
        match (runner_command, default_type) {
            (_, Some(kind)) => {
                let (_, command) = entries.iter().find(|(k, _)| k == kind.trim()).expect("found above");
                servers.push(Server::new(kind.trim(), command, None));
            }
            (Some(command), None) => servers.push(Server::new("mcp-default", command, None)),
            (None, None) => servers.push(Server::new("mcp-code-exec", "runner exec", None)),
        }
        for (kind, command) in &entries {
            // The default server, declared in the Procfile too (as this project's own is).
            if *kind == servers[0].process_type {
                continue;
            }
            let mut server = Server::new(kind, command, None);
            if servers.iter().any(|s| s.namespace == server.namespace) {
                server.namespace = kind.clone();
            }
            server.choice = Some(ServerChoice { name: server.namespace.as_str().into(), command: command.clone() });
            servers.push(server);
        }
        Registry { servers: servers.into_iter().map(Arc::new).collect(), created_at: now() }
    }

    pub fn servers(&self) -> &[Arc<Server>] {
        &self.servers
    }

    /// The server called `name` (namespace or process type).
    pub fn find(&self, name: &str) -> Option<&Arc<Server>> {
        self.servers.iter().find(|s| s.namespace == name || s.process_type == name)
    }

    /// The default server.
    pub fn default_server(&self) -> &Arc<Server> {
        &self.servers[0]
    }

    /// How sessions of `/mcp/{name}` start their server; an error for a name
    /// this gateway does not offer.
    pub fn choice(&self, name: &str) -> Result<Option<ServerChoice>, McpError> {
        self.find(name)
            .map(|s| s.choice.clone())
            .ok_or_else(|| McpError::UnknownServer(name.chars().take(64).collect()))
    }

    /// Looks at every server's tools, one after another (at start-up).
    pub async fn discover_all(&self, state: &AppState) {
        for server in &self.servers {
            if state.shutdown.is_cancelled() {
                return;
            }
            let _ = server.tools(state).await;
        }
    }
}

impl Server {
    fn new(process_type: &str, command: &str, choice: Option<ServerChoice>) -> Server {
        let namespace = process_type.strip_prefix("mcp-").filter(|rest| !rest.is_empty()).unwrap_or(process_type);
        Server {
            id: stable_uuid(process_type),
            process_type: process_type.to_owned(),
            process_command: command.to_owned(),
            namespace: namespace.to_owned(),
            choice,
            discovery: watch::Sender::new(Discovery::Unknown),
            running: tokio::sync::Mutex::new(()),
        }
    }

    /// How a runner of this server is launched.
    pub fn launch(&self, size: Option<String>) -> Launch {
        Launch { server: self.choice.clone(), size }
    }

    pub fn discovery(&self) -> Discovery {
        self.discovery.borrow().clone()
    }

    /// Its tools: the ones kept, else found now (one discovery at a time;
    /// a caller that waited for another's gets its outcome; a recent failure
    /// is the answer until [`RETRY_AFTER`] has passed).
    pub async fn tools(&self, state: &AppState) -> Result<Arc<Vec<Value>>, String> {
        match self.discovery() {
            Discovery::Synced { tools, .. } => return Ok(tools),
            failed @ Discovery::Failed { .. } if !failed.wants_a_look() => {
                let Discovery::Failed { error, .. } = failed else { unreachable!() };
                return Err(error);
            }
            _ => {}
        }
        let seen = self.discovery();
        let _turn = self.running.lock().await;
        match (self.discovery(), seen) {
            (Discovery::Synced { tools, .. }, _) => return Ok(tools),
            // Someone else's attempt failed while this one waited: that is the answer.
            (Discovery::Failed { error, when, .. }, Discovery::Failed { when: before, .. }) if when != before => {
                return Err(error);
            }
            (Discovery::Failed { error, .. }, Discovery::Unknown | Discovery::Syncing) => return Err(error),
            _ => {}
        }
        self.discovery.send_replace(Discovery::Syncing);
        let found = self.list_tools(state).await;
        match &found {
            Ok(tools) => {
                info!(server = %self.process_type, tools = tools.len(), "MCP server's tools found");
                self.discovery.send_replace(Discovery::Synced { tools: tools.clone(), at: now() });
            }
            Err(error) => {
                warn!(server = %self.process_type, %error, "MCP server's tools could not be listed");
                let failed = Discovery::Failed { error: error.clone(), at: now(), when: std::time::Instant::now() };
                self.discovery.send_replace(failed);
            }
        }
        found
    }

    /// Every tool the server lists, page after page (`nextCursor`), on one runner.
    async fn list_tools(&self, state: &AppState) -> Result<Arc<Vec<Value>>, String> {
        let mut tools = Vec::new();
        let mut failure = None;
        let mut pages = 0;
        let next = |answer: &Bytes| -> Option<Bytes> {
            pages += 1;
            match page_of(answer) {
                Ok((page, cursor)) => {
                    tools.extend(page);
                    let cursor = cursor?;
                    if pages >= MAX_TOOL_PAGES {
                        warn!(server = %self.process_type, pages, "the server lists more pages of tools than are read; the rest are left out");
                        return None;
                    }
                    let request = json!({"jsonrpc": "2.0", "id": pages + 1, "method": "tools/list",
                                         "params": {"cursor": cursor}});
                    Some(Bytes::from(request.to_string()))
                }
                Err(error) => {
                    failure = Some(error);
                    None
                }
            }
        };
        let request = Bytes::from_static(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}"#);
        crate::oneshot::run_in_turn(state, self.launch(None), request, DISCOVERY_LIMIT, |_| {}, next)
            .await
            .map_err(|e| format!("the server did not list its tools: {e}"))?;
        match failure {
            Some(error) => Err(error),
            None => Ok(Arc::new(tools)),
        }
    }

    /// The server as `GET /v1/mcp/servers` shows it.
    fn view(&self, created_at: &str, app_id: Option<&str>) -> Value {
        let (server_status, primitives_status, tools, updated_at, error) = match self.discovery() {
            Discovery::Unknown | Discovery::Syncing => {
                ("registered", "syncing", Vec::new(), created_at.to_owned(), None)
            }
            Discovery::Synced { tools, at } => {
                let tools = tools.iter().map(|tool| self.tool_view(tool)).collect();
                ("registered", "synced", tools, at, None)
            }
            Discovery::Failed { error, at, .. } => ("disconnected", "error", Vec::new(), at, Some(error)),
        };
        let mut view = json!({
            "id": self.id,
            "app_id": app_id,
            "process_type": self.process_type,
            "process_command": self.process_command,
            "created_at": created_at,
            "updated_at": updated_at,
            "namespace": self.namespace,
            "server_status": server_status,
            "primitives_status": primitives_status,
            "tools": tools,
        });
        if let Some(error) = error {
            view["error"] = json!(error);
        }
        view
    }

    fn tool_view(&self, tool: &Value) -> Value {
        let name = tool["name"].as_str().unwrap_or_default();
        json!({
            "name": name,
            "namespaced_name": self.namespaced(name),
            "description": tool.get("description").cloned().unwrap_or(Value::Null),
            "input_schema": tool.get("inputSchema").cloned().unwrap_or_else(|| json!({"type": "object"})),
            "annotations": tool.get("annotations").cloned().unwrap_or_else(|| json!({})),
        })
    }

    /// `<namespace>.<tool>`, as the agents API names an MCP tool.
    pub fn namespaced(&self, tool: &str) -> String {
        format!("{}.{tool}", self.namespace)
    }
}

#[derive(serde::Deserialize)]
pub struct ServersQuery {
    /// Look at every server's tools again.
    #[serde(default)]
    refresh: bool,
}

/// `GET /v1/mcp/servers`: every server with what is known of its tools. A
/// server not looked at yet, or whose last look failed over 30 s ago, is
/// looked at in the background (and shows `syncing` until then);
/// `?refresh=true` looks at all of them again.
pub async fn list(State(state): State<AppState>, Query(query): Query<ServersQuery>) -> impl IntoResponse {
    for server in state.registry.servers() {
        let discovery = server.discovery();
        // Syncing with nobody at it: a look whose caller went away.
        let abandoned = matches!(discovery, Discovery::Syncing) && server.running.try_lock().is_ok();
        let look = discovery.wants_a_look() || abandoned || (query.refresh && !matches!(discovery, Discovery::Syncing));
        if look {
            // Shown as syncing from now on, and looked at again by `tools`.
            server.discovery.send_replace(Discovery::Syncing);
            let (state, server) = (state.clone(), server.clone());
            state.tracker.clone().spawn(async move {
                tokio::select! {
                    _ = server.tools(&state) => {}
                    () = state.shutdown.cancelled() => {}
                }
            });
        }
    }
    let app_id = std::env::var("HEROKU_APP_ID").ok();
    let registry = &state.registry;
    let servers: Vec<Value> =
        registry.servers().iter().map(|s| s.view(&registry.created_at, app_id.as_deref())).collect();
    axum::Json(servers)
}

/// A UUID-shaped id that stays the same for a process type across restarts.
fn stable_uuid(process_type: &str) -> String {
    let hash = Sha256::digest(format!("dynogate-mcp-server:{process_type}"));
    let h = hex::encode(&hash[..16]);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// Now, as RFC 3339 in UTC.
fn now() -> String {
    rfc3339(SystemTime::now())
}

fn rfc3339(at: SystemTime) -> String {
    let secs = at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// Pages of `tools/list` read at most from one server: a server whose
/// cursors never end cannot keep discovery going.
const MAX_TOOL_PAGES: u32 = 100;

/// The tools of one `tools/list` answer and the cursor of the next page.
fn page_of(answer: &Bytes) -> Result<(Vec<Value>, Option<String>), String> {
    let answer: Value =
        serde_json::from_slice(answer).map_err(|e| format!("the server's tools/list answer is not JSON: {e}"))?;
    if let Some(error) = answer.get("error") {
        return Err(format!("the server refused tools/list: {}", error["message"].as_str().unwrap_or("no message")));
    }
    let result = &answer["result"];
    match result["tools"].as_array() {
        Some(tools) => Ok((tools.clone(), result["nextCursor"].as_str().map(ToOwned::to_owned))),
        None => Err("the server's tools/list answer holds no tool list".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_and_the_procfiles_mcp_types_are_offered() {
        let procfile = "web: gateway\nmcp-python: python -m src.stdio_server\nmcp-echo: mcp-echo\nworker: x\n";
        let registry = Registry::new(None, Some(procfile));
        let names: Vec<_> =
            registry.servers().iter().map(|s| (s.process_type.as_str(), s.namespace.as_str())).collect();
        assert_eq!(names, [("mcp-code-exec", "code-exec"), ("mcp-python", "python"), ("mcp-echo", "echo")]);
        assert_eq!(registry.choice("code-exec").unwrap(), None);
        let echo = registry.choice("mcp-echo").unwrap().unwrap();
        assert_eq!((&*echo.name, echo.command.as_str()), ("echo", "mcp-echo"));
        assert_eq!(registry.choice("echo").unwrap(), Some(echo));
        assert!(registry.choice("worker").is_err());
        assert_ne!(registry.servers()[1].id, registry.servers()[2].id);
        assert_eq!(registry.servers()[1].id, Registry::new(None, Some(procfile)).servers()[1].id);
    }

    #[test]
    fn a_runner_command_naming_a_procfile_server_makes_it_the_default() {
        let procfile = "mcp-python: python -m src.stdio_server\nmcp-echo: mcp-echo\n";
        let registry = Registry::new(Some("mcp-python"), Some(procfile));
        let names: Vec<_> = registry.servers().iter().map(|s| s.process_type.as_str()).collect();
        assert_eq!(names, ["mcp-python", "mcp-echo"]);
        let ours = Registry::new(None, Some("web: gateway\nmcp-code-exec: ./target/release/runner exec\n"));
        assert_eq!(ours.servers().len(), 1, "the executor is listed once");
        assert_eq!(registry.choice("python").unwrap(), None);
        let custom = Registry::new(Some("my-server --stdio"), None);
        assert_eq!(custom.default_server().process_command, "my-server --stdio");
        assert_eq!(custom.default_server().namespace, "default");
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_314_296);
        assert_eq!(rfc3339(at), "2026-12-03T16:11:36Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }
}
