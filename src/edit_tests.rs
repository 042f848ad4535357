use serde_json::Value;

use super::*;

const BOUNDARY: &str = "----formboundary7MA4YWxk";

/// A PNG header: signature and IHDR of `w` x `h`, colour type 6 (RGBA) when `alpha`.
fn png(w: u32, h: u32, alpha: bool) -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
    b.extend_from_slice(&w.to_be_bytes());
    b.extend_from_slice(&h.to_be_bytes());
    b.extend_from_slice(&[8, if alpha { 6 } else { 2 }, 0, 0, 0]);
    b.extend_from_slice(&[0, 0, 0, 0]); // CRC, not checked
    b.extend_from_slice(b"\x00\x00\x00\x00IDAT\x00\x00\x00\x00");
    b
}

fn jpeg() -> Vec<u8> {
    vec![0xFF, 0xD8, 0xFF, 0xE0, 0, 16, b'J', b'F', b'I', b'F', 0]
}

enum P<'a> {
    Text(&'a str, &'a str),
    File(&'a str, &'a str, Vec<u8>),
}

/// A multipart body as httpx (the OpenAI Python SDK) writes it.
fn form(parts: &[P]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match p {
            P::Text(name, value) => {
                out.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes());
                out.extend_from_slice(value.as_bytes());
            }
            P::File(name, filename, data) => {
                out.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                    )
                    .as_bytes(),
                );
                out.extend_from_slice(data);
            }
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    out
}

fn content_type() -> String {
    format!("multipart/form-data; boundary={BOUNDARY}")
}

fn settings(json: &str) -> Settings {
    Settings::from_json(json.as_bytes(), &|_| None).unwrap()
}

fn edit(parts: &[P]) -> Result<(ImageRequest, Value), Rejection> {
    edit_with(&settings("{}"), Endpoint::Edits, parts)
}

fn edit_with(s: &Settings, endpoint: Endpoint, parts: &[P]) -> Result<(ImageRequest, Value), Rejection> {
    let upload = form(parts);
    let (req, inputs) = read_edit(&upload, Some(&content_type()), s, endpoint)?;
    let body = inputs.gemini_body(&req, &upload);
    let estimate = inputs.encoded_len() + req.final_prompt.len() as u64 + 1024;
    assert!(estimate >= body.len() as u64 && estimate <= body.len() as u64 + 2048, "the estimate is close");
    Ok((req, serde_json::from_slice(&body).unwrap()))
}

fn refused(parts: &[P]) -> (ErrorCode, Option<&'static str>) {
    let r = edit(parts).expect_err("refused");
    (r.error.code, r.error.param)
}

