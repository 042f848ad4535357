//! Where each Gemini call goes (docs/backends.md): an ordered list of backends (the Gemini API
//! with one or more keys, Vertex AI with a key or a metadata-server token), keys that take
//! turns, keys that cool down after a 429 or a 401/403, and the retry of a call on the next
//! key or backend. Pure: the driver supplies the clock, the cool-downs (shared data) and the
//! tokens, and carries out the sends.

use crate::error::{ApiError, ErrorCode};
use crate::gemini::CallOutcome;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `generativelanguage.googleapis.com`: `/v1beta/models/{model}:generateContent`.
    Gemini,
    /// Vertex AI: `/v1/projects/{project}/locations/{location}/publishers/google/models/{model}:generateContent`.
    Vertex { project: String, location: String },
}

/// How a call proves who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// Sent as `x-goog-api-key`. The value is read from the VM environment at configure time;
    /// `None` when the variable is unset (the key is then never used).
    ApiKey { env: String, value: Option<String> },
    /// An OAuth access token from the GCE/GKE metadata server, fetched by the root context and
    /// shared by all workers; sent as `authorization: Bearer`.
    MetadataToken { cluster: String, authority: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub name: String,
    pub kind: Kind,
    pub cluster: String,
    pub authority: String,
    /// The keys, which take turns; a metadata-token backend has one.
    pub credentials: Vec<Credential>,
    /// What shared data calls each credential: a digest of the key (never the key), or of the
    /// metadata server's cluster and authority. Two listeners (or two filters of one `vm_id`)
    /// that use the same key share its cool-down, as they share its quota; others never mix.
    pub ids: Vec<String>,
}

impl Backend {
    pub fn new(name: String, kind: Kind, cluster: String, authority: String, credentials: Vec<Credential>) -> Backend {
        let ids = credentials
            .iter()
            .enumerate()
            .map(|(i, c)| match c {
                Credential::ApiKey { value: Some(v), .. } => digest(&["key", v]),
                Credential::ApiKey { value: None, env } => digest(&["unset", &name, env, &i.to_string()]),
                Credential::MetadataToken { cluster, authority } => digest(&["metadata", cluster, authority]),
            })
            .collect();
        Backend { name, kind, cluster, authority, credentials, ids }
    }

    /// The path of `generateContent` for an upstream model id.
    pub fn path(&self, model: &str) -> String {
        self.method_path(model, "generateContent")
    }

    /// The path of `streamGenerateContent` as server-sent events.
    pub fn stream_path(&self, model: &str) -> String {
        self.method_path(model, "streamGenerateContent?alt=sse")
    }

    fn method_path(&self, model: &str, method: &str) -> String {
        match &self.kind {
            Kind::Gemini => format!("/v1beta/models/{model}:{method}"),
            Kind::Vertex { project, location } => {
                format!("/v1/projects/{project}/locations/{location}/publishers/google/models/{model}:{method}")
            }
        }
    }

    /// The Vertex AI host for a location: `global` has none in its name.
    pub fn vertex_authority(location: &str) -> String {
        if location == "global" {
            "aiplatform.googleapis.com".to_string()
        } else {
            format!("{location}-aiplatform.googleapis.com")
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    pub max_attempts: u32,
    pub cooldown_ms: u64,
}

/// The backends in order. `retry` is `None` for the one-backend default (the `gemini`
/// section alone): then nothing cools down and nothing is retried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backends {
    pub list: Vec<Backend>,
    pub retry: Option<Retry>,
}

/// A key: the backend's index and the key's index in its list. Logs and metrics name a key
/// only by these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyRef {
    pub backend: usize,
    pub key: usize,
}

/// Why a key cools down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoolReason {
    /// 429 / RESOURCE_EXHAUSTED.
    Quota,
    /// 401 / 403 / an API key Google calls invalid.
    Auth,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cooldown {
    pub until_ms: u64,
    pub reason: CoolReason,
}

