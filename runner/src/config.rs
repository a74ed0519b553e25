//! The runner's command line and environment, validated into typed values.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args as ClapArgs, Parser, Subcommand};
use dynogate_shared::Secret;
use dynogate_shared::names::TOKEN_ENV;
use url::Url;

use crate::exec::limits::Limits;

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
    /// Set resource limits on this process, then become PROGRAM (the code
    /// executor runs every command through this).
    #[command(hide = true)]
    Limit(LimitArgs),
    /// Check what would confine a session on this machine; print it in one
    /// line, or fail saying why nothing would.
    SandboxCheck,
    /// Make sure this machine's sessions have `uv`: find it, or install it
    /// once into EXEC_TOOLS_DIR; print where it is.
    ObtainUv(ExecArgs),
}

/// Dialing back to a gateway and bridging a stdio MCP server.
#[derive(Debug, ClapArgs)]
pub struct DialArgs {
    /// Started by the gateway's local spawner on the same machine.
    #[arg(long)]
    pub local: bool,

    /// With `--local`: keep running when the gateway that started it exits
    /// and dial again like a dyno would (its session is taken over by
    /// another gateway instance sharing Redis).
    #[arg(long)]
    pub outlive_gateway: bool,

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

    /// The session's directory (made private, removed at the end); default:
    /// a new temporary directory. The local spawner sets it.
    #[arg(long, env = "RUNNER_SESSION_DIR")]
    pub session_dir: Option<PathBuf>,

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

    /// Comma-separated names of variables, beyond the built-in allowlist,
    /// that the MCP server may see (a server that needs its own API key).
    #[arg(long, env = "SERVER_ENV", value_delimiter = ',')]
    pub server_env: Vec<String>,

    #[command(flatten)]
    pub sandbox: SandboxArgs,

    /// The MCP server to bridge, as a program and its arguments (after `--`).
    #[arg(last = true)]
    pub argv: Vec<String>,
}

/// How a local runner confines its session (see [`crate::sandbox`]).
#[derive(Debug, ClapArgs)]
pub struct SandboxArgs {
    /// `auto`: confine with bubblewrap where it works, else run unconfined
    /// and say so; `bwrap`: confine or refuse the session; `off`. Default:
    /// `auto` for a local runner, `off` on a dyno (the dyno is the machine).
    #[arg(long = "sandbox", env = "SANDBOX", value_parser = str::parse::<crate::sandbox::Mode>)]
    pub mode: Option<crate::sandbox::Mode>,

    /// Whether sandboxed code may use the network (installs need it).
    #[arg(long = "sandbox-network", env = "SANDBOX_NETWORK", default_value = "on", value_parser = on_off)]
    pub network: bool,

    /// Memory of all of a session's processes and files together; 0 for no limit.
    #[arg(long, env = "SESSION_MAX_MEMORY", default_value = "2GiB", value_parser = crate::size::parse)]
    pub session_max_memory: u64,

    /// Processes and threads of a session at once; 0 for no limit.
    #[arg(long, env = "SESSION_MAX_PROCESSES", default_value_t = 512)]
    pub session_max_processes: u64,

    /// CPU cores' worth of time a session may use; 0 for no limit.
    #[arg(long, env = "SESSION_MAX_CPUS", default_value_t = 1.0)]
    pub session_max_cpus: f64,

    /// Paths (colon-separated) a sandboxed MCP server may also see,
    /// read-only: files a custom server needs beyond its program.
    #[arg(long = "sandbox-bind", env = "SANDBOX_BIND", value_delimiter = ':')]
    pub bind: Vec<PathBuf>,

    /// Bytes a sandboxed session may write (its directory and its `/tmp`,
    /// each); 0 for no limit.
    #[arg(long, env = "SESSION_MAX_DISK", default_value = "1GiB", value_parser = crate::size::parse)]
    pub session_max_disk: u64,
}

