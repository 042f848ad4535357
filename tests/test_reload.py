"""Plugin configuration changed at runtime through a file-based LDS (issue 7): a valid change
takes effect without dropping requests in flight, an invalid one is rejected while the old one
keeps serving, and L1 (shared data of the same vm_id) survives the reload."""
import json
import threading
import time

import pytest

from conftest import API_KEY, unique
from harness import Envoy, http, with_plugin


def plugin(safety_default, max_n=4):
    """The shipped configuration with a safety level, and L1 alone (no hot set, so every hit is
    read from shared data, which is what survives the reload)."""
    return with_plugin(safety={"default": safety_default}, limits={"max_n": max_n},
                       cache={"ttl_seconds": 600, "l1": {"max_entries": 16, "max_entry_bytes": 16777216, "hot_bytes": 0},
                              "l2": None})


@pytest.fixture
def lds_envoy(fake, tmp_path):
    e = Envoy(str(tmp_path), name="envoy-lds", lds=True, fake_gemini="127.0.0.1:%d" % fake.port,
              plugin=plugin("LOW"), env_extra={"GEMINI_API_KEY": API_KEY})
    yield e
    e.stop()
    assert "panicked" not in e.log()


def stat(e, name):
    return e.stats().get(name)


def post(url, body, store=True):
    headers = {"content-type": "application/json"}
    if not store:
        headers["cache-control"] = "no-store"  # so that fillers never evict the entry under test
    return http("POST", url + "/v1/images/generations", json.dumps(body).encode(), headers, timeout=30)


def test_a_valid_change_applies_without_dropping_requests_in_flight(lds_envoy):
    e = lds_envoy
    url = e.url()
    cached = unique("survives reload")
    assert post(url, {"prompt": cached})[1]["x-image-cache"] == "miss"
    assert post(url, {"prompt": cached})[1]["x-image-cache"] == "hit-l1"
    assert post(url, {"prompt": unique()}, store=False)[1]["x-image-safety"] == "LOW"

    in_flight = {}
    slow = threading.Thread(target=lambda: in_flight.update(r=post(url, {"prompt": unique("in flight [fake:delay=1500]")}, store=False)))
    slow.start()
    time.sleep(0.3)
    updates = stat(e, "listener_manager.lds.update_success")
    e.set_plugin(plugin("HIGH"))
    deadline = time.time() + 10
    while stat(e, "listener_manager.lds.update_success") == updates and time.time() < deadline:
        time.sleep(0.1)
    assert stat(e, "listener_manager.lds.update_success") == updates + 1
    slow.join(10)
    assert in_flight["r"][0] == 200, "the request in flight during the change completed"
    deadline = time.time() + 10
    while post(url, {"prompt": unique()}, store=False)[1]["x-image-safety"] != "HIGH" and time.time() < deadline:
        time.sleep(0.2)
    assert post(url, {"prompt": unique()}, store=False)[1]["x-image-safety"] == "HIGH", "the new config applies"
    # Same vm_id: L1 lives in shared data, which the reload keeps. (The safety level is part
    # of the key, so ask with the level the entry was stored under.)
    assert post(url, {"prompt": cached, "safety_threshold": "LOW"})[1]["x-image-cache"] == "hit-l1"


def test_an_invalid_change_is_rejected_and_the_old_config_keeps_serving(lds_envoy):
    e = lds_envoy
    url = e.url()
    rejected = stat(e, "listener_manager.lds.update_rejected") or 0
    e.set_plugin(plugin("SOMETIMES"))
    deadline = time.time() + 10
    while (stat(e, "listener_manager.lds.update_rejected") or 0) == rejected and time.time() < deadline:
        time.sleep(0.1)
    assert (stat(e, "listener_manager.lds.update_rejected") or 0) == rejected + 1
    assert "refusing to start" in e.log() and "SOMETIMES" in e.log()
    status, headers, _ = post(url, {"prompt": unique("after a bad update")})
    assert status == 200 and headers["x-image-safety"] == "LOW", "the old listener still serves"
