"""Edits and variations end to end: multipart from the OpenAI Python SDK, curl and hand-built
bodies through a real Envoy, images byte-exact at fake-gemini in order, the mask both ways,
types told by bytes, every limit, the cache by image, errors, and the log line."""
import base64
import io
import json
import struct
import subprocess
import uuid
import zlib

import openai
import pytest

from conftest import API_KEY, log_lines, unique
from harness import Envoy, free_port, http, with_plugin

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png(w, h, alpha=False, seed=0):
    """A real PNG of w x h (RGB, or RGBA with a transparent left half), different per seed."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    px = 4 if alpha else 3
    rows = []
    for y in range(h):
        row = bytearray([0])
        for x in range(w):
            rgb = [(x * 7 + seed) % 256, (y * 5 + seed) % 256, seed % 256]
            row += bytes(rgb + ([0 if x < w // 2 else 255] if alpha else []))
        rows.append(bytes(row))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 6 if alpha else 2, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")


def jpeg(w=24, h=16):
    """A JPEG's markers up to its frame header (type and size read from it), then its end."""
    app0 = bytes([0xFF, 0xE0, 0, 16]) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = bytes([0xFF, 0xC0, 0, 17, 8]) + struct.pack(">HH", h, w) + bytes([3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1])
    return bytes([0xFF, 0xD8]) + app0 + sof0 + bytes([0xFF, 0xD9])


