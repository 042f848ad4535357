//! fake-gemini: a stand-in for Google's Generative Language API `generateContent`, for local
//! runs, tests and benchmarks. It answers real PNGs whose dimensions follow the requested
//! aspect ratio and image size, records every request it gets (`GET /__fake/requests`), and
//! is steered by markers in the prompt to fail in every way Gemini or the network can
//! (see `behaviour.rs`). Requests are checked as strictly as Google checks them, `inlineData`
//! input images included (see `inputs.rs`).
//!
//! It also plays Vertex AI (`/v1/projects/.../publishers/google/models/M:generateContent`,
//! OAuth bearer tokens or API keys) and the GCE metadata server that issues those tokens, and
//! tests steer failures per key, token or path at run time (see `control.rs`).
//!
//! `streamGenerateContent?alt=sse` answers the same requests as server-sent events, thought
//! parts and interim images first when thoughts are asked for (see `stream.rs`).
//!
//! Usage: `fake-gemini --listen 127.0.0.1:PORT [--api-key KEY]... [--bearer TOKEN]...
//! [--token-ttl-s N] [--token-secret S] [--project-id P]`

mod behaviour;
mod control;
mod inputs;
mod png;
mod stream;

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use behaviour::{dimensions, flash_dimensions, google_status, nearest_ratio, parse_markers};
use control::{ApiMethod, Backend, Credentials, MetadataSettings, MetadataStats, Rule, Stats, TokenCheck, Tokens};
use inputs::{Family, Inputs};

/// Requests kept for `GET /__fake/requests`: at most this many, and at most
/// `RECORDED_BYTES_MAX` of request bodies together (edits carry megabytes of images); the
/// oldest go first.
const RECORDED_MAX: usize = 1000;
const RECORDED_BYTES_MAX: usize = 256 * 1024 * 1024;
const HEAD_MAX: usize = 64 * 1024;
/// Google's limit for a request with inline data: 100 MB, base64 included (since January 2026).
const BODY_MAX: usize = 100 * 1024 * 1024;
/// A body over `BODY_MAX` is read and dropped up to this size to answer it; beyond, the
/// connection is closed.
const DRAIN_MAX: usize = 1024 * 1024 * 1024;

/// Width, height and palette index of a generated PNG.
type PngKey = (u32, u32, u8);

#[derive(Default)]
struct State {
    /// `--api-key`, in order (empty: any key, or none, is taken on the Gemini API path).
    api_keys: Vec<String>,
    rules: Mutex<Vec<Rule>>,
    stats: Mutex<Stats>,
    tokens: Mutex<Tokens>,
    metadata: Mutex<MetadataSettings>,
    metadata_stats: Mutex<MetadataStats>,
    recorded: Mutex<Recorded>,
    calls_per_prompt: Mutex<HashMap<String, u64>>,
    png_cache: Mutex<HashMap<PngKey, Arc<Vec<u8>>>>,
    /// Whole answers by request body, so that benchmarks measure Envoy and the filter rather
    /// than this fake's base64 and JSON encoding. Only deterministic answers are kept, by a
    /// hash of the path and body (not the body itself, which may be megabytes of images).
    answers: Mutex<VecDeque<(AnswerKey, Arc<Response>)>>,
}

/// Recorded requests (method, path, headers, JSON body), each with its size, oldest first.
#[derive(Default)]
struct Recorded {
    entries: VecDeque<(usize, Value)>,
    bytes: usize,
}

impl Recorded {
    /// Adds an entry of `size` bytes, first dropping the oldest until at most `max_entries - 1`
    /// and `max_bytes - size` remain (the newest is always kept).
    fn push(&mut self, size: usize, entry: Value, max_entries: usize, max_bytes: usize) {
        while !self.entries.is_empty() && (self.entries.len() >= max_entries || self.bytes + size > max_bytes) {
            if let Some((gone, _)) = self.entries.pop_front() {
                self.bytes -= gone;
            }
        }
        self.bytes += size;
        self.entries.push_back((size, entry));
    }
}

/// A 64-bit hash of the path and body, and the body's length.
type AnswerKey = (u64, usize);

fn answer_key(path: &str, body: &[u8]) -> AnswerKey {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    path.hash(&mut h);
    body.hash(&mut h);
    (h.finish(), body.len())
}

/// Answers kept in `answers`.
const ANSWERS_KEPT: usize = 16;

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    keep_alive: bool,
    /// The body was over `BODY_MAX` (read and dropped; `body` is empty).
    oversize: bool,
}

#[derive(Clone)]
struct Response {
    status: u16,
    content_type: String,
    /// More headers (lower-case names).
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    delay_ms: u64,
    slow_body_ms: u64,
    reset: bool,
    /// A `streamGenerateContent` answer: sent as chunked server-sent events instead of `body`.
    stream: Option<Arc<stream::SseStream>>,
}

impl Response {
    fn json(status: u16, v: Value) -> Response {
        Response {
            status,
            content_type: "application/json; charset=UTF-8".into(),
            headers: Vec::new(),
            body: v.to_string().into_bytes(),
            delay_ms: 0,
            slow_body_ms: 0,
            reset: false,
            stream: None,
        }
    }

