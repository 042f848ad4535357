//! The one effect driver: what the filter does with each host callback, written once against a
//! small `Host` trait. Production implements `Host` over proxy-wasm (`src/host/`), the tests
//! over memory (`driver_tests.rs`), so every decision here runs under `cargo test`: which
//! requests are ours, when to pause, how the exchange's effects become host calls, what a
//! cache write's answer means.
//!
//! `Worker` is one VM's state (each Envoy worker thread has its own VM): the hot set and the
//! queue of cache writes that the root context sends on its tick. `StreamDriver` is one HTTP
//! stream; `WorkerDriver` is the root context.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use crate::access_log::LogLevel;
use crate::backends::{self, Attempts, Backends, CoolReason, Cooldown, Credential, KeyRef, Next, Pick, Token};
use crate::cache;
use crate::config::{ConfigError, Settings};
use crate::endpoint::Endpoint;
use crate::error::{ApiError, ErrorCode};
use crate::exchange::CallMeta;
use crate::exchange::{Admission, Effect, Exchange, HttpCall, Reply, RequestHead};
use crate::files::{self, FileFetch};
use crate::gemini::CallResponse;
use crate::gemini::{self, CallOutcome};
use crate::hot::HotSet;
use crate::metrics::{AttemptOutcome, Counter, Gauge, Histogram};
use crate::policy::{self, Bucket, Profile};

/// What the filter can ask of Envoy. Each method is one host call; none may panic.
pub trait Host {
    fn now_ms(&self) -> u64;
    /// A request header; only readable during the headers callback.
    fn request_header(&self, name: &str) -> Option<String>;
    /// Fills `buf` from the host's CSPRNG (WASI `random_get`); false when it could not.
    fn random(&mut self, buf: &mut [u8]) -> bool;
    /// A stream property (Envoy attribute) by path, such as route or dynamic metadata; only
    /// read during the headers callback. `None` when absent.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// The buffered request body, up to `size` bytes.
    fn request_body(&self, size: usize) -> Vec<u8>;
    /// A header of the call-out answer being delivered.
    fn call_response_header(&self, name: &str) -> Option<String>;
    /// The body of the call-out answer being delivered, up to `size` bytes.
    fn call_response_body(&self, size: usize) -> Vec<u8>;
    /// Starts a call-out; its token, or why the host refused it.
    fn dispatch(&mut self, call: &HttpCall) -> Result<u32, String>;
    /// Sends the local reply; false when the host refused it.
    fn send_reply(&mut self, reply: &Reply) -> bool;
    fn shared_get(&self, key: &str) -> Option<Vec<u8>>;
    /// False when the host refused the write.
    fn shared_set(&mut self, key: &str, value: &[u8]) -> bool;
    /// A shared-data value with its version, for a compare-and-swap.
    fn shared_get_cas(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Writes only if the value is still at version `cas` (`None`: whatever it is); false when
    /// it changed meanwhile or the host refused.
    fn shared_set_cas(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool;
    /// Rewrites the request on its way upstream (a streamed request, held since its headers):
    /// every client header but the pseudo-headers and tracing ones goes, `set` is set, and the
    /// buffered body (`body_len` bytes) becomes `body`. False when the host refused a part.
    fn forward_request(&mut self, set: &[(String, String)], body_len: usize, body: &[u8]) -> bool;
    /// Lets a held request go on (after `forward_request` outside a request callback).
    fn resume_request(&mut self) -> bool;
    /// Asks for the root's tick as soon as possible (coalescing: the root sends a leader's
    /// calls and looks at followers' leases).
    fn wake_root(&mut self);
    /// A response header; readable during the response callbacks.
    fn response_header(&self, name: &str) -> Option<String>;
    /// Sets (or with `None` removes) a response header, while the headers are not yet sent.
    fn set_response_header(&mut self, name: &str, value: Option<&str>) -> bool;
    /// The response body buffered so far (the current piece, or all of it when held), up to
    /// `size` bytes.
    fn response_body(&self, size: usize) -> Vec<u8>;
    /// Replaces the `len` bytes of response body the current callback holds with `body`.
    fn set_response_body(&mut self, len: usize, body: &[u8]) -> bool;
    /// Resets the response: the client sees a cut stream.
    fn reset_response(&mut self);
    fn log(&mut self, level: LogLevel, message: &str);
    fn count(&mut self, counter: &Counter, by: u64);
    fn observe(&mut self, histogram: Histogram, value: u64);
    fn gauge(&mut self, gauge: &Gauge, value: u64);
}

/// What to tell Envoy at the end of a request callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    Pause,
}

/// Cache writes waiting beyond this are dropped (and counted as L2 errors).
pub const MAX_QUEUED_WRITES: usize = 256;

/// What one worker holds for requests in flight, against `limits.max_inflight_requests` and
/// `limits.max_inflight_bytes` (docs/reliability.md, "Overload").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    pub max_requests: u32,
    pub max_bytes: u64,
    pub requests: u32,
    pub bytes: u64,
}

impl Budget {
    /// Room for one more request expecting `bytes`. A worker that holds nothing always admits
    /// one request, so that a request larger than the whole bound is served alone rather than
    /// never.
    fn admit(&mut self, bytes: u64) -> bool {
        let idle = self.requests == 0;
        if !idle && (self.requests >= self.max_requests || self.bytes.saturating_add(bytes) > self.max_bytes) {
            return false;
        }
        self.requests += 1;
        self.bytes = self.bytes.saturating_add(bytes);
        true
    }

    /// Room for `extra` bytes more for a request already admitted (an answer larger than was
    /// reserved for it).
    fn grow(&mut self, extra: u64) -> bool {
        if self.bytes.saturating_add(extra) > self.max_bytes {
            return false;
        }
        self.bytes += extra;
        true
    }

    fn release(&mut self, bytes: u64) {
        self.requests = self.requests.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
    }
}

/// One VM's state, shared by its root context and its streams.
pub struct Worker {
    pub hot: HotSet,
    pub budget: Budget,
    /// The in-flight bounds of profiles that set their own, by profile name.
    pub profile_budgets: BTreeMap<String, Budget>,
    /// Per backend, the key whose turn is next (keys take turns within this worker).
    turns: Vec<usize>,
    writes: VecDeque<HttpCall>,
    writes_in_flight: Vec<u32>,
}

