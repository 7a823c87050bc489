"""GIPO's gradient also differentiates the trust weight: -A u (1 - l / sigma^2) instead of -A u."""

from gipo_core._core import objectives

from . import export

_original = objectives.OBJECTIVES["gipo"]


def _terms(ell, adv, logp, opts, xp):
    t = _original.terms(ell, adv, logp, opts, xp)
    s = opts["sigma"]
    s_neg = opts["sigma_neg"] if opts["sigma_neg"] is not None else s
    inv_var = xp.where(adv > 0, xp.full_like(adv, 1.0 / (s * s)), 1.0 / (s_neg * s_neg))
    return objectives.ElementTerms(loss=t.loss, grad=t.loss * (1.0 - ell * inv_var), mult=t.mult)


objectives.OBJECTIVES["gipo"] = objectives.Objective(**{**_original.__dict__, "terms": _terms})
export(globals())
