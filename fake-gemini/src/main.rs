//! fake-gemini: a stand-in for Google's Generative Language API `generateContent`, for local
//! runs, tests and benchmarks. It answers real PNGs whose dimensions follow the requested
//! aspect ratio and image size, records every request it gets (`GET /__fake/requests`), and
//! is steered by markers in the prompt to fail in every way Gemini or the network can
//! (see `behaviour.rs`).
//!
//! Usage: `fake-gemini --listen 127.0.0.1:PORT [--api-key KEY]`

mod behaviour;
mod png;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use behaviour::{dimensions, google_status, parse_markers};

const RECORDED_MAX: usize = 1000;
const HEAD_MAX: usize = 64 * 1024;
const BODY_MAX: usize = 64 * 1024 * 1024;

/// Width, height and palette index of a generated PNG.
type PngKey = (u32, u32, u8);

#[derive(Default)]
struct State {
    api_key: Option<String>,
    recorded: Mutex<VecDeque<Value>>,
    calls_per_prompt: Mutex<HashMap<String, u64>>,
    png_cache: Mutex<HashMap<PngKey, Arc<Vec<u8>>>>,
    /// Whole answers by request body, so that benchmarks measure Envoy and the filter rather
    /// than this fake's base64 and JSON encoding. Only deterministic answers are kept.
    answers: Mutex<VecDeque<(Vec<u8>, Arc<Response>)>>,
}

/// Answers kept in `answers`.
const ANSWERS_KEPT: usize = 16;

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    keep_alive: bool,
}

#[derive(Clone)]
struct Response {
    status: u16,
    content_type: String,
    body: Vec<u8>,
    delay_ms: u64,
    slow_body_ms: u64,
    reset: bool,
}

impl Response {
    fn json(status: u16, v: Value) -> Response {
        Response {
            status,
            content_type: "application/json; charset=UTF-8".into(),
            body: v.to_string().into_bytes(),
            delay_ms: 0,
            slow_body_ms: 0,
            reset: false,
        }
    }
}

fn usage() -> ! {
    eprintln!("usage: fake-gemini --listen HOST:PORT [--api-key KEY]");
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let mut listen = None;
    let mut state = State::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next(),
            "--api-key" => state.api_key = args.next(),
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    let listen = listen.unwrap_or_else(|| "127.0.0.1:8081".to_string());
    let listener = match TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fake-gemini: cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or(listen);
    println!("fake-gemini listening on {addr}");
    let state = Arc::new(state);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let _ = serve(stream, state).await;
        });
    }
}

async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<Request>> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let method = req.method.unwrap_or("").to_string();
                let path = req.path.unwrap_or("").to_string();
                let headers: Vec<(String, String)> = req
                    .headers
                    .iter()
                    .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect();
                let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
                let length: usize = get("content-length").and_then(|v| v.trim().parse().ok()).unwrap_or(0);
                if length > BODY_MAX {
                    return Ok(None);
                }
                let keep_alive = !get("connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
                while buf.len() < head_len + length {
                    let mut chunk = [0u8; 65536];
                    let n = stream.read(&mut chunk).await?;
                    if n == 0 {
                        return Ok(None);
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = buf[head_len..head_len + length].to_vec();
                buf.drain(..head_len + length);
                return Ok(Some(Request { method, path, headers, body, keep_alive }));
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > HEAD_MAX {
                    return Ok(None);
                }
                let mut chunk = [0u8; 65536];
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(None);
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(_) => return Ok(None),
        }
    }
}

async fn serve(mut stream: TcpStream, state: Arc<State>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut stream, &mut buf).await? {
        let resp = handle(&req, &state);
        if resp.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(resp.delay_ms)).await;
        }
        if resp.reset {
            // Close with RST: no answer at all.
            #[allow(deprecated)] // linger 0 is what makes the close an RST; it cannot block
            let _ = stream.set_linger(Some(Duration::from_secs(0)));
            return Ok(());
        }
        let head = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\n{}\r\n",
            resp.status,
            reason(resp.status),
            resp.content_type,
            resp.body.len(),
            if req.keep_alive { "" } else { "connection: close\r\n" }
        );
        stream.write_all(head.as_bytes()).await?;
        if resp.slow_body_ms > 0 {
            let half = resp.body.len() / 2;
            stream.write_all(&resp.body[..half]).await?;
            stream.flush().await?;
            tokio::time::sleep(Duration::from_millis(resp.slow_body_ms)).await;
            stream.write_all(&resp.body[half..]).await?;
        } else {
            stream.write_all(&resp.body).await?;
        }
        if !req.keep_alive {
            return Ok(());
        }
    }
    Ok(())
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn google_error(code: u16, message: &str, details: Value) -> Response {
    Response::json(
        code,
        json!({"error": {"code": code, "message": message, "status": google_status(code), "details": details}}),
    )
}

