//! The OpenAI Images request (docs/configuration.md, "Requests"): parsed, validated, and resolved into
//! everything the Gemini calls need. Every bad value is a 400 naming its field.

use std::collections::BTreeMap;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::config::Settings;
use crate::endpoint::Endpoint;
use crate::error::{ApiError, ErrorCode};
use crate::geometry::{AspectRatio, ImageSize, Quality};
use crate::hash::prompt_hash;
use crate::model::{ModelVariant, DEFAULT_MODEL};
use crate::named::{named, Named};
use crate::safety::SafetyLevel;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResponseFormat {
    B64Json,
    Url,
}

named!(ResponseFormat { B64Json => "b64_json", Url => "url" });

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    Vivid,
    Natural,
}

named!(Style { Vivid => "vivid", Natural => "natural" });

/// `output_format`: Gemini returns PNG, so only `png` is accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OutputFormat {
    Png,
}

named!(OutputFormat { Png => "png" });

/// An edit's `input_fidelity`: accepted, no effect on Gemini.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InputFidelity {
    Low,
    High,
}

named!(InputFidelity { Low => "low", High => "high" });

/// `background`: `transparent` is refused with its own message before this is parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Background {
    Auto,
    Opaque,
}

named!(Background { Auto => "auto", Opaque => "opaque" });

/// A valid request, resolved against the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRequest {
    /// The prompt Gemini gets: the client's, plus the style phrase when a style was sent.
    pub final_prompt: String,
    /// First 16 hex characters of SHA-256 of the client's prompt.
    pub prompt_hash: String,
    /// The model name the client sent (or the default).
    pub model: String,
    pub variant: ModelVariant,
    /// The variant's canonical name (logs, metrics, the cache key).
    pub variant_name: String,
    /// The model id in Gemini's path.
    pub upstream: String,
    pub n: u32,
    /// `None` only for edits that name no ratio: Gemini keeps the input's.
    pub ratio: Option<AspectRatio>,
    pub image_size: Option<ImageSize>,
    pub quality: Option<Quality>,
    pub style: Option<Style>,
    pub response_format: ResponseFormat,
    pub safety: SafetyLevel,
    /// An edit's input images and mask, by digest (empty for generations).
    pub inputs: InputDigests,
    /// Text sent after the input images: the mask instruction, when a mask is sent.
    pub closing_text: Option<String>,
    /// `stream: true`: what the events need (contract section 12).
    pub stream: Option<StreamAsk>,
}

impl ImageRequest {
    /// Whether Gemini is asked for its thoughts: a stream that wants partial images, on a
    /// model that thinks (Gemini 2.5 Flash Image does not, and makes no interim images).
    pub fn wants_thoughts(&self) -> bool {
        self.stream.is_some_and(|s| s.partial_images > 0) && !self.upstream.starts_with("gemini-2.5-flash-image")
    }
}

/// What a streamed request asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamAsk {
    /// At most this many partial images (`partial_images`, 0 to 3; 0 when absent).
    pub partial_images: u32,
    /// Echoed in every event, in the values OpenAI's stream events use.
    pub quality: &'static str,
    pub background: &'static str,
}

/// SHA-256 of each input image, in order, and of the mask: what the cache key covers of an
/// edit's inputs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InputDigests {
    pub images: Vec<[u8; 32]>,
    pub mask: Option<[u8; 32]>,
}

/// A refused request, with what was learned before the refusal (for headers and the log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub error: ApiError,
    pub prompt_hash: Option<String>,
    pub model: Option<String>,
    pub safety: Option<SafetyLevel>,
}

/// Client text quoted in an error message is cut to this many characters.
const QUOTE_CHARS: usize = 64;

fn quote(v: &Value) -> String {
    let text = match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    };
    if text.chars().count() > QUOTE_CHARS {
        let cut: String = text.chars().take(QUOTE_CHARS).collect();
        format!("{cut}...")
    } else {
        text
    }
}

fn invalid(param: &'static str, message: String) -> ApiError {
    ApiError::param(ErrorCode::InvalidRequest, param, message)
}

/// A present, non-null field (OpenAI treats `null` as absent).
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

fn string_field<'a>(obj: &'a Map<String, Value>, name: &'static str) -> Result<Option<&'a str>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(invalid(name, format!("{name} must be a string, got {}", quote(v)))),
    }
}

