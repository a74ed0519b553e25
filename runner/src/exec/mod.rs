//! `runner exec`: the built-in code executor, a stdio MCP server.
//!
//! Its tools follow Heroku's `mcp-code-exec-*` templates exactly (names,
//! argument schema, result shape), so agents written for those work
//! unchanged: `{code, packages?}` in; `{returncode, stdout, stderr}` out, as
//! pretty JSON text plus `structuredContent.result`; a non-zero exit is still
//! `isError: false`; a timeout is returncode -2 with stderr
//! `Error: Execution timed out`.
//!
//! Code runs in the session's directory (given by the runner, or a temporary
//! one removed on exit). Every process it starts is killed when the call ends,
//! is cancelled, or the executor exits.
//!
//! - [`process`]: running one command with limits.
//! - [`env`]: the environments code and installers see.
//! - [`packages`]: refusing package specs that are not plain names.
//! - [`python`]: interpreter discovery, venv and installs.

pub mod env;
pub mod packages;
pub mod process;
pub mod python;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation, JsonObject, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::OnceCell;
use tracing::{info, warn};

use crate::config::Exec;
use process::{Groups, Job};
use python::Python;

/// What a tool call returns, in the templates' field order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExecResult {
    pub returncode: i32,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CodeArgs {
    code: String,
    #[serde(default)]
    packages: Option<Vec<String>>,
}

const PYTHON_TOOL: &str = "code_exec_python";
const PYTHON_DESCRIPTION: &str = "Runs a Python snippet with `python3 -c` and reports its exit code and output.\n\n\
Packages listed in `packages` are installed with pip into this session's own virtual environment first. \
The code runs in this session's private working directory: files it writes stay there for later calls \
in the same session and are deleted when the session ends. A non-zero returncode means the code failed \
and should be fixed.\n\n\
Returns JSON with `returncode`, `stdout` and `stderr`.";

/// The executor's state, shared by concurrent calls.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

struct Inner {
    workdir: PathBuf,
    settings: Exec,
    python: OnceCell<Option<Python>>,
    groups: Groups,
    /// Installs into one venv must not overlap.
    install_lock: tokio::sync::Mutex<()>,
}

impl Executor {
    pub fn new(workdir: PathBuf, settings: Exec) -> Self {
        Self {
            inner: Arc::new(Inner {
                workdir,
                settings,
                python: OnceCell::new(),
                groups: Groups::default(),
                install_lock: tokio::sync::Mutex::new(()),
            }),
        }
    }

    async fn python(&self) -> Option<&Python> {
        self.inner.python.get_or_init(Python::discover).await.as_ref()
    }

    /// Runs Python code as the template does.
    pub async fn run_python(&self, code: &str, packages: &[String]) -> Result<ExecResult, String> {
        let python = self.python().await.ok_or("python3 is not installed on this machine")?;
        let settings = &self.inner.settings;
        let workdir = &self.inner.workdir;
        if !packages.is_empty() {
            packages::validate(packages)?;
            let _one_at_a_time = self.inner.install_lock.lock().await;
            let out = python
                .install(workdir, packages, settings.install_timeout, settings.max_output_bytes, &self.inner.groups)
                .await
                .map_err(|e| format!("cannot run the package installer: {e}"))?;
            if out.timed_out {
                return Ok(ExecResult {
                    returncode: -2,
                    stdout: String::new(),
                    stderr: format!(
                        "Dependency install failed:\nError: install timed out after {}s",
                        settings.install_timeout.as_secs()
                    ),
                });
            }
            if out.code != 0 {
                return Ok(ExecResult {
                    returncode: out.code,
                    stdout: out.stdout.trim().to_owned(),
                    stderr: format!("Dependency install failed:\n{}", out.stderr.trim()),
                });
            }
        }
        let (interpreter, venv) = python.runtime(workdir);
        let job = Job {
            program: interpreter,
            args: vec!["-c".into(), code.into()],
            cwd: workdir.clone(),
            env: env::for_code(venv.as_deref()),
            timeout: settings.run_timeout,
            max_output: settings.max_output_bytes,
        };
        let out = process::run(&job, &self.inner.groups).await.map_err(|e| format!("cannot start python: {e}"))?;
        if out.timed_out {
            return Ok(ExecResult {
                returncode: -2,
                stdout: String::new(),
                stderr: "Error: Execution timed out".into(),
            });
        }
        Ok(ExecResult {
            returncode: out.code,
            stdout: out.stdout.trim().to_owned(),
            stderr: out.stderr.trim().to_owned(),
        })
    }

    fn kill_everything(&self) {
        self.inner.groups.kill_all();
    }
}

