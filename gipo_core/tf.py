"""TensorFlow backend: the core's closed-form gradient wired in with ``tf.custom_gradient``.

Every loss works eagerly, inside ``tf.function`` and under ``tf.function(jit_compile=True)`` (XLA), with
``tf.GradientTape``, ``tf.Variable`` inputs, Keras 3 models (TensorFlow backend) and the ``mixed_float16``
policy: float16 and bfloat16 inputs are computed in float32 inside and their gradient comes back in their own
dtype. ``logp`` is the only input that receives a gradient; ``old_logp``, ``advantages``, ``mask``,
``behavior_weights`` and ``denominator`` are data (their gradient is ``None``) and the diagnostics carry no
gradient. The backward pass is one multiply of the upstream gradient with the single array the forward
pass saved.

The classes :class:`GIPOLoss`, :class:`PPOClipLoss`, :class:`NoClipLoss`, :class:`SAPOLoss` and
:class:`CISPOLoss` are ``tf.Module`` objects holding the options, called as
``loss_fn(logp, old_logp, advantages, mask=None)``.

Examples
--------
>>> import tensorflow as tf
>>> from gipo_core.tf import GIPOLoss
>>> loss_fn = GIPOLoss(sigma=1.0)
>>> logp = tf.Variable(tf.math.log([[0.5, 0.25], [0.5, 0.5]]))
>>> old_logp = tf.math.log([[0.5, 0.5], [0.25, 0.5]])
>>> adv = tf.constant([[1.0], [-1.0]])                      # one advantage per sequence
>>> with tf.GradientTape() as tape:
...     out = loss_fn(logp, old_logp, adv)
>>> grad = tape.gradient(out.loss, logp)
>>> round(float(out.loss), 6), tuple(grad.shape)
(0.294919, (2, 2))
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, ClassVar

import tensorflow as tf

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

_EXAMPLE = """>>> import tensorflow as tf
>>> from gipo_core.tf import {fn}
>>> logp = tf.Variable([[-0.7, -1.2, -0.1]])
>>> with tf.GradientTape() as tape:
...     out = {fn}(logp, logp - 0.1, tf.constant([[1.0]]))
>>> out.loss.shape, out.loss.dtype, sorted(out.metrics)[:2]
(TensorShape([]), tf.float32, ['ess', 'grad_mult_max'])
>>> tape.gradient(out.loss, logp).shape
TensorShape([1, 3])
"""


def _run(arrays: LossArrays, spec: LossSpec, xp: Any) -> LossOutput:
    # Reading a tf.Variable here is recorded by the caller's tape, so the gradient reaches the variable.
    logp = tf.convert_to_tensor(arrays.logp)
    data = [None if a is None else tf.stop_gradient(a) for a in arrays[1:]]
    # Eagerly, compute where logp lives (TensorFlow would otherwise place the ops on a GPU if there is one);
    # in a graph, placement is the graph's.
    device = logp.device if tf.executing_eagerly() else None

    def placed() -> Any:
        return tf.device(device) if device else contextlib.nullcontext()

    @tf.custom_gradient
    def loss_and_metrics(lp: tf.Tensor) -> tuple:
        loss, saved, metrics = forward(lp, *data, spec=spec, xp=xp)

        def grad(grad_loss: Any, *_: Any) -> tf.Tensor:  # the diagnostics' upstream gradients are ignored
            with placed():
                if grad_loss is None:
                    return tf.zeros_like(lp)
                return backward(grad_loss, saved, dtype=lp.dtype, xp=xp)

        return (loss, *metrics.values()), grad

    with placed():
        loss, *values = loss_and_metrics(logp)
    metrics = dict(zip(metric_names(spec, arrays.rollout_logp is not None), values))
    return LossOutput(loss, metrics)


_api = make_api(_run, __name__, _EXAMPLE)

gipo_loss = _api["gipo_loss"]
ppo_clip_loss = _api["ppo_clip_loss"]
no_clip_loss = _api["no_clip_loss"]
sapo_loss = _api["sapo_loss"]
cispo_loss = _api["cispo_loss"]
gaussian_trust_weight = _api["gaussian_trust_weight"]


# ------------------------------------------------------------------------------------------------ classes


class _LossModule(tf.Module):
    """One objective's options in a ``tf.Module``, callable on tensors (subclasses set ``_objective``)."""

    _objective: ClassVar[str]

    def __init__(
        self,
        *args: Any,
        agg: str = "token-mean",
        with_metrics: bool = True,
        name: str | None = None,
        ratio_level: str = "token",
        rollout_is: str | None = None,
        rollout_is_bounds: tuple[float, float] | None = None,
        opsm_delta: float | None = None,
        **kwargs: Any,
    ) -> None:
        cls = type(self).__name__
        objective = OBJECTIVES[self._objective]
        signature = inspect.signature(type(self))
        try:
            bound = signature.bind(
                *args,
                agg=agg,
                with_metrics=with_metrics,
                name=name,
                ratio_level=ratio_level,
                rollout_is=rollout_is,
                rollout_is_bounds=rollout_is_bounds,
                opsm_delta=opsm_delta,
                **kwargs,
            )
        except TypeError as exc:
            raise TypeError(f"`{cls}`: {exc}; the signature is {cls}{signature}") from None
        bound.apply_defaults()
        super().__init__(name=name)
        checks.check_choice(cls, "agg", agg, AGG_MODES)
        if not isinstance(with_metrics, bool) and with_metrics != "basic":
            raise TypeError(f"`{cls}`: `with_metrics` must be True, False or 'basic'; got {with_metrics!r}")
        # Checked once, here, and kept as the functions see them (floats).
        options = {k: bound.arguments[k] for k in objective.option_names}
        self._options = dict(_check_options(cls, self._objective, options))
        self._off_policy = check_off_policy(
            cls,
            dict(ratio_level=ratio_level, rollout_is=rollout_is, rollout_is_bounds=rollout_is_bounds, opsm_delta=opsm_delta),
        )
        self._agg = agg
        self._with_metrics = with_metrics
        self._fn = _api[objective.public_name]

    @property
    def options(self) -> dict[str, Any]:
        """The objective's options (no ``agg``, no ``with_metrics``), by name."""
        return dict(self._options)

    @property
    def agg(self) -> str:
        return self._agg

    @property
    def with_metrics(self) -> bool:
        return self._with_metrics

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options.items())
        sep = ", " if opts else ""
        return f"{type(self).__name__}({opts}{sep}agg={self._agg!r}, with_metrics={self._with_metrics!r})"

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
        """``LossOutput(loss, metrics)`` for these tensors; see the matching function for shapes and math."""
        with self.name_scope:
            return self._fn(
                logp,
                old_logp,
                advantages,
                mask,
                **self._options,
                agg=self._agg,
                denominator=denominator,
                behavior_weights=behavior_weights,
                rollout_logp=rollout_logp,
                with_metrics=self._with_metrics,
                **self._off_policy,
            )


