//! One image request's life, as a state machine with no host in it: the host feeds events
//! (headers seen, body complete, Gemini call k answered) and carries out the effects
//! (call Gemini, reply, log). Every path ends in exactly one reply and one log line.

use std::rc::Rc;

use crate::access_log::{LogLevel, LogRecord};
use crate::cache::{self, CacheKey, L1Read, StorePlan};
use crate::config::Settings;
use crate::error::{ApiError, ErrorCode};
use crate::gemini::{self, CallOutcome, CallResponse, GeminiImage, Usage};
use crate::hot::HotEntry;
use crate::metrics::{CacheTier, Counter, Histogram, Outcome};
use crate::openai::{self, ImageView};
use crate::request::{self, ImageRequest, ResponseFormat};
use crate::safety::SafetyLevel;

/// What the filter keeps of the request headers (they cannot be read after the headers phase).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestHead {
    pub content_type: Option<String>,
    pub content_length: Option<u64>,
    pub request_id: Option<String>,
    pub cache_control: Option<String>,
}

/// An HTTP call-out to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpCall {
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u64,
}

/// A local reply to the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    /// Shared so that the hot set can keep it without a copy.
    pub body: Rc<Vec<u8>>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub level: LogLevel,
    pub json: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Make `count` identical calls; answers come back as `on_call_response(index, ..)`.
    CallGemini {
        count: u32,
        call: HttpCall,
    },
    Reply(Reply),
    Log(LogLine),
    /// Look the key up in L1 now: the worker's hot set (answer: `on_l1_hot`), then shared
    /// data (answer: `on_l1_result`).
    LookupL1 {
        key: CacheKey,
        max_entries: u32,
        format: ResponseFormat,
    },
    /// Keep a rendered answer in the worker's hot set.
    RememberHot {
        key: String,
        format: ResponseFormat,
        entry: HotEntry,
    },
    /// Write an entry to an L1 slot: `data` first, then `meta`.
    StoreL1 {
        meta_key: String,
        meta: Vec<u8>,
        data_key: String,
        data: Rc<Vec<u8>>,
    },
    /// Ask the cache service; the answer comes back as `on_l2_response`.
    CallL2 {
        call: HttpCall,
    },
    /// Store at the cache service from the root context (outliving this stream); no answer
    /// is awaited. The body is `entry`.
    WriteL2 {
        call: HttpCall,
        entry: Rc<Vec<u8>>,
    },
    /// Add to a counter.
    Count(Counter, u64),
    /// Record a histogram value.
    Observe(Histogram, u64),
}

pub struct Exchange {
    settings: Rc<Settings>,
    head: RequestHead,
    started_ms: u64,
    request: Option<ImageRequest>,
    prompt_hash: Option<String>,
    model: Option<String>,
    safety: Option<SafetyLevel>,
    cache: CachePlan,
    calls: Vec<Option<CallOutcome>>,
    calls_made: u32,
    upstream_started_ms: Option<u64>,
    done: bool,
}

/// What the cache does for this request.
#[derive(Default)]
struct CachePlan {
    key: Option<CacheKey>,
    /// Look up (false with `no-cache`, `no-store`, or no cache configured).
    lookup: bool,
    /// Store a complete success (false with `no-store`).
    store: bool,
    /// The `x-image-cache` value.
    state: &'static str,
    /// Where the L1 lookup said to store (and whether that evicts a live entry).
    l1_plan: Option<StorePlan>,
}

impl Exchange {
    pub fn new(settings: Rc<Settings>, head: RequestHead, now_ms: u64) -> Exchange {
        let state = initial_cache_state(&settings, &head);
        Exchange {
            settings,
            head,
            started_ms: now_ms,
            request: None,
            prompt_hash: None,
            model: None,
            safety: None,
            cache: CachePlan { state, ..CachePlan::default() },
            calls: Vec::new(),
            calls_made: 0,
            upstream_started_ms: None,
            done: false,
        }
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Headers seen: a declared body over the limit is refused before it is read.
    pub fn on_headers(&mut self, now_ms: u64) -> Vec<Effect> {
        match self.head.content_length {
            Some(len) if len > self.settings.limits.max_body_bytes as u64 => self.too_large(now_ms),
            _ => Vec::new(),
        }
    }

    /// Part of the body arrived; `buffered` bytes so far.
    pub fn on_body_progress(&mut self, buffered: usize, now_ms: u64) -> Vec<Effect> {
        if !self.done && buffered > self.settings.limits.max_body_bytes {
            self.too_large(now_ms)
        } else {
            Vec::new()
        }
    }

    fn too_large(&mut self, now_ms: u64) -> Vec<Effect> {
        let e = ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("request body is over this gateway's limit of {} bytes", self.settings.limits.max_body_bytes),
        );
        self.fail(e, None, now_ms)
    }