/// A string field that must name a value of `T` (`any_case`: in any ASCII case).
fn named_field<T: Named>(obj: &Map<String, Value>, name: &'static str, any_case: bool) -> Result<Option<T>, ApiError> {
    let Some(s) = string_field(obj, name)? else {
        return Ok(None);
    };
    let parsed = if any_case { T::parse_any_case(s) } else { T::parse(s) };
    match parsed {
        Some(t) => Ok(Some(t)),
        None => Err(invalid(
            name,
            format!("{name} {} is not supported; expected one of: {}", quote(&Value::String(s.into())), T::expected()),
        )),
    }
}

/// A generations request: a JSON body.
pub fn parse_request(body: &[u8], settings: &Settings) -> Result<ImageRequest, Rejection> {
    let mut known = Rejection::new();
    match read_object(body).and_then(|obj| parse_fields(&obj, settings, Endpoint::Generations, &mut known)) {
        Ok(r) => Ok(r),
        Err(error) => Err(Rejection { error, ..known }),
    }
}

impl Rejection {
    /// Nothing known yet.
    pub fn new() -> Rejection {
        Rejection { error: ApiError::new(ErrorCode::InternalError, ""), prompt_hash: None, model: None, safety: None }
    }
}

impl Default for Rejection {
    fn default() -> Self {
        Rejection::new()
    }
}

/// The request fields this gateway reads; any other is ignored, whatever it holds.
const FIELDS: [&str; 17] = [
    "prompt",
    "model",
    "n",
    "size",
    "quality",
    "style",
    "response_format",
    "output_format",
    "background",
    "user",
    "moderation",
    "stream",
    "partial_images",
    "safety_threshold",
    "image_size",
    "aspect_ratio",
    "input_fidelity",
];

/// The name of a request field this gateway reads, as a `param` can carry it.
pub fn field_name(name: &str) -> Option<&'static str> {
    FIELDS.iter().copied().find(|f| *f == name)
}

/// The body as an object of the fields this gateway reads. JSON that is not well-formed is
/// "not valid JSON"; a field whose value is valid JSON but cannot be held (RFC 8259 sets no
/// range: `1e400`, or nesting deeper than the parser goes) is a 400 naming that field.
fn read_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let raw: BTreeMap<String, Box<RawValue>> = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            ApiError::new(ErrorCode::InvalidRequest, "request body must be a JSON object")
        }
        _ => ApiError::new(ErrorCode::InvalidRequest, format!("request body is not valid JSON: {e}")),
    })?;
    let mut obj = Map::new();
    for (name, value) in raw {
        let Some(field) = field_name(&name) else { continue };
        let value: Value = serde_json::from_str(value.get()).map_err(|_| {
            let code = if field == "prompt" { ErrorCode::InvalidPrompt } else { ErrorCode::InvalidRequest };
            ApiError::param(code, field, format!("{field} holds a number out of range or nesting too deep to read"))
        })?;
        obj.insert(name, value);
    }
    Ok(obj)
}

