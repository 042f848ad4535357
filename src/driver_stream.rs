//! The driver's side of streamed answers (contract sections 12 and 14). Call-outs deliver a
//! response whole, so a stream cannot be a call-out: the client's own request, held since its
//! headers, is rewritten into Gemini's `streamGenerateContent` (path, authority, credential,
//! body, and the internal route's header naming the backend's cluster) and let go; Envoy's
//! router sends it, and the answer comes back through the response callbacks, where the
//! exchange turns Gemini's events into OpenAI's piece by piece. Measured facts behind each
//! step: DESIGN.md, "Streaming".

use super::*;
use crate::exchange::{StreamCut, StreamHead};
use crate::openai;

/// The request header of the internal upstream route: the cluster to send to. Only the
/// filter sets it; a client request that carries it is refused.
pub const UPSTREAM_HEADER: &str = "x-gemini-image-filter-upstream";

/// Client headers that go upstream with a streamed request: tracing, and
/// `x-forwarded-proto`, without which Envoy matches no route at all (its route table takes a
/// request without it for one it rejected). The client's `authorization`, cookies, addresses
/// and `accept-encoding` never reach Google.
pub const KEPT_HEADERS: [&str; 4] = ["x-request-id", "traceparent", "tracestate", "x-forwarded-proto"];

/// As on every other answer of the filter: no trace of the router's timing, and none of
/// Google's transport headers.
fn drop_upstream_headers(host: &mut dyn Host) {
    for name in [
        "x-envoy-upstream-service-time",
        "alt-svc",
        "server-timing",
        "vary",
        "x-xss-protection",
        "x-frame-options",
        "x-content-type-options",
    ] {
        host.set_response_header(name, None);
    }
}

/// What a streamed request's response is, to the filter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum Response {
    /// Not (yet) a stream of ours: a local reply, or nothing came.
    #[default]
    Untouched,
    /// Gemini's 200: events are transformed as they pass.
    Events,
    /// Gemini refused: headers and body are held until the body is whole.
    Held { status: u32, content_type: Option<String>, retry_after_s: Option<u64> },
}

/// One stream's upstream request, once it is streamed.
#[derive(Debug, Default)]
pub(super) struct Upstream {
    /// Set while a request callback runs: a rewrite then goes on by the callback's verdict.
    pub in_request_callback: bool,
    /// The request body Envoy holds, replaced when the request is rewritten.
    pub request_body_len: usize,
    forwarded: bool,
    resumed: bool,
    key: Option<KeyRef>,
    sent_ms: u64,
    timeout_ms: u64,
    response: Response,
    /// While a held error is written over the response: the length of its held body.
    rewriting: Option<usize>,
}

impl Upstream {
    /// Whether a reply now goes over a held upstream response instead of a local reply.
    pub fn rewrites_response(&self) -> bool {
        self.rewriting.is_some()
    }
}

impl StreamDriver {
    /// The verdict of a request callback: a request rewritten for upstream goes on; anything
    /// else stays held (a body still arriving, or answered locally).
    pub(super) fn request_verdict(&mut self) -> Verdict {
        if self.upstream.forwarded && !self.replied {
            self.upstream.resumed = true;
            Verdict::Continue
        } else {
            Verdict::Pause
        }
    }

    /// A request rewritten outside its request callbacks (after an L2 lookup) goes on.
    pub(super) fn resume_if_forwarded(&mut self, host: &mut dyn Host) {
        let u = &mut self.upstream;
        if u.forwarded && !u.resumed && !u.in_request_callback && !self.replied {
            u.resumed = true;
            if !host.resume_request() {
                host.log(LogLevel::Error, "gemini-image-filter: the host refused to resume a streamed request");
            }
        }
    }

    /// A client request that names an upstream cluster: 404 before any route is used.
    pub(super) fn refuse_upstream_header(&mut self, host: &mut dyn Host) -> Verdict {
        let mut e =
            ApiError::new(ErrorCode::InvalidRequest, format!("the {UPSTREAM_HEADER} header is the gateway's own"));
        e.status_override = Some(404);
        let reply = Reply {
            status: 404,
            headers: vec![
                ("content-type".to_string(), "application/json".to_string()),
                ("x-should-retry".to_string(), "false".to_string()),
            ],
            body: Rc::new(openai::error_body(&e)),
        };
        self.replied = true;
        if !host.send_reply(&reply) {
            host.log(LogLevel::Error, "gemini-image-filter: the host refused the local reply");
        }
        host.log(
            LogLevel::Warn,
            "gemini-image-filter: refused a client request that carried the upstream route's header",
        );
        Verdict::Pause
    }

