//! The driver over a host made of memory: the same code paths as in Envoy, natively.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use serde_json::{json, Value};

use super::*;
use crate::backends::{Cooldown, KeyRef};
use crate::metrics::{AttemptOutcome, CacheTier};
use crate::test_support::{error_response, ok_response};

pub(super) const NOW_MS: u64 = 1_000_000;
/// The first bytes of a PNG, in base64: what an L2 entry's images must start with.
const PNG: &str = "iVBORw0KGgoAAAANSUhEUgAA";

/// A `Host` in memory: request headers and body to read, call-outs recorded with tokens,
/// one call-out answer "being delivered", shared data in a map, replies, logs and counters kept.
/// A request rewritten for upstream: the headers set, and the body.
pub type Forwarded = (Vec<(String, String)>, Vec<u8>);

#[derive(Default)]
pub struct MemoryHost {
    pub request_headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Every request header read, in order.
    pub header_reads: RefCell<Vec<String>>,
    /// The call-out answer being delivered: headers and body.
    pub call_headers: Vec<(String, String)>,
    pub call_body: Vec<u8>,
    next_token: u32,
    /// Call-outs dispatched and not yet answered.
    pub dispatched: Vec<(u32, HttpCall)>,
    /// Clusters the host refuses to call.
    pub refused_clusters: Vec<String>,
    pub shared: HashMap<String, Vec<u8>>,
    /// Each shared-data key's version, for compare-and-swap.
    pub shared_cas: HashMap<String, u32>,
    /// Shared-data keys the host refuses to write.
    pub refused_shared_keys: Vec<String>,
    pub replies: Vec<Reply>,
    pub logs: Vec<(LogLevel, String)>,
    pub counters: HashMap<Counter, u64>,
    pub observed: Vec<(Histogram, u64)>,
    pub gauges: HashMap<Gauge, u64>,
    /// The clock; tests move it.
    pub now: u64,
    /// Stream properties by path joined with '/': route and dynamic metadata.
    pub properties: HashMap<String, Vec<u8>>,
    pub random_calls: u32,
    /// What the request became when forwarded upstream (headers set, body), and resumes.
    pub forwarded: Vec<Forwarded>,
    pub resumes: u32,
    /// Times a stream asked for the root's tick at once.
    pub root_wakes: u32,
    /// The response as the filter sees and leaves it: headers, and the body pieces it wrote.
    pub response_headers: Vec<(String, String)>,
    pub response_chunk: Vec<u8>,
    pub response_out: Vec<u8>,
    pub response_resets: u32,
    pub refuse_response_body: bool,
    pub refuse_response_headers: bool,
}

impl MemoryHost {
    /// Shared data but the flights' leases (coalescing): what the cache holds.
    pub fn cached(&self) -> Vec<&String> {
        self.shared.keys().filter(|k| !k.starts_with("gemini_image.flight.")).collect()
    }

    /// Makes `response` the answer being delivered; returns (num_headers, body_size) as Envoy
    /// passes them to the callback.
    pub fn deliver(&mut self, response: &CallResponse) -> (usize, usize) {
        self.call_headers.clear();
        match response.status {
            None => {
                self.call_body.clear();
                (0, 0)
            }
            Some(status) => {
                self.call_headers.push((":status".into(), status.to_string()));
                if let Some(ct) = &response.content_type {
                    self.call_headers.push(("content-type".into(), ct.clone()));
                }
                if let Some(s) = response.retry_after_s {
                    self.call_headers.push(("retry-after".into(), s.to_string()));
                }
                self.call_body = response.body.clone();
                (self.call_headers.len(), self.call_body.len())
            }
        }
    }

    pub fn counted(&self, c: &Counter) -> u64 {
        self.counters.get(c).copied().unwrap_or(0)
    }

    /// The JSON log lines (the access log), parsed.
    pub fn log_lines(&self) -> Vec<(LogLevel, Value)> {
        self.logs.iter().filter_map(|(l, m)| Some((*l, serde_json::from_str(m).ok()?))).collect()
    }
}

impl Host for MemoryHost {
    fn random(&mut self, buf: &mut [u8]) -> bool {
        // Distinct per call, which is what tests need of it.
        self.random_calls += 1;
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (self.random_calls as u8).wrapping_mul(31).wrapping_add(i as u8);
        }
        true
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.properties.get(&path.join("/")).cloned()
    }
    fn now_ms(&self) -> u64 {
        if self.now == 0 {
            NOW_MS
        } else {
            self.now
        }
    }
    fn request_header(&self, name: &str) -> Option<String> {
        self.header_reads.borrow_mut().push(name.to_string());
        self.request_headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }
    fn request_body(&self, size: usize) -> Vec<u8> {
        self.body[..size.min(self.body.len())].to_vec()
    }
    fn call_response_header(&self, name: &str) -> Option<String> {
        self.call_headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }
    fn call_response_body(&self, size: usize) -> Vec<u8> {
        self.call_body[..size.min(self.call_body.len())].to_vec()
    }
    fn dispatch(&mut self, call: &HttpCall) -> Result<u32, String> {
        if self.refused_clusters.contains(&call.cluster) {
            return Err(format!("cluster {:?}: BadArgument", call.cluster));
        }
        self.next_token += 1;
        self.dispatched.push((self.next_token, call.clone()));
        Ok(self.next_token)
    }
    fn send_reply(&mut self, reply: &Reply) -> bool {
        self.replies.push(reply.clone());
        true
    }
    fn forward_request(&mut self, set: &[(String, String)], body_len: usize, body: &[u8]) -> bool {
        assert_eq!(body_len, self.body.len(), "the whole buffered body is replaced");
        self.forwarded.push((set.to_vec(), body.to_vec()));
        true
    }
    fn resume_request(&mut self) -> bool {
        self.resumes += 1;
        true
    }
    fn wake_root(&mut self) {
        self.root_wakes += 1;
    }
    fn response_header(&self, name: &str) -> Option<String> {
        self.response_headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }
    fn set_response_header(&mut self, name: &str, value: Option<&str>) -> bool {
        if self.refuse_response_headers {
            return false;
        }
        self.response_headers.retain(|(k, _)| k != name);
        if let Some(v) = value {
            self.response_headers.push((name.to_string(), v.to_string()));
        }
        true
    }
    fn response_body(&self, size: usize) -> Vec<u8> {
        self.response_chunk[..size.min(self.response_chunk.len())].to_vec()
    }
    fn reset_response(&mut self) {
        self.response_resets += 1;
    }
    fn set_response_body(&mut self, len: usize, body: &[u8]) -> bool {
        if self.refuse_response_body {
            return false;
        }
        assert_eq!(len, self.response_chunk.len(), "the whole piece is replaced");
        self.response_out.extend_from_slice(body);
        true
    }
    fn shared_get(&self, key: &str) -> Option<Vec<u8>> {
        self.shared.get(key).cloned()
    }
    fn shared_set(&mut self, key: &str, value: &[u8]) -> bool {
        if self.refused_shared_keys.iter().any(|k| k == key) {
            return false;
        }
        self.shared.insert(key.to_string(), value.to_vec());
        *self.shared_cas.entry(key.to_string()).or_default() += 1;
        true
    }
    fn shared_get_cas(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        (self.shared.get(key).cloned(), self.shared_cas.get(key).copied())
    }
    fn shared_set_cas(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        if cas.is_some() && cas != self.shared_cas.get(key).copied() {
            return false;
        }
        self.shared_set(key, value)
    }
    fn log(&mut self, level: LogLevel, message: &str) {
        self.logs.push((level, message.to_string()));
    }
    fn count(&mut self, counter: &Counter, by: u64) {
        *self.counters.entry(counter.clone()).or_default() += by;
    }
    fn observe(&mut self, histogram: Histogram, value: u64) {
        self.observed.push((histogram, value));
    }
    fn gauge(&mut self, gauge: &Gauge, value: u64) {
        self.gauges.insert(gauge.clone(), value);
    }
}

/// Answers a call-out by what it carries.
type Answer = Box<dyn FnMut(&HttpCall) -> CallResponse>;

/// One worker: a root driver configured with `config`, a memory host, and answers for the
/// Gemini and cache-service clusters.
pub(super) struct Gateway {
    pub(super) root: WorkerDriver,
    pub(super) host: MemoryHost,
    gemini: Box<dyn FnMut() -> CallResponse>,
    l2: Box<dyn FnMut(&HttpCall) -> CallResponse>,
    /// The status the cache service answers writes with.
    l2_put_status: Option<u32>,
    pub(super) gemini_calls: u32,
    pub(super) l2_writes: Vec<HttpCall>,
    /// Answers Gemini calls by what they carry (backend, key), when set; else `gemini`.
    upstream: Option<Answer>,
    /// Every Gemini call made, in order.
    upstream_calls: Vec<HttpCall>,
    /// Answers the metadata server's token calls.
    metadata: Box<dyn FnMut() -> CallResponse>,
    token_fetches: Vec<HttpCall>,
}

pub(super) const CACHED: &str =
    r#"{"cache": {"ttl_seconds": 60, "l1": {"max_entries": 4, "max_entry_bytes": 100000}, "l2": {}}}"#;

fn env(k: &str) -> Option<String> {
    match k {
        "GEMINI_API_KEY" => Some("test-key".to_string()),
        "IMAGE_CACHE_TOKEN" => Some("s3cret".to_string()),
        "K1" | "K2" | "VK" => Some(format!("key-{k}")),
        _ => None,
    }
}

impl Gateway {
    pub(super) fn new(config: &str) -> Gateway {
        let mut host = MemoryHost::default();
        let mut root = WorkerDriver::default();
        root.configure(&mut host, config.as_bytes(), &env).expect("a valid config");
        Gateway {
            root,
            host,
            gemini: Box::new(|| ok_response(PNG)),
            l2: Box::new(|_| CallResponse { status: Some(404), ..Default::default() }),
            l2_put_status: Some(201),
            gemini_calls: 0,
            l2_writes: Vec::new(),
            upstream: None,
            upstream_calls: Vec::new(),
            metadata: Box::new(|| CallResponse {
                status: Some(200),
                content_type: Some("application/json".into()),
                body: br#"{"access_token":"ya29.token-1","expires_in":3599,"token_type":"Bearer"}"#.to_vec(),
                ..Default::default()
            }),
            token_fetches: Vec::new(),
        }
    }

    pub(super) fn worker(&self) -> Rc<RefCell<Worker>> {
        self.root.worker.clone()
    }

    /// Answers every call-out in flight, and those they lead to.
    pub(super) fn answer_calls(&mut self, stream: &mut StreamDriver) {
        loop {
            // As the host glue does: the root's tick sends a flight leader's calls, and looks
            // at a follower's lease.
            if stream.is_parked() {
                stream.on_root_tick(&mut self.host);
            }
            let pending = std::mem::take(&mut self.host.dispatched);
            if pending.is_empty() {
                break;
            }
            for (token, call) in pending {
                let response = if call.cluster == "image_cache" {
                    (self.l2)(&call)
                } else {
                    self.gemini_calls += 1;
                    self.upstream_calls.push(call.clone());
                    match self.upstream.as_mut() {
                        Some(answer) => answer(&call),
                        None => (self.gemini)(),
                    }
                };
                let (headers, size) = self.host.deliver(&response);
                if stream.is_parked() && stream.owns_call(token) {
                    stream.on_root_call_response(&mut self.host, token, headers, size);
                } else {
                    stream.on_call_response(&mut self.host, token, headers, size);
                }
            }
        }
    }

