//! fake-gemini as a process, over HTTP: Vertex AI paths and their auth, several API keys,
//! failure rules per key, token or path, call stats, and the metadata server's tokens.

mod common;

use std::time::{Duration, Instant};

use common::{try_call, Answer, Fake, FLAVOR, GEMINI, KEYS, VERTEX};
use serde_json::json;

fn image_dims(a: &Answer) -> (u32, u32) {
    use base64::Engine;
    let v = a.json();
    let data = v["candidates"][0]["content"]["parts"][1]["inlineData"]["data"].as_str().unwrap_or_default();
    let png = base64::engine::general_purpose::STANDARD.decode(data).unwrap_or_default();
    let be = |i: usize| png.get(i..i + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(0);
    (be(16), be(20))
}

#[test]
fn vertex_answers_like_gemini_with_its_own_auth() {
    let fake = Fake::start(&["--api-key", KEYS[0], "--api-key", KEYS[1], "--bearer", "static-token-abcdef"]);
    // Gemini API path: as before, with any listed key.
    let a = fake.generate(GEMINI, &[("x-goog-api-key", KEYS[1])], "a cat");
    assert_eq!((a.status, image_dims(&a)), (200, (1376, 768)));
    assert_eq!(fake.generate(GEMINI, &[], "a cat").google(), (403, "PERMISSION_DENIED".into(), String::new()));
    assert_eq!(
        fake.generate(GEMINI, &[("x-goog-api-key", "wrong-key-xyz")], "a cat").google(),
        (400, "INVALID_ARGUMENT".into(), "API_KEY_INVALID".into())
    );

    // Vertex AI: no credentials, a made-up token, a wrong scheme: 401.
    let a = fake.generate(VERTEX, &[], "a cat");
    assert_eq!(a.google(), (401, "UNAUTHENTICATED".into(), "CREDENTIALS_MISSING".into()));
    assert!(a.header("www-authenticate").is_some_and(|v| v.starts_with("Bearer")));
    let a = fake.generate(VERTEX, &[("authorization", "Bearer made-up-token-1234")], "a cat");
    assert_eq!(a.google(), (401, "UNAUTHENTICATED".into(), "ACCESS_TOKEN_TYPE_UNSUPPORTED".into()));
    let a = fake.generate(VERTEX, &[("authorization", "Basic eDp5")], "a cat");
    assert_eq!(a.status, 401);

    // A metadata token, a --bearer token and a listed API key all work, and answer as Gemini.
    let (token, expires_in) = fake.token();
    assert!(token.starts_with("ya29."), "{token}");
    assert_eq!(expires_in, 3599);
    let bearer = format!("Bearer {token}");
    let a = fake.generate(VERTEX, &[("authorization", &bearer)], "a vertex cat [fake:withtext]");
    assert_eq!((a.status, image_dims(&a)), (200, (1376, 768)), "{}", a.text());
    assert_eq!(a.json()["candidates"][0]["content"]["parts"][2]["text"], "Here is your image.", "markers work");
    assert_eq!(fake.generate(VERTEX, &[("authorization", "Bearer static-token-abcdef")], "x").status, 200);
    assert_eq!(fake.generate(VERTEX, &[("x-goog-api-key", KEYS[0])], "x").status, 200);
    let express = "/v1/publishers/google/models/gemini-3-pro-image-preview:generateContent";
    assert_eq!(fake.generate(express, &[("x-goog-api-key", KEYS[0])], "x").status, 200);
    assert_eq!(fake.generate(VERTEX, &[("x-goog-api-key", "wrong-key-xyz")], "x").google().2, "API_KEY_INVALID");
    // The same body checks on both paths.
    let bad = json!({"contents": [{"role": "robot", "parts": [{"text": "x"}]}]}).to_string();
    let a = fake.call("POST", VERTEX, &[("authorization", &bearer)], bad.as_bytes());
    assert_eq!(a.google().1, "INVALID_ARGUMENT");

    // Recorded with their backend, answer and credential labels (never the secret itself).
    let rec = fake.get("/__fake/requests?contains=vertex%20cat");
    assert_eq!(rec.as_array().map(Vec::len), Some(1));
    assert_eq!(rec[0]["path"], VERTEX);
    assert_eq!((rec[0]["backend"].as_str(), rec[0]["status"].as_u64()), (Some("vertex"), Some(200)));
    assert_eq!(rec[0]["bearer_label"], "metadata#1");
    let stats = fake.get("/__fake/stats");
    assert_eq!(stats["backends"], json!({"gemini": 3, "vertex": 9}));
    assert_eq!(stats["api_keys"], json!({"0": 2, "1": 1, "last4:-xyz": 2}));
    assert_eq!(stats["bearers"]["metadata#1"], 2);
    assert_eq!(stats["bearers"]["bearer#0"], 1);
    assert_eq!(stats["auth"]["none"], 3);
    assert_eq!(stats["statuses"]["401"], 3);

    // (The listening line was read at start.)
    let printed = fake.stop();
    for secret in [KEYS[0], KEYS[1], token.as_str(), "static-token-abcdef", "made-up-token-1234"] {
        assert!(!printed.contains(secret), "a secret was printed: {printed}");
    }
}

#[test]
fn rules_fail_chosen_keys_tokens_and_paths_for_a_number_of_calls() {
    let fake = Fake::start(&["--api-key", KEYS[0], "--api-key", KEYS[1], "--bearer", "tok-a"]);
    let k0 = [("x-goog-api-key", KEYS[0])];
    let k1 = [("x-goog-api-key", KEYS[1])];
    fake.json(
        "PUT",
        "/__fake/rules",
        json!([
            {"match": {"api_key": KEYS[1]}, "status": 429, "retry_after_s": 7, "retry_after_header": true, "times": 2},
            {"match": {"bearer": "tok-a"}, "status": 401},
            {"match": {"path_prefix": "/v1/projects/", "auth": "api_key"}, "status": 503, "times": 1},
        ]),
    );
    for _ in 0..2 {
        let a = fake.generate(GEMINI, &k1, "x");
        assert_eq!(a.google().1, "RESOURCE_EXHAUSTED");
        assert_eq!(a.header("retry-after"), Some("7"));
        let v = a.json();
        let details = v["error"]["details"].as_array().cloned().unwrap_or_default();
        assert!(details
            .iter()
            .any(|d| d["@type"] == "type.googleapis.com/google.rpc.RetryInfo" && d["retryDelay"] == "7s"));
        assert!(details.iter().any(|d| d["@type"] == "type.googleapis.com/google.rpc.QuotaFailure"));
        assert!(v["error"]["message"].as_str().unwrap_or_default().contains("Please retry in 7s."));
    }
    assert_eq!(fake.generate(GEMINI, &k1, "x").status, 200, "times used up");
    assert_eq!(fake.generate(GEMINI, &k0, "x").status, 200, "another key is untouched");
    // A rule comes before the auth check: a valid token answers 401 while the rule lasts.
    let a = fake.generate(VERTEX, &[("authorization", "Bearer tok-a")], "x");
    assert_eq!(a.google(), (401, "UNAUTHENTICATED".into(), "ACCESS_TOKEN_EXPIRED".into()));
    assert_eq!(fake.generate(VERTEX, &k0, "x").google().1, "UNAVAILABLE");
    assert_eq!(fake.generate(VERTEX, &k0, "x").status, 200);

    let stats = fake.get("/__fake/stats");
    assert_eq!(stats["api_keys"], json!({"0": 3, "1": 3}));
    assert_eq!(stats["api_key_statuses"]["1"], json!({"200": 1, "429": 2}));
    assert_eq!(stats["api_key_statuses"]["0"], json!({"200": 2, "503": 1}));
    assert_eq!(stats["bearer_statuses"]["bearer#0"], json!({"401": 1}));
    assert_eq!(
        stats["rules"],
        json!([{"matched": 2, "active": false}, {"matched": 1, "active": true}, {"matched": 1, "active": false}])
    );
    let rules = fake.get("/__fake/rules");
    assert_eq!(rules[0]["matched"], 2);

    // Resets drop the connection; a rule with only a delay slows the call down and lets it pass.
    fake.json(
        "PUT",
        "/__fake/rules",
        json!([{"match": {"api_key_index": 0}, "reset": true, "times": 1},
                                              {"match": {"prompt_contains": "slow"}, "delay_ms": 300}]),
    );
    assert!(try_call(&fake.addr, "POST", GEMINI, &k0, b"{}").is_err(), "the connection is dropped");
    let started = Instant::now();
    assert_eq!(fake.generate(GEMINI, &k0, "slow cat").status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(fake.get("/__fake/stats")["statuses"]["reset"], 1);

    // 500 and 403 in Google's shapes; bad rules are refused whole.
    fake.json(
        "PUT",
        "/__fake/rules",
        json!([{"match": {"backend": "vertex"}, "status": 403},
                                              {"match": {"backend": "gemini"}, "status": 500, "message": "boom"}]),
    );
    let a = fake.generate(VERTEX, &k0, "x");
    assert_eq!(a.google(), (403, "PERMISSION_DENIED".into(), "IAM_PERMISSION_DENIED".into()));
    assert!(a.text().contains("//aiplatform.googleapis.com/projects/my-project/locations/global/publishers/google/models/gemini-3-pro-image-preview"));
    let a = fake.generate(GEMINI, &k0, "x");
    assert_eq!((a.google().1.as_str(), a.json()["error"]["message"].as_str()), ("INTERNAL", Some("boom")));
    let a = fake.call("PUT", "/__fake/rules", &[], br#"[{"status": 429, "match": {"key": "x"}}]"#);
    assert_eq!(a.status, 400);
    assert_eq!(fake.get("/__fake/rules").as_array().map(Vec::len), Some(2), "unchanged");
    fake.call("DELETE", "/__fake/rules", &[], b"");
    assert_eq!(fake.generate(GEMINI, &k0, "x").status, 200);
    fake.call("DELETE", "/__fake/stats", &[], b"");
    assert_eq!(fake.get("/__fake/stats")["requests"], 0);
}

#[test]
fn the_metadata_server_issues_tokens_that_expire_and_can_fail() {
    let fake = Fake::start(&["--token-ttl-s", "2", "--project-id", "proj-42"]);
    // Without Metadata-Flavor, or through a proxy: 403.
    let path = "/computeMetadata/v1/instance/service-accounts/default/token";
    assert_eq!(fake.call("GET", path, &[], b"").status, 403);
    assert_eq!(
        fake.call("GET", path, &[("Metadata-Flavor", "Google"), ("X-Forwarded-For", "1.2.3.4")], b"").status,
        403
    );
    let a = fake.call("GET", "/computeMetadata/v1/project/project-id", &FLAVOR, b"");
    assert_eq!((a.status, a.text().as_str()), (200, "proj-42"));

    let (token, expires_in) = fake.token();
    assert_eq!(expires_in, 2);
    let auth = format!("Bearer {token}");
    assert_eq!(fake.generate(VERTEX, &[("authorization", &auth)], "x").status, 200);
    std::thread::sleep(Duration::from_millis(2100));
    let a = fake.generate(VERTEX, &[("authorization", &auth)], "x");
    assert_eq!(a.google(), (401, "UNAUTHENTICATED".into(), "ACCESS_TOKEN_EXPIRED".into()));

    // Steered: a longer life, two failures then tokens again, a delay.
    let s =
        fake.json("PUT", "/__fake/metadata", json!({"expires_in": 600, "fail": 503, "fail_times": 2, "delay_ms": 150}));
    assert_eq!(s["fail"], 503);
    for _ in 0..2 {
        assert_eq!(fake.call("GET", path, &FLAVOR, b"").status, 503);
    }
    let started = Instant::now();
    let (token, expires_in) = fake.token();
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(expires_in, 600);
    let auth = format!("Bearer {token}");
    assert_eq!(fake.generate(VERTEX, &[("authorization", &auth)], "x").status, 200);
    fake.json("PUT", "/__fake/metadata", json!({"fail": 500}));
    assert_eq!(fake.call("GET", path, &FLAVOR, b"").status, 500);
    assert_eq!(fake.call("GET", path, &FLAVOR, b"").status, 500, "until cleared");
    fake.json("PUT", "/__fake/metadata", json!({"fail": null, "delay_ms": 0}));
    let stats = fake.get("/__fake/metadata/stats");
    assert_eq!(
        stats,
        json!({"token_fetches": 8, "tokens_issued": 2, "refused": 2, "failed": 4, "project_id_fetches": 1})
    );

    // Revoked: tokens issued so far answer as expired; a new one works.
    fake.call("DELETE", "/__fake/tokens", &[], b"");
    assert_eq!(fake.generate(VERTEX, &[("authorization", &auth)], "x").google().2, "ACCESS_TOKEN_EXPIRED");
    let (fresh, _) = fake.token();
    assert_eq!(fake.generate(VERTEX, &[("authorization", &format!("Bearer {fresh}"))], "x").status, 200);
    // Registered tokens, one already expired.
    fake.json("PUT", "/__fake/tokens", json!({"token": "my-token-1"}));
    fake.json("PUT", "/__fake/tokens", json!({"token": "old-token-1", "expires_in": 0}));
    assert_eq!(fake.generate(VERTEX, &[("authorization", "Bearer my-token-1")], "x").status, 200);
    assert_eq!(
        fake.generate(VERTEX, &[("authorization", "Bearer old-token-1")], "x").google().2,
        "ACCESS_TOKEN_EXPIRED"
    );
    let printed = fake.stop();
    assert!(!printed.contains(&token) && !printed.contains(&fresh) && !printed.contains("my-token-1"), "{printed}");
}

#[test]
fn two_processes_with_one_secret_share_tokens() {
    let metadata = Fake::start(&["--token-secret", "s3cret"]);
    let vertex = Fake::start(&["--token-secret", "s3cret"]);
    let other = Fake::start(&[]);
    let (token, _) = metadata.token();
    let auth = format!("Bearer {token}");
    assert_eq!(vertex.generate(VERTEX, &[("authorization", &auth)], "x").status, 200);
    assert_eq!(vertex.get("/__fake/stats")["bearers"], json!({"metadata#1": 1}));
    assert_eq!(other.generate(VERTEX, &[("authorization", &auth)], "x").status, 401);
    assert_eq!(metadata.get("/__fake/metadata/stats")["tokens_issued"], 1);
    assert_eq!(vertex.get("/__fake/metadata/stats")["tokens_issued"], 0);
}
