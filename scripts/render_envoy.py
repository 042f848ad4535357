#!/usr/bin/env python3
"""Render a runnable Envoy config from a shipped one (envoy/envoy.yaml by default).

The shipped file is what users copy; tests and `make run` run that same file with only
addresses swapped: listener and admin ports, the wasm path, the "gemini" cluster pointed at
fake-gemini (plain HTTP/1.1) instead of Google, the "app" cluster, and, for tests, the plugin
configuration and extra listeners that differ only in plugin configuration.

A changed plugin configuration is always made one way, with `with_plugin` (the shipped one
with some sections changed), and given whole: `render(plugin=...)`, `extra_listeners`, and
`harness.Envoy(...).set_plugin(...)` for a reload.

Every virtual host of a listener that runs the filter starts with the upstream route of
contract section 14 (`upstream_route`), which takes the streamed requests the filter rewrites;
the shipped configs carry it, extra listeners copy it with the rest, and a route added to a
rendered config goes after it, with `add_route`.

    python3 scripts/render_envoy.py --fake-gemini 127.0.0.1:8081 --out run/envoy.yaml
"""
import argparse
import copy
import json
import os
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BASE = os.path.join(ROOT, "envoy", "envoy.yaml")
DEFAULT_WASM = os.path.join(ROOT, "target", "wasm32-wasip1", "release", "gemini_image_filter.wasm")


# Contract section 14: the header in which the filter names the cluster of a request it sends
# upstream itself (streaming, section 12); a client request that carries it is refused.
UPSTREAM_HEADER = "x-gemini-image-filter-upstream"
UPSTREAM_ROUTE_NAME = "gemini-image-filter-upstream"


def upstream_route():
    """The upstream route of contract section 14, as the shipped configs carry it: first in
    every virtual host of a listener that runs the filter, with the filter on."""
    return {
        "name": UPSTREAM_ROUTE_NAME,
        "match": {"prefix": "/", "headers": [{"name": UPSTREAM_HEADER, "present_match": True}]},
        "route": {"cluster_header": UPSTREAM_HEADER, "timeout": "0s", "idle_timeout": "300s"},
        "request_headers_to_remove": [UPSTREAM_HEADER],
    }


def is_upstream_route(route):
    return route.get("name") == UPSTREAM_ROUTE_NAME


def add_route(listener, route, vhost=0):
    """Puts `route` before the other routes of a virtual host of `listener`, but after the
    upstream route, which stays first: a route added in front of it could take the requests
    the filter rewrites for Gemini."""
    routes = _hcm(listener)["route_config"]["virtual_hosts"][vhost]["routes"]
    at = 1 if routes and is_upstream_route(routes[0]) else 0
    routes.insert(at, route)
    return route


def _addr(s):
    host, port = s.rsplit(":", 1)
    return host, int(port)


def _hcm(listener):
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def _wasm_filter(listener):
    for f in _hcm(listener)["http_filters"]:
        if f["name"] == "envoy.filters.http.wasm":
            return f["typed_config"]["config"]
    raise ValueError("listener %s has no wasm filter" % listener["name"])


def plugin_config(listener):
    """The plugin configuration of a listener, as a dict."""
    return json.loads(_wasm_filter(listener)["configuration"]["value"] or "{}")


def shipped_plugin(base=DEFAULT_BASE):
    """The plugin configuration of a shipped Envoy config (envoy/envoy.yaml by default)."""
    with open(base) as f:
        return plugin_config(yaml.safe_load(f)["static_resources"]["listeners"][0])


def _merge_patch(target, patch):
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            out[key] = _merge_patch(out.get(key), value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def with_plugin(base=None, **sections):
    """A plugin configuration: `base` (the shipped one when None) with `sections` applied as a
    JSON merge patch (RFC 7386): a dict merges into what is there key by key, None removes the
    key (an absent `cache`, `cache.l1` or `cache.l2` is off), anything else replaces it.

        with_plugin(limits={"max_n": 10}, cache=None, urls=None)
        with_plugin(cache={"l1": None, "l2": {"cluster": "cache_down"}})
    """
    return _merge_patch(shipped_plugin() if base is None else base, sections)


def set_plugin_config(listener, cfg):
    """Puts a whole plugin configuration (a dict) into a listener's wasm filter."""
    _wasm_filter(listener)["configuration"]["value"] = json.dumps(cfg)


def _point_cluster(doc, name, host, port, plain_http1=True):
    for c in doc["static_resources"]["clusters"]:
        if c["name"] == name:
            c["type"] = "STATIC"
            c.pop("dns_lookup_family", None)
            c["load_assignment"] = {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}],
            }
            if plain_http1:
                c.pop("transport_socket", None)
                c.pop("typed_extension_protocol_options", None)
            return c
    raise ValueError("no cluster named %s" % name)


def render(
    base=DEFAULT_BASE,
    *,
    listen_port=None,
    admin_port=None,
    wasm=DEFAULT_WASM,
    fake_gemini=None,
    app=None,
    image_cache=None,
    plugin=None,
    extra_listeners=(),
    extra_clusters=(),
):
    """Returns the rendered config as a dict.

    plugin: the main listener's whole plugin configuration (a dict, made with `with_plugin`).
    extra_listeners: (name, port, plugin configuration) copies of the main listener.
    """
    with open(base) as f:
        doc = yaml.safe_load(f)
    listeners = doc["static_resources"]["listeners"]
    main = listeners[0]
    if admin_port is not None:
        doc["admin"]["address"]["socket_address"]["port_value"] = admin_port
    if listen_port is not None:
        main["address"]["socket_address"]["port_value"] = listen_port
    for listener in listeners:
        try:
            _wasm_filter(listener)["vm_config"]["code"]["local"]["filename"] = wasm
        except ValueError:
            pass
    if plugin is not None:
        set_plugin_config(main, plugin)
    if fake_gemini:
        _point_cluster(doc, "gemini", *_addr(fake_gemini))
    if app:
        _point_cluster(doc, "app", *_addr(app))
    if image_cache:
        _point_cluster(doc, "image_cache", *_addr(image_cache))
    for name, port, cfg_extra in extra_listeners:
        l = copy.deepcopy(main)
        l["name"] = name
        l["address"]["socket_address"]["port_value"] = port
        _hcm(l)["stat_prefix"] = name
        set_plugin_config(l, cfg_extra)
        listeners.append(l)
    for name, host, port in extra_clusters:
        doc["static_resources"]["clusters"].append(
            {
                "name": name,
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": name,
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}],
                },
            }
        )
    return doc


def write(doc, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=DEFAULT_BASE)
    p.add_argument("--out", required=True)
    p.add_argument("--fake-gemini", help="HOST:PORT of fake-gemini; omit to keep Google's TLS cluster")
    p.add_argument("--app", help="HOST:PORT of the application cluster")
    p.add_argument("--image-cache", help="HOST:PORT of cache-service")
    p.add_argument("--listen-port", type=int)
    p.add_argument("--admin-port", type=int)
    p.add_argument("--wasm", default=DEFAULT_WASM)
    a = p.parse_args()
    doc = render(a.base, listen_port=a.listen_port, admin_port=a.admin_port, wasm=a.wasm, fake_gemini=a.fake_gemini, app=a.app, image_cache=a.image_cache)
    write(doc, a.out)
    print(a.out)


if __name__ == "__main__":
    sys.exit(main())
