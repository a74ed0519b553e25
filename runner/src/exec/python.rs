//! Python: finding the interpreter, the session's virtual environment, and
//! package installs.
//!
//! The interpreter is resolved once (`sys.executable` of the first `python3`
//! on PATH), so later runs skip shims such as pyenv's, which cost tens of
//! milliseconds per start. The session's venv is created on the first call
//! that asks for packages, inside the session directory, so installs never
//! leak into another session. `uv` is used when present (it links packages
//! from its machine-wide cache, so a repeated install takes milliseconds),
//! `pip` otherwise (with its own shared cache). Code runs as `python -c`, as
//! in the template.

use std::path::PathBuf;

use tokio::sync::Mutex;

use super::Toolchain;
use super::env::Env;
use super::packages::Spec;
use super::process::{self, Output, Supervisor};
use super::progress::Stage;
use super::session::{Session, os_args};
use super::tools::Language;

/// pip settings and their uv equivalents.
const PIP_TO_UV: [(&str, &str); 3] =
    [("PIP_CERT", "SSL_CERT_FILE"), ("PIP_INDEX_URL", "UV_INDEX_URL"), ("PIP_EXTRA_INDEX_URL", "UV_EXTRA_INDEX_URL")];

/// A usable Python toolchain.
#[derive(Debug)]
pub struct Python {
    interpreter: PathBuf,
    uv: Option<PathBuf>,
    /// Installs into one venv must not overlap.
    lock: Mutex<()>,
}

impl Python {
    /// Looks for `python3` and `uv`; `None` when there is no Python.
    pub async fn discover(supervisor: &Supervisor) -> Option<Python> {
        let shim = process::find_program("python3")?;
        let resolved = Session::probe(supervisor, &shim, &["-c", "import sys; print(sys.executable)"]).await;
        let interpreter = resolved.map(|out| PathBuf::from(out.trim())).filter(|p| p.is_absolute()).unwrap_or(shim);
        let uv = process::find_program("uv");
        tracing::debug!(interpreter = %interpreter.display(), uv = ?uv, "python found");
        Some(Python { interpreter, uv, lock: Mutex::new(()) })
    }

    /// The interpreter code runs with (the venv's once it exists) and the venv.
    fn runtime(&self, session: &Session) -> (PathBuf, Option<PathBuf>) {
        let venv = session.venv();
        let python = venv.join("bin").join("python");
        if process::exists(&python) { (python, Some(venv)) } else { (self.interpreter.clone(), None) }
    }

    fn install_env(session: &Session) -> Env {
        let mut env = Env::for_install(Language::Python)
            .set_default("UV_CACHE_DIR", session.cache("uv"))
            .set_default("PIP_CACHE_DIR", session.cache("pip"))
            // Use the interpreter given, never download one.
            .set_default("UV_PYTHON_DOWNLOADS", "never");
        // uv does not read pip's settings: carry over the ones that say where
        // packages come from and which CA to trust, unless uv's own are set.
        for (pip, uv) in PIP_TO_UV {
            if let Some(value) = env.get(pip).map(ToOwned::to_owned) {
                env = env.set_default(uv, value);
            }
        }
        env
    }
}

impl Toolchain for Python {
    async fn install(&self, session: &Session, specs: &[Spec], _stage: &Stage) -> std::io::Result<Output> {
        let _one_at_a_time = self.lock.lock().await;
        let venv = session.venv();
        let venv_python = venv.join("bin").join("python");
        let deadline = session.install_deadline();
        let env = Self::install_env(session);
        if !process::exists(&venv_python) {
            let (program, args) = match &self.uv {
                Some(uv) => (
                    uv,
                    os_args([
                        "venv".into(),
                        "--quiet".into(),
                        "--python".into(),
                        self.interpreter.clone().into_os_string(),
                        venv.clone().into_os_string(),
                    ]),
                ),
                // Without pip inside: pip installs from outside with --python, which is much faster.
                None => (
                    &self.interpreter,
                    os_args(["-m".into(), "venv".into(), "--without-pip".into(), venv.clone().into_os_string()]),
                ),
            };
            let out = session.run_tool(program, args, session.root(), env.clone(), deadline).await?;
            if out.code != 0 || out.timed_out {
                return Ok(out);
            }
        }
        let (program, mut args) = match &self.uv {
            Some(uv) => (
                uv,
                os_args([
                    "pip".into(),
                    "install".into(),
                    "--quiet".into(),
                    "--python".into(),
                    venv_python.into_os_string(),
                ]),
            ),
            None => (
                &self.interpreter,
                os_args([
                    "-m".into(),
                    "pip".into(),
                    "--disable-pip-version-check".into(),
                    "--python".into(),
                    venv_python.into_os_string(),
                    "install".into(),
                    "--quiet".into(),
                ]),
            ),
        };
        args.push("--".into());
        args.extend(specs.iter().map(|spec| spec.as_str().into()));
        session.run_tool(program, args, session.root(), env, deadline).await
    }

    async fn run(&self, session: &Session, code: &str, _stage: &Stage) -> std::io::Result<Output> {
        let (interpreter, venv) = self.runtime(session);
        let mut env = Env::for_code();
        if let Some(venv) = venv {
            env = env.prepend_path(&venv.join("bin")).set("VIRTUAL_ENV", venv);
        }
        session.run_code(&interpreter, os_args(["-c", code]), env).await
    }
}
