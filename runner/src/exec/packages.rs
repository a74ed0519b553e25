//! Checking package specs before they reach an installer.
//!
//! By default a spec must be what the language's registry knows by name:
//! `requests`, `pandas[excel]>=2,<3` (pip); `lodash`, `@types/node@^20`
//! (npm); `rake`, `rake:13.0.6` (gem); `golang.org/x/text@v0.14.0` (Go).
//! Anything an installer would read as an option is always refused (`-r
//! file`, `--index-url=…`, `-e`), because it would let a caller point the
//! install somewhere else or read files. Paths, URLs and VCS references
//! (`./pkg`, `/tmp/x.gem`, `git+https://…`, `github:user/repo`, `pkg @ https://…`)
//! are refused too, unless the operator allows them
//! (`EXEC_ALLOW_PACKAGE_SOURCES=true`).

use super::tools::Language;

/// Most packages one call may install.
const MAX_PACKAGES: usize = 50;
/// Longest spec accepted.
const MAX_SPEC: usize = 1000;

/// An accepted spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// A package from the registry, by name (with an optional version).
    Name(String),
    /// A path, URL or VCS reference, allowed by configuration.
    Source(String),
}

impl Spec {
    pub fn as_str(&self) -> &str {
        match self {
            Spec::Name(s) | Spec::Source(s) => s,
        }
    }
}

/// Checks every spec; the error names the first one refused and why.
pub fn validate(language: Language, specs: &[String], allow_sources: bool) -> Result<Vec<Spec>, String> {
    if specs.len() > MAX_PACKAGES {
        return Err(format!("at most {MAX_PACKAGES} packages per call ({} given)", specs.len()));
    }
    specs
        .iter()
        .map(|spec| check(language, spec, allow_sources).map_err(|why| format!("package spec {spec:?} refused: {why}")))
        .collect()
}

fn check(language: Language, spec: &str, allow_sources: bool) -> Result<Spec, &'static str> {
    let first = spec.chars().next().ok_or("it is empty")?;
    if spec.len() > MAX_SPEC {
        return Err("it is too long");
    }
    if first == '-' {
        return Err("options are not allowed");
    }
    if spec.chars().any(char::is_control) {
        return Err("control characters are not allowed");
    }
    if is_source(language, spec) {
        return if allow_sources {
            Ok(Spec::Source(spec.to_owned()))
        } else {
            Err("paths, URLs and other package sources are not allowed, only package names \
                 (an operator can allow them with EXEC_ALLOW_PACKAGE_SOURCES=true)")
        };
    }
    match language {
        Language::Python => check_pip(spec),
        Language::Node => check_npm(spec),
        Language::Ruby => check_gem(spec),
        Language::Go => check_go(spec),
    }?;
    Ok(Spec::Name(spec.to_owned()))
}

/// Whether the installer would read `spec` as a location rather than a name.
fn is_source(language: Language, spec: &str) -> bool {
    if spec.starts_with(['/', '.', '~', '\\']) || spec.contains("://") {
        return true;
    }
    match language {
        // `pkg @ https://…`, `git+…`, `dir/pkg.whl`.
        Language::Python => spec.contains(['@', '/', '\\', ':']),
        // `github:u/r`, `file:…`, `npm:alias`, `user/repo` (GitHub), `x.tgz`.
        Language::Node => {
            let slashes = spec.matches('/').count();
            spec.contains(':')
                || spec.contains('\\')
                || (slashes > 0 && !spec.starts_with('@'))
                || slashes > 1
                || spec.ends_with(".tgz")
                || spec.ends_with(".tar.gz")
        }
        Language::Ruby => spec.contains(['/', '\\']) || spec.ends_with(".gem"),
        Language::Go => spec.contains('\\'),
    }
}

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "._-".contains(c)
}

fn check_pip(spec: &str) -> Result<(), &'static str> {
    if !spec.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("a package name starts with a letter or digit");
    }
    let allowed = |c: char| name_char(c) || "[],<>=!~*+".contains(c);
    match spec.chars().find(|&c| !allowed(c)) {
        None => Ok(()),
        Some(c) if c.is_whitespace() => Err("whitespace is not allowed"),
        Some(_) => Err("it contains a character that is not part of a package name or version"),
    }
}

fn check_npm(spec: &str) -> Result<(), &'static str> {
    // `@scope/name@range`: the version starts at the first `@` after the name.
    let name_start = usize::from(spec.starts_with('@'));
    let (name, version) = match spec[name_start..].find('@') {
        Some(at) => (&spec[..name_start + at], Some(&spec[name_start + at + 1..])),
        None => (spec, None),
    };
    let bare = match name.strip_prefix('@') {
        Some(scoped) => {
            let (scope, bare) = scoped.split_once('/').ok_or("a scoped name is @scope/name")?;
            if scope.is_empty() || !scope.chars().all(|c| name_char(c) || c == '~') {
                return Err("the scope is not a valid npm scope");
            }
            bare
        }
        None => name,
    };
    if bare.is_empty() || bare.starts_with(['.', '_']) || !bare.chars().all(|c| name_char(c) || c == '~') {
        return Err("it is not a valid npm package name");
    }
    if let Some(version) = version {
        let allowed = |c: char| c.is_ascii_alphanumeric() || ".-+^~<>=|* ".contains(c);
        if version.trim().is_empty() || !version.chars().all(allowed) {
            return Err("the version after @ is not a version, range or tag");
        }
    }
    Ok(())
}

