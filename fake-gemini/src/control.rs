//! What tests steer at run time, beside the prompt markers: failure rules per key, token or
//! path (`/__fake/rules`), call counts per credential (`/__fake/stats`), and the metadata server
//! with the OAuth access tokens it issues (`/computeMetadata/...`, `/__fake/metadata`,
//! `/__fake/tokens`).
//!
//! Keys and tokens are secrets: they are never printed. Stats and recorded requests name an API
//! key by its index in `--api-key` order (else `last4:` and its last four characters) and a
//! bearer token by where it came from (`metadata#SEQ`, `bearer#I`, `registered#I`, else
//! `last4:...`).

use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

/// Which API a `generateContent` path belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `/v1beta/models/{model}:generateContent` (generativelanguage.googleapis.com).
    Gemini,
    /// `/v1/projects/{p}/locations/{l}/publishers/google/models/{model}:generateContent`, or
    /// express mode's `/v1/publishers/google/models/{model}:generateContent` (aiplatform).
    Vertex,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gemini => "gemini",
            Backend::Vertex => "vertex",
        }
    }
}

/// Which of Gemini's methods a call is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiMethod {
    /// `...:generateContent`: one JSON answer.
    Generate,
    /// `...:streamGenerateContent?alt=sse`: server-sent events (see `stream.rs`).
    Stream,
}

impl ApiMethod {
    /// The name in the path, in stats and in recorded requests.
    pub fn name(self) -> &'static str {
        match self {
            ApiMethod::Generate => "generateContent",
            ApiMethod::Stream => "streamGenerateContent",
        }
    }

    /// The RPC's name, as Google's ErrorInfo metadata spells it.
    pub fn rpc(self) -> &'static str {
        match self {
            ApiMethod::Generate => "GenerateContent",
            ApiMethod::Stream => "StreamGenerateContent",
        }
    }

    fn parse(name: &str) -> Option<ApiMethod> {
        [ApiMethod::Generate, ApiMethod::Stream].into_iter().find(|m| m.name() == name)
    }
}

/// The backend, model and method of a `generateContent` or `streamGenerateContent` path (query
/// removed), if it is one.
pub fn route(path: &str) -> Option<(Backend, &str, ApiMethod)> {
    let (rest, method) = match path.strip_suffix(":generateContent") {
        Some(rest) => (rest, ApiMethod::Generate),
        None => (path.strip_suffix(":streamGenerateContent")?, ApiMethod::Stream),
    };
    if let Some(model) = rest.strip_prefix("/v1beta/models/") {
        return (!model.is_empty()).then_some((Backend::Gemini, model, method));
    }
    let rest = rest.strip_prefix("/v1/").or_else(|| rest.strip_prefix("/v1beta1/"))?;
    let segments: Vec<&str> = rest.split('/').collect();
    let model = match segments.as_slice() {
        ["projects", p, "locations", l, "publishers", "google", "models", m] if !p.is_empty() && !l.is_empty() => m,
        ["publishers", "google", "models", m] => m,
        _ => return None,
    };
    (!model.is_empty()).then_some((Backend::Vertex, *model, method))
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn random_u64() -> u64 {
    RandomState::new().hash_one(now_us())
}

/// `last4:` and the last four characters: how an unknown key or token is named.
pub fn last4(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    let tail: String = chars[chars.len().saturating_sub(4)..].iter().collect();
    format!("last4:{tail}")
}

/// The credentials a request carries.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Credentials {
    pub api_key: Option<String>,
    pub bearer: Option<String>,
    /// `authorization` present but not `Bearer <token>`.
    pub malformed_authorization: bool,
}

