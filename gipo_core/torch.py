"""PyTorch backend: the core's closed-form gradient wired into autograd, plus ``nn.Module`` losses.

Every loss function here is the core's forward and backward inside one ``torch.autograd.Function`` written
in the ``forward`` + ``setup_context`` form, so the same call works eagerly, under
``torch.compile(fullgraph=True)``, under ``torch.func.grad`` / ``torch.func.vmap`` and on any device.

- Only ``logp`` receives a gradient; ``old_logp``, ``advantages``, ``mask``, ``behavior_weights`` and
  ``denominator`` are data (their gradient is ``None``).
- Backward keeps one tensor the size of the input (``dloss/dlogp`` for an upstream gradient of 1) and does
  one multiply.
- float16, bfloat16 and ``torch.autocast`` regions are computed in float32; float64 stays float64; the
  gradient comes back in ``logp``'s dtype, on ``logp``'s device.
- Nothing reads a tensor's value on the host: no ``.item()``, no device synchronisation; the diagnostics are
  0-d tensors on the inputs' device.
- Double backward (a gradient of the gradient) raises a ``RuntimeError`` that says so; forward-mode AD
  (``torch.func.jvp``, ``jacfwd``, ``hessian``) is not implemented.
- Eagerly, CPU inputs with at least 2^16 elements run the core's forward as one kernel compiled from the
  same core code by ``torch.compile`` (compiled once per option set and call signature, on first use; the
  ``denominator``'s value never recompiles it); see :func:`set_fused`
  to turn it off or to use it on every device and size.

Examples
--------
>>> import torch
>>> from gipo_core.torch import GIPOLoss
>>> loss_fn = GIPOLoss(sigma=1.0)
>>> logp = torch.tensor([[-0.7, -1.2, -0.1]], requires_grad=True)
>>> out = loss_fn(logp, logp.detach() - 0.1, torch.tensor([[1.0]]))
>>> out.loss.backward()
>>> logp.grad.shape, out.metrics["n_valid"].item()
(torch.Size([1, 3]), 3.0)
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from torch import nn

from . import _typing
from ._api import METRIC_NAMES, Backend, LossArrays, LossClass, LossOutput, make_api
from ._core.engine import LossSpec, backward, metric_names
from ._core.objectives import OBJECTIVES
from ._torch_fused import core_forward, fused_settings, set_fused
from ._torch_namespace import namespace as _xp

__all__ = ["LossOutput", "set_fused", "fused_settings"]

_Array = torch.Tensor

_EXAMPLE = """>>> import torch
>>> from gipo_core.torch import {fn}
>>> logp = torch.tensor([[-0.7, -1.2, -0.1]], requires_grad=True)
>>> out = {fn}(logp, logp.detach() - 0.1, torch.tensor([[1.0]]))
>>> out.loss.backward()
>>> out.loss.dtype, logp.grad.shape, sorted(out.metrics)[:2]
(torch.float32, torch.Size([1, 3]), ['ess', 'grad_mult_max'])
"""


class _LossFunction(torch.autograd.Function):
    """``(loss, saved[, metrics])`` from the core, the diagnostics stacked in ``METRIC_NAMES`` order.

    Backward is ``grad_loss * saved`` cast to ``logp``'s dtype.

    ``saved`` is returned as an output (the ``setup_context`` form sees only inputs and outputs) and is the
    only tensor kept for backward. It stays differentiable so that a second differentiation reaches
    ``backward`` with a gradient for it, which is where double backward is refused with a clear message.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logp, old_logp, advantages, mask, behavior_weights, denominator, rollout_logp, spec):
        device = logp.device.type
        # The core casts to float32 itself, but an autocast region may list ops it uses (exp, sum): turning
        # autocast off keeps the work dtype the core's choice on every device. Not while compiling: older
        # dynamo versions (torch 2.11) cannot trace is_autocast_available, and autocast lowers none of the
        # core's ops (it has no matmul or convolution), so the region changes nothing there.
        if (
            not torch.compiler.is_compiling()
            and torch.amp.is_autocast_available(device)
            and torch.is_autocast_enabled(device)
        ):
            region = torch.autocast(device_type=device, enabled=False)
        else:
            region = contextlib.nullcontext()
        with region:
            arrays = (logp, old_logp, advantages, mask, behavior_weights, denominator, rollout_logp)
            loss, saved, stacked = core_forward(arrays, spec)
        return (loss, saved) if stacked is None else (loss, saved, stacked)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        if len(output) > 2:
            ctx.mark_non_differentiable(output[2])
        ctx.set_materialize_grads(False)
        ctx.dtype = inputs[0].dtype
        ctx.fn = OBJECTIVES[inputs[-1].objective].public_name

    @staticmethod
    def backward(ctx, grad_loss, grad_saved, *grad_metrics):  # noqa: ARG004
        if grad_saved is not None and not torch.compiler.is_compiling():
            raise RuntimeError(
                f"`{ctx.fn}`: double backward (differentiating the gradient again, e.g. a second "
                "torch.autograd.grad after create_graph=True, or torch.func.jacrev of torch.func.grad) is not "
                "supported; the gradient is computed in closed form and is first-order only"
            )
        grad_logp = None
        if ctx.needs_input_grad[0] and grad_loss is not None:
            (saved,) = ctx.saved_tensors
            grad_logp = backward(grad_loss, saved, dtype=ctx.dtype, xp=_xp)
        return grad_logp, None, None, None, None, None, None, None


