//! Image URLs the filter serves itself (contract section 10, docs/image-urls.md).
//!
//! A `url` answer names each image `{base}/v1/images/files/{token}-{index}`, where `token` is
//! 128 bits the host's CSPRNG drew for that answer: it says nothing about the prompt, and a
//! client cannot guess another's. The images are not stored a second time: a small *record*
//! says which cache entry holds them (the answer's own cache entry, or, when the answer is not
//! cached, an entry written for the URL alone) and until when the URL lives. Records live in
//! L1 (fixed slots in shared data, like entries) and in L2 (`file:{token}`), so a URL works from
//! any worker, and from any Envoy that shares the cache service.
//!
//! `FileFetch` answers `GET`/`HEAD /v1/images/files/{id}`: from the worker's hot set (the image
//! already decoded), else the record and entry in L1, else both from L2; anything missing,
//! expired or altered is a 404 `IMG_IMAGE_NOT_FOUND`.

use std::rc::Rc;

use sha2::{Digest, Sha256};

use crate::access_log::{LogLevel, LogRecord};
use crate::cache::{self, CacheKey, L1Read};
use crate::config::Settings;
use crate::error::{ApiError, ErrorCode};
use crate::exchange::{Effect, HttpCall, LogLine, Reply};
use crate::gemini::CallResponse;
use crate::hash::{hex, sha256_hex};
use crate::hot::HotEntry;
use crate::image_type::ImageType;
use crate::metrics::{CacheState, CacheTier, Counter, Histogram, Outcome};
use crate::named::{named, Named};
use crate::openai;

/// Where image URLs live.
pub const FILES_PATH: &str = "/v1/images/files/";
/// Random bytes in a URL's token.
pub const TOKEN_BYTES: usize = 16;
const RECORD_MAGIC: &str = "GIU1";

/// The image a URL names: its answer's token and its place in that answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileId {
    pub token: String,
    pub index: u32,
}

/// Whether `path` is under the files path (a query string ignored): `Some` with the id when it
/// is one well-formed (`{32 hex}-{index}`), `Some(None)` for any other path below it.
pub fn parse_path(path: &str) -> Option<Option<FileId>> {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let rest = path.strip_prefix(FILES_PATH)?;
    let Some((token, index)) = rest.split_once('-') else { return Some(None) };
    let token_ok =
        token.len() == TOKEN_BYTES * 2 && token.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    // One spelling per image: no leading zero.
    let index_ok = !index.is_empty()
        && index.len() <= 2
        && index.bytes().all(|b| b.is_ascii_digit())
        && (index == "0" || !index.starts_with('0'));
    if !token_ok || !index_ok {
        return Some(None);
    }
    Some(index.parse().ok().map(|index| FileId { token: token.to_string(), index }))
}

/// A token from random bytes.
pub fn token(random: &[u8; TOKEN_BYTES]) -> String {
    hex(random)
}

/// The record's name: private profiles' records carry the profile, so another profile never
/// finds them.
pub fn record_key(token: &str, private_to: Option<&str>) -> String {
    match private_to {
        Some(profile) => format!("file:{profile}:{token}"),
        None => format!("file:{token}"),
    }
}

/// How many record slots L1 has: records are small (about 200 bytes), so many more than
/// entries; a URL whose record was pushed out of L1 is still found in L2.
pub fn record_slots(max_entries: u32) -> u32 {
    max_entries.saturating_mul(16).clamp(1024, 1 << 20)
}

/// The shared-data key of a record's L1 slot.
pub fn record_slot_key(record_key: &str, slots: u32) -> String {
    let digest = Sha256::digest(record_key.as_bytes());
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&digest[..8]);
    format!("gemini_image.url.{}", u64::from_be_bytes(seed) % u64::from(slots.max(1)))
}

/// The entry that holds a URL's images when its answer is not in the cache under its own key
/// (a partial answer, `no-store`, a profile without cache). Shaped like a cache key, so it
/// finds an L1 slot the same way; no request's key is ever equal to it.
pub fn own_entry_key(token: &str) -> String {
    format!("img:file:-:-:{}", sha256_hex(token.as_bytes()))
}

/// Where a URL's images are, and until when the URL lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub entry_key: String,
    /// Images in that entry.
    pub images: u32,
    pub expires_at_s: u64,
}

impl Record {
    pub fn encode(&self, record_key: &str) -> Vec<u8> {
        // The closing newline shows the record is whole: a cut one does not read as another.
        format!("{RECORD_MAGIC}\n{record_key}\n{}\n{}\n{}\n", self.entry_key, self.images, self.expires_at_s)
            .into_bytes()
    }