    /// The whole body is here.
    pub fn on_body(&mut self, body: &[u8], now_ms: u64) -> Vec<Effect> {
        if self.done {
            return Vec::new();
        }
        if body.len() > self.settings.limits.max_body_bytes {
            return self.too_large(now_ms);
        }
        if !is_json(self.head.content_type.as_deref()) {
            let got = self.head.content_type.as_deref().unwrap_or("none");
            let e = ApiError::new(
                ErrorCode::InvalidRequest,
                format!("content-type must be application/json, got {:?}", got.chars().take(64).collect::<String>()),
            );
            return self.fail(e, None, now_ms);
        }
        let req = match request::parse_request(body, &self.settings) {
            Ok(r) => r,
            Err(rejection) => {
                self.prompt_hash = rejection.prompt_hash;
                self.model = rejection.model;
                self.safety = rejection.safety;
                return self.fail(rejection.error, None, now_ms);
            }
        };
        self.prompt_hash = Some(req.prompt_hash.clone());
        self.model = Some(req.model.clone());
        self.safety = Some(req.safety);
        self.plan_cache(&req);
        self.request = Some(req);
        match (&self.cache.key, self.settings.cache.as_ref().and_then(|c| c.l1.as_ref())) {
            (Some(key), Some(l1)) if self.cache.lookup => {
                let format = self.request.as_ref().map_or(ResponseFormat::B64Json, |r| r.response_format);
                vec![Effect::LookupL1 { key: key.clone(), max_entries: l1.max_entries, format }]
            }
            _ => self.after_l1(now_ms),
        }
    }

    fn plan_cache(&mut self, req: &ImageRequest) {
        let Some(_) = &self.settings.cache else { return };
        let cc = self.head.cache_control.as_deref().unwrap_or("");
        if has_directive(cc, "no-store") {
            return; // `bypass`, set at the start
        }
        self.cache.key = Some(cache::cache_key(req, &self.settings.gemini.model));
        self.cache.store = true;
        self.cache.lookup = !has_directive(cc, "no-cache");
    }

    /// L1 answered (the host looked the key up in shared data).
    pub fn on_l1_result(&mut self, read: L1Read, now_ms: u64) -> Vec<Effect> {
        if self.done {
            return Vec::new();
        }
        match read {
            L1Read::Hit(bytes) => {
                let mut effects = self.serve_entry(&bytes, CacheTier::L1, now_ms);
                if effects.is_empty() {
                    effects = self.after_l1(now_ms); // unreadable after all: a miss
                }
                effects
            }
            L1Read::Miss(plan) => {
                self.cache.l1_plan = Some(plan);
                self.after_l1(now_ms)
            }
        }
    }

    /// The worker's hot set had the rendered answer.
    pub fn on_l1_hot(&mut self, hot: HotEntry, now_ms: u64) -> Vec<Effect> {
        if self.done {
            return Vec::new();
        }
        self.serve_hit(CacheTier::L1, hot.body, hot.images, hot.usage, now_ms)
    }

    /// The reply, log line and counters of a cache hit whose answer is rendered.
    fn serve_hit(
        &mut self,
        tier: CacheTier,
        body: Rc<Vec<u8>>,
        images: u32,
        usage: Option<Usage>,
        now_ms: u64,
    ) -> Vec<Effect> {
        self.cache.state = tier.header_value();
        let headers = self.common_headers();
        let mut record = self.log_record(200, now_ms);
        record.images = images;
        record.usage = usage;
        self.done = true;
        let mut effects = vec![
            Effect::Reply(Reply { status: 200, headers, body }),
            Effect::Log(LogLine { level: LogLevel::Info, json: record.to_json() }),
            Effect::Count(Counter::CacheHits(tier), 1),
            Effect::Count(Counter::Images, u64::from(images)),
        ];
        effects.extend(self.outcome_metrics(Outcome::Success, now_ms));
        effects
    }

