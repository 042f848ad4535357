//! Image types told by their first bytes, never by a name or a declared content type.

use crate::named::named;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImageType {
    Png,
    Jpeg,
    Webp,
}

// The MIME type.
named!(ImageType { Png => "image/png", Jpeg => "image/jpeg", Webp => "image/webp" });

/// How many leading bytes `sniff` needs.
pub const SNIFF_BYTES: usize = 12;

impl ImageType {
    /// The type whose signature `bytes` starts with.
    pub fn sniff(bytes: &[u8]) -> Option<ImageType> {
        if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(ImageType::Png)
        } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(ImageType::Jpeg)
        } else if bytes.starts_with(b"RIFF") && bytes.get(8..12) == Some(&b"WEBP"[..]) {
            Some(ImageType::Webp)
        } else {
            None
        }
    }

    /// The type of an image given as standard base64, from its first bytes alone.
    pub fn sniff_base64(b64: &[u8]) -> Option<ImageType> {
        Self::sniff(&decode_prefix(b64, SNIFF_BYTES))
    }
}

/// What the edits mask check needs from a PNG, read from its chunk headers without decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PngInfo {
    pub width: u32,
    pub height: u32,
    /// Whether the image can hold transparent pixels: color types 4 (grey and alpha) and 6
    /// (RGBA) always; a palette (type 3) only with a `tRNS` chunk before `IDAT`; grey (0) and
    /// RGB (2) with a `tRNS` chunk too (one color is transparent: transparency, if not a full
    /// alpha channel, which is what a mask needs). The pixels themselves are not looked at.
    pub has_alpha: bool,
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Chunk headers `png_info` reads before `IDAT` at most; real files have a handful.
const MAX_PNG_CHUNKS: usize = 1024;

/// Segments `dimensions` walks in a JPEG before its frame header at most.
const MAX_JPEG_SEGMENTS: usize = 1024;

fn be16(bytes: &[u8], at: usize) -> Option<u32> {
    match bytes.get(at..at.checked_add(2)?)? {
        &[a, b] => Some(u32::from(u16::from_be_bytes([a, b]))),
        _ => None,
    }
}

fn be32(bytes: &[u8], at: usize) -> Option<u32> {
    match bytes.get(at..at.checked_add(4)?)? {
        &[a, b, c, d] => Some(u32::from_be_bytes([a, b, c, d])),
        _ => None,
    }
}

fn le24(bytes: &[u8], at: usize) -> Option<u32> {
    match bytes.get(at..at.checked_add(3)?)? {
        &[a, b, c] => Some(u32::from_le_bytes([a, b, c, 0])),
        _ => None,
    }
}

/// Width, height and transparency of a PNG, from `IHDR` (the first chunk) and the chunk
/// headers up to `IDAT`. `None` for anything that is not a PNG with a valid `IHDR`. A file cut
/// short before `IDAT` (or with more than `MAX_PNG_CHUNKS` chunks before it) answers from
/// what was read: a palette, grey or RGB image without a `tRNS` seen has no alpha.
pub fn png_info(bytes: &[u8]) -> Option<PngInfo> {
    if !bytes.starts_with(PNG_SIGNATURE) || be32(bytes, 8)? != 13 || bytes.get(12..16)? != b"IHDR" {
        return None;
    }
    let (width, height) = (be32(bytes, 16)?, be32(bytes, 20)?);
    let color_type = *bytes.get(25)?;
    // PNG caps both at 2^31 - 1 and forbids 0.
    if width == 0 || height == 0 || width > i32::MAX as u32 || height > i32::MAX as u32 {
        return None;
    }
    let has_alpha = match color_type {
        4 | 6 => true,
        0 | 2 | 3 => has_trns(bytes),
        _ => return None,
    };
    Some(PngInfo { width, height, has_alpha })
}

/// Whether a `tRNS` chunk comes before `IDAT`, walking chunk headers after `IHDR`.
fn has_trns(bytes: &[u8]) -> bool {
    let mut at: usize = 8 + 8 + 13 + 4; // signature, IHDR's length and type, its data, its CRC
    for _ in 0..MAX_PNG_CHUNKS {
        let Some(len) = be32(bytes, at) else { return false };
        // `at` is within `bytes` here, so `at + 8` cannot overflow.
        match bytes.get(at + 4..at + 8).unwrap_or_default() {
            b"tRNS" => return true,
            b"IDAT" | b"IEND" => return false,
            _ => {}
        }
        // length, type, data, CRC; a length over 2^31 - 1 is not PNG.
        let Some(next) = (len <= i32::MAX as u32).then(|| at.checked_add(12)?.checked_add(len as usize)).flatten()
        else {
            return false;
        };
        at = next;
    }
    false
}

