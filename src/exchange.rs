//! One image request's life, as a state machine with no host in it: the driver feeds events
//! (body complete, L1 looked up, L2 answered, Gemini call k answered) and carries out the
//! effects (look up, call, reply, store, log). The request is always in exactly one `Phase`;
//! every path ends in `Done` with exactly one reply (or none, when the client left first) and
//! one log line. See docs/architecture.md.

use std::rc::Rc;

use crate::access_log::{LogLevel, LogRecord};
use crate::cache::{self, CacheKey, L1Read, StorePlan};
use crate::config::{L2Settings, Settings};
use crate::edit;
use crate::endpoint::Endpoint;
use crate::error::{ApiError, Category, ErrorCode};
use crate::gemini::{self, CallOutcome, CallResponse, GeminiImage, Usage};
use crate::geometry::ImageSize;
use crate::hot::HotEntry;
use crate::metrics::{CacheState, CacheTier, Counter, Histogram, Outcome};
use crate::openai::{self, ImageView};
use crate::policy::CacheMode;
use crate::request::{self, ImageRequest, Rejection, ResponseFormat};
use crate::safety::SafetyLevel;

/// What the filter keeps of the request headers (they cannot be read after the headers phase).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub content_type: Option<String>,
    pub content_length: Option<u64>,
    pub request_id: Option<String>,
    pub cache_control: Option<String>,
    /// `:authority` and `x-forwarded-proto`: the base of image URLs when `urls.base` is empty.
    pub authority: Option<String>,
    pub forwarded_proto: Option<String>,
}

/// An HTTP call-out to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpCall {
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    /// Shared: the `n` Gemini calls of a request send one body, and a cache write sends the
    /// entry that L1 keeps too.
    pub body: Rc<Vec<u8>>,
    pub timeout_ms: u64,
}

impl HttpCall {
    /// A GET of `key` at the cache service (L2).
    pub fn l2_get(l2: &L2Settings, key: &str) -> HttpCall {
        HttpCall {
            cluster: l2.cluster.clone(),
            headers: l2_headers(l2, "GET", key),
            body: Rc::new(Vec::new()),
            timeout_ms: l2.timeout_ms,
        }
    }

    /// A PUT of `value` under `key` at the cache service, kept `ttl_s` seconds.
    pub fn l2_put(l2: &L2Settings, key: &str, value: Rc<Vec<u8>>, ttl_s: u64) -> HttpCall {
        let mut headers = l2_headers(l2, "PUT", key);
        headers.push(("content-type".to_string(), "application/octet-stream".to_string()));
        headers.push(("x-cache-ttl-seconds".to_string(), ttl_s.max(1).to_string()));
        HttpCall { cluster: l2.cluster.clone(), headers, body: value, timeout_ms: l2.timeout_ms.max(1000) }
    }
}

/// The headers every cache-service call carries.
fn l2_headers(l2: &L2Settings, method: &str, key: &str) -> Vec<(String, String)> {
    let mut headers = vec![
        (":method".to_string(), method.to_string()),
        (":path".to_string(), cache::l2_path(key)),
        (":authority".to_string(), l2.authority.clone()),
    ];
    if let Some(token) = &l2.token {
        headers.push(("authorization".to_string(), format!("Bearer {token}")));
    }
    headers
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
    /// Reserve room in this worker's in-flight bounds for one request that expects up to
    /// `bytes` of Gemini answers; the answer comes back as `on_admission`.
    Admit {
        bytes: u64,
        /// The images it will generate: what the profile's images-per-minute bucket counts.
        images: u32,
    },
    /// Make `count` calls of generateContent with `body` for the `upstream` model, each
    /// expected to answer within `reserved_bytes`, all done by `deadline_ms`. The driver picks
    /// the backend and key of each attempt and retries on the next (docs/backends.md); each
    /// call's final answer comes back as `on_call_outcome(index, ..)`.
    CallGemini {
        count: u32,
        body: Rc<Vec<u8>>,
        upstream: String,
        reserved_bytes: u64,
        deadline_ms: u64,
    },
    /// Leads, follows or skips the generation in flight for this key, across workers (the
    /// driver answers with `on_flight`).
    JoinFlight {
        key: CacheKey,
        /// How long a new lease lives: the leader's deadline and a margin.
        lease_ms: u64,
    },
    /// Sends the client's own request upstream, rewritten into one `streamGenerateContent`
    /// call with this body (a streamed request); the driver picks the backend and key as for
    /// `CallGemini`, then tells `on_forwarded`.
    Forward {
        body: Rc<Vec<u8>>,
        upstream: String,
        deadline_ms: u64,
    },
    Reply(Reply),
    Log(LogLine),
    /// Look the key up in L1: the worker's hot set (answer: `on_l1_hot`), then shared data
    /// (answer: `on_l1_result`).
    LookupL1 {
        key: CacheKey,
        max_entries: u32,
        format: ResponseFormat,
        /// Whether a rendered answer from the hot set would do (not for image URLs, which
        /// are new for every answer).
        hot: bool,
    },
    /// Keep a rendered answer in the worker's hot set.
    RememberHot {
        key: String,
        format: ResponseFormat,
        entry: HotEntry,
    },
    /// Write an entry to an L1 slot: `data` first, then `meta` only if that worked.
    StoreL1 {
        meta_key: String,
        meta: Vec<u8>,
        data_key: String,
        data: Rc<Vec<u8>>,
    },
    /// Write a small value to shared data (an image URL's record).
    StoreShared {
        key: String,
        value: Rc<Vec<u8>>,
    },
    /// Keep an image URL's decoded image in the worker's hot set.
    RememberFile {
        record_key: String,
        entry: HotEntry,
    },
    /// Ask the cache service; the answer comes back as `on_l2_response`.
    CallL2(HttpCall),
    /// Store at the cache service from the root context, so that the write outlives this
    /// stream; no answer comes back to the exchange.
    WriteL2(HttpCall),
    /// Add to a counter.
    Count(Counter, u64),
    /// Record a histogram value.
    Observe(Histogram, u64),
}

impl Effect {
    /// The write of `entry` (stored under `key`, expiring at `expires_at_s`) into L1 slot
    /// `slot`.
    pub fn store_l1(slot: u32, key: &str, expires_at_s: u64, entry: Rc<Vec<u8>>) -> Effect {
        let slot = cache::l1_slot_at(slot);
        Effect::StoreL1 {
            meta_key: slot.meta_key,
            meta: cache::encode_l1_meta(key, expires_at_s),
            data_key: slot.data_key,
            data: entry,
        }
    }
}

