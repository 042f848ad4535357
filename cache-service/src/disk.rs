//! The default store: one file per entry under a directory, a byte bound with
//! least-recently-used eviction, a TTL per entry, and an index rebuilt from the files at start
//! (so entries survive a restart).
//!
//! File layout: `GCS1`, expiry (u64 unix seconds, big-endian), key length (u32), key, value.
//! Files are written to a temporary name and renamed, so a reader never sees half a file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use sha2::{Digest, Sha256};

const MAGIC: &[u8; 4] = b"GCS1";

pub fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

struct Meta {
    size: u64,
    expires_at: u64,
    used: u64,
}

#[derive(Default)]
struct Index {
    entries: HashMap<String, Meta>,
    /// Recency order: use tick to key.
    lru: BTreeMap<u64, String>,
    bytes: u64,
    tick: u64,
}

impl Index {
    fn touch(&mut self, key: &str) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(m) = self.entries.get_mut(key) {
            self.lru.remove(&m.used);
            m.used = tick;
            self.lru.insert(tick, key.to_string());
        }
    }

    fn remove(&mut self, key: &str) -> Option<Meta> {
        let m = self.entries.remove(key)?;
        self.lru.remove(&m.used);
        self.bytes -= m.size;
        Some(m)
    }

    fn insert(&mut self, key: &str, size: u64, expires_at: u64) {
        self.remove(key);
        self.tick += 1;
        self.entries.insert(key.to_string(), Meta { size, expires_at, used: self.tick });
        self.lru.insert(self.tick, key.to_string());
        self.bytes += size;
    }
}

pub struct DiskStore {
    dir: PathBuf,
    max_bytes: u64,
    index: Mutex<Index>,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
    tmp_seq: AtomicU64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum PutError {
    TooLarge,
    Io(String),
}

fn file_name(key: &str) -> String {
    let d = Sha256::digest(key.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect::<String>() + ".entry"
}

fn header(key: &str, expires_at: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(16 + key.len());
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&expires_at.to_be_bytes());
    h.extend_from_slice(&(key.len() as u32).to_be_bytes());
    h.extend_from_slice(key.as_bytes());
    h
}

/// Reads a file's header: (key, expiry, header length).
fn parse_header(bytes: &[u8]) -> Option<(String, u64, usize)> {
    if bytes.len() < 16 || &bytes[..4] != MAGIC {
        return None;
    }
    let expires_at = u64::from_be_bytes(bytes[4..12].try_into().ok()?);
    let key_len = u32::from_be_bytes(bytes[12..16].try_into().ok()?) as usize;
    let key = std::str::from_utf8(bytes.get(16..16 + key_len)?).ok()?.to_string();
    Some((key, expires_at, 16 + key_len))
}

impl DiskStore {
    /// Opens (creating) the directory and rebuilds the index from the files in it: expired and
    /// unreadable files are removed, the rest are ordered by modification time.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<DiskStore> {
        std::fs::create_dir_all(dir)?;
        let now = now_s();
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with(".tmp") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(".entry") {
                continue;
            }
            let head = read_head(&path);
            match head {
                Some((key, expires_at, head_len)) if expires_at > now && file_name(&key) == name => {
                    let meta = entry.metadata()?;
                    let mtime = meta
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_nanos());
                    found.push((mtime, key, meta.len().saturating_sub(head_len as u64), expires_at));
                }
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        found.sort();
        let mut index = Index::default();
        for (_, key, size, expires_at) in found {
            index.insert(&key, size, expires_at);
        }
        let store = DiskStore {
            dir: dir.to_path_buf(),
            max_bytes,
            index: Mutex::new(index),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            tmp_seq: AtomicU64::new(0),
        };
        // A smaller bound than last time: evict down to it now.
        store.evict_to(0);
        Ok(store)
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(file_name(key))
    }

    pub async fn get(&self, key: &str) -> Option<Bytes> {
        let now = now_s();
        let live = {
            let mut idx = self.index.lock().ok()?;
            match idx.entries.get(key).map(|m| m.expires_at) {
                Some(exp) if exp > now => {
                    idx.touch(key);
                    true
                }
                Some(_) => {
                    idx.remove(key);
                    let _ = std::fs::remove_file(self.path(key));
                    false
                }
                None => false,
            }
        };
        let value = if live { self.read_value(key).await } else { None };
        if value.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        value
    }

    async fn read_value(&self, key: &str) -> Option<Bytes> {
        let bytes = tokio::fs::read(self.path(key)).await.ok()?;
        let (stored_key, expires_at, head_len) = parse_header(&bytes)?;
        if stored_key != key || expires_at <= now_s() {
            return None;
        }
        Some(Bytes::from(bytes).slice(head_len..))
    }

