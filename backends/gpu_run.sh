#!/usr/bin/env bash
# The one script for a machine with an NVIDIA GPU: the Triton kernel, conformance on CUDA, then the speed.
#
#   1. installs the wheels in .whl/ (made by backends/fetch_gpu_wheels.sh: what a GPU image with torch and
#      JAX lacks) into /tmp/site and puts the repository and /tmp/site on PYTHONPATH; without .whl/ the
#      Python environment must have them (pip install -r backends/torch-cuda.txt -e ".[test,triton]");
#   2. records the machine (nvidia-smi, versions, devices) in env.txt;
#   3. runs tests/test_triton_kernel.py on the GPU, compiled (TRITON_INTERPRET=0): the hand-written Triton
#      kernel of gipo_core.torch against the op-by-op core, the same cases CI runs in Triton's interpreter;
#   4. runs the conformance suite on cuda for torch and for jax, side by side, with --require-device (a
#      missing GPU fails); torch with the Triton kernel as the CUDA default (backends/triton_default_on.py sets
#      gipo_core._triton_kernel.DEFAULT_ON_CUDA), i.e. what set_fused("auto") runs once that switch is on;
#   5. times the Triton kernel (benchmarks/torch_targets.py): forward + backward at 2^26 float32 with
#      diagnostics, as a share of the device-to-device copy bandwidth for the bytes the step moves (target
#      >= 85%), three more block/warp configurations, and at 2^20 against verl-style PPO-clip in plain torch
#      (--no-compile: no torch.compile rows, which report.py times in step 6);
#   6. runs benchmarks/report.py on the GPU at 2^20 and 2^26 float32 (torch eager, torch.compile, jax.jit);
#   7. checks set_fused("always") on CUDA against the CPU (tests/test_torch_fused.py -k cuda).
#
# Every step has its own time limit (install 45 s, env 20 s, Triton tests 90 s, conformance 180 s with torch
# and jax side by side, Triton speed 120 s, report 80 s, set_fused tests 45 s), so a hang cannot eat the
# budget: at most about 600 s even if every step hits its limit (typically far less). The report writes its
# JSON after every size, so a step cut off at its limit keeps what it measured. Everything lands in $OUT:
#   run.log  env.txt  triton_cuda.log  conformance_torch_cuda.log  conformance_jax_cuda.log
#   triton_speed.txt  report_float32.json  report.md  fused_cuda.log
# The exit status is 0 only if every step passed.
#
# Usage:                                   bash backends/gpu_run.sh            (OUT=gipo-out by default)
# Without a GPU it stops after step 2 with a clear message (exit 2).
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

# 1. wheels the environment lacks
if compgen -G ".whl/*.whl" >/dev/null; then
    step install 45 - "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
else
    echo "no .whl/: relying on the environment for array-api-compat and array-api-strict (backends/fetch_gpu_wheels.sh)"
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"

# 2. the machine
step env 20 "$OUT/env.txt" bash -c '
    nvidia-smi || echo "nvidia-smi failed"
    "$0" - <<EOF
import platform, importlib
print("python", platform.python_version())
for name in ("numpy", "torch", "triton", "jax", "jaxlib", "array_api_compat", "array_api_strict", "hypothesis",
             "gipo_core"):
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
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    # Without a GPU: the one step that runs on a CPU (the kernel tests in Triton's interpreter), then stop.
    step triton_interpreter 300 "$OUT/triton_interpreter.log" env TRITON_INTERPRET=1 "$PY" -m pytest \
        tests/test_triton_kernel.py -q -p no:cacheprovider
    tail -n 3 "$OUT/triton_interpreter.log"
    echo "=== no CUDA device visible to torch: stopped after the CPU-runnable steps; failed: ${FAILED[*]:-none}"
    exit 2
fi

# 3. the Triton kernel on the GPU, compiled (the CPU CI runs the same tests in Triton's interpreter)
step triton_cuda 90 "$OUT/triton_cuda.log" env TRITON_INTERPRET=0 "$PY" -m pytest tests/test_triton_kernel.py \
    -q -p no:cacheprovider --durations=5
tail -n 3 "$OUT/triton_cuda.log"

# 4. conformance on cuda, torch (Triton kernel as the CUDA default) and jax side by side
CONF=(-m pytest conformance --device=cuda --require-device -q -p no:cacheprovider -n 4 --durations=5)
step conformance_torch_cuda 180 "$OUT/conformance_torch_cuda.log" "$PY" "${CONF[@]}" --backend=torch \
    -p backends.triton_default_on &
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

# 5. the Triton kernel's speed: 2^26 against the copy bandwidth, 2^20 against verl-style PPO-clip
step triton_speed 120 "$OUT/triton_speed.txt" "$PY" benchmarks/torch_targets.py --device cuda --large 26 \
    --small 20 --repeat 10 --no-compile --triton-configs 1024/8,256/4,512/4
cat "$OUT/triton_speed.txt"

# 6. the ratio report on the GPU (the copy rows are the device-to-device copy bandwidth)
REPORT=(benchmarks/report.py --strict --sizes 20,26 --repeats 40 --budget 3)
step report_float32 80 - "$PY" "${REPORT[@]}" --legs torch:cuda,jax.jit:gpu,torch.compile:cuda \
    --dtypes float32 --json "$OUT/report_float32.json" --markdown "$OUT/report.md"

# 7. set_fused("always") on CUDA (the Triton kernel first, the inductor kernel for what it does not cover)
step fused_cuda_tests 45 "$OUT/fused_cuda.log" "$PY" -m pytest tests/test_torch_fused.py -k cuda -q -p no:cacheprovider
tail -n 3 "$OUT/fused_cuda.log"

echo "=== done in $(($(date +%s) - T_START))s; failed: ${FAILED[*]:-none}"
[ "${#FAILED[@]}" -eq 0 ]