impl Cooldown {
    /// The shared-data form: `until_ms` and `q` or `a`.
    pub fn encode(&self) -> Vec<u8> {
        let r = match self.reason {
            CoolReason::Quota => 'q',
            CoolReason::Auth => 'a',
        };
        format!("{},{r}", self.until_ms).into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Option<Cooldown> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (until, reason) = text.split_once(',')?;
        let reason = match reason {
            "q" => CoolReason::Quota,
            "a" => CoolReason::Auth,
            _ => return None,
        };
        Some(Cooldown { until_ms: until.parse().ok()?, reason })
    }
}

/// The first 16 hex characters of SHA-256 over the parts.
fn digest(parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    crate::hash::hex(&h.finalize()[..8])
}

/// The shared-data key of a key's cool-down.
pub fn cooldown_key(backends: &Backends, k: KeyRef) -> String {
    let id = backends.list.get(k.backend).and_then(|b| b.ids.get(k.key)).map_or("none", String::as_str);
    format!("gemini_image.cooldown.{id}")
}

/// What one call has tried so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attempts {
    pub count: u32,
    /// Keys this call already used (not tried again for it).
    pub tried: Vec<KeyRef>,
    /// Backends that answered 5xx or failed for this call (not tried again for it).
    pub skipped_backends: Vec<usize>,
}

/// The key to use next, or why there is none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    Use(KeyRef),
    /// Every key is cooling down, used, or without a credential.
    NoneLeft,
}

/// The first backend in order with a usable key; within a backend, keys take turns from
/// `turn[backend]` (which moves on past the key picked). A key is usable when this call has
/// not used it, it is not cooling down at `now_ms`, and it has a credential (`ready`).
pub fn pick(
    backends: &Backends,
    attempts: &Attempts,
    cooldown: &mut dyn FnMut(KeyRef) -> Option<Cooldown>,
    ready: &dyn Fn(KeyRef) -> bool,
    turn: &mut [usize],
    now_ms: u64,
) -> Pick {
    for (b, backend) in backends.list.iter().enumerate() {
        if attempts.skipped_backends.contains(&b) {
            continue;
        }
        let n = backend.credentials.len();
        let start = turn.get(b).copied().unwrap_or(0);
        for i in 0..n {
            let k = KeyRef { backend: b, key: (start + i) % n.max(1) };
            if attempts.tried.contains(&k) || !ready(k) {
                continue;
            }
            if backends.retry.is_some() && cooldown(k).is_some_and(|c| c.until_ms > now_ms) {
                continue;
            }
            if let Some(t) = turn.get_mut(b) {
                *t = (k.key + 1) % n.max(1);
            }
            return Pick::Use(k);
        }
    }
    Pick::NoneLeft
}

/// The answer when no key is left: 429 with `retry-after` until the first key cooling for
/// quota is back, if any; otherwise 502 `IMG_UPSTREAM_AUTH` (every key refused, or no
/// credential at all, such as no metadata token yet).
pub fn none_left(backends: &Backends, cooldown: &mut dyn FnMut(KeyRef) -> Option<Cooldown>, now_ms: u64) -> ApiError {
    let mut first_back: Option<u64> = None;
    for (b, backend) in backends.list.iter().enumerate() {
        for key in 0..backend.credentials.len() {
            if let Some(c) = cooldown(KeyRef { backend: b, key }) {
                if c.reason == CoolReason::Quota && c.until_ms > now_ms {
                    first_back = Some(first_back.map_or(c.until_ms, |f| f.min(c.until_ms)));
                }
            }
        }
    }
    match first_back {
        Some(until) => {
            let mut e =
                ApiError::new(ErrorCode::QuotaExhausted, "every Gemini key of this gateway is out of quota for now");
            e.retry_after = Some(until.saturating_sub(now_ms).div_ceil(1000).max(1));
            e
        }
        None => ApiError::new(
            ErrorCode::UpstreamAuth,
            "no Gemini credential of this gateway is usable: every key was refused, or no token could be had",
        ),
    }
}

