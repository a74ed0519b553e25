//! Finding `uv`, and obtaining it once per machine where there is none.
//!
//! uv installs a package that is already in its cache in milliseconds, pip
//! in most of a second, on every call. So where `uv` is not on `PATH` (a
//! laptop, a container), the executor installs it from the package index
//! (PyPI, or the operator's `PIP_INDEX_URL`) into the machine's tools
//! directory (`EXEC_TOOLS_DIR`), once: later sessions find it there. The
//! version is the one `requirements.txt` pins, which is what Heroku dynos
//! get from the Python buildpack. Concurrent executors take turns with a
//! file lock, and the tool appears by a rename only once it works, so a
//! half-made install is never used. Sandboxed sessions see the tools
//! directory read-only; the gateway obtains uv for them at start-up
//! (`runner obtain-uv`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tokio::time::Instant;

use super::env::Env;
use super::process::{self, Job, Supervisor};
use super::tools::Language;

/// The pins of Heroku's Python buildpack, whose `uv` line is the version used here too.
const REQUIREMENTS: &str = include_str!("../../../requirements.txt");

/// The version of uv obtained: the `uv==` pin of `requirements.txt`.
pub fn pinned_version() -> &'static str {
    REQUIREMENTS
        .lines()
        .find_map(|line| line.trim().strip_prefix("uv=="))
        .map(str::trim)
        .expect("requirements.txt pins uv (checked by a test)")
}

/// Where an obtained uv lives in `tools_dir`.
pub fn obtained_path(tools_dir: &Path) -> PathBuf {
    tools_dir.join("uv").join(pinned_version()).join("bin").join("uv")
}

