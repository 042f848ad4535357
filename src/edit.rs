//! `POST /v1/images/edits` and `/v1/images/variations` (docs/edits.md): a multipart body as
//! the OpenAI SDKs send it, read into the same request as a generation plus input images, and
//! the body of the Gemini calls with those images in it.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::config::{MaskMode, Settings};
use crate::endpoint::Endpoint;
use crate::error::{ApiError, ErrorCode};
use crate::gemini::{self, CallSpec, InlineImage};
use crate::hash::prompt_hash;
use crate::image_type::{self, ImageType};
use crate::multipart::{self, Part};
use crate::request::{self, ImageRequest, Rejection};

/// More parts than this is not a client of ours: 64 images, a mask and the text fields.
const MAX_PARTS: usize = 96;
/// The headers of one part (its name, file name and type) fit in this.
const MAX_PART_HEADER_BYTES: usize = 8 * 1024;

/// The file fields; every other part is a text field.
const IMAGE_FIELDS: [&str; 2] = ["image", "image[]"];
const MASK_FIELD: &str = "mask";

/// The text fields whose values are numbers or booleans in the JSON form of the request.
const NUMBER_FIELDS: [&str; 2] = ["n", "partial_images"];
const BOOLEAN_FIELDS: [&str; 1] = ["stream"];

/// An input image, checked, with its type told from its bytes.
struct Input<'a> {
    kind: ImageType,
    bytes: &'a [u8],
}

/// Reads an edit or variation: the request, and where its images lie in `body`.
pub fn read_edit(
    body: &[u8],
    content_type: Option<&str>,
    settings: &Settings,
    endpoint: Endpoint,
) -> Result<(ImageRequest, Inputs), Rejection> {
    let mut known = Rejection::new();
    match read(body, content_type, settings, endpoint, &mut known) {
        Ok(r) => Ok(r),
        Err(error) => Err(Rejection { error, ..known }),
    }
}

fn bad(param: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::param(ErrorCode::InvalidRequest, param, message)
}

fn read(
    body: &[u8],
    content_type: Option<&str>,
    settings: &Settings,
    endpoint: Endpoint,
    known: &mut Rejection,
) -> Result<(ImageRequest, Inputs), ApiError> {
    let boundary = multipart::boundary(content_type.unwrap_or("")).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("content-type must be multipart/form-data with a boundary ({e}), as the OpenAI SDKs send edits"),
        )
    })?;
    let limits = multipart::Limits { max_parts: MAX_PARTS, max_header_bytes: MAX_PART_HEADER_BYTES };
    let parts = multipart::parse(body, &boundary, &limits).map_err(|e| {
        ApiError::new(ErrorCode::InvalidRequest, format!("the body is not well-formed multipart/form-data: {e}"))
    })?;

    let (fields, images, mask) = split(&parts)?;
    let mut req = request::parse_fields(&fields, settings, endpoint, known)?;
    let family = settings.families.get(req.variant).map_or(1, |f| f.max_input_images);

    // The images: 1..max_input_images of them (a variation takes exactly one), each a PNG,
    // JPEG or WebP by its bytes, none empty or over the limit.
    // Gemini counts a mask as one more image.
    let most = if endpoint == Endpoint::Variations { 1 } else { family.saturating_sub(u32::from(mask.is_some())) };
    if images.is_empty() {
        return Err(bad("image", "image is required: send one or more image files"));
    }
    if images.len() > most as usize {
        let with_mask = if mask.is_some() { " with a mask (which counts as one more image)" } else { "" };
        return Err(bad(
            "image",
            format!("{} images sent; {} takes at most {most}{with_mask}", images.len(), req.variant_name),
        ));
    }
    let max_bytes = settings.limits.max_input_image_bytes;
    let inputs: Vec<Input> =
        images.iter().enumerate().map(|(i, p)| input(p.data, "image", i, max_bytes)).collect::<Result<_, _>>()?;

    // The mask: refused, or checked and sent after the images with the instruction.
    let mask = match mask {
        None => None,
        Some(_) if settings.edits.mask == MaskMode::Refuse => {
            return Err(bad("mask", "this gateway does not take masks; describe the change in the prompt"))
        }
        Some(part) => {
            let m = input(part.data, "mask", 0, max_bytes)?;
            check_mask(&m, &inputs[0])?;
            Some(m)
        }
    };

    req.inputs.images = inputs.iter().map(|i| sha256(i.bytes)).collect();
    req.inputs.mask = mask.as_ref().map(|m| sha256(m.bytes));
    if mask.is_some() {
        req.closing_text = Some(settings.edits.mask_instruction.clone());
    }
    if endpoint == Endpoint::Variations {
        // The log's hash is of the prompt Gemini gets.
        req.prompt_hash = prompt_hash(&req.final_prompt);
        known.prompt_hash = Some(req.prompt_hash.clone());
    }

    // Where the images lie in the body, so that the Gemini call can be built later from the
    // same bytes, and only if the cache does not answer first.
    let at = |i: &Input| {
        let start = (i.bytes.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
        Some(Placed { kind: i.kind, start, end: start.checked_add(i.bytes.len())? })
    };
    let images = inputs
        .iter()
        .chain(mask.iter())
        .map(at)
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| ApiError::new(ErrorCode::InternalError, "an input image was not inside the request body"))?;
    Ok((req, Inputs { images }))
}

