//! The driver's streamed answers over the in-memory host, callback by callback as Envoy makes
//! them: the request held at its headers, rewritten and let go at the end of its body (or in
//! the L2 lookup's answer), Gemini's response turned into OpenAI's events piece by piece, and
//! a refusal held and written over as the usual JSON error (contract sections 12 and 14).

use serde_json::{json, Value};

use super::*;
use crate::backends::{Cooldown, KeyRef};
use crate::driver::tests::{json_of, post_headers, Gateway, CACHED, NOW_MS, TWO_KEYS_AND_VERTEX};
use crate::metrics::CacheTier;

/// Real PNGs (signature, IHDR, IDAT, IEND, CRCs): the final image, 1x1 ...
const FINAL_PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC";
/// ... and two interim images of Gemini's thinking, 2x2 and 1x1.
const INTERIM_PNG: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAD0lEQVR4nGNg+M8AQhAKABvyA/1tVLjHAAAAAElFTkSuQmCC";
const INTERIM_PNG_2: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNgYPgPAAEDAQAIicLsAAAAAElFTkSuQmCC";

/// An L1 tier only: stores show in shared data, and no call-out is made for the lookup.
const L1_ONLY: &str = r#"{"cache": {"ttl_seconds": 60, "l1": {"max_entries": 4, "max_entry_bytes": 100000}}}"#;

// ---- Gemini's side ----

/// One `data:` event as `streamGenerateContent?alt=sse` frames it.
fn gemini_event(chunk: Value) -> String {
    format!("data: {chunk}\r\n\r\n")
}

/// An interim image of the model's thinking.
fn thought_event(b64: &str) -> String {
    gemini_event(json!({"candidates": [{"content": {"role": "model", "parts": [
        {"inlineData": {"mimeType": "image/png", "data": b64}, "thought": true}]}, "index": 0}]}))
}

