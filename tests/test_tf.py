"""Tests of the TensorFlow adapter: the namespace shim, tf.custom_gradient, tf.function and XLA, dtypes,
tf.Variable inputs, the tf.Module loss classes, Keras 3 training steps and the mixed_float16 policy.

Oracles: the NumPy backend (the core evaluated directly, with its closed-form gradient) and plain
TensorFlow autodiff of the literal formula of each objective.
"""

from __future__ import annotations

import doctest
import inspect
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
tf = pytest.importorskip("tensorflow")

import gipo_core.numpy as gn  # noqa: E402
import gipo_core.tf as gt  # noqa: E402
from gipo_core import AGG_MODES, METRIC_NAMES  # noqa: E402
from gipo_core._core import objectives as objectives_module  # noqa: E402
from gipo_core._core.objectives import OBJECTIVES  # noqa: E402
from gipo_core._lib import _tf_namespace  # noqa: E402
from gipo_core._lib._tf_namespace import tf_namespace  # noqa: E402
from params import AGG_PARAMS, IMPLEMENTED_AGG  # noqa: E402

# (public function name, options): every objective, and the options that change its code path.
CASES = [
    ("gipo_loss", {}),
    ("gipo_loss", {"sigma": 0.5, "sigma_neg": 0.3}),
    ("gipo_loss", {"kernel": "laplace"}),
    ("gipo_loss", {"kernel": "cauchy", "sigma": 2.0}),
    ("ppo_clip_loss", {}),
    ("ppo_clip_loss", {"clip_low": 0.1, "clip_high": 0.3, "dual_clip": 3.0}),
    ("no_clip_loss", {}),
    ("sapo_loss", {}),
    ("cispo_loss", {"clip_max": 1.2}),
]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in opts.items()) for name, opts in CASES]
CLASSES = {
    "gipo_loss": gt.GIPOLoss,
    "ppo_clip_loss": gt.PPOClipLoss,
    "no_clip_loss": gt.NoClipLoss,
    "sapo_loss": gt.SAPOLoss,
    "cispo_loss": gt.CISPOLoss,
}
MODES = ("eager", "function", "xla")


def make_data(shape=(4, 6), seed=0, per_sequence=True, scale=0.6, dtype=np.float32):
    """NumPy arrays: logp, old_logp, advantages, a bool mask with every row partly valid."""
    rng = np.random.default_rng(seed)
    logp = rng.normal(-1.0, 0.5, shape).astype(dtype)
    old_logp = (logp + rng.normal(0.0, scale, shape)).astype(dtype)
    adv = rng.normal(0.0, 1.0, shape[:-1] + (1,) if per_sequence else shape).astype(dtype)
    mask = rng.random(shape) < 0.7
    mask[..., 0] = True
    return logp, old_logp, adv, mask


def compiled(fn, mode):
    return {"eager": fn, "function": tf.function(fn), "xla": tf.function(fn, jit_compile=True)}[mode]


def tf_value_and_grad(fn, logp, *rest, mode="eager", **kwargs):
    """(LossOutput, dloss/dlogp) through the custom gradient, run in ``mode``."""

    def step(lp, *args):
        with tf.GradientTape() as tape:
            tape.watch(lp)
            out = fn(lp, *args, **kwargs)
        return out, tape.gradient(out.loss, lp)

    args = [None if a is None else tf.convert_to_tensor(a) for a in rest]
    return compiled(step, mode)(tf.convert_to_tensor(logp), *args)


def assert_matches_numpy(name, arrays, kwargs, result=None, rtol=2e-5, atol=1e-6):
    """Loss, gradient and diagnostics of ``gipo_core.tf`` (eager, or ``result``) against ``gipo_core.numpy``."""
    out, grad = result or tf_value_and_grad(getattr(gt, name), *arrays, **kwargs)
    ref, ref_grad = gn.value_and_grad(getattr(gn, name))(*arrays, **kwargs)
    np.testing.assert_allclose(out.loss.numpy(), ref.loss, rtol=rtol, atol=atol)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=rtol, atol=atol)
    assert grad.dtype.as_numpy_dtype == arrays[0].dtype
    assert list(out.metrics) == list(ref.metrics)
    for key in ref.metrics:
        np.testing.assert_allclose(out.metrics[key].numpy(), ref.metrics[key], rtol=1e-4, atol=1e-6, err_msg=key)