/// Where a request is. Each phase holds what it needs, so a state that cannot happen cannot
/// be written.
enum Phase {
    /// Headers seen; the body is arriving.
    Receiving,
    /// Waiting for the L1 lookup.
    AwaitingL1(Box<Planned>),
    /// Waiting for the cache service.
    AwaitingL2(Box<Planned>),
    /// Waiting for room in the worker's in-flight bounds.
    Admitting(Box<Planned>),
    /// Waiting for the Gemini calls.
    AwaitingGemini(Box<Planned>, Calls),
    /// A miss asking to lead, follow or skip an identical request's generation in flight
    /// (`Effect::JoinFlight`).
    Joining(Box<Planned>),
    /// Following an identical request's generation in flight, until its outcome.
    Waiting(Box<Planned>),
    /// A streamed request, waiting for the driver to send it upstream (`Effect::Forward`).
    Forwarding(Box<Planned>),
    /// A streamed request upstream: Gemini's answer passes through the filter.
    Streaming(Box<Planned>, Box<streamed::Streamed>),
    /// Answered, or the client left: every later event is ignored.
    Done,
}

impl Phase {
    fn into_awaiting_l1(self) -> Result<Box<Planned>, Phase> {
        match self {
            Phase::AwaitingL1(p) => Ok(p),
            other => Err(other),
        }
    }

    fn into_awaiting_l2(self) -> Result<Box<Planned>, Phase> {
        match self {
            Phase::AwaitingL2(p) => Ok(p),
            other => Err(other),
        }
    }

    fn into_admitting(self) -> Result<Box<Planned>, Phase> {
        match self {
            Phase::Admitting(p) => Ok(p),
            other => Err(other),
        }
    }

    fn into_awaiting_gemini(self) -> Result<(Box<Planned>, Calls), Phase> {
        match self {
            Phase::AwaitingGemini(p, c) => Ok((p, c)),
            other => Err(other),
        }
    }
}

/// A valid request and what the cache does for it.
struct Planned {
    req: ImageRequest,
    /// The body of each Gemini call, built once and shared by the `n` calls: at once for a
    /// generation, for an edit only when the cache did not answer (its images are encoded
    /// into it from the request body, kept until then).
    call_body: CallBody,
    cache: CachePlan,
}

/// What the cache does for a request. No key: the cache is off, or the client said `no-store`.
#[derive(Default)]
struct CachePlan {
    key: Option<CacheKey>,
    /// Look up before calling Gemini (false with `no-cache`).
    lookup: bool,
    /// Where the L1 lookup said to store (and whether that evicts a live entry).
    l1_plan: Option<StorePlan>,
}

/// The Gemini calls in flight: one slot per call, filled as answers arrive.
struct Calls {
    outcomes: Vec<Option<CallOutcome>>,
    metas: Vec<Option<CallMeta>>,
    started_ms: u64,
}

impl Calls {
    /// Attempts made by every call, retries included.
    fn attempts(&self) -> u32 {
        self.metas.iter().flatten().map(|m| m.attempts).sum()
    }
}

/// Where a call's final answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallMeta {
    /// The index of its backend.
    pub backend: usize,
    /// Attempts it took (1 without a retry).
    pub attempts: u32,
}

enum CallBody {
    Built(Rc<Vec<u8>>),
    Edit { upload: Vec<u8>, inputs: edit::Inputs },
}

impl Planned {
    /// The Gemini call body's size, about, before it is built.
    fn call_body_len(&self) -> u64 {
        match &self.call_body {
            CallBody::Built(b) => b.len() as u64,
            // The images, the prompt, and about a kilobyte of JSON around them.
            CallBody::Edit { inputs, .. } => {
                inputs.encoded_len().saturating_add(self.req.final_prompt.len() as u64).saturating_add(1024)
            }
        }
    }

    /// The Gemini call body, built now if it was not.
    fn call_body(&mut self) -> Rc<Vec<u8>> {
        let built = match &self.call_body {
            CallBody::Built(b) => return b.clone(),
            CallBody::Edit { upload, inputs } => Rc::new(inputs.gemini_body(&self.req, upload)),
        };
        // The upload is no longer needed once its images are in the call body.
        self.call_body = CallBody::Built(built.clone());
        built
    }
}

/// What a request learned before it could be refused: for the headers and the log line.
#[derive(Default)]
struct Known {
    prompt_hash: Option<String>,
    model: Option<String>,
    safety: Option<SafetyLevel>,
}

/// Why a cache entry was not served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EntryMiss {
    /// Not a whole entry for this key, or past its TTL.
    Unreadable,
    /// From L2, and failed the checks of an untrusted answer.
    Distrusted,
}

/// `retry-after` of an `IMG_OVERLOADED` answer, in seconds.
pub const OVERLOADED_RETRY_AFTER_S: u64 = 1;

/// The most a Gemini answer of this image size is expected to take (base64 PNG), reserved in
/// the worker's in-flight bound before the call; an answer over it must find room then.
pub fn answer_estimate(image_size: Option<ImageSize>) -> u64 {
    const MIB: u64 = 1024 * 1024;
    match image_size {
        None | Some(ImageSize::K1) => 4 * MIB,
        Some(ImageSize::K2) => 12 * MIB,
        Some(ImageSize::K4) => 32 * MIB,
    }
}

/// How a finished request is reported: its log line and metrics.
#[derive(Clone, Copy)]
struct Ending<'a> {
    status: u32,
    outcome: Outcome,
    error: Option<ErrorCode>,
    planned: Option<&'a Planned>,
    calls: Option<&'a Calls>,
    upstream_status: Option<u32>,
    images: u32,
    failed_calls: u32,
    usage: Option<Usage>,
}

