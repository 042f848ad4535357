//! The response cache (docs/cache.md), host-free: keys, the entry format shared by L1
//! and L2, and L1's bounded slots in Envoy shared data.
//!
//! An entry is a complete success kept in a format-neutral form (base64 images, their texts,
//! usage), so a request for `url` can be served from an entry stored for `b64_json`.

use sha2::{Digest, Sha256};

use crate::gemini::Usage;
use crate::hash::hex;
use crate::image_type::ImageType;
use crate::openai::ImageView;
use crate::reader::Reader;
use crate::request::ImageRequest;

const ENTRY_MAGIC: &[u8; 4] = b"GIE1";
const NO_TEXT: u32 = u32::MAX;

/// A cache key: `img:{variant}:{quality}:{style}:{sha256 hex}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheKey {
    pub key: String,
    /// The first 8 bytes of the hash, which pick the L1 slot.
    pub slot_seed: u64,
}

impl CacheKey {
    /// A key as written out (`img:...:{sha256 hex}`), with the slot seed its hash gives.
    pub fn from_key(key: &str) -> Option<CacheKey> {
        let hash = key.strip_prefix("img:")?.rsplit(':').next()?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let seed = u64::from_str_radix(hash.get(..16)?, 16).ok()?;
        Some(CacheKey { key: key.to_string(), slot_seed: seed })
    }
}

/// The key of a request: the hash covers everything that changes what Gemini gets (upstream
/// model, final prompt, ratio, image size, n, each category's threshold, and for edits each
/// input image and the mask in order, with the text after them), so two requests share an
/// entry only if Gemini would get identical calls.
pub fn cache_key(req: &ImageRequest, private_to: Option<&str>) -> CacheKey {
    let mut h = Sha256::new();
    let mut field = |name: &str, value: &[u8]| {
        h.update(name.as_bytes());
        h.update((value.len() as u64).to_be_bytes());
        h.update(value);
    };
    field("v", b"1");
    field("model", req.upstream.as_bytes());
    field("prompt", req.final_prompt.as_bytes());
    field("ratio", req.ratio.map_or("", |r| r.as_str()).as_bytes());
    field("image_size", req.image_size.map_or("", |s| s.as_str()).as_bytes());
    field("n", req.n.to_string().as_bytes());
    for category in crate::safety::HARM_CATEGORIES {
        field(category, req.safety.gemini_threshold().as_bytes());
    }
    // Generations add nothing here, so their keys stay what they were.
    for digest in &req.inputs.images {
        field("image", digest);
    }
    if let Some(mask) = &req.inputs.mask {
        field("mask", mask);
    }
    if let Some(text) = &req.closing_text {
        field("closing_text", text.as_bytes());
    }
    // A private profile's entries: nobody outside it finds them (contract section 15).
    if let Some(profile) = private_to {
        field("profile", profile.as_bytes());
    }
    let digest = h.finalize();
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&digest[..8]);
    let key = format!(
        "img:{}:{}:{}:{}",
        req.variant_name,
        req.quality.map_or("auto", |q| q.as_str()),
        req.style.map_or("none", |s| s.as_str()),
        hex(&digest)
    );
    CacheKey { key, slot_seed: u64::from_be_bytes(seed) }
}

/// A decoded entry, borrowing from the bytes it was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub key: &'a str,
    pub created: u64,
    pub usage: Option<Usage>,
    pub images: Vec<ImageView<'a>>,
}

