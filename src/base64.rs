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
        }
    }

    #[test]
    fn the_check_refuses_what_is_not_padded_standard_base64() {
        for bad in [&b"Zg="[..], b"Zm9v!A==", b"Zm9v\"A==", b"", b"Zm-_"] {
            assert!(!is_base64(bad), "{bad:?}");
        }
    }
}