    pub async fn put(&self, key: &str, value: &[u8], ttl_seconds: u64) -> Result<(), PutError> {
        let size = value.len() as u64;
        if size > self.max_bytes {
            return Err(PutError::TooLarge);
        }
        let expires_at = now_s().saturating_add(ttl_seconds);
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!(".tmp-{}-{seq}", std::process::id()));
        let mut data = header(key, expires_at);
        data.extend_from_slice(value);
        tokio::fs::write(&tmp, &data).await.map_err(|e| PutError::Io(e.to_string()))?;
        tokio::fs::rename(&tmp, self.path(key)).await.map_err(|e| PutError::Io(e.to_string()))?;
        if let Ok(mut idx) = self.index.lock() {
            idx.insert(key, size, expires_at);
        }
        self.evict_to(0);
        Ok(())
    }

    pub async fn delete(&self, key: &str) -> bool {
        let existed = self.index.lock().ok().and_then(|mut i| i.remove(key)).is_some();
        let _ = tokio::fs::remove_file(self.path(key)).await;
        existed
    }

    /// Evicts least-recently-used entries until `extra` more bytes fit.
    fn evict_to(&self, extra: u64) {
        let Ok(mut idx) = self.index.lock() else { return };
        while idx.bytes + extra > self.max_bytes {
            let Some((_, key)) = idx.lru.iter().next().map(|(t, k)| (*t, k.clone())) else { break };
            idx.remove(&key);
            let _ = std::fs::remove_file(self.path(&key));
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Removes expired entries.
    pub fn sweep(&self) {
        let now = now_s();
        let Ok(mut idx) = self.index.lock() else { return };
        let expired: Vec<String> =
            idx.entries.iter().filter(|(_, m)| m.expires_at <= now).map(|(k, _)| k.clone()).collect();
        for key in expired {
            idx.remove(&key);
            let _ = std::fs::remove_file(self.path(&key));
        }
    }

    /// (entries, bytes)
    pub fn size(&self) -> (u64, u64) {
        self.index.lock().map_or((0, 0), |i| (i.entries.len() as u64, i.bytes))
    }
}

fn read_head(path: &Path) -> Option<(String, u64, usize)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut buf = vec![0u8; 16 + 1024];
    let n = f.read(&mut buf).ok()?;
    parse_header(&buf[..n])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn put_get_delete() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let s = DiskStore::open(dir.path(), 1000).unwrap();
            assert_eq!(s.get("img:a").await, None);
            s.put("img:a", b"hello", 60).await.unwrap();
            assert_eq!(s.get("img:a").await.as_deref(), Some(&b"hello"[..]));
            assert_eq!(s.size(), (1, 5));
            assert!(s.delete("img:a").await);
            assert_eq!(s.get("img:a").await, None);
            assert_eq!((s.hits.load(Ordering::Relaxed), s.misses.load(Ordering::Relaxed)), (1, 2));
        });
    }

    #[test]
    fn the_byte_bound_evicts_least_recently_used() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let s = DiskStore::open(dir.path(), 30).unwrap();
            s.put("a", &[1; 10], 60).await.unwrap();
            s.put("b", &[2; 10], 60).await.unwrap();
            s.put("c", &[3; 10], 60).await.unwrap();
            assert!(s.get("a").await.is_some()); // a is now the most recent
            s.put("d", &[4; 10], 60).await.unwrap();
            assert!(s.get("b").await.is_none(), "b was least recently used");
            assert!(s.get("a").await.is_some() && s.get("c").await.is_some() && s.get("d").await.is_some());
            assert_eq!(s.size(), (3, 30));
            assert_eq!(s.evictions.load(Ordering::Relaxed), 1);
            assert_eq!(s.put("big", &[0; 31], 60).await, Err(PutError::TooLarge));
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3, "evicted files are gone");
        });
    }

    #[test]
    fn expired_entries_are_misses() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let s = DiskStore::open(dir.path(), 1000).unwrap();
            s.put("a", b"x", 0).await.unwrap();
            assert_eq!(s.get("a").await, None);
            assert_eq!(s.size(), (0, 0));
        });
    }

    #[test]
    fn entries_survive_a_restart_and_junk_is_cleaned() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            {
                let s = DiskStore::open(dir.path(), 1000).unwrap();
                s.put("img:keep", b"value", 60).await.unwrap();
                s.put("img:gone", b"value", 0).await.unwrap();
            }
            std::fs::write(dir.path().join("junk.entry"), b"not an entry").unwrap();
            std::fs::write(dir.path().join(".tmp-1-1"), b"half").unwrap();
            let s = DiskStore::open(dir.path(), 1000).unwrap();
            assert_eq!(s.get("img:keep").await.as_deref(), Some(&b"value"[..]));
            assert_eq!(s.size(), (1, 5));
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
            // Reopened with a smaller bound: evicted down to it.
            drop(s);
            let s = DiskStore::open(dir.path(), 3).unwrap();
            assert_eq!(s.size(), (0, 0));
        });
    }
}
