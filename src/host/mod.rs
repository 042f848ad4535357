//! The thin glue between Envoy and the core: each proxy-wasm callback is handed to the
//! driver (`crate::driver`) with `ProxyHost`, the `Host` made of proxy-wasm host calls. No
//! decision is made here.

mod calls;
mod metrics;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel as HostLevel};

use crate::access_log::LogLevel;
use crate::driver::{Host, StreamDriver, Verdict, WorkerDriver, FOLLOW_POLL_MS};
use crate::exchange::{HttpCall, Reply};
use crate::metrics::{Counter, Gauge, Histogram};
use metrics::Metrics;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(HostLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root {
            driver: WorkerDriver::default(),
            host: ProxyHost {
                metrics: Rc::new(Metrics::default()),
                woke: Rc::new(Cell::new(false)),
                tick_poked: Rc::new(Cell::new(false)),
                wake_queue: Rc::new(Cell::new(None)),
            },
            parked: Rc::new(Parked::default()),
            base_tick_ms: 0,
            tick_ms: 0,
        })
    });
}}

/// The `Host` over proxy-wasm: one host call per method.
#[derive(Clone)]
struct ProxyHost {
    metrics: Rc<Metrics>,
    /// Set when a stream asked for the root at once and has not been served yet.
    woke: Rc<Cell<bool>>,
    /// Set when the tick was set to 1 ms to wake the root (no queue): the root sets it back.
    tick_poked: Rc<Cell<bool>>,
    /// This VM's own shared queue: an item on it runs the root's `on_queue_ready` as soon as
    /// the worker is free (the tick is the fallback when the host refused the queue).
    wake_queue: Rc<Cell<Option<u32>>>,
}

impl Host for ProxyHost {
    fn now_ms(&self) -> u64 {
        calls::now_ms()
    }
    fn request_header(&self, name: &str) -> Option<String> {
        calls::request_header(name)
    }
    fn random(&mut self, buf: &mut [u8]) -> bool {
        calls::random(buf)
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        calls::property(path)
    }
    fn request_body(&self, size: usize) -> Vec<u8> {
        calls::request_body(size)
    }
    fn call_response_header(&self, name: &str) -> Option<String> {
        calls::call_response_header(name)
    }
    fn call_response_body(&self, size: usize) -> Vec<u8> {
        calls::call_response_body(size)
    }
    fn dispatch(&mut self, call: &HttpCall) -> Result<u32, String> {
        calls::dispatch(&call.cluster, &call.headers, &call.body, call.timeout_ms)
            .map_err(|status| format!("cluster {:?}: {status:?}", call.cluster))
    }
    fn send_reply(&mut self, reply: &Reply) -> bool {
        calls::send_reply(reply.status, &reply.headers, &reply.body).is_ok()
    }
    fn shared_get(&self, key: &str) -> Option<Vec<u8>> {
        calls::shared_get(key)
    }
    fn shared_set(&mut self, key: &str, value: &[u8]) -> bool {
        calls::shared_set(key, value)
    }
    fn shared_get_cas(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        calls::shared_get_cas(key)
    }
    fn shared_set_cas(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        calls::shared_set_cas(key, value, cas)
    }
    fn forward_request(&mut self, set: &[(String, String)], body_len: usize, body: &[u8]) -> bool {
        calls::forward_request(set, &crate::driver::KEPT_HEADERS, body_len, body)
    }
    fn resume_request(&mut self) -> bool {
        calls::resume_request()
    }
    fn wake_root(&mut self) {
        if self.woke.replace(true) {
            return; // already asked
        }
        let queued = self.wake_queue.get().is_some_and(|q| calls::enqueue(q, b"w"));
        if !queued {
            calls::set_tick(Duration::from_millis(1));
            self.tick_poked.set(true);
        }
    }
    fn response_header(&self, name: &str) -> Option<String> {
        calls::response_header(name)
    }
    fn set_response_header(&mut self, name: &str, value: Option<&str>) -> bool {
        calls::set_response_header(name, value)
    }
    fn response_body(&self, size: usize) -> Vec<u8> {
        calls::response_body(size)
    }
    fn set_response_body(&mut self, len: usize, body: &[u8]) -> bool {
        calls::set_response_body(len, body)
    }
    fn reset_response(&mut self) {
        calls::reset_response()
    }
    fn log(&mut self, level: LogLevel, message: &str) {
        calls::log(level, message)
    }
    fn count(&mut self, counter: &Counter, by: u64) {
        self.metrics.count(counter, by)
    }
    fn observe(&mut self, histogram: Histogram, value: u64) {
        self.metrics.observe(histogram, value)
    }
    fn gauge(&mut self, gauge: &Gauge, value: u64) {
        self.metrics.set(gauge, value)
    }
}

fn action(verdict: Verdict) -> Action {
    match verdict {
        Verdict::Continue => Action::Continue,
        Verdict::Pause => Action::Pause,
    }
}

/// Streams the root must reach (coalescing, `driver_flight.rs`): followers waiting for a
/// lease, and leaders whose calls the root sends, by context id. A leader whose client left
/// stays here, detached, until its calls are answered.
#[derive(Default)]
struct Parked {
    streams: RefCell<BTreeMap<u32, Rc<RefCell<StreamDriver>>>>,
}

impl Parked {
    /// Keeps or lets go of a stream, as it says.
    fn sync(&self, context_id: u32, driver: &Rc<RefCell<StreamDriver>>) {
        let parked = driver.try_borrow().is_ok_and(|d| d.is_parked());
        let mut streams = self.streams.borrow_mut();
        if parked {
            streams.entry(context_id).or_insert_with(|| driver.clone());
        } else {
            streams.remove(&context_id);
        }
    }

