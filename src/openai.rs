//! OpenAI's response shapes: the images answer and the error answer.

use serde_json::json;

use crate::error::ApiError;
use crate::gemini::Usage;
use crate::image_type::{dimensions_base64, ImageType};
use crate::named::Named;
use crate::request::ResponseFormat;

/// One image as the answer needs it, wherever it came from (Gemini or the cache).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageView<'a> {
    pub mime_type: &'a str,
    /// The model's text, OpenAI's `revised_prompt`.
    pub text: Option<&'a str>,
    pub base64: &'a [u8],
}

/// How the images of an answer are given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rendering<'a> {
    B64Json,
    /// `url` when the gateway serves no image URLs: a `data:` URI.
    DataUri,
    /// `url` as an image URL: this prefix, then `-{index}`.
    Files(&'a str),
}

impl Rendering<'_> {
    /// The rendering of a response format without image URLs.
    pub fn inline(format: ResponseFormat) -> Rendering<'static> {
        match format {
            ResponseFormat::B64Json => Rendering::B64Json,
            ResponseFormat::Url => Rendering::DataUri,
        }
    }
}

/// The success body, written straight into one buffer so the base64 is copied once.
pub fn images_body(created: u64, images: &[ImageView], format: Rendering, usage: Option<Usage>) -> Vec<u8> {
    let payload: usize = match format {
        Rendering::Files(prefix) => images.len() * (prefix.len() + 32),
        _ => images.iter().map(|i| i.base64.len() + 64).sum(),
    };
    let mut out = Vec::with_capacity(payload + 256);
    out.extend_from_slice(b"{\"created\":");
    out.extend_from_slice(created.to_string().as_bytes());
    out.extend_from_slice(b",\"data\":[");
    for (i, image) in images.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match format {
            Rendering::B64Json => {
                out.extend_from_slice(b"{\"b64_json\":\"");
                out.extend_from_slice(image.base64);
            }
            Rendering::DataUri => {
                out.extend_from_slice(b"{\"url\":\"data:");
                push_json_inner(&mut out, image.mime_type);
                out.extend_from_slice(b";base64,");
                out.extend_from_slice(image.base64);
            }
            Rendering::Files(prefix) => {
                out.extend_from_slice(b"{\"url\":\"");
                push_json_inner(&mut out, prefix);
                out.extend_from_slice(format!("-{i}").as_bytes());
            }
        }
        out.push(b'"');
        if let Some(text) = image.text {
            out.extend_from_slice(b",\"revised_prompt\":");
            out.extend_from_slice(json!(text).to_string().as_bytes());
        }
        out.push(b'}');
    }
    out.push(b']');
    // As gpt-image-1 answers: the format Gemini returned and the first image's own size.
    if let Some(first) = images.first() {
        if let Some(format) = output_format(first.mime_type) {
            out.extend_from_slice(b",\"output_format\":\"");
            out.extend_from_slice(format.as_bytes());
            out.push(b'"');
        }
        if let Some((w, h)) = dimensions_base64(first.base64) {
            out.extend_from_slice(format!(",\"size\":\"{w}x{h}\"").as_bytes());
        }
    }
    if let Some(u) = usage {
        out.extend_from_slice(
            format!(
                ",\"usage\":{{\"input_tokens\":{},\"output_tokens\":{},\"total_tokens\":{},\"input_tokens_details\":{{\"text_tokens\":{},\"image_tokens\":{}}}}}",
                u.input_tokens, u.output_tokens, u.total_tokens, u.text_tokens, u.image_tokens
            )
            .as_bytes(),
        );
    }
    out.push(b'}');
    out
}

/// OpenAI's `output_format` for an image's MIME type.
pub fn output_format(mime_type: &str) -> Option<&'static str> {
    match ImageType::parse(mime_type)? {
        ImageType::Png => Some("png"),
        ImageType::Jpeg => Some("jpeg"),
        ImageType::Webp => Some("webp"),
    }
}

/// A JSON string's inner text (escaped, without quotes).
fn push_json_inner(out: &mut Vec<u8>, s: &str) {
    let quoted = json!(s).to_string();
    out.extend_from_slice(quoted.trim_matches('"').as_bytes());
}

