"""The fields gpt-image-1 answers carry (contract section 5): `output_format` from Gemini's
mimeType, `size` read from the first image's own header, and `usage.input_tokens_details`
from Gemini's promptTokensDetails, on every path: a miss, an L1 hit, an L2 hit, an edit, and
through the OpenAI Python SDK."""
import base64
import json
import struct

import openai
import pytest

from conftest import API_KEY, CACHE_TOKEN, unique
from harness import Envoy, free_port, http, wait_for, with_plugin
from test_edits import png, post_form


def header_size(b64):
    """WxH from a PNG's IHDR, read here independently of the filter."""
    raw = base64.b64decode(b64[:64])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", raw[16:24])
    return "%dx%d" % (w, h)


@pytest.fixture(scope="module")
def tiers(workdir, fake, cache_service):
    """The main listener with L1 and L2; `l2only` with L2 alone, so a repeat is an L2 hit."""
    l2only = with_plugin(cache={"l1": None})
    e = Envoy(workdir, name="envoy-fields", fake_gemini="127.0.0.1:%d" % fake.port,
              image_cache="127.0.0.1:%d" % cache_service.port,
              extra_listeners=[("l2only", free_port(), l2only)],
              env_extra={"GEMINI_API_KEY": API_KEY, "IMAGE_CACHE_TOKEN": CACHE_TOKEN})
    yield e
    e.stop()
    assert "panicked" not in e.log()


def post(envoy, body, listener="images"):
    status, headers, raw = http("POST", envoy.url(listener) + "/v1/images/generations", json.dumps(body).encode(),
                                {"content-type": "application/json"}, timeout=60)
    assert status == 200, raw[:300]
    return headers, json.loads(raw)


def check_fields(answer, prompt, image_tokens=0):
    assert answer["output_format"] == "png"
    assert answer["size"] == header_size(answer["data"][0]["b64_json"])
    details = answer["usage"]["input_tokens_details"]
    # fake-gemini counts a prompt's words + 3 as its text tokens, per call.
    calls = len(answer["data"])
    assert details == {"text_tokens": (len(prompt.split()) + 3) * calls, "image_tokens": image_tokens * calls}
    assert answer["usage"]["input_tokens"] == details["text_tokens"] + details["image_tokens"]


def test_a_miss_and_its_l1_hit_carry_the_same_fields(tiers):
    prompt = unique("fields wide")
    body = {"prompt": prompt, "aspect_ratio": "16:9", "n": 2}
    headers, miss = post(tiers, body)
    assert headers["x-image-cache"] == "miss"
    check_fields(miss, prompt)
    assert miss["size"] == "1376x768", "fake-gemini draws 16:9 at 1K as 1376x768"
    headers, hit = post(tiers, body)
    assert headers["x-image-cache"] == "hit-l1"
    check_fields(hit, prompt)
    assert (hit["size"], hit["usage"]) == (miss["size"], miss["usage"])


def test_an_l2_hit_carries_them_too(tiers, cache_service):
    prompt = unique("fields from l2")
    body = {"prompt": prompt, "size": "1024x1792"}
    before = cache_service.stats()["entries"]
    headers, miss = post(tiers, body, listener="l2only")
    assert headers["x-image-cache"] == "miss"
    check_fields(miss, prompt)
    assert wait_for(lambda: cache_service.stats()["entries"] > before), "the root context wrote to L2"
    headers, hit = post(tiers, body, listener="l2only")
    assert headers["x-image-cache"] == "hit-l2"
    check_fields(hit, prompt)
    assert hit["size"] == miss["size"] == header_size(miss["data"][0]["b64_json"])


def test_an_edit_counts_its_image_tokens(tiers):
    prompt = unique("fields edit")
    status, _, raw = post_form(tiers, [("prompt", prompt), ("model", "gemini-2.5-flash-image")],
                               [("image[]", "a.png", png(40, 30), "image/png"),
                                ("image[]", "b.png", png(40, 30, seed=1), "image/png")])
    assert status == 200, raw[:300]
    answer = json.loads(raw)
    details = answer["usage"]["input_tokens_details"]
    assert details["image_tokens"] > 0 and details["image_tokens"] % 2 == 0, details
    check_fields(answer, prompt, image_tokens=details["image_tokens"])


def test_the_python_sdk_reads_them(tiers):
    client = openai.OpenAI(base_url=tiers.url() + "/v1", api_key="unused", max_retries=0)
    prompt = unique("fields sdk")
    result = client.images.generate(model="gpt-image-1", prompt=prompt, size="1536x1024")
    assert result.output_format == "png"
    assert result.size == header_size(result.data[0].b64_json)
    assert result.usage.input_tokens_details.text_tokens == len(prompt.split()) + 3
    assert result.usage.input_tokens_details.image_tokens == 0
