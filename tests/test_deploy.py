"""The deployment kits (issues 6, 10, 11): every shipped Envoy config is accepted by a real
Envoy; every kit (envoy/*.yaml, envoy/istio/, envoy/envoy-gateway/) carries the one plugin
configuration, the same filter chain and the same failure policy, differing only where
docs/configuration.md ("The shipped kits") says; every kit sends the three Images API paths
(generations, edits, variations) to the filter, with buffer limits above the largest body the
filter accepts (contract sections 9 and 14); no route of any kit reaches the clusters the
filter calls, or the Vertex AI and metadata clusters that the kits running in Google Cloud
carry for a Vertex backend with workload identity (contract sections 11 and 14); every kit
sends the image URLs (/v1/images/files/, contract section 10) to the filter too, behind the
same OpenAI-shaped 404 in every Envoy config; every Envoy config lets the filter hold request
headers (`allow_on_headers_stop_iteration`) and starts every virtual host with the upstream route
of contract section 14, for the streamed requests the filter rewrites (section 12), while the
Istio and Envoy Gateway kits, which cannot set that flag, turn streaming off; and the compose and
Kubernetes files name files, ports and clusters that exist."""
import copy
import glob
import json
import os
import re
import subprocess

import pytest
import yaml

from harness import ROOT, WASM, envoy_bin, http, render_envoy, shipped_plugin, tool, with_plugin

ENVOY_DIR = os.path.join(ROOT, "envoy")
ENVOY_CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ENVOY_DIR, "*.yaml"))
                       if not p.endswith("docker-compose.yaml"))
FILTERS = ["envoy.filters.http.wasm", "envoy.filters.http.buffer", "envoy.filters.http.router"]
# Filters a kit puts before the wasm filter, and nothing else: envoy/profiles.yaml's
# authentication, which names the policy profile (contract section 15, docs/policy.md).
FILTERS_BEFORE = {"profiles.yaml": ["envoy.filters.http.jwt_authn"]}
# Contract section 14: the one route allowed to pick a cluster from a header, for the requests
# the filter sends upstream itself; the filter refuses a client request that carries it.
UPSTREAM_HEADER = "x-gemini-image-filter-upstream"
# Contract section 12: streaming needs Envoy to let the filter hold request headers while it
# reads the body (the wasm filter's allow_on_headers_stop_iteration). The Istio and Envoy
# Gateway kits install the filter through APIs that cannot set that flag, so they turn streaming
# off in the plugin configuration; every Envoy config sets the flag and keeps streaming on.
STREAMING_OFF = {"streaming": {"enabled": False}}
NO_STOP_ITERATION_KITS = ["istio", "envoy-gateway"]
# Contract sections 1 and 9: the paths the filter answers (POST only; 405 for other methods).
IMAGE_PATHS = ["/v1/images/generations", "/v1/images/edits", "/v1/images/variations"]
# Paths next to them that are not the Images API and must not meet the image route.
NOT_IMAGE_PATHS = ["/v1/images/generations/extra", "/v1/images/edit", "/v1/images/editsx",
                   "/v1/images/variations/x", "/v1/images", "/v1/images/", "/V1/images/edits",
                   "/x/v1/images/generations"]
# Contract section 10: the image URLs the filter serves itself (GET and HEAD; 405 for other
# methods). Every kit has a route for them, before any catch-all, with the filter (and the
# buffer, as on the image route) on; what reaches the router there is a 404 IMG_IMAGE_NOT_FOUND.
FILES_PREFIX = "/v1/images/files/"
FILE_PATHS = [FILES_PREFIX + "0123456789abcdef0123456789abcdef-0", FILES_PREFIX + "x", FILES_PREFIX]
# Contract section 5: every error body carries these keys, and no others, under "error".
ERROR_KEYS = {"message", "type", "param", "code", "category", "resolution"}
# How far Envoy's body limits sit above the largest body the filter accepts: more than the
# bursts a chunked body reaches the filter in (up to a TCP receive buffer, 6 MiB by default on
# Linux), or Envoy's plain-text 413 beats the filter's (docs/configuration.md, "Envoy side").
BODY_LIMIT_ROOM = 12 * 1024 * 1024

# The one plugin configuration: envoy/envoy.yaml's (the contract's defaults, the local run).
CANONICAL = shipped_plugin()
# What every other kit changes in it, as merge patches (render_envoy.with_plugin), and nothing
# else. docs/configuration.md ("The shipped kits") says the same in words.
PRODUCTION = {"safety": {"default": "MEDIUM", "minimum": "LOW"},
              "cache": {"ttl_seconds": 86400, "l1": {"max_entries": 128, "max_entry_bytes": 8388608}}}
ISTIO_NAMES = {"gemini": {"cluster": "outbound|443||generativelanguage.googleapis.com"},
               "cache": {"l2": {"cluster": "outbound|8090||image-cache.images.svc.cluster.local",
                                "authority": "image-cache.images.svc.cluster.local"}}}
# Contract sections 11 and 14: every kit that runs in Google Cloud carries the clusters a
# `kind: vertex` backend with workload identity needs, ready but named by no shipped plugin
# configuration (docs/workload-identity.md), and no route reaches them. Envoy's names, and
# Istio's (the ServiceEntries' clusters).
GCP_KITS = ["sidecar.yaml", "istio", "envoy-gateway"]
VERTEX_HOST = "aiplatform.googleapis.com"
METADATA_HOST = "metadata.google.internal"
METADATA_IP = "169.254.169.254"
GCP_CLUSTERS = {"vertex": "vertex", "gce_metadata": "gce_metadata"}
ISTIO_GCP_CLUSTERS = {"vertex": "outbound|443||%s" % VERTEX_HOST, "gce_metadata": "outbound|80||%s" % METADATA_HOST}
# envoy/profiles.yaml, the worked example of docs/policy.md, adds the policy sections of
# contract section 15 (its own profiles, where the profile comes from, prices): declared by
# name, as they are the example's to choose; on_configure checks them when the kit validates.
POLICY_SECTIONS = ("profiles", "profile_from", "pricing")
KIT_DIFFERENCES = {
    "envoy.yaml": [],
    "compose-envoy.yaml": [],
    "sidecar.yaml": [PRODUCTION],
    "istio": [PRODUCTION, ISTIO_NAMES, STREAMING_OFF],
    "envoy-gateway": [PRODUCTION, STREAMING_OFF],
    "profiles.yaml": [POLICY_SECTIONS],
}


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def envoy_config(name):
    return load_all(os.path.join(ENVOY_DIR, name))[0]


def resources_by_kind(folder):
    """Every Kubernetes resource under envoy/<folder>, grouped by kind."""
    docs = {}
    for path in glob.glob(os.path.join(ENVOY_DIR, folder, "*.yaml")):
        for d in load_all(path):
            docs.setdefault(d["kind"], []).append(d)
    return docs


def hcm(listener):
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def wasm_filter(listener):
    (f,) = [f for f in hcm(listener)["http_filters"] if f["name"] == "envoy.filters.http.wasm"]
    return f["typed_config"]["config"]


def named(resources, name):
    (r,) = [r for r in resources if r["metadata"]["name"] == name]
    return r


def kit_plugins():
    """Every kit's plugin configuration, as the filter gets it."""
    kits = {name: render_envoy.plugin_config(envoy_config(name)["static_resources"]["listeners"][0])
            for name in ENVOY_CONFIGS}
    kits["istio"] = resources_by_kind("istio")["WasmPlugin"][0]["spec"]["pluginConfig"]
    kits["envoy-gateway"] = resources_by_kind("envoy-gateway")["EnvoyExtensionPolicy"][0]["spec"]["wasm"][0]["config"]
    return kits


def quantity(q):
    """A Kubernetes quantity in bytes: 32Mi, 33554432."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", str(q))
    assert m, q
    return int(m.group(1)) * {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}[m.group(2)]


def largest_body(plugin):
    """The largest request body a plugin configuration accepts (contract section 14)."""
    limits = plugin["limits"]
    return max(limits["max_body_bytes"], limits["max_upload_bytes"])


def is_upstream_route(route):
    """Whether a route is one that only the filter's own requests meet: it needs the header the
    filter alone sends (contract section 14)."""
    return any(h.get("name") == UPSTREAM_HEADER for h in route["match"].get("headers", []))


def image_route(listener, vhost=0):
    """The image route of a virtual host: the first a client request can meet, right after the
    upstream route."""
    return [r for r in hcm(listener)["route_config"]["virtual_hosts"][vhost]["routes"] if not is_upstream_route(r)][0]


def files_route(listener, vhost=0):
    """The image URLs' route of a virtual host: the one route matching the files prefix."""
    (r,) = [r for r in hcm(listener)["route_config"]["virtual_hosts"][vhost]["routes"]
            if r["match"] == {"prefix": FILES_PREFIX}]
    return r


