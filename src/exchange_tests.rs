use std::rc::Rc;

use serde_json::{json, Value};

use super::*;
use crate::config::Settings;
use crate::metrics::{CacheTier, Counter, Histogram, Outcome};
use crate::safety::SafetyLevel;

fn settings(json: &str) -> Rc<Settings> {
    let env = |k: &str| (k == "GEMINI_API_KEY").then(|| "test-key".to_string());
    Rc::new(Settings::from_json(json.as_bytes(), &env).unwrap())
}

fn head() -> RequestHead {
    RequestHead {
        content_type: Some("application/json".into()),
        content_length: None,
        request_id: Some("req-1".into()),
        cache_control: None,
    }
}

fn image_body(data: &str) -> Vec<u8> {
    format!(
        r#"{{"candidates":[{{"content":{{"parts":[{{"inlineData":{{"mimeType":"image/png","data":"{data}"}}}}]}},"finishReason":"STOP"}}],
        "usageMetadata":{{"promptTokenCount":4,"candidatesTokenCount":10,"totalTokenCount":14}}}}"#
    )
    .into_bytes()
}

fn ok_response(data: &str) -> CallResponse {
    CallResponse {
        status: Some(200),
        content_type: Some("application/json".into()),
        body: image_body(data),
        elapsed_ms: 5,
        timeout_ms: 1000,
    }
}

fn error_response(status: u32, gstatus: &str) -> CallResponse {
    CallResponse {
        status: Some(status),
        content_type: Some("application/json".into()),
        body: format!(r#"{{"error":{{"code":{status},"message":"m","status":"{gstatus}"}}}}"#).into_bytes(),
        elapsed_ms: 5,
        timeout_ms: 1000,
    }
}

fn reply(effects: &[Effect]) -> &Reply {
    effects
        .iter()
        .find_map(|e| match e {
            Effect::Reply(r) => Some(r),
            _ => None,
        })
        .expect("a reply")
}

fn log_of(effects: &[Effect]) -> (LogLevel, Value) {
    let logs: Vec<_> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Log(l) => Some(l),
            _ => None,
        })
        .collect();
    assert_eq!(logs.len(), 1, "exactly one log line");
    (logs[0].level, serde_json::from_str(&logs[0].json).unwrap())
}

fn counts(effects: &[Effect]) -> Vec<(Counter, u64)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Count(c, n) => Some((c.clone(), *n)),
            _ => None,
        })
        .collect()
}

fn json_of(r: &Reply) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

/// Runs a request through to the call-out effect and returns the exchange and the call.
fn start(s: &Rc<Settings>, body: Value) -> (Exchange, u32, HttpCall) {
    let mut ex = Exchange::new(s.clone(), head(), 1_000);
    assert!(ex.on_headers(1_000).is_empty());
    let effects = ex.on_body(body.to_string().as_bytes(), 1_001);
    match effects.into_iter().next() {
        Some(Effect::CallGemini { count, call }) => (ex, count, call),
        other => panic!("expected a call, got {other:?}"),
    }
}

#[test]
fn a_request_becomes_n_identical_gemini_calls() {
    let s = settings("{}");
    let (_, count, call) = start(
        &s,
        json!({"prompt": "a red fox", "n": 3, "size": "1792x1024", "quality": "hd", "safety_threshold": "low"}),
    );
    assert_eq!(count, 3);
    assert_eq!(call.cluster, "gemini");
    assert_eq!(call.timeout_ms, 180_000);
    let h = |k: &str| call.headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(h(":path"), Some("/v1beta/models/gemini-3-pro-image-preview:generateContent"));
    assert_eq!(h(":authority"), Some("generativelanguage.googleapis.com"));
    assert_eq!(h(":method"), Some("POST"));
    assert_eq!(h("x-goog-api-key"), Some("test-key"));
    assert_eq!(h("authorization"), None);
    let body: Value = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(body["generationConfig"]["imageConfig"], json!({"aspectRatio": "16:9", "imageSize": "4K"}));
    assert_eq!(body["safetySettings"][0]["threshold"], "BLOCK_ONLY_HIGH");
}

