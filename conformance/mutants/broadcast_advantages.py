"""(B,) advantages against (B, T) log-probabilities are silently taken as one advantage per sequence."""

import functools

import gipo_core.numpy as np_backend
from gipo_core._lib import checks

from . import export

_check = checks.check_advantages_shape


def _lenient(fn, adv, ref_shape):
    if len(ref_shape) >= 2 and tuple(adv.shape) == tuple(ref_shape[:-1]):
        return None
    return _check(fn, adv, ref_shape)


def _broadcasting(loss_fn):
    @functools.wraps(loss_fn)
    def wrapped(logp, old_logp, advantages, mask=None, **kwargs):
        if advantages.ndim == logp.ndim - 1:
            advantages = advantages[..., None]
        return loss_fn(logp, old_logp, advantages, mask, **kwargs)

    return wrapped


checks.check_advantages_shape = _lenient
export(globals())
for _name in ("gipo_loss", "ppo_clip_loss", "no_clip_loss", "sapo_loss", "cispo_loss"):
    globals()[_name] = _broadcasting(getattr(np_backend, _name))
_vg = np_backend.value_and_grad


def value_and_grad(fn):
    inner = _vg(getattr(np_backend, fn.__name__))

    def run(logp, old_logp, advantages, mask=None, **kwargs):
        if advantages.ndim == logp.ndim - 1:
            advantages = advantages[..., None]
        return inner(logp, old_logp, advantages, mask, **kwargs)

    return run
