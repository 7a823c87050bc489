"""An independent high-precision reference for the core's tests, written from REFERENCE.md with mpmath.

It shares no code with gipo_core: objectives are written as the papers state them (with stop-gradients made
explicit by differentiating only the factor that carries the gradient), aggregation as verl defines it.
Everything is evaluated with 60 significant digits on the float64 inputs as given.
"""

from __future__ import annotations

import mpmath as mp
import numpy as np

mp.mp.dps = 60


def _element(objective: str, ell, a, logp, opts):
    """(loss, dloss/dlogp) of one element, as mpf."""
    rho = mp.exp(ell)
    if objective == "gipo":
        sigma = opts.get("sigma", 1.0)
        if opts.get("sigma_neg") is not None and a <= 0:
            sigma = opts["sigma_neg"]
        s = mp.mpf(sigma)
        kernel = opts.get("kernel", "gaussian")
        if kernel == "gaussian":
            w = mp.exp(-(ell**2) / (2 * s**2))
        elif kernel == "laplace":
            w = mp.exp(-abs(ell) / s)
        else:
            w = 1 / (1 + (ell / s) ** 2)
        # L = -w * rho * A with w constant: dL/dlogp = -w * rho * A (d rho / d logp = rho).
        return -w * rho * a, -w * rho * a
    if objective == "no_clip":
        return -rho * a, -rho * a
    if objective == "ppo_clip":
        lo = 1 - mp.mpf(opts.get("clip_low", 0.2))
        hi = 1 + mp.mpf(opts.get("clip_high", 0.2))
        unclipped = -a * rho
        clipped = -a * min(max(rho, lo), hi)
        loss, grad = (unclipped, -a * rho) if unclipped >= clipped else (clipped, mp.mpf(0))
        c = opts.get("dual_clip")
        if c is not None and a < 0 and -mp.mpf(c) * a < loss:
            loss, grad = -mp.mpf(c) * a, mp.mpf(0)
        return loss, grad
    if objective == "sapo":
        tau = mp.mpf(opts.get("tau_pos", 1.0) if a > 0 else opts.get("tau_neg", 1.05))
        p = 1 / (1 + mp.exp(-tau * (rho - 1)))
        return -a * 4 / tau * p, -a * 4 * p * (1 - p) * rho
    if objective == "cispo":
        w = min(rho, mp.mpf(opts.get("clip_max", 5.0)))
        if opts.get("clip_min") is not None:
            w = max(w, mp.mpf(opts["clip_min"]))
        return -w * a * logp, -w * a
    raise ValueError(objective)


def reference(objective, logp, old_logp, adv, mask=None, *, agg="token-mean", denominator=None,
              behavior_weights=None, **opts):
    """(loss, grad) as float64 numpy values from the 60-digit evaluation.

    Shapes: logp (..., T); adv same or (..., 1); mask bool/float or None.
    """
    logp = np.asarray(logp, dtype=np.float64)
    shape = logp.shape
    old = np.asarray(old_logp, dtype=np.float64)
    adv = np.broadcast_to(np.asarray(adv, dtype=np.float64), shape)
    m = np.ones(shape) if mask is None else np.asarray(mask, dtype=np.float64)
    bw = np.ones(shape) if behavior_weights is None else np.asarray(behavior_weights, dtype=np.float64)
    lp2 = logp.reshape(-1, shape[-1])
    old2, adv2, m2, bw2 = (x.reshape(-1, shape[-1]) for x in (old, adv, m, bw))
    n_rows, n_t = lp2.shape

    row_count = [mp.fsum(mp.mpf(float(v)) for v in m2[i]) for i in range(n_rows)]
    if agg == "token-mean":
        denom_all = mp.mpf(denominator) if denominator is not None else mp.fsum(row_count)
    elif agg == "seq-mean-token-sum-norm":  # verl since 2026: sequences with a valid token x the horizon
        denom_all = (mp.mpf(denominator) if denominator is not None
                     else mp.mpf(sum(1 for c in row_count if c > 0)) * n_t)
    elif agg == "token-sum":
        denom_all = mp.mpf(denominator) if denominator is not None else mp.mpf(1)
    else:
        denom_all = (mp.mpf(denominator) if denominator is not None
                     else mp.mpf(sum(1 for c in row_count if c > 0)))
    if denom_all == 0:
        denom_all = mp.mpf(1)

    total = []
    grad = np.zeros((n_rows, n_t))
    for i in range(n_rows):
        for t in range(n_t):
            mi = mp.mpf(float(m2[i, t]))
            if mi == 0:
                continue
            lp = mp.mpf(float(lp2[i, t]))
            ell = lp - mp.mpf(float(old2[i, t]))
            a = mp.mpf(float(adv2[i, t]))
            loss_el, grad_el = _element(objective, ell, a, lp, opts)
            coef = mi * mp.mpf(float(bw2[i, t])) / denom_all
            if agg == "seq-mean-token-mean":
                coef = coef / row_count[i]
            total.append(coef * loss_el)
            grad[i, t] = float(coef * grad_el)
    return float(mp.fsum(total)), grad.reshape(shape)
