"""A minimal array-API namespace for TensorFlow tensors: exactly what the core uses, backed by tf ops.

array-api-compat has no TensorFlow namespace, and ``tf.experimental.numpy`` does not fit: it has no
``astype``, its ``clip`` lacks the array-API keywords, and it turns bare Python floats into float64
(tensorflow-cpu 2.21). This shim implements only the functions and dtypes the core calls (see the docstring
of ``gipo_core._core.objectives``, plus ``engine``, ``_api`` and ``_lib.checks``), with array-API semantics:

- Python scalars are weakly typed: in ``where``, ``maximum`` and ``minimum`` a Python float takes the dtype of
  the array argument, never float64.
- ``astype(x, dtype, copy=...)``: tf tensors are immutable, so ``copy`` only decides whether an unchanged
  dtype returns ``x`` itself (``copy=False``) or a ``tf.identity`` of it.
- Every function is a plain tf op: no host transfer, no Python branching on values, so everything traces
  under ``tf.function`` and compiles with ``jit_compile=True`` (XLA).

TensorFlow is imported when ``tf_namespace()`` is first called, which happens only for inputs that already
are TensorFlow tensors.
"""

from __future__ import annotations

import functools
import numbers
from types import SimpleNamespace
from typing import Any

__all__ = ["tf_namespace"]


def _is_scalar(x: Any) -> bool:
    return isinstance(x, numbers.Number) and not hasattr(x, "dtype")


@functools.lru_cache(maxsize=None)
def tf_namespace() -> SimpleNamespace:
    """The namespace object the core receives as ``xp`` for TensorFlow inputs (one shared instance).

    Returns
    -------
    types.SimpleNamespace
        Attributes: the dtypes ``bool, float16, bfloat16, float32, float64`` (TensorFlow ``DType`` objects)
        and the functions ``isdtype, astype, where, sum, max, min, full_like, ones_like, reshape, exp, expm1,
        log, log1p, abs, maximum, minimum``.

    Examples
    --------
    >>> import tensorflow as tf
    >>> from gipo_core._lib._tf_namespace import tf_namespace
    >>> xp = tf_namespace()
    >>> x = tf.constant([0.5, -2.0], dtype=tf.float64)
    >>> xp.where(x > 0, x, 0.0).dtype                    # the Python float takes x's dtype
    tf.float64
    >>> xp.isdtype(tf.bfloat16, "real floating")
    True
    """
    import tensorflow as tf

    floating = (tf.float16, tf.bfloat16, tf.float32, tf.float64)
    signed = (tf.int8, tf.int16, tf.int32, tf.int64)
    unsigned = (tf.uint8, tf.uint16, tf.uint32, tf.uint64)
    kinds = {
        "bool": (tf.bool,),
        "signed integer": signed,
        "unsigned integer": unsigned,
        "integral": signed + unsigned,
        "real floating": floating,
        "complex floating": (tf.complex64, tf.complex128),
    }
    kinds["numeric"] = kinds["integral"] + floating + kinds["complex floating"]

    def isdtype(dtype: Any, kind: Any) -> bool:
        """Array-API ``isdtype`` for TensorFlow dtypes: ``kind`` a dtype, a kind name or a tuple of those."""
        if isinstance(kind, tuple):
            return any(isdtype(dtype, k) for k in kind)
        if isinstance(kind, str):
            if kind not in kinds:
                raise ValueError(f"`isdtype`: unknown kind {kind!r}; expected one of {', '.join(sorted(kinds))}")
            return dtype in kinds[kind]
        return dtype == kind

    def astype(x: Any, dtype: Any, /, *, copy: bool = True) -> Any:
        if x.dtype == dtype:
            return tf.identity(x) if copy else tf.convert_to_tensor(x)
        return tf.cast(x, dtype)

    def _pair(x1: Any, x2: Any, fn: str) -> tuple[Any, Any]:
        """Two operands with one dtype: a Python scalar takes the array's dtype (array-API weak typing)."""
        if _is_scalar(x1) and _is_scalar(x2):
            raise TypeError(f"`{fn}`: at least one of the two operands must be a tensor; got two Python scalars")
        if _is_scalar(x1):
            x2 = tf.convert_to_tensor(x2)
            return tf.constant(x1, dtype=x2.dtype), x2
        x1 = tf.convert_to_tensor(x1)
        if _is_scalar(x2):
            return x1, tf.constant(x2, dtype=x1.dtype)
        return x1, x2

    def where(condition: Any, x1: Any, x2: Any, /) -> Any:
        x1, x2 = _pair(x1, x2, "where")
        return tf.where(condition, x1, x2)

    def maximum(x1: Any, x2: Any, /) -> Any:
        return tf.maximum(*_pair(x1, x2, "maximum"))

    def minimum(x1: Any, x2: Any, /) -> Any:
        return tf.minimum(*_pair(x1, x2, "minimum"))

    def sum(x: Any, /, *, axis: Any = None, keepdims: bool = False) -> Any:  # noqa: A001 - array-API name
        return tf.reduce_sum(x, axis=axis, keepdims=keepdims)

    def max(x: Any, /, *, axis: Any = None, keepdims: bool = False) -> Any:  # noqa: A001
        return tf.reduce_max(x, axis=axis, keepdims=keepdims)

    def min(x: Any, /, *, axis: Any = None, keepdims: bool = False) -> Any:  # noqa: A001
        return tf.reduce_min(x, axis=axis, keepdims=keepdims)

    def full_like(x: Any, /, fill_value: Any, *, dtype: Any = None) -> Any:
        dtype = x.dtype if dtype is None else dtype
        return tf.fill(tf.shape(x), tf.constant(fill_value, dtype=dtype))

    def ones_like(x: Any, /, *, dtype: Any = None) -> Any:
        return tf.ones_like(x, dtype=dtype)

    def reshape(x: Any, /, shape: Any) -> Any:
        return tf.reshape(x, shape)

    return SimpleNamespace(
        __name__="gipo_core._lib._tf_namespace",
        bool=tf.bool,
        float16=tf.float16,
        bfloat16=tf.bfloat16,
        float32=tf.float32,
        float64=tf.float64,
        isdtype=isdtype,
        astype=astype,
        where=where,
        sum=sum,
        max=max,
        min=min,
        full_like=full_like,
        ones_like=ones_like,
        reshape=reshape,
        exp=tf.math.exp,
        expm1=tf.math.expm1,
        log=tf.math.log,
        log1p=tf.math.log1p,
        abs=tf.math.abs,
        maximum=maximum,
        minimum=minimum,
    )
