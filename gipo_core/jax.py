"""JAX backend: the core's closed-form gradient wired in with ``jax.custom_vjp``.

Every loss is a pure function that works eagerly and under ``jax.jit``, ``jax.grad``,
``jax.value_and_grad``, ``jax.vmap`` and with arrays sharded over several devices. Only the static options
(a hashable :class:`~gipo_core._core.engine.LossSpec`) are non-differentiable arguments of the
``custom_vjp``; ``mask``, ``behavior_weights`` and an array ``denominator`` are ordinary arguments whose
cotangents are zero. ``logp`` is the only input that receives a gradient (``old_logp`` and ``advantages``
get zeros); the diagnostics carry no gradient. Forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``)
is not defined for a ``custom_vjp``, and second derivatives (``jax.hessian``, ``jax.jacrev`` of ``jax.grad``)
raise ``NotImplementedError``: the gradient is the closed form, first order. Arrays must be JAX arrays;
NumPy arrays are moved to JAX first, anything else is a ``TypeError`` naming the module to use.

The classes :class:`GIPOLoss`, :class:`PPOClipLoss`, :class:`NoClipLoss`, :class:`SAPOLoss` and
:class:`CISPOLoss` hold the options in a frozen, hashable dataclass registered as a static pytree node:
close over one inside ``jax.jit`` or pass it to a jitted function as an argument.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> from gipo_core.jax import GIPOLoss
>>> loss_fn = GIPOLoss(sigma=1.0)
>>> logp = jnp.log(jnp.array([[0.5, 0.25], [0.5, 0.5]]))
>>> old_logp = jnp.log(jnp.array([[0.5, 0.5], [0.25, 0.5]]))
>>> adv = jnp.array([[1.0], [-1.0]])                        # one advantage per sequence
>>> step = jax.jit(jax.value_and_grad(lambda lp: loss_fn(lp, old_logp, adv).loss))
>>> loss, grad = step(logp)
>>> round(float(loss), 6), grad.shape
(0.294919, (2, 2))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _typing
from ._api import Backend, LossArrays, LossClass, LossOutput, first_order_only, make_api
from ._core.engine import LossSpec, backward, forward, metric_names
from ._core.objectives import OBJECTIVES

__all__ = ["LossOutput"]

_Array = jax.Array

_EXAMPLE = """>>> import jax, jax.numpy as jnp
>>> from gipo_core.jax import {fn}
>>> logp = jnp.array([[-0.7, -1.2, -0.1]])
>>> f = jax.jit(lambda lp: {fn}(lp, lp - 0.1, jnp.array([[1.0]])))
>>> out = f(logp)
>>> out.loss.shape, out.loss.dtype, sorted(out.metrics)[:2]
((), dtype('float32'), ['ess', 'grad_mult_max'])
>>> jax.grad(lambda lp: {fn}(lp, lp - 0.1, jnp.array([[1.0]])).loss)(logp).shape
(1, 3)
"""


# The static argument: the loss spec, logp's dtype (the gradient comes back in it) and the namespace.
# All three are hashable, so jit caches one trace per combination.
_Static = tuple  # (LossSpec, dtype, xp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _loss(static: _Static, logp, old_logp, advantages, mask, behavior_weights, denominator, rollout_logp):
    spec, _, xp = static
    loss, _, metrics = forward(
        logp, old_logp, advantages, mask, behavior_weights, denominator, rollout_logp, spec=spec, xp=xp
    )
    return loss, metrics


def _loss_fwd(static: _Static, logp, old_logp, advantages, mask, behavior_weights, denominator, rollout_logp):
    spec, _, xp = static
    loss, saved, metrics = forward(
        logp, old_logp, advantages, mask, behavior_weights, denominator, rollout_logp, spec=spec, xp=xp
    )
    return (loss, metrics), _no_second_order(OBJECTIVES[spec.objective].public_name, saved)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _no_second_order(fn: str, saved):
    """``saved`` itself. A first-order ``grad`` runs ``_loss_fwd`` on plain values; only a second
    differentiation (``jax.hessian``, ``jax.jacrev``/``jacfwd`` of ``jax.grad``) traces it with tangents,
    and then this rule raises instead of differentiating through the trust weight."""
    return saved


@_no_second_order.defjvp
def _no_second_order_jvp(fn: str, primals, tangents):
    what = "a second derivative (jax.hessian, jax.jacrev or jax.jacfwd of jax.grad)"
    raise NotImplementedError(first_order_only(fn, what))


def _loss_bwd(static: _Static, saved, cotangents):
    _, dtype, xp = static
    grad_loss, _ = cotangents  # the diagnostics carry no gradient
    # Zero cotangents (None) for old_logp, advantages, mask, behavior_weights, denominator and rollout_logp.
    return backward(grad_loss, saved, dtype=dtype, xp=xp), None, None, None, None, None, None


_loss.defvjp(_loss_fwd, _loss_bwd)


def _run(arrays: LossArrays, spec: LossSpec, xp: Any) -> LossOutput:
    loss, metrics = _loss((spec, arrays.logp.dtype, xp), *arrays)
    # A dict that went through a JAX transformation comes back with its keys sorted: restore the
    # documented order (what leaves a user's own jax.jit is sorted again; JAX does that to every dict).
    names = metric_names(spec, arrays.rollout_logp is not None)
    return LossOutput(loss, {name: metrics[name] for name in names})


def _to_jax(x: Any) -> Any:
    """NumPy arrays move to JAX, as ``jax.numpy`` functions do; anything else is left for the checks."""
    return jnp.asarray(x) if isinstance(x, np.ndarray) else x


_BACKEND = Backend(
    __name__, _run, "jax.Array (or NumPy array)", lambda x: isinstance(x, jax.Array), convert=_to_jax, example=_EXAMPLE
)
_api = make_api(_BACKEND)


class _Base:
    """The JAX side of the loss classes: frozen, hashable, equal when their options are, and a static pytree
    node with no leaves, so an instance can be closed over in ``jax.jit``, passed to a jitted function as an
    ordinary or a static argument, and used as a key."""

    _backend = _BACKEND
    _spec: LossSpec
    _example = """>>> import jax, jax.numpy as jnp