    /// The hot-set effect for an answer just rendered, when L1 is on.
    fn remember(&self, body: &Rc<Vec<u8>>, images: u32, usage: Option<Usage>) -> Option<Effect> {
        let c = self.settings.cache.as_ref()?;
        c.l1.as_ref()?;
        let (key, req) = (self.cache.key.as_ref()?, self.request.as_ref()?);
        Some(Effect::RememberHot {
            key: key.key.clone(),
            format: req.response_format,
            entry: HotEntry { body: body.clone(), images, usage, expires_at_s: self.started_ms / 1000 + c.ttl_seconds },
        })
    }

    /// After an L1 miss (or with no L1): ask L2, or go to Gemini.
    fn after_l1(&mut self, now_ms: u64) -> Vec<Effect> {
        match (&self.cache.key, self.settings.cache.as_ref().and_then(|c| c.l2.as_ref())) {
            (Some(key), Some(l2)) if self.cache.lookup => {
                let mut headers = vec![
                    (":method".to_string(), "GET".to_string()),
                    (":path".to_string(), cache::l2_path(&key.key)),
                    (":authority".to_string(), l2.authority.clone()),
                ];
                if let Some(token) = &l2.token {
                    headers.push(("authorization".to_string(), format!("Bearer {token}")));
                }
                vec![Effect::CallL2 {
                    call: HttpCall {
                        cluster: l2.cluster.clone(),
                        headers,
                        body: Vec::new(),
                        timeout_ms: l2.timeout_ms,
                    },
                }]
            }
            _ => self.call_gemini(now_ms),
        }
    }

    /// The cache service answered (or failed, or timed out): a hit is served, anything else
    /// costs only a miss.
    pub fn on_l2_response(&mut self, response: CallResponse, now_ms: u64) -> Vec<Effect> {
        if self.done {
            return Vec::new();
        }
        let mut effects = Vec::new();
        match response.status {
            Some(200) => {
                effects = self.serve_entry(&response.body, CacheTier::L2, now_ms);
                if effects.is_empty() {
                    effects.push(Effect::Count(Counter::CacheL2Errors, 1)); // garbled
                } else {
                    // Fill L1 from L2.
                    if let Some(store) = self.l1_store(Rc::new(response.body)) {
                        effects.extend(store);
                    }
                    return effects;
                }
            }
            Some(404) => {}
            _ => effects.push(Effect::Count(Counter::CacheL2Errors, 1)),
        }
        effects.extend(self.call_gemini(now_ms));
        effects
    }

    fn call_gemini(&mut self, now_ms: u64) -> Vec<Effect> {
        let Some(req) = &self.request else {
            return self.fail(ApiError::new(ErrorCode::InternalError, "request state lost"), None, now_ms);
        };
        let g = &self.settings.gemini;
        let mut headers = vec![
            (":method".to_string(), "POST".to_string()),
            (":path".to_string(), gemini::generate_content_path(&g.model)),
            (":authority".to_string(), g.authority.clone()),
            ("content-type".to_string(), "application/json".to_string()),
            ("x-goog-api-client".to_string(), concat!("gemini-image-filter/", env!("CARGO_PKG_VERSION")).to_string()),
        ];
        if let Some(key) = &g.api_key {
            headers.push(("x-goog-api-key".to_string(), key.clone()));
        }
        let call = HttpCall {
            cluster: g.cluster.clone(),
            headers,
            body: gemini::request_body(&req.final_prompt, req.ratio, req.image_size, req.safety),
            timeout_ms: g.timeout_ms,
        };
        let count = req.n;
        self.calls = vec![None; count as usize];
        self.calls_made = count;
        self.upstream_started_ms = Some(now_ms);
        let mut effects = Vec::with_capacity(2);
        if self.settings.cache.is_some() {
            effects.push(Effect::Count(
                if self.cache.key.is_some() { Counter::CacheMisses } else { Counter::CacheBypass },
                1,
            ));
        }
        effects.push(Effect::CallGemini { count, call });
        effects
    }

