//! The unprivileged user a session's code runs as when the runner is root.
//!
//! Each session gets a user id of its own, derived from the runner's pid
//! (unique among live runners), so even outside the sandbox's namespaces two
//! sessions' processes and files belong to different users. The id must be
//! mapped in this user namespace (a container may map only 65,536 ids);
//! where the range is not, every session shares `nobody`, and the
//! namespaces alone keep them apart.

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
    fn a_narrow_map_falls_back_to_nobody() {
        let narrow = "0 100000 65536\n";
        assert_eq!(Identity::for_runner(42, narrow, narrow), Identity { uid: NOBODY, gid: NOBODY });
        assert!(!Identity::for_runner(42, narrow, narrow).is_own() && Identity::for_runner(42, FULL, FULL).is_own());
        assert_eq!(Identity::for_runner(42, FULL, narrow).uid, NOBODY);
    }
}
