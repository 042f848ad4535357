//! fake-gemini's `streamGenerateContent?alt=sse` over the wire: chunked server-sent events, one
//! per chunk, as they happen; thoughts and interim images first; delays between events;
//! streams that break or end with an error event; JSON errors before a stream; the Vertex AI
//! path and its auth; stats and recorded requests that tell streams from plain calls.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{Fake, FLAVOR, KEYS};
use serde_json::{json, Value};

const STREAM: &str = "/v1beta/models/gemini-3-pro-image-preview:streamGenerateContent?alt=sse";
const VERTEX_STREAM: &str = "/v1/projects/my-project/locations/global/publishers/google/models/gemini-3-pro-image-preview:streamGenerateContent?alt=sse";

/// An answer read as it arrives.
struct Streamed {
    status: u16,
    headers: Vec<(String, String)>,
    /// From the request's last byte to the answer's head.
    head_after: Duration,
    /// Each chunk's data, and when it arrived (from the request's last byte).
    chunks: Vec<(Duration, Vec<u8>)>,
    /// The terminating zero-length chunk arrived.
    terminated: bool,
    /// The body of an answer with a content-length.
    body: Vec<u8>,
}

impl Streamed {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The events, checked as Google frames them: each chunk one `data: <JSON on one line>`
    /// and a blank line (CRLF CRLF); the whole body the same events, nothing else.
    fn events(&self) -> Vec<Value> {
        assert_eq!(self.status, 200, "{}", String::from_utf8_lossy(&self.body));
        assert_eq!(self.header("content-type"), Some("text/event-stream"));
        assert_eq!(self.header("transfer-encoding"), Some("chunked"));
        assert_eq!(self.header("content-length"), None);
        let mut events = Vec::new();
        for (_, chunk) in &self.chunks {
            let text = std::str::from_utf8(chunk).expect("UTF-8");
            let data = text.strip_prefix("data: ").and_then(|t| t.strip_suffix("\r\n\r\n"));
            let data = data.unwrap_or_else(|| panic!("not one event: {text:?}"));
            assert!(!data.contains(['\r', '\n']), "one line: {data:?}");
            events.push(serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}")));
        }
        let whole: Vec<u8> = self.chunks.iter().flat_map(|(_, c)| c.iter().copied()).collect();
        let whole = String::from_utf8_lossy(&whole);
        let split: Vec<&str> = whole.split("\r\n\r\n").collect();
        assert_eq!(split.last(), Some(&""), "the body ends with a blank line");
        assert_eq!(split.len() - 1, events.len(), "blank lines separate the events");
        events
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e})"))
    }
}

/// An HTTP/1.1 connection that reads chunked answers chunk by chunk.
struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: &str) -> Conn {
        let s = TcpStream::connect(addr).expect("connects");
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("a timeout");
        Conn { reader: BufReader::new(s) }
    }

    fn post(&mut self, path: &str, headers: &[(&str, &str)], body: &Value, close: bool) -> Streamed {
        let body = body.to_string();
        let mut head = format!("POST {path} HTTP/1.1\r\nhost: fake\r\ncontent-length: {}\r\n", body.len());
        if close {
            head.push_str("connection: close\r\n");
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let s = self.reader.get_mut();
        s.write_all(head.as_bytes()).expect("sent");
        s.write_all(body.as_bytes()).expect("sent");
        let sent = Instant::now();
        self.read(sent)
    }

    fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim_end_matches("\r\n").to_string()),
        }
    }

    fn read(&mut self, sent: Instant) -> Streamed {
        let status_line = self.line().expect("a status line");
        let status = status_line.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let mut headers = Vec::new();
        while let Some(l) = self.line().filter(|l| !l.is_empty()) {
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let mut s = Streamed {
            status,
            headers,
            head_after: sent.elapsed(),
            chunks: Vec::new(),
            terminated: false,
            body: Vec::new(),
        };
        if let Some(n) = s.header("content-length").and_then(|n| n.parse().ok()) {
            s.body = vec![0; n];
            self.reader.read_exact(&mut s.body).expect("the body");
            return s;
        }
        assert_eq!(s.header("transfer-encoding"), Some("chunked"));
        while let Some(size) = self.line() {
            let size = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
            if size == 0 {
                s.terminated = self.line().as_deref() == Some("");
                break;
            }
            let mut data = vec![0; size + 2];
            if self.reader.read_exact(&mut data).is_err() {
                break;
            }
            assert!(data.ends_with(b"\r\n"), "a chunk ends with CRLF");
            data.truncate(size);
            s.chunks.push((sent.elapsed(), data));
        }
        s
    }

    /// The peer closed the connection: nothing more to read.
    fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        self.reader.read_to_end(&mut rest).is_ok_and(|_| rest.is_empty())
    }
}

fn stream(addr: &str, path: &str, headers: &[(&str, &str)], body: &Value) -> Streamed {
    Conn::open(addr).post(path, headers, body, true)
}

