#!/usr/bin/env bash
# Set up .venv (first call) and run the test suite on two pytest-xdist workers, a test file at a
# time each (module fixtures are made once; the Ray tests mostly wait on process start-up, so a
# second worker uses the otherwise idle core). Extra arguments go to pytest (-n 0: one process).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
unset RAY_ADDRESS MLFLOW_TRACKING_URI
exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