impl Credentials {
    pub fn of(headers: &[(String, String)]) -> Credentials {
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.trim().to_string());
        let mut c = Credentials { api_key: get("x-goog-api-key"), ..Credentials::default() };
        if let Some(a) = get("authorization") {
            match a.split_once(' ') {
                Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => {
                    c.bearer = Some(token.trim().to_string())
                }
                _ => c.malformed_authorization = true,
            }
        }
        c
    }

    pub fn kind(&self) -> &'static str {
        match (&self.bearer, &self.api_key) {
            (Some(_), _) => "bearer",
            (None, Some(_)) => "api_key",
            (None, None) => "none",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rules

/// What a rule matches; every field given must hold (an empty match takes every call).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Match {
    pub api_key: Option<String>,
    pub api_key_index: Option<usize>,
    pub bearer: Option<String>,
    /// `api_key`, `bearer` or `none`: the credential the call is made with (a bearer wins).
    pub auth: Option<String>,
    pub path_prefix: Option<String>,
    pub backend: Option<Backend>,
    pub prompt_contains: Option<String>,
    pub api_method: Option<ApiMethod>,
}

/// A failure steered by the tests: the next `times` calls that match answer `status` (or drop
/// the connection), after `delay_ms`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rule {
    pub when: Match,
    pub status: Option<u16>,
    pub retry_after_s: Option<f64>,
    pub retry_after_header: bool,
    pub times: Option<u64>,
    pub delay_ms: u64,
    pub reset: bool,
    pub message: Option<String>,
    pub reason: Option<String>,
    /// Calls this rule answered.
    pub matched: u64,
}

/// What a call is, for matching rules.
pub struct Facts<'a> {
    pub path: &'a str,
    pub backend: Backend,
    pub api_method: ApiMethod,
    pub credentials: &'a Credentials,
    /// Index of the call's API key in `--api-key` order.
    pub api_key_index: Option<usize>,
    pub prompt: &'a str,
}

impl Match {
    fn holds(&self, f: &Facts) -> bool {
        let c = f.credentials;
        self.api_key.as_ref().is_none_or(|k| c.api_key.as_ref() == Some(k))
            && self.api_key_index.is_none_or(|i| f.api_key_index == Some(i))
            && self.bearer.as_ref().is_none_or(|b| c.bearer.as_ref() == Some(b))
            && self.auth.as_ref().is_none_or(|a| a == c.kind())
            && self.path_prefix.as_ref().is_none_or(|p| f.path.starts_with(p.as_str()))
            && self.backend.is_none_or(|b| b == f.backend)
            && self.prompt_contains.as_ref().is_none_or(|t| f.prompt.contains(t.as_str()))
            && self.api_method.is_none_or(|m| m == f.api_method)
    }
}

fn take_fields(v: &Value, what: &str, known: &[&str]) -> Result<Map<String, Value>, String> {
    let o = v.as_object().ok_or_else(|| format!("{what} must be a JSON object"))?;
    if let Some(k) = o.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("unknown field {k:?} in {what} (known: {})", known.join(", ")));
    }
    Ok(o.clone())
}

fn opt_string(o: &Map<String, Value>, k: &str) -> Result<Option<String>, String> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("{k} must be a string")),
    }
}

fn opt_u64(o: &Map<String, Value>, k: &str) -> Result<Option<u64>, String> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| format!("{k} must be a non-negative integer")),
    }
}

