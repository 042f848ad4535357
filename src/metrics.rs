//! The filter's Envoy metrics: one place that names them. Names put the label last
//! (`gemini_image.errors.code.IMG_QUOTA_EXHAUSTED`), so Envoy's `stats_tags` can turn it into a
//! label (`gemini_image_errors{code="IMG_QUOTA_EXHAUSTED"}`); see docs/observability.md.

use crate::backends::{Backends, Credential};
use crate::config::Settings;
use crate::error::ErrorCode;
use crate::files::FetchResult;
use crate::gemini::CallOutcome;
use crate::named::{named, Named};
use crate::safety::SafetyLevel;

pub const PREFIX: &str = "gemini_image";

/// How a request ended, for `requests.outcome.*`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Outcome {
    #[default]
    Success,
    /// A 200 with fewer images than asked.
    Partial,
    Error,
    ClientClosed,
}

named!(Outcome { Success => "success", Partial => "partial", Error => "error", ClientClosed => "client_closed" });

/// The two cache tiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CacheTier {
    L1,
    L2,
}

named!(CacheTier { L1 => "l1", L2 => "l2" });

/// What the cache did for a request: the `x-image-cache` header and the log's `cache` field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CacheState {
    /// Looked and did not find, or no cache is configured.
    #[default]
    Miss,
    /// The client said `no-store`.
    Bypass,
    Hit(CacheTier),
    /// Waited for an identical request's generation in flight and got its answer.
    Coalesced,
}

impl Named for CacheState {
    const ALL: &'static [Self] = &[
        CacheState::Miss,
        CacheState::Bypass,
        CacheState::Hit(CacheTier::L1),
        CacheState::Hit(CacheTier::L2),
        CacheState::Coalesced,
    ];

    fn name(self) -> &'static str {
        match self {
            CacheState::Miss => "miss",
            CacheState::Bypass => "bypass",
            CacheState::Hit(CacheTier::L1) => "hit-l1",
            CacheState::Hit(CacheTier::L2) => "hit-l2",
            CacheState::Coalesced => "coalesced",
        }
    }
}

impl CacheState {
    pub fn as_str(self) -> &'static str {
        self.name()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// Every image request, by how it ended.
    Requests(Outcome),
    /// Image requests by resolved model variant (its canonical name).
    ModelRequests(String),
    /// Images returned to clients.
    Images,
    /// Gemini calls made.
    UpstreamCalls,
    /// Error answers by code.
    Errors(ErrorCode),
    /// Safety blocks, by the level that was in force.
    SafetyBlocks(SafetyLevel),
    /// Requests by the safety level applied.
    SafetyApplied(SafetyLevel),
    /// Requests answered from the cache, by tier.
    CacheHits(CacheTier),
    /// Requests that looked in the cache and went to Gemini.
    CacheMisses,
    /// Requests that skipped the cache (`cache-control: no-store`).
    CacheBypass,
    /// Entries written, by tier.
    CacheStores(CacheTier),
    /// Cache service calls that failed, timed out, or answered garbage (each cost a miss).
    CacheL2Errors,
    /// L2 entries that read back but failed the checks of an untrusted answer (each a miss).
    CacheL2Rejected,
    /// L1 stores that replaced another live entry.
    CacheL1Evictions,
    /// Entries over `cache.l1.max_entry_bytes`, kept out of L1.
    CacheL1TooLarge,
    /// Attempts of Gemini calls by backend name, key index and how they ended.
    UpstreamAttempts(String, usize, AttemptOutcome),
    /// Keys cooled down, by backend name and key index.
    KeyCooldowns(String, usize),
    /// Metadata token fetches by backend name: succeeded (true) or failed.
    TokenFetches(String, bool),
    /// Image requests by the policy profile in force.
    ProfileRequests(String),
    /// What Google was paid, by profile, in micro-dollars.
    CostMicroUsd(String),
    /// What cache hits saved, by profile, in micro-dollars.
    SavedMicroUsd(String),
    /// Requests refused by the profile's images per minute.
    RateLimited(String),
    /// Fetches of image URLs by how they ended.
    FileFetches(FetchResult),
    /// Requests answered by an identical request's generation in flight (contract section 7).
    Coalesced,
    /// Waiting requests whose leader vanished without an outcome (its VM died or it gave up):
    /// each then ran the miss itself.
    CoalesceLeadersLost,
    /// Waiting requests that reached `gemini.timeout_ms` before their leader's outcome.
    CoalesceWaitsTimedOut,
}