def form(fields, files, boundary=None):
    """A multipart/form-data body: fields is [(name, value)], files [(name, filename, bytes, type)]."""
    boundary = boundary or "----test" + uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields:
        out.write(("--%s\r\nContent-Disposition: form-data; name=\"%s\"\r\n\r\n%s\r\n" % (boundary, name, value)).encode())
    for name, filename, data, ctype in files:
        out.write(("--%s\r\nContent-Disposition: form-data; name=\"%s\"; filename=\"%s\"\r\nContent-Type: %s\r\n\r\n"
                   % (boundary, name, filename, ctype)).encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(("--%s--\r\n" % boundary).encode())
    return out.getvalue(), "multipart/form-data; boundary=" + boundary


def post_form(envoy, fields, files, path="/v1/images/edits", listener="images", headers=None):
    body, ctype = form(fields, files)
    h = {"content-type": ctype}
    h.update(headers or {})
    return http("POST", envoy.url(listener) + path, body, h, timeout=60)


def sent_images(fake, prompt):
    """The inline images of each Gemini call for `prompt`: [(mime, bytes)] per call."""
    calls = []
    for r in fake.requests(prompt):
        parts = r["body"]["contents"][0]["parts"]
        calls.append([(p["inlineData"]["mimeType"], base64.b64decode(p["inlineData"]["data"]))
                      for p in parts if "inlineData" in p])
    return calls


@pytest.fixture(scope="module")
def edits_envoy(workdir, fake):
    """An Envoy whose listeners differ in their edit settings: small upload limits, masks refused."""
    listeners = [
        ("small", free_port(), with_plugin(cache=None, urls=None, limits={"max_upload_bytes": 200000, "max_input_image_bytes": 50000})),
        ("nomask", free_port(), with_plugin(cache=None, urls=None, edits={"mask": "refuse"})),
    ]
    e = Envoy(workdir, name="envoy-edits", fake_gemini="127.0.0.1:%d" % fake.port, plugin=with_plugin(cache={"l2": None}),
              extra_listeners=listeners, env_extra={"GEMINI_API_KEY": API_KEY})
    yield e
    e.stop()
    log = e.log()
    assert "panicked" not in log and "wasm trap" not in log.lower(), log[-3000:]


def test_several_images_reach_gemini_byte_exact_in_order(edits_envoy, fake):
    prompt = unique("put the vase on the table")
    a, b, c = png(40, 30, seed=1), jpeg(), png(20, 20, seed=2)
    status, headers, body = post_form(edits_envoy, [("prompt", prompt), ("n", "2")],
                                      [("image[]", "a.png", a, "image/png"), ("image[]", "b.jpg", b, "image/jpeg"),
                                       ("image[]", "c.png", c, "image/png")])
    assert status == 200, body
    answer = json.loads(body)
    assert len(answer["data"]) == 2 and base64.b64decode(answer["data"][0]["b64_json"]).startswith(PNG_SIGNATURE)
    calls = sent_images(fake, prompt)
    assert len(calls) == 2, "n calls"
    for images in calls:
        assert images == [("image/png", a), ("image/jpeg", b), ("image/png", c)]
    first = fake.requests(prompt)[0]["body"]
    assert first["contents"][0]["parts"][0]["text"] == prompt
    assert "aspectRatio" not in first["generationConfig"]["imageConfig"], "nothing named a ratio: Gemini keeps the input's"
    assert headers["x-image-prompt-hash"] and headers["x-image-safety"] == "OFF"


def test_the_type_comes_from_the_bytes_not_the_name_or_content_type(edits_envoy, fake):
    prompt = unique("sniffed")
    status, _, body = post_form(edits_envoy, [("prompt", prompt)], [("image", "photo.png", jpeg(), "image/png")])
    assert status == 200, body
    assert sent_images(fake, prompt) == [[("image/jpeg", jpeg())]]
    status, _, body = post_form(edits_envoy, [("prompt", unique())], [("image", "a.png", b"GIF89a" + bytes(40), "image/png")])
    error = json.loads(body)["error"]
    assert (status, error["code"], error["param"]) == (400, "IMG_INVALID_REQUEST", "image")


def test_size_and_quality_still_apply_to_edits(edits_envoy, fake):
    prompt = unique("wide")
    status, _, _ = post_form(edits_envoy, [("prompt", prompt), ("size", "1792x1024"), ("quality", "hd")],
                             [("image", "a.png", png(16, 16), "image/png")])
    assert status == 200
    config = fake.requests(prompt)[0]["body"]["generationConfig"]["imageConfig"]
    assert config == {"aspectRatio": "16:9", "imageSize": "4K"}
    prompt = unique("auto")
    assert post_form(edits_envoy, [("prompt", prompt), ("size", "auto")], [("image", "a.png", png(16, 16), "image/png")])[0] == 200
    assert "aspectRatio" not in fake.requests(prompt)[0]["body"]["generationConfig"]["imageConfig"]


def test_the_mask_goes_after_the_images_with_the_instruction(edits_envoy, fake):
    prompt = unique("masked")
    image, mask = png(32, 24, seed=3), png(32, 24, alpha=True)
    status, _, body = post_form(edits_envoy, [("prompt", prompt)],
                                [("image", "a.png", image, "image/png"), ("mask", "m.png", mask, "image/png")])
    assert status == 200, body
    parts = fake.requests(prompt)[0]["body"]["contents"][0]["parts"]
    assert [list(p) for p in parts] == [["text"], ["inlineData"], ["inlineData"], ["text"]]
    assert base64.b64decode(parts[2]["inlineData"]["data"]) == mask
    assert "transparent in the mask" in parts[3]["text"]


@pytest.mark.parametrize("mask,why", [
    (png(32, 24), "no alpha channel"),
    (png(16, 24, alpha=True), "not the first image's size"),
    (jpeg(), "not a PNG"),
])
def test_a_mask_that_cannot_be_a_mask_is_refused(edits_envoy, mask, why):
    status, _, body = post_form(edits_envoy, [("prompt", unique())],
                                [("image", "a.png", png(32, 24), "image/png"), ("mask", "m.png", mask, "image/png")])
    error = json.loads(body)["error"]
    assert (status, error["param"]) == (400, "mask"), why


def test_a_gateway_that_refuses_masks_says_so(edits_envoy, fake):
    prompt = unique("no masks here")
    status, _, body = post_form(edits_envoy, [("prompt", prompt)],
                                [("image", "a.png", png(8, 8), "image/png"), ("mask", "m.png", png(8, 8, alpha=True), "image/png")],
                                listener="nomask")
    assert (status, json.loads(body)["error"]["param"]) == (400, "mask")
    assert fake.requests(prompt) == []


def test_each_limit_gets_its_own_answer(edits_envoy, fake):
    small = png(8, 8)
    # The whole body over limits.max_upload_bytes: 413 in OpenAI shape, from the filter.
    status, headers, body = post_form(edits_envoy, [("prompt", unique())], [("image", "a.png", small + bytes(250000), "image/png")],
                                      listener="small")
    error = json.loads(body)["error"]
    assert (status, error["code"], headers["x-should-retry"]) == (413, "IMG_PAYLOAD_TOO_LARGE", "false")
    # One image over limits.max_input_image_bytes: 400 naming image.
    status, _, body = post_form(edits_envoy, [("prompt", unique())], [("image", "a.png", small + bytes(60000), "image/png")],
                                listener="small")
    assert (status, json.loads(body)["error"]["param"]) == (400, "image")
    # More images than the family takes (14 for gemini-3-pro-image, 3 for gemini-2.5-flash-image).
    files = [("image[]", "%d.png" % i, png(4, 4, seed=i), "image/png") for i in range(15)]
    status, _, body = post_form(edits_envoy, [("prompt", unique())], files)
    assert (status, json.loads(body)["error"]["param"]) == (400, "image")
    status, _, body = post_form(edits_envoy, [("prompt", unique()), ("model", "gemini-2.5-flash-image")], files[:4])
    assert (status, json.loads(body)["error"]["param"]) == (400, "image")
    prompt = unique("fourteen")
    assert post_form(edits_envoy, [("prompt", prompt)], files[:14])[0] == 200
    assert len(sent_images(fake, prompt)[0]) == 14


@pytest.mark.parametrize("body,ctype", [
    (b'{"prompt": "p"}', "application/json"),
    (b"--x\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\np", "multipart/form-data; boundary=x"),
    (b"no parts at all", "multipart/form-data; boundary=x"),
    (b"--x--\r\n", "multipart/form-data"),
])
def test_bodies_that_are_not_well_formed_multipart_are_400(edits_envoy, body, ctype):
    status, _, answer = http("POST", edits_envoy.url() + "/v1/images/edits", body, {"content-type": ctype})
    error = json.loads(answer)["error"]
    assert (status, error["code"]) == (400, "IMG_INVALID_REQUEST")


def test_a_repeated_text_field_is_400(edits_envoy):
    status, _, body = post_form(edits_envoy, [("prompt", "a"), ("prompt", "b")], [("image", "a.png", png(4, 4), "image/png")])
    assert (status, json.loads(body)["error"]["param"]) == (400, "prompt")


def test_variations_are_edits_of_one_image(edits_envoy, fake):
    image = png(24, 24, seed=9)
    before = len(fake.requests("Make a new variation of this image"))
    status, _, body = post_form(edits_envoy, [("n", "2"), ("response_format", "b64_json")],
                                [("image", "v.png", image, "image/png")], path="/v1/images/variations")
    assert status == 200, body
    assert len(json.loads(body)["data"]) == 2
    calls = fake.requests("Make a new variation of this image")[before:]
    assert len(calls) == 2 and all(
        [base64.b64decode(p["inlineData"]["data"]) for p in c["body"]["contents"][0]["parts"] if "inlineData" in p] == [image]
        for c in calls)
    status, _, body = post_form(edits_envoy, [], [("image", "a.png", image, "image/png"), ("image", "b.png", image, "image/png")],
                                path="/v1/images/variations")
    assert (status, json.loads(body)["error"]["param"]) == (400, "image")


def test_the_cache_keys_on_every_image(edits_envoy, fake):
    prompt = unique("cached edit")
    a, b = png(8, 8, seed=4), png(8, 8, seed=5)
    files = [("image[]", "a.png", a, "image/png"), ("image[]", "b.png", b, "image/png")]
    assert post_form(edits_envoy, [("prompt", prompt)], files)[1]["x-image-cache"] == "miss"
    assert post_form(edits_envoy, [("prompt", prompt)], files)[1]["x-image-cache"] == "hit-l1"
    # Other file names, same bytes: the same call, a hit. Another order or another image: a miss.
    renamed = [("image[]", "x.png", a, "image/png"), ("image[]", "y.png", b, "image/png")]
    assert post_form(edits_envoy, [("prompt", prompt)], renamed)[1]["x-image-cache"] == "hit-l1"
    assert post_form(edits_envoy, [("prompt", prompt)], files[::-1])[1]["x-image-cache"] == "miss"
    other = [("image[]", "a.png", a, "image/png"), ("image[]", "b.png", png(8, 8, seed=6), "image/png")]
    assert post_form(edits_envoy, [("prompt", prompt)], other)[1]["x-image-cache"] == "miss"
    assert len(fake.requests(prompt)) == 3


@pytest.mark.parametrize("marker,status,code", [
    ("[fake:block=SAFETY]", 400, "IMG_SAFETY_BLOCKED"),
    ("[fake:status=429] [fake:retry=9]", 429, "IMG_QUOTA_EXHAUSTED"),
    ("[fake:status=503]", 503, "IMG_SERVICE_UNAVAILABLE"),
    ("[fake:noimage]", 502, "IMG_NO_IMAGE"),
])
def test_gemini_errors_map_as_for_generations(edits_envoy, marker, status, code):
    got, headers, body = post_form(edits_envoy, [("prompt", unique(marker)), ("safety_threshold", "HIGH")],
                                   [("image", "a.png", png(8, 8), "image/png")])
    assert (got, json.loads(body)["error"]["code"]) == (status, code)
    assert headers["x-image-safety"] == "HIGH"


def test_the_log_line_says_edits_and_counts_input_images(edits_envoy, fake):
    prompt = unique("logged edit")
    post_form(edits_envoy, [("prompt", prompt)],
              [("image[]", "secret-name.png", png(8, 8), "image/png"), ("image[]", "b.png", png(8, 8, seed=7), "image/png"),
               ("mask", "m.png", png(8, 8, alpha=True), "image/png")])
    import hashlib
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:16]
    (line,) = [l for l in log_lines(edits_envoy, digest)]
    assert (line["endpoint"], line["input_images"], line["status"]) == ("edits", 2, 200)
    assert "secret-name" not in edits_envoy.log()


