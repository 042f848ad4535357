"""End to end: OpenAI requests through a real Envoy with the built filter to fake-gemini."""
import base64
import json
import struct

import pytest

import uuid

from conftest import API_KEY, USER, log_lines, unique
from harness import http


def png_size(b64):
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", raw[16:24])


def test_success_returns_openai_images_and_headers(client):
    prompt = unique("a lighthouse at dusk")
    status, headers, body = client.post({"prompt": prompt})
    assert status == 200, body
    v = json.loads(body)
    assert isinstance(v["created"], int) and v["created"] > 1_700_000_000
    assert len(v["data"]) == 1
    assert png_size(v["data"][0]["b64_json"]) == (1024, 1024)
    assert v["usage"]["total_tokens"] == v["usage"]["input_tokens"] + v["usage"]["output_tokens"] > 0
    assert headers["content-type"] == "application/json"
    assert headers["x-image-cache"] == "miss"
    assert headers["x-image-safety"] == "OFF"
    assert len(headers["x-image-prompt-hash"]) == 16
    assert "x-images-failed" not in headers


def test_the_gemini_request_carries_everything_and_no_client_credentials(client, fake):
    prompt = unique("three red foxes")
    status, _, body = client.post(
        {"prompt": prompt, "n": 3, "size": "1792x1024", "quality": "medium", "safety_threshold": "high", "user": "alice"},
        headers={"authorization": "Bearer sk-client-secret", "x-goog-api-key": "client-supplied"},
    )
    assert status == 200, body
    assert len(json.loads(body)["data"]) == 3
    calls = fake.requests(prompt)
    assert len(calls) == 3, "n=3 means three generateContent calls"
    for call in calls:
        assert call["method"] == "POST"
        assert call["path"] == "/v1beta/models/gemini-3-pro-image-preview:generateContent"
        h = call["headers"]
        assert h["x-goog-api-key"] == API_KEY
        assert h["host"] == "generativelanguage.googleapis.com"
        assert "authorization" not in h
        assert h["content-type"] == "application/json"
        b = call["body"]
        assert b["contents"][0]["parts"][0]["text"] == prompt
        assert b["generationConfig"]["candidateCount"] == 1
        assert b["generationConfig"]["responseModalities"] == ["TEXT", "IMAGE"]
        assert b["generationConfig"]["imageConfig"] == {"aspectRatio": "16:9", "imageSize": "2K"}
        assert [s["category"] for s in b["safetySettings"]] == [
            "HARM_CATEGORY_HARASSMENT", "HARM_CATEGORY_HATE_SPEECH",
            "HARM_CATEGORY_SEXUALLY_EXPLICIT", "HARM_CATEGORY_DANGEROUS_CONTENT"]
        assert {s["threshold"] for s in b["safetySettings"]} == {"BLOCK_LOW_AND_ABOVE"}
        assert "alice" not in json.dumps(call)


@pytest.mark.parametrize("fields,ratio,size,dims", [
    ({"model": "gemini-3-pro-image-4k-16x9"}, "16:9", "4K", (5504, 3072)),
    ({"model": "gemini-3-pro-image-21x9"}, "21:9", None, (1584, 672)),
    ({"model": "gemini-3-pro-image-2k"}, "1:1", "2K", (2048, 2048)),
    ({"size": "1024x1792"}, "9:16", None, (768, 1376)),
    ({"size": "1536x1024", "quality": "standard"}, "3:2", "1K", (1264, 848)),
    ({"size": "512x512", "quality": "auto"}, "1:1", None, (1024, 1024)),
    ({"model": "gemini-3-pro-image-16x9", "size": "auto", "image_size": "2k"}, "16:9", "2K", (2752, 1536)),
    ({"model": "gemini-3-pro-image-16x9", "aspect_ratio": "4:5", "size": "1792x1024"}, "4:5", None, (928, 1152)),
    ({"model": "dall-e-3", "quality": "hd", "size": "1024x1024", "response_format": "b64_json"}, "1:1", "4K", (4096, 4096)),
    ({"model": "gpt-image-1", "size": "3:4"}, "3:4", None, (896, 1200)),
])
def test_model_variants_sizes_and_quality_map_to_image_config(client, fake, fields, ratio, size, dims):
    prompt = unique("variant")
    status, _, body = client.post({"prompt": prompt, **fields})
    assert status == 200, body
    assert png_size(json.loads(body)["data"][0]["b64_json"]) == dims
    (call,) = fake.requests(prompt)
    want = {"aspectRatio": ratio}
    if size:
        want["imageSize"] = size
    assert call["body"]["generationConfig"]["imageConfig"] == want


