"""The one contract every objective and every backend shares: forward, backward, diagnostics.

    forward(logp, old_logp, advantages, mask, behavior_weights, denominator, rollout_logp, /, *, spec, xp)
        -> (loss, saved, metrics)
    backward(grad_loss, saved, /, *, dtype, xp) -> grad_logp

``saved`` is a single array the size of the input, ``dloss/dlogp`` for an upstream gradient of 1: forward
computes it while the per-element terms are in hand, so backward is one multiply and a cast. Adapters store
nothing else.

Numerics, the same for every objective:

- Work in float32, or float64 when any of ``logp``, ``old_logp``, ``advantages``, ``rollout_logp`` is
  float64; reductions accumulate in that dtype (float16 inputs with more than 65,504 elements count right).
- Every sequence quantity (sequence ratio, sequence and geometric rollout weights, OPSM, the per-sequence
  counts of the ``seq-mean-*`` modes) goes through ``sequence.py``: masked sums and means over valid elements.
- Off-policy weights are formed in log space: one exp of a clipped log-weight.
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
from .sequence import broadcast, seq_count, seq_mean, seq_sum

__all__ = [
    "AGG_MODES",
    "METRIC_NAMES",
    "BASIC_METRIC_NAMES",
    "RATIO_LEVELS",
    "ROLLOUT_IS_MODES",
    "DEFAULT_ROLLOUT_IS_BOUNDS",
    "LossSpec",
    "forward",
    "backward",
    "metric_names",
    "rollout_bounds",
    "work_dtype",
    "trust_weight",
]

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm", "token-sum")
RATIO_LEVELS = ("token", "sequence")
ROLLOUT_IS_MODES = ("token-truncate", "token-mask", "sequence-truncate", "sequence-mask", "geometric-mask")

#: ``rollout_is_bounds`` when none are given: ``(low, high)`` on the correction weight (not its log).
#: Truncation clips to [low, high] (low 0: no lower clip); masking keeps weights inside [low, high].
#: token-truncate: verl's TIS cap 2.0 (``RolloutCorrectionConfig.rollout_is_threshold``); token-mask: the
#: IcePop band (0.5, 5.0) of verl's ``decoupled_token_mis``; sequence-truncate: verl's sequence TIS cap 2.0;
#: sequence-mask: verl's sequence rejection band "0.5_2.0" (``decoupled_seq_is_rs``); geometric-mask: verl's
#: geometric rejection band "0.999_1.001" (``decoupled_geo_rs``).
DEFAULT_ROLLOUT_IS_BOUNDS = {
    "token-truncate": (0.0, 2.0),
    "token-mask": (0.5, 5.0),
    "sequence-truncate": (0.0, 2.0),
    "sequence-mask": (0.5, 2.0),
    "geometric-mask": (0.999, 1.001),
}

#: Diagnostics every call returns, in order (see ``diagnostics`` for the definitions).
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
    "ppo_clip_frac_lower",
    "n_valid",
)
#: ``with_metrics="basic"``: the diagnostics that cost a few reductions only (the gradient multiplier's mean and
#: largest value, the k1 KL estimate and the count), for eager paths where every extra pass over the data shows.
BASIC_METRIC_NAMES = ("grad_mult_mean", "grad_mult_max", "kl_k1", "n_valid")
#: Added at ``ratio_level="sequence"``: extremes of the sequence ratio exp(mean log-ratio) over non-empty rows.
SEQUENCE_METRIC_NAMES = ("seq_ratio_max", "seq_ratio_min")
#: Added when ``rollout_logp`` is given: the correction weight actually applied (the raw exp(old - rollout)
#: per token when ``rollout_is`` is None), its ESS, and what the correction masked.
ROLLOUT_METRIC_NAMES = (
    "rollout_weight_mean",
    "rollout_weight_max",
    "rollout_ess",
    "rollout_masked_token_frac",
    "rollout_masked_seq_frac",
)
#: Added when ``opsm_delta`` is given: what off-policy sequence masking dropped.
OPSM_METRIC_NAMES = ("opsm_masked_token_frac", "opsm_masked_seq_frac")

#: The PPO clip width the ``ppo_clip_frac`` diagnostic uses for objectives other than PPO-clip.
DIAGNOSTIC_PPO_EPS = 0.2
#: The dual-clip constant ``ppo_clip_frac_lower`` uses where the loss has none (verl's ``clip_ratio_c``).
DIAGNOSTIC_DUAL_CLIP = 3.0


@dataclass(frozen=True)
class LossSpec:
    """Everything static about a call: hashable, so it can be a ``jax.custom_vjp`` non-differentiable argument.

    ``denominator`` holds a Python-number denominator; an array denominator travels as an array argument.
    """

    objective: str
    options: tuple[tuple[str, Any], ...]
    agg: str = "token-mean"
    denominator: float | None = None
    with_metrics: bool | str = True  # True (every diagnostic), False (none) or "basic" (BASIC_METRIC_NAMES)
    ratio_level: str = "token"
    rollout_is: str | None = None
    rollout_is_bounds: tuple[float, float] | None = None
    opsm_delta: float | None = None

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)


def metric_names(spec: LossSpec, rollout: bool) -> tuple[str, ...]:
    """The names of the diagnostics a call with ``spec`` returns, in order (``rollout``: ``rollout_logp`` given).

    Empty for ``with_metrics=False``; ``"basic"`` replaces the objective's own set by ``BASIC_METRIC_NAMES``
    (the off-policy diagnostics of the options in use stay)."""
    if not spec.with_metrics:
        return ()
    names: tuple[str, ...]
    if spec.with_metrics == "basic":
        names = BASIC_METRIC_NAMES
    else:
        names = METRIC_NAMES
    if spec.ratio_level == "sequence":
        names += SEQUENCE_METRIC_NAMES
    if rollout:
        names += ROLLOUT_METRIC_NAMES
    if spec.opsm_delta is not None:
        names += OPSM_METRIC_NAMES
    return names


def rollout_bounds(spec: LossSpec) -> tuple[float, float]:
    """``(low, high)`` of the spec's rollout correction (the mode's default when none are given)."""
    if spec.rollout_is_bounds is not None:
        return spec.rollout_is_bounds
    return DEFAULT_ROLLOUT_IS_BOUNDS[str(spec.rollout_is)]


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


def _log(x: float) -> float:
    """``log x`` for a bound, with ``log 0 = -inf`` and ``log inf = inf``."""
    return -math.inf if x == 0 else (math.inf if x == math.inf else math.log(x))


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
    m: Any, valid: Any, like: Any, spec: LossSpec, denominator: Any, wd: Any, xp: Any, *, binary: bool = False
) -> Any:
    """Aggregation weight ``c`` with ``loss = sum(c * L)``: per element for a float mask; else a Python
    float or a small array (0-d, or one value per sequence) that broadcasts.

    ``denominator`` (or ``spec.denominator``), when given, is the whole number the weighted sum is divided by,
    in every mode: token-mean the global token count, seq-mean-token-sum and seq-mean-token-mean the global
    sequence count, seq-mean-token-sum-norm the global sequence count times the horizon, token-sum any
    constant.

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
    if agg == "token-sum":
        return one if given is None else scale(one, given)
    # Sequence modes: the last axis is time; a sequence counts when it has a valid element.
    if m is None:
        per_seq = n_time
        n_seq = n_seq_total
    else:
        per_seq = seq_sum(m, valid, xp)
        n_seq = xp.sum(xp.astype(per_seq > 0, wd))
    if agg == "seq-mean-token-sum-norm":
        return scale(one, given if given is not None else n_seq * n_time)
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

    Arguments are assumed checked (see ``gipo_core._api``); shapes: ``logp``, ``old_logp``, ``mask``,
    ``behavior_weights`` and ``rollout_logp`` share one shape ``(..., time)``; ``advantages`` has that shape
    or ``(..., 1)``.

    Off-policy options (all decisions and weights are constants in backprop):

    - ``ratio_level="sequence"``: every element uses its sequence's mean log-ratio over valid elements
      (GSPO); the gradient reaches each element through its own ``logp`` (GSPO-token).
    - ``rollout_is``: a correction factor from ``r = old_logp - rollout_logp`` per element (token modes),
      its masked sum per sequence (sequence modes) or its masked mean (geometric), truncated or masked by
      :func:`rollout_bounds`, in log space; it multiplies each element's aggregation weight.
    - ``opsm_delta``: a sequence whose (mean) advantage is negative and whose mean of ``behaviour - logp``
      over valid elements exceeds ``delta`` gets weight 0 (behaviour: ``rollout_logp`` if given, else
      ``old_logp``).
    """
    objective = OBJECTIVES[spec.objective]
    opts = spec.opts
    wd = work_dtype(xp, logp, old_logp, advantages, rollout_logp)
    lp = xp.astype(logp, wd, copy=False)
    old = xp.astype(old_logp, wd, copy=False)
    ell = lp - old
    adv = xp.astype(advantages, wd, copy=False)
    bw = None if behavior_weights is None else xp.astype(behavior_weights, wd, copy=False)
    r = None if rollout_logp is None else old - xp.astype(rollout_logp, wd, copy=False)
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
        if r is not None:
            r = xp.where(valid, r, 0.0)

    sequence = spec.ratio_level == "sequence"
    needs_count = sequence or spec.opsm_delta is not None or spec.rollout_is == "geometric-mask"
    count = seq_count(valid, ell, xp) if needs_count else None
    ell_seq = seq_mean(ell, valid, xp, count) if sequence else None
    ell_eff = broadcast(ell_seq, ell, xp) if sequence else ell

    terms = objective.terms(ell_eff, adv, lp, opts, xp)
    binary = mask is not None and mask.dtype == xp.bool
    coef = _coefficient(m, valid, ell, spec, denominator, wd, xp, binary=binary)
    if bw is not None:
        coef = coef * bw
    correction = _rollout_correction(r, valid, count, spec, xp) if spec.rollout_is is not None else None
    if correction is not None:
        coef = coef * correction[0]
    opsm_keep = _opsm_keep(ell, r, adv, valid, count, spec, xp) if spec.opsm_delta is not None else None
    if opsm_keep is not None:
        coef = coef * xp.astype(opsm_keep, wd)
    if terms.grad is None:  # the per-element loss is its own gradient: one pass gives both
        saved = coef * terms.loss
        loss = xp.sum(saved)
    else:
        saved = coef * terms.grad
        loss = xp.sum(coef * terms.loss)
    if not spec.with_metrics:
        return loss, saved, {}
    names = metric_names(spec, r is not None)
    base = tuple(n for n in names if n in METRIC_NAMES)
    metrics = diagnostics(ell, ell_eff, adv, terms.mult, valid, spec, xp, base)
    if sequence:
        metrics.update(_sequence_diagnostics(ell_seq, count, xp))
    if r is not None:
        metrics.update(_rollout_diagnostics(r, correction, valid, ell, spec, xp))
    if opsm_keep is not None:
        metrics.update(_mask_fractions("opsm", opsm_keep, valid, ell, xp))
    return loss, saved, {name: metrics[name] for name in names}


def _rollout_correction(r: Any, valid: Any, count: Any, spec: LossSpec, xp: Any) -> tuple[Any, Any]:
    """``(factor, keep)``: the stop-gradient correction weight per element (token modes) or per sequence
    ``(..., 1)``, and the keep decision of the mask modes (None for truncation). All in log space: the weight
    is one exp of a clipped log-weight, so a sum of thousands of token log-weights cannot overflow."""
    low, high = rollout_bounds(spec)
    log_low, log_high = _log(low), _log(high)
    mode = str(spec.rollout_is)
    if mode.startswith("token"):
        log_w = r
    elif mode.startswith("sequence"):
        log_w = seq_sum(r, valid, xp)
    else:  # geometric: the mean, length-invariant
        log_w = seq_mean(r, valid, xp, count)
    if mode.endswith("truncate"):
        clipped = xp.minimum(log_w, log_high)
        if log_low > -math.inf:
            clipped = xp.maximum(clipped, log_low)
        return xp.exp(clipped), None
    keep = (log_w >= log_low) & (log_w <= log_high)
    return xp.where(keep, xp.exp(xp.minimum(log_w, log_high)), 0.0), keep


def _opsm_keep(ell: Any, r: Any, adv: Any, valid: Any, count: Any, spec: LossSpec, xp: Any) -> Any:
    """Off-policy sequence masking: False for a sequence with negative advantage whose mean of
    ``log mu - logp`` over valid elements exceeds ``opsm_delta`` (``mu`` the behaviour policy), shape (..., 1).

    The sequence's advantage is its mean over valid elements (the advantage itself for (..., 1) input)."""
    gap = -ell if r is None else -(ell + r)  # log mu - logp, with mu = rollout if given else old
    stat = seq_mean(gap, valid, xp, count)
    per_seq_adv = tuple(adv.shape)[-1] == 1
    a_seq = adv if per_seq_adv else seq_mean(adv, valid, xp, count)
    return ~((a_seq < 0) & (stat > spec.opsm_delta))


