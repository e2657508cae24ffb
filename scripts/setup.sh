#!/usr/bin/env bash
# Make this machine ready to run and test edgefleet: Debian packages, Node-RED 4 from npm, and a
# virtualenv in .venv with the project installed editable (with the dev extra).
#
# Idempotent and quick when nothing changed: each step checks first and says what it skips, so
# test.sh and demo.sh can call it every time. Run it as root on Debian 12 when packages are missing.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DEBIAN_PACKAGES=(
  mosquitto mosquitto-clients wireguard-go wireguard-tools nftables iproute2 docker-compose
  nodejs npm python3-venv
)
NODE_RED_SPEC="node-red@4" # pin the major: the deployer speaks Node-RED 4's Admin API
PYTHON="${EDGEFLEET_PYTHON:-python3}"
STAMP="$VENV/.edgefleet-setup-stamp"

deb_installed() {
  [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

install_debian_packages() {
  local missing=() pkg
  for pkg in "${DEBIAN_PACKAGES[@]}"; do
    # Node.js and npm often come from elsewhere (NodeSource, nvm): Debian's npm would then clash.
    case "$pkg" in
      nodejs) command -v node >/dev/null 2>&1 && continue ;;
      npm) command -v npm >/dev/null 2>&1 && continue ;;
    esac
    deb_installed "$pkg" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    say "Debian packages: all present"
    return
  fi
  command -v apt-get >/dev/null 2>&1 \
    || die "missing packages (${missing[*]}) and no apt-get: install them by hand (this script targets Debian 12)"
  [ "$(id -u)" -eq 0 ] \
    || die "missing Debian packages: ${missing[*]}; run this script as root, or: apt-get install ${missing[*]}"
  say "Debian packages: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends "${missing[@]}"
}

check_node_version() {
  local major
  major="$(node -p 'process.versions.node.split(".")[0]')"
  [ "$major" -ge 18 ] || die "Node.js $(node --version) is too old for Node-RED 4 (needs 18 or newer)"
}

install_node_red() {
  if [ -n "${EDGEFLEET_NODE_RED:-}" ]; then
    [ -x "$EDGEFLEET_NODE_RED" ] || die "EDGEFLEET_NODE_RED=$EDGEFLEET_NODE_RED is not an executable file"
    say "Node-RED: using EDGEFLEET_NODE_RED=$EDGEFLEET_NODE_RED"
    return
  fi
  if [ -x "$NODE_RED_BIN" ]; then
    say "Node-RED: present in ${NODE_RED_BIN#"$REPO"/}"
    return
  fi
  say "Node-RED: npm install --prefix .cache/node-red $NODE_RED_SPEC"
  mkdir -p "$NODE_RED_PREFIX"
  npm install --prefix "$NODE_RED_PREFIX" --no-audit --no-fund --loglevel=error "$NODE_RED_SPEC"
  [ -x "$NODE_RED_BIN" ] || die "npm finished but $NODE_RED_BIN is missing"
}

install_venv() {
  command -v "$PYTHON" >/dev/null 2>&1 || die "no $PYTHON on PATH (set EDGEFLEET_PYTHON to a Python 3.11+)"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" --version 2>&1); edgefleet needs Python 3.11 or newer (set EDGEFLEET_PYTHON)"
  if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    [ -e "$VENV" ] && say "venv: $VENV is broken, recreating it"
    rm -rf "$VENV"
    say "venv: $PYTHON -m venv .venv"
    "$PYTHON" -m venv "$VENV"
  fi
  # Reinstall only when what pip would read changed: the project metadata, where the tree lives
  # (an editable install points at it) and the interpreter.
  local want
  want="$(
    {
      sha256sum "$REPO/pyproject.toml"
      echo "$REPO"
      "$VENV/bin/python" --version
    } | sha256sum | cut -d' ' -f1
  )"
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    say "venv: up to date (pyproject.toml unchanged since the last install)"
    return
  fi
  say "venv: pip install -e '.[dev]'"
  "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet -e "${REPO}[dev]"
  echo "$want" >"$STAMP"
}

main() {
  mkdir -p "$REPO/.cache"
  # Two scripts started together (test.sh and demo.sh) must not both run npm or pip here.
  exec 9>"$REPO/.cache/setup.lock"
  flock 9
  install_debian_packages
  check_node_version
  install_node_red
  install_venv
  say "ready in ${SECONDS}s (venv: .venv, Node-RED: ${NODE_RED_BIN#"$REPO"/})"
}

main "$@"
