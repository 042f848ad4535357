use super::*;

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

#[test]
fn only_well_formed_ids_under_the_files_path_are_ids() {
    let id = |p: &str| parse_path(p);
    assert_eq!(id(&format!("/v1/images/files/{TOKEN}-0")), Some(Some(FileId { token: TOKEN.into(), index: 0 })));
    assert_eq!(id(&format!("/v1/images/files/{TOKEN}-12?x=1")), Some(Some(FileId { token: TOKEN.into(), index: 12 })));
    for bad in [
        "/v1/images/files/".to_string(),
        format!("/v1/images/files/{TOKEN}"),
        format!("/v1/images/files/{TOKEN}-"),
        format!("/v1/images/files/{TOKEN}-123"),
        format!("/v1/images/files/{TOKEN}-00"),
        format!("/v1/images/files/{TOKEN}-01"),
        format!("/v1/images/files/{TOKEN}-a"),
        format!("/v1/images/files/{}-0", TOKEN.to_uppercase()),
        format!("/v1/images/files/{}-0", &TOKEN[1..]),
        format!("/v1/images/files/{TOKEN}0-0"),
        format!("/v1/images/files/{TOKEN}-0/x"),
        "/v1/images/files/../generations-0".to_string(),
    ] {
        assert_eq!(id(&bad), Some(None), "{bad}");
    }
    assert_eq!(id("/v1/images/generations"), None);
    assert_eq!(id("/v1/images/file/x-0"), None);
}

#[test]
fn tokens_are_128_bits_of_hex() {
    let t = token(&[0xab; TOKEN_BYTES]);
    assert_eq!(t.len(), 32);
    assert!(parse_path(&format!("{FILES_PATH}{t}-3")).is_some_and(|id| id.is_some()));
}

#[test]
fn records_read_back_only_for_their_own_key() {
    let entry_key = format!("img:gemini-3-pro-image:auto:none:{}", "a".repeat(64));
    let r = Record { entry_key, images: 2, expires_at_s: 99 };
    let key = record_key(TOKEN, None);
    let bytes = r.encode(&key);
    assert_eq!(Record::decode(&bytes, &key), Some(r.clone()));
    assert_eq!(Record::decode(&bytes, &record_key(TOKEN, Some("kids"))), None, "another profile's record");
    assert_eq!(Record::decode(&bytes, "file:ffff"), None, "another URL sharing the slot");
    for cut in 0..bytes.len() {
        assert_eq!(Record::decode(&bytes[..cut], &key), None, "cut at {cut}");
    }
    let bad_key = Record { entry_key: "img:short".into(), ..r.clone() };
    assert_eq!(Record::decode(&bad_key.encode(&key), &key), None);
    let none = Record { images: 0, ..r };
    assert_eq!(Record::decode(&none.encode(&key), &key), None);
}

#[test]
fn record_slots_are_many_and_spread() {
    assert_eq!(record_slots(4), 1024);
    assert_eq!(record_slots(1000), 16_000);
    let slots: std::collections::HashSet<String> =
        (0..200).map(|i| record_slot_key(&record_key(&format!("{i:032x}"), None), 1024)).collect();
    assert!(slots.len() > 150, "{}", slots.len());
    assert!(CacheKey::from_key(&own_entry_key(TOKEN)).is_some(), "an own entry finds an L1 slot like any");
}

#[test]
fn images_are_decoded_and_checked_against_their_type() {
    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x02\0\0\0".to_vec();
    let mut b64 = Vec::new();
    crate::base64::encode_into(&mut b64, &png);
    let views = [crate::openai::ImageView { mime_type: "image/png", text: None, base64: &b64 }];
    let bytes = cache::encode_entry("img:k", 1, None, &views);
    let entry = cache::decode_entry(&bytes, "img:k").unwrap();
    let image = image_of(&entry, 0, 50).unwrap();
    assert_eq!((image.body.as_slice(), image.content_type, image.expires_at_s), (&png[..], "image/png", 50));
    assert_eq!(image_of(&entry, 1, 50), None, "no second image");
    let lying = [crate::openai::ImageView { mime_type: "image/jpeg", text: None, base64: &b64 }];
    let bytes = cache::encode_entry("img:k", 1, None, &lying);
    assert_eq!(image_of(&cache::decode_entry(&bytes, "img:k").unwrap(), 0, 50), None);
}

#[test]
fn etags_match_as_http_says() {
    let tag = "\"abc-0\"";
    assert!(etag_matches("\"abc-0\"", tag));
    assert!(etag_matches("\"x\", W/\"abc-0\"", tag));
    assert!(etag_matches("*", tag));
    assert!(!etag_matches("\"abc-1\"", tag));
    assert!(!etag_matches("abc-0", tag));
}
