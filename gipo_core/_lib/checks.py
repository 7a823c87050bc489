"""Argument checks that build clear messages.

Every check runs on what is visible without touching data: shapes, dtypes, devices, Python options. Nothing
here reads an array's values, so the checks cost nothing on a GPU and are legal under ``jax.jit``,
``torch.compile`` and ``tf.function`` (they run once, at trace time).

Messages name the function and the argument, show what was got and what was expected, and say how to fix it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

from .namespace import device_of, same_device

__all__ = [
    "check_choice",
    "check_positive",
    "check_greater_than",
    "check_denominator",
    "check_floating",
    "check_same_shape",
    "check_advantages_shape",
    "check_mask",
    "check_same_device",
    "shape_of",
]


def shape_of(x: Any) -> tuple:
    """The shape of ``x`` as a tuple of Python ints (``None`` for a dimension unknown at trace time)."""
    shape = x.shape
    try:
        return tuple(None if d is None else int(d) for d in shape)
    except TypeError:  # tf.TensorShape with unknown rank
        return tuple(shape)


def _fmt_shape(shape: tuple) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _is_real_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_choice(fn: str, name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{fn}`: `{name}` must be one of {valid}; got {value!r}")
    return value


def check_positive(fn: str, name: str, value: Any) -> float:
    """A finite, strictly positive Python number (sigma, tau, clip widths)."""
    if not _is_real_number(value) or not math.isfinite(float(value)) or float(value) <= 0.0:
        raise ValueError(
            f"`{fn}`: `{name}` must be a finite number > 0; got {value!r} ({type(value).__name__})"
        )
    return float(value)


def check_nonnegative(fn: str, name: str, value: Any) -> float:
    if not _is_real_number(value) or not math.isfinite(float(value)) or float(value) < 0.0:
        raise ValueError(f"`{fn}`: `{name}` must be a finite number >= 0; got {value!r} ({type(value).__name__})")
    return float(value)


def check_finite(fn: str, name: str, value: Any) -> float:
    if not _is_real_number(value) or not math.isfinite(float(value)):
        raise ValueError(f"`{fn}`: `{name}` must be a finite number; got {value!r} ({type(value).__name__})")
    return float(value)


def check_greater_than(fn: str, name: str, value: Any, bound: float) -> float:
    if not _is_real_number(value) or not math.isfinite(float(value)) or float(value) <= bound:
        raise ValueError(f"`{fn}`: `{name}` must be a finite number > {bound:g}; got {value!r}")
    return float(value)


def check_denominator(fn: str, value: Any, reference: Any, xp: Any) -> Any:
    """``None``, a finite number > 0, or a 0-d (or size-1) array of the inputs' library.

    An array denominator (a global token count that came out of an all-reduce, say) is taken as it is: its
    value is never read, so a zero there is guarded inside the loss rather than checked here.
    """
    if value is None:
        return None
    if _is_real_number(value):
        return check_positive(fn, "denominator", value)
    shape = getattr(value, "shape", None)
    if shape is None:
        raise TypeError(
            f"`{fn}`: `denominator` must be None, a number > 0 or a 0-d array; got {type(value).__name__}"
        )
    shape = shape_of(value)
    size = math.prod([d for d in shape if d is not None])  # a list: torch.compile cannot trace a generator here
    if size != 1:
        raise ValueError(
            f"`{fn}`: `denominator` must be a number or an array with one element; got shape {_fmt_shape(shape)}"
        )
    if not xp.isdtype(value.dtype, ("real floating", "integral")):
        raise TypeError(f"`{fn}`: `denominator` must have a real dtype; got {value.dtype}")
    check_same_device(fn, "denominator", value, reference)
    return value


def check_floating(fn: str, name: str, x: Any, xp: Any) -> None:
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"`{fn}`: `{name}` must have a real floating dtype (float16, bfloat16, float32 or float64); "
            f"got {x.dtype}; cast it first, e.g. to float32"
        )


def check_same_shape(fn: str, name: str, x: Any, ref_shape: tuple) -> None:
    shape = shape_of(x)
    if shape != ref_shape:
        raise ValueError(
            f"`{fn}`: `{name}` has shape {_fmt_shape(shape)} but `logp` has shape {_fmt_shape(ref_shape)}; "
            f"pass an array of shape {_fmt_shape(ref_shape)}"
        )


def check_advantages_shape(fn: str, adv: Any, ref_shape: tuple) -> None:
    """``advantages`` is either per element (same shape as ``logp``) or per sequence (size 1 on the last axis)."""
    shape = shape_of(adv)
    per_sequence = ref_shape[:-1] + (1,)
    if shape == ref_shape or (len(ref_shape) >= 1 and shape == per_sequence):
        return
    hint = ""
    if len(ref_shape) >= 2 and shape == ref_shape[:-1]:
        hint = f" (for one advantage per sequence, add a trailing axis: advantages[..., None])"
    raise ValueError(
        f"`{fn}`: `advantages` has shape {_fmt_shape(shape)} but `logp` has shape {_fmt_shape(ref_shape)}; "
        f"pass shape {_fmt_shape(ref_shape)} or {_fmt_shape(per_sequence)}{hint}"
    )


def check_mask(fn: str, mask: Any, ref_shape: tuple, xp: Any) -> None:
    check_same_shape(fn, "mask", mask, ref_shape)
    if not (mask.dtype == xp.bool or xp.isdtype(mask.dtype, "real floating")):
        raise TypeError(
            f"`{fn}`: `mask` must be bool or a real floating dtype; got {mask.dtype}; "
            "pass mask.astype(bool) for a 0/1 integer mask"
        )


def check_same_device(fn: str, name: str, x: Any, reference: Any) -> None:
    if not same_device(x, reference):
        raise ValueError(
            f"`{fn}`: `{name}` is on device {device_of(x)} but `logp` is on device {device_of(reference)}; "
            "move every array to one device"
        )
