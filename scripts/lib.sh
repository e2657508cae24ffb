# shellcheck shell=bash disable=SC2034  # the variables are for the scripts that source this
# Helpers shared by the scripts in this folder. Sourced, never run on its own.
#
# Every script works from any current directory: paths are derived from this file's location,
# not from $PWD.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
NODE_RED_PREFIX="$REPO/.cache/node-red"
# Other code (tests, the demo) finds Node-RED the same way: EDGEFLEET_NODE_RED, else this path.
NODE_RED_BIN="${EDGEFLEET_NODE_RED:-$NODE_RED_PREFIX/node_modules/.bin/node-red}"
EF_SCRIPT="$(basename "$0" .sh)"

say() { printf '[%s] %s\n' "$EF_SCRIPT" "$*"; }
warn() { printf '[%s] warning: %s\n' "$EF_SCRIPT" "$*" >&2; }
die() {
  printf '[%s] error: %s\n' "$EF_SCRIPT" "$*" >&2
  exit 1
}
