//! Policy profiles and what answers cost (contract section 15, docs/policy.md).
//!
//! A profile is resolved at configure time into a whole `Settings` of its own (its safety,
//! limits and cache over the top level's), so the request path only looks a name up. This
//! module holds what a profile adds beyond those settings (allowed models and endpoints, its
//! images-per-minute bucket, its cache mode), where the name in force comes from, and the
//! price table.

use crate::endpoint::Endpoint;
use crate::geometry::ImageSize;
use crate::named::{named, Named};

/// The profile in force when nothing names one.
pub const DEFAULT_PROFILE: &str = "default";

/// The route metadata that names a profile: `filter_metadata.gemini_image.profile`. Envoy
/// calls the route's metadata `route_metadata` (a wasm attribute) and, in newer versions, also
/// `xds.route_metadata`; the first is read, the second when the first says nothing.
pub const ROUTE_PROFILE_PATHS: [&[&str]; 2] = [
    &["route_metadata", "filter_metadata", "gemini_image", "profile"],
    &["xds", "route_metadata", "filter_metadata", "gemini_image", "profile"],
];

/// The longest profile name (it goes into metric names and log lines).
pub const MAX_PROFILE_NAME: usize = 64;

/// How a profile uses the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CacheMode {
    /// One cache for every profile that shares it.
    Shared,
    /// The profile's name is part of the cache key: nobody outside it gets its images.
    Private,
    /// Neither tier is read or written.
    Off,
}

named!(CacheMode { Shared => "shared", Private => "private", Off => "off" });

/// What a profile allows beyond the settings it overrides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    /// Model names, family names and aliases it may use; `None`: every model.
    pub models: Option<Vec<String>>,
    /// The model a request that names none gets: the gateway's default when allowed, else the
    /// first allowed one.
    pub default_model: Option<String>,
    /// The endpoints it may use.
    pub endpoints: Vec<Endpoint>,
    /// Images per minute on this Envoy, all workers together; `None`: no bound.
    pub images_per_minute: Option<u32>,
    pub cache: CacheMode,
    /// Its own in-flight bounds within each worker (requests, bytes), when it sets them.
    pub inflight: Option<(u32, u64)>,
}

impl Profile {
    /// A profile that overrides nothing.
    pub fn open(name: &str) -> Profile {
        Profile {
            name: name.to_string(),
            models: None,
            default_model: None,
            endpoints: Endpoint::ALL.to_vec(),
            images_per_minute: None,
            cache: CacheMode::Shared,
            inflight: None,
        }
    }

    /// Whether a request that asked for `asked` (resolved to `family`) may be served.
    pub fn allows_model(&self, asked: &str, family: &str) -> bool {
        match &self.models {
            None => true,
            Some(list) => list.iter().any(|m| m == asked || m == family),
        }
    }

    pub fn allows(&self, endpoint: Endpoint) -> bool {
        self.endpoints.contains(&endpoint)
    }

    /// The shared-data key of this profile's images-per-minute bucket.
    pub fn bucket_key(&self) -> String {
        format!("gemini_image.rate.{}", self.name)
    }
}

/// Whether `name` may name a profile: letters, digits, `-` and `_`, 1 to 64 of them.
pub fn valid_profile_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_PROFILE_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Where the name of the profile in force was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileOrigin {
    /// Dynamic metadata set by a filter earlier in the chain (`profile_from.metadata`).
    Metadata,
    Route,
    Default,
}

/// The profile name in force, from what the host read: the dynamic metadata value (when
/// `profile_from` is configured) beats the route's. A value that is not a readable string is
/// taken as given (and then names no profile): a platform that set something there meant a
/// profile, and falling back to another one would be a silent widening.
pub fn profile_name(dynamic: Option<Vec<u8>>, route: Option<Vec<u8>>) -> (String, ProfileOrigin) {
    let text = |v: Vec<u8>| String::from_utf8_lossy(&v).chars().take(MAX_PROFILE_NAME + 1).collect::<String>();
    match (dynamic.filter(|v| !v.is_empty()), route.filter(|v| !v.is_empty())) {
        (Some(v), _) => (text(v), ProfileOrigin::Metadata),
        (None, Some(v)) => (text(v), ProfileOrigin::Route),
        (None, None) => (DEFAULT_PROFILE.to_string(), ProfileOrigin::Default),
    }
}

