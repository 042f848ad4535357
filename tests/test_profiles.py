"""Policy profiles and cost (contract section 15), end to end in a real Envoy.

A platform runs one Envoy for several teams. Which profile a request is in comes from what the
platform controls, never from what a client sends:

    dynamic metadata left by an earlier authentication filter (here Envoy's own jwt_authn,
    `payload_in_metadata: payload`, the claim `image_profile`)
      > the route's metadata `filter_metadata.gemini_image.profile`
      > `default`

Each profile may narrow models, endpoints, safety and limits, cap the images it makes per minute
on this Envoy (all workers together), keep its cache to itself or not cache at all; every answer
says what it cost (`x-image-cost-usd`), and the log line and metrics count cost and saved cost per
profile.

The Envoys here put `envoy.filters.http.jwt_authn` before the wasm filter (a symmetric HS256 key
in `local_jwks`; the test signs its tokens with hmac/hashlib only). A token is optional: none
means the route's profile or `default`; a token that does not verify is a 401 from jwt_authn,
before the filter. Envoys:

- `gateway` (module): profiles for selection, models, endpoints, safety and limits; no
  `pricing` (so the default price table applies); listeners `images` (no route profile),
  `routed` (route profile `team-route`) and `ghost` (route profile naming no profile).
- `metered` (module): `images_per_minute` buckets, one profile per test; no jwt_authn and no
  `profile_from` (route metadata alone picks the profile).
- `billing` (module): custom `pricing` and the cache modes, one profile per test.
- a fresh one checking the wiring alone (the shipped plugin configuration, no profiles): a
  probe route echoes what jwt_authn left in dynamic metadata and what the route's metadata
  says, and tokens that do not verify are 401s before the filter.

Run: .venv/bin/python -m pytest tests/test_profiles.py -q
"""
import base64
import hashlib
import hmac
import io
import json
import os
import re
import struct
import subprocess
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import API_KEY, assert_no_secrets, log_lines, log_of, unique, worker_of
from harness import ROOT, WASM, Envoy, envoy_bin, free_port, http, post_image, render_envoy, wait_for, with_plugin

# --- JWTs, signed here (HS256) ------------------------------------------------------------

JWT_SECRET = b"profiles-test-hs256-key-" + uuid.uuid4().hex.encode()
WRONG_SECRET = b"not-the-platform-key-" + uuid.uuid4().hex.encode()
JWT_KID = "profiles-test"
JWT_ISSUER = "https://auth.profiles.test"
JWT_FILTER_NAME = "envoy.filters.http.jwt_authn"
CLAIM = "image_profile"
PROFILE_FROM = {"metadata": {"filter": JWT_FILTER_NAME, "path": ["payload", CLAIM]}}


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(claims, key=JWT_SECRET, issuer=JWT_ISSUER, expires_in=3600, alg="HS256"):
    """A compact JWS: {"iss", "sub", "iat", "exp"} plus `claims`, HMAC-SHA256 with `key`
    (alg "none": no signature at all)."""
    now = int(time.time())
    header = {"alg": alg, "typ": "JWT", "kid": JWT_KID}
    payload = {"iss": issuer, "sub": "client-" + uuid.uuid4().hex[:8], "iat": now - 5, "exp": now + expires_in}
    payload.update(claims)
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(payload).encode())
    if alg == "none":
        return signing_input + "."
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(signature)


def bearer(profile, **kw):
    """An authorization header whose verified token names `profile`."""
    return {"authorization": "Bearer " + sign({CLAIM: profile}, **kw)}


def jwt_authn_filter():
    """Envoy's JWT filter: tokens optional (no token passes, a bad one is a 401), the verified
    payload left in dynamic metadata at envoy.filters.http.jwt_authn / payload."""
    jwks = {"keys": [{"kty": "oct", "kid": JWT_KID, "alg": "HS256", "k": b64url(JWT_SECRET)}]}
    return {
        "name": JWT_FILTER_NAME,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {
                "platform": {
                    "issuer": JWT_ISSUER,
                    "local_jwks": {"inline_string": json.dumps(jwks)},
                    "payload_in_metadata": "payload",
                    "forward": False,
                    # What a verified token's payload is forwarded as; a client can send this
                    # header itself, so the filter must never read a profile from it.
                    "forward_payload_header": "x-jwt-payload",
                }
            },
            "rules": [{"match": {"prefix": "/"},
                       "requires": {"requires_any": {"requirements": [{"provider_name": "platform"}, {"allow_missing": {}}]}}}],
        },
    }


