"""The filter must never take the VM down: malformed input of every kind, then a valid request."""
import json
import os
import random
import subprocess

from conftest import unique
from harness import ROOT, envoy_bin, render_envoy, WASM, with_plugin


def malformed_bodies(count, seed=7):
    rnd = random.Random(seed)
    fixed = [
        b"", b"{", b"}", b"[]", b"null", b"true", b"0", b'"prompt"', b"\x00\xff\xfe", b"{\"prompt\":\"\xff\xfe\"}",
        b'{"prompt": "a", "n": 1e309}', b'{"prompt": "a", "n": -0}', b'{"prompt": "a", "n": 18446744073709551616}',
        b'{"prompt": "' + b"\\ud800" + b'"}', b"[" * 10000 + b"]" * 10000, b'{"a":' * 5000 + b"1" + b"}" * 5000,
        b'{"prompt": {"text": "x"}}', b'{"prompt": ["x"]}', b'{"prompt": "x", "size": "99999999999999999999x1"}',
        b'{"prompt": "x", "size": "0x0"}', b'{"prompt": "x", "model": ""}', b'{"prompt": "x", "model": null, "n": null}',
        b'{"prompt": "x", "safety_threshold": ""}', b'{"prompt": "x", "aspect_ratio": 16}', b'{"prompt":"x"}garbage',
        b'{"prompt":"x","prompt":5}', json.dumps({"prompt": "\u0000" * 100}).encode(),
    ]
    out = list(fixed)
    alphabet = b'{}[]":,0123456789abcdefnulltrue\\ \n\x00\xff'
    while len(out) < count:
        kind = rnd.random()
        if kind < 0.4:
            out.append(bytes(rnd.choice(alphabet) for _ in range(rnd.randint(1, 300))))
        elif kind < 0.8:
            base = bytearray(json.dumps({"prompt": "x", "n": 2, "size": "1024x1024", "quality": "hd"}).encode())
            for _ in range(rnd.randint(1, 6)):
                base[rnd.randrange(len(base))] = rnd.randrange(256)
            out.append(bytes(base))
        else:
            fields = ["prompt", "n", "size", "quality", "style", "model", "response_format", "safety_threshold", "image_size"]
            values = [None, 0, -1, 3.5, "", "x" * 500, [], {}, True, "1024x1024", "hd", "OFF"]
            out.append(json.dumps({rnd.choice(fields): rnd.choice(values) for _ in range(rnd.randint(1, 5))}).encode())
    return out[:count]


def test_200_malformed_bodies_then_a_valid_request(client, envoy):
    bodies = malformed_bodies(200)
    statuses = []
    for raw in bodies:
        status, headers, body = client.post(None, raw=raw)
        statuses.append(status)
        if status != 200:
            e = json.loads(body)["error"]
            assert e["code"].startswith("IMG_"), body
    assert all(s in (200, 400, 413) for s in statuses), sorted(set(statuses))
    status, _, body = client.post({"prompt": unique("after the storm")})
    assert status == 200, body
    assert envoy.process.alive()
    log = envoy.log()
    assert "panicked" not in log and "unreachable" not in log and "Function: proxy_on" not in log


def test_shipped_config_passes_envoy_validate():
    env = dict(os.environ, GEMINI_API_KEY="validate-only")
    r = subprocess.run([envoy_bin(), "--mode", "validate", "-c", os.path.join(ROOT, "envoy", "envoy.yaml")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gemini-image-filter: configured" in r.stdout + r.stderr, "on_configure ran"


def test_a_bad_plugin_config_is_refused_with_a_reason(tmp_path):
    doc = render_envoy.render(wasm=WASM, plugin=with_plugin(limits={"max_n": 50}))
    path = render_envoy.write(doc, str(tmp_path / "bad.yaml"))
    r = subprocess.run([envoy_bin(), "--mode", "validate", "-c", path], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "limits.max_n is 50" in r.stdout + r.stderr
