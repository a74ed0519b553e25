//! The shared session directory and the one `MAX_SESSIONS` count.
//!
//! Admission and registration are one Lua script, so two instances admitting
//! at once can never both take the last place. Times are Redis's own
//! (`TIME`), so instances' clocks never disagree about what has lapsed. An
//! instance renews its key and all its sessions every [`keys::HEARTBEAT`];
//! what a dead instance owned lapses within [`keys::SESSION_TTL`] and leaves
//! the count.

use std::sync::LazyLock;

use redis::Script;

use super::{Cluster, ClusterError, keys};

/// Takes a place under the cap and registers the session, or returns 0.
/// KEYS: live set, session hash. ARGV: sid, max, ttl ms, owner, server.
static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], 'owner', ARGV[4], 'state', 'starting', 'runner', '', 'server', ARGV[5],
  'created', now, 'last', now)
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
",
    )
});

/// Renews every session this instance owns; returns those another
/// instance has taken over meanwhile. A session handed off (owner empty) is
/// left alone. KEYS: live set. ARGV: owner, session ttl ms, session key
/// prefix, journal key prefix, then (sid, state, runner, server, snapshot)
/// for each.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local lost = {}
for i = 5, #ARGV, 5 do
  local key = ARGV[3] .. ARGV[i]
  local owner = redis.call('HGET', key, 'owner')
  if owner and owner ~= ARGV[1] then
    if owner ~= '' then table.insert(lost, ARGV[i]) end
  else
    redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
    redis.call('HSET', key, 'owner', ARGV[1], 'state', ARGV[i + 1], 'runner', ARGV[i + 2], 'server', ARGV[i + 3],
      'snapshot', ARGV[i + 4], 'last', now)
    if redis.call('HEXISTS', key, 'created') == 0 then redis.call('HSET', key, 'created', now) end
    redis.call('PEXPIRE', key, ttl)
    redis.call('PEXPIRE', ARGV[4] .. ARGV[i], ttl)
  end
end
return lost
",
    )
});

/// Renews an instance's liveness. KEYS: instance key, instances set. ARGV:
/// iid, ttl ms, whether it takes sessions over (1/0).
static BEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if ARGV[3] == '1' then redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
else redis.call('ZREM', KEYS[2], ARGV[1]) end
return redis.call('ZRANGE', KEYS[2], 0, -1)
",
    )
});

/// Gives up a session for another instance to take over, leaving its
/// snapshot and journal, and keeps its place in the count as long. KEYS:
/// session hash, live set, journal. ARGV: owner, snapshot, ttl ms, sid.
static HAND_OFF: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'owner', '', 'state', 'handed over', 'snapshot', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[4])
return 1
",
    )
});

/// Forgets a session this instance owns (or that nobody does any more).
/// KEYS: live set, session hash, journal. ARGV: sid, owner.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local owner = redis.call('HGET', KEYS[2], 'owner')
if owner and owner ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
return 1
",
    )
});

/// Records a session's snapshot while this instance owns it. KEYS: session
/// hash. ARGV: owner, snapshot.
static NOTE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'snapshot', ARGV[2])
return 1
",
    )
});

/// Where a session is. KEYS: session hash. ARGV: instance key prefix.
/// Returns {} (unknown), {''} (handed off), or {owner, alive 1/0}.
static LOCATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return {} end
if owner == '' then return {''} end
return {owner, redis.call('EXISTS', ARGV[1] .. owner)}
",
    )
});

/// Takes a session over if its owner is still `expected` (empty: handed
/// off; else an instance found dead, and still dead). KEYS: session hash.
/// ARGV: new owner, expected owner, ttl ms, instance key prefix. Returns its
/// snapshot, or false.
static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return false end
if ARGV[2] ~= '' and redis.call('EXISTS', ARGV[4] .. ARGV[2]) == 1 then return false end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'state', 'taken over')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return redis.call('HGET', KEYS[1], 'snapshot') or ''
",
    )
});

/// Where the directory says a session is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// Not in the directory: never was, or ended.
    Unknown,
    /// Handed off by its owner; the first instance to take it has it.
    Released,
    /// Owned by a live instance.
    Owned(String),
    /// Owned by an instance that is gone (killed, or cut off from Redis).
    Orphaned(String),
}

/// What the renewal says of one local session.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub state: &'static str,
    pub runner: String,
    pub server: String,
    /// [`crate::session::Snapshot`], encoded.
    pub snapshot: String,
}

impl Cluster {
    /// Admits session `id` under the shared cap and records this instance as
    /// its owner.
    pub async fn admit(&self, id: &str, server: Option<&str>) -> Result<(), ClusterError> {
        let admitted: i64 = ADMIT
            .key(keys::LIVE)
            .key(keys::session(id))
            .arg(id)
            .arg(self.max_sessions)
            .arg(keys::SESSION_TTL.as_millis() as u64)
            .arg(&self.instance)
            .arg(server.unwrap_or_default())
            .invoke_async(&mut self.commands())
            .await?;
        if admitted == 1 { Ok(()) } else { Err(ClusterError::Full(self.max_sessions)) }
    }

    /// Forgets session `id`: out of the directory and the count, unless
    /// another instance has taken it over meanwhile.
    pub async fn release(&self, id: &str) -> Result<(), ClusterError> {
        let _: i64 = RELEASE
            .key(keys::LIVE)
            .key(keys::session(id))
            .key(keys::journal(id))
            .arg(id)
            .arg(&self.instance)
            .invoke_async(&mut self.commands())
            .await?;
        Ok(())
    }

