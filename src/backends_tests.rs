use std::collections::HashMap;

use super::*;
use crate::gemini::CallOutcome;

fn key(env: &str) -> Credential {
    Credential::ApiKey { env: env.into(), value: Some(format!("value-of-{env}")) }
}

fn two_backends() -> Backends {
    Backends {
        list: vec![
            Backend::new(
                "studio".into(),
                Kind::Gemini,
                "gemini".into(),
                "generativelanguage.googleapis.com".into(),
                vec![key("K1"), key("K2")],
            ),
            Backend::new(
                "vertex".into(),
                Kind::Vertex { project: "p".into(), location: "europe-west4".into() },
                "vertex".into(),
                Backend::vertex_authority("europe-west4"),
                vec![Credential::MetadataToken { cluster: "md".into(), authority: "metadata.google.internal".into() }],
            ),
        ],
        retry: Some(Retry { max_attempts: 3, cooldown_ms: 60_000 }),
    }
}

fn k(backend: usize, key: usize) -> KeyRef {
    KeyRef { backend, key }
}

#[test]
fn paths_and_hosts_follow_googles_docs() {
    let b = two_backends();
    assert_eq!(
        b.list[0].path("gemini-3-pro-image-preview"),
        "/v1beta/models/gemini-3-pro-image-preview:generateContent"
    );
    assert_eq!(
        b.list[1].path("gemini-3-pro-image-preview"),
        "/v1/projects/p/locations/europe-west4/publishers/google/models/gemini-3-pro-image-preview:generateContent"
    );
    assert_eq!(b.list[1].authority, "europe-west4-aiplatform.googleapis.com");
    assert_eq!(Backend::vertex_authority("global"), "aiplatform.googleapis.com");
}

#[test]
fn keys_take_turns_and_the_first_backend_comes_first() {
    let b = two_backends();
    let mut turn = vec![0, 0];
    let none = |_: KeyRef| None;
    let mut picks = Vec::new();
    for _ in 0..4 {
        picks.push(pick(&b, &Attempts::default(), &mut { none }, &|_| true, &mut turn, 0));
    }
    assert_eq!(picks, vec![Pick::Use(k(0, 0)), Pick::Use(k(0, 1)), Pick::Use(k(0, 0)), Pick::Use(k(0, 1))]);
}

#[test]
fn cooling_and_used_keys_are_passed_over_then_the_next_backend() {
    let b = two_backends();
    let mut turn = vec![0, 0];
    let mut cool: HashMap<KeyRef, Cooldown> = HashMap::new();
    cool.insert(k(0, 0), Cooldown { until_ms: 5_000, reason: CoolReason::Quota });
    let mut lookup = |x: KeyRef| cool.get(&x).copied();
    let attempts = Attempts::default();
    assert_eq!(pick(&b, &attempts, &mut lookup, &|_| true, &mut turn, 1_000), Pick::Use(k(0, 1)));
    let used = Attempts { count: 1, tried: vec![k(0, 1)], skipped_backends: vec![] };
    assert_eq!(pick(&b, &used, &mut lookup, &|_| true, &mut turn, 1_000), Pick::Use(k(1, 0)), "on to vertex");
    assert_eq!(pick(&b, &used, &mut lookup, &|x| x.backend == 0, &mut turn, 1_000), Pick::NoneLeft, "no token yet");
    assert_eq!(
        pick(&b, &attempts, &mut lookup, &|_| true, &mut turn, 5_000),
        Pick::Use(k(0, 0)),
        "back after its time"
    );
    let skipped = Attempts { count: 1, tried: vec![], skipped_backends: vec![0] };
    assert_eq!(pick(&b, &skipped, &mut lookup, &|_| true, &mut turn, 1_000), Pick::Use(k(1, 0)));
}

#[test]
fn without_backends_nothing_cools_down() {
    let mut b = two_backends();
    b.retry = None;
    let mut always_cool = |_: KeyRef| Some(Cooldown { until_ms: u64::MAX, reason: CoolReason::Quota });
    assert_eq!(pick(&b, &Attempts::default(), &mut always_cool, &|_| true, &mut [0, 0], 0), Pick::Use(k(0, 0)));
}

