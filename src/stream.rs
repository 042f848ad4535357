//! Streaming (contract section 12): Gemini's `streamGenerateContent?alt=sse` turned, chunk by
//! chunk, into OpenAI's image streaming events. Pure: bytes in, bytes out, no host.
//!
//! Two parts:
//! - `SseSplitter` cuts an event stream fed in arbitrary pieces into whole events' payloads
//!   (the joined `data:` lines), holding only the unfinished event, never more than a bound.
//! - `StreamTransform` reads each payload as a `GenerateContentResponse` and writes what the
//!   client gets: a partial-image event per interim (thought) image, up to `partial_images`;
//!   the completed event when the final image and the finish reason have come; or one error
//!   event. After completion or an error it ignores the rest of the stream.
//!
//! What the client receives, per event. Both official SDKs split lines on CR, LF or CRLF, join
//! `data:` lines, dispatch on a blank line, and parse the data as JSON whatever the `event:`
//! line says (openai-python `_streaming.py`: only `thread.*` event names are looked at; its
//! `Stream.__stream__` raises `APIError` for data whose `error` is truthy; openai-node
//! `core/streaming.ts` throws `APIError` for `event: error` or a truthy `data.error`). So the
//! data carries everything, and the `event:` line, which OpenAI's own API sends too, is extra:
//!
//! ```text
//! event: image_generation.partial_image
//! data: {"type":"image_generation.partial_image","created_at":1,"partial_image_index":0,"size":"1024x1024","output_format":"png","background":"auto","quality":"auto","b64_json":"..."}
//!
//! event: error
//! data: {"type":"error","error":{"message":"...","type":"...","param":null,"code":"IMG_...","category":"...","resolution":"..."}}
//!
//! ```

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::endpoint::Endpoint;
use crate::error::{ApiError, ErrorCode};
use crate::gemini::{is_base64, read_call, Base64, CallResponse, Usage, WireBlob, WireCandidate, WirePromptFeedback};
use crate::image_type::{dimensions_base64, ImageType};
use crate::openai::{error_body, output_format, ImageView};

/// The largest Gemini event held by default: one event carries a whole image in base64 (a 4K
/// PNG is tens of MiB).
pub const DEFAULT_MAX_EVENT_BYTES: usize = 64 * 1024 * 1024;

/// The most partial images a request may ask for (`partial_images` 0..3).
pub const MAX_PARTIAL_IMAGES: u32 = 3;

/// Text the model writes beside the final image (OpenAI's `revised_prompt`) is kept up to this
/// many bytes.
const MAX_TEXT_BYTES: usize = 32 * 1024;

/// Which OpenAI stream the events belong to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamKind {
    Generation,
    Edit,
}

impl StreamKind {
    /// The stream of an endpoint; variations do not stream.
    pub fn for_endpoint(endpoint: Endpoint) -> Option<StreamKind> {
        match endpoint {
            Endpoint::Generations => Some(StreamKind::Generation),
            Endpoint::Edits => Some(StreamKind::Edit),
            Endpoint::Variations => None,
        }
    }

    pub fn partial_event(self) -> &'static str {
        match self {
            StreamKind::Generation => "image_generation.partial_image",
            StreamKind::Edit => "image_edit.partial_image",
        }
    }

    pub fn completed_event(self) -> &'static str {
        match self {
            StreamKind::Generation => "image_generation.completed",
            StreamKind::Edit => "image_edit.completed",
        }
    }
}

/// What every image event of one request repeats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventMeta {
    pub kind: StreamKind,
    /// Unix seconds, the events' `created_at`.
    pub created_at: u64,
    /// Echoed as the events' `quality` and `background`.
    pub quality: String,
    pub background: String,
}

/// What a streamed request needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamOptions {
    pub meta: EventMeta,
    /// At most this many partial images (more than `MAX_PARTIAL_IMAGES` counts as that).
    pub partial_images: u32,
    /// The largest Gemini event accepted; a larger one ends the stream with an error.
    pub max_event_bytes: usize,
}