/// The uv to use: the first `uv` on `PATH`, else one obtained earlier into
/// `tools_dir`.
pub fn find(tools_dir: &Path) -> Option<PathBuf> {
    process::find_program("uv").or_else(|| Some(obtained_path(tools_dir)).filter(|uv| is_executable(uv)))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Installs uv into `tools_dir` with `python`'s pip, unless it is there
/// already; returns its path. Bounded by `deadline`.
pub async fn obtain(
    supervisor: &Supervisor,
    python: &Path,
    tools_dir: &Path,
    deadline: Instant,
) -> anyhow::Result<PathBuf> {
    let uv = obtained_path(tools_dir);
    if is_executable(&uv) {
        return Ok(uv);
    }
    let versions = tools_dir.join("uv");
    std::fs::create_dir_all(&versions).with_context(|| format!("cannot create {}", versions.display()))?;
    let lock = versions.join(".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .with_context(|| format!("cannot open {}", lock.display()))?;
    // Another executor may be obtaining it right now: wait for it, then look again.
    let lock = tokio::time::timeout_at(deadline, tokio::task::spawn_blocking(move || lock.lock().map(|()| lock)))
        .await
        .context("timed out waiting for another executor obtaining uv")?
        .context("the lock task failed")?
        .context("cannot lock the uv directory")?;
    if is_executable(&uv) {
        return Ok(uv);
    }
    // Whoever holds the lock is the only one installing: anything partial
    // is left from one that was killed.
    for entry in std::fs::read_dir(&versions).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().contains(".partial-") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let version = pinned_version();
    let partial = versions.join(format!("{version}.partial-{}", std::process::id()));
    let result = install(supervisor, python, &partial, deadline).await;
    let result = match result {
        Ok(()) => {
            let installed = partial.join("bin").join("uv");
            check(supervisor, &installed, deadline).await.and_then(|()| {
                let home = versions.join(version);
                // A broken one left there (its binary gone) would block the rename.
                let _ = std::fs::remove_dir_all(&home);
                std::fs::rename(&partial, &home).with_context(|| format!("cannot move uv into {}", home.display()))
            })
        }
        Err(e) => Err(e),
    };
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    drop(lock);
    result.map(|()| uv)
}

/// `runner obtain-uv`: finds uv, or obtains it into the tools directory;
/// prints where it is.
pub async fn obtain_for_machine(settings: crate::config::Exec) -> anyhow::Result<()> {
    if let Some(uv) = find(&settings.tools_dir) {
        println!("{}", uv.display());
        return Ok(());
    }
    if !settings.obtain_uv {
        println!("no uv on PATH, and EXEC_OBTAIN_UV=false: Python packages install with pip");
        return Ok(());
    }
    let python = process::find_program("python3").context("no python3 on PATH to install uv with")?;
    let deadline = Instant::now() + settings.install_timeout;
    let uv = obtain(&Supervisor::unlimited(), &python, &settings.tools_dir, deadline).await?;
    println!("{}", uv.display());
    Ok(())
}

/// `pip install --target DIR uv==VERSION` (the binary lands in `DIR/bin`),
/// through a throwaway venv when the interpreter has no pip of its own.
async fn install(supervisor: &Supervisor, python: &Path, target: &Path, deadline: Instant) -> anyhow::Result<()> {
    let requirement = format!("uv=={}", pinned_version());
    let pip_args = |python: &Path| -> (PathBuf, Vec<OsString>) {
        let args =
            ["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-script-location", "--target"]
                .into_iter()
                .map(OsString::from)
                .chain([target.as_os_str().to_owned(), OsString::from(&requirement)])
                .collect();
        (python.to_owned(), args)
    };
    let (program, args) = pip_args(python);
    let direct = run(supervisor, program, args, deadline).await?;
    if direct.code == 0 && !direct.timed_out {
        return Ok(());
    }
    if direct.timed_out {
        bail!("installing {requirement} timed out");
    }
    // No pip beside this interpreter: make one in a venv next to the target.
    let mut venv = target.as_os_str().to_owned();
    venv.push(".venv");
    let venv = PathBuf::from(venv);
    let made =
        run(supervisor, python.to_owned(), vec!["-m".into(), "venv".into(), venv.clone().into()], deadline).await;
    let result = async {
        let made = made?;
        if made.code != 0 || made.timed_out {
            bail!(
                "cannot install {requirement}: this Python has no pip ({}) and cannot make a venv ({})",
                last_line(&direct.stderr),
                last_line(&made.stderr)
            );
        }
        let (program, args) = pip_args(&venv.join("bin").join("python"));
        let out = run(supervisor, program, args, deadline).await?;
        if out.code != 0 || out.timed_out {
            bail!("cannot install {requirement}: {}", last_line(&out.stderr));
        }
        Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&venv);
    result
}

/// Runs the new uv once, so only a working one is kept.
async fn check(supervisor: &Supervisor, uv: &Path, deadline: Instant) -> anyhow::Result<()> {
    let out = run(supervisor, uv.to_owned(), vec!["--version".into()], deadline).await?;
    if out.code != 0 || out.timed_out {
        bail!("the installed uv does not run: {}", last_line(&out.stderr));
    }
    Ok(())
}

async fn run(
    supervisor: &Supervisor,
    program: PathBuf,
    args: Vec<OsString>,
    deadline: Instant,
) -> anyhow::Result<process::Output> {
    let job = Job {
        program: program.clone(),
        args,
        cwd: std::env::temp_dir(),
        env: Env::for_install(Language::Python).into_vec(),
        deadline,
        max_output: 64 * 1024,
        limits: None,
    };
    supervisor.run(&job).await.with_context(|| format!("cannot run {}", program.display()))
}

fn last_line(text: &str) -> &str {
    text.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or("no message")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_the_one_requirements_txt_pins() {
        let version = pinned_version();
        assert!(version.split('.').count() == 3 && version.split('.').all(|p| p.parse::<u32>().is_ok()), "{version}");
        assert!(obtained_path(Path::new("/t")).starts_with(format!("/t/uv/{version}")));
    }

    #[tokio::test]
    async fn a_python_that_cannot_install_leaves_nothing_behind() {
        let tools = tempfile::tempdir().unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        let err = obtain(&Supervisor::unlimited(), Path::new("/bin/false"), tools.path(), deadline).await.unwrap_err();
        assert!(format!("{err:#}").contains("cannot install uv=="), "{err:#}");
        let left: Vec<_> = std::fs::read_dir(tools.path().join("uv"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, [".lock"], "no partial install is left");
        assert!(find(tools.path()).is_none_or(|uv| !uv.starts_with(tools.path())));
    }
}
