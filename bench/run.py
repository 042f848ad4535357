#!/usr/bin/env python3
"""What the filter costs, measured against Envoy itself in the same run (make bench).

Starts fake-gemini, cache-service and Envoy (concurrency 1, then 2) with two listeners: one
with the filter (the shipped envoy/envoy.yaml) and one without any filter, where Envoy alone
serves the baselines (direct_response of the same bytes, plain proxying of the same
fake-gemini answer). Load comes from wrk. Every figure is printed as a ratio against its
baseline, with the absolute medians beside it.

    .venv/bin/python bench/run.py [--duration 5] [--connections 4] [--concurrency 1,2]
"""
import argparse
import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from harness import WASM, CacheService, Envoy, FakeGemini, Process, envoy_bin, free_port, http, render_envoy, with_plugin  # noqa: E402

MIB = 1024 * 1024


def need_wrk():
    if shutil.which("wrk"):
        return shutil.which("wrk")
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, capture_output=True)
    if not shutil.which("wrk"):
        sys.exit("make bench needs wrk (Debian package wrk): apt-get install wrk")
    return shutil.which("wrk")


def lua_post(path, body, headers, workdir):
    name = os.path.join(workdir, "req-%d.lua" % abs(hash((path, body, json.dumps(headers)))))
    lines = ['wrk.method = "POST"', "wrk.body = %s" % json.dumps(body)]
    for k, v in headers.items():
        lines.append('wrk.headers["%s"] = "%s"' % (k, v))
    with open(name, "w") as f:
        f.write("\n".join(lines) + "\n")
    return name


def lua_post_file(path, body_file, headers, workdir):
    """A wrk script that POSTs the bytes of body_file (binary, e.g. a multipart upload)."""
    name = os.path.join(workdir, "req-file-%d.lua" % abs(hash((path, body_file, json.dumps(headers)))))
    lines = ['wrk.method = "POST"', 'local f = assert(io.open(%s, "rb"))' % json.dumps(body_file),
             "wrk.body = f:read(\"*a\")", "f:close()"]
    for k, v in headers.items():
        lines.append('wrk.headers["%s"] = "%s"' % (k, v))
    with open(name, "w") as f:
        f.write("\n".join(lines) + "\n")
    return name


