//! Model names: `gemini-3-pro-image`, its 21 variants, and configured aliases.

use crate::geometry::{AspectRatio, ImageSize};

pub const BASE_MODEL: &str = "gemini-3-pro-image";

/// A parsed model variant: an optional resolution suffix, then an optional ratio suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ModelVariant {
    pub image_size: Option<ImageSize>,
    pub ratio: Option<AspectRatio>,
}

impl ModelVariant {
    /// Parses `gemini-3-pro-image[-2k|-4k][-1x1|-4x3|-3x4|-16x9|-9x16|-21x9]`.
    pub fn parse(name: &str) -> Option<ModelVariant> {
        let rest = name.strip_prefix(BASE_MODEL)?;
        let mut variant = ModelVariant { image_size: None, ratio: None };
        let mut parts = rest.split('-');
        if parts.next() != Some("") {
            return None; // something glued onto the base name
        }
        let mut next = parts.next();
        if let Some(res) = next {
            let size = match res {
                "2k" => Some(ImageSize::K2),
                "4k" => Some(ImageSize::K4),
                _ => None,
            };
            if size.is_some() {
                variant.image_size = size;
                next = parts.next();
            }
        }
        if let Some(ratio) = next {
            variant.ratio = Some(AspectRatio::from_model_suffix(ratio)?);
            next = parts.next();
        }
        if next.is_some() {
            return None;
        }
        Some(variant)
    }

    /// The variant's canonical name, the one logs carry.
    pub fn name(&self) -> String {
        let mut s = String::from(BASE_MODEL);
        match self.image_size {
            Some(ImageSize::K2) => s.push_str("-2k"),
            Some(ImageSize::K4) => s.push_str("-4k"),
            _ => {}
        }
        if let Some(r) = self.ratio {
            let (w, h) = r.terms();
            s.push_str(&format!("-{w}x{h}"));
        }
        s
    }

    /// Every model name docs/configuration.md lists: the 21 variants (3 resolutions x 7 ratio choices, the base name among them).
    pub fn all_names() -> Vec<String> {
        let sizes = [None, Some("2k"), Some("4k")];
        let ratios = [None, Some("1x1"), Some("4x3"), Some("3x4"), Some("16x9"), Some("9x16"), Some("21x9")];
        let mut out = Vec::new();
        for s in sizes {
            for r in ratios {
                let mut name = BASE_MODEL.to_string();
                for part in [s, r].into_iter().flatten() {
                    name.push('-');
                    name.push_str(part);
                }
                out.push(name);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_twenty_one_names_parse() {
        let names = ModelVariant::all_names();
        assert_eq!(names.len(), 21, "the base name and its suffixed forms");
        for n in &names {
            let v = ModelVariant::parse(n).unwrap_or_else(|| panic!("{n} should parse"));
            // A ratio suffix of 1x1 is the same variant as none, so compare the parse.
            assert_eq!(ModelVariant::parse(&v.name()), Some(v), "{n}");
        }
    }

    #[test]
    fn suffixes_map_to_size_and_ratio() {
        assert_eq!(
            ModelVariant::parse("gemini-3-pro-image-4k-16x9"),
            Some(ModelVariant { image_size: Some(ImageSize::K4), ratio: Some(AspectRatio::R16x9) })
        );
        assert_eq!(
            ModelVariant::parse("gemini-3-pro-image-21x9"),
            Some(ModelVariant { image_size: None, ratio: Some(AspectRatio::R21x9) })
        );
        assert_eq!(
            ModelVariant::parse("gemini-3-pro-image-2k"),
            Some(ModelVariant { image_size: Some(ImageSize::K2), ratio: None })
        );
        assert_eq!(ModelVariant::parse("gemini-3-pro-image"), Some(ModelVariant { image_size: None, ratio: None }));
    }

    #[test]
    fn other_names_do_not_parse() {
        for bad in [
            "gemini-3-pro-image-",
            "gemini-3-pro-image-1k",
            "gemini-3-pro-image-16x9-4k",
            "gemini-3-pro-image-4k-4k",
            "gemini-3-pro-image-2x3",
            "gemini-3-pro-imagex",
            "gemini-3-pro-image-preview",
            "gemini-3-pro-image-4k-16x9-x",
            "GEMINI-3-PRO-IMAGE",
            "dall-e-3",
            "",
        ] {
            assert_eq!(ModelVariant::parse(bad), None, "{bad}");
        }
    }
}
