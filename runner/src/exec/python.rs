//! Python: finding the interpreter, the session's virtual environment, and
//! package installs.
//!
//! The interpreter is resolved once (`sys.executable` of the first `python3`
//! on PATH), so later runs skip shims such as pyenv's, which cost tens of
//! milliseconds per start. The session's venv is created on the first call
//! that asks for packages, inside the session directory, so installs never
//! leak into another session. `uv` is used when present (it links packages
//! from its machine-wide cache, so a repeated install takes milliseconds; it
//! tries the cache alone first), and obtained once per machine when it is
//! not ([`super::uv`]); `pip` otherwise (with its own shared cache). Code
//! runs as `python -c`, as in the template.

use std::path::{Path, PathBuf};

use tokio::sync::{Mutex, OnceCell};
use tokio::time::Instant;

use super::Toolchain;
use super::env::Env;
use super::packages::Spec;
use super::process::{self, Output, Supervisor};
use super::progress::Stage;
use super::session::{Session, os_args};
use super::tools::Language;
use super::uv;

/// Written into the venv once something was installed: from then on code
/// runs with the venv's interpreter.
const INSTALLED_MARKER: &str = ".dynogate-installed";

/// pip settings and their uv equivalents.
const PIP_TO_UV: [(&str, &str); 3] =
    [("PIP_CERT", "SSL_CERT_FILE"), ("PIP_INDEX_URL", "UV_INDEX_URL"), ("PIP_EXTRA_INDEX_URL", "UV_EXTRA_INDEX_URL")];

/// A usable Python toolchain.
#[derive(Debug)]
pub struct Python {
    interpreter: PathBuf,
    /// The uv found at start-up.
    uv: Option<PathBuf>,
    /// The uv obtained at the first install, where none was found.
    obtained: OnceCell<Option<PathBuf>>,
    /// Installs into one venv must not overlap.
    lock: Mutex<()>,
}

impl Python {
    /// Looks for `python3` and `uv`; `None` when there is no Python.
    pub async fn discover(supervisor: &Supervisor, tools_dir: &Path) -> Option<Python> {
        let shim = process::find_program("python3")?;
        // Without `site` (-S): the answer is the same, and the start several
        // times quicker where site-packages hold many `.pth` files. The
        // environment is the one code gets, so an interpreter that cannot
        // start there is found out here.
        let resolved = Session::probe(supervisor, &shim, &["-S", "-c", "import sys; print(sys.executable)"]).await?;
        let interpreter = Some(PathBuf::from(resolved.trim())).filter(|p| p.is_absolute()).unwrap_or(shim);
        let uv = uv::find(tools_dir);
        tracing::debug!(interpreter = %interpreter.display(), uv = ?uv, "python found");
        Some(Python { interpreter, uv, obtained: OnceCell::new(), lock: Mutex::new(()) })
    }

    /// The uv installs use: the one found, else one obtained now (once;
    /// when allowed), else none and pip is used.
    async fn uv(&self, session: &Session) -> Option<PathBuf> {
        if let Some(uv) = &self.uv {
            return Some(uv.clone());
        }
        let settings = &session.settings;
        // The gateway may have obtained one into the tools directory since
        // this executor started (a sandboxed one may not obtain its own).
        if let Some(uv) = uv::find(&settings.tools_dir) {
            return Some(uv);
        }
        if !settings.obtain_uv {
            return None;
        }
        let obtained = self.obtained.get_or_init(|| async {
            let deadline = session.install_deadline();
            match uv::obtain(&session.supervisor, &self.interpreter, &settings.tools_dir, deadline).await {
                Ok(uv) => {
                    tracing::info!(uv = %uv.display(), "obtained uv for Python installs");
                    Some(uv)
                }
                Err(e) => {
                    tracing::warn!("no uv, so Python packages install with pip, more slowly: {e:#}");
                    None
                }
            }
        });
        obtained.await.clone()
    }

    /// The interpreter code runs with (the venv's once packages went into it) and the venv.
    fn runtime(&self, session: &Session) -> (PathBuf, Option<PathBuf>) {
        let venv = session.venv();
        if process::exists(&venv.join(INSTALLED_MARKER)) {
            (venv.join("bin").join("python"), Some(venv))
        } else {
            (self.interpreter.clone(), None)
        }
    }

    /// Makes the session's venv ahead of its first install, while the client
    /// is still starting, and has uv look at it once: uv inspects a new
    /// interpreter by starting it, which is most of a first install's time
    /// when the package is already in the machine's cache. Code keeps
    /// running with the machine's interpreter until something is installed.
    pub async fn prepare(&self, session: &Session) {
        let Some(uv) = self.uv.as_deref() else { return };
        let _one_at_a_time = self.lock.lock().await;
        let deadline = session.install_deadline();
        let env = Self::install_env(session);
        match self.create_venv(session, env.clone(), deadline).await {
            Ok(out) if out.code == 0 && !out.timed_out => {}
            _ => return,
        }
        let python = session.venv().join("bin").join("python").into_os_string();
        let args =
            os_args(["pip".into(), "list".into(), "--quiet".into(), "--offline".into(), "--python".into(), python]);
        let _ = session.run_tool(uv, args, session.root(), env, deadline).await;
    }