/// What to do after an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// The call's answer: a success, or an error no other key or backend would change
    /// (a safety block, a 400, an image that is not there).
    Final,
    /// Cool this key down, then try again at once on the next key or backend.
    Cool(CoolReason),
    /// Try again on the next backend (5xx, UNAVAILABLE, a network failure).
    NextBackend,
}

/// How an answer is treated.
pub fn next_after(outcome: &CallOutcome) -> Next {
    let Err(e) = &outcome.result else { return Next::Final };
    match e.code {
        ErrorCode::QuotaExhausted => Next::Cool(CoolReason::Quota),
        ErrorCode::UpstreamAuth => Next::Cool(CoolReason::Auth),
        ErrorCode::ServiceUnavailable | ErrorCode::NetworkError | ErrorCode::InternalError => Next::NextBackend,
        ErrorCode::UpstreamError if outcome.upstream_status >= 500 => Next::NextBackend,
        _ => Next::Final,
    }
}

/// How long a key cools: a quota answer's own delay (`retry-after` or RetryInfo), else
/// `cooldown_ms`; a refused key five times `cooldown_ms`.
pub fn cooldown_for(reason: CoolReason, retry_after_s: Option<u64>, retry: &Retry, now_ms: u64) -> Cooldown {
    let ms = match (reason, retry_after_s) {
        (CoolReason::Quota, Some(s)) => s.saturating_mul(1000),
        (CoolReason::Quota, None) => retry.cooldown_ms,
        (CoolReason::Auth, _) => retry.cooldown_ms.saturating_mul(5),
    };
    Cooldown { until_ms: now_ms.saturating_add(ms), reason }
}

/// The shared-data key of a backend's metadata token (by its metadata server, so backends
/// that share one share the token), and its value: `expires_at_ms`, `fetched_at_ms`, then the
/// token.
pub fn token_key(backends: &Backends, backend: usize) -> String {
    let id = backends.list.get(backend).and_then(|b| b.ids.first()).map_or("none", String::as_str);
    format!("gemini_image.token.{id}")
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub value: String,
    pub expires_at_ms: u64,
    pub fetched_at_ms: u64,
}

impl Token {
    pub fn encode(&self) -> Vec<u8> {
        format!("{},{},{}", self.expires_at_ms, self.fetched_at_ms, self.value).into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Option<Token> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut parts = text.splitn(3, ',');
        let expires_at_ms = parts.next()?.parse().ok()?;
        let fetched_at_ms = parts.next()?.parse().ok()?;
        let value = parts.next()?.to_string();
        if value.is_empty() {
            return None;
        }
        Some(Token { value, expires_at_ms, fetched_at_ms })
    }

    /// Usable for a call now (with a few seconds to spare for the call itself).
    pub fn usable(&self, now_ms: u64) -> bool {
        self.expires_at_ms > now_ms.saturating_add(5_000)
    }

    /// Time to fetch a new one: within the last fifth of its life, or five minutes.
    pub fn refresh_due(&self, now_ms: u64) -> bool {
        let life = self.expires_at_ms.saturating_sub(self.fetched_at_ms);
        let margin = (life / 5).clamp(60_000, 300_000);
        now_ms.saturating_add(margin) >= self.expires_at_ms
    }
}

/// Reads the metadata server's token answer: `{"access_token", "expires_in", "token_type"}`.
pub fn read_token_answer(body: &[u8], now_ms: u64) -> Option<Token> {
    #[derive(serde::Deserialize)]
    struct Answer {
        access_token: String,
        expires_in: u64,
    }
    let a: Answer = serde_json::from_slice(body).ok()?;
    let valid = !a.access_token.is_empty()
        && a.access_token.bytes().all(|b| b.is_ascii_graphic())
        && a.expires_in > 0
        && a.expires_in <= 86_400;
    valid.then(|| Token {
        value: a.access_token,
        expires_at_ms: now_ms.saturating_add(a.expires_in.saturating_mul(1000)),
        fetched_at_ms: now_ms,
    })
}

/// The path of the metadata server's token for the default service account.
pub const METADATA_TOKEN_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";

#[cfg(test)]
#[path = "backends_tests.rs"]
mod tests;
