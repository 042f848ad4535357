"""Backends, keys, cool-downs and retries (docs/backends.md) in a real Envoy with two workers:
keys take turns, a 429 cools a key on both workers, retry-after is respected, every key cooling
answers 429, a refused key cools longer, a 5xx moves to the next backend, blocks and 400s are
never retried, max_attempts and the deadline hold, and Vertex AI works with a key and with a
metadata-server token that is fetched once, shared, refreshed and never logged."""
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import unique
from harness import Envoy, FakeGemini, dead_port, free_port, http, post_image, wait_for, with_plugin

# The fake's keys, in its index order. Listeners that cool keys use keys of their own: two
# configurations that use one key share its cool-down (as they share its quota).
KEY_ORDER = ["GK1", "GK2", "GK3", "GK4", "GK5", "GK6", "VK"]
KEYS = {name: "%s-secret-0123456789" % name.lower() for name in KEY_ORDER}
INDEX = {name: str(i) for i, name in enumerate(KEY_ORDER)}


def studio(keys=("GK1", "GK2")):
    return {"name": "studio", "kind": "gemini", "cluster": "gemini", "api_key_envs": list(keys)}


def vertex_key(name="vx"):
    return {"name": name, "kind": "vertex", "cluster": "vertex", "project": "proj", "location": "global",
            "auth": {"api_key_env": "VK"}}


def vertex_wi(cluster="gce_metadata"):
    return {"name": "wi", "kind": "vertex", "cluster": "vertex", "project": "proj", "location": "us-central1",
            "authority": "us-central1-aiplatform.googleapis.com",
            "auth": {"metadata": {"cluster": cluster, "authority": "metadata.google.internal"}}}


@pytest.fixture(scope="module")
def google(workdir):
    """One fake for the Gemini API (three keys), Vertex AI and the metadata server."""
    g = FakeGemini(workdir, api_keys=[KEYS[k] for k in KEY_ORDER], token_ttl_s=70, name="fake-google")
    yield g
    g.stop()


def expose_keys(doc):
    """Lets the VM read the test's key variables (a deployment lists its own in host_env_keys)."""
    for listener in doc["static_resources"]["listeners"]:
        for f in listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]:
            if f["name"] == "envoy.filters.http.wasm":
                env = f["typed_config"]["config"]["vm_config"]["environment_variables"]
                env["host_env_keys"] = sorted(set(env.get("host_env_keys", [])) | set(KEYS))


@pytest.fixture(scope="module")
def gateway(workdir, google):
    no_cache = {"cache": None, "urls": None}
    listeners = [
        ("keys", free_port(), with_plugin(backends=[studio()], retry={"max_attempts": 3, "cooldown_ms": 60000}, **no_cache)),
        ("fast", free_port(), with_plugin(backends=[studio(("GK3", "GK4"))], retry={"max_attempts": 3, "cooldown_ms": 400},
                                           **no_cache)),
        ("multi", free_port(), with_plugin(backends=[studio(("GK5",)), vertex_key()], retry={"max_attempts": 3}, **no_cache)),
        ("three", free_port(), with_plugin(backends=[studio(("GK6",)), vertex_key("vy"), vertex_key("vz")],
                                            retry={"max_attempts": 2}, gemini={"timeout_ms": 2000}, **no_cache)),
        ("nowi", free_port(), with_plugin(backends=[vertex_wi("dead_metadata")], **no_cache)),
    ]
    e = Envoy(workdir, name="envoy-backends", fake_gemini=google.address, extra_listeners=listeners,
              extra_clusters=[("vertex", "127.0.0.1", google.port), ("gce_metadata", "127.0.0.1", google.port),
                              ("dead_metadata", "127.0.0.1", dead_port())],
              env_extra=dict(KEYS, GEMINI_API_KEY=KEYS["GK1"]), concurrency=2, doc_hook=expose_keys)
    yield e
    e.stop()
    log = e.log()
    assert "panicked" not in log and "wasm trap" not in log.lower(), log[-3000:]
    for secret in list(KEYS.values()) + ["ya29."]:
        assert secret not in log, "a key or token reached Envoy's log"


def post(e, listener, prompt, n=1, timeout=60):
    return post_image(e, {"prompt": prompt, "n": n}, listener=listener, timeout=timeout)


