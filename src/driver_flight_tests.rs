//! Coalescing over the in-memory host: streams of one worker that lead and follow flights,
//! driven callback by callback as the glue does (request callbacks, then the root's tick and
//! the root's call answers for parked streams).

use serde_json::json;

use super::*;
use crate::driver::tests::{json_of, post_headers, Gateway, NOW_MS};
use crate::test_support::{error_response, ok_response};

/// L1 only, so that a miss goes straight to the flight.
const L1_ONLY: &str = r#"{"cache": {"ttl_seconds": 60, "l1": {"max_entries": 8, "max_entry_bytes": 100000}}}"#;

const IMAGE: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC";

/// A stream that has had its headers and its whole body.
fn start(gw: &mut Gateway, body: serde_json::Value, cache_control: Option<&str>) -> StreamDriver {
    gw.host.request_headers = post_headers();
    if let Some(cc) = cache_control {
        gw.host.request_headers.push(("cache-control".into(), cc.into()));
    }
    gw.host.body = body.to_string().into_bytes();
    let mut stream = gw.root.new_stream().expect("configured");
    stream.on_request_headers(&mut gw.host, false);
    let size = gw.host.body.len();
    stream.on_request_body(&mut gw.host, size, true);
    stream
}

/// The root's tick sends a leader's calls; Gemini answers them through the root.
fn answer_leader(gw: &mut Gateway, leader: &mut StreamDriver, response: &crate::gemini::CallResponse) -> usize {
    leader.on_root_tick(&mut gw.host);
    let calls = std::mem::take(&mut gw.host.dispatched);
    for (token, _) in &calls {
        let (headers, size) = gw.host.deliver(response);
        assert!(leader.owns_call(*token));
        leader.on_root_call_response(&mut gw.host, *token, headers, size);
    }
    calls.len()
}

#[test]
fn an_identical_miss_follows_the_leader_and_gets_its_image_as_coalesced() {
    let mut gw = Gateway::new(L1_ONLY);
    let mut leader = start(&mut gw, json!({"prompt": "a red kite"}), None);
    assert!(gw.host.dispatched.is_empty(), "a leader's calls are the root's");
    assert!(leader.is_parked() && gw.host.root_wakes >= 1);
    let mut follower = start(&mut gw, json!({"prompt": "a red kite"}), None);
    assert!(follower.is_parked() && gw.host.dispatched.is_empty(), "the follower calls nothing");
    // Nothing yet: the follower keeps waiting.
    follower.on_root_tick(&mut gw.host);
    assert!(gw.host.replies.is_empty() && follower.is_parked());
    assert_eq!(answer_leader(&mut gw, &mut leader, &ok_response(IMAGE)), 1);
    let lead = gw.host.replies.pop().expect("the leader's answer");
    assert_eq!(lead.header("x-image-cache"), Some("miss"));
    assert!(!leader.is_parked());
    follower.on_root_tick(&mut gw.host);
    let follow = gw.host.replies.pop().expect("the follower's answer");
    assert_eq!(follow.header("x-image-cache"), Some("coalesced"));
    assert_eq!(json_of(&follow)["data"], json_of(&lead)["data"]);
    assert_eq!(follow.header("x-image-cost-usd"), Some("0"));
    assert!(!follower.is_parked());
    assert_eq!(gw.host.counted(&Counter::Coalesced), 1);
    let lines = gw.host.log_lines();
    assert_eq!(lines.last().map(|(_, l)| l["cache"].clone()), Some(json!("coalesced")));
    assert_eq!(lines.last().map(|(_, l)| l["saved_usd"].clone()), Some(json!(0.134)));
}

