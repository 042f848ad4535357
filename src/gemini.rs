//! Gemini's `generateContent` on the wire: the request we send, and reading what comes back
//! (images, text, usage, blocks, errors, and failures of the call itself).

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::json;

use crate::error::{ApiError, ErrorCode};
use crate::geometry::{AspectRatio, ImageSize};
use crate::safety::{SafetyLevel, HARM_CATEGORIES};

/// The path of the `generateContent` method for an upstream model id.
pub fn generate_content_path(model: &str) -> String {
    format!("/v1beta/models/{model}:generateContent")
}

/// An image sent to Gemini as an `inlineData` part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InlineImage<'a> {
    pub mime_type: &'a str,
    pub bytes: &'a [u8],
}

/// What one call asks for (`candidateCount` 1; the filter makes `n` such calls).
#[derive(Clone, Copy, Debug)]
pub struct CallSpec<'a> {
    pub prompt: &'a str,
    /// `None`: no `aspectRatio` is sent (an edit keeps its input's ratio).
    pub ratio: Option<AspectRatio>,
    pub image_size: Option<ImageSize>,
    pub safety: SafetyLevel,
    /// Input images, in order, after the prompt.
    pub images: &'a [InlineImage<'a>],
    /// Text after the images (the mask instruction).
    pub closing_text: Option<&'a str>,
    /// Ask for the model's thoughts (a streamed request that wants partial images: Gemini 3
    /// Pro Image's interim images are thought parts).
    pub include_thoughts: bool,
}

