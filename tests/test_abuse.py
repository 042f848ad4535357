"""Abuse: limits at and over their edge, the cap of n with slow calls, a stampede on one
prompt, path variants, and clients that try to reach Gemini or set the key or the upstream
model themselves (issue 7)."""
import http.client as httplib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler

import pytest

from conftest import API_KEY, unique
from harness import Envoy, http, serve_in_thread, with_plugin


class App:
    """Plays the application behind Envoy: answers 200 and records what reached it."""

    def __init__(self):
        self.seen = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _any(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                outer.seen.append((self.command, self.path, dict(self.headers), body))
                out = json.dumps({"app": True, "path": self.path}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = do_DELETE = _any

        self.server = serve_in_thread(Handler)
        self.port = self.server.server_address[1]

    def stop(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def gateway(workdir, fake):
    app = App()
    e = Envoy(workdir, name="envoy-abuse", fake_gemini="127.0.0.1:%d" % fake.port, app="127.0.0.1:%d" % app.port,
              plugin=with_plugin(limits={"max_n": 10}, cache=None, urls=None), env_extra={"GEMINI_API_KEY": API_KEY})
    yield e, app
    e.stop()
    assert "panicked" not in e.log()


def raw_request(port, method, path, body=b"", headers=None):
    """http.client sends the path exactly as given (no normalisation on the client side)."""
    c = httplib.HTTPConnection("127.0.0.1", port, timeout=30)
    h = {"content-type": "application/json"}
    h.update(headers or {})
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


def test_prompt_at_and_over_the_limit(client):
    edge = unique("edge")
    prompt = edge + "x" * (32000 - len(edge))
    assert len(prompt) == 32000
    assert client.post({"prompt": prompt})[0] == 200
    status, _, body = client.post({"prompt": prompt + "x"})
    assert status == 400 and json.loads(body)["error"]["code"] == "IMG_INVALID_PROMPT"
    wide = "é" * 32000  # the limit counts characters, not bytes (64,000 here)
    assert client.post({"prompt": wide})[0] == 200


def test_n_at_the_cap_with_every_call_slow(gateway, fake):
    e, _ = gateway
    prompt = unique("ten slow [fake:delay=700]")
    t = time.time()
    status, _, body = raw_request(e.port, "POST", "/v1/images/generations", json.dumps({"prompt": prompt, "n": 10}).encode())
    took = time.time() - t
    assert status == 200 and len(json.loads(body)["data"]) == 10
    assert len(fake.requests(prompt)) == 10
    assert took < 3.0, "ten 700 ms calls overlap (%.2fs)" % took
    status, _, body = raw_request(e.port, "POST", "/v1/images/generations", json.dumps({"prompt": prompt, "n": 11}).encode())
    assert status == 400 and json.loads(body)["error"]["param"] == "n"


def test_a_stampede_on_one_prompt(client, fake):
    prompt = unique("stampede [fake:delay=200]")
    with ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(lambda _: client.post({"prompt": prompt}), range(24)))
    assert [r[0] for r in results] == [200] * 24
    # Coalesced: the misses in flight share one generation (tests/test_coalescing.py has the
    # rules); afterwards it is a hit.
    assert len(fake.requests(prompt)) == 1
    assert sorted({r[1]["x-image-cache"] for r in results}) == ["coalesced", "miss"]
    time.sleep(0.2)
    assert client.post({"prompt": prompt})[1]["x-image-cache"] in ("hit-l1", "hit-l2")


@pytest.mark.parametrize("path,handled", [
    ("/v1/images/generations", True),
    ("/v1/images/generations/", True),
    ("/v1/images/generations?api-version=2024-02-01", True),
    ("//v1//images/generations", True),          # merge_slashes
    ("/v1/images/./generations", True),          # normalize_path
    ("/v1/images/x/../generations", True),       # normalize_path
    ("/v1/images/%67enerations", True),          # normalize_path decodes unreserved characters
    ("/V1/images/generations", False),
    ("/v1/images/generations/extra", False),
    ("/v1/images/edit", False),
    ("/v1/images/variations/x", False),
])
def test_path_variants_are_handled_or_passed_on_as_documented(gateway, fake, path, handled):
    e, app = gateway
    prompt = unique("path")
    before = len(app.seen)
    status, headers, body = raw_request(e.port, "POST", path, json.dumps({"prompt": prompt}).encode())
    if handled:
        assert status == 200 and "data" in json.loads(body), (path, status, body[:200])
        assert len(fake.requests(prompt)) == 1
        assert len(app.seen) == before
    else:
        assert status == 200 and json.loads(body)["app"] is True, (path, body[:200])
        assert fake.requests(prompt) == []


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_other_methods_on_the_image_path_get_a_405(gateway, method):
    e, app = gateway
    status, headers, body = raw_request(e.port, method, "/v1/images/generations", b"{}")
    assert status == 405 and json.loads(body)["error"]["code"] == "IMG_INVALID_REQUEST"


def test_clients_cannot_reach_gemini_through_the_gateway(gateway, fake):
    e, app = gateway
    prompt = unique("direct")
    gemini_body = json.dumps({"contents": [{"parts": [{"text": prompt}]}]}).encode()
    for path in ["/v1beta/models/gemini-3-pro-image-preview:generateContent",
                 "/v1/images/generations/../../v1beta/models/x:generateContent"]:
        for host in ["generativelanguage.googleapis.com", "gemini", "localhost"]:
            status, _, body = raw_request(e.port, "POST", path, gemini_body, {"host": host, "x-goog-api-key": "mine"})
            assert json.loads(body).get("app") is True, (path, host, body[:200])
    assert fake.requests(prompt) == [], "nothing reached Gemini"
    # That no route of any shipped kit (Envoy configs, Istio, Envoy Gateway) leads to the
    # filter's clusters is checked on the files themselves:
    # test_deploy.py::test_no_route_of_any_kit_reaches_the_filters_clusters.


def test_clients_cannot_set_the_key_or_the_upstream_model(gateway, fake):
    e, _ = gateway
    prompt = unique("override")
    status, _, _ = raw_request(e.port, "POST", "/v1/images/generations", json.dumps({
        "prompt": prompt, "api_key": "mine", "key": "mine", "upstream_model": "gemini-2.0-flash",
        "gemini": {"model": "other"}, "contents": [{"parts": [{"text": "injected"}]}]}).encode(),
        {"x-goog-api-key": "mine", "authorization": "Bearer mine", "host": "generativelanguage.googleapis.com",
         "x-goog-user-project": "theirs"})
    assert status == 200
    (call,) = fake.requests(prompt)
    assert call["headers"]["x-goog-api-key"] == API_KEY
    assert "x-goog-user-project" not in call["headers"] and "authorization" not in call["headers"]
    assert call["path"] == "/v1beta/models/gemini-3-pro-image-preview:generateContent"
    assert call["body"]["contents"] == [{"role": "user", "parts": [{"text": prompt}]}]
    for model in ["gemini-3-pro-image-preview", "gemini-2.0-flash", "../models/x", "gemini-3-pro-image/../x"]:
        status, _, body = raw_request(e.port, "POST", "/v1/images/generations", json.dumps({"prompt": prompt, "model": model}).encode())
        assert status == 400 and json.loads(body)["error"]["code"] == "IMG_UNSUPPORTED_MODEL", model