/// How one attempt of a Gemini call ended, for `upstream_attempts`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttemptOutcome {
    /// An image, or an answer no retry would change (a block, a 400).
    Ok,
    Quota,
    Auth,
    Unavailable,
    /// Reset, refused, timed out.
    Network,
    Error,
}

named!(AttemptOutcome {
    Ok => "ok",
    Quota => "quota",
    Auth => "auth",
    Unavailable => "unavailable",
    Network => "network",
    Error => "error",
});

impl AttemptOutcome {
    pub fn of(outcome: &CallOutcome) -> AttemptOutcome {
        let Err(e) = &outcome.result else { return AttemptOutcome::Ok };
        match e.code {
            ErrorCode::QuotaExhausted => AttemptOutcome::Quota,
            ErrorCode::UpstreamAuth => AttemptOutcome::Auth,
            ErrorCode::ServiceUnavailable => AttemptOutcome::Unavailable,
            ErrorCode::NetworkError => AttemptOutcome::Network,
            ErrorCode::SafetyBlocked | ErrorCode::InvalidPrompt | ErrorCode::InvalidRequest | ErrorCode::NoImage => {
                AttemptOutcome::Ok
            }
            _ => AttemptOutcome::Error,
        }
    }
}

/// Values that go up and down.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Gauge {
    /// Seconds since the backend's metadata token was fetched (0: none yet).
    TokenAgeSeconds(String),
}

impl Gauge {
    pub fn name(&self) -> String {
        match self {
            Gauge::TokenAgeSeconds(b) => format!("{PREFIX}.token_age_seconds.backend.{b}"),
        }
    }

    pub fn all(backends: &Backends) -> Vec<Gauge> {
        backends
            .list
            .iter()
            .filter(|b| b.credentials.iter().any(|c| matches!(c, Credential::MetadataToken { .. })))
            .map(|b| Gauge::TokenAgeSeconds(b.name.clone()))
            .collect()
    }
}

impl Counter {
    pub fn name(&self) -> String {
        match self {
            Counter::Requests(o) => format!("{PREFIX}.requests.outcome.{}", o.as_str()),
            Counter::ModelRequests(v) => format!("{PREFIX}.model_requests.model.{v}"),
            Counter::Images => format!("{PREFIX}.images"),
            Counter::UpstreamCalls => format!("{PREFIX}.upstream_calls"),
            Counter::Errors(c) => format!("{PREFIX}.errors.code.{}", c.as_str()),
            Counter::SafetyBlocks(l) => format!("{PREFIX}.safety_blocks.level.{}", l.as_str()),
            Counter::SafetyApplied(l) => format!("{PREFIX}.safety_applied.level.{}", l.as_str()),
            Counter::CacheHits(t) => format!("{PREFIX}.cache_hits.tier.{}", t.as_str()),
            Counter::CacheMisses => format!("{PREFIX}.cache_misses"),
            Counter::CacheBypass => format!("{PREFIX}.cache_bypass"),
            Counter::CacheStores(t) => format!("{PREFIX}.cache_stores.tier.{}", t.as_str()),
            Counter::CacheL2Errors => format!("{PREFIX}.cache_l2_errors"),
            Counter::CacheL2Rejected => format!("{PREFIX}.cache_l2_rejected"),
            Counter::CacheL1Evictions => format!("{PREFIX}.cache_l1_evictions"),
            Counter::CacheL1TooLarge => format!("{PREFIX}.cache_l1_too_large"),
            Counter::UpstreamAttempts(b, k, o) => {
                format!("{PREFIX}.upstream_attempts.backend.{b}.key.{k}.outcome.{}", o.as_str())
            }
            Counter::KeyCooldowns(b, k) => format!("{PREFIX}.key_cooldowns.backend.{b}.key.{k}"),
            Counter::TokenFetches(b, ok) => {
                format!("{PREFIX}.token_fetches.backend.{b}.outcome.{}", if *ok { "ok" } else { "failed" })
            }
            Counter::ProfileRequests(p) => format!("{PREFIX}.profile_requests.profile.{p}"),
            Counter::CostMicroUsd(p) => format!("{PREFIX}.cost_micro_usd.profile.{p}"),
            Counter::SavedMicroUsd(p) => format!("{PREFIX}.saved_micro_usd.profile.{p}"),
            Counter::RateLimited(p) => format!("{PREFIX}.rate_limited.profile.{p}"),
            Counter::FileFetches(r) => format!("{PREFIX}.file_fetches.outcome.{}", r.as_str()),
            Counter::Coalesced => format!("{PREFIX}.coalesced"),
            Counter::CoalesceLeadersLost => format!("{PREFIX}.coalesce_leaders_lost"),
            Counter::CoalesceWaitsTimedOut => format!("{PREFIX}.coalesce_waits_timed_out"),
        }
    }

