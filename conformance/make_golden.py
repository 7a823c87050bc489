"""The conformance oracle: loss, gradient and diagnostics of every objective in arbitrary precision.

Run as a script to (re)write ``conformance/golden/golden.json``::

    python conformance/make_golden.py            # append cases whose id is new; never rewrites old ones
    python conformance/make_golden.py --check    # recompute every stored case and compare (exit 1 on drift)

Imported, it gives :func:`evaluate`, the oracle the suite also uses for its registry cases.

The math is written here from the definitions (REFERENCE.md sections 1-4), independently of ``gipo_core``:
nothing in this file imports the library. Every quantity is computed with mpmath at ``DPS`` (60) decimal
digits from the inputs *as they are in the dtype under test* (the caller rounds them first), so the only
error a correct implementation may show is its own floating-point error.

Per element ``i`` (masked elements contribute nothing, whatever value sits there)::

    l = logp - old_logp,  rho = exp(l)
    gipo      w = exp(-l^2 / (2 s^2)) (laplace exp(-|l|/s), cauchy 1/(1+(l/s)^2)), s = sigma or sigma_neg (A <= 0)
              u = w rho,          L = -A u,               g = -A u
    ppo_clip  L = max(-A rho, -A clip(rho, 1-el, 1+eh)), then min(L, -c A) where A < 0 with dual clip c
              u = rho where the unclipped term is the active one (ties: inclusive band) else 0, g = -A u
    no_clip   u = rho,            L = -A rho,             g = -A rho
    sapo      p = sigmoid(t (rho - 1)), t = tau_pos (A > 0) or tau_neg,  L = -A (4/t) p,  u = 4 p (1-p) rho
    cispo     u = clip(rho, clip_min, clip_max), L = -u A logp,  g = -A u   (clip_min None: no lower clip)

Off-policy options (read from a case's options; every factor below is a constant of the gradient):

    ratio_level="sequence"   every valid element of row i uses l_bar_i = sum_t v_it l_it / sum_t v_it (v the 0/1
                             validity) in place of its own l; the gradient per element is the per-element g
                             evaluated there (GSPO-token: d s_it / d logp_it = s_i)
    rollout_is               r = old_logp - rollout_logp per valid element; token modes use r, sequence modes
                             R_i = sum_t v_it r_it, geometric R_i / sum_t v_it; "-truncate" multiplies by
                             clip(e^x, low, high), "-mask" by e^x where low <= e^x <= high else 0
    opsm_delta               row i gets factor 0 when mean_t(A) < 0 and mean_t(log mu - logp) > delta over its
                             valid elements (mu = rollout_logp if given, else old_logp)

Aggregation: ``loss = sum_i c_i L_i`` and ``grad_i = c_i g_i`` with ``c_i = m_i b_i f_i / D_i`` (mask weight
``m``, behaviour weight ``b``, off-policy factors ``f``) and ``D_i`` per mode: token-mean ``N_tok`` (sum of m);
seq-mean-token-sum ``N_seq`` (rows with sum(m) > 0); seq-mean-token-mean ``|y_i| N_seq``;
seq-mean-token-sum-norm ``N_seq T``; token-sum 1. A ``denominator`` replaces the whole of ``D`` (for
seq-mean-token-mean, ``N_seq``). Zero denominators count as 1.

Diagnostics over valid elements (all 0 when there is none): see ``METRICS`` below.

What the suite reads besides the values
---------------------------------------
``scale``
    An error scale per quantity: the sum (or mean) of ``|part| * kappa`` over the parts that a correct
    float evaluation adds up, where ``kappa = 1 + |l| + |log w| + |t (rho - 1)|`` bounds how much a relative
    rounding of the inputs of an ``exp`` is amplified. A correct implementation in a dtype with unit
    roundoff ``eps`` is within ``C * eps * scale`` of the exact value (the suite's tolerances fix ``C``).
``overflow``
    True where a per-element intermediate that any evaluation in the work dtype must form (``u``, ``L``,
    and ``rho`` itself for No-Clip and for PPO's ``A < 0`` side without dual clip) exceeds the work dtype's
    range: the documented deviation (an inf there, a NaN where two such infs of opposite sign meet).
``grad_alt``
    Where a PPO decision (clip band, dual cap) is closer to its threshold than the work dtype can resolve,
    the gradient of the other side, which the suite accepts too; diagnostics that count such decisions are
    then marked ``ambiguous``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
from pathlib import Path
from typing import Any

import mpmath
import numpy as np

DPS = 60
GOLDEN = Path(__file__).with_name("golden") / "golden.json"

#: Diagnostic names, in the library's documented order.
METRICS = (
    "weight_mean",
    "weight_min",
    "low_weight_frac",
    "low_weight_frac_pos",
    "low_weight_frac_neg",
    "grad_mult_mean",
    "grad_mult_max",
    "ess",
    "ratio_mean",
    "ratio_max",
    "log_ratio_abs_mean",
    "log_ratio_abs_max",
    "kl_k1",
    "kl_k3",
    "ppo_clip_frac",
    "ppo_clip_frac_lower",
    "n_valid",
)
#: Diagnostics added by option (names and order as the library documents them).
SEQUENCE_METRICS = ("seq_ratio_max", "seq_ratio_min")
ROLLOUT_METRICS = (
    "rollout_weight_mean",
    "rollout_weight_max",
    "rollout_ess",
    "rollout_masked_token_frac",
    "rollout_masked_seq_frac",
)
OPSM_METRICS = ("opsm_masked_token_frac", "opsm_masked_seq_frac")
#: The off-policy options: keyword arguments of every loss, read here from a case's ``options``.
OFFPOLICY_OPTIONS = ("ratio_level", "rollout_is", "rollout_is_bounds", "opsm_delta")
#: ``rollout_is_bounds`` when none are given, per mode: (low, high) on the weight (verl's presets: TIS cap 2,
#: IcePop band (0.5, 5), sequence rejection band (0.5, 2), geometric band (0.999, 1.001)).
ROLLOUT_DEFAULT_BOUNDS = {
    "token-truncate": (0.0, 2.0),
    "token-mask": (0.5, 5.0),
    "sequence-truncate": (0.0, 2.0),
    "sequence-mask": (0.5, 2.0),
    "geometric-mask": (0.999, 1.001),
}
#: Golden ids whose stored answer follows a convention the library no longer has, with the id of the case
#: that replaces each (the data stays append-only: the old entries are kept, not compared, and named here).
SUPERSEDED = {
    "gipo-batch-seq-mean-token-sum-norm-boolmask-nan": (
        "gipo-batch-seq-mean-token-sum-norm-boolmask-nan-v2",
        "seq-mean-token-sum-norm divides by N_seq * T (verl's agg_loss since 2026), no longer by T alone",
    ),
    "ppo-asym-ties": (
        "ppo-asym-ties-v2",
        "ppo_clip_frac of ppo_clip_loss is measured at the loss's own clip_low / clip_high, no longer at 0.2",
    ),
    "gipo-batch-seq-mean-token-sum-norm-floatmask-bw-denom": (
        "gipo-batch-seq-mean-token-sum-norm-floatmask-bw-denom-v2",
        "the denominator of seq-mean-token-sum-norm is the whole N_seq * T (the stored case passed 7 as T)",
    ),
}
#: Diagnostics that count threshold decisions (exact only where no decision is ambiguous).
COUNTING = ("low_weight_frac", "low_weight_frac_pos", "low_weight_frac_neg", "ppo_clip_frac")

#: Unit roundoff and largest finite value of each dtype; the work dtype of float16/bfloat16/float32 is float32.
EPS = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}
MAX = {
    "float16": 65504.0,
    "bfloat16": float(np.float32(3.3895313892515355e38)),
    "float32": float(np.finfo(np.float32).max),
    "float64": float(np.finfo(np.float64).max),
}
DTYPES = ("float16", "bfloat16", "float32", "float64")
#: Smallest positive normal (work dtypes) and subnormal (output dtypes) values.
TINY_NORMAL = {"float32": 2.0**-126, "float64": 2.0**-1022}
TINY_SUB = {"float16": 2.0**-24, "bfloat16": 2.0**-133, "float32": 2.0**-149, "float64": 2.0**-1074}
#: Error constant: a correct evaluation is within C * eps(work) * scale of the exact value (32 covers the
#: handful of roundings per element, the pairwise or sequential sums over the small golden arrays and
#: exp's last-bit error, amplified by kappa, which is in the scale).
C_WORK = 32


def work_dtype(dtype: str) -> str:
    return "float64" if dtype == "float64" else "float32"


#: Per-dtype tolerances (stored in the golden JSON with the data they were made for). For inputs of dtype d:
#: |got - exact| <= rtol_work * scale + eps_out * |exact| + tiny_work for the loss and diagnostics (returned in
#: the work dtype), and with eps_grad, tiny_work + tiny_grad for the gradient (returned in d).
TOLERANCES = {
    d: {
        "work": work_dtype(d),
        "rtol_work": C_WORK * EPS[work_dtype(d)],
        "eps_out": EPS[work_dtype(d)],
        "eps_grad": EPS[d],
        "tiny_work": TINY_NORMAL[work_dtype(d)],
        "tiny_grad": TINY_SUB[d],
    }
    for d in DTYPES
}


# ------------------------------------------------------------------------------------------ per element


def _element(objective: str, opts: dict, ell: Any, adv: Any, logp: Any, work: str) -> dict:
    """Exact per-element quantities (mpf) for one valid element."""
    mp = mpmath.mp
    rho = mp.exp(ell)
    pos = adv > 0
    ambiguous = False
    alt_u = None
    z = mp.mpf(0)
    delta = 64 * EPS[work]  # decisions closer than this (relative) to a threshold are ambiguous in `work`
    if objective == "gipo":
        s = mp.mpf(opts.get("sigma", 1.0))
        if opts.get("sigma_neg") is not None and not pos:
            s = mp.mpf(opts["sigma_neg"])
        kernel = opts.get("kernel", "gaussian")
        if kernel == "gaussian":
            log_w = -(ell * ell) / (2 * s * s)
        elif kernel == "laplace":
            log_w = -abs(ell) / s
        else:
            log_w = -mp.log1p((ell / s) ** 2)
        w = mp.exp(log_w)
        u = mp.exp(ell + log_w)
        loss = -adv * u
    elif objective == "ppo_clip":
        lo = 1 - mp.mpf(opts.get("clip_low", 0.2))
        hi = 1 + mp.mpf(opts.get("clip_high", 0.2))
        unclipped = -adv * rho
        clipped = -adv * min(max(rho, lo), hi)
        active = unclipped >= clipped
        loss = unclipped if active else clipped
        if adv != 0 and (abs(rho / lo - 1) < delta or abs(rho / hi - 1) < delta):
            ambiguous = True
        dual = opts.get("dual_clip")
        if dual is not None and adv < 0:
            cap = -mp.mpf(dual) * adv
            if abs(cap / loss - 1) < delta:
                ambiguous = True
            if cap < loss:
                loss = cap
                active = False
        w = mp.mpf(1) if active else mp.mpf(0)
        u = rho if active else mp.mpf(0)
        if ambiguous:
            alt_u = mp.mpf(0) if active else rho
        log_w = mp.mpf(0)
    elif objective == "no_clip":
        w, u, loss, log_w = mp.mpf(1), rho, -adv * rho, mp.mpf(0)
    elif objective == "sapo":
        t = mp.mpf(opts.get("tau_pos", 1.0) if pos else opts.get("tau_neg", 1.05))
        z = t * mp.expm1(ell)
        p = 1 / (1 + mp.exp(-z))
        w = 4 * p * (1 - p)
        log_w = mp.log(w) if w > 0 else -abs(z)
        u = w * rho
        loss = -adv * (4 / t) * p
    elif objective == "cispo":
        c = mp.mpf(opts.get("clip_max", 5.0))
        u = min(rho, c)
        if opts.get("clip_min") is not None:
            u = max(u, mp.mpf(opts["clip_min"]))
        w = u / rho if rho > 0 else mp.mpf(1)
        log_w = mp.mpf(0)
        loss = -u * adv * logp
    else:
        raise ValueError(f"unknown objective {objective!r}")
    grad = -adv * u
    grad_alt = None if alt_u is None else -adv * alt_u
    kappa = 1 + abs(ell) + abs(log_w) + abs(z)
    # Intermediates an evaluation in the work dtype has to form.
    inter_loss = [loss, u]
    if objective == "no_clip" or (objective == "ppo_clip" and adv < 0 and opts.get("dual_clip") is None):
        inter_loss.append(rho)
    return dict(
        rho=rho, w=w, u=u, loss=loss, grad=grad, grad_alt=grad_alt, kappa=kappa, ambiguous=ambiguous,
        inter_loss=inter_loss, ell=ell, adv=adv,
        near_half=abs(w / mp.mpf(0.5) - 1) < delta * kappa,
        near_clip=any(abs(rho / b - 1) < delta * kappa for b in _clip_band(objective, opts)),
    )


# ------------------------------------------------------------------------------------------ aggregation


def _coefficients(mw: np.ndarray, bw: np.ndarray, agg: str, denominator: float | None) -> np.ndarray:
    """Per-element aggregation weights ``c`` (object array of mpf) for mask weights ``mw``."""
    mp = mpmath.mp
    shape = mw.shape
    guard = lambda d: d if d != 0 else mp.mpf(1)  # noqa: E731
    rows = mw.reshape(-1, shape[-1])
    if agg == "token-mean":
        d = mp.mpf(denominator) if denominator is not None else mp.fsum(mw.ravel())
        c = mw / guard(d)
    elif agg == "token-sum":
        c = mw / guard(mp.mpf(denominator)) if denominator is not None else mw
    elif agg == "seq-mean-token-sum-norm":
        n_seq = sum(1 for r in rows if mp.fsum(r) > 0)
        d = mp.mpf(denominator) if denominator is not None else mp.mpf(n_seq) * shape[-1]
        c = mw / guard(d)
    else:
        per_seq = [mp.fsum(r) for r in rows]
        n_seq = mp.mpf(denominator) if denominator is not None else mp.mpf(sum(1 for s in per_seq if s > 0))
        c = np.empty(rows.shape, dtype=object)
        for i, r in enumerate(rows):
            for j, m in enumerate(r):
                if agg == "seq-mean-token-sum":
                    c[i, j] = m / guard(n_seq)
                else:
                    c[i, j] = m / (guard(per_seq[i]) * guard(n_seq))
        c = c.reshape(shape)
    return c * bw


# ------------------------------------------------------------------------------------------ the oracle


def _mp_array(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape, dtype=object)
    for idx, v in np.ndenumerate(x):
        out[idx] = mpmath.mpf(float(v))
    return out


def evaluate(
    objective: str,
    options: dict,
    agg: str,
    logp: np.ndarray,
    old_logp: np.ndarray,
    advantages: np.ndarray,
    mask: np.ndarray | None = None,
    behavior_weights: np.ndarray | None = None,
    denominator: float | None = None,
    work: str = "float64",
    rollout_logp: np.ndarray | None = None,
) -> dict:
    """Exact loss, gradient, diagnostics and error scales for float64-valued inputs.

    Parameters
    ----------
    objective : {'gipo', 'ppo_clip', 'no_clip', 'sapo', 'cispo'}
    options : dict
        The objective's options (missing ones take the documented defaults), and the off-policy options
        ``ratio_level``, ``rollout_is``, ``rollout_is_bounds``, ``opsm_delta``.
    agg : str
        Aggregation mode.
    logp, old_logp : ndarray of float64, shape (..., T)
        The inputs, already rounded to the dtype under test.
    advantages : ndarray of float64, shape (..., T) or (..., 1)
    mask : ndarray of bool or float64, shape (..., T), optional
    behavior_weights : ndarray of float64, shape (..., T), optional
    denominator : float, optional
    work : {'float32', 'float64'}
        The dtype the implementation computes in (decides overflow and ambiguity flags).
    rollout_logp : ndarray of float64, shape (..., T), optional
        Log-probabilities of the policy that generated the samples.

    Returns
    -------
    dict
        ``loss`` (float), ``grad`` and ``grad_alt`` (ndarrays of float64, ``grad_alt`` NaN where no
        alternative), ``metrics`` (dict of float), ``scale`` (dict of float per quantity: ``loss``,
        ``grad`` (an array), each metric), ``overflow`` (dict of bool per quantity), ``ambiguous``
        (set of metric names). Values are the exact ones rounded to float64 (inf beyond its range).

    Raises
    ------
    ValueError
        A rollout or OPSM decision closer to its threshold than the work dtype resolves (choose other inputs).
    """
    with mpmath.workdps(DPS):
        return _evaluate(objective, dict(options), agg, logp, old_logp, advantages, mask, behavior_weights,
                         denominator, work, rollout_logp)


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)


def _offpolicy_factors(off: dict, ells: np.ndarray, rs: np.ndarray | None, advs: np.ndarray, valid: np.ndarray,
                       work: str) -> dict:
    """Per row (shape (rows, T) object arrays of mpf): the effective log-ratio, the rollout factor and its
    keep decision, the OPSM keep decision, and the log-weight magnitudes that enter the error scale."""
    mp = mpmath.mp
    n_rows, T = ells.shape
    delta = 64 * EPS[work]
    eff = ells.copy()
    roll = np.full((n_rows, T), mp.mpf(1), dtype=object)
    roll_keep = np.ones((n_rows, T), dtype=bool)
    opsm_keep = np.ones((n_rows, T), dtype=bool)
    kappa_extra = np.full((n_rows, T), mp.mpf(0), dtype=object)
    roll_kappa = np.full((n_rows, T), mp.mpf(1), dtype=object)
    seq_lbar = []
    mode = off.get("rollout_is")
    low, high = (off.get("rollout_is_bounds") or ROLLOUT_DEFAULT_BOUNDS.get(mode, (0.0, 0.0)))
    log_low = -mp.inf if low == 0 else mp.log(mp.mpf(low))
    log_high = mp.log(mp.mpf(high)) if mode is not None else mp.inf

    def near(x, threshold):
        return mp.isfinite(threshold) and abs(x - threshold) <= delta * (1 + abs(threshold))

    for i in range(n_rows):
        v = valid[i]
        n = int(np.sum(v))
        lsum = mp.fsum(ells[i][v]) if n else mp.mpf(0)
        lbar = lsum / n if n else mp.mpf(0)
        if n:
            seq_lbar.append(lbar)
        if off.get("ratio_level") == "sequence":
            eff[i, :] = lbar
            kappa_extra[i, :] += mp.fsum(abs(x) for x in ells[i][v]) / max(n, 1)
        if mode is None and rs is not None:  # no correction: the raw token weight, for the diagnostics only
            for t in range(T):
                if v[t]:
                    roll[i, t] = mp.exp(rs[i][t])
                    roll_kappa[i, t] += abs(rs[i][t])
        if mode is not None:
            r_row = rs[i]
            for t in range(T):
                if not v[t]:
                    continue
                if mode.startswith("token"):
                    x, mag = r_row[t], abs(r_row[t])
                elif mode.startswith("sequence"):
                    x = mp.fsum(r_row[v])
                    mag = mp.fsum(abs(y) for y in r_row[v])
                else:
                    x = mp.fsum(r_row[v]) / n
                    mag = mp.fsum(abs(y) for y in r_row[v]) / n
                if mode.endswith("truncate"):  # continuous at the bounds: no decision to resolve
                    roll[i, t] = mp.exp(min(max(x, log_low), log_high))
                else:
                    if near(x, log_high) or near(x, log_low):
                        raise ValueError(f"a rollout mask decision is within {delta:g} of its threshold (row {i})")
                    keep = log_low <= x <= log_high
                    roll_keep[i, t] = keep
                    roll[i, t] = mp.exp(x) if keep else mp.mpf(0)
                kappa_extra[i, t] += mag
                roll_kappa[i, t] += mag
        if off.get("opsm_delta") is not None and n:
            behaviour_gap = [-(ells[i][t] + (rs[i][t] if rs is not None else 0)) for t in range(T) if v[t]]
            stat = mp.fsum(behaviour_gap) / n
            a_seq = mp.fsum(advs[i][v]) / n
            d = mp.mpf(off["opsm_delta"])
            if near(stat, d):
                raise ValueError(f"an OPSM decision is within {delta:g} of its threshold (row {i})")
            if a_seq < 0 and stat > d:
                opsm_keep[i, :] = False
    return dict(eff=eff, roll=roll, roll_keep=roll_keep, opsm_keep=opsm_keep, kappa_extra=kappa_extra,
                roll_kappa=roll_kappa, seq_lbar=seq_lbar)


def _evaluate(objective, options, agg, logp, old_logp, advantages, mask, behavior_weights, denominator, work,
              rollout_logp):
    mp = mpmath.mp
    off = {k: options.pop(k) for k in OFFPOLICY_OPTIONS if k in options}
    shape = logp.shape
    adv_full = np.broadcast_to(advantages, shape)
    if mask is None:
        valid = np.ones(shape, dtype=bool)
        mw = np.ones(shape)
    else:
        valid = mask != 0
        mw = mask.astype(np.float64)
    bw = np.ones(shape) if behavior_weights is None else np.where(valid, behavior_weights, 0.0)
    c = _coefficients(_mp_array(mw), _mp_array(bw), agg, denominator)
    # Per-element exact inputs (0 at invalid elements, never read there).
    ells = np.empty(shape, dtype=object)
    advs = np.empty(shape, dtype=object)
    rs = None if rollout_logp is None else np.empty(shape, dtype=object)
    for idx in np.ndindex(*shape):
        ok = bool(valid[idx])
        ells[idx] = mp.mpf(float(logp[idx])) - mp.mpf(float(old_logp[idx])) if ok else mp.mpf(0)
        advs[idx] = mp.mpf(float(adv_full[idx])) if ok else mp.mpf(0)
        if rs is not None:
            rs[idx] = mp.mpf(float(old_logp[idx])) - mp.mpf(float(rollout_logp[idx])) if ok else mp.mpf(0)
    fac = _offpolicy_factors(off, _rows(ells), None if rs is None else _rows(rs), _rows(advs), _rows(valid), work)
    row_shape = shape if len(shape) else (1, 1)
    eff = fac["eff"].reshape(row_shape)
    roll = fac["roll"].reshape(row_shape)
    opsm_keep = fac["opsm_keep"].reshape(row_shape)
    kextra = fac["kappa_extra"].reshape(row_shape)
    work_max = MAX[work]
    zero = mp.mpf(0)
    loss = zero
    loss_scale = zero
    grad = np.zeros(shape)
    grad_alt = np.full(shape, np.nan)
    grad_scale = np.zeros(shape)
    overflow = {"loss": False, "grad": False}
    elems = []
    for idx in np.ndindex(*shape):
        if not valid[idx]:
            continue
        e = _element(objective, options, eff[idx], advs[idx], mp.mpf(float(logp[idx])), work)
        e["ell_tok"] = ells[idx]
        e["roll"] = roll[idx]
        e["kappa"] += kextra[idx]
        elems.append(e)
        ci = c[idx] * (roll[idx] if off.get("rollout_is") is not None else 1) * (1 if opsm_keep[idx] else 0)
        loss += ci * e["loss"]
        loss_scale += abs(ci * e["loss"]) * e["kappa"]
        g = ci * e["grad"]
        grad[idx] = _to_float(g)
        grad_scale[idx] = _to_float(abs(g) * e["kappa"])
        if e["grad_alt"] is not None:
            grad_alt[idx] = _to_float(ci * e["grad_alt"])
        if ci != 0:
            overflow["loss"] |= any(abs(x) > work_max for x in e["inter_loss"])
            overflow["grad"] |= abs(e["u"]) > work_max or abs(e["grad"]) > work_max
    metrics, mscale, moverflow, ambiguous = _diagnostics(elems, work, objective, options)
    overflow.update(moverflow)
    if objective == "ppo_clip":
        if any(e["ambiguous"] for e in elems):
            ambiguous |= {"weight_mean", "weight_min", "grad_mult_mean", "grad_mult_max", "ess", *COUNTING[:3]}
    extra = _offpolicy_diagnostics(off, fac, _rows(valid), rs is not None, work)
    for name, (value, sc, ov) in extra.items():
        metrics[name], mscale[name], overflow[name] = value, sc, ov
    return dict(
        loss=_to_float(loss),
        grad=grad,
        grad_alt=grad_alt,
        metrics=metrics,
        scale={"loss": _to_float(loss_scale), "grad": grad_scale, **mscale},
        overflow=overflow,
        ambiguous=ambiguous,
    )


def metric_names(objective: str, options: dict, rollout: bool) -> tuple:
    """The diagnostics a call returns, in the documented order."""
    names = METRICS
    if options.get("ratio_level") == "sequence":
        names += SEQUENCE_METRICS
    if rollout:
        names += ROLLOUT_METRICS
    if options.get("opsm_delta") is not None:
        names += OPSM_METRICS
    return names


def _offpolicy_diagnostics(off: dict, fac: dict, valid: np.ndarray, rollout: bool, work: str) -> dict:
    """name -> (value, scale, overflow) of the diagnostics the off-policy options add."""
    mp = mpmath.mp
    out: dict = {}
    n = int(np.sum(valid))
    rows_with = [bool(np.any(v)) for v in valid]
    n_rows = sum(rows_with)
    work_max = MAX[work]

    def fracs(keep: np.ndarray) -> tuple:
        tok = sum(1 for i, j in zip(*np.nonzero(valid)) if not keep[i, j])
        seq = sum(1 for i, v in enumerate(valid) if rows_with[i] and not np.all(keep[i][v]))
        return (tok / n if n else 0.0), (seq / n_rows if n_rows else 0.0)

    if off.get("ratio_level") == "sequence":
        lb = fac["seq_lbar"]
        for name, pick in (("seq_ratio_max", max), ("seq_ratio_min", min)):
            v = mp.exp(pick(lb)) if lb else mp.mpf(0)
            out[name] = (_to_float(v), _to_float(abs(v) * (1 + max((abs(x) for x in lb), default=0))),
                         bool(v > work_max))
    if rollout:
        ws = [fac["roll"][i, j] for i, j in zip(*np.nonzero(valid))]
        kap = [fac["roll_kappa"][i, j] for i, j in zip(*np.nonzero(valid))]
        if n:
            mean = mp.fsum(ws) / n
            wmax = max(ws)
            s2 = mp.fsum(w * w for w in ws)
            ess = mp.fsum(ws) ** 2 / (n * s2) if s2 != 0 else mp.mpf(0)
            scale_mean = mp.fsum(abs(w) * k for w, k in zip(ws, kap)) / n
            scale_max = max(abs(w) * k for w, k in zip(ws, kap))
        else:
            mean = wmax = ess = scale_mean = scale_max = mp.mpf(0)
        ov = any(w > work_max for w in ws)
        out["rollout_weight_mean"] = (_to_float(mean), _to_float(scale_mean), ov)
        out["rollout_weight_max"] = (_to_float(wmax), _to_float(scale_max), ov)
        out["rollout_ess"] = (_to_float(ess), _to_float(max(kap, default=mp.mpf(1))), ov)
        tok, seq = fracs(fac["roll_keep"])
        out["rollout_masked_token_frac"] = (tok, tok, False)
        out["rollout_masked_seq_frac"] = (seq, seq, False)
    if off.get("opsm_delta") is not None:
        tok, seq = fracs(fac["opsm_keep"])
        out["opsm_masked_token_frac"] = (tok, tok, False)
        out["opsm_masked_seq_frac"] = (seq, seq, False)
    return out


def _diagnostics(elems: list, work: str, objective: str = "", options: dict | None = None) -> tuple[dict, dict, dict, set]:
    mp = mpmath.mp
    options = options or {}
    n = len(elems)
    metrics: dict = {}
    scale: dict = {}
    overflow: dict = {}
    work_max = MAX[work]
    base = METRICS
    names_zero = {k: 0.0 for k in base}
    if n == 0:
        return names_zero, dict(names_zero), {k: False for k in base}, set()

    def put(name: str, value: Any, parts: list, kappas: list, how: str) -> None:
        metrics[name] = _to_float(value)
        mags = [abs(p) * k for p, k in zip(parts, kappas)]
        scale[name] = _to_float(mp.fsum(mags) / n if how == "mean" else max(mags))
        overflow[name] = any(abs(p) > work_max for p in parts)

    kap = [e["kappa"] for e in elems]
    ws = [e["w"] for e in elems]
    us = [e["u"] for e in elems]
    rhos = [e["rho"] for e in elems]
    ells = [e["ell_tok"] for e in elems]
    advs = [e["adv"] for e in elems]
    put("weight_mean", mp.fsum(ws) / n, ws, kap, "mean")
    put("weight_min", min(ws), ws, kap, "max")
    low = [w < mp.mpf(0.5) for w in ws]
    metrics["low_weight_frac"] = sum(low) / n
    metrics["low_weight_frac_pos"] = sum(l_ and a > 0 for l_, a in zip(low, advs)) / n
    metrics["low_weight_frac_neg"] = sum(l_ and a <= 0 for l_, a in zip(low, advs)) / n
    put("grad_mult_mean", mp.fsum(us) / n, us, kap, "mean")
    put("grad_mult_max", max(us), us, kap, "max")
    su2 = mp.fsum(u * u for u in us)
    metrics["ess"] = _to_float(mp.fsum(us) ** 2 / (n * su2)) if su2 != 0 else 0.0
    scale["ess"] = _to_float(max(kap))
    overflow["ess"] = any(u > work_max for u in us)  # where u overflows, implementations differ (documented)
    put("ratio_mean", mp.fsum(rhos) / n, rhos, kap, "mean")
    put("ratio_max", max(rhos), rhos, kap, "max")
    abs_l = [abs(x) for x in ells]
    put("log_ratio_abs_mean", mp.fsum(abs_l) / n, abs_l, kap, "mean")
    put("log_ratio_abs_max", max(abs_l), abs_l, kap, "max")
    put("kl_k1", -mp.fsum(ells) / n, ells, kap, "mean")
    em1 = [mp.expm1(-x) for x in ells]
    metrics["kl_k3"] = _to_float(mp.fsum(a + b for a, b in zip(em1, ells)) / n)
    scale["kl_k3"] = _to_float(mp.fsum((abs(a) + abs(b)) * k for a, b, k in zip(em1, ells, kap)) / n)
    overflow["kl_k3"] = any(abs(a) > work_max for a in em1)
    hi, lo = _clip_band(objective, options)
    metrics["ppo_clip_frac"] = sum((r > hi and a > 0) or (r < lo and a < 0) for r, a in zip(rhos, advs)) / n
    dual = mp.mpf(_dual_clip(objective, options))
    metrics["ppo_clip_frac_lower"] = sum(a < 0 and r > dual for r, a in zip(rhos, advs)) / n
    counting = COUNTING + ("ppo_clip_frac_lower",)
    metrics["n_valid"] = float(n)
    for name in counting + ("n_valid",):
        scale[name] = abs(metrics[name])  # count / n: a couple of roundings
        overflow[name] = False
    ambiguous = set()
    if any(e["near_half"] for e in elems):
        ambiguous |= {"low_weight_frac", "low_weight_frac_pos", "low_weight_frac_neg"}
    if any(e["near_clip"] for e in elems):
        ambiguous.add("ppo_clip_frac")
    d = mp.mpf(_dual_clip(objective, options))
    if any(abs(e["rho"] / d - 1) < 64 * EPS[work] * e["kappa"] for e in elems):
        ambiguous.add("ppo_clip_frac_lower")
    return {k: float(metrics[k]) for k in base}, scale, overflow, ambiguous


def _dual_clip(objective: str, options: dict) -> float:
    """The c of ``ppo_clip_frac_lower`` (A < 0 with rho > c): PPO-clip's own dual clip, else 3 (verl's default)."""
    if objective == "ppo_clip" and options.get("dual_clip") is not None:
        return float(options["dual_clip"])
    return 3.0


def _clip_band(objective: str, options: dict) -> tuple:
    """(1 + eps_high, 1 - eps_low) of ``ppo_clip_frac``: the loss's own band for PPO-clip, else eps = 0.2."""
    mp = mpmath.mp
    if objective == "ppo_clip":
        return 1 + mp.mpf(options.get("clip_high", 0.2)), 1 - mp.mpf(options.get("clip_low", 0.2))
    return mp.mpf(1.2), mp.mpf(0.8)