impl Worker {
    pub fn new(hot_bytes: usize, max_requests: u32, max_bytes: u64) -> Worker {
        Worker {
            hot: HotSet::new(hot_bytes),
            budget: Budget { max_requests, max_bytes, ..Budget::default() },
            profile_budgets: BTreeMap::new(),
            turns: Vec::new(),
            writes: VecDeque::new(),
            writes_in_flight: Vec::new(),
        }
    }

    /// Room for one more request of `profile` expecting `bytes`: within the worker's bounds,
    /// and the profile's own when it sets them.
    fn admit(&mut self, profile: &Profile, bytes: u64) -> bool {
        if !self.budget.admit(bytes) {
            return false;
        }
        let Some((max_requests, max_bytes)) = profile.inflight else { return true };
        let own = self.profile_budgets.entry(profile.name.clone()).or_insert(Budget {
            max_requests,
            max_bytes,
            ..Budget::default()
        });
        if own.admit(bytes) {
            return true;
        }
        self.budget.release(bytes);
        false
    }

    fn grow(&mut self, profile: &Profile, extra: u64) -> bool {
        let own = profile.inflight.and_then(|_| self.profile_budgets.get_mut(&profile.name));
        match own {
            Some(own) => {
                if !own.grow(extra) {
                    return false;
                }
                if self.budget.grow(extra) {
                    return true;
                }
                own.bytes = own.bytes.saturating_sub(extra);
                false
            }
            None => self.budget.grow(extra),
        }
    }

    fn release(&mut self, profile: &Profile, bytes: u64) {
        self.budget.release(bytes);
        if let Some(own) = profile.inflight.and_then(|_| self.profile_budgets.get_mut(&profile.name)) {
            own.release(bytes);
        }
    }

    /// Queues a cache write for the root's next tick; false when the queue is full.
    fn queue_write(&mut self, call: HttpCall) -> bool {
        if self.writes.len() >= MAX_QUEUED_WRITES {
            return false;
        }
        self.writes.push_back(call);
        true
    }

    pub fn queued_writes(&self) -> usize {
        self.writes.len()
    }
}

/// The root context: configuration, and the cache writes that must outlive a stream (a call-out
/// dispatched from a stream dies with it).
pub struct WorkerDriver {
    settings: Option<Rc<Settings>>,
    worker: Rc<RefCell<Worker>>,
    /// Metadata token fetches this worker has in flight: call-out token and backend.
    token_fetches: Vec<(u32, usize)>,
    /// Per backend: when this worker may try a failed token fetch again, and the delay after
    /// the next failure.
    token_backoff: Vec<(u64, u64)>,
    /// Per backend: when this worker last logged a token failure (at most one line in 30 s).
    token_warned_ms: Vec<u64>,
}

/// How often the root context sends queued cache writes, when L2 is on.
pub const WRITE_TICK_MS: u64 = 50;
/// How often the root context looks after metadata tokens, when a backend uses them.
pub const TOKEN_TICK_MS: u64 = 1000;
/// A token fetch that fails is tried again after this, doubling up to `TOKEN_BACKOFF_MAX_MS`.
const TOKEN_BACKOFF_MS: u64 = 1000;
const TOKEN_BACKOFF_MAX_MS: u64 = 60_000;
/// How long one worker's claim to fetch a token keeps the others from fetching too.
const TOKEN_LEASE_MS: u64 = 15_000;

impl Default for WorkerDriver {
    fn default() -> Self {
        WorkerDriver {
            settings: None,
            worker: Rc::new(RefCell::new(Worker::new(0, 0, 0))),
            token_fetches: Vec::new(),
            token_backoff: Vec::new(),
            token_warned_ms: Vec::new(),
        }
    }
}