    fn all(&self) -> Vec<(u32, Rc<RefCell<StreamDriver>>)> {
        self.streams.borrow().iter().map(|(id, d)| (*id, d.clone())).collect()
    }

    fn owner_of(&self, token: u32) -> Option<(u32, Rc<RefCell<StreamDriver>>)> {
        let streams = self.streams.borrow();
        streams.iter().find(|(_, d)| d.try_borrow().is_ok_and(|d| d.owns_call(token))).map(|(id, d)| (*id, d.clone()))
    }
}

struct Root {
    driver: WorkerDriver,
    host: ProxyHost,
    parked: Rc<Parked>,
    /// The tick period the worker asked for at configure time (0: none), and the one set now.
    base_tick_ms: u64,
    tick_ms: u64,
}

impl Root {
    /// Runs `f` on a parked stream, with it as the effective context while its client is
    /// there, then keeps or lets go of it.
    fn drive(
        &mut self,
        context_id: u32,
        driver: &Rc<RefCell<StreamDriver>>,
        f: impl FnOnce(&mut StreamDriver, &mut ProxyHost),
    ) {
        if let Ok(mut d) = driver.try_borrow_mut() {
            // A stream whose context is gone must not answer through whichever was set last.
            let here = d.is_detached() || proxy_wasm::hostcalls::set_effective_context(context_id).is_ok();
            if here {
                f(&mut d, &mut self.host);
            }
        }
        self.parked.sync(context_id, driver);
    }

    /// Sends leaders' calls and looks at followers' leases.
    fn serve_parked(&mut self) {
        self.host.woke.set(false);
        for (context_id, driver) in self.parked.all() {
            self.drive(context_id, &driver, |d, host| d.on_root_tick(host));
        }
        self.retick();
    }

    /// The tick period now: quick while streams wait, the worker's own otherwise; set again
    /// after a stream asked for an immediate tick.
    fn retick(&mut self) {
        let want = if self.parked.streams.borrow().is_empty() {
            self.base_tick_ms
        } else if self.base_tick_ms == 0 {
            FOLLOW_POLL_MS
        } else {
            self.base_tick_ms.min(FOLLOW_POLL_MS)
        };
        if want != self.tick_ms || self.host.tick_poked.replace(false) {
            calls::set_tick(Duration::from_millis(want));
            self.tick_ms = want;
        }
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        match self.parked.owner_of(token_id) {
            Some((context_id, driver)) => {
                self.drive(context_id, &driver, |d, host| {
                    d.on_root_call_response(host, token_id, num_headers, body_size)
                });
                self.retick();
            }
            None => self.driver.on_call_response(&mut self.host, token_id, num_headers, body_size),
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = calls::plugin_configuration();
        let env = |name: &str| std::env::var(name).ok();
        match self.driver.configure(&mut self.host, &config, &env) {
            Ok(tick_ms) => {
                if let Some(ms) = tick_ms {
                    calls::set_tick(Duration::from_millis(ms));
                }
                self.base_tick_ms = tick_ms.unwrap_or(0);
                self.tick_ms = self.base_tick_ms;
                // A queue of this VM's own (a name no other worker uses: the last VM to
                // register a name would get every worker's items).
                let mut id = [0u8; 8];
                if calls::random(&mut id) {
                    let name = format!("gemini_image.wake.{}", u64::from_le_bytes(id));
                    self.host.wake_queue.set(calls::register_queue(&name));
                }
                if let Some(settings) = self.driver.settings() {
                    self.host.metrics = Rc::new(Metrics::define(settings));
                }
                true
            }
            Err(_) => false,
        }
    }

    fn on_tick(&mut self) {
        self.driver.on_tick(&mut self.host);
        self.serve_parked();
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        calls::drain(queue_id);
        self.serve_parked();
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let driver = Rc::new(RefCell::new(self.driver.new_stream()?));
        Some(Box::new(Stream { driver, host: self.host.clone(), parked: self.parked.clone(), context_id }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    driver: Rc<RefCell<StreamDriver>>,
    host: ProxyHost,
    parked: Rc<Parked>,
    context_id: u32,
}

impl Stream {
    /// Runs one callback on the driver, then lets the root reach it if it must.
    fn with<T>(&mut self, otherwise: T, f: impl FnOnce(&mut StreamDriver, &mut ProxyHost) -> T) -> T {
        let out = match self.driver.try_borrow_mut() {
            Ok(mut d) => f(&mut d, &mut self.host),
            Err(_) => otherwise,
        };
        self.parked.sync(self.context_id, &self.driver);
        out
    }
}

impl Context for Stream {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        self.with((), |d, host| d.on_call_response(host, token_id, num_headers, body_size));
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(self.with(Verdict::Continue, |d, host| d.on_request_headers(host, end_of_stream)))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.with(Verdict::Continue, |d, host| d.on_request_body(host, body_size, end_of_stream)))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        action(self.with(Verdict::Continue, |d, host| d.on_request_trailers(host)))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(self.with(Verdict::Continue, |d, host| d.on_response_headers(host, end_of_stream)))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.with(Verdict::Continue, |d, host| d.on_response_body(host, body_size, end_of_stream)))
    }

    fn on_log(&mut self) {
        // A leader whose client left stays parked (detached) until its calls are answered.
        self.with((), |d, host| d.on_log(host));
    }
}