    /// Creates the session's venv unless it exists.
    async fn create_venv(&self, session: &Session, env: Env, deadline: Instant) -> std::io::Result<Output> {
        let venv = session.venv();
        if process::exists(&venv.join("bin").join("python")) {
            return Ok(Output::skipped());
        }
        let uv = self.uv(session).await;
        let (program, args) = match &uv {
            Some(uv) => (
                uv.as_path(),
                os_args([
                    "venv".into(),
                    "--quiet".into(),
                    "--python".into(),
                    self.interpreter.clone().into_os_string(),
                    venv.into_os_string(),
                ]),
            ),
            // Without pip inside: pip installs from outside with --python, which is much faster.
            None => (
                self.interpreter.as_path(),
                os_args(["-m".into(), "venv".into(), "--without-pip".into(), venv.into_os_string()]),
            ),
        };
        session.run_tool(program, args, session.root(), env, deadline).await
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
        if all_installed(&session.venv(), specs) {
            return Ok(Output::skipped());
        }
        let out = self.install_locked(session, specs).await?;
        if out.code == 0 && !out.timed_out {
            std::fs::write(session.venv().join(INSTALLED_MARKER), "")?;
        }
        Ok(out)
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

impl Python {
    /// Creates the venv if needed and installs into it; the caller holds the lock.
    async fn install_locked(&self, session: &Session, specs: &[Spec]) -> std::io::Result<Output> {
        let venv = session.venv();
        let venv_python = venv.join("bin").join("python");
        let deadline = session.install_deadline();
        let env = Self::install_env(session);
        let created = self.create_venv(session, env.clone(), deadline).await?;
        if created.code != 0 || created.timed_out {
            return Ok(created);
        }
        let packages = || specs.iter().map(|spec| spec.as_str().into());
        let Some(uv) = self.uv(session).await else {
            let mut args = os_args([
                "-m".into(),
                "pip".into(),
                "--disable-pip-version-check".into(),
                "--python".into(),
                venv_python.into_os_string(),
                "install".into(),
                "--quiet".into(),
                "--".into(),
            ]);
            args.extend(packages());
            return session.run_tool(&self.interpreter, args, session.root(), env, deadline).await;
        };
        let install = |offline: bool| {
            let mut args = os_args(["pip", "install", "--quiet"]);
            if offline {
                args.push("--offline".into());
            }
            args.extend(os_args(["--python".into(), venv_python.clone().into_os_string(), "--".into()]));
            args.extend(packages());
            args
        };
        // The machine's cache first: a package some session has installed
        // before then takes milliseconds instead of a round trip to the index
        // (which answers in hundreds). If the cache cannot satisfy the specs,
        // uv says so at once and the normal install follows. So an unpinned
        // name gets the newest version in the cache, as `npm --prefer-offline`.
        let cached = session.run_tool(&uv, install(true), session.root(), env.clone(), deadline).await?;
        if cached.code == 0 || cached.timed_out {
            return Ok(cached);
        }
        session.run_tool(&uv, install(false), session.root(), env, deadline).await
    }
}

/// Whether every spec is a bare name, or a name pinned with `==`, already in
/// the venv, so no installer need run: pip takes most of a second to find
/// out, uv tens of milliseconds. Anything else (ranges, extras) asks the
/// installer.
fn all_installed(venv: &Path, specs: &[Spec]) -> bool {
    let Some(installed) = distributions(venv) else { return false };
    specs.iter().all(|spec| {
        let Spec::Name(spec) = spec else { return false };
        let (name, version) = match spec.split_once("==") {
            Some((name, version)) => (name, Some(version)),
            None => (spec.as_str(), None),
        };
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            || version.is_some_and(|v| !v.chars().all(|c| c.is_ascii_alphanumeric() || "._+!".contains(c)))
        {
            return false;
        }
        let name = normalize(name);
        installed.iter().any(|(n, v)| *n == name && version.is_none_or(|wanted| v == wanted))
    })
}

/// `(normalized name, version)` of each distribution in the venv's
/// site-packages, from its `<name>-<version>.dist-info` directories.
fn distributions(venv: &Path) -> Option<Vec<(String, String)>> {
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    let site = lib
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with("python"))?
        .path()
        .join("site-packages");
    let entries = std::fs::read_dir(site).ok()?;
    Some(
        entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|name| {
                let stem = name.strip_suffix(".dist-info")?;
                // The name part of a dist-info never holds a `-` (it is escaped as `_`).
                let (name, version) = stem.split_once('-')?;
                Some((normalize(name), version.to_owned()))
            })
            .collect(),
    )
}

/// A distribution name as the index compares them: lower case, each run of
/// `-`, `_` and `.` one `-`.
fn normalize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if "-_.".contains(c) {
            if !out.ends_with('-') {
                out.push('-');
            }
        } else {
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn venv_with(dists: &[&str]) -> tempfile::TempDir {
        let venv = tempfile::tempdir().unwrap();
        let site = venv.path().join("lib").join("python3.12").join("site-packages");
        std::fs::create_dir_all(&site).unwrap();
        for dist in dists {
            std::fs::create_dir(site.join(dist)).unwrap();
        }
        venv
    }

    fn names(specs: &[&str]) -> Vec<Spec> {
        specs.iter().map(|s| Spec::Name((*s).to_owned())).collect()
    }

    #[test]
    fn installed_distributions_are_found_by_normalized_name_and_exact_pin() {
        let venv = venv_with(&["six-1.16.0.dist-info", "tomli_w-1.0.0.dist-info", "Jinja2-3.1.4.dist-info", "six"]);
        let has = |specs: &[&str]| all_installed(venv.path(), &names(specs));
        assert!(has(&["six"]));
        assert!(has(&["six==1.16.0", "tomli-w", "TOMLI.W", "jinja2"]));
        assert!(!has(&["six==1.17.0"]), "another version");
        assert!(!has(&["six>=1"]), "a range asks the installer");
        assert!(!has(&["jinja2[i18n]"]), "extras ask the installer");
        assert!(!has(&["six", "numpy"]), "one missing");
        let source = [Spec::Source("./six".into())];
        assert!(!all_installed(venv.path(), &source));
        assert!(!all_installed(Path::new("/nonexistent"), &names(&["six"])));
    }
}
