"""The deployment kit (issue 6): every shipped Envoy config is accepted by a real Envoy, the
plugin configurations inside the Istio and Envoy Gateway resources are accepted by the filter
itself, and the compose and Kubernetes files name files, ports and clusters that exist."""
import copy
import glob
import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from harness import ROOT, WASM, envoy_bin, http, render_envoy

ENVOY_DIR = os.path.join(ROOT, "envoy")


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


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def resources_by_kind(folder):
    """Every Kubernetes resource under envoy/<folder>, grouped by kind."""
    docs = {}
    for path in glob.glob(os.path.join(ENVOY_DIR, folder, "*.yaml")):
        for d in load_all(path):
            docs.setdefault(d["kind"], []).append(d)
    return docs


@pytest.mark.parametrize("name", sorted(os.path.basename(p) for p in glob.glob(os.path.join(ENVOY_DIR, "*.yaml"))
                                        if not p.endswith("docker-compose.yaml")))
def test_every_shipped_envoy_config_passes_validate(name, tmp_path):
    # The configs name the wasm where their deployment puts it (/etc/envoy/...); point it at
    # the module just built, and change nothing else.
    doc = render_envoy.render(os.path.join(ENVOY_DIR, name), wasm=WASM)
    validate(doc, tmp_path)


def test_sidecar_keeps_the_filter_and_the_buffer_off_the_apps_routes():
    doc = load_all(os.path.join(ENVOY_DIR, "sidecar.yaml"))[0]
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert [f["name"] for f in hcm["http_filters"]] == ["envoy.filters.http.wasm", "envoy.filters.http.buffer", "envoy.filters.http.router"]
    image, rest = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert image["match"] == {"safe_regex": {"regex": "/v1/images/generations/?"}}
    assert "typed_per_filter_config" not in image
    assert rest["typed_per_filter_config"]["envoy.filters.http.wasm"]["disabled"] is True
    assert rest["typed_per_filter_config"]["envoy.filters.http.buffer"]["disabled"] is True
    wasm = hcm["http_filters"][0]["typed_config"]["config"]
    assert wasm["failure_policy"] == "FAIL_RELOAD"
    assert set(wasm["vm_config"]["environment_variables"]["host_env_keys"]) >= {"GEMINI_API_KEY", "IMAGE_CACHE_TOKEN"}
    assert int(hcm["stream_idle_timeout"].rstrip("s")) >= 300, "minutes, not Envoy's defaults"
    buffer_limit = hcm["http_filters"][1]["typed_config"]["max_request_bytes"]
    assert buffer_limit > json.loads(wasm["configuration"]["value"])["limits"]["max_body_bytes"]
    gemini = [c for c in doc["static_resources"]["clusters"] if c["name"] == "gemini"][0]
    tls = gemini["transport_socket"]["typed_config"]
    assert tls["sni"] == "generativelanguage.googleapis.com"
    assert tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"].startswith("/etc/ssl/certs/")


def plugin_config_in_envoy(plugin, clusters, tmp_path, env=None):
    """Runs a plugin configuration through the filter's on_configure in a real Envoy, with the
    clusters it names present."""
    doc = render_envoy.render(wasm=WASM, plugin=plugin)
    for name in clusters:
        doc["static_resources"]["clusters"].append({
            "name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": 9}}}}]}]}})
    return validate(doc, tmp_path, env)


