//! What fake-gemini does with a request: steered by markers in the prompt text, so that a
//! client of the filter (which forwards only the prompt) can ask for each failure.
//!
//! | marker | effect |
//! |---|---|
//! | `[fake:delay=MS]` | wait MS milliseconds before answering |
//! | `[fake:status=CODE]` | a Google error JSON with that status (429, 500, 503, 401, 403, 400, 404) |
//! | `[fake:retry=SECS]` | with 429: a `google.rpc.RetryInfo` of SECS seconds |
//! | `[fake:keyinvalid]` | 400 INVALID_ARGUMENT with ErrorInfo reason API_KEY_INVALID |
//! | `[fake:block=REASON]` | `promptFeedback.blockReason` REASON, no candidate |
//! | `[fake:finish=REASON]` | a candidate with text only and `finishReason` REASON |
//! | `[fake:noimage]` | a text-only answer, `finishReason` STOP |
//! | `[fake:withtext]` | a text part next to the image (becomes `revised_prompt`) |
//! | `[fake:garbage]` / `[fake:truncated]` / `[fake:empty]` | a 200 whose body is not JSON / cut in half / empty |
//! | `[fake:ctype=TYPE]` | the answer's content-type |
//! | `[fake:badb64]` | an image part whose data is not base64 |
//! | `[fake:bytes=N]` | the PNG padded to N bytes |
//! | `[fake:huge]` | a 200 of about 35 MiB (over the 32 MiB Envoy lets a call-out answer hold) |
//! | `[fake:reset]` | close the connection without answering |
//! | `[fake:slowbody=MS]` | send the headers, then the body MS milliseconds later |
//! | `[fake:fail-first=K]` | the first K calls with this exact prompt answer 500 INTERNAL |
//!
//! Only `streamGenerateContent` reads these (see `stream.rs`):
//!
//! | marker | effect |
//! |---|---|
//! | `[fake:interim=K]` | K interim thought images (0 to 2; default 2) when thoughts are included |
//! | `[fake:chunkdelay=MS]` | wait MS milliseconds before each event after the first |
//! | `[fake:breakafter=K]` | send K events, then close the connection without the terminating chunk |
//! | `[fake:errorafter=K]` | after K events, an event with a Google error object, then end the stream |

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Markers {
    pub delay_ms: u64,
    pub status: Option<u16>,
    pub retry_secs: Option<String>,
    pub key_invalid: bool,
    pub block: Option<String>,
    pub finish: Option<String>,
    pub no_image: bool,
    pub with_text: bool,
    pub garbage: bool,
    pub truncated: bool,
    pub empty: bool,
    pub content_type: Option<String>,
    pub bad_base64: bool,
    pub bytes: Option<usize>,
    pub huge: bool,
    pub reset: bool,
    pub slow_body_ms: u64,
    pub fail_first: u64,
    /// Interim thought images in a stream (`None`: the default, 2).
    pub interim: Option<usize>,
    pub chunk_delay_ms: u64,
    pub break_after: Option<usize>,
    pub error_after: Option<usize>,
}

pub fn parse_markers(prompt: &str) -> Markers {
    let mut m = Markers::default();
    let mut rest = prompt;
    while let Some(start) = rest.find("[fake:") {
        let after = &rest[start + 6..];
        let Some(end) = after.find(']') else { break };
        let body = &after[..end];
        rest = &after[end + 1..];
        let (name, value) = body.split_once('=').unwrap_or((body, ""));
        match name {
            "delay" => m.delay_ms = value.parse().unwrap_or(0),
            "status" => m.status = value.parse().ok(),
            "retry" => m.retry_secs = Some(value.to_string()),
            "keyinvalid" => m.key_invalid = true,
            "block" => m.block = Some(value.to_string()),
            "finish" => m.finish = Some(value.to_string()),
            "noimage" => m.no_image = true,
            "withtext" => m.with_text = true,
            "garbage" => m.garbage = true,
            "truncated" => m.truncated = true,
            "empty" => m.empty = true,
            "ctype" => m.content_type = Some(value.to_string()),
            "badb64" => m.bad_base64 = true,
            "bytes" => m.bytes = value.parse().ok(),
            "huge" => m.huge = true,
            "reset" => m.reset = true,
            "slowbody" => m.slow_body_ms = value.parse().unwrap_or(0),
            "fail-first" => m.fail_first = value.parse().unwrap_or(0),
            "interim" => m.interim = value.parse().ok(),
            "chunkdelay" => m.chunk_delay_ms = value.parse().unwrap_or(0),
            "breakafter" => m.break_after = value.parse().ok(),
            "errorafter" => m.error_after = value.parse().ok(),
            _ => {}
        }
    }
    m
}

