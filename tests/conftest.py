import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# tests/test_triton_kernel.py runs the Triton kernel in Triton's CPU interpreter where there is no GPU. The
# interpreter must be chosen before triton is first imported (torch.compile imports it too), so it is set
# here, before any test module is collected. Without CUDA nothing else runs Triton code, so nothing else
# changes; with CUDA the variable is left alone and the kernel tests run compiled on the GPU.
if "triton" not in sys.modules and not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