    /// The root's tick: sends queued cache writes and hands them their answers.
    pub(super) fn tick(&mut self) {
        self.root.on_tick(&mut self.host);
        for (token, call) in std::mem::take(&mut self.host.dispatched) {
            let response = if call.cluster == "metadata" {
                self.token_fetches.push(call.clone());
                (self.metadata)()
            } else {
                self.l2_writes.push(call);
                CallResponse { status: self.l2_put_status, ..Default::default() }
            };
            let (headers, size) = self.host.deliver(&response);
            self.root.on_call_response(&mut self.host, token, headers, size);
        }
    }

    /// One request through headers, body, call-outs, the end of the stream and a root tick.
    /// Counters and logs are those of this request alone.
    fn request(&mut self, body: Value, cache_control: Option<&str>) -> Reply {
        self.host.counters.clear();
        self.host.logs.clear();
        self.host.request_headers = post_headers();
        self.host.request_headers.push(("x-request-id".into(), "req-1".into()));
        if let Some(cc) = cache_control {
            self.host.request_headers.push(("cache-control".into(), cc.into()));
        }
        self.host.body = body.to_string().into_bytes();
        let mut stream = self.root.new_stream().expect("configured");
        assert_eq!(stream.on_request_headers(&mut self.host, false), Verdict::Pause);
        let size = self.host.body.len();
        assert_eq!(stream.on_request_body(&mut self.host, size, true), Verdict::Pause);
        self.answer_calls(&mut stream);
        stream.on_log(&mut self.host);
        self.tick();
        assert_eq!(self.host.replies.len(), 1, "exactly one reply");
        assert_eq!(self.host.log_lines().len(), 1, "exactly one log line");
        self.host.replies.pop().expect("a reply")
    }

    /// A stream that has had the headers and the whole of `body`.
    fn send(&mut self, body: &[u8]) -> StreamDriver {
        self.send_with(post_headers(), body)
    }

    /// The same, with these request headers.
    fn send_with(&mut self, headers: Vec<(String, String)>, body: &[u8]) -> StreamDriver {
        self.host.request_headers = headers;
        self.host.body = body.to_vec();
        let mut stream = self.root.new_stream().expect("configured");
        stream.on_request_headers(&mut self.host, false);
        stream.on_request_body(&mut self.host, body.len(), true);
        stream
    }

    fn counted(&self, c: Counter) -> u64 {
        self.host.counted(&c)
    }

    fn log(&self) -> Value {
        self.host.log_lines().pop().expect("a log line").1
    }
}

pub(super) fn post_headers() -> Vec<(String, String)> {
    vec![
        (":path".into(), "/v1/images/generations".into()),
        (":method".into(), "POST".into()),
        ("content-type".into(), "application/json".into()),
    ]
}

pub(super) fn json_of(r: &Reply) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

fn path_of(call: &HttpCall) -> String {
    call.headers.iter().find(|(k, _)| k == ":path").map(|(_, v)| v.clone()).unwrap_or_default()
}

// ---- which requests are ours, and when to pause ----

#[test]
fn other_paths_pass_through_after_two_header_reads() {
    let mut gw = Gateway::new("{}");
    gw.host.request_headers = vec![(":path".into(), "/healthz".into()), (":method".into(), "POST".into())];
    let mut stream = gw.root.new_stream().unwrap();
    assert_eq!(stream.on_request_headers(&mut gw.host, false), Verdict::Continue);
    // The internal route's header (refused from clients), then the path.
    assert_eq!(*gw.host.header_reads.borrow(), vec![UPSTREAM_HEADER.to_string(), ":path".to_string()]);
    assert_eq!(stream.on_request_body(&mut gw.host, 10, true), Verdict::Continue);
    assert_eq!(stream.on_request_trailers(&mut gw.host), Verdict::Continue);
    stream.on_log(&mut gw.host);
    assert!(gw.host.replies.is_empty() && gw.host.log_lines().is_empty(), "no reply, no access log line");
}

#[test]
fn other_methods_on_an_image_path_get_405_from_the_filter() {
    let mut gw = Gateway::new("{}");
    gw.host.logs.clear();
    for method in ["GET", "PUT", "DELETE", "HEAD"] {
        gw.host.request_headers =
            vec![(":path".into(), "/v1/images/generations/".into()), (":method".into(), method.into())];
        let mut stream = gw.root.new_stream().unwrap();
        assert_eq!(stream.on_request_headers(&mut gw.host, true), Verdict::Pause, "{method}");
        let r = gw.host.replies.pop().unwrap();
        assert_eq!((r.status, r.header("allow")), (405, Some("POST")));
        assert_eq!(json_of(&r)["error"]["code"], "IMG_INVALID_REQUEST");
        assert!(gw.host.replies.is_empty(), "one reply");
    }
    let lines = gw.host.log_lines();
    assert_eq!(lines.len(), 4);
    assert_eq!((lines[0].1["status"].as_u64(), lines[0].1["endpoint"].as_str()), (Some(405), Some("generations")));
}

#[test]
fn the_body_is_paused_until_its_end_then_answered() {
    let mut gw = Gateway::new("{}");
    gw.host.request_headers = post_headers();
    gw.host.body = br#"{"prompt": "a cat"}"#.to_vec();
    let size = gw.host.body.len();
    let mut stream = gw.root.new_stream().unwrap();
    // Headers are held (a streamed request is rewritten at the end of its body).
    assert_eq!(stream.on_request_headers(&mut gw.host, false), Verdict::Pause);
    assert_eq!(stream.on_request_body(&mut gw.host, 5, false), Verdict::Pause);
    assert!(gw.host.dispatched.is_empty(), "nothing before the end of the body");
    assert_eq!(stream.on_request_body(&mut gw.host, size, true), Verdict::Pause);
    assert_eq!(gw.host.dispatched.len(), 1);
    gw.answer_calls(&mut stream);
    assert_eq!(gw.host.replies.len(), 1);
    // A body callback after the reply changes nothing.
    assert_eq!(stream.on_request_body(&mut gw.host, 0, true), Verdict::Pause);
    assert_eq!(gw.host.replies.len(), 1);
}

#[test]
fn a_body_that_ends_with_trailers_is_read_whole() {
    let mut gw = Gateway::new("{}");
    gw.host.request_headers = post_headers();
    gw.host.body = br#"{"prompt": "trailers"}"#.to_vec();
    let size = gw.host.body.len();
    let mut stream = gw.root.new_stream().unwrap();
    stream.on_request_headers(&mut gw.host, false);
    assert_eq!(stream.on_request_body(&mut gw.host, size, false), Verdict::Pause);
    assert_eq!(stream.on_request_trailers(&mut gw.host), Verdict::Pause);
    assert_eq!(gw.host.dispatched.len(), 1, "the whole body was read at the trailers");
}

#[test]
fn headers_with_no_body_are_answered_at_once() {
    let mut gw = Gateway::new("{}");
    gw.host.request_headers = post_headers();
    let mut stream = gw.root.new_stream().unwrap();
    assert_eq!(stream.on_request_headers(&mut gw.host, true), Verdict::Pause);
    assert_eq!(gw.host.replies[0].status, 400);
}

