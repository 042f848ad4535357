//! Gemini answers the unit tests of the exchange and the driver share.

use crate::gemini::CallResponse;

/// A Gemini answer holding one image whose base64 is `data`.
pub fn image_body(data: &str) -> Vec<u8> {
    format!(
        r#"{{"candidates":[{{"content":{{"parts":[{{"inlineData":{{"mimeType":"image/png","data":"{data}"}}}}]}},"finishReason":"STOP"}}],
        "usageMetadata":{{"promptTokenCount":4,"candidatesTokenCount":10,"totalTokenCount":14}}}}"#
    )
    .into_bytes()
}

pub fn ok_response(data: &str) -> CallResponse {
    CallResponse {
        status: Some(200),
        content_type: Some("application/json".into()),
        body: image_body(data),
        elapsed_ms: 5,
        timeout_ms: 1000,
        ..Default::default()
    }
}

/// Gemini's error JSON with this HTTP status and canonical status name.
pub fn error_response(status: u32, gstatus: &str) -> CallResponse {
    CallResponse {
        status: Some(status),
        content_type: Some("application/json".into()),
        body: format!(r#"{{"error":{{"code":{status},"message":"m","status":"{gstatus}"}}}}"#).into_bytes(),
        elapsed_ms: 5,
        timeout_ms: 1000,
        ..Default::default()
    }
}