impl<'a> Ending<'a> {
    fn new(status: u32, outcome: Outcome, planned: Option<&'a Planned>) -> Ending<'a> {
        Ending {
            status,
            outcome,
            error: None,
            planned,
            calls: None,
            upstream_status: None,
            images: 0,
            failed_calls: 0,
            usage: None,
        }
    }
}

pub struct Exchange {
    settings: Rc<Settings>,
    head: RequestHead,
    endpoint: Endpoint,
    started_ms: u64,
    known: Known,
    cache_state: CacheState,
    phase: Phase,
    /// The profile in force as named (it may name none: then `settings` are the top level's).
    profile_name: String,
    /// What Google was paid for this request, and what a cache hit saved, in micro-dollars.
    cost_micro: u64,
    saved_micro: u64,
    /// 128 random bits for this answer's image URLs (when the gateway serves them).
    url_token: Option<String>,
    /// Coalescing (`exchange_flight.rs`): this request leads a generation others may wait for,
    /// was answered by one, and how the one it leads ended.
    flight: exchange_flight::FlightPart,
}

/// What the worker said to a request that asked to make Gemini calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Granted,
    /// The worker's (or the profile's) in-flight bounds are reached.
    Overloaded,
    /// The profile's images per minute are used up: room again in this many seconds.
    RateLimited {
        retry_after_s: u64,
    },
}