/// The JSON body of one call. Written into one buffer, with each image base64-encoded in
/// place: an edit of 20 MB is encoded once, and the `n` calls share the result.
pub fn request_body(spec: &CallSpec) -> Vec<u8> {
    let images: usize = spec.images.iter().map(|i| crate::base64::encoded_len(i.bytes.len()) + 64).sum();
    let mut out = Vec::with_capacity(images + spec.prompt.len() + 512);
    out.extend_from_slice(br#"{"contents":[{"role":"user","parts":[{"text":"#);
    push_json(&mut out, &json!(spec.prompt));
    out.push(b'}');
    for image in spec.images {
        out.extend_from_slice(br#",{"inlineData":{"mimeType":"#);
        push_json(&mut out, &json!(image.mime_type));
        out.extend_from_slice(br#","data":""#);
        crate::base64::encode_into(&mut out, image.bytes);
        out.extend_from_slice(br#""}}"#);
    }
    if let Some(text) = spec.closing_text {
        out.extend_from_slice(br#",{"text":"#);
        push_json(&mut out, &json!(text));
        out.push(b'}');
    }
    let mut image_config = serde_json::Map::new();
    if let Some(r) = spec.ratio {
        image_config.insert("aspectRatio".into(), json!(r.as_str()));
    }
    if let Some(s) = spec.image_size {
        image_config.insert("imageSize".into(), json!(s.as_str()));
    }
    let safety_settings: Vec<_> =
        HARM_CATEGORIES.iter().map(|c| json!({"category": c, "threshold": spec.safety.gemini_threshold()})).collect();
    let mut rest = json!({
        "candidateCount": 1,
        "responseModalities": ["TEXT", "IMAGE"],
        "imageConfig": image_config,
    });
    if spec.include_thoughts {
        rest["thinkingConfig"] = json!({"includeThoughts": true});
    }
    out.extend_from_slice(br#"]}],"generationConfig":"#);
    push_json(&mut out, &rest);
    out.extend_from_slice(br#","safetySettings":"#);
    push_json(&mut out, &json!(safety_settings));
    out.push(b'}');
    out
}

fn push_json(out: &mut Vec<u8>, v: &serde_json::Value) {
    // Writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, v);
}

/// Token counts, as OpenAI names them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
    /// The input tokens by modality, from `promptTokensDetails` (0 for one Gemini does not
    /// list): OpenAI's `input_tokens_details`.
    pub text_tokens: u64,
    pub image_tokens: u64,
}

impl Usage {
    /// Adds another call's counts; numbers from Gemini saturate instead of wrapping.
    pub fn add(&mut self, other: Usage) {
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.total_tokens = self.total_tokens.saturating_add(other.total_tokens);
        self.text_tokens = self.text_tokens.saturating_add(other.text_tokens);
        self.image_tokens = self.image_tokens.saturating_add(other.image_tokens);
    }
}

/// Where an image's base64 text lies: a range of the response body (no copy), or owned text
/// when the JSON string held escapes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Base64 {
    InBody(usize, usize),
    Owned(String),
}

/// One image read from a Gemini answer, holding the answer's body so the base64 is not copied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeminiImage {
    body: Vec<u8>,
    data: Base64,
    pub mime_type: String,
    /// The model's non-thought text, if any: OpenAI's `revised_prompt`.
    pub text: Option<String>,
}

impl GeminiImage {
    pub fn view(&self) -> crate::openai::ImageView<'_> {
        crate::openai::ImageView { mime_type: &self.mime_type, text: self.text.as_deref(), base64: self.base64() }
    }

    /// The base64 text of the image, as Gemini sent it.
    pub fn base64(&self) -> &[u8] {
        match &self.data {
            Base64::InBody(start, end) => self.body.get(*start..*end).unwrap_or(&[]),
            Base64::Owned(s) => s.as_bytes(),
        }
    }
}

/// What one call came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallOutcome {
    /// The HTTP status Gemini (or Envoy, for failures) answered; 0 when the call got no answer.
    pub upstream_status: u32,
    pub result: Result<GeminiImage, ApiError>,
    pub usage: Option<Usage>,
}

/// What the host saw of one call-out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallResponse {
    /// `None` when the call-out failed before any header (reset, timeout, body over limit).
    pub status: Option<u32>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    /// Set when the host did not read an answer of this many bytes: it would have taken the
    /// worker past `limits.max_inflight_bytes`.
    pub refused_bytes: Option<usize>,
    /// A 429's `retry-after` header, in seconds.
    pub retry_after_s: Option<u64>,
    /// How long the call took, and its timeout, to tell a timeout from other failures.
    pub elapsed_ms: u64,
    pub timeout_ms: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireResponse<'a> {
    #[serde(default, borrow)]
    candidates: Vec<WireCandidate<'a>>,
    #[serde(default)]
    prompt_feedback: Option<WirePromptFeedback>,
    #[serde(default)]
    usage_metadata: Option<WireUsage>,
}

/// A candidate of Gemini's answer (the streaming transform reads the same candidates).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WireCandidate<'a> {
    #[serde(default, borrow)]
    pub(crate) content: Option<WireContent<'a>>,
    #[serde(default)]
    pub(crate) finish_reason: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct WireContent<'a> {
    #[serde(default, borrow)]
    pub(crate) parts: Vec<WirePart<'a>>,
}

/// A part of Gemini's answer (the streaming transform reads the same parts).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WirePart<'a> {
    #[serde(default, borrow)]
    pub(crate) text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub(crate) inline_data: Option<WireBlob<'a>>,
    #[serde(default)]
    pub(crate) thought: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WireBlob<'a> {
    #[serde(default, borrow)]
    pub(crate) mime_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub(crate) data: Cow<'a, str>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WirePromptFeedback {
    #[serde(default)]
    pub(crate) block_reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireUsage {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
    #[serde(default)]
    thoughts_token_count: u64,
    #[serde(default)]
    total_token_count: u64,
    #[serde(default)]
    prompt_tokens_details: Vec<WireModalityCount>,
}

/// One modality's share of the prompt's tokens.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireModalityCount {
    #[serde(default)]
    modality: String,
    #[serde(default)]
    token_count: u64,
}