def check_error_body(body, code, where):
    """`body` is an error in the contract's OpenAI shape (all six keys), with this code."""
    error = json.loads(body)
    assert set(error) == {"error"}, where
    assert set(error["error"]) == ERROR_KEYS, (where, sorted(error["error"]))
    assert error["error"]["code"] == code, where
    assert error["error"]["message"] and error["error"]["resolution"], where
    return error["error"]


def route_for(listener, path, vhost=0):
    """The route Envoy picks for a client request to `path` (no special headers): the first of
    the virtual host (the first by default) whose path match takes it. Routes that need a header
    are skipped (the contract's upstream route needs the one the filter alone sends)."""
    for r in hcm(listener)["route_config"]["virtual_hosts"][vhost]["routes"]:
        m = r["match"]
        if m.get("headers"):
            continue
        if ("safe_regex" in m and re.fullmatch(m["safe_regex"]["regex"], path)) or \
                ("prefix" in m and path.startswith(m["prefix"])) or m.get("path") == path:
            return r
    return None


def validate(doc, tmp_path, env=None):
    path = render_envoy.write(doc, str(tmp_path / "validate.yaml"))
    full_env = dict(os.environ, GEMINI_API_KEY="validate-only")
    full_env.pop("GEMINI_IMAGE_SAFETY_THRESHOLD", None)
    full_env.update(env or {})
    r = subprocess.run([envoy_bin(), "--mode", "validate", "-c", path], cwd=ROOT, env=full_env,
                       capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "gemini-image-filter: configured" in out, "the plugin's on_configure ran"
    return out


def plugin_config_in_envoy(plugin, tmp_path, cluster_names=(), clusters=(), env=None):
    """Runs a plugin configuration through the filter's on_configure in a real Envoy, with the
    clusters it names present: placeholders for `cluster_names`, and `clusters` (Envoy Cluster
    dicts) as given, in place of the shipped ones of the same name."""
    doc = render_envoy.render(wasm=WASM, plugin=plugin)
    given = {c["name"] for c in clusters}
    doc["static_resources"]["clusters"] = [c for c in doc["static_resources"]["clusters"] if c["name"] not in given]
    doc["static_resources"]["clusters"] += list(clusters)
    for name in cluster_names:
        doc["static_resources"]["clusters"].append({
            "name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": 9}}}}]}]}})
    return validate(doc, tmp_path, env)


# --- every Envoy config runs -------------------------------------------------------------

@pytest.mark.parametrize("name", ENVOY_CONFIGS)
def test_every_shipped_envoy_config_passes_validate(name, tmp_path):
    # The configs name the wasm where their deployment puts it (/etc/envoy/...); point it at
    # the module just built, and change nothing else.
    doc = render_envoy.render(os.path.join(ENVOY_DIR, name), wasm=WASM)
    validate(doc, tmp_path)


# --- one plugin configuration, one filter chain, one failure policy (issues 10 and 11) -----

def test_every_kit_carries_the_one_plugin_configuration():
    kits = kit_plugins()
    assert set(kits) == set(KIT_DIFFERENCES), "a new kit needs its differences declared here and in docs/configuration.md"
    for kit, cfg in kits.items():
        expected = CANONICAL
        for patch in KIT_DIFFERENCES[kit]:
            if isinstance(patch, tuple):  # sections the kit adds, declared by name
                assert set(patch) <= set(cfg), "%s lacks %s" % (kit, sorted(set(patch) - set(cfg)))
                patch = {key: cfg[key] for key in patch}
            expected = with_plugin(expected, **patch)
        assert cfg == expected, "%s drifted from envoy/envoy.yaml:\n%s\nexpected\n%s" % (
            kit, json.dumps(cfg, sort_keys=True), json.dumps(expected, sort_keys=True))


def test_the_configuration_reference_shows_the_shipped_configuration():
    with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
        block = re.search(r"```json\n(.*?)```", f.read(), re.S).group(1)
    assert json.loads(block) == CANONICAL, "docs/configuration.md's example is envoy/envoy.yaml's configuration"


@pytest.mark.parametrize("name", ENVOY_CONFIGS)
def test_every_envoy_config_has_the_same_filter_chain(name):
    ref_doc, doc = envoy_config("envoy.yaml"), envoy_config(name)
    ref, listener = ref_doc["static_resources"]["listeners"][0], doc["static_resources"]["listeners"][0]
    before = FILTERS_BEFORE.get(name, [])
    assert [f["name"] for f in hcm(listener)["http_filters"]] == before + FILTERS
    # The wasm filter: the same in everything but where the module lies.
    wasm, ref_wasm = copy.deepcopy(wasm_filter(listener)), copy.deepcopy(wasm_filter(ref))
    for w in (wasm, ref_wasm):
        w["vm_config"].pop("code")
        w.pop("configuration")
    assert wasm == ref_wasm
    assert hcm(listener)["http_filters"][len(before) + 1:] == hcm(ref)["http_filters"][1:], "buffer and router"
    for key in ("stream_idle_timeout", "request_timeout", "normalize_path", "merge_slashes"):
        assert hcm(listener).get(key) == hcm(ref)[key], key
    assert listener.get("per_connection_buffer_limit_bytes") == ref["per_connection_buffer_limit_bytes"]
    # The image route: the same match and the same 405 for what reaches the router there.
    image = image_route(listener)
    assert image == image_route(ref)
    # Every virtual host's image route is that one, save route metadata naming a configured
    # policy profile (contract section 15; envoy/profiles.yaml gives one host a profile).
    profiles = render_envoy.plugin_config(listener).get("profiles", {})
    for i, vh in enumerate(hcm(listener)["route_config"]["virtual_hosts"]):
        other = copy.deepcopy(image_route(listener, i))
        metadata = other.pop("metadata", None)
        assert other == image, (name, vh["name"])
        if metadata is not None:
            profile = metadata["filter_metadata"]["gemini_image"]["profile"]
            assert metadata == {"filter_metadata": {"gemini_image": {"profile": profile}}}, (name, vh["name"])
            assert profile in set(profiles) | {"default"}, (name, vh["name"], profile)
    assert image["direct_response"]["status"] == 405
    assert json.loads(image["direct_response"]["body"]["inline_string"])["error"]["code"] == "IMG_INVALID_REQUEST"
    headers = {h["header"]["key"]: h["header"]["value"] for h in image.get("response_headers_to_add", [])}
    assert headers == {"allow": "POST", "content-type": "application/json"}, "as the filter's own 405"
    # The image URLs' route: the same as envoy/envoy.yaml's in every virtual host, save the
    # profile its host's image route names (a URL of a private-cache profile is found only in
    # that profile).
    files = files_route(ref)
    for i, vh in enumerate(hcm(listener)["route_config"]["virtual_hosts"]):
        other = copy.deepcopy(files_route(listener, i))
        assert other.pop("metadata", None) == image_route(listener, i).get("metadata"), (name, vh["name"])
        assert other == files, (name, vh["name"])
    assert files["direct_response"]["status"] == 404
    check_error_body(files["direct_response"]["body"]["inline_string"], "IMG_IMAGE_NOT_FOUND", name)
    headers = {h["header"]["key"]: h["header"]["value"] for h in files.get("response_headers_to_add", [])}
    assert headers == {"content-type": "application/json"}, "JSON, as the filter's own 404"
    assert doc["stats_config"] == ref_doc["stats_config"]


def test_istio_and_envoy_gateway_build_the_same_filter_chain():
    ref = envoy_config("envoy.yaml")["static_resources"]["listeners"][0]
    ref_wasm = wasm_filter(ref)
    ref_buffer = hcm(ref)["http_filters"][1]["typed_config"]
    host_keys = set(ref_wasm["vm_config"]["environment_variables"]["host_env_keys"])

    istio = resources_by_kind("istio")
    plugin = istio["WasmPlugin"][0]["spec"]
    # UNSPECIFIED_PHASE puts the wasm filter last before the router; the EnvoyFilter puts the
    # buffer between the two: wasm, buffer, router.
    assert plugin["phase"] == "UNSPECIFIED_PHASE"
    assert plugin["pluginName"] == ref_wasm["root_id"]
    assert {e["name"] for e in plugin["vmConfig"]["env"] if e["valueFrom"] == "HOST"} == host_keys
    patch = istio_patch(istio, "HTTP_FILTER")
    assert patch["match"]["context"] == "SIDECAR_INBOUND"
    assert patch["patch"]["operation"] == "INSERT_BEFORE"
    assert patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"
    assert patch["patch"]["value"]["name"] == "envoy.filters.http.buffer"
    assert patch["patch"]["value"]["typed_config"] == ref_buffer
    # The inbound listener's per-connection limit, merged in: the same as the Envoy configs'.
    listener_patch = istio_patch(istio, "LISTENER")
    assert listener_patch["match"] == {"context": "SIDECAR_INBOUND"}, "every inbound listener of the workload"
    assert listener_patch["patch"]["operation"] == "MERGE"
    assert listener_patch["patch"]["value"] == {"per_connection_buffer_limit_bytes": ref["per_connection_buffer_limit_bytes"]}

    eg = resources_by_kind("envoy-gateway")
    wasm = eg["EnvoyExtensionPolicy"][0]["spec"]["wasm"][0]
    assert wasm["rootID"] == ref_wasm["root_id"]
    assert set(wasm["env"]["hostKeys"]) == host_keys
    limit = eg["BackendTrafficPolicy"][0]["spec"]["requestBuffer"]["limit"]
    assert re.fullmatch(r"\d+Mi", limit) and quantity(limit) == ref_buffer["max_request_bytes"]
    # The Gateway's per-connection limit (ClientTrafficPolicy), the same as the Envoy configs'.
    assert quantity(eg_connection_policy(eg)["spec"]["connection"]["bufferLimit"]) == ref["per_connection_buffer_limit_bytes"]


