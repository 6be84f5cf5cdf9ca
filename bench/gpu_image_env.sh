#!/usr/bin/env bash
# The GPU machine's Python stack, emulated here (no GPU needed), and the checks that must pass on it:
#
#   bash bench/gpu_image_env.sh DIR
#
# The GPU machine has Python 3.12, torch 2.11.0, triton 3.6.0, torchvision 0.26.0, numpy 2.5,
# timm, opencv, pytest (and pytest-xdist, setuptools), no network, and vitpatch not installed.
# This script builds
#   DIR/venv      a Python 3.12 venv with those versions (from the package registry; reused when
#                 it is already there with them),
#   DIR/numpy23   numpy 2.3.5 alone: the newest numpy whose arrays triton 3.6's interpreter
#                 handles, put first on PYTHONPATH for the interpreter runs,
#   DIR/tree      a copy of this checkout's working tree as the device tool sends it (tracked and
#                 untracked files git does not ignore), never installed beforehand,
# and then, offline (PIP_NO_INDEX=1, a proxy that refuses every connection) and with a `python`
# and `python3` on PATH that have no torch:
#   1. bash bench/gpu_check.sh DIR/out --dry-run, with numpy 2.5 (PYTHON=DIR/venv/bin/python);
#   2. with numpy 2.3: the kernel tests, the fullgraph compile tests and the compile gate's CI
#      subset (tests/test_*kernel*.py, tests/test_compile_gate.py), in the interpreter;
#   3. with numpy 2.5: the same kernel tests, which must skip (the versions in the reason), never fail.
# Run it before you stop whenever the kernels, the launch policy, setup.py or gpu_check.sh change.
# Logs: DIR/logs/*.log. Exit status 0 when all three pass. About 10 minutes on 2 cores after the
# first build (which downloads about 4 GB).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
DIR=${1:?usage: bash bench/gpu_image_env.sh DIR}
mkdir -p "$DIR/logs"
DIR=$(cd "$DIR" && pwd -P)
VENV="$DIR/venv"
PINS=("torch==2.11.0" "triton==3.6.0" "torchvision==0.26.0" "numpy==2.5.*" timm opencv-python-headless
      pytest pytest-benchmark pytest-xdist tqdm matplotlib scikit-learn setuptools)

find_py312() {
  for c in "${PYTHON312:-}" python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
    [ -n "$c" ] || continue
    if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then command -v "$c"; return; fi
  done
  return 1
}

if ! "$VENV/bin/python" -c 'import torch, triton, numpy, sys
assert sys.version_info[:2] == (3, 12) and torch.__version__.startswith("2.11.0") and triton.__version__ == "3.6.0"
assert numpy.__version__.startswith("2.5.")' 2>/dev/null; then
  PY312=$(find_py312) || { echo "gpu_image_env: no Python 3.12 found (set PYTHON312)" >&2; exit 1; }
  echo "== building $VENV with $PY312: ${PINS[*]}"
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV" || exit 1
fi
# the rest of the image's packages (quick when they are there)
"$VENV/bin/python" -m pip install -q "${PINS[@]}" > "$DIR/logs/install.log" 2>&1 || {
  echo "gpu_image_env: install failed, see $DIR/logs/install.log" >&2; exit 1; }
if ! PYTHONPATH="$DIR/numpy23" "$VENV/bin/python" -c 'import numpy; assert numpy.__version__ == "2.3.5"' 2>/dev/null; then
  rm -rf "$DIR/numpy23"
  "$VENV/bin/python" -m pip install -q --no-deps --target "$DIR/numpy23" "numpy==2.3.5" >> "$DIR/logs/install.log" 2>&1 || {
    echo "gpu_image_env: numpy 2.3.5 install failed" >&2; exit 1; }
fi
"$VENV/bin/python" -m pip uninstall -y -q vitpatch > /dev/null 2>&1 || true   # no prior install

echo "== copying the working tree to $DIR/tree"
rm -rf "$DIR/tree" && mkdir -p "$DIR/tree"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} sh -c 'test -e "{}" && printf "%s\0" "{}"' \
  | tar --null -T - -cf -) | tar -C "$DIR/tree" -xf - || exit 1

# offline: no index, and a proxy that refuses every connection; `python` on PATH has no torch
mkdir -p "$DIR/bin"
for name in python python3; do
  printf '#!/bin/sh\necho "this python has no torch (the GPU check must use PYTHON)" >&2\nexit 1\n' > "$DIR/bin/$name"
  chmod +x "$DIR/bin/$name"
done
export PIP_NO_INDEX=1 http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9 HTTP_PROXY=http://127.0.0.1:9 \
  HTTPS_PROXY=http://127.0.0.1:9 PATH="$DIR/bin:$PATH" PYTHON="$VENV/bin/python"
unset TRITON_INTERPRET
cd "$DIR/tree" || exit 1
KERNEL_TESTS="tests/test_window_kernel.py tests/test_winft_kernel.py tests/test_cluster_attention_kernels.py"
status=0
report() {  # report NAME RC
  echo "== $1: $([ "$2" = 0 ] && echo pass || echo "FAIL (exit $2, see $DIR/logs/$1.log)")"
  [ "$2" = 0 ] || status=1
}

echo "== 1. dry run of the GPU check, numpy 2.5"
rm -rf "$DIR/out"
bash bench/gpu_check.sh "$DIR/out" --dry-run > "$DIR/logs/dry-run.log" 2>&1
rc=$?
sed -n '1p;/^==/p;/found:/p;/imports:/p' "$DIR/logs/dry-run.log"
report dry-run $rc

echo "== 2. kernel, fullgraph and compile-gate tests, numpy 2.3 (interpreter)"
PYTHONPATH="$DIR/numpy23" "$VENV/bin/python" -m pytest -q $KERNEL_TESTS tests/test_compile_gate.py \
  > "$DIR/logs/numpy23.log" 2>&1
rc=$?
tail -n 1 "$DIR/logs/numpy23.log"
report numpy23 $rc

echo "== 3. the same kernel tests, numpy 2.5: they must skip, not fail"
"$VENV/bin/python" -m pytest -q -rs $KERNEL_TESTS > "$DIR/logs/numpy25.log" 2>&1
rc=$?
tail -n 1 "$DIR/logs/numpy25.log"
if [ "$rc" = 0 ] && ! grep -q "numpy 2.5" "$DIR/logs/numpy25.log"; then
  echo "   no skip names the versions"; rc=1
fi
report numpy25 $rc
exit $status