#[test]
fn a_leaders_error_reaches_its_followers_as_the_same_error() {
    let mut gw = Gateway::new(L1_ONLY);
    let mut leader = start(&mut gw, json!({"prompt": "a storm"}), None);
    let mut follower = start(&mut gw, json!({"prompt": "a storm"}), None);
    answer_leader(&mut gw, &mut leader, &error_response(503, "UNAVAILABLE"));
    let lead = gw.host.replies.pop().expect("the leader's error");
    assert_eq!(lead.status, 503);
    follower.on_root_tick(&mut gw.host);
    let follow = gw.host.replies.pop().expect("the follower's error");
    assert_eq!((follow.status, follow.header("x-image-cache")), (503, Some("coalesced")));
    assert_eq!(follow.body, lead.body);
    assert_eq!(gw.host.counted(&Counter::Errors(ErrorCode::ServiceUnavailable)), 2);
    // Errors are not stored: the next identical request leads a new flight.
    let next = start(&mut gw, json!({"prompt": "a storm"}), None);
    assert!(next.is_parked() && gw.host.dispatched.is_empty());
}

#[test]
fn a_leader_whose_client_leaves_goes_on_for_its_followers() {
    let mut gw = Gateway::new(L1_ONLY);
    let mut leader = start(&mut gw, json!({"prompt": "a lantern"}), None);
    let mut follower = start(&mut gw, json!({"prompt": "a lantern"}), None);
    leader.on_root_tick(&mut gw.host);
    let calls = std::mem::take(&mut gw.host.dispatched);
    assert_eq!(calls.len(), 1);
    leader.on_log(&mut gw.host); // the client went away
    assert!(leader.is_parked() && leader.is_detached(), "kept by the root until its call answers");
    let (headers, size) = gw.host.deliver(&ok_response(IMAGE));
    leader.on_root_call_response(&mut gw.host, calls[0].0, headers, size);
    assert!(gw.host.replies.is_empty(), "nobody to answer");
    assert!(!leader.is_parked());
    let line = gw.host.log_lines().pop().expect("the leader's line").1;
    assert_eq!((line["status"].clone(), line["outcome"].clone()), (json!(499), json!("client_closed")));
    follower.on_root_tick(&mut gw.host);
    let follow = gw.host.replies.pop().expect("the follower gets the image");
    assert_eq!((follow.status, follow.header("x-image-cache")), (200, Some("coalesced")));
}

#[test]
fn a_follower_waits_no_longer_than_the_timeout_and_a_dead_leaders_lease_is_taken_over() {
    let mut gw = Gateway::new(L1_ONLY);
    let _dead_leader = start(&mut gw, json!({"prompt": "a moth"}), None); // its VM never answers
    let mut follower = start(&mut gw, json!({"prompt": "a moth"}), None);
    gw.host.now = NOW_MS + 180_000; // gemini.timeout_ms
    follower.on_root_tick(&mut gw.host);
    let r = gw.host.replies.pop().expect("a clean answer in bounded time");
    assert_eq!((r.status, json_of(&r)["error"]["code"].as_str()), (504, Some("IMG_NETWORK_ERROR")));
    assert_eq!(gw.host.counted(&Counter::CoalesceWaitsTimedOut), 1);
    assert!(!follower.is_parked());
    // Past the lease (timeout + 5 s), a new request leads instead of following a dead flight.
    gw.host.now = NOW_MS + 185_001;
    let mut taker = start(&mut gw, json!({"prompt": "a moth"}), None);
    assert_eq!(answer_leader(&mut gw, &mut taker, &ok_response(IMAGE)), 1);
    assert_eq!(gw.host.replies.pop().map(|r| r.status), Some(200));
}

#[test]
fn no_store_no_cache_and_differing_requests_never_wait() {
    let mut gw = Gateway::new(L1_ONLY);
    let _leader = start(&mut gw, json!({"prompt": "a fern"}), None);
    for (body, cc) in [
        (json!({"prompt": "a fern"}), Some("no-store")),
        (json!({"prompt": "a fern"}), Some("no-cache")),
        (json!({"prompt": "a fern", "size": "1792x1024"}), None),
        (json!({"prompt": "a fern", "n": 2}), None),
    ] {
        gw.host.dispatched.clear();
        let stream = start(&mut gw, body.clone(), cc);
        let dispatched_now = !gw.host.dispatched.is_empty();
        let leads = stream.is_parked();
        assert!(dispatched_now || leads, "{body} {cc:?} calls Gemini itself");
        assert_eq!(gw.host.counted(&Counter::Coalesced), 0);
    }
}

