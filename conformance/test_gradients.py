"""Gradients: against float64 finite differences away from kinks, and against plain autodiff of a reference."""

from __future__ import annotations

import numpy as np
import pytest

from . import harness, registry
from .reference import reference_loss
from .registry import REGISTRY, denominator_value, rounded_inputs

FD_STEP = 1e-6
#: Elements whose ratio is this close (relative) to a PPO kink are not differenced.
KINK_GAP = 1e-4


def _fd_cases() -> list:
    # At ratio_level="sequence" the gradient is GSPO-token's (each element's own logp carries the sequence
    # ratio), by definition not the derivative of the loss value: the autodiff comparison below covers it.
    return [c for c in REGISTRY if registry.has_valid(c) and c.opts.get("ratio_level") != "sequence"]


def _away_from_kinks(case, ell: np.ndarray) -> np.ndarray:
    if case.objective != "ppo_clip":
        return np.ones(ell.shape, dtype=bool)
    rho = np.exp(ell)
    opts = case.opts
    kinks = [1 - opts.get("clip_low", 0.2), 1 + opts.get("clip_high", 0.2)]
    if opts.get("dual_clip") is not None:
        kinks.append(opts["dual_clip"])
    return np.all([np.abs(rho / k - 1) > KINK_GAP for k in kinks], axis=0)


def _gipo_weight(case, ell: np.ndarray, adv: np.ndarray) -> np.ndarray:
    """The trust weight at the base point, held fixed while differencing (it is a stop-gradient)."""
    o = case.opts
    s = np.where(adv > 0, o["sigma"], o.get("sigma_neg") or o["sigma"])
    kernel = o.get("kernel", "gaussian")
    if kernel == "gaussian":
        return np.exp(-(ell**2) / (2 * s**2))
    if kernel == "laplace":
        return np.exp(-np.abs(ell) / s)
    return 1.0 / (1.0 + (ell / s) ** 2)


@pytest.mark.conformance(cases=_fd_cases, dtypes=("float64",))
def test_finite_differences(target, dtype, case) -> None:
    """``grad_logp`` equals central differences (step 1e-6) of the function whose derivative it must be.

    No-Clip, PPO-clip and SAPO: the loss itself (PPO away from its kinks). CISPO: the loss with ``logp`` and
    ``old_logp`` moved together (the ratio, a stop-gradient, stays put). GIPO: No-Clip with the base point's
    trust weight as a fixed ``behavior_weights`` (the weight is a stop-gradient).
    """
    inputs = rounded_inputs(case, dtype)
    denom = denominator_value(case, inputs)
    got, _ = harness.run_case(target, case, dtype, inputs)
    mask = inputs.get("mask")
    valid = np.ones(inputs["logp"].shape, bool) if mask is None else mask != 0
    ell = np.where(valid, inputs["logp"] - inputs["old_logp"], 0.0)
    adv = np.broadcast_to(inputs["advantages"], ell.shape)
    fn_name, fd_inputs, move_old = case.fn_name, dict(inputs), case.objective == "cispo"
    opts = case.opts
    if case.objective == "gipo":
        fn_name = "no_clip_loss"
        opts = {k: v for k, v in opts.items() if k in registry.oracle.OFFPOLICY_OPTIONS}
        bw = inputs.get("behavior_weights", np.ones(ell.shape))
        fd_inputs["behavior_weights"] = np.where(valid, bw * _gipo_weight(case, ell, np.where(valid, adv, 0.0)), 0.0)
    candidates = np.argwhere(valid & _away_from_kinks(case, ell))[:4]
    assert len(candidates), "the case has no element to difference"

    def value(delta: np.ndarray) -> float:
        moved = dict(fd_inputs, logp=fd_inputs["logp"] + delta)
        if move_old:  # the ratio (and the rollout log-weight old - rollout) stay put
            moved["old_logp"] = fd_inputs["old_logp"] + delta
            if "rollout_logp" in fd_inputs:
                moved["rollout_logp"] = fd_inputs["rollout_logp"] + delta
        res, _ = harness.run(target, fn_name, moved, dtype, opts, case.agg, denom, case.denominator == "array")
        return float(res["loss"])

    scale = float(np.max(np.abs(got["grad"]))) + abs(float(got["loss"]))
    for idx in map(tuple, candidates):
        delta = np.zeros(ell.shape)
        delta[idx] = FD_STEP
        fd = (value(delta) - value(-delta)) / (2 * FD_STEP)
        assert abs(fd - got["grad"][idx]) <= 1e-6 * scale + 1e-9, (
            f"at {idx}: grad {got['grad'][idx]!r}, finite difference {fd!r}"
        )


def _sanitized(inputs: dict) -> dict:
    """Float64 inputs for the reference: finite values at masked positions, the mask as weights."""
    shape = inputs["logp"].shape
    mask = inputs.get("mask")
    m = np.ones(shape) if mask is None else mask.astype(np.float64)
    valid = m != 0
    return {
        "logp": np.where(valid, inputs["logp"], -1.0),
        "old_logp": np.where(valid, inputs["old_logp"], -1.0),
        # per-sequence (..., 1) advantages carry no planted values
        "advantages": np.where(valid, inputs["advantages"], 0.0)
        if inputs["advantages"].shape == shape
        else inputs["advantages"],
        "mask": m,
        "behavior_weights": np.where(valid, inputs.get("behavior_weights", np.ones(shape)), 1.0),
        **({"rollout_logp": np.where(valid, inputs["rollout_logp"], -1.0)} if "rollout_logp" in inputs else {}),
    }


@pytest.mark.conformance(cases=lambda: REGISTRY, dtypes=("float32", "float64"), needs=("autodiff",))
def test_custom_gradient_matches_autodiff(target, dtype, case) -> None:
    """The adapter's custom gradient equals the framework's plain autodiff of a straightforward reference
    (evaluated in float64 on the same rounded inputs)."""
    inputs = rounded_inputs(case, dtype)
    got, _ = harness.run_case(target, case, dtype, inputs)
    ref_in = _sanitized(inputs)
    d = target.driver
    with d.scope("float64"):
        arr = {k: d.asarray(v, "float64", target.device) for k, v in ref_in.items()}
        denom = denominator_value(case, inputs)
        ref = d.grad(
            lambda lp: reference_loss(d.ops(), case.objective, case.opts, case.agg, lp, arr["old_logp"],
                                      arr["advantages"], arr["mask"], arr["behavior_weights"], denom,
                                      arr.get("rollout_logp")),
            arr["logp"],
        )
        ref = d.to_numpy(ref)
    exp = registry.expected(case, dtype)
    rs, rv, at = registry.tolerance(dtype, "grad")
    bound = rs * exp["scale"]["grad"] + rv * np.abs(ref) + at
    ok = (np.abs(got["grad"] - ref) <= bound) | ~np.isnan(exp["grad_alt"])
    assert np.all(ok), f"custom {got['grad'][~ok]} vs autodiff {ref[~ok]}"
