//! `streamGenerateContent?alt=sse`: the same requests and checks as `generateContent`, answered
//! as server-sent events the way Google sends them: `200`, `content-type: text/event-stream`,
//! chunked, each event `data: <one GenerateContentResponse JSON on one line>` and a blank line
//! (`\r\n\r\n`), each written and flushed as its own HTTP chunk.
//!
//! With `generationConfig.thinkingConfig.includeThoughts: true`, Gemini 3 Pro Image's thinking
//! comes first: a thought summary (`{"text": ..., "thought": true}`), then up to two interim
//! images (`{"inlineData": ..., "thought": true}`, smaller, same ratio), each in its own event;
//! then the final image (the one `generateContent` makes for the same request) with
//! `finishReason` and the whole `usageMetadata`. Gemini 2.5 Flash Image does not think: it sends
//! no thought parts. Markers steer delays between events and failures in the middle of the
//! stream (see `behaviour.rs`).

use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::behaviour::Markers;
use super::inputs::{self, Family, Inputs};
use super::{
    blocked, cached_png, google_error, image_part, marker_error, Picture, Response, State, Usage, IMAGE_TEXT,
    NO_IMAGE_TEXT, REFUSAL_TEXT, THOUGHT_TEXT,
};

/// How a stream ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// After the last event, the terminating zero-length chunk.
    Complete,
    /// The last event is a Google error object (`[fake:errorafter=K]`); then the terminating
    /// chunk.
    Error,
    /// The connection closes after the events, without the terminating chunk
    /// (`[fake:breakafter=K]`).
    Broken,
}

impl StreamEnd {
    fn name(self) -> &'static str {
        match self {
            StreamEnd::Complete => "complete",
            StreamEnd::Error => "error",
            StreamEnd::Broken => "broken",
        }
    }
}

/// A stream's answer, made whole before the first byte is sent (so it can be recorded, counted
/// and kept like any other answer), then sent event by event.
#[derive(Debug)]
pub struct SseStream {
    /// Each event's data: a JSON object on one line (unless a marker spoils it).
    pub events: Vec<Vec<u8>>,
    /// Milliseconds to wait before each event after the first.
    pub gap_ms: u64,
    pub end: StreamEnd,
}

impl SseStream {
    /// What recorded requests show of a stream: `{"events": N, "end": "complete"}`.
    pub fn summary(&self) -> Value {
        json!({"events": self.events.len(), "end": self.end.name()})
    }
}

/// One event as Google frames it: `data: `, the data, a blank line (CRLF CRLF).
pub fn frame(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 10);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n\r\n");
    out
}

/// Sends the events, each as one HTTP/1.1 chunk flushed as soon as it is written, waiting
/// `gap_ms` before each after the first; then the terminating chunk, unless the stream is to
/// break. `Ok(false)`: the caller must close the connection now (a broken stream).
pub async fn send<W: AsyncWrite + Unpin>(out: &mut W, s: &SseStream) -> std::io::Result<bool> {
    for (i, data) in s.events.iter().enumerate() {
        if i > 0 && s.gap_ms > 0 {
            tokio::time::sleep(Duration::from_millis(s.gap_ms)).await;
        }
        let event = frame(data);
        let mut chunk = format!("{:x}\r\n", event.len()).into_bytes();
        chunk.extend_from_slice(&event);
        chunk.extend_from_slice(b"\r\n");
        out.write_all(&chunk).await?;
        out.flush().await?;
    }
    if s.end == StreamEnd::Broken {
        return Ok(false);
    }
    out.write_all(b"0\r\n\r\n").await?;
    out.flush().await?;
    Ok(true)
}

/// `streamGenerateContent` without `?alt=sse`. Stricter than Google, which then streams one
/// JSON array: the filter must ask for server-sent events.
pub fn not_sse() -> Response {
    google_error(
        400,
        "fake-gemini serves streamGenerateContent only as server-sent events: add ?alt=sse (Google would answer a JSON array).",
        json!([]),
    )
}

/// `generationConfig.thinkingConfig.includeThoughts` (or the proto names) is `true`.
pub fn include_thoughts(body: &Value) -> bool {
    let config = inputs::field(body, "generationConfig", "generation_config");
    let thinking = inputs::field(config, "thinkingConfig", "thinking_config");
    inputs::field(thinking, "includeThoughts", "include_thoughts").as_bool() == Some(true)
}

