//! What fake-gemini checks in a `generateContent` request before it makes an image: the
//! `contents` parts (text and `inlineData` images), the number of images for the model, and
//! `imageConfig.imageSize` for the model. As strict as Google's documented API, and in two
//! places stricter (marked below), because the tests rely on the filter sending exactly right
//! requests.
//!
//! - A part is `{text}` or `{inlineData: {mimeType, data}}`; the REST API's JSON parser also
//!   takes the proto field names, so `inline_data` / `mime_type` are accepted too. A part with
//!   two data fields (`text` and `inlineData`, or `inlineData` and `inline_data`) is refused, as
//!   a proto `oneof` is; so is an unknown field inside the blob.
//! - `data` is base64 as proto3's JSON mapping reads `bytes`: the standard or the URL-safe
//!   alphabet, padded or not. Whitespace, a mix of both alphabets or non-zero trailing bits are
//!   refused (`Invalid value at '…inline_data.data' (TYPE_BYTES), Base64 decoding failed …`).
//! - `mimeType` is one of Google's image types (`image/png`, `image/jpeg`, `image/webp`,
//!   `image/heic`, `image/heif`), else `Unsupported MIME type: …`. Stricter than Google: the
//!   decoded bytes must be that type (PNG, JPEG, WebP and HEIF/HEIC sniffed from their first
//!   bytes; `image/heic` and `image/heif` are interchangeable) and, for PNG, JPEG and WebP, the
//!   header must give positive dimensions.
//! - At most 14 images (`gemini-3-pro-image*` and any other model) or 3
//!   (`gemini-2.5-flash-image*`), all contents together.
//! - `imageConfig.imageSize`: `1K`, `2K` or `4K` (uppercase, as Google requires) for Gemini 3
//!   Pro Image; not accepted at all by Gemini 2.5 Flash Image, which makes 1K images only.

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use serde_json::{json, Value};

/// The image types Google lists for Gemini's image models.
pub const SUPPORTED_IMAGE_TYPES: [&str; 5] = ["image/png", "image/jpeg", "image/webp", "image/heic", "image/heif"];

/// Gemini image models, by what they accept and make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `gemini-3-pro-image-preview` (and, as before, any model id the fake does not know).
    Pro3,
    /// `gemini-2.5-flash-image`: 1K images only, no `imageSize`, at most 3 input images.
    Flash25,
}

impl Family {
    pub fn of(model: &str) -> Family {
        if model.starts_with("gemini-2.5-flash-image") {
            Family::Flash25
        } else {
            Family::Pro3
        }
    }

    /// Input images a request may hold.
    pub fn max_images(self) -> usize {
        match self {
            Family::Pro3 => 14,
            Family::Flash25 => 3,
        }
    }

    /// Prompt tokens one input image counts for (Gemini 3: 1120 at the default media
    /// resolution; Gemini 2.5: 258 for an image that fits one tile).
    pub fn tokens_per_image(self) -> u64 {
        match self {
            Family::Pro3 => 1120,
            Family::Flash25 => 258,
        }
    }
}

/// An input image, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputImage {
    pub mime_type: String,
    /// Width and height from the image's header (`None` for a HEIF/HEIC without `ispe`).
    pub dimensions: Option<(u32, u32)>,
    pub len: usize,
}

/// What a valid request holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inputs {
    /// Every text part, in order, joined with newlines (where the markers are read).
    pub text: String,
    /// Every `inlineData` image, in order.
    pub images: Vec<InputImage>,
}

/// Why a request is refused: a 400 INVALID_ARGUMENT with this message and, for errors tied to
/// one field, `google.rpc.BadRequest` field violations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub message: String,
    pub violations: Vec<(String, String)>,
}

impl Invalid {
    fn plain(message: impl Into<String>) -> Invalid {
        Invalid { message: message.into(), violations: Vec::new() }
    }

