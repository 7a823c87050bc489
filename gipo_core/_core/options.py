"""Options as data: a name, a default, a type, a doc line and a check, declared once where they belong.

An objective's own options live in its :class:`~gipo_core._core.objectives.Objective` entry; the options every
objective shares live in :data:`gipo_core._core.signature.COMMON_OPTIONS`. Everything else (the public
functions' and classes' signatures, their docstrings, the type stubs in ``gipo_core/_typing.py`` and the
validation) is derived from these declarations.

Every check takes ``(fn, value)``, where ``fn`` names the public function or class for the error message, and
returns the value the core receives: NumPy scalars become Python numbers, pairs become tuples. Numbers outside
an option's working range are rejected with a ``ValueError`` that names the argument and the range (see
``docs/REFERENCE.md``, "Option ranges"): within it, every backend and dtype computes without overflow.

Only the Python standard library is used here.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = ["Option", "option", "number_in", "choice", "optional", "pair_in", "flag", "as_number"]


@dataclass(frozen=True)
class Option:
    """One keyword option of the public API.

    Attributes
    ----------
    name : str
        The keyword.
    default : object
        Its default (``None`` for "off").
    annotation : str
        The type in the generated typed signatures (Python 3.10 syntax, e.g. ``"float | None"``).
    doc : str
        The numpydoc description (one or more lines, without the ``name : type`` header).
    check : callable
        ``check(fn, value) -> value``: raises ``TypeError``/``ValueError`` naming ``fn`` and the option, or
        returns the normalised value.
    """

    name: str
    default: Any
    annotation: str
    doc: str
    check: Callable[[str, Any], Any]

    def doc_entry(self, indent: str = "") -> str:
        """The numpydoc ``Parameters`` entry of this option."""
        kind = self.annotation.replace("Literal", "").replace("[", "{").replace("]", "}")
        default = "optional" if self.default is None else f"default {self.default!r}"
        head = f"{self.name} : {kind}, {default}"
        body = "".join(f"{indent}    {line}\n" for line in self.doc.strip().splitlines())
        return f"{indent}{head}\n{body}"


def _fmt(x: float) -> str:
    return f"{x:g}"


#: A check as the helpers below build it: ``(fn, name, value) -> value``.
Check = Callable[[str, str, Any], Any]


def as_number(fn: str, name: str, value: Any) -> float:
    """``value`` as a Python float: a Python or NumPy real number (not a bool, not an array)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or getattr(value, "ndim", 0) != 0:
        raise TypeError(f"`{fn}`: `{name}` must be a real number; got {type(value).__name__} {value!r}")
    return float(value)


def number_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    """A check for a finite real number in ``[low, high]`` (open ends where asked)."""
    interval = f"{'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"

    def check(fn: str, name: str, value: Any) -> float:
        x = as_number(fn, name, value)
        ok = math.isfinite(x) and (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
        if not ok:
            raise ValueError(f"`{fn}`: `{name}` must be a number in {interval}; got {value!r}")
        return x

    return check


def choice(values: Sequence[Any]) -> Check:
    """A check for one of the strings ``values``."""

    def check(fn: str, name: str, value: Any) -> Any:
        if not isinstance(value, str) or value not in values:
            valid = ", ".join(repr(v) for v in values)
            raise ValueError(f"`{fn}`: `{name}` must be one of {valid}; got {value!r}")
        return value

    return check


def optional(inner: Check) -> Check:
    """``None``, or what ``inner`` accepts."""

    def check(fn: str, name: str, value: Any) -> Any:
        return None if value is None else inner(fn, name, value)

    return check


def pair_in(low: float, high: float) -> Check:
    """A check for a pair ``(a, b)`` of finite numbers with ``low <= a < b <= high``."""

    def check(fn: str, name: str, value: Any) -> tuple[float, float]:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
            raise TypeError(f"`{fn}`: `{name}` must be a pair (low, high); got {value!r}")
        a, b = (as_number(fn, name, v) for v in value)
        if not (math.isfinite(a) and math.isfinite(b) and low <= a < b <= high):
            raise ValueError(
                f"`{fn}`: `{name}` must be a pair (low, high) of numbers with {_fmt(low)} <= low < high <= "
                f"{_fmt(high)}; got {value!r}"
            )
        return (a, b)

    return check


def flag(fn: str, name: str, value: Any) -> bool:
    """A check for ``True`` or ``False`` (NumPy bools included)."""
    if type(value).__name__ not in ("bool", "bool_"):
        raise TypeError(f"`{fn}`: `{name}` must be True or False; got {value!r}")
    return bool(value)


def option(name: str, default: Any, annotation: str, doc: str, check: Check) -> Option:
    """An :class:`Option` whose check names it in its messages."""
    return Option(name, default, annotation, doc, lambda fn, value: check(fn, name, value))
