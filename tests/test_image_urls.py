"""Image URLs the filter serves itself (contract section 10): `url` answers name
`{base}/v1/images/files/{id}`, and GET/HEAD there answer the image's bytes from the cache tiers,
from any worker (Envoy --concurrency 2) and from any Envoy sharing the cache service."""
import base64
import hashlib
import http.client as httpclient
import json
import re
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from conftest import API_KEY, CACHE_TOKEN, CANARY, log_lines, unique
from harness import Envoy, free_port, http, wait_for, with_plugin

URL_RE = re.compile(r"^http://127\.0\.0\.1:\d+/v1/images/files/[0-9a-f]{32}-\d+$")


@pytest.fixture(scope="module")
def fleet(workdir, fake, cache_service):
    """Two Envoys (two workers each) sharing one cache service; the first also has a listener
    whose URLs live 2 s, one with a configured base, and one whose profile keeps its cache
    (and so its URLs) private."""
    def start(name, extra=()):
        return Envoy(workdir, name=name, fake_gemini="127.0.0.1:%d" % fake.port,
                     image_cache="127.0.0.1:%d" % cache_service.port, extra_listeners=list(extra),
                     env_extra={"GEMINI_API_KEY": API_KEY, "IMAGE_CACHE_TOKEN": CACHE_TOKEN})
    a = start("envoy-urls-a", [
        ("short", free_port(), with_plugin(urls={"ttl_seconds": 2})),
        ("cdn", free_port(), with_plugin(urls={"base": "https://images.example.com/"})),
        ("private", free_port(), with_plugin(profiles={"default": {"cache": "private"}})),
    ])
    b = start("envoy-urls-b")
    yield a, b
    for e in (a, b):
        e.stop()
        log = e.log()
        assert "panicked" not in log and "wasm trap" not in log.lower(), log[-3000:]
        assert CANARY not in log


def generate(envoy, body, listener="images", headers=None):
    h = {"content-type": "application/json"}
    h.update(headers or {})
    status, hdrs, raw = http("POST", envoy.url(listener) + "/v1/images/generations", json.dumps(body).encode(), h,
                             timeout=60)
    assert status == 200, raw[:300]
    return hdrs, json.loads(raw)


def fetch(url, method="GET", headers=None):
    """A request on a fresh connection (so that both workers get some): status, headers, body."""
    parts = urllib.parse.urlsplit(url)
    conn = httpclient.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, parts.path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def on(envoy, url, listener="images"):
    """The same path on another Envoy (or listener)."""
    return envoy.url(listener) + urllib.parse.urlsplit(url).path


def png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    return "%dx%d" % (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))


def test_a_url_answer_serves_the_image_bytes_on_every_worker(fleet):
    a, _ = fleet
    headers, answer = generate(a, {"prompt": unique("url cat"), "n": 2, "response_format": "url"})
    urls = [d["url"] for d in answer["data"]]
    assert all(URL_RE.match(u) for u in urls), urls
    assert urls[0].startswith(a.url()), "the request's own authority is the base"
    assert len({u.rsplit("-", 1)[0] for u in urls}) == 1 and urls[0] != urls[1]
    assert "b64_json" not in answer["data"][0] and len(json.dumps(answer)) < 2000, "no image bytes inline"
    assert answer["output_format"] == "png" and answer["size"]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(fetch, urls * 8))
    for status, h, body in got:
        assert status == 200, body[:200]
        assert h["content-type"] == "image/png"
        assert int(h["content-length"]) == len(body) > 1000
        m = re.fullmatch(r"private, max-age=(\d+)", h["cache-control"])
        assert m and 3590 <= int(m.group(1)) <= 3600, h["cache-control"]
        assert h["etag"].startswith('"')
    first = [b for (s, h, b) in got[0::2]]
    assert len(set(first)) == 1 and png_size(first[0]) == answer["size"], "the first image, the same bytes every time"
    assert wait_for(lambda: len(log_lines(a, '"endpoint":"files"')) >= 16), "one log line per fetch"


def test_head_304_and_other_methods(fleet):
    a, _ = fleet
    _, answer = generate(a, {"prompt": unique("url head"), "response_format": "url"})
    url = answer["data"][0]["url"]
    status, h, body = fetch(url)
    assert status == 200
    status, hh, head_body = fetch(url, "HEAD")
    assert (status, head_body) == (200, b"")
    assert hh["etag"] == h["etag"] and hh["content-type"] == "image/png"
    assert int(hh.get("content-length", len(body))) == len(body)
    status, h304, body304 = fetch(url, headers={"if-none-match": h["etag"]})
    assert (status, body304) == (304, b"") and h304["etag"] == h["etag"]
    status, h200, _ = fetch(url, headers={"if-none-match": '"something-else"'})
    assert status == 200
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, hm, body = fetch(url, method)
        assert status == 405, (method, body[:200])
        assert hm["allow"] == "GET, HEAD"
        assert json.loads(body)["error"]["code"] == "IMG_INVALID_REQUEST"


def test_unknown_altered_and_malformed_ids_are_404(fleet):
    a, _ = fleet
    _, answer = generate(a, {"prompt": unique("url tamper"), "response_format": "url"})
    url = answer["data"][0]["url"]
    token = url.rsplit("/", 1)[1].split("-")[0]
    flipped = token[:-1] + ("0" if token[-1] != "0" else "1")
    for bad in [url.replace(token, flipped), url.replace("-0", "-1"), url.replace("-0", "-x"),
                url.replace(token, token.upper()), url + "0", a.url() + "/v1/images/files/",
                a.url() + "/v1/images/files/" + "0" * 32 + "-0"]:
        status, h, body = fetch(bad)
        assert status == 404, (bad, body[:200])
        e = json.loads(body)["error"]
        assert (e["code"], e["type"]) == ("IMG_IMAGE_NOT_FOUND", "invalid_request_error"), bad
        assert set(e) >= {"message", "type", "param", "code"}
    # The real one still works.
    assert fetch(url)[0] == 200