/// The error body: OpenAI's four keys plus `category` and `resolution`.
pub fn error_body(e: &ApiError) -> Vec<u8> {
    json!({
        "error": {
            "message": e.message,
            "type": e.code.error_type(),
            "param": e.param,
            "code": e.code.as_str(),
            "category": e.code.category().as_str(),
            "resolution": e.code.resolution(),
        }
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use crate::gemini::{read_call, CallResponse};
    use serde_json::Value;

    use crate::gemini::GeminiImage;

    fn image(text: Option<&str>) -> GeminiImage {
        let t = text.map(|t| format!(r#"{{"text":{}}},"#, json!(t))).unwrap_or_default();
        let body = format!(
            r#"{{"candidates":[{{"content":{{"parts":[{t}{{"inlineData":{{"mimeType":"image/png","data":"QUJD"}}}}]}}}}]}}"#
        );
        read_call(CallResponse { status: Some(200), body: body.into_bytes(), ..Default::default() }).result.unwrap()
    }

    #[test]
    fn images_answer_is_openai_json() {
        let a = image(Some("a \"quoted\" cat"));
        let b = image(None);
        let usage = Usage { input_tokens: 3, output_tokens: 5, total_tokens: 8, text_tokens: 2, image_tokens: 1 };
        let body = images_body(1700000000, &[a.view(), b.view()], Rendering::B64Json, Some(usage));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["created"], 1700000000);
        assert_eq!(v["data"][0]["b64_json"], "QUJD");
        assert_eq!(v["data"][0]["revised_prompt"], "a \"quoted\" cat");
        assert!(v["data"][1].get("revised_prompt").is_none());
        assert_eq!(v["usage"]["input_tokens"], 3);
        assert_eq!(v["usage"]["output_tokens"], 5);
        assert_eq!(v["usage"]["total_tokens"], 8);
        assert_eq!(v["usage"]["input_tokens_details"], json!({"text_tokens": 2, "image_tokens": 1}));
        assert_eq!(v["output_format"], "png");
        assert!(v.get("size").is_none(), "QUJD is no image header: no size rather than a wrong one");
        let body = images_body(1, &[b.view()], Rendering::DataUri, None);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["data"][0]["url"], "data:image/png;base64,QUJD");
        assert!(v.get("usage").is_none());
        let body =
            images_body(1, &[b.view(), b.view()], Rendering::Files("https://gw.example/v1/images/files/ab"), None);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["data"][1]["url"], "https://gw.example/v1/images/files/ab-1");
        assert_eq!(v["output_format"], "png", "the fields stay");
    }

    #[test]
    fn the_size_is_read_from_the_first_image_and_the_format_from_its_type() {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        png.extend(1344u32.to_be_bytes());
        png.extend(768u32.to_be_bytes());
        png.extend([8, 2, 0, 0, 0, 0, 0, 0, 0]);
        let mut b64 = Vec::new();
        crate::base64::encode_into(&mut b64, &png);
        let first = ImageView { mime_type: "image/png", text: None, base64: &b64 };
        let other = ImageView { mime_type: "image/jpeg", text: None, base64: b"QUJD" };
        let v: Value = serde_json::from_slice(&images_body(1, &[first, other], Rendering::B64Json, None)).unwrap();
        assert_eq!((v["size"].as_str(), v["output_format"].as_str()), (Some("1344x768"), Some("png")));
        let v: Value = serde_json::from_slice(&images_body(1, &[other], Rendering::B64Json, None)).unwrap();
        assert_eq!(v["output_format"], "jpeg");
        assert_eq!(output_format("image/gif"), None);
    }

    #[test]
    fn error_answer_has_all_six_keys() {
        let v: Value =
            serde_json::from_slice(&error_body(&ApiError::param(ErrorCode::InvalidRequest, "n", "bad n"))).unwrap();
        let e = &v["error"];
        assert_eq!(e["message"], "bad n");
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(e["param"], "n");
        assert_eq!(e["code"], "IMG_INVALID_REQUEST");
        assert_eq!(e["category"], "USER_ERROR");
        assert!(e["resolution"].as_str().unwrap().len() > 10);
        let v: Value = serde_json::from_slice(&error_body(&ApiError::new(ErrorCode::NoImage, "x"))).unwrap();
        assert!(v["error"]["param"].is_null());
    }
}
