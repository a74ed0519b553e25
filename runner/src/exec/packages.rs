//! Checking package specs before they reach an installer.
//!
//! A spec is a package name with optional extras and version constraints
//! (`requests`, `pandas[excel]>=2,<3`). Anything an installer would read as an
//! option, a path, a URL or a file reference (`--index-url=…`, `-r req.txt`,
//! `./pkg`, `git+https://…`, `pkg @ https://…`) is refused, because it would
//! let a caller point the install somewhere else or read files.

/// Most packages one call may install.
const MAX_PACKAGES: usize = 50;
/// Longest spec accepted.
const MAX_SPEC: usize = 200;

/// Returns a message naming the first spec that is refused.
pub fn validate(specs: &[String]) -> Result<(), String> {
    if specs.len() > MAX_PACKAGES {
        return Err(format!("at most {MAX_PACKAGES} packages per call ({} given)", specs.len()));
    }
    for spec in specs {
        check(spec).map_err(|why| format!("package spec {spec:?} refused: {why}"))?;
    }
    Ok(())
}

fn check(spec: &str) -> Result<(), &'static str> {
    let first = spec.chars().next().ok_or("it is empty")?;
    if spec.len() > MAX_SPEC {
        return Err("it is too long");
    }
    if first == '-' {
        return Err("options are not allowed");
    }
    if !first.is_ascii_alphanumeric() {
        return Err("a package name starts with a letter or digit");
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-[],<>=!~*+".contains(c);
    if let Some(bad) = spec.chars().find(|&c| !allowed(c)) {
        return Err(match bad {
            '/' | '\\' => "paths are not allowed",
            ':' | '@' => "URLs and direct references are not allowed",
            c if c.is_whitespace() => "whitespace is not allowed",
            _ => "it contains a character that is not part of a package name or version",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_extras_and_versions_pass() {
        let ok: Vec<String> =
            ["six", "requests==2.32.3", "pandas[excel]>=2,<3", "a.b_c-d~=1.0", "x!=1.*", "torch==2.0+cpu"]
                .map(String::from)
                .into();
        assert_eq!(validate(&ok), Ok(()));
    }

    #[test]
    fn options_paths_and_urls_are_refused() {
        for bad in [
            "--index-url=https://evil",
            "-r",
            "-e",
            "./local",
            "/etc/passwd",
            "git+https://github.com/x/y",
            "pkg @ https://evil/pkg.whl",
            "pkg@1",
            "a b",
            "",
            "..",
            "six;rm -rf /",
        ] {
            let err = validate(&[bad.to_string()]).unwrap_err();
            assert!(err.contains("refused"), "{bad}: {err}");
        }
    }
}
