#!/usr/bin/env bash
# The GPU checks of the performance work in ONE call on a lent GPU machine (its own python3, torch and
# timm; nothing installed), each step under its own time limit so the figures come back even if a
# later step runs long (at most 530 s in all: one device call). From the repository root:
#
#   bash benchmarks/gpu_check.sh            # writes to $OUT (the device tool's folder) or runs/gpu_check
#
# 1. tests/test_attention.py and tests/test_gpu.py: prefix paths equal on CUDA, every method computes
#    on CUDA what it computes on the CPU (they skip where there is no CUDA device);
# 2. NoRGa and SMoPE, every prefix path (eager / fused / merged), batch 128, bf16, GPU kernel time: the
#    open question is whether `merged` brings their bf16 forward per pass to <= 1.10x a plain pass;
#    if so, `auto` should pick it on CUDA (promptcl/core/attention.py, prefix_attention). Its log also
#    holds the 12 costliest kernels of the plain and of each prompted bf16 forward (--profile), so a
#    path that still misses the target shows where its excess goes without another device call;
# 3. every method at batch 128, bf16, kernel time: the README's "On a GPU" table, re-measured;
# then one verdict line per gated method (its bf16 per-pass ratio on each path, the fastest, and
# whether that meets 1.10x), also in $out/verdict.txt.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-runs/gpu_check}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python="$(command -v "${PYTHON:-python3}")"
status=0

step() {  # step NAME SECONDS COMMAND...: run, log to $out/NAME.log, record its exit status
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc" | tee -a "$out/steps.txt"
    [ "$rc" = 0 ] || status=1
}

step versions 60 "$python" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
step gpu_tests 150 "$python" -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_gpu.py
step gated_paths 120 "$python" benchmarks/prompted_step.py --device cuda --bf16 --batch 128 --repeats 3 --clock kernels \
    --methods smope norga --profile --json "$out/gated_paths.json"
step all_methods 200 "$python" benchmarks/prompted_step.py --device cuda --bf16 --batch 128 --repeats 3 --clock kernels \
    --json "$out/all_methods.json"
# The open question in one line per gated method, as step 2 printed it.
grep '^verdict:' "$out/gated_paths.log" | tee "$out/verdict.txt"
cat "$out/steps.txt"
exit $status