/// The fields of a request (a JSON body's, or an edit's text parts as JSON values), for an
/// endpoint: validated and resolved against the configuration. `known` keeps what was learned
/// before a refusal.
pub fn parse_fields(
    obj: &Map<String, Value>,
    settings: &Settings,
    endpoint: Endpoint,
    known: &mut Rejection,
) -> Result<ImageRequest, ApiError> {
    // prompt (a variation's is the configured one)
    let prompt = match (endpoint, field(obj, "prompt")) {
        (Endpoint::Variations, _) => settings.edits.variation_prompt.as_str(),
        (_, None) => return Err(ApiError::param(ErrorCode::InvalidPrompt, "prompt", "prompt is required")),
        (_, Some(Value::String(s))) => s.as_str(),
        (_, Some(v)) => {
            return Err(ApiError::param(
                ErrorCode::InvalidPrompt,
                "prompt",
                format!("prompt must be a string, got {}", json_type(v)),
            ))
        }
    };
    known.prompt_hash = Some(prompt_hash(prompt));
    if prompt.trim().is_empty() {
        return Err(ApiError::param(ErrorCode::InvalidPrompt, "prompt", "prompt must not be empty"));
    }
    let chars = prompt.chars().count();
    if chars > settings.limits.max_prompt_chars {
        return Err(ApiError::param(
            ErrorCode::InvalidPrompt,
            "prompt",
            format!("prompt is {chars} characters; the limit is {}", settings.limits.max_prompt_chars),
        ));
    }

    // safety first among the rest, so that every later refusal can say which level applied
    let requested = named_field::<SafetyLevel>(obj, "safety_threshold", true)?;
    let safety =
        settings.safety.resolve(requested).map_err(|refusal| invalid("safety_threshold", refusal.message()))?;
    known.safety = Some(safety);

    // model
    let model = match field(obj, "model") {
        None => settings.profile.default_model.as_deref().unwrap_or(DEFAULT_MODEL),
        Some(Value::String(s)) => s.as_str(),
        Some(v) => {
            return Err(ApiError::param(
                ErrorCode::UnsupportedModel,
                "model",
                format!("model must be a string, got {}", quote(v)),
            ))
        }
    };
    // The log carries the model name; a refused one is client text, so it is cut short.
    known.model = Some(model.chars().take(QUOTE_CHARS).collect());
    let families = &settings.families;
    let (variant, family) = settings
        .aliases
        .get(model)
        .copied()
        .or_else(|| families.parse(model))
        .and_then(|v| Some((v, families.get(v)?)))
        .ok_or_else(|| {
            ApiError::param(
                ErrorCode::UnsupportedModel,
                "model",
                format!(
                    "model {} is not supported; use one of {} with an optional size suffix (-2k, -4k, where the \
                     family makes that size) and ratio suffix (-1x1, -4x3, -3x4, -16x9, -9x16, -21x9){}",
                    quote(&Value::String(model.into())),
                    families.names(),
                    alias_hint(settings)
                ),
            )
        })?;
    if !settings.profile.allows_model(model, &family.name) {
        let allowed = settings.profile.models.as_deref().unwrap_or_default().join(", ");
        return Err(ApiError::param(
            ErrorCode::UnsupportedModel,
            "model",
            format!(
                "model {} is not allowed for this caller on this gateway; allowed: {allowed}",
                quote(&Value::String(model.into()))
            ),
        ));
    }

    // n
    let n = match field(obj, "n") {
        None => 1,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 && n <= u64::from(settings.limits.max_n) => n as u32,
            _ => {
                return Err(invalid(
                    "n",
                    format!("n must be an integer from 1 to {}, got {}", settings.limits.max_n, quote(v)),
                ))
            }
        },
    };

    // ratio: aspect_ratio > size > model suffix > 1:1
    let size_ratio = match string_field(obj, "size")? {
        None | Some("auto") => None,
        Some(s) => Some(AspectRatio::from_size(s).ok_or_else(|| {
            invalid(
                "size",
                format!(
                    "size {} must be auto, WxH or W:H within 5% of a supported ratio ({})",
                    quote(&Value::String(s.into())),
                    AspectRatio::expected()
                ),
            )
        })?),
    };
    let explicit_ratio = named_field::<AspectRatio>(obj, "aspect_ratio", true)?;
    let ratio = explicit_ratio.or(size_ratio).or(variant.ratio);
    // A generation always says its ratio; an edit that names none keeps its input's.
    let ratio = match endpoint {
        Endpoint::Generations => Some(ratio.unwrap_or(AspectRatio::R1x1)),
        Endpoint::Edits | Endpoint::Variations => ratio,
    };

    // image size: image_size > quality > model suffix > none
    let quality = named_field::<Quality>(obj, "quality", false)?;
    let explicit_size = named_field::<ImageSize>(obj, "image_size", true)?;
    let (image_size, size_from) = if let Some(s) = explicit_size {
        (Some(s), "image_size")
    } else if let Some(s) = quality.and_then(Quality::image_size) {
        (Some(s), "quality")
    } else {
        (variant.image_size, "model")
    };
    // A family of one fixed size takes `image_size: 1K` and any quality, and is sent no size.
    let image_size = match image_size {
        Some(s) if !family.sized() => {
            if size_from == "image_size" && s != ImageSize::K1 {
                return Err(invalid(
                    "image_size",
                    format!("{} makes 1K images only; image_size {} is not supported", family.name, s.as_str()),
                ));
            }
            None
        }
        Some(s) if !family.image_sizes.contains(&s) => {
            return Err(invalid(
                size_from,
                format!(
                    "{} does not make {} images; it makes {}",
                    family.name,
                    s.as_str(),
                    family.image_sizes.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                ),
            ))
        }
        other => other,
    };
    if let Some(s) = image_size {
        if s > settings.limits.max_image_size {
            return Err(invalid(
                size_from,
                format!(
                    "image size {} is above this gateway's limit of {}",
                    s.as_str(),
                    settings.limits.max_image_size.as_str()
                ),
            ));
        }
    }

    let style = named_field::<Style>(obj, "style", false)?;
    // As OpenAI does for DALL-E models: `url` by default for the configured names, when the
    // gateway serves image URLs.
    let asked_model = field(obj, "model").and_then(Value::as_str);
    let url_by_default = settings
        .urls
        .as_ref()
        .is_some_and(|u| asked_model.is_some_and(|m| u.default_url_models.iter().any(|d| d == m)));
    let response_format = named_field::<ResponseFormat>(obj, "response_format", false)?.unwrap_or(if url_by_default {
        ResponseFormat::Url
    } else {
        ResponseFormat::B64Json
    });
    named_field::<OutputFormat>(obj, "output_format", false)?;
    if string_field(obj, "background")? == Some("transparent") {
        return Err(invalid(
            "background",
            "background \"transparent\" is not supported: Gemini returns opaque PNG images".into(),
        ));
    }
    let background = named_field::<Background>(obj, "background", false)?;
    let partial_images = match field(obj, "partial_images") {
        None => 0,
        Some(v) => match v.as_u64() {
            Some(p) if p <= u64::from(crate::stream::MAX_PARTIAL_IMAGES) => p as u32,
            _ => {
                return Err(invalid(
                    "partial_images",
                    format!(
                        "partial_images must be an integer from 0 to {}, got {}",
                        crate::stream::MAX_PARTIAL_IMAGES,
                        quote(v)
                    ),
                ))
            }
        },
    };
    let stream = match field(obj, "stream") {
        None | Some(Value::Bool(false)) => None,
        Some(Value::Bool(true)) => {
            if endpoint == Endpoint::Variations {
                return Err(invalid("stream", "variations do not stream; send stream: false or omit it".into()));
            }
            if !settings.streaming.enabled {
                return Err(invalid(
                    "stream",
                    "streaming is not enabled on this gateway; send stream: false or omit it".into(),
                ));
            }
            if n != 1 {
                return Err(invalid("n", format!("a streamed request makes one image: n must be 1, got {n}")));
            }
            Some(StreamAsk {
                partial_images,
                quality: match quality {
                    None | Some(Quality::Auto) => "auto",
                    Some(Quality::Low) => "low",
                    Some(Quality::Medium) | Some(Quality::Standard) => "medium",
                    Some(Quality::High) | Some(Quality::Hd) => "high",
                },
                background: match background {
                    Some(Background::Opaque) => "opaque",
                    _ => "auto",
                },
            })
        }
        Some(v) => return Err(invalid("stream", format!("stream must be a boolean, got {}", quote(v)))),
    };
    string_field(obj, "user")?;
    string_field(obj, "moderation")?;
    if endpoint != Endpoint::Generations {
        named_field::<InputFidelity>(obj, "input_fidelity", false)?;
    }

    let final_prompt = match style {
        None => prompt.to_string(),
        Some(Style::Vivid) => append_style(prompt, &settings.styles.vivid),
        Some(Style::Natural) => append_style(prompt, &settings.styles.natural),
    };

    Ok(ImageRequest {
        final_prompt,
        prompt_hash: known.prompt_hash.clone().unwrap_or_default(),
        model: model.to_string(),
        variant,
        variant_name: families.name(variant),
        upstream: family.upstream.clone(),
        n,
        ratio,
        image_size,
        quality,
        style,
        response_format,
        safety,
        inputs: InputDigests::default(),
        closing_text: None,
        stream,
    })
}

