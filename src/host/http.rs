//! The HTTP context: request events in, the exchange's effects out.

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::calls;
use super::metrics::Metrics;
use super::writes;
use crate::access_log::LogLevel;
use crate::cache;
use crate::config::Settings;
use crate::exchange::{Effect, Exchange, RequestHead};
use crate::gemini::CallResponse;
use crate::hot::HotSet;
use crate::metrics::Counter;

/// What a call-out in flight is for.
#[derive(Clone, Copy)]
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
}

pub struct ImageHttp {
    settings: Rc<Settings>,
    metrics: Rc<Metrics>,
    hot: Rc<RefCell<HotSet>>,
    /// Present only for image requests.
    exchange: Option<Exchange>,
    calls: Vec<PendingCall>,
    replied: bool,
}

impl ImageHttp {
    pub fn new(settings: Rc<Settings>, metrics: Rc<Metrics>, hot: Rc<RefCell<HotSet>>) -> ImageHttp {
        ImageHttp { settings, metrics, hot, exchange: None, calls: Vec::new(), replied: false }
    }

    /// Feeds an event to the exchange and carries out what it asks, until it asks nothing.
    fn feed(&mut self, event: impl FnOnce(&mut Exchange) -> Vec<Effect>) {
        let effects = match self.exchange.as_mut() {
            Some(ex) => event(ex),
            None => Vec::new(),
        };
        self.run(effects);
    }

    fn run(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::CallGemini { count, call } => {
                    for index in 0..count {
                        let sent_ms = calls::now_ms();
                        match calls::dispatch(&call.cluster, &call.headers, &call.body, call.timeout_ms) {
                            Ok(token) => self.calls.push(PendingCall {
                                token,
                                kind: CallKind::Gemini(index),
                                sent_ms,
                                timeout_ms: call.timeout_ms,
                            }),
                            Err(status) => {
                                let why = format!("dispatch to cluster {:?} failed ({status:?})", call.cluster);
                                self.feed(|ex| ex.on_call_not_dispatched(index, &why, calls::now_ms()));
                            }
                        }
                    }
                }
                Effect::LookupL1 { key, max_entries, format } => {
                    let now = calls::now_ms();
                    let hot = self.hot.try_borrow_mut().ok().and_then(|mut h| h.get(&key.key, format, now / 1000));
                    match hot {
                        Some(entry) => self.feed(|ex| ex.on_l1_hot(entry, now)),
                        None => {
                            let read = cache::l1_lookup(&mut calls::shared_get, &key, max_entries, now / 1000);
                            self.feed(|ex| ex.on_l1_result(read, now));
                        }
                    }
                }
                Effect::RememberHot { key, format, entry } => {
                    if let Ok(mut h) = self.hot.try_borrow_mut() {
                        h.put(&key, format, entry);
                    }
                }
                Effect::StoreL1 { meta_key, meta, data_key, data } => {
                    // Data first: a reader that sees the new meta finds the new data, and the
                    // key inside the data catches the other order.
                    if calls::shared_set(&data_key, &data) {
                        calls::shared_set(&meta_key, &meta);
                    }
                }
                Effect::CallL2 { call } => {
                    let sent_ms = calls::now_ms();
                    match calls::dispatch(&call.cluster, &call.headers, &call.body, call.timeout_ms) {
                        Ok(token) => self.calls.push(PendingCall {
                            token,
                            kind: CallKind::CacheGet,
                            sent_ms,
                            timeout_ms: call.timeout_ms,
                        }),
                        Err(_) => self.feed(|ex| ex.on_l2_response(CallResponse::default(), calls::now_ms())),
                    }
                }
                Effect::WriteL2 { call, entry } => {
                    if !writes::push(writes::Write { call, entry }) {
                        self.metrics.count(&Counter::CacheL2Errors, 1);
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
        self.feed(|ex| ex.on_body(&body, calls::now_ms()));
    }
}

impl Context for ImageHttp {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        let Some(pos) = self.calls.iter().position(|c| c.token == token_id) else { return };
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
        match call.kind {
            CallKind::Gemini(index) => self.feed(|ex| ex.on_call_response(index, response, now)),
            CallKind::CacheGet => self.feed(|ex| ex.on_l2_response(response, now)),
        }
    }
}

impl HttpContext for ImageHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // The path first: on pass-through traffic that is the only host call.
        let is_image = calls::request_header(":path").is_some_and(|p| crate::request::is_generations_path(&p))
            && calls::request_header(":method").as_deref() == Some("POST");
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
        self.exchange = Some(Exchange::new(self.settings.clone(), head, now));
        self.feed(|ex| ex.on_headers(now));
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
        if self.exchange.is_none() {
            return Action::Continue;
        }
        if self.replied {
            return Action::Pause;
        }
        self.feed(|ex| ex.on_body_progress(body_size, calls::now_ms()));
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
        let now = calls::now_ms();
        let effects = match self.exchange.as_mut() {
            Some(ex) if !ex.is_done() => ex.on_abandoned(now),
            _ => Vec::new(),
        };
        self.run(effects);
    }
}
