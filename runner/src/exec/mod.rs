//! `runner exec`: the built-in code executor, a stdio MCP server.
//!
//! Its tools follow Heroku's `mcp-code-exec-*` templates exactly (names,
//! argument schema, result shape), so agents written for those work
//! unchanged: `code_exec_python`, `code_exec_node`, `code_exec_ruby` and
//! `code_exec_go` take `{code, packages?}` and return
//! `{returncode, stdout, stderr}` as pretty JSON text plus
//! `structuredContent.result`; a non-zero exit is still `isError: false`; a
//! timeout is returncode -2 with stderr `Error: Execution timed out`. A tool
//! is listed only when its toolchain is on this machine.
//!
//! Code runs in the session's directory (given by the runner, or a temporary
//! one removed on exit), with limits, an allowlisted environment, and stdin
//! closed. Every process it starts is killed when the call ends, is
//! cancelled, or the executor's stdin closes or it exits.
//!
//! - [`tools`]: the tools' names, schemas and result shapes.
//! - [`session`]: the session directory, shared caches, and running jobs in them.
//! - [`process`]: running one command: process groups, output caps, timeouts.
//! - [`limits`]: resource limits and the `runner limit` shim; [`primed`]: a
//!   shim started ahead of its command, already in its cgroup.
//! - [`cgroup`]: a pids cgroup per command, where the machine allows it.
//! - [`env`]: the environments code and installers see.
//! - [`eof`]: noticing that stdin closed, to kill running commands at once.
//! - [`packages`]: refusing package specs that are not plain names.
//! - [`compiler`]: saying so when an install needed a compiler the machine lacks.
//! - [`progress`]: progress notifications during long calls.
//! - [`python`], [`node`], [`ruby`], [`go`]: each language's toolchain.
//! - [`uv`]: finding uv, and obtaining it once per machine.

pub mod cgroup;
pub mod compiler;
pub mod env;
pub mod eof;
pub mod go;
pub mod limits;
pub mod node;
pub mod packages;
pub mod primed;
pub mod process;
pub mod progress;
pub mod python;
pub mod ruby;
pub mod session;
pub mod tools;
pub mod uv;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, Implementation, InitializeRequestParams, InitializeResult,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt};
use tokio::sync::OnceCell;
use tracing::{info, warn};

use crate::config::Exec;
use dynogate_shared::timing::Timing;
use packages::Spec;
use process::{Output, Supervisor};
use progress::{Reporter, Stage};
use session::Session;
use tools::{CodeArgs, ExecResult, Language, failure, success};

/// What each language provides. Implemented by [`python::Python`],
/// [`node::Node`], [`ruby::Ruby`] and [`go::Go`].
pub(crate) trait Toolchain: Send + Sync {
    /// Installs packages into the session's own environment for the language.
    async fn install(&self, session: &Session, specs: &[Spec], stage: &Stage) -> std::io::Result<Output>;
    /// Runs code in the session directory (building it first where needed).
    async fn run(&self, session: &Session, code: &str, stage: &Stage) -> std::io::Result<Output>;
}

/// The executor's state, shared by concurrent calls.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

struct Inner {
    session: Session,
    /// Calls running at once (`EXEC_MAX_CONCURRENT_CALLS`); `None` for no cap.
    calls: Option<Gate>,
    /// Each toolchain is looked for once, on first use (or at start-up).
    python: OnceCell<Option<python::Python>>,
    node: OnceCell<Option<node::Node>>,
    ruby: OnceCell<Option<ruby::Ruby>>,
    go: OnceCell<Option<go::Go>>,
}

impl Executor {
    pub fn new(workdir: PathBuf, settings: Exec, supervisor: Supervisor) -> Self {
        Self {
            inner: Arc::new(Inner {
                calls: settings.max_concurrent_calls.map(Gate::new),
                session: Session::new(workdir, settings, supervisor),
                python: OnceCell::new(),
                node: OnceCell::new(),
                ruby: OnceCell::new(),
                go: OnceCell::new(),
            }),
        }
    }

