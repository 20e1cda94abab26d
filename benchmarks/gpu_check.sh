#!/usr/bin/env bash
# The GPU check of guidedrop, in one script: on the GPU machine, from anywhere in a checkout,
#
#   bash benchmarks/gpu_check.sh
#
#   1. env        GPU, driver, torch / triton / nvcc versions
#   2. build      guidedrop._C in place: CUDA_HOME=/usr/local/cuda python setup.py build_ext --inplace
#   3. tests      python -m pytest -q tests            (the GPU tests run: a GPU is visible)
#   4. sanitizer  compute-sanitizer --tool memcheck python -m pytest -q tests/test_backends.py -k cuda
#   5. bench      python -m guidedrop bench --mode forward,full --resnet: CSV, PNG and a
#                 markdown table (GPU name and date inside) -> $OUT/bench.{csv,png,md}
#   6. show       python -m guidedrop show -> $OUT/masks.png
#
# Everything is printed and also logged to $OUT/gpu_check.log. OUT defaults to
# benchmarks/out. It installs nothing (the GPU machine has torch 2.11, triton 3.6 and no
# internet): the package runs from the checkout with PYTHONPATH=python:. and, when
# guidedrop.triton_kernels cannot be imported from there, from a staged copy of
# python/guidedrop with triton_kernels/ linked in (what setup.py's package_dir does).
#
# Environment:
#   GPU_CHECK_STEPS   steps to run, default "env build tests sanitizer bench show"
#                     (split across calls when one call has a time limit; "build" is
#                     needed once per machine: the .so stays in python/guidedrop/)
#   BENCH_ARGS        extra arguments for the bench, e.g. "--layers dropblock --quick"
#   TORCH_CUDA_ARCH_LIST  default 9.0 (H100 / H200); MAX_JOBS default: the core count
# Exit status: 0 when every step that ran passed, else 1 (all steps run regardless).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/benchmarks/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
: >"$LOG"
exec 3>&1 4>&2 > >(tee -a "$LOG") 2>&1
TEE_PID=$!
# Let tee write the last lines before the script exits.
finish() {
  exec 1>&3 2>&4
  wait "$TEE_PID" 2>/dev/null || true
}
trap finish EXIT

STEPS=" ${GPU_CHECK_STEPS:-env build tests sanitizer bench show} "
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT/python:$ROOT${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python}

failed=()
SUMMARY=()
want() { [[ $STEPS == *" $1 "* ]]; }
banner() { printf '\n======== %s ========\n' "$*"; }
# run NAME CMD...: run a step, print its status and time, remember failures.
run() {
  local name=$1 t0=$SECONDS rc=0
  shift
  banner "$name: $*"
  "$@" || rc=$?
  SUMMARY+=("$(printf '  %-10s rc=%-3s %5d s' "$name" "$rc" $((SECONDS - t0)))")
  if ((rc != 0)); then
    echo "FAILED: $name (exit status $rc)"
    failed+=("$name")
  fi
  return 0
}

if want env; then
  banner "env"
  nvidia-smi || echo "nvidia-smi not found"
  "$PY" - <<'EOF'
import sys
import torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "not installed"
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {tv}")
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible")
EOF
  "$CUDA_HOME/bin/nvcc" --version | tail -2 || echo "nvcc not found under $CUDA_HOME"
fi

if want build; then
  run build "$PY" setup.py build_ext --inplace
  ls -l python/guidedrop/_C*.so 2>/dev/null || echo "(no guidedrop._C built: no sources in csrc/?)"
fi

# guidedrop.triton_kernels lives in triton_kernels/ (setup.py maps it into the package):
# without an install it is not importable from python/ alone, so stage a copy.
if [[ -d triton_kernels ]] && ! "$PY" -c 'import importlib.util, sys
sys.exit(importlib.util.find_spec("guidedrop.triton_kernels") is None)' 2>/dev/null; then
  STAGE=$(mktemp -d)
  cp -r python/guidedrop "$STAGE/guidedrop"
  ln -s "$ROOT/triton_kernels" "$STAGE/guidedrop/triton_kernels"
  export PYTHONPATH=$STAGE:$ROOT${PYTHONPATH#"$ROOT/python:$ROOT"}
  echo "note: guidedrop.triton_kernels is not importable from python/; running from the"
  echo "      staged copy $STAGE/guidedrop (python/guidedrop + the built .so + triton_kernels/)"
fi
"$PY" -c 'import guidedrop, guidedrop.dispatch as d
print("guidedrop from", guidedrop.__file__)
for name in d.MODULES:
    mod, why = d.load(name)
    print(f"  backend {name:9s}", "available" if mod is not None else f"unavailable: {why}")'

if want tests; then
  run tests "$PY" -m pytest -q tests
fi

if want sanitizer; then
  SANITIZER=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
  if [[ ! -f tests/test_backends.py ]]; then
    banner "sanitizer: skipped, tests/test_backends.py does not exist"
  elif [[ ! -x $SANITIZER ]]; then
    banner "sanitizer: compute-sanitizer not found"
    failed+=("sanitizer")
  else
    sanitize() {
      local rc=0
      "$SANITIZER" --tool memcheck --error-exitcode 99 "$PY" -m pytest -q tests/test_backends.py \
        -k cuda || rc=$?
      if ((rc == 5)); then
        echo "(no test matched -k cuda)"
        rc=0
      fi
      return $rc
    }
    run sanitizer sanitize
  fi
fi

if want bench; then
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
  run bench "$PY" -m guidedrop bench --mode forward,full --resnet --csv "$OUT/bench.csv" \
    --plot "$OUT/bench.png" --md "$OUT/bench.md" ${BENCH_ARGS:-}
  if [[ -f $OUT/bench.md ]]; then
    banner "bench.md (for benchmarks/RESULTS.md)"
    cat "$OUT/bench.md"
  fi
fi

if want show; then
  run show "$PY" -m guidedrop show --out "$OUT/masks.png"
fi

banner "summary"
printf '%s\n' "${SUMMARY[@]}"
ls -l "$OUT"
if ((${#failed[@]})); then
  echo "FAILED steps: ${failed[*]}"
  exit 1
fi
echo "all steps passed"
