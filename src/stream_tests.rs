use serde_json::{json, Value};

use super::*;

// ---------------------------------------------------------------------------------------------
// Gemini's side: images, events, a recorded stream

/// A PNG of `w` x `h` (signature and IHDR, then `filler` bytes standing for the pixels), as
/// base64.
fn png_b64(w: u32, h: u32, filler: usize) -> String {
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    png.extend(w.to_be_bytes());
    png.extend(h.to_be_bytes());
    png.extend([8, 2, 0, 0, 0, 0, 0, 0, 0]);
    png.extend((0..filler).map(|i| (i * 7 % 251) as u8));
    let mut out = Vec::new();
    crate::base64::encode_into(&mut out, &png);
    String::from_utf8(out).unwrap()
}

fn thought_image(b64: &str) -> Value {
    json!({"inlineData": {"mimeType": "image/png", "data": b64}, "thought": true})
}

fn image(b64: &str) -> Value {
    json!({"inlineData": {"mimeType": "image/png", "data": b64}})
}

fn text(t: &str) -> Value {
    json!({"text": t})
}

fn thought_text(t: &str) -> Value {
    json!({"text": t, "thought": true})
}

fn usage_metadata() -> Value {
    json!({"promptTokenCount": 10, "candidatesTokenCount": 1290, "thoughtsTokenCount": 100, "totalTokenCount": 1400,
           "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 7}, {"modality": "IMAGE", "tokenCount": 3}]})
}

/// One `GenerateContentResponse` chunk as Gemini streams it.
fn chunk(parts: Vec<Value>, finish: Option<&str>, usage: bool) -> Value {
    let mut candidate = json!({"content": {"role": "model", "parts": parts}, "index": 0});
    if let Some(f) = finish {
        candidate["finishReason"] = json!(f);
    }
    let mut c = json!({"candidates": [candidate], "modelVersion": "gemini-3-pro-image-preview", "responseId": "r-1"});
    if usage {
        c["usageMetadata"] = usage_metadata();
    }
    c
}

/// Events framed as Gemini frames them: `data: <json>` and `\r\n\r\n`.
fn sse(events: &[Value]) -> Vec<u8> {
    sse_with(events, "\r\n")
}

fn sse_with(events: &[Value], eol: &str) -> Vec<u8> {
    events.iter().map(|e| format!("data: {e}{eol}{eol}")).collect::<String>().into_bytes()
}

fn interim_a() -> String {
    png_b64(512, 512, 3000)
}

fn interim_b() -> String {
    png_b64(1024, 1024, 5000)
}

fn final_b64() -> String {
    png_b64(2048, 2048, 30_000)
}

/// A stream like Gemini 3 Pro Image's with `includeThoughts`: thinking text, two interim
/// images, the answer's text, the final image, then the finish reason and usage.
fn recorded_events() -> Vec<Value> {
    vec![
        chunk(vec![thought_text("**Composing the scene**\n\nI am placing the cat...")], None, false),
        chunk(vec![thought_image(&interim_a())], None, false),
        chunk(vec![thought_text("**Refining**")], None, false),
        chunk(vec![thought_image(&interim_b())], None, false),
        chunk(vec![text("Here is your cat.")], None, false),
        chunk(vec![image(&final_b64())], None, false),
        chunk(vec![text("")], Some("STOP"), true),
    ]
}

fn recorded() -> Vec<u8> {
    sse(&recorded_events())
}

fn options(kind: StreamKind, partial_images: u32) -> StreamOptions {
    StreamOptions {
        meta: EventMeta { kind, created_at: 1_700_000_000, quality: "high".into(), background: "auto".into() },
        partial_images,
        max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
    }
}

/// Feeds `pieces` in order (the last one with end of stream) and returns all the output.
fn run_pieces(t: &mut StreamTransform, pieces: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    if pieces.is_empty() {
        out.extend(t.on_body(&[], true));
    }
    for (i, p) in pieces.iter().enumerate() {
        out.extend(t.on_body(p, i + 1 == pieces.len()));
    }
    out
}

fn run(opts: StreamOptions, body: &[u8]) -> (Vec<u8>, StreamTransform) {
    let mut t = StreamTransform::new(opts);
    let out = run_pieces(&mut t, &[body]);
    (out, t)
}

/// A small deterministic generator for random splits.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn random_pieces(body: &[u8], seed: u64, max: usize) -> Vec<&[u8]> {
    let mut rng = XorShift(seed);
    let mut pieces = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let n = (rng.next() as usize % max + 1).min(rest.len());
        let (a, b) = rest.split_at(n);
        pieces.push(a);
        rest = b;
    }
    pieces
}

// ---------------------------------------------------------------------------------------------
// The client's side: a reader doing what the OpenAI Python SDK does

/// What the SDK hands the caller: the events' JSON in order, then at most one raised error.
#[derive(Debug, Default)]
struct SdkRead {
    /// `(event:` line, data JSON)`.
    events: Vec<(Option<String>, Value)>,
    /// `APIError(message, body)`, raised for an event whose JSON has a truthy `error`.
    error: Option<(String, Value)>,
}

