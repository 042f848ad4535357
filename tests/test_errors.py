"""Every row of the contract's error table, produced end to end through a real Envoy."""
import json
import time

import pytest

from conftest import unique


def error_of(resp):
    status, headers, body = resp
    v = json.loads(body)
    e = v["error"]
    assert set(["message", "type", "param", "code", "category", "resolution"]) <= set(e), e
    return status, headers, e


ROWS = {
    "IMG_INVALID_REQUEST": (400, "invalid_request_error", "USER_ERROR"),
    "IMG_INVALID_PROMPT": (400, "invalid_request_error", "USER_ERROR"),
    "IMG_UNSUPPORTED_MODEL": (400, "invalid_request_error", "USER_ERROR"),
    "IMG_PAYLOAD_TOO_LARGE": (413, "invalid_request_error", "USER_ERROR"),
    "IMG_SAFETY_BLOCKED": (400, "invalid_request_error", "USER_ERROR"),
    "IMG_QUOTA_EXHAUSTED": (429, "rate_limit_error", "API_ERROR"),
    "IMG_SERVICE_UNAVAILABLE": (503, "api_error", "API_ERROR"),
    "IMG_UPSTREAM_AUTH": (502, "api_error", "SYSTEM_ERROR"),
    "IMG_UPSTREAM_ERROR": (502, "api_error", "API_ERROR"),
    "IMG_NO_IMAGE": (502, "api_error", "API_ERROR"),
    "IMG_NETWORK_ERROR": (502, "api_error", "NETWORK_ERROR"),
    "IMG_INTERNAL_ERROR": (500, "server_error", "SYSTEM_ERROR"),
}


def check(resp, code, param="any", status=None):
    got_status, headers, e = error_of(resp)
    want_status, want_type, want_cat = ROWS[code]
    assert e["code"] == code, e
    assert got_status == (status or want_status), (got_status, e)
    assert e["type"] == want_type and e["category"] == want_cat
    if param != "any":
        assert e["param"] == param, e
    if got_status in (400, 413):
        assert headers.get("x-should-retry") == "false"
    assert headers["content-type"] == "application/json"
    return headers, e


@pytest.mark.parametrize("raw,ctype", [
    (b"{not json", "application/json"),
    (b"[1,2]", "application/json"),
    (b"", "application/json"),
    (b'{"prompt":"a cat"}', "text/plain"),
    (b"prompt=a+cat", "application/x-www-form-urlencoded"),
])
def test_invalid_request_bodies(client, raw, ctype):
    check(client.post(None, raw=raw, headers={"content-type": ctype}), "IMG_INVALID_REQUEST")


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", 5), ("n", "two"), ("size", "3000x1000"), ("size", "big"), ("quality", "ultra"),
    ("style", "cubist"), ("response_format", "jpeg"), ("output_format", "webp"), ("background", "transparent"),
    ("stream", "yes"), ("partial_images", 4), ("safety_threshold", "EXTREME"), ("image_size", "8K"), ("aspect_ratio", "7:3"),
])
def test_each_bad_field_is_named(client, field, value):
    check(client.post({"prompt": unique(), field: value}), "IMG_INVALID_REQUEST", param=field)


@pytest.mark.parametrize("body", [{}, {"prompt": ""}, {"prompt": 42}, {"prompt": "x" * 32001}])
def test_invalid_prompts(client, body):
    check(client.post(body), "IMG_INVALID_PROMPT", param="prompt")


def test_gemini_invalid_argument_is_an_invalid_prompt(client):
    check(client.post({"prompt": unique("[fake:status=400]")}), "IMG_INVALID_PROMPT", param="prompt")


def test_unsupported_model(client):
    _, e = check(client.post({"prompt": unique(), "model": "dall-e-2"}), "IMG_UNSUPPORTED_MODEL", param="model")
    assert "dall-e-2" in e["message"]