# A route for the wiring check alone: it echoes (fake-gemini's /__fake/echo plays the app) what
# jwt_authn left in dynamic metadata and what the route's metadata says, as request headers.
PROBE_ROUTE = {
    "match": {"prefix": "/__wiring"},
    "route": {"cluster": "app", "prefix_rewrite": "/__fake/echo"},
    "request_headers_to_add": [
        {"header": {"key": "x-seen-jwt-profile",
                    "value": "%DYNAMIC_METADATA(envoy.filters.http.jwt_authn:payload:image_profile)%"}},
        {"header": {"key": "x-seen-route-profile", "value": "%METADATA(ROUTE:gemini_image:profile)%"}},
    ],
    "typed_per_filter_config": {"envoy.filters.http.buffer": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute", "disabled": True}},
}


def wiring(jwt=True, route_profiles=None, probe=False):
    """A doc_hook for harness.Envoy: jwt_authn just before the wasm filter in every listener's
    HTTP filter chain (jwt=True), route metadata naming a profile on every route of the listeners
    in `route_profiles` ({listener: profile}), and the PROBE_ROUTE first after the filter's own
    upstream route (probe=True)."""
    def hook(doc):
        for listener in doc["static_resources"]["listeners"]:
            hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
            names = [f["name"] for f in hcm["http_filters"]]
            if jwt:
                hcm["http_filters"].insert(names.index("envoy.filters.http.wasm"), jwt_authn_filter())
            if probe:
                render_envoy.add_route(listener, json.loads(json.dumps(PROBE_ROUTE)))
            profile = (route_profiles or {}).get(listener["name"])
            if profile is not None:
                for vhost in hcm["route_config"]["virtual_hosts"]:
                    for route in vhost["routes"]:
                        route["metadata"] = {"filter_metadata": {"gemini_image": {"profile": profile}}}
    return hook


def start_envoy(workdir, fake, name, plugin, listeners=(), env=None, **wiring_args):
    """An Envoy whose main listener `images` and every listener in `listeners` ((name, plugin
    config) pairs) run `plugin`-style configs, wired by `wiring(**wiring_args)`."""
    extra = [(lname, free_port(), cfg) for lname, cfg in listeners]
    return Envoy(workdir, name=name, fake_gemini="127.0.0.1:%d" % fake.port, app="127.0.0.1:%d" % fake.port,
                 plugin=plugin, extra_listeners=extra, doc_hook=wiring(**wiring_args),
                 env_extra=dict({"GEMINI_API_KEY": API_KEY}, **(env or {})))


def stop_envoy(e):
    e.stop()
    log = e.log()
    assert "panicked" not in log and "wasm trap" not in log.lower(), "the wasm VM panicked:\n" + log[-3000:]
    assert_no_secrets(log, "Envoy")


def profiled(profiles, profile_from=True, **sections):
    """The shipped plugin configuration with these profiles, the L1 cache only (no cache
    service here), and `profile_from` pointing at jwt_authn's payload."""
    extra = {"profiles": profiles}
    if profile_from:
        extra["profile_from"] = PROFILE_FROM
    return with_plugin(cache={"l2": None}, **dict(extra, **sections))


# --- requests and what they leave behind ---------------------------------------------------

class Answer:
    def __init__(self, status, headers, body, rid):
        self.status, self.headers, self.body, self.rid = status, headers, body, rid

    @property
    def json(self):
        return json.loads(self.body)

    @property
    def error(self):
        return self.json["error"]

    def __repr__(self):
        return "<%s %s>" % (self.status, self.body[:300])


def call(e, body, listener="images", profile=None, headers=None):
    """POST a generation; `profile`: with a verified token naming it. Every call is its own
    connection (urllib), so calls spread over Envoy's workers."""
    rid = "rid-" + uuid.uuid4().hex
    h = {"x-request-id": rid}
    if profile is not None:
        h.update(bearer(profile))
    h.update(headers or {})
    status, hdrs, raw = post_image(e, body, listener=listener, headers=h)
    return Answer(status, hdrs, raw, rid)


def png(w=16, h=16, seed=0):
    """A small real PNG (RGB)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    rows = b"".join(
        b"\x00" + b"".join(bytes(((x * 7 + seed) % 256, (y * 5 + seed) % 256, seed % 256)) for x in range(w))
        for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def call_form(e, prompt, path="/v1/images/edits", listener="images", profile=None):
    """POST a one-image multipart edit (or variation) with `prompt`."""
    boundary = "----profiles" + uuid.uuid4().hex
    out = io.BytesIO()
    out.write(("--%s\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n%s\r\n" % (boundary, prompt)).encode())
    out.write(("--%s\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
               "Content-Type: image/png\r\n\r\n" % boundary).encode())
    out.write(png(seed=len(prompt)) + b"\r\n")
    out.write(("--%s--\r\n" % boundary).encode())
    rid = "rid-" + uuid.uuid4().hex
    h = {"content-type": "multipart/form-data; boundary=" + boundary, "x-request-id": rid}
    if profile is not None:
        h.update(bearer(profile))
    status, hdrs, raw = http("POST", e.url(listener) + path, out.getvalue(), h, timeout=60)
    return Answer(status, hdrs, raw, rid)





def metric(e, name):
    return e.stats().get("wasmcustom.gemini_image." + name, 0)


def profile_metric(e, kind, profile):
    return metric(e, "%s.profile.%s" % (kind, profile))


def wait_metric(e, kind, profile, expected):
    """A per-profile counter once it reaches `expected` (the log and the counters are written
    as the request ends); the last value read otherwise."""
    got = wait_for(lambda: profile_metric(e, kind, profile) == expected, timeout=5)
    return expected if got else profile_metric(e, kind, profile)


def cost_of(a):
    """x-image-cost-usd as a float, checked to be a plain decimal string."""
    v = a.headers.get("x-image-cost-usd")
    assert v is not None, "x-image-cost-usd is on every answer: %r %r" % (a, a.headers)
    assert re.fullmatch(r"\d+(\.\d+)?", v), "a decimal string: %r" % v
    return float(v)


def assert_usd(value, expected):
    assert isinstance(value, (int, float)) and not isinstance(value, bool), "a JSON number: %r" % (value,)
    assert value == pytest.approx(expected, abs=1e-9)


def gemini_calls(fake, prompt):
    return fake.recorded(contains=prompt)


def assert_error(a, status, code, etype, param="*"):
    assert a.status == status, a
    e = a.error
    assert set(e) >= {"message", "type", "param", "code", "category", "resolution"}, e
    assert (e["code"], e["type"]) == (code, etype), e
    if param != "*":
        assert e["param"] == param, e
    return e


def validate(tmp_path, plugin):
    """`envoy --mode validate` on the shipped config with `plugin`: (exit code, output)."""
    doc = render_envoy.render(wasm=WASM, plugin=plugin)
    path = render_envoy.write(doc, str(tmp_path / ("profiles-%s.yaml" % uuid.uuid4().hex[:6])))
    env = dict(os.environ, GEMINI_API_KEY="validate-only")
    env.pop("GEMINI_IMAGE_SAFETY_THRESHOLD", None)
    r = subprocess.run([envoy_bin(), "--mode", "validate", "-c", path], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout + r.stderr


# --- the wiring alone: jwt_authn and route metadata, whatever the filter does ---------------

def seen(e, headers=None, listener="images"):
    """(status, the profile jwt_authn left in dynamic metadata, the route's profile) for a
    request with `headers`, as the probe route shows them ("" or "-" when there is none)."""
    status, _, raw = http("GET", e.url(listener) + "/__wiring", headers=headers or {})
    if status != 200:
        return status, None, None
    h = {k.lower(): v for k, v in json.loads(raw)["headers"].items()}
    none = lambda v: None if v in (None, "", "-") else v
    return status, none(h.get("x-seen-jwt-profile")), none(h.get("x-seen-route-profile"))


def test_jwt_authn_and_route_metadata_are_wired_as_the_platform_would(workdir, fake):
    """Sanity check of the test's own Envoy wiring, with the shipped plugin configuration (no
    profiles): a verified token's claim lands where `profile_from` looks, route metadata is on
    the routes, no token passes, and a token that does not verify never reaches the filter."""
    e = start_envoy(workdir, fake, "envoy-profiles-wiring", with_plugin(cache=None, urls=None),
                    listeners=[("routed", with_plugin(cache=None, urls=None))],
                    route_profiles={"routed": "team-route"}, probe=True)
    try:
        assert seen(e) == (200, None, None)
        assert seen(e, bearer("kids-app")) == (200, "kids-app", None), "the verified claim is at payload.image_profile"
        assert seen(e, listener="routed") == (200, None, "team-route")
        assert seen(e, bearer("jwt-team"), listener="routed") == (200, "jwt-team", "team-route")
        # Headers a client might forge put nothing in the metadata.
        assert seen(e, FORGED) == (200, None, None)

        assert call(e, {"prompt": unique("no token")}).status == 200
        assert call(e, {"prompt": unique("token")}, profile="kids-app").status == 200, "no profile_from: the claim is unused"
        # Tokens that do not verify: a 401 from jwt_authn, before the filter and Gemini.
        for what, headers in [
            ("wrong key", bearer("kids-app", key=WRONG_SECRET)),
            ("expired", bearer("kids-app", expires_in=-600)),
            ("wrong issuer", bearer("kids-app", issuer="https://evil.example")),
            ("alg none", bearer("kids-app", alg="none")),
            ("garbage", {"authorization": "Bearer not.a.jwt"}),
        ]:
            assert seen(e, headers)[0] == 401, what
            prompt = unique("bad token " + what)
            a = call(e, {"prompt": prompt}, headers=headers)
            assert a.status == 401, (what, a)
            assert gemini_calls(fake, prompt) == [], what
        time.sleep(0.2)
        assert log_lines(e, "rid-") and not [l for l in log_lines(e, "rid-") if l.get("status") == 401], \
            "the filter never saw a 401"
    finally:
        stop_envoy(e)


# --- the shared gateway: selection and overrides -------------------------------------------

KIDS = {"models": ["gemini-2.5-flash-image"], "endpoints": ["generations"],
        "safety": {"default": "HIGH", "minimum": "HIGH", "allow_request_override": False},
        "limits": {"max_n": 1, "max_image_size": "1K"}}

GATEWAY_PROFILES = {
    "kids-app": KIDS,
    "team-route": {"limits": {"max_n": 2}},
    "jwt-team": {},
    "pro-only": {"models": ["gemini-3-pro-image"]},
    "alias-only": {"models": ["dall-e-3"]},
    "edits-only": {"endpoints": ["edits"]},
    "small": {"limits": {"max_n": 1, "max_image_size": "1K"}},
    "safe-low": {"safety": {"default": "LOW"}},
    "floor": {"safety": {"minimum": "MEDIUM"}},
}


@pytest.fixture(scope="module")
def gateway(workdir, fake):
    """`default` is not listed (it exists anyway); no `pricing` (the default table applies).
    The VM environment says HIGH, so a profile's own safety default must beat it."""
    cfg = profiled(GATEWAY_PROFILES)
    e = start_envoy(workdir, fake, "envoy-profiles", cfg, listeners=[("routed", cfg), ("ghost", cfg)],
                    route_profiles={"routed": "team-route", "ghost": "no-such-profile"},
                    env={"GEMINI_IMAGE_SAFETY_THRESHOLD": "HIGH"})
    yield e
    stop_envoy(e)


def test_no_source_means_the_default_profile(gateway):
    before = profile_metric(gateway, "profile_requests", "default")
    a = call(gateway, {"prompt": unique("plain"), "n": 2})
    assert a.status == 200, a
    assert log_of(gateway, a.rid)["profile"] == "default"
    assert wait_metric(gateway, "profile_requests", "default", before + 1) == before + 1


def test_the_route_metadata_picks_the_profile(gateway, fake):
    before = profile_metric(gateway, "profile_requests", "team-route")
    a = call(gateway, {"prompt": unique("routed"), "n": 2}, listener="routed")
    assert a.status == 200, a
    assert log_of(gateway, a.rid)["profile"] == "team-route"
    prompt = unique("routed too many")
    a = call(gateway, {"prompt": prompt, "n": 3}, listener="routed")
    assert_error(a, 400, "IMG_INVALID_REQUEST", "invalid_request_error", param="n")
    assert gemini_calls(fake, prompt) == []
    assert log_of(gateway, a.rid)["profile"] == "team-route"
    assert call(gateway, {"prompt": unique("main n=3"), "n": 3}).status == 200, "the same n is fine elsewhere"
    assert wait_metric(gateway, "profile_requests", "team-route", before + 2) == before + 2


def test_the_jwt_claim_beats_the_route_metadata(gateway):
    a = call(gateway, {"prompt": unique("jwt over route"), "n": 3}, listener="routed", profile="jwt-team")
    assert a.status == 200, "jwt-team keeps the top-level max_n 4, not team-route's 2: %r" % a
    assert log_of(gateway, a.rid)["profile"] == "jwt-team"
    # On the listener without a route profile too, and for a stricter profile.
    a = call(gateway, {"prompt": unique("jwt kids"), "n": 2}, profile="kids-app")
    assert_error(a, 400, "IMG_INVALID_REQUEST", "invalid_request_error", param="n")
    assert log_of(gateway, a.rid)["profile"] == "kids-app"
    # A route naming no profile does not matter when the token names one.
    a = call(gateway, {"prompt": unique("jwt over ghost")}, listener="ghost", profile="jwt-team")
    assert a.status == 200, a
    assert log_of(gateway, a.rid)["profile"] == "jwt-team"


def test_no_token_or_a_token_without_the_claim_falls_back(gateway):
    without_claim = {"authorization": "Bearer " + sign({"scope": "images"})}
    for listener, expected in [("images", "default"), ("routed", "team-route")]:
        for headers in [{}, without_claim]:
            a = call(gateway, {"prompt": unique("fallback")}, listener=listener, headers=headers)
            assert a.status == 200, (listener, headers, a)
            assert log_of(gateway, a.rid)["profile"] == expected, (listener, headers)


FORGED = {
    "x-image-profile": "kids-app",
    "x-gemini-image-profile": "kids-app",
    "x-envoy-image-profile": "kids-app",
    "x-envoy-original-path": "/kids-app",
    "profile": "kids-app",
    "image_profile": "kids-app",
    # What jwt_authn forwards for a verified token, forged without one.
    "x-jwt-payload": b64url(json.dumps({CLAIM: "kids-app", "iss": JWT_ISSUER}).encode()),
    # A well-formed token nobody verified, in a header jwt_authn does not read.
    "x-forwarded-authorization": "Bearer " + sign({CLAIM: "kids-app"}, key=WRONG_SECRET),
    "x-image-token": sign({CLAIM: "kids-app"}, key=WRONG_SECRET),
}


def test_request_headers_never_pick_a_profile(gateway, fake):
    # kids-app would refuse each of these (n=2, the pro model); the profile in force allows them.
    for listener, expected in [("images", "default"), ("routed", "team-route")]:
        a = call(gateway, {"prompt": unique("forged"), "n": 2, "model": "gemini-3-pro-image"},
                 listener=listener, headers=FORGED)
        assert a.status == 200, (listener, a)
        assert log_of(gateway, a.rid)["profile"] == expected
    # A forged header naming no profile is not a 403 either.
    a = call(gateway, {"prompt": unique("forged ghost")}, headers={"x-image-profile": "no-such-profile"})
    assert a.status == 200, a
    assert log_of(gateway, a.rid)["profile"] == "default"
    # A forged token where jwt_authn does look: refused by jwt_authn, never reaching the filter.
    prompt = unique("forged bearer")
    a = call(gateway, {"prompt": prompt}, headers=bearer("kids-app", key=WRONG_SECRET))
    assert a.status == 401, a
    assert gemini_calls(fake, prompt) == [] and log_lines(gateway, a.rid) == []


@pytest.mark.parametrize("listener,profile", [
    ("ghost", None),                # the route names a profile that is not configured
    ("images", "no-such-profile"),  # the verified claim names one
    ("routed", "no-such-profile"),  # ... and beats a route that names a good one
    ("images", "kids app!"),        # not even a valid profile name
])
def test_a_name_with_no_profile_is_denied(gateway, fake, listener, profile):
    prompt = unique("ghost")
    a = call(gateway, {"prompt": prompt}, listener=listener, profile=profile)
    e = assert_error(a, 403, "IMG_POLICY_DENIED", "permission_error")
    assert e["category"] == "USER_ERROR"
    assert cost_of(a) == 0
    assert gemini_calls(fake, prompt) == []


def upstream_model(fake, prompt):
    (r,) = gemini_calls(fake, prompt)
    return r["path"].rsplit("/", 1)[-1].split(":")[0]


def test_profile_models(gateway, fake):
    # kids-app lists the flash family: its variants pass, other models and aliases do not.
    prompt = unique("kids flash variant")
    a = call(gateway, {"prompt": prompt, "model": "gemini-2.5-flash-image-16x9"}, profile="kids-app")
    assert a.status == 200, a
    assert upstream_model(fake, prompt) == "gemini-2.5-flash-image"
    for model in ["gemini-3-pro-image", "gemini-3-pro-image-2k", "dall-e-3", "gpt-image-1"]:
        prompt = unique("kids " + model)
        a = call(gateway, {"prompt": prompt, "model": model}, profile="kids-app")
        assert_error(a, 400, "IMG_UNSUPPORTED_MODEL", "invalid_request_error", param="model")
        assert gemini_calls(fake, prompt) == [], model
    # No model: the default gemini-3-pro-image is not allowed, so the first listed model.
    prompt = unique("kids no model")
    a = call(gateway, {"prompt": prompt}, profile="kids-app")
    assert a.status == 200, a
    assert upstream_model(fake, prompt) == "gemini-2.5-flash-image"
    assert log_of(gateway, a.rid)["model"].startswith("gemini-2.5-flash-image")

    # pro-only: no model is the default model; its variants pass; flash does not.
    prompt = unique("pro no model")
    assert call(gateway, {"prompt": prompt}, profile="pro-only").status == 200
    assert upstream_model(fake, prompt) == "gemini-3-pro-image-preview"
    assert call(gateway, {"prompt": unique("pro variant"), "model": "gemini-3-pro-image-2k-16x9"},
                profile="pro-only").status == 200
    a = call(gateway, {"prompt": unique("pro flash"), "model": "gemini-2.5-flash-image"}, profile="pro-only")
    assert_error(a, 400, "IMG_UNSUPPORTED_MODEL", "invalid_request_error", param="model")

    # alias-only lists an alias: the alias passes; a model it does not list does not.
    prompt = unique("alias")
    a = call(gateway, {"prompt": prompt, "model": "dall-e-3"}, profile="alias-only")
    assert a.status == 200, a
    assert upstream_model(fake, prompt) == "gemini-3-pro-image-preview"
    a = call(gateway, {"prompt": unique("alias flash"), "model": "gemini-2.5-flash-image"}, profile="alias-only")
    assert_error(a, 400, "IMG_UNSUPPORTED_MODEL", "invalid_request_error", param="model")

    # The default profile is not narrowed.
    assert call(gateway, {"prompt": unique("default flash"), "model": "gemini-2.5-flash-image"}).status == 200


def test_profile_endpoints(gateway, fake):
    for path in ["/v1/images/edits", "/v1/images/variations"]:
        prompt = unique("kids " + path)
        a = call_form(gateway, prompt, path=path, profile="kids-app")
        e = assert_error(a, 403, "IMG_POLICY_DENIED", "permission_error")
        assert e["category"] == "USER_ERROR"
        assert cost_of(a) == 0
        assert gemini_calls(fake, prompt) == [], path
    assert call(gateway, {"prompt": unique("kids generation")}, profile="kids-app").status == 200

    prompt = unique("edits-only generation")
    a = call(gateway, {"prompt": prompt}, profile="edits-only")
    assert_error(a, 403, "IMG_POLICY_DENIED", "permission_error")
    assert gemini_calls(fake, prompt) == []
    a = call_form(gateway, unique("edits-only edit"), profile="edits-only")
    assert a.status == 200, a
    assert log_of(gateway, a.rid)["profile"] == "edits-only"

    a = call_form(gateway, unique("default edit"))
    assert a.status == 200, a


def thresholds(fake, prompt):
    (r,) = gemini_calls(fake, prompt)
    return [(s["category"], s["threshold"]) for s in r["body"]["safetySettings"]]


CATEGORIES = ["HARM_CATEGORY_HARASSMENT", "HARM_CATEGORY_HATE_SPEECH", "HARM_CATEGORY_SEXUALLY_EXPLICIT",
              "HARM_CATEGORY_DANGEROUS_CONTENT"]


def test_profile_safety(gateway, fake):
    # kids-app: HIGH, and nobody may ask for another level, not even the same one.
    prompt = unique("kids safety")
    a = call(gateway, {"prompt": prompt}, profile="kids-app")
    assert a.status == 200 and a.headers["x-image-safety"] == "HIGH", a
    assert thresholds(fake, prompt) == [(c, "BLOCK_LOW_AND_ABOVE") for c in CATEGORIES]
    for level in ["HIGH", "off", "LOW"]:
        prompt = unique("kids override " + level)
        a = call(gateway, {"prompt": prompt, "safety_threshold": level}, profile="kids-app")
        assert_error(a, 400, "IMG_INVALID_REQUEST", "invalid_request_error", param="safety_threshold")
        assert gemini_calls(fake, prompt) == []

    # The environment says HIGH: it beats the top level's OFF for default...
    a = call(gateway, {"prompt": unique("default safety")})
    assert a.status == 200 and a.headers["x-image-safety"] == "HIGH", a
    # ...and a profile's own default beats the environment; a request still beats both.
    prompt = unique("safe-low")
    a = call(gateway, {"prompt": prompt}, profile="safe-low")
    assert a.status == 200 and a.headers["x-image-safety"] == "LOW", a
    assert {t for _, t in thresholds(fake, prompt)} == {"BLOCK_ONLY_HIGH"}
    a = call(gateway, {"prompt": unique("safe-low asks high"), "safety_threshold": "high"}, profile="safe-low")
    assert a.status == 200 and a.headers["x-image-safety"] == "HIGH", a

    # A profile's minimum holds against a request.
    prompt = unique("floor low")
    a = call(gateway, {"prompt": prompt, "safety_threshold": "LOW"}, profile="floor")
    assert_error(a, 400, "IMG_INVALID_REQUEST", "invalid_request_error", param="safety_threshold")
    assert gemini_calls(fake, prompt) == []
    a = call(gateway, {"prompt": unique("floor medium"), "safety_threshold": "MEDIUM"}, profile="floor")
    assert a.status == 200 and a.headers["x-image-safety"] == "MEDIUM", a
    # The same LOW request is fine in the default profile.
    a = call(gateway, {"prompt": unique("default low"), "safety_threshold": "LOW"})
    assert a.status == 200 and a.headers["x-image-safety"] == "LOW", a


def test_profile_limits(gateway, fake):
    refused = [({"n": 2}, "n"), ({"image_size": "2K"}, "image_size"), ({"quality": "hd"}, "quality"),
               ({"model": "gemini-3-pro-image-4k"}, "model")]
    for extra, param in refused:
        prompt = unique("small %s" % param)
        a = call(gateway, dict({"prompt": prompt}, **extra), profile="small")
        assert_error(a, 400, "IMG_INVALID_REQUEST", "invalid_request_error", param=param)
        assert gemini_calls(fake, prompt) == [], extra
        # The top level allows it.
        assert call(gateway, dict({"prompt": unique("default %s" % param)}, **extra)).status == 200, extra
    a = call(gateway, {"prompt": unique("small ok"), "n": 1, "image_size": "1K", "quality": "standard"}, profile="small")
    assert a.status == 200, a
    # Keys a profile does not set keep the top level's: n=4 is the top level's max_n.
    a = call(gateway, {"prompt": unique("pro-only n=4"), "n": 4}, profile="pro-only")
    assert a.status == 200, a
    a = call(gateway, {"prompt": unique("pro-only n=5"), "n": 5}, profile="pro-only")
    assert_error(a, 400, "IMG_INVALID_REQUEST", "invalid_request_error", param="n")


DEFAULT_PRICES = {("pro", "1K"): 0.134, ("pro", "2K"): 0.134, ("pro", "4K"): 0.24, ("flash", "1K"): 0.039}


def test_the_default_price_table(gateway):
    """No `pricing` in the config: Google's list prices."""
    before = profile_metric(gateway, "cost_micro_usd", "default")
    saved_before = profile_metric(gateway, "saved_micro_usd", "default")
    prompt = unique("priced")
    cases = [
        ({"prompt": prompt, "n": 2}, 2 * 0.134),
        ({"prompt": unique("priced flash"), "model": "gemini-2.5-flash-image"}, 0.039),
        ({"prompt": unique("priced 4k"), "image_size": "4K"}, 0.24),
        ({"prompt": unique("priced 2k"), "quality": "medium"}, 0.134),
    ]
    total = 0.0
    for body, expected in cases:
        a = call(gateway, body)
        assert a.status == 200 and a.headers["x-image-cache"] == "miss", a
        assert cost_of(a) == pytest.approx(expected, abs=1e-9), body
        line = log_of(gateway, a.rid)
        assert_usd(line["cost_usd"], expected)
        assert_usd(line["saved_usd"], 0)
        total += expected
        if body["prompt"] == prompt:
            # At once, before another miss can take its L1 slot (64 slots, two ways, shared
            # with the whole module): the hit is free and saves the miss's price.
            hit = call(gateway, body)
            assert hit.status == 200 and hit.headers["x-image-cache"] == "hit-l1", hit
    assert call(gateway, {"prompt": unique("n=2"), "n": 2}).headers["x-image-cost-usd"] == "0.268"
    total += 0.268
    assert cost_of(hit) == 0
    line = log_of(gateway, hit.rid)
    assert_usd(line["cost_usd"], 0)
    assert_usd(line["saved_usd"], 0.268)
    micro = round(total * 1e6)
    assert wait_metric(gateway, "cost_micro_usd", "default", before + micro) == before + micro
    assert wait_metric(gateway, "saved_micro_usd", "default", saved_before + 268000) == saved_before + 268000


# --- configuration ---------------------------------------------------------------------------

CONTRACT_EXAMPLE = {
    "profiles": {"default": {}, "kids-app": dict(KIDS, images_per_minute=20, cache="private")},
    "profile_from": PROFILE_FROM,
    "pricing": {"gemini-3-pro-image": {"1K": 0.134, "2K": 0.134, "4K": 0.24}, "gemini-2.5-flash-image": {"1K": 0.039}},
}


def test_the_contract_example_validates(tmp_path):
    rc, out = validate(tmp_path, with_plugin(**CONTRACT_EXAMPLE))
    assert rc == 0, out[-3000:]


@pytest.mark.parametrize("sections,needle", [
    ({"profiles": {"loose": {"limits": {"max_n": 8}}}}, "max_n"),
    ({"limits": {"max_image_size": "2K"}, "profiles": {"loose": {"limits": {"max_image_size": "4K"}}}}, "max_image_size"),
    ({"profiles": {"loose": {"limits": {"max_prompt_chars": 64000}}}}, "max_prompt_chars"),
    ({"profiles": {"bad name!": {}}}, "bad name!"),
    ({"profiles": {"typo": {"modles": ["gemini-3-pro-image"]}}}, "modles"),
    ({"profiles": {"typo": {"endpoints": ["generations", "upscale"]}}}, "upscale"),
    ({"profiles": {"typo": {"cache": "sometimes"}}}, "sometimes"),
])
def test_a_profile_that_loosens_or_misspells_is_refused(tmp_path, sections, needle):
    rc, out = validate(tmp_path, with_plugin(**sections))
    assert rc != 0, out[-3000:]
    assert needle in out, out[-3000:]


def test_a_missing_price_is_zero_and_a_warning(tmp_path, workdir, fake):
    cfg = profiled({}, profile_from=False, pricing={"gemini-3-pro-image": {"1K": 0.5, "2K": 0.5, "4K": 1.0}})
    rc, out = validate(tmp_path, cfg)
    assert rc == 0, out[-3000:]
    assert "pricing has no price for gemini-2.5-flash-image at 1K" in out, out[-3000:]
    e = start_envoy(workdir, fake, "envoy-profiles-unpriced", cfg, jwt=False)
    try:
        a = call(e, {"prompt": unique("unpriced"), "model": "gemini-2.5-flash-image"})
        assert a.status == 200 and cost_of(a) == 0, a
        assert log_of(e, a.rid)["cost_usd"] == 0
        assert cost_of(call(e, {"prompt": unique("priced")})) == 0.5
    finally:
        stop_envoy(e)


def test_a_profiles_own_inflight_bound_holds_it_alone(workdir, fake):
    """`limits.max_inflight_requests` in a profile bounds that profile's requests in each
    worker (one worker here, so the bound is exact); another profile is not held by it."""
    cfg = profiled({"small": {"limits": {"max_inflight_requests": 1}}}, profile_from=False)
    e = Envoy(workdir, name="envoy-profiles-inflight", fake_gemini="127.0.0.1:%d" % fake.port,
              app="127.0.0.1:%d" % fake.port, plugin=cfg, concurrency=1,
              extra_listeners=[("small", free_port(), cfg)],
              doc_hook=wiring(jwt=False, route_profiles={"small": "small"}),
              env_extra={"GEMINI_API_KEY": API_KEY})
    try:
        slow = lambda listener, tag: call(e, {"prompt": unique(tag + " [fake:delay=1500]")}, listener=listener)
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(slow, "small", "first")
            time.sleep(0.5)  # the first holds the profile's one place
            second = pool.submit(slow, "small", "second")
            other = pool.submit(slow, "images", "other")
            first, second, other = first.result(), second.result(), other.result()
        assert first.status == 200, first
        assert_error(second, 503, "IMG_OVERLOADED", "api_error")
        assert other.status == 200, "the default profile is not held by small's bound"
    finally:
        stop_envoy(e)


def test_a_profile_that_loosens_a_limit_keeps_envoy_from_starting(workdir, fake):
    with pytest.raises(RuntimeError):
        e = start_envoy(workdir, fake, "envoy-profiles-loose", profiled({"loose": {"limits": {"max_n": 8}}}))
        e.stop()


# --- images per minute ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def metered(workdir, fake):
    """One profile per listener, picked by route metadata alone (no jwt_authn, no
    profile_from); each test uses its own profile, so its own bucket."""
    cfg = profiled({"default": {}, "m3": {"images_per_minute": 3}, "m4": {"images_per_minute": 4},
                    "spare": {"images_per_minute": 3}}, profile_from=False)
    e = start_envoy(workdir, fake, "envoy-profiles-metered", cfg,
                    listeners=[("m3", cfg), ("m4", cfg), ("spare", cfg)],
                    jwt=False, route_profiles={"m3": "m3", "m4": "m4", "spare": "spare"})
    yield e
    stop_envoy(e)


def assert_rate_limited(a):
    e = assert_error(a, 429, "IMG_RATE_LIMITED", "rate_limit_error")
    assert e["category"] == "USER_ERROR"
    assert re.fullmatch(r"\d+", a.headers.get("retry-after", "")), a.headers
    assert 1 <= int(a.headers["retry-after"]) <= 60, a.headers
    assert cost_of(a) == 0


def test_images_per_minute_is_one_bucket_for_both_workers(metered, fake):
    prompts = [unique("bucket %d" % i) for i in range(20)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda p: call(metered, {"prompt": p}, listener="m3"), prompts))
    passed = [(p, a) for p, a in zip(prompts, answers) if a.status == 200]
    refused = [(p, a) for p, a in zip(prompts, answers) if a.status != 200]
    assert len(passed) == 3, "3 images a minute, whichever worker took each: %r" % answers
    for p, a in refused:
        assert_rate_limited(a)
        assert gemini_calls(fake, p) == [], "refused before any Gemini call"
        assert log_of(metered, a.rid)["profile"] == "m3"
    for p, a in passed:
        assert a.headers["x-image-cache"] == "miss" and len(gemini_calls(fake, p)) == 1
    workers = {worker_of(metered, a.rid) for a in answers}
    assert len(workers) == 2, "the burst reached both workers: %r" % workers

    # The bucket is empty, yet a cached answer is served (and takes nothing).
    p, _ = passed[0]
    hit = call(metered, {"prompt": p}, listener="m3")
    assert hit.status == 200 and hit.headers["x-image-cache"] == "hit-l1", hit
    assert len(gemini_calls(fake, p)) == 1
    a = call(metered, {"prompt": unique("bucket after")}, listener="m3")
    assert_rate_limited(a)
    # Other profiles have their own buckets.
    assert call(metered, {"prompt": unique("default after")}).status == 200
    assert call(metered, {"prompt": unique("spare after")}, listener="spare").status == 200
    assert wait_metric(metered, "rate_limited", "m3", len(refused) + 1) == len(refused) + 1
    assert profile_metric(metered, "rate_limited", "default") == 0