/// The template's input schema for a code tool.
fn input_schema(tool: &str, code_description: &str, packages_description: &str) -> Arc<JsonObject> {
    let schema = json!({
        "type": "object",
        "title": format!("{tool}Arguments"),
        "required": ["code"],
        "properties": {
            "code": {"type": "string", "title": "Code", "description": code_description},
            "packages": {
                "anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}],
                "default": null,
                "title": "Packages",
                "description": packages_description
            }
        }
    });
    Arc::new(schema.as_object().expect("a JSON object").clone())
}

/// The template's output schema: `{result: object}`.
fn output_schema(tool: &str) -> Arc<JsonObject> {
    let schema = json!({
        "type": "object",
        "title": format!("{tool}Output"),
        "required": ["result"],
        "properties": {"result": {"type": "object", "title": "Result", "additionalProperties": true}}
    });
    Arc::new(schema.as_object().expect("a JSON object").clone())
}

fn python_tool() -> Tool {
    Tool::new(
        PYTHON_TOOL,
        PYTHON_DESCRIPTION,
        input_schema(
            PYTHON_TOOL,
            "The Python code to execute as a string.",
            "Optional list of pip package names to install before execution.",
        ),
    )
    .with_raw_output_schema(output_schema(PYTHON_TOOL))
}

/// A result as the templates return it.
fn success(result: &ExecResult) -> CallToolResult {
    let text = serde_json::to_string_pretty(result).expect("plain structs serialize");
    let mut out = CallToolResult::success(vec![ContentBlock::text(text)]);
    out.structured_content = Some(json!({ "result": result }));
    out
}

/// A tool-level error the calling model can read and act on.
fn failure(message: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message.into())])
}

impl ServerHandler for Executor {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("dynogate-exec", env!("CARGO_PKG_VERSION")))
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let mut tools = Vec::new();
        if self.python().await.is_some() {
            tools.push(python_tool());
        }
        Ok(ListToolsResult::with_all_items(tools))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        (name == PYTHON_TOOL).then(python_tool)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if request.name != PYTHON_TOOL {
            return Ok(failure(format!("Unknown tool: {}", request.name)).into());
        }
        let args: CodeArgs =
            match serde_json::from_value(serde_json::Value::Object(request.arguments.unwrap_or_default())) {
                Ok(args) => args,
                Err(e) => {
                    return Ok(failure(format!("Invalid arguments for {PYTHON_TOOL}: {e}")).into());
                }
            };
        let packages = args.packages.unwrap_or_default();
        let run = self.run_python(&args.code, &packages);
        // Dropping the run kills its process group.
        let result = tokio::select! {
            result = run => result,
            () = context.ct.cancelled() => Err("the call was cancelled".to_owned()),
        };
        Ok(match result {
            Ok(result) => success(&result),
            Err(message) => failure(message),
        }
        .into())
    }
}

/// Serves the executor on stdin/stdout until stdin closes or a signal comes.
pub async fn serve(settings: Exec) -> anyhow::Result<()> {
    let (workdir, _owned) = match &settings.workdir {
        Some(dir) => (dir.clone(), None),
        None => {
            let dir = tempfile::Builder::new()
                .prefix("dynogate-exec-")
                .tempdir()
                .context("cannot create a work directory")?;
            (dir.path().to_owned(), Some(dir))
        }
    };
    std::fs::create_dir_all(&workdir).with_context(|| format!("cannot create {}", workdir.display()))?;
    let executor = Executor::new(workdir.clone(), settings);
    // Find Python while the client is still initializing.
    let warm = executor.clone();
    tokio::spawn(async move { warm.python().await.is_some() });
    info!(workdir = %workdir.display(), "code executor ready on stdio");
    let service = executor.clone().serve(rmcp::transport::stdio()).await.context("MCP handshake failed")?;
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        result = service.waiting() => {
            if let Err(e) = result {
                warn!("executor stopped: {e}");
            }
        }
        _ = term.recv() => info!("SIGTERM received"),
    }
    executor.kill_everything();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_pretty_json_in_the_templates_field_order() {
        let result = success(&ExecResult { returncode: 3, stdout: "1".into(), stderr: String::new() });
        let value = serde_json::to_value(&result).unwrap();
        assert_eq!(value["content"][0]["text"], "{\n  \"returncode\": 3,\n  \"stdout\": \"1\",\n  \"stderr\": \"\"\n}");
        assert_eq!(value["structuredContent"]["result"]["returncode"], 3);
        assert_eq!(value["isError"], false);
    }

    #[test]
    fn the_schema_matches_the_template() {
        let tool = python_tool();
        let schema = serde_json::to_value(&*tool.input_schema).unwrap();
        assert_eq!(schema["required"], json!(["code"]));
        assert_eq!(schema["properties"]["packages"]["anyOf"][0]["type"], "array");
        assert_eq!(schema["title"], "code_exec_pythonArguments");
    }
}
