//! The plugin configuration (docs/configuration.md): read with serde, unknown keys refused,
//! validated once at configure time into `Settings`, which the request path only reads.

use std::collections::BTreeMap;
use std::rc::Rc;

use serde::Deserialize;

use crate::backends::{Backend, Backends, Credential, Kind, Retry};
use crate::endpoint::Endpoint;
use crate::geometry::ImageSize;
use crate::model::{Families, Family, ModelVariant, DEFAULT_MODEL};
use crate::named::{named, Named};
use crate::policy::{self, CacheMode, Pricing, Profile, DEFAULT_PROFILE};
use crate::safety::{SafetyLevel, SafetyPolicy, SafetySource};

/// The environment variable that sets the platform safety level.
pub const SAFETY_ENV: &str = "GEMINI_IMAGE_SAFETY_THRESHOLD";
const MIB: u64 = 1024 * 1024;
/// `cache.ttl_seconds` may never be set above this (a year): an expiry is never near wrapping.
pub const MAX_TTL_SECONDS: u64 = 365 * 24 * 3600;
/// `limits.max_inflight_bytes` may never be set above this: the worker's wasm32 VM has 4 GiB in
/// all, and a reply briefly holds the answers and their rendering side by side.
pub const MAX_INFLIGHT_BYTES_CEILING: u64 = 1024 * MIB;
/// `limits.max_n` may never be set above this.
pub const MAX_N_CEILING: u32 = 10;

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    gemini: RawGemini,
    models: RawModels,
    safety: RawSafety,
    limits: RawLimits,
    styles: RawStyles,
    edits: RawEdits,
    cache: Option<RawCache>,
    backends: Option<Vec<RawBackend>>,
    retry: Option<RawRetry>,
    urls: Option<RawUrls>,
    streaming: RawStreaming,
    profiles: BTreeMap<String, RawProfile>,
    profile_from: Option<RawProfileFrom>,
    pricing: Option<BTreeMap<String, BTreeMap<String, f64>>>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct RawUrls {
    base: String,
    ttl_seconds: u64,
    default_url_models: Vec<String>,
}