// ---------------------------------------------------------------------------------------------
// Server-sent events in

/// An event grew past the splitter's bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventTooLarge {
    pub limit: usize,
}

/// Where the bytes of the current line go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Line {
    /// Reading the field name (up to `:` or the line's end).
    Name,
    /// A `data:` line's value.
    Data,
    /// A line that is no SSE field: Gemini's error JSON may come unframed, one line at a time.
    Raw,
    /// `event:`, `id:`, `retry:` and `:` comments.
    Ignored,
}

/// Field names longer than this are no SSE field: the line is raw.
const MAX_FIELD_NAME: usize = 16;

/// Cuts a server-sent event stream, fed in pieces split anywhere, into the payloads of whole
/// events: the `data:` lines joined by `\n` (the SSE rules: lines end with `\r\n`, `\n` or `\r`;
/// a blank line ends an event; one space after `data:` is dropped). An event without `data:`
/// lines but with other non-field lines (an unframed JSON object) yields those lines instead.
/// Only the unfinished event is held, at most `max_event_bytes` of it.
#[derive(Clone, Debug)]
pub struct SseSplitter {
    max_event_bytes: usize,
    line: Line,
    name: Vec<u8>,
    /// Drop one leading space of the current `data:` value.
    strip_space: bool,
    /// The last byte seen was `\r`: a `\n` right after it ends nothing more.
    skip_lf: bool,
    data: Vec<u8>,
    has_data: bool,
    raw: Vec<u8>,
    overflowed: bool,
}

impl SseSplitter {
    pub fn new(max_event_bytes: usize) -> SseSplitter {
        SseSplitter {
            max_event_bytes,
            line: Line::Name,
            name: Vec::new(),
            strip_space: false,
            skip_lf: false,
            data: Vec::new(),
            has_data: false,
            raw: Vec::new(),
            overflowed: false,
        }
    }

    /// Reads one piece of the stream, appending the payloads of the events it completes to
    /// `events`. Past the bound it fails, and keeps failing: the stream cannot be resynchronised.
    pub fn feed(&mut self, chunk: &[u8], events: &mut Vec<Vec<u8>>) -> Result<(), EventTooLarge> {
        if self.overflowed {
            return Err(self.too_large());
        }
        let mut rest = chunk;
        while let Some((&first, after_first)) = rest.split_first() {
            if self.skip_lf {
                self.skip_lf = false;
                if first == b'\n' {
                    rest = after_first;
                    continue;
                }
            }
            let stop = match self.line {
                Line::Name => rest.iter().position(|&b| matches!(b, b':' | b'\r' | b'\n')),
                _ => rest.iter().position(|&b| matches!(b, b'\r' | b'\n')),
            };
            let (text, delimited) = match stop.and_then(|i| rest.split_at_checked(i)) {
                Some(split) => split,
                None => (rest, &[][..]),
            };
            self.take_text(text)?;
            let Some((&delimiter, after)) = delimited.split_first() else {
                break;
            };
            rest = after;
            if delimiter == b':' {
                if self.line == Line::Name {
                    self.start_value()?;
                } else {
                    // A long name made the line raw: the colon is part of it.
                    self.push_raw(b":")?;
                }
            } else {
                self.end_line(events)?;
                self.skip_lf = delimiter == b'\r';
            }
        }
        Ok(())
    }

    /// The stream ended: the unfinished line and event count as finished (a truncated payload
    /// then fails to parse, which is what a cut stream is).
    pub fn finish(&mut self, events: &mut Vec<Vec<u8>>) -> Result<(), EventTooLarge> {
        if self.overflowed {
            return Err(self.too_large());
        }
        self.skip_lf = false;
        if self.line != Line::Name || !self.name.is_empty() {
            self.end_line(events)?;
        }
        self.dispatch(events);
        Ok(())
    }

    /// Bytes held for the unfinished event (allocated, not just used).
    pub fn held_bytes(&self) -> usize {
        self.data.capacity().saturating_add(self.raw.capacity()).saturating_add(self.name.capacity())
    }

