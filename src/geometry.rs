//! Aspect ratios and image sizes: the two knobs Gemini's `imageConfig` takes.
//! One place parses them, one place prints them.

use crate::named::{named, Named};

/// The aspect ratios Gemini 3 Pro Image accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AspectRatio {
    R1x1,
    R2x3,
    R3x2,
    R3x4,
    R4x3,
    R4x5,
    R5x4,
    R9x16,
    R16x9,
    R21x9,
}

// The wire form Gemini takes, e.g. `16:9`.
named!(AspectRatio {
    R1x1 => "1:1",
    R2x3 => "2:3",
    R3x2 => "3:2",
    R3x4 => "3:4",
    R4x3 => "4:3",
    R4x5 => "4:5",
    R5x4 => "5:4",
    R9x16 => "9:16",
    R16x9 => "16:9",
    R21x9 => "21:9",
});

impl AspectRatio {
    /// Width and height terms of the ratio.
    pub fn terms(self) -> (u32, u32) {
        match self {
            AspectRatio::R1x1 => (1, 1),
            AspectRatio::R2x3 => (2, 3),
            AspectRatio::R3x2 => (3, 2),
            AspectRatio::R3x4 => (3, 4),
            AspectRatio::R4x3 => (4, 3),
            AspectRatio::R4x5 => (4, 5),
            AspectRatio::R5x4 => (5, 4),
            AspectRatio::R9x16 => (9, 16),
            AspectRatio::R16x9 => (16, 9),
            AspectRatio::R21x9 => (21, 9),
        }
    }

    /// Exactly one of the supported ratios, written `W:H`.
    pub fn parse_exact(s: &str) -> Option<AspectRatio> {
        Self::parse(s.trim())
    }

    /// The supported ratio nearest to `w/h`, if it lies within 5% of it.
    pub fn nearest(w: u64, h: u64) -> Option<AspectRatio> {
        if w == 0 || h == 0 {
            return None;
        }
        let want = w as f64 / h as f64;
        let mut best: Option<(AspectRatio, f64)> = None;
        for &r in Self::ALL {
            let (rw, rh) = r.terms();
            let off = (want / (rw as f64 / rh as f64) - 1.0).abs();
            if best.is_none_or(|(_, b)| off < b) {
                best = Some((r, off));
            }
        }
        match best {
            Some((r, off)) if off <= 0.05 => Some(r),
            _ => None,
        }
    }

    /// The OpenAI `size` field: `WxH` or `W:H`, positive integers, near a supported ratio.
    /// `auto` is handled by the caller (it means no size).
    pub fn from_size(s: &str) -> Option<AspectRatio> {
        let (w, h) = s.split_once(['x', 'X', ':'])?;
        let w = parse_positive(w)?;
        let h = parse_positive(h)?;
        Self::nearest(w, h)
    }

    /// The ratio suffix of a model variant, e.g. `16x9`.
    pub fn from_model_suffix(s: &str) -> Option<AspectRatio> {
        match s {
            "1x1" => Some(AspectRatio::R1x1),
            "4x3" => Some(AspectRatio::R4x3),
            "3x4" => Some(AspectRatio::R3x4),
            "16x9" => Some(AspectRatio::R16x9),
            "9x16" => Some(AspectRatio::R9x16),
            "21x9" => Some(AspectRatio::R21x9),
            _ => None,
        }
    }
}

fn parse_positive(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() || s.len() > 9 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u64>().ok().filter(|v| *v > 0)
}

/// Gemini's `imageSize`: 1K, 2K or 4K.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ImageSize {
    K1,
    K2,
    K4,
}

named!(ImageSize { K1 => "1K", K2 => "2K", K4 => "4K" });

/// The OpenAI `quality` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Quality {
    Auto,
    Standard,
    Low,
    Medium,
    High,
    Hd,
}

named!(Quality {
    Auto => "auto",
    Standard => "standard",
    Low => "low",
    Medium => "medium",
    High => "high",
    Hd => "hd",
});

impl Quality {
    /// The image size this quality asks for; `auto` leaves it to the model suffix.
    pub fn image_size(self) -> Option<ImageSize> {
        match self {
            Quality::Auto => None,
            Quality::Standard | Quality::Low => Some(ImageSize::K1),
            Quality::Medium => Some(ImageSize::K2),
            Quality::High | Quality::Hd => Some(ImageSize::K4),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_sizes_map_to_their_ratios() {
        let cases = [
            ("1792x1024", Some(AspectRatio::R16x9)),
            ("1024x1792", Some(AspectRatio::R9x16)),
            ("1536x1024", Some(AspectRatio::R3x2)),
            ("1024x1536", Some(AspectRatio::R2x3)),
            ("256x256", Some(AspectRatio::R1x1)),
            ("512x512", Some(AspectRatio::R1x1)),
            ("1024x1024", Some(AspectRatio::R1x1)),
            ("16:9", Some(AspectRatio::R16x9)),
            ("21:9", Some(AspectRatio::R21x9)),
            ("2520x1080", Some(AspectRatio::R21x9)),
            ("1000x800", Some(AspectRatio::R5x4)),
            ("3000x1000", None),
            ("100x1000", None),
            ("0x100", None),
            ("-5x10", None),
            ("10x", None),
            ("x10", None),
            ("abc", None),
            ("1024*1024", None),
            ("1.5x1", None),
            ("99999999999999999999x1", None),
        ];
        for (size, want) in cases {
            assert_eq!(AspectRatio::from_size(size), want, "size {size}");
        }
    }

    #[test]
    fn five_percent_is_the_edge() {
        // 16:9 = 1.7778; 5% above is 1.8667, 5% below 1.6889.
        assert_eq!(AspectRatio::nearest(1860, 1000), Some(AspectRatio::R16x9));
        // 1.95 is 9.7% from 16:9 and 16.4% from 21:9: rejected.
        assert_eq!(AspectRatio::nearest(1950, 1000), None);
    }

    #[test]
    fn exact_ratio_parsing_round_trips() {
        for &r in AspectRatio::ALL {
            assert_eq!(AspectRatio::parse_exact(r.as_str()), Some(r));
        }
        assert_eq!(AspectRatio::parse_exact("16x9"), None);
        assert_eq!(AspectRatio::parse_exact("7:3"), None);
    }

    #[test]
    fn image_sizes_parse_in_any_case() {
        assert_eq!(ImageSize::parse_any_case("4k"), Some(ImageSize::K4));
        assert_eq!(ImageSize::parse_any_case("2K"), Some(ImageSize::K2));
        assert_eq!(ImageSize::parse_any_case("1k"), Some(ImageSize::K1));
        assert_eq!(ImageSize::parse_any_case("8K"), None);
        assert_eq!(ImageSize::parse_any_case(""), None);
    }

    #[test]
    fn quality_maps_to_image_size() {
        assert_eq!(Quality::parse("standard").and_then(Quality::image_size), Some(ImageSize::K1));
        assert_eq!(Quality::parse("low").and_then(Quality::image_size), Some(ImageSize::K1));
        assert_eq!(Quality::parse("medium").and_then(Quality::image_size), Some(ImageSize::K2));
        assert_eq!(Quality::parse("high").and_then(Quality::image_size), Some(ImageSize::K4));
        assert_eq!(Quality::parse("hd").and_then(Quality::image_size), Some(ImageSize::K4));
        assert_eq!(Quality::parse("auto").and_then(Quality::image_size), None);
        assert_eq!(Quality::parse("HD"), None);
    }
}
