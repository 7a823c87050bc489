"""Tests of the JAX adapter: custom_vjp, jit, grad, vmap, dtypes, the option classes and sharding.

Oracles: the NumPy backend (the core evaluated directly, with its closed-form gradient) and plain JAX
autodiff of the literal formula of each objective.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import textwrap

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy
from jax.extend import core as jax_core  # noqa: E402

import gipo_core.jax as gj  # noqa: E402
import gipo_core.numpy as gn  # noqa: E402
from gipo_core import AGG_MODES, METRIC_NAMES  # noqa: E402
from gipo_core._core.objectives import OBJECTIVES  # noqa: E402
from params import AGG_PARAMS  # noqa: E402
from subprocess_helpers import run_python  # noqa: E402

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
    "gipo_loss": gj.GIPOLoss,
    "ppo_clip_loss": gj.PPOClipLoss,
    "no_clip_loss": gj.NoClipLoss,
    "sapo_loss": gj.SAPOLoss,
    "cispo_loss": gj.CISPOLoss,
}


def make_data(shape=(4, 6), seed=0, per_sequence=True, scale=0.6):
    """float32 NumPy arrays: logp, old_logp, advantages, a bool mask with every row partly valid."""
    rng = np.random.default_rng(seed)
    logp = rng.normal(-1.0, 0.5, shape).astype(np.float32)
    old_logp = (logp + rng.normal(0.0, scale, shape)).astype(np.float32)
    adv_shape = shape[:-1] + (1,) if per_sequence else shape
    adv = rng.normal(0.0, 1.0, adv_shape).astype(np.float32)
    mask = rng.random(shape) < 0.7
    mask[..., 0] = True
    return logp, old_logp, adv, mask


def jax_value_and_grad(fn, logp, old_logp, adv, mask=None, jit=True, **kwargs):
    """Loss, metrics and dloss/dlogp through the custom_vjp, jitted or op by op."""

    def f(lp, o, a, m):
        out = fn(lp, o, a, m, **kwargs)
        return out.loss, out.metrics

    vg = jax.value_and_grad(f, has_aux=True)
    return (jax.jit(vg) if jit else vg)(logp, old_logp, adv, mask)


def assert_matches_numpy(name, arrays, kwargs, rtol=2e-5, atol=1e-6, jit=True):
    (loss, metrics), grad = jax_value_and_grad(getattr(gj, name), *arrays, jit=jit, **kwargs)
    ref, ref_grad = gn.value_and_grad(getattr(gn, name))(*arrays, **kwargs)
    np.testing.assert_allclose(np.asarray(loss), ref.loss, rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=rtol, atol=atol)
    assert grad.dtype == arrays[0].dtype
    assert sorted(metrics) == sorted(METRIC_NAMES)  # a dict leaving jax.jit has sorted keys
    for key in METRIC_NAMES:
        np.testing.assert_allclose(np.asarray(metrics[key]), ref.metrics[key], rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.parametrize(("name", "opts"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_every_objective_matches_numpy_under_jit_and_grad(name, opts, agg):
    assert_matches_numpy(name, make_data(), {**opts, "agg": agg})


@pytest.mark.parametrize("agg", AGG_PARAMS)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_aggregation_modes_and_masks_match_numpy(agg, mask_kind):
    logp, old_logp, adv, mask = make_data(shape=(3, 5), seed=1, per_sequence=False)
    mask = {"none": None, "bool": mask, "float": mask.astype(np.float32) * 0.5}[mask_kind]
    # Op by op (jit is covered above): one small compile per operation, shared by every case.
    assert_matches_numpy("gipo_loss", (logp, old_logp, adv, mask), {"agg": agg, "sigma": 0.7}, jit=False)


@pytest.mark.parametrize("denominator", [7.0, "array", "int-array"])
def test_behavior_weights_and_denominator_match_numpy(denominator):
    logp, old_logp, adv, mask = make_data(seed=2)
    bw = np.random.default_rng(3).uniform(0.5, 1.5, logp.shape).astype(np.float32)
    denom_np = {7.0: 7.0, "array": np.float32(7.0), "int-array": np.array(7, np.int32)}[denominator]
    denom_jax = denom_np if isinstance(denom_np, float) else jnp.asarray(denom_np)

    def f(lp, d):
        return gj.ppo_clip_loss(lp, old_logp, adv, mask, denominator=d, behavior_weights=bw).loss

    loss, grad = jax.jit(jax.value_and_grad(f))(logp, denom_jax)
    ref, ref_grad = gn.value_and_grad(gn.ppo_clip_loss)(
        logp, old_logp, adv, mask, denominator=denom_np, behavior_weights=bw
    )
    np.testing.assert_allclose(loss, ref.loss, rtol=2e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=2e-5, atol=1e-7)


def _literal(name, opts):
    """The textbook form of each objective, for plain JAX autodiff (per-element loss)."""
    sg = jax.lax.stop_gradient

    def gipo(lp, o, a):
        ell = lp - o
        sigma = jnp.where(a > 0, opts.get("sigma", 1.0), opts.get("sigma_neg") or opts.get("sigma", 1.0))
        r = ell / sigma
        log_w = {"gaussian": -0.5 * r**2, "laplace": -jnp.abs(r), "cauchy": -jnp.log1p(r**2)}[
            opts.get("kernel", "gaussian")
        ]
        return -sg(jnp.exp(log_w)) * jnp.exp(ell) * a

    def ppo(lp, o, a):
        rho = jnp.exp(lp - o)
        lo, hi = 1 - opts.get("clip_low", 0.2), 1 + opts.get("clip_high", 0.2)
        loss = jnp.maximum(-a * rho, -a * jnp.clip(rho, lo, hi))
        if opts.get("dual_clip"):
            loss = jnp.where(a < 0, jnp.minimum(loss, -opts["dual_clip"] * a), loss)
        return loss

    def sapo(lp, o, a):
        tau = jnp.where(a > 0, opts.get("tau_pos", 1.0), opts.get("tau_neg", 1.05))
        return -a * jax.nn.sigmoid(tau * (jnp.exp(lp - o) - 1)) * 4 / tau

    return {
        "gipo_loss": gipo,
        "ppo_clip_loss": ppo,
        "no_clip_loss": lambda lp, o, a: -a * jnp.exp(lp - o),
        "sapo_loss": sapo,
        "cispo_loss": lambda lp, o, a: -sg(jnp.minimum(jnp.exp(lp - o), opts.get("clip_max", 5.0))) * a * lp,
    }[name]


@pytest.mark.parametrize(("name", "opts"), CASES, ids=CASE_IDS)
def test_custom_gradient_equals_autodiff_of_the_literal_formula(name, opts):
    logp, old_logp, adv, mask = make_data(shape=(5, 7), seed=4, per_sequence=False)
    m = jnp.asarray(mask, jnp.float32)
    element = _literal(name, opts)

    def literal(lp):
        return jnp.sum(element(lp, old_logp, adv) * m) / jnp.sum(m)

    got_loss, got = jax.value_and_grad(lambda lp: getattr(gj, name)(lp, old_logp, adv, mask, **opts).loss)(logp)
    want_loss, want = jax.value_and_grad(literal)(jnp.asarray(logp))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_only_logp_gets_a_gradient_and_eager_equals_jit():
    logp, old_logp, adv, mask = make_data(per_sequence=False)
    bw = np.ones_like(logp)

    def f(lp, o, a, w, d):
        return gj.gipo_loss(lp, o, a, mask, behavior_weights=w, denominator=d).loss

    args = tuple(jnp.asarray(x) for x in (logp, old_logp, adv, bw)) + (jnp.float32(9.0),)
    eager = jax.grad(f, argnums=(0, 1, 2, 3, 4))(*args)
    jitted = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))(*args)
    for e, j, x in zip(eager, jitted, args):
        np.testing.assert_allclose(e, j, rtol=1e-6, atol=1e-8)
        assert e.shape == x.shape and e.dtype == x.dtype
    assert np.any(np.asarray(eager[0]) != 0)
    for zero in eager[1:]:
        assert not np.any(np.asarray(zero))


@pytest.mark.parametrize("name", ["gipo_loss", "ppo_clip_loss"])
def test_vmap_gives_per_example_losses_and_gradients(name):
    logp, old_logp, adv, mask = make_data(shape=(3, 4, 5), seed=5)
    fn = getattr(gj, name)

    def per_example(lp, o, a, m):
        out = fn(lp, o, a, m, agg="seq-mean-token-sum")
        return out.loss, out.metrics["n_valid"]

    (losses, n_valid), grads = jax.jit(jax.vmap(jax.value_and_grad(per_example, has_aux=True)))(
        logp, old_logp, adv, mask
    )
    assert losses.shape == (3,) and grads.shape == logp.shape
    for i in range(3):
        ref, ref_grad = gn.value_and_grad(getattr(gn, name))(
            logp[i], old_logp[i], adv[i], mask[i], agg="seq-mean-token-sum"
        )
        np.testing.assert_allclose(losses[i], ref.loss, rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(grads[i], ref_grad, rtol=2e-5, atol=1e-7)
        assert n_valid[i] == mask[i].sum()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_computed_in_float32_with_gradient_in_input_dtype(dtype):
    logp, old_logp, adv, mask = (jnp.asarray(x) for x in make_data(seed=6))
    low = tuple(x.astype(dtype) for x in (logp, old_logp, adv))
    f = jax.jit(jax.value_and_grad(lambda lp, o, a: gj.gipo_loss(lp, o, a, mask).loss))
    loss, grad = f(*low)
    # The same values held in float32 give the same loss, and the float32 gradient rounded to `dtype`.
    loss32, grad32 = f(*(x.astype(jnp.float32) for x in low))
    assert loss.dtype == jnp.float32 and grad.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(loss, loss32, rtol=1e-6)
    eps = float(jnp.finfo(dtype).eps)  # two separately compiled programs: allow one rounding in `dtype`
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(grad32, np.float32), rtol=eps, atol=1e-7)
    metrics = gj.gipo_loss(*low, mask).metrics
    assert all(v.dtype == jnp.float32 for v in metrics.values())


def test_float64_under_enable_x64():
    logp, old_logp, adv, mask = (x.astype(np.float64) if x.dtype != bool else x for x in make_data(seed=7))
    with jax.enable_x64(True):
        (loss, metrics), grad = jax_value_and_grad(gj.sapo_loss, logp, old_logp, adv, mask)
        assert loss.dtype == grad.dtype == jnp.float64
        assert all(v.dtype == jnp.float64 for v in metrics.values())
    ref, ref_grad = gn.value_and_grad(gn.sapo_loss)(logp, old_logp, adv, mask)
    np.testing.assert_allclose(loss, ref.loss, rtol=1e-13)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-16)


def test_all_masked_and_nan_at_masked_positions():
    logp, old_logp, adv, mask = make_data(per_sequence=False, seed=8)
    f = jax.jit(jax.value_and_grad(lambda lp, o, a, m: gj.gipo_loss(lp, o, a, m, sigma=0.5).loss))
    loss, grad = f(logp, old_logp, adv, np.zeros_like(mask))
    assert float(loss) == 0.0 and not np.any(np.asarray(grad))
    dirty = [x.copy() for x in (logp, old_logp, adv)]
    for x, bad in zip(dirty, (np.nan, np.inf, -np.inf)):
        x[~mask] = bad
    clean = f(logp, old_logp, adv, mask)
    got = f(*dirty, mask)
    np.testing.assert_allclose(got[0], clean[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], clean[1], rtol=1e-6, atol=1e-8)
    assert np.all(np.isfinite(got[1]))


def test_no_host_callbacks_and_one_trace_per_static_option():
    logp, old_logp, adv, mask = make_data()

    def primitives(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn.primitive.name
            for sub in jax_core.jaxprs_in_params(eqn.params):
                yield from primitives(sub)

    forward = jax.make_jaxpr(lambda lp: gj.gipo_loss(lp, old_logp, adv, mask))(logp).jaxpr
    assert any("custom_vjp" in p for p in primitives(forward))
    both = jax.make_jaxpr(jax.value_and_grad(lambda lp: gj.gipo_loss(lp, old_logp, adv, mask).loss))(logp).jaxpr
    names = set(primitives(forward)) | set(primitives(both))
    assert not any("callback" in p for p in names), names
    traces = []

    @jax.jit
    def f(lp):
        traces.append(1)
        return gj.GIPOLoss(sigma=0.5)(lp, old_logp, adv, mask).loss

    f(logp)
    f(logp + 1.0)
    assert len(traces) == 1


def test_numpy_inputs_run_in_jax():
    logp, old_logp, adv, mask = make_data()
    out = gj.gipo_loss(logp, old_logp, adv, mask, denominator=np.float32(5.0))
    assert list(out.metrics) == list(METRIC_NAMES)  # eager: the documented order
    assert isinstance(out.loss, jax.Array) and all(isinstance(v, jax.Array) for v in out.metrics.values())
    assert isinstance(gj.gaussian_trust_weight(logp - old_logp), jax.Array)
    # A NumPy old_logp next to a traced logp is fine too.
    assert jax.grad(lambda lp: gj.gipo_loss(lp, old_logp, adv).loss)(jnp.asarray(logp)).shape == logp.shape


def test_errors_name_the_function_and_argument_under_jit():
    logp, old_logp, adv, _ = make_data()
    with pytest.raises(ValueError, match=r"`gipo_loss`: `advantages` has shape \(4,\)"):
        jax.jit(lambda lp: gj.gipo_loss(lp, old_logp, adv[:, 0]).loss)(logp)
    with pytest.raises(TypeError, match="`ppo_clip_loss`: `logp` must have a real floating dtype"):
        gj.ppo_clip_loss(jnp.zeros((2, 3), jnp.int32), old_logp[:2, :3], adv[:2])
    strict = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match="`gipo_loss`: `old_logp` must be a jax.Array .*; got array_api_strict.*use gipo_core.numpy"):
        gj.gipo_loss(jnp.asarray(logp), strict.asarray(old_logp), jnp.asarray(adv))
    with pytest.raises(ValueError, match=r"`GIPOLoss`: `sigma` must be a number in \[1e-06, 1e\+06\]; got -1"):
        gj.GIPOLoss(sigma=-1)
    with pytest.raises(ValueError, match="`SAPOLoss`: `agg` must be one of"):
        gj.SAPOLoss(agg="mean")
    with pytest.raises(TypeError, match="`CISPOLoss`: `with_metrics` must be True or False"):
        gj.CISPOLoss(with_metrics=1)


@pytest.mark.parametrize(("name", "opts"), CASES, ids=CASE_IDS)
def test_loss_classes_are_hashable_static_and_equal_to_the_functions(name, opts):
    cls = CLASSES[name]
    loss_fn = cls(**opts, agg="seq-mean-token-sum")
    assert loss_fn == cls(**opts, agg="seq-mean-token-sum") and hash(loss_fn) == hash(cls(**opts, agg="seq-mean-token-sum"))
    assert loss_fn != cls(**opts)
    with pytest.raises(dataclasses.FrozenInstanceError):
        loss_fn.agg = "token-mean"
    logp, old_logp, adv, mask = make_data(seed=9)

    @jax.jit
    def closed_over(lp):
        return loss_fn(lp, old_logp, adv, mask, denominator=3.0).loss

    static = jax.jit(lambda f, lp: f(lp, old_logp, adv, mask, denominator=3.0).loss, static_argnums=0)
    want = getattr(gj, name)(logp, old_logp, adv, mask, **opts, agg="seq-mean-token-sum", denominator=3.0).loss
    np.testing.assert_allclose(closed_over(logp), want, rtol=1e-6)
    np.testing.assert_allclose(static(loss_fn, logp), want, rtol=1e-6)
    # A static pytree node: an ordinary argument of a jitted function too, with no leaves.
    as_argument = jax.jit(lambda f, lp: f(lp, old_logp, adv, mask, denominator=3.0).loss)
    np.testing.assert_allclose(as_argument(loss_fn, logp), want, rtol=1e-6)
    assert jax.tree_util.tree_leaves(loss_fn) == []
    assert cls(**opts, with_metrics=False)(logp, old_logp, adv).metrics == {}


def test_loss_class_fields_follow_the_objective_defaults():
    for name, cls in CLASSES.items():
        objective = next(o for o in OBJECTIVES.values() if o.public_name == name)
        params = inspect.signature(cls).parameters.values()
        positional = [(p.name, p.default) for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert positional == list(objective.defaults), name
        assert cls().options == dict(objective.defaults)
    # Options are stored as the functions see them: an int sigma equals the float one.
    assert gj.GIPOLoss(sigma=1) == gj.GIPOLoss() and isinstance(gj.GIPOLoss(sigma=1).sigma, float)
    assert gj.GIPOLoss(0.5).sigma == 0.5


def test_optax_policy_gradient_step_from_the_readme():
    optax = pytest.importorskip("optax")
    # The README example: a linear softmax policy over 4 actions, one optax step with GIPOLoss.
    key_obs, key_act, key_adv = jax.random.split(jax.random.key(0), 3)
    obs = jax.random.normal(key_obs, (8, 16, 3))  # (batch, time, features)
    actions = jax.random.randint(key_act, (8, 16), 0, 4)
    advantages = jax.random.normal(key_adv, (8, 1))  # one advantage per sequence
    mask = jnp.ones((8, 16), bool)
    params = {"w": jnp.zeros((3, 4))}

    def logp_of(params, obs, actions):
        logits = obs @ params["w"]
        return jnp.take_along_axis(jax.nn.log_softmax(logits), actions[..., None], axis=-1)[..., 0]

    old_logp = logp_of(params, obs, actions)  # the behaviour policy that sampled the batch
    loss_fn = gj.GIPOLoss(sigma=1.0)
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, obs, actions, old_logp, advantages, mask):
        def objective(params):
            out = loss_fn(logp_of(params, obs, actions), old_logp, advantages, mask)
            return out.loss, out.metrics

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, metrics

    new_params, _, loss, metrics = train_step(params, opt_state, obs, actions, old_logp, advantages, mask)
    assert float(metrics["weight_mean"]) == 1.0  # on-policy: every trust weight is 1
    assert np.any(np.asarray(new_params["w"]) != 0)
    # The step lowers the loss, as a policy-gradient step should.
    _, _, loss_after, _ = train_step(new_params, opt_state, obs, actions, old_logp, advantages, mask)
    assert float(loss_after) < float(loss)


_SHARDING_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import gipo_core.jax as gj

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    shape = (16, 12)
    logp = rng.normal(-1, 0.5, shape).astype(np.float32)
    old_logp = (logp + rng.normal(0, 0.5, shape)).astype(np.float32)
    adv = rng.normal(0, 1, (16, 1)).astype(np.float32)
    mask = rng.random(shape) < 0.6
    mask[:, 0] = True
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    row = NamedSharding(mesh, P("batch"))
    loss_fn = gj.GIPOLoss(sigma=0.5, agg={agg!r})

    def value_and_grad(lp, o, a, m, denominator=None):
        f = lambda lp: loss_fn(lp, o, a, m, denominator=denominator).loss
        return jax.value_and_grad(f)(lp)

    # 1. Sharded over the batch axis under jit: the same loss and gradient as on one device.
    full_loss, full_grad = jax.jit(value_and_grad)(logp, old_logp, adv, mask)
    sharded = [jax.device_put(x, row) for x in (logp, old_logp, adv, mask)]
    loss, grad = jax.jit(value_and_grad)(*sharded)
    assert grad.sharding.is_equivalent_to(row, 2), grad.sharding
    np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, full_grad, rtol=1e-6, atol=1e-9)

    # 2. Per-shard losses (data parallelism, shard_map) with the global count as `denominator` add up to
    #    the full-batch loss, and their gradients are the full-batch gradient.
    count = {{"token-mean": mask.sum(), "seq-mean-token-sum-norm": 16.0 * 12.0}}.get({agg!r}, 16.0)

    def per_shard(lp, o, a, m):
        loss, grad = value_and_grad(lp, o, a, m, denominator=jnp.float32(count))
        local, _ = value_and_grad(lp, o, a, m)  # the shard's own normalisation
        return jax.lax.psum(loss, "batch"), grad, jax.lax.psum(local, "batch")

    spec = P("batch")
    dp = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(spec,) * 4, out_specs=(P(), spec, P())))
    dp_loss, dp_grad, naive = dp(*sharded)
    np.testing.assert_allclose(dp_loss, full_loss, rtol=1e-6)
    np.testing.assert_allclose(dp_grad, full_grad, rtol=1e-6, atol=1e-9)
    # the local normalisation alone gets the scale wrong
    assert abs(float(naive) - float(full_loss)) > 1e-3 * abs(float(full_loss)), (naive, full_loss)
    print("ok", float(loss), float(dp_loss))
    """
)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_sharded_over_eight_devices_equals_unsharded(agg):
    # The flag must be set before JAX initialises, hence a fresh process; on a GPU machine it runs on the CPU.
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    (output,) = run_python([["-c", _SHARDING_SCRIPT.format(agg=agg)]], env=env, timeout=300)
    assert output.splitlines()[-1].startswith("ok"), output