def istio_patch(istio, apply_to):
    """The one patch of the Istio kit's EnvoyFilter that applies to `apply_to`."""
    (patch,) = [p for p in istio["EnvoyFilter"][0]["spec"]["configPatches"] if p["applyTo"] == apply_to]
    return patch


def eg_connection_policy(eg):
    """The Envoy Gateway kit's ClientTrafficPolicy, on the Gateway of the images route."""
    (policy,) = eg["ClientTrafficPolicy"]
    route = named(eg["HTTPRoute"], eg["EnvoyExtensionPolicy"][0]["spec"]["targetRefs"][0]["name"])
    assert policy["metadata"]["namespace"] == route["metadata"]["namespace"]
    assert [{k: v for k, v in t.items() if k != "sectionName"} for t in policy["spec"]["targetRefs"]] == [
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": route["spec"]["parentRefs"][0]["name"]}]
    return policy


def eg_failure_policy_patch(eg):
    """The operation of the Envoy Gateway kit that sets the wasm filter's failure_policy."""
    policy = named(eg["EnvoyPatchPolicy"], "gemini-image-failure-policy")["spec"]
    (patch,) = policy["jsonPatches"]
    return policy, patch


def test_every_kit_has_the_one_failure_policy():
    """FAIL_RELOAD everywhere (docs/reliability.md#failure-policy): a failed VM is replaced for
    later requests, and image calls never fall through unfiltered."""
    for name in ENVOY_CONFIGS:
        wasm = wasm_filter(envoy_config(name)["static_resources"]["listeners"][0])
        assert wasm.get("failure_policy") == "FAIL_RELOAD", name
        assert "fail_open" not in wasm, "%s: fail_open is deprecated, and FAIL_CLOSED when false" % name
    assert resources_by_kind("istio")["WasmPlugin"][0]["spec"]["failStrategy"] == "FAIL_RELOAD"

    eg = resources_by_kind("envoy-gateway")
    ext = eg["EnvoyExtensionPolicy"][0]
    assert ext["spec"]["wasm"][0]["failOpen"] is False, "never FAIL_OPEN, even where the patch does not apply"
    policy, patch = eg_failure_policy_patch(eg)
    route = named(eg["HTTPRoute"], ext["spec"]["targetRefs"][0]["name"])
    gateway = route["spec"]["parentRefs"][0]["name"]
    assert policy["targetRef"] == {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway}
    assert patch["type"] == "type.googleapis.com/envoy.config.listener.v3.Listener"
    assert patch["name"].startswith("%s/%s/" % (route["metadata"]["namespace"], gateway))
    op = patch["operation"]
    assert (op["op"], op["path"], op["value"]) == ("add", "typed_config/config/failure_policy", "FAIL_RELOAD")
    # Envoy Gateway names the filter of wasm extension i of a policy
    # envoy.filters.http.wasm/envoyextensionpolicy/<namespace>/<name>/wasm/<i>.
    regex = re.fullmatch(r"\.\.http_filters\[\?match\(@\.name, '(.+)'\)\]", op["jsonPath"]).group(1)
    generated = "envoy.filters.http.wasm/envoyextensionpolicy/%s/%s/wasm/0" % (ext["metadata"]["namespace"], ext["metadata"]["name"])
    assert re.fullmatch(regex, generated), (regex, generated)
    assert not re.fullmatch(regex, "envoy.filters.http.wasm/envoyextensionpolicy/images/another-policy/wasm/0")


# --- the Images API reaches the filter, with room for its largest body (contract 9, 14) -----

@pytest.mark.parametrize("name", ENVOY_CONFIGS)
def test_every_envoy_config_sends_the_image_paths_to_the_filter(name):
    listener = envoy_config(name)["static_resources"]["listeners"][0]
    for vhost in range(len(hcm(listener)["route_config"]["virtual_hosts"])):
        image = image_route(listener, vhost)
        for path in IMAGE_PATHS:
            for spelling in (path, path + "/"):
                assert route_for(listener, spelling, vhost) is image, (name, vhost, spelling)
        # The filter and the buffer are on for it (they are only switched off on other routes).
        assert "typed_per_filter_config" not in image
        for path in NOT_IMAGE_PATHS:
            assert route_for(listener, path, vhost) is not image, (name, vhost, path)


@pytest.mark.parametrize("name", ENVOY_CONFIGS)
def test_every_envoy_config_sends_the_image_urls_to_the_filter(name):
    """Contract section 10: in every virtual host, a GET of an image URL meets the files route,
    before any catch-all (the app's route, or compose's 404), with the wasm filter and the
    buffer on; the image route and the files route take none of each other's paths."""
    listener = envoy_config(name)["static_resources"]["listeners"][0]
    for vhost, vh in enumerate(hcm(listener)["route_config"]["virtual_hosts"]):
        routes = vh["routes"]
        files = files_route(listener, vhost)
        for path in FILE_PATHS:
            assert route_for(listener, path, vhost) is files, (name, vhost, path)
            assert route_for(listener, path + "?x=1", vhost) is files, (name, vhost, path)
        for path in IMAGE_PATHS + NOT_IMAGE_PATHS + ["/", "/v1/images/file/x", "/x" + FILES_PREFIX]:
            assert route_for(listener, path, vhost) is not files, (name, vhost, path)
        catch_alls = [i for i, r in enumerate(routes) if r["match"] in ({"prefix": "/"}, {"path_separated_prefix": "/"})]
        assert catch_alls, (name, vh["name"], "every shipped virtual host ends in a catch-all")
        assert routes.index(files) < min(catch_alls), (name, vh["name"])
        # The filter answers here: neither it nor the buffer is switched off on the route.
        assert "typed_per_filter_config" not in files, (name, vh["name"])
        assert "route" not in files and files["direct_response"]["status"] == 404, (name, vh["name"])


def test_every_direct_response_of_the_images_api_is_an_openai_error():
    """What reaches the router on the image and files routes, in every kit, is an error in the
    contract's shape: JSON with all six keys (contract section 5)."""
    expected = {"IMG_INVALID_REQUEST": ("invalid_request_error", "USER_ERROR"),
                "IMG_IMAGE_NOT_FOUND": ("invalid_request_error", "USER_ERROR")}
    bodies = []
    for name in ENVOY_CONFIGS:
        listener = envoy_config(name)["static_resources"]["listeners"][0]
        for vhost, vh in enumerate(hcm(listener)["route_config"]["virtual_hosts"]):
            for route, code in ((image_route(listener, vhost), "IMG_INVALID_REQUEST"),
                                (files_route(listener, vhost), "IMG_IMAGE_NOT_FOUND")):
                bodies.append((route["direct_response"]["body"]["inline_string"], code, (name, vh["name"])))
    eg = resources_by_kind("envoy-gateway")
    for f in eg["HTTPRouteFilter"]:
        direct = f["spec"]["directResponse"]
        assert direct["contentType"] == "application/json", f["metadata"]["name"]
        code = {405: "IMG_INVALID_REQUEST", 404: "IMG_IMAGE_NOT_FOUND"}[direct["statusCode"]]
        bodies.append((direct["body"]["inline"], code, ("envoy-gateway", f["metadata"]["name"])))
    assert len(bodies) >= 2 * len(ENVOY_CONFIGS) + 2
    for body, code, where in bodies:
        error = check_error_body(body, code, where)
        assert (error["type"], error["category"]) == expected[code], where
        assert error["param"] is None, where


def test_istio_sends_the_image_paths_to_the_filter():
    """Istio has no route of its own here: the filter is on every inbound request of the image
    workload, whatever its path, and picks out the Images API, and the image URLs under
    /v1/images/files/, itself."""
    istio = resources_by_kind("istio")
    plugin = istio["WasmPlugin"][0]["spec"]
    assert plugin["match"] == [{"mode": "SERVER"}], "no port or path restriction"
    assert "targetRefs" not in plugin and "targetRef" not in plugin, "the workload selector, not a route"


def test_envoy_gateway_sends_the_image_paths_to_the_filter():
    eg = resources_by_kind("envoy-gateway")
    route = named(eg["HTTPRoute"], eg["EnvoyExtensionPolicy"][0]["spec"]["targetRefs"][0]["name"])
    post, other, files = route["spec"]["rules"]
    # POST to the three paths: the filter, in front of the app's backend, with no timeout.
    assert post["matches"] == [{"path": {"type": "Exact", "value": p}, "method": "POST"} for p in IMAGE_PATHS]
    assert post["timeouts"] == {"request": "0s"}
    # Any other method on them: the filter's 405, or without it the Envoy configs' 405.
    assert other["matches"] == [{"path": {"type": "Exact", "value": p}} for p in IMAGE_PATHS]
    assert "backendRefs" not in other
    (modifier,) = [f for f in other["filters"] if f["type"] == "ResponseHeaderModifier"]
    assert modifier["responseHeaderModifier"] == {"set": [{"name": "allow", "value": "POST"}]}
    (ref,) = [f["extensionRef"] for f in other["filters"] if f["type"] == "ExtensionRef"]
    assert (ref["group"], ref["kind"]) == ("gateway.envoyproxy.io", "HTTPRouteFilter")
    direct = named(eg["HTTPRouteFilter"], ref["name"])
    assert direct["metadata"]["namespace"] == route["metadata"]["namespace"]
    envoy_405 = image_route(envoy_config("envoy.yaml")["static_resources"]["listeners"][0])["direct_response"]
    assert direct["spec"]["directResponse"] == {
        "statusCode": envoy_405["status"], "contentType": "application/json",
        "body": {"type": "Inline", "inline": envoy_405["body"]["inline_string"]}}
    # The image URLs: every method, a rule of the same route, so the filter is on for them; it
    # answers GET and HEAD from its cache tiers and 405 to the rest, and without it the Envoy
    # configs' 404. No backend: nothing here goes past the filter.
    assert files["matches"] == [{"path": {"type": "PathPrefix", "value": FILES_PREFIX}}]
    assert "backendRefs" not in files
    (ref,) = [f["extensionRef"] for f in files["filters"]]
    assert (ref["group"], ref["kind"]) == ("gateway.envoyproxy.io", "HTTPRouteFilter")
    direct = named(eg["HTTPRouteFilter"], ref["name"])
    assert direct["metadata"]["namespace"] == route["metadata"]["namespace"]
    envoy_404 = files_route(envoy_config("envoy.yaml")["static_resources"]["listeners"][0])["direct_response"]
    assert direct["spec"]["directResponse"] == {
        "statusCode": envoy_404["status"], "contentType": "application/json",
        "body": {"type": "Inline", "inline": envoy_404["body"]["inline_string"]}}
    # The filter is on every rule of the route (a policy on the whole route, no sectionName).
    assert eg["EnvoyExtensionPolicy"][0]["spec"]["targetRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": route["metadata"]["name"]}]
    # The request buffer is on the images route.
    assert eg["BackendTrafficPolicy"][0]["spec"]["targetRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": route["metadata"]["name"]}]