    /// Answers from a cache entry; empty when the entry does not read back.
    fn serve_entry(&mut self, bytes: &[u8], tier: CacheTier, now_ms: u64) -> Vec<Effect> {
        let (Some(key), Some(req)) = (&self.cache.key, &self.request) else { return Vec::new() };
        // Entries are written only by this filter; the magic, the lengths and the key inside
        // catch garbage, truncation and mix-ups without scanning megabytes of base64 again.
        let Some(entry) = cache::decode_entry(bytes, &key.key, false) else { return Vec::new() };
        let body = Rc::new(openai::images_body(entry.created, &entry.images, req.response_format, entry.usage));
        let images = entry.images.len() as u32;
        let remember = self.remember(&body, images, entry.usage);
        let mut effects = self.serve_hit(tier, body, images, entry.usage, now_ms);
        effects.extend(remember);
        effects
    }

    /// The L1 write for an entry, if L1 is on and the entry fits.
    fn l1_store(&self, entry: Rc<Vec<u8>>) -> Option<Vec<Effect>> {
        let c = self.settings.cache.as_ref()?;
        let l1 = c.l1.as_ref()?;
        let key = self.cache.key.as_ref()?;
        if entry.len() > l1.max_entry_bytes {
            return Some(vec![Effect::Count(Counter::CacheL1TooLarge, 1)]);
        }
        let plan = self.cache.l1_plan.unwrap_or(StorePlan {
            slot: cache::l1_slots(key, l1.max_entries).first().map_or(0, |s| s.index),
            evicts: false,
        });
        let slot = cache::l1_slot_at(plan.slot);
        let expires = self.started_ms / 1000 + c.ttl_seconds;
        let mut effects = vec![
            Effect::StoreL1 {
                meta_key: slot.meta_key,
                meta: cache::encode_l1_meta(&key.key, expires),
                data_key: slot.data_key,
                data: entry,
            },
            Effect::Count(Counter::CacheStores(CacheTier::L1), 1),
        ];
        if plan.evicts {
            effects.push(Effect::Count(Counter::CacheL1Evictions, 1));
        }
        Some(effects)
    }

    /// The writes for a complete success: L1 now, L2 from the root context.
    fn store_effects(&self, images: &[ImageView], usage: Option<Usage>, created: u64) -> Vec<Effect> {
        let (true, Some(key), Some(c)) = (self.cache.store, &self.cache.key, &self.settings.cache) else {
            return Vec::new();
        };
        if c.l1.is_none() && c.l2.is_none() {
            return Vec::new();
        }
        let entry = Rc::new(cache::encode_entry(&key.key, created, usage, images));
        let mut effects = self.l1_store(entry.clone()).unwrap_or_default();
        if let Some(l2) = &c.l2 {
            let mut headers = vec![
                (":method".to_string(), "PUT".to_string()),
                (":path".to_string(), cache::l2_path(&key.key)),
                (":authority".to_string(), l2.authority.clone()),
                ("content-type".to_string(), "application/octet-stream".to_string()),
                ("x-cache-ttl-seconds".to_string(), c.ttl_seconds.to_string()),
            ];
            if let Some(token) = &l2.token {
                headers.push(("authorization".to_string(), format!("Bearer {token}")));
            }
            let call = HttpCall {
                cluster: l2.cluster.clone(),
                headers,
                body: Vec::new(),
                timeout_ms: l2.timeout_ms.max(1000),
            };
            effects.push(Effect::WriteL2 { call, entry });
            effects.push(Effect::Count(Counter::CacheStores(CacheTier::L2), 1));
        }
        effects
    }

    /// Call `index` could not even be dispatched (unknown cluster, host refused).
    pub fn on_call_not_dispatched(&mut self, index: u32, why: &str, now_ms: u64) -> Vec<Effect> {
        let e = ApiError::new(ErrorCode::InternalError, format!("the gateway could not call Gemini: {why}"));
        self.record(index, CallOutcome { upstream_status: 0, result: Err(e), usage: None }, now_ms)
    }

