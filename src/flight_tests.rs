use super::*;
use crate::cache::{l1_slots, CacheKey};
use crate::hash::sha256_hex;
use crate::named::Named;

const KEY: &str =
    "img:gemini-3-pro-image-preview:auto:-:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const OTHER: &str =
    "img:gemini-3-pro-image-preview:auto:-:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
const NOW: u64 = 1_000_000;

fn lease(key: &str, flight: u64, state: State, expires_at_ms: u64) -> Vec<u8> {
    encode(&Lease { key: key.to_string(), flight, state, expires_at_ms })
}

fn failed(status: u32, retry_after_s: Option<u64>, body: &[u8]) -> State {
    State::Failed { status, retry_after_s, body: body.to_vec() }
}

fn error_json() -> Vec<u8> {
    br#"{"error":{"message":"Gemini is busy.","type":"api_error","param":null,"code":"IMG_SERVICE_UNAVAILABLE"}}"#
        .to_vec()
}

/// One lease of every shape, for the codec tests.
fn samples() -> Vec<Lease> {
    let mut out = Vec::new();
    for state in [
        State::Flying,
        State::Done,
        State::Abandoned,
        State::Uncached,
        failed(503, None, &error_json()),
        failed(429, Some(17), &error_json()),
        failed(400, Some(0), b""),
        failed(599, Some(u64::MAX), &[0xff; MAX_ERROR_BYTES]),
    ] {
        for (key, flight, expires_at_ms) in [(KEY, 7, NOW), ("", 0, 0), ("img:é:ünïcode", u64::MAX, u64::MAX)] {
            out.push(Lease { key: key.to_string(), flight, state: state.clone(), expires_at_ms });
        }
    }
    out
}

// ---- the codec ----

#[test]
fn every_state_round_trips() {
    for l in samples() {
        let bytes = encode(&l);
        assert_eq!(&bytes[..4], b"GIF1");
        assert_eq!(decode(&bytes), Some(l.clone()), "{l:?}");
        assert_eq!(encode(&decode(&bytes).unwrap()), bytes);
    }
}

#[test]
fn an_error_body_of_exactly_the_bound_round_trips() {
    let body: Vec<u8> = (0..MAX_ERROR_BYTES).map(|i| (i % 251) as u8).collect();
    let l = Lease { key: KEY.into(), flight: 1, state: failed(502, Some(5), &body), expires_at_ms: NOW };
    assert_eq!(decode(&encode(&l)), Some(l));
}

#[test]
fn an_over_long_error_body_is_written_as_a_generic_error_of_the_same_status() {
    for status in [400, 403, 404, 413, 429, 500, 502, 503, 504, 418, 599] {
        for len in [MAX_ERROR_BYTES + 1, 1 << 20] {
            let l = Lease {
                key: KEY.into(),
                flight: 3,
                state: failed(status, Some(9), &vec![b'x'; len]),
                expires_at_ms: NOW,
            };
            let back = decode(&encode(&l)).expect("encode writes only what decode reads");
            let State::Failed { status: s, retry_after_s, body } = back.state else { panic!("still failed") };
            assert_eq!((s, retry_after_s), (status, Some(9)), "status and retry-after kept");
            assert!(body.len() <= MAX_ERROR_BYTES);
            let v: serde_json::Value = serde_json::from_slice(&body).expect("a JSON error");
            let code = v["error"]["code"].as_str().expect("a code");
            let code = ErrorCode::ALL.iter().find(|c| c.as_str() == code).expect("a known code");
            let expected = match status {
                418 | 599 => 500,
                504 => 502, // IMG_NETWORK_ERROR: 504 when it was a timeout
                s => s,
            };
            assert_eq!(code.status(), expected, "{status}: {code:?}");
            assert_eq!((back.key.as_str(), back.flight, back.expires_at_ms), (KEY, 3, NOW));
        }
    }
}

#[test]
fn a_failure_whose_status_is_not_an_error_is_written_as_a_500() {
    for status in [0, 200, 302, 399, 600, u32::MAX] {
        let l = Lease { key: KEY.into(), flight: 3, state: failed(status, None, &error_json()), expires_at_ms: NOW };
        let back = decode(&encode(&l)).expect("encode writes only what decode reads");
        let State::Failed { status: s, retry_after_s, body } = back.state else { panic!("still failed") };
        assert_eq!((s, retry_after_s), (500, None));
        assert!(body.windows(18).any(|w| w == b"IMG_INTERNAL_ERROR"));
    }
}

