//! One session's executor context: where its files live, where the machine's
//! shared caches live, its settings, and the supervisor that runs commands.
//!
//! Layout of the session directory (removed when the session ends):
//! - `.venv/` — Python virtual environment, created on the first install;
//! - `package.json`, `node_modules/` — npm installs;
//! - `.gems/` — the GEM_HOME of gem installs;
//! - `.gomod/` — the Go module that programs are built in (`go.mod`, `main.go`);
//! - `.dynogate/` — scratch files (Ruby scripts, Go binaries), each removed after its call;
//! - anything the code itself writes.
//!
//! Caches shared by every session on the machine (`EXEC_CACHE_DIR`): `uv/`,
//! `pip/`, `npm/`, `gems/`, `gem-specs/`, `go-mod/`, `go-build/`, `go-path/`.
//! They hold downloads and builds, never a session's installed packages.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

use super::env::Env;
use super::process::{Job, Output, Supervisor};
use crate::config::Exec;

/// A session's executor context.
#[derive(Debug)]
pub struct Session {
    root: PathBuf,
    pub settings: Exec,
    pub supervisor: Supervisor,
    scratch: AtomicU64,
}

impl Session {
    pub fn new(root: PathBuf, settings: Exec, supervisor: Supervisor) -> Self {
        Session { root, settings, supervisor, scratch: AtomicU64::new(0) }
    }

    /// The session directory, where code runs.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn venv(&self) -> PathBuf {
        self.root.join(".venv")
    }

    pub fn node_modules(&self) -> PathBuf {
        self.root.join("node_modules")
    }

    pub fn gem_home(&self) -> PathBuf {
        self.root.join(".gems")
    }

    pub fn go_module(&self) -> PathBuf {
        self.root.join(".gomod")
    }

    /// A shared cache directory of this machine.
    pub fn cache(&self, name: &str) -> PathBuf {
        self.settings.cache_dir.join(name)
    }

    /// A fresh path for a scratch file, removed when the returned guard drops.
    pub fn scratch_file(&self, name: &str) -> std::io::Result<Scratch> {
        let dir = self.root.join(".dynogate");
        std::fs::create_dir_all(&dir)?;
        let n = self.scratch.fetch_add(1, Ordering::Relaxed);
        Ok(Scratch(dir.join(format!("{n}-{name}"))))
    }

    pub fn install_deadline(&self) -> Instant {
        Instant::now() + self.settings.install_timeout
    }

    pub fn run_deadline(&self) -> Instant {
        Instant::now() + self.settings.run_timeout
    }

    /// Runs toolchain work (an install, a build): installer limits.
    pub async fn run_tool(
        &self,
        program: &Path,
        args: Vec<OsString>,
        cwd: &Path,
        env: Env,
        deadline: Instant,
    ) -> std::io::Result<Output> {
        let job = Job {
            program: program.to_owned(),
            args,
            cwd: cwd.to_owned(),
            env: env.into_vec(),
            deadline,
            max_output: self.settings.max_output_bytes,
            limits: Some(self.settings.limits.for_install()),
        };
        self.supervisor.run(&job).await
    }

    /// Runs the caller's code in the session directory with every limit.
    pub async fn run_code(&self, program: &Path, args: Vec<OsString>, env: Env) -> std::io::Result<Output> {
        let job = Job {
            program: program.to_owned(),
            args,
            cwd: self.root.clone(),
            env: env.into_vec(),
            deadline: self.run_deadline(),
            max_output: self.settings.max_output_bytes,
            limits: Some(self.settings.limits),
        };
        self.supervisor.run(&job).await
    }

    /// Runs a quick helper of the executor's own (toolchain discovery) and
    /// returns its stdout when it succeeds.
    pub async fn probe(supervisor: &Supervisor, program: &Path, args: &[&str]) -> Option<String> {
        let job = Job {
            program: program.to_owned(),
            args: args.iter().map(OsString::from).collect(),
            cwd: std::env::temp_dir(),
            env: Env::for_code().into_vec(),
            deadline: Instant::now() + std::time::Duration::from_secs(30),
            max_output: 64 * 1024,
            limits: None,
        };
        let out = supervisor.run(&job).await.ok()?;
        if out.code == 0 && !out.timed_out {
            return Some(out.stdout);
        }
        // Present but broken (a buildpack's interpreter without its
        // LD_LIBRARY_PATH, say): say so, since its tool is then not offered.
        let why = out.stderr.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no message");
        tracing::warn!(
            program = %program.display(),
            code = out.code,
            timed_out = out.timed_out,
            "found on PATH but cannot start, so its tool is not offered: {why}"
        );
        None
    }
}

/// A scratch file, removed on drop.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `args` as owned OS strings, for building command lines.
pub fn os_args<I, S>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    args.into_iter().map(Into::into).collect()
}
