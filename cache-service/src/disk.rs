//! The default store: one file per entry under a directory, a byte bound with
//! least-recently-used eviction, a TTL per entry, and an index rebuilt from the files at start
//! (so entries survive a restart).
//!
//! File layout: `GCS1`, expiry (u64 unix seconds, big-endian), key length (u32), key, value.
//! An entry is named `<sha256 of the key, 64 lowercase hex>.entry`; it is written to
//! `.tmp-<pid>-<n>` and renamed, so a reader never sees half a file.
//!
//! Consistency: every change to the files of entries (rename into place, removal) happens while
//! holding the index lock, together with the index update, so the index and the directory never
//! disagree. The byte bound counts entry values: the bytes of the entries in the index plus the
//! bytes reserved by writes in flight (their temporary files) never exceed `max_bytes`.
//!
//! Only files this service wrote are ever removed: a name of its own scheme *and* its magic.
//!
//! Memory: the values of the most recently used entries are also kept in memory (up to
//! `memory_bytes`, least recently used out first), so a hot entry is answered without reading
//! its file: a 2.8 MB value read from the page cache into a fresh buffer cost about 1 ms per
//! GET, more than the filter's whole L1 answer. A kept value is the one its file holds: it is
//! set when the file lands and dropped with the entry (delete, eviction, expiry, overwrite),
//! all under the index lock; a value read from disk is kept only if the entry was not
//! rewritten while it was read.

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use sha2::{Digest, Sha256};

use crate::store::Stats;

const MAGIC: &[u8; 4] = b"GCS1";
const HEAD_MIN: usize = 16;
const MAX_HEAD_KEY: usize = 1024;
const TMP_PREFIX: &str = ".tmp-";
const ENTRY_SUFFIX: &str = ".entry";

pub fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

struct Meta {
    size: u64,
    expires_at: u64,
    used: u64,
    /// The tick of the write that made this entry: a value read from disk is kept only if the
    /// entry is still that write's.
    written: u64,
    /// Its value, when kept in memory.
    kept: Option<Bytes>,
}

#[derive(Default)]
struct Index {
    entries: HashMap<String, Meta>,
    /// Recency order: use tick to key.
    lru: BTreeMap<u64, String>,
    /// Value bytes of the entries in `entries`.
    bytes: u64,
    /// Value bytes of writes in flight, held against the bound until they land or fail.
    reserved: u64,
    tick: u64,
    /// Entries whose value is kept in memory, by their `used` tick.
    kept_lru: BTreeMap<u64, String>,
    /// Bytes of the values kept, and the bound on them.
    kept_bytes: u64,
    memory_bytes: u64,
}