impl WorkerDriver {
    /// Reads the plugin configuration; an error refuses it (Envoy then rejects the config), and
    /// the log says why. On success, returns the tick period the root needs: 50 ms with an L2
    /// to write to, 1 s with a metadata token to look after, none otherwise.
    pub fn configure(
        &mut self,
        host: &mut dyn Host,
        config: &[u8],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<u64>, ConfigError> {
        match Settings::from_json(config, env) {
            Ok(settings) => {
                for w in &settings.warnings {
                    host.log(LogLevel::Warn, &format!("gemini-image-filter: {w}"));
                }
                host.log(LogLevel::Info, &format!("gemini-image-filter: configured ({})", settings.summary()));
                let l1 = settings.cache.as_ref().and_then(|c| c.l1.as_ref());
                let writes = settings.cache.as_ref().and_then(|c| c.l2.as_ref()).map(|_| WRITE_TICK_MS);
                let tokens = metadata_backends(&settings).next().map(|_| TOKEN_TICK_MS);
                let tick = match (writes, tokens) {
                    (Some(w), Some(t)) => Some(w.min(t)),
                    (w, t) => w.or(t),
                };
                let limits = &settings.limits;
                let mut worker = Worker::new(
                    l1.map_or(0, |l1| l1.hot_bytes),
                    limits.max_inflight_requests,
                    limits.max_inflight_bytes,
                );
                let count = settings.backends.list.len();
                worker.turns = vec![0; count];
                self.worker = Rc::new(RefCell::new(worker));
                self.token_backoff = vec![(0, TOKEN_BACKOFF_MS); count];
                self.token_warned_ms = vec![0; count];
                if settings.cache.as_ref().is_some_and(|c| c.coalesce) {
                    seed_flight_slots(host);
                }
                for (b, ..) in metadata_backends(&settings) {
                    create_if_absent(host, &format!("{}.lease", backends::token_key(&settings.backends, b)), b"0");
                }
                self.settings = Some(Rc::new(settings));
                Ok(tick)
            }
            Err(e) => {
                host.log(
                    LogLevel::Error,
                    &format!("gemini-image-filter: invalid configuration, refusing to start: {e}"),
                );
                Err(e)
            }
        }
    }

    /// The configuration in force, once one was accepted.
    pub fn settings(&self) -> Option<&Rc<Settings>> {
        self.settings.as_ref()
    }

    /// A driver for a new HTTP stream; `None` before a configuration was accepted.
    pub fn new_stream(&self) -> Option<StreamDriver> {
        Some(StreamDriver::new(self.settings.clone()?, self.worker.clone()))
    }

    /// Sends the queued cache writes, and fetches metadata tokens that are missing or due.
    pub fn on_tick(&mut self, host: &mut dyn Host) {
        if let Ok(mut worker) = self.worker.try_borrow_mut() {
            while let Some(call) = worker.writes.pop_front() {
                match host.dispatch(&call) {
                    Ok(token) => worker.writes_in_flight.push(token),
                    Err(_) => host.count(&Counter::CacheL2Errors, 1),
                }
            }
        }
        self.look_after_tokens(host);
    }

    /// For each backend that authenticates with the metadata server: the token's age as a
    /// gauge, and a fetch when there is no token or it is due for refresh. One worker fetches
    /// at a time (a lease in shared data, taken by compare-and-swap); the token goes into
    /// shared data for every worker.
    fn look_after_tokens(&mut self, host: &mut dyn Host) {
        let Some(settings) = self.settings.clone() else { return };
        let now = host.now_ms();
        for (b, name, cluster, authority) in metadata_backends(&settings) {
            let token = read_token(host, &settings.backends, b);
            let age = token.as_ref().map_or(0, |t| now.saturating_sub(t.fetched_at_ms) / 1000);
            host.gauge(&Gauge::TokenAgeSeconds(name.to_string()), age);
            let due = token.as_ref().is_none_or(|t| t.refresh_due(now));
            let fetching = self.token_fetches.iter().any(|(_, x)| *x == b);
            let backoff_until = self.token_backoff.get(b).map_or(0, |(until, _)| *until);
            if !due || fetching || now < backoff_until {
                continue;
            }
            let lease_key = format!("{}.lease", backends::token_key(&settings.backends, b));
            let (lease, cas) = host.shared_get_cas(&lease_key);
            let held_until = lease.and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u64>().ok()).unwrap_or(0);
            if held_until > now || !host.shared_set_cas(&lease_key, (now + TOKEN_LEASE_MS).to_string().as_bytes(), cas)
            {
                continue; // another worker is fetching it
            }
            let call = HttpCall {
                cluster: cluster.to_string(),
                headers: vec![
                    (":method".into(), "GET".into()),
                    (":path".into(), backends::METADATA_TOKEN_PATH.into()),
                    (":authority".into(), authority.to_string()),
                    ("metadata-flavor".into(), "Google".into()),
                ],
                body: Rc::new(Vec::new()),
                timeout_ms: 5_000,
            };
            match host.dispatch(&call) {
                Ok(token) => self.token_fetches.push((token, b)),
                Err(why) => self.token_failed(host, b, name, &format!("the call could not be made ({why})"), now),
            }
        }
    }

    fn token_failed(&mut self, host: &mut dyn Host, b: usize, name: &str, why: &str, now: u64) {
        host.count(&Counter::TokenFetches(name.to_string(), false), 1);
        if let Some(settings) = &self.settings {
            host.shared_set(&format!("{}.lease", backends::token_key(&settings.backends, b)), b"0");
        }
        if let Some((until, delay)) = self.token_backoff.get_mut(b) {
            *until = now + *delay;
            *delay = (*delay * 2).min(TOKEN_BACKOFF_MAX_MS);
        }
        let warned = self.token_warned_ms.get(b).copied().unwrap_or(0);
        if warned == 0 || now.saturating_sub(warned) >= 30_000 {
            host.log(
                LogLevel::Warn,
                &format!("gemini-image-filter: backend {name}: no access token from the metadata server: {why}"),
            );
            if let Some(w) = self.token_warned_ms.get_mut(b) {
                *w = now;
            }
        }
    }

    /// A call-out of the root answered: a cache write (anything but a 2xx is an L2 error) or
    /// a metadata token fetch.
    pub fn on_call_response(&mut self, host: &mut dyn Host, token: u32, num_headers: usize, body_size: usize) {
        if let Some(pos) = self.token_fetches.iter().position(|(t, _)| *t == token) {
            let (_, b) = self.token_fetches.swap_remove(pos);
            self.token_answered(host, b, num_headers, body_size);
            return;
        }
        let Ok(mut worker) = self.worker.try_borrow_mut() else { return };
        let Some(pos) = worker.writes_in_flight.iter().position(|t| *t == token) else { return };
        worker.writes_in_flight.swap_remove(pos);
        let status = if num_headers > 0 { call_status(host) } else { None };
        if !status.is_some_and(|s| (200..300).contains(&s)) {
            host.count(&Counter::CacheL2Errors, 1);
        }
    }

    fn token_answered(&mut self, host: &mut dyn Host, b: usize, num_headers: usize, body_size: usize) {
        let Some(settings) = self.settings.clone() else { return };
        let Some(name) = settings.backends.list.get(b).map(|x| x.name.clone()) else { return };
        let now = host.now_ms();
        let status = if num_headers > 0 { call_status(host) } else { None };
        let token = match status {
            Some(200) => backends::read_token_answer(&host.call_response_body(body_size.min(64 * 1024)), now),
            _ => None,
        };
        match token {
            Some(token) => {
                host.shared_set(&backends::token_key(&settings.backends, b), &token.encode());
                host.shared_set(&format!("{}.lease", backends::token_key(&settings.backends, b)), b"0");
                host.count(&Counter::TokenFetches(name, true), 1);
                if let Some(backoff) = self.token_backoff.get_mut(b) {
                    *backoff = (0, TOKEN_BACKOFF_MS);
                }
            }
            None => {
                let why = match status {
                    None => "no answer (connection failed or timed out)".to_string(),
                    Some(200) => "an answer that is not a token".to_string(),
                    Some(s) => format!("status {s}"),
                };
                self.token_failed(host, b, &name, &why, now);
            }
        }
    }
}

