"""The public API of every backend, built from the registry in ``gipo_core/_core``.

A backend module describes itself with a :class:`Backend` (how to run the core under its autodiff, which
arrays it takes) and gets from here:

- :func:`make_api`: the loss functions (``gipo_loss``, ...) and ``gaussian_trust_weight``, with the same
  signature, checks and docstrings in every backend. Their static types are the protocols of the generated
  ``gipo_core/_typing.py``; ``inspect.signature`` reports the same parameters.
- :class:`LossClass`: the one base of the loss classes (``GIPOLoss``, ...) of torch, JAX and TensorFlow. The
  typed constructors come from ``gipo_core/_typing.py``; each backend adds a small base for its framework
  (``nn.Module``, a hashable static pytree node, ``tf.Module``).

Options are checked once: by a function on each call (they are its arguments), by a class at construction.
Per call a class checks only what can change: the arrays' types, shapes, dtypes and devices.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
from typing import TYPE_CHECKING, Any, Callable, Generic, Mapping, NamedTuple, TypeVar

from ._core.engine import AGG_MODES, METRIC_NAMES, LossSpec, trust_weight
from ._core.objectives import KERNELS, OBJECTIVES, Objective
from ._core.options import number_in
from ._core.signature import CALL_ARRAYS, COMMON_OPTIONS, DENOMINATOR_RANGE, POSITIONAL_ARRAYS, make_spec
from ._lib import checks
from ._lib.namespace import array_namespace, library_module

__all__ = [
    "AGG_MODES",
    "KERNELS",
    "METRIC_NAMES",
    "PUBLIC_LOSSES",
    "Backend",
    "LossArrays",
    "LossClass",
    "LossOutput",
    "call",
    "check_call",
    "loss_signature",
    "make_api",
]

A = TypeVar("A")

#: Public loss-function name -> objective key.
PUBLIC_LOSSES = {obj.public_name: key for key, obj in OBJECTIVES.items()}


class LossOutput(NamedTuple):
    """What every loss function returns: the scalar ``loss`` and a dict of 0-d diagnostic arrays."""

    loss: Any
    metrics: dict[str, Any]


class LossArrays(NamedTuple):
    """The array arguments of a call, checked, in the order of the core's ``forward``; ``denominator`` only
    when it is an array."""

    logp: Any
    old_logp: Any
    advantages: Any
    mask: Any
    behavior_weights: Any
    denominator: Any
    rollout_logp: Any = None


@dataclasses.dataclass(frozen=True)
class Backend:
    """What a backend module tells the API about itself.

    Attributes
    ----------
    module : str
        The module's name (``"gipo_core.torch"``), shown in messages and ``__module__``.
    run : callable
        ``run(arrays: LossArrays, spec: LossSpec, xp) -> LossOutput``: the core under this autodiff.
    takes : str
        The arrays it takes, in words (``"torch.Tensor"``), for error messages.
    accepts : callable
        ``accepts(x) -> bool``: whether ``x`` is one of its arrays.
    convert : callable, optional
        Applied to every array argument first (JAX moves NumPy arrays to JAX, as ``jax.numpy`` does).
    example : str
        A doctest for the functions' docstrings; ``{fn}`` stands for the function's name.
    """

    module: str
    run: Callable[[LossArrays, LossSpec, Any], LossOutput]
    takes: str
    accepts: Callable[[Any], bool]
    convert: Callable[[Any], Any] | None = None
    example: str = ""


def first_order_only(fn: str, what: str) -> str:
    """The message of every backend's refusal of second derivatives and forward mode."""
    return (
        f"`{fn}`: {what} is not supported: the gradient is computed in closed form with the method's "
        "stop-gradients (GIPO's trust weight held constant) and is first-order, reverse-mode only; "
        "differentiating the forward computation instead would silently give another derivative"
    )


# ------------------------------------------------------------------------------------------------ checks

