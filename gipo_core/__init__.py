"""gipo-core: GIPO and its baselines, written once against the Python array API.

Pick the module of your framework; each exposes the same functions, options and return values::

    from gipo_core.numpy import gipo_loss, value_and_grad      # NumPy / array-api-strict
    from gipo_core.torch import GIPOLoss, gipo_loss            # PyTorch
    from gipo_core.jax import GIPOLoss, gipo_loss              # JAX
    from gipo_core.tf import GIPOLoss, gipo_loss               # TensorFlow

This package itself never imports torch, jax or tensorflow.
"""

from ._api import AGG_MODES, KERNELS, METRIC_NAMES, PUBLIC_LOSSES, LossOutput

__version__ = "0.1.0"

__all__ = ["AGG_MODES", "KERNELS", "METRIC_NAMES", "PUBLIC_LOSSES", "LossOutput", "__version__"]
