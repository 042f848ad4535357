//! The filter's Envoy metrics: one place that names them. Names put the label last
//! (`gemini_image.errors.code.IMG_QUOTA_EXHAUSTED`), so Envoy's `stats_tags` can turn it into a
//! label (`gemini_image_errors{code="IMG_QUOTA_EXHAUSTED"}`); see docs/observability.md.

use crate::error::ErrorCode;
use crate::model::Families;
use crate::named::{named, Named};
use crate::safety::SafetyLevel;

pub const PREFIX: &str = "gemini_image";

/// How a request ended, for `requests.outcome.*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CacheState {
    /// Looked and did not find, or no cache is configured.
    Miss,
    /// The client said `no-store`.
    Bypass,
    Hit(CacheTier),
}

impl Named for CacheState {
    const ALL: &'static [Self] =
        &[CacheState::Miss, CacheState::Bypass, CacheState::Hit(CacheTier::L1), CacheState::Hit(CacheTier::L2)];

    fn name(self) -> &'static str {
        match self {
            CacheState::Miss => "miss",
            CacheState::Bypass => "bypass",
            CacheState::Hit(CacheTier::L1) => "hit-l1",
            CacheState::Hit(CacheTier::L2) => "hit-l2",
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
        }
    }

    /// Every counter, defined up front so that dashboards see zeros rather than gaps.
    pub fn all(families: &Families) -> Vec<Counter> {
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
        all.extend([
            Counter::CacheMisses,
            Counter::CacheBypass,
            Counter::CacheL2Errors,
            Counter::CacheL2Rejected,
            Counter::CacheL1Evictions,
            Counter::CacheL1TooLarge,
        ]);
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
        let families = crate::model::Families(crate::model::Family::defaults());
        let names: Vec<String> = Counter::all(&families).iter().map(Counter::name).collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        assert!(names.contains(&"gemini_image.errors.code.IMG_QUOTA_EXHAUSTED".to_string()));
        assert!(names.contains(&"gemini_image.model_requests.model.gemini-3-pro-image-4k-16x9".to_string()));
        assert!(names.contains(&"gemini_image.model_requests.model.gemini-2.5-flash-image-9x16".to_string()));
        assert!(names.contains(&"gemini_image.requests.outcome.success".to_string()));
        assert!(names.iter().all(|n| n.starts_with("gemini_image.")));
    }
}