def test_the_python_sdk_edits_several_images_with_a_mask(edits_envoy, fake, tmp_path):
    client = openai.OpenAI(base_url=edits_envoy.url() + "/v1", api_key="unused", max_retries=0, timeout=60)
    a, b, mask = png(30, 20, seed=8), png(30, 20, seed=9), png(30, 20, alpha=True)
    for name, data in [("a.png", a), ("b.png", b), ("m.png", mask)]:
        (tmp_path / name).write_bytes(data)
    prompt = unique("sdk edit")
    with open(tmp_path / "a.png", "rb") as f1, open(tmp_path / "b.png", "rb") as f2, open(tmp_path / "m.png", "rb") as m:
        r = client.images.edit(image=[f1, f2], mask=m, prompt=prompt, n=2, size="1024x1024")
    assert len(r.data) == 2 and base64.b64decode(r.data[0].b64_json).startswith(PNG_SIGNATURE)
    for images in sent_images(fake, prompt):
        assert [d for _, d in images] == [a, b, mask]
    with pytest.raises(openai.BadRequestError) as e:
        with open(tmp_path / "a.png", "rb") as f1:
            client.images.edit(image=f1, prompt=unique(), size="3000x1000")
    assert e.value.code == "IMG_INVALID_REQUEST"
    with open(tmp_path / "a.png", "rb") as f1:
        v = client.images.create_variation(image=f1, n=1)
    assert len(v.data) == 1


