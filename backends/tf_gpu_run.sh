#!/usr/bin/env bash
# The TensorFlow GPU leg, for a machine with an NVIDIA GPU and backends/tf-cuda.txt installed:
#   1. the conformance suite for tf on cuda, with --require-device (a missing GPU fails, never skips);
#   2. the XLA speed script on the GPU at 2^22 and 2^26 elements (ratios to the literal formula and to the
#      read-3-write-1 floor, all from one run).
# Everything lands in $OUT (default tf-gpu-out): env.txt, conformance_tf_cuda.log, tf_targets_2p22.txt,
# tf_targets_2p26.txt. The exit status is 0 only if every step passed.
#
# Not run yet: the GPU image lent to this project has no TensorFlow, and the CUDA wheel is too large to carry.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-tf-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export TF_CPP_MIN_LOG_LEVEL=2 NVIDIA_TF32_OVERRIDE=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
rc=0
{ nvidia-smi; "$PY" -c "import tensorflow as tf; print(tf.__version__, tf.config.list_physical_devices('GPU'))"; } \
    >"$OUT/env.txt" 2>&1 || rc=1
timeout 420 "$PY" -m pytest conformance --backend=tf --device=cuda --require-device -q -p no:cacheprovider \
    >"$OUT/conformance_tf_cuda.log" 2>&1 || rc=1
for k in 22 26; do
    timeout 120 "$PY" benchmarks/tf_targets.py --log2-size "$k" --repeats 20 >"$OUT/tf_targets_2p$k.txt" 2>&1 || rc=1
done
tail -n 3 "$OUT/conformance_tf_cuda.log" "$OUT"/tf_targets_2p*.txt
exit $rc
