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

CUDA tensors go first to the hand-written Triton kernel (``gipo_core._triton_kernel``, imported only then)
when ``triton`` is installed and the mode is ``"always"`` (or ``"auto"`` once
``_triton_kernel.DEFAULT_ON_CUDA`` is switched on after a GPU check); what it does not cover (float64, the
sequence-level off-policy options) goes on to the rules above. ``"never"`` turns both kernels off.

The starting mode comes from the environment variable ``GIPO_TORCH_FUSED`` (``auto`` if unset).

Never inside ``torch.compile`` or ``torch.export`` (the caller's graph already fuses the core), under
``torch.func.vmap``, under a ``TorchDispatchMode`` (fake tensors, tracing, FLOP counting), under
``torch.jit.trace`` or for tensor subclasses: those run the plain path. ``torch.func.grad`` runs an
autograd.Function's forward on plain tensors, so the kernel is used there. The first call for a new option
set and call signature compiles (seconds; the ``denominator``'s value is a tensor input and never
recompiles); if compiling fails (no C++ compiler, an unsupported platform) a ``RuntimeWarning`` says so once
and those calls keep the plain path.

:func:`core_forward` is the single entry of the torch adapter (``gipo_core.torch``) into the core's forward:
it chooses between this kernel and the op-by-op core.

Results equal the plain path's to within rounding: the compiled loops sum in another order.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._core.engine import LossSpec, forward
from ._torch_namespace import namespace as _xp

__all__ = ["core_forward", "set_fused", "fused_settings"]

MODES = ("auto", "always", "never")

#: At most this many (option set, call signature) pairs get a kernel (each costs a compile of seconds); later
#: ones run op by op.
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
# (LossSpec, call signature) -> compiled kernel, or None once it failed (failures count towards MAX_KERNELS).
_kernels: dict[tuple[LossSpec, tuple[Any, ...]], Callable[..., Any] | None] = {}
_warned_full = False


def set_fused(mode: str = "auto", *, min_numel: int = 1 << 16) -> None:
    """Choose when the loss functions run the core's forward as one kernel built by ``torch.compile``.

    Parameters
    ----------
    mode : {'auto', 'always', 'never'}, default 'auto'
        (The mode at import is ``$GIPO_TORCH_FUSED``, else ``'auto'``.)
        ``'auto'``: CPU tensors with at least ``min_numel`` elements. ``'always'``: any device and size,
        and on CUDA the hand-written Triton kernel first (when ``triton`` is installed).
        ``'never'``: the core one torch op at a time, no kernel. In every mode the kernels are skipped inside
        a caller's ``torch.compile``, under ``torch.func.vmap``, a ``TorchDispatchMode`` or
        ``torch.jit.trace``, and for tensor subclasses.
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
    The kernel is the same core function, compiled once per option set (``LossSpec``) and call signature
    (which optional arrays are given, dtypes, ranks, size-1 axes) with dynamic shapes; the first such call
    compiles (seconds). The ``denominator``'s value never compiles anything: a number or a tensor, it is a
    tensor input of the kernel. It agrees with the op-by-op path to within rounding (another summation
    order). If compiling fails, a ``RuntimeWarning`` says so once and those calls keep the op-by-op path. At
    most ``MAX_KERNELS`` (16) kernels are built: an option that changes every step (a sigma schedule) would
    otherwise compile every step; later ones run op by op, with one ``RuntimeWarning`` saying why.

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


def _eager_plain(logp: torch.Tensor) -> bool:
    """An eager call on a plain tensor: no compiler, functorch transform, dispatch mode or trace around it."""
    return not (
        torch.compiler.is_compiling()
        or type(logp) is not torch.Tensor
        or torch._C._are_functorch_transforms_active()
        or _get_current_dispatch_mode() is not None
        or torch.jit.is_tracing()
    )


def _eligible(logp: torch.Tensor) -> bool:
    mode = _settings["mode"]
    if mode == "never" or not _eager_plain(logp):
        return False
    return mode == "always" or (logp.device.type == "cpu" and logp.numel() >= _settings["min_numel"])


def _triton_forward(arrays: tuple[Any, ...], spec: LossSpec) -> tuple[Any, Any, Any] | None:
    """The hand-written Triton kernel (``gipo_core._triton_kernel``) for CUDA tensors, or None to go on.

    Imported only for CUDA tensors (or CPU tensors once a test has imported it to run Triton's interpreter).
    """
    logp = arrays[0]
    if torch.compiler.is_compiling() or _settings["mode"] == "never":
        return None
    if not (logp.is_cuda or "gipo_core._triton_kernel" in sys.modules):
        return None
    from . import _triton_kernel

    if not (_triton_kernel.wants(logp, _settings["mode"]) and _eager_plain(logp)):
        return None
    return _triton_kernel.try_forward(arrays, spec)


def _plain(arrays: tuple[Any, ...], spec: LossSpec) -> tuple[Any, Any, Any]:
    loss, saved, metrics = forward(*arrays, spec=spec, xp=_xp)
    # One tensor for all the diagnostics: each output of an autograd.Function costs Python time.
    stacked = torch.stack(list(metrics.values())) if metrics else None
    return loss, saved, stacked


def _compile(spec: LossSpec) -> Callable[..., Any]:
    def kernel(logp, old_logp, advantages, mask, behavior_weights, denominator, rollout_logp):
        return _plain((logp, old_logp, advantages, mask, behavior_weights, denominator, rollout_logp), spec)

    # A code object of its own per kernel: dynamo keeps compiled entries per code object and stops
    # recompiling after a few (the recompile limit); one kernel serves one key, so it compiles once.
    kernel.__code__ = kernel.__code__.replace(co_name=f"gipo_core_forward_{len(_kernels)}")
    return torch.compile(kernel, dynamic=True, fullgraph=True)


def _signature(arrays: tuple[Any, ...]) -> tuple[Any, ...]:
    """What makes dynamo build another graph: which arrays are given, their dtypes, ranks and 0/1 sizes
    (dynamic shapes specialise sizes 0 and 1), and the device. Never a value."""
    return tuple(
        None if a is None else (a.dtype, a.device.type, tuple(min(int(d), 2) for d in a.shape)) for a in arrays
    )


def core_forward(arrays: tuple[Any, ...], spec: LossSpec) -> tuple[Any, Any, Any]:
    """``(loss, saved, stacked diagnostics or None)`` from the core: compiled when eligible, else op by op.

    One kernel per option set and call signature (see ``_signature``). A number ``denominator`` (a global
    token count that changes every step) and an array one both reach the kernel as a 0-d float64 tensor
    input, so no value of it ever compiles anything.
    """
    out = _triton_forward(arrays, spec)
    if out is not None:
        return out
    logp = arrays[0]
    if not _eligible(logp):
        return _plain(arrays, spec)
    denominator = arrays[5]
    if spec.denominator is not None:
        denominator = torch.tensor(spec.denominator, dtype=torch.float64, device=logp.device)
        spec = dataclasses.replace(spec, denominator=None)
    elif denominator is not None:
        denominator = denominator.reshape(()).to(torch.float64)
    mask = arrays[3]
    if mask is not None and mask.dtype == torch.bool and mask.device.type == "cpu":
        # Inductor's CPU code loads bool vectors slowly (a bool mask made the kernel about 1.5x slower than a
        # float one, measured at 2^22): a 0/1 float32 mask gives the same values (the core's float-mask
        # path multiplies by 1 or 0), and bool -> uint8 -> float32 is the cheaper conversion.
        mask = mask.view(torch.uint8).to(torch.float32)
    arrays = (*arrays[:3], mask, arrays[4], denominator, *arrays[6:])
    key = (spec, _signature(arrays))
    kernel = _kernels.get(key, False)
    if kernel is False:
        if len(_kernels) >= MAX_KERNELS:
            _warn_full()
            return _plain(arrays, spec)
        kernel = _kernels[key] = _compile(spec)
    if kernel is None:
        return _plain(arrays, spec)
    try:
        return kernel(*arrays)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: keep the plain path for this key
        failure = exc
    # Outside the handler: if the inputs themselves are at fault, the plain path raises their error, alone,
    # and the kernel is kept.
    result = _plain(arrays, spec)
    _kernels[key] = None
    reason = (str(failure).strip().splitlines() or [""])[0][:300]
    warnings.warn(
        f"gipo_core.torch: the fused loss kernel failed to compile or run for this option set and call "
        f"signature ({type(failure).__name__}: {reason}); these calls run op by op from now on, with the same "
        "results (gipo_core.torch.set_fused('never') silences this)",
        RuntimeWarning,
        stacklevel=3,
    )
    return result


def _warn_full() -> None:
    global _warned_full
    if not _warned_full:
        _warned_full = True
        warnings.warn(
            f"gipo_core.torch: {MAX_KERNELS} fused kernels are already compiled, one per option set and call "
            "signature (which of mask, behavior_weights, denominator, rollout_logp are given, their dtypes, "
            "ranks and size-1 axes; never the denominator's value); calls that would need another run op by op, "
            "with the same results. Many option sets (an option changed every step) or many input layouts "
            "cause this: keep them few, or call gipo_core.torch.set_fused('never')",
            RuntimeWarning,
            stacklevel=5,
        )
