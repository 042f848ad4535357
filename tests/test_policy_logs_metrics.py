"""Safety policy, the request log and Envoy metrics (issue 3), end to end."""
import json
import os
import re
import subprocess
import time
import uuid

import pytest

from conftest import API_KEY, CANARY, USER, assert_no_secrets, log_lines, unique
from harness import ROOT, WASM, Envoy, envoy_bin, http, post_image as post, render_envoy, wait_for, with_plugin


# --- safety -----------------------------------------------------------------------------

def test_platform_policy_default_and_floor(client, fake):
    prompt = unique("policy default")
    status, headers, _ = client.post({"prompt": prompt}, listener="policy")
    assert status == 200 and headers["x-image-safety"] == "MEDIUM"
    assert {s["threshold"] for s in fake.requests(prompt)[0]["body"]["safetySettings"]} == {"BLOCK_MEDIUM_AND_ABOVE"}
    prompt = unique("policy stricter")
    status, headers, _ = client.post({"prompt": prompt, "safety_threshold": "High"}, listener="policy")
    assert status == 200 and headers["x-image-safety"] == "HIGH"
    status, headers, _ = client.post({"prompt": unique(), "safety_threshold": "low"}, listener="policy")
    assert status == 200 and headers["x-image-safety"] == "LOW", "LOW is the minimum, so allowed"
    prompt = unique("policy below floor")
    status, headers, body = client.post({"prompt": prompt, "safety_threshold": "off"}, listener="policy")
    e = json.loads(body)["error"]
    assert status == 400 and e["param"] == "safety_threshold" and e["code"] == "IMG_INVALID_REQUEST"
    assert "minimum LOW" in e["message"]
    assert fake.requests(prompt) == [], "a refused request never reaches Gemini"


def test_override_refused_when_the_platform_locks_the_level(client):
    status, headers, body = client.post({"prompt": unique(), "safety_threshold": "HIGH"}, listener="locked")
    e = json.loads(body)["error"]
    assert status == 400 and e["param"] == "safety_threshold"
    assert "cannot be set per request" in e["message"] and "HIGH" in e["message"]
    status, headers, _ = client.post({"prompt": unique()}, listener="locked")
    assert status == 200 and headers["x-image-safety"] == "HIGH"


def test_invalid_request_level_is_a_400_never_off(client):
    status, headers, body = client.post({"prompt": unique(), "safety_threshold": "NONE"})
    assert status == 400 and json.loads(body)["error"]["param"] == "safety_threshold"


@pytest.fixture(scope="module")
def envoy_env_high(workdir, fake):
    """An Envoy whose VM environment sets GEMINI_IMAGE_SAFETY_THRESHOLD=high; its main listener's
    config says LOW, so the environment must win."""
    e = Envoy(workdir, name="envoy-env", fake_gemini="127.0.0.1:%d" % fake.port, app="127.0.0.1:%d" % fake.port,
              plugin=with_plugin(safety={"default": "LOW"}, cache=None, urls=None),
              env_extra={"GEMINI_API_KEY": API_KEY, "GEMINI_IMAGE_SAFETY_THRESHOLD": "high"})
    yield e
    e.stop()
    assert_no_secrets(e.log(), "Envoy")


def test_environment_level_beats_config_and_request_beats_environment(envoy_env_high, fake):
    prompt = unique("env level")
    status, headers, _ = post(envoy_env_high, {"prompt": prompt})
    assert status == 200 and headers["x-image-safety"] == "HIGH"
    assert {s["threshold"] for s in fake.requests(prompt)[0]["body"]["safetySettings"]} == {"BLOCK_LOW_AND_ABOVE"}
    status, headers, _ = post(envoy_env_high, {"prompt": unique(), "safety_threshold": "off"})
    assert status == 200 and headers["x-image-safety"] == "OFF"


