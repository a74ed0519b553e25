//! The environments the executor gives to code and to package installers.
//!
//! Both are built from an allowlist, never by copying the executor's own
//! environment: code must not see the runner's token, the gateway's API keys,
//! `REDIS_URL`, or any other config var. Installers additionally get the
//! package tools' own settings (`PIP_*`, `UV_*`, proxies, CA bundles) so that
//! mirrors and corporate proxies keep working.

use std::ffi::OsString;
use std::path::Path;

/// Variables code may see, when the executor has them.
const CODE_ALLOWLIST: &[&str] =
    &["PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM", "USER", "LOGNAME", "TMPDIR"];

/// Prefixes and names an installer may also see.
const INSTALL_PREFIXES: &[&str] = &["PIP_", "UV_"];
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

/// The environment for running code, with `venv` (when present) first on PATH.
pub fn for_code(venv: Option<&Path>) -> Vec<(String, OsString)> {
    let mut env: Vec<(String, OsString)> =
        CODE_ALLOWLIST.iter().filter_map(|name| Some(((*name).to_owned(), std::env::var_os(name)?))).collect();
    if let Some(venv) = venv {
        let bin = venv.join("bin");
        let path = match env.iter().find(|(k, _)| k == "PATH") {
            Some((_, rest)) => {
                let mut joined = bin.into_os_string();
                joined.push(":");
                joined.push(rest);
                joined
            }
            None => bin.into_os_string(),
        };
        env.retain(|(k, _)| k != "PATH");
        env.push(("PATH".into(), path));
        env.push(("VIRTUAL_ENV".into(), venv.as_os_str().to_owned()));
    }
    env
}

/// The environment for package installers.
pub fn for_install() -> Vec<(String, OsString)> {
    let mut env = for_code(None);
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if INSTALL_PREFIXES.iter().any(|p| name.starts_with(p)) || INSTALL_EXTRA.contains(&name) {
            env.push((name.to_owned(), value));
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_sees_only_allowlisted_names_and_the_venv_first() {
        let env = for_code(Some(Path::new("/s/.venv")));
        for (name, _) in &env {
            assert!(CODE_ALLOWLIST.contains(&name.as_str()) || name == "VIRTUAL_ENV", "{name}");
        }
        let path = &env.iter().find(|(k, _)| k == "PATH").unwrap().1;
        assert!(path.to_string_lossy().starts_with("/s/.venv/bin"));
    }

    #[test]
    fn installers_never_see_secrets() {
        for (name, _) in for_install() {
            assert!(!dynogate_shared::names::SECRET_ENV.contains(&name.as_str()), "{name}");
        }
    }
}
