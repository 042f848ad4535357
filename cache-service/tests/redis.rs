//! Issue 11, Redis: a Redis that does not answer costs an error within `--redis-timeout-ms`
//! (never a hung handler), a start against one fails within the connect timeout, and
//! `/v1/stats` counts entries and bytes without a `SCAN`.

mod common;

use std::time::{Duration, Instant};

use common::{eventually, get, hung_redis, put, request, run_until_exit, start, stats, Proxy, RedisServer};

#[test]
fn a_redis_that_never_answers_fails_the_start_within_the_connect_timeout() {
    let addr = hung_redis(false);
    let url = format!("redis://{addr}/0");
    let (status, took, output) = run_until_exit(
        &["--listen", "127.0.0.1:0", "--redis", &url, "--redis-connect-timeout-ms", "200"],
        Duration::from_secs(10),
    );
    let status = status.unwrap_or_else(|| panic!("still starting after {took:?}: {output}"));
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(took < Duration::from_secs(3), "gave up after {took:?}");
    assert!(output.contains("cannot reach Redis"), "{output}");
}

#[test]
fn a_redis_that_stops_answering_costs_503_within_the_timeout() {
    let addr = hung_redis(true);
    let url = format!("redis://{addr}/0");
    let s = start(&["--redis", &url, "--redis-timeout-ms", "300"]);
    let calls: [(&str, &str, &[u8]); 4] = [
        ("GET", "/v1/cache/img:a", b""),
        ("PUT", "/v1/cache/img:a", b"value"),
        ("DELETE", "/v1/cache/img:a", b""),
        ("GET", "/v1/stats", b""),
    ];
    for (method, path, body) in calls {
        let started = Instant::now();
        let r = request(s.addr, method, path, &[], body);
        assert_eq!(r.status, 503, "{method} {path}: {}", String::from_utf8_lossy(&r.body));
        assert!(started.elapsed() < Duration::from_secs(2), "{method} {path} took {:?}", started.elapsed());
    }
    assert_eq!(get(s.addr, "/healthz").status, 200);
}

#[test]
fn a_paused_real_redis_costs_503_and_the_service_recovers() {
    let Some(redis) = RedisServer::start() else { return };
    let s = start(&["--redis", &redis.url(), "--redis-timeout-ms", "300"]);
    assert_eq!(put(s.addr, "img:a", b"value", 60), 204);
    redis.signal("-STOP");
    let started = Instant::now();
    assert_eq!(get(s.addr, "/v1/cache/img:a").status, 503);
    assert_eq!(put(s.addr, "img:b", b"value", 60), 503);
    assert_eq!(get(s.addr, "/v1/stats").status, 503);
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    redis.signal("-CONT");
    assert!(eventually(Duration::from_secs(5), || get(s.addr, "/v1/cache/img:a").status == 200));
    assert_eq!(get(s.addr, "/v1/cache/img:a").body, b"value");
}

#[test]
fn stats_count_entries_and_bytes_under_the_prefix_without_a_scan() {
    let Some(redis) = RedisServer::start() else { return };
    // Someone else's keys in the same Redis are not counted.
    redis.command(&["SET", "other:key", "0123456789"]).unwrap();
    let a = start(&["--redis", &redis.url()]);
    let b = start(&["--redis", &redis.url()]);
    let counts = |s: &common::Service| {
        let st = stats(s.addr);
        assert_eq!(st["store"], "redis");
        (st["entries"].as_u64().unwrap(), st["bytes"].as_u64().unwrap())
    };
    assert_eq!(counts(&a), (0, 0));
    assert_eq!(put(a.addr, "img:a", &[b'a'; 10], 600), 204);
    assert_eq!(put(b.addr, "img:b", &[b'b'; 20], 600), 204);
    assert_eq!(put(a.addr, "img:a", &[b'a'; 5], 600), 204, "an overwrite counts once, at its new size");
    assert_eq!(put(b.addr, "img:brief", &[b'c'; 7], 1), 204);
    assert_eq!(counts(&a), (3, 32));
    assert_eq!(counts(&b), (3, 32), "the fleet shares the counts");
    assert_eq!(request(a.addr, "DELETE", "/v1/cache/img:b", &[], b"").status, 204);
    assert_eq!(request(a.addr, "DELETE", "/v1/cache/img:b", &[], b"").status, 404);
    assert_eq!(counts(&b), (2, 12));
    // Redis expires img:brief on its own; the next stats call takes it out of the counts.
    std::thread::sleep(Duration::from_millis(2200));
    assert_eq!(get(a.addr, "/v1/cache/img:brief").status, 404);
    assert_eq!(counts(&a), (1, 5));
    assert_eq!(get(b.addr, "/v1/cache/img:a").body, vec![b'a'; 5]);
    let calls = redis.command(&["INFO", "commandstats"]).unwrap();
    assert!(!calls.contains("cmdstat_scan"), "stats used SCAN: {calls}");
    assert!(!calls.contains("cmdstat_keys"), "stats used KEYS: {calls}");
}

#[test]
fn a_redis_connection_gone_silent_is_replaced() {
    let Some(redis) = RedisServer::start() else { return };
    let proxy = Proxy::start(([127, 0, 0, 1], redis.port).into());
    let url = format!("redis://{}/0", proxy.addr);
    let s = start(&["--redis", &url, "--redis-timeout-ms", "300"]);
    assert_eq!(put(s.addr, "img:a", b"value", 60), 204);
    proxy.silence();
    let silenced = Instant::now();
    assert_eq!(get(s.addr, "/v1/cache/img:a").status, 503);
    let mut seen = Vec::new();
    let back = eventually(Duration::from_secs(5), || {
        let r = get(s.addr, "/v1/cache/img:a");
        seen.push(format!("{:?}: {} {}", silenced.elapsed(), r.status, String::from_utf8_lossy(&r.body)));
        r.status == 200
    });
    assert!(back, "a fresh connection takes over from the silent one: {seen:#?}");
}