    fn text(status: u16, content_type: &str, body: &str) -> Response {
        Response {
            content_type: content_type.into(),
            body: body.as_bytes().to_vec(),
            ..Response::json(status, Value::Null)
        }
    }

    fn header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// A lock that survives a panic elsewhere (the state stays usable for the next request).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn usage() -> ! {
    eprintln!(
        "usage: fake-gemini --listen HOST:PORT [--api-key KEY]... [--bearer TOKEN]... [--token-ttl-s SECONDS] \
         [--token-secret SECRET] [--project-id ID]"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let mut listen = None;
    let mut state = State::default();
    let mut bearers = Vec::new();
    let mut secret = None;
    let mut args = std::env::args().skip(1);
    let value = |args: &mut std::iter::Skip<std::env::Args>| args.next().unwrap_or_else(|| usage());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = Some(value(&mut args)),
            "--api-key" => state.api_keys.push(value(&mut args)),
            "--bearer" => bearers.push(value(&mut args)),
            "--token-secret" => secret = Some(value(&mut args)),
            "--token-ttl-s" => match value(&mut args).parse() {
                Ok(n) => lock(&state.metadata).expires_in = n,
                Err(_) => usage(),
            },
            "--project-id" => lock(&state.metadata).project_id = value(&mut args),
            _ => usage(),
        }
    }
    if let Some(s) = secret {
        *lock(&state.tokens) = Tokens::new(s);
    }
    for b in bearers {
        lock(&state.tokens).add_static(b);
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
                    if length > DRAIN_MAX {
                        return Ok(None);
                    }
                    // Read and drop the body, then answer as Google does and close.
                    let mut left = (head_len + length).saturating_sub(buf.len());
                    buf.clear();
                    let mut chunk = vec![0u8; 65536];
                    while left > 0 {
                        let n = stream.read(&mut chunk).await?;
                        if n == 0 {
                            return Ok(None);
                        }
                        left = left.saturating_sub(n);
                    }
                    return Ok(Some(Request {
                        method,
                        path,
                        headers,
                        body: Vec::new(),
                        keep_alive: false,
                        oversize: true,
                    }));
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
                return Ok(Some(Request { method, path, headers, body, keep_alive, oversize: false }));
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
        let extra: String = resp.headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        let framing = match &resp.stream {
            Some(_) => "transfer-encoding: chunked".to_string(),
            None => format!("content-length: {}", resp.body.len()),
        };
        let head = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: {}\r\n{}\r\n{}{}\r\n",
            resp.status,
            reason(resp.status),
            resp.content_type,
            framing,
            extra,
            if req.keep_alive { "" } else { "connection: close\r\n" }
        );
        stream.write_all(head.as_bytes()).await?;
        if let Some(events) = &resp.stream {
            if !stream::send(&mut stream, events).await? {
                // A broken stream: the connection closes without the terminating chunk.
                let _ = stream.shutdown().await;
                return Ok(());
            }
        } else if resp.slow_body_ms > 0 {
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
        409 => "Conflict",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
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
    let (path, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
    if req.oversize {
        return google_error(400, &format!("Request payload size exceeds the limit: {BODY_MAX} bytes."), json!([]));
    }
    match (req.method.as_str(), path) {
        ("GET", "/healthz") => Response::json(200, json!({"ok": true})),
        ("GET", "/__fake/requests") => {
            // `?contains=TEXT`: only the requests whose body holds TEXT (image data aside).
            let needle = query_param(query, "contains");
            let recorded = state
                .recorded
                .lock()
                .map(|r| {
                    r.entries
                        .iter()
                        .filter(|(_, e)| needle.as_deref().is_none_or(|n| value_contains(&e["body"], n, false)))
                        .map(|(_, e)| e.clone())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            Response::json(200, Value::Array(recorded))
        }
        ("DELETE", "/__fake/requests") => {
            if let Ok(mut r) = state.recorded.lock() {
                *r = Recorded::default();
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
        ("GET", "/__fake/rules") => {
            Response::json(200, Value::Array(lock(&state.rules).iter().map(Rule::to_json).collect()))
        }
        ("PUT" | "POST", "/__fake/rules") => match control::parse_rules(&req.body) {
            Ok(new) => {
                let mut rules = lock(&state.rules);
                if req.method == "PUT" {
                    rules.clear();
                }
                rules.extend(new);
                Response::json(200, json!({"rules": rules.len()}))
            }
            Err(e) => Response::json(400, json!({"error": e})),
        },
        ("DELETE", "/__fake/rules") => {
            lock(&state.rules).clear();
            Response::json(200, json!({"rules": 0}))
        }
        ("GET", "/__fake/stats") => Response::json(200, lock(&state.stats).to_json(&lock(&state.rules))),
        ("DELETE", "/__fake/stats") => {
            *lock(&state.stats) = Stats::default();
            Response::json(200, json!({"cleared": true}))
        }
        ("GET", "/__fake/metadata") => Response::json(200, lock(&state.metadata).to_json()),
        ("PUT", "/__fake/metadata") => {
            let mut m = lock(&state.metadata);
            match m.update(&req.body) {
                Ok(()) => Response::json(200, m.to_json()),
                Err(e) => Response::json(400, json!({"error": e})),
            }
        }
        ("GET", "/__fake/metadata/stats") => Response::json(200, lock(&state.metadata_stats).to_json()),
        ("DELETE", "/__fake/metadata/stats") => {
            *lock(&state.metadata_stats) = MetadataStats::default();
            Response::json(200, json!({"cleared": true}))
        }
        ("PUT", "/__fake/tokens") => match control::parse_token_registration(&req.body, control::now_ms()) {
            Ok((token, expires_at_ms)) => {
                lock(&state.tokens).register(token, expires_at_ms);
                Response::json(200, json!({"registered": true}))
            }
            Err(e) => Response::json(400, json!({"error": e})),
        },
        ("DELETE", "/__fake/tokens") => {
            lock(&state.tokens).revoke(control::now_us());
            Response::json(200, json!({"revoked": true}))
        }
        ("GET", "/computeMetadata/v1/instance/service-accounts/default/token") => metadata_token(req, state),
        ("GET", "/computeMetadata/v1/project/project-id") => {
            lock(&state.metadata_stats).project_id_fetches += 1;
            if !control::metadata_allowed(&req.headers) {
                return metadata_refused(path);
            }
            let project = lock(&state.metadata).project_id.clone();
            Response::text(200, "application/text", &project).header("metadata-flavor", "Google")
        }
        (_, p) if p.starts_with("/computeMetadata/") => {
            Response::text(404, "text/html; charset=UTF-8", "Not Found").header("metadata-flavor", "Google")
        }
        ("POST", p) if control::route(p).is_some() => generate(req, p, state),
        _ => google_error(404, &format!("Method not found: {} {}", req.method, path), json!([])),
    }
}

/// GCE's answer to a metadata request without `Metadata-Flavor: Google` (or with
/// `X-Forwarded-For`).
fn metadata_refused(path: &str) -> Response {
    Response::text(
        403,
        "text/html; charset=UTF-8",
        &format!("Your client does not have permission to get URL {path} from this server. Missing Metadata-Flavor:Google header."),
    )
}

/// `GET /computeMetadata/v1/instance/service-accounts/default/token`: a new access token for
/// each fetch, valid for `expires_in` seconds for Vertex calls to this process (and to any
/// fake-gemini with the same `--token-secret`).
fn metadata_token(req: &Request, state: &State) -> Response {
    lock(&state.metadata_stats).token_fetches += 1;
    if !control::metadata_allowed(&req.headers) {
        lock(&state.metadata_stats).refused += 1;
        return metadata_refused(req.path.split('?').next().unwrap_or(""));
    }
    let (fail, expires_in, delay_ms) = {
        let mut m = lock(&state.metadata);
        let fail = m.fail.filter(|_| m.fail_times != Some(0));
        if fail.is_some() {
            if let Some(n) = m.fail_times {
                m.fail_times = Some(n - 1);
                if n == 1 {
                    m.fail = None;
                    m.fail_times = None;
                }
            }
        }
        (fail, m.expires_in, m.delay_ms)
    };
    let mut resp = match fail {
        Some(code) => {
            lock(&state.metadata_stats).failed += 1;
            Response::text(code, "text/plain; charset=UTF-8", "fake metadata server failure")
        }
        None => {
            let token = lock(&state.tokens).issue(expires_in, control::now_us());
            lock(&state.metadata_stats).tokens_issued += 1;
            Response::json(200, json!({"access_token": token, "expires_in": expires_in, "token_type": "Bearer"}))
        }
    };
    resp.delay_ms = delay_ms;
    resp.header("metadata-flavor", "Google")
}

/// The percent-decoded value of `name` in a query string (`+` is a space).
fn query_param(query: &str, name: &str) -> Option<String> {
    let raw = query.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?;
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Whether any key or string in `v` holds `needle`, not looking into image data.
fn value_contains(v: &Value, needle: &str, in_blob: bool) -> bool {
    match v {
        Value::String(s) => s.contains(needle),
        Value::Array(a) => a.iter().any(|x| value_contains(x, needle, false)),
        Value::Object(o) => o.iter().any(|(k, x)| {
            k.contains(needle)
                || (!(in_blob && k == "data") && value_contains(x, needle, k == "inlineData" || k == "inline_data"))
        }),
        _ => false,
    }
}

/// What a `generateContent` or `streamGenerateContent` call was answered, for the record and
/// the stats.
struct Outcome<'a> {
    backend: Backend,
    method: ApiMethod,
    status: String,
    /// A stream's events and how it ends (`None`: not a stream, or refused before it began).
    stream: Option<&'a stream::SseStream>,
    api_key_label: Option<&'a str>,
    bearer_label: Option<&'a str>,
}

fn record(req: &Request, state: &State, body: &Value, outcome: &Outcome) {
    let headers: serde_json::Map<String, Value> =
        req.headers.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
    let size = req.body.len() + req.path.len() + req.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
    let status = outcome.status.parse::<u16>().map(Value::from).unwrap_or_else(|_| Value::from(outcome.status.clone()));
    let mut entry = json!({"method": req.method, "path": req.path, "headers": headers, "body": body,
                       "backend": outcome.backend.name(), "api_method": outcome.method.name(), "status": status,
                       "api_key_label": outcome.api_key_label, "bearer_label": outcome.bearer_label});
    if outcome.method == ApiMethod::Stream {
        entry["stream"] = outcome.stream.map(stream::SseStream::summary).unwrap_or(Value::Null);
    }
    lock(&state.recorded).push(size, entry, RECORDED_MAX, RECORDED_BYTES_MAX);
}

/// The prompt: every text part of every content, one per line.
fn prompt_of(body: &Value) -> String {
    body["contents"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["parts"].as_array().into_iter().flatten())
        .filter_map(|p| p["text"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A `generateContent` or `streamGenerateContent` call on either backend: the first matching
/// rule, else the credentials, the body and the markers decide. Every call is counted and
/// recorded, whatever its answer.
fn generate(req: &Request, path: &str, state: &State) -> Response {
    let Some((backend, model, method)) = control::route(path) else {
        return google_error(404, &format!("Method not found: {} {}", req.method, path), json!([]));
    };
    let parsed: Result<Value, String> = serde_json::from_slice(&req.body).map_err(|e| e.to_string());
    let prompt = parsed.as_ref().map(prompt_of).unwrap_or_default();
    let creds = Credentials::of(&req.headers);
    let key_index = creds.api_key.as_ref().and_then(|k| state.api_keys.iter().position(|x| x == k));
    let key_label =
        creds.api_key.as_ref().map(|k| key_index.map(|i| i.to_string()).unwrap_or_else(|| control::last4(k)));
    let token = creds.bearer.as_ref().map(|t| lock(&state.tokens).check(t, control::now_us()));
    let facts = control::Facts {
        path,
        backend,
        api_method: method,
        credentials: &creds,
        api_key_index: key_index,
        prompt: &prompt,
    };
    let rule = control::take_rule(&mut lock(&state.rules), &facts);
    let mut resp = match rule.as_ref().and_then(|r| rule_answer(r, backend, method, path, model)) {
        Some(r) => r,
        None => match auth_error(backend, method, &creds, key_index, token.as_ref(), state) {
            Some(r) => r,
            None => match &parsed {
                Err(e) => google_error(400, &format!("Invalid JSON payload received. {e}"), json!([])),
                Ok(body) => answer(req, model, method, body, &prompt, state),
            },
        },
    };
    if let Some(r) = &rule {
        resp.delay_ms += r.delay_ms;
    }
    let outcome = Outcome {
        backend,
        method,
        status: if resp.reset { "reset".into() } else { resp.status.to_string() },
        stream: resp.stream.as_deref().filter(|_| !resp.reset),
        api_key_label: key_label.as_deref(),
        bearer_label: token.as_ref().map(TokenCheck::label),
    };
    lock(&state.stats).count(
        backend,
        method,
        creds.kind(),
        outcome.api_key_label,
        outcome.bearer_label,
        &outcome.status,
    );
    record(req, state, parsed.as_ref().unwrap_or(&Value::Null), &outcome);
    resp
}

fn error_info(reason: &str, backend: Backend, method: ApiMethod) -> Value {
    let (service, method) = match backend {
        Backend::Gemini => (
            "generativelanguage.googleapis.com",
            format!("google.ai.generativelanguage.v1beta.GenerativeService.{}", method.rpc()),
        ),
        Backend::Vertex => {
            ("aiplatform.googleapis.com", format!("google.cloud.aiplatform.v1.PredictionService.{}", method.rpc()))
        }
    };
    json!({"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": "googleapis.com",
           "metadata": {"service": service, "method": method}})
}

const INVALID_CREDENTIALS: &str = "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.";

/// Google's 401 for a bearer token it does not take (`reason`: ACCESS_TOKEN_EXPIRED,
/// ACCESS_TOKEN_TYPE_UNSUPPORTED, CREDENTIALS_MISSING).
fn unauthenticated(backend: Backend, method: ApiMethod, reason: &str) -> Response {
    let message = if reason == "CREDENTIALS_MISSING" {
        "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project."
    } else {
        INVALID_CREDENTIALS
    };
    let challenge = if reason == "CREDENTIALS_MISSING" {
        "Bearer realm=\"https://accounts.google.com/\""
    } else {
        "Bearer realm=\"https://accounts.google.com/\", error=\"invalid_token\""
    };
    google_error(401, message, json!([error_info(reason, backend, method)])).header("www-authenticate", challenge)
}

fn api_key_invalid() -> Response {
    google_error(
        400,
        "API key not valid. Please pass a valid API key.",
        json!([{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]),
    )
}

/// The answer to a call whose credentials are missing or wrong, if they are.
///
/// Gemini API: with `--api-key`, a missing key is a 403 and an unlisted one a 400
/// API_KEY_INVALID (a bearer token is not looked at). Vertex AI: a bearer token must be valid
/// here (else 401); without one, an `x-goog-api-key` is taken as on the Gemini API path; with
/// neither, 401.
fn auth_error(
    backend: Backend,
    method: ApiMethod,
    creds: &Credentials,
    key_index: Option<usize>,
    token: Option<&TokenCheck>,
    state: &State,
) -> Option<Response> {
    let key_refused = !state.api_keys.is_empty() && key_index.is_none();
    match backend {
        Backend::Gemini => match &creds.api_key {
            None if !state.api_keys.is_empty() => Some(google_error(403, "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.", json!([]))),
            Some(_) if key_refused => Some(api_key_invalid()),
            _ => None,
        },
        Backend::Vertex => match (token, &creds.api_key) {
            _ if creds.malformed_authorization => {
                Some(unauthenticated(backend, method, "ACCESS_TOKEN_TYPE_UNSUPPORTED"))
            }
            (Some(TokenCheck::Valid(_)), _) => None,
            (Some(TokenCheck::Expired(_)), _) => Some(unauthenticated(backend, method, "ACCESS_TOKEN_EXPIRED")),
            (Some(TokenCheck::Unknown(_)), _) => {
                Some(unauthenticated(backend, method, "ACCESS_TOKEN_TYPE_UNSUPPORTED"))
            }
            (None, Some(_)) if key_refused => Some(api_key_invalid()),
            (None, Some(_)) => None,
            (None, None) => Some(unauthenticated(backend, method, "CREDENTIALS_MISSING")),
        },
    }
}

/// What a rule answers: a dropped connection, or Google's error for its status (`None`: the
/// rule only delays the call, which is then answered as usual).
fn rule_answer(rule: &Rule, backend: Backend, method: ApiMethod, path: &str, model: &str) -> Option<Response> {
    if rule.reset {
        return Some(Response { reset: true, ..Response::json(200, Value::Null) });
    }
    let code = rule.status?;
    let retry = rule.retry_after_s.map(control::duration_json);
    let (message, mut details) = match (code, backend) {
        (429, Backend::Gemini) => (
            format!(
                "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.\n* Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_paid_tier_requests, limit: 20, model: {model}{}",
                retry.as_ref().map(|r| format!("\nPlease retry in {r}.")).unwrap_or_default()
            ),
            vec![
                json!({"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                    "quotaMetric": "generativelanguage.googleapis.com/generate_content_paid_tier_requests",
                    "quotaId": "GenerateRequestsPerMinutePerProjectPerModel", "quotaValue": "20",
                    "quotaDimensions": {"location": "global", "model": model}}]}),
                json!({"@type": "type.googleapis.com/google.rpc.Help", "links": [{
                    "description": "Learn more about Gemini API quotas", "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]}),
            ],
        ),
        (429, Backend::Vertex) => ("Resource exhausted. Please try again later. Please refer to https://cloud.google.com/vertex-ai/generative-ai/docs/error-code-429 for more details.".to_string(), vec![]),
        (401, _) => (INVALID_CREDENTIALS.to_string(), vec![error_info("ACCESS_TOKEN_EXPIRED", backend, method)]),
        (403, Backend::Gemini) => ("Permission denied: Consumer has been suspended.".to_string(), vec![error_info("CONSUMER_SUSPENDED", backend, method)]),
        (403, Backend::Vertex) => {
            let resource = path.trim_start_matches('/').split_once('/').map(|(_, r)| r).unwrap_or(path);
            let resource = resource.rsplit_once(':').map_or(resource, |(r, _)| r);
            (
                format!("Permission 'aiplatform.endpoints.predict' denied on resource '//aiplatform.googleapis.com/{resource}' (or it may not exist)."),
                vec![error_info("IAM_PERMISSION_DENIED", backend, method)],
            )
        }
        (400, _) => ("Request contains an invalid argument.".to_string(), vec![]),
        (404, _) => ("Requested entity was not found.".to_string(), vec![]),
        (500, _) => ("Internal error encountered.".to_string(), vec![]),
        (503, _) => ("The model is overloaded. Please try again later.".to_string(), vec![]),
        (504, _) => ("Deadline expired before operation could complete.".to_string(), vec![]),
        _ => ("Fake failure.".to_string(), vec![]),
    };
    if let Some(reason) = &rule.reason {
        details.retain(|d| d["@type"] != "type.googleapis.com/google.rpc.ErrorInfo");
        details.insert(0, error_info(reason, backend, method));
    }
    if let Some(r) = &retry {
        details.push(json!({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": r}));
    }
    let mut resp = google_error(code, rule.message.as_deref().unwrap_or(&message), Value::Array(details));
    if code == 401 {
        resp =
            resp.header("www-authenticate", "Bearer realm=\"https://accounts.google.com/\", error=\"invalid_token\"");
    }
    if let (true, Some(s)) = (rule.retry_after_header, rule.retry_after_s) {
        resp = resp.header("retry-after", &(s.ceil() as u64).to_string());
    }
    Some(resp)
}

/// The answer of a call that passed the rules and the credential checks: the body's checks,
/// then the markers.
fn answer(req: &Request, model: &str, method: ApiMethod, body: &Value, prompt: &str, state: &State) -> Response {
    let m = parse_markers(prompt);
    let cacheable = m.fail_first == 0;
    // The query too: a stream without `?alt=sse` is refused, and must not answer for one with it.
    let key = answer_key(&req.path, &req.body);
    let known = if cacheable {
        state.answers.lock().ok().and_then(|a| a.iter().find(|(k, _)| *k == key).map(|(_, r)| r.clone()))
    } else {
        None
    };
    let query = req.path.split_once('?').map_or("", |(_, q)| q);
    let mut resp = match known {
        Some(r) => r.as_ref().clone(),
        None => {
            let r = match inputs::check(body, model) {
                _ if method == ApiMethod::Stream && query_param(query, "alt").as_deref() != Some("sse") => {
                    stream::not_sse()
                }
                Err(e) => google_error(400, &e.message, e.details()),
                Ok(i) if i.text.is_empty() && i.images.is_empty() => {
                    google_error(400, "* GenerateContentRequest.contents: contents is not specified", json!([]))
                }
                Ok(i) => match method {
                    ApiMethod::Generate => respond(&m, prompt, body, model, &i, state),
                    ApiMethod::Stream => stream::respond(&m, prompt, body, model, &i, state),
                },
            };
            if cacheable {
                if let Ok(mut a) = state.answers.lock() {
                    if a.len() >= ANSWERS_KEPT {
                        a.pop_front();
                    }
                    a.push_back((key, Arc::new(r.clone())));
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

/// The errors markers ask for, before anything is made (the same for both methods).
fn marker_error(m: &behaviour::Markers, prompt: &str, state: &State) -> Option<Response> {
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
            return Some(google_error(500, "Internal error encountered.", json!([])));
        }
    }
    if m.key_invalid {
        return Some(google_error(
            400,
            "API key not valid. Please pass a valid API key.",
            json!([{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]),
        ));
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
        return Some(google_error(code, message, details));
    }
    None
}

/// The model's thought summary (a `thought: true` text part).
const THOUGHT_TEXT: &str = "Planning the composition.";
/// The text of a candidate that ends without an image (`[fake:finish=REASON]`).
const REFUSAL_TEXT: &str = "I can't make that image.";
/// The text of a text-only answer (`[fake:noimage]`).
const NO_IMAGE_TEXT: &str = "Here is a description instead of an image.";
/// The model's text next to the image (`[fake:withtext]`).
const IMAGE_TEXT: &str = "Here is your image.";

/// Token counts: `full` is a whole answer's `usageMetadata`; `prompt_only` what the events of
/// a stream before the last one carry (the prompt's counts, as Gemini sends them).
struct Usage {
    full: Value,
    prompt_only: Value,
}

impl Usage {
    fn of(prompt: &str, inputs: &Inputs, family: Family) -> Usage {
        let text_tokens = prompt.split_whitespace().count() as u64 + 3;
        let image_tokens = inputs.images.len() as u64 * family.tokens_per_image();
        let mut details = vec![json!({"modality": "TEXT", "tokenCount": text_tokens})];
        if image_tokens > 0 {
            details.push(json!({"modality": "IMAGE", "tokenCount": image_tokens}));
        }
        let prompt_tokens = text_tokens + image_tokens;
        Usage {
            full: json!({"promptTokenCount": prompt_tokens, "candidatesTokenCount": 1290, "thoughtsTokenCount": 120,
                     "totalTokenCount": prompt_tokens + 1290 + 120, "promptTokensDetails": details}),
            prompt_only: json!({"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens,
                            "promptTokensDetails": details}),
        }
    }
}

/// The answer to a blocked prompt: `promptFeedback.blockReason` and no candidate.
fn blocked(reason: &str) -> Value {
    json!({"promptFeedback": {"blockReason": reason, "safetyRatings": []}, "usageMetadata": {"promptTokenCount": 5, "totalTokenCount": 5}, "modelVersion": "fake"})
}

/// The image a request gets: its dimensions follow the request, its colour the prompt.
struct Picture {
    width: u32,
    height: u32,
    /// Palette index.
    shade: u8,
}

impl Picture {
    /// The ratio asked for; without one, the first input image's (snapped to a supported
    /// ratio), as Gemini keeps the input's ratio; else 1:1.
    fn of(prompt: &str, body: &Value, inputs: &Inputs, family: Family) -> Picture {
        let config =
            inputs::field(inputs::field(body, "generationConfig", "generation_config"), "imageConfig", "image_config");
        let first_input = inputs.images.first().and_then(|i| i.dimensions);
        let ratio = match (inputs::field(config, "aspectRatio", "aspect_ratio").as_str(), first_input) {
            (Some(r), _) => r,
            (None, Some((w, h))) => nearest_ratio(w, h),
            (None, None) => "1:1",
        };
        let (width, height) = match family {
            Family::Pro3 => {
                dimensions(ratio, inputs::field(config, "imageSize", "image_size").as_str().unwrap_or("1K"))
            }
            Family::Flash25 => flash_dimensions(ratio),
        };
        let shade = (prompt.bytes().fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(b as u32)) % 6) as u8;
        Picture { width, height, shade }
    }

    /// The final image's `inlineData.data`, as the markers have it (`bytes`, `huge`, `badb64`).
    fn data(&self, m: &behaviour::Markers, state: &State) -> String {
        let png = cached_png(state, self.width, self.height, self.shade);
        let png: Vec<u8> = match (m.huge, m.bytes) {
            (true, _) => png::pad_to(&png, 26 * 1024 * 1024), // base64: ~34.7 MiB, over 32 MiB
            (false, Some(n)) => png::pad_to(&png, n),
            _ => png.as_ref().clone(),
        };
        if m.bad_base64 {
            "this is *not* base64!".to_string()
        } else {
            base64::engine::general_purpose::STANDARD.encode(&png)
        }
    }
}

/// The final image's part (not a thought; it carries a thought signature, as Gemini 3's do).
fn image_part(data: String) -> Value {
    json!({"inlineData": {"mimeType": "image/png", "data": data}, "thoughtSignature": "ZmFrZQ=="})
}

fn respond(
    m: &behaviour::Markers,
    prompt: &str,
    body: &Value,
    model: &str,
    inputs: &Inputs,
    state: &State,
) -> Response {
    let family = Family::of(model);
    if let Some(r) = marker_error(m, prompt, state) {
        return r;
    }
    let text_resp = |v: Value| Response::json(200, v);
    if m.garbage {
        return Response { body: b"<html>this is not json</html>".to_vec(), ..text_resp(json!(null)) };
    }
    if m.empty {
        return Response { body: Vec::new(), ..text_resp(json!(null)) };
    }
    let usage = Usage::of(prompt, inputs, family).full;
    if let Some(reason) = &m.block {
        return text_resp(blocked(reason));
    }
    if let Some(reason) = &m.finish {
        return text_resp(
            json!({"candidates": [{"content": {"role": "model", "parts": [{"text": REFUSAL_TEXT}]}, "finishReason": reason, "index": 0}], "usageMetadata": usage}),
        );
    }
    if m.no_image {
        return text_resp(
            json!({"candidates": [{"content": {"role": "model", "parts": [{"text": NO_IMAGE_TEXT}]}, "finishReason": "STOP", "index": 0}], "usageMetadata": usage}),
        );
    }
    let data = Picture::of(prompt, body, inputs, family).data(m, state);
    let mut parts = vec![json!({"text": THOUGHT_TEXT, "thought": true}), image_part(data)];
    if m.with_text {
        parts.push(json!({"text": IMAGE_TEXT}));
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use inputs::tests::{jpeg, webp};

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn post(state: &State, model: &str, body: &Value) -> (u16, Value) {
        let req = Request {
            method: "POST".into(),
            path: format!("/v1beta/models/{model}:generateContent"),
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
            keep_alive: true,
            oversize: false,
        };
        let r = handle(&req, state);
        (r.status, serde_json::from_slice(&r.body).unwrap_or(Value::Null))
    }

    /// The generated image's dimensions and the answer's usage.
    fn image_of(answer: &Value) -> ((u32, u32), Value) {
        let part = &answer["candidates"][0]["content"]["parts"][1]["inlineData"];
        let png =
            base64::engine::general_purpose::STANDARD.decode(part["data"].as_str().unwrap_or("")).unwrap_or_default();
        (png::dimensions(&png).unwrap_or((0, 0)), answer["usageMetadata"].clone())
    }

    fn edit(images: &[(&str, Vec<u8>)], config: Value) -> Value {
        let mut parts = vec![json!({"text": "put a hat on it"})];
        parts.extend(images.iter().map(|(m, b)| json!({"inlineData": {"mimeType": m, "data": b64(b)}})));
        json!({"contents": [{"role": "user", "parts": parts}], "generationConfig": {"imageConfig": config}})
    }

    #[test]
    fn an_edit_without_a_ratio_keeps_the_first_inputs() {
        let state = State::default();
        let pro = "gemini-3-pro-image-preview";
        let body = edit(&[("image/jpeg", jpeg(1920, 1080)), ("image/png", png::solid(100, 300, [1, 1, 1]))], json!({}));
        let (status, answer) = post(&state, pro, &body);
        assert_eq!(status, 200, "{answer}");
        let (dims, usage) = image_of(&answer);
        assert_eq!(dims, (1376, 768), "16:9 from the first image");
        assert_eq!(usage["promptTokensDetails"][1], json!({"modality": "IMAGE", "tokenCount": 2240}));
        let body = edit(&[("image/webp", webp(900, 1200))], json!({"imageSize": "2K"}));
        assert_eq!(image_of(&post(&state, pro, &body).1).0, (1792, 2400), "3:4 at 2K");
        // An explicit ratio wins.
        let body = edit(&[("image/jpeg", jpeg(1920, 1080))], json!({"aspectRatio": "1:1"}));
        assert_eq!(image_of(&post(&state, pro, &body).1).0, (1024, 1024));
        // A generation is as before.
        let gen = json!({"contents": [{"role": "user", "parts": [{"text": "a cat"}]}],
                         "generationConfig": {"imageConfig": {"aspectRatio": "21:9", "imageSize": "4K"}}});
        let (dims, usage) = image_of(&post(&state, pro, &gen).1);
        assert_eq!(dims, (6336, 2688));
        assert_eq!(usage["promptTokensDetails"], json!([{"modality": "TEXT", "tokenCount": 5}]));
    }

    #[test]
    fn gemini_2_5_flash_image_makes_1k_and_takes_no_image_size() {
        let state = State::default();
        let flash = "gemini-2.5-flash-image";
        let body = edit(&[("image/jpeg", jpeg(1920, 1080))], json!({}));
        let (status, answer) = post(&state, flash, &body);
        assert_eq!(status, 200, "{answer}");
        assert_eq!(image_of(&answer).0, (1344, 768));
        assert_eq!(answer["modelVersion"], flash);
        let body = edit(&[("image/jpeg", jpeg(1920, 1080))], json!({"aspectRatio": "9:16", "imageSize": "1K"}));
        let (status, answer) = post(&state, flash, &body);
        assert_eq!((status, answer["error"]["status"].as_str()), (400, Some("INVALID_ARGUMENT")));
        // The same body to Gemini 3 Pro Image is fine: answers are remembered per model.
        assert_eq!(post(&state, "gemini-3-pro-image-preview", &body).0, 200);
        let four: Vec<_> = (0..4).map(|_| ("image/png", png::solid(8, 8, [0, 0, 0]))).collect();
        assert_eq!(post(&state, flash, &edit(&four, json!({}))).0, 400);
    }

    #[test]
    fn bad_inputs_are_google_errors_and_requests_are_recorded_whole() {
        let state = State::default();
        let pro = "gemini-3-pro-image-preview";
        let mut body = edit(&[("image/png", png::solid(8, 8, [0, 0, 0]))], json!({}));
        body["contents"][0]["parts"][1]["inlineData"]["data"] = json!("%%%");
        let (status, answer) = post(&state, pro, &body);
        assert_eq!(status, 400);
        assert_eq!(answer["error"]["status"], "INVALID_ARGUMENT");
        assert_eq!(
            answer["error"]["message"],
            "Invalid value at 'contents[0].parts[1].inline_data.data' (TYPE_BYTES), Base64 decoding failed for \"%%%\""
        );
        assert_eq!(
            answer["error"]["details"][0]["fieldViolations"][0]["field"],
            "contents[0].parts[1].inline_data.data"
        );
        let jpg = jpeg(10, 10);
        let body = edit(&[("image/png", jpg.clone())], json!({}));
        assert_eq!(post(&state, pro, &body).0, 400);
        // Both recorded, with the image data as sent.
        let r = state.recorded.lock().map(|r| r.entries.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>()).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1]["body"]["contents"][0]["parts"][1]["inlineData"]["data"], b64(&jpg));
        let empty = json!({"contents": [{"role": "user", "parts": []}]});
        assert!(post(&state, pro, &empty).1["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("contents is not specified"));
    }

    #[test]
    fn recording_keeps_a_bounded_number_and_size() {
        let mut r = Recorded::default();
        for i in 0..10 {
            r.push(100, json!(i), 1000, 350);
        }
        assert_eq!(r.entries.iter().map(|(_, e)| e.as_i64().unwrap_or(-1)).collect::<Vec<_>>(), [7, 8, 9]);
        assert_eq!(r.bytes, 300);
        r.push(1000, json!("big"), 1000, 350);
        assert_eq!((r.entries.len(), r.bytes), (1, 1000), "the newest is kept even alone over the budget");
        for i in 0..5 {
            r.push(1, json!(i), 2, 350);
        }
        assert_eq!(r.entries.len(), 2);
    }

    #[test]
    fn requests_can_be_filtered_by_text_outside_image_data() {
        assert_eq!(query_param("a=1&contains=a%20b+c%zz%4", "contains").as_deref(), Some("a b c%zz%4"));
        assert_eq!(query_param("contains=x", "contain"), None);
        let body = json!({"contents": [{"parts": [{"text": "a cat canary-1"}, {"inlineData": {"mimeType": "image/png", "data": "Y2FuYXJ5LTI"}}]}]});
        assert!(value_contains(&body, "canary-1", false));
        assert!(value_contains(&body, "image/png", false));
        assert!(!value_contains(&body, "Y2FuYXJ5", false), "image data is not searched");
        let state = State::default();
        post(&state, "m", &json!({"contents": [{"parts": [{"text": "first needle-1"}]}]}));
        post(&state, "m", &json!({"contents": [{"parts": [{"text": "second"}]}]}));
        let get = |path: &str| {
            let req = Request {
                method: "GET".into(),
                path: path.into(),
                headers: vec![],
                body: vec![],
                keep_alive: true,
                oversize: false,
            };
            serde_json::from_slice::<Value>(&handle(&req, &state).body).unwrap_or(Value::Null)
        };
        assert_eq!(get("/__fake/requests").as_array().map(Vec::len), Some(2));
        assert_eq!(get("/__fake/requests?contains=needle-1").as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn an_oversize_body_is_googles_payload_error() {
        let state = State::default();
        let req = Request {
            method: "POST".into(),
            path: "/v1beta/models/m:generateContent".into(),
            headers: vec![],
            body: vec![],
            keep_alive: false,
            oversize: true,
        };
        let r = handle(&req, &state);
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        assert_eq!(
            (r.status, v["error"]["message"].as_str()),
            (400, Some("Request payload size exceeds the limit: 104857600 bytes."))
        );
    }
}
