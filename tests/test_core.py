"""Unit tests of the backend-neutral core through gipo_core.numpy (and array-api-strict)."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

import gipo_core
from gipo_core import numpy as gnp
from gipo_core.numpy import value_and_grad

from mp_reference import reference
from params import AGG_PARAMS, IMPLEMENTED_AGG

LOSSES = {
    "gipo": gnp.gipo_loss,
    "ppo_clip": gnp.ppo_clip_loss,
    "no_clip": gnp.no_clip_loss,
    "sapo": gnp.sapo_loss,
    "cispo": gnp.cispo_loss,
}

OPTION_SETS = [
    ("gipo", {}),
    ("gipo", {"sigma": 0.1}),
    ("gipo", {"sigma": 0.5}),
    ("gipo", {"sigma": 2.0}),
    ("gipo", {"sigma": 1.0, "sigma_neg": 0.5}),
    ("gipo", {"sigma": 0.7, "kernel": "laplace"}),
    ("gipo", {"sigma": 1.5, "kernel": "cauchy", "sigma_neg": 0.3}),
    ("ppo_clip", {}),
    ("ppo_clip", {"clip_low": 0.2, "clip_high": 0.28}),
    ("ppo_clip", {"dual_clip": 3.0}),
    ("no_clip", {}),
    ("sapo", {}),
    ("sapo", {"tau_pos": 1.0, "tau_neg": 2.0}),
    ("cispo", {}),
    ("cispo", {"clip_max": 2.0}),
]


def _ids(case):
    name, opts = case
    return name + ("-" + "-".join(f"{k}={v}" for k, v in opts.items()) if opts else "")


def _batch(seed=0, shape=(4, 7), scale=1.0, per_seq=False, mask_kind="bool"):
    rng = np.random.default_rng(seed)
    logp = -rng.exponential(1.0, size=shape)
    old = logp - scale * rng.standard_normal(shape)
    adv = rng.standard_normal(shape[:-1] + ((1,) if per_seq else (shape[-1],)))
    if mask_kind is None:
        mask = None
    elif mask_kind == "bool":
        mask = rng.random(shape) < 0.75
        mask[..., 0] = True
        if len(shape) > 1:
            mask[1] = False  # one all-masked sequence
    else:
        mask = np.where(rng.random(shape) < 0.75, rng.uniform(0.2, 1.0, shape), 0.0)
    return logp, old, adv, mask


def _rel_err(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    scale = np.maximum(np.abs(want), 1e-300)
    return float(np.max(np.abs(got - want) / scale)) if want.size else 0.0


@pytest.mark.parametrize("case", OPTION_SETS, ids=_ids)
@pytest.mark.parametrize("agg", AGG_PARAMS)
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_matches_high_precision_reference_float64(case, agg, mask_kind):
    name, opts = case
    # zlib.crc32, not hash(): str hashes change with every process (PYTHONHASHSEED), and so did the data.
    seed = zlib.crc32(f"{name}/{agg}/{mask_kind}".encode())
    logp, old, adv, mask = _batch(seed=seed, per_seq=mask_kind == "float",
                                  mask_kind=mask_kind, scale=0.6)
    out, grad = value_and_grad(LOSSES[name])(logp, old, adv, mask, agg=agg, **opts)
    want_loss, want_grad = reference(name, logp, old, adv, mask, agg=agg, **opts)
    assert out.loss.dtype == np.float64 and grad.dtype == np.float64
    assert _rel_err(out.loss, want_loss) < 1e-12
    assert _rel_err(grad, want_grad) < 1e-12


@pytest.mark.parametrize("case", OPTION_SETS, ids=_ids)
def test_extreme_log_ratios_float64(case):
    """Log-ratios from 1e-4 to 700 in magnitude, against the 60-digit reference where it is finite."""
    name, opts = case
    ell = np.array([0.0, 1e-4, -1e-4, 0.3, -0.3, 1.0, -2.0, 4.0, -11.0, 11.0, 30.0, -89.0, 89.0, 300.0, -700.0, 700.0])
    logp = np.full_like(ell, -0.5)
    old = logp - ell
    adv = np.where(np.arange(ell.size) % 2 == 0, 1.0, -0.7)
    out, grad = value_and_grad(LOSSES[name])(logp, old, adv, denominator=3.0, **opts)
    want_loss, want_grad = reference(name, logp, old, adv, denominator=3.0, **opts)
    assert np.isfinite(want_grad).all()
    assert _rel_err(grad, want_grad) < 1e-12
    if math.isfinite(want_loss):
        assert _rel_err(out.loss, want_loss) < 1e-12


@pytest.mark.parametrize("case", OPTION_SETS, ids=_ids)
@pytest.mark.parametrize("agg", AGG_PARAMS)
def test_gradient_matches_finite_differences(case, agg):
    name, opts = case
    logp, old, adv, mask = _batch(seed=7, shape=(3, 5), scale=0.4, mask_kind="bool")
    if name == "ppo_clip":  # stay away from the kinks at the clip boundary
        ratio = np.exp(logp - old)
        near = np.abs(np.abs(ratio - 1) - 0.2) < 0.02
        old = np.where(near, old + 0.05, old)
    fn = LOSSES[name]
    _, grad = value_and_grad(fn)(logp, old, adv, mask, agg=agg, **opts)
    h = 1e-6
    fd = np.zeros_like(logp)
    for idx in np.ndindex(logp.shape):
        up, dn = logp.copy(), logp.copy()
        up[idx] += h
        dn[idx] -= h
        if name == "gipo":  # the weight is held constant: perturb logp in the ratio only
            fd[idx] = _gipo_fd(up, dn, old, adv, mask, idx, agg, opts, h)
            continue
        if name in ("cispo",):  # the clipped ratio is held constant: perturb the log-prob factor only
            fd[idx] = _cispo_fd(up, dn, logp, old, adv, mask, agg, opts, h)
            continue
        fd[idx] = (float(fn(up, old, adv, mask, agg=agg, **opts).loss)
                   - float(fn(dn, old, adv, mask, agg=agg, **opts).loss)) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)


def _gipo_fd(up, dn, old, adv, mask, idx, agg, opts, h):
    """Finite difference of -w * rho * A with the weight w frozen at the unperturbed point.

    The frozen weights enter as behaviour weights of the plain importance-sampling loss, whose value then
    is GIPO's loss and whose derivative in logp is GIPO's gradient.
    """
    ell = (up + dn) / 2 - old
    a = np.broadcast_to(adv, ell.shape)
    sigma = opts.get("sigma", 1.0)
    sig = np.where(a > 0, sigma, opts.get("sigma_neg") or sigma)
    frozen = {
        "gaussian": np.exp(-(ell**2) / (2 * sig**2)),
        "laplace": np.exp(-np.abs(ell) / sig),
        "cauchy": 1 / (1 + (ell / sig) ** 2),
    }[opts.get("kernel", "gaussian")]
    f = lambda x: float(gnp.no_clip_loss(x, old, adv, mask, agg=agg, behavior_weights=frozen).loss)  # noqa: E731
    return (f(up) - f(dn)) / (2 * h)


def _cispo_fd(up, dn, logp, old, adv, mask, agg, opts, h):
    frozen = np.minimum(np.exp(logp - old), opts.get("clip_max", 5.0))
    f = lambda x: float(gnp.cispo_loss(x, x - 1e3, adv, mask, agg=agg, clip_max=1.0,  # noqa: E731
                                       behavior_weights=frozen).loss)
    # with old = x - 1e3 the clipped ratio is exactly clip_max = 1, so the loss is -frozen * A * logp
    return (f(up) - f(dn)) / (2 * h)


@pytest.mark.parametrize("agg", AGG_PARAMS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_shards_sum_to_full_batch_with_denominator(agg, name):
    logp, old, adv, mask = _batch(seed=3, shape=(6, 5), mask_kind="bool")
    fn = LOSSES[name]
    full, full_grad = value_and_grad(fn)(logp, old, adv, mask, agg=agg)
    if agg == "token-mean":
        denom = float(mask.sum())
    elif agg == "seq-mean-token-sum-norm":
        denom = float((mask.sum(-1) > 0).sum()) * mask.shape[-1]
    elif agg == "token-sum":
        denom = None
    else:
        denom = float((mask.sum(-1) > 0).sum())
    parts, grads = [], []
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        out, g = value_and_grad(fn)(logp[rows], old[rows], adv[rows], mask[rows], agg=agg, denominator=denom)
        parts.append(float(out.loss))
        grads.append(g)
    assert math.isclose(sum(parts), float(full.loss), rel_tol=1e-13, abs_tol=1e-15)
    np.testing.assert_allclose(np.concatenate(grads), full_grad, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("agg", AGG_PARAMS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_all_masked_batch_gives_zero_loss_and_gradient(name, agg, dtype):
    shape = (3, 4)
    logp = np.full(shape, np.nan, dtype=dtype)
    old = np.full(shape, np.inf, dtype=dtype)
    adv = np.full((3, 1), np.nan, dtype=dtype)
    mask = np.zeros(shape, dtype=bool)
    out, grad = value_and_grad(LOSSES[name])(logp, old, adv, mask, agg=agg, behavior_weights=np.full(shape, np.nan, dtype))
    assert float(out.loss) == 0.0
    assert grad.dtype == dtype and np.all(grad == 0)
    for key, value in out.metrics.items():
        assert np.isfinite(value), key
    assert float(out.metrics["n_valid"]) == 0.0


@pytest.mark.parametrize("name", list(LOSSES))
def test_nan_and_inf_at_masked_positions_never_leak(name):
    logp, old, adv, mask = _batch(seed=11, shape=(4, 6), mask_kind="bool")
    clean_out, clean_grad = value_and_grad(LOSSES[name])(logp, old, adv, mask)
    dirty = [x.copy() for x in (logp, old, adv)]
    for x, bad in zip(dirty, (np.nan, -np.inf, np.inf)):
        x[~mask] = bad
    out, grad = value_and_grad(LOSSES[name])(*dirty, mask)
    assert float(out.loss) == float(clean_out.loss)
    np.testing.assert_array_equal(grad, clean_grad)
    for key in out.metrics:
        assert float(out.metrics[key]) == float(clean_out.metrics[key]), key


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("kernel", ["gaussian"])
def test_gipo_finite_at_extreme_log_ratios(dtype, kernel):
    ell = np.array([1e4, -1e4, 1e3, -1e3, 89, -89, 11, -11, 0.0], dtype=np.float64)
    logp = np.zeros(ell.shape, dtype=dtype)
    old = (-ell).astype(dtype)
    adv = np.ones(ell.shape, dtype=dtype)
    for sigma in (0.1, 1.0, 2.0):
        out, grad = value_and_grad(gnp.gipo_loss)(logp, old, adv, sigma=sigma, kernel=kernel)
        assert np.isfinite(float(out.loss)) and np.all(np.isfinite(grad))
        assert all(np.isfinite(v) for v in out.metrics.values() if v is not out.metrics["ratio_max"]
                   and v is not out.metrics["ratio_mean"] and v is not out.metrics["kl_k3"])


def test_float16_reductions_count_past_65504():
    n = 70_000
    logp = np.zeros(n, dtype=np.float16)
    out, grad = value_and_grad(gnp.gipo_loss)(logp, logp, np.ones(n, dtype=np.float16), np.ones(n, dtype=bool))
    assert out.loss.dtype == np.float32
    assert float(out.metrics["n_valid"]) == n
    assert math.isclose(float(out.loss), -1.0, rel_tol=1e-6)
    assert grad.dtype == np.float16
    # -1/n is subnormal in float16: the result is the nearest float16, within one subnormal step.
    np.testing.assert_allclose(grad.astype(np.float64), -1.0 / n, rtol=0, atol=2.0**-24)


def test_gradient_at_zero_log_ratio_is_minus_a_over_n_for_every_objective():
    logp = np.array([[-1.0, -2.0, -0.5]])
    adv = np.array([[0.5, -1.5, 2.0]])
    for name, fn in LOSSES.items():
        _, grad = value_and_grad(fn)(logp, logp, adv)
        np.testing.assert_allclose(grad, -adv / 3, rtol=1e-15, err_msg=name)


def test_asymmetric_sigma_changes_only_non_positive_advantages():
    logp, old, adv, _ = _batch(seed=5, shape=(50,), mask_kind=None, scale=1.0)
    _, g_sym = value_and_grad(gnp.gipo_loss)(logp, old, adv, sigma=1.0)
    _, g_asym = value_and_grad(gnp.gipo_loss)(logp, old, adv, sigma=1.0, sigma_neg=0.3)
    pos = adv > 0
    np.testing.assert_array_equal(g_sym[pos], g_asym[pos])
    assert np.all(g_sym[~pos & (np.abs(logp - old) > 1e-3)] != g_asym[~pos & (np.abs(logp - old) > 1e-3)])


def test_gaussian_trust_weight_values_and_dtype():
    ell = np.array([0.0, 1.0, -2.0, 1e4], dtype=np.float32)
    w = gnp.gaussian_trust_weight(ell, 2.0)
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, np.exp(-(ell.astype(np.float64) ** 2) / 8), rtol=1e-6)


def test_metrics_are_zero_d_and_named():
    logp, old, adv, mask = _batch(seed=1)
    out = gnp.gipo_loss(logp, old, adv, mask)
    assert tuple(out.metrics) == gipo_core.METRIC_NAMES
    for value in out.metrics.values():
        assert np.ndim(value) == 0
    assert gnp.gipo_loss(logp, old, adv, mask, with_metrics=False).metrics == {}


def test_metric_definitions():
    ell = np.array([0.0, 0.5, -1.5, 3.0])
    adv = np.array([1.0, 1.0, -1.0, -2.0])
    mask = np.array([True, True, True, False])
    out = gnp.gipo_loss(ell, np.zeros(4), adv, mask, sigma=1.0).metrics
    e, a = ell[:3], adv[:3]
    w = np.exp(-e**2 / 2)
    u = np.exp(e) * w
    assert math.isclose(out["weight_mean"], w.mean(), rel_tol=1e-14)
    assert math.isclose(out["weight_min"], w.min(), rel_tol=1e-14)
    assert math.isclose(out["grad_mult_max"], u.max(), rel_tol=1e-14)
    assert math.isclose(out["ess"], u.sum() ** 2 / (3 * (u**2).sum()), rel_tol=1e-14)
    assert math.isclose(out["low_weight_frac"], np.mean(w < 0.5))
    assert math.isclose(out["low_weight_frac_pos"] + out["low_weight_frac_neg"], out["low_weight_frac"])
    assert math.isclose(out["kl_k1"], np.mean(-e), rel_tol=1e-14)
    assert math.isclose(out["kl_k3"], np.mean(np.expm1(-e) + e), rel_tol=1e-14)
    assert math.isclose(out["ratio_max"], np.exp(0.5), rel_tol=1e-14)
    assert math.isclose(out["log_ratio_abs_max"], 1.5)
    # PPO silences rho = e^0.5 > 1.2 with A > 0 and rho = e^-1.5 < 0.8 with A < 0; the masked one is ignored.
    assert math.isclose(out["ppo_clip_frac"], 2 / 3)
    assert out["n_valid"] == 3


def test_kl_k3_is_accurate_for_tiny_log_ratios_in_float32():
    ell = np.full(8, 1e-4, dtype=np.float32)
    out = gnp.gipo_loss(ell, np.zeros(8, np.float32), np.ones(8, np.float32)).metrics
    exact = math.expm1(-float(np.float32(1e-4))) + float(np.float32(1e-4))
    assert abs(float(out["kl_k3"]) - exact) / exact < 1e-3


def test_array_api_strict_runs_the_same_core():
    xps = pytest.importorskip("array_api_strict")
    logp, old, adv, mask = _batch(seed=2, mask_kind="bool")
    for name, fn in LOSSES.items():
        want, want_grad = value_and_grad(fn)(logp, old, adv, mask, agg="seq-mean-token-mean")
        got, got_grad = value_and_grad(fn)(xps.asarray(logp), xps.asarray(old), xps.asarray(adv), xps.asarray(mask),
                                           agg="seq-mean-token-mean")
        assert math.isclose(float(got.loss), float(want.loss), rel_tol=1e-15, abs_tol=1e-300)
        np.testing.assert_array_equal(np.asarray(got_grad), want_grad)


# ------------------------------------------------------------------------------------------- properties

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

finite_ell = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False)
sigmas = st.floats(min_value=0.05, max_value=10.0)


@settings(max_examples=200, deadline=None)
@given(ell=finite_ell, sigma=sigmas)
def test_weight_in_unit_interval_and_multiplier_bounded(ell, sigma):
    w = float(gnp.gaussian_trust_weight(np.array([ell]), sigma)[0])
    assert 0.0 <= w <= 1.0
    out = gnp.gipo_loss(np.array([ell]), np.array([0.0]), np.array([1.0]), sigma=sigma)
    u = float(out.metrics["grad_mult_max"])
    assert math.isfinite(u)
    assert u <= math.exp(sigma**2 / 2) * (1 + 1e-12)


@settings(max_examples=100, deadline=None)
@given(ell=st.floats(min_value=-3, max_value=3), adv=st.floats(min_value=-5, max_value=5))
def test_large_sigma_approaches_no_clip(ell, adv):
    args = (np.array([ell]), np.array([0.0]), np.array([adv]))
    _, g_gipo = value_and_grad(gnp.gipo_loss)(*args, sigma=1e4)
    _, g_is = value_and_grad(gnp.no_clip_loss)(*args)
    np.testing.assert_allclose(g_gipo, g_is, rtol=1e-7, atol=1e-300)


@settings(max_examples=100, deadline=None)
@given(
    ell=st.lists(st.floats(min_value=-50, max_value=50), min_size=1, max_size=12),
    sigma=sigmas,
    sigma_neg=sigmas,
    seed=st.integers(0, 2**16),
)
def test_sigma_neg_only_touches_non_positive_advantages(ell, sigma, sigma_neg, seed):
    ell = np.array(ell)
    adv = np.random.default_rng(seed).standard_normal(ell.shape)
    _, g1 = value_and_grad(gnp.gipo_loss)(ell, np.zeros_like(ell), adv, sigma=sigma)
    _, g2 = value_and_grad(gnp.gipo_loss)(ell, np.zeros_like(ell), adv, sigma=sigma, sigma_neg=sigma_neg)
    np.testing.assert_array_equal(g1[adv > 0], g2[adv > 0])


@settings(max_examples=60, deadline=None)
@given(
    adv=st.lists(st.floats(min_value=-10, max_value=10), min_size=1, max_size=9),
    name=st.sampled_from(sorted(LOSSES)),
    agg=st.sampled_from(IMPLEMENTED_AGG),
)
def test_gradient_at_zero_log_ratio_is_minus_a_over_n(adv, name, agg):
    adv = np.array(adv)
    logp = -np.ones_like(adv)
    _, g = value_and_grad(LOSSES[name])(logp, logp, adv, agg=agg)
    n = adv.size if agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm") else 1
    np.testing.assert_allclose(g, -adv / n, rtol=1e-15, atol=0)


@settings(max_examples=100, deadline=None)
@given(
    ell=st.lists(finite_ell, min_size=1, max_size=8),
    name=st.sampled_from(["gipo", "sapo", "cispo", "ppo_clip"]),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
)
def test_no_nan_for_finite_inputs(ell, name, dtype):
    """PPO, SAPO and CISPO and GIPO never give NaN; only PPO may overflow (where -A rho does, A < 0)."""
    ell = np.array(ell)
    adv = np.where(np.arange(ell.size) % 2 == 0, 1.0, -1.0).astype(dtype)
    out, g = value_and_grad(LOSSES[name])(np.zeros(ell.shape, dtype), (-ell).astype(dtype), adv, dual_clip=3.0) \
        if name == "ppo_clip" else value_and_grad(LOSSES[name])(np.zeros(ell.shape, dtype), (-ell).astype(dtype), adv)
    assert not np.isnan(float(out.loss)) and not np.isnan(g.astype(np.float64)).any()
    if name != "ppo_clip":
        assert np.isfinite(float(out.loss)) and np.isfinite(g.astype(np.float64)).all()


# ------------------------------------------------------------------------------------------- bad input

GOOD = (np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)))


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"advantages": np.zeros(2)}, ValueError, ["`gipo_loss`", "`advantages`", "(2,)", "(2, 3)", "(2, 1)"]),
        ({"advantages": np.zeros((1, 3))}, ValueError, ["`advantages`", "(1, 3)"]),
        ({"old_logp": np.zeros((2, 4))}, ValueError, ["`old_logp`", "(2, 4)", "(2, 3)"]),
        ({"mask": np.ones((3, 2), bool)}, ValueError, ["`mask`", "(3, 2)"]),
        ({"mask": np.ones((2, 3), np.int64)}, TypeError, ["`mask`", "int64", "bool"]),
        ({"logp": np.zeros((2, 3), np.int32)}, TypeError, ["`logp`", "int32", "floating"]),
        ({"sigma": 0.0}, ValueError, ["`sigma`", "[1e-06, 1e+06]", "0.0"]),
        ({"sigma": float("nan")}, ValueError, ["`sigma`", "nan"]),
        ({"sigma": float("inf")}, ValueError, ["`sigma`"]),
        ({"sigma_neg": -1.0}, ValueError, ["`sigma_neg`", "-1.0"]),
        ({"sigma": "1"}, TypeError, ["`sigma`", "'1'", "real number"]),
        ({"kernel": "gauss"}, ValueError, ["`kernel`", "'gaussian'", "'laplace'", "'cauchy'", "'gauss'"]),
        ({"agg": "mean"}, ValueError, ["`agg`", "'token-mean'", "'seq-mean-token-sum-norm'", "'mean'"]),
        ({"denominator": 0}, ValueError, ["`denominator`", "[1e-06, 1e+12]"]),
        ({"denominator": np.ones(2)}, ValueError, ["`denominator`", "(2,)"]),
        ({"denominator": "10"}, TypeError, ["`denominator`", "str"]),
        ({"behavior_weights": np.ones((2, 1))}, ValueError, ["`behavior_weights`", "(2, 1)"]),
        ({"logp": np.zeros(())}, ValueError, ["`logp`", "0-d"]),
        ({"with_metrics": 1}, TypeError, ["`with_metrics`"]),
        ({"sigmaa": 1.0}, TypeError, ["`gipo_loss`", "sigmaa"]),
    ],
)
def test_bad_input_names_the_argument(kwargs, exc, words):
    args = dict(zip(("logp", "old_logp", "advantages"), GOOD))
    for key in ("logp", "old_logp", "advantages", "mask"):
        if key in kwargs:
            args[key] = kwargs.pop(key)
    with pytest.raises(exc) as info:
        gnp.gipo_loss(**args, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize(
    "fn, kwargs, words",
    [
        (gnp.ppo_clip_loss, {"clip_low": 1.0}, ["`clip_low`", "(0, 1)"]),
        (gnp.ppo_clip_loss, {"clip_high": -0.1}, ["`clip_high`"]),
        (gnp.ppo_clip_loss, {"dual_clip": 1.0}, ["`dual_clip`", "(1, 1e+06]"]),
        (gnp.sapo_loss, {"tau_neg": 0.0}, ["`sapo_loss`", "`tau_neg`"]),
        (gnp.cispo_loss, {"clip_max": float("inf")}, ["`cispo_loss`", "`clip_max`"]),
    ],
)
def test_bad_baseline_options(fn, kwargs, words):
    with pytest.raises(ValueError) as info:
        fn(*GOOD, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_arrays_from_two_libraries_are_rejected():
    xps = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match="`gipo_loss`"):
        gnp.gipo_loss(np.zeros(3), xps.zeros(3, dtype=xps.float64), np.zeros(3))


def test_value_and_grad_rejects_other_callables():
    with pytest.raises(TypeError, match="`value_and_grad`"):
        value_and_grad(np.sum)


def test_bad_input_loses_nothing():
    logp = np.array([[0.1, 0.2]])
    before = logp.copy()
    with pytest.raises(ValueError):
        gnp.gipo_loss(logp, logp, np.zeros(1))
    np.testing.assert_array_equal(logp, before)
