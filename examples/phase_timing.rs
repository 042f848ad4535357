//! Times the pure core's phases on a large Gemini answer (native; the wasm build is slower
//! by a constant factor): `cargo run --release --example phase_timing`.
use std::time::Instant;

use gemini_image_filter::gemini::{is_base64, read_call, CallResponse};
use gemini_image_filter::openai::{images_body, Rendering};

fn main() {
    let b64: String = "QUJD".repeat(2_796_000 / 4);
    let body = format!(
        r#"{{"candidates":[{{"content":{{"parts":[{{"text":"x","thought":true}},{{"inlineData":{{"mimeType":"image/png","data":"{b64}"}}}}]}},"finishReason":"STOP"}}],"usageMetadata":{{"promptTokenCount":1,"totalTokenCount":2}}}}"#
    );
    for _ in 0..3 {
        let t = Instant::now();
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        let t_value = t.elapsed();
        drop(parsed);
        let t = Instant::now();
        let ok = is_base64(b64.as_bytes());
        let t_b64 = t.elapsed();
        let t = Instant::now();
        let out = read_call(CallResponse { status: Some(200), body: body.clone().into_bytes(), ..Default::default() });
        let t_read = t.elapsed();
        let img = out.result.unwrap();
        let t = Instant::now();
        let rendered = images_body(1, &[img.view()], Rendering::B64Json, None);
        let t_render = t.elapsed();
        println!(
            "{} bytes: serde Value {:?}, is_base64 {:?} ({ok}), read_call (clone+parse+check) {:?}, render {:?} -> {}",
            body.len(),
            t_value,
            t_b64,
            t_read,
            t_render,
            rendered.len()
        );
    }
}
