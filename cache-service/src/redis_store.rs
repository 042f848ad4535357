//! The fleet store: entries in Redis under a prefix, with Redis expiry as the TTL, so every
//! Envoy of a fleet shares one cache.
//!
//! Every Redis call is bounded by the response timeout (a hung Redis costs an error, never a
//! hung handler); connection attempts by the connect timeout. A call left unanswered also
//! starts a fresh connection in the background, which replaces the current one once it
//! answers: a connection to a Redis that vanished without a reset (a failover, a partition)
//! would otherwise time out until TCP gives up on it, many minutes later.
//!
//! Stats without a `SCAN`: writes go through small Lua scripts that keep, beside the entries,
//! an index of what this service stored (under names no cache key can take, since `#` is not
//! allowed in keys): `<prefix>#expiry` (sorted set: key by expiry in ms), `<prefix>#sizes`
//! (hash: key to value size) and `<prefix>#bytes` (the sum of the sizes). A script removes
//! from the index what has expired (at most `REAP_ON_PUT` keys per PUT, `REAP_ON_STATS` per
//! stats call, so the index never grows with dead keys and no call is unbounded); stats are
//! the index's size and `#bytes`. What the index cannot see: a key Redis evicts under
//! `maxmemory` or that someone else deletes stays counted until its TTL would have ended.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, RedisResult};

use crate::store::Stats;

/// Longest TTL kept (10 years), so the expiry in ms stays exact in Lua's doubles.
const MAX_TTL_SECONDS: u64 = 10 * 365 * 24 * 3600;
const REAP_ON_PUT: u32 = 16;
const REAP_ON_STATS: u32 = 1000;

/// KEYS[1] expiry index, KEYS[2] sizes, KEYS[3] bytes.
const REAP: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function reap(limit)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('(%d', now), 'LIMIT', 0, limit)
  for _, member in ipairs(gone) do
    redis.call('DECRBY', KEYS[3], tonumber(redis.call('HGET', KEYS[2], member)) or 0)
    redis.call('HDEL', KEYS[2], member)
    redis.call('ZREM', KEYS[1], member)
  end
end
"#;

/// KEYS[4] the entry; ARGV[1] value, ARGV[2] TTL in seconds, ARGV[3] key, ARGV[4] reap limit.
const PUT: &str = r#"
reap(tonumber(ARGV[4]))
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[4], ARGV[1], 'EX', ttl)
local old = tonumber(redis.call('HGET', KEYS[2], ARGV[3])) or 0
local size = string.len(ARGV[1])
redis.call('HSET', KEYS[2], ARGV[3], size)
redis.call('ZADD', KEYS[1], now + ttl * 1000, ARGV[3])
redis.call('INCRBY', KEYS[3], size - old)
return 1
"#;

/// KEYS[4] the entry; ARGV[1] key. Returns how many keys were deleted.
const DELETE: &str = r#"
local n = redis.call('DEL', KEYS[4])
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old then
  redis.call('DECRBY', KEYS[3], tonumber(old) or 0)
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return n
"#;

/// ARGV[1] reap limit. Returns {entries, bytes}.
const STATS: &str = r#"
reap(tonumber(ARGV[1]))
return {redis.call('ZCARD', KEYS[1]), tonumber(redis.call('GET', KEYS[3])) or 0}
"#;

pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
}

