#!/usr/bin/env bash
# The one GPU check, for a machine with one CUDA GPU, torch and triton installed and no network:
#
#   bash bench/gpu_check.sh [OUTDIR]            # at most 7 minutes; results land in OUTDIR
#   bash bench/gpu_check.sh [OUTDIR] --dry-run  # anywhere: the plan with each step's budget, and
#                                               # that everything it runs imports
#
# PYTHON (default python3) is the interpreter that has torch and triton; nothing else named
# python is called. The script makes this checkout importable by itself: when `vitpatch.kernels`
# does not resolve to this tree, it installs the tree into PYTHON editable, offline
# (pip --no-index --no-deps --no-build-isolation: no registry is asked; setuptools must be there).
#
# Steps, in order of value, each under its own time limit and each recorded in
# OUTDIR/summary.json as soon as it ends (a run cut off keeps the earlier steps):
#   1. tests      the kernel tests on CUDA (values and gradients against float64, float16 /
#                 bfloat16 / float32, odd shapes); in parallel with pytest-xdist when it is there,
#                 which also compiles (warms) the kernels in parallel for the later steps;
#   2. racecheck, memcheck   compute-sanitizer on one small case per kernel, when the tool exists;
#   3. bench-*    the goal benchmark rows (window attention at N = 577, WinfT at N = 197 / 577,
#                 PaCa, models) against their anchors, appended to OUTDIR/<gpu>.jsonl;
#   4. ncu        one Nsight Compute pass over the window forward / backward and WinfT kernels
#                 at N = 577, bf16, d = 64 (instructions, issue slots, occupancy, tensor pipe),
#                 to OUTDIR/ncu.json, when ncu exists.
# What OUTDIR holds afterwards (at most 8 files, no subfolders): summary.json, log.txt,
# <gpu>.jsonl, ncu.json.
set -uo pipefail
set -f   # no globbing: the benchmark filters below are regular expressions
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=bench/results/gpu-check
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -*) echo "unknown option $arg (usage: bash bench/gpu_check.sh [OUTDIR] [--dry-run])" >&2; exit 2 ;;
    *) OUT="$arg" ;;
  esac
done
mkdir -p "$OUT"
LOG="$OUT/log.txt"
STEPS="$OUT/.steps.tsv"   # name, budget s, wall ms, exit code (removed at the end: summary.json holds it)
export PYTHONUNBUFFERED=1
: > "$LOG"
: > "$STEPS"

TESTS="tests/test_window_kernel.py tests/test_winft_kernel.py tests/test_cluster_attention_kernels.py \
tests/test_window_attention.py tests/test_winft_attention.py tests/test_cluster_attention.py"
# name:budget seconds. The budgets sum to at most 420 s (7 minutes), checked below.
PLAN=(env:10 tests:120 racecheck:20 memcheck:20 bench-window_attention:90 bench-winft_attention:45
      bench-cluster_attention:30 bench-models:40 ncu:45)