    /// Every counter, defined up front so that dashboards see zeros rather than gaps.
    pub fn all(settings: &Settings) -> Vec<Counter> {
        let (families, backends) = (&settings.families, &settings.backends);
        let levels = [SafetyLevel::Off, SafetyLevel::Low, SafetyLevel::Medium, SafetyLevel::High];
        let mut all: Vec<Counter> = Outcome::ALL.iter().copied().map(Counter::Requests).collect();
        all.extend(families.all_names().into_iter().map(Counter::ModelRequests));
        all.push(Counter::Images);
        all.push(Counter::UpstreamCalls);
        all.extend(ErrorCode::ALL.iter().copied().map(Counter::Errors));
        all.extend(levels.into_iter().map(Counter::SafetyBlocks));
        all.extend(levels.into_iter().map(Counter::SafetyApplied));
        for tier in [CacheTier::L1, CacheTier::L2] {
            all.push(Counter::CacheHits(tier));
            all.push(Counter::CacheStores(tier));
        }
        for b in &backends.list {
            for k in 0..b.credentials.len() {
                all.extend(AttemptOutcome::ALL.iter().map(|o| Counter::UpstreamAttempts(b.name.clone(), k, *o)));
                all.push(Counter::KeyCooldowns(b.name.clone(), k));
            }
            if b.credentials.iter().any(|c| matches!(c, Credential::MetadataToken { .. })) {
                all.push(Counter::TokenFetches(b.name.clone(), true));
                all.push(Counter::TokenFetches(b.name.clone(), false));
            }
        }
        all.extend([
            Counter::CacheMisses,
            Counter::CacheBypass,
            Counter::CacheL2Errors,
            Counter::CacheL2Rejected,
            Counter::CacheL1Evictions,
            Counter::CacheL1TooLarge,
            Counter::Coalesced,
            Counter::CoalesceLeadersLost,
            Counter::CoalesceWaitsTimedOut,
        ]);
        all.extend(FetchResult::ALL.iter().copied().map(Counter::FileFetches));
        for p in settings.profiles.keys() {
            all.push(Counter::ProfileRequests(p.clone()));
            all.push(Counter::CostMicroUsd(p.clone()));
            all.push(Counter::SavedMicroUsd(p.clone()));
            all.push(Counter::RateLimited(p.clone()));
        }
        all
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Histogram {
    /// Each Gemini call, dispatch to answer, in milliseconds.
    UpstreamLatencyMs,
    /// Each image request, headers to reply, in milliseconds.
    RequestLatencyMs,
}

impl Histogram {
    pub const ALL: [Histogram; 2] = [Histogram::UpstreamLatencyMs, Histogram::RequestLatencyMs];

    pub fn name(self) -> String {
        match self {
            Histogram::UpstreamLatencyMs => format!("{PREFIX}.upstream_latency_ms"),
            Histogram::RequestLatencyMs => format!("{PREFIX}.request_latency_ms"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_end_in_their_label() {
        let settings = crate::config::Settings::from_json(
            br#"{"backends": [{"name": "studio", "kind": "gemini", "cluster": "g", "api_key_envs": ["A", "B"]}],
                 "profiles": {"kids-app": {}}}"#,
            &|_| None,
        )
        .unwrap();
        let names: Vec<String> = Counter::all(&settings).iter().map(Counter::name).collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        assert!(names.contains(&"gemini_image.errors.code.IMG_QUOTA_EXHAUSTED".to_string()));
        assert!(names.contains(&"gemini_image.model_requests.model.gemini-3-pro-image-4k-16x9".to_string()));
        assert!(names.contains(&"gemini_image.model_requests.model.gemini-2.5-flash-image-9x16".to_string()));
        assert!(names.contains(&"gemini_image.requests.outcome.success".to_string()));
        assert!(names.contains(&"gemini_image.upstream_attempts.backend.studio.key.1.outcome.quota".to_string()));
        assert!(names.contains(&"gemini_image.key_cooldowns.backend.studio.key.0".to_string()));
        assert!(names.contains(&"gemini_image.cost_micro_usd.profile.kids-app".to_string()));
        assert!(names.contains(&"gemini_image.saved_micro_usd.profile.default".to_string()));
        assert!(names.iter().all(|n| n.starts_with("gemini_image.")));
    }
}
