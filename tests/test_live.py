"""A smoke test against Google's real API. Runs only when GEMINI_API_KEY is set."""
import base64
import json
import os

import pytest

from harness import Envoy, http

pytestmark = pytest.mark.live


@pytest.mark.skipif(not os.environ.get("GEMINI_API_KEY"), reason="GEMINI_API_KEY is not set: live Gemini smoke test skipped")
def test_live_generation(tmp_path):
    e = Envoy(str(tmp_path), name="envoy-live")  # the shipped config, Google's TLS cluster as is
    try:
        status, headers, body = http("POST", e.url() + "/v1/images/generations",
                                     json.dumps({"prompt": "a small red square on white", "model": "gemini-3-pro-image"}).encode(),
                                     {"content-type": "application/json"}, timeout=200)
        assert status == 200, body[:500]
        data = json.loads(body)["data"]
        assert base64.b64decode(data[0]["b64_json"])[:4] == b"\x89PNG"
    finally:
        e.stop()


@pytest.mark.skipif(not (os.environ.get("VERTEX_PROJECT") and os.environ.get("VERTEX_API_KEY")),
                    reason="VERTEX_PROJECT and VERTEX_API_KEY are not set: live Vertex AI smoke test skipped")
def test_live_vertex_generation(tmp_path):
    """The same through a `vertex` backend with an API key (VERTEX_LOCATION, default global)."""
    import copy
    from harness import with_plugin
    location = os.environ.get("VERTEX_LOCATION", "global")
    host = "aiplatform.googleapis.com" if location == "global" else "%s-aiplatform.googleapis.com" % location
    plugin = with_plugin(backends=[{"name": "vertex", "kind": "vertex", "cluster": "vertex_live",
                                    "project": os.environ["VERTEX_PROJECT"], "location": location,
                                    "auth": {"api_key_env": "VERTEX_API_KEY"}}])
    e = Envoy(str(tmp_path), name="envoy-live-vertex", plugin=plugin, env_extra={"VERTEX_API_KEY": os.environ["VERTEX_API_KEY"]},
              doc_hook=lambda doc: _add_tls_cluster(doc, "vertex_live", host))
    try:
        status, _, body = http("POST", e.url() + "/v1/images/generations",
                               json.dumps({"prompt": "a small blue circle on white"}).encode(),
                               {"content-type": "application/json"}, timeout=200)
        assert status == 200, body[:500]
        assert base64.b64decode(json.loads(body)["data"][0]["b64_json"])[:4] == b"\x89PNG"
    finally:
        e.stop()


def _add_tls_cluster(doc, name, host):
    """A copy of the shipped `gemini` cluster (TLS, SNI, HTTP/2) for another Google host."""
    import copy
    (gemini,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == "gemini"]
    c = copy.deepcopy(gemini)
    c["name"] = name
    c["load_assignment"]["cluster_name"] = name
    c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"] = host
    tls = c["transport_socket"]["typed_config"]
    tls["sni"] = host
    tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"][0]["matcher"]["exact"] = host
    doc["static_resources"]["clusters"].append(c)
