#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: sets up .venv if needed, then runs pytest on 2 workers.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
# two pytest workers on two cores: one torch thread each (two threads per worker oversubscribe and took 2x as long)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -n 2 --dist loadfile "$@"
