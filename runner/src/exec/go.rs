//! Go: finding the toolchain, the session's module, building and running.
//!
//! `go` is resolved once to `$GOROOT/bin/go`, past version-manager shims. As
//! in the template, code is a whole `package main` written to `main.go` of a
//! module (`go.mod` is written once per session, in `.gomod/`, so modules
//! added by `go get` stay for later calls). The program is built with
//! `go build` (the install timeout and installer limits apply: it is
//! toolchain work, and the machine-wide build cache makes a repeat quick),
//! then the binary runs in the session directory with the run timeout and
//! every limit. Downloads land in the machine-wide module cache.
//!
//! With `EXEC_ALLOW_PACKAGE_SOURCES`, a package may be a local module
//! directory: it is added with a `replace` directive, so no proxy is needed.

use std::path::{Path, PathBuf};

use tokio::sync::Mutex;

use super::Toolchain;
use super::env::Env;
use super::packages::Spec;
use super::process::{self, Output, Supervisor};
use super::progress::Stage;
use super::session::{Session, os_args};
use super::tools::Language;

/// The module name of every session's programs (the template's is `tempmodule`).
const MODULE: &str = "session";

/// A usable Go toolchain.
#[derive(Debug)]
pub struct Go {
    go: PathBuf,
    /// `1.19` for a `go 1.19.8` toolchain: the `go` line of new `go.mod` files.
    language_version: String,
    /// Whether a C compiler is around; without one cgo is turned off, which
    /// Go before 1.20 does not do by itself.
    cgo: bool,
    /// Installs and builds in the session's module must not overlap.
    lock: Mutex<()>,
}

impl Go {
    /// Looks for `go`; `None` when there is no Go toolchain.
    pub async fn discover(supervisor: &Supervisor) -> Option<Go> {
        let found = process::find_program("go")?;
        let probed = Session::probe(supervisor, &found, &["env", "GOROOT", "GOVERSION"]).await?;
        let mut lines = probed.lines();
        let goroot = PathBuf::from(lines.next()?.trim());
        let language_version = language_version(lines.next()?.trim())?;
        let real = goroot.join("bin").join("go");
        let go = if real.is_file() { real } else { found };
        let cgo = process::find_program("gcc").or_else(|| process::find_program("cc")).is_some();
        tracing::debug!(go = %go.display(), %language_version, cgo, "go found");
        Some(Go { go, language_version, cgo, lock: Mutex::new(()) })
    }

    fn env(&self, session: &Session) -> Env {
        let mut flags = std::ffi::OsString::from("-mod=mod");
        if let Some(more) = std::env::var_os("GOFLAGS").filter(|f| !f.is_empty()) {
            flags.push(" ");
            flags.push(more);
        }
        let mut env = Env::for_install(Language::Go)
            .set("GOPATH", session.cache("go-path"))
            .set_default("GOMODCACHE", session.cache("go-mod"))
            .set_default("GOCACHE", session.cache("go-build"))
            .set("GOFLAGS", flags)
            // Never fetch another toolchain (Go 1.21+ would, for a newer `go` line).
            .set("GOTOOLCHAIN", "local")
            .set("GOTELEMETRY", "off");
        if !self.cgo {
            env = env.set_default("CGO_ENABLED", "0");
        }
        if let Some(bin) = self.go.parent() {
            env = env.prepend_path(bin);
        }
        env
    }

    /// Writes the session's `go.mod` if it is not there yet.
    fn prepare_module(&self, session: &Session) -> std::io::Result<PathBuf> {
        let dir = session.go_module();
        std::fs::create_dir_all(&dir)?;
        let manifest = dir.join("go.mod");
        if !process::exists(&manifest) {
            std::fs::write(&manifest, format!("module {MODULE}\n\ngo {}\n", self.language_version))?;
        }
        Ok(dir)
    }
}

impl Toolchain for Go {
    async fn install(&self, session: &Session, specs: &[Spec], _stage: &Stage) -> std::io::Result<Output> {
        let _one_at_a_time = self.lock.lock().await;
        let module = self.prepare_module(session)?;
        let deadline = session.install_deadline();
        let env = self.env(session);
        let mut edits = Vec::new();
        let mut names = Vec::new();
        for spec in specs {
            match spec {
                Spec::Name(name) => names.push(name.clone()),
                Spec::Source(dir) => {
                    let dir = session.root().join(dir);
                    let Some(path) = module_path(&dir) else {
                        let stderr =
                            format!("{} is not a Go module directory (no module line in its go.mod)", dir.display());
                        return Ok(Output { code: 1, stdout: String::new(), stderr, timed_out: false });
                    };
                    edits.push(format!("-replace={path}={}", dir.display()));
                    edits.push(format!("-require={path}@v0.0.0"));
                }
            }
        }
        if !edits.is_empty() {
            let mut args = os_args(["mod", "edit"]);
            args.extend(edits.into_iter().map(Into::into));
            let out = session.run_tool(&self.go, args, &module, env.clone(), deadline).await?;
            if out.code != 0 || out.timed_out {
                return Ok(out);
            }
        }
        if names.is_empty() {
            return Ok(Output::skipped());
        }
        let mut args = os_args(["get", "--"]);
        args.extend(names.into_iter().map(Into::into));
        session.run_tool(&self.go, args, &module, env, deadline).await
    }

    async fn run(&self, session: &Session, code: &str, stage: &Stage) -> std::io::Result<Output> {
        let binary = session.scratch_file("program")?;
        {
            let _one_at_a_time = self.lock.lock().await;
            let module = self.prepare_module(session)?;
            std::fs::write(module.join("main.go"), code)?;
            stage.set("compiling");
            let args = os_args(["build".as_ref(), "-o".as_ref(), binary.path().as_os_str(), ".".as_ref()]);
            let built =
                session.run_tool(&self.go, args, &module, self.env(session), session.install_deadline()).await?;
            if built.code != 0 || built.timed_out {
                return Ok(built);
            }
        }
        stage.set("running");
        session.run_code(binary.path(), Vec::new(), Env::for_code()).await
    }
}

/// `1.19` from `go1.19.8`.
fn language_version(goversion: &str) -> Option<String> {
    let version = goversion.strip_prefix("go")?;
    let mut parts = version.split(|c: char| !c.is_ascii_digit());
    let (major, minor) = (parts.next()?, parts.next()?);
    (!major.is_empty() && !minor.is_empty()).then(|| format!("{major}.{minor}"))
}

/// The module path a module directory declares in its `go.mod`.
fn module_path(dir: &Path) -> Option<String> {
    let manifest = std::fs::read_to_string(dir.join("go.mod")).ok()?;
    manifest.lines().find_map(|line| {
        let path = line.trim().strip_prefix("module")?.trim().trim_matches('"');
        (!path.is_empty()).then(|| path.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn language_versions_come_from_the_toolchain_version() {
        assert_eq!(language_version("go1.19.8").as_deref(), Some("1.19"));
        assert_eq!(language_version("go1.22rc1").as_deref(), Some("1.22"));
        assert_eq!(language_version("go1.21.0").as_deref(), Some("1.21"));
        assert_eq!(language_version("devel"), None);
    }

    #[test]
    fn module_paths_are_read_from_go_mod() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("go.mod"), "// a comment\nmodule example.com/greet\n\ngo 1.19\n").unwrap();
        assert_eq!(module_path(dir.path()).as_deref(), Some("example.com/greet"));
        assert_eq!(module_path(&dir.path().join("missing")), None);
    }
}
