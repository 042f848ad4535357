"""The official OpenAI Node SDK as the client (tests/node/images.mjs, the `openai` package pinned
in tests/node/package.json and installed by `make setup`), the way Node users point it at the
gateway."""
import base64
import hashlib
import json
import os
import struct
import subprocess

import pytest

from conftest import log_lines, unique
from harness import wait_for

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


# --- Streaming (contract section 12): `stream: true` through the SDK's own event stream. -------
# images.mjs's `generate_stream` / `edit_stream` ops sum each event up (type, index, size, the
# image's length, first bytes and sha256, and `ms`, when the SDK yielded it).

PNG_HEAD = (b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR").hex()


def stream_calls(fake, prompt):
    """The Gemini calls for `prompt`, each checked to be a streamed one."""
    calls = fake.requests(prompt)
    for call in calls:
        assert call["api_method"] == "streamGenerateContent", call["path"]
        assert call["path"].endswith(":streamGenerateContent?alt=sse"), call["path"]
    return calls


def test_generate_stream_sends_each_partial_image_as_it_comes(base_url, fake):
    prompt = unique("a paper crane [fake:chunkdelay=400]")
    out = node_sdk({"baseURL": base_url, "op": "generate_stream",
                    "params": {"model": "gpt-image-1", "prompt": prompt, "partial_images": 2}})
    assert out["ok"], out
    assert out["status"] == 200
    h = out["headers"]
    assert h["content-type"] == "text/event-stream" and h["cache-control"] == "no-cache"
    assert h["x-image-cache"] == "miss" and h["x-image-cost-usd"] == "0.134"
    assert len(h["x-image-prompt-hash"]) == 16 and h["x-image-safety"]
    events = out["events"]
    assert [(e["type"], e["partial_image_index"]) for e in events] == [
        ("image_generation.partial_image", 0), ("image_generation.partial_image", 1), ("image_generation.completed", None)]
    # The fake's interim images are a quarter and a half of the final image's width and height.
    assert [e["size"] for e in events] == ["256x256", "512x512", "1024x1024"]
    for e in events:
        assert e["head_hex"] == PNG_HEAD and e["b64_len"] > 0
        assert (e["output_format"], e["quality"], e["background"]) == ("png", "auto", "auto")
        assert e["created_at"] == events[0]["created_at"] > 0
    assert len({e["sha256"] for e in events}) == 3, "each partial differs from the final image"
    assert [e["usage"] is None for e in events] == [True, True, False]
    usage = events[-1]["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
    assert set(usage["input_tokens_details"]) == {"text_tokens", "image_tokens"}
    # Progress, not a buffered answer: Gemini sends an event every 400 ms, and each reaches the
    # client when it is sent, the headers before any of them.
    first, second, done = (e["ms"] for e in events)
    assert out["response_ms"] + 300 <= first, out
    assert first + 300 <= second and second + 300 <= done, [e["ms"] for e in events]
    (call,) = stream_calls(fake, prompt)
    assert call["stream"] == {"events": 4, "end": "complete"}, "a thought, two interim images, the final image"
    assert call["body"]["generationConfig"]["thinkingConfig"] == {"includeThoughts": True}


@pytest.mark.parametrize("model, partial_images", [
    ("gemini-3-pro-image", 0),        # no thoughts asked for: only the final image
    ("gemini-3-pro-image", 1),        # one partial of the two interim images
    ("gemini-2.5-flash-image", 2),    # does not think: no thoughts asked for, no partial
])
def test_stream_has_at_most_partial_images_partials_and_thoughts_only_when_wanted(base_url, fake, model, partial_images):
    prompt = unique("a kite")
    out = node_sdk({"baseURL": base_url, "op": "generate_stream",
                    "params": {"model": model, "prompt": prompt, "partial_images": partial_images}})
    assert out["ok"], out
    wanted = 1 if model == "gemini-3-pro-image" and partial_images else 0
    assert [e["type"] for e in out["events"]] == ["image_generation.partial_image"] * wanted + ["image_generation.completed"]
    (call,) = stream_calls(fake, prompt)
    thoughts = call["body"]["generationConfig"].get("thinkingConfig")
    assert thoughts == ({"includeThoughts": True} if wanted else None), call["body"]["generationConfig"]
    assert call["stream"]["end"] == "complete"


def test_edit_stream_gets_image_edit_events(base_url, fake, tmp_path):
    from test_edits import png
    image = png(64, 48, seed=21)
    (tmp_path / "in.png").write_bytes(image)
    prompt = unique("put a hat on it")
    out = node_sdk({"baseURL": base_url, "op": "edit_stream", "files": [{"path": str(tmp_path / "in.png"), "type": "image/png"}],
                    "single": True, "params": {"model": "gpt-image-1", "prompt": prompt, "partial_images": 2}})
    assert out["ok"], out
    assert out["headers"]["content-type"] == "text/event-stream"
    events = out["events"]
    assert [(e["type"], e["partial_image_index"]) for e in events] == [
        ("image_edit.partial_image", 0), ("image_edit.partial_image", 1), ("image_edit.completed", None)]
    # The input's 4:3 is kept (Gemini's 4:3 at 1K is 1200x896); the interim images are a quarter
    # and a half of the final one.
    assert [e["size"] for e in events] == ["300x224", "600x448", "1200x896"]
    assert all(e["head_hex"] == PNG_HEAD for e in events)
    assert events[-1]["usage"]["input_tokens_details"]["image_tokens"] > 0, "the input image is counted"
    (call,) = stream_calls(fake, prompt)
    parts = call["body"]["contents"][0]["parts"]
    assert [base64.b64decode(p["inlineData"]["data"]) for p in parts if "inlineData" in p] == [image]
    assert call["stream"] == {"events": 4, "end": "complete"}


def test_a_gemini_error_mid_stream_is_the_sdks_api_error(base_url, fake, envoy):
    prompt = unique("a glass whale [fake:errorafter=2]")
    job = {"baseURL": base_url, "op": "generate_stream",
           "params": {"model": "gpt-image-1", "prompt": prompt, "partial_images": 2}}
    out = node_sdk(job)
    assert not out["ok"], out
    assert out["status"] == 200, "the stream had started"
    # Gemini's two events were a thought and the first interim image.
    assert [(e["type"], e["partial_image_index"]) for e in out["events"]] == [("image_generation.partial_image", 0)]
    e = out["error"]
    # openai-node throws APIError (no status: the answer's was 200) for an event whose data holds `error`.
    assert (e["name"], e["status"], e["code"], e["type"], e["param"]) == ("APIError", None, "IMG_UPSTREAM_ERROR", "api_error", None)
    assert "500 INTERNAL" in e["message"]
    (call,) = stream_calls(fake, prompt)
    assert call["stream"] == {"events": 3, "end": "error"}
    assert wait_for(lambda: log_lines(envoy, out["headers"]["x-image-prompt-hash"]))
    (line,) = log_lines(envoy, out["headers"]["x-image-prompt-hash"])
    assert (line["status"], line["code"], line["outcome"]) == (200, "IMG_UPSTREAM_ERROR", "error")
    # A stream that failed is not cached: the same request calls Gemini again.
    again = node_sdk(job)
    assert not again["ok"] and again["headers"]["x-image-cache"] == "miss"
    assert len(stream_calls(fake, prompt)) == 2


def test_a_stream_cut_by_gemini_cuts_the_clients(base_url, fake, envoy):
    prompt = unique("a sand castle [fake:breakafter=2] [fake:chunkdelay=200]")
    out = node_sdk({"baseURL": base_url, "op": "generate_stream",
                    "params": {"model": "gpt-image-1", "prompt": prompt, "partial_images": 2}})
    assert not out["ok"], out
    assert [e["type"] for e in out["events"]] == ["image_generation.partial_image"]
    # No error event can follow: Envoy resets the client's stream, which Node's fetch reports as
    # a TypeError `terminated`, not as an API error.
    e = out["error"]
    assert (e["name"], e["status"], e["code"], e["message"]) == ("TypeError", None, None, "terminated"), e
    (call,) = stream_calls(fake, prompt)
    assert call["stream"] == {"events": 2, "end": "broken"}
    assert wait_for(lambda: log_lines(envoy, out["headers"]["x-image-prompt-hash"]))
    (line,) = log_lines(envoy, out["headers"]["x-image-prompt-hash"])
    assert (line["status"], line["code"]) == (502, "IMG_NETWORK_ERROR")


@pytest.mark.parametrize("params, status, name, code, param", [
    ({"prompt": "[fake:status=429] [fake:retry=3]"}, 429, "RateLimitError", "IMG_QUOTA_EXHAUSTED", None),
    ({"prompt": "[fake:status=503]"}, 503, "InternalServerError", "IMG_SERVICE_UNAVAILABLE", None),
    ({"n": 2}, 400, "BadRequestError", "IMG_INVALID_REQUEST", "n"),
    ({"partial_images": 4}, 400, "BadRequestError", "IMG_INVALID_REQUEST", "partial_images"),
])
def test_refused_before_the_stream_is_the_sdks_error_for_the_status(base_url, fake, params, status, name, code, param):
    body = dict({"model": "gpt-image-1", "partial_images": 2}, **params)
    body["prompt"] = unique(params.get("prompt", "a quiet harbour"))
    out = node_sdk({"baseURL": base_url, "op": "generate_stream", "params": body})
    assert not out["ok"], out
    e = out["error"]
    assert (e["status"], e["name"], e["code"], e["param"]) == (status, name, code, param)
    assert e["headers"]["content-type"] == "application/json" and out["events"] == []
    calls = fake.requests(body["prompt"])
    if status == 400:
        assert calls == [] and e["headers"]["x-should-retry"] == "false"
    else:
        (call,) = stream_calls(fake, body["prompt"])
        assert call["status"] == status and call["stream"] is None, "Gemini refused before any stream"
    if status == 429:
        assert e["headers"]["retry-after"] == "3"


def test_a_completed_stream_is_cached_for_streamed_and_whole_answers(base_url, fake):
    prompt = unique("a red bicycle")
    params = {"model": "gpt-image-1", "prompt": prompt, "partial_images": 2}
    first = node_sdk({"baseURL": base_url, "op": "generate_stream", "params": params})
    assert first["ok"] and first["headers"]["x-image-cache"] == "miss", first
    final = first["events"][-1]
    # Again, streamed: a hit is one completed event with the same image, and costs nothing.
    hit = node_sdk({"baseURL": base_url, "op": "generate_stream", "params": params})
    assert hit["ok"], hit
    assert hit["headers"]["x-image-cache"] in ("hit-l1", "hit-l2") and hit["headers"]["x-image-cost-usd"] == "0"
    assert [e["type"] for e in hit["events"]] == ["image_generation.completed"]
    assert hit["events"][0]["sha256"] == final["sha256"] and hit["events"][0]["size"] == final["size"]
    # Not streamed: the same cache entry.
    whole = node_sdk({"baseURL": base_url, "op": "generate", "params": {"model": "gpt-image-1", "prompt": prompt}})
    assert whole["ok"] and whole["headers"]["x-image-cache"] in ("hit-l1", "hit-l2"), whole
    assert hashlib.sha256(base64.b64decode(whole["result"]["data"][0]["b64_json"])).hexdigest() == final["sha256"]
    assert len(stream_calls(fake, prompt)) == 1
