//! Standard base64 (RFC 4648, padded): the check every image Gemini or L2 returns must pass,
//! and the encoder for images an edit sends to Gemini.

/// Whether `b` is standard padded base64. Branch-free per byte, so the compiler can keep it
/// fast on multi-megabyte images (it runs on every image Gemini or L2 returns).
pub fn is_base64(b: &[u8]) -> bool {
    if b.is_empty() || !b.len().is_multiple_of(4) {
        return false;
    }
    let pad = b.iter().rev().take(2).take_while(|c| **c == b'=').count();
    let body = &b[..b.len() - pad];
    body.chunks(8192).all(|chunk| chunk.iter().fold(0u8, |bad, &c| bad | u8::from(!is_base64_char(c))) == 0)
}

#[inline(always)]
fn is_base64_char(c: u8) -> bool {
    let lower = c | 0x20; // folds A-Z onto a-z; nothing else lands in a-z
    (lower.wrapping_sub(b'a') < 26) | (c.wrapping_sub(b'0') < 10) | (c == b'+') | (c == b'/')
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// The length of `n` bytes in padded base64.
pub fn encoded_len(n: usize) -> usize {
    n.div_ceil(3).saturating_mul(4)
}

/// Appends `bytes` to `out` as padded base64.
pub fn encode_into(out: &mut Vec<u8>, bytes: &[u8]) {
    out.reserve(encoded_len(bytes.len()));
    let mut chunks = bytes.chunks_exact(3);
    for c in &mut chunks {
        let v = (u32::from(c[0]) << 16) | (u32::from(c[1]) << 8) | u32::from(c[2]);
        out.extend_from_slice(&[
            ALPHABET[(v >> 18) as usize & 63],
            ALPHABET[(v >> 12) as usize & 63],
            ALPHABET[(v >> 6) as usize & 63],
            ALPHABET[v as usize & 63],
        ]);
    }
    match *chunks.remainder() {
        [a] => {
            let v = u32::from(a) << 16;
            out.extend_from_slice(&[ALPHABET[(v >> 18) as usize & 63], ALPHABET[(v >> 12) as usize & 63], b'=', b'=']);
        }
        [a, b] => {
            let v = (u32::from(a) << 16) | (u32::from(b) << 8);
            out.extend_from_slice(&[
                ALPHABET[(v >> 18) as usize & 63],
                ALPHABET[(v >> 12) as usize & 63],
                ALPHABET[(v >> 6) as usize & 63],
                b'=',
            ]);
        }
        _ => {}
    }
}

/// Each alphabet byte's six bits; 0xFF for every other byte.
const DECODE: [u8; 256] = {
    let mut t = [0xFFu8; 256];
    let mut i = 0;
    while i < 64 {
        t[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// Decodes standard padded base64 whole; `None` for anything else. Image URLs serve images
/// this way, so it runs on megabytes: one table lookup per byte, no branch on the alphabet.
pub fn decode(b64: &[u8]) -> Option<Vec<u8>> {
    if !b64.len().is_multiple_of(4) {
        return None;
    }
    let pad = b64.iter().rev().take(2).take_while(|c| **c == b'=').count();
    let (body, tail) = b64.split_at(b64.len().saturating_sub(if pad > 0 { 4 } else { 0 }));
    // Whole quads straight into a buffer of their size: no per-quad growth checks.
    let mut out = vec![0u8; body.len() / 4 * 3];
    let mut bad = 0u8;
    for (quad, three) in body.chunks_exact(4).zip(out.chunks_exact_mut(3)) {
        let (a, b, c, d) =
            (DECODE[quad[0] as usize], DECODE[quad[1] as usize], DECODE[quad[2] as usize], DECODE[quad[3] as usize]);
        bad |= a | b | c | d;
        let v = (u32::from(a) << 18) | (u32::from(b) << 12) | (u32::from(c) << 6) | u32::from(d);
        three[0] = (v >> 16) as u8;
        three[1] = (v >> 8) as u8;
        three[2] = v as u8;
    }
    if bad & 0xC0 != 0 {
        return None;
    }
    if pad > 0 {
        let sextets: Vec<u8> = tail[..4 - pad].iter().map(|&c| DECODE[c as usize]).collect();
        if sextets.iter().any(|s| s & 0xC0 != 0) {
            return None;
        }
        let v = sextets.iter().fold(0u32, |v, &s| (v << 6) | u32::from(s)) << (6 * pad);
        out.extend((0..3 - pad).map(|i| (v >> (16 - 8 * i)) as u8));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_as_rfc_4648_says() {
        for (plain, coded) in [
            (&b""[..], &b""[..]),
            (b"f", b"Zg=="),
            (b"fo", b"Zm8="),
            (b"foo", b"Zm9v"),
            (b"foob", b"Zm9vYg=="),
            (b"fooba", b"Zm9vYmE="),
            (b"foobar", b"Zm9vYmFy"),
            (b"\xff\xfe\x00", b"//4A"),
        ] {
            let mut out = Vec::new();
            encode_into(&mut out, plain);
            assert_eq!(out, coded);
            assert_eq!(encoded_len(plain.len()), coded.len());
            assert!(coded.is_empty() || is_base64(&out));
            assert_eq!(decode(coded).as_deref(), Some(plain));
        }
    }

    #[test]
    fn the_check_refuses_what_is_not_padded_standard_base64() {
        for bad in [&b"Zg="[..], b"Zm9v!A==", b"Zm9v\"A==", b"", b"Zm-_"] {
            assert!(!is_base64(bad), "{bad:?}");
        }
        for bad in [&b"Zg="[..], b"Zm9v!A==", b"Zm-_", b"Z===", b"Zm9v\nA==", b"=m9v"] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
        let bytes: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        let mut coded = Vec::new();
        encode_into(&mut coded, &bytes);
        assert_eq!(decode(&coded), Some(bytes));
    }
}