/// Prices per generated image, in micro-dollars, by family and image size.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pricing(pub Vec<(String, ImageSize, u64)>);

impl Pricing {
    /// Google's list prices (November 2026) for the built-in families: what `pricing` is when
    /// the configuration leaves it out.
    pub fn list_prices() -> Pricing {
        Pricing(vec![
            ("gemini-3-pro-image".into(), ImageSize::K1, 134_000),
            ("gemini-3-pro-image".into(), ImageSize::K2, 134_000),
            ("gemini-3-pro-image".into(), ImageSize::K4, 240_000),
            ("gemini-2.5-flash-image".into(), ImageSize::K1, 39_000),
        ])
    }

    /// The price of one image of `family` at `size` (no size sent: Gemini's default, 1K);
    /// 0 when the table has none.
    pub fn per_image(&self, family: &str, size: Option<ImageSize>) -> u64 {
        let size = size.unwrap_or(ImageSize::K1);
        self.0.iter().find(|(f, s, _)| f == family && *s == size).map_or(0, |(_, _, p)| *p)
    }
}

/// Dollars from micro-dollars, as the `x-image-cost-usd` header and the log carry them:
/// `0`, `0.134`, `1.5`, never an exponent.
pub fn usd(micro: u64) -> String {
    let (whole, frac) = (micro / 1_000_000, micro % 1_000_000);
    if frac == 0 {
        return whole.to_string();
    }
    let digits = format!("{frac:06}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// Dollars as a JSON number from a configured price: micro-dollars, rounded to the nearest.
pub fn micro_usd(dollars: f64) -> Option<u64> {
    if !dollars.is_finite() || !(0.0..=1000.0).contains(&dollars) {
        return None;
    }
    Some((dollars * 1_000_000.0).round() as u64)
}

/// A profile's images-per-minute bucket as kept in shared data: thousandths of an image left,
/// and when that was so. It holds `per_minute` images and refills at `per_minute` a minute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    pub milli_images: u64,
    pub at_ms: u64,
}

impl Bucket {
    pub fn encode(&self) -> Vec<u8> {
        format!("{}:{}", self.milli_images, self.at_ms).into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Option<Bucket> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (milli, at) = text.split_once(':')?;
        Some(Bucket { milli_images: milli.parse().ok()?, at_ms: at.parse().ok()? })
    }

    /// Takes `n` images from the bucket as it stood (`None`: never used, so full): the bucket
    /// after, or the seconds until there will be room. A request for more images than the
    /// bucket holds takes a full bucket.
    pub fn take(stored: Option<Bucket>, per_minute: u32, n: u32, now_ms: u64) -> Result<Bucket, u64> {
        let capacity = u64::from(per_minute).saturating_mul(1000);
        let level = match stored {
            None => capacity,
            Some(b) => {
                // milli-images gained: elapsed_ms * per_minute * 1000 / 60_000
                let gained = now_ms.saturating_sub(b.at_ms).saturating_mul(u64::from(per_minute)) / 60;
                b.milli_images.min(capacity).saturating_add(gained).min(capacity)
            }
        };
        let need = u64::from(n.min(per_minute)).saturating_mul(1000);
        if level >= need {
            return Ok(Bucket { milli_images: level - need, at_ms: now_ms });
        }
        // ms until the missing milli-images have come back: missing * 60 / per_minute
        let wait_ms = (need - level).saturating_mul(60) / u64::from(per_minute.max(1));
        Err(wait_ms.div_ceil(1000).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_print_without_noise() {
        assert_eq!(usd(0), "0");
        assert_eq!(usd(134_000), "0.134");
        assert_eq!(usd(268_000), "0.268");
        assert_eq!(usd(1_500_000), "1.5");
        assert_eq!(usd(2_000_000), "2");
        assert_eq!(usd(1), "0.000001");
        assert_eq!(micro_usd(0.134), Some(134_000));
        assert_eq!(micro_usd(0.039), Some(39_000));
        assert_eq!(micro_usd(-1.0), None);
        assert_eq!(micro_usd(f64::NAN), None);
    }

    #[test]
    fn prices_are_looked_up_by_family_and_size() {
        let p = Pricing::list_prices();
        assert_eq!(p.per_image("gemini-3-pro-image", None), 134_000);
        assert_eq!(p.per_image("gemini-3-pro-image", Some(ImageSize::K4)), 240_000);
        assert_eq!(p.per_image("gemini-2.5-flash-image", None), 39_000);
        assert_eq!(p.per_image("gemini-4-image", None), 0);
    }

    #[test]
    fn the_bucket_counts_images_and_refills_over_a_minute() {
        // 3 a minute: three single images, then a wait of 20 s for the next.
        let mut b = None;
        for _ in 0..3 {
            b = Some(Bucket::take(b, 3, 1, 1_000).unwrap());
        }
        assert_eq!(Bucket::take(b, 3, 1, 1_000), Err(20));
        // 10 s later half an image is back: 10 s more to wait.
        assert_eq!(Bucket::take(b, 3, 1, 11_000), Err(10));
        assert!(Bucket::take(b, 3, 1, 21_000).is_ok());
        // n counts: 4 a minute, 3 taken, 2 more do not fit but 1 does.
        let b = Bucket::take(None, 4, 3, 0).unwrap();
        assert_eq!(Bucket::take(Some(b), 4, 2, 0), Err(15));
        assert!(Bucket::take(Some(b), 4, 1, 0).is_ok());
        // More than the bucket holds takes a full bucket.
        let full = Bucket::take(None, 2, 4, 0).unwrap();
        assert_eq!(full.milli_images, 0);
        // Idle for an hour refills to the brim, not beyond.
        let later = Bucket::take(Some(full), 2, 1, 3_600_000).unwrap();
        assert_eq!(later.milli_images, 1000);
        // A clock that went back takes nothing extra and gives nothing.
        assert!(Bucket::take(Some(Bucket { milli_images: 0, at_ms: 5_000 }), 2, 1, 1_000).is_err());
    }

    #[test]
    fn buckets_read_back_what_they_wrote_and_refuse_garbage() {
        let b = Bucket { milli_images: 1500, at_ms: 42 };
        assert_eq!(Bucket::decode(&b.encode()), Some(b));
        for bad in [&b""[..], b"x", b"1:", b":2", b"-1:2", b"1:2:3", b"\xff:1"] {
            assert_eq!(Bucket::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_profile_name_comes_from_metadata_then_route_then_default() {
        let v = |s: &str| Some(s.as_bytes().to_vec());
        assert_eq!(profile_name(v("kids"), v("design")), ("kids".into(), ProfileOrigin::Metadata));
        assert_eq!(profile_name(None, v("design")), ("design".into(), ProfileOrigin::Route));
        assert_eq!(profile_name(Some(Vec::new()), v("design")), ("design".into(), ProfileOrigin::Route));
        assert_eq!(profile_name(None, None), ("default".into(), ProfileOrigin::Default));
        let long = "x".repeat(500);
        assert_eq!(profile_name(v(&long), None).0.len(), MAX_PROFILE_NAME + 1, "cut, and so names no profile");
    }

    #[test]
    fn models_are_allowed_by_name_family_or_alias() {
        let mut p = Profile::open("kids");
        assert!(p.allows_model("anything", "gemini-3-pro-image"));
        p.models = Some(vec!["gemini-2.5-flash-image".into(), "dall-e-3".into()]);
        assert!(p.allows_model("gemini-2.5-flash-image-16x9", "gemini-2.5-flash-image"));
        assert!(p.allows_model("dall-e-3", "gemini-3-pro-image"));
        assert!(!p.allows_model("gemini-3-pro-image", "gemini-3-pro-image"));
        assert!(!p.allows_model("gpt-image-1", "gemini-3-pro-image"));
        assert!(valid_profile_name("kids-app_2") && !valid_profile_name("a.b") && !valid_profile_name(""));
    }
}