    /// Lets go of the unfinished event (the stream is over for the caller).
    fn release(&mut self) {
        *self = SseSplitter::new(self.max_event_bytes);
    }

    fn too_large(&self) -> EventTooLarge {
        EventTooLarge { limit: self.max_event_bytes }
    }

    /// Makes room for `n` more bytes of the current event, or fails (for good).
    fn reserve(&mut self, n: usize) -> Result<(), EventTooLarge> {
        let used = self.data.len().saturating_add(self.raw.len()).saturating_add(self.name.len());
        if used.saturating_add(n) > self.max_event_bytes {
            self.overflowed = true;
            self.data = Vec::new();
            self.raw = Vec::new();
            self.name = Vec::new();
            return Err(self.too_large());
        }
        Ok(())
    }

    fn push_data(&mut self, bytes: &[u8]) -> Result<(), EventTooLarge> {
        self.reserve(bytes.len())?;
        self.data.extend_from_slice(bytes);
        Ok(())
    }

    fn push_raw(&mut self, bytes: &[u8]) -> Result<(), EventTooLarge> {
        self.reserve(bytes.len())?;
        self.raw.extend_from_slice(bytes);
        Ok(())
    }

    /// Starts a raw line holding `start` (the raw lines of an event are joined by `\n`).
    fn start_raw_line(&mut self, start: &[u8]) -> Result<(), EventTooLarge> {
        if !self.raw.is_empty() {
            self.push_raw(b"\n")?;
        }
        self.push_raw(start)
    }

    /// Starts a `data:` line: joined to the previous one by `\n`.
    fn start_data_line(&mut self) -> Result<(), EventTooLarge> {
        if self.has_data {
            self.push_data(b"\n")?;
        }
        self.has_data = true;
        Ok(())
    }

    /// Bytes of the current line, up to a delimiter.
    fn take_text(&mut self, mut text: &[u8]) -> Result<(), EventTooLarge> {
        match self.line {
            Line::Name => {
                if self.name.len().saturating_add(text.len()) <= MAX_FIELD_NAME {
                    self.reserve(text.len())?;
                    self.name.extend_from_slice(text);
                } else {
                    let name = std::mem::take(&mut self.name);
                    self.start_raw_line(&name)?;
                    self.push_raw(text)?;
                    self.line = Line::Raw;
                }
                Ok(())
            }
            Line::Data => {
                if self.strip_space {
                    if let Some((&first, after)) = text.split_first() {
                        self.strip_space = false;
                        if first == b' ' {
                            text = after;
                        }
                    }
                }
                self.push_data(text)
            }
            Line::Raw => self.push_raw(text),
            Line::Ignored => Ok(()),
        }
    }

    /// The field name ended with `:`.
    fn start_value(&mut self) -> Result<(), EventTooLarge> {
        let name = std::mem::take(&mut self.name);
        match name.as_slice() {
            b"data" => {
                self.start_data_line()?;
                self.line = Line::Data;
                self.strip_space = true;
            }
            b"" | b"event" | b"id" | b"retry" => self.line = Line::Ignored,
            _ => {
                self.start_raw_line(&name)?;
                self.push_raw(b":")?;
                self.line = Line::Raw;
            }
        }
        Ok(())
    }

    fn end_line(&mut self, events: &mut Vec<Vec<u8>>) -> Result<(), EventTooLarge> {
        if self.line == Line::Name {
            let name = std::mem::take(&mut self.name);
            match name.as_slice() {
                b"" => self.dispatch(events),
                // A field without a colon has an empty value.
                b"data" => self.start_data_line()?,
                b"event" | b"id" | b"retry" => {}
                _ => self.start_raw_line(&name)?,
            }
        }
        self.line = Line::Name;
        self.strip_space = false;
        Ok(())
    }

