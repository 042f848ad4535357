"""Large answers (src/driver_reply.rs): a local reply of 64 KiB or more goes to Envoy with a
one-byte body, and its real body is put in place when Envoy runs the reply back through the
filter's own response callbacks. What a client gets must be exactly the answer, with its
`content-length`, on a kept-alive HTTP/1.1 connection and over HTTP/2, for GET and HEAD, and
whatever a compressor before or after the filter in the chain does."""
import base64
import gzip
import http.client as httpclient
import json
import socket
import urllib.parse

import h2.config
import h2.connection
import h2.events
import pytest

from conftest import API_KEY, CANARY, unique
from harness import Envoy, free_port, with_plugin

COMPRESSOR = "envoy.filters.http.compressor"
IMAGE_BYTES = 300_000  # an answer of about 400 KB: carried


def compressor():
    """gzip for JSON and PNG answers, from the first byte (so it encodes the placeholder too,
    when it sits after the filter)."""
    return {"name": COMPRESSOR, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor",
        "response_direction_config": {"common_config": {
            "min_content_length": 1, "content_type": ["application/json", "image/png"]}},
        "compressor_library": {"name": "gzip", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.compression.gzip.compressor.v3.Gzip"}}}}


def wire_compressors(doc):
    """`zip_after` and `zip_after_nostream`: a compressor between the filter and the router (it
    sees the one-byte placeholder); `zip_before`: one before the filter (it sees the real body)."""
    for listener in doc["static_resources"]["listeners"]:
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        names = [f["name"] for f in hcm["http_filters"]]
        at = names.index("envoy.filters.http.wasm")
        if listener["name"] in ("zip_after", "zip_after_nostream"):
            hcm["http_filters"].insert(at + 1, compressor())
        elif listener["name"] == "zip_before":
            hcm["http_filters"].insert(at, compressor())


@pytest.fixture(scope="module")
def envoy(workdir, fake):
    e = Envoy(workdir, name="envoy-large-replies", fake_gemini="127.0.0.1:%d" % fake.port,
              plugin=with_plugin(cache={"l2": None}),
              extra_listeners=[("zip_after", free_port(), with_plugin(cache={"l2": None})),
                               ("zip_after_nostream", free_port(), with_plugin(cache={"l2": None}, streaming={"enabled": False})),
                               ("zip_before", free_port(), with_plugin(cache={"l2": None}))],
              doc_hook=wire_compressors, env_extra={"GEMINI_API_KEY": API_KEY})
    yield e
    e.stop()
    log = e.log()
    assert "panicked" not in log and "wasm trap" not in log.lower(), log[-3000:]
    assert "refused a reply" not in log, log[-3000:]
    assert CANARY not in log


class Connection:
    """One kept-alive HTTP/1.1 connection: a wrong `content-length` on one answer would
    garble the next."""

    def __init__(self, envoy, listener="images"):
        self.conn = httpclient.HTTPConnection("127.0.0.1", envoy.ports[listener], timeout=60)

    def request(self, method, path, body=None, headers=None):
        h = {"content-type": "application/json"} if body is not None else {}
        h.update(headers or {})
        self.conn.request(method, path, body=json.dumps(body).encode() if body is not None else None, headers=h)
        r = self.conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()

    def close(self):
        self.conn.close()


def h2c(envoy, method, path, body=None, headers=()):
    """One request over HTTP/2 with prior knowledge (h2c), as a sidecar or gateway hop speaks
    it: (status, headers, body)."""
    sock = socket.create_connection(("127.0.0.1", envoy.ports["images"]), timeout=60)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", method), (":scheme", "http"), (":authority", "127.0.0.1"), (":path", path)]
                      + list(headers), end_stream=body is None)
    if body is not None:
        conn.send_data(sid, body, end_stream=True)
    sock.sendall(conn.data_to_send())
    status, got, data, ended = None, {}, bytearray(), False
    try:
        while not ended:
            chunk = sock.recv(1 << 20)
            assert chunk, "the connection closed before the stream ended"
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    got = dict(event.headers)
                    status = int(got[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
                elif isinstance(event, h2.events.StreamReset):
                    raise AssertionError("the stream was reset")
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return status, got, bytes(data)


def prompt(words):
    return unique(words + " [fake:bytes=%d]" % IMAGE_BYTES)


def image_of(answer):
    return base64.b64decode(answer["data"][0]["b64_json"])


def test_large_answers_and_images_are_whole_on_one_kept_alive_connection(envoy):
    c = Connection(envoy)
    try:
        p = prompt("large")
        answers = []
        for expected in ["miss", "hit-l1", "hit-l1"]:
            status, h, raw = c.request("POST", "/v1/images/generations", {"prompt": p})
            assert status == 200, raw[:300]
            assert h["x-image-cache"] == expected
            assert int(h["content-length"]) == len(raw) > IMAGE_BYTES, (h, len(raw))
            assert "content-encoding" not in h
            answers.append(json.loads(raw))
        image = image_of(answers[0])
        assert len(image) == IMAGE_BYTES and image[:8] == b"\x89PNG\r\n\x1a\n"
        assert all(image_of(a) == image for a in answers)
        # The same image by URL: its bytes, then HEAD with its length and no body, then a small
        # answer between two large ones on the same connection.
        status, h, raw = c.request("POST", "/v1/images/generations", {"prompt": p, "response_format": "url"})
        assert status == 200, raw[:300]
        path = urllib.parse.urlsplit(json.loads(raw)["data"][0]["url"]).path
        for _ in range(2):
            status, h, body = c.request("GET", path)
            assert (status, body) == (200, image), (status, h)
            assert int(h["content-length"]) == IMAGE_BYTES and h["content-type"] == "image/png"
        status, h, body = c.request("HEAD", path)
        assert (status, body, int(h["content-length"])) == (200, b"", IMAGE_BYTES), h
        status, h, raw = c.request("POST", "/v1/images/generations", {"prompt": unique("small")})
        assert status == 200 and int(h["content-length"]) == len(raw) < 65536, (h, len(raw))
        json.loads(raw)
        status, h, raw = c.request("POST", "/v1/images/generations", {"prompt": p})
        assert (status, h["x-image-cache"]) == (200, "hit-l1") and image_of(json.loads(raw)) == image
    finally:
        c.close()


def test_a_compressor_after_the_filter_cannot_garble_a_large_answer(envoy):
    """It sees the filter's answers on their way out (the one-byte placeholder first) but never
    the request, which the filter answers itself: it leaves them alone, and the client gets
    every answer whole and unencoded. (Had it encoded the placeholder, the filter would drop
    the encoding: src/driver_tests.rs, "large replies".)"""
    c = Connection(envoy, "zip_after")
    try:
        p = prompt("zip after")
        gz = {"accept-encoding": "gzip"}
        status, h, raw = c.request("POST", "/v1/images/generations", {"prompt": p}, gz)
        assert status == 200, raw[:300]
        assert "content-encoding" not in h and int(h["content-length"]) == len(raw), h
        image = image_of(json.loads(raw))
        assert len(image) == IMAGE_BYTES
        status, h, raw = c.request("POST", "/v1/images/generations", {"prompt": p}, gz)
        assert (status, h["x-image-cache"], "content-encoding" in h) == (200, "hit-l1", False), h
        assert image_of(json.loads(raw)) == image
        status, _, raw = c.request("POST", "/v1/images/generations", {"prompt": p, "response_format": "url"}, gz)
        path = urllib.parse.urlsplit(json.loads(raw)["data"][0]["url"]).path
        status, h, body = c.request("GET", path, headers=gz)
        assert (status, body, "content-encoding" in h) == (200, image, False), h
        # Small answers, not carried, the same.
        status, h, raw = c.request("POST", "/v1/images/generations", {"prompt": unique("zip small")}, gz)
        assert status == 200 and "content-encoding" not in h and int(h["content-length"]) == len(raw), h
        json.loads(raw)
    finally:
        c.close()


def test_a_compressor_before_the_filter_encodes_the_whole_large_answer(envoy):
    c = Connection(envoy, "zip_before")
    try:
        p = prompt("zip before")
        gz = {"accept-encoding": "gzip"}
        bodies = []
        for expected in ["miss", "hit-l1"]:
            status, h, raw = c.request("POST", "/v1/images/generations", {"prompt": p}, gz)
            assert (status, h["x-image-cache"], h.get("content-encoding")) == (200, expected, "gzip"), h
            bodies.append(json.loads(gzip.decompress(raw)))
        assert image_of(bodies[0]) == image_of(bodies[1]) and len(image_of(bodies[0])) == IMAGE_BYTES
    finally:
        c.close()


def test_a_compressor_after_the_filter_that_saw_the_request_loses_its_encoding_of_the_placeholder(envoy):
    """With streaming off the filter lets the request's headers go on at once, so a compressor
    after it sees `accept-encoding` and gzips what comes back: the one-byte placeholder of a
    large answer (the filter then drops that encoding and puts the whole answer in its place),
    and small answers as usual."""
    c = Connection(envoy, "zip_after_nostream")
    try:
        gz = {"accept-encoding": "gzip"}
        status, h, raw = c.request("POST", "/v1/images/generations", {"prompt": unique("zip small nostream")}, gz)
        assert (status, h.get("content-encoding")) == (200, "gzip"), h
        json.loads(gzip.decompress(raw))
        p = prompt("zip after nostream")
        images = []
        for expected in ["miss", "hit-l1"]:
            status, h, raw = c.request("POST", "/v1/images/generations", {"prompt": p}, gz)
            assert (status, h["x-image-cache"]) == (200, expected), raw[:300]
            assert "content-encoding" not in h and int(h["content-length"]) == len(raw), h
            images.append(image_of(json.loads(raw)))
        assert images[0] == images[1] and len(images[0]) == IMAGE_BYTES
    finally:
        c.close()


def test_large_answers_and_images_over_http2(envoy):
    """HTTP/2 frames the body by its DATA frames, not by `content-length`: the two must still
    agree, and a HEAD must have the length and no data."""
    p = prompt("h2")
    body = json.dumps({"prompt": p}).encode()
    ct = [("content-type", "application/json")]
    images = []
    for expected in ["miss", "hit-l1"]:
        status, h, raw = h2c(envoy, "POST", "/v1/images/generations", body, ct)
        assert (status, h["x-image-cache"]) == (200, expected), raw[:300]
        assert int(h["content-length"]) == len(raw), h
        images.append(image_of(json.loads(raw)))
    assert images[0] == images[1] and len(images[0]) == IMAGE_BYTES
    status, _, raw = h2c(envoy, "POST", "/v1/images/generations", json.dumps({"prompt": p, "response_format": "url"}).encode(), ct)
    path = urllib.parse.urlsplit(json.loads(raw)["data"][0]["url"]).path
    status, h, data = h2c(envoy, "GET", path)
    assert (status, data, int(h["content-length"])) == (200, images[0], IMAGE_BYTES), h
    status, h, data = h2c(envoy, "HEAD", path)
    assert (status, data, int(h["content-length"])) == (200, b"", IMAGE_BYTES), h
