"""JAX fused linear loss: from an LLM's hidden states and output projection to any gipo-core objective with a
``jax.lax.scan`` over chunks of tokens and a ``jax.custom_vjp``, never holding a (tokens, vocab) array.

The forward of the VJP runs one scan: per chunk the logits, a stable log-softmax, the target's
log-probability, the core's ``dloss/dlogp`` for the chunk and the chunk's gradients with respect to the hidden
states (an output of the scan), the weight and the bias (carried and accumulated). The backward multiplies
them by the loss's cotangent. Without differentiation the scan computes the log-probabilities only. See
:mod:`gipo_core._fused_linear` for the math and for how the core is asked for each chunk's ``dloss/dlogp``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._core.engine import forward
from ._fused_linear import (
    FusedLinearOutput,
    aggregation_weight,
    check_fused_args,
    chunk_spec,
    fused_spec,
    readable_targets,
    two_pass,
)
from ._lib.namespace import array_namespace

__all__ = ["FusedLinearOutput", "fused_linear_loss"]

_FN = "fused_linear_loss"


def _logp_dtype(hidden: Any) -> Any:
    return jnp.float64 if hidden.dtype == jnp.float64 else jnp.float32


def _padded(x: Any, n_chunks: int, chunk: int, fill: Any = 0) -> Any:
    """``x`` (tokens, ...) padded with ``fill`` to ``n_chunks * chunk`` tokens and split into chunks."""
    pad = n_chunks * chunk - x.shape[0]
    if pad:
        x = jnp.concatenate([x, jnp.full((pad, *x.shape[1:]), fill, dtype=x.dtype)], axis=0)
    return x.reshape(n_chunks, chunk, *x.shape[1:])


def _scan(static: tuple, hidden, weight, bias, targets, core, grads: bool, saved_all=None):
    """``(logp, entropy, grad_hidden, grad_weight, grad_bias)`` over flat tokens; the gradients only when
    ``grads``: then ``core`` = flat ``(old_logp, advantages, valid, weights, rollout_logp)`` for the chunks'
    core calls, or, in the second pass of the two-pass mode, ``saved_all`` the core's ``dloss/dlogp`` of the
    whole batch, flat."""
    args, with_entropy, xp = static
    n, dim = hidden.shape
    chunk = min(args.chunk_size, max(n, 1))
    n_chunks = max(1, -(-n // chunk))
    wd = _logp_dtype(hidden)
    temperature = args.temperature
    spec = chunk_spec(args.spec)
    low_precision = hidden.dtype not in (jnp.float32, jnp.float64)
    acc = jnp.float32 if low_precision else hidden.dtype

    def body(carry, xs):
        h, t = xs[0], xs[1]
        z = h @ weight.T
        if bias is not None:
            z = z + bias
        if temperature != 1.0:
            z = z / jnp.asarray(temperature, dtype=z.dtype)
        z = z.astype(wd)
        shifted = z - jnp.max(z, axis=1, keepdims=True)
        e = jnp.exp(shifted)
        total = jnp.sum(e, axis=1, keepdims=True)
        log_total = jnp.log(total)
        lp = jnp.take_along_axis(shifted, t[:, None], axis=1)[:, 0] - log_total[:, 0]
        ent = log_total[:, 0] - jnp.sum(e * shifted, axis=1) / total[:, 0] if with_entropy else None
        if not grads:
            return carry, (lp, ent)
        if saved_all is not None:
            saved = xs[2]
        else:
            old, adv, valid, weights, rollout = xs[2]
            _, saved, _ = forward(lp, old, adv, valid, weights, None, rollout, spec=spec, xp=xp)
        coef = saved.astype(wd)[:, None] * (1.0 / temperature)
        onehot = jnp.arange(z.shape[1], dtype=t.dtype)[None, :] == t[:, None]
        g = (coef * (onehot.astype(wd) - e / total)).astype(hidden.dtype)
        gw, gb = carry
        gw = gw + jnp.dot(g.T, h, preferred_element_type=acc)
        if gb is not None:
            gb = gb + jnp.sum(g, axis=0, dtype=acc)
        gh = jnp.dot(g, weight, preferred_element_type=acc).astype(hidden.dtype)
        return (gw, gb), (lp, ent, gh)

    xs = [_padded(hidden, n_chunks, chunk), _padded(targets, n_chunks, chunk)]
    if grads:
        if saved_all is not None:
            xs.append(_padded(saved_all, n_chunks, chunk))
        else:
            xs.append(tuple(None if a is None else _padded(a, n_chunks, chunk) for a in core))
        carry = (jnp.zeros(weight.shape, acc), None if bias is None else jnp.zeros(bias.shape, acc))
    else:
        carry = None
    carry, ys = jax.lax.scan(body, carry, tuple(xs))
    logp = ys[0].reshape(-1)[:n]
    entropy = ys[1].reshape(-1)[:n] if with_entropy else None
    if not grads:
        return logp, entropy, None, None, None
    gh = ys[2].reshape(-1, dim)[:n]
    gw, gb = carry  # type: ignore[misc]  # the (gw, gb) carry when grads
    return logp, entropy, gh, gw.astype(weight.dtype), None if gb is None else gb.astype(bias.dtype)


def _core_arrays(static: tuple, old_logp, advantages, mask, behavior_weights, denominator, rollout, dtype) -> tuple:
    """``(old_logp, advantages, valid, weights, rollout_logp)`` flat over tokens for the chunks' core calls."""
    args, _, xp = static
    like = jnp.zeros(old_logp.shape, dtype)
    weights = aggregation_weight(mask, like, args.spec, denominator, xp)
    if behavior_weights is not None:
        weights = weights * behavior_weights.astype(weights.dtype)
    valid = None if mask is None else (mask != 0).reshape(-1)
    adv = jnp.broadcast_to(advantages, old_logp.shape).reshape(-1)
    rollout = None if rollout is None else rollout.reshape(-1)
    return old_logp.reshape(-1), adv, valid, weights.reshape(-1), rollout


