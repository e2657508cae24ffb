#!/usr/bin/env bash
# The README's test command: prepare the machine (setup.sh), then lint, format check, type check
# and the test suite, all from .venv. Extra arguments go to pytest ("./scripts/test.sh -k enroll").
#
# Every step runs even when an earlier one failed, so one run shows every problem; pytest runs
# last so its summary line closes the output. The exit status is non-zero if any step failed.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bash "$REPO/scripts/setup.sh"
cd "$REPO"
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"

failed=()
step() {
  local name="$1"
  shift
  say "$name: $*"
  if ! "$@"; then
    failed+=("$name")
  fi
}

step "ruff check" ruff check .
step "ruff format" ruff format --check .
step "mypy" mypy
if [ ${#failed[@]} -ne 0 ]; then
  warn "failed: ${failed[*]}; running pytest anyway"
fi
step "pytest" pytest "$@"

if [ ${#failed[@]} -ne 0 ]; then
  die "failed: ${failed[*]}"
fi
