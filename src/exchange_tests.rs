use std::rc::Rc;

use serde_json::{json, Value};

use super::*;
use crate::config::Settings;
use crate::endpoint::Endpoint;
use crate::metrics::{Counter, Histogram, Outcome};
use crate::safety::SafetyLevel;
use crate::test_support::{error_response, ok_response};

fn settings(json: &str) -> Rc<Settings> {
    let env = |k: &str| (k == "GEMINI_API_KEY").then(|| "test-key".to_string());
    Rc::new(Settings::from_json(json.as_bytes(), &env).unwrap())
}

fn head() -> RequestHead {
    RequestHead {
        method: "POST".into(),
        content_type: Some("application/json".into()),
        content_length: None,
        request_id: Some("req-1".into()),
        cache_control: None,
        authority: Some("gw.example:8080".into()),
        forwarded_proto: None,
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
fn start(s: &Rc<Settings>, body: Value) -> (Exchange, u32, Rc<Vec<u8>>, String) {
    let mut ex = Exchange::new(s.clone(), Endpoint::Generations, head(), 1_000);
    assert!(ex.on_headers(1_000).is_empty());
    let effects = ex.on_body(body.to_string().as_bytes(), 1_001);
    assert!(matches!(effects[..], [Effect::Admit { .. }]), "{effects:?}");
    match ex.on_admission(Admission::Granted, 1_001).into_iter().next() {
        Some(Effect::CallGemini { count, body, upstream, deadline_ms, .. }) => {
            assert_eq!(deadline_ms, 1_000 + s.gemini.timeout_ms, "every attempt inside timeout_ms from the start");
            (ex, count, body, upstream)
        }
        other => panic!("expected a call, got {other:?}"),
    }
}

#[test]
fn a_request_becomes_n_identical_gemini_calls() {
    let s = settings("{}");
    let (_, count, body, upstream) = start(
        &s,
        json!({"prompt": "a red fox", "n": 3, "size": "1792x1024", "quality": "hd", "safety_threshold": "low"}),
    );
    assert_eq!(count, 3);
    assert_eq!(upstream, "gemini-3-pro-image-preview");
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["generationConfig"]["imageConfig"], json!({"aspectRatio": "16:9", "imageSize": "4K"}));
    assert_eq!(body["safetySettings"][0]["threshold"], "BLOCK_ONLY_HIGH");
}

#[test]
fn all_calls_succeeding_gives_an_openai_answer_and_one_log_line() {
    let s = settings("{}");
    let (mut ex, ..) = start(&s, json!({"prompt": "a red fox", "n": 2}));
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
    let (mut ex, ..) = start(&s, json!({"prompt": "p", "n": 3}));
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
    let (mut ex, ..) = start(&s, json!({"prompt": "p"}));
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
    let (mut ex, ..) = start(&s, json!({"prompt": "p", "n": 3}));
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
    let mut ex = Exchange::new(s, Endpoint::Generations, head(), 0);
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
        let mut ex = Exchange::new(
            settings("{}"),
            Endpoint::Generations,
            RequestHead { content_type: ct.map(String::from), ..head() },
            0,
        );
        let r = reply(&ex.on_body(br#"{"prompt":"p"}"#, 1)).clone();
        assert_eq!((r.status, json_of(&r)["error"]["code"].as_str()), (400, Some("IMG_INVALID_REQUEST")), "{ct:?}");
    }
    let mut ex = Exchange::new(
        settings("{}"),
        Endpoint::Generations,
        RequestHead { content_type: Some("Application/JSON; charset=utf-8".into()), ..head() },
        0,
    );
    assert!(matches!(ex.on_body(br#"{"prompt":"p"}"#, 1)[0], Effect::Admit { .. }));
}

#[test]
fn bodies_over_the_limit_answer_413() {
    let s = settings(r#"{"limits": {"max_body_bytes": 100}}"#);
    let mut ex =
        Exchange::new(s.clone(), Endpoint::Generations, RequestHead { content_length: Some(101), ..head() }, 0);
    let effects = ex.on_headers(0);
    let r = reply(&effects);
    assert_eq!((r.status, r.header("x-should-retry")), (413, Some("false")));
    assert_eq!(json_of(r)["error"]["code"], "IMG_PAYLOAD_TOO_LARGE");
    assert!(ex.on_body(b"{}", 1).is_empty(), "one reply only");

    let mut chunked = Exchange::new(s, Endpoint::Generations, head(), 0);
    assert!(chunked.on_body_progress(100, 0).is_empty());
    assert_eq!(reply(&chunked.on_body_progress(101, 0)).status, 413);
}

#[test]
fn timeouts_answer_504_and_refusals_502() {
    let s = settings(r#"{"gemini": {"timeout_ms": 1000}}"#);
    let (mut ex, ..) = start(&s, json!({"prompt": "p"}));
    let effects = ex.on_call_response(
        0,
        CallResponse { status: None, elapsed_ms: 1000, timeout_ms: 1000, ..Default::default() },
        2_001,
    );
    assert_eq!(reply(&effects).status, 504);
    let (_, log) = log_of(&effects);
    assert_eq!(log["category"], "NETWORK_ERROR");
    let (mut ex, ..) = start(&s, json!({"prompt": "p"}));
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
fn a_client_that_leaves_gets_a_log_line_and_no_reply() {
    let s = settings("{}");
    let (mut ex, ..) = start(&s, json!({"prompt": "p"}));
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
    let (mut ex, ..) = start(&s, json!({"prompt": "p", "response_format": "url"}));
    let effects = ex.on_call_response(0, ok_response("QUFB"), 2);
    assert_eq!(json_of(reply(&effects))["data"][0]["url"], "data:image/png;base64,QUFB");
}

#[test]
fn cache_header_says_bypass_only_when_a_cache_exists() {
    let no_store = RequestHead { cache_control: Some("no-store".into()), ..head() };
    let mut ex = Exchange::new(settings("{}"), Endpoint::Generations, no_store.clone(), 0);
    assert_eq!(reply(&ex.on_body(b"{}", 1)).header("x-image-cache"), Some("miss"));
    let mut ex = Exchange::new(settings(r#"{"cache": {"l1": {}}}"#), Endpoint::Generations, no_store, 0);
    assert_eq!(reply(&ex.on_body(b"{}", 1)).header("x-image-cache"), Some("bypass"));
    assert!(has_directive("max-age=0, No-Store", "no-store"));
    assert!(!has_directive("no-storex", "no-store"));
}