/// Writes an entry. `images` must be non-empty.
pub fn encode_entry(key: &str, created: u64, usage: Option<Usage>, images: &[ImageView]) -> Vec<u8> {
    let payload: usize =
        images.iter().map(|i| i.base64.len() + i.mime_type.len() + i.text.map_or(0, str::len) + 10).sum();
    let mut out = Vec::with_capacity(payload + key.len() + 64);
    out.extend_from_slice(ENTRY_MAGIC);
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&created.to_be_bytes());
    match usage {
        Some(u) => {
            // 2: with the input tokens by modality (1, without them, is still read).
            out.push(2);
            for v in [u.input_tokens, u.output_tokens, u.total_tokens, u.text_tokens, u.image_tokens] {
                out.extend_from_slice(&v.to_be_bytes());
            }
        }
        None => out.push(0),
    }
    out.extend_from_slice(&(images.len() as u32).to_be_bytes());
    for i in images {
        out.extend_from_slice(&(i.mime_type.len() as u32).to_be_bytes());
        out.extend_from_slice(i.mime_type.as_bytes());
        match i.text {
            Some(t) => {
                out.extend_from_slice(&(t.len() as u32).to_be_bytes());
                out.extend_from_slice(t.as_bytes());
            }
            None => out.extend_from_slice(&NO_TEXT.to_be_bytes()),
        }
        out.extend_from_slice(&(i.base64.len() as u32).to_be_bytes());
        out.extend_from_slice(i.base64);
    }
    out
}

/// Reads an entry; `None` for anything that is not a whole, well-formed entry for `key`. This
/// checks structure only: enough for entries this filter wrote into shared data (L1); an entry
/// from outside the process (L2) must also pass `verify_untrusted`.
pub fn decode_entry<'a>(bytes: &'a [u8], key: &str) -> Option<Entry<'a>> {
    let mut r = Reader::new(bytes);
    if r.take(4)? != ENTRY_MAGIC {
        return None;
    }
    let key_len = r.u32()? as usize;
    let stored_key = r.str(key_len)?;
    if stored_key != key {
        return None;
    }
    let created = r.u64()?;
    let usage = match r.take(1)?[0] {
        0 => None,
        tag @ (1 | 2) => {
            let (input_tokens, output_tokens, total_tokens) = (r.u64()?, r.u64()?, r.u64()?);
            let (text_tokens, image_tokens) = if tag == 2 { (r.u64()?, r.u64()?) } else { (0, 0) };
            Some(Usage { input_tokens, output_tokens, total_tokens, text_tokens, image_tokens })
        }
        _ => return None,
    };
    let count = r.u32()? as usize;
    if count == 0 || count > 16 {
        return None;
    }
    let mut images = Vec::with_capacity(count);
    for _ in 0..count {
        let mime_len = r.u32()? as usize;
        let mime_type = r.str(mime_len)?;
        if !mime_type.starts_with("image/") || mime_type.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
            return None;
        }
        let text_len = r.u32()?;
        let text = if text_len == NO_TEXT { None } else { Some(r.str(text_len as usize)?) };
        let b64_len = r.u32()? as usize;
        let base64 = r.take(b64_len)?;
        images.push(ImageView { mime_type, text, base64 });
    }
    if r.rest() != 0 {
        return None;
    }
    Some(Entry { key: stored_key, created, usage, images })
}

/// When an entry made at `created` (seconds) stops being served: `ttl_seconds` after Gemini
/// answered it, whichever tier or copy it comes from.
pub fn expires_at(created: u64, ttl_seconds: u64) -> u64 {
    created.saturating_add(ttl_seconds)
}

/// How far in the future an entry's creation time may lie (clocks of a fleet differ a little).
pub const MAX_CLOCK_SKEW_S: u64 = 300;

/// Why an entry from outside the process is not served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Distrust {
    /// Not the number of images the request asks for (only complete answers are stored).
    WrongCount,
    /// An image that is not standard base64: it would break the JSON answer.
    BadBase64,
    /// An image whose first bytes are not of its declared type.
    WrongType,
    /// Older than the TTL, or made further in the future than clocks differ.
    Expired,
}

/// Checks an entry from outside the process (L2) as fully as a Gemini answer before a byte of
/// it reaches a client or L1: image count, base64 alphabet, each image's first bytes against
/// its declared type, and its age.
pub fn verify_untrusted(entry: &Entry, images_wanted: u32, now_s: u64, ttl_seconds: u64) -> Result<(), Distrust> {
    verify_untrusted_but(entry, images_wanted, now_s, ttl_seconds, None)
}

