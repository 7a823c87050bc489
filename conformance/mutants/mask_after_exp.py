"""The mask is applied after the exp (m * L of the raw inputs): 0 * NaN leaks NaN from masked positions."""

from gipo_core._core.objectives import OBJECTIVES

from . import export, patch_forward


def _wrap(forward):
    def leaky(logp, old_logp, advantages, mask=None, behavior_weights=None, denominator=None, /, *, spec, xp):
        loss, saved, metrics = forward(logp, old_logp, advantages, mask, behavior_weights, denominator,
                                       spec=spec, xp=xp)
        if mask is None:
            return loss, saved, metrics
        valid = mask if mask.dtype == xp.bool else mask != 0
        raw = OBJECTIVES[spec.objective].terms(logp - old_logp, advantages + 0.0 * logp, logp, spec.opts, xp)
        leak = 0.0 * xp.where(valid, 0.0, raw.loss)
        return loss + xp.sum(leak), saved + leak, metrics

    return leaky


patch_forward(_wrap)
export(globals())
