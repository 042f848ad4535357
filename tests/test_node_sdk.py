"""The official OpenAI Node SDK as the client (tests/node/images.mjs, the `openai` package pinned
in tests/node/package.json and installed by `make setup`), the way Node users point it at the
gateway."""
import base64
import json
import os
import struct
import subprocess

import pytest

from conftest import unique

NODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node")
SCRIPT = os.path.join(NODE_DIR, "images.mjs")


def node_sdk(job, timeout=120):
    """Runs one job through the Node SDK; its JSON answer ({"ok", "result" | "error", ...})."""
    assert os.path.isdir(os.path.join(NODE_DIR, "node_modules", "openai")), \
        "the Node SDK is not installed: run `make setup` (npm ci --prefix tests/node)"
    # A clean environment: no OPENAI_* variable of the machine reaches the SDK.
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    p = subprocess.run(["node", SCRIPT], input=json.dumps(job), capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, "images.mjs failed:\n" + p.stderr[-3000:]
    return json.loads(p.stdout)


@pytest.fixture
def base_url(envoy):
    return envoy.url() + "/v1"


def png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_images_generate(base_url, fake):
    prompt = unique("a paper lantern")
    out = node_sdk({"baseURL": base_url, "op": "generate",
                    "params": {"model": "gemini-3-pro-image", "prompt": prompt, "n": 2, "size": "1792x1024", "quality": "hd"}})
    assert out["ok"], out
    r = out["result"]
    assert len(r["data"]) == 2
    for image in r["data"]:
        assert png_size(base64.b64decode(image["b64_json"])) == (5504, 3072), "16:9 at 4K"
    assert r["created"] > 0
    assert r["usage"]["total_tokens"] > 0
    assert out["status"] == 200 and out["headers"]["x-image-cache"] in ("miss", "bypass")
    calls = fake.requests(prompt)
    assert len(calls) == 2
    assert calls[0]["body"]["generationConfig"]["imageConfig"] == {"aspectRatio": "16:9", "imageSize": "4K"}


@pytest.mark.parametrize("params, status, name, code, param", [
    ({"size": "3000x1000"}, 400, "BadRequestError", "IMG_INVALID_REQUEST", "size"),
    ({"prompt": "[fake:status=429] [fake:retry=3]"}, 429, "RateLimitError", "IMG_QUOTA_EXHAUSTED", None),
    ({"prompt": "[fake:status=500]"}, 502, "InternalServerError", "IMG_UPSTREAM_ERROR", None),
])
def test_errors_are_the_sdks_api_errors_with_our_code(base_url, params, status, name, code, param):
    body = {"model": "gemini-3-pro-image", "prompt": unique()}
    if "prompt" in params:
        params = dict(params, prompt=unique(params["prompt"]))
    body.update(params)
    out = node_sdk({"baseURL": base_url, "op": "generate", "params": body})
    assert not out["ok"], out
    e = out["error"]
    assert (e["status"], e["name"], e["code"], e["param"]) == (status, name, code, param)
    assert e["message"]
    if status == 400:
        assert e["type"] == "invalid_request_error"
        assert e["headers"]["x-should-retry"] == "false"
    if status == 429:
        assert e["headers"]["retry-after"] == "3"