/// As `verify_untrusted`, but the image at `decoded` is left to its caller, who decodes it
/// whole (which refuses anything but base64) and sniffs the bytes: an image URL served from
/// L2 is checked once, not twice.
pub fn verify_untrusted_but(
    entry: &Entry,
    images_wanted: u32,
    now_s: u64,
    ttl_seconds: u64,
    decoded: Option<usize>,
) -> Result<(), Distrust> {
    if entry.images.len() != images_wanted as usize {
        return Err(Distrust::WrongCount);
    }
    if expires_at(entry.created, ttl_seconds) <= now_s || entry.created > now_s.saturating_add(MAX_CLOCK_SKEW_S) {
        return Err(Distrust::Expired);
    }
    for (i, image) in entry.images.iter().enumerate() {
        if decoded == Some(i) {
            continue;
        }
        if !crate::gemini::is_base64(image.base64) {
            return Err(Distrust::BadBase64);
        }
        if ImageType::sniff_base64(image.base64).map(ImageType::as_str) != Some(image.mime_type) {
            return Err(Distrust::WrongType);
        }
    }
    Ok(())
}

/// L1: `max_entries` fixed slots in Envoy shared data, two-way set-associative: a key may live
/// in either of two slots picked by its hash, so two hot keys that share one slot do not evict
/// each other. Slot `i` is two shared-data keys: a small `meta` (expiry and cache key, read
/// first so that a mismatch costs no big copy) and `data` (the entry, whose own key is checked
/// again, so a torn pair is a miss). Memory: at most `max_entries` x (`max_entry_bytes` + meta).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L1Slot {
    pub index: u32,
    pub meta_key: String,
    pub data_key: String,
}

pub fn l1_slot_at(index: u32) -> L1Slot {
    L1Slot {
        index,
        meta_key: format!("gemini_image.l1.{index}.meta"),
        data_key: format!("gemini_image.l1.{index}.data"),
    }
}

/// The one or two slots a key may live in.
pub fn l1_slots(key: &CacheKey, max_entries: u32) -> Vec<L1Slot> {
    let n = u64::from(max_entries.max(1));
    let first = (key.slot_seed % n) as u32;
    let second = ((key.slot_seed >> 32).wrapping_mul(0x9e37_79b9) % n) as u32;
    if second == first {
        vec![l1_slot_at(first)]
    } else {
        vec![l1_slot_at(first), l1_slot_at(second)]
    }
}

pub fn encode_l1_meta(key: &str, expires_at_s: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 8);
    out.extend_from_slice(&expires_at_s.to_be_bytes());
    out.extend_from_slice(key.as_bytes());
    out
}

/// What a slot's meta says about `key` at `now_s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// Holds `key`, not expired: read the data.
    Fresh,
    /// Empty, expired, or unreadable: storing there evicts nothing live.
    Free,
    /// Holds another live key, expiring at this time: storing there evicts it.
    Taken(u64),
}

pub fn l1_slot_state(meta: Option<&[u8]>, key: &str, now_s: u64) -> SlotState {
    let Some(meta) = meta.filter(|m| m.len() > 8) else { return SlotState::Free };
    let mut expiry = [0u8; 8];
    expiry.copy_from_slice(&meta[..8]);
    let expiry = u64::from_be_bytes(expiry);
    if expiry <= now_s {
        return SlotState::Free;
    }
    if &meta[8..] == key.as_bytes() {
        SlotState::Fresh
    } else {
        SlotState::Taken(expiry)
    }
}

/// Where a miss should be stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StorePlan {
    pub slot: u32,
    /// Storing there replaces another live entry.
    pub evicts: bool,
}

/// What an L1 lookup found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L1Read {
    Hit(Vec<u8>),
    Miss(StorePlan),
}

