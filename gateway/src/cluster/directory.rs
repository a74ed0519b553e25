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

/// Renews an instance and every session it owns.
/// KEYS: live set, instance key. ARGV: owner, session ttl ms, instance ttl
/// ms, session key prefix, then (sid, state, runner, server) for each.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
for i = 5, #ARGV, 4 do
  local key = ARGV[4] .. ARGV[i]
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
  redis.call('HSET', key, 'owner', ARGV[1], 'state', ARGV[i + 1], 'runner', ARGV[i + 2], 'server', ARGV[i + 3],
    'last', now)
  if redis.call('HEXISTS', key, 'created') == 0 then redis.call('HSET', key, 'created', now) end
  redis.call('PEXPIRE', key, ttl)
end
return 1
",
    )
});

/// What the renewal says of one local session.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub state: &'static str,
    pub runner: String,
    pub server: String,
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

    /// Forgets session `id`: out of the directory and the count.
    pub async fn release(&self, id: &str) -> Result<(), ClusterError> {
        let _: () = redis::pipe()
            .atomic()
            .zrem(keys::LIVE, id)
            .ignore()
            .del(keys::session(id))
            .ignore()
            .query_async(&mut self.commands())
            .await?;
        Ok(())
    }

    /// The instance that owns session `id`, if the directory knows it.
    pub async fn owner(&self, id: &str) -> Result<Option<String>, ClusterError> {
        let owner: Option<String> =
            redis::cmd("HGET").arg(keys::session(id)).arg("owner").query_async(&mut self.commands()).await?;
        Ok(owner.filter(|o| !o.is_empty()))
    }

    /// Whether session `id` is in the directory (owned by a live instance
    /// that renewed it lately).
    pub async fn knows(&self, id: &str) -> Result<bool, ClusterError> {
        Ok(self.owner(id).await?.is_some())
    }

    /// Renews this instance and its sessions (see [`RENEW`]).
    pub async fn renew(&self, sessions: &[Entry]) -> Result<(), ClusterError> {
        let mut invocation = RENEW.prepare_invoke();
        invocation
            .key(keys::LIVE)
            .key(keys::instance(&self.instance))
            .arg(&self.instance)
            .arg(keys::SESSION_TTL.as_millis() as u64)
            .arg(keys::INSTANCE_TTL.as_millis() as u64)
            .arg(keys::session(""));
        for entry in sessions {
            invocation.arg(&entry.id).arg(entry.state).arg(&entry.runner).arg(&entry.server);
        }
        let _: i64 = invocation.invoke_async(&mut self.commands()).await?;
        Ok(())
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