#[test]
fn every_truncation_is_refused() {
    for l in samples() {
        let bytes = encode(&l);
        for len in 0..bytes.len() {
            assert_eq!(decode(&bytes[..len]), None, "{l:?} cut at {len}");
        }
    }
}

#[test]
fn trailing_bytes_are_refused() {
    for l in samples() {
        let mut bytes = encode(&l);
        bytes.push(0);
        assert_eq!(decode(&bytes), None);
        bytes.extend_from_slice(&encode(&l));
        assert_eq!(decode(&bytes), None, "two leases back to back");
    }
}

#[test]
fn another_magic_is_refused() {
    let good = lease(KEY, 1, State::Done, NOW);
    for magic in [b"GIF2", b"GIE1", b"GIU1", b"gif1", b"\0\0\0\0"] {
        let mut bytes = good.clone();
        bytes[..4].copy_from_slice(magic);
        assert_eq!(decode(&bytes), None, "{magic:?}");
    }
    assert_eq!(decode(b""), None);
    assert_eq!(decode(b"GIF1"), None);
}

/// The offset of the state tag in an encoded lease for `key`.
fn tag_at(key: &str) -> usize {
    4 + 4 + key.len() + 8 + 8
}

#[test]
fn unknown_tags_and_bad_keys_are_refused() {
    let good = lease(KEY, 1, State::Done, NOW);
    for tag in [5u8, 6, 0x80, 0xff] {
        let mut bytes = good.clone();
        bytes[tag_at(KEY)] = tag;
        assert_eq!(decode(&bytes), None, "state tag {tag}");
    }
    let good = lease(KEY, 1, failed(503, Some(1), b"{}"), NOW);
    let retry_at = tag_at(KEY) + 1 + 4;
    assert_eq!(good[retry_at], 1);
    for tag in [2u8, 0xff] {
        let mut bytes = good.clone();
        bytes[retry_at] = tag;
        assert_eq!(decode(&bytes), None, "retry tag {tag}");
    }
    let mut bytes = lease("ab", 1, State::Done, NOW);
    bytes[8] = 0xff;
    assert_eq!(decode(&bytes), None, "a key that is not UTF-8");
}

#[test]
fn a_failure_with_a_status_that_is_not_an_error_is_refused() {
    let good = lease(KEY, 1, failed(503, None, b"{}"), NOW);
    let status_at = tag_at(KEY) + 1;
    for status in [0u32, 200, 399, 600, u32::MAX] {
        let mut bytes = good.clone();
        bytes[status_at..status_at + 4].copy_from_slice(&status.to_be_bytes());
        assert_eq!(decode(&bytes), None, "{status}");
    }
}

