"""Coalescing (contract section 7, docs/cache.md "Coalescing"), end to end in a real Envoy with
two workers.

While a miss for a cache key is in flight in this Envoy, identical requests on either worker wait
for it instead of calling Gemini: the first leads (calls Gemini), the others follow and get the
same answer with `x-image-cache: coalesced`, or the same error. A follower's wait is bounded by
its `gemini.timeout_ms`; the generation goes on when the leader's client leaves while others
wait. Requests that would send Gemini anything else, that skip the lookup (`no-cache`,
`no-store`), that stream, or whose profile does not cache never wait on another; private
profiles coalesce only within themselves.

Every request is its own connection (urllib), so the requests of a test spread over both
workers. fake-gemini's `[fake:delay=MS]` keeps the leader's call in flight while the others
arrive. The assertions are about counts and orderings, with time bounds only where the rule is a
bound, and then with wide margins.

Leases live in 1024 slots chosen by the key's hash, and a finished lease stays in its slot for
1 s so that its followers see the outcome. A key whose slot holds another key's live lease does
not coalesce at all (documented: its requests call Gemini alone). On this shared Envoy the
leases of the tests just before can hold a test's slot, so a round in which nobody waited and
every request called Gemini is run again with another prompt (`until_a_flight`); a round in
which some requests waited is judged as it is.

Run: .venv/bin/python -m pytest tests/test_coalescing.py -q
"""
import base64
import hashlib
import json
import re
import socket
import threading
import time
import uuid

import pytest

from conftest import API_KEY, assert_no_secrets, log_lines, log_of, unique, worker_of
from harness import Envoy, free_port, http, post_image, wait_for, with_plugin


class Answer:
    def __init__(self, status, headers, body, rid, started, ended):
        self.status, self.headers, self.body, self.rid = status, headers, body, rid
        self.started, self.ended = started, ended

    @property
    def elapsed(self):
        return self.ended - self.started

    @property
    def json(self):
        return json.loads(self.body)

    @property
    def cache(self):
        return self.headers.get("x-image-cache")

    def images(self):
        return [d["b64_json"] for d in self.json["data"]]

    def __repr__(self):
        return "<%s %s %.2fs %s>" % (self.status, self.cache, self.elapsed, self.body[:200])


def call(e, body, listener="images", headers=None, timeout=30):
    """POSTs a generation on its own connection, with a fresh x-request-id."""
    rid = "rid-" + uuid.uuid4().hex
    h = {"x-request-id": rid}
    h.update(headers or {})
    started = time.monotonic()
    status, hdrs, raw = post_image(e, body, listener=listener, headers=h, timeout=timeout)
    return Answer(status, hdrs, raw, rid, started, time.monotonic())