    fn supervisor(&self) -> &Supervisor {
        &self.inner.session.supervisor
    }

    async fn python(&self) -> Option<&python::Python> {
        let tools = &self.inner.session.settings.tools_dir;
        self.inner.python.get_or_init(|| python::Python::discover(self.supervisor(), tools)).await.as_ref()
    }

    async fn node(&self) -> Option<&node::Node> {
        self.inner.node.get_or_init(|| node::Node::discover(self.supervisor())).await.as_ref()
    }

    async fn ruby(&self) -> Option<&ruby::Ruby> {
        self.inner.ruby.get_or_init(|| ruby::Ruby::discover(self.supervisor())).await.as_ref()
    }

    async fn go(&self) -> Option<&go::Go> {
        self.inner.go.get_or_init(|| go::Go::discover(self.supervisor())).await.as_ref()
    }

    /// Whether `language`'s toolchain is on this machine.
    pub async fn has(&self, language: Language) -> bool {
        match language {
            Language::Python => self.python().await.is_some(),
            Language::Node => self.node().await.is_some(),
            Language::Ruby => self.ruby().await.is_some(),
            Language::Go => self.go().await.is_some(),
        }
    }

    /// Installs `packages`, then runs `code`, as the templates do.
    pub async fn execute(
        &self,
        language: Language,
        code: &str,
        packages: &[String],
        stage: &Stage,
    ) -> Result<(ExecResult, Timing), String> {
        let missing = || format!("{} is not installed on this machine", language.tool_name());
        match language {
            Language::Python => {
                self.execute_with(self.python().await.ok_or_else(missing)?, language, code, packages, stage).await
            }
            Language::Node => {
                self.execute_with(self.node().await.ok_or_else(missing)?, language, code, packages, stage).await
            }
            Language::Ruby => {
                self.execute_with(self.ruby().await.ok_or_else(missing)?, language, code, packages, stage).await
            }
            Language::Go => {
                self.execute_with(self.go().await.ok_or_else(missing)?, language, code, packages, stage).await
            }
        }
    }

    async fn execute_with<T: Toolchain>(
        &self,
        toolchain: &T,
        language: Language,
        code: &str,
        packages: &[String],
        stage: &Stage,
    ) -> Result<(ExecResult, Timing), String> {
        let session = &self.inner.session;
        let specs = packages::validate(language, packages, session.settings.allow_package_sources)?;
        let mut timing = Timing { language: language.label().to_owned(), ..Timing::default() };
        if !specs.is_empty() {
            stage.set("installing packages");
            let started = std::time::Instant::now();
            let out = toolchain
                .install(session, &specs, stage)
                .await
                .map_err(|e| format!("cannot run the package installer: {e}"))?;
            timing.install_seconds = Some(started.elapsed().as_secs_f64());
            if out.timed_out {
                let seconds = session.settings.install_timeout.as_secs();
                let stderr = format!("Dependency install failed:\nError: install timed out after {seconds}s");
                return Ok((ExecResult { returncode: -2, stdout: String::new(), stderr }, timing));
            }
            if out.code != 0 {
                let mut stderr = format!("Dependency install failed:\n{}", out.stderr.trim());
                if let Some(note) = compiler::note(language, &out.stderr) {
                    stderr.push_str("\n\n");
                    stderr.push_str(&note);
                }
                let result = ExecResult { returncode: out.code, stdout: out.stdout.trim().to_owned(), stderr };
                return Ok((result, timing));
            }
        }
        stage.set("running");
        let started = std::time::Instant::now();
        let out = toolchain.run(session, code, stage).await.map_err(|e| format!("cannot run the code: {e}"))?;
        timing.run_seconds = Some(started.elapsed().as_secs_f64());
        Ok((self.result_of(out), timing))
    }