/// Google's canonical status name for an HTTP status.
pub fn google_status(code: u16) -> &'static str {
    match code {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        501 => "NOT_IMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}

/// Gemini 3 Pro Image's output dimensions for an aspect ratio and image size.
pub fn dimensions(ratio: &str, size: &str) -> (u32, u32) {
    let (w, h) = match ratio {
        "2:3" => (848, 1264),
        "3:2" => (1264, 848),
        "3:4" => (896, 1200),
        "4:3" => (1200, 896),
        "4:5" => (928, 1152),
        "5:4" => (1152, 928),
        "9:16" => (768, 1376),
        "16:9" => (1376, 768),
        "21:9" => (1584, 672),
        _ => (1024, 1024),
    };
    let k = match size.to_ascii_uppercase().as_str() {
        "2K" => 2,
        "4K" => 4,
        _ => 1,
    };
    (w * k, h * k)
}

/// The aspect ratios Gemini's image models take, as `imageConfig.aspectRatio` names them.
pub const RATIOS: [&str; 10] = ["1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"];

/// The supported ratio nearest to `width` x `height` (what an edit without `aspectRatio` gets:
/// Gemini keeps the input's ratio, snapped to one it makes).
pub fn nearest_ratio(width: u32, height: u32) -> &'static str {
    let want = (width.max(1) as f64 / height.max(1) as f64).ln();
    let value = |r: &str| {
        let (w, h) = r.split_once(':').unwrap_or(("1", "1"));
        (w.parse::<f64>().unwrap_or(1.0) / h.parse::<f64>().unwrap_or(1.0)).ln()
    };
    RATIOS.iter().copied().min_by(|a, b| (value(a) - want).abs().total_cmp(&(value(b) - want).abs())).unwrap_or("1:1")
}

/// Gemini 2.5 Flash Image's output dimensions for an aspect ratio (it makes 1K images only).
pub fn flash_dimensions(ratio: &str) -> (u32, u32) {
    match ratio {
        "2:3" => (832, 1248),
        "3:2" => (1248, 832),
        "3:4" => (864, 1184),
        "4:3" => (1184, 864),
        "4:5" => (896, 1152),
        "5:4" => (1152, 896),
        "9:16" => (768, 1344),
        "16:9" => (1344, 768),
        "21:9" => (1536, 672),
        _ => (1024, 1024),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_read_from_anywhere_in_the_prompt() {
        let m = parse_markers("a cat [fake:status=429] [fake:retry=7] and [fake:delay=250][fake:withtext]");
        assert_eq!(m.status, Some(429));
        assert_eq!(m.retry_secs.as_deref(), Some("7"));
        assert_eq!(m.delay_ms, 250);
        assert!(m.with_text);
        assert_eq!(parse_markers("plain prompt"), Markers::default());
        assert_eq!(parse_markers("[fake:unclosed").delay_ms, 0);
        let m = parse_markers("[fake:interim=1][fake:chunkdelay=40] [fake:breakafter=2][fake:errorafter=0]");
        assert_eq!((m.interim, m.chunk_delay_ms, m.break_after, m.error_after), (Some(1), 40, Some(2), Some(0)));
        assert_eq!(parse_markers("[fake:interim=x]").interim, None);
    }

    #[test]
    fn dimensions_follow_ratio_and_size() {
        assert_eq!(dimensions("16:9", "1K"), (1376, 768));
        assert_eq!(dimensions("16:9", "4K"), (5504, 3072));
        assert_eq!(dimensions("1:1", ""), (1024, 1024));
        assert_eq!(dimensions("9:16", "2k"), (1536, 2752));
        assert_eq!(flash_dimensions("16:9"), (1344, 768));
        assert_eq!(flash_dimensions("1:1"), (1024, 1024));
    }

    #[test]
    fn nearest_ratio_snaps_to_a_supported_one() {
        assert_eq!(nearest_ratio(1920, 1080), "16:9");
        assert_eq!(nearest_ratio(1080, 1920), "9:16");
        assert_eq!(nearest_ratio(4032, 3024), "4:3");
        assert_eq!(nearest_ratio(300, 200), "3:2");
        assert_eq!(nearest_ratio(512, 512), "1:1");
        assert_eq!(nearest_ratio(3000, 1000), "21:9");
        assert_eq!(nearest_ratio(1000, 3000), "9:16");
        assert_eq!(nearest_ratio(0, 0), "1:1");
        for r in RATIOS {
            let (w, h) = dimensions(r, "1K");
            assert_eq!(nearest_ratio(w, h), r);
            let (w, h) = flash_dimensions(r);
            assert_eq!(nearest_ratio(w, h), r);
        }
    }
}
