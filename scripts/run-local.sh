#!/usr/bin/env bash
# Runs the gateway on this machine: Envoy with the filter on 127.0.0.1:8080 (admin :9901),
# and cache-service (the L2 cache) on 127.0.0.1:8090 with its data in run/cache.
# Without GEMINI_API_KEY it starts the bundled fake-gemini on 127.0.0.1:8081 and points the
# "gemini" cluster there; with the key, Envoy calls Google's API over TLS.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
ENVOY=${ENVOY_BIN:-$("$PY" -c 'import sys; sys.path.insert(0, "tests"); from harness import envoy_bin; print(envoy_bin())')}
mkdir -p run
pids=()
cleanup() { for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

# The L2 cache service, on disk under run/cache, with a token made for this run.
export IMAGE_CACHE_TOKEN=${IMAGE_CACHE_TOKEN:-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}
target/release/cache-service --listen 127.0.0.1:8090 --dir run/cache --max-bytes 1073741824 > run/cache-service.log 2>&1 &
pids+=($!)

if [ -z "${GEMINI_API_KEY:-}" ]; then
  echo "GEMINI_API_KEY is not set: using the bundled fake-gemini on 127.0.0.1:8081"
  target/release/fake-gemini --listen 127.0.0.1:8081 > run/fake-gemini.log 2>&1 &
  pids+=($!)
  export GEMINI_API_KEY=fake-key
  "$PY" scripts/render_envoy.py --fake-gemini 127.0.0.1:8081 --out run/envoy.yaml >/dev/null
else
  echo "GEMINI_API_KEY is set: Envoy calls generativelanguage.googleapis.com"
  "$PY" scripts/render_envoy.py --out run/envoy.yaml >/dev/null
fi

cat <<'MSG'

Envoy is starting on http://127.0.0.1:8080 (admin http://127.0.0.1:9901). Try:

  curl -s http://127.0.0.1:8080/v1/images/generations \
    -H 'content-type: application/json' \
    -d '{"model": "gemini-3-pro-image", "prompt": "a lighthouse at dusk", "size": "1792x1024"}' \
    | head -c 300; echo

Send it twice: the second answer says x-image-cache: hit-l1 (curl -si to see the headers).
Stop with Ctrl-C.
MSG
"$ENVOY" -c run/envoy.yaml --concurrency 2 --disable-hot-restart --log-level warning --component-log-level wasm:info &
pids+=($!)
wait "${pids[-1]}"
