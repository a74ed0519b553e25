//! Letting `RUNNER_COMMAND` name a Procfile process type.
//!
//! On Heroku an app's stdio MCP servers are declared as Procfile process types
//! (`mcp-python: python -m src.stdio_server`), which is also how Heroku's own
//! MCP registration finds them. When `RUNNER_COMMAND` is just such a name, the
//! runner runs that entry's command, as the platform does for a dyno's command.

use std::path::Path;

/// The command of process type `name` in the Procfile at `procfile`, when
/// `name` is a bare process-type name and the file defines it.
pub fn resolve(name: &str, procfile: &Path) -> Option<String> {
    let name = name.trim();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return None;
    }
    let text = std::fs::read_to_string(procfile).ok()?;
    lookup(&text, name)
}

fn lookup(procfile: &str, name: &str) -> Option<String> {
    procfile.lines().find_map(|line| {
        let (kind, command) = line.split_once(':')?;
        (kind.trim() == name && !line.trim_start().starts_with('#')).then(|| command.trim().to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROCFILE: &str =
        "web: ./target/release/gateway\n# mcp-old: nope\nmcp-python: python -m src.stdio_server --flag=a:b\n";

    #[test]
    fn process_types_resolve_to_their_commands() {
        assert_eq!(lookup(PROCFILE, "mcp-python").as_deref(), Some("python -m src.stdio_server --flag=a:b"));
        assert_eq!(lookup(PROCFILE, "web").as_deref(), Some("./target/release/gateway"));
        assert_eq!(lookup(PROCFILE, "mcp-old"), None);
        assert_eq!(lookup(PROCFILE, "worker"), None);
    }

    #[test]
    fn only_bare_names_are_looked_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("Procfile");
        std::fs::write(&path, PROCFILE).unwrap();
        assert!(resolve("mcp-python", &path).is_some());
        assert_eq!(resolve("python -m x", &path), None);
        assert_eq!(resolve("mcp-python", &dir.path().join("missing")), None);
    }
}
