"""GIPO's multiplier in the literal form exp(l) * exp(-l^2 / (2 sigma^2)): inf * 0 = NaN from l ~ 89 in float32."""

from gipo_core._core import objectives

from . import export

_original = objectives.OBJECTIVES["gipo"]


def _literal_terms(ell, adv, logp, opts, xp):
    if opts["kernel"] != "gaussian":
        return _original.terms(ell, adv, logp, opts, xp)
    s = opts["sigma"]
    s_neg = opts["sigma_neg"] if opts["sigma_neg"] is not None else s
    half_inv_var = xp.where(adv > 0, xp.full_like(adv, 0.5 / (s * s)), 0.5 / (s_neg * s_neg))
    u = xp.exp(ell) * xp.exp(-(ell * ell) * half_inv_var)
    return objectives.ElementTerms(loss=-adv * u, grad=None, mult=u)


objectives.OBJECTIVES["gipo"] = objectives.Objective(
    **{**_original.__dict__, "terms": _literal_terms}
)
export(globals())