    /// The `details` of Google's error JSON.
    pub fn details(&self) -> Value {
        if self.violations.is_empty() {
            return json!([]);
        }
        let v: Vec<Value> = self
            .violations
            .iter()
            .map(|(field, description)| json!({"field": field, "description": description}))
            .collect();
        json!([{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": v}])
    }
}

/// Reads `camel` or, failing that, `snake` (the REST API's JSON takes either name).
pub fn field<'a>(v: &'a Value, camel: &str, snake: &str) -> &'a Value {
    match v.get(camel) {
        Some(x) => x,
        None => &v[snake],
    }
}

/// The part fields that are members of `Part.data` (a proto `oneof`), in both spellings.
const DATA_FIELDS: [&str; 13] = [
    "text",
    "inlineData",
    "inline_data",
    "fileData",
    "file_data",
    "functionCall",
    "function_call",
    "functionResponse",
    "function_response",
    "executableCode",
    "executable_code",
    "codeExecutionResult",
    "code_execution_result",
];

/// Checks a request body for `model`; see the module documentation.
pub fn check(body: &Value, model: &str) -> Result<Inputs, Invalid> {
    let family = Family::of(model);
    let mut inputs = Inputs::default();
    // Parsing first, as Google's JSON parser does: every error of this phase is reported.
    let mut parse_errors: Vec<(Option<String>, String)> = Vec::new();
    // Then the meaning of what parsed; the first error is reported.
    let mut blobs: Vec<(String, Option<String>, Vec<u8>)> = Vec::new(); // (path, mime type, bytes)
    let mut roles_ok = true;
    let contents = body["contents"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let mut texts = Vec::new();
    for (ci, content) in contents.iter().enumerate() {
        match content.get("role") {
            None | Some(Value::Null) => {}
            Some(Value::String(r)) if r == "user" || r == "model" => {}
            Some(_) => roles_ok = false,
        }
        let parts = content["parts"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        for (pi, part) in parts.iter().enumerate() {
            let path = format!("contents[{ci}].parts[{pi}]");
            let Some(obj) = part.as_object() else {
                parse_errors.push((None, format!("Invalid JSON payload received. Expected an object at '{path}'.")));
                continue;
            };
            let set: Vec<&str> = DATA_FIELDS.iter().copied().filter(|f| obj.contains_key(*f)).collect();
            if set.len() > 1 {
                parse_errors.push((
                    None,
                    format!(
                        "Invalid JSON payload received. Oneof field 'data' is already set at '{path}'. Cannot set '{}'.",
                        set[1]
                    ),
                ));
                continue;
            }
            if let Some(t) = obj.get("text") {
                match t.as_str() {
                    Some(s) => texts.push(s),
                    None => parse_errors.push((
                        Some(format!("{path}.text")),
                        format!("Invalid value at '{path}.text' (TYPE_STRING), {t}"),
                    )),
                }
                continue;
            }
            let blob = obj.get("inlineData").or_else(|| obj.get("inline_data"));
            let Some(blob) = blob else { continue };
            let bpath = format!("{path}.inline_data");
            let Some(b) = blob.as_object() else {
                parse_errors.push((None, format!("Invalid JSON payload received. Expected an object at '{bpath}'.")));
                continue;
            };
            if let Some(k) = b.keys().find(|k| !["mimeType", "mime_type", "data"].contains(&k.as_str())) {
                parse_errors.push((
                    Some(bpath.clone()),
                    format!("Invalid JSON payload received. Unknown name \"{k}\" at '{bpath}': Cannot find field."),
                ));
                continue;
            }
            if b.contains_key("mimeType") && b.contains_key("mime_type") {
                parse_errors.push((
                    Some(format!("{bpath}.mime_type")),
                    format!("Invalid JSON payload received. Field 'mime_type' is set twice at '{bpath}'."),
                ));
                continue;
            }
            let mime = match field(blob, "mimeType", "mime_type") {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                other => {
                    parse_errors.push((
                        Some(format!("{bpath}.mime_type")),
                        format!("Invalid value at '{bpath}.mime_type' (TYPE_STRING), {other}"),
                    ));
                    continue;
                }
            };
            let bytes = match b.get("data") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::String(s)) => match decode_base64(s) {
                    Some(bytes) => bytes,
                    None => {
                        let field = format!("{bpath}.data");
                        let shown: String = s.chars().take(40).collect();
                        let more = if s.chars().count() > 40 { "..." } else { "" };
                        let msg = format!(
                            "Invalid value at '{field}' (TYPE_BYTES), Base64 decoding failed for \"{shown}{more}\""
                        );
                        parse_errors.push((Some(field), msg));
                        continue;
                    }
                },
                Some(other) => {
                    let field = format!("{bpath}.data");
                    parse_errors
                        .push((Some(field.clone()), format!("Invalid value at '{field}' (TYPE_BYTES), {other}")));
                    continue;
                }
            };
            blobs.push((bpath, mime, bytes));
        }
    }
    if !parse_errors.is_empty() {
        let message = parse_errors.iter().map(|(_, m)| m.as_str()).collect::<Vec<_>>().join("\n");
        let violations = parse_errors.into_iter().filter_map(|(f, m)| f.map(|f| (f, m))).collect();
        return Err(Invalid { message, violations });
    }
    if !roles_ok {
        return Err(Invalid::plain("Please use a valid role: user, model."));
    }
    for (bpath, mime, bytes) in blobs {
        let mime = mime.unwrap_or_default();
        if bytes.is_empty() {
            return Err(Invalid::plain(
                "Unable to submit request because it has an empty inlineData parameter. Add a value to the parameter and try again.",
            ));
        }
        if !SUPPORTED_IMAGE_TYPES.contains(&mime.as_str()) {
            return Err(Invalid {
                message: format!("Unsupported MIME type: {mime}"),
                violations: vec![(format!("{bpath}.mime_type"), format!("Unsupported MIME type: {mime}"))],
            });
        }
        // Stricter than Google from here on.
        let Some(actual) = sniff(&bytes) else {
            return Err(Invalid::plain("Provided image is not valid."));
        };
        if !same_type(&mime, actual) {
            let description =
                format!("mimeType is {mime} but the data is {actual} (fake-gemini checks this; Google may not)");
            return Err(Invalid {
                message: format!("Invalid value at '{bpath}.mime_type': {description}"),
                violations: vec![(format!("{bpath}.mime_type"), description)],
            });
        }
        let dimensions = dimensions(&bytes, actual);
        if dimensions.is_none() && actual != "image/heic" && actual != "image/heif" {
            return Err(Invalid::plain("Provided image is not valid."));
        }
        inputs.images.push(InputImage { mime_type: mime, dimensions, len: bytes.len() });
    }
    if inputs.images.len() > family.max_images() {
        return Err(Invalid::plain(format!(
            "Too many images in the request: {} (at most {} for {model}).",
            inputs.images.len(),
            family.max_images()
        )));
    }
    let config = field(field(body, "generationConfig", "generation_config"), "imageConfig", "image_config");
    match (family, field(config, "imageSize", "image_size")) {
        (_, Value::Null) => {}
        (Family::Flash25, v) => {
            return Err(Invalid {
                message: format!("imageSize is not supported by {model} (it makes 1K images only); got {v}."),
                violations: vec![(
                    "generation_config.image_config.image_size".into(),
                    "not supported by this model".into(),
                )],
            })
        }
        (Family::Pro3, Value::String(s)) if ["1K", "2K", "4K"].contains(&s.as_str()) => {}
        (Family::Pro3, v) => {
            return Err(Invalid {
                message: format!("Invalid imageSize {v}: use \"1K\", \"2K\" or \"4K\" (uppercase K)."),
                violations: vec![("generation_config.image_config.image_size".into(), format!("invalid value {v}"))],
            })
        }
    }
    inputs.text = texts.join("\n");
    Ok(inputs)
}

/// Decodes base64 as proto3's JSON mapping reads `bytes`: standard or URL-safe alphabet, with
/// or without padding. Nothing else (no whitespace, no mixed alphabets, no partial padding,
/// canonical last bits).
pub fn decode_base64(s: &str) -> Option<Vec<u8>> {
    if s.ends_with('=') && !s.len().is_multiple_of(4) {
        return None;
    }
    const CONFIG: GeneralPurposeConfig =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    const STANDARD: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, CONFIG);
    const URL_SAFE: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, CONFIG);
    STANDARD.decode(s).ok().or_else(|| URL_SAFE.decode(s).ok())
}