def test_every_kit_buffers_more_than_the_largest_body_the_filter_accepts():
    """Contract section 14: the buffer filter's max_request_bytes and the listener's
    per_connection_buffer_limit_bytes are at least the largest body the kit's own plugin
    configuration accepts (limits.max_upload_bytes, for edits and variations), with room for a
    chunked body's bursts, so that the filter, not Envoy, answers a body over its limit."""
    plugins = kit_plugins()
    limits = {}
    for name in ENVOY_CONFIGS:
        listener = envoy_config(name)["static_resources"]["listeners"][0]
        (buffer,) = [f for f in hcm(listener)["http_filters"] if f["name"] == "envoy.filters.http.buffer"]
        limits[name] = {"buffer filter": buffer["typed_config"]["max_request_bytes"],
                        "per-connection": listener.get("per_connection_buffer_limit_bytes", 1 << 20)}
    istio = resources_by_kind("istio")
    limits["istio"] = {
        "buffer filter": istio_patch(istio, "HTTP_FILTER")["patch"]["value"]["typed_config"]["max_request_bytes"],
        "per-connection": istio_patch(istio, "LISTENER")["patch"]["value"]["per_connection_buffer_limit_bytes"]}
    eg = resources_by_kind("envoy-gateway")
    limits["envoy-gateway"] = {
        "buffer filter": quantity(eg["BackendTrafficPolicy"][0]["spec"]["requestBuffer"]["limit"]),
        "per-connection": quantity(eg_connection_policy(eg)["spec"]["connection"]["bufferLimit"])}
    assert set(limits) == set(plugins)
    for kit, found in limits.items():
        largest = largest_body(plugins[kit])
        assert largest == plugins[kit]["limits"]["max_upload_bytes"], kit
        for what, limit in found.items():
            assert limit >= largest, "%s: the %s limit %d is below the largest body the filter accepts, %d" % (
                kit, what, limit, largest)
            assert limit >= largest + BODY_LIMIT_ROOM, "%s: the %s limit %d leaves less than %d bytes above %d" % (
                kit, what, limit, BODY_LIMIT_ROOM, largest)


# --- streaming: the filter's own requests go upstream (contract sections 12 and 14) ---------

UPSTREAM_MATCH = {"prefix": "/", "headers": [{"name": UPSTREAM_HEADER, "present_match": True}]}


def check_upstream_routes(listener, where):
    """A listener that runs the filter starts every virtual host with the contract's upstream
    route, as scripts/render_envoy.py's upstream_route() gives it, and has no other route on
    that header or with a cluster from a header."""
    rc = hcm(listener)["route_config"]
    assert not changes_filter(rc), where
    for vh in rc["virtual_hosts"]:
        first, *rest = vh["routes"]
        at = where + (vh["name"],)
        assert first["match"] == UPSTREAM_MATCH, at
        assert first["route"]["cluster_header"] == UPSTREAM_HEADER, at
        assert first == render_envoy.upstream_route(), at
        # The filter stays on there (on the route and its virtual host): it refuses a client
        # request that carries the header.
        assert "typed_per_filter_config" not in first and not changes_filter(vh), at
        assert not [r for r in rest if is_upstream_route(r) or "cluster_header" in r.get("route", {})], at


@pytest.mark.parametrize("name", ENVOY_CONFIGS)
def test_every_envoy_config_routes_the_filters_own_requests_first(name):
    """Contract sections 12 and 14: every Envoy config lets the filter hold request headers
    while it reads a streamed request's body (allow_on_headers_stop_iteration), starts every
    virtual host with the upstream route (the filter's header present; the cluster from that
    header; no timeout over the whole stream, an idle one at least as long as a Gemini call may
    take), has a virtual host for any :authority (the rewritten request carries Gemini's, and
    Envoy picks the route again), and keeps the listener's limit at or above the largest body
    (with the headers held, the buffer filter no longer raises it)."""
    doc = envoy_config(name)
    listeners = [l for l in doc["static_resources"]["listeners"] if runs_filter(l)]
    assert listeners, name
    for listener in listeners:
        where = (name, listener["name"])
        assert wasm_filter(listener).get("allow_on_headers_stop_iteration") is True, where
        check_upstream_routes(listener, where)
        vhosts = hcm(listener)["route_config"]["virtual_hosts"]
        assert [vh for vh in vhosts if vh["domains"] == ["*"]], where
        plugin = render_envoy.plugin_config(listener)
        assert plugin.get("streaming", {}).get("enabled", True) is True, "%s: the flag is there for streaming" % (where,)
        for vh in vhosts:
            action = vh["routes"][0]["route"]
            assert action["timeout"] == "0s", (where, vh["name"], "Envoy's 15 s would cut the stream")
            assert seconds(action["idle_timeout"]) * 1000 >= plugin["gemini"]["timeout_ms"], (where, vh["name"])
        assert listener["per_connection_buffer_limit_bytes"] >= plugin["limits"]["max_upload_bytes"], where


def test_rendered_configs_keep_the_upstream_route_first():
    """scripts/render_envoy.py, which tests and `make run` start Envoy with: extra listeners
    carry the upstream route too, and a route a test adds goes after it (add_route)."""
    for base in ("envoy.yaml", "profiles.yaml"):
        doc = render_envoy.render(os.path.join(ENVOY_DIR, base), wasm=WASM, fake_gemini="127.0.0.1:9",
                                  app="127.0.0.1:9", image_cache="127.0.0.1:9",
                                  extra_listeners=[("extra", 9, with_plugin(cache=None, urls=None))])
        main = doc["static_resources"]["listeners"][0]
        probe = {"match": {"prefix": "/probe"}, "direct_response": {"status": 204}}
        assert render_envoy.add_route(main, probe) is probe
        assert hcm(main)["route_config"]["virtual_hosts"][0]["routes"][1] is probe
        assert len(doc["static_resources"]["listeners"]) == 2
        for listener in doc["static_resources"]["listeners"]:
            check_upstream_routes(listener, (base, listener["name"]))
        assert envoy_route_doors(doc) == [], base


