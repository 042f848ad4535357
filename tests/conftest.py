import json
import os
import re
import uuid

import pytest

from harness import CacheService, Envoy, FakeGemini, dead_port, free_port, http, with_plugin

API_KEY = "test-key-0123456789"
CACHE_TOKEN = "cache-token-0123456789"


def pytest_configure(config):
    config.addinivalue_line("markers", "live: talks to Google's real API (needs GEMINI_API_KEY)")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("e2e"))


@pytest.fixture(scope="session")
def fake(workdir):
    f = FakeGemini(workdir, api_key=API_KEY)
    yield f
    f.stop()


# Listeners that differ from the main one only in plugin configuration.
LISTENER_CONFIGS = {
    "refused": with_plugin(gemini={"cluster": "dead"}),
    "slow": with_plugin(gemini={"timeout_ms": 1500}),
    "nokey": with_plugin(gemini={"api_key_env": "NO_SUCH_GEMINI_KEY"}),
    "wrongkey": with_plugin(gemini={"api_key_env": "WRONG_GEMINI_KEY"}),
    "nocluster": with_plugin(gemini={"cluster": "no_such_cluster"}),
    "policy": with_plugin(safety={"default": "MEDIUM", "minimum": "LOW"}, limits={"max_n": 10, "max_image_size": "2K", "max_prompt_chars": 100}),
    "locked": with_plugin(safety={"default": "HIGH", "allow_request_override": False}),
    "inline": with_plugin(urls=None),
    "nostream": with_plugin(streaming={"enabled": False}),
}


@pytest.fixture(scope="session")
def cache_service(workdir):
    c = CacheService(workdir, token=CACHE_TOKEN)
    yield c
    c.stop()


@pytest.fixture(scope="session")
def envoy(workdir, fake, cache_service):
    refused_port = dead_port()
    extra = [(name, free_port(), cfg) for name, cfg in LISTENER_CONFIGS.items()]
    e = Envoy(
        workdir,
        fake_gemini="127.0.0.1:%d" % fake.port,
        app="127.0.0.1:%d" % fake.port,
        image_cache="127.0.0.1:%d" % cache_service.port,
        extra_listeners=extra,
        extra_clusters=[("dead", "127.0.0.1", refused_port)],
        env_extra={"GEMINI_API_KEY": API_KEY, "WRONG_GEMINI_KEY": "not-the-key", "IMAGE_CACHE_TOKEN": CACHE_TOKEN},
    )
    yield e
    e.stop()
    log = e.log()
    assert "panicked" not in log and "wasm trap" not in log.lower(), "the wasm VM panicked:\n" + log[-3000:]
    # Everything the suite sent went through this Envoy: nothing of it may be in any log.
    assert_no_secrets(log, "Envoy")
    assert_no_secrets(fake.process.output(), "fake-gemini")
    assert_no_secrets(cache_service.process.output(), "cache-service")


# Every prompt the suite sends holds this canary; at the end no log may hold it (issue 3).
CANARY = "canary%s" % uuid.uuid4().hex[:10]
USER = "user-%s@example.com" % uuid.uuid4().hex[:8]


def unique(prefix="p"):
    return "%s %s-%s" % (prefix, CANARY, uuid.uuid4().hex[:12])


def assert_no_secrets(text, where):
    for secret, what in [(CANARY, "a prompt"), (USER, "a user"), (API_KEY, "the API key"), ("not-the-key", "a key"),
                         (CACHE_TOKEN, "the cache token")]:
        assert secret not in text, "%s logged %s" % (where, what)


class Client:
    def __init__(self, envoy):
        self.envoy = envoy

    def post(self, body, listener="images", headers=None, raw=None, timeout=60):
        h = {"content-type": "application/json"}
        h.update(headers or {})
        data = raw if raw is not None else json.dumps(body).encode()
        return http("POST", self.envoy.url(listener) + "/v1/images/generations", data, h, timeout=timeout)


@pytest.fixture
def client(envoy):
    return Client(envoy)


def log_of(e, rid, timeout=10):
    """The filter's one log line for request `rid` (waiting for it to be written)."""
    from harness import wait_for
    lines = wait_for(lambda: log_lines(e, rid), timeout=timeout)
    assert len(lines) == 1, "one log line per request, got %r" % lines
    return lines[0]


THREAD = re.compile(r"^\[[^\]]*\]\[(\d+)\]")


def worker_of(e, rid):
    """The Envoy thread that logged request `rid` (the second bracket of Envoy's log format)."""
    log_of(e, rid)
    for line in e.log().splitlines():
        if rid in line and '"event":"image_generation"' in line:
            return THREAD.match(line).group(1)
    return None


def log_lines(envoy, needle):
    """The filter's JSON log lines that hold `needle`."""
    out = []
    for line in envoy.log().splitlines():
        m = re.search(r'(\{"event":"image_generation".*\})\s*$', line)
        if m and needle in line:
            out.append(json.loads(m.group(1)))
    return out
