//! The session's private directory, where the MCP server runs and the
//! executor keeps its files.
//!
//! On a dyno it is a new temporary directory. A local runner is handed one
//! by the gateway's spawner (in `RUNNER_SESSION_DIR`), which removes it once
//! the runner has exited however it ended: a runner killed outright cannot
//! clean up after itself, and a session's directory can hold a whole
//! virtualenv.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// A session directory, readable by this user only.
#[derive(Debug)]
pub enum Workdir {
    /// Made here; removed when dropped or closed.
    Own(tempfile::TempDir),
    /// Made by whoever started the runner.
    Given(PathBuf),
}

impl Workdir {
    pub fn open(given: Option<&Path>) -> anyhow::Result<Self> {
        let private = std::fs::Permissions::from_mode(0o700);
        match given {
            Some(path) => {
                // It is removed, with everything in it, when the session ends:
                // never adopt a directory that already holds something.
                if std::fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_some()) {
                    bail!(
                        "the session directory {} is not empty; it must be new or empty, since it is removed when \
                         the session ends",
                        path.display()
                    );
                }
                std::fs::create_dir_all(path)
                    .and_then(|()| std::fs::set_permissions(path, private))
                    .with_context(|| format!("cannot use {} as the session directory", path.display()))?;
                Ok(Self::Given(path.to_owned()))
            }
            None => Ok(Self::Own(
                tempfile::Builder::new()
                    .prefix("dynogate-session-")
                    .permissions(private)
                    .tempdir()
                    .context("cannot create the session directory")?,
            )),
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::Own(dir) => dir.path(),
            Self::Given(path) => path,
        }
    }

    /// Removes the directory and everything in it.
    pub fn remove(self) -> std::io::Result<()> {
        match self {
            Self::Own(dir) => dir.close(),
            Self::Given(path) => match std::fs::remove_dir_all(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_are_private_and_removed() {
        let own = Workdir::open(None).unwrap();
        let path = own.path().to_owned();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o700);
        own.remove().unwrap();
        assert!(!path.exists());

        let parent = tempfile::tempdir().unwrap();
        let given = parent.path().join("session");
        let dir = Workdir::open(Some(&given)).unwrap();
        std::fs::write(given.join("file"), "x").unwrap();
        assert_eq!(std::fs::metadata(&given).unwrap().permissions().mode() & 0o777, 0o700);
        dir.remove().unwrap();
        assert!(!given.exists());
        // Already gone (the gateway got there first) is fine.
        Workdir::Given(given).remove().unwrap();
    }

    #[test]
    fn a_directory_with_something_in_it_is_never_adopted() {
        let parent = tempfile::tempdir().unwrap();
        std::fs::write(parent.path().join("precious"), "x").unwrap();
        let err = Workdir::open(Some(parent.path())).unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
        assert!(parent.path().join("precious").exists());
    }
}
