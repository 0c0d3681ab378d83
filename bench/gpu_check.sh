#!/usr/bin/env bash
# One device call for the Triton kernels (issue 21): the compiled kernels against the reference on the GPU, then
# their speed beside fp16 F.linear (eager and under CUDA graphs) and the copy bandwidth measured in the same run, on
# Llama-3-8B and Qwen2.5-1.5B shapes, then end-to-end decode of a random model with Qwen2.5-1.5B shapes, fp16 vs
# 2.5/3/4 bits. Logs go to $OUT (default /tmp/xbit-gpu-check); a short summary is printed last. Sized for under 8
# minutes on an H100 (each step has its own time limit, so a slow autotune cuts a table short instead of the call).
#
#   bash bench/gpu_check.sh             # on the GPU machine (python3 with torch and triton)
#   bash bench/gpu_check.sh --dry-run   # without a GPU: the same steps on tiny shapes through TRITON_INTERPRET=1
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/xbit-gpu-check}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1  # a step cut at its time limit keeps the rows it printed

{ nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
                                     torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
} > "$OUT/env.txt" 2>&1

if ! $PY -c "import pytest" 2>/dev/null; then
  echo "pytest is not installed for $PY: the correctness step is skipped" | tee "$OUT/tests.txt"
  TESTS=()
elif [ "${1:-}" = --dry-run ]; then
  TESTS=(env TRITON_INTERPRET=1 timeout 900 "$PY" -m pytest -q -p no:cacheprovider tests/triton_kernels/test_matmul.py)
else
  TESTS=(env TRITON_INTERPRET=0 timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/triton_kernels/test_cuda.py)
fi
if [ ${#TESTS[@]} -gt 0 ]; then
  "${TESTS[@]}" > "$OUT/tests.txt" 2>&1
  echo "correctness: exit $?" >> "$OUT/summary.txt"
fi

if [ "${1:-}" = --dry-run ]; then
  BENCH=(timeout 300 "$PY" bench/kernels.py --dry-run)
  DECODE=(timeout 120 "$PY" bench/kernels.py --decode --dry-run)
else
  BENCH=(timeout 200 "$PY" bench/kernels.py --batches 1 16 64 --mixes u2 u3 u4 mix2.5
         --shapes 4096x4096 14336x4096 4096x14336 8960x1536 1536x8960)
  DECODE=(timeout 110 "$PY" bench/kernels.py --decode --bits 2.5 3 4)
fi
"${BENCH[@]}" > "$OUT/kernels.txt" 2>&1
echo "kernels: exit $?" >> "$OUT/summary.txt"
"${DECODE[@]}" > "$OUT/decode.txt" 2>&1
echo "decode: exit $?" >> "$OUT/summary.txt"

cat "$OUT/env.txt" | tail -n 1
tail -n 3 "$OUT/tests.txt"
tail -n 70 "$OUT/kernels.txt"
tail -n 8 "$OUT/decode.txt"
cat "$OUT/summary.txt"
