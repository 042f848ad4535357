#!/usr/bin/env python3
"""The bench's Envoy (concurrency 1), left running for a profiler (docs/performance.md).

Starts fake-gemini, cache-service and Envoy with the listeners of bench/run.py, fills L1 and L2
with a 2 MiB image, prints Envoy's pid and the URL of each case as JSON, and runs until
interrupted (Ctrl-C, or SIGTERM: everything it started is stopped).

    .venv/bin/python bench/serve.py
"""
import json
import os
import signal
import sys
import tempfile
import time
from urllib.parse import urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import run as bench  # noqa: E402
from harness import CacheService, FakeGemini, Process, envoy_bin, http, render_envoy  # noqa: E402


def main():
    work = tempfile.mkdtemp(prefix="bench-serve-")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fake = FakeGemini(work)
    cache = CacheService(work, max_bytes=2 * 1024 * bench.MIB)
    envoy = None
    ct = {"content-type": "application/json"}
    prompt = "bench two [fake:bytes=%d]" % (2 * bench.MIB)
    try:
        bodies = bench.probe_bodies(work, fake, {"2m": prompt})
        doc = bench.bench_config(fake, cache, bodies, work)
        ports = {l["name"]: l["address"]["socket_address"]["port_value"] for l in doc["static_resources"]["listeners"]}
        cfg = render_envoy.write(doc, os.path.join(work, "bench-serve.yaml"))
        admin = "http://127.0.0.1:%d" % doc["admin"]["address"]["socket_address"]["port_value"]
        envoy = Process("envoy", [envoy_bin(), "-c", cfg, "--concurrency", "1", "--disable-hot-restart", "--log-level", "error"],
                        os.path.join(work, "envoy.log"), env=dict(os.environ, GEMINI_API_KEY="bench"),
                        ready=lambda: http("GET", admin + "/ready", timeout=1)[0] == 200)
        url = lambda listener, path: "http://127.0.0.1:%d%s" % (ports[listener], path)
        http("POST", url("images", "/v1/images/generations"), json.dumps({"prompt": prompt}).encode(), ct)
        files = {}
        for listener in ("images", "l2only"):
            status, _, answer = http("POST", url(listener, "/v1/images/generations"),
                                     json.dumps({"prompt": prompt, "response_format": "url"}).encode(), ct)
            assert status == 200, answer[:200]
            files[listener] = url(listener, urlsplit(json.loads(answer)["data"][0]["url"]).path)
        print(json.dumps({
            "envoy_pid": envoy.pid,
            "direct_response of the answer": url("plain", "/direct/2m"),
            "direct_response of the image": url("plain", "/direct/image-2m"),
            "L1 hit (POST this Lua script with wrk -s)": [url("images", "/v1/images/generations"),
                                                          bench.lua_post("/v1/images/generations", json.dumps({"prompt": prompt}), ct, work)],
            "L2 hit (same script)": url("l2only", "/v1/images/generations"),
            "image URL GET from L1": files["images"],
            "image URL GET from L2": files["l2only"],
            "cache service": cache.url,
        }, indent=1), flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        if envoy:
            envoy.stop()
        cache.stop()
        fake.stop()


if __name__ == "__main__":
    main()