impl Rule {
    pub fn parse(v: &Value) -> Result<Rule, String> {
        let o = take_fields(
            v,
            "a rule",
            &[
                "match",
                "status",
                "retry_after_s",
                "retry_after_header",
                "times",
                "delay_ms",
                "reset",
                "message",
                "reason",
            ],
        )?;
        let m = take_fields(
            o.get("match").unwrap_or(&json!({})),
            "a rule's match",
            &["api_key", "api_key_index", "bearer", "auth", "path_prefix", "backend", "prompt_contains", "api_method"],
        )?;
        let auth = opt_string(&m, "auth")?;
        if let Some(a) = &auth {
            if !["api_key", "bearer", "none"].contains(&a.as_str()) {
                return Err("match.auth must be api_key, bearer or none".into());
            }
        }
        let backend = match opt_string(&m, "backend")?.as_deref() {
            None => None,
            Some("gemini") => Some(Backend::Gemini),
            Some("vertex") => Some(Backend::Vertex),
            Some(_) => return Err("match.backend must be gemini or vertex".into()),
        };
        let api_method = match opt_string(&m, "api_method")? {
            None => None,
            Some(name) => Some(
                ApiMethod::parse(&name).ok_or("match.api_method must be generateContent or streamGenerateContent")?,
            ),
        };
        let when = Match {
            api_key: opt_string(&m, "api_key")?,
            api_key_index: opt_u64(&m, "api_key_index")?.map(|i| i as usize),
            bearer: opt_string(&m, "bearer")?,
            auth,
            path_prefix: opt_string(&m, "path_prefix")?,
            backend,
            prompt_contains: opt_string(&m, "prompt_contains")?,
            api_method,
        };
        let status = match opt_u64(&o, "status")? {
            None => None,
            Some(s) if (400..=599).contains(&s) => Some(s as u16),
            Some(_) => return Err("status must be an error status, 400 to 599".into()),
        };
        let retry_after_s = match o.get("retry_after_s") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_f64() {
                Some(s) if s >= 0.0 && s.is_finite() => Some(s),
                _ => return Err("retry_after_s must be a non-negative number".into()),
            },
        };
        let flag = |k: &str| match o.get(k) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(format!("{k} must be true or false")),
        };
        let rule = Rule {
            when,
            status,
            retry_after_s,
            retry_after_header: flag("retry_after_header")?,
            times: opt_u64(&o, "times")?,
            delay_ms: opt_u64(&o, "delay_ms")?.unwrap_or(0),
            reset: flag("reset")?,
            message: opt_string(&o, "message")?,
            reason: opt_string(&o, "reason")?,
            matched: 0,
        };
        if rule.status.is_none() && !rule.reset && rule.delay_ms == 0 {
            return Err("a rule needs a status, reset: true or a delay_ms".into());
        }
        Ok(rule)
    }

    pub fn to_json(&self) -> Value {
        let m = &self.when;
        let mut when = Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                when.insert(k.into(), v);
            }
        };
        put("api_key", m.api_key.clone().map(Value::from));
        put("api_key_index", m.api_key_index.map(Value::from));
        put("bearer", m.bearer.clone().map(Value::from));
        put("auth", m.auth.clone().map(Value::from));
        put("path_prefix", m.path_prefix.clone().map(Value::from));
        put("backend", m.backend.map(|b| Value::from(b.name())));
        put("prompt_contains", m.prompt_contains.clone().map(Value::from));
        put("api_method", m.api_method.map(|x| Value::from(x.name())));
        json!({
            "match": when,
            "status": self.status,
            "retry_after_s": self.retry_after_s,
            "retry_after_header": self.retry_after_header,
            "times": self.times,
            "delay_ms": self.delay_ms,
            "reset": self.reset,
            "message": self.message,
            "reason": self.reason,
            "matched": self.matched,
            "active": self.active(),
        })
    }

    /// Still answering calls (`times` not used up).
    pub fn active(&self) -> bool {
        self.times.is_none_or(|t| self.matched < t)
    }
}

/// Parses the body of `PUT /__fake/rules`: a JSON list of rules.
pub fn parse_rules(body: &[u8]) -> Result<Vec<Rule>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("rules are not JSON: {e}"))?;
    let list = v.as_array().ok_or("rules must be a JSON list")?;
    list.iter().enumerate().map(|(i, r)| Rule::parse(r).map_err(|e| format!("rule {i}: {e}"))).collect()
}

/// The first active rule that matches the call, counted as used.
pub fn take_rule(rules: &mut [Rule], facts: &Facts) -> Option<Rule> {
    let r = rules.iter_mut().find(|r| r.active() && r.when.holds(facts))?;
    r.matched += 1;
    Some(r.clone())
}

/// `7` as `"7s"`, `1.5` as `"1.5s"`: a protobuf Duration in JSON.
pub fn duration_json(secs: f64) -> String {
    if secs.fract() == 0.0 {
        format!("{}s", secs as u64)
    } else {
        format!("{secs}s")
    }
}

// ---------------------------------------------------------------------------------------------
// Stats

