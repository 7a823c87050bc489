"""``sigma_neg`` is accepted but ignored: sigma is used for every sign of the advantage."""

from . import export, patch_forward, with_options


def _wrap(forward):
    def symmetric(*arrays, spec, xp):
        if spec.objective == "gipo":
            spec = with_options(spec, sigma_neg=None)
        return forward(*arrays, spec=spec, xp=xp)

    return symmetric


patch_forward(_wrap)
export(globals())