TOTAL=0
for item in "${PLAN[@]}"; do TOTAL=$((TOTAL + ${item#*:})); done
budget() { for item in "${PLAN[@]}"; do [ "${item%%:*}" = "$1" ] && echo "${item#*:}"; done; }

summary() {  # rewrite summary.json from the steps so far
  "$PY" bench/gpu_summary.py "$OUT" "$STEPS" "$DRY" "${PLAN[*]}" >/dev/null 2>>"$LOG" || true
}

step() {  # step NAME COMMAND... : run under the step's budget, log, record
  local name=$1; shift
  local limit; limit=$(budget "$name")
  echo "== $name (at most ${limit} s): $*" | tee -a "$LOG"
  if [ "$DRY" = 1 ]; then return 0; fi
  local t0 t1 rc
  t0=$(date +%s%N)
  timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  t1=$(date +%s%N)
  printf '%s\t%s\t%s\t%s\n' "$name" "$limit" "$(( (t1 - t0) / 1000000 ))" "$rc" >> "$STEPS"
  echo "== $name: exit $rc$([ "$rc" = 124 ] && echo ' (time limit)')" | tee -a "$LOG"
  summary
}

skip() {  # skip NAME REASON
  if [ "$DRY" = 1 ]; then echo "== $1 (at most $(budget "$1") s): would be skipped, $2" | tee -a "$LOG"; return 0; fi
  echo "== $1 skipped: $2" | tee -a "$LOG"
  printf '%s\t%s\t0\tskipped: %s\n' "$1" "$(budget "$1")" "$2" >> "$STEPS"
  summary
}

echo "gpu_check: plan of ${#PLAN[@]} steps, ${TOTAL} s in all (limit 420 s): ${PLAN[*]}" | tee -a "$LOG"
if [ "$TOTAL" -gt 420 ]; then echo "gpu_check: the plan exceeds 7 minutes" | tee -a "$LOG"; exit 1; fi
if ! command -v "$PY" >/dev/null; then echo "gpu_check: no interpreter $PY (set PYTHON)" | tee -a "$LOG"; exit 1; fi

# This checkout importable, offline, with PYTHON.
WHERE='import pathlib, vitpatch.kernels as k; print(pathlib.Path(k.__file__).resolve().parent)'
HERE=$(pwd -P)/kernels
if [ "$("$PY" -c "$WHERE" 2>/dev/null)" != "$HERE" ]; then
  echo "== installing this checkout into $PY (editable, offline, no dependencies)" | tee -a "$LOG"
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$LOG" 2>&1
  if [ "$("$PY" -c "$WHERE" 2>>"$LOG")" != "$HERE" ]; then
    echo "gpu_check: cannot make this checkout importable with $PY (see $LOG)" | tee -a "$LOG"; exit 1
  fi
fi
"$PY" - <<'PY' 2>&1 | tee -a "$LOG"
from vitpatch import _compat
import torch
v = _compat.versions()
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print("found: " + ", ".join(f"{k} {x}" for k, x in v.items()) + f", GPU {gpu}")
PY

HAVE_XDIST=$("$PY" -c 'import xdist' 2>/dev/null && echo 1 || echo 0)
PAR=()
[ "$HAVE_XDIST" = 1 ] && PAR=(-n 8)
if [ "$DRY" = 1 ]; then
  "$PY" - <<'PY' 2>&1 | tee -a "$LOG" || exit 1
import importlib
for m in ("vitpatch", "vitpatch.functional", "vitpatch.nn", "vitpatch.models", "vitpatch.tiles",
          "vitpatch.kernels.window_attention", "vitpatch.kernels.winft_attention",
          "vitpatch.kernels.cluster_attention", "bench.compile", "bench.harness", "bench.__main__"):
    importlib.import_module(m)
print("imports: ok")
PY
  "$PY" bench/gpu_smoke.py --dry-run 2>&1 | tee -a "$LOG" || exit 1
  "$PY" bench/gpu_ncu.py --dry-run 2>&1 | tee -a "$LOG" || exit 1
  for tool in compute-sanitizer ncu; do
    command -v $tool >/dev/null && echo "$tool: found" || echo "$tool: not found (its step would be skipped)"
  done | tee -a "$LOG"
  echo "pytest-xdist: $([ "$HAVE_XDIST" = 1 ] && echo 'found (tests run with -n 8)' || echo 'not found (tests run in one process)')" | tee -a "$LOG"
fi
step env "$PY" -c "import torch, subprocess; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(), torch.cuda.get_device_capability()); subprocess.run(['nvidia-smi'])"
if [ "$DRY" = 0 ] && [ "$(tail -n 1 "$STEPS" | cut -f4)" != 0 ]; then
  echo "gpu_check: no CUDA device" | tee -a "$LOG"; summary; exit 1
fi

step tests "$PY" -m pytest -q "${PAR[@]}" $TESTS
if command -v compute-sanitizer >/dev/null; then
  step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 "$PY" bench/gpu_smoke.py
  step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" bench/gpu_smoke.py
else
  skip racecheck "compute-sanitizer not found"
  skip memcheck "compute-sanitizer not found"
fi
# window attention: N = 577 (B = 16, h = 12, d = 64), AWD windows at density 0.23, and its dense anchors
for spec in "window_attention --filter N=577.d=64.(\[|grid=24x24.P=1.window=awd)" \
            "winft_attention --filter N=(197|577).d=64" "cluster_attention" "models"; do
  read -r op args <<<"$spec"
  limit=$(budget "bench-$op")
  # the bench starts no case after limit - 15 s, so its last case ends inside the step's budget
  # shellcheck disable=SC2086
  step "bench-$op" "$PY" -m bench --device cuda --ops "$op" $args --time-limit $((limit - 15)) --out "$OUT"
done
if command -v ncu >/dev/null; then
  step ncu "$PY" bench/gpu_ncu.py --out "$OUT/ncu.json" --timeout $(($(budget ncu) - 5))
else
  skip ncu "ncu not found"
fi
summary
rm -f "$STEPS"
if [ "$DRY" = 0 ]; then
  "$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); print(json.dumps(s['steps'], indent=1))" "$OUT/summary.json" | tee -a "$LOG"
fi
"$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); sys.exit(0 if s['ok'] else 1)" "$OUT/summary.json"
