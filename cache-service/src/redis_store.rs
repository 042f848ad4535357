//! The fleet store: entries in Redis under a prefix, with Redis expiry as the TTL, so every
//! Envoy of a fleet shares one cache.

use std::sync::atomic::{AtomicU64, Ordering};

use redis::aio::ConnectionManager;
use redis::AsyncCommands;

pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

impl RedisStore {
    pub async fn connect(url: &str, prefix: &str) -> redis::RedisResult<RedisStore> {
        let client = redis::Client::open(url)?;
        let mut conn = ConnectionManager::new(client).await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(RedisStore { conn, prefix: prefix.to_string(), hits: AtomicU64::new(0), misses: AtomicU64::new(0) })
    }

    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    pub async fn get(&self, key: &str) -> redis::RedisResult<Option<Vec<u8>>> {
        let mut conn = self.conn.clone();
        let v: Option<Vec<u8>> = conn.get(self.name(key)).await?;
        let counter = if v.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(v)
    }

    pub async fn put(&self, key: &str, value: &[u8], ttl_seconds: u64) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        conn.set_ex(self.name(key), value, ttl_seconds.max(1)).await
    }

    pub async fn delete(&self, key: &str) -> redis::RedisResult<bool> {
        let mut conn = self.conn.clone();
        let n: u64 = conn.del(self.name(key)).await?;
        Ok(n > 0)
    }

    /// (entries under the prefix, Redis used_memory, Redis evicted_keys)
    pub async fn size(&self) -> redis::RedisResult<(u64, u64, u64)> {
        let mut conn = self.conn.clone();
        let mut entries = 0u64;
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            entries += keys.len() as u64;
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let info: String = redis::cmd("INFO").query_async(&mut conn).await?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok((entries, field("used_memory"), field("evicted_keys")))
    }
}
