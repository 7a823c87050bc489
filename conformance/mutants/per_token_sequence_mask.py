"""A per-sequence rollout mask decided per token: each token's own weight is tested against the bounds, while
the weight applied is the sequence's (the bug of shipped sequence-level masks)."""

import math

from gipo_core._core import engine

from . import export

_original = engine._rollout_correction


def _per_token(r, valid, count, spec, xp):
    factor, keep = _original(r, valid, count, spec, xp)
    if not spec.rollout_is.endswith("mask") or spec.rollout_is.startswith("token"):
        return factor, keep
    low, high = engine.rollout_bounds(spec)
    log_low = -math.inf if low == 0 else math.log(low)
    token_keep = (r >= log_low) & (r <= math.log(high))
    weight = xp.exp(xp.minimum(engine.seq_sum(r, valid, xp), math.log(high)))
    return xp.where(token_keep, weight, 0.0), token_keep


engine._rollout_correction = _per_token
export(globals())
