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
  same core code by ``torch.compile`` (compiled once per option set, on first use); see :func:`set_fused`
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
import dataclasses
import inspect
from typing import Any

import torch
from torch import nn

from ._api import AGG_MODES, METRIC_NAMES, LossArrays, LossOutput, _check_options, check_off_policy, make_api
from ._core.engine import LossSpec, backward, metric_names
from ._core.objectives import OBJECTIVES
from ._lib import checks
from ._torch_fused import core_forward, fused_settings, set_fused
from ._torch_namespace import namespace as _xp

__all__ = [
    "LossOutput",
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
    "set_fused",
    "fused_settings",
]

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


_api = make_api(_run, __name__, _EXAMPLE)

gipo_loss = _api["gipo_loss"]
ppo_clip_loss = _api["ppo_clip_loss"]
no_clip_loss = _api["no_clip_loss"]
sapo_loss = _api["sapo_loss"]
cispo_loss = _api["cispo_loss"]
gaussian_trust_weight = _api["gaussian_trust_weight"]


# ------------------------------------------------------------------------------------------------ modules


@dataclasses.dataclass(frozen=True)
class _Options:
    items: tuple[tuple[str, Any], ...]


class _PolicyLoss(nn.Module):
    """Shared machinery of the loss modules: options checked once, at construction."""

    _objective = ""

    def __init__(
        self,
        *,
        agg: str,
        with_metrics: bool,
        ratio_level: str = "token",
        rollout_is: str | None = None,
        rollout_is_bounds: tuple[float, float] | None = None,
        opsm_delta: float | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        checks.check_choice(name, "agg", agg, AGG_MODES)
        if not isinstance(with_metrics, bool) and with_metrics != "basic":
            raise TypeError(f"`{name}`: `with_metrics` must be True, False or 'basic'; got {with_metrics!r}")
        _check_options(name, self._objective, options)
        self._off_policy = _Options(tuple(check_off_policy(name, dict(
            ratio_level=ratio_level, rollout_is=rollout_is, rollout_is_bounds=rollout_is_bounds, opsm_delta=opsm_delta
        )).items()))
        # Held in a frozen dataclass: torch.compile(dynamic=True) treats its floats as constants, whereas
        # float attributes (or dict entries) of a module become symbolic inputs that the checks cannot read.
        self._options = _Options(tuple(options.items()))
        self.agg = agg
        self.with_metrics = with_metrics
        self._fn = _api[OBJECTIVES[self._objective].public_name]

    def forward(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        denominator: float | torch.Tensor | None = None,
        behavior_weights: torch.Tensor | None = None,
        rollout_logp: torch.Tensor | None = None,
    ) -> LossOutput:
        """The loss of one batch: ``LossOutput(loss, metrics)``.

        Parameters
        ----------
        logp : Tensor, shape (..., time)
            Log-probabilities of the taken actions under the current policy (receives the gradient).
        old_logp : Tensor, same shape as ``logp``
            Log-probabilities under the behaviour policy (data).
        advantages : Tensor, shape of ``logp`` or (..., 1)
            Advantages per element or per sequence (data).
        mask : Tensor of bool or floating dtype, same shape as ``logp``, optional
            Valid elements (non-zero).
        denominator : float or 0-d Tensor, optional
            Global count to divide by (see the module docstring), e.g. the token count of the whole
            data-parallel batch.
        behavior_weights : Tensor, same shape as ``logp``, optional
            Detached per-element weights multiplying each element's loss.

        Returns
        -------
        LossOutput
            ``loss`` a 0-d tensor (float32, or float64 for float64 inputs) and ``metrics`` a dict of 0-d
            tensors on the inputs' device (empty when ``with_metrics=False``).
        """
        return self._fn(
            logp,
            old_logp,
            advantages,
            mask,
            agg=self.agg,
            denominator=denominator,
            behavior_weights=behavior_weights,
            rollout_logp=rollout_logp,
            with_metrics=self.with_metrics,
            **dict(self._options.items),
            **dict(self._off_policy.items),
        )

    @property
    def options(self) -> dict[str, Any]:
        """The objective's options (a copy: they are fixed at construction)."""
        return dict(self._options.items)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{opts}{', ' if opts else ''}agg={self.agg!r}, with_metrics={self.with_metrics}"


_MODULE_NOTES = """
    Options are fixed at construction and checked there; per-batch data (``mask``, ``denominator``,
    ``behavior_weights``) goes to ``forward``. ``forward(logp, old_logp, advantages, mask=None)`` returns
    ``LossOutput(loss, metrics)``; see :func:`{fn}` for the math and the diagnostics.

    Parameters
    ----------
{params}    agg : {{'token-mean', 'seq-mean-token-sum', 'seq-mean-token-mean', 'seq-mean-token-sum-norm'}}
        Aggregation of per-element losses (verl's names).
    with_metrics : bool, default True
        Compute the diagnostics (0-d tensors, no device synchronisation).

    Raises
    ------
    ValueError
        An option that is not finite and positive, an unknown ``agg`` or ``kernel``.
"""


def _module_doc(summary: str, fn: str, params: str, example: str) -> str:
    return summary + "\n" + _MODULE_NOTES.format(fn=fn, params=params) + "\n    Examples\n    --------\n" + example


class GIPOLoss(_PolicyLoss):
    _objective = "gipo"
    __doc__ = _module_doc(
        "GIPO policy loss as an ``nn.Module``: importance ratio times a Gaussian trust weight.",
        "gipo_loss",
        "    sigma : float, default 1.0\n        Width of the trust weight in log-ratio units.\n"
        "    sigma_neg : float, optional\n        Width where the advantage is <= 0 (default: ``sigma``).\n"
        "    kernel : {'gaussian', 'laplace', 'cauchy'}, default 'gaussian'\n        Shape of the weight.\n",
        """    >>> import torch
    >>> from gipo_core.torch import GIPOLoss
    >>> loss_fn = GIPOLoss(sigma=0.5, with_metrics=False)
    >>> logp = torch.zeros(2, 3, requires_grad=True)
    >>> out = loss_fn(logp, torch.zeros(2, 3), torch.tensor([[1.0], [-1.0]]))
    >>> out.loss.backward()
    >>> logp.grad
    tensor([[-0.1667, -0.1667, -0.1667],
            [ 0.1667,  0.1667,  0.1667]])
""",
    )

    def __init__(
        self,
        sigma: float = 1.0,
        sigma_neg: float | None = None,
        kernel: str = "gaussian",
        *,
        agg: str = "token-mean",
        with_metrics: bool = True,
        **off_policy: Any,
    ) -> None:
        super().__init__(
            agg=agg, with_metrics=with_metrics, sigma=sigma, sigma_neg=sigma_neg, kernel=kernel, **off_policy
        )


class PPOClipLoss(_PolicyLoss):
    _objective = "ppo_clip"
    __doc__ = _module_doc(
        "PPO clipped surrogate loss as an ``nn.Module`` (optional dual clip).",
        "ppo_clip_loss",
        "    clip_low, clip_high : float, default 0.2\n        The ratio is clipped to [1 - clip_low, 1 + clip_high].\n"
        "    dual_clip : float, optional\n        Dual-clip constant c > 1 for negative advantages.\n",
        """    >>> import torch
    >>> from gipo_core.torch import PPOClipLoss
    >>> out = PPOClipLoss(dual_clip=3.0)(torch.zeros(4), torch.zeros(4), torch.ones(4))
    >>> out.loss
    tensor(-1.)
""",
    )

    def __init__(
        self,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        dual_clip: float | None = None,
        *,
        agg: str = "token-mean",
        with_metrics: bool = True,
        **off_policy: Any,
    ) -> None:
        super().__init__(
            agg=agg, with_metrics=with_metrics, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
            **off_policy,
        )


class NoClipLoss(_PolicyLoss):
    _objective = "no_clip"
    __doc__ = _module_doc(
        "Plain importance-sampling policy loss ``-rho * A`` as an ``nn.Module``.",
        "no_clip_loss",
        "",
        """    >>> import torch
    >>> from gipo_core.torch import NoClipLoss
    >>> NoClipLoss()(torch.zeros(4), torch.zeros(4), torch.ones(4)).loss
    tensor(-1.)
""",
    )

    def __init__(self, *, agg: str = "token-mean", with_metrics: bool = True, **off_policy: Any) -> None:
        super().__init__(agg=agg, with_metrics=with_metrics, **off_policy)


class SAPOLoss(_PolicyLoss):
    _objective = "sapo"
    __doc__ = _module_doc(
        "SAPO soft-gated policy loss as an ``nn.Module``.",
        "sapo_loss",
        "    tau_pos : float, default 1.0\n        Gate temperature where A > 0.\n"
        "    tau_neg : float, default 1.05\n        Gate temperature where A <= 0.\n",
        """    >>> import torch
    >>> from gipo_core.torch import SAPOLoss
    >>> SAPOLoss(tau_neg=2.0)(torch.zeros(4), torch.zeros(4), -torch.ones(4)).loss
    tensor(1.)
""",
    )

    def __init__(
        self,
        tau_pos: float = 1.0,
        tau_neg: float = 1.05,
        *,
        agg: str = "token-mean",
        with_metrics: bool = True,
        **off_policy: Any,
    ) -> None:
        super().__init__(agg=agg, with_metrics=with_metrics, tau_pos=tau_pos, tau_neg=tau_neg, **off_policy)


class CISPOLoss(_PolicyLoss):
    _objective = "cispo"
    __doc__ = _module_doc(
        "CISPO loss (REINFORCE weighted by the detached, clipped ratio) as an ``nn.Module``.",
        "cispo_loss",
        "    clip_max : float, default 5.0\n        Upper bound on the detached importance ratio.\n",
        """    >>> import torch
    >>> from gipo_core.torch import CISPOLoss
    >>> logp = torch.full((4,), -0.5)
    >>> CISPOLoss()(logp, logp, torch.ones(4)).loss              # -min(rho, 5) * A * logp at rho = 1
    tensor(0.5000)
""",
    )

    def __init__(
        self,
        clip_max: float = 5.0,
        clip_min: float | None = None,
        *,
        agg: str = "token-mean",
        with_metrics: bool = True,
        **off_policy: Any,
    ) -> None:
        super().__init__(agg=agg, with_metrics=with_metrics, clip_max=clip_max, clip_min=clip_min, **off_policy)
