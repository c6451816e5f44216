#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: sets up .venv if needed, then runs pytest on 2 workers.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
exec python -m pytest -n 2 --dist loadfile "$@"
