#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: sets up .venv from the lock if needed, then runs pytest on 2 workers.
#   bash scripts/test.sh [pytest args]                      the locked environment (what CI runs)
#   bash scripts/test.sh --latest [pytest args]             the newest versions pyproject.toml allows, in .venv-latest
#   bash scripts/test.sh --latest --transformers 5.25.0 ... the same with one transformers version installed --no-deps
#                                                           (for releases whose own new dependencies pip can't get here)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LATEST=0; TF=""
while [ $# -gt 0 ]; do
  case "$1" in
    --latest) LATEST=1; shift ;;
    --transformers) TF="$2"; shift 2 ;;
    *) break ;;
  esac
done
if [ "$LATEST" = 1 ]; then
  VENV="${MOEZOO_LATEST_VENV:-$ROOT/.venv-latest}"
  [ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  # shellcheck source=stack.sh
  . "$ROOT/scripts/stack.sh"
  install_apt_data
  echo "[test --latest] installing the newest allowed versions into $VENV" >&2
  install_stack_unlocked "$ROOT"
  if [ -n "$TF" ]; then
    python -m pip install --quiet --no-deps "transformers==$TF"
    export USE_HUB_KERNELS=0  # transformers >= 5.25 turns hub kernels on by default; there is no hub here
  fi
  python -m pip freeze --exclude-editable > "$VENV/versions.txt"
  echo "[test --latest] $(grep -i -E '^(torch|transformers|diffusers|timm|accelerate|peft|huggingface.hub)==' "$VENV/versions.txt" | tr '\n' ' ')" >&2
else
  [ -z "$TF" ] || { echo "--transformers needs --latest (the default run uses the lock)" >&2; exit 2; }
  # shellcheck source=setup.sh
  . "$ROOT/scripts/setup.sh"
fi
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
# two pytest workers on two cores: one torch thread each (two threads per worker oversubscribe and took 2x as long)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -n 2 --dist loadfile "$@"