impl SandboxArgs {
    pub fn validate(self, local: bool) -> anyhow::Result<crate::sandbox::Settings> {
        use crate::sandbox::Mode;
        if !self.session_max_cpus.is_finite() || self.session_max_cpus < 0.0 {
            bail!("SESSION_MAX_CPUS must be a number of cores, 0 for no limit");
        }
        let nonzero = |n: u64| (n > 0).then_some(n);
        Ok(crate::sandbox::Settings {
            mode: self.mode.unwrap_or(if local { Mode::Auto } else { Mode::Off }),
            network: self.network,
            disk: nonzero(self.session_max_disk),
            bind: self.bind.into_iter().filter(|p| !p.as_os_str().is_empty()).collect(),
            limits: crate::sandbox::cgroups::SessionLimits {
                processes: nonzero(self.session_max_processes),
                memory: nonzero(self.session_max_memory),
                cpus: (self.session_max_cpus > 0.0).then_some(self.session_max_cpus),
            },
        })
    }
}

/// `on`/`off` (and the usual synonyms) as a flag's value.
fn on_off(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        other => Err(format!("expected on or off, not {other:?}")),
    }
}

/// Everything the bridge needs, checked.
#[derive(Debug, Clone)]
pub struct Dial {
    /// Ends with the gateway process that started it (`--local`, unless
    /// `--outlive-gateway`).
    pub local: bool,
    pub rendezvous: Url,
    /// Where the session's directory goes, when the spawner chose.
    pub session_dir: Option<PathBuf>,
    pub session: String,
    pub token: Secret,
    pub server: ServerCommand,
    pub stop_grace: Duration,
    pub heartbeat: Duration,
    pub reconnect_window: Duration,
    pub sandbox: crate::sandbox::Settings,
    pub server_env: Vec<String>,
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
        let sandbox = self.sandbox.validate(self.local)?;
        Ok(Dial {
            sandbox,
            server_env: self.server_env.into_iter().map(|n| n.trim().to_owned()).filter(|n| !n.is_empty()).collect(),
            local: self.local && !self.outlive_gateway,
            rendezvous: rendezvous_url(&gateway, &session)?,
            session_dir: self.session_dir,
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

    /// Longest a package install (or a Go build) may take.
    #[arg(long, env = "EXEC_INSTALL_TIMEOUT", default_value = "120s", value_parser = dynogate_shared::duration::parse)]
    pub install_timeout: Duration,

    /// Most bytes kept of each of stdout and stderr.
    #[arg(long, env = "EXEC_MAX_OUTPUT_BYTES", default_value = "1MiB", value_parser = crate::size::parse)]
    pub max_output_bytes: u64,

    /// Most memory each process may allocate (RLIMIT_DATA); 0 for no limit.
    #[arg(long, env = "EXEC_MAX_MEMORY", default_value = "1GiB", value_parser = crate::size::parse)]
    pub max_memory: u64,

    /// Most CPU time each process of a snippet may use (RLIMIT_CPU); 0 for no limit.
    #[arg(long, env = "EXEC_MAX_CPU", default_value = "60s", value_parser = dynogate_shared::duration::parse)]
    pub max_cpu: Duration,

    /// Most processes and threads one command may have at once; 0 for no limit.
    #[arg(long, env = "EXEC_MAX_PROCESSES", default_value_t = 256)]
    pub max_processes: u64,

    /// Largest file a snippet may write (RLIMIT_FSIZE); 0 for no limit.
    #[arg(long, env = "EXEC_MAX_FILE_SIZE", default_value = "1GiB", value_parser = crate::size::parse)]
    pub max_file_size: u64,

    /// Calls of one session running at once; more wait (up to four times as
    /// many), then are refused; 0 for no limit.
    #[arg(long, env = "EXEC_MAX_CONCURRENT_CALLS", default_value_t = 4)]
    pub max_concurrent_calls: usize,

    /// How often a call that carries a progress token hears that work goes on.
    #[arg(long, env = "EXEC_PROGRESS_INTERVAL", default_value = "10s", value_parser = dynogate_shared::duration::parse)]
    pub progress_interval: Duration,

    /// Download caches shared by every session on this machine (default:
    /// `$XDG_CACHE_HOME/dynogate-exec` or `~/.cache/dynogate-exec`).
    #[arg(long, env = "EXEC_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Accept paths, URLs and VCS references in `packages`, not only names.
    #[arg(long, env = "EXEC_ALLOW_PACKAGE_SOURCES", default_value_t = false)]
    pub allow_package_sources: bool,

    /// Tools the executor obtained itself (uv), shared by every session on
    /// this machine (default: `tools/` in the cache directory).
    #[arg(long, env = "EXEC_TOOLS_DIR")]
    pub tools_dir: Option<PathBuf>,

    /// With no `uv` on PATH, install it once from the package index into
    /// EXEC_TOOLS_DIR (false: install Python packages with pip).
    #[arg(long, env = "EXEC_OBTAIN_UV", default_value_t = true, action = clap::ArgAction::Set)]
    pub obtain_uv: bool,

    /// Every process this executor can see belongs to its session (set by
    /// the runner's sandbox, whose PID namespace it runs in; heeded only
    /// when the executor's parent is that namespace's init). Without a
    /// cgroup per command, it then ends every other process it sees
    /// whenever no command is running, as a cgroup per command would.
    #[arg(long, env = "EXEC_SANDBOXED", default_value_t = false, action = clap::ArgAction::Set)]
    pub sandboxed: bool,
}

/// The executor's checked settings.
#[derive(Debug, Clone)]
pub struct Exec {
    pub workdir: Option<PathBuf>,
    pub run_timeout: Duration,
    pub install_timeout: Duration,
    pub max_output_bytes: usize,
    /// Limits on snippets (and the builds that compile them).
    pub limits: Limits,
    pub progress_interval: Duration,
    pub max_concurrent_calls: Option<usize>,
    pub cache_dir: PathBuf,
    pub allow_package_sources: bool,
    pub tools_dir: PathBuf,
    pub obtain_uv: bool,
    pub sandboxed: bool,
}

impl ExecArgs {
    pub fn validate(self) -> anyhow::Result<Exec> {
        if self.run_timeout.is_zero() || self.install_timeout.is_zero() {
            bail!("EXEC_RUN_TIMEOUT and EXEC_INSTALL_TIMEOUT must be greater than zero");
        }
        if self.progress_interval < Duration::from_millis(10) {
            bail!("EXEC_PROGRESS_INTERVAL must be at least 10ms");
        }
        let nonzero = |n: u64| (n > 0).then_some(n);
        let cpu = self.max_cpu.as_secs() + u64::from(self.max_cpu.subsec_nanos() > 0);
        let cache_dir = self.cache_dir.unwrap_or_else(default_cache_dir);
        Ok(Exec {
            workdir: self.workdir,
            run_timeout: self.run_timeout,
            install_timeout: self.install_timeout,
            max_output_bytes: usize::try_from(self.max_output_bytes).unwrap_or(usize::MAX).max(1024),
            limits: Limits {
                memory: nonzero(self.max_memory),
                cpu_seconds: nonzero(cpu),
                processes: nonzero(self.max_processes),
                file_size: nonzero(self.max_file_size),
            },
            progress_interval: self.progress_interval,
            max_concurrent_calls: (self.max_concurrent_calls > 0).then_some(self.max_concurrent_calls),
            tools_dir: self.tools_dir.unwrap_or_else(|| tools_dir_in(&cache_dir)),
            cache_dir,
            allow_package_sources: self.allow_package_sources,
            obtain_uv: self.obtain_uv,
            sandboxed: self.sandboxed,
        })
    }
}

/// Where the executor keeps the tools it obtained, in a cache directory.
pub fn tools_dir_in(cache_dir: &std::path::Path) -> PathBuf {
    cache_dir.join("tools")
}

/// The machine's tools directory as `runner exec` would find it from this
/// process's environment (`EXEC_TOOLS_DIR`, else `tools/` in
/// `EXEC_CACHE_DIR` or the default cache): what a sandbox shows its session.
pub fn machine_tools_dir() -> PathBuf {
    let set = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    set("EXEC_TOOLS_DIR").unwrap_or_else(|| tools_dir_in(&set("EXEC_CACHE_DIR").unwrap_or_else(default_cache_dir)))
}

/// Where shared download caches live unless `EXEC_CACHE_DIR` says otherwise.
pub fn default_cache_dir() -> PathBuf {
    let nonempty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(xdg) = nonempty("XDG_CACHE_HOME") {
        return xdg.join("dynogate-exec");
    }
    if let Some(home) = nonempty("HOME") {
        return home.join(".cache").join("dynogate-exec");
    }
    std::env::temp_dir().join("dynogate-exec-cache")
}

/// `runner limit`: resource limits to set before becoming a program.
#[derive(Debug, ClapArgs)]
pub struct LimitArgs {
    /// RLIMIT_DATA, in bytes.
    #[arg(long)]
    pub data: Option<u64>,
    /// RLIMIT_CPU, in seconds.
    #[arg(long)]
    pub cpu: Option<u64>,
    /// RLIMIT_NPROC (counted over all of this user's processes).
    #[arg(long)]
    pub nproc: Option<u64>,
    /// RLIMIT_FSIZE, in bytes.
    #[arg(long)]
    pub fsize: Option<u64>,
    /// A cgroup directory to move into first (repeatable: one per hierarchy).
    #[arg(long)]
    pub cgroup: Vec<PathBuf>,
    /// A directory to give to `--uid`/`--gid` before becoming them (the
    /// sandbox's session directory, made by root).
    #[arg(long)]
    pub chown: Option<PathBuf>,
    /// The user to become (needs root).
    #[arg(long)]
    pub uid: Option<u32>,
    /// The group to become, with no supplementary groups (needs root).
    #[arg(long)]
    pub gid: Option<u32>,
    /// Set `no_new_privs`: no setuid program can give privileges back.
    #[arg(long)]
    pub no_new_privs: bool,
    /// PROGRAM is bubblewrap: give it the sandbox's seccomp filter
    /// (`--seccomp FD`), in a memory file made here.
    #[arg(long)]
    pub seccomp_bwrap: bool,
    /// Join the cgroups, then read the rest of the job (program, arguments,
    /// environment, working directory, limits) from stdin: the executor
    /// starts this ahead of its command (see `exec::primed`).
    #[arg(long, conflicts_with_all = ["argv", "chown", "uid", "gid", "no_new_privs", "seccomp_bwrap"])]
    pub job_from_stdin: bool,
    /// The program and its arguments.
    #[arg(last = true, required_unless_present = "job_from_stdin")]
    pub argv: Vec<OsString>,
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

    #[test]
    fn executor_limits_parse_with_units_and_zero_turns_a_limit_off() {
        let Some(Command::Exec(args)) = Args::try_parse_from([
            "runner",
            "exec",
            "--max-memory",
            "512MiB",
            "--max-cpu",
            "0",
            "--max-processes",
            "64",
            "--max-file-size",
            "0",
            "--max-output-bytes",
            "64KiB",
        ])
        .unwrap()
        .command
        else {
            panic!("not exec")
        };
        let exec = args.validate().unwrap();
        assert_eq!(
            exec.limits,
            Limits { memory: Some(512 << 20), cpu_seconds: None, processes: Some(64), file_size: None }
        );
        assert_eq!(exec.max_output_bytes, 64 << 10);
        assert!(!exec.allow_package_sources);
    }

    #[test]
    fn the_limit_shim_takes_limits_then_a_program() {
        let Some(Command::Limit(limit)) = Args::try_parse_from([
            "runner", "limit", "--data", "5", "--cgroup", "/cg", "--cgroup", "/m", "--uid", "7", "--", "python3", "-c",
            "x",
        ])
        .unwrap()
        .command
        else {
            panic!("not limit")
        };
        assert_eq!((limit.data, limit.cgroup.as_slice()), (Some(5), ["/cg".into(), "/m".into()].as_slice()));
        assert_eq!((limit.uid, limit.gid, limit.no_new_privs), (Some(7), None, false));
        assert_eq!(limit.argv, ["python3", "-c", "x"].map(OsString::from));
        assert!(Args::try_parse_from(["runner", "limit", "--data", "5"]).is_err(), "a program is required");
    }
}
