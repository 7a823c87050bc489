"""gipo_core.jax.fused_linear_loss against the unfused path (logits -> log_softmax -> gather -> array loss)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import gipo_core.jax as gj  # noqa: E402
from gipo_core._api import AGG_MODES  # noqa: E402

OBJECTIVES = {
    "gipo": {"sigma": 0.7, "sigma_neg": 0.4},
    "ppo_clip": {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0},
    "sapo": {"tau_pos": 1.0, "tau_neg": 1.05},
    "cispo": {"clip_max": 2.0},
    "no_clip": {},
}


def unfused(hidden, weight, ids, old_logp, adv, mask=None, *, objective="gipo", bias=None, temperature=1.0, **kw):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if temperature != 1.0:
        logits = logits / temperature
    wd = jnp.float64 if hidden.dtype == jnp.float64 else jnp.float32
    logprobs = jax.nn.log_softmax(logits.astype(wd), -1)
    logp = jnp.take_along_axis(logprobs, ids[..., None], -1)[..., 0]
    entropy = -(jnp.exp(logprobs) * logprobs).sum(-1)
    return getattr(gj, f"{objective}_loss")(logp, old_logp, adv, mask, **kw), logp, entropy


def data(b=3, t=7, h=8, v=37, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(b, t, h)).astype(dtype)
    weight = (rng.normal(size=(v, h)) * 0.5).astype(dtype)
    bias = rng.normal(size=v).astype(dtype)
    ids = rng.integers(0, v, (b, t)).astype(np.int32)
    old = (rng.normal(size=(b, t)) * 0.5 - 3.5).astype(dtype)
    adv = rng.normal(size=(b, 1)).astype(dtype)
    mask = rng.random((b, t)) > 0.3
    mask[1] = False  # an empty row
    return hidden, weight, bias, ids, old, adv, mask


def close(got, want, atol):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=0, atol=atol)


# Every objective and every aggregation mode at least once (the full product runs in the torch tests; the
# aggregation weight is shared code): each pair is one compilation.
PAIRS = list(zip(OBJECTIVES, AGG_MODES + ("token-mean",))) + [("gipo", "seq-mean-token-mean")]


@pytest.mark.parametrize("objective,agg", PAIRS)
def test_objectives_and_aggregations_match_unfused_in_float64(objective, agg):
    opts = OBJECTIVES[objective]
    with jax.enable_x64(True):
        hidden, weight, bias, ids, old, adv, mask = (jnp.asarray(x) for x in data())
        kw = dict(objective=objective, bias=bias, temperature=0.8, agg=agg, **opts)

        def fused(h, w, b, kw=kw):
            out = gj.fused_linear_loss(h, w, ids, old, adv, mask, chunk_size=4, with_entropy=True, **{**kw, "bias": b})
            return out.loss, out

        def ref(h, w, b, kw=kw):
            out, logp, entropy = unfused(h, w, ids, old, adv, mask, **{**kw, "bias": b})
            return out.loss, (out, logp, entropy)

        (loss, out), g = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2), has_aux=True))(hidden, weight, bias)
        (loss_r, (out_r, logp, entropy)), g_r = jax.value_and_grad(ref, argnums=(0, 1, 2), has_aux=True)(
            hidden, weight, bias
        )
        assert loss.dtype == jnp.float64
        close(loss, loss_r, 1e-10)
        for a, b in zip(g, g_r):
            close(a, b, 1e-10)
        close(out.logp, logp, 1e-12)
        close(out.entropy, entropy, 1e-12)
        assert list(out.metrics) == list(out_r.metrics)
        for name in out_r.metrics:
            np.testing.assert_allclose(out.metrics[name], out_r.metrics[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"denominator": 11.0},
        {"behavior_weights": True},
        {"float_mask": True},
        {"no_mask": True, "agg": "seq-mean-token-mean"},
    ],
    ids=["denominator", "behavior-weights", "float-mask", "no-mask"],
)
def test_options_match_unfused(kwargs):
    kwargs = dict(kwargs)
    with jax.enable_x64(True):
        hidden, weight, _, ids, old, adv, mask = data(seed=1)
        rng = np.random.default_rng(3)
        if kwargs.pop("behavior_weights", False):
            kwargs["behavior_weights"] = rng.random(mask.shape)
        if kwargs.pop("float_mask", False):
            mask = mask * rng.random(mask.shape)
        if kwargs.pop("no_mask", False):
            mask = None
        fused = lambda h, w: gj.fused_linear_loss(h, w, ids, old, adv, mask, chunk_size=5, **kwargs).loss  # noqa: E731
        ref = lambda h, w: unfused(h, w, ids, old, adv, mask, **kwargs)[0].loss  # noqa: E731
        loss, g = jax.value_and_grad(fused, argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(weight))
        loss_r, g_r = jax.value_and_grad(ref, argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(weight))
        close(loss, loss_r, 1e-10)
        for a, b in zip(g, g_r):
            close(a, b, 1e-10)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rollout_is": "token-mask", "rollout_is_bounds": (0.8, 1.25), "agg": "token-sum"},
        {"rollout_is": "sequence-truncate", "rollout_is_bounds": (0.0, 1.5)},
        {"ratio_level": "sequence", "rollout_is": "geometric-mask", "rollout_is_bounds": (0.9, 1.1),
         "opsm_delta": 0.0, "with_metrics": "basic"},
    ],
    ids=["token-mask", "sequence-truncate", "sequence-geometric-opsm"],
)
def test_off_policy_options_match_unfused_in_float64(kwargs):
    with jax.enable_x64(True):
        hidden, weight, bias, ids, old, adv, mask = data(seed=2)
        rollout = old + 0.3 * np.random.default_rng(4).normal(size=old.shape)
        kw = dict(bias=bias, rollout_logp=rollout, **kwargs)

        def fused(h, w):
            out = gj.fused_linear_loss(h, w, ids, old, adv, mask, chunk_size=4, with_entropy=True, **kw)
            return out.loss, (out.metrics, out.entropy)

        def ref(h, w):
            out, _, entropy = unfused(h, w, ids, old, adv, mask, **kw)
            return out.loss, (out.metrics, entropy)

        (loss, (metrics, ent)), g = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(hidden, weight)
        (loss_r, (metrics_r, ent_r)), g_r = jax.value_and_grad(ref, argnums=(0, 1), has_aux=True)(hidden, weight)
        close(ent, ent_r, 1e-12)
        close(loss, loss_r, 1e-10)
        for a, b in zip(g, g_r):
            close(a, b, 1e-10)
        assert list(metrics) == list(metrics_r)
        for name in metrics_r:
            close(metrics[name], metrics_r[name], 1e-12)


def test_low_precision_within_the_unfused_float32_tolerance():
    hidden, weight, _, ids, old, adv, mask = data(b=4, t=16, h=32, v=300, seed=4)
    old, adv = old.astype(np.float32), adv.astype(np.float32)
    with jax.enable_x64(True):
        old64, adv64 = old.astype(np.float64), adv.astype(np.float64)
        truth_fn = lambda h, w: unfused(h, w, ids, old64, adv64, mask)[0].loss  # noqa: E731
        truth, truth_g = jax.jit(jax.value_and_grad(truth_fn, argnums=(0, 1)))(jnp.asarray(hidden), jnp.asarray(weight))
        truth, truth_g = float(truth), [np.asarray(x) for x in truth_g]
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, None)):
        h, w = jnp.asarray(hidden, dtype), jnp.asarray(weight, dtype)
        fused = lambda h, w: gj.fused_linear_loss(h, w, ids, old, adv, mask, chunk_size=7).loss  # noqa: E731
        ref = lambda h, w: unfused(h, w, ids, old, adv, mask)[0].loss  # noqa: E731
        loss, g = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(h, w)
        loss_r, g_r = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(h, w)
        assert loss.dtype == jnp.float32 and g[0].dtype == dtype and g[1].dtype == dtype
        for got, want, true in zip(g, g_r, truth_g):
            scale = np.abs(true).max()
            err = np.abs(np.asarray(got, np.float64) - true).max() / scale
            err_r = np.abs(np.asarray(want, np.float64) - true).max() / scale
            assert err <= (tol if tol is not None else 2 * err_r + 1e-3), (dtype, err, err_r)
        assert abs(float(loss) - truth) <= 2 * abs(float(loss_r) - truth) + 1e-5


def test_extreme_logits_stay_finite():
    hidden, weight, _, ids, old, adv, mask = data(b=2, t=6, h=8, v=50, seed=5, dtype=np.float32)
    hidden[..., 0] = 0.0
    hidden[0, :2] = 0.0
    hidden[0, :2, 0] = 1.0
    mask[0, :2] = True
    weight[:, 0] = 0.0
    weight[ids[0, 0], 0] = 1e4
    weight[(ids[0, 1] + 1) % 50, 0] = -1e4
    old[0, :2] = [0.0, -1e4]
    for dtype in (jnp.float32, jnp.bfloat16):
        h, w = jnp.asarray(hidden, dtype), jnp.asarray(weight, dtype)
        f = lambda h, w: gj.fused_linear_loss(h, w, ids, old, adv, mask, chunk_size=5, with_entropy=True)  # noqa: E731
        out = jax.jit(f)(h, w)
        g = jax.jit(jax.grad(lambda h, w: f(h, w).loss, argnums=(0, 1)))(h, w)
        for x in (out.loss, out.logp, out.entropy, *g, *out.metrics.values()):
            assert np.isfinite(np.asarray(x, np.float64)).all()
        assert float(out.logp[0, 0]) == 0.0 and float(out.logp[0, 1]) == -float(w[ids[0, 0], 0])


def test_eager_numpy_inputs_and_chunking():
    hidden, weight, bias, ids, old, adv, mask = data(dtype=np.float32, seed=6)
    results = [
        gj.fused_linear_loss(hidden, weight, ids, old, adv, mask, bias=bias, chunk_size=c) for c in (None, 2, 100)
    ]
    for out in results[1:]:
        np.testing.assert_allclose(out.loss, results[0].loss, rtol=1e-6)
        np.testing.assert_allclose(out.logp, results[0].logp, rtol=1e-6)
    assert results[0].entropy is None
    padded = np.where(mask, ids, -100)  # ids at masked positions are ignored
    np.testing.assert_allclose(gj.fused_linear_loss(hidden, weight, padded, old, adv, mask, bias=bias).loss,
                               results[0].loss, rtol=1e-6)


def test_memory_stays_flat_under_jit():
    # The compiled forward + backward never allocates a (tokens, vocab) buffer: its temporaries stay well
    # under one full float32 logits array, while the unfused path's exceed it.
    n, h, v = 512, 32, 4096
    rng = np.random.default_rng(7)
    hidden = jnp.asarray(rng.normal(size=(n, h)), jnp.float32)[None]
    weight = jnp.asarray(rng.normal(size=(v, h)) * 0.1, jnp.float32)
    ids = jnp.asarray(rng.integers(0, v, (1, n)))
    old = jnp.full((1, n), -8.0)
    adv = jnp.asarray(rng.normal(size=(1, n)), jnp.float32)
    fused = lambda h, w: gj.fused_linear_loss(h, w, ids, old, adv, chunk_size=64, with_metrics=False).loss  # noqa: E731
    ref = lambda h, w: unfused(h, w, ids, old, adv, with_metrics=False)[0].loss  # noqa: E731
    full_logits = n * v * 4

    def temp_bytes(fn):
        compiled = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(hidden, weight).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(fused) < 0.5 * full_logits, temp_bytes(fused)
    assert temp_bytes(ref) >= full_logits, temp_bytes(ref)


def test_bad_arguments_raise_clear_errors():
    hidden, weight, bias, ids, old, adv, mask = data(seed=8)
    call = gj.fused_linear_loss
    cases = [
        (ValueError, "`weight` must have shape \\(vocab, hidden_dim\\)", lambda: call(hidden, weight.T, ids, old, adv)),
        (TypeError, "`weight` has dtype bfloat16",
         lambda: call(hidden, jnp.asarray(weight, jnp.bfloat16), ids, old, adv)),
        (TypeError, "`target_ids` must have an integer dtype", lambda: call(hidden, weight, ids * 1.0, old, adv)),
        (ValueError, "`old_logp` has shape \\(3,\\)", lambda: call(hidden, weight, ids, old[:, 0], adv)),
        (ValueError, "`objective` must be one of", lambda: call(hidden, weight, ids, old, adv, objective="grpo")),
        (TypeError, "unexpected option\\(s\\) clip_max for objective='gipo'",
         lambda: call(hidden, weight, ids, old, adv, clip_max=2.0)),
        (ValueError, "`temperature` must be a finite number > 0",
         lambda: call(hidden, weight, ids, old, adv, temperature=-1.0)),
    ]
    for exc, message, fn in cases:
        with pytest.raises(exc, match="fused_linear_loss.*" + message):
            fn()


_SHARDED_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import gipo_core.jax as gj

    assert len(jax.devices()) == 8
    rng = np.random.default_rng(0)
    b, t, h, v = 4, 12, 16, 256
    hidden = rng.normal(size=(b, t, h)).astype(np.float32)
    weight = (rng.normal(size=(v, h)) * 0.3).astype(np.float32)
    bias = rng.normal(size=v).astype(np.float32)
    ids = rng.integers(0, v, (b, t)).astype(np.int32)
    old = (rng.normal(size=(b, t)) - 5.0).astype(np.float32)
    adv = rng.normal(size=(b, 1)).astype(np.float32)
    mask = rng.random((b, t)) > 0.2

    def step(h, w, bv):
        f = lambda h, w, bv: gj.fused_linear_loss(h, w, ids, old, adv, mask, bias=bv, chunk_size=16,
                                                  objective="gipo", sigma=0.5, with_entropy=True)
        (loss, out), g = jax.value_and_grad(lambda *a: (f(*a).loss, f(*a)), argnums=(0, 1, 2), has_aux=True)(h, w, bv)
        return loss, out.logp, out.entropy, g

    full = jax.jit(step)(hidden, weight, bias)
    mesh = Mesh(np.array(jax.devices()), ("vocab",))
    rows = NamedSharding(mesh, P("vocab", None))       # the weight split along the vocabulary
    w_sharded = jax.device_put(weight, rows)
    b_sharded = jax.device_put(bias, NamedSharding(mesh, P("vocab")))
    sharded = jax.jit(step)(hidden, w_sharded, b_sharded)
    assert sharded[3][1].sharding.is_equivalent_to(rows, 2), sharded[3][1].sharding
    for got, want in zip(jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(full)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=1e-6)
    print("ok", float(sharded[0]))
    """
)


def test_weight_sharded_along_the_vocabulary_over_eight_devices():
    # The flag must be set before JAX initialises, hence a fresh process.
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok")
