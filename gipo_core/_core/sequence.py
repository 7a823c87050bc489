"""The one sequence primitive: masked sums and means over the last (time) axis, kept as ``(..., 1)``.

Every sequence quantity of the core goes through these two functions: the sequence-level ratio
(``ratio_level="sequence"``), the sequence and geometric rollout weights, off-policy sequence masking and the
per-sequence counts of the ``seq-mean-*`` aggregations. Each masks its input itself (``where``, never a
multiplication, so NaN or inf at a padded position cannot leak) and divides by the number of *valid*
elements of each sequence, so a mean over padding cannot be written by accident. The result has size 1 on
the last axis and broadcasts back to every element of its sequence.

A sequence with no valid element gets sum 0, count 0 and mean 0 (never 0/0).
"""

from __future__ import annotations

from typing import Any

__all__ = ["seq_count", "seq_sum", "seq_mean", "broadcast"]


def seq_count(valid: Any, like: Any, xp: Any) -> Any:
    """Valid elements per sequence, shape ``(..., 1)`` in ``like``'s dtype (``valid`` None: all valid)."""
    if valid is None:
        return xp.sum(xp.ones_like(like), axis=-1, keepdims=True)
    if valid.dtype == xp.bool:
        return xp.sum(xp.astype(valid, like.dtype), axis=-1, keepdims=True)
    return xp.sum(xp.astype(valid != 0, like.dtype), axis=-1, keepdims=True)


def seq_sum(x: Any, valid: Any, xp: Any) -> Any:
    """``sum_t valid[..., t] * x[..., t]`` with invalid elements ignored whatever they hold, shape ``(..., 1)``."""
    if valid is not None:
        x = xp.where(valid, x, 0.0)
    return xp.sum(x, axis=-1, keepdims=True)


def seq_mean(x: Any, valid: Any, xp: Any, count: Any = None) -> Any:
    """Mean of ``x`` over each sequence's valid elements, shape ``(..., 1)``; 0 for a sequence with none.

    ``count`` (from :func:`seq_count`) may be passed when it is already at hand.
    """
    n = seq_count(valid, x, xp) if count is None else count
    return seq_sum(x, valid, xp) / xp.where(n == 0, 1.0, n)


def broadcast(per_seq: Any, like: Any, xp: Any) -> Any:
    """A ``(..., 1)`` per-sequence value repeated over the time axis of ``like`` (one value per element)."""
    return per_seq + xp.full_like(like, 0.0)
