"""Contract properties: masking, empty batches, broadcasting, dtypes and devices, finiteness, sharding, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from . import harness, registry
from .registry import AGG_MODES, OPTION_SETS, PUBLIC, REGISTRY, Case, compare, rounded_inputs


def _variants(mask: str, shape: str) -> list[Case]:
    """One case per objective (its first option set) and aggregation mode, with the given mask and shape."""
    cases, seen = [], set()
    for k, (objective, label, opts) in enumerate(OPTION_SETS):
        if objective in seen:
            continue
        seen.add(objective)
        for agg in AGG_MODES:
            cid = f"{objective}-{label}-{agg}-mask_{mask}-{shape}"
            cases.append(Case(objective, label, tuple(opts.items()), agg, mask, shape, "none", False, 500 + k, cid))
    return cases


@pytest.mark.conformance(cases=lambda: _variants("all", "bt") + _variants("none", "zero"))
def test_empty_batch_gives_zeros(target, dtype, case) -> None:
    """All-masked (with NaN/inf planted under the mask) or zero-length: loss 0, gradient 0, diagnostics 0."""
    inputs = rounded_inputs(case, dtype)
    if case.mask == "all":
        inputs["logp"][...] = np.nan
        inputs["old_logp"][...] = np.inf
    got, _ = harness.run_case(target, case, dtype, inputs)
    assert got["loss"] == 0.0, f"loss {got['loss']!r}"
    assert got["grad"].shape == inputs["logp"].shape
    assert np.all(got["grad"] == 0.0), f"gradient {got['grad']}"
    bad = {k: float(v) for k, v in got["metrics"].items() if not v == 0.0}
    assert not bad, f"non-zero diagnostics on an empty batch: {bad}"
    assert sorted(got["metrics"]) == sorted(registry.oracle.metric_names(case.objective, case.opts, case.rollout))


def _masked_cases() -> list[Case]:
    return [c for c in REGISTRY if c.mask in ("bool", "float", "rows", "nan") and c.shape != "zero"]


@pytest.mark.conformance(cases=_masked_cases)
def test_masked_values_never_leak(target, dtype, case) -> None:
    """NaN and inf under the mask give bit-for-bit the result of finite values there, and a zero gradient."""
    inputs = rounded_inputs(case, dtype)
    valid = inputs["mask"] != 0
    per_element = inputs["advantages"].shape == valid.shape
    finite = {k: v for k, v in inputs.items()}
    poisoned = {k: v for k, v in inputs.items()}
    for key, bad in (("logp", np.nan), ("old_logp", -np.inf), ("advantages", np.inf), ("behavior_weights", np.nan)):
        if key not in inputs or (key == "advantages" and not per_element):
            continue
        finite[key] = np.where(valid, inputs[key], -0.5)
        poisoned[key] = np.where(valid, inputs[key], bad)
    clean, _ = harness.run_case(target, case, dtype, finite)
    dirty, _ = harness.run_case(target, case, dtype, poisoned)
    assert harness.bits(dirty) == harness.bits(clean), (
        f"values under the mask changed the result: loss {dirty['loss']!r} vs {clean['loss']!r}"
    )
    assert np.all(dirty["grad"][~valid] == 0.0), "non-zero gradient at masked positions"


def _objective_cases() -> list[Case]:
    return [c for c in _variants("bool", "bt") if c.agg == "seq-mean-token-mean"]


@pytest.mark.conformance(cases=_objective_cases)
def test_advantage_broadcasting(target, dtype, case) -> None:
    """(B, 1) advantages equal their explicit (B, T) broadcast; (B,), (1, T) and (T,) ones are refused."""
    inputs = rounded_inputs(case, dtype)
    b, t = inputs["logp"].shape
    per_seq = dict(inputs, advantages=inputs["advantages"][:, :1])
    explicit = dict(inputs, advantages=np.broadcast_to(per_seq["advantages"], (b, t)).copy())
    got, _ = harness.run_case(target, case, dtype, per_seq)
    problems = compare(got, registry.oracle.evaluate(
        case.objective, case.opts, case.agg, explicit["logp"], explicit["old_logp"], explicit["advantages"],
        explicit["mask"], None, None, registry.oracle.work_dtype(dtype)), dtype)
    assert not problems, "\n".join(problems)
    full, _ = harness.run_case(target, case, dtype, explicit)
    assert not compare(full, registry.oracle.evaluate(
        case.objective, case.opts, case.agg, explicit["logp"], explicit["old_logp"], explicit["advantages"],
        explicit["mask"], None, None, registry.oracle.work_dtype(dtype)), dtype)
    for bad in (inputs["advantages"][:, 0], inputs["advantages"][:1, :], inputs["advantages"][0, :]):
        with pytest.raises(ValueError, match="`advantages`") as info:
            harness.run_case(target, case, dtype, dict(inputs, advantages=bad))
        assert f"`{case.fn_name}`" in str(info.value)


@pytest.mark.conformance(cases=_objective_cases)
def test_output_dtypes_and_devices(target, dtype, case) -> None:
    """Loss and diagnostics in float32 (float64 for float64 input), the gradient in logp's dtype, all on the
    input's device; with a float64 advantage and a lower-precision logp, loss in float64, gradient in logp's."""
    d = target.driver
    _, (loss, metrics, grad) = harness.run_case(target, case, dtype)
    want = "float64" if dtype == "float64" else "float32"
    assert d.dtype_name(loss) == want
    assert {k: d.dtype_name(v) for k, v in metrics.items()} == {k: want for k in metrics}
    assert d.dtype_name(grad) == dtype
    for x in (loss, grad, *metrics.values()):
        assert d.device_name(x) == target.device
    if "float64" in d.dtypes and dtype != "float64":
        inputs = rounded_inputs(case, dtype)
        with d.scope("float64"):
            logp, (old, _, mask), _ = harness.make_arrays(target, inputs, dtype)
            adv = d.asarray(inputs["advantages"], "float64", target.device)
            loss, metrics, grad = d.run(target.module, case.fn_name, logp, (old, adv, mask), dict(case.opts))
            assert (d.dtype_name(loss), d.dtype_name(grad)) == ("float64", dtype)


#: (id, objective, options, largest |l|): configurations whose exact loss is finite for every |l| up to the bound.
FINITE_CONFIGS = [
    ("gipo-gaussian-s0.05", "gipo", {"sigma": 0.05}, 1e4),
    ("gipo-gaussian-s1-sneg0.5", "gipo", {"sigma": 1.0, "sigma_neg": 0.5}, 1e4),
    ("gipo-gaussian-s10", "gipo", {"sigma": 10.0}, 1e4),
    ("gipo-laplace-s1", "gipo", {"sigma": 1.0, "kernel": "laplace"}, 1e4),
    ("gipo-laplace-s3", "gipo", {"sigma": 3.0, "kernel": "laplace"}, 120.0),
    ("gipo-cauchy-s1", "gipo", {"sigma": 1.0, "kernel": "cauchy"}, 80.0),
    ("ppo-dual3", "ppo_clip", {"dual_clip": 3.0}, 1e4),
    ("ppo", "ppo_clip", {}, 80.0),
    ("no_clip", "no_clip", {}, 80.0),
    ("sapo", "sapo", {}, 1e4),
    ("cispo", "cispo", {}, 1e4),
]


class _Config:
    def __init__(self, cid, objective, opts, bound):
        self.id, self.objective, self.opts, self.bound = cid, objective, opts, bound


@pytest.mark.conformance(cases=lambda: [_Config(*c) for c in FINITE_CONFIGS])
def test_no_nan_for_finite_inputs(target, dtype, case) -> None:
    """Log-ratios from 1e-8 to the bound, both signs, both advantage signs: no NaN anywhere, a finite loss."""
    mags = np.geomspace(1e-8, case.bound, 24)
    ell = np.concatenate([mags, -mags, [0.0]])
    rng = np.random.default_rng(7)
    logp = -rng.uniform(0.05, 1.0, ell.size)
    inputs = {
        "logp": registry.oracle.round_to(logp, dtype),
        "old_logp": registry.oracle.round_to(logp - ell, dtype),
        "advantages": registry.oracle.round_to(np.where(np.arange(ell.size) % 2 == 0, 1.0, -1.0) * 0.7, dtype),
    }
    for agg in ("token-mean", "seq-mean-token-sum-norm"):
        got, _ = harness.run(target, PUBLIC[case.objective], inputs, dtype, case.opts, agg)
        assert math.isfinite(float(got["loss"])), f"loss {got['loss']!r} ({agg})"
        assert not np.any(np.isnan(got["grad"])), f"NaN in the gradient at {np.argwhere(np.isnan(got['grad']))}"
        nan = [k for k, v in got["metrics"].items() if np.isnan(v)]
        assert not nan, f"NaN diagnostics: {nan}"


@pytest.mark.conformance(cases=lambda: [c for c in _variants("bool", "bt") if c.agg == "token-mean"],
                         dtypes=("float32",))
def test_nan_input_shows_in_every_diagnostic(target, dtype, case) -> None:
    """A NaN at a valid element of logp or of the advantages makes every diagnostic but n_valid NaN (none may
    hide it as a number, as ess once did with 0.0)."""
    inputs = rounded_inputs(case, dtype)
    valid = np.argwhere(inputs["mask"])[0]
    for key in ("logp", "advantages"):
        poisoned = {k: v.copy() for k, v in inputs.items()}
        poisoned[key][tuple(valid)] = np.nan
        got, _ = harness.run_case(target, case, dtype, poisoned)
        numbers = {k: float(v) for k, v in got["metrics"].items() if k != "n_valid" and not np.isnan(v)}
        assert not numbers, f"NaN in {key}, yet these diagnostics are numbers: {numbers}"
        assert float(got["metrics"]["n_valid"]) == float(np.sum(inputs["mask"]))


def _shard_cases() -> list[Case]:
    base = [c for c in _variants("rows", "bt-perseq") if c.objective in ("gipo", "ppo_clip", "cispo")]
    off = []
    for k, (objective, label, opts, rollout) in enumerate(registry.OFFPOLICY_SETS):
        agg = AGG_MODES[k % len(AGG_MODES)]
        cid = f"{objective}-{label}-{agg}-mask_rows-bt-perseq"
        off.append(Case(objective, label, tuple(opts.items()), agg, "rows", "bt-perseq", "none", False, 600 + k, cid,
                        rollout))
    return base + off


@pytest.mark.conformance(cases=_shard_cases, dtypes=("float32", "float64"))
def test_sharding_invariance(target, dtype, case) -> None:
    """Shards of a batch with the global ``denominator`` add up to the full-batch loss and gradient."""
    inputs = rounded_inputs(case, dtype)
    mask = inputs["mask"]
    if case.agg == "token-mean":
        global_count = float(np.sum(mask))
    elif case.agg == "seq-mean-token-sum-norm":
        global_count = float(np.sum(np.any(mask, axis=-1)) * mask.shape[-1])
    elif case.agg == "token-sum":
        global_count = None
    else:
        global_count = float(np.sum(np.any(mask, axis=-1)))
    full, _ = harness.run(target, case.fn_name, inputs, dtype, case.opts, case.agg)
    shards = [slice(0, 1), slice(1, 3), slice(3, None)]
    parts = [
        harness.run(target, case.fn_name, {k: v[s] for k, v in inputs.items()}, dtype, case.opts, case.agg,
                    global_count)[0]
        for s in shards
    ]
    exp = registry.oracle.evaluate(case.objective, case.opts, case.agg, inputs["logp"], inputs["old_logp"],
                                   inputs["advantages"], mask, None, None, registry.oracle.work_dtype(dtype),
                                   inputs.get("rollout_logp"))
    rs, rv, at = registry.tolerance(dtype, "loss")
    total = sum(float(p["loss"]) for p in parts)
    assert abs(total - float(full["loss"])) <= 2 * (rs * exp["scale"]["loss"] + rv * abs(exp["loss"])) + at, (
        f"shards sum to {total!r}, full batch {float(full['loss'])!r}"
    )
    grad = np.concatenate([p["grad"] for p in parts])
    rs, rv, at = registry.tolerance(dtype, "grad")
    assert np.all(np.abs(grad - full["grad"]) <= 2 * (rs * exp["scale"]["grad"] + rv * np.abs(exp["grad"])) + at)


class _Bad:
    def __init__(self, cid, fn, exc, arg, change):
        self.id, self.fn, self.exc, self.arg, self.change = cid, fn, exc, arg, change


#: Every documented bad input: (id, function, exception, argument named in the message, what to change).
BAD_INPUTS = [
    ("logp-int", "gipo_loss", TypeError, "logp", {"logp": "int32"}),
    ("logp-0d", "gipo_loss", ValueError, "logp", {"logp": "0d"}),
    ("logp-none", "gipo_loss", TypeError, "logp", {"logp": None}),
    ("old_logp-shape", "gipo_loss", ValueError, "old_logp", {"old_logp": "short"}),
    ("old_logp-int", "ppo_clip_loss", TypeError, "old_logp", {"old_logp": "int32"}),
    ("advantages-flat", "gipo_loss", ValueError, "advantages", {"advantages": "flat"}),
    ("advantages-int", "sapo_loss", TypeError, "advantages", {"advantages": "int32"}),
    ("mask-int", "gipo_loss", TypeError, "mask", {"mask": "int32"}),
    ("mask-shape", "cispo_loss", ValueError, "mask", {"mask": "short"}),
    ("behavior_weights-shape", "gipo_loss", ValueError, "behavior_weights", {"behavior_weights": "short"}),
    ("behavior_weights-int", "no_clip_loss", TypeError, "behavior_weights", {"behavior_weights": "int32"}),
    ("mixed-libraries", "gipo_loss", TypeError, "gipo_loss", {"old_logp": "foreign"}),
    ("sigma-zero", "gipo_loss", ValueError, "sigma", {"sigma": 0.0}),
    ("sigma-negative", "gipo_loss", ValueError, "sigma", {"sigma": -1.0}),
    ("sigma-nan", "gipo_loss", ValueError, "sigma", {"sigma": float("nan")}),
    ("sigma-inf", "gipo_loss", ValueError, "sigma", {"sigma": float("inf")}),
    ("sigma-string", "gipo_loss", TypeError, "sigma", {"sigma": "1"}),
    ("sigma_neg-zero", "gipo_loss", ValueError, "sigma_neg", {"sigma_neg": 0.0}),
    ("kernel-unknown", "gipo_loss", ValueError, "kernel", {"kernel": "box"}),
    ("agg-unknown", "gipo_loss", ValueError, "agg", {"agg": "mean"}),
    ("clip_low-one", "ppo_clip_loss", ValueError, "clip_low", {"clip_low": 1.0}),
    ("clip_high-zero", "ppo_clip_loss", ValueError, "clip_high", {"clip_high": 0.0}),
    ("dual_clip-one", "ppo_clip_loss", ValueError, "dual_clip", {"dual_clip": 1.0}),
    ("tau_pos-zero", "sapo_loss", ValueError, "tau_pos", {"tau_pos": 0.0}),
    ("tau_neg-negative", "sapo_loss", ValueError, "tau_neg", {"tau_neg": -1.0}),
    ("clip_max-zero", "cispo_loss", ValueError, "clip_max", {"clip_max": 0.0}),
    ("denominator-zero", "gipo_loss", ValueError, "denominator", {"denominator": 0.0}),
    ("denominator-string", "gipo_loss", TypeError, "denominator", {"denominator": "8"}),
    ("denominator-shape", "gipo_loss", ValueError, "denominator", {"denominator": "vector"}),
    ("with_metrics-string", "gipo_loss", TypeError, "with_metrics", {"with_metrics": "yes"}),
    ("unknown-keyword", "gipo_loss", TypeError, "sigmaa", {"sigmaa": 1.0}),
    ("ratio_level-unknown", "gipo_loss", ValueError, "ratio_level", {"ratio_level": "batch"}),
    ("rollout_is-unknown", "gipo_loss", ValueError, "rollout_is", {"rollout_is": "token"}),
    ("rollout_is-without-rollout_logp", "ppo_clip_loss", ValueError, "rollout_logp", {"rollout_is": "token-mask"}),
    ("rollout_is_bounds-order", "gipo_loss", ValueError, "rollout_is_bounds", {"rollout_is_bounds": (2.0, 0.5)}),
    ("rollout_logp-shape", "sapo_loss", ValueError, "rollout_logp", {"rollout_logp": "short"}),
    ("rollout_logp-int", "cispo_loss", TypeError, "rollout_logp", {"rollout_logp": "int32"}),
    ("clip_min-above-clip_max", "cispo_loss", ValueError, "clip_min", {"clip_min": 6.0}),
    ("opsm_delta-string", "gipo_loss", TypeError, "opsm_delta", {"opsm_delta": "0.1"}),
]


@pytest.mark.conformance(cases=lambda: [_Bad(*b) for b in BAD_INPUTS])
def test_bad_input_raises(target, case) -> None:
    """Each documented bad input raises the documented exception, naming the function and the argument."""
    d, dev = target.driver, target.device
    rng = np.random.default_rng(3)
    shape = (2, 4)
    base = {"logp": -rng.uniform(0.1, 1, shape), "old_logp": -rng.uniform(0.1, 1, shape),
            "advantages": rng.normal(size=shape), "mask": rng.uniform(size=shape) < 0.8,
            "behavior_weights": rng.uniform(0.5, 1.5, shape), "rollout_logp": -rng.uniform(0.1, 1, shape)}
    arrays = {k: d.asarray(v, "bool" if v.dtype == bool else "float32", dev) for k, v in base.items()}
    kwargs: dict = {}
    for key, how in case.change.items():
        if key not in base:
            kwargs[key] = how
        elif how is None:
            arrays[key] = None
        elif how == "int32":
            arrays[key] = d.asarray(np.ones(shape), "int32", dev)
        elif how == "0d":
            arrays[key] = d.asarray(np.asarray(-0.5), "float32", dev)
        elif how == "short":
            arrays[key] = d.asarray(base[key][:, :3], "bool" if base[key].dtype == bool else "float32", dev)
        elif how == "flat":
            arrays[key] = d.asarray(base[key][:, 0], "float32", dev)
        elif how == "foreign":
            arrays[key] = d.foreign(base[key].astype(np.float32))
    if case.change.get("denominator") == "vector":
        kwargs["denominator"] = d.asarray(np.array([3.0, 4.0]), "float32", dev)
    if case.fn == "gipo_loss" or "behavior_weights" in case.change:
        kwargs.setdefault("behavior_weights", arrays["behavior_weights"])
    if "rollout_logp" in case.change:
        kwargs["rollout_logp"] = arrays["rollout_logp"]
    fn = getattr(target.module, case.fn)
    with pytest.raises(case.exc) as info:
        fn(arrays["logp"], arrays["old_logp"], arrays["advantages"], arrays["mask"], **kwargs)
    message = str(info.value)
    assert f"`{case.fn}`" in message, f"the message does not name the function: {message}"
    assert case.arg in message, f"the message does not name `{case.arg}`: {message}"