    fn dispatch(&mut self, events: &mut Vec<Vec<u8>>) {
        let payload = if self.has_data {
            self.raw.clear();
            std::mem::take(&mut self.data)
        } else {
            std::mem::take(&mut self.raw)
        };
        self.has_data = false;
        if payload.iter().any(|b| !b.is_ascii_whitespace()) {
            events.push(payload);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Gemini's events

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireChunk<'a> {
    #[serde(default, borrow)]
    candidates: Option<Vec<WireCandidate<'a>>>,
    #[serde(default)]
    prompt_feedback: Option<WirePromptFeedback>,
    #[serde(default, borrow)]
    usage_metadata: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

/// An image found in an event: where its base64 lies in the payload (or owned text, when the
/// JSON string held escapes), and its MIME type.
#[derive(Clone, Debug)]
struct Found {
    data: Base64,
    mime_type: String,
}

/// What one event says, owning nothing of the payload.
#[derive(Debug, Default)]
struct Reading {
    /// An `error` object: the HTTP status to read it as.
    error_status: Option<u32>,
    blocked: bool,
    usage: Option<Usage>,
    thoughts: Vec<Found>,
    /// The last image that is not a thought.
    image: Option<Found>,
    text: String,
    finished: bool,
}

fn base64_in<'a>(payload: &'a [u8], data: &'a Base64) -> &'a [u8] {
    match data {
        Base64::InBody(start, end) => payload.get(*start..*end).unwrap_or(&[]),
        Base64::Owned(s) => s.as_bytes(),
    }
}

fn locate(payload: &[u8], blob: WireBlob) -> Found {
    let mime_type = blob.mime_type.map_or_else(|| "image/png".to_string(), Cow::into_owned);
    let data = match blob.data {
        Cow::Borrowed(s) => match (s.as_ptr() as usize).checked_sub(payload.as_ptr() as usize) {
            Some(start) if start.saturating_add(s.len()) <= payload.len() => {
                Base64::InBody(start, start.saturating_add(s.len()))
            }
            _ => Base64::Owned(s.to_string()),
        },
        Cow::Owned(s) => Base64::Owned(s),
    };
    Found { data, mime_type }
}

/// The usage of a `usageMetadata` object, computed by the same code as non-streamed answers.
fn usage_of(raw: &RawValue) -> Option<Usage> {
    let body = format!("{{\"usageMetadata\":{}}}", raw.get());
    read_call(CallResponse { status: Some(200), body: body.into_bytes(), ..Default::default() }).usage
}

/// Reads one event; the error names a kind of fault, never the parser's words (they may quote
/// the answer).
fn read_event(payload: &[u8]) -> Result<Reading, &'static str> {
    if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err("it is not a JSON object");
    }
    let wire: WireChunk = serde_json::from_slice(payload).map_err(|e| match e.classify() {
        serde_json::error::Category::Eof => "it ends early",
        serde_json::error::Category::Syntax => "it is not valid JSON",
        serde_json::error::Category::Data => "it does not have the shape of a generateContent answer",
        serde_json::error::Category::Io => "it could not be read",
    })?;
    let mut reading = Reading::default();
    if let Some(error) = wire.error.filter(|e| !e.is_null()) {
        let code = error.get("code").and_then(serde_json::Value::as_u64).unwrap_or(0);
        reading.error_status = Some(if (400..600).contains(&code) { code as u32 } else { 500 });
        return Ok(reading);
    }
    reading.usage = wire.usage_metadata.and_then(usage_of);
    reading.blocked = wire.prompt_feedback.and_then(|f| f.block_reason).is_some();
    let Some(candidate) = wire.candidates.and_then(|c| c.into_iter().next()) else {
        return Ok(reading);
    };
    reading.finished = candidate.finish_reason.is_some_and(|r| !r.is_empty());
    for part in candidate.content.map(|c| c.parts).unwrap_or_default() {
        let thought = part.thought == Some(true);
        match (part.inline_data, thought) {
            (Some(blob), true) => reading.thoughts.push(locate(payload, blob)),
            (Some(blob), false) => reading.image = Some(locate(payload, blob)),
            (None, _) => {}
        }
        if let (Some(t), false) = (part.text, thought) {
            reading.text.push_str(&t);
        }
    }
    Ok(reading)
}

// ---------------------------------------------------------------------------------------------
// OpenAI's events out

/// Appends `s` as a JSON string (quoted, escaped).
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // Writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// The `usage` object, as the non-streamed answer writes it.
fn push_usage(out: &mut Vec<u8>, u: Usage) {
    out.extend_from_slice(
        format!(
            "{{\"input_tokens\":{},\"output_tokens\":{},\"total_tokens\":{},\"input_tokens_details\":{{\"text_tokens\":{},\"image_tokens\":{}}}}}",
            u.input_tokens, u.output_tokens, u.total_tokens, u.text_tokens, u.image_tokens
        )
        .as_bytes(),
    );
}

/// An image event. `base64` must be valid base64 (so it needs no escaping): it is copied as is.
fn push_image_event(
    out: &mut Vec<u8>,
    meta: &EventMeta,
    mime_type: &str,
    base64: &[u8],
    partial_index: Option<u32>,
    usage: Option<Usage>,
) {
    let name = match partial_index {
        Some(_) => meta.kind.partial_event(),
        None => meta.kind.completed_event(),
    };
    let size = dimensions_base64(base64).map_or_else(|| "auto".to_string(), |(w, h)| format!("{w}x{h}"));
    let format = output_format(mime_type)
        .or_else(|| ImageType::sniff_base64(base64).and_then(|t| output_format(t.as_str())))
        .unwrap_or("png");
    out.reserve(base64.len().saturating_add(512));
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: {\"type\":\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(format!("\",\"created_at\":{}", meta.created_at).as_bytes());
    if let Some(i) = partial_index {
        out.extend_from_slice(format!(",\"partial_image_index\":{i}").as_bytes());
    }
    out.extend_from_slice(format!(",\"size\":\"{size}\",\"output_format\":\"{format}\",\"background\":").as_bytes());
    push_json_str(out, &meta.background);
    out.extend_from_slice(b",\"quality\":");
    push_json_str(out, &meta.quality);
    if partial_index.is_none() {
        out.extend_from_slice(b",\"usage\":");
        push_usage(out, usage.unwrap_or_default());
    }
    out.extend_from_slice(b",\"b64_json\":\"");
    out.extend_from_slice(base64);
    out.extend_from_slice(b"\"}\n\n");
}

