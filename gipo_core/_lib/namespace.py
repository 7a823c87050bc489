"""Array-namespace and device helpers: the one place that imports ``array_api_compat``.

The core never imports a framework. It asks this module for the namespace of its inputs, the way einops
does: the framework is recognised from the array's type, and only a framework that the caller has already
imported is ever touched.
"""

from __future__ import annotations

import sys
from typing import Any

import array_api_compat

__all__ = ["array_namespace", "device_of", "is_tf_array", "library_module", "same_device"]


def library_module(x: Any) -> str:
    """The top-level module of ``x``'s type (``"torch"``, ``"jaxlib"``, ``"numpy"``, ...)."""
    return type(x).__module__.split(".")[0]


def is_tf_array(x: Any) -> bool:
    """True for TensorFlow tensors and variables, recognised without importing TensorFlow."""
    module = type(x).__module__
    return module.startswith("tensorflow") or module.startswith("tf_keras")


def _torch_tensor_type() -> Any:
    """``torch.Tensor`` if the caller has imported torch, else ``None`` (torch is never imported here)."""
    torch = sys.modules.get("torch")
    return getattr(torch, "Tensor", None)


def array_namespace(*arrays: Any, fn: str = "gipo_core") -> Any:
    """The array-API namespace shared by ``arrays`` (``None`` entries are ignored).

    Raises
    ------
    TypeError
        If the arrays come from two array libraries, or one is not an array at all.
    """
    present = [a for a in arrays if a is not None]
    tensor = _torch_tensor_type()
    if tensor is not None and present and all(isinstance(a, tensor) for a in present):
        # The answer array_api_compat gives for torch tensors, without its generic lookup: that costs
        # Python time on every call and torch.compile traces it with warnings.
        from array_api_compat import torch as compat_torch

        return compat_torch
    n_tf = sum(is_tf_array(a) for a in present)
    if n_tf:
        if n_tf != len(present):
            kinds = sorted({type(a).__module__.split(".")[0] for a in present})
            raise TypeError(
                f"`{fn}`: the arrays come from several array libraries ({', '.join(kinds)}); "
                "pass every array from the same library"
            )
        from ._tf_namespace import tf_namespace

        return tf_namespace()
    try:
        return array_api_compat.array_namespace(*present)
    except TypeError as exc:
        kinds = sorted({f"{type(a).__module__}.{type(a).__qualname__}" for a in present})
        raise TypeError(
            f"`{fn}`: expected arrays of one array-API library (numpy, torch, jax, array_api_strict or "
            f"tensorflow), got {', '.join(kinds)}; pass every array from the same library ({exc})"
        ) from None


def device_of(x: Any) -> Any:
    """The device ``x`` lives on, or ``None`` where the library cannot say (a sharded jax array)."""
    if is_tf_array(x):
        return getattr(x, "device", None) or None
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(x, tensor):
        return x.device
    try:
        return array_api_compat.device(x)
    except Exception:  # noqa: BLE001 - sharded or traced arrays have no single device
        return None


def same_device(a: Any, b: Any) -> bool:
    """Whether two arrays live on one device (unknown devices compare equal)."""
    da, db = device_of(a), device_of(b)
    if da is None or db is None:
        return True
    return str(da) == str(db) if is_tf_array(a) else da == db
