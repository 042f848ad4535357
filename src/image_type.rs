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
        } else if bytes.len() >= 12 && bytes.starts_with(b"RIFF") && &bytes[8..12] == b"WEBP" {
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