fn check_gem(spec: &str) -> Result<(), &'static str> {
    let (name, version) = match spec.split_once(':') {
        Some((name, version)) => (name, Some(version)),
        None => (spec, None),
    };
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) || !name.chars().all(name_char) {
        return Err("it is not a valid gem name");
    }
    if let Some(version) = version {
        let allowed = |c: char| c.is_ascii_alphanumeric() || ".~<>=! ".contains(c);
        if version.trim().is_empty() || !version.chars().all(allowed) {
            return Err("the version after : is not a version or requirement");
        }
    }
    Ok(())
}

fn check_go(spec: &str) -> Result<(), &'static str> {
    let (path, version) = match spec.split_once('@') {
        Some((path, version)) => (path, Some(version)),
        None => (spec, None),
    };
    let path_char = |c: char| name_char(c) || "~/".contains(c);
    if !path.starts_with(|c: char| c.is_ascii_alphanumeric()) || !path.chars().all(path_char) {
        return Err("it is not a Go module or package path");
    }
    if path.split('/').any(|element| element.is_empty() || element == "." || element == "..") {
        return Err("it is not a Go module or package path");
    }
    if let Some(version) = version {
        let allowed = |c: char| name_char(c) || "+/".contains(c);
        if version.is_empty() || !version.chars().all(allowed) || version.contains("..") {
            return Err("the version after @ is not a version, branch or commit");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(language: Language, specs: &[&str], allow_sources: bool) {
        for spec in specs {
            let result = validate(language, &[spec.to_string()], allow_sources);
            assert!(result.is_ok(), "{language:?} {spec}: {result:?}");
        }
    }

    fn refused(language: Language, specs: &[&str], why: &str) {
        for spec in specs {
            let err = validate(language, &[spec.to_string()], false).unwrap_err();
            assert!(err.contains("refused") && err.contains(why), "{language:?} {spec}: {err}");
        }
    }

    #[test]
    fn registry_names_pass() {
        accepted(
            Language::Python,
            &["six", "requests==2.32.3", "pandas[excel]>=2,<3", "a.b_c-d~=1.0", "x!=1.*", "torch==2.0+cpu"],
            false,
        );
        accepted(
            Language::Node,
            &["lodash", "is-number@7.0.0", "@types/node", "@scope/pkg@^1.2.3", "react@>=16 <18", "x@latest"],
            false,
        );
        accepted(Language::Ruby, &["rake", "rake:13.0.6", "nokogiri:~> 1.15", "net-http_x"], false);
        accepted(
            Language::Go,
            &["golang.org/x/text", "github.com/google/uuid@v1.6.0", "rsc.io/quote/v3@latest", "example.com/m@main"],
            false,
        );
    }

    #[test]
    fn options_are_refused_even_when_sources_are_allowed() {
        for language in Language::ALL {
            for spec in ["--index-url=https://evil", "-r", "-e", "--registry=http://evil", "-v"] {
                let err = validate(language, &[spec.to_string()], true).unwrap_err();
                assert!(err.contains("options are not allowed"), "{language:?} {spec}: {err}");
            }
        }
    }

    #[test]
    fn sources_are_refused_unless_allowed() {
        let sources = [
            (
                Language::Python,
                vec![
                    "./local",
                    "/etc/passwd",
                    "git+https://github.com/x/y",
                    "pkg @ https://e/p.whl",
                    "pkg@1",
                    "dist/x.whl",
                ],
            ),
            (
                Language::Node,
                vec![
                    "./x",
                    "/tmp/x",
                    "file:../x",
                    "github:u/r",
                    "user/repo",
                    "x@npm:evil",
                    "https://e/x.tgz",
                    "x.tgz",
                    "@a/b/c",
                ],
            ),
            (Language::Ruby, vec!["/tmp/greet-0.1.0.gem", "./x", "greet-0.1.0.gem", "dir/x"]),
            (Language::Go, vec!["/tmp/greet", "./greet", "../x", "https://example.com/m"]),
        ];
        for (language, specs) in sources {
            refused(language, &specs, "EXEC_ALLOW_PACKAGE_SOURCES");
            accepted(language, &specs, true);
            let spec = specs[0].to_string();
            assert_eq!(validate(language, std::slice::from_ref(&spec), true).unwrap(), vec![Spec::Source(spec)]);
        }
    }

    #[test]
    fn malformed_names_are_refused() {
        refused(Language::Python, &["a b", "", "six;rm -rf /", "_x"], "refused");
        refused(Language::Node, &["", "_x", ".x", "x@", "a b", "@/x", "x@1;rm"], "refused");
        refused(Language::Ruby, &["", "a b", "x:", "x;y", "x:1;y"], "refused");
        refused(Language::Go, &["", "a//b", "a/../b", "a b", "x@", "x@v1;y", "x@../y"], "refused");
    }

    #[test]
    fn too_many_packages_are_refused() {
        let many = vec!["six".to_string(); MAX_PACKAGES + 1];
        assert!(validate(Language::Python, &many, false).unwrap_err().contains("at most"));
    }
}
