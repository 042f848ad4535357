//! The thin glue between Envoy and the pure core: the root context reads the configuration,
//! the HTTP context feeds request events to an `Exchange` and carries out its effects.

mod calls;
mod metrics;

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel as HostLevel};

use crate::access_log::LogLevel;
use crate::config::Settings;
use crate::exchange::{Effect, Exchange, RequestHead};
use crate::gemini::CallResponse;
use metrics::Metrics;

/// The path the filter answers; everything else passes through untouched.
const GENERATIONS_PATH: &str = "/v1/images/generations";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(HostLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { settings: None, metrics: Rc::new(Metrics::default()) }) });
}}

struct Root {
    settings: Option<Rc<Settings>>,
    metrics: Rc<Metrics>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = calls::plugin_configuration();
        let env = |name: &str| std::env::var(name).ok();
        match Settings::from_json(&config, &env) {
            Ok(settings) => {
                for w in &settings.warnings {
                    calls::log(LogLevel::Warn, &format!("gemini-image-filter: {w}"));
                }
                calls::log(
                    LogLevel::Info,
                    &format!(
                        "gemini-image-filter: configured (cluster {}, model {}, safety {} from {:?}, minimum {})",
                        settings.gemini.cluster,
                        settings.gemini.model,
                        settings.safety.default.as_str(),
                        settings.safety.default_source,
                        settings.safety.minimum.as_str()
                    ),
                );
                self.settings = Some(Rc::new(settings));
                self.metrics = Rc::new(Metrics::define());
                true
            }
            Err(e) => {
                calls::log(
                    LogLevel::Error,
                    &format!("gemini-image-filter: invalid configuration, refusing to start: {e}"),
                );
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let settings = self.settings.clone()?;
        Some(Box::new(ImageHttp {
            settings,
            metrics: self.metrics.clone(),
            exchange: None,
            calls: Vec::new(),
            replied: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// A call-out in flight: its token, which of the `n` calls it is, when it left.
struct PendingCall {
    token: u32,
    index: u32,
    sent_ms: u64,
    timeout_ms: u64,
}

struct ImageHttp {
    settings: Rc<Settings>,
    metrics: Rc<Metrics>,
    /// Present only for image requests.
    exchange: Option<Exchange>,
    calls: Vec<PendingCall>,
    replied: bool,
}

impl ImageHttp {
    fn run(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::CallGemini { count, call } => {
                    for index in 0..count {
                        let sent_ms = calls::now_ms();
                        match calls::dispatch(&call.cluster, &call.headers, &call.body, call.timeout_ms) {
                            Ok(token) => {
                                self.calls.push(PendingCall { token, index, sent_ms, timeout_ms: call.timeout_ms })
                            }
                            Err(status) => {
                                let why = format!("dispatch to cluster {:?} failed ({status:?})", call.cluster);
                                let more = match self.exchange.as_mut() {
                                    Some(ex) => ex.on_call_not_dispatched(index, &why, calls::now_ms()),
                                    None => Vec::new(),
                                };
                                self.run(more);
                            }
                        }
                    }
                }
                Effect::Reply(reply) => {
                    if !self.replied {
                        self.replied = true;
                        if calls::send_reply(reply.status, &reply.headers, &reply.body).is_err() {
                            calls::log(LogLevel::Error, "gemini-image-filter: the host refused the local reply");
                        }
                    }
                }
                Effect::Log(line) => calls::log(line.level, &line.json),
                Effect::Count(counter, by) => self.metrics.count(&counter, by),
                Effect::Observe(histogram, value) => self.metrics.observe(histogram, value),
            }
        }
    }

    /// The whole body is buffered: hand it to the exchange.
    fn body_complete(&mut self, size: usize) {
        let body = calls::request_body(size);
        let effects = match self.exchange.as_mut() {
            Some(ex) => ex.on_body(&body, calls::now_ms()),
            None => Vec::new(),
        };
        self.run(effects);
    }
}

impl Context for ImageHttp {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        let Some(pos) = self.calls.iter().position(|c| c.token == token_id) else {
            return;
        };
        let call = self.calls.swap_remove(pos);
        let now = calls::now_ms();
        // Zero headers means the call-out failed (reset, timeout, body over the limit): the
        // header readers must not be used then.
        let (status, content_type) = if num_headers == 0 {
            (None, None)
        } else {
            let status = calls::call_response_header(":status").and_then(|s| s.trim().parse::<u32>().ok());
            (status, calls::call_response_header("content-type"))
        };
        let body = if status.is_some() { calls::call_response_body(body_size) } else { Vec::new() };
        let response = CallResponse {
            status,
            content_type,
            body,
            elapsed_ms: now.saturating_sub(call.sent_ms),
            timeout_ms: call.timeout_ms,
        };
        let effects = match self.exchange.as_mut() {
            Some(ex) => ex.on_call_response(call.index, response, now),
            None => Vec::new(),
        };
        self.run(effects);
    }
}

impl HttpContext for ImageHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let is_image = calls::request_header(":method").as_deref() == Some("POST")
            && calls::request_header(":path").is_some_and(|p| p.split('?').next() == Some(GENERATIONS_PATH));
        if !is_image {
            return Action::Continue;
        }
        let head = RequestHead {
            content_type: calls::request_header("content-type"),
            content_length: calls::request_header("content-length").and_then(|v| v.trim().parse().ok()),
            request_id: calls::request_header("x-request-id"),
            cache_control: calls::request_header("cache-control"),
        };
        let now = calls::now_ms();
        let mut exchange = Exchange::new(self.settings.clone(), head, now);
        let effects = exchange.on_headers(now);
        self.exchange = Some(exchange);
        self.run(effects);
        if end_of_stream && !self.replied {
            self.body_complete(0);
        }
        // Continue lets Envoy deliver the body; the buffer filter after this one holds the
        // headers back from the router.
        if self.replied {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(ex) = self.exchange.as_mut() else {
            return Action::Continue;
        };
        if self.replied {
            return Action::Pause;
        }
        let effects = ex.on_body_progress(body_size, calls::now_ms());
        self.run(effects);
        if !self.replied && end_of_stream {
            self.body_complete(body_size);
        }
        Action::Pause
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.exchange.is_none() {
            return Action::Continue;
        }
        if !self.replied {
            // A body that ended with trailers: take what was buffered.
            self.body_complete(usize::MAX);
        }
        Action::Pause
    }

    fn on_log(&mut self) {
        let effects = match self.exchange.as_mut() {
            Some(ex) if !ex.is_done() => ex.on_abandoned(calls::now_ms()),
            _ => Vec::new(),
        };
        self.run(effects);
    }
}
