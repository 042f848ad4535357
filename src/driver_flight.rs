//! Coalescing, the driver's side (contract section 7). Workers are separate VMs that share
//! only Envoy's shared data, so the flight for a key is a lease there (`crate::flight`): the
//! first miss takes it and leads, identical misses on any worker follow it, and the leader's
//! last write tells them how it ended.
//!
//! Two things need the root context:
//! - A follower has no timer of its own. The root's tick looks at each waiting stream's lease
//!   (every `FOLLOW_POLL_MS` while any waits) and, with the stream as the effective context,
//!   serves it.
//! - A leader's Gemini calls must outlive its client, since others wait for them. Calls belong
//!   to the context that was running when they were dispatched, and the SDK drops answers of a
//!   stream that is gone; so a leader's calls are dispatched by the root: the stream asks for
//!   the root's next tick at once (`Host::wake_root`) and the root sends them. If the client
//!   leaves, the stream goes on detached: its answer is stored and told to the followers, and
//!   nothing is sent to the client that left.
//!
//! The host glue keeps a stream that `is_parked` where the root can reach it, and calls
//! `on_root_tick` and `on_root_call_response` for it.

use super::*;
use crate::cache::CacheKey;
use crate::exchange::{FlightEnd, FlightNews, FlightRole};
use crate::flight::{self, Join, Outlook, State};

/// How often the root looks at the leases of waiting streams.
pub const FOLLOW_POLL_MS: u64 = 10;

/// How long a finished lease stays readable for followers that look every `FOLLOW_POLL_MS`
/// (a hundred looks); the slot is free for other keys after it.
const LINGER_MS: u64 = 1_000;

/// Compare-and-swap rounds on a lease before giving up (each loses only to another worker's
/// write in between).
const LEASE_CAS_ROUNDS: usize = 8;

#[derive(Debug)]
enum Seat {
    Lead { slot: String, key: String, flight: u64 },
    Follow { slot: String, key: String, flight: u64, deadline_ms: u64 },
}

/// A stream's part in a flight.
#[derive(Debug, Default)]
pub(super) struct FlightSeat {
    seat: Option<Seat>,
    /// Set while a root callback drives this stream: calls dispatched now belong to the root.
    pub in_root: bool,
    /// The client left while this stream led: nothing is sent to it any more.
    pub detached: bool,
    /// Gemini attempts waiting for the root to dispatch them: (call index, attempts so far,
    /// the last outcome).
    deferred: Vec<(u32, Attempts, Option<CallOutcome>)>,
}

impl FlightSeat {
    fn leads(&self) -> bool {
        matches!(self.seat, Some(Seat::Lead { .. }))
    }
}

impl StreamDriver {
    /// Whether the root must keep this stream within reach: it waits for a flight, or leads
    /// one whose calls the root sends or answers.
    pub fn is_parked(&self) -> bool {
        matches!(self.flight.seat, Some(Seat::Follow { .. }))
            || !self.flight.deferred.is_empty()
            || self.pending.iter().any(|c| c.root_owned)
    }

    /// Whether the call with this token is one of this stream's.
    pub fn owns_call(&self, token: u32) -> bool {
        self.pending.iter().any(|c| c.token == token)
    }

    /// Whether this stream's client has left (the glue then no longer makes it the effective
    /// context).
    pub fn is_detached(&self) -> bool {
        self.flight.detached
    }

    /// Joins the flight for `key`: leads it (the lease is written), follows it, or stays alone.
    pub(super) fn join_flight(&mut self, host: &mut dyn Host, key: &CacheKey, lease_ms: u64) -> FlightRole {
        let mut id = [0u8; 8];
        if !host.random(&mut id) {
            return FlightRole::Alone;
        }
        let mine = u64::from_le_bytes(id);
        let slot = flight::slot_key(key);
        let now = host.now_ms();
        for _ in 0..LEASE_CAS_ROUNDS {
            let (current, cas) = host.shared_get_cas(&slot);
            match flight::join(current.as_deref(), &key.key, mine, now, lease_ms) {
                Join::Lead(value) => {
                    if !host.shared_set_cas(&slot, &value, cas) {
                        continue; // another worker wrote first: look again
                    }
                    // A first write to an empty slot has no version to compare with: read it
                    // back, and if another worker's write landed over it, join that one.
                    if cas.is_none()
                        && flight::outlook(host.shared_get(&slot).as_deref(), &key.key, mine, now) != Outlook::Waiting
                    {
                        continue;
                    }
                    self.flight.seat = Some(Seat::Lead { slot, key: key.key.clone(), flight: mine });
                    return FlightRole::Lead;
                }
                Join::Follow { flight, .. } => {
                    let started = self.exchange.as_ref().map_or(now, Exchange::started_ms);
                    let deadline_ms = started.saturating_add(self.settings.gemini.timeout_ms);
                    self.flight.seat = Some(Seat::Follow { slot, key: key.key.clone(), flight, deadline_ms });
                    host.wake_root();
                    return FlightRole::Follow;
                }
                Join::Alone => return FlightRole::Alone,
            }
        }
        FlightRole::Alone
    }

