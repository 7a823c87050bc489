"""The one contract every objective and every backend shares: forward, backward, diagnostics.

    forward(logp, old_logp, advantages, mask, behavior_weights, denominator, /, *, spec, xp)
        -> (loss, saved, metrics)
    backward(grad_loss, saved, /, *, dtype, xp) -> grad_logp

``saved`` is a single array the size of the input, ``dloss/dlogp`` for an upstream gradient of 1: forward
computes it while the per-element terms are in hand, so backward is one multiply and a cast. Adapters store
nothing else.

Numerics, the same for every objective:

- Work in float32, or float64 when any of ``logp``, ``old_logp``, ``advantages`` is float64; reductions
  accumulate in that dtype (float16 inputs with more than 65,504 elements count right).
- Masked elements get ``l = 0`` and ``A = 0`` *before* any exp, so NaN or inf sitting at masked positions
  never reaches the loss, the gradient or the diagnostics.
- Every denominator is guarded: an all-masked batch gives loss 0, gradient 0 and finite diagnostics.
- No Python branching on array values, no host transfer: the functions trace under jit compilers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .objectives import OBJECTIVES

__all__ = ["AGG_MODES", "METRIC_NAMES", "LossSpec", "forward", "backward", "work_dtype", "trust_weight"]

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm", "token-sum")

#: The off-policy options and their defaults (issue "off-policy"); any other value is not implemented yet.
OFF_POLICY_DEFAULTS = (
    ("ratio_level", "token"),
    ("rollout_is", None),
    ("rollout_is_bounds", None),
    ("opsm_delta", None),
)

#: Diagnostics, in the order they are returned (see ``diagnostics`` for the definitions).
METRIC_NAMES = (
    "weight_mean",
    "weight_min",
    "low_weight_frac",
    "low_weight_frac_pos",
    "low_weight_frac_neg",
    "grad_mult_mean",
    "grad_mult_max",
    "ess",
    "ratio_mean",
    "ratio_max",
    "log_ratio_abs_mean",
    "log_ratio_abs_max",
    "kl_k1",
    "kl_k3",
    "ppo_clip_frac",
    "n_valid",
)

#: The PPO clip width the ``ppo_clip_frac`` diagnostic uses for every objective (PPO dashboards' default).
DIAGNOSTIC_PPO_EPS = 0.2


@dataclass(frozen=True)
class LossSpec:
    """Everything static about a call: hashable, so it can be a ``jax.custom_vjp`` non-differentiable argument.

    ``denominator`` holds a Python-number denominator; an array denominator travels as an array argument.
    """

    objective: str
    options: tuple[tuple[str, Any], ...]
    agg: str = "token-mean"
    denominator: float | None = None
    with_metrics: bool = True
    ratio_level: str = "token"
    rollout_is: str | None = None
    rollout_is_bounds: tuple[float, float] | None = None
    opsm_delta: float | None = None

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)


def work_dtype(xp: Any, *arrays: Any) -> Any:
    """float64 if any array is float64, else float32 (float16 and bfloat16 are computed in float32)."""
    for a in arrays:
        if a is not None and a.dtype == xp.float64:
            return xp.float64
    return xp.float32


def _guard(n: Any, xp: Any) -> Any:
    """A denominator that is never 0: where it is, every numerator term is 0 too."""
    if isinstance(n, (int, float)):
        return n if n != 0 else 1
    return xp.where(n == 0, 1.0, n)


def _counts(x: Any, xp: Any) -> tuple[Any, Any, Any]:
    """Element counts ``(time, total, sequences)`` of ``x``: Python ints when the shape is static, else 0-d
    arrays counted at run time (a dimension unknown at trace time: ``tf.function`` under Keras ``fit``)."""
    shape = tuple(x.shape)
    if None not in shape:
        return shape[-1], math.prod(shape), math.prod(shape[:-1])
    ones = xp.ones_like(x)
    n_total = xp.sum(ones)
    n_seq = xp.sum(ones[..., :1])
    return n_total / _guard(n_seq, xp), n_total, n_seq


def _coefficient(
    m: Any, like: Any, spec: LossSpec, denominator: Any, wd: Any, xp: Any, *, binary: bool = False
) -> Any:
    """Aggregation weight ``c`` with ``loss = sum(c * L)``: per element for a float mask; else a Python
    float or a small array (0-d, or one value per sequence) that broadcasts.

    ``binary``: the mask is bool. Masked elements already have ``L = 0`` and ``dL/dlogp = 0`` (their advantage
    is zeroed before the objective runs), so the mask only counts and need not multiply: one full-size
    pass fewer."""
    n_time, n_total, n_seq_total = _counts(like, xp)
    given = spec.denominator if denominator is None else xp.astype(denominator, wd)
    agg = spec.agg

    def scale(numerator: Any, denom: Any) -> Any:
        # A reciprocal of the (scalar or per-sequence) count, then a multiply: no division per element.
        return numerator * (1.0 / _guard(denom, xp))

    one = 1.0 if m is None or binary else m
    if agg == "token-mean":
        count = given if given is not None else (n_total if m is None else xp.sum(m))
        return scale(one, count)
    if agg == "seq-mean-token-sum-norm":
        return scale(one, given if given is not None else n_time)
    # Sequence modes: the last axis is time.
    if m is None:
        per_seq = n_time
        n_seq = n_seq_total
    else:
        per_seq = xp.sum(m, axis=-1, keepdims=True)
        n_seq = xp.sum(xp.astype(per_seq > 0, wd))
    if given is not None:
        n_seq = given
    if agg == "seq-mean-token-sum":
        return scale(one, n_seq)
    # seq-mean-token-mean
    return scale(one, _guard(per_seq, xp) * _guard(n_seq, xp))


def forward(
    logp: Any,
    old_logp: Any,
    advantages: Any,
    mask: Any = None,
    behavior_weights: Any = None,
    denominator: Any = None,
    rollout_logp: Any = None,
    /,
    *,
    spec: LossSpec,
    xp: Any,
) -> tuple[Any, Any, dict[str, Any]]:
    """Loss, the saved gradient coefficient and the diagnostics (empty dict unless ``spec.with_metrics``).

    Arguments are assumed checked (see ``gipo_core._api``); shapes: ``logp``, ``old_logp``, ``mask`` and
    ``behavior_weights`` share one shape ``(..., time)``; ``advantages`` has that shape or ``(..., 1)``.
    """
    _not_implemented(spec, rollout_logp)
    objective = OBJECTIVES[spec.objective]
    opts = spec.opts
    wd = work_dtype(xp, logp, old_logp, advantages)
    lp = xp.astype(logp, wd, copy=False)
    ell = lp - xp.astype(old_logp, wd, copy=False)
    adv = xp.astype(advantages, wd, copy=False)
    bw = None if behavior_weights is None else xp.astype(behavior_weights, wd, copy=False)
    if mask is None:
        m = valid = None
    else:
        if mask.dtype == xp.bool:
            valid, m = mask, xp.astype(mask, wd)
        else:
            m = xp.astype(mask, wd, copy=False)
            valid = m != 0
        # Zero every input at masked elements before any exp: NaN/inf there must not leak.
        ell = xp.where(valid, ell, 0.0)
        adv = xp.where(valid, adv, 0.0)
        if objective.uses_logp:
            lp = xp.where(valid, lp, 0.0)
        if bw is not None:
            bw = xp.where(valid, bw, 0.0)

    terms = objective.terms(ell, adv, lp, opts, xp)
    coef = _coefficient(m, ell, spec, denominator, wd, xp, binary=mask is not None and mask.dtype == xp.bool)
    if bw is not None:
        coef = coef * bw
    if terms.grad is None:  # the per-element loss is its own gradient: one pass gives both
        saved = coef * terms.loss
        loss = xp.sum(saved)
    else:
        saved = coef * terms.grad
        loss = xp.sum(coef * terms.loss)
    metrics = diagnostics(ell, adv, terms.mult, valid, spec, xp) if spec.with_metrics else {}
    return loss, saved, metrics


def _not_implemented(spec: LossSpec, rollout_logp: Any) -> None:
    for name, default in OFF_POLICY_DEFAULTS:
        if getattr(spec, name) != default:
            raise NotImplementedError(f"`{name}={getattr(spec, name)!r}` is not implemented yet")
    if rollout_logp is not None:
        raise NotImplementedError("`rollout_logp` is not implemented yet")
    if spec.agg == "token-sum":
        raise NotImplementedError("`agg='token-sum'` is not implemented yet")
    if spec.opts.get("clip_min") is not None:
        raise NotImplementedError("`clip_min` is not implemented yet")


def backward(grad_loss: Any, saved: Any, /, *, dtype: Any, xp: Any) -> Any:
    """``grad_logp = grad_loss * saved``, cast to ``logp``'s dtype."""
    return xp.astype(grad_loss * saved, dtype, copy=False)