#[derive(Default)]
pub struct Stats {
    requests: u64,
    statuses: BTreeMap<String, u64>,
    backends: BTreeMap<String, u64>,
    api_methods: BTreeMap<String, u64>,
    api_method_statuses: BTreeMap<String, BTreeMap<String, u64>>,
    auth: BTreeMap<String, u64>,
    api_keys: BTreeMap<String, u64>,
    api_key_statuses: BTreeMap<String, BTreeMap<String, u64>>,
    bearers: BTreeMap<String, u64>,
    bearer_statuses: BTreeMap<String, BTreeMap<String, u64>>,
}

impl Stats {
    /// Counts a `generateContent` or `streamGenerateContent` call: `status` is the HTTP status
    /// (a stream's is 200, however it ends), or `reset`.
    pub fn count(
        &mut self,
        backend: Backend,
        method: ApiMethod,
        kind: &str,
        key_label: Option<&str>,
        bearer_label: Option<&str>,
        status: &str,
    ) {
        self.requests += 1;
        *self.statuses.entry(status.into()).or_default() += 1;
        *self.backends.entry(backend.name().into()).or_default() += 1;
        *self.api_methods.entry(method.name().into()).or_default() += 1;
        *self.api_method_statuses.entry(method.name().into()).or_default().entry(status.into()).or_default() += 1;
        *self.auth.entry(kind.into()).or_default() += 1;
        if let Some(k) = key_label {
            *self.api_keys.entry(k.into()).or_default() += 1;
            *self.api_key_statuses.entry(k.into()).or_default().entry(status.into()).or_default() += 1;
        }
        if let Some(b) = bearer_label {
            *self.bearers.entry(b.into()).or_default() += 1;
            *self.bearer_statuses.entry(b.into()).or_default().entry(status.into()).or_default() += 1;
        }
    }

