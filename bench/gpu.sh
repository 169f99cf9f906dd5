#!/usr/bin/env bash
# GPU benchmarks on one lent H200, in under 8 minutes: decode at batch 1 in bfloat16 (eager, compiled
# decode step with CUDA graphs, HF generate, bandwidth bound), batching up to 64 rows, and training
# tokens/s with MFU for the seed preset. Each part has its own time limit, so one slow part cannot
# eat the others' time. Tables go to stdout and, with OUT set, into $OUT/benchmarks.md.
#
#   bench/gpu.sh              # on the GPU machine, from the repository root
#   bench/gpu.sh --dry-run    # tiny shapes on the CPU: checks the code paths, measures nothing
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
DOCS_ARGS=()
[ -n "${OUT:-}" ] && DOCS_ARGS=(--docs "$OUT")

if [ "${1:-}" = "--dry-run" ]; then
    exec "$PYTHON" -m bench.gpu all --dry-run "${DOCS_ARGS[@]}"
fi

"$PYTHON" - <<'EOF'
import torch
assert torch.cuda.is_available(), "bench/gpu.sh needs CUDA; use --dry-run on a CPU"
print(torch.__version__, torch.cuda.get_device_name(), flush=True)
EOF
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv || true

status=0
# GPU_BENCH_SECONDS (default 450, under the 8 minutes allowed; compilation is inside it) bounds the
# three parts together: each part may use the time still left divided by the parts still to run, so
# a part that ends early leaves its time to the next. scripts/gpu-check sets it from its own budget.
BUDGET=${GPU_BENCH_SECONDS:-450}
started=$SECONDS
parts=(decode batching training)
for i in "${!parts[@]}"; do
    limit=$(( (BUDGET - (SECONDS - started)) / (${#parts[@]} - i) ))
    if [ "$limit" -lt 10 ]; then
        echo "bench/gpu.sh: no time left for ${parts[i]} (budget ${BUDGET} s)" >&2
        status=124
        continue
    fi
    echo "bench/gpu.sh: ${parts[i]}, at most ${limit} s" >&2
    timeout -k 10 "$limit" "$PYTHON" -m bench.gpu "${parts[i]}" "${DOCS_ARGS[@]}" || status=$?
done
exit "$status"