# autograd.Function.apply binds its arguments to ``forward``'s signature on every call (the setup_context
# form); a precomputed signature spares it the introspection.
_LossFunction.forward.__signature__ = inspect.signature(_LossFunction.forward)


def _run(arrays: LossArrays, spec: LossSpec, xp: Any) -> LossOutput:
    out = _LossFunction.apply(*arrays, spec)
    names = metric_names(spec, arrays.rollout_logp is not None)
    metrics = dict(zip(names, out[2].unbind(0))) if names else {}
    return LossOutput(out[0], metrics)


_BACKEND = Backend(__name__, _run, "torch.Tensor", lambda x: isinstance(x, torch.Tensor), example=_EXAMPLE)
_api = make_api(_BACKEND)


class _Base(nn.Module):
    """The ``nn.Module`` side of the loss classes: no parameters, no buffers, options fixed at construction.

    The spec is a frozen dataclass: ``torch.compile(dynamic=True)`` treats it as a constant, whereas float
    attributes read in ``forward`` would become symbolic inputs that the checks cannot read.
    """

    _backend = _BACKEND
    _example = """>>> import torch
>>> from gipo_core.torch import {cls}
>>> loss_fn = {cls}(with_metrics=False)
>>> logp = torch.zeros(2, 3, requires_grad=True)
>>> out = loss_fn(logp, torch.zeros(2, 3), torch.tensor([[1.0], [-1.0]]))
>>> out.loss.backward()
>>> out.metrics, logp.grad.shape
({{}}, torch.Size([2, 3]))
"""

    def _init_framework(self) -> None:
        nn.Module.__init__(self)

    def _set(self, name: str, value: Any) -> None:
        setattr(self, name, value)

    forward = LossClass.forward

    def extra_repr(self) -> str:
        return self._repr_args()  # type: ignore[attr-defined]


# --- generated by `python -m gipo_core._codegen` from the registry: do not edit ---
__all__ += [
    "gipo_loss",
    "ppo_clip_loss",
    "no_clip_loss",
    "sapo_loss",
    "cispo_loss",
    "gaussian_trust_weight",
    "GIPOLoss",
    "PPOClipLoss",
    "NoClipLoss",
    "SAPOLoss",
    "CISPOLoss",
]

gipo_loss: _typing.GipoLossFunction[_Array] = _api["gipo_loss"]
ppo_clip_loss: _typing.PpoClipLossFunction[_Array] = _api["ppo_clip_loss"]
no_clip_loss: _typing.NoClipLossFunction[_Array] = _api["no_clip_loss"]
sapo_loss: _typing.SapoLossFunction[_Array] = _api["sapo_loss"]
cispo_loss: _typing.CispoLossFunction[_Array] = _api["cispo_loss"]
gaussian_trust_weight: _typing.GaussianTrustWeightFunction[_Array] = _api["gaussian_trust_weight"]


class GIPOLoss(_typing.GIPOLossInit[_Array], _Base):
    pass


class PPOClipLoss(_typing.PPOClipLossInit[_Array], _Base):
    pass


class NoClipLoss(_typing.NoClipLossInit[_Array], _Base):
    pass


class SAPOLoss(_typing.SAPOLossInit[_Array], _Base):
    pass


class CISPOLoss(_typing.CISPOLossInit[_Array], _Base):
    pass
# --- end of generated code ---


from ._fused_linear_torch import FusedLinearGIPOLoss, FusedLinearLoss, FusedLinearOutput, fused_linear_loss  # noqa: E402

__all__ += ["fused_linear_loss", "FusedLinearLoss", "FusedLinearGIPOLoss", "FusedLinearOutput"]
