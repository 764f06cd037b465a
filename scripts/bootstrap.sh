#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment at .venv and install promptcl into it.
# Idempotent: a second call only re-checks the install (a few seconds with uv's warm cache).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PROMPTCL_PYTHON:-$(command -v python3.11 || command -v python3)}"

# uv resolves the pinned stack in ~1 s; it is installed into a private tool venv.
if [ ! -x .tools/bin/uv ]; then
    "$python" -m venv .tools
    .tools/bin/pip install -q --disable-pip-version-check uv==0.13.9
fi

# Hand the machine's pip configuration (local wheel folders, local indexes) to uv, so the
# large torch/CUDA wheels come from local disk when this machine has them.
links=""
for d in $("$python" -m pip config get global.find-links 2>/dev/null || true); do
    [ -d "$d" ] && links="${links:+$links,}$d"
done
extra="$("$python" -m pip config get global.extra-index-url 2>/dev/null || true)"
[ -n "$links" ] && export UV_FIND_LINKS="$links"
[ -n "$extra" ] && export UV_EXTRA_INDEX_URL="$extra"
export UV_INDEX_STRATEGY=unsafe-best-match
# Without bytecode every process (each Ray worker too) pays ~3 s extra importing torch and ray.
export UV_COMPILE_BYTECODE=1

[ -x .venv/bin/python ] || .tools/bin/uv venv -q --python "$python" .venv
.tools/bin/uv pip install -q --python .venv/bin/python -e '.[test]'