def many(e, listener, prompts):
    """Requests on separate connections at once, so both workers take some."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda p: post(e, listener, p), prompts))


def key_calls(google):
    return {k: v for k, v in google.stats()["api_keys"].items()}


@pytest.fixture(autouse=True)
def fresh(google):
    google.clear_rules()
    google.clear_stats()
    yield
    google.clear_rules()


def test_keys_take_turns(gateway, google):
    results = many(gateway, "keys", [unique("turns %d" % i) for i in range(8)])
    assert [s for s, _, _ in results] == [200] * 8
    used = key_calls(google)
    assert used.get("0", 0) >= 2 and used.get("1", 0) >= 2, used


def test_a_429_cools_the_key_on_both_workers_while_the_other_serves(gateway, google):
    tag = unique("quota")
    google.set_rules([{"match": {"api_key_index": 0, "prompt_contains": tag}, "status": 429, "retry_after_s": 60}])
    # One request at a time until a call meets GK1 (each worker's turn starts there)...
    for i in range(4):
        assert post(gateway, "keys", "%s first %d" % (tag, i))[0] == 200, "the call went on to GK2 at once"
        if google.stats()["api_key_statuses"].get(INDEX["GK1"]):
            break
    assert google.stats()["api_key_statuses"][INDEX["GK1"]] == {"429": 1}
    # ...then GK1 cools for every worker: many requests on both, and not one call to GK1.
    results = many(gateway, "keys", ["%s %d" % (tag, i) for i in range(16)])
    assert [s for s, _, _ in results] == [200] * 16, [b[:200] for s, _, b in results if s != 200]
    assert google.stats()["api_key_statuses"][INDEX["GK1"]] == {"429": 1}, google.stats()
    stats = gateway.stats()
    assert stats["wasmcustom.gemini_image.key_cooldowns.backend.studio.key.0"] == 1
    assert stats["wasmcustom.gemini_image.upstream_attempts.backend.studio.key.0.outcome.quota"] == 1
    (line,) = [l for l in gateway_log_lines(gateway) if l.get("attempts") == 2]
    assert line["backend"] == "studio" and line["status"] == 200


def gateway_log_lines(e):
    out = []
    for line in e.log().splitlines():
        i = line.find('{"event":"image_generation"')
        if i >= 0:
            out.append(json.loads(line[i:]))
    return out


def test_retry_after_is_respected(gateway, google):
    tag = unique("retry-after")
    k = INDEX["GK3"]
    google.set_rules([{"match": {"api_key_index": int(k), "prompt_contains": tag}, "status": 429, "retry_after_s": 2, "times": 1}])
    many(gateway, "fast", ["%s a%d" % (tag, i) for i in range(4)])
    assert google.stats()["api_key_statuses"][k].get("429") == 1
    google.clear_stats()
    many(gateway, "fast", ["%s b%d" % (tag, i) for i in range(4)])
    assert google.stats()["api_keys"].get(k, 0) == 0, "GK3 rests for the 2 s Google asked (cooldown_ms is 0.4 s)"
    time.sleep(2.2)
    many(gateway, "fast", ["%s c%d" % (tag, i) for i in range(6)])
    assert google.stats()["api_keys"].get(k, 0) >= 1, "and serves again after them"


def test_every_key_cooling_answers_429_with_the_first_one_back(gateway, google):
    tag = unique("all out")
    google.set_rules([{"match": {"api_key_index": 0, "prompt_contains": tag}, "status": 429, "retry_after_s": 40},
                      {"match": {"api_key_index": 1, "prompt_contains": tag}, "status": 429, "retry_after_s": 25}])
    status, headers, body = post(gateway, "keys", tag + " first")
    assert (status, json.loads(body)["error"]["code"]) == (429, "IMG_QUOTA_EXHAUSTED")
    assert 20 <= int(headers["retry-after"]) <= 25
    # Later requests (any worker) find both cooling and call nobody.
    calls = google.stats()["requests"]
    for s, h, _ in many(gateway, "keys", [tag + " then %d" % i for i in range(4)]):
        assert s == 429 and 15 <= int(h["retry-after"]) <= 25
    assert google.stats()["requests"] == calls
    google.clear_rules()


def test_a_refused_key_cools_five_times_longer(gateway, google):
    tag = unique("refused")
    k = INDEX["GK4"]
    google.set_rules([{"match": {"api_key_index": int(k), "prompt_contains": tag}, "status": 403, "times": 1}])
    assert [s for s, _, _ in many(gateway, "fast", ["%s a%d" % (tag, i) for i in range(4)])] == [200] * 4
    assert google.stats()["api_key_statuses"][k].get("403") == 1
    # cooldown_ms 400: a quota cool-down would be over after 0.4 s; a refused key rests 2 s.
    time.sleep(0.8)
    google.clear_stats()
    many(gateway, "fast", ["%s b%d" % (tag, i) for i in range(6)])
    assert google.stats()["api_keys"].get(k, 0) == 0
    time.sleep(1.5)
    many(gateway, "fast", ["%s c%d" % (tag, i) for i in range(6)])
    assert google.stats()["api_keys"].get(k, 0) >= 1


def test_a_5xx_moves_to_the_next_backend_and_vertex_takes_a_key(gateway, google):
    tag = unique("studio down")
    google.set_rules([{"match": {"backend": "gemini", "prompt_contains": tag}, "status": 503}])
    status, _, body = post(gateway, "multi", tag)
    assert status == 200, body
    calls = google.recorded(contains=tag)
    assert [c["backend"] for c in calls] == ["gemini", "vertex"]
    assert calls[1]["path"] == "/v1/projects/proj/locations/global/publishers/google/models/gemini-3-pro-image-preview:generateContent"
    assert google.stats()["api_key_statuses"][INDEX["VK"]] == {"200": 1}, "Vertex got its own key"


@pytest.mark.parametrize("marker", ["[fake:block=SAFETY]", "[fake:status=400]"])
def test_blocks_and_400s_are_never_retried(gateway, google, marker):
    tag = unique(marker)
    status, _, _ = post(gateway, "multi", tag)
    assert status == 400
    assert len(google.recorded(contains=tag)) == 1


def test_max_attempts_and_the_deadline_hold(gateway, google):
    tag = unique("all broken")
    google.set_rules([{"match": {"prompt_contains": tag}, "status": 500}])
    status, _, _ = post(gateway, "three", tag)
    assert status == 502 and len(google.recorded(contains=tag)) == 2, "max_attempts 2 of three backends"
    tag = unique("slow then down")
    google.set_rules([{"match": {"prompt_contains": tag}, "status": 503, "delay_ms": 1200}])
    t = time.time()
    status, _, body = post(gateway, "three", tag)
    took = time.time() - t
    assert status in (503, 504), body
    assert took < 2.6, "every attempt inside timeout_ms (2 s) of the request (took %.2fs)" % took
    assert len(google.recorded(contains=tag)) == 2


def test_vertex_with_a_metadata_token_fetched_once_shared_and_refreshed(workdir, google):
    google.clear_metadata_stats()
    e = Envoy(workdir, name="envoy-wi", fake_gemini=google.address, plugin=with_plugin(backends=[vertex_wi()], cache=None, urls=None),
              extra_clusters=[("vertex", "127.0.0.1", google.port), ("gce_metadata", "127.0.0.1", google.port)],
              env_extra={"GEMINI_API_KEY": "unused"}, concurrency=2)
    try:
        assert wait_for(lambda: google.metadata_stats()["token_fetches"] >= 1, timeout=5), "the root fetched a token"
        started = time.time()
        results = many(e, "images", [unique("wi %d" % i) for i in range(10)])
        assert [s for s, _, _ in results] == [200] * 10, [b[:300] for s, _, b in results if s != 200]
        assert time.time() - started < 8, "the batch must finish before the token is due (70 s life, 60 s margin)"
        assert google.metadata_stats()["token_fetches"] == 1, "one token for both workers"
        bearers = google.stats()["bearers"]
        assert sum(bearers.values()) == 10 and len(bearers) == 1, bearers
        call = google.recorded(contains="wi ")[-1]
        assert call["path"].startswith("/v1/projects/proj/locations/us-central1/publishers/google/models/")
        # Refreshed before it expires: 60 s before the end of its 70 s.
        assert wait_for(lambda: google.metadata_stats()["token_fetches"] >= 2, timeout=15)
        time.sleep(0.5)
        google.clear_stats()
        assert post(e, "images", unique("after refresh"))[0] == 200
        (label,) = google.stats()["bearers"]
        assert label not in bearers, "the new token is in use"
        log = e.log()
        assert "ya29." not in log and "Bearer" not in log
        assert e.stats()["wasmcustom.gemini_image.token_fetches.backend.wi.outcome.ok"] >= 2
    finally:
        e.stop()


def test_no_token_is_502_with_a_metric_and_a_warning(gateway):
    status, _, body = post(gateway, "nowi", unique("no metadata server"))
    assert (status, json.loads(body)["error"]["code"]) == (502, "IMG_UPSTREAM_AUTH")
    assert wait_for(lambda: gateway.stats().get("wasmcustom.gemini_image.token_fetches.backend.wi.outcome.failed", 0) >= 1)
    assert "backend wi: no access token from the metadata server" in gateway.log()