/// The backends that take a metadata-server token: index, name, metadata cluster, authority.
fn metadata_backends(settings: &Settings) -> impl Iterator<Item = (usize, &str, &str, &str)> {
    settings.backends.list.iter().enumerate().filter_map(|(i, b)| {
        b.credentials.iter().find_map(|c| match c {
            Credential::MetadataToken { cluster, authority } => {
                Some((i, b.name.as_str(), cluster.as_str(), authority.as_str()))
            }
            Credential::ApiKey { .. } => None,
        })
    })
}

fn call_status(host: &dyn Host) -> Option<u32> {
    host.call_response_header(":status").and_then(|s| s.trim().parse::<u32>().ok())
}

/// What a call-out in flight is for.
#[derive(Clone, Debug)]
enum CallKind {
    /// An attempt of Gemini call `index` of `n`, with key `key`.
    Gemini { index: u32, key: KeyRef, attempts: Attempts },
    /// The L2 lookup.
    CacheGet,
}

/// What every attempt of a request's Gemini calls sends.
#[derive(Clone)]
struct CallPlan {
    body: Rc<Vec<u8>>,
    upstream: String,
    reserved_bytes: u64,
    deadline_ms: u64,
}

/// An attempt is not started with less time than this left before the request's deadline.
const MIN_ATTEMPT_MS: u64 = 250;

struct PendingCall {
    token: u32,
    /// Dispatched by the root (a flight leader's call): answered through the root, and kept
    /// going if the client leaves.
    root_owned: bool,
    kind: CallKind,
    sent_ms: u64,
    timeout_ms: u64,
    /// Bytes of the worker's budget set aside for this call's answer.
    reserved_bytes: u64,
}

/// One HTTP stream: request callbacks in, host calls out.
pub struct StreamDriver {
    settings: Rc<Settings>,
    worker: Rc<RefCell<Worker>>,
    /// Present only for requests the filter answers.
    exchange: Option<Exchange>,
    /// Present only for fetches of image URLs.
    fetch: Option<FileFetch>,
    pending: Vec<PendingCall>,
    replied: bool,
    /// Bytes this request holds in the worker's budget, once admitted.
    held: Option<u64>,
    /// Its Gemini calls, once they start.
    plan: Option<CallPlan>,
    /// A streamed request: where it went and what its response is (`driver_stream.rs`).
    upstream: streamed::Upstream,
    /// Its part in a flight of identical misses (`driver_flight.rs`).
    flight: flights::FlightSeat,
    /// A large local reply's body, on its way to the response callbacks (`driver_reply.rs`).
    carried: carried::Carried,
}

impl StreamDriver {
    pub fn new(settings: Rc<Settings>, worker: Rc<RefCell<Worker>>) -> StreamDriver {
        StreamDriver {
            settings,
            worker,
            exchange: None,
            fetch: None,
            pending: Vec::new(),
            replied: false,
            held: None,
            plan: None,
            upstream: streamed::Upstream::default(),
            flight: flights::FlightSeat::default(),
            carried: carried::Carried::default(),
        }
    }

    /// Gives the request's share of the budget back, once.
    fn release(&mut self) {
        if let Some(bytes) = self.held.take() {
            if let Ok(mut w) = self.worker.try_borrow_mut() {
                w.release(&self.settings.profile, bytes);
            }
        }
    }

    /// The profile in force: from dynamic metadata an earlier filter set, else the route's
    /// metadata, else `default`; never from a request header (contract section 15). Its
    /// settings become this stream's; `None` when the name has no profile.
    fn resolve_profile(&mut self, host: &dyn Host) -> (String, Option<Rc<Settings>>) {
        let dynamic = self.settings.profile_from.as_ref().and_then(|path| {
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            host.property(&path)
        });
        let route = match dynamic {
            Some(_) => None,
            None => policy::ROUTE_PROFILE_PATHS.iter().find_map(|path| host.property(path)),
        };
        let (name, _) = policy::profile_name(dynamic, route);
        let profile = self.settings.profiles.get(&name).cloned();
        if let Some(settings) = &profile {
            self.settings = settings.clone();
        }
        (name, profile)
    }

    pub fn on_request_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Verdict {
        // The internal upstream route is the filter's alone: a client naming a cluster in its
        // header is refused before any route is used (contract section 14).
        if host.request_header(streamed::UPSTREAM_HEADER).is_some() {
            return self.refuse_upstream_header(host);
        }
        let Some(path) = host.request_header(":path") else { return Verdict::Continue };
        let Some(endpoint) = Endpoint::for_path(&path) else {
            return match files::parse_path(&path) {
                Some(id) if self.settings.urls.is_some() => self.on_file_request(host, id),
                _ => Verdict::Continue,
            };
        };
        // Methods are case-sensitive: `post` is not `POST`.
        let method = host.request_header(":method").unwrap_or_default();
        let wrong_method = method != endpoint.method();
        let url_base_from_request = self.settings.urls.as_ref().is_some_and(|u| u.base.is_none());
        let head = RequestHead {
            method,
            content_type: host.request_header("content-type"),
            content_length: host.request_header("content-length").and_then(|v| v.trim().parse().ok()),
            request_id: host.request_header("x-request-id"),
            cache_control: host.request_header("cache-control"),
            // Read only when image URLs take their base from the request.
            authority: url_base_from_request.then(|| host.request_header(":authority")).flatten(),
            forwarded_proto: url_base_from_request.then(|| host.request_header("x-forwarded-proto")).flatten(),
        };
        let now = host.now_ms();
        let (name, profile) = self.resolve_profile(host);
        let mut exchange = Exchange::new(self.settings.clone(), endpoint, head, now);
        if self.settings.urls.is_some() {
            let mut random = [0u8; files::TOKEN_BYTES];
            if host.random(&mut random) {
                exchange = exchange.with_url_token(files::token(&random));
            }
        }
        let effects = match (wrong_method, profile) {
            (true, _) => exchange.on_wrong_method(now),
            (false, None) => exchange.on_unknown_profile(&name, now),
            (false, Some(_)) => exchange.on_headers(now),
        };
        self.exchange = Some(exchange);
        self.run(host, effects);
        if end_of_stream && !self.replied {
            self.body_complete(host, 0);
        }
        // Pause holds the headers, so that a streamed request can be rewritten at the end of
        // its body (Envoy delivers the body with `allow_on_headers_stop_iteration`). Without
        // streaming, Continue lets Envoy deliver the body and the buffer filter after this one
        // holds the headers back from the router. After a local reply, nothing more may go
        // upstream.
        if self.replied || self.settings.streaming.enabled {
            Verdict::Pause
        } else {
            Verdict::Continue
        }
    }

