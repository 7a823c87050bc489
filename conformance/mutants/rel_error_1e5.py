"""A relative error of 1e-5 in float64 results (a float32 constant or accumulation somewhere)."""

from . import export, patch_forward


def _wrap(forward):
    def off(*arrays, spec, xp):
        loss, saved, metrics = forward(*arrays, spec=spec, xp=xp)
        if loss.dtype == xp.float64:
            return loss * (1 + 1e-5), saved * (1 + 1e-5), metrics
        return loss, saved, metrics

    return off


patch_forward(_wrap)
export(globals())
