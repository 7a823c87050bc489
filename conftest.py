"""Session-wide settings for every test path (tests/ and conformance/), loaded before any test module.

Triton, when installed (the "test" extra has it for tests/test_triton_kernel.py):

- It is imported here, first. Triton and TensorFlow both bundle LLVM: importing Triton after TensorFlow
  aborts the process ("Option ... registered more than once"), and ``torch.compile`` imports Triton by itself
  when it is installed. Imported before TensorFlow, both work in one process.
- On a machine without CUDA, ``TRITON_INTERPRET=1`` is set before that import, so that
  tests/test_triton_kernel.py runs the kernel in Triton's CPU interpreter (the mode is fixed when Triton is
  imported: it decorates its standard library then). Without CUDA nothing else runs Triton code, so nothing
  else changes. With CUDA the variable is left alone and the kernel tests run compiled on the GPU.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if "tensorflow" not in sys.modules and importlib.util.find_spec("triton") is not None:
    if not _cuda_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install: the kernel tests report it themselves
        pass