    /// The record for `record_key` in `bytes`; `None` for anything else (another record that
    /// shares the slot, garbage, a torn write).
    pub fn decode(bytes: &[u8], record_key: &str) -> Option<Record> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut lines = text.split('\n');
        if lines.next()? != RECORD_MAGIC || lines.next()? != record_key {
            return None;
        }
        let entry_key = lines.next()?;
        CacheKey::from_key(entry_key)?;
        let images: u32 = lines.next()?.parse().ok()?;
        let expires_at_s = lines.next()?.parse().ok()?;
        if lines.next() != Some("") || lines.next().is_some() || images == 0 || images > 16 {
            return None;
        }
        Some(Record { entry_key: entry_key.to_string(), images, expires_at_s })
    }
}

/// Image `index` of an entry, decoded, as the hot set keeps it until `expires_at_s`; `None`
/// when the entry does not hold it or it does not decode to an image of its declared type.
pub fn image_of(entry: &cache::Entry, index: u32, expires_at_s: u64) -> Option<HotEntry> {
    let image = entry.images.get(index as usize)?;
    let kind = ImageType::parse(image.mime_type)?;
    let bytes = crate::base64::decode(image.base64)?;
    if ImageType::sniff(&bytes) != Some(kind) {
        return None;
    }
    Some(HotEntry { body: Rc::new(bytes), content_type: kind.as_str(), images: 1, usage: None, expires_at_s })
}

/// How a file fetch ended, for `file_fetches.result.*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FetchResult {
    Ok,
    NotModified,
    NotFound,
}

named!(FetchResult { Ok => "ok", NotModified => "not_modified", NotFound => "not_found" });

/// What the headers said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileHead {
    pub method: String,
    pub if_none_match: Option<String>,
    pub request_id: Option<String>,
}

enum Phase {
    Start,
    AwaitingRecord,
    AwaitingEntry(Record),
    Done,
}

/// One `GET`/`HEAD` of an image URL.
pub struct FileFetch {
    settings: Rc<Settings>,
    head: FileHead,
    id: Option<FileId>,
    record_key: String,
    profile_name: String,
    started_ms: u64,
    phase: Phase,
    tier: Option<CacheTier>,
}

impl FileFetch {
    pub fn new(
        settings: Rc<Settings>,
        id: Option<FileId>,
        head: FileHead,
        profile_name: &str,
        now_ms: u64,
    ) -> FileFetch {
        let private = settings.profile.cache == crate::policy::CacheMode::Private;
        let record_key = id
            .as_ref()
            .map(|id| record_key(&id.token, private.then_some(settings.profile.name.as_str())))
            .unwrap_or_default();
        FileFetch {
            settings,
            head,
            id,
            record_key,
            profile_name: profile_name.chars().take(crate::policy::MAX_PROFILE_NAME + 1).collect(),
            started_ms: now_ms,
            phase: Phase::Start,
            tier: None,
        }
    }

