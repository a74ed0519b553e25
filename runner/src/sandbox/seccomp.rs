//! The system calls a sandboxed session may not make.
//!
//! bubblewrap applies a classic BPF filter it reads from a file descriptor
//! (`--seccomp FD`); `runner limit --seccomp` builds it here, puts it in a
//! memory file, and hands bubblewrap that descriptor. Every other system
//! call is allowed: the namespaces, the unprivileged user and the dropped
//! capabilities do the confining; the filter takes away kernel interfaces
//! code has no use for and that widen what a kernel bug could expose — the
//! kernel keyrings (shared by every process of one user, and the gateway may
//! be that user), BPF, perf events, userfaultfd, io_uring — and, belt and
//! braces, the calls that need privileges anyway (mounts, modules, kexec,
//! reboot, swap, namespaces by fd). They fail with `ENOSYS`, as on a kernel
//! without them, so runtimes fall back (libuv without io_uring, for one).

use std::collections::BTreeMap;
use std::io::{Seek, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use anyhow::Context;
use nix::libc;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// The denied calls, as `(name, number)`.
pub fn denied() -> Vec<(&'static str, i64)> {
    vec![
        ("keyctl", libc::SYS_keyctl),
        ("add_key", libc::SYS_add_key),
        ("request_key", libc::SYS_request_key),
        ("bpf", libc::SYS_bpf),
        ("perf_event_open", libc::SYS_perf_event_open),
        ("userfaultfd", libc::SYS_userfaultfd),
        ("io_uring_setup", libc::SYS_io_uring_setup),
        ("io_uring_enter", libc::SYS_io_uring_enter),
        ("io_uring_register", libc::SYS_io_uring_register),
        ("kexec_load", libc::SYS_kexec_load),
        ("kexec_file_load", libc::SYS_kexec_file_load),
        ("init_module", libc::SYS_init_module),
        ("finit_module", libc::SYS_finit_module),
        ("delete_module", libc::SYS_delete_module),
        ("mount", libc::SYS_mount),
        ("umount2", libc::SYS_umount2),
        ("pivot_root", libc::SYS_pivot_root),
        ("swapon", libc::SYS_swapon),
        ("swapoff", libc::SYS_swapoff),
        ("reboot", libc::SYS_reboot),
        ("setns", libc::SYS_setns),
        ("open_by_handle_at", libc::SYS_open_by_handle_at),
        ("acct", libc::SYS_acct),
        ("syslog", libc::SYS_syslog),
    ]
}

/// The filter as the kernel takes it: `struct sock_filter`s, native order.
pub fn program() -> anyhow::Result<Vec<u8>> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| anyhow::anyhow!("no seccomp filter for this architecture: {e}"))?;
    let rules = denied().into_iter().map(|(_, number)| (number, Vec::new())).collect::<BTreeMap<_, _>>();
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), arch)
        .map_err(|e| anyhow::anyhow!("cannot build the seccomp filter: {e}"))?;
    let program: BpfProgram =
        filter.try_into().map_err(|e| anyhow::anyhow!("cannot compile the seccomp filter: {e}"))?;
    let mut bytes = Vec::with_capacity(program.len() * 8);
    for instruction in program {
        bytes.extend_from_slice(&instruction.code.to_ne_bytes());
        bytes.push(instruction.jt);
        bytes.push(instruction.jf);
        bytes.extend_from_slice(&instruction.k.to_ne_bytes());
    }
    Ok(bytes)
}

/// The filter in a memory file left open across `exec`, for bubblewrap's
/// `--seccomp`; returns its descriptor number. The descriptor stays open
/// for the life of this process image, which is what `exec` needs.
pub fn descriptor() -> anyhow::Result<i32> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let fd: OwnedFd = memfd_create("dynogate-seccomp", MFdFlags::empty()).context("cannot make a memory file")?;
    let mut file = std::fs::File::from(fd);
    file.write_all(&program()?).context("cannot write the seccomp filter")?;
    file.rewind().context("cannot rewind the seccomp filter")?;
    fcntl(&file, FcntlArg::F_SETFD(FdFlag::empty())).context("cannot keep the seccomp filter across exec")?;
    let number = file.as_raw_fd();
    // Left open on purpose: bubblewrap reads it after `exec`.
    std::mem::forget(file);
    Ok(number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_to_whole_instructions() {
        let bytes = program().unwrap();
        assert!(!bytes.is_empty() && bytes.len().is_multiple_of(8));
        assert!(denied().iter().any(|(name, _)| *name == "keyctl"));
    }
}