def test_payload_too_large_by_content_length_and_chunked(client, envoy):
    big = json.dumps({"prompt": "p", "pad": "x" * (1024 * 1024 + 10)}).encode()
    check(client.post(None, raw=big), "IMG_PAYLOAD_TOO_LARGE")
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=30)
    conn.putrequest("POST", "/v1/images/generations")
    conn.putheader("content-type", "application/json")
    conn.putheader("transfer-encoding", "chunked")
    conn.endheaders()
    try:
        for i in range(0, len(big), 65536):
            chunk = big[i:i + 65536]
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # Envoy may answer and close before the whole body is sent
    r = conn.getresponse()
    check((r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()), "IMG_PAYLOAD_TOO_LARGE")


@pytest.mark.parametrize("marker", ["[fake:block=SAFETY]", "[fake:block=PROHIBITED_CONTENT]", "[fake:finish=IMAGE_SAFETY]", "[fake:finish=SAFETY]"])
def test_safety_blocks(client, marker):
    check(client.post({"prompt": unique(marker)}), "IMG_SAFETY_BLOCKED")


def test_quota_with_and_without_retry_info(client):
    headers, _ = check(client.post({"prompt": unique("[fake:status=429] [fake:retry=17]")}), "IMG_QUOTA_EXHAUSTED")
    assert headers["retry-after"] == "17"
    headers, _ = check(client.post({"prompt": unique("[fake:status=429]")}), "IMG_QUOTA_EXHAUSTED")
    assert "retry-after" not in headers


def test_service_unavailable(client):
    check(client.post({"prompt": unique("[fake:status=503]")}), "IMG_SERVICE_UNAVAILABLE")


@pytest.mark.parametrize("how", ["[fake:status=401]", "[fake:status=403]", "[fake:keyinvalid]", "listener:nokey", "listener:wrongkey"])
def test_upstream_auth_leaks_no_detail(client, how):
    listener = how.split(":")[1] if how.startswith("listener:") else "images"
    prompt = unique(how if listener == "images" else "auth")
    _, e = check(client.post({"prompt": prompt}, listener=listener), "IMG_UPSTREAM_AUTH")
    assert "key" not in e["message"].lower() or "not valid" not in e["message"].lower()
    assert "not-the-key" not in json.dumps(e)


@pytest.mark.parametrize("marker", ["[fake:status=500]", "[fake:status=404]", "[fake:garbage]", "[fake:truncated]",
                                    "[fake:empty]", "[fake:badb64]", "[fake:ctype=text/html] [fake:garbage]"])
def test_upstream_errors(client, marker):
    check(client.post({"prompt": unique(marker)}), "IMG_UPSTREAM_ERROR")


@pytest.mark.parametrize("marker", ["[fake:noimage]", "[fake:finish=MAX_TOKENS]"])
def test_no_image(client, marker):
    check(client.post({"prompt": unique(marker)}), "IMG_NO_IMAGE")


def test_connection_refused_is_a_network_error(client):
    check(client.post({"prompt": unique()}, listener="refused"), "IMG_NETWORK_ERROR", status=502)


def test_reset_is_a_network_error(client):
    check(client.post({"prompt": unique("[fake:reset]")}), "IMG_NETWORK_ERROR", status=502)


def test_timeout_is_a_504_network_error(client):
    t = time.time()
    check(client.post({"prompt": unique("[fake:delay=4000]")}, listener="slow"), "IMG_NETWORK_ERROR", status=504)
    assert time.time() - t < 3.5, "the filter's timeout (1.5 s) must end the wait"


def test_answer_over_the_call_out_limit_is_a_network_error(client):
    check(client.post({"prompt": unique("[fake:huge]")}, timeout=120), "IMG_NETWORK_ERROR")


def test_unknown_cluster_is_an_internal_error(client):
    check(client.post({"prompt": unique()}, listener="nocluster"), "IMG_INTERNAL_ERROR")


def test_errors_carry_the_headers_known_so_far(client):
    prompt = unique("[fake:status=503]")
    headers, _ = check(client.post({"prompt": prompt, "safety_threshold": "low"}), "IMG_SERVICE_UNAVAILABLE")
    assert headers["x-image-safety"] == "LOW"
    assert len(headers["x-image-prompt-hash"]) == 16
    assert headers["x-image-cache"] == "miss"
