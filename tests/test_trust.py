"""What the cache may never serve, and what bounds a worker, end to end in a real Envoy:
L2 entries are untrusted input, no copy outlives the TTL, the hot set obeys the per-entry
bound, the in-flight bounds answer 503 IMG_OVERLOADED, and inputs JSON allows but nobody can
hold get a 400 naming their field."""
import base64
import hashlib
import json
import struct
import subprocess
import threading
import time

import pytest

from conftest import API_KEY, CACHE_TOKEN, unique
from harness import ROOT, Envoy, envoy_bin, free_port, http, post_image, render_envoy, wait_for, with_plugin

MIB = 1024 * 1024
PNG_PREFIX = b"\x89PNG\r\n\x1a\n"
TTL = 4


def cache_key(prompt, n=1, model="gemini-3-pro-image", upstream="gemini-3-pro-image-preview"):
    """The L2 key the filter uses for a plain request (docs/cache.md, "Keys"): SHA-256 over
    length-prefixed fields. A wrong key here shows up as a missing `cache_l2_rejected` count."""
    h = hashlib.sha256()

    def field(name, value):
        h.update(name.encode())
        h.update(struct.pack(">Q", len(value)))
        h.update(value)

    field("v", b"1")
    field("model", upstream.encode())
    field("prompt", prompt.encode())
    field("ratio", b"1:1")
    field("image_size", b"")
    field("n", str(n).encode())
    for category in ["HARM_CATEGORY_HARASSMENT", "HARM_CATEGORY_HATE_SPEECH", "HARM_CATEGORY_SEXUALLY_EXPLICIT",
                     "HARM_CATEGORY_DANGEROUS_CONTENT"]:
        field(category, b"OFF")
    return "img:%s:auto:none:%s" % (model, h.hexdigest())


def entry(key, created, images, mime=b"image/png"):
    """A cache entry in the filter's format (src/cache.rs): magic, key, creation time, no
    usage, then each image's mime type, no text, and base64."""
    out = b"GIE1" + struct.pack(">I", len(key)) + key.encode() + struct.pack(">Q", created) + b"\x00"
    out += struct.pack(">I", len(images))
    for b64 in images:
        out += struct.pack(">I", len(mime)) + mime + struct.pack(">I", 0xFFFFFFFF) + struct.pack(">I", len(b64)) + b64
    return out


@pytest.fixture(scope="module")
def fleet(workdir, fake, cache_service):
    """Two Envoys sharing the session's cache service, as a fleet does, both with a short TTL;
    the first also has listeners with a tiny L1 entry bound and tight in-flight bounds."""
    cache = {"ttl_seconds": TTL}
    listeners = [
        ("tinyl1", free_port(), with_plugin(cache={"l1": {"max_entry_bytes": 1000}, "l2": None})),
        ("overload", free_port(), with_plugin(cache=None, urls=None, limits={"max_n": 10, "max_inflight_requests": 8,
                                                                   "max_inflight_bytes": 64 * MIB})),
    ]
    common = dict(fake_gemini="127.0.0.1:%d" % fake.port, image_cache="127.0.0.1:%d" % cache_service.port,
                  env_extra={"GEMINI_API_KEY": API_KEY, "IMAGE_CACHE_TOKEN": CACHE_TOKEN})
    a = Envoy(workdir, name="envoy-trust-a", plugin=with_plugin(cache=cache), extra_listeners=listeners, **common)
    b = Envoy(workdir, name="envoy-trust-b", plugin=with_plugin(cache=cache), **common)
    yield a, b
    for e in (a, b):
        e.stop()
        log = e.log()
        assert "panicked" not in log and "wasm trap" not in log.lower(), log[-3000:]


def l2_put(cache_service, key, value, ttl=600):
    url = "http://127.0.0.1:%d/v1/cache/%s" % (cache_service.port, key)
    headers = dict(cache_service.headers(), **{"x-cache-ttl-seconds": str(ttl)})
    assert http("PUT", url, value, headers)[0] in (200, 201, 204)


def rejected(envoy):
    return envoy.stats().get("wasmcustom.gemini_image.cache_l2_rejected", 0)


@pytest.mark.parametrize("images,why", [
    ([b'iVBORw0KGgo","url":"http://evil.example/x"AA'], "a quote that would end the JSON string"),
    ([b"iVBORw0KGgoAAAAN\\u0022AA"], "a backslash"),
    ([b"iVBORw0KGgoAAAANSUhE\x01AA"], "a control byte"),
    ([base64.b64encode(b"GIF89a not the PNG it says")], "bytes that are not of the declared type"),
    ([base64.b64encode(PNG_PREFIX + b"one"), base64.b64encode(PNG_PREFIX + b"two")], "two images for n=1"),
])
def test_a_poisoned_l2_entry_is_a_miss_and_never_reaches_a_client(fleet, fake, cache_service, images, why):
    _, b = fleet
    prompt = unique("poison")
    before = rejected(b)
    l2_put(cache_service, cache_key(prompt), entry(cache_key(prompt), int(time.time()), images))
    status, headers, body = post_image(b, {"prompt": prompt})
    assert (status, headers["x-image-cache"]) == (200, "miss"), why
    assert rejected(b) == before + 1, "the entry was found, checked and refused: " + why
    answer = json.loads(body)  # valid JSON, whatever the entry held
    assert base64.b64decode(answer["data"][0]["b64_json"]).startswith(PNG_PREFIX)
    assert len(fake.requests(prompt)) == 1, "Gemini answered instead"


