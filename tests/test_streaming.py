"""Streaming (contract section 12, wiring section 14): `stream: true` against a real Envoy, the
fake's `streamGenerateContent?alt=sse`, and the official Python SDK's stream iterators.

The filter holds the request's headers, rewrites the request into Gemini's stream call at the
end of its body, lets Envoy's router send it by the internal upstream route, and turns each
piece of Gemini's event stream into OpenAI's events as it passes."""
import base64
import http.client
import json
import struct
import time
import zlib

import openai
import pytest

from conftest import API_KEY, log_lines, unique
from harness import http as http_call, wait_for

UPSTREAM_HEADER = "x-gemini-image-filter-upstream"


@pytest.fixture
def sdk(envoy):
    return openai.OpenAI(base_url=envoy.url() + "/v1", api_key="sk-client-key-never-forwarded", max_retries=0, timeout=60)


class Stream:
    """A raw streamed answer: status, headers, and each event with the second it arrived."""

    def __init__(self, status, headers, events, body, cut):
        self.status, self.headers, self.events, self.body, self.cut = status, headers, events, body, cut

    def types(self):
        return [e["data"].get("type") for e in self.events]

    def data(self, kind):
        return [e["data"] for e in self.events if e["data"].get("type", "").endswith(kind)]


def stream(envoy, body, listener="images", path="/v1/images/generations", headers=None, raw=None, timeout=60):
    """POSTs a request and reads the answer as it comes, event by event."""
    conn = http.client.HTTPConnection("127.0.0.1", envoy.ports[listener], timeout=timeout)
    h = {"content-type": "application/json", "authorization": "Bearer sk-client-key-never-forwarded",
         "cookie": "session=client-cookie-never-forwarded"}
    h.update(headers or {})
    started = time.monotonic()
    conn.request("POST", path, raw if raw is not None else json.dumps(body).encode(), h)
    r = conn.getresponse()
    hdrs = {k.lower(): v for k, v in r.getheaders()}
    if not hdrs.get("content-type", "").startswith("text/event-stream"):
        data = r.read()
        conn.close()
        return Stream(r.status, hdrs, [], data, False)
    events, buf, cut = [], b"", False
    while True:
        try:
            chunk = r.read1(1 << 16)
        except (http.client.IncompleteRead, ConnectionError):
            cut = True
            break
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            raw_event, buf = buf.split(b"\n\n", 1)
            fields = {}
            for line in raw_event.decode().split("\n"):
                name, _, value = line.partition(": ")
                fields[name] = value
            events.append({"at": time.monotonic() - started, "event": fields.get("event"),
                           "data": json.loads(fields.get("data", "null"))})
    conn.close()
    return Stream(r.status, hdrs, events, buf, cut)