/// Interim images when thoughts are included and no `[fake:interim=K]` says otherwise.
const DEFAULT_INTERIM: usize = 2;
/// Gemini 3 Pro Image makes at most two interim images while it thinks.
const MAX_INTERIM: usize = 2;

/// The answer to a valid `streamGenerateContent` request: a marker's error (the usual JSON,
/// before any stream), else the stream.
pub fn respond(m: &Markers, prompt: &str, body: &Value, model: &str, inputs: &Inputs, state: &State) -> Response {
    if let Some(r) = marker_error(m, prompt, state) {
        return r;
    }
    let family = Family::of(model);
    let usage = Usage::of(prompt, inputs, family);
    let event = |parts: Vec<Value>, finish: Option<&str>| {
        let mut candidate = json!({"content": {"role": "model", "parts": parts}, "index": 0});
        if let Some(f) = finish {
            candidate["finishReason"] = json!(f);
        }
        let usage = if finish.is_some() { &usage.full } else { &usage.prompt_only };
        json!({"candidates": [candidate], "usageMetadata": usage, "modelVersion": model, "responseId": "fake-response"})
    };
    let mut events = Vec::new();
    if let Some(reason) = &m.block {
        events.push(blocked(reason));
    } else {
        let picture = Picture::of(prompt, body, inputs, family);
        if family == Family::Pro3 && include_thoughts(body) {
            events.push(event(vec![json!({"text": THOUGHT_TEXT, "thought": true})], None));
            for k in 1..=m.interim.unwrap_or(DEFAULT_INTERIM).min(MAX_INTERIM) {
                // A quarter, then half the final size; colours of their own.
                let div = if k == 1 { 4 } else { 2 };
                let shade = (picture.shade + k as u8) % 6;
                let png = cached_png(state, picture.width / div, picture.height / div, shade);
                let data = base64::engine::general_purpose::STANDARD.encode(png.as_slice());
                events.push(event(
                    vec![json!({"inlineData": {"mimeType": "image/png", "data": data}, "thought": true})],
                    None,
                ));
            }
        }
        if let Some(reason) = &m.finish {
            events.push(event(vec![json!({"text": REFUSAL_TEXT})], Some(reason)));
        } else if m.no_image {
            events.push(event(vec![json!({"text": NO_IMAGE_TEXT})], Some("STOP")));
        } else {
            let image = image_part(picture.data(m, state));
            if m.with_text {
                events.push(event(vec![image], None));
                events.push(event(vec![json!({"text": IMAGE_TEXT})], Some("STOP")));
            } else {
                events.push(event(vec![image], Some("STOP")));
            }
        }
    }
    let mut events: Vec<Vec<u8>> = events.iter().map(|e| e.to_string().into_bytes()).collect();
    if m.empty {
        events.clear();
    }
    if let Some(last) = events.last_mut() {
        if m.garbage {
            *last = b"<html>this is not json</html>".to_vec();
        } else if m.truncated {
            last.truncate(last.len() / 2);
        }
    }
    let mut end = StreamEnd::Complete;
    if let Some(k) = m.error_after {
        events.truncate(k);
        let error = json!({"error": {"code": 500, "message": "Internal error encountered.", "status": "INTERNAL"}});
        events.push(error.to_string().into_bytes());
        end = StreamEnd::Error;
    }
    if let Some(k) = m.break_after {
        events.truncate(k);
        end = StreamEnd::Broken;
    }
    let plan = SseStream { events, gap_ms: m.chunk_delay_ms, end };
    Response {
        content_type: "text/event-stream".into(),
        stream: Some(std::sync::Arc::new(plan)),
        ..Response::json(200, Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{handle, png, Request};
    use super::*;

    const PRO: &str = "gemini-3-pro-image-preview";

    fn body(prompt: &str, thoughts: bool) -> Value {
        let mut b = json!({"contents": [{"role": "user", "parts": [{"text": prompt}]}],
                           "generationConfig": {"imageConfig": {"aspectRatio": "16:9"}}});
        if thoughts {
            b["generationConfig"]["thinkingConfig"] = json!({"includeThoughts": true});
        }
        b
    }

    fn call(state: &State, path: &str, body: &Value) -> Response {
        let req = Request {
            method: "POST".into(),
            path: path.into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
            keep_alive: true,
            oversize: false,
        };
        handle(&req, state)
    }

    fn stream_path(model: &str) -> String {
        format!("/v1beta/models/{model}:streamGenerateContent?alt=sse")
    }

    /// The stream's events as JSON, and how it ends; panics if the answer is not a stream.
    fn events(r: &Response) -> (Vec<Value>, StreamEnd) {
        assert_eq!(
            (r.status, r.content_type.as_str()),
            (200, "text/event-stream"),
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        let s = r.stream.as_ref().expect("a stream");
        let events = s
            .events
            .iter()
            .map(|e| serde_json::from_slice(e).unwrap_or_else(|err| panic!("{err}: {}", String::from_utf8_lossy(e))))
            .collect();
        (events, s.end)
    }

    fn parts(event: &Value) -> Vec<Value> {
        event["candidates"][0]["content"]["parts"].as_array().cloned().unwrap_or_default()
    }

    fn png_of(part: &Value) -> Vec<u8> {
        let data = part["inlineData"]["data"].as_str().unwrap_or_default();
        base64::engine::general_purpose::STANDARD.decode(data).unwrap_or_default()
    }

    #[test]
    fn thoughts_then_interim_images_then_the_image_generate_content_makes() {
        let state = State::default();
        let b = body("a red fox", true);
        let (ev, end) = events(&call(&state, &stream_path(PRO), &b));
        assert_eq!((ev.len(), end), (4, StreamEnd::Complete));
        assert_eq!(parts(&ev[0]), [json!({"text": THOUGHT_TEXT, "thought": true})]);
        let mut seen = Vec::new();
        for (e, dims) in ev[1..3].iter().zip([(344, 192), (688, 384)]) {
            let p = parts(e);
            assert_eq!(
                (p.len(), &p[0]["thought"], &p[0]["inlineData"]["mimeType"]),
                (1, &json!(true), &json!("image/png"))
            );
            let png = png_of(&p[0]);
            assert_eq!(png::dimensions(&png), Some(dims), "a smaller PNG of the same ratio");
            seen.push(png);
        }
        // Every event before the last has no finishReason and only the prompt's token counts.
        for e in &ev[..3] {
            assert!(e["candidates"][0].get("finishReason").is_none(), "{e}");
            assert!(e["usageMetadata"].get("candidatesTokenCount").is_none(), "{e}");
            assert_eq!((&e["modelVersion"], &e["responseId"]), (&json!(PRO), &json!("fake-response")));
        }
        let last = &ev[3];
        let p = parts(last);
        assert_eq!(p.len(), 1);
        assert!(p[0].get("thought").is_none(), "the final image is no thought");
        assert_eq!(last["candidates"][0]["finishReason"], "STOP");
        let final_png = png_of(&p[0]);
        assert_eq!(png::dimensions(&final_png), Some((1376, 768)));
        assert!(seen.iter().all(|s| *s != final_png) && seen[0] != seen[1], "distinct images");

        // The same image and usage as generateContent for the same request.
        let plain = call(&state, &format!("/v1beta/models/{PRO}:generateContent"), &b);
        let plain: Value = serde_json::from_slice(&plain.body).unwrap_or(Value::Null);
        assert_eq!(plain["candidates"][0]["content"]["parts"][1], p[0]);
        assert_eq!(plain["usageMetadata"], last["usageMetadata"]);
        assert_eq!(last["usageMetadata"]["thoughtsTokenCount"], 120);
    }

    #[test]
    fn without_thoughts_only_the_final_events() {
        let state = State::default();
        let (ev, _) = events(&call(&state, &stream_path(PRO), &body("a cat", false)));
        assert_eq!(ev.len(), 1);
        assert!(parts(&ev[0]).iter().all(|p| p.get("thought").is_none()));
        assert_eq!(ev[0]["candidates"][0]["finishReason"], "STOP");
        // The model's text: the image event, then a last event with the text and STOP.
        let (ev, _) = events(&call(&state, &stream_path(PRO), &body("a cat [fake:withtext]", false)));
        assert_eq!(ev.len(), 2);
        assert!(parts(&ev[0])[0].get("inlineData").is_some());
        assert!(ev[0]["candidates"][0].get("finishReason").is_none());
        assert_eq!(parts(&ev[1]), [json!({"text": IMAGE_TEXT})]);
        assert_eq!(ev[1]["candidates"][0]["finishReason"], "STOP");
        // Gemini 2.5 Flash Image does not think; proto field names are read too.
        let mut b = body("a cat", false);
        b["generation_config"] = json!({"thinking_config": {"include_thoughts": true}});
        b.as_object_mut().map(|o| o.remove("generationConfig"));
        assert_eq!(events(&call(&state, &stream_path("gemini-2.5-flash-image"), &b)).0.len(), 1);
        assert_eq!(events(&call(&state, &stream_path(PRO), &b)).0.len(), 4);
    }

    #[test]
    fn interim_markers_choose_how_many_interim_images() {
        let state = State::default();
        for (marker, n) in
            [("[fake:interim=0]", 2), ("[fake:interim=1]", 3), ("[fake:interim=2]", 4), ("[fake:interim=9]", 4)]
        {
            let (ev, _) = events(&call(&state, &stream_path(PRO), &body(&format!("a cat {marker}"), true)));
            assert_eq!(ev.len(), n, "{marker}");
            let thoughts = ev.iter().flat_map(parts).filter(|p| p["thought"] == true).count();
            assert_eq!(thoughts, n - 1, "{marker}");
        }
        assert_eq!(events(&call(&state, &stream_path(PRO), &body("[fake:interim=2]", false))).0.len(), 1);
    }

    #[test]
    fn block_finish_and_mid_stream_failures() {
        let state = State::default();
        let (ev, end) = events(&call(&state, &stream_path(PRO), &body("x [fake:block=PROHIBITED_CONTENT]", true)));
        assert_eq!((ev.len(), end), (1, StreamEnd::Complete));
        assert_eq!(ev[0]["promptFeedback"]["blockReason"], "PROHIBITED_CONTENT");
        assert!(ev[0].get("candidates").is_none());

        let (ev, _) = events(&call(&state, &stream_path(PRO), &body("x [fake:finish=IMAGE_SAFETY]", true)));
        assert_eq!(ev.len(), 4, "the thinking comes first");
        let last = &ev[3]["candidates"][0];
        assert_eq!(last["finishReason"], "IMAGE_SAFETY");
        assert_eq!(last["content"]["parts"], json!([{"text": REFUSAL_TEXT}]));
        let (ev, _) = events(&call(&state, &stream_path(PRO), &body("x [fake:noimage]", false)));
        assert_eq!((ev.len(), &ev[0]["candidates"][0]["finishReason"]), (1, &json!("STOP")));
        assert!(ev[0].to_string().find("inlineData").is_none());

        let (ev, end) = events(&call(&state, &stream_path(PRO), &body("x [fake:errorafter=1]", true)));
        assert_eq!((ev.len(), end), (2, StreamEnd::Error));
        assert_eq!(ev[0]["candidates"][0]["content"]["parts"][0]["thought"], true);
        assert_eq!(
            ev[1],
            json!({"error": {"code": 500, "message": "Internal error encountered.", "status": "INTERNAL"}})
        );

        let (ev, end) = events(&call(&state, &stream_path(PRO), &body("x [fake:breakafter=2]", true)));
        assert_eq!((ev.len(), end), (2, StreamEnd::Broken));
        let r = call(&state, &stream_path(PRO), &body("x [fake:chunkdelay=25] [fake:delay=7]", true));
        assert_eq!((r.stream.as_ref().map(|s| s.gap_ms), r.delay_ms), (Some(25), 7));

        // Spoiled events: the last is not JSON, cut in half, or there are none.
        let r = call(&state, &stream_path(PRO), &body("x [fake:garbage]", false));
        assert_eq!(r.stream.as_ref().map(|s| s.events.clone()), Some(vec![b"<html>this is not json</html>".to_vec()]));
        let r = call(&state, &stream_path(PRO), &body("x [fake:truncated]", false));
        assert!(r.stream.as_ref().is_some_and(|s| serde_json::from_slice::<Value>(&s.events[0]).is_err()));
        let r = call(&state, &stream_path(PRO), &body("x [fake:empty]", true));
        assert_eq!(r.stream.as_ref().map(|s| (s.events.len(), s.end)), Some((0, StreamEnd::Complete)));
    }

    #[test]
    fn errors_before_the_stream_are_the_usual_json() {
        let state = State::default();
        let json_error = |r: &Response| {
            assert!(r.stream.is_none());
            assert!(r.content_type.starts_with("application/json"));
            let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            (r.status, v["error"]["status"].as_str().unwrap_or_default().to_string())
        };
        let r = call(&state, &stream_path(PRO), &body("x [fake:status=429] [fake:retry=3]", true));
        assert_eq!(json_error(&r), (429, "RESOURCE_EXHAUSTED".into()));
        let r = call(&state, &stream_path(PRO), &body("x [fake:status=503]", true));
        assert_eq!(json_error(&r), (503, "UNAVAILABLE".into()));
        let r = call(&state, &format!("/v1beta/models/{PRO}:streamGenerateContent"), &body("x", true));
        assert_eq!(json_error(&r), (400, "INVALID_ARGUMENT".into()));
        // (Answers are remembered by path, query and body: the same body with ?alt=sse streams.)
        assert_eq!(events(&call(&state, &stream_path(PRO), &body("x", true))).0.len(), 4);
        let r = call(&state, &format!("/v1beta/models/{PRO}:streamGenerateContent?alt=json"), &body("x", true));
        assert_eq!(r.status, 400);
        let mut bad = body("x", true);
        if let Some(p) = bad["contents"][0]["parts"].as_array_mut() {
            p.push(json!({"inlineData": {"mimeType": "image/jpg", "data": "AAAA"}}));
        }
        let r = call(&state, &stream_path(PRO), &bad);
        assert_eq!(json_error(&r), (400, "INVALID_ARGUMENT".into()));
        // ?alt=sse among other parameters.
        let r = call(&state, &format!("/v1beta/models/{PRO}:streamGenerateContent?key=k&alt=sse"), &body("x", false));
        assert_eq!(events(&r).0.len(), 1);
    }

    #[test]
    fn streams_are_counted_and_recorded_by_method() {
        let state = State::default();
        call(&state, &stream_path(PRO), &body("one [fake:breakafter=1]", true));
        call(&state, &stream_path(PRO), &body("two [fake:status=500]", true));
        call(&state, &format!("/v1beta/models/{PRO}:generateContent"), &body("three", true));
        let stats = state.stats.lock().map(|s| s.to_json(&[])).unwrap_or(Value::Null);
        assert_eq!(stats["api_methods"], json!({"generateContent": 1, "streamGenerateContent": 2}));
        assert_eq!(
            stats["api_method_statuses"],
            json!({"generateContent": {"200": 1}, "streamGenerateContent": {"200": 1, "500": 1}})
        );
        let recorded: Vec<Value> =
            state.recorded.lock().map(|r| r.entries.iter().map(|(_, e)| e.clone()).collect()).unwrap_or_default();
        let shown: Vec<_> = recorded.iter().map(|e| (e["api_method"].clone(), e.get("stream").cloned())).collect();
        assert_eq!(
            shown,
            [
                (json!("streamGenerateContent"), Some(json!({"events": 1, "end": "broken"}))),
                (json!("streamGenerateContent"), Some(Value::Null)),
                (json!("generateContent"), None),
            ]
        );
    }

    #[test]
    fn events_are_chunks_and_a_broken_stream_has_no_terminator() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        let mut s =
            SseStream { events: vec![b"{\"a\":1}".to_vec(), b"{}".to_vec()], gap_ms: 0, end: StreamEnd::Complete };
        let mut out = Vec::new();
        assert!(rt.block_on(send(&mut out, &s)).expect("written"));
        assert_eq!(
            String::from_utf8_lossy(&out),
            "11\r\ndata: {\"a\":1}\r\n\r\n\r\nc\r\ndata: {}\r\n\r\n\r\n0\r\n\r\n"
        );
        s.end = StreamEnd::Broken;
        let mut out = Vec::new();
        assert!(!rt.block_on(send(&mut out, &s)).expect("written"));
        assert!(out.ends_with(b"data: {}\r\n\r\n\r\n"));
    }
}