    /// The template's result for a finished run, with a word on limits hit.
    fn result_of(&self, out: Output) -> ExecResult {
        if out.timed_out {
            return ExecResult::timed_out();
        }
        let limits = &self.inner.session.settings.limits;
        let mut stderr = out.stderr.trim().to_owned();
        let note = match (out.code, limits.cpu_seconds, limits.file_size) {
            (-24, Some(seconds), _) => Some(format!("Error: CPU time limit exceeded ({seconds}s)")),
            (-25, _, Some(bytes)) => Some(format!("Error: file size limit exceeded ({bytes} bytes)")),
            _ => None,
        };
        if let Some(note) = note {
            if !stderr.is_empty() {
                stderr.push('\n');
            }
            stderr.push_str(&note);
        }
        ExecResult { returncode: out.code, stdout: out.stdout.trim().to_owned(), stderr }
    }

    async fn prepare_python(&self) {
        if let Some(python) = self.python().await {
            python.prepare(&self.inner.session).await;
        }
    }

    fn kill_everything(&self) {
        self.supervisor().shut_down();
    }
}

impl ServerHandler for Executor {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("dynogate-exec", env!("CARGO_PKG_VERSION")))
    }

    /// Answered once Python has been looked for (started at start-up), so
    /// that a first call which follows at once runs as quickly as later ones
    /// rather than waiting for the probe behind the client's back.
    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, ErrorData> {
        context.peer.set_peer_info(request.clone());
        self.has(Language::Python).await;
        self.negotiate_initialize(&request)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let mut tools = Vec::new();
        for language in Language::ALL {
            if self.has(language).await {
                tools.push(language.tool());
            }
        }
        Ok(ListToolsResult::with_all_items(tools))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        Language::from_tool(name).map(Language::tool)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let Some(language) = Language::from_tool(&request.name) else {
            return Ok(failure(format!("Unknown tool: {}", request.name)).into());
        };
        let arguments = serde_json::Value::Object(request.arguments.unwrap_or_default());
        let args: CodeArgs = match serde_json::from_value(arguments) {
            Ok(args) => args,
            Err(e) => return Ok(failure(format!("Invalid arguments for {}: {e}", request.name)).into()),
        };
        let packages = args.packages.unwrap_or_default();
        // Extra calls wait their turn, a bounded number of them; past that
        // they are refused at once rather than pile up.
        let _turn = match &self.inner.calls {
            None => None,
            Some(gate) => tokio::select! {
                turn = gate.enter() => match turn {
                    Ok(turn) => Some(turn),
                    Err(full) => return Ok(failure(full).into()),
                },
                () = context.ct.cancelled() => return Ok(failure("the call was cancelled".to_owned()).into()),
            },
        };
        let stage = Stage::default();
        let reporter = Reporter {
            peer: context.peer.clone(),
            token: context.meta.get_progress_token(),
            interval: self.inner.session.settings.progress_interval,
        };
        let work = reporter.report_while(self.execute(language, &args.code, &packages, &stage), &stage);
        // Dropping the work kills its processes.
        let result = tokio::select! {
            result = work => result,
            () = context.ct.cancelled() => Err("the call was cancelled".to_owned()),
        };
        Ok(match result {
            Ok((result, timing)) => success(&result, &timing),
            Err(message) => failure(message),
        }
        .into())
    }
}

/// At most a number of calls at once, and a bounded queue of others.
struct Gate {
    running: tokio::sync::Semaphore,
    limit: usize,
    waiting: std::sync::atomic::AtomicUsize,
}

impl Gate {
    /// How many calls may wait, per call allowed to run.
    const QUEUE_PER_SLOT: usize = 4;

    fn new(limit: usize) -> Self {
        Gate { running: tokio::sync::Semaphore::new(limit), limit, waiting: Default::default() }
    }

    /// A turn to run; an error naming the limit when the queue is full.
    async fn enter(&self) -> Result<tokio::sync::SemaphorePermit<'_>, String> {
        use std::sync::atomic::Ordering;
        if let Ok(turn) = self.running.try_acquire() {
            return Ok(turn);
        }
        let queue = self.limit * Self::QUEUE_PER_SLOT;
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(format!(
                "Too many calls at once in this session: {} running and {queue} waiting \
                 (EXEC_MAX_CONCURRENT_CALLS={}); try again when one finishes",
                self.limit, self.limit
            ));
        }
        // Counted out however the wait ends, a cancelled call included.
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _waiting = Waiting(&self.waiting);
        Ok(self.running.acquire().await.expect("the semaphore is never closed"))
    }
}