def test_curl_with_repeated_image_fields(edits_envoy, fake, tmp_path):
    a, b = png(12, 12, seed=10), png(12, 12, seed=11)
    (tmp_path / "a.png").write_bytes(a)
    (tmp_path / "b.png").write_bytes(b)
    prompt = unique("curl edit")
    out = subprocess.run(["curl", "-sS", edits_envoy.url() + "/v1/images/edits", "-F", "prompt=" + prompt,
                          "-F", "image[]=@%s" % (tmp_path / "a.png"), "-F", "image[]=@%s" % (tmp_path / "b.png")],
                         capture_output=True, timeout=60, check=True)
    assert len(json.loads(out.stdout)["data"]) == 1
    assert [d for _, d in sent_images(fake, prompt)[0]] == [a, b]


def test_the_node_sdk_edits_with_to_file(edits_envoy, fake, tmp_path):
    from test_node_sdk import node_sdk
    a, b, mask = png(20, 10, seed=12), png(20, 10, seed=13), png(20, 10, alpha=True)
    files = []
    for name, data in [("a.png", a), ("b.png", b)]:
        (tmp_path / name).write_bytes(data)
        files.append({"path": str(tmp_path / name), "type": "image/png"})
    (tmp_path / "m.png").write_bytes(mask)
    prompt = unique("node edit")
    out = node_sdk({"baseURL": edits_envoy.url() + "/v1", "op": "edit",
                    "params": {"prompt": prompt, "n": 2, "size": "1536x1024"},
                    "files": files, "mask": {"path": str(tmp_path / "m.png"), "type": "image/png"}})
    assert out["ok"], out
    assert len(out["result"]["data"]) == 2
    calls = fake.requests(prompt)
    assert len(calls) == 2
    for call in calls:
        parts = call["body"]["contents"][0]["parts"]
        assert [base64.b64decode(p["inlineData"]["data"]) for p in parts if "inlineData" in p] == [a, b, mask]
        assert call["body"]["generationConfig"]["imageConfig"]["aspectRatio"] == "3:2"
    bad = node_sdk({"baseURL": edits_envoy.url() + "/v1", "op": "edit", "single": True,
                    "params": {"prompt": unique(), "size": "3000x1000"}, "files": files[:1]})
    assert (bad["ok"], bad["error"]["status"], bad["error"]["code"]) == (False, 400, "IMG_INVALID_REQUEST")