#[test]
fn all_calls_succeeding_gives_an_openai_answer_and_one_log_line() {
    let s = settings("{}");
    let (mut ex, _, _) = start(&s, json!({"prompt": "a red fox", "n": 2}));
    let first = ex.on_call_response(1, ok_response("QkJC"), 3_000);
    assert_eq!(first, vec![Effect::Observe(Histogram::UpstreamLatencyMs, 5)], "no reply before every call answered");
    let effects = ex.on_call_response(0, ok_response("QUFB"), 4_500);
    let r = reply(&effects);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-image-cache"), Some("miss"));
    assert_eq!(r.header("x-image-safety"), Some("OFF"));
    assert_eq!(r.header("x-image-prompt-hash"), Some(&crate::hash::prompt_hash("a red fox")[..]));
    assert_eq!(r.header("x-images-failed"), None);
    let v = json_of(r);
    assert_eq!(v["created"], 4);
    assert_eq!(v["data"][0]["b64_json"], "QUFB", "images keep call order");
    assert_eq!(v["data"][1]["b64_json"], "QkJC");
    assert_eq!(v["usage"]["total_tokens"], 28);
    let (level, log) = log_of(&effects);
    assert_eq!(level, LogLevel::Info);
    assert_eq!(log["status"], 200);
    assert_eq!(log["latency_ms"], 3_500);
    assert_eq!(log["request_id"], "req-1");
    assert_eq!(log["images"], 2);
    assert!(!log.to_string().contains("red fox"));
    let counted = counts(&effects);
    assert!(counted.contains(&(Counter::Requests(Outcome::Success), 1)));
    assert!(counted.contains(&(Counter::Images, 2)));
    assert!(counted.contains(&(Counter::UpstreamCalls, 2)));
    assert!(counted.contains(&(Counter::ModelRequests("gemini-3-pro-image".into()), 1)));
    assert!(counted.contains(&(Counter::SafetyApplied(SafetyLevel::Off), 1)));
    assert!(effects.contains(&Effect::Observe(Histogram::RequestLatencyMs, 3_500)));
    assert!(ex.is_done());
    assert!(ex.on_call_response(0, ok_response("QUFB"), 5_000).is_empty(), "nothing after the reply");
}

#[test]
fn partial_success_answers_200_with_a_failure_count() {
    let s = settings("{}");
    let (mut ex, _, _) = start(&s, json!({"prompt": "p", "n": 3}));
    ex.on_call_response(0, error_response(500, "INTERNAL"), 2_000);
    ex.on_call_response(1, ok_response("QUFB"), 2_000);
    let effects = ex.on_call_response(2, CallResponse { status: None, ..Default::default() }, 2_000);
    let r = reply(&effects);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-images-failed"), Some("2"));
    assert_eq!(json_of(r)["data"].as_array().unwrap().len(), 1);
    assert!(counts(&effects).contains(&(Counter::Requests(Outcome::Partial), 1)));
}