def test_images_per_minute_counts_images_and_refused_requests_take_none(metered, fake):
    # Refused before Gemini for other reasons: they take nothing from the bucket of 4.
    for body in [{"n": 5}, {"model": "nope"}, {"size": "9x1"}, {"n": 4, "prompt": ""}]:
        a = call(metered, dict({"prompt": unique("refused")}, **body), listener="m4")
        assert a.status == 400, (body, a)
    three = unique("three")
    a = call(metered, {"prompt": three, "n": 3}, listener="m4")
    assert a.status == 200 and len(a.json["data"]) == 3, a
    assert len(gemini_calls(fake, three)) == 3
    two = unique("two")
    a = call(metered, {"prompt": two, "n": 2}, listener="m4")
    assert_rate_limited(a)
    assert gemini_calls(fake, two) == []
    one = unique("one")
    a = call(metered, {"prompt": one, "n": 1}, listener="m4")
    assert a.status == 200, "one image was left: %r" % a
    assert_rate_limited(call(metered, {"prompt": unique("none left")}, listener="m4"))
    # Hits stay free.
    hit = call(metered, {"prompt": three, "n": 3}, listener="m4")
    assert hit.status == 200 and hit.headers["x-image-cache"] == "hit-l1", hit


# --- pricing and the cache modes -------------------------------------------------------------