    /// A `GET`/`HEAD` of an image URL (`id` when well-formed): answered at once from the hot
    /// set or L1, or after L2; nothing goes upstream.
    fn on_file_request(&mut self, host: &mut dyn Host, id: Option<files::FileId>) -> Verdict {
        let now = host.now_ms();
        let head = files::FileHead {
            method: host.request_header(":method").unwrap_or_default(),
            if_none_match: host.request_header("if-none-match"),
            request_id: host.request_header("x-request-id"),
        };
        let (name, profile) = self.resolve_profile(host);
        let mut fetch = files::FileFetch::new(self.settings.clone(), id, head, &name, now);
        let effects = match profile {
            None => fetch.on_unknown_profile(now),
            Some(_) => {
                let hot = match fetch.hot_key() {
                    key if key.is_empty() => None,
                    key => self.worker.try_borrow_mut().ok().and_then(|mut w| w.hot.get_file(&key, now / 1000)),
                };
                let mut read = |k: &str| host.shared_get(k);
                fetch.start(hot, &mut read, now)
            }
        };
        self.fetch = Some(fetch);
        self.run(host, effects);
        Verdict::Pause
    }

    pub fn on_request_body(&mut self, host: &mut dyn Host, body_size: usize, end_of_stream: bool) -> Verdict {
        if self.fetch.is_some() {
            return Verdict::Pause; // answered locally; a body on a GET goes nowhere
        }
        if self.exchange.is_none() {
            return Verdict::Continue;
        }
        if !self.replied {
            let now = host.now_ms();
            self.feed(host, |ex| ex.on_body_progress(body_size, now));
        }
        if !self.replied && end_of_stream {
            self.upstream.in_request_callback = true;
            self.body_complete(host, body_size);
            self.upstream.in_request_callback = false;
        }
        self.request_verdict()
    }

    pub fn on_request_trailers(&mut self, host: &mut dyn Host) -> Verdict {
        if self.exchange.is_none() {
            return Verdict::Continue;
        }
        if !self.replied {
            // A body that ended with trailers: take what was buffered.
            self.upstream.in_request_callback = true;
            self.body_complete(host, usize::MAX);
            self.upstream.in_request_callback = false;
        }
        self.request_verdict()
    }

    /// A call-out answered. Zero headers means it failed (reset, timeout, body over the
    /// limit): then no header or body may be read.
    pub fn on_call_response(&mut self, host: &mut dyn Host, token: u32, num_headers: usize, body_size: usize) {
        let Some(pos) = self.pending.iter().position(|c| c.token == token) else { return };
        let call = self.pending.swap_remove(pos);
        let now = host.now_ms();
        let status = if num_headers > 0 { call_status(host) } else { None };
        let content_type = status.and_then(|_| host.call_response_header("content-type"));
        // An answer larger than its reservation is copied into the VM only if the worker has
        // room for the difference; else it is left in Envoy and the call fails as overloaded.
        let extra = (body_size as u64).saturating_sub(call.reserved_bytes);
        let fits = matches!(call.kind, CallKind::CacheGet) || extra == 0 || self.grow(extra);
        let refused_bytes = (status.is_some() && !fits).then_some(body_size);
        let body = if status.is_some() && fits { host.call_response_body(body_size) } else { Vec::new() };
        let retry_after_s = status
            .filter(|s| *s == 429)
            .and_then(|_| host.call_response_header("retry-after"))
            .and_then(|v| v.trim().parse::<u64>().ok());
        let response = CallResponse {
            refused_bytes,
            status,
            content_type,
            body,
            elapsed_ms: now.saturating_sub(call.sent_ms),
            timeout_ms: call.timeout_ms,
            retry_after_s,
        };
        match call.kind {
            CallKind::Gemini { index, key, attempts } => {
                let effects = self.answered(host, index, key, attempts, response);
                self.run(host, effects);
            }
            CallKind::CacheGet => match self.fetch.as_mut() {
                Some(fetch) => {
                    let mut read = |k: &str| host.shared_get(k);
                    let effects = fetch.on_l2_response(response, &mut read, now);
                    self.run(host, effects);
                }
                None => self.feed(host, |ex| ex.on_l2_response(response, now)),
            },
        }
        // A streamed request rewritten here, outside its request callbacks, goes on now.
        self.resume_if_forwarded(host);
    }

    /// An attempt answered: the call's outcome, or another attempt on the next key or backend.
    fn answered(
        &mut self,
        host: &mut dyn Host,
        index: u32,
        key: KeyRef,
        mut attempts: Attempts,
        response: CallResponse,
    ) -> Vec<Effect> {
        let now = host.now_ms();
        let elapsed = response.elapsed_ms;
        let outcome = gemini::read_call(response);
        self.count_attempt(host, key, AttemptOutcome::of(&outcome), elapsed);
        if self.settings.backends.retry.is_none() {
            return self.call_done(index, outcome, &attempts, now); // one backend, one try
        }
        match backends::next_after(&outcome) {
            Next::Final => self.call_done(index, outcome, &attempts, now),
            Next::Cool(reason) => {
                self.cool_key(host, key, reason, &outcome, now);
                self.attempt(host, index, attempts, Some(outcome))
            }
            Next::NextBackend => {
                attempts.skipped_backends.push(key.backend);
                self.attempt(host, index, attempts, Some(outcome))
            }
        }
    }

    /// An attempt's counters: how long it took and how it ended, by backend and key.
    fn count_attempt(&self, host: &mut dyn Host, key: KeyRef, outcome: AttemptOutcome, elapsed_ms: u64) {
        let backend_name = self.settings.backends.list.get(key.backend).map_or("", |b| b.name.as_str());
        host.observe(Histogram::UpstreamLatencyMs, elapsed_ms);
        host.count(&Counter::UpstreamAttempts(backend_name.to_string(), key.key, outcome), 1);
    }

