//! A limits shim started ahead of its command, already in its cgroup.
//!
//! Moving a process into a cgroup (`cgroup.procs`) waits for an RCU grace
//! period in the kernel: about 19 ms on this project's test machines, more
//! than starting Python takes. A command that joined its pids cgroup on its
//! way to exec paid that on every call. So the executor keeps one `runner
//! limit --cgroup DIR --job-from-stdin` started and waiting: it has joined
//! its cgroup already and blocks reading its job. A call hands it the job
//! (program, arguments, environment, working directory, resource limits)
//! over its stdin and it becomes the command at once, with the pipes and
//! process group it was started with; the next one is started right away,
//! so it has joined its own cgroup by the next call.
//!
//! The job crosses the pipe in a small length-prefixed format, written by
//! [`encode`] in the executor and read by [`decode`] in the shim.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use anyhow::{Context, bail};

/// Largest job accepted (code arrives as an argument: `python -c CODE`).
const MAX_JOB_BYTES: usize = 64 * 1024 * 1024;

/// What a waiting shim becomes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PrimedJob {
    pub argv: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    pub cwd: PathBuf,
    /// RLIMIT_DATA, RLIMIT_CPU, RLIMIT_NPROC and RLIMIT_FSIZE, as `runner limit`'s flags.
    pub data: Option<u64>,
    pub cpu: Option<u64>,
    pub nproc: Option<u64>,
    pub fsize: Option<u64>,
}

/// The job as bytes for the shim's stdin.
pub fn encode(job: &PrimedJob) -> Vec<u8> {
    let mut out = Vec::new();
    let bytes = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&u32::try_from(b.len()).expect("jobs are far below 4 GiB").to_le_bytes());
        out.extend_from_slice(b);
    };
    out.extend_from_slice(&u32::try_from(job.argv.len()).expect("few arguments").to_le_bytes());
    for arg in &job.argv {
        bytes(&mut out, arg.as_bytes());
    }
    out.extend_from_slice(&u32::try_from(job.env.len()).expect("few variables").to_le_bytes());
    for (name, value) in &job.env {
        bytes(&mut out, name.as_bytes());
        bytes(&mut out, value.as_bytes());
    }
    bytes(&mut out, job.cwd.as_os_str().as_bytes());
    for limit in [job.data, job.cpu, job.nproc, job.fsize] {
        out.push(u8::from(limit.is_some()));
        out.extend_from_slice(&limit.unwrap_or(0).to_le_bytes());
    }
    out
}

/// Reads a job written by [`encode`].
pub fn decode(mut input: &[u8]) -> anyhow::Result<PrimedJob> {
    if input.len() > MAX_JOB_BYTES {
        bail!("a job of {} bytes is too large", input.len());
    }
    fn take<'a>(input: &mut &'a [u8], n: usize) -> anyhow::Result<&'a [u8]> {
        if input.len() < n {
            bail!("the job ends early");
        }
        let (head, rest) = input.split_at(n);
        *input = rest;
        Ok(head)
    }
    fn number(input: &mut &[u8]) -> anyhow::Result<usize> {
        let raw = take(input, 4)?;
        Ok(u32::from_le_bytes(raw.try_into().expect("four bytes")) as usize)
    }
    fn string(input: &mut &[u8]) -> anyhow::Result<OsString> {
        let n = number(input)?;
        Ok(OsString::from_vec(take(input, n)?.to_vec()))
    }
    let mut job = PrimedJob::default();
    for _ in 0..number(&mut input)? {
        job.argv.push(string(&mut input)?);
    }
    for _ in 0..number(&mut input)? {
        let name = string(&mut input)?;
        job.env.push((name, string(&mut input)?));
    }
    job.cwd = PathBuf::from(string(&mut input)?);
    let mut limits = [None; 4];
    for limit in &mut limits {
        let present = match take(&mut input, 1)?[0] {
            0 => false,
            1 => true,
            other => bail!("a limit marked {other}, neither absent (0) nor present (1)"),
        };
        let value = u64::from_le_bytes(take(&mut input, 8)?.try_into().expect("eight bytes"));
        *limit = present.then_some(value);
    }
    [job.data, job.cpu, job.nproc, job.fsize] = limits;
    if !input.is_empty() {
        bail!("{} bytes after the job", input.len());
    }
    if job.argv.is_empty() {
        bail!("the job names no program");
    }
    Ok(job)
}

/// In the shim: reads the job from stdin to its end, then gives the command
/// an empty stdin, as every command the executor runs has.
pub fn receive() -> anyhow::Result<PrimedJob> {
    use std::io::Read;
    let mut raw = Vec::new();
    std::io::stdin().take(MAX_JOB_BYTES as u64 + 1).read_to_end(&mut raw).context("cannot read the job")?;
    let job = decode(&raw)?;
    let null = std::fs::File::open("/dev/null").context("cannot open /dev/null")?;
    nix::unistd::dup2_stdin(&null).context("cannot give the command an empty stdin")?;
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_crosses_the_pipe_unchanged_and_damage_is_refused() {
        let job = PrimedJob {
            argv: vec!["/usr/bin/python3".into(), "-c".into(), OsString::from_vec(b"print('\xff\n')".to_vec())],
            env: vec![("PATH".into(), "/usr/bin".into()), ("EMPTY".into(), "".into())],
            cwd: "/tmp/session".into(),
            data: Some(1 << 30),
            cpu: None,
            nproc: Some(0),
            fsize: Some(u64::MAX),
        };
        let bytes = encode(&job);
        assert_eq!(decode(&bytes).unwrap(), job);
        assert!(decode(&bytes[..bytes.len() - 1]).unwrap_err().to_string().contains("ends early"));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
        assert!(decode(&encode(&PrimedJob::default())).unwrap_err().to_string().contains("no program"));
    }
}