def test_kits_that_cannot_hold_request_headers_turn_streaming_off():
    """The Istio and Envoy Gateway kits install the filter with WasmPlugin and
    EnvoyExtensionPolicy, which cannot set allow_on_headers_stop_iteration: their plugin
    configuration turns streaming off (the filter then lets request headers go on and answers
    `stream: true` with a 400), and they carry no upstream route, which nothing would use. The
    Envoy configs, which set the flag, keep streaming on (the default)."""
    plugins = kit_plugins()
    assert set(NO_STOP_ITERATION_KITS) < set(plugins)
    for kit in NO_STOP_ITERATION_KITS:
        assert plugins[kit].get("streaming") == {"enabled": False}, kit
        for docs in resources_by_kind(kit).values():
            for d in docs:
                assert not [x for x in strings_in(d) if UPSTREAM_HEADER in x], (kit, d["metadata"]["name"])
    for name in ENVOY_CONFIGS:
        assert plugins[name].get("streaming", {}).get("enabled", True) is True, name


# --- no route reaches the filter's clusters (issue 11, contract section 14) ----------------

def values_named_in(plugin, name):
    """Every string value of a key called `name`, at any depth of a plugin configuration."""
    found = set()

    def walk(v):
        if isinstance(v, dict):
            for k, x in v.items():
                if k == name and isinstance(x, str):
                    found.add(x)
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
    walk(plugin)
    return found


def clusters_named_in(plugin):
    """Every cluster a plugin configuration names (gemini, cache.l2, and any backend's)."""
    return values_named_in(plugin, "cluster")


def authorities_named_in(plugin):
    """Every `authority` a plugin configuration names (gemini, cache.l2, backends, metadata)."""
    return values_named_in(plugin, "authority")


def strings_in(v):
    if isinstance(v, dict):
        for x in v.values():
            yield from strings_in(x)
    elif isinstance(v, list):
        for x in v:
            yield from strings_in(x)
    elif isinstance(v, str):
        yield v


def runs_filter(listener):
    """Whether a listener's HTTP filter chain has the wasm filter."""
    return any(f["name"] == "envoy.filters.http.wasm" for f in hcm(listener)["http_filters"])


def changes_filter(config):
    """Whether a route, virtual host or route configuration has a per-route config for the wasm
    filter (one that switches it off, or gives it another plugin)."""
    return "envoy.filters.http.wasm" in config.get("typed_per_filter_config", {})


def strings_but(d, *keys):
    """Every string value in a dict, at any depth, except under the given top-level keys."""
    return set(strings_in({k: v for k, v in d.items() if k not in keys}))


def envoy_route_doors(doc):
    """Routes of an Envoy config that can send a client request to a cluster the filter calls,
    or may call (the Vertex AI and metadata clusters, named by no shipped configuration): a
    route, virtual host or route configuration that names one anywhere (a route's cluster,
    weighted clusters, mirrors), a cluster specifier plugin, and a cluster taken from a request
    header, save the contract's upstream route: first in its virtual host, on the filter's own
    header, in a listener that runs the filter and with the filter left as it is there (the
    filter refuses a client request that carries the header)."""
    listeners = doc["static_resources"]["listeners"]
    forbidden = set(GCP_CLUSTERS.values())
    for listener in listeners:
        if runs_filter(listener):
            forbidden |= clusters_named_in(render_envoy.plugin_config(listener))
    doors = []
    for listener in listeners:
        rc = hcm(listener)["route_config"]
        if strings_but(rc, "virtual_hosts", "name") & forbidden:
            doors.append((listener["name"], "route_config", sorted(strings_but(rc, "virtual_hosts", "name") & forbidden)))
        for vh in rc["virtual_hosts"]:
            if strings_but(vh, "routes", "name") & forbidden:
                doors.append((listener["name"], vh["name"], "virtual host", sorted(strings_but(vh, "routes", "name") & forbidden)))
            for i, r in enumerate(vh["routes"]):
                action = r.get("route", {})
                named = strings_but(r, "name") & forbidden
                if named:
                    doors.append((listener["name"], vh["name"], i, sorted(named)))
                if "cluster_specifier_plugin" in action or "inline_cluster_specifier_plugin" in action:
                    doors.append((listener["name"], vh["name"], i, "a cluster specifier plugin"))
                if "cluster_header" in action:
                    # Only the contract's upstream route, first, matching the filter's own header,
                    # where the filter runs as it is to refuse a client that sends it.
                    header = {"name": UPSTREAM_HEADER, "present_match": True}
                    upstream = (i == 0 and action["cluster_header"] == UPSTREAM_HEADER
                                and header in r["match"].get("headers", []) and runs_filter(listener)
                                and not any(changes_filter(c) for c in (r, vh, rc)))
                    if not upstream:
                        doors.append((listener["name"], vh["name"], i, "cluster_header " + action["cluster_header"]))
    return doors


def istio_doors(docs):
    """Istio: the filter's clusters are outbound clusters of the workload's sidecar. A client
    of the workload reaches its inbound listener, whose routes lead only to the workload; so a
    door would be a kit resource that routes to the Gemini or cache host, a patch that names
    their clusters, or the ServiceEntry exported to other namespaces."""
    cfg = docs["WasmPlugin"][0]["spec"]["pluginConfig"]
    clusters = clusters_named_in(cfg) | set(ISTIO_GCP_CLUSTERS.values())
    hosts = {c.split("|")[-1] for c in clusters} | {METADATA_IP}
    doors = []
    if [m.get("mode") for m in docs["WasmPlugin"][0]["spec"].get("match", [])] != ["SERVER"]:
        doors.append("the WasmPlugin is not on the inbound side only")
    for kind in ("VirtualService", "Gateway", "HTTPRoute", "GRPCRoute", "TCPRoute", "TLSRoute"):
        for r in docs.get(kind, []):
            named_hosts = set(strings_in(r["spec"]))
            if named_hosts & (hosts | clusters):
                doors.append("%s %s routes to %s" % (kind, r["metadata"]["name"], sorted(named_hosts & (hosts | clusters))))
    for f in docs.get("EnvoyFilter", []):
        for p in f["spec"]["configPatches"]:
            if set(strings_in(p)) & clusters:
                doors.append("EnvoyFilter %s names a filter cluster" % f["metadata"]["name"])
    for kind in ("ServiceEntry", "DestinationRule"):
        for r in docs.get(kind, []):
            if r["spec"].get("exportTo") != ["."]:
                doors.append("%s %s is visible outside its namespace" % (kind, r["metadata"]["name"]))
    return doors


def envoy_gateway_doors(docs):
    """Envoy Gateway: the filter's clusters must come from EnvoyPatchPolicy, not from routes
    (a route that exists to create a cluster is a route a client can match), and no route or
    patch may lead to Google's API or the cache service."""
    cfg = docs["EnvoyExtensionPolicy"][0]["spec"]["wasm"][0]["config"]
    clusters = clusters_named_in(cfg) | set(GCP_CLUSTERS.values())
    added = {}
    for policy in docs.get("EnvoyPatchPolicy", []):
        for p in policy["spec"]["jsonPatches"]:
            if p["type"] == "type.googleapis.com/envoy.config.cluster.v3.Cluster" and p["operation"]["op"] == "add":
                added[p["operation"]["value"]["name"]] = p["operation"]["value"]
    doors = ["cluster %s is not added by an EnvoyPatchPolicy" % c for c in sorted(clusters - set(added))]
    # What the filter's calls reach: its clusters, their endpoints, the authorities it sends.
    targets = set(clusters) | authorities_named_in(cfg) | {VERTEX_HOST, METADATA_HOST}
    targets |= {e["endpoint"]["address"]["socket_address"]["address"]
                for c in added.values() for le in c["load_assignment"]["endpoints"] for e in le["lb_endpoints"]}
    labels = {t.split(".")[0] for t in targets}
    targets.add(METADATA_IP)
    backends = {b["metadata"]["name"]: set(strings_in(b["spec"])) for b in docs.get("Backend", [])}
    for kind in ("HTTPRoute", "GRPCRoute", "TCPRoute", "TLSRoute", "UDPRoute"):
        for r in docs.get(kind, []):
            for rule in r["spec"].get("rules", []):
                for ref in rule.get("backendRefs", []):
                    reached = {ref["name"]} | (backends.get(ref["name"], set()) if ref.get("kind") == "Backend" else set())
                    bad = sorted(x for x in reached if x in targets or x.split(".")[0] in labels)
                    if bad:
                        doors.append("%s %s reaches %s" % (kind, r["metadata"]["name"], bad))
    for policy in docs.get("EnvoyPatchPolicy", []):
        for p in policy["spec"]["jsonPatches"]:
            if p["type"] != "type.googleapis.com/envoy.config.cluster.v3.Cluster" and set(strings_in(p)) & clusters:
                doors.append("EnvoyPatchPolicy %s routes to a filter cluster" % policy["metadata"]["name"])
    return doors