/// The final image, with the finish reason and the usage.
fn final_event(b64: &str) -> String {
    gemini_event(json!({
        "candidates": [{"content": {"role": "model", "parts": [{"inlineData": {"mimeType": "image/png", "data": b64}}]},
                        "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 1290, "totalTokenCount": 1300}
    }))
}

/// Two interim images, then the final one.
fn gemini_stream() -> Vec<u8> {
    [thought_event(INTERIM_PNG), thought_event(INTERIM_PNG_2), final_event(FINAL_PNG)].concat().into_bytes()
}

/// Gemini's error JSON, as it answers a refused `streamGenerateContent` (no SSE framing).
fn gemini_error(code: u32, status: &str) -> Vec<u8> {
    json!({"error": {"code": code, "message": "Resource has been exhausted (e.g. check quota).", "status": status}})
        .to_string()
        .into_bytes()
}

// ---- the client's side ----

fn streamed(extra: Value) -> Value {
    let mut body = json!({"prompt": "a cat in a hat", "stream": true});
    for (k, v) in extra.as_object().expect("an object") {
        body[k] = v.clone();
    }
    body
}

/// A client request through its headers and the whole of its body (and any call-out the body
/// led to, the L2 lookup), as Envoy delivers them: the driver and both verdicts.
fn send(gw: &mut Gateway, body: &[u8], headers: Vec<(String, String)>) -> (StreamDriver, Verdict, Verdict) {
    gw.host.request_headers = headers;
    gw.host.body = body.to_vec();
    let mut stream = gw.root.new_stream().expect("configured");
    let at_headers = stream.on_request_headers(&mut gw.host, false);
    let size = gw.host.body.len();
    let at_body = stream.on_request_body(&mut gw.host, size, true);
    gw.answer_calls(&mut stream);
    (stream, at_headers, at_body)
}

/// A streamed generation, with the headers a client and Envoy's edge set.
fn send_streamed(gw: &mut Gateway, body: Value) -> (StreamDriver, Verdict, Verdict) {
    let mut headers = post_headers();
    headers.push(("x-request-id".into(), "req-s".into()));
    headers.push(("x-forwarded-proto".into(), "https".into()));
    headers.push(("authorization".into(), "Bearer client-secret".into()));
    send(gw, body.to_string().as_bytes(), headers)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// What the one forwarded request became: its headers, and its body as JSON.
fn forwarded(gw: &Gateway) -> (Vec<(String, String)>, Value) {
    assert_eq!(gw.host.forwarded.len(), 1, "forwarded once");
    let (headers, body) = &gw.host.forwarded[0];
    (headers.clone(), serde_json::from_slice(body).expect("a JSON body"))
}

// ---- the upstream response ----

/// The upstream's response headers arrive: `:status` and `headers`.
fn upstream_headers(gw: &mut Gateway, stream: &mut StreamDriver, status: u32, headers: &[(&str, &str)]) -> Verdict {
    gw.host.response_headers = vec![(":status".into(), status.to_string())];
    gw.host.response_headers.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    stream.on_response_headers(&mut gw.host, false)
}

/// One piece of a body that passes (the filter sees each piece once); the verdict.
fn upstream_piece(gw: &mut Gateway, stream: &mut StreamDriver, piece: &[u8], end: bool) -> Verdict {
    gw.host.response_chunk = piece.to_vec();
    stream.on_response_body(&mut gw.host, piece.len(), end)
}

/// Pieces of a body the filter holds: each callback sees all that Envoy buffered so far, the
/// last one (`end`) the whole. The verdicts.
fn upstream_held(gw: &mut Gateway, stream: &mut StreamDriver, pieces: &[&[u8]], end: bool) -> Vec<Verdict> {
    let mut buffered = Vec::new();
    let mut verdicts = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        buffered.extend_from_slice(piece);
        gw.host.response_chunk = buffered.clone();
        verdicts.push(stream.on_response_body(&mut gw.host, buffered.len(), end && i + 1 == pieces.len()));
    }
    verdicts
}

/// The `data:` payloads of an OpenAI event stream, parsed, with each event's `event:` name.
fn openai_events(bytes: &[u8]) -> Vec<(Option<String>, Value)> {
    let text = std::str::from_utf8(bytes).expect("UTF-8 events");
    let mut events = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let mut name = None;
        let mut data = String::new();
        for line in block.lines() {
            if let Some(n) = line.strip_prefix("event: ") {
                name = Some(n.to_string());
            } else if let Some(d) = line.strip_prefix("data: ") {
                data.push_str(d);
            }
        }
        events.push((name, serde_json::from_str(&data).expect("JSON data")));
    }
    events
}

fn types(events: &[(Option<String>, Value)]) -> Vec<String> {
    events.iter().map(|(_, v)| v["type"].as_str().unwrap_or("?").to_string()).collect()
}

fn l1_entries(gw: &Gateway) -> usize {
    gw.host.shared.keys().filter(|k| k.starts_with("gemini_image.l1.") && k.ends_with(".data")).count()
}

// ---- the request: held, rewritten, let go ----

#[test]
fn a_streamed_generation_is_rewritten_into_stream_generate_content_at_the_end_of_its_body() {
    let mut gw = Gateway::new(r#"{"cache": null}"#);
    let (_stream, at_headers, at_body) = send_streamed(&mut gw, streamed(json!({"partial_images": 2})));
    assert_eq!(at_headers, Verdict::Pause, "held at the headers, to be rewritten");
    assert_eq!(at_body, Verdict::Continue, "let go by the body callback's verdict");
    assert!(gw.host.dispatched.is_empty() && gw.gemini_calls == 0, "no call-out");
    assert!(gw.host.replies.is_empty(), "no local reply");
    assert_eq!(gw.host.resumes, 0, "inside a request callback the verdict lets it go");

    let (headers, body) = forwarded(&gw);
    let (_, sent) = &gw.host.forwarded[0];
    let path = header(&headers, ":path").expect(":path");
    assert_eq!(path, "/v1beta/models/gemini-3-pro-image-preview:streamGenerateContent?alt=sse");
    assert!(path.ends_with(":streamGenerateContent?alt=sse"));
    assert_eq!(header(&headers, ":authority"), Some("generativelanguage.googleapis.com"));
    assert_eq!(header(&headers, ":method"), Some("POST"));
    assert_eq!(header(&headers, "x-goog-api-key"), Some("test-key"));
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    assert_eq!(header(&headers, "content-length"), Some(sent.len().to_string().as_str()));
    assert_ne!(sent.len(), gw.host.body.len(), "the body is Gemini's, not the client's");
    assert_eq!(header(&headers, "accept"), Some("text/event-stream"));
    assert_eq!(header(&headers, UPSTREAM_HEADER), Some("gemini"), "the backend's cluster");
    assert_eq!(header(&headers, "x-envoy-upstream-rq-timeout-ms"), Some("180000"), "the request's deadline");
    assert_eq!(header(&headers, "authorization"), None, "nothing of the client's credential is set");
    assert_eq!(body["generationConfig"]["thinkingConfig"]["includeThoughts"], true, "partials need thoughts");
    assert_eq!(body["contents"][0]["parts"][0]["text"], "a cat in a hat");
}

#[test]
fn without_partial_images_gemini_is_not_asked_for_its_thoughts() {
    for extra in
        [json!({"partial_images": 0}), json!({}), json!({"partial_images": 2, "model": "gemini-2.5-flash-image"})]
    {
        let mut gw = Gateway::new("{}");
        let (_stream, _, at_body) = send_streamed(&mut gw, streamed(extra.clone()));
        assert_eq!(at_body, Verdict::Continue, "{extra}");
        let (_, body) = forwarded(&gw);
        assert!(body["generationConfig"].get("thinkingConfig").is_none(), "{extra}: {body}");
    }
}

#[test]
fn after_an_l2_miss_the_request_is_rewritten_in_the_lookups_answer_and_resumed_once() {
    let mut gw = Gateway::new(CACHED);
    gw.host.request_headers = post_headers();
    gw.host.body = streamed(json!({"partial_images": 1})).to_string().into_bytes();
    let mut stream = gw.root.new_stream().unwrap();
    assert_eq!(stream.on_request_headers(&mut gw.host, false), Verdict::Pause);
    let size = gw.host.body.len();
    assert_eq!(stream.on_request_body(&mut gw.host, size, true), Verdict::Pause, "held for the lookup");
    assert_eq!(gw.host.dispatched.len(), 1);
    assert_eq!(gw.host.dispatched[0].1.cluster, "image_cache", "the L2 lookup");
    assert!(gw.host.forwarded.is_empty() && gw.host.resumes == 0);
    gw.answer_calls(&mut stream); // a 404: a miss
    assert_eq!(gw.host.forwarded.len(), 1, "rewritten in the lookup's answer");
    assert_eq!(gw.host.resumes, 1, "and resumed, once");
    assert_eq!(gw.gemini_calls, 0, "Gemini is reached by the router, not by a call-out");
    assert!(gw.host.replies.is_empty());
    let (headers, _) = forwarded(&gw);
    assert!(header(&headers, ":path").unwrap().ends_with(":streamGenerateContent?alt=sse"));

    // The body callback's path never resumes: its verdict lets the request go.
    let mut gw = Gateway::new(L1_ONLY);
    let (_stream, _, at_body) = send_streamed(&mut gw, streamed(json!({})));
    assert_eq!((at_body, gw.host.forwarded.len(), gw.host.resumes), (Verdict::Continue, 1, 0));
    // Nor does a lookup the host refuses: a miss at once, inside the body callback.
    let mut gw = Gateway::new(CACHED);
    gw.host.refused_clusters.push("image_cache".into());
    let (_stream, _, at_body) = send_streamed(&mut gw, streamed(json!({})));
    assert_eq!((at_body, gw.host.forwarded.len(), gw.host.resumes), (Verdict::Continue, 1, 0));
}

// ---- the response: events as they pass ----

#[test]
fn gemini_events_split_anywhere_become_partials_then_completed_stored_and_served_again_from_l1() {
    let mut gw = Gateway::new(L1_ONLY);
    let (mut stream, _, at_body) = send_streamed(&mut gw, streamed(json!({"partial_images": 2, "quality": "high"})));
    assert_eq!(at_body, Verdict::Continue);
    gw.host.logs.clear();

    let verdict = upstream_headers(
        &mut gw,
        &mut stream,
        200,
        &[("content-type", "text/event-stream"), ("content-length", "99999"), ("server", "scaffolding on HTTPServer2")],
    );
    assert_eq!(verdict, Verdict::Continue);
    let h = &gw.host.response_headers;
    assert_eq!(header(h, ":status"), Some("200"));
    assert_eq!(header(h, "content-type"), Some("text/event-stream"));
    assert_eq!(header(h, "content-length"), None, "the body changes: no length");
    assert_eq!(header(h, "x-image-cache"), Some("miss"));
    assert_eq!(header(h, "cache-control"), Some("no-cache"));
    assert!(header(h, "x-image-prompt-hash").is_some());

    // Split at awkward places: inside `data:`, between a line's `\r` and `\n`, inside the
    // base64, inside the blank line that ends the last event.
    let all = gemini_stream();
    let first_end = thought_event(INTERIM_PNG).len();
    let cuts = [3, first_end - 3, first_end + 40, all.len() - 60, all.len() - 3];
    let mut pieces = Vec::new();
    let mut at = 0;
    for cut in cuts {
        pieces.push(&all[at..cut]);
        at = cut;
    }
    pieces.push(&all[at..]);
    assert_eq!(pieces.concat(), all);
    for (i, piece) in pieces.iter().enumerate() {
        let last = i + 1 == pieces.len();
        assert_eq!(upstream_piece(&mut gw, &mut stream, piece, last), Verdict::Continue);
        if i == 1 {
            assert!(gw.host.response_out.is_empty(), "the first event lacks its blank line");
        }
        if i == 2 {
            // The first partial is out before the final image has come.
            assert_eq!(types(&openai_events(&gw.host.response_out)), ["image_generation.partial_image"]);
        }
        if !last {
            assert!(gw.host.log_lines().is_empty(), "no log line before the end");
        }
    }
    let events = openai_events(&gw.host.response_out);
    assert_eq!(
        types(&events),
        ["image_generation.partial_image", "image_generation.partial_image", "image_generation.completed"]
    );
    assert_eq!(events[0].0.as_deref(), Some("image_generation.partial_image"), "the event line names it too");
    assert_eq!(
        (events[0].1["b64_json"].as_str(), events[0].1["partial_image_index"].as_u64()),
        (Some(INTERIM_PNG), Some(0))
    );
    assert_eq!(
        (events[1].1["b64_json"].as_str(), events[1].1["partial_image_index"].as_u64()),
        (Some(INTERIM_PNG_2), Some(1))
    );
    let completed = &events[2].1;
    assert_eq!(completed["b64_json"], FINAL_PNG);
    assert_eq!((completed["output_format"].as_str(), completed["quality"].as_str()), (Some("png"), Some("high")));
    assert_eq!(completed["usage"]["total_tokens"], 1300);

    // One log line, at the end of the stream; on_log adds none.
    stream.on_log(&mut gw.host);
    let lines = gw.host.log_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let log = &lines[0].1;
    assert_eq!(
        (log["status"].as_u64(), log["outcome"].as_str(), log["images"].as_u64()),
        (Some(200), Some("success"), Some(1))
    );
    assert_eq!(log["upstream_status"], 200);
    assert_eq!(gw.host.counted(&Counter::Images), 1);
    // Stored in L1 (shared data).
    assert_eq!(gw.host.counted(&Counter::CacheStores(CacheTier::L1)), 1);
    assert_eq!(l1_entries(&gw), 1);
    assert_eq!(gw.worker().borrow().budget.requests, 0, "the stream gave its place back");

    // The same streamed request again: a local reply from L1, one completed event.
    gw.host.logs.clear();
    let (mut again, at_headers, at_body) =
        send_streamed(&mut gw, streamed(json!({"partial_images": 2, "quality": "high"})));
    assert_eq!((at_headers, at_body), (Verdict::Pause, Verdict::Pause));
    assert_eq!(gw.host.forwarded.len(), 1, "not forwarded again");
    let reply = gw.host.replies.pop().expect("a local reply");
    assert_eq!(reply.status, 200);
    assert_eq!(header(&reply.headers, "content-type"), Some("text/event-stream"));
    assert_eq!(header(&reply.headers, "x-image-cache"), Some("hit-l1"));
    let events = openai_events(&reply.body);
    assert_eq!(types(&events), ["image_generation.completed"]);
    assert_eq!(events[0].1["b64_json"], FINAL_PNG);
    assert_eq!(events[0].1["quality"], "high");
    again.on_log(&mut gw.host);
    let lines = gw.host.log_lines();
    assert_eq!(lines.len(), 1);
    assert_eq!((lines[0].1["status"].as_u64(), lines[0].1["cache"].as_str()), (Some(200), Some("hit-l1")));
}

#[test]
fn a_complete_stream_with_l2_is_queued_for_l2_and_written_on_the_tick() {
    let mut gw = Gateway::new(CACHED);
    let (mut stream, _, _) = send_streamed(&mut gw, streamed(json!({})));
    assert_eq!(gw.host.resumes, 1);
    assert_eq!(
        upstream_headers(&mut gw, &mut stream, 200, &[("content-type", "text/event-stream")]),
        Verdict::Continue
    );
    let all = gemini_stream();
    assert_eq!(upstream_piece(&mut gw, &mut stream, &all, true), Verdict::Continue);
    let events = openai_events(&gw.host.response_out);
    assert_eq!(types(&events), ["image_generation.completed"], "partial_images 0: no partial");
    stream.on_log(&mut gw.host);
    assert_eq!(gw.worker().borrow().queued_writes(), 1);
    gw.tick();
    assert_eq!(gw.l2_writes.len(), 1);
    assert_eq!(l1_entries(&gw), 1);
}

// ---- the response: a refusal before any event ----

#[test]
fn a_refused_stream_is_held_then_written_over_as_the_json_error_and_its_key_cools() {
    let mut gw = Gateway::new(TWO_KEYS_AND_VERTEX);
    let (mut stream, _, at_body) = send_streamed(&mut gw, streamed(json!({"partial_images": 1})));
    assert_eq!(at_body, Verdict::Continue);
    let (headers, _) = forwarded(&gw);
    assert_eq!(header(&headers, "x-goog-api-key"), Some("key-K1"));
    gw.host.logs.clear();

    let error = gemini_error(429, "RESOURCE_EXHAUSTED");
    let length = error.len().to_string();
    let verdict = upstream_headers(
        &mut gw,
        &mut stream,
        429,
        &[("content-type", "application/json; charset=UTF-8"), ("content-length", &length), ("retry-after", "7")],
    );
    assert_eq!(verdict, Verdict::Pause, "held for its body");
    let (a, b) = error.split_at(10);
    let (b, c) = b.split_at(25);
    let verdicts = upstream_held(&mut gw, &mut stream, &[a, b, c], true);
    assert_eq!(verdicts, [Verdict::Pause, Verdict::Pause, Verdict::Continue]);

    let h = &gw.host.response_headers;
    assert_eq!(header(h, ":status"), Some("429"));
    assert_eq!(header(h, "content-type"), Some("application/json"));
    assert_eq!(header(h, "content-length"), Some(gw.host.response_out.len().to_string().as_str()));
    assert!(gw.host.replies.is_empty(), "written over the response, not a local reply");
    let body: Value = serde_json::from_slice(&gw.host.response_out).expect("the OpenAI error");
    assert_eq!(body["error"]["code"], "IMG_QUOTA_EXHAUSTED");
    assert!(!String::from_utf8_lossy(&gw.host.response_out).contains("data:"), "not an event stream");

    // The key that was used cools down, as after a call-out.
    let settings = gw.root.settings().unwrap().clone();
    let cooled = gw
        .host
        .shared
        .get(&backends::cooldown_key(&settings.backends, KeyRef { backend: 0, key: 0 }))
        .and_then(|v| Cooldown::decode(v))
        .expect("K1 cooled");
    assert_eq!(cooled.until_ms, NOW_MS + 7_000);
    assert!(!gw.host.shared.contains_key(&backends::cooldown_key(&settings.backends, KeyRef { backend: 0, key: 1 })));
    assert_eq!(gw.host.counted(&Counter::KeyCooldowns("studio".into(), 0)), 1);

    stream.on_log(&mut gw.host);
    let lines = gw.host.log_lines();
    assert_eq!(lines.len(), 1);
    assert_eq!((lines[0].1["status"].as_u64(), lines[0].1["code"].as_str()), (Some(429), Some("IMG_QUOTA_EXHAUSTED")));

    // The next streamed request goes out on the other key.
    let (_next, _, _) = send_streamed(&mut gw, streamed(json!({"prompt": "another"})));
    let (headers, _) = (gw.host.forwarded[1].0.clone(), ());
    assert_eq!(header(&headers, "x-goog-api-key"), Some("key-K2"));
}

// ---- the internal route's header ----

#[test]
fn a_client_request_naming_the_upstream_cluster_is_refused_with_404_on_any_path() {
    for (path, method) in
        [("/v1/images/generations", "POST"), ("/healthz", "GET"), ("/v1beta/models/x:generateContent", "POST")]
    {
        let mut gw = Gateway::new(CACHED);
        gw.host.request_headers = vec![
            (":path".into(), path.into()),
            (":method".into(), method.into()),
            ("content-type".into(), "application/json".into()),
            (UPSTREAM_HEADER.into(), "gemini".into()),
        ];
        gw.host.body = streamed(json!({})).to_string().into_bytes();
        let mut stream = gw.root.new_stream().unwrap();
        assert_eq!(stream.on_request_headers(&mut gw.host, false), Verdict::Pause, "{path}");
        let reply = gw.host.replies.pop().expect("a local reply");
        assert_eq!(reply.status, 404, "{path}");
        assert_eq!(header(&reply.headers, "content-type"), Some("application/json"));
        assert!(json_of(&reply)["error"]["message"].as_str().unwrap().contains(UPSTREAM_HEADER));
        assert!(gw.host.replies.is_empty(), "one reply");
        gw.answer_calls(&mut stream);
        stream.on_log(&mut gw.host);
        assert!(gw.host.dispatched.is_empty() && gw.host.forwarded.is_empty(), "{path}: nothing goes anywhere");
        assert_eq!((gw.gemini_calls, gw.host.resumes), (0, 0));
    }
}

// ---- streaming off, and requests that cannot stream ----

#[test]
fn with_streaming_off_headers_continue_and_stream_true_is_a_400_naming_stream() {
    let mut gw = Gateway::new(r#"{"streaming": {"enabled": false}}"#);
    let (_stream, at_headers, at_body) = send_streamed(&mut gw, streamed(json!({})));
    assert_eq!(at_headers, Verdict::Continue, "the buffer filter holds the headers");
    assert_eq!(at_body, Verdict::Pause);
    let reply = gw.host.replies.pop().expect("a local reply");
    assert_eq!((reply.status, json_of(&reply)["error"]["param"].as_str()), (400, Some("stream")));
    assert!(gw.host.forwarded.is_empty());
    // A request that does not stream is answered by call-outs as always.
    let (_stream, at_headers, _) = send_streamed(&mut gw, json!({"prompt": "p"}));
    assert_eq!(at_headers, Verdict::Continue);
    assert_eq!((gw.gemini_calls, gw.host.replies.pop().map(|r| r.status)), (1, Some(200)));
}

#[test]
fn n_above_one_or_a_variation_with_stream_true_is_a_local_400() {
    let mut gw = Gateway::new("{}");
    let (_stream, _, at_body) = send_streamed(&mut gw, streamed(json!({"n": 2})));
    assert_eq!(at_body, Verdict::Pause);
    let reply = gw.host.replies.pop().expect("a local reply");
    assert_eq!((reply.status, json_of(&reply)["error"]["param"].as_str()), (400, Some("n")));

    const BOUNDARY: &str = "----driverstreamtest";
    let png = crate::base64::decode(FINAL_PNG.as_bytes()).unwrap();
    let mut form = Vec::new();
    for (name, value) in [("stream", "true"), ("model", "gemini-3-pro-image")] {
        form.extend(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").into_bytes(),
        );
    }
    form.extend(
        format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n"
        )
        .into_bytes(),
    );
    form.extend(&png);
    form.extend(format!("\r\n--{BOUNDARY}--\r\n").into_bytes());
    let headers = vec![
        (":path".into(), "/v1/images/variations".into()),
        (":method".into(), "POST".into()),
        ("content-type".into(), format!("multipart/form-data; boundary={BOUNDARY}")),
    ];
    let (_stream, _, at_body) = send(&mut gw, &form, headers);
    assert_eq!(at_body, Verdict::Pause);
    let reply = gw.host.replies.pop().expect("a local reply");
    assert_eq!((reply.status, json_of(&reply)["error"]["param"].as_str()), (400, Some("stream")));
    assert!(gw.host.forwarded.is_empty() && gw.host.dispatched.is_empty() && gw.gemini_calls == 0);
}

// ---- a stream cut short ----

#[test]
fn a_stream_that_ends_without_its_last_piece_is_logged_502_network_error_and_not_stored() {
    let mut gw = Gateway::new(L1_ONLY);
    let (mut stream, _, _) = send_streamed(&mut gw, streamed(json!({"partial_images": 2})));
    upstream_headers(&mut gw, &mut stream, 200, &[("content-type", "text/event-stream")]);
    gw.host.logs.clear();
    let all = gemini_stream();
    let first_end = thought_event(INTERIM_PNG).len();
    let second_end = first_end + thought_event(INTERIM_PNG_2).len();
    assert_eq!(upstream_piece(&mut gw, &mut stream, &all[..first_end + 7], false), Verdict::Continue);
    assert_eq!(upstream_piece(&mut gw, &mut stream, &all[first_end + 7..second_end - 5], false), Verdict::Continue);
    assert_eq!(types(&openai_events(&gw.host.response_out)), ["image_generation.partial_image"]);
    stream.on_log(&mut gw.host); // Envoy ends the stream: Gemini's connection broke off
    let lines = gw.host.log_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!((lines[0].1["status"].as_u64(), lines[0].1["code"].as_str()), (Some(502), Some("IMG_NETWORK_ERROR")));
    assert_eq!(gw.host.counted(&Counter::Errors(ErrorCode::NetworkError)), 1);
    assert_eq!(l1_entries(&gw), 0, "nothing stored");
    assert_eq!(gw.host.counted(&Counter::CacheStores(CacheTier::L1)), 0);
    assert_eq!(gw.worker().borrow().budget.requests, 0);
}

#[test]
fn envoy_reasons_for_a_cut_stream_tell_a_client_that_left_and_a_timeout_from_a_broken_gemini() {
    for (details, status, code) in [
        ("downstream_remote_disconnect", 499, None),
        ("upstream_response_timeout", 504, Some("IMG_NETWORK_ERROR")),
        ("upstream_reset_after_response_started{remote_reset}", 502, Some("IMG_NETWORK_ERROR")),
    ] {
        let mut gw = Gateway::new(L1_ONLY);
        let (mut stream, _, _) = send_streamed(&mut gw, streamed(json!({"partial_images": 2})));
        upstream_headers(&mut gw, &mut stream, 200, &[("content-type", "text/event-stream")]);
        gw.host.logs.clear();
        let all = gemini_stream();
        upstream_piece(&mut gw, &mut stream, &all[..thought_event(INTERIM_PNG).len()], false);
        gw.host.properties.insert("response/code_details".into(), details.as_bytes().to_vec());
        stream.on_log(&mut gw.host);
        let line = gw.host.log_lines().pop().expect("one line").1;
        assert_eq!(line["status"].as_u64(), Some(status), "{details}");
        assert_eq!(line["code"].as_str(), code, "{details}");
    }
}

#[test]
fn a_gemini_200_without_a_body_is_the_json_error_not_an_empty_stream() {
    let mut gw = Gateway::new(L1_ONLY);
    let (mut stream, _, _) = send_streamed(&mut gw, streamed(json!({})));
    gw.host.response_headers = vec![(":status".into(), "200".into())];
    assert_eq!(stream.on_response_headers(&mut gw.host, true), Verdict::Pause);
    let r = gw.host.replies.pop().expect("a local reply in place of the empty answer");
    assert_eq!((r.status, json_of(&r)["error"]["code"].as_str()), (502, Some("IMG_UPSTREAM_ERROR")));
    assert_eq!(r.header("content-type"), Some("application/json"));
}