fn append_style(prompt: &str, phrase: &str) -> String {
    if phrase.trim().is_empty() {
        prompt.to_string()
    } else {
        format!("{prompt}\n\nStyle: {phrase}")
    }
}

fn alias_hint(settings: &Settings) -> String {
    if settings.aliases.is_empty() {
        String::new()
    } else {
        let names: Vec<&str> = settings.aliases.keys().map(String::as_str).collect();
        format!(", or an alias: {}", names.join(", "))
    }
}

pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use serde_json::json;

    fn settings() -> Settings {
        Settings::from_json(b"{}", &|_| None).unwrap()
    }

    fn parse(v: Value) -> Result<ImageRequest, Rejection> {
        parse_request(v.to_string().as_bytes(), &settings())
    }

    fn rejected(v: Value) -> (ErrorCode, Option<&'static str>) {
        let r = parse(v.clone()).expect_err(&format!("{v} should be refused"));
        (r.error.code, r.error.param)
    }

    #[test]
    fn a_minimal_request_gets_the_defaults() {
        let r = parse(json!({"prompt": "a cat"})).unwrap();
        assert_eq!(r.final_prompt, "a cat");
        assert_eq!(r.model, "gemini-3-pro-image");
        assert_eq!(r.n, 1);
        assert_eq!(r.ratio, Some(AspectRatio::R1x1));
        assert_eq!(r.image_size, None);
        assert_eq!(r.response_format, ResponseFormat::B64Json);
        assert_eq!(r.safety, SafetyLevel::Off);
        assert_eq!(r.prompt_hash.len(), 16);
    }

    #[test]
    fn ratio_precedence_is_aspect_ratio_then_size_then_suffix() {
        let m = "gemini-3-pro-image-21x9";
        assert_eq!(parse(json!({"prompt": "p", "model": m})).unwrap().ratio, Some(AspectRatio::R21x9));
        assert_eq!(parse(json!({"prompt": "p", "model": m, "size": "auto"})).unwrap().ratio, Some(AspectRatio::R21x9));
        assert_eq!(
            parse(json!({"prompt": "p", "model": m, "size": "1792x1024"})).unwrap().ratio,
            Some(AspectRatio::R16x9)
        );
        assert_eq!(
            parse(json!({"prompt": "p", "model": m, "size": "1792x1024", "aspect_ratio": "4:5"})).unwrap().ratio,
            Some(AspectRatio::R4x5)
        );
    }

    #[test]
    fn image_size_precedence_is_field_then_quality_then_suffix() {
        let m = "gemini-3-pro-image-2k";
        assert_eq!(parse(json!({"prompt": "p", "model": m})).unwrap().image_size, Some(ImageSize::K2));
        assert_eq!(
            parse(json!({"prompt": "p", "model": m, "quality": "auto"})).unwrap().image_size,
            Some(ImageSize::K2)
        );
        assert_eq!(parse(json!({"prompt": "p", "model": m, "quality": "hd"})).unwrap().image_size, Some(ImageSize::K4));
        assert_eq!(
            parse(json!({"prompt": "p", "model": m, "quality": "standard"})).unwrap().image_size,
            Some(ImageSize::K1)
        );
        assert_eq!(
            parse(json!({"prompt": "p", "model": m, "quality": "hd", "image_size": "1k"})).unwrap().image_size,
            Some(ImageSize::K1)
        );
    }

    #[test]
    fn the_image_size_cap_names_the_field_that_asked() {
        let s = Settings::from_json(br#"{"limits": {"max_image_size": "2K"}}"#, &|_| None).unwrap();
        let p = |v: Value| parse_request(v.to_string().as_bytes(), &s).map_err(|r| r.error.param);
        assert_eq!(p(json!({"prompt": "p", "image_size": "4K"})).unwrap_err(), Some("image_size"));
        assert_eq!(p(json!({"prompt": "p", "quality": "hd"})).unwrap_err(), Some("quality"));
        assert_eq!(p(json!({"prompt": "p", "model": "gemini-3-pro-image-4k"})).unwrap_err(), Some("model"));
        assert!(p(json!({"prompt": "p", "quality": "medium"})).is_ok());
    }

    #[test]
    fn aliases_resolve_and_unknown_models_are_refused() {
        let r = parse(json!({"prompt": "p", "model": "dall-e-3"})).unwrap();
        assert_eq!(r.variant, ModelVariant { family: 0, image_size: None, ratio: None });
        assert_eq!(r.model, "dall-e-3");
        assert_eq!(rejected(json!({"prompt": "p", "model": "dall-e-2"})), (ErrorCode::UnsupportedModel, Some("model")));
        assert_eq!(rejected(json!({"prompt": "p", "model": 3})), (ErrorCode::UnsupportedModel, Some("model")));
    }

    #[test]
    fn style_appends_the_configured_phrase_only_when_sent() {
        let r = parse(json!({"prompt": "a cat", "style": "vivid"})).unwrap();
        assert!(
            r.final_prompt.starts_with("a cat")
                && r.final_prompt.ends_with("vivid colors, dramatic lighting, rich details")
        );
        let r = parse(json!({"prompt": "a cat", "style": "natural"})).unwrap();
        assert!(r.final_prompt.ends_with("natural lighting, realistic, photorealistic"));
    }

    #[test]
    fn every_bad_value_names_its_field() {
        let cases = [
            (json!({}), ErrorCode::InvalidPrompt, Some("prompt")),
            (json!({"prompt": ""}), ErrorCode::InvalidPrompt, Some("prompt")),
            (json!({"prompt": "   "}), ErrorCode::InvalidPrompt, Some("prompt")),
            (json!({"prompt": 5}), ErrorCode::InvalidPrompt, Some("prompt")),
            (json!({"prompt": "x".repeat(32001)}), ErrorCode::InvalidPrompt, Some("prompt")),
            (json!({"prompt": "p", "n": 0}), ErrorCode::InvalidRequest, Some("n")),
            (json!({"prompt": "p", "n": 5}), ErrorCode::InvalidRequest, Some("n")),
            (json!({"prompt": "p", "n": 1.5}), ErrorCode::InvalidRequest, Some("n")),
            (json!({"prompt": "p", "n": "2"}), ErrorCode::InvalidRequest, Some("n")),
            (json!({"prompt": "p", "n": -1}), ErrorCode::InvalidRequest, Some("n")),
            (json!({"prompt": "p", "size": "3000x1000"}), ErrorCode::InvalidRequest, Some("size")),
            (json!({"prompt": "p", "size": 1024}), ErrorCode::InvalidRequest, Some("size")),
            (json!({"prompt": "p", "quality": "ultra"}), ErrorCode::InvalidRequest, Some("quality")),
            (json!({"prompt": "p", "style": "cubist"}), ErrorCode::InvalidRequest, Some("style")),
            (json!({"prompt": "p", "response_format": "jpeg"}), ErrorCode::InvalidRequest, Some("response_format")),
            (json!({"prompt": "p", "output_format": "webp"}), ErrorCode::InvalidRequest, Some("output_format")),
            (json!({"prompt": "p", "background": "transparent"}), ErrorCode::InvalidRequest, Some("background")),
            (json!({"prompt": "p", "background": "pink"}), ErrorCode::InvalidRequest, Some("background")),
            (json!({"prompt": "p", "stream": true, "n": 2}), ErrorCode::InvalidRequest, Some("n")),
            (json!({"prompt": "p", "partial_images": 4}), ErrorCode::InvalidRequest, Some("partial_images")),
            (
                json!({"prompt": "p", "stream": true, "partial_images": -1}),
                ErrorCode::InvalidRequest,
                Some("partial_images"),
            ),
            (json!({"prompt": "p", "stream": "no"}), ErrorCode::InvalidRequest, Some("stream")),
            (
                json!({"prompt": "p", "safety_threshold": "EXTREME"}),
                ErrorCode::InvalidRequest,
                Some("safety_threshold"),
            ),
            (json!({"prompt": "p", "image_size": "8K"}), ErrorCode::InvalidRequest, Some("image_size")),
            (json!({"prompt": "p", "aspect_ratio": "7:3"}), ErrorCode::InvalidRequest, Some("aspect_ratio")),
            (json!({"prompt": "p", "user": 7}), ErrorCode::InvalidRequest, Some("user")),
        ];
        for (body, code, param) in cases {
            assert_eq!(rejected(body.clone()), (code, param), "{body}");
        }
    }

    #[test]
    fn bodies_that_are_not_objects_are_invalid_requests() {
        for body in [&b"not json"[..], b"[1]", b"\"prompt\"", b"", b"{\"prompt\":", b"null"] {
            let r = parse_request(body, &settings()).unwrap_err();
            assert_eq!((r.error.code, r.error.param), (ErrorCode::InvalidRequest, None));
        }
    }

    #[test]
    fn numbers_json_allows_but_nobody_can_hold_name_their_field() {
        // RFC 8259 sets no range on numbers: these are valid JSON, so not "bad JSON".
        let s = settings();
        for (body, param, code) in [
            (&br#"{"prompt": "p", "n": 1e400}"#[..], "n", ErrorCode::InvalidRequest),
            (br#"{"prompt": "p", "n": -1e400}"#, "n", ErrorCode::InvalidRequest),
            (br#"{"prompt": "p", "n": 18446744073709551616}"#, "n", ErrorCode::InvalidRequest),
            (br#"{"prompt": 1e999}"#, "prompt", ErrorCode::InvalidPrompt),
            (br#"{"prompt": "p", "size": 1e400}"#, "size", ErrorCode::InvalidRequest),
            (br#"{"prompt": "p", "size": 1024}"#, "size", ErrorCode::InvalidRequest),
            (br#"{"prompt": "p", "partial_images": [1e400]}"#, "partial_images", ErrorCode::InvalidRequest),
        ] {
            let r = parse_request(body, &s).unwrap_err();
            assert_eq!((r.error.code, r.error.param), (code, Some(param)), "{}", String::from_utf8_lossy(body));
        }
        // A field this gateway does not read is ignored whatever it holds.
        assert!(parse_request(br#"{"prompt": "p", "future": 1e400}"#, &s).is_ok());
        // The last of repeated keys counts, as serde_json's own maps do.
        assert_eq!(parse_request(br#"{"prompt": "p", "n": 9, "n": 2}"#, &s).unwrap().n, 2);
    }

    #[test]
    fn accepted_values_pass_and_unknown_fields_are_ignored() {
        let r = parse(json!({
            "prompt": "p", "model": "gpt-image-1", "n": 4, "size": "1024x1536", "quality": "medium",
            "style": "vivid", "response_format": "url", "output_format": "png", "background": "opaque",
            "user": "u-1", "moderation": "low", "stream": false, "safety_threshold": "high",
            "some_future_field": {"x": 1}, "size_hint": null
        }))
        .unwrap();
        assert_eq!((r.n, r.ratio, r.image_size), (4, Some(AspectRatio::R2x3), Some(ImageSize::K2)));
        assert_eq!((r.response_format, r.safety), (ResponseFormat::Url, SafetyLevel::High));
        assert!(parse(json!({"prompt": "p", "background": "auto", "quality": null})).is_ok());
    }

    #[test]
    fn refusals_keep_what_was_known() {
        let r = parse(json!({"prompt": "a dog", "model": "nope"})).unwrap_err();
        assert_eq!(r.prompt_hash.as_deref(), Some(&prompt_hash("a dog")[..]));
        assert_eq!(r.safety, Some(SafetyLevel::Off));
        assert_eq!(r.model.as_deref(), Some("nope"));
    }

    #[test]
    fn prompt_length_counts_characters_not_bytes() {
        let s = Settings::from_json(br#"{"limits": {"max_prompt_chars": 3}}"#, &|_| None).unwrap();
        assert!(parse_request(json!({"prompt": "ééé"}).to_string().as_bytes(), &s).is_ok());
        assert!(parse_request(json!({"prompt": "éééé"}).to_string().as_bytes(), &s).is_err());
    }

    #[test]
    fn safety_policy_is_enforced_on_the_request() {
        let s = Settings::from_json(br#"{"safety": {"default": "MEDIUM", "minimum": "LOW"}}"#, &|_| None).unwrap();
        let p = |v: Value| parse_request(v.to_string().as_bytes(), &s);
        assert_eq!(p(json!({"prompt": "p"})).unwrap().safety, SafetyLevel::Medium);
        assert_eq!(p(json!({"prompt": "p", "safety_threshold": "low"})).unwrap().safety, SafetyLevel::Low);
        let r = p(json!({"prompt": "p", "safety_threshold": "off"})).unwrap_err();
        assert_eq!(r.error.param, Some("safety_threshold"));
        assert!(r.error.message.contains("minimum LOW"), "{}", r.error.message);
        let locked = Settings::from_json(br#"{"safety": {"allow_request_override": false}}"#, &|_| None).unwrap();
        let r = parse_request(json!({"prompt": "p", "safety_threshold": "HIGH"}).to_string().as_bytes(), &locked)
            .unwrap_err();
        assert_eq!(r.error.param, Some("safety_threshold"));
    }
}
