"""pytest plugin of ``backends/gpu_run.sh``: the Triton kernel as the CUDA default during the run.

``pytest conformance --device=cuda -p backends.triton_default_on`` switches on
``gipo_core._triton_kernel.DEFAULT_ON_CUDA``, so that every CUDA call the suite makes under the default
``set_fused("auto")`` runs what will run there once the switch is on by default: the Triton kernel for what
it covers, the op-by-op path for the rest (float64, the off-policy options, inside ``torch.compile``).
"""

from gipo_core import _triton_kernel

_triton_kernel.DEFAULT_ON_CUDA = True
