//! The hot set: a few rendered answers kept inside each worker's VM, in front of L1.
//!
//! An L1 hit from shared data copies the entry into the VM, renders it, and copies the answer
//! out again; a hot hit only hands Envoy the bytes already rendered. An entry is a valid answer
//! for its key until it expires, so a hot copy needs no check against shared data. Bounded by
//! bytes (and by count), least recently used out first; keyed by cache key and response format.
//! Image URLs keep their decoded images here too, by URL record (docs/image-urls.md).

use std::collections::HashMap;
use std::rc::Rc;

use crate::gemini::Usage;
use crate::request::ResponseFormat;

/// At most this many answers, whatever their size.
const MAX_COUNT: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HotEntry {
    /// The whole answer body, as sent.
    pub body: Rc<Vec<u8>>,
    /// What the body is: `application/json` for an answer, the image's type for a file.
    pub content_type: &'static str,
    pub images: u32,
    pub usage: Option<Usage>,
    pub expires_at_s: u64,
}

pub struct HotSet {
    max_bytes: usize,
    used: usize,
    tick: u64,
    entries: HashMap<String, (HotEntry, u64)>,
}

fn slot_name(key: &str, format: ResponseFormat) -> String {
    let f = match format {
        ResponseFormat::B64Json => "b64",
        ResponseFormat::Url => "url",
    };
    format!("{f}|{key}")
}

fn file_name(record_key: &str) -> String {
    format!("file|{record_key}")
}

impl HotSet {
    pub fn new(max_bytes: usize) -> HotSet {
        HotSet { max_bytes, used: 0, tick: 0, entries: HashMap::new() }
    }

    pub fn get(&mut self, key: &str, format: ResponseFormat, now_s: u64) -> Option<HotEntry> {
        self.get_named(slot_name(key, format), now_s)
    }

    /// The decoded image of an image URL's record.
    pub fn get_file(&mut self, record_key: &str, now_s: u64) -> Option<HotEntry> {
        self.get_named(file_name(record_key), now_s)
    }

    pub fn put_file(&mut self, record_key: &str, entry: HotEntry) {
        self.put_named(file_name(record_key), entry)
    }

    fn get_named(&mut self, name: String, now_s: u64) -> Option<HotEntry> {
        if self.max_bytes == 0 {
            return None;
        }
        let fresh = self.entries.get(&name).map(|(e, _)| e.expires_at_s > now_s)?;
        if !fresh {
            self.remove(&name);
            return None;
        }
        self.tick += 1;
        let tick = self.tick;
        let (entry, used) = self.entries.get_mut(&name)?;
        *used = tick;
        Some(entry.clone())
    }

    pub fn put(&mut self, key: &str, format: ResponseFormat, entry: HotEntry) {
        self.put_named(slot_name(key, format), entry)
    }

    fn put_named(&mut self, name: String, entry: HotEntry) {
        let size = entry.body.len();
        if size > self.max_bytes {
            return;
        }
        self.remove(&name);
        while self.used + size > self.max_bytes || self.entries.len() >= MAX_COUNT {
            let Some(oldest) = self.entries.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| k.clone()) else { break };
            self.remove(&oldest);
        }
        self.tick += 1;
        self.used += size;
        self.entries.insert(name, (entry, self.tick));
    }

    fn remove(&mut self, name: &str) {
        if let Some((e, _)) = self.entries.remove(name) {
            self.used -= e.body.len();
        }
    }

    pub fn used_bytes(&self) -> usize {
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(size: usize, expires: u64) -> HotEntry {
        HotEntry {
            body: Rc::new(vec![b'x'; size]),
            content_type: "application/json",
            images: 1,
            usage: None,
            expires_at_s: expires,
        }
    }

    #[test]
    fn hits_until_expiry_per_format() {
        let mut h = HotSet::new(100);
        h.put("k", ResponseFormat::B64Json, entry(10, 50));
        assert!(h.get("k", ResponseFormat::B64Json, 49).is_some());
        assert!(h.get("k", ResponseFormat::Url, 49).is_none(), "another format is another answer");
        assert!(h.get_file("k", 49).is_none(), "a file is another thing");
        assert!(h.get("k", ResponseFormat::B64Json, 50).is_none(), "expired");
        assert_eq!(h.used_bytes(), 0);
        h.put_file("k", entry(5, 50));
        assert!(h.get_file("k", 49).is_some());
        assert!(h.get("k", ResponseFormat::B64Json, 49).is_none());
    }

    #[test]
    fn bounded_by_bytes_least_recently_used_out() {
        let mut h = HotSet::new(30);
        h.put("a", ResponseFormat::B64Json, entry(10, 99));
        h.put("b", ResponseFormat::B64Json, entry(10, 99));
        h.put("c", ResponseFormat::B64Json, entry(10, 99));
        assert!(h.get("a", ResponseFormat::B64Json, 0).is_some());
        h.put("d", ResponseFormat::B64Json, entry(10, 99));
        assert!(h.get("b", ResponseFormat::B64Json, 0).is_none(), "b was least recently used");
        assert_eq!(h.used_bytes(), 30);
        h.put("huge", ResponseFormat::B64Json, entry(31, 99));
        assert!(h.get("huge", ResponseFormat::B64Json, 0).is_none());
        h.put("d", ResponseFormat::B64Json, entry(5, 99));
        assert_eq!(h.used_bytes(), 25, "a replaced entry gives its bytes back");
        let mut off = HotSet::new(0);
        off.put("a", ResponseFormat::B64Json, entry(0, 99));
        assert!(off.get("a", ResponseFormat::B64Json, 0).is_none());
    }

    #[test]
    fn bounded_by_count() {
        let mut h = HotSet::new(1 << 20);
        for i in 0..200 {
            h.put(&format!("k{i}"), ResponseFormat::B64Json, entry(1, 99));
        }
        assert_eq!(h.entries.len(), MAX_COUNT);
    }
}