    pub fn to_json(&self, rules: &[Rule]) -> Value {
        json!({
            "requests": self.requests,
            "statuses": self.statuses,
            "backends": self.backends,
            "api_methods": self.api_methods,
            "api_method_statuses": self.api_method_statuses,
            "auth": self.auth,
            "api_keys": self.api_keys,
            "api_key_statuses": self.api_key_statuses,
            "bearers": self.bearers,
            "bearer_statuses": self.bearer_statuses,
            "rules": rules.iter().map(|r| json!({"matched": r.matched, "active": r.active()})).collect::<Vec<_>>(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens

/// What a bearer token is worth here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenCheck {
    Valid(String),
    /// Expired, or issued before `DELETE /__fake/tokens`.
    Expired(String),
    Unknown(String),
}

impl TokenCheck {
    pub fn label(&self) -> &str {
        match self {
            TokenCheck::Valid(l) | TokenCheck::Expired(l) | TokenCheck::Unknown(l) => l,
        }
    }
}

/// The OAuth access tokens this process takes: those its metadata server issues (and those of
/// any fake-gemini with the same `--token-secret`), `--bearer` ones and registered ones.
///
/// An issued token is `ya29.fake-SEQ-IAT_US-EXP_MS-NONCE-MAC`: it carries its own expiry, and
/// the MAC (a hash of the rest and the secret) lets another process with the same secret check
/// it without sharing any state.
pub struct Tokens {
    secret: String,
    seq: u64,
    statics: Vec<String>,
    registered: Vec<(String, Option<u64>)>,
    /// Issued tokens with an `IAT_US` up to this are revoked.
    revoked_through_us: u64,
}

impl Default for Tokens {
    fn default() -> Tokens {
        Tokens::new(format!("{:016x}{:016x}", random_u64(), random_u64()))
    }
}

fn mac(secret: &str, body: &str) -> u64 {
    // Not cryptographic: enough for a fake to tell its tokens from made-up ones. The hasher
    // with fixed keys gives the same answer in every process of this build.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(0x6661_6b65_2d67_656d, 0x696e_692d_746f_6b65);
    secret.hash(&mut h);
    body.hash(&mut h);
    h.finish()
}

impl Tokens {
    pub fn new(secret: String) -> Tokens {
        Tokens { secret, seq: 0, statics: Vec::new(), registered: Vec::new(), revoked_through_us: 0 }
    }

    pub fn add_static(&mut self, token: String) {
        self.statics.push(token);
    }

    /// Issues a token valid for `expires_in_s` seconds from `now_us`.
    pub fn issue(&mut self, expires_in_s: u64, now_us: u64) -> String {
        self.seq += 1;
        let exp_ms = now_us / 1000 + expires_in_s.saturating_mul(1000);
        let body = format!("ya29.fake-{}-{}-{}-{:016x}", self.seq, now_us, exp_ms, random_u64());
        let m = mac(&self.secret, &body);
        format!("{body}-{m:016x}")
    }

    pub fn register(&mut self, token: String, expires_at_ms: Option<u64>) {
        self.registered.retain(|(t, _)| *t != token);
        self.registered.push((token, expires_at_ms));
    }

    /// Revokes every token issued so far and forgets registered ones (`--bearer` ones stay).
    pub fn revoke(&mut self, now_us: u64) {
        self.revoked_through_us = now_us;
        self.registered.clear();
    }

    pub fn check(&self, token: &str, now_us: u64) -> TokenCheck {
        if let Some(i) = self.statics.iter().position(|t| t == token) {
            return TokenCheck::Valid(format!("bearer#{i}"));
        }
        if let Some(i) = self.registered.iter().position(|(t, _)| t == token) {
            let label = format!("registered#{i}");
            return match self.registered[i].1 {
                Some(exp) if exp <= now_us / 1000 => TokenCheck::Expired(label),
                _ => TokenCheck::Valid(label),
            };
        }
        let issued = token.rsplit_once('-').and_then(|(body, m)| {
            let m = u64::from_str_radix(m, 16).ok()?;
            if m != mac(&self.secret, body) {
                return None;
            }
            let mut parts = body.strip_prefix("ya29.fake-")?.split('-');
            let seq: u64 = parts.next()?.parse().ok()?;
            let iat_us: u64 = parts.next()?.parse().ok()?;
            let exp_ms: u64 = parts.next()?.parse().ok()?;
            Some((seq, iat_us, exp_ms))
        });
        match issued {
            Some((seq, iat_us, exp_ms)) => {
                let label = format!("metadata#{seq}");
                if exp_ms <= now_us / 1000 || iat_us <= self.revoked_through_us {
                    TokenCheck::Expired(label)
                } else {
                    TokenCheck::Valid(label)
                }
            }
            None => TokenCheck::Unknown(last4(token)),
        }
    }
}

/// Parses `PUT /__fake/tokens`: `{"token": T, "expires_in": N}` (seconds; absent: never).
pub fn parse_token_registration(body: &[u8], now_ms: u64) -> Result<(String, Option<u64>), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let o = take_fields(&v, "a token registration", &["token", "expires_in"])?;
    let token = opt_string(&o, "token")?.filter(|t| !t.is_empty()).ok_or("token is required")?;
    if token.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err("token must be printable ASCII without spaces".into());
    }
    let exp = opt_u64(&o, "expires_in")?.map(|s| now_ms + s.saturating_mul(1000));
    Ok((token, exp))
}

// ---------------------------------------------------------------------------------------------
// Metadata server

#[derive(Clone, Debug, PartialEq)]
pub struct MetadataSettings {
    pub expires_in: u64,
    /// Answer token fetches with this status (`None`: issue tokens).
    pub fail: Option<u16>,
    /// Only the next this many fetches fail (`None`: all, until cleared).
    pub fail_times: Option<u64>,
    pub delay_ms: u64,
    pub project_id: String,
}

impl Default for MetadataSettings {
    fn default() -> MetadataSettings {
        MetadataSettings {
            expires_in: 3599,
            fail: None,
            fail_times: None,
            delay_ms: 0,
            project_id: "fake-project".into(),
        }
    }
}

impl MetadataSettings {
    /// Applies `PUT /__fake/metadata`: only the fields given change; `null` clears `fail` and
    /// `fail_times`.
    pub fn update(&mut self, body: &[u8]) -> Result<(), String> {
        let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
        let o = take_fields(&v, "metadata settings", &["expires_in", "fail", "fail_times", "delay_ms", "project_id"])?;
        let mut next = self.clone();
        if let Some(n) = opt_u64(&o, "expires_in")? {
            next.expires_in = n;
        }
        if o.contains_key("fail") {
            next.fail = match opt_u64(&o, "fail")? {
                None => {
                    next.fail_times = None;
                    None
                }
                Some(s) if (400..=599).contains(&s) => Some(s as u16),
                Some(_) => return Err("fail must be an error status, 400 to 599, or null".into()),
            };
        }
        if o.contains_key("fail_times") {
            next.fail_times = opt_u64(&o, "fail_times")?;
        }
        if let Some(n) = opt_u64(&o, "delay_ms")? {
            next.delay_ms = n;
        }
        if let Some(p) = opt_string(&o, "project_id")? {
            next.project_id = p;
        }
        *self = next;
        Ok(())
    }

    pub fn to_json(&self) -> Value {
        json!({"expires_in": self.expires_in, "fail": self.fail, "fail_times": self.fail_times,
               "delay_ms": self.delay_ms, "project_id": self.project_id})
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetadataStats {
    /// Every `GET .../service-accounts/default/token`, refused and failed ones included.
    pub token_fetches: u64,
    pub tokens_issued: u64,
    /// Without `Metadata-Flavor: Google`, or with `X-Forwarded-For`.
    pub refused: u64,
    /// Answered with `fail`.
    pub failed: u64,
    pub project_id_fetches: u64,
}

impl MetadataStats {
    pub fn to_json(&self) -> Value {
        json!({"token_fetches": self.token_fetches, "tokens_issued": self.tokens_issued, "refused": self.refused,
               "failed": self.failed, "project_id_fetches": self.project_id_fetches})
    }
}

/// Whether a request may talk to the metadata server, as GCE decides: `Metadata-Flavor: Google`
/// and no `X-Forwarded-For`.
pub fn metadata_allowed(headers: &[(String, String)]) -> bool {
    headers.iter().any(|(k, v)| k == "metadata-flavor" && v.trim() == "Google")
        && !headers.iter().any(|(k, _)| k == "x-forwarded-for")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn routes_name_the_backend_and_model() {
        use ApiMethod::{Generate, Stream};
        assert_eq!(
            route("/v1beta/models/gemini-3-pro-image-preview:generateContent"),
            Some((Backend::Gemini, "gemini-3-pro-image-preview", Generate))
        );
        assert_eq!(
            route(
                "/v1/projects/p-1/locations/global/publishers/google/models/gemini-3-pro-image-preview:generateContent"
            ),
            Some((Backend::Vertex, "gemini-3-pro-image-preview", Generate))
        );
        assert_eq!(
            route("/v1beta1/projects/p/locations/us-central1/publishers/google/models/m:generateContent"),
            Some((Backend::Vertex, "m", Generate))
        );
        assert_eq!(route("/v1/publishers/google/models/m:generateContent"), Some((Backend::Vertex, "m", Generate)));
        assert_eq!(route("/v1beta/models/m:streamGenerateContent"), Some((Backend::Gemini, "m", Stream)));
        assert_eq!(
            route("/v1/projects/p/locations/l/publishers/google/models/m:streamGenerateContent"),
            Some((Backend::Vertex, "m", Stream))
        );
        assert_eq!(route("/v1/publishers/google/models/m:streamGenerateContent"), Some((Backend::Vertex, "m", Stream)));
        for bad in [
            "/v1/projects/p/locations/l/publishers/anthropic/models/m:generateContent",
            "/v1/projects//locations/l/publishers/google/models/m:generateContent",
            "/v1/projects/p/locations/l/publishers/google/models/:generateContent",
            "/v1/projects/p/locations/l/publishers/google/models/m:streamgeneratecontent",
            "/v1/projects/p/locations/l/publishers/google/models/m:countTokens",
            "/v1/projects/p/publishers/google/models/m:generateContent",
            "/v1beta/models/:generateContent",
            "/v1beta/models/:streamGenerateContent",
        ] {
            assert_eq!(route(bad), None, "{bad}");
        }
    }

    #[test]
    fn credentials_are_read_from_either_header() {
        let c = Credentials::of(&h(&[("authorization", "Bearer  tok-1 "), ("x-goog-api-key", "K")]));
        assert_eq!((c.bearer.as_deref(), c.api_key.as_deref(), c.kind()), (Some("tok-1"), Some("K"), "bearer"));
        let c = Credentials::of(&h(&[("authorization", "Basic abc")]));
        assert!(c.malformed_authorization);
        assert_eq!(c.kind(), "none");
        assert_eq!(Credentials::of(&h(&[("x-goog-api-key", "K")])).kind(), "api_key");
        assert_eq!(last4("secret-key-1234"), "last4:1234");
        assert_eq!(last4("ab"), "last4:ab");
    }

    #[test]
    fn rules_parse_strictly_and_match_in_order_for_their_times() {
        let rules = parse_rules(
            br#"[{"match": {"api_key": "K2"}, "status": 429, "retry_after_s": 7, "times": 2},
                 {"match": {"backend": "vertex", "auth": "bearer"}, "reset": true},
                 {"match": {"path_prefix": "/v1/projects/"}, "status": 503}]"#,
        );
        let mut rules = rules.expect("valid rules");
        assert_eq!(rules[0].retry_after_s, Some(7.0));
        let k2 = Credentials { api_key: Some("K2".into()), ..Credentials::default() };
        let tok = Credentials { bearer: Some("t".into()), ..Credentials::default() };
        let facts = |c, backend, path| Facts {
            path,
            backend,
            api_method: ApiMethod::Generate,
            credentials: c,
            api_key_index: None,
            prompt: "",
        };
        let gemini = "/v1beta/models/m:generateContent";
        let vertex = "/v1/projects/p/locations/l/publishers/google/models/m:generateContent";
        for _ in 0..2 {
            assert_eq!(take_rule(&mut rules, &facts(&k2, Backend::Gemini, gemini)).and_then(|r| r.status), Some(429));
        }
        assert_eq!(take_rule(&mut rules, &facts(&k2, Backend::Gemini, gemini)), None, "times used up");
        assert!(take_rule(&mut rules, &facts(&tok, Backend::Vertex, vertex)).is_some_and(|r| r.reset));
        assert_eq!(take_rule(&mut rules, &facts(&k2, Backend::Vertex, vertex)).and_then(|r| r.status), Some(503));
        assert_eq!(rules.iter().map(|r| r.matched).collect::<Vec<_>>(), [2, 1, 1]);
        assert!(!rules[0].active() && rules[1].active());

        // A rule for streams only.
        let mut rules = parse_rules(br#"[{"match": {"api_method": "streamGenerateContent"}, "status": 503}]"#)
            .expect("valid rules");
        assert_eq!(rules[0].to_json()["match"], json!({"api_method": "streamGenerateContent"}));
        assert_eq!(take_rule(&mut rules, &facts(&k2, Backend::Gemini, gemini)), None);
        let stream = Facts { api_method: ApiMethod::Stream, ..facts(&k2, Backend::Gemini, gemini) };
        assert!(take_rule(&mut rules, &stream).is_some());

        for (bad, why) in [
            (r#"{"status": 429}"#, "must be a JSON list"),
            (r#"[{"match": {"apikey": "x"}, "status": 429}]"#, "unknown field \"apikey\""),
            (r#"[{"status": 200}]"#, "400 to 599"),
            (r#"[{"match": {}}]"#, "needs a status"),
            (r#"[{"status": 429, "retry_after_s": -1}]"#, "non-negative"),
            (r#"[{"status": 429, "match": {"auth": "oauth"}}]"#, "api_key, bearer or none"),
            (r#"[{"status": 429, "match": {"api_method": "stream"}}]"#, "generateContent or streamGenerateContent"),
        ] {
            let e = parse_rules(bad.as_bytes()).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert_eq!(duration_json(7.0), "7s");
        assert_eq!(duration_json(1.5), "1.5s");
    }

    #[test]
    fn issued_tokens_expire_can_be_revoked_and_are_checked_across_processes() {
        let t0 = 1_800_000_000_000_000u64;
        let mut a = Tokens::new("shared".into());
        let tok = a.issue(60, t0);
        assert!(tok.starts_with("ya29.fake-1-"), "{tok}");
        assert_eq!(a.check(&tok, t0 + 1), TokenCheck::Valid("metadata#1".into()));
        assert_eq!(a.check(&tok, t0 + 60_000_000), TokenCheck::Expired("metadata#1".into()));
        // Another process with the same secret takes it; one with another secret does not.
        assert_eq!(Tokens::new("shared".into()).check(&tok, t0 + 1), TokenCheck::Valid("metadata#1".into()));
        assert!(matches!(Tokens::new("other".into()).check(&tok, t0 + 1), TokenCheck::Unknown(_)));
        // A forged expiry breaks the MAC.
        let forged = tok.replacen(&format!("-{}-", (t0 / 1000) + 60_000), "-9999999999999-", 1);
        assert_ne!(forged, tok);
        assert!(matches!(a.check(&forged, t0 + 1), TokenCheck::Unknown(_)));
        // Revocation: tokens issued until then answer as expired, later ones are fine.
        a.revoke(t0 + 10);
        assert_eq!(a.check(&tok, t0 + 20), TokenCheck::Expired("metadata#1".into()));
        let tok2 = a.issue(60, t0 + 11);
        assert_eq!(a.check(&tok2, t0 + 20), TokenCheck::Valid("metadata#2".into()));
        // Static and registered tokens.
        a.add_static("static-token".into());
        a.register("reg-token".into(), Some(t0 / 1000 + 5));
        assert_eq!(a.check("static-token", t0), TokenCheck::Valid("bearer#0".into()));
        assert_eq!(a.check("reg-token", t0), TokenCheck::Valid("registered#0".into()));
        assert_eq!(a.check("reg-token", t0 + 5_000_000), TokenCheck::Expired("registered#0".into()));
        assert_eq!(a.check("nope-abcd", t0), TokenCheck::Unknown("last4:abcd".into()));
        a.revoke(t0 + 30);
        assert!(matches!(a.check("reg-token", t0), TokenCheck::Unknown(_)));
        assert_eq!(a.check("static-token", t0), TokenCheck::Valid("bearer#0".into()));
    }

    #[test]
    fn metadata_settings_change_only_what_is_given() {
        let mut s = MetadataSettings::default();
        s.update(br#"{"fail": 503, "fail_times": 2, "delay_ms": 10}"#).expect("valid");
        assert_eq!((s.expires_in, s.fail, s.fail_times, s.delay_ms), (3599, Some(503), Some(2), 10));
        s.update(br#"{"fail": null, "expires_in": 30}"#).expect("valid");
        assert_eq!((s.expires_in, s.fail, s.fail_times), (30, None, None));
        assert!(s.update(br#"{"expires": 3}"#).is_err());
        assert!(s.update(br#"{"fail": 200}"#).is_err());
        assert_eq!(s.expires_in, 30, "a refused update changes nothing");
        assert!(metadata_allowed(&h(&[("metadata-flavor", "Google")])));
        assert!(!metadata_allowed(&h(&[("metadata-flavor", "google")])));
        assert!(!metadata_allowed(&h(&[("metadata-flavor", "Google"), ("x-forwarded-for", "1.2.3.4")])));
        assert!(parse_token_registration(br#"{"token": "a b"}"#, 0).is_err());
        assert_eq!(
            parse_token_registration(br#"{"token": "ab", "expires_in": 2}"#, 1000),
            Ok(("ab".into(), Some(3000)))
        );
    }
}