fn body(prompt: &str, thoughts: bool) -> Value {
    let mut b = json!({"contents": [{"role": "user", "parts": [{"text": prompt}]}],
                       "generationConfig": {"imageConfig": {"aspectRatio": "16:9"}}});
    if thoughts {
        b["generationConfig"]["thinkingConfig"] = json!({"includeThoughts": true});
    }
    b
}

fn parts(event: &Value) -> Vec<Value> {
    event["candidates"][0]["content"]["parts"].as_array().cloned().unwrap_or_default()
}

fn png_size(part: &Value) -> (u32, u32) {
    let data = part["inlineData"]["data"].as_str().unwrap_or_default();
    let png = base64::engine::general_purpose::STANDARD.decode(data).unwrap_or_default();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    let be = |i: usize| png.get(i..i + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(0);
    (be(16), be(20))
}

#[test]
fn thoughts_and_interim_images_arrive_one_event_at_a_time_before_the_image() {
    let fake = Fake::start(&[]);
    let mut conn = Conn::open(&fake.addr);
    let s = conn.post(STREAM, &[], &body("a fox [fake:delay=100] [fake:chunkdelay=150]", true), false);
    let events = s.events();
    assert!(s.terminated, "a whole stream ends with the zero-length chunk");
    assert!(s.head_after >= Duration::from_millis(100), "delay: before the first byte ({:?})", s.head_after);
    assert_eq!(events.len(), 4);
    assert_eq!(parts(&events[0]), [json!({"text": "Planning the composition.", "thought": true})]);
    for (e, size) in events[1..3].iter().zip([(344, 192), (688, 384)]) {
        let p = parts(e);
        assert_eq!((p.len(), &p[0]["thought"]), (1, &json!(true)), "{e}");
        assert_eq!(png_size(&p[0]), size, "an interim image, smaller, same ratio");
        assert!(e["candidates"][0].get("finishReason").is_none());
    }
    let last = &events[3];
    assert_eq!(last["candidates"][0]["finishReason"], "STOP");
    let p = parts(last);
    assert!(p[0].get("thought").is_none());
    assert_eq!(png_size(&p[0]), (1376, 768));
    assert_eq!(last["usageMetadata"]["thoughtsTokenCount"], 120);
    // Each event after the first waits the chunk delay: the partial images reach the client
    // well before the final one.
    let at: Vec<Duration> = s.chunks.iter().map(|(t, _)| *t).collect();
    for w in at.windows(2) {
        assert!(w[1] - w[0] >= Duration::from_millis(120), "events too close: {at:?}");
    }
    assert!(at[3] - at[1] >= Duration::from_millis(250), "{at:?}");

    // The connection stays open for the next call: no thoughts asked, one event.
    let s = conn.post(STREAM, &[], &body("a fox", false), true);
    let events = s.events();
    assert_eq!(events.len(), 1);
    assert!(parts(&events[0]).iter().all(|p| p.get("thought").is_none()));
    assert_eq!(events[0]["candidates"][0]["finishReason"], "STOP");
    assert!(conn.closed());

    let s = stream(&fake.addr, STREAM, &[], &body("a fox [fake:interim=1]", true));
    let kinds: Vec<_> = s.events().iter().map(|e| parts(e)[0]["thought"] == true).collect();
    assert_eq!(kinds, [true, true, false]);
    let s = stream(&fake.addr, STREAM, &[], &body("a fox [fake:interim=0] [fake:withtext]", true));
    let events = s.events();
    assert_eq!(events.len(), 3, "thought text, image, then the model's text");
    assert_eq!(parts(&events[2]), [json!({"text": "Here is your image."})]);
}

#[test]
fn streams_break_end_in_an_error_event_or_are_refused_before_they_start() {
    let fake = Fake::start(&[]);
    // Broken: two events, then the connection closes without the terminating chunk.
    let mut conn = Conn::open(&fake.addr);
    let s = conn.post(STREAM, &[], &body("x [fake:breakafter=2]", true), false);
    assert_eq!(s.events().len(), 2);
    assert!(!s.terminated, "no terminating chunk");
    assert!(conn.closed(), "and the connection is closed, though the client asked to keep it");

    let s = stream(&fake.addr, STREAM, &[], &body("x [fake:errorafter=1]", true));
    let events = s.events();
    assert!(s.terminated, "an error event, then a clean end");
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["candidates"][0]["content"]["parts"][0]["thought"], true);
    assert_eq!(
        events[1],
        json!({"error": {"code": 500, "message": "Internal error encountered.", "status": "INTERNAL"}})
    );

    let s = stream(&fake.addr, STREAM, &[], &body("x [fake:block=PROHIBITED_CONTENT]", true));
    let events = s.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["promptFeedback"]["blockReason"], "PROHIBITED_CONTENT");
    let s = stream(&fake.addr, STREAM, &[], &body("x [fake:finish=IMAGE_SAFETY] [fake:interim=0]", true));
    let events = s.events();
    assert_eq!(events.len(), 2);
    assert_eq!(events[1]["candidates"][0]["finishReason"], "IMAGE_SAFETY");
    assert!(!events[1].to_string().contains("inlineData"), "no image");

    // Refused before the stream: the usual JSON error, with a content-length.
    let s = stream(&fake.addr, STREAM, &[], &body("x [fake:status=503] [fake:interim=1]", true));
    assert_eq!((s.status, s.header("content-type")), (503, Some("application/json; charset=UTF-8")));
    assert_eq!((s.header("transfer-encoding"), s.json()["error"]["status"].as_str()), (None, Some("UNAVAILABLE")));
    let s = stream(&fake.addr, STREAM.trim_end_matches("?alt=sse"), &[], &body("x", true));
    assert_eq!((s.status, s.json()["error"]["status"].as_str()), (400, Some("INVALID_ARGUMENT")));

    let recorded = fake.get("/__fake/requests?contains=breakafter");
    assert_eq!(recorded[0]["stream"], json!({"events": 2, "end": "broken"}));
    assert_eq!(recorded[0]["status"], 200);
    assert_eq!(fake.get("/__fake/requests?contains=errorafter")[0]["stream"], json!({"events": 2, "end": "error"}));
}