/// How long after start-up the executor looks for its other toolchains and
/// readies the Python venv.
const WARM_LATER: std::time::Duration = std::time::Duration::from_millis(300);

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
    let shim = std::env::current_exe().context("cannot locate the runner binary (for `runner limit`)")?;
    let supervisor = match cgroup::PidsRoot::create() {
        Some(pids) => Supervisor::new(shim, Some(pids)),
        // In the sandbox, what a command left behind is found without a
        // cgroup: every process the executor sees is the session's. It
        // checks that it is the first process below the namespace's init
        // rather than trust the variable alone: outside a sandbox the sweep
        // would reach whatever else runs as this user.
        None if settings.sandboxed && nix::unistd::getppid().as_raw() == 1 => Supervisor::sweeping_when_idle(shim),
        None => {
            if settings.sandboxed {
                warn!(
                    "EXEC_SANDBOXED is set, but this executor is not the first process of a sandbox: it leaves others' processes alone"
                );
            }
            Supervisor::new(shim, None)
        }
    };
    if !supervisor.caps_processes() {
        warn!("EXEC_MAX_PROCESSES cannot be enforced: no writable pids cgroup, and RLIMIT_NPROC does not bind root");
    }
    // The first command finds a shim waiting in its cgroup (see `primed`).
    supervisor.prime(settings.limits.processes);
    let executor = Executor::new(workdir.clone(), settings, supervisor);
    // Find Python while the client is still initializing; the other
    // toolchains and the Python venv for a first install a moment later, so
    // a first call that comes at once does not share the CPU with them (a
    // client listing tools, or a call in another language, finds its
    // toolchain on the spot anyway).
    tokio::spawn({
        let warm = executor.clone();
        async move {
            let python = warm.has(Language::Python).await;
            tokio::time::sleep(WARM_LATER).await;
            for language in Language::ALL.into_iter().filter(|l| *l != Language::Python) {
                let warm = warm.clone();
                tokio::spawn(async move { warm.has(language).await });
            }
            if python {
                warm.prepare_python().await;
            }
        }
    });
    info!(workdir = %workdir.display(), cgroups = executor.supervisor().uses_cgroups(), "code executor ready on stdio");
    let (stdin, stdin_closed) = eof::NotifyEof::new(tokio::io::stdin());
    let service = executor.clone().serve((stdin, tokio::io::stdout())).await.context("MCP handshake failed")?;
    // Closed stdin means "leave": kill what calls are running now, rather
    // than after rmcp's wait for them, which outlasts the runner's grace.
    tokio::spawn({
        let executor = executor.clone();
        async move {
            if stdin_closed.await.is_ok() {
                info!("stdin closed; killing running commands");
                executor.kill_everything();
            }
        }
    });
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
    use futures_util::FutureExt;

    use super::*;

    #[tokio::test]
    async fn calls_past_the_limit_wait_in_a_bounded_queue() {
        let gate = Gate::new(1);
        let first = gate.enter().await.unwrap();
        let mut queued: Vec<_> = (0..Gate::QUEUE_PER_SLOT).map(|_| Box::pin(gate.enter())).collect();
        for call in &mut queued {
            assert!(call.as_mut().now_or_never().is_none(), "waits its turn");
        }
        let refused = gate.enter().now_or_never().expect("refused at once").unwrap_err();
        assert!(refused.contains("EXEC_MAX_CONCURRENT_CALLS=1"), "{refused}");
        // A waiting call that gives up frees its place in the queue.
        drop(queued.pop());
        let mut late = Box::pin(gate.enter());
        assert!(late.as_mut().now_or_never().is_none(), "queued, not refused");
        drop(first);
        let turn = queued[0].as_mut().await.unwrap();
        drop(turn);
    }
}