def test_a_url_expires_with_its_ttl(fleet):
    a, _ = fleet
    _, answer = generate(a, {"prompt": unique("url short"), "response_format": "url"}, listener="short")
    url = answer["data"][0]["url"]
    status, h, _ = fetch(url)
    assert status == 200 and int(h["cache-control"].split("=")[1]) <= 2
    assert wait_for(lambda: fetch(url)[0] == 404, timeout=5), "gone after urls.ttl_seconds"


def test_a_fleet_sharing_the_cache_service_serves_each_others_urls(fleet, cache_service):
    a, b = fleet
    before = cache_service.stats()["entries"]
    _, answer = generate(a, {"prompt": unique("url fleet"), "n": 2, "response_format": "url"})
    url = answer["data"][1]["url"]
    assert wait_for(lambda: cache_service.stats()["entries"] >= before + 2), "entry and record written to L2"
    status, h, body = fetch(on(b, url))
    assert status == 200, body[:200]
    assert h["x-image-cache"] == "hit-l2"
    assert body == fetch(url)[2], "the same image from either Envoy"
    status, h, _ = fetch(on(b, url))
    assert status == 200 and h["x-image-cache"] == "hit-l1", "then kept by that worker"


def test_dall_e_models_default_to_url_and_others_to_b64(fleet):
    a, _ = fleet
    _, answer = generate(a, {"prompt": unique("url default"), "model": "dall-e-3"})
    assert URL_RE.match(answer["data"][0]["url"])
    _, answer = generate(a, {"prompt": unique("b64 default"), "model": "gpt-image-1"})
    assert "b64_json" in answer["data"][0]
    _, answer = generate(a, {"prompt": unique("b64 asked"), "model": "dall-e-3", "response_format": "b64_json"})
    assert "b64_json" in answer["data"][0]


def test_a_configured_base_is_used_and_a_hit_gets_new_urls(fleet):
    a, _ = fleet
    body = {"prompt": unique("url cdn"), "response_format": "url"}
    h1, first = generate(a, body, listener="cdn")
    h2, again = generate(a, body, listener="cdn")
    assert (h1["x-image-cache"], h2["x-image-cache"]) == ("miss", "hit-l1")
    u1, u2 = first["data"][0]["url"], again["data"][0]["url"]
    assert u1.startswith("https://images.example.com/v1/images/files/") and u1 != u2
    for u in (u1, u2):
        assert fetch(on(a, u, "cdn"))[0] == 200


def test_uncached_answers_keep_their_images_for_their_urls(fleet):
    a, _ = fleet
    _, answer = generate(a, {"prompt": unique("url nostore"), "response_format": "url"},
                         headers={"cache-control": "no-store"})
    assert fetch(answer["data"][0]["url"])[0] == 200
    _, answer = generate(a, {"prompt": unique("url partial") + " [fake:fail-first=1]", "n": 2,
                             "response_format": "url"})
    assert len(answer["data"]) == 1, "a partial answer, never cached"
    assert fetch(answer["data"][0]["url"])[0] == 200


def test_a_private_profiles_urls_are_not_served_to_another(fleet):
    a, _ = fleet
    _, answer = generate(a, {"prompt": unique("url private"), "response_format": "url"}, listener="private")
    url = answer["data"][0]["url"]
    assert fetch(on(a, url, "private"))[0] == 200
    assert fetch(on(a, url, "images"))[0] == 404, "another profile's listener does not find it"


def test_logs_and_metrics_of_file_fetches_hold_no_id(fleet):
    a, _ = fleet
    _, answer = generate(a, {"prompt": unique("url logs"), "response_format": "url"})
    url = answer["data"][0]["url"]
    token = url.rsplit("/", 1)[1].split("-")[0]
    fetch(url)
    fetch(url, headers={"if-none-match": fetch(url)[1]["etag"]})
    fetch(url.replace(token, "f" * 32))
    assert wait_for(lambda: len(log_lines(a, '"endpoint":"files"')) >= 4)
    assert token not in a.log()
    stats = a.stats()
    for result in ("ok", "not_modified", "not_found"):
        assert stats["wasmcustom.gemini_image.file_fetches.outcome.%s" % result] >= 1, result


def test_the_python_sdk_reads_a_url_and_the_image_behind_it(fleet):
    a, _ = fleet
    client = openai.OpenAI(base_url=a.url() + "/v1", api_key="unused", max_retries=0)
    result = client.images.generate(model="dall-e-3", prompt=unique("url sdk"), size="1792x1024")
    url = result.data[0].url
    assert URL_RE.match(url)
    status, h, body = fetch(url)
    assert status == 200 and png_size(body) == result.size


def test_the_scheme_comes_from_x_forwarded_proto(fleet):
    a, _ = fleet
    _, answer = generate(a, {"prompt": unique("url https"), "response_format": "url"},
                         headers={"x-forwarded-proto": "https"})
    url = answer["data"][0]["url"]
    assert url.startswith("https://127.0.0.1:%d/v1/images/files/" % a.port), url
    assert fetch(on(a, url))[0] == 200


def test_urls_without_a_cache_tier_are_refused(tmp_path):
    from test_profiles import validate
    rc, out = validate(tmp_path, with_plugin(cache=None))
    assert rc != 0, out[-3000:]
    assert "urls needs a cache tier" in out, out[-3000:]
    rc, out = validate(tmp_path, with_plugin(cache={"l1": None, "l2": None}))
    assert rc != 0 and "urls needs a cache tier" in out, out[-3000:]
