//! Times the pure core's phases on a large Gemini answer (native; the wasm build is slower
//! by a constant factor): `cargo run --release --example phase_timing`. Each phase runs
//! `ROUNDS` times; the fastest round is printed (the least disturbed by the rest of the machine).
use std::time::{Duration, Instant};

use gemini_image_filter::gemini::{is_base64, read_call, CallResponse};
use gemini_image_filter::openai::{images_body, Rendering};

const ROUNDS: usize = 15;

fn fastest<T>(mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut out = None;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed());
        out = Some(v);
    }
    (best, out.expect("ROUNDS > 0"))
}

fn main() {
    let b64: String = "QUJD".repeat(2_796_000 / 4);
    let body = format!(
        r#"{{"candidates":[{{"content":{{"parts":[{{"text":"x","thought":true}},{{"inlineData":{{"mimeType":"image/png","data":"{b64}"}}}}]}},"finishReason":"STOP"}}],"usageMetadata":{{"promptTokenCount":1,"totalTokenCount":2}}}}"#
    );
    let (t_value, _) = fastest(|| serde_json::from_str::<serde_json::Value>(&body).map(drop).is_ok());
    let (t_b64, ok) = fastest(|| is_base64(b64.as_bytes()));
    let (t_decode, decoded) = fastest(|| gemini_image_filter::base64::decode(b64.as_bytes()).map_or(0, |d| d.len()));
    let (t_read, img) = fastest(|| {
        read_call(CallResponse { status: Some(200), body: body.clone().into_bytes(), ..Default::default() }).result
    });
    let Ok(img) = img else {
        println!("the answer did not read");
        return;
    };
    let (t_render, rendered) = fastest(|| images_body(1, &[img.view()], Rendering::B64Json, None).len());
    println!(
        "{} bytes, fastest of {ROUNDS}: serde Value {t_value:?}, is_base64 {t_b64:?} ({ok}), decode {t_decode:?} ({decoded} bytes), \
read_call (clone+parse+check) {t_read:?}, render {t_render:?} -> {rendered}",
        body.len(),
    );
}
