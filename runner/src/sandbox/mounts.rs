//! The filesystem a sandboxed session sees, as bubblewrap arguments.
//!
//! The machine's root is mounted read-only, so the system and its toolchains
//! work unchanged; then every place where another session, the gateway or a
//! user keeps files is covered by an empty tmpfs: `/tmp` and `/var/tmp` (other
//! sessions' directories), `/run`, `/home`, `/root`, the runner's `$HOME`,
//! `$TMPDIR` and working directory (a gateway started from a project
//! directory may keep a `.env` there). What must stay reachable under those
//! is mounted back read-only: each toolchain on `PATH` (a pyenv or nvm tree
//! under a home directory), the runner binary itself, the MCP server's
//! program and whatever the operator lists in `SANDBOX_BIND`. The session
//! directory is a tmpfs of its own whose size is the session's disk quota; it
//! lives and dies with the sandbox's mount namespace, so nothing of it is left
//! on disk even when everything is SIGKILLed. Pure: the caller gathers the
//! inputs.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Directories under a home whose whole tree must not be mounted back for
/// one tool on `PATH`: they hold credentials and configuration too.
const PRIVATE_TREES: &[&str] = &[".cargo", ".local", ".config", ".ssh", ".aws", ".docker", ".kube", ".gnupg", ".npm"];

/// System trees that are never covered, whatever the runner's directories are.
const SYSTEM: &[&str] = &["/", "/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/opt", "/nix", "/snap"];

/// What the plan is made from.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// The session directory: the only writable place that persists across calls.
    pub workdir: PathBuf,
    /// Bytes the session directory (and the private `/tmp`) may hold.
    pub disk: Option<u64>,
    /// This binary, which the sandbox runs (`runner limit`, `runner exec`).
    pub runner_exe: PathBuf,
    /// The runner's `PATH` entries.
    pub path: Vec<PathBuf>,
    /// The runner's `$HOME`, `$TMPDIR` and working directory.
    pub home: Option<PathBuf>,
    pub tmpdir: Option<PathBuf>,
    pub cwd: Option<PathBuf>,
    /// More paths mounted back read-only: the MCP server's program, and
    /// `SANDBOX_BIND`.
    pub extra: Vec<PathBuf>,
}

/// The bubblewrap arguments that build the session's filesystem.
pub fn plan(inputs: &Inputs) -> Vec<OsString> {
    let mut args = Args::default();
    args.push(["--ro-bind", "/", "/"]);
    args.push(["--dev", "/dev", "--proc", "/proc"]);
    let size = inputs.disk.map(|bytes| bytes.to_string());
    for tmp in ["/tmp", "/var/tmp"] {
        args.tmpfs(Path::new(tmp), "1777", size.as_deref());
    }
    let covered = covered(inputs);
    for dir in &covered {
        if dir != Path::new("/tmp") && dir != Path::new("/var/tmp") {
            args.tmpfs(dir, "0755", None);
        }
    }
    for tree in toolchains(&inputs.path, &covered) {
        args.bind_back(&tree);
    }
    args.bind_back(&inputs.runner_exe);
    for path in inputs.extra.iter().filter(|p| p.is_absolute() && !p.starts_with(&inputs.workdir)) {
        args.bind_back(path);
    }
    args.tmpfs(&inputs.workdir, "0700", size.as_deref());
    args.push(["--chdir".into(), inputs.workdir.clone().into_os_string()]);
    args.0
}

/// Directories covered by an empty tmpfs, parents before children.
fn covered(inputs: &Inputs) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = ["/tmp", "/var/tmp", "/run", "/home", "/root"].map(PathBuf::from).into();
    for dir in [&inputs.home, &inputs.tmpdir, &inputs.cwd].into_iter().flatten() {
        let system = SYSTEM.iter().any(|s| Path::new(s) == dir)
            || (dir.starts_with("/usr") || dir.starts_with("/etc") || dir.starts_with("/opt"));
        if dir.is_absolute() && !system && !dirs.iter().any(|d| dir.starts_with(d)) {
            // A directory above ones already covered replaces them.
            dirs.retain(|d| !d.starts_with(dir));
            dirs.push(dir.clone());
        }
    }
    dirs.sort_by_key(|d| d.components().count());
    dirs
}

