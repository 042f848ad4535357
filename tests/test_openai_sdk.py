"""The official OpenAI Python SDK as the client, the way users point it at the gateway."""
import base64

import openai
import pytest

from conftest import unique
from harness import http


@pytest.fixture
def sdk(envoy):
    return openai.OpenAI(base_url=envoy.url() + "/v1", api_key="sk-not-used-by-the-gateway", max_retries=0, timeout=60)


def test_images_generate(sdk):
    r = sdk.images.generate(model="gemini-3-pro-image", prompt=unique("an origami crane"), n=2, size="1792x1024", quality="hd")
    assert len(r.data) == 2
    assert base64.b64decode(r.data[0].b64_json)[:8] == b"\x89PNG\r\n\x1a\n"
    assert r.created > 0
    assert r.usage.total_tokens > 0


def test_images_generate_with_an_alias_and_url(sdk, envoy):
    r = sdk.images.generate(model="dall-e-3", prompt=unique("a tin robot"), response_format="url")
    assert r.data[0].url.startswith(envoy.url() + "/v1/images/files/")
    status, headers, image = http("GET", r.data[0].url)
    assert (status, headers["content-type"], image[:8]) == (200, "image/png", b"\x89PNG\r\n\x1a\n")


def test_400_raises_bad_request_with_our_code(sdk):
    with pytest.raises(openai.BadRequestError) as e:
        sdk.images.generate(model="gemini-3-pro-image", prompt=unique(), size="3000x1000")
    assert e.value.status_code == 400
    assert e.value.code == "IMG_INVALID_REQUEST"
    assert e.value.param == "size"


def test_429_raises_rate_limit_error(sdk):
    with pytest.raises(openai.RateLimitError) as e:
        sdk.images.generate(model="gemini-3-pro-image", prompt=unique("[fake:status=429] [fake:retry=3]"))
    assert e.value.code == "IMG_QUOTA_EXHAUSTED"
    assert e.value.response.headers["retry-after"] == "3"


def test_502_raises_internal_server_error(sdk):
    with pytest.raises(openai.InternalServerError) as e:
        sdk.images.generate(model="gemini-3-pro-image", prompt=unique("[fake:status=500]"))
    assert e.value.status_code == 502
    assert e.value.code == "IMG_UPSTREAM_ERROR"


def test_safety_block_raises_bad_request(sdk):
    with pytest.raises(openai.BadRequestError) as e:
        sdk.images.generate(model="gemini-3-pro-image", prompt=unique("[fake:block=SAFETY]"))
    assert e.value.code == "IMG_SAFETY_BLOCKED"