#[derive(Deserialize)]
struct WireErrorEnvelope {
    error: WireError,
}

#[derive(Deserialize)]
struct WireError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    details: Vec<serde_json::Value>,
}

/// Finish reasons that mean the content was blocked when no image came back.
fn is_block_finish(reason: &str) -> bool {
    matches!(reason, "SAFETY" | "PROHIBITED_CONTENT" | "BLOCKLIST" | "SPII" | "RECITATION")
        || reason.starts_with("IMAGE_")
}

pub use crate::base64::is_base64;

/// Gemini messages quoted to the client are cut to this many characters.
const GEMINI_MESSAGE_CHARS: usize = 300;

fn cut(s: &str) -> String {
    if s.chars().count() > GEMINI_MESSAGE_CHARS {
        let mut c: String = s.chars().take(GEMINI_MESSAGE_CHARS).collect();
        c.push_str("...");
        c
    } else {
        s.to_string()
    }
}

/// Reads one call-out's answer.
pub fn read_call(resp: CallResponse) -> CallOutcome {
    let Some(status) = resp.status else {
        let timeout = resp.timeout_ms > 0 && resp.elapsed_ms.saturating_add(50) >= resp.timeout_ms;
        let e = if timeout {
            ApiError::timed_out("Gemini did not answer within the gateway's timeout")
        } else {
            ApiError::new(ErrorCode::NetworkError, "the connection to Gemini failed before an answer arrived")
        };
        return CallOutcome { upstream_status: 0, result: Err(e), usage: None };
    };
    if let Some(bytes) = resp.refused_bytes {
        let mut e = ApiError::new(
            ErrorCode::Overloaded,
            format!("Gemini's answer ({bytes} bytes) is more than this gateway worker may hold right now"),
        );
        e.retry_after = Some(crate::exchange::OVERLOADED_RETRY_AFTER_S);
        return CallOutcome { upstream_status: status, result: Err(e), usage: None };
    }
    if status == 200 {
        let (result, usage) = read_success(resp.body);
        return CallOutcome { upstream_status: status, result, usage };
    }
    let mut e = read_failure(status, resp.content_type.as_deref(), &resp.body);
    if e.code == ErrorCode::QuotaExhausted && e.retry_after.is_none() {
        e.retry_after = resp.retry_after_s;
    }
    CallOutcome { upstream_status: status, result: Err(e), usage: None }
}

