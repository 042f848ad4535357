"""A smoke test against Google's real API. Runs only when GEMINI_API_KEY is set."""
import base64
import json
import os

import pytest

from harness import Envoy, http

pytestmark = pytest.mark.live


@pytest.mark.skipif(not os.environ.get("GEMINI_API_KEY"), reason="GEMINI_API_KEY is not set: live Gemini smoke test skipped")
def test_live_generation(tmp_path):
    e = Envoy(str(tmp_path), name="envoy-live")  # the shipped config, Google's TLS cluster as is
    try:
        status, headers, body = http("POST", e.url() + "/v1/images/generations",
                                     json.dumps({"prompt": "a small red square on white", "model": "gemini-3-pro-image"}).encode(),
                                     {"content-type": "application/json"}, timeout=200)
        assert status == 200, body[:500]
        data = json.loads(body)["data"]
        assert base64.b64decode(data[0]["b64_json"])[:4] == b"\x89PNG"
    finally:
        e.stop()