/// Looks `key` up through `read` (a shared-data getter). On a miss, says where to store: a
/// free candidate, else the one whose entry expires first.
pub fn l1_lookup(
    read: &mut dyn FnMut(&str) -> Option<Vec<u8>>,
    key: &CacheKey,
    max_entries: u32,
    now_s: u64,
) -> L1Read {
    let mut plan: Option<(StorePlan, u64)> = None;
    for slot in l1_slots(key, max_entries) {
        let (candidate, expiry) = match l1_slot_state(read(&slot.meta_key).as_deref(), &key.key, now_s) {
            SlotState::Fresh => match read(&slot.data_key) {
                Some(data) if decode_entry(&data, &key.key).is_some() => return L1Read::Hit(data),
                _ => (StorePlan { slot: slot.index, evicts: false }, 0),
            },
            SlotState::Free => (StorePlan { slot: slot.index, evicts: false }, 0),
            SlotState::Taken(expiry) => (StorePlan { slot: slot.index, evicts: true }, expiry),
        };
        if plan.is_none_or(|(p, e)| p.evicts && (!candidate.evicts || expiry < e)) {
            plan = Some((candidate, expiry));
        }
    }
    let fallback = StorePlan { slot: l1_slots(key, max_entries).first().map_or(0, |s| s.index), evicts: false };
    L1Read::Miss(plan.map_or(fallback, |(p, _)| p))
}