# ------------------------------------------------------------------------------------------------- shim


def test_shim_has_every_function_the_core_names_and_nothing_else():
    doc = objectives_module.__doc__
    listed = re.search(r"Functions used from ``xp``:\s*``(.*?)``", doc, re.S).group(1)
    functions = {name.strip() for name in listed.replace("\n", " ").split(",")}
    dtypes = {"bool", "float16", "bfloat16", "float32", "float64"}
    xp = tf_namespace()
    public = {k for k in vars(xp) if not k.startswith("_")}
    assert functions <= public
    assert public == functions | dtypes
    assert tf_namespace() is xp  # one shared instance


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_shim_python_scalars_take_the_array_dtype(dtype):
    xp = tf_namespace()
    x = tf.constant([-1.5, 0.25, 2.0], dtype=getattr(tf, dtype))
    cond = tf.constant([True, False, True])
    for out, expected in [
        (xp.where(cond, x, 0.5), [-1.5, 0.5, 2.0]),
        (xp.where(cond, 0.5, x), [0.5, 0.25, 0.5]),
        (xp.maximum(x, 0.5), [0.5, 0.5, 2.0]),
        (xp.minimum(0.5, x), [-1.5, 0.25, 0.5]),
        (xp.full_like(x, 3.0), [3.0, 3.0, 3.0]),
        (xp.ones_like(x), [1.0, 1.0, 1.0]),
    ]:
        assert out.dtype == x.dtype
        np.testing.assert_array_equal(tf.cast(out, tf.float64).numpy(), expected)
    with pytest.raises(TypeError, match="`where`: at least one of the two operands must be a tensor"):
        xp.where(cond, 1.0, 0.0)


def test_shim_dtypes_astype_and_reductions():
    xp = tf_namespace()
    assert xp.float64 is tf.float64 and xp.bool is tf.bool and xp.bfloat16 is tf.bfloat16
    for dt in (tf.float16, tf.bfloat16, tf.float32, tf.float64):
        assert xp.isdtype(dt, "real floating") and not xp.isdtype(dt, "integral")
    assert xp.isdtype(tf.int32, ("real floating", "integral")) and xp.isdtype(tf.uint8, "unsigned integer")
    assert not xp.isdtype(tf.bool, "numeric") and xp.isdtype(tf.bool, "bool")
    assert xp.isdtype(tf.float32, tf.float32) and not xp.isdtype(tf.float32, tf.float64)
    with pytest.raises(ValueError, match="unknown kind 'floating'"):
        xp.isdtype(tf.float32, "floating")

    x = tf.constant([[1.0, -2.0, 3.5], [0.5, 4.0, -1.0]])
    assert xp.astype(x, tf.float32, copy=False) is x
    copied = xp.astype(x, tf.float32)
    assert copied is not x and copied.dtype == tf.float32
    assert xp.astype(x, tf.float64).dtype == tf.float64
    assert xp.astype(tf.Variable(x), tf.float32, copy=False).dtype == tf.float32  # a Variable becomes a tensor
    assert float(xp.sum(x)) == 6.0
    np.testing.assert_array_equal(xp.sum(x, axis=-1, keepdims=True).numpy(), [[2.5], [3.5]])
    assert xp.sum(x, axis=-1, keepdims=True).shape == (2, 1)
    assert float(xp.max(x)) == 4.0 and float(xp.min(x)) == -2.0
    np.testing.assert_allclose(xp.expm1(tf.constant([1e-7])).numpy(), [1e-7], rtol=1e-6)
    np.testing.assert_allclose(xp.log1p(tf.constant([1e-7])).numpy(), [1e-7], rtol=1e-6)
    np.testing.assert_array_equal(xp.abs(x).numpy(), np.abs(x.numpy()))


def test_shim_module_imports_tensorflow_only_when_called():
    source = inspect.getsource(_tf_namespace)
    module_level = source.split("def tf_namespace", 1)[0]
    assert "import tensorflow" not in module_level