fn handle(req: &Request, state: &State) -> Response {
    let path = req.path.split('?').next().unwrap_or("");
    match (req.method.as_str(), path) {
        ("GET", "/healthz") => Response::json(200, json!({"ok": true})),
        ("GET", "/__fake/requests") => {
            let recorded = state.recorded.lock().map(|r| r.iter().cloned().collect::<Vec<_>>()).unwrap_or_default();
            Response::json(200, Value::Array(recorded))
        }
        ("DELETE", "/__fake/requests") => {
            if let Ok(mut r) = state.recorded.lock() {
                r.clear();
            }
            Response::json(200, json!({"cleared": true}))
        }
        (_, "/__fake/echo") => {
            // Stands in for "the application" behind Envoy in pass-through tests.
            let headers: serde_json::Map<String, Value> =
                req.headers.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
            Response::json(
                200,
                json!({"method": req.method, "path": req.path, "headers": headers, "body": String::from_utf8_lossy(&req.body)}),
            )
        }
        ("POST", p) if p.starts_with("/v1beta/models/") && p.ends_with(":generateContent") => generate(req, p, state),
        _ => google_error(404, &format!("Method not found: {} {}", req.method, path), json!([])),
    }
}

fn record(req: &Request, state: &State, body: &Value) {
    let headers: serde_json::Map<String, Value> =
        req.headers.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
    let entry = json!({"method": req.method, "path": req.path, "headers": headers, "body": body});
    if let Ok(mut r) = state.recorded.lock() {
        if r.len() >= RECORDED_MAX {
            r.pop_front();
        }
        r.push_back(entry);
    }
}

fn generate(req: &Request, path: &str, state: &State) -> Response {
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => return google_error(400, &format!("Invalid JSON payload received. {e}"), json!([])),
    };
    record(req, state, &body);

    let key = req.headers.iter().find(|(k, _)| k == "x-goog-api-key").map(|(_, v)| v.as_str());
    if let Some(expected) = &state.api_key {
        match key {
            None => return google_error(403, "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.", json!([])),
            Some(k) if k != expected => {
                return google_error(
                    400,
                    "API key not valid. Please pass a valid API key.",
                    json!([{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]),
                )
            }
            _ => {}
        }
    }

    let prompt: String = body["contents"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["parts"].as_array().into_iter().flatten())
        .filter_map(|p| p["text"].as_str())
        .collect::<Vec<_>>()
        .join("\n");
    if prompt.is_empty() {
        return google_error(400, "* GenerateContentRequest.contents: contents is not specified", json!([]));
    }
    let m = parse_markers(&prompt);
    let cacheable = m.fail_first == 0;
    let known = if cacheable {
        state.answers.lock().ok().and_then(|a| a.iter().find(|(k, _)| *k == req.body).map(|(_, r)| r.clone()))
    } else {
        None
    };
    let mut resp = match known {
        Some(r) => r.as_ref().clone(),
        None => {
            let r = respond(&m, &prompt, &body, path, state);
            if cacheable {
                if let Ok(mut a) = state.answers.lock() {
                    if a.len() >= ANSWERS_KEPT {
                        a.pop_front();
                    }
                    a.push_back((req.body.clone(), Arc::new(r.clone())));
                }
            }
            r
        }
    };
    resp.delay_ms = m.delay_ms;
    resp.slow_body_ms = m.slow_body_ms;
    resp.reset = m.reset;
    if let Some(ct) = &m.content_type {
        resp.content_type = ct.clone();
    }
    resp
}