    /// Cools key `key` down for every worker after an answer that says so (a quota, a refused
    /// key), for the answer's own delay when it gave one; nothing without `retry`.
    fn cool_key(&self, host: &mut dyn Host, key: KeyRef, reason: CoolReason, outcome: &CallOutcome, now: u64) {
        let backends = &self.settings.backends;
        let Some(retry) = backends.retry else { return };
        let retry_after = outcome.result.as_ref().err().and_then(|e| e.retry_after);
        let cooldown = backends::cooldown_for(reason, retry_after, &retry, now);
        host.shared_set(&backends::cooldown_key(backends, key), &cooldown.encode());
        let backend_name = backends.list.get(key.backend).map_or("", |b| b.name.as_str());
        host.count(&Counter::KeyCooldowns(backend_name.to_string(), key.key), 1);
    }

    /// Starts the next attempt of call `index`: the first usable key in backend order, within
    /// `retry.max_attempts` and the request's deadline. With none left, the call's outcome is
    /// the last answer (after a 5xx or network failure), else 429 or 502 as `none_left` says.
    fn attempt(
        &mut self,
        host: &mut dyn Host,
        index: u32,
        mut attempts: Attempts,
        mut last: Option<CallOutcome>,
    ) -> Vec<Effect> {
        let Some(plan) = self.plan.clone() else { return Vec::new() };
        if self.defer_attempt(host, index, &attempts, &last) {
            return Vec::new(); // the root sends it on its next tick, at once
        }
        let settings = self.settings.clone();
        let backends = &settings.backends;
        let max = backends.retry.map_or(1, |r| r.max_attempts);
        loop {
            let now = host.now_ms();
            let remaining = plan.deadline_ms.saturating_sub(now);
            if attempts.count >= max || remaining == 0 || (attempts.count > 0 && remaining < MIN_ATTEMPT_MS) {
                let outcome = last.unwrap_or_else(|| failed(ApiError::timed_out("Gemini did not answer in time")));
                return self.call_done(index, outcome, &attempts, now);
            }
            let key = match self.pick_key(host, &attempts, now) {
                Pick::Use(key) => key,
                Pick::NoneLeft => {
                    let outcome = match last {
                        Some(o) if backends.retry.is_none() || backends::next_after(&o) == Next::NextBackend => o,
                        _ => {
                            let reader: &dyn Host = host;
                            let mut cooldown = |k: KeyRef| read_cooldown(reader, backends, k);
                            failed(backends::none_left(backends, &mut cooldown, now))
                        }
                    };
                    return self.call_done(index, outcome, &attempts, now);
                }
            };
            attempts.count += 1;
            attempts.tried.push(key);
            let call = gemini_call(&settings, host, key, &plan, remaining.min(settings.gemini.timeout_ms));
            match host.dispatch(&call) {
                Ok(token) => {
                    self.pending.push(PendingCall {
                        token,
                        root_owned: self.flight.in_root,
                        kind: CallKind::Gemini { index, key, attempts },
                        sent_ms: now,
                        timeout_ms: call.timeout_ms,
                        reserved_bytes: plan.reserved_bytes,
                    });
                    return Vec::new();
                }
                Err(why) => {
                    // The operator's log gets the reason; the client a plain 500 if nothing
                    // else answers.
                    host.log(LogLevel::Error, &format!("gemini-image-filter: Gemini call not dispatched: {why}"));
                    attempts.skipped_backends.push(key.backend);
                    last = Some(failed(ApiError::new(ErrorCode::InternalError, "the gateway could not call Gemini")));
                }
            }
        }
    }

    /// The first usable key in backend order after `attempts`, taking turns within this
    /// worker.
    fn pick_key(&mut self, host: &dyn Host, attempts: &Attempts, now: u64) -> Pick {
        let settings = self.settings.clone();
        let backends = &settings.backends;
        let mut cooldown = |k: KeyRef| read_cooldown(host, backends, k);
        let ready = |k: KeyRef| credential_ready(&settings, host, k, now);
        match self.worker.try_borrow_mut() {
            Ok(mut w) => backends::pick(backends, attempts, &mut cooldown, &ready, &mut w.turns, now),
            Err(_) => backends::pick(backends, attempts, &mut cooldown, &ready, &mut [], now),
        }
    }

    /// Call `index` has its final outcome.
    fn call_done(&mut self, index: u32, outcome: CallOutcome, attempts: &Attempts, now: u64) -> Vec<Effect> {
        let meta = CallMeta { backend: attempts.tried.last().map_or(0, |k| k.backend), attempts: attempts.count };
        match self.exchange.as_mut() {
            Some(ex) => ex.on_call_outcome(index, outcome, meta, now),
            None => Vec::new(),
        }
    }

    /// Room for a request about to call Gemini: the worker's in-flight bounds (and the
    /// profile's), then the profile's images per minute across all workers. Nothing is held
    /// when the answer is no.
    fn admit(&mut self, host: &mut dyn Host, bytes: u64, images: u32) -> Admission {
        // A request admitted before (to wait for a flight) gives that back first.
        self.release();
        let granted = self.worker.try_borrow_mut().is_ok_and(|mut w| w.admit(&self.settings.profile, bytes));
        if !granted {
            return Admission::Overloaded;
        }
        self.held = Some(bytes);
        let Some(per_minute) = self.settings.profile.images_per_minute.filter(|_| images > 0) else {
            return Admission::Granted;
        };
        match take_images(host, &self.settings.profile.bucket_key(), per_minute, images) {
            Ok(()) => Admission::Granted,
            Err(retry_after_s) => {
                self.release();
                Admission::RateLimited { retry_after_s }
            }
        }
    }

    /// Takes `extra` more bytes of the worker's budget for this request.
    fn grow(&mut self, extra: u64) -> bool {
        let Some(held) = self.held.as_mut() else { return false };
        let grown = self.worker.try_borrow_mut().is_ok_and(|mut w| w.grow(&self.settings.profile, extra));
        if grown {
            *held += extra;
        }
        grown
    }