# ------------------------------------------------------------------------------------ values, gradients


@pytest.mark.parametrize(("name", "opts"), CASES, ids=CASE_IDS)
def test_every_objective_matches_numpy(name, opts):
    assert_matches_numpy(name, make_data(), dict(opts, agg="seq-mean-token-mean"))


@pytest.mark.parametrize("mode", ["function", "xla"])
def test_every_objective_matches_numpy_inside_tf_function_and_xla(mode):
    """Every objective in one traced step (tracing dominates the cost), diagnostics included."""
    arrays = make_data(seed=14)
    cases = [CASES[i] for i in (1, 3, 5, 6, 7, 8)]  # each objective; GIPO's asymmetric and cauchy paths

    def step(lp, old, adv, mask):
        results = []
        for name, opts in cases:
            with tf.GradientTape() as tape:
                tape.watch(lp)
                out = getattr(gt, name)(lp, old, adv, mask, **opts, agg="seq-mean-token-mean")
            results.append((out, tape.gradient(out.loss, lp)))
        return results

    results = compiled(step, mode)(*(tf.constant(a) for a in arrays))
    for (name, opts), result in zip(cases, results):
        assert_matches_numpy(name, arrays, dict(opts, agg="seq-mean-token-mean"), result=result)


@pytest.mark.parametrize("agg", AGG_PARAMS)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_aggregation_modes_and_masks_match_numpy(agg, mask_kind):
    logp, old_logp, adv, mask = make_data(per_sequence=False, seed=1)
    mask = {"none": None, "bool": mask, "float": mask.astype(np.float32) * 0.5}[mask_kind]
    assert_matches_numpy("gipo_loss", (logp, old_logp, adv, mask), {"agg": agg, "sigma": 0.8})


@pytest.mark.parametrize("denominator", [7.0, "array", "int-array"])
def test_behavior_weights_and_denominator_match_numpy(denominator):
    logp, old_logp, adv, mask = make_data(seed=2)
    weights = np.random.default_rng(3).uniform(0.5, 1.5, logp.shape).astype(np.float32)
    ref_den = denominator if isinstance(denominator, float) else 11
    np_den = {"array": np.float32(11.0), "int-array": np.int32(11)}.get(denominator, ref_den)
    ref, ref_grad = gn.value_and_grad(gn.ppo_clip_loss)(
        logp, old_logp, adv, mask, denominator=ref_den, behavior_weights=weights
    )
    tf_den = tf.constant(np_den) if not isinstance(np_den, float) else np_den
    out, grad = tf_value_and_grad(
        gt.ppo_clip_loss, logp, old_logp, adv, mask, denominator=tf_den, behavior_weights=tf.constant(weights)
    )
    np.testing.assert_allclose(out.loss.numpy(), ref.loss, rtol=2e-6)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=2e-6, atol=1e-8)


def _literal(name, opts):
    """The objective written the straightforward way, differentiated by TensorFlow itself (masked token mean)."""
    sg = tf.stop_gradient

    def per_element(lp, old, adv):
        ratio = tf.exp(lp - old)
        ell = lp - old
        if name == "gipo_loss":
            sigma = opts.get("sigma", 1.0)
            neg = opts.get("sigma_neg") or sigma
            s = tf.where(adv > 0, tf.constant(sigma, lp.dtype), tf.constant(neg, lp.dtype))
            kernel = opts.get("kernel", "gaussian")
            if kernel == "gaussian":
                w = tf.exp(-0.5 * (sg(ell) / s) ** 2)
            elif kernel == "laplace":
                w = tf.exp(-tf.abs(sg(ell)) / s)
            else:
                w = 1.0 / (1.0 + (sg(ell) / s) ** 2)
            return -w * ratio * adv
        if name == "ppo_clip_loss":
            lo, hi = 1 - opts.get("clip_low", 0.2), 1 + opts.get("clip_high", 0.2)
            loss = tf.maximum(-adv * ratio, -adv * tf.clip_by_value(ratio, lo, hi))
            if opts.get("dual_clip"):
                loss = tf.where(adv < 0, tf.minimum(loss, -opts["dual_clip"] * adv), loss)
            return loss
        if name == "no_clip_loss":
            return -adv * ratio
        if name == "sapo_loss":
            tau = tf.where(adv > 0, tf.constant(opts.get("tau_pos", 1.0), lp.dtype), tf.constant(opts.get("tau_neg", 1.05), lp.dtype))
            return -adv * 4.0 / tau * tf.sigmoid(tau * (ratio - 1.0))
        return -sg(tf.minimum(ratio, opts.get("clip_max", 5.0))) * adv * lp

    def loss(lp, old, adv, mask):
        m = tf.cast(mask, lp.dtype)
        return tf.reduce_sum(per_element(lp, old, adv) * m) / tf.reduce_sum(m)

    return loss