impl Exchange {
    pub fn new(settings: Rc<Settings>, endpoint: Endpoint, head: RequestHead, now_ms: u64) -> Exchange {
        let no_store = head.cache_control.as_deref().is_some_and(|c| has_directive(c, "no-store"));
        let caching = settings.cache.is_some() && settings.profile.cache != CacheMode::Off;
        let cache_state = if caching && no_store { CacheState::Bypass } else { CacheState::Miss };
        Exchange {
            head,
            endpoint,
            started_ms: now_ms,
            known: Known::default(),
            cache_state,
            phase: Phase::Receiving,
            profile_name: settings.profile.name.clone(),
            cost_micro: 0,
            saved_micro: 0,
            url_token: None,
            flight: exchange_flight::FlightPart::default(),
            settings,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// When the request began (its headers), in milliseconds.
    pub fn started_ms(&self) -> u64 {
        self.started_ms
    }

    /// Gives the exchange the random token its image URLs are named with.
    pub fn with_url_token(mut self, token: String) -> Exchange {
        self.url_token = Some(token);
        self
    }

    /// Where this request's image URLs start (`{base}/v1/images/files/{token}`), when it
    /// asked for `url` and the gateway serves them; `None`: images are inline.
    fn url_prefix(&self, req: &ImageRequest) -> Option<String> {
        let urls = self.settings.urls.as_ref()?;
        if req.response_format != ResponseFormat::Url {
            return None;
        }
        let token = self.url_token.as_deref()?;
        let base = match &urls.base {
            Some(b) => b.clone(),
            None => {
                let authority = self.head.authority.as_deref().filter(|a| {
                    !a.is_empty() && a.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
                })?;
                let scheme = match self.head.forwarded_proto.as_deref().map(str::trim) {
                    Some(p) if p.eq_ignore_ascii_case("https") => "https",
                    _ => "http",
                };
                format!("{scheme}://{authority}")
            }
        };
        Some(format!("{base}{}{token}", crate::files::FILES_PATH))
    }

    /// The record key of this answer's image URLs.
    fn url_record_key(&self) -> Option<String> {
        let token = self.url_token.as_deref()?;
        let p = &self.settings.profile;
        Some(crate::files::record_key(token, (p.cache == CacheMode::Private).then_some(p.name.as_str())))
    }

    /// The records that make an answer's URLs findable: its images are in the entry under
    /// `entry_key` until `entry_expires_s`; the URLs live `urls.ttl_seconds` but never longer.
    fn url_records(&self, entry_key: &str, images: u32, entry_expires_s: u64, now_s: u64) -> Vec<Effect> {
        let (Some(urls), Some(record_key)) = (&self.settings.urls, self.url_record_key()) else { return Vec::new() };
        let record = crate::files::Record {
            entry_key: entry_key.to_string(),
            images,
            expires_at_s: now_s.saturating_add(urls.ttl_seconds).min(entry_expires_s),
        };
        crate::files::record_writes(&self.settings, &record_key, &record, now_s)
    }

    /// Headers seen: an endpoint the profile does not allow, or a declared body over the
    /// limit, is refused before the body is read.
    pub fn on_headers(&mut self, now_ms: u64) -> Vec<Effect> {
        if !self.settings.profile.allows(self.endpoint) {
            let e = ApiError::new(
                ErrorCode::PolicyDenied,
                format!("{} is not allowed for this caller on this gateway", self.endpoint.path()),
            );
            return self.fail(e, now_ms);
        }
        match self.head.content_length {
            Some(len) if len > self.body_limit() as u64 => self.too_large(now_ms),
            _ => Vec::new(),
        }
    }

    /// The profile named for this request does not exist: 403 before the body is read.
    pub fn on_unknown_profile(&mut self, name: &str, now_ms: u64) -> Vec<Effect> {
        self.profile_name = name.chars().take(crate::policy::MAX_PROFILE_NAME + 1).collect();
        let e =
            ApiError::new(ErrorCode::PolicyDenied, "this caller's policy profile is not configured on this gateway");
        self.fail(e, now_ms)
    }

    /// The request used a method its endpoint does not answer.
    pub fn on_wrong_method(&mut self, now_ms: u64) -> Vec<Effect> {
        let method: String = self.head.method.chars().take(16).collect();
        let mut e = ApiError::new(
            ErrorCode::InvalidRequest,
            format!("{} answers {} only, not {method:?}", self.endpoint.path(), self.endpoint.method()),
        );
        e.status_override = Some(405);
        let mut effects = self.fail(e, now_ms);
        for effect in &mut effects {
            if let Effect::Reply(r) = effect {
                r.headers.push(("allow".to_string(), self.endpoint.method().to_string()));
            }
        }
        effects
    }

    /// Part of the body arrived; `buffered` bytes so far.
    pub fn on_body_progress(&mut self, buffered: usize, now_ms: u64) -> Vec<Effect> {
        match self.phase {
            Phase::Receiving if buffered > self.body_limit() => self.too_large(now_ms),
            _ => Vec::new(),
        }
    }

    fn too_large(&mut self, now_ms: u64) -> Vec<Effect> {
        let e = ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("request body is over this gateway's limit of {} bytes", self.body_limit()),
        );
        self.fail(e, now_ms)
    }

    /// The whole body is here.
    pub fn on_body(&mut self, body: impl Into<Vec<u8>>, now_ms: u64) -> Vec<Effect> {
        let body: Vec<u8> = body.into();
        if !matches!(self.phase, Phase::Receiving) {
            return Vec::new();
        }
        if body.len() > self.body_limit() {
            return self.too_large(now_ms);
        }
        let (req, call_body) = match self.read_request(body) {
            Ok(r) => r,
            Err(rejection) => {
                self.known =
                    Known { prompt_hash: rejection.prompt_hash, model: rejection.model, safety: rejection.safety };
                return self.fail(rejection.error, now_ms);
            }
        };
        self.known = Known {
            prompt_hash: Some(req.prompt_hash.clone()),
            model: Some(req.model.clone()),
            safety: Some(req.safety),
        };
        let cache = self.plan_cache(&req);
        self.look_up(Box::new(Planned { req, call_body, cache }))
    }

    /// Looks the key up, L1 first (then L2, then the miss), unless the request skips the
    /// lookup or nothing is cached.
    fn look_up(&mut self, planned: Box<Planned>) -> Vec<Effect> {
        match (&planned.cache.key, self.settings.cache.as_ref().and_then(|c| c.l1.as_ref())) {
            (Some(key), Some(l1)) if planned.cache.lookup => {
                let effect = Effect::LookupL1 {
                    key: key.clone(),
                    max_entries: l1.max_entries,
                    format: planned.req.response_format,
                    // The hot set holds JSON answers: image URLs and streams render their own.
                    hot: self.url_prefix(&planned.req).is_none() && planned.req.stream.is_none(),
                };
                self.phase = Phase::AwaitingL1(planned);
                vec![effect]
            }
            _ => self.after_l1(planned),
        }
    }

    /// The largest body this endpoint takes.
    fn body_limit(&self) -> usize {
        match self.endpoint {
            Endpoint::Generations => self.settings.limits.max_body_bytes,
            Endpoint::Edits | Endpoint::Variations => self.settings.limits.max_upload_bytes,
        }
    }

    /// The request, and the body of its Gemini calls.
    fn read_request(&self, body: Vec<u8>) -> Result<(ImageRequest, CallBody), Rejection> {
        let content_type = self.head.content_type.as_deref();
        match self.endpoint {
            Endpoint::Generations => {
                if !is_json(content_type) {
                    let got: String = content_type.unwrap_or("none").chars().take(64).collect();
                    let e = ApiError::new(
                        ErrorCode::InvalidRequest,
                        format!("content-type must be application/json, got {got:?}"),
                    );
                    return Err(Rejection { error: e, ..Rejection::new() });
                }
                let req = request::parse_request(&body, &self.settings)?;
                let spec = gemini::CallSpec {
                    prompt: &req.final_prompt,
                    ratio: req.ratio,
                    image_size: req.image_size,
                    safety: req.safety,
                    images: &[],
                    closing_text: None,
                    include_thoughts: req.wants_thoughts(),
                };
                let gemini_body = gemini::request_body(&spec);
                Ok((req, CallBody::Built(Rc::new(gemini_body))))
            }
            Endpoint::Edits | Endpoint::Variations => {
                let (req, inputs) = edit::read_edit(&body, content_type, &self.settings, self.endpoint)?;
                Ok((req, CallBody::Edit { upload: body, inputs }))
            }
        }
    }

    fn plan_cache(&self, req: &ImageRequest) -> CachePlan {
        if !self.caching() || self.cache_state == CacheState::Bypass {
            return CachePlan::default();
        }
        let cc = self.head.cache_control.as_deref().unwrap_or("");
        let profile = &self.settings.profile;
        let private_to = (profile.cache == CacheMode::Private).then_some(profile.name.as_str());
        CachePlan {
            key: Some(cache::cache_key(req, private_to)),
            lookup: !has_directive(cc, "no-cache"),
            l1_plan: None,
        }
    }

    /// L1 answered (the host looked the key up in shared data).
    pub fn on_l1_result(&mut self, read: L1Read, now_ms: u64) -> Vec<Effect> {
        let Some(mut planned) = self.take(Phase::into_awaiting_l1) else { return Vec::new() };
        match read {
            L1Read::Hit(bytes) => match self.serve_entry(&planned, &bytes, CacheTier::L1, now_ms) {
                Ok((effects, _)) => effects,
                Err(_) => self.after_l1(planned), // unreadable or expired after all: a miss
            },
            L1Read::Miss(plan) => {
                planned.cache.l1_plan = Some(plan);
                self.after_l1(planned)
            }
        }
    }

    /// The worker's hot set had the rendered answer.
    pub fn on_l1_hot(&mut self, hot: HotEntry, now_ms: u64) -> Vec<Effect> {
        let Some(planned) = self.take(Phase::into_awaiting_l1) else { return Vec::new() };
        self.serve_hit(&planned, CacheTier::L1, hot.body, hot.images, hot.usage, now_ms)
    }

    /// Takes the phase out for a transition when `pick` accepts it, leaving `Done` until the
    /// transition sets the next one. The one place where an event that does not fit the phase
    /// (a late or repeated answer, anything after `Done`) is turned away: the phase stays as
    /// it was and the event is ignored.
    fn take<T>(&mut self, pick: fn(Phase) -> Result<T, Phase>) -> Option<T> {
        match pick(std::mem::replace(&mut self.phase, Phase::Done)) {
            Ok(taken) => Some(taken),
            Err(phase) => {
                self.phase = phase;
                None
            }
        }
    }

    /// After an L1 miss (or with no L1): ask L2, or go to Gemini.
    fn after_l1(&mut self, planned: Box<Planned>) -> Vec<Effect> {
        match (&planned.cache.key, self.settings.cache.as_ref().and_then(|c| c.l2.as_ref())) {
            (Some(key), Some(l2)) if planned.cache.lookup => {
                let call = HttpCall::l2_get(l2, &key.key);
                self.phase = Phase::AwaitingL2(planned);
                vec![Effect::CallL2(call)]
            }
            _ => self.join_or_admit(planned),
        }
    }

    /// The cache service answered (or failed, or timed out): a hit is served, anything else
    /// costs only a miss.
    pub fn on_l2_response(&mut self, response: CallResponse, now_ms: u64) -> Vec<Effect> {
        let Some(planned) = self.take(Phase::into_awaiting_l2) else { return Vec::new() };
        let mut effects = Vec::new();
        match response.status {
            Some(200) => match self.serve_entry(&planned, &response.body, CacheTier::L2, now_ms) {
                Ok((mut served, created)) => {
                    // Fill L1 from L2, keeping the entry's own expiry.
                    served.extend(self.l1_store(&planned, Rc::new(response.body), created));
                    return served;
                }
                Err(EntryMiss::Unreadable) => effects.push(Effect::Count(Counter::CacheL2Errors, 1)),
                Err(EntryMiss::Distrusted) => effects.push(Effect::Count(Counter::CacheL2Rejected, 1)),
            },
            Some(404) => {}
            _ => effects.push(Effect::Count(Counter::CacheL2Errors, 1)),
        }
        effects.extend(self.join_or_admit(planned));
        effects
    }

    /// Asks for room in the worker's in-flight bounds before any Gemini call: `n` answers of
    /// up to `answer_estimate` bytes each.
    fn admit(&mut self, planned: Box<Planned>) -> Vec<Effect> {
        let mut effects = Vec::with_capacity(2);
        if self.caching() {
            let looked = planned.cache.key.is_some();
            effects.push(Effect::Count(if looked { Counter::CacheMisses } else { Counter::CacheBypass }, 1));
        }
        // The answers it expects, and the call body it holds (an edit's images, encoded).
        let bytes = u64::from(planned.req.n)
            .saturating_mul(answer_estimate(planned.req.image_size))
            .saturating_add(planned.call_body_len());
        let images = planned.req.n;
        self.phase = Phase::Admitting(planned);
        effects.push(Effect::Admit { bytes, images });
        effects
    }

    /// The worker answered the admission: call Gemini, or refuse before any call.
    pub fn on_admission(&mut self, admission: Admission, now_ms: u64) -> Vec<Effect> {
        let Some(planned) = self.take(Phase::into_admitting) else { return Vec::new() };
        let mut counted = None;
        let e = match admission {
            Admission::Granted if std::mem::take(&mut self.flight.admitting_wait) => {
                self.phase = Phase::Waiting(planned);
                return Vec::new();
            }
            Admission::Granted => return self.call_gemini(planned, now_ms),
            Admission::Overloaded => {
                let mut e = ApiError::new(
                    ErrorCode::Overloaded,
                    "this gateway worker is at its limit of requests in flight; retry after the delay in retry-after",
                );
                e.retry_after = Some(OVERLOADED_RETRY_AFTER_S);
                e
            }
            Admission::RateLimited { retry_after_s } => {
                let per_minute = self.settings.profile.images_per_minute.unwrap_or(0);
                let mut e = ApiError::new(
                    ErrorCode::RateLimited,
                    format!(
                        "this caller may generate {per_minute} images a minute on this gateway and has used them; \
                         retry after the delay in retry-after"
                    ),
                );
                e.retry_after = Some(retry_after_s);
                counted = Some(Effect::Count(Counter::RateLimited(self.profile_name.clone()), 1));
                e
            }
        };
        let ending = Ending::new(e.status(), Outcome::Error, Some(&planned));
        let mut effects = self.error_reply(e, ending, now_ms);
        effects.extend(counted);
        effects
    }

    /// Whether this request's profile uses the cache at all (`cache: off` does not).
    fn caching(&self) -> bool {
        self.settings.cache.is_some() && self.settings.profile.cache != CacheMode::Off
    }

    /// What one image of this request costs at the profile's prices, in micro-dollars.
    fn price_per_image(&self, req: &ImageRequest) -> u64 {
        self.settings.families.get(req.variant).map_or(0, |f| self.settings.pricing.per_image(&f.name, req.image_size))
    }

    fn call_gemini(&mut self, mut planned: Box<Planned>, now_ms: u64) -> Vec<Effect> {
        let body = planned.call_body();
        if planned.req.stream.is_some() {
            let effect = Effect::Forward {
                body,
                upstream: planned.req.upstream.clone(),
                deadline_ms: self.started_ms.saturating_add(self.settings.gemini.timeout_ms),
            };
            self.phase = Phase::Forwarding(planned);
            return vec![effect];
        }
        let req = &planned.req;
        let count = req.n;
        let effect = Effect::CallGemini {
            count,
            body,
            upstream: req.upstream.clone(),
            reserved_bytes: answer_estimate(req.image_size),
            deadline_ms: self.started_ms.saturating_add(self.settings.gemini.timeout_ms),
        };
        let calls =
            Calls { outcomes: vec![None; count as usize], metas: vec![None; count as usize], started_ms: now_ms };
        self.phase = Phase::AwaitingGemini(planned, calls);
        vec![effect]
    }

    /// Call `index` is answered: its final outcome after every attempt, and where it went.
    pub fn on_call_outcome(&mut self, index: u32, outcome: CallOutcome, meta: CallMeta, now_ms: u64) -> Vec<Effect> {
        let Phase::AwaitingGemini(_, calls) = &mut self.phase else { return Vec::new() };
        match (calls.outcomes.get_mut(index as usize), calls.metas.get_mut(index as usize)) {
            (Some(slot @ None), Some(m)) => {
                *slot = Some(outcome);
                *m = Some(meta);
            }
            _ => return Vec::new(), // unknown or repeated: ignore
        }
        self.record(now_ms)
    }

    /// Call `index` answered on its first attempt, on the first backend: for tests that feed
    /// answers straight to the exchange (the driver reads answers and retries itself, then
    /// calls `on_call_outcome`).
    #[cfg(test)]
    pub fn on_call_response(&mut self, index: u32, response: CallResponse, now_ms: u64) -> Vec<Effect> {
        if !matches!(self.phase, Phase::AwaitingGemini(..)) {
            return Vec::new();
        }
        let elapsed = response.elapsed_ms;
        let meta = CallMeta { backend: 0, attempts: 1 };
        let mut effects = self.on_call_outcome(index, gemini::read_call(response), meta, now_ms);
        effects.push(Effect::Observe(Histogram::UpstreamLatencyMs, elapsed));
        effects
    }

    /// Finishes once every call has its outcome.
    fn record(&mut self, now_ms: u64) -> Vec<Effect> {
        let Phase::AwaitingGemini(_, calls) = &self.phase else { return Vec::new() };
        if calls.outcomes.iter().any(Option::is_none) {
            return Vec::new();
        }
        let Some((planned, calls)) = self.take(Phase::into_awaiting_gemini) else { return Vec::new() };
        self.finish(&planned, &calls, now_ms)
    }

    /// Every call answered: the images that came, or the most telling error.
    fn finish(&mut self, planned: &Planned, calls: &Calls, now_ms: u64) -> Vec<Effect> {
        let mut usage: Option<Usage> = None;
        for u in calls.outcomes.iter().flatten().filter_map(|c| c.usage) {
            usage.get_or_insert_with(Usage::default).add(u);
        }
        let images: Vec<ImageView> =
            calls.outcomes.iter().flatten().filter_map(|c| c.result.as_ref().ok()).map(GeminiImage::view).collect();
        let failed = (calls.outcomes.len() - images.len()) as u32;
        if images.is_empty() {
            let chosen = calls
                .outcomes
                .iter()
                .flatten()
                .filter_map(|c| c.result.as_ref().err().map(|e| (e, c.upstream_status)))
                .min_by_key(|(e, _)| e.code.precedence());
            let (e, status) = match chosen {
                Some((e, s)) => (e.clone(), Some(s)),
                None => (ApiError::new(ErrorCode::InternalError, "no Gemini call was made"), None),
            };
            let mut ending = Ending::new(e.status(), Outcome::Error, Some(planned));
            ending.calls = Some(calls);
            ending.upstream_status = status;
            ending.failed_calls = failed;
            return self.error_reply(e, ending, now_ms);
        }
        let created = now_ms / 1000;
        let req = &planned.req;
        // Only complete successes are stored in the cache.
        let (stores, in_cache) =
            if failed == 0 { self.store(planned, &images, usage, created) } else { (Vec::new(), false) };
        let in_l1 = stores.iter().any(|e| matches!(e, Effect::StoreL1 { .. }));
        self.flight.led(if in_l1 && in_cache {
            exchange_flight::FlightEnd::Stored
        } else {
            exchange_flight::FlightEnd::Unshared
        });
        // Image URLs point at the cache entry, or at an entry of their own when the answer is
        // not cached; when neither tier can hold one, the images go inline after all.
        let prefix = self.url_prefix(req);
        let mut url_writes = Vec::new();
        let mut rendering = openai::Rendering::inline(req.response_format);
        if let (Some(prefix), Some(c)) = (&prefix, &self.settings.cache) {
            let count = images.len() as u32;
            let held = match (&planned.cache.key, in_cache) {
                (Some(key), true) => {
                    Some(self.url_records(&key.key, count, cache::expires_at(created, c.ttl_seconds), created))
                }
                _ => self.hold_for_urls(&images, usage, created),
            };
            if let Some(writes) = held {
                url_writes = writes;
                rendering = openai::Rendering::Files(prefix);
            }
        }
        let body = Rc::new(openai::images_body(created, &images, rendering, usage));
        self.cost_micro = self.price_per_image(req).saturating_mul(images.len() as u64);
        let mut headers = self.common_headers();
        if failed > 0 {
            headers.push(("x-images-failed".to_string(), failed.to_string()));
        }
        let outcome = if failed > 0 { Outcome::Partial } else { Outcome::Success };
        let mut ending = Ending::new(200, outcome, Some(planned));
        ending.calls = Some(calls);
        ending.upstream_status = Some(200);
        ending.images = images.len() as u32;
        ending.failed_calls = failed;
        ending.usage = usage;
        let mut effects = vec![Effect::Reply(Reply { status: 200, headers, body: body.clone() })];
        effects.extend(self.report(&ending, now_ms));
        effects.push(Effect::Count(Counter::Images, u64::from(ending.images)));
        if failed == 0 && !matches!(rendering, openai::Rendering::Files(_)) {
            effects.extend(self.remember(planned, &body, ending.images, usage, created));
        }
        effects.extend(stores);
        effects.extend(url_writes);
        effects
    }

    /// Keeps an answer that is not in the cache for its image URLs alone, under a key of the
    /// URLs' own, for `urls.ttl_seconds`: the writes (entry and records), or `None` when no
    /// tier can hold it (L1 off or the entry over its bound, and no L2).
    fn hold_for_urls(&self, images: &[ImageView], usage: Option<Usage>, created: u64) -> Option<Vec<Effect>> {
        let (Some(c), Some(urls), Some(token)) = (&self.settings.cache, &self.settings.urls, &self.url_token) else {
            return None;
        };
        let key = crate::files::own_entry_key(token);
        let cache_key = CacheKey::from_key(&key)?;
        let entry = Rc::new(cache::encode_entry(&key, created, usage, images));
        let expires = created.saturating_add(urls.ttl_seconds);
        let mut writes = Vec::new();
        if let Some(l1) = c.l1.as_ref().filter(|l1| entry.len() <= l1.max_entry_bytes) {
            let slot = cache::l1_slots(&cache_key, l1.max_entries).first().map_or(0, |s| s.index);
            writes.push(Effect::store_l1(slot, &key, expires, entry.clone()));
        }
        if let Some(l2) = &c.l2 {
            writes.push(Effect::WriteL2(HttpCall::l2_put(l2, &key, entry, urls.ttl_seconds)));
        }
        if writes.is_empty() {
            return None;
        }
        writes.extend(self.url_records(&key, images.len() as u32, expires, created));
        Some(writes)
    }

    /// Answers from a cache entry, with the entry's creation time. L1 entries were written by
    /// this filter: the magic, the lengths and the key inside catch garbage, truncation and
    /// mix-ups without scanning megabytes of base64 again. L2 entries come from outside and are
    /// checked as fully as a Gemini answer. Either way an entry past its TTL is a miss.
    fn serve_entry(
        &mut self,
        planned: &Planned,
        bytes: &[u8],
        tier: CacheTier,
        now_ms: u64,
    ) -> Result<(Vec<Effect>, u64), EntryMiss> {
        let (Some(key), Some(c)) = (&planned.cache.key, &self.settings.cache) else {
            return Err(EntryMiss::Unreadable);
        };
        let entry = cache::decode_entry(bytes, &key.key).ok_or(EntryMiss::Unreadable)?;
        let now_s = now_ms / 1000;
        match tier {
            CacheTier::L1 if cache::expires_at(entry.created, c.ttl_seconds) <= now_s => {
                return Err(EntryMiss::Unreadable)
            }
            CacheTier::L1 => {}
            CacheTier::L2 => cache::verify_untrusted(&entry, planned.req.n, now_s, c.ttl_seconds)
                .map_err(|_| EntryMiss::Distrusted)?,
        }
        if let Some(ask) = planned.req.stream {
            // A stream gets the cached image as its one completed event.
            let body = match entry.images.first() {
                Some(image) => crate::stream::cached_completed_event(&self.event_meta(ask, now_ms), image, entry.usage),
                None => return Err(EntryMiss::Unreadable),
            };
            let images = entry.images.len() as u32;
            let effects = self.serve_hit(planned, tier, Rc::new(body), images, entry.usage, now_ms);
            return Ok((effects, entry.created));
        }
        let entry_expires = cache::expires_at(entry.created, c.ttl_seconds);
        let prefix = self.url_prefix(&planned.req);
        let rendering = match &prefix {
            Some(p) => openai::Rendering::Files(p),
            None => openai::Rendering::inline(planned.req.response_format),
        };
        let body = Rc::new(openai::images_body(entry.created, &entry.images, rendering, entry.usage));
        let images = entry.images.len() as u32;
        // Image URLs are new for every answer: neither kept in the hot set nor served from it.
        let (remember, records) = match prefix {
            None => (self.remember(planned, &body, images, entry.usage, entry.created), Vec::new()),
            Some(_) => (None, self.url_records(&key.key, images, entry_expires, now_s)),
        };
        let mut effects = self.serve_hit(planned, tier, body, images, entry.usage, now_ms);
        effects.extend(remember);
        effects.extend(records);
        Ok((effects, entry.created))
    }

    /// The reply, log line and counters of a cache hit whose answer is rendered.
    fn serve_hit(
        &mut self,
        planned: &Planned,
        tier: CacheTier,
        body: Rc<Vec<u8>>,
        images: u32,
        usage: Option<Usage>,
        now_ms: u64,
    ) -> Vec<Effect> {
        self.cache_state = if self.flight.coalesced { CacheState::Coalesced } else { CacheState::Hit(tier) };
        self.saved_micro = self.price_per_image(&planned.req).saturating_mul(u64::from(images));
        let mut headers = self.common_headers();
        if planned.req.stream.is_some() {
            streamed::event_stream_headers(&mut headers);
        }
        let mut ending = Ending::new(200, Outcome::Success, Some(planned));
        ending.images = images;
        ending.usage = usage;
        let mut effects = vec![Effect::Reply(Reply { status: 200, headers, body })];
        effects.extend(self.report(&ending, now_ms));
        effects
            .push(Effect::Count(if self.flight.coalesced { Counter::Coalesced } else { Counter::CacheHits(tier) }, 1));
        effects.push(Effect::Count(Counter::Images, u64::from(images)));
        effects
    }

    /// The hot-set effect for an answer just rendered, when L1 is on and the answer fits its
    /// per-entry bound (a copy inside a worker is L1 too). It expires with the entry.
    fn remember(
        &self,
        planned: &Planned,
        body: &Rc<Vec<u8>>,
        images: u32,
        usage: Option<Usage>,
        created: u64,
    ) -> Option<Effect> {
        let c = self.settings.cache.as_ref()?;
        let l1 = c.l1.as_ref()?;
        let key = planned.cache.key.as_ref()?;
        if body.len() > l1.max_entry_bytes {
            return None;
        }
        Some(Effect::RememberHot {
            key: key.key.clone(),
            format: planned.req.response_format,
            entry: HotEntry {
                body: body.clone(),
                content_type: "application/json",
                images,
                usage,
                expires_at_s: cache::expires_at(created, c.ttl_seconds),
            },
        })
    }

    /// The L1 write for an entry made at `created`, if L1 is on and the entry fits.
    fn l1_store(&self, planned: &Planned, entry: Rc<Vec<u8>>, created: u64) -> Vec<Effect> {
        let (Some(c), Some(key)) = (&self.settings.cache, &planned.cache.key) else { return Vec::new() };
        let Some(l1) = &c.l1 else { return Vec::new() };
        if entry.len() > l1.max_entry_bytes {
            return vec![Effect::Count(Counter::CacheL1TooLarge, 1)];
        }
        let plan = planned.cache.l1_plan.unwrap_or(StorePlan {
            slot: cache::l1_slots(key, l1.max_entries).first().map_or(0, |s| s.index),
            evicts: false,
        });
        let expires = cache::expires_at(created, c.ttl_seconds);
        let mut effects = vec![
            Effect::store_l1(plan.slot, &key.key, expires, entry),
            Effect::Count(Counter::CacheStores(CacheTier::L1), 1),
        ];
        if plan.evicts {
            effects.push(Effect::Count(Counter::CacheL1Evictions, 1));
        }
        effects
    }

    /// The writes for a complete success: L1 now, L2 from the root context; and whether a
    /// tier holds the entry (L2, or L1 when it fits).
    fn store(
        &self,
        planned: &Planned,
        images: &[ImageView],
        usage: Option<Usage>,
        created: u64,
    ) -> (Vec<Effect>, bool) {
        let (Some(key), Some(c)) = (&planned.cache.key, &self.settings.cache) else { return (Vec::new(), false) };
        if c.l1.is_none() && c.l2.is_none() {
            return (Vec::new(), false);
        }
        let entry = Rc::new(cache::encode_entry(&key.key, created, usage, images));
        let in_l1 = c.l1.as_ref().is_some_and(|l1| entry.len() <= l1.max_entry_bytes);
        let mut effects = self.l1_store(planned, entry.clone(), created);
        if let Some(l2) = &c.l2 {
            effects.push(Effect::WriteL2(HttpCall::l2_put(l2, &key.key, entry, c.ttl_seconds)));
            effects.push(Effect::Count(Counter::CacheStores(CacheTier::L2), 1));
        }
        (effects, in_l1 || c.l2.is_some())
    }

    /// The client went away before the answer: one log line, no reply.
    pub fn on_abandoned(&mut self, now_ms: u64) -> Vec<Effect> {
        let (planned, calls) = match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Done => return Vec::new(),
            Phase::Receiving => (None, None),
            Phase::AwaitingL1(p) | Phase::AwaitingL2(p) | Phase::Admitting(p) => (Some(p), None),
            Phase::AwaitingGemini(p, c) => (Some(p), Some(c)),
            Phase::Forwarding(p) | Phase::Joining(p) | Phase::Waiting(p) => (Some(p), None),
            Phase::Streaming(p, s) => return self.stream_cut(p, s, now_ms),
        };
        let mut ending = Ending::new(499, Outcome::ClientClosed, planned.as_deref());
        ending.calls = calls.as_ref();
        self.report(&ending, now_ms)
    }