/// Width and height of a PNG (`IHDR`), JPEG (the first frame header, SOF0 to SOF15) or WebP
/// (`VP8 `, `VP8L` or `VP8X`), from headers alone; `None` for anything else, a truncated
/// header, or a zero size.
pub fn dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    let (w, h) = match ImageType::sniff(bytes)? {
        ImageType::Png => png_info(bytes).map(|i| (i.width, i.height))?,
        ImageType::Jpeg => jpeg_dimensions(bytes)?,
        ImageType::Webp => webp_dimensions(bytes)?,
    };
    (w > 0 && h > 0).then_some((w, h))
}

/// How far into an image given as base64 `dimensions_base64` decodes at most: a JPEG's frame
/// header may follow metadata segments of up to 64 KiB each.
const MAX_HEADER_BYTES: usize = 256 * 1024;

/// Width and height of an image given as standard base64, decoding no more of it than its
/// headers need: a PNG's come within 24 bytes, a WebP's within 30, a JPEG's after its metadata.
pub fn dimensions_base64(b64: &[u8]) -> Option<(u32, u32)> {
    let mut want = 64;
    loop {
        let prefix = decode_prefix(b64, want);
        if let Some(d) = dimensions(&prefix) {
            return Some(d);
        }
        // Only a JPEG's header can lie further in; stop at the end of the image or the bound.
        if ImageType::sniff(&prefix) != Some(ImageType::Jpeg) || prefix.len() < want || want >= MAX_HEADER_BYTES {
            return None;
        }
        want = (want * 16).min(MAX_HEADER_BYTES);
    }
}

fn jpeg_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    let mut at: usize = 2; // after SOI
    for _ in 0..MAX_JPEG_SEGMENTS {
        if *bytes.get(at)? != 0xFF {
            return None;
        }
        // Any number of 0xFF fill bytes may come before a marker.
        at += bytes.get(at..)?.iter().take_while(|&&b| b == 0xFF).count();
        let marker = *bytes.get(at)?;
        at += 1;
        match marker {
            // Markers without a length: TEM, RSTn, SOI.
            0x01 | 0xD0..=0xD8 => continue,
            // EOI or SOS before any frame header: none to be found.
            0xD9 | 0xDA => return None,
            // SOF0..SOF15 but DHT (C4), JPG (C8) and DAC (CC): length, precision, height, width.
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                let (h, w) = (be16(bytes, at + 3)?, be16(bytes, at + 5)?);
                return Some((w, h));
            }
            _ => {
                let len = be16(bytes, at)?;
                if len < 2 {
                    return None;
                }
                at = at.checked_add(len as usize)?;
            }
        }
    }
    None
}

fn webp_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    // RIFF, size, WEBP, then the first chunk's type, size and data (at 20).
    match bytes.get(12..16)? {
        b"VP8 " => {
            // A key frame: a 3-byte frame tag, the start code, then 14-bit width and height.
            if bytes.get(23..26)? != [0x9D, 0x01, 0x2A] {
                return None;
            }
            let w = u32::from(u16::from_le_bytes([*bytes.get(26)?, *bytes.get(27)?]) & 0x3FFF);
            let h = u32::from(u16::from_le_bytes([*bytes.get(28)?, *bytes.get(29)?]) & 0x3FFF);
            Some((w, h))
        }
        b"VP8L" => {
            // The signature byte 0x2F, then width - 1 and height - 1 in 14 bits each.
            if *bytes.get(20)? != 0x2F {
                return None;
            }
            let bits = u32::from_le_bytes([*bytes.get(21)?, *bytes.get(22)?, *bytes.get(23)?, *bytes.get(24)?]);
            Some(((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1))
        }
        // Flags and 3 reserved bytes, then canvas width - 1 and height - 1 in 24 bits each.
        b"VP8X" => Some((le24(bytes, 24)? + 1, le24(bytes, 27)? + 1)),
        _ => None,
    }
}