@pytest.mark.parametrize(("name", "opts"), CASES, ids=CASE_IDS)
def test_custom_gradient_equals_autodiff_of_the_literal_formula(name, opts):
    logp, old_logp, adv, mask = (tf.constant(a) for a in make_data(seed=4, per_sequence=False, dtype=np.float64))
    literal = _literal(name, opts)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logp)
        ours = getattr(gt, name)(logp, old_logp, adv, mask, **opts).loss
        theirs = literal(logp, old_logp, adv, mask)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-12)
    np.testing.assert_allclose(tape.gradient(ours, logp).numpy(), tape.gradient(theirs, logp).numpy(), rtol=1e-10)


def test_only_logp_gets_a_gradient_scaled_by_the_upstream_gradient():
    logp, old_logp, adv, mask = (tf.Variable(a) for a in make_data(seed=5))
    with tf.GradientTape(persistent=True) as tape:
        out = gt.gipo_loss(logp, old_logp, adv, mask)
        scaled = 3.0 * out.loss
    grads = tape.gradient(out.loss, [logp, old_logp, adv])
    assert grads[1] is None and grads[2] is None
    np.testing.assert_allclose(tape.gradient(scaled, logp).numpy(), 3.0 * grads[0].numpy(), rtol=1e-6)
    # The diagnostics carry no gradient.
    metric_grad = tape.gradient(out.metrics["weight_mean"], logp)
    assert metric_grad is None or not np.any(metric_grad.numpy())


def test_variables_as_every_input_in_every_mode():
    arrays = make_data(seed=6)
    ref, ref_grad = gn.value_and_grad(gn.sapo_loss)(*arrays)
    for mode in MODES:
        variables = [tf.Variable(a) for a in arrays]

        def step():
            with tf.GradientTape() as tape:
                out = gt.sapo_loss(*variables, with_metrics=False)
            return out.loss, tape.gradient(out.loss, variables[0])

        loss, grad = compiled(step, mode)()
        np.testing.assert_allclose(loss.numpy(), ref.loss, rtol=2e-6)
        np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=2e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_computed_in_float32_with_gradient_in_input_dtype(dtype):
    logp, old_logp, adv, mask = make_data(seed=7)
    half = [tf.cast(a, getattr(tf, dtype)) for a in (logp, old_logp, adv)]
    out, grad = tf_value_and_grad(gt.gipo_loss, *half, tf.constant(mask))
    assert out.loss.dtype == tf.float32 and grad.dtype == getattr(tf, dtype)
    assert all(v.dtype == tf.float32 for v in out.metrics.values())
    rounded = [tf.cast(a, tf.float32).numpy() for a in half]  # the oracle sees the rounded inputs
    ref, ref_grad = gn.value_and_grad(gn.gipo_loss)(*rounded, mask)
    np.testing.assert_allclose(out.loss.numpy(), ref.loss, rtol=1e-6)
    eps = {"float16": 1e-3, "bfloat16": 8e-3}[dtype]  # the gradient is rounded to the input dtype
    np.testing.assert_allclose(tf.cast(grad, tf.float32).numpy(), ref_grad, rtol=eps, atol=1e-6)