def together(e, specs):
    """Runs calls concurrently: each spec is a dict of `call` arguments plus an optional `at`
    (seconds after a common start). Returns the answers in spec order."""
    out = [None] * len(specs)
    errors = []
    barrier = threading.Barrier(len(specs))

    def run(i, spec):
        spec = dict(spec)
        at = spec.pop("at", 0)
        try:
            barrier.wait()
            if at:
                time.sleep(at)
            out[i] = call(e, **spec)
        except Exception as ex:  # reported below, with the test's own assertion
            errors.append((i, ex))

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(specs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    return out


def gemini_calls(fake, needle):
    return len(fake.recorded(contains=needle))


def until_a_flight(fake, attempt, tries=3):
    """Runs `attempt(i)` -> (prompt, answers, alone_calls) until a round is not one where the key
    never got a lease: nobody `coalesced` and Gemini got `alone_calls` calls, what every request
    calling on its own makes (its slot held another key's lease; see the module's docstring).
    Returns (prompt, answers) of the first other round; a failure after `tries` such rounds."""
    for i in range(tries):
        prompt, answers, alone_calls = attempt(i)
        if any(a.cache == "coalesced" for a in answers) or gemini_calls(fake, prompt) != alone_calls:
            return prompt, answers
        print("\nround %d: nobody waited and every request called Gemini (slot taken?): again" % i)
    pytest.fail("in %d rounds with fresh prompts, identical requests never waited for one another" % tries)


def metric(e, name):
    return e.stats().get("wasmcustom.gemini_image." + name, 0)


def wait_metric(e, name, expected):
    """The counter once it reaches `expected` (counters are written as requests end), else its
    last value."""
    wait_for(lambda: metric(e, name) >= expected, timeout=5)
    return metric(e, name)





def prompt_hash(prompt):
    """What the filter logs and answers as `x-image-prompt-hash`: SHA-256 of the prompt, 16 hex."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def timings(label, answers):
    """Who answered when, in seconds from the first start (shown with -s)."""
    t0 = min(a.started for a in answers)
    print("\n%s: %s" % (label, ", ".join("%s %s@%.2f-%.2fs" % (a.status, a.cache, a.started - t0, a.ended - t0)
                                          for a in answers)))


def one_miss(answers):
    """The leader (the one `miss`) and the followers (`coalesced`), checked to be exactly that."""
    caches = sorted(a.cache for a in answers)
    assert caches == ["coalesced"] * (len(answers) - 1) + ["miss"], answers
    (leader,) = [a for a in answers if a.cache == "miss"]
    return leader, [a for a in answers if a.cache == "coalesced"]


def eight_identical(e, label, n=1, delay_ms=1500):
    """An attempt for `until_a_flight`: eight identical requests at once."""
    def attempt(i):
        prompt = unique("[fake:delay=%d] %s %d" % (delay_ms, label, i))
        answers = together(e, [{"body": {"prompt": prompt, "n": n}}] * 8)
        timings("8 identical, %s, n=%d" % (label, n), answers)
        return prompt, answers, 8 * n
    return attempt


# --- one generation for many identical requests -------------------------------------------

@pytest.mark.parametrize("n", [1, 2])
def test_identical_concurrent_requests_make_one_generation(envoy, fake, n):
    prompt, answers = until_a_flight(fake, eight_identical(envoy, "one generation", n))
    assert all(a.status == 200 for a in answers), answers
    assert gemini_calls(fake, prompt) == n, "one generation, n Gemini calls in all: %r" % [
        (a.cache, worker_of(envoy, a.rid)) for a in answers]
    leader, followers = one_miss(answers)
    images = leader.images()
    assert len(images) == n
    for a in followers:
        assert a.images() == images, "every follower gets the leader's images, in order"
        assert a.headers["x-image-prompt-hash"] == leader.headers["x-image-prompt-hash"] == prompt_hash(prompt)
        assert a.json["usage"] == leader.json["usage"]
    # The answer is stored: the next identical request is a hit, still one generation.
    again = call(envoy, {"prompt": prompt, "n": n})
    assert (again.status, again.cache) == (200, "hit-l1") and again.images() == images
    assert gemini_calls(fake, prompt) == n


def test_followers_on_the_other_worker_wait_too(envoy, fake):
    """Followers on the leader's worker and on the other one (each is a VM of its own, sharing
    only Envoy's shared data) all wait. Connections land on a worker by the kernel's choice, so
    a round whose eight requests all landed on one worker is run again."""
    for attempt in range(5):
        prompt, answers = until_a_flight(fake, eight_identical(envoy, "two workers %d" % attempt, delay_ms=1000))
        assert all(a.status == 200 for a in answers), answers
        assert gemini_calls(fake, prompt) == 1
        leader, followers = one_miss(answers)
        home = worker_of(envoy, leader.rid)
        workers = [worker_of(envoy, a.rid) for a in followers]
        if any(w != home for w in workers):
            print("\nworkers: leader %s, followers %s" % (home, workers))
            return
    pytest.fail("eight requests never spread over both workers in 5 rounds")


def test_a_follower_may_ask_for_urls(envoy, fake):
    """A follower's response_format is its own: it looks the leader's answer up in its format."""
    def attempt(i):
        prompt = unique("[fake:delay=1000] follower urls %d" % i)
        answers = together(envoy, [{"body": {"prompt": prompt}},
                                   {"body": {"prompt": prompt, "response_format": "url"}, "at": 0.3}])
        return prompt, answers, 2

    prompt, (leader, follower) = until_a_flight(fake, attempt)
    assert (leader.status, leader.cache, follower.status, follower.cache) == (200, "miss", 200, "coalesced"), \
        (leader, follower)
    (named,) = follower.json["data"]
    status, _, image = http("GET", named["url"])
    assert (status, image) == (200, base64.b64decode(leader.images()[0]))
    assert gemini_calls(fake, prompt) == 1


def test_followers_are_counted_logged_and_free(envoy, fake):
    """Followers count in `coalesced` (not in cache_hits or cache_misses), cost nothing and save
    the price of their images (gemini-3-pro-image at 1K: 0.134 by the default price table)."""
    names = ("coalesced", "cache_misses", "cache_hits.tier.l1", "cache_hits.tier.l2")
    before = {}
    eight = eight_identical(envoy, "metrics")

    def attempt(i):
        before.update({k: metric(envoy, k) for k in names})  # this round's own
        return eight(i)

    prompt, answers = until_a_flight(fake, attempt)
    assert all(a.status == 200 for a in answers), answers
    leader, followers = one_miss(answers)
    assert gemini_calls(fake, prompt) == 1
    assert wait_metric(envoy, "coalesced", before["coalesced"] + 7) == before["coalesced"] + 7
    after = {k: metric(envoy, k) for k in names}
    assert after == dict(before, coalesced=before["coalesced"] + 7, cache_misses=before["cache_misses"] + 1), after
    line = log_of(envoy, leader.rid)
    assert (line["status"], line["cache"], line["prompt_hash"]) == (200, "miss", prompt_hash(prompt))
    assert line["cost_usd"] == pytest.approx(0.134, abs=1e-9) and line["saved_usd"] == 0
    assert float(leader.headers["x-image-cost-usd"]) == pytest.approx(0.134, abs=1e-9)
    for a in followers:
        line = log_of(envoy, a.rid)
        assert (line["status"], line["cache"], line["prompt_hash"]) == (200, "coalesced", prompt_hash(prompt))
        assert line["cost_usd"] == 0, line
        assert line["saved_usd"] == pytest.approx(0.134, abs=1e-9), line
        assert float(a.headers["x-image-cost-usd"]) == 0


# --- what never coalesces --------------------------------------------------------------------

def test_requests_that_differ_each_call_gemini(envoy, fake):
    prompt = unique("[fake:delay=1500] differ")
    other = unique("[fake:delay=1500] differ other")
    specs = [
        {"body": {"prompt": prompt}},
        {"body": {"prompt": prompt, "size": "1792x1024"}, "at": 0.2},
        {"body": {"prompt": prompt, "n": 2}, "at": 0.2},
        {"body": {"prompt": prompt, "quality": "medium"}, "at": 0.2},
        {"body": {"prompt": other}, "at": 0.2},
    ]
    answers = together(envoy, specs)
    timings("5 that differ", answers)
    assert [(a.status, a.cache) for a in answers] == [(200, "miss")] * 5, answers
    assert gemini_calls(fake, prompt) == 1 + 1 + 2 + 1
    assert gemini_calls(fake, other) == 1


@pytest.mark.parametrize("directive", ["no-store", "no-cache"])
def test_cache_control_requests_never_wait(envoy, fake, directive):
    prompt = unique("[fake:delay=1500] directive %s" % directive)
    body = {"prompt": prompt}
    specs = [{"body": body}] + [{"body": body, "headers": {"cache-control": directive}, "at": 0.3}] * 2
    answers = together(envoy, specs)
    timings(directive, answers)
    assert all(a.status == 200 for a in answers), answers
    assert answers[0].cache == "miss"
    expected = "bypass" if directive == "no-store" else "miss"
    assert [a.cache for a in answers[1:]] == [expected] * 2, answers
    assert gemini_calls(fake, prompt) == 3, "each %s request called Gemini itself" % directive


def test_streamed_requests_never_wait(envoy, fake):
    prompt = unique("[fake:delay=1500] streamed")
    specs = [{"body": {"prompt": prompt}}] + [{"body": {"prompt": prompt, "stream": True}, "at": 0.3}] * 2
    answers = together(envoy, specs)
    timings("stream", answers)
    assert all(a.status == 200 for a in answers), answers
    assert answers[0].cache == "miss"
    for a in answers[1:]:
        assert a.headers["content-type"].startswith("text/event-stream"), a
        assert a.cache != "coalesced", a
        assert b"image_generation.completed" in a.body
    calls = fake.recorded(contains=prompt)
    assert len(calls) == 3
    assert sorted(c["api_method"] for c in calls) == ["generateContent", "streamGenerateContent", "streamGenerateContent"]


# --- errors are shared with those who waited ----------------------------------------------------

@pytest.mark.parametrize("markers,status,code,retry_after", [
    ("[fake:delay=1000][fake:status=503]", 503, "IMG_SERVICE_UNAVAILABLE", None),
    ("[fake:delay=1000][fake:status=429][fake:retry=5]", 429, "IMG_QUOTA_EXHAUSTED", "5"),
])
def test_a_failing_generation_gives_every_follower_the_same_error(envoy, fake, markers, status, code, retry_after):
    def attempt(i):
        prompt = unique("%s shared error %d" % (markers, i))
        body = {"prompt": prompt}
        answers = together(envoy, [{"body": body}] + [{"body": body, "at": 0.3}] * 4)
        timings(code, answers)
        return prompt, answers, 5

    prompt, answers = until_a_flight(fake, attempt)
    assert gemini_calls(fake, prompt) == 1
    leader = answers[0]
    assert leader.cache == "miss", answers
    for a in answers:
        assert a.status == status, answers
        assert a.json["error"]["code"] == code
        assert a.body == leader.body, "the same error body"
        assert a.headers.get("retry-after") == retry_after, a.headers
        assert a.headers["x-image-prompt-hash"] == prompt_hash(prompt)
    for a in answers[1:]:
        assert a.cache == "coalesced", a
        line = log_of(envoy, a.rid)
        assert (line["status"], line["code"], line["cache"]) == (status, code, "coalesced"), line
        assert line["cost_usd"] == 0 and line["saved_usd"] == 0, line
    # The error is shared only with those who waited: a later identical request tries again.
    later = call(envoy, {"prompt": prompt})
    assert (later.status, later.cache) == (status, "miss"), later
    assert gemini_calls(fake, prompt) == 2


# --- clients that leave -------------------------------------------------------------------------

def raw_post(e, body, rid, listener="images"):
    """Sends a generation on a raw socket and returns the socket, not waiting for an answer."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", e.ports[listener]), timeout=5)
    head = ("POST /v1/images/generations HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            "content-length: %d\r\nx-request-id: %s\r\n\r\n" % (len(data), rid)).encode()
    s.sendall(head + data)
    return s


def test_the_generation_goes_on_when_the_leaders_client_leaves(envoy, fake):
    """The leader's client closes its connection while Gemini works: the three identical requests
    waiting for it get the image, Gemini was called once, the answer is stored, and the leader's
    own log line says 499 client_closed."""
    state = {}

    def attempt(i):
        prompt = unique("[fake:delay=2000] leader leaves %d" % i)
        body = {"prompt": prompt}
        rid = "rid-" + uuid.uuid4().hex
        started = time.monotonic()
        sock = raw_post(envoy, body, rid)
        threads, out = [], []
        try:
            # The leader's call is under way before the others come.
            assert wait_for(lambda: gemini_calls(fake, prompt) == 1, timeout=1.5), "the first request called Gemini"
            threads = [threading.Thread(target=lambda: out.append(call(envoy, body))) for _ in range(3)]
            for t in threads:
                t.start()
            time.sleep(0.4)  # they have joined (each is a few ms of work)
            sock.settimeout(0.05)
            try:
                early = sock.recv(1)
            except socket.timeout:
                early = None
            assert early is None, "no answer yet: the generation takes 2 s"
        finally:
            sock.close()
        closed_at = time.monotonic() - started
        assert closed_at < 1.5, "closed while the generation was in flight (%.2fs)" % closed_at
        for t in threads:
            t.join(30)
        timings("leader left at %.2fs" % closed_at, out)
        state.update(rid=rid)
        return prompt, out, 4

    prompt, out = until_a_flight(fake, attempt)
    assert len(out) == 3
    for a in out:
        assert (a.status, a.cache) == (200, "coalesced"), out
    assert len({tuple(a.images()) for a in out}) == 1
    assert gemini_calls(fake, prompt) == 1, "exactly one generation"
    # The answer was stored by the leader that had no client any more.
    later = call(envoy, {"prompt": prompt})
    assert (later.status, later.cache) == (200, "hit-l1"), later
    assert later.images() == out[0].images()
    assert gemini_calls(fake, prompt) == 1
    line = log_of(envoy, state["rid"])
    assert (line["status"], line["outcome"], line["cache"]) == (499, "client_closed", "miss"), line
    assert line["prompt_hash"] == prompt_hash(prompt)


def test_a_follower_that_leaves_changes_nothing_for_the_others(envoy, fake):
    state = {}

    def attempt(i):
        prompt = unique("[fake:delay=1500] follower leaves %d" % i)
        body = {"prompt": prompt}
        rid = "rid-" + uuid.uuid4().hex
        out = []
        lead = threading.Thread(target=lambda: out.append(call(envoy, body)))
        lead.start()
        assert wait_for(lambda: gemini_calls(fake, prompt) == 1, timeout=1.0), "the leader called Gemini"
        sock = raw_post(envoy, body, rid)
        others = [threading.Thread(target=lambda: out.append(call(envoy, body))) for _ in range(2)]
        for t in others:
            t.start()
        time.sleep(0.3)
        sock.close()
        for t in [lead] + others:
            t.join(30)
        timings("a follower left", out)
        state.update(rid=rid)
        return prompt, out, 4

    prompt, out = until_a_flight(fake, attempt)
    leader, followers = one_miss(out)
    assert leader.status == 200 and all(a.status == 200 for a in followers), out
    assert gemini_calls(fake, prompt) == 1
    line = log_of(envoy, state["rid"])
    assert (line["status"], line["outcome"]) == (499, "client_closed"), line


def test_a_partial_answer_is_not_shared_and_each_follower_calls_gemini_at_once(envoy, fake):
    """n=2 whose first call fails: the leader answers what it has (200, x-images-failed: 1),
    which L1 does not hold, so its lease says `Uncached` and each follower, once it has heard
    so, calls Gemini on its own (at once, not one flight after another): none gets the partial
    answer, none counts as coalesced or as a lost leader. Gemini takes 1.5 s: followers that
    waited answer about 1.5 s after the leader, ones that never waited (the slot was taken)
    0.3 s after it."""
    names = ("coalesce_leaders_lost", "coalesced")
    for i in range(3):
        before = {k: metric(envoy, k) for k in names}
        prompt = unique("[fake:delay=1500][fake:fail-first=1] partial %d" % i)
        body = {"prompt": prompt, "n": 2}
        answers = together(envoy, [{"body": body}] + [{"body": body, "at": 0.3}] * 3)
        timings("partial leader", answers)
        leader, rest = answers[0], answers[1:]
        if all(a.ended - leader.ended < 0.9 for a in rest) and all(a.cache == "miss" for a in rest):
            print("\nround %d: nobody waited (slot taken?): again" % i)
            continue
        break
    else:
        pytest.fail("identical requests never waited for a leader in 3 rounds")
    assert (leader.status, leader.cache, leader.headers.get("x-images-failed")) == (200, "miss", "1"), leader
    assert len(leader.images()) == 1
    for a in rest:
        assert (a.status, a.cache) == (200, "miss") and "x-images-failed" not in a.headers, rest
        assert len(a.images()) == 2
        assert a.ended - leader.ended > 0.9, "it called Gemini after the leader's outcome: %r" % answers
    assert gemini_calls(fake, prompt) == 2 + 3 * 2, "the leader's two calls, then two of each follower's own"
    assert {k: metric(envoy, k) for k in names} == before


# --- waiting is bounded ---------------------------------------------------------------------

def test_followers_never_wait_past_the_timeout(envoy, fake):
    """The `slow` listener's gemini.timeout_ms is 1500: the leader gets 504 at about 1.5 s, and
    the followers its error (or their own 504), never later than their own timeout."""
    def attempt(i):
        prompt = unique("[fake:delay=4000] bounded %d" % i)
        body = {"prompt": prompt}
        specs = [{"body": body, "listener": "slow"}] + [{"body": body, "listener": "slow", "at": 0.3}] * 3
        t0 = time.monotonic()
        answers = together(envoy, specs)
        total = time.monotonic() - t0
        timings("slow listener", answers)
        assert total < 4.0, "every request returned within 4 s (%.2fs): %r" % (total, answers)
        for a in answers:
            assert a.status == 504 and a.json["error"]["code"] == "IMG_NETWORK_ERROR", a
            assert a.elapsed < 1.5 + 1.5, "within its own timeout and a margin: %r" % a
        return prompt, answers, 4

    before = metric(envoy, "coalesced")
    prompt, answers = until_a_flight(fake, attempt)
    assert answers[0].cache == "miss"
    assert answers[0].elapsed > 1.0, "the leader waited for Gemini until its timeout"
    assert gemini_calls(fake, prompt) == 1
    coalesced = [a for a in answers[1:] if a.cache == "coalesced"]
    # Followers that got the leader's error carry its very body.
    for a in coalesced:
        assert a.body == answers[0].body
    assert wait_metric(envoy, "coalesced", before + len(coalesced)) >= before + len(coalesced)


def test_a_followers_own_timeout_bounds_its_wait_on_a_slower_leader(envoy, fake):
    """The leader on the main listener (timeout 180 s) takes 3.5 s; an identical request on the
    `slow` listener (1500 ms; the same VM, so the same leases) follows it and gives up at its own
    timeout, without calling Gemini."""
    before = {}

    def attempt(i):
        before.update(timed_out=metric(envoy, "coalesce_waits_timed_out"))
        prompt = unique("[fake:delay=3500] slower leader %d" % i)
        body = {"prompt": prompt}
        answers = together(envoy, [{"body": body}, {"body": body, "listener": "slow", "at": 0.3}])
        timings("leader on images, follower on slow", answers)
        return prompt, answers, 2

    prompt, (leader, follower) = until_a_flight(fake, attempt)
    assert (leader.status, leader.cache) == (200, "miss"), leader
    assert follower.status == 504 and follower.json["error"]["code"] == "IMG_NETWORK_ERROR", follower
    assert 1.0 < follower.elapsed < 1.5 + 1.5, follower
    assert follower.ended < leader.ended, "the follower did not wait for the leader's answer"
    assert gemini_calls(fake, prompt) == 1, "the follower waited rather than calling Gemini"
    assert wait_metric(envoy, "coalesce_waits_timed_out", before["timed_out"] + 1) == before["timed_out"] + 1
    line = log_of(envoy, follower.rid)
    assert (line["status"], line["code"]) == (504, "IMG_NETWORK_ERROR"), line


# --- profiles ----------------------------------------------------------------------------------

PROFILE_LISTENERS = {"pa": "p-a", "pb": "p-b", "sa": "s-a", "off": "off"}


@pytest.fixture(scope="module")
def profiled(workdir, fake):
    """An Envoy whose listeners are in profiles by route metadata: `pa` and `pb` private, `sa`
    shared, `off` uncached; `images` is `default` (shared). L1 only."""
    cfg = with_plugin(cache={"l2": None}, profiles={
        "p-a": {"cache": "private"}, "p-b": {"cache": "private"}, "s-a": {"cache": "shared"}, "off": {"cache": "off"}})

    def hook(doc):
        for listener in doc["static_resources"]["listeners"]:
            profile = PROFILE_LISTENERS.get(listener["name"])
            if profile is None:
                continue
            hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
            for vhost in hcm["route_config"]["virtual_hosts"]:
                for route in vhost["routes"]:
                    route["metadata"] = {"filter_metadata": {"gemini_image": {"profile": profile}}}

    extra = [(name, free_port(), cfg) for name in PROFILE_LISTENERS]
    e = Envoy(workdir, name="envoy-coalescing-profiles", fake_gemini="127.0.0.1:%d" % fake.port,
              app="127.0.0.1:%d" % fake.port, plugin=cfg, extra_listeners=extra, doc_hook=hook,
              env_extra={"GEMINI_API_KEY": API_KEY})
    yield e
    e.stop()
    log = e.log()
    assert "panicked" not in log and "wasm trap" not in log.lower(), "the wasm VM panicked:\n" + log[-3000:]
    assert_no_secrets(log, "Envoy")


def test_private_profiles_coalesce_only_within_themselves(profiled, fake):
    """Two requests of private profile p-a, two of private p-b and one of shared s-a, identical
    otherwise: three keys, three generations, each private pair sharing its own."""
    e = profiled
    specs = [{"listener": "pa"}, {"listener": "pa", "at": 0.3}, {"listener": "pb", "at": 0.3},
             {"listener": "pb", "at": 0.3}, {"listener": "sa", "at": 0.3}]
    for i in range(3):
        prompt = unique("[fake:delay=1500] private %d" % i)
        answers = together(e, [dict(s, body={"prompt": prompt}) for s in specs])
        timings("private profiles", answers)
        pairs = {listener: [a for a, s in zip(answers, specs) if s["listener"] == listener] for listener in ("pa", "pb")}
        if all(any(a.cache == "coalesced" for a in pair) for pair in pairs.values()):
            break
        # Three keys in flight at once on 1024 slots: one may have found another's lease there.
        print("\nround %d: a pair did not coalesce (slot taken?): again" % i)
    else:
        pytest.fail("the private pairs never coalesced in 3 rounds")
    assert all(a.status == 200 for a in answers), answers
    for pair in pairs.values():
        one_miss(pair)
    assert answers[4].cache == "miss", "a shared profile waits for no private flight"
    assert gemini_calls(fake, prompt) == 3
    for a, s in zip(answers, specs):
        assert log_of(e, a.rid)["profile"] == PROFILE_LISTENERS[s["listener"]]


def test_a_profile_without_cache_never_coalesces(profiled, fake):
    e = profiled
    prompt = unique("[fake:delay=1500] uncached profile")
    body = {"prompt": prompt}
    answers = together(e, [{"body": body, "listener": "off"}] + [{"body": body, "listener": "off", "at": 0.3}] * 2)
    assert [(a.status, a.cache) for a in answers] == [(200, "miss")] * 3, answers
    assert gemini_calls(fake, prompt) == 3