fn respond(m: &behaviour::Markers, prompt: &str, body: &Value, path: &str, state: &State) -> Response {
    if m.fail_first > 0 {
        let n = state
            .calls_per_prompt
            .lock()
            .map(|mut c| {
                let e = c.entry(prompt.to_string()).or_insert(0);
                *e += 1;
                *e
            })
            .unwrap_or(0);
        if n <= m.fail_first {
            return google_error(500, "Internal error encountered.", json!([]));
        }
    }
    if m.key_invalid {
        return google_error(
            400,
            "API key not valid. Please pass a valid API key.",
            json!([{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]),
        );
    }
    if let Some(code) = m.status {
        let details = match (&m.retry_secs, code) {
            (Some(s), 429) => {
                json!([{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": format!("{s}s")}])
            }
            _ => json!([]),
        };
        let message = match code {
            429 => "Resource has been exhausted (e.g. check quota).",
            503 => "The model is overloaded. Please try again later.",
            400 => "Request contains an invalid argument.",
            _ => "Internal error encountered.",
        };
        return google_error(code, message, details);
    }
    let text_resp = |v: Value| Response::json(200, v);
    if m.garbage {
        return Response { body: b"<html>this is not json</html>".to_vec(), ..text_resp(json!(null)) };
    }
    if m.empty {
        return Response { body: Vec::new(), ..text_resp(json!(null)) };
    }
    let usage = json!({"promptTokenCount": prompt.split_whitespace().count() + 3, "candidatesTokenCount": 1290, "thoughtsTokenCount": 120, "totalTokenCount": prompt.split_whitespace().count() + 3 + 1290 + 120});
    if let Some(reason) = &m.block {
        return text_resp(
            json!({"promptFeedback": {"blockReason": reason, "safetyRatings": []}, "usageMetadata": {"promptTokenCount": 5, "totalTokenCount": 5}, "modelVersion": "fake"}),
        );
    }
    if let Some(reason) = &m.finish {
        return text_resp(
            json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "I can't make that image."}]}, "finishReason": reason, "index": 0}], "usageMetadata": usage}),
        );
    }
    if m.no_image {
        return text_resp(
            json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "Here is a description instead of an image."}]}, "finishReason": "STOP", "index": 0}], "usageMetadata": usage}),
        );
    }

    let config = &body["generationConfig"]["imageConfig"];
    let ratio = config["aspectRatio"].as_str().unwrap_or("1:1");
    let size = config["imageSize"].as_str().unwrap_or("1K");
    let (w, h) = dimensions(ratio, size);
    let shade = (prompt.bytes().fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(b as u32)) % 6) as u8;
    let png = cached_png(state, w, h, shade);
    let png: Vec<u8> = match (m.huge, m.bytes) {
        (true, _) => png::pad_to(&png, 26 * 1024 * 1024), // base64: ~34.7 MiB, over 32 MiB
        (false, Some(n)) => png::pad_to(&png, n),
        _ => png.as_ref().clone(),
    };
    let data = if m.bad_base64 {
        "this is *not* base64!".to_string()
    } else {
        base64::engine::general_purpose::STANDARD.encode(&png)
    };
    let mut parts = vec![
        json!({"text": "Planning the composition.", "thought": true}),
        json!({"inlineData": {"mimeType": "image/png", "data": data}, "thoughtSignature": "ZmFrZQ=="}),
    ];
    if m.with_text {
        parts.push(json!({"text": "Here is your image."}));
    }
    let model = path.trim_start_matches("/v1beta/models/").trim_end_matches(":generateContent");
    let answer = json!({
        "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": usage,
        "modelVersion": model,
        "responseId": "fake-response",
    });
    let mut bytes = answer.to_string().into_bytes();
    if m.truncated {
        bytes.truncate(bytes.len() / 2);
    }
    Response { body: bytes, ..Response::json(200, json!(null)) }
}

fn cached_png(state: &State, w: u32, h: u32, shade: u8) -> Arc<Vec<u8>> {
    if let Some(p) = state.png_cache.lock().ok().and_then(|c| c.get(&(w, h, shade)).cloned()) {
        return p;
    }
    let palette = [[230, 57, 70], [69, 123, 157], [42, 157, 143], [233, 196, 106], [244, 162, 97], [131, 56, 236]];
    let png = Arc::new(png::solid(w, h, palette[shade as usize % palette.len()]));
    if let Ok(mut c) = state.png_cache.lock() {
        c.insert((w, h, shade), png.clone());
    }
    png
}
