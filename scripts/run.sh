#!/usr/bin/env bash
# Run any moezoo command after setting up .venv if needed, e.g. `bash scripts/run.sh demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
exec moezoo "$@"
