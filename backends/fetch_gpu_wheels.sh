#!/usr/bin/env bash
# Download into .whl/ the Python packages that the lent GPU machine's image lacks, for its Python 3.12 on
# manylinux x86_64: array-api-compat (a dependency of gipo-core) and array-api-strict (the conformance
# suite's reference backend). The image already has torch, JAX, pytest, hypothesis and mpmath, and triton
# (a dependency of torch's CUDA wheels, needed by gipo_core._triton_kernel; too large to fetch here); the
# project itself travels as the working tree and is put on PYTHONPATH by backends/gpu_run.sh.
#
# Usage, from anywhere in the repository, with network access:
#     bash backends/fetch_gpu_wheels.sh          # then run backends/gpu_run.sh there with carry [".whl"]
# PYTHON picks the interpreter whose pip downloads (default: python3).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PYTHON:-python3}
WHEELS=("array-api-compat==1.16.0" "array-api-strict==2.6.1")

mkdir -p .whl
rm -f .whl/*.whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
# One version of each package, or the install there stops.
dupes=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | sort | uniq -d)
if [ -n "$dupes" ]; then
    echo "fetch_gpu_wheels.sh: more than one wheel of: $dupes" >&2
    exit 1
fi
ls -l .whl
du -sh .whl