def test_a_good_l2_entry_is_served_so_the_checks_are_not_refusing_everything(fleet, fake, cache_service):
    _, b = fleet
    prompt = unique("good entry")
    image = base64.b64encode(PNG_PREFIX + b"a picture")
    l2_put(cache_service, cache_key(prompt), entry(cache_key(prompt), int(time.time()), [image]))
    status, headers, body = post_image(b, {"prompt": prompt})
    assert (status, headers["x-image-cache"]) == (200, "hit-l2")
    assert json.loads(body)["data"][0]["b64_json"] == image.decode()
    assert fake.requests(prompt) == []


def test_copies_between_tiers_never_extend_an_answers_life(fleet, fake, cache_service):
    a, b = fleet
    prompt = unique("aging")
    t0 = time.time()
    assert post_image(a, {"prompt": prompt})[1]["x-image-cache"] == "miss"
    made = time.time()  # Gemini answered (and the entry was made) by now
    assert wait_for(lambda: http("GET", "http://127.0.0.1:%d/v1/cache/%s" % (cache_service.port, cache_key(prompt)),
                                 headers=cache_service.headers())[0] == 200), "written to L2"
    time.sleep(max(0, t0 + 2 - time.time()))
    # Two seconds in, the second Envoy copies it from L2 into its L1 and its hot set...
    assert post_image(b, {"prompt": prompt})[1]["x-image-cache"] == "hit-l2"
    assert post_image(b, {"prompt": prompt})[1]["x-image-cache"] == "hit-l1"
    # ...and once TTL seconds have passed since Gemini answered, no copy answers any more
    # (before, each copy counted its TTL from when it was made: about 2 s more here).
    time.sleep(max(0, int(made) + TTL + 0.3 - time.time()))
    assert post_image(b, {"prompt": prompt})[1]["x-image-cache"] == "miss"
    assert len(fake.requests(prompt)) == 2


def test_the_hot_set_obeys_max_entry_bytes(fleet, fake):
    a, _ = fleet
    prompt = unique("bigger than the bound")
    for _ in range(2):
        status, headers, _ = post_image(a, {"prompt": prompt}, listener="tinyl1")
        assert (status, headers["x-image-cache"]) == (200, "miss")
    assert len(fake.requests(prompt)) == 2


def test_thirty_concurrent_n10_requests_with_large_answers_are_served_or_refused(fleet, fake):
    a, _ = fleet
    # Each answer is about 6.7 MB of base64: more than the 4 MiB reserved for a 1K image, so
    # the worker's 64 MiB bound fills before an n=10 request has all its answers.
    results = []

    def one(i):
        results.append(post_image(a, {"prompt": unique("[fake:bytes=5000000] crowd %d" % i), "n": 10},
                                  listener="overload", timeout=120))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(s for s, _, _ in results)
    assert len(results) == 30 and set(statuses) <= {200, 503}, statuses
    assert 503 in statuses, "the bounds refused some"
    served = [(h, json.loads(b)) for s, h, b in results if s == 200]
    assert served, "and served some"
    for headers, answer in served:
        assert len(answer["data"]) + int(headers.get("x-images-failed", 0)) == 10
        for d in answer["data"]:
            assert base64.b64decode(d["b64_json"][:64]).startswith(PNG_PREFIX)
    for s, h, b in results:
        if s == 503:
            assert json.loads(b)["error"]["code"] == "IMG_OVERLOADED" and h["retry-after"] == "1"
    # The VM is alive and the bounds are free again.
    assert post_image(a, {"prompt": unique("after the crowd"), "n": 10}, listener="overload")[0] == 200
    assert a.stats()["wasmcustom.gemini_image.errors.code.IMG_OVERLOADED"] == statuses.count(503)


@pytest.mark.parametrize("raw,param", [
    (b'{"prompt": "p", "n": 1e400}', "n"),
    (b'{"prompt": "p", "n": 18446744073709551616}', "n"),
    (b'{"prompt": "p", "size": 1e400}', "size"),
    (b'{"prompt": "p", "size": 1024}', "size"),
])
def test_numbers_json_allows_but_nobody_can_hold_name_their_field(client, raw, param):
    status, headers, body = client.post(None, raw=raw)
    error = json.loads(body)["error"]
    assert (status, error["code"], error["param"]) == (400, "IMG_INVALID_REQUEST", param)
    assert headers["x-should-retry"] == "false"


def test_a_failed_dispatch_names_no_cluster(client):
    status, _, body = client.post({"prompt": unique("nowhere")}, listener="nocluster")
    assert status == 500
    assert b"no_such_cluster" not in body and b"cluster" not in body


@pytest.mark.parametrize("config", ["[]", "[1, 2]", '"{}"', "42", "null"])
def test_a_plugin_configuration_that_is_not_an_object_is_refused(tmp_path, config):
    doc = render_envoy.render(listen_port=free_port(), admin_port=free_port())
    render_envoy._wasm_filter(doc["static_resources"]["listeners"][0])["configuration"]["value"] = config
    path = render_envoy.write(doc, str(tmp_path / "bad.yaml"))
    r = subprocess.run([envoy_bin(), "--mode", "validate", "-c", path], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0, config
    assert "must be a JSON object" in r.stdout + r.stderr
