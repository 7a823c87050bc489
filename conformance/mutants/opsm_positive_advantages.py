"""Off-policy sequence masking drops sequences with *positive* advantage (the sign test inverted)."""

from gipo_core._core import engine

from . import export

_original = engine._opsm_keep


def _inverted(ell, r, adv, valid, count, spec, xp):
    return _original(ell, r, -adv, valid, count, spec, xp)


engine._opsm_keep = _inverted
export(globals())