def validate(tmp_path, env=None, **render_args):
    doc = render_envoy.render(wasm=WASM, **render_args)
    path = render_envoy.write(doc, str(tmp_path / ("cfg-%s.yaml" % uuid.uuid4().hex[:6])))
    full_env = dict(os.environ)
    full_env.pop("GEMINI_IMAGE_SAFETY_THRESHOLD", None)
    full_env.update(env or {})
    r = subprocess.run([envoy_bin(), "--mode", "validate", "-c", path], cwd=ROOT, env=full_env,
                       capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("how,needle", [
    ({"env": {"GEMINI_IMAGE_SAFETY_THRESHOLD": "SOMETIMES"}}, "GEMINI_IMAGE_SAFETY_THRESHOLD is \"SOMETIMES\""),
    ({"plugin": with_plugin(safety={"default": "maximum"})}, "safety.default is \"maximum\""),
    ({"plugin": with_plugin(safety={"minimum": "strict"})}, "safety.minimum is \"strict\""),
    ({"plugin": with_plugin(safety={"default": "LOW", "minimum": "HIGH"})}, "below safety.minimum HIGH"),
])
def test_envoy_refuses_an_invalid_level_in_config_or_environment(tmp_path, how, needle):
    rc, out = validate(tmp_path, **how)
    assert rc != 0, out[-2000:]
    assert needle in out, out[-2000:]
    assert "refusing to start" in out


def test_a_valid_environment_level_validates(tmp_path):
    rc, out = validate(tmp_path, env={"GEMINI_IMAGE_SAFETY_THRESHOLD": "Medium"})
    assert rc == 0, out[-2000:]
    assert "safety MEDIUM from Environment" in out


# --- logs -------------------------------------------------------------------------------

LEVEL = re.compile(r"\[(info|warning|error)\]\[wasm\]")


def level_of(envoy, rid):
    for line in envoy.log().splitlines():
        if rid in line and '"event":"image_generation"' in line:
            return LEVEL.search(line).group(1)
    return None


@pytest.mark.parametrize("body,level,code", [
    ({"prompt": "ok"}, "info", None),
    ({"prompt": "bad", "n": 99}, "warning", "IMG_INVALID_REQUEST"),
    ({"prompt": "blocked [fake:block=SAFETY]"}, "warning", "IMG_SAFETY_BLOCKED"),
    ({"prompt": "quota [fake:status=429]"}, "error", "IMG_QUOTA_EXHAUSTED"),
    ({"prompt": "broken [fake:garbage]"}, "error", "IMG_UPSTREAM_ERROR"),
])
def test_log_level_follows_the_outcome(client, envoy, body, level, code):
    rid = "rid-" + uuid.uuid4().hex
    body = dict(body, prompt=unique(body["prompt"]))
    client.post(body, headers={"x-request-id": rid})
    assert wait_for(lambda: level_of(envoy, rid)) == level
    (line,) = log_lines(envoy, rid)
    assert line.get("code") == code
    assert line["prompt_hash"] and len(line["prompt_hash"]) == 16


def test_mixed_traffic_logs_none_of_the_secrets(client, envoy, fake):
    """A burst of every kind of request with a fresh canary, then every byte Envoy and
    fake-gemini logged is searched for it, the user, and the keys."""
    canary = "zz" + uuid.uuid4().hex
    bodies = [
        {"prompt": canary + " ok", "user": USER, "n": 2},
        {"prompt": canary + " [fake:withtext]", "user": USER, "response_format": "url", "style": "vivid"},
        {"prompt": canary + " [fake:status=429] [fake:retry=3]", "user": USER},
        {"prompt": canary + " [fake:block=SAFETY]", "user": USER},
        {"prompt": canary + " [fake:status=400]", "user": USER},
        {"prompt": canary + " [fake:fail-first=1]", "user": USER, "n": 2},
        {"prompt": canary + " bad", "user": USER, "size": "9x1"},
        {"prompt": canary * 3000, "user": USER},
    ]
    for listener in ["images", "wrongkey", "refused", "policy"]:
        for b in bodies:
            client.post(b, listener=listener)
    client.post(None, raw=("{\"prompt\": \"%s" % canary).encode())  # truncated JSON
    time.sleep(0.3)
    for text, where in [(envoy.log(), "Envoy"), (fake.process.output(), "fake-gemini")]:
        assert canary not in text, where + " logged a prompt"
        assert USER not in text and API_KEY not in text and "not-the-key" not in text
    assert len([l for l in envoy.log().splitlines() if '"event":"image_generation"' in l]) >= len(bodies) * 4


def test_header_and_log_carry_the_same_prompt_hash(client, envoy):
    import hashlib
    prompt = unique("hash me")
    rid = "rid-" + uuid.uuid4().hex
    _, headers, _ = client.post({"prompt": prompt}, headers={"x-request-id": rid})
    assert headers["x-image-prompt-hash"] == hashlib.sha256(prompt.encode()).hexdigest()[:16]
    (line,) = wait_for(lambda: log_lines(envoy, rid))
    assert line["prompt_hash"] == headers["x-image-prompt-hash"]


# --- metrics ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def envoy_metrics(workdir, fake):
    e = Envoy(workdir, name="envoy-metrics", fake_gemini="127.0.0.1:%d" % fake.port, app="127.0.0.1:%d" % fake.port,
              plugin=with_plugin(cache=None, urls=None), env_extra={"GEMINI_API_KEY": API_KEY})
    yield e
    e.stop()


def test_metrics_count_known_traffic(envoy_metrics):
    e = envoy_metrics
    assert post(e, {"prompt": unique(), "n": 2, "model": "gemini-3-pro-image-4k-16x9"})[0] == 200
    assert post(e, {"prompt": unique()})[0] == 200
    assert post(e, {"prompt": unique("[fake:fail-first=1]"), "n": 3})[0] == 200
    assert post(e, {"prompt": unique("[fake:status=429]")})[0] == 429
    assert post(e, {"prompt": unique("[fake:block=SAFETY]"), "safety_threshold": "HIGH"})[0] == 400
    assert post(e, {"prompt": unique(), "n": 0})[0] == 400
    assert post(e, {"prompt": unique(), "model": "nope"})[0] == 400

    def stats():
        s = e.stats()
        return s if "P50" in str(s.get("wasmcustom.gemini_image.upstream_latency_ms", "")) else None
    s = wait_for(stats)
    assert s, "histograms flushed"
    g = lambda name: s["wasmcustom.gemini_image." + name]
    assert g("requests.outcome.success") == 2
    assert g("requests.outcome.partial") == 1
    assert g("requests.outcome.error") == 4
    assert g("images") == 2 + 1 + 2
    assert g("upstream_calls") == 2 + 1 + 3 + 1 + 1
    assert g("errors.code.IMG_QUOTA_EXHAUSTED") == 1
    assert g("errors.code.IMG_SAFETY_BLOCKED") == 1
    assert g("errors.code.IMG_INVALID_REQUEST") == 1
    assert g("errors.code.IMG_UNSUPPORTED_MODEL") == 1
    assert g("errors.code.IMG_NETWORK_ERROR") == 0
    assert g("safety_blocks.level.HIGH") == 1
    assert g("safety_applied.level.OFF") == 4
    assert g("safety_applied.level.HIGH") == 1
    assert g("model_requests.model.gemini-3-pro-image-4k-16x9") == 1
    assert g("model_requests.model.gemini-3-pro-image") == 4

    prom = e.prometheus()
    assert 'gemini_image_errors{code="IMG_QUOTA_EXHAUSTED"} 1' in prom
    assert 'gemini_image_requests{outcome="success"} 2' in prom
    assert 'gemini_image_model_requests{model="gemini-3-pro-image-4k-16x9"} 1' in prom
    assert 'gemini_image_safety_blocks{level="HIGH"} 1' in prom
    assert "# TYPE gemini_image_upstream_latency_ms histogram" in prom
    assert 'gemini_image_upstream_latency_ms_bucket{le="180000"} 8' in prom
    assert 'gemini_image_upstream_latency_ms_count{} 8' in prom
    assert 'gemini_image_request_latency_ms_count{} 7' in prom