PRICES = {"gemini-3-pro-image": {"1K": 0.5, "2K": 0.75, "4K": 1.25}, "gemini-2.5-flash-image": {"1K": 0.25}}


@pytest.fixture(scope="module")
def billing(workdir, fake):
    cfg = profiled({"billing": {}, "errors": {}, "partial": {},
                    "p-a": {"cache": "private"}, "p-b": {"cache": "private"},
                    "s-a": {"cache": "shared"}, "s-b": {}, "off": {"cache": "off"}},
                   pricing=PRICES)
    e = start_envoy(workdir, fake, "envoy-profiles-billing", cfg)
    yield e
    stop_envoy(e)


def test_cost_header_log_and_metrics_follow_the_price_table(billing):
    e = billing
    prompt = unique("billed")
    cases = [
        ({"prompt": prompt, "n": 2}, 1.0),                                        # 2 x pro 1K (no size: 1K)
        ({"prompt": unique("billed flash"), "model": "gemini-2.5-flash-image"}, 0.25),
        ({"prompt": unique("billed 2k"), "image_size": "2K"}, 0.75),
        ({"prompt": unique("billed 4k"), "model": "gemini-3-pro-image-4k", "n": 2}, 2.5),
        ({"prompt": unique("billed alias"), "model": "dall-e-3"}, 0.5),
    ]
    for body, expected in cases:
        a = call(e, body, profile="billing")
        assert a.status == 200 and a.headers["x-image-cache"] == "miss", a
        assert cost_of(a) == pytest.approx(expected, abs=1e-9), body
        line = log_of(e, a.rid)
        assert line["profile"] == "billing"
        assert_usd(line["cost_usd"], expected)
        assert_usd(line["saved_usd"], 0)
    hit = call(e, {"prompt": prompt, "n": 2}, profile="billing")
    assert hit.status == 200 and hit.headers["x-image-cache"] == "hit-l1", hit
    assert cost_of(hit) == 0
    line = log_of(e, hit.rid)
    assert_usd(line["cost_usd"], 0)
    assert_usd(line["saved_usd"], 1.0)
    assert wait_metric(e, "cost_micro_usd", "billing", 5_000_000) == 5_000_000
    assert wait_metric(e, "saved_micro_usd", "billing", 1_000_000) == 1_000_000
    assert wait_metric(e, "profile_requests", "billing", len(cases) + 1) == len(cases) + 1
    assert profile_metric(e, "rate_limited", "billing") == 0