def backward(grad_loss: Any, saved: Any, /, *, dtype: Any, xp: Any) -> Any:
    """``grad_logp = grad_loss * saved``, cast to ``logp``'s dtype."""
    return xp.astype(grad_loss * saved, dtype, copy=False)


class _Reducer:
    """Masked means, fractions and extremes over the valid elements of arrays shaped like ``ell``.

    ``zero_outside=True`` says the array is already 0 (or False) at every masked element, so the sum or the
    largest value needs no masking pass (the core zeroes the log-ratio and the advantage there first)."""

    def __init__(self, ell: Any, valid: Any, xp: Any) -> None:
        self.xp, self.valid, self.wd = xp, valid, ell.dtype
        static = None not in tuple(ell.shape)
        self.n_total = math.prod(ell.shape) if static else None
        self.static = static
        if valid is None:
            self.n = float(math.prod(ell.shape)) if static else _counts(ell, xp)[1]
            self.n_valid = xp.sum(xp.ones_like(ell))
        else:
            self.n_valid = self.n = xp.sum(xp.astype(valid, self.wd))
        self.inv_n = 1.0 / _guard(self.n, xp)

    def masked(self, x: Any, fill: float) -> Any:
        return x if self.valid is None else self.xp.where(self.valid, x, fill)

    def mean(self, x: Any, zero_outside: bool = False) -> Any:
        return self.xp.sum(x if zero_outside else self.masked(x, 0.0)) * self.inv_n

    def frac(self, cond: Any, false_outside: bool = False) -> Any:
        return self.mean(self.xp.astype(cond, self.wd), zero_outside=false_outside)

    def extreme(self, x: Any, largest: bool, nonneg_zero_outside: bool = False) -> Any:
        """Largest or smallest valid value (0 with none). ``nonneg_zero_outside``: ``x >= 0`` everywhere and 0
        at masked elements, so its largest value needs no masking."""
        xp = self.xp
        if self.n_total == 0:
            return xp.sum(x)  # 0, of the right dtype and device
        if largest and nonneg_zero_outside:
            return xp.max(x)
        value = xp.max(self.masked(x, -math.inf)) if largest else xp.min(self.masked(x, math.inf))
        return value if self.valid is None and self.static else xp.where(self.n > 0, value, 0.0)

    def ess(self, u0: Any, u_max: Any) -> Any:
        """``(sum u)^2 / (n sum u^2)`` of a nonnegative ``u0`` that is 0 at masked elements, scaled by the
        largest ``u`` so that ``u^2`` cannot overflow; where ``u`` itself overflowed, the infinite elements
        dominate and count as 1 each; NaN if the largest is NaN."""
        xp = self.xp
        finite_max = u_max < math.inf
        scale = xp.where((u_max == 0) | ~finite_max, 1.0, u_max)
        q = xp.where(finite_max, u0 / scale, xp.astype(u0 == math.inf, self.wd))
        sum_q = xp.sum(q)
        sum_q2 = xp.sum(q * q)
        ess = (sum_q * sum_q) * self.inv_n / xp.where(sum_q2 == 0, 1.0, sum_q2)
        return xp.where(u_max == u_max, ess, u_max)


