// What each fuzz target checks, shared by the libFuzzer targets (fuzz/fuzz_targets/) and the
// corpus replay in `cargo test` (tests/fuzz_corpus.rs), so every corpus and regression input
// is checked on stable Rust too. Included with include!().

use std::rc::Rc;

use gemini_image_filter::cache::{decode_entry, encode_entry, l1_slot_state};
use gemini_image_filter::config::Settings;
use gemini_image_filter::endpoint::Endpoint;
use gemini_image_filter::exchange::{Effect, Exchange, RequestHead};
use gemini_image_filter::gemini::{is_base64, read_call, CallResponse};
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
    let out = read_call(CallResponse { status, content_type, body: body.to_vec(), elapsed_ms: 1, timeout_ms: 1000 });
    match &out.result {
        Ok(image) => assert!(is_base64(image.base64())),
        Err(e) => assert!(e.code.as_str().starts_with("IMG_")),
    }
}

/// The cache entry decoder and the L1 slot reader: garbage is a miss; what decodes re-encodes
/// to the same bytes.
pub fn check_entry_decoder(data: &[u8]) {
    let _ = l1_slot_state(Some(data), "img:k", 100);
    for key in ["img:k", ""] {
        if let Some(e) = decode_entry(data, key, true) {
            assert_eq!(encode_entry(e.key, e.created, e.usage, &e.images), data);
        }
    }
    if data.len() > 8 {
        let key_len = u32::from_be_bytes([data[4], data[5], data[6], data[7]]) as usize;
        if let Some(key) = data.get(8..8usize.saturating_add(key_len)).and_then(|k| std::str::from_utf8(k).ok()) {
            if let Some(e) = decode_entry(data, key, false) {
                assert_eq!(encode_entry(e.key, e.created, e.usage, &e.images), data);
            }
        }
    }
}

/// The L2 answer in the request's flow: a hit or a Gemini call, exactly one, whatever the cache
/// service sends.
pub fn check_l2_response(data: &[u8]) {
    let settings = Rc::new(Settings::from_json(br#"{"cache": {"l2": {}}}"#, &|_| None).expect("valid"));
    let head = RequestHead { method: "POST".into(), content_type: Some("application/json".into()), ..Default::default() };
    let mut ex = Exchange::new(settings, Endpoint::Generations, head, 0);
    let effects = ex.on_body(br#"{"prompt": "a cat"}"#, 1);
    assert!(matches!(effects.first(), Some(Effect::CallL2(_))));
    let status = data.first().map(|b| [200u32, 404, 500, 401][(*b % 4) as usize]);
    let body = data.get(1..).unwrap_or_default().to_vec();
    let effects = ex.on_l2_response(CallResponse { status, body, ..Default::default() }, 2);
    let replies = effects.iter().filter(|e| matches!(e, Effect::Reply(_))).count();
    let calls = effects.iter().filter(|e| matches!(e, Effect::CallGemini { .. })).count();
    assert_eq!(replies + calls, 1, "a hit or a Gemini call, exactly one");
}
