"""The geometric rollout weight from the masked *sum* of the token log-weights, where the mean was asked."""

import dataclasses

from gipo_core._core import engine

from . import export

_original = engine._rollout_correction


def _sum(r, valid, count, spec, xp):
    if spec.rollout_is == "geometric-mask":
        spec = dataclasses.replace(spec, rollout_is="sequence-mask", rollout_is_bounds=engine.rollout_bounds(spec))
    return _original(r, valid, count, spec, xp)


engine._rollout_correction = _sum
export(globals())