def _nan_if(flag: Any, values: dict[str, Any], xp: Any, keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every value NaN where the 0-d ``flag`` is true (a NaN input), except the names in ``keep``."""
    return {k: (v if k in keep else xp.where(flag, math.nan, v)) for k, v in values.items()}


def ppo_clip_conditions(ell_eff: Any, adv: Any, spec: LossSpec) -> tuple[Any, Any]:
    """Per element: whether PPO-clip's band silences it, and whether a dual clip caps it (the conditions of
    ``ppo_clip_frac`` and ``ppo_clip_frac_lower``; see ``diagnostics``). False where ``adv`` is 0."""
    opts = spec.opts
    is_ppo = spec.objective == "ppo_clip"
    if is_ppo:
        hi, lo = 1.0 + opts["clip_high"], 1.0 - opts["clip_low"]
    else:
        hi, lo = 1.0 + DIAGNOSTIC_PPO_EPS, 1.0 - DIAGNOSTIC_PPO_EPS
    dual = opts.get("dual_clip") if is_ppo else None
    if dual is None:
        dual = DIAGNOSTIC_DUAL_CLIP
    # rho vs the band, as ell vs its log: no exp needed (the same decision up to the last bit)
    clipped = ((ell_eff > math.log(hi)) & (adv > 0)) | ((ell_eff < math.log(lo)) & (adv < 0))
    return clipped, (adv < 0) & (ell_eff > math.log(dual))


def diagnostics(
    ell: Any, ell_eff: Any, adv: Any, mult: Any, valid: Any, spec: LossSpec, xp: Any, names: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The diagnostics ``names`` (default: all of ``METRIC_NAMES`` and the PPO ones that apply) over valid
    elements, as 0-d arrays of the work dtype on the inputs' device; each is computed only when asked for.

    ``weight_*`` is the method's trust weight (``u / rho``: GIPO's omega, PPO's 0/1 clip gate, SAPO's
    ``4 p (1 - p)``), ``grad_mult_*`` the gradient multiplier ``u`` (``dL/dlogp = -A u``),
    ``low_weight_frac`` the fraction with weight < 0.5 and its parts where ``A > 0`` and ``A <= 0`` (the
    parts add up to the whole), ``ess`` the effective sample size ``(sum u)^2 / (n sum u^2)``, ``ratio_*``
    the ratio the objective uses (the sequence ratio, once per element, at ``ratio_level="sequence"``),
    ``log_ratio_abs_*`` and ``kl_k1``, ``kl_k3`` (the estimators ``mean(-l)`` and ``mean(expm1(-l) + l)`` of
    KL(mu || pi)) the token log-ratio ``l``, ``ppo_clip_frac`` the fraction PPO-clip silences (rho > 1 +
    clip_high with A > 0 or rho < 1 - clip_low with A < 0; the loss's own band for ``ppo_clip_loss``, eps =
    0.2 for the others), ``ppo_clip_frac_lower`` the fraction a dual clip caps (A < 0 with rho > c: the loss's
    ``dual_clip`` for ``ppo_clip_loss``, c = 3 where there is none, verl's default), ``n_valid`` the number of valid elements. With no valid element every entry is 0; a NaN
    at a valid element (of the log-ratio or the advantage; log-ratios of +inf and -inf together count as
    one) makes every entry but ``n_valid`` NaN.
    """
    objective = OBJECTIVES[spec.objective]
    opts = spec.opts
    if not names:
        names = METRIC_NAMES
    red = _Reducer(ell, valid, xp)
    cache: dict[str, Any] = {}

    def get(key: str) -> Any:
        if key not in cache:
            cache[key] = parts[key]()
        return cache[key]

    parts = {
        "omega": lambda: objective.weight(ell_eff, adv, opts, xp),
        "rho": lambda: xp.exp(ell_eff),
        "abs_ell": lambda: xp.abs(ell),
        "low": lambda: get("omega") < 0.5,
        # u >= 0 for every objective: masked to 0 once, its sum, largest value and ESS need no more masking
        "u0": lambda: red.masked(mult, 0.0),
        "u_max": lambda: red.extreme(get("u0"), largest=True, nonneg_zero_outside=True),
        "weight_mean": lambda: red.mean(get("omega")),
        "weight_min": lambda: red.extreme(get("omega"), largest=False),
        "low_weight_frac": lambda: red.frac(get("low")),
        "low_weight_frac_pos": lambda: red.frac(get("low") & (adv > 0), false_outside=True),  # A = 0 there
        "low_weight_frac_neg": lambda: get("low_weight_frac") - get("low_weight_frac_pos"),
        "grad_mult_mean": lambda: red.mean(get("u0"), zero_outside=True),
        "grad_mult_max": lambda: get("u_max"),
        "ess": lambda: red.ess(get("u0"), get("u_max")),
        "ratio_mean": lambda: red.mean(get("rho")),
        "ratio_max": lambda: red.extreme(get("rho"), largest=True),
        "log_ratio_abs_mean": lambda: red.mean(get("abs_ell"), zero_outside=True),
        "log_ratio_abs_max": lambda: red.extreme(get("abs_ell"), largest=True, nonneg_zero_outside=True),
        "kl_k1": lambda: -get("ell_sum") * red.inv_n,
        "ell_sum": lambda: xp.sum(ell),  # ell is 0 at masked elements already
        "kl_k3": lambda: red.mean(xp.expm1(-ell) + ell, zero_outside=True),
        "clipped": lambda: ppo_clip_conditions(ell_eff, adv, spec),
        "ppo_clip_frac": lambda: red.frac(get("clipped")[0], false_outside=True),
        "ppo_clip_frac_lower": lambda: red.frac(get("clipped")[1], false_outside=True),
        "n_valid": lambda: red.n_valid,
    }
    values = {name: get(name) for name in names}
    # A NaN log-ratio makes the sum of l NaN; a NaN advantage the sum of A.
    adv_sum = xp.sum(adv)
    ell_sum = get("ell_sum")
    bad = (ell_sum != ell_sum) | (adv_sum != adv_sum)
    return _nan_if(bad, values, xp, keep=("n_valid",))


