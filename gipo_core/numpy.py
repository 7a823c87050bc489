"""NumPy backend: the core evaluated directly, with ``value_and_grad`` for the closed-form gradient.

The same functions accept any array-API array without autodiff (``array_api_strict`` arrays included).

Examples
--------
>>> import numpy as np
>>> from gipo_core.numpy import gipo_loss, value_and_grad
>>> logp = np.log(np.array([[0.5, 0.25], [0.5, 0.5]]))
>>> old_logp = np.log(np.array([[0.5, 0.5], [0.25, 0.5]]))
>>> adv = np.array([[1.0], [-1.0]])                       # one advantage per sequence
>>> out, grad = value_and_grad(gipo_loss)(logp, old_logp, adv, sigma=1.0)
>>> round(float(out.loss), 6)
0.294919
>>> grad.shape
(2, 2)
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ._api import LossArrays, LossOutput, make_api
from ._core.engine import LossSpec, backward, forward

__all__ = [
    "LossOutput",
    "gipo_loss",
    "ppo_clip_loss",
    "no_clip_loss",
    "sapo_loss",
    "cispo_loss",
    "gaussian_trust_weight",
    "value_and_grad",
]

_EXAMPLE = """>>> import numpy as np
>>> from gipo_core.numpy import {fn}
>>> logp = np.array([[-0.7, -1.2, -0.1]])
>>> out = {fn}(logp, logp - 0.1, np.array([[1.0]]))
>>> out.loss.shape, sorted(out.metrics)[:2]
((), ['ess', 'grad_mult_max'])
"""


# exp() overflowing to inf is part of the contract where the exact value overflows (No-Clip's ratio, the
# ratio_max diagnostic): NumPy is told not to warn about it. Invalid operations (NaN) still warn.
def _run(arrays: LossArrays, spec: LossSpec, xp: Any) -> LossOutput:
    with np.errstate(over="ignore"):
        loss, _, metrics = forward(*arrays, spec=spec, xp=xp)
    return LossOutput(loss, metrics)


def _run_with_grad(arrays: LossArrays, spec: LossSpec, xp: Any) -> tuple[LossOutput, Any]:
    with np.errstate(over="ignore"):
        loss, saved, metrics = forward(*arrays, spec=spec, xp=xp)
    return LossOutput(loss, metrics), backward(1.0, saved, dtype=arrays.logp.dtype, xp=xp)


_api = make_api(_run, __name__, _EXAMPLE)
_grad_api = make_api(_run_with_grad, __name__)

gipo_loss = _api["gipo_loss"]
ppo_clip_loss = _api["ppo_clip_loss"]
no_clip_loss = _api["no_clip_loss"]
sapo_loss = _api["sapo_loss"]
cispo_loss = _api["cispo_loss"]
gaussian_trust_weight = _api["gaussian_trust_weight"]


def value_and_grad(fn: Callable) -> Callable:
    """Turn one of this module's loss functions into one returning ``(LossOutput, grad_logp)``.

    The gradient is the core's closed form (the same one every autodiff adapter returns), for an upstream
    gradient of 1, in ``logp``'s dtype.

    Parameters
    ----------
    fn : callable
        ``gipo_loss``, ``ppo_clip_loss``, ``no_clip_loss``, ``sapo_loss`` or ``cispo_loss`` of this module.

    Returns
    -------
    callable
        Same arguments as ``fn``; returns ``(LossOutput(loss, metrics), grad_logp)``.

    Raises
    ------
    TypeError
        ``fn`` is not one of this module's loss functions.

    Examples
    --------
    >>> import numpy as np
    >>> from gipo_core.numpy import no_clip_loss, value_and_grad
    >>> out, g = value_and_grad(no_clip_loss)(np.zeros(4), np.zeros(4), np.ones(4))
    >>> g.tolist()                                  # -A / N at log-ratio 0
    [-0.25, -0.25, -0.25, -0.25]
    """
    name = getattr(fn, "__name__", None)
    if name not in _grad_api or name == "gaussian_trust_weight" or _api.get(name) is not fn:
        valid = ", ".join(k for k in _api if k != "gaussian_trust_weight")
        raise TypeError(f"`value_and_grad`: `fn` must be one of gipo_core.numpy's {valid}; got {fn!r}")
    return _grad_api[name]
