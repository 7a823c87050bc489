"""The public API every backend module exposes, built once from the objective registry.

A backend supplies one function, ``run(arrays, spec, xp) -> LossOutput``, that wires the core's
forward/backward into its framework's autodiff. ``make_api`` turns it into ``gipo_loss``, ``ppo_clip_loss``,
``no_clip_loss``, ``sapo_loss``, ``cispo_loss`` and ``gaussian_trust_weight`` with identical signatures,
defaults, checks and docstrings in every backend.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

from ._core.engine import AGG_MODES, METRIC_NAMES, LossSpec, trust_weight
from ._core.objectives import OBJECTIVES
from ._lib import checks
from ._lib.namespace import array_namespace

__all__ = ["LossOutput", "LossArrays", "make_api", "KERNELS", "AGG_MODES", "METRIC_NAMES", "PUBLIC_LOSSES"]

KERNELS = ("gaussian", "laplace", "cauchy")

#: Public loss-function name -> objective key.
PUBLIC_LOSSES = {obj.public_name: key for key, obj in OBJECTIVES.items()}


class LossOutput(NamedTuple):
    """What every loss function returns: the scalar ``loss`` and a dict of 0-d diagnostic arrays."""

    loss: Any
    metrics: dict


class LossArrays(NamedTuple):
    """The array arguments of a call, checked; ``denominator`` only when it is an array."""

    logp: Any
    old_logp: Any
    advantages: Any
    mask: Any
    behavior_weights: Any
    denominator: Any
    rollout_logp: Any = None


def _check_options(fn: str, objective: str, options: dict) -> tuple[tuple[str, Any], ...]:
    if objective == "gipo":
        checks.check_positive(fn, "sigma", options["sigma"])
        if options["sigma_neg"] is not None:
            checks.check_positive(fn, "sigma_neg", options["sigma_neg"])
        checks.check_choice(fn, "kernel", options["kernel"], KERNELS)
    elif objective == "ppo_clip":
        checks.check_positive(fn, "clip_low", options["clip_low"])
        checks.check_positive(fn, "clip_high", options["clip_high"])
        if options["clip_low"] >= 1.0:
            raise ValueError(f"`{fn}`: `clip_low` must be < 1 so that 1 - clip_low > 0; got {options['clip_low']!r}")
        if options["dual_clip"] is not None:
            checks.check_greater_than(fn, "dual_clip", options["dual_clip"], 1.0)
    elif objective == "sapo":
        checks.check_positive(fn, "tau_pos", options["tau_pos"])
        checks.check_positive(fn, "tau_neg", options["tau_neg"])
    elif objective == "cispo":
        checks.check_positive(fn, "clip_max", options["clip_max"])
        if options["clip_min"] is not None:
            checks.check_positive(fn, "clip_min", options["clip_min"])
            if options["clip_min"] >= options["clip_max"]:
                raise ValueError(
                    f"`{fn}`: `clip_min` must be < `clip_max` ({options['clip_max']!r}); got {options['clip_min']!r}"
                )
    return tuple(
        (k, float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in options.items()
    )


RATIO_LEVELS = ("token", "sequence")
ROLLOUT_IS_MODES = ("token-truncate", "token-mask", "sequence-truncate", "sequence-mask", "geometric-mask")

#: Off-policy options common to every objective, with their defaults.
OFF_POLICY_DEFAULTS = {"ratio_level": "token", "rollout_is": None, "rollout_is_bounds": None, "opsm_delta": None}


def check_off_policy(fn: str, options: dict) -> dict:
    """The off-policy options, checked and normalised (floats, a tuple of bounds)."""
    out = dict(OFF_POLICY_DEFAULTS)
    out.update(options)
    checks.check_choice(fn, "ratio_level", out["ratio_level"], RATIO_LEVELS)
    if out["rollout_is"] is not None:
        checks.check_choice(fn, "rollout_is", out["rollout_is"], ROLLOUT_IS_MODES)
    bounds = out["rollout_is_bounds"]
    if bounds is not None:
        try:
            low, high = bounds
        except (TypeError, ValueError):
            raise ValueError(f"`{fn}`: `rollout_is_bounds` must be None or a pair (low, high); got {bounds!r}") from None
        low = checks.check_nonnegative(fn, "rollout_is_bounds[0]", low)
        high = checks.check_positive(fn, "rollout_is_bounds[1]", high)
        if not low < high:
            raise ValueError(f"`{fn}`: `rollout_is_bounds` must have low < high; got {bounds!r}")
        out["rollout_is_bounds"] = (low, high)
    if out["opsm_delta"] is not None:
        out["opsm_delta"] = checks.check_finite(fn, "opsm_delta", out["opsm_delta"])
    return out


def prepare(
    fn: str,
    objective: str,
    logp: Any,
    old_logp: Any,
    advantages: Any,
    mask: Any,
    behavior_weights: Any,
    denominator: Any,
    agg: str,
    with_metrics: bool,
    options: dict,
    rollout_logp: Any = None,
    off_policy: dict | None = None,
) -> tuple[LossArrays, LossSpec, Any]:
    """Check every argument from shapes, dtypes, devices and options alone; build the static spec."""
    for name, value in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages)):
        if value is None:
            raise TypeError(f"`{fn}`: `{name}` is required; got None")
    xp = array_namespace(logp, old_logp, advantages, mask, behavior_weights, rollout_logp, fn=fn)
    if not hasattr(denominator, "shape") and denominator is not None and not isinstance(denominator, (int, float)):
        raise TypeError(
            f"`{fn}`: `denominator` must be None, a number > 0 or a 0-d array; got {type(denominator).__name__}"
        )
    if hasattr(denominator, "shape"):
        array_namespace(logp, denominator, fn=fn)
    ref_shape = checks.shape_of(logp)
    if len(ref_shape) < 1:
        raise ValueError(f"`{fn}`: `logp` must have at least one axis (..., time); got a 0-d array")
    for name, value in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages)):
        checks.check_floating(fn, name, value, xp)
    checks.check_same_shape(fn, "old_logp", old_logp, ref_shape)
    if rollout_logp is not None:
        checks.check_floating(fn, "rollout_logp", rollout_logp, xp)
        checks.check_same_shape(fn, "rollout_logp", rollout_logp, ref_shape)
    checks.check_advantages_shape(fn, advantages, ref_shape)
    if mask is not None:
        checks.check_mask(fn, mask, ref_shape, xp)
    if behavior_weights is not None:
        checks.check_floating(fn, "behavior_weights", behavior_weights, xp)
        checks.check_same_shape(fn, "behavior_weights", behavior_weights, ref_shape)
    for name, value in (
        ("old_logp", old_logp),
        ("advantages", advantages),
        ("mask", mask),
        ("behavior_weights", behavior_weights),
        ("rollout_logp", rollout_logp),
    ):
        if value is not None:
            checks.check_same_device(fn, name, value, logp)
    checks.check_choice(fn, "agg", agg, AGG_MODES)
    if not isinstance(with_metrics, bool) and with_metrics != "basic":
        raise TypeError(f"`{fn}`: `with_metrics` must be True, False or 'basic'; got {with_metrics!r}")
    denom = checks.check_denominator(fn, denominator, logp, xp)
    if (off_policy or {}).get("rollout_is") is not None and rollout_logp is None:
        raise ValueError(
            f"`{fn}`: `rollout_is={off_policy['rollout_is']!r}` corrects with `rollout_logp`, which is None; pass "
            "the log-probs of the policy that generated the samples"
        )
    spec = LossSpec(
        objective=objective,
        options=_check_options(fn, objective, options),
        agg=agg,
        denominator=denom if isinstance(denom, float) else None,
        with_metrics=with_metrics,
        **check_off_policy(fn, off_policy or {}),
    )
    arrays = LossArrays(
        logp,
        old_logp,
        advantages,
        mask,
        behavior_weights,
        None if isinstance(denom, float) or denom is None else denom,
        rollout_logp,
    )
    return arrays, spec, xp


_COMMON_DOC = """
Parameters
----------
logp : array, shape (..., time)
    Log-probabilities of the taken actions under the current policy: the only input that receives a
    gradient. Any rank >= 1; the sequence aggregation modes read the last axis as time.