def _sequence_diagnostics(ell_seq: Any, count: Any, xp: Any) -> dict[str, Any]:
    """Extremes of the sequence ratio ``exp(mean l)`` over sequences with a valid element (0 if none)."""
    rows = count > 0
    has = xp.sum(xp.astype(rows, ell_seq.dtype)) > 0
    hi = xp.max(xp.where(rows, ell_seq, -math.inf)) if 0 not in tuple(ell_seq.shape) else xp.sum(ell_seq)
    lo = xp.min(xp.where(rows, ell_seq, math.inf)) if 0 not in tuple(ell_seq.shape) else xp.sum(ell_seq)
    return {
        "seq_ratio_max": xp.where(has, xp.exp(hi), 0.0),
        "seq_ratio_min": xp.where(has, xp.exp(lo), 0.0),
    }


def _mask_fractions(prefix: str, keep: Any, valid: Any, like: Any, xp: Any) -> dict[str, Any]:
    """Fractions of valid elements, and of sequences with a valid element, that ``keep`` (per element or
    per sequence) drops; a sequence counts when any of its valid elements is dropped."""
    wd = like.dtype
    dropped = xp.astype(~keep, wd) + xp.full_like(like, 0.0)  # per element
    red = _Reducer(like, valid, xp)
    rows_with = seq_count(valid, like, xp) > 0
    rows_dropped = (seq_sum(dropped, valid, xp) > 0) & rows_with
    n_rows = xp.sum(xp.astype(rows_with, wd))
    return {
        f"{prefix}_masked_token_frac": red.mean(dropped),
        f"{prefix}_masked_seq_frac": xp.sum(xp.astype(rows_dropped, wd)) / _guard(n_rows, xp),
    }


