//! The environments the executor gives to code and to package installers.
//!
//! Both are built from an allowlist, never by copying the executor's own
//! environment: code must not see the runner's token, the gateway's API keys,
//! `REDIS_URL`, or any other config var. Installers additionally get their
//! own tool's settings (`PIP_*`, `UV_*`, `npm_config_*`, `GOPROXY`, …),
//! proxies and CA bundles, so that mirrors and corporate proxies keep working.
//! Both keep what an interpreter installed by a buildpack needs to start
//! ([`RUNTIME_PATHS`]): Heroku's Python is a shared library found through
//! `LD_LIBRARY_PATH`, and cannot start without it.

use std::ffi::{OsStr, OsString};
use std::path::Path;

use super::tools::Language;

/// Variables code may see, when the executor has them.
const CODE_ALLOWLIST: &[&str] =
    &["PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM", "USER", "LOGNAME", "TMPDIR"];

/// Where a buildpack's runtime finds itself: set by its `.profile.d` script
/// on a dyno, passed to code and installers when the executor has them.
/// `LIBRARY_PATH` lets native builds link against that runtime.
pub const RUNTIME_PATHS: &[&str] =
    &["LD_LIBRARY_PATH", "LIBRARY_PATH", "PYTHONHOME", "GEM_PATH", "NODE_HOME", "GOROOT"];

/// Names every installer may also see.
const INSTALL_EXTRA: &[&str] = &[
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "XDG_CACHE_HOME",
];

/// Prefixes and names of one installer's own settings.
fn installer_settings(language: Language) -> (&'static [&'static str], &'static [&'static str]) {
    match language {
        Language::Python => (&["PIP_", "UV_"], &[]),
        Language::Node => (&["npm_config_", "NPM_CONFIG_"], &["NODE_EXTRA_CA_CERTS"]),
        Language::Ruby => (&[], &["GEMRC"]),
        // Not a `GO` prefix: it would also match names like GOOGLE_API_KEY.
        Language::Go => (
            &[],
            &[
                "GOPROXY",
                "GOSUMDB",
                "GONOSUMDB",
                "GONOPROXY",
                "GOPRIVATE",
                "GOINSECURE",
                "GOFLAGS",
                "GOAMD64",
                "GOEXPERIMENT",
                "CGO_ENABLED",
            ],
        ),
    }
}

/// Whether the runner passes `name` on to the MCP server it starts: what
/// code may see, what any installer may see, the executor's own settings
/// (`EXEC_*`), its log filter, and what a buildpack's runtime needs to start.
pub fn passes_to_server(name: &str) -> bool {
    CODE_ALLOWLIST.contains(&name)
        || RUNTIME_PATHS.contains(&name)
        || INSTALL_EXTRA.contains(&name)
        || name == "RUST_LOG"
        || name.starts_with("EXEC_")
        || Language::ALL.into_iter().any(|language| {
            let (prefixes, names) = installer_settings(language);
            prefixes.iter().any(|p| name.starts_with(p)) || names.contains(&name)
        })
}

/// An environment under construction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env(Vec<(String, OsString)>);

impl Env {
    /// What code sees: the allowlisted variables the executor has.
    pub fn for_code() -> Env {
        Env::for_code_from(|name| std::env::var_os(name))
    }

    /// [`Env::for_code`] from any source of variables.
    fn for_code_from(get: impl Fn(&str) -> Option<OsString>) -> Env {
        let names = CODE_ALLOWLIST.iter().chain(RUNTIME_PATHS);
        Env(names.filter_map(|name| Some(((*name).to_owned(), get(name)?))).collect())
    }

    /// What `language`'s installer (or compiler) sees.
    pub fn for_install(language: Language) -> Env {
        let mut env = Env::for_code();
        let (prefixes, names) = installer_settings(language);
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str() else { continue };
            if prefixes.iter().any(|p| name.starts_with(p)) || names.contains(&name) || INSTALL_EXTRA.contains(&name) {
                env = env.set(name, value);
            }
        }
        env
    }

    pub fn get(&self, name: &str) -> Option<&OsStr> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_os_str())
    }

    /// Sets a variable, replacing any value it had.
    pub fn set(mut self, name: &str, value: impl Into<OsString>) -> Env {
        self.0.retain(|(k, _)| k != name);
        self.0.push((name.to_owned(), value.into()));
        self
    }

    /// Sets a variable unless the operator already set it.
    pub fn set_default(self, name: &str, value: impl Into<OsString>) -> Env {
        if self.get(name).is_some() { self } else { self.set(name, value) }
    }

    /// Puts `dir` first on PATH.
    pub fn prepend_path(self, dir: &Path) -> Env {
        let mut path = dir.as_os_str().to_owned();
        if let Some(rest) = self.get("PATH").filter(|rest| !rest.is_empty()) {
            path.push(":");
            path.push(rest);
        }
        self.set("PATH", path)
    }

    pub fn into_vec(self) -> Vec<(String, OsString)> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_sees_only_allowlisted_names_and_its_own_dirs_first() {
        let env = Env::for_code().prepend_path(Path::new("/s/.venv/bin")).set("VIRTUAL_ENV", "/s/.venv");
        for (name, _) in env.0.iter() {
            let name = name.as_str();
            assert!(CODE_ALLOWLIST.contains(&name) || RUNTIME_PATHS.contains(&name) || name == "VIRTUAL_ENV", "{name}");
        }
        assert!(env.get("PATH").unwrap().to_string_lossy().starts_with("/s/.venv/bin"));
    }

    #[test]
    fn a_buildpacks_runtime_paths_reach_code_and_secrets_do_not() {
        let given = |name: &str| match name {
            "LD_LIBRARY_PATH" => Some(OsString::from("/app/.heroku/python/lib")),
            "PYTHONHOME" => Some(OsString::from("/app/.heroku/python")),
            "API_KEY" | "DATABASE_URL" => Some(OsString::from("secret")),
            _ => None,
        };
        let env = Env::for_code_from(given);
        assert_eq!(env.get("LD_LIBRARY_PATH").unwrap(), "/app/.heroku/python/lib");
        assert_eq!(env.get("PYTHONHOME").unwrap(), "/app/.heroku/python");
        assert!(env.get("API_KEY").is_none() && env.get("DATABASE_URL").is_none());
        assert!(passes_to_server("LD_LIBRARY_PATH") && passes_to_server("GEM_PATH"));
    }

    #[test]
    fn installers_never_see_secrets() {
        for language in Language::ALL {
            for (name, _) in Env::for_install(language).into_vec() {
                assert!(!dynogate_shared::names::SECRET_ENV.contains(&name.as_str()), "{name}");
            }
        }
    }

    #[test]
    fn defaults_yield_to_what_is_set() {
        let env = Env::default().set("A", "1").set_default("A", "2").set_default("B", "3");
        assert_eq!(env.get("A").unwrap(), "1");
        assert_eq!(env.get("B").unwrap(), "3");
        assert_eq!(env.set("A", "4").get("A").unwrap(), "4");
    }
}