    /// Whether session `id` is in the directory: owned, or between owners
    /// (its runner must then be left alone all the more).
    pub async fn knows(&self, id: &str) -> Result<bool, ClusterError> {
        let exists: i64 = redis::cmd("EXISTS").arg(keys::session(id)).query_async(&mut self.commands()).await?;
        Ok(exists == 1)
    }

    /// Renews this instance's sessions (see [`RENEW`]); returns the ids of
    /// those another instance took over.
    pub async fn renew(&self, sessions: &[Entry]) -> Result<Vec<String>, ClusterError> {
        let mut invocation = RENEW.prepare_invoke();
        invocation
            .key(keys::LIVE)
            .arg(&self.instance)
            .arg(keys::SESSION_TTL.as_millis() as u64)
            .arg(keys::session(""))
            .arg(keys::journal(""));
        for entry in sessions {
            invocation.arg(&entry.id).arg(entry.state).arg(&entry.runner).arg(&entry.server).arg(&entry.snapshot);
        }
        Ok(invocation.invoke_async(&mut self.commands()).await?)
    }

    /// Renews this instance's liveness; `available` says whether it takes
    /// sessions over. Returns the instances that do.
    pub async fn beat(&self, available: bool) -> Result<Vec<String>, ClusterError> {
        Ok(BEAT
            .key(keys::instance(&self.instance))
            .key(keys::INSTANCES)
            .arg(&self.instance)
            .arg(keys::INSTANCE_TTL.as_millis() as u64)
            .arg(if available { "1" } else { "0" })
            .invoke_async(&mut self.commands())
            .await?)
    }

    /// Leaves the cluster for good (the process is exiting).
    pub async fn leave(&self) -> Result<(), ClusterError> {
        let _: () = redis::pipe()
            .zrem(keys::INSTANCES, &self.instance)
            .ignore()
            .del(keys::instance(&self.instance))
            .ignore()
            .query_async(&mut self.commands())
            .await?;
        Ok(())
    }

    /// Gives session `id` up for another instance to take over.
    pub async fn hand_off(&self, id: &str, snapshot: &crate::session::Snapshot) -> Result<(), ClusterError> {
        let done: i64 = HAND_OFF
            .key(keys::session(id))
            .key(keys::LIVE)
            .key(keys::journal(id))
            .arg(&self.instance)
            .arg(snapshot.encode())
            .arg(keys::SESSION_TTL.as_millis() as u64)
            .arg(id)
            .invoke_async(&mut self.commands())
            .await?;
        if done == 1 { Ok(()) } else { Err(ClusterError::Unavailable("this instance no longer owns it".into())) }
    }

    /// Records session `id`'s snapshot now (its runner started, its protocol
    /// agreed) rather than at the next renewal.
    pub async fn note(&self, id: &str, snapshot: &crate::session::Snapshot) -> Result<(), ClusterError> {
        let _: i64 = NOTE
            .key(keys::session(id))
            .arg(&self.instance)
            .arg(snapshot.encode())
            .invoke_async(&mut self.commands())
            .await?;
        Ok(())
    }

    /// Where session `id` is.
    pub async fn locate(&self, id: &str) -> Result<Location, ClusterError> {
        let found: Vec<redis::Value> =
            LOCATE.key(keys::session(id)).arg(keys::instance("")).invoke_async(&mut self.commands()).await?;
        let text = |value: &redis::Value| redis::from_redis_value_ref::<String>(value).unwrap_or_default();
        Ok(match found.as_slice() {
            [] => Location::Unknown,
            [owner] if text(owner).is_empty() => Location::Released,
            [owner, alive] => {
                let owner = text(owner);
                if redis::from_redis_value_ref::<i64>(alive).unwrap_or(0) == 1 {
                    Location::Owned(owner)
                } else {
                    Location::Orphaned(owner)
                }
            }
            _ => Location::Unknown,
        })
    }

    /// Takes session `id` over if its owner is still `expected` (empty for
    /// one handed off); returns its snapshot, `None` if another got it first.
    pub async fn take(&self, id: &str, expected: &str) -> Result<Option<String>, ClusterError> {
        Ok(TAKE
            .key(keys::session(id))
            .arg(&self.instance)
            .arg(expected)
            .arg(keys::SESSION_TTL.as_millis() as u64)
            .arg(keys::instance(""))
            .invoke_async(&mut self.commands())
            .await?)
    }

    /// Whether instance `iid` is alive (renewed its key lately).
    pub async fn is_alive(&self, iid: &str) -> Result<bool, ClusterError> {
        let exists: i64 = redis::cmd("EXISTS").arg(keys::instance(iid)).query_async(&mut self.commands()).await?;
        Ok(exists == 1)
    }

    /// Takes or keeps the lease on `name` for `ttl`; true while this
    /// instance holds it. One instance at a time holds a lease.
    pub async fn hold_lease(&self, name: &str, ttl: std::time::Duration) -> Result<bool, ClusterError> {
        let ttl_ms = ttl.as_millis() as u64;
        let taken: Option<String> = redis::cmd("SET")
            .arg(name)
            .arg(&self.instance)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut self.commands())
            .await?;
        if taken.is_some() {
            return Ok(true);
        }
        // Ours already: extend it, atomically with the check.
        let extended: i64 =
            RENEW_LEASE.key(name).arg(&self.instance).arg(ttl_ms).invoke_async(&mut self.commands()).await?;
        Ok(extended == 1)
    }
}

/// Extends a lease only if this instance holds it. KEYS: lease. ARGV: owner, ttl ms.
static RENEW_LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
",
    )
});
