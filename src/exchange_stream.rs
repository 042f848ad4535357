//! The streamed answer of an exchange (contract section 12). The driver sends the client's own
//! request upstream, rewritten into one `streamGenerateContent` call (`Effect::Forward`, then
//! `on_forwarded`); Gemini's answer comes back through `on_upstream_headers` and
//! `on_upstream_body`, turned into OpenAI's events by `stream::StreamTransform` piece by piece.
//! A Gemini refusal before any event (a non-200 status) becomes the usual JSON error
//! (`on_upstream_error`); a failure after the events started ends the stream with an error
//! event. A complete stream is stored in the cache as any other answer.

use super::*;
use crate::request::StreamAsk;
use crate::stream::{EventMeta, StreamKind, StreamOptions, StreamState, StreamTransform};

/// The one upstream call of a streamed answer.
pub(super) struct Streamed {
    /// One slot, for the log line's backend, attempts and upstream latency.
    calls: Calls,
    /// Gemini's status, once its headers came.
    status: Option<u32>,
    transform: StreamTransform,
    /// Why it ended early, when it did.
    cut: Option<StreamCut>,
}

/// What the driver does with the response headers of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamHead {
    /// Not a streamed answer of this filter: leave the response alone.
    NotOurs,
    /// Events follow: set these headers, and drop `content-length` (the body changes).
    Events(Vec<(String, String)>),
    /// Gemini refused: hold the headers, buffer the body, and give it to
    /// `on_upstream_error` at its end.
    Hold,
}

/// Why a stream ended before its last piece, as Envoy tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamCut {
    /// The client went away.
    ClientLeft,
    /// The router's timeout (what was left of `gemini.timeout_ms`) or an idle timeout.
    TimedOut,
    /// Gemini's connection broke off.
    Upstream,
}

/// The headers of an event stream, over an answer's common ones.
pub(super) fn event_stream_headers(headers: &mut Vec<(String, String)>) {
    for (name, value) in headers.iter_mut() {
        if name == "content-type" {
            *value = "text/event-stream".to_string();
        }
    }
    headers.push(("cache-control".to_string(), "no-cache".to_string()));
}

impl Phase {
    fn into_forwarding(self) -> Result<Box<Planned>, Phase> {
        match self {
            Phase::Forwarding(p) => Ok(p),
            other => Err(other),
        }
    }

    fn into_streaming(self) -> Result<(Box<Planned>, Box<Streamed>), Phase> {
        match self {
            Phase::Streaming(p, s) => Ok((p, s)),
            other => Err(other),
        }
    }
}

impl Exchange {
    /// What every event of this request repeats.
    pub(super) fn event_meta(&self, ask: StreamAsk, now_ms: u64) -> EventMeta {
        EventMeta {
            kind: StreamKind::for_endpoint(self.endpoint).unwrap_or(StreamKind::Generation),
            created_at: now_ms / 1000,
            quality: ask.quality.to_string(),
            background: ask.background.to_string(),
        }
    }

    /// The driver sent the request upstream on this backend (`Ok`), or could not (`Err`: no
    /// usable key, the host refused): then the usual JSON error.
    pub fn on_forwarded(&mut self, sent: Result<CallMeta, ApiError>, now_ms: u64) -> Vec<Effect> {
        let Some(planned) = self.take(Phase::into_forwarding) else { return Vec::new() };
        let (meta, ask) = match (sent, planned.req.stream) {
            (Ok(meta), Some(ask)) => (meta, ask),
            (Err(e), _) => {
                let ending = Ending::new(e.status(), Outcome::Error, Some(&planned));
                return self.error_reply(e, ending, now_ms);
            }
            (Ok(_), None) => {
                let e = ApiError::new(ErrorCode::InternalError, "a request that does not stream was forwarded");
                let ending = Ending::new(e.status(), Outcome::Error, Some(&planned));
                return self.error_reply(e, ending, now_ms);
            }
        };
        let options = StreamOptions {
            meta: self.event_meta(ask, now_ms),
            partial_images: ask.partial_images,
            max_event_bytes: self.settings.streaming.max_event_bytes,
        };
        let calls = Calls { outcomes: vec![None], metas: vec![Some(meta)], started_ms: now_ms };
        let streamed = Streamed { calls, status: None, transform: StreamTransform::new(options), cut: None };
        self.phase = Phase::Streaming(planned, Box::new(streamed));
        Vec::new()
    }

    /// Gemini's status arrived. 200: the client gets an event stream, with the headers every
    /// answer carries (`x-image-cost-usd` says what the image costs when it completes: a
    /// stream's headers go before its outcome). Anything else is held for its body.
    pub fn on_upstream_headers(&mut self, status: u32) -> StreamHead {
        let price = match &self.phase {
            Phase::Streaming(p, s) if s.status.is_none() => self.price_per_image(&p.req),
            _ => return StreamHead::NotOurs,
        };
        if let Phase::Streaming(_, s) = &mut self.phase {
            s.status = Some(status);
        }
        if status != 200 {
            return StreamHead::Hold;
        }
        let mut headers = self.common_headers();
        event_stream_headers(&mut headers);
        for (name, value) in headers.iter_mut() {
            if name == "x-image-cost-usd" {
                *value = crate::policy::usd(price);
            }
        }
        StreamHead::Events(headers)
    }