#[test]
fn safety_blocks_are_counted_under_the_level_in_force() {
    let s = settings(r#"{"safety": {"default": "HIGH"}}"#);
    let (mut ex, _, _) = start(&s, json!({"prompt": "p"}));
    let blocked = CallResponse {
        status: Some(200),
        body: br#"{"promptFeedback":{"blockReason":"SAFETY"}}"#.to_vec(),
        ..Default::default()
    };
    let effects = ex.on_call_response(0, blocked, 2);
    assert_eq!(reply(&effects).status, 400);
    let counted = counts(&effects);
    assert!(counted.contains(&(Counter::Errors(ErrorCode::SafetyBlocked), 1)));
    assert!(counted.contains(&(Counter::SafetyBlocks(SafetyLevel::High), 1)));
    assert!(counted.contains(&(Counter::Requests(Outcome::Error), 1)));
}

#[test]
fn all_failing_picks_the_most_telling_error() {
    let s = settings("{}");
    let (mut ex, _, _) = start(&s, json!({"prompt": "p", "n": 3}));
    ex.on_call_response(0, error_response(500, "INTERNAL"), 2_000);
    ex.on_call_response(1, CallResponse { status: None, ..Default::default() }, 2_000);
    let mut q = error_response(429, "RESOURCE_EXHAUSTED");
    q.body = br#"{"error":{"code":429,"message":"m","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"7s"}]}}"#.to_vec();
    let effects = ex.on_call_response(2, q, 2_000);
    let r = reply(&effects);
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("7"));
    assert_eq!(json_of(r)["error"]["code"], "IMG_QUOTA_EXHAUSTED");
    let (level, log) = log_of(&effects);
    assert_eq!(
        (level, log["code"].as_str(), log["upstream_status"].as_u64()),
        (LogLevel::Error, Some("IMG_QUOTA_EXHAUSTED"), Some(429))
    );
}