_CLASS_DOC = """{summary}

A ``tf.Module`` holding the options; calling it is ``{fn}(logp, old_logp, advantages, mask, **options,
agg=..., with_metrics=..., denominator=denominator, behavior_weights=behavior_weights)``. It works eagerly,
in ``tf.function`` (with or without ``jit_compile=True``) and in a Keras ``train_step``. The options are
checked once, here.

Parameters
----------
{options}agg : str, default 'token-mean'
    Keyword-only; one of {agg}.
with_metrics : bool, default True
    Keyword-only; False returns an empty metrics dict and skips their computation.
name : str, optional
    Keyword-only; the module's name (its name scope in graphs).

Raises
------
ValueError
    An option that is not finite and positive, an unknown kernel or ``agg``.
TypeError
    An unknown keyword argument.

See Also
--------
{fn} : the function, with the shapes, the math and the diagnostics.

Examples
--------
>>> import tensorflow as tf
>>> from gipo_core.tf import {cls}
>>> loss_fn = {cls}()
>>> logp = tf.zeros((2, 3)); adv = tf.ones((2, 1))
>>> @tf.function(jit_compile=True)
... def step(lp):
...     with tf.GradientTape() as tape:
...         tape.watch(lp)
...         out = loss_fn(lp, lp, adv)
...     return tape.gradient(out.loss, lp), out.metrics
>>> grad, metrics = step(logp)
>>> round(float(grad[0, 0]), 6), int(metrics["n_valid"])      # -A / N at log-ratio 0
(-0.166667, 6)
"""


def _loss_class(name: str, objective_key: str) -> type:
    """The ``tf.Module`` class of one objective, with its options in the constructor's signature."""
    objective = OBJECTIVES[objective_key]
    cls = type(name, (_LossModule,), {"_objective": objective_key, "__module__": __name__})
    kind = inspect.Parameter
    params = [kind("self", kind.POSITIONAL_OR_KEYWORD)]
    params += [kind(k, kind.POSITIONAL_OR_KEYWORD, default=v) for k, v in objective.defaults]
    params += [
        kind("agg", kind.KEYWORD_ONLY, default="token-mean"),
        *[kind(k, kind.KEYWORD_ONLY, default=v) for k, v in OFF_POLICY_DEFAULTS.items()],
        kind("with_metrics", kind.KEYWORD_ONLY, default=True),
        kind("name", kind.KEYWORD_ONLY, default=None),
    ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: N807 - the signature is set below
        _LossModule.__init__(self, *args, **kwargs)

    __init__.__signature__ = inspect.Signature(params)
    __init__.__qualname__ = f"{name}.__init__"
    cls.__init__ = __init__
    cls.__doc__ = _CLASS_DOC.format(
        summary=objective.summary,
        fn=objective.public_name,
        cls=name,
        options="".join(_OPTION_DOCS[k] for k in objective.option_names),
        agg=", ".join(repr(a) for a in AGG_MODES),
    )
    return cls


GIPOLoss = _loss_class("GIPOLoss", "gipo")
PPOClipLoss = _loss_class("PPOClipLoss", "ppo_clip")
NoClipLoss = _loss_class("NoClipLoss", "no_clip")
SAPOLoss = _loss_class("SAPOLoss", "sapo")
CISPOLoss = _loss_class("CISPOLoss", "cispo")
