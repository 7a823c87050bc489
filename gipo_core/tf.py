"""TensorFlow backend: the core's closed-form gradient wired in with ``tf.custom_gradient``.

Every loss works eagerly, inside ``tf.function`` and under ``tf.function(jit_compile=True)`` (XLA), with
``tf.GradientTape``, ``tf.Variable`` inputs, Keras 3 models (TensorFlow backend) and the ``mixed_float16``
policy: float16 and bfloat16 inputs are computed in float32 inside and their gradient comes back in their own
dtype. ``logp`` is the only input that receives a gradient; ``old_logp``, ``advantages``, ``mask``,
``behavior_weights`` and ``denominator`` are data (their gradient is ``None``) and the diagnostics carry no
gradient. The backward pass is one multiply of the upstream gradient with the single array the forward
pass saved. A second derivative (nested ``GradientTape``s) and forward mode (``tf.autodiff.ForwardAccumulator``)
raise ``NotImplementedError``. Arrays must be dense tensors or variables; ragged and sparse tensors and
other libraries' arrays (NumPy included: pass ``tf.constant(x)``) are a ``TypeError``.

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
from typing import Any

import tensorflow as tf
from tensorflow.python.eager import forwardprop_util  # no public way to see an active ForwardAccumulator

from . import _typing
from ._api import Backend, LossArrays, LossClass, LossOutput, first_order_only, make_api
from ._core.engine import LossSpec, backward, forward, metric_names
from ._core.objectives import OBJECTIVES

__all__ = ["LossOutput"]

_Array = Any  # tf.Tensor, tf.Variable

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
    fn = OBJECTIVES[spec.objective].public_name
    if tf.executing_eagerly() and forwardprop_util.pack_tangents([logp]).tangents:
        # A ForwardAccumulator watches logp: it would push tangents through the forward ops (through the
        # trust weight) or through a transposed backward, neither the closed form.
        what = "forward-mode differentiation (tf.autodiff.ForwardAccumulator)"
        raise NotImplementedError(first_order_only(fn, what))
    data = [None if a is None else tf.stop_gradient(a) for a in arrays[1:]]
    # Eagerly, compute where logp lives (TensorFlow would otherwise place the ops on a GPU if there is one);
    # in a graph, placement is the graph's.
    device = logp.device if tf.executing_eagerly() else None

    def placed() -> Any:
        return tf.device(device) if device else contextlib.nullcontext()

    @tf.custom_gradient
    def loss_and_metrics(lp: tf.Tensor) -> tuple:
        loss, saved, metrics = forward(lp, *data, spec=spec, xp=xp)
        saved = _no_second_order(saved, fn)

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


def _no_second_order(saved: tf.Tensor, fn: str) -> tf.Tensor:
    """``saved`` itself, with a gradient that raises: only a second differentiation (nested
    ``GradientTape``s, a persistent tape's gradient of a gradient) ever asks for it."""

    @tf.custom_gradient
    def identity(x: tf.Tensor) -> tuple:
        def grad(_: Any) -> tf.Tensor:
            raise NotImplementedError(first_order_only(fn, "a second derivative (a gradient of the gradient)"))

        return tf.identity(x), grad

    return identity(saved)


def _accepts(x: Any) -> bool:
    # Dense tensors and variables; tf.RaggedTensor and tf.SparseTensor are refused (pad and pass a mask).
    return isinstance(x, (tf.Tensor, tf.Variable))


_BACKEND = Backend(__name__, _run, "dense tf.Tensor or tf.Variable", _accepts, example=_EXAMPLE)
_api = make_api(_BACKEND)


class _Base(tf.Module):
    """The ``tf.Module`` side of the loss classes (no variables; options fixed at construction)."""

    _backend = _BACKEND
    _example = """>>> import tensorflow as tf
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

    # Plain Python: autograph has nothing to convert here (and converted copies of these small methods were
    # seen to mix up their arguments inside tf.function).
    @tf.autograph.experimental.do_not_convert
    def _init_framework(self) -> None:
        tf.Module.__init__(self)

    @tf.autograph.experimental.do_not_convert
    def _set(self, name: str, value: Any) -> None:
        setattr(self, name, value)

    @tf.autograph.experimental.do_not_convert
    def __call__(self, *args: Any, **kwargs: Any) -> LossOutput:
        with self.name_scope:
            return LossClass.forward(self, *args, **kwargs)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._repr_args()})"  # type: ignore[attr-defined]


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