/// The event that ends a stream with an error: `{"type":"error","error":{...}}`, the error
/// object exactly as a JSON error answer carries it.
pub fn error_event(e: &ApiError) -> Vec<u8> {
    let body = error_body(e);
    let error = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|mut v| v.get_mut("error").map(serde_json::Value::take))
        .unwrap_or(serde_json::Value::Null);
    let mut out = Vec::with_capacity(body.len().saturating_add(48));
    out.extend_from_slice(b"event: error\ndata: {\"type\":\"error\",\"error\":");
    // Writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, &error);
    out.extend_from_slice(b"}\n\n");
    out
}

/// A cached answer as a stream: one completed event (an error event if the cached base64 is
/// not base64, which the cache's own checks should make impossible).
pub fn cached_completed_event(meta: &EventMeta, image: &ImageView, usage: Option<Usage>) -> Vec<u8> {
    if !is_base64(image.base64) {
        return error_event(&ApiError::new(ErrorCode::InternalError, "the cached image could not be streamed"));
    }
    let mut out = Vec::new();
    push_image_event(&mut out, meta, image.mime_type, image.base64, None, usage);
    out
}

// ---------------------------------------------------------------------------------------------
// The transform

/// Where a stream stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamState {
    /// Still reading Gemini's events.
    Open,
    /// The completed event was sent.
    Completed,
    /// The error event was sent.
    Failed(ApiError),
}

/// The final image, holding the event it came in so its base64 is not copied again.
#[derive(Clone, Debug)]
struct Held {
    payload: Vec<u8>,
    found: Found,
}