    /// The stream ends; a request still unanswered was abandoned by its client.
    pub fn on_log(&mut self, host: &mut dyn Host) {
        if self.detach_if_leading() {
            return; // goes on for those waiting; the root finishes it
        }
        let now = host.now_ms();
        if let Some(fetch) = self.fetch.as_mut() {
            let effects = fetch.on_abandoned(now);
            self.run(host, effects);
        }
        self.note_stream_cut(host);
        self.feed(host, |ex| ex.on_abandoned(now));
        self.release();
    }

    fn body_complete(&mut self, host: &mut dyn Host, size: usize) {
        let body = host.request_body(size);
        self.upstream.request_body_len = body.len();
        let now = host.now_ms();
        self.feed(host, |ex| ex.on_body(body, now));
    }

    fn feed(&mut self, host: &mut dyn Host, event: impl FnOnce(&mut Exchange) -> Vec<Effect>) {
        let effects = match self.exchange.as_mut() {
            Some(ex) => event(ex),
            None => Vec::new(),
        };
        self.run(host, effects);
    }

    /// Carries out effects, and those that the answers to them bring, until none is left.
    fn run(&mut self, host: &mut dyn Host, effects: Vec<Effect>) {
        let mut queue: VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            let more = self.carry_out(host, effect);
            queue.extend(more);
        }
        if self.exchange.as_ref().is_some_and(Exchange::is_done) {
            self.release();
            self.finish_flight(host);
        }
    }

    fn carry_out(&mut self, host: &mut dyn Host, effect: Effect) -> Vec<Effect> {
        if let Effect::CallGemini { count, body, upstream, reserved_bytes, deadline_ms } = effect {
            self.plan = Some(CallPlan { body, upstream, reserved_bytes, deadline_ms });
            let mut more = Vec::new();
            for index in 0..count {
                more.extend(self.attempt(host, index, Attempts::default(), None));
            }
            return more;
        }
        if let Effect::Admit { bytes, images } = effect {
            let admission = self.admit(host, bytes, images);
            let now = host.now_ms();
            return self.exchange.as_mut().map_or_else(Vec::new, |ex| ex.on_admission(admission, now));
        }
        if let Effect::JoinFlight { key, lease_ms } = effect {
            let role = self.join_flight(host, &key, lease_ms);
            let now = host.now_ms();
            return self.exchange.as_mut().map_or_else(Vec::new, |ex| ex.on_flight(role, now));
        }
        if let Effect::Forward { body, upstream, deadline_ms } = effect {
            let sent = self.forward(host, &body, &upstream, deadline_ms);
            let now = host.now_ms();
            return self.exchange.as_mut().map_or_else(Vec::new, |ex| ex.on_forwarded(sent, now));
        }
        match effect {
            Effect::Forward { .. } => Vec::new(),    // carried out above
            Effect::JoinFlight { .. } => Vec::new(), // carried out above
            Effect::Admit { .. } => Vec::new(),      // carried out above
            Effect::CallGemini { .. } => Vec::new(), // carried out above
            Effect::LookupL1 { key, max_entries, format, hot } => {
                let Some(ex) = self.exchange.as_mut() else { return Vec::new() };
                let now = host.now_ms();
                let hot = match hot {
                    true => self.worker.try_borrow_mut().ok().and_then(|mut w| w.hot.get(&key.key, format, now / 1000)),
                    false => None,
                };
                match hot {
                    Some(entry) => ex.on_l1_hot(entry, now),
                    None => {
                        let mut get = |k: &str| host.shared_get(k);
                        let read = cache::l1_lookup(&mut get, &key, max_entries, now / 1000);
                        ex.on_l1_result(read, now)
                    }
                }
            }
            Effect::RememberHot { key, format, entry } => {
                if let Ok(mut w) = self.worker.try_borrow_mut() {
                    w.hot.put(&key, format, entry);
                }
                Vec::new()
            }
            Effect::RememberFile { record_key, entry } => {
                if let Ok(mut w) = self.worker.try_borrow_mut() {
                    w.hot.put_file(&record_key, entry);
                }
                Vec::new()
            }
            Effect::StoreShared { key, value } => {
                host.shared_set(&key, &value);
                Vec::new()
            }
            Effect::StoreL1 { meta_key, meta, data_key, data } => {
                // Data first: a reader that sees the new meta finds the new data, and the key
                // inside the data catches the other order.
                if host.shared_set(&data_key, &data) {
                    host.shared_set(&meta_key, &meta);
                }
                Vec::new()
            }
            Effect::CallL2(call) => {
                let sent_ms = host.now_ms();
                match host.dispatch(&call) {
                    Ok(token) => {
                        self.pending.push(PendingCall {
                            token,
                            root_owned: self.flight.in_root,
                            kind: CallKind::CacheGet,
                            sent_ms,
                            timeout_ms: call.timeout_ms,
                            reserved_bytes: 0,
                        });
                        Vec::new()
                    }
                    Err(_) => {
                        let now = host.now_ms();
                        match (self.exchange.as_mut(), self.fetch.as_mut()) {
                            (Some(ex), _) => ex.on_l2_response(CallResponse::default(), now),
                            (None, Some(fetch)) => {
                                let mut read = |k: &str| host.shared_get(k);
                                fetch.on_l2_response(CallResponse::default(), &mut read, now)
                            }
                            (None, None) => Vec::new(),
                        }
                    }
                }
            }
            Effect::WriteL2(call) => {
                let queued = self.worker.try_borrow_mut().is_ok_and(|mut w| w.queue_write(call));
                if !queued {
                    host.count(&Counter::CacheL2Errors, 1);
                }
                Vec::new()
            }
            Effect::Reply(reply) if self.upstream.rewrites_response() => {
                // Gemini refused a stream: the error goes over its held response.
                self.replied = true;
                self.rewrite_response(host, &reply);
                Vec::new()
            }
            Effect::Reply(_) if self.flight.detached => {
                // A leader whose client left: nobody to answer.
                self.replied = true;
                Vec::new()
            }
            Effect::Reply(reply) => {
                if !self.replied {
                    self.replied = true;
                    if !self.send_local_reply(host, &reply) {
                        host.log(LogLevel::Error, "gemini-image-filter: the host refused the local reply");
                    }
                }
                Vec::new()
            }
            Effect::Log(line) => {
                host.log(line.level, &line.json);
                Vec::new()
            }
            Effect::Count(counter, by) => {
                host.count(&counter, by);
                Vec::new()
            }
            Effect::Observe(histogram, value) => {
                host.observe(histogram, value);
                Vec::new()
            }
        }
    }
}