#[test]
fn vertex_streams_take_its_auth_and_stats_tell_streams_from_plain_calls() {
    let fake = Fake::start(&["--api-key", KEYS[0], "--bearer", "static-token-abcdef"]);
    let key = [("x-goog-api-key", KEYS[0])];
    // Gemini API path: the key is checked as for generateContent.
    assert_eq!(stream(&fake.addr, STREAM, &[], &body("x", false)).status, 403);
    assert_eq!(stream(&fake.addr, STREAM, &key, &body("x", false)).events().len(), 1);

    // Vertex AI: no credentials or an unknown token is a 401 naming the streaming method.
    let s = stream(&fake.addr, VERTEX_STREAM, &[], &body("x", true));
    assert_eq!(s.status, 401);
    assert!(s.header("www-authenticate").is_some_and(|v| v.starts_with("Bearer")));
    let info = &s.json()["error"]["details"][0];
    assert_eq!(info["reason"], "CREDENTIALS_MISSING");
    assert_eq!(info["metadata"]["method"], "google.cloud.aiplatform.v1.PredictionService.StreamGenerateContent");
    let s = stream(&fake.addr, VERTEX_STREAM, &[("authorization", "Bearer made-up-1234")], &body("x", true));
    assert_eq!(s.json()["error"]["details"][0]["reason"], "ACCESS_TOKEN_TYPE_UNSUPPORTED");
    // A metadata token, a --bearer token, a listed key (express mode too) all stream.
    let a = fake.call("GET", "/computeMetadata/v1/instance/service-accounts/default/token", &FLAVOR, b"");
    let token = format!("Bearer {}", a.json()["access_token"].as_str().unwrap_or_default());
    let s = stream(&fake.addr, VERTEX_STREAM, &[("authorization", &token)], &body("a vertex fox", true));
    assert_eq!(s.events().len(), 4);
    let s = stream(&fake.addr, VERTEX_STREAM, &[("authorization", "Bearer static-token-abcdef")], &body("x", false));
    assert_eq!(s.events().len(), 1);
    let express = "/v1/publishers/google/models/gemini-3-pro-image-preview:streamGenerateContent?alt=sse";
    assert_eq!(stream(&fake.addr, express, &key, &body("x", false)).events().len(), 1);

    // A rule for streams only; generateContent is untouched.
    fake.json(
        "PUT",
        "/__fake/rules",
        json!([{"match": {"api_method": "streamGenerateContent"}, "status": 429, "times": 1}]),
    );
    assert_eq!(fake.generate(common::GEMINI, &key, "x").status, 200);
    let s = stream(&fake.addr, STREAM, &key, &body("x", false));
    assert_eq!((s.status, s.json()["error"]["status"].as_str()), (429, Some("RESOURCE_EXHAUSTED")));

    let stats = fake.get("/__fake/stats");
    assert_eq!(stats["api_methods"], json!({"generateContent": 1, "streamGenerateContent": 8}));
    assert_eq!(stats["api_method_statuses"]["streamGenerateContent"], json!({"200": 4, "401": 2, "403": 1, "429": 1}));
    assert_eq!(stats["backends"], json!({"gemini": 4, "vertex": 5}));
    let rec = fake.get("/__fake/requests?contains=vertex%20fox");
    assert_eq!(
        (rec[0]["api_method"].as_str(), rec[0]["backend"].as_str()),
        (Some("streamGenerateContent"), Some("vertex"))
    );
    assert_eq!(rec[0]["bearer_label"], "metadata#1");
    assert_eq!(rec[0]["stream"], json!({"events": 4, "end": "complete"}));
}