def test_no_route_of_any_kit_reaches_the_filters_clusters():
    """Contract section 14: no route of a shipped config reaches the Gemini, Vertex, metadata or
    cache clusters (the Vertex and metadata ones under Envoy's names, `vertex` and
    `gce_metadata`, and Istio's); the only exception is the contract's upstream route."""
    for name in ENVOY_CONFIGS:
        assert envoy_route_doors(envoy_config(name)) == [], name
    assert istio_doors(resources_by_kind("istio")) == []
    assert envoy_gateway_doors(resources_by_kind("envoy-gateway")) == []


def test_the_route_check_finds_an_open_door():
    """The check above fails on the doors it is there for."""
    doc = envoy_config("envoy.yaml")
    for door in ({"match": {"prefix": "/v1beta/"}, "route": {"cluster": "gemini"}},
                 {"match": {"prefix": FILES_PREFIX}, "route": {"cluster": "image_cache"}},
                 {"match": {"prefix": "/c/"}, "route": {"weighted_clusters": {"clusters": [{"name": "image_cache", "weight": 1}]}}},
                 {"match": {"prefix": "/x/"}, "route": {"cluster_header": "x-cluster"}},
                 {"match": {"prefix": "/r/"}, "route": {"cluster": "app", "request_mirror_policies": [{"cluster": "gemini"}]}},
                 render_envoy.upstream_route()):  # a second upstream route, not first
        bad = copy.deepcopy(doc)
        hcm(bad["static_resources"]["listeners"][0])["route_config"]["virtual_hosts"][0]["routes"].insert(1, door)
        assert envoy_route_doors(bad), door
    # The contract's upstream route is the one route with cluster_header, and only as shipped:
    # first, on the filter's own header, with the filter on.
    assert envoy_route_doors(doc) == [], "the contract's upstream route"
    filter_off = {"envoy.filters.http.wasm": {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}}
    variants = []
    bad = copy.deepcopy(doc)  # not first
    routes = hcm(bad["static_resources"]["listeners"][0])["route_config"]["virtual_hosts"][0]["routes"]
    routes[0], routes[1] = routes[1], routes[0]
    variants.append(("second", bad))
    bad = copy.deepcopy(doc)  # another header
    routes = hcm(bad["static_resources"]["listeners"][0])["route_config"]["virtual_hosts"][0]["routes"]
    routes[0]["match"]["headers"] = [{"name": "x-cluster", "present_match": True}]
    variants.append(("another header", bad))
    bad = copy.deepcopy(doc)  # the filter switched off on the route, or on its virtual host
    hcm(bad["static_resources"]["listeners"][0])["route_config"]["virtual_hosts"][0]["routes"][0]["typed_per_filter_config"] = filter_off
    variants.append(("filter off on the route", bad))
    bad = copy.deepcopy(doc)
    hcm(bad["static_resources"]["listeners"][0])["route_config"]["virtual_hosts"][0]["typed_per_filter_config"] = filter_off
    variants.append(("filter off on the virtual host", bad))
    bad = copy.deepcopy(doc)  # a listener without the filter (as bench/run.py's plain one) that kept it
    plain = copy.deepcopy(bad["static_resources"]["listeners"][0])
    plain["name"] = "plain"
    hcm(plain)["http_filters"] = [f for f in hcm(plain)["http_filters"] if f["name"] != "envoy.filters.http.wasm"]
    bad["static_resources"]["listeners"].append(plain)
    variants.append(("no filter", bad))
    bad = copy.deepcopy(doc)  # a mirror of every request of a virtual host
    hcm(bad["static_resources"]["listeners"][0])["route_config"]["virtual_hosts"][0]["request_mirror_policies"] = [{"cluster": "image_cache"}]
    variants.append(("virtual host mirror", bad))
    for what, bad in variants:
        assert envoy_route_doors(bad), what
    # The Vertex AI and metadata clusters, which no shipped plugin configuration names.
    doc = envoy_config("sidecar.yaml")
    for door in ({"match": {"prefix": "/computeMetadata/"}, "route": {"cluster": "gce_metadata"}},
                 {"match": {"prefix": "/v1/projects/"}, "route": {"cluster": "vertex"}},
                 {"match": {"prefix": "/m/"}, "route": {"cluster": "app", "request_mirror_policies": [{"cluster": "gce_metadata"}]}}):
        bad = copy.deepcopy(doc)
        render_envoy.add_route(bad["static_resources"]["listeners"][0], door)  # after the upstream route
        assert [d[2] for d in envoy_route_doors(bad)] == [1], door  # that route, and it alone

    istio = resources_by_kind("istio")
    istio["VirtualService"] = [{"metadata": {"name": "open"}, "spec": {
        "hosts": ["images.example.com"], "http": [{"route": [{"destination": {"host": "generativelanguage.googleapis.com"}}]}]}}]
    assert istio_doors(istio)
    istio = resources_by_kind("istio")
    del istio["ServiceEntry"][0]["spec"]["exportTo"]
    assert istio_doors(istio)
    for host in (VERTEX_HOST, METADATA_HOST, METADATA_IP):
        istio = resources_by_kind("istio")
        istio["VirtualService"] = [{"metadata": {"name": "open"}, "spec": {
            "hosts": ["images.example.com"], "http": [{"route": [{"destination": {"host": host}}]}]}}]
        assert istio_doors(istio), host
    for name in ("aiplatform-googleapis", "gce-metadata"):
        for kind in ("ServiceEntry", "DestinationRule"):
            istio = resources_by_kind("istio")
            del named(istio[kind], name)["spec"]["exportTo"]
            assert istio_doors(istio), (kind, name)
    istio = resources_by_kind("istio")
    istio["EnvoyFilter"][0]["spec"]["configPatches"].append({"applyTo": "ROUTE_CONFIGURATION", "patch": {
        "operation": "MERGE", "value": {"virtual_hosts": [{"routes": [{"route": {"cluster": ISTIO_GCP_CLUSTERS["gce_metadata"]}}]}]}}})
    assert istio_doors(istio)

    # The kit as it was before issue 11: helper routes that create the clusters.
    eg = resources_by_kind("envoy-gateway")
    eg["EnvoyPatchPolicy"] = [p for p in eg["EnvoyPatchPolicy"] if p["metadata"]["name"] != "gemini-image-clusters"]
    eg["Backend"] = [{"metadata": {"name": "gemini"}, "spec": {"endpoints": [{"fqdn": {"hostname": "generativelanguage.googleapis.com", "port": 443}}]}}]
    eg["HTTPRoute"].append({"metadata": {"name": "gemini-upstream"}, "spec": {"rules": [{
        "matches": [{"headers": [{"name": "x-gemini-image-filter-cluster", "value": "never-sent-by-clients"}]}],
        "backendRefs": [{"group": "gateway.envoyproxy.io", "kind": "Backend", "name": "gemini"}]}]}})
    assert len(envoy_gateway_doors(eg)) >= 3
    eg = resources_by_kind("envoy-gateway")
    eg["HTTPRoute"].append({"metadata": {"name": "cache"}, "spec": {"rules": [{"backendRefs": [{"name": "image-cache", "port": 8090}]}]}})
    assert envoy_gateway_doors(eg)
    # The image URLs served by the cache service straight: a door.
    eg = resources_by_kind("envoy-gateway")
    files = named(eg["HTTPRoute"], "images")["spec"]["rules"][2]
    files["backendRefs"] = [{"name": "image-cache", "port": 8090}]
    assert envoy_gateway_doors(eg)
    # The Vertex AI and metadata clusters: added by the patch, and reached by no route.
    for name in GCP_CLUSTERS.values():
        eg = resources_by_kind("envoy-gateway")
        patches = named(eg["EnvoyPatchPolicy"], "gemini-image-clusters")["spec"]["jsonPatches"]
        patches[:] = [p for p in patches if p["name"] != name]
        assert envoy_gateway_doors(eg) == ["cluster %s is not added by an EnvoyPatchPolicy" % name]
    for host in (VERTEX_HOST, METADATA_HOST, METADATA_IP):
        eg = resources_by_kind("envoy-gateway")
        eg["Backend"] = [{"metadata": {"name": "google"}, "spec": {"endpoints": [{"fqdn": {"hostname": host, "port": 80}}]}}]
        eg["HTTPRoute"].append({"metadata": {"name": "google"}, "spec": {"rules": [{
            "backendRefs": [{"group": "gateway.envoyproxy.io", "kind": "Backend", "name": "google"}]}]}})
        assert envoy_gateway_doors(eg), host