    /// Call `index` answered (or failed).
    pub fn on_call_response(&mut self, index: u32, response: CallResponse, now_ms: u64) -> Vec<Effect> {
        if self.done {
            return Vec::new();
        }
        let elapsed = response.elapsed_ms;
        let mut effects = self.record(index, gemini::read_call(response), now_ms);
        effects.push(Effect::Observe(Histogram::UpstreamLatencyMs, elapsed));
        effects
    }

    fn record(&mut self, index: u32, outcome: CallOutcome, now_ms: u64) -> Vec<Effect> {
        match self.calls.get_mut(index as usize) {
            Some(slot @ None) => *slot = Some(outcome),
            _ => return Vec::new(), // unknown or repeated: ignore
        }
        if self.done || self.calls.iter().any(Option::is_none) {
            return Vec::new();
        }
        self.finish(now_ms)
    }

    fn finish(&mut self, now_ms: u64) -> Vec<Effect> {
        let calls = std::mem::take(&mut self.calls);
        let mut usage: Option<Usage> = None;
        for u in calls.iter().flatten().filter_map(|c| c.usage) {
            usage.get_or_insert_with(Usage::default).add(u);
        }
        let images: Vec<ImageView> =
            calls.iter().flatten().filter_map(|c| c.result.as_ref().ok()).map(GeminiImage::view).collect();
        let failed = calls.len() - images.len();
        if images.is_empty() {
            // All failed: answer with the most telling error.
            let chosen = calls
                .iter()
                .flatten()
                .filter_map(|c| c.result.as_ref().err().map(|e| (e, c.upstream_status)))
                .min_by_key(|(e, _)| e.code.precedence());
            let (e, status) = match chosen {
                Some((e, s)) => (e.clone(), Some(s)),
                None => (ApiError::new(ErrorCode::InternalError, "no Gemini call was made"), None),
            };
            return self.fail(e, status, now_ms);
        }
        let Some(req) = &self.request else {
            return self.fail(ApiError::new(ErrorCode::InternalError, "request state lost"), None, now_ms);
        };
        let created = now_ms / 1000;
        let body = Rc::new(openai::images_body(created, &images, req.response_format, usage));
        let mut headers = self.common_headers();
        if failed > 0 {
            headers.push(("x-images-failed".to_string(), failed.to_string()));
        }
        let mut record = self.log_record(200, now_ms);
        record.images = images.len() as u32;
        record.failed_calls = failed as u32;
        record.upstream_status = Some(200);
        record.usage = usage;
        self.done = true;
        let outcome = if failed > 0 { Outcome::Partial } else { Outcome::Success };
        let mut effects = vec![
            Effect::Reply(Reply { status: 200, headers, body }),
            Effect::Log(LogLine { level: LogLevel::Info, json: record.to_json() }),
            Effect::Count(Counter::Images, images.len() as u64),
        ];
        effects.extend(self.outcome_metrics(outcome, now_ms));
        if failed == 0 && self.cache.store {
            // Only complete successes are stored.
            if let Some(Effect::Reply(reply)) = effects.first() {
                effects.extend(self.remember(&reply.body, images.len() as u32, usage));
            }
            effects.extend(self.store_effects(&images, usage, created));
        }
        effects
    }

    /// The counters and histogram every finished request updates.
    fn outcome_metrics(&self, outcome: Outcome, now_ms: u64) -> Vec<Effect> {
        let mut effects = vec![
            Effect::Count(Counter::Requests(outcome), 1),
            Effect::Observe(Histogram::RequestLatencyMs, now_ms.saturating_sub(self.started_ms)),
        ];
        if let Some(req) = &self.request {
            effects.push(Effect::Count(Counter::ModelRequests(req.variant.name()), 1));
            effects.push(Effect::Count(Counter::SafetyApplied(req.safety), 1));
        }
        if self.calls_made > 0 {
            effects.push(Effect::Count(Counter::UpstreamCalls, u64::from(self.calls_made)));
        }
        effects
    }

