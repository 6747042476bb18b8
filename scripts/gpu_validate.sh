#!/usr/bin/env bash
# Everything the CPU cannot check, in device calls of under 10 minutes each (run from the
# repository root on a CUDA machine; packages missing there travel as wheels, see README):
#
#   OUT=<dir> bash scripts/gpu_validate.sh tests     # GPU test suite, both tile decodes  (~8 min)
#   OUT=<dir> bash scripts/gpu_validate.sh bench     # bench_attention, both tile decodes (~9 min)
#   OUT=<dir> bash scripts/gpu_validate.sh compile   # compiled vs eager model decode step (~6 min)
#
# Every step writes its log under $OUT as it goes, so a step cut off by a time limit still
# leaves what it did. summary.txt lists each step with its exit status.
set -u
stage=${1:?usage: OUT=<dir> bash scripts/gpu_validate.sh tests|bench|compile}
OUT=${OUT:-gpu_validate_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
step() {  # step <name> <timeout seconds> <command...>
    local name=$1 limit=$2
    shift 2
    echo "== $(date -u +%H:%M:%S) $name: $*" | tee -a "$OUT/summary.txt"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   $name exit $rc ($(tail -n 1 "$OUT/$name.log"))" | tee -a "$OUT/summary.txt"
}
"$PY" - <<'PY' | tee -a "$OUT/summary.txt"
import platform, torch, triton
print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}, "
      f"Python {platform.python_version()}")
PY
case "$stage" in
tests)
    POLARTENSOR_FAILLOG="$OUT/failures_reshape.txt" step tests_reshape 270 \
        "$PY" -m pytest -q -p no:cacheprovider tests/kernels tests/test_attention.py \
        tests/test_kv_buffer.py tests/test_polar_quant_tensor.py
    POLARTENSOR_DECODE=joined POLARTENSOR_FAILLOG="$OUT/failures_joined.txt" step tests_joined 200 \
        "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_kernel_attention.py \
        tests/kernels/test_tree_decode.py
    step smoke 60 "$PY" scripts/gpu_smoke.py
    ;;
bench)
    step bench_reshape 270 "$PY" scripts/bench_attention.py --out "$OUT/bench_reshape" \
        --budget-s 200 --presets paper,polar-3,polar-4
    POLARTENSOR_DECODE=joined step bench_joined 270 "$PY" scripts/bench_attention.py \
        --out "$OUT/bench_joined" --budget-s 200 --presets paper,polar-3,polar-4
    ;;
compile)
    step compile 560 "$PY" scripts/gpu_compile_check.py --fullgraph --dtypes bfloat16
    ;;
*)
    echo "unknown stage $stage: use tests, bench or compile" >&2
    exit 2
    ;;
esac