/// Python's truthiness of a JSON value.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// openai-python `_streaming.py` (3.57.0, as pinned in requirements-dev.txt): `_SSELineDecoder`
/// splits lines on CR, LF or CRLF; `SSEDecoder.decode` collects `event`/`data`/`id`/`retry`
/// fields, ignores `:` comments and other fields, strips one space after the colon, joins data
/// lines with `\n` and dispatches on a blank line (a last event without one is dropped);
/// `Stream.__stream__` stops at data starting with `[DONE]`, parses every other data as JSON
/// and raises `APIError(message=error.message, body=error)` when it has a truthy `error`.
fn sdk_read(bytes: &[u8]) -> SdkRead {
    let text = std::str::from_utf8(bytes).expect("the stream is UTF-8");
    let mut lines = Vec::new();
    let mut line = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                lines.push(std::mem::take(&mut line));
            }
            '\n' => lines.push(std::mem::take(&mut line)),
            c => line.push(c),
        }
    }
    if !line.is_empty() {
        lines.push(line);
    }
    let mut read = SdkRead::default();
    let (mut event, mut data, mut id, mut retry): (Option<String>, Vec<String>, Option<String>, Option<i64>) =
        (None, Vec::new(), None, None);
    let mut sses = Vec::new();
    for line in lines {
        if line.is_empty() {
            if event.is_none() && data.is_empty() && id.is_none() && retry.is_none() {
                continue;
            }
            sses.push((event.take().filter(|e| !e.is_empty()), data.join("\n")));
            data.clear();
            retry = None;
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((&line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = Some(value.to_string()),
            "data" => data.push(value.to_string()),
            "id" => id = Some(value.to_string()),
            "retry" => retry = value.parse().ok(),
            _ => {}
        }
    }
    for (event, data) in sses {
        if data.starts_with("[DONE]") {
            break;
        }
        let v: Value = serde_json::from_str(&data).unwrap_or_else(|e| panic!("data is not JSON ({e}): {data:.200}"));
        if v.get("error").is_some_and(truthy) {
            let error = v["error"].clone();
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .filter(|m| !m.is_empty())
                .unwrap_or("An error occurred during streaming")
                .to_string();
            read.error = Some((message, error));
            break;
        }
        read.events.push((event, v));
    }
    read
}

/// Reads the output as the SDK does and checks every event against the contract: the fields
/// section 12 lists, the types the SDK's models declare, `event:` equal to `type`.
fn check(bytes: &[u8], kind: StreamKind) -> SdkRead {
    let read = sdk_read(bytes);
    for (event, v) in &read.events {
        let ty = v["type"].as_str().expect("type");
        assert_eq!(event.as_deref(), Some(ty), "the event line names the type");
        let partial = ty == kind.partial_event();
        assert!(partial || ty == kind.completed_event(), "unexpected event {ty}");
        let o = v.as_object().unwrap();
        let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut want = vec!["b64_json", "background", "created_at", "output_format", "quality", "size", "type"];
        want.push(if partial { "partial_image_index" } else { "usage" });
        want.sort_unstable();
        assert_eq!(keys, want);
        assert!(is_base64(v["b64_json"].as_str().unwrap().as_bytes()));
        assert_eq!(v["created_at"], 1_700_000_000);
        assert!(["png", "jpeg", "webp"].contains(&v["output_format"].as_str().unwrap()));
        let size = v["size"].as_str().unwrap();
        assert!(
            size == "auto"
                || size.split_once('x').is_some_and(|(w, h)| w.parse::<u32>().is_ok() && h.parse::<u32>().is_ok())
        );
        assert!(v["background"].is_string() && v["quality"].is_string());
        if partial {
            assert!(v["partial_image_index"].is_u64());
        } else {
            let u = &v["usage"];
            for k in ["input_tokens", "output_tokens", "total_tokens"] {
                assert!(u[k].is_u64(), "usage.{k}");
            }
            assert!(
                u["input_tokens_details"]["text_tokens"].is_u64() && u["input_tokens_details"]["image_tokens"].is_u64()
            );
        }
    }
    if let Some((_, error)) = &read.error {
        for k in ["message", "type", "param", "code", "category", "resolution"] {
            assert!(error.get(k).is_some(), "error.{k}");
        }
    }
    read
}

/// The raw SSE events of the output, for framing checks: `(event, data)` per event.
fn frames(bytes: &[u8]) -> Vec<(String, String)> {
    let text = std::str::from_utf8(bytes).unwrap();
    assert!(text.is_empty() || text.ends_with("\n\n"), "every event ends with a blank line");
    text.split_terminator("\n\n")
        .map(|e| {
            let (event, data) = e.split_once('\n').expect("two lines");
            (event.strip_prefix("event: ").unwrap().to_string(), data.strip_prefix("data: ").unwrap().to_string())
        })
        .collect()
}

fn error_code(read: &SdkRead) -> Option<&str> {
    read.error.as_ref().and_then(|(_, e)| e["code"].as_str())
}

// ---------------------------------------------------------------------------------------------
// The transform

#[test]
fn a_recorded_stream_becomes_partials_then_completed() {
    let (out, t) = run(options(StreamKind::Generation, 2), &recorded());
    let read = check(&out, StreamKind::Generation);
    assert!(read.error.is_none());
    let got: Vec<_> = read.events.iter().map(|(_, v)| v).collect();
    assert_eq!(got.len(), 3);
    assert_eq!(got[0]["type"], "image_generation.partial_image");
    assert_eq!((got[0]["partial_image_index"].as_u64(), got[0]["size"].as_str()), (Some(0), Some("512x512")));
    assert_eq!(got[0]["b64_json"], interim_a());
    assert_eq!((got[1]["partial_image_index"].as_u64(), got[1]["size"].as_str()), (Some(1), Some("1024x1024")));
    assert_eq!(got[1]["b64_json"], interim_b());
    assert_eq!(got[2]["type"], "image_generation.completed");
    assert_eq!(got[2]["b64_json"], final_b64());
    assert_eq!(got[2]["size"], "2048x2048");
    assert_eq!((got[2]["output_format"].as_str(), got[2]["quality"].as_str()), (Some("png"), Some("high")));
    assert_eq!(got[2]["background"], "auto");
    assert_eq!(
        got[2]["usage"],
        json!({"input_tokens": 10, "output_tokens": 1390, "total_tokens": 1400,
               "input_tokens_details": {"text_tokens": 7, "image_tokens": 3}})
    );
    // What the caller stores in the cache.
    assert!(t.is_completed() && t.error().is_none());
    let img = t.final_image().unwrap();
    assert_eq!((img.base64, img.mime_type, img.text), (final_b64().as_bytes(), "image/png", Some("Here is your cat.")));
    assert_eq!(t.usage().unwrap().output_tokens, 1390);
    assert_eq!(t.partials_sent(), 2);
}

#[test]
fn chunk_boundaries_anywhere_give_the_same_output() {
    let body = recorded();
    let whole = run(options(StreamKind::Generation, 3), &body).0;
    assert!(!whole.is_empty());
    let mut t = StreamTransform::new(options(StreamKind::Generation, 3));
    let bytes: Vec<&[u8]> = body.chunks(1).collect();
    assert_eq!(run_pieces(&mut t, &bytes), whole, "byte by byte");
    for (seed, max) in [(1, 7), (2, 100), (3, 4096), (4, 65_536), (0x9e37_79b9_7f4a_7c15, 3)] {
        let mut t = StreamTransform::new(options(StreamKind::Generation, 3));
        assert_eq!(run_pieces(&mut t, &random_pieces(&body, seed, max)), whole, "seed {seed}");
    }
    // Every split into two, around each separator, including between \r and \n.
    for at in (0..body.len()).filter(|&i| matches!(body[i], b'\r' | b'\n')) {
        for at in [at, at + 1] {
            let (a, b) = body.split_at(at);
            let mut t = StreamTransform::new(options(StreamKind::Generation, 3));
            assert_eq!(run_pieces(&mut t, &[a, b]), whole, "split at {at}");
        }
    }
    // And with the end of stream in a separate, empty piece.
    let mut t = StreamTransform::new(options(StreamKind::Generation, 3));
    assert_eq!(run_pieces(&mut t, &[&body, &[]]), whole);
}

#[test]
fn any_line_ending_is_accepted() {
    let events = recorded_events();
    let crlf = run(options(StreamKind::Generation, 3), &sse_with(&events, "\r\n")).0;
    for eol in ["\n", "\r"] {
        assert_eq!(run(options(StreamKind::Generation, 3), &sse_with(&events, eol)).0, crlf, "{eol:?}");
    }
    // Mixed, with comments, event names, ids, no space after the colon, and a final event
    // without its blank line.
    let mut mixed = String::from(": keep-alive\n\nevent: message\nid: 1\n");
    for (i, e) in events.iter().enumerate() {
        let eol = ["\r\n", "\n", "\r"][i % 3];
        let data = if i % 2 == 0 { format!("data:{e}") } else { format!("data: {e}") };
        if i + 1 == events.len() {
            mixed.push_str(&data);
        } else {
            mixed.push_str(&format!("{data}{eol}{eol}"));
        }
    }
    assert_eq!(run(options(StreamKind::Generation, 3), mixed.as_bytes()).0, crlf);
}

#[test]
fn partial_images_caps_the_partials() {
    for (asked, sent) in [(0, 0), (1, 1), (2, 2), (3, 2), (7, 2)] {
        let (out, t) = run(options(StreamKind::Generation, asked), &recorded());
        let read = check(&out, StreamKind::Generation);
        let indices: Vec<u64> = read.events.iter().filter_map(|(_, v)| v["partial_image_index"].as_u64()).collect();
        assert_eq!(indices, (0..sent).collect::<Vec<u64>>(), "partial_images {asked}");
        assert_eq!(read.events.len() as u64, sent + 1);
        assert_eq!(read.events.last().unwrap().1["type"], "image_generation.completed");
        assert_eq!(t.partials_sent() as u64, sent);
    }
}

#[test]
fn edits_have_their_own_event_names() {
    let (out, _) = run(options(StreamKind::Edit, 1), &recorded());
    let read = check(&out, StreamKind::Edit);
    let types: Vec<_> = read.events.iter().map(|(_, v)| v["type"].as_str().unwrap().to_string()).collect();
    assert_eq!(types, ["image_edit.partial_image", "image_edit.completed"]);
    assert_eq!(StreamKind::for_endpoint(Endpoint::Edits), Some(StreamKind::Edit));
    assert_eq!(StreamKind::for_endpoint(Endpoint::Generations), Some(StreamKind::Generation));
    assert_eq!(StreamKind::for_endpoint(Endpoint::Variations), None);
}

#[test]
fn the_final_image_may_come_before_the_finish_and_the_finish_may_not_come() {
    // Image and finish in one event, with usage.
    let one = sse(&[chunk(vec![image(&final_b64())], Some("STOP"), true)]);
    let (out, t) = run(options(StreamKind::Generation, 0), &one);
    let read = check(&out, StreamKind::Generation);
    assert_eq!(read.events.len(), 1);
    assert_eq!(read.events[0].1["usage"]["total_tokens"], 1400);
    assert!(t.is_completed());
    // The completed event waits for the finish (usage comes with it), not for the end.
    let mut t = StreamTransform::new(options(StreamKind::Generation, 0));
    assert!(t.on_body(&sse(&[chunk(vec![image(&final_b64())], None, false)]), false).is_empty());
    let done = t.on_body(&sse(&[chunk(vec![], Some("STOP"), true)]), false);
    assert_eq!(check(&done, StreamKind::Generation).events[0].1["usage"]["output_tokens"], 1390);
    assert!(t.on_body(b"", true).is_empty(), "nothing after completion");
    // No finish reason before the end: the image is the answer, as in a non-streamed one.
    let (out, t) = run(options(StreamKind::Generation, 0), &sse(&[chunk(vec![image(&final_b64())], None, false)]));
    let read = check(&out, StreamKind::Generation);
    assert_eq!(read.events.len(), 1);
    assert_eq!(
        read.events[0].1["usage"],
        json!({"input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "input_tokens_details": {"text_tokens": 0, "image_tokens": 0}})
    );
    assert!(t.is_completed() && t.usage().is_none());
    // The last image that is not a thought wins.
    let two =
        sse(&[chunk(vec![image(&interim_a())], None, false), chunk(vec![image(&final_b64())], Some("STOP"), false)]);
    let read = check(&run(options(StreamKind::Generation, 3), &two).0, StreamKind::Generation);
    assert_eq!(read.events.len(), 1);
    assert_eq!(read.events[0].1["b64_json"], final_b64());
}

#[test]
fn input_after_the_end_is_ignored() {
    let mut body = recorded();
    body.extend(sse(&[chunk(vec![thought_image(&interim_a())], None, false), json!({"error": {"code": 500}})]));
    let (out, t) = run(options(StreamKind::Generation, 3), &body);
    let read = check(&out, StreamKind::Generation);
    assert!(read.error.is_none());
    assert_eq!(read.events.len(), 3);
    assert!(t.is_completed());
    let mut t = StreamTransform::new(options(StreamKind::Generation, 3));
    let failed = t.on_body(&sse(&[json!({"promptFeedback": {"blockReason": "SAFETY"}})]), false);
    assert_eq!(frames(&failed).len(), 1);
    assert!(t.on_body(&recorded(), true).is_empty());
    assert_eq!(t.error().unwrap().code, ErrorCode::SafetyBlocked);
    assert!(t.abort(ApiError::new(ErrorCode::NetworkError, "x")).is_empty());
    assert!(t.final_image().is_none());
}

#[test]
fn blocks_and_finishes_without_an_image_map_as_non_streamed_answers_do() {
    let cases: Vec<(Vec<Value>, ErrorCode)> = vec![
        (
            vec![
                json!({"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 5, "totalTokenCount": 5}}),
            ],
            ErrorCode::SafetyBlocked,
        ),
        (vec![json!({"promptFeedback": {"blockReason": "OTHER"}})], ErrorCode::SafetyBlocked),
        (
            vec![chunk(vec![thought_text("hmm")], None, false), chunk(vec![], Some("IMAGE_SAFETY"), true)],
            ErrorCode::SafetyBlocked,
        ),
        (vec![chunk(vec![], Some("PROHIBITED_CONTENT"), false)], ErrorCode::SafetyBlocked),
        (vec![json!({"candidates": [{"finishReason": "IMAGE_OTHER"}]})], ErrorCode::SafetyBlocked),
        (vec![chunk(vec![text("I can't draw that")], Some("STOP"), true)], ErrorCode::NoImage),
        (vec![chunk(vec![], Some("MAX_TOKENS"), false)], ErrorCode::NoImage),
        // Interim images are no answer.
        (vec![chunk(vec![thought_image(&interim_a())], Some("STOP"), true)], ErrorCode::NoImage),
    ];
    for (events, code) in cases {
        let body = sse(&events);
        let (out, t) = run(options(StreamKind::Generation, 0), &body);
        let read = check(&out, StreamKind::Generation);
        assert!(read.events.is_empty());
        assert_eq!(error_code(&read), Some(code.as_str()), "{events:?}");
        // The same code and message as the non-streamed answer of the last event.
        let last = serde_json::to_vec(events.last().unwrap()).unwrap();
        let plain = read_call(CallResponse { status: Some(200), body: last, ..Default::default() });
        let expected = plain.result.unwrap_err();
        assert_eq!(t.error(), Some(&expected));
        assert_eq!(read.error.as_ref().unwrap().0, expected.message);
        if code == ErrorCode::SafetyBlocked {
            assert_eq!(read.error.as_ref().unwrap().1["param"], "prompt");
        }
    }
    // A block after partials: they were sent, then the error.
    let body =
        sse(&[chunk(vec![thought_image(&interim_a())], None, false), chunk(vec![], Some("IMAGE_SAFETY"), false)]);
    let read = check(&run(options(StreamKind::Generation, 2), &body).0, StreamKind::Generation);
    assert_eq!(read.events.len(), 1);
    assert_eq!(error_code(&read), Some("IMG_SAFETY_BLOCKED"));
}

#[test]
fn gemini_errors_mid_stream_map_as_failed_calls_do() {
    let cases = [
        (
            json!({"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}),
            "IMG_SERVICE_UNAVAILABLE",
        ),
        (
            json!({"error": {"code": 429, "message": "Resource exhausted", "status": "RESOURCE_EXHAUSTED"}}),
            "IMG_QUOTA_EXHAUSTED",
        ),
        (json!({"error": {"code": 500, "message": "Internal error", "status": "INTERNAL"}}), "IMG_UPSTREAM_ERROR"),
        (
            json!({"error": {"code": 403, "message": "key AIzaSECRET", "status": "PERMISSION_DENIED"}}),
            "IMG_UPSTREAM_AUTH",
        ),
        (json!({"error": {"message": "no code"}}), "IMG_UPSTREAM_ERROR"),
        (json!({"error": "a string"}), "IMG_UPSTREAM_ERROR"),
    ];
    for (error, code) in cases {
        let body = sse(&[chunk(vec![thought_image(&interim_a())], None, false), error.clone()]);
        let (out, t) = run(options(StreamKind::Generation, 3), &body);
        let read = check(&out, StreamKind::Generation);
        assert_eq!(read.events.len(), 1, "the partial was sent first");
        assert_eq!(error_code(&read), Some(code), "{error}");
        assert!(!read.error.as_ref().unwrap().0.contains("AIza"), "no key leaks");
        assert_eq!(t.error().unwrap().code.as_str(), code);
    }
    // `"error": null` is no error (as the SDKs read it).
    let body = sse(&[json!({"error": null}), chunk(vec![image(&final_b64())], Some("STOP"), true)]);
    assert!(check(&run(options(StreamKind::Generation, 0), &body).0, StreamKind::Generation).error.is_none());
    // Google's SDKs also accept an error printed unframed, over several lines.
    let mut body = sse(&[chunk(vec![thought_image(&interim_a())], None, false)]);
    body.extend_from_slice(b"{\n  \"error\": {\n    \"code\": 503,\n    \"message\": \"overloaded\",\n    \"status\": \"UNAVAILABLE\"\n  }\n}\n");
    let read = check(&run(options(StreamKind::Generation, 3), &body).0, StreamKind::Generation);
    assert_eq!(error_code(&read), Some("IMG_SERVICE_UNAVAILABLE"));
}

#[test]
fn a_stream_cut_short_ends_with_an_error() {
    // Cleanly ended after an interim image: no image.
    let body = sse(&recorded_events()[..4]);
    let (out, t) = run(options(StreamKind::Generation, 3), &body);
    let read = check(&out, StreamKind::Generation);
    assert_eq!(read.events.len(), 2);
    assert_eq!(error_code(&read), Some("IMG_NO_IMAGE"));
    assert!(!t.is_completed() && t.final_image().is_none());
    // Nothing at all.
    let (out, _) = run(options(StreamKind::Generation, 3), b"");
    assert_eq!(error_code(&check(&out, StreamKind::Generation)), Some("IMG_NO_IMAGE"));
    // Cut inside the final image's event: an unreadable event.
    let full = recorded();
    let last_event = sse(&recorded_events()[..5]).len();
    let cut = &full[..last_event + 5000];
    let (out, _) = run(options(StreamKind::Generation, 3), cut);
    let read = check(&out, StreamKind::Generation);
    assert_eq!(read.events.len(), 2);
    assert_eq!(error_code(&read), Some("IMG_UPSTREAM_ERROR"));
    assert!(read.error.unwrap().0.contains("ends early"));
    // The caller may end an open stream itself.
    let mut t = StreamTransform::new(options(StreamKind::Generation, 3));
    let sent = check(&t.on_body(&body, false), StreamKind::Generation);
    assert_eq!((sent.events.len(), sent.error.is_none()), (2, true), "no end yet, no error yet");
    let aborted = t.abort(ApiError::timed_out("Gemini did not answer within the gateway's timeout"));
    assert_eq!(error_code(&check(&aborted, StreamKind::Generation)), Some("IMG_NETWORK_ERROR"));
    assert!(t.abort(ApiError::new(ErrorCode::NetworkError, "again")).is_empty());
}

#[test]
fn an_oversized_event_is_an_error_and_memory_stays_bounded() {
    let mut opts = options(StreamKind::Generation, 3);
    opts.max_event_bytes = 20_000;
    let mut t = StreamTransform::new(opts);
    let mut out = Vec::new();
    // The interim images fit; the final one does not.
    for piece in random_pieces(&recorded(), 11, 1000) {
        out.extend(t.on_body(piece, false));
        assert!(t.held_bytes() <= 3 * 20_000, "{}", t.held_bytes());
    }
    out.extend(t.on_body(b"", true));
    let read = check(&out, StreamKind::Generation);
    assert_eq!(read.events.len(), 2);
    assert_eq!(error_code(&read), Some("IMG_UPSTREAM_ERROR"));
    assert!(read.error.unwrap().0.contains("20000 bytes"));
    assert!(t.on_body(&recorded(), true).is_empty());
    // A huge line without any newline is cut off too.
    let mut opts = options(StreamKind::Generation, 3);
    opts.max_event_bytes = 1000;
    let mut t = StreamTransform::new(opts);
    let out = t.on_body(&vec![b'x'; 5000], false);
    assert_eq!(error_code(&check(&out, StreamKind::Generation)), Some("IMG_UPSTREAM_ERROR"));
    assert!(t.held_bytes() < 2000);
}

#[test]
fn unreadable_events_are_upstream_errors_that_quote_nothing() {
    for bad in [
        "data: SECRET-garbage\r\n\r\n",
        "data: {\"candidates\": SECRET\r\n\r\n",
        "data: [{\"candidates\": []}]\r\n\r\n",
        "data: {\"candidates\": \"SECRET\"}\r\n\r\n",
        "data: {\"candidates\": [{\"content\": {\"parts\": [{\"inlineData\": {\"data\": 7}}]}}]}\r\n\r\n",
        "HTTP/1.1 200 OK SECRET\r\n\r\n",
    ] {
        let (out, t) = run(options(StreamKind::Generation, 3), bad.as_bytes());
        let read = check(&out, StreamKind::Generation);
        assert_eq!(error_code(&read), Some("IMG_UPSTREAM_ERROR"), "{bad:?}");
        let message = &read.error.unwrap().0;
        assert!(message.starts_with("Gemini's streamed answer could not be read: "), "{message}");
        assert!(!message.contains("SECRET") && !message.contains("line"), "{message}");
        assert!(!t.is_completed());
    }
}

#[test]
fn thought_text_and_other_parts_are_ignored() {
    let body = sse(&[
        chunk(vec![thought_text("thinking"), json!({"thoughtSignature": "c2ln"})], None, false),
        json!({"candidates": [{"content": {"parts": [{"functionCall": {"name": "x"}}]}}]}),
        json!({"candidates": []}),
        json!({"usageMetadata": {"promptTokenCount": 1}}),
        json!({"candidates": [{"content": {"role": "model"}}]}),
        chunk(vec![image(&final_b64())], Some("STOP"), true),
    ]);
    let (out, t) = run(options(StreamKind::Generation, 3), &body);
    let read = check(&out, StreamKind::Generation);
    assert_eq!(read.events.len(), 1);
    assert_eq!(read.events[0].1["type"], "image_generation.completed");
    assert_eq!(t.final_image().unwrap().text, None, "thought text is no revised prompt");
}

#[test]
fn images_that_are_not_base64_never_reach_the_client() {
    // The final image: an upstream error, as for a non-streamed answer.
    let body = sse(&[chunk(vec![image("not base64!")], Some("STOP"), true)]);
    let (out, t) = run(options(StreamKind::Generation, 3), &body);
    let read = check(&out, StreamKind::Generation);
    assert!(read.events.is_empty());
    assert_eq!(error_code(&read), Some("IMG_UPSTREAM_ERROR"));
    assert_eq!(t.error().unwrap().message, "Gemini's image data is not valid base64");
    // Even when the finish comes later.
    let body = sse(&[chunk(vec![image("QUJD\"}")], None, false), chunk(vec![], Some("STOP"), true)]);
    assert_eq!(
        error_code(&check(&run(options(StreamKind::Generation, 3), &body).0, StreamKind::Generation)),
        Some("IMG_UPSTREAM_ERROR")
    );
    // An interim image: skipped (it is only a preview), without using up an index.
    let body = sse(&[
        chunk(vec![thought_image("@@@@"), thought_image("")], None, false),
        chunk(vec![thought_image(&interim_b())], None, false),
        chunk(vec![image(&final_b64())], Some("STOP"), true),
    ]);
    let read = check(&run(options(StreamKind::Generation, 1), &body).0, StreamKind::Generation);
    assert!(read.error.is_none());
    assert_eq!(read.events.len(), 2);
    assert_eq!(read.events[0].1["b64_json"], interim_b());
    assert_eq!(read.events[0].1["partial_image_index"], 0);
}

#[test]
fn escaped_base64_is_unescaped_and_copied_as_is() {
    let b64 = final_b64();
    let escaped = b64.replace('/', "\\/");
    assert_ne!(escaped, b64, "the test image has a slash");
    let body = format!("data: {{\"candidates\":[{{\"content\":{{\"parts\":[{{\"inlineData\":{{\"mimeType\":\"image/png\",\"data\":\"{escaped}\"}}}}]}},\"finishReason\":\"STOP\"}}]}}\n\n");
    let (out, t) = run(options(StreamKind::Generation, 0), body.as_bytes());
    let read = check(&out, StreamKind::Generation);
    assert_eq!(read.events[0].1["b64_json"], b64);
    assert_eq!(t.final_image().unwrap().base64, b64.as_bytes());
}

#[test]
fn output_formats_come_from_the_mime_type_then_the_bytes() {
    let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xE0, 0, 16, b'J', b'F', b'I', b'F', 0, 1, 1, 0, 0, 1, 0, 1, 0, 0];
    jpeg.extend([0xFF, 0xC0, 0, 17, 8, 0, 96, 0, 128, 3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
    let mut b64 = Vec::new();
    crate::base64::encode_into(&mut b64, &jpeg);
    let b64 = String::from_utf8(b64).unwrap();
    for mime in [Some("image/jpeg"), Some("image/unknown"), None] {
        let mut part = json!({"inlineData": {"data": b64}});
        if let Some(m) = mime {
            part["inlineData"]["mimeType"] = json!(m);
        }
        let (out, _) = run(options(StreamKind::Generation, 0), &sse(&[chunk(vec![part], Some("STOP"), false)]));
        let v = &check(&out, StreamKind::Generation).events[0].1;
        let want = if mime.is_none() { "png" } else { "jpeg" };
        assert_eq!((v["output_format"].as_str(), v["size"].as_str()), (Some(want), Some("128x96")), "{mime:?}");
    }
    // An image whose header cannot be read: size auto, never a wrong one.
    let (out, _) = run(options(StreamKind::Generation, 0), &sse(&[chunk(vec![image("QUJD")], Some("STOP"), false)]));
    assert_eq!(check(&out, StreamKind::Generation).events[0].1["size"], "auto");
}

#[test]
fn echoed_strings_are_escaped() {
    let mut opts = options(StreamKind::Generation, 1);
    opts.meta.quality = "hi\"gh\n".into();
    opts.meta.background = "\\auto".into();
    let (out, _) = run(opts, &recorded());
    let read = check(&out, StreamKind::Generation);
    assert_eq!(read.events.len(), 2);
    assert!(read.events.iter().all(|(_, v)| v["quality"] == "hi\"gh\n" && v["background"] == "\\auto"));
}

#[test]
fn the_framing_is_event_then_data_then_a_blank_line() {
    let (out, _) = run(options(StreamKind::Generation, 2), &recorded());
    let f = frames(&out);
    assert_eq!(f.len(), 3);
    for (event, data) in &f {
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(&v["type"], event.as_str());
        assert!(!data.contains('\n') && !data.contains('\r'));
    }
    let e = error_event(&ApiError::param(ErrorCode::SafetyBlocked, "prompt", "blocked \"here\""));
    let f = frames(&e);
    assert_eq!(f[0].0, "error");
    let v: Value = serde_json::from_str(&f[0].1).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(
        v["error"],
        json!({"message": "blocked \"here\"", "type": "invalid_request_error", "param": "prompt",
               "code": "IMG_SAFETY_BLOCKED", "category": "USER_ERROR",
               "resolution": ErrorCode::SafetyBlocked.resolution()})
    );
    assert!(f[0].1.starts_with("{\"type\":\"error\","));
}

#[test]
fn the_sdk_reader_raises_on_the_error_event() {
    let body =
        sse(&[chunk(vec![thought_image(&interim_a())], None, false), chunk(vec![], Some("IMAGE_SAFETY"), false)]);
    let read = check(&run(options(StreamKind::Generation, 1), &body).0, StreamKind::Generation);
    let (message, error) = read.error.unwrap();
    assert!(message.contains("IMAGE_SAFETY"), "{message}");
    assert_eq!(error["type"], "invalid_request_error");
    // And the reader itself behaves as the SDK's: [DONE] ends, comments are skipped, data lines
    // join, an event line is optional, a last event without a blank line is dropped.
    let read =
        sdk_read(b": hi\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\ndata: {\"b\":2}\n\ndata: [DONE]\n\ndata: {\"c\":3}\n\n");
    assert_eq!(read.events.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(), [json!({"a": 1}), json!({"b": 2})]);
    assert_eq!(sdk_read(b"data: {\"a\":1}\n\ndata: {\"b\":2}").events.len(), 1);
    assert_eq!(sdk_read(b"data: {\"error\":{}}\n\n").events.len(), 1, "an empty error is falsy");
}

#[test]
fn a_cached_answer_streams_as_one_completed_event() {
    let meta = options(StreamKind::Edit, 0).meta;
    let b64 = final_b64();
    let cached = ImageView { mime_type: "image/png", text: Some("a cat"), base64: b64.as_bytes() };
    let usage = Usage { input_tokens: 3, output_tokens: 5, total_tokens: 8, text_tokens: 2, image_tokens: 1 };
    let out = cached_completed_event(&meta, &cached, Some(usage));
    let read = check(&out, StreamKind::Edit);
    assert_eq!(read.events.len(), 1);
    let v = &read.events[0].1;
    assert_eq!(v["type"], "image_edit.completed");
    assert_eq!((v["b64_json"].as_str(), v["size"].as_str()), (Some(b64.as_str()), Some("2048x2048")));
    assert_eq!(v["usage"]["input_tokens_details"], json!({"text_tokens": 2, "image_tokens": 1}));
    // The same bytes as a streamed completion of that image would carry.
    let (streamed, _) = run(options(StreamKind::Edit, 0), &sse(&[chunk(vec![image(&b64)], Some("STOP"), true)]));
    let streamed_v = &check(&streamed, StreamKind::Edit).events[0].1;
    assert_eq!(streamed_v["b64_json"], v["b64_json"]);
    let out = cached_completed_event(&meta, &ImageView { base64: b"bad!", ..cached }, None);
    assert_eq!(error_code(&check(&out, StreamKind::Edit)), Some("IMG_INTERNAL_ERROR"));
}

// ---------------------------------------------------------------------------------------------
// The splitter alone

fn split_all(input: &[u8], max: usize) -> Result<Vec<String>, EventTooLarge> {
    let mut s = SseSplitter::new(max);
    let mut events = Vec::new();
    s.feed(input, &mut events)?;
    s.finish(&mut events)?;
    Ok(events.into_iter().map(|e| String::from_utf8(e).unwrap()).collect())
}

#[test]
fn the_splitter_follows_the_sse_rules() {
    let cases: &[(&str, &[&str])] = &[
        ("data: a\n\ndata: b\n\n", &["a", "b"]),
        ("data: a\r\n\r\ndata: b\r\n\r\n", &["a", "b"]),
        ("data: a\r\rdata: b\r\r", &["a", "b"]),
        ("data: a\ndata: b\n\n", &["a\nb"]),
        ("data: a\r\ndata: b\r\n\r\n", &["a\nb"]),
        ("data: a\rdata: b\r\n\n", &["a\nb"]),
        ("{\r\n  \"a\": 1\r\n}\r\n\r\n", &["{\n  \"a\": 1\n}"]),
        ("data:a\n\n", &["a"]),
        ("data:  a\n\n", &[" a"]),
        ("data: a:b: c\n\n", &["a:b: c"]),
        ("data\ndata: x\n\n", &["\nx"]),
        (": comment\nevent: e\nid: 7\nretry: 10\ndata: x\n\n", &["x"]),
        ("event: e\n\n\n\ndata:\n\ndata:  \n\n", &[]),
        ("data: last", &["last"]),
        ("{\n  \"error\": {\n    \"code\": 1\n  }\n}", &["{\n  \"error\": {\n    \"code\": 1\n  }\n}"]),
        ("data: d\nnoise line\n\n", &["d"]),
        ("averyveryverylongfieldname: v\n\n", &["averyveryverylongfieldname: v"]),
    ];
    for (input, want) in cases {
        let got = split_all(input.as_bytes(), 1000).unwrap();
        assert_eq!(got, *want, "{input:?}");
        // Split anywhere, the same events.
        for at in 0..input.len() {
            let (a, b) = input.as_bytes().split_at(at);
            let mut s = SseSplitter::new(1000);
            let mut events = Vec::new();
            s.feed(a, &mut events).unwrap();
            s.feed(b, &mut events).unwrap();
            s.finish(&mut events).unwrap();
            let events: Vec<String> = events.into_iter().map(|e| String::from_utf8(e).unwrap()).collect();
            assert_eq!(events, *want, "{input:?} split at {at}");
        }
    }
}

#[test]
fn the_splitter_bounds_an_event_and_stays_failed() {
    assert_eq!(split_all(b"data: 0123456789\n\n", 10), Ok(vec!["0123456789".to_string()]));
    assert_eq!(split_all(b"data: 0123456789a\n\n", 10), Err(EventTooLarge { limit: 10 }));
    // The bound is per event, not per stream.
    assert_eq!(split_all(&b"data: 0123456789\n\n".repeat(50), 10).unwrap().len(), 50);
    // Two data lines count together; raw lines too.
    assert!(split_all(b"data: 012345\ndata: 6789\n\n", 10).is_err());
    assert!(split_all(b"0123456789abc\n\n", 10).is_err());
    let mut s = SseSplitter::new(10);
    let mut events = Vec::new();
    assert!(s.feed(b"data: 0123456789abcdef", &mut events).is_err());
    assert!(s.feed(b"\n\ndata: ok\n\n", &mut events).is_err(), "no resynchronising");
    assert!(s.finish(&mut events).is_err());
    assert!(events.is_empty());
    assert!(s.held_bytes() <= 16, "the partial event was let go");
}

#[test]
fn an_ended_stream_holds_only_what_the_cache_needs() {
    let (_, t) = run(options(StreamKind::Generation, 3), &recorded());
    let final_event = sse(&recorded_events()[5..6]).len();
    assert!(t.held_bytes() <= 2 * final_event, "{} > 2 x {final_event}", t.held_bytes());
    // Failed, with an unfinished event pending: nothing is held.
    let mut t = StreamTransform::new(options(StreamKind::Generation, 3));
    let mut body = sse(&[json!({"error": {"code": 503, "status": "UNAVAILABLE"}})]);
    body.extend_from_slice(b"data: {\"candidates\": [");
    let out = t.on_body(&body, false);
    assert_eq!(error_code(&check(&out, StreamKind::Generation)), Some("IMG_SERVICE_UNAVAILABLE"));
    assert_eq!(t.held_bytes(), 0);
}
