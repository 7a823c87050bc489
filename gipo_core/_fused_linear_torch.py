"""PyTorch fused linear loss: from an LLM's hidden states and ``lm_head`` weight to any gipo-core objective,
chunk by chunk, never holding a (tokens, vocab) array.

One ``torch.autograd.Function`` (``forward`` + ``setup_context`` form) does the whole work in its forward:
per chunk of tokens the logits, a stable log-softmax, the target's log-probability, the core's ``dloss/dlogp``
for the chunk and, while the chunk's softmax is in hand, the gradients with respect to the hidden states, the
weight and the bias (Liger-Kernel's approach: the gradients are accumulated during the forward). Backward
multiplies them by the upstream gradient. See :mod:`gipo_core._fused_linear` for the math and for how the
core is asked for each chunk's ``dloss/dlogp``.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from torch import nn

from ._api import LossArrays
from ._core.engine import LossSpec, forward, metric_names
from ._fused_linear import (
    FusedArgs,
    FusedLinearOutput,
    aggregation_weight,
    check_fused_args,
    chunk_spec,
    fused_spec,
    readable_targets,
    spec_keywords,
    two_pass,
)
from ._torch_namespace import namespace as _xp

__all__ = ["FusedLinearOutput", "fused_linear_loss", "FusedLinearLoss", "FusedLinearGIPOLoss"]

_FN = "fused_linear_loss"


def _chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    core: tuple[Any, ...] | None,
    args: FusedArgs,
    with_entropy: bool,
    needs: tuple[bool, bool, bool],
    saved_all: torch.Tensor | None = None,
) -> tuple[Any, ...]:
    """The chunk loop: ``(logp, entropy, grad_hidden, grad_weight, grad_bias)``, gradients None when not
    needed (``core`` and ``saved_all`` are None then).

    ``core`` = ``(old_logp, advantages, valid, weights, rollout_logp)`` flat over tokens: the chunk's core
    call gets them sliced, with ``weights`` the aggregation weight times any behaviour weights. In the second
    pass of the two-pass mode ``saved_all`` is the core's ``dloss/dlogp`` of the whole batch, flat, instead.
    """
    n, device = hidden.shape[0], hidden.device
    wd = _logp_dtype(hidden)
    temperature = args.temperature
    logp = torch.empty(n, dtype=wd, device=device)
    entropy = torch.empty(n, dtype=wd, device=device) if with_entropy else None
    grad_h = torch.empty_like(hidden) if needs[0] else None
    grad_w = torch.zeros_like(weight) if needs[1] else None
    grad_b = torch.zeros_like(bias) if needs[2] and bias is not None else None
    spec = chunk_spec(args.spec)
    weight_t = weight.t()
    for start in range(0, n, args.chunk_size):
        stop = min(start + args.chunk_size, n)
        h = hidden[start:stop]
        z = h @ weight_t if bias is None else torch.addmm(bias, h, weight_t)
        if temperature != 1.0:
            z.div_(temperature)  # z is this chunk's own buffer
        z = z.to(wd)  # the log-softmax onward in float32 (a copy only for low-precision inputs)
        t = targets[start:stop, None]
        target_logit = z.gather(1, t)
        top = z.amax(1, keepdim=True)
        z.sub_(top)
        shifted = z.clone() if with_entropy else None
        z.exp_()  # unnormalised softmax, in place
        total = z.sum(1, keepdim=True)
        log_total = total.log()
        logp[start:stop] = (target_logit - top - log_total).squeeze(1)
        if entropy is not None and shifted is not None:
            # H = log S - sum(e * s) / S with s the shifted logits and e = exp(s), S = sum(e): no second exp.
            dot = torch.bmm(z.unsqueeze(1), shifted.unsqueeze(2)).reshape(-1, 1)
            entropy[start:stop] = (log_total - dot / total).squeeze(1)
            del shifted
        if saved_all is not None:
            saved = saved_all[start:stop]
        elif core is not None:
            old, adv, valid, weights, rollout = (None if a is None else a[start:stop] for a in core)
            _, saved, _ = forward(logp[start:stop], old, adv, valid, weights, None, rollout, spec=spec, xp=_xp)
        else:
            continue
        coef = saved.to(wd)[:, None] * (1.0 / temperature)
        # dL/dz = coef * (onehot - softmax), built in place in the softmax's buffer.
        z.mul_(-coef / total)
        z.scatter_add_(1, t, coef)
        g = z.to(hidden.dtype)
        del z
        if grad_h is not None:
            grad_h[start:stop] = g @ weight
        if grad_w is not None:
            grad_w.addmm_(g.t(), h)
        if grad_b is not None:
            grad_b.add_(g.sum(0))
    return logp, entropy, grad_h, grad_w, grad_b


def _logp_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype of the log-softmax onward: float64 for float64 inputs, else float32."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _core_arrays(arrays: Any, args: FusedArgs, wd: torch.dtype) -> tuple[Any, ...]:
    """``(old_logp, advantages, valid, weights, rollout_logp)`` flattened over tokens for the chunks' core
    calls."""
    shape = arrays.old_logp.shape
    like = torch.zeros(shape, dtype=wd, device=arrays.old_logp.device)
    weights = aggregation_weight(arrays.mask, like, args.spec, arrays.denominator, _xp)
    if arrays.behavior_weights is not None:
        weights = weights * arrays.behavior_weights.to(wd)
    valid = None if arrays.mask is None else (arrays.mask != 0).reshape(-1)
    adv = arrays.advantages.expand(shape).reshape(-1)
    rollout = None if arrays.rollout_logp is None else arrays.rollout_logp.reshape(-1)
    return arrays.old_logp.reshape(-1), adv, valid, weights.reshape(-1), rollout


def _loss_and_metrics(logp: torch.Tensor, arrays: Any, spec: LossSpec) -> tuple[Any, Any, Any]:
    """The array-level loss, ``dloss/dlogp`` and stacked diagnostics on the (token-shaped) log-probabilities."""
    loss, saved, metrics = forward(logp, *arrays[1:], spec=spec, xp=_xp)
    stacked = torch.stack(list(metrics.values())) if metrics else loss.new_zeros(0)
    return loss, saved, stacked


def _compute(hidden, weight, bias, targets, arrays, args, with_entropy, needs) -> tuple[Any, ...]:
    """``(loss, logp, entropy, stacked metrics, grad_hidden (flat), grad_weight, grad_bias)``.

    An autocast region is switched off here: the matmuls run in the inputs' dtype, as documented, and the
    in-place accumulation of the weight gradient needs operands of one dtype.
    """
    device = hidden.device.type
    region = torch.autocast(device_type=device, enabled=False) if device in _AUTOCAST else contextlib.nullcontext()
    with region:
        h2 = hidden.reshape(-1, hidden.shape[-1])
        targets = targets.reshape(-1).long()
        shape = arrays.old_logp.shape
        if any(needs) and two_pass(args.spec):
            # Pass 1: log-probs only; the core on the whole batch; pass 2: the logits again, for the gradients.
            logp, entropy, *_ = _chunks(h2, weight, bias, targets, None, args, with_entropy, (False,) * 3)
            logp = logp.reshape(shape)
            loss, saved, stacked = _loss_and_metrics(logp, arrays, args.spec)
            _, _, gh, gw, gb = _chunks(h2, weight, bias, targets, None, args, False, needs, saved.reshape(-1))
        else:
            core = _core_arrays(arrays, args, _logp_dtype(hidden)) if any(needs) else None
            logp, entropy, gh, gw, gb = _chunks(h2, weight, bias, targets, core, args, with_entropy, needs)
            logp = logp.reshape(shape)
            loss, _, stacked = _loss_and_metrics(logp, arrays, args.spec)
        entropy = None if entropy is None else entropy.reshape(shape)
    return loss, logp, entropy, stacked, gh, gw, gb


_AUTOCAST = ("cpu", "cuda", "xpu", "mps")


class _FusedLinear(torch.autograd.Function):
    """Outputs ``(loss, logp, entropy, metrics, grad_hidden, grad_weight, grad_bias)``: the last three are
    what backward scales by the upstream gradient (outputs, because ``setup_context`` sees only inputs and
    outputs); all but ``loss`` are non-differentiable."""

    @staticmethod
    def forward(
        hidden, weight, bias, targets, old_logp, advantages, mask, behavior_weights, denominator, rollout_logp, static
    ):
        args, with_entropy, needs = static
        arrays = LossArrays(None, old_logp, advantages, mask, behavior_weights, denominator, rollout_logp)
        out = _compute(hidden, weight, bias, targets, arrays, args, with_entropy, needs)
        loss, logp, entropy, stacked, gh, gw, gb = out
        # Absent outputs are distinct empty tensors: one tensor returned twice confuses torch.compile.
        gh = logp.new_zeros(0) if gh is None else gh.reshape(hidden.shape)
        entropy = logp.new_zeros(0) if entropy is None else entropy
        gw = logp.new_zeros(0) if gw is None else gw
        gb = logp.new_zeros(0) if gb is None else gb
        return loss, logp, entropy, stacked, gh, gw, gb

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*output[4:])
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *unused):  # noqa: ARG004
        grads = [None, None, None]
        if grad_loss is None:
            return (*grads, None, None, None, None, None, None, None, None)
        eager = not torch.compiler.is_compiling()
        if eager:
            # Eagerly the gradients computed in the forward are scaled in place and handed over: no second
            # weight-sized buffer. They can then serve one backward only.
            if getattr(ctx, "used", False):
                raise RuntimeError(
                    f"`{_FN}`: backward through the same call twice (retain_graph=True) is not supported: the "
                    "gradients computed in the forward are scaled in place by the first backward; call the loss again"
                )
            ctx.used = True
        for i, saved in enumerate(ctx.saved_tensors):
            if ctx.needs_input_grad[i] and saved.numel():
                scale = grad_loss.to(saved.dtype)
                grads[i] = saved.mul_(scale) if eager else saved * scale
        return (*grads, None, None, None, None, None, None, None, None)


_FusedLinear.forward.__signature__ = inspect.signature(_FusedLinear.forward)


def fused_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    objective: str = "gipo",
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    agg: str = "token-mean",
    denominator: float | torch.Tensor | None = None,
    behavior_weights: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    with_metrics: bool | str = True,
    with_entropy: bool = False,
    **options: Any,
) -> FusedLinearOutput:
    """A policy loss straight from hidden states and an output projection, without materialising the logits.

    Equal to ``<objective>_loss(logp, old_logp, advantages, mask, ...)`` with ``logp`` the log-softmax of
    ``(hidden @ weight.T + bias) / temperature`` gathered at ``target_ids``, but computed chunk by chunk over
    the tokens: the memory it adds is one chunk's logits (``chunk_size x vocab``) and the gradients, never a
    (tokens, vocab) array. The gradients with respect to ``hidden``, ``weight`` and ``bias`` are computed during
    the forward, while each chunk's softmax is in hand, and scaled by the upstream gradient in backward.

    Parameters
    ----------
    hidden : Tensor, shape (..., time, hidden_dim)
        Last hidden states of the policy (the input of ``lm_head``), at the positions that predict
        ``target_ids``. float32, float64, bfloat16 or float16.
    weight : Tensor, shape (vocab, hidden_dim)
        The output projection, as ``nn.Linear.weight`` (``lm_head.weight``, possibly tied to the input
        embedding); same dtype as ``hidden``.
    target_ids : Tensor of integers, shape (..., time)
        The sampled tokens whose log-probabilities enter the objective: ids in ``[0, vocab)`` at valid
        positions (not checked on the device); at masked positions any value (``-100``, padding): there an
        out-of-range id is read as 0 (it changes nothing but the returned ``logp`` at that position).
    old_logp, advantages, mask
        As in the array-level losses: shape (..., time); ``advantages`` also (..., 1).
    objective : {'gipo', 'ppo_clip', 'sapo', 'cispo', 'no_clip'}, default 'gipo'
        The objective; its options (``sigma``, ``clip_low``, ...) are passed as keywords.
    bias : Tensor, shape (vocab,), optional
        Output bias, same dtype as ``hidden``.
    temperature : float, default 1.0
        Sampling temperature: the logits are divided by it before the softmax (as the rollout engine did).
    chunk_size : int, optional
        Tokens per chunk. Default: 512, halved while a chunk's float32 logits exceed 256 MiB (down to 128).
    agg, denominator, behavior_weights, rollout_logp, with_metrics
        As in the array-level losses (``rollout_logp``: token shape).
    with_entropy : bool, default False
        Also return each token's entropy (detached), computed in the same pass over the vocabulary.
    **options
        The objective's options, e.g. ``sigma=1.0`` for GIPO, ``clip_low=0.2, clip_high=0.28`` for PPO-clip,
        and the off-policy options of the array-level losses: ``ratio_level``, ``rollout_is``,
        ``rollout_is_bounds``, ``opsm_delta``. ``ratio_level="sequence"``, a sequence or geometric
        ``rollout_is`` and ``opsm_delta`` tie a token's gradient to its sequence's log-probabilities: the
        logits are then computed twice (a first pass for every log-probability, a second for the gradients:
        4 matmuls per chunk instead of 3).

    Returns
    -------
    FusedLinearOutput
        ``(loss, metrics, logp, entropy)``: ``loss`` and ``metrics`` as the array-level loss; ``logp`` the
        detached log-probabilities of the targets, token shape; ``entropy`` likewise, or None.

    Notes
    -----
    Matmuls run in the input dtype; the log-softmax, the objective and everything after in float32 (float64
    for float64 inputs). The gradient of ``weight`` and ``bias`` accumulates over chunks in their own dtype.
    The per-token ``dloss/dlogp`` of each chunk comes from the core with the whole batch's aggregation weight,
    so every objective, aggregation mode and off-policy option is exact. Gradients are computed only for the inputs that require
    them, and only when grad mode is on. Double backward raises a ``RuntimeError``.

    Raises
    ------
    TypeError
        Non-floating ``hidden`` / ``weight``, mismatched dtypes, non-integer ``target_ids``, an unknown option.
    ValueError
        Shapes that do not match, an unknown ``objective`` or ``agg``, a bad ``temperature`` or ``chunk_size``.

    Examples
    --------
    >>> import torch
    >>> from gipo_core.torch import fused_linear_loss
    >>> hidden = torch.randn(2, 5, 16, requires_grad=True)          # (batch, time, hidden_dim)
    >>> lm_head = torch.nn.Linear(16, 100, bias=False)
    >>> ids = torch.randint(0, 100, (2, 5))
    >>> out = fused_linear_loss(hidden, lm_head.weight, ids, torch.full((2, 5), -4.6), torch.ones(2, 1), sigma=1.0)
    >>> out.loss.backward()
    >>> hidden.grad.shape, lm_head.weight.grad.shape, out.logp.shape
    (torch.Size([2, 5, 16]), torch.Size([100, 16]), torch.Size([2, 5]))
    """
    for name, value in (("hidden", hidden), ("weight", weight), ("target_ids", target_ids)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"`{_FN}`: `{name}` must be a torch.Tensor; got {type(value).__name__}")
    from .torch import _BACKEND  # here: gipo_core.torch imports this module

    arrays, args = check_fused_args(
        _FN,
        hidden,
        weight,
        target_ids,
        old_logp,
        advantages,
        mask,
        bias,
        behavior_weights,
        denominator,
        rollout_logp,
        spec=fused_spec(_FN, objective, options, agg, with_metrics),
        temperature=temperature,
        chunk_size=chunk_size,
        backend=_BACKEND,
        xp=_xp,
    )
    target_ids = readable_targets(_FN, target_ids, mask, weight.shape[0], with_entropy, _xp)
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    static = (args, with_entropy, needs)
    if any(needs):
        out = _FusedLinear.apply(hidden, weight, bias, target_ids, *arrays[1:], static)
        loss, logp, entropy, stacked = out[:4]
    else:
        with torch.no_grad():
            out = _compute(hidden, weight, bias, target_ids, arrays, args, with_entropy, needs)
            loss, logp, entropy, stacked = out[:4]
    names = metric_names(args.spec, rollout_logp is not None)
    metrics = dict(zip(names, stacked.unbind(0))) if names else {}
    return FusedLinearOutput(loss, metrics, logp, entropy if with_entropy else None)


class FusedLinearLoss(nn.Module):
    """:func:`fused_linear_loss` as an ``nn.Module``: objective and options fixed at construction.

    Parameters
    ----------
    objective : {'gipo', 'ppo_clip', 'sapo', 'cispo', 'no_clip'}, default 'gipo'
        The objective.
    temperature : float, default 1.0
        Logits are divided by it before the softmax.
    chunk_size : int, optional
        Tokens per chunk (default: see :func:`fused_linear_loss`).
    agg : str, default 'token-mean'
        Aggregation mode (verl's names).
    with_metrics : bool or 'basic', default True
        Compute the diagnostics (as in the array-level losses).
    with_entropy : bool, default False
        Also return each token's entropy.
    **options
        The objective's options (``sigma=...``, ``clip_low=...``) and the off-policy options (``ratio_level``,
        ``rollout_is``, ``rollout_is_bounds``, ``opsm_delta``), checked here.

    Examples
    --------
    >>> import torch
    >>> from gipo_core.torch import FusedLinearLoss
    >>> loss_fn = FusedLinearLoss("ppo_clip", clip_high=0.28, with_entropy=True)
    >>> hidden = torch.randn(3, 4, 8, requires_grad=True)
    >>> weight = torch.randn(50, 8, requires_grad=True)
    >>> ids = torch.randint(0, 50, (3, 4))
    >>> out = loss_fn(hidden, weight, ids, torch.full((3, 4), -3.9), torch.randn(3, 1))
    >>> out.loss.backward()
    >>> weight.grad.shape, out.entropy.shape
    (torch.Size([50, 8]), torch.Size([3, 4]))
    """

    def __init__(
        self,
        objective: str = "gipo",
        *,
        temperature: float = 1.0,
        chunk_size: int | None = None,
        agg: str = "token-mean",
        with_metrics: bool | str = True,
        with_entropy: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        self._spec = fused_spec(type(self).__name__, objective, options, agg, with_metrics)
        self.objective = objective
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.agg = self._spec.agg
        self.with_metrics = self._spec.with_metrics
        self.with_entropy = with_entropy

    @property
    def options(self) -> dict[str, Any]:
        """The objective's options (a copy)."""
        return dict(self._spec.options)

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        target_ids: torch.Tensor,
        old_logp: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        bias: torch.Tensor | None = None,
        denominator: float | torch.Tensor | None = None,
        behavior_weights: torch.Tensor | None = None,
        rollout_logp: torch.Tensor | None = None,
    ) -> FusedLinearOutput:
        """``fused_linear_loss`` of these tensors with this module's objective and options."""
        return fused_linear_loss(
            hidden,
            weight,
            target_ids,
            old_logp,
            advantages,
            mask,
            objective=self.objective,
            bias=bias,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            agg=self.agg,
            denominator=denominator,
            behavior_weights=behavior_weights,
            rollout_logp=rollout_logp,
            with_metrics=self.with_metrics,
            with_entropy=self.with_entropy,
            **spec_keywords(self._spec),
        )

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in spec_keywords(self._spec).items())
        return f"objective={self.objective!r}{opts}, agg={self.agg!r}, temperature={self.temperature}"


class FusedLinearGIPOLoss(FusedLinearLoss):
    """:class:`FusedLinearLoss` for GIPO: ``FusedLinearGIPOLoss(sigma=1.0)`` is
    ``FusedLinearLoss("gipo", sigma=1.0)``.

    Examples
    --------
    >>> import torch
    >>> from gipo_core.torch import FusedLinearGIPOLoss
    >>> FusedLinearGIPOLoss(sigma=0.5).options
    {'sigma': 0.5, 'sigma_neg': None, 'kernel': 'gaussian'}
    """

    def __init__(
        self,
        sigma: float = 1.0,
        sigma_neg: float | None = None,
        kernel: str = "gaussian",
        *,
        temperature: float = 1.0,
        chunk_size: int | None = None,
        agg: str = "token-mean",
        with_metrics: bool | str = True,
        with_entropy: bool = False,
        **off_policy: Any,
    ) -> None:
        super().__init__(
            "gipo",
            temperature=temperature,
            chunk_size=chunk_size,
            agg=agg,
            with_metrics=with_metrics,
            with_entropy=with_entropy,
            sigma=sigma,
            sigma_neg=sigma_neg,
            kernel=kernel,
            **off_policy,
        )