def test_float64_stays_float64():
    arrays = make_data(seed=8, dtype=np.float64)
    out, grad = tf_value_and_grad(gt.gipo_loss, *arrays)
    assert out.loss.dtype == tf.float64 and grad.dtype == tf.float64
    assert all(v.dtype == tf.float64 for v in out.metrics.values())
    ref, ref_grad = gn.value_and_grad(gn.gipo_loss)(*arrays)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-12)


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_all_masked_and_nan_at_masked_positions(mode):
    logp, old_logp, adv, mask = make_data(seed=9)
    logp[~mask] = np.nan
    old_logp[~mask] = np.inf

    def step(lp, old, a, m):
        return [tf_value_and_grad(gt.gipo_loss, lp, old, a, mm) for mm in (m, tf.zeros_like(m))]

    (out, grad), (empty, empty_grad) = compiled(step, mode)(logp, old_logp, adv, mask)
    assert np.isfinite(out.loss.numpy()) and np.all(np.isfinite(grad.numpy()))
    assert not np.any(grad.numpy()[~mask])
    assert all(np.isfinite(v.numpy()) for v in out.metrics.values())
    assert float(empty.loss) == 0.0 and not np.any(empty_grad.numpy())
    assert all(float(v) == 0.0 for v in empty.metrics.values())


@pytest.mark.parametrize("jit", [False, True])
def test_dimensions_unknown_at_trace_time(jit):
    """Keras ``fit`` traces with a ``None`` batch dimension: counts then come from the data at run time."""
    logp, old_logp, adv, mask = make_data(shape=(5, 4), seed=10)
    spec = tf.TensorSpec([None, None], tf.float32)
    signature = [spec, spec, tf.TensorSpec([None, 1], tf.float32), tf.TensorSpec([None, None], tf.bool)]
    cases = [(agg, masked) for agg in IMPLEMENTED_AGG for masked in (False, True)]
    traces = []

    @tf.function(input_signature=signature, jit_compile=jit)
    def step(lp, old, a, m):
        traces.append(1)
        return [
            tf_value_and_grad(gt.gipo_loss, lp, old, a, m if masked else None, agg=agg, with_metrics=agg == AGG_MODES[0])
            for agg, masked in cases
        ]

    for rows in (5, 2):  # one trace serves every batch size
        arrays = (logp[:rows], old_logp[:rows], adv[:rows], mask[:rows])
        results = step(*(tf.constant(a) for a in arrays))
        for (agg, masked), (out, grad) in zip(cases, results):
            ref, ref_grad = gn.value_and_grad(gn.gipo_loss)(*arrays[:3], arrays[3] if masked else None, agg=agg)
            np.testing.assert_allclose(out.loss.numpy(), ref.loss, rtol=2e-6, err_msg=agg)
            np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=2e-6, atol=1e-8, err_msg=agg)
            for key in out.metrics:
                np.testing.assert_allclose(out.metrics[key].numpy(), ref.metrics[key], rtol=1e-5, atol=1e-7, err_msg=key)
        assert results[0][0].metrics and results[1][0].metrics  # token-mean, without and with a mask
    assert len(traces) == 1


def test_one_trace_per_shape_and_repeat_calls_are_bit_identical():
    traces = []
    loss_fn = gt.GIPOLoss(sigma=0.7)

    @tf.function(jit_compile=True)
    def step(lp, old, adv):
        traces.append(1)
        with tf.GradientTape() as tape:
            tape.watch(lp)
            out = loss_fn(lp, old, adv)
        return out.loss, tape.gradient(out.loss, lp)

    arrays = [tf.constant(a) for a in make_data(seed=11)[:3]]
    first = step(*arrays)
    for _ in range(3):
        again = step(*arrays)
        assert again[0].numpy() == first[0].numpy()
        np.testing.assert_array_equal(again[1].numpy(), first[1].numpy())
    assert len(traces) == 1