#[test]
fn no_key_left_is_429_until_the_first_back_else_502() {
    let b = two_backends();
    let mut cool: HashMap<KeyRef, Cooldown> = HashMap::new();
    cool.insert(k(0, 0), Cooldown { until_ms: 31_000, reason: CoolReason::Quota });
    cool.insert(k(0, 1), Cooldown { until_ms: 12_500, reason: CoolReason::Quota });
    cool.insert(k(1, 0), Cooldown { until_ms: 900_000, reason: CoolReason::Auth });
    let e = none_left(&b, &mut |x| cool.get(&x).copied(), 10_000);
    assert_eq!((e.code, e.status(), e.retry_after), (ErrorCode::QuotaExhausted, 429, Some(3)));
    cool.retain(|_, c| c.reason == CoolReason::Auth);
    let e = none_left(&b, &mut |x| cool.get(&x).copied(), 10_000);
    assert_eq!((e.code, e.status()), (ErrorCode::UpstreamAuth, 502));
}

#[test]
fn answers_decide_what_comes_next() {
    let err =
        |code, status| CallOutcome { upstream_status: status, result: Err(ApiError::new(code, "m")), usage: None };
    assert_eq!(next_after(&err(ErrorCode::QuotaExhausted, 429)), Next::Cool(CoolReason::Quota));
    assert_eq!(next_after(&err(ErrorCode::UpstreamAuth, 403)), Next::Cool(CoolReason::Auth));
    assert_eq!(next_after(&err(ErrorCode::ServiceUnavailable, 503)), Next::NextBackend);
    assert_eq!(next_after(&err(ErrorCode::NetworkError, 0)), Next::NextBackend);
    assert_eq!(next_after(&err(ErrorCode::UpstreamError, 500)), Next::NextBackend);
    for final_code in
        [ErrorCode::SafetyBlocked, ErrorCode::InvalidPrompt, ErrorCode::InvalidRequest, ErrorCode::NoImage]
    {
        assert_eq!(next_after(&err(final_code, 400)), Next::Final, "{final_code:?} is never retried");
    }
    assert_eq!(next_after(&err(ErrorCode::UpstreamError, 404)), Next::Final);
}

#[test]
fn cool_downs_follow_retry_after_or_the_configured_time() {
    let r = Retry { max_attempts: 3, cooldown_ms: 60_000 };
    assert_eq!(cooldown_for(CoolReason::Quota, Some(7), &r, 1_000).until_ms, 8_000);
    assert_eq!(cooldown_for(CoolReason::Quota, None, &r, 1_000).until_ms, 61_000);
    assert_eq!(cooldown_for(CoolReason::Auth, Some(7), &r, 1_000).until_ms, 301_000, "five times longer");
    let c = Cooldown { until_ms: 123, reason: CoolReason::Auth };
    assert_eq!(Cooldown::decode(&c.encode()), Some(c));
    assert_eq!(Cooldown::decode(b"garbage"), None);
}

#[test]
fn tokens_are_read_kept_and_refreshed_before_they_expire() {
    let t =
        read_token_answer(br#"{"access_token":"ya29.abc","expires_in":3599,"token_type":"Bearer"}"#, 1_000).unwrap();
    assert_eq!((t.value.as_str(), t.expires_at_ms), ("ya29.abc", 3_600_000));
    assert_eq!(Token::decode(&t.encode()), Some(t.clone()));
    assert!(t.usable(1_000) && !t.refresh_due(1_000));
    assert!(t.refresh_due(3_600_000 - 300_000), "five minutes before the end of an hour's token");
    assert!(!t.usable(3_596_000));
    for bad in [
        &br#"{"access_token":"","expires_in":10}"#[..],
        br#"{"access_token":"a b","expires_in":10}"#,
        b"{}",
        b"<html>",
        br#"{"access_token":"x","expires_in":0}"#,
    ] {
        assert_eq!(read_token_answer(bad, 0), None, "{}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn shared_data_names_keys_by_digest_so_configs_that_share_a_key_share_its_cool_down() {
    let b = two_backends();
    let k1 = cooldown_key(&b, k(0, 0));
    assert!(!k1.contains("value-of-K1") && k1.starts_with("gemini_image.cooldown."));
    assert_ne!(k1, cooldown_key(&b, k(0, 1)));
    let mut other = two_backends();
    other.list.swap(0, 1);
    assert_eq!(cooldown_key(&other, k(1, 0)), k1, "the same key in another position, another listener");
    assert_eq!(token_key(&b, 1), token_key(&other, 0));
}