def _finish(static: tuple, logp, entropy, *arrays):
    """``(loss, metrics, logp, entropy)`` token-shaped, and the core's ``dloss/dlogp``; ``arrays`` are the
    core's from ``old_logp`` on."""
    args, _, xp = static
    shape = arrays[0].shape
    logp = logp.reshape(shape)
    loss, saved, metrics = forward(logp, *arrays, spec=args.spec, xp=xp)
    entropy = None if entropy is None else entropy.reshape(shape)
    return (loss, metrics, logp, entropy), saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(static, hidden, weight, bias, targets, *arrays):
    h2 = hidden.reshape(-1, hidden.shape[-1])
    logp, entropy, *_ = _scan(static, h2, weight, bias, targets.reshape(-1), None, grads=False)
    return _finish(static, logp, entropy, *arrays)[0]


def _fused_fwd(static, hidden, weight, bias, targets, *arrays):
    """``arrays``: ``(old_logp, advantages, mask, behavior_weights, denominator, rollout_logp)``."""
    h2 = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if two_pass(static[0].spec):
        # Pass 1: log-probs only; the core on the whole batch; pass 2: the logits again, for the gradients.
        logp, entropy, *_ = _scan(static, h2, weight, bias, targets, None, grads=False)
        out, saved = _finish(static, logp, entropy, *arrays)
        no_entropy = (static[0], False, static[2])  # the entropy came from pass 1
        _, _, gh, gw, gb = _scan(no_entropy, h2, weight, bias, targets, None, True, saved.reshape(-1))
    else:
        core = _core_arrays(static, *arrays, _logp_dtype(hidden))
        logp, entropy, gh, gw, gb = _scan(static, h2, weight, bias, targets, core, grads=True)
        out = _finish(static, logp, entropy, *arrays)[0]
    return out, (gh.reshape(hidden.shape), gw, gb)


def _fused_bwd(static, residuals, cotangents):
    gh, gw, gb = residuals
    ct = cotangents[0]  # only the loss carries a gradient; logp, entropy and the diagnostics are detached

    def scale(g):
        return None if g is None else (g * ct.astype(g.dtype)).astype(g.dtype)

    return scale(gh), scale(gw), scale(gb), None, None, None, None, None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def _to_jax(x: Any) -> Any:
    return jnp.asarray(x) if isinstance(x, (np.ndarray, np.generic)) else x


