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
    if !dynogate_shared::procfile::is_process_type(name) {
        return None;
    }
    let text = std::fs::read_to_string(procfile).ok()?;
    dynogate_shared::procfile::lookup(&text, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROCFILE: &str =
        "web: ./target/release/gateway\n# mcp-old: nope\nmcp-python: python -m src.stdio_server --flag=a:b\n";

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
