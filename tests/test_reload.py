"""Plugin configuration changed at runtime through a file-based LDS (issue 7): a valid change
takes effect without dropping requests in flight, an invalid one is rejected while the old one
keeps serving, and L1 (shared data of the same vm_id) survives the reload."""
import copy
import json
import os
import threading
import time

import pytest
import yaml

from conftest import API_KEY, unique
from harness import WASM, Process, envoy_bin, free_port, http, render_envoy


def listener_with(base_listener, safety_default, max_n=4):
    l = copy.deepcopy(base_listener)
    cfg = render_envoy.plugin_config(l)
    cfg["safety"]["default"] = safety_default
    cfg["limits"]["max_n"] = max_n
    cfg["cache"] = {"ttl_seconds": 600, "l1": {"max_entries": 16, "max_entry_bytes": 16777216, "hot_bytes": 0}}
    render_envoy._set_plugin_config(l, cfg)
    return l


def write_lds(path, listener):
    doc = {"resources": [dict(listener, **{"@type": "type.googleapis.com/envoy.config.listener.v3.Listener"})]}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    os.replace(tmp, path)  # an atomic move is what Envoy's file watcher expects


@pytest.fixture
def lds_envoy(workdir, fake, tmp_path):
    doc = render_envoy.render(wasm=WASM, fake_gemini="127.0.0.1:%d" % fake.port, listen_port=free_port(),
                              admin_port=free_port())
    listener = doc["static_resources"].pop("listeners")[0]
    lds = str(tmp_path / "lds.yaml")
    write_lds(lds, listener_with(listener, "LOW"))
    doc["dynamic_resources"] = {"lds_config": {"path_config_source": {"path": lds}, "resource_api_version": "V3"}}
    doc["node"] = {"id": "reload-test", "cluster": "reload-test"}
    cfg = render_envoy.write(doc, str(tmp_path / "bootstrap.yaml"))
    admin = "http://127.0.0.1:%d" % doc["admin"]["address"]["socket_address"]["port_value"]
    url = "http://127.0.0.1:%d" % listener["address"]["socket_address"]["port_value"]
    p = Process("envoy-lds", [envoy_bin(), "-c", cfg, "--concurrency", "2", "--disable-hot-restart",
                              "--log-level", "warning", "--component-log-level", "wasm:info"],
                str(tmp_path / "envoy-lds.log"), env=dict(os.environ, GEMINI_API_KEY=API_KEY),
                ready=lambda: http("GET", admin + "/ready", timeout=1)[0] == 200 and
                http("GET", url + "/healthz-probe", timeout=1)[0] > 0)
    yield p, admin, url, lds, listener
    p.stop()
    assert "panicked" not in p.output()


def stat(admin, name):
    for line in http("GET", admin + "/stats?filter=" + name)[2].decode().splitlines():
        k, _, v = line.partition(": ")
        if k == name:
            return int(v)
    return None


def post(url, body, store=True):
    headers = {"content-type": "application/json"}
    if not store:
        headers["cache-control"] = "no-store"  # so that fillers never evict the entry under test
    return http("POST", url + "/v1/images/generations", json.dumps(body).encode(), headers, timeout=30)


def test_a_valid_change_applies_without_dropping_requests_in_flight(lds_envoy):
    p, admin, url, lds, listener = lds_envoy
    cached = unique("survives reload")
    assert post(url, {"prompt": cached})[1]["x-image-cache"] == "miss"
    assert post(url, {"prompt": cached})[1]["x-image-cache"] == "hit-l1"
    assert post(url, {"prompt": unique()}, store=False)[1]["x-image-safety"] == "LOW"

    in_flight = {}
    slow = threading.Thread(target=lambda: in_flight.update(r=post(url, {"prompt": unique("in flight [fake:delay=1500]")}, store=False)))
    slow.start()
    time.sleep(0.3)
    updates = stat(admin, "listener_manager.lds.update_success")
    write_lds(lds, listener_with(listener, "HIGH"))
    deadline = time.time() + 10
    while stat(admin, "listener_manager.lds.update_success") == updates and time.time() < deadline:
        time.sleep(0.1)
    assert stat(admin, "listener_manager.lds.update_success") == updates + 1
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
    p, admin, url, lds, listener = lds_envoy
    rejected = stat(admin, "listener_manager.lds.update_rejected") or 0
    write_lds(lds, listener_with(listener, "SOMETIMES"))
    deadline = time.time() + 10
    while (stat(admin, "listener_manager.lds.update_rejected") or 0) == rejected and time.time() < deadline:
        time.sleep(0.1)
    assert (stat(admin, "listener_manager.lds.update_rejected") or 0) == rejected + 1
    assert "refusing to start" in p.output() and "SOMETIMES" in p.output()
    status, headers, _ = post(url, {"prompt": unique("after a bad update")})
    assert status == 200 and headers["x-image-safety"] == "LOW", "the old listener still serves"
