"""A straightforward reference of every objective, written with a framework's differentiable ops.

Its gradient comes from the framework's plain autodiff, with the methods' stop-gradients written the obvious
way (the literal ``exp(l) * exp(-l^2 / 2 s^2)`` form is fine here: the registry's inputs are moderate and the
reference runs in float64). The suite checks each adapter's custom gradient against it.
"""

from __future__ import annotations

from typing import Any

from .drivers import Ops


def reference_loss(
    ops: Ops,
    objective: str,
    opts: dict,
    agg: str,
    logp: Any,
    old_logp: Any,
    adv: Any,
    mask: Any,
    bw: Any,
    denominator: float | None,
    rollout_logp: Any = None,
) -> Any:
    """Scalar loss; ``mask`` and ``bw`` are float arrays of ``logp``'s shape (ones when absent), inputs finite.

    The off-policy options come in ``opts``: at ``ratio_level="sequence"`` the log-ratio is GSPO-token's
    ``sg(mean_t l) + logp - sg(logp)``; the rollout correction and OPSM are stop-gradient factors.
    """
    sg = ops.stop_gradient
    opts = dict(opts)
    off = {k: opts.pop(k, None) for k in ("ratio_level", "rollout_is", "rollout_is_bounds", "opsm_delta")}
    valid = mask != 0
    zeros = 0.0 * logp
    ones = zeros + 1.0
    vm = ops.where(valid, ones, zeros)
    count = ops.sum(vm, axis=-1, keepdims=True)
    count1 = ops.where(count > 0, count, count + 1.0)

    def seq_mean(x):
        return ops.sum(ops.where(valid, x, zeros), axis=-1, keepdims=True) / count1

    ell = logp - old_logp
    token_ell = ell
    if off["ratio_level"] == "sequence":
        ell = sg(seq_mean(token_ell)) + logp - sg(logp)
    adv = adv + 0.0 * logp  # broadcast a (..., 1) advantage the explicit way
    rho = ops.exp(ell)
    pos = adv > 0
    if objective == "gipo":
        s_pos = opts.get("sigma", 1.0)
        s_neg = opts.get("sigma_neg") or s_pos
        s = ops.where(pos, ops.full_like(ell, s_pos), ops.full_like(ell, s_neg))
        kernel = opts.get("kernel", "gaussian")
        if kernel == "gaussian":
            w = ops.exp(-(ell * ell) / (2.0 * s * s))
        elif kernel == "laplace":
            w = ops.exp(-ops.abs(ell) / s)
        else:
            w = 1.0 / (1.0 + (ell / s) ** 2)
        per = -sg(w) * rho * adv
    elif objective == "ppo_clip":
        lo, hi = 1.0 - opts.get("clip_low", 0.2), 1.0 + opts.get("clip_high", 0.2)
        per = ops.maximum(-adv * rho, -adv * ops.minimum(ops.maximum(rho, ops.full_like(rho, lo)), ops.full_like(rho, hi)))
        if opts.get("dual_clip") is not None:
            per = ops.where(adv < 0, ops.minimum(per, -opts["dual_clip"] * adv), per)
    elif objective == "no_clip":
        per = -adv * rho
    elif objective == "sapo":
        tau = ops.where(pos, ops.full_like(ell, opts.get("tau_pos", 1.0)), ops.full_like(ell, opts.get("tau_neg", 1.05)))
        per = -adv * (4.0 / tau) / (1.0 + ops.exp(-tau * (rho - 1.0)))
    else:  # cispo
        u = ops.minimum(rho, ops.full_like(rho, opts.get("clip_max", 5.0)))
        if opts.get("clip_min") is not None:
            u = ops.maximum(u, ops.full_like(rho, opts["clip_min"]))
        per = -sg(u) * adv * logp
    factor = ones
    if off["rollout_is"] is not None:
        r = old_logp - rollout_logp
        mode = off["rollout_is"]
        low, high = off["rollout_is_bounds"] or {
            "token-truncate": (0.0, 2.0), "token-mask": (0.5, 5.0), "sequence-truncate": (0.0, 2.0),
            "sequence-mask": (0.5, 2.0), "geometric-mask": (0.999, 1.001)}[mode]
        if mode.startswith("token"):
            w = ops.exp(r)
        elif mode.startswith("sequence"):
            w = ops.exp(ops.sum(ops.where(valid, r, zeros), axis=-1, keepdims=True)) + zeros
        else:
            w = ops.exp(seq_mean(r)) + zeros
        if mode.endswith("truncate"):
            w = ops.maximum(ops.minimum(w, zeros + high), zeros + low)
        else:
            w = ops.where((w >= low) & (w <= high), w, zeros)
        factor = factor * w
    if off["opsm_delta"] is not None:
        behaviour = old_logp if rollout_logp is None else rollout_logp
        stat = seq_mean(behaviour - logp) + zeros
        a_seq = seq_mean(adv) + zeros
        factor = ops.where((a_seq < 0) & (stat > off["opsm_delta"]), zeros, factor)
    m = mask
    one = lambda x: ops.full_like(x, 1.0)  # noqa: E731
    n_seq_valid = ops.sum(ops.where(count > 0, count * 0.0 + 1.0, count * 0.0))
    if agg == "token-mean":
        total = ops.sum(m)
        coef = m / (denominator if denominator is not None else ops.where(total > 0, total, one(total)))
    elif agg == "token-sum":
        coef = m / (denominator if denominator is not None else 1.0)
    elif agg == "seq-mean-token-sum-norm":
        d = ops.where(n_seq_valid > 0, n_seq_valid, one(n_seq_valid)) * logp.shape[-1]
        coef = m / (denominator if denominator is not None else d)
    else:
        per_seq = ops.sum(m, axis=-1, keepdims=True)
        n_seq = ops.sum(ops.where(per_seq > 0, one(per_seq), 0.0 * per_seq))
        n_seq = denominator if denominator is not None else ops.where(n_seq > 0, n_seq, one(n_seq))
        if agg == "seq-mean-token-sum":
            coef = m / n_seq
        else:
            coef = m / (ops.where(per_seq > 0, per_seq, one(per_seq)) * n_seq)
    coef = sg(coef * bw * factor)
    return ops.sum(ops.where(valid, coef * per, 0.0 * per))