fn sextet(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// Up to `want` bytes decoded from the start of standard base64; stops at padding or at the
/// first byte outside the alphabet.
fn decode_prefix(b64: &[u8], want: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(want + 2);
    for quad in b64.chunks(4) {
        if out.len() >= want {
            break;
        }
        let mut acc: u32 = 0;
        let mut bits = 0;
        for &c in quad {
            let Some(v) = sextet(c) else { break };
            acc = (acc << 6) | u32::from(v);
            bits += 6;
        }
        let bytes = bits / 8;
        acc <<= 24 - bits.min(24);
        for i in 0..bytes {
            out.push((acc >> (16 - 8 * i)) as u8);
        }
        if bytes < 3 {
            break;
        }
    }
    out.truncate(want);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::named::Named;

    #[test]
    fn types_come_from_the_bytes() {
        assert_eq!(ImageType::sniff(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), Some(ImageType::Png));
        assert_eq!(ImageType::sniff(&[0xFF, 0xD8, 0xFF, 0xE0]), Some(ImageType::Jpeg));
        assert_eq!(ImageType::sniff(b"RIFF\x10\0\0\0WEBPVP8 "), Some(ImageType::Webp));
        assert_eq!(ImageType::sniff(b"RIFF\x10\0\0\0WAVE"), None);
        assert_eq!(ImageType::sniff(b"GIF89a"), None);
        assert_eq!(ImageType::sniff(b""), None);
        assert_eq!(ImageType::Jpeg.as_str(), "image/jpeg");
        assert_eq!(ImageType::parse("image/webp"), Some(ImageType::Webp));
    }

    /// A PNG: signature, IHDR (with a dummy CRC), then the given chunks (type, data).
    fn png(width: u32, height: u32, color_type: u8, chunks: &[(&[u8; 4], &[u8])]) -> Vec<u8> {
        let mut b = PNG_SIGNATURE.to_vec();
        let mut ihdr = width.to_be_bytes().to_vec();
        ihdr.extend(height.to_be_bytes());
        ihdr.extend([8, color_type, 0, 0, 0]);
        for (kind, data) in [(b"IHDR", &ihdr[..])].into_iter().chain(chunks.iter().copied()) {
            b.extend((data.len() as u32).to_be_bytes());
            b.extend(kind);
            b.extend(data);
            b.extend([0, 0, 0, 0]);
        }
        b
    }

    #[test]
    fn png_headers_tell_size_and_alpha() {
        let idat: (&[u8; 4], &[u8]) = (b"IDAT", b"x");
        let info = |w, h, alpha| Some(PngInfo { width: w, height: h, has_alpha: alpha });
        assert_eq!(png_info(&png(3, 2, 6, &[idat])), info(3, 2, true), "RGBA");
        assert_eq!(png_info(&png(3, 2, 4, &[])), info(3, 2, true), "grey and alpha");
        assert_eq!(png_info(&png(1024, 768, 2, &[idat])), info(1024, 768, false), "RGB");
        assert_eq!(png_info(&png(1, 1, 0, &[idat])), info(1, 1, false), "grey");
        assert_eq!(png_info(&png(1, 1, 3, &[(b"PLTE", b"abc"), idat])), info(1, 1, false), "palette");
        let trns: (&[u8; 4], &[u8]) = (b"tRNS", b"\0");
        let text: (&[u8; 4], &[u8]) = (b"tEXt", b"Comment\0hi");
        assert_eq!(png_info(&png(1, 1, 3, &[(b"PLTE", b"abc"), text, trns, idat])), info(1, 1, true));
        assert_eq!(png_info(&png(1, 1, 3, &[(b"PLTE", b"abc"), idat, trns])), info(1, 1, false), "tRNS after IDAT");
        assert_eq!(png_info(&png(1, 1, 2, &[trns, idat])), info(1, 1, true), "RGB with a transparent color");
        assert_eq!(png_info(&png(1, 1, 0, &[trns])), info(1, 1, true), "grey with a transparent level");
        // Cut short, or a chunk length that runs off the end: what was seen.
        let whole = png(1, 1, 3, &[(b"PLTE", b"abc"), trns, idat]);
        assert_eq!(png_info(&whole[..33 + 12 + 4]), info(1, 1, false));
        let mut huge = png(1, 1, 3, &[(b"PLTE", b"abc"), trns]);
        huge[33..37].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(png_info(&huge), info(1, 1, false));
        huge[33..37].copy_from_slice(&0x7FFF_FFF0u32.to_be_bytes());
        assert_eq!(png_info(&huge), info(1, 1, false));
        // Not a PNG, or a bad IHDR.
        assert_eq!(png_info(&whole[..25]), None, "IHDR cut short");
        assert_eq!(png_info(&png(1, 1, 5, &[])), None, "no color type 5");
        assert_eq!(png_info(&png(0, 1, 6, &[])), None, "zero width");
        assert_eq!(png_info(&png(1, 0x8000_0000, 6, &[])), None, "over 2^31 - 1");
        let mut bad = png(1, 1, 6, &[]);
        bad[12..16].copy_from_slice(b"IDAT");
        assert_eq!(png_info(&bad), None, "IHDR not first");
        let mut bad = png(1, 1, 6, &[]);
        bad[11] = 12;
        assert_eq!(png_info(&bad), None, "IHDR of the wrong length");
        assert_eq!(png_info(b"\x89PNG\r\n\x1a\n"), None);
        assert_eq!(png_info(b"GIF89a"), None);
        assert_eq!(png_info(b""), None);
        // Many small ancillary chunks: bounded walk.
        let mut chunks: Vec<(&[u8; 4], &[u8])> = [(b"tEXt", &b""[..])].repeat(MAX_PNG_CHUNKS + 1);
        chunks.push(trns);
        assert_eq!(png_info(&png(1, 1, 3, &chunks)), info(1, 1, false));
        assert_eq!(dimensions(&png(640, 480, 2, &[idat])), Some((640, 480)));
    }

    #[test]
    fn jpeg_frame_headers_tell_size() {
        // SOI, APP0 (JFIF), DQT, then SOF0 (length 17, 8 bits, height 480, width 640, 3 components).
        let mut j = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10];
        j.extend(b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0");
        j.extend([0xFF, 0xDB, 0x00, 0x04, 0x00, 0x01]);
        let sof = [0xFF, 0xC0, 0x00, 0x11, 0x08, 0x01, 0xE0, 0x02, 0x80, 0x03];
        let mut full = j.clone();
        full.extend(sof);
        full.extend([1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
        assert_eq!(dimensions(&full), Some((640, 480)));
        // Progressive (SOF2), after a DHT (C4, not a frame), with fill bytes before the marker.
        let mut p = j.clone();
        p.extend([0xFF, 0xC4, 0x00, 0x03, 0x00]);
        p.extend([0xFF, 0xFF, 0xFF, 0xC2, 0x00, 0x11, 0x08, 0x00, 0x10, 0x00, 0x20]);
        assert_eq!(dimensions(&p), Some((32, 16)));
        // DAC (CC) and JPG (C8) are not frames either; a restart marker has no length.
        let mut d = j.clone();
        d.extend([0xFF, 0xCC, 0x00, 0x04, 0x00, 0x00, 0xFF, 0xC8, 0x00, 0x02, 0xFF, 0xD0]);
        d.extend([0xFF, 0xC1, 0x00, 0x11, 0x08, 0x00, 0x02, 0x00, 0x03]);
        assert_eq!(dimensions(&d), Some((3, 2)));
        // Truncated or garbage.
        for cut in [3, 7, j.len(), j.len() + 6, j.len() + 8] {
            assert_eq!(dimensions(&full[..cut]), None, "cut at {cut}");
        }
        let mut sos_first = j.clone();
        sos_first.extend([0xFF, 0xDA, 0x00, 0x02]);
        sos_first.extend(sof);
        assert_eq!(dimensions(&sos_first), None, "scan data before a frame header");
        let mut not_marker = j.clone();
        not_marker.extend([0x00, 0xC0]);
        assert_eq!(dimensions(&not_marker), None);
        let mut short_len = j.clone();
        short_len.extend([0xFF, 0xE1, 0x00, 0x01]);
        assert_eq!(dimensions(&short_len), None);
        let mut zero = j.clone();
        zero.extend([0xFF, 0xC0, 0x00, 0x11, 0x08, 0x00, 0x00, 0x02, 0x80]);
        assert_eq!(dimensions(&zero), None, "height 0 (defined later by DNL)");
        let mut endless = vec![0xFF, 0xD8];
        endless.extend([0xFF, 0xD0].repeat(MAX_JPEG_SEGMENTS + 1));
        endless.extend(sof);
        assert_eq!(dimensions(&endless), None, "bounded walk");
        assert_eq!(dimensions(&[0xFF, 0xD8, 0xFF]), None);
        assert_eq!(dimensions(&[0xFF; 64]), None);
    }

    #[test]
    fn dimensions_come_from_base64_decoding_only_the_headers() {
        let b64 = |bytes: &[u8]| {
            let mut out = Vec::new();
            crate::base64::encode_into(&mut out, bytes);
            out
        };
        let mut p = png(1024, 768, 2, &[(b"IDAT", &[7; 5000])]);
        assert_eq!(dimensions_base64(&b64(&p)), Some((1024, 768)));
        p.truncate(20);
        assert_eq!(dimensions_base64(&b64(&p)), None, "IHDR cut off");
        // A JPEG whose frame header follows a 60 KB metadata segment.
        let mut j = vec![0xFF, 0xD8, 0xFF, 0xE1, 0xEA, 0x62];
        j.extend(vec![0u8; 0xEA60]);
        j.extend([0xFF, 0xC0, 0x00, 0x11, 0x08, 0x03, 0x00, 0x04, 0x00, 0x03]);
        j.extend([0u8; 100]);
        assert_eq!(dimensions_base64(&b64(&j)), Some((1024, 768)));
        assert_eq!(dimensions_base64(b"not base64 at all"), None);
        assert_eq!(dimensions_base64(b""), None);
    }

    #[test]
    fn webp_headers_tell_size() {
        let riff = |chunk: &[u8; 4], data: &[u8]| {
            let mut b = b"RIFF\0\0\0\0WEBP".to_vec();
            b.extend(chunk);
            b.extend((data.len() as u32).to_le_bytes());
            b.extend(data);
            b
        };
        // Lossy: frame tag, start code, 14-bit width and height (the top two bits are scale).
        let vp8 = riff(b"VP8 ", &[0x30, 0x01, 0x00, 0x9D, 0x01, 0x2A, 0x80, 0x42, 0x68, 0xC1]);
        assert_eq!(dimensions(&vp8), Some((640, 360)));
        let mut bad = vp8.clone();
        bad[24] = 0x00;
        assert_eq!(dimensions(&bad), None, "no start code");
        // Lossless: 0x2F, then (width - 1) | (height - 1) << 14.
        let bits: u32 = (400 - 1) | ((300 - 1) << 14);
        let mut l = vec![0x2F];
        l.extend(bits.to_le_bytes());
        let vp8l = riff(b"VP8L", &l);
        assert_eq!(dimensions(&vp8l), Some((400, 300)));
        let mut bad = vp8l.clone();
        bad[20] = 0x2E;
        assert_eq!(dimensions(&bad), None, "no signature byte");
        // Extended: flags, reserved, canvas width - 1 and height - 1 in 24 bits.
        let vp8x = riff(b"VP8X", &[0x10, 0, 0, 0, 0xFF, 0x0F, 0x00, 0x37, 0x08, 0x00]);
        assert_eq!(dimensions(&vp8x), Some((4096, 2104)));
        for data in [&vp8, &vp8l, &vp8x] {
            for cut in 12..data.len() {
                assert_eq!(dimensions(&data[..cut]), None, "cut at {cut}");
            }
        }
        assert_eq!(dimensions(&riff(b"ALPH", &[0; 10])), None);
        assert_eq!(dimensions(b"RIFF\0\0\0\0WEBP"), None);
        assert_eq!(dimensions(b"GIF89a\x01\0\x01\0"), None);
        assert_eq!(dimensions(b""), None);
    }

    #[test]
    fn base64_prefixes_decode() {
        // "\x89PNG\r\n\x1a\n" and then some.
        assert_eq!(ImageType::sniff_base64(b"iVBORw0KGgoAAAANSUhEUgAA"), Some(ImageType::Png));
        assert_eq!(ImageType::sniff_base64(b"/9j/4AAQSkZJRgABAQ=="), Some(ImageType::Jpeg));
        assert_eq!(ImageType::sniff_base64(b"UklGRiQAAABXRUJQVlA4IA=="), Some(ImageType::Webp));
        assert_eq!(ImageType::sniff_base64(b"QUFB"), None);
        assert_eq!(ImageType::sniff_base64(b"iVBO\"w0KGgo"), None, "stops at a byte outside the alphabet");
        assert_eq!(decode_prefix(b"QUJDRA==", 12), b"ABCD");
        assert_eq!(decode_prefix(b"QUJDREVG", 4), b"ABCD");
    }
}