impl Default for RawUrls {
    fn default() -> Self {
        RawUrls {
            base: String::new(),
            ttl_seconds: 3600,
            default_url_models: vec!["dall-e-2".into(), "dall-e-3".into()],
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct RawStreaming {
    enabled: bool,
    max_event_bytes: u64,
}

impl Default for RawStreaming {
    fn default() -> Self {
        RawStreaming { enabled: true, max_event_bytes: crate::stream::DEFAULT_MAX_EVENT_BYTES as u64 }
    }
}

/// A profile in config: every key overrides the top level's for requests in that profile.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, default)]
struct RawProfile {
    models: Option<Vec<String>>,
    endpoints: Option<Vec<String>>,
    safety: RawSafetyOverride,
    limits: RawLimitsOverride,
    images_per_minute: Option<u32>,
    cache: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, default)]
struct RawSafetyOverride {
    default: Option<String>,
    allow_request_override: Option<bool>,
    minimum: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, default)]
struct RawLimitsOverride {
    max_n: Option<u32>,
    max_prompt_chars: Option<usize>,
    max_body_bytes: Option<usize>,
    max_image_size: Option<String>,
    max_inflight_requests: Option<u32>,
    max_inflight_bytes: Option<u64>,
    max_upload_bytes: Option<usize>,
    max_input_image_bytes: Option<usize>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawProfileFrom {
    metadata: RawMetadataPath,
}

/// Where in the dynamic metadata an earlier filter leaves the profile name.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawMetadataPath {
    filter: String,
    path: Vec<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: String,
    kind: String,
    cluster: String,
    authority: Option<String>,
    #[serde(default)]
    api_key_envs: Vec<String>,
    project: Option<String>,
    location: Option<String>,
    auth: Option<RawAuth>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    api_key_env: Option<String>,
    metadata: Option<RawMetadata>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawMetadata {
    cluster: String,
    #[serde(default = "default_metadata_authority")]
    authority: String,
}

fn default_metadata_authority() -> String {
    "metadata.google.internal".into()
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct RawRetry {
    max_attempts: u32,
    cooldown_ms: u64,
}

impl Default for RawRetry {
    fn default() -> Self {
        RawRetry { max_attempts: 3, cooldown_ms: 60_000 }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct RawGemini {
    cluster: String,
    authority: String,
    /// The upstream id of `gemini-3-pro-image` (kept from before families existed).
    model: Option<String>,
    api_key_env: String,
    timeout_ms: u64,
}

impl Default for RawGemini {
    fn default() -> Self {
        RawGemini {
            cluster: "gemini".into(),
            authority: "generativelanguage.googleapis.com".into(),
            model: None,
            api_key_env: "GEMINI_API_KEY".into(),
            timeout_ms: 180_000,
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct RawModels {
    aliases: BTreeMap<String, String>,
    families: BTreeMap<String, RawFamily>,
}

impl Default for RawModels {
    fn default() -> Self {
        let mut aliases = BTreeMap::new();
        aliases.insert("dall-e-3".to_string(), "gemini-3-pro-image".to_string());
        aliases.insert("gpt-image-1".to_string(), "gemini-3-pro-image".to_string());
        RawModels { aliases, families: BTreeMap::new() }
    }
}

/// A family in config: a built-in one's keys override its defaults; a new one must give all.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, default)]
struct RawFamily {
    upstream: Option<String>,
    image_sizes: Option<Vec<String>>,
    max_input_images: Option<u32>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct RawEdits {
    mask: String,
    mask_instruction: String,
    variation_prompt: String,
}

impl Default for RawEdits {
    fn default() -> Self {
        RawEdits {
            mask: "instruct".into(),
            mask_instruction:
                "Change only the areas that are transparent in the mask image; keep everything else exactly as it is."
                    .into(),
            variation_prompt: "Make a new variation of this image with the same subject, composition and style.".into(),
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct RawSafety {
    default: Option<String>,
    allow_request_override: bool,
    minimum: String,
}

impl Default for RawSafety {
    fn default() -> Self {
        RawSafety { default: None, allow_request_override: true, minimum: "OFF".into() }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    max_n: u32,
    max_prompt_chars: usize,
    max_body_bytes: usize,
    max_image_size: String,
    max_inflight_requests: u32,
    max_inflight_bytes: u64,
    max_upload_bytes: usize,
    max_input_image_bytes: usize,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_n: 4,
            max_prompt_chars: 32000,
            max_body_bytes: 1_048_576,
            max_image_size: "4K".into(),
            max_inflight_requests: 64,
            max_inflight_bytes: 256 * MIB,
            max_upload_bytes: 20 * MIB as usize,
            max_input_image_bytes: 7 * MIB as usize,
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct RawStyles {
    vivid: String,
    natural: String,
}

impl Default for RawStyles {
    fn default() -> Self {
        RawStyles {
            vivid: "vivid colors, dramatic lighting, rich details".into(),
            natural: "natural lighting, realistic, photorealistic".into(),
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct RawCache {
    ttl_seconds: u64,
    /// Coalescing of identical misses in flight (contract section 7); it needs L1.
    coalesce: bool,
    l1: Option<RawL1>,
    l2: Option<RawL2>,
}

impl Default for RawCache {
    fn default() -> Self {
        RawCache { ttl_seconds: 3600, coalesce: true, l1: None, l2: None }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct RawL1 {
    max_entries: u32,
    max_entry_bytes: usize,
    hot_bytes: usize,
}

impl Default for RawL1 {
    fn default() -> Self {
        RawL1 { max_entries: 64, max_entry_bytes: 16 * 1024 * 1024, hot_bytes: 32 * 1024 * 1024 }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct RawL2 {
    cluster: String,
    authority: String,
    timeout_ms: u64,
    token_env: String,
}

impl Default for RawL2 {
    fn default() -> Self {
        RawL2 {
            cluster: "image_cache".into(),
            authority: "image-cache".into(),
            timeout_ms: 250,
            token_env: "IMAGE_CACHE_TOKEN".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeminiSettings {
    pub cluster: String,
    pub authority: String,
    /// The key read from the VM environment at configure time; `None` when unset.
    pub api_key: Option<String>,
    pub api_key_env: String,
    pub timeout_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_n: u32,
    pub max_prompt_chars: usize,
    pub max_body_bytes: usize,
    pub max_image_size: ImageSize,
    /// Requests one worker may hold between admission and reply.
    pub max_inflight_requests: u32,
    /// Bytes of Gemini answers one worker may hold for requests in flight.
    pub max_inflight_bytes: u64,
    /// The largest multipart body of an edit or variation.
    pub max_upload_bytes: usize,
    /// The largest input image (or mask) of an edit.
    pub max_input_image_bytes: usize,
}

/// What an edit does with a mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskMode {
    /// Send it after the images, followed by the mask instruction.
    Instruct,
    /// Answer 400 naming `mask`.
    Refuse,
}

named!(MaskMode { Instruct => "instruct", Refuse => "refuse" });

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EditSettings {
    pub mask: MaskMode,
    pub mask_instruction: String,
    pub variation_prompt: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Styles {
    pub vivid: String,
    pub natural: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L1Settings {
    pub max_entries: u32,
    pub max_entry_bytes: usize,
    /// Bytes of rendered answers each worker keeps in its VM in front of shared data; 0: off.
    pub hot_bytes: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L2Settings {
    pub cluster: String,
    pub authority: String,
    pub timeout_ms: u64,
    pub token: Option<String>,
}

/// Image URLs served by the filter (contract section 10, docs/image-urls.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlSettings {
    /// What URLs start with (no trailing slash); `None`: the request's scheme and authority.
    pub base: Option<String>,
    pub ttl_seconds: u64,
    /// Model names (as the client sends them) whose `response_format` defaults to `url`.
    pub default_url_models: Vec<String>,
}

/// Streamed answers (contract section 12, docs/streaming.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamingSettings {
    /// False where Envoy cannot hold request headers for the filter (no
    /// `allow_on_headers_stop_iteration`): the filter then lets headers go on at once and
    /// refuses `stream: true`.
    pub enabled: bool,
    /// The largest Gemini event held while it arrives (one event carries the final image).
    pub max_event_bytes: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheSettings {
    pub ttl_seconds: u64,
    /// Identical misses in flight wait for one generation (`cache.coalesce` with L1 on: the
    /// leases that make it work across workers live in shared data, beside L1).
    pub coalesce: bool,
    pub l1: Option<L1Settings>,
    pub l2: Option<L2Settings>,
}

/// The validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub gemini: GeminiSettings,
    /// The model families, the default model's first.
    pub families: Families,
    /// Alias name to the variant it stands for (validated).
    pub aliases: BTreeMap<String, ModelVariant>,
    pub safety: SafetyPolicy,
    pub limits: Limits,
    pub styles: Styles,
    pub edits: EditSettings,
    pub cache: Option<CacheSettings>,
    /// Image URLs; `None`: `url` answers are `data:` URIs.
    pub urls: Option<UrlSettings>,
    pub streaming: StreamingSettings,
    /// Where calls go: the `backends` list, or the `gemini` section as the one backend.
    pub backends: Backends,
    /// Things worth a warning at start-up that do not stop it (e.g. no API key).
    pub warnings: Vec<String>,
    /// The profile these settings are for (the top level's own settings are `default`'s
    /// before its overrides).
    pub profile: Profile,
    pub pricing: Pricing,
    /// Every profile, each resolved whole at configure time (`default` always among them).
    /// Only the top-level settings hold these; a profile's own settings hold none.
    pub profiles: BTreeMap<String, Rc<Settings>>,
    /// The property path of the dynamic metadata that names the profile (`profile_from`).
    pub profile_from: Option<Vec<String>>,
}

impl Settings {
    /// One line for the start-up log: what is in force, no secrets.
    pub fn summary(&self) -> String {
        let cache = match &self.cache {
            None => "cache off".to_string(),
            Some(c) => format!(
                "cache ttl {}s, l1 {}, l2 {}",
                c.ttl_seconds,
                c.l1.as_ref().map_or("off".to_string(), |l| format!("{} x {} bytes", l.max_entries, l.max_entry_bytes)),
                c.l2.as_ref().map_or("off".to_string(), |l| format!(
                    "cluster {} ({})",
                    l.cluster,
                    if l.token.is_some() { "with token" } else { "no token" }
                )),
            ),
        };
        let backends = match self.backends.retry {
            None => format!("cluster {}", self.gemini.cluster),
            Some(r) => format!(
                "backends {} (max {} attempts)",
                self.backends
                    .list
                    .iter()
                    .map(|b| format!("{} via {} with {} key(s)", b.name, b.cluster, b.credentials.len()))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.max_attempts
            ),
        };
        format!(
            "{backends}, models {}, safety {} from {:?}, minimum {}, {}",
            self.families.0.iter().map(|f| format!("{} -> {}", f.name, f.upstream)).collect::<Vec<_>>().join(", "),
            self.safety.default.as_str(),
            self.safety.default_source,
            self.safety.minimum.as_str(),
            cache
        )
    }
}

/// Why a plugin configuration is refused; its `Display` is the reason Envoy's log shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// Not JSON, not an object, or a key or type that does not belong (serde's words).
    Unreadable(String),
    /// A key whose value is not allowed: the key, the value as given, what is allowed.
    Invalid { key: String, value: String, expected: String },
    /// Settings that contradict each other.
    Conflict(String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Unreadable(e) => write!(f, "plugin configuration: {e}"),
            ConfigError::Invalid { key, value, expected } => write!(f, "{key} is {value}; expected {expected}"),
            ConfigError::Conflict(why) => f.write_str(why),
        }
    }
}

fn invalid(key: impl Into<String>, value: impl std::fmt::Debug, expected: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), value: format!("{value:?}"), expected: expected.into() }
}

fn non_empty(key: &str, v: &str) -> Result<(), ConfigError> {
    if v.trim().is_empty() {
        Err(invalid(key, v, "a non-empty string"))
    } else {
        Ok(())
    }
}

/// `v` within `lo..=hi`.
fn in_range<T: PartialOrd + std::fmt::Debug + std::fmt::Display>(
    key: &str,
    v: T,
    lo: T,
    hi: T,
) -> Result<T, ConfigError> {
    if v < lo || v > hi {
        Err(invalid(key, &v, format!("{lo}..={hi}")))
    } else {
        Ok(v)
    }
}

/// The backends: the list given, or the `gemini` section as the one backend (one key, no
/// retry). Keys are read from the VM environment now; an unset one is warned about and never
/// used.
fn backends(
    raw: Option<Vec<RawBackend>>,
    retry: Option<RawRetry>,
    gemini_cluster: &str,
    gemini_authority: &str,
    gemini_key_env: &str,
    env: &dyn Fn(&str) -> Option<String>,
    warnings: &mut Vec<String>,
) -> Result<Backends, ConfigError> {
    let key = |name: &str| env(name).filter(|k| !k.trim().is_empty());
    let Some(raw) = raw else {
        if retry.is_some() {
            return Err(ConfigError::Conflict(
                "retry applies to backends: add a backends list, or remove retry".into(),
            ));
        }
        let only = Backend::new(
            "gemini".into(),
            Kind::Gemini,
            gemini_cluster.to_string(),
            gemini_authority.to_string(),
            vec![Credential::ApiKey { env: gemini_key_env.to_string(), value: key(gemini_key_env) }],
        );
        return Ok(Backends { list: vec![only], retry: None });
    };
    if raw.is_empty() {
        return Err(invalid("backends", "[]", "at least one backend"));
    }
    let retry = retry.unwrap_or_default();
    in_range("retry.max_attempts", retry.max_attempts, 1, 10)?;
    in_range("retry.cooldown_ms", retry.cooldown_ms, 1, 86_400_000)?;
    let mut list = Vec::new();
    for (i, b) in raw.into_iter().enumerate() {
        let at = format!("backends[{i}]");
        if b.name.is_empty() || !b.name.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_".contains(&c)) {
            return Err(invalid(format!("{at}.name"), &b.name, "letters, digits, '-' and '_'"));
        }
        if list.iter().any(|x: &Backend| x.name == b.name) {
            return Err(invalid(format!("{at}.name"), &b.name, "a name no other backend has"));
        }
        non_empty(&format!("{at}.cluster"), &b.cluster)?;
        let (kind, authority, credentials) = match b.kind.as_str() {
            "gemini" => {
                if b.project.is_some() || b.location.is_some() || b.auth.is_some() {
                    return Err(invalid(at.clone(), "project/location/auth", "api_key_envs only, for kind gemini"));
                }
                if b.api_key_envs.is_empty() {
                    return Err(invalid(format!("{at}.api_key_envs"), "[]", "one or more environment variable names"));
                }
                let creds =
                    b.api_key_envs.iter().map(|e| Credential::ApiKey { env: e.clone(), value: key(e) }).collect();
                (Kind::Gemini, b.authority.unwrap_or_else(|| "generativelanguage.googleapis.com".into()), creds)
            }
            "vertex" => {
                let project = b
                    .project
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| invalid(format!("{at}.project"), "none", "the Google Cloud project"))?;
                let location = b.location.unwrap_or_else(|| "global".into());
                for (field, v) in [("project", &project), ("location", &location)] {
                    if !v.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') {
                        return Err(invalid(format!("{at}.{field}"), v, "letters, digits and '-'"));
                    }
                }
                if !b.api_key_envs.is_empty() {
                    return Err(invalid(format!("{at}.api_key_envs"), "set", "auth.api_key_env for kind vertex"));
                }
                let cred = match b.auth {
                    Some(RawAuth { api_key_env: Some(e), metadata: None }) => {
                        Credential::ApiKey { value: key(&e), env: e }
                    }
                    Some(RawAuth { api_key_env: None, metadata: Some(m) }) => {
                        non_empty(&format!("{at}.auth.metadata.cluster"), &m.cluster)?;
                        Credential::MetadataToken { cluster: m.cluster, authority: m.authority }
                    }
                    _ => {
                        return Err(invalid(
                            format!("{at}.auth"),
                            "missing or both",
                            "either {\"api_key_env\": NAME} or {\"metadata\": {\"cluster\": ...}}",
                        ))
                    }
                };
                let authority = b.authority.unwrap_or_else(|| Backend::vertex_authority(&location));
                (Kind::Vertex { project, location }, authority, vec![cred])
            }
            other => return Err(invalid(format!("{at}.kind"), other, "gemini or vertex")),
        };
        non_empty(&format!("{at}.authority"), &authority)?;
        for c in &credentials {
            if let Credential::ApiKey { env, value: None } = c {
                warnings.push(format!(
                    "backend {}: environment variable {env} is not set in the wasm VM; that key is never used",
                    b.name
                ));
            }
        }
        list.push(Backend::new(b.name, kind, b.cluster, authority, credentials));
    }
    Ok(Backends { list, retry: Some(Retry { max_attempts: retry.max_attempts, cooldown_ms: retry.cooldown_ms }) })
}

/// A Gemini model id as it goes into the path.
fn model_id(key: &str, v: &str) -> Result<(), ConfigError> {
    non_empty(key, v)?;
    if v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
        Ok(())
    } else {
        Err(invalid(key, v, "only letters, digits, '-', '.', '_'"))
    }
}

/// The built-in families with what config changes or adds. `gemini.model` is the upstream id
/// of `gemini-3-pro-image` unless the family sets its own (both, differing, is a conflict).
fn families(raw: BTreeMap<String, RawFamily>, gemini_model: Option<&str>) -> Result<Families, ConfigError> {
    let mut list = Family::defaults();
    if let Some(model) = gemini_model {
        if let Some(pro) = list.iter_mut().find(|f| f.name == DEFAULT_MODEL) {
            pro.upstream = model.to_string();
        }
    }
    for (name, f) in raw {
        let key = format!("models.families.{name}");
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
        {
            return Err(invalid(key, &name, "a name of lower-case letters, digits, '-' and '.'"));
        }
        let existing = list.iter().position(|x| x.name == name);
        if let (Some(i), Some(up), Some(model)) = (existing, &f.upstream, gemini_model) {
            if list[i].name == DEFAULT_MODEL && up != model {
                return Err(ConfigError::Conflict(format!(
                    "gemini.model is {model:?} but {key}.upstream is {up:?}: set one of them"
                )));
            }
        }
        let image_sizes = match &f.image_sizes {
            None => None,
            Some(sizes) => {
                let mut parsed = Vec::new();
                for s in sizes {
                    let size = parse_named::<ImageSize>(&format!("{key}.image_sizes"), s)?;
                    if !parsed.contains(&size) {
                        parsed.push(size);
                    }
                }
                parsed.sort();
                Some(parsed)
            }
        };
        if let Some(up) = &f.upstream {
            model_id(&format!("{key}.upstream"), up)?;
        }
        if let Some(n) = f.max_input_images {
            in_range(&format!("{key}.max_input_images"), n, 1, 64)?;
        }
        match existing {
            Some(i) => {
                let family = &mut list[i];
                family.upstream = f.upstream.unwrap_or_else(|| family.upstream.clone());
                family.image_sizes = image_sizes.unwrap_or_else(|| family.image_sizes.clone());
                family.max_input_images = f.max_input_images.unwrap_or(family.max_input_images);
            }
            None => {
                let (Some(upstream), Some(image_sizes), Some(max_input_images)) =
                    (f.upstream, image_sizes, f.max_input_images)
                else {
                    return Err(invalid(
                        key,
                        "incomplete",
                        "upstream, image_sizes and max_input_images for a new family",
                    ));
                };
                list.push(Family { name, upstream, image_sizes, max_input_images });
            }
        }
    }
    Ok(Families(list))
}

/// `v` at least `lo`.
fn at_least<T: PartialOrd + std::fmt::Debug + std::fmt::Display>(key: &str, v: T, lo: T) -> Result<T, ConfigError> {
    if v < lo {
        Err(invalid(key, &v, format!("at least {lo}")))
    } else {
        Ok(v)
    }
}

/// A name of `T`, in any case.
fn parse_named<T: Named>(key: &str, v: &str) -> Result<T, ConfigError> {
    T::parse_any_case(v).ok_or_else(|| invalid(key, v, format!("one of {}", T::expected())))
}

impl Settings {
    /// Reads the plugin configuration. Empty configuration means every default.
    /// `env` reads the VM environment.
    pub fn from_json(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, ConfigError> {
        let raw: RawConfig = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            RawConfig::default()
        } else {
            // An object and nothing else: serde would also read a struct from an array.
            match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
                Some(b'{') => serde_json::from_slice(bytes).map_err(|e| ConfigError::Unreadable(e.to_string()))?,
                _ => {
                    let what = serde_json::from_slice::<serde_json::Value>(bytes)
                        .map_or("not JSON", |v| crate::request::json_type(&v));
                    return Err(ConfigError::Unreadable(format!("must be a JSON object, not {what}")));
                }
            }
        };
        let mut warnings = Vec::new();

        let g = raw.gemini;
        non_empty("gemini.cluster", &g.cluster)?;
        non_empty("gemini.authority", &g.authority)?;
        non_empty("gemini.api_key_env", &g.api_key_env)?;
        if let Some(model) = &g.model {
            model_id("gemini.model", model)?;
        }
        in_range("gemini.timeout_ms", g.timeout_ms, 1, 3_600_000)?;
        let api_key = env(&g.api_key_env).filter(|k| !k.trim().is_empty());
        if api_key.is_none() {
            warnings.push(format!(
                "environment variable {} is not set in the wasm VM: Gemini calls go out without x-goog-api-key",
                g.api_key_env
            ));
        }

        let backends = backends(raw.backends, raw.retry, &g.cluster, &g.authority, &g.api_key_env, env, &mut warnings)?;
        let families = families(raw.models.families, g.model.as_deref())?;
        let mut aliases = BTreeMap::new();
        for (alias, target) in raw.models.aliases {
            non_empty("models.aliases key", &alias)?;
            let v = families.parse(&target).ok_or_else(|| {
                invalid(
                    format!("models.aliases.{alias}"),
                    &target,
                    format!("a model of a family ({}) or one of its variants", families.names()),
                )
            })?;
            aliases.insert(alias, v);
        }

        let s = raw.safety;
        let config_default = s.default.as_deref().map(|v| parse_named("safety.default", v)).transpose()?;
        let env_default = env(SAFETY_ENV)
            .filter(|v| !v.is_empty())
            .map(|v| parse_named(&format!("environment variable {SAFETY_ENV}"), &v))
            .transpose()?;
        let minimum = parse_named("safety.minimum", &s.minimum)?;
        let safety = SafetyPolicy::new(config_default, env_default, s.allow_request_override, minimum)
            .map_err(ConfigError::Conflict)?;

        let l = raw.limits;
        in_range("limits.max_n", l.max_n, 1, MAX_N_CEILING)?;
        at_least("limits.max_prompt_chars", l.max_prompt_chars, 1)?;
        at_least("limits.max_body_bytes", l.max_body_bytes, 64)?;
        let max_image_size = parse_named::<ImageSize>("limits.max_image_size", &l.max_image_size)?;
        in_range("limits.max_inflight_requests", l.max_inflight_requests, 1, 100_000)?;
        at_least("limits.max_upload_bytes", l.max_upload_bytes, 1024)?;
        in_range("limits.max_input_image_bytes", l.max_input_image_bytes, 64, l.max_upload_bytes)?;
        in_range("limits.max_inflight_bytes", l.max_inflight_bytes, MIB, MAX_INFLIGHT_BYTES_CEILING)?;

        let cache = match raw.cache {
            None => None,
            Some(c) => {
                in_range("cache.ttl_seconds", c.ttl_seconds, 1, MAX_TTL_SECONDS)?;
                let l1 = match c.l1 {
                    None => None,
                    Some(l1) => {
                        in_range("cache.l1.max_entries", l1.max_entries, 1, 100_000)?;
                        at_least("cache.l1.max_entry_bytes", l1.max_entry_bytes, 1)?;
                        Some(L1Settings {
                            max_entries: l1.max_entries,
                            max_entry_bytes: l1.max_entry_bytes,
                            hot_bytes: l1.hot_bytes,
                        })
                    }
                };
                let l2 = match c.l2 {
                    None => None,
                    Some(l2) => {
                        non_empty("cache.l2.cluster", &l2.cluster)?;
                        non_empty("cache.l2.authority", &l2.authority)?;
                        at_least("cache.l2.timeout_ms", l2.timeout_ms, 1)?;
                        let token = env(&l2.token_env).filter(|t| !t.is_empty());
                        Some(L2Settings {
                            cluster: l2.cluster,
                            authority: l2.authority,
                            timeout_ms: l2.timeout_ms,
                            token,
                        })
                    }
                };
                let coalesce = c.coalesce && l1.is_some();
                Some(CacheSettings { ttl_seconds: c.ttl_seconds, coalesce, l1, l2 })
            }
        };

        let urls = match raw.urls {
            None => None,
            Some(u) => {
                let held = cache.as_ref().is_some_and(|c| c.l1.is_some() || c.l2.is_some());
                if !held {
                    return Err(ConfigError::Conflict(
                        "urls needs a cache tier to keep the images in: configure cache.l1 or cache.l2, or remove urls"
                            .into(),
                    ));
                }
                in_range("urls.ttl_seconds", u.ttl_seconds, 1, MAX_TTL_SECONDS)?;
                let base = u.base.trim().trim_end_matches('/').to_string();
                let base_ok = (base.starts_with("http://") || base.starts_with("https://"))
                    && base.bytes().all(|b| b.is_ascii_graphic() && !b"\"\\<>{}|^`".contains(&b));
                if !base.is_empty() && !base_ok {
                    return Err(invalid("urls.base", &u.base, "an http:// or https:// URL, or empty"));
                }
                Some(UrlSettings {
                    base: (!base.is_empty()).then_some(base),
                    ttl_seconds: u.ttl_seconds,
                    default_url_models: u.default_url_models,
                })
            }
        };
        in_range("streaming.max_event_bytes", raw.streaming.max_event_bytes, 1024 * 1024, 1 << 30)?;
        let streaming = StreamingSettings {
            enabled: raw.streaming.enabled,
            max_event_bytes: raw.streaming.max_event_bytes as usize,
        };
        let pricing = pricing(raw.pricing, &families, &mut warnings)?;
        let profile_from = match raw.profile_from {
            None => None,
            Some(RawProfileFrom { metadata: m }) => {
                non_empty("profile_from.metadata.filter", &m.filter)?;
                if m.path.is_empty() || m.path.iter().any(|p| p.is_empty()) {
                    return Err(invalid("profile_from.metadata.path", &m.path, "one or more non-empty keys"));
                }
                let mut path = vec!["metadata".to_string(), "filter_metadata".to_string(), m.filter];
                path.extend(m.path);
                Some(path)
            }
        };
        let raw_profiles = raw.profiles;

        let mut settings = Settings {
            gemini: GeminiSettings {
                cluster: g.cluster,
                authority: g.authority,
                api_key,
                api_key_env: g.api_key_env,
                timeout_ms: g.timeout_ms,
            },
            aliases,
            safety,
            limits: Limits {
                max_n: l.max_n,
                max_prompt_chars: l.max_prompt_chars,
                max_body_bytes: l.max_body_bytes,
                max_image_size,
                max_inflight_requests: l.max_inflight_requests,
                max_inflight_bytes: l.max_inflight_bytes,
                max_upload_bytes: l.max_upload_bytes,
                max_input_image_bytes: l.max_input_image_bytes,
            },
            styles: Styles { vivid: raw.styles.vivid, natural: raw.styles.natural },
            edits: EditSettings {
                mask: parse_named("edits.mask", &raw.edits.mask)?,
                mask_instruction: raw.edits.mask_instruction,
                variation_prompt: {
                    non_empty("edits.variation_prompt", &raw.edits.variation_prompt)?;
                    raw.edits.variation_prompt
                },
            },
            families,
            backends,
            cache,
            urls,
            streaming,
            warnings,
            profile: Profile::open(DEFAULT_PROFILE),
            pricing,
            profiles: BTreeMap::new(),
            profile_from,
        };
        let mut profiles = BTreeMap::new();
        for (name, raw) in raw_profiles {
            let resolved = resolve_profile(&settings, &name, raw)?;
            profiles.insert(name, Rc::new(resolved));
        }
        if !profiles.contains_key(DEFAULT_PROFILE) {
            profiles.insert(DEFAULT_PROFILE.to_string(), Rc::new(settings.clone()));
        }
        settings.profiles = profiles;
        Ok(settings)
    }
}

/// The price table: the configured one, or Google's list prices when none is given. Every
/// size a family makes that has no price costs 0 and is warned about.
fn pricing(
    raw: Option<BTreeMap<String, BTreeMap<String, f64>>>,
    families: &Families,
    warnings: &mut Vec<String>,
) -> Result<Pricing, ConfigError> {
    let table = match raw {
        None => Pricing::list_prices(),
        Some(raw) => {
            let mut table = Vec::new();
            for (family, sizes) in raw {
                if !families.0.iter().any(|f| f.name == family) {
                    return Err(invalid(
                        format!("pricing.{family}"),
                        &family,
                        format!("a family ({})", families.names()),
                    ));
                }
                for (size, dollars) in sizes {
                    let key = format!("pricing.{family}.{size}");
                    let size = parse_named::<ImageSize>(&key, &size)?;
                    let micro = policy::micro_usd(dollars)
                        .ok_or_else(|| invalid(&key, dollars, "US dollars per image, from 0 to 1000"))?;
                    table.push((family.clone(), size, micro));
                }
            }
            Pricing(table)
        }
    };
    for f in &families.0 {
        let sizes = if f.sized() { f.image_sizes.clone() } else { vec![ImageSize::K1] };
        for size in sizes {
            if !table.0.iter().any(|(name, s, _)| *name == f.name && *s == size) {
                warnings.push(format!(
                    "pricing has no price for {} at {}: its images count as costing 0",
                    f.name,
                    size.as_str()
                ));
            }
        }
    }
    Ok(table)
}

/// A profile's whole settings: the top level's with the profile's overrides. Limits may only
/// tighten; safety and cache replace.
fn resolve_profile(top: &Settings, name: &str, raw: RawProfile) -> Result<Settings, ConfigError> {
    let at = format!("profiles.{name}");
    if !policy::valid_profile_name(name) {
        return Err(invalid(&at, name, "a profile name of letters, digits, '-' and '_' (at most 64)"));
    }
    let mut s = top.clone();
    let mut profile = Profile::open(name);

    if let Some(models) = raw.models {
        if models.is_empty() {
            return Err(invalid(format!("{at}.models"), "[]", "one or more model names, families or aliases"));
        }
        for m in &models {
            if !top.aliases.contains_key(m) && top.families.parse(m).is_none() {
                return Err(invalid(
                    format!("{at}.models"),
                    m,
                    format!("a model of a family ({}), one of its variants, or an alias", top.families.names()),
                ));
            }
        }
        profile.models = Some(models);
        if !profile.allows_model(DEFAULT_MODEL, DEFAULT_MODEL) {
            profile.default_model = profile.models.as_ref().and_then(|m| m.first().cloned());
        }
    }
    if let Some(endpoints) = raw.endpoints {
        let mut list = Vec::new();
        for e in &endpoints {
            let endpoint = parse_named::<Endpoint>(&format!("{at}.endpoints"), e)?;
            if !list.contains(&endpoint) {
                list.push(endpoint);
            }
        }
        profile.endpoints = list;
    }
    if let Some(per_minute) = raw.images_per_minute {
        profile.images_per_minute = Some(in_range(&format!("{at}.images_per_minute"), per_minute, 1, 1_000_000)?);
    }
    if let Some(mode) = &raw.cache {
        profile.cache = parse_named::<CacheMode>(&format!("{at}.cache"), mode)?;
    }

    let r = raw.safety;
    let level = |key: &str, v: &Option<String>| {
        v.as_deref().map(|v| parse_named::<SafetyLevel>(&format!("{at}.safety.{key}"), v)).transpose()
    };
    let (default, minimum) = (level("default", &r.default)?, level("minimum", &r.minimum)?);
    let minimum = minimum.unwrap_or(top.safety.minimum);
    s.safety = match default {
        Some(d) if d < minimum => {
            return Err(ConfigError::Conflict(format!(
                "{at}.safety.default {} is below its minimum {}",
                d.as_str(),
                minimum.as_str()
            )))
        }
        Some(d) => SafetyPolicy { default: d, default_source: SafetySource::Profile, ..top.safety.clone() },
        // The inherited default rises to the profile's floor.
        None if top.safety.default < minimum => {
            SafetyPolicy { default: minimum, default_source: SafetySource::Profile, ..top.safety.clone() }
        }
        None => top.safety.clone(),
    };
    s.safety.minimum = minimum;
    s.safety.allow_request_override = r.allow_request_override.unwrap_or(top.safety.allow_request_override);

    let l = raw.limits;
    let t = &top.limits;
    let limit_key = |k: &str| format!("{at}.limits.{k}");
    fn tighter<T: PartialOrd + std::fmt::Display + Copy>(key: String, v: Option<T>, top: T) -> Result<T, ConfigError> {
        match v {
            Some(v) if v > top => Err(ConfigError::Conflict(format!(
                "{key} is {v}, above the top-level {top}: a profile's limits may only tighten the top level's"
            ))),
            Some(v) => Ok(v),
            None => Ok(top),
        }
    }
    s.limits.max_n = at_least(&limit_key("max_n"), tighter(limit_key("max_n"), l.max_n, t.max_n)?, 1)?;
    s.limits.max_prompt_chars = at_least(
        &limit_key("max_prompt_chars"),
        tighter(limit_key("max_prompt_chars"), l.max_prompt_chars, t.max_prompt_chars)?,
        1,
    )?;
    s.limits.max_body_bytes = at_least(
        &limit_key("max_body_bytes"),
        tighter(limit_key("max_body_bytes"), l.max_body_bytes, t.max_body_bytes)?,
        64,
    )?;
    s.limits.max_upload_bytes = at_least(
        &limit_key("max_upload_bytes"),
        tighter(limit_key("max_upload_bytes"), l.max_upload_bytes, t.max_upload_bytes)?,
        1024,
    )?;
    s.limits.max_input_image_bytes = in_range(
        &limit_key("max_input_image_bytes"),
        tighter(limit_key("max_input_image_bytes"), l.max_input_image_bytes, t.max_input_image_bytes)?,
        64,
        s.limits.max_upload_bytes,
    )?;
    s.limits.max_inflight_requests = at_least(
        &limit_key("max_inflight_requests"),
        tighter(limit_key("max_inflight_requests"), l.max_inflight_requests, t.max_inflight_requests)?,
        1,
    )?;
    s.limits.max_inflight_bytes = at_least(
        &limit_key("max_inflight_bytes"),
        tighter(limit_key("max_inflight_bytes"), l.max_inflight_bytes, t.max_inflight_bytes)?,
        MIB,
    )?;
    if let Some(size) = &l.max_image_size {
        let size = parse_named::<ImageSize>(&limit_key("max_image_size"), size)?;
        if size > t.max_image_size {
            return Err(ConfigError::Conflict(format!(
                "{} is {}, above the top-level {}: a profile's limits may only tighten the top level's",
                limit_key("max_image_size"),
                size.as_str(),
                t.max_image_size.as_str()
            )));
        }
        s.limits.max_image_size = size;
    }
    if l.max_inflight_requests.is_some() || l.max_inflight_bytes.is_some() {
        profile.inflight = Some((s.limits.max_inflight_requests, s.limits.max_inflight_bytes));
    }

    s.profile = profile;
    s.profiles = BTreeMap::new();
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::ImageSize;
    use crate::safety::{SafetyLevel, SafetySource};

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn empty_config_means_every_default() {
        let s = Settings::from_json(b"", &no_env).unwrap();
        assert_eq!(s.gemini.cluster, "gemini");
        assert_eq!(s.gemini.authority, "generativelanguage.googleapis.com");
        assert_eq!(s.families, Families(Family::defaults()));
        assert_eq!(s.families.0[0].upstream, "gemini-3-pro-image-preview");
        assert_eq!(s.edits.mask, MaskMode::Instruct);
        assert_eq!((s.limits.max_upload_bytes, s.limits.max_input_image_bytes), (20_971_520, 7_340_032));
        assert_eq!(s.gemini.timeout_ms, 180_000);
        assert_eq!(
            s.limits,
            Limits {
                max_n: 4,
                max_prompt_chars: 32000,
                max_body_bytes: 1_048_576,
                max_image_size: ImageSize::K4,
                max_inflight_requests: 64,
                max_inflight_bytes: 268_435_456,
                max_upload_bytes: 20_971_520,
                max_input_image_bytes: 7_340_032,
            }
        );
        assert_eq!(s.safety.default, SafetyLevel::Off);
        assert!(s.safety.allow_request_override);
        assert_eq!(s.safety.minimum, SafetyLevel::Off);
        assert!(s.aliases.contains_key("dall-e-3") && s.aliases.contains_key("gpt-image-1"));
        assert_eq!(s.cache, None);
        assert_eq!(s.gemini.api_key, None);
        assert_eq!(s.warnings.len(), 1);
        assert_eq!(Settings::from_json(b"{}", &no_env).unwrap(), s);
    }

    #[test]
    fn the_contract_example_is_accepted() {
        let json = br#"{
          "gemini": {"cluster": "gemini", "authority": "generativelanguage.googleapis.com",
                     "model": "gemini-3-pro-image-preview", "api_key_env": "GEMINI_API_KEY",
                     "timeout_ms": 180000},
          "models": {"aliases": {"dall-e-3": "gemini-3-pro-image", "gpt-image-1": "gemini-3-pro-image"}},
          "safety": {"default": "OFF", "allow_request_override": true, "minimum": "OFF"},
          "limits": {"max_n": 4, "max_prompt_chars": 32000, "max_body_bytes": 1048576,
                     "max_image_size": "4K", "max_inflight_requests": 64,
                     "max_inflight_bytes": 268435456},
          "styles": {"vivid": "vivid colors, dramatic lighting, rich details",
                     "natural": "natural lighting, realistic, photorealistic"},
          "cache": {"ttl_seconds": 3600,
                    "l1": {"max_entries": 64, "max_entry_bytes": 16777216},
                    "l2": {"cluster": "image_cache", "authority": "image-cache", "timeout_ms": 250,
                           "token_env": "IMAGE_CACHE_TOKEN"}}
        }"#;
        let env = |k: &str| match k {
            "GEMINI_API_KEY" => Some("k-123".to_string()),
            "IMAGE_CACHE_TOKEN" => Some("tok".to_string()),
            _ => None,
        };
        let s = Settings::from_json(json, &env).unwrap();
        assert_eq!(s.gemini.api_key.as_deref(), Some("k-123"));
        let cache = s.cache.unwrap();
        assert_eq!(cache.l1, Some(L1Settings { max_entries: 64, max_entry_bytes: 16_777_216, hot_bytes: 33_554_432 }));
        assert_eq!(cache.l2.unwrap().token.as_deref(), Some("tok"));
        assert!(s.warnings.is_empty());
    }

    #[test]
    fn bad_configs_say_why() {
        let cases: [(&[u8], &str); 19] = [
            (br#"{"bogus": 1}"#, "bogus"),
            (br#"{"gemini": {"clustr": "x"}}"#, "clustr"),
            (br#"{"safety": {"default": "SOMETIMES"}}"#, "SOMETIMES"),
            (br#"{"safety": {"minimum": "max"}}"#, "max"),
            (br#"{"safety": {"default": "LOW", "minimum": "HIGH"}}"#, "below"),
            (br#"{"limits": {"max_n": 11}}"#, "max_n"),
            (br#"{"limits": {"max_image_size": "8K"}}"#, "8K"),
            (br#"{"models": {"aliases": {"x": "gpt-4"}}}"#, "gpt-4"),
            (br#"{"cache": {"l1": {"max_entries": 0}}}"#, "max_entries"),
            (br#"[1,2]"#, "not an array"),
            (b"[]", "must be a JSON object, not an array"),
            (br#""{}""#, "not a string"),
            (b"42", "not a number"),
            (b"null", "not null"),
            (b"true", "not a boolean"),
            (br#"{"cache": {"ttl_seconds": 18446744073709551615}}"#, "cache.ttl_seconds"),
            (br#"{"cache": {"ttl_seconds": 31536001}}"#, "1..=31536000"),
            (br#"{"limits": {"max_inflight_requests": 0}}"#, "max_inflight_requests"),
            (br#"{"limits": {"max_inflight_bytes": 4294967296}}"#, "max_inflight_bytes"),
        ];
        for (json, needle) in cases {
            let e = Settings::from_json(json, &no_env).unwrap_err().to_string();
            assert!(e.contains(needle), "{e:?} should mention {needle}");
        }
    }

    #[test]
    fn families_are_built_in_changed_or_added_in_config() {
        let s = Settings::from_json(
            br#"{"gemini": {"model": "pro-002"},
                 "models": {"families": {
                    "gemini-2.5-flash-image": {"max_input_images": 2},
                    "gemini-4-image": {"upstream": "gemini-4-image-preview", "image_sizes": ["1k", "4K", "1K"], "max_input_images": 8}},
                  "aliases": {"house-style": "gemini-4-image-4k-16x9"}}}"#,
            &no_env,
        )
        .unwrap();
        let f = &s.families;
        assert_eq!(f.0[0].upstream, "pro-002", "gemini.model still names gemini-3-pro-image's upstream");
        assert_eq!((f.0[1].upstream.as_str(), f.0[1].max_input_images), ("gemini-2.5-flash-image", 2));
        assert_eq!(f.0[2].image_sizes, vec![ImageSize::K1, ImageSize::K4], "deduplicated and ordered");
        let alias = s.aliases["house-style"];
        assert_eq!(f.name(alias), "gemini-4-image-4k-16x9");
        let bad: [(&[u8], &str); 5] = [
            (br#"{"models": {"families": {"x": {"upstream": "u"}}}}"#, "models.families.x"),
            (br#"{"models": {"families": {"Bad Name": {}}}}"#, "Bad Name"),
            (br#"{"models": {"families": {"gemini-3-pro-image": {"image_sizes": ["8K"]}}}}"#, "8K"),
            (br#"{"models": {"families": {"gemini-3-pro-image": {"colour": 1}}}}"#, "colour"),
            (
                br#"{"gemini": {"model": "a"}, "models": {"families": {"gemini-3-pro-image": {"upstream": "b"}}}}"#,
                "set one of them",
            ),
        ];
        for (json, needle) in bad {
            let e = Settings::from_json(json, &no_env).unwrap_err().to_string();
            assert!(e.contains(needle), "{e:?} should mention {needle}");
        }
        let e = Settings::from_json(br#"{"edits": {"mask": "maybe"}}"#, &no_env).unwrap_err().to_string();
        assert!(e.contains("edits.mask") && e.contains("instruct, refuse"), "{e}");
    }

    #[test]
    fn environment_safety_level_is_validated_and_wins() {
        let env = |k: &str| (k == SAFETY_ENV).then(|| "medium".to_string());
        let s = Settings::from_json(br#"{"safety": {"default": "LOW"}}"#, &env).unwrap();
        assert_eq!((s.safety.default, s.safety.default_source), (SafetyLevel::Medium, SafetySource::Environment));
        let bad = |k: &str| (k == SAFETY_ENV).then(|| "EXTREME".to_string());
        let e = Settings::from_json(b"{}", &bad).unwrap_err().to_string();
        assert!(e.contains(SAFETY_ENV) && e.contains("EXTREME"), "{e}");
    }

    #[test]
    fn profiles_are_resolved_whole_at_configure_time() {
        let env = |k: &str| (k == SAFETY_ENV).then(|| "LOW".to_string());
        let s = Settings::from_json(
            br#"{"limits": {"max_n": 4},
                 "profiles": {
                   "kids": {"models": ["gemini-2.5-flash-image"], "endpoints": ["generations"],
                            "safety": {"default": "HIGH", "minimum": "HIGH", "allow_request_override": false},
                            "limits": {"max_n": 1, "max_image_size": "1K"}, "images_per_minute": 20, "cache": "private"},
                   "floor": {"safety": {"minimum": "MEDIUM"}},
                   "quiet": {"cache": "off", "limits": {"max_inflight_requests": 2}}},
                 "cache": {"l1": {}},
                 "profile_from": {"metadata": {"filter": "envoy.filters.http.jwt_authn", "path": ["payload", "image_profile"]}}}"#,
            &env,
        )
        .unwrap();
        assert_eq!(s.profiles.keys().collect::<Vec<_>>(), ["default", "floor", "kids", "quiet"]);
        let default = &s.profiles["default"];
        assert_eq!(
            (&default.safety, &default.limits, &default.cache),
            (&s.safety, &s.limits, &s.cache),
            "default exists"
        );
        let kids = &s.profiles["kids"];
        assert_eq!(
            (kids.limits.max_n, kids.limits.max_image_size, kids.limits.max_prompt_chars),
            (1, ImageSize::K1, 32000)
        );
        assert_eq!(
            (kids.safety.default, kids.safety.minimum, kids.safety.allow_request_override),
            (SafetyLevel::High, SafetyLevel::High, false)
        );
        assert_eq!(kids.profile.default_model.as_deref(), Some("gemini-2.5-flash-image"));
        assert_eq!((kids.profile.cache, kids.profile.images_per_minute), (CacheMode::Private, Some(20)));
        assert_eq!(kids.profile.endpoints, vec![Endpoint::Generations]);
        assert!(kids.profiles.is_empty());
        // The environment's LOW rises to the profile's floor; elsewhere it stays.
        assert_eq!(s.safety.default, SafetyLevel::Low);
        assert_eq!(s.profiles["floor"].safety.default, SafetyLevel::Medium);
        let quiet = &s.profiles["quiet"];
        assert_eq!((quiet.profile.cache == CacheMode::Off, quiet.profile.inflight), (true, Some((2, 268_435_456))));
        assert_eq!(
            s.profile_from.as_deref().unwrap(),
            ["metadata", "filter_metadata", "envoy.filters.http.jwt_authn", "payload", "image_profile"]
        );
        assert_eq!(s.pricing, Pricing::list_prices());
    }

    #[test]
    fn profiles_that_loosen_or_name_nothing_are_refused() {
        let bad: [(&[u8], &str); 11] = [
            (
                br#"{"profiles": {"a": {"limits": {"max_n": 8}}}}"#,
                "profiles.a.limits.max_n is 8, above the top-level 4",
            ),
            (
                br#"{"limits": {"max_image_size": "2K"}, "profiles": {"a": {"limits": {"max_image_size": "4K"}}}}"#,
                "max_image_size",
            ),
            (br#"{"profiles": {"a": {"limits": {"max_body_bytes": 2000000}}}}"#, "max_body_bytes"),
            (br#"{"profiles": {"a": {"models": ["gpt-4"]}}}"#, "profiles.a.models"),
            (br#"{"profiles": {"a": {"models": []}}}"#, "profiles.a.models"),
            (br#"{"profiles": {"a": {"endpoints": ["files"]}}}"#, "profiles.a.endpoints"),
            (br#"{"profiles": {"a": {"cache": "sometimes"}}}"#, "profiles.a.cache"),
            (br#"{"profiles": {"a.b": {}}}"#, "profiles.a.b"),
            (br#"{"profiles": {"a": {"safety": {"default": "LOW", "minimum": "HIGH"}}}}"#, "below its minimum"),
            (br#"{"profiles": {"a": {"colour": 1}}}"#, "colour"),
            (br#"{"pricing": {"gemini-9": {"1K": 1}}}"#, "pricing.gemini-9"),
        ];
        for (json, needle) in bad {
            let e = Settings::from_json(json, &no_env).unwrap_err().to_string();
            assert!(e.contains(needle), "{e:?} should mention {needle}");
        }
    }

    #[test]
    fn prices_come_from_config_and_missing_ones_are_warned_about() {
        let s = Settings::from_json(br#"{"pricing": {"gemini-3-pro-image": {"1k": 0.5}}}"#, &no_env).unwrap();
        assert_eq!(s.pricing.per_image("gemini-3-pro-image", None), 500_000);
        assert_eq!(s.pricing.per_image("gemini-2.5-flash-image", None), 0);
        let warned: Vec<&String> = s.warnings.iter().filter(|w| w.starts_with("pricing")).collect();
        assert_eq!(warned.len(), 3, "2K, 4K and flash's 1K: {warned:?}");
        let e = Settings::from_json(br#"{"pricing": {"gemini-3-pro-image": {"1K": -1}}}"#, &no_env).unwrap_err();
        assert!(e.to_string().contains("pricing.gemini-3-pro-image.1K"), "{e}");
        let s = Settings::from_json(br#"{"cache": {"coalesce": false, "l1": {}}}"#, &no_env).unwrap();
        assert!(!s.cache.unwrap().coalesce);
        let s = Settings::from_json(br#"{"cache": {"l1": {}}}"#, &no_env).unwrap();
        assert!(s.cache.unwrap().coalesce, "on by default with L1");
        let s = Settings::from_json(br#"{"cache": {"l2": {}}}"#, &no_env).unwrap();
        assert!(!s.cache.unwrap().coalesce, "off without L1");
    }

    #[test]
    fn image_urls_need_a_cache_tier_and_a_sane_base() {
        let s = Settings::from_json(br#"{"cache": {"l2": {}}, "urls": {}}"#, &no_env).unwrap();
        let urls = s.urls.unwrap();
        assert_eq!((urls.base, urls.ttl_seconds), (None, 3600));
        assert_eq!(urls.default_url_models, ["dall-e-2", "dall-e-3"]);
        let s = Settings::from_json(br#"{"cache": {"l1": {}}, "urls": {"base": "https://img.example/"}}"#, &no_env)
            .unwrap();
        assert_eq!(s.urls.unwrap().base.as_deref(), Some("https://img.example"));
        for (json, needle) in [
            (&br#"{"urls": {}}"#[..], "urls needs a cache tier"),
            (br#"{"cache": {}, "urls": {}}"#, "urls needs a cache tier"),
            (br#"{"cache": {"l1": {}}, "urls": {"base": "ftp://x"}}"#, "urls.base"),
            (br#"{"cache": {"l1": {}}, "urls": {"base": "https://x/\"y"}}"#, "urls.base"),
            (br#"{"cache": {"l1": {}}, "urls": {"ttl_seconds": 0}}"#, "urls.ttl_seconds"),
            (br#"{"cache": {"l1": {}}, "urls": {"tll": 1}}"#, "tll"),
        ] {
            let e = Settings::from_json(json, &no_env).unwrap_err().to_string();
            assert!(e.contains(needle), "{e:?} should mention {needle}");
        }
    }
}
