#!/usr/bin/env bash
# The one command for a lent GPU machine: conformance on CUDA, then the ratio report on the GPU.
#
#   1. installs the carried wheels the image lacks (.whl/, made by backends/fetch_gpu_wheels.sh) into
#      /tmp/site and puts the repository and /tmp/site on PYTHONPATH;
#   2. records the machine (nvidia-smi, versions, devices) in env.txt;
#   3. runs the conformance suite on cuda for torch and for jax, side by side, with --require-device, so
#      that a missing GPU is a failure and not a skip;
#   4. runs benchmarks/report.py on the GPU at 2^20 to 2^26 elements: float32 for torch eager,
#      torch.compile and jax.jit, bfloat16 for torch eager and jax.jit; the "copy" rows give the
#      device-to-device copy bandwidth, "% copy BW" each step's share of it;
#   5. checks the fused eager kernel (set_fused("always"), off on CUDA by default) against the CPU and
#      times it at 2^26 (benchmarks/torch_targets.py).
#
# Every step has its own time limit (install 60 s, env 30 s, conformance 180 s with torch and jax side by
# side, report 120 s + 50 s, fused kernel 60 s + 60 s), so a hang cannot eat the budget: at most 560 s
# even if every step hits its limit; give the device call timeout_s=590. The report writes its JSON after
# every size, so a step cut off at its limit keeps what it measured. Everything lands in $OUT (9 files, no
# sub-folders):
#   run.log  env.txt  conformance_torch_cuda.log  conformance_jax_cuda.log
#   report_float32.json  report_bfloat16.json  report.md  fused_cuda.log  fused_cuda_speed.txt
# The exit status is 0 only if every step passed.
#
# Usage (device tool, carry [".whl"]):   bash backends/gpu_run.sh
# Locally, for a dry run without a GPU:  OUT=/tmp/gpu-out bash backends/gpu_run.sh   (fails: no GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gipo-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
exec > >(tee -a "$OUT/run.log") 2>&1

export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # torch and jax share the GPU (and one process in the report)
export TF_CPP_MIN_LOG_LEVEL=2
export NVIDIA_TF32_OVERRIDE=0                # no TF32 anywhere: conformance compares against float32 oracles

T_START=$(date +%s)
FAILED=()

# step NAME LIMIT_S LOGFILE CMD...: run CMD under a time limit, its output to LOGFILE (or here if "-").
step() {
    local name=$1 limit=$2 log=$3 rc t0
    shift 3
    t0=$(date +%s)
    echo "=== $name: start (limit ${limit}s) at +$((t0 - T_START))s"
    if [ "$log" = "-" ]; then
        timeout --kill-after=15 "$limit" "$@"
    else
        timeout --kill-after=15 "$limit" "$@" >"$log" 2>&1
    fi
    rc=$?
    [ "$rc" -eq 124 ] && echo "=== $name: TIMED OUT after ${limit}s"
    echo "=== $name: rc=$rc in $(($(date +%s) - t0))s"
    [ "$rc" -ne 0 ] && FAILED+=("$name(rc=$rc)")
    return 0
}

# 1. carried wheels
if compgen -G ".whl/*.whl" >/dev/null; then
    step install 60 - "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
else
    echo "no .whl/ carried: relying on the image for array-api-compat (run backends/fetch_gpu_wheels.sh here)"
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"

# 2. the machine
step env 30 "$OUT/env.txt" bash -c '
    nvidia-smi || echo "nvidia-smi failed"
    "$0" - <<EOF
import platform, importlib
print("python", platform.python_version())
for name in ("numpy", "torch", "jax", "jaxlib", "array_api_compat", "array_api_strict", "hypothesis", "gipo_core"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except Exception as exc:
        print(name, "NOT IMPORTABLE", exc)
import torch
print("torch.cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
import jax
print("jax devices", jax.devices())
EOF' "$PY"
cat "$OUT/env.txt"

# 3. conformance on cuda, torch and jax side by side (a missing GPU fails: --require-device)
CONF=(-m pytest conformance --device=cuda --require-device -q -p no:cacheprovider -n 4 --durations=5)
step conformance_torch_cuda 180 "$OUT/conformance_torch_cuda.log" "$PY" "${CONF[@]}" --backend=torch &
PID_TORCH=$!
step conformance_jax_cuda 180 "$OUT/conformance_jax_cuda.log" "$PY" "${CONF[@]}" --backend=jax &
PID_JAX=$!
# step() records failures in its own subshell here: read them back from the logs' exit lines.
wait "$PID_TORCH"; wait "$PID_JAX"
for b in torch jax; do
    tail -n 3 "$OUT/conformance_${b}_cuda.log"
    grep -qE "[0-9]+ passed" "$OUT/conformance_${b}_cuda.log" \
        && ! grep -qE "[0-9]+ (failed|error)" "$OUT/conformance_${b}_cuda.log" \
        || FAILED+=("conformance_${b}_cuda")
done

# 4. the ratio report on the GPU (the copy rows are the device-to-device copy bandwidth)
REPORT=(benchmarks/report.py --strict --sizes 20,22,24,26 --repeats 40 --budget 3)
step report_float32 120 - "$PY" "${REPORT[@]}" --legs torch:cuda,jax.jit:gpu,torch.compile:cuda \
    --dtypes float32 --json "$OUT/report_float32.json" --markdown "$OUT/report_float32.md"
step report_bfloat16 50 - "$PY" "${REPORT[@]}" --legs torch:cuda,jax.jit:gpu \
    --dtypes bfloat16 --json "$OUT/report_bfloat16.json" --markdown "$OUT/report_bfloat16.md"
cat "$OUT"/report_float32.md "$OUT"/report_bfloat16.md >"$OUT/report.md" 2>/dev/null
rm -f "$OUT"/report_float32.md "$OUT"/report_bfloat16.md

# 5. the fused eager kernel (gipo_core.torch.set_fused("always")) on CUDA: against the CPU, then its speed
step fused_cuda_tests 60 "$OUT/fused_cuda.log" "$PY" -m pytest tests/test_torch_fused.py -k cuda -q -p no:cacheprovider
tail -n 3 "$OUT/fused_cuda.log"
step fused_cuda_speed 60 "$OUT/fused_cuda_speed.txt" "$PY" benchmarks/torch_targets.py --device cuda --large 26 \
    --fused always --repeat 10
cat "$OUT/fused_cuda_speed.txt"

echo "=== done in $(($(date +%s) - T_START))s; failed: ${FAILED[*]:-none}"
[ "${#FAILED[@]}" -eq 0 ]