#[test]
fn huge_length_fields_are_refused() {
    // The key length.
    let good = lease(KEY, 1, State::Flying, NOW);
    for len in [u32::MAX, u32::MAX / 2, KEY.len() as u32 + 1, good.len() as u32] {
        let mut bytes = good.clone();
        bytes[4..8].copy_from_slice(&len.to_be_bytes());
        assert_eq!(decode(&bytes), None, "key length {len}");
    }
    // The body length: past the end, and over the bound with the bytes all there.
    let good = lease(KEY, 1, failed(503, None, b"{}"), NOW);
    let len_at = good.len() - 2 - 4;
    for len in [u32::MAX, 3, MAX_ERROR_BYTES as u32 + 1] {
        let mut bytes = good.clone();
        bytes[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(decode(&bytes), None, "body length {len}");
    }
    let mut bytes = good[..len_at].to_vec();
    bytes.extend_from_slice(&(MAX_ERROR_BYTES as u32 + 1).to_be_bytes());
    bytes.extend_from_slice(&vec![b'x'; MAX_ERROR_BYTES + 1]);
    assert_eq!(decode(&bytes), None, "a body over the bound");
}

#[test]
fn random_bytes_never_panic() {
    let mut x: u64 = 0x1234_5678;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let good = lease(KEY, 1, failed(503, Some(2), &error_json()), NOW);
    for _ in 0..5000 {
        let mut bytes = good.clone();
        let at = (next() % bytes.len() as u64) as usize;
        bytes[at] = next() as u8;
        if let Some(l) = decode(&bytes) {
            assert_eq!(encode(&l), bytes);
        }
        let len = (next() % 64) as usize;
        let noise: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        assert_eq!(decode(&noise), None);
    }
}

// ---- join ----

fn lead_lease(j: &Join) -> Lease {
    match j {
        Join::Lead(bytes) => decode(bytes).expect("a lead writes a lease"),
        other => panic!("expected a lead, got {other:?}"),
    }
}

#[test]
fn a_free_or_unreadable_slot_is_led() {
    for current in [None, Some(&b""[..]), Some(&b"garbage"[..]), Some(&b"GIF1\0\0"[..])] {
        let j = join(current, KEY, 42, NOW, 30_000);
        assert_eq!(
            lead_lease(&j),
            Lease { key: KEY.into(), flight: 42, state: State::Flying, expires_at_ms: NOW + 30_000 },
            "{current:?}"
        );
    }
}

#[test]
fn a_lease_expiry_saturates() {
    assert_eq!(lead_lease(&join(None, KEY, 1, u64::MAX - 5, 30_000)).expires_at_ms, u64::MAX);
}

#[test]
fn an_expired_lease_of_any_state_and_key_is_taken_over() {
    for key in [KEY, OTHER] {
        for state in [State::Flying, State::Done, State::Abandoned, failed(503, None, &error_json())] {
            for expires_at_ms in [NOW, NOW - 1, 0] {
                let current = lease(key, 7, state.clone(), expires_at_ms);
                let j = join(Some(&current), KEY, 42, NOW, 30_000);
                assert_eq!(lead_lease(&j).flight, 42, "{key} {state:?} {expires_at_ms}");
            }
        }
    }
}

#[test]
fn a_live_flight_for_the_same_key_is_followed() {
    let current = lease(KEY, 7, State::Flying, NOW + 1);
    assert_eq!(join(Some(&current), KEY, 42, NOW, 30_000), Join::Follow { flight: 7, expires_at_ms: NOW + 1 });
}

#[test]
fn an_abandoned_lease_is_taken_over_whatever_its_key() {
    for key in [KEY, OTHER] {
        let current = lease(key, 7, State::Abandoned, NOW + 10_000);
        let l = lead_lease(&join(Some(&current), KEY, 42, NOW, 30_000));
        assert_eq!((l.key.as_str(), l.flight), (KEY, 42));
    }
}

#[test]
fn a_finished_flight_for_the_same_key_is_led_again() {
    // Done: this caller missed the cache after it, so the entry was not kept. Failed: an error
    // is never shared with requests that arrive after it.
    for state in [State::Done, failed(503, Some(3), &error_json())] {
        let current = lease(KEY, 7, state.clone(), NOW + 10_000);
        assert_eq!(lead_lease(&join(Some(&current), KEY, 42, NOW, 30_000)).flight, 42, "{state:?}");
    }
}

#[test]
fn a_live_lease_for_another_key_leaves_the_request_alone() {
    for state in [State::Flying, State::Done, failed(503, None, &error_json())] {
        let current = lease(OTHER, 7, state.clone(), NOW + 1);
        assert_eq!(join(Some(&current), KEY, 42, NOW, 30_000), Join::Alone, "{state:?}");
    }
}

// ---- outlook ----

#[test]
fn a_follower_waits_while_its_flight_flies() {
    let current = lease(KEY, 7, State::Flying, NOW + 1);
    assert_eq!(outlook(Some(&current), KEY, 7, NOW), Outlook::Waiting);
}

#[test]
fn a_flight_that_flew_past_its_expiry_is_lost() {
    for expires_at_ms in [NOW, NOW - 1] {
        let current = lease(KEY, 7, State::Flying, expires_at_ms);
        assert_eq!(outlook(Some(&current), KEY, 7, NOW), Outlook::Lost);
    }
}

#[test]
fn a_done_flight_is_ready_even_past_its_linger() {
    for expires_at_ms in [NOW + 1, NOW, 0] {
        let current = lease(KEY, 7, State::Done, expires_at_ms);
        assert_eq!(outlook(Some(&current), KEY, 7, NOW), Outlook::Ready);
    }
}

#[test]
fn a_failed_flight_hands_its_error_even_past_its_linger() {
    for expires_at_ms in [NOW + 1, NOW, 0] {
        let current = lease(KEY, 7, failed(429, Some(12), &error_json()), expires_at_ms);
        assert_eq!(
            outlook(Some(&current), KEY, 7, NOW),
            Outlook::Failed { status: 429, retry_after_s: Some(12), body: error_json() }
        );
    }
}

#[test]
fn an_abandoned_flight_is_lost() {
    let current = lease(KEY, 7, State::Abandoned, NOW + 10_000);
    assert_eq!(outlook(Some(&current), KEY, 7, NOW), Outlook::Lost);
}

#[test]
fn a_flight_replaced_or_gone_is_lost() {
    for state in [State::Flying, State::Done, failed(503, None, &error_json())] {
        let by_another_flight = lease(KEY, 8, state.clone(), NOW + 10_000);
        let by_another_key = lease(OTHER, 7, state.clone(), NOW + 10_000);
        assert_eq!(outlook(Some(&by_another_flight), KEY, 7, NOW), Outlook::Lost, "{state:?}");
        assert_eq!(outlook(Some(&by_another_key), KEY, 7, NOW), Outlook::Lost, "{state:?}");
    }
    for current in [None, Some(&b""[..]), Some(&b"garbage"[..])] {
        assert_eq!(outlook(current, KEY, 7, NOW), Outlook::Lost);
    }
}

// ---- finish ----

#[test]
fn the_leader_writes_its_outcome_over_its_own_flight() {
    for state in [State::Done, State::Abandoned, State::Uncached, failed(503, Some(4), &error_json())] {
        // Expired or not: if nobody took over, the outcome still helps whoever waits.
        for expires_at_ms in [NOW + 1, NOW, 0] {
            let current = lease(KEY, 7, State::Flying, expires_at_ms);
            let out = finish(Some(&current), KEY, 7, state.clone(), NOW, 2_000).expect("its own flight");
            assert_eq!(
                decode(&out),
                Some(Lease { key: KEY.into(), flight: 7, state: state.clone(), expires_at_ms: NOW + 2_000 })
            );
        }
    }
}

#[test]
fn the_leader_writes_nothing_when_its_flight_is_gone() {
    let taken_over = lease(KEY, 8, State::Flying, NOW + 10_000);
    let another_key = lease(OTHER, 7, State::Flying, NOW + 10_000);
    for current in [None, Some(&b""[..]), Some(&b"garbage"[..]), Some(&taken_over[..]), Some(&another_key[..])] {
        assert_eq!(finish(current, KEY, 7, State::Done, NOW, 2_000), None, "{current:?}");
    }
}

#[test]
fn a_flight_ends_once() {
    for state in [State::Done, State::Abandoned, State::Uncached, failed(503, None, &error_json())] {
        let current = lease(KEY, 7, state.clone(), NOW + 2_000);
        assert_eq!(finish(Some(&current), KEY, 7, State::Done, NOW, 2_000), None, "{state:?}");
    }
}

// ---- a flight through its slot ----

/// A slot with a compare-and-swap version, like Envoy's shared data.
#[derive(Default)]
struct Slot {
    value: Option<Vec<u8>>,
    cas: u32,
}

impl Slot {
    fn read(&self) -> (Option<Vec<u8>>, u32) {
        (self.value.clone(), self.cas)
    }
    fn write(&mut self, value: Vec<u8>, cas: u32) -> bool {
        if cas != self.cas {
            return false;
        }
        self.value = Some(value);
        self.cas += 1;
        true
    }
}

#[test]
fn followers_see_the_outcome_of_the_flight_they_joined() {
    let mut slot = Slot::default();
    // Two workers read the empty slot; both would lead, only the first write wins.
    let (a, cas_a) = slot.read();
    let (b, cas_b) = slot.read();
    let Join::Lead(write_a) = join(a.as_deref(), KEY, 1, NOW, 30_000) else { panic!("lead") };
    let Join::Lead(write_b) = join(b.as_deref(), KEY, 2, NOW, 30_000) else { panic!("lead") };
    assert!(slot.write(write_a, cas_a));
    assert!(!slot.write(write_b, cas_b), "the loser reads and joins again");
    let (b, _) = slot.read();
    assert_eq!(join(b.as_deref(), KEY, 2, NOW + 5, 30_000), Join::Follow { flight: 1, expires_at_ms: NOW + 30_000 });
    assert_eq!(outlook(slot.read().0.as_deref(), KEY, 1, NOW + 10), Outlook::Waiting);
    // Another key in the same slot goes alone and writes nothing.
    assert_eq!(join(slot.read().0.as_deref(), OTHER, 3, NOW + 10, 30_000), Join::Alone);
    let (current, cas) = slot.read();
    let done = finish(current.as_deref(), KEY, 1, State::Done, NOW + 20, 2_000).expect("still its flight");
    assert!(slot.write(done, cas));
    assert_eq!(outlook(slot.read().0.as_deref(), KEY, 1, NOW + 25), Outlook::Ready);
    // After the linger the slot is free for anyone.
    let l = lead_lease(&join(slot.read().0.as_deref(), OTHER, 3, NOW + 2_020, 30_000));
    assert_eq!((l.key.as_str(), l.flight), (OTHER, 3));
}

#[test]
fn a_dead_leader_is_taken_over_and_its_late_outcome_dropped() {
    let mut slot = Slot::default();
    let Join::Lead(first) = join(None, KEY, 1, NOW, 30_000) else { panic!("lead") };
    assert!(slot.write(first, 0));
    // The lease runs out: the follower finds its flight lost, and takes over.
    assert_eq!(outlook(slot.read().0.as_deref(), KEY, 1, NOW + 30_000), Outlook::Lost);
    let (current, cas) = slot.read();
    let Join::Lead(second) = join(current.as_deref(), KEY, 2, NOW + 30_000, 30_000) else { panic!("lead") };
    assert!(slot.write(second, cas));
    // The first leader comes back: nothing to write.
    assert_eq!(finish(slot.read().0.as_deref(), KEY, 1, State::Done, NOW + 31_000, 2_000), None);
    assert_eq!(outlook(slot.read().0.as_deref(), KEY, 2, NOW + 31_000), Outlook::Waiting);
}

// ---- slots ----

fn cache_key(i: u32) -> CacheKey {
    CacheKey::from_key(&format!("img:m:auto:-:{}", sha256_hex(&i.to_be_bytes()))).expect("a well-formed key")
}

#[test]
fn slot_keys_stay_within_the_slots_and_use_them_all() {
    let mut used = vec![false; FLIGHT_SLOTS as usize];
    for i in 0..20_000 {
        let key = cache_key(i);
        let name = slot_key(&key);
        let n: u32 = name.strip_prefix("gemini_image.flight.").expect("the prefix").parse().expect("a number");
        assert!(n < FLIGHT_SLOTS);
        assert_eq!(n, slot_index(key.slot_seed));
        used[n as usize] = true;
    }
    for seed in [0, 1, u64::MAX, 1 << 63, 0xdead_beef] {
        assert!(slot_index(seed) < FLIGHT_SLOTS);
    }
    assert!(used.iter().all(|&u| u), "every slot in use");
}

#[test]
fn keys_that_share_an_l1_slot_rarely_share_a_flight_slot() {
    // With as many L1 slots as flight slots (the worst case for a plain modulo), and with more.
    for max_entries in [FLIGHT_SLOTS, 1024, 100] {
        let keys: Vec<CacheKey> = (0..20_000).map(cache_key).collect();
        let mut by_l1: std::collections::HashMap<u32, Vec<u32>> = std::collections::HashMap::new();
        for k in &keys {
            by_l1.entry(l1_slots(k, max_entries)[0].index).or_default().push(slot_index(k.slot_seed));
        }
        let (mut pairs, mut shared) = (0u64, 0u64);
        for flights in by_l1.values() {
            for (i, a) in flights.iter().enumerate() {
                for b in &flights[i + 1..] {
                    pairs += 1;
                    shared += u64::from(a == b);
                }
            }
        }
        // Independent: about 1 in FLIGHT_SLOTS; the same mixing as L1 would make it 1 in 1.
        assert!(pairs > 10_000);
        assert!(shared * u64::from(FLIGHT_SLOTS) < pairs * 2, "{max_entries}: {shared} of {pairs}");
    }
}

#[test]
fn an_answer_that_could_not_be_shared_sends_followers_to_gemini_and_later_arrivals_lead() {
    let current = lease(KEY, 7, State::Uncached, NOW + 2_000);
    assert_eq!(outlook(Some(&current), KEY, 7, NOW), Outlook::OnYourOwn);
    assert_eq!(outlook(Some(&current), KEY, 8, NOW), Outlook::Lost, "another flight's outcome is not ours");
    assert!(matches!(join(Some(&current), KEY, 9, NOW, 60_000), Join::Lead(_)));
    assert_eq!(join(Some(&current), OTHER, 9, NOW, 60_000), Join::Alone, "it lingers for its followers");
}