/// The image type of `b` from its first bytes: the five Google takes, and a few it does not
/// (so that a mismatch can say what the data is).
pub fn sniff(b: &[u8]) -> Option<&'static str> {
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Some("image/png");
    }
    if b.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Some("image/jpeg");
    }
    if b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        return Some("image/webp");
    }
    if b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a") {
        return Some("image/gif");
    }
    if b.len() >= 12 && &b[4..8] == b"ftyp" {
        return match &b[8..12] {
            b"heic" | b"heix" | b"hevc" | b"hevx" | b"heim" | b"heis" | b"hevm" | b"hevs" => Some("image/heic"),
            b"mif1" | b"msf1" => Some("image/heif"),
            b"avif" | b"avis" => Some("image/avif"),
            _ => None,
        };
    }
    if b.starts_with(b"BM") && b.len() >= 26 {
        return Some("image/bmp");
    }
    None
}

fn same_type(declared: &str, actual: &str) -> bool {
    let heif = |t: &str| t == "image/heic" || t == "image/heif";
    declared == actual || (heif(declared) && heif(actual))
}

fn be16(b: &[u8], i: usize) -> Option<u32> {
    Some(u16::from_be_bytes(b.get(i..i + 2)?.try_into().ok()?) as u32)
}

fn be32(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(i..i + 4)?.try_into().ok()?))
}