    /// A piece of Gemini's event stream: the bytes the client gets in its place (often none
    /// while an event is incomplete), and at the stream's end the log line, counters and
    /// cache writes. `None`: not a stream this exchange is reading (the driver then sends
    /// nothing of it).
    pub fn on_upstream_body(
        &mut self,
        chunk: &[u8],
        end_of_stream: bool,
        now_ms: u64,
    ) -> Option<(Vec<u8>, Vec<Effect>)> {
        let Phase::Streaming(_, s) = &mut self.phase else { return None };
        if s.status != Some(200) {
            return None;
        }
        let out = s.transform.on_body(chunk, end_of_stream);
        let ended = *s.transform.state() != StreamState::Open;
        let effects = if ended { self.stream_ended(now_ms) } else { Vec::new() };
        Some((out, effects))
    }

    /// What the stream holds in memory now (an unfinished event, the final image), while it
    /// is read.
    pub fn stream_held_bytes(&self) -> Option<u64> {
        match &self.phase {
            Phase::Streaming(_, s) => Some(s.transform.held_bytes() as u64),
            _ => None,
        }
    }

    /// Ends an open stream with `e` (the worker has no room for what it holds): the error
    /// event, and the log line and counters.
    pub fn abort_stream(&mut self, e: ApiError, now_ms: u64) -> Option<(Vec<u8>, Vec<Effect>)> {
        let Phase::Streaming(_, s) = &mut self.phase else { return None };
        let out = s.transform.abort(e);
        Some((out, self.stream_ended(now_ms)))
    }

    /// Gemini refused the stream before any event: the usual JSON error (its `Reply` effect
    /// is written over the held response by the driver).
    pub fn on_upstream_error(&mut self, outcome: CallOutcome, now_ms: u64) -> Vec<Effect> {
        let Some((planned, streamed)) = self.take(Phase::into_streaming) else { return Vec::new() };
        let e = match outcome.result {
            Err(e) => e,
            Ok(_) => ApiError::new(ErrorCode::UpstreamError, "Gemini's stream could not be read"),
        };
        let mut ending = Ending::new(e.status(), Outcome::Error, Some(&planned));
        ending.calls = Some(&streamed.calls);
        ending.upstream_status = Some(outcome.upstream_status);
        self.error_reply(e, ending, now_ms)
    }

    /// The stream completed (or ended with its error event): log, count, and store a
    /// complete image.
    fn stream_ended(&mut self, now_ms: u64) -> Vec<Effect> {
        let Some((planned, streamed)) = self.take(Phase::into_streaming) else { return Vec::new() };
        let transform = &streamed.transform;
        let created = now_ms / 1000;
        let mut effects = Vec::new();
        let image = transform.final_image();
        let usage = transform.usage();
        let mut ending = match (&image, transform.error()) {
            (Some(image), _) => {
                self.cost_micro = self.price_per_image(&planned.req);
                let (stores, _) = self.store(&planned, std::slice::from_ref(image), usage, created);
                effects.extend(stores);
                effects.push(Effect::Count(Counter::Images, 1));
                let mut ending = Ending::new(200, Outcome::Success, Some(&planned));
                ending.images = 1;
                ending
            }
            (None, error) => {
                let e = error
                    .cloned()
                    .unwrap_or_else(|| ApiError::new(ErrorCode::InternalError, "the stream ended without an outcome"));
                effects.push(Effect::Count(Counter::Errors(e.code), 1));
                if let (ErrorCode::SafetyBlocked, Some(level)) = (e.code, self.known.safety) {
                    effects.push(Effect::Count(Counter::SafetyBlocks(level), 1));
                }
                // The client got a 200 and then this error event: the log says both.
                let mut ending = Ending::new(200, Outcome::Error, Some(&planned));
                ending.error = Some(e.code);
                ending
            }
        };
        ending.calls = Some(&streamed.calls);
        ending.upstream_status = streamed.status;
        ending.usage = usage;
        let mut reported = self.report(&ending, now_ms);
        reported.extend(effects);
        reported
    }

    /// Records why the stream is ending early, before `on_abandoned` logs it.
    pub fn on_stream_cut(&mut self, cut: StreamCut) {
        if let Phase::Streaming(_, s) = &mut self.phase {
            s.cut = Some(cut);
        }
    }

    /// The stream ended without its last piece: the client left, the router's timeout cut it,
    /// or Gemini's connection broke off (Envoy then resets the client's stream too; no event
    /// can be added).
    pub(super) fn stream_cut(&mut self, planned: Box<Planned>, streamed: Box<Streamed>, now_ms: u64) -> Vec<Effect> {
        let failed = |status: u32, code: ErrorCode| {
            let mut ending = Ending::new(status, Outcome::Error, Some(&planned));
            ending.error = Some(code);
            ending
        };
        let mut ending = match (streamed.status, streamed.cut) {
            (Some(200), Some(StreamCut::TimedOut)) => failed(504, ErrorCode::NetworkError),
            (Some(200), Some(StreamCut::Upstream) | None) => failed(502, ErrorCode::NetworkError),
            _ => Ending::new(499, Outcome::ClientClosed, Some(&planned)),
        };
        ending.calls = Some(&streamed.calls);
        ending.upstream_status = streamed.status;
        let mut effects = self.report(&ending, now_ms);
        if let Some(code) = ending.error {
            effects.push(Effect::Count(Counter::Errors(code), 1));
        }
        effects
    }
}
