//! One face for the two stores, with the errors the HTTP layer maps to statuses.

use axum::body::Bytes;

use crate::disk::{DiskStore, PutError};
use crate::redis_store::RedisStore;

pub enum Store {
    Disk(DiskStore),
    Redis(RedisStore),
}

pub enum StoreError {
    /// The entry is larger than the whole store.
    TooLarge,
    /// The store cannot take the call now: Redis down, slow or failing, or the disk store's
    /// room held by writes in flight.
    Unavailable(String),
    /// The disk store failed to write.
    Io(String),
}

/// What `/v1/stats` reports.
pub struct Stats {
    pub entries: u64,
    pub bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

impl Store {
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        match self {
            Store::Disk(d) => Ok(d.get(key).await),
            Store::Redis(r) => r.get(key).await.map(|v| v.map(Bytes::from)).map_err(StoreError::Unavailable),
        }
    }

    pub async fn put(&self, key: &str, value: Bytes, ttl_seconds: u64) -> Result<(), StoreError> {
        match self {
            Store::Disk(d) => d.put(key, value, ttl_seconds).await.map_err(|e| match e {
                PutError::TooLarge => StoreError::TooLarge,
                PutError::Busy => StoreError::Unavailable("writes in flight fill the store".into()),
                PutError::Io(e) => StoreError::Io(e),
            }),
            Store::Redis(r) => r.put(key, &value, ttl_seconds).await.map_err(StoreError::Unavailable),
        }
    }

    pub async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        match self {
            Store::Disk(d) => Ok(d.delete(key)),
            Store::Redis(r) => r.delete(key).await.map_err(StoreError::Unavailable),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Store::Disk(_) => "disk",
            Store::Redis(_) => "redis",
        }
    }

    pub async fn stats(&self) -> Result<Stats, StoreError> {
        match self {
            Store::Disk(d) => Ok(d.stats()),
            Store::Redis(r) => r.stats().await.map_err(StoreError::Unavailable),
        }
    }
}