# --- Vertex AI with workload identity: ready in every kit that runs in Google Cloud ----------

def endpoint_of(cluster):
    (le,) = cluster["load_assignment"]["endpoints"]
    (e,) = le["lb_endpoints"]
    a = e["endpoint"]["address"]["socket_address"]
    return a["address"], a["port_value"]


def seconds(d):
    return float(str(d).rstrip("s"))


def check_vertex_cluster(c, where):
    """Vertex AI as the `gemini` cluster reaches Google: TLS with SNI, the system CA bundle,
    the certificate's name checked, HTTP/2, resolved by DNS."""
    assert c["type"] in ("LOGICAL_DNS", "STRICT_DNS"), where
    assert endpoint_of(c) == (VERTEX_HOST, 443), where
    assert c["transport_socket"]["name"] == "envoy.transport_sockets.tls", where
    tls = c["transport_socket"]["typed_config"]
    assert tls["@type"] == "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", where
    assert tls["sni"] == VERTEX_HOST, where
    validation = tls["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"]["filename"].startswith("/etc/ssl/certs/"), where
    assert validation["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": VERTEX_HOST}}], where
    http = c["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in http["explicit_http_config"], where


def check_metadata_cluster(c, where):
    """The metadata server: plain HTTP/1.1 to port 80, resolved by DNS, a short connect timeout."""
    assert c["type"] in ("LOGICAL_DNS", "STRICT_DNS"), where
    assert endpoint_of(c) == (METADATA_HOST, 80), where
    assert "transport_socket" not in c and "transport_socket_matches" not in c, "%s: the metadata server is plain HTTP" % where
    assert "typed_extension_protocol_options" not in c, "%s: HTTP/1.1, Envoy's default" % where
    assert seconds(c["connect_timeout"]) <= 2, where


def gcp_kit_clusters():
    """The `vertex` and `gce_metadata` clusters of the Envoy-config and Envoy Gateway kits."""
    sidecar = {c["name"]: c for c in envoy_config("sidecar.yaml")["static_resources"]["clusters"]}
    eg = resources_by_kind("envoy-gateway")
    patch = {p["operation"]["value"]["name"]: p["operation"]["value"]
             for p in named(eg["EnvoyPatchPolicy"], "gemini-image-clusters")["spec"]["jsonPatches"]}
    return {"sidecar.yaml": sidecar, "envoy-gateway": patch}


def test_every_gcp_kit_has_the_vertex_and_metadata_clusters():
    """Contract sections 11 and 14: the GKE sidecar, Istio and Envoy Gateway kits carry the
    clusters of a Vertex AI backend with workload identity, and no shipped plugin
    configuration names them (they are off until docs/workload-identity.md turns them on)."""
    assert set(GCP_KITS) < set(KIT_DIFFERENCES)
    for kit, clusters in gcp_kit_clusters().items():
        check_vertex_cluster(clusters[GCP_CLUSTERS["vertex"]], kit)
        check_metadata_cluster(clusters[GCP_CLUSTERS["gce_metadata"]], kit)

    # Istio: a ServiceEntry each (the clusters Istio names outbound|PORT||HOST), only for this
    # namespace; TLS origination with SNI to Vertex AI, none to the metadata server.
    istio = resources_by_kind("istio")
    for name, cluster in ISTIO_GCP_CLUSTERS.items():
        _, port, _, host = cluster.split("|")
        (se,) = [r["spec"] for r in istio["ServiceEntry"] if host in r["spec"]["hosts"]]
        assert se["hosts"] == [host]
        assert se["exportTo"] == ["."]
        assert se["location"] == "MESH_EXTERNAL"
        assert se["resolution"] == "DNS"
        assert [(p["number"], p["protocol"]) for p in se["ports"]] == [(int(port), "HTTP")], name
        (dr,) = [r["spec"] for r in istio["DestinationRule"] if r["spec"]["host"] == host]
        assert dr["exportTo"] == ["."]
        if name == "vertex":
            (level,) = dr["trafficPolicy"]["portLevelSettings"]
            assert level["port"]["number"] == 443
            assert level["tls"] == {"mode": "SIMPLE", "sni": VERTEX_HOST}
        else:
            assert dr["trafficPolicy"]["tls"] == {"mode": "DISABLE"}
            assert "portLevelSettings" not in dr["trafficPolicy"]
            assert seconds(dr["trafficPolicy"]["connectionPool"]["tcp"]["connectTimeout"]) <= 2

    # Ready, not on: the one plugin configuration names none of them.
    names = set(GCP_CLUSTERS.values()) | set(ISTIO_GCP_CLUSTERS.values())
    for kit, cfg in kit_plugins().items():
        assert not clusters_named_in(cfg) & names, kit
        assert "backends" not in cfg, kit


def workload_identity_backends():
    """The backends of docs/workload-identity.md: its first JSON block, the keys that turn a
    Vertex AI backend with workload identity on."""
    with open(os.path.join(ROOT, "docs", "workload-identity.md")) as f:
        return json.loads(re.search(r"```json\n(.*?)```", f.read(), re.S).group(1))


def test_the_workload_identity_page_turns_vertex_on_in_every_gcp_kit(tmp_path):
    """The configuration docs/workload-identity.md gives, added to each Google Cloud kit's own
    plugin configuration (under Istio's cluster names there), is accepted by the filter in a
    real Envoy with the kit's clusters."""
    extra = workload_identity_backends()
    assert set(extra) == {"backends", "retry"}
    vertex, gemini = extra["backends"]
    assert vertex["kind"] == "vertex" and vertex["cluster"] == GCP_CLUSTERS["vertex"]
    assert vertex["auth"]["metadata"]["cluster"] == GCP_CLUSTERS["gce_metadata"]
    assert gemini["kind"] == "gemini" and gemini["cluster"] == "gemini" and len(gemini["api_key_envs"]) == 2
    plugins = kit_plugins()
    clusters = gcp_kit_clusters()

    # sidecar.yaml as shipped, with the backends added.
    doc = render_envoy.render(os.path.join(ENVOY_DIR, "sidecar.yaml"), wasm=WASM,
                              plugin=with_plugin(plugins["sidecar.yaml"], **extra))
    out = validate(doc, tmp_path)
    assert "backend vertex" not in out, "the vertex backend configured without a warning"

    # Envoy Gateway: the patch's clusters.
    plugin_config_in_envoy(with_plugin(plugins["envoy-gateway"], **extra), tmp_path,
                           clusters=list(clusters["envoy-gateway"].values()))

    # Istio: the same under the ServiceEntries' cluster names.
    istio = copy.deepcopy(extra)
    istio["backends"][0]["cluster"] = ISTIO_GCP_CLUSTERS["vertex"]
    istio["backends"][0]["auth"]["metadata"]["cluster"] = ISTIO_GCP_CLUSTERS["gce_metadata"]
    istio["backends"][1]["cluster"] = plugins["istio"]["gemini"]["cluster"]
    cfg = with_plugin(plugins["istio"], **istio)
    plugin_config_in_envoy(cfg, tmp_path, cluster_names=sorted(clusters_named_in(cfg)))


# --- each kit fits together ----------------------------------------------------------------

def test_sidecar_keeps_the_filter_and_the_buffer_off_the_apps_routes():
    doc = envoy_config("sidecar.yaml")
    h = hcm(doc["static_resources"]["listeners"][0])
    assert [f["name"] for f in h["http_filters"]] == FILTERS
    upstream, image, files, rest = h["route_config"]["virtual_hosts"][0]["routes"]
    # The filter's own requests: the filter stays on there, to refuse a client that sends the header.
    assert is_upstream_route(upstream) and "typed_per_filter_config" not in upstream
    assert image["match"] == {"safe_regex": {"regex": "/v1/images/(generations|edits|variations)/?"}}
    assert "typed_per_filter_config" not in image
    # The image URLs: the filter answers them, so it stays on there (and the buffer with it).
    assert files["match"] == {"prefix": FILES_PREFIX}
    assert "typed_per_filter_config" not in files
    assert rest["typed_per_filter_config"]["envoy.filters.http.wasm"]["disabled"] is True
    assert rest["typed_per_filter_config"]["envoy.filters.http.buffer"]["disabled"] is True
    wasm = h["http_filters"][0]["typed_config"]["config"]
    assert set(wasm["vm_config"]["environment_variables"]["host_env_keys"]) >= {"GEMINI_API_KEY", "IMAGE_CACHE_TOKEN"}
    assert int(h["stream_idle_timeout"].rstrip("s")) >= 300, "minutes, not Envoy's defaults"
    buffer_limit = h["http_filters"][1]["typed_config"]["max_request_bytes"]
    assert buffer_limit >= largest_body(json.loads(wasm["configuration"]["value"]))
    gemini = [c for c in doc["static_resources"]["clusters"] if c["name"] == "gemini"][0]
    tls = gemini["transport_socket"]["typed_config"]
    assert tls["sni"] == "generativelanguage.googleapis.com"
    assert tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"].startswith("/etc/ssl/certs/")


def test_istio_resources_fit_together(tmp_path):
    docs = resources_by_kind("istio")
    plugin = docs["WasmPlugin"][0]["spec"]
    cfg = plugin["pluginConfig"]
    se = named(docs["ServiceEntry"], "generativelanguage-googleapis")["spec"]
    port = se["ports"][0]["number"]
    assert cfg["gemini"]["cluster"] == "outbound|%d||%s" % (port, se["hosts"][0])
    dr = named(docs["DestinationRule"], "generativelanguage-googleapis")["spec"]
    assert dr["host"] == se["hosts"][0]
    assert dr["trafficPolicy"]["portLevelSettings"][0]["tls"]["mode"] == "SIMPLE"
    env = {e["name"]: e for e in plugin["vmConfig"]["env"]}
    assert env["GEMINI_API_KEY"]["valueFrom"] == "HOST"
    # The secret reaches the istio-proxy container under the names the VM reads.
    deploy = docs["Deployment"][0]["spec"]["template"]["spec"]
    proxy = [c for c in deploy["containers"] if c["name"] == "istio-proxy"][0]
    secret_env = {e["name"] for e in proxy["env"]}
    assert {"GEMINI_API_KEY", "IMAGE_CACHE_TOKEN"} <= secret_env
    assert secret_env <= {n for n, e in env.items() if e["valueFrom"] == "HOST"}
    assert secret_env <= set(docs["Secret"][0]["stringData"])
    labels = docs["Deployment"][0]["spec"]["template"]["metadata"]["labels"]
    assert plugin["selector"]["matchLabels"].items() <= labels.items()
    assert docs["EnvoyFilter"][0]["spec"]["workloadSelector"]["labels"].items() <= labels.items()
    # The plugin configuration is one the filter accepts.
    plugin_config_in_envoy(cfg, tmp_path, cluster_names=[cfg["gemini"]["cluster"], cfg["cache"]["l2"]["cluster"]])
    # The EnvoyFilter's buffer filter is valid Envoy config, in the buffer's place.
    patch = istio_patch(docs, "HTTP_FILTER")
    doc = render_envoy.render(wasm=WASM)
    filters = hcm(doc["static_resources"]["listeners"][0])["http_filters"]
    filters[1] = copy.deepcopy(patch["patch"]["value"])
    assert filters[1]["typed_config"]["max_request_bytes"] >= largest_body(cfg)
    # And the listener patch, merged into the listener as Istio merges it.
    doc["static_resources"]["listeners"][0].update(copy.deepcopy(istio_patch(docs, "LISTENER")["patch"]["value"]))
    validate(doc, tmp_path)


def test_envoy_gateway_resources_fit_together(tmp_path):
    docs = resources_by_kind("envoy-gateway")
    policy = docs["EnvoyExtensionPolicy"][0]
    route = named(docs["HTTPRoute"], policy["spec"]["targetRefs"][0]["name"])
    assert route["metadata"]["namespace"] == policy["metadata"]["namespace"]
    wasm = policy["spec"]["wasm"][0]
    cfg = wasm["config"]
    gateway = route["spec"]["parentRefs"][0]["name"]
    # Both patch policies target the Gateway of the route, in its namespace (a policy's
    # targetRef is local).
    for p in docs["EnvoyPatchPolicy"]:
        assert p["metadata"]["namespace"] == route["metadata"]["namespace"]
        assert p["spec"]["type"] == "JSONPatch"
        assert p["spec"]["targetRef"] == {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway}
    clusters = [p["operation"]["value"] for p in named(docs["EnvoyPatchPolicy"], "gemini-image-clusters")["spec"]["jsonPatches"]]
    for p in named(docs["EnvoyPatchPolicy"], "gemini-image-clusters")["spec"]["jsonPatches"]:
        assert (p["type"], p["name"], p["operation"]["op"], p["operation"]["path"]) == (
            "type.googleapis.com/envoy.config.cluster.v3.Cluster", p["operation"]["value"]["name"], "add", "")
    by_name = {c["name"]: c for c in clusters}
    assert set(by_name) == {cfg["gemini"]["cluster"], cfg["cache"]["l2"]["cluster"]} | set(GCP_CLUSTERS.values())
    # Google's API over TLS, as in envoy/envoy.yaml; Vertex AI and the metadata server as in
    # envoy/sidecar.yaml.
    shipped = {c["name"]: c for c in envoy_config("envoy.yaml")["static_resources"]["clusters"]}
    assert by_name[cfg["gemini"]["cluster"]] == shipped["gemini"]
    sidecar = {c["name"]: c for c in envoy_config("sidecar.yaml")["static_resources"]["clusters"]}
    for name in GCP_CLUSTERS.values():
        assert by_name[name] == sidecar[name], name
    limit = docs["BackendTrafficPolicy"][0]["spec"]["requestBuffer"]["limit"]
    assert quantity(limit) >= largest_body(cfg)
    assert set(wasm["env"]["hostKeys"]) >= {"GEMINI_API_KEY", "IMAGE_CACHE_TOKEN"}
    # The configuration and the patch's clusters, as Envoy gets them, through on_configure.
    plugin_config_in_envoy(cfg, tmp_path, clusters=clusters)


def test_compose_names_files_ports_and_services_that_exist():
    compose = load_all(os.path.join(ENVOY_DIR, "docker-compose.yaml"))[0]
    services = compose["services"]
    assert set(services) == {"envoy", "fake-gemini", "cache-service", "redis"}
    image = services["envoy"]["image"]
    assert re.fullmatch(r"envoyproxy/envoy:v1\.\d+\.\d+", image), "pinned, not latest"
    for volume in services["envoy"]["volumes"]:
        host = volume.split(":")[0]
        assert os.path.exists(os.path.normpath(os.path.join(ENVOY_DIR, host))), host
    for name in ("fake-gemini", "cache-service"):
        build = services[name]["build"]
        assert os.path.exists(os.path.normpath(os.path.join(ENVOY_DIR, build["context"], build["dockerfile"])))
    envoy_cfg = envoy_config("compose-envoy.yaml")
    listen_port = envoy_cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    assert any(p.endswith(":%d" % listen_port) for p in services["envoy"]["ports"])
    admin_port = envoy_cfg["admin"]["address"]["socket_address"]["port_value"]
    assert any(p.endswith(":%d" % admin_port) for p in services["envoy"]["ports"])
    # Each cluster's address is a compose service listening on that port.
    for cluster in envoy_cfg["static_resources"]["clusters"]:
        addr = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        svc = services[addr["address"]]
        assert "0.0.0.0:%d" % addr["port_value"] in svc["command"], cluster["name"]
        assert str(addr["port_value"]) in svc["expose"]
    redis_url = services["cache-service"]["command"][services["cache-service"]["command"].index("--redis") + 1]
    assert redis_url.startswith("redis://redis:6379")
    mounted = [v for v in services["envoy"]["volumes"] if v.endswith(".wasm:ro")][0]
    wasm_path = mounted.split(":")[1]
    assert wasm_filter(envoy_cfg["static_resources"]["listeners"][0])["vm_config"]["code"]["local"]["filename"] == wasm_path
    with open(os.path.join(ROOT, "deploy", "Dockerfile.wasm")) as f:
        assert "target/wasm32-wasip1/release/gemini_image_filter.wasm" in f.read()


# --- alerts and dashboard ------------------------------------------------------------------

def test_alert_rules_pass_promtool():
    promtool = tool("promtool")  # `make setup` installs it: missing is a failure, not a skip
    d = os.path.join(ROOT, "deploy", "prometheus")
    r = subprocess.run([promtool, "check", "rules", "alerts.yaml"], cwd=d, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([promtool, "test", "rules", "alerts_test.yaml"], cwd=d, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_alerts_and_dashboard_use_only_series_envoy_exports(envoy):
    """Every gemini_image_* name in the rules and the dashboard is in a real scrape."""
    scrape = http("GET", envoy.admin + "/stats/prometheus")[2].decode()
    exported = set(re.findall(r"^(gemini_image_\w+?)(?:\{| )", scrape, re.M))
    with open(os.path.join(ROOT, "deploy", "prometheus", "alerts.yaml")) as f:
        rules = f.read()
    with open(os.path.join(ROOT, "deploy", "grafana", "gemini-image-filter.json")) as f:
        dashboard = json.load(f)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set(re.findall(r"gemini_image_\w+", rules + " ".join(exprs)))
    assert used, "nothing checked"
    missing = {u for u in used if u not in exported}
    assert not missing, "not exported by Envoy: %s" % sorted(missing)
    labels = set(re.findall(r"by \((\w+)\)", rules + " ".join(exprs))) - {"le"}
    for label in labels:
        assert '%s="' % label in scrape, label