/// The trees to mount back so each `PATH` entry under a covered directory
/// works: the tool's whole tree when it is one of its own (`~/.pyenv` for
/// `~/.pyenv/shims`, so its versions and libraries come along), else only
/// the entry itself.
fn toolchains(path: &[PathBuf], covered: &[PathBuf]) -> Vec<PathBuf> {
    let mut trees: Vec<PathBuf> = Vec::new();
    for entry in path {
        let Some(cover) = covered.iter().filter(|c| entry.starts_with(c)).max_by_key(|c| c.components().count()) else {
            continue;
        };
        if entry == cover || !entry.is_absolute() {
            continue;
        }
        let below = entry.strip_prefix(cover).expect("starts with it");
        let first = below.components().next().expect("entry is below the covered directory");
        let first_name = first.as_os_str().to_string_lossy();
        // Under /home, the first component is a user's home: look one deeper.
        let (tree_root, name) = if cover == Path::new("/home") {
            let mut parts = below.components();
            let user = parts.next().expect("non-empty");
            match parts.next() {
                Some(next) => (cover.join(user).join(next), next.as_os_str().to_string_lossy().into_owned()),
                None => continue,
            }
        } else {
            (cover.join(first), first_name.into_owned())
        };
        let tree =
            if PRIVATE_TREES.contains(&name.as_str()) || !name.starts_with('.') { entry.clone() } else { tree_root };
        if !trees.iter().any(|t| tree.starts_with(t)) {
            trees.retain(|t| !t.starts_with(&tree));
            trees.push(tree);
        }
    }
    trees
}

#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn push<I: IntoIterator<Item = S>, S: Into<OsString>>(&mut self, items: I) {
        self.0.extend(items.into_iter().map(Into::into));
    }

    /// Mounts `path` read-only at the same place. bubblewrap would make the
    /// missing directories above it in a covering tmpfs private to root, so
    /// they are made first, searchable by everyone.
    fn bind_back(&mut self, path: &Path) {
        if let Some(parent) = path.parent().filter(|p| *p != Path::new("/")) {
            self.push(["--perms".into(), "0755".into(), "--dir".into(), parent.as_os_str().to_owned()]);
        }
        self.push(["--ro-bind".into(), path.as_os_str().to_owned(), path.as_os_str().to_owned()]);
    }

    fn tmpfs(&mut self, dir: &Path, perms: &str, size: Option<&str>) {
        self.push(["--perms", perms]);
        if let Some(size) = size {
            self.push(["--size", size]);
        }
        self.push(["--tmpfs".into(), dir.as_os_str().to_owned()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Inputs {
        Inputs {
            workdir: "/tmp/dynogate-session-abc".into(),
            disk: Some(1024),
            runner_exe: "/work/app/target/debug/runner".into(),
            path: [
                "/root/.pyenv/shims",
                "/root/.cargo/bin",
                "/usr/local/bin",
                "/usr/bin",
                "/home/me/.nvm/versions/node/v20/bin",
                "/work/app/tools/bin",
            ]
            .map(PathBuf::from)
            .into(),
            home: Some("/root".into()),
            tmpdir: None,
            cwd: Some("/work/app".into()),
            extra: vec!["/work/app/server.py".into()],
        }
    }

    fn text(args: &[OsString]) -> String {
        args.iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn homes_temp_and_the_working_directory_are_covered() {
        let dirs = covered(&inputs());
        for dir in ["/tmp", "/var/tmp", "/run", "/home", "/root", "/work/app"] {
            assert!(dirs.contains(&PathBuf::from(dir)), "{dir} in {dirs:?}");
        }
        let mut system = inputs();
        system.cwd = Some("/".into());
        system.home = Some("/usr/lib/x".into());
        let dirs = covered(&system);
        assert!(!dirs.iter().any(|d| d == Path::new("/") || d.starts_with("/usr")), "{dirs:?}");
    }

    #[test]
    fn a_directory_above_covered_ones_replaces_them() {
        let mut above = inputs();
        above.cwd = Some("/work".into());
        above.tmpdir = Some("/work/app/tmp".into());
        let dirs = covered(&above);
        assert!(dirs.contains(&PathBuf::from("/work")));
        assert!(!dirs.iter().any(|d| d != Path::new("/work") && d.starts_with("/work")), "{dirs:?}");
    }

    #[test]
    fn toolchains_come_back_whole_unless_their_tree_is_private() {
        let trees = toolchains(&inputs().path, &covered(&inputs()));
        assert_eq!(
            trees,
            [
                "/root/.pyenv",
                "/root/.cargo/bin",
                "/home/me/.nvm",
                // Not a dot-directory: only the entry itself.
                "/work/app/tools/bin",
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn the_session_directory_is_a_sized_tmpfs_mounted_last() {
        let args = plan(&inputs());
        let all = text(&args);
        assert!(all.starts_with("--ro-bind / / --dev /dev --proc /proc"), "{all}");
        assert!(all.contains("--perms 1777 --size 1024 --tmpfs /tmp"), "{all}");
        assert!(
            all.contains(
                "--perms 0755 --dir /work/app/target/debug --ro-bind /work/app/target/debug/runner /work/app/target/debug/runner"
            ),
            "{all}"
        );
        assert!(
            all.ends_with(
                "--perms 0700 --size 1024 --tmpfs /tmp/dynogate-session-abc --chdir /tmp/dynogate-session-abc"
            ),
            "{all}"
        );
        assert!(all.contains("--ro-bind /work/app/server.py /work/app/server.py"), "{all}");
        // Covered before anything is mounted back beneath it.
        let root = all.find("--tmpfs /root").unwrap();
        let pyenv = all.find("--ro-bind /root/.pyenv").unwrap();
        assert!(root < pyenv, "{all}");
    }
}
