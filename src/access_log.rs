//! The one structured log line per image request. It carries a hash of the prompt, never the
//! prompt, the key, the image or `user`.

use serde::Serialize;

use crate::error::ErrorCode;
use crate::gemini::Usage;
use crate::metrics::{CacheState, Outcome};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Info,
    Warn,
    Error,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogRecord {
    /// `generations`, `edits`, `variations` or `files`.
    pub endpoint: &'static str,
    pub outcome: Outcome,
    pub status: u32,
    pub error: Option<ErrorCode>,
    pub model: Option<String>,
    pub variant: Option<String>,
    /// An edit's input images (the mask not counted).
    pub input_images: Option<u32>,
    pub n: Option<u32>,
    pub aspect_ratio: Option<&'static str>,
    pub image_size: Option<&'static str>,
    pub quality: Option<&'static str>,
    pub style: Option<&'static str>,
    pub safety: Option<&'static str>,
    pub cache: CacheState,
    pub latency_ms: u64,
    pub upstream_latency_ms: Option<u64>,
    pub upstream_status: Option<u32>,
    /// The backend that answered (its name), and the attempts the calls took in all.
    pub backend: Option<String>,
    pub attempts: Option<u32>,
    pub prompt_hash: Option<String>,
    pub request_id: Option<String>,
    pub images: u32,
    pub failed_calls: u32,
    pub usage: Option<Usage>,
    /// The policy profile in force (contract section 15).
    pub profile: String,
    /// What Google was paid for this request, and what a cache hit saved, in micro-dollars.
    pub cost_micro: u64,
    pub saved_micro: u64,
}

/// The line as written: field order is the order below (serde keeps struct order).
#[derive(Serialize)]
struct Line<'a> {
    event: &'static str,
    endpoint: &'static str,
    outcome: &'static str,
    status: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    category: &'static str,
    model: Option<&'a str>,
    variant: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    input_images: Option<u32>,
    n: Option<u32>,
    aspect_ratio: Option<&'static str>,
    image_size: Option<&'static str>,
    quality: Option<&'static str>,
    style: Option<&'static str>,
    safety: Option<&'static str>,
    cache: &'static str,
    latency_ms: u64,
    upstream_latency_ms: Option<u64>,
    upstream_status: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts: Option<u32>,
    images: u32,
    failed_calls: u32,
    profile: &'a str,
    cost_usd: f64,
    saved_usd: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    input_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_tokens: Option<u64>,
    prompt_hash: Option<&'a str>,
    request_id: Option<&'a str>,
}

impl LogRecord {
    pub fn to_json(&self) -> String {
        let category = match (self.error, self.outcome) {
            (Some(code), _) => code.category().as_str(),
            (None, Outcome::ClientClosed) => "CLIENT_CLOSED",
            (None, _) => "SUCCESS",
        };
        let line = Line {
            event: "image_generation",
            endpoint: self.endpoint,
            outcome: self.outcome.as_str(),
            status: self.status,
            code: self.error.map(ErrorCode::as_str),
            category,
            model: self.model.as_deref(),
            variant: self.variant.as_deref(),
            input_images: self.input_images,
            n: self.n,
            aspect_ratio: self.aspect_ratio,
            image_size: self.image_size,
            quality: self.quality,
            style: self.style,
            safety: self.safety,
            cache: self.cache.as_str(),
            latency_ms: self.latency_ms,
            upstream_latency_ms: self.upstream_latency_ms,
            upstream_status: self.upstream_status,
            backend: self.backend.as_deref(),
            attempts: self.attempts,
            images: self.images,
            failed_calls: self.failed_calls,
            profile: &self.profile,
            cost_usd: self.cost_micro as f64 / 1e6,
            saved_usd: self.saved_micro as f64 / 1e6,
            input_tokens: self.usage.map(|u| u.input_tokens),
            output_tokens: self.usage.map(|u| u.output_tokens),
            prompt_hash: self.prompt_hash.as_deref(),
            request_id: self.request_id.as_deref(),
        };
        serde_json::to_string(&line).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Endpoint;

    #[test]
    fn the_line_starts_with_the_event_and_holds_every_field() {
        let r = LogRecord {
            endpoint: Endpoint::Generations.as_str(),
            outcome: Outcome::Error,
            status: 429,
            error: Some(ErrorCode::QuotaExhausted),
            model: Some("dall-e-3".into()),
            variant: Some("gemini-3-pro-image".into()),
            input_images: None,
            n: Some(2),
            aspect_ratio: Some("1:1"),
            image_size: None,
            quality: None,
            style: None,
            safety: Some("OFF"),
            cache: CacheState::Miss,
            latency_ms: 12,
            upstream_latency_ms: Some(10),
            upstream_status: Some(429),
            backend: Some("gemini".into()),
            attempts: Some(2),
            prompt_hash: Some("0123456789abcdef".into()),
            request_id: Some("r1".into()),
            images: 0,
            failed_calls: 2,
            usage: None,
            profile: "kids".into(),
            cost_micro: 268_000,
            saved_micro: 0,
        };
        let json = r.to_json();
        assert!(json.starts_with(r#"{"event":"image_generation","endpoint":"generations","outcome":"error","status":429,"code":"IMG_QUOTA_EXHAUSTED","category":"API_ERROR""#), "{json}");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        for key in [
            "model",
            "variant",
            "n",
            "aspect_ratio",
            "image_size",
            "safety",
            "cache",
            "latency_ms",
            "upstream_status",
            "prompt_hash",
            "request_id",
            "profile",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
        assert_eq!((v["cost_usd"].as_f64(), v["saved_usd"].as_f64()), (Some(0.268), Some(0.0)));
    }
}