@pytest.mark.slow
def test_results_and_gradient_stay_on_the_device_of_logp():
    """TensorFlow places ops on its first device unless told; the adapter computes where ``logp`` lives.

    Two logical CPUs stand in for two accelerators; they must be configured before TensorFlow starts, so the
    check runs in a fresh interpreter.
    """
    script = textwrap.dedent(
        """
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import gipo_core.tf as gt
        with tf.device("/CPU:1"):
            lp = tf.constant([[-0.5, -1.0, -2.0]]); old = lp - 0.1; adv = tf.constant([[1.0]])
        with tf.GradientTape() as tape:
            tape.watch(lp)
            out = gt.gipo_loss(lp, old, adv)
        grad = tape.gradient(out.loss, lp)
        print(sorted({t.device.split("device:")[-1] for t in [out.loss, grad, *out.metrics.values()]}))
        """
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "['CPU:1']"


# ---------------------------------------------------------------------------------------------- errors


def test_errors_name_the_function_and_the_argument():
    logp, old_logp, adv, mask = (tf.constant(a) for a in make_data())
    strict = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match=r"`gipo_loss`: `old_logp` must be a dense tf.Tensor .*use gipo_core.numpy"):
        gt.gipo_loss(logp, strict.asarray(old_logp.numpy()), adv)
    with pytest.raises(TypeError, match=r"`ppo_clip_loss`: `advantages` must have a real floating dtype"):
        gt.ppo_clip_loss(logp, old_logp, tf.cast(adv, tf.int32))
    with pytest.raises(ValueError, match=r"`sapo_loss`: `advantages` has shape \(4,\) but `logp` has shape \(4, 6\)"):
        gt.sapo_loss(logp, old_logp, tf.zeros([4]))
    with pytest.raises(TypeError, match=r"`cispo_loss`: `mask` must be bool or a real floating dtype; got"):
        gt.cispo_loss(logp, old_logp, adv, tf.cast(mask, tf.int32))
    with pytest.raises(ValueError, match=r"`gipo_loss`: `sigma` must be a number in \[1e-06, 1e\+06\]; got -1.0"):
        gt.gipo_loss(logp, old_logp, adv, sigma=-1.0)
    with pytest.raises(ValueError, match=r"`GIPOLoss`: `kernel` must be one of"):
        gt.GIPOLoss(kernel="box")
    with pytest.raises(ValueError, match=r"`PPOClipLoss`: `agg` must be one of"):
        gt.PPOClipLoss(agg="mean")
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'sigma'"):
        gt.SAPOLoss(sigma=1.0)
    with pytest.raises(TypeError, match=r"`NoClipLoss`: `with_metrics` must be True or False"):
        gt.NoClipLoss(with_metrics=1)

    @tf.function
    def traced(lp):  # checks run at trace time, inside tf.function too
        return gt.gipo_loss(lp, lp, tf.zeros([4, 5])).loss

    with pytest.raises(ValueError, match=r"`gipo_loss`: `advantages` has shape \(4, 5\)"):
        traced(logp)


# --------------------------------------------------------------------------------------------- classes


@pytest.mark.parametrize(("name", "opts"), CASES, ids=CASE_IDS)
def test_loss_modules_equal_the_functions(name, opts):
    module = CLASSES[name](**opts, agg="seq-mean-token-sum")
    assert isinstance(module, tf.Module)
    assert module.options == {k: (float(v) if isinstance(v, (int, float)) and v is not None else v)
                              for k, v in dict(OBJECTIVES[module._objective].defaults, **opts).items()}
    logp, old_logp, adv, mask = (tf.constant(a) for a in make_data(seed=12))
    out = module(logp, old_logp, adv, mask, denominator=3.0)
    ref = getattr(gt, name)(logp, old_logp, adv, mask, **opts, agg="seq-mean-token-sum", denominator=3.0)
    assert out.loss.numpy() == ref.loss.numpy()
    assert repr(module).startswith(f"{type(module).__name__}(") and "agg='seq-mean-token-sum'" in repr(module)
    assert not gt.GIPOLoss(with_metrics=False)(logp, old_logp, adv).metrics


def test_loss_module_signatures_follow_the_objective_defaults():
    for name, cls in CLASSES.items():
        params = inspect.signature(cls).parameters
        objective = next(o for o in OBJECTIVES.values() if o.public_name == name)
        assert [(k, p.default) for k, p in params.items()][: len(objective.defaults)] == list(objective.defaults)
        assert list(params)[len(objective.defaults):] == [
            "agg", "ratio_level", "rollout_is", "rollout_is_bounds", "opsm_delta", "with_metrics"
        ]
        assert cls.__doc__.startswith(objective.summary)
    assert gt.GIPOLoss(0.5, 0.25).options == {"sigma": 0.5, "sigma_neg": 0.25, "kernel": "gaussian"}
    assert gt.PPOClipLoss().name == "ppo_clip_loss"


