//! The runner's command line and environment, validated into typed values.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args as ClapArgs, Parser, Subcommand};
use dynogate_shared::Secret;
use dynogate_shared::names::TOKEN_ENV;
use url::Url;

/// dynogate runner: serves one MCP session, or runs the code executor.
#[derive(Debug, Parser)]
#[command(name = "runner", version, about, args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub dial: DialArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the built-in code executor as a stdio MCP server.
    Exec(ExecArgs),
}

/// Dialing back to a gateway and bridging a stdio MCP server.
#[derive(Debug, ClapArgs)]
pub struct DialArgs {
    /// Started by the gateway's local spawner on the same machine.
    #[arg(long)]
    pub local: bool,

    /// Who started this runner; the Heroku spawner's sweeper looks for it
    /// (`--spawned-by dynogate`) to recognise its dynos.
    #[arg(long)]
    pub spawned_by: Option<String>,

    /// Base URL of the gateway (http(s) or ws(s)).
    #[arg(long, env = "GATEWAY_URL")]
    pub gateway_url: Option<Url>,

    /// The MCP session this runner serves.
    #[arg(long, env = "RUNNER_SESSION")]
    pub session: Option<String>,

    /// The stdio MCP server to bridge, as a shell command (default: `runner exec`).
    #[arg(long = "command", env = "RUNNER_COMMAND")]
    pub shell_command: Option<String>,

    /// How long the MCP server gets to exit after its stdin closes before its
    /// process group is killed.
    #[arg(long, env = "RUNNER_STOP_GRACE", default_value = "2s", value_parser = dynogate_shared::duration::parse)]
    pub stop_grace: Duration,

    /// How long to keep dialing a gateway whose socket dropped before giving up
    /// (the gateway waits RUNNER_RECONNECT_GRACE for the runner).
    #[arg(long, env = "RUNNER_RECONNECT_WINDOW", default_value = "90s", value_parser = dynogate_shared::duration::parse)]
    pub reconnect_window: Duration,

    /// Interval of WebSocket pings to the gateway (at most 25s).
    #[arg(long, env = "HEARTBEAT_INTERVAL", default_value = "20s", value_parser = dynogate_shared::duration::parse)]
    pub heartbeat: Duration,

    /// The MCP server to bridge, as a program and its arguments (after `--`).
    #[arg(last = true)]
    pub argv: Vec<String>,
}

/// Everything the bridge needs, checked.
#[derive(Debug, Clone)]
pub struct Dial {
    pub local: bool,
    pub rendezvous: Url,
    pub session: String,
    pub token: Secret,
    pub server: ServerCommand,
    pub stop_grace: Duration,
    pub heartbeat: Duration,
    pub reconnect_window: Duration,
}

/// Which MCP server the runner starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerCommand {
    /// This binary's own `exec` subcommand.
    BuiltIn,
    /// `sh -c <command>`.
    Shell(String),
    /// A program and its arguments.
    Argv(Vec<String>),
}

impl DialArgs {
    pub fn validate(self) -> anyhow::Result<Dial> {
        let gateway = self.gateway_url.context("--gateway-url (GATEWAY_URL) is required")?;
        let session = self.session.context("--session (RUNNER_SESSION) is required")?;
        let token = std::env::var(TOKEN_ENV)
            .ok()
            .filter(|t| !t.is_empty())
            .map(Secret::new)
            .with_context(|| format!("{TOKEN_ENV} must hold the runner's token"))?;
        if self.heartbeat.is_zero() || self.heartbeat > Duration::from_secs(25) {
            bail!("HEARTBEAT_INTERVAL must be between 1ms and 25s");
        }
        let server = if !self.argv.is_empty() {
            ServerCommand::Argv(self.argv)
        } else {
            match self.shell_command.filter(|c| !c.trim().is_empty()) {
                Some(command) => ServerCommand::Shell(command),
                None => ServerCommand::BuiltIn,
            }
        };
        Ok(Dial {
            local: self.local,
            rendezvous: rendezvous_url(&gateway, &session)?,
            session,
            token,
            server,
            stop_grace: self.stop_grace,
            heartbeat: self.heartbeat,
            reconnect_window: self.reconnect_window,
        })
    }
}

