"""What the fused linear losses of every framework share: the argument checks and the two calls to the core.

The fused path goes from an LLM's last hidden states and its output projection (``lm_head``) to the policy
objective one chunk of tokens at a time, without a (tokens, vocab) array. Per chunk the framework adapter
computes the logits in the input dtype, a stable log-softmax in float32 (float64 for float64 inputs), the
log-probability of the target token, and then, while the chunk's softmax is still in hand, the gradient
with respect to the hidden states, the weight and the bias:

    dL/dz = saved * (onehot(target) - softmax(z)) / temperature,   z = (hidden @ W.T + b) / temperature
    dL/dhidden = dL/dz @ W,   dL/dW = sum over chunks of dL/dz.T @ hidden,   dL/db = sum of dL/dz

``saved`` is the core's ``dloss/dlogp`` (see :mod:`gipo_core._core.engine`). For a token-level objective a
token's ``saved`` depends on its own log-probability and on an aggregation weight that depends only on the
mask, the aggregation mode and the denominator. So the weight is computed first, for the whole batch, and each
chunk then calls the core on its own tokens with that weight:

- :func:`aggregation_weight` asks the core for the weight: the ``saved`` of the no-clip objective at ratio 1
  and advantage -1 is exactly the per-element aggregation weight (``-A * rho = 1``), whatever the aggregation
  mode and the denominator rule, with the mask already applied;
- :func:`chunk_spec` is the same objective summed with unit weight (``token-mean`` over a denominator of 1):
  the chunk's call gets the aggregation weight (times any ``behavior_weights``) as its per-element weights.

The loss and the diagnostics come from one more core call on the full (tokens,) log-probabilities with the
caller's own options: they are exactly what the array-level loss returns for those log-probabilities.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, NamedTuple

from ._api import Backend, LossArrays, check_call
from ._core.engine import LossSpec, forward
from ._core.objectives import OBJECTIVES
from ._core.signature import COMMON_OPTIONS, make_spec
from ._lib import checks

__all__ = [
    "FusedArgs",
    "FusedLinearOutput",
    "check_fused_args",
    "readable_targets",
    "aggregation_weight",
    "chunk_spec",
    "fused_spec",
    "spec_keywords",
    "two_pass",
    "resolve_chunk_size",
]

#: ``chunk_size=None``: the largest power of two of tokens, at most ``DEFAULT_MAX_CHUNK`` and at least
#: ``DEFAULT_MIN_CHUNK``, whose float32 logits fit in ``DEFAULT_CHUNK_BYTES``. Small chunks cost time: every
#: chunk reads and writes the whole weight gradient once (its accumulation is a matmul with the chunk's
#: tokens as the inner dimension): 128-token chunks were 1.5x slower than 512-token ones at hidden 1,024 x
#: vocab 32,768 on a CPU, and 1,024-token ones no faster.
DEFAULT_MAX_CHUNK = 512
DEFAULT_MIN_CHUNK = 128
DEFAULT_CHUNK_BYTES = 256 * 2**20

class FusedLinearOutput(NamedTuple):
    """What :func:`fused_linear_loss` returns.

    ``loss`` (0-d) and ``metrics`` (0-d diagnostics) are those of the array-level loss on ``logp``; ``logp``
    (token shape) is the log-probability of each target token and ``entropy`` (token shape, or None unless
    asked for) the entropy of each token's distribution, both detached (no gradient flows through them),
    in float32 (float64 for float64 inputs).
    """

    loss: Any
    metrics: dict
    logp: Any
    entropy: Any


@dataclasses.dataclass(frozen=True)
class FusedArgs:
    """The checked static part of a call."""

    spec: LossSpec
    temperature: float
    chunk_size: int
    n_tokens: int


def _fmt(shape: tuple) -> str:
    return checks._fmt_shape(tuple(shape))


def resolve_chunk_size(fn: str, chunk_size: Any, n_tokens: int, vocab: int) -> int:
    """``chunk_size`` checked, or the default (see ``DEFAULT_CHUNK_BYTES``), never more than ``n_tokens``."""
    if chunk_size is None:
        chunk = DEFAULT_MAX_CHUNK
        while chunk > DEFAULT_MIN_CHUNK and chunk * vocab * 4 > DEFAULT_CHUNK_BYTES:
            chunk //= 2
        return max(1, min(chunk, n_tokens))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"`{fn}`: `chunk_size` must be None or an int >= 1; got {chunk_size!r}")
    return int(chunk_size)


#: The common options a fused call takes as keywords next to the objective's (agg and with_metrics are named).
OFF_POLICY_OPTIONS = tuple(o.name for o in COMMON_OPTIONS if o.name not in ("agg", "with_metrics"))


def fused_spec(fn: str, objective: Any, options: dict, agg: Any, with_metrics: Any) -> LossSpec:
    """The checked spec of a call: ``options`` holds the objective's options and any off-policy option
    (``ratio_level``, ``rollout_is``, ``rollout_is_bounds``, ``opsm_delta``); anything else raises."""
    if not isinstance(objective, str) or objective not in OBJECTIVES:
        valid = ", ".join(repr(k) for k in OBJECTIVES)
        raise ValueError(f"`{fn}`: `objective` must be one of {valid}; got {objective!r}")
    own = OBJECTIVES[objective].option_names
    unknown = sorted(set(options) - set(own) - set(OFF_POLICY_OPTIONS))
    if unknown:
        valid = ", ".join(own + OFF_POLICY_OPTIONS)
        raise TypeError(
            f"`{fn}`: unexpected option(s) {', '.join(unknown)} for objective={objective!r}; its options: {valid}"
        )
    common = {k: v for k, v in options.items() if k in OFF_POLICY_OPTIONS}
    common.update(agg=agg, with_metrics=with_metrics)
    return make_spec(fn, objective, {k: v for k, v in options.items() if k in own}, common)


def spec_keywords(spec: LossSpec) -> dict:
    """The objective's options and the off-policy options of ``spec``, as the keywords of a fused call."""
    return {**dict(spec.options), **{k: getattr(spec, k) for k in OFF_POLICY_OPTIONS}}