#[test]
fn a_declared_body_over_the_limit_is_refused_at_the_headers() {
    let mut gw = Gateway::new(r#"{"limits": {"max_body_bytes": 100}}"#);
    gw.host.request_headers = vec![
        (":path".into(), "/v1/images/generations".into()),
        (":method".into(), "POST".into()),
        ("content-length".into(), "101".into()),
    ];
    let mut stream = gw.root.new_stream().unwrap();
    assert_eq!(stream.on_request_headers(&mut gw.host, false), Verdict::Pause);
    assert_eq!(gw.host.replies[0].status, 413);
    assert_eq!(stream.on_request_body(&mut gw.host, 101, true), Verdict::Pause);
    assert_eq!(gw.host.replies.len(), 1);
}

#[test]
fn a_call_the_host_refuses_is_a_500_whose_reason_stays_in_the_operator_log() {
    let mut gw = Gateway::new("{}");
    gw.host.refused_clusters.push("gemini".into());
    let r = gw.request(json!({"prompt": "p", "n": 2}), None);
    assert_eq!(r.status, 500);
    let body = String::from_utf8_lossy(&r.body).to_string();
    assert!(!body.contains("cluster") && !body.contains("gemini\""), "{body}");
    assert!(gw.host.logs.iter().any(|(l, m)| *l == LogLevel::Error && m.contains("cluster \"gemini\"")));
}

#[test]
fn a_client_that_leaves_is_logged_once_and_late_answers_are_ignored() {
    let mut gw = Gateway::new("{}");
    let mut stream = gw.send(br#"{"prompt": "gone"}"#);
    gw.host.logs.clear();
    stream.on_log(&mut gw.host);
    gw.answer_calls(&mut stream);
    assert!(gw.host.replies.is_empty());
    let lines = gw.host.log_lines();
    assert_eq!(lines.len(), 1);
    assert_eq!((lines[0].0, lines[0].1["outcome"].as_str()), (LogLevel::Warn, Some("client_closed")));
}

// ---- the root: configuration and cache writes ----

#[test]
fn a_refused_configuration_says_why_and_makes_no_streams() {
    let mut host = MemoryHost::default();
    let mut root = WorkerDriver::default();
    assert!(root.configure(&mut host, br#"{"limits": {"max_n": 99}}"#, &env).is_err());
    assert!(host.logs.iter().any(|(l, m)| *l == LogLevel::Error && m.contains("limits.max_n")));
    assert!(root.new_stream().is_none());
    assert_eq!(root.configure(&mut host, b"{}", &env).ok(), Some(None), "no L2: no tick");
    assert_eq!(root.configure(&mut host, CACHED.as_bytes(), &env).ok(), Some(Some(WRITE_TICK_MS)));
}

#[test]
fn a_cache_write_is_ok_only_with_a_2xx() {
    for (status, errors) in [(Some(200), 0), (Some(204), 0), (Some(299), 0), (Some(300), 1), (Some(500), 1), (None, 1)]
    {
        let mut gw = Gateway::new(CACHED);
        gw.l2_put_status = status;
        gw.request(json!({"prompt": format!("write {status:?}")}), None);
        assert_eq!(gw.l2_writes.len(), 1);
        assert_eq!(gw.counted(Counter::CacheL2Errors), errors, "{status:?}");
    }
}

#[test]
fn a_full_write_queue_drops_the_write_and_counts_it() {
    let mut gw = Gateway::new(CACHED);
    let filler = HttpCall { cluster: "image_cache".into(), headers: vec![], body: Rc::new(vec![]), timeout_ms: 1 };
    for _ in 0..MAX_QUEUED_WRITES {
        assert!(gw.worker().borrow_mut().queue_write(filler.clone()));
    }
    let mut stream = gw.send(br#"{"prompt": "one too many"}"#);
    gw.answer_calls(&mut stream);
    assert_eq!(gw.host.counted(&Counter::CacheL2Errors), 1);
    assert_eq!(gw.worker().borrow().queued_writes(), MAX_QUEUED_WRITES);
}

#[test]
fn a_refused_data_write_leaves_the_slot_meta_alone() {
    let mut gw = Gateway::new(r#"{"cache": {"l1": {"max_entries": 1}}}"#);
    gw.host.refused_shared_keys.push("gemini_image.l1.0.data".into());
    gw.request(json!({"prompt": "p"}), None);
    assert!(gw.host.cached().is_empty(), "no meta without its data");
}

#[test]
fn a_refused_l2_lookup_is_a_miss() {
    let mut gw = Gateway::new(CACHED);
    gw.host.refused_clusters.push("image_cache".into());
    let r = gw.request(json!({"prompt": "p"}), None);
    assert_eq!((r.status, r.header("x-image-cache")), (200, Some("miss")));
    assert_eq!(gw.gemini_calls, 1);
}

// ---- the cache, end to end through the driver ----

#[test]
fn a_success_is_stored_then_served_from_l1_in_any_format() {
    let mut gw = Gateway::new(CACHED);
    let r = gw.request(json!({"prompt": "a cat", "n": 2}), None);
    assert_eq!((r.status, r.header("x-image-cache")), (200, Some("miss")));
    assert_eq!(gw.gemini_calls, 2);
    assert_eq!(gw.counted(Counter::CacheMisses), 1);
    assert_eq!(gw.counted(Counter::CacheStores(CacheTier::L1)), 1);
    assert_eq!(gw.counted(Counter::CacheStores(CacheTier::L2)), 1);
    let call = &gw.l2_writes[0];
    let h = |k: &str| call.headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(h(":method").as_deref(), Some("PUT"));
    assert!(h(":path").unwrap().starts_with("/v1/cache/img:gemini-3-pro-image:auto:none:"));
    assert_eq!(h("x-cache-ttl-seconds").as_deref(), Some("60"));
    assert!(!call.body.is_empty());

    let hit = gw.request(json!({"prompt": "a cat", "n": 2, "response_format": "url"}), None);
    assert_eq!((hit.status, hit.header("x-image-cache")), (200, Some("hit-l1")));
    assert_eq!(gw.gemini_calls, 2, "no new Gemini call");
    let v = json_of(&hit);
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][0]["url"], format!("data:image/png;base64,{PNG}"));
    assert_eq!(v["usage"]["total_tokens"], 28);
    assert_eq!(gw.counted(Counter::CacheHits(CacheTier::L1)), 1);
    assert_eq!(hit.header("x-image-prompt-hash"), Some(&crate::hash::prompt_hash("a cat")[..]));
    let log = gw.log();
    assert_eq!((log["cache"].as_str(), log["upstream_status"].clone()), (Some("hit-l1"), Value::Null));
}

#[test]
fn an_l2_hit_is_served_and_fills_l1() {
    let mut first = Gateway::new(CACHED);
    first.request(json!({"prompt": "a fox"}), None);
    let entry = first.l2_writes[0].body.as_ref().clone();

    let mut gw = Gateway::new(CACHED);
    let seen_path = Rc::new(RefCell::new(String::new()));
    let seen = seen_path.clone();
    gw.l2 = Box::new(move |call| {
        *seen.borrow_mut() = path_of(call);
        CallResponse { status: Some(200), body: entry.clone(), ..Default::default() }
    });
    let r = gw.request(json!({"prompt": "a fox"}), None);
    assert_eq!(r.header("x-image-cache"), Some("hit-l2"));
    assert_eq!(gw.gemini_calls, 0);
    assert!(seen_path.borrow().starts_with("/v1/cache/img:"));
    assert_eq!(gw.counted(Counter::CacheStores(CacheTier::L1)), 1, "L2 hit fills L1");
    gw.l2 = Box::new(|_| panic!("L1 should answer now"));
    assert_eq!(gw.request(json!({"prompt": "a fox"}), None).header("x-image-cache"), Some("hit-l1"));
}

#[test]
fn a_failing_or_garbled_l2_only_costs_a_miss() {
    let answers: Vec<CallResponse> = vec![
        CallResponse { status: None, ..Default::default() },
        CallResponse { status: Some(500), body: b"oops".to_vec(), ..Default::default() },
        CallResponse { status: Some(200), body: b"garbage".to_vec(), ..Default::default() },
        CallResponse { status: Some(401), ..Default::default() },
    ];
    for answer in answers {
        let mut gw = Gateway::new(CACHED);
        let a = answer.clone();
        gw.l2 = Box::new(move |_| a.clone());
        let r = gw.request(json!({"prompt": "l2 trouble"}), None);
        assert_eq!((r.status, r.header("x-image-cache")), (200, Some("miss")), "{answer:?}");
        assert_eq!(gw.gemini_calls, 1);
        assert_eq!(gw.counted(Counter::CacheL2Errors), 1);
    }
}

#[test]
fn no_cache_skips_the_lookup_and_no_store_skips_both() {
    let mut gw = Gateway::new(CACHED);
    gw.request(json!({"prompt": "p"}), None);
    let lookups = Rc::new(RefCell::new(0));
    let seen = lookups.clone();
    gw.l2 = Box::new(move |_| {
        *seen.borrow_mut() += 1;
        CallResponse { status: Some(404), ..Default::default() }
    });
    let r = gw.request(json!({"prompt": "p"}), Some("no-cache"));
    assert_eq!(r.header("x-image-cache"), Some("miss"));
    assert_eq!(gw.gemini_calls, 2);
    assert_eq!(*lookups.borrow(), 0, "no L2 lookup");
    assert_eq!(gw.counted(Counter::CacheHits(CacheTier::L1)), 0, "no L1 lookup");
    assert_eq!(gw.counted(Counter::CacheStores(CacheTier::L1)), 1, "no-cache still stores");

    let mut gw = Gateway::new(CACHED);
    let r = gw.request(json!({"prompt": "q"}), Some("no-store"));
    assert_eq!(r.header("x-image-cache"), Some("bypass"));
    assert!(gw.l2_writes.is_empty() && gw.host.cached().is_empty());
    assert_eq!(gw.counted(Counter::CacheBypass), 1);
    let r = gw.request(json!({"prompt": "q"}), None);
    assert_eq!(r.header("x-image-cache"), Some("miss"), "nothing was stored");
}

#[test]
fn partial_results_and_errors_are_never_stored() {
    let mut gw = Gateway::new(CACHED);
    let mut k = 0;
    gw.gemini = Box::new(move || {
        k += 1;
        if k == 1 {
            error_response(500, "INTERNAL")
        } else {
            ok_response(PNG)
        }
    });
    let r = gw.request(json!({"prompt": "p", "n": 2}), None);
    assert_eq!(r.header("x-images-failed"), Some("1"));
    assert!(gw.host.cached().is_empty() && gw.l2_writes.is_empty());
    assert_eq!(gw.log()["outcome"], "partial", "the log says what the metric says");
    gw.gemini = Box::new(|| error_response(429, "RESOURCE_EXHAUSTED"));
    assert_eq!(gw.request(json!({"prompt": "p2"}), None).status, 429);
    assert!(gw.host.cached().is_empty() && gw.l2_writes.is_empty());
}

#[test]
fn entries_over_max_entry_bytes_skip_l1_but_reach_l2() {
    let mut gw = Gateway::new(r#"{"cache": {"l1": {"max_entries": 4, "max_entry_bytes": 10}, "l2": {}}}"#);
    gw.request(json!({"prompt": "p"}), None);
    assert!(gw.host.cached().is_empty());
    assert_eq!(gw.l2_writes.len(), 1);
    assert_eq!(gw.counted(Counter::CacheL1TooLarge), 1);
}

#[test]
fn a_store_over_another_live_entry_counts_an_eviction() {
    let mut gw = Gateway::new(r#"{"cache": {"l1": {"max_entries": 1}}}"#);
    gw.request(json!({"prompt": "first"}), None);
    assert_eq!(gw.counted(Counter::CacheL1Evictions), 0);
    gw.request(json!({"prompt": "second"}), None);
    assert_eq!(gw.counted(Counter::CacheL1Evictions), 1);
    assert_eq!(gw.host.cached().len(), 2, "one slot: meta and data, whatever the traffic");
    assert_eq!(gw.request(json!({"prompt": "second"}), None).header("x-image-cache"), Some("hit-l1"));
}

#[test]
fn the_l2_token_goes_in_authorization() {
    let mut gw = Gateway::new(r#"{"cache": {"l2": {}}}"#);
    gw.l2 = Box::new(|call| {
        assert!(call.headers.contains(&("authorization".to_string(), "Bearer s3cret".to_string())));
        CallResponse { status: Some(404), ..Default::default() }
    });
    gw.request(json!({"prompt": "p"}), None);
    assert!(gw.l2_writes[0].headers.contains(&("authorization".to_string(), "Bearer s3cret".to_string())));
}

#[test]
fn the_hot_set_answers_without_shared_data_and_keeps_formats_apart() {
    let mut gw = Gateway::new(CACHED);
    let miss = gw.request(json!({"prompt": "hot"}), None);
    assert_eq!(gw.worker().borrow().hot.used_bytes(), miss.body.len(), "the miss's answer is kept rendered");
    gw.host.shared.clear();
    let hit = gw.request(json!({"prompt": "hot"}), None);
    assert_eq!(hit.header("x-image-cache"), Some("hit-l1"));
    assert!(Rc::ptr_eq(&hit.body, &miss.body), "the same bytes, not a copy");
    assert_eq!(gw.log()["images"], 1);
    assert_eq!(gw.counted(Counter::CacheHits(CacheTier::L1)), 1);
    // A url request is another answer: not in the hot set, and shared data was cleared.
    let other = gw.request(json!({"prompt": "hot", "response_format": "url"}), None);
    assert_eq!(other.header("x-image-cache"), Some("miss"));
}

#[test]
fn the_n_calls_of_a_request_share_one_body() {
    let mut gw = Gateway::new("{}");
    gw.send(br#"{"prompt": "shared", "n": 3}"#);
    let calls: Vec<&HttpCall> = gw.host.dispatched.iter().map(|(_, c)| c).collect();
    assert_eq!(calls.len(), 3);
    assert!(calls.windows(2).all(|w| Rc::ptr_eq(&w[0].body, &w[1].body)));
}

// ---- what comes back from L2 is untrusted; copies never outlive the TTL ----

/// The cache key a request is stored under, read from its L2 write.
fn stored_key(gw: &Gateway) -> String {
    path_of(&gw.l2_writes[0]).trim_start_matches("/v1/cache/").to_string()
}

/// A gateway whose L2 answers every lookup with `entry(key)`, for the key of `prompt`.
fn gateway_with_l2_entry(config: &str, body: Value, entry: impl Fn(&str) -> Vec<u8> + 'static) -> Gateway {
    let mut probe = Gateway::new(config);
    probe.request(body, None);
    let key = stored_key(&probe);
    let bytes = entry(&key);
    let mut gw = Gateway::new(config);
    gw.l2 = Box::new(move |_| CallResponse { status: Some(200), body: bytes.clone(), ..Default::default() });
    gw
}

fn entry_of(key: &str, created_s: u64, images: &[&[u8]]) -> Vec<u8> {
    let views: Vec<ImageView> =
        images.iter().map(|b| ImageView { mime_type: "image/png", text: None, base64: b }).collect();
    crate::cache::encode_entry(key, created_s, None, &views)
}

use crate::openai::ImageView;

#[test]
fn a_well_formed_l2_entry_with_hostile_images_is_a_miss_and_never_reaches_the_client() {
    let hostile: [&[u8]; 4] = [
        b"iVBORw0KGgo\",\"url\":\"http://evil\"AA",
        b"iVBORw0KGgoAAAAN\\u0041AA",
        b"iVBORw0KGgoAAAANSUhE\x01AA",
        b"QUFBQUFBQUFBQUFB", // base64, but not the PNG it says it is
    ];
    for image in hostile {
        let mut gw = gateway_with_l2_entry(CACHED, json!({"prompt": "poison"}), move |key| {
            entry_of(key, NOW_MS / 1000, &[image])
        });
        let r = gw.request(json!({"prompt": "poison"}), None);
        assert_eq!((r.status, r.header("x-image-cache")), (200, Some("miss")), "{image:?}");
        assert_eq!(gw.gemini_calls, 1, "Gemini answered instead");
        assert_eq!(gw.counted(Counter::CacheL2Rejected), 1);
        let v = json_of(&r);
        assert_eq!(v["data"][0]["b64_json"], PNG, "the answer is Gemini's");
        // Nothing of the entry went into L1 either.
        assert!(!gw.host.shared.values().any(|v| v.windows(image.len()).any(|w| w == image)));
    }
}

#[test]
fn an_l2_entry_with_the_wrong_number_of_images_is_a_miss() {
    let png = PNG.as_bytes();
    let mut gw = gateway_with_l2_entry(CACHED, json!({"prompt": "count", "n": 2}), move |key| {
        entry_of(key, NOW_MS / 1000, &[png])
    });
    let r = gw.request(json!({"prompt": "count", "n": 2}), None);
    assert_eq!(r.header("x-image-cache"), Some("miss"));
    assert_eq!(gw.counted(Counter::CacheL2Rejected), 1);
}

#[test]
fn an_entry_never_outlives_its_ttl_whichever_tier_or_copy() {
    let png = PNG.as_bytes();
    let now_s = NOW_MS / 1000;
    // CACHED has ttl_seconds 60. Made 61 s ago: expired, a miss.
    let mut gw = gateway_with_l2_entry(CACHED, json!({"prompt": "old"}), move |key| entry_of(key, now_s - 61, &[png]));
    assert_eq!(gw.request(json!({"prompt": "old"}), None).header("x-image-cache"), Some("miss"));
    assert_eq!(gw.counted(Counter::CacheL2Rejected), 1);

    // Made 50 s ago: served, and every copy expires 10 s from now, not 60.
    let mut gw =
        gateway_with_l2_entry(CACHED, json!({"prompt": "aging"}), move |key| entry_of(key, now_s - 50, &[png]));
    let hit = gw.request(json!({"prompt": "aging"}), None);
    assert_eq!(hit.header("x-image-cache"), Some("hit-l2"));
    let meta = gw.host.shared.iter().find(|(k, _)| k.ends_with(".meta")).map(|(_, v)| v.clone()).expect("L1 filled");
    assert_eq!(u64::from_be_bytes(meta[..8].try_into().unwrap()), now_s + 10, "L1 keeps the entry's own expiry");
    let key = stored_key(&Gateway::new(CACHED).tap_request(json!({"prompt": "aging"})));
    let worker = gw.worker();
    let mut w = worker.borrow_mut();
    assert!(w.hot.get(&key, crate::request::ResponseFormat::B64Json, now_s + 9).is_some());
    assert!(w.hot.get(&key, crate::request::ResponseFormat::B64Json, now_s + 10).is_none(), "nor the hot set");
}

impl Gateway {
    /// Runs one request and hands the gateway back (for chaining in a test).
    fn tap_request(mut self, body: Value) -> Gateway {
        self.request(body, None);
        self
    }
}

#[test]
fn the_hot_set_obeys_max_entry_bytes() {
    let big = "iVBORw0KGgo".to_string() + &"A".repeat(2000 - 11) + "=";
    let big = big[..2000].to_string();
    let mut gw = Gateway::new(r#"{"cache": {"l1": {"max_entries": 4, "max_entry_bytes": 1000}}}"#);
    let answer = big.clone();
    gw.gemini = Box::new(move || ok_response(&answer));
    assert_eq!(gw.request(json!({"prompt": "big"}), None).header("x-image-cache"), Some("miss"));
    assert_eq!(gw.request(json!({"prompt": "big"}), None).header("x-image-cache"), Some("miss"));
    assert_eq!(gw.worker().borrow().hot.used_bytes(), 0);
    assert_eq!(gw.gemini_calls, 2);
}

// ---- bounded memory per worker ----

#[test]
fn past_max_inflight_requests_a_request_gets_503_before_any_gemini_call() {
    let mut gw = Gateway::new(r#"{"limits": {"max_inflight_requests": 1}}"#);
    let mut first = gw.send(br#"{"prompt": "first"}"#);
    assert_eq!(gw.host.dispatched.len(), 1);
    let mut second = gw.send(br#"{"prompt": "second"}"#);
    assert_eq!(gw.host.dispatched.len(), 1, "no call for the second");
    let r = gw.host.replies.pop().expect("the second is refused at once");
    assert_eq!((r.status, r.header("retry-after")), (503, Some("1")));
    assert_eq!(json_of(&r)["error"]["code"], "IMG_OVERLOADED");
    assert_eq!(gw.host.counted(&Counter::Errors(crate::error::ErrorCode::Overloaded)), 1);
    second.on_log(&mut gw.host);
    gw.answer_calls(&mut first);
    assert_eq!(gw.host.replies.pop().map(|r| r.status), Some(200));
    assert_eq!(gw.worker().borrow().budget.requests, 0, "the first gave its place back");
    gw.send(br#"{"prompt": "third"}"#);
    assert_eq!(gw.host.dispatched.len(), 1, "the third is admitted");
}

#[test]
fn past_max_inflight_bytes_a_request_is_refused_but_one_alone_is_served() {
    // n=4 at 1K reserves 4 x 4 MiB: over a 8 MiB bound, but a worker holding nothing admits it.
    let mut gw = Gateway::new(r#"{"limits": {"max_inflight_bytes": 8388608}}"#);
    let mut big = gw.send(br#"{"prompt": "alone", "n": 4}"#);
    assert_eq!(gw.host.dispatched.len(), 4);
    gw.send(br#"{"prompt": "small"}"#);
    assert_eq!(gw.host.replies.pop().map(|r| r.status), Some(503));
    gw.answer_calls(&mut big);
    assert_eq!(gw.host.replies.pop().map(|r| r.status), Some(200));
    assert_eq!(gw.worker().borrow().budget, Budget { max_requests: 64, max_bytes: 8_388_608, requests: 0, bytes: 0 });
}

#[test]
// Node 20's WASI runner crashes (SIGSEGV, after every test has passed) once this test has grown
// the wasm memory with its two 6 MiB answers; each half alone runs. Natively it runs always.
#[cfg_attr(target_arch = "wasm32", ignore = "crashes Node 20's WASI at exit; runs natively")]
fn an_answer_larger_than_the_room_left_is_not_copied_into_the_vm() {
    // 4 MiB reserved per 1K call; the bound leaves 1 MiB more. A 6 MiB answer does not fit.
    let mut gw = Gateway::new(r#"{"limits": {"max_inflight_bytes": 5242880}}"#);
    let mut stream = gw.send(br#"{"prompt": "huge answer"}"#);
    let (token, _) = gw.host.dispatched.pop().unwrap();
    let mut huge = ok_response(PNG);
    huge.body.resize(6 * 1024 * 1024, b' ');
    let (headers, size) = gw.host.deliver(&huge);
    gw.host.call_body.clear(); // a read would now find nothing: the driver must not read at all
    stream.on_call_response(&mut gw.host, token, headers, size);
    let r = gw.host.replies.pop().unwrap();
    assert_eq!((r.status, json_of(&r)["error"]["code"].as_str()), (503, Some("IMG_OVERLOADED")));
    assert_eq!(gw.worker().borrow().budget.bytes, 0);

    // With room for it, the same answer is read and served.
    let mut gw = Gateway::new(r#"{"limits": {"max_inflight_bytes": 16777216}}"#);
    let mut stream = gw.send(br#"{"prompt": "huge answer"}"#);
    let (token, _) = gw.host.dispatched.pop().unwrap();
    let (headers, size) = gw.host.deliver(&huge);
    stream.on_call_response(&mut gw.host, token, headers, size);
    assert_eq!(gw.host.replies.pop().map(|r| r.status), Some(200));
}

#[test]
fn a_stream_that_vanishes_gives_its_budget_back() {
    let mut gw = Gateway::new(r#"{"limits": {"max_inflight_requests": 1}}"#);
    let left = gw.send(br#"{"prompt": "left"}"#);
    assert_eq!(gw.worker().borrow().budget.requests, 1);
    drop(left); // no on_log: a VM torn down mid-request
    assert_eq!(gw.worker().borrow().budget, Budget { max_requests: 1, max_bytes: 268_435_456, requests: 0, bytes: 0 });
    let mut abandoned = gw.send(br#"{"prompt": "abandoned"}"#);
    abandoned.on_log(&mut gw.host);
    assert_eq!(gw.worker().borrow().budget.requests, 0);
}

// ---- backends, keys, cool-downs and retries ----

pub(super) const TWO_KEYS_AND_VERTEX: &str = r#"{"backends": [
    {"name": "studio", "kind": "gemini", "cluster": "gemini", "api_key_envs": ["K1", "K2"]},
    {"name": "vertex", "kind": "vertex", "cluster": "vertex", "project": "proj", "location": "us-central1",
     "auth": {"api_key_env": "VK"}}],
  "retry": {"max_attempts": 3, "cooldown_ms": 60000}}"#;

fn header<'a>(call: &'a HttpCall, name: &str) -> Option<&'a str> {
    call.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn quota(retry_after_s: Option<u64>) -> CallResponse {
    CallResponse { retry_after_s, ..error_response(429, "RESOURCE_EXHAUSTED") }
}

/// Answers each call by its key: `bad` keys get `failure`, the others an image.
fn by_key(bad: &'static [&'static str], failure: CallResponse) -> Answer {
    Box::new(move |call| {
        let key = header(call, "x-goog-api-key").unwrap_or("");
        if bad.contains(&key) {
            failure.clone()
        } else {
            ok_response(PNG)
        }
    })
}

#[test]
fn the_one_default_backend_sends_what_it_always_sent_and_never_retries() {
    let mut gw = Gateway::new("{}");
    gw.upstream = Some(Box::new(|_| quota(Some(9))));
    let r = gw.request(json!({"prompt": "p", "n": 2}), None);
    assert_eq!((r.status, r.header("retry-after")), (429, Some("9")));
    assert_eq!(gw.upstream_calls.len(), 2, "one attempt per call");
    let call = &gw.upstream_calls[0];
    assert_eq!(call.cluster, "gemini");
    assert_eq!(header(call, ":path"), Some("/v1beta/models/gemini-3-pro-image-preview:generateContent"));
    assert_eq!(header(call, ":authority"), Some("generativelanguage.googleapis.com"));
    assert_eq!(header(call, "x-goog-api-key"), Some("test-key"));
    assert_eq!(header(call, "authorization"), None);
    assert_eq!(call.timeout_ms, 180_000);
    assert!(gw.host.shared.keys().all(|k| !k.contains("cooldown")), "nothing cools down");
}

#[test]
fn keys_take_turns_across_requests() {
    let mut gw = Gateway::new(TWO_KEYS_AND_VERTEX);
    for _ in 0..4 {
        assert_eq!(gw.request(json!({"prompt": "p"}), Some("no-store")).status, 200);
    }
    let keys: Vec<_> = gw.upstream_calls.iter().map(|c| header(c, "x-goog-api-key").unwrap().to_string()).collect();
    assert_eq!(keys, ["key-K1", "key-K2", "key-K1", "key-K2"]);
    assert_eq!(gw.log()["backend"], "studio");
}

#[test]
fn a_429_cools_its_key_for_retry_after_and_the_call_goes_on_at_once_on_the_next() {
    let mut gw = Gateway::new(TWO_KEYS_AND_VERTEX);
    gw.upstream = Some(by_key(&["key-K1"], quota(Some(7))));
    let r = gw.request(json!({"prompt": "p"}), Some("no-store"));
    assert_eq!(r.status, 200);
    let keys: Vec<_> = gw.upstream_calls.iter().map(|c| header(c, "x-goog-api-key").unwrap()).collect();
    assert_eq!(keys, ["key-K1", "key-K2"]);
    assert_eq!((gw.log()["attempts"].as_u64(), gw.log()["backend"].as_str()), (Some(2), Some("studio")));
    let cooled = Cooldown::decode(
        &gw.host.shared[&backends::cooldown_key(&gw.root.settings().unwrap().backends, KeyRef { backend: 0, key: 0 })],
    )
    .unwrap();
    assert_eq!(cooled.until_ms, NOW_MS + 7_000);
    assert_eq!(gw.counted(Counter::KeyCooldowns("studio".into(), 0)), 1);
    assert_eq!(gw.counted(Counter::UpstreamAttempts("studio".into(), 0, AttemptOutcome::Quota)), 1);
    // While K1 cools, every call goes to K2; once it is back, turns resume.
    gw.upstream_calls.clear();
    gw.upstream = None;
    gw.request(json!({"prompt": "p1"}), Some("no-store"));
    gw.request(json!({"prompt": "p2"}), Some("no-store"));
    assert!(gw.upstream_calls.iter().all(|c| header(c, "x-goog-api-key") == Some("key-K2")));
    gw.host.now = NOW_MS + 7_001;
    gw.upstream_calls.clear();
    gw.request(json!({"prompt": "p3"}), Some("no-store"));
    gw.request(json!({"prompt": "p4"}), Some("no-store"));
    assert!(gw.upstream_calls.iter().any(|c| header(c, "x-goog-api-key") == Some("key-K1")));
}

#[test]
fn every_key_out_of_quota_answers_429_until_the_first_is_back() {
    let config = r#"{"backends": [{"name": "studio", "kind": "gemini", "cluster": "gemini", "api_key_envs": ["K1", "K2"]}],
                     "retry": {"max_attempts": 5, "cooldown_ms": 60000}}"#;
    let mut gw = Gateway::new(config);
    let mut delays = vec![Some(30), Some(12)].into_iter();
    gw.upstream = Some(Box::new(move |_| quota(delays.next().flatten())));
    let r = gw.request(json!({"prompt": "p"}), Some("no-store"));
    assert_eq!((r.status, r.header("retry-after")), (429, Some("12")));
    assert_eq!(json_of(&r)["error"]["code"], "IMG_QUOTA_EXHAUSTED");
    assert_eq!(gw.upstream_calls.len(), 2, "each key once, then none left");
    // A new request finds both cooling and makes no call at all.
    gw.upstream_calls.clear();
    gw.host.now = NOW_MS + 2_000;
    let r = gw.request(json!({"prompt": "again"}), Some("no-store"));
    assert_eq!((r.status, r.header("retry-after")), (429, Some("10")));
    assert!(gw.upstream_calls.is_empty());
}

#[test]
fn a_refused_key_cools_five_times_longer_and_all_refused_is_502() {
    let mut gw = Gateway::new(TWO_KEYS_AND_VERTEX);
    gw.upstream = Some(by_key(&["key-K1"], error_response(403, "PERMISSION_DENIED")));
    assert_eq!(gw.request(json!({"prompt": "p"}), Some("no-store")).status, 200);
    let cooled = Cooldown::decode(
        &gw.host.shared[&backends::cooldown_key(&gw.root.settings().unwrap().backends, KeyRef { backend: 0, key: 0 })],
    )
    .unwrap();
    assert_eq!((cooled.until_ms, cooled.reason), (NOW_MS + 300_000, backends::CoolReason::Auth));
    let mut gw = Gateway::new(TWO_KEYS_AND_VERTEX);
    gw.upstream = Some(Box::new(|_| error_response(401, "UNAUTHENTICATED")));
    let r = gw.request(json!({"prompt": "p"}), Some("no-store"));
    assert_eq!((r.status, json_of(&r)["error"]["code"].as_str()), (502, Some("IMG_UPSTREAM_AUTH")));
    assert_eq!(gw.upstream_calls.len(), 3, "max_attempts");
}

#[test]
fn a_5xx_moves_to_the_next_backend_on_its_own_path() {
    let mut gw = Gateway::new(TWO_KEYS_AND_VERTEX);
    gw.upstream =
        Some(Box::new(
            |call| {
                if call.cluster == "gemini" {
                    error_response(503, "UNAVAILABLE")
                } else {
                    ok_response(PNG)
                }
            },
        ));
    assert_eq!(gw.request(json!({"prompt": "p"}), Some("no-store")).status, 200);
    let last = gw.upstream_calls.last().unwrap();
    assert_eq!(last.cluster, "vertex");
    assert_eq!(
        header(last, ":path"),
        Some("/v1/projects/proj/locations/us-central1/publishers/google/models/gemini-3-pro-image-preview:generateContent")
    );
    assert_eq!(header(last, ":authority"), Some("us-central1-aiplatform.googleapis.com"));
    assert_eq!(header(last, "x-goog-api-key"), Some("key-VK"));
    assert_eq!(gw.upstream_calls.len(), 2, "a 5xx does not try the backend's other key");
    assert!(gw.host.shared.keys().all(|k| !k.contains("cooldown")), "and cools nothing");
    assert_eq!(gw.log()["backend"], "vertex");
}

#[test]
fn blocks_and_400s_are_never_retried() {
    for answer in [
        CallResponse {
            status: Some(200),
            body: br#"{"promptFeedback":{"blockReason":"SAFETY"}}"#.to_vec(),
            ..Default::default()
        },
        error_response(400, "INVALID_ARGUMENT"),
    ] {
        let mut gw = Gateway::new(TWO_KEYS_AND_VERTEX);
        let a = answer.clone();
        gw.upstream = Some(Box::new(move |_| a.clone()));
        assert_eq!(gw.request(json!({"prompt": "p"}), Some("no-store")).status, 400);
        assert_eq!(gw.upstream_calls.len(), 1);
    }
}

#[test]
fn max_attempts_and_the_deadline_hold() {
    let config = r#"{"backends": [
        {"name": "a", "kind": "gemini", "cluster": "c1", "api_key_envs": ["K1"]},
        {"name": "b", "kind": "gemini", "cluster": "c2", "api_key_envs": ["K2"]},
        {"name": "c", "kind": "gemini", "cluster": "c3", "api_key_envs": ["VK"]}],
      "retry": {"max_attempts": 2}}"#;
    let mut gw = Gateway::new(config);
    gw.upstream = Some(Box::new(|_| error_response(500, "INTERNAL")));
    let r = gw.request(json!({"prompt": "p"}), Some("no-store"));
    assert_eq!((r.status, gw.upstream_calls.len()), (502, 2));
    // A retry starts only with time left before timeout_ms from the start of the request.
    let mut gw = Gateway::new(&config.replace("\"retry\"", "\"gemini\": {\"timeout_ms\": 1000}, \"retry\""));
    let clock = Rc::new(std::cell::Cell::new(NOW_MS));
    let c = clock.clone();
    gw.upstream = Some(Box::new(move |_| {
        c.set(c.get() + 900);
        CallResponse { elapsed_ms: 900, timeout_ms: 1000, ..error_response(503, "UNAVAILABLE") }
    }));
    let mut stream = gw.send(br#"{"prompt": "slow"}"#);
    while let Some((token, call)) = gw.host.dispatched.pop() {
        gw.upstream_calls.push(call.clone());
        let response = (gw.upstream.as_mut().unwrap())(&call);
        gw.host.now = clock.get();
        let (h, n) = gw.host.deliver(&response);
        stream.on_call_response(&mut gw.host, token, h, n);
    }
    assert_eq!(gw.upstream_calls.len(), 1, "900 ms gone of 1000: no second attempt");
    assert_eq!(gw.host.replies[0].status, 503);
}

#[test]
fn a_vertex_token_is_fetched_by_the_root_shared_and_refreshed() {
    let config = r#"{"backends": [{"name": "vx", "kind": "vertex", "cluster": "vertex", "project": "p", "location": "global",
                      "auth": {"metadata": {"cluster": "metadata"}}}]}"#;
    let mut gw = Gateway::new(config);
    // The fetch lease exists from configure on, so that taking it is always a compare-and-swap
    // (on a key that does not exist, Envoy writes whatever the version: two workers fetched).
    assert!(gw.host.shared_cas.keys().any(|k| k.ends_with(".lease")), "{:?}", gw.host.shared.keys());
    // No token yet: 502, and no call to Google.
    let r = gw.request(json!({"prompt": "p"}), Some("no-store"));
    assert_eq!((r.status, json_of(&r)["error"]["code"].as_str()), (502, Some("IMG_UPSTREAM_AUTH")));
    assert_eq!(gw.upstream_calls.len(), 0);
    let fetch = gw.token_fetches.first().expect("the tick fetched a token").clone();
    assert_eq!(header(&fetch, ":path"), Some(backends::METADATA_TOKEN_PATH));
    assert_eq!(header(&fetch, "metadata-flavor"), Some("Google"));
    assert_eq!(header(&fetch, ":authority"), Some("metadata.google.internal"));
    // Now calls carry it, on Vertex's global host.
    assert_eq!(gw.request(json!({"prompt": "p2"}), Some("no-store")).status, 200);
    let call = gw.upstream_calls.last().unwrap();
    assert_eq!(header(call, "authorization"), Some("Bearer ya29.token-1"));
    assert_eq!(header(call, ":authority"), Some("aiplatform.googleapis.com"));
    assert_eq!(gw.token_fetches.len(), 1, "fetched once, not per request or tick");
    // Refreshed before it expires (within its last five minutes).
    gw.host.now = NOW_MS + 3_599_000 - 200_000;
    gw.metadata = Box::new(|| CallResponse {
        status: Some(200),
        body: br#"{"access_token":"ya29.token-2","expires_in":3599,"token_type":"Bearer"}"#.to_vec(),
        ..Default::default()
    });
    gw.tick();
    assert_eq!(gw.token_fetches.len(), 2);
    gw.request(json!({"prompt": "p3"}), Some("no-store"));
    assert_eq!(header(gw.upstream_calls.last().unwrap(), "authorization"), Some("Bearer ya29.token-2"));
    assert!(!gw.host.logs.iter().any(|(_, m)| m.contains("ya29")), "never logged");
}

#[test]
fn a_failing_metadata_server_backs_off_and_says_why() {
    let config = r#"{"backends": [{"name": "vx", "kind": "vertex", "cluster": "vertex", "project": "p",
                      "auth": {"metadata": {"cluster": "metadata"}}}]}"#;
    let mut gw = Gateway::new(config);
    gw.metadata = Box::new(|| CallResponse { status: Some(500), ..Default::default() });
    gw.tick();
    gw.tick();
    assert_eq!(gw.token_fetches.len(), 1, "backed off: no second fetch within a second");
    assert!(gw
        .host
        .logs
        .iter()
        .any(|(l, m)| *l == LogLevel::Warn && m.contains("backend vx") && m.contains("status 500")));
    assert_eq!(gw.host.counted(&Counter::TokenFetches("vx".into(), false)), 1);
    gw.host.now = NOW_MS + 1_001;
    gw.tick();
    assert_eq!(gw.token_fetches.len(), 2, "tried again after the backoff");
    let r = gw.request(json!({"prompt": "p"}), Some("no-store"));
    assert_eq!(r.status, 502);
}

// ---- policy profiles and cost (contract section 15) ----

const ROUTE_PROFILE: &str = "route_metadata/filter_metadata/gemini_image/profile";
const JWT_PROFILE: &str = "metadata/filter_metadata/envoy.filters.http.jwt_authn/payload/image_profile";

const PROFILES: &str = r#"{
  "cache": {"ttl_seconds": 60, "l1": {"max_entries": 8, "max_entry_bytes": 100000}},
  "profiles": {
    "kids": {"models": ["gemini-2.5-flash-image"], "endpoints": ["generations"],
             "safety": {"default": "HIGH", "minimum": "HIGH", "allow_request_override": false},
             "limits": {"max_n": 1}, "images_per_minute": 3, "cache": "private"},
    "design": {},
    "nocache": {"cache": "off"}
  },
  "profile_from": {"metadata": {"filter": "envoy.filters.http.jwt_authn", "path": ["payload", "image_profile"]}},
  "pricing": {"gemini-3-pro-image": {"1K": 0.5, "4K": 1.25}, "gemini-2.5-flash-image": {"1K": 0.25}}
}"#;

impl Gateway {
    /// One request as `request` does, with stream properties set (route or dynamic metadata),
    /// and refused at the headers or not.
    fn request_as(&mut self, properties: &[(&str, &str)], body: Value) -> Reply {
        self.host.counters.clear();
        self.host.logs.clear();
        self.host.properties = properties.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
        self.host.request_headers = post_headers();
        self.host.body = body.to_string().into_bytes();
        let mut stream = self.root.new_stream().expect("configured");
        stream.on_request_headers(&mut self.host, false);
        if self.host.replies.is_empty() {
            let size = self.host.body.len();
            stream.on_request_body(&mut self.host, size, true);
            self.answer_calls(&mut stream);
        }
        stream.on_log(&mut self.host);
        assert_eq!(self.host.replies.len(), 1, "exactly one reply");
        self.host.replies.pop().expect("a reply")
    }
}

/// Gemini answers the first call with an image and every later one with a 503.
fn first_call_only_succeeds() -> Box<dyn FnMut() -> CallResponse> {
    let mut i = 0;
    Box::new(move || {
        i += 1;
        if i == 1 {
            ok_response(PNG)
        } else {
            error_response(503, "UNAVAILABLE")
        }
    })
}

fn reply_header<'a>(r: &'a Reply, name: &str) -> Option<&'a str> {
    r.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[test]
fn the_profile_comes_from_dynamic_metadata_then_the_route_then_default() {
    let mut gw = Gateway::new(PROFILES);
    let r = gw.request_as(&[(ROUTE_PROFILE, "kids")], json!({"prompt": "a", "model": "gemini-2.5-flash-image"}));
    assert_eq!((r.status, reply_header(&r, "x-image-safety")), (200, Some("HIGH")));
    assert_eq!(gw.log()["profile"], "kids");
    // The JWT's claim beats the route.
    let r = gw.request_as(&[(ROUTE_PROFILE, "kids"), (JWT_PROFILE, "design")], json!({"prompt": "b", "n": 2}));
    assert_eq!((r.status, reply_header(&r, "x-image-safety")), (200, Some("OFF")));
    assert_eq!(gw.log()["profile"], "design");
    let r = gw.request_as(&[], json!({"prompt": "c"}));
    assert_eq!(r.status, 200);
    assert_eq!(gw.log()["profile"], "default");
    assert_eq!(gw.counted(Counter::ProfileRequests("default".into())), 1);
}

#[test]
fn a_header_never_picks_a_profile() {
    let mut gw = Gateway::new(PROFILES);
    gw.host.properties.clear();
    let mut stream = gw.root.new_stream().unwrap();
    gw.host.request_headers = post_headers();
    gw.host.request_headers.push(("x-image-profile".into(), "kids".into()));
    stream.on_request_headers(&mut gw.host, false);
    assert!(!gw.host.header_reads.borrow().iter().any(|h| h.contains("profile")), "no header is read for it");
}

#[test]
fn an_unknown_profile_or_a_denied_endpoint_is_403_before_the_body() {
    let mut gw = Gateway::new(PROFILES);
    for props in [[(ROUTE_PROFILE, "nobody")], [(JWT_PROFILE, "nobody")]] {
        let r = gw.request_as(&props, json!({"prompt": "a"}));
        assert_eq!(r.status, 403);
        assert_eq!(json_of(&r)["error"]["code"], "IMG_POLICY_DENIED");
        assert_eq!(json_of(&r)["error"]["type"], "permission_error");
        assert_eq!(reply_header(&r, "x-should-retry"), Some("false"));
        assert_eq!(gw.log()["profile"], "nobody");
    }
    // kids may only generate.
    gw.host.properties = [(ROUTE_PROFILE.to_string(), b"kids".to_vec())].into();
    gw.host.request_headers = post_headers();
    gw.host.request_headers[0].1 = "/v1/images/edits".into();
    let mut stream = gw.root.new_stream().unwrap();
    assert_eq!(stream.on_request_headers(&mut gw.host, false), Verdict::Pause);
    let r = gw.host.replies.pop().unwrap();
    assert_eq!((r.status, json_of(&r)["error"]["code"].as_str()), (403, Some("IMG_POLICY_DENIED")));
    assert_eq!(gw.gemini_calls, 0);
}

#[test]
fn each_override_of_a_profile_is_enforced() {
    let mut gw = Gateway::new(PROFILES);
    let kids = [(ROUTE_PROFILE, "kids")];
    // models: only flash, which is also what a request naming none gets
    let r = gw.request_as(&kids, json!({"prompt": "a", "model": "gemini-3-pro-image"}));
    assert_eq!((r.status, json_of(&r)["error"]["param"].as_str()), (400, Some("model")));
    let r = gw.request_as(&kids, json!({"prompt": "a", "model": "dall-e-3"}));
    assert_eq!(r.status, 400, "an alias of a family not allowed");
    let r = gw.request_as(&kids, json!({"prompt": "no model"}));
    assert_eq!(r.status, 200);
    assert!(path_of(gw.upstream_calls.last().unwrap()).contains("gemini-2.5-flash-image:"));
    // safety: no override, HIGH sent
    let r = gw.request_as(&kids, json!({"prompt": "a", "safety_threshold": "HIGH"}));
    assert_eq!((r.status, json_of(&r)["error"]["param"].as_str()), (400, Some("safety_threshold")));
    // limits
    let r = gw.request_as(&kids, json!({"prompt": "a", "n": 2}));
    assert_eq!((r.status, json_of(&r)["error"]["param"].as_str()), (400, Some("n")));
    let body: Value = serde_json::from_slice(&gw.upstream_calls.last().unwrap().body).unwrap();
    assert_eq!(body["safetySettings"][0]["threshold"], "BLOCK_LOW_AND_ABOVE");
}

#[test]
fn images_per_minute_count_images_across_workers_and_hits_are_free() {
    // Two workers share one Envoy's shared data.
    let mut a = Gateway::new(PROFILES);
    let mut b = Gateway::new(PROFILES);
    let kids = [(ROUTE_PROFILE, "kids")];
    let flash = |p: &str| json!({"prompt": p, "model": "gemini-2.5-flash-image"});
    assert_eq!(a.request_as(&kids, flash("one")).status, 200);
    b.host.shared = std::mem::take(&mut a.host.shared);
    b.host.shared_cas = std::mem::take(&mut a.host.shared_cas);
    assert_eq!(b.request_as(&kids, flash("two")).status, 200);
    assert_eq!(b.request_as(&kids, flash("three")).status, 200);
    let calls = b.gemini_calls;
    let r = b.request_as(&kids, flash("four"));
    assert_eq!(r.status, 429);
    assert_eq!(json_of(&r)["error"]["code"], "IMG_RATE_LIMITED");
    assert_eq!(reply_header(&r, "retry-after"), Some("20"));
    assert_eq!(b.gemini_calls, calls, "no Gemini call");
    assert_eq!(b.counted(Counter::RateLimited("kids".into())), 1);
    assert_eq!(b.worker().borrow().budget.requests, 0, "the refused request holds nothing");
    // A hit takes nothing from the bucket.
    let r = b.request_as(&kids, flash("three"));
    assert_eq!((r.status, reply_header(&r, "x-image-cache")), (200, Some("hit-l1")));
    // Other profiles have their own (here: none).
    assert_eq!(b.request_as(&[(ROUTE_PROFILE, "design")], flash("four")).status, 200);
    // A minute on, room again.
    b.host.now = NOW_MS + 20_000;
    assert_eq!(b.request_as(&kids, flash("five")).status, 200);
}

#[test]
fn a_private_cache_is_not_shared_and_off_skips_the_cache() {
    let mut gw = Gateway::new(PROFILES);
    let flash = json!({"prompt": "same", "model": "gemini-2.5-flash-image"});
    assert_eq!(reply_header(&gw.request_as(&[(ROUTE_PROFILE, "kids")], flash.clone()), "x-image-cache"), Some("miss"));
    assert_eq!(
        reply_header(&gw.request_as(&[(ROUTE_PROFILE, "design")], flash.clone()), "x-image-cache"),
        Some("miss")
    );
    assert_eq!(
        reply_header(&gw.request_as(&[], flash.clone()), "x-image-cache"),
        Some("hit-l1"),
        "shared profiles share"
    );
    assert_eq!(
        reply_header(&gw.request_as(&[(ROUTE_PROFILE, "kids")], flash.clone()), "x-image-cache"),
        Some("hit-l1")
    );
    let calls = gw.gemini_calls;
    for _ in 0..2 {
        let r = gw.request_as(&[(ROUTE_PROFILE, "nocache")], flash.clone());
        assert_eq!(reply_header(&r, "x-image-cache"), Some("miss"));
    }
    assert_eq!(gw.gemini_calls, calls + 2);
}

#[test]
fn answers_say_what_they_cost_and_hits_what_they_saved() {
    let mut gw = Gateway::new(PROFILES);
    let r = gw.request_as(&[(ROUTE_PROFILE, "design")], json!({"prompt": "p", "n": 2}));
    assert_eq!(reply_header(&r, "x-image-cost-usd"), Some("1"));
    assert_eq!((gw.log()["cost_usd"].as_f64(), gw.log()["saved_usd"].as_f64()), (Some(1.0), Some(0.0)));
    assert_eq!(gw.counted(Counter::CostMicroUsd("design".into())), 1_000_000);
    let r = gw.request_as(&[(ROUTE_PROFILE, "design")], json!({"prompt": "p", "n": 2}));
    assert_eq!((reply_header(&r, "x-image-cache"), reply_header(&r, "x-image-cost-usd")), (Some("hit-l1"), Some("0")));
    assert_eq!(gw.log()["saved_usd"].as_f64(), Some(1.0));
    assert_eq!(gw.counted(Counter::SavedMicroUsd("design".into())), 1_000_000);
    let r = gw.request_as(&[], json!({"prompt": "q", "image_size": "4K"}));
    assert_eq!(reply_header(&r, "x-image-cost-usd"), Some("1.25"));
    let r = gw.request_as(&[], json!({"prompt": ""}));
    assert_eq!((r.status, reply_header(&r, "x-image-cost-usd")), (400, Some("0")));
    // A partial answer costs what came back.
    gw.gemini = first_call_only_succeeds();
    let r = gw.request_as(&[], json!({"prompt": "partial", "n": 2}));
    assert_eq!((reply_header(&r, "x-images-failed"), reply_header(&r, "x-image-cost-usd")), (Some("1"), Some("0.5")));
}

#[test]
fn a_profile_with_its_own_inflight_bound_is_held_to_it() {
    let config = r#"{"profiles": {"small": {"limits": {"max_inflight_requests": 1}}}}"#;
    let mut gw = Gateway::new(config);
    gw.host.properties = [(ROUTE_PROFILE.to_string(), b"small".to_vec())].into();
    let first = gw.send(br#"{"prompt": "a"}"#);
    assert_eq!(gw.host.dispatched.len(), 1);
    let second = gw.send(br#"{"prompt": "b"}"#);
    let r = gw.host.replies.pop().unwrap();
    assert_eq!((r.status, json_of(&r)["error"]["code"].as_str()), (503, Some("IMG_OVERLOADED")));
    // Another profile is not held by it.
    gw.host.properties.clear();
    let _third = gw.send(br#"{"prompt": "c"}"#);
    assert_eq!(gw.host.dispatched.len(), 2);
    drop((first, second));
    assert_eq!(gw.worker().borrow().profile_budgets["small"].requests, 0);
    assert_eq!(gw.worker().borrow().budget.requests, 1, "the third still runs");
}

// ---- image URLs (contract section 10) ----

const URLS: &str = r#"{
  "cache": {"ttl_seconds": 600, "l1": {"max_entries": 8, "max_entry_bytes": 100000}, "l2": {}},
  "urls": {"base": "https://gw.example", "ttl_seconds": 60},
  "profiles": {"kids": {"cache": "private"}}
}"#;

impl Gateway {
    /// A GET (or another method) of `path`, through headers, call-outs and the end of the stream.
    fn fetch(&mut self, method: &str, path: &str, extra: &[(&str, &str)]) -> Reply {
        self.host.counters.clear();
        self.host.logs.clear();
        self.host.request_headers = vec![(":path".into(), path.into()), (":method".into(), method.into())];
        self.host.request_headers.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut stream = self.root.new_stream().expect("configured");
        assert_eq!(stream.on_request_headers(&mut self.host, true), Verdict::Pause, "answered by the filter");
        self.answer_calls(&mut stream);
        stream.on_log(&mut self.host);
        assert_eq!(self.host.replies.len(), 1, "exactly one reply");
        assert_eq!(self.host.log_lines().len(), 1, "exactly one log line");
        self.host.replies.pop().expect("a reply")
    }

    /// Answers L2 reads from what was written to it so far (as the cache service would).
    fn l2_serves_its_writes(&mut self) {
        let store: HashMap<String, Vec<u8>> =
            self.l2_writes.iter().map(|c| (path_of(c), c.body.as_ref().clone())).collect();
        self.l2 = Box::new(move |call| match store.get(&path_of(call)) {
            Some(body) => CallResponse { status: Some(200), body: body.clone(), ..Default::default() },
            None => CallResponse { status: Some(404), ..Default::default() },
        });
    }
}

fn url_path(answer: &Value, i: usize) -> String {
    let url = answer["data"][i]["url"].as_str().expect("a url");
    url.strip_prefix("https://gw.example").expect("under the base").to_string()
}

fn png_bytes() -> Vec<u8> {
    crate::base64::decode(PNG.as_bytes()).unwrap()
}

#[test]
fn a_url_answer_names_files_the_filter_serves() {
    let mut gw = Gateway::new(URLS);
    let r = gw.request(json!({"prompt": "a cat", "n": 2, "response_format": "url"}), None);
    let answer = json_of(&r);
    let path = url_path(&answer, 1);
    assert!(path.starts_with("/v1/images/files/") && path.ends_with("-1"), "{path}");
    assert!(!String::from_utf8_lossy(&r.body).contains(PNG), "no image bytes inline");
    // GET: the image's bytes, its type, an etag and how long it lives.
    let got = gw.fetch("GET", &path, &[]);
    assert_eq!((got.status, got.body.as_slice()), (200, png_bytes().as_slice()));
    assert_eq!(reply_header(&got, "content-type"), Some("image/png"));
    assert_eq!(reply_header(&got, "cache-control"), Some("private, max-age=60"));
    let etag = reply_header(&got, "etag").unwrap().to_string();
    assert_eq!(gw.counted(Counter::FileFetches(crate::files::FetchResult::Ok)), 1);
    let log = gw.log();
    assert_eq!((log["endpoint"].as_str(), log["status"].as_u64()), (Some("files"), Some(200)));
    assert!(!log.to_string().contains(&path[17..49]), "never the id in a log");
    // Again: from the worker's hot set; then 304 for the etag; HEAD the same headers.
    assert_eq!(gw.fetch("GET", &path, &[]).body.as_slice(), png_bytes().as_slice());
    let not_modified = gw.fetch("GET", &path, &[("if-none-match", &etag)]);
    assert_eq!((not_modified.status, not_modified.body.len()), (304, 0));
    let head = gw.fetch("HEAD", &path, &[]);
    assert_eq!((head.status, reply_header(&head, "etag")), (200, Some(etag.as_str())));
    // Other methods, altered ids, and the same id with another index.
    let post = gw.fetch("POST", &path, &[]);
    assert_eq!((post.status, reply_header(&post, "allow")), (405, Some("GET, HEAD")));
    let mut altered = path.clone().into_bytes();
    altered[20] = if altered[20] == b'0' { b'1' } else { b'0' };
    let r404 = gw.fetch("GET", std::str::from_utf8(&altered).unwrap(), &[]);
    assert_eq!((r404.status, json_of(&r404)["error"]["code"].as_str()), (404, Some("IMG_IMAGE_NOT_FOUND")));
    assert_eq!(gw.fetch("GET", &path.replace("-1", "-7"), &[]).status, 404);
    assert_eq!(gw.fetch("GET", "/v1/images/files/nothing-0", &[]).status, 404);
}

#[test]
fn a_url_lives_its_ttl_on_any_worker_and_from_l2() {
    let mut a = Gateway::new(URLS);
    let r = a.request(json!({"prompt": "a cat", "model": "dall-e-3"}), None);
    let path = url_path(&json_of(&r), 0);
    assert_eq!(a.fetch("GET", &path, &[]).status, 200);
    // Another worker: the same shared data, its own (empty) hot set.
    let mut b = Gateway::new(URLS);
    b.host.shared = a.host.shared.clone();
    b.host.shared_cas = a.host.shared_cas.clone();
    assert_eq!(b.fetch("GET", &path, &[]).body.as_slice(), png_bytes().as_slice());
    assert_eq!(b.gemini_calls, 0);
    // Another Envoy of the fleet: nothing in shared data, the record and entry in L2.
    let mut c = Gateway::new(URLS);
    c.l2_writes = a.l2_writes.clone();
    c.l2_serves_its_writes();
    let got = c.fetch("GET", &path, &[]);
    assert_eq!((got.status, reply_header(&got, "x-image-cache")), (200, Some("hit-l2")));
    assert_eq!(got.body.as_slice(), png_bytes().as_slice());
    // Copied into L1 on the way: another worker of that Envoy has it without L2.
    let mut c2 = Gateway::new(URLS);
    c2.host.shared = c.host.shared.clone();
    let got = c2.fetch("GET", &path, &[]);
    assert_eq!((got.status, reply_header(&got, "x-image-cache")), (200, Some("hit-l1")));
    // The record outlives neither its TTL...
    c.host.now = NOW_MS + 60_000;
    b.host.now = NOW_MS + 60_000;
    assert_eq!(b.fetch("GET", &path, &[]).status, 404);
    // ... nor what L2 gives back for it, which is checked like any L2 answer.
    let mut d = Gateway::new(URLS);
    d.l2_writes = a.l2_writes.clone();
    for w in d.l2_writes.iter_mut().filter(|w| path_of(w).starts_with("/v1/cache/img:")) {
        w.body = Rc::new(b"GIE1 garbage".to_vec());
    }
    d.l2_serves_its_writes();
    assert_eq!(d.fetch("GET", &path, &[]).status, 404);
}

#[test]
fn answers_not_in_the_cache_keep_their_images_for_their_urls() {
    let mut gw = Gateway::new(URLS);
    // A partial answer is never cached, yet its URLs work.
    gw.gemini = first_call_only_succeeds();
    let r = gw.request(json!({"prompt": "half", "n": 2, "response_format": "url"}), None);
    assert_eq!(reply_header(&r, "x-images-failed"), Some("1"));
    assert_eq!(gw.fetch("GET", &url_path(&json_of(&r), 0), &[]).status, 200);
    // no-store: kept for the URL, not for the cache.
    gw.gemini = Box::new(|| ok_response(PNG));
    let r = gw.request(json!({"prompt": "secret", "response_format": "url"}), Some("no-store"));
    assert_eq!(gw.fetch("GET", &url_path(&json_of(&r), 0), &[]).status, 200);
    let again = gw.request(json!({"prompt": "secret", "response_format": "url"}), None);
    assert_eq!(reply_header(&again, "x-image-cache"), Some("miss"), "no-store kept it out of the cache");
    // A hit gets URLs of its own.
    let hit = gw.request(json!({"prompt": "secret", "response_format": "url"}), None);
    assert_eq!(reply_header(&hit, "x-image-cache"), Some("hit-l1"));
    assert_ne!(url_path(&json_of(&hit), 0), url_path(&json_of(&again), 0));
    assert_eq!(gw.fetch("GET", &url_path(&json_of(&hit), 0), &[]).status, 200);
}

#[test]
fn a_private_profiles_urls_are_its_own() {
    let mut gw = Gateway::new(URLS);
    gw.host.properties = [(ROUTE_PROFILE.to_string(), b"kids".to_vec())].into();
    let r = gw.request(json!({"prompt": "mine", "response_format": "url"}), None);
    let path = url_path(&json_of(&r), 0);
    assert_eq!(gw.fetch("GET", &path, &[]).status, 200);
    gw.host.properties.clear();
    assert_eq!(gw.fetch("GET", &path, &[]).status, 404, "the default profile does not find it");
}

#[test]
fn without_a_tier_that_can_hold_them_images_stay_inline() {
    let config =
        r#"{"cache": {"l1": {"max_entries": 4, "max_entry_bytes": 10}}, "urls": {"base": "https://gw.example"}}"#;
    let mut gw = Gateway::new(config);
    let r = gw.request(json!({"prompt": "big", "response_format": "url"}), None);
    assert!(json_of(&r)["data"][0]["url"].as_str().unwrap().starts_with("data:image/png;base64,"));
    // b64_json is b64_json, and without urls a url is a data: URI.
    let r = gw.request(json!({"prompt": "b64"}), None);
    assert!(json_of(&r)["data"][0]["b64_json"].is_string());
    let mut plain = Gateway::new(CACHED);
    let r = plain.request(json!({"prompt": "x", "model": "dall-e-3"}), None);
    assert!(json_of(&r)["data"][0]["b64_json"].is_string(), "url by default only with urls on");
}

#[test]
fn the_base_comes_from_the_request_when_none_is_configured() {
    let config = r#"{"cache": {"l1": {}}, "urls": {}}"#;
    let mut gw = Gateway::new(config);
    let mut headers = post_headers();
    headers.push((":authority".into(), "images.example:8443".into()));
    headers.push(("x-forwarded-proto".into(), "https".into()));
    let mut stream = gw.send_with(headers, json!({"prompt": "p", "model": "dall-e-3"}).to_string().as_bytes());
    gw.answer_calls(&mut stream);
    let r = gw.host.replies.pop().unwrap();
    let url = json_of(&r)["data"][0]["url"].as_str().unwrap().to_string();
    assert!(url.starts_with("https://images.example:8443/v1/images/files/"), "{url}");
}

// ---- large replies: sent with a placeholder, their body put in place on the way out ----

/// A PNG's base64 of about `len` bytes (its first bytes a PNG's).
fn big_png(len: usize) -> String {
    "iVBORw0KGgo".to_string() + &"A".repeat(len - 12) + "="
}

/// What Envoy does with a local reply: its headers (with the length of the body it was given)
/// and then its body go through this filter's response callbacks; what the client gets.
fn pass_back(
    host: &mut MemoryHost,
    stream: &mut StreamDriver,
    reply: &Reply,
    head: bool,
) -> (Vec<(String, String)>, Vec<u8>) {
    host.response_headers = vec![(":status".into(), reply.status.to_string())];
    host.response_headers.extend(reply.headers.iter().cloned());
    host.response_headers.push(("content-length".into(), reply.body.len().to_string()));
    assert_eq!(stream.on_response_headers(host, head), Verdict::Continue);
    if head {
        return (host.response_headers.clone(), Vec::new());
    }
    host.response_chunk = reply.body.to_vec();
    host.response_out.clear();
    assert_eq!(stream.on_response_body(host, reply.body.len(), true), Verdict::Continue);
    (host.response_headers.clone(), host.response_out.clone())
}

fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[test]
fn a_large_reply_goes_out_with_a_placeholder_and_its_body_goes_in_on_the_way_out() {
    let mut gw = Gateway::new(r#"{"cache": {"l1": {}}}"#);
    let data = big_png(200_000);
    let answer = data.clone();
    gw.gemini = Box::new(move || ok_response(&answer));
    for expected in ["miss", "hit-l1"] {
        let mut stream = gw.send(json!({"prompt": "large"}).to_string().as_bytes());
        gw.answer_calls(&mut stream);
        let sent = gw.host.replies.pop().expect("a reply");
        assert_eq!(sent.header("x-image-cache"), Some(expected));
        assert_eq!(&sent.body[..], b" ", "Envoy is handed one byte, not the body");
        let (headers, body) = pass_back(&mut gw.host, &mut stream, &sent, false);
        let v: Value = serde_json::from_slice(&body).expect("the whole answer");
        assert_eq!(v["data"][0]["b64_json"], data.as_str());
        assert_eq!(header_of(&headers, "content-length"), Some(&body.len().to_string()[..]));
        assert_eq!(header_of(&headers, "content-type"), Some("application/json"));
        // Anything a filter adds after the body is dropped: the client gets the answer alone.
        gw.host.response_chunk = b"extra".to_vec();
        gw.host.response_out.clear();
        stream.on_response_body(&mut gw.host, 5, true);
        assert!(gw.host.response_out.is_empty());
        stream.on_log(&mut gw.host);
    }
    assert_eq!(gw.gemini_calls, 1);
    assert_eq!(gw.host.response_resets, 0);
}

#[test]
fn small_replies_go_out_whole_and_the_response_callbacks_leave_them_alone() {
    let mut gw = Gateway::new(CACHED);
    let mut stream = gw.send(json!({"prompt": "small"}).to_string().as_bytes());
    gw.answer_calls(&mut stream);
    let sent = gw.host.replies.pop().expect("a reply");
    assert!(sent.body.len() > 1 && sent.body.len() < carried::CARRIED_MIN_BYTES);
    json_of(&sent);
    let (headers, body) = pass_back(&mut gw.host, &mut stream, &sent, false);
    assert_eq!(body, Vec::<u8>::new(), "the body callback touched nothing");
    assert_eq!(header_of(&headers, "content-length"), Some(&sent.body.len().to_string()[..]));
}

#[test]
fn an_encoded_placeholder_loses_its_encoding_and_a_refused_body_resets_the_response() {
    let mut gw = Gateway::new(CACHED);
    let data = big_png(100_000);
    gw.gemini = Box::new(move || ok_response(&data));
    let mut stream = gw.send(json!({"prompt": "compressed"}).to_string().as_bytes());
    gw.answer_calls(&mut stream);
    let sent = gw.host.replies.pop().expect("a reply");
    // A compressor between this filter and the router encoded the placeholder.
    gw.host.response_headers = vec![(":status".into(), "200".into()), ("content-encoding".into(), "gzip".into())];
    stream.on_response_headers(&mut gw.host, false);
    assert_eq!(header_of(&gw.host.response_headers, "content-encoding"), None);
    let length: usize = header_of(&gw.host.response_headers, "content-length").unwrap().parse().unwrap();
    assert!(length > 100_000);
    // The host refuses the body: a cut response, never a one-byte one under that length.
    assert_eq!(&sent.body[..], b" ");
    gw.host.response_chunk = b"\x1f\x8b".to_vec();
    gw.host.refuse_response_body = true;
    stream.on_response_body(&mut gw.host, 2, true);
    assert_eq!(gw.host.response_resets, 1);
    assert!(gw.host.logs.iter().any(|(l, m)| *l == LogLevel::Error && m.contains("refused a reply's body")));
}

#[test]
fn a_large_image_url_is_carried_and_a_head_gets_its_length_alone() {
    let config = r#"{"cache": {"l1": {}}, "urls": {}}"#;
    let mut gw = Gateway::new(config);
    let data = big_png(150_000);
    gw.gemini = Box::new(move || ok_response(&data));
    let mut headers = post_headers();
    headers.push((":authority".into(), "images.example".into()));
    let mut s = gw.send_with(headers, json!({"prompt": "p", "response_format": "url"}).to_string().as_bytes());
    gw.answer_calls(&mut s);
    let sent = gw.host.replies.pop().unwrap();
    // The answer itself is small (a URL): it goes out whole.
    let body = sent.body.to_vec();
    s.on_log(&mut gw.host);
    gw.tick();
    let url = serde_json::from_slice::<Value>(&body).unwrap()["data"][0]["url"].as_str().unwrap().to_string();
    let path = url.split_once("/v1/images/files/").map(|(_, id)| format!("/v1/images/files/{id}")).unwrap();
    for method in ["GET", "HEAD"] {
        gw.host.request_headers = vec![(":path".into(), path.clone()), (":method".into(), method.into())];
        let mut s = gw.root.new_stream().unwrap();
        s.on_request_headers(&mut gw.host, true);
        gw.answer_calls(&mut s);
        let sent = gw.host.replies.pop().expect("a reply");
        assert_eq!((sent.status, &sent.body[..]), (200, &b" "[..]));
        let (headers, body) = pass_back(&mut gw.host, &mut s, &sent, method == "HEAD");
        let image = crate::base64::decode(big_png(150_000).as_bytes()).unwrap();
        assert_eq!(header_of(&headers, "content-length"), Some(&image.len().to_string()[..]), "{method}");
        assert_eq!(header_of(&headers, "content-type"), Some("image/png"));
        if method == "GET" {
            assert_eq!(body, image);
        } else {
            assert!(body.is_empty());
            // No body callback comes after a HEAD's headers: nothing is left waiting.
            gw.host.response_chunk = b"x".to_vec();
            gw.host.response_out.clear();
            s.on_response_body(&mut gw.host, 1, true);
            assert!(gw.host.response_out.is_empty());
        }
    }
}

#[test]
fn an_image_url_from_l2_is_served_only_if_every_image_of_its_entry_checks_out() {
    let mut a = Gateway::new(URLS);
    let r = a.request(json!({"prompt": "two", "n": 2, "response_format": "url"}), None);
    let answer = json_of(&r);
    let good = PNG.as_bytes();
    let hostile: [&[u8]; 3] = [b"iVBORw0KGgoAAAANSUhE\x01AAA", b"iVBORw0KGgoAAAAN-_AA", b"QUFBQUFBQUFBQUFB"];
    for bad in hostile {
        for (images, served_ok) in [([good, bad], 0), ([bad, good], 1)] {
            let mut c = Gateway::new(URLS);
            c.l2_writes = a.l2_writes.clone();
            for w in c.l2_writes.iter_mut().filter(|w| path_of(w).starts_with("/v1/cache/img:")) {
                let key = path_of(w)["/v1/cache/".len()..].to_string();
                w.body = Rc::new(entry_of(&key, NOW_MS / 1000, &images));
            }
            c.l2_serves_its_writes();
            // The image asked for is fine, or is the bad one: either way a 404, and nothing of
            // the entry reaches L1.
            for index in [served_ok, 1 - served_ok] {
                let got = c.fetch("GET", &url_path(&answer, index), &[]);
                assert_eq!(got.status, 404, "{bad:?} in an entry, image {index} asked for");
            }
            assert!(!c.host.shared.values().any(|v| v.windows(bad.len()).any(|w| w == bad)));
        }
    }
}

#[test]
fn a_large_reply_ended_at_its_headers_gets_no_length_and_refused_headers_reset_it() {
    let mut gw = Gateway::new(r#"{"cache": {"l1": {}}}"#);
    let data = big_png(100_000);
    gw.gemini = Box::new(move || ok_response(&data));
    // Envoy ends the local reply of a gRPC request at its headers: no body follows, so no
    // length is promised, and nothing is left waiting.
    let mut stream = gw.send(json!({"prompt": "grpc"}).to_string().as_bytes());
    gw.answer_calls(&mut stream);
    let sent = gw.host.replies.pop().expect("a reply");
    assert_eq!(&sent.body[..], b" ");
    gw.host.response_headers = vec![(":status".into(), "200".into()), ("grpc-status".into(), "2".into())];
    assert_eq!(stream.on_response_headers(&mut gw.host, true), Verdict::Continue);
    assert_eq!(header_of(&gw.host.response_headers, "content-length"), None);
    gw.host.response_chunk = b"x".to_vec();
    gw.host.response_out.clear();
    stream.on_response_body(&mut gw.host, 1, true);
    assert!(gw.host.response_out.is_empty(), "nothing carried is left to put anywhere");
    // The host refuses the headers: the placeholder's length stands, so the response is reset
    // and the body never goes in under it.
    let mut stream = gw.send(json!({"prompt": "refused headers"}).to_string().as_bytes());
    gw.answer_calls(&mut stream);
    let sent = gw.host.replies.pop().expect("a reply");
    gw.host.refuse_response_headers = true;
    gw.host.response_headers = vec![(":status".into(), "200".into()), ("content-length".into(), "1".into())];
    stream.on_response_headers(&mut gw.host, false);
    assert_eq!(gw.host.response_resets, 1);
    gw.host.response_chunk = sent.body.to_vec();
    gw.host.response_out.clear();
    stream.on_response_body(&mut gw.host, 1, true);
    assert!(gw.host.response_out.is_empty(), "the placeholder is dropped, the body never placed");
    assert!(gw.host.logs.iter().any(|(l, m)| *l == LogLevel::Error && m.contains("refused a reply's headers")));
}