>>> from gipo_core.jax import {cls}
>>> loss_fn = {cls}()
>>> logp = jnp.zeros((2, 3)); adv = jnp.array([[1.0], [-1.0]])
>>> out = jax.jit(lambda lp: loss_fn(lp, lp, adv))(logp)
>>> out.loss.shape, out.loss.dtype, int(out.metrics["n_valid"])
((), dtype('float32'), 6)
>>> hash(loss_fn) == hash({cls}())
True
"""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_static(cls)

    def _init_framework(self) -> None:
        pass

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}: {type(self).__name__} is frozen")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}: {type(self).__name__} is frozen")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._spec == self._spec  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self._spec))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._repr_args()})"  # type: ignore[attr-defined]

    __call__ = LossClass.forward


# --- generated by `python -m gipo_core._codegen` from the registry: do not edit ---
__all__ += [
    "gipo_loss",
    "ppo_clip_loss",
    "no_clip_loss",
    "sapo_loss",
    "cispo_loss",
    "gaussian_trust_weight",
    "GIPOLoss",
    "PPOClipLoss",
    "NoClipLoss",
    "SAPOLoss",
    "CISPOLoss",
]

gipo_loss: _typing.GipoLossFunction[_Array] = _api["gipo_loss"]
ppo_clip_loss: _typing.PpoClipLossFunction[_Array] = _api["ppo_clip_loss"]
no_clip_loss: _typing.NoClipLossFunction[_Array] = _api["no_clip_loss"]
sapo_loss: _typing.SapoLossFunction[_Array] = _api["sapo_loss"]
cispo_loss: _typing.CispoLossFunction[_Array] = _api["cispo_loss"]
gaussian_trust_weight: _typing.GaussianTrustWeightFunction[_Array] = _api["gaussian_trust_weight"]


class GIPOLoss(_typing.GIPOLossInit[_Array], _Base):
    pass


class PPOClipLoss(_typing.PPOClipLossInit[_Array], _Base):
    pass


class NoClipLoss(_typing.NoClipLossInit[_Array], _Base):
    pass


class SAPOLoss(_typing.SAPOLossInit[_Array], _Base):
    pass


class CISPOLoss(_typing.CISPOLossInit[_Array], _Base):
    pass
# --- end of generated code ---


from ._fused_linear_jax import FusedLinearOutput, fused_linear_loss  # noqa: E402

__all__ += ["fused_linear_loss", "FusedLinearOutput"]