def _rollout_diagnostics(r: Any, correction: Any, valid: Any, like: Any, spec: LossSpec, xp: Any) -> dict[str, Any]:
    """The rollout correction weight applied per valid element: mean, max, ESS; what the correction masked."""
    red = _Reducer(like, valid, xp)
    if correction is None:
        w = xp.exp(r)
        keep = None
    else:
        w = correction[0] + xp.full_like(like, 0.0)
        keep = correction[1]
    w0 = red.masked(w, 0.0)  # w >= 0
    w_max = red.extreme(w0, largest=True, nonneg_zero_outside=True)
    values = {
        "rollout_weight_mean": red.mean(w0, zero_outside=True),
        "rollout_weight_max": w_max,
        "rollout_ess": red.ess(w0, w_max),
    }
    if keep is None:
        zero = xp.full_like(w_max, 0.0)
        values.update(rollout_masked_token_frac=zero, rollout_masked_seq_frac=zero)
    else:
        values.update(_mask_fractions("rollout", keep, valid, like, xp))
    r_abs = xp.sum(xp.abs(r))
    return _nan_if(r_abs != r_abs, values, xp)


def trust_weight(log_ratio: Any, sigma: float, /, *, xp: Any) -> Any:
    """``exp(-log_ratio^2 / (2 sigma^2))`` computed in float32 (or float64), returned in the input's dtype."""
    wd = work_dtype(xp, log_ratio)
    ell = xp.astype(log_ratio, wd, copy=False)
    return xp.astype(xp.exp(-(ell * ell) * (0.5 / (sigma * sigma))), log_ratio.dtype, copy=False)
