//! Model names: families (`gemini-3-pro-image`, `gemini-2.5-flash-image`, and any a platform
//! configures), their variants, and configured aliases (docs/configuration.md, `models`).
//!
//! A variant is the family name, then an optional resolution suffix (`-2k`, `-4k`: one for
//! each image size the family makes other than 1K), then an optional ratio suffix (`-1x1`,
//! `-4x3`, `-3x4`, `-16x9`, `-9x16`, `-21x9`).

use crate::geometry::{AspectRatio, ImageSize};

/// The model a request names when it names none.
pub const DEFAULT_MODEL: &str = "gemini-3-pro-image";

/// The ratio suffixes every family takes, in the order names are listed.
const RATIO_SUFFIXES: [&str; 6] = ["1x1", "4x3", "3x4", "16x9", "9x16", "21x9"];

/// One Google image model as the gateway offers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Family {
    pub name: String,
    /// The model id in Gemini's path.
    pub upstream: String,
    /// The image sizes it makes; empty: one fixed size, and no `imageSize` is sent.
    pub image_sizes: Vec<ImageSize>,
    /// How many input images an edit may send.
    pub max_input_images: u32,
}

impl Family {
    /// The built-in families, with their defaults.
    pub fn defaults() -> Vec<Family> {
        vec![
            Family {
                name: "gemini-3-pro-image".into(),
                upstream: "gemini-3-pro-image-preview".into(),
                image_sizes: vec![ImageSize::K1, ImageSize::K2, ImageSize::K4],
                max_input_images: 14,
            },
            Family {
                name: "gemini-2.5-flash-image".into(),
                upstream: "gemini-2.5-flash-image".into(),
                image_sizes: Vec::new(),
                max_input_images: 3,
            },
        ]
    }

    /// Whether the family makes images of several sizes (and so is sent `imageSize`).
    pub fn sized(&self) -> bool {
        !self.image_sizes.is_empty()
    }

    /// The sizes a resolution suffix may name: every size but 1K, the default.
    fn suffix_sizes(&self) -> impl Iterator<Item = ImageSize> + '_ {
        self.image_sizes.iter().copied().filter(|s| *s != ImageSize::K1)
    }
}

/// A parsed model variant: which family, and the size and ratio its suffixes name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ModelVariant {
    /// Index into `Families`.
    pub family: usize,
    pub image_size: Option<ImageSize>,
    pub ratio: Option<AspectRatio>,
}

/// The configured families; the first is the default model's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Families(pub Vec<Family>);

impl Families {
    pub fn get(&self, v: ModelVariant) -> Option<&Family> {
        self.0.get(v.family)
    }

    /// Parses `{family}[-{size}][-{ratio}]`. The longest family name that matches wins, so a
    /// family may be named after another plus a suffix.
    pub fn parse(&self, name: &str) -> Option<ModelVariant> {
        let mut best: Option<ModelVariant> = None;
        let mut best_len = 0;
        for (index, family) in self.0.iter().enumerate() {
            let Some(rest) = name.strip_prefix(family.name.as_str()) else { continue };
            if family.name.len() < best_len {
                continue;
            }
            if let Some(v) = parse_suffixes(index, family, rest) {
                best = Some(v);
                best_len = family.name.len();
            }
        }
        best
    }

    /// The variant's canonical name, the one logs and metrics carry.
    pub fn name(&self, v: ModelVariant) -> String {
        let Some(family) = self.get(v) else { return String::new() };
        let mut s = family.name.clone();
        if let Some(size) = v.image_size.filter(|s| *s != ImageSize::K1) {
            s.push('-');
            s.push_str(&size.as_str().to_ascii_lowercase());
        }
        if let Some(r) = v.ratio {
            let (w, h) = r.terms();
            s.push_str(&format!("-{w}x{h}"));
        }
        s
    }

