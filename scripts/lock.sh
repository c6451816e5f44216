#!/usr/bin/env bash
# Refresh requirements/lock.txt: resolve the newest versions pyproject.toml allows in a throw-away venv, run nothing,
# and write the exact versions of the whole stack (torch ... numpy and every transitive dependency).
# After refreshing: run `bash scripts/test.sh` (uses the new lock), and commit the lock only if it passes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m venv "$TMP/venv"
. "$TMP/venv/bin/activate"
. "$ROOT/scripts/stack.sh"
install_stack_unlocked "$ROOT"
{
  echo "# moezoo's locked environment: exact versions of everything the tests and demos import."
  echo "# Installed with --no-deps by scripts/setup.sh; refreshed by scripts/lock.sh ($(date -u +%Y-%m-%d), $(python --version))."
  python -m pip freeze --exclude-editable | grep -v -i '^moezoo'
} > "$ROOT/requirements/lock.txt"
echo "[lock] wrote $ROOT/requirements/lock.txt ($(grep -vc '^#' "$ROOT/requirements/lock.txt") packages)" >&2
