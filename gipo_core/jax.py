"""JAX backend: the core's closed-form gradient wired in with ``jax.custom_vjp``.

Every loss is a pure function that works eagerly and under ``jax.jit``, ``jax.grad``,
``jax.value_and_grad``, ``jax.vmap`` and with arrays sharded over several devices. Only the static options
(a hashable :class:`~gipo_core._core.engine.LossSpec`) are non-differentiable arguments of the
``custom_vjp``; ``mask``, ``behavior_weights`` and an array ``denominator`` are ordinary arguments whose
cotangents are zero. ``logp`` is the only input that receives a gradient (``old_logp`` and ``advantages``
get zeros); the diagnostics carry no gradient. Forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``)
is not defined for a ``custom_vjp``.

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
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ._api import (
    _OPTION_DOCS,
    AGG_MODES,
    OFF_POLICY_DEFAULTS,
    LossArrays,
    LossOutput,
    _check_options,
    check_off_policy,
    make_api,
)
from ._core.engine import LossSpec, backward, forward, metric_names
from ._core.objectives import OBJECTIVES
from ._lib import checks

__all__ = [
    "LossOutput",
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
    return (loss, metrics), saved


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


def _accept_numpy(fn: Callable) -> Callable:
    """``fn`` with NumPy arrays among its array arguments moved to JAX first, as ``jax.numpy`` functions do.

    Without this, an all-NumPy call would run in NumPy (no ``custom_vjp``) and a mixed call would be
    rejected as two array libraries. Other array types are left for the checks to reject by name.
    """

    def to_jax(x: Any) -> Any:
        return jnp.asarray(x) if isinstance(x, (np.ndarray, np.generic)) else x

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args = tuple(to_jax(a) for a in args)
        kwargs = {k: to_jax(v) if k in _ARRAY_KEYWORDS else v for k, v in kwargs.items()}
        return fn(*args, **kwargs)

    return wrapper


_ARRAY_KEYWORDS = frozenset(
    {"logp", "old_logp", "advantages", "mask", "behavior_weights", "denominator", "rollout_logp", "log_ratio"}
)

_api = {name: _accept_numpy(fn) for name, fn in make_api(_run, __name__, _EXAMPLE).items()}

gipo_loss = _api["gipo_loss"]
ppo_clip_loss = _api["ppo_clip_loss"]
no_clip_loss = _api["no_clip_loss"]
sapo_loss = _api["sapo_loss"]
cispo_loss = _api["cispo_loss"]
gaussian_trust_weight = _api["gaussian_trust_weight"]


# ------------------------------------------------------------------------------------------------ classes


@dataclasses.dataclass(frozen=True)
class _LossFn:
    """Options of one objective in a frozen, hashable dataclass, callable on arrays.

    Subclasses declare the objective's options as fields (positional, in the order of the function's
    keywords); ``agg`` and ``with_metrics`` are keyword-only.
    """

    _objective: ClassVar[str]
    agg: str = dataclasses.field(default="token-mean", kw_only=True)
    ratio_level: str = dataclasses.field(default="token", kw_only=True)
    rollout_is: str | None = dataclasses.field(default=None, kw_only=True)
    rollout_is_bounds: tuple[float, float] | None = dataclasses.field(default=None, kw_only=True)
    opsm_delta: float | None = dataclasses.field(default=None, kw_only=True)
    with_metrics: bool = dataclasses.field(default=True, kw_only=True)

    def __post_init__(self) -> None:
        name = type(self).__name__
        checks.check_choice(name, "agg", self.agg, AGG_MODES)
        if not isinstance(self.with_metrics, bool) and self.with_metrics != "basic":
            raise TypeError(f"`{name}`: `with_metrics` must be True, False or 'basic'; got {self.with_metrics!r}")
        # Validate the options once, at construction, and store them as the functions see them (floats).
        for key, value in _check_options(name, self._objective, self.options):
            object.__setattr__(self, key, value)
        for key, value in check_off_policy(name, {k: getattr(self, k) for k in OFF_POLICY_DEFAULTS}).items():
            object.__setattr__(self, key, value)

    @property
    def options(self) -> dict[str, Any]:
        """The objective's options (no ``agg``, no ``with_metrics``), by name."""
        return {key: getattr(self, key) for key in OBJECTIVES[self._objective].option_names}

    def __call__(
        self,
        logp: Any,
        old_logp: Any,
        advantages: Any,
        mask: Any = None,
        *,
        denominator: Any = None,
        behavior_weights: Any = None,
        rollout_logp: Any = None,
    ) -> LossOutput:
        """``LossOutput(loss, metrics)`` for these arrays; see the matching function for shapes and math."""
        fn = _api[OBJECTIVES[self._objective].public_name]
        return fn(
            logp,
            old_logp,
            advantages,
            mask,
            **self.options,
            agg=self.agg,
            denominator=denominator,
            behavior_weights=behavior_weights,
            rollout_logp=rollout_logp,
            **{k: getattr(self, k) for k in OFF_POLICY_DEFAULTS},
            with_metrics=self.with_metrics,
        )