/// An input image (or the mask) as a range of the request body, with its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Placed {
    kind: ImageType,
    start: usize,
    end: usize,
}

/// An edit's images (the mask last, when there is one), as ranges of its request body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inputs {
    images: Vec<Placed>,
}

impl Inputs {
    /// How large the Gemini call's body will be, about: the images in base64.
    pub fn encoded_len(&self) -> u64 {
        self.images.iter().map(|i| crate::base64::encoded_len(i.end.saturating_sub(i.start)) as u64 + 64).sum()
    }

    /// The body of each Gemini call: the prompt, every image in order, then the mask and its
    /// instruction. `body` is the request body the ranges point into.
    pub fn gemini_body(&self, req: &ImageRequest, body: &[u8]) -> Vec<u8> {
        let inline: Vec<InlineImage> = self
            .images
            .iter()
            .map(|i| InlineImage { mime_type: i.kind.as_str(), bytes: body.get(i.start..i.end).unwrap_or_default() })
            .collect();
        let spec = CallSpec {
            prompt: &req.final_prompt,
            ratio: req.ratio,
            image_size: req.image_size,
            safety: req.safety,
            images: &inline,
            closing_text: req.closing_text.as_deref(),
            include_thoughts: req.wants_thoughts(),
        };
        gemini::request_body(&spec)
    }
}

type Split<'p, 'a> = (Map<String, Value>, Vec<&'p Part<'a>>, Option<&'p Part<'a>>);

/// The text fields as the JSON form of the request would have them, the images in order, and
/// the mask. A text field sent twice, a second mask, or text that is not UTF-8 is a 400.
fn split<'p, 'a>(parts: &'p [Part<'a>]) -> Result<Split<'p, 'a>, ApiError> {
    let mut fields = Map::new();
    let mut images = Vec::new();
    let mut mask = None;
    for part in parts {
        let name = part.name.as_ref();
        if IMAGE_FIELDS.contains(&name) {
            images.push(part);
            continue;
        }
        if name == MASK_FIELD {
            if mask.replace(part).is_some() {
                return Err(bad("mask", "mask was sent twice; send one mask"));
            }
            continue;
        }
        let Some(param) = request::field_name(name) else { continue }; // not a field we read
        if part.filename.is_some() {
            return Err(bad(param, format!("{param} must be a text field, not a file")));
        }
        let text = std::str::from_utf8(part.data).map_err(|_| bad(param, format!("{param} is not UTF-8 text")))?;
        let value = if NUMBER_FIELDS.contains(&param) {
            // A number when it reads as one; else the text, which the field check refuses
            // with the value quoted.
            text.trim().parse::<i64>().map_or_else(|_| Value::String(text.to_string()), Value::from)
        } else if BOOLEAN_FIELDS.contains(&param) {
            match text.trim() {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                _ => Value::String(text.to_string()),
            }
        } else {
            Value::String(text.to_string())
        };
        if fields.insert(param.to_string(), value).is_some() {
            return Err(bad(param, format!("{param} was sent twice; send each field once")));
        }
    }
    Ok((fields, images, mask))
}

/// Checks one input image (or the mask): not empty, within the limit, of a type Gemini takes.
fn input<'a>(bytes: &'a [u8], param: &'static str, index: usize, max_bytes: usize) -> Result<Input<'a>, ApiError> {
    let which = if param == "image" { format!("image {}", index + 1) } else { "mask".to_string() };
    if bytes.is_empty() {
        return Err(bad(param, format!("{which} is empty")));
    }
    if bytes.len() > max_bytes {
        return Err(bad(
            param,
            format!("{which} is {} bytes; this gateway takes at most {max_bytes} bytes per image", bytes.len()),
        ));
    }
    let kind = ImageType::sniff(bytes)
        .ok_or_else(|| bad(param, format!("{which} is not a PNG, JPEG or WebP image (told by its bytes)")))?;
    Ok(Input { kind, bytes })
}

/// A mask is a PNG with an alpha channel, as wide and high as the first image.
fn check_mask(mask: &Input, first: &Input) -> Result<(), ApiError> {
    let info = image_type::png_info(mask.bytes)
        .filter(|_| mask.kind == ImageType::Png)
        .ok_or_else(|| bad("mask", "mask must be a PNG image"))?;
    if !info.has_alpha {
        return Err(bad("mask", "mask must have an alpha channel: its transparent areas say what to change"));
    }
    if let Some((w, h)) = image_type::dimensions(first.bytes) {
        if (info.width, info.height) != (w, h) {
            return Err(bad(
                "mask",
                format!("mask is {}x{} but the first image is {w}x{h}; they must match", info.width, info.height),
            ));
        }
    }
    Ok(())
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
#[path = "edit_tests.rs"]
mod tests;