fn read_success(body: Vec<u8>) -> (Result<GeminiImage, ApiError>, Option<Usage>) {
    // The reason names a kind of fault, never the parser's words: those may quote the answer.
    let unreadable =
        |why: &str| ApiError::new(ErrorCode::UpstreamError, format!("Gemini's answer could not be read: {why}"));
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return (Err(unreadable("not a JSON object")), None);
    }
    let found = {
        let wire: WireResponse = match serde_json::from_slice(&body) {
            Ok(w) => w,
            Err(e) => {
                let why = match e.classify() {
                    serde_json::error::Category::Eof => "it ends early",
                    serde_json::error::Category::Syntax => "it is not valid JSON",
                    serde_json::error::Category::Data => "it does not have the shape of a generateContent answer",
                    serde_json::error::Category::Io => "it could not be read",
                };
                return (Err(unreadable(why)), None);
            }
        };
        let usage = wire.usage_metadata.map(|u| {
            let output = u.candidates_token_count.saturating_add(u.thoughts_token_count);
            let modality = |name: &str| {
                u.prompt_tokens_details
                    .iter()
                    .filter(|d| d.modality == name)
                    .fold(0u64, |sum, d| sum.saturating_add(d.token_count))
            };
            Usage {
                input_tokens: u.prompt_token_count,
                output_tokens: output,
                total_tokens: u.total_token_count.max(u.prompt_token_count.saturating_add(output)),
                text_tokens: modality("TEXT"),
                image_tokens: modality("IMAGE"),
            }
        });
        if let Some(reason) = wire.prompt_feedback.and_then(|f| f.block_reason) {
            let e = ApiError::param(
                ErrorCode::SafetyBlocked,
                "prompt",
                format!("the prompt was blocked by Gemini's safety system (blockReason {})", cut(&reason)),
            );
            return (Err(e), usage);
        }
        let Some(candidate) = wire.candidates.into_iter().next() else {
            return (
                Err(ApiError::new(ErrorCode::NoImage, "Gemini answered with no candidate and no block reason")),
                usage,
            );
        };
        let mut text = String::new();
        let mut image: Option<(Option<String>, Cow<str>)> = None;
        for part in candidate.content.map(|c| c.parts).unwrap_or_default() {
            if part.thought == Some(true) {
                continue;
            }
            if let Some(t) = part.text {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&t);
            }
            if let Some(blob) = part.inline_data {
                // The last image that is not a thought is the final one.
                image = Some((blob.mime_type.map(Cow::into_owned), blob.data));
            }
        }
        match image {
            Some((mime, data)) => {
                if !is_base64(data.as_bytes()) {
                    return (
                        Err(ApiError::new(ErrorCode::UpstreamError, "Gemini's image data is not valid base64")),
                        usage,
                    );
                }
                let location = match data {
                    Cow::Borrowed(s) => match (s.as_ptr() as usize).checked_sub(body.as_ptr() as usize) {
                        Some(start) if start + s.len() <= body.len() => Base64::InBody(start, start + s.len()),
                        _ => Base64::Owned(s.to_string()),
                    },
                    Cow::Owned(s) => Base64::Owned(s),
                };
                let text = if text.trim().is_empty() { None } else { Some(text) };
                (location, mime, text, usage)
            }
            None => {
                let reason = candidate.finish_reason.unwrap_or_default();
                let e = if is_block_finish(&reason) {
                    ApiError::param(
                        ErrorCode::SafetyBlocked,
                        "prompt",
                        format!("Gemini did not return an image: blocked by safety (finishReason {})", cut(&reason)),
                    )
                } else {
                    let why =
                        if reason.is_empty() { String::new() } else { format!(" (finishReason {})", cut(&reason)) };
                    ApiError::new(ErrorCode::NoImage, format!("Gemini answered without an image{why}"))
                };
                return (Err(e), usage);
            }
        }
    };
    let (data, mime, text, usage) = found;
    let mime_type = mime.unwrap_or_else(|| "image/png".to_string());
    (Ok(GeminiImage { body, data, mime_type, text }), usage)
}

/// Seconds from a google.rpc.RetryInfo `retryDelay` such as `"30s"` or `"1.5s"`, rounded up.
fn retry_delay_seconds(details: &[serde_json::Value]) -> Option<u64> {
    for d in details {
        let is_retry_info =
            d.get("@type").and_then(|t| t.as_str()).is_some_and(|t| t.ends_with("google.rpc.RetryInfo"));
        if !is_retry_info {
            continue;
        }
        let delay = d.get("retryDelay")?;
        let secs = match delay {
            serde_json::Value::String(s) => s.strip_suffix('s')?.trim().parse::<f64>().ok()?,
            serde_json::Value::Object(o) => {
                let s = o.get("seconds").and_then(|v| v.as_f64().or_else(|| v.as_str()?.parse().ok())).unwrap_or(0.0);
                let n = o.get("nanos").and_then(|v| v.as_f64()).unwrap_or(0.0);
                s + n / 1e9
            }
            _ => return None,
        };
        if secs.is_finite() && (0.0..86_400.0).contains(&secs) {
            return Some(secs.ceil() as u64);
        }
        return None;
    }
    None
}

fn error_info_reason(details: &[serde_json::Value]) -> Option<&str> {
    details
        .iter()
        .filter(|d| d.get("@type").and_then(|t| t.as_str()).is_some_and(|t| t.ends_with("google.rpc.ErrorInfo")))
        .find_map(|d| d.get("reason").and_then(|r| r.as_str()))
}