old_logp : array, same shape as ``logp``
    Log-probabilities under the behaviour policy that produced the samples (treated as data).
advantages : array, shape of ``logp`` or (..., 1)
    Advantages per element, or one per sequence (size 1 on the last axis). Any other broadcast, such as
    shape (batch,) against (batch, time), is rejected.
mask : array of bool or floating dtype, same shape as ``logp``, optional
    Valid elements (non-zero). Masked elements contribute nothing, whatever values sit there (NaN included).
{options}agg : {{'token-mean', 'seq-mean-token-sum', 'seq-mean-token-mean', 'seq-mean-token-sum-norm'}}
    How per-element losses are reduced (verl's names): sum(m L) / N_tok; sum(m L) / N_seq;
    mean over sequences of each sequence's token mean; sum(m L) / C with C the length of the time axis.
denominator : float or 0-d array, optional
    The global token count (token-mean), sequence count (seq-mean-*) or constant (…-sum-norm) to divide by
    instead of the local one, so that losses of shards of one batch (data-parallel ranks, gradient-
    accumulation micro-batches) add up exactly to the full-batch loss.
behavior_weights : array, same shape as ``logp``, optional
    Detached per-element weights (rollout corrections, e.g. truncated IS between rollout and trainer
    engines) multiplying each element's loss.
with_metrics : bool, default True
    Compute the diagnostics. False skips their passes over the data and returns an empty dict.

Returns
-------
LossOutput
    ``(loss, metrics)``: ``loss`` a 0-d array in float32 (float64 if an input is float64); ``metrics`` a dict
    of 0-d arrays on the inputs' device: {metrics}.

Notes
-----
{math}

Computed in float32 (float64 when given float64); the gradient comes back in ``logp``'s dtype. Masked
elements get log-ratio 0 and advantage 0 before any exp; every denominator is guarded, so an all-masked
batch gives loss 0 and a zero gradient.

Raises
------
TypeError
    ``logp``, ``old_logp``, ``advantages`` or ``behavior_weights`` not of a real floating dtype; a ``mask``
    neither bool nor floating; arrays from two array libraries.
ValueError
    Shapes that do not match (see ``advantages``); arrays on two devices; an option that is not finite and
    positive; an unknown ``agg`` or kernel.

References
----------
.. [1] GIPO: Gaussian Importance sampling Policy Optimization, arXiv:2603.03955 (ICML 2026).
"""

_OPTION_DOCS = {
    "sigma": "sigma : float, default 1.0\n    Width of the trust weight in log-ratio units (> 0). Large sigma -> plain importance sampling.\n",
    "sigma_neg": "sigma_neg : float, optional\n    Width used where the advantage is <= 0 (default: ``sigma``).\n",
    "kernel": "kernel : {'gaussian', 'laplace', 'cauchy'}, default 'gaussian'\n    Shape of the trust weight in log-ratio space.\n",
    "clip_low": "clip_low : float, default 0.2\n    The ratio is clipped below at 1 - clip_low (0 < clip_low < 1).\n",
    "clip_high": "clip_high : float, default 0.2\n    The ratio is clipped above at 1 + clip_high.\n",
    "dual_clip": "dual_clip : float, optional\n    Dual-clip constant c > 1 (3.0 is common): the loss of A < 0 elements is capped at -c A.\n",
    "tau_pos": "tau_pos : float, default 1.0\n    Gate temperature where A > 0.\n",
    "tau_neg": "tau_neg : float, default 1.05\n    Gate temperature where A <= 0.\n",
    "clip_max": "clip_max : float, default 5.0\n    Upper bound on the detached importance ratio.\n",
    "clip_min": "clip_min : float, optional\n    Lower bound on the detached importance ratio (default: none).\n",
}


def _make_loss(objective_key: str, run: Callable, module: str, example: str) -> Callable:
    objective = OBJECTIVES[objective_key]
    fn_name = objective.public_name
    defaults = dict(objective.defaults)

    def loss_fn(logp, old_logp, advantages, mask=None, **kwargs):  # signature set below
        unknown = sorted(set(kwargs) - set(defaults) - _COMMON_KW)
        if unknown:
            valid = ", ".join(list(defaults) + sorted(_COMMON_KW))
            raise TypeError(f"`{fn_name}`: unexpected keyword argument(s) {', '.join(unknown)}; valid: {valid}")
        options = {k: kwargs.get(k, v) for k, v in defaults.items()}
        arrays, spec, xp = prepare(
            fn_name,
            objective_key,
            logp,
            old_logp,
            advantages,
            mask,
            kwargs.get("behavior_weights"),
            kwargs.get("denominator"),
            kwargs.get("agg", "token-mean"),
            kwargs.get("with_metrics", True),
            options,
            kwargs.get("rollout_logp"),
            {k: kwargs[k] for k in OFF_POLICY_DEFAULTS if k in kwargs},
        )
        return run(arrays, spec, xp)

    positional = [
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ("logp", "old_logp", "advantages")
    ] + [inspect.Parameter("mask", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)]
    keyword = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in objective.defaults]
    keyword += [
        inspect.Parameter("agg", inspect.Parameter.KEYWORD_ONLY, default="token-mean"),
        inspect.Parameter("denominator", inspect.Parameter.KEYWORD_ONLY, default=None),
        inspect.Parameter("behavior_weights", inspect.Parameter.KEYWORD_ONLY, default=None),
        inspect.Parameter("rollout_logp", inspect.Parameter.KEYWORD_ONLY, default=None),
    ]
    keyword += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in OFF_POLICY_DEFAULTS.items()]
    keyword += [inspect.Parameter("with_metrics", inspect.Parameter.KEYWORD_ONLY, default=True)]
    loss_fn.__signature__ = inspect.Signature(positional + keyword, return_annotation="LossOutput")
    loss_fn.__name__ = loss_fn.__qualname__ = fn_name
    loss_fn.__module__ = module
    options_doc = "".join(_OPTION_DOCS[k] for k, _ in objective.defaults)
    loss_fn.__doc__ = (
        objective.summary
        + "\n"
        + _COMMON_DOC.format(options=options_doc, metrics=", ".join(METRIC_NAMES), math=objective.math)
        + ("\nExamples\n--------\n" + example.format(fn=fn_name) if example else "")
    )
    return loss_fn


_COMMON_KW = frozenset({"agg", "denominator", "behavior_weights", "with_metrics", "rollout_logp", *OFF_POLICY_DEFAULTS})


def _make_trust_weight(module: str) -> Callable:
    def gaussian_trust_weight(log_ratio: Any, sigma: float = 1.0) -> Any:
        """Gaussian trust weight ``omega = exp(-log_ratio**2 / (2 sigma**2))``, in ``log_ratio``'s dtype.

        Parameters
        ----------
        log_ratio : array
            ``log pi - log mu`` per element (any shape, real floating dtype).
        sigma : float, default 1.0
            Width in log-ratio units (finite, > 0).

        Returns
        -------
        array
            The weight, in (0, 1], computed in float32 (float64 for float64 input).

        Raises
        ------
        TypeError
            ``log_ratio`` not of a real floating dtype.
        ValueError
            ``sigma`` not finite and positive.
        """
        fn = "gaussian_trust_weight"
        xp = array_namespace(log_ratio, fn=fn)
        checks.check_floating(fn, "log_ratio", log_ratio, xp)
        sigma = checks.check_positive(fn, "sigma", sigma)
        return trust_weight(log_ratio, sigma, xp=xp)

    gaussian_trust_weight.__module__ = module
    return gaussian_trust_weight


def make_api(run: Callable, module: str, example: str = "") -> dict[str, Callable]:
    """The public functions of one backend, keyed by name."""
    api = {obj.public_name: _make_loss(key, run, module, example) for key, obj in OBJECTIVES.items()}
    api["gaussian_trust_weight"] = _make_trust_weight(module)
    return api