def test_istio_resources_fit_together(tmp_path):
    docs = resources_by_kind("istio")
    plugin = docs["WasmPlugin"][0]["spec"]
    cfg = plugin["pluginConfig"]
    se = docs["ServiceEntry"][0]["spec"]
    port = se["ports"][0]["number"]
    assert cfg["gemini"]["cluster"] == "outbound|%d||%s" % (port, se["hosts"][0])
    dr = docs["DestinationRule"][0]["spec"]
    assert dr["host"] == se["hosts"][0]
    assert dr["trafficPolicy"]["portLevelSettings"][0]["tls"]["mode"] == "SIMPLE"
    assert plugin["failStrategy"] == "FAIL_CLOSE"
    env = {e["name"]: e for e in plugin["vmConfig"]["env"]}
    assert env["GEMINI_API_KEY"]["valueFrom"] == "HOST"
    # The secret reaches the istio-proxy container under the names the VM reads.
    deploy = docs["Deployment"][0]["spec"]["template"]["spec"]
    proxy = [c for c in deploy["containers"] if c["name"] == "istio-proxy"][0]
    secret_env = {e["name"] for e in proxy["env"]}
    assert {n for n, e in env.items() if e["valueFrom"] == "HOST"} <= secret_env
    assert secret_env <= set(docs["Secret"][0]["stringData"])
    labels = docs["Deployment"][0]["spec"]["template"]["metadata"]["labels"]
    assert plugin["selector"]["matchLabels"].items() <= labels.items()
    assert docs["EnvoyFilter"][0]["spec"]["workloadSelector"]["labels"].items() <= labels.items()
    # The plugin configuration is one the filter accepts, with the level the VM env sets.
    plugin_config_in_envoy(cfg, [cfg["gemini"]["cluster"], cfg["cache"]["l2"]["cluster"]], tmp_path,
                           env={"GEMINI_IMAGE_SAFETY_THRESHOLD": env["GEMINI_IMAGE_SAFETY_THRESHOLD"]["value"]})
    # The EnvoyFilter's buffer filter is valid Envoy config, placed before the router.
    patch = docs["EnvoyFilter"][0]["spec"]["configPatches"][0]
    assert patch["patch"]["operation"] == "INSERT_BEFORE"
    assert patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"
    doc = render_envoy.render(wasm=WASM)
    filters = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    filters[1] = copy.deepcopy(patch["patch"]["value"])
    assert filters[1]["typed_config"]["max_request_bytes"] > 1048576
    validate(doc, tmp_path)


def test_envoy_gateway_resources_fit_together(tmp_path):
    docs = resources_by_kind("envoy-gateway")
    policy = docs["EnvoyExtensionPolicy"][0]["spec"]
    routes = {r["metadata"]["name"]: r for r in docs["HTTPRoute"]}
    assert policy["targetRefs"][0]["name"] in routes
    wasm = policy["wasm"][0]
    assert wasm["failOpen"] is False
    cfg = wasm["config"]
    # Envoy Gateway names a route rule's cluster httproute/<namespace>/<name>/rule/<index>.
    for cluster in (cfg["gemini"]["cluster"], cfg["cache"]["l2"]["cluster"]):
        _, ns, name, _, index = cluster.split("/")
        route = routes[name]
        assert route["metadata"]["namespace"] == ns and int(index) < len(route["spec"]["rules"])
    backends = {b["metadata"]["name"] for b in docs["Backend"]}
    assert routes["gemini-upstream"]["spec"]["rules"][0]["backendRefs"][0]["name"] in backends
    tls = docs["BackendTLSPolicy"][0]["spec"]
    assert tls["targetRefs"][0]["name"] == "gemini" and tls["validation"]["hostname"] == "generativelanguage.googleapis.com"
    limit = docs["BackendTrafficPolicy"][0]["spec"]["requestBuffer"]["limit"]
    assert int(limit.rstrip("Mi")) * 1024 * 1024 > cfg["limits"]["max_body_bytes"]
    assert set(wasm["env"]["hostKeys"]) >= {"GEMINI_API_KEY", "IMAGE_CACHE_TOKEN"}
    plugin_config_in_envoy(cfg, [cfg["gemini"]["cluster"], cfg["cache"]["l2"]["cluster"]], tmp_path)


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
    envoy_cfg = load_all(os.path.join(ENVOY_DIR, "compose-envoy.yaml"))[0]
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
    assert envoy_cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "http_filters"][0]["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] == wasm_path
    with open(os.path.join(ROOT, "deploy", "Dockerfile.wasm")) as f:
        assert "target/wasm32-wasip1/release/gemini_image_filter.wasm" in f.read()


def promtool():
    path = shutil.which("promtool")
    if not path:
        if os.environ.get("CI"):
            raise AssertionError("promtool missing (apt-get install prometheus)")
        pytest.skip("promtool is not installed (Debian package prometheus): alert rules not checked")
    return path


def test_alert_rules_pass_promtool():
    d = os.path.join(ROOT, "deploy", "prometheus")
    r = subprocess.run([promtool(), "check", "rules", "alerts.yaml"], cwd=d, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([promtool(), "test", "rules", "alerts_test.yaml"], cwd=d, capture_output=True, text=True)
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
