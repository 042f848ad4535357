// What each fuzz target checks, shared by the libFuzzer targets (fuzz/fuzz_targets/) and the
// corpus replay in `cargo test` (tests/fuzz_corpus.rs), so every corpus and regression input
// is checked on stable Rust too. Included with include!().

use std::rc::Rc;

use gemini_image_filter::cache::{decode_entry, encode_entry, l1_slot_state, verify_untrusted};
use gemini_image_filter::config::{Settings, MAX_TTL_SECONDS};
use gemini_image_filter::endpoint::Endpoint;
use gemini_image_filter::exchange::{Effect, Exchange, Reply, RequestHead};
use gemini_image_filter::files::{self, Record};
use gemini_image_filter::flight::{self, Join, Outlook};
use gemini_image_filter::gemini::{is_base64, read_call, CallResponse};
use gemini_image_filter::image_type::{dimensions, png_info, ImageType};
use gemini_image_filter::multipart;
use gemini_image_filter::request::parse_request;

/// The OpenAI request parser: a request or a 400 naming its field, never a panic.
pub fn check_request_parser(data: &[u8]) {
    let settings = Settings::from_json(br#"{"limits": {"max_n": 10}}"#, &|_| None).expect("valid");
    match parse_request(data, &settings) {
        Ok(r) => {
            assert!(r.n >= 1 && r.n <= 10);
            assert_eq!(r.prompt_hash.len(), 16);
        }
        Err(rejection) => assert!(matches!(rejection.error.status(), 400 | 413)),
    }
}

/// The Gemini answer reader: an image (valid base64) or an error of docs/errors.md, whatever arrives.
pub fn check_gemini_reader(data: &[u8]) {
    let (status, body) = match data.split_first() {
        Some((first, rest)) => (
            match first % 8 {
                0 => None,
                1 => Some(429),
                2 => Some(503),
                3 => Some(400),
                4 => Some(504),
                _ => Some(200),
            },
            rest,
        ),
        None => (Some(200), data),
    };
    let content_type = Some(if data.len().is_multiple_of(2) { "application/json" } else { "text/plain" }.to_string());
    let response = CallResponse { status, content_type, body: body.to_vec(), elapsed_ms: 1, timeout_ms: 1000, ..Default::default() };
    let out = read_call(response);
    match &out.result {
        Ok(image) => assert!(is_base64(image.base64())),
        Err(e) => assert!(e.code.as_str().starts_with("IMG_")),
    }
}

/// The cache entry decoder, the untrusted-entry checks and the L1 slot reader: garbage is a
/// miss; what decodes re-encodes to the same bytes; what passes the checks is safe to put in
/// a JSON string.
pub fn check_entry_decoder(data: &[u8]) {
    let _ = l1_slot_state(Some(data), "img:k", 100);
    let mut keys = vec!["img:k".to_string(), String::new()];
    if data.len() > 8 {
        let key_len = u32::from_be_bytes([data[4], data[5], data[6], data[7]]) as usize;
        if let Some(key) = data.get(8..8usize.saturating_add(key_len)).and_then(|k| std::str::from_utf8(k).ok()) {
            keys.push(key.to_string());
        }
    }
    for key in &keys {
        if let Some(e) = decode_entry(data, key) {
            // Written back, it reads the same; byte for byte too, but for an entry from before
            // the modality counts (usage tag 1), which is written back in the current layout.
            let again = encode_entry(e.key, e.created, e.usage, &e.images);
            assert_eq!(decode_entry(&again, key).as_ref(), Some(&e));
            let tag_at = 8 + e.key.len() + 8;
            if data.get(tag_at) != Some(&1) {
                assert_eq!(again, data);
            }
            let n = e.images.len() as u32;
            if verify_untrusted(&e, n, e.created, 60).is_ok() {
                for image in &e.images {
                    assert!(image.base64.iter().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(b)));
                }
            }
        }
    }
}

