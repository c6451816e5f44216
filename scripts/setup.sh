#!/usr/bin/env bash
# Idempotent set-up of a fresh machine (python3, pip and git are all it needs): a virtual environment in .venv holding
# exactly the versions in requirements/lock.txt (installed --no-deps: the lock is the whole closure), moezoo itself
# (editable, no deps) and the Debian data packages the tests read. Sourced by scripts/run.sh and scripts/test.sh.
# Refresh the lock with `bash scripts/lock.sh`; test the newest allowed versions with `bash scripts/test.sh --latest`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MOEZOO_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# shellcheck source=stack.sh
. "$ROOT/scripts/stack.sh"
STAMP="$VENV/.moezoo-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" "$ROOT/scripts/stack.sh" "$ROOT/requirements/lock.txt" \
        | sha256sum | cut -d' ' -f1)"
install_apt_data
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing the locked environment into $VENV (first run takes a few minutes)" >&2
  python -m pip install --quiet --upgrade pip
  install_torch
  python -m pip install --quiet --no-deps -r "$ROOT/requirements/lock.txt"
  python -m pip install --quiet --no-deps -e "$ROOT"
  echo "$WANT" > "$STAMP"
fi