/// One streamed request: Gemini's SSE bytes in, OpenAI's SSE bytes out.
#[derive(Clone, Debug)]
pub struct StreamTransform {
    meta: EventMeta,
    partial_images: u32,
    splitter: SseSplitter,
    state: StreamState,
    partials_sent: u32,
    image: Option<Held>,
    text: String,
    usage: Option<Usage>,
}

impl StreamTransform {
    pub fn new(options: StreamOptions) -> StreamTransform {
        StreamTransform {
            meta: options.meta,
            partial_images: options.partial_images.min(MAX_PARTIAL_IMAGES),
            splitter: SseSplitter::new(options.max_event_bytes),
            state: StreamState::Open,
            partials_sent: 0,
            image: None,
            text: String::new(),
            usage: None,
        }
    }

    /// Reads one piece of Gemini's response body; returns the bytes to send to the client in
    /// its place (often none). On the last piece (`end_of_stream`), a stream that has not
    /// completed ends with its error event. Once completed or failed, input is ignored.
    pub fn on_body(&mut self, chunk: &[u8], end_of_stream: bool) -> Vec<u8> {
        let mut out = Vec::new();
        if self.state != StreamState::Open {
            return out;
        }
        let mut events = Vec::new();
        let fed = self.splitter.feed(chunk, &mut events);
        self.read_events(events, &mut out);
        if let Err(e) = fed {
            self.too_large(e, &mut out);
            return out;
        }
        if end_of_stream && self.state == StreamState::Open {
            let mut events = Vec::new();
            let finished = self.splitter.finish(&mut events);
            self.read_events(events, &mut out);
            if let Err(e) = finished {
                self.too_large(e, &mut out);
            }
            if self.state == StreamState::Open {
                if self.image.is_some() {
                    // No finish reason came, but an image did: as a non-streamed answer, done.
                    self.complete(&mut out);
                } else {
                    let e = ApiError::new(ErrorCode::NoImage, "Gemini's stream ended without an image");
                    self.fail(e, &mut out);
                }
            }
        }
        out
    }

    /// Ends an open stream with `e` (a failure the caller saw outside the body); returns the
    /// error event, or nothing when the stream had already ended.
    pub fn abort(&mut self, e: ApiError) -> Vec<u8> {
        let mut out = Vec::new();
        if self.state == StreamState::Open {
            self.fail(e, &mut out);
        }
        out
    }

    pub fn state(&self) -> &StreamState {
        &self.state
    }

    pub fn is_completed(&self) -> bool {
        self.state == StreamState::Completed
    }

    /// The error the stream ended with, if it failed.
    pub fn error(&self) -> Option<&ApiError> {
        match &self.state {
            StreamState::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// The final image, once the stream completed: what the cache stores.
    pub fn final_image(&self) -> Option<ImageView<'_>> {
        if !self.is_completed() {
            return None;
        }
        let held = self.image.as_ref()?;
        let text = if self.text.trim().is_empty() { None } else { Some(self.text.as_str()) };
        Some(ImageView { mime_type: &held.found.mime_type, text, base64: base64_in(&held.payload, &held.found.data) })
    }

    /// Gemini's last `usageMetadata`, as OpenAI counts it.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    pub fn partials_sent(&self) -> u32 {
        self.partials_sent
    }

    /// Memory this stream holds: the unfinished event and the final image.
    pub fn held_bytes(&self) -> usize {
        let image = self.image.as_ref().map_or(0, |h| match &h.found.data {
            Base64::InBody(..) => h.payload.capacity(),
            Base64::Owned(s) => s.capacity().saturating_add(h.payload.capacity()),
        });
        self.splitter.held_bytes().saturating_add(image).saturating_add(self.text.capacity())
    }

    fn read_events(&mut self, events: Vec<Vec<u8>>, out: &mut Vec<u8>) {
        for payload in events {
            if self.state != StreamState::Open {
                return;
            }
            self.read_event(payload, out);
        }
    }

