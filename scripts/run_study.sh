#!/usr/bin/env bash
# Set up .venv (first call) and run the default study: the SMoPE top-k sweep on the offline
# mnist5k benchmark, local Ray, MLflow in runs/mlflow.db. Extra arguments go to the study.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
exec .venv/bin/python studies/smope_topk.py "$@"
