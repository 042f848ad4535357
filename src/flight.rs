//! Coalescing (contract section 7): while a miss for a cache key is being generated in this
//! Envoy, identical requests on any worker wait for it instead of calling Gemini.
//!
//! Workers are separate wasm VMs that share only Envoy's shared data (a string-to-bytes map
//! with a compare-and-swap version per key), so the state of one generation in flight is a
//! *lease* stored there. Workers crash and reload mid-flight, so a lease is never a lock: it
//! carries an expiry, and anyone may take over an expired one. The leader writes `Flying` when
//! it starts and its outcome (`Done`, `Failed`, `Abandoned`) when it ends; followers poll.
//!
//! Shared data has no delete and no listing, so leases live in a fixed set of `FLIGHT_SLOTS`
//! slots chosen by hash, like L1: memory stays bounded whatever the traffic. Two keys that
//! share a slot do not coalesce with each other; the later one simply calls Gemini alone.
//!
//! Everything here is pure: the host reads a slot, asks `join`, `outlook` or `finish` what to
//! do, and writes the answer with the version it read, so a lost race is seen and retried.

use crate::cache::CacheKey;
use crate::error::{ApiError, ErrorCode};
use crate::reader::Reader;

/// Shared-data slots that hold leases: a bounded set, so shared data never grows with traffic.
/// A few hundred is plenty: a slot is busy only while a generation is in flight (seconds).
pub const FLIGHT_SLOTS: u32 = 1024;

/// The longest error body a `Failed` lease carries. The filter's own errors are a few hundred
/// bytes (Gemini's messages are cut to 300 characters), so this only guards the bound.
pub const MAX_ERROR_BYTES: usize = 4096;

const MAGIC: &[u8; 4] = b"GIF1";

/// The shared-data key of the slot a cache key's lease lives in: `gemini_image.flight.{n}`.
///
/// L1 picks its slots from `slot_seed` modulo its size (`cache::l1_slots`); with both sizes
/// powers of two, taking the flight slot the same way would make every two keys that share an
/// L1 slot share a flight slot too. The seed goes through a bijective mixer first, so the two
/// kinds of collision are independent.
pub fn slot_key(key: &CacheKey) -> String {
    slot_key_at(slot_index(key.slot_seed))
}

/// The shared-data key of slot `n`.
pub fn slot_key_at(n: u32) -> String {
    format!("gemini_image.flight.{n}")
}

/// What an unused slot holds once seeded: a value that reads as no lease. A slot that holds
/// something has a version, so every lease write is a compare-and-swap; on a key that does not
/// exist yet, Envoy writes whatever the version, and two workers could both lead.
pub const EMPTY_SLOT: &[u8] = b"-";

/// The slot number behind `slot_key`.
pub fn slot_index(slot_seed: u64) -> u32 {
    (mix(slot_seed) % u64::from(FLIGHT_SLOTS)) as u32
}

/// MurmurHash3's 64-bit finalizer: every output bit depends on every input bit.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// One generation in flight (or just finished), as stored in its slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The cache key it is for: a slot is shared by many keys.
    pub key: String,
    /// The flight's id, random, chosen by its leader: it tells this flight from a later one
    /// for the same key, so a follower notices that its flight was replaced.
    pub flight: u64,
    pub state: State,
    /// A `Flying` lease past this is lost (its leader died or hung); a `Done`, `Failed` or
    /// `Abandoned` one is forgotten after it, and the slot is free.
    pub expires_at_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// The leader is generating.
    Flying,
    /// The answer is in the cache (L1 and/or L2): followers look it up.
    Done,
    /// The generation failed: followers answer this error. `status` is the HTTP status (400
    /// to 599), `retry_after_s` the `retry-after` header if any, `body` the OpenAI error JSON
    /// (at most `MAX_ERROR_BYTES`).
    Failed { status: u32, retry_after_s: Option<u64>, body: Vec<u8> },
    /// The leader gave up without an outcome (it was refused room before any call, or its
    /// calls died with it): a follower takes over.
    Abandoned,
    /// The answer came but no tier can hold it (a partial result, or larger than L1's bound
    /// with no L2): followers call Gemini each on its own, at once, rather than one after
    /// another as leaders of flights that could never be shared either.
    Uncached,
}

const TAG_FLYING: u8 = 0;
const TAG_DONE: u8 = 1;
const TAG_FAILED: u8 = 2;
const TAG_ABANDONED: u8 = 3;
const TAG_UNCACHED: u8 = 4;

