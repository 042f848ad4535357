//! Coalescing, the exchange's side (contract section 7): a miss that may share a generation
//! asks the driver to join the flight for its key (`Effect::JoinFlight`). As leader it goes on
//! to call Gemini, and its outcome (`FlightEnd`) tells those waiting; as follower it waits
//! (`Phase::Waiting`) until the driver brings news of the flight (`on_flight_news`): the answer
//! is in the cache (served as `coalesced`), the same error, the leader was lost (the miss runs
//! again, and may lead), or the wait reached `gemini.timeout_ms`.

use super::*;

/// What the driver found when it joined the flight for a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlightRole {
    /// This request leads: it calls Gemini, and others may wait for it.
    Lead,
    /// An identical request leads: wait for its outcome.
    Follow,
    /// No flight to share (another key holds the lease slot, or the lease could not be
    /// written): call Gemini alone.
    Alone,
}

/// News of the flight a request follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlightNews {
    /// The answer is in the cache.
    Ready,
    /// The leader's error, as its client got it.
    Failed { status: u32, retry_after_s: Option<u64>, body: Vec<u8> },
    /// The leader vanished without an outcome.
    Lost,
    /// The leader's answer could not be shared: call Gemini without waiting on anyone.
    OnYourOwn,
    /// `gemini.timeout_ms` passed since this request began.
    TimedOut,
}

/// How a leader's generation ended, for those waiting on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlightEnd {
    /// Stored in L1: followers look it up.
    Stored,
    /// Not in L1 (a partial result, larger than L1's bound, or only queued for L2, which a
    /// follower could look for before the write is out): followers call Gemini on their own.
    Unshared,
    /// No outcome to share (refused room before any call): a follower takes over.
    Abandoned,
    /// Followers answer this error.
    Failed { status: u32, retry_after_s: Option<u64>, body: Vec<u8> },
}

/// An exchange's part in coalescing.
#[derive(Debug, Default)]
pub(super) struct FlightPart {
    leading: bool,
    /// Answered from a flight it waited for: its hit is `coalesced`.
    pub coalesced: bool,
    /// Told to call Gemini on its own: it does not join a flight again.
    alone: bool,
    /// Asking for room to wait (not to call Gemini).
    pub admitting_wait: bool,
    /// Its client left while it led a flight: it goes on without replying.
    pub client_gone: bool,
    end: Option<FlightEnd>,
}

impl FlightPart {
    /// Records how the flight this request leads ended (nothing when it does not lead).
    pub fn led(&mut self, end: FlightEnd) {
        if self.leading && self.end.is_none() {
            self.end = Some(end);
        }
    }
}

impl Exchange {
    /// After a miss in every tier: join the flight for the key when this request may share
    /// one, else ask for room to call Gemini. A request that skipped the lookup (`no-cache`) or
    /// streams never waits on another.
    pub(super) fn join_or_admit(&mut self, planned: Box<Planned>) -> Vec<Effect> {
        let coalesce = self.settings.cache.as_ref().is_some_and(|c| c.coalesce);
        match &planned.cache.key {
            Some(key) if coalesce && !self.flight.alone && planned.cache.lookup && planned.req.stream.is_none() => {
                let effect = Effect::JoinFlight {
                    key: key.clone(),
                    lease_ms: self.settings.gemini.timeout_ms.saturating_add(LEASE_MARGIN_MS),
                };
                self.phase = Phase::Joining(planned);
                vec![effect]
            }
            _ => self.admit(planned),
        }
    }

    /// The driver joined the flight.
    pub fn on_flight(&mut self, role: FlightRole, _now_ms: u64) -> Vec<Effect> {
        let Some(planned) = self.take(Phase::into_joining) else { return Vec::new() };
        match role {
            FlightRole::Lead => {
                self.flight.leading = true;
                self.admit(planned)
            }
            FlightRole::Alone => self.admit(planned),
            FlightRole::Follow => {
                // What it holds while it waits (its body; an edit's upload) counts in the
                // worker's in-flight bounds, as a leader's does: a crowd of waiting requests is
                // refused as overloaded rather than running the VM out of memory.
                self.flight.admitting_wait = true;
                let bytes = planned.call_body_len();
                self.phase = Phase::Admitting(planned);
                vec![Effect::Admit { bytes, images: 0 }]
            }
        }
    }

    /// How the flight this request leads ended, once it has (taken once).
    pub fn take_flight_end(&mut self) -> Option<FlightEnd> {
        self.flight.end.take()
    }

    /// The client of a leading request left: the request goes on for those waiting (the
    /// driver no longer replies), and its log line says the client closed.
    pub fn detach(&mut self) {
        self.flight.client_gone = true;
    }

    /// News of the flight this request waits for.
    pub fn on_flight_news(&mut self, news: FlightNews, now_ms: u64) -> Vec<Effect> {
        let Some(planned) = self.take(Phase::into_waiting) else { return Vec::new() };
        match news {
            // The leader's answer is in the cache, or this request runs the miss itself.
            FlightNews::Ready => {
                self.flight.coalesced = true;
                self.look_up(planned)
            }
            FlightNews::Lost => {
                let mut effects = vec![Effect::Count(Counter::CoalesceLeadersLost, 1)];
                effects.extend(self.look_up(planned));
                effects
            }
            FlightNews::OnYourOwn => {
                self.flight.alone = true;
                self.admit(planned)
            }
            FlightNews::TimedOut => {
                let e = ApiError::timed_out("an identical request's image was not ready within the gateway's timeout");
                let ending = Ending::new(e.status(), Outcome::Error, Some(&planned));
                let mut effects = self.error_reply(e, ending, now_ms);
                effects.push(Effect::Count(Counter::CoalesceWaitsTimedOut, 1));
                effects
            }
            FlightNews::Failed { status, retry_after_s, body } => {
                self.shared_error(&planned, status, retry_after_s, body, now_ms)
            }
        }
    }

    /// The leader's error, answered to a follower as its own client got it.
    fn shared_error(
        &mut self,
        planned: &Planned,
        status: u32,
        retry_after_s: Option<u64>,
        body: Vec<u8>,
        now_ms: u64,
    ) -> Vec<Effect> {
        self.cache_state = CacheState::Coalesced;
        let code = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().and_then(<ErrorCode as crate::named::Named>::parse))
            .unwrap_or(ErrorCode::UpstreamError);
        let ending = Ending::new(status, Outcome::Error, Some(planned));
        let mut effects = self.error_answer(code, retry_after_s, Rc::new(body), ending, now_ms);
        effects.push(Effect::Count(Counter::Coalesced, 1));
        effects
    }
}

/// A lease outlives its leader's own deadline by this much, so that followers never take over
/// from a leader that is only slow.
pub const LEASE_MARGIN_MS: u64 = 5_000;

impl Phase {
    fn into_joining(self) -> Result<Box<Planned>, Phase> {
        match self {
            Phase::Joining(p) => Ok(p),
            other => Err(other),
        }
    }

    fn into_waiting(self) -> Result<Box<Planned>, Phase> {
        match self {
            Phase::Waiting(p) => Ok(p),
            other => Err(other),
        }
    }
}