/// The inline images of a Gemini body, decoded, with their types.
fn inline_images(body: &Value) -> Vec<(String, Vec<u8>)> {
    body["contents"][0]["parts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p.get("inlineData"))
        .map(|d| (d["mimeType"].as_str().unwrap().to_string(), decode(d["data"].as_str().unwrap())))
        .collect()
}

fn decode(b64: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let mut out = Vec::new();
    for q in b64.as_bytes().chunks(4) {
        let n = q.iter().filter(|c| **c != b'=').count();
        let v = q.iter().take(n).fold(0u32, |a, c| (a << 6) | u32::from(val(*c))) << (6 * (4 - n));
        for i in 0..n.saturating_sub(1) {
            out.push((v >> (16 - 8 * i)) as u8);
        }
    }
    out
}

#[test]
fn several_images_reach_gemini_in_order_with_their_types_from_their_bytes() {
    let (a, b) = (png(64, 48, false), jpeg());
    let (req, body) = edit(&[
        P::Text("prompt", "put the product on the beach"),
        P::File("image[]", "b.png", a.clone()),
        P::File("image[]", "a.jpg.png", b.clone()),
        P::Text("n", "2"),
    ])
    .unwrap();
    assert_eq!(req.n, 2);
    assert_eq!(inline_images(&body), vec![("image/png".into(), a), ("image/jpeg".into(), b)]);
    assert_eq!(body["contents"][0]["parts"][0]["text"], "put the product on the beach");
    assert_eq!(req.inputs.images.len(), 2);
}

#[test]
fn an_edit_that_names_no_ratio_sends_none_and_one_that_does_sends_it() {
    let img = || P::File("image", "a.png", png(64, 48, false));
    for extra in [None, Some(P::Text("size", "auto"))] {
        let mut parts = vec![P::Text("prompt", "p"), img()];
        parts.extend(extra);
        let (req, body) = edit(&parts).unwrap();
        assert_eq!(req.ratio, None);
        assert!(body["generationConfig"]["imageConfig"].get("aspectRatio").is_none(), "Gemini keeps the input's ratio");
    }
    for (parts, ratio) in [
        (vec![P::Text("prompt", "p"), img(), P::Text("size", "1792x1024")], "16:9"),
        (vec![P::Text("prompt", "p"), img(), P::Text("aspect_ratio", "4:5")], "4:5"),
        (vec![P::Text("prompt", "p"), img(), P::Text("model", "gemini-3-pro-image-9x16")], "9:16"),
    ] {
        let (_, body) = edit(&parts).unwrap();
        assert_eq!(body["generationConfig"]["imageConfig"]["aspectRatio"], ratio);
    }
    let (_, body) = edit(&[P::Text("prompt", "p"), img(), P::Text("quality", "hd")]).unwrap();
    assert_eq!(body["generationConfig"]["imageConfig"]["imageSize"], "4K", "the resolution is kept on edits");
}

#[test]
fn a_mask_is_sent_after_the_images_with_the_instruction_or_refused() {
    let image = png(64, 48, false);
    let mask = png(64, 48, true);
    let (req, body) = edit(&[
        P::Text("prompt", "p"),
        P::File("image", "a.png", image.clone()),
        P::File("mask", "m.png", mask.clone()),
    ])
    .unwrap();
    let parts = body["contents"][0]["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 4);
    assert_eq!(inline_images(&body)[1].1, mask, "the mask comes after the images");
    assert!(parts[3]["text"].as_str().unwrap().contains("transparent in the mask"));
    assert!(req.inputs.mask.is_some());
    assert_eq!(req.inputs.images.len(), 1, "the mask is not an input image");

    let s = settings(r#"{"edits": {"mask": "refuse"}}"#);
    let r = edit_with(
        &s,
        Endpoint::Edits,
        &[P::Text("prompt", "p"), P::File("image", "a", image.clone()), P::File("mask", "m", mask)],
    )
    .err()
    .unwrap();
    assert_eq!((r.error.code, r.error.param), (ErrorCode::InvalidRequest, Some("mask")));
}

#[test]
fn a_mask_must_be_a_png_with_alpha_of_the_first_images_size() {
    let image = png(64, 48, false);
    for mask in [png(64, 48, false), png(32, 48, true), jpeg(), b"not an image".to_vec()] {
        let got = refused(&[P::Text("prompt", "p"), P::File("image", "a", image.clone()), P::File("mask", "m", mask)]);
        assert_eq!(got, (ErrorCode::InvalidRequest, Some("mask")));
    }
}

#[test]
fn each_image_is_checked_and_counted() {
    let ok = png(8, 8, false);
    assert_eq!(refused(&[P::Text("prompt", "p")]), (ErrorCode::InvalidRequest, Some("image")), "no image");
    for bad in [Vec::new(), b"GIF89a....".to_vec(), b"<svg/>".to_vec()] {
        assert_eq!(
            refused(&[P::Text("prompt", "p"), P::File("image", "a.png", ok.clone()), P::File("image", "x.png", bad)]),
            (ErrorCode::InvalidRequest, Some("image"))
        );
    }
    // Over the per-image limit.
    let s = settings(r#"{"limits": {"max_input_image_bytes": 100}}"#);
    let mut big = png(8, 8, false);
    big.resize(101, 0);
    let r = edit_with(&s, Endpoint::Edits, &[P::Text("prompt", "p"), P::File("image", "a", big)]).err().unwrap();
    assert_eq!(r.error.param, Some("image"));
    // More than the family takes: 14 for gemini-3-pro-image, 3 for gemini-2.5-flash-image.
    let many = |count: usize, model: &'static str| {
        let mut parts = vec![P::Text("prompt", "p"), P::Text("model", model)];
        parts.extend((0..count).map(|_| P::File("image[]", "a.png", ok.clone())));
        parts
    };
    assert!(edit(&many(14, "gemini-3-pro-image")).is_ok());
    assert_eq!(refused(&many(15, "gemini-3-pro-image")), (ErrorCode::InvalidRequest, Some("image")));
    assert!(edit(&many(3, "gemini-2.5-flash-image")).is_ok());
    let mut with_mask = many(14, "gemini-3-pro-image");
    with_mask.push(P::File("mask", "m.png", png(8, 8, true)));
    assert_eq!(edit(&with_mask).err().map(|r| r.error.param), Some(Some("image")), "a mask counts as an image");
    assert_eq!(refused(&many(4, "gemini-2.5-flash-image")), (ErrorCode::InvalidRequest, Some("image")));
}

#[test]
fn text_fields_are_read_like_the_json_request() {
    let img = || P::File("image", "a.png", png(8, 8, false));
    assert_eq!(refused(&[P::Text("prompt", "p"), img(), P::Text("n", "two")]), (ErrorCode::InvalidRequest, Some("n")));
    assert_eq!(refused(&[P::Text("prompt", "p"), img(), P::Text("n", "11")]), (ErrorCode::InvalidRequest, Some("n")));
    assert_eq!(
        refused(&[P::Text("prompt", "p"), img(), P::Text("size", "3000x1000")]),
        (ErrorCode::InvalidRequest, Some("size"))
    );
    assert_eq!(
        refused(&[P::Text("prompt", "a"), img(), P::Text("prompt", "b")]),
        (ErrorCode::InvalidRequest, Some("prompt")),
        "a text field sent twice"
    );
    assert_eq!(refused(&[img()]), (ErrorCode::InvalidPrompt, Some("prompt")));
    assert_eq!(
        refused(&[P::Text("prompt", "p"), img(), P::Text("input_fidelity", "max")]),
        (ErrorCode::InvalidRequest, Some("input_fidelity"))
    );
    assert_eq!(
        refused(&[P::File("prompt", "p.txt", b"a prompt".to_vec()), img()]),
        (ErrorCode::InvalidRequest, Some("prompt")),
        "a field sent as a file"
    );
    let (req, _) = edit(&[
        P::Text("prompt", "p"),
        img(),
        P::Text("input_fidelity", "high"),
        P::Text("moderation", "low"),
        P::Text("response_format", "b64_json"),
        P::Text("user", "u1"),
        P::Text("unknown_field", "ignored"),
        P::Text("stream", "false"),
    ])
    .unwrap();
    assert_eq!(req.n, 1);
}

#[test]
fn bodies_that_are_not_multipart_are_refused() {
    let s = settings("{}");
    for ct in [None, Some("application/json"), Some("multipart/form-data"), Some("multipart/mixed; boundary=x")] {
        let r = read_edit(b"{}", ct, &s, Endpoint::Edits).err().unwrap();
        assert_eq!(r.error.code, ErrorCode::InvalidRequest, "{ct:?}");
    }
    let truncated = &form(&[P::Text("prompt", "p")])[..20];
    let r = read_edit(truncated, Some(&content_type()), &s, Endpoint::Edits).err().unwrap();
    assert_eq!(r.error.code, ErrorCode::InvalidRequest);
}

#[test]
fn a_variation_is_an_edit_of_one_image_with_the_configured_prompt() {
    let s = settings("{}");
    let (req, body) =
        edit_with(&s, Endpoint::Variations, &[P::File("image", "a.png", png(8, 8, false)), P::Text("n", "2")]).unwrap();
    assert_eq!(req.final_prompt, s.edits.variation_prompt);
    assert_eq!(req.prompt_hash, crate::hash::prompt_hash(&s.edits.variation_prompt));
    assert_eq!(body["contents"][0]["parts"][0]["text"], s.edits.variation_prompt.as_str());
    assert_eq!(inline_images(&body).len(), 1);
    let two = [P::File("image", "a.png", png(8, 8, false)), P::File("image", "b.png", png(8, 8, false))];
    assert_eq!(edit_with(&s, Endpoint::Variations, &two).err().unwrap().error.param, Some("image"));
}

#[test]
fn the_cache_key_follows_every_image_and_the_mask_in_order() {
    let (a, b) = (png(8, 8, false), png(9, 9, false));
    let key = |parts: &[P]| crate::cache::cache_key(&edit(parts).unwrap().0, None).key;
    let ab = key(&[P::Text("prompt", "p"), P::File("image[]", "1", a.clone()), P::File("image[]", "2", b.clone())]);
    let ba = key(&[P::Text("prompt", "p"), P::File("image[]", "1", b.clone()), P::File("image[]", "2", a.clone())]);
    assert_ne!(ab, ba);
    let same =
        key(&[P::Text("prompt", "p"), P::File("image", "other-name", a.clone()), P::File("image", "x", b.clone())]);
    assert_eq!(ab, same, "file names and the field spelling do not matter; the bytes do");
    let with_mask = key(&[
        P::Text("prompt", "p"),
        P::File("image[]", "1", png(8, 8, false)),
        P::File("image[]", "2", b.clone()),
        P::File("mask", "m", png(8, 8, true)),
    ]);
    assert_ne!(ab, with_mask);
}

#[test]
fn the_flash_family_takes_1k_only_and_is_sent_no_size() {
    let img = || P::File("image", "a.png", png(8, 8, false));
    let (req, body) =
        edit(&[P::Text("prompt", "p"), img(), P::Text("model", "gemini-2.5-flash-image"), P::Text("quality", "hd")])
            .unwrap();
    assert_eq!((req.image_size, req.upstream.as_str()), (None, "gemini-2.5-flash-image"));
    assert!(body["generationConfig"]["imageConfig"].get("imageSize").is_none());
    assert_eq!(
        refused(&[
            P::Text("prompt", "p"),
            img(),
            P::Text("model", "gemini-2.5-flash-image"),
            P::Text("image_size", "2K")
        ]),
        (ErrorCode::InvalidRequest, Some("image_size"))
    );
    assert!(edit(&[
        P::Text("prompt", "p"),
        img(),
        P::Text("model", "gemini-2.5-flash-image"),
        P::Text("image_size", "1k")
    ])
    .is_ok());
    assert_eq!(
        refused(&[P::Text("prompt", "p"), img(), P::Text("model", "gemini-2.5-flash-image-4k")]),
        (ErrorCode::UnsupportedModel, Some("model"))
    );
}