/// `ws(s)://host/…/rendezvous?session=…` from the gateway's base URL.
pub fn rendezvous_url(gateway: &Url, session: &str) -> anyhow::Result<Url> {
    let mut url = gateway.clone();
    let scheme = match gateway.scheme() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        other => bail!("GATEWAY_URL must be http(s) or ws(s), not {other}"),
    };
    url.set_scheme(scheme).map_err(|()| anyhow::anyhow!("cannot use {gateway} as a WebSocket URL"))?;
    let path = format!("{}{}", url.path().trim_end_matches('/'), dynogate_shared::names::RENDEZVOUS_PATH);
    url.set_path(&path);
    url.query_pairs_mut().clear().append_pair(dynogate_shared::names::SESSION_QUERY, session);
    Ok(url)
}

/// The code executor's settings.
#[derive(Debug, ClapArgs)]
pub struct ExecArgs {
    /// The session's working directory (default: a new temporary directory,
    /// removed on exit).
    #[arg(long, env = "EXEC_WORKDIR")]
    pub workdir: Option<PathBuf>,

    /// Longest a snippet may run.
    #[arg(long, env = "EXEC_RUN_TIMEOUT", default_value = "30s", value_parser = dynogate_shared::duration::parse)]
    pub run_timeout: Duration,

    /// Longest a package install may take.
    #[arg(long, env = "EXEC_INSTALL_TIMEOUT", default_value = "120s", value_parser = dynogate_shared::duration::parse)]
    pub install_timeout: Duration,

    /// Most bytes kept of each of stdout and stderr.
    #[arg(long, env = "EXEC_MAX_OUTPUT_BYTES", default_value_t = 1024 * 1024)]
    pub max_output_bytes: usize,
}

/// The executor's checked settings.
#[derive(Debug, Clone)]
pub struct Exec {
    pub workdir: Option<PathBuf>,
    pub run_timeout: Duration,
    pub install_timeout: Duration,
    pub max_output_bytes: usize,
}

impl ExecArgs {
    pub fn validate(self) -> anyhow::Result<Exec> {
        if self.run_timeout.is_zero() || self.install_timeout.is_zero() {
            bail!("EXEC_RUN_TIMEOUT and EXEC_INSTALL_TIMEOUT must be greater than zero");
        }
        Ok(Exec {
            workdir: self.workdir,
            run_timeout: self.run_timeout,
            install_timeout: self.install_timeout,
            max_output_bytes: self.max_output_bytes.max(1024),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_urls_follow_the_gateway_scheme_and_path() {
        let cases = [
            ("http://127.0.0.1:8000", "ws://127.0.0.1:8000/rendezvous?session=abc"),
            ("https://app.herokuapp.com/", "wss://app.herokuapp.com/rendezvous?session=abc"),
            ("https://example.com/gw/", "wss://example.com/gw/rendezvous?session=abc"),
            ("ws://h:1/?x=1", "ws://h:1/rendezvous?session=abc"),
        ];
        for (base, want) in cases {
            let url = rendezvous_url(&Url::parse(base).unwrap(), "abc").unwrap();
            assert_eq!(url.as_str(), want, "{base}");
        }
        assert!(rendezvous_url(&Url::parse("ftp://x").unwrap(), "abc").is_err());
    }

    #[test]
    fn the_server_command_comes_from_argv_then_runner_command_then_the_default() {
        let parse = |argv: &[&str]| Args::try_parse_from(argv).unwrap().dial;
        assert!(parse(&["runner", "--", "python3", "-m", "x"]).argv == ["python3", "-m", "x"]);
        assert!(parse(&["runner", "--command", "python3 -m x"]).shell_command.as_deref() == Some("python3 -m x"));
        assert!(matches!(Args::try_parse_from(["runner", "exec"]).unwrap().command, Some(Command::Exec(_))));
    }
}
