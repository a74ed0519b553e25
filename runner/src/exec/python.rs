//! Python: finding the interpreter, the session's virtual environment, and
//! package installs.
//!
//! The interpreter is resolved once (`sys.executable` of the first `python3`
//! on PATH), so later runs skip shims such as pyenv's, which cost tens of
//! milliseconds per start. The session's venv is created on the first call
//! that asks for packages, inside the session directory, so installs never
//! leak into another session. `uv` is used when present, `pip` otherwise.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::env;
use super::process::{self, Groups, Job, Output};

/// A usable Python toolchain.
#[derive(Debug, Clone)]
pub struct Python {
    pub interpreter: PathBuf,
    pub uv: Option<PathBuf>,
}

impl Python {
    /// Looks for `python3` and `uv`; `None` when there is no Python.
    pub async fn discover() -> Option<Python> {
        let shim = process::find_program("python3")?;
        let job = Job {
            program: shim.clone(),
            args: vec!["-c".into(), "import sys; print(sys.executable)".into()],
            cwd: std::env::temp_dir(),
            env: env::for_code(None),
            timeout: Duration::from_secs(20),
            max_output: 4096,
        };
        let out = process::run(&job, &Groups::default()).await.ok()?;
        let resolved = PathBuf::from(out.stdout.trim());
        let interpreter = if out.code == 0 && resolved.is_absolute() { resolved } else { shim };
        tracing::debug!(interpreter = %interpreter.display(), "python found");
        Some(Python { interpreter, uv: process::find_program("uv") })
    }

    /// Where the session's venv lives.
    pub fn venv_dir(workdir: &Path) -> PathBuf {
        workdir.join(".venv")
    }

    /// The interpreter code should run with: the venv's once it exists.
    pub fn runtime(&self, workdir: &Path) -> (PathBuf, Option<PathBuf>) {
        let venv = Self::venv_dir(workdir);
        let python = venv.join("bin").join("python");
        if process::exists(&python) { (python, Some(venv)) } else { (self.interpreter.clone(), None) }
    }

    /// Creates the venv if needed and installs `packages` into it.
    pub async fn install(
        &self,
        workdir: &Path,
        packages: &[String],
        timeout: Duration,
        max_output: usize,
        groups: &Groups,
    ) -> std::io::Result<Output> {
        let venv = Self::venv_dir(workdir);
        let venv_python = venv.join("bin").join("python");
        let deadline = tokio::time::Instant::now() + timeout;
        let job = |program: &Path, args: Vec<OsString>| Job {
            program: program.to_owned(),
            args,
            cwd: workdir.to_owned(),
            env: env::for_install(),
            timeout: deadline.saturating_duration_since(tokio::time::Instant::now()),
            max_output,
        };
        if !process::exists(&venv_python) {
            let create = match &self.uv {
                Some(uv) => {
                    job(uv, os(["venv", "--quiet", "--python"]).chain_path(&self.interpreter).chain_path(&venv))
                }
                // Without pip inside: pip installs from outside with --python, which is much faster.
                None => job(&self.interpreter, os(["-m", "venv", "--without-pip"]).chain_path(&venv)),
            };
            let out = process::run(&create, groups).await?;
            if out.code != 0 || out.timed_out {
                return Ok(out);
            }
        }
        let mut install = match &self.uv {
            Some(uv) => job(uv, os(["pip", "install", "--quiet", "--python"]).chain_path(&venv_python)),
            None => job(
                &self.interpreter,
                os(["-m", "pip", "--disable-pip-version-check", "--python"])
                    .chain_path(&venv_python)
                    .chain(os(["install", "--quiet"])),
            ),
        };
        install.args.push("--".into());
        install.args.extend(packages.iter().map(OsString::from));
        process::run(&install, groups).await
    }
}

fn os<const N: usize>(args: [&str; N]) -> Vec<OsString> {
    args.into_iter().map(OsString::from).collect()
}

trait Chain {
    fn chain_path(self, path: &Path) -> Self;
    fn chain(self, more: Vec<OsString>) -> Self;
}

impl Chain for Vec<OsString> {
    fn chain_path(mut self, path: &Path) -> Self {
        self.push(path.as_os_str().to_owned());
        self
    }
    fn chain(mut self, more: Vec<OsString>) -> Self {
        self.extend(more);
        self
    }
}