def two_pass(spec: LossSpec) -> bool:
    """Whether a token's ``dloss/dlogp`` depends on other tokens' log-probabilities (sequence ratios, a
    sequence or geometric rollout correction, off-policy sequence masking): then the log-probabilities of the
    whole batch come first (pass 1) and the logits are computed again for the gradients (pass 2)."""
    token_is = spec.rollout_is is None or spec.rollout_is.startswith("token-")
    return spec.ratio_level != "token" or not token_is or spec.opsm_delta is not None


def readable_targets(fn: str, target_ids: Any, mask: Any, vocab: int, with_entropy: Any, xp: Any) -> Any:
    """Check ``with_entropy``; return ``target_ids`` with any id out of range at a masked position (-100, as
    trainers pad, say) read as 0 there, so that the gather never leaves the vocabulary."""
    if not isinstance(with_entropy, bool):
        raise TypeError(f"`{fn}`: `with_entropy` must be True or False; got {with_entropy!r}")
    if mask is None:
        return target_ids
    in_range = (target_ids >= 0) & (target_ids < vocab)
    return xp.where((mask != 0) | in_range, target_ids, 0)


def check_fused_args(
    fn: str,
    hidden: Any,
    weight: Any,
    target_ids: Any,
    old_logp: Any,
    advantages: Any,
    mask: Any,
    bias: Any,
    behavior_weights: Any,
    denominator: Any,
    rollout_logp: Any,
    *,
    spec: LossSpec,
    temperature: Any,
    chunk_size: Any,
    backend: Backend,
    xp: Any,
) -> tuple[LossArrays, FusedArgs]:
    """Check every argument from shapes, dtypes and options; return the core's arrays and the static part.

    The token shape is ``hidden.shape[:-1]``: ``target_ids``, ``old_logp``, ``mask``, ``behavior_weights``
    and ``rollout_logp`` have it, ``advantages`` has it or size 1 on the last axis. ``spec`` comes from
    :func:`fused_spec`; the arrays the core takes are checked by the API's own :func:`check_call`.
    """
    for name, value in (("hidden", hidden), ("weight", weight), ("target_ids", target_ids), ("old_logp", old_logp)):
        if value is None:
            raise TypeError(f"`{fn}`: `{name}` is required; got None")
    h_shape, w_shape = checks.shape_of(hidden), checks.shape_of(weight)
    if len(h_shape) < 2:
        raise ValueError(
            f"`{fn}`: `hidden` must have shape (..., time, hidden_dim) with at least 2 axes; got {_fmt(h_shape)}"
        )
    if len(w_shape) != 2 or w_shape[1] != h_shape[-1]:
        raise ValueError(
            f"`{fn}`: `weight` must have shape (vocab, hidden_dim) = (vocab, {h_shape[-1]}) as in nn.Linear; "
            f"got {_fmt(w_shape)}"
        )
    for name, value in (("hidden", hidden), ("weight", weight)):
        checks.check_floating(fn, name, value, xp)
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"`{fn}`: `weight` has dtype {weight.dtype} but `hidden` has dtype {hidden.dtype}; the matmul runs in "
            "the input dtype: pass weight cast to hidden's dtype (e.g. lm_head.weight.to(hidden.dtype), "
            "differentiable) or cast hidden"
        )
    if bias is not None:
        if checks.shape_of(bias) != (w_shape[0],):
            raise ValueError(f"`{fn}`: `bias` must have shape ({w_shape[0]},); got {_fmt(checks.shape_of(bias))}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"`{fn}`: `bias` has dtype {bias.dtype} but `hidden` has dtype {hidden.dtype}")
    tokens = h_shape[:-1]
    if checks.shape_of(target_ids) != tokens:
        raise ValueError(
            f"`{fn}`: `target_ids` has shape {_fmt(checks.shape_of(target_ids))} but `hidden` has token shape "
            f"{_fmt(tokens)} (hidden.shape[:-1]); pass the ids of the tokens each hidden state predicts"
        )
    if not xp.isdtype(target_ids.dtype, "integral"):
        raise TypeError(f"`{fn}`: `target_ids` must have an integer dtype; got {target_ids.dtype}")
    token_arrays = (("old_logp", old_logp), ("mask", mask), ("behavior_weights", behavior_weights))
    for name, value in token_arrays + (("rollout_logp", rollout_logp),):
        if value is not None and checks.shape_of(value) != tokens:
            raise ValueError(
                f"`{fn}`: `{name}` has shape {_fmt(checks.shape_of(value))} but `hidden` has token shape "
                f"{_fmt(tokens)} (hidden.shape[:-1]); pass an array of shape {_fmt(tokens)}"
            )
    if advantages is not None and checks.shape_of(advantages) not in (tokens, tokens[:-1] + (1,)):
        raise ValueError(
            f"`{fn}`: `advantages` has shape {_fmt(checks.shape_of(advantages))}; pass {_fmt(tokens)} (one per "
            f"token) or {_fmt(tokens[:-1] + (1,))} (one per sequence)"
        )
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not 0.0 < float(temperature) < float("inf")
    ):
        raise ValueError(f"`{fn}`: `temperature` must be a finite number > 0; got {temperature!r}")
    for name, value in (("weight", weight), ("target_ids", target_ids), ("bias", bias)):
        if value is not None:
            checks.check_same_device(fn, name, value, hidden)
    # The API's own checks (types, dtypes, devices, denominator), old_logp standing in for logp.
    arrays, spec, _ = check_call(
        fn, backend, spec, old_logp, old_logp, advantages, mask, denominator, behavior_weights, rollout_logp
    )
    n_tokens = 1
    for d in tokens:
        n_tokens *= d
    chunk = resolve_chunk_size(fn, chunk_size, n_tokens, w_shape[0])
    return arrays, FusedArgs(spec=spec, temperature=float(temperature), chunk_size=chunk, n_tokens=n_tokens)


def aggregation_weight(mask: Any, like: Any, spec: LossSpec, denominator: Any, xp: Any) -> Any:
    """The core's per-element aggregation weight ``c`` (``loss = sum(c * L)``), 0 at masked elements.

    It is the core's own ``saved`` for the no-clip objective at ratio 1 and advantage -1, where the per-element
    loss and its gradient are exactly 1: the aggregation mode, the ``denominator`` rule and a float mask's
    weights come from the core, not from a second copy here. ``like`` is a zero array of the token shape in
    the work dtype.
    """
    probe = LossSpec(objective="no_clip", options=(), agg=spec.agg, denominator=spec.denominator, with_metrics=False)
    _, saved, _ = forward(like, like, like - 1.0, mask, None, denominator, spec=probe, xp=xp)
    return saved


def chunk_spec(spec: LossSpec) -> LossSpec:
    """``spec`` with a plain weighted sum as its aggregation and no diagnostics: the chunk's calls pass the
    aggregation weight as ``behavior_weights``."""
    return dataclasses.replace(spec, agg="token-mean", denominator=1.0, with_metrics=False)