    /// Refuses the request while its body is still arriving or being read.
    fn fail(&mut self, e: ApiError, now_ms: u64) -> Vec<Effect> {
        if !matches!(self.phase, Phase::Receiving) {
            return Vec::new();
        }
        let ending = Ending::new(e.status(), Outcome::Error, None);
        self.error_reply(e, ending, now_ms)
    }

    /// The error reply, its log line and counters.
    fn error_reply(&mut self, e: ApiError, ending: Ending, now_ms: u64) -> Vec<Effect> {
        let body = Rc::new(openai::error_body(&e));
        // Only Gemini's verdict is shared with those waiting; a refusal of this worker's or
        // profile's own (overloaded, an answer too large to hold, rate limited) is not.
        self.flight.led(match e.code {
            ErrorCode::Overloaded | ErrorCode::RateLimited => exchange_flight::FlightEnd::Abandoned,
            _ => exchange_flight::FlightEnd::Failed {
                status: ending.status,
                retry_after_s: e.retry_after,
                body: body.to_vec(),
            },
        });
        let mut effects = self.error_answer(e.code, e.retry_after, body, ending, now_ms);
        if let (ErrorCode::SafetyBlocked, Some(level)) = (e.code, self.known.safety) {
            effects.push(Effect::Count(Counter::SafetyBlocks(level), 1));
        }
        effects
    }

