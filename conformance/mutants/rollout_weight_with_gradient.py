"""The rollout correction weight is not a stop-gradient: it is built from the current log-probabilities
(``exp(logp - rollout_logp) / exp(logp - old_logp)``, the same value) and autodiff differentiates it, adding
``w * L`` to each element's gradient."""

import dataclasses

from gipo_core._core import objectives

from . import export, patch_forward

for key, obj in list(objectives.OBJECTIVES.items()):

    def _terms(ell, adv, logp, opts, xp, _orig=obj.terms):
        t = _orig(ell, adv, logp, opts, xp)
        grad = t.loss if t.grad is None else t.grad
        return objectives.ElementTerms(loss=t.loss, grad=grad + t.loss, mult=t.mult)

    objectives.OBJECTIVES[key + "~graded"] = objectives.Objective(**{**obj.__dict__, "terms": _terms})


def _wrap(forward):
    def graded(*arrays, spec, xp):
        if spec.rollout_is is not None:
            spec = dataclasses.replace(spec, objective=spec.objective + "~graded")
        return forward(*arrays, spec=spec, xp=xp)

    return graded


patch_forward(_wrap)
export(globals())