    /// Rewrites the held request into Gemini's stream call on the first usable key, and
    /// says where it went (or why it could not go: the client then gets the JSON error).
    pub(super) fn forward(
        &mut self,
        host: &mut dyn Host,
        body: &Rc<Vec<u8>>,
        upstream: &str,
        deadline_ms: u64,
    ) -> Result<CallMeta, ApiError> {
        let settings = self.settings.clone();
        let backends = &settings.backends;
        let now = host.now_ms();
        let key = match self.pick_key(host, &Attempts::default(), now) {
            Pick::Use(key) => key,
            Pick::NoneLeft => {
                let reader: &dyn Host = host;
                let mut cooldown = |k: KeyRef| read_cooldown(reader, backends, k);
                return Err(backends::none_left(backends, &mut cooldown, now));
            }
        };
        let Some(backend) = backends.list.get(key.backend) else {
            return Err(ApiError::new(ErrorCode::InternalError, "the gateway picked a backend it does not have"));
        };
        // The router's timeout for this request: what is left of the request's deadline.
        let timeout_ms = deadline_ms.saturating_sub(now).max(1);
        let call = upstream_call(&settings, host, key, backend.stream_path(upstream), body.clone(), timeout_ms);
        let mut headers = call.headers;
        headers.push(("content-length".to_string(), body.len().to_string()));
        headers.push(("accept".to_string(), "text/event-stream".to_string()));
        headers.push((UPSTREAM_HEADER.to_string(), call.cluster));
        headers.push(("x-envoy-upstream-rq-timeout-ms".to_string(), timeout_ms.to_string()));
        if !host.forward_request(&headers, self.upstream.request_body_len, body) {
            host.log(LogLevel::Error, "gemini-image-filter: the host refused to rewrite a streamed request");
            return Err(ApiError::new(ErrorCode::InternalError, "the gateway could not send the request to Gemini"));
        }
        let u = &mut self.upstream;
        u.forwarded = true;
        u.key = Some(key);
        u.sent_ms = now;
        u.timeout_ms = timeout_ms;
        Ok(CallMeta { backend: key.backend, attempts: 1 })
    }

    pub(super) fn stream_response_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Verdict {
        if !self.upstream.forwarded || self.upstream.response != Response::Untouched {
            return Verdict::Continue;
        }
        let status = host.response_header(":status").and_then(|s| s.trim().parse::<u32>().ok()).unwrap_or(0);
        let Some(ex) = self.exchange.as_mut() else { return Verdict::Continue };
        if end_of_stream && status == 200 {
            // A 200 with no body: no event can follow these headers, but they have not gone
            // out yet, so the client gets the JSON error a call-out would have given.
            let _ = ex.on_upstream_headers(status);
            self.upstream.response = Response::Held { status, content_type: None, retry_after_s: None };
            self.held_error(host, Vec::new());
            return Verdict::Pause;
        }
        match ex.on_upstream_headers(status) {
            StreamHead::NotOurs => Verdict::Continue,
            StreamHead::Events(headers) => {
                host.set_response_header("content-length", None);
                drop_upstream_headers(host);
                for (name, value) in &headers {
                    host.set_response_header(name, Some(value));
                }
                self.upstream.response = Response::Events;
                let now = host.now_ms();
                if let Some(key) = self.upstream.key {
                    self.count_attempt(host, key, AttemptOutcome::Ok, now.saturating_sub(self.upstream.sent_ms));
                }
                Verdict::Continue
            }
            StreamHead::Hold => {
                self.upstream.response = Response::Held {
                    status,
                    content_type: host.response_header("content-type"),
                    retry_after_s: host.response_header("retry-after").and_then(|v| v.trim().parse().ok()),
                };
                if end_of_stream {
                    // No body will come: the error is a local reply in place of the response.
                    self.held_error(host, Vec::new());
                }
                Verdict::Pause
            }
        }
    }