impl Index {
    fn touch(&mut self, key: &str) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(m) = self.entries.get_mut(key) {
            self.lru.remove(&m.used);
            if m.kept.is_some() {
                self.kept_lru.remove(&m.used);
                self.kept_lru.insert(tick, key.to_string());
            }
            m.used = tick;
            self.lru.insert(tick, key.to_string());
        }
    }

    fn remove(&mut self, key: &str) -> Option<Meta> {
        let m = self.entries.remove(key)?;
        self.lru.remove(&m.used);
        if m.kept.is_some() {
            self.kept_lru.remove(&m.used);
            self.kept_bytes -= m.size;
        }
        self.bytes -= m.size;
        Some(m)
    }

    fn insert(&mut self, key: &str, size: u64, expires_at: u64) {
        self.remove(key);
        self.tick += 1;
        let tick = self.tick;
        self.entries.insert(key.to_string(), Meta { size, expires_at, used: tick, written: tick, kept: None });
        self.lru.insert(tick, key.to_string());
        self.bytes += size;
    }

    /// Keeps `value` in memory as the value of `key`, if it is still the entry that `written`
    /// made, pushing the least recently used kept values out to stay within the bound.
    fn keep(&mut self, key: &str, written: u64, value: Bytes) {
        let size = value.len() as u64;
        if size > self.memory_bytes {
            return;
        }
        // Only the value of that very write, whole (a file changed behind the service's back
        // could be shorter or longer than the entry says).
        match self.entries.get(key) {
            Some(m) if m.written == written && m.kept.is_none() && m.size == size => {}
            _ => return,
        }
        while self.kept_bytes + size > self.memory_bytes {
            let Some((_, oldest)) = self.kept_lru.pop_first() else { break };
            if let Some(m) = self.entries.get_mut(&oldest) {
                if m.kept.take().is_some() {
                    self.kept_bytes -= m.size;
                }
            }
        }
        if let Some(m) = self.entries.get_mut(key) {
            m.kept = Some(value);
            self.kept_lru.insert(m.used, key.to_string());
            self.kept_bytes += size;
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum PutError {
    /// Larger than the whole store.
    TooLarge,
    /// Writes in flight hold the room this one needs.
    Busy,
    Io(String),
}

/// The store; clones share it.
#[derive(Clone)]
pub struct DiskStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    max_bytes: u64,
    index: Mutex<Index>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    tmp_seq: AtomicU64,
}

fn file_name(key: &str) -> String {
    let d = Sha256::digest(key.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect::<String>() + ENTRY_SUFFIX
}

/// `<64 lowercase hex>.entry`
fn is_entry_name(name: &str) -> bool {
    name.strip_suffix(ENTRY_SUFFIX)
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// `.tmp-<digits>-<digits>`
fn is_tmp_name(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    name.strip_prefix(TMP_PREFIX).and_then(|r| r.split_once('-')).is_some_and(|(pid, n)| digits(pid) && digits(n))
}

fn header(key: &str, expires_at: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEAD_MIN + key.len());
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&expires_at.to_be_bytes());
    h.extend_from_slice(&(key.len() as u32).to_be_bytes());
    h.extend_from_slice(key.as_bytes());
    h
}

/// Reads a file's header: (key, expiry, header length).
fn parse_header(bytes: &[u8]) -> Option<(String, u64, usize)> {
    if bytes.len() < HEAD_MIN || &bytes[..4] != MAGIC {
        return None;
    }
    let expires_at = u64::from_be_bytes(bytes[4..12].try_into().ok()?);
    let key_len = u32::from_be_bytes(bytes[12..16].try_into().ok()?) as usize;
    let key = std::str::from_utf8(bytes.get(HEAD_MIN..HEAD_MIN.checked_add(key_len)?)?).ok()?.to_string();
    Some((key, expires_at, HEAD_MIN + key_len))
}

/// What the start of a file says about it.
enum Head {
    /// Not written by this service: no magic.
    Foreign,
    /// Starts like one of ours but is not a whole, readable header.
    Broken,
    Entry {
        key: String,
        expires_at: u64,
        head_len: usize,
    },
}

fn read_head(path: &Path) -> Head {
    let mut buf = Vec::with_capacity(HEAD_MIN + MAX_HEAD_KEY);
    let read = std::fs::File::open(path)
        .and_then(|f| f.take((HEAD_MIN + MAX_HEAD_KEY) as u64).read_to_end(&mut buf).map(|_| ()));
    if read.is_err() {
        return Head::Foreign;
    }
    let n = buf.len().min(MAGIC.len());
    if buf[..n] != MAGIC[..n] {
        return Head::Foreign;
    }
    match parse_header(&buf) {
        Some((key, expires_at, head_len)) => Head::Entry { key, expires_at, head_len },
        None => Head::Broken,
    }
}

/// A write in flight: its reservation and its temporary file (once created), both given back
/// on drop unless the write landed.
struct Pending<'a> {
    store: &'a Inner,
    tmp: Option<PathBuf>,
    reserved: u64,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(tmp) = &self.tmp {
            let _ = std::fs::remove_file(tmp);
        }
        if self.reserved > 0 {
            self.store.lock().reserved -= self.reserved;
        }
    }
}

impl DiskStore {
    /// Opens (creating) the directory and rebuilds the index from this service's files in it:
    /// its expired, broken and half-written files are removed, anything else is left alone and
    /// not counted; the entries are ordered by modification time.
    #[cfg(test)]
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<DiskStore> {
        DiskStore::open_keeping(dir, max_bytes, 0)
    }