def test_errors_cost_nothing(billing):
    e = billing
    for body, status in [({"n": 99}, 400), ({"model": "nope"}, 400), ({"prompt": unique("[fake:status=500]")}, 502),
                         ({"prompt": unique("[fake:block=SAFETY]")}, 400)]:
        a = call(e, dict({"prompt": unique("error")}, **body), profile="errors")
        assert a.status == status, (body, a)
        assert cost_of(a) == 0, body
        line = log_of(e, a.rid)
        assert line["profile"] == "errors"
        assert_usd(line["cost_usd"], 0)
        assert_usd(line["saved_usd"], 0)
    assert profile_metric(e, "cost_micro_usd", "errors") == 0
    assert profile_metric(e, "saved_micro_usd", "errors") == 0


def test_a_partial_answer_costs_the_images_made(billing):
    a = call(billing, {"prompt": unique("[fake:fail-first=1]"), "n": 2}, profile="partial")
    assert a.status == 200 and a.headers.get("x-images-failed") == "1", a
    assert cost_of(a) == pytest.approx(0.5, abs=1e-9)
    assert_usd(log_of(billing, a.rid)["cost_usd"], 0.5)
    assert wait_metric(billing, "cost_micro_usd", "partial", 500_000) == 500_000


def test_the_default_profile_is_counted_and_logged(billing):
    e = billing
    before = {k: profile_metric(e, k, "default") for k in ("profile_requests", "cost_micro_usd", "saved_micro_usd")}
    prompt = unique("default billed")
    a = call(e, {"prompt": prompt})
    assert a.status == 200 and cost_of(a) == pytest.approx(0.5, abs=1e-9), a
    line = log_of(e, a.rid)
    assert line["profile"] == "default"
    assert_usd(line["cost_usd"], 0.5)
    hit = call(e, {"prompt": prompt})
    assert hit.headers["x-image-cache"] == "hit-l1" and cost_of(hit) == 0, hit
    assert_usd(log_of(e, hit.rid)["saved_usd"], 0.5)
    assert wait_metric(e, "profile_requests", "default", before["profile_requests"] + 2) == before["profile_requests"] + 2
    assert wait_metric(e, "cost_micro_usd", "default", before["cost_micro_usd"] + 500_000) == before["cost_micro_usd"] + 500_000
    assert wait_metric(e, "saved_micro_usd", "default", before["saved_micro_usd"] + 500_000) == before["saved_micro_usd"] + 500_000