    /// An error answer with this body: its headers, the reply, the log line and the count.
    fn error_answer(
        &mut self,
        code: ErrorCode,
        retry_after_s: Option<u64>,
        body: Rc<Vec<u8>>,
        mut ending: Ending,
        now_ms: u64,
    ) -> Vec<Effect> {
        let mut headers = self.common_headers();
        if !code.should_retry() {
            headers.push(("x-should-retry".to_string(), "false".to_string()));
        }
        if let Some(secs) = retry_after_s {
            headers.push(("retry-after".to_string(), secs.to_string()));
        }
        ending.error = Some(code);
        let mut effects = vec![Effect::Reply(Reply { status: ending.status, headers, body })];
        effects.extend(self.report(&ending, now_ms));
        effects.push(Effect::Count(Counter::Errors(code), 1));
        effects
    }

    /// The log line, and the counters and histogram every finished request updates.
    fn report(&mut self, ending: &Ending, now_ms: u64) -> Vec<Effect> {
        self.phase = Phase::Done;
        // A leader whose client left goes on for those waiting on it; its own line says the
        // client closed.
        let mut ending = *ending;
        if self.flight.client_gone {
            (ending.status, ending.outcome) = (499, Outcome::ClientClosed);
        }
        let ending = &ending;
        let level = match (ending.error.map(ErrorCode::category), ending.outcome) {
            (Some(Category::UserError), _) | (None, Outcome::ClientClosed) => LogLevel::Warn,
            (Some(_), _) => LogLevel::Error,
            (None, _) => LogLevel::Info,
        };
        let latency = now_ms.saturating_sub(self.started_ms);
        let mut effects = vec![
            Effect::Log(LogLine { level, json: self.log_record(ending, now_ms).to_json() }),
            Effect::Count(Counter::Requests(ending.outcome), 1),
            Effect::Observe(Histogram::RequestLatencyMs, latency),
        ];
        if let Some(p) = ending.planned {
            effects.push(Effect::Count(Counter::ModelRequests(p.req.variant_name.clone()), 1));
            effects.push(Effect::Count(Counter::SafetyApplied(p.req.safety), 1));
        }
        if let Some(calls) = ending.calls {
            effects.push(Effect::Count(Counter::UpstreamCalls, u64::from(calls.attempts())));
        }
        // Per-profile series exist only for configured profiles.
        if self.settings.profile.name == self.profile_name {
            let p = &self.profile_name;
            effects.push(Effect::Count(Counter::ProfileRequests(p.clone()), 1));
            if self.cost_micro > 0 {
                effects.push(Effect::Count(Counter::CostMicroUsd(p.clone()), self.cost_micro));
            }
            if self.saved_micro > 0 {
                effects.push(Effect::Count(Counter::SavedMicroUsd(p.clone()), self.saved_micro));
            }
        }
        effects
    }