    /// As `open`, keeping up to `memory_bytes` of the most recently used values in memory.
    pub fn open_keeping(dir: &Path, max_bytes: u64, memory_bytes: u64) -> std::io::Result<DiskStore> {
        std::fs::create_dir_all(dir)?;
        let now = now_s();
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            // Regular files only: not a directory, not a symlink to somewhere else.
            if !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if is_tmp_name(name) {
                if !matches!(read_head(&path), Head::Foreign) {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            if !is_entry_name(name) {
                continue;
            }
            match read_head(&path) {
                Head::Foreign => {}
                Head::Entry { key, expires_at, head_len } if expires_at > now && file_name(&key) == name => {
                    let meta = entry.metadata()?;
                    let mtime = meta
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_nanos());
                    found.push((mtime, key, meta.len().saturating_sub(head_len as u64), expires_at));
                }
                Head::Entry { .. } | Head::Broken => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        found.sort();
        let mut index = Index { memory_bytes, ..Index::default() };
        for (_, key, size, expires_at) in found {
            index.insert(&key, size, expires_at);
        }
        let inner = Inner {
            dir: dir.to_path_buf(),
            max_bytes,
            index: Mutex::new(index),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            tmp_seq: AtomicU64::new(0),
        };
        // A smaller bound than last time: evict down to it now.
        let _ = inner.make_room(&mut inner.lock(), 0);
        Ok(DiskStore { inner: Arc::new(inner) })
    }

    pub async fn get(&self, key: &str) -> Option<Bytes> {
        let s = &self.inner;
        let now = now_s();
        let found = {
            let mut idx = s.lock();
            match idx.entries.get(key).map(|m| (m.expires_at, m.written, m.kept.clone())) {
                Some((exp, written, kept)) if exp > now => {
                    idx.touch(key);
                    Some((written, kept))
                }
                Some(_) => {
                    s.forget(&mut idx, key);
                    None
                }
                None => None,
            }
        };
        let value = match found {
            Some((_, Some(kept))) => Some(kept),
            Some((written, None)) => {
                let value = s.read_value(key).await;
                if let Some(v) = &value {
                    s.lock().keep(key, written, v.clone());
                }
                value
            }
            None => None,
        };
        let counter = if value.is_some() { &s.hits } else { &s.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        value
    }

    /// Stores an entry. The write runs to its end (landing, or cleaning up after itself) even
    /// when the caller stops waiting for it.
    pub async fn put(&self, key: &str, value: Bytes, ttl_seconds: u64) -> Result<(), PutError> {
        let inner = self.inner.clone();
        let key = key.to_string();
        tokio::task::spawn_blocking(move || inner.put(&key, value, ttl_seconds))
            .await
            .unwrap_or_else(|e| Err(PutError::Io(e.to_string())))
    }

    pub fn delete(&self, key: &str) -> bool {
        let s = &self.inner;
        s.forget(&mut s.lock(), key)
    }

    /// Removes expired entries.
    pub fn sweep(&self) {
        let s = &self.inner;
        let now = now_s();
        let mut idx = s.lock();
        let expired: Vec<String> =
            idx.entries.iter().filter(|(_, m)| m.expires_at <= now).map(|(k, _)| k.clone()).collect();
        for key in expired {
            s.forget(&mut idx, &key);
        }
    }

    /// (entries, bytes)
    pub fn size(&self) -> (u64, u64) {
        let idx = self.inner.lock();
        (idx.entries.len() as u64, idx.bytes)
    }

    pub fn stats(&self) -> Stats {
        let s = &self.inner;
        let (entries, bytes) = self.size();
        Stats {
            entries,
            bytes,
            hits: s.hits.load(Ordering::Relaxed),
            misses: s.misses.load(Ordering::Relaxed),
            evictions: s.evictions.load(Ordering::Relaxed),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Index> {
        // The index is consistent between statements, so a panic elsewhere leaves it usable.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(file_name(key))
    }

    /// Drops an entry from the index and its file from the disk, under the lock.
    fn forget(&self, idx: &mut Index, key: &str) -> bool {
        let known = idx.remove(key).is_some();
        if known {
            let _ = std::fs::remove_file(self.path(key));
        }
        known
    }

    /// Evicts least-recently-used entries until `extra` more bytes fit beside the entries and
    /// the writes in flight. Evicts nothing if they cannot fit even in an empty store.
    fn make_room(&self, idx: &mut Index, extra: u64) -> Result<(), PutError> {
        if idx.reserved.saturating_add(extra) > self.max_bytes {
            return Err(PutError::Busy);
        }
        while idx.bytes + idx.reserved + extra > self.max_bytes {
            let Some(key) = idx.lru.values().next().cloned() else { break };
            self.forget(idx, &key);
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn read_value(&self, key: &str) -> Option<Bytes> {
        let bytes = tokio::fs::read(self.path(key)).await.ok()?;
        let (stored_key, expires_at, head_len) = parse_header(&bytes)?;
        if stored_key != key || expires_at <= now_s() {
            return None;
        }
        Some(Bytes::from(bytes).slice(head_len..))
    }

    fn put(&self, key: &str, value: Bytes, ttl_seconds: u64) -> Result<(), PutError> {
        let size = value.len() as u64;
        if size > self.max_bytes {
            return Err(PutError::TooLarge);
        }
        {
            let mut idx = self.lock();
            self.make_room(&mut idx, size)?;
            idx.reserved += size;
        }
        let mut pending = Pending { store: self, tmp: None, reserved: size };
        let io = |e: std::io::Error| PutError::Io(e.to_string());
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!("{TMP_PREFIX}{}-{seq}", std::process::id()));
        // `create_new`: never write into (or later remove) a file that is not this write's own.
        let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io)?;
        let tmp = pending.tmp.insert(tmp);
        let expires_at = now_s().saturating_add(ttl_seconds);
        file.write_all(&header(key, expires_at)).and_then(|()| file.write_all(&value)).map_err(io)?;
        drop(file);

        let mut idx = self.lock();
        // The reservation becomes the entry: the sum stays within the bound.
        idx.reserved -= size;
        pending.reserved = 0;
        // The rename replaces the key's old file, if any.
        let old = idx.remove(key);
        let path = self.path(key);
        if let Err(e) = std::fs::rename(&*tmp, &path) {
            // The old entry is out of the index now: its file goes too.
            if old.is_some() {
                let _ = std::fs::remove_file(&path);
            }
            return Err(io(e));
        }
        pending.tmp = None;
        idx.insert(key, size, expires_at);
        let written = idx.tick;
        // A copy of its own: the PUT's body may be a slice of a connection's whole read
        // buffer, which would stay alive with it and count for more than its length.
        idx.keep(key, written, Bytes::copy_from_slice(&value));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    fn b(v: &[u8]) -> Bytes {
        Bytes::copy_from_slice(v)
    }

    fn counters(s: &DiskStore) -> (u64, u64, u64) {
        let st = s.stats();
        (st.hits, st.misses, st.evictions)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    /// The directory and the index agree: the same keys, the same value sizes, within the bound,
    /// no temporary file left and nothing reserved.
    fn assert_consistent(s: &DiskStore, dir: &Path, max_bytes: u64) {
        let mut on_disk = HashMap::new();
        let mut values = HashMap::new();
        for name in names(dir) {
            assert!(is_entry_name(&name), "only entry files are left: {name}");
            let path = dir.join(&name);
            let Head::Entry { key, head_len, .. } = read_head(&path) else { panic!("{name} is not an entry") };
            assert_eq!(file_name(&key), name);
            on_disk.insert(key.clone(), std::fs::metadata(&path).unwrap().len() - head_len as u64);
            values.insert(key, std::fs::read(&path).unwrap()[head_len..].to_vec());
        }
        let idx = s.inner.lock();
        let kept: Vec<(&String, &Bytes)> =
            idx.entries.iter().filter_map(|(k, m)| m.kept.as_ref().map(|v| (k, v))).collect();
        for (key, value) in &kept {
            assert_eq!(&value[..], &values[*key][..], "{key}: the value kept in memory is the file's");
        }
        assert_eq!(idx.kept_bytes, kept.iter().map(|(_, v)| v.len() as u64).sum::<u64>());
        assert!(idx.kept_bytes <= idx.memory_bytes);
        assert_eq!(idx.kept_lru.len(), kept.len());
        let indexed: HashMap<String, u64> = idx.entries.iter().map(|(k, m)| (k.clone(), m.size)).collect();
        assert_eq!(indexed, on_disk, "every index entry has its file and every file its index entry");
        assert_eq!(idx.bytes, on_disk.values().sum::<u64>(), "the index counts the bytes on disk");
        assert!(idx.bytes <= max_bytes, "{} bytes over the bound of {max_bytes}", idx.bytes);
        assert_eq!(idx.reserved, 0, "nothing reserved once every write is done");
        assert_eq!(idx.lru.len(), idx.entries.len());
    }

    #[test]
    fn put_get_delete() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let s = DiskStore::open(dir.path(), 1000).unwrap();
            assert_eq!(s.get("img:a").await, None);
            s.put("img:a", b(b"hello"), 60).await.unwrap();
            assert_eq!(s.get("img:a").await.as_deref(), Some(&b"hello"[..]));
            assert_eq!(s.size(), (1, 5));
            assert!(s.delete("img:a"));
            assert!(!s.delete("img:a"));
            assert_eq!(s.get("img:a").await, None);
            assert_eq!(counters(&s), (1, 2, 0));
        });
    }

    #[test]
    fn the_byte_bound_evicts_least_recently_used() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let s = DiskStore::open(dir.path(), 30).unwrap();
            s.put("a", b(&[1; 10]), 60).await.unwrap();
            s.put("b", b(&[2; 10]), 60).await.unwrap();
            s.put("c", b(&[3; 10]), 60).await.unwrap();
            assert!(s.get("a").await.is_some()); // a is now the most recent
            s.put("d", b(&[4; 10]), 60).await.unwrap();
            assert!(s.get("b").await.is_none(), "b was least recently used");
            assert!(s.get("a").await.is_some() && s.get("c").await.is_some() && s.get("d").await.is_some());
            assert_eq!(s.size(), (3, 30));
            assert_eq!(s.stats().evictions, 1);
            assert_eq!(s.put("big", b(&[0; 31]), 60).await, Err(PutError::TooLarge));
            assert_eq!(names(dir.path()).len(), 3, "evicted files are gone");
            assert_consistent(&s, dir.path(), 30);
        });
    }

    #[test]
    fn expired_entries_are_misses() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let s = DiskStore::open(dir.path(), 1000).unwrap();
            s.put("a", b(b"x"), 0).await.unwrap();
            assert_eq!(s.get("a").await, None);
            assert_eq!(s.size(), (0, 0));
        });
    }

    #[test]
    fn entries_survive_a_restart_and_own_leftovers_are_cleaned() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            {
                let s = DiskStore::open(dir.path(), 1000).unwrap();
                s.put("img:keep", b(b"value"), 60).await.unwrap();
                s.put("img:gone", b(b"value"), 0).await.unwrap();
            }
            // Left by a crash: a half-written temporary file and a broken entry, both ours.
            std::fs::write(dir.path().join(".tmp-1-1"), b"GCS1\0\0").unwrap();
            std::fs::write(dir.path().join(".tmp-1-2"), b"").unwrap();
            std::fs::write(dir.path().join(file_name("img:broken")), b"GCS1\0").unwrap();
            let s = DiskStore::open(dir.path(), 1000).unwrap();
            assert_eq!(s.get("img:keep").await.as_deref(), Some(&b"value"[..]));
            assert_eq!(s.size(), (1, 5));
            assert_eq!(names(dir.path()), vec![file_name("img:keep")]);
            // Reopened with a smaller bound: evicted down to it.
            drop(s);
            let s = DiskStore::open(dir.path(), 3).unwrap();
            assert_eq!(s.size(), (0, 0));
        });
    }

    /// Issue 11: at start, the store deleted every `*.entry` and `.tmp*` file in its directory,
    /// whoever wrote it. Files it did not write are now left alone and not counted.
    #[test]
    fn files_it_did_not_write_are_left_alone() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let foreign = [
                ("notes.entry", &b"someone else's"[..]),
                (".tmp-42-7", b"an editor's swap file"),
                (".tmpfile", b"GCS1 but not our name"),
                ("README", b"hello"),
            ];
            for (name, data) in foreign {
                std::fs::write(dir.path().join(name), data).unwrap();
            }
            // Our naming scheme, but no magic: not ours either.
            let lookalike = file_name("img:lookalike");
            std::fs::write(dir.path().join(&lookalike), b"not written by cache-service").unwrap();
            std::fs::create_dir(dir.path().join(file_name("img:a-directory"))).unwrap();
            {
                let s = DiskStore::open(dir.path(), 1000).unwrap();
                s.put("img:mine", b(b"value"), 60).await.unwrap();
                assert_eq!(s.size(), (1, 5));
            }
            let s = DiskStore::open(dir.path(), 1000).unwrap();
            assert_eq!(s.size(), (1, 5), "foreign files are not counted");
            for (name, data) in foreign {
                assert_eq!(std::fs::read(dir.path().join(name)).unwrap(), data, "{name} is untouched");
            }
            assert!(dir.path().join(&lookalike).exists());
            assert!(dir.path().join(file_name("img:a-directory")).is_dir());
            assert_eq!(s.get("img:lookalike").await, None);
            assert_eq!(s.get("img:mine").await.as_deref(), Some(&b"value"[..]));
            // Evicting everything still leaves them alone.
            drop(s);
            let s = DiskStore::open(dir.path(), 1).unwrap();
            assert_eq!(s.size(), (0, 0));
            assert_eq!(names(dir.path()).len(), 6);
        });
    }

    /// Issue 11: a failed write left its `.tmp-*` file behind, uncounted, until a restart.
    #[test]
    fn a_failed_write_leaves_no_temporary_file_and_no_reservation() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let s = DiskStore::open(dir.path(), 100).unwrap();
            s.put("img:old", b(&[1; 40]), 60).await.unwrap();
            // Something in the way of the rename: a directory where the entry's file goes.
            let blocker = dir.path().join(file_name("img:k"));
            std::fs::create_dir(&blocker).unwrap();
            std::fs::write(blocker.join("x"), b"x").unwrap();
            assert!(matches!(s.put("img:k", b(&[2; 60]), 60).await, Err(PutError::Io(_))));
            assert_eq!(s.get("img:k").await, None);
            let leftovers: Vec<String> = names(dir.path()).into_iter().filter(|n| n.starts_with(".tmp")).collect();
            assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
            assert_eq!(s.inner.lock().reserved, 0);
            std::fs::remove_dir_all(&blocker).unwrap();
            // The whole bound is usable again.
            s.put("img:full", b(&[3; 100]), 60).await.unwrap();
            assert_consistent(&s, dir.path(), 100);
        });
    }

    #[test]
    fn a_foreign_file_with_a_temporary_name_is_never_written_or_removed() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let squatter = dir.path().join(format!(".tmp-{}-0", std::process::id()));
            std::fs::write(&squatter, b"not ours").unwrap();
            let s = DiskStore::open(dir.path(), 100).unwrap();
            assert!(matches!(s.put("img:a", b(b"one"), 60).await, Err(PutError::Io(_))));
            assert_eq!(std::fs::read(&squatter).unwrap(), b"not ours");
            s.put("img:a", b(b"two"), 60).await.unwrap();
            assert_eq!(s.get("img:a").await.as_deref(), Some(&b"two"[..]));
            assert_eq!(s.inner.lock().reserved, 0);
        });
    }

    /// Issue 11: `put` renamed the file before updating the index without holding the lock, so
    /// a concurrent delete or eviction could remove the new file and leave a ghost entry, or two
    /// writes of one key could leave the index with the size of the other's file.
    #[test]
    fn concurrent_puts_deletes_and_evictions_keep_the_index_and_the_disk_in_step() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            const MAX: u64 = 100;
            // Memory for a few values: some are kept, some pushed out, some read back in.
            let s = DiskStore::open_keeping(dir.path(), MAX, 60).unwrap();
            // Rounds of racing tasks, the invariants checked after each: a ghost entry or a
            // wrong size shows up at some round's end even if later writes would mend it.
            for round in 0..40u64 {
                let mut tasks = Vec::new();
                for t in 0..16u64 {
                    let s = s.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut seed = (round * 16 + t + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                        for _ in 0..50 {
                            seed ^= seed << 13;
                            seed ^= seed >> 7;
                            seed ^= seed << 17;
                            let key = format!("img:{}", seed % 4);
                            match (seed >> 8) % 8 {
                                0..=3 => {
                                    let size = ((seed >> 16) % 45 + 1) as usize;
                                    let result = s.put(&key, Bytes::from(vec![b'v'; size]), 60).await;
                                    assert!(matches!(result, Ok(()) | Err(PutError::Busy)), "{result:?}");
                                }
                                4 | 5 => {
                                    s.delete(&key);
                                }
                                _ => {
                                    if let Some(v) = s.get(&key).await {
                                        assert!(v.iter().all(|&c| c == b'v'));
                                    }
                                }
                            }
                            let idx = s.inner.lock();
                            assert!(idx.bytes + idx.reserved <= MAX, "over the bound");
                        }
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
                assert_consistent(&s, dir.path(), MAX);
            }
            assert!(s.stats().evictions > 0, "the test evicts");
            // And a restart finds exactly the same.
            let before = s.size();
            drop(s);
            let s = DiskStore::open_keeping(dir.path(), MAX, 60).unwrap();
            assert_eq!(s.size(), before);
            assert_consistent(&s, dir.path(), MAX);
        });
    }

    #[test]
    fn recent_values_are_answered_from_memory_and_never_outlive_their_entry() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let s = DiskStore::open_keeping(dir.path(), 1000, 25).unwrap();
            s.put("a", b(&[1; 10]), 60).await.unwrap();
            s.put("b", b(&[2; 10]), 60).await.unwrap();
            // Kept from the write: the file is not read again.
            std::fs::remove_file(dir.path().join(file_name("a"))).unwrap();
            assert_eq!(s.get("a").await.as_deref(), Some(&[1; 10][..]));
            // An overwrite, a delete, an expiry: what memory holds follows the entry.
            s.put("a", b(&[3; 10]), 60).await.unwrap();
            assert_eq!(s.get("a").await.as_deref(), Some(&[3; 10][..]));
            assert!(s.delete("a"));
            assert_eq!(s.get("a").await, None);
            s.put("x", b(&[4; 5]), 0).await.unwrap();
            assert_eq!(s.get("x").await, None, "expired, though in memory");
            // Past the memory bound the least recently used value leaves memory, not the store.
            s.put("c", b(&[5; 10]), 60).await.unwrap();
            s.put("d", b(&[6; 10]), 60).await.unwrap();
            assert!(s.inner.lock().entries["b"].kept.is_none(), "b was least recently used");
            assert_eq!(s.get("b").await.as_deref(), Some(&[2; 10][..]), "read from its file");
            assert!(s.inner.lock().entries["b"].kept.is_some(), "and kept again");
            // A value larger than the memory bound is only ever read from disk.
            s.put("big", b(&[7; 30]), 60).await.unwrap();
            assert_eq!(s.get("big").await.as_deref(), Some(&[7; 30][..]));
            assert!(s.inner.lock().entries["big"].kept.is_none());
            assert_consistent(&s, dir.path(), 1000);
        });
    }

    #[test]
    fn a_value_read_while_its_entry_was_rewritten_is_not_kept() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let s = DiskStore::open_keeping(dir.path(), 1000, 100).unwrap();
            s.put("a", b(b"old"), 60).await.unwrap();
            let old_write = s.inner.lock().entries["a"].written;
            s.inner.lock().entries.get_mut("a").unwrap().kept = None;
            s.inner.lock().kept_lru.clear();
            s.inner.lock().kept_bytes = 0;
            s.put("a", b(b"new"), 60).await.unwrap();
            s.inner.lock().entries.get_mut("a").unwrap().kept = None;
            s.inner.lock().kept_lru.clear();
            s.inner.lock().kept_bytes = 0;
            // The read of the old file ends after the new write landed.
            s.inner.lock().keep("a", old_write, b(b"old"));
            assert!(s.inner.lock().entries["a"].kept.is_none());
            assert_eq!(s.get("a").await.as_deref(), Some(&b"new"[..]));
            assert_consistent(&s, dir.path(), 1000);
        });
    }
}