def cache_state(e, fake, prompt, profile):
    a = call(e, {"prompt": prompt}, profile=profile)
    assert a.status == 200, (profile, a)
    return a.headers["x-image-cache"]


def test_a_private_cache_is_not_shared(billing, fake):
    e = billing
    prompt = unique("private")
    assert cache_state(e, fake, prompt, "p-a") == "miss"
    assert cache_state(e, fake, prompt, "p-a") == "hit-l1", "the profile's own repeat is a hit"
    assert cache_state(e, fake, prompt, "p-b") == "miss", "another private profile does not get it"
    assert cache_state(e, fake, prompt, None) == "miss", "nor does default (shared)"
    assert cache_state(e, fake, prompt, "s-a") == "hit-l1", "a shared profile gets what default stored"
    assert cache_state(e, fake, prompt, "p-b") == "hit-l1"
    assert cache_state(e, fake, prompt, "p-a") == "hit-l1"
    assert len(gemini_calls(fake, prompt)) == 3
    # A shared entry is not served to a private profile either.
    shared = unique("shared first")
    assert cache_state(e, fake, shared, "s-a") == "miss"
    assert cache_state(e, fake, shared, "p-a") == "miss"
    assert len(gemini_calls(fake, shared)) == 2


def test_shared_profiles_share_the_cache(billing, fake):
    e = billing
    prompt = unique("shared")
    assert cache_state(e, fake, prompt, "s-a") == "miss"
    assert cache_state(e, fake, prompt, "s-b") == "hit-l1"
    assert cache_state(e, fake, prompt, None) == "hit-l1", "default shares too"
    assert len(gemini_calls(fake, prompt)) == 1


def test_cache_off_calls_gemini_every_time(billing, fake):
    e = billing
    prompt = unique("uncached")
    for _ in range(3):
        a = call(e, {"prompt": prompt}, profile="off")
        assert a.status == 200 and a.headers["x-image-cache"] == "miss", a
        assert cost_of(a) == pytest.approx(0.5, abs=1e-9)
    assert len(gemini_calls(fake, prompt)) == 3
    # Not even what the shared cache holds.
    shared = unique("shared then off")
    assert cache_state(e, fake, shared, "s-a") == "miss"
    assert cache_state(e, fake, shared, "off") == "miss"
    assert len(gemini_calls(fake, shared)) == 2
    # ...and nothing of "off" went into the shared cache.
    assert cache_state(e, fake, prompt, "s-a") == "miss"