    pub(super) fn stream_response_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Verdict {
        match self.upstream.response {
            Response::Untouched => Verdict::Continue,
            Response::Events => {
                let chunk = host.response_body(body_size);
                let now = host.now_ms();
                match self.exchange.as_mut().and_then(|ex| ex.on_upstream_body(&chunk, end_of_stream, now)) {
                    Some((mut out, mut effects)) => {
                        // What the stream holds counts in the worker's bounds, as a call-out's
                        // answer does: past them, the stream ends with an error event.
                        let holds = self.exchange.as_ref().and_then(Exchange::stream_held_bytes).unwrap_or(0);
                        let reserved = self.held.unwrap_or(0);
                        if holds > reserved && !self.grow(holds - reserved) {
                            let mut e = ApiError::new(
                                ErrorCode::Overloaded,
                                format!("Gemini's stream holds {holds} bytes, more than this gateway worker may hold right now"),
                            );
                            e.retry_after = Some(crate::exchange::OVERLOADED_RETRY_AFTER_S);
                            if let Some((more, ended)) = self.exchange.as_mut().and_then(|ex| ex.abort_stream(e, now)) {
                                out.extend(more);
                                effects.extend(ended);
                            }
                        }
                        if !host.set_response_body(body_size, &out) {
                            host.log(LogLevel::Error, "gemini-image-filter: the host refused a stream's events");
                        }
                        self.run(host, effects);
                    }
                    // The stream has ended (completed or failed): nothing more of Gemini's goes out.
                    None => {
                        host.set_response_body(body_size, &[]);
                    }
                }
                Verdict::Continue
            }
            Response::Held { .. } if !end_of_stream => Verdict::Pause,
            Response::Held { .. } => {
                let body = host.response_body(body_size);
                self.upstream.rewriting = Some(body_size);
                self.held_error(host, body);
                self.upstream.rewriting = None;
                Verdict::Continue
            }
        }
    }

    /// A stream that ends without its last piece: Envoy's own account of why (its response
    /// code details) tells a client that left from a timeout or Gemini's connection breaking.
    pub(super) fn note_stream_cut(&mut self, host: &mut dyn Host) {
        if self.upstream.response != Response::Events {
            return;
        }
        let details = host.property(&["response", "code_details"]).map(|d| String::from_utf8_lossy(&d).into_owned());
        let cut = match details.as_deref() {
            Some(d) if d.contains("downstream") => StreamCut::ClientLeft,
            Some(d) if d.contains("timeout") => StreamCut::TimedOut,
            _ => StreamCut::Upstream,
        };
        if let Some(ex) = self.exchange.as_mut() {
            ex.on_stream_cut(cut);
        }
    }

    /// Gemini refused the stream with this body: the key cools down as after a call-out, and
    /// the client gets the error a call-out would have given.
    fn held_error(&mut self, host: &mut dyn Host, body: Vec<u8>) {
        let Response::Held { status, content_type, retry_after_s } = self.upstream.response.clone() else { return };
        let now = host.now_ms();
        let response = CallResponse {
            status: Some(status),
            content_type,
            body,
            refused_bytes: None,
            retry_after_s,
            elapsed_ms: now.saturating_sub(self.upstream.sent_ms),
            timeout_ms: self.upstream.timeout_ms,
        };
        let outcome = gemini::read_call(response);
        if let Some(key) = self.upstream.key {
            self.count_attempt(host, key, AttemptOutcome::of(&outcome), now.saturating_sub(self.upstream.sent_ms));
            if let Next::Cool(reason) = backends::next_after(&outcome) {
                self.cool_key(host, key, reason, &outcome, now);
            }
        }
        let effects = match self.exchange.as_mut() {
            Some(ex) => ex.on_upstream_error(outcome, now),
            None => Vec::new(),
        };
        self.run(host, effects);
    }

    /// Writes a reply over the held upstream response: status, headers, body.
    pub(super) fn rewrite_response(&mut self, host: &mut dyn Host, reply: &Reply) {
        let Some(len) = self.upstream.rewriting else { return };
        drop_upstream_headers(host);
        let mut ok = host.set_response_header(":status", Some(&reply.status.to_string()));
        for (name, value) in &reply.headers {
            ok &= host.set_response_header(name, Some(value));
        }
        ok &= host.set_response_header("content-length", Some(&reply.body.len().to_string()));
        ok &= host.set_response_body(len, &reply.body);
        if !ok {
            host.log(LogLevel::Error, "gemini-image-filter: the host refused to rewrite a refused stream's answer");
        }
    }
}

#[cfg(test)]
#[path = "driver_stream_tests.rs"]
mod tests;
