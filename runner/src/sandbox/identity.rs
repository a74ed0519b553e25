//! The unprivileged user a session's code runs as when the runner is root.
//!
//! Each session gets a user id of its own, so even outside the sandbox's
//! namespaces two sessions' processes and files belong to different users.
//! The id is chosen from the runner's pid and held with a lock ([`claim`]):
//! pids are unique among live runners but not modulo the range, so a runner
//! whose first choice is held by another live runner takes the next free
//! id. The lock is the kernel's (`flock`), so it goes with the runner
//! however it ends. The id must be mapped in this user namespace (a
//! container may map only 65,536 ids); where the range is not, every
//! session shares `nobody`, and the namespaces alone keep them apart.

use std::fs::File;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

/// Where runners hold their session ids: root's alone, and covered in every
/// sandbox.
pub const CLAIMS_DIR: &str = "/run/dynogate/session-users";

/// First id of the range session users are taken from.
const BASE: u32 = 200_000;
/// How many ids the range holds.
const SPAN: u32 = 60_000;
/// `nobody`, the fallback.
const NOBODY: u32 = 65_534;

/// A user and group id for code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

impl Identity {
    /// The identity for the session of the runner with `pid`, given this
    /// namespace's `/proc/self/uid_map` and `gid_map`.
    pub fn for_runner(pid: u32, uid_map: &str, gid_map: &str) -> Identity {
        let id = BASE + pid % SPAN;
        if maps(uid_map, BASE, SPAN) && maps(gid_map, BASE, SPAN) {
            Identity { uid: id, gid: id }
        } else {
            Identity { uid: NOBODY, gid: NOBODY }
        }
    }
}

/// A session id held by this runner until dropped.
#[derive(Debug)]
pub struct Claim {
    _lock: Flock<File>,
}

/// The identity for the session of the runner with `pid`: the first id from
/// [`Identity::for_runner`]'s choice on that no other live runner holds in
/// `dir`, and the claim that holds it. Without a usable `dir` the first
/// choice, unheld.
pub fn claim(dir: &Path, pid: u32, uid_map: &str, gid_map: &str) -> (Identity, Option<Claim>) {
    let first = Identity::for_runner(pid, uid_map, gid_map);
    if !first.is_own() {
        return (first, None);
    }
    if !private_dir(dir) {
        tracing::warn!(dir = %dir.display(), uid = first.uid, "cannot claim the session's user here; it may be another live session's too");
        return (first, None);
    }
    for step in 0..SPAN {
        let id = BASE + (first.uid - BASE + step) % SPAN;
        let Ok(file) = File::options().create(true).truncate(false).write(true).open(dir.join(id.to_string())) else {
            break;
        };
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return (Identity { uid: id, gid: id }, Some(Claim { _lock: lock })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => continue,
            Err(_) => break,
        }
    }
    tracing::warn!(dir = %dir.display(), uid = first.uid, "cannot claim the session's user here; it may be another live session's too");
    (first, None)
}

/// Makes `dir` (and its parents) if missing, readable by its owner only.
fn private_dir(dir: &Path) -> bool {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).is_err() {
        return false;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).is_ok()
}

impl Identity {
    /// Whether the id is this session's alone (not the shared `nobody`), so
    /// what the kernel counts per user counts this session only.
    pub fn is_own(&self) -> bool {
        self.uid != NOBODY
    }
}

/// Whether `[first, first + count)` is inside one line of an id map
/// (`inside outside count`).
fn maps(map: &str, first: u32, count: u32) -> bool {
    map.lines().any(|line| {
        let fields: Vec<u64> = line.split_whitespace().filter_map(|f| f.parse().ok()).collect();
        matches!(fields.as_slice(), [inside, _, length]
            if *inside <= u64::from(first) && u64::from(first) + u64::from(count) <= inside + length)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "         0          0 4294967295\n";

    #[test]
    fn each_runner_gets_its_own_id_in_a_full_map() {
        assert_eq!(Identity::for_runner(42, FULL, FULL), Identity { uid: 200_042, gid: 200_042 });
        assert_ne!(Identity::for_runner(43, FULL, FULL), Identity::for_runner(42, FULL, FULL));
        assert!(Identity::for_runner(u32::MAX, FULL, FULL).uid < BASE + SPAN);
    }

    #[test]
    fn a_held_id_is_not_given_twice_and_comes_back_when_released() {
        let dir = tempfile::tempdir().unwrap();
        let claims = dir.path().join("claims");
        let (first, held) = claim(&claims, 42, FULL, FULL);
        assert_eq!(first.uid, 200_042);
        assert!(held.is_some());
        // Another runner whose pid gives the same id (42 + 60,000) gets the next one.
        let (second, _also_held) = claim(&claims, 42 + SPAN, FULL, FULL);
        assert_eq!(second.uid, 200_043);
        drop(held);
        assert_eq!(claim(&claims, 42 + SPAN, FULL, FULL).0.uid, 200_042, "released with its holder");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&claims).unwrap().permissions().mode() & 0o777, 0o700);
        // The last id of the range wraps to the first.
        let (last, _held) = claim(&claims, SPAN - 1, FULL, FULL);
        let (wrapped, _held) = claim(&claims, 2 * SPAN - 1, FULL, FULL);
        assert_eq!((last.uid, wrapped.uid), (BASE + SPAN - 1, BASE));
    }

    #[test]
    fn a_narrow_map_falls_back_to_nobody() {
        let narrow = "0 100000 65536\n";
        assert_eq!(Identity::for_runner(42, narrow, narrow), Identity { uid: NOBODY, gid: NOBODY });
        assert!(!Identity::for_runner(42, narrow, narrow).is_own() && Identity::for_runner(42, FULL, FULL).is_own());
        assert_eq!(Identity::for_runner(42, FULL, narrow).uid, NOBODY);
    }
}