def png_size(b64):
    data = base64.b64decode(b64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def png(width=64, height=64, rgb=(200, 30, 30)):
    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def stream_calls(fake, prompt):
    return [r for r in fake.requests(prompt) if r.get("api_method") == "streamGenerateContent"]


# --- the events --------------------------------------------------------------------------------

def test_partial_images_arrive_as_gemini_thinks_then_the_completed_image(envoy, fake):
    prompt = unique("a lighthouse at dusk [fake:chunkdelay=400]")
    s = stream(envoy, {"prompt": prompt, "model": "gpt-image-1", "stream": True, "partial_images": 2,
                       "size": "1536x1024", "quality": "high"})
    assert s.status == 200, s.body
    assert s.headers["content-type"] == "text/event-stream"
    assert s.headers["x-image-cache"] == "miss" and s.headers["x-image-safety"] == "OFF"
    assert len(s.headers["x-image-prompt-hash"]) == 16
    assert "content-length" not in s.headers, "the events are not one buffered answer"
    assert s.types() == ["image_generation.partial_image", "image_generation.partial_image", "image_generation.completed"]
    assert [e["event"] for e in s.events] == s.types(), "each event also names itself"
    partials, (done,) = s.data("partial_image"), s.data("completed")
    assert [p["partial_image_index"] for p in partials] == [0, 1]
    for event in partials + [done]:
        assert event["output_format"] == "png" and event["background"] == "auto" and event["quality"] == "high"
        assert event["created_at"] > 0
        assert event["size"] == "%dx%d" % png_size(event["b64_json"])
    # `quality: high` is 4K; 1536x1024 is 3:2. The fake's interim images are a quarter and a
    # half of the final image's size.
    w, h = png_size(done["b64_json"])
    assert (w, h) == (5056, 3392)
    assert [png_size(p["b64_json"]) for p in partials] == [(w // 4, h // 4), (w // 2, h // 2)]
    assert "partial_image_index" not in done
    assert done["usage"]["total_tokens"] > 0 and done["usage"]["output_tokens"] > 0
    assert set(done["usage"]["input_tokens_details"]) == {"text_tokens", "image_tokens"}
    # Progress, not an answer delivered at the end: the fake waits 400 ms before each event.
    first, last = s.events[0]["at"], s.events[-1]["at"]
    assert last - first >= 0.6, [e["at"] for e in s.events]
    # One Gemini call, the stream method, with thoughts asked for.
    (call,) = stream_calls(fake, prompt)
    assert call["path"].endswith(":streamGenerateContent?alt=sse")
    assert call["body"]["generationConfig"]["thinkingConfig"] == {"includeThoughts": True}
    assert call["stream"] == {"events": 4, "end": "complete"}


def test_partial_images_are_capped_and_zero_asks_for_no_thoughts(envoy, fake):
    prompt = unique("a paper boat")
    one = stream(envoy, {"prompt": prompt, "stream": True, "partial_images": 1})
    assert one.types() == ["image_generation.partial_image", "image_generation.completed"]
    prompt0 = unique("a paper plane")
    none = stream(envoy, {"prompt": prompt0, "stream": True, "partial_images": 0})
    assert none.types() == ["image_generation.completed"]
    (call,) = stream_calls(fake, prompt0)
    assert "thinkingConfig" not in call["body"]["generationConfig"]
    absent = stream(envoy, {"prompt": unique("a kite"), "stream": True})
    assert absent.types() == ["image_generation.completed"], "partial_images defaults to 0"


def test_the_final_image_is_what_a_plain_request_gets(envoy, fake):
    prompt = unique("a copper kettle")
    s = stream(envoy, {"prompt": prompt, "stream": True, "partial_images": 2},
               headers={"cache-control": "no-store"})
    (done,) = s.data("completed")
    status, _, body = http_call("POST", envoy.url() + "/v1/images/generations",
                                json.dumps({"prompt": prompt}).encode(),
                                {"content-type": "application/json", "cache-control": "no-store"})
    assert status == 200
    assert json.loads(body)["data"][0]["b64_json"] == done["b64_json"]
    assert s.headers["x-image-cache"] == "bypass"


def test_the_python_sdk_iterates_partial_and_completed_events(sdk, fake):
    prompt = unique("a glass greenhouse")
    events = list(sdk.images.generate(model="gpt-image-1", prompt=prompt, stream=True, partial_images=2))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert events[-1].usage.total_tokens > 0
    assert base64.b64decode(events[-1].b64_json)[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(stream_calls(fake, prompt)) == 1


def test_the_python_sdk_streams_an_edit(sdk, envoy, fake):
    prompt = unique("paint the square blue")
    events = list(sdk.images.edit(model="gpt-image-1", image=("in.png", png(), "image/png"), prompt=prompt,
                                  stream=True, partial_images=1))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    (call,) = stream_calls(fake, prompt)
    parts = call["body"]["contents"][0]["parts"]
    assert base64.b64decode(parts[1]["inlineData"]["data"]) == png(), "the uploaded image went upstream"


# --- the cache -------------------------------------------------------------------------------

def test_a_completed_stream_is_cached_and_a_hit_streams_as_one_completed_event(envoy, fake):
    prompt = unique("a brass compass")
    body = {"prompt": prompt, "stream": True, "partial_images": 2}
    first = stream(envoy, body)
    assert first.headers["x-image-cache"] == "miss" and first.headers["x-image-cost-usd"] == "0.134"
    (done,) = first.data("completed")
    again = stream(envoy, body)
    assert again.status == 200 and again.headers["x-image-cache"] in ("hit-l1", "hit-l2")
    assert again.headers["x-image-cost-usd"] == "0"
    assert again.types() == ["image_generation.completed"], "a hit has no partial images"
    assert again.data("completed")[0]["b64_json"] == done["b64_json"]
    assert again.data("completed")[0]["usage"] == done["usage"]
    # A plain request for the same image is a hit too: the key does not depend on streaming.
    status, headers, plain = http_call("POST", envoy.url() + "/v1/images/generations",
                                       json.dumps({"prompt": prompt}).encode(), {"content-type": "application/json"})
    assert status == 200 and headers["x-image-cache"] in ("hit-l1", "hit-l2")
    assert json.loads(plain)["data"][0]["b64_json"] == done["b64_json"]
    assert len(stream_calls(fake, prompt)) == 1 and len(fake.requests(prompt)) == 1


def test_a_plain_answer_in_the_cache_streams_as_one_event(envoy, fake):
    prompt = unique("a slate roof")
    status, _, _ = http_call("POST", envoy.url() + "/v1/images/generations",
                             json.dumps({"prompt": prompt}).encode(), {"content-type": "application/json"})
    assert status == 200
    s = stream(envoy, {"prompt": prompt, "stream": True, "partial_images": 3})
    assert s.headers["x-image-cache"] in ("hit-l1", "hit-l2") and s.types() == ["image_generation.completed"]
    assert stream_calls(fake, prompt) == []


# --- refusals before the stream --------------------------------------------------------------

@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"),
    ({"partial_images": 4}, "partial_images"),
    ({"partial_images": "two"}, "partial_images"),
    ({"stream": "yes"}, "stream"),
])
def test_bad_stream_requests_are_plain_json_errors(envoy, fake, extra, param):
    prompt = unique("refused")
    s = stream(envoy, dict({"prompt": prompt, "stream": True}, **extra))
    assert s.status == 400 and s.headers["content-type"] == "application/json"
    e = json.loads(s.body)["error"]
    assert (e["code"], e["param"]) == ("IMG_INVALID_REQUEST", param)
    assert fake.requests(prompt) == []


def test_variations_do_not_stream(envoy):
    boundary = "b0undary"
    body = (("--%s\r\ncontent-disposition: form-data; name=\"stream\"\r\n\r\ntrue\r\n" % boundary).encode()
            + ("--%s\r\ncontent-disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
               "content-type: image/png\r\n\r\n" % boundary).encode() + png() + ("\r\n--%s--\r\n" % boundary).encode())
    s = stream(envoy, None, path="/v1/images/variations", raw=body,
               headers={"content-type": "multipart/form-data; boundary=%s" % boundary})
    assert s.status == 400 and json.loads(s.body)["error"]["param"] == "stream"


@pytest.mark.parametrize("marker, status, code, sdk_error", [
    ("[fake:status=429] [fake:retry=7]", 429, "IMG_QUOTA_EXHAUSTED", openai.RateLimitError),
    ("[fake:status=503]", 503, "IMG_SERVICE_UNAVAILABLE", openai.InternalServerError),
    ("[fake:status=400]", 400, "IMG_INVALID_PROMPT", openai.BadRequestError),
    ("[fake:keyinvalid]", 502, "IMG_UPSTREAM_AUTH", openai.InternalServerError),
])
def test_gemini_refusing_the_stream_is_the_usual_json_error(envoy, sdk, fake, marker, status, code, sdk_error):
    prompt = unique("refused upstream %s" % marker)
    s = stream(envoy, {"prompt": prompt, "stream": True, "partial_images": 2})
    assert s.status == status, s.body
    assert s.headers["content-type"] == "application/json" and s.headers["x-image-cache"] == "miss"
    assert int(s.headers["content-length"]) == len(s.body)
    e = json.loads(s.body)["error"]
    assert e["code"] == code and set(e) == {"message", "type", "param", "code", "category", "resolution"}
    assert API_KEY not in s.body.decode() and "API key" not in e["message"]
    if status == 429:
        assert s.headers["retry-after"] == "7"
    if status == 400:
        assert s.headers["x-should-retry"] == "false"
    with pytest.raises(sdk_error) as raised:
        list(sdk.images.generate(model="gpt-image-1", prompt=prompt, stream=True))
    assert raised.value.code == code


def test_a_connection_reset_before_the_stream_is_a_network_error(envoy, fake):
    prompt = unique("reset [fake:reset]")
    s = stream(envoy, {"prompt": prompt, "stream": True})
    assert s.status == 502, s.body
    assert json.loads(s.body)["error"]["code"] == "IMG_NETWORK_ERROR"
    (line,) = wait_for(lambda: log_lines(envoy, s.headers["x-image-prompt-hash"]))
    assert (line["status"], line["code"]) == (502, "IMG_NETWORK_ERROR")


def test_a_gemini_that_does_not_answer_in_time_is_a_504_before_the_stream(envoy, fake):
    # The `slow` listener allows Gemini 1.5 s; the router's timeout for the stream is what is
    # left of it.
    prompt = unique("slow [fake:delay=4000]")
    started = time.monotonic()
    s = stream(envoy, {"prompt": prompt, "stream": True}, listener="slow")
    assert time.monotonic() - started < 3.5
    assert s.status == 504, s.body
    assert json.loads(s.body)["error"]["code"] == "IMG_NETWORK_ERROR"


# --- failures after the stream started ----------------------------------------------------------

def test_a_mid_stream_gemini_error_ends_the_stream_with_an_error_event(envoy, sdk, fake):
    prompt = unique("breaks later [fake:errorafter=2]")
    s = stream(envoy, {"prompt": prompt, "stream": True, "partial_images": 2})
    assert s.status == 200 and not s.cut
    assert s.types() == ["image_generation.partial_image", "error"]
    assert s.events[-1]["event"] == "error"
    e = s.events[-1]["data"]["error"]
    assert e["code"] == "IMG_UPSTREAM_ERROR" and set(e) == {"message", "type", "param", "code", "category", "resolution"}
    with pytest.raises(openai.APIError) as raised:
        list(sdk.images.generate(model="gpt-image-1", prompt=prompt, stream=True, partial_images=2))
    assert "IMG_UPSTREAM_ERROR" in str(raised.value.body) or raised.value.code == "IMG_UPSTREAM_ERROR"
    # Errors are never stored: the next identical request calls Gemini again.
    again = stream(envoy, {"prompt": prompt, "stream": True, "partial_images": 2})
    assert again.headers["x-image-cache"] == "miss"


@pytest.mark.parametrize("marker, code", [
    ("[fake:block=PROHIBITED_CONTENT]", "IMG_SAFETY_BLOCKED"),
    ("[fake:finish=IMAGE_SAFETY]", "IMG_SAFETY_BLOCKED"),
    ("[fake:noimage]", "IMG_NO_IMAGE"),
    ("[fake:garbage]", "IMG_UPSTREAM_ERROR"),
    ("[fake:empty]", "IMG_NO_IMAGE"),
    ("[fake:truncated]", "IMG_UPSTREAM_ERROR"),
    ("[fake:badb64]", "IMG_UPSTREAM_ERROR"),
])
def test_blocks_and_unreadable_streams_end_with_an_error_event(envoy, fake, marker, code):
    prompt = unique("ends badly %s" % marker)
    s = stream(envoy, {"prompt": prompt, "stream": True, "partial_images": 2})
    assert s.status == 200
    assert s.types()[-1] == "error" and s.events[-1]["data"]["error"]["code"] == code
    (line,) = wait_for(lambda: log_lines(envoy, s.headers["x-image-prompt-hash"]))
    assert (line["status"], line["outcome"], line["code"]) == (200, "error", code)
    assert line["cost_usd"] == 0


def test_a_stream_that_breaks_off_is_cut_logged_and_not_cached(envoy, fake):
    prompt = unique("cut [fake:breakafter=2] [fake:chunkdelay=100]")
    body = {"prompt": prompt, "stream": True, "partial_images": 2}
    s = stream(envoy, body)
    assert s.status == 200 and s.cut, "Envoy resets the client's stream: no error event can follow"
    assert s.types() == ["image_generation.partial_image"]
    (line,) = wait_for(lambda: log_lines(envoy, s.headers["x-image-prompt-hash"]))
    assert (line["status"], line["code"], line["upstream_status"]) == (502, "IMG_NETWORK_ERROR", 200)
    assert stream(envoy, body).headers["x-image-cache"] == "miss"


# --- the wiring --------------------------------------------------------------------------------

@pytest.mark.parametrize("path, cluster", [
    ("/anything", "gemini"),
    ("/v1beta/models/gemini-3-pro-image-preview:streamGenerateContent?alt=sse", "gemini"),
    ("/v1/cache/img:x", "image_cache"),
    ("/v1/images/generations", "gemini"),
])
def test_a_client_naming_an_upstream_cluster_gets_404_and_reaches_nothing(envoy, fake, path, cluster):
    marker = unique("door")
    before = len(json.loads(http_call("GET", fake.url + "/__fake/requests")[2]))
    s = stream(envoy, {"prompt": marker, "stream": True}, path=path, headers={UPSTREAM_HEADER: cluster})
    assert s.status == 404 and json.loads(s.body)["error"]["code"] == "IMG_INVALID_REQUEST"
    assert len(json.loads(http_call("GET", fake.url + "/__fake/requests")[2])) == before
    assert fake.requests(marker) == []


def test_only_the_filters_headers_go_upstream(envoy, fake):
    prompt = unique("a weather vane")
    s = stream(envoy, {"prompt": prompt, "stream": True}, headers={"x-request-id": "trace-me-123",
                                                                  "accept-encoding": "gzip", "user-agent": "client/1"})
    assert s.status == 200
    (call,) = stream_calls(fake, prompt)
    headers = {k.lower(): v for k, v in call["headers"].items()}
    assert headers.get("x-goog-api-key") == API_KEY
    assert headers.get("x-request-id") == "trace-me-123"
    for leaked in ("authorization", "cookie", "accept-encoding", "user-agent", UPSTREAM_HEADER,
                   "x-envoy-upstream-rq-timeout-ms"):
        assert leaked not in headers, leaked
    assert call["api_key_label"] is not None


def test_streaming_off_refuses_stream_true(envoy):
    s = stream(envoy, {"prompt": unique("no streams here"), "stream": True}, listener="nostream")
    assert s.status == 400 and json.loads(s.body)["error"]["param"] == "stream"
    status, _, _ = http_call("POST", envoy.url("nostream") + "/v1/images/generations",
                             json.dumps({"prompt": unique("plain is fine")}).encode(), {"content-type": "application/json"})
    assert status == 200


def test_one_log_line_per_stream_with_its_cost_and_metrics(envoy, fake):
    before = envoy.stats()
    prompt = unique("a clock tower")
    s = stream(envoy, {"prompt": prompt, "stream": True, "partial_images": 1})
    assert s.status == 200
    (line,) = wait_for(lambda: log_lines(envoy, s.headers["x-image-prompt-hash"]))
    assert (line["status"], line["outcome"], line["cache"]) == (200, "success", "miss")
    assert (line["upstream_status"], line["images"], line["attempts"], line["backend"]) == (200, 1, 1, "gemini")
    assert line["cost_usd"] == 0.134 and line["output_tokens"] > 0
    assert prompt not in json.dumps(line)
    after = wait_for(lambda: (lambda st: st if st.get("wasmcustom.gemini_image.images", 0) >
                              before.get("wasmcustom.gemini_image.images", 0) else None)(envoy.stats()))
    assert after, "the images counter counts streamed images"
