"""The array namespace the core runs on under the PyTorch backend.

array_api_compat's torch namespace, with the few functions the core calls on every element replaced by
direct torch calls: ``maximum``/``minimum`` against a Python number (array_api_compat turns the number into a
tensor through ``torch.result_type``, which ``torch.compile`` cannot trace inside an ``autograd.Function``),
and ``where``/``sum``/``astype``, whose generic wrappers cost Python time on small inputs. Same semantics as
the array API for the arguments the core passes (tensors of one dtype, or a tensor and a Python number).
"""

from __future__ import annotations

import types
from typing import Any

import array_api_compat.torch as _compat
import torch

__all__ = ["namespace"]

_SCALARS = (int, float)


def _extremum(name: str, elementwise: Any, clamp: Any) -> Any:
    """``maximum``/``minimum`` that clamp against a Python number instead of materialising it as a tensor."""

    def fn(x1: Any, x2: Any, /) -> Any:
        if isinstance(x2, _SCALARS):
            return clamp(x1, x2)
        if isinstance(x1, _SCALARS):
            return clamp(x2, x1)
        return elementwise(x1, x2)

    fn.__name__ = fn.__qualname__ = name
    return fn


maximum = _extremum("maximum", torch.maximum, torch.clamp_min)
minimum = _extremum("minimum", torch.minimum, torch.clamp_max)


def where(condition: Any, x1: Any, x2: Any, /) -> Any:
    return torch.where(condition, x1, x2)


def sum(x: Any, /, *, axis: int | None = None, dtype: Any = None, keepdims: bool = False) -> Any:  # noqa: A001
    if axis is None:
        out = torch.sum(x, dtype=dtype)
        return out.reshape((1,) * x.ndim) if keepdims else out
    return torch.sum(x, axis, keepdim=keepdims, dtype=dtype)


def astype(x: Any, dtype: Any, /, *, copy: bool = True, device: Any = None) -> Any:
    if device is not None:
        return x.to(device, dtype=dtype, copy=copy)
    return x.to(dtype=dtype, copy=copy)


namespace = types.SimpleNamespace(**{name: getattr(_compat, name) for name in _compat.__all__})
namespace.maximum = maximum
namespace.minimum = minimum
namespace.where = where
namespace.sum = sum
namespace.astype = astype
namespace.exp = torch.exp
namespace.expm1 = torch.expm1
namespace.log = torch.log
namespace.log1p = torch.log1p
namespace.abs = torch.abs
namespace.__name__ = "gipo_core._torch_namespace"
