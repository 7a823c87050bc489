"""The call every loss shares, declared once: array arguments, common options, and how they become a spec.

A loss function's signature is, in this order::

    fn(logp, old_logp, advantages, mask=None, *, <objective options>, <COMMON_OPTIONS>, <CALL_ARRAYS>)

and a loss class's::

    Cls(<objective options>, *, <COMMON_OPTIONS>)(logp, old_logp, advantages, mask=None, *, <CALL_ARRAYS>)

Every common option is a field of :class:`~gipo_core._core.engine.LossSpec` with the same name. Adding one is a
change here (an :class:`~gipo_core._core.options.Option` entry) and a ``LossSpec`` field, then
``python -m gipo_core._codegen`` to refresh the typed signatures (see CONTRIBUTING.md).
"""

from __future__ import annotations

from typing import Any, Mapping

from .engine import AGG_MODES, LossSpec
from .objectives import OBJECTIVES
from .options import Option, choice, flag, number_in, option, optional, pair_in

__all__ = [
    "POSITIONAL_ARRAYS",
    "CALL_ARRAYS",
    "COMMON_OPTIONS",
    "RATIO_LEVELS",
    "ROLLOUT_IS_MODES",
    "DENOMINATOR_RANGE",
    "make_spec",
    "check_common",
]

RATIO_LEVELS = ("token", "sequence")
ROLLOUT_IS_MODES = ("token-truncate", "token-mask", "sequence-truncate", "sequence-mask", "geometric-mask")

#: The working range of a number ``denominator`` (a token or sequence count, possibly divided by a world size).
DENOMINATOR_RANGE = (1e-6, 1e12)

#: Positional array arguments: (name, numpydoc type, description).
POSITIONAL_ARRAYS = (
    (
        "logp",
        "array, shape (..., time)",
        "Log-probabilities of the taken actions under the current policy: the only input that receives a\n"
        "gradient. Any rank >= 1; the sequence aggregation modes read the last axis as time.",
    ),
    (
        "old_logp",
        "array, same shape as ``logp``",
        "Log-probabilities under the policy the update starts from (the behaviour or proximal policy; data).",
    ),
    (
        "advantages",
        "array, shape of ``logp`` or (..., 1)",
        "Advantages per element, or one per sequence (size 1 on the last axis). Any other broadcast, such as\n"
        "shape (batch,) against (batch, time), is rejected.",
    ),
    (
        "mask",
        "array of bool or floating dtype, same shape as ``logp``, optional",
        "Valid elements (non-zero). Masked elements contribute nothing, whatever values sit there (NaN included).",
    ),
)

#: Keyword-only per-batch arguments (data, no gradient): (name, numpydoc type, description).
CALL_ARRAYS = (
    (
        "denominator",
        "float or one-element array, optional",
        "The whole number the weighted sum is divided by, in place of the local one: the global token count\n"
        "(token-mean), sequence count (seq-mean-token-sum, seq-mean-token-mean), sequence count times the\n"
        "horizon (seq-mean-token-sum-norm), any constant (token-sum), so that losses of shards of one batch\n"
        "(data-parallel ranks, gradient-accumulation micro-batches) add up exactly to the full-batch loss\n"
        "(pass the global value divided by the number of shards). A number must lie in\n"
        f"[{DENOMINATOR_RANGE[0]:g}, {DENOMINATOR_RANGE[1]:g}]; an array (int or float, one element, any shape) is\n"
        "not read on the host.",
    ),
    (
        "behavior_weights",
        "array, same shape as ``logp``, optional",
        "Detached per-element weights multiplying each element's loss (e.g. a rollout correction computed\n"
        "elsewhere).",
    ),
    (
        "rollout_logp",
        "array, same shape as ``logp``, optional",
        "Log-probabilities under the policy that generated the sample (an inference engine, an older actor),\n"
        "when it differs from ``old_logp``: the input of ``rollout_is`` and ``opsm_delta`` (data).",
    ),
)

def _metrics_level(fn: str, name: str, value: Any) -> Any:
    """``with_metrics``: True, False (NumPy bools too) or ``"basic"``."""
    return _metrics_level_check(fn, name, value)


COMMON_OPTIONS: tuple[Option, ...] = (
    option(
        "agg",
        "token-mean",
        "Literal[" + ", ".join(f'"{a}"' for a in AGG_MODES) + "]",
        "How per-element losses are reduced (verl's names): sum(m L) / N_tok; sum(m L) / N_seq; the mean over\n"
        "sequences of each sequence's token mean; sum(m L) / (N_seq T) with T the length of the time axis;\n"
        "sum(m L).",
        choice(AGG_MODES),
    ),
    option(
        "ratio_level",
        "token",
        'Literal["token", "sequence"]',
        "``'token'``: one ratio per element. ``'sequence'``: each sequence's masked mean log-ratio (GSPO).",
        choice(RATIO_LEVELS),
    ),
    option(
        "rollout_is",
        None,
        "Literal[" + ", ".join(f'"{m}"' for m in ROLLOUT_IS_MODES) + "] | None",
        "Rollout correction between ``rollout_logp`` and ``old_logp``: truncated or masked importance weights,\n"
        "per token, per sequence or by the geometric mean (default: none).",
        optional(choice(ROLLOUT_IS_MODES)),
    ),
    option(
        "rollout_is_bounds",
        None,
        "tuple[float, float] | None",
        "``(low, high)`` for ``rollout_is``, with 0 <= low < high <= 1e6 (default: the mode's own).",
        optional(pair_in(0.0, 1e6)),
    ),
    option(
        "opsm_delta",
        None,
        "float | None",
        "Off-policy sequence masking: drop a sequence with negative advantage whose mean (behaviour - current)\n"
        "log-prob exceeds this delta, in [-1e6, 1e6] (default: off).",
        optional(number_in(-1e6, 1e6)),
    ),
    option(
        "with_metrics",
        True,
        'bool | Literal["basic"]',
        "Compute the diagnostics. False skips their passes over the data and returns an empty dict;\n"
        "``'basic'`` computes only grad_mult_mean, grad_mult_max, kl_k1 and n_valid (and the off-policy\n"
        "options' own diagnostics), a few reductions.",
        _metrics_level,
    ),
)

_COMMON = {o.name: o for o in COMMON_OPTIONS}


def _metrics_level_check(fn: str, name: str, value: Any) -> Any:
    if isinstance(value, str):
        if value != "basic":
            raise TypeError(f"`{fn}`: `{name}` must be True, False or 'basic'; got {value!r}")
        return value
    return flag(fn, name, value)


def check_common(fn: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The common options (defaults filled in), checked and normalised."""
    return {o.name: o.check(fn, values.get(o.name, o.default)) for o in COMMON_OPTIONS}


def make_spec(fn: str, objective: str, options: Mapping[str, Any], common: Mapping[str, Any]) -> LossSpec:
    """A checked :class:`LossSpec` from an objective's options and the common options (defaults filled in)."""
    return LossSpec(
        objective=objective,
        options=OBJECTIVES[objective].check_options(fn, options),
        **check_common(fn, common),
    )