/// Writes a lease: `GIF1`, the key (u32 length, bytes), the flight id and the expiry (u64
/// each), a state tag, and for `Failed` the status (u32), the retry-after (a tag, then u64 if
/// present) and the body (u32 length, bytes). All numbers big-endian. Every length is written,
/// so a cut or padded value reads as nothing rather than as another lease.
///
/// `encode` never writes what `decode` refuses: a `Failed` that cannot be shared as it is (a
/// body over `MAX_ERROR_BYTES`, a status that is not an error) is written as a generic error
/// of its status (500 when the status is not one). Cutting the body would break its JSON, and
/// refusing would leave the leader nothing to write but `Abandoned`, which sends every follower
/// to Gemini on its own; a generic error of the same status and retry-after keeps what a client
/// acts on. The filter's own errors are far below the bound, so this is a guard, not a path.
pub fn encode(lease: &Lease) -> Vec<u8> {
    let extra = match &lease.state {
        State::Failed { body, .. } => body.len().min(MAX_ERROR_BYTES) + 17,
        _ => 0,
    };
    let mut out = Vec::with_capacity(4 + 4 + lease.key.len() + 8 + 8 + 1 + extra);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(lease.key.len() as u32).to_be_bytes());
    out.extend_from_slice(lease.key.as_bytes());
    out.extend_from_slice(&lease.flight.to_be_bytes());
    out.extend_from_slice(&lease.expires_at_ms.to_be_bytes());
    match &lease.state {
        State::Flying => out.push(TAG_FLYING),
        State::Done => out.push(TAG_DONE),
        State::Abandoned => out.push(TAG_ABANDONED),
        State::Uncached => out.push(TAG_UNCACHED),
        State::Failed { status, retry_after_s, body } => {
            out.push(TAG_FAILED);
            let generic;
            let (status, body) = if !is_error_status(*status) {
                generic = generic_error(500);
                (500, &generic)
            } else if body.len() > MAX_ERROR_BYTES {
                generic = generic_error(*status);
                (*status, &generic)
            } else {
                (*status, body)
            };
            out.extend_from_slice(&status.to_be_bytes());
            match retry_after_s {
                Some(s) => {
                    out.push(1);
                    out.extend_from_slice(&s.to_be_bytes());
                }
                None => out.push(0),
            }
            out.extend_from_slice(&(body.len() as u32).to_be_bytes());
            out.extend_from_slice(body);
        }
    }
    out
}

/// Reads a lease; `None` for anything that is not one whole, well-formed lease: another
/// magic, a cut value, trailing bytes, an unknown tag, a key that is not UTF-8, a `Failed`
/// whose status is not an error or whose body is over `MAX_ERROR_BYTES`. Lengths are checked
/// against what is there before anything is copied, so a huge length field costs nothing.
pub fn decode(bytes: &[u8]) -> Option<Lease> {
    let mut r = Reader::new(bytes);
    if r.take(4)? != MAGIC {
        return None;
    }
    let key_len = r.u32()? as usize;
    let key = std::str::from_utf8(r.take(key_len)?).ok()?.to_string();
    let flight = r.u64()?;
    let expires_at_ms = r.u64()?;
    let state = match r.u8()? {
        TAG_FLYING => State::Flying,
        TAG_DONE => State::Done,
        TAG_ABANDONED => State::Abandoned,
        TAG_UNCACHED => State::Uncached,
        TAG_FAILED => {
            let status = r.u32()?;
            if !is_error_status(status) {
                return None;
            }
            let retry_after_s = match r.u8()? {
                0 => None,
                1 => Some(r.u64()?),
                _ => return None,
            };
            let body_len = r.u32()? as usize;
            if body_len > MAX_ERROR_BYTES {
                return None;
            }
            State::Failed { status, retry_after_s, body: r.take(body_len)?.to_vec() }
        }
        _ => return None,
    };
    if r.rest() != 0 {
        return None;
    }
    Some(Lease { key, flight, state, expires_at_ms })
}

/// A status a client can be answered as an error.
fn is_error_status(status: u32) -> bool {
    (400..=599).contains(&status)
}

/// The error body that stands for one too long to share: the code of the same status, so the
/// body agrees with the status the client gets.
fn generic_error(status: u32) -> Vec<u8> {
    let code = match status {
        400 => ErrorCode::InvalidRequest,
        403 => ErrorCode::PolicyDenied,
        404 => ErrorCode::ImageNotFound,
        413 => ErrorCode::PayloadTooLarge,
        429 => ErrorCode::QuotaExhausted,
        502 => ErrorCode::UpstreamError,
        503 => ErrorCode::ServiceUnavailable,
        504 => ErrorCode::NetworkError,
        _ => ErrorCode::InternalError,
    };
    crate::openai::error_body(&ApiError::new(code, "The identical request this one waited for failed."))
}

/// A lease at or past its expiry: `now_ms >= expires_at_ms`, as for L1 entries.
fn expired(lease: &Lease, now_ms: u64) -> bool {
    now_ms >= lease.expires_at_ms
}

