//! Node.js: finding `node` and `npm`, the session's `node_modules`, and
//! running code.
//!
//! `node` is resolved once to its real executable (`process.execPath`), past
//! version-manager shims; `npm` is run as `node npm-cli.js` when it is the
//! usual script, so its `#!/usr/bin/env node` line costs nothing. Packages go
//! into the session directory's `node_modules` (recorded in its
//! `package.json`, so later installs keep earlier ones), through npm's
//! machine-wide cache with `--prefer-offline`. Code runs as `node -e`, as in
//! the template, with module-syntax detection so both `require` and `import`
//! work (on a Node too old to detect it, code with an import statement runs
//! as a module).

use std::path::{Path, PathBuf};

use tokio::sync::Mutex;

use super::Toolchain;
use super::env::Env;
use super::packages::Spec;
use super::process::{self, Output, Supervisor};
use super::progress::Stage;
use super::session::{Session, os_args};
use super::tools::Language;

/// The flag that lets `node -e` run ES module syntax on Node 20.10–22.6
/// (later versions do it by default and still accept the flag).
const DETECT_MODULE: &str = "--experimental-detect-module";

/// A usable Node.js toolchain.
#[derive(Debug)]
pub struct Node {
    node: PathBuf,
    /// `npm-cli.js` (run with `node`) or an `npm` executable.
    npm: Option<PathBuf>,
    detect_module: bool,
    /// Installs into one `node_modules` must not overlap.
    lock: Mutex<()>,
}

impl Node {
    /// Looks for `node` and `npm`; `None` when there is no Node.js.
    pub async fn discover(supervisor: &Supervisor) -> Option<Node> {
        let found = process::find_program("node")?;
        let script = format!(
            "console.log(JSON.stringify([process.execPath, process.allowedNodeEnvironmentFlags.has({DETECT_MODULE:?})]))"
        );
        let probed = Session::probe(supervisor, &found, &["-e", &script]).await?;
        let (exec_path, detect_module): (PathBuf, bool) = serde_json::from_str(probed.trim()).ok()?;
        let node = if exec_path.is_absolute() { exec_path } else { found };
        let npm = process::find_program("npm").map(|npm| std::fs::canonicalize(&npm).unwrap_or(npm));
        tracing::debug!(node = %node.display(), npm = ?npm, "node found");
        Some(Node { node, npm, detect_module, lock: Mutex::new(()) })
    }

    /// Whether every spec is a bare name already in `node_modules`, so npm
    /// (which takes most of a second just to start) need not run.
    fn all_installed(session: &Session, specs: &[Spec]) -> bool {
        specs.iter().all(|spec| match spec {
            Spec::Name(name) => {
                let versioned = name.get(1..).is_some_and(|rest| rest.contains('@'));
                !versioned && process::exists(&session.node_modules().join(name).join("package.json"))
            }
            Spec::Source(_) => false,
        })
    }

    fn is_script(npm: &Path) -> bool {
        npm.extension().is_some_and(|ext| ext == "js" || ext == "cjs")
    }
}

impl Toolchain for Node {
    async fn install(&self, session: &Session, specs: &[Spec], _stage: &Stage) -> std::io::Result<Output> {
        let Some(npm) = &self.npm else {
            return Ok(Output::not_installed("npm"));
        };
        let _one_at_a_time = self.lock.lock().await;
        if Self::all_installed(session, specs) {
            return Ok(Output::skipped());
        }
        let manifest = session.root().join("package.json");
        if !process::exists(&manifest) {
            std::fs::write(&manifest, "{\n  \"private\": true\n}\n")?;
        }
        let (program, mut args) = if Self::is_script(npm) {
            (&self.node, os_args([npm.clone().into_os_string()]))
        } else {
            (npm, Vec::new())
        };
        args.extend(os_args([
            "install",
            "--no-audit",
            "--no-fund",
            "--no-package-lock",
            "--no-update-notifier",
            "--prefer-offline",
            "--loglevel=error",
            "--",
        ]));
        args.extend(specs.iter().map(|spec| spec.as_str().into()));
        let node_bin = self.node.parent().unwrap_or(Path::new("/"));
        // Package scripts start `node` by name: make it this one.
        let env = Env::for_install(Language::Node)
            .set_default("npm_config_cache", session.cache("npm"))
            .prepend_path(node_bin);
        session.run_tool(program, args, session.root(), env, session.install_deadline()).await
    }

    async fn run(&self, session: &Session, code: &str, _stage: &Stage) -> std::io::Result<Output> {
        let mut args = Vec::new();
        if self.detect_module {
            args.push(DETECT_MODULE.into());
        } else if looks_like_module(code) {
            // Node before 20.10 cannot detect it; an import statement says enough.
            args.push("--input-type=module".into());
        }
        args.extend(os_args(["-e", code]));
        let env = Env::for_code().prepend_path(&session.node_modules().join(".bin"));
        session.run_code(&self.node, args, env).await
    }
}

/// Whether code has an `import` or `export` statement (not a dynamic `import(…)`).
fn looks_like_module(code: &str) -> bool {
    code.lines().map(str::trim_start).any(|line| {
        ["import ", "import{", "import\"", "import'", "export "].iter().any(|start| line.starts_with(start))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_and_export_statements_mark_a_module() {
        for module in
            ["import fs from 'fs'", "const x = 1;\n  import {a} from 'b'", "import 'side-effect'", "export const x = 1"]
        {
            assert!(looks_like_module(module), "{module}");
        }
        for script in ["const fs = require('fs')", "import('fs').then(console.log)", "// import nothing", "important()"]
        {
            assert!(!looks_like_module(script), "{script}");
        }
    }
}