def fused_linear_loss(
    hidden: Any,
    weight: Any,
    target_ids: Any,
    old_logp: Any,
    advantages: Any,
    mask: Any = None,
    *,
    objective: str = "gipo",
    bias: Any = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    agg: str = "token-mean",
    denominator: Any = None,
    behavior_weights: Any = None,
    rollout_logp: Any = None,
    with_metrics: bool | str = True,
    with_entropy: bool = False,
    **options: Any,
) -> FusedLinearOutput:
    """A policy loss straight from hidden states and an output projection, without materialising the logits.

    Equal to ``<objective>_loss(logp, old_logp, advantages, mask, ...)`` with ``logp`` the log-softmax of
    ``(hidden @ weight.T + bias) / temperature`` gathered at ``target_ids``, computed by a ``jax.lax.scan``
    over chunks of tokens inside a ``jax.custom_vjp``: the memory it adds is one chunk's logits and the
    gradients. Works eagerly, under ``jax.jit`` and ``jax.grad`` / ``jax.value_and_grad``, and with ``weight``
    sharded along the vocabulary (the compiler partitions each chunk's matmul and log-sum-exp).

    Parameters
    ----------
    hidden : array, shape (..., time, hidden_dim)
        Last hidden states (float32, float64, bfloat16 or float16).
    weight : array, shape (vocab, hidden_dim)
        The output projection (as ``flax.linen.Dense``'s kernel transposed, or a tied embedding table).
    target_ids : integer array, shape (..., time)
        The sampled tokens, in ``[0, vocab)`` at valid positions; any value at masked positions.
    old_logp, advantages, mask, agg, denominator, behavior_weights, rollout_logp, with_metrics
        As in the array-level losses.
    objective : {'gipo', 'ppo_clip', 'sapo', 'cispo', 'no_clip'}, default 'gipo'
        The objective; its options are passed as keywords.
    bias : array, shape (vocab,), optional
        Output bias.
    temperature : float, default 1.0
        The logits are divided by it before the softmax.
    chunk_size : int, optional
        Tokens per chunk (default: 512, halved while a chunk's float32 logits exceed 256 MiB, down to 128).
    with_entropy : bool, default False
        Also return each token's entropy from the same pass.
    **options
        The objective's options and the off-policy options (``ratio_level``, ``rollout_is``,
        ``rollout_is_bounds``, ``opsm_delta``); the sequence-coupled ones take two passes over the logits, as
        in :func:`gipo_core.torch.fused_linear_loss`.

    Returns
    -------
    FusedLinearOutput
        ``(loss, metrics, logp, entropy)``; only ``loss`` carries a gradient (``logp`` and ``entropy`` are
        detached, as the diagnostics are).

    Notes
    -----
    Matmuls run in the input dtype; the log-softmax onward in float32 (float64 for float64 inputs); the
    weight and bias gradients of bfloat16 / float16 inputs accumulate in float32 over the chunks
    (``preferred_element_type``) and come back in the input dtype. Gradients reach ``hidden``, ``weight``
    and ``bias`` only; ``old_logp``, ``advantages`` and the rest get zeros.

    Raises
    ------
    TypeError, ValueError
        As :func:`gipo_core.torch.fused_linear_loss`.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from gipo_core.jax import fused_linear_loss
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> hidden = jax.random.normal(k1, (2, 5, 16)); weight = jax.random.normal(k2, (100, 16)) * 0.1
    >>> ids = jnp.zeros((2, 5), jnp.int32); old = jnp.full((2, 5), -4.6); adv = jnp.ones((2, 1))
    >>> f = lambda h, w: fused_linear_loss(h, w, ids, old, adv, sigma=1.0).loss
    >>> gh, gw = jax.jit(jax.grad(f, argnums=(0, 1)))(hidden, weight)
    >>> gh.shape, gw.shape
    ((2, 5, 16), (100, 16))
    """
    hidden, weight, target_ids, old_logp, advantages, mask, bias, behavior_weights, denominator, rollout_logp = (
        _to_jax(x)
        for x in (
            hidden, weight, target_ids, old_logp, advantages, mask, bias, behavior_weights, denominator, rollout_logp
        )
    )
    xp = array_namespace(
        hidden, weight, target_ids, old_logp, advantages, mask, bias, behavior_weights, rollout_logp, fn=_FN
    )
    from .jax import _BACKEND  # here: gipo_core.jax imports this module

    arrays, args = check_fused_args(
        _FN,
        hidden,
        weight,
        target_ids,
        old_logp,
        advantages,
        mask,
        bias,
        behavior_weights,
        denominator,
        rollout_logp,
        spec=fused_spec(_FN, objective, options, agg, with_metrics),
        temperature=temperature,
        chunk_size=chunk_size,
        backend=_BACKEND,
        xp=xp,
    )
    target_ids = readable_targets(_FN, target_ids, mask, weight.shape[0], with_entropy, xp)
    static = (args, with_entropy, xp)
    loss, metrics, logp, entropy = _fused(static, hidden, weight, bias, target_ids, *arrays[1:])
    return FusedLinearOutput(loss, metrics, logp, entropy)