pub struct RedisStore {
    link: Arc<Link>,
    prefix: String,
    timeout: Duration,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// The connection, and what it takes to make a new one.
struct Link {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// Bound on making a connection, retries included.
    budget: Duration,
    conn: RwLock<ConnectionManager>,
    reconnecting: AtomicBool,
}

impl Link {
    /// A new connection that has answered a PING, within the budget.
    async fn open(
        client: &redis::Client,
        config: &ConnectionManagerConfig,
        budget: Duration,
    ) -> Result<ConnectionManager, String> {
        let open = async {
            let mut conn = ConnectionManager::new_with_config(client.clone(), config.clone()).await?;
            let _: String = redis::cmd("PING").query_async(&mut conn).await?;
            Ok::<_, redis::RedisError>(conn)
        };
        match tokio::time::timeout(budget, open).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {} ms", budget.as_millis())),
        }
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl RedisStore {
    /// Connects and checks Redis answers, retrying refused connections for at most five connect
    /// timeouts in all.
    pub async fn connect(url: &str, prefix: &str, timeouts: &Timeouts) -> Result<RedisStore, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(timeouts.connect)
            .set_response_timeout(timeouts.response)
            .set_number_of_retries(4)
            .set_max_delay(timeouts.connect.as_millis().try_into().unwrap_or(u64::MAX));
        let budget = timeouts.connect * 5;
        let conn = Link::open(&client, &config, budget).await?;
        let link = Link { client, config, budget, conn: RwLock::new(conn), reconnecting: AtomicBool::new(false) };
        Ok(RedisStore {
            link: Arc::new(link),
            prefix: prefix.to_string(),
            timeout: timeouts.response,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    /// After a call went unanswered: one fresh connection at a time, in the background.
    fn reconnect(&self) {
        if self.link.reconnecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let link = self.link.clone();
        tokio::spawn(async move {
            if let Ok(fresh) = Link::open(&link.client, &link.config, link.budget).await {
                *link.conn.write().unwrap_or_else(|e| e.into_inner()) = fresh;
            }
            link.reconnecting.store(false, Ordering::Release);
        });
    }

    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn script(&self, body: &str, entry: Option<&str>) -> redis::Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(format!("{REAP}{body}")).arg(if entry.is_some() { 4 } else { 3 });
        for meta in ["#expiry", "#sizes", "#bytes"] {
            cmd.arg(format!("{}{meta}", self.prefix));
        }
        if let Some(key) = entry {
            cmd.arg(self.name(key));
        }
        cmd
    }

    /// Runs one Redis call within the response timeout; one left unanswered (whether the
    /// connection's own response timeout or this bound says so first) starts a reconnection.
    async fn bounded<T>(&self, call: impl Future<Output = RedisResult<T>>) -> Result<T, String> {
        let unanswered = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if !e.is_timeout() => return Err(e.to_string()),
            Ok(Err(_)) | Err(_) => format!("no answer from Redis within {} ms", self.timeout.as_millis()),
        };
        self.reconnect();
        Err(unanswered)
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        let mut conn = self.link.conn();
        let v: Option<Vec<u8>> = self.bounded(conn.get(self.name(key))).await?;
        let counter = if v.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(v)
    }

    pub async fn put(&self, key: &str, value: &[u8], ttl_seconds: u64) -> Result<(), String> {
        let mut conn = self.link.conn();
        let mut cmd = self.script(PUT, Some(key));
        cmd.arg(value).arg(ttl_seconds.clamp(1, MAX_TTL_SECONDS)).arg(key).arg(REAP_ON_PUT);
        let _: i64 = self.bounded(cmd.query_async(&mut conn)).await?;
        Ok(())
    }

    pub async fn delete(&self, key: &str) -> Result<bool, String> {
        let mut conn = self.link.conn();
        let mut cmd = self.script(DELETE, Some(key));
        cmd.arg(key);
        let n: u64 = self.bounded(cmd.query_async(&mut conn)).await?;
        Ok(n > 0)
    }

    /// Entries and bytes from the index; evictions are Redis `evicted_keys` (the whole Redis).
    pub async fn stats(&self) -> Result<Stats, String> {
        let mut conn = self.link.conn();
        let mut cmd = self.script(STATS, None);
        cmd.arg(REAP_ON_STATS);
        let (entries, bytes): (u64, i64) = self.bounded(cmd.query_async(&mut conn)).await?;
        let info: String = self.bounded(redis::cmd("INFO").arg("stats").query_async(&mut conn)).await?;
        let evictions = info
            .lines()
            .find_map(|l| l.strip_prefix("evicted_keys:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        Ok(Stats {
            entries,
            bytes: bytes.max(0) as u64,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions,
        })
    }
}