    /// Whether an attempt must wait for the root: a leader's calls are the root's.
    pub(super) fn defer_attempt(
        &mut self,
        host: &mut dyn Host,
        index: u32,
        attempts: &Attempts,
        last: &Option<CallOutcome>,
    ) -> bool {
        if !self.flight.leads() || self.flight.in_root {
            return false;
        }
        self.flight.deferred.push((index, attempts.clone(), last.clone()));
        host.wake_root();
        true
    }

    /// The root's tick: send a leader's deferred calls, and look at a follower's lease.
    pub fn on_root_tick(&mut self, host: &mut dyn Host) {
        self.flight.in_root = true;
        let deferred = std::mem::take(&mut self.flight.deferred);
        for (index, attempts, last) in deferred {
            let effects = self.attempt(host, index, attempts, last);
            self.run(host, effects);
        }
        self.look_at_lease(host);
        self.flight.in_root = false;
    }

    /// An answer to a call the root dispatched for this stream.
    pub fn on_root_call_response(&mut self, host: &mut dyn Host, token: u32, num_headers: usize, body_size: usize) {
        self.flight.in_root = true;
        self.on_call_response(host, token, num_headers, body_size);
        self.flight.in_root = false;
    }

    /// A follower's look at its lease: news when there is any, or the end of its wait.
    fn look_at_lease(&mut self, host: &mut dyn Host) {
        let Some(Seat::Follow { slot, key, flight, deadline_ms }) = &self.flight.seat else { return };
        let now = host.now_ms();
        let news = match flight::outlook(host.shared_get(slot).as_deref(), key, *flight, now) {
            // Past its own deadline a request does not start a generation either.
            Outlook::Waiting | Outlook::Lost | Outlook::OnYourOwn if now >= *deadline_ms => FlightNews::TimedOut,
            Outlook::Waiting => return,
            Outlook::Ready => FlightNews::Ready,
            Outlook::Failed { status, retry_after_s, body } => FlightNews::Failed { status, retry_after_s, body },
            Outlook::Lost => FlightNews::Lost,
            Outlook::OnYourOwn => FlightNews::OnYourOwn,
        };
        self.flight.seat = None;
        self.feed(host, |ex| ex.on_flight_news(news, now));
    }

    /// A leader whose exchange has ended tells its followers how: the lease says so until
    /// they have looked. Runs after every batch of effects.
    pub(super) fn finish_flight(&mut self, host: &mut dyn Host) {
        if !self.exchange.as_ref().is_some_and(Exchange::is_done) {
            return;
        }
        if matches!(self.flight.seat, Some(Seat::Follow { .. })) {
            self.flight.seat = None; // answered otherwise (refused room to wait): nothing to look at
            return;
        }
        if !self.flight.leads() {
            return;
        }
        let end = self.exchange.as_mut().and_then(Exchange::take_flight_end);
        let Some(Seat::Lead { slot, key, flight }) = self.flight.seat.take() else { return };
        let state = match end {
            Some(FlightEnd::Stored) => State::Done,
            Some(FlightEnd::Failed { status, retry_after_s, body }) => State::Failed { status, retry_after_s, body },
            Some(FlightEnd::Unshared) => State::Uncached,
            Some(FlightEnd::Abandoned) | None => State::Abandoned,
        };
        let now = host.now_ms();
        for _ in 0..LEASE_CAS_ROUNDS {
            let (current, cas) = host.shared_get_cas(&slot);
            let Some(value) = flight::finish(current.as_deref(), &key, flight, state.clone(), now, LINGER_MS) else {
                return; // no longer ours: a follower took over
            };
            if host.shared_set_cas(&slot, &value, cas) {
                // Followers on this worker hear it at once; others at their next look.
                host.wake_root();
                return;
            }
        }
    }

    /// The client left. A follower stops waiting; a leader whose calls are under way goes on
    /// without it (detached), and then this is true.
    pub(super) fn detach_if_leading(&mut self) -> bool {
        if matches!(self.flight.seat, Some(Seat::Follow { .. })) {
            self.flight.seat = None;
        }
        let busy = !self.flight.deferred.is_empty() || self.pending.iter().any(|c| c.root_owned);
        if !self.flight.leads() || !busy {
            // Nobody waits on it: calls the root sent for it are dropped (their answers go
            // nowhere), so no retry is made for a client that left.
            self.flight.deferred.clear();
            self.pending.retain(|c| !c.root_owned);
            return false;
        }
        self.flight.detached = true;
        if let Some(ex) = self.exchange.as_mut() {
            ex.detach();
        }
        true
    }
}

#[cfg(test)]
#[path = "driver_flight_tests.rs"]
mod tests;