#[test]
fn bad_requests_answer_400_without_calling_gemini() {
    let s = settings("{}");
    let mut ex = Exchange::new(s, head(), 0);
    let effects = ex.on_body(br#"{"prompt": "a cat", "n": 9}"#, 1);
    assert!(!effects.iter().any(|e| matches!(e, Effect::CallGemini { .. })));
    let r = reply(&effects);
    assert_eq!(r.status, 400);
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert_eq!(r.header("x-image-prompt-hash"), Some(&crate::hash::prompt_hash("a cat")[..]));
    assert_eq!(json_of(r)["error"]["param"], "n");
    let (level, log) = log_of(&effects);
    assert_eq!(level, LogLevel::Warn);
    assert_eq!(log["code"], "IMG_INVALID_REQUEST");
    assert_eq!(log["upstream_status"], Value::Null);
    let counted = counts(&effects);
    assert!(counted.contains(&(Counter::Errors(ErrorCode::InvalidRequest), 1)));
    assert!(!counted.iter().any(|(c, _)| matches!(c, Counter::UpstreamCalls)), "no call was made");
}

#[test]
fn wrong_content_type_is_refused() {
    for ct in [None, Some("text/plain"), Some("application/x-www-form-urlencoded")] {
        let mut ex = Exchange::new(settings("{}"), RequestHead { content_type: ct.map(String::from), ..head() }, 0);
        let r = reply(&ex.on_body(br#"{"prompt":"p"}"#, 1)).clone();
        assert_eq!((r.status, json_of(&r)["error"]["code"].as_str()), (400, Some("IMG_INVALID_REQUEST")), "{ct:?}");
    }
    let mut ex = Exchange::new(
        settings("{}"),
        RequestHead { content_type: Some("Application/JSON; charset=utf-8".into()), ..head() },
        0,
    );
    assert!(matches!(ex.on_body(br#"{"prompt":"p"}"#, 1)[0], Effect::CallGemini { .. }));
}

#[test]
fn bodies_over_the_limit_answer_413() {
    let s = settings(r#"{"limits": {"max_body_bytes": 100}}"#);
    let mut ex = Exchange::new(s.clone(), RequestHead { content_length: Some(101), ..head() }, 0);
    let effects = ex.on_headers(0);
    let r = reply(&effects);
    assert_eq!((r.status, r.header("x-should-retry")), (413, Some("false")));
    assert_eq!(json_of(r)["error"]["code"], "IMG_PAYLOAD_TOO_LARGE");
    assert!(ex.on_body(b"{}", 1).is_empty(), "one reply only");

    let mut chunked = Exchange::new(s, head(), 0);
    assert!(chunked.on_body_progress(100, 0).is_empty());
    assert_eq!(reply(&chunked.on_body_progress(101, 0)).status, 413);
}

#[test]
fn timeouts_answer_504_and_refusals_502() {
    let s = settings(r#"{"gemini": {"timeout_ms": 1000}}"#);
    let (mut ex, _, _) = start(&s, json!({"prompt": "p"}));
    let effects = ex.on_call_response(
        0,
        CallResponse { status: None, elapsed_ms: 1000, timeout_ms: 1000, ..Default::default() },
        2_001,
    );
    assert_eq!(reply(&effects).status, 504);
    let (_, log) = log_of(&effects);
    assert_eq!(log["category"], "NETWORK_ERROR");
    let (mut ex, _, _) = start(&s, json!({"prompt": "p"}));
    let refused = CallResponse {
        status: Some(503),
        content_type: Some("text/plain".into()),
        body: b"upstream connect error".to_vec(),
        ..Default::default()
    };
    let effects = ex.on_call_response(0, refused, 2_000);
    assert_eq!(reply(&effects).status, 502);
    assert_eq!(json_of(reply(&effects))["error"]["code"], "IMG_NETWORK_ERROR");
}

#[test]
fn a_call_that_cannot_be_dispatched_is_an_internal_error() {
    let s = settings("{}");
    let (mut ex, _, _) = start(&s, json!({"prompt": "p"}));
    let effects = ex.on_call_not_dispatched(0, "no cluster", 2);
    assert_eq!(reply(&effects).status, 500);
}

#[test]
fn a_client_that_leaves_gets_a_log_line_and_no_reply() {
    let s = settings("{}");
    let (mut ex, _, _) = start(&s, json!({"prompt": "p"}));
    let effects = ex.on_abandoned(50);
    assert!(!effects.iter().any(|e| matches!(e, Effect::Reply(_))));
    let (_, log) = log_of(&effects);
    assert_eq!(log["outcome"], "client_closed");
    assert!(ex.on_call_response(0, ok_response("QUFB"), 60).is_empty());
    assert!(counts(&effects).contains(&(Counter::Requests(Outcome::ClientClosed), 1)));
}

#[test]
fn url_format_answers_data_uris() {
    let s = settings("{}");
    let (mut ex, _, _) = start(&s, json!({"prompt": "p", "response_format": "url"}));
    let effects = ex.on_call_response(0, ok_response("QUFB"), 2);
    assert_eq!(json_of(reply(&effects))["data"][0]["url"], "data:image/png;base64,QUFB");
}

#[test]
fn cache_header_says_bypass_only_when_a_cache_exists() {
    let no_store = RequestHead { cache_control: Some("no-store".into()), ..head() };
    let mut ex = Exchange::new(settings("{}"), no_store.clone(), 0);
    assert_eq!(reply(&ex.on_body(b"{}", 1)).header("x-image-cache"), Some("miss"));
    let mut ex = Exchange::new(settings(r#"{"cache": {"l1": {}}}"#), no_store, 0);
    assert_eq!(reply(&ex.on_body(b"{}", 1)).header("x-image-cache"), Some("bypass"));
    assert!(has_directive("max-age=0, No-Store", "no-store"));
    assert!(!has_directive("no-storex", "no-store"));
}

/// A tiny host for cache tests: shared data in a map, L2 and Gemini answered by closures.
struct FakeHost {
    shared: std::collections::HashMap<String, Vec<u8>>,
    hot: crate::hot::HotSet,
    l2: Box<dyn FnMut(&HttpCall) -> CallResponse>,
    l2_writes: Vec<(HttpCall, Rc<Vec<u8>>)>,
    gemini_calls: u32,
    gemini: Box<dyn FnMut() -> CallResponse>,
    effects: Vec<Effect>,
}

impl FakeHost {
    fn new() -> FakeHost {
        FakeHost {
            shared: Default::default(),
            hot: crate::hot::HotSet::new(1 << 20),
            l2: Box::new(|_| CallResponse { status: Some(404), ..Default::default() }),
            l2_writes: Vec::new(),
            gemini_calls: 0,
            gemini: Box::new(|| ok_response("QUFB")),
            effects: Vec::new(),
        }
    }

    /// Runs one request to its reply; returns the reply.
    fn request(&mut self, s: &Rc<Settings>, body: Value, cache_control: Option<&str>) -> Reply {
        let mut ex = Exchange::new(
            s.clone(),
            RequestHead { cache_control: cache_control.map(String::from), ..head() },
            1_000_000,
        );
        let mut queue = ex.on_body(body.to_string().as_bytes(), 1_000_001);
        self.effects.clear();
        let mut reply = None;
        while !queue.is_empty() {
            let effect = queue.remove(0);
            self.effects.push(effect.clone());
            let more = match effect {
                Effect::LookupL1 { key, max_entries, format } => match self.hot.get(&key.key, format, 1_000) {
                    Some(hot) => ex.on_l1_hot(hot, 1_000_002),
                    None => {
                        let shared = &self.shared;
                        let mut get = |k: &str| shared.get(k).cloned();
                        ex.on_l1_result(crate::cache::l1_lookup(&mut get, &key, max_entries, 1_000), 1_000_002)
                    }
                },
                Effect::RememberHot { key, format, entry } => {
                    self.hot.put(&key, format, entry);
                    vec![]
                }
                Effect::StoreL1 { meta_key, meta, data_key, data } => {
                    self.shared.insert(data_key, data.as_ref().clone());
                    self.shared.insert(meta_key, meta);
                    vec![]
                }
                Effect::CallL2 { call } => {
                    let r = (self.l2)(&call);
                    ex.on_l2_response(r, 1_000_003)
                }
                Effect::WriteL2 { call, entry } => {
                    self.l2_writes.push((call, entry));
                    vec![]
                }
                Effect::CallGemini { count, .. } => {
                    let mut out = vec![];
                    for i in 0..count {
                        self.gemini_calls += 1;
                        let r = (self.gemini)();
                        out.extend(ex.on_call_response(i, r, 1_000_004));
                    }
                    out
                }
                Effect::Reply(r) => {
                    assert!(reply.is_none(), "one reply");
                    reply = Some(r);
                    vec![]
                }
                _ => vec![],
            };
            queue.extend(more);
        }
        reply.expect("a reply")
    }

    fn counted(&self, c: Counter) -> u64 {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Count(k, n) if *k == c => Some(*n),
                _ => None,
            })
            .sum()
    }
}

fn cached_settings(extra: &str) -> Rc<Settings> {
    settings(&format!(
        r#"{{"cache": {{"ttl_seconds": 60, "l1": {{"max_entries": 4, "max_entry_bytes": 100000}}, "l2": {{}}}}{extra}}}"#
    ))
}

#[test]
fn a_success_is_stored_then_served_from_l1_in_any_format() {
    let s = cached_settings("");
    let mut host = FakeHost::new();
    let r = host.request(&s, json!({"prompt": "a cat", "n": 2}), None);
    assert_eq!((r.status, r.header("x-image-cache")), (200, Some("miss")));
    assert_eq!(host.gemini_calls, 2);
    assert_eq!(host.counted(Counter::CacheMisses), 1);
    assert_eq!(host.counted(Counter::CacheStores(CacheTier::L1)), 1);
    assert_eq!(host.counted(Counter::CacheStores(CacheTier::L2)), 1);
    let (call, entry) = &host.l2_writes[0];
    let h = |k: &str| call.headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(h(":method").as_deref(), Some("PUT"));
    assert!(h(":path").unwrap().starts_with("/v1/cache/img:gemini-3-pro-image:auto:none:"));
    assert_eq!(h("x-cache-ttl-seconds").as_deref(), Some("60"));
    assert!(!entry.is_empty());

    let hit = host.request(&s, json!({"prompt": "a cat", "n": 2, "response_format": "url"}), None);
    assert_eq!((hit.status, hit.header("x-image-cache")), (200, Some("hit-l1")));
    assert_eq!(host.gemini_calls, 2, "no new Gemini call");
    let v = json_of(&hit);
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][0]["url"], "data:image/png;base64,QUFB");
    assert_eq!(v["usage"]["total_tokens"], 28);
    assert_eq!(host.counted(Counter::CacheHits(CacheTier::L1)), 1);
    assert_eq!(hit.header("x-image-prompt-hash"), Some(&crate::hash::prompt_hash("a cat")[..]));
    let (_, log) = log_of(&host.effects);
    assert_eq!((log["cache"].as_str(), log["upstream_status"].clone()), (Some("hit-l1"), Value::Null));
}

#[test]
fn an_l2_hit_is_served_and_fills_l1() {
    let s = cached_settings("");
    let mut first = FakeHost::new();
    first.request(&s, json!({"prompt": "a fox"}), None);
    let entry = first.l2_writes[0].1.as_ref().clone();

    let mut host = FakeHost::new();
    let seen_path = std::rc::Rc::new(std::cell::RefCell::new(String::new()));
    let seen = seen_path.clone();
    host.l2 = Box::new(move |call| {
        *seen.borrow_mut() =
            call.headers.iter().find(|(k, _)| k == ":path").map(|(_, v)| v.clone()).unwrap_or_default();
        CallResponse { status: Some(200), body: entry.clone(), ..Default::default() }
    });
    let r = host.request(&s, json!({"prompt": "a fox"}), None);
    assert_eq!(r.header("x-image-cache"), Some("hit-l2"));
    assert_eq!(host.gemini_calls, 0);
    assert!(seen_path.borrow().starts_with("/v1/cache/img:"));
    assert_eq!(host.counted(Counter::CacheStores(CacheTier::L1)), 1, "L2 hit fills L1");
    host.l2 = Box::new(|_| panic!("L1 should answer now"));
    assert_eq!(host.request(&s, json!({"prompt": "a fox"}), None).header("x-image-cache"), Some("hit-l1"));
}

#[test]
fn a_failing_or_garbled_l2_only_costs_a_miss() {
    let s = cached_settings("");
    let answers: Vec<CallResponse> = vec![
        CallResponse { status: None, ..Default::default() },
        CallResponse { status: Some(500), body: b"oops".to_vec(), ..Default::default() },
        CallResponse { status: Some(200), body: b"garbage".to_vec(), ..Default::default() },
        CallResponse { status: Some(401), ..Default::default() },
    ];
    for answer in answers {
        let mut host = FakeHost::new();
        let a = answer.clone();
        host.l2 = Box::new(move |_| a.clone());
        let r = host.request(&s, json!({"prompt": "l2 trouble"}), None);
        assert_eq!((r.status, r.header("x-image-cache")), (200, Some("miss")), "{answer:?}");
        assert_eq!(host.gemini_calls, 1);
        assert_eq!(host.counted(Counter::CacheL2Errors), 1);
    }
}

#[test]
fn no_cache_skips_the_lookup_and_no_store_skips_both() {
    let s = cached_settings("");
    let mut host = FakeHost::new();
    host.request(&s, json!({"prompt": "p"}), None);
    let r = host.request(&s, json!({"prompt": "p"}), Some("no-cache"));
    assert_eq!(r.header("x-image-cache"), Some("miss"));
    assert_eq!(host.gemini_calls, 2);
    assert!(!host.effects.iter().any(|e| matches!(e, Effect::LookupL1 { .. } | Effect::CallL2 { .. })));
    assert_eq!(host.counted(Counter::CacheStores(CacheTier::L1)), 1, "no-cache still stores");

    let mut host = FakeHost::new();
    let r = host.request(&s, json!({"prompt": "q"}), Some("no-store"));
    assert_eq!(r.header("x-image-cache"), Some("bypass"));
    assert!(host.l2_writes.is_empty() && host.shared.is_empty());
    assert_eq!(host.counted(Counter::CacheBypass), 1);
    let r = host.request(&s, json!({"prompt": "q"}), None);
    assert_eq!(r.header("x-image-cache"), Some("miss"), "nothing was stored");
}

#[test]
fn partial_results_and_errors_are_never_stored() {
    let s = cached_settings("");
    let mut host = FakeHost::new();
    let mut k = 0;
    host.gemini = Box::new(move || {
        k += 1;
        if k == 1 {
            error_response(500, "INTERNAL")
        } else {
            ok_response("QUFB")
        }
    });
    let r = host.request(&s, json!({"prompt": "p", "n": 2}), None);
    assert_eq!(r.header("x-images-failed"), Some("1"));
    assert!(host.shared.is_empty() && host.l2_writes.is_empty());
    host.gemini = Box::new(|| error_response(429, "RESOURCE_EXHAUSTED"));
    assert_eq!(host.request(&s, json!({"prompt": "p2"}), None).status, 429);
    assert!(host.shared.is_empty() && host.l2_writes.is_empty());
}

#[test]
fn entries_over_max_entry_bytes_skip_l1_but_reach_l2() {
    let s = settings(r#"{"cache": {"l1": {"max_entries": 4, "max_entry_bytes": 10}, "l2": {}}}"#);
    let mut host = FakeHost::new();
    host.request(&s, json!({"prompt": "p"}), None);
    assert!(host.shared.is_empty());
    assert_eq!(host.l2_writes.len(), 1);
    assert_eq!(host.counted(Counter::CacheL1TooLarge), 1);
}

#[test]
fn a_store_over_another_live_entry_counts_an_eviction() {
    let s = settings(r#"{"cache": {"l1": {"max_entries": 1}}}"#);
    let mut host = FakeHost::new();
    host.request(&s, json!({"prompt": "first"}), None);
    assert_eq!(host.counted(Counter::CacheL1Evictions), 0);
    host.request(&s, json!({"prompt": "second"}), None);
    assert_eq!(host.counted(Counter::CacheL1Evictions), 1);
    assert_eq!(host.shared.len(), 2, "one slot: meta and data, whatever the traffic");
    assert_eq!(host.request(&s, json!({"prompt": "second"}), None).header("x-image-cache"), Some("hit-l1"));
}

#[test]
fn the_l2_token_goes_in_authorization() {
    let env = |k: &str| match k {
        "GEMINI_API_KEY" => Some("test-key".to_string()),
        "IMAGE_CACHE_TOKEN" => Some("s3cret".to_string()),
        _ => None,
    };
    let s = Rc::new(Settings::from_json(br#"{"cache": {"l2": {}}}"#, &env).unwrap());
    let mut host = FakeHost::new();
    host.l2 = Box::new(|call| {
        assert!(call.headers.contains(&("authorization".to_string(), "Bearer s3cret".to_string())));
        CallResponse { status: Some(404), ..Default::default() }
    });
    host.request(&s, json!({"prompt": "p"}), None);
    assert!(host.l2_writes[0].0.headers.contains(&("authorization".to_string(), "Bearer s3cret".to_string())));
}

#[test]
fn the_hot_set_answers_without_shared_data_and_keeps_formats_apart() {
    let s = cached_settings("");
    let mut host = FakeHost::new();
    let miss = host.request(&s, json!({"prompt": "hot"}), None);
    assert_eq!(host.hot.used_bytes(), miss.body.len(), "the miss's answer is kept rendered");
    host.shared.clear();
    let hit = host.request(&s, json!({"prompt": "hot"}), None);
    assert_eq!(hit.header("x-image-cache"), Some("hit-l1"));
    assert!(Rc::ptr_eq(&hit.body, &miss.body), "the same bytes, not a copy");
    let (_, log) = log_of(&host.effects);
    assert_eq!(log["images"], 1);
    assert_eq!(host.counted(Counter::CacheHits(CacheTier::L1)), 1);
    // A url request is another answer: not in the hot set, and shared data was cleared.
    let other = host.request(&s, json!({"prompt": "hot", "response_format": "url"}), None);
    assert_eq!(other.header("x-image-cache"), Some("miss"));
}