def test_url_format_style_and_revised_prompt(client, fake):
    prompt = unique("a quiet harbour [fake:withtext]")
    # Without image URLs configured, a url is a data: URI ...
    status, _, body = client.post({"prompt": prompt, "response_format": "url", "style": "natural"}, listener="inline")
    assert status == 200, body
    item = json.loads(body)["data"][0]
    assert item["url"].startswith("data:image/png;base64,iVBOR")
    assert item["revised_prompt"] == "Here is your image."
    # ... and with them (the shipped config), an image URL the filter serves.
    status, _, body = client.post({"prompt": prompt, "response_format": "url", "style": "natural"})
    item = json.loads(body)["data"][0]
    assert item["url"].startswith(client.envoy.url() + "/v1/images/files/")
    assert item["revised_prompt"] == "Here is your image."
    assert http("GET", item["url"])[2][:8] == b"\x89PNG\r\n\x1a\n"
    (call,) = fake.requests(prompt)
    text = call["body"]["contents"][0]["parts"][0]["text"]
    assert text.startswith(prompt) and text.endswith("natural lighting, realistic, photorealistic")
    plain = unique("no style")
    client.post({"prompt": plain})
    assert fake.requests(plain)[0]["body"]["contents"][0]["parts"][0]["text"] == plain


def test_partial_success_returns_the_images_that_worked(client):
    prompt = unique("partial [fake:fail-first=2]")
    status, headers, body = client.post({"prompt": prompt, "n": 4})
    assert status == 200, body
    assert headers["x-images-failed"] == "2"
    assert len(json.loads(body)["data"]) == 2


def test_n_calls_run_in_parallel(client):
    import time
    prompt = unique("slow [fake:delay=600]")
    t = time.time()
    status, _, body = client.post({"prompt": prompt, "n": 4})
    took = time.time() - t
    assert status == 200, body
    assert len(json.loads(body)["data"]) == 4
    # Four calls of 600 ms each in sequence would take 2.4 s.
    assert took < 2.0, "calls did not overlap (%.2fs)" % took


def test_other_paths_and_methods_pass_through_untouched(envoy):
    status, _, body = http("POST", envoy.url() + "/__fake/echo?x=1", b'{"prompt": 5}', {"content-type": "application/json", "authorization": "Bearer app-token"})
    assert status == 200
    echo = json.loads(body)
    assert echo["body"] == '{"prompt": 5}'
    assert echo["headers"]["authorization"] == "Bearer app-token"
    assert echo["path"] == "/__fake/echo?x=1"
    status, _, body = http("POST", envoy.url() + "/v1/images/other", b"abc", {"content-type": "text/plain"})
    assert status == 404 and b"Method not found" in body, "reached the app untouched"
    status, _, body = http("GET", envoy.url() + "/v1/images/generations")
    assert status == 405 and json.loads(body)["error"]["code"] == "IMG_INVALID_REQUEST"


def test_one_log_line_per_request_without_the_prompt(client, envoy):
    prompt = unique("secret prompt text")
    rid = "rid-" + uuid.uuid4().hex
    status, headers, _ = client.post({"prompt": prompt, "n": 2, "size": "1792x1024", "user": USER}, headers={"x-request-id": rid})
    assert status == 200
    import time
    for _ in range(50):
        lines = log_lines(envoy, rid)
        if lines:
            break
        time.sleep(0.1)
    assert len(lines) == 1
    line = lines[0]
    for key in ["event", "status", "category", "model", "variant", "n", "aspect_ratio", "image_size", "safety",
                "cache", "latency_ms", "upstream_status", "prompt_hash", "request_id"]:
        assert key in line, key
    assert line["status"] == 200 and line["n"] == 2 and line["aspect_ratio"] == "16:9"
    assert line["prompt_hash"] == headers["x-image-prompt-hash"]
    assert line["request_id"] == rid
    log = envoy.log()
    assert prompt not in log
    assert USER not in log
    assert API_KEY not in log