def png_of_size(size):
    """A PNG of 1024x1024 whose file is `size` bytes (a private chunk pads it), like an upload."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1024, 1024, 8, 2, 0, 0, 0))
    tail = chunk(b"IDAT", zlib.compress(b"\x00" * (1024 * 3 + 1) * 1024)) + chunk(b"IEND", b"")
    pad = max(0, size - len(head) - len(tail) - 12)
    return head + chunk(b"prVt", os.urandom(pad)) + tail


def multipart(fields, files):
    """A multipart/form-data body as the OpenAI SDKs send it, and its content type."""
    boundary = "----bench" + os.urandom(8).hex()
    out = b""
    for k, v in fields:
        out += ("--%s\r\nContent-Disposition: form-data; name=\"%s\"\r\n\r\n%s\r\n" % (boundary, k, v)).encode()
    for k, filename, data in files:
        out += ("--%s\r\nContent-Disposition: form-data; name=\"%s\"; filename=\"%s\"\r\nContent-Type: image/png\r\n\r\n"
                % (boundary, k, filename)).encode() + data + b"\r\n"
    out += ("--%s--\r\n" % boundary).encode()
    return out, "multipart/form-data; boundary=" + boundary


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def parse_wrk(out):
    lat = {}
    for pct, val, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        lat[pct] = float(val) * UNITS[unit]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"p50": lat.get("50"), "p99": lat.get("99"), "rps": rps, "non2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": errors.group(1) if errors else None}


# With Envoy at concurrency 1, Envoy gets core 0 and everything else (wrk, fake-gemini,
# cache-service) core 1, so that they do not fight over one core. Set by main().
LOAD_CPUS = None


def pin(pid, cpus):
    if cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(pid, cpus)
        except OSError:
            pass


def wrk(url, seconds, connections, script=None, threads=None):
    cmd = [need_wrk(), "-t", str(threads or min(connections, 2)), "-c", str(connections), "-d", "%ds" % max(1, round(seconds)), "--latency", url]
    if script:
        cmd[1:1] = ["-s", script]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60,
                         preexec_fn=(lambda: pin(0, LOAD_CPUS)) if LOAD_CPUS else None).stdout
    r = parse_wrk(out)
    if r["non2xx"]:
        raise SystemExit("non-2xx answers from %s:\n%s" % (url, out))
    return r


ROUNDS = 3


ONLY = None  # --only: run the rows whose name holds this text


def pair(name, base_name, base, cand):
    """Runs baseline and candidate alternately, ROUNDS times each; keeps the medians."""
    if ONLY and ONLY not in name:
        return None
    bs, cs = [], []
    for _ in range(ROUNDS):
        bs.append(base())
        cs.append(cand())
    med = lambda rs, k: sorted(r[k] for r in rs)[len(rs) // 2]
    b = {k: med(bs, k) for k in ("p50", "p99", "rps")}
    c = {k: med(cs, k) for k in ("p50", "p99", "rps")}
    return {"name": name, "baseline": base_name, "b": b, "c": c, "ratio_p50": c["p50"] / b["p50"],
            "ratio_p99": c["p99"] / b["p99"], "ratio_rps": b["rps"] / c["rps"]}


def bench_config(fake, cache, bodies, workdir):
    """The shipped config plus an `l2only` listener (no L1) and a `plain` listener (no filter)."""
    doc = render_envoy.render(wasm=WASM, fake_gemini="127.0.0.1:%d" % fake.port, app="127.0.0.1:%d" % fake.port,
                              image_cache="127.0.0.1:%d" % cache.port, listen_port=free_port(), admin_port=free_port(),
                              extra_listeners=[("l2only", free_port(), with_plugin(cache={"l1": None}))])
    listeners = doc["static_resources"]["listeners"]
    main = listeners[0]
    plain = copy.deepcopy(main)
    plain["name"] = "plain"
    plain["address"]["socket_address"]["port_value"] = free_port()
    hcm = plain["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["stat_prefix"] = "plain"
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.router"]
    rc = hcm["route_config"]
    rc["max_direct_response_body_size_bytes"] = 32 * MIB
    # On the filter listener: a route where the filter is switched off per route, the way a
    # sidecar keeps it off the application's own traffic (after the upstream route of contract
    # section 14, which stays first).
    render_envoy.add_route(main, {"match": {"prefix": "/off/"}, "route": {"cluster": "app", "prefix_rewrite": "/"},
                                  "typed_per_filter_config": {
                                      "envoy.filters.http.wasm": {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True},
                                      "envoy.filters.http.buffer": {"@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute", "disabled": True}}})
    # The plain listener has no filter, so no upstream route either: without the filter to
    # refuse the header, that route would let a client pick any cluster.
    rc["virtual_hosts"][0]["routes"] = [
        {"match": {"path": "/direct/%s" % name}, "direct_response": {"status": 200, "body": {"filename": path}},
         "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}]}
        for name, path in bodies.items()
    ] + [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}]
    listeners.append(plain)
    return doc


def record_entry_key(cache, file_url):
    """The cache key of the entry that holds an image URL's image: line 3 of its record in L2
    (`file:{token}`; docs/image-urls.md)."""
    token = urlsplit(file_url).path.rsplit("/", 1)[1].split("-")[0]
    status, _, record = http("GET", cache.url + "/v1/cache/file:" + token, headers=cache.headers())
    assert status == 200, status
    return record.decode().split("\n")[2]


def probe_bodies(work, fake, prompts):
    """The exact bytes an L1 hit answers for each prompt (`name`), and its image's own bytes
    (`image-name`), in files under `work`: the bodies of the direct_response baselines."""
    probe = Envoy(work, name="envoy-probe", fake_gemini="127.0.0.1:%d" % fake.port, plugin=with_plugin(cache=None, urls=None),
                  env_extra={"GEMINI_API_KEY": "bench"}, concurrency=1)
    bodies = {}
    try:
        for name, prompt in prompts.items():
            status, _, body = http("POST", probe.url() + "/v1/images/generations", json.dumps({"prompt": prompt}).encode(),
                                   {"content-type": "application/json"})
            assert status == 200, body[:200]
            bodies[name] = os.path.join(work, "answer-%s.json" % name)
            with open(bodies[name], "wb") as f:
                f.write(body)
            bodies["image-" + name] = os.path.join(work, "image-%s.png" % name)
            with open(bodies["image-" + name], "wb") as f:
                f.write(base64.b64decode(json.loads(body)["data"][0]["b64_json"]))
    finally:
        probe.stop()
    return bodies


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--concurrency", default="1,2")
    p.add_argument("--rss-requests", type=int, default=1000)
    p.add_argument("--only", help="run only the rows whose name holds this text (and skip memory)")
    p.add_argument("--cache-memory-bytes", type=int, help="the cache service's --memory-bytes (its default when not given)")
    p.add_argument("--coalesce-requests", type=int, default=32, help="identical misses at once in the coalescing run")
    a = p.parse_args()
    global ONLY
    ONLY = a.only
    need_wrk()
    work = tempfile.mkdtemp(prefix="bench-")
    fake = FakeGemini(work)
    cache = CacheService(work, max_bytes=2 * 1024 * MIB, memory_bytes=a.cache_memory_bytes)
    ct = {"content-type": "application/json"}
    prompts = {"2m": "bench two [fake:bytes=%d]" % (2 * MIB), "10m": "bench ten [fake:bytes=%d]" % (10 * MIB)}
    results = {}
    try:
        bodies = probe_bodies(work, fake, prompts)
        sizes = {k: os.path.getsize(v) for k, v in bodies.items()}

        for conc in [int(c) for c in a.concurrency.split(",")]:
            doc = bench_config(fake, cache, bodies, work)
            ports = {l["name"]: l["address"]["socket_address"]["port_value"] for l in doc["static_resources"]["listeners"]}
            cfg_path = render_envoy.write(doc, os.path.join(work, "bench-%d.yaml" % conc))
            admin = "http://127.0.0.1:%d" % doc["admin"]["address"]["socket_address"]["port_value"]
            global LOAD_CPUS
            split = conc == 1 and (os.cpu_count() or 1) >= 2 and not os.environ.get("NOPIN")
            LOAD_CPUS = {1} if split else None
            for helper in (fake.process.pid, cache.process.pid):
                pin(helper, {1} if split else set(range(os.cpu_count() or 1)))
            proc = Process("envoy", [envoy_bin(), "-c", cfg_path, "--concurrency", str(conc), "--disable-hot-restart",
                                     "--log-level", "error"], os.path.join(work, "bench-envoy-%d.log" % conc),
                           env=dict(os.environ, GEMINI_API_KEY="bench"),
                           ready=lambda: http("GET", admin + "/ready", timeout=1)[0] == 200)
            if split:
                pin(proc.pid, {0})
            url = lambda listener, path: "http://127.0.0.1:%d%s" % (ports[listener], path)
            d, c = a.duration, a.connections
            try:
                rows = []
                for name in ("2m", "10m"):
                    body = json.dumps({"prompt": prompts[name]})
                    http("POST", url("images", "/v1/images/generations"), body.encode(), ct)  # fills L1 and L2
                    time.sleep(0.3)
                    hit = lua_post("/v1/images/generations", body, ct, work)
                    rows.append(pair("L1 hit, %s image (%d bytes)" % (name.upper().replace("M", " MiB"), sizes[name]),
                                     "Envoy direct_response, same bytes",
                                     lambda: wrk(url("plain", "/direct/" + name), d, c),
                                     lambda: wrk(url("images", "/v1/images/generations"), d, c, hit)))
                body2 = json.dumps({"prompt": prompts["2m"]})
                l1 = lua_post("/v1/images/generations", body2, ct, work)
                hit2m = l1
                rows.append(pair("L2 hit, 2 MiB image", "L1 hit, same image",
                                 lambda: wrk(url("images", "/v1/images/generations"), d, c, l1),
                                 lambda: wrk(url("l2only", "/v1/images/generations"), d, c, l1)))
                gem = json.dumps({"contents": [{"role": "user", "parts": [{"text": prompts["2m"]}]}],
                                  "generationConfig": {"imageConfig": {"aspectRatio": "1:1"}}})
                plain_gem = lua_post("/v1beta/models/m:generateContent", gem, ct, work)
                miss = lua_post("/v1/images/generations", body2, dict(ct, **{"cache-control": "no-store"}), work)
                rows.append(pair("miss, 2 MiB image: call-out, translation, reply", "Envoy proxying the same fake-gemini answer",
                                 lambda: wrk(url("plain", "/v1beta/models/m:generateContent"), d, c, plain_gem),
                                 lambda: wrk(url("images", "/v1/images/generations"), d, c, miss)))
                # An edit with a 3 MB input image, answered with the same 2 MiB image as the
                # generation it is set against: the difference is reading the upload, checking
                # and hashing the image, and encoding it into the Gemini call.
                upload, upload_ct = multipart([("prompt", prompts["2m"])], [("image", "in.png", png_of_size(3 * 1000 * 1000))])
                upload_path = os.path.join(work, "edit-upload.bin")
                with open(upload_path, "wb") as f:
                    f.write(upload)
                edit_miss = lua_post_file("/v1/images/edits", upload_path, {"content-type": upload_ct, "cache-control": "no-store"}, work)
                edit_hit = lua_post_file("/v1/images/edits", upload_path, {"content-type": upload_ct}, work)
                http("POST", url("images", "/v1/images/edits"), upload, {"content-type": upload_ct})  # fills L1
                rows.append(pair("edit miss, 3 MB input image, 2 MiB answer", "generations miss, same answer",
                                 lambda: wrk(url("images", "/v1/images/generations"), d, c, miss),
                                 lambda: wrk(url("images", "/v1/images/edits"), d, c, edit_miss)))
                rows.append(pair("edit L1 hit, 3 MB input image, 2 MiB answer", "generations L1 hit, same answer",
                                 lambda: wrk(url("images", "/v1/images/generations"), d, c, l1),
                                 lambda: wrk(url("images", "/v1/images/edits"), d, c, edit_hit)))
                slow = {n: lua_post("/v1/images/generations", json.dumps({"prompt": "slow [fake:delay=200]", "n": n}),
                                    dict(ct, **{"cache-control": "no-store"}), work) for n in (1, 4)}
                rows.append(pair("miss, n=4, fake-gemini 200 ms per call", "miss, n=1, same delay",
                                 lambda: wrk(url("images", "/v1/images/generations"), max(d, 3), 1, slow[1], threads=1),
                                 lambda: wrk(url("images", "/v1/images/generations"), max(d, 3), 1, slow[4], threads=1)))
                rows.append(pair("pass-through: the filter in the chain, a path it does not handle", "no filter at all",
                                 lambda: wrk(url("plain", "/__fake/echo"), d, c),
                                 lambda: wrk(url("images", "/__fake/echo"), d, c)))
                rows.append(pair("pass-through: the filter switched off on the route (FilterConfig disabled)", "no filter at all",
                                 lambda: wrk(url("plain", "/__fake/echo"), d, c),
                                 lambda: wrk(url("images", "/off/__fake/echo"), d, c)))
                # Image URLs: a GET of a 2 MiB image against Envoy's direct_response of the same
                # bytes, from L1 (the decoded copy a worker keeps) and from L2 (the l2only
                # listener has no L1, so every GET reads the record and the entry from L2).
                file_url = {}
                for listener in ("images", "l2only"):
                    status, _, answer = http("POST", url(listener, "/v1/images/generations"),
                                             json.dumps({"prompt": prompts["2m"], "response_format": "url"}).encode(), ct)
                    assert status == 200, answer[:200]
                    file_url[listener] = url(listener, urlsplit(json.loads(answer)["data"][0]["url"]).path)
                time.sleep(0.3)  # the L2 writes go out on the root's next tick
                entry_key = record_entry_key(cache, file_url["l2only"])
                for label, conns in (("wrk, %d connections" % c, c), ("sequential, 1 connection", 1)):
                    t = 1 if conns == 1 else None
                    rows.append(pair("L1 hit, 2 MiB image (%s)" % label, "Envoy direct_response, same bytes",
                                     lambda: wrk(url("plain", "/direct/2m"), d, conns, threads=t),
                                     lambda: wrk(url("images", "/v1/images/generations"), d, conns, hit2m, threads=t)))
                    rows.append(pair("image URL GET from L1, 2 MiB image (%s)" % label, "Envoy direct_response, same image bytes",
                                     lambda: wrk(url("plain", "/direct/image-2m"), d, conns, threads=t),
                                     lambda: wrk(file_url["images"], d, conns, threads=t)))
                    rows.append(pair("image URL GET from L2, 2 MiB image (%s)" % label, "image URL GET from L1, same image",
                                     lambda: wrk(file_url["images"], d, conns, threads=t),
                                     lambda: wrk(file_url["l2only"], d, conns, threads=t)))
                    # The floor under any GET from L2: the cache service alone handing a client
                    # the entry such a GET reads (no Envoy, no filter).
                    rows.append(pair("cache service alone: GET of that image's 2.8 MB entry (%s)" % label,
                                     "image URL GET from L1, same image",
                                     lambda: wrk(file_url["images"], d, conns, threads=t),
                                     lambda: wrk(cache.url + "/v1/cache/" + entry_key, d, conns, threads=t)))
                results[conc] = [r for r in rows if r]
            finally:
                proc.stop()

        coalescing = None if ONLY and ONLY not in "coalescing" else coalescing_run(work, fake, a.coalesce_requests)

        # Resident memory after N requests: no cache writes, then L1 filled with 2 MiB entries.
        rss = {}
        for label, patch, distinct in [] if ONLY else [("1,000 requests, L1 empty (no-store)", {}, False),
                                       ("1,000 requests, L1 full (64 x 2 MiB entries)", {}, True)]:
            e = Envoy(work, name="envoy-rss", fake_gemini="127.0.0.1:%d" % fake.port, image_cache="127.0.0.1:%d" % cache.port,
                      env_extra={"GEMINI_API_KEY": "bench"}, concurrency=2)
            try:
                start = rss_kb(e.process.pid)
                for i in range(a.rss_requests):
                    prompt = "rss %d %s" % (i if distinct else 0, "[fake:bytes=%d]" % (2 * MIB))
                    h = ct if distinct else dict(ct, **{"cache-control": "no-store"})
                    http("POST", e.url() + "/v1/images/generations", json.dumps({"prompt": prompt}).encode(), h)
                rss[label] = (start, rss_kb(e.process.pid))
            finally:
                e.stop()
    finally:
        cache.stop()
        fake.stop()

    print_report(results, rss, coalescing, os.path.getsize(WASM), a)


def coalescing_run(work, fake, count, delay_ms=1000):
    """`count` identical misses at once, fake-gemini answering each call after `delay_ms`, on an
    Envoy with two workers: with coalescing (the shipped default) against the same burst with
    `cache.coalesce: false`. Gemini calls, and the latency of the first answer (the leader's)
    and of the others (the waiting ones)."""
    from concurrent.futures import ThreadPoolExecutor
    out = {}
    for label, coalesce in (("coalesce off", False), ("coalesce on", True)):
        e = Envoy(work, name="envoy-coalesce", fake_gemini="127.0.0.1:%d" % fake.port,
                  plugin=with_plugin(cache={"coalesce": coalesce, "l2": None}, urls=None),
                  env_extra={"GEMINI_API_KEY": "bench"}, concurrency=2)
        try:
            prompt = "burst %s %d [fake:delay=%d]" % (label, time.time_ns(), delay_ms)
            body = json.dumps({"prompt": prompt}).encode()

            def one(_):
                started = time.monotonic()
                status, headers, _ = http("POST", e.url() + "/v1/images/generations", body,
                                          {"content-type": "application/json"}, timeout=60)
                return status, headers.get("x-image-cache"), (time.monotonic() - started) * 1000

            with ThreadPoolExecutor(count) as pool:
                answers = list(pool.map(one, range(count)))
            times = sorted(t for _, _, t in answers)
            # One miss at a time, each a new prompt, fake-gemini answering at once: what leading
            # costs (the root sends the calls, on a tick asked for at once) with nobody waiting.
            singles = []
            for i in range(200):
                started = time.monotonic()
                http("POST", e.url() + "/v1/images/generations",
                     json.dumps({"prompt": "single %s %d %d" % (label, time.time_ns(), i)}).encode(),
                     {"content-type": "application/json"})
                singles.append((time.monotonic() - started) * 1000)
            singles.sort()
            out[label] = {
                "single_p50": singles[len(singles) // 2], "single_p99": singles[int(len(singles) * 0.99)],
                "calls": len(fake.requests(prompt)),
                "ok": sum(1 for s, _, _ in answers if s == 200),
                "first": times[0], "p50": times[len(times) // 2], "max": times[-1],
                "caches": sorted({c for _, c, _ in answers if c}),
            }
        finally:
            e.stop()
    return {"count": count, "delay_ms": delay_ms, "runs": out}


def print_report(results, rss, coalescing, wasm_size, a):
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except OSError:
        pass
    print("machine: %d cores, %s; wrk %s s per run, %d connections, %d rounds alternating, medians" % (
        os.cpu_count(), cpu, a.duration, a.connections, ROUNDS))
    print("at concurrency 1, Envoy is pinned to core 0 and wrk, fake-gemini and cache-service to core 1")
    for conc, rows in results.items():
        print("\nEnvoy --concurrency %d" % conc)
        print("| what | baseline | p50 ms (base -> filter) | p99 ms (base -> filter) | req/s (base -> filter) | p50 ratio | p99 ratio | throughput cost |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            b, c = r["b"], r["c"]
            print("| %s | %s | %.2f -> %.2f | %.2f -> %.2f | %.0f -> %.0f | %.2fx | %.2fx | %.2fx |" % (
                r["name"], r["baseline"], b["p50"], c["p50"], b["p99"], c["p99"], b["rps"], c["rps"],
                r["ratio_p50"], r["ratio_p99"], r["ratio_rps"]))
    print("\n| Envoy resident memory (concurrency 2) | start | after |")
    print("|---|---|---|")
    for label, (start, end) in rss.items():
        print("| %s | %.1f MiB | %.1f MiB |" % (label, start / 1024, end / 1024))
    if coalescing:
        print("\n%d identical misses at once, fake-gemini answering after %d ms, Envoy --concurrency 2" % (
            coalescing["count"], coalescing["delay_ms"]))
        print("| run | Gemini calls | 200s | first answer ms | p50 ms | last ms | x-image-cache |")
        print("|---|---|---|---|---|---|---|")
        for label, r in coalescing["runs"].items():
            print("| %s | %d | %d | %.0f | %.0f | %.0f | %s |" % (
                label, r["calls"], r["ok"], r["first"], r["p50"], r["max"], ", ".join(r["caches"])))
        on, off = coalescing["runs"]["coalesce on"], coalescing["runs"]["coalesce off"]
        print("| one miss at a time (200, new prompts, no delay) | p50 ms | p99 ms |")
        print("|---|---|---|")
        for label, r in coalescing["runs"].items():
            print("| %s | %.2f | %.2f |" % (label, r["single_p50"], r["single_p99"]))
        print("leading a flight alone: p50 %.2fx, p99 %.2fx of a miss without coalescing" % (
            coalescing["runs"]["coalesce on"]["single_p50"] / coalescing["runs"]["coalesce off"]["single_p50"],
            coalescing["runs"]["coalesce on"]["single_p99"] / coalescing["runs"]["coalesce off"]["single_p99"]))
        print("coalescing: Gemini calls %.3fx of the baseline; waiting requests' p50 %.2fx and last %.2fx of the "
              "baseline's; the last waiting answer %.0f ms after the first" % (
                  on["calls"] / max(off["calls"], 1), on["p50"] / off["p50"], on["max"] / off["max"], on["max"] - on["first"]))
    print("\nwasm file: %d bytes" % wasm_size)


if __name__ == "__main__":
    main()