#: The module that takes each array library's arrays (by the top-level module of the array's type).
_MODULE_FOR = {
    "numpy": "gipo_core.numpy",
    "array_api_strict": "gipo_core.numpy",
    "torch": "gipo_core.torch",
    "jax": "gipo_core.jax",
    "jaxlib": "gipo_core.jax",
    "tensorflow": "gipo_core.tf",
    "keras": "gipo_core.tf",
    "tf_keras": "gipo_core.tf",
}


def _check_array(fn: str, backend: Backend, name: str, value: Any) -> None:
    if backend.accepts(value):
        return
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    other = _MODULE_FOR.get(library_module(value))
    hint = f"; for these arrays use {other}" if other and other != backend.module else ""
    raise TypeError(f"`{fn}`: `{name}` must be a {backend.takes} ({backend.module}); got {kind}{hint}")


def _number_denominator(fn: str, value: Any) -> float:
    return number_in(*DENOMINATOR_RANGE)(fn, "denominator", value)


def _is_number(value: Any) -> bool:
    """A Python or NumPy real number (``np.float32(3)`` included), not a bool and not an array."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and getattr(value, "ndim", 0) == 0


def call(fn: str, backend: Backend, spec: LossSpec, *arrays: Any) -> LossOutput:
    """Check the arrays of one call (types, shapes, dtypes, devices; never values) and run the backend.

    ``arrays``: ``logp, old_logp, advantages, mask, denominator, behavior_weights, rollout_logp``, positional,
    as :func:`check_call` takes them.
    """
    return backend.run(*check_call(fn, backend, spec, *arrays))


def check_call(
    fn: str,
    backend: Backend,
    spec: LossSpec,
    logp: Any,
    old_logp: Any,
    advantages: Any,
    mask: Any = None,
    denominator: Any = None,
    behavior_weights: Any = None,
    rollout_logp: Any = None,
) -> tuple[LossArrays, LossSpec, Any]:
    """The checks of :func:`call`: ``(arrays, spec, xp)``, a number ``denominator`` moved into the spec."""
    named = (
        ("logp", logp),
        ("old_logp", old_logp),
        ("advantages", advantages),
        ("mask", mask),
        ("behavior_weights", behavior_weights),
        ("rollout_logp", rollout_logp),
    )
    if backend.convert is not None:
        logp, old_logp, advantages, mask, behavior_weights, rollout_logp = (backend.convert(v) for _, v in named)
        values = (logp, old_logp, advantages, mask, behavior_weights, rollout_logp)
        named = tuple((n, v) for (n, _), v in zip(named, values))
    for name, value in named[:3]:
        if value is None:
            raise TypeError(f"`{fn}`: `{name}` is required; got None")
    for name, value in named:
        if value is not None:
            _check_array(fn, backend, name, value)
    if denominator is not None:
        if _is_number(denominator):
            spec = dataclasses.replace(spec, denominator=_number_denominator(fn, denominator))
            denominator = None
        else:
            if backend.convert is not None:
                denominator = backend.convert(denominator)
            if not hasattr(denominator, "shape"):
                raise TypeError(
                    f"`{fn}`: `denominator` must be None, a number or a one-element array; "
                    f"got {type(denominator).__name__}"
                )
            _check_array(fn, backend, "denominator", denominator)
    xp = array_namespace(logp, old_logp, advantages, mask, behavior_weights, rollout_logp, denominator, fn=fn)
    ref_shape = checks.shape_of(logp)
    if len(ref_shape) < 1:
        raise ValueError(f"`{fn}`: `logp` must have at least one axis (..., time); got a 0-d array")
    for name, value in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages)):
        checks.check_floating(fn, name, value, xp)
    checks.check_same_shape(fn, "old_logp", old_logp, ref_shape)
    checks.check_advantages_shape(fn, advantages, ref_shape)
    if mask is not None:
        checks.check_mask(fn, mask, ref_shape, xp)
    for name, value in (("behavior_weights", behavior_weights), ("rollout_logp", rollout_logp)):
        if value is not None:
            checks.check_floating(fn, name, value, xp)
            checks.check_same_shape(fn, name, value, ref_shape)
    for name, value in named[1:]:
        if value is not None:
            checks.check_same_device(fn, name, value, logp)
    if denominator is not None:
        # One element of any shape, as a 0-d array: a (1, 1, 1) denominator must not broadcast the gradient.
        denominator = xp.reshape(checks.check_denominator(fn, denominator, logp, xp), ())
    if spec.rollout_is is not None and rollout_logp is None:
        raise ValueError(
            f"`{fn}`: `rollout_is={spec.rollout_is!r}` corrects with `rollout_logp`, which is None; pass the "
            "log-probs of the policy that generated the samples"
        )
    return LossArrays(logp, old_logp, advantages, mask, behavior_weights, denominator, rollout_logp), spec, xp


# ------------------------------------------------------------------------------------------ signatures

_P = inspect.Parameter


def _array_annotation(name: str) -> str:
    if name in ("logp", "old_logp", "advantages"):
        return "A"
    return "float | A | None" if name == "denominator" else "A | None"


def loss_signature(objective: Objective) -> inspect.Signature:
    """The signature of a loss function (annotations as strings, ``A`` the backend's array type)."""
    ann = _array_annotation
    params = [_P(n, _P.POSITIONAL_OR_KEYWORD, annotation=ann(n)) for n, _, _ in POSITIONAL_ARRAYS[:3]]
    params.append(_P("mask", _P.POSITIONAL_OR_KEYWORD, default=None, annotation=ann("mask")))
    params += [_P(o.name, _P.KEYWORD_ONLY, default=o.default, annotation=o.annotation) for o in objective.options]
    params += [_P(o.name, _P.KEYWORD_ONLY, default=o.default, annotation=o.annotation) for o in COMMON_OPTIONS]
    params += [_P(n, _P.KEYWORD_ONLY, default=None, annotation=ann(n)) for n, _, _ in CALL_ARRAYS]
    return inspect.Signature(params, return_annotation="LossOutput")


def class_signature(objective: Objective) -> inspect.Signature:
    """The signature of a loss class's constructor (without ``self``)."""
    params = [
        _P(o.name, _P.POSITIONAL_OR_KEYWORD, default=o.default, annotation=o.annotation) for o in objective.options
    ]
    params += [_P(o.name, _P.KEYWORD_ONLY, default=o.default, annotation=o.annotation) for o in COMMON_OPTIONS]
    return inspect.Signature(params, return_annotation="None")


def call_signature() -> inspect.Signature:
    """The signature of a loss class's call (``forward``), without ``self``."""
    params = [_P(n, _P.POSITIONAL_OR_KEYWORD, annotation=_array_annotation(n)) for n, _, _ in POSITIONAL_ARRAYS[:3]]
    params.append(_P("mask", _P.POSITIONAL_OR_KEYWORD, default=None, annotation="A | None"))
    params += [_P(n, _P.KEYWORD_ONLY, default=None, annotation=_array_annotation(n)) for n, _, _ in CALL_ARRAYS]
    return inspect.Signature(params, return_annotation="LossOutput")


# ----------------------------------------------------------------------------------------------- docs


def _entry(name: str, kind: str, doc: str) -> str:
    return f"{name} : {kind}\n" + "".join(f"    {line}\n" for line in doc.splitlines())


_RETURNS = """
Returns
-------
LossOutput
    ``(loss, metrics)``: ``loss`` a 0-d array in float32 (float64 if an input is float64); ``metrics`` a dict
    of 0-d arrays on the inputs' device: {metrics}.
"""

_NOTES = """
Notes
-----
{math}

Computed in float32 (float64 when given float64); the gradient comes back in ``logp``'s dtype. Masked
elements get log-ratio 0 and advantage 0 before any exp; every denominator is guarded, so an all-masked
batch gives loss 0 and a zero gradient.

Raises
------
TypeError
    An array of another library than this module's (the message names the module to use), an array not of
    a real floating dtype, a ``mask`` neither bool nor floating, an option of the wrong type, an unknown
    keyword.
ValueError
    Shapes that do not match (see ``advantages``); arrays on two devices; an option outside its range (each
    range is given above); an unknown ``agg``, ``kernel``, ``ratio_level`` or ``rollout_is``.

References
----------
.. [1] GIPO: Gaussian Importance sampling Policy Optimization, arXiv:2603.03955 (ICML 2026).
"""


def function_doc(objective: Objective, example: str = "") -> str:
    """The docstring of a loss function, from the registry."""
    params = "".join(_entry(n, k, d) for n, k, d in POSITIONAL_ARRAYS)
    params += "".join(o.doc_entry() for o in objective.options + COMMON_OPTIONS)
    params += "".join(_entry(n, k, d) for n, k, d in CALL_ARRAYS)
    doc = objective.summary + "\n\nParameters\n----------\n" + params
    doc += _RETURNS.format(metrics=", ".join(METRIC_NAMES)) + _NOTES.format(math=objective.math)
    if example:
        doc += "\nExamples\n--------\n" + example.format(fn=objective.public_name, cls=objective.class_name)
    return doc


def class_doc(objective: Objective, module: str, example: str = "") -> str:
    """The docstring of a loss class, from the registry."""
    params = "".join(o.doc_entry() for o in objective.options + COMMON_OPTIONS)
    call = "".join(_entry(n, k, d) for n, k, d in POSITIONAL_ARRAYS + CALL_ARRAYS)
    doc = (
        f"{objective.summary}\n\nThe options are fixed and checked at construction; a call checks only the arrays and "
        f"returns\n``LossOutput(loss, metrics)``, the same as :func:`{module}.{objective.public_name}`.\n\n"
        f"Parameters\n----------\n{params}\nCall parameters\n---------------\n{call}"
    )
    if example:
        doc += "\nExamples\n--------\n" + example.format(fn=objective.public_name, cls=objective.class_name)
    return doc


# ------------------------------------------------------------------------------------------- functions

_COMMON_NAMES = tuple(o.name for o in COMMON_OPTIONS)
_CALL_NAMES = tuple(n for n, _, _ in CALL_ARRAYS)


def _loss_function(key: str, backend: Backend) -> Callable[..., LossOutput]:
    objective = OBJECTIVES[key]
    fn_name = objective.public_name
    option_names = objective.option_names
    valid = frozenset(option_names + _COMMON_NAMES + _CALL_NAMES)
    signature = loss_signature(objective)

    def loss_fn(logp: Any, old_logp: Any, advantages: Any, mask: Any = None, **kwargs: Any) -> LossOutput:
        if not valid.issuperset(kwargs):
            unknown = sorted(set(kwargs) - valid)
            names = ", ".join(option_names + _COMMON_NAMES + _CALL_NAMES)
            raise TypeError(f"`{fn_name}`: unexpected keyword argument(s) {', '.join(unknown)}; valid: {names}")
        spec = make_spec(fn_name, key, {k: kwargs[k] for k in option_names if k in kwargs}, kwargs)
        return call(
            fn_name,
            backend,
            spec,
            logp,
            old_logp,
            advantages,
            mask,
            kwargs.get("denominator"),
            kwargs.get("behavior_weights"),
            kwargs.get("rollout_logp"),
        )

    loss_fn.__signature__ = signature  # type: ignore[attr-defined]
    loss_fn.__name__ = loss_fn.__qualname__ = fn_name
    loss_fn.__module__ = backend.module
    loss_fn.__doc__ = function_doc(objective, backend.example)
    return loss_fn


def _trust_weight_function(backend: Backend) -> Callable[..., Any]:
    def gaussian_trust_weight(log_ratio: Any, sigma: float = 1.0) -> Any:
        """Gaussian trust weight ``omega = exp(-log_ratio**2 / (2 sigma**2))``, in ``log_ratio``'s dtype.

        Parameters
        ----------
        log_ratio : array
            ``log pi - log mu`` per element (any shape, real floating dtype).
        sigma : float, default 1.0
            Width in log-ratio units, in [1e-06, 1e+06].

        Returns
        -------
        array
            The weight, in [0, 1], computed in float32 (float64 for float64 input).

        Raises
        ------
        TypeError
            ``log_ratio`` not an array of this module's library or not of a real floating dtype.
        ValueError
            ``sigma`` outside its range.
        """
        fn = "gaussian_trust_weight"
        if backend.convert is not None:
            log_ratio = backend.convert(log_ratio)
        _check_array(fn, backend, "log_ratio", log_ratio)
        xp = array_namespace(log_ratio, fn=fn)
        checks.check_floating(fn, "log_ratio", log_ratio, xp)
        sigma = OBJECTIVES["gipo"].options[0].check(fn, sigma)
        return trust_weight(log_ratio, sigma, xp=xp)

    gaussian_trust_weight.__module__ = backend.module
    return gaussian_trust_weight


def make_api(backend: Backend) -> dict[str, Callable[..., Any]]:
    """The public functions of one backend, keyed by name."""
    api: dict[str, Callable[..., Any]] = {
        obj.public_name: _loss_function(key, backend) for key, obj in OBJECTIVES.items()
    }
    api["gaussian_trust_weight"] = _trust_weight_function(backend)
    return api


# --------------------------------------------------------------------------------------------- classes


class LossClass(Generic[A]):
    """The shared machinery of the loss classes of torch, JAX and TensorFlow.

    The generated constructors (``gipo_core/_typing.py``) call :meth:`_configure`. A backend's base class,
    which comes after this one in the MRO of each loss class, sets ``_backend`` and ``_example`` (a doctest
    template, ``{cls}`` for the class name) and defines ``_init_framework`` (``nn.Module.__init__``, ...) and
    ``_set`` (how an attribute is stored: JAX's classes are frozen).
    """

    _objective: str = ""
    _backend: Backend
    _spec: LossSpec

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        backend = getattr(cls, "_backend", None)
        if cls._objective and backend is not None and cls.__dict__.get("__doc__") is None:
            cls.__doc__ = class_doc(OBJECTIVES[cls._objective], backend.module, getattr(cls, "_example", ""))

    if TYPE_CHECKING:  # each backend's base class defines these (they come after this class in the MRO)

        def _init_framework(self) -> None:
            """Initialise the framework's base class (``nn.Module``, ``tf.Module``) before anything is stored."""

        def _set(self, name: str, value: Any) -> None:
            """Store an attribute (JAX's classes are frozen)."""

    def _configure(self, options: Mapping[str, Any], common: Mapping[str, Any]) -> None:
        self._init_framework()
        name = type(self).__name__
        spec = make_spec(name, self._objective, options, common)
        self._set("_spec", spec)
        self._set("_fn_name", OBJECTIVES[self._objective].public_name)
        # The checked values, readable as attributes (``loss_fn.sigma``, ``loss_fn.agg``).
        for key, value in spec.options:
            self._set(key, value)
        for key in _COMMON_NAMES:
            self._set(key, getattr(spec, key))

    @property
    def options(self) -> dict[str, Any]:
        """The objective's options as checked at construction (a copy)."""
        return dict(self._spec.options)

    def forward(
        self,
        logp: A,
        old_logp: A,
        advantages: A,
        mask: A | None = None,
        *,
        denominator: float | A | None = None,
        behavior_weights: A | None = None,
        rollout_logp: A | None = None,
    ) -> LossOutput:
        """``LossOutput(loss, metrics)`` of one batch; see the class docstring for the arguments."""
        return call(
            self._fn_name,  # type: ignore[attr-defined]
            self._backend,
            self._spec,
            logp,
            old_logp,
            advantages,
            mask,
            denominator,
            behavior_weights,
            rollout_logp,
        )

    def _repr_args(self) -> str:
        parts = [f"{k}={v!r}" for k, v in self._spec.options]
        parts += [
            f"{o.name}={getattr(self._spec, o.name)!r}"
            for o in COMMON_OPTIONS
            if getattr(self._spec, o.name) != o.default or o.name in ("agg", "with_metrics")
        ]
        return ", ".join(parts)