fn read_failure(status: u32, content_type: Option<&str>, body: &[u8]) -> ApiError {
    let envelope: Option<WireErrorEnvelope> = serde_json::from_slice(body).ok();
    let Some(WireErrorEnvelope { error }) = envelope else {
        // Not Gemini's JSON: Envoy's own answer for a failed connection, or a proxy in between.
        let from_envoy = !content_type.is_some_and(|c| c.contains("json"));
        return match status {
            504 if from_envoy => ApiError::timed_out("Gemini did not answer within the gateway's timeout"),
            502 | 503 if from_envoy => ApiError::new(ErrorCode::NetworkError, "the connection to Gemini failed"),
            429 => ApiError::new(ErrorCode::QuotaExhausted, "Gemini's quota is exhausted (429)"),
            401 | 403 => auth_error(),
            503 => ApiError::new(ErrorCode::ServiceUnavailable, "Gemini is unavailable (503)"),
            _ => ApiError::new(
                ErrorCode::UpstreamError,
                format!("Gemini answered {status} with a body that could not be read"),
            ),
        };
    };
    let api_key_problem = error_info_reason(&error.details).is_some_and(|r| r.starts_with("API_KEY"));
    if status == 401
        || status == 403
        || api_key_problem
        || error.status == "UNAUTHENTICATED"
        || error.status == "PERMISSION_DENIED"
    {
        return auth_error();
    }
    if status == 429 || error.status == "RESOURCE_EXHAUSTED" {
        let mut e = ApiError::new(ErrorCode::QuotaExhausted, "Gemini's quota is exhausted; retry later");
        e.retry_after = retry_delay_seconds(&error.details);
        return e;
    }
    if status == 503 || error.status == "UNAVAILABLE" {
        return ApiError::new(ErrorCode::ServiceUnavailable, "Gemini is temporarily unavailable; retry later");
    }
    if status == 400 && error.status == "INVALID_ARGUMENT" {
        // About an input image (an edit's): a field violation on inline data, or a message
        // that names the image. Else about the prompt.
        let about_image = error.message.to_ascii_lowercase().contains("image")
            || error
                .details
                .iter()
                .any(|d| d.to_string().contains("inline_data") || d.to_string().contains("inlineData"));
        let message = format!("Gemini refused the request: {}", cut(&error.message));
        return if about_image {
            ApiError::param(ErrorCode::InvalidRequest, "image", message)
        } else {
            ApiError::param(ErrorCode::InvalidPrompt, "prompt", message)
        };
    }
    let named = if error.status.is_empty() { String::new() } else { format!(" {}", cut(&error.status)) };
    ApiError::new(ErrorCode::UpstreamError, format!("Gemini answered {status}{named}"))
}