/// The path of a key at the cache service.
pub fn l2_path(key: &str) -> String {
    format!("/v1/cache/{key}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use crate::request::parse_request;
    use serde_json::json;
    use std::collections::HashMap;

    fn req(v: serde_json::Value) -> ImageRequest {
        let s = Settings::from_json(b"{}", &|_| None).unwrap();
        parse_request(v.to_string().as_bytes(), &s).unwrap()
    }

    fn key(v: serde_json::Value) -> String {
        cache_key(&req(v), None).key
    }

    #[test]
    fn keys_have_the_contract_shape() {
        let k = key(json!({"prompt": "a cat", "quality": "hd", "style": "vivid", "model": "gemini-3-pro-image-16x9"}));
        let parts: Vec<&str> = k.split(':').collect();
        assert_eq!(&parts[..4], &["img", "gemini-3-pro-image-16x9", "hd", "vivid"]);
        assert_eq!(parts[4].len(), 64);
        assert!(parts[4].bytes().all(|b| b.is_ascii_hexdigit()));
        let k = key(json!({"prompt": "a cat"}));
        assert!(k.starts_with("img:gemini-3-pro-image:auto:none:"), "{k}");
    }

    #[test]
    fn everything_that_changes_the_gemini_call_changes_the_key() {
        let base = json!({"prompt": "a cat", "n": 1});
        let k0 = key(base.clone());
        let variants = [
            json!({"prompt": "a dog", "n": 1}),
            json!({"prompt": "a cat", "n": 2}),
            json!({"prompt": "a cat", "n": 1, "size": "1792x1024"}),
            json!({"prompt": "a cat", "n": 1, "image_size": "2K"}),
            json!({"prompt": "a cat", "n": 1, "safety_threshold": "LOW"}),
            json!({"prompt": "a cat", "n": 1, "style": "vivid"}),
            json!({"prompt": "a cat", "n": 1, "aspect_ratio": "4:5"}),
        ];
        let mut seen = vec![k0.clone()];
        for v in variants {
            let k = key(v.clone());
            assert!(!seen.contains(&k), "{v} shares a key");
            seen.push(k);
        }
        let mut other_model = req(base.clone());
        other_model.upstream = "another-model".into();
        assert_ne!(k0, cache_key(&other_model, None).key);
        // An edit's inputs, in order, and its mask are part of the key.
        let mut edit = req(base.clone());
        edit.inputs.images = vec![[1; 32], [2; 32]];
        let k_edit = cache_key(&edit, None).key;
        edit.inputs.images.reverse();
        assert_ne!(cache_key(&edit, None).key, k_edit, "order matters");
        edit.inputs.mask = Some([3; 32]);
        assert_ne!(cache_key(&edit, None).key, k_edit);
        assert!(![k0.clone()].contains(&k_edit));
        // A private profile's key is its own, and each private profile's differs.
        let base_req = req(base.clone());
        let kids = cache_key(&base_req, Some("kids")).key;
        assert_ne!(kids, k0);
        assert_ne!(kids, cache_key(&base_req, Some("design")).key);
        assert_eq!(kids, cache_key(&base_req, Some("kids")).key);
        // A key read back gives the slot seed it was made with.
        let made = cache_key(&base_req, None);
        assert_eq!(CacheKey::from_key(&made.key), Some(made));
        assert_eq!(CacheKey::from_key("img:x:short"), None);
        assert_eq!(CacheKey::from_key("file:abc"), None);
        // What Gemini does not see does not change the key.
        assert_eq!(k0, key(json!({"prompt": "a cat", "n": 1, "response_format": "url", "user": "u"})));
        assert_eq!(k0, key(json!({"prompt": "a cat", "size": "1024x1024"})));
    }

    fn sample<'a>() -> Vec<ImageView<'a>> {
        vec![
            ImageView { mime_type: "image/png", text: Some("a \"cat\""), base64: b"QUJD" },
            ImageView { mime_type: "image/png", text: None, base64: b"REVG" },
        ]
    }

    #[test]
    fn entries_round_trip() {
        let usage = Some(Usage { input_tokens: 1, output_tokens: 2, total_tokens: 3, text_tokens: 1, image_tokens: 0 });
        let bytes = encode_entry("img:k", 99, usage, &sample());
        let e = decode_entry(&bytes, "img:k").unwrap();
        assert_eq!(e, Entry { key: "img:k", created: 99, usage, images: sample() });
        assert_eq!(decode_entry(&bytes, "img:other"), None, "an entry for another key is a miss");
        // An entry written before the modality counts (usage tag 1) still reads.
        let mut old = bytes.clone();
        let at = 4 + 4 + "img:k".len() + 8; // magic, key length, key, created
        assert_eq!(old[at], 2);
        old[at] = 1;
        old.drain(at + 1 + 24..at + 1 + 40);
        let e = decode_entry(&old, "img:k").unwrap();
        assert_eq!(e.usage.map(|u| (u.input_tokens, u.total_tokens, u.text_tokens)), Some((1, 3, 0)));
    }

    #[test]
    fn damaged_entries_are_misses() {
        let bytes = encode_entry("img:k", 99, None, &sample());
        for cut in 0..bytes.len() {
            assert_eq!(decode_entry(&bytes[..cut], "img:k"), None, "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode_entry(&longer, "img:k"), None);
        assert_eq!(decode_entry(b"garbage garbage garbage", "img:k"), None);
        assert_eq!(decode_entry(&encode_entry("img:k", 1, None, &[]), "img:k"), None);
    }

    const PNG_B64: &[u8] = b"iVBORw0KGgoAAAANSUhEUgAA";

    #[test]
    fn untrusted_entries_are_checked_like_a_gemini_answer() {
        let png = |b64: &'static [u8]| ImageView { mime_type: "image/png", text: None, base64: b64 };
        let check = |images: &[ImageView], wanted: u32, created: u64| {
            let bytes = encode_entry("img:k", created, None, images);
            let entry = decode_entry(&bytes, "img:k").expect("well-formed");
            verify_untrusted(&entry, wanted, 1_000, 60)
        };
        assert_eq!(check(&[png(PNG_B64), png(PNG_B64)], 2, 990), Ok(()));
        assert_eq!(check(&[png(PNG_B64)], 2, 990), Err(Distrust::WrongCount));
        // What would break out of the JSON string, or is not base64 at all.
        for bad in [&b"iVBORw0KGgo\"AAA"[..], b"iVBORw0KGgo\\AAA", b"iVBORw0KGgo\x01AAA", b"no!", b""] {
            assert_eq!(check(&[png(bad)], 1, 990), Err(Distrust::BadBase64), "{bad:?}");
        }
        assert_eq!(check(&[png(b"QUFBQUFBQUFBQUFB")], 1, 990), Err(Distrust::WrongType), "not a PNG");
        let jpeg_named_png = png(b"/9j/4AAQSkZJRgABAQ==");
        assert_eq!(check(&[jpeg_named_png], 1, 990), Err(Distrust::WrongType));
        let jpeg = ImageView { mime_type: "image/jpeg", text: None, base64: b"/9j/4AAQSkZJRgABAQ==" };
        assert_eq!(check(&[jpeg], 1, 990), Ok(()));
        assert_eq!(check(&[png(PNG_B64)], 1, 940), Err(Distrust::Expired), "made 60 s ago: its TTL is over");
        assert_eq!(check(&[png(PNG_B64)], 1, 941), Ok(()));
        assert_eq!(check(&[png(PNG_B64)], 1, 1_000 + MAX_CLOCK_SKEW_S + 1), Err(Distrust::Expired), "from the future");
        assert_eq!(check(&[png(PNG_B64)], 1, u64::MAX), Err(Distrust::Expired));
        assert_eq!(expires_at(u64::MAX - 1, 60), u64::MAX, "saturates");
    }

    #[test]
    fn l1_lookup_reads_meta_first_and_checks_expiry() {
        use std::cell::RefCell;
        let k = cache_key(&req(json!({"prompt": "a cat"})), None);
        let slots = l1_slots(&k, 64);
        assert_eq!(slots.len(), 2);
        let (a, b) = (&slots[0], &slots[1]);
        let store: RefCell<HashMap<String, Vec<u8>>> = RefCell::new(HashMap::new());
        let reads: RefCell<Vec<String>> = RefCell::new(Vec::new());
        let lookup = |now: u64| {
            let mut get = |name: &str| {
                reads.borrow_mut().push(name.to_string());
                store.borrow().get(name).cloned()
            };
            l1_lookup(&mut get, &k, 64, now)
        };
        assert_eq!(lookup(100), L1Read::Miss(StorePlan { slot: a.index, evicts: false }));
        let entry = encode_entry(&k.key, 1, None, &sample());
        store.borrow_mut().insert(b.meta_key.clone(), encode_l1_meta(&k.key, 200));
        store.borrow_mut().insert(b.data_key.clone(), entry.clone());
        assert_eq!(lookup(100), L1Read::Hit(entry.clone()), "found in the second way");
        assert_eq!(lookup(200), L1Read::Miss(StorePlan { slot: a.index, evicts: false }), "expired");
        store.borrow_mut().insert(a.meta_key.clone(), encode_l1_meta("img:x", 300));
        store.borrow_mut().insert(b.meta_key.clone(), encode_l1_meta("img:y", 250));
        reads.borrow_mut().clear();
        assert_eq!(lookup(100), L1Read::Miss(StorePlan { slot: b.index, evicts: true }), "evict what expires first");
        assert_eq!(*reads.borrow(), vec![a.meta_key.clone(), b.meta_key.clone()], "a mismatch never copies data");
        store.borrow_mut().insert(b.meta_key.clone(), encode_l1_meta("img:y", 50));
        assert_eq!(lookup(100), L1Read::Miss(StorePlan { slot: b.index, evicts: false }), "a free way first");
        // A torn pair (meta for k, data for another key) is a miss.
        store.borrow_mut().insert(a.meta_key.clone(), encode_l1_meta(&k.key, 200));
        store.borrow_mut().insert(a.data_key.clone(), encode_entry("img:another", 1, None, &sample()));
        assert!(matches!(lookup(100), L1Read::Miss(_)));
    }

    #[test]
    fn slots_stay_within_max_entries() {
        for i in 0..200 {
            let k = cache_key(&req(json!({"prompt": format!("p{i}")})), None);
            for slot in l1_slots(&k, 3) {
                assert!(slot.index < 3);
                assert_eq!(slot.meta_key, format!("gemini_image.l1.{}.meta", slot.index));
            }
            assert_eq!(l1_slots(&k, 1).len(), 1);
        }
    }
}