/// The L2 answer in the request's flow: a hit or the way to Gemini (admission), exactly one,
/// whatever the cache service sends; every reply is valid JSON. The first byte picks the
/// status; with its high bit set, the rest is wrapped as an entry for the request's own key
/// (magic, key, then the fuzzer's bytes), so the fuzzer reaches the checks behind the key.
pub fn check_l2_response(data: &[u8]) {
    let settings = Rc::new(Settings::from_json(br#"{"cache": {"l2": {}}}"#, &|_| None).expect("valid"));
    let head = RequestHead { method: "POST".into(), content_type: Some("application/json".into()), ..Default::default() };
    let mut ex = Exchange::new(settings, Endpoint::Generations, head, 1_000_000);
    let effects = ex.on_body(br#"{"prompt": "a cat"}"#, 1_000_000);
    let Some(Effect::CallL2(call)) = effects.first() else { panic!("an L2 lookup first") };
    let key = call.headers.iter().find(|(k, _)| k == ":path").map(|(_, v)| v.trim_start_matches("/v1/cache/").to_string());
    let first = data.first().copied().unwrap_or(0);
    let status = data.first().map(|b| [200u32, 404, 500, 401][(*b % 4) as usize]);
    let rest = data.get(1..).unwrap_or_default();
    let body = match key {
        Some(key) if first & 0x80 != 0 => {
            let mut b = b"GIE1".to_vec();
            b.extend_from_slice(&(key.len() as u32).to_be_bytes());
            b.extend_from_slice(key.as_bytes());
            b.extend_from_slice(rest);
            b
        }
        _ => rest.to_vec(),
    };
    let effects = ex.on_l2_response(CallResponse { status, body, ..Default::default() }, 1_000_001);
    let replies: Vec<&Reply> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Reply(r) => Some(r),
            _ => None,
        })
        .collect();
    let onward = effects.iter().filter(|e| matches!(e, Effect::Admit { .. })).count();
    assert_eq!(replies.len() + onward, 1, "a hit or the way to Gemini, exactly one");
    for r in replies {
        assert!(serde_json::from_slice::<serde_json::Value>(&r.body).is_ok(), "a reply that is not JSON");
    }
}

/// The plugin configuration: any bytes are a configuration or a reason, never a panic; an
/// accepted one keeps its numbers in range.
pub fn check_config(data: &[u8]) {
    let env = |name: &str| (name == "GEMINI_IMAGE_SAFETY_THRESHOLD").then(|| "low".to_string());
    match Settings::from_json(data, &env) {
        Ok(s) => {
            assert!((1..=10).contains(&s.limits.max_n));
            if let Some(c) = &s.cache {
                assert!(c.ttl_seconds >= 1 && c.ttl_seconds <= MAX_TTL_SECONDS);
            }
            assert!(s.limits.max_inflight_bytes <= 1 << 30);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// The multipart reader: the first line is the Content-Type (or, when it is not one, the
/// boundary itself), the rest the body. Every part's data is a slice of the body that holds no
/// delimiter, the count stays within the limits, an error's message is short and quotes
/// nothing; the header readers behind the edits endpoint take every file part too.
pub fn check_multipart(data: &[u8]) {
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let head = head.trim_end_matches('\r');
    let boundary = match multipart::boundary(head) {
        Ok(b) => {
            assert!((1..=multipart::MAX_BOUNDARY_LEN).contains(&b.len()));
            b
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            head.to_string()
        }
    };
    let limits = multipart::Limits { max_parts: 8, max_header_bytes: 256 };
    match multipart::parse(body, &boundary, &limits) {
        Ok(parts) => {
            assert!(parts.len() <= limits.max_parts);
            let whole = body.as_ptr_range();
            let delimiter = format!("\r\n--{boundary}").into_bytes();
            for part in &parts {
                let slice = part.data.as_ptr_range();
                assert!(whole.start <= slice.start && slice.end <= whole.end, "data outside the body");
                assert!(!part.name.is_empty());
                assert!(!part.data.windows(delimiter.len()).any(|w| w == delimiter.as_slice()), "a delimiter in data");
                let sniffed = ImageType::sniff(part.data);
                let size = dimensions(part.data);
                assert!(size.is_none() || sniffed.is_some());
                if let Some(info) = png_info(part.data) {
                    assert_eq!(sniffed, Some(ImageType::Png));
                    assert_eq!(size, Some((info.width, info.height)));
                }
            }
        }
        Err(e) => {
            let message = e.to_string();
            assert!(!message.is_empty() && message.len() <= 80 && !message.contains('"'), "{message}");
        }
    }
}

/// Image URL ids, records and the base64 decoder that serves their images: whatever a client
/// puts in the path or L2 returns for a record, an answer or `None`, never a panic; a record
/// read back writes back as the same record; the decoder agrees with the encoder and the
/// alphabet check.
pub fn check_files(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Some(Some(id)) = files::parse_path(&format!("{}{}", files::FILES_PATH, text)) {
        assert_eq!(id.token.len(), 32);
        assert!(id.index < 100);
    }
    let _ = files::parse_path(&text);
    for key in ["file:0123456789abcdef0123456789abcdef", "file:kids:0123456789abcdef0123456789abcdef"] {
        if let Some(r) = Record::decode(data, key) {
            // Numbers may come with leading zeros from outside: the record, not the text, round-trips.
            assert_eq!(Record::decode(&r.encode(key), key), Some(r.clone()));
            assert!(r.images >= 1 && r.images <= 16);
        }
    }
    match gemini_image_filter::base64::decode(data) {
        Some(bytes) => {
            assert!(is_base64(data) || data.is_empty());
            // Unused low bits may be set (\"Zh==\" is \"f\"): the bytes, not the text, round-trip.
            let mut again = Vec::new();
            gemini_image_filter::base64::encode_into(&mut again, &bytes);
            assert_eq!(gemini_image_filter::base64::decode(&again).as_deref(), Some(&bytes[..]));
        }
        None => assert!(!is_base64(data)),
    }
}

/// The stream transform on whatever Gemini's event stream holds, fed in pieces of a size the
/// first byte picks: never a panic, output only whole events whose data is JSON with a `type`,
/// and after a completed or error event nothing more.
pub fn check_stream(data: &[u8]) {
    use gemini_image_filter::stream::{EventMeta, StreamKind, StreamOptions, StreamTransform};
    let Some((&knobs, rest)) = data.split_first() else { return };
    let kind = if knobs & 0x80 == 0 { StreamKind::Generation } else { StreamKind::Edit };
    let meta = EventMeta { kind, created_at: 1, quality: "auto".into(), background: "auto".into() };
    let options = StreamOptions { meta, partial_images: u32::from(knobs & 3), max_event_bytes: 4096 };
    let mut t = StreamTransform::new(options);
    let piece = usize::from((knobs >> 2) & 0x1f) + 1;
    let mut out = Vec::new();
    let chunks: Vec<&[u8]> = rest.chunks(piece).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        out.extend(t.on_body(chunk, i + 1 == chunks.len()));
    }
    if chunks.is_empty() {
        out.extend(t.on_body(b"", true));
    }
    let text = std::str::from_utf8(&out).expect("events are UTF-8");
    let mut ended = false;
    for event in text.split_terminator("\n\n") {
        assert!(!ended, "an event after the stream ended: {event:?}");
        let data = event.lines().find_map(|l| l.strip_prefix("data: ")).expect("a data line");
        let v: serde_json::Value = serde_json::from_str(data).expect("event data is JSON");
        let ty = v["type"].as_str().expect("a type");
        ended = ty == "error" || ty.ends_with(".completed");
    }
    assert!(text.is_empty() || text.ends_with("\n\n"), "whole events only");
}

/// The coalescing lease decoder and the decisions read from a slot: whatever bytes a slot holds
/// (another version, a torn write), a lease or `None`, never a panic; a lease read back writes
/// back byte for byte; `join`, `outlook` and `finish` on those bytes answer, and whatever they
/// write reads back as a lease.
pub fn check_flight(data: &[u8]) {
    let decoded = flight::decode(data);
    if let Some(lease) = &decoded {
        let again = flight::encode(lease);
        assert_eq!(flight::decode(&again).as_ref(), Some(lease));
        assert_eq!(again, data, "one encoding per lease");
        if let flight::State::Failed { status, body, .. } = &lease.state {
            assert!((400..=599).contains(status) && body.len() <= flight::MAX_ERROR_BYTES);
        }
    }
    let key = decoded.as_ref().map_or("img:k", |l| l.key.as_str());
    let (flight_id, expiry) = decoded.as_ref().map_or((1, 0), |l| (l.flight, l.expires_at_ms));
    for now in [0, expiry.saturating_sub(1), expiry, u64::MAX] {
        for k in [key, "img:k"] {
            match flight::join(Some(data), k, 2, now, 30_000) {
                Join::Lead(value) => assert!(flight::decode(&value).is_some()),
                Join::Follow { flight, expires_at_ms } => assert!(flight == flight_id && now < expires_at_ms),
                Join::Alone => assert!(decoded.is_some()),
            }
            if let Outlook::Waiting | Outlook::Ready | Outlook::Failed { .. } = flight::outlook(Some(data), k, flight_id, now) {
                assert!(decoded.is_some());
            }
            let end = flight::State::Failed { status: 503, retry_after_s: None, body: data.to_vec() };
            if let Some(value) = flight::finish(Some(data), k, flight_id, end, now, 2_000) {
                assert!(flight::decode(&value).is_some(), "an over-long body is written as a generic error");
            }
        }
    }
}