    /// Every variant name: for each family, each resolution suffix (and none) by each ratio
    /// suffix (and none).
    pub fn all_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for family in &self.0 {
            let sizes: Vec<Option<String>> = std::iter::once(None)
                .chain(family.suffix_sizes().map(|s| Some(s.as_str().to_ascii_lowercase())))
                .collect();
            for size in &sizes {
                for ratio in std::iter::once(None).chain(RATIO_SUFFIXES.iter().map(|r| Some(*r))) {
                    let mut name = family.name.clone();
                    for part in [size.as_deref(), ratio].into_iter().flatten() {
                        name.push('-');
                        name.push_str(part);
                    }
                    out.push(name);
                }
            }
        }
        out
    }

    /// The family names, for messages.
    pub fn names(&self) -> String {
        self.0.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", ")
    }
}

fn parse_suffixes(family_index: usize, family: &Family, rest: &str) -> Option<ModelVariant> {
    let mut variant = ModelVariant { family: family_index, image_size: None, ratio: None };
    if rest.is_empty() {
        return Some(variant);
    }
    let mut parts = rest.strip_prefix('-')?.split('-');
    let mut next = parts.next();
    if let Some(res) = next {
        if let Some(size) = family.suffix_sizes().find(|s| s.as_str().eq_ignore_ascii_case(res) && res.ends_with('k')) {
            variant.image_size = Some(size);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn families() -> Families {
        Families(Family::defaults())
    }

    #[test]
    fn twenty_one_pro_and_seven_flash_names_parse_and_print_back() {
        let f = families();
        let names = f.all_names();
        assert_eq!(names.iter().filter(|n| n.starts_with("gemini-3-pro-image")).count(), 21);
        assert_eq!(names.iter().filter(|n| n.starts_with("gemini-2.5-flash-image")).count(), 7);
        for n in &names {
            let v = f.parse(n).unwrap_or_else(|| panic!("{n} should parse"));
            assert_eq!(f.parse(&f.name(v)), Some(v), "{n}");
        }
    }

    #[test]
    fn suffixes_map_to_size_and_ratio() {
        let f = families();
        let v = |family, image_size, ratio| Some(ModelVariant { family, image_size, ratio });
        assert_eq!(f.parse("gemini-3-pro-image-4k-16x9"), v(0, Some(ImageSize::K4), Some(AspectRatio::R16x9)));
        assert_eq!(f.parse("gemini-3-pro-image-21x9"), v(0, None, Some(AspectRatio::R21x9)));
        assert_eq!(f.parse("gemini-3-pro-image-2k"), v(0, Some(ImageSize::K2), None));
        assert_eq!(f.parse("gemini-3-pro-image"), v(0, None, None));
        assert_eq!(f.parse("gemini-2.5-flash-image-9x16"), v(1, None, Some(AspectRatio::R9x16)));
        assert_eq!(
            f.name(ModelVariant { family: 1, image_size: None, ratio: Some(AspectRatio::R4x3) }),
            "gemini-2.5-flash-image-4x3"
        );
    }

    #[test]
    fn other_names_do_not_parse() {
        let f = families();
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
            "gemini-2.5-flash-image-2k",
            "gemini-2.5-flash-image-4k-16x9",
            "dall-e-3",
            "",
        ] {
            assert_eq!(f.parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_configured_family_gets_its_own_variants() {
        let mut list = Family::defaults();
        list.push(Family {
            name: "gemini-3-pro-image-turbo".into(),
            upstream: "gemini-3-pro-image-turbo-001".into(),
            image_sizes: vec![ImageSize::K1, ImageSize::K2],
            max_input_images: 5,
        });
        let f = Families(list);
        assert_eq!(f.parse("gemini-3-pro-image-turbo-2k").map(|v| v.family), Some(2), "the longest family name wins");
        assert_eq!(f.parse("gemini-3-pro-image-turbo-4k"), None, "it does not make 4K");
        assert_eq!(f.all_names().iter().filter(|n| n.starts_with("gemini-3-pro-image-turbo")).count(), 14);
    }
}