fn le16(b: &[u8], i: usize) -> Option<u32> {
    Some(u16::from_le_bytes(b.get(i..i + 2)?.try_into().ok()?) as u32)
}

fn le24(b: &[u8], i: usize) -> Option<u32> {
    let s = b.get(i..i + 3)?;
    Some(s[0] as u32 | (s[1] as u32) << 8 | (s[2] as u32) << 16)
}

/// Width and height from an image's header (`kind` from [`sniff`]); `None` when the header is
/// cut short or says zero. EXIF orientation is not applied.
pub fn dimensions(b: &[u8], kind: &str) -> Option<(u32, u32)> {
    let (w, h) = match kind {
        "image/png" => {
            if b.get(12..16)? != b"IHDR" {
                return None;
            }
            (be32(b, 16)?, be32(b, 20)?)
        }
        "image/jpeg" => jpeg_dimensions(b)?,
        "image/webp" => match b.get(12..16)? {
            b"VP8 " => {
                if b.get(23..26)? != [0x9D, 0x01, 0x2A] {
                    return None;
                }
                (le16(b, 26)? & 0x3FFF, le16(b, 28)? & 0x3FFF)
            }
            b"VP8L" => {
                if *b.get(20)? != 0x2F {
                    return None;
                }
                let bits = u32::from_le_bytes(b.get(21..25)?.try_into().ok()?);
                ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
            }
            b"VP8X" => (le24(b, 24)? + 1, le24(b, 27)? + 1),
            _ => return None,
        },
        "image/heic" | "image/heif" => {
            // The `ispe` property: size, "ispe", version and flags, width, height.
            let window = &b[..b.len().min(256 * 1024)];
            let at = window.windows(4).position(|w| w == b"ispe")?;
            (be32(b, at + 8)?, be32(b, at + 12)?)
        }
        _ => return None,
    };
    (w > 0 && h > 0).then_some((w, h))
}

