#!/usr/bin/env bash
# One GPU check, on a machine with one CUDA GPU, torch and triton installed, no network:
#
#   bash bench/gpu_check.sh [OUTDIR]            # under 8 minutes; rows and logs land in OUTDIR
#   bash bench/gpu_check.sh [OUTDIR] --dry-run  # anywhere: what it would run, and that it all imports
#
# 1. the kernel tests on CUDA (values and gradients against float64, float16 / bfloat16 /
#    float32, odd shapes): the same test files CI runs under the interpreter;
# 2. compute-sanitizer racecheck and memcheck on one small case per kernel, when the tool exists;
# 3. the benchmark cases behind the GPU goals (window attention at N = 577 with AWD-like and full
#    windows against SDPA dense, SDPA + bool mask and Flex with its mask build; WinfT forward +
#    backward + BCE against the reference; the PaCa layer; model throughput and training memory,
#    PaCa-ViT against pvt_v2), appended as JSON rows to OUTDIR/<gpu>.jsonl, and a summary table.
# Every step has its own time limit, so the whole run stays under 8 minutes whatever happens.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=bench/results/gpu-check
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    *) OUT="$arg" ;;
  esac
done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
TESTS="tests/test_window_kernel.py tests/test_winft_kernel.py tests/test_cluster_attention_kernels.py \
tests/test_window_attention.py tests/test_winft_attention.py tests/test_cluster_attention.py"
BENCH=(
  "75 --ops window_attention --filter N=577"
  "45 --ops winft_attention --filter N=577|N=197"
  "30 --ops cluster_attention"
  "60 --ops models"
)
status=0
step() {  # step SECONDS NAME COMMAND...
  local limit=$1 name=$2; shift 2
  echo "== $name (at most ${limit} s): $*"
  if [ "$DRY" = 1 ]; then return 0; fi
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc" | tee -a "$OUT/summary.txt"
  [ "$rc" = 0 ] || status=1
}

if [ "$DRY" = 1 ]; then
  python - <<'PY' || exit 1
import importlib
for m in ("vitpatch", "vitpatch.functional", "vitpatch.nn", "vitpatch.models", "vitpatch.tiles",
          "vitpatch.kernels.window_attention", "vitpatch.kernels.winft_attention",
          "vitpatch.kernels.cluster_attention", "bench.compile", "bench.harness"):
    importlib.import_module(m)
print("imports: ok")
PY
  python bench/gpu_smoke.py --dry-run || exit 1
  command -v compute-sanitizer >/dev/null && echo "compute-sanitizer: found" || echo "compute-sanitizer: not found (step 2 would be skipped)"
else
  python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1
  : > "$OUT/summary.txt"
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
fi

step 140 tests python -m pytest -q -x $TESTS
if command -v compute-sanitizer >/dev/null; then
  step 35 racecheck compute-sanitizer --tool racecheck --error-exitcode 1 python bench/gpu_smoke.py
  step 35 memcheck compute-sanitizer --tool memcheck --error-exitcode 1 python bench/gpu_smoke.py
else
  echo "== compute-sanitizer not found: racecheck and memcheck skipped" | tee -a "$OUT/summary.txt"
fi
for spec in "${BENCH[@]}"; do
  read -r limit args <<<"$spec"
  name="bench-$(echo "$args" | awk '{print $2}')"
  # shellcheck disable=SC2086
  step "$((limit + 10))" "$name" python -m bench --device cuda $args --time-limit "$limit" --out "$OUT"
done
if [ "$DRY" = 0 ]; then
  python -m bench.plot "$OUT" > "$OUT/plot.log" 2>&1 || true
  cat "$OUT/summary.txt"
fi
exit $status
