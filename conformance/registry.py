"""The one registry of cases, the golden data loader and the comparison rules every check shares.

A :class:`Case` is an objective with one option set, an aggregation mode, a mask variant, a shape, a
``denominator`` variant and optional ``behavior_weights``, with seeded inputs. The registry crosses every
option set with every aggregation mode and rotates the other dimensions through them, so each mask, shape,
denominator and weight variant meets every objective and every mode somewhere without the full product.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import make_golden as oracle

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm", "token-sum")
PUBLIC = {"gipo": "gipo_loss", "ppo_clip": "ppo_clip_loss", "no_clip": "no_clip_loss", "sapo": "sapo_loss",
          "cispo": "cispo_loss"}

#: (objective, label, options): every objective with several option sets.
OPTION_SETS = (
    ("gipo", "s1", {"sigma": 1.0}),
    ("gipo", "s0.05", {"sigma": 0.05}),
    ("gipo", "s10", {"sigma": 10.0}),
    ("gipo", "s1-sneg0.5", {"sigma": 1.0, "sigma_neg": 0.5}),
    ("gipo", "laplace-s0.5", {"sigma": 0.5, "kernel": "laplace"}),
    ("gipo", "cauchy-s2-sneg0.7", {"sigma": 2.0, "sigma_neg": 0.7, "kernel": "cauchy"}),
    ("ppo_clip", "eps0.2", {}),
    ("ppo_clip", "asym-dual3", {"clip_low": 0.1, "clip_high": 0.28, "dual_clip": 3.0}),
    ("no_clip", "plain", {}),
    ("sapo", "default", {}),
    ("sapo", "tauneg2", {"tau_pos": 1.0, "tau_neg": 2.0}),
    ("cispo", "default", {}),
    ("cispo", "max1.5", {"clip_max": 1.5}),
    ("cispo", "min0.8", {"clip_min": 0.8}),
)
#: (objective, label, options, rollout): the off-policy option sets; ``rollout`` gives the case a
#: ``rollout_logp`` input. Each meets two aggregation modes (rotating), not all of them.
OFFPOLICY_SETS = (
    ("gipo", "s1-seq", {"sigma": 1.0, "ratio_level": "sequence"}, False),
    ("ppo_clip", "gspo", {"clip_low": 3e-4, "clip_high": 4e-4, "ratio_level": "sequence"}, False),
    ("sapo", "seq", {"ratio_level": "sequence"}, False),
    ("cispo", "min0.8-seq", {"clip_min": 0.8, "ratio_level": "sequence"}, False),
    ("no_clip", "seq-tis", {"ratio_level": "sequence", "rollout_is": "token-truncate"}, True),
    ("gipo", "s0.5-token-mask", {"sigma": 0.5, "rollout_is": "token-mask"}, True),
    ("ppo_clip", "dual3-seq-tis", {"dual_clip": 3.0, "rollout_is": "sequence-truncate"}, True),
    ("cispo", "seq-mis", {"rollout_is": "sequence-mask", "rollout_is_bounds": (0.3, 3.0)}, True),
    ("sapo", "geo-mask", {"rollout_is": "geometric-mask", "rollout_is_bounds": (0.7, 1.4)}, True),
    ("gipo", "s1-opsm", {"sigma": 1.0, "opsm_delta": 0.1}, False),
    ("ppo_clip", "opsm-ro-tis", {"opsm_delta": 0.05, "rollout_is": "token-truncate"}, True),
    ("no_clip", "ro-diagnostics", {}, True),
)
#: Mask variants: none, bool, float weights, some all-masked rows, an all-masked batch, NaN/inf planted at
#: masked positions (of every input).
MASKS = ("none", "bool", "float", "rows", "all", "nan")
#: Shapes: 1-D, (B, T) with per-element advantages, (B, T) with per-sequence (B, 1) advantages, zero-length.
SHAPES = {"1d": ((9,), False), "bt": ((3, 5), False), "bt-perseq": ((4, 5), True), "zero": ((0, 5), False)}
DENOMINATORS = ("none", "number", "array")


@dataclass(frozen=True)
class Case:
    objective: str
    label: str
    options: tuple
    agg: str
    mask: str
    shape: str
    denominator: str
    weights: bool
    seed: int
    id: str = field(default="")
    rollout: bool = False

    @property
    def fn_name(self) -> str:
        return PUBLIC[self.objective]

    @property
    def opts(self) -> dict:
        return dict(self.options)

    def inputs(self) -> dict:
        """Seeded float64 inputs (NaN/inf planted at masked positions for the 'nan' variant)."""
        return _inputs(self)


@functools.lru_cache(maxsize=None)
def _inputs_cached(case: Case) -> dict:
    shape, per_seq = SHAPES[case.shape]
    rng = np.random.default_rng(case.seed)
    logp = -rng.uniform(0.05, 3.0, shape)
    old = logp - rng.normal(0.0, 0.6, shape)
    adv = rng.normal(0.0, 1.0, shape[:-1] + (1,) if per_seq else shape)
    out = {"logp": logp, "old_logp": old, "advantages": adv}
    if case.mask != "none":
        valid = rng.uniform(size=shape) < 0.7
        if case.mask == "rows" and valid.ndim == 2:
            valid[::2] = False
        if case.mask in ("all",) or (case.mask == "rows" and valid.ndim == 1):
            valid[...] = False
        if valid.ndim == 2 and valid.shape[0] > 1 and case.mask not in ("all", "rows"):
            valid[-1, 0] = True  # at least one valid element outside the all-masked variants
        if case.mask == "float":
            out["mask"] = np.where(valid, rng.uniform(0.2, 1.0, shape), 0.0)
        else:
            out["mask"] = valid
    if case.weights:
        out["behavior_weights"] = rng.uniform(0.5, 1.5, shape)
    if case.rollout:
        out["rollout_logp"] = old - np.random.default_rng(case.seed + 7).normal(0.0, 0.3, shape)
    if case.mask == "nan":
        bad = ~out["mask"]
        out["logp"] = np.where(bad, np.nan, logp)
        out["old_logp"] = np.where(bad, np.inf, old)
        if not per_seq:
            out["advantages"] = np.where(bad, -np.inf, adv)
        if case.weights:
            out["behavior_weights"] = np.where(bad, np.nan, out["behavior_weights"])
        if case.rollout:
            out["rollout_logp"] = np.where(bad, -np.inf, out["rollout_logp"])
    return out


def _inputs(case: Case) -> dict:
    return {k: v.copy() for k, v in _inputs_cached(case).items()}


def has_valid(case: Case) -> bool:
    """Whether the case has at least one valid element."""
    inputs = _inputs_cached(case)
    mask = inputs.get("mask")
    return inputs["logp"].size > 0 and (mask is None or bool(np.any(mask != 0)))


def denominator_value(case: Case, inputs: dict) -> float | None:
    """A global denominator for the case: a 'world' count larger than the local one."""
    if case.denominator == "none":
        return None
    shape = inputs["logp"].shape
    if case.agg == "token-mean":
        return float(math.prod(shape) + 3)
    if case.agg == "seq-mean-token-sum-norm":
        return float((math.prod(shape[:-1]) + 1) * shape[-1])
    if case.agg == "token-sum":
        return 4.0
    return float(math.prod(shape[:-1]) + 1)


def _make_registry() -> list[Case]:
    cases = []
    shapes = list(SHAPES)
    k = 0
    for objective, label, opts in OPTION_SETS:
        for agg in AGG_MODES:
            mask = MASKS[k % len(MASKS)]
            shape = shapes[(k // 2 + k) % len(shapes)]
            if shape == "zero" and mask in ("float", "nan"):
                shape = "bt"
            denom = DENOMINATORS[k % len(DENOMINATORS)]
            weights = k % 4 in (1, 2)
            cid = f"{objective}-{label}-{agg}-mask_{mask}-{shape}-den_{denom}" + ("-bw" if weights else "")
            cases.append(Case(objective, label, tuple(opts.items()), agg, mask, shape, denom, weights, 1000 + k, cid))
            k += 1
    # Off-policy sets: sequence quantities need rows with valid elements, so the all-masked variants (covered
    # by the golden data and test_properties) are left out of this rotation.
    offpolicy_masks = ("bool", "rows", "float", "nan", "none", "bool")
    offpolicy_shapes = ("bt-perseq", "bt", "bt-perseq", "1d", "bt")
    for j, (objective, label, opts, rollout) in enumerate(OFFPOLICY_SETS):
        for i, agg in enumerate((AGG_MODES[j % len(AGG_MODES)], AGG_MODES[(j + 2) % len(AGG_MODES)])):
            mask = offpolicy_masks[(2 * j + i) % len(offpolicy_masks)]
            shape = offpolicy_shapes[(2 * j + i) % len(offpolicy_shapes)]
            denom = DENOMINATORS[k % len(DENOMINATORS)]
            weights = k % 4 in (1, 2)
            cid = f"{objective}-{label}-{agg}-mask_{mask}-{shape}-den_{denom}" + ("-bw" if weights else "")
            cases.append(Case(objective, label, tuple(opts.items()), agg, mask, shape, denom, weights, 1000 + k, cid,
                              rollout))
            k += 1
    return cases


REGISTRY: list[Case] = _make_registry()


def one_per_option_set(agg: str | None = None) -> list[Case]:
    """The first registry case of each option set (with ``agg`` if given), on a (B, T) shape."""
    seen: dict = {}
    for c in REGISTRY:
        if (c.objective, c.label) not in seen and (agg is None or c.agg == agg):
            seen[(c.objective, c.label)] = c
    return list(seen.values())


def one_per_objective() -> list[Case]:
    """The first case of each objective with a valid element and no NaN planted (the per-example checks
    drop the mask)."""
    seen: dict = {}
    for c in REGISTRY:
        if has_valid(c) and c.mask != "nan":
            seen.setdefault(c.objective, c)
    return list(seen.values())


def offpolicy_samples() -> list[Case]:
    """One case each of the sequence ratio with a rollout correction, a sequence mask, a geometric mask and
    OPSM (for the compiler checks), each with a valid element and no NaN planted."""
    wanted = ("s1-seq", "dual3-seq-tis", "seq-mis", "geo-mask", "s1-opsm")
    seen: dict = {}
    for c in REGISTRY:
        if c.label in wanted and has_valid(c) and c.mask != "nan" and c.shape != "zero":
            seen.setdefault(c.label, c)
    return list(seen.values())


# ---------------------------------------------------------------------------------------------- golden


GOLDEN = json.loads(oracle.GOLDEN.read_text()) if oracle.GOLDEN.exists() else {"cases": [], "tolerances": {}}


def golden_cases() -> list[dict]:
    """The stored golden cases, less those superseded by a later convention (see ``superseded``)."""
    gone = superseded()
    return [c for c in GOLDEN["cases"] if c["id"] not in gone]


def superseded() -> dict:
    """Stored golden ids that follow an old convention -> ``{"by": replacement id, "reason": ...}``."""
    return GOLDEN.get("superseded", {})


def golden_inputs(case: dict, dtype: str) -> dict:
    """The stored inputs of a golden case, already rounded to ``dtype``, as NumPy arrays."""
    out = {}
    for k, v in case["dtypes"][dtype]["inputs"].items():
        a = np.array(oracle.decode(v))
        out[k] = a if a.dtype == bool else a.astype(np.float64)
    return out


def golden_expected(case: dict, dtype: str) -> dict:
    e = case["dtypes"][dtype]["expected"]
    return dict(
        loss=float(oracle.decode(e["loss"])),
        grad=np.array(oracle.decode(e["grad"]), dtype=np.float64),
        grad_alt=np.array(oracle.decode(e["grad_alt"]), dtype=np.float64),
        metrics={k: float(oracle.decode(v)) for k, v in e["metrics"].items()},
        scale={k: (np.array(oracle.decode(v), dtype=np.float64) if k == "grad" else float(oracle.decode(v)))
               for k, v in e["scale"].items()},
        overflow=e["overflow"],
        ambiguous=set(e["ambiguous"]),
    )


@functools.lru_cache(maxsize=None)
def _oracle_cached(case: Case, dtype: str) -> dict:
    inputs = rounded_inputs(case, dtype)
    return oracle.evaluate(
        case.objective, case.opts, case.agg, inputs["logp"], inputs["old_logp"], inputs["advantages"],
        inputs.get("mask"), inputs.get("behavior_weights"), denominator_value(case, inputs),
        oracle.work_dtype(dtype), inputs.get("rollout_logp"),
    )


def rounded_inputs(case: Case, dtype: str) -> dict:
    return {k: (v if v.dtype == bool else oracle.round_to(v, dtype)) for k, v in case.inputs().items()}


def expected(case: Case, dtype: str) -> dict:
    """The oracle's answer for the case's inputs rounded to ``dtype`` (cached)."""
    return _oracle_cached(case, dtype)


# ---------------------------------------------------------------------------------------------- tolerances


def tolerance(dtype: str, quantity: str) -> tuple[float, float, float]:
    """``(rtol_scale, rtol_value, atol)`` for ``quantity`` ('loss', 'grad' or 'metric') at input ``dtype``:
    a result passes when ``|got - exact| <= rtol_scale * scale + rtol_value * |exact| + atol``.

    ``rtol_scale`` covers the work dtype's arithmetic (``C * eps`` with ``C = 32``); ``rtol_value`` the
    rounding of the result into its output dtype (the gradient comes back in ``dtype``, loss and diagnostics in
    float32 or float64); ``atol`` the spacing of subnormals of the work and output dtypes.
    """
    t = (GOLDEN.get("tolerances") or oracle.TOLERANCES)[dtype]
    if quantity == "grad":
        return t["rtol_work"], t["eps_grad"], t["tiny_work"] + t["tiny_grad"]
    return t["rtol_work"], t["eps_out"], t["tiny_work"]


def _close(got: np.ndarray, exact: np.ndarray, scale: np.ndarray, tol: tuple) -> np.ndarray:
    rs, rv, at = tol
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(got - exact)
        bound = rs * scale + rv * np.abs(exact) + at
        return (err <= bound) | ((got == exact) & np.isinf(exact))


def compare(got: dict, exp: dict, dtype: str) -> list[str]:
    """Mismatches between a result ``got`` (loss, grad, metrics as float64 NumPy) and the oracle's ``exp``.

    Rules: a quantity whose exact value is finite in its output dtype and whose per-element intermediates fit
    the work dtype must be within tolerance (so never NaN); one whose exact value overflows its output dtype
    must come back as an inf of the same sign; where an intermediate itself overflows the work dtype (the
    documented deviation of No-Clip and of PPO's A < 0 side) nothing is asserted. Counting diagnostics are
    exact unless a decision was closer to its threshold than the work dtype resolves (``ambiguous``).
    """
    problems: list[str] = []
    work = oracle.work_dtype(dtype)
    out_max_loss = oracle.MAX[work]
    out_max_grad = oracle.MAX[dtype]

    def check(name, g, e, s, tol, omax, overflowed, alt=None):
        omax = omax * (1 + tol[1])  # values just past the largest finite one may round down to it
        g = np.asarray(g, dtype=np.float64)
        e = np.asarray(e, dtype=np.float64)
        s = np.asarray(s, dtype=np.float64)
        if g.shape != e.shape:
            problems.append(f"{name}: shape {g.shape}, expected {e.shape}")
            return
        finite_out = np.abs(e) <= omax
        ok = _close(g, e, s, tol)
        if alt is not None:  # the other side of an ambiguous decision, with its own scale
            ok |= _close(g, alt, np.maximum(s, np.abs(alt)), tol)
        if overflowed:
            return
        over = ~finite_out
        ok = np.where(over, np.isinf(g) & (np.sign(g) == np.sign(e)), ok)
        if not np.all(ok):
            bad = np.argwhere(~np.atleast_1d(ok))[:3].tolist()
            gv, ev = np.atleast_1d(g), np.atleast_1d(e)
            shown = "; ".join(f"at {i}: got {gv[tuple(i)]!r}, exact {ev[tuple(i)]!r}" for i in bad)
            problems.append(f"{name}: {int(np.sum(~np.atleast_1d(ok)))} mismatch(es) ({shown})")

    check("loss", got["loss"], exp["loss"], exp["scale"]["loss"], tolerance(dtype, "loss"), out_max_loss,
          exp["overflow"]["loss"])
    check("grad", got["grad"], exp["grad"], exp["scale"]["grad"], tolerance(dtype, "grad"), out_max_grad,
          exp["overflow"]["grad"], alt=exp["grad_alt"])
    for name, e in exp["metrics"].items():
        if name not in got["metrics"]:
            problems.append(f"metric {name} missing")
            continue
        if name in exp["ambiguous"]:
            continue
        check(f"metric {name}", got["metrics"][name], e, exp["scale"][name], tolerance(dtype, "metric"),
              out_max_loss, exp["overflow"][name])
    return problems