def diagnostics(ell: Any, adv: Any, mult: Any, valid: Any, spec: LossSpec, xp: Any) -> dict[str, Any]:
    """The diagnostics over valid elements, as 0-d arrays of the work dtype on the inputs' device.

    ``weight_*`` is the method's trust weight (``u / rho``: GIPO's omega, PPO's 0/1 clip gate, SAPO's
    ``4 p (1 - p)``), ``grad_mult_*`` the gradient multiplier ``u`` (``dL/dlogp = -A u``),
    ``low_weight_frac`` the fraction with weight < 0.5 and its parts where ``A > 0`` and ``A <= 0`` (the
    parts add up to the whole), ``ess`` the effective sample size ``(sum u)^2 / (n sum u^2)``, ``kl_k1``
    and ``kl_k3`` the estimators ``mean(-l)`` and ``mean(expm1(-l) + l)`` of KL(mu || pi),
    ``ppo_clip_frac`` the fraction PPO-clip at eps = 0.2 would silence (rho > 1.2 with A > 0 or rho < 0.8
    with A < 0), ``n_valid`` the number of valid elements. With no valid element every entry is 0.
    """
    objective = OBJECTIVES[spec.objective]
    wd = ell.dtype
    static = None not in tuple(ell.shape)
    n_total = math.prod(ell.shape) if static else None
    if valid is None:
        n = float(n_total) if static else _counts(ell, xp)[1]
        vmask = None
    else:
        vmask = xp.astype(valid, wd)
        n = xp.sum(vmask)
    inv_n = 1.0 / _guard(n, xp)

    def masked(x: Any, fill: float) -> Any:
        return x if valid is None else xp.where(valid, x, fill)

    def mean(x: Any) -> Any:
        return xp.sum(masked(x, 0.0)) * inv_n

    def frac(cond: Any) -> Any:
        return mean(xp.astype(cond, wd))

    def extreme(x: Any, largest: bool) -> Any:
        if n_total == 0:
            return xp.sum(x)  # 0, of the right dtype and device
        if largest:
            value = xp.max(masked(x, -math.inf))
        else:
            value = xp.min(masked(x, math.inf))
        return value if valid is None and static else xp.where(n > 0, value, 0.0)

    omega = objective.weight(ell, adv, spec.opts, xp)
    rho = xp.exp(ell)
    abs_ell = xp.abs(ell)
    low = omega < 0.5
    u_max = extreme(mult, largest=True)
    # Scaled by the largest u so that u^2 cannot overflow; where u itself overflowed, the infinite
    # elements dominate and count as 1 each.
    finite_max = u_max < math.inf
    r = xp.where(finite_max, mult / xp.where((u_max == 0) | ~finite_max, 1.0, u_max), xp.astype(mult == math.inf, wd))
    sum_r = xp.sum(masked(r, 0.0))
    sum_r2 = xp.sum(masked(r * r, 0.0))
    ess = (sum_r * sum_r) * inv_n / xp.where(sum_r2 == 0, 1.0, sum_r2)
    hi, lo = 1.0 + DIAGNOSTIC_PPO_EPS, 1.0 - DIAGNOSTIC_PPO_EPS
    values = {
        "weight_mean": mean(omega),
        "weight_min": extreme(omega, largest=False),
        "low_weight_frac": frac(low),
        "low_weight_frac_pos": frac(low & (adv > 0)),
        "low_weight_frac_neg": frac(low & (adv <= 0)),
        "grad_mult_mean": mean(mult),
        "grad_mult_max": u_max,
        "ess": ess,
        "ratio_mean": mean(rho),
        "ratio_max": extreme(rho, largest=True),
        "log_ratio_abs_mean": mean(abs_ell),
        "log_ratio_abs_max": extreme(abs_ell, largest=True),
        "kl_k1": mean(-ell),
        "kl_k3": mean(xp.expm1(-ell) + ell),
        "ppo_clip_frac": frac(((rho > hi) & (adv > 0)) | ((rho < lo) & (adv < 0))),
        "n_valid": xp.astype(xp.sum(vmask), wd) if vmask is not None else xp.sum(xp.ones_like(ell)),
    }
    return {name: values[name] for name in METRIC_NAMES}


def trust_weight(log_ratio: Any, sigma: float, /, *, xp: Any) -> Any:
    """``exp(-log_ratio^2 / (2 sigma^2))`` computed in float32 (or float64), returned in the input's dtype."""
    wd = work_dtype(xp, log_ratio)
    ell = xp.astype(log_ratio, wd, copy=False)
    return xp.astype(xp.exp(-(ell * ell) * (0.5 / (sigma * sigma))), log_ratio.dtype, copy=False)
