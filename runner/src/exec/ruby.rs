//! Ruby: finding the interpreter and `gem`, the session's GEM_HOME, and
//! running scripts.
//!
//! `ruby` is resolved once to its real executable (`RbConfig.ruby`), past
//! rbenv-style shims, and `gem` is that Ruby's own script, run with it. Gems
//! go into the session directory's `.gems` (GEM_HOME), so they never leak
//! into another session; its download cache is a link to the machine-wide
//! one, so a gem fetched once is not fetched again, and gems already
//! installed are skipped (without starting `gem` when asked for by bare name). Code is written to a script file and run with
//! `ruby FILE`, as the template's isolated mode does.

use std::path::{Path, PathBuf};

use tokio::sync::Mutex;

use super::Toolchain;
use super::env::Env;
use super::packages::Spec;
use super::process::{self, Output, Supervisor};
use super::progress::Stage;
use super::session::{Session, os_args};
use super::tools::Language;

/// A usable Ruby toolchain.
#[derive(Debug)]
pub struct Ruby {
    ruby: PathBuf,
    /// The `gem` script of this Ruby.
    gem: Option<PathBuf>,
    /// Installs into one GEM_HOME must not overlap.
    lock: Mutex<()>,
}

impl Ruby {
    /// Looks for `ruby` and its `gem`; `None` when there is no Ruby.
    pub async fn discover(supervisor: &Supervisor) -> Option<Ruby> {
        let found = process::find_program("ruby")?;
        let script = r#"puts RbConfig.ruby; puts File.join(RbConfig::CONFIG["bindir"], "gem")"#;
        let probed = Session::probe(supervisor, &found, &["-e", script]).await?;
        let mut lines = probed.lines().map(PathBuf::from);
        let ruby = lines.next().filter(|p| p.is_absolute() && p.is_file()).unwrap_or(found);
        let gem = lines.next().filter(|p| p.is_file());
        tracing::debug!(ruby = %ruby.display(), gem = ?gem, "ruby found");
        Some(Ruby { ruby, gem, lock: Mutex::new(()) })
    }

    /// Whether every spec is a bare gem name already in GEM_HOME, so `gem`
    /// (which takes about half a second just to start) need not run.
    fn all_installed(home: &Path, specs: &[Spec]) -> bool {
        let Ok(entries) = std::fs::read_dir(home.join("specifications")) else { return false };
        let installed: Vec<String> = entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
        specs.iter().all(|spec| match spec {
            Spec::Name(name) if !name.contains(':') => installed.iter().any(|file| {
                // `<name>-<version>.gemspec`, where a version starts with a digit.
                file.strip_prefix(name.as_str())
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()) && rest.ends_with(".gemspec"))
            }),
            _ => false,
        })
    }

    /// Makes GEM_HOME with its `cache` linked to the shared gem cache.
    fn prepare_gem_home(session: &Session) -> std::io::Result<PathBuf> {
        let home = session.gem_home();
        std::fs::create_dir_all(&home)?;
        let cache = home.join("cache");
        if !process::exists(&cache) {
            let shared = session.cache("gems");
            std::fs::create_dir_all(&shared)?;
            std::os::unix::fs::symlink(&shared, &cache)?;
        }
        Ok(home)
    }
}

impl Toolchain for Ruby {
    async fn install(&self, session: &Session, specs: &[Spec], _stage: &Stage) -> std::io::Result<Output> {
        let Some(gem) = &self.gem else {
            return Ok(Output::not_installed("gem"));
        };
        let _one_at_a_time = self.lock.lock().await;
        let home = Self::prepare_gem_home(session)?;
        if Self::all_installed(&home, specs) {
            return Ok(Output::skipped());
        }
        // `gem` has no `--`; specs never start with `-` (see packages).
        let mut args =
            os_args([gem.as_os_str(), "install".as_ref(), "--no-document".as_ref(), "--conservative".as_ref()]);
        args.extend(specs.iter().map(|spec| spec.as_str().into()));
        let env = Env::for_install(Language::Ruby)
            .set("GEM_HOME", &home)
            .set_default("GEM_SPEC_CACHE", session.cache("gem-specs"))
            .prepend_path(&home.join("bin"));
        session.run_tool(&self.ruby, args, session.root(), env, session.install_deadline()).await
    }

    async fn run(&self, session: &Session, code: &str, _stage: &Stage) -> std::io::Result<Output> {
        let script = session.scratch_file("script.rb")?;
        std::fs::write(script.path(), code)?;
        let home = session.gem_home();
        let env = Env::for_code().set("GEM_HOME", &home).prepend_path(&home.join("bin"));
        session.run_code(&self.ruby, os_args([script.path().as_os_str()]), env).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_gems_are_found_by_bare_name_only() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join("specifications")).unwrap();
        std::fs::write(home.path().join("specifications/rake-13.0.6.gemspec"), "").unwrap();
        std::fs::write(home.path().join("specifications/rake-compiler-1.2.gemspec"), "").unwrap();
        let names = |specs: &[&str]| specs.iter().map(|s| Spec::Name(s.to_string())).collect::<Vec<_>>();
        assert!(Ruby::all_installed(home.path(), &names(&["rake"])));
        assert!(Ruby::all_installed(home.path(), &names(&["rake", "rake-compiler"])));
        assert!(!Ruby::all_installed(home.path(), &names(&["rak"])));
        assert!(!Ruby::all_installed(home.path(), &names(&["rake:13.0.6"])));
        assert!(!Ruby::all_installed(home.path(), &[Spec::Source("/x/rake-13.0.6.gem".into())]));
    }
}