    fn common_headers(&self) -> Vec<(String, String)> {
        let mut h = vec![
            ("content-type".to_string(), "application/json".to_string()),
            ("x-image-cache".to_string(), self.cache_state.as_str().to_string()),
            ("x-image-cost-usd".to_string(), crate::policy::usd(self.cost_micro)),
        ];
        if let Some(p) = &self.known.prompt_hash {
            h.push(("x-image-prompt-hash".to_string(), p.clone()));
        }
        if let Some(s) = self.known.safety {
            h.push(("x-image-safety".to_string(), s.as_str().to_string()));
        }
        h
    }

    fn log_record(&self, ending: &Ending, now_ms: u64) -> LogRecord {
        let req = ending.planned.map(|p| &p.req);
        LogRecord {
            endpoint: self.endpoint.as_str(),
            outcome: ending.outcome,
            status: ending.status,
            error: ending.error,
            model: self.known.model.clone(),
            variant: req.map(|r| r.variant_name.clone()),
            input_images: req.filter(|_| self.endpoint != Endpoint::Generations).map(|r| r.inputs.images.len() as u32),
            n: req.map(|r| r.n),
            aspect_ratio: req.and_then(|r| r.ratio).map(|r| r.as_str()),
            image_size: req.and_then(|r| r.image_size).map(|s| s.as_str()),
            quality: req.and_then(|r| r.quality).map(|q| q.as_str()),
            style: req.and_then(|r| r.style).map(|s| s.as_str()),
            safety: self.known.safety.map(|s| s.as_str()),
            cache: self.cache_state,
            latency_ms: now_ms.saturating_sub(self.started_ms),
            upstream_latency_ms: ending.calls.map(|c| now_ms.saturating_sub(c.started_ms)),
            backend: ending
                .calls
                .and_then(|c| c.metas.iter().flatten().next())
                .and_then(|m| self.settings.backends.list.get(m.backend))
                .map(|b| b.name.clone()),
            attempts: ending.calls.map(Calls::attempts),
            upstream_status: ending.upstream_status,
            prompt_hash: self.known.prompt_hash.clone(),
            request_id: self.head.request_id.clone(),
            images: ending.images,
            failed_calls: ending.failed_calls,
            usage: ending.usage,
            profile: self.profile_name.clone(),
            cost_micro: self.cost_micro,
            saved_micro: self.saved_micro,
        }
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

#[path = "exchange_flight.rs"]
mod exchange_flight;
pub use exchange_flight::{FlightEnd, FlightNews, FlightRole};

#[path = "exchange_stream.rs"]
mod streamed;
pub use streamed::{StreamCut, StreamHead};

#[cfg(test)]
#[path = "exchange_tests.rs"]
mod tests;