def _to_float(x: Any) -> float:
    """Round an mpf to float64 (inf beyond its range)."""
    if mpmath.isinf(x) or mpmath.isnan(x):
        return float(x)
    if abs(x) > mpmath.mpf(MAX["float64"]):
        return math.copysign(math.inf, float(mpmath.sign(x)))
    return float(x)


# ------------------------------------------------------------------------------------------ rounding


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` (round to nearest even) and returned as float64 (exactly representable).

    bfloat16 is rounded from float32 by bit arithmetic, so no bfloat16 library is needed.
    """
    x = np.asarray(x, dtype=np.float64)
    if dtype == "float64":
        return x.copy()
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float64)
    x32 = x.astype(np.float32)
    if dtype == "float32":
        return x32.astype(np.float64)
    bits = x32.view(np.uint32).astype(np.uint64)
    finite = np.isfinite(x32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    out = np.where(finite, rounded, bits).astype(np.uint32).view(np.float32)
    return out.astype(np.float64)


# ------------------------------------------------------------------------------------------ golden cases


def _ladder() -> list[float]:
    """Log-ratios in the hard regions: |l| near 0, 1e-4, sigma^2 (1, 0.25, 4), 11, 89, 710, 1e4."""
    core = [0.0, 1e-8, -1e-8, 1e-4, -1e-4, 0.25, 1.0, -1.0, 4.0, 11.0, -11.0, 88.5, -88.5, 89.0, -89.0]
    return core + [709.5, 710.0, -710.0, 1e4, -1e4]


def _ladder_inputs(seed: int, ells: list[float], adv_pattern: str = "mixed") -> dict:
    rng = np.random.default_rng(seed)
    n = len(ells)
    logp = -rng.uniform(0.05, 2.0, n)
    old = logp - np.array(ells)
    if adv_pattern == "mixed":
        adv = np.where(np.arange(n) % 2 == 0, 1.0, -1.0) * rng.uniform(0.5, 1.5, n)
    elif adv_pattern == "pos":
        adv = rng.uniform(0.5, 1.5, n)
    else:
        adv = -rng.uniform(0.5, 1.5, n)
    return {"logp": logp, "old_logp": old, "advantages": adv}


def _ties(seed: int, boundaries: list[float], adv_signs: list[float]) -> dict:
    """Ratios next to (never on) clip boundaries: rho = b (1 +- 1e-9), b (1 +- 1e-6), b (1 +- 1e-3)."""
    rng = np.random.default_rng(seed)
    ells = []
    advs = []
    for b in boundaries:
        for rel in (1e-9, 1e-6, 1e-3):
            for sgn in (1.0, -1.0):
                for a in adv_signs:
                    ells.append(math.log(b) + math.log1p(sgn * rel))
                    advs.append(a * rng.uniform(0.5, 1.5))
    n = len(ells)
    logp = -rng.uniform(0.05, 0.5, n)
    return {"logp": logp, "old_logp": logp - np.array(ells), "advantages": np.array(advs)}


def _batch_inputs(seed: int, shape: tuple, per_sequence: bool = False, scale: float = 0.5) -> dict:
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.05, 3.0, shape)
    old = logp - rng.normal(0.0, scale, shape)
    adv_shape = shape[:-1] + (1,) if per_sequence else shape
    return {"logp": logp, "old_logp": old, "advantages": rng.normal(0.0, 1.0, adv_shape)}


def golden_cases() -> list[dict]:
    """The fixed, seeded golden cases (ids are permanent: the data is append-only)."""
    cases = []

    def add(cid: str, objective: str, options: dict, inputs: dict, agg: str = "token-mean", **extra: Any) -> None:
        cases.append(dict(id=cid, objective=objective, options=options, agg=agg, inputs=inputs, **extra))

    ladder = _ladder()
    small = [x for x in ladder if abs(x) <= 11.0]
    for sigma in (0.05, 0.5, 1.0, 2.0, 10.0):
        add(f"gipo-gaussian-s{sigma:g}-ladder", "gipo", {"sigma": sigma}, _ladder_inputs(10, ladder))
    add("gipo-gaussian-s30-ladder", "gipo", {"sigma": 30.0}, _ladder_inputs(11, ladder, "pos"))
    add("gipo-gaussian-s100-ladder", "gipo", {"sigma": 100.0}, _ladder_inputs(12, ladder, "pos"))
    add("gipo-gaussian-s1-sneg0.5-ladder", "gipo", {"sigma": 1.0, "sigma_neg": 0.5}, _ladder_inputs(13, ladder))
    add("gipo-gaussian-s0.3-sneg2-ladder", "gipo", {"sigma": 0.3, "sigma_neg": 2.0}, _ladder_inputs(14, ladder))
    for kernel in ("laplace", "cauchy"):
        for sigma in (0.1, 1.0, 5.0):
            add(f"gipo-{kernel}-s{sigma:g}-ladder", "gipo", {"sigma": sigma, "kernel": kernel},
                _ladder_inputs(15, ladder if sigma < 5 else small + [88.5, -88.5, -1e4]))
    add("gipo-laplace-s1-sneg0.5-ladder", "gipo", {"sigma": 1.0, "sigma_neg": 0.5, "kernel": "laplace"},
        _ladder_inputs(16, ladder))
    add("ppo-ties", "ppo_clip", {}, _ties(20, [0.8, 1.2], [1.0, -1.0]))
    add("ppo-asym-ties", "ppo_clip", {"clip_low": 0.1, "clip_high": 0.28}, _ties(21, [0.9, 1.28], [1.0, -1.0]))
    add("ppo-dual-ties", "ppo_clip", {"dual_clip": 3.0}, _ties(22, [0.8, 1.2, 3.0], [-1.0]))
    add("ppo-pos-ladder", "ppo_clip", {}, _ladder_inputs(23, ladder, "pos"))
    add("ppo-dual-ladder", "ppo_clip", {"dual_clip": 3.0}, _ladder_inputs(24, ladder))
    add("ppo-small-ladder", "ppo_clip", {}, _ladder_inputs(25, small))
    add("no_clip-small-ladder", "no_clip", {}, _ladder_inputs(30, small + [80.0, -1e4]))
    add("sapo-ladder", "sapo", {}, _ladder_inputs(40, ladder))
    add("sapo-tau2-ladder", "sapo", {"tau_pos": 1.0, "tau_neg": 2.0}, _ladder_inputs(41, ladder))
    add("cispo-ladder", "cispo", {}, _ladder_inputs(50, ladder))
    add("cispo-clip2-ties", "cispo", {"clip_max": 2.0}, _ties(51, [2.0], [1.0, -1.0]))
    # Aggregation, masks, weights and denominators on a (4, 6) batch with hard log-ratios in it.
    rng = np.random.default_rng(60)
    batch = _batch_inputs(60, (4, 6))
    batch["old_logp"][0, :4] = batch["logp"][0, :4] - np.array([1e-4, 11.0, 89.0, -89.0])
    mask = rng.uniform(size=(4, 6)) < 0.7
    mask[2] = False  # an all-masked row
    mask[0, :4] = True
    planted = {k: v.copy() for k, v in batch.items()}
    planted["logp"][~mask] = np.nan
    planted["old_logp"][1, ~mask[1]] = np.inf
    planted["advantages"][3, ~mask[3]] = -np.inf
    bw = rng.uniform(0.5, 1.5, (4, 6))
    fmask = np.where(mask, rng.uniform(0.25, 1.0, (4, 6)), 0.0)
    for agg in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        add(f"gipo-batch-{agg}-boolmask-nan", "gipo", {"sigma": 1.0, "sigma_neg": 0.5},
            dict(planted, mask=mask), agg=agg)
        add(f"gipo-batch-{agg}-floatmask-bw-denom", "gipo", {"sigma": 0.5},
            dict(batch, mask=fmask, behavior_weights=bw), agg=agg, denominator=7.0)
    seq = _batch_inputs(61, (3, 5), per_sequence=True)
    for objective, opts in (("ppo_clip", {"dual_clip": 3.0}), ("sapo", {}), ("cispo", {}), ("no_clip", {})):
        add(f"{objective}-perseq-seq-mean-token-mean", objective, opts, seq, agg="seq-mean-token-mean")
    empty = {k: np.zeros((2, 3)) for k in ("logp", "old_logp", "advantages")}
    empty["logp"][:] = np.nan
    for objective in ("gipo", "ppo_clip", "no_clip", "sapo", "cispo"):
        add(f"{objective}-all-masked", objective, {}, dict(empty, mask=np.zeros((2, 3), dtype=bool)))
    _offpolicy_cases(add, planted, batch, mask, fmask, bw)
    return cases


def _offpolicy_cases(add: Any, planted: dict, batch: dict, mask: np.ndarray, fmask: np.ndarray, bw: np.ndarray) -> None:
    """Golden cases of the off-policy options and of the 2026 aggregation conventions (appended later)."""
    # Replacements of superseded entries (see SUPERSEDED), then token-sum.
    add("gipo-batch-seq-mean-token-sum-norm-boolmask-nan-v2", "gipo", {"sigma": 1.0, "sigma_neg": 0.5},
        dict(planted, mask=mask), agg="seq-mean-token-sum-norm")
    add("gipo-batch-seq-mean-token-sum-norm-floatmask-bw-denom-v2", "gipo", {"sigma": 0.5},
        dict(batch, mask=fmask, behavior_weights=bw), agg="seq-mean-token-sum-norm", denominator=21.0)
    add("ppo-asym-ties-v2", "ppo_clip", {"clip_low": 0.1, "clip_high": 0.28}, _ties(21, [0.9, 1.28], [1.0, -1.0]))
    add("gipo-batch-token-sum-boolmask-nan", "gipo", {"sigma": 1.0, "sigma_neg": 0.5}, dict(planted, mask=mask),
        agg="token-sum")
    add("gipo-batch-token-sum-floatmask-bw-denom", "gipo", {"sigma": 0.5},
        dict(batch, mask=fmask, behavior_weights=bw), agg="token-sum", denominator=7.0)
    add("cispo-min0.8-ladder", "cispo", {"clip_min": 0.8}, _ladder_inputs(52, _ladder()))
    add("ppo-dual-lower-ladder", "ppo_clip", {"clip_low": 0.1, "clip_high": 0.28, "dual_clip": 3.0},
        _ladder_inputs(26, _ladder()[:15] + [math.log(2.5), math.log(3.5), -0.5]))
    # Sequence level: a (5, 6) batch with per-sequence advantages, an empty row, NaN/inf under the mask, a row
    # of hard token log-ratios (its mean is about 20), a row of small ones and one single-token row.
    rng = np.random.default_rng(70)
    seq = _batch_inputs(70, (5, 6), per_sequence=True, scale=0.3)
    seq["old_logp"][0] = seq["logp"][0] - np.array([1e-4, 11.0, 89.0, -89.0, 60.0, -50.0])
    seq["old_logp"][3] = seq["logp"][3] - rng.normal(0.0, 1e-3, 6)
    smask = rng.uniform(size=(5, 6)) < 0.75
    smask[0] = True
    smask[2] = False
    smask[4] = False
    smask[4, 3] = True
    splanted = {k: v.copy() for k, v in seq.items()}
    splanted["logp"][~smask] = np.nan
    splanted["old_logp"][1, ~smask[1]] = np.inf
    seq_options = {
        "gipo": [("s1", {"sigma": 1.0}), ("s0.5-sneg0.3", {"sigma": 0.5, "sigma_neg": 0.3}),
                 ("laplace-s1", {"sigma": 1.0, "kernel": "laplace"})],
        "ppo_clip": [("gspo", {"clip_low": 3e-4, "clip_high": 4e-4}), ("eps0.2-dual3", {"dual_clip": 3.0})],
        "no_clip": [("plain", {})],
        "sapo": [("default", {})],
        "cispo": [("default", {}), ("min0.8", {"clip_min": 0.8})],
    }
    for objective, sets in seq_options.items():
        for label, opts in sets:
            for agg in ("seq-mean-token-mean", "token-mean"):
                add(f"offpolicy-seq-{objective}-{label}-{agg}", objective, dict(opts, ratio_level="sequence"),
                    dict(splanted, mask=smask), agg=agg)
    # Rollout correction: r = old - rollout per token, some tokens far out (masked by token-mask), rows whose
    # sums or means fall inside and outside each mode's default bounds.
    ro = _batch_inputs(71, (5, 6), per_sequence=False, scale=0.3)
    rr = np.random.default_rng(71).normal(0.0, 0.15, (5, 6))
    rr[0, 2], rr[1, 4], rr[3, 0] = 2.5, -1.2, 0.9   # token weights e^2.5 = 12 and e^-1.2 = 0.3 leave [0.5, 5]
    rr[2] = 0.0004                                    # geometric mean e^0.0004 inside (0.999, 1.001)
    rr[4] = [0.02, -0.03, 0.01, 0.0, 0.015, -0.01]
    ro["rollout_logp"] = ro["old_logp"] - rr
    ro = {k: round_to(v, "bfloat16") for k, v in ro.items()}  # the same values in every dtype: no tie moves
    rmask = np.ones((5, 6), dtype=bool)
    rmask[1, 5] = False
    rmask[4, 2:] = False
    rplanted = {k: v.copy() for k, v in ro.items()}
    rplanted["rollout_logp"][~rmask] = np.nan
    for mode in ("token-truncate", "token-mask", "sequence-truncate", "sequence-mask", "geometric-mask"):
        for objective, opts in (("gipo", {"sigma": 1.0}), ("ppo_clip", {"dual_clip": 3.0})):
            add(f"offpolicy-rollout-{mode}-{objective}", objective, dict(opts, rollout_is=mode),
                dict(rplanted, mask=rmask))
    add("offpolicy-rollout-token-truncate-bounds-cispo", "cispo", {"rollout_is": "token-truncate",
        "rollout_is_bounds": [0.8, 1.5]}, dict(rplanted, mask=rmask), agg="seq-mean-token-sum")
    add("offpolicy-rollout-sequence-mask-bounds-sapo", "sapo", {"rollout_is": "sequence-mask",
        "rollout_is_bounds": [0.3, 3.0]}, dict(rplanted, mask=rmask), agg="seq-mean-token-mean")
    add("offpolicy-rollout-none-diagnostics-no_clip", "no_clip", {}, dict(rplanted, mask=rmask))
    add("offpolicy-rollout-extreme-sequence-truncate-gipo", "gipo", {"rollout_is": "sequence-truncate"},
        dict(ro, rollout_logp=ro["old_logp"] - 40.0))
    add("offpolicy-rollout-extreme-sequence-mask-gipo", "gipo", {"rollout_is": "sequence-mask"},
        dict(ro, rollout_logp=ro["old_logp"] + 40.0))
    # OPSM: per-sequence advantages of both signs, behaviour-current gaps above and below delta = 0.1.
    op = _batch_inputs(72, (6, 5), per_sequence=True, scale=0.05)
    op["advantages"][:, 0] = [-1.0, -0.5, 0.7, 1.2, -0.8, -0.3]
    gaps = np.array([0.3, 0.02, 0.4, 0.05, 0.25, -0.2])  # mean (old - logp) per row
    op["old_logp"] = op["logp"] + gaps[:, None] + np.random.default_rng(72).normal(0.0, 0.01, (6, 5))
    op = {k: round_to(v, "bfloat16") for k, v in op.items()}
    omask = np.ones((6, 5), dtype=bool)
    omask[5] = False
    omask[0, 3:] = False
    for objective, opts in (("gipo", {"sigma": 1.0}), ("ppo_clip", {}), ("cispo", {})):
        add(f"offpolicy-opsm-{objective}", objective, dict(opts, opsm_delta=0.1), dict(op, mask=omask),
            agg="seq-mean-token-mean")
    op_ro = dict(op, rollout_logp=op["old_logp"] + 0.2, mask=omask)  # behaviour further away through rollout
    add("offpolicy-opsm-rollout-gipo", "gipo", {"sigma": 1.0, "opsm_delta": 0.1}, op_ro)
    add("offpolicy-opsm-rollout-token-mask-seq-gipo", "gipo", {"sigma": 1.0, "opsm_delta": 0.1,
        "rollout_is": "token-mask", "ratio_level": "sequence"}, op_ro, agg="seq-mean-token-sum-norm")
    # Everything masked, with every option on.
    empty = {k: np.zeros((2, 3)) for k in ("logp", "old_logp", "advantages", "rollout_logp")}
    empty["logp"][:] = np.nan
    empty["rollout_logp"][:] = np.inf
    for objective in ("gipo", "ppo_clip", "no_clip", "sapo", "cispo"):
        add(f"offpolicy-all-masked-{objective}", objective, {"ratio_level": "sequence", "rollout_is": "sequence-mask",
            "opsm_delta": 0.0}, dict(empty, mask=np.zeros((2, 3), dtype=bool)), agg="seq-mean-token-sum-norm")


# ------------------------------------------------------------------------------------------ JSON


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        if x.dtype == bool:
            return x.tolist()
        return [_jsonable(v) for v in x.tolist()] if x.ndim else float(x)
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else repr(x)  # 'nan', 'inf', '-inf'
    return x


def decode(x: Any) -> Any:
    """Inverse of the JSON encoding: strings 'nan', 'inf', '-inf' back to floats, recursively."""
    if isinstance(x, list):
        return [decode(v) for v in x]
    if isinstance(x, str) and x in ("nan", "inf", "-inf"):
        return float(x)
    return x


def golden_entry(case: dict) -> dict:
    """A case with its inputs rounded to each dtype and the oracle's answer for those inputs."""
    raw = case["inputs"]
    per_dtype = {}
    for dtype in DTYPES:
        inputs = {}
        for k, v in raw.items():
            inputs[k] = v.copy() if v.dtype == bool else round_to(v, dtype)
        res = evaluate(
            case["objective"], case["options"], case["agg"], inputs["logp"], inputs["old_logp"],
            inputs["advantages"], inputs.get("mask"), inputs.get("behavior_weights"), case.get("denominator"),
            work_dtype(dtype), inputs.get("rollout_logp"),
        )
        per_dtype[dtype] = {
            "inputs": {k: _jsonable(v) for k, v in inputs.items()},
            "expected": {
                "loss": _jsonable(res["loss"]),
                "grad": _jsonable(res["grad"]),
                "grad_alt": _jsonable(res["grad_alt"]),
                "metrics": {k: _jsonable(v) for k, v in res["metrics"].items()},
                "scale": {k: _jsonable(v) for k, v in res["scale"].items()},
                "overflow": res["overflow"],
                "ambiguous": sorted(res["ambiguous"]),
            },
        }
    out = {k: case[k] for k in ("id", "objective", "options", "agg")}
    out["denominator"] = case.get("denominator")
    out["dtypes"] = per_dtype
    return out


def _as_stored(entry: dict, stored: dict) -> dict:
    """``entry`` with only the diagnostics ``stored`` has: an entry written before a diagnostic was added keeps
    checking the quantities it holds (the data is append-only; new diagnostics are checked by new entries)."""
    for dtype, part in entry["dtypes"].items():
        old = stored["dtypes"][dtype]["expected"]
        exp = part["expected"]
        for key in ("metrics", "overflow", "scale"):
            exp[key] = {k: v for k, v in exp[key].items() if k in old[key]}
        exp["ambiguous"] = [k for k in exp["ambiguous"] if k in old["ambiguous"] or k in old["metrics"]]
    return entry


def provenance() -> dict:
    return {
        "generator": "conformance/make_golden.py",
        "mpmath": mpmath.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "dps": DPS,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="recompute stored cases and report drift")
    parser.add_argument("--out", type=Path, default=GOLDEN)
    args = parser.parse_args(argv)
    stored = json.loads(args.out.read_text()) if args.out.exists() else {"provenance": [], "cases": []}
    known = {c["id"]: c for c in stored["cases"]}
    if args.check:
        drift = []
        for case in golden_cases():
            if case["id"] in SUPERSEDED:
                continue  # stored under the old convention on purpose; its replacement is checked
            if case["id"] in known and json.dumps(_as_stored(golden_entry(case), known[case["id"]])) != json.dumps(
                known[case["id"]]
            ):
                drift.append(case["id"])
        print("drift in: " + ", ".join(drift) if drift else f"{len(known)} stored cases reproduce exactly")
        return 1 if drift else 0
    new = [golden_entry(c) for c in golden_cases() if c["id"] not in known]
    if not new:
        print(f"nothing to add ({len(known)} cases stored)")
        return 0
    stored["provenance"].append(dict(provenance(), added=[c["id"] for c in new]))
    stored["superseded"] = {old: {"by": by, "reason": why} for old, (by, why) in SUPERSEDED.items()}
    stored["tolerances"] = TOLERANCES
    stored["cases"].extend(new)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(stored, separators=(",", ":")) + "\n")
    print(f"added {len(new)} cases to {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
