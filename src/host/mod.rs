//! The thin glue between Envoy and the core: each proxy-wasm callback is handed to the
//! driver (`crate::driver`) with `ProxyHost`, the `Host` made of proxy-wasm host calls. No
//! decision is made here.

mod calls;
mod metrics;

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel as HostLevel};

use crate::access_log::LogLevel;
use crate::driver::{Host, StreamDriver, Verdict, WorkerDriver};
use crate::exchange::{HttpCall, Reply};
use crate::metrics::{Counter, Gauge, Histogram};
use metrics::Metrics;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(HostLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { driver: WorkerDriver::default(), host: ProxyHost { metrics: Rc::new(Metrics::default()) } })
    });
}}

/// The `Host` over proxy-wasm: one host call per method.
#[derive(Clone)]
struct ProxyHost {
    metrics: Rc<Metrics>,
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

struct Root {
    driver: WorkerDriver,
    host: ProxyHost,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        self.driver.on_call_response(&mut self.host, token_id, num_headers, body_size);
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
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let driver = self.driver.new_stream()?;
        Some(Box::new(Stream { driver, host: self.host.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    driver: StreamDriver,
    host: ProxyHost,
}

impl Context for Stream {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        self.driver.on_call_response(&mut self.host, token_id, num_headers, body_size);
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(self.driver.on_request_headers(&mut self.host, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.driver.on_request_body(&mut self.host, body_size, end_of_stream))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        action(self.driver.on_request_trailers(&mut self.host))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(self.driver.on_response_headers(&mut self.host, end_of_stream))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.driver.on_response_body(&mut self.host, body_size, end_of_stream))
    }

    fn on_log(&mut self) {
        self.driver.on_log(&mut self.host);
    }
}