/// What a request that missed the cache does, given the slot's current value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Join {
    /// Lead a new flight: write this value with the slot's CAS version; if the write loses the
    /// race, read the slot and join again.
    Lead(Vec<u8>),
    /// Wait for flight `flight` (same key, flying, not expired) until `expires_at_ms`, looking
    /// again with `outlook`.
    Follow { flight: u64, expires_at_ms: u64 },
    /// The slot holds a live lease for another key: no coalescing for this request, which
    /// calls Gemini on its own without a lease (taking the slot would strand that key's
    /// followers).
    Alone,
}

/// What a request that missed the cache for `key` does. `current` is the slot's value (`None`:
/// empty or unreadable, so free); `flight` the id the caller would use as leader; `lease_ms`
/// how long a new lease lives (the caller passes `gemini.timeout_ms` plus a margin, so a lease
/// outlives a healthy leader's calls but not a dead one by much).
///
/// - Free, unreadable, expired (any state), or `Abandoned` (any key): lead.
/// - Same key: `Flying` follows; `Failed` leads (an error is shared only with the requests
///   that waited for it, never with later arrivals, which deserve their own try); `Done` leads
///   too (the caller missed the cache after the flight was done, so the entry was not kept).
/// - Another key, live and `Flying`, `Done` or `Failed`: alone (a finished lease lingers so
///   that its followers see the outcome; overwriting it would send them back to Gemini).
pub fn join(current: Option<&[u8]>, key: &str, flight: u64, now_ms: u64, lease_ms: u64) -> Join {
    let lead = || {
        let lease = Lease {
            key: key.to_string(),
            flight,
            state: State::Flying,
            expires_at_ms: now_ms.saturating_add(lease_ms),
        };
        Join::Lead(encode(&lease))
    };
    let Some(lease) = current.and_then(decode) else { return lead() };
    if expired(&lease, now_ms) {
        return lead();
    }
    match (&lease.state, lease.key == key) {
        (State::Abandoned, _) => lead(),
        (State::Flying, true) => Join::Follow { flight: lease.flight, expires_at_ms: lease.expires_at_ms },
        (State::Done | State::Failed { .. } | State::Uncached, true) => lead(),
        (State::Flying | State::Done | State::Failed { .. } | State::Uncached, false) => Join::Alone,
    }
}

/// What a follower of `flight` sees when it looks again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outlook {
    /// Still flying: keep waiting.
    Waiting,
    /// Done: look the answer up in the cache.
    Ready,
    /// Failed: answer this error.
    Failed { status: u32, retry_after_s: Option<u64>, body: Vec<u8> },
    /// The flight is gone (expired while flying, abandoned, replaced by another flight or key,
    /// slot empty or unreadable): run the miss path again (look up, then join).
    Lost,
    /// The answer could not be shared (`Uncached`): call Gemini without joining again.
    OnYourOwn,
}

/// What became of flight `flight` for `key`, given the slot's current value.
///
/// A `Done`, `Failed` or `Uncached` lease of this very flight is its outcome even past its expiry: the
/// expiry frees the slot for new flights, it does not make the outcome untrue, and a follower
/// whose timer fired late should not call Gemini again for an answer already given. A `Flying`
/// one past its expiry is lost: its leader is presumed dead.
pub fn outlook(current: Option<&[u8]>, key: &str, flight: u64, now_ms: u64) -> Outlook {
    let Some(lease) = current.and_then(decode) else { return Outlook::Lost };
    if lease.key != key || lease.flight != flight {
        return Outlook::Lost;
    }
    match lease.state {
        State::Flying if expired(&lease, now_ms) => Outlook::Lost,
        State::Flying => Outlook::Waiting,
        State::Done => Outlook::Ready,
        State::Failed { status, retry_after_s, body } => Outlook::Failed { status, retry_after_s, body },
        State::Abandoned => Outlook::Lost,
        State::Uncached => Outlook::OnYourOwn,
    }
}

/// The leader's last write: the new value of the slot if it still holds this flight, flying
/// (expired or not: if nobody took over, the outcome still helps whoever waits); `None` when
/// someone took over or the flight already ended, so the leader writes nothing and leaves the
/// slot to its new owner.
///
/// The outcome lingers `linger_ms` (long enough for followers polling every few ms to see it)
/// and the slot is free after that. (Given `Flying`, this renews the lease for `linger_ms`.)
pub fn finish(
    current: Option<&[u8]>,
    key: &str,
    flight: u64,
    state: State,
    now_ms: u64,
    linger_ms: u64,
) -> Option<Vec<u8>> {
    let lease = current.and_then(decode)?;
    if lease.key != key || lease.flight != flight || lease.state != State::Flying {
        return None;
    }
    Some(encode(&Lease { key: key.to_string(), flight, state, expires_at_ms: now_ms.saturating_add(linger_ms) }))
}

#[cfg(test)]
#[path = "flight_tests.rs"]
mod tests;
