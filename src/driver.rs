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
use std::collections::VecDeque;
use std::rc::Rc;

use crate::access_log::LogLevel;
use crate::cache;
use crate::config::{ConfigError, Settings};
use crate::endpoint::Endpoint;
use crate::exchange::{Effect, Exchange, HttpCall, Reply, RequestHead};
use crate::gemini::CallResponse;
use crate::hot::HotSet;
use crate::metrics::{Counter, Histogram};

/// What the filter can ask of Envoy. Each method is one host call; none may panic.
pub trait Host {
    fn now_ms(&self) -> u64;
    /// A request header; only readable during the headers callback.
    fn request_header(&self, name: &str) -> Option<String>;
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
    fn log(&mut self, level: LogLevel, message: &str);
    fn count(&mut self, counter: &Counter, by: u64);
    fn observe(&mut self, histogram: Histogram, value: u64);
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
    writes: VecDeque<HttpCall>,
    writes_in_flight: Vec<u32>,
}

impl Worker {
    pub fn new(hot_bytes: usize, max_requests: u32, max_bytes: u64) -> Worker {
        Worker {
            hot: HotSet::new(hot_bytes),
            budget: Budget { max_requests, max_bytes, ..Budget::default() },
            writes: VecDeque::new(),
            writes_in_flight: Vec::new(),
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
}

/// How often the root context sends queued cache writes, when L2 is on.
pub const WRITE_TICK_MS: u64 = 50;

impl Default for WorkerDriver {
    fn default() -> Self {
        WorkerDriver { settings: None, worker: Rc::new(RefCell::new(Worker::new(0, 0, 0))) }
    }
}

impl WorkerDriver {
    /// Reads the plugin configuration; an error refuses it (Envoy then rejects the config), and
    /// the log says why. On success, returns the tick period the root needs (`Some` when there is an L2 to write to).
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
                let tick = settings.cache.as_ref().and_then(|c| c.l2.as_ref()).map(|_| WRITE_TICK_MS);
                let limits = &settings.limits;
                self.worker = Rc::new(RefCell::new(Worker::new(
                    l1.map_or(0, |l1| l1.hot_bytes),
                    limits.max_inflight_requests,
                    limits.max_inflight_bytes,
                )));
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

    /// Sends the queued cache writes.
    pub fn on_tick(&mut self, host: &mut dyn Host) {
        let Ok(mut worker) = self.worker.try_borrow_mut() else { return };
        while let Some(call) = worker.writes.pop_front() {
            match host.dispatch(&call) {
                Ok(token) => worker.writes_in_flight.push(token),
                Err(_) => host.count(&Counter::CacheL2Errors, 1),
            }
        }
    }

    /// A cache write answered: anything but a 2xx is an L2 error.
    pub fn on_call_response(&mut self, host: &mut dyn Host, token: u32, num_headers: usize) {
        let Ok(mut worker) = self.worker.try_borrow_mut() else { return };
        let Some(pos) = worker.writes_in_flight.iter().position(|t| *t == token) else { return };
        worker.writes_in_flight.swap_remove(pos);
        let status = if num_headers > 0 { call_status(host) } else { None };
        if !status.is_some_and(|s| (200..300).contains(&s)) {
            host.count(&Counter::CacheL2Errors, 1);
        }
    }
}

fn call_status(host: &dyn Host) -> Option<u32> {
    host.call_response_header(":status").and_then(|s| s.trim().parse::<u32>().ok())
}

/// What a call-out in flight is for.
#[derive(Clone, Copy, Debug)]
enum CallKind {
    /// Gemini call `index` of `n`.
    Gemini(u32),
    /// The L2 lookup.
    CacheGet,
}

struct PendingCall {
    token: u32,
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
    pending: Vec<PendingCall>,
    replied: bool,
    /// Bytes this request holds in the worker's budget, once admitted.
    held: Option<u64>,
}

impl StreamDriver {
    pub fn new(settings: Rc<Settings>, worker: Rc<RefCell<Worker>>) -> StreamDriver {
        StreamDriver { settings, worker, exchange: None, pending: Vec::new(), replied: false, held: None }
    }

    /// Gives the request's share of the budget back, once.
    fn release(&mut self) {
        if let Some(bytes) = self.held.take() {
            if let Ok(mut w) = self.worker.try_borrow_mut() {
                w.budget.release(bytes);
            }
        }
    }

    pub fn on_request_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Verdict {
        // The path first: on pass-through traffic that is the only host call.
        let Some(endpoint) = host.request_header(":path").and_then(|p| Endpoint::for_path(&p)) else {
            return Verdict::Continue;
        };
        // Methods are case-sensitive: `post` is not `POST`.
        let method = host.request_header(":method").unwrap_or_default();
        let wrong_method = method != endpoint.method();
        let head = RequestHead {
            method,
            content_type: host.request_header("content-type"),
            content_length: host.request_header("content-length").and_then(|v| v.trim().parse().ok()),
            request_id: host.request_header("x-request-id"),
            cache_control: host.request_header("cache-control"),
        };
        let now = host.now_ms();
        let mut exchange = Exchange::new(self.settings.clone(), endpoint, head, now);
        let effects = if wrong_method { exchange.on_wrong_method(now) } else { exchange.on_headers(now) };
        self.exchange = Some(exchange);
        self.run(host, effects);
        if end_of_stream && !self.replied {
            self.body_complete(host, 0);
        }
        // Continue lets Envoy deliver the body; the buffer filter after this one holds the
        // headers back from the router. After a local reply, nothing more may go upstream.
        if self.replied {
            Verdict::Pause
        } else {
            Verdict::Continue
        }
    }

    pub fn on_request_body(&mut self, host: &mut dyn Host, body_size: usize, end_of_stream: bool) -> Verdict {
        if self.exchange.is_none() {
            return Verdict::Continue;
        }
        if !self.replied {
            let now = host.now_ms();
            self.feed(host, |ex| ex.on_body_progress(body_size, now));
        }
        if !self.replied && end_of_stream {
            self.body_complete(host, body_size);
        }
        Verdict::Pause
    }

    pub fn on_request_trailers(&mut self, host: &mut dyn Host) -> Verdict {
        if self.exchange.is_none() {
            return Verdict::Continue;
        }
        if !self.replied {
            // A body that ended with trailers: take what was buffered.
            self.body_complete(host, usize::MAX);
        }
        Verdict::Pause
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
        let response = CallResponse {
            refused_bytes,
            status,
            content_type,
            body,
            elapsed_ms: now.saturating_sub(call.sent_ms),
            timeout_ms: call.timeout_ms,
        };
        match call.kind {
            CallKind::Gemini(index) => self.feed(host, |ex| ex.on_call_response(index, response, now)),
            CallKind::CacheGet => self.feed(host, |ex| ex.on_l2_response(response, now)),
        }
    }

    /// Takes `extra` more bytes of the worker's budget for this request.
    fn grow(&mut self, extra: u64) -> bool {
        let Some(held) = self.held.as_mut() else { return false };
        let grown = self.worker.try_borrow_mut().is_ok_and(|mut w| w.budget.grow(extra));
        if grown {
            *held += extra;
        }
        grown
    }

    /// The stream ends; a request still unanswered was abandoned by its client.
    pub fn on_log(&mut self, host: &mut dyn Host) {
        let now = host.now_ms();
        self.feed(host, |ex| ex.on_abandoned(now));
        self.release();
    }

    fn body_complete(&mut self, host: &mut dyn Host, size: usize) {
        let body = host.request_body(size);
        let now = host.now_ms();
        self.feed(host, |ex| ex.on_body(&body, now));
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
        }
    }

    fn carry_out(&mut self, host: &mut dyn Host, effect: Effect) -> Vec<Effect> {
        let Some(ex) = self.exchange.as_mut() else { return Vec::new() };
        match effect {
            Effect::Admit { bytes } => {
                let granted = self.worker.try_borrow_mut().is_ok_and(|mut w| w.budget.admit(bytes));
                if granted {
                    self.held = Some(bytes);
                }
                ex.on_admission(granted, host.now_ms())
            }
            Effect::CallGemini { count, call, reserved_bytes } => {
                let mut more = Vec::new();
                for index in 0..count {
                    let sent_ms = host.now_ms();
                    match host.dispatch(&call) {
                        Ok(token) => self.pending.push(PendingCall {
                            token,
                            kind: CallKind::Gemini(index),
                            sent_ms,
                            timeout_ms: call.timeout_ms,
                            reserved_bytes,
                        }),
                        Err(why) => {
                            // The operator's log gets the reason; the client a plain 500.
                            host.log(
                                LogLevel::Error,
                                &format!("gemini-image-filter: Gemini call not dispatched: {why}"),
                            );
                            more.extend(ex.on_call_not_dispatched(index, host.now_ms()));
                        }
                    }
                }
                more
            }
            Effect::LookupL1 { key, max_entries, format } => {
                let now = host.now_ms();
                let hot = self.worker.try_borrow_mut().ok().and_then(|mut w| w.hot.get(&key.key, format, now / 1000));
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
                            kind: CallKind::CacheGet,
                            sent_ms,
                            timeout_ms: call.timeout_ms,
                            reserved_bytes: 0,
                        });
                        Vec::new()
                    }
                    Err(_) => ex.on_l2_response(CallResponse::default(), host.now_ms()),
                }
            }
            Effect::WriteL2(call) => {
                let queued = self.worker.try_borrow_mut().is_ok_and(|mut w| w.queue_write(call));
                if !queued {
                    host.count(&Counter::CacheL2Errors, 1);
                }
                Vec::new()
            }
            Effect::Reply(reply) => {
                if !self.replied {
                    self.replied = true;
                    if !host.send_reply(&reply) {
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

/// A stream that ends without `on_log` (a VM torn down mid-request) still gives back its share
/// of the budget: a leak would refuse every later request on this worker.
impl Drop for StreamDriver {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
#[path = "driver_tests.rs"]
mod tests;
