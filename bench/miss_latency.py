#!/usr/bin/env python3
"""Median latency of a cache-less image request through Envoy with the filter, next to the
same fake-gemini bytes proxied by the same Envoy without the filter (the pass-through route).

    .venv/bin/python bench/miss_latency.py [--requests 200]

Both sides run in the same Envoy in the same run; the ratio is what the filter adds.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from harness import Envoy, FakeGemini, http  # noqa: E402


def timed(fn, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        status = fn()
        out.append((time.perf_counter() - t) * 1000)
        assert status == 200, status
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=200)
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="bench-")
    fake = FakeGemini(work)
    envoy = Envoy(work, fake_gemini="127.0.0.1:%d" % fake.port, app="127.0.0.1:%d" % fake.port,
                  env_extra={"GEMINI_API_KEY": "bench"}, concurrency=1)
    try:
        prompt = "bench image"
        openai_body = json.dumps({"prompt": prompt}).encode()
        gemini_body = json.dumps({"contents": [{"role": "user", "parts": [{"text": prompt}]}],
                                  "generationConfig": {"imageConfig": {"aspectRatio": "1:1"}}}).encode()
        ct = {"content-type": "application/json"}
        via_filter = lambda: http("POST", envoy.url() + "/v1/images/generations", openai_body, ct)[0]
        plain = lambda: http("POST", envoy.url() + "/v1beta/models/m:generateContent", gemini_body, ct)[0]
        size = len(http("POST", envoy.url() + "/v1beta/models/m:generateContent", gemini_body, ct)[2])
        timed(via_filter, 20), timed(plain, 20)  # warm up
        f, b = [], []
        for _ in range(a.requests // 20):  # interleave so drift hits both sides alike
            f += timed(via_filter, 20)
            b += timed(plain, 20)
        fm, bm = statistics.median(f), statistics.median(b)
        print("Gemini answer size: %d bytes; %d requests each, Envoy concurrency 1" % (size, len(f)))
        print("%-44s %8s" % ("", "p50 ms"))
        print("%-44s %8.2f" % ("Envoy proxying fake-gemini (no filter)", bm))
        print("%-44s %8.2f" % ("filter: OpenAI request -> fake-gemini -> reply", fm))
        print("ratio filter/plain: %.2fx" % (fm / bm))
    finally:
        envoy.stop()
        fake.stop()


if __name__ == "__main__":
    main()