fn auth_error() -> ApiError {
    ApiError::new(ErrorCode::UpstreamAuth, "the gateway's Gemini credentials were rejected")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> CallOutcome {
        read_call(CallResponse {
            status: Some(200),
            content_type: Some("application/json".into()),
            body: body.as_bytes().to_vec(),
            elapsed_ms: 5,
            timeout_ms: 1000,
            ..Default::default()
        })
    }

    fn failed(status: u32, ct: &str, body: &str) -> ApiError {
        read_call(CallResponse {
            status: Some(status),
            content_type: Some(ct.into()),
            body: body.as_bytes().to_vec(),
            elapsed_ms: 5,
            timeout_ms: 1000,
            ..Default::default()
        })
        .result
        .unwrap_err()
    }

    #[test]
    fn token_counts_saturate_instead_of_wrapping() {
        let max = u64::MAX;
        let body = format!(
            r#"{{"candidates":[{{"content":{{"parts":[{{"inlineData":{{"mimeType":"image/png","data":"QUFB"}}}}]}}}}],
            "usageMetadata":{{"promptTokenCount":{max},"candidatesTokenCount":{max},"thoughtsTokenCount":{max},"totalTokenCount":1}}}}"#
        );
        let usage = ok(&body).usage.unwrap();
        assert_eq!((usage.output_tokens, usage.total_tokens), (max, max));
        let mut sum = usage;
        sum.add(usage);
        assert_eq!(sum, usage);
    }

    #[test]
    fn an_unreadable_answer_is_described_without_quoting_it() {
        for body in [
            r#"{"candidates": "SECRET-PART"}"#,
            r#"{"candidates": [{"content": {"parts": [{"inlineData": {"data": 7}}]}}], "x": "SECRET-PART"}"#,
            r#"{"candidates": [SECRET-PART"#,
        ] {
            let e = ok(body).result.unwrap_err();
            assert_eq!(e.code, ErrorCode::UpstreamError);
            assert!(!e.message.contains("SECRET") && !e.message.contains("line"), "{}", e.message);
        }
    }

    #[test]
    fn the_request_body_carries_every_setting() {
        let spec = |prompt, ratio, image_size, safety| CallSpec {
            prompt,
            ratio,
            image_size,
            safety,
            images: &[],
            closing_text: None,
            include_thoughts: false,
        };
        let b = request_body(&spec("a \"cat\"", Some(AspectRatio::R16x9), Some(ImageSize::K2), SafetyLevel::Medium));
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["contents"][0]["parts"][0]["text"], "a \"cat\"");
        assert_eq!(v["generationConfig"]["candidateCount"], 1);
        assert_eq!(v["generationConfig"]["responseModalities"], json!(["TEXT", "IMAGE"]));
        assert_eq!(v["generationConfig"]["imageConfig"], json!({"aspectRatio": "16:9", "imageSize": "2K"}));
        let cats: Vec<_> =
            v["safetySettings"].as_array().unwrap().iter().map(|s| s["category"].as_str().unwrap()).collect();
        assert_eq!(cats, HARM_CATEGORIES);
        assert!(v["safetySettings"].as_array().unwrap().iter().all(|s| s["threshold"] == "BLOCK_MEDIUM_AND_ABOVE"));
        let b = request_body(&spec("x", Some(AspectRatio::R1x1), None, SafetyLevel::Off));
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["generationConfig"]["imageConfig"], json!({"aspectRatio": "1:1"}));
        let b = request_body(&spec("x", None, None, SafetyLevel::Off));
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["generationConfig"]["imageConfig"], json!({}), "an edit that names no ratio sends none");
        // Images go after the prompt, in order, encoded in place; closing text after them.
        let images = [
            InlineImage { mime_type: "image/png", bytes: b"\x89PNG" },
            InlineImage { mime_type: "image/jpeg", bytes: b"\xff\xd8\xff" },
        ];
        let b = request_body(&CallSpec {
            images: &images,
            closing_text: Some("mask!"),
            include_thoughts: false,
            ..spec("edit", None, None, SafetyLevel::Off)
        });
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            v["contents"][0]["parts"],
            json!([
                {"text": "edit"},
                {"inlineData": {"mimeType": "image/png", "data": "iVBORw=="}},
                {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/"}},
                {"text": "mask!"}
            ])
        );
        assert_eq!(
            generate_content_path("gemini-3-pro-image-preview"),
            "/v1beta/models/gemini-3-pro-image-preview:generateContent"
        );
    }

    #[test]
    fn images_are_read_without_copying_and_thoughts_are_skipped() {
        let out = ok(r#"{"candidates":[{"content":{"parts":[
            {"text":"thinking...","thought":true},
            {"inlineData":{"mimeType":"image/png","data":"AAAA"},"thought":true},
            {"text":"Here is a cat"},
            {"inlineData":{"mimeType":"image/png","data":"iVBORw0KGgo="}}]},"finishReason":"STOP"}],
            "usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":1290,"thoughtsTokenCount":100,"totalTokenCount":1400}}"#);
        let img = out.result.unwrap();
        assert_eq!(img.base64(), b"iVBORw0KGgo=");
        assert!(matches!(img.data, Base64::InBody(..)));
        assert_eq!(img.text.as_deref(), Some("Here is a cat"));
        assert_eq!(
            out.usage,
            Some(Usage { input_tokens: 10, output_tokens: 1390, total_tokens: 1400, ..Default::default() })
        );
    }

    #[test]
    fn escaped_base64_is_still_read() {
        let img =
            ok(r#"{"candidates":[{"content":{"parts":[{"inlineData":{"mimeType":"image/png","data":"ab\/c"}}]}}]}"#)
                .result
                .unwrap();
        assert_eq!(img.base64(), b"ab/c");
    }

    #[test]
    fn blocks_and_missing_images_map_to_the_table() {
        let blocked = ok(
            r#"{"promptFeedback":{"blockReason":"SAFETY"},"usageMetadata":{"promptTokenCount":5,"totalTokenCount":5}}"#,
        );
        assert_eq!(blocked.result.unwrap_err().code, ErrorCode::SafetyBlocked);
        assert_eq!(blocked.usage.unwrap().input_tokens, 5);
        for reason in ["SAFETY", "PROHIBITED_CONTENT", "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_OTHER"] {
            let body =
                format!(r#"{{"candidates":[{{"content":{{"parts":[{{"text":"no"}}]}},"finishReason":"{reason}"}}]}}"#);
            assert_eq!(ok(&body).result.unwrap_err().code, ErrorCode::SafetyBlocked, "{reason}");
        }
        let body = r#"{"candidates":[{"finishReason":"IMAGE_SAFETY"}]}"#;
        assert_eq!(ok(body).result.unwrap_err().code, ErrorCode::SafetyBlocked);
        for body in [
            r#"{"candidates":[{"content":{"parts":[{"text":"I can't draw"}]},"finishReason":"STOP"}]}"#,
            r#"{"candidates":[{"content":{"parts":[]},"finishReason":"MAX_TOKENS"}]}"#,
            r#"{"candidates":[]}"#,
            r#"{}"#,
            r#"{"candidates":[{"content":{"parts":[{"inlineData":{"mimeType":"image/png","data":"AAAA"},"thought":true}]},"finishReason":"STOP"}]}"#,
        ] {
            assert_eq!(ok(body).result.unwrap_err().code, ErrorCode::NoImage, "{body}");
        }
    }

    #[test]
    fn base64_checks_every_byte() {
        assert!(is_base64(b"QUJD") && is_base64(b"QUI=") && is_base64(b"QQ==") && is_base64(b"+/09azAZ"));
        for bad in
            [&b""[..], b"QUJ", b"QU=D", b"Q===", b"QUJD!AAA", b"QUJ\n", b"QUJ@", b"QUJ[", b"QUJ`", b"QUJ{", b"QU\xffD"]
        {
            assert!(!is_base64(bad), "{:?}", String::from_utf8_lossy(bad));
        }
        let mut big = b"QUJD".repeat(10_000);
        assert!(is_base64(&big));
        big[23_456] = b'*';
        assert!(!is_base64(&big));
    }

    #[test]
    fn unreadable_answers_are_upstream_errors() {
        for body in [
            "",
            "garbage",
            r#"{"candidates":[{"content":{"parts":[{"inlineData":{"data":"AA"#,
            "[]",
            r#"{"candidates":5}"#,
        ] {
            assert_eq!(ok(body).result.unwrap_err().code, ErrorCode::UpstreamError, "{body:?}");
        }
        let bad64 =
            r#"{"candidates":[{"content":{"parts":[{"inlineData":{"mimeType":"image/png","data":"not base64!"}}]}}]}"#;
        assert_eq!(ok(bad64).result.unwrap_err().code, ErrorCode::UpstreamError);
    }

    #[test]
    fn gemini_errors_map_to_the_table() {
        let j = "application/json; charset=UTF-8";
        let quota = failed(
            429,
            j,
            r#"{"error":{"code":429,"message":"Resource has been exhausted","status":"RESOURCE_EXHAUSTED",
            "details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"31.2s"}]}}"#,
        );
        assert_eq!((quota.code, quota.retry_after), (ErrorCode::QuotaExhausted, Some(32)));
        let quota = failed(429, j, r#"{"error":{"code":429,"message":"x","status":"RESOURCE_EXHAUSTED"}}"#);
        assert_eq!((quota.code, quota.retry_after), (ErrorCode::QuotaExhausted, None));
        assert_eq!(
            failed(503, j, r#"{"error":{"code":503,"message":"overloaded","status":"UNAVAILABLE"}}"#).code,
            ErrorCode::ServiceUnavailable
        );
        assert_eq!(
            failed(401, j, r#"{"error":{"code":401,"message":"secret detail","status":"UNAUTHENTICATED"}}"#).code,
            ErrorCode::UpstreamAuth
        );
        let auth =
            failed(403, j, r#"{"error":{"code":403,"message":"key AIzaXYZ leaked","status":"PERMISSION_DENIED"}}"#);
        assert_eq!(auth.code, ErrorCode::UpstreamAuth);
        assert!(!auth.message.contains("AIza"));
        let bad_key = failed(
            400,
            j,
            r#"{"error":{"code":400,"message":"API key not valid.","status":"INVALID_ARGUMENT",
            "details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com"}]}}"#,
        );
        assert_eq!(bad_key.code, ErrorCode::UpstreamAuth);
        let prompt = failed(400, j, r#"{"error":{"code":400,"message":"prompt is bad","status":"INVALID_ARGUMENT"}}"#);
        assert_eq!((prompt.code, prompt.param), (ErrorCode::InvalidPrompt, Some("prompt")));
        let image = failed(
            400,
            j,
            r#"{"error":{"code":400,"message":"Provided image is not valid.","status":"INVALID_ARGUMENT"}}"#,
        );
        assert_eq!((image.code, image.param), (ErrorCode::InvalidRequest, Some("image")));
        let field = failed(
            400,
            j,
            r#"{"error":{"code":400,"message":"Invalid value","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"contents[0].parts[1].inline_data.data"}]}]}}"#,
        );
        assert_eq!(field.param, Some("image"));
        assert_eq!(
            failed(500, j, r#"{"error":{"code":500,"message":"x","status":"INTERNAL"}}"#).code,
            ErrorCode::UpstreamError
        );
        assert_eq!(
            failed(404, j, r#"{"error":{"code":404,"message":"x","status":"NOT_FOUND"}}"#).code,
            ErrorCode::UpstreamError
        );
        assert_eq!(failed(500, "text/html", "<html>oops").code, ErrorCode::UpstreamError);
    }

    #[test]
    fn envoy_failures_are_network_errors() {
        let refused = failed(
            503,
            "text/plain",
            "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
        );
        assert_eq!((refused.code, refused.status()), (ErrorCode::NetworkError, 502));
        let timeout = failed(504, "text/plain", "upstream request timeout");
        assert_eq!((timeout.code, timeout.status()), (ErrorCode::NetworkError, 504));
        let none = read_call(CallResponse { status: None, elapsed_ms: 3, timeout_ms: 1000, ..Default::default() });
        assert_eq!(none.result.unwrap_err().status(), 502);
        let timed_out =
            read_call(CallResponse { status: None, elapsed_ms: 1000, timeout_ms: 1000, ..Default::default() });
        assert_eq!(timed_out.result.unwrap_err().status(), 504);
    }
}