@pytest.mark.parametrize(
    "obj", [gt, _tf_namespace.tf_namespace, gt.GIPOLoss, gt.CISPOLoss, gt.gipo_loss, gt.sapo_loss],
    ids=["module", "shim", "GIPOLoss", "CISPOLoss", "gipo_loss", "sapo_loss"],
)
def test_docstring_examples_run(obj):
    """The module's, the shim's and one of each generated docstring's examples (the others share them)."""
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in doctest.DocTestFinder(recurse=False).find(obj, globs={}):
        runner.run(test)
    assert runner.tries > 0 and runner.failures == 0


# ----------------------------------------------------------------------------------------------- Keras


def _policy_model(keras, n_actions, loss_fn, dtype=None):
    """A Keras 3 model whose custom train_step takes a GIPO step on (obs, actions, old_logp, advantages)."""

    class Policy(keras.Model):
        def __init__(self):
            super().__init__(dtype=dtype)
            self.body = keras.Sequential(
                [keras.layers.Dense(16, activation="tanh", dtype=dtype), keras.layers.Dense(n_actions, dtype=dtype)]
            )
            self.loss_fn = loss_fn
            self.seen_dtypes = set()

        def call(self, obs):
            return self.body(obs)

        def train_step(self, data):
            obs, actions, old_logp, advantages = data
            with tf.GradientTape() as tape:
                logp_all = tf.nn.log_softmax(self(obs, training=True))
                logp = tf.gather(logp_all, actions, batch_dims=1)
                self.seen_dtypes.add(logp.dtype.name)
                out = self.loss_fn(logp, old_logp, advantages)
                loss = self.optimizer.scale_loss(out.loss)
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply(grads, self.trainable_variables)
            return {"loss": out.loss, "weight_mean": out.metrics["weight_mean"], "n_valid": out.metrics["n_valid"]}

    return Policy()


def _bandit_batch(n=48, n_actions=3, seed=13):
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, 4)).astype(np.float32)
    actions = rng.integers(0, n_actions, size=(n,)).astype(np.int32)
    old_logp = np.full((n,), np.log(1.0 / n_actions), np.float32)
    advantages = np.where(actions == 0, 1.0, -0.5).astype(np.float32)  # action 0 is the good one
    return obs, actions, old_logp, advantages


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_keras_custom_train_step_with_xla(policy):
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("Keras runs on another backend")
    tf.keras.utils.set_random_seed(0) if hasattr(tf, "keras") else keras.utils.set_random_seed(0)
    obs, actions, old_logp, advantages = _bandit_batch()
    model = _policy_model(keras, 3, gt.GIPOLoss(sigma=1.0), dtype=policy)
    model.compile(optimizer=keras.optimizers.Adam(5e-2), jit_compile=True)
    # The last batch is smaller, so Keras traces with a None batch dimension.
    ds = tf.data.Dataset.from_tensor_slices((obs, actions, old_logp, advantages)).batch(20)
    before = tf.nn.softmax(model(obs))[:, 0].numpy().mean()
    history = model.fit(ds, epochs=4, verbose=0, shuffle=False).history
    after = tf.nn.softmax(model(obs))[:, 0].numpy().mean()
    assert model.seen_dtypes == {"float16" if policy == "mixed_float16" else "float32"}
    assert np.all(np.isfinite(history["loss"])) and history["n_valid"][-1] > 0
    assert after > before + 0.1, (before, after)  # the policy moved toward the advantaged action
    # The step's loss is the functional loss of the model's log-probabilities.
    logp = tf.gather(tf.nn.log_softmax(model(obs[:8])), actions[:8], batch_dims=1)
    direct = gt.gipo_loss(logp, tf.constant(old_logp[:8]), tf.constant(advantages[:8]))
    assert direct.loss.dtype == tf.float32
    assert np.isfinite(direct.loss.numpy())
