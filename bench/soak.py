#!/usr/bin/env python3
"""Soak: mixed traffic (L1/L2 hits, misses, upstream errors, bad requests) at 64 connections
against Envoy with the filter, fake-gemini and cache-service, for a set time.

    .venv/bin/python bench/soak.py [--seconds 300] [--connections 64]

Fails (exit 1) when a valid request gets anything but its expected answer, when an answer takes
longer than its bound, or when Envoy's resident memory keeps growing in the last third of the
run (it must level off: L1 is bounded by construction, the hot set by bytes).
"""
import argparse
import http.client
import json
import os
import random
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from harness import CacheService, Envoy, FakeGemini, http as http_call, with_plugin  # noqa: E402

MIB = 1024 * 1024


def rss_mib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=300)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--sample-every", type=float, default=2.0)
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="soak-")
    fake = FakeGemini(work)
    cache = CacheService(work, token="soak", max_bytes=512 * MIB)
    l1 = {"max_entries": 32, "max_entry_bytes": 4 * MIB, "hot_bytes": 16 * MIB}
    envoy = Envoy(work, name="envoy-soak", fake_gemini="127.0.0.1:%d" % fake.port, image_cache="127.0.0.1:%d" % cache.port,
                  # In-flight bounds that 64 connections of n <= 4 fit inside (32 per worker x 4 calls
                  # x 4 MiB reserved = 512 MiB), so any IMG_OVERLOADED here means a share that was
                  # never given back: the soak counts it as unexpected.
                  plugin=with_plugin(cache={"ttl_seconds": 600, "l1": l1, "l2": {"cluster": "image_cache", "authority": "image-cache",
                                                                                 "timeout_ms": 250}},
                                     limits={"max_inflight_bytes": 1024 * MIB}),
                  env_extra={"GEMINI_API_KEY": "soak", "IMAGE_CACHE_TOKEN": "soak"}, concurrency=2)
    hot_prompts = ["soak hot %d [fake:bytes=%d]" % (i, (i % 4 + 1) * 256 * 1024) for i in range(200)]
    counts = {"ok": 0, "unexpected": 0, "slow": 0, "errors_expected": 0}
    unexpected = []
    lock = threading.Lock()
    stop = time.time() + a.seconds

    def one(conn, rnd):
        kind = rnd.random()
        if kind < 0.55:
            body, want, bound = {"prompt": rnd.choice(hot_prompts)}, 200, 5.0                       # mostly hits
        elif kind < 0.80:
            body, want, bound = {"prompt": "soak miss %d [fake:delay=%d]" % (rnd.getrandbits(48), rnd.randint(0, 300)),
                                 "n": rnd.randint(1, 4)}, 200, 5.0                                       # misses
        elif kind < 0.90:
            marker, want = rnd.choice([("[fake:status=429]", 429), ("[fake:status=500]", 502), ("[fake:block=SAFETY]", 400),
                                       ("[fake:garbage]", 502), ("[fake:status=503]", 503)])
            body, bound = {"prompt": "soak err %d %s" % (rnd.getrandbits(32), marker)}, 5.0           # upstream errors
        else:
            body, want, bound = {"prompt": "soak bad", "n": 99}, 400, 5.0                               # bad requests
        data = json.dumps(body).encode()
        t = time.time()
        conn.request("POST", "/v1/images/generations", body=data, headers={"content-type": "application/json"})
        r = conn.getresponse()
        r.read()
        took = time.time() - t
        with lock:
            if r.status != want:
                counts["unexpected"] += 1
                if len(unexpected) < 20:
                    unexpected.append((body, r.status, want))
            elif want == 200:
                counts["ok"] += 1
            else:
                counts["errors_expected"] += 1
            if took > bound:
                counts["slow"] += 1

    def worker(i):
        rnd = random.Random(i)
        conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=30)
        while time.time() < stop:
            try:
                one(conn, rnd)
            except (OSError, http.client.HTTPException) as e:
                with lock:
                    counts["unexpected"] += 1
                    unexpected.append(("connection", repr(e), None))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=30)

    samples = []
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(a.connections)]
    t0 = time.time()
    for t in threads:
        t.start()
    while time.time() < stop:
        samples.append((time.time() - t0, rss_mib(envoy.process.pid)))
        time.sleep(a.sample_every)
    for t in threads:
        t.join(60)
    stats = envoy.stats()
    envoy.stop()
    cache.stop()
    fake.stop()

    total = counts["ok"] + counts["errors_expected"] + counts["unexpected"]
    print("soak: %d s, %d connections, %d requests (%.0f/s): %d successes, %d expected errors, %d unexpected, %d over their bound"
          % (a.seconds, a.connections, total, total / a.seconds, counts["ok"], counts["errors_expected"], counts["unexpected"], counts["slow"]))
    g = lambda n: stats.get("wasmcustom.gemini_image." + n, 0)
    print("cache: %d L1 hits, %d L2 hits, %d misses, %d L1 evictions, %d L2 errors" % (
        g("cache_hits.tier.l1"), g("cache_hits.tier.l2"), g("cache_misses"), g("cache_l1_evictions"), g("cache_l2_errors")))
    l1_bound = l1["max_entries"] * l1["max_entry_bytes"] / MIB + 2 * l1["hot_bytes"] / MIB
    print("L1 bound: %d slots x %d MiB + 2 workers x %d MiB hot = %.0f MiB" % (
        l1["max_entries"], l1["max_entry_bytes"] // MIB, l1["hot_bytes"] // MIB, l1_bound))
    print("Envoy resident memory (MiB) over time:")
    step = max(1, len(samples) // 12)
    for t, m in samples[::step]:
        print("  %6.0f s  %7.1f" % (t, m))
    third = max(1, len(samples) // 3)
    first, last = samples[:third], samples[-third:]
    growth_last = max(m for _, m in last) - min(m for _, m in last)
    peak = max(m for _, m in samples)
    print("peak %.1f MiB; growth within the last third %.1f MiB" % (peak, growth_last))
    failed = False
    if counts["unexpected"]:
        print("FAIL: unexpected answers: %s" % unexpected[:10])
        failed = True
    if counts["slow"]:
        print("FAIL: %d answers over their time bound" % counts["slow"])
        failed = True
    if growth_last > max(32.0, 0.1 * peak):
        print("FAIL: memory still grows in the last third of the run")
        failed = True
    if peak - samples[0][1] > l1_bound + 256:
        print("FAIL: memory grew beyond the L1 bound plus 256 MiB of working memory")
        failed = True
    print("soak: %s" % ("FAILED" if failed else "passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
