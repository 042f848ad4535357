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
    let Some(checked) = simd::valid_prefix(body) else { return false };
    body[checked..].chunks(8192).all(|chunk| chunk.iter().fold(0u8, |bad, &c| bad | u8::from(!is_base64_char(c))) == 0)
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
    let done = simd::decode_prefix(body, &mut out)?;
    let mut bad = 0u8;
    for (quad, three) in body[done..].chunks_exact(4).zip(out[done / 4 * 3..].chunks_exact_mut(3)) {
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

/// Wasm SIMD for the multi-megabyte images: 16 characters at a time, checked with two table
/// look-ups (one by each nibble: a character is base64 only if the two bits they give share
/// nothing) and turned into sextets with a third (Wojciech Mula's method, "Faster Base64
/// Encoding and Decoding Using AVX2 Instructions"). Under V8 the scalar loops above ran at
/// about 3 bytes per nanosecond; `make profile` shows what this gives. Other targets use the
/// scalar loops alone.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd {
    use core::arch::wasm32::*;

    /// For each low nibble, the high nibbles it is *not* base64 with (one bit each, by
    /// `HI_BIT`); a character is base64 when `LO[lo] & HI_BIT[hi] == 0`.
    const LO: [u8; 16] =
        [0x15, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x13, 0x1A, 0x1B, 0x1B, 0x1B, 0x1A];
    const HI_BIT: [u8; 16] =
        [0x10, 0x10, 0x01, 0x02, 0x04, 0x08, 0x04, 0x08, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10];
    /// What to add to a character to get its sextet, by high nibble (index 1: `/`).
    const ROLL: [i8; 16] = [0, 16, 19, 4, -65, -65, -71, -71, 0, 0, 0, 0, 0, 0, 0, 0];

    fn table(t: [u8; 16]) -> v128 {
        u8x16(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9], t[10], t[11], t[12], t[13], t[14], t[15])
    }

    /// The sextets of 16 characters, and a vector that is not all zeros if one of them is
    /// not base64 (callers gather those and look once, at the end: no branch per block).
    #[inline(always)]
    fn sextets(input: v128, lo_t: v128, hi_t: v128, roll_t: v128) -> (v128, v128) {
        let lo_n = v128_and(input, u8x16_splat(0x0f));
        let hi_n = u8x16_shr(input, 4);
        let bad = v128_and(i8x16_swizzle(lo_t, lo_n), i8x16_swizzle(hi_t, hi_n));
        let slash = i8x16_eq(input, u8x16_splat(b'/'));
        let roll = i8x16_swizzle(roll_t, i8x16_add(slash, hi_n));
        (i8x16_add(input, roll), bad)
    }

    fn tables() -> (v128, v128, v128) {
        (table(LO), table(HI_BIT), table(ROLL.map(|r| r as u8)))
    }

    fn load(bytes: &[u8]) -> v128 {
        debug_assert!(bytes.len() >= 16);
        // SAFETY: the caller's slice holds at least 16 bytes from its start; v128_load reads
        // exactly 16 and needs no alignment.
        unsafe { v128_load(bytes.as_ptr().cast::<v128>()) }
    }

    /// How many leading characters of `body` (a multiple of 16) are base64; `None` when one of
    /// those looked at is not.
    pub fn valid_prefix(body: &[u8]) -> Option<usize> {
        let (lo_t, hi_t, roll_t) = tables();
        let (mut done, mut bad) = (0, u8x16_splat(0));
        while body.len() - done >= 16 {
            bad = v128_or(bad, sextets(load(&body[done..]), lo_t, hi_t, roll_t).1);
            done += 16;
        }
        (!v128_any_true(bad)).then_some(done)
    }

    /// Decodes whole blocks of 16 characters into `out` (three bytes for every four) while
    /// `out` has room for a 16-byte store; returns the characters consumed, `None` at one that
    /// is not base64.
    pub fn decode_prefix(body: &[u8], out: &mut [u8]) -> Option<usize> {
        let (lo_t, hi_t, roll_t) = tables();
        let (mut i, mut o, mut bad) = (0, 0, u8x16_splat(0));
        // x << 12 | y for each pair [x, y] of 16-bit lanes (a multiply-add of lanes under 4096).
        let weights = i16x8(0x1000, 1, 0x1000, 1, 0x1000, 1, 0x1000, 1);
        while body.len() - i >= 16 && out.len() - o >= 16 {
            let (v, b) = sextets(load(&body[i..]), lo_t, hi_t, roll_t);
            bad = v128_or(bad, b);
            // Byte pairs [a, b] -> a << 6 | b in each 16-bit lane, then pairs of those
            // [x, y] -> x << 12 | y in each 32-bit lane: 24 bits, stored little-endian.
            let pairs = v128_or(i16x8_shl(v128_and(v, u16x8_splat(0x00ff)), 6), u16x8_shr(v, 8));
            let quads = i32x4_dot_i16x8(pairs, weights);
            let bytes = i8x16_swizzle(quads, u8x16(2, 1, 0, 6, 5, 4, 10, 9, 8, 14, 13, 12, 255, 255, 255, 255));
            // SAFETY: `out[o..]` holds at least 16 bytes (the loop's condition); the last four
            // written are zeros the next block or the scalar loop writes over.
            unsafe { v128_store(out[o..].as_mut_ptr().cast::<v128>(), bytes) };
            i += 16;
            o += 12;
        }
        (!v128_any_true(bad)).then_some(i)
    }
}

