//! Reading a Procfile: `<process type>: <command>` per line.
//!
//! Heroku declares an app's processes there, its stdio MCP servers among
//! them (`mcp-python: python -m src.stdio_server`). The runner resolves a
//! `RUNNER_COMMAND` that names a process type; the gateway lists the `mcp*`
//! types as the servers it offers. Both read the file with this.

/// The process types and their commands, in file order. Comments and lines
/// without a `type:` are skipped; a type must be a plain name.
pub fn entries(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(|line| {
            let (kind, command) = line.split_once(':')?;
            let kind = kind.trim();
            (is_process_type(kind) && !command.trim().is_empty()).then(|| (kind.to_owned(), command.trim().to_owned()))
        })
        .collect()
}

/// The command of process type `name`.
pub fn lookup(text: &str, name: &str) -> Option<String> {
    entries(text).into_iter().find_map(|(kind, command)| (kind == name).then_some(command))
}

/// Whether `name` can be a process type: letters, digits, `-` and `_`.
pub fn is_process_type(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROCFILE: &str = "web: ./target/release/gateway\n# mcp-old: nope\nmcp-python: python -m src.stdio_server --flag=a:b\n\
                            not a type: x\nmcp-empty:\n";

    #[test]
    fn process_types_resolve_to_their_commands() {
        assert_eq!(lookup(PROCFILE, "mcp-python").as_deref(), Some("python -m src.stdio_server --flag=a:b"));
        assert_eq!(lookup(PROCFILE, "web").as_deref(), Some("./target/release/gateway"));
        assert_eq!(lookup(PROCFILE, "mcp-old"), None);
        assert_eq!(lookup(PROCFILE, "worker"), None);
        let kinds: Vec<_> = entries(PROCFILE).into_iter().map(|(kind, _)| kind).collect();
        assert_eq!(kinds, ["web", "mcp-python"]);
    }
}