/// An outcome that is an error the gateway made up (no key left, no call made).
fn failed(e: ApiError) -> CallOutcome {
    CallOutcome { upstream_status: 0, result: Err(e), usage: None }
}

/// A key's cool-down, as shared data holds it for every worker.
fn read_cooldown(host: &dyn Host, backends: &Backends, k: KeyRef) -> Option<Cooldown> {
    host.shared_get(&backends::cooldown_key(backends, k)).and_then(|v| Cooldown::decode(&v))
}

/// A backend's metadata token, as shared data holds it for every worker.
fn read_token(host: &dyn Host, backends: &Backends, backend: usize) -> Option<Token> {
    host.shared_get(&backends::token_key(backends, backend)).and_then(|v| Token::decode(&v))
}

/// Whether key `k` can be used now: an API key that is set (or, with the one default backend,
/// any: the call then goes out without a key, as configured), or a metadata token in shared
/// data that has not expired.
fn credential_ready(settings: &Settings, host: &dyn Host, k: KeyRef, now: u64) -> bool {
    let Some(cred) = settings.backends.list.get(k.backend).and_then(|b| b.credentials.get(k.key)) else {
        return false;
    };
    match cred {
        Credential::ApiKey { value, .. } => value.is_some() || settings.backends.retry.is_none(),
        Credential::MetadataToken { .. } => {
            read_token(host, &settings.backends, k.backend).is_some_and(|t| t.usable(now))
        }
    }
}

/// The call-out of one attempt: the backend's cluster, authority and path, and the key's
/// credential.
fn gemini_call(settings: &Settings, host: &dyn Host, k: KeyRef, plan: &CallPlan, timeout_ms: u64) -> HttpCall {
    let backend = settings.backends.list.get(k.backend);
    let path = backend.map(|b| b.path(&plan.upstream)).unwrap_or_default();
    upstream_call(settings, host, k, path, plan.body.clone(), timeout_ms)
}

/// A call to Gemini on key `k`: the backend's cluster and authority, `path`, and the key's
/// credential.
fn upstream_call(
    settings: &Settings,
    host: &dyn Host,
    k: KeyRef,
    path: String,
    body: Rc<Vec<u8>>,
    timeout_ms: u64,
) -> HttpCall {
    let backend = settings.backends.list.get(k.backend);
    let mut headers = vec![
        (":method".to_string(), "POST".to_string()),
        (":path".to_string(), path),
        (":authority".to_string(), backend.map(|b| b.authority.clone()).unwrap_or_default()),
        ("content-type".to_string(), "application/json".to_string()),
        ("x-goog-api-client".to_string(), concat!("gemini-image-filter/", env!("CARGO_PKG_VERSION")).to_string()),
    ];
    match backend.and_then(|b| b.credentials.get(k.key)) {
        Some(Credential::ApiKey { value: Some(key), .. }) => headers.push(("x-goog-api-key".to_string(), key.clone())),
        Some(Credential::MetadataToken { .. }) => {
            if let Some(t) = read_token(host, &settings.backends, k.backend) {
                headers.push(("authorization".to_string(), format!("Bearer {}", t.value)));
            }
        }
        _ => {}
    }
    HttpCall { cluster: backend.map(|b| b.cluster.clone()).unwrap_or_default(), headers, body, timeout_ms }
}

/// Gives every lease slot a value (see `create_if_absent`).
fn seed_flight_slots(host: &mut dyn Host) {
    for n in 0..crate::flight::FLIGHT_SLOTS {
        create_if_absent(host, &crate::flight::slot_key_at(n), crate::flight::EMPTY_SLOT);
    }
}

/// Writes `value` under a shared-data key that does not exist yet, at configure time, and
/// leaves one that does alone (a reload never wipes a live lease). Envoy writes a key that does
/// not exist whatever version is given, so a compare-and-swap lease (the flights', the token
/// fetch's) must exist before workers race for it: two workers were seen to both take one.
fn create_if_absent(host: &mut dyn Host, key: &str, value: &[u8]) {
    if host.shared_get_cas(key).1.is_none() {
        host.shared_set(key, value);
    }
}

/// Compare-and-swap rounds before a bucket update gives up (each loses only to another
/// worker's update in between, so a handful is plenty).
const BUCKET_CAS_ROUNDS: usize = 16;

/// Takes `images` from a profile's images-per-minute bucket in shared data, for every worker
/// of this Envoy at once; `Err` holds the seconds until there is room. A value that does not
/// read back is taken as a full bucket (it can only come from a foreign writer or an older
/// layout); a bucket that cannot be written after every round refuses, so the bound holds.
fn take_images(host: &mut dyn Host, key: &str, per_minute: u32, images: u32) -> Result<(), u64> {
    for _ in 0..BUCKET_CAS_ROUNDS {
        let (value, cas) = host.shared_get_cas(key);
        let stored = value.as_deref().and_then(Bucket::decode);
        let after = Bucket::take(stored, per_minute, images, host.now_ms())?;
        if host.shared_set_cas(key, &after.encode(), cas) {
            return Ok(());
        }
    }
    Err(1)
}

/// A stream that ends without `on_log` (a VM torn down mid-request) still gives back its share
/// of the budget: a leak would refuse every later request on this worker.
impl Drop for StreamDriver {
    fn drop(&mut self) {
        self.release();
    }
}

#[path = "driver_flight.rs"]
mod flights;
pub use flights::FOLLOW_POLL_MS;

#[path = "driver_reply.rs"]
mod carried;

#[path = "driver_stream.rs"]
mod streamed;
pub use streamed::{KEPT_HEADERS, UPSTREAM_HEADER};

#[cfg(test)]
#[path = "driver_tests.rs"]
mod tests;