#[test]
fn without_coalescing_calls_go_out_from_the_stream_at_once() {
    let mut gw = Gateway::new(r#"{"cache": {"coalesce": false, "l1": {}}}"#);
    let a = start(&mut gw, json!({"prompt": "a bee"}), None);
    let b = start(&mut gw, json!({"prompt": "a bee"}), None);
    assert_eq!(gw.host.dispatched.len(), 2, "each calls Gemini");
    assert!(!a.is_parked() && !b.is_parked());
}

#[test]
fn an_answer_l1_cannot_hold_sends_followers_to_gemini_on_their_own() {
    let mut gw = Gateway::new(r#"{"cache": {"l1": {"max_entries": 8, "max_entry_bytes": 10}}}"#);
    let mut leader = start(&mut gw, json!({"prompt": "a whale"}), None);
    let mut follower = start(&mut gw, json!({"prompt": "a whale"}), None);
    assert_eq!(answer_leader(&mut gw, &mut leader, &ok_response(IMAGE)), 1);
    assert_eq!(gw.host.replies.pop().map(|r| r.status), Some(200));
    follower.on_root_tick(&mut gw.host);
    // It calls Gemini at once, without leading a flight others would wait for in turn.
    assert_eq!(gw.host.dispatched.len(), 1, "the follower's own call");
    assert!(follower.owns_call(gw.host.dispatched[0].0));
    assert_eq!(gw.host.counted(&Counter::Coalesced), 0);
}

#[test]
fn configure_gives_every_lease_slot_a_version_and_a_reload_keeps_live_leases() {
    use crate::flight::{EMPTY_SLOT, FLIGHT_SLOTS};
    let mut gw = Gateway::new(L1_ONLY);
    let slots = |gw: &Gateway| gw.host.shared.keys().filter(|k| k.starts_with("gemini_image.flight.")).count();
    assert_eq!(slots(&gw), FLIGHT_SLOTS as usize, "no lease write is ever made without a version");
    let _leader = start(&mut gw, json!({"prompt": "a heron"}), None);
    let live: Vec<(String, Vec<u8>)> = gw
        .host
        .shared
        .iter()
        .filter(|(k, v)| k.starts_with("gemini_image.flight.") && v.as_slice() != EMPTY_SLOT)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(live.len(), 1, "the leader's lease");
    // Another VM configuring (a reload, another worker starting late) leaves it alone.
    let mut other = WorkerDriver::default();
    other.configure(&mut gw.host, L1_ONLY.as_bytes(), &|_| None).expect("valid");
    assert_eq!(gw.host.shared.get(&live[0].0), Some(&live[0].1));
}

#[test]
fn waiting_counts_in_the_workers_in_flight_bounds() {
    let config = r#"{"cache": {"l1": {}}, "limits": {"max_inflight_requests": 1}}"#;
    let mut gw = Gateway::new(config);
    let leader = start(&mut gw, json!({"prompt": "an otter"}), None);
    assert!(leader.is_parked());
    let follower = start(&mut gw, json!({"prompt": "an otter"}), None);
    let r = gw.host.replies.pop().expect("no room to wait");
    assert_eq!((r.status, json_of(&r)["error"]["code"].as_str()), (503, Some("IMG_OVERLOADED")));
    assert_eq!(gw.worker().borrow().budget.requests, 1, "the leader's alone");
    drop(follower);
    drop(leader);
    assert_eq!(gw.worker().borrow().budget.requests, 0, "given back by both");
}

#[test]
fn a_follower_past_its_deadline_does_not_start_a_generation() {
    let mut gw = Gateway::new(L1_ONLY);
    let mut leader = start(&mut gw, json!({"prompt": "a crane"}), None);
    let mut follower = start(&mut gw, json!({"prompt": "a crane"}), None);
    leader.on_log(&mut gw.host); // its client left before the root sent its call: it goes on
    gw.host.now = NOW_MS + 200_000; // past the follower's deadline and the lease
    follower.on_root_tick(&mut gw.host);
    let r = gw.host.replies.pop().expect("an answer");
    assert_eq!(r.status, 504);
    assert!(gw.host.dispatched.is_empty(), "no call for a request out of time");
}
