#!/usr/bin/env python3
"""Sends known traffic through a real Envoy with the filter and fake-gemini, then prints a
sample log line of each level and the filter's series from /stats/prometheus. The samples in
docs/observability.md come from this command:

    .venv/bin/python scripts/observability_sample.py
"""
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from harness import Envoy, FakeGemini, http  # noqa: E402


def main():
    work = tempfile.mkdtemp(prefix="obs-")
    fake = FakeGemini(work)
    envoy = Envoy(work, fake_gemini="127.0.0.1:%d" % fake.port, app="127.0.0.1:%d" % fake.port,
                  env_extra={"GEMINI_API_KEY": "sample"})
    try:
        ct = {"content-type": "application/json"}
        traffic = [
            {"prompt": "a lighthouse at dusk", "n": 2, "size": "1792x1024"},
            {"prompt": "a red fox in snow", "model": "gemini-3-pro-image-4k-16x9", "safety_threshold": "MEDIUM"},
            {"prompt": "a city at night [fake:delay=300]", "model": "dall-e-3", "quality": "hd"},
            {"prompt": "quota [fake:status=429] [fake:retry=20]"},
            {"prompt": "blocked [fake:block=SAFETY]", "safety_threshold": "HIGH"},
            {"prompt": "a cat", "n": 9},
        ]
        for body in traffic:
            http("POST", envoy.url() + "/v1/images/generations", json.dumps(body).encode(), ct)
        time.sleep(1.5)
        print("# log lines\n")
        seen = set()
        for line in envoy.log().splitlines():
            m = re.search(r"\[(info|warning|error)\]\[wasm\].*?(\{\"event\".*\})$", line)
            if m and m.group(1) not in seen:
                seen.add(m.group(1))
                print("[%s] %s" % (m.group(1), m.group(2)))
        print("\n# /stats/prometheus (gemini_image series, zero counters left out)\n")
        prom = http("GET", envoy.admin + "/stats/prometheus")[2].decode()
        for line in prom.splitlines():
            if "gemini_image" not in line or "envoy_wasm" in line:
                continue
            if line.startswith("#") or not line.endswith(" 0"):
                print(line)
    finally:
        envoy.stop()
        fake.stop()


if __name__ == "__main__":
    main()