_CLASS_DOC = """{summary}

A frozen, hashable dataclass and a static pytree node (it has no leaves): safe to close over inside
``jax.jit``, to pass to a jitted function as an ordinary or a static argument, and to use as a key. Calling it is ``{fn}(logp, old_logp, advantages, mask, **options, agg=..., with_metrics=...,
denominator=denominator, behavior_weights=behavior_weights)``; the options are checked once, here.

Parameters
----------
{options}agg : str, default 'token-mean'
    Keyword-only; one of {agg}.
with_metrics : bool, default True
    Keyword-only; False returns an empty metrics dict and skips their computation.

Raises
------
ValueError
    An option that is not finite and positive, an unknown kernel or ``agg``.

See Also
--------
{fn} : the function, with the shapes, the math and the diagnostics.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> from gipo_core.jax import {cls}
>>> loss_fn = {cls}()
>>> logp = jnp.zeros((2, 3)); adv = jnp.array([[1.0], [-1.0]])
>>> out = jax.jit(lambda lp: loss_fn(lp, lp, adv))(logp)
>>> out.loss.shape, out.loss.dtype, int(out.metrics["n_valid"])
((), dtype('float32'), 6)
>>> hash(loss_fn) == hash({cls}())
True
"""


def _document(cls: type) -> type:
    """Fill in the docstring and register the class as a static pytree node (no leaves: it can be an
    ordinary argument of a jitted function and is part of the cache key, like a static argument)."""
    jax.tree_util.register_static(cls)
    objective = OBJECTIVES[cls._objective]
    cls.__doc__ = _CLASS_DOC.format(
        summary=objective.summary,
        fn=objective.public_name,
        cls=cls.__name__,
        options="".join(_OPTION_DOCS[k] for k in objective.option_names),
        agg=", ".join(repr(a) for a in AGG_MODES),
    )
    return cls


@_document
@dataclasses.dataclass(frozen=True)
class GIPOLoss(_LossFn):
    _objective: ClassVar[str] = "gipo"
    sigma: float = 1.0
    sigma_neg: float | None = None
    kernel: str = "gaussian"


@_document
@dataclasses.dataclass(frozen=True)
class PPOClipLoss(_LossFn):
    _objective: ClassVar[str] = "ppo_clip"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None


@_document
@dataclasses.dataclass(frozen=True)
class NoClipLoss(_LossFn):
    _objective: ClassVar[str] = "no_clip"


@_document
@dataclasses.dataclass(frozen=True)
class SAPOLoss(_LossFn):
    _objective: ClassVar[str] = "sapo"
    tau_pos: float = 1.0
    tau_neg: float = 1.05


@_document
@dataclasses.dataclass(frozen=True)
class CISPOLoss(_LossFn):
    _objective: ClassVar[str] = "cispo"
    clip_max: float = 5.0
    clip_min: float | None = None