    /// The client went away before the answer: one log line, no reply.
    pub fn on_abandoned(&mut self, now_ms: u64) -> Vec<Effect> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        let mut record = self.log_record(499, now_ms);
        record.outcome = "client_closed";
        let mut effects = vec![Effect::Log(LogLine { level: LogLevel::Warn, json: record.to_json() })];
        effects.extend(self.outcome_metrics(Outcome::ClientClosed, now_ms));
        effects
    }

    fn fail(&mut self, e: ApiError, upstream_status: Option<u32>, now_ms: u64) -> Vec<Effect> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        let status = e.status();
        let mut headers = self.common_headers();
        if !e.code.should_retry() {
            headers.push(("x-should-retry".to_string(), "false".to_string()));
        }
        if let Some(secs) = e.retry_after {
            headers.push(("retry-after".to_string(), secs.to_string()));
        }
        let mut record = self.log_record(status, now_ms);
        record.upstream_status = upstream_status;
        record.outcome = "error";
        record.error = Some(e.code);
        record.failed_calls = if upstream_status.is_some() { self.calls_made } else { 0 };
        let level = if e.code.category() == "USER_ERROR" { LogLevel::Warn } else { LogLevel::Error };
        let mut effects = vec![
            Effect::Reply(Reply { status, headers, body: Rc::new(openai::error_body(&e)) }),
            Effect::Log(LogLine { level, json: record.to_json() }),
            Effect::Count(Counter::Errors(e.code), 1),
        ];
        if let (ErrorCode::SafetyBlocked, Some(level)) = (e.code, self.safety) {
            effects.push(Effect::Count(Counter::SafetyBlocks(level), 1));
        }
        effects.extend(self.outcome_metrics(Outcome::Error, now_ms));
        effects
    }

    fn common_headers(&self) -> Vec<(String, String)> {
        let mut h = vec![
            ("content-type".to_string(), "application/json".to_string()),
            ("x-image-cache".to_string(), self.cache.state.to_string()),
        ];
        if let Some(p) = &self.prompt_hash {
            h.push(("x-image-prompt-hash".to_string(), p.clone()));
        }
        if let Some(s) = self.safety {
            h.push(("x-image-safety".to_string(), s.as_str().to_string()));
        }
        h
    }

    fn log_record(&self, status: u32, now_ms: u64) -> LogRecord {
        let req = self.request.as_ref();
        LogRecord {
            outcome: "success",
            status,
            error: None,
            model: self.model.clone(),
            variant: req.map(|r| r.variant.name()),
            n: req.map(|r| r.n),
            aspect_ratio: req.map(|r| r.ratio.as_str()),
            image_size: req.and_then(|r| r.image_size).map(|s| s.as_str()),
            quality: req.and_then(|r| r.quality).map(|q| q.as_str()),
            style: req.and_then(|r| r.style).map(|s| s.as_str()),
            safety: self.safety.map(|s| s.as_str()),
            cache: self.cache.state,
            latency_ms: now_ms.saturating_sub(self.started_ms),
            upstream_latency_ms: self.upstream_started_ms.map(|t| now_ms.saturating_sub(t)),
            upstream_status: None,
            prompt_hash: self.prompt_hash.clone(),
            request_id: self.head.request_id.clone(),
            images: 0,
            failed_calls: 0,
            usage: None,
        }
    }
}

/// `bypass` when a cache is configured and the client said `no-store`, else `miss`.
fn initial_cache_state(settings: &Settings, head: &RequestHead) -> &'static str {
    let no_store = head.cache_control.as_deref().is_some_and(|c| has_directive(c, "no-store"));
    if settings.cache.is_some() && no_store {
        "bypass"
    } else {
        "miss"
    }
}

fn is_json(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|c| {
        let mime = c.split(';').next().unwrap_or("").trim();
        mime.eq_ignore_ascii_case("application/json")
    })
}

/// Whether a `cache-control` header holds a directive (case-insensitive, comma-separated).
pub fn has_directive(cache_control: &str, directive: &str) -> bool {
    cache_control.split(',').any(|d| d.split('=').next().unwrap_or("").trim().eq_ignore_ascii_case(directive))
}

#[cfg(test)]
#[path = "exchange_tests.rs"]
mod tests;
