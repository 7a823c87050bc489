"""The core's forward as one compiled kernel for large eager inputs: ``torch.compile`` (inductor) of the core.

Eager PyTorch runs the core one array op at a time: about a dozen passes over memory and as many fresh
input-sized tensors, which is what the literal formula costs too. Compiling the same core function (no
second copy of the math) gives one kernel of a few fused loops: with a mask, one loop counts it; one loop
reads the inputs, writes ``saved`` and sums the loss, most diagnostics riding along; the rest of the
diagnostics add two more (inductor's split of the extrema, and the effective sample size, which needs the
largest multiplier first).

When it is used (``mode``, set by :func:`gipo_core.torch.set_fused`):

- ``"auto"`` (default): CPU tensors with at least ``min_numel`` elements. CUDA keeps the plain path by
  default: the compiled path has not been run on a GPU yet.
- ``"always"``: every eligible call, any device and size (the tests use it to check the kernel on small
  inputs).
- ``"never"``: the plain path only.

The starting mode comes from the environment variable ``GIPO_TORCH_FUSED`` (``auto`` if unset).

Never inside ``torch.compile`` or ``torch.export`` (the caller's graph already fuses the core), under
``torch.func.vmap``, under a ``TorchDispatchMode`` (fake tensors, tracing, FLOP counting), under
``torch.jit.trace`` or for tensor subclasses: those run the plain path. ``torch.func.grad`` runs an
autograd.Function's forward on plain tensors, so the kernel is used there. The first call for a new option
set compiles (seconds); if compiling fails (no C++ compiler, an unsupported platform) a ``RuntimeWarning``
says so once and that option set keeps the plain path.

Results equal the plain path's to within rounding: the compiled loops sum in another order.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._core.engine import LossSpec, forward
from ._torch_namespace import namespace as _xp

__all__ = ["core_forward", "set_fused", "fused_settings"]

MODES = ("auto", "always", "never")

#: At most this many option sets get a kernel (each costs a compile of seconds); later ones run op by op.
MAX_KERNELS = 16

#: The environment variable that sets the starting mode (read once, at import).
ENV_VAR = "GIPO_TORCH_FUSED"


def _mode_from_env() -> str:
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(
            f"gipo_core.torch: the environment variable {ENV_VAR} must be one of {', '.join(MODES)}; got {mode!r}"
        )
    return mode


_settings: dict[str, Any] = {"mode": _mode_from_env(), "min_numel": 1 << 16}
# LossSpec -> compiled kernel, or None once compiling it failed (failures count towards MAX_KERNELS).
_kernels: dict[LossSpec, Callable[..., Any] | None] = {}
_warned_full = False


def set_fused(mode: str = "auto", *, min_numel: int = 1 << 16) -> None:
    """Choose when the loss functions run the core's forward as one kernel built by ``torch.compile``.

    Parameters
    ----------
    mode : {'auto', 'always', 'never'}, default 'auto'
        (The mode at import is ``$GIPO_TORCH_FUSED``, else ``'auto'``.)
        ``'auto'``: CPU tensors with at least ``min_numel`` elements. ``'always'``: any device and size.
        ``'never'``: the core one torch op at a time. In every mode the kernel is skipped inside a caller's
        ``torch.compile``, under ``torch.func.vmap``, a ``TorchDispatchMode`` or ``torch.jit.trace``, and for
        tensor subclasses.
    min_numel : int, default 65536
        The smallest ``logp.numel()`` that ``'auto'`` compiles for (below it Python overhead dominates).

    Raises
    ------
    TypeError
        ``min_numel`` is not an int; the settings stay as they were.
    ValueError
        An unknown ``mode`` or a negative ``min_numel``; the settings stay as they were.

    Notes
    -----
    The kernel is the same core function, compiled once per option set (``LossSpec``) with dynamic shapes;
    the first call compiles (seconds). It agrees with the op-by-op path to within rounding (another
    summation order). If compiling fails, a ``RuntimeWarning`` says so once and that option set keeps the
    op-by-op path. At most ``MAX_KERNELS`` (16) option sets get a kernel: an option that changes every step
    (a sigma schedule) would otherwise compile every step; later option sets run op by op, with one
    ``RuntimeWarning``.

    Examples
    --------
    >>> import gipo_core.torch as gt
    >>> gt.set_fused("never")
    >>> gt.fused_settings()
    {'mode': 'never', 'min_numel': 65536}
    >>> gt.set_fused()
    """
    if mode not in MODES:
        raise ValueError(f"`set_fused`: `mode` must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
    if isinstance(min_numel, bool) or not isinstance(min_numel, int):
        raise TypeError(f"`set_fused`: `min_numel` must be an int >= 0; got {type(min_numel).__name__} {min_numel!r}")
    if min_numel < 0:
        raise ValueError(f"`set_fused`: `min_numel` must be an int >= 0; got {min_numel!r}")
    _settings["mode"] = mode
    _settings["min_numel"] = min_numel


def fused_settings() -> dict[str, Any]:
    """The current ``mode`` and ``min_numel`` (a copy)."""
    return dict(_settings)


def _eligible(logp: torch.Tensor) -> bool:
    mode = _settings["mode"]
    if mode == "never" or torch.compiler.is_compiling():
        return False
    if (
        type(logp) is not torch.Tensor
        or torch._C._are_functorch_transforms_active()
        or _get_current_dispatch_mode() is not None
        or torch.jit.is_tracing()
    ):
        return False
    return mode == "always" or (logp.device.type == "cpu" and logp.numel() >= _settings["min_numel"])


def _plain(arrays: tuple[Any, ...], spec: LossSpec) -> tuple[Any, Any, Any]:
    loss, saved, metrics = forward(*arrays, spec=spec, xp=_xp)
    # One tensor for all the diagnostics: each output of an autograd.Function costs Python time.
    stacked = torch.stack(list(metrics.values())) if metrics else None
    return loss, saved, stacked


def _compile(spec: LossSpec) -> Callable[..., Any]:
    def kernel(logp, old_logp, advantages, mask, behavior_weights, denominator, rollout_logp):
        return _plain((logp, old_logp, advantages, mask, behavior_weights, denominator, rollout_logp), spec)

    # A code object of its own per option set: dynamo keeps compiled entries per code object and stops
    # recompiling after a few (the recompile limit), and ``spec`` differs only in the closure.
    kernel.__code__ = kernel.__code__.replace(co_name=f"gipo_core_forward_{len(_kernels)}")
    return torch.compile(kernel, dynamic=True, fullgraph=True)


def core_forward(arrays: tuple[Any, ...], spec: LossSpec) -> tuple[Any, Any, Any]:
    """``(loss, saved, stacked diagnostics or None)`` from the core: compiled when eligible, else op by op."""
    if not _eligible(arrays[0]):
        return _plain(arrays, spec)
    kernel = _kernels.get(spec, False)
    if kernel is False:
        if len(_kernels) >= MAX_KERNELS:
            _warn_full()
            return _plain(arrays, spec)
        kernel = _kernels[spec] = _compile(spec)
    if kernel is None:
        return _plain(arrays, spec)
    mask = arrays[3]
    if mask is not None and mask.dtype == torch.bool and mask.device.type == "cpu":
        # Inductor's CPU code loads bool vectors slowly (a bool mask made the kernel about 1.5x slower than a
        # float one, measured at 2^22): a 0/1 float32 mask gives the same values (the core's float-mask
        # path multiplies by 1 or 0), and bool -> uint8 -> float32 is the cheaper conversion.
        arrays = (*arrays[:3], mask.view(torch.uint8).to(torch.float32), *arrays[4:])
    try:
        return kernel(*arrays)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: keep the plain path for this option set
        failure = exc
    # Outside the handler: if the inputs themselves are at fault, the plain path raises their error, alone,
    # and the kernel is kept.
    result = _plain(arrays, spec)
    _kernels[spec] = None
    reason = (str(failure).strip().splitlines() or [""])[0][:300]
    warnings.warn(
        f"gipo_core.torch: compiling the fused loss kernel failed ({type(failure).__name__}: {reason}); "
        "this option set runs op by op from now on (gipo_core.torch.set_fused('never') silences this)",
        RuntimeWarning,
        stacklevel=3,
    )
    return result


def _warn_full() -> None:
    global _warned_full
    if not _warned_full:
        _warned_full = True
        warnings.warn(
            f"gipo_core.torch: {MAX_KERNELS} option sets already have a fused kernel (each costs a compile); "
            "new option sets run op by op. Changing an option every step (a sigma schedule) would compile "
            "each value: use gipo_core.torch.set_fused('never') for that, or a few fixed values",
            RuntimeWarning,
            stacklevel=5,
        )
