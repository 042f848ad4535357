//! Small, real PNG files: a solid colour at the requested dimensions, optionally padded with a
//! private ancillary chunk to reach an exact byte size (for benchmarks).

use std::io::Write;

use flate2::write::ZlibEncoder;
use flate2::Compression;

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.finalize().to_be_bytes());
}

/// A `width` x `height` RGB PNG of one colour. The first row is written with filter None, the
/// others with filter Up (all zeros), so even 6336x2688 compresses fast and small.
pub fn solid(width: u32, height: u32, rgb: [u8; 3]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"\x89PNG\r\n\x1a\n");
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, RGB, deflate, adaptive filter, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    let row_len = 1 + width as usize * 3;
    let mut first = Vec::with_capacity(row_len);
    first.push(0);
    for _ in 0..width {
        first.extend_from_slice(&rgb);
    }
    let mut rest = vec![0u8; row_len];
    rest[0] = 2;
    let mut z = ZlibEncoder::new(Vec::new(), Compression::fast());
    let _ = z.write_all(&first);
    for _ in 1..height {
        let _ = z.write_all(&rest);
    }
    let data = z.finish().unwrap_or_default();
    chunk(&mut out, b"IDAT", &data);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// Pads a PNG to `total` bytes with a private chunk before IEND (if it is not already larger).
pub fn pad_to(png: &[u8], total: usize) -> Vec<u8> {
    const IEND_LEN: usize = 12;
    if png.len() + 12 >= total || png.len() < IEND_LEN {
        return png.to_vec();
    }
    let fill = total - png.len() - 12;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&png[..png.len() - IEND_LEN]);
    // Pseudo-random filler so that nothing along the way can compress it away.
    let mut x: u32 = 0x9e37_79b9;
    let filler: Vec<u8> = (0..fill)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    chunk(&mut out, b"fkPd", &filler);
    out.extend_from_slice(&png[png.len() - IEND_LEN..]);
    out
}

/// Width and height from a PNG's IHDR.
#[cfg(test)]
pub fn dimensions(png: &[u8]) -> Option<(u32, u32)> {
    if png.len() < 24 || &png[..8] != b"\x89PNG\r\n\x1a\n" || &png[12..16] != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes(png[16..20].try_into().ok()?);
    let h = u32::from_be_bytes(png[20..24].try_into().ok()?);
    Some((w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solid_png_has_the_dimensions_asked() {
        let p = solid(1376, 768, [10, 20, 30]);
        assert_eq!(dimensions(&p), Some((1376, 768)));
        let padded = pad_to(&p, 2 * 1024 * 1024);
        assert_eq!(padded.len(), 2 * 1024 * 1024);
        assert_eq!(dimensions(&padded), Some((1376, 768)));
        assert!(padded.ends_with(&p[p.len() - 12..]));
    }
}