    /// The name of this image in the worker's hot set (empty for an id that is not
    /// well-formed): the record and the index.
    pub fn hot_key(&self) -> String {
        match &self.id {
            Some(id) if !self.record_key.is_empty() => format!("{}#{}", self.record_key, id.index),
            _ => String::new(),
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// A `HEAD`: its reply has headers only.
    pub fn is_head(&self) -> bool {
        self.head.method == "HEAD"
    }

    /// The profile named for the request does not exist.
    pub fn on_unknown_profile(&mut self, now_ms: u64) -> Vec<Effect> {
        let e =
            ApiError::new(ErrorCode::PolicyDenied, "this caller's policy profile is not configured on this gateway");
        self.error(e, now_ms)
    }

    /// The request arrived: answered from `hot` (the worker's decoded copy), else from L1
    /// through `read` (shared data), else the record is asked of L2.
    pub fn start(
        &mut self,
        hot: Option<HotEntry>,
        read: &mut dyn FnMut(&str) -> Option<Vec<u8>>,
        now_ms: u64,
    ) -> Vec<Effect> {
        if !matches!(self.phase, Phase::Start) {
            return Vec::new();
        }
        if self.head.method != "GET" && self.head.method != "HEAD" {
            let method: String = self.head.method.chars().take(16).collect();
            let mut e =
                ApiError::new(ErrorCode::InvalidRequest, format!("image URLs answer GET and HEAD, not {method:?}"));
            e.status_override = Some(405);
            let mut effects = self.error(e, now_ms);
            for effect in &mut effects {
                if let Effect::Reply(r) = effect {
                    r.headers.push(("allow".to_string(), "GET, HEAD".to_string()));
                }
            }
            return effects;
        }
        let settings = self.settings.clone();
        let (Some(index), Some(cache)) = (self.id.as_ref().map(|id| id.index), settings.cache.as_ref()) else {
            return self.not_found(now_ms);
        };
        if self.settings.urls.is_none() {
            return self.not_found(now_ms);
        }
        let now_s = now_ms / 1000;
        if let Some(image) = hot {
            return self.serve(image, CacheTier::L1, false, now_ms);
        }
        if let Some(l1) = &cache.l1 {
            let slot = record_slot_key(&self.record_key, record_slots(l1.max_entries));
            let record = read(&slot).and_then(|b| Record::decode(&b, &self.record_key));
            match record {
                Some(r) if r.expires_at_s <= now_s => return self.not_found(now_ms),
                Some(r) => {
                    if let Some(key) = CacheKey::from_key(&r.entry_key) {
                        if let L1Read::Hit(bytes) = cache::l1_lookup(read, &key, l1.max_entries, now_s) {
                            let image = cache::decode_entry(&bytes, &r.entry_key)
                                .and_then(|e| image_of(&e, index, r.expires_at_s));
                            if let Some(image) = image {
                                return self.serve(image, CacheTier::L1, true, now_ms);
                            }
                        }
                    }
                }
                None => {}
            }
        }
        match &cache.l2 {
            Some(l2) => {
                self.phase = Phase::AwaitingRecord;
                vec![Effect::CallL2(HttpCall::l2_get(l2, &self.record_key))]
            }
            None => self.not_found(now_ms),
        }
    }

    /// L2 answered the record, then the entry; an entry that passes its checks is copied into
    /// L1 (with its record) through `read`, which finds it a slot, so every worker has it.
    pub fn on_l2_response(
        &mut self,
        response: CallResponse,
        read: &mut dyn FnMut(&str) -> Option<Vec<u8>>,
        now_ms: u64,
    ) -> Vec<Effect> {
        let now_s = now_ms / 1000;
        let settings = self.settings.clone();
        let (Some(index), Some(cache)) = (self.id.as_ref().map(|id| id.index), settings.cache.as_ref()) else {
            return Vec::new();
        };
        let Some(l2) = &cache.l2 else { return Vec::new() };
        let failed = !matches!(response.status, Some(200 | 404));
        let mut effects = Vec::new();
        if failed {
            effects.push(Effect::Count(Counter::CacheL2Errors, 1));
        }
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::AwaitingRecord => {
                let record = (response.status == Some(200))
                    .then(|| Record::decode(&response.body, &self.record_key))
                    .flatten()
                    .filter(|r| r.expires_at_s > now_s);
                match record {
                    Some(r) => {
                        effects.push(Effect::CallL2(HttpCall::l2_get(l2, &r.entry_key)));
                        self.phase = Phase::AwaitingEntry(r);
                    }
                    None => effects.extend(self.not_found(now_ms)),
                }
            }
            Phase::AwaitingEntry(r) => {
                // Untrusted, as any L2 answer: checked whole before a byte is served.
                let ttl = cache.ttl_seconds.max(self.settings.urls.as_ref().map_or(0, |u| u.ttl_seconds));
                // The image served is checked by decoding it whole (`image_of`), the others
                // as any L2 answer's images are.
                let image = (response.status == Some(200))
                    .then(|| cache::decode_entry(&response.body, &r.entry_key))
                    .flatten()
                    .filter(|e| cache::verify_untrusted_but(e, r.images, now_s, ttl, Some(index as usize)).is_ok())
                    .and_then(|e| image_of(&e, index, r.expires_at_s));
                match image {
                    Some(image) => {
                        effects.extend(self.serve(image, CacheTier::L2, true, now_ms));
                        effects.extend(self.copy_to_l1(&r, response.body, read, now_s));
                    }
                    None => effects.extend(self.not_found(now_ms)),
                }
            }
            other => self.phase = other,
        }
        effects
    }

    /// The writes that put an entry read from L2, and its record, into L1 (when L1 is on and
    /// the entry fits), in the slot a miss would use; the copy lives no longer than the URL.
    fn copy_to_l1(
        &self,
        record: &Record,
        entry: Vec<u8>,
        read: &mut dyn FnMut(&str) -> Option<Vec<u8>>,
        now_s: u64,
    ) -> Vec<Effect> {
        let Some(l1) = self.settings.cache.as_ref().and_then(|c| c.l1.as_ref()) else { return Vec::new() };
        let Some(key) = CacheKey::from_key(&record.entry_key) else { return Vec::new() };
        if entry.len() > l1.max_entry_bytes {
            return Vec::new();
        }
        let mut effects = Vec::new();
        if let L1Read::Miss(plan) = cache::l1_lookup(read, &key, l1.max_entries, now_s) {
            effects.push(Effect::store_l1(plan.slot, &record.entry_key, record.expires_at_s, Rc::new(entry)));
            effects.push(Effect::Count(Counter::CacheStores(CacheTier::L1), 1));
        }
        effects.push(Effect::StoreShared {
            key: record_slot_key(&self.record_key, record_slots(l1.max_entries)),
            value: Rc::new(record.encode(&self.record_key)),
        });
        effects
    }

    /// The client went away before the answer.
    pub fn on_abandoned(&mut self, now_ms: u64) -> Vec<Effect> {
        if matches!(self.phase, Phase::Done) {
            return Vec::new();
        }
        self.phase = Phase::Done;
        vec![self.log(499, Outcome::ClientClosed, None, now_ms)]
    }

    fn serve(&mut self, image: HotEntry, tier: CacheTier, remember: bool, now_ms: u64) -> Vec<Effect> {
        self.phase = Phase::Done;
        self.tier = Some(tier);
        let now_s = now_ms / 1000;
        let etag = match &self.id {
            Some(id) => format!("\"{}-{}\"", id.token, id.index),
            None => String::new(),
        };
        let fresh = self.head.if_none_match.as_deref().is_some_and(|v| etag_matches(v, &etag));
        let mut headers = vec![
            ("etag".to_string(), etag),
            ("cache-control".to_string(), format!("private, max-age={}", image.expires_at_s.saturating_sub(now_s))),
            ("x-image-cache".to_string(), CacheState::Hit(tier).as_str().to_string()),
        ];
        let (status, result, body) = if fresh {
            (304, FetchResult::NotModified, Rc::new(Vec::new()))
        } else {
            headers.insert(0, ("content-type".to_string(), image.content_type.to_string()));
            (200, FetchResult::Ok, image.body.clone())
        };
        let mut effects = vec![
            Effect::Reply(Reply { status, headers, body }),
            self.log(status, Outcome::Success, None, now_ms),
            Effect::Count(Counter::FileFetches(result), 1),
            Effect::Observe(Histogram::RequestLatencyMs, now_ms.saturating_sub(self.started_ms)),
        ];
        if remember {
            effects.push(Effect::RememberFile { record_key: self.hot_key(), entry: image });
        }
        effects
    }

    fn not_found(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut effects = self.error(
            ApiError::new(ErrorCode::ImageNotFound, "no image at this URL: it is unknown, expired or no longer held"),
            now_ms,
        );
        effects.push(Effect::Count(Counter::FileFetches(FetchResult::NotFound), 1));
        effects
    }

    fn error(&mut self, e: ApiError, now_ms: u64) -> Vec<Effect> {
        self.phase = Phase::Done;
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        if !e.code.should_retry() {
            headers.push(("x-should-retry".to_string(), "false".to_string()));
        }
        vec![
            Effect::Reply(Reply { status: e.status(), headers, body: Rc::new(openai::error_body(&e)) }),
            self.log(e.status(), Outcome::Error, Some(e.code), now_ms),
            Effect::Count(Counter::Errors(e.code), 1),
        ]
    }

    /// The log line: no id, no record key (they are the URL's secret).
    fn log(&self, status: u32, outcome: Outcome, error: Option<ErrorCode>, now_ms: u64) -> Effect {
        let level = match error.map(ErrorCode::category) {
            Some(crate::error::Category::UserError) => LogLevel::Warn,
            Some(_) => LogLevel::Error,
            None => LogLevel::Info,
        };
        let record = LogRecord {
            endpoint: "files",
            outcome,
            status,
            error,
            cache: self.tier.map_or(CacheState::Miss, CacheState::Hit),
            latency_ms: now_ms.saturating_sub(self.started_ms),
            request_id: self.head.request_id.clone(),
            profile: self.profile_name.clone(),
            ..LogRecord::default()
        };
        Effect::Log(LogLine { level, json: record.to_json() })
    }
}

/// An `if-none-match` value against an etag: a list, or `*`; weak tags compare equal.
fn etag_matches(header: &str, etag: &str) -> bool {
    header.split(',').map(str::trim).any(|t| t == "*" || t.trim_start_matches("W/") == etag)
}

/// The writes that make a URL findable: its record into its L1 slot and to L2 (expiring with
/// the URL).
pub fn record_writes(settings: &Settings, record_key: &str, record: &Record, now_s: u64) -> Vec<Effect> {
    let Some(cache) = &settings.cache else { return Vec::new() };
    let value = Rc::new(record.encode(record_key));
    let mut effects = Vec::new();
    if let Some(l1) = &cache.l1 {
        effects.push(Effect::StoreShared {
            key: record_slot_key(record_key, record_slots(l1.max_entries)),
            value: value.clone(),
        });
    }
    if let Some(l2) = &cache.l2 {
        effects.push(Effect::WriteL2(HttpCall::l2_put(
            l2,
            record_key,
            value,
            record.expires_at_s.saturating_sub(now_s),
        )));
    }
    effects
}

#[cfg(test)]
#[path = "files_tests.rs"]
mod tests;