    fn read_event(&mut self, payload: Vec<u8>, out: &mut Vec<u8>) {
        let mut reading = match read_event(&payload) {
            Ok(r) => r,
            Err(why) => {
                let e = ApiError::new(
                    ErrorCode::UpstreamError,
                    format!("Gemini's streamed answer could not be read: {why}"),
                );
                return self.fail(e, out);
            }
        };
        if let Some(status) = reading.error_status {
            // Gemini's error object, read as the answer of a call that failed with its code.
            let e = gemini_error(status, payload);
            return self.fail(e, out);
        }
        if reading.usage.is_some() {
            self.usage = reading.usage;
        }
        if reading.blocked {
            return self.fail(no_image_error(payload), out);
        }
        if self.text.len().saturating_add(reading.text.len()) <= MAX_TEXT_BYTES {
            self.text.push_str(&reading.text);
        }
        for thought in &reading.thoughts {
            if self.partials_sent >= self.partial_images {
                break;
            }
            let b64 = base64_in(&payload, &thought.data);
            // An interim image that is not base64 is skipped: it is only a preview, and a
            // non-streamed answer ignores thoughts altogether.
            if is_base64(b64) {
                push_image_event(out, &self.meta, &thought.mime_type, b64, Some(self.partials_sent), None);
                self.partials_sent = self.partials_sent.saturating_add(1);
            }
        }
        if let Some(found) = reading.image.take() {
            if !is_base64(base64_in(&payload, &found.data)) {
                let e = ApiError::new(ErrorCode::UpstreamError, "Gemini's image data is not valid base64");
                return self.fail(e, out);
            }
            let payload = match found.data {
                Base64::InBody(..) => payload,
                Base64::Owned(_) => Vec::new(),
            };
            self.image = Some(Held { payload, found });
        } else if reading.finished && self.image.is_none() {
            return self.fail(no_image_error(payload), out);
        }
        if reading.finished {
            self.complete(out);
        }
    }

    fn complete(&mut self, out: &mut Vec<u8>) {
        let Some(held) = &self.image else {
            return;
        };
        let b64 = base64_in(&held.payload, &held.found.data);
        push_image_event(out, &self.meta, &held.found.mime_type, b64, None, self.usage);
        self.state = StreamState::Completed;
        self.splitter.release();
    }

    fn fail(&mut self, e: ApiError, out: &mut Vec<u8>) {
        out.extend_from_slice(&error_event(&e));
        self.state = StreamState::Failed(e);
        self.image = None;
        self.text = String::new();
        self.splitter.release();
    }

    fn too_large(&mut self, e: EventTooLarge, out: &mut Vec<u8>) {
        if self.state == StreamState::Open {
            let e = ApiError::new(
                ErrorCode::UpstreamError,
                format!("a streamed event from Gemini is larger than this gateway accepts ({} bytes)", e.limit),
            );
            self.fail(e, out);
        }
    }
}

/// Gemini's `error` event, mapped as a failed call with that status is (`gemini::read_call`).
fn gemini_error(status: u32, payload: Vec<u8>) -> ApiError {
    let response = CallResponse {
        status: Some(status),
        content_type: Some("application/json".into()),
        body: payload,
        ..Default::default()
    };
    read_call(response)
        .result
        .err()
        .unwrap_or_else(|| ApiError::new(ErrorCode::UpstreamError, "Gemini's stream failed"))
}

/// An event that ends the answer without an image (a block, or a finish reason): mapped as a
/// non-streamed answer of that content is (`gemini::read_call`), so the codes and messages match.
fn no_image_error(payload: Vec<u8>) -> ApiError {
    let response = CallResponse {
        status: Some(200),
        content_type: Some("application/json".into()),
        body: payload,
        ..Default::default()
    };
    match read_call(response).result {
        Err(e) => e,
        Ok(_) => ApiError::new(ErrorCode::NoImage, "Gemini answered without an image"),
    }
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