/// Elsewhere, the scalar loops do it all.
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
mod simd {
    pub fn valid_prefix(_body: &[u8]) -> Option<usize> {
        Some(0)
    }

    pub fn decode_prefix(_body: &[u8], _out: &mut [u8]) -> Option<usize> {
        Some(0)
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

    /// Every byte value at every place of a block, against the scalar table: what the SIMD
    /// path (on wasm32) accepts and decodes is exactly what the table does.
    #[test]
    fn every_byte_at_every_place_is_judged_as_the_table_judges_it() {
        let base: Vec<u8> = (0..64u8).cycle().take(48).map(|i| ALPHABET[i as usize]).collect();
        for place in 0..48 {
            for c in 0..=255u8 {
                if c == b'=' && place >= 46 {
                    continue; // padding: its own test above
                }
                let mut coded = base.clone();
                coded[place] = c;
                let valid = DECODE[c as usize] != 0xFF;
                assert_eq!(is_base64(&coded), valid, "byte {c:#04x} at {place}");
                let decoded = decode(&coded);
                assert_eq!(decoded.is_some(), valid, "byte {c:#04x} at {place}");
                if let Some(bytes) = decoded {
                    // Scalar decoding of the same quads.
                    let sextets: Vec<u8> = coded.iter().map(|&c| DECODE[c as usize]).collect();
                    let expected: Vec<u8> = sextets
                        .chunks(4)
                        .flat_map(|q| {
                            let v = (u32::from(q[0]) << 18)
                                | (u32::from(q[1]) << 12)
                                | (u32::from(q[2]) << 6)
                                | u32::from(q[3]);
                            [(v >> 16) as u8, (v >> 8) as u8, v as u8]
                        })
                        .collect();
                    assert_eq!(bytes, expected, "byte {c:#04x} at {place}");
                }
            }
        }
    }

    #[test]
    fn long_inputs_round_trip_at_every_length() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        for len in (0..200).chain([4095, 4096, 4097, 65_535, 65_536, 1_000_001]) {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let mut coded = Vec::new();
            encode_into(&mut coded, &bytes);
            assert_eq!(decode(&coded).as_deref(), Some(&bytes[..]), "length {len}");
            assert!(len == 0 || is_base64(&coded));
            // One bad byte anywhere, even deep in a long image, is refused.
            if len > 0 {
                let at = (seed as usize) % (coded.len() - 2);
                let mut bad = coded.clone();
                bad[at] = b'-';
                assert_eq!(decode(&bad), None, "length {len}, '-' at {at}");
                assert!(!is_base64(&bad));
            }
        }
    }
}