fn jpeg_dimensions(b: &[u8]) -> Option<(u32, u32)> {
    let mut i = 2; // after SOI
    loop {
        if *b.get(i)? != 0xFF {
            return None;
        }
        while *b.get(i)? == 0xFF {
            i += 1;
        }
        let marker = *b.get(i)?;
        i += 1;
        match marker {
            0x01 | 0xD0..=0xD8 => continue, // no length
            0xD9 | 0xDA => return None,     // end of image or scan data before any frame header
            _ => {}
        }
        let len = be16(b, i)? as usize;
        if len < 2 {
            return None;
        }
        let is_frame = matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if is_frame {
            // length, precision, height, width
            return Some((be16(b, i + 5)?, be16(b, i + 3)?));
        }
        i += len;
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::png;

    /// A JPEG's header: SOI, a JFIF APP0, a baseline frame header and EOI (not decodable, but
    /// every reader of dimensions takes it).
    pub fn jpeg(width: u16, height: u16) -> Vec<u8> {
        let mut j = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10];
        j.extend_from_slice(b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0");
        j.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x11, 0x08]);
        j.extend_from_slice(&height.to_be_bytes());
        j.extend_from_slice(&width.to_be_bytes());
        j.extend_from_slice(&[0x03, 0x01, 0x22, 0x00, 0x02, 0x11, 0x01, 0x03, 0x11, 0x01]);
        j.extend_from_slice(&[0xFF, 0xD9]);
        j
    }

    /// A lossless WebP's header (`VP8L`), padded.
    pub fn webp(width: u32, height: u32) -> Vec<u8> {
        let mut w = b"RIFF\0\0\0\0WEBPVP8L\x10\0\0\0\x2f".to_vec();
        let bits = (width - 1) | (height - 1) << 14;
        w.extend_from_slice(&bits.to_le_bytes());
        w.resize(40, 0);
        w
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn request(parts: Value) -> Value {
        json!({"contents": [{"role": "user", "parts": parts}], "generationConfig": {"imageConfig": {"aspectRatio": "1:1"}}})
    }

    const PRO: &str = "gemini-3-pro-image-preview";
    const FLASH: &str = "gemini-2.5-flash-image";

    #[test]
    fn text_and_images_in_any_order_both_spellings() {
        let png = png::solid(300, 200, [1, 2, 3]);
        let body = request(json!([
            {"inlineData": {"mimeType": "image/png", "data": b64(&png)}},
            {"text": "edit this"},
            {"inline_data": {"mime_type": "image/jpeg", "data": b64(&jpeg(640, 480))}},
            {"inlineData": {"mimeType": "image/webp", "data": b64(&webp(50, 100))}},
            {"text": "and keep the rest"},
        ]));
        let inputs = check(&body, PRO).expect("valid");
        assert_eq!(inputs.text, "edit this\nand keep the rest");
        let got: Vec<_> = inputs.images.iter().map(|i| (i.mime_type.as_str(), i.dimensions)).collect();
        assert_eq!(
            got,
            [("image/png", Some((300, 200))), ("image/jpeg", Some((640, 480))), ("image/webp", Some((50, 100)))]
        );
        assert_eq!(inputs.images[0].len, png.len());
    }

    #[test]
    fn base64_as_proto3_json_reads_bytes() {
        let bytes: Vec<u8> = (0..=255u8).collect();
        let std = b64(&bytes);
        assert_eq!(decode_base64(&std).as_deref(), Some(&bytes[..]));
        assert_eq!(decode_base64(std.trim_end_matches('=')).as_deref(), Some(&bytes[..]), "padding is optional");
        let url = std.replace('+', "-").replace('/', "_");
        assert_eq!(decode_base64(&url).as_deref(), Some(&bytes[..]), "URL-safe alphabet");
        assert_eq!(decode_base64(""), Some(vec![]));
        for bad in ["not base64!", "QUJD RA==", "QUJD\nRA==", "QUJDRA=", "Q", "-+//", "QUJDRB==", "QUJD=RA="] {
            assert_eq!(decode_base64(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn invalid_base64_is_googles_type_bytes_error() {
        let body =
            request(json!([{"text": "x"}, {"inlineData": {"mimeType": "image/png", "data": "this is *not* base64!"}}]));
        let e = check(&body, PRO).unwrap_err();
        assert_eq!(
            e.message,
            "Invalid value at 'contents[0].parts[1].inline_data.data' (TYPE_BYTES), Base64 decoding failed for \"this is *not* base64!\""
        );
        assert_eq!(e.violations[0].0, "contents[0].parts[1].inline_data.data");
        assert_eq!(e.details()[0]["@type"], "type.googleapis.com/google.rpc.BadRequest");
        // Every parse error is reported, a long value cut short.
        let long = format!("{}!", "A".repeat(100));
        let body = request(json!([{"text": "x"}, {"inlineData": {"mimeType": "image/png", "data": "a b"}},
                                  {"inlineData": {"mimeType": "image/png", "data": long}}]));
        let e = check(&body, PRO).unwrap_err();
        assert_eq!(e.violations.len(), 2);
        assert!(e.message.contains("parts[2].inline_data.data") && e.message.ends_with("...\""), "{}", e.message);
    }

    #[test]
    fn mime_types_are_googles_five_and_must_match_the_bytes() {
        let png = b64(&png::solid(8, 8, [0, 0, 0]));
        let msg = |mime: &str, data: &str| {
            check(&request(json!([{"text": "x"}, {"inlineData": {"mimeType": mime, "data": data}}])), PRO)
                .map(|_| ())
                .map_err(|e| e.message)
        };
        assert_eq!(msg("image/gif", &png), Err("Unsupported MIME type: image/gif".into()));
        assert_eq!(msg("image/jpg", &png), Err("Unsupported MIME type: image/jpg".into()));
        assert_eq!(msg("IMAGE/PNG", &png), Err("Unsupported MIME type: IMAGE/PNG".into()));
        let e = msg("image/jpeg", &png).unwrap_err();
        assert!(e.contains("mimeType is image/jpeg but the data is image/png"), "{e}");
        let gif = b64(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;");
        assert!(msg("image/png", &gif).unwrap_err().contains("the data is image/gif"));
        assert_eq!(msg("image/png", &b64(b"just some bytes")), Err("Provided image is not valid.".into()));
        // A PNG signature without a readable header.
        assert_eq!(msg("image/png", &b64(b"\x89PNG\r\n\x1a\n\0\0")), Err("Provided image is not valid.".into()));
        assert!(msg("image/png", "").unwrap_err().contains("empty inlineData"));
        // HEIC and HEIF are one family; dimensions from `ispe` when present.
        let mut heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic".to_vec();
        heic.extend_from_slice(b"\0\0\0\x14ispe\0\0\0\0\0\0\x01\x00\0\0\0\x80");
        assert_eq!(msg("image/heif", &b64(&heic)), Ok(()));
        assert_eq!(dimensions(&heic, "image/heic"), Some((256, 128)));
        let avif = b64(b"\0\0\0\x18ftypavif\0\0\0\0mif1avif");
        assert!(msg("image/heic", &avif).unwrap_err().contains("the data is image/avif"));
    }

    #[test]
    fn malformed_parts_and_blobs_are_refused() {
        let png = b64(&png::solid(8, 8, [0, 0, 0]));
        let bad = |parts: Value| check(&request(parts), PRO).unwrap_err().message;
        assert!(bad(json!([{"text": "x", "inlineData": {"mimeType": "image/png", "data": png}}])).contains("Oneof"));
        assert!(bad(json!([{"inlineData": {"mimeType": "image/png", "data": png},
                             "inline_data": {"mime_type": "image/png", "data": png}}]))
        .contains("Oneof"));
        assert_eq!(
            bad(json!([{"text": "x"}, {"inlineData": {"mimeType": "image/png", "data": png, "size": 3}}])),
            "Invalid JSON payload received. Unknown name \"size\" at 'contents[0].parts[1].inline_data': Cannot find field."
        );
        assert!(bad(json!([{"inlineData": {"mimeType": "image/png", "mime_type": "image/png", "data": png}}]))
            .contains("set twice"));
        assert!(bad(json!([{"text": 7}])).contains("TYPE_STRING"));
        assert!(bad(json!([{"inlineData": {"mimeType": "image/png", "data": 7}}])).contains("TYPE_BYTES"));
        assert!(bad(json!([{"inlineData": {"data": png}}])).contains("Unsupported MIME type: "));
        let body = json!({"contents": [{"role": "system", "parts": [{"text": "x"}]}]});
        assert_eq!(check(&body, PRO).unwrap_err().message, "Please use a valid role: user, model.");
    }

    #[test]
    fn image_count_per_model() {
        let img = json!({"inlineData": {"mimeType": "image/png", "data": b64(&png::solid(4, 4, [9, 9, 9]))}});
        let with = |k: usize| {
            let mut parts = vec![json!({"text": "combine"})];
            parts.extend(std::iter::repeat_n(img.clone(), k));
            request(Value::Array(parts))
        };
        assert_eq!(check(&with(14), PRO).map(|i| i.images.len()), Ok(14));
        let e = check(&with(15), PRO).unwrap_err();
        assert_eq!(e.message, "Too many images in the request: 15 (at most 14 for gemini-3-pro-image-preview).");
        assert_eq!(check(&with(3), FLASH).map(|i| i.images.len()), Ok(3));
        assert!(check(&with(4), FLASH).unwrap_err().message.contains("at most 3 for gemini-2.5-flash-image"));
        // Across contents too.
        let two = json!({"contents": [{"role": "user", "parts": [img.clone(), img.clone()]},
                                      {"role": "model", "parts": [img.clone(), img.clone()]}]});
        assert!(check(&two, FLASH).is_err());
    }

    #[test]
    fn image_size_per_model() {
        let with = |size: Value| {
            json!({"contents": [{"parts": [{"text": "x"}]}],
                                        "generationConfig": {"imageConfig": {"aspectRatio": "1:1", "imageSize": size}}})
        };
        for ok in ["1K", "2K", "4K"] {
            assert!(check(&with(json!(ok)), PRO).is_ok(), "{ok}");
            assert!(check(&with(json!(ok)), FLASH)
                .unwrap_err()
                .message
                .contains("not supported by gemini-2.5-flash-image"));
        }
        for bad in [json!("2k"), json!("8K"), json!(2)] {
            assert!(check(&with(bad.clone()), PRO).unwrap_err().message.starts_with("Invalid imageSize"), "{bad}");
        }
        let snake = json!({"contents": [{"parts": [{"text": "x"}]}], "generation_config": {"image_config": {"image_size": "1K"}}});
        assert!(check(&snake, FLASH).is_err());
        assert!(check(&json!({"contents": [{"parts": [{"text": "x"}]}]}), FLASH).is_ok());
    }

    #[test]
    fn dimensions_from_headers() {
        assert_eq!(dimensions(&png::solid(1376, 768, [0, 0, 0]), "image/png"), Some((1376, 768)));
        assert_eq!(dimensions(&jpeg(4032, 3024), "image/jpeg"), Some((4032, 3024)));
        assert_eq!(dimensions(&jpeg(0, 3024), "image/jpeg"), None);
        assert_eq!(dimensions(&jpeg(10, 10)[..12], "image/jpeg"), None);
        assert_eq!(dimensions(&webp(16383, 1), "image/webp"), Some((16383, 1)));
        let mut vp8 = b"RIFF\0\0\0\0WEBPVP8 \0\0\0\0\0\0\0\x9d\x01\x2a".to_vec();
        vp8.extend_from_slice(&[0x80, 0x02, 0xe0, 0x01]); // 640 x 480
        vp8.resize(40, 0);
        assert_eq!(dimensions(&vp8, "image/webp"), Some((640, 480)));
        let mut vp8x = b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\x10\0\0\0".to_vec();
        vp8x.extend_from_slice(&[0xff, 0x0f, 0x00, 0x37, 0x04, 0x00]); // 4096 x 1080
        vp8x.resize(40, 0);
        assert_eq!(dimensions(&vp8x, "image/webp"), Some((4096, 1080)));
        assert_eq!(sniff(&webp(1, 1)), Some("image/webp"));
        assert_eq!(sniff(&jpeg(1, 1)), Some("image/jpeg"));
    }
}
